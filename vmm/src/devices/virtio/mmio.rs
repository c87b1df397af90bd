//! virtio-mmio transport (virtio 1.2, 4.2), register layout "version 2" only: a legacy
//! (version 1) driver finds Version = 2 and gives up, which is what we want.
//!
//! One [`MmioTransport`] owns one [`VirtioDevice`] and presents it in a 4 KiB MMIO window:
//! control registers at 0x000..0x100, the device configuration space from 0x100.
//! QueueNotify writes are caught in the kernel by one ioeventfd per queue (datamatch =
//! queue index, 32-bit writes); a notify that still reaches us through a vCPU exit (other
//! access width) is forwarded to the same eventfd. The event loop (`event-manager`) reads
//! those eventfds and lets the device process the queue. Device interrupts go out through
//! an irqfd on the transport's GSI.
//!
//! Every register access comes from the guest: unknown offsets, widths other than 32 bits
//! in the control area and out-of-order state changes are answered with zeros or ignored,
//! and counted in [`MmioMetrics::bad_accesses`].

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kvm_ioctls::{IoEventAddress, VmFd};
use virtio_bindings::virtio_mmio as regs;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    guest_caused_warning, status, VirtioDevice, VirtioError, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::BusDevice;
use crate::GuestMemory;

/// Size of the MMIO window of one transport.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// "virt" in little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// Register layout version: 2 = virtio 1.x (modern).
pub const MMIO_VERSION: u32 = 2;
/// VendorID register value ("amsv").
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"amsv");
/// Most queues one device may have. The register window could address more, but no
/// device here needs them, and the bound keeps per-transport eventfds few.
pub const MAX_QUEUES: usize = 8;
/// Largest queue size the split-ring format allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Offset of the device configuration space in the window.
pub const CONFIG_SPACE_OFFSET: u64 = regs::VIRTIO_MMIO_CONFIG as u64;
/// Offset of the QueueNotify register (where the ioeventfds sit).
pub const QUEUE_NOTIFY_OFFSET: u64 = regs::VIRTIO_MMIO_QUEUE_NOTIFY as u64;

const MAGIC: u64 = regs::VIRTIO_MMIO_MAGIC_VALUE as u64;
const VERSION: u64 = regs::VIRTIO_MMIO_VERSION as u64;
const DEVICE_ID: u64 = regs::VIRTIO_MMIO_DEVICE_ID as u64;
const VENDOR: u64 = regs::VIRTIO_MMIO_VENDOR_ID as u64;
const DEVICE_FEATURES: u64 = regs::VIRTIO_MMIO_DEVICE_FEATURES as u64;
const DEVICE_FEATURES_SEL: u64 = regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
const DRIVER_FEATURES: u64 = regs::VIRTIO_MMIO_DRIVER_FEATURES as u64;
const DRIVER_FEATURES_SEL: u64 = regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
const QUEUE_SEL: u64 = regs::VIRTIO_MMIO_QUEUE_SEL as u64;
const QUEUE_NUM_MAX: u64 = regs::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
const QUEUE_NUM: u64 = regs::VIRTIO_MMIO_QUEUE_NUM as u64;
const QUEUE_READY: u64 = regs::VIRTIO_MMIO_QUEUE_READY as u64;
const INTERRUPT_STATUS: u64 = regs::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
const INTERRUPT_ACK: u64 = regs::VIRTIO_MMIO_INTERRUPT_ACK as u64;
const STATUS: u64 = regs::VIRTIO_MMIO_STATUS as u64;
const QUEUE_DESC_LOW: u64 = regs::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
const QUEUE_DESC_HIGH: u64 = regs::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
const QUEUE_AVAIL_LOW: u64 = regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
const QUEUE_AVAIL_HIGH: u64 = regs::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
const QUEUE_USED_LOW: u64 = regs::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
const QUEUE_USED_HIGH: u64 = regs::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
const SHM_SEL: u64 = regs::VIRTIO_MMIO_SHM_SEL as u64;
const SHM_LEN_LOW: u64 = regs::VIRTIO_MMIO_SHM_LEN_LOW as u64;
const SHM_LEN_HIGH: u64 = regs::VIRTIO_MMIO_SHM_LEN_HIGH as u64;
const SHM_BASE_LOW: u64 = regs::VIRTIO_MMIO_SHM_BASE_LOW as u64;
const SHM_BASE_HIGH: u64 = regs::VIRTIO_MMIO_SHM_BASE_HIGH as u64;
const CONFIG_GENERATION: u64 = regs::VIRTIO_MMIO_CONFIG_GENERATION as u64;
const QUEUE_NOTIFY: u64 = QUEUE_NOTIFY_OFFSET;

/// Counters of one transport.
#[derive(Debug, Default)]
pub struct MmioMetrics {
    /// Register accesses ignored: unknown offset, width other than 32 bits or unaligned
    /// in the control area, read of a write-only register, write out of protocol order.
    pub bad_accesses: AtomicU64,
    /// QueueNotify writes that reached the VMM through a vCPU exit (not the ioeventfd).
    pub exit_notifications: AtomicU64,
    /// QueueNotify writes naming a queue the device does not have.
    pub bad_notifications: AtomicU64,
    /// Queue eventfd wake-ups handled by the event loop.
    pub queue_events: AtomicU64,
    /// Successful activations (DRIVER_OK).
    pub activations: AtomicU64,
    /// DRIVER_OK with an invalid queue setup or a device refusing to start: the
    /// device is left inactive with DEVICE_NEEDS_RESET set.
    pub activation_failures: AtomicU64,
    /// FEATURES_OK refused (features not offered, or no VIRTIO_F_VERSION_1).
    pub feature_rejections: AtomicU64,
    /// Queue processing errors that made the device ask for a reset.
    pub device_errors: AtomicU64,
    /// Device resets by the driver (Status = 0).
    pub resets: AtomicU64,
}

/// Queue registers as the driver wrote them; validated only on DRIVER_OK.
#[derive(Clone, Copy, Debug)]
struct QueueRegs {
    max_size: u16,
    size: u32,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        Self { max_size, size: u32::from(max_size), ready: false, desc: 0, avail: 0, used: 0 }
    }
}

/// Bytes of the split-ring parts of a queue of `size` entries, as virtio-queue's
/// `Queue::is_valid` counts them: descriptor table (16 per entry), available ring (flags,
/// idx, ring, used_event) and used ring (flags, idx, ring of 8-byte elements, avail_event).
fn ring_sizes(size: u16) -> [u64; 3] {
    let n = u64::from(size);
    [16 * n, 6 + 2 * n, 6 + 8 * n]
}

/// Whether the rings of the queue `r` (of `size` entries) lie inside guest memory; the
/// error names the first ring that does not.
fn rings_in_memory(mem: &GuestMemory, size: u16, r: &QueueRegs) -> Result<(), String> {
    let [desc, avail, used] = ring_sizes(size);
    for (what, addr, len) in
        [("descriptor table", r.desc, desc), ("available ring", r.avail, avail), ("used ring", r.used, used)]
    {
        // len is at most 16 * 32768 bytes.
        let inside = addr.checked_add(len).is_some() && mem.check_range(GuestAddress(addr), len as usize);
        if !inside {
            return Err(format!(
                "{what} at {addr:#x} ({len} bytes for queue size {size}) is not inside guest memory"
            ));
        }
    }
    Ok(())
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<VirtioInterrupt>,
    queue_evts: Vec<EventFd>,
    queues: Vec<QueueRegs>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    mmio_base: u64,
    gsi: u32,
    metrics: Arc<MmioMetrics>,
    /// Queue notifications are handled on the notifying vCPU's exit (no ioeventfd).
    inline: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device", &self.device.name())
            .field("mmio_base", &format_args!("{:#x}", self.mmio_base))
            .field("gsi", &self.gsi)
            .field("status", &format_args!("{:#x}", self.status))
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Put `device` behind a virtio-mmio window at guest-physical `mmio_base`: registers
    /// one ioeventfd per queue on the QueueNotify register and an irqfd for `gsi` (the
    /// in-kernel irqchip must exist). The caller inserts the transport in the MMIO bus at
    /// `mmio_base` with length [`MMIO_WINDOW_SIZE`] and adds it to the event manager.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        vm: &VmFd,
        mmio_base: u64,
        gsi: u32,
    ) -> Result<MmioTransport, VirtioError> {
        let mut t = Self::build(device, mem)?;
        t.mmio_base = mmio_base;
        t.gsi = gsi;
        let notify = IoEventAddress::Mmio(mmio_base + QUEUE_NOTIFY_OFFSET);
        for (i, evt) in t.queue_evts.iter().enumerate() {
            if let Err(source) = vm.register_ioevent(evt, &notify, i as u32) {
                for (j, done) in t.queue_evts.iter().enumerate().take(i) {
                    let _ = vm.unregister_ioevent(done, &notify, j as u32);
                }
                return Err(VirtioError::RegisterIoEvent {
                    queue: i,
                    addr: mmio_base + QUEUE_NOTIFY_OFFSET,
                    source,
                });
            }
        }
        if let Err(source) = vm.register_irqfd(t.interrupt.irq_eventfd(), gsi) {
            for (j, done) in t.queue_evts.iter().enumerate() {
                let _ = vm.unregister_ioevent(done, &notify, j as u32);
            }
            return Err(VirtioError::RegisterIrqfd { gsi, source });
        }
        Ok(t)
    }

    /// A transport with no VM behind it, for tests of devices.
    #[cfg(test)]
    pub(crate) fn for_tests(device: Box<dyn VirtioDevice>, mem: GuestMemory) -> Self {
        Self::build(device, mem).expect("a valid test device")
    }

    /// A transport with no VM behind it whose queue notifications are processed inline
    /// (fuzzing: the register interface and the device, driven by writes).
    #[doc(hidden)]
    pub fn detached(device: Box<dyn VirtioDevice>, mem: GuestMemory) -> Result<Self, VirtioError> {
        let mut t = Self::build(device, mem)?;
        t.inline = true;
        Ok(t)
    }

    /// The transport without any KVM registration (eventfds exist but nothing in the
    /// kernel writes or reads them).
    fn build(device: Box<dyn VirtioDevice>, mem: GuestMemory) -> Result<Self, VirtioError> {
        let name = device.name();
        let sizes = device.queue_max_sizes();
        if sizes.is_empty() || sizes.len() > MAX_QUEUES {
            return Err(VirtioError::QueueCount { device: name, count: sizes.len(), max: MAX_QUEUES });
        }
        for (i, &s) in sizes.iter().enumerate() {
            if s == 0 || s > MAX_QUEUE_SIZE || !s.is_power_of_two() {
                return Err(VirtioError::InvalidQueue {
                    device: name,
                    queue: i,
                    reason: format!("maximum size {s} is not a power of two in 1..={MAX_QUEUE_SIZE}"),
                });
            }
        }
        if device.device_features() & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(VirtioError::Activate {
                device: name,
                reason: "the device does not offer VIRTIO_F_VERSION_1, which the transport requires".into(),
            });
        }
        let queues: Vec<QueueRegs> = sizes.iter().map(|&s| QueueRegs::new(s)).collect();
        let queue_evts = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| VirtioError::EventFd { what: "a queue notification", source })?;
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(VirtioInterrupt::new()?),
            queue_evts,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            mmio_base: 0,
            gsi: 0,
            metrics: Arc::new(MmioMetrics::default()),
            inline: false,
        })
    }

    /// Like [`new`](Self::new), but without ioeventfds: a queue notification is an MMIO
    /// exit of the notifying vCPU, which processes the queue before it returns to the
    /// guest. For a polling guest (the paging server) that waits on its requests: no
    /// hand-off to the event loop's thread and back.
    pub fn new_inline(device: Box<dyn VirtioDevice>, mem: GuestMemory, vm: &VmFd, mmio_base: u64, gsi: u32) -> Result<MmioTransport, VirtioError> {
        let mut t = Self::build(device, mem)?;
        t.mmio_base = mmio_base;
        t.gsi = gsi;
        t.inline = true;
        vm.register_irqfd(t.interrupt.irq_eventfd(), gsi).map_err(|source| VirtioError::RegisterIrqfd { gsi, source })?;
        Ok(t)
    }

    /// Undo the KVM registrations of [`new`](Self::new) (queue ioeventfds, irqfd), for a
    /// VMM that drops this transport while the VM lives on and may place another device
    /// at the same address. Without it the registrations last as long as the VM.
    pub fn unregister(&self, vm: &VmFd) -> Result<(), VirtioError> {
        let notify = IoEventAddress::Mmio(self.mmio_base + QUEUE_NOTIFY_OFFSET);
        for (i, evt) in self.queue_evts.iter().enumerate().filter(|_| !self.inline) {
            vm.unregister_ioevent(evt, &notify, i as u32).map_err(|source| VirtioError::Unregister {
                what: format!(
                    "the notify ioeventfd of queue {i} at {:#x}",
                    self.mmio_base + QUEUE_NOTIFY_OFFSET
                ),
                source,
            })?;
        }
        vm.unregister_irqfd(self.interrupt.irq_eventfd(), self.gsi).map_err(|source| {
            VirtioError::Unregister { what: format!("the irqfd of GSI {}", self.gsi), source }
        })
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    pub fn metrics(&self) -> Arc<MmioMetrics> {
        self.metrics.clone()
    }

    pub fn mmio_base(&self) -> u64 {
        self.mmio_base
    }

    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The Status register as the driver reads it.
    pub fn status(&self) -> u32 {
        let mut s = self.status;
        if self.interrupt.needs_reset() {
            s |= status::DEVICE_NEEDS_RESET;
        }
        s
    }

    /// The eventfd signalled when the driver notifies queue `index`.
    pub fn queue_eventfd(&self, index: usize) -> Option<&EventFd> {
        self.queue_evts.get(index)
    }

    /// Handle a notification of queue `index`: drain its eventfd and, if the device is
    /// running, let it process the queue. Called by the event loop; callable directly by
    /// code that polls instead.
    pub fn process_queue_event(&mut self, index: usize) {
        let Some(evt) = self.queue_evts.get(index) else { return };
        // Non-blocking. Nothing pending (EAGAIN) means the notification was drained by a
        // reset since: it belonged to the device's previous life, and its queues are gone.
        if evt.read().is_err() {
            return;
        }
        self.process_notified(index);
    }

    /// Process queue `index` after a notification (the eventfd's, or an inline exit's).
    fn process_notified(&mut self, index: usize) {
        self.metrics.queue_events.fetch_add(1, Relaxed);
        if self.status & status::DRIVER_OK == 0 || !self.device.is_activated() || self.interrupt.needs_reset()
        {
            return;
        }
        if let Err(e) = self.device.process_queue(index) {
            let n = self.metrics.device_errors.fetch_add(1, Relaxed);
            guest_caused_warning(
                n,
                format_args!("virtio-mmio at {:#x}: {e}; device needs reset", self.mmio_base),
            );
            self.interrupt.signal_needs_reset();
        }
    }

    fn bad_access(&self, what: &str, offset: u64, len: usize) {
        self.metrics.bad_accesses.fetch_add(1, Relaxed);
        tracing::debug!(
            device = self.device.name(),
            "virtio-mmio: ignored {what} of {len} bytes at offset {offset:#x}"
        );
    }

    fn selected_queue(&self) -> Option<&QueueRegs> {
        self.queues.get(self.queue_sel as usize)
    }

    /// The selected queue, if the driver may configure it now: after FEATURES_OK, before
    /// DRIVER_OK, and (except for QueueReady itself) while the queue is not ready.
    fn configurable_queue(&mut self, ready_reg: bool) -> Option<&mut QueueRegs> {
        let s = self.status;
        if s & status::FEATURES_OK == 0 || s & (status::DRIVER_OK | status::FAILED) != 0 {
            return None;
        }
        let q = self.queues.get_mut(self.queue_sel as usize)?;
        (ready_reg || !q.ready).then_some(q)
    }

    fn read_reg(&self, offset: u64) -> Option<u32> {
        let v = match offset {
            MAGIC => MAGIC_VALUE,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR => VENDOR_ID,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.status(),
            // No shared memory regions: a length of -1 says "no such region".
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => return None,
        };
        Some(v)
    }

    fn write_reg(&mut self, offset: u64, v: u32) -> bool {
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = v,
            DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            DRIVER_FEATURES => {
                let s = self.status;
                if s & status::DRIVER == 0 || s & (status::FEATURES_OK | status::FAILED) != 0 {
                    return false;
                }
                match self.driver_features_sel {
                    0 => set_low(&mut self.driver_features, v),
                    1 => set_high(&mut self.driver_features, v),
                    // Feature bits above 63: none offered, so a driver may only write 0.
                    _ => return v == 0,
                }
            }
            QUEUE_SEL => self.queue_sel = v,
            QUEUE_NUM => match self.configurable_queue(false) {
                Some(q) => q.size = v,
                None => return false,
            },
            QUEUE_READY => match (self.configurable_queue(true), v) {
                (Some(q), 0 | 1) => q.ready = v == 1,
                _ => return false,
            },
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_AVAIL_LOW | QUEUE_AVAIL_HIGH | QUEUE_USED_LOW
            | QUEUE_USED_HIGH => {
                let Some(q) = self.configurable_queue(false) else { return false };
                match offset {
                    QUEUE_DESC_LOW => set_low(&mut q.desc, v),
                    QUEUE_DESC_HIGH => set_high(&mut q.desc, v),
                    QUEUE_AVAIL_LOW => set_low(&mut q.avail, v),
                    QUEUE_AVAIL_HIGH => set_high(&mut q.avail, v),
                    QUEUE_USED_LOW => set_low(&mut q.used, v),
                    _ => set_high(&mut q.used, v),
                }
            }
            QUEUE_NOTIFY => self.notify(v),
            INTERRUPT_ACK => self.interrupt.ack(v),
            STATUS => return self.set_status(v),
            // No shared memory regions; selecting one is harmless.
            SHM_SEL => {}
            _ => return false,
        }
        true
    }

    /// A QueueNotify write that reached us through a vCPU exit: same effect as the
    /// ioeventfd (the event loop does the work, not the vCPU thread) — or, for an inline
    /// transport, the queue is processed here and now.
    fn notify(&mut self, v: u32) {
        self.metrics.exit_notifications.fetch_add(1, Relaxed);
        if self.inline {
            if (v as usize) < self.queue_evts.len() {
                self.process_notified(v as usize);
            } else {
                self.metrics.bad_notifications.fetch_add(1, Relaxed);
            }
            return;
        }
        // Without VIRTIO_F_NOTIFICATION_DATA the value is the queue index.
        match self.queue_evts.get(v as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    tracing::warn!(device = self.device.name(), "virtio-mmio: cannot signal queue {v}: {e}");
                }
            }
            None => {
                self.metrics.bad_notifications.fetch_add(1, Relaxed);
            }
        }
    }

    /// Status register state machine (virtio 1.2, 3.1.1). Bits are only ever added, in
    /// order ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK; FAILED may be added any time;
    /// writing 0 resets the device. Anything else is ignored.
    fn set_status(&mut self, v: u32) -> bool {
        if v == 0 {
            self.reset();
            return true;
        }
        let cur = self.status;
        // DEVICE_NEEDS_RESET is the device's bit; a driver echoing it back is harmless.
        let v = v & !status::DEVICE_NEEDS_RESET;
        if v & cur != cur {
            return false; // clearing bits without a reset
        }
        let added = v & !cur;
        if added & status::FAILED != 0 || cur & status::FAILED != 0 {
            self.status |= added & status::FAILED;
            return added & !status::FAILED == 0;
        }
        let known = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        if added & !known != 0 {
            return false;
        }
        for bit in [status::ACKNOWLEDGE, status::DRIVER, status::FEATURES_OK, status::DRIVER_OK] {
            if added & bit == 0 {
                continue;
            }
            let ok = match bit {
                status::ACKNOWLEDGE => true,
                status::DRIVER => self.status & status::ACKNOWLEDGE != 0,
                status::FEATURES_OK => self.status & status::DRIVER != 0 && self.negotiate_features(),
                _ => self.status & status::FEATURES_OK != 0,
            };
            if !ok {
                return false;
            }
            self.status |= bit;
            if bit == status::DRIVER_OK {
                self.activate();
            }
        }
        true
    }

    /// FEATURES_OK: accept the driver's features if they are a subset of the offered ones
    /// and include VIRTIO_F_VERSION_1; otherwise FEATURES_OK stays clear and the driver
    /// sees it refused.
    fn negotiate_features(&mut self) -> bool {
        let offered = self.device.device_features();
        let wanted = self.driver_features;
        let reason = if wanted & !offered != 0 {
            Some(format!("driver accepted features {:#x} that were not offered", wanted & !offered))
        } else if wanted & (1 << VIRTIO_F_VERSION_1) == 0 {
            Some("driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)".to_string())
        } else {
            None
        };
        if let Some(reason) = reason {
            let n = self.metrics.feature_rejections.fetch_add(1, Relaxed);
            guest_caused_warning(
                n,
                format_args!("virtio-mmio at {:#x}: FEATURES_OK refused: {reason}", self.mmio_base),
            );
            return false;
        }
        self.device.ack_features(wanted);
        true
    }

    /// Build and validate the queue the driver configured at index `i`.
    fn build_queue(&self, i: usize, event_idx: bool) -> Result<Queue, String> {
        let r = self.queues[i];
        let mut q = Queue::new(r.max_size).map_err(|e| format!("maximum size {}: {e}", r.max_size))?;
        if !r.ready {
            return Ok(q);
        }
        let size = u16::try_from(r.size).map_err(|_| format!("size {} is too large", r.size))?;
        q.try_set_size(size)
            .map_err(|_| format!("size {size} is not a power of two in 1..={}", r.max_size))?;
        q.try_set_desc_table_address(GuestAddress(r.desc))
            .map_err(|_| format!("descriptor table {:#x} is not 16-byte aligned", r.desc))?;
        q.try_set_avail_ring_address(GuestAddress(r.avail))
            .map_err(|_| format!("available ring {:#x} is not 2-byte aligned", r.avail))?;
        q.try_set_used_ring_address(GuestAddress(r.used))
            .map_err(|_| format!("used ring {:#x} is not 4-byte aligned", r.used))?;
        if r.avail == 0 {
            // virtio-queue treats an available ring at 0 as "not configured".
            return Err("available ring at guest address 0 is not supported".into());
        }
        // Checked here first: `Queue::is_valid` logs every refusal at error level, and a
        // guest retrying a bad setup in a loop must not flood the host's log.
        rings_in_memory(&self.mem, size, &r)?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        if !q.is_valid(&self.mem) {
            return Err(format!(
                "rings (descriptors {:#x}, available {:#x}, used {:#x}, size {size}) are not inside guest memory",
                r.desc, r.avail, r.used
            ));
        }
        Ok(q)
    }

    /// DRIVER_OK: validate every enabled queue and start the device. Failure leaves the
    /// device inactive with DEVICE_NEEDS_RESET set.
    fn activate(&mut self) {
        let name = self.device.name();
        let event_idx = self.device.acked_features() & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        let mut failure = None;
        for i in 0..self.queues.len() {
            match self.build_queue(i, event_idx) {
                Ok(q) => queues.push(q),
                Err(reason) => {
                    failure = Some(VirtioError::InvalidQueue { device: name, queue: i, reason });
                    break;
                }
            }
        }
        if failure.is_none() && !queues.iter().any(|q| q.ready()) {
            failure =
                Some(VirtioError::Activate { device: name, reason: "the driver enabled no queue".into() });
        }
        let result = match failure {
            Some(e) => Err(e),
            None => self.device.activate(self.mem.clone(), queues, self.interrupt.clone()),
        };
        match result {
            Ok(()) => {
                self.metrics.activations.fetch_add(1, Relaxed);
                // Buffers made available before DRIVER_OK were notified into the void:
                // look at every enabled queue once.
                for (evt, r) in self.queue_evts.iter().zip(&self.queues) {
                    if r.ready {
                        let _ = evt.write(1);
                    }
                }
            }
            Err(e) => {
                let n = self.metrics.activation_failures.fetch_add(1, Relaxed);
                guest_caused_warning(
                    n,
                    format_args!("virtio-mmio at {:#x}: {e}; device needs reset", self.mmio_base),
                );
                self.interrupt.signal_needs_reset();
            }
        }
    }

    /// Device reset, as when the driver writes 0 to Status: back to the state after
    /// construction (device inactive, features and queues forgotten, no pending
    /// interrupt). The VMM calls it too when the partition reboots, so a guest that does
    /// not reset the device itself starts from a clean device.
    pub fn reset(&mut self) {
        self.metrics.resets.fetch_add(1, Relaxed);
        self.device.reset();
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt.reset();
        // Notifications not yet handled belong to the device's previous life.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        data.fill(0);
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.bad_access("read", offset, data.len());
            return;
        }
        match self.read_reg(offset) {
            Some(v) => data.copy_from_slice(&v.to_le_bytes()),
            None => self.bad_access("read", offset, data.len()),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            // A notify of another width still names a queue: honour it rather than leave
            // the driver waiting.
            if offset == QUEUE_NOTIFY_OFFSET && !data.is_empty() && data.len() <= 8 {
                let mut b = [0u8; 8];
                b[..data.len()].copy_from_slice(data);
                self.notify(u64::from_le_bytes(b).min(u64::from(u32::MAX)) as u32);
                return;
            }
            self.bad_access("write", offset, data.len());
            return;
        }
        let mut b = [0u8; 4];
        b.copy_from_slice(data);
        if !self.write_reg(offset, u32::from_le_bytes(b)) {
            self.bad_access("write", offset, data.len());
        }
    }
}

impl MutEventSubscriber for MmioTransport {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                tracing::error!(
                    device = self.device.name(),
                    "virtio-mmio at {:#x}: cannot watch queue {i} notifications: {e:?}",
                    self.mmio_base
                );
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.event_set().contains(EventSet::IN) {
            self.process_queue_event(events.data() as usize);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::read_config_image;
    use event_manager::SubscriberOps;
    use std::any::Any;
    use std::sync::Mutex;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueOwnedT;
    use vm_memory::{Address, Bytes};

    /// A device that records what the transport does to it and uses every buffer it
    /// is given with length 0.
    #[derive(Default)]
    pub(crate) struct TestDevice {
        pub sizes: Vec<u16>,
        pub features: u64,
        pub acked: u64,
        pub config: Vec<u8>,
        pub active: Option<(GuestMemory, Vec<Queue>, Arc<VirtioInterrupt>)>,
        pub processed: Arc<AtomicU64>,
        pub resets: u32,
        pub refuse_activation: bool,
    }

    impl TestDevice {
        pub fn new(sizes: &[u16]) -> Self {
            Self {
                sizes: sizes.to_vec(),
                features: (1 << VIRTIO_F_VERSION_1) | 0b101,
                config: (0u8..16).collect(),
                ..Default::default()
            }
        }
    }

    impl VirtioDevice for TestDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn name(&self) -> &'static str {
            "test"
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn device_features(&self) -> u64 {
            self.features
        }
        fn ack_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn acked_features(&self) -> u64 {
            self.acked
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_image(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Some(b) = self.config.get_mut(offset as usize) {
                *b = data[0];
            }
        }
        fn activate(
            &mut self,
            mem: GuestMemory,
            queues: Vec<Queue>,
            irq: Arc<VirtioInterrupt>,
        ) -> Result<(), VirtioError> {
            if self.refuse_activation {
                return Err(VirtioError::Activate { device: "test", reason: "refused".into() });
            }
            self.active = Some((mem, queues, irq));
            Ok(())
        }
        fn is_activated(&self) -> bool {
            self.active.is_some()
        }
        fn reset(&mut self) {
            self.active = None;
            self.acked = 0;
            self.resets += 1;
        }
        fn process_queue(&mut self, index: usize) -> Result<(), VirtioError> {
            let (mem, queues, irq) = self.active.as_mut().unwrap();
            let q = &mut queues[index];
            let mut n = 0;
            let heads: Vec<u16> = q
                .iter(&*mem)
                .map_err(|source| VirtioError::Queue { device: "test", queue: index, source })?
                .map(|c| c.head_index())
                .collect();
            for h in heads {
                q.add_used(&*mem, h, 0).unwrap();
                n += 1;
            }
            self.processed.fetch_add(n, Relaxed);
            irq.signal_used_queue()
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
        fn as_any_mut(&mut self) -> &mut dyn Any {
            self
        }
    }

    pub(crate) fn kvm_vm() -> VmFd {
        let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("create VM");
        vm.create_irq_chip().expect("create in-kernel irqchip");
        vm
    }

    pub(crate) fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn r32(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Drive the driver side of initialisation up to FEATURES_OK.
    fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
        w32(t, STATUS, status::ACKNOWLEDGE);
        w32(t, STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w32(t, DRIVER_FEATURES_SEL, 0);
        w32(t, DRIVER_FEATURES, features as u32);
        w32(t, DRIVER_FEATURES_SEL, 1);
        w32(t, DRIVER_FEATURES, (features >> 32) as u32);
        w32(t, STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        r32(t, STATUS)
    }

    fn setup_queue(t: &mut MmioTransport, sel: u32, size: u32, desc: u64, avail: u64, used: u64) {
        w32(t, QUEUE_SEL, sel);
        w32(t, QUEUE_NUM, size);
        w32(t, QUEUE_DESC_LOW, desc as u32);
        w32(t, QUEUE_DESC_HIGH, (desc >> 32) as u32);
        w32(t, QUEUE_AVAIL_LOW, avail as u32);
        w32(t, QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
        w32(t, QUEUE_USED_LOW, used as u32);
        w32(t, QUEUE_USED_HIGH, (used >> 32) as u32);
        w32(t, QUEUE_READY, 1);
    }

    const ALL_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    fn test_transport(sizes: &[u16]) -> MmioTransport {
        MmioTransport::build(Box::new(TestDevice::new(sizes)), mem()).unwrap()
    }

    fn dev(t: &MmioTransport) -> &TestDevice {
        t.device().as_any().downcast_ref::<TestDevice>().unwrap()
    }

    #[test]
    fn identification_registers() {
        let mut t = test_transport(&[16, 8]);
        assert_eq!(r32(&mut t, MAGIC), 0x7472_6976);
        assert_eq!(r32(&mut t, VERSION), 2);
        assert_eq!(r32(&mut t, DEVICE_ID), 42);
        assert_eq!(r32(&mut t, VENDOR), VENDOR_ID);
        assert_eq!(r32(&mut t, DEVICE_FEATURES), 0b101);
        w32(&mut t, DEVICE_FEATURES_SEL, 1);
        assert_eq!(r32(&mut t, DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        w32(&mut t, DEVICE_FEATURES_SEL, 2);
        assert_eq!(r32(&mut t, DEVICE_FEATURES), 0);
        assert_eq!(r32(&mut t, QUEUE_NUM_MAX), 16);
        w32(&mut t, QUEUE_SEL, 1);
        assert_eq!(r32(&mut t, QUEUE_NUM_MAX), 8);
        w32(&mut t, QUEUE_SEL, 2);
        assert_eq!(r32(&mut t, QUEUE_NUM_MAX), 0, "no such queue");
        assert_eq!(r32(&mut t, SHM_LEN_LOW), u32::MAX);
        assert_eq!(r32(&mut t, SHM_LEN_HIGH), u32::MAX);
        assert_eq!(t.metrics().bad_accesses.load(Relaxed), 0);
        // Configuration space, any width.
        let mut b = [0u8; 2];
        t.read(CONFIG_SPACE_OFFSET + 3, &mut b);
        assert_eq!(b, [3, 4]);
        let mut b = [0u8; 8];
        t.read(CONFIG_SPACE_OFFSET + 12, &mut b);
        assert_eq!(b, [12, 13, 14, 15, 0, 0, 0, 0]);
        t.write(CONFIG_SPACE_OFFSET + 1, &[99]);
        let mut b = [0u8; 1];
        t.read(CONFIG_SPACE_OFFSET + 1, &mut b);
        assert_eq!(b, [99]);
    }

    #[test]
    fn unknown_offsets_and_odd_sizes_read_zero_and_never_panic() {
        let mut t = test_transport(&[16]);
        for off in (0..CONFIG_SPACE_OFFSET + 8).step_by(1) {
            for len in [1usize, 2, 3, 4, 8] {
                let mut b = vec![0xaau8; len];
                t.read(off, &mut b);
                let known = len == 4 && off % 4 == 0 && t.read_reg(off).is_some();
                if !known && off < CONFIG_SPACE_OFFSET {
                    assert!(b.iter().all(|&x| x == 0), "offset {off:#x} len {len}: {b:?}");
                }
                // Writes of junk anywhere except Status/config must not panic either.
                if off != STATUS && off < CONFIG_SPACE_OFFSET {
                    t.write(off, &b);
                }
            }
        }
        // Reads at the very end of the window and beyond the config image.
        let mut b = [0xffu8; 8];
        t.read(MMIO_WINDOW_SIZE - 1, &mut b);
        assert_eq!(b, [0; 8]);
        t.read(u64::MAX, &mut b);
        assert_eq!(b, [0; 8]);
        t.write(u64::MAX, &[1, 2, 3]);
        t.write(0x10, &[]);
        let mut empty = [0u8; 0];
        t.read(0x10, &mut empty);
        assert!(t.metrics().bad_accesses.load(Relaxed) > 0);
        // Write-only registers read as zero.
        assert_eq!(r32(&mut t, QUEUE_NOTIFY_OFFSET), 0);
        assert_eq!(r32(&mut t, QUEUE_DESC_LOW), 0);
    }

    #[test]
    fn feature_negotiation() {
        let mut t = test_transport(&[16]);
        // Features before DRIVER are ignored.
        w32(&mut t, DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.driver_features, 0);
        // A feature that was not offered: FEATURES_OK refused.
        let s = negotiate(&mut t, (1 << VIRTIO_F_VERSION_1) | 0b10);
        assert_eq!(s & status::FEATURES_OK, 0);
        assert_eq!(t.metrics().feature_rejections.load(Relaxed), 1);
        assert_eq!(dev(&t).acked, 0);
        // No VERSION_1: refused (legacy).
        w32(&mut t, STATUS, 0);
        let s = negotiate(&mut t, 0b1);
        assert_eq!(s & status::FEATURES_OK, 0);
        // A proper subset: accepted, then the driver features are frozen.
        w32(&mut t, STATUS, 0);
        let s = negotiate(&mut t, (1 << VIRTIO_F_VERSION_1) | 0b100);
        assert_ne!(s & status::FEATURES_OK, 0);
        assert_eq!(dev(&t).acked, (1 << VIRTIO_F_VERSION_1) | 0b100);
        w32(&mut t, DRIVER_FEATURES_SEL, 0);
        w32(&mut t, DRIVER_FEATURES, 0b1);
        assert_eq!(t.driver_features, (1 << VIRTIO_F_VERSION_1) | 0b100);
        // Reset forgets them.
        w32(&mut t, STATUS, 0);
        assert_eq!(dev(&t).acked, 0);
        assert_eq!(t.driver_features, 0);
        assert_eq!(dev(&t).resets, 3);
    }

    #[test]
    fn status_state_machine() {
        let mut t = test_transport(&[16]);
        // DRIVER before ACKNOWLEDGE, FEATURES_OK before DRIVER, DRIVER_OK before FEATURES_OK.
        w32(&mut t, STATUS, status::DRIVER);
        assert_eq!(r32(&mut t, STATUS), 0);
        w32(&mut t, STATUS, status::ACKNOWLEDGE);
        w32(&mut t, STATUS, status::ACKNOWLEDGE | status::FEATURES_OK);
        assert_eq!(r32(&mut t, STATUS), status::ACKNOWLEDGE);
        w32(&mut t, STATUS, status::ACKNOWLEDGE | status::DRIVER_OK);
        assert_eq!(r32(&mut t, STATUS), status::ACKNOWLEDGE);
        // Clearing a bit without reset is ignored.
        w32(&mut t, STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w32(&mut t, STATUS, status::DRIVER);
        assert_eq!(r32(&mut t, STATUS), status::ACKNOWLEDGE | status::DRIVER);
        // Unknown bits are ignored.
        w32(&mut t, STATUS, status::ACKNOWLEDGE | status::DRIVER | 0x10);
        assert_eq!(r32(&mut t, STATUS), status::ACKNOWLEDGE | status::DRIVER);
        // FAILED sticks and blocks progress until reset.
        w32(&mut t, STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FAILED);
        w32(&mut t, STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FAILED | status::FEATURES_OK);
        assert_eq!(r32(&mut t, STATUS), status::ACKNOWLEDGE | status::DRIVER | status::FAILED);
        w32(&mut t, STATUS, 0);
        assert_eq!(r32(&mut t, STATUS), 0);
        // Several bits at once, in one write, in order.
        w32(&mut t, STATUS, status::ACKNOWLEDGE | status::DRIVER);
        assert_eq!(r32(&mut t, STATUS), status::ACKNOWLEDGE | status::DRIVER);
        // Queue registers are only writable between FEATURES_OK and DRIVER_OK.
        w32(&mut t, QUEUE_NUM, 4);
        assert_eq!(t.queues[0].size, 16);
        assert!(t.metrics().bad_accesses.load(Relaxed) >= 5);
    }

    #[test]
    fn queue_setup_activation_and_notification() {
        let m = mem();
        let mut t = MmioTransport::build(Box::new(TestDevice::new(&[16, 16])), m.clone()).unwrap();
        let processed = dev(&t).processed.clone();
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        let mq = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        setup_queue(&mut t, 0, 16, mq.desc_table_addr().0, mq.avail_addr().0, mq.used_addr().0);
        assert_eq!(r32(&mut t, QUEUE_READY), 1);
        // Addresses are frozen while ready.
        w32(&mut t, QUEUE_DESC_LOW, 0x2000);
        assert_eq!(t.queues[0].desc, 0x1000);
        w32(&mut t, STATUS, ALL_OK);
        assert_eq!(r32(&mut t, STATUS), ALL_OK);
        assert!(dev(&t).is_activated());
        let (_, queues, _) = dev(&t).active.as_ref().unwrap();
        assert!(queues[0].ready() && !queues[1].ready(), "queue 1 was left disabled");
        assert_eq!(queues[0].size(), 16);
        assert_eq!(t.metrics().activations.load(Relaxed), 1);
        // Queue registers are frozen after DRIVER_OK.
        w32(&mut t, QUEUE_SEL, 1);
        w32(&mut t, QUEUE_READY, 1);
        assert_eq!(r32(&mut t, QUEUE_READY), 0);

        // The driver makes two chains available and notifies by a (non-ioeventfd) write.
        mq.add_desc_chains(
            &[virtio_queue::desc::RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
                0x8000, 16, 0, 0,
            ))],
            0,
        )
        .unwrap();
        mq.add_desc_chains(
            &[virtio_queue::desc::RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
                0x9000, 16, 0, 0,
            ))],
            1,
        )
        .unwrap();
        w32(&mut t, QUEUE_NOTIFY_OFFSET, 0);
        assert_eq!(t.metrics().exit_notifications.load(Relaxed), 1);
        t.process_queue_event(0);
        assert_eq!(processed.load(Relaxed), 2);
        assert_eq!(m.read_obj::<u16>(mq.used_addr().unchecked_add(2)).unwrap(), 2);
        assert_eq!(r32(&mut t, INTERRUPT_STATUS), super::super::INTERRUPT_USED_BUFFER);
        w32(&mut t, INTERRUPT_ACK, super::super::INTERRUPT_USED_BUFFER);
        assert_eq!(r32(&mut t, INTERRUPT_STATUS), 0);
        // Notifying a queue that does not exist is counted, nothing else.
        w32(&mut t, QUEUE_NOTIFY_OFFSET, 7);
        assert_eq!(t.metrics().bad_notifications.load(Relaxed), 1);
        // A 16-bit notify still works.
        t.write(QUEUE_NOTIFY_OFFSET, &0u16.to_le_bytes());
        assert_eq!(t.queue_eventfd(0).unwrap().read().unwrap(), 1);

        // Reset returns everything to the initial state.
        w32(&mut t, STATUS, 0);
        assert!(!dev(&t).is_activated());
        assert_eq!(r32(&mut t, STATUS), 0);
        assert_eq!(r32(&mut t, QUEUE_READY), 0);
        assert_eq!(t.queues[0].desc, 0);
        // A notification after reset is drained and ignored.
        w32(&mut t, QUEUE_NOTIFY_OFFSET, 0);
        t.process_queue_event(0);
        assert_eq!(processed.load(Relaxed), 2);
    }

    fn activate_with(t: &mut MmioTransport, size: u32, desc: u64, avail: u64, used: u64) {
        w32(t, STATUS, 0);
        negotiate(t, 1 << VIRTIO_F_VERSION_1);
        setup_queue(t, 0, size, desc, avail, used);
        w32(t, STATUS, ALL_OK);
    }

    #[test]
    fn invalid_queue_setups_do_not_activate() {
        let mut t = test_transport(&[16]);
        let end = 1u64 << 20;
        let cases: &[(u32, u64, u64, u64, &str)] = &[
            (16, end, 0x2000, 0x3000, "descriptor table outside memory"),
            (16, end - 16 * 8, 0x2000, 0x3000, "descriptor table crossing the end of memory"),
            (16, 0x1000, end - 2, 0x3000, "available ring outside memory"),
            (16, 0x1000, 0x2000, end - 4, "used ring crossing the end"),
            (16, u64::MAX - 15, 0x2000, 0x3000, "address overflow"),
            (16, 0x1008, 0x2000, 0x3000, "misaligned descriptor table"),
            (16, 0x1000, 0x2001, 0x3000, "misaligned available ring"),
            (16, 0x1000, 0x2000, 0x3002, "misaligned used ring"),
            (12, 0x1000, 0x2000, 0x3000, "size not a power of two"),
            (32, 0x1000, 0x2000, 0x3000, "size above the maximum"),
            (0, 0x1000, 0x2000, 0x3000, "size zero"),
            (1 << 20, 0x1000, 0x2000, 0x3000, "size beyond u16"),
            (16, 0x1000, 0, 0x3000, "available ring at 0"),
        ];
        for (n, &(size, desc, avail, used, what)) in cases.iter().enumerate() {
            activate_with(&mut t, size, desc, avail, used);
            assert!(!dev(&t).is_activated(), "{what}");
            assert_ne!(r32(&mut t, STATUS) & status::DEVICE_NEEDS_RESET, 0, "{what}");
            assert_eq!(t.metrics().activation_failures.load(Relaxed), n as u64 + 1);
            // Notifications to the broken device are ignored.
            t.process_queue_event(0);
        }
        // A good setup after a reset works.
        activate_with(&mut t, 16, 0x1000, 0x2000, 0x3000);
        assert!(dev(&t).is_activated());
        assert_eq!(r32(&mut t, STATUS), ALL_OK);

        // No queue enabled at all.
        w32(&mut t, STATUS, 0);
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        w32(&mut t, STATUS, ALL_OK);
        assert!(!dev(&t).is_activated());
        assert_ne!(r32(&mut t, STATUS) & status::DEVICE_NEEDS_RESET, 0);
        // The device refusing to start.
        let mut d = TestDevice::new(&[16]);
        d.refuse_activation = true;
        let mut t = MmioTransport::build(Box::new(d), mem()).unwrap();
        activate_with(&mut t, 16, 0x1000, 0x2000, 0x3000);
        assert_ne!(r32(&mut t, STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    /// A ring outside guest memory is refused by the transport's own check, which names
    /// the ring, before virtio-queue's `Queue::is_valid` sees it: that one logs every
    /// refusal at error level, so a guest retrying a bad setup could flood the host's log.
    /// The two checks agree around the end of memory, so `is_valid` never refuses a setup
    /// that passed.
    #[test]
    fn ring_placement_is_checked_before_virtio_queue_sees_it() {
        let m = mem();
        let end = 1u64 << 20;
        let mut t = test_transport(&[16]);
        for (desc, avail, used, what) in [
            (end, 0x2000, 0x3000, "descriptor table at 0x100000"),
            (end - 16 * 8, 0x2000, 0x3000, "descriptor table at 0xfff80"),
            (0x1000, end - 2, 0x3000, "available ring at 0xffffe"),
            (0x1000, 0x2000, end - 4, "used ring at 0xffffc"),
            (0x1000, 0x2000, u64::MAX - 3, "used ring at 0xfffffffffffffffc"),
        ] {
            w32(&mut t, STATUS, 0);
            negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
            setup_queue(&mut t, 0, 16, desc, avail, used);
            let err = t.build_queue(0, false).unwrap_err();
            assert!(err.starts_with(what), "{err}");
        }
        for size in [1u16, 2, 16] {
            let [d, a, u] = ring_sizes(size);
            let around = |len: u64, align: u64| {
                let last = (end - len) & !(align - 1);
                [0x1000, last, last + align, end, !(align - 1)]
            };
            for desc in around(d, 16) {
                for avail in around(a, 2) {
                    for used in around(u, 4) {
                        let r = QueueRegs { max_size: 16, size: size.into(), ready: true, desc, avail, used };
                        let mut q = Queue::new(16).unwrap();
                        q.try_set_size(size).unwrap();
                        q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
                        q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
                        q.try_set_used_ring_address(GuestAddress(used)).unwrap();
                        q.set_ready(true);
                        assert_eq!(
                            rings_in_memory(&m, size, &r).is_ok(),
                            q.is_valid(&m),
                            "size {size}: descriptors {desc:#x}, available {avail:#x}, used {used:#x}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn corrupt_avail_ring_sets_needs_reset() {
        let m = mem();
        let mut t = MmioTransport::build(Box::new(TestDevice::new(&[16])), m.clone()).unwrap();
        activate_with(&mut t, 16, 0x1000, 0x2000, 0x3000);
        assert!(dev(&t).is_activated());
        // avail.idx 1000 ahead of next_avail with a 16-entry queue.
        m.write_obj(1000u16, GuestAddress(0x2002)).unwrap();
        t.process_queue_event(0);
        assert_ne!(r32(&mut t, STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(t.metrics().device_errors.load(Relaxed), 1);
        assert_ne!(r32(&mut t, INTERRUPT_STATUS) & super::super::INTERRUPT_CONFIG_CHANGE, 0);
        w32(&mut t, STATUS, 0);
        assert_eq!(r32(&mut t, STATUS), 0);
    }

    #[test]
    fn bad_devices_are_refused() {
        assert!(matches!(
            MmioTransport::build(Box::new(TestDevice::new(&[])), mem()),
            Err(VirtioError::QueueCount { .. })
        ));
        assert!(matches!(
            MmioTransport::build(Box::new(TestDevice::new(&[12])), mem()),
            Err(VirtioError::InvalidQueue { .. })
        ));
        let mut d = TestDevice::new(&[16]);
        d.features = 0;
        assert!(MmioTransport::build(Box::new(d), mem()).is_err());
    }

    #[test]
    fn kvm_registration_and_event_manager_wiring() {
        let vm = kvm_vm();
        let m = mem();
        let base = 0xd000_0000;
        let t = MmioTransport::new(Box::new(TestDevice::new(&[16, 16])), m.clone(), &vm, base, 5).unwrap();
        assert_eq!(t.mmio_base(), base);
        // The same notify address cannot be claimed twice (datamatch 0 already taken).
        let err = MmioTransport::new(Box::new(TestDevice::new(&[16])), m.clone(), &vm, base, 6).unwrap_err();
        assert!(matches!(err, VirtioError::RegisterIoEvent { queue: 0, .. }), "{err}");
        // Once unregistered, the address can be taken again.
        let other =
            MmioTransport::new(Box::new(TestDevice::new(&[16])), m.clone(), &vm, base + 0x1000, 7).unwrap();
        other.unregister(&vm).unwrap();
        MmioTransport::new(Box::new(TestDevice::new(&[16])), m.clone(), &vm, base + 0x1000, 7).unwrap();

        let processed = dev(&t).processed.clone();
        let t = Arc::new(Mutex::new(t));
        let mut bus = crate::devices::Bus::new();
        bus.insert(base, MMIO_WINDOW_SIZE, t.clone()).unwrap();
        let mut em = event_manager::EventManager::<Arc<Mutex<MmioTransport>>>::new().unwrap();
        em.add_subscriber(t.clone());

        {
            let mut g = t.lock().unwrap();
            activate_with(&mut g, 16, 0x1000, 0x2000, 0x3000);
            assert_eq!(g.status(), ALL_OK);
        }
        // Activation kicks the enabled queue once.
        em.run_with_timeout(100).unwrap();
        // The driver adds a chain and notifies through the bus (as a vCPU exit would).
        let mq_desc = virtio_queue::desc::split::Descriptor::new(0x8000, 16, 0, 0);
        m.write_obj(virtio_queue::desc::RawDescriptor::from(mq_desc), GuestAddress(0x1000)).unwrap();
        m.write_obj(0u16, GuestAddress(0x2004)).unwrap();
        m.write_obj(1u16, GuestAddress(0x2002)).unwrap();
        assert!(bus.write(base + QUEUE_NOTIFY_OFFSET, &0u32.to_le_bytes()));
        let n = em.run_with_timeout(1000).unwrap();
        assert!(n >= 1);
        assert_eq!(processed.load(Relaxed), 1);
        assert_eq!(m.read_obj::<u16>(GuestAddress(0x3002)).unwrap(), 1);
        // The device raised a used-buffer interrupt (the kernel consumed the irqfd).
        let mut b = [0u8; 4];
        bus.read(base + INTERRUPT_STATUS, &mut b);
        assert_eq!(u32::from_le_bytes(b), super::super::INTERRUPT_USED_BUFFER);
        bus.read(base + MAGIC, &mut b);
        assert_eq!(u32::from_le_bytes(b), MAGIC_VALUE);
    }
}
