//! Where the workload's clock, progress and exit go.
//!
//! - **amsvm** (entered at CPL3 through `_start`): the hypercalls of `hc.rs`, as always.
//! - **Other VMMs** (entered through a CPL0 entry of `boot.rs`, which calls
//!   [`start_foreign`]): CLOCK is the TSC (its frequency found by `boot.rs`); PROGRESS is
//!   one console line `progress: t_ms=... touched=... verified=... written=...
//!   failures=... disk_ok=... disk_bad=...`, at most every `amsvm.progress_ms`; EXIT prints
//!   the latency histogram (when it was recorded) and `exit: status=...`, then writes the
//!   status to QEMU's isa-debug-exit port ([`DEBUG_EXIT_PORT`]), then powers off through
//!   ACPI (when the firmware tables describe how), then halts for good.
//!
//! Page verification does not depend on the platform.

use crate::hc;
use amsvm_abi::{exit, latency_bucket_floor, Mailbox, Progress, LATENCY_BUCKETS};
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// QEMU's `-device isa-debug-exit,iobase=0xf4,iosize=4`: writing `v` ends QEMU with exit
/// status `(v << 1) | 1`. Other VMMs ignore the write.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Booted by another VMM (a CPL0 entry).
static FOREIGN: AtomicBool = AtomicBool::new(false);
/// TSC at the start of the CPL3 code, and the conversion to nanoseconds:
/// ns = (cycles * NS_MUL) >> 32.
static TSC0: AtomicU64 = AtomicU64::new(0);
static NS_MUL: AtomicU64 = AtomicU64::new(0);
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
/// Least nanoseconds between two progress lines, and when the last one was printed
/// (u64::MAX: none yet).
static PROGRESS_GAP_NS: AtomicU64 = AtomicU64::new(0);
static LAST_LINE_NS: AtomicU64 = AtomicU64::new(u64::MAX);

/// The mailbox off amsvm: nobody reads it but the workload itself (the latency
/// histogram, the last counters).
static mut MAILBOX: Mailbox = Mailbox {
    arg: [0; 4],
    ret: [0; 4],
    progress: Progress {
        pages_touched: 0,
        pages_verified: 0,
        pages_written: 0,
        verify_failures: 0,
        disk_blocks_verified: 0,
        disk_failures: 0,
    },
    latency: [0; LATENCY_BUCKETS],
};

/// How the firmware's ACPI tables say to power off (see `acpi.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerOff {
    None,
    /// Write `value` (`width` bytes: 1 or 2) to I/O port `port`.
    Io { port: u16, value: u16, width: u8 },
    /// Write the byte `value` to guest-physical `addr` (identity-mapped).
    Mem { addr: u64, value: u8 },
}

static mut POWER_OFF: PowerOff = PowerOff::None;

/// Whether another VMM booted the workload.
pub fn foreign() -> bool {
    FOREIGN.load(Relaxed)
}

/// The TSC, which CPL3 may read (CR4.TSD is clear).
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Switches to the foreign platform: from now on CLOCK, PROGRESS and EXIT do not use
/// hypercalls. Call first thing in the CPL3 code of a CPL0 entry; the clock counts from
/// here, and works once [`set_tsc_khz`] ran.
pub fn start_foreign() {
    TSC0.store(rdtsc(), Relaxed);
    FOREIGN.store(true, Relaxed);
    hc::configure(addr_of!(MAILBOX) as u64);
}

/// The TSC when [`start_foreign`] ran.
pub fn start_tsc() -> u64 {
    TSC0.load(Relaxed)
}

/// Sets the TSC frequency and the progress-line interval.
pub fn set_tsc_khz(khz: u64, progress_ms: u64) {
    TSC_KHZ.store(khz, Relaxed);
    NS_MUL.store((1_000_000u64 << 32) / khz.max(1), Relaxed);
    PROGRESS_GAP_NS.store(progress_ms.saturating_mul(1_000_000), Relaxed);
}

/// Sets how to power off (found in the ACPI tables at boot).
pub fn set_power_off(p: PowerOff) {
    // SAFETY: single vCPU; written once at boot, before anything reads it.
    unsafe { addr_of_mut!(POWER_OFF).write(p) };
}

/// How [`exit`] powers off after the debug-exit port.
pub fn power_off_method() -> PowerOff {
    // SAFETY: single vCPU; written once at boot.
    unsafe { addr_of!(POWER_OFF).read() }
}

/// The mailbox off amsvm (the boot-info page's `mailbox`).
pub fn mailbox_addr() -> u64 {
    addr_of!(MAILBOX) as u64
}

/// Nanoseconds since the start (amsvm: since the partition started; elsewhere: since
/// the CPL3 code started).
pub fn clock_ns() -> u64 {
    if !foreign() {
        return hc::clock_ns();
    }
    let cycles = rdtsc().wrapping_sub(TSC0.load(Relaxed));
    ((cycles as u128 * NS_MUL.load(Relaxed) as u128) >> 32) as u64
}

/// Reports cumulative counters.
pub fn progress(p: &Progress) {
    if !foreign() {
        hc::progress(p);
        return;
    }
    set_last(p);
    let now = clock_ns();
    let last = LAST_LINE_NS.load(Relaxed);
    if last != u64::MAX && now.saturating_sub(last) < PROGRESS_GAP_NS.load(Relaxed) {
        return;
    }
    LAST_LINE_NS.store(now, Relaxed);
    println!(
        "progress: t_ms={} touched={} verified={} written={} failures={} disk_ok={} disk_bad={}",
        now / 1_000_000,
        p.pages_touched,
        p.pages_verified,
        p.pages_written,
        p.verify_failures,
        p.disk_blocks_verified,
        p.disk_failures
    );
}

/// Counts one access that took `cycles` TSC cycles in the latency histogram.
pub fn record_latency(cycles: u64) {
    hc::record_latency(cycles);
}

/// Ends the workload with `status` and `p` as the final counters.
pub fn exit(status: u64, p: &Progress) -> ! {
    if !foreign() {
        hc::exit(status, p)
    }
    set_last(p);
    exit_keep_progress(status)
}

/// Keeps `p` as the last reported counters (off amsvm).
fn set_last(p: &Progress) {
    // SAFETY: the static mailbox; single vCPU.
    unsafe { addr_of_mut!(MAILBOX.progress).write(*p) };
}

/// Ends the workload with `status`, the last reported counters final.
pub fn exit_keep_progress(status: u64) -> ! {
    if !foreign() {
        hc::exit_keep_progress(status)
    }
    print_histogram();
    // SAFETY: as in `set_last`.
    let p = unsafe { addr_of!(MAILBOX.progress).read() };
    let name = match status {
        exit::OK => "OK",
        exit::VERIFY_FAILED => "VERIFY_FAILED",
        exit::BAD_CONFIG => "BAD_CONFIG",
        exit::DEVICE_ERROR => "DEVICE_ERROR",
        _ => "PANIC",
    };
    println!(
        "exit: status={} ({}) t_ms={} touched={} verified={} written={} failures={} disk_ok={} disk_bad={}",
        status,
        name,
        clock_ns() / 1_000_000,
        p.pages_touched,
        p.pages_verified,
        p.pages_written,
        p.verify_failures,
        p.disk_blocks_verified,
        p.disk_failures
    );
    power_off(status)
}

/// The latency histogram, if the workload recorded one (`amsvm.latency_from`): one
/// line `latency: tsc_khz=K buckets=FLOOR:COUNT,...` with the non-empty buckets; bucket
/// FLOOR holds accesses of FLOOR cycles up to the next bucket's floor.
fn print_histogram() {
    let mut any = false;
    for b in 0..LATENCY_BUCKETS {
        // SAFETY: the static mailbox; single vCPU.
        let n = unsafe { addr_of!(MAILBOX.latency[b]).read_volatile() };
        if n == 0 {
            continue;
        }
        if !any {
            print!("latency: tsc_khz={} buckets=", TSC_KHZ.load(Relaxed));
        } else {
            print!(",");
        }
        any = true;
        print!("{}:{}", latency_bucket_floor(b), n);
    }
    if any {
        println!();
    }
}

/// isa-debug-exit, then ACPI power-off, then halt.
fn power_off(status: u64) -> ! {
    // SAFETY: port I/O (the TSS bitmap grants it at CPL3); a VMM without the device
    // ignores it.
    unsafe { core::arch::asm!("out dx, eax", in("dx") DEBUG_EXIT_PORT, in("eax") status as u32, options(nomem, nostack, preserves_flags)) };
    match power_off_method() {
        PowerOff::None => {}
        // SAFETY: the port the FADT names; port I/O only.
        PowerOff::Io { port, value, width: 2 } => unsafe {
            core::arch::asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
        },
        // SAFETY: as above.
        PowerOff::Io { port, value, .. } => unsafe {
            core::arch::asm!("out dx, al", in("dx") port, in("al") value as u8, options(nomem, nostack, preserves_flags))
        },
        // SAFETY: the register the FADT names, below 4 GiB (identity-mapped, checked in
        // acpi.rs).
        PowerOff::Mem { addr, value } => unsafe { (addr as *mut u8).write_volatile(value) },
    }
    crate::boot::halt()
}
