//! Carrying out VASI requests on the paging devices (`docs/vasi.md`). The planning
//! (runs of slots, bitmap blocks to write back) is `paging_server::plan`, tested on the
//! host; this module turns it into virtio-blk batches.

use crate::blk::{self, Blk, SECTOR};
use amsvm_abi::Progress;
use paging_server::format::Layout;
use paging_server::plan::{self, Blocks};
use paging_server::vasi::{op, status, Completion, Request};
use paging_server::{bitmap, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;
/// Kinds of console notes.
const REJECTED: usize = 0;
const FAILED: usize = 1;
/// Console lines about rejected requests, and about failed ones (the rest are only
/// counted).
const MAX_NOTES: u32 = 4;

/// One paging device.
pub struct Device {
    pub blk: Blk,
    pub layout: Layout,
    /// The slot bitmap in RAM (`layout.bitmap_bytes` bytes): what the device holds, or
    /// newer where a bitmap write failed (see [`Device::write_blocks`]).
    pub bitmap: u64,
    /// The console was told the device was given up on.
    told_dead: bool,
}

impl Device {
    /// A device not set up yet (see [`Blk::UNSET`]).
    pub const UNSET: Device = Device {
        blk: Blk::UNSET,
        layout: Layout { slots: 0, bitmap_offset: 0, bitmap_bytes: 0, data_offset: 0, device_bytes: 0 },
        bitmap: 0,
        told_dead: false,
    };

    pub fn map(&self) -> &[u8] {
        // SAFETY: the bitmap's pages were given to this device (see main.rs); the
        // virtio-blk device only touches them during a batch, while no slice lives.
        unsafe { core::slice::from_raw_parts(self.bitmap as *const u8, self.layout.bitmap_bytes as usize) }
    }

    fn map_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `map`; `&mut self` makes the slice unique.
        unsafe { core::slice::from_raw_parts_mut(self.bitmap as *mut u8, self.layout.bitmap_bytes as usize) }
    }

    /// First sector of slot `s` (a slot the request check accepted: below `slots`).
    fn sector(&self, s: u32) -> u64 {
        (self.layout.data_offset + s as u64 * PAGE) / SECTOR
    }

    /// Writes the bitmap blocks `changed` (4 KiB each, neighbours in one transfer)
    /// from RAM to the device. On failure RAM stays ahead of the device: the next
    /// successful write of the block catches up.
    fn write_blocks(&mut self, changed: &Blocks) -> Result<(), blk::Error> {
        if changed.is_empty() {
            return Ok(());
        }
        for (first, n) in changed.ranges() {
            let sector = (self.layout.bitmap_offset + first * PAGE) / SECTOR;
            self.blk.transfer(true, sector, self.bitmap + first * PAGE, n * PAGE);
        }
        self.blk.finish()
    }
}

/// The request executor and its counters.
pub struct Server<'a> {
    /// Paging device `i` is `devices[i]`.
    devices: &'a mut [Device],
    window: u64,
    window_pages: u32,
    /// Reported through PROGRESS (see `docs/vasi.md`): `pages_touched` requests,
    /// `pages_written` pages written, `pages_verified` pages read, `verify_failures`
    /// requests rejected, `disk_blocks_verified` slots freed, `disk_failures` requests
    /// failed with an I/O error.
    pub counters: Progress,
    changed: Blocks,
    /// Console lines written about rejected and about failed requests.
    notes: [u32; 2],
}

impl<'a> Server<'a> {
    pub fn new(devices: &'a mut [Device], window: u64, window_pages: u32) -> Self {
        Server { devices, window, window_pages, counters: Progress::default(), changed: Blocks::new(), notes: [0; 2] }
    }

    /// One request buffer's contents (as many bytes as the device wrote) in, the
    /// completion out: None for a buffer too short to name the request.
    pub fn handle(&mut self, bytes: &[u8]) -> Option<Completion> {
        self.counters.pages_touched += 1;
        let req = match Request::decode(bytes) {
            Ok(r) => r,
            Err(m) => {
                self.counters.verify_failures += 1;
                let id = bytes.get(..8).map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]));
                self.note(REJECTED, format_args!("request of {} bytes rejected: {:?}", bytes.len(), m));
                return id.map(|id| Completion { id, status: status::BAD_REQUEST, count: 0 });
            }
        };
        let (status, count) = self.execute(&req);
        Some(Completion { id: req.id, status, count })
    }

    fn execute(&mut self, req: &Request) -> (u32, u32) {
        let devices = &*self.devices;
        let dev_of = |d: u32| devices.get(d as usize);
        let checked = req.check(
            devices.len() as u32,
            self.window_pages,
            |d| dev_of(d).map_or(0, |x| x.layout.slots),
            |s| dev_of(req.device).is_some_and(|x| bitmap::test(x.map(), s as u64)),
        );
        if let Err(m) = checked {
            self.counters.verify_failures += 1;
            self.note(REJECTED, format_args!("request {} rejected: {:?}", req.id, m));
            return (status::BAD_REQUEST, 0);
        }
        // The check accepted the device index.
        let Some(dev) = self.devices.get_mut(req.device as usize) else { return (status::BAD_REQUEST, 0) };
        let result = match req.op {
            op::PAGE_OUT => page_out(dev, self.window, req, &mut self.changed),
            op::PAGE_IN => page_in(dev, self.window, req),
            op::DISCARD => discard(dev, req, &mut self.changed),
            _ => {
                dev.blk.flush();
                dev.blk.finish()
            }
        };
        let dead = dev.blk.dead() && !core::mem::replace(&mut dev.told_dead, true);
        if dead {
            println!("paging-server: device {}: given up after a failure it did not recover from", req.device);
        }
        match result {
            Ok(()) => {
                let c = &mut self.counters;
                match req.op {
                    op::PAGE_OUT => c.pages_written += req.count as u64,
                    op::PAGE_IN => c.pages_verified += req.count as u64,
                    op::DISCARD => c.disk_blocks_verified += req.count as u64,
                    _ => {}
                }
                (status::OK, req.count)
            }
            Err(e) => {
                self.counters.disk_failures += 1;
                self.note(FAILED, format_args!("device {}: request {} (op {}) failed: {}", req.device, req.id, req.op, e));
                (status::IO_ERROR, 0)
            }
        }
    }

    /// One console line of `kind`, while its budget lasts.
    fn note(&mut self, kind: usize, what: core::fmt::Arguments<'_>) {
        let n = &mut self.notes[kind];
        if *n < MAX_NOTES {
            *n += 1;
            let last = if *n == MAX_NOTES { " (further ones are only counted)" } else { "" };
            println!("paging-server: {}{}", what, last);
        }
    }
}

/// Window pages to slots, one transfer per run; then the slots are marked used and the
/// bitmap blocks that changed are written.
fn page_out(dev: &mut Device, window: u64, req: &Request, changed: &mut Blocks) -> Result<(), blk::Error> {
    for run in plan::runs(req.slots()) {
        let addr = window + (req.window_page as u64 + run.index as u64) * PAGE;
        dev.blk.transfer(true, dev.sector(run.slot), addr, run.pages as u64 * PAGE);
    }
    dev.blk.finish()?;
    plan::mark(dev.map_mut(), req.slots(), true, PAGE, changed);
    dev.write_blocks(changed)
}

/// Slots to window pages, one transfer per run.
fn page_in(dev: &mut Device, window: u64, req: &Request) -> Result<(), blk::Error> {
    for run in plan::runs(req.slots()) {
        let addr = window + (req.window_page as u64 + run.index as u64) * PAGE;
        dev.blk.transfer(false, dev.sector(run.slot), addr, run.pages as u64 * PAGE);
    }
    dev.blk.finish()
}

/// The slots are marked free and the bitmap blocks that changed are written; then,
/// if the device discards, their data is discarded (UNSUPP is not an error).
fn discard(dev: &mut Device, req: &Request, changed: &mut Blocks) -> Result<(), blk::Error> {
    plan::mark(dev.map_mut(), req.slots(), false, PAGE, changed);
    dev.write_blocks(changed)?;
    if !dev.blk.can_discard() {
        return Ok(());
    }
    let data_offset = dev.layout.data_offset;
    let sectors = PAGE / SECTOR;
    dev.blk.discard(plan::runs(req.slots()).map(|r| ((data_offset + r.slot as u64 * PAGE) / SECTOR, r.pages as u64 * sectors)));
    match dev.blk.finish() {
        Err(blk::Error::Status { status: blk::S_UNSUPP, .. }) => Ok(()),
        r => r,
    }
}
