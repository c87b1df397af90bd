//! How partitions end: power-off through the ACPI sleep register, reset (rebuilt, with a
//! guard against reset loops), and a crashing image — each reported, none taking the
//! other partitions or amsvm down.

use crate::common::*;

fn image(dir: &std::path::Path, name: &str, code: Vec<u8>) -> String {
    let p = dir.join(name);
    std::fs::write(&p, tiny_elf(&code, 0x1000)).unwrap();
    p.display().to_string()
}

#[test]
fn power_off_reset_and_crash_are_reported() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    // Prints 'P', then writes SLP_TYP=5|SLP_EN to the ACPI sleep control register.
    let off = image(p, "off.elf", [asm::outb(0x3f8, b'P'), asm::outb(0x3f8, b'\n'), asm::outb(0x600, 0x34), asm::SPIN.to_vec()].concat());
    // Prints 'R' on every boot, then asks the i8042 for a reset: a reset loop.
    let reset = image(p, "reset.elf", [asm::outb(0x3f8, b'R'), asm::outb(0x64, 0xfe), asm::SPIN.to_vec()].concat());
    // An invalid opcode: with no IDT at CPL3 this is fatal.
    let crash = image(p, "crash.elf", [asm::outb(0x3f8, b'C'), asm::UD2.to_vec()].concat());
    let mut cfg = String::from("log_dir = \"logs\"\n");
    for (name, img) in [("off", &off), ("reset", &reset), ("crash", &crash)] {
        cfg += &format!("[[partition]]\nname = \"{name}\"\nlogical_mib = 8\nimage = \"{img}\"\n");
    }
    cfg += "[[partition]]\nname = \"fine\"\nlogical_mib = 32\nimage = \"workload\"\n[partition.workload]\nworking_set_mib = 8\npasses = 2\n";
    let out = run_config(&write_config(p, "life.toml", &cfg));
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "a crashed partition makes amsvm exit 1\n{stdout}\n{stderr}");
    let rows = summary(&stdout);
    let row = |n: &str| rows.iter().find(|r| r.name == n).unwrap_or_else(|| panic!("no row {n}: {stdout}")).clone();
    assert_eq!(row("off").outcome, "powered off");
    assert!(row("reset").outcome.starts_with("crashed: reset loop"), "{stdout}");
    let crash_row = row("crash");
    assert!(crash_row.outcome.contains("triple fault") && crash_row.outcome.contains("0x200"), "{stdout}");
    assert_eq!(row("fine").outcome, "exited ok");
    assert_eq!(row("fine").failures, 0);
    let log = |n: &str| std::fs::read_to_string(p.join("logs").join(format!("{n}.log"))).unwrap();
    assert_eq!(log("off"), "P\n");
    assert_eq!(log("crash"), "C");
    // The first boot plus one per tolerated reset, all in one log.
    let boots = log("reset").matches('R').count();
    assert_eq!(boots, 17, "log: {:?}", log("reset"));
}

#[test]
fn sigint_stops_every_partition_and_cleans_up() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let mut cfg = String::from("log_dir = \"logs\"\n[pool]\nsize_mib = 48\npaging_dir = \"paging\"\n");
    for i in 0..2 {
        cfg += &format!(
            "[[partition]]\nname = \"s{i}\"\nlogical_mib = 64\nimage = \"workload\"\n\
             [partition.workload]\nworking_set_mib = 40\npattern = \"uniform\"\nduration_ms = 600000\n"
        );
    }
    let sock = p.join("ctl.sock");
    let child = amsvm()
        .arg("run")
        .arg(write_config(p, "long.toml", &cfg))
        .arg("--socket")
        .arg(&sock)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until both partitions have paged, then interrupt.
    let t0 = std::time::Instant::now();
    loop {
        assert!(t0.elapsed().as_secs() < 60, "the partitions never paged");
        std::thread::sleep(std::time::Duration::from_millis(200));
        let files = std::fs::read_dir(p.join("paging")).map(|r| r.count()).unwrap_or(0);
        if files == 2 && sock.exists() {
            break;
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "stopped partitions are not a success\n{stdout}\n{stderr}");
    let rows = summary(&stdout);
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.outcome == "stopped" && r.failures == 0), "{stdout}");
    assert_eq!(std::fs::read_dir(p.join("paging")).unwrap().count(), 0, "paging files removed");
    assert!(!sock.exists(), "control socket removed");
}
