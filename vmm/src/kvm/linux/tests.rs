//! Boot-structure tests: synthetic bzImage and ELF kernels built here, loaded into guest
//! memory, and the zero page, command line, initrd, e820 map, page tables and GDT read
//! back. One `#[ignore]`d test loads the real Debian kernel built by
//! guest-images/linux/build.sh.

use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_params, setup_header, CAN_USE_HEAP, LOADED_HIGH};
use vm_memory::{Bytes, GuestAddress};

use super::*;

const MIB: u64 = 1 << 20;

fn guest_memory(bytes: u64) -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), bytes as usize)]).unwrap()
}

/// Fields of the synthetic bzImage.
#[derive(Clone, Copy)]
struct FakeBz {
    version: u16,
    xloadflags: u16,
    init_size: u32,
    cmdline_size: u32,
    initrd_addr_max: u32,
    payload: usize,
}

impl Default for FakeBz {
    fn default() -> Self {
        FakeBz {
            version: 0x020c,
            xloadflags: 0x3, // KERNEL_64 | CAN_BE_LOADED_ABOVE_4G
            init_size: MIB as u32,
            cmdline_size: 2047,
            initrd_addr_max: 0x7fff_ffff,
            payload: 3 * 512,
        }
    }
}

const SETUP_SECTS: usize = 4;

fn payload_byte(i: usize) -> u8 {
    (i * 7 % 251) as u8
}

/// A bzImage: boot sector + setup header, setup code, then `payload` bytes of "kernel".
fn bzimage(f: FakeBz) -> Vec<u8> {
    let setup = (SETUP_SECTS + 1) * 512;
    let mut img = vec![0u8; setup + f.payload];
    let mut put = |off: usize, bytes: &[u8]| img[off..off + bytes.len()].copy_from_slice(bytes);
    put(0x1f1, &[SETUP_SECTS as u8]);
    put(0x1fe, &0xaa55u16.to_le_bytes());
    put(0x200, &[0xeb, 0x66]); // jump over the header, which thus ends at 0x268
    put(0x202, b"HdrS");
    put(0x206, &f.version.to_le_bytes());
    put(0x211, &[0x01]); // LOADED_HIGH
    put(0x214, &0x10_0000u32.to_le_bytes());
    put(0x22c, &f.initrd_addr_max.to_le_bytes());
    put(0x230, &0x20_0000u32.to_le_bytes());
    put(0x234, &[1]); // relocatable
    put(0x236, &f.xloadflags.to_le_bytes());
    put(0x238, &f.cmdline_size.to_le_bytes());
    put(0x258, &0x100_0000u64.to_le_bytes());
    put(0x260, &f.init_size.to_le_bytes());
    // Setup code right after the 2.12 header: must not be read as kernel_info_offset.
    put(0x268, &[0xab; 4]);
    for i in 0..f.payload {
        img[setup + i] = payload_byte(i);
    }
    img
}

/// A minimal ELF64 vmlinux: one PT_LOAD of `filesz` bytes at physical `paddr`.
fn elf_kernel(paddr: u64, filesz: u64, memsz: u64) -> Vec<u8> {
    let mut img = vec![0u8; 0x1000 + filesz as usize];
    let mut put = |off: usize, bytes: &[u8]| img[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, b"\x7fELF\x02\x01\x01");
    put(0x10, &2u16.to_le_bytes()); // ET_EXEC
    put(0x12, &0x3eu16.to_le_bytes()); // x86-64
    put(0x14, &1u32.to_le_bytes());
    put(0x18, &paddr.to_le_bytes()); // entry
    put(0x20, &64u64.to_le_bytes()); // phoff
    put(0x34, &64u16.to_le_bytes()); // ehsize
    put(0x36, &56u16.to_le_bytes()); // phentsize
    put(0x38, &1u16.to_le_bytes()); // phnum
    // Program header.
    put(64, &1u32.to_le_bytes()); // PT_LOAD
    put(68, &7u32.to_le_bytes());
    put(64 + 8, &0x1000u64.to_le_bytes()); // offset
    put(64 + 0x10, &(paddr | 0xffff_ffff_8000_0000).to_le_bytes()); // vaddr
    put(64 + 0x18, &paddr.to_le_bytes());
    put(64 + 0x20, &filesz.to_le_bytes());
    put(64 + 0x28, &memsz.to_le_bytes());
    put(64 + 0x30, &0x1000u64.to_le_bytes());
    for i in 0..filesz as usize {
        img[0x1000 + i] = payload_byte(i);
    }
    img
}

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        Files { dir: tempfile::tempdir().unwrap() }
    }
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn image(kernel: &Path, initrd: Option<&Path>, cmdline: &str) -> LinuxImage {
    LinuxImage { kernel: kernel.to_owned(), initrd: initrd.map(Path::to_owned), cmdline: cmdline.into() }
}

fn zero_page(mem: &GuestMemory) -> boot_params {
    mem.read_obj(GuestAddress(layout::ZERO_PAGE)).unwrap()
}

fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn read_cstr(mem: &GuestMemory, addr: u64) -> String {
    let bytes = read(mem, addr, 4096);
    let end = bytes.iter().position(|&b| b == 0).expect("NUL-terminated");
    String::from_utf8(bytes[..end].to_vec()).unwrap()
}

fn e820(p: &boot_params) -> Vec<(u64, u64, u32)> {
    let table = p.e820_table;
    table[..p.e820_entries as usize].iter().map(|e| (e.addr, e.size, e.r#type)).collect()
}

/// Sorted, non-overlapping, RAM exactly the guest RAM minus the 640K–1M hole, ACPI
/// tables in an ACPI entry.
fn check_e820(p: &boot_params, ram: &[(u64, u64)]) {
    let map = e820(p);
    for w in map.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "e820 unsorted or overlapping: {map:x?}");
    }
    let mut want: Vec<(u64, u64)> = Vec::new();
    for &(s, e) in ram {
        if s < layout::EBDA_START {
            want.push((s, e.min(layout::EBDA_START)));
        }
        if e > layout::KERNEL_LOAD {
            want.push((s.max(layout::KERNEL_LOAD), e));
        }
    }
    // Merge adjacent spans, as the map does.
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in want {
        match merged.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => merged.push((s, e)),
        }
    }
    let got: Vec<(u64, u64)> =
        map.iter().filter(|e| e.2 == E820_RAM).map(|&(a, s, _)| (a, a + s)).collect();
    assert_eq!(got, merged, "e820 RAM entries: {map:x?}");
    let acpi: Vec<_> = map.iter().filter(|e| e.2 == E820_ACPI).collect();
    assert_eq!(acpi.len(), 1);
    assert!(acpi[0].0 <= layout::ACPI_RSDP && acpi[0].0 + acpi[0].1 >= layout::ACPI_END);
    assert!(map.iter().all(|e| matches!(e.2, E820_RAM | E820_RESERVED | E820_ACPI)));
    assert!(
        map.iter().all(|e| e.0 + e.1 <= amsvm_abi::layout::MMIO_BASE || e.0 >= amsvm_abi::layout::MMIO_BASE + 0x1_0000),
        "the virtio-mmio window is not in the map"
    );
}

#[test]
fn bzimage_boot_params() {
    let files = Files::new();
    let kernel = files.write("bzImage", &bzimage(FakeBz::default()));
    let initrd_bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let initrd = files.write("initrd.cpio.gz", &initrd_bytes);
    let cmdline = "console=ttyS0 panic=-1 amsvm.run=\"cat /proc/cpuinfo\"";
    let mem = guest_memory(64 * MIB);
    let devices = [VirtioMmioSlot::standard(0), VirtioMmioSlot::standard(1)];
    let boot = load(&mem, &image(&kernel, Some(&initrd), cmdline), 2, &devices).unwrap();

    assert_eq!(boot.entry, 0x10_0200, "64-bit entry = load address + 0x200");
    assert_eq!(boot.boot_params, layout::ZERO_PAGE);
    assert_eq!(boot.rsdp, layout::ACPI_RSDP);

    let p = zero_page(&mem);
    let h = p.hdr;
    assert_eq!({ h.header }, 0x5372_6448);
    assert_eq!({ h.boot_flag }, 0xaa55);
    assert_eq!({ h.version }, 0x020c);
    assert_eq!(h.setup_sects, SETUP_SECTS as u8);
    assert_eq!(h.type_of_loader, 0xff);
    assert_eq!(h.loadflags & LOADED_HIGH, LOADED_HIGH);
    assert_eq!(h.loadflags & CAN_USE_HEAP, 0);
    assert_eq!({ h.code32_start }, 0x10_0000);
    assert_eq!({ h.kernel_info_offset }, 0, "bytes past the 2.12 header are not header fields");
    assert_eq!({ h.cmdline_size }, 2047);
    assert_eq!({ h.cmd_line_ptr }, layout::CMDLINE as u32);
    assert_eq!({ p.ext_cmd_line_ptr }, 0);
    assert_eq!(read_cstr(&mem, layout::CMDLINE), cmdline);
    assert_eq!({ p.acpi_rsdp_addr }, layout::ACPI_RSDP);
    assert_eq!(&read(&mem, layout::ACPI_RSDP, 8), b"RSD PTR ");
    // The reset vector writes 1 to the ACPI reset register, port 0x604.
    assert_eq!(read(&mem, layout::RESET_VECTOR, 10), [0xfa, 0xb0, 0x01, 0xba, 0x04, 0x06, 0xee, 0xf4, 0xeb, 0xfd]);

    // Initrd: page aligned, high, below the end of RAM, above the kernel's buffer, intact.
    let (rd, rd_size) = (h.ramdisk_image as u64, h.ramdisk_size as u64);
    assert_eq!(rd_size, initrd_bytes.len() as u64);
    assert_eq!(rd % 4096, 0);
    assert!(rd + rd_size <= 64 * MIB);
    assert!(64 * MIB - (rd + rd_size) < 4096, "placed at the top of RAM");
    assert!(rd >= 0x100_0000 + MIB, "above pref_address + init_size");
    assert_eq!(read(&mem, rd, initrd_bytes.len()), initrd_bytes);

    // Kernel payload at 1 MiB.
    let payload = read(&mem, layout::KERNEL_LOAD, 3 * 512);
    assert!(payload.iter().enumerate().all(|(i, &b)| b == payload_byte(i)));

    check_e820(&p, &[(0, 64 * MIB)]);
    assert_eq!(
        e820(&p),
        vec![
            (0, layout::EBDA_START, E820_RAM),
            (layout::EBDA_START, layout::ACPI_RSDP - layout::EBDA_START, E820_RESERVED),
            (layout::ACPI_RSDP, layout::ACPI_END - layout::ACPI_RSDP, E820_ACPI),
            (MIB, 63 * MIB, E820_RAM),
        ]
    );

    // Page tables: identity, 2 MiB pages, supervisor, 4 GiB.
    let q = |a: u64| u64::from_le_bytes(read(&mem, a, 8).try_into().unwrap());
    assert_eq!(q(layout::PML4), layout::PDPT | 3);
    for gib in 0..4 {
        let pd = q(layout::PDPT + gib * 8);
        assert_eq!(pd, (layout::PD + gib * 0x1000) | 3);
    }
    for addr in [0u64, 0x20_0000, 0xd000_0000, 0xfec0_0000, 0xffe0_0000] {
        let pde = q(layout::PD + (addr >> 21) * 8);
        assert_eq!(pde, addr | 0x83, "PDE for {addr:#x}: present, writable, 2 MiB, no user bit");
    }
    // GDT.
    let gdt: Vec<u64> =
        read(&mem, layout::GDT, 48).chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(gdt, cpu::gdt().to_vec());
}

#[test]
fn no_initrd_and_initrd_addr_max() {
    let files = Files::new();
    let mem = guest_memory(64 * MIB);
    let kernel = files.write("bzImage", &bzimage(FakeBz::default()));
    load(&mem, &image(&kernel, None, ""), 1, &[]).unwrap();
    let p = zero_page(&mem);
    assert_eq!(({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }), (0, 0));
    assert_eq!(read_cstr(&mem, layout::CMDLINE), "");

    // The kernel says the initrd must end below 32 MiB.
    let kernel = files.write("low", &bzimage(FakeBz { initrd_addr_max: 0x1ff_ffff, ..Default::default() }));
    let initrd = files.write("initrd", &[7u8; 5000]);
    load(&mem, &image(&kernel, Some(&initrd), ""), 1, &[]).unwrap();
    let p = zero_page(&mem);
    let end = p.hdr.ramdisk_image as u64 + p.hdr.ramdisk_size as u64;
    assert!(end <= 32 * MIB && 32 * MIB - end < 4096 + 5000, "initrd ends at {end:#x}");
}

#[test]
fn e820_of_split_memory() {
    let files = Files::new();
    let kernel = files.write("bzImage", &bzimage(FakeBz::default()));
    let ranges = [(0u64, MIB), (MIB, 31 * MIB), (64 * MIB, 32 * MIB)];
    let mem = GuestMemory::from_ranges(
        &ranges.iter().map(|&(s, l)| (GuestAddress(s), l as usize)).collect::<Vec<_>>(),
    )
    .unwrap();
    assert_eq!(contiguous_ram_end(&mem), 32 * MIB);
    load(&mem, &image(&kernel, None, "quiet"), 1, &[]).unwrap();
    let p = zero_page(&mem);
    check_e820(&p, &[(0, MIB), (MIB, 32 * MIB), (64 * MIB, 96 * MIB)]);
    assert_eq!(e820(&p).last().unwrap(), &(64 * MIB, 32 * MIB, E820_RAM));
}

#[test]
fn elf_vmlinux_is_entered_at_its_entry_point() {
    let files = Files::new();
    let kernel = files.write("vmlinux", &elf_kernel(0x100_0000, 0x1800, 0x4000));
    let mem = guest_memory(64 * MIB);
    let boot = load(&mem, &image(&kernel, None, "console=ttyS0"), 1, &[]).unwrap();
    assert_eq!(boot.entry, 0x100_0000);
    let loaded = read(&mem, 0x100_0000, 0x1800);
    assert!(loaded.iter().enumerate().all(|(i, &b)| b == payload_byte(i)));
    let p = zero_page(&mem);
    assert_eq!(({ p.hdr.header }, { p.hdr.boot_flag }, p.hdr.type_of_loader), (0x5372_6448, 0xaa55, 0xff));
    assert_eq!({ p.hdr.cmd_line_ptr }, layout::CMDLINE as u32);
    assert_eq!(read_cstr(&mem, layout::CMDLINE), "console=ttyS0");
    check_e820(&p, &[(0, 64 * MIB)]);

    // An ELF kernel that does not fit.
    let big = files.write("big", &elf_kernel(0x100_0000, 0x1000, 64 * MIB));
    let e = load(&mem, &image(&big, None, ""), 1, &[]).unwrap_err();
    assert!(matches!(e, LinuxError::KernelTooLarge { .. }), "{e}");
    // Cmdline limit for ELF kernels: 2047.
    let e = load(&mem, &image(&kernel, None, &"x".repeat(2048)), 1, &[]).unwrap_err();
    assert!(matches!(e, LinuxError::CmdlineTooLong { len: 2048, max: 2047, .. }), "{e}");
}

fn err(mem_bytes: u64, img: &LinuxImage) -> (LinuxError, String) {
    let mem = guest_memory(mem_bytes);
    let e = load(&mem, img, 1, &[]).expect_err("load should fail");
    let msg = e.to_string();
    (e, msg)
}

#[test]
fn kernel_errors_name_the_file_and_the_problem() {
    let files = Files::new();
    let missing = files.path("no-such-kernel");
    let (e, msg) = err(64 * MIB, &image(&missing, None, ""));
    assert!(matches!(e, LinuxError::KernelRead { .. }));
    assert!(msg.contains("no-such-kernel") && msg.contains("No such file"), "{msg}");

    // Random bytes.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let junk = files.write("junk.bin", &noise);
    let (e, msg) = err(64 * MIB, &image(&junk, None, ""));
    assert!(matches!(e, LinuxError::KernelCorrupt { .. }));
    assert!(msg.contains("junk.bin") && msg.contains("neither an ELF vmlinux"), "{msg}");

    let empty = files.write("empty", &[]);
    let (e, msg) = err(64 * MIB, &image(&empty, None, ""));
    assert!(matches!(e, LinuxError::KernelCorrupt { .. }), "{msg}");

    // A bzImage whose file stops after the setup code.
    let mut trunc = bzimage(FakeBz::default());
    trunc.truncate((SETUP_SECTS + 1) * 512);
    let trunc = files.write("truncated", &trunc);
    let (e, msg) = err(64 * MIB, &image(&trunc, None, ""));
    assert!(matches!(e, LinuxError::KernelCorrupt { .. }));
    assert!(msg.contains("truncated") && msg.contains("no protected-mode kernel"), "{msg}");

    let old = files.write("old", &bzimage(FakeBz { version: 0x020b, ..Default::default() }));
    let (e, msg) = err(64 * MIB, &image(&old, None, ""));
    assert!(matches!(e, LinuxError::KernelUnsupported { .. }));
    assert!(msg.contains("old") && msg.contains("2.11"), "{msg}");

    let k32 = files.write("k32", &bzimage(FakeBz { xloadflags: 0, ..Default::default() }));
    let (e, msg) = err(64 * MIB, &image(&k32, None, ""));
    assert!(matches!(e, LinuxError::KernelUnsupported { .. }));
    assert!(msg.contains("k32") && msg.contains("64-bit"), "{msg}");

    // The decompression buffer (16 MiB + 64 MiB) does not fit in 32 MiB.
    let huge = files.write("huge", &bzimage(FakeBz { init_size: 64 << 20, ..Default::default() }));
    let (e, msg) = err(32 * MIB, &image(&huge, None, ""));
    assert!(matches!(e, LinuxError::KernelTooLarge { needed: 0x500_0000, ram: 0x200_0000, .. }), "{msg}");
    assert!(msg.contains("huge") && msg.contains("does not fit in guest memory"), "{msg}");

    let kernel = files.write("bzImage", &bzimage(FakeBz::default()));
    let (e, msg) = err(MIB, &image(&kernel, None, ""));
    assert!(matches!(e, LinuxError::MemoryTooSmall { .. }));
    assert!(msg.contains("too small"), "{msg}");
}

#[test]
fn initrd_errors_name_the_file_and_the_problem() {
    let files = Files::new();
    let kernel = files.write("bzImage", &bzimage(FakeBz::default()));

    let missing = files.path("no-such-initrd");
    let (e, msg) = err(64 * MIB, &image(&kernel, Some(&missing), ""));
    assert!(matches!(e, LinuxError::InitrdRead { .. }));
    assert!(msg.contains("no-such-initrd") && msg.contains("No such file"), "{msg}");

    let empty = files.write("empty-initrd", &[]);
    let (e, msg) = err(64 * MIB, &image(&kernel, Some(&empty), ""));
    assert!(matches!(e, LinuxError::InitrdEmpty { .. }));
    assert!(msg.contains("empty-initrd") && msg.contains("empty"), "{msg}");

    // 48 MiB (sparse) does not fit in 64 MiB above a kernel that needs up to 17 MiB.
    let big = files.path("big-initrd");
    std::fs::File::create(&big).unwrap().set_len(48 * MIB).unwrap();
    let (e, msg) = err(64 * MIB, &image(&kernel, Some(&big), ""));
    assert!(matches!(e, LinuxError::InitrdTooLarge { .. }));
    assert!(msg.contains("big-initrd") && msg.contains("does not fit in guest memory"), "{msg}");
    // Larger than all of RAM.
    std::fs::File::create(&big).unwrap().set_len(128 * MIB).unwrap();
    let (e, _) = err(64 * MIB, &image(&kernel, Some(&big), ""));
    assert!(matches!(e, LinuxError::InitrdTooLarge { .. }));
    // Just fits: 64 MiB - 17 MiB.
    std::fs::File::create(&big).unwrap().set_len(47 * MIB).unwrap();
    let mem = guest_memory(64 * MIB);
    load(&mem, &image(&kernel, Some(&big), ""), 1, &[]).unwrap();
    assert_eq!({ zero_page(&mem).hdr.ramdisk_image }, 17 * MIB as u32);
}

#[test]
fn cmdline_limits() {
    let files = Files::new();
    let kernel = files.write("bzImage", &bzimage(FakeBz { cmdline_size: 100, ..Default::default() }));
    let (e, msg) = err(64 * MIB, &image(&kernel, None, &"a".repeat(101)));
    assert!(matches!(e, LinuxError::CmdlineTooLong { len: 101, max: 100, .. }));
    assert!(msg.contains("too long") && msg.contains("101") && msg.contains("100") && msg.contains("bzImage"), "{msg}");
    let mem = guest_memory(64 * MIB);
    load(&mem, &image(&kernel, None, &"a".repeat(100)), 1, &[]).unwrap();
    assert_eq!(read_cstr(&mem, layout::CMDLINE), "a".repeat(100));

    let kernel = files.write("default", &bzimage(FakeBz::default()));
    let (e, _) = err(64 * MIB, &image(&kernel, None, &"b".repeat(3000)));
    assert!(matches!(e, LinuxError::CmdlineTooLong { len: 3000, max: 2047, .. }));

    let (e, msg) = err(64 * MIB, &image(&kernel, None, "console=ttyS0\nquiet"));
    assert!(matches!(e, LinuxError::CmdlineInvalid { .. }), "{msg}");
}

/// Loads the Debian kernel and initramfs made by guest-images/linux/build.sh.
#[test]
#[ignore = "needs guest-images/linux/out/{vmlinuz,initramfs.cpio.gz}: run guest-images/linux/build.sh first"]
fn real_debian_kernel() {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images/linux/out");
    let kernel = out.join("vmlinuz");
    let initrd = out.join("initramfs.cpio.gz");
    assert!(kernel.exists(), "{} missing: run guest-images/linux/build.sh", kernel.display());
    assert!(initrd.exists(), "{} missing: run guest-images/linux/build.sh", initrd.display());
    let file = std::fs::read(&kernel).unwrap();
    let rd = std::fs::read(&initrd).unwrap();

    let mem = guest_memory(256 * MIB);
    let devices: Vec<_> = (0..3).map(VirtioMmioSlot::standard).collect();
    let cmdline = "console=ttyS0 panic=-1 amsvm.run=nproc";
    let boot = load(&mem, &image(&kernel, Some(&initrd), cmdline), 2, &devices).unwrap();
    assert_eq!(boot.entry, 0x10_0200);

    // The setup header is the file's, up to its end, with the loader's fields filled in.
    let hdr_end = 0x202 + file[0x201] as usize;
    let mut want = vec![0u8; std::mem::size_of::<setup_header>()];
    want[..hdr_end - 0x1f1].copy_from_slice(&file[0x1f1..hdr_end]);
    // SAFETY: setup_header is packed plain data of this size.
    let mut want: setup_header = unsafe { std::ptr::read_unaligned(want.as_ptr().cast()) };
    let p = zero_page(&mem);
    assert!(p.hdr.version >= 0x020c);
    want.type_of_loader = 0xff;
    want.loadflags = (want.loadflags | LOADED_HIGH) & !CAN_USE_HEAP & !0x20;
    want.cmd_line_ptr = layout::CMDLINE as u32;
    want.ramdisk_image = p.hdr.ramdisk_image;
    want.ramdisk_size = rd.len() as u32;
    want.code32_start = layout::KERNEL_LOAD as u32;
    assert_eq!(p.hdr, want, "setup header copied from the bzImage");

    let setup = (if file[0x1f1] == 0 { 4 } else { file[0x1f1] as usize } + 1) * 512;
    assert_eq!(read(&mem, layout::KERNEL_LOAD, 1 << 20), file[setup..setup + (1 << 20)]);
    let tail = file.len() - setup;
    assert_eq!(read(&mem, layout::KERNEL_LOAD + tail as u64 - 4096, 4096), file[file.len() - 4096..]);
    let rd_at = p.hdr.ramdisk_image as u64;
    assert!(rd_at >= { p.hdr.pref_address } + p.hdr.init_size as u64);
    assert_eq!(read(&mem, rd_at, rd.len()), rd);
    assert_eq!(read_cstr(&mem, layout::CMDLINE), cmdline);
    check_e820(&p, &[(0, 256 * MIB)]);
}
