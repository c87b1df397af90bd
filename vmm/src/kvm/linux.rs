//! The Linux boot path: a stock distribution kernel (bzImage or ELF vmlinux), an optional
//! initramfs and a command line, entered through the 64-bit boot protocol
//! (Documentation/arch/x86/boot.rst), with ACPI tables ([`super::acpi`]) that declare the
//! vCPUs and the virtio-mmio devices.
//!
//! Public API (called by `amsvm boot` after the VM has its memory, in-kernel irqchip and
//! vCPUs; vCPU `i` must be created with KVM vCPU id `i`, which is its APIC id):
//!
//! - [`load`]`(mem, img, vcpus, devices) -> LinuxBoot` writes the kernel, the initrd, the
//!   command line, the zero page (boot_params), identity page tables, the boot GDT and
//!   the ACPI tables into guest memory.
//! - [`setup_vcpu`]`(kvm, vcpu, id, vcpus, boot)` sets CPUID, MSRs and LAPIC LINT0/LINT1
//!   on every vCPU, and registers, segments, control registers and FPU on the boot vCPU
//!   (`boot = Some(..)`). Application processors wait for INIT/SIPI in the in-kernel LAPIC.
//!
//! Guest-physical layout (all in [`layout`]): boot GDT 0x500, zero page 0x7000, page
//! tables 0x9000–0xF000 (identity map of the first 4 GiB with 2 MiB pages), command line
//! 0x20000, ACPI tables 0xE0000–0xFFFEF, a reset stub at the reset vector 0xFFFF0
//! ([`RESET_STUB`]), kernel from 1 MiB, initrd at the top of RAM below
//! 4 GiB and below the kernel's `initrd_addr_max`.
//!
//! The e820 map: RAM below [`layout::EBDA_START`], reserved from there to the ACPI area,
//! ACPI data for [`layout::ACPI_RSDP`]..[`layout::ACPI_END`], RAM from 1 MiB to the end of
//! each RAM region. The boot structures below 640 KiB stay RAM: the kernel copies the zero
//! page and the command line before it allocates memory, its decompressor keeps clear of
//! them, replaces the GDT and page tables early, and reserves the whole first MiB itself.
//! The virtio-mmio window is not listed: it is not RAM, the devices' `_CRS` claim it.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, CAN_USE_HEAP, LOADED_HIGH, QUIET_FLAG,
    XLF_KERNEL_64,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::acpi::{self, AcpiError};
pub use super::acpi::VirtioMmioSlot;
use crate::GuestMemory;

mod cpu;
pub use cpu::{filter_cpuid, setup_vcpu};

#[cfg(test)]
mod tests;

/// Guest-physical layout of a Linux partition (every fixed address the boot path uses).
pub mod layout {
    /// Boot GDT ([`super::cpu::GDT_ENTRIES`] descriptors).
    pub const GDT: u64 = 0x500;
    /// An empty IDT (interrupts stay disabled until the kernel loads its own).
    pub const IDT: u64 = 0x540;
    /// The zero page (`struct boot_params`); `rsi` at entry.
    pub const ZERO_PAGE: u64 = 0x7000;
    /// Initial stack pointer (the kernel switches to its own stack at once).
    pub const BOOT_STACK: u64 = 0x8ff0;
    /// PML4; the PDPT follows, then [`PD_COUNT`] page directories.
    pub const PML4: u64 = 0x9000;
    pub const PDPT: u64 = 0xa000;
    pub const PD: u64 = 0xb000;
    /// Page directories: each maps 1 GiB with 2 MiB pages.
    pub const PD_COUNT: u64 = 4;
    /// End of the page tables (exclusive).
    pub const PAGE_TABLES_END: u64 = PD + PD_COUNT * 0x1000;
    /// The identity map covers guest-physical `0..IDENTITY_MAPPED`.
    pub const IDENTITY_MAPPED: u64 = PD_COUNT << 30;
    /// The kernel command line (NUL-terminated).
    pub const CMDLINE: u64 = 0x2_0000;
    /// Room for the command line including its NUL.
    pub const CMDLINE_AREA: u64 = 0x1_0000;
    /// Start of the extended BIOS data area hole: RAM ends here below 1 MiB.
    pub const EBDA_START: u64 = 0x9_fc00;
    /// The ACPI RSDP; the other tables follow it up to [`ACPI_END`].
    pub const ACPI_RSDP: u64 = 0xe_0000;
    /// End of the ACPI table area (exclusive).
    pub const ACPI_END: u64 = 0x10_0000;
    /// The real-mode reset vector (F000:FFF0), in the last 16 bytes of the ACPI area: a
    /// stub there writes the ACPI reset register ([`super::RESET_STUB`]). The ACPI tables
    /// end below it.
    pub const RESET_VECTOR: u64 = 0xf_fff0;
    /// Load address of the protected-mode kernel (bzImage payload): 1 MiB.
    pub const KERNEL_LOAD: u64 = 0x10_0000;
    /// The initrd ends below this (the 32-bit `ramdisk_image` field).
    pub const INITRD_LIMIT: u64 = 1 << 32;
}

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;
pub const E820_ACPI: u32 = 3;

/// `type_of_loader` value for a boot loader without an assigned id.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode kernel.
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Oldest boot protocol with `xloadflags` (and so a declared 64-bit entry): 2.12.
pub const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// Longest command line for kernels that do not say (x86 `COMMAND_LINE_SIZE` - 1).
pub const DEFAULT_CMDLINE_MAX: usize = 2047;
/// `initrd_addr_max` for kernels that do not say (ELF vmlinux).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

/// What runs at the reset vector (16-bit code): `cli; mov al, ACPI_RESET_VALUE;
/// mov dx, ACPI_RESET_PORT; out dx, al; hlt; jmp` back to the `hlt`. There is no BIOS;
/// this is for Linux's BIOS reboot method. On hardware-reduced ACPI, Linux's default
/// reboot (no `reboot=` on the command line) is EFI even when there is no EFI
/// (`reboot_init` in arch/x86/kernel/reboot.c: `efi_reboot_required()` is true for
/// hardware-reduced ACPI and `efi_runtime_disabled()` false). EFI reboot does nothing,
/// so Linux falls back to BIOS: it writes the CMOS shutdown byte, drops to real mode and
/// jumps to F000:FFF0. Without the stub that jump ran whatever bytes were there and the
/// guest never reset (seen in the nested harness with Debian's 6.1 kernel); with
/// `reboot=k` or `reboot=a` Linux resets through the i8042 or the ACPI reset register.
pub const RESET_STUB: [u8; 10] = {
    use crate::devices::power::{ACPI_RESET_PORT, ACPI_RESET_VALUE};
    let port = (ACPI_RESET_PORT as u16).to_le_bytes();
    [0xfa, 0xb0, ACPI_RESET_VALUE, 0xba, port[0], port[1], 0xee, 0xf4, 0xeb, 0xfd]
};

const HDR_OFFSET: usize = 0x1f1;
const HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const BOOT_FLAG: u16 = 0xaa55;
const PAGE: u64 = 0x1000;

/// What to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxImage {
    /// A bzImage or an uncompressed ELF vmlinux.
    pub kernel: PathBuf,
    /// An initramfs (any format the kernel unpacks), loaded as is.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
}

/// Where [`load`] put things: what the boot vCPU needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxBoot {
    /// 64-bit entry point (`rip`).
    pub entry: u64,
    /// Guest-physical address of the zero page (`rsi`).
    pub boot_params: u64,
    /// Guest-physical address of the ACPI RSDP.
    pub rsdp: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    #[error("kernel {path}: cannot read it: {source}")]
    KernelRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path}: not a bootable x86-64 Linux kernel: {reason}")]
    KernelCorrupt { path: PathBuf, reason: String },
    #[error("kernel {path}: unsupported: {reason}")]
    KernelUnsupported { path: PathBuf, reason: String },
    #[error(
        "kernel {path} does not fit in guest memory: it needs RAM up to {needed:#x} ({} MiB) \
         while booting, the partition has {} MiB contiguous from 0; give it more memory",
        needed.div_ceil(1 << 20), ram >> 20
    )]
    KernelTooLarge { path: PathBuf, needed: u64, ram: u64 },
    #[error("initrd {path}: cannot read it: {source}")]
    InitrdRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path} is empty")]
    InitrdEmpty { path: PathBuf },
    #[error(
        "initrd {path} ({size} bytes) does not fit in guest memory: {room} bytes are free \
         between the kernel ({kernel_end:#x}) and the initrd limit ({limit:#x}); give the \
         partition more memory or use a smaller initrd"
    )]
    InitrdTooLarge { path: PathBuf, size: u64, room: u64, kernel_end: u64, limit: u64 },
    #[error("kernel command line too long: {len} bytes, kernel {path} accepts at most {max}")]
    CmdlineTooLong { path: PathBuf, len: usize, max: usize },
    #[error("kernel command line invalid: {reason}")]
    CmdlineInvalid { reason: String },
    #[error(
        "guest memory too small for Linux: {ram} bytes of RAM contiguous from 0, at least \
         {needed} needed"
    )]
    MemoryTooSmall { ram: u64, needed: u64 },
    #[error("guest memory has too many regions: the e820 map needs {entries} entries, the zero page holds {max}")]
    TooManyRegions { entries: usize, max: usize },
    #[error("cannot write the {what} at guest address {addr:#x}: {source}")]
    GuestMemory {
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("{0}")]
    Acpi(#[from] AcpiError),
    #[error("vCPU {id}: KVM {op} failed: {source}")]
    Kvm {
        id: u8,
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: {msg}")]
    Vcpu { id: u8, msg: String },
}

/// Least RAM (contiguous from 0) before a kernel is even considered: the low boot
/// structures and the first MiB.
pub const MIN_RAM: u64 = 2 << 20;

/// Facts about the loaded kernel that the rest of [`load`] needs.
pub struct LoadedKernel {
    entry: u64,
    /// Setup header to copy into the zero page.
    hdr: setup_header,
    /// End of the memory the kernel uses while booting (decompression buffer included).
    end: u64,
    cmdline_max: usize,
    initrd_addr_max: u64,
}

fn corrupt(path: &Path, reason: impl Into<String>) -> LinuxError {
    LinuxError::KernelCorrupt { path: path.to_owned(), reason: reason.into() }
}

fn unsupported(path: &Path, reason: impl Into<String>) -> LinuxError {
    LinuxError::KernelUnsupported { path: path.to_owned(), reason: reason.into() }
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// End of guest RAM that is contiguous from guest-physical 0 (0 if nothing is at 0).
pub fn contiguous_ram_end(mem: &GuestMemory) -> u64 {
    let mut regions: Vec<(u64, u64)> =
        mem.iter().map(|r| (r.start_addr().0, r.start_addr().0 + r.len())).collect();
    regions.sort();
    let mut end = 0;
    for (s, e) in regions {
        if s > end {
            break;
        }
        end = end.max(e);
    }
    end
}

/// Loads a bzImage: header checks, then linux-loader copies the protected-mode kernel to
/// [`layout::KERNEL_LOAD`].
fn load_bzimage(mem: &GuestMemory, path: &Path, file: &mut File, head: &[u8], ram: u64) -> Result<LoadedKernel, LinuxError> {
    let hdr_size = std::mem::size_of::<setup_header>();
    if head.len() < HDR_OFFSET + hdr_size {
        return Err(corrupt(path, "file too short for a bzImage setup header"));
    }
    let version = le16(head, 0x206);
    if version < MIN_BOOT_PROTOCOL {
        return Err(unsupported(
            path,
            format!(
                "boot protocol {}.{:02} is older than 2.12; amsvm enters the kernel through the 64-bit boot protocol",
                version >> 8,
                version & 0xff
            ),
        ));
    }
    // The header ends at 0x202 + the jump offset at 0x201; what follows is setup code and
    // must not be taken for header fields.
    let hdr_end = (0x202 + head[0x201] as usize).min(HDR_OFFSET + hdr_size);
    let mut raw = head[HDR_OFFSET..HDR_OFFSET + hdr_size].to_vec();
    raw[hdr_end.saturating_sub(HDR_OFFSET)..].fill(0);
    // SAFETY: setup_header is a packed plain-data struct of exactly `hdr_size` bytes;
    // every bit pattern is valid.
    let hdr: setup_header = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };

    let xloadflags = hdr.xloadflags;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(unsupported(path, "no 64-bit entry point (XLF_KERNEL_64 clear): a 32-bit kernel?"));
    }
    if hdr.loadflags & LOADED_HIGH == 0 {
        return Err(unsupported(path, "kernel wants to be loaded low (LOADED_HIGH clear)"));
    }
    let setup_sects = if hdr.setup_sects == 0 { 4 } else { hdr.setup_sects as u64 };
    let setup_size = (setup_sects + 1) * 512;
    let file_len = file.metadata().map_err(|source| LinuxError::KernelRead { path: path.to_owned(), source })?.len();
    if file_len <= setup_size {
        return Err(corrupt(path, format!("no protected-mode kernel after {setup_size} bytes of setup code")));
    }
    let payload = file_len - setup_size;
    let align = hdr.kernel_alignment as u64;
    let pref = hdr.pref_address;
    let init_size = hdr.init_size as u64;
    // The decompressor works in [dest, dest + init_size), dest being the load address
    // rounded up to kernel_alignment but not below pref_address (LOAD_PHYSICAL_ADDR).
    let dest = if hdr.relocatable_kernel != 0 && align.is_power_of_two() {
        layout::KERNEL_LOAD.next_multiple_of(align).max(pref)
    } else {
        pref.max(layout::KERNEL_LOAD)
    };
    let end = (layout::KERNEL_LOAD + payload).max(dest.saturating_add(init_size));
    if end > ram {
        return Err(LinuxError::KernelTooLarge { path: path.to_owned(), needed: end, ram });
    }
    let mut result = BzImage::load(mem, Some(GuestAddress(layout::KERNEL_LOAD)), file, None)
        .map_err(|e| corrupt(path, e.to_string()))?;
    let mut hdr = hdr;
    if let Some(h) = result.setup_header.take() {
        hdr.code32_start = h.code32_start;
    }
    let cmdline_max = if version >= 0x0206 { hdr.cmdline_size as usize } else { 255 };
    let initrd_addr_max = if version >= 0x0203 { hdr.initrd_addr_max as u64 } else { 0x37ff_ffff };
    Ok(LoadedKernel {
        entry: layout::KERNEL_LOAD + BZIMAGE_64BIT_ENTRY_OFFSET,
        hdr,
        end,
        cmdline_max,
        initrd_addr_max,
    })
}

/// Loads an ELF vmlinux at its physical addresses and enters it at its entry point.
fn load_elf(mem: &GuestMemory, path: &Path, file: &mut File, head: &[u8], ram: u64) -> Result<LoadedKernel, LinuxError> {
    if head.len() < 64 {
        return Err(corrupt(path, "file too short for an ELF header"));
    }
    if head[4] != 2 || head[5] != 1 {
        return Err(unsupported(path, "not a little-endian 64-bit ELF file"));
    }
    let machine = le16(head, 0x12);
    if machine != 0x3e {
        return Err(unsupported(path, format!("ELF file for machine {machine:#x}, not x86-64")));
    }
    let phoff = le64(head, 0x20);
    let phentsize = le16(head, 0x36) as u64;
    let phnum = le16(head, 0x38) as u64;
    if phentsize < 56 || phnum == 0 {
        return Err(corrupt(path, "ELF file without program headers"));
    }
    let mut phdrs = vec![0u8; (phentsize * phnum) as usize];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut phdrs))
        .map_err(|e| corrupt(path, format!("cannot read the ELF program headers: {e}")))?;
    let mut end = 0u64;
    let mut loads = 0;
    for ph in phdrs.chunks_exact(phentsize as usize) {
        if le32(ph, 0) != 1 || le64(ph, 0x20) == 0 {
            continue; // not PT_LOAD, or nothing to load
        }
        let paddr = le64(ph, 0x18);
        let memsz = le64(ph, 0x28);
        if paddr < layout::KERNEL_LOAD {
            return Err(unsupported(path, format!("ELF segment at {paddr:#x}, below 1 MiB where the boot structures are")));
        }
        end = end.max(paddr.checked_add(memsz).ok_or_else(|| corrupt(path, "ELF segment size overflows"))?);
        loads += 1;
    }
    if loads == 0 {
        return Err(corrupt(path, "ELF file with nothing to load"));
    }
    if end > ram {
        return Err(LinuxError::KernelTooLarge { path: path.to_owned(), needed: end, ram });
    }
    // vmlinux's entry point is the physical address of startup_64.
    let result = Elf::load(mem, None, file, Some(GuestAddress(layout::KERNEL_LOAD)))
        .map_err(|e| corrupt(path, e.to_string()))?;
    let hdr = setup_header {
        boot_flag: BOOT_FLAG,
        header: HDR_MAGIC,
        kernel_alignment: 0x100_0000,
        ..Default::default()
    };
    Ok(LoadedKernel {
        entry: result.kernel_load.0,
        hdr,
        end,
        cmdline_max: DEFAULT_CMDLINE_MAX,
        initrd_addr_max: DEFAULT_INITRD_ADDR_MAX,
    })
}

/// Loads the kernel, detecting its format from its first bytes.
fn load_kernel(mem: &GuestMemory, path: &Path, ram: u64) -> Result<LoadedKernel, LinuxError> {
    let file = File::open(path).map_err(|source| LinuxError::KernelRead { path: path.to_owned(), source })?;
    load_kernel_from(mem, path, file, ram)
}

/// [`load_kernel`] from an open file (`path` names it in errors); public for fuzzing.
#[doc(hidden)]
pub fn load_kernel_from(mem: &GuestMemory, path: &Path, mut file: File, ram: u64) -> Result<LoadedKernel, LinuxError> {
    let read_err = |source| LinuxError::KernelRead { path: path.to_owned(), source };
    let mut head = Vec::with_capacity(1024);
    (&mut file).take(1024).read_to_end(&mut head).map_err(read_err)?;
    if head.starts_with(b"\x7fELF") {
        load_elf(mem, path, &mut file, &head, ram)
    } else if head.len() >= 0x206 && le32(&head, 0x202) == HDR_MAGIC {
        load_bzimage(mem, path, &mut file, &head, ram)
    } else {
        Err(corrupt(path, "neither an ELF vmlinux (no ELF magic) nor a bzImage (no \"HdrS\" setup header at 0x202)"))
    }
}

/// Loads the initrd at the highest page-aligned address where it ends below the end of
/// RAM, 4 GiB and `addr_max`, and above `kernel_end`. Returns (address, size).
fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    ram: u64,
    kernel_end: u64,
    addr_max: u64,
) -> Result<(u64, u64), LinuxError> {
    let read_err = |source| LinuxError::InitrdRead { path: path.to_owned(), source };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    if size == 0 {
        return Err(LinuxError::InitrdEmpty { path: path.to_owned() });
    }
    let limit = ram.min(layout::INITRD_LIMIT).min(addr_max.saturating_add(1));
    let low = kernel_end.next_multiple_of(PAGE);
    let room = limit.saturating_sub(low);
    let too_large = || LinuxError::InitrdTooLarge { path: path.to_owned(), size, room, kernel_end, limit };
    let start = limit.checked_sub(size).ok_or_else(too_large)? / PAGE * PAGE;
    if start < low {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, size as usize).map_err(|e| match e {
        vm_memory::GuestMemoryError::IOError(source) => LinuxError::InitrdRead { path: path.to_owned(), source },
        source => LinuxError::GuestMemory { what: "initrd", addr: start, source },
    })?;
    Ok((start, size))
}

/// The e820 map for `mem` (see the module doc), sorted, adjacent entries of one type merged.
pub fn e820_map(mem: &GuestMemory) -> Vec<boot_e820_entry> {
    let mut v: Vec<(u64, u64, u32)> = Vec::new();
    for r in mem.iter() {
        let (s, e) = (r.start_addr().0, r.start_addr().0 + r.len());
        if s < layout::EBDA_START {
            v.push((s, e.min(layout::EBDA_START), E820_RAM));
        }
        if e > layout::KERNEL_LOAD {
            v.push((s.max(layout::KERNEL_LOAD), e, E820_RAM));
        }
    }
    v.push((layout::EBDA_START, layout::ACPI_RSDP, E820_RESERVED));
    v.push((layout::ACPI_RSDP, layout::ACPI_END, E820_ACPI));
    v.sort();
    let mut out: Vec<boot_e820_entry> = Vec::new();
    for (s, e, t) in v {
        if let Some(last) = out.last_mut() {
            let (laddr, lsize, ltype) = (last.addr, last.size, last.r#type);
            if ltype == t && laddr + lsize == s {
                last.size = e - laddr;
                continue;
            }
        }
        out.push(boot_e820_entry { addr: s, size: e - s, r#type: t });
    }
    out
}

fn write(mem: &GuestMemory, what: &'static str, addr: u64, bytes: &[u8]) -> Result<(), LinuxError> {
    mem.write_slice(bytes, GuestAddress(addr)).map_err(|source| LinuxError::GuestMemory { what, addr, source })
}

/// Identity page tables for [`layout::IDENTITY_MAPPED`] bytes, 2 MiB pages, supervisor.
fn write_page_tables(mem: &GuestMemory) -> Result<(), LinuxError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    write(mem, "PML4", layout::PML4, &(layout::PDPT | PRESENT_RW).to_le_bytes())?;
    let pdpt: Vec<u8> = (0..layout::PD_COUNT)
        .flat_map(|i| ((layout::PD + i * PAGE) | PRESENT_RW).to_le_bytes())
        .collect();
    write(mem, "PDPT", layout::PDPT, &pdpt)?;
    let pd: Vec<u8> = (0..layout::PD_COUNT * 512)
        .flat_map(|i| ((i << 21) | PAGE_SIZE_2M | PRESENT_RW).to_le_bytes())
        .collect();
    write(mem, "page directories", layout::PD, &pd)
}

/// Loads `img` for `vcpus` vCPUs and `devices` into `mem` (see the module doc).
pub fn load(
    mem: &GuestMemory,
    img: &LinuxImage,
    vcpus: u8,
    devices: &[VirtioMmioSlot],
) -> Result<LinuxBoot, LinuxError> {
    let ram = contiguous_ram_end(mem);
    if ram < MIN_RAM {
        return Err(LinuxError::MemoryTooSmall { ram, needed: MIN_RAM });
    }
    if vcpus == 0 {
        return Err(AcpiError::NoVcpus { vcpus }.into());
    }
    // The kernel's header says how long its command line may be, so it comes first.
    let kernel = load_kernel(mem, &img.kernel, ram)?;
    let max = kernel.cmdline_max.min(layout::CMDLINE_AREA as usize - 1);
    let text = img.cmdline.trim();
    if text.len() > max {
        return Err(LinuxError::CmdlineTooLong { path: img.kernel.clone(), len: text.len(), max });
    }
    let mut cmdline = Cmdline::new(max + 1).map_err(|e| LinuxError::CmdlineInvalid { reason: e.to_string() })?;
    cmdline.insert_str(text).map_err(|e| LinuxError::CmdlineInvalid { reason: e.to_string() })?;
    let cmdline = cmdline.as_cstring().map_err(|e| LinuxError::CmdlineInvalid { reason: e.to_string() })?;
    write(mem, "command line", layout::CMDLINE, cmdline.as_bytes_with_nul())?;

    let initrd = match &img.initrd {
        Some(path) => Some(load_initrd(mem, path, ram, kernel.end, kernel.initrd_addr_max)?),
        None => None,
    };
    let tables = acpi::create_acpi_tables(mem, vcpus, devices)?;

    let mut params = boot_params { hdr: kernel.hdr, ..Default::default() };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.loadflags = (params.hdr.loadflags | LOADED_HIGH) & !(CAN_USE_HEAP | QUIET_FLAG);
    params.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    params.ext_cmd_line_ptr = 0;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.hdr.setup_data = 0;
    params.hdr.hardware_subarch = 0;
    params.acpi_rsdp_addr = tables.rsdp;
    let e820 = e820_map(mem);
    if e820.len() > params.e820_table.len() {
        return Err(LinuxError::TooManyRegions { entries: e820.len(), max: params.e820_table.len() });
    }
    params.e820_entries = e820.len() as u8;
    params.e820_table[..e820.len()].copy_from_slice(&e820);
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE))
        .map_err(|source| LinuxError::GuestMemory { what: "zero page", addr: layout::ZERO_PAGE, source })?;

    write_page_tables(mem)?;
    let gdt: Vec<u8> = cpu::gdt().iter().flat_map(|e| e.to_le_bytes()).collect();
    write(mem, "GDT", layout::GDT, &gdt)?;
    write(mem, "IDT", layout::IDT, &0u64.to_le_bytes())?;
    write(mem, "reset vector", layout::RESET_VECTOR, &RESET_STUB)?;

    Ok(LinuxBoot { entry: kernel.entry, boot_params: layout::ZERO_PAGE, rsdp: tables.rsdp })
}
