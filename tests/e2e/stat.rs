//! `amsvm stat` reads a running amsvm's counters over its control socket.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

#[test]
fn stat_reads_a_running_pool_and_fails_cleanly_after_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = String::from("log_dir = \"logs\"\n[pool]\nsize_mib = 64\n");
    for i in 0..2 {
        cfg += &format!(
            "[[partition]]\nname = \"s{i}\"\nlogical_mib = 64\nweight = {}\nimage = \"workload\"\n\
             [partition.workload]\nworking_set_mib = 40\npattern = \"uniform\"\nduration_ms = 3000\n",
            100 + i
        );
    }
    let path = write_config(dir.path(), "stat.toml", &cfg);
    let sock = dir.path().join("ctl.sock");
    let mut child = amsvm().arg("run").arg(&path).arg("--socket").arg(&sock).stdout(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    let snap = loop {
        assert!(t0.elapsed() < Duration::from_secs(60), "no useful stat within 60 s");
        std::thread::sleep(Duration::from_millis(200));
        let out = amsvm().args(["stat", "--json", "--socket"]).arg(&sock).output().unwrap();
        if !out.status.success() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stat --json prints JSON");
        let paged = v["partitions"].as_array().unwrap().iter().all(|p| p["page_outs"].as_u64().unwrap() > 0);
        if paged {
            break v;
        }
    };
    assert_eq!(snap["pool"]["size_pages"].as_u64(), Some(64 * 256));
    assert!(snap["pool"]["in_use_pages"].as_u64().unwrap() <= 64 * 256);
    let parts = snap["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2);
    for (i, p) in parts.iter().enumerate() {
        assert_eq!(p["name"], format!("s{i}"));
        assert_eq!(p["logical_mib"], 64);
        assert_eq!(p["weight"], 100 + i);
        assert!(p["pmem_pages"].as_u64().unwrap() <= 64 * 256);
    }
    // The text form names the pool and every partition.
    let text = amsvm().args(["stat", "--socket"]).arg(&sock).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("pool: size 64.0 MiB") && text.contains("s0") && text.contains("s1"), "{text}");
    assert!(child.wait().unwrap().success());
    // Once amsvm is gone, stat says so and exits 2.
    let out = amsvm().args(["stat", "--socket"]).arg(&sock).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ctl.sock"), "{err}");
}
