//! Pool fault cases seen end to end: a paging device that runs out of space pauses its
//! partition with an error naming the device, and the other partitions go on.

use crate::common::*;

#[test]
fn full_paging_device_pauses_only_its_partition() {
    let dir = tempfile::tempdir().unwrap();
    // A 1 MiB tmpfs for one partition's paging device (needs root, as CI has).
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let st = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"]).arg(&small).status().unwrap();
    assert!(st.success(), "mounting a small tmpfs needs root");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(small.clone());
    let device = small.join("full.pages");
    let cfg = format!(
        "log_dir = \"logs\"\n[pool]\nsize_mib = 48\n\
         [[partition]]\nname = \"full\"\nlogical_mib = 64\npaging_file = \"{}\"\nimage = \"workload\"\n\
         [partition.workload]\nworking_set_mib = 40\npattern = \"uniform\"\nwrite_pct = 100\nduration_ms = 4000\n\
         [[partition]]\nname = \"fine\"\nlogical_mib = 64\nimage = \"workload\"\n\
         [partition.workload]\nworking_set_mib = 40\npattern = \"uniform\"\nwrite_pct = 50\nduration_ms = 4000\n",
        device.display()
    );
    let out = run_config(&write_config(dir.path(), "full.toml", &cfg));
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "a paused partition makes amsvm exit 1\n{stdout}\n{stderr}");
    let rows = summary(&stdout);
    let full = rows.iter().find(|r| r.name == "full").unwrap();
    let fine = rows.iter().find(|r| r.name == "fine").unwrap();
    assert!(full.outcome.starts_with("paused: paging device") && full.outcome.contains("full.pages") && full.outcome.contains("no space"), "{stdout}");
    assert_eq!(full.failures, 0, "no page of the paused partition was found wrong before it stopped");
    assert_eq!(fine.outcome, "exited ok", "{stdout}");
    assert_eq!(fine.failures, 0);
    assert!(fine.hpi > 0, "the other partition kept paging: {stdout}");
    assert!(!device.exists(), "the paused partition's paging slots were returned with its store");
}

/// The VMM's own accesses to guest memory (virtio-blk moving data in and out of guest
/// buffers) work on pages the pool paged out, without deadlock: a low-weight partition
/// runs its disk test while a heavy one presses on a small pool.
#[test]
fn virtio_blk_works_on_paged_out_guest_memory() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = "log_dir = \"logs\"\n[pool]\nsize_mib = 40\n\
         [[partition]]\nname = \"disky\"\nlogical_mib = 64\nweight = 0\nimage = \"workload\"\n\
         [partition.workload]\nworking_set_mib = 16\npattern = \"uniform\"\npasses = 4\ndisk_test_blocks = 2048\n\
         [[partition.disk]]\npath = \"disk.img\"\ncreate_mib = 8\n\
         [[partition]]\nname = \"hog\"\nlogical_mib = 64\nweight = 255\nimage = \"workload\"\n\
         [partition.workload]\nworking_set_mib = 40\npattern = \"uniform\"\nwrite_pct = 50\nduration_ms = 4000\n";
    let out = run_config(&write_config(dir.path(), "vmm-access.toml", cfg));
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let rows = summary(&stdout);
    let disky = rows.iter().find(|r| r.name == "disky").unwrap();
    assert_eq!(disky.disk_ok, 2048, "{stdout}");
    assert_eq!(disky.disk_bad + disky.failures, 0, "{stdout}");
    assert!(disky.page_outs > 0 && disky.hpi > 0, "the disk partition was paged out and in: {stdout}");
}
