//! The page state table of one partition, and the clock that picks its victims.

use crate::pager::Slot;

/// Where a guest page is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No data: never touched, discarded, or paged out while all-zero. A fault gets a
    /// zero-filled frame.
    Zero,
    /// In a pool frame.
    Resident,
    /// On the paging device (its `slot`).
    Out,
    /// Being paged in or out: faults on it wait.
    Transit,
}

/// One guest page.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub state: State,
    /// Used since the clock hand last passed (set when faulted in).
    pub referenced: bool,
    /// The paging-device slot holding this page's last paged-out contents, if any.
    pub slot: Option<Slot>,
    /// Keyed hash of what `slot` holds: a resident page whose hash still matches is
    /// unchanged since its last page-out and is not written again.
    pub hash: u128,
}

impl Default for Page {
    fn default() -> Self {
        Page { state: State::Zero, referenced: false, slot: None, hash: 0 }
    }
}

/// The table and its clock hand.
pub struct PageTable {
    pub pages: Vec<Page>,
    pub hand: usize,
    /// Pages in `Resident` state plus those in `Transit` (frames held).
    pub resident: u64,
    /// Of `resident`, the pages picked for page-out and not yet gone: the floor is
    /// checked against `resident - leaving`, so concurrent page-outs of one partition
    /// cannot together take it below its minimum.
    pub leaving: u64,
    /// Of `resident`, the pages claimed by a fault and not yet installed.
    pub incoming: u64,
}

impl PageTable {
    pub fn new(n: usize) -> Self {
        PageTable { pages: vec![Page::default(); n], hand: 0, resident: 0, leaving: 0, incoming: 0 }
    }

    /// Resident pages that could be paged out without going below `floor`.
    pub fn evictable_above(&self, floor: u64) -> u64 {
        self.resident.saturating_sub(self.leaving + self.incoming + floor)
    }

    /// Choose up to `want` resident pages to page out with the clock (second chance):
    /// referenced pages lose their bit and are passed over once. Never goes below
    /// `floor` resident pages. Chosen pages are marked `Transit` and counted in
    /// `leaving` until the caller settles them.
    pub fn pick_victims(&mut self, want: usize, floor: u64) -> Vec<usize> {
        let n = self.pages.len();
        let mut out = Vec::with_capacity(want);
        if n == 0 {
            return out;
        }
        let mut scanned = 0;
        while out.len() < want && scanned < 2 * n && self.evictable_above(floor) > out.len() as u64 {
            let i = self.hand;
            self.hand = (self.hand + 1) % n;
            scanned += 1;
            let p = &mut self.pages[i];
            if p.state != State::Resident {
                continue;
            }
            if p.referenced {
                p.referenced = false;
                continue;
            }
            p.state = State::Transit;
            out.push(i);
        }
        self.leaving += out.len() as u64;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_gives_a_second_chance_and_respects_the_floor() {
        let mut t = PageTable::new(8);
        for i in 0..6 {
            t.pages[i].state = State::Resident;
            t.pages[i].referenced = i % 2 == 0;
        }
        t.resident = 6;
        // Unreferenced 1, 3, 5 first; the referenced ones lose their bit.
        assert_eq!(t.pick_victims(3, 0), vec![1, 3, 5]);
        assert!(t.pages[..6].iter().all(|p| !p.referenced));
        for i in [1, 3, 5] {
            assert_eq!(t.pages[i].state, State::Transit);
        }
        // Three are leaving: with a floor of 1, two more may go.
        assert_eq!(t.leaving, 3);
        assert_eq!(t.pick_victims(5, 1), vec![0, 2]);
        assert_eq!(t.leaving, 5);
        // Nothing resident left to pick but page 4.
        assert_eq!(t.pick_victims(3, 0), vec![4]);
        assert!(t.pick_victims(3, 0).is_empty());
    }
}
