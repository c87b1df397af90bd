//! A minimal, polling virtio 1.x driver core: the virtio-mmio transport (version 2
//! register layout) and split virtqueues (one page each), driven from CPL3 without
//! interrupts. The workload keeps one request in flight per queue, so its chain always
//! starts at descriptor 0 ([`Queue::submit`], [`Queue::request`]); a device may have
//! several such queues. A driver with several chains in flight (the paging server, which
//! shares this file) places them itself with [`Queue::write_desc`], [`Queue::push`] and
//! [`Queue::notify`].

use core::sync::atomic::{fence, Ordering};

/// virtio-mmio register offsets.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// "virt", little endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// The virtio 1.x (non-legacy) virtio-mmio register layout.
const MMIO_VERSION: u32 = 2;
/// Feature bit: the device follows virtio 1.x (required).
pub const F_VERSION_1: u64 = 1 << 32;

/// Bytes of the register window this driver touches (registers and the first 64 bytes
/// of config space); a smaller window is refused.
pub const MIN_WINDOW: u64 = reg::CONFIG + 0x40;

/// Descriptors per queue (the largest power of two up to this that the device allows).
/// A virtio-blk request needs at most 3; a balloon free-page report chain uses them all.
/// The one-page layout below has room for up to 64.
pub const QUEUE_SIZE: u16 = 8;
const _: () = assert!(QUEUE_SIZE <= 64);
/// Memory the queue needs: one page holding the descriptor table at 0, the driver
/// (available) ring at 0x400 and the device (used) ring at 0x800.
pub const QUEUE_BYTES: u64 = 4096;
const AVAIL_OFFSET: u64 = 0x400;
const USED_OFFSET: u64 = 0x800;

/// Descriptor flags.
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
/// The descriptor names a table of descriptors (VIRTIO_F_INDIRECT_DESC; this driver
/// never negotiates it).
pub const DESC_F_INDIRECT: u16 = 4;
/// Driver-ring flag: do not interrupt (this driver polls).
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// How a request or the setup failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// MagicValue is not "virt".
    BadMagic(u32),
    /// Not a virtio 1.x (version 2) virtio-mmio device.
    BadVersion(u32),
    /// DeviceID is not the expected one.
    WrongDevice(u32),
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1,
    /// The device did not accept the negotiated features.
    FeaturesRejected,
    /// The device did not come out of reset.
    ResetTimeout,
    /// The queue (index, then QueueReady or QueueNumMax) is missing, already live, or
    /// too small.
    BadQueue(u16, u32),
    /// The device set DEVICE_NEEDS_RESET.
    NeedsReset,
    /// A request did not complete in time.
    Timeout,
    /// The used ring returned a descriptor that was not the request's head.
    BadUsedId(u32),
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Error::BadMagic(v) => write!(f, "no virtio-mmio device (magic {v:#x})"),
            Error::BadVersion(v) => write!(f, "virtio-mmio version {v}, need 2 (virtio 1.x)"),
            Error::WrongDevice(v) => write!(f, "device id {v}, not the expected device"),
            Error::NoVersion1 => f.write_str("device does not offer VIRTIO_F_VERSION_1"),
            Error::FeaturesRejected => f.write_str("device refused the negotiated features (FEATURES_OK cleared)"),
            Error::ResetTimeout => f.write_str("device did not finish its reset"),
            Error::BadQueue(i, v) => write!(f, "queue {i} unusable (ready or size {v})"),
            Error::NeedsReset => f.write_str("device set DEVICE_NEEDS_RESET"),
            Error::Timeout => f.write_str("request timed out"),
            Error::BadUsedId(v) => write!(f, "device returned descriptor {v}, not the request's"),
        }
    }
}

/// A virtio-mmio register window, accessed with 32-bit volatile loads and stores.
pub struct Mmio {
    base: u64,
}

impl Mmio {
    /// # Safety
    /// `base` must be an identity-mapped virtio-mmio window of at least [`MIN_WINDOW`]
    /// bytes.
    pub const unsafe fn new(base: u64) -> Self {
        Mmio { base }
    }

    /// Guest-physical base of the window.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// 32-bit read of the register at `off` (a multiple of 4 inside [`MIN_WINDOW`]).
    pub fn read(&self, off: u64) -> u32 {
        // SAFETY: inside the window the caller of `new` vouched for; aligned.
        unsafe { ((self.base + off) as *const u32).read_volatile() }
    }

    /// 32-bit write of the register at `off` (a multiple of 4 inside [`MIN_WINDOW`]).
    pub fn write(&self, off: u64, value: u32) {
        // SAFETY: as for `read`.
        unsafe { ((self.base + off) as *mut u32).write_volatile(value) }
    }

    pub fn status(&self) -> u32 {
        self.read(reg::STATUS)
    }

    pub fn set_status(&self, value: u32) {
        self.write(reg::STATUS, value);
    }

    /// Marks the device FAILED (the driver gave up on it).
    pub fn fail(&self) {
        let s = self.status();
        self.set_status(s | status::FAILED);
    }

    /// Resets the device and waits until it reads back 0.
    pub fn reset(&self) -> Result<(), Error> {
        self.set_status(0);
        for _ in 0..1_000_000 {
            if self.status() == 0 {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(Error::ResetTimeout)
    }

    /// A 32-bit config-space field at `off`, read consistently (ConfigGeneration).
    pub fn config_u32(&self, off: u64) -> u32 {
        loop {
            let gen = self.read(reg::CONFIG_GENERATION);
            let v = self.read(reg::CONFIG + off);
            if self.read(reg::CONFIG_GENERATION) == gen {
                return v;
            }
        }
    }

    /// A 64-bit config-space field at `off` (two 32-bit halves, one generation).
    pub fn config_u64(&self, off: u64) -> u64 {
        loop {
            let gen = self.read(reg::CONFIG_GENERATION);
            let lo = self.read(reg::CONFIG + off) as u64;
            let hi = self.read(reg::CONFIG + off + 4) as u64;
            if self.read(reg::CONFIG_GENERATION) == gen {
                return lo | (hi << 32);
            }
        }
    }

    fn device_features(&self) -> u64 {
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.read(reg::DEVICE_FEATURES) as u64;
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.read(reg::DEVICE_FEATURES) as u64;
        lo | (hi << 32)
    }

    fn set_driver_features(&self, features: u64) {
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, features as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (features >> 32) as u32);
    }

    /// Device initialisation up to FEATURES_OK (virtio 1.x §3.1.1): checks the window,
    /// resets, ACKNOWLEDGE, DRIVER, negotiates `wanted(offered)` plus VERSION_1.
    /// Returns (offered, negotiated) features.
    pub fn negotiate(&self, device_id: u32, wanted: impl Fn(u64) -> u64) -> Result<(u64, u64), Error> {
        let magic = self.read(reg::MAGIC);
        if magic != MAGIC_VALUE {
            return Err(Error::BadMagic(magic));
        }
        let version = self.read(reg::VERSION);
        if version != MMIO_VERSION {
            return Err(Error::BadVersion(version));
        }
        let id = self.read(reg::DEVICE_ID);
        if id != device_id {
            return Err(Error::WrongDevice(id));
        }
        self.reset()?;
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let offered = self.device_features();
        if offered & F_VERSION_1 == 0 {
            self.fail();
            return Err(Error::NoVersion1);
        }
        let negotiated = (wanted(offered) & offered) | F_VERSION_1;
        self.set_driver_features(negotiated);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        if self.status() & status::FEATURES_OK == 0 {
            self.fail();
            return Err(Error::FeaturesRejected);
        }
        Ok((offered, negotiated))
    }

    /// Sets DRIVER_OK: the device is live.
    pub fn driver_ok(&self) {
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    }
}

/// A split-ring descriptor (virtio 1.x §2.7.5).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// One buffer of a request: guest-physical address, length, and whether the device
/// writes it.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub device_writes: bool,
}

/// One split virtqueue of a device, in one page of guest memory.
pub struct Queue {
    mem: u64,
    /// The queue's index (what QueueSel and QueueNotify name).
    index: u16,
    size: u16,
    next_avail: u16,
    last_used: u16,
}

impl Queue {
    /// A queue that is not set up (size 0): a placeholder for driver state built in
    /// place in a `static` (the paging server keeps its devices so, because moving them
    /// would be an out-of-line `memcpy`, see docs/workload.md). Set it up with
    /// [`Queue::setup_sized`] before any other use.
    #[allow(dead_code)]
    pub const UNSET: Queue = Queue { mem: 0, index: 0, size: 0, next_avail: 0, last_used: 0 };

    /// Sets up queue 0 in the page at `mem` (zeroed here) and makes it ready. Call
    /// between FEATURES_OK and DRIVER_OK.
    ///
    /// # Safety
    /// As for [`Queue::setup_index`].
    pub unsafe fn setup(mmio: &Mmio, mem: u64) -> Result<Self, Error> {
        // SAFETY: the caller's promise, passed on.
        unsafe { Self::setup_index(mmio, 0, mem) }
    }

    /// Sets up queue `index` in the page at `mem` (zeroed here) and makes it ready. Call
    /// between FEATURES_OK and DRIVER_OK.
    ///
    /// # Safety
    /// `mem` must be a page-aligned, identity-mapped page of guest RAM that nothing else
    /// uses while the device is live.
    pub unsafe fn setup_index(mmio: &Mmio, index: u16, mem: u64) -> Result<Self, Error> {
        // SAFETY: the caller's promise, passed on.
        unsafe { Self::setup_sized(mmio, index, mem, QUEUE_SIZE) }
    }

    /// As [`Queue::setup_index`], with up to `want` descriptors (a power of two, at most
    /// 64) instead of [`QUEUE_SIZE`].
    ///
    /// # Safety
    /// As for [`Queue::setup_index`].
    pub unsafe fn setup_sized(mmio: &Mmio, index: u16, mem: u64, want: u16) -> Result<Self, Error> {
        debug_assert!(want.is_power_of_two() && want <= 64);
        mmio.write(reg::QUEUE_SEL, index as u32);
        if mmio.read(reg::QUEUE_READY) != 0 {
            return Err(Error::BadQueue(index, mmio.read(reg::QUEUE_READY)));
        }
        let max = mmio.read(reg::QUEUE_NUM_MAX);
        if max < 3 {
            return Err(Error::BadQueue(index, max));
        }
        // A power of two no larger than the device's maximum.
        let mut size = want;
        while size as u32 > max {
            size /= 2;
        }
        // SAFETY: the caller hands over this page.
        unsafe { crate::rt::fill_bytes(mem as *mut u8, 0, QUEUE_BYTES as usize) };
        let q = Queue { mem, index, size, next_avail: 0, last_used: 0 };
        // SAFETY: the driver ring's flags field, inside the page.
        unsafe { ((mem + AVAIL_OFFSET) as *mut u16).write_volatile(AVAIL_F_NO_INTERRUPT) };
        let (desc, avail, used) = (mem, mem + AVAIL_OFFSET, mem + USED_OFFSET);
        mmio.write(reg::QUEUE_NUM, size as u32);
        mmio.write(reg::QUEUE_DESC_LOW, desc as u32);
        mmio.write(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        mmio.write(reg::QUEUE_DRIVER_LOW, avail as u32);
        mmio.write(reg::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        mmio.write(reg::QUEUE_DEVICE_LOW, used as u32);
        mmio.write(reg::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        fence(Ordering::SeqCst);
        mmio.write(reg::QUEUE_READY, 1);
        Ok(q)
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Places the chain `bufs` (at most the queue size) on the driver ring, notifies the
    /// device and polls the device ring until it comes back, for at most `timeout_ns`
    /// (measured with `clock_ns`). Returns the number of bytes the device reports written.
    pub fn request(&mut self, mmio: &Mmio, bufs: &[Buf], clock_ns: impl Fn() -> u64, timeout_ns: u64) -> Result<u32, Error> {
        self.submit(mmio, bufs);
        let (id, len) = self.wait_used(mmio, clock_ns, timeout_ns)?;
        if id != 0 {
            return Err(Error::BadUsedId(id));
        }
        Ok(len)
    }

    /// Places the chain `bufs` (1 up to the queue size buffers) in descriptors 0.. and
    /// on the driver ring, and notifies the device; does not wait. The previous chain
    /// must have come back (descriptors 0.. are reused).
    pub fn submit(&mut self, mmio: &Mmio, bufs: &[Buf]) {
        let n = bufs.len();
        debug_assert!(n > 0 && n <= self.size as usize);
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.device_writes { DESC_F_WRITE } else { 0 };
            let mut next = 0;
            if i + 1 < n {
                flags |= DESC_F_NEXT;
                next = (i + 1) as u16;
            }
            self.write_desc(i as u16, Desc { addr: b.addr, len: b.len, flags, next });
        }
        self.publish(mmio, 0, 1);
    }

    /// Writes descriptor `i` (taken modulo the queue size) verbatim.
    pub fn write_desc(&self, i: u16, d: Desc) {
        let i = i % self.size;
        // SAFETY: descriptor i < size lies in the descriptor table at the start of the
        // queue page.
        unsafe { (self.mem as *mut Desc).add(i as usize).write_volatile(d) };
    }

    /// Puts `head` in the next driver-ring slot, moves the ring index on by `advance`
    /// (1 for a well-formed driver) and notifies the queue.
    pub fn publish(&mut self, mmio: &Mmio, head: u16, advance: u16) {
        self.push(head, advance);
        self.notify(mmio);
    }

    /// Puts `head` in the next driver-ring slot and moves the ring index on by `advance`
    /// (1 for a well-formed driver), without notifying the device.
    pub fn push(&mut self, head: u16, advance: u16) {
        let slot = self.next_avail % self.size;
        // SAFETY: ring[slot] of the driver ring (flags u16, idx u16, ring[size] u16).
        unsafe { ((self.mem + AVAIL_OFFSET + 4) as *mut u16).add(slot as usize).write_volatile(head) };
        self.next_avail = self.next_avail.wrapping_add(advance);
        // Descriptors and ring entry before the index.
        fence(Ordering::SeqCst);
        // SAFETY: the driver ring's idx field.
        unsafe { ((self.mem + AVAIL_OFFSET + 2) as *mut u16).write_volatile(self.next_avail) };
    }

    /// Notifies the device that the queue has new buffers.
    pub fn notify(&self, mmio: &Mmio) {
        // The index before the notify.
        fence(Ordering::SeqCst);
        mmio.write(reg::QUEUE_NOTIFY, self.index as u32);
    }

    /// The next used element (id, len) if the device has returned one; does not wait.
    pub fn poll_used(&mut self) -> Option<(u32, u32)> {
        // SAFETY: the device ring's idx field.
        if unsafe { ((self.mem + USED_OFFSET + 2) as *const u16).read_volatile() } == self.last_used {
            return None;
        }
        Some(self.take_used())
    }

    /// Polls the device ring for the next used element, for at most `timeout_ns`
    /// (measured with `clock_ns`); returns its (id, len). Watches DEVICE_NEEDS_RESET.
    pub fn wait_used(&mut self, mmio: &Mmio, clock_ns: impl Fn() -> u64, timeout_ns: u64) -> Result<(u32, u32), Error> {
        let used_idx = (self.mem + USED_OFFSET + 2) as *const u16;
        let mut started: Option<u64> = None;
        let mut spins: u32 = 0;
        loop {
            // SAFETY: the device ring's idx field.
            if unsafe { used_idx.read_volatile() } != self.last_used {
                break;
            }
            core::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(4096) {
                if mmio.status() & status::DEVICE_NEEDS_RESET != 0 {
                    return Err(Error::NeedsReset);
                }
                let now = clock_ns();
                let t0 = *started.get_or_insert(now);
                if now.saturating_sub(t0) > timeout_ns {
                    return Err(Error::Timeout);
                }
            }
        }
        Ok(self.take_used())
    }

    /// Consumes the used element at `last_used` (the device ring's idx has moved past it).
    fn take_used(&mut self) -> (u32, u32) {
        // The index before the element it publishes.
        fence(Ordering::SeqCst);
        let slot = (self.last_used % self.size) as u64;
        // SAFETY: ring[slot] of the device ring (flags u16, idx u16, ring[size] of
        // {id u32, len u32}).
        let elem = unsafe {
            let elem = (self.mem + USED_OFFSET + 4 + slot * 8) as *const u32;
            (elem.read_volatile(), elem.add(1).read_volatile())
        };
        self.last_used = self.last_used.wrapping_add(1);
        elem
    }
}
