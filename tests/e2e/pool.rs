//! The shared pool: overcommitted partitions with hypervisor paging.

use crate::common::*;

const MIB: u64 = 1 << 20;

#[test]
fn four_partitions_at_2x_overcommit_verify_every_page_within_the_pool() {
    overcommit_2x("local");
}

/// The same with paging delegated to the paging-server VM.
#[test]
fn four_partitions_at_2x_overcommit_through_the_paging_server() {
    overcommit_2x("vm");
}

fn overcommit_2x(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = format!("log_dir = \"logs\"\n[pool]\nsize_mib = 512\n[paging]\nbackend = \"{backend}\"\n");
    for i in 0..4 {
        cfg += &format!(
            "[[partition]]\nname = \"p{i}\"\nlogical_mib = 256\nimage = \"workload\"\n\
             [partition.workload]\nworking_set_mib = 200\npattern = \"hotspot\"\nhot_pct = 15\nhot_access_pct = 85\n\
             phase_accesses = 30000\nwrite_pct = 30\nduration_ms = 6000\nseed = {}\n",
            i + 1
        );
    }
    let path = write_config(dir.path(), "pool.toml", &cfg);
    let (status, stdout, stderr, samples) = run_sampled(&path, 256 * MIB, 4);
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

/// `policy = "protect"`: the two working sets that fit stay whole and the partitions
/// ranked below them page; every page still verifies and the pool holds (seccomp
/// enforced: the policy thread may renice the thrashing partition's vCPU).
#[test]
fn protect_policy_keeps_the_top_ranked_working_sets_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = "log_dir = \"logs\"\n[pool]\nsize_mib = 512\npolicy = \"protect\"\nrotate_s = 3600\n".to_string();
    for i in 0..4 {
        cfg += &format!(
            "[[partition]]\nname = \"p{i}\"\nlogical_mib = 256\nimage = \"workload\"\n\
             [partition.workload]\nworking_set_mib = 200\npattern = \"hotspot\"\nhot_pct = 15\nhot_access_pct = 85\n\
             phase_accesses = 30000\nwrite_pct = 30\nduration_ms = 6000\nseed = {}\n",
            i + 1
        );
    }
    let path = write_config(dir.path(), "pool.toml", &cfg);
    let (status, stdout, stderr, samples) = run_sampled(&path, 256 * MIB, 4);
    assert_eq!(status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let rows = summary(&stdout);
    assert_eq!(rows.len(), 4);
    for r in &rows {
        assert_eq!(r.outcome, "exited ok", "{stdout}");
        assert_eq!(r.failures, 0, "{stdout}");
        assert!(r.verified > 51200, "the final pass alone verifies every page: {r:?}");
    }
    // Ranks follow the config's order (no rotation in this run): p0 and p1 fit and are
    // protected; the last one pages for them.
    assert!(rows[0].hpi + rows[1].hpi < rows[3].hpi, "the protected ones page less than the last: {stdout}");
    assert!(rows[0].verified > rows[3].verified && rows[1].verified > rows[3].verified, "the protected ones get the work done: {stdout}");
    let peak = *samples.iter().max().unwrap();
    assert!(peak <= 512 * MIB, "guest memory resident {} KiB, above the 512 MiB pool", peak / 1024);
}
