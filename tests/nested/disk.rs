//! virtio-blk with a Linux guest: the guest stamps every 4 KiB block of its disk with
//! memverify, reads it back from the device (O_DIRECT), and after the VM has exited L1
//! checks that the disk file holds the same pattern.

use std::time::Duration;

use crate::harness::*;

/// MiB of the disk the guest stamps.
const DISK_MIB: u64 = 8;

/// What the disk scenario found.
pub struct DiskReport {
    pub blocks: u64,
}

/// Run the disk scenario; `initramfs` replaces the L2 guest's initramfs (the broken-guest
/// test passes one without virtio_blk). Err says what went wrong.
pub fn disk_scenario(name: &'static str, initramfs: Option<Vec<u8>>) -> Result<DiskReport, String> {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64 & 0xffff_ffff;
    let cmd = format!("memverify disk-write /dev/vda {DISK_MIB} {seed} && memverify disk-verify /dev/vda {DISK_MIB} {seed}");
    let initrd = if initramfs.is_some() { "/scenario/l2-initramfs.cpio.gz" } else { "/l2/initramfs.cpio.gz" };
    let script = format!(
        r#"
dd if=/dev/zero of=/tmp/disk.img bs=1M count=16 2>/dev/null
say "amsvm start disk"
timeout 90 amsvm boot --kernel /l2/vmlinuz --initrd {initrd} --mem 256 --vcpus 2 --disk /tmp/disk.img \
    --cmdline "$(cat /scenario/disk.cmdline)"
say "amsvm boot exit status $?"
say "host check: $(memverify disk-verify /tmp/disk.img {DISK_MIB} {seed} 2>&1 | tail -n 1)"
"#
    );
    let mut files = vec![File::text("disk.cmdline", &l2_cmdline(&cmd))];
    if let Some(img) = initramfs {
        files.push(File::bytes("l2-initramfs.cpio.gz", img));
    }
    let run = run(Scenario { name, script, files, timeout: Duration::from_secs(120) });
    run.check_l1()?;
    let g: Vec<&str> = run.guest("linux").map(|(_, t)| t).collect();
    let has = |s: &str| g.iter().any(|l| l.contains(s));
    if !has("amsvm-guest: kernel") {
        return Err(run.failure("the L2 guest never reached its /init"));
    }
    if !has("amsvm-guest: disk vda") {
        let virtio: Vec<&str> = g.iter().filter(|l| l.contains(" device 0x")).map(|l| l.trim_start_matches("amsvm-guest: ")).collect();
        let failed: Vec<&str> = g.iter().filter(|l| l.contains("insmod")).copied().collect();
        return Err(run.failure(&format!(
            "the guest's disk was not found: there is no /dev/vda in the guest; virtio devices it saw: [{}]{}; \
             a virtio device 0x0002 with driver none means the virtio_blk driver is missing from the guest's \
             initramfs (AMSVM_MODULES)",
            virtio.join("; "),
            if failed.is_empty() { String::new() } else { format!("; {}", failed.join("; ")) }
        )));
    }
    let blocks = DISK_MIB << 8;
    if !has(&format!("memverify: disk-write ok /dev/vda blocks {blocks}")) {
        return Err(run.failure("the guest could not write its disk (no \"memverify: disk-write ok\")"));
    }
    if !has(&format!("memverify: disk-verify ok /dev/vda blocks {blocks} verified {blocks} failures 0")) {
        return Err(run.failure("the guest read back something other than what it wrote to its disk"));
    }
    let host = run.l1_value("host check:").unwrap_or("none");
    if !host.starts_with(&format!("memverify: disk-verify ok /tmp/disk.img blocks {blocks} verified {blocks} failures 0")) {
        return Err(run.failure(&format!("after the VM exited, the disk file does not hold the guest's pattern: {host}")));
    }
    if run.l1_value("amsvm boot exit status") != Some("0") {
        return Err(run.failure("amsvm boot did not exit with status 0"));
    }
    let mut phases = run.l1_phases();
    phases.push(("amsvm start", run.at("amsvm-l1: amsvm start disk")));
    phases.push(("L2 /init", run.at("[linux] amsvm-guest: kernel")));
    phases.push(("disk written", run.at("[linux] memverify: disk-write ok")));
    phases.push(("read back", run.at("[linux] memverify: disk-verify")));
    phases.push(("amsvm exit", run.at("amsvm-l1: amsvm boot exit status")));
    phases.push(("L1 check", run.at("amsvm-l1: host check:")));
    run.timings(&phases);
    Ok(DiskReport { blocks })
}

#[test]
fn virtio_blk_pattern_written_by_the_guest_is_on_the_disk_file() {
    let r = disk_scenario("disk", None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.blocks, DISK_MIB << 8);
}
