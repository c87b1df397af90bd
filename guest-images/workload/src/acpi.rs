//! How to power off, from the firmware's ACPI tables (off amsvm only): RSDP → RSDT/XSDT →
//! FADT → the sleep control register (hardware-reduced ACPI: QEMU's microvm, amsvm's
//! Linux loader, Cloud Hypervisor) or PM1a_CNT, and the S5 sleep type from the DSDT's
//! `_S5_` package. Read once at boot, before the workload reuses free RAM (the tables may
//! lie there). Every address is checked to lie in the identity-mapped first 4 GiB; what
//! does not parse gives [`PowerOff::None`] and the workload halts instead.

use crate::platform::PowerOff;

/// The identity map of the CPL0 entries covers the first 4 GiB.
const MAPPED: u64 = 1 << 32;
/// Largest table read (a sanity bound on guest-written lengths).
const MAX_TABLE: u64 = 1 << 20;
const SDT_HEADER: u64 = 36;

fn mapped(addr: u64, len: u64) -> bool {
    addr != 0 && addr.checked_add(len).is_some_and(|end| end <= MAPPED)
}

fn u8_at(addr: u64) -> u8 {
    // SAFETY: callers check `mapped` first; the first 4 GiB are identity-mapped and
    // readable at CPL3 (an unbacked address reads as the VMM decides).
    unsafe { (addr as *const u8).read_volatile() }
}

fn u32_at(addr: u64) -> u32 {
    u32::from_le_bytes([u8_at(addr), u8_at(addr + 1), u8_at(addr + 2), u8_at(addr + 3)])
}

fn u64_at(addr: u64) -> u64 {
    u32_at(addr) as u64 | ((u32_at(addr + 4) as u64) << 32)
}

fn bytes_eq(addr: u64, want: &[u8]) -> bool {
    want.iter().enumerate().all(|(i, &b)| u8_at(addr + i as u64) == b)
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(u8_at(addr + i))) == 0
}

fn is_rsdp(addr: u64) -> bool {
    mapped(addr, 36) && bytes_eq(addr, b"RSD PTR ") && checksum_ok(addr, 20)
}

/// The RSDP: at `hint` (the boot protocol's pointer) or in the BIOS areas.
fn find_rsdp(hint: u64) -> Option<u64> {
    if is_rsdp(hint) {
        return Some(hint);
    }
    let ebda = (u8_at(0x40e) as u64 | (u8_at(0x40f) as u64) << 8) << 4;
    let ebda = (0x400..0xa0000).contains(&ebda).then_some((ebda, ebda + 1024));
    ebda.into_iter().chain([(0xe0000, 0x100000)]).find_map(|(from, to)| (from..to).step_by(16).find(|&a| is_rsdp(a)))
}

/// Address and length of a table whose header at `addr` is sane.
fn table(addr: u64) -> Option<(u64, u64)> {
    if !mapped(addr, SDT_HEADER) {
        return None;
    }
    let len = u32_at(addr + 4) as u64;
    ((SDT_HEADER..=MAX_TABLE).contains(&len) && mapped(addr, len)).then_some((addr, len))
}

/// The table with `signature` listed in the RSDT or XSDT.
fn find_table(rsdp: u64, signature: &[u8; 4]) -> Option<(u64, u64)> {
    let xsdt = if u8_at(rsdp + 15) >= 2 { u64_at(rsdp + 24) } else { 0 };
    let (root, entry) = if xsdt != 0 { (xsdt, 8) } else { (u32_at(rsdp + 16) as u64, 4) };
    let (root, len) = table(root)?;
    (SDT_HEADER..len)
        .step_by(entry as usize)
        .take_while(|off| off + entry <= len)
        .map(|off| if entry == 8 { u64_at(root + off) } else { u32_at(root + off) as u64 })
        .filter_map(table)
        .find(|&(t, _)| bytes_eq(t, signature))
}

/// SLP_TYP of S5 from the DSDT's `Name (_S5_, Package () { typ, ... })`.
fn s5_sleep_type(dsdt: u64, len: u64) -> Option<u8> {
    let at = (SDT_HEADER..len.saturating_sub(8)).find(|&o| bytes_eq(dsdt + o, b"_S5_") && u8_at(dsdt + o + 4) == 0x12)?;
    // PackageOp, PkgLength (1 + lead bits 7:6 bytes), NumElements, then the first element.
    let pkg_len_bytes = 1 + (u8_at(dsdt + at + 5) >> 6) as u64;
    let first = at + 5 + pkg_len_bytes + 1;
    if first + 2 > len {
        return None;
    }
    match u8_at(dsdt + first) {
        0x0a => Some(u8_at(dsdt + first + 1)), // BytePrefix
        0x00 => Some(0),                       // ZeroOp
        0x01 => Some(1),                       // OneOp
        _ => None,
    }
}

/// How to power off, or [`PowerOff::None`].
pub fn find_power_off(rsdp_hint: u64) -> PowerOff {
    find(rsdp_hint).unwrap_or(PowerOff::None)
}

/// The FADT and the DSDT it names.
fn fadt_and_dsdt(rsdp_hint: u64) -> Option<((u64, u64), (u64, u64))> {
    let rsdp = find_rsdp(rsdp_hint)?;
    let (fadt, len) = find_table(rsdp, b"FACP")?;
    let x_dsdt = if len >= 148 { u64_at(fadt + 140) } else { 0 };
    let dsdt = if x_dsdt != 0 { x_dsdt } else { u32_at(fadt + 40) as u64 };
    Some(((fadt, len), table(dsdt)?))
}

/// Whether the DSDT contains `what` (e.g. a _HID).
pub fn dsdt_mentions(rsdp_hint: u64, what: &[u8]) -> bool {
    fadt_and_dsdt(rsdp_hint).is_some_and(|(_, (dsdt, len))| (0..len.saturating_sub(what.len() as u64)).any(|o| bytes_eq(dsdt + o, what)))
}

fn find(rsdp_hint: u64) -> Option<PowerOff> {
    let ((fadt, len), (dsdt, dsdt_len)) = fadt_and_dsdt(rsdp_hint)?;
    let typ = s5_sleep_type(dsdt, dsdt_len)? & 7;
    const HW_REDUCED: u32 = 1 << 20;
    if u32_at(fadt + 112) & HW_REDUCED != 0 {
        // SLEEP_CONTROL_REG: a generic address structure; SLP_TYP in bits 4:2, SLP_EN bit 5.
        if len < 256 {
            return None;
        }
        let gas = fadt + 244;
        let (space, addr) = (u8_at(gas), u64_at(gas + 4));
        let value = (typ << 2) | (1 << 5);
        return match space {
            0 if mapped(addr, 1) => Some(PowerOff::Mem { addr, value }),
            1 if addr != 0 && addr <= 0xffff => Some(PowerOff::Io { port: addr as u16, value: value as u16, width: 1 }),
            _ => None,
        };
    }
    // PM1a_CNT: SLP_TYP in bits 12:10, SLP_EN bit 13.
    let x_pm1a = if len >= 184 && u8_at(fadt + 172) == 1 { u64_at(fadt + 176) } else { 0 };
    let port = if x_pm1a != 0 { x_pm1a } else { u32_at(fadt + 64) as u64 };
    (port != 0 && port <= 0xffff).then_some(PowerOff::Io { port: port as u16, value: ((typ as u16) << 10) | (1 << 13), width: 2 })
}
