//! `amsvm stat [--socket PATH] [--json]`: the counters of a running amsvm, read from
//! its control socket. Text in the spirit of AIX `lparstat -m` and `vmstat -h`: a pool
//! line, then one row per partition.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;

use crate::control::{self, Snapshot};

use super::EXIT_BAD_INPUT;

#[derive(Args, Debug)]
pub struct StatArgs {
    /// The control socket of the amsvm to ask (default: the only one running, found in
    /// $XDG_RUNTIME_DIR/amsvm or /tmp/amsvm-<uid>).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Print the snapshot as one line of JSON.
    #[arg(long)]
    json: bool,
}

/// Exit status: 0 with the counters printed; 2 with a one-line error when no instance
/// is found or it cannot be asked.
pub fn stat(a: StatArgs) -> i32 {
    stat_to(a, &mut std::io::stdout().lock())
}

fn stat_to(a: StatArgs, out: &mut dyn std::io::Write) -> i32 {
    let snapshot = a.socket.map_or_else(|| control::discover(&control::runtime_dir()), Ok).and_then(|p| control::request_stat(&p));
    let s = match snapshot {
        Ok(s) => s,
        Err(e) => {
            eprintln!("amsvm: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    let text = if a.json {
        match serde_json::to_string(&s) {
            Ok(j) => j + "\n",
            Err(e) => {
                eprintln!("amsvm: cannot print the snapshot as JSON: {e}");
                return EXIT_BAD_INPUT;
            }
        }
    } else {
        format_text(&s)
    };
    // A closed stdout (`amsvm stat | head -1`) is not an error worth a panic.
    let _ = out.write_all(text.as_bytes());
    0
}

/// The text report: a header line, the pool line, the partition table.
pub fn format_text(s: &Snapshot) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "amsvm pid {}, up {:.1} s, control: {} requests, {} rejected, {} busy",
        s.pid,
        s.uptime_ms as f64 / 1000.0,
        s.control_requests,
        s.control_rejected,
        s.control_busy
    );
    let _ = match &s.pool {
        Some(p) => writeln!(
            o,
            "pool: size {:.1} MiB, in use {:.1} MiB, free {:.1} MiB, faults {}, reclaims {}, frame waits {}",
            p.size_mib(),
            p.in_use_mib(),
            p.free_mib(),
            p.faults,
            p.reclaims,
            p.frame_waits
        ),
        None => writeln!(o, "pool: none (each partition has its own RAM)"),
    };
    if let Some(ps) = &s.paging_server {
        let _ = writeln!(
            o,
            "paging server: started {} times, requests {}, completed {}, resubmitted {}, refused {}, I/O errors {}, rejected {}",
            ps.starts, ps.requests, ps.completions, ps.resubmitted, ps.refused_by_server, ps.io_errors, ps.rejected
        );
    }
    let w = s.partitions.iter().map(|p| p.name.len()).max().unwrap_or(0).max("partition".len());
    let _ = writeln!(
        o,
        "{:<w$} {:>8} {:>9} {:>7} {:>8} {:>9} {:>9} {:>10} {:>10} {:>12} {:>9}  state",
        "partition", "logical", "pmem", "loan", "loan-tgt", "hpi", "hpit-ms", "page-outs", "pager-MiB", "verified", "failures"
    );
    for p in &s.partitions {
        let _ = writeln!(
            o,
            "{:<w$} {:>8} {:>9.1} {:>7.1} {:>8.1} {:>9} {:>9.2} {:>10} {:>10.1} {:>12} {:>9}  {}",
            p.name,
            p.logical_mib,
            p.pmem_mib(),
            p.loan_mib(),
            p.loan_target_mib(),
            p.hpi,
            p.hpit_ms,
            p.page_outs,
            p.pager_mib(),
            p.pages_verified,
            p.verify_failures,
            p.state_text()
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Arc;

    use super::*;
    use crate::control::{RegisteredPartition, Registry, Server};
    use crate::metrics::{PartitionMetrics, PoolMetrics};

    #[test]
    fn text_report_has_a_pool_line_and_a_row_per_partition() {
        let pool = Arc::new(PoolMetrics::default());
        pool.size_pages.store(512 * 256, Relaxed);
        pool.resident.store(300 * 256, Relaxed);
        pool.faults.store(12345, Relaxed);
        pool.reclaims.store(67, Relaxed);
        let m = Arc::new(PartitionMetrics::default());
        m.pmem.store(80 * 256, Relaxed);
        m.hpi.store(123, Relaxed);
        m.hpit_ns.store(4_500_000, Relaxed);
        m.page_outs.store(456, Relaxed);
        m.pager_bytes.store(2 << 20, Relaxed);
        m.pages_verified.store(73923, Relaxed);
        let b = Arc::new(crate::devices::virtio::balloon::BalloonState::default());
        b.loaned.store(12 * 256, Relaxed);
        b.target.store(20 * 256, Relaxed);
        *m.balloon.lock().unwrap() = Some(b);
        let long = RegisteredPartition::new("a-rather-long-name", 256, 0, 128, Arc::default());
        long.set_outcome("exited ok");
        let reg = Registry::new(Some(pool), vec![RegisteredPartition::new("alpha", 128, 16, 200, m), long]);
        let text = format_text(&reg.snapshot());
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[0].starts_with(&format!("amsvm pid {}", std::process::id())), "{text}");
        assert_eq!(lines[1], "pool: size 512.0 MiB, in use 300.0 MiB, free 212.0 MiB, faults 12345, reclaims 67, frame waits 0");
        let header: Vec<_> = lines[2].split_whitespace().collect();
        assert_eq!(
            header,
            ["partition", "logical", "pmem", "loan", "loan-tgt", "hpi", "hpit-ms", "page-outs", "pager-MiB", "verified", "failures", "state"]
        );
        let row: Vec<_> = lines[3].split_whitespace().collect();
        assert_eq!(row, ["alpha", "128", "80.0", "12.0", "20.0", "123", "4.50", "456", "2.0", "73923", "0", "running"]);
        let row: Vec<_> = lines[4].split_whitespace().collect();
        assert_eq!(row[0], "a-rather-long-name");
        assert_eq!(&row[11..], ["ended:", "exited", "ok"]);
        // Columns line up whatever the name lengths.
        assert_eq!(lines[2].find("state"), lines[3].find("running"));
        assert_eq!(lines[3].find("running"), lines[4].find("ended"));

        // A thrashing partition under `policy = "protect"` says so.
        reg.partitions[0].metrics.yielding.store(true, std::sync::atomic::Ordering::Relaxed);
        let text = format_text(&reg.snapshot());
        assert!(text.lines().nth(3).unwrap().ends_with("  running (thrashing: yields its CPU)"), "{text}");

        let s = Registry::new(None, vec![]).snapshot();
        assert_eq!(format_text(&s).lines().nth(1), Some("pool: none (each partition has its own RAM)"));
    }

    #[test]
    fn stat_reads_a_server_and_fails_cleanly_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let args = |json| StatArgs { socket: Some(path.clone()), json };
        let mut out = Vec::new();
        assert_eq!(stat_to(args(false), &mut out), EXIT_BAD_INPUT, "no server yet");
        assert!(out.is_empty());
        let reg = Registry::new(None, vec![RegisteredPartition::new("alpha", 64, 0, 128, Arc::default())]);
        let _server = Server::start(&path, reg).unwrap();
        assert_eq!(stat_to(args(false), &mut out), 0);
        let text = String::from_utf8(std::mem::take(&mut out)).unwrap();
        assert!(text.lines().any(|l| l.starts_with("alpha ") && l.ends_with("running")), "{text}");
        assert_eq!(stat_to(args(true), &mut out), 0);
        let s: Snapshot = serde_json::from_slice(&out).unwrap();
        assert_eq!((s.partitions[0].name.as_str(), s.control_requests), ("alpha", 2));
    }
}
