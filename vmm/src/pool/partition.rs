//! One partition's side of the pool: its userfaultfd, page table, pager, fault handler
//! thread, page-in and page-out.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use userfaultfd::{Event, EventBuffer, ReadWrite, RegisterMode, Uffd};
use vmm_sys_util::eventfd::EventFd;

use super::loan::LoanTrack;
use super::pages::{PageTable, State};
use crate::config::LoanPolicy;
use crate::devices::virtio::balloon::BalloonHandle;
use super::{uffd, Pool, RECLAIM_BATCH};
use crate::metrics::PartitionMetrics;
use crate::pager::{Pager, PAGE_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{0}: {1}")]
    Os(&'static str, #[source] std::io::Error),
    #[error("userfaultfd: {0} (amsvm needs /dev/userfaultfd or CAP_SYS_PTRACE, Linux 6.8 or newer)")]
    Uffd(String),
    #[error("guest memory at {0:#x}+{1:#x} is not page aligned")]
    Unaligned(u64, u64),
}

/// Most pages one fault brings in: the faulting page and the pages after it that are
/// in the same state — never touched (zero-filled together), or paged out together to
/// consecutive slots (read back with one read). Only free frames are used for the
/// neighbours, so clustering never pages anything out.
pub const CLUSTER: usize = 16;

/// Zeros for first touches: up to a whole cluster in one UFFDIO_COPY.
static ZERO: [u8; CLUSTER * PAGE_SIZE] = [0; CLUSTER * PAGE_SIZE];

/// How many pages starting at `i` (in state `s`, slot `slot`) a fault brings in.
fn cluster(t: &PageTable, i: usize, s: State, slot: Option<crate::pager::Slot>) -> usize {
    let mut n = 1;
    while n < CLUSTER && i + n < t.pages.len() {
        let p = &t.pages[i + n];
        let same = match s {
            State::Zero => p.state == State::Zero,
            State::Out => p.state == State::Out && slot.is_some_and(|sl| p.slot == sl.checked_add(n as u32)),
            _ => false,
        };
        if !same {
            break;
        }
        n += 1;
    }
    n
}

/// Pages detached into the staging area, as (page, staging index), and those that could
/// not be, with the state they keep.
type Detached = (Vec<(usize, usize)>, Vec<(usize, State)>);

impl crate::devices::virtio::balloon::Discard for PartitionPool {
    fn discard(&self, gpa: u64, len: u64) -> u64 {
        self.discard_pages((gpa / 4096) as usize, (len / 4096) as usize)
    }
}

/// Keeps a partition attached to the pool; dropping it detaches the partition (see
/// [`PartitionPool::detach`]). Drop it after the VM and before guest memory.
pub struct Attached(pub Arc<PartitionPool>);

impl Drop for Attached {
    fn drop(&mut self) {
        self.0.detach();
        // The last reference is dropped here, on the thread that tears the partition
        // down: dropping the partition's pool state drops its paging store, which
        // removes its file, and that must not happen on a pager or the loaning thread
        // that held a reference for a moment (their seccomp filters allow no unlink).
        // Out of the pool's list, nobody takes a new one; those taken are let go soon.
        self.0.pool.lock().partitions.retain(|w| !std::ptr::eq(w.as_ptr(), Arc::as_ptr(&self.0)));
        let t0 = Instant::now();
        while Arc::strong_count(&self.0) > 1 && t0.elapsed() < std::time::Duration::from_secs(2) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// Called once when the partition is paused because its paging device failed (it stays
/// paused until [`PartitionPool::resume`]); the message names the device and the error.
pub type PauseSink = Box<dyn Fn(String) + Send + Sync>;

/// A partition attached to the pool.
pub struct PartitionPool {
    pub(super) pool: Arc<Pool>,
    pub name: String,
    /// Host address of guest-physical 0 and the number of guest pages.
    pub(super) base: u64,
    pub(super) npages: usize,
    pub(super) uffd: Uffd,
    table: Mutex<PageTable>,
    /// Signalled whenever a page leaves `Transit`.
    pub(super) settled: Condvar,
    pager: Arc<dyn Pager>,
    pub(super) min_pages: u64,
    metrics: Arc<PartitionMetrics>,
    /// Held for reading by every page-out of this partition; detaching takes it for
    /// writing, so memory is never unmapped under a page-out.
    pub(super) alive: RwLock<bool>,
    pub(super) paused: AtomicBool,
    on_pause: PauseSink,
    stop: EventFd,
    handler: Mutex<Option<JoinHandle<()>>>,
    /// Where the clock learns which resident pages were used lately (a bitmap, one bit
    /// per guest page, set = written since the last call: KVM's dirty log).
    references: Mutex<Option<ReferenceSource>>,
    last_harvest: Mutex<Instant>,
    /// The partition's virtio-balloon, once its devices exist.
    balloon: Mutex<Option<BalloonHandle>>,
    loan_track: Mutex<LoanTrack>,
    /// Thread ids of the partition's vCPU threads (for `yield_cpu`).
    vcpu_tids: Mutex<Vec<i32>>,
    /// Per 2 MiB range of guest memory, what is known of it (`huge.rs`).
    pub(super) huge: Mutex<Vec<u8>>,
    /// Where whole first touches are made (with `huge_pages`, guest memory aligned).
    pub(super) huge_area: Option<super::huge::HugeArea>,
    /// When (the pool's `now_ms`) this partition was last found thrashing; 0: never.
    thrash_at: AtomicU64,
    /// Faults that found no lower rank to take from: since when, how many.
    thrash_window: Mutex<(u64, u32)>,
    /// Its place in the config (`ReclaimPolicy::Protect` ranks equal weights in this
    /// order before rotating); u32::MAX until set.
    order: AtomicU32,
}

/// The nice value of a yielding partition's vCPU threads.
const YIELD_NICE: i32 = 19;

/// Returns a bitmap of the pages written since the previous call.
pub type ReferenceSource = Box<dyn Fn() -> Option<Vec<u64>> + Send + Sync>;

/// How often at most the clock reads the reference bitmap: reading it write-protects the
/// written pages again, so their next write costs a (cheap, in-kernel) fault.
const HARVEST_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// Is the page at `addr` mapped (mincore)?
fn is_mapped(addr: u64) -> bool {
    let mut v = 0u8;
    // SAFETY: mincore only reads page-table state of our own address space.
    let rc = unsafe { libc::mincore(addr as *mut _, 4096, &mut v) };
    rc != 0 || v & 1 != 0
}

/// Set thread `tid`'s nice value (best effort: without CAP_SYS_NICE a thread cannot be
/// given its normal priority back, which is logged once).
fn set_nice(tid: i32, nice: i32) {
    // SAFETY: setpriority on one thread id; no memory is passed.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    let err = std::io::Error::last_os_error();
    // ESRCH: the thread has ended (its partition is stopping); nothing to do.
    if rc != 0 && err.raw_os_error() != Some(libc::ESRCH) {
        static WARNED: AtomicBool = AtomicBool::new(false);
        if !WARNED.swap(true, Relaxed) {
            tracing::warn!("cannot set the priority of vCPU thread {tid} to {nice}: {err}");
        }
    }
}

fn page_is_zero(p: &[u8]) -> bool {
    let (pre, words, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the bytes.
        unsafe { p.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

impl PartitionPool {
    /// Register guest memory `[base, base + len)` with the pool and start its fault
    /// handler (on `home_cpu` if given: see [`crate::partition::home_cpu`]). Call before
    /// anything touches that memory: every page must be granted by the pool.
    #[allow(clippy::too_many_arguments)]
    pub fn attach(
        pool: &Arc<Pool>,
        name: &str,
        base: u64,
        len: u64,
        min_bytes: u64,
        weight: u8,
        loan_policy: LoanPolicy,
        pager: Arc<dyn Pager>,
        metrics: Arc<PartitionMetrics>,
        on_pause: PauseSink,
        home_cpu: Option<usize>,
    ) -> Result<Arc<PartitionPool>, PoolError> {
        if !base.is_multiple_of(4096) || !len.is_multiple_of(4096) {
            return Err(PoolError::Unaligned(base, len));
        }
        // SAFETY: advice on guest memory, which the caller owns.
        // - Without huge pages it keeps the range at 4 KiB granularity (not even
        //   khugepaged collapses it).
        // - With them, it makes a missing fault on a range without page tables reach
        //   userfaultfd with none allocated (the kernel takes its huge-page path), so a
        //   whole first touch can move a huge page in (`huge.rs`). The pool's own 4 KiB
        //   installs are unchanged; khugepaged may collapse wholly resident ranges too.
        unsafe { libc::madvise(base as *mut _, len as usize, if pool.huge_pages() { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE }) };
        let uffd = uffd::create(true).map_err(|e| PoolError::Uffd(e.to_string()))?;
        uffd.register_with_mode(base as *mut _, len as usize, RegisterMode::MISSING)
            .map_err(|e| PoolError::Uffd(format!("registering guest memory: {e}")))?;
        let npages = (len / 4096) as usize;
        metrics.tunables.set_weight(weight);
        metrics.tunables.set_loan_policy(loan_policy);
        let pp = Arc::new(PartitionPool {
            pool: pool.clone(),
            name: name.to_string(),
            base,
            npages,
            uffd,
            table: Mutex::new(PageTable::new(npages)),
            settled: Condvar::new(),
            pager,
            min_pages: min_bytes / 4096,
            metrics,
            alive: RwLock::new(true),
            paused: AtomicBool::new(false),
            on_pause,
            stop: EventFd::new(libc::EFD_NONBLOCK).map_err(|e| PoolError::Os("eventfd", e))?,
            handler: Mutex::new(None),
            references: Mutex::new(None),
            last_harvest: Mutex::new(Instant::now()),
            balloon: Mutex::new(None),
            loan_track: Mutex::new(LoanTrack::default()),
            vcpu_tids: Mutex::new(Vec::new()),
            huge: Mutex::new(vec![0; npages / super::huge::PAGES]),
            huge_area: if pool.huge_pages() && base.is_multiple_of((super::huge::PAGES * 4096) as u64) {
                super::huge::HugeArea::new()
            } else {
                None
            },
            thrash_at: AtomicU64::new(0),
            thrash_window: Mutex::new((0, 0)),
            order: AtomicU32::new(u32::MAX),
        });
        pool.register(&pp);
        let me = pp.clone();
        let h = std::thread::Builder::new()
            .name(format!("{name}-pager"))
            .spawn(move || {
                if let Some(cpu) = home_cpu {
                    crate::partition::pin_current_thread(cpu);
                }
                crate::seccomp::apply(crate::seccomp::Kind::Pager);
                me.serve()
            })
            .map_err(|e| PoolError::Os("spawning the fault handler", e))?;
        *pp.handler.lock().unwrap() = Some(h);
        Ok(pp)
    }

    /// A vCPU thread of this partition (its thread id), whose CPU time the pool may make
    /// yield to other partitions (`policy = "protect"`).
    pub fn add_vcpu_thread(&self, tid: i32) {
        self.vcpu_tids.lock().unwrap_or_else(|e| e.into_inner()).push(tid);
        if self.metrics.yielding.load(Relaxed) {
            set_nice(tid, YIELD_NICE);
        }
    }

    /// A fault of this partition found no lower-ranked partition to take frames from
    /// (`ReclaimPolicy::Protect`): it is thrashing once that happened
    /// [`super::THRASH_FAULTS`] times within `hold_ms`.
    pub(super) fn paged_without_lower(&self, now_ms: u64, hold_ms: u64) {
        let mut w = self.thrash_window.lock().unwrap_or_else(|e| e.into_inner());
        if now_ms.saturating_sub(w.0) >= hold_ms {
            *w = (now_ms, 0);
        }
        w.1 += 1;
        if w.1 >= super::THRASH_FAULTS {
            self.thrash_at.store(now_ms, Relaxed);
        }
    }

    /// Was this partition found thrashing within `hold_ms`?
    pub(super) fn thrashing(&self, now_ms: u64, hold_ms: u64) -> bool {
        let t = self.thrash_at.load(Relaxed);
        t != 0 && now_ms.saturating_sub(t) < hold_ms
    }

    /// Its place in the config: the order in which `policy = "protect"` ranks partitions
    /// of equal weight (those without one come after, in the order they attached).
    pub fn set_order(&self, order: u32) {
        self.order.store(order, Relaxed);
    }

    pub(super) fn order(&self) -> u32 {
        self.order.load(Relaxed)
    }

    /// Its pool backs resident 2 MiB ranges with huge pages (`huge_pages`).
    pub fn huge_pages(&self) -> bool {
        self.pool.huge_pages()
    }

    /// Its vCPU threads run at the lowest priority now (see `yield_cpu`).
    pub fn is_yielding(&self) -> bool {
        self.metrics.yielding.load(Relaxed)
    }

    /// Run this partition's vCPU threads at the lowest priority (`on`) or at the
    /// normal one again.
    pub(super) fn yield_cpu(&self, on: bool) {
        if self.metrics.yielding.swap(on, Relaxed) == on {
            return;
        }
        if on {
            self.metrics.cpu_yields.fetch_add(1, Relaxed);
        }
        tracing::debug!(partition = %self.name, "{}", if on { "thrashing: its vCPUs yield the CPU" } else { "its vCPUs run at normal priority again" });
        for &tid in self.vcpu_tids.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            set_nice(tid, if on { YIELD_NICE } else { 0 });
        }
    }

    /// The partition's balloon, for the loaning policy (set again after a reset).
    pub fn set_balloon(&self, b: BalloonHandle) {
        *self.balloon.lock().unwrap_or_else(|e| e.into_inner()) = Some(b);
    }

    pub(super) fn balloon(&self) -> Option<BalloonHandle> {
        self.balloon.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Pages the balloon was asked for and has not given yet (0 when it is not active or
    /// does not follow its target): memory that is on its way back to the pool.
    pub(super) fn pending_loan(&self) -> u64 {
        let Some(b) = self.balloon() else { return 0 };
        if !b.state.active.load(Relaxed) || self.loan_track().unresponsive {
            return 0;
        }
        b.state.target.load(Relaxed).saturating_sub(b.state.loaned.load(Relaxed))
    }

    pub(super) fn loan_track(&self) -> std::sync::MutexGuard<'_, LoanTrack> {
        self.loan_track.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn metrics(&self) -> &PartitionMetrics {
        &self.metrics
    }

    /// The weight now (operators may change it while the partition runs).
    pub(super) fn weight(&self) -> u8 {
        self.metrics.tunables.weight()
    }

    /// The loan policy now (operators may change it while the partition runs).
    pub(super) fn loan_policy(&self) -> LoanPolicy {
        self.metrics.tunables.loan_policy()
    }

    /// Give the clock a source of reference bits (see [`ReferenceSource`]).
    pub fn set_reference_source(&self, f: ReferenceSource) {
        *self.references.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// Mark the resident pages written since the last harvest as referenced.
    fn harvest_references(&self) {
        {
            let mut last = self.last_harvest.lock().unwrap_or_else(|e| e.into_inner());
            if last.elapsed() < HARVEST_INTERVAL {
                return;
            }
            *last = Instant::now();
        }
        let bits = match self.references.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(f) => f(),
            None => return,
        };
        let Some(bits) = bits else { return };
        let mut t = self.table();
        let n = t.pages.len();
        for (w, &word) in bits.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let i = w * 64 + word.trailing_zeros() as usize;
                word &= word - 1;
                if i < n && t.pages[i].state == State::Resident {
                    t.pages[i].referenced = true;
                }
            }
        }
    }

    pub(super) fn table(&self) -> std::sync::MutexGuard<'_, PageTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn resident(&self) -> u64 {
        self.table().resident
    }

    /// Detached, or being detached. Never blocks: it is asked under the pool's lock
    /// (when picking victims), and a blocking read behind a waiting `detach` would wait
    /// for a page-out that itself waits for the pool's lock.
    pub fn is_detached(&self) -> bool {
        self.alive.try_read().map_or(true, |a| !*a)
    }

    /// Pages this partition could give up now without going below its minimum.
    pub(super) fn evictable(&self) -> u64 {
        if self.paused.load(Relaxed) || self.is_detached() {
            return 0;
        }
        self.table().evictable_above(self.min_pages)
    }

    pub(super) fn addr(&self, i: usize) -> u64 {
        self.base + i as u64 * 4096
    }

    fn pause(&self, why: String) {
        if !self.paused.swap(true, Relaxed) {
            tracing::error!(partition = %self.name, "paused: {why}");
            self.metrics.pauses.fetch_add(1, Relaxed);
            *self.metrics.paused.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
            (self.on_pause)(why);
        }
    }

    /// Resume a paused partition (its paging device works again, says the operator):
    /// faults are served again, and the vCPUs blocked on one retry it. False if it was
    /// not paused.
    pub fn resume(&self) -> bool {
        if !self.paused.swap(false, Relaxed) {
            return false;
        }
        *self.metrics.paused.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.metrics.resumes.fetch_add(1, Relaxed);
        tracing::info!(partition = %self.name, "resumed");
        // A vCPU whose fault was left unserved sleeps until its page is woken: wake all
        // of them; each access is tried again and faults anew where the page is missing.
        if let Err(e) = self.uffd.wake(self.base as *mut _, self.npages * 4096) {
            tracing::warn!(partition = %self.name, "waking the vCPUs after resume: {e}");
        }
        self.pool.wake_waiters();
        true
    }

    /// The fault handler thread.
    fn serve(self: Arc<Self>) {
        let mut buf = EventBuffer::new(64);
        loop {
            let mut fds = [
                libc::pollfd { fd: self.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: poll on two descriptors we own, with an array that outlives the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if rc < 0 {
                continue; // EINTR
            }
            if fds[1].revents != 0 {
                return;
            }
            let events: Vec<_> = match self.uffd.read_events(&mut buf) {
                Ok(it) => it.filter_map(|e| e.ok()).collect(),
                Err(e) => {
                    tracing::warn!(partition = %self.name, "reading userfaultfd events: {e}");
                    continue;
                }
            };
            for ev in events {
                match ev {
                    Event::Pagefault { addr, rw, .. } => self.fault(addr as u64, rw == ReadWrite::Write),
                    Event::Remove { start, end } => self.discarded(start as u64, end as u64),
                    _ => {}
                }
            }
        }
    }

    /// Serve a fault at host address `addr`.
    fn fault(&self, addr: u64, _write: bool) {
        let t0 = Instant::now();
        let page_addr = addr & !4095;
        let Some(i) = page_addr.checked_sub(self.base).map(|o| (o / 4096) as usize).filter(|&i| i < self.npages) else {
            return;
        };
        self.pool.metrics.faults.fetch_add(1, Relaxed);
        if self.pool.raw {
            // SAFETY: a missing page of registered guest memory; ZERO holds a page.
            let _ = unsafe { self.uffd.copy(ZERO.as_ptr().cast(), page_addr as *mut _, 4096, true) };
            return;
        }
        if self.try_huge_fill(i) {
            return;
        }
        // Claim the page, or find it already served; with it, the pages after it that
        // can come in with it (see `cluster`).
        let (prev, slot, mut run) = {
            let mut t = self.table();
            loop {
                match t.pages[i].state {
                    State::Resident => {
                        drop(t);
                        // Served meanwhile (two threads faulted on one page). A resident
                        // page that is not mapped would fault for ever: that is a bug in
                        // the pool, and the partition stops rather than spin.
                        if !is_mapped(page_addr) {
                            self.pause(format!("internal error: page {i} is resident in the pool's table but not mapped"));
                            return;
                        }
                        let _ = self.uffd.wake(page_addr as *mut _, 4096);
                        return;
                    }
                    State::Transit => t = self.settled.wait(t).unwrap_or_else(|e| e.into_inner()),
                    s => {
                        let slot = t.pages[i].slot;
                        let run = cluster(&t, i, s, slot);
                        for j in i..i + run {
                            t.pages[j].state = State::Transit;
                        }
                        t.resident += run as u64;
                        t.incoming += run as u64;
                        break (s, slot, run);
                    }
                }
            }
        };
        if self.paused.load(Relaxed) || !self.pool.acquire(self) {
            // Stopping: leave the pages where they were and the vCPU blocked; teardown
            // unregisters the memory, which wakes it.
            for j in i..i + run {
                self.settle(j, prev, false);
            }
            return;
        }
        // The neighbours come in only with frames that are free now: they are a guess,
        // nobody is paged out for them.
        let extra = self.pool.try_acquire(run as u64 - 1) as usize;
        for j in i + 1 + extra..i + run {
            self.settle(j, prev, false);
        }
        run = 1 + extra;
        let len = run * PAGE_SIZE;
        let outcome = match prev {
            State::Zero => {
                // Real zero-filled frames even for a read: a shared zero page would not
                // be a frame now, but the guest's first write to it would take one
                // behind the pool's back (a copy-on-write the pool never sees).
                // Counted before the copy wakes the guest: whoever sees it run on sees
                // the fault counted (the counters are read while the partition runs).
                self.metrics.zero_fills.fetch_add(run as u64, Relaxed);
                // SAFETY: the run is registered guest memory in Transit, claimed by this
                // thread: no one else installs pages there; ZERO holds `len` bytes.
                let r = unsafe { self.uffd.copy(ZERO.as_ptr().cast(), page_addr as *mut _, len, true) };
                r.map(|_| ()).map_err(|e| format!("installing zero pages: {e}"))
            }
            State::Out => {
                let slot = slot.expect("a paged-out page has a slot");
                crate::faults::get().page_in_gate(&self.name);
                let mut buf = vec![0u8; len];
                let read = if run == 1 { self.pager.read(slot, &mut buf) } else { self.pager.read_run(slot, run, &mut buf) };
                match read {
                    Err(e) => {
                        self.pool.release(run as u64);
                        for j in i..i + run {
                            self.settle(j, State::Out, false);
                        }
                        self.pause(e.to_string());
                        return;
                    }
                    Ok(()) => {
                        // Counted before the copy wakes the guest, as above (the time is
                        // the page-in's up to its install).
                        self.metrics.hpi.fetch_add(1, Relaxed);
                        self.metrics.cluster_reads.fetch_add(run as u64 - 1, Relaxed);
                        self.metrics.hpit_ns.fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
                        // SAFETY: as above; buf holds `len` bytes.
                        let r = unsafe { self.uffd.copy(buf.as_ptr().cast(), page_addr as *mut _, len, true) };
                        r.map(|_| ()).map_err(|e| format!("installing paged-in pages: {e}"))
                    }
                }
            }
            State::Resident | State::Transit => unreachable!("claimed pages are Zero or Out"),
        };
        if let Err(e) = outcome {
            // EEXIST: something is mapped there already (cannot happen while the pages
            // are ours in Transit): take them as resident and wake the waiter.
            tracing::warn!(partition = %self.name, "page {i}: {e}");
            let _ = self.uffd.wake(page_addr as *mut _, len);
        }
        // The faulting page was used; its neighbours only guessed at, so the clock takes
        // them first if the guess was wrong.
        self.settle(i, State::Resident, true);
        for j in i + 1..i + run {
            self.settle(j, State::Resident, false);
        }
    }

    /// End a fault's claim of page `i` in `state` (`referenced` when just faulted in).
    /// The frame counted for it at claim time is kept only if the page ends up resident.
    fn settle(&self, i: usize, state: State, referenced: bool) {
        let mut t = self.table();
        t.incoming -= 1;
        let p = &mut t.pages[i];
        p.state = state;
        p.referenced = referenced;
        if state != State::Resident {
            t.resident -= 1;
        }
        self.metrics.pmem.store(t.resident, Relaxed);
        drop(t);
        self.settled.notify_all();
    }

    /// Guest memory was discarded (balloon, MADV_DONTNEED): those pages hold nothing now.
    fn discarded(&self, start: u64, end: u64) {
        let first = start.saturating_sub(self.base) / 4096;
        let last = (end.saturating_sub(self.base)).div_ceil(4096).min(self.npages as u64);
        let mut freed_frames = 0;
        let mut slots = Vec::new();
        {
            let mut t = self.table();
            for i in first as usize..last as usize {
                let p = &mut t.pages[i];
                match p.state {
                    State::Resident => {
                        freed_frames += 1;
                        p.state = State::Zero;
                    }
                    State::Out => p.state = State::Zero,
                    _ => continue,
                }
                slots.extend(p.slot.take());
            }
            t.resident -= freed_frames;
            self.metrics.pmem.store(t.resident, Relaxed);
        }
        self.pager.free(&slots);
        self.metrics.pager_bytes.store(self.pager.bytes_in_use(), Relaxed);
        self.pool.release(freed_frames);
    }

    /// Detach `victims` (claimed, in `Transit`; ascending) from guest memory into the
    /// staging batch `batch` (victim k to staging page `batch + k`), runs of consecutive
    /// pages with one move. Returns the pages moved, as (page, staging index), and those
    /// that could not be, with the state they keep.
    fn detach_to_staging(&self, victims: &[usize], batch: usize) -> Detached {
        let staging = &self.pool.staging;
        // Detach the victims from guest memory, runs of consecutive pages with one move.
        let mut moved = Vec::with_capacity(victims.len()); // (page, staging index)
        let mut back = Vec::new(); // (page, state) to settle without I/O
        let mut k = 0;
        while k < victims.len() {
            let mut end = k + 1;
            while end < victims.len() && victims[end] == victims[end - 1] + 1 {
                end += 1;
            }
            let (first, n) = (victims[k], (end - k) as u64);
            if uffd::move_range(&staging.uffd, staging.page_addr(batch + k), self.addr(first), n * 4096).is_ok() {
                moved.extend(victims[k..end].iter().enumerate().map(|(o, &v)| (v, batch + k + o)));
                k = end;
                continue;
            }
            // The move stopped part way. Which pages moved is read from the page tables
            // (a partial move reports EAGAIN whatever stopped it); the others are tried
            // one by one for their own error.
            for (j, &v) in victims.iter().enumerate().take(end).skip(k) {
                let (guest, stage) = (self.addr(v), staging.page_addr(batch + j));
                if is_mapped(stage) && !is_mapped(guest) {
                    moved.push((v, batch + j));
                    continue;
                }
                match uffd::move_page(&staging.uffd, stage, guest) {
                    Ok(()) => moved.push((v, batch + j)),
                    // Nothing mapped: the page holds no data.
                    Err(libc::ENOENT) => {
                        tracing::warn!(partition = %self.name, "page {v} was resident but nothing is mapped there");
                        back.push((v, State::Zero))
                    }
                    Err(errno) => {
                        tracing::debug!(partition = %self.name, "page {v} cannot be moved now (errno {errno}); keeping it");
                        back.push((v, State::Resident));
                    }
                }
            }
            k = end;
        }
        if !moved.is_empty() && self.huge_area.is_some() {
            // Their 2 MiB ranges are no longer huge pages (the move split them).
            let mut track = self.huge.lock().unwrap_or_else(|e| e.into_inner());
            for &(v, _) in &moved {
                if let Some(flags) = track.get_mut(v / super::huge::PAGES) {
                    *flags &= super::huge::TOUCHED;
                }
            }
        }
        (moved, back)
    }

    /// The guest gave pages `[first, first + n)` away (balloon inflate, free page
    /// reporting): drop their contents and return their frames and slots. Resident pages
    /// are detached through the staging area like a page-out (no remove event, so this
    /// never waits on the fault handler to read one); paged-out pages just lose their
    /// slot; pages in transit are waited for. Returns the frames freed.
    pub fn discard_pages(&self, first: usize, n: usize) -> u64 {
        let gone = || self.alive.try_read().map_or(true, |a| !*a);
        if gone() {
            return 0;
        }
        let end = first.saturating_add(n).min(self.npages);
        let mut freed = 0u64;
        let mut slots = Vec::new();
        let mut i = first;
        'batches: while i < end {
            // Claim up to a staging batch of resident pages; forget paged-out ones.
            let mut claimed = Vec::with_capacity(RECLAIM_BATCH);
            {
                let mut t = self.table();
                while i < end && claimed.len() < RECLAIM_BATCH {
                    let p = &mut t.pages[i];
                    match p.state {
                        State::Resident => {
                            p.state = State::Transit;
                            claimed.push(i);
                        }
                        State::Out => {
                            p.state = State::Zero;
                            slots.extend(p.slot.take());
                        }
                        State::Zero => {}
                        // Being paged in or out: wait until it settles and look again
                        // (otherwise a page-out finishing later would keep the old
                        // contents, and the guest would read them back after a deflate
                        // instead of zeros). Claims are processed first, and no lock
                        // but the table's is held while waiting, so this never waits on
                        // a thread that waits on it.
                        State::Transit if claimed.is_empty() => {
                            t = self.settled.wait_timeout(t, std::time::Duration::from_millis(10)).unwrap_or_else(|e| e.into_inner()).0;
                            if gone() {
                                break 'batches;
                            }
                            continue;
                        }
                        State::Transit => break,
                    }
                    i += 1;
                }
                t.leaving += claimed.len() as u64;
            }
            if claimed.is_empty() {
                continue;
            }
            // Guest memory stays mapped while the guard is held (see `detach`).
            let alive = self.alive.try_read().ok().filter(|a| **a);
            let (moved, back) = if alive.is_some() {
                let staging = &self.pool.staging;
                let batch = staging.take();
                let r = self.detach_to_staging(&claimed, batch);
                // SAFETY: the batch's staging pages belong to this thread (see page_out).
                unsafe { libc::madvise(staging.page_addr(batch) as *mut _, RECLAIM_BATCH * PAGE_SIZE, libc::MADV_DONTNEED) };
                staging.give_back(batch);
                r
            } else {
                (Vec::new(), claimed.iter().map(|&j| (j, State::Resident)).collect())
            };
            drop(alive);
            {
                let mut t = self.table();
                for &(j, _) in &moved {
                    let p = &mut t.pages[j];
                    p.state = State::Zero;
                    slots.extend(p.slot.take());
                }
                let mut gone_pages = moved.len() as u64;
                for &(j, st) in &back {
                    let p = &mut t.pages[j];
                    p.state = st;
                    if st == State::Zero {
                        slots.extend(p.slot.take());
                        gone_pages += 1;
                    }
                }
                t.resident -= gone_pages;
                t.leaving -= claimed.len() as u64;
                self.metrics.pmem.store(t.resident, Relaxed);
                freed += gone_pages;
            }
            self.settled.notify_all();
            if gone() {
                break;
            }
        }
        self.pager.free(&slots);
        self.metrics.pager_bytes.store(self.pager.bytes_in_use(), Relaxed);
        self.pool.release(freed);
        freed
    }

    /// Page out up to `want` pages; returns the frames freed.
    pub(super) fn page_out(&self, want: usize) -> u64 {
        let Ok(alive) = self.alive.try_read() else { return 0 };
        if !*alive || self.paused.load(Relaxed) {
            return 0;
        }
        let t0 = Instant::now();
        self.harvest_references();
        let victims = {
            let mut t = self.table();
            let floor = self.min_pages;
            t.pick_victims(want.min(RECLAIM_BATCH), floor)
        };
        if victims.is_empty() {
            return 0;
        }
        let staging = &self.pool.staging;
        let batch = staging.take();
        let (moved, mut back) = self.detach_to_staging(&victims, batch);
        // Classify: zero, unchanged since its last page-out, or to be written.
        let mut zero = Vec::new();
        let mut clean = Vec::new();
        let mut dirty = Vec::new(); // (page, staging index, hash)
        {
            let t = self.table();
            for &(i, s) in &moved {
                // SAFETY: the staging page was just filled by UFFDIO_MOVE and belongs to
                // this batch, which only this thread uses.
                let data = unsafe { std::slice::from_raw_parts(staging.page_addr(s) as *const u8, PAGE_SIZE) };
                if page_is_zero(data) {
                    zero.push(i);
                    continue;
                }
                let h = xxhash_rust::xxh3::xxh3_128_with_seed(data, self.pool.hash_seed);
                let p = &t.pages[i];
                if p.slot.is_some() && p.hash == h {
                    clean.push(i);
                } else {
                    dirty.push((i, s, h));
                }
            }
        }
        let pages: Vec<&[u8]> = dirty
            .iter()
            // SAFETY: as above.
            .map(|&(_, s, _)| unsafe { std::slice::from_raw_parts(staging.page_addr(s) as *const u8, PAGE_SIZE) })
            .collect();
        let reuse: Vec<_> = {
            let t = self.table();
            dirty.iter().map(|&(i, _, _)| t.pages[i].slot).collect()
        };
        let written = if dirty.is_empty() { Ok(Vec::new()) } else { self.pager.write(&pages, &reuse) };
        drop(pages);
        let mut freed_slots = Vec::new();
        let written = match written {
            Ok(slots) => slots,
            Err(e) => {
                // Put every page that was to be written back where it was; nothing is lost.
                for &(i, s, _) in &dirty {
                    if let Err(errno) = uffd::move_page(&self.uffd, self.addr(i), staging.page_addr(s)) {
                        // The guest range is ours while in Transit; this cannot fail
                        // short of a kernel change. Copy as a last resort.
                        tracing::error!(partition = %self.name, "moving page {i} back failed (errno {errno}); copying");
                        // SAFETY: the staging page is ours; the guest page is missing.
                        let _ = unsafe { self.uffd.copy(staging.page_addr(s) as *const _, self.addr(i) as *mut _, 4096, true) };
                    }
                    back.push((i, State::Resident));
                }
                dirty.clear();
                self.pause(e.to_string());
                Vec::new()
            }
        };
        // Drop the staged frames (the dirty ones that failed were moved back already).
        // SAFETY: the batch's staging pages belong to this thread; dropping them frees
        // their frames, and the staging uffd has no remove events to wait for.
        let rc = unsafe { libc::madvise(staging.page_addr(batch) as *mut _, RECLAIM_BATCH * PAGE_SIZE, libc::MADV_DONTNEED) };
        if rc != 0 {
            tracing::error!("dropping staged pages failed: {}", std::io::Error::last_os_error());
        }
        staging.give_back(batch);
        // Record the outcome.
        let freed = (zero.len() + clean.len() + dirty.len()) as u64;
        {
            let mut t = self.table();
            for &i in &zero {
                let p = &mut t.pages[i];
                p.state = State::Zero;
                freed_slots.extend(p.slot.take());
            }
            for &i in &clean {
                t.pages[i].state = State::Out;
            }
            for (&(i, _, h), slot) in dirty.iter().zip(&written) {
                let p = &mut t.pages[i];
                p.state = State::Out;
                p.slot = Some(*slot);
                p.hash = h;
            }
            let mut unfreed_zero = 0;
            for &(i, s) in &back {
                let p = &mut t.pages[i];
                p.state = s;
                if s == State::Zero {
                    freed_slots.extend(p.slot.take());
                    unfreed_zero += 1;
                } else {
                    p.referenced = true;
                }
            }
            t.resident -= freed + unfreed_zero;
            t.leaving -= victims.len() as u64;
            self.metrics.pmem.store(t.resident, Relaxed);
            self.pool.release(unfreed_zero);
        }
        self.settled.notify_all();
        self.pager.free(&freed_slots);
        self.metrics.page_outs.fetch_add(freed, Relaxed);
        self.metrics.page_out_zero.fetch_add(zero.len() as u64, Relaxed);
        self.metrics.page_out_clean.fetch_add(clean.len() as u64, Relaxed);
        self.metrics.page_out_writes.fetch_add(dirty.len() as u64, Relaxed);
        self.metrics.pager_bytes.store(self.pager.bytes_in_use(), Relaxed);
        self.pool.release(freed);
        self.metrics.page_out_ns.fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
        freed
    }

    /// Leave the pool: wait for page-outs of this partition to end, stop the handler,
    /// unregister guest memory (waking any thread still blocked on it), drop its
    /// contents, and return every frame and paging slot. Call once the partition's vCPUs
    /// and devices are stopped and before its memory is unmapped.
    pub fn detach(&self) {
        *self.alive.write().unwrap_or_else(|e| e.into_inner()) = false;
        let _ = self.stop.write(1);
        if let Some(h) = self.handler.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
        let _ = self.uffd.unregister(self.base as *mut _, self.npages * 4096);
        // Free the frames for real before handing them back to the pool: otherwise
        // another partition could take them while these pages still occupy memory.
        // SAFETY: the partition is stopped (vCPUs and devices joined) and its memory no
        // longer registered; dropping its contents is what leaving the pool means.
        unsafe { libc::madvise(self.base as *mut _, self.npages * 4096, libc::MADV_DONTNEED) };
        let (frames, slots) = {
            let mut t = self.table();
            let frames = t.resident;
            let slots: Vec<_> = t.pages.iter_mut().filter_map(|p| p.slot.take()).collect();
            t.resident = 0;
            t.incoming = 0;
            t.leaving = 0;
            for p in t.pages.iter_mut() {
                p.state = State::Zero;
            }
            (frames, slots)
        };
        self.pager.free(&slots);
        self.metrics.pmem.store(0, Relaxed);
        self.metrics.pager_bytes.store(self.pager.bytes_in_use(), Relaxed);
        self.pool.release(frames);
    }
}
