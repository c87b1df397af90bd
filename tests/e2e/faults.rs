//! The fault campaign's short variant (`amsvm faults --short`), and destroying and
//! resuming partitions through the control socket.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

/// One row of the campaign's table.
#[derive(Debug)]
struct FaultRow {
    fault: String,
    backend: String,
    injected: u64,
    survived: u64,
    failures: u64,
    paused: u64,
    resumed: u64,
}

fn fault_table(stdout: &str) -> Vec<FaultRow> {
    let mut lines = stdout.lines().skip_while(|l| !l.starts_with("fault "));
    let header = lines.next().expect("no fault table in the output");
    assert!(header.contains("injected") && header.contains("survived"), "{header}");
    lines
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            // The fault's name has spaces; the columns after it are split by whitespace.
            let (fault, rest) = l.split_at(36);
            let f: Vec<&str> = rest.split_whitespace().collect();
            let n = |i: usize| f[i].parse::<u64>().unwrap_or_else(|_| panic!("bad number in fault row: {l}"));
            FaultRow {
                fault: fault.trim().to_string(),
                backend: f[0].to_string(),
                injected: n(2),
                survived: n(3),
                failures: n(5),
                paused: n(6),
                resumed: n(7),
            }
        })
        .collect()
}

#[test]
fn short_fault_campaign_survives_every_fault_with_nothing_lost() {
    let out = amsvm().args(["faults", "--short"]).output().unwrap();
    let (stdout, stderr) = text(&out);
    let ctx = format!("stdout:\n{stdout}\nstderr (last 4 KiB):\n{}", &stderr[stderr.len().saturating_sub(4096)..]);
    assert_eq!(out.status.code(), Some(0), "{ctx}");
    let rows = fault_table(&stdout);
    let want = [
        ("paging-server VM killed", "vm"),
        ("paging device I/O error", "vm"),
        ("paging device full", "vm"),
        ("partition destroyed in its page-in", "vm"),
        ("balloon driver silent", "vm"),
        ("control socket flood", "local"),
    ];
    assert_eq!(rows.len(), want.len(), "{ctx}");
    for (r, (fault, backend)) in rows.iter().zip(want) {
        assert_eq!((r.fault.as_str(), r.backend.as_str()), (fault, backend), "{ctx}");
        assert!(r.injected > 0, "{fault}: nothing injected\n{ctx}");
        assert_eq!(r.survived, r.injected, "{fault}\n{ctx}");
        assert_eq!(r.failures, 0, "{fault}\n{ctx}");
        assert_eq!(r.paused, r.resumed, "{fault}: a pause was never resumed\n{ctx}");
    }
    assert_eq!(rows[0].injected, 6, "the short campaign kills the paging server 6 times\n{ctx}");
    assert!(rows[2].paused > 0, "a full paging device paused a partition\n{ctx}");
    assert!(stdout.contains("every injected fault survived, 0 verification failures"), "{ctx}");
}

#[test]
fn destroy_ends_one_partition_and_resume_names_why_it_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = "log_dir = \"logs\"\n[pool]\nsize_mib = 96\n\
         [[partition]]\nname = \"keep\"\nlogical_mib = 64\nimage = \"workload\"\n\
         [partition.workload]\nworking_set_mib = 40\npattern = \"uniform\"\nwrite_pct = 30\nduration_ms = 6000\nballoon = \"ignore\"\n\
         [[partition]]\nname = \"gone\"\nlogical_mib = 64\nimage = \"workload\"\n\
         [partition.workload]\nworking_set_mib = 40\npattern = \"uniform\"\nwrite_pct = 30\nduration_ms = 60000\nballoon = \"ignore\"\n";
    let path = write_config(dir.path(), "destroy.toml", cfg);
    let sock = dir.path().join("ctl.sock");
    let child = amsvm().arg("run").arg(&path).arg("--socket").arg(&sock).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(30), "no control socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let ctl = |args: &[&str]| amsvm().args(args).arg("--socket").arg(&sock).output().unwrap();
    let r = ctl(&["resume", "keep"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(text(&r).1.contains("cannot resume partition \"keep\": it is not paused"), "{}", text(&r).1);
    let r = ctl(&["destroy", "nobody"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(text(&r).1.contains("no partition named \"nobody\" (partitions: keep, gone)"), "{}", text(&r).1);
    let r = ctl(&["destroy", "gone"]);
    assert_eq!(r.status.code(), Some(0), "{}", text(&r).1);
    // The destroyed partition's 60 s workload does not hold the run up.
    let out = child.wait_with_output().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(40), "the destroyed partition kept running");
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "a destroyed partition did not end well\n{stdout}\n{stderr}");
    let rows = summary(&stdout);
    let keep = rows.iter().find(|r| r.name == "keep").unwrap();
    let gone = rows.iter().find(|r| r.name == "gone").unwrap();
    assert_eq!((keep.outcome.as_str(), keep.failures), ("exited ok", 0), "{stdout}");
    assert_eq!((gone.outcome.as_str(), gone.failures), ("destroyed on request", 0), "{stdout}");
}
