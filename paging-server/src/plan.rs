//! How the paging server carries out a request, worked out without touching memory or
//! devices (so it is tested on the host):
//!
//! - [`runs`]: a request's pages, cut into runs of consecutive slots (and so consecutive
//!   device bytes) whose window pages are consecutive too: one virtio-blk transfer each.
//! - [`mark`]: set or clear a request's slots in a bitmap and tell which bitmap blocks
//!   changed (the ones to write back to the device).
//! - [`Limits`]: how a transfer is cut into virtio-blk requests and data segments.
//! - [`work_pages`]: the RAM the paging-server image needs for itself, besides its image
//!   and its transfer window.

use crate::format::Layout;
use crate::vasi::MAX_PAGES;
use crate::{bitmap, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// Request positions `index..index + pages` (window pages `window_page + index..`) to or
/// from slots `slot..slot + pages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub index: u32,
    pub slot: u32,
    pub pages: u32,
}

/// The runs of `slots` (a request's slot list, position `k` going with window page
/// `window_page + k`): maximal stretches of positions whose slots go up by one.
pub fn runs(slots: &[u32]) -> Runs<'_> {
    Runs { slots, at: 0 }
}

/// Iterator returned by [`runs`].
pub struct Runs<'a> {
    slots: &'a [u32],
    at: usize,
}

impl Iterator for Runs<'_> {
    type Item = Run;

    fn next(&mut self) -> Option<Run> {
        let first = *self.slots.get(self.at)?;
        let start = self.at;
        let mut end = start + 1;
        while let Some(&s) = self.slots.get(end) {
            if first.checked_add((end - start) as u32) != Some(s) {
                break;
            }
            end += 1;
        }
        self.at = end;
        Some(Run { index: start as u32, slot: first, pages: (end - start) as u32 })
    }
}

/// A sorted set of distinct bitmap block numbers (at most one per page of a request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocks {
    list: [u64; MAX_PAGES],
    len: usize,
}

impl Default for Blocks {
    fn default() -> Self {
        Self::new()
    }
}

impl Blocks {
    pub const fn new() -> Blocks {
        Blocks { list: [0; MAX_PAGES], len: 0 }
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn as_slice(&self) -> &[u64] {
        &self.list[..self.len]
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `b` (kept sorted, no duplicates); false if the set is full.
    pub fn insert(&mut self, b: u64) -> bool {
        let at = match self.as_slice().binary_search(&b) {
            Ok(_) => return true,
            Err(at) => at,
        };
        if self.len == MAX_PAGES {
            return false;
        }
        let mut i = self.len;
        while i > at {
            self.list[i] = self.list[i - 1];
            i -= 1;
        }
        self.list[at] = b;
        self.len += 1;
        true
    }

    /// Stretches of consecutive blocks, as (first block, blocks): one device write each.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let s = self.as_slice();
        let mut at = 0;
        core::iter::from_fn(move || {
            let first = *s.get(at)?;
            let mut n = 1;
            while s.get(at + n as usize) == Some(&(first + n)) {
                n += 1;
            }
            at += n as usize;
            Some((first, n))
        })
    }
}

/// Marks `slots` used (or free) in `map` and puts into `changed` (cleared first) the
/// `block_bytes`-byte blocks of the bitmap whose contents changed. Slots beyond the map
/// are skipped (a checked request names none).
pub fn mark(map: &mut [u8], slots: &[u32], used: bool, block_bytes: u64, changed: &mut Blocks) {
    changed.clear();
    for &s in slots {
        let s = s as u64;
        if bitmap::test(map, s) == used {
            continue;
        }
        if bitmap::set(map, s, used) {
            // At most MAX_PAGES distinct blocks for a request's at most MAX_PAGES slots.
            let room = changed.insert(bitmap::block_of(s, block_bytes));
            debug_assert!(room, "more than MAX_PAGES slots");
        }
    }
}

/// The limits a virtio-blk device sets on one request, and what the driver makes of
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes in one data segment (descriptor): a positive multiple of 512.
    pub segment_bytes: u64,
    /// Bytes of data in one request: a positive multiple of `segment_bytes`.
    pub request_bytes: u64,
}

/// Most data in one request, whatever the device allows: keeps one request (which the
/// device carries out while the vCPU waits) short.
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;

impl Limits {
    /// From the device's `size_max` and `seg_max` (None: not offered, no limit) and the
    /// data descriptors one chain may use (the queue size less header and status).
    pub fn new(size_max: Option<u32>, seg_max: Option<u32>, data_descriptors: u32) -> Limits {
        let seg = match size_max {
            // Whole sectors; a device that cannot take one sector per segment gets one
            // anyway (it would be useless otherwise).
            Some(m) => (m as u64 & !511).max(512),
            None => MAX_REQUEST_BYTES,
        };
        let seg = seg.min(MAX_REQUEST_BYTES);
        let segs = seg_max.unwrap_or(u32::MAX).min(data_descriptors).max(1) as u64;
        let per_request = (segs * seg).min(MAX_REQUEST_BYTES);
        Limits { segment_bytes: seg, request_bytes: (per_request / seg).max(1) * seg }
    }

    /// Data segments of a request of `bytes`.
    pub fn segments(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.segment_bytes)
    }
}

/// Pages of RAM the paging-server image uses for itself, besides the pages of the
/// image and of the transfer window: the VASI queues and buffers, a request page and a
/// scratch block for the paging devices, and per paging device a queue page and its
/// slot bitmap.
pub const FIXED_WORK_PAGES: u64 = 5;

/// Pages the image uses for a paging device of `slots` slots: its queue and its bitmap.
pub fn device_work_pages(slots: u64) -> u64 {
    1 + Layout::for_slots(slots).bitmap_bytes / PAGE
}

/// Pages the image uses for itself with paging devices of `slots` slots each (see
/// [`FIXED_WORK_PAGES`]). Its RAM must hold, from `free_start` (the page-aligned end of
/// the image), this many pages, then the transfer window.
pub fn work_pages(slots: impl IntoIterator<Item = u64>) -> u64 {
    FIXED_WORK_PAGES + slots.into_iter().map(device_work_pages).sum::<u64>()
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn all(slots: &[u32]) -> Vec<(u32, u32, u32)> {
        runs(slots).map(|r| (r.index, r.slot, r.pages)).collect()
    }

    #[test]
    fn runs_follow_consecutive_slots() {
        assert_eq!(all(&[]), []);
        assert_eq!(all(&[7]), [(0, 7, 1)]);
        assert_eq!(all(&[7, 8, 9]), [(0, 7, 3)]);
        assert_eq!(all(&[7, 8, 10, 11, 3]), [(0, 7, 2), (2, 10, 2), (4, 3, 1)]);
        // Descending slots are separate runs: window pages ascend, device bytes do not.
        assert_eq!(all(&[9, 8, 7]), [(0, 9, 1), (1, 8, 1), (2, 7, 1)]);
        assert_eq!(all(&[u32::MAX - 1, u32::MAX, 0]), [(0, u32::MAX - 1, 2), (2, 0, 1)]);
        let full: Vec<u32> = (100..132).collect();
        assert_eq!(all(&full), [(0, 100, 32)]);
        // Every position is covered once, in order.
        let mixed = [5, 6, 1, 2, 3, 9, 20, 21];
        let mut next = 0;
        for r in runs(&mixed) {
            assert_eq!(r.index, next);
            for j in 0..r.pages {
                assert_eq!(mixed[(r.index + j) as usize], r.slot + j);
            }
            next += r.pages;
        }
        assert_eq!(next as usize, mixed.len());
    }

    #[test]
    fn mark_reports_the_blocks_that_changed() {
        let block = 4096u64;
        let bits = block * 8;
        let mut map = std::vec![0u8; 3 * block as usize];
        let mut ch = Blocks::new();
        mark(&mut map, &[1, bits as u32 + 5, 2], true, block, &mut ch);
        assert_eq!(ch.as_slice(), &[0, 1]);
        assert!(bitmap::test(&map, 1) && bitmap::test(&map, 2) && bitmap::test(&map, bits + 5));
        assert_eq!(bitmap::count(&map, 3 * bits), 3);
        // Already in that state: nothing changes, nothing to write.
        mark(&mut map, &[1, 2], true, block, &mut ch);
        assert!(ch.is_empty());
        mark(&mut map, &[9, 10], false, block, &mut ch);
        assert!(ch.is_empty());
        // Freeing one used and one free slot changes only the used one's block.
        mark(&mut map, &[2 * bits as u32, bits as u32 + 5], false, block, &mut ch);
        assert_eq!(ch.as_slice(), &[1]);
        assert!(!bitmap::test(&map, bits + 5));
        // Blocks come sorted and distinct; ranges join neighbours.
        let slots: Vec<u32> = [2u64, 0, 2, 1].iter().map(|b| (b * bits + 3) as u32).collect();
        mark(&mut map, &slots, true, block, &mut ch);
        assert_eq!(ch.as_slice(), &[0, 1, 2]);
        assert_eq!(ch.ranges().collect::<Vec<_>>(), [(0, 3)]);
        // Slots beyond the map are skipped.
        mark(&mut map, &[u32::MAX], true, block, &mut ch);
        assert!(ch.is_empty());
    }

    #[test]
    fn blocks_sort_dedup_and_join() {
        let mut b = Blocks::new();
        for x in [9u64, 3, 4, 9, 0, 5, 7] {
            assert!(b.insert(x));
        }
        assert_eq!(b.as_slice(), &[0, 3, 4, 5, 7, 9]);
        assert_eq!(b.ranges().collect::<Vec<_>>(), [(0, 1), (3, 3), (7, 1), (9, 1)]);
        let mut full = Blocks::new();
        for x in 0..MAX_PAGES as u64 {
            assert!(full.insert(x * 2));
        }
        assert!(!full.insert(1), "full");
        assert!(full.insert(4), "present already");
    }

    #[test]
    fn limits() {
        // amsvm's virtio-blk: size_max 32 KiB, seg_max 128, a 64-entry queue.
        let l = Limits::new(Some(32 * 1024), Some(128), 62);
        assert_eq!(l, Limits { segment_bytes: 32 * 1024, request_bytes: MAX_REQUEST_BYTES });
        assert_eq!(l.segments(32 * 4096), 4);
        assert_eq!(l.segments(4096), 1);
        let l = Limits::new(None, None, 62);
        assert_eq!(l, Limits { segment_bytes: MAX_REQUEST_BYTES, request_bytes: MAX_REQUEST_BYTES });
        let l = Limits::new(Some(4096 + 100), Some(2), 62);
        assert_eq!(l, Limits { segment_bytes: 4096, request_bytes: 8192 });
        let l = Limits::new(Some(1), Some(0), 0);
        assert_eq!(l, Limits { segment_bytes: 512, request_bytes: 512 });
        let l = Limits::new(Some(u32::MAX), Some(u32::MAX), 6);
        assert_eq!(l, Limits { segment_bytes: MAX_REQUEST_BYTES, request_bytes: MAX_REQUEST_BYTES });
    }

    #[test]
    fn work_pages_count_queues_and_bitmaps() {
        assert_eq!(work_pages([]), FIXED_WORK_PAGES);
        // 32768 slots fit one bitmap page, 32769 need two.
        assert_eq!(work_pages([32768, 32769]), FIXED_WORK_PAGES + 2 + 3);
        assert_eq!(device_work_pages(1), 2);
    }
}
