//! A workload partition that writes, flushes, reads back and verifies virtio-blk blocks.

use crate::common::*;

#[test]
fn workload_verifies_data_through_virtio_blk() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = "log_dir = \"logs\"\n[[partition]]\nname = \"disky\"\nlogical_mib = 64\nimage = \"workload\"\n\
               [partition.workload]\nworking_set_mib = 8\npasses = 1\ndisk_test_blocks = 512\n\
               [[partition.disk]]\npath = \"disk.img\"\ncreate_mib = 4\n";
    let path = write_config(dir.path(), "disk.toml", cfg);
    let out = run_config(&path);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let rows = summary(&stdout);
    assert_eq!(rows.len(), 1);
    // 4 MiB disk = 1024 blocks of 4 KiB; the workload was asked for 512.
    assert_eq!(rows[0].disk_ok, 512, "{stdout}");
    assert_eq!(rows[0].disk_bad, 0, "{stdout}");
    assert_eq!(rows[0].failures, 0, "{stdout}");
    // The data reached the host file: the written blocks are not all zero.
    let img = std::fs::read(dir.path().join("disk.img")).unwrap();
    assert_eq!(img.len(), 4 << 20);
    let nonzero_blocks = img.chunks(4096).take(512).filter(|b| b.iter().any(|&x| x != 0)).count();
    assert!(nonzero_blocks >= 511, "only {nonzero_blocks} of 512 written blocks hold data (one may be discarded)");
}
