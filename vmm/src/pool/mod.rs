//! The shared memory pool: Active Memory Sharing on KVM.
//!
//! Every partition's RAM is registered with its own userfaultfd. A page gets a pool frame
//! on first touch (zero-filled) or on page-in (read back from the partition's pager). The
//! budget is a hard limit: a fault that finds the pool full first pages something out —
//! across all partitions, weight-aware, with a clock (second chance) inside the chosen
//! partition, never below a partition's `min_mib`.
//!
//! Data paths (see DESIGN.md):
//! - first touch: MISSING fault → frame granted (reclaiming first if needed) →
//!   UFFDIO_COPY of zeros (a real frame, also for reads: the shared zero page would be
//!   replaced by a frame on the first write without the pool seeing it) → resume.
//! - page-out: victims are detached from guest memory atomically with UFFDIO_MOVE into a
//!   staging area (a guest write racing with the page-out faults and waits, it is never
//!   lost); all-zero pages are recorded as zero; pages whose keyed hash matches their slot
//!   are unchanged since their last page-out and not written again; the rest go to the
//!   pager in one batch; then the staging frames are dropped (MADV_DONTNEED).
//! - page-in: MISSING fault on a paged-out page → pager read → UFFDIO_COPY → resume.
//! - clustering: a fault also brings in the following pages that are in the same state
//!   (never touched, or paged out together to consecutive slots), up to
//!   [`partition::CLUSTER`] pages, into frames that are free — one ioctl, one read.
//!
//! Threads: one fault handler per partition. A handler that needs a frame may page out
//! another partition's pages; it never touches guest memory itself, only through
//! userfaultfd ioctls and the staging area, so VMM accesses to guest memory (virtio
//! device emulation) fault and are served like vCPU accesses.

mod huge;
mod loan;
mod pages;
mod partition;
mod uffd;

pub use partition::{Attached, PartitionPool, PauseSink, PoolError};

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::config::ReclaimPolicy;
use crate::metrics::PoolMetrics;

/// Pages paged out per reclaim round: amortizes the pager write and the staging
/// MADV_DONTNEED over several pages.
pub const RECLAIM_BATCH: usize = 32;

/// The fewest pages a reclaim round takes from its victim.
pub const MIN_RECLAIM: usize = 16;

/// Pages in the staging area, shared by all concurrent page-outs. Each round takes
/// `RECLAIM_BATCH` of them; more rounds than fit wait for a free batch.
const STAGING_PAGES: usize = RECLAIM_BATCH * 16;

/// How long a fault waits for frames before it looks for a victim again (frames are
/// also announced through the condition variable; this bounds a missed wake-up).
const FRAME_WAIT: Duration = Duration::from_millis(5);

struct PoolState {
    /// Frames granted.
    resident: u64,
    /// In registration order.
    partitions: Vec<Weak<PartitionPool>>,
    policy: ReclaimPolicy,
    /// How long each protection order lasts (`ReclaimPolicy::Protect`).
    rotate: Duration,
}

/// `ReclaimPolicy::Protect`: a partition is thrashing while its faults keep finding no
/// lower-ranked partition to take frames from (it pages itself, or higher ranks):
/// [`THRASH_FAULTS`] such faults within this long, and until this long after the last.
const THRASH_HOLD_MS: u64 = 500;
/// See [`THRASH_HOLD_MS`]: fewer is a moment (lower ranks had all their pages in
/// transit), not thrashing.
pub(crate) const THRASH_FAULTS: u32 = 4;

/// The staging area: where page-outs move victims before writing them. Registered with
/// its own userfaultfd (UFFDIO_MOVE's destination must be registered), which has no
/// remove events, so dropping staged frames needs no event reader.
struct Staging {
    base: *mut u8,
    uffd: userfaultfd::Uffd,
    free: Mutex<Vec<usize>>,
    cv: Condvar,
}

// SAFETY: `base` is a mapping owned by the Staging for its whole life; batches of it are
// handed to one thread at a time through the `free` list.
unsafe impl Send for Staging {}
// SAFETY: as above.
unsafe impl Sync for Staging {}

/// A fresh anonymous private read-write mapping of `len` bytes (no swap reserved);
/// the caller owns it and unmaps it.
fn map_anonymous(len: usize) -> std::io::Result<*mut libc::c_void> {
    // SAFETY: a new mapping at an address the kernel chooses; nothing else is touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(p)
    }
}

impl Staging {
    fn new() -> Result<Staging, PoolError> {
        let len = STAGING_PAGES * 4096;
        // Owned by the Staging until drop.
        let base = map_anonymous(len).map_err(|e| PoolError::Os("mmap of the staging area", e))?;
        // SAFETY: advice on the mapping made above.
        unsafe { libc::madvise(base, len, libc::MADV_NOHUGEPAGE) };
        let uffd = uffd::create(false).map_err(|e| PoolError::Uffd(format!("staging userfaultfd: {e}")))?;
        uffd.register_with_mode(base, len, userfaultfd::RegisterMode::MISSING)
            .map_err(|e| PoolError::Uffd(format!("registering the staging area: {e}")))?;
        let batches = (0..STAGING_PAGES / RECLAIM_BATCH).map(|b| b * RECLAIM_BATCH).collect();
        Ok(Staging { base: base as *mut u8, uffd, free: Mutex::new(batches), cv: Condvar::new() })
    }

    /// Take a batch of `RECLAIM_BATCH` staging pages (its first page index).
    fn take(&self) -> usize {
        let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(b) = f.pop() {
                return b;
            }
            f = self.cv.wait(f).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn give_back(&self, batch: usize) {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).push(batch);
        self.cv.notify_one();
    }

    fn page_addr(&self, i: usize) -> u64 {
        self.base as u64 + i as u64 * 4096
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this Staging owns; no batch is out (the pool is
        // being dropped, so no page-out is running).
        unsafe { libc::munmap(self.base.cast(), STAGING_PAGES * 4096) };
    }
}

/// The pool shared by all partitions of one amsvm.
pub struct Pool {
    capacity: u64,
    state: Mutex<PoolState>,
    frames: Condvar,
    /// Wakes the loaning policy early (free frames fell below the low watermark).
    loan_wake: Condvar,
    staging: Staging,
    pub metrics: Arc<PoolMetrics>,
    /// Key of the page hashes (per process, random).
    hash_seed: u64,
    /// When the pool was made: the clock of rotations and thrashing marks.
    started: Instant,
    /// Measurement mode (`amsvm bench pool`): faults are served with a zero page at once,
    /// with no budget, table or pager — the bare userfaultfd round trip.
    raw: bool,
    /// `huge_pages`: wholly resident 2 MiB ranges become huge pages (see `huge`).
    huge_pages: AtomicBool,
}

impl Pool {
    pub fn new(size_bytes: u64) -> Result<Arc<Pool>, PoolError> {
        Self::with_mode(size_bytes, false)
    }

    /// A pool that only measures the raw userfaultfd round trip (see `raw`).
    pub fn new_raw() -> Result<Arc<Pool>, PoolError> {
        Self::with_mode(u64::MAX, true)
    }

    fn with_mode(size_bytes: u64, raw: bool) -> Result<Arc<Pool>, PoolError> {
        let capacity = size_bytes / 4096;
        let metrics = Arc::new(PoolMetrics::default());
        metrics.size_pages.store(capacity, Relaxed);
        let hash_seed = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(std::process::id() as u64);
            h.finish()
        };
        let pool = Arc::new(Pool {
            capacity,
            state: Mutex::new(PoolState {
                resident: 0,
                partitions: Vec::new(),
                policy: ReclaimPolicy::Share,
                rotate: Duration::from_secs(crate::config::DEFAULT_ROTATE_S),
            }),
            frames: Condvar::new(),
            loan_wake: Condvar::new(),
            staging: Staging::new()?,
            metrics,
            hash_seed,
            started: Instant::now(),
            raw,
            huge_pages: AtomicBool::new(false),
        });
        if !raw {
            // The pool's own threads, each ending when the pool is dropped.
            let spawn = |name: &str, what: &'static str, run: fn(Weak<Pool>)| {
                let weak = Arc::downgrade(&pool);
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || {
                        crate::seccomp::apply(crate::seccomp::Kind::Pager);
                        run(weak)
                    })
                    .map(drop)
                    .map_err(|e| PoolError::Os(what, e))
            };
            spawn("pool-loans", "spawning the loaning policy", loan::run)?;
            spawn("pool-huge", "spawning the huge-page collapser", huge::run)?;
        }
        Ok(pool)
    }

    pub fn capacity_pages(&self) -> u64 {
        self.capacity
    }

    /// Back wholly resident 2 MiB ranges of partitions attached from now on with huge
    /// pages (see `huge`). Off until set.
    pub fn set_huge_pages(&self, on: bool) {
        self.huge_pages.store(on, Relaxed);
    }

    pub fn huge_pages(&self) -> bool {
        self.huge_pages.load(Relaxed)
    }

    /// Choose whom the pool pages when it is full (see [`ReclaimPolicy`]).
    pub fn set_policy(&self, policy: ReclaimPolicy, rotate: Duration) {
        let mut s = self.lock();
        s.policy = policy;
        s.rotate = rotate.max(Duration::from_millis(1));
    }

    /// Milliseconds since the pool was made, plus one (0 stands for "never").
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, p: &Arc<PartitionPool>) {
        let mut s = self.lock();
        s.partitions.retain(|w| w.strong_count() > 0);
        s.partitions.push(Arc::downgrade(p));
    }

    /// Grant one frame to `requester`, paging out victims first when the pool is full.
    /// Returns false if the requester is stopping (its fault need not be served).
    fn acquire(&self, requester: &PartitionPool) -> bool {
        loop {
            let victims = {
                let mut s = self.lock();
                if s.resident < self.capacity {
                    s.resident += 1;
                    // Wake the loaning policy when the free frames cross the low
                    // watermark (below it, it runs every `loan::INTERVAL` anyway: a wake
                    // per fault would only cost CPU and the pool's lock).
                    let low = (self.capacity as f64 * loan::LOW_WATERMARK) as u64;
                    if self.capacity - s.resident == low.saturating_sub(1) {
                        self.loan_wake.notify_one();
                    }
                    self.metrics.resident.store(s.resident, Relaxed);
                    self.metrics.peak_resident.fetch_max(s.resident, Relaxed);
                    return true;
                }
                (self.rank_victims(&s, requester), s.policy)
            };
            let ((victims, requester_rank), policy) = victims;
            if requester.is_detached() {
                return false;
            }
            // The best candidate first; the next if it could free nothing after all
            // (its pages went into transit meanwhile).
            let mut freed = 0;
            for (v, want, rank) in victims {
                freed = v.page_out(want);
                if freed > 0 {
                    self.metrics.reclaims.fetch_add(1, Relaxed);
                    // Under Protect: no lower-ranked partition had anything to give.
                    if policy == ReclaimPolicy::Protect && rank <= requester_rank {
                        requester.paged_without_lower(self.now_ms(), THRASH_HOLD_MS);
                    }
                    break;
                }
            }
            if freed == 0 {
                // Nothing could be freed now (every candidate at its floor or in transit):
                // wait for frames to come back.
                self.metrics.frame_waits.fetch_add(1, Relaxed);
                let s = self.lock();
                let _ = self.frames.wait_timeout_while(s, FRAME_WAIT, |s| s.resident >= self.capacity);
            }
        }
    }

    /// Take up to `n` frames for pages brought in on speculation (clustering): only
    /// frames that are free now beyond a reserve, so that under pressure — when the free
    /// frames are the few a reclaim round just freed — nothing is brought in that would
    /// only push out other pages.
    fn try_acquire(&self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let mut s = self.lock();
        let reserve = (self.capacity / 64).max(4 * RECLAIM_BATCH as u64);
        let k = n.min(self.capacity.saturating_sub(s.resident + reserve));
        s.resident += k;
        self.metrics.resident.store(s.resident, Relaxed);
        self.metrics.peak_resident.fetch_max(s.resident, Relaxed);
        k
    }

    /// Take exactly `n` frames if that leaves at least `keep_free` free (a whole first
    /// touch, see `huge`); nothing otherwise.
    fn try_acquire_exact(&self, n: u64, keep_free: u64) -> bool {
        let mut s = self.lock();
        if self.capacity.saturating_sub(s.resident) < n.saturating_add(keep_free) {
            return false;
        }
        s.resident += n;
        self.metrics.resident.store(s.resident, Relaxed);
        self.metrics.peak_resident.fetch_max(s.resident, Relaxed);
        true
    }

    /// `ReclaimPolicy::Protect`: a partition that is thrashing (it pages itself to run)
    /// while another is not yields its vCPUs' CPU time: paging, it would spend the CPU
    /// making little progress, which the protected partitions turn into work. It runs
    /// again at full priority once it stops thrashing (when the rotation protects it).
    /// Called by the loaning policy's thread every round.
    fn apply_cpu_yield(&self) {
        let (policy, parts) = {
            let s = self.lock();
            (s.policy, s.partitions.iter().filter_map(Weak::upgrade).collect::<Vec<_>>())
        };
        let now = self.now_ms();
        let thrashing: Vec<bool> =
            parts.iter().map(|p| policy == ReclaimPolicy::Protect && p.thrashing(now, THRASH_HOLD_MS)).collect();
        let someone_runs = thrashing.iter().any(|t| !t);
        for (p, t) in parts.iter().zip(thrashing) {
            p.yield_cpu(t && someone_runs);
        }
    }

    /// Wake the faults waiting for frames (a partition they may take from came back).
    fn wake_waiters(&self) {
        self.frames.notify_all();
    }

    /// Return `n` frames.
    fn release(&self, n: u64) {
        if n == 0 {
            return;
        }
        let mut s = self.lock();
        s.resident = s.resident.saturating_sub(n);
        self.metrics.resident.store(s.resident, Relaxed);
        drop(s);
        self.frames.notify_all();
    }

    /// The partitions to page out from, best first, with how many pages to take.
    ///
    /// Each partition has a target: its `min` plus a part of the pool above all
    /// minimums in proportion to `weight + 1` (a higher weight keeps memory longer).
    /// What a partition does not use of its share (its demand is what it holds now; the
    /// requester's is unbounded) goes to the others (water-filling), so an idle
    /// partition does not keep frames the busy ones need. The partition
    /// furthest above its target gives first: as many pages as it is above (at least
    /// [`MIN_RECLAIM`], at most [`RECLAIM_BATCH`]). Pages a partition's balloon was asked
    /// for and has not given yet count as given: a partition that is loaning is paged
    /// after one that does not cooperate. Partitions with nothing to give (at their
    /// `min`, all their pages in transit, paused or detaching) are left out.
    ///
    /// Another partition gives pages to `requester` only while it is at least
    /// [`MIN_RECLAIM`] pages above its target (in a pool of fewer than 64 x
    /// MIN_RECLAIM frames, 1/64 of the pool: there 16 pages would let a heavy
    /// partition get stuck below its share); otherwise the requester pages itself first. At equilibrium every partition sits at its target, and without this rule
    /// the one that keeps faulting (it wants more than its share) would take its pages
    /// from partitions that are within theirs.
    ///
    /// Under [`ReclaimPolicy::Protect`] the order is the protection order instead, lowest
    /// rank first (see [`protect_ranks`]), a whole batch from each.
    ///
    /// Each victim comes with its rank under Protect (0 otherwise), and the requester's
    /// rank is returned too.
    fn rank_victims(&self, s: &PoolState, requester: &PartitionPool) -> (Vec<(Arc<PartitionPool>, usize, usize)>, usize) {
        let parts: Vec<Arc<PartitionPool>> = s.partitions.iter().filter_map(Weak::upgrade).collect();
        let is_requester = |p: &Arc<PartitionPool>| std::ptr::eq(Arc::as_ptr(p), requester);
        if s.policy == ReclaimPolicy::Protect {
            let mut parts = parts;
            parts.sort_by_key(|p| p.order());
            let epoch = (self.started.elapsed().as_millis() / s.rotate.as_millis().max(1)) as u64;
            let ranks = protect_ranks(&parts.iter().map(|p| p.weight()).collect::<Vec<_>>(), epoch);
            let mine = parts.iter().zip(&ranks).find(|(p, _)| is_requester(p)).map_or(0, |(_, &r)| r);
            let mut order: Vec<(usize, Arc<PartitionPool>)> =
                ranks.into_iter().zip(parts).filter(|(_, p)| p.evictable() > 0).collect();
            order.sort_by_key(|(rank, _)| std::cmp::Reverse(*rank));
            return (order.into_iter().map(|(rank, p)| (p, RECLAIM_BATCH, rank)).collect(), mine);
        }
        let resident: Vec<f64> = parts.iter().map(|p| p.resident() as f64).collect();
        // Demand: what a partition holds now; the requester wants more than it holds.
        let targets = water_fill(
            self.capacity as f64,
            &parts
                .iter()
                .zip(&resident)
                .map(|(p, &r)| (p.min_pages as f64, p.weight() as f64 + 1.0, if is_requester(p) { self.capacity as f64 } else { r }))
                .collect::<Vec<_>>(),
        );
        let mut ranked: Vec<(f64, Arc<PartitionPool>)> = parts
            .into_iter()
            .zip(resident.iter().zip(targets))
            .filter(|(p, _)| p.evictable() > 0)
            .map(|(p, (&r, t))| (r - t - p.pending_loan() as f64, p))
            .collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        if let Some(pos) = ranked.iter().position(|(_, p)| is_requester(p)) {
            let margin = (MIN_RECLAIM as u64).min(self.capacity / 64).max(1) as f64;
            let first_within = ranked.iter().position(|(e, p)| *e < margin && !is_requester(p)).unwrap_or(ranked.len());
            if pos > first_within {
                let r = ranked.remove(pos);
                ranked.insert(first_within, r);
            }
        }
        let victims = ranked
            .into_iter()
            .map(|(excess, p)| (p, (excess.ceil().max(0.0) as usize).clamp(MIN_RECLAIM, RECLAIM_BATCH), 0))
            .collect();
        (victims, 0)
    }
}

/// `ReclaimPolicy::Protect`: the rank of each partition (given in config order by
/// weight), 0 the most protected: higher weights first; equal weights in
/// config order rotated by `epoch`, so that in each new epoch the partition that
/// was first among them goes last and every other one moves up.
pub(crate) fn protect_ranks(weights: &[u8], epoch: u64) -> Vec<usize> {
    let n = weights.len();
    let mut by: Vec<usize> = (0..n).collect();
    // Within a weight, k's place in the rotation: its distance after the first one of
    // this epoch.
    let turn = |k: usize| {
        let peers: Vec<usize> = (0..n).filter(|&j| weights[j] == weights[k]).collect();
        let pos = peers.iter().position(|&j| j == k).unwrap_or(0);
        (pos + peers.len() - (epoch % peers.len() as u64) as usize) % peers.len()
    };
    by.sort_by_key(|&k| (std::cmp::Reverse(weights[k]), turn(k)));
    let mut rank = vec![0; n];
    for (r, &k) in by.iter().enumerate() {
        rank[k] = r;
    }
    rank
}

/// Targets for partitions given as `(min, weight, demand)`: each gets its `min` plus a
/// weighted part of what is above all minimums; a partition whose demand is below that
/// gets its demand, and what it leaves is shared again among the others.
pub(crate) fn water_fill(capacity: f64, parts: &[(f64, f64, f64)]) -> Vec<f64> {
    let mut target: Vec<Option<f64>> = vec![None; parts.len()];
    let mut spare = capacity - parts.iter().map(|p| p.0).sum::<f64>();
    loop {
        let weight: f64 = parts.iter().zip(&target).filter(|(_, t)| t.is_none()).map(|(p, _)| p.1).sum();
        if weight == 0.0 {
            break;
        }
        let mut settled = false;
        for (i, &(min, w, demand)) in parts.iter().enumerate() {
            if target[i].is_none() && demand <= min + spare * w / weight {
                target[i] = Some(demand.max(min));
                spare -= (demand - min).max(0.0);
                settled = true;
            }
        }
        if !settled {
            for (i, &(min, w, _)) in parts.iter().enumerate() {
                if target[i].is_none() {
                    target[i] = Some(min + spare * w / weight);
                }
            }
            break;
        }
    }
    target.into_iter().map(|t| t.unwrap_or(0.0)).collect()
}

#[cfg(test)]
mod tests;
