/*
 * memverify: the Linux counterpart of the workload unikernel. It stamps every page of a
 * memory area (or every block of a disk) with its index, the pass and a pattern derived
 * from both, and verifies every page in several passes, some in random order. It prints
 * a one-line summary and exits non-zero on any failure.
 *
 *   memverify [-m MIB | -f PERCENT] [-p PASSES] [-r RANDOM_PASSES | -R] [-s SEED] [-q]
 *       memory: MIB MiB (or PERCENT % of MemAvailable) of anonymous memory.
 *       Pass 0 stamps every page; passes 1..PASSES verify every page and restamp it, the
 *       last RANDOM_PASSES of them in a random order; a final pass verifies only. -R:
 *       every pass after pass 0 in a random order, the final one too (a sequential sweep
 *       of memory larger than its share of a pool misses on every page; a random one on
 *       the share that does not fit).
 *       Summary: "memverify: ok mib M pages P passes N verified V failures 0 ..."
 *   memverify disk-write PATH MIB [SEED]
 *   memverify disk-verify PATH MIB [SEED]
 *       disk: stamp / verify MIB MiB of 4 KiB blocks of a block device or file (O_DIRECT
 *       when the file system allows it, so reads come from the device, not a cache).
 *       Summary: "memverify: disk-verify ok PATH blocks B verified B failures 0"
 *
 * Exit status: 0 all verified; 1 a verification failure; 2 bad arguments or an I/O error
 * (the message names the file and the error).
 *
 * Built static (gcc -O2 -static) by build.sh so it runs in the busybox initramfs of the
 * L2 guest and in the nested harness's L1 alike.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / 8)
#define MAGIC 0x796669726576736dull /* "msverify" */
#define MAX_REPORTED 8

static int quiet;
static uint64_t failures;

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdull;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ull;
	x ^= x >> 33;
	return x;
}

/* The content of page `idx` after pass `pass`: a header naming it, then a pattern that
 * differs per page, pass and seed (so a stale, misplaced or zeroed page is caught). */
static void stamp(uint64_t *w, uint64_t idx, uint64_t pass, uint64_t seed)
{
	uint64_t h = mix(seed ^ (idx << 20) ^ (pass << 48) ^ pass);
	w[0] = MAGIC;
	w[1] = idx;
	w[2] = pass;
	w[3] = seed;
	for (unsigned j = 4; j < WORDS; j++)
		w[j] = h ^ (j * 0x9e3779b97f4a7c15ull);
}

/* Verify a page; report the first few failures. Returns 1 if it holds what it should. */
static int verify(const uint64_t *w, uint64_t idx, uint64_t pass, uint64_t seed, const char *what)
{
	uint64_t h = mix(seed ^ (idx << 20) ^ (pass << 48) ^ pass);
	unsigned bad = WORDS;
	if (w[0] != MAGIC || w[1] != idx || w[2] != pass || w[3] != seed) {
		bad = 0;
	} else {
		for (unsigned j = 4; j < WORDS; j++) {
			if (w[j] != (h ^ (j * 0x9e3779b97f4a7c15ull))) {
				bad = j;
				break;
			}
		}
	}
	if (bad == WORDS)
		return 1;
	if (failures < MAX_REPORTED)
		printf("memverify: FAIL %s %llu pass %llu: header magic %#llx index %llu pass %llu seed %llu, "
		       "first bad word %u\n",
		       what, (unsigned long long)idx, (unsigned long long)pass, (unsigned long long)w[0],
		       (unsigned long long)w[1], (unsigned long long)w[2], (unsigned long long)w[3], bad);
	failures++;
	return 0;
}

static long mem_available_mib(void)
{
	FILE *f = fopen("/proc/meminfo", "r");
	char line[256];
	long kib = -1;
	if (!f)
		return -1;
	while (fgets(line, sizeof line, f))
		if (sscanf(line, "MemAvailable: %ld kB", &kib) == 1)
			break;
	fclose(f);
	return kib < 0 ? -1 : kib / 1024;
}

static void usage(void)
{
	fprintf(stderr, "usage: memverify [-m MIB | -f PERCENT] [-p PASSES] [-r RANDOM_PASSES | -R] [-s SEED] [-q]\n"
			"       memverify disk-write|disk-verify PATH MIB [SEED]\n");
	exit(2);
}

static int memory(int argc, char **argv)
{
	long mib = 0, percent = 0, passes = 3, random_passes = 1;
	int all_random = 0;
	uint64_t seed = 1;
	int c;
	while ((c = getopt(argc, argv, "m:f:p:r:Rs:q")) != -1) {
		switch (c) {
		case 'm': mib = atol(optarg); break;
		case 'f': percent = atol(optarg); break;
		case 'p': passes = atol(optarg); break;
		case 'r': random_passes = atol(optarg); break;
		case 'R': all_random = 1; break;
		case 's': seed = strtoull(optarg, NULL, 0); break;
		case 'q': quiet = 1; break;
		default: usage();
		}
	}
	if (optind != argc || passes < 0 || random_passes < 0 || random_passes > passes)
		usage();
	if (all_random)
		random_passes = passes;
	if (percent > 0) {
		long avail = mem_available_mib();
		if (avail < 0) {
			fprintf(stderr, "memverify: cannot read MemAvailable from /proc/meminfo\n");
			return 2;
		}
		mib = avail * percent / 100;
	}
	if (mib <= 0)
		usage();
	uint64_t pages = (uint64_t)mib << 8;
	uint64_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		fprintf(stderr, "memverify: cannot map %ld MiB: %s\n", mib, strerror(errno));
		return 2;
	}
	uint32_t *order = malloc(pages * sizeof *order);
	if (!order) {
		fprintf(stderr, "memverify: cannot allocate the page order\n");
		return 2;
	}
	printf("memverify: start mib %ld pages %llu passes %ld (%ld random, 1 verify only) seed %llu\n", mib,
	       (unsigned long long)pages, passes + 1, random_passes + all_random, (unsigned long long)seed);
	fflush(stdout);
	double t0 = now(), t = t0;
	uint64_t verified = 0, rng = mix(seed) | 1;
	for (uint64_t i = 0; i < pages; i++)
		stamp(mem + i * WORDS, i, 0, seed);
	if (!quiet)
		printf("memverify: pass 0 stamped %llu pages in %.1f s\n", (unsigned long long)pages, now() - t);
	/* passes 1..passes verify what the pass before left, then restamp; the last
	 * random_passes in a random order (Fisher-Yates with xorshift). The final pass
	 * (passes + 1) only verifies. */
	for (long p = 1; p <= passes + 1; p++) {
		int random = all_random || (p <= passes && p > passes - random_passes);
		uint64_t before = failures;
		t = now();
		for (uint64_t i = 0; i < pages; i++)
			order[i] = (uint32_t)i;
		if (random) {
			for (uint64_t i = pages - 1; i > 0; i--) {
				rng ^= rng << 13;
				rng ^= rng >> 7;
				rng ^= rng << 17;
				uint64_t j = rng % (i + 1);
				uint32_t tmp = order[i];
				order[i] = order[j];
				order[j] = tmp;
			}
		}
		for (uint64_t k = 0; k < pages; k++) {
			uint64_t i = order[k];
			uint64_t *w = mem + i * WORDS;
			verify(w, i, p - 1, seed, "page");
			verified++;
			if (p <= passes)
				stamp(w, i, p, seed);
		}
		if (!quiet)
			printf("memverify: pass %ld (%s) verified %llu pages, %llu failures, %.1f s\n", p,
			       p > passes ? (random ? "verify only, random order" : "verify only")
			       : random   ? "random order"
					  : "sequential",
			       (unsigned long long)pages, (unsigned long long)(failures - before), now() - t);
		fflush(stdout);
	}
	printf("memverify: %s mib %ld pages %llu passes %ld verified %llu failures %llu time %.1f s\n",
	       failures ? "FAILED" : "ok", mib, (unsigned long long)pages, passes + 1, (unsigned long long)verified,
	       (unsigned long long)failures, now() - t0);
	fflush(stdout);
	return failures ? 1 : 0;
}

static int disk(const char *mode, const char *path, long mib, uint64_t seed)
{
	int write_mode = strcmp(mode, "disk-write") == 0;
	if (!write_mode && strcmp(mode, "disk-verify") != 0)
		usage();
	if (mib <= 0)
		usage();
	int flags = write_mode ? O_WRONLY : O_RDONLY;
	int fd = open(path, flags | O_DIRECT);
	if (fd < 0 && errno == EINVAL)
		fd = open(path, flags);
	if (fd < 0) {
		printf("memverify: %s: cannot open %s: %s\n", mode, path, strerror(errno));
		return 2;
	}
	uint64_t *buf;
	if (posix_memalign((void **)&buf, PAGE, PAGE) != 0)
		return 2;
	uint64_t blocks = (uint64_t)mib << 8, verified = 0;
	for (uint64_t b = 0; b < blocks; b++) {
		if (write_mode) {
			stamp(buf, b, 0, seed);
			if (pwrite(fd, buf, PAGE, (off_t)(b * PAGE)) != PAGE) {
				printf("memverify: %s: write of block %llu of %s failed: %s\n", mode, (unsigned long long)b, path,
				       strerror(errno));
				return 2;
			}
		} else {
			ssize_t n = pread(fd, buf, PAGE, (off_t)(b * PAGE));
			if (n != PAGE) {
				printf("memverify: %s: read of block %llu of %s failed: %s\n", mode, (unsigned long long)b, path,
				       n < 0 ? strerror(errno) : "short read (disk too small?)");
				return 2;
			}
			verify(buf, b, 0, seed, "block");
			verified++;
		}
	}
	if (write_mode && fsync(fd) != 0) {
		printf("memverify: disk-write: fsync of %s failed: %s\n", path, strerror(errno));
		return 2;
	}
	close(fd);
	if (write_mode)
		printf("memverify: disk-write ok %s blocks %llu\n", path, (unsigned long long)blocks);
	else
		printf("memverify: disk-verify %s %s blocks %llu verified %llu failures %llu\n", failures ? "FAILED" : "ok",
		       path, (unsigned long long)blocks, (unsigned long long)verified, (unsigned long long)failures);
	return failures ? 1 : 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc >= 2 && strncmp(argv[1], "disk-", 5) == 0) {
		if (argc < 4 || argc > 5)
			usage();
		return disk(argv[1], argv[2], atol(argv[3]), argc == 5 ? strtoull(argv[4], NULL, 0) : 1);
	}
	return memory(argc, argv);
}
