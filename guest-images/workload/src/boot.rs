//! Entries for VMMs other than amsvm: a PVH entry (QEMU, Cloud Hypervisor, Firecracker)
//! and the Linux x86-64 boot protocol's 64-bit entry (Firecracker, Cloud Hypervisor,
//! amsvm's own Linux loader). Each is a short CPL0 prologue that switches to the image's
//! own page tables, GDT, TSS and IDT, then drops to CPL3 ([`foreign_main`]), which reads the
//! boot protocol's structures, builds a boot-info page as amsvm would and runs the very
//! same `main` as amsvm's native entry.
//!
//! - **ELF entry** `_entry`: CS.RPL 3 means amsvm's native entry (CPL3, `rdi` = boot-info
//!   page): straight on to `_start` (rt.rs). CPL 0 means the Linux 64-bit boot protocol
//!   (long mode, `rsi` = `struct boot_params`).
//! - **PVH entry** `pvh_entry`, announced by the ELF note XEN_ELFNOTE_PHYS32_ENTRY: 32-bit
//!   protected mode, paging off, `ebx` = `struct hvm_start_info`.
//!
//! Guest CPL0 code is emulated and slow on our machines (DESIGN.md), so the prologue does
//! little: the page tables (an identity map of the first 4 GiB in 2 MiB pages, user bit
//! set, from 3 GiB uncached) and the GDT and TSS (with an I/O permission bitmap that
//! grants every port: some KVMs force IOPL to 0 at CPL3) are static data in the image,
//! built by the assembler; at run time it writes the TSS descriptor and 32 IDT gates (CPU
//! exceptions: reported on the console from CPL3, see `exception`), masks the 8259
//! PICs, registers kvmclock if the hypervisor has it (to learn the TSC frequency), and
//! `iretq`s to CPL3. About 500 instructions. To halt for good, CPL3 code executes `hlt`
//! ([`user_halt`]); the #GP handler halts the vCPU at CPL0.

use crate::cmdline::{self, Settings};
use crate::platform::{self, PowerOff};
use amsvm_abi::{exit, BootInfo, DeviceInfo, Progress};
use core::ptr::{addr_of, addr_of_mut};

/// Which entry ran (`rdi` of [`foreign_main`]).
const KIND_PVH: u64 = 1;
const KIND_LINUX: u64 = 2;

/// `struct hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h).
const PVH_MAGIC: u32 = 0x336e_c578;
/// `struct boot_params`: the setup header's magic "HdrS" (at offset 0x202).
const HDR_MAGIC: u32 = 0x5372_6448;

/// The identity map covers the first 4 GiB.
const MAPPED: u64 = 1 << 32;
const PAGE: u64 = 4096;

core::arch::global_asm!(
    // The PVH entry point, for QEMU's and Cloud Hypervisor's PVH boot and linux-loader.
    // The descriptor is 8 bytes: QEMU reads a 64-bit value from ELF64 notes, others the
    // first 4 bytes.
    ".pushsection .note.Xen,\"a\",@note",
    ".balign 4",
    ".long 4",
    ".long 8",
    ".long 18", // XEN_ELFNOTE_PHYS32_ENTRY
    ".asciz \"Xen\"",
    ".quad pvh_entry",
    ".popsection",

    // ---- ELF entry: amsvm (CPL3) or the Linux 64-bit boot protocol (CPL0).
    ".pushsection .text._entry,\"ax\",@progbits",
    ".global _entry",
    ".type _entry,@function",
    "_entry:",
    "    movl %cs, %eax",
    "    testb $3, %al",
    "    jnz _start",
    "    movl ${linux}, %edi",
    "    jmp boot_long",
    ".size _entry, . - _entry",

    // ---- PVH: 32-bit protected mode, paging off, ebx = hvm_start_info, no stack.
    ".code32",
    ".global pvh_entry",
    ".type pvh_entry,@function",
    "pvh_entry:",
    "    cli",
    "    cld",
    "    movl %ebx, %esi",
    "    lgdt boot_gdt_ptr",
    "    movl $0x620, %eax", // CR4: PAE, OSFXSR, OSXMMEXCPT
    "    movl %eax, %cr4",
    "    movl $boot_pml4, %eax",
    "    movl %eax, %cr3",
    "    movl $0xc0000080, %ecx", // EFER.LME
    "    rdmsr",
    "    orl $0x100, %eax",
    "    wrmsr",
    "    movl $0x80010033, %eax", // CR0: PG, WP, NE, ET, MP, PE
    "    movl %eax, %cr0",
    "    ljmp $0x08, $1f",
    ".code64",
    "1:",
    "    movl %esi, %esi", // upper halves are undefined after the mode switch
    "    movl ${pvh}, %edi",
    "    jmp boot_long",
    ".size pvh_entry, . - pvh_entry",

    // ---- Both: 64-bit, CPL0, rdi = entry kind, rsi = the boot structure. Interrupts
    // are off (IF=0) until the vCPU reaches CPL3; rdi and rsi are kept for foreign_main.
    "boot_long:",
    "    cli",
    "    cld",
    "    rdtsc", // when the prologue started (reported at CPL3)
    "    movl %eax, prologue_tsc(%rip)",
    "    movl %edx, prologue_tsc+4(%rip)",
    "    lgdt boot_gdt_ptr(%rip)",
    "    movl $0x620, %eax", // exactly PAE, OSFXSR, OSXMMEXCPT (no SMEP/SMAP: CPL0 runs on user pages)
    "    movq %rax, %cr4",
    "    leaq boot_pml4(%rip), %rax",
    "    movq %rax, %cr3",
    "    movl $0x80010033, %eax",
    "    movq %rax, %cr0",
    "    leaq boot_stack_top(%rip), %rsp",
    "    pushq $0x08", // reload CS from our GDT
    "    leaq 2f(%rip), %rax",
    "    pushq %rax",
    "    lretq",
    "2:",
    "    movl $0x10, %eax",
    "    movl %eax, %ds",
    "    movl %eax, %es",
    "    movl %eax, %ss",
    "    xorl %eax, %eax",
    "    movl %eax, %fs",
    "    movl %eax, %gs",
    // The TSS descriptor (GDT 0x28): limit 0x2068 (TSS and I/O bitmap), type 0x89. The
    // image lies below 16 MiB (link.ld checks), so the base fits bits 16..39.
    "    leaq boot_tss(%rip), %rax",
    "    shlq $16, %rax",
    "    orq $0x2068, %rax",
    "    movabsq $0x0000890000000000, %rdx",
    "    orq %rdx, %rax",
    "    movq %rax, boot_gdt+0x28(%rip)",
    "    movq $0, boot_gdt+0x30(%rip)",
    "    movl $0x28, %eax",
    "    ltr %ax",
    // IDT: gates 0..31 to the exception stubs (16 bytes apart), interrupt gates, DPL0.
    "    leaq boot_idt(%rip), %r8",
    "    leaq exception_stubs(%rip), %r9",
    "    movabsq $0x00008e0000080000, %r10",
    "    xorl %ecx, %ecx",
    "3:",
    "    movzwl %r9w, %eax",
    "    movq %r9, %rdx",
    "    shrq $16, %rdx",
    "    shlq $48, %rdx",
    "    orq %rdx, %rax",
    "    orq %r10, %rax",
    "    movq %rax, (%r8)",
    "    movq $0, 8(%r8)",
    "    addq $16, %r8",
    "    addq $16, %r9",
    "    incl %ecx",
    "    cmpl $32, %ecx",
    "    jb 3b",
    "    lidt boot_idt_ptr(%rip)",
    // Mask both 8259 PICs: the KVMs of our machines deliver interrupts at CPL3 whatever
    // IF says.
    "    movb $0xff, %al",
    "    outb %al, $0x21",
    "    outb %al, $0xa1",
    // kvmclock, if the hypervisor is KVM with KVM_FEATURE_CLOCKSOURCE2 (its TSC scale
    // gives the TSC frequency).
    "    movl $0x40000000, %eax",
    "    cpuid",
    "    cmpl $0x4b4d564b, %ebx", // "KVMKVMKVM\0\0\0"
    "    jne 4f",
    "    cmpl $0x564b4d56, %ecx",
    "    jne 4f",
    "    cmpl $0x4d, %edx",
    "    jne 4f",
    "    movl $0x40000001, %eax",
    "    cpuid",
    "    testl $8, %eax",
    "    jz 4f",
    "    leaq kvmclock_page(%rip), %rax",
    "    orq $1, %rax",
    "    movq %rax, %rdx",
    "    shrq $32, %rdx",
    "    movl $0x4b564d01, %ecx", // MSR_KVM_SYSTEM_TIME_NEW
    "    wrmsr",
    "    movl $1, kvmclock_on(%rip)",
    "4:",
    // To CPL3: ss 0x23, rsp, rflags (IOPL 3, IF 0), cs 0x1b, rip.
    "    pushq $0x23",
    "    leaq boot_stack_top(%rip), %rax",
    "    pushq %rax",
    "    pushq $0x3002",
    "    pushq $0x1b",
    "    leaq 5f(%rip), %rax",
    "    pushq %rax",
    "    iretq",
    "5:",
    "    xorl %ebp, %ebp",
    "    andq $-16, %rsp",
    "    call {foreign_main}",
    "    ud2",

    // ---- Exception stubs, 16 bytes apart: push a dummy error code where the CPU pushes
    // none, the vector, and go to the common handler (CPL0, on the TSS's rsp0 stack).
    ".balign 16",
    "exception_stubs:",
    ".set vec, 0",
    ".rept 32",
    ".balign 16",
    ".if (vec != 8) && (vec < 10 || vec > 14) && (vec != 17) && (vec != 21) && (vec != 29) && (vec != 30)",
    "    pushq $0",
    ".endif",
    "    pushq $vec",
    "    jmp exception_common",
    ".set vec, vec + 1",
    ".endr",
    "exception_common:",
    // A `hlt` at CPL3 (#GP at `user_halt`) asks to stop for good; so does an exception
    // while one is being reported.
    "    cmpq $13, (%rsp)",
    "    jne 7f",
    "    leaq user_halt(%rip), %rax",
    "    cmpq %rax, 16(%rsp)",
    "    je 8f",
    "7:",
    "    cmpl $0, exception_seen(%rip)",
    "    jne 8f",
    "    movl $1, exception_seen(%rip)",
    // Keep vector, error code, rip and cs, and report at CPL3 (Rust code may use SSE,
    // which the emulator of guest CPL0 on our machines does not always handle).
    "    leaq exception_info(%rip), %rdi",
    "    popq %rax",
    "    movq %rax, (%rdi)",
    "    popq %rax",
    "    movq %rax, 8(%rdi)",
    "    popq %rax",
    "    movq %rax, 16(%rdi)",
    "    popq %rax",
    "    movq %rax, 24(%rdi)",
    "    pushq $0x23",
    "    leaq report_stack_top(%rip), %rax",
    "    pushq %rax",
    "    pushq $0x3002",
    "    pushq $0x1b",
    "    leaq 9f(%rip), %rax",
    "    pushq %rax",
    "    iretq",
    "8:",
    "    cli",
    "    hlt",
    "    jmp 8b",
    "9:",
    "    xorl %ebp, %ebp",
    "    call {exception}",
    "    ud2",
    // CPL3: a privileged instruction, so #GP, which the handler above turns into a halt.
    ".global user_halt",
    "user_halt:",
    "    hlt",
    "    jmp user_halt",
    ".popsection",

    // ---- Static tables, filled by the assembler (the image is linked at a fixed place).
    ".pushsection .data.boot,\"aw\",@progbits",
    ".balign 4096",
    "boot_pml4:",
    "    .quad boot_pdpt + 0x7",
    "    .fill 511, 8, 0",
    "boot_pdpt:",
    "    .quad boot_pd + 0x0007",
    "    .quad boot_pd + 0x1007",
    "    .quad boot_pd + 0x2007",
    "    .quad boot_pd + 0x3007",
    "    .fill 508, 8, 0",
    // 2048 2 MiB pages: present, writable, user; from 3 GiB also PWT and PCD.
    "boot_pd:",
    ".set page, 0",
    ".rept 2048",
    ".if page < 1536",
    "    .quad (page << 21) | 0x87",
    ".else",
    "    .quad (page << 21) | 0x9f",
    ".endif",
    ".set page, page + 1",
    ".endr",
    // GDT: null, kernel code64 0x08, kernel data 0x10, user code64 0x18 (0x1b), user
    // data 0x20 (0x23), TSS 0x28 (16 bytes, written at boot) — as amsvm's native GDT.
    ".balign 16",
    "boot_gdt:",
    "    .quad 0",
    "    .quad 0x00af9a000000ffff",
    "    .quad 0x00cf92000000ffff",
    "    .quad 0x00affa000000ffff",
    "    .quad 0x00cff2000000ffff",
    "    .quad 0, 0",
    "boot_gdt_end:",
    ".balign 8",
    "boot_gdt_ptr:",
    "    .short boot_gdt_end - boot_gdt - 1",
    "    .quad boot_gdt",
    ".balign 8",
    "boot_idt_ptr:",
    "    .short 256 * 16 - 1",
    "    .quad boot_idt",
    // 64-bit TSS: rsp0 = the exception stack; the I/O map right after it (every port
    // allowed) and its terminating 0xff byte.
    ".balign 16",
    "boot_tss:",
    "    .long 0",
    "    .quad exception_stack_top",
    "    .fill 11, 8, 0",
    "    .short 0",
    "    .short 0x68",
    "    .fill 8192, 1, 0",
    "    .byte 0xff",
    ".balign 4",
    "kvmclock_on:",
    "    .long 0",
    "exception_seen:",
    "    .long 0",
    ".balign 8",
    "prologue_tsc:",
    "    .quad 0",
    ".popsection",

    // Zero-filled by the loader (ELF .bss): IDT gates 32..255 stay not present.
    ".pushsection .bss.boot,\"aw\",@nobits",
    ".balign 4096",
    "boot_idt:",
    "    .skip 4096",
    ".balign 64",
    ".global kvmclock_page",
    "kvmclock_page:",
    "    .skip 64",
    ".balign 16",
    "exception_stack:",
    "    .skip 16384",
    "exception_stack_top:",
    "exception_info:",
    "    .skip 32",
    ".balign 16",
    "report_stack:",
    "    .skip 32768",
    "report_stack_top:",
    "boot_stack:",
    "    .skip 262144",
    "boot_stack_top:",
    ".popsection",

    linux = const KIND_LINUX,
    pvh = const KIND_PVH,
    foreign_main = sym foreign_main,
    exception = sym exception,
    options(att_syntax),
);

extern "C" {
    /// The image's first byte and the first byte after it (page aligned), from `link.ld`.
    static __image_start: u8;
    static __image_end: u8;
    /// kvmclock's `pvclock_vcpu_time_info`, written by the hypervisor.
    static kvmclock_page: u8;
    /// 1 if the prologue registered kvmclock.
    static kvmclock_on: u32;
    /// The TSC when the 64-bit prologue started.
    static prologue_tsc: u64;
}

extern "C" {
    /// `hlt; jmp user_halt`: at CPL3 a #GP, which the exception handler turns into a halt
    /// at CPL0.
    fn user_halt() -> !;
}

/// Stops the vCPU for good (a `hlt` at CPL0, reached through [`user_halt`]).
pub fn halt() -> ! {
    // SAFETY: the prologue installed the #GP handler that recognises it.
    unsafe { user_halt() }
}

/// A CPU exception, reported at CPL3 on its own stack: `info` holds the vector, the error
/// code, rip and cs of the faulting code.
extern "C" fn exception(info: *const u64) -> ! {
    // SAFETY: the handler stored four words there.
    let [vector, error, rip, cs] = unsafe { [0, 1, 2, 3].map(|i| info.add(i).read_volatile()) };
    println!("workload: CPU exception {vector} (error code {error:#x}) at rip {rip:#x}, cpl {}", cs & 3);
    platform::exit_keep_progress(exit::PANIC)
}

/// The settings, filled in place (never moved: see docs/workload.md on large values).
static mut SETTINGS: Settings = cmdline::DEFAULTS;
/// The boot-info page this code builds, as amsvm would write it.
static mut BOOT_INFO: BootInfo = BootInfo::empty();
/// The command line, copied before the workload uses free RAM.
const CMDLINE_MAX: usize = 4096;
static mut CMDLINE: [u8; CMDLINE_MAX] = [0; CMDLINE_MAX];

/// What the boot protocol told.
struct Boot {
    /// Which protocol ("pvh" or "linux").
    protocol: &'static str,
    /// Bytes of command line copied into `CMDLINE`.
    cmdline_len: usize,
    /// The RAM region holding the image: [start, end), clipped to the identity map.
    ram: (u64, u64),
    /// The boot protocol's RSDP pointer (0: none).
    rsdp: u64,
}

fn bad(args: core::fmt::Arguments<'_>) -> ! {
    println!("workload: bad config: {args}");
    platform::exit(exit::BAD_CONFIG, &Progress::default())
}

fn mapped(addr: u64, len: u64) -> bool {
    addr != 0 && addr.checked_add(len).is_some_and(|e| e <= MAPPED)
}

fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: callers check `mapped`; the first 4 GiB are identity-mapped and readable
    // at CPL3.
    unsafe { (addr as *const T).read_unaligned() }
}

/// Copies the NUL-terminated command line at `addr` into `CMDLINE`.
fn copy_cmdline(addr: u64) -> usize {
    if addr == 0 {
        return 0;
    }
    if !mapped(addr, 1) {
        bad(format_args!("command line at {addr:#x} is outside the first 4 GiB"));
    }
    let dst = addr_of_mut!(CMDLINE) as *mut u8;
    for i in 0..CMDLINE_MAX as u64 {
        let b: u8 = if mapped(addr + i, 1) { read(addr + i) } else { 0 };
        if b == 0 {
            return i as usize;
        }
        // SAFETY: i < CMDLINE_MAX bytes of the static buffer.
        unsafe { dst.add(i as usize).write(b) };
    }
    bad(format_args!("command line longer than {} bytes", CMDLINE_MAX - 1))
}

/// The RAM region (from the memory map's `entries` of (addr, size, type)) that holds the
/// image.
fn ram_region(entries: impl Iterator<Item = (u64, u64, u32)>) -> (u64, u64) {
    let image = (addr_of!(__image_start) as u64, addr_of!(__image_end) as u64);
    for (addr, size, ty) in entries {
        let end = addr.saturating_add(size);
        if ty == 1 && addr <= image.0 && image.1 <= end {
            return (addr, end.min(MAPPED) & !(PAGE - 1));
        }
    }
    bad(format_args!("the memory map has no RAM region holding the image [{:#x}, {:#x})", image.0, image.1))
}

/// PVH: `struct hvm_start_info` at `si`.
fn read_pvh(si: u64) -> Boot {
    if !mapped(si, 0x38) || read::<u32>(si) != PVH_MAGIC {
        bad(format_args!("PVH start_info at {si:#x}: no magic {PVH_MAGIC:#x}"));
    }
    let version: u32 = read(si + 4);
    let cmdline_len = copy_cmdline(read(si + 0x18));
    let rsdp: u64 = read(si + 0x20);
    let (map, n): (u64, u32) = if version >= 1 { (read(si + 0x28), read(si + 0x30)) } else { (0, 0) };
    if n == 0 || !mapped(map, n as u64 * 24) {
        bad(format_args!("PVH start_info version {version} has no memory map"));
    }
    let ram = ram_region((0..n as u64).map(|i| {
        let e = map + i * 24;
        (read(e), read(e + 8), read(e + 16))
    }));
    Boot { protocol: "pvh", cmdline_len, ram, rsdp }
}

/// Linux boot protocol: `struct boot_params` (the zero page) at `bp`.
fn read_linux(bp: u64) -> Boot {
    if !mapped(bp, 4096) || read::<u32>(bp + 0x202) != HDR_MAGIC {
        bad(format_args!("boot_params at {bp:#x}: no \"HdrS\" setup header"));
    }
    let cmdline = read::<u32>(bp + 0x228) as u64 | (read::<u32>(bp + 0xc8) as u64) << 32;
    let cmdline_len = copy_cmdline(cmdline);
    let n = read::<u8>(bp + 0x1e8).min(128) as u64;
    let ram = ram_region((0..n).map(|i| {
        let e = bp + 0x2d0 + i * 20;
        (read(e), read(e + 8), read(e + 16))
    }));
    Boot { protocol: "linux", cmdline_len, ram, rsdp: read(bp + 0x70) }
}

fn cpuid(leaf: u32) -> core::arch::x86_64::CpuidResult {
    core::arch::x86_64::__cpuid(leaf)
}

/// The TSC frequency in kHz and where it came from: the setting, the hypervisor's timing
/// leaf 0x4000_0010, CPUID leaf 0x15, kvmclock's scale, or CPUID leaf 0x16.
fn tsc_khz(setting: u64) -> Option<(u64, &'static str)> {
    if setting != 0 {
        return Some((setting, "amsvm.tsc_khz"));
    }
    if cpuid(0x4000_0000).eax >= 0x4000_0010 {
        let khz = cpuid(0x4000_0010).eax as u64;
        if khz != 0 {
            return Some((khz, "cpuid 0x40000010"));
        }
    }
    let max_basic = cpuid(0).eax;
    if max_basic >= 0x15 {
        let l = cpuid(0x15);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            return Some((l.ecx as u64 * l.ebx as u64 / l.eax as u64 / 1000, "cpuid 0x15"));
        }
    }
    // SAFETY: a static the prologue wrote before CPL3 code ran.
    if unsafe { addr_of!(kvmclock_on).read_volatile() } != 0 {
        let p = addr_of!(kvmclock_page) as u64;
        // pvclock_vcpu_time_info: version (odd while updated), .., tsc_to_system_mul
        // at 24, tsc_shift at 28. ns = ((tsc << shift) * mul) >> 32 (shift may be
        // negative).
        for _ in 0..1000 {
            // SAFETY: the static kvmclock page, written by the hypervisor.
            let (v0, mul, shift, v1) = unsafe {
                let v0 = (p as *const u32).read_volatile();
                core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
                let mul = ((p + 24) as *const u32).read_volatile() as u64;
                let shift = ((p + 28) as *const i8).read_volatile();
                core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
                (v0, mul, shift, (p as *const u32).read_volatile())
            };
            if v0 != v1 || v0 & 1 != 0 || mul == 0 {
                continue;
            }
            let khz = if shift >= 0 {
                (1_000_000u64 << 32) / (mul << shift)
            } else {
                ((1_000_000u64 << 32) << (-shift) as u32) / mul
            };
            return Some((khz, "kvmclock"));
        }
    }
    if max_basic >= 0x16 {
        let mhz = cpuid(0x16).eax as u64 & 0xffff;
        if mhz != 0 {
            return Some((mhz * 1000, "cpuid 0x16"));
        }
    }
    None
}

/// virtio-mmio registers read at probe time.
const VIRTIO_MAGIC: u32 = 0x7472_6976;

/// Entered at CPL3 by the prologue: `kind` says which entry ran, `ptr` is its boot
/// structure.
extern "C" fn foreign_main(kind: u64, ptr: u64) -> ! {
    platform::start_foreign();
    let boot = if kind == KIND_PVH { read_pvh(ptr) } else { read_linux(ptr) };
    let s = addr_of_mut!(SETTINGS);
    // SAFETY: the static buffer, `cmdline_len` bytes of it written; SETTINGS is used by
    // this function only, on one vCPU.
    let (line, s) = unsafe { (core::slice::from_raw_parts(addr_of!(CMDLINE) as *const u8, boot.cmdline_len), &mut *s) };
    if let Err(e) = cmdline::parse(line, s) {
        bad(format_args!("{e}"));
    }
    let Some((khz, source)) = tsc_khz(s.tsc_khz) else {
        bad(format_args!(
            "amsvm.tsc_khz: the TSC frequency is unknown (no CPUID leaf 0x40000010, 0x15 or 0x16, no kvmclock); set it"
        ))
    };
    platform::set_tsc_khz(khz, s.progress_ms);
    platform::set_power_off(crate::acpi::find_power_off(boot.rsdp));

    // SAFETY: the static boot-info page, used by this function and then read by `main`.
    let bi = unsafe { &mut *addr_of_mut!(BOOT_INFO) };
    let mut count = 0;
    for d in &s.devices[..s.device_count] {
        if d.size < crate::virtio::MIN_WINDOW || !mapped(d.base, d.size) || !d.base.is_multiple_of(4) {
            bad(format_args!(
                "virtio_mmio.device={:#x}@{:#x}: the window must be at least {:#x} bytes, aligned and below 4 GiB",
                d.size,
                d.base,
                crate::virtio::MIN_WINDOW
            ));
        }
        let reg = |off: u64| -> u32 {
            // SAFETY: a register of the window the command line announced, mapped (just
            // checked) and uncached or exiting to the VMM.
            unsafe { ((d.base + off) as *const u32).read_volatile() }
        };
        let (magic, version, id) = (reg(0), reg(4), reg(8));
        if magic != VIRTIO_MAGIC {
            bad(format_args!("virtio_mmio.device at {:#x}: no virtio-mmio device there (magic {magic:#x})", d.base));
        }
        if id == 0 {
            continue; // a transport with nothing behind it
        }
        if version != 2 {
            bad(format_args!(
                "virtio_mmio.device at {:#x} (device id {id}): virtio-mmio version {version}; the workload drives virtio 1.x \
                 (version 2) only (QEMU: -global virtio-mmio.force-legacy=false)",
                d.base
            ));
        }
        bi.devices[count] = DeviceInfo { mmio_base: d.base, mmio_size: d.size, device_id: id, irq: d.irq };
        count += 1;
    }
    if s.device_count == 0 && crate::acpi::dsdt_mentions(boot.rsdp, b"LNRO0005") {
        println!(
            "workload: the ACPI tables list virtio-mmio devices, but the command line names none \
             (virtio_mmio.device=...); they are not used (QEMU microvm: use acpi=off)"
        );
    }
    let image_end = addr_of!(__image_end) as u64;
    bi.partition_id = s.id;
    bi.vcpus = 1;
    bi.mem_bytes = boot.ram.1;
    bi.free_start = image_end.next_multiple_of(PAGE);
    bi.free_end = boot.ram.1;
    bi.mailbox = platform::mailbox_addr();
    bi.device_count = count as u32;
    bi.workload = s.workload;
    // SAFETY: a static the prologue wrote before CPL3 code ran.
    let prologue_cycles = platform::start_tsc().wrapping_sub(unsafe { addr_of!(prologue_tsc).read_volatile() });
    println!(
        "workload: booted through the {} entry (CPL0 prologue {} us): RAM [{:#x}, {:#x}), {} virtio-mmio device(s), TSC {} kHz ({}), power-off {}",
        boot.protocol,
        prologue_cycles.saturating_mul(1000) / khz.max(1),
        boot.ram.0,
        boot.ram.1,
        count,
        khz,
        source,
        if platform::power_off_method() == PowerOff::None { "none" } else { "ACPI" }
    );
    crate::main(addr_of!(BOOT_INFO))
}
