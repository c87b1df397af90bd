//! ACPI tables for Linux partitions, built with the `acpi_tables` crate.
//!
//! A stock distribution kernel (no MPPARSE, virtio-mmio as a module, no virtio-mmio
//! devices on the command line) learns about the machine only from ACPI:
//!
//! - **RSDP** at [`layout::ACPI_RSDP`] (also found by the BIOS-area scan of
//!   0xE0000–0xFFFFF), revision 2, pointing to the XSDT.
//! - **XSDT** listing the FADT and the MADT (the DSDT is reached through the FADT, as the
//!   specification wants).
//! - **FADT** (revision 6.5), *hardware-reduced*: no PM1 blocks, no SCI, no FACS. Power
//!   off goes through `SLEEP_CONTROL_REG` (port [`ACPI_SLEEP_CONTROL_PORT`]: Linux writes
//!   `SLP_TYP << 2 | SLP_EN`, i.e. [`POWER_OFF_VALUE`] for S5), `SLEEP_STATUS_REG` is
//!   [`ACPI_SLEEP_STATUS_PORT`], reset writes [`ACPI_RESET_VALUE`] to `RESET_REG`
//!   ([`ACPI_RESET_PORT`]). `X_DSDT` points to the DSDT. IAPC_BOOT_ARCH says: no VGA, no
//!   8042, no CMOS RTC, no MSI, no legacy ISA devices beyond those the DSDT declares.
//! - **MADT**: one enabled Processor Local APIC per vCPU (APIC id = ACPI uid = vCPU
//!   index, which is the KVM vCPU id), the I/O APIC at [`IOAPIC_ADDR`] with GSI base 0.
//!   No interrupt source override: a hardware-reduced kernel drives neither the PIT nor
//!   the 8259, there is no SCI, and every device interrupt is identity-mapped (GSI = I/O
//!   APIC pin, KVM's default routing).
//! - **DSDT**: COM1 (`PNP0501`, ports 0x3f8–0x3ff, IRQ 4), one `LNRO0005` device per
//!   virtio-mmio slot (`_UID` = slot index, `Memory32Fixed` window, edge/active-high
//!   `Interrupt` with its GSI), and `\_S5_` so that ACPI power-off works. No processor
//!   objects: Linux enumerates CPUs from the MADT.
//!
//! All tables live in `[ACPI_RSDP, ACPI_END)`, below 1 MiB, which the e820 map built by
//! [`super::linux`] marks as ACPI data.

use acpi_tables::aml::{
    self, Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate,
    Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

pub use crate::devices::power::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_S5_SLP_TYP, ACPI_SLEEP_CONTROL_PORT,
    ACPI_SLEEP_STATUS_PORT,
};
use super::linux::layout;
use crate::GuestMemory;

#[cfg(test)]
mod tests;

/// OEM id written in every table header.
pub const OEM_ID: [u8; 6] = *b"AMSVM ";
/// OEM table id written in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"AMSVMPAR";
/// OEM revision written in every table header.
pub const OEM_REVISION: u32 = 1;

/// Local APIC base address (architectural default).
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// I/O APIC base address (KVM's in-kernel I/O APIC).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// I/O APIC id (KVM's in-kernel I/O APIC resets its id register to 0).
pub const IOAPIC_ID: u8 = 0;
/// Pins of KVM's in-kernel I/O APIC: GSIs 0..24.
pub const IOAPIC_PINS: u32 = 24;

/// COM1 base port and IRQ as the DSDT declares them.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

/// `SLP_EN`, bit 5 of the sleep control register.
pub const SLP_EN: u8 = 1 << 5;
/// The byte Linux writes to [`ACPI_SLEEP_CONTROL_PORT`] to power off (S5).
pub const POWER_OFF_VALUE: u8 = (ACPI_S5_SLP_TYP << 2) | SLP_EN;

/// IAPC_BOOT_ARCH bits (ACPI 6.5 table 5.11).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// No `LEGACY_DEVICES` (bit 0) and no `8042` (bit 1): the only legacy device, COM1, is
/// declared in the DSDT.
pub const IAPC_BOOT_ARCH: u16 = IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT;

/// Tables are placed on this alignment.
const TABLE_ALIGN: u64 = 16;

/// One virtio-mmio device as ACPI declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    /// Guest-physical base of its register window (below 4 GiB).
    pub base: u64,
    /// Size of the window.
    pub size: u64,
    /// Its GSI (an I/O APIC pin, below [`IOAPIC_PINS`]); edge-triggered, active high.
    pub gsi: u32,
}

impl VirtioMmioSlot {
    /// Slot `i` of the standard partition layout (`amsvm_abi::layout`).
    pub fn standard(i: usize) -> Self {
        use amsvm_abi::layout::{FIRST_DEVICE_IRQ, MMIO_BASE, MMIO_SIZE};
        VirtioMmioSlot { base: MMIO_BASE + i as u64 * MMIO_SIZE, size: MMIO_SIZE, gsi: FIRST_DEVICE_IRQ + i as u32 }
    }
}

/// Guest-physical addresses of the tables written by [`create_acpi_tables`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    pub rsdp: u64,
    pub xsdt: u64,
    pub fadt: u64,
    pub madt: u64,
    pub dsdt: u64,
    /// First byte after the last table.
    pub end: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables need {vcpus} vCPUs to be between 1 and 255")]
    NoVcpus { vcpus: u8 },
    #[error(
        "virtio-mmio device {index} (window {base:#x}+{size:#x}, GSI {gsi}) cannot be declared in \
         ACPI: the window must be non-empty and below 4 GiB and the GSI below {IOAPIC_PINS}"
    )]
    BadDevice { index: usize, base: u64, size: u64, gsi: u32 },
    #[error(
        "ACPI tables need {needed} bytes but the ACPI area {start:#x}..{end:#x} holds {room}; \
         declare fewer devices or vCPUs"
    )]
    TooLarge { needed: u64, room: u64, start: u64, end: u64 },
    #[error("cannot write the ACPI {table} at guest address {addr:#x}: {source} (is guest RAM at least 1 MiB?)")]
    GuestMemory {
        table: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// AML bytes already encoded, usable as a child of a scope.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn aml_bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// AML of the COM1 device.
fn com1_aml() -> Vec<u8> {
    let hid = EISAName::new("PNP0501");
    let uid: u8 = 1;
    let io = IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    aml_bytes(&Device::new(
        "COM1".into(),
        vec![&Name::new("_HID".into(), &hid), &Name::new("_UID".into(), &uid), &Name::new("_CRS".into(), &crs)],
    ))
}

/// AML of the virtio-mmio device in slot `index`.
fn virtio_aml(index: usize, slot: &VirtioMmioSlot) -> Vec<u8> {
    let name = format!("V{index:03X}");
    let uid = index as u32;
    let mem = Memory32Fixed::new(true, slot.base as u32, slot.size as u32);
    let irq = Interrupt::new(true, true, false, false, slot.gsi);
    let crs = ResourceTemplate::new(vec![&mem, &irq]);
    aml_bytes(&Device::new(
        Path::new(&name),
        vec![
            &Name::new("_HID".into(), &"LNRO0005"),
            &Name::new("_UID".into(), &uid),
            &Name::new("_CCA".into(), &aml::ONE),
            &Name::new("_CRS".into(), &crs),
        ],
    ))
}

fn check_devices(devices: &[VirtioMmioSlot]) -> Result<(), AcpiError> {
    for (index, d) in devices.iter().enumerate() {
        let end = d.base.checked_add(d.size);
        if d.size == 0 || end.is_none_or(|e| e > 1 << 32) || d.gsi >= IOAPIC_PINS {
            return Err(AcpiError::BadDevice { index, base: d.base, size: d.size, gsi: d.gsi });
        }
    }
    Ok(())
}

/// The DSDT, as bytes.
pub fn dsdt(devices: &[VirtioMmioSlot]) -> Result<Vec<u8>, AcpiError> {
    check_devices(devices)?;
    let mut children: Vec<Raw> = vec![Raw(com1_aml())];
    children.extend(devices.iter().enumerate().map(|(i, d)| Raw(virtio_aml(i, d))));
    let refs: Vec<&dyn Aml> = children.iter().map(|c| c as &dyn Aml).collect();
    let sb = Scope::new("_SB_".into(), refs);
    let s5 = Name::new("_S5_".into(), &Package::new(vec![&ACPI_S5_SLP_TYP, &0u8, &0u8, &0u8]));

    let mut table = acpi_tables::sdt::Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.append_slice(&aml_bytes(&sb));
    table.append_slice(&aml_bytes(&s5));
    Ok(table.as_slice().to_vec())
}

/// The FADT (hardware-reduced), as bytes, pointing to the DSDT at `dsdt_addr`.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io_byte = |port: u64| GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port);
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt_addr);
    b.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    b.reset_reg = io_byte(ACPI_RESET_PORT);
    b.reset_value = ACPI_RESET_VALUE;
    b.sleep_control_reg = io_byte(ACPI_SLEEP_CONTROL_PORT);
    b.sleep_status_reg = io_byte(ACPI_SLEEP_STATUS_PORT);
    aml_bytes(&b.finalize())
}

/// The MADT for `vcpus` vCPUs, as bytes.
pub fn madt(vcpus: u8) -> Vec<u8> {
    let mut m = MADT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION, LocalInterruptController::Address(LAPIC_ADDR));
    for id in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(IOAPIC_ID, IOAPIC_ADDR, 0));
    aml_bytes(&m)
}

fn align(x: u64) -> u64 {
    x.div_ceil(TABLE_ALIGN) * TABLE_ALIGN
}

/// Builds RSDP, XSDT, FADT, MADT and DSDT for `vcpus` vCPUs and `devices`, and writes
/// them into `mem` at [`layout::ACPI_RSDP`] and after.
pub fn create_acpi_tables(
    mem: &GuestMemory,
    vcpus: u8,
    devices: &[VirtioMmioSlot],
) -> Result<AcpiTables, AcpiError> {
    if vcpus == 0 {
        return Err(AcpiError::NoVcpus { vcpus });
    }
    let dsdt_bytes = dsdt(devices)?;
    let madt_bytes = madt(vcpus);

    let rsdp = layout::ACPI_RSDP;
    let dsdt_addr = align(rsdp + Rsdp::len() as u64);
    let fadt_bytes = fadt(dsdt_addr);
    let fadt_addr = align(dsdt_addr + dsdt_bytes.len() as u64);
    let madt_addr = align(fadt_addr + fadt_bytes.len() as u64);
    let xsdt_addr = align(madt_addr + madt_bytes.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_bytes = aml_bytes(&xsdt);
    let end = xsdt_addr + xsdt_bytes.len() as u64;
    // The last 16 bytes of the area hold the reset vector's stub.
    if end > layout::RESET_VECTOR {
        return Err(AcpiError::TooLarge {
            needed: end - rsdp,
            room: layout::RESET_VECTOR - rsdp,
            start: rsdp,
            end: layout::RESET_VECTOR,
        });
    }
    let rsdp_bytes = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    for (table, addr, bytes) in [
        ("RSDP", rsdp, &rsdp_bytes),
        ("DSDT", dsdt_addr, &dsdt_bytes),
        ("FADT", fadt_addr, &fadt_bytes),
        ("MADT", madt_addr, &madt_bytes),
        ("XSDT", xsdt_addr, &xsdt_bytes),
    ] {
        if !mem.check_range(GuestAddress(addr), bytes.len()) {
            return Err(AcpiError::GuestMemory {
                table,
                addr,
                source: vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(addr)),
            });
        }
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| AcpiError::GuestMemory { table, addr, source })?;
    }
    Ok(AcpiTables { rsdp, xsdt: xsdt_addr, fadt: fadt_addr, madt: madt_addr, dsdt: dsdt_addr, end })
}
