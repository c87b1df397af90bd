//! The paging server's side of VASI (`docs/vasi.md`, `paging_server::vasi`): the
//! driver of amsvm's VASI virtio-mmio device.
//!
//! - Queue 0 (requests): buffer `i` of [`vasi::REQUEST_BYTES`] is always descriptor `i`;
//!   every buffer not being read is available to the device.
//! - Queue 1 (completions): slot `i` (one [`vasi::COMPLETION_BYTES`] completion) is
//!   always descriptor `i`; a completion is sent as soon as its request is done.
//!
//! Memory: a page per queue and one page of buffers (the request buffers from 0, the
//! completion slots from [`COMPLETION_OFFSET`]). Every used-ring entry the device returns
//! is checked against what the driver gave it.

use crate::hc;
use crate::virtio::{self, Desc, Mmio, Queue, DESC_F_WRITE};
use paging_server::vasi::{self, Completion, Config};

/// Request buffers (and completion slots) wanted: the queues may be smaller.
const WANT: u16 = 16;
/// Where the completion slots start in the buffer page.
const COMPLETION_OFFSET: u64 = 0xc00;
const _: () = assert!(WANT as u64 * vasi::REQUEST_BYTES as u64 <= COMPLETION_OFFSET);
const _: () = assert!(COMPLETION_OFFSET + WANT as u64 * vasi::COMPLETION_BYTES as u64 <= 4096);
/// How long to wait for amsvm to hand a completion slot back when all are out.
const COMPLETION_TIMEOUT_NS: u64 = 30_000_000_000;

/// A failure of the channel itself: the paging server cannot go on.
#[derive(Clone, Copy, Debug)]
pub enum Error {
    Virtio(virtio::Error),
    /// The request queue returned a buffer the driver had not made available.
    BadRequestBuffer(u32),
    /// The completion queue returned a slot the driver had not sent.
    BadCompletionSlot(u32),
    /// Every completion slot is out and none came back in time.
    CompletionsStuck,
    /// The device set DEVICE_NEEDS_RESET.
    NeedsReset,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Error::Virtio(e) => write!(f, "VASI: {e}"),
            Error::BadRequestBuffer(id) => write!(f, "VASI: request queue returned descriptor {id}, not an available buffer"),
            Error::BadCompletionSlot(id) => write!(f, "VASI: completion queue returned descriptor {id}, not a sent completion"),
            Error::CompletionsStuck => f.write_str("VASI: no completion slot came back in 30 s"),
            Error::NeedsReset => f.write_str("VASI: device set DEVICE_NEEDS_RESET"),
        }
    }
}

impl From<virtio::Error> for Error {
    fn from(e: virtio::Error) -> Self {
        Error::Virtio(e)
    }
}

/// Checks the device and negotiates VIRTIO_F_VERSION_1 alone (up to FEATURES_OK).
///
/// # Safety
/// `mmio_base` must be an identity-mapped virtio-mmio window of at least
/// [`virtio::MIN_WINDOW`] bytes.
pub unsafe fn negotiate(mmio_base: u64) -> Result<Mmio, virtio::Error> {
    // SAFETY: the caller vouches for the window.
    let mmio = unsafe { Mmio::new(mmio_base) };
    mmio.negotiate(vasi::DEVICE_ID, |_| 0)?;
    Ok(mmio)
}

/// Reads the configuration space consistently (one ConfigGeneration) and decodes it;
/// None if it names more than [`vasi::MAX_DEVICES`] devices.
pub fn read_config(mmio: &Mmio) -> Option<Config> {
    let mut b = [0u8; vasi::CONFIG_BYTES];
    loop {
        let gen = mmio.read(virtio::reg::CONFIG_GENERATION);
        for (k, w) in b.chunks_exact_mut(4).enumerate() {
            let v = mmio.read(virtio::reg::CONFIG + 4 * k as u64);
            w[0] = v as u8;
            w[1] = (v >> 8) as u8;
            w[2] = (v >> 16) as u8;
            w[3] = (v >> 24) as u8;
        }
        if mmio.read(virtio::reg::CONFIG_GENERATION) == gen {
            return Config::decode(&b);
        }
    }
}

/// The live channel.
pub struct Vasi {
    mmio: Mmio,
    requests: Queue,
    completions: Queue,
    /// The buffer page.
    bufs: u64,
    /// Request buffers the device holds (bit per buffer).
    posted: u64,
    /// Completion slots the device holds.
    sent: u64,
}

impl Vasi {
    /// Sets up both queues (in the pages `q0` and `q1`, buffers in the page `bufs`),
    /// sets DRIVER_OK and makes every request buffer available.
    ///
    /// # Safety
    /// `q0`, `q1` and `bufs` must be pages of RAM used by nothing else; `mmio` came from
    /// [`negotiate`].
    pub unsafe fn start(mmio: Mmio, q0: u64, q1: u64, bufs: u64) -> Result<Vasi, Error> {
        // SAFETY: the caller hands over the pages.
        let requests = match unsafe { Queue::setup_sized(&mmio, vasi::REQUEST_QUEUE, q0, WANT) } {
            Ok(q) => q,
            Err(e) => {
                mmio.fail();
                return Err(e.into());
            }
        };
        // SAFETY: as above.
        let completions = match unsafe { Queue::setup_sized(&mmio, vasi::COMPLETION_QUEUE, q1, WANT) } {
            Ok(q) => q,
            Err(e) => {
                mmio.fail();
                return Err(e.into());
            }
        };
        mmio.driver_ok();
        let mut v = Vasi { mmio, requests, completions, bufs, posted: 0, sent: 0 };
        for i in 0..v.requests.size() {
            v.post(i);
        }
        v.requests.notify(&v.mmio);
        Ok(v)
    }

    /// Request buffers (the request queue's size).
    pub fn buffers(&self) -> u16 {
        self.requests.size()
    }

    fn buffer(&self, i: u16) -> u64 {
        self.bufs + i as u64 * vasi::REQUEST_BYTES as u64
    }

    /// Zeroes request buffer `i` and makes it available again (no notification).
    fn post(&mut self, i: u16) {
        // SAFETY: buffer i < size <= WANT lies in the buffer page (checked above); the
        // device does not hold it.
        unsafe { crate::rt::fill_bytes(self.buffer(i) as *mut u8, 0, vasi::REQUEST_BYTES) };
        let d = Desc { addr: self.buffer(i), len: vasi::REQUEST_BYTES as u32, flags: DESC_F_WRITE, next: 0 };
        self.requests.write_desc(i, d);
        self.posted |= 1 << i;
        self.requests.push(i, 1);
    }

    /// The next request the device put in the used ring, if any: its buffer and the
    /// bytes the device wrote (at most [`vasi::REQUEST_BYTES`]).
    pub fn next_request(&mut self) -> Result<Option<(u16, usize)>, Error> {
        let Some((id, len)) = self.requests.poll_used() else { return Ok(None) };
        if id >= self.requests.size() as u32 || self.posted & (1 << id) == 0 {
            return Err(Error::BadRequestBuffer(id));
        }
        self.posted &= !(1 << id);
        Ok(Some((id as u16, (len as usize).min(vasi::REQUEST_BYTES))))
    }

    /// The first `len` bytes of request buffer `i` (which the device has returned).
    pub fn request_bytes(&self, i: u16, len: usize) -> &[u8] {
        debug_assert!(self.posted & (1 << i) == 0 && len <= vasi::REQUEST_BYTES);
        // SAFETY: buffer i lies in the buffer page; the device has handed it back, so
        // nothing writes it while the slice lives.
        unsafe { core::slice::from_raw_parts(self.buffer(i) as *const u8, len.min(vasi::REQUEST_BYTES)) }
    }

    /// Gives request buffer `i` back to the device (seen at the next [`Vasi::notify`]).
    pub fn recycle(&mut self, i: u16) {
        self.post(i);
    }

    /// Tells the device that request buffers came back.
    pub fn notify(&self) {
        self.requests.notify(&self.mmio);
    }

    /// Posts one completion into a free slot, after taking back the slots the device
    /// returned (waits for one if all are out). The device sees it at the next
    /// [`Vasi::notify_completions`] or WAIT hypercall: amsvm takes posted completions
    /// before a WAIT parks, so handing them over costs no exit of its own.
    pub fn complete(&mut self, c: &Completion) -> Result<(), Error> {
        self.reap()?;
        let n = self.completions.size();
        let free = !self.sent & ((1u64 << n) - 1);
        let slot = if free != 0 {
            free.trailing_zeros() as u16
        } else {
            // Every slot is out: make sure the device has seen them, then wait.
            self.completions.notify(&self.mmio);
            let (id, _) = self.completions.wait_used(&self.mmio, hc::clock_ns, COMPLETION_TIMEOUT_NS).map_err(|e| match e {
                virtio::Error::Timeout => Error::CompletionsStuck,
                e => Error::Virtio(e),
            })?;
            self.take_back(id)?;
            id as u16
        };
        let addr = self.bufs + COMPLETION_OFFSET + slot as u64 * vasi::COMPLETION_BYTES as u64;
        let b = c.encode();
        let (lo, hi) = (u64::from_le_bytes(le8(&b, 0)), u64::from_le_bytes(le8(&b, 8)));
        // SAFETY: slot < n <= WANT lies in the buffer page (checked above); the device
        // does not hold it.
        unsafe {
            (addr as *mut u64).write_volatile(lo);
            (addr as *mut u64).add(1).write_volatile(hi);
        }
        self.completions.write_desc(slot, Desc { addr, len: vasi::COMPLETION_BYTES as u32, flags: 0, next: 0 });
        self.sent |= 1 << slot;
        self.completions.push(slot, 1);
        Ok(())
    }

    /// Tells the device that completions were posted.
    pub fn notify_completions(&self) {
        self.completions.notify(&self.mmio);
    }

    /// Takes back every completion slot the device returned.
    fn reap(&mut self) -> Result<(), Error> {
        while let Some((id, _)) = self.completions.poll_used() {
            self.take_back(id)?;
        }
        Ok(())
    }

    fn take_back(&mut self, id: u32) -> Result<(), Error> {
        if id >= self.completions.size() as u32 || self.sent & (1 << id) == 0 {
            return Err(Error::BadCompletionSlot(id));
        }
        self.sent &= !(1 << id);
        Ok(())
    }

    /// Fails if the device asked for a reset.
    pub fn check_device(&self) -> Result<(), Error> {
        if self.mmio.status() & virtio::status::DEVICE_NEEDS_RESET != 0 {
            return Err(Error::NeedsReset);
        }
        Ok(())
    }

    /// Marks the device FAILED (the paging server is giving up).
    pub fn fail(&self) {
        self.mmio.fail();
    }
}

fn le8(b: &[u8], at: usize) -> [u8; 8] {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    x
}
