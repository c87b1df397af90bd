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
    let m = &ctx.shared.metrics;
    loop {
        if ctx.shared.is_stopping() {
            return;
        }
        let exit = vcpu.run();
        m.exits.fetch_add(1, Relaxed);
        if ctx.id == 0 && m.first_exit_ns.load(Relaxed) == 0 {
            m.first_exit_ns.store(ctx.shared.since_epoch_ns().max(1), Relaxed);
        }
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                if port == HYPERCALL_PORT && ctx.kind == BootKind::Native {
                    hypercall(ctx, data);
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

/// Handle a native image's hypercall. The mailbox is guest memory: every field is
/// untrusted and only copied into counters or used as a bounded timeout.
fn hypercall(ctx: &VcpuContext, data: &[u8]) {
    let m = &ctx.shared.metrics;
    if data.len() != 4 {
        m.bad_hypercalls.fetch_add(1, Relaxed);
        return;
    }
    let nr = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    let mb_addr = GuestAddress(layout::MAILBOX);
    let mb: Mailbox = match ctx.mem.read_obj::<Pod<Mailbox>>(mb_addr) {
        Ok(p) => p.0,
        Err(_) => {
            m.bad_hypercalls.fetch_add(1, Relaxed);
            return;
        }
    };
    m.hypercalls.fetch_add(1, Relaxed);
    let ret = |v: u64| {
        let off = core::mem::offset_of!(Mailbox, ret) as u64;
        let _ = ctx.mem.write_obj(v, mb_addr.unchecked_add(off));
    };
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
            ret(ctx.shared.wait_event(timeout) as u64);
        }
        _ => {
            m.bad_hypercalls.fetch_add(1, Relaxed);
            tracing::debug!(partition = %ctx.shared.name, "unknown hypercall {nr}");
        }
    }
}
