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

#[test]
fn a_reader_that_goes_away_does_not_end_the_run() {
    // `amsvm run cfg | head -1`, or a closed pipe: the summary cannot be printed, but the
    // partitions still run to their end and the exit status is theirs.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = String::from("log_dir = \"logs\"\n");
    for i in 0..2 {
        cfg += &format!(
            "[[partition]]\nname = \"p{i}\"\nlogical_mib = 32\nimage = \"workload\"\n\
             [partition.workload]\nworking_set_mib = 8\npattern = \"uniform\"\nwrite_pct = 30\npasses = 2\n"
        );
    }
    let path = write_config(dir.path(), "two.toml", &cfg);
    let mut child = amsvm().arg("run").arg(&path).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for i in 0..2 {
        let log = std::fs::read_to_string(dir.path().join("logs").join(format!("p{i}.log"))).unwrap();
        assert!(log.contains("failures 0; disk 0 ok 0 bad; OK"), "partition p{i} did not end well:\n{log}");
    }
}
