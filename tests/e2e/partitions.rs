//! Several workload partitions in one amsvm process, each verifying its pages.

use crate::common::*;

#[test]
fn four_workload_partitions_verify_every_page_and_exit_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = String::from("log_dir = \"logs\"\n");
    let patterns = ["sequential", "uniform", "zipf", "hotspot"];
    for (i, p) in patterns.iter().enumerate() {
        cfg += &format!(
            "[[partition]]\nname = \"p{i}\"\nlogical_mib = 64\nimage = \"workload\"\n\
             [partition.workload]\nworking_set_mib = 32\npattern = \"{p}\"\nwrite_pct = 40\npasses = 3\nseed = {}\n",
            i + 7
        );
    }
    let path = write_config(dir.path(), "four.toml", &cfg);
    let out = run_config(&path);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "amsvm failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let rows = summary(&stdout);
    assert_eq!(rows.len(), 4, "{stdout}");
    let ws_pages = 32 * 256;
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.name, format!("p{i}"));
        assert_eq!(r.outcome, "exited ok", "{stdout}");
        assert_eq!(r.failures, 0, "{stdout}");
        assert_eq!(r.rejected, 0, "the workload makes no request amsvm rejects: {stdout}");
        // 3 passes over the working set, then a final check of every page.
        assert!(r.touched >= 3 * ws_pages, "{r:?}");
        assert!(r.written > 0, "{r:?}");
        assert!(r.exits > 0, "{r:?}");
        assert!(r.verified >= ws_pages, "every page is verified at least once at the end: {r:?}");
        let log = std::fs::read_to_string(dir.path().join("logs").join(format!("p{i}.log"))).unwrap();
        assert!(!log.trim().is_empty(), "partition p{i} printed nothing on its console");
    }
}
