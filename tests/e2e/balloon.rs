//! Cooperative memory loaning: the pool reclaims through virtio-balloon before it pages,
//! and falls back to hypervisor paging for a partition whose driver does not cooperate.

use crate::common::*;

const MIB: u64 = 1 << 20;

/// Three partitions of 128 MiB, each with a working set of `ws_mib` and `idle_mib` of
/// idle memory (stamped at start, then left alone), in a pool of `pool_mib`; about 4.5 MiB
/// more per partition are image and bookkeeping. `modes[i]` is partition i's balloon mode.
fn config(pool_mib: u64, ws_mib: u64, idle_mib: u64, modes: [&str; 3]) -> String {
    let mut cfg = format!("log_dir = \"logs\"\n[pool]\nsize_mib = {pool_mib}\n");
    for (i, mode) in modes.iter().enumerate() {
        cfg += &format!(
            "[[partition]]\nname = \"p{i}\"\nlogical_mib = 128\nimage = \"workload\"\n\
             [partition.workload]\nworking_set_mib = {ws_mib}\nidle_mib = {idle_mib}\npattern = \"uniform\"\nwrite_pct = 30\n\
             duration_ms = 4000\nseed = {}\nballoon = \"{mode}\"\n",
            i + 1
        );
    }
    cfg
}

fn run(pool_mib: u64, ws_mib: u64, idle_mib: u64, modes: [&str; 3]) -> (Vec<Row>, String, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "loan.toml", &config(pool_mib, ws_mib, idle_mib, modes));
    let (status, stdout, stderr, samples) = run_sampled(&path, 128 * MIB, 3);
    assert_eq!(status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let rows = summary(&stdout);
    assert_eq!(rows.len(), 3, "{stdout}");
    for r in &rows {
        assert_eq!(r.outcome, "exited ok", "{stdout}");
        assert_eq!(r.failures, 0, "{stdout}");
        assert!(r.verified > ws_mib * 256, "the final pass alone verifies the whole working set: {r:?}");
    }
    assert!(samples.len() >= 10, "too few host-side samples ({})", samples.len());
    let peak = *samples.iter().max().unwrap();
    assert!(peak <= pool_mib * MIB, "guest memory resident {} KiB, above the {pool_mib} MiB pool", peak / 1024);
    (rows, stdout, samples)
}

#[test]
fn the_pool_reclaims_by_loaning_before_it_pages() {
    // 3 x (32 + 56 + 4.5) MiB in 200 MiB: the idle memory is stamped before the balloons
    // start and fits; then the working sets press, about 80 MiB short — less than the
    // 168 MiB of idle memory.
    let (rows, stdout, _) = run(200, 32, 56, ["cooperate"; 3]);
    let loaned: u64 = rows.iter().map(|r| r.peak_loan).sum();
    let hpi: u64 = rows.iter().map(|r| r.hpi).sum();
    // The idle memory alone (3 x 60 MiB with bookkeeping) takes the pool below its low
    // watermark (1/8 free), so loaning starts as soon as the balloons do; how far the
    // working sets press after that depends on how fast the guests run. Whatever the
    // pressure, what came back came back through the balloons, not by paging.
    let paged: u64 = rows.iter().map(|r| r.page_outs).sum();
    assert!(loaned >= 20 * 256, "loans reached only {} MiB:\n{stdout}", loaned / 256);
    assert!(paged * 4 < loaned, "{paged} pages were paged out, {loaned} loaned:\n{stdout}");
    for r in &rows {
        assert!(r.peak_loan > 0, "every cooperating partition loaned: {r:?}\n{stdout}");
    }
    // Near zero: the working sets stayed resident; at most a few pages taken before the
    // balloons caught up were read back.
    assert!(hpi < 256, "hypervisor page-ins {hpi} (loaning should have made paging unneeded):\n{stdout}");
}

#[test]
fn a_partition_that_ignores_its_balloon_is_paged_instead() {
    // 3 x (40 + 40 + 4.5) MiB in 140 MiB: the idle memory fits; then the working sets
    // press, about 115 MiB short — more than the two cooperating partitions' 80 MiB of
    // idle memory. The rest must be paged, from the partition that keeps more than its
    // share because it does not loan.
    let (rows, stdout, _) = run(140, 40, 40, ["cooperate", "cooperate", "ignore"]);
    let (coop, deaf) = (&rows[..2], &rows[2]);
    assert_eq!(deaf.peak_loan, 0, "{stdout}");
    assert!(deaf.page_outs > 0 && deaf.hpi > 0, "the pool pages the partition that does not loan: {stdout}");
    for r in coop {
        assert!(r.peak_loan > 0, "{stdout}");
        assert!(r.page_outs < deaf.page_outs, "paging fell on the cooperating partition {}: {stdout}", r.name);
    }
    // The few pages the cooperating partitions read back were taken before their loans
    // arrived; the page-ins are the non-cooperating partition's.
    let coop_hpi: u64 = coop.iter().map(|r| r.hpi).sum();
    assert!(coop_hpi * 2 < deaf.hpi, "cooperating partitions paged in {coop_hpi}, the other {}: {stdout}", deaf.hpi);
}

/// `amsvm loan` holds a target; the guest's balloon follows it; `0` gives it back.
#[test]
fn an_operator_target_is_followed_and_given_back() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    // A roomy pool: the loaning policy itself would never ask for anything.
    let cfg = "log_dir = \"logs\"\n[pool]\nsize_mib = 512\n[[partition]]\nname = \"p0\"\nlogical_mib = 128\n\
               image = \"workload\"\n[partition.workload]\nworking_set_mib = 16\nidle_mib = 48\npattern = \"uniform\"\n\
               duration_ms = 15000\nballoon = \"cooperate\"\n";
    let path = write_config(dir.path(), "loan.toml", cfg);
    let sock = dir.path().join("ctl.sock");
    let child = amsvm().arg("run").arg(&path).arg("--socket").arg(&sock).stdout(Stdio::piped()).spawn().unwrap();
    let stat = || -> Option<serde_json::Value> {
        let out = amsvm().args(["stat", "--json", "--socket"]).arg(&sock).output().unwrap();
        out.status.success().then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["partitions"][0].clone())
    };
    let wait_for = |what: &str, ok: &dyn Fn(&serde_json::Value) -> bool| -> serde_json::Value {
        let t0 = Instant::now();
        loop {
            if let Some(p) = stat().filter(|p| ok(p)) {
                return p;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "{what}: not within 30 s (last: {:?})", stat());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for("the balloon driver starts", &|p| p["balloon"]["active"] == true && p["pages_verified"].as_u64() > Some(0));
    let pmem_before = stat().unwrap()["pmem_pages"].as_u64().unwrap();
    // Bad requests are refused with a message naming the problem.
    let out = amsvm().args(["loan", "nobody", "8", "--socket"]).arg(&sock).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no partition named \"nobody\""));
    let out = amsvm().args(["loan", "p0", "4096", "--socket"]).arg(&sock).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("min_mib"));
    // Loan 40 MiB: the idle pages go, the pool gets their frames back.
    assert!(amsvm().args(["loan", "p0", "40", "--socket"]).arg(&sock).status().unwrap().success());
    // The driver writes `actual` after the device has taken each inflate buffer, so the
    // pool may count the whole loan a moment before `actual` says so.
    let p = wait_for("a loan of 40 MiB, reported by the driver", &|p| {
        p["loan_pages"].as_u64() == Some(40 * 256) && p["balloon"]["actual"].as_u64() == Some(40 * 256)
    });
    assert_eq!(p["loan_target_pages"].as_u64(), Some(40 * 256));
    let pmem_loaned = p["pmem_pages"].as_u64().unwrap();
    assert!(pmem_loaned + 30 * 256 <= pmem_before, "resident {pmem_before} -> {pmem_loaned} pages: the loaned frames went back");
    // Give it back.
    assert!(amsvm().args(["loan", "p0", "0", "--socket"]).arg(&sock).status().unwrap().success());
    wait_for("the loan given back", &|p| p["loan_pages"].as_u64() == Some(0));
    assert!(amsvm().args(["loan", "p0", "auto", "--socket"]).arg(&sock).status().unwrap().success());
    // The final pass verifies every page: the idle pages never loaned still hold their
    // stamps, those loaned and given back read as zeros.
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let rows = summary(&stdout);
    assert_eq!(rows[0].failures, 0, "{stdout}");
    assert!(rows[0].verified >= (16 + 48) * 256, "{stdout}");
    assert!(rows[0].peak_loan >= 40 * 256, "{stdout}");
}
