//! Booting a native image: an ELF64 unikernel entered directly at CPL3 (see
//! `docs/native-abi.md` and `amsvm_abi`). amsvm builds identity page tables with the user
//! bit set, a GDT with DPL3 segments and a TSS, writes the boot-info page and enters the
//! image with IOPL=3 and interrupts disabled. No guest CPL0 code ever runs.

use std::io::Cursor;
use std::path::Path;

use amsvm_abi::{layout, BootInfo, DeviceInfo, WorkloadParams};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment};
use kvm_ioctls::{Kvm, VcpuFd};
use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use crate::{Error, GuestMemory, Result};

/// `#[repr(transparent)]` wrapper that lets vm-memory copy the abi's plain-data structs.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct Pod<T>(pub T);
// SAFETY: BootInfo, Mailbox and their members are #[repr(C)] structs of u64/u32/u16
// fields laid out without padding (checked by `abi_structs_have_no_padding`), so every
// byte pattern is a valid value and no uninitialised byte is ever read.
unsafe impl ByteValued for Pod<BootInfo> {}
// SAFETY: as above.
unsafe impl ByteValued for Pod<amsvm_abi::Mailbox> {}

/// Where a loaded native image lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedImage {
    pub entry: u64,
    /// End of the highest loadable segment (memsz included).
    pub end: u64,
}

fn image_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Image { path: path.to_path_buf(), msg: msg.into() }
}

/// Check an ELF image before loading: ELF64, little endian, x86-64, executable, with
/// every loadable segment (memsz included) inside `[IMAGE_MIN, mem_bytes)` and the entry
/// point inside a loadable segment. `path` only names the image in errors.
pub fn check_elf(path: &Path, bytes: &[u8], mem_bytes: u64) -> Result<LoadedImage> {
    let u16_at = |o: usize| bytes.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| bytes.get(o..o + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    let u64_at = |o: usize| bytes.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Err(image_err(path, "not an ELF file (bad magic or shorter than an ELF header)"));
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err(image_err(path, "not a little-endian ELF64 image"));
    }
    if u16_at(18) != Some(62) {
        return Err(image_err(path, "not an x86-64 image (e_machine is not EM_X86_64)"));
    }
    if u16_at(16) != Some(2) {
        return Err(image_err(path, "not an executable (e_type is not ET_EXEC; native images are static, non-PIE)"));
    }
    let entry = u64_at(24).unwrap();
    let phoff = u64_at(32).unwrap();
    let phentsize = u16_at(54).unwrap() as u64;
    let phnum = u16_at(56).unwrap() as u64;
    if phentsize != 56 || phnum == 0 {
        return Err(image_err(path, "corrupt program header table"));
    }
    let mut end = 0u64;
    let mut entry_ok = false;
    for i in 0..phnum {
        let off = phoff
            .checked_add(i * phentsize)
            .filter(|o| o.checked_add(phentsize).is_some_and(|e| e <= bytes.len() as u64))
            .ok_or_else(|| image_err(path, "program header table lies outside the file (truncated image?)"))?
            as usize;
        if u32_at(off) != Some(1) {
            continue; // not PT_LOAD
        }
        let p_offset = u64_at(off + 8).unwrap();
        let p_paddr = u64_at(off + 24).unwrap();
        let p_filesz = u64_at(off + 32).unwrap();
        let p_memsz = u64_at(off + 40).unwrap();
        if p_filesz > p_memsz || p_offset.checked_add(p_filesz).is_none_or(|e| e > bytes.len() as u64) {
            return Err(image_err(path, format!("segment at {p_paddr:#x} lies outside the file (truncated image?)")));
        }
        let seg_end = p_paddr
            .checked_add(p_memsz)
            .ok_or_else(|| image_err(path, format!("segment at {p_paddr:#x} overflows the address space")))?;
        if p_paddr < layout::IMAGE_MIN {
            return Err(image_err(
                path,
                format!("segment at {p_paddr:#x} is below {:#x}, where native images must start", layout::IMAGE_MIN),
            ));
        }
        if seg_end > mem_bytes {
            return Err(image_err(
                path,
                format!(
                    "image does not fit in guest memory: segment {p_paddr:#x}..{seg_end:#x} ends beyond {} MiB of RAM",
                    mem_bytes >> 20
                ),
            ));
        }
        entry_ok |= (p_paddr..seg_end).contains(&entry);
        end = end.max(seg_end);
    }
    if end == 0 {
        return Err(image_err(path, "no loadable segment"));
    }
    if !entry_ok {
        return Err(image_err(path, format!("entry point {entry:#x} is not inside a loadable segment")));
    }
    Ok(LoadedImage { entry, end })
}

/// Load a native image into guest memory (after [`check_elf`]).
pub fn load_elf(mem: &GuestMemory, path: &Path, bytes: &[u8]) -> Result<LoadedImage> {
    let mem_bytes = vm_memory::GuestMemoryBackend::last_addr(mem).0 + 1;
    let img = check_elf(path, bytes, mem_bytes)?;
    let mut cursor = Cursor::new(bytes);
    Elf::load(mem, None, &mut cursor, Some(GuestAddress(layout::IMAGE_MIN)))
        .map_err(|e| image_err(path, format!("cannot load: {e}")))?;
    Ok(img)
}

const PTE_P: u64 = 1;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_PWT: u64 = 1 << 3;
const PTE_PCD: u64 = 1 << 4;
const PTE_PS: u64 = 1 << 7;

/// Identity-map the first 4 GiB with 2 MiB user pages: RAM write-back, the device
/// window (from `MAX_RAM` up) uncached. PML4 at PAGE_TABLES, PDPT next, 4 PDs after.
pub fn write_page_tables(mem: &GuestMemory) -> Result<()> {
    let pml4 = layout::PAGE_TABLES;
    let pdpt = pml4 + 0x1000;
    let pd0 = pdpt + 0x1000;
    let w = |v: u64, a: u64| mem.write_obj(v, GuestAddress(a)).map_err(|source| Error::GuestAccess { addr: a, source });
    w(pdpt | PTE_P | PTE_RW | PTE_US, pml4)?;
    for g in 0..4u64 {
        w((pd0 + g * 0x1000) | PTE_P | PTE_RW | PTE_US, pdpt + g * 8)?;
        for i in 0..512u64 {
            let addr = (g << 30) | (i << 21);
            let cache = if addr >= layout::MAX_RAM { PTE_PCD | PTE_PWT } else { 0 };
            w(addr | PTE_P | PTE_RW | PTE_US | PTE_PS | cache, pd0 + g * 0x1000 + i * 8)?;
        }
    }
    debug_assert!(pd0 + 4 * 0x1000 <= layout::PAGE_TABLES_END);
    Ok(())
}

/// GDT selectors. Index 3 and 4 are the DPL3 code and data segments the image runs with.
const SEL_USER_CODE: u16 = (3 << 3) | 3;
const SEL_USER_DATA: u16 = (4 << 3) | 3;
const SEL_TSS: u16 = 5 << 3;
const GDT_ENTRIES: u64 = 7;
/// The 64-bit TSS proper is 0x68 bytes; its I/O-map base points right after it.
const TSS_SIZE: u64 = 0x68;
/// One bit per port (65536 ports) plus the all-ones terminator byte the CPU may read.
const IO_BITMAP_BYTES: u64 = 65536 / 8 + 1;
const TSS_LIMIT: u64 = TSS_SIZE + IO_BITMAP_BYTES - 1;

/// Write the GDT (null, kernel code/data, user code/data, 16-byte TSS descriptor) and a
/// 64-bit TSS whose I/O permission bitmap allows every port to CPL3 (all bits clear).
pub fn write_gdt(mem: &GuestMemory) -> Result<()> {
    let tss = layout::TSS;
    let tss_lo = (TSS_LIMIT & 0xffff)
        | ((tss & 0xff_ffff) << 16)
        | (0x8b << 40)
        | (((TSS_LIMIT >> 16) & 0xf) << 48)
        | (((tss >> 24) & 0xff) << 56);
    let tss_hi = tss >> 32;
    let gdt: [u64; GDT_ENTRIES as usize] = [
        0,
        0x00af_9b00_0000_ffff, // kernel code64 (unused: nothing runs at CPL0)
        0x00cf_9300_0000_ffff, // kernel data
        0x00af_fb00_0000_ffff, // user code64, DPL3
        0x00cf_f300_0000_ffff, // user data, DPL3
        tss_lo,
        tss_hi,
    ];
    for (i, e) in gdt.iter().enumerate() {
        let a = layout::GDT + i as u64 * 8;
        mem.write_obj(*e, GuestAddress(a)).map_err(|source| Error::GuestAccess { addr: a, source })?;
    }
    let mut t = vec![0u8; (TSS_SIZE + IO_BITMAP_BYTES) as usize];
    // I/O map base (offset 0x66): the bitmap follows the TSS.
    t[0x66..0x68].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
    *t.last_mut().unwrap() = 0xff;
    mem.write_slice(&t, GuestAddress(tss)).map_err(|source| Error::GuestAccess { addr: tss, source })?;
    Ok(())
}

/// Everything the boot-info page says about a partition.
pub struct BootInfoSpec<'a> {
    pub partition_id: u32,
    pub vcpus: u32,
    pub mem_bytes: u64,
    pub image_end: u64,
    pub devices: &'a [DeviceInfo],
    pub workload: WorkloadParams,
}

/// Write the boot-info page.
pub fn write_boot_info(mem: &GuestMemory, s: &BootInfoSpec) -> Result<BootInfo> {
    let mut bi = BootInfo::empty();
    bi.partition_id = s.partition_id;
    bi.vcpus = s.vcpus;
    bi.mem_bytes = s.mem_bytes;
    bi.free_start = s.image_end.next_multiple_of(4096);
    bi.free_end = s.mem_bytes;
    let n = s.devices.len().min(layout::MAX_DEVICES);
    bi.device_count = n as u32;
    bi.devices[..n].copy_from_slice(&s.devices[..n]);
    bi.workload = s.workload;
    mem.write_obj(Pod(bi), GuestAddress(layout::BOOT_INFO))
        .map_err(|source| Error::GuestAccess { addr: layout::BOOT_INFO, source })?;
    Ok(bi)
}

fn user_seg(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl: 3,
        db: if code { 0 } else { 1 },
        s: 1,
        l: if code { 1 } else { 0 },
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_SCE: u64 = 1;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IOPL3: u64 = 3 << 12;

/// Set up vCPU 0 to enter the image at CPL3: long mode, paging, DPL3 segments, IOPL=3,
/// interrupts off, SSE on; rip = entry, rsp = STACK_TOP, rdi = boot-info page.
pub fn setup_vcpu(kvm: &Kvm, vcpu: &VcpuFd, entry: u64) -> Result<()> {
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(Error::kvm("KVM_SET_CPUID2"))?;

    let mut sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    sregs.cs = user_seg(SEL_USER_CODE, true);
    let data = user_seg(SEL_USER_DATA, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: layout::TSS,
        limit: TSS_LIMIT as u32,
        selector: SEL_TSS,
        type_: 11,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    // No IDT: any exception escalates to a triple fault, which amsvm reports.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = layout::PAGE_TABLES;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_SCE | EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(Error::kvm("KVM_SET_SREGS"))?;

    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(Error::kvm("KVM_SET_FPU"))?;

    let regs = kvm_regs {
        rip: entry,
        rsp: layout::STACK_TOP,
        rdi: layout::BOOT_INFO,
        rflags: RFLAGS_RESERVED | RFLAGS_IOPL3,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))?;
    Ok(())
}

/// Prepare guest memory for a native image: page tables, GDT/TSS, the image, boot info.
pub fn prepare(mem: &GuestMemory, path: &Path, image: &[u8], spec: BootInfoSpec) -> Result<LoadedImage> {
    write_page_tables(mem)?;
    write_gdt(mem)?;
    let img = load_elf(mem, path, image)?;
    write_boot_info(mem, &BootInfoSpec { image_end: img.end, ..spec })?;
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_structs_have_no_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<DeviceInfo>(), 8 + 8 + 4 + 4);
        assert_eq!(size_of::<WorkloadParams>(), 10 * 8 + 12 * 4);
        assert_eq!(size_of::<BootInfo>(), 64 + 24 * layout::MAX_DEVICES + size_of::<WorkloadParams>());
        assert_eq!(size_of::<amsvm_abi::Mailbox>(), 8 * 8 + size_of::<amsvm_abi::Progress>() + 8 * amsvm_abi::LATENCY_BUCKETS);
    }

    fn tiny_elf(paddr: u64, memsz: u64, entry: u64) -> Vec<u8> {
        let mut b = vec![0u8; 0x1000];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes());
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[52..54].copy_from_slice(&64u16.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        b[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        b[ph + 8..ph + 16].copy_from_slice(&0x800u64.to_le_bytes());
        b[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
        b[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        b[ph + 32..ph + 40].copy_from_slice(&0x100u64.to_le_bytes());
        b[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        b[0x800] = 0xe6; // out 0x80, al
        b
    }

    #[test]
    fn elf_checks_name_the_problem() {
        let p = Path::new("img.elf");
        let ok = check_elf(p, &tiny_elf(0x20_0000, 0x1000, 0x20_0000), 16 << 20).unwrap();
        assert_eq!(ok, LoadedImage { entry: 0x20_0000, end: 0x20_1000 });
        let e = check_elf(p, b"garbage garbage garbage", 16 << 20).unwrap_err().to_string();
        assert!(e.contains("img.elf") && e.contains("not an ELF"), "{e}");
        let e = check_elf(p, &tiny_elf(0x10_0000, 0x1000, 0x10_0000), 16 << 20).unwrap_err().to_string();
        assert!(e.contains("below"), "{e}");
        let e = check_elf(p, &tiny_elf(0x20_0000, 64 << 20, 0x20_0000), 16 << 20).unwrap_err().to_string();
        assert!(e.contains("does not fit in guest memory"), "{e}");
        let e = check_elf(p, &tiny_elf(0x20_0000, 0x1000, 0x30_0000), 16 << 20).unwrap_err().to_string();
        assert!(e.contains("entry point"), "{e}");
        let e = check_elf(p, &tiny_elf(0x20_0000, 0x1000, 0x20_0000)[..0x200], 16 << 20).unwrap_err().to_string();
        assert!(e.contains("outside the file"), "{e}");
    }

    #[test]
    fn page_tables_and_boot_info_are_written() {
        let mem = super::super::memory::create(16 << 20, false).unwrap();
        let img = tiny_elf(0x20_0000, 0x3000, 0x20_0000);
        let dev = [DeviceInfo { mmio_base: layout::MMIO_BASE, mmio_size: layout::MMIO_SIZE, device_id: 2, irq: 5 }];
        let spec = BootInfoSpec { partition_id: 3, vcpus: 1, mem_bytes: 16 << 20, image_end: 0, devices: &dev, workload: WorkloadParams::default() };
        let li = prepare(&mem, Path::new("t"), &img, spec).unwrap();
        assert_eq!(li.end, 0x20_3000);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x20_0000)).unwrap(), 0xe6);
        let bi: Pod<BootInfo> = mem.read_obj(GuestAddress(layout::BOOT_INFO)).unwrap();
        assert_eq!(bi.0.magic, amsvm_abi::BOOT_INFO_MAGIC);
        assert_eq!(bi.0.partition_id, 3);
        assert_eq!(bi.0.free_start, 0x20_3000);
        assert_eq!(bi.0.device_count, 1);
        assert_eq!(bi.0.devices[0], dev[0]);
        // PML4[0] -> PDPT, user bit set; PD entry for the device window is uncached.
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PAGE_TABLES)).unwrap();
        assert_eq!(pml4 & 0x7, 0x7);
        let pd3 = layout::PAGE_TABLES + 0x2000 + 3 * 0x1000;
        let e: u64 = mem.read_obj(GuestAddress(pd3 + ((layout::MMIO_BASE >> 21) & 511) * 8)).unwrap();
        assert_eq!(e & !0xfff, layout::MMIO_BASE);
        assert_eq!(e & (PTE_PCD | PTE_US | PTE_PS), PTE_PCD | PTE_US | PTE_PS);
    }
}
