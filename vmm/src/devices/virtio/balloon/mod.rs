//! virtio-balloon (virtio 1.2, 5.5): the cooperative path of Active Memory Sharing. The
//! guest *loans* pages to the pool by inflating the balloon; the device discards them
//! (their frames go back to the pool, with no paging I/O) and a later guest touch gets a
//! fresh zero page.
//!
//! - `device.rs`: the [`VirtioBalloon`] device (features, configuration space, queues).
//! - [`BalloonState`]: what the device shares with the pool's loaning policy and with
//!   metrics: the target, the loan, the guest's statistics and the counters.
//! - [`Discard`]: how inflated and reported pages are dropped — through the pool when the
//!   partition is in one (so its frame accounting stays exact), or with MADV_DONTNEED.
//!
//! Queues are numbered as the negotiated features make them (as Linux's driver does):
//! 0 inflateq, 1 deflateq, then statsq with STATS_VQ, then reporting_vq with
//! PAGE_REPORTING. Every page frame number and descriptor from the guest is untrusted:
//! out-of-range and duplicate page numbers and malformed chains are rejected and counted.

mod device;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};

pub use device::VirtioBalloon;

use super::mmio::MmioTransport;

/// Feature bits (virtio 1.2, 5.5.3).
pub const F_MUST_TELL_HOST: u32 = 0;
pub const F_STATS_VQ: u32 = 1;
pub const F_DEFLATE_ON_OOM: u32 = 2;
pub const F_PAGE_REPORTING: u32 = 5;

/// Size of every queue.
pub const QUEUE_SIZE: u16 = 128;

/// The balloon's page size: page frame numbers count 4 KiB.
pub const PFN_SHIFT: u32 = 12;

/// Most descriptors walked in one chain (inflate, deflate, stats or reporting). Linux
/// sends one descriptor of up to 256 page numbers; reporting chains are at most the queue
/// size. Longer chains are rejected without walking further.
pub const MAX_CHAIN_DESCRIPTORS: usize = QUEUE_SIZE as usize;

/// Most page numbers in one inflate or deflate chain (256 KiB of page numbers): bounds
/// the work one notification can cause.
pub const MAX_PFNS_PER_CHAIN: usize = 64 * 1024;

/// Largest statistics buffer accepted: 64 entries (Linux sends about ten).
pub const MAX_STATS_BYTES: u64 = 64 * 10;

/// Statistics tags (virtio 1.2, 5.5.6.3).
pub mod tag {
    pub const SWAP_IN: u16 = 0;
    pub const SWAP_OUT: u16 = 1;
    pub const MAJFLT: u16 = 2;
    pub const MINFLT: u16 = 3;
    pub const MEMFREE: u16 = 4;
    pub const MEMTOT: u16 = 5;
    pub const AVAIL: u16 = 6;
    pub const CACHES: u16 = 7;
    pub const HTLB_PGALLOC: u16 = 8;
    pub const HTLB_PGFAIL: u16 = 9;
    /// Tags known to this device; others are ignored, as the spec asks.
    pub const COUNT: usize = 10;
    pub const NAMES: [&str; COUNT] =
        ["swap_in", "swap_out", "major_faults", "minor_faults", "free", "total", "available", "caches", "hugetlb_allocs", "hugetlb_failures"];
}

/// Drops guest pages the driver gave away (inflated or reported). Returns the pool frames
/// freed (pages that were resident).
pub trait Discard: Send + Sync {
    fn discard(&self, gpa: u64, len: u64) -> u64;
}

/// Discard for a partition outside any pool: MADV_DONTNEED on the host mapping.
pub struct MadviseDiscard(pub crate::GuestMemory);

impl Discard for MadviseDiscard {
    fn discard(&self, gpa: u64, len: u64) -> u64 {
        use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
        let Some(host) = self.0.iter().find_map(|r| {
            let off = gpa.checked_sub(r.start_addr().0)?;
            (off.checked_add(len)? <= r.len()).then(|| r.as_ptr() as u64 + off)
        }) else {
            return 0;
        };
        // SAFETY: `gpa..gpa+len` lies in one guest memory region, mapped at `host`;
        // dropping guest pages is what the guest asked for (their contents are undefined
        // to it from now on).
        let rc = unsafe { libc::madvise(host as *mut _, len as usize, libc::MADV_DONTNEED) };
        if rc != 0 {
            tracing::warn!("balloon: MADV_DONTNEED failed: {}", std::io::Error::last_os_error());
            return 0;
        }
        len >> PFN_SHIFT
    }
}

/// The guest's latest statistics (tag → value; None = never reported).
#[derive(Debug, Clone, Default)]
pub struct GuestStats {
    pub values: [Option<u64>; tag::COUNT],
    /// How many times the guest reported.
    pub updates: u64,
}

impl GuestStats {
    pub fn get(&self, t: u16) -> Option<u64> {
        self.values.get(t as usize).copied().flatten()
    }
}

/// State shared by the device, the pool's loaning policy and metrics.
#[derive(Debug)]
pub struct BalloonState {
    /// Target balloon size in pages (`num_pages`), set by the pool.
    pub target: AtomicU64,
    /// A target held by the operator (`amsvm loan`), in pages; `u64::MAX`: none, the
    /// loaning policy decides.
    pub manual_target: AtomicU64,
    /// `actual` as the driver last wrote it (guest-supplied: displayed only).
    pub actual: AtomicU64,
    /// Pages in the balloon now, as the device counts them (its own bitmap).
    pub loaned: AtomicU64,
    /// The highest `loaned` seen.
    pub peak_loaned: AtomicU64,
    /// The driver set DRIVER_OK and the device runs.
    pub active: AtomicBool,
    pub stats: Mutex<GuestStats>,
    /// Pages inflated / deflated (accepted page numbers).
    pub inflated: AtomicU64,
    pub deflated: AtomicU64,
    /// Pages reported free (FREE_PAGE_REPORTING) and discarded.
    pub reported: AtomicU64,
    /// Pool frames freed by inflating and reporting, and the nanoseconds spent dropping
    /// the pages.
    pub frames_freed: AtomicU64,
    pub discard_ns: AtomicU64,
    /// Rejected page numbers: beyond guest memory; inflated twice; deflated but not in
    /// the balloon.
    pub rejected_out_of_range: AtomicU64,
    pub rejected_duplicate: AtomicU64,
    pub rejected_not_inflated: AtomicU64,
    /// Rejected chains: wrong direction, an empty buffer, a length that is not a whole
    /// number of entries, outside guest memory, too long (descriptors, page numbers or
    /// statistics bytes), a reported range not page aligned, or a broken chain.
    pub rejected_chains: AtomicU64,
    /// Available-ring entries naming a descriptor beyond the queue size.
    pub invalid_heads: AtomicU64,
    /// Notifications of a queue the negotiated features do not create.
    pub bad_notifications: AtomicU64,
}

impl Default for BalloonState {
    fn default() -> Self {
        BalloonState {
            target: AtomicU64::new(0),
            manual_target: AtomicU64::new(u64::MAX),
            actual: AtomicU64::new(0),
            loaned: AtomicU64::new(0),
            peak_loaned: AtomicU64::new(0),
            active: AtomicBool::new(false),
            stats: Mutex::new(GuestStats::default()),
            inflated: AtomicU64::new(0),
            deflated: AtomicU64::new(0),
            reported: AtomicU64::new(0),
            frames_freed: AtomicU64::new(0),
            discard_ns: AtomicU64::new(0),
            rejected_out_of_range: AtomicU64::new(0),
            rejected_duplicate: AtomicU64::new(0),
            rejected_not_inflated: AtomicU64::new(0),
            rejected_chains: AtomicU64::new(0),
            invalid_heads: AtomicU64::new(0),
            bad_notifications: AtomicU64::new(0),
        }
    }
}

impl BalloonState {
    /// The target the operator holds, if any.
    pub fn manual(&self) -> Option<u64> {
        Some(self.manual_target.load(Relaxed)).filter(|&t| t != u64::MAX)
    }

    /// Every counter with its name, for text, JSON and Prometheus output.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let all: [(&'static str, &AtomicU64); 16] = [
            ("target", &self.target),
            ("actual", &self.actual),
            ("loaned", &self.loaned),
            ("peak_loaned", &self.peak_loaned),
            ("inflated", &self.inflated),
            ("deflated", &self.deflated),
            ("reported", &self.reported),
            ("frames_freed", &self.frames_freed),
            ("discard_ns", &self.discard_ns),
            ("rejected_out_of_range", &self.rejected_out_of_range),
            ("rejected_duplicate", &self.rejected_duplicate),
            ("rejected_not_inflated", &self.rejected_not_inflated),
            ("rejected_chains", &self.rejected_chains),
            ("invalid_heads", &self.invalid_heads),
            ("bad_notifications", &self.bad_notifications),
            ("stats_updates", &AtomicU64::new(self.stats.lock().unwrap_or_else(|e| e.into_inner()).updates)),
        ];
        all.iter().map(|(n, c)| (*n, c.load(Relaxed))).collect()
    }

    pub fn guest_stats(&self) -> GuestStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl crate::metrics::DeviceCounters for BalloonState {
    fn rejected(&self) -> u64 {
        self.rejected_out_of_range.load(Relaxed)
            + self.rejected_duplicate.load(Relaxed)
            + self.rejected_not_inflated.load(Relaxed)
            + self.rejected_chains.load(Relaxed)
            + self.invalid_heads.load(Relaxed)
            + self.bad_notifications.load(Relaxed)
    }
}

/// How the pool drives one partition's balloon: its state, and the transport (to
/// announce a new target and to ask for statistics). Holds the transport weakly: the
/// partition owns it.
#[derive(Clone)]
pub struct BalloonHandle {
    pub state: Arc<BalloonState>,
    transport: Weak<Mutex<MmioTransport>>,
}

impl BalloonHandle {
    pub fn new(state: Arc<BalloonState>, transport: &Arc<Mutex<MmioTransport>>) -> Self {
        BalloonHandle { state, transport: Arc::downgrade(transport) }
    }

    fn with_device<R>(&self, f: impl FnOnce(&mut VirtioBalloon) -> R) -> Option<R> {
        let t = self.transport.upgrade()?;
        let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
        t.device_mut().as_any_mut().downcast_mut::<VirtioBalloon>().map(f)
    }

    /// Set the target (pages); the driver gets a configuration-change notification.
    pub fn set_target(&self, pages: u64) {
        if self.state.target.load(Relaxed) == pages {
            return;
        }
        self.with_device(|d| d.set_target(pages));
    }

    /// Ask the driver for fresh statistics (returns the stats buffer it left with us).
    pub fn request_stats(&self) {
        self.with_device(|d| d.request_stats());
    }
}
