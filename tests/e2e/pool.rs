//! The shared pool: overcommitted partitions with hypervisor paging.

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

const MIB: u64 = 1 << 20;

/// Resident bytes of every anonymous mapping of exactly `size` bytes in `pid` (the
/// guest RAM regions), from /proc/PID/smaps; with the number of such mappings.
fn guest_rss(pid: u32, size: u64) -> Option<(u64, usize)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut total = 0;
    let mut count = 0;
    let mut in_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                in_guest = b - a == size;
                count += in_guest as usize;
                continue;
            }
        }
        if in_guest && first == "Rss:" {
            total += line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024;
        }
    }
    Some((total, count))
}

/// Wait until every thread of `pid` is stopped (SIGSTOP is delivered asynchronously).
fn all_stopped(pid: u32) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
        let stopped = tasks.filter_map(|t| t.ok()).all(|t| {
            std::fs::read_to_string(t.path().join("stat"))
                .map(|st| st.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t')))
                .unwrap_or(true)
        });
        if stopped {
            return true;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    false
}

#[test]
fn four_partitions_at_2x_overcommit_verify_every_page_within_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = String::from("log_dir = \"logs\"\n[pool]\nsize_mib = 512\n");
    for i in 0..4 {
        cfg += &format!(
            "[[partition]]\nname = \"p{i}\"\nlogical_mib = 256\nimage = \"workload\"\n\
             [partition.workload]\nworking_set_mib = 200\npattern = \"hotspot\"\nhot_pct = 15\nhot_access_pct = 85\n\
             phase_accesses = 30000\nwrite_pct = 30\nduration_ms = 6000\nseed = {}\n",
            i + 1
        );
    }
    let path = write_config(dir.path(), "pool.toml", &cfg);
    let mut child = amsvm().arg("run").arg(&path).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    // Sample the guest regions' resident memory from the host side while it runs. The
    // process is stopped for each sample, so that the four regions are read at one
    // instant (a frame moving from one partition to another is never counted twice).
    let mut samples = Vec::new();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        let s = all_stopped(pid).then(|| guest_rss(pid, 256 * MIB)).flatten();
        // SAFETY: as above.
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        if let Some((rss, n)) = s {
            if n == 4 {
                samples.push(rss);
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "amsvm did not finish in 5 minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = child.wait().unwrap();
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let rows = summary(&stdout);
    assert_eq!(rows.len(), 4);
    for r in &rows {
        assert_eq!(r.outcome, "exited ok", "{stdout}");
        assert_eq!(r.failures, 0, "{stdout}");
        assert!(r.verified > 51200, "the final pass alone verifies every page: {r:?}");
        assert!(r.hpi > 0 && r.page_outs > 0, "every partition is paged out and in: {stdout}");
    }
    assert!(samples.len() >= 20, "too few host-side samples ({})", samples.len());
    let peak = *samples.iter().max().unwrap();
    assert!(peak <= 512 * MIB, "guest memory resident {} KiB, above the 512 MiB pool", peak / 1024);
    // The check could have failed: the partitions did press against the budget.
    assert!(peak >= 400 * MIB, "peak resident only {} MiB: the pool was never under pressure", peak / MIB);
}
