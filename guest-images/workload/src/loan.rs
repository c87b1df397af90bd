//! The balloon driver's bookkeeping: which pages are loaned, what a page of the version
//! table must hold at the final pass, the statistics the driver reports and the chains
//! of free-page reports. Pure code without pointers, so that the host tests can run it
//! too (see `#[cfg(test)]` below).
//!
//! Loanable memory is every page from the first idle page to the end of the free RAM:
//! idle pages first (stamped, resident), then pages the workload never touches. The
//! balloon is a stack on it: pages `[base_pfn, base_pfn + loaned)` are loaned, inflate
//! pushes the pages just above, deflate pops the most recently loaned ones.

/// Version-table value of an idle page that is in the balloon: its contents are gone, it
/// is neither touched nor verified until it is deflated.
pub const LOANED: u32 = u32::MAX;
/// Version-table value of an idle page that was stamped with [`IDLE_VERSION`] and then
/// reported free: at the final pass it must read back all zero or still carry its stamp.
pub const REPORTED: u32 = u32::MAX - 1;
/// Highest version a written page gets; the write after it wraps to 1 (0 means "never
/// written", and the two values above are markers).
pub const MAX_VERSION: u32 = u32::MAX - 2;
/// Version of an idle page, stamped once at start. An idle page taken back by deflate
/// gets version 0 ("never written": the host hands back a fresh page, all zero).
pub const IDLE_VERSION: u32 = 1;

/// The version a page holding `v` gets when it is written again.
pub fn next_version(v: u32) -> u32 {
    if v >= MAX_VERSION {
        1
    } else {
        v + 1
    }
}

/// What the final pass expects of a page, from its version-table value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Loaned: do not touch.
    Skip,
    /// Exactly this version (0: all zero).
    Exact(u32),
    /// Reported free: all zero, or exactly this version.
    ZeroOr(u32),
}

pub fn check(v: u32) -> Check {
    match v {
        LOANED => Check::Skip,
        REPORTED => Check::ZeroOr(IDLE_VERSION),
        v => Check::Exact(v),
    }
}

/// Page frame numbers per inflate or deflate buffer: one 4 KiB page of le32.
pub const PFNS_PER_PAGE: u32 = 1024;

/// One batch of work toward the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do: the balloon holds what the target asks for (or all it can).
    Done,
    /// Loan the pages `[first_pfn, first_pfn + count)`.
    Inflate { first_pfn: u64, count: u32 },
    /// Take back the pages `[first_pfn, first_pfn + count)`.
    Deflate { first_pfn: u64, count: u32 },
}

/// The loan stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loans {
    /// Page frame number (address / 4096) of the first loanable page, the first idle page.
    pub base_pfn: u64,
    /// Loanable pages, from `base_pfn` to the end of the free RAM.
    pub loanable: u64,
    /// The first `idle` loanable pages are idle pages (they have version-table entries);
    /// at most `loanable`.
    pub idle: u64,
    /// Pages `[base_pfn, base_pfn + loaned)` are in the balloon.
    pub loaned: u64,
}

impl Loans {
    pub fn new(base_pfn: u64, loanable: u64, idle: u64) -> Self {
        Loans { base_pfn, loanable, idle: idle.min(loanable), loaned: 0 }
    }

    /// Pages the balloon should hold for a target of `target` pages: all of it if the
    /// loanable memory allows, else everything loanable.
    pub fn goal(&self, target: u32) -> u64 {
        (target as u64).min(self.loanable)
    }

    /// The next batch toward `target`, at most `max` pages (at least 1).
    pub fn next_step(&self, target: u32, max: u32) -> Step {
        let goal = self.goal(target);
        let max = max.max(1) as u64;
        if goal > self.loaned {
            let count = (goal - self.loaned).min(max);
            Step::Inflate { first_pfn: self.base_pfn + self.loaned, count: count as u32 }
        } else if goal < self.loaned {
            let count = (self.loaned - goal).min(max);
            Step::Deflate { first_pfn: self.base_pfn + self.loaned - count, count: count as u32 }
        } else {
            Step::Done
        }
    }

    /// Records an inflate of `count` pages (the pages right above the loaned ones).
    pub fn inflated(&mut self, count: u32) {
        self.loaned = (self.loaned + count as u64).min(self.loanable);
    }

    /// Records a deflate of `count` pages (the most recently loaned ones).
    pub fn deflated(&mut self, count: u32) {
        self.loaned = self.loaned.saturating_sub(count as u64);
    }

    /// The idle pages (numbered from 0 at the first idle page) among the pages
    /// `[first_pfn, first_pfn + count)`.
    pub fn idle_pages_of(&self, first_pfn: u64, count: u32) -> core::ops::Range<u64> {
        let start = first_pfn.saturating_sub(self.base_pfn).min(self.idle);
        let end = (first_pfn.saturating_sub(self.base_pfn) + count as u64).min(self.idle);
        start..end
    }

    /// Loanable pages not in the balloon.
    pub fn free_pages(&self) -> u64 {
        self.loanable - self.loaned
    }

    /// Idle pages not in the balloon.
    pub fn idle_not_loaned(&self) -> u64 {
        self.idle - self.loaned.min(self.idle)
    }

    /// The statistics the driver reports (virtio 1.2 §5.5.6.3): no swap and no faults;
    /// free and available memory are the loanable pages not loaned (idle pages count as
    /// free, they are droppable cache); caches are the idle pages not loaned.
    pub fn stats(&self, mem_bytes: u64) -> [(u16, u64); STATS] {
        let free = self.free_pages() * PAGE;
        [
            (tag::SWAP_IN, 0),
            (tag::SWAP_OUT, 0),
            (tag::MAJFLT, 0),
            (tag::MINFLT, 0),
            (tag::MEMFREE, free),
            (tag::MEMTOT, mem_bytes),
            (tag::AVAIL, free),
            (tag::CACHES, self.idle_not_loaned() * PAGE),
        ]
    }
}

const PAGE: u64 = 4096;

/// Statistics tags (virtio 1.2 §5.5.6.3).
pub mod tag {
    pub const SWAP_IN: u16 = 0;
    pub const SWAP_OUT: u16 = 1;
    pub const MAJFLT: u16 = 2;
    pub const MINFLT: u16 = 3;
    pub const MEMFREE: u16 = 4;
    pub const MEMTOT: u16 = 5;
    pub const AVAIL: u16 = 6;
    pub const CACHES: u16 = 7;
}

/// Statistics entries the driver sends.
pub const STATS: usize = 8;
/// Bytes of one packed entry `{le16 tag; le64 val}`.
pub const STAT_BYTES: usize = 10;

/// Byte `i` of the packed statistics array holding `entries`.
pub fn stats_byte(entries: &[(u16, u64)], i: usize) -> u8 {
    let (tag, val) = entries[i / STAT_BYTES];
    match i % STAT_BYTES {
        j @ 0..=1 => (tag >> (8 * j)) as u8,
        j => (val >> (8 * (j - 2))) as u8,
    }
}

/// The next chain of a free-page report: the run of `pages` pages from page `first`
/// (any page numbering) is cut into pieces of at most `max_run` pages, up to `max_descs`
/// of them per chain. Writes `(first page, pages)` of each piece into `out` (at least
/// `max_descs` long) and returns how many it wrote; 0 when `pages` is 0.
pub fn report_chain(first: u64, pages: u64, max_run: u64, max_descs: usize, out: &mut [(u64, u64)]) -> usize {
    let max_run = max_run.max(1);
    let mut done = 0;
    let mut n = 0;
    while done < pages && n < max_descs.min(out.len()) {
        let run = (pages - done).min(max_run);
        out[n] = (first + done, run);
        done += run;
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_wrap_around_the_markers() {
        assert_eq!(next_version(0), 1);
        assert_eq!(next_version(MAX_VERSION - 1), MAX_VERSION);
        assert_eq!(next_version(MAX_VERSION), 1);
        for v in [1, 7, MAX_VERSION] {
            assert_eq!(check(v), Check::Exact(v));
        }
        assert_eq!(check(0), Check::Exact(0));
        assert_eq!(check(LOANED), Check::Skip);
        assert_eq!(check(REPORTED), Check::ZeroOr(IDLE_VERSION));
    }

    /// Follows a sequence of targets batch by batch and checks the stack against a model
    /// that tracks each page: loaned pages are exactly `[base, base + loaned)`, every
    /// inflate takes pages not loaned and every deflate returns loaned ones.
    #[test]
    fn the_stack_follows_targets_and_never_loans_twice() {
        let (base, loanable, idle) = (0x1000u64, 5000u64, 3000u64);
        let mut l = Loans::new(base, loanable, idle);
        let mut loaned = vec![false; loanable as usize];
        for &target in &[0u32, 1, 2500, 2500, 100, 4999, 5000, 9000, 0, 3001, 2999, u32::MAX, 7] {
            let mut batches = 0;
            loop {
                match l.next_step(target, PFNS_PER_PAGE) {
                    Step::Done => break,
                    Step::Inflate { first_pfn, count } => {
                        assert!((1..=PFNS_PER_PAGE).contains(&count));
                        assert_eq!(first_pfn, base + l.loaned);
                        for p in first_pfn..first_pfn + count as u64 {
                            assert!(!std::mem::replace(&mut loaned[(p - base) as usize], true), "pfn {p} loaned twice");
                        }
                        l.inflated(count);
                    }
                    Step::Deflate { first_pfn, count } => {
                        assert!((1..=PFNS_PER_PAGE).contains(&count));
                        assert_eq!(first_pfn + count as u64, base + l.loaned);
                        for p in first_pfn..first_pfn + count as u64 {
                            assert!(std::mem::replace(&mut loaned[(p - base) as usize], false), "pfn {p} not loaned");
                        }
                        l.deflated(count);
                    }
                }
                batches += 1;
                assert!(batches < 100);
            }
            assert_eq!(l.loaned, (target as u64).min(loanable));
            let model = loaned.iter().take_while(|&&b| b).count() as u64;
            assert_eq!(model, l.loaned);
            assert_eq!(loaned.iter().filter(|&&b| b).count() as u64, l.loaned);
            assert_eq!(l.free_pages(), loanable - l.loaned);
            assert_eq!(l.idle_not_loaned(), idle - l.loaned.min(idle));
        }
    }

    #[test]
    fn idle_pages_of_a_batch() {
        let l = Loans::new(100, 50, 20);
        assert_eq!(l.idle_pages_of(100, 10), 0..10);
        assert_eq!(l.idle_pages_of(115, 10), 15..20);
        assert_eq!(l.idle_pages_of(120, 10), 20..20);
        assert!(l.idle_pages_of(140, 10).is_empty());
        assert_eq!(Loans::new(0, 10, 20).idle, 10);
    }

    #[test]
    fn stats_encode_as_packed_little_endian_entries() {
        let mut l = Loans::new(0, 100, 40);
        l.inflated(30);
        let s = l.stats(1 << 30);
        assert_eq!(s[4], (tag::MEMFREE, 70 * 4096));
        assert_eq!(s[5], (tag::MEMTOT, 1 << 30));
        assert_eq!(s[6], (tag::AVAIL, 70 * 4096));
        assert_eq!(s[7], (tag::CACHES, 10 * 4096));
        l.inflated(30);
        assert_eq!(l.stats(0)[7], (tag::CACHES, 0));
        let bytes: Vec<u8> = (0..STATS * STAT_BYTES).map(|i| stats_byte(&s, i)).collect();
        for (k, &(t, v)) in s.iter().enumerate() {
            let e = &bytes[k * STAT_BYTES..(k + 1) * STAT_BYTES];
            assert_eq!(u16::from_le_bytes([e[0], e[1]]), t);
            assert_eq!(u64::from_le_bytes(e[2..].try_into().unwrap()), v);
        }
    }

    #[test]
    fn report_chains_cover_the_run_once() {
        for (pages, max_run, descs) in [(0u64, 4, 8usize), (1, 4, 8), (33, 4, 8), (12288, 1024, 8), (5, 1, 3), (7, 100, 1)] {
            let mut out = [(0u64, 0u64); 8];
            let (mut next, mut chains) = (500u64, 0);
            loop {
                let n = report_chain(next, 500 + pages - next, max_run, descs, &mut out);
                if n == 0 {
                    break;
                }
                assert!(n <= descs);
                for &(first, len) in &out[..n] {
                    assert_eq!(first, next);
                    assert!(len >= 1 && len <= max_run);
                    next += len;
                }
                chains += 1;
            }
            assert_eq!(next, 500 + pages);
            assert_eq!(chains as u64, pages.div_ceil(max_run).div_ceil(descs as u64));
        }
    }
}
