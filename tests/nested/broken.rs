//! A deliberately broken guest makes the matching scenario fail, with a message that
//! says what went wrong: an initramfs without the virtio_blk module (AMSVM_MODULES) runs
//! the disk scenario, which must report that the disk was not found.

use std::process::Command;

use crate::harness::*;

#[test]
fn a_guest_without_virtio_blk_fails_the_disk_scenario_saying_the_disk_was_not_found() {
    l2_dir();
    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nested-l2-no-virtio-blk");
    let o = Command::new(root().join("guest-images/linux/build.sh"))
        .env("AMSVM_MODULES", "virtio_mmio virtio_balloon")
        .env("AMSVM_OUT", &out)
        .output()
        .expect("cannot run guest-images/linux/build.sh");
    assert!(
        o.status.success(),
        "guest-images/linux/build.sh with AMSVM_MODULES=\"virtio_mmio virtio_balloon\" failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let initramfs = std::fs::read(out.join("initramfs.cpio.gz")).unwrap();
    let err = match crate::disk::disk_scenario("disk-without-virtio_blk", Some(initramfs)) {
        Ok(_) => panic!("the disk scenario passed with a guest that has no virtio_blk driver"),
        Err(e) => e,
    };
    // The first line is the reason; the rest is the console transcript.
    let reason = err.lines().next().unwrap_or("");
    assert!(
        reason.contains("the guest's disk was not found") && reason.contains("device 0x0002") && reason.contains("driver none"),
        "the failure does not say that the disk was not found and why:\n{err}"
    );
    report(&format!("[nested disk-without-virtio_blk] failed as it should: {reason}"));
}
