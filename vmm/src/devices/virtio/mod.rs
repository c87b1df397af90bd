//! virtio devices and the virtio-mmio transport they sit behind.
//!
//! - [`VirtioDevice`] is what a device model (block, balloon, ...) implements: its type,
//!   queues, features, configuration space, and what to do when a queue is notified.
//! - [`mmio::MmioTransport`] puts one device behind a virtio-mmio register window
//!   (virtio 1.x, register layout "version 2", modern drivers only), wires the queue
//!   notifications to ioeventfds and the device interrupt to an irqfd.
//! - [`VirtioInterrupt`] is the handle a device uses to notify the driver (used buffers,
//!   configuration changes) and to report that it needs a reset.
//!
//! Everything a guest writes into a queue is untrusted: devices validate every descriptor
//! chain, answer malformed ones without panicking and count them in their metrics.

pub mod balloon;
pub mod blk;
pub mod mmio;
pub mod vasi;

use std::any::Any;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::GuestMemory;

/// Device status bits (virtio 1.2, 2.1 "Device Status Field").
pub mod status {
    pub const ACKNOWLEDGE: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    pub const DRIVER: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER;
    pub const DRIVER_OK: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
    pub const FEATURES_OK: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FEATURES_OK;
    pub const DEVICE_NEEDS_RESET: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
    pub const FAILED: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FAILED;
}

/// InterruptStatus bit: the device used a buffer in at least one queue.
pub const INTERRUPT_USED_BUFFER: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: the device configuration space changed.
pub const INTERRUPT_CONFIG_CHANGE: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Feature bit: a virtio 1.x ("modern") device. Every device here requires it.
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: the driver may use indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// Feature bit: used_event / avail_event notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Device type ids (virtio 1.2, 5 "Device Types").
pub const TYPE_BLOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
pub const TYPE_BALLOON: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;

/// Errors of the virtio transport and of device activation / queue processing.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("cannot create an eventfd for {what}: {source}")]
    EventFd {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot register the notify ioeventfd of queue {queue} at MMIO address {addr:#x}: \
         {source} (is another device already placed at this address?)"
    )]
    RegisterIoEvent {
        queue: usize,
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(
        "cannot register the interrupt eventfd for GSI {gsi}: {source} (the in-kernel \
         irqchip must be created before devices)"
    )]
    RegisterIrqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot remove the KVM registration of {what}: {source}")]
    Unregister {
        what: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot signal the guest interrupt: {0}")]
    Signal(#[source] io::Error),
    #[error("{device}: queue {queue}: {reason}")]
    InvalidQueue { device: &'static str, queue: usize, reason: String },
    #[error("{device}: cannot activate: {reason}")]
    Activate { device: &'static str, reason: String },
    #[error("{device}: queue {queue}: {source}")]
    Queue {
        device: &'static str,
        queue: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("{device}: device offers no queues or too many ({count}); a device has 1..={max}")]
    QueueCount { device: &'static str, count: usize, max: usize },
}

/// Interrupt and status handle shared by a transport and its device.
///
/// The transport owns the guest-visible registers, the device signals through this
/// handle: used buffers and configuration changes set bits in InterruptStatus and kick
/// the irqfd; a device that hit an unrecoverable guest error sets DEVICE_NEEDS_RESET.
#[derive(Debug)]
pub struct VirtioInterrupt {
    irq_evt: EventFd,
    status: AtomicU32,
    config_generation: AtomicU32,
    needs_reset: AtomicBool,
}

impl VirtioInterrupt {
    pub fn new() -> Result<Self, VirtioError> {
        let irq_evt = EventFd::new(EFD_NONBLOCK)
            .map_err(|source| VirtioError::EventFd { what: "the device interrupt", source })?;
        Ok(Self {
            irq_evt,
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
        })
    }

    /// The eventfd the transport registers as irqfd.
    pub fn irq_eventfd(&self) -> &EventFd {
        &self.irq_evt
    }

    fn trigger(&self, bits: u32) -> Result<(), VirtioError> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irq_evt.write(1).map_err(VirtioError::Signal)
    }

    /// Used-buffer notification: the device put buffers in a used ring.
    pub fn signal_used_queue(&self) -> Result<(), VirtioError> {
        self.trigger(INTERRUPT_USED_BUFFER)
    }

    /// Configuration-change notification. Also moves ConfigGeneration, so a driver
    /// reading a multi-field configuration sees the change.
    pub fn signal_config_change(&self) -> Result<(), VirtioError> {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.trigger(INTERRUPT_CONFIG_CHANGE)
    }

    /// The device hit an error it cannot recover from without a reset (for example a
    /// corrupt available ring): DEVICE_NEEDS_RESET becomes visible in the Status register
    /// and the driver gets a configuration-change notification (virtio 1.2, 2.1.2).
    pub fn signal_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            if let Err(e) = self.signal_config_change() {
                tracing::warn!("virtio: {e}");
            }
        }
    }

    /// Current InterruptStatus bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: the driver handled these bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Device reset: no pending interrupt, no pending reset request. The configuration
    /// generation keeps counting so a driver never sees an old value come back.
    fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

/// A virtio device model, independent of the transport it sits behind.
///
/// Life cycle: the transport negotiates features (`device_features` / `ack_features`),
/// lets the driver read and write the configuration space, and on DRIVER_OK hands the
/// device its queues with [`activate`](Self::activate). From then on the transport calls
/// [`process_queue`](Self::process_queue) whenever the driver notifies a queue. Writing 0
/// to the Status register calls [`reset`](Self::reset), which returns the device to the
/// state it had before activation (features not acknowledged, no queues).
pub trait VirtioDevice: Send {
    /// Device type id ([`TYPE_BLOCK`], [`TYPE_BALLOON`], ...).
    fn device_type(&self) -> u32;

    /// Short name for logs and errors.
    fn name(&self) -> &'static str;

    /// Maximum size of each queue; the device has `len()` queues. Each size is a power of
    /// two no larger than 32768.
    fn queue_max_sizes(&self) -> &[u16];

    /// Features the device offers (must include [`VIRTIO_F_VERSION_1`]).
    fn device_features(&self) -> u64;

    /// Features the driver accepted and the transport validated (a subset of
    /// `device_features`, with VERSION_1). Called when the driver sets FEATURES_OK.
    fn ack_features(&mut self, features: u64);

    /// Features acknowledged so far (0 before FEATURES_OK and after reset).
    fn acked_features(&self) -> u64;

    /// Read from the device configuration space. `offset` is relative to the start of the
    /// configuration space; bytes beyond its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Write to the device configuration space; read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Start the device. `queues` has one entry per `queue_max_sizes()` entry, in order;
    /// queues the driver enabled are `ready()` and were validated against `mem`, queues it
    /// left disabled are not ready. An error leaves the device inactive and makes the
    /// transport set DEVICE_NEEDS_RESET.
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), VirtioError>;

    fn is_activated(&self) -> bool;

    /// Return to the pre-activation state: drop queues and memory, forget features.
    fn reset(&mut self);

    /// The driver notified queue `index`: process what it made available. Only called
    /// while activated. An error means the queue is unusable until reset; the transport
    /// then sets DEVICE_NEEDS_RESET.
    fn process_queue(&mut self, index: usize) -> Result<(), VirtioError>;

    /// For reaching the concrete device behind a transport (`downcast_ref`).
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// Warnings a guest can trigger at will: the first few go out at warn level (they
/// explain a driver that does not work), the rest at debug level, so a looping guest
/// cannot flood the log. `n` is how many came before (the counter's previous value).
pub(crate) fn guest_caused_warning(n: u64, msg: std::fmt::Arguments<'_>) {
    const LOUD: u64 = 8;
    if n < LOUD {
        tracing::warn!("{msg}");
    } else {
        tracing::debug!("{msg}");
    }
}

/// Copy `data.len()` bytes of a device configuration image starting at `offset` into
/// `data`; bytes beyond the image read as zero. Shared by devices whose configuration
/// space is a plain byte image.
pub fn read_config_image(image: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else { return };
    if start >= image.len() {
        return;
    }
    let n = data.len().min(image.len() - start);
    data[..n].copy_from_slice(&image[start..start + n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_bits_ack_and_generation() {
        let irq = VirtioInterrupt::new().unwrap();
        assert_eq!(irq.status(), 0);
        irq.signal_used_queue().unwrap();
        assert_eq!(irq.status(), INTERRUPT_USED_BUFFER);
        assert_eq!(irq.irq_eventfd().read().unwrap(), 1);
        let g = irq.config_generation();
        irq.signal_config_change().unwrap();
        assert_eq!(irq.config_generation(), g + 1);
        assert_eq!(irq.status(), INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE);
        irq.ack(INTERRUPT_USED_BUFFER);
        assert_eq!(irq.status(), INTERRUPT_CONFIG_CHANGE);
        irq.signal_needs_reset();
        irq.signal_needs_reset();
        assert!(irq.needs_reset());
        assert_eq!(irq.config_generation(), g + 2, "needs-reset notifies once");
        irq.reset();
        assert_eq!(irq.status(), 0);
        assert!(!irq.needs_reset());
    }

    #[test]
    fn config_image_reads_are_bounded() {
        let image = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_image(&image, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_image(&image, 4, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_image(&image, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
