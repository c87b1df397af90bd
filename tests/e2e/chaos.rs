//! A hostile workload partition (`chaos = true`, guest-images/workload/src/chaos.rs) next
//! to a well-behaved one in the same amsvm: amsvm rejects and counts what the hostile
//! guest sends, answers every malformed request without harm, both partitions finish
//! with every page and block verified, and nothing reaches the host disk file outside
//! the blocks the guest wrote legitimately. In a pool the hostile guest also attacks its
//! virtio-balloon device; every malformed balloon request is counted exactly once, the
//! device still works afterwards and the neighbour in the same pool is unaffected.

use std::io::Read;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Hostile requests of chaos mode that amsvm counts (at least once each) in the
/// summary's `rejected` column, by kind, as chaos.rs sends them to this configuration
/// (one virtio-blk device, 64 MiB of RAM).
///
/// Port I/O to unclaimed ports: 2 ports x 3 widths x read/write, and a read of the
/// write-only hypercall port (`unknown_io`).
const PORT_IO: u64 = 2 * 3 * 2 + 1;
/// MMIO: 4 widths x read/write at 0xca000000, at the free virtio-mmio slot 15 and at the
/// first byte after RAM (`unknown_mmio`).
const MMIO: u64 = 3 * 4 * 2;
/// An unknown hypercall number and EXIT written with 8- and 16-bit accesses
/// (`bad_hypercalls`).
const HYPERCALLS: u64 = 3;
/// virtio-mmio registers out of protocol order or of the wrong width, unoffered
/// features, notifications of queues that do not exist (`bad_accesses`,
/// `feature_rejections`, `bad_notifications`).
const REGISTERS: u64 = 20;
/// Two refused activations (`activation_failures`) and a queue register write after
/// DRIVER_OK (`bad_accesses`).
const ACTIVATIONS: u64 = 3;
/// 15 malformed descriptor chains (`rejected_chains`) and a driver-ring entry naming a
/// descriptor beyond the queue (`invalid_heads`).
const CHAINS: u64 = 16;
/// Sent but not in `rejected`: a well-formed request of an unknown type (answered
/// UNSUPP) and a driver-ring index jump (a device error: the device asks for a reset).
const NOT_COUNTED: u64 = 2;
/// Balloon page frame numbers refused, one per request: 2 beyond RAM
/// (`rejected_out_of_range`), 2 inflated twice (`rejected_duplicate`), 3 deflated but not
/// in the balloon (`rejected_not_inflated`).
const BALLOON_PAGES: u64 = 2 + 2 + 3;
/// Malformed balloon chains (`rejected_chains`): 10 on inflateq, 2 on deflateq, 2 on
/// statsq, 4 on reporting_vq.
const BALLOON_CHAINS: u64 = 10 + 2 + 2 + 4;
/// A balloon driver-ring entry naming a descriptor beyond the queue (`invalid_heads`).
const BALLOON_HEADS: u64 = 1;
/// Sent to the balloon but not in `rejected`: a driver-ring index jump (a device error:
/// the device asks for a reset).
const BALLOON_NOT_COUNTED: u64 = 1;
/// Blocks chaos mode writes and verifies after its hostile requests.
const CHECK_BLOCKS: u64 = 8;
const DISK_TEST_BLOCKS: u64 = 64;
const DISK_MIB: usize = 4;

/// Runs amsvm on `path`, killing it if it has not finished after `limit`.
fn run_with_limit(path: &std::path::Path, limit: Duration) -> Output {
    let mut child = amsvm()
        .arg("run")
        .arg(path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start amsvm");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = r.read_to_end(&mut b);
            b
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = String::from_utf8_lossy(&err.join().unwrap()).into_owned();
            panic!("amsvm did not finish within {limit:?} (hostile guest hung it?)\nstderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

#[test]
fn hostile_guest_is_rejected_and_counted_and_harms_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "log_dir = \"logs\"\n\
         [[partition]]\nname = \"hostile\"\nlogical_mib = 64\nimage = \"workload\"\n\
         [partition.workload]\nworking_set_mib = 4\npasses = 1\ndisk_test_blocks = {DISK_TEST_BLOCKS}\nchaos = true\n\
         [[partition.disk]]\npath = \"disk.img\"\ncreate_mib = {DISK_MIB}\n\
         [[partition]]\nname = \"calm\"\nlogical_mib = 64\nimage = \"workload\"\n\
         [partition.workload]\nworking_set_mib = 8\npasses = 2\n"
    );
    let path = write_config(dir.path(), "chaos.toml", &cfg);
    let out = run_with_limit(&path, Duration::from_secs(120));
    let (stdout, stderr) = text(&out);
    let log = std::fs::read_to_string(dir.path().join("logs/hostile.log")).unwrap_or_default();
    let ctx = format!("stdout:\n{stdout}\nstderr:\n{stderr}\nhostile.log:\n{log}");
    assert_eq!(out.status.code(), Some(0), "{ctx}");
    let rows = summary(&stdout);
    assert_eq!(rows.len(), 2, "{ctx}");
    let (hostile, calm) = (&rows[0], &rows[1]);

    // The hostile partition survived its own requests and still did its work.
    assert_eq!(hostile.outcome, "exited ok", "{ctx}");
    assert_eq!(hostile.failures, 0, "{ctx}");
    assert_eq!(hostile.touched, 2 * 1024, "{ctx}");
    assert_eq!(hostile.disk_ok, DISK_TEST_BLOCKS + CHECK_BLOCKS, "{ctx}");
    assert_eq!(hostile.disk_bad, 0, "{ctx}");
    let counted = PORT_IO + MMIO + HYPERCALLS + REGISTERS + ACTIVATIONS + CHAINS;
    assert!(hostile.rejected >= counted, "rejected {} < {counted} hostile requests amsvm counts\n{ctx}", hostile.rejected);
    assert!(
        log.contains(&format!("chaos: {} hostile requests sent", counted + NOT_COUNTED)),
        "the guest sent a different set of requests than this test counts\n{ctx}"
    );
    // What amsvm answered, case by case.
    for (case, answer) in [
        ("unclaimed ports", "done"),
        ("unclaimed MMIO 0xca000000", "done"),
        ("unclaimed MMIO 0xd000f000", "done"),
        ("unclaimed MMIO 0x4000000", "done"),
        ("bad hypercalls", "CLOCK still works"),
        ("20 out-of-protocol register accesses", "unoffered features refused"),
        ("queue size 3", "(needs reset)"),
        ("descriptor table after RAM", "(needs reset)"),
        ("header outside RAM", "status 1, used len 1"),
        ("read across the end of RAM", "status 1, used len 1"),
        ("read into the device window", "status 1, used len 1"),
        ("header device-writable", "status 1, used len 1"),
        ("write from device-writable data", "status 1, used len 1"),
        ("read into device-readable data", "status 1, used len 1"),
        ("write at the capacity", "status 1, used len 1"),
        ("write across the end of the disk", "status 1, used len 1"),
        ("sector overflow", "status 1, used len 1"),
        ("write of 100 bytes", "status 1, used len 1"),
        ("no status descriptor", "no status, used len 0"),
        ("chain looping on itself", "no status, used len 0"),
        ("next beyond the queue", "no status, used len 0"),
        ("indirect table outside RAM", "no status, used len 0"),
        ("head beyond the queue", "no completion"),
        ("unknown request type", "status 2, used len 1"),
        ("ring index jump", "device needs reset"),
        ("disk works", "8 blocks verified, 0 failed"),
    ] {
        let prefix = format!("chaos: {case}:");
        let line = log.lines().find(|l| l.starts_with(&prefix));
        assert!(line.is_some_and(|l| l.contains(answer)), "want \"{prefix} ... {answer}\", got {line:?}\n{ctx}");
    }

    // The partition next to it is unaffected: every access verified or written, the
    // final pass included, and nothing of its own rejected.
    assert_eq!(calm.outcome, "exited ok", "{ctx}");
    assert_eq!(calm.failures, 0, "{ctx}");
    assert_eq!(calm.touched, 3 * 2048, "{ctx}");
    assert_eq!(calm.verified + calm.written, calm.touched, "{ctx}");
    assert!(calm.verified >= 2048, "{ctx}");
    assert_eq!(calm.rejected, 0, "{ctx}");

    // Nothing the malformed requests carried reached the disk file: it kept its size,
    // and everything after the blocks the guest wrote legitimately is still zero.
    let img = std::fs::read(dir.path().join("disk.img")).unwrap();
    assert_eq!(img.len(), DISK_MIB << 20);
    let legit = (DISK_TEST_BLOCKS.max(CHECK_BLOCKS) * 4096) as usize;
    if let Some(i) = img[legit..].iter().position(|&b| b != 0) {
        panic!("disk byte {:#x} (block {}) is {:#x}, beyond the legitimately written blocks", legit + i, (legit + i) / 4096, img[legit + i]);
    }
}

#[test]
fn hostile_guest_in_a_pool_attacks_its_balloon_and_every_bad_request_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    // No pressure: 256 MiB hold both partitions, so no loan is asked for and the only
    // page ever in the hostile partition's balloon is chaos mode's scratch page.
    let cfg = "log_dir = \"logs\"\n[pool]\nsize_mib = 256\n\
         [[partition]]\nname = \"hostile\"\nlogical_mib = 64\nimage = \"workload\"\n\
         [partition.workload]\nworking_set_mib = 4\nidle_mib = 4\npasses = 1\nchaos = true\nballoon = \"cooperate\"\n\
         [[partition]]\nname = \"calm\"\nlogical_mib = 64\nimage = \"workload\"\n\
         [partition.workload]\nworking_set_mib = 8\npasses = 2\nballoon = \"cooperate\"\n";
    let path = write_config(dir.path(), "chaos-pool.toml", cfg);
    let out = run_with_limit(&path, Duration::from_secs(120));
    let (stdout, stderr) = text(&out);
    let log = std::fs::read_to_string(dir.path().join("logs/hostile.log")).unwrap_or_default();
    let calm_log = std::fs::read_to_string(dir.path().join("logs/calm.log")).unwrap_or_default();
    let ctx = format!("stdout:\n{stdout}\nstderr:\n{stderr}\nhostile.log:\n{log}\ncalm.log:\n{calm_log}");
    assert_eq!(out.status.code(), Some(0), "{ctx}");
    let rows = summary(&stdout);
    assert_eq!(rows.len(), 2, "{ctx}");
    let (hostile, calm) = (&rows[0], &rows[1]);

    // The hostile partition survived its own requests and then did all its work: the
    // working set twice (one pass and the final pass), its 1024 idle pages stamped and
    // verified at the end, with its balloon driver running on the device it attacked.
    assert_eq!(hostile.outcome, "exited ok", "{ctx}");
    assert_eq!(hostile.failures, 0, "{ctx}");
    assert_eq!(hostile.touched, 2 * 1024 + 2 * 1024, "{ctx}");
    assert_eq!(hostile.verified + hostile.written, hostile.touched, "{ctx}");
    assert_eq!((hostile.disk_ok, hostile.disk_bad), (0, 0), "{ctx}");
    // Exactly what it sent, each counted once: no virtio-blk device here, so ports,
    // MMIO, hypercalls and the balloon.
    let counted = PORT_IO + MMIO + HYPERCALLS + BALLOON_PAGES + BALLOON_CHAINS + BALLOON_HEADS;
    assert_eq!(hostile.rejected, counted, "rejected {} != {counted} hostile requests amsvm counts\n{ctx}", hostile.rejected);
    assert!(
        log.contains(&format!("chaos: {} hostile requests sent (no virtio-blk device)", counted + BALLOON_NOT_COUNTED)),
        "the guest sent a different set of requests than this test counts\n{ctx}"
    );
    // The valid halves of the page-number cases were taken: one page in the balloon at
    // a time, and nothing else ever.
    assert_eq!(hostile.peak_loan, 1, "{ctx}");
    // What amsvm answered, case by case: every malformed chain is given back (length 0)
    // except the one whose head does not exist; the index jump makes the device ask
    // for a reset.
    let mut cases: Vec<(&str, &str)> = [
        "inflate of the first page after RAM",
        "inflate of page 0xffffffff",
        "inflate of one page twice in one buffer",
        "inflate of a page in the balloon",
        "deflate of that page (valid)",
        "deflate of a page deflated already",
        "deflate of a page never inflated",
        "deflate of page 0xffffffff",
        "inflate buffer device-writable",
        "inflate buffer of 7 bytes",
        "inflate buffer across the end of RAM",
        "inflate buffer outside RAM",
        "inflate buffer of 0xfffffffc bytes",
        "inflate chain readable then writable",
        "inflate chain looping on itself",
        "inflate chain with next beyond the queue",
        "inflate indirect table outside RAM",
        "inflate of 65537 page numbers",
        "deflate buffer device-writable",
        "deflate buffer of 2 bytes",
        "statistics buffer of 11 bytes",
        "statistics buffer device-writable",
        "report at an unaligned address",
        "report device-readable",
        "report of 100 bytes",
        "report beyond RAM",
    ]
    .into_iter()
    .map(|c| (c, "used len 0"))
    .collect();
    assert_eq!(cases.len() as u64, BALLOON_PAGES + BALLOON_CHAINS + 1, "one case per request, and the valid deflate");
    cases.extend([
        ("head beyond the queue", "no completion"),
        ("ring index jump", "device needs reset"),
        // The page inflated (twice) and deflated came back as a fresh zero page.
        ("scratch page after deflate", "reads zero"),
        ("works", "came back zero"),
    ]);
    for (case, answer) in cases {
        let prefix = format!("chaos: balloon {case}:");
        let line = log.lines().find(|l| l.starts_with(&prefix));
        assert!(line.is_some_and(|l| l.contains(answer)), "want \"{prefix} ... {answer}\", got {line:?}\n{ctx}");
    }
    // The balloon driver took the device over after chaos mode and ran without error.
    let driver = log.lines().find(|l| l.starts_with("balloon: inflated"));
    assert!(driver.is_some_and(|l| !l.contains("device error")), "balloon driver line: {driver:?}\n{ctx}");
    assert!(!log.contains("driver stopped"), "{ctx}");

    // The partition next to it in the same pool is unaffected: every access verified
    // or written, the final pass included, and nothing of its own rejected.
    assert_eq!(calm.outcome, "exited ok", "{ctx}");
    assert_eq!(calm.failures, 0, "{ctx}");
    assert_eq!(calm.touched, 3 * 2048, "{ctx}");
    assert_eq!(calm.verified + calm.written, calm.touched, "{ctx}");
    assert!(calm.verified >= 2048, "{ctx}");
    assert_eq!(calm.rejected, 0, "{ctx}");
    assert_eq!(calm.peak_loan, 0, "{ctx}");
    assert!(calm_log.lines().any(|l| l.starts_with("balloon: inflated") && !l.contains("device error")), "{ctx}");
}
