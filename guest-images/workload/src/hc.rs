//! Hypercalls: arguments go into the mailbox page, then a 32-bit `out` of the hypercall
//! number to [`HYPERCALL_PORT`]; the vCPU is blocked in amsvm until it is done. amsvm
//! grants CPL3 port access through the TSS I/O permission bitmap (see `amsvm_abi`).

use amsvm_abi::{hc, layout, Mailbox, Progress, HYPERCALL_PORT};
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{AtomicU64, Ordering};

/// The ABI's default until the boot-info page has been validated.
static MAILBOX: AtomicU64 = AtomicU64::new(layout::MAILBOX);

/// Uses the mailbox the boot-info page announced.
pub fn configure(mailbox: u64) {
    MAILBOX.store(mailbox, Ordering::Relaxed);
}

fn mailbox() -> *mut Mailbox {
    MAILBOX.load(Ordering::Relaxed) as *mut Mailbox
}

fn call(nr: u32) {
    // Mailbox accesses are volatile too, so the compiler keeps them on their side of the
    // doorbell store; the fences say so explicitly. x86 does not reorder stores.
    core::sync::atomic::compiler_fence(Ordering::SeqCst);
    // SAFETY: port I/O to the hypercall port exits to amsvm, which only reads and writes
    // the mailbox page; no Rust-visible memory other than the mailbox changes. The asm
    // is not `nomem`: the mailbox stores above must happen before it.
    unsafe { core::arch::asm!("out dx, eax", in("dx") HYPERCALL_PORT, in("eax") nr, options(nostack, preserves_flags)) };
    core::sync::atomic::compiler_fence(Ordering::SeqCst);
}

fn set_progress(p: &Progress) {
    // SAFETY: the mailbox address was validated against guest RAM (or is the ABI's
    // default, which lies in RAM below the image).
    unsafe { addr_of_mut!((*mailbox()).progress).write_volatile(*p) };
}

fn set_arg(i: usize, value: u64) {
    // SAFETY: as in `set_progress`; `i` indexes a fixed array (bounds-checked).
    unsafe { addr_of_mut!((*mailbox()).arg[i]).write_volatile(value) };
}

fn ret(i: usize) -> u64 {
    // SAFETY: as in `set_progress`.
    unsafe { addr_of!((*mailbox()).ret[i]).read_volatile() }
}

/// Reports cumulative counters.
pub fn progress(p: &Progress) {
    set_progress(p);
    call(hc::PROGRESS);
}

/// Nanoseconds since the partition started (host monotonic clock).
pub fn clock_ns() -> u64 {
    call(hc::CLOCK);
    ret(0)
}

/// Blocks until an event arrives for the partition or `timeout_ns` pass (amsvm waits
/// 100 ms at most); true if an event woke it. (Used by the paging server, which shares
/// this file.)
#[allow(dead_code)]
pub fn wait(timeout_ns: u64) -> bool {
    set_arg(0, timeout_ns);
    call(hc::WAIT);
    ret(0) == 1
}

/// Ends the partition with `status` and `p` as the final counters.
pub fn exit(status: u64, p: &Progress) -> ! {
    set_progress(p);
    exit_keep_progress(status)
}

/// Ends the partition with `status`, leaving the last reported counters in place.
pub fn exit_keep_progress(status: u64) -> ! {
    set_arg(0, status);
    loop {
        // amsvm does not resume a vCPU after EXIT; should it ever, ask again.
        call(hc::EXIT);
    }
}

/// Count one access that took `cycles` TSC cycles in the mailbox's histogram (amsvm
/// reads it at EXIT).
pub fn record_latency(cycles: u64) {
    let b = amsvm_abi::latency_bucket(cycles);
    // SAFETY: as in `set_progress`; `b` < LATENCY_BUCKETS (the array's length).
    unsafe {
        let slot = addr_of_mut!((*mailbox()).latency[b]);
        slot.write_volatile(slot.read_volatile() + 1);
    }
}
