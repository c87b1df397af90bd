//! The disk test: drive the first virtio-blk device by polling, write stamped 4 KiB
//! blocks, flush, read every block back and verify every byte; GET_ID once, and one
//! DISCARD when the device offers it.

use crate::page::{self, Expected, PAGE_SIZE};
use crate::virtio::{self, Buf, Mmio, Queue};
use crate::platform;
use amsvm_abi::Progress;

/// virtio device id of a block device.
pub const DEVICE_ID: u32 = 2;
/// Pages of guest memory the test needs: the queue, the request header page and the
/// data block.
pub const AREA_PAGES: u64 = 3;

/// Feature bits (virtio 1.x §5.2.3).
pub(crate) const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;

/// Request types and status values (§5.2.6).
pub(crate) const T_IN: u32 = 0;
pub(crate) const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Config space offsets (§5.2.4).
pub(crate) const CFG_CAPACITY: u64 = 0;
const CFG_MAX_DISCARD_SECTORS: u64 = 36;

pub(crate) const SECTOR: u64 = 512;
pub(crate) const SECTORS_PER_BLOCK: u64 = PAGE_SIZE as u64 / SECTOR;
/// Length of the GET_ID answer.
const ID_LEN: usize = 20;
/// A request that takes longer than this is reported as a device error.
const REQUEST_TIMEOUT_NS: u64 = 30_000_000_000;
/// Verification failures printed on the console (the rest are only counted).
const MAX_PRINTED_FAILURES: u64 = 4;
/// Byte the read buffer is filled with before each read, so that a read that does not
/// write the buffer cannot pass verification with stale data.
const POISON: u8 = 0xa5;

/// Layout of the request header page.
pub(crate) const HDR_OFFSET: u64 = 0x00; // struct virtio_blk_req header: type, reserved, sector
pub(crate) const STATUS_OFFSET: u64 = 0x10; // status byte
const DISCARD_OFFSET: u64 = 0x20; // struct virtio_blk_discard_write_zeroes
const ID_OFFSET: u64 = 0x40; // GET_ID answer

/// Why the test stopped early.
#[derive(Clone, Copy, Debug)]
pub enum Failure {
    /// The transport or the queue failed.
    Virtio(virtio::Error),
    /// A request came back with a status other than OK.
    Status { what: &'static str, block: u64, status: u8 },
    /// The device is read-only or has no room for a single test block.
    Unusable(&'static str),
}

impl core::fmt::Display for Failure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Failure::Virtio(e) => write!(f, "virtio-blk: {e}"),
            Failure::Status { what, block, status } => {
                let name = match *status {
                    S_IOERR => "IOERR",
                    S_UNSUPP => "UNSUPP",
                    _ => "bad status",
                };
                write!(f, "{what} of block {block} failed: {name} ({status})")
            }
            Failure::Unusable(why) => f.write_str(why),
        }
    }
}

impl From<virtio::Error> for Failure {
    fn from(e: virtio::Error) -> Self {
        Failure::Virtio(e)
    }
}

struct Blk {
    mmio: Mmio,
    queue: Queue,
    /// The request header page and the data page.
    req: u64,
    data: u64,
}

impl Blk {
    fn header(&self, ty: u32, sector: u64) {
        let h = (self.req + HDR_OFFSET) as *mut u32;
        // SAFETY: the request page belongs to the test (see `run`).
        unsafe {
            h.write_volatile(ty);
            h.add(1).write_volatile(0);
            (h.add(2) as *mut u64).write_volatile(sector);
            ((self.req + STATUS_OFFSET) as *mut u8).write_volatile(0xff);
        }
    }

    /// Issues one request whose data part (if any) is `data`; returns the status byte.
    fn submit(&mut self, ty: u32, sector: u64, data: Option<Buf>) -> Result<u8, Failure> {
        self.header(ty, sector);
        let hdr = Buf { addr: self.req + HDR_OFFSET, len: 16, device_writes: false };
        let st = Buf { addr: self.req + STATUS_OFFSET, len: 1, device_writes: true };
        let mut chain = [hdr, st, st];
        let n = match data {
            Some(d) => {
                chain[1] = d;
                3
            }
            None => 2,
        };
        self.queue.request(&self.mmio, &chain[..n], platform::clock_ns, REQUEST_TIMEOUT_NS)?;
        // SAFETY: the status byte in the request page.
        Ok(unsafe { ((self.req + STATUS_OFFSET) as *const u8).read_volatile() })
    }

    fn check(&mut self, what: &'static str, block: u64, ty: u32, data: Option<Buf>) -> Result<(), Failure> {
        match self.submit(ty, block * SECTORS_PER_BLOCK, data)? {
            S_OK => Ok(()),
            status => Err(Failure::Status { what, block, status }),
        }
    }

    fn data_buf(&self, device_writes: bool) -> Buf {
        Buf { addr: self.data, len: PAGE_SIZE as u32, device_writes }
    }
}

/// Runs the disk test on the device at `mmio_base`, with `area` (AREA_PAGES pages of
/// free RAM) for the queue and buffers. Counts verified and failed blocks in `c`.
///
/// # Safety
/// `mmio_base` must be an identity-mapped virtio-mmio window of at least
/// [`virtio::MIN_WINDOW`] bytes; `area` must be AREA_PAGES page-aligned pages of RAM
/// used by nothing else.
pub unsafe fn run(mmio_base: u64, area: u64, blocks: u64, partition_id: u32, c: &mut Progress) -> Result<(), Failure> {
    // SAFETY: the caller vouches for the window.
    let mmio = unsafe { Mmio::new(mmio_base) };
    let (offered, features) = mmio.negotiate(DEVICE_ID, |_| F_FLUSH | F_DISCARD)?;
    if offered & F_RO != 0 {
        mmio.fail();
        return Err(Failure::Unusable("device is read-only"));
    }
    // SAFETY: the first page of the area is the queue's.
    let queue = match unsafe { Queue::setup(&mmio, area) } {
        Ok(q) => q,
        Err(e) => {
            mmio.fail();
            return Err(e.into());
        }
    };
    mmio.driver_ok();
    let mut blk = Blk { mmio, queue, req: area + 4096, data: area + 2 * 4096 };
    let result = test(&mut blk, features, blocks, partition_id, c);
    // Take the device off our memory again; a device that does not reset cleanly does
    // not change the verdict of a test that already ran.
    let _ = blk.mmio.reset();
    result
}

fn test(blk: &mut Blk, features: u64, blocks: u64, partition_id: u32, c: &mut Progress) -> Result<(), Failure> {
    let capacity = blk.mmio.config_u64(CFG_CAPACITY);
    let usable = capacity / SECTORS_PER_BLOCK;
    if usable == 0 {
        return Err(Failure::Unusable("device has no room for one 4 KiB block"));
    }
    let n = blocks.min(usable);
    let nonce = crate::sampler::mix64(platform::clock_ns() ^ ((partition_id as u64) << 48));
    println!(
        "disk: capacity {} sectors, queue {}, flush {}, discard {}; testing {} blocks{}",
        capacity,
        blk.queue.size(),
        yes_no(features & F_FLUSH != 0),
        yes_no(features & F_DISCARD != 0),
        n,
        if n < blocks { " (capped by capacity)" } else { "" }
    );

    // GET_ID: a 20-byte string, NUL-padded; UNSUPP is an allowed answer.
    let id = Buf { addr: blk.req + ID_OFFSET, len: ID_LEN as u32, device_writes: true };
    // SAFETY: the id buffer lies in the request page.
    unsafe { crate::rt::fill_bytes((blk.req + ID_OFFSET) as *mut u8, 0, ID_LEN) };
    match blk.submit(T_GET_ID, 0, Some(id))? {
        S_OK => {
            let mut text = [b'?'; ID_LEN];
            let mut len = 0;
            for (i, t) in text.iter_mut().enumerate() {
                // SAFETY: inside the id buffer.
                let b = unsafe { ((blk.req + ID_OFFSET) as *const u8).add(i).read_volatile() };
                if b == 0 {
                    break;
                }
                if b.is_ascii_graphic() || b == b' ' {
                    *t = b;
                }
                len = i + 1;
            }
            println!("disk: id \"{}\"", core::str::from_utf8(&text[..len]).unwrap_or("?"));
        }
        S_UNSUPP => println!("disk: GET_ID unsupported"),
        status => return Err(Failure::Status { what: "GET_ID", block: 0, status }),
    }

    for i in 0..n {
        // SAFETY: the data page belongs to the test.
        unsafe { page::fill(blk.data as *mut u64, &Expected::block(partition_id, i, nonce)) };
        if let Err(e) = blk.check("write", i, T_OUT, Some(blk.data_buf(false))) {
            c.disk_failures += 1;
            return Err(e);
        }
    }
    if features & F_FLUSH != 0 {
        blk.check("flush", 0, T_FLUSH, None)?;
    }
    let mut printed = 0;
    for i in 0..n {
        // SAFETY: the data page belongs to the test.
        unsafe { crate::rt::fill_bytes(blk.data as *mut u8, POISON, PAGE_SIZE) };
        if let Err(e) = blk.check("read", i, T_IN, Some(blk.data_buf(true))) {
            c.disk_failures += 1;
            return Err(e);
        }
        let exp = Expected::block(partition_id, i, nonce);
        // SAFETY: the data page, just filled by the device.
        match unsafe { page::verify(blk.data as *const u64, &exp) } {
            Ok(()) => c.disk_blocks_verified += 1,
            Err(m) => {
                c.disk_failures += 1;
                if printed < MAX_PRINTED_FAILURES {
                    printed += 1;
                    println!(
                        "disk: VERIFY FAILED block {}: {} bad words, first at word {}: want {:#x} found {:#x}",
                        i, m.bad_words, m.word, m.expected, m.found
                    );
                }
            }
        }
    }

    if features & F_DISCARD != 0 {
        let max = blk.mmio.config_u32(CFG_MAX_DISCARD_SECTORS) as u64;
        let sectors = max.min(SECTORS_PER_BLOCK);
        if sectors == 0 {
            println!("disk: discard offered with max_discard_sectors 0, skipped");
        } else {
            // struct virtio_blk_discard_write_zeroes { le64 sector; le32 num_sectors; le32 flags }
            let seg = (blk.req + DISCARD_OFFSET) as *mut u64;
            // SAFETY: the segment lies in the request page.
            unsafe {
                seg.write_volatile(0);
                seg.add(1).write_volatile(sectors);
            }
            let d = Buf { addr: blk.req + DISCARD_OFFSET, len: 16, device_writes: false };
            blk.check("discard", 0, T_DISCARD, Some(d))?;
            println!("disk: discarded {} sectors at 0", sectors);
        }
    }
    Ok(())
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
