//! Overcommit with Linux guests: two partitions of 256 MiB in a 320 MiB pool each run
//! memverify over 120 MiB (more than half of what a guest has free after booting; with what
//! the guest kernel itself touches, about 200 MiB each):
//! every page verifies, both partitions are paged (hpi > 0), and the guest memory
//! resident on the host never exceeds the pool, sampled from L1 (the host side of amsvm)
//! with amsvm stopped for each sample, as tests/e2e's `run_sampled` does.
//!
//! The balloons are left alone (`loan_policy = "off"`) so that the pool has to page.
//! memverify stamps every page, verifies and restamps every page in a random order, then
//! verifies every page again in a random order: a sequential sweep over more memory than
//! a partition's share misses on every page, which would only make the run longer.

use std::time::Duration;

use crate::boot::summary_row;
use crate::harness::*;

const POOL_MIB: u64 = 320;
const VERIFY_MIB: u64 = 120;

#[test]
fn two_linux_guests_overcommit_a_pool_and_every_page_verifies() {
    let mut toml = format!("log_dir = \"/tmp/logs\"\n[pool]\nsize_mib = {POOL_MIB}\npaging_dir = \"/tmp/paging\"\n");
    for (name, seed) in [("a", 11), ("b", 22)] {
        let cmdline = l2_cmdline(&format!("memverify -m {VERIFY_MIB} -p 1 -R -s {seed}"));
        toml += &format!(
            "[[partition]]\nname = \"{name}\"\nlogical_mib = 256\nvcpus = 1\nloan_policy = \"off\"\nkernel = \"/l2/vmlinuz\"\n\
             initrd = \"/l2/initramfs.cpio.gz\"\ncmdline = '''{cmdline}'''\nconsole_stdout = true\n"
        );
    }
    // Every second: SIGSTOP amsvm, wait until all its threads are stopped, sum Rss of the
    // two 256 MiB guest RAM mappings from smaps, SIGCONT. busybox timeout execs amsvm in
    // its own process, so $! is amsvm's pid.
    let script = r#"
say "amsvm start overcommit"
timeout 110 amsvm run /scenario/overcommit.toml --socket $SOCK &
pid=$!
state() { awk '{ sub(/^.*\) /, ""); print $1 }' /proc/$pid/stat 2>/dev/null; }
max=0; n=0; tries=0
while st=$(state) && [ -n "$st" ] && [ "$st" != Z ]; do
    kill -STOP $pid 2>/dev/null || break
    j=0
    while [ $j -lt 200 ] && awk '{ sub(/^.*\) /, ""); if ($1 != "T" && $1 != "t") bad = 1 } END { exit !bad }' /proc/$pid/task/*/stat 2>/dev/null; do
        j=$((j + 1))
    done
    s=$(awk '/^Size:/ { g = ($2 == 262144) } g && /^Rss:/ { r += $2; c++ } END { print r + 0, c + 0 }' /proc/$pid/smaps 2>/dev/null)
    kill -CONT $pid 2>/dev/null
    set -- $s
    tries=$((tries + 1))
    if [ "${2:-0}" = 2 ]; then
        n=$((n + 1))
        [ "$1" -gt $max ] && max=$1
    fi
    sleep 1
done
wait $pid
st=$?
say "resident max $max KiB samples $n of $tries"
say "amsvm run exit status $st"
"#
    .to_string();
    let run = run(Scenario {
        name: "overcommit",
        script,
        files: vec![File::text("overcommit.toml", &toml)],
        timeout: Duration::from_secs(120),
    });
    run.check_l1().unwrap_or_else(|e| panic!("{e}"));
    let fail = |why: &str| -> ! { panic!("{}", run.failure(why)) };
    let pages = VERIFY_MIB * 256;
    for name in ["a", "b"] {
        let g: Vec<&str> = run.guest(name).map(|(_, t)| t).collect();
        if let Some(l) = g.iter().find(|l| l.contains("memverify: FAIL")) {
            fail(&format!("partition {name}: memverify found a page with the wrong content: {l}"));
        }
        let ok = format!("memverify: ok mib {VERIFY_MIB} pages {pages} passes 2 verified {} failures 0", 2 * pages);
        if !g.iter().any(|l| l.starts_with(&ok)) {
            fail(&format!("partition {name}: no \"{ok}\" summary from memverify"));
        }
        let row = summary_row(&run, name).unwrap_or_else(|| fail(&format!("amsvm printed no summary row for {name}")));
        let f: Vec<&str> = row.split_whitespace().collect();
        let hpi: u64 = f.get(8).and_then(|v| v.parse().ok()).unwrap_or(0);
        let page_outs: u64 = f.get(10).and_then(|v| v.parse().ok()).unwrap_or(0);
        if hpi == 0 || page_outs == 0 || !row.ends_with("powered off") {
            fail(&format!("partition {name}: want hpi > 0, page-outs > 0 and \"powered off\": {row}"));
        }
        report(&format!("[nested overcommit] {name}: hpi {hpi}, page-outs {page_outs}"));
    }
    let res = run.l1_value("resident max").unwrap_or_else(|| fail("L1 printed no resident maximum"));
    let f: Vec<u64> = res.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    let (max_kib, samples) = (f[0], f[1]);
    if samples < 10 {
        fail(&format!("only {samples} host-side samples of the guests' resident memory"));
    }
    if max_kib > POOL_MIB * 1024 {
        fail(&format!("guest memory resident on the host reached {max_kib} KiB, above the {POOL_MIB} MiB pool"));
    }
    if run.l1_value("amsvm run exit status") != Some("0") {
        fail("amsvm run did not exit with status 0");
    }
    report(&format!("[nested overcommit] resident at most {max_kib} KiB of the {} KiB pool ({samples} samples)", POOL_MIB * 1024));
    let mut phases = run.l1_phases();
    phases.push(("amsvm start", run.at("amsvm-l1: amsvm start overcommit")));
    phases.push(("L2 /init (both)", run.all("amsvm-guest: kernel").nth(1).map(|l| l.t)));
    phases.push(("stamped (both)", run.all("memverify: pass 0 stamped").nth(1).map(|l| l.t)));
    phases.push(("verified (both)", run.all("memverify: ok").nth(1).map(|l| l.t)));
    phases.push(("amsvm exit", run.at("amsvm-l1: amsvm run exit status")));
    run.timings(&phases);
}
