//! `amsvm boot` of a Linux guest with 2 vCPUs: it reaches init, sees both CPUs and its
//! virtio-mmio device through ACPI, and ends cleanly — by powering off, and by
//! rebooting (the partition is rebuilt and boots again).

use crate::harness::*;
use std::time::Duration;

/// The L1 lines that run `amsvm boot` of the L2 image with a disk and `cmdline`.
fn amsvm_boot(tag: &str, extra_log: &str) -> String {
    format!(
        r#"
dd if=/dev/zero of=/tmp/{tag}.img bs=1M count=4 2>/dev/null
say "amsvm start boot"
{extra_log} timeout 60 amsvm boot --kernel /l2/vmlinuz --initrd /l2/initramfs.cpio.gz --mem 256 --vcpus 2 \
    --disk /tmp/{tag}.img --cmdline "$(cat /scenario/{tag}.cmdline)"
say "amsvm boot exit status $?"
"#
    )
}

/// The summary row amsvm prints for partition `name` (`touched ... outcome`).
pub fn summary_row<'a>(run: &'a Run, name: &str) -> Option<&'a str> {
    let mut in_table = false;
    for l in &run.lines {
        if l.text.starts_with("partition ") && l.text.contains("outcome") {
            in_table = true;
        } else if in_table {
            if let Some(rest) = l.text.strip_prefix(name).filter(|r| r.starts_with(' ')) {
                return Some(rest.trim());
            }
        }
    }
    None
}

#[test]
fn boot_two_vcpus_sees_acpi_devices_and_powers_off() {
    let cmd = "echo amsvm-guest: cpuinfo processors $(grep -c ^processor /proc/cpuinfo); \
               echo amsvm-guest: online $(cat /sys/devices/system/cpu/online)";
    let run = run(Scenario {
        name: "boot",
        script: amsvm_boot("boot", ""),
        files: vec![File::text("boot.cmdline", &l2_cmdline(cmd))],
        timeout: Duration::from_secs(120),
    });
    run.check_l1().unwrap_or_else(|e| panic!("{e}"));
    let g: Vec<&str> = run.guest("linux").map(|(_, t)| t).collect();
    let has = |s: &str| g.iter().any(|l| l.contains(s));
    let fail = |why: &str| -> ! { panic!("{}", run.failure(why)) };
    if !has("amsvm-guest: kernel") {
        fail("the L2 guest never reached its /init");
    }
    if !has("amsvm-guest: cpus 2") || !has("amsvm-guest: cpuinfo processors 2") || !has("amsvm-guest: online 0-1") {
        fail("the guest does not see 2 CPUs (amsvm's MADT declares them)");
    }
    let acpi = g.iter().find(|l| l.starts_with("amsvm-guest: acpi devices")).copied().unwrap_or("");
    if !acpi.contains("LNRO0005:00") {
        fail(&format!("the guest's ACPI namespace has no virtio-mmio device LNRO0005:00 ({acpi})"));
    }
    if !g.iter().any(|l| l.contains("virtio0 device 0x0002") && l.contains("driver virtio_blk") && l.contains("via LNRO0005:00"))
    {
        fail("the disk is not virtio0 (device 0x0002) bound to virtio_blk on the ACPI-declared LNRO0005:00");
    }
    if !has("amsvm-guest: exit status 0") || !has("amsvm-guest: powering off") {
        fail("the guest's command did not succeed, or the guest did not power off");
    }
    let row = summary_row(&run, "linux").unwrap_or_else(|| fail("amsvm printed no summary row for the partition"));
    if !row.ends_with("powered off") {
        fail(&format!("amsvm's outcome is not \"powered off\": {row}"));
    }
    if run.l1_value("amsvm boot exit status") != Some("0") {
        fail("amsvm boot did not exit with status 0");
    }
    let mut phases = run.l1_phases();
    phases.push(("amsvm start", run.at("amsvm-l1: amsvm start boot")));
    phases.push(("L2 /init", run.at("[linux] amsvm-guest: kernel")));
    phases.push(("L2 power-off", run.at("[linux] amsvm-guest: powering off")));
    phases.push(("amsvm exit", run.at("amsvm-l1: amsvm boot exit status")));
    run.timings(&phases);
}

#[test]
fn boot_reboot_rebuilds_the_partition_which_boots_again() {
    // The disk carries the state across the reboot: the first boot marks it and
    // reboots (Linux's default: the FADT reset register), the second sees the mark and
    // powers off. Both `amsvm boot` and `amsvm run` rebuild a partition that resets.
    let cmd = "if head -c 14 /dev/vda | grep -q amsvm-rebooted; then echo amsvm-guest: second boot, after the reboot; \
               else echo amsvm-guest: first boot, rebooting; printf amsvm-rebooted | dd of=/dev/vda conv=notrunc 2>/dev/null; \
               sync; reboot -f; fi";
    let script = format!(
        "{}\nsay \"amsvm start run\"\nAMSVM_LOG=info timeout 60 amsvm run /scenario/rb.toml --socket $SOCK\n\
         say \"amsvm run exit status $?\"\n",
        amsvm_boot("reboot", "AMSVM_LOG=info")
    );
    let cmdline = l2_cmdline(cmd);
    let toml = format!(
        "log_dir = \"/tmp/logs\"\n[[partition]]\nname = \"rb\"\nlogical_mib = 256\nvcpus = 2\nkernel = \"/l2/vmlinuz\"\n\
         initrd = \"/l2/initramfs.cpio.gz\"\ncmdline = '{cmdline}'\nconsole_stdout = true\n\
         [[partition.disk]]\npath = \"/tmp/rb.img\"\ncreate_mib = 4\n"
    );
    let run = run(Scenario {
        name: "reboot",
        script,
        files: vec![File::text("reboot.cmdline", &cmdline), File::text("rb.toml", &toml)],
        timeout: Duration::from_secs(120),
    });
    run.check_l1().unwrap_or_else(|e| panic!("{e}"));
    let fail = |why: &str| -> ! { panic!("{}", run.failure(why)) };
    for (name, cmd) in [("linux", "amsvm boot"), ("rb", "amsvm run")] {
        let g: Vec<(f64, &str)> = run.guest(name).collect();
        let boots = g.iter().filter(|(_, l)| l.starts_with("amsvm-guest: kernel")).count();
        let first = g.iter().any(|(_, l)| l.contains("first boot, rebooting"));
        let second = g.iter().any(|(_, l)| l.contains("second boot, after the reboot"));
        if boots != 2 || !first || !second {
            fail(&format!(
                "{cmd}: expected the guest to boot twice (mark the disk and reboot, then see the mark and power off); \
                 it reached /init {boots} time(s), first boot {first}, second boot {second}"
            ));
        }
        let row = summary_row(&run, name).unwrap_or_else(|| fail(&format!("{cmd} printed no summary row")));
        if !row.ends_with("powered off") {
            fail(&format!("{cmd}: the partition's outcome after the reboot is not \"powered off\": {row}"));
        }
        let key = format!("{cmd} exit status");
        if run.l1_value(&key) != Some("0") {
            fail(&format!("{cmd} did not exit with status 0 after a reboot and a power-off"));
        }
    }
    if run.all("reset #1: rebuilding the partition").count() != 2 {
        fail("amsvm did not log \"reset #1: rebuilding the partition\" once for each of amsvm boot and amsvm run");
    }
    let mut phases = run.l1_phases();
    phases.push(("boot: L2 /init #1", run.find("[linux] amsvm-guest: kernel").map(|l| l.t)));
    phases.push(("reset", run.at("reset #1: rebuilding")));
    phases.push(("L2 /init #2", run.all("[linux] amsvm-guest: kernel").nth(1).map(|l| l.t)));
    phases.push(("amsvm boot exit", run.at("amsvm-l1: amsvm boot exit status")));
    phases.push(("run: L2 /init #2", run.all("[rb] amsvm-guest: kernel").nth(1).map(|l| l.t)));
    phases.push(("amsvm run exit", run.at("amsvm-l1: amsvm run exit status")));
    run.timings(&phases);
}
