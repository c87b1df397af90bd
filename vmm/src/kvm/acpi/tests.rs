//! ACPI table tests: structure checked by hand (signatures, lengths, checksums,
//! pointers), contents checked by decoding every table with ACPICA's `iasl -d`
//! (Debian package acpica-tools) and reading the disassembly.

use std::path::Path;
use std::process::Command;

use vm_memory::{Bytes, GuestAddress};

use super::*;

fn guest_memory(bytes: usize) -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), bytes)]).unwrap()
}

fn slots(n: usize) -> Vec<VirtioMmioSlot> {
    (0..n).map(VirtioMmioSlot::standard).collect()
}

fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Reads the table at `addr`, checks its signature, length and checksum.
fn table(mem: &GuestMemory, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
    let head = read(mem, addr, 36);
    assert_eq!(&head[0..4], sig, "signature of the table at {addr:#x}");
    let len = u32_at(&head, 4) as usize;
    assert!(len >= 36, "{} length {len}", String::from_utf8_lossy(sig));
    let t = read(mem, addr, len);
    assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(sig));
    assert_eq!(&t[10..16], &OEM_ID);
    t
}

/// All tables of one build, extracted from guest memory by following the pointers.
struct Extracted {
    rsdp: Vec<u8>,
    xsdt: Vec<u8>,
    fadt: Vec<u8>,
    madt: Vec<u8>,
    dsdt: Vec<u8>,
}

fn extract(mem: &GuestMemory, t: &AcpiTables) -> Extracted {
    assert_eq!(t.rsdp, layout::ACPI_RSDP);
    let rsdp = read(mem, t.rsdp, 36);
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[0..20]), 0, "RSDP checksum (first 20 bytes)");
    assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
    assert_eq!(rsdp[15], 2, "RSDP revision");
    assert_eq!(u32_at(&rsdp, 20), 36, "RSDP length");
    assert_eq!(u64_at(&rsdp, 24), t.xsdt);

    let xsdt = table(mem, t.xsdt, b"XSDT");
    let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(entries, vec![t.fadt, t.madt], "XSDT entries");
    let fadt = table(mem, entries[0], b"FACP");
    let madt = table(mem, entries[1], b"APIC");
    assert_eq!(u64_at(&fadt, 140), t.dsdt, "FADT X_DSDT");
    let dsdt = table(mem, u64_at(&fadt, 140), b"DSDT");

    // Everything inside the ACPI area, nothing overlapping.
    let mut spans = [
        (t.rsdp, 36u64),
        (t.xsdt, xsdt.len() as u64),
        (t.fadt, fadt.len() as u64),
        (t.madt, madt.len() as u64),
        (t.dsdt, dsdt.len() as u64),
    ];
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "tables overlap: {spans:x?}");
    }
    assert!(spans[4].0 + spans[4].1 <= layout::ACPI_END);
    assert_eq!(spans[4].0 + spans[4].1, t.end);
    Extracted { rsdp, xsdt, fadt, madt, dsdt }
}

/// Disassembles `bytes` with `iasl -d` and returns the text.
fn iasl_disassemble(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let bin = dir.join(format!("{name}.dat"));
    std::fs::write(&bin, bytes).unwrap();
    let out = match Command::new("iasl").arg("-d").arg(&bin).current_dir(dir).output() {
        Ok(o) => o,
        Err(e) => panic!(
            "cannot run iasl ({e}): the ACPI tests decode the tables with ACPICA's iasl; \
             install it with `apt-get install acpica-tools`"
        ),
    };
    let dsl = dir.join(format!("{name}.dsl"));
    assert!(
        out.status.success() && dsl.exists(),
        "iasl -d {name} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(dsl).unwrap()
}

/// Drops `//` comments and collapses whitespace so that multi-line ASL can be matched.
fn squash(s: &str) -> String {
    s.lines()
        .map(|l| l.split_once("//").map_or(l, |(code, _)| code))
        .flat_map(|l| l.split_whitespace())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Text of the `Device (name)` block in disassembled ASL (up to the next `Device (`).
fn device_block<'a>(asl: &'a str, name: &str) -> &'a str {
    let start = asl.find(&format!("Device ({name})")).unwrap_or_else(|| panic!("no Device ({name}) in:\n{asl}"));
    let rest = &asl[start + 8..];
    let end = rest.find("Device (").map_or(asl.len(), |e| start + 8 + e);
    &asl[start..end]
}

/// Value of a field line `Name : value` in a disassembled data table.
fn fields<'a>(dsl: &'a str, name: &str) -> Vec<&'a str> {
    dsl.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(" : ")?;
            // Drop the "[offset decimal length]" column.
            let k = k.trim_start();
            let k = if k.starts_with('[') { k.split_once(']').map_or(k, |(_, rest)| rest) } else { k };
            (k.trim() == name).then(|| v.trim())
        })
        .collect()
}

#[test]
fn tables_are_linked_and_checksummed() {
    let mem = guest_memory(4 << 20);
    let t = create_acpi_tables(&mem, 4, &slots(3)).unwrap();
    let x = extract(&mem, &t);
    assert_eq!(x.xsdt.len(), 36 + 16);
    assert_eq!(x.fadt.len(), 276, "FADT of ACPI 6.5");
    assert_eq!((x.fadt[8], x.fadt[131]), (6, 5), "FADT major/minor revision");
    assert_eq!(u32_at(&x.fadt, 40), 0, "no 32-bit DSDT pointer");
    assert_ne!(u32_at(&x.fadt, 112) & (1 << 20), 0, "HW_REDUCED_ACPI flag");
    // MADT: header 44 bytes, 4 local APICs of 8 bytes, one I/O APIC of 12.
    assert_eq!(x.madt.len(), 44 + 4 * 8 + 12);
    assert_eq!(u32_at(&x.madt, 36), LAPIC_ADDR);
    assert!(x.rsdp.len() == 36);
}

#[test]
fn dsdt_declares_com1_virtio_devices_and_s5() {
    let dir = tempfile::tempdir().unwrap();
    let mem = guest_memory(4 << 20);
    let devices = vec![
        VirtioMmioSlot::standard(0),
        VirtioMmioSlot::standard(1),
        VirtioMmioSlot { base: 0xd000_f000, size: 0x1000, gsi: 23 },
    ];
    let t = create_acpi_tables(&mem, 2, &devices).unwrap();
    let x = extract(&mem, &t);
    let asl = iasl_disassemble(dir.path(), "dsdt", &x.dsdt);
    let flat = squash(&asl);

    assert_eq!(flat.matches("\"LNRO0005\"").count(), devices.len(), "{asl}");
    for (i, d) in devices.iter().enumerate() {
        let block = squash(device_block(&asl, &format!("V{i:03X}")));
        assert!(block.contains("Name (_HID, \"LNRO0005\")"), "{block}");
        let uid = if i == 0 { "Zero".to_string() } else if i == 1 { "One".to_string() } else { format!("0x{i:02X}") };
        assert!(block.contains(&format!("Name (_UID, {uid})")), "_UID of device {i}: {block}");
        let mem32 = format!(
            "Memory32Fixed (ReadWrite, 0x{:08X}, 0x{:08X}, )",
            d.base, d.size
        );
        assert!(block.contains(&mem32), "expected `{mem32}` in: {block}");
        let irq = format!("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) {{ 0x{:08X}, }}", d.gsi);
        assert!(block.contains(&irq), "expected `{irq}` in: {block}");
    }

    let com1 = squash(device_block(&asl, "COM1"));
    assert!(com1.contains("Name (_HID, EisaId (\"PNP0501\")"), "{com1}");
    assert!(com1.contains("IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08, )"), "{com1}");
    assert!(com1.contains("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000004, }"), "{com1}");

    assert!(flat.contains("Name (_S5, Package (0x04) { 0x05, Zero, Zero, Zero })"), "{asl}");

    // The disassembly compiles back without errors: the AML is well formed.
    let out = Command::new("iasl").arg("dsdt.dsl").current_dir(dir.path()).output().unwrap();
    assert!(out.status.success(), "iasl could not recompile the DSDT:\n{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn madt_lists_every_vcpu_and_the_ioapic() {
    let dir = tempfile::tempdir().unwrap();
    for vcpus in [1u8, 3, 255] {
        let mem = guest_memory(4 << 20);
        let t = create_acpi_tables(&mem, vcpus, &slots(2)).unwrap();
        let x = extract(&mem, &t);
        let dsl = iasl_disassemble(dir.path(), &format!("apic{vcpus}"), &x.madt);
        let types = fields(&dsl, "Subtable Type");
        assert_eq!(types.iter().filter(|v| v.contains("[Processor Local APIC]")).count(), vcpus as usize, "{dsl}");
        assert_eq!(types.iter().filter(|v| v.contains("[I/O APIC]")).count(), 1, "{dsl}");
        assert_eq!(types.len(), vcpus as usize + 1, "no other subtables: {dsl}");
        let ids: Vec<&str> = fields(&dsl, "Local Apic ID");
        let want: Vec<String> = (0..vcpus).map(|i| format!("{i:02X}")).collect();
        assert_eq!(ids, want, "APIC ids");
        let uids: Vec<&str> = fields(&dsl, "Processor ID");
        assert_eq!(uids, want, "processor uids");
        assert_eq!(fields(&dsl, "Processor Enabled"), vec!["1"; vcpus as usize], "all enabled");
        assert_eq!(fields(&dsl, "Local Apic Address"), vec!["FEE00000"]);
        assert_eq!(fields(&dsl, "Address"), vec!["FEC00000"], "I/O APIC address");
        assert_eq!(fields(&dsl, "Interrupt"), vec!["00000000"], "I/O APIC GSI base");
    }
}

#[test]
fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
    let dir = tempfile::tempdir().unwrap();
    let mem = guest_memory(4 << 20);
    let t = create_acpi_tables(&mem, 2, &slots(1)).unwrap();
    let x = extract(&mem, &t);
    let dsl = iasl_disassemble(dir.path(), "facp", &x.fadt);

    assert_eq!(fields(&dsl, "Hardware Reduced (V5)"), vec!["1"], "{dsl}");
    assert_eq!(fields(&dsl, "Reset Register Supported (V2)"), vec!["1"], "{dsl}");
    assert_eq!(fields(&dsl, "Value to cause reset"), vec!["01"], "{dsl}");
    // The 32-bit DSDT pointer is zero, X_DSDT holds the address.
    assert_eq!(fields(&dsl, "DSDT Address"), vec!["00000000".to_string(), format!("{:016X}", t.dsdt)], "{dsl}");
    // Boot architecture: no 8042, no legacy devices, no VGA, no CMOS RTC.
    assert_eq!(fields(&dsl, "Legacy Devices Supported (V2)"), vec!["0"], "{dsl}");
    assert_eq!(fields(&dsl, "8042 Present on ports 60/64 (V2)"), vec!["0"], "{dsl}");
    assert_eq!(fields(&dsl, "VGA Not Present (V4)"), vec!["1"], "{dsl}");
    assert_eq!(fields(&dsl, "CMOS RTC Not Present (V5)"), vec!["1"], "{dsl}");

    // Generic addresses: reset, sleep control, sleep status, each a byte in System I/O.
    let block = |title: &str| -> String {
        let start = dsl.find(title).unwrap_or_else(|| panic!("no {title} in {dsl}"));
        dsl[start..].lines().take(6).collect::<Vec<_>>().join("\n")
    };
    for (title, port) in [
        ("Reset Register", ACPI_RESET_PORT),
        ("Sleep Control Register", ACPI_SLEEP_CONTROL_PORT),
        ("Sleep Status Register", ACPI_SLEEP_STATUS_PORT),
    ] {
        let b = block(&format!("{title} : [Generic Address Structure]"));
        assert!(b.contains("01 [SystemIO]"), "{title}: {b}");
        assert!(b.contains(&format!("{port:016X}")), "{title} port {port:#x}: {b}");
        assert!(b.contains("Bit Width : 08"), "{title}: {b}");
    }
    assert_eq!(POWER_OFF_VALUE, 0x34, "SLP_TYP 5 << 2 | SLP_EN");
}

#[test]
fn bad_devices_and_overflow_are_rejected() {
    let mem = guest_memory(4 << 20);
    let bad_gsi = [VirtioMmioSlot { base: 0xd000_0000, size: 0x1000, gsi: IOAPIC_PINS }];
    let e = create_acpi_tables(&mem, 1, &bad_gsi).unwrap_err();
    assert!(matches!(e, AcpiError::BadDevice { index: 0, .. }), "{e}");
    assert!(e.to_string().contains("GSI 24"), "{e}");
    let high = [VirtioMmioSlot::standard(0), VirtioMmioSlot { base: 0x1_0000_0000, size: 0x1000, gsi: 6 }];
    let e = create_acpi_tables(&mem, 1, &high).unwrap_err();
    assert!(matches!(e, AcpiError::BadDevice { index: 1, .. }), "{e}");
    let e = create_acpi_tables(&mem, 0, &[]).unwrap_err();
    assert!(matches!(e, AcpiError::NoVcpus { .. }), "{e}");

    // 4000 devices do not fit below 1 MiB.
    let many: Vec<VirtioMmioSlot> =
        (0..4000).map(|i| VirtioMmioSlot { base: 0xd000_0000 + i * 0x1000, size: 0x1000, gsi: 5 }).collect();
    let e = create_acpi_tables(&mem, 1, &many).unwrap_err();
    assert!(matches!(e, AcpiError::TooLarge { .. }), "{e}");
    assert!(e.to_string().contains("fewer devices"), "{e}");

    // Guest memory that does not reach the ACPI area.
    let small = guest_memory(512 << 10);
    let e = create_acpi_tables(&small, 1, &[]).unwrap_err();
    assert!(matches!(e, AcpiError::GuestMemory { .. }), "{e}");
    assert!(e.to_string().contains("0xe0000"), "{e}");
}
