//! The paging-server VM (`[paging] backend = "vm"`): its restart when it dies, and
//! paging devices that belong to someone else. (Overcommit through it: `pool.rs`.)

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;


fn config(partitions: u32, logical_mib: u64, ws_mib: u64, pool_mib: u64, duration_ms: u64) -> String {
    let mut cfg = format!("log_dir = \"logs\"\n[pool]\nsize_mib = {pool_mib}\n[paging]\nbackend = \"vm\"\n");
    for i in 0..partitions {
        cfg += &format!(
            "[[partition]]\nname = \"p{i}\"\nlogical_mib = {logical_mib}\nimage = \"workload\"\n\
             [partition.workload]\nworking_set_mib = {ws_mib}\npattern = \"hotspot\"\nhot_pct = 15\nhot_access_pct = 85\n\
             phase_accesses = 20000\nwrite_pct = 30\nduration_ms = {duration_ms}\nseed = {}\nballoon = \"ignore\"\n",
            i + 1
        );
    }
    cfg
}

/// One request on the control socket; the parsed answer.
fn control(sock: &std::path::Path, line: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap()
}

#[test]
fn a_paging_server_killed_in_the_middle_of_paging_is_restarted_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "kill.toml", &config(2, 128, 100, 128, 60_000));
    let sock = dir.path().join("ctl.sock");
    let child = amsvm().arg("run").arg(&path).arg("--socket").arg(&sock).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let stat = || control(&sock, "{\"cmd\":\"stat\"}\n");
    let t0 = Instant::now();
    let mut kills = 0;
    let mut last_hpi = 0;
    while kills < 3 {
        assert!(t0.elapsed() < Duration::from_secs(120), "could not kill the paging server 3 times in 2 minutes");
        std::thread::sleep(Duration::from_millis(300));
        let Ok(s) = std::panic::catch_unwind(stat) else { continue };
        let hpi: u64 = s["stat"]["partitions"].as_array().map_or(0, |a| a.iter().map(|p| p["hpi"].as_u64().unwrap_or(0)).sum());
        // Kill it while paging is under way: page-ins moved since the last kill.
        if hpi > last_hpi + 200 {
            let r = control(&sock, "{\"cmd\":\"kill-paging-server\"}\n");
            assert_eq!(r["ok"], true, "{r}");
            kills += 1;
            last_hpi = hpi;
        }
    }
    // It comes back and the partitions go on paging.
    let t1 = Instant::now();
    loop {
        let s = stat();
        let ps = &s["stat"]["paging_server"];
        if ps["starts"].as_u64().unwrap_or(0) >= 4 && ps["completions"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(t1.elapsed() < Duration::from_secs(30), "the paging server did not come back: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Stop early (SIGINT: every partition ends cleanly); nothing verified was wrong.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = text(&out);
    let rows = summary(&stdout);
    assert_eq!(rows.len(), 2, "{stdout}\n{stderr}");
    for r in &rows {
        assert_eq!(r.failures, 0, "{stdout}\n{stderr}");
        assert!(r.hpi > 0, "{stdout}");
        assert_eq!(r.outcome, "stopped", "{stdout}\n{stderr}");
    }
}

#[test]
fn a_paging_device_of_another_partition_is_refused_with_both_names() {
    let dir = tempfile::tempdir().unwrap();
    let paging = dir.path().join("paging");
    std::fs::create_dir_all(&paging).unwrap();
    // p1's paging device carries p0's header.
    let h = paging_server::format::Header::new(0, "p0", 128 * 256);
    let f = std::fs::File::create(paging.join("p1.pgdev")).unwrap();
    f.set_len(h.layout.device_bytes).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &h.encode(), 0).unwrap();
    let path = write_config(dir.path(), "bad.toml", &config(2, 128, 16, 256, 1000));
    let out = run_config(&path);
    let (stdout, stderr) = text(&out);
    assert_ne!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("p1.pgdev belongs to partition \"p0\" (id 0), not to partition \"p1\" (id 1)"),
        "the error names the device and both partitions: {stderr}"
    );
    // And a device that is not a paging device at all.
    std::fs::write(paging.join("p1.pgdev"), vec![0x5a; 8192]).unwrap();
    let out = run_config(&path);
    let (_, stderr) = text(&out);
    assert!(stderr.contains("p1.pgdev: not a paging device of partition \"p1\""), "{stderr}");
}
