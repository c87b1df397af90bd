//! The paging devices' virtio-blk driver (virtio 1.2 §5.2), polled from CPL3 like the
//! workload's disk driver, but with several requests in flight: transfers, flushes and
//! discards are queued as chains in one *batch* and sent with a single notification;
//! [`Blk::finish`] waits for all of them and says whether every one succeeded.
//!
//! Memory: one queue page per device, and one request page shared by all devices (one
//! batch at a time, on one device): 32 request headers, their status bytes and 32
//! discard segments. Data descriptors point wherever the caller says (the transfer
//! window, a bitmap, the scratch block): nothing is copied.

use crate::hc;
use crate::virtio::{self, Desc, Mmio, Queue, DESC_F_NEXT, DESC_F_WRITE};
use paging_server::plan::Limits;

/// virtio device id of a block device.
pub const DEVICE_ID: u32 = 2;

/// Feature bits (§5.2.3).
const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;

/// Request types and status values (§5.2.6).
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_DISCARD: u32 = 11;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// What a status byte holds until the device writes it.
const S_UNWRITTEN: u8 = 0xff;

/// Config space offsets (§5.2.4).
const CFG_CAPACITY: u64 = 0;
const CFG_SIZE_MAX: u64 = 8;
const CFG_SEG_MAX: u64 = 12;
const CFG_MAX_DISCARD_SECTORS: u64 = 36;
const CFG_MAX_DISCARD_SEG: u64 = 40;

pub const SECTOR: u64 = 512;
const PAGE: u64 = 4096;
const SECTORS_PER_PAGE: u64 = PAGE / SECTOR;

/// Descriptors wanted per queue (the device may allow fewer; 4 at least are needed).
const QUEUE_WANT: u16 = 64;
/// Most chains in one batch (request headers in the request page).
const MAX_CHAINS: u16 = 32;
/// Most discard segments in one batch.
const MAX_DISCARD_SEGS: usize = 32;
/// Layout of the request page.
const HDR_OFFSET: u64 = 0x000; // MAX_CHAINS x struct virtio_blk_req header (16 bytes)
const STATUS_OFFSET: u64 = 0x200; // MAX_CHAINS status bytes
const DISCARD_OFFSET: u64 = 0x400; // MAX_DISCARD_SEGS x virtio_blk_discard_write_zeroes
const _: () = assert!(HDR_OFFSET + 16 * MAX_CHAINS as u64 <= STATUS_OFFSET);
const _: () = assert!(STATUS_OFFSET + MAX_CHAINS as u64 <= DISCARD_OFFSET);
const _: () = assert!(DISCARD_OFFSET + 16 * MAX_DISCARD_SEGS as u64 <= PAGE);

/// A batch not back within this long is a device error.
const BATCH_TIMEOUT_NS: u64 = 30_000_000_000;

/// Why a batch failed.
#[derive(Clone, Copy, Debug)]
pub enum Error {
    /// The transport or the queue failed; the device was reset and set up again (or
    /// given up on, see [`Blk::dead`]).
    Virtio(virtio::Error),
    /// A request came back with a status other than OK (the first such request).
    Status { ty: u32, sector: u64, status: u8 },
    /// The device was given up on after a failure it did not recover from.
    Dead,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Error::Virtio(e) => write!(f, "virtio-blk: {e}"),
            Error::Status { ty, sector, status } => {
                let what = match ty {
                    T_IN => "read",
                    T_OUT => "write",
                    T_FLUSH => "flush",
                    _ => "discard",
                };
                let name = match status {
                    S_IOERR => "IOERR",
                    S_UNSUPP => "UNSUPP",
                    S_UNWRITTEN => "status not written",
                    _ => "bad status",
                };
                write!(f, "{what} at sector {sector}: {name} ({status})")
            }
            Error::Dead => f.write_str("device given up after an earlier failure"),
        }
    }
}

/// Why a device cannot be used at all.
#[derive(Clone, Copy, Debug)]
pub enum SetupError {
    Virtio(virtio::Error),
    ReadOnly,
    /// The queue has fewer than 4 descriptors (a request takes 3).
    SmallQueue(u16),
}

impl core::fmt::Display for SetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            SetupError::Virtio(e) => write!(f, "virtio-blk: {e}"),
            SetupError::ReadOnly => f.write_str("device is read-only"),
            SetupError::SmallQueue(n) => write!(f, "virtio-blk queue of {n} descriptors, need 4"),
        }
    }
}

impl From<virtio::Error> for SetupError {
    fn from(e: virtio::Error) -> Self {
        SetupError::Virtio(e)
    }
}

/// One paging device.
pub struct Blk {
    mmio: Mmio,
    queue: Queue,
    queue_mem: u64,
    /// The shared request page.
    req: u64,
    features: u64,
    /// Capacity in sectors.
    capacity: u64,
    limits: Limits,
    /// Largest discard segment in sectors (whole pages) and segments per request, when
    /// DISCARD is negotiated and usable.
    discard: Option<(u64, u64)>,
    // The batch being built: descriptors used, chains placed (header slot = chain
    // number), their heads (bit per descriptor index), and the first failure.
    next_desc: u16,
    chains: u16,
    heads: u64,
    discard_segs: usize,
    error: Option<Error>,
    dead: bool,
}

impl Blk {
    /// A device not set up yet (what the paging server's `static` holds before
    /// [`Blk::setup`]; the driver state is built in place, never moved).
    pub const UNSET: Blk = Blk {
        // SAFETY: never accessed before `setup` replaces it.
        mmio: unsafe { Mmio::new(0) },
        queue: Queue::UNSET,
        queue_mem: 0,
        req: 0,
        features: 0,
        capacity: 0,
        limits: Limits { segment_bytes: SECTOR, request_bytes: SECTOR },
        discard: None,
        next_desc: 0,
        chains: 0,
        heads: 0,
        discard_segs: 0,
        error: None,
        dead: true,
    };

    /// Sets up the device at `mmio_base` with its queue in the page `queue_mem` and the
    /// shared request page `req`.
    ///
    /// # Safety
    /// `mmio_base` must be an identity-mapped virtio-mmio window of at least
    /// [`virtio::MIN_WINDOW`] bytes; `queue_mem` a page of RAM for this device alone;
    /// `req` the request page, used by one batch at a time.
    pub unsafe fn setup(&mut self, mmio_base: u64, queue_mem: u64, req: u64) -> Result<(), SetupError> {
        // SAFETY: the caller vouches for the window.
        self.mmio = unsafe { Mmio::new(mmio_base) };
        // SAFETY: the caller hands over the queue page.
        let (features, queue) = unsafe { start(&self.mmio, queue_mem)? };
        let mmio = &self.mmio;
        let size_max = (features & F_SIZE_MAX != 0).then(|| mmio.config_u32(CFG_SIZE_MAX));
        let seg_max = (features & F_SEG_MAX != 0).then(|| mmio.config_u32(CFG_SEG_MAX));
        self.limits = Limits::new(size_max, seg_max, queue.size() as u32 - 2);
        self.discard = if features & F_DISCARD != 0 {
            // Whole pages per segment: a device that cannot discard one page at a time
            // is not asked to discard at all.
            let sectors = mmio.config_u32(CFG_MAX_DISCARD_SECTORS) as u64 / SECTORS_PER_PAGE * SECTORS_PER_PAGE;
            let segs = (mmio.config_u32(CFG_MAX_DISCARD_SEG) as u64).min(MAX_DISCARD_SEGS as u64);
            (sectors > 0 && segs > 0).then_some((sectors, segs))
        } else {
            None
        };
        self.capacity = mmio.config_u64(CFG_CAPACITY);
        self.queue = queue;
        self.queue_mem = queue_mem;
        self.req = req;
        self.features = features;
        self.next_desc = 0;
        self.chains = 0;
        self.heads = 0;
        self.discard_segs = 0;
        self.error = None;
        self.dead = false;
        Ok(())
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity.saturating_mul(SECTOR)
    }

    pub fn can_flush(&self) -> bool {
        self.features & F_FLUSH != 0
    }

    pub fn can_discard(&self) -> bool {
        self.discard.is_some()
    }

    /// The device was given up on: every batch fails with [`Error::Dead`].
    pub fn dead(&self) -> bool {
        self.dead
    }

    /// Queues a transfer of `bytes` (a multiple of 512) between the device at `sector`
    /// and memory at `addr`: a read when `write` is false. Cut into requests and
    /// segments as the device's limits say.
    pub fn transfer(&mut self, write: bool, mut sector: u64, mut addr: u64, mut bytes: u64) {
        let ty = if write { T_OUT } else { T_IN };
        while bytes > 0 {
            let n = bytes.min(self.limits.request_bytes);
            let segs = self.limits.segments(n) as u16;
            let Some(k) = self.chain(ty, sector, segs) else { return };
            let mut d = self.next_desc + 1;
            let (mut a, mut left) = (addr, n);
            while left > 0 {
                let len = left.min(self.limits.segment_bytes);
                let flags = DESC_F_NEXT | if write { 0 } else { DESC_F_WRITE };
                self.queue.write_desc(d, Desc { addr: a, len: len as u32, flags, next: d + 1 });
                a += len;
                left -= len;
                d += 1;
            }
            self.close(k, d);
            sector += n / SECTOR;
            addr += n;
            bytes -= n;
        }
    }

    /// Queues a FLUSH (nothing when FLUSH was not negotiated: the device then writes
    /// through).
    pub fn flush(&mut self) {
        if !self.can_flush() {
            return;
        }
        let Some(k) = self.chain(T_FLUSH, 0, 0) else { return };
        let d = self.next_desc + 1;
        self.close(k, d);
    }

    /// Queues DISCARDs of `ranges` (sector, sectors: whole pages at page-aligned
    /// sectors), at most 32 pages in all; once per batch. Nothing when the device does
    /// not discard.
    pub fn discard(&mut self, ranges: impl Iterator<Item = (u64, u64)>) {
        let Some((max_sectors, max_segs)) = self.discard else { return };
        let first = self.discard_segs;
        for (mut sector, mut sectors) in ranges {
            while sectors > 0 && self.discard_segs < MAX_DISCARD_SEGS {
                let n = sectors.min(max_sectors);
                // struct virtio_blk_discard_write_zeroes { le64 sector; le32 num_sectors;
                // le32 flags }
                let seg = (self.req + DISCARD_OFFSET + 16 * self.discard_segs as u64) as *mut u64;
                // SAFETY: segment `discard_segs` < MAX_DISCARD_SEGS lies in the request
                // page (checked at compile time above).
                unsafe {
                    seg.write_volatile(sector);
                    seg.add(1).write_volatile(n);
                }
                self.discard_segs += 1;
                sector += n;
                sectors -= n;
            }
        }
        let mut at = first;
        while at < self.discard_segs {
            let n = ((self.discard_segs - at) as u64).min(max_segs);
            let Some(k) = self.chain(T_DISCARD, 0, 1) else { return };
            let d = self.next_desc + 1;
            let addr = self.req + DISCARD_OFFSET + 16 * at as u64;
            self.queue.write_desc(d, Desc { addr, len: (16 * n) as u32, flags: DESC_F_NEXT, next: d + 1 });
            self.close(k, d + 1);
            at += n as usize;
        }
    }

    /// Sends what is queued, waits until every request is back and reports the first
    /// failure; the next batch starts empty.
    pub fn finish(&mut self) -> Result<(), Error> {
        self.run();
        self.discard_segs = 0;
        match self.error.take() {
            Some(e) => Err(e),
            None if self.dead => Err(Error::Dead),
            None => Ok(()),
        }
    }

    /// Starts chain number `k` for a request of `ty` at `sector` with `data`
    /// descriptors: room is made (by sending the batch so far) and its header written.
    /// Returns `k`, or None when the batch already failed on the transport.
    fn chain(&mut self, ty: u32, sector: u64, data: u16) -> Option<u16> {
        if self.dead || matches!(self.error, Some(Error::Virtio(_))) {
            return None;
        }
        if self.chains == MAX_CHAINS || self.next_desc + data + 2 > self.queue.size() {
            self.run();
            if self.dead || matches!(self.error, Some(Error::Virtio(_))) {
                return None;
            }
        }
        let k = self.chains;
        let hdr = (self.req + HDR_OFFSET + 16 * k as u64) as *mut u32;
        // SAFETY: header slot k < MAX_CHAINS and status byte k lie in the request page.
        unsafe {
            hdr.write_volatile(ty);
            hdr.add(1).write_volatile(0);
            (hdr.add(2) as *mut u64).write_volatile(sector);
            ((self.req + STATUS_OFFSET + k as u64) as *mut u8).write_volatile(S_UNWRITTEN);
        }
        let head = self.next_desc;
        self.queue.write_desc(head, Desc { addr: hdr as u64, len: 16, flags: DESC_F_NEXT, next: head + 1 });
        Some(k)
    }

    /// Ends chain `k` with its status descriptor at index `d` and puts it on the
    /// driver ring (no notification yet).
    fn close(&mut self, k: u16, d: u16) {
        let status = self.req + STATUS_OFFSET + k as u64;
        self.queue.write_desc(d, Desc { addr: status, len: 1, flags: DESC_F_WRITE, next: 0 });
        let head = self.next_desc;
        self.heads |= 1 << head;
        self.queue.push(head, 1);
        self.next_desc = d + 1;
        self.chains += 1;
    }

    /// Notifies the device of the batch so far, waits for every chain, and records the
    /// first failure. A transport failure resets the device and sets it up again.
    fn run(&mut self) {
        if self.chains == 0 {
            return;
        }
        self.queue.notify(&self.mmio);
        let mut back = 0;
        let mut failure = None;
        while back < self.chains {
            match self.queue.wait_used(&self.mmio, hc::clock_ns, BATCH_TIMEOUT_NS) {
                Ok((id, _len)) if id < 64 && self.heads & (1 << id) != 0 => {
                    self.heads &= !(1 << id);
                    back += 1;
                }
                Ok((id, _)) => {
                    failure = Some(virtio::Error::BadUsedId(id));
                    break;
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failure {
            self.error = Some(Error::Virtio(e));
            self.recover();
        } else {
            for k in 0..self.chains {
                // SAFETY: status byte k and header slot k lie in the request page.
                let (status, ty, sector) = unsafe {
                    let hdr = (self.req + HDR_OFFSET + 16 * k as u64) as *const u32;
                    (
                        ((self.req + STATUS_OFFSET + k as u64) as *const u8).read_volatile(),
                        hdr.read_volatile(),
                        (hdr.add(2) as *const u64).read_volatile(),
                    )
                };
                if status != S_OK && self.error.is_none() {
                    self.error = Some(Error::Status { ty, sector, status });
                }
            }
        }
        self.next_desc = 0;
        self.chains = 0;
        self.heads = 0;
    }

    /// After a transport failure: reset the device (it stops using our memory) and set
    /// it up again with the same features; give up on it if that fails.
    fn recover(&mut self) {
        // SAFETY: the queue page is this device's (see `setup`).
        match unsafe { start(&self.mmio, self.queue_mem) } {
            Ok((features, queue)) if features == self.features && queue.size() == self.queue.size() => {
                self.queue = queue;
            }
            _ => {
                let _ = self.mmio.reset();
                self.mmio.fail();
                self.dead = true;
            }
        }
    }
}

/// Negotiates (VERSION_1, and FLUSH, DISCARD, SIZE_MAX, SEG_MAX when offered), refuses a
/// read-only device, sets up the queue and sets DRIVER_OK.
///
/// # Safety
/// As for [`Blk::setup`].
unsafe fn start(mmio: &Mmio, queue_mem: u64) -> Result<(u64, Queue), SetupError> {
    let (offered, features) = mmio.negotiate(DEVICE_ID, |_| F_FLUSH | F_DISCARD | F_SIZE_MAX | F_SEG_MAX)?;
    if offered & F_RO != 0 {
        mmio.fail();
        return Err(SetupError::ReadOnly);
    }
    // SAFETY: the caller hands over the queue page.
    let queue = match unsafe { Queue::setup_sized(mmio, 0, queue_mem, QUEUE_WANT) } {
        Ok(q) if q.size() >= 4 => q,
        Ok(q) => {
            mmio.fail();
            return Err(SetupError::SmallQueue(q.size()));
        }
        Err(e) => {
            mmio.fail();
            return Err(e.into());
        }
    };
    mmio.driver_ok();
    Ok((features, queue))
}
