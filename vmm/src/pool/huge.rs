//! Huge pages for resident memory in a pool (`huge_pages`, on by default).
//!
//! The pool grants, pages and counts guest memory in 4 KiB pages. A guest access
//! backed by a 2 MiB host page costs less (KVM maps it with one large entry; on this
//! platform's shadow paging that is the difference between QEMU's guests, whose RAM
//! is THP-backed, and ours). So a thread per pool looks at every partition every
//! [`INTERVAL`]: a 2 MiB range of guest memory (aligned in guest-physical and host
//! address) whose 512 pages were all resident at two looks in a row is collapsed
//! into a huge page with `MADV_COLLAPSE`, at most [`PER_ROUND`] per round.
//!
//! Nothing else changes: the page table still has 512 resident pages, the budget
//! counts the same frames. A page-out of one of them (`UFFDIO_MOVE` into the staging
//! area) splits the huge page again, and the other 511 stay where they are. The
//! kernel collapses only ranges whose every page is mapped (a userfaultfd-registered
//! range gets no new pages), copying them: a collapse briefly holds 2 MiB more host
//! memory than the pool counts, one at a time.
//!
//! First touches come in whole: a fault on a 2 MiB range no page of which was ever
//! installed takes 512 frames at once (only while the pool stays above its low
//! watermark after it), and the range gets a zeroed huge page that is made in a
//! per-partition area ([`HugeArea`]) and moved into guest memory with one
//! `UFFDIO_MOVE` — one fault instead of 512 (`PartitionPool::try_huge_fill`). The
//! pages the guest has not touched yet are zero and unreferenced: a page-out takes them
//! first, and writes nothing for them.
//!
//! KVM's dirty log, which the clock would otherwise read its references from, maps
//! guest memory at 4 KiB only: with huge pages the pool does without it (`partition.rs`).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::pages::State;
use super::{PartitionPool, Pool};

/// Guest pages in a huge page.
pub const PAGES: usize = 512;
/// How often the collapser looks at the pool.
pub const INTERVAL: Duration = Duration::from_millis(250);
/// Most collapses per round (each copies 2 MiB: 2 to 4 ms here).
pub const PER_ROUND: usize = 64;

/// What is known of one 2 MiB range: the collapser saw it wholly resident at its last
/// look; it was made a huge page; a page was installed in it (after which it has page
/// tables, and a huge page can no longer be moved in).
pub(super) const SEEN_FULL: u8 = 1;
pub(super) const HUGE: u8 = 2;
pub(super) const TOUCHED: u8 = 4;

/// Where a partition's fault handler makes the huge page of a whole first touch: 2 MiB
/// of address space, aligned, asking for a huge page; empty between fills (the page is
/// moved out into guest memory).
pub(super) struct HugeArea(u64);

impl HugeArea {
    pub(super) fn new() -> Option<HugeArea> {
        let len = 2 * PAGES * 4096;
        // Twice the size: the aligned 2 MiB inside it are kept (owned by the HugeArea),
        // the rest unmapped below.
        let raw = super::map_anonymous(len).ok()? as u64;
        let huge = (PAGES * 4096) as u64;
        let start = raw.next_multiple_of(huge);
        // SAFETY: both pieces lie inside the mapping made above and outside the kept
        // range [start, start + huge).
        unsafe {
            if start > raw {
                libc::munmap(raw as *mut _, (start - raw) as usize);
            }
            let end = start + huge;
            if raw + len as u64 > end {
                libc::munmap(end as *mut _, (raw + len as u64 - end) as usize);
            }
            libc::madvise(start as *mut _, huge as usize, libc::MADV_HUGEPAGE);
        }
        Some(HugeArea(start))
    }

    pub(super) fn addr(&self) -> u64 {
        self.0
    }

    /// Fill the area with zeroed memory: a huge page when the kernel has one.
    pub(super) fn populate(&self) -> std::io::Result<()> {
        // SAFETY: advice on the area, which this HugeArea owns.
        if unsafe { libc::madvise(self.0 as *mut _, PAGES * 4096, libc::MADV_POPULATE_WRITE) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

impl Drop for HugeArea {
    fn drop(&mut self) {
        // SAFETY: the mapping is owned by this HugeArea.
        unsafe { libc::munmap(self.0 as *mut _, PAGES * 4096) };
    }
}

/// The collapser thread of `pool` (ends when the pool is dropped).
pub(super) fn run(pool: Weak<Pool>) {
    loop {
        std::thread::sleep(INTERVAL);
        let Some(pool) = pool.upgrade() else { return };
        if pool.huge_pages() {
            round(&pool);
        }
    }
}

/// One round over every partition; returns the ranges collapsed.
pub(super) fn round(pool: &Pool) -> usize {
    let parts: Vec<Arc<PartitionPool>> = pool.lock().partitions.iter().filter_map(Weak::upgrade).collect();
    let mut budget = PER_ROUND;
    parts.iter().map(|p| p.collapse_huge(&mut budget)).sum()
}

impl PartitionPool {
    /// Collapse this partition's ranges that were wholly resident at this look and the
    /// last one, up to `budget` of them (spent); returns how many became huge pages.
    pub(super) fn collapse_huge(&self, budget: &mut usize) -> usize {
        // The ranges line up with huge pages only if guest memory starts on a 2 MiB
        // boundary (the kernel puts anonymous mappings of whole 2 MiB there).
        if !self.base.is_multiple_of((PAGES * 4096) as u64) || self.is_yielding() {
            return 0;
        }
        // Guest memory stays mapped while the guard is held (see `detach`).
        let Ok(alive) = self.alive.try_read() else { return 0 };
        if !*alive || self.paused.load(Relaxed) {
            return 0;
        }
        // (range, collapsed at an earlier round)
        let candidates: Vec<(usize, bool)> = {
            let t = self.table();
            let mut track = self.huge.lock().unwrap_or_else(|e| e.into_inner());
            let mut c = Vec::new();
            for (r, flags) in track.iter_mut().enumerate() {
                let full = t.pages[r * PAGES..(r + 1) * PAGES].iter().all(|p| p.state == State::Resident);
                if !full {
                    // A page left: if the range was a huge page, it has been split.
                    *flags &= TOUCHED;
                } else if *flags & SEEN_FULL != 0 {
                    c.push((r, *flags & HUGE != 0));
                } else {
                    *flags |= SEEN_FULL;
                }
            }
            c
        };
        let mut done = 0;
        for (r, was_huge) in candidates {
            // A range collapsed before is asked again without counting against the
            // budget: if it is still a huge page that costs a microsecond; if a page left
            // and came back between two looks (it was split), it is collapsed again.
            if !was_huge {
                if *budget == 0 {
                    continue;
                }
                *budget -= 1;
            }
            // SAFETY: advice on this partition's guest memory, mapped while `alive` is
            // held; MADV_COLLAPSE keeps every page's contents.
            let rc = unsafe { libc::madvise(self.addr(r * PAGES) as *mut _, PAGES * 4096, libc::MADV_COLLAPSE) };
            let mut track = self.huge.lock().unwrap_or_else(|e| e.into_inner());
            if rc == 0 {
                done += usize::from(!was_huge);
                track[r] |= HUGE;
            } else {
                // A page left meanwhile, or no huge page was free: look again later.
                track[r] &= TOUCHED;
            }
        }
        drop(alive);
        self.metrics().huge_collapses.fetch_add(done as u64, Relaxed);
        done
    }

    /// Serve a first touch of page `i` with a whole huge page, if its 2 MiB range never
    /// had a page installed and the pool can give 512 frames and stay above its low
    /// watermark. Returns false (the range is then marked touched: the caller installs
    /// a 4 KiB page there) otherwise, or if the move did not happen.
    pub(super) fn try_huge_fill(&self, i: usize) -> bool {
        let Some(area) = self.huge_area.as_ref() else { return false };
        let r = i / PAGES;
        {
            let mut track = self.huge.lock().unwrap_or_else(|e| e.into_inner());
            match track.get_mut(r) {
                Some(flags) if *flags & TOUCHED == 0 => *flags |= TOUCHED,
                _ => return false,
            }
        }
        let keep_free = (self.pool.capacity as f64 * super::loan::LOW_WATERMARK) as u64;
        if !self.pool.try_acquire_exact(PAGES as u64, keep_free) {
            return false;
        }
        let first = r * PAGES;
        {
            let mut t = self.table();
            if !t.pages[first..first + PAGES].iter().all(|p| p.state == State::Zero && p.slot.is_none()) {
                drop(t);
                self.pool.release(PAGES as u64);
                return false;
            }
            for p in &mut t.pages[first..first + PAGES] {
                p.state = State::Transit;
            }
            t.resident += PAGES as u64;
            t.incoming += PAGES as u64;
        }
        // Move the zeroed page in; a partial move (4 KiB pages, when the kernel had no
        // huge page) goes on from where it stopped.
        let (dst, len) = (self.addr(first), (PAGES * 4096) as u64);
        let mut moved = 0;
        let mut failed = None;
        if let Err(e) = area.populate() {
            failed = Some(format!("populating: {e}"));
        }
        while failed.is_none() && moved < len {
            match super::uffd::move_range(&self.uffd, dst + moved, area.addr() + moved, len - moved) {
                Ok(n) => moved += n,
                Err((n, _)) if n > 0 => moved += n,
                Err((_, errno)) => failed = Some(format!("UFFDIO_MOVE: errno {errno}")),
            }
        }
        if let Some(why) = &failed {
            tracing::debug!(partition = %self.name, "range {r}: no whole first touch ({why}); page by page");
        }
        let in_place = (moved / 4096) as usize;
        {
            let mut t = self.table();
            t.incoming -= PAGES as u64;
            t.resident -= (PAGES - in_place) as u64;
            for (k, p) in t.pages[first..first + PAGES].iter_mut().enumerate() {
                p.state = if k < in_place { State::Resident } else { State::Zero };
                p.referenced = first + k == i;
            }
            self.metrics().pmem.store(t.resident, Relaxed);
        }
        self.pool.release((PAGES - in_place) as u64);
        if in_place == PAGES {
            self.huge.lock().unwrap_or_else(|e| e.into_inner())[r] |= SEEN_FULL | HUGE;
            self.metrics().huge_fills.fetch_add(1, Relaxed);
        }
        self.metrics().zero_fills.fetch_add(in_place as u64, Relaxed);
        self.settled.notify_all();
        let _ = self.uffd.wake(dst as *mut _, len as usize);
        i < first + in_place
    }
}
