//! vCPU threads: the KVM_RUN loop, exit dispatch to the port-I/O and MMIO buses, the
//! native-image hypercall port, and kicking a vCPU out of the guest when its partition
//! stops.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Once;
use std::time::Duration;

use amsvm_abi::{hc, layout, Mailbox, HYPERCALL_PORT};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::devices::Bus;
use crate::kvm::native::Pod;
use crate::partition::{Outcome, Shared};
use crate::GuestMemory;

/// What the partition runs; decides how a triple fault and HLT are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootKind {
    /// A CPL3 image: a triple fault is an exception in the image (crash).
    Native,
    /// Linux: a triple fault is its last-resort reboot.
    Linux,
}

/// Everything a vCPU thread needs besides its fd.
pub struct VcpuContext {
    pub id: u32,
    pub kind: BootKind,
    pub io: Bus,
    pub mmio: Bus,
    pub mem: GuestMemory,
    pub shared: std::sync::Arc<Shared>,
    /// A [`SharedVcpu`]'s: WAIT parks the vCPU (the loop returns) instead of blocking.
    pub park_on_wait: bool,
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the (empty) kick-signal handler once per process: its only job is to make
/// KVM_RUN return with EINTR.
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler) {
            tracing::error!("cannot install the vCPU kick signal handler: {e}");
        }
    });
}

/// Longest time one WAIT hypercall may block, so that a stopping partition is noticed.
const MAX_WAIT: Duration = Duration::from_millis(100);

/// Run a vCPU until its partition stops. Returns when `shared` has an outcome.
pub fn run(vcpu: &mut VcpuFd, ctx: &VcpuContext) {
    debug_assert!(!ctx.park_on_wait, "a parking vCPU is run by SharedVcpu");
    // Without `park_on_wait`, WAIT blocks in place and this returns only at the end.
    let parked = run_until_park(vcpu, ctx);
    debug_assert!(parked.is_none());
}

/// Run a vCPU until its partition stops (None) or, with `park_on_wait`, until the
/// guest calls WAIT with no event pending (Some(its timeout)); the WAIT's return value
/// is then written by whoever resumes it ([`write_ret`]).
fn run_until_park(vcpu: &mut VcpuFd, ctx: &VcpuContext) -> Option<Duration> {
    let m = &ctx.shared.metrics;
    loop {
        if ctx.shared.is_stopping() {
            return None;
        }
        let exit = vcpu.run();
        m.exits.fetch_add(1, Relaxed);
        if ctx.id == 0 && m.first_exit_ns.load(Relaxed) == 0 {
            m.first_exit_ns.store(ctx.shared.since_epoch_ns().max(1), Relaxed);
        }
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                if port == HYPERCALL_PORT && ctx.kind == BootKind::Native {
                    if let Some(timeout) = hypercall(ctx, data) {
                        return Some(timeout);
                    }
                } else if !ctx.io.write(port as u64, data) {
                    m.unknown_io.fetch_add(1, Relaxed);
                    tracing::trace!(partition = %ctx.shared.name, "write to unclaimed port {port:#x}");
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if !ctx.io.read(port as u64, data) {
                    m.unknown_io.fetch_add(1, Relaxed);
                    tracing::trace!(partition = %ctx.shared.name, "read of unclaimed port {port:#x}");
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio.read(addr, data) {
                    m.unknown_mmio.fetch_add(1, Relaxed);
                    tracing::debug!(partition = %ctx.shared.name, "read of unclaimed MMIO {addr:#x}");
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !ctx.mmio.write(addr, data) {
                    m.unknown_mmio.fetch_add(1, Relaxed);
                    tracing::debug!(partition = %ctx.shared.name, "write to unclaimed MMIO {addr:#x}");
                }
            }
            Ok(VcpuExit::Hlt) => ctx.shared.finish(Outcome::PowerOff),
            Ok(VcpuExit::Shutdown) => match ctx.kind {
                BootKind::Linux => ctx.shared.finish(Outcome::Reset),
                BootKind::Native => {
                    let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                    ctx.shared.finish(Outcome::Crashed(format!(
                        "triple fault on vCPU {} near rip {rip:#x}: the image raised an exception (no IDT at CPL3)",
                        ctx.id
                    )))
                }
            },
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => ctx.shared.finish(Outcome::Reset),
                _ => ctx.shared.finish(Outcome::PowerOff),
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => ctx.shared.finish(Outcome::Crashed(format!(
                "KVM could not enter vCPU {} (hardware reason {reason:#x}, cpu {cpu})",
                ctx.id
            ))),
            Ok(VcpuExit::InternalError) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                ctx.shared.finish(Outcome::Crashed(format!(
                    "KVM internal error on vCPU {} at rip {rip:#x} (instruction KVM cannot emulate)",
                    ctx.id
                )))
            }
            Ok(VcpuExit::Intr) => {}
            Ok(other) => {
                tracing::debug!(partition = %ctx.shared.name, "unhandled vCPU exit {other:?}");
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => ctx.shared.finish(Outcome::Crashed(format!("KVM_RUN failed on vCPU {}: {e}", ctx.id))),
        }
    }
}

/// Write the return value of the hypercall the vCPU is stopped in.
fn write_ret(ctx: &VcpuContext, v: u64) {
    let off = core::mem::offset_of!(Mailbox, ret) as u64;
    let _ = ctx.mem.write_obj(v, GuestAddress(layout::MAILBOX).unchecked_add(off));
}

/// Handle a native image's hypercall. The mailbox is guest memory: every field is
/// untrusted and only copied into counters or used as a bounded timeout. Returns the
/// timeout of a WAIT that parks the vCPU (`park_on_wait`, no event pending).
fn hypercall(ctx: &VcpuContext, data: &[u8]) -> Option<Duration> {
    let m = &ctx.shared.metrics;
    if data.len() != 4 {
        m.bad_hypercalls.fetch_add(1, Relaxed);
        return None;
    }
    let nr = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    let mb_addr = GuestAddress(layout::MAILBOX);
    let mb: Mailbox = match ctx.mem.read_obj::<Pod<Mailbox>>(mb_addr) {
        Ok(p) => p.0,
        Err(_) => {
            m.bad_hypercalls.fetch_add(1, Relaxed);
            return None;
        }
    };
    m.hypercalls.fetch_add(1, Relaxed);
    let ret = |v: u64| write_ret(ctx, v);
    match nr {
        hc::PROGRESS => m.set_progress(&mb.progress),
        hc::EXIT => {
            m.set_progress(&mb.progress);
            *m.latency.lock().unwrap_or_else(|e| e.into_inner()) = mb.latency.to_vec();
            ctx.shared.finish(Outcome::Exited(mb.arg[0]));
        }
        hc::CLOCK => ret(ctx.shared.since_start_ns()),
        hc::WAIT => {
            let timeout = Duration::from_nanos(mb.arg[0]).min(MAX_WAIT);
            // Work found before waiting (see `Shared::set_pre_wait`) ends the WAIT at once.
            let work = ctx.shared.pre_wait();
            if ctx.park_on_wait {
                if !work && !ctx.shared.take_event() {
                    return Some(timeout);
                }
                ret(1);
            } else {
                ret((work || ctx.shared.wait_event(timeout)) as u64);
            }
        }
        _ => {
            m.bad_hypercalls.fetch_add(1, Relaxed);
            tracing::debug!(partition = %ctx.shared.name, "unknown hypercall {nr}");
        }
    }
    None
}

/// A vCPU that any thread may run: the paging server's. Its own thread runs it whenever
/// it is not parked in WAIT; a thread that hands it a request may run it itself
/// ([`SharedVcpu::try_run`]) until it parks again, so that the request is served on
/// the requester's thread with no hand-off to another thread and back (each costs tens
/// of microseconds on these hosts).
pub struct SharedVcpu {
    state: std::sync::Mutex<Parked>,
    /// The thread in KVM_RUN on it now (pthread_t; 0: none), to kick it when stopping.
    /// Cleared under the lock, so a kick never signals a thread that moved on.
    runner: std::sync::Mutex<u64>,
}

struct Parked {
    fd: VcpuFd,
    ctx: VcpuContext,
    /// Stopped in a WAIT whose return value is not written yet.
    parked: bool,
}

impl SharedVcpu {
    pub fn new(fd: VcpuFd, mut ctx: VcpuContext) -> SharedVcpu {
        ctx.park_on_wait = true;
        SharedVcpu { state: std::sync::Mutex::new(Parked { fd, ctx, parked: false }), runner: std::sync::Mutex::new(0) }
    }

    /// Resume (a parked WAIT returns `ret`) and run until the vCPU parks again; None
    /// when the partition stops.
    fn resume(&self, st: &mut Parked, ret: u64) -> Option<Duration> {
        if st.parked {
            write_ret(&st.ctx, ret);
            st.parked = false;
        }
        // SAFETY: pthread_self has no preconditions.
        *self.runner.lock().unwrap_or_else(|e| e.into_inner()) = unsafe { libc::pthread_self() } as u64;
        let r = run_until_park(&mut st.fd, &st.ctx);
        *self.runner.lock().unwrap_or_else(|e| e.into_inner()) = 0;
        st.parked = r.is_some();
        r
    }

    /// The vCPU's own thread: run it, and while it is parked, wait for an event (or its
    /// WAIT's timeout) as the WAIT would. Returns when the partition stops.
    pub fn serve(&self) {
        let shared = self.state.lock().unwrap_or_else(|e| e.into_inner()).ctx.shared.clone();
        let mut woke = false;
        loop {
            let park = {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                self.resume(&mut st, woke as u64)
            };
            let Some(timeout) = park else { return };
            woke = shared.wait_event(timeout);
        }
    }

    /// Run the parked vCPU on this thread until it parks again, after `prepare` (which
    /// hands it work; false: there was none to hand, leave it parked). False if another
    /// thread runs it or it is not parked.
    pub fn try_run(&self, prepare: impl FnOnce() -> bool) -> bool {
        let Ok(mut st) = self.state.try_lock() else { return false };
        if !st.parked || !prepare() {
            return false;
        }
        self.resume(&mut st, 1);
        true
    }

    /// Kick the thread that runs it out of the guest (the partition is stopping).
    pub fn kick(&self) {
        let t = self.runner.lock().unwrap_or_else(|e| e.into_inner());
        if *t != 0 {
            // SAFETY: the thread stored its own pthread_t and cannot clear it (nor go on
            // and end) while we hold the lock, so it is alive; the kick signal has a
            // no-op handler.
            unsafe { libc::pthread_kill(*t as libc::pthread_t, kick_signal()) };
        }
    }
}
