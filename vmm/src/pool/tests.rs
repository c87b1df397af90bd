//! Pool tests on plain host memory: a host thread plays the guest (its faults on the
//! registered memory are served exactly like a vCPU's), so budgets, contents and fault
//! cases can be checked page by page.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use super::pages::State;
use super::*;
use crate::config::ReclaimPolicy;
use crate::metrics::PartitionMetrics;
use crate::pager::{Pager, PagerError, Slot, PAGE_SIZE};

/// An in-memory paging device that can be told to fail.
#[derive(Default)]
struct MemPager {
    slots: Mutex<HashMap<Slot, Vec<u8>>>,
    next: AtomicUsize,
    writes: AtomicUsize,
    fail_writes_after: Option<usize>,
    fail_reads: AtomicBool,
}

fn eio(op: &'static str) -> PagerError {
    PagerError::Io { device: "mem-pager".into(), op, source: std::io::Error::from_raw_os_error(libc::EIO) }
}

impl Pager for MemPager {
    fn write(&self, pages: &[&[u8]], reuse: &[Option<Slot>]) -> Result<Vec<Slot>, PagerError> {
        if self.fail_writes_after.is_some_and(|n| self.writes.load(Relaxed) >= n) {
            return Err(eio("write"));
        }
        self.writes.fetch_add(pages.len(), Relaxed);
        let mut m = self.slots.lock().unwrap();
        Ok(pages
            .iter()
            .zip(reuse)
            .map(|(p, r)| {
                let s = r.unwrap_or_else(|| self.next.fetch_add(1, Relaxed) as Slot);
                m.insert(s, p.to_vec());
                s
            })
            .collect())
    }
    fn read(&self, slot: Slot, buf: &mut [u8]) -> Result<(), PagerError> {
        if self.fail_reads.load(Relaxed) {
            return Err(eio("read"));
        }
        buf[..PAGE_SIZE].copy_from_slice(&self.slots.lock().unwrap()[&slot]);
        Ok(())
    }
    fn read_run(&self, first: Slot, n: usize, buf: &mut [u8]) -> Result<(), PagerError> {
        for k in 0..n {
            self.read(first + k as Slot, &mut buf[k * PAGE_SIZE..(k + 1) * PAGE_SIZE])?;
        }
        Ok(())
    }
    fn free(&self, slots: &[Slot]) {
        let mut m = self.slots.lock().unwrap();
        for s in slots {
            m.remove(s);
        }
    }
    fn bytes_in_use(&self) -> u64 {
        (self.slots.lock().unwrap().len() * PAGE_SIZE) as u64
    }
    fn device(&self) -> std::path::PathBuf {
        "mem-pager".into()
    }
}

/// Anonymous memory standing in for guest RAM.
struct Region {
    base: *mut u64,
    pages: usize,
}
// SAFETY: the mapping is owned by the Region and only accessed through its methods.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    fn new(pages: usize) -> Region {
        // SAFETY: a fresh anonymous mapping owned by the Region.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), pages * 4096, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0)
        };
        assert_ne!(p, libc::MAP_FAILED);
        Region { base: p.cast(), pages }
    }
    fn addr(&self) -> u64 {
        self.base as u64
    }
    /// Fill page `i` with words derived from (tag, i, version).
    fn write(&self, i: usize, tag: u64, version: u64) {
        for w in 0..512 {
            // SAFETY: i < pages, w < 512: inside the mapping.
            unsafe { self.base.add(i * 512 + w).write_volatile(tag << 48 ^ (i as u64) << 20 ^ version << 10 ^ w as u64) };
        }
    }
    /// Check page `i` against `write(i, tag, version)` (version 0: never written, zeros).
    fn check(&self, i: usize, tag: u64, version: u64) -> bool {
        (0..512).all(|w| {
            // SAFETY: as in `write`.
            let v = unsafe { self.base.add(i * 512 + w).read_volatile() };
            v == if version == 0 { 0 } else { tag << 48 ^ (i as u64) << 20 ^ version << 10 ^ w as u64 }
        })
    }
    /// Resident pages (mincore).
    fn resident(&self) -> usize {
        let mut v = vec![0u8; self.pages];
        // SAFETY: the mapping is live; one byte per page.
        unsafe { libc::mincore(self.base.cast(), self.pages * 4096, v.as_mut_ptr()) };
        v.iter().filter(|b| **b & 1 != 0).count()
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping (after its pool attachment was dropped).
        unsafe { libc::munmap(self.base.cast(), self.pages * 4096) };
    }
}

struct Part {
    pp: Attached,
    region: Region,
    metrics: Arc<PartitionMetrics>,
    pager: Arc<MemPager>,
    paused: Arc<Mutex<Option<String>>>,
}

fn part(pool: &Arc<Pool>, name: &str, pages: usize, min_pages: u64, weight: u8, pager: MemPager) -> Part {
    let region = Region::new(pages);
    let metrics = Arc::new(PartitionMetrics::default());
    let pager = Arc::new(pager);
    let paused = Arc::new(Mutex::new(None));
    let p2 = paused.clone();
    let pp = PartitionPool::attach(
        pool,
        name,
        region.addr(),
        (pages * 4096) as u64,
        min_pages * 4096,
        weight,
        crate::config::LoanPolicy::Default,
        pager.clone(),
        metrics.clone(),
        Box::new(move |why| *p2.lock().unwrap() = Some(why)),
        None,
    )
    .unwrap();
    Part { pp: Attached(pp), region, metrics, pager, paused }
}

#[test]
fn budget_holds_and_contents_survive_paging() {
    let pool = Pool::new(64 * 4096).unwrap();
    let a = part(&pool, "a", 256, 0, 128, MemPager::default());
    let b = part(&pool, "b", 256, 0, 128, MemPager::default());
    std::thread::scope(|s| {
        for (p, tag) in [(&a, 1u64), (&b, 2u64)] {
            s.spawn(move || {
                for round in 1..=3u64 {
                    for i in 0..256 {
                        p.region.write(i, tag, round);
                    }
                    for i in (0..256).rev() {
                        assert!(p.region.check(i, tag, round), "partition {tag} page {i} round {round}");
                    }
                }
            });
        }
    });
    assert!(pool.metrics.peak_resident.load(Relaxed) <= 64);
    assert!(a.region.resident() + b.region.resident() <= 64, "host view: {} + {}", a.region.resident(), b.region.resident());
    for p in [&a, &b] {
        let m = &p.metrics;
        assert!(m.page_outs.load(Relaxed) > 0 && m.hpi.load(Relaxed) > 0, "page-outs {} hpi {}", m.page_outs.load(Relaxed), m.hpi.load(Relaxed));
    }
    // A handler settles its page just after waking the faulting thread: let it finish.
    let t0 = std::time::Instant::now();
    while (a.pp.0.table().incoming + b.pp.0.table().incoming) > 0 && t0.elapsed().as_secs() < 5 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    for p in [&a, &b] {
        assert_eq!(p.metrics.pmem.load(Relaxed), p.pp.0.resident());
    }
    assert_eq!(pool.metrics.resident.load(Relaxed), a.pp.0.resident() + b.pp.0.resident());
}

#[test]
fn zero_pages_are_not_written_and_unchanged_pages_not_rewritten() {
    let pool = Pool::new(16 * 4096).unwrap();
    let a = part(&pool, "a", 64, 0, 128, MemPager::default());
    // Read 64 never-written pages: every page-out finds zeros.
    for i in 0..64 {
        assert!(a.region.check(i, 1, 0));
    }
    assert!(a.metrics.page_out_zero.load(Relaxed) >= 40);
    assert_eq!(a.metrics.page_out_writes.load(Relaxed), 0);
    assert_eq!(a.pager.bytes_in_use(), 0, "zero pages take no space on the paging device");
    // Write them all, then read them all back twice without changing them.
    for i in 0..64 {
        a.region.write(i, 1, 1);
    }
    let writes = a.metrics.page_out_writes.load(Relaxed);
    for _ in 0..2 {
        for i in 0..64 {
            assert!(a.region.check(i, 1, 1), "page {i}");
        }
    }
    assert!(a.metrics.page_out_clean.load(Relaxed) >= 40, "unchanged pages left without a write");
    // Pages read back unchanged were only written once: at most the 16 resident at the
    // end of the write pass went out for the first time later.
    assert!(a.metrics.page_out_writes.load(Relaxed) <= writes + 16);
    // A changed page is written again.
    let before = a.metrics.page_out_writes.load(Relaxed);
    for i in 0..64 {
        a.region.write(i, 1, 2);
    }
    for i in 0..64 {
        assert!(a.region.check(i, 1, 2));
    }
    assert!(a.metrics.page_out_writes.load(Relaxed) >= before + 40);
}

#[test]
fn write_error_pauses_the_partition_and_loses_no_page() {
    let pool = Pool::new(32 * 4096).unwrap();
    let bad = part(&pool, "bad", 64, 0, 128, MemPager { fail_writes_after: Some(8), ..Default::default() });
    let good = part(&pool, "good", 64, 0, 128, MemPager::default());
    let stop = AtomicBool::new(false);
    let completed = AtomicUsize::new(0);
    std::thread::scope(|s| {
        // The failing partition writes until it is paused (its last fault may never be
        // served; detaching below releases it).
        s.spawn(|| {
            for i in 0..64 {
                if bad.paused.lock().unwrap().is_some() || stop.load(Relaxed) {
                    break;
                }
                bad.region.write(i, 7, 1);
                completed.store(i + 1, Relaxed);
            }
        });
        s.spawn(|| {
            for round in 1..=3 {
                for i in 0..64 {
                    good.region.write(i, 8, round);
                }
                for i in 0..64 {
                    assert!(good.region.check(i, 8, round), "good page {i} round {round}");
                }
            }
        });
        // Wait for the pause, then check every page of the paused partition: resident
        // pages hold what was written, paged-out ones are on its device.
        while bad.paused.lock().unwrap().is_none() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let why = bad.paused.lock().unwrap().clone().unwrap();
        assert!(why.contains("mem-pager") && why.contains("write failed"), "{why}");
        // Pages the writer finished before now; the one it may be in the middle of is
        // left out.
        let done = completed.load(Relaxed);
        {
            let t = bad.pp.0.table();
            for (i, p) in t.pages.iter().enumerate().take(done) {
                match p.state {
                    State::Resident => assert!(bad.region.check(i, 7, 1), "resident page {i} changed"),
                    State::Out => {
                        let mut buf = vec![0u8; PAGE_SIZE];
                        bad.pager.read(p.slot.unwrap(), &mut buf).unwrap();
                        assert!(buf.chunks(8).enumerate().all(|(w, c)| u64::from_le_bytes(c.try_into().unwrap())
                            == 7u64 << 48 ^ (i as u64) << 20 ^ 1 << 10 ^ w as u64));
                    }
                    State::Zero | State::Transit => {}
                }
            }
        }
        stop.store(true, Relaxed);
        bad.pp.0.detach();
    });
    assert!(good.paused.lock().unwrap().is_none());
    assert_eq!(bad.pp.0.evictable(), 0, "a paused partition is never a victim again");
}

#[test]
fn read_error_pauses_the_partition() {
    let pool = Pool::new(16 * 4096).unwrap();
    let a = part(&pool, "a", 64, 0, 128, MemPager::default());
    for i in 0..64 {
        a.region.write(i, 3, 1);
    }
    a.pager.fail_reads.store(true, Relaxed);
    std::thread::scope(|s| {
        s.spawn(|| {
            // Page 0 was paged out long ago: this read faults and is never served.
            let _ = a.region.check(0, 3, 1);
        });
        while a.paused.lock().unwrap().is_none() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let why = a.paused.lock().unwrap().clone().unwrap();
        assert!(why.contains("mem-pager") && why.contains("read failed"), "{why}");
        a.pp.0.detach();
    });
    // The page was not lost: it is still on the device.
    assert!(a.pager.bytes_in_use() == 0, "detach frees the slots");
}

#[test]
fn detach_returns_frames_and_slots() {
    let pool = Pool::new(32 * 4096).unwrap();
    let a = part(&pool, "a", 128, 0, 128, MemPager::default());
    let b = part(&pool, "b", 128, 0, 128, MemPager::default());
    for i in 0..128 {
        a.region.write(i, 1, 1);
    }
    let held = pool.metrics.resident.load(Relaxed);
    assert!(held > 16 && held <= 32, "{held}");
    assert_eq!(held, a.pp.0.resident());
    assert!(a.pager.bytes_in_use() > 0);
    let Part { pp, pager, region, .. } = a;
    drop(pp);
    assert_eq!(pool.metrics.resident.load(Relaxed), 0, "every frame came back");
    assert_eq!(pager.bytes_in_use(), 0, "every slot came back");
    drop(region);
    // The other partition can now use the whole pool without paging.
    for i in 0..32 {
        b.region.write(i, 2, 1);
    }
    assert_eq!(b.metrics.page_outs.load(Relaxed), 0);
}

#[test]
fn weight_and_min_decide_who_keeps_memory() {
    let pool = Pool::new(64 * 4096).unwrap();
    let heavy = part(&pool, "heavy", 128, 0, 255, MemPager::default());
    let light = part(&pool, "light", 128, 0, 0, MemPager::default());
    let floor = part(&pool, "floor", 64, 16, 0, MemPager::default());
    for i in 0..32 {
        floor.region.write(i, 9, 1);
    }
    // Both want all their pages all the time, in lockstep: one thread touches a page of
    // each in turn, so neither goes idle while the other still faults (an idle
    // partition's share rightly goes to the busy one, which would make the outcome
    // depend on how the scheduler ran two threads).
    for round in 1..=4 {
        for i in 0..128 {
            heavy.region.write(i, 1, round);
            light.region.write(i, 2, round);
        }
    }
    let (h, l, f) = (heavy.pp.0.resident(), light.pp.0.resident(), floor.pp.0.resident());
    assert!(h > l, "weight 255 keeps more than weight 0: {h} vs {l}");
    let fm = &floor.metrics;
    assert!(f >= 16, "min is never reclaimed: {f} (page-outs {}, zero {}, writes {}, clean {})", fm.page_outs.load(Relaxed), fm.page_out_zero.load(Relaxed), fm.page_out_writes.load(Relaxed), fm.page_out_clean.load(Relaxed));
    for i in 0..32 {
        assert!(floor.region.check(i, 9, 1));
    }
    for i in 0..128 {
        assert!(heavy.region.check(i, 1, 4) && light.region.check(i, 2, 4), "page {i}");
    }
}

#[test]
fn water_filling_gives_unused_shares_to_the_others() {
    // Equal weights, one idle partition: the busy one may use everything.
    assert_eq!(water_fill(64.0, &[(0.0, 1.0, 0.0), (0.0, 1.0, 64.0)]), vec![0.0, 64.0]);
    // Both busy: split by weight.
    assert_eq!(water_fill(64.0, &[(0.0, 1.0, 64.0), (0.0, 3.0, 64.0)]), vec![16.0, 48.0]);
    // Minimums first; a small demand is met and the rest shared.
    let t = water_fill(100.0, &[(10.0, 1.0, 12.0), (20.0, 1.0, 100.0), (0.0, 2.0, 100.0)]);
    assert_eq!(t[0], 12.0);
    assert!((t[1] - (20.0 + 68.0 / 3.0)).abs() < 1e-9 && (t[2] - 68.0 * 2.0 / 3.0).abs() < 1e-9, "{t:?}");
    assert!((t.iter().sum::<f64>() - 100.0).abs() < 1e-9);
}

#[test]
fn discarded_pages_return_frames_and_slots_and_come_back_as_zeros() {
    let pool = Pool::new(32 * 4096).unwrap();
    let a = part(&pool, "a", 64, 0, 128, MemPager::default());
    // 64 pages through a 32-frame pool: about half end up paged out.
    for i in 0..64 {
        a.region.write(i, 7, 1);
    }
    let resident_before = a.pp.0.resident();
    let slots_before = a.pager.bytes_in_use();
    assert!(slots_before > 0);
    // The guest gives pages 0..48 away (balloon inflate).
    let freed = crate::devices::virtio::balloon::Discard::discard(&*a.pp.0, 0, 48 * 4096);
    let t = a.pp.0.table();
    assert!(t.pages[..48].iter().all(|p| p.state == State::Zero && p.slot.is_none()), "every given page holds nothing");
    assert_eq!(t.resident, resident_before - freed);
    drop(t);
    assert_eq!(pool.metrics.resident.load(Relaxed), a.pp.0.resident(), "frames went back to the pool");
    assert!(a.region.resident() <= a.pp.0.resident() as usize, "host view agrees");
    assert!(a.pager.bytes_in_use() < slots_before, "their slots were freed");
    // Pages kept are intact; given pages read back as zeros (fresh frames).
    for i in 48..64 {
        assert!(a.region.check(i, 7, 1), "page {i}");
    }
    for i in 0..48 {
        assert!(a.region.check(i, 7, 0), "page {i} is zero after discard");
    }
    // Out-of-range requests are clamped to the partition.
    assert_eq!(a.pp.0.discard_pages(1 << 40, 10), 0);
}

#[test]
fn protect_ranks_put_weight_first_and_rotate_equals() {
    assert_eq!(protect_ranks(&[128, 128, 128], 0), vec![0, 1, 2]);
    // Next epoch: the first goes last, every other one moves up.
    assert_eq!(protect_ranks(&[128, 128, 128], 1), vec![2, 0, 1]);
    assert_eq!(protect_ranks(&[128, 128, 128], 2), vec![1, 2, 0]);
    assert_eq!(protect_ranks(&[128, 128, 128], 3), vec![0, 1, 2]);
    // A higher weight is always protected first; equal weights rotate among themselves.
    assert_eq!(protect_ranks(&[10, 200, 10], 0), vec![1, 0, 2]);
    assert_eq!(protect_ranks(&[10, 200, 10], 1), vec![2, 0, 1]);
    assert!(protect_ranks(&[], 5).is_empty());
}

#[test]
fn protect_keeps_whole_the_working_sets_that_fit_and_the_last_one_yields() {
    // 96 frames, three partitions with 40-page working sets: two fit, the third does not.
    let pool = Pool::new(96 * 4096).unwrap();
    pool.set_policy(ReclaimPolicy::Protect, std::time::Duration::from_secs(3600));
    let parts: Vec<Part> = ["a", "b", "c"].iter().map(|n| part(&pool, n, 48, 0, 128, MemPager::default())).collect();
    let (a, b, c) = (&parts[0], &parts[1], &parts[2]);
    // All three at once.
    std::thread::scope(|s| {
        for (k, p) in parts.iter().enumerate() {
            s.spawn(move || {
                let tag = k as u64 + 1;
                for round in 1..=6 {
                    for i in 0..40 {
                        p.region.write(i, tag, round);
                    }
                    for i in 0..40 {
                        assert!(p.region.check(i, tag, round), "partition {tag} page {i} round {round}");
                    }
                }
            });
        }
    });
    // A pass of the protected ones (what they lack comes from the last one), then
    // another: their whole working sets are resident now, nothing is read back.
    let pass = || {
        for (p, tag) in [(a, 1u64), (b, 2u64)] {
            for i in 0..40 {
                assert!(p.region.check(i, tag, 6), "partition {tag} page {i}");
            }
        }
    };
    pass();
    assert!(a.pp.0.resident() >= 40 && b.pp.0.resident() >= 40, "ranks 0 and 1 keep their working sets: {} {}", a.pp.0.resident(), b.pp.0.resident());
    let hpi = (a.metrics.hpi.load(Relaxed), b.metrics.hpi.load(Relaxed));
    pass();
    assert_eq!((a.metrics.hpi.load(Relaxed), b.metrics.hpi.load(Relaxed)), hpi, "protected working sets were not paged");
    // The last one runs on alone (as a vCPU thread would): it can only page itself, so it
    // is thrashing, and the policy thread (every 50 ms) makes it yield while the
    // protected ones run at normal priority.
    let settled = std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: gettid has no arguments and cannot fail.
            c.pp.0.add_vcpu_thread(unsafe { libc::gettid() });
            let t0 = std::time::Instant::now();
            let mut round = 7;
            while t0.elapsed().as_secs() < 10 {
                for i in 0..40 {
                    c.region.write(i, 3, round);
                }
                for i in 0..40 {
                    assert!(c.region.check(i, 3, round), "partition 3 page {i} round {round}");
                }
                round += 1;
                if c.pp.0.is_yielding() && !a.pp.0.is_yielding() && !b.pp.0.is_yielding() {
                    return true;
                }
            }
            false
        })
        .join()
        .unwrap()
    });
    assert!(settled, "the thrashing partition yields and the protected ones do not: {} {} {}", a.pp.0.is_yielding(), b.pp.0.is_yielding(), c.pp.0.is_yielding());
    assert!(c.metrics.cpu_yields.load(Relaxed) > 0);
    assert_eq!((a.metrics.hpi.load(Relaxed), b.metrics.hpi.load(Relaxed)), hpi, "the last one paged itself only");
    assert!(pool.metrics.peak_resident.load(Relaxed) <= 96);
}

#[test]
fn huge_pages_come_in_whole_page_out_page_by_page_and_collapse_again() {
    use crate::kvm::memory::tests::anon_huge_kb;
    // The host may not do transparent huge pages at all; then only the contents and the
    // accounting are checked.
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").is_ok_and(|s| !s.contains("[never]"));
    if !thp {
        eprintln!("transparent huge pages are off on this host: checking contents and accounting only");
    }
    let pool = Pool::new(16 << 20).unwrap();
    pool.set_huge_pages(true);
    let a = part(&pool, "a", 2048, 0, 0, MemPager::default());
    // The kernel puts anonymous mappings of whole 2 MiB on a 2 MiB boundary (when it
    // does huge pages at all).
    let thp = thp && a.region.addr().is_multiple_of(2 << 20);
    // A first touch brings its whole 2 MiB range in at once, as zeros.
    a.region.write(3, 1, 1);
    assert!(a.region.check(3, 1, 1) && (0..512).filter(|&i| i != 3).all(|i| a.region.check(i, 1, 0)));
    if thp {
        assert_eq!(a.metrics.huge_fills.load(Relaxed), 1);
        assert_eq!(a.pp.0.resident(), 512, "the whole range is resident and counted");
        assert_eq!(pool.metrics.resident.load(Relaxed), 512);
        assert_eq!(anon_huge_kb(a.region.addr()), 2048, "it is one huge page");
    }
    for i in 0..2048 {
        a.region.write(i, 1, 1);
    }
    if thp {
        // 4 ranges of 512 pages in a pool of 4096 frames: each leaves more than the low
        // watermark (1/8) free, so each comes in whole.
        assert_eq!(a.metrics.huge_fills.load(Relaxed), 4);
    }
    assert_eq!(a.metrics.zero_fills.load(Relaxed), 2048);
    // A partition of a higher weight needs the pool: a's pages are paged out page by
    // page, which splits its huge pages.
    let b = part(&pool, "b", 4096, 0, 255, MemPager::default());
    for i in 0..4096 {
        b.region.write(i, 2, 1);
    }
    assert!(a.metrics.page_outs.load(Relaxed) > 0, "a was paged");
    assert!(pool.metrics.peak_resident.load(Relaxed) <= 4096, "the budget held");
    for i in 0..4096 {
        assert!(b.region.check(i, 2, 1), "b's page {i}");
    }
    assert_eq!(pool.metrics.resident.load(Relaxed), a.pp.0.resident() + b.pp.0.resident());
    drop(b);
    // a's pages come back intact, page by page.
    for i in 0..2048 {
        assert!(a.region.check(i, 1, 1), "a's page {i}");
    }
    assert_eq!(a.pp.0.resident(), 2048);
    // Once a range is wholly resident again, two looks of the collapser make it a huge
    // page again (the pool's own collapser thread may be first).
    super::huge::round(&pool);
    super::huge::round(&pool);
    if thp {
        assert!(a.metrics.huge_collapses.load(Relaxed) > 0, "a's ranges were collapsed again");
        assert!(anon_huge_kb(a.region.addr()) >= 2048, "{} kB", anon_huge_kb(a.region.addr()));
    }
    for i in 0..2048 {
        assert!(a.region.check(i, 1, 1), "a's page {i} after the collapse");
    }
    assert!(pool.metrics.peak_resident.load(Relaxed) <= 4096, "the budget held");
    assert_eq!(pool.metrics.resident.load(Relaxed), a.pp.0.resident());
}
