//! The virtio-balloon driver (virtio 1.2 §5.5), polled from the workload's main loop.
//!
//! - Setup: negotiate VERSION_1, MUST_TELL_HOST, STATS_VQ (and PAGE_REPORTING in mode
//!   COOPERATE_AND_REPORT); queues are numbered compactly: 0 inflateq, 1 deflateq,
//!   2 statsq (with STATS_VQ), then reporting_vq.
//! - [`Balloon::poll`]: follow the target `num_pages` with at most [`BATCHES_PER_POLL`]
//!   inflate or deflate buffers of up to 1024 PFNs each (one request in flight, waited
//!   for), writing `actual` after each; then hand the statistics buffer back if the
//!   device returned it.
//! - [`Balloon::report_idle`]: report the idle pages as free through reporting_vq.
//!
//! Which pages are loaned is decided by [`crate::loan::Loans`]; the state of each idle
//! page lives in the workload's version table ([`crate::loan::LOANED`], ...). A device
//! error is printed once and the driver stops using the device.

use crate::platform;
use crate::loan::{self, Loans, Step, PFNS_PER_PAGE};
use crate::virtio::{self, status, Buf, Mmio, Queue};
use amsvm_abi::balloon as mode;

/// virtio device id of a balloon.
pub const DEVICE_ID: u32 = 5;
/// Pages of guest memory the driver needs: four queue pages (inflateq, deflateq, statsq,
/// reporting_vq), the PFN page and the statistics page.
pub const AREA_PAGES: u64 = 6;

/// Feature bits (virtio 1.2 §5.5.3).
const F_MUST_TELL_HOST: u64 = 1 << 0;
const F_STATS_VQ: u64 = 1 << 1;
const F_PAGE_REPORTING: u64 = 1 << 5;

/// Config space offsets (§5.5.4): the target and what the balloon holds, in 4 KiB pages.
const CFG_NUM_PAGES: u64 = 0;
const CFG_ACTUAL: u64 = 4;

/// Most inflate or deflate buffers per poll, so the workload keeps running.
pub const BATCHES_PER_POLL: u32 = 8;
/// The device status (for DEVICE_NEEDS_RESET) is read at the first poll and every this
/// many after: each read is an exit, and a device that needs a reset is rare.
const STATUS_EVERY: u32 = 8;
/// Most pages one free-page report descriptor covers (4 MiB, Linux's largest report).
const REPORT_RUN_PAGES: u64 = 1024;
/// A request that takes longer than this is a device error.
const REQUEST_TIMEOUT_NS: u64 = 30_000_000_000;
const PAGE: u64 = 4096;

/// Where the driver's memory and the idle pages are.
pub struct Setup {
    /// The device's register window.
    pub mmio_base: u64,
    /// [`AREA_PAGES`] pages reserved for the driver.
    pub area: u64,
    /// `WorkloadParams::balloon` (COOPERATE or COOPERATE_AND_REPORT).
    pub mode: u32,
    /// First idle page: the first loanable page.
    pub idle_base: u64,
    pub idle_pages: u64,
    /// Pages from `idle_base` to the end of the free RAM.
    pub loanable_pages: u64,
    /// Version-table entries of the idle pages (`idle_pages` of them).
    pub idle_versions: *mut u32,
    /// `BootInfo::mem_bytes` (MEMTOT).
    pub mem_bytes: u64,
}

/// Why the driver stopped using the device.
#[derive(Clone, Copy, Debug)]
enum Error {
    /// The transport, a request or the setup of a queue failed.
    Virtio(&'static str, virtio::Error),
    /// A queue returned a buffer the driver had not made available (its id).
    Unexpected(&'static str, u32),
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Virtio(what, e) => write!(f, "{what}: {e}"),
            Error::Unexpected(what, id) => write!(f, "{what}: device returned descriptor {id}, which was not available"),
        }
    }
}

/// The live device.
struct Device {
    mmio: Mmio,
    inflate: Queue,
    deflate: Queue,
    stats: Option<Queue>,
    report: Option<Queue>,
}

/// What the final line shows.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// Pages handed to inflateq / taken back through deflateq.
    pub inflated: u64,
    pub deflated: u64,
    /// Pages reported free.
    pub reported: u64,
    /// Times the device took the statistics and got a fresh buffer.
    pub stats_served: u64,
}

/// The driver. It lives in one place from [`Balloon::off`] on and is never moved: at
/// about 200 bytes a move would be a `memcpy` call, which this image avoids (see
/// link.ld).
pub struct Balloon {
    /// Whether [`Balloon::start`] ran (the device exists and the mode cooperates).
    started: bool,
    dev: Option<Device>,
    /// The PFN page and the statistics page.
    pfns: u64,
    stats_buf: u64,
    loans: Loans,
    idle_base: u64,
    idle_versions: *mut u32,
    mem_bytes: u64,
    /// The device failed and the driver stopped using it.
    failed: bool,
    /// The driver went silent on purpose ([`Balloon::go_silent`]).
    silent: bool,
    /// Polls so far (see [`STATUS_EVERY`]).
    polls: u32,
    pub counters: Counters,
}

impl Balloon {
    /// A driver that does nothing until [`Balloon::start`].
    pub const fn off() -> Balloon {
        Balloon {
            started: false,
            dev: None,
            pfns: 0,
            stats_buf: 0,
            loans: Loans { base_pfn: 0, loanable: 0, idle: 0, loaned: 0 },
            idle_base: 0,
            idle_versions: core::ptr::null_mut(),
            mem_bytes: 0,
            failed: false,
            silent: false,
            polls: 0,
            counters: Counters { inflated: 0, deflated: 0, reported: 0, stats_served: 0 },
        }
    }

    /// Sets the device up (after this, and until the end, the device may discard any
    /// loaned or reported page). A setup failure is printed and leaves a driver that does
    /// nothing ([`Balloon::failed`]). Call once.
    ///
    /// # Safety
    /// `s.mmio_base` must be an identity-mapped virtio-mmio window of at least
    /// [`virtio::MIN_WINDOW`] bytes; `s.area` [`AREA_PAGES`] page-aligned pages of RAM
    /// used by nothing else; `s.idle_versions` the `s.idle_pages` version-table entries
    /// of the idle pages, which nothing else writes while the driver lives; the
    /// `s.loanable_pages` pages from `s.idle_base` free RAM the driver may loan.
    pub unsafe fn start(&mut self, s: Setup) {
        self.started = true;
        self.pfns = s.area + 4 * PAGE;
        self.stats_buf = s.area + 5 * PAGE;
        self.loans = Loans::new(s.idle_base / PAGE, s.loanable_pages, s.idle_pages);
        self.idle_base = s.idle_base;
        self.idle_versions = s.idle_versions;
        self.mem_bytes = s.mem_bytes;
        // SAFETY: the caller vouches for the window.
        let mmio = unsafe { Mmio::new(s.mmio_base) };
        let wanted = F_MUST_TELL_HOST | F_STATS_VQ | if s.mode == mode::COOPERATE_AND_REPORT { F_PAGE_REPORTING } else { 0 };
        let features = match mmio.negotiate(DEVICE_ID, |_| wanted) {
            Ok((_, features)) => features,
            Err(e) => {
                self.fail(Error::Virtio("setup", e));
                return;
            }
        };
        // SAFETY: the first four pages of the area are the queues'.
        match unsafe { setup_queues(&mmio, s.area, features) } {
            Ok((inflate, deflate, stats, report)) => {
                mmio.driver_ok();
                self.dev = Some(Device { mmio, inflate, deflate, stats, report });
                // The device keeps the statistics buffer until it wants fresh figures.
                self.refill_stats();
            }
            Err(e) => {
                mmio.fail();
                self.fail(e);
            }
        }
    }

    /// Whether [`Balloon::start`] ran.
    pub fn started(&self) -> bool {
        self.started
    }

    /// Stop answering the device for good (the fault campaign's silent driver): the
    /// loans stay where they are, targets and statistics requests go unanswered.
    pub fn go_silent(&mut self) {
        self.silent = true;
    }

    pub fn silent(&self) -> bool {
        self.silent
    }

    /// Whether a device error made the driver stop.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Pages in the balloon now.
    pub fn loaned(&self) -> u64 {
        self.loans.loaned
    }

    /// Prints the error once, marks the device FAILED (if it got that far) and stops.
    fn fail(&mut self, e: Error) {
        if !self.failed {
            println!("balloon: {e}; driver stopped");
        }
        self.failed = true;
        if let Some(dev) = self.dev.take() {
            dev.mmio.fail();
        }
    }

    /// Reports every idle page not loaned as free, in chains of up to the queue size
    /// descriptors of up to [`REPORT_RUN_PAGES`] pages each. From the moment a page is
    /// reported its contents are undefined (zero or intact): it becomes
    /// [`loan::REPORTED`]. Does nothing unless PAGE_REPORTING was negotiated.
    pub fn report_idle(&mut self) {
        if let Err(e) = self.try_report_idle() {
            self.fail(e);
        }
    }

    fn try_report_idle(&mut self) -> Result<(), Error> {
        let Some(dev) = self.dev.as_mut() else { return Ok(()) };
        let Some(q) = dev.report.as_mut() else { return Ok(()) };
        let idle = self.loans.idle;
        // Loaned pages are the lowest idle pages; report the rest.
        let mut next = self.loans.loaned.min(idle);
        let mut runs = [(0u64, 0u64); virtio::QUEUE_SIZE as usize];
        let mut bufs = [Buf { addr: 0, len: 0, device_writes: true }; virtio::QUEUE_SIZE as usize];
        loop {
            let n = loan::report_chain(next, idle - next, REPORT_RUN_PAGES, q.size() as usize, &mut runs);
            if n == 0 {
                return Ok(());
            }
            let end = runs[n - 1].0 + runs[n - 1].1;
            for (b, &(first, pages)) in bufs.iter_mut().zip(&runs[..n]) {
                // REPORT_RUN_PAGES pages fit a descriptor's length.
                *b = Buf { addr: self.idle_base + first * PAGE, len: (pages * PAGE) as u32, device_writes: true };
            }
            // SAFETY: next..end lies below `idle`.
            unsafe { set_versions(self.idle_versions, next..end, loan::REPORTED) };
            q.request(&dev.mmio, &bufs[..n], platform::clock_ns, REQUEST_TIMEOUT_NS).map_err(|e| Error::Virtio("reporting_vq", e))?;
            self.counters.reported += end - next;
            next = end;
        }
    }

    /// One round of driver work: follow the target, serve the statistics. Returns
    /// whether it moved pages (then the target is not reached yet, or was just changed).
    pub fn poll(&mut self) -> bool {
        if self.silent {
            return false;
        }
        self.try_poll().unwrap_or_else(|e| {
            self.fail(e);
            false
        })
    }

    fn try_poll(&mut self) -> Result<bool, Error> {
        let Some(dev) = self.dev.as_mut() else { return Ok(false) };
        self.polls = self.polls.wrapping_add(1);
        if self.polls % STATUS_EVERY == 1 && dev.mmio.status() & status::DEVICE_NEEDS_RESET != 0 {
            return Err(Error::Virtio("device", virtio::Error::NeedsReset));
        }
        // Nothing is in flight on these queues: anything used there is unexpected.
        for (what, q) in [("inflateq", Some(&mut dev.inflate)), ("deflateq", Some(&mut dev.deflate)), ("reporting_vq", dev.report.as_mut())] {
            if let Some((id, _)) = q.and_then(|q| q.poll_used()) {
                return Err(Error::Unexpected(what, id));
            }
        }
        // One aligned 32-bit field: a single read is consistent without ConfigGeneration
        // (two exits fewer per poll).
        let target = dev.mmio.read(virtio::reg::CONFIG + CFG_NUM_PAGES);
        let mut moved = false;
        for _ in 0..BATCHES_PER_POLL {
            let (first_pfn, count, inflate) = match self.loans.next_step(target, PFNS_PER_PAGE) {
                Step::Done => break,
                Step::Inflate { first_pfn, count } => (first_pfn, count, true),
                Step::Deflate { first_pfn, count } => (first_pfn, count, false),
            };
            moved = true;
            for k in 0..count {
                // SAFETY: k < 1024 le32 entries of the PFN page (reserved, see `start`).
                // PFNs of RAM below 3 GiB fit in 32 bits.
                unsafe { (self.pfns as *mut u32).add(k as usize).write_volatile((first_pfn + k as u64) as u32) };
            }
            let buf = [Buf { addr: self.pfns, len: count * 4, device_writes: false }];
            let idle = self.loans.idle_pages_of(first_pfn, count);
            if inflate {
                // The pages are gone from the moment the device may see them, whatever
                // becomes of the request.
                // SAFETY: `idle_pages_of` stays below `idle`.
                unsafe { set_versions(self.idle_versions, idle, loan::LOANED) };
                self.loans.inflated(count);
                self.counters.inflated += count as u64;
                dev.inflate.request(&dev.mmio, &buf, platform::clock_ns, REQUEST_TIMEOUT_NS).map_err(|e| Error::Virtio("inflateq", e))?;
            } else {
                // MUST_TELL_HOST: the pages stay loaned until the device has used the
                // buffer.
                dev.deflate.request(&dev.mmio, &buf, platform::clock_ns, REQUEST_TIMEOUT_NS).map_err(|e| Error::Virtio("deflateq", e))?;
                // SAFETY: as above.
                unsafe { set_versions(self.idle_versions, idle, 0) };
                self.loans.deflated(count);
                self.counters.deflated += count as u64;
            }
            dev.mmio.write(virtio::reg::CONFIG + CFG_ACTUAL, self.loans.loaned as u32);
        }
        if let Some(q) = dev.stats.as_mut() {
            if let Some((id, _)) = q.poll_used() {
                if id != 0 {
                    return Err(Error::Unexpected("statsq", id));
                }
                // One buffer was in flight: a second one back is not ours.
                if let Some((id, _)) = q.poll_used() {
                    return Err(Error::Unexpected("statsq", id));
                }
                self.counters.stats_served += 1;
                self.refill_stats();
            }
        }
        Ok(moved)
    }

    /// Writes fresh statistics into the buffer and makes it available on statsq.
    fn refill_stats(&mut self) {
        let Some(dev) = self.dev.as_mut() else { return };
        let Some(q) = dev.stats.as_mut() else { return };
        let stats = self.loans.stats(self.mem_bytes);
        let len = loan::STATS * loan::STAT_BYTES;
        for i in 0..len {
            // SAFETY: the statistics page is reserved (see `start`); len < 4096.
            unsafe { (self.stats_buf as *mut u8).add(i).write_volatile(loan::stats_byte(&stats, i)) };
        }
        q.submit(&dev.mmio, &[Buf { addr: self.stats_buf, len: len as u32, device_writes: false }]);
    }
}

/// Sets the version-table entries `range` of `table` to `v`.
///
/// # Safety
/// `range` must lie inside the table, which nothing else accesses meanwhile.
unsafe fn set_versions(table: *mut u32, range: core::ops::Range<u64>, v: u32) {
    for i in range {
        // SAFETY: the caller's promise. Volatile, so the loop does not become a `memset`
        // call (see link.ld).
        unsafe { table.add(i as usize).write_volatile(v) };
    }
}

/// Sets up inflateq, deflateq and, as negotiated, statsq and reporting_vq (compact
/// numbering), one page each from `area`.
///
/// # Safety
/// `area` must be four page-aligned pages of RAM used by nothing else.
#[allow(clippy::type_complexity)]
unsafe fn setup_queues(mmio: &Mmio, area: u64, features: u64) -> Result<(Queue, Queue, Option<Queue>, Option<Queue>), Error> {
    let setup = |index: u16, page: u64, what: &'static str| {
        // SAFETY: page < 4 of the area the caller hands over.
        unsafe { Queue::setup_index(mmio, index, area + page * PAGE) }.map_err(|e| Error::Virtio(what, e))
    };
    let inflate = setup(0, 0, "inflateq")?;
    let deflate = setup(1, 1, "deflateq")?;
    let mut next = 2;
    let stats = if features & F_STATS_VQ != 0 {
        next += 1;
        Some(setup(2, 2, "statsq")?)
    } else {
        None
    };
    let report = if features & F_PAGE_REPORTING != 0 { Some(setup(next, 3, "reporting_vq")?) } else { None };
    Ok((inflate, deflate, stats, report))
}
