//! Fault injection for `amsvm faults` (the fault campaign): switches that make the
//! host side of paging devices fail, and a gate that holds a partition's page-ins in
//! flight. Everything is off unless the campaign turns it on; when off, every check is
//! one relaxed atomic load.
//!
//! The injection points sit where the real failures would surface: the paging devices'
//! host file I/O (the in-process store's file, and the files behind the paging server's
//! virtio-blk devices), and the pool's fault path between claiming a page and reading it
//! from its paging device.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Longest a page-in is held at the gate, whatever the campaign does: a held page-in
/// must never keep a partition from being torn down.
const MAX_HOLD: Duration = Duration::from_secs(5);

/// Which host I/O on a paging device is being done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagingIo {
    Read,
    Write,
}

/// The process's fault switches and what they injected.
#[derive(Default)]
pub struct Faults {
    armed: AtomicBool,
    /// Fail every Nth paging-device I/O with EIO (0 = never).
    eio_every: AtomicU64,
    io_seen: AtomicU64,
    /// Fail every paging-device write with ENOSPC while set.
    no_space: AtomicBool,
    /// EIO and ENOSPC errors injected so far.
    pub eio_injected: AtomicU64,
    pub enospc_injected: AtomicU64,
    /// Page-ins of this partition wait at the gate while it is set.
    hold: Mutex<Option<String>>,
    hold_cv: Condvar,
    /// Page-ins waiting at the gate now, and ever.
    pub held_now: AtomicU64,
    pub held_total: AtomicU64,
}

static FAULTS: std::sync::OnceLock<Faults> = std::sync::OnceLock::new();

/// The process's switches.
pub fn get() -> &'static Faults {
    FAULTS.get_or_init(Faults::default)
}

impl Faults {
    fn rearm(&self) {
        let on = self.eio_every.load(Relaxed) > 0 || self.no_space.load(Relaxed) || self.hold.lock().unwrap_or_else(|e| e.into_inner()).is_some();
        self.armed.store(on, Relaxed);
    }

    /// Make every `n`th paging-device I/O fail with EIO (0 turns it off).
    pub fn set_eio_every(&self, n: u64) {
        self.eio_every.store(n, Relaxed);
        self.rearm();
    }

    /// Make paging-device writes fail with ENOSPC (a full host filesystem) or not.
    pub fn set_no_space(&self, on: bool) {
        self.no_space.store(on, Relaxed);
        self.rearm();
    }

    /// Hold the page-ins of `partition` at the gate (`None` releases them).
    pub fn hold_page_ins(&self, partition: Option<&str>) {
        *self.hold.lock().unwrap_or_else(|e| e.into_inner()) = partition.map(str::to_string);
        self.hold_cv.notify_all();
        self.rearm();
    }

    /// Called before a paging device's host I/O: the error to fail it with, if any.
    pub fn paging_io(&self, io: PagingIo) -> Option<std::io::Error> {
        if !self.armed.load(Relaxed) {
            return None;
        }
        if io == PagingIo::Write && self.no_space.load(Relaxed) {
            self.enospc_injected.fetch_add(1, Relaxed);
            return Some(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let every = self.eio_every.load(Relaxed);
        if every > 0 && (self.io_seen.fetch_add(1, Relaxed) + 1).is_multiple_of(every) {
            self.eio_injected.fetch_add(1, Relaxed);
            return Some(std::io::Error::from_raw_os_error(libc::EIO));
        }
        None
    }

    /// Called by the pool between claiming a page of `partition` and reading it from
    /// its paging device: waits while that partition's page-ins are held (at most
    /// [`MAX_HOLD`]).
    pub fn page_in_gate(&self, partition: &str) {
        if !self.armed.load(Relaxed) {
            return;
        }
        let g = self.hold.lock().unwrap_or_else(|e| e.into_inner());
        if g.as_deref() != Some(partition) {
            return;
        }
        self.held_now.fetch_add(1, Relaxed);
        self.held_total.fetch_add(1, Relaxed);
        let deadline = Instant::now() + MAX_HOLD;
        let mut g = g;
        while g.as_deref() == Some(partition) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            g = self.hold_cv.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        self.held_now.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_inject_what_they_say_and_nothing_when_off() {
        let f = Faults::default();
        assert!((0..100).all(|_| f.paging_io(PagingIo::Write).is_none()));
        f.set_eio_every(4);
        let errs: Vec<_> = (0..8).map(|_| f.paging_io(PagingIo::Read).map(|e| e.raw_os_error())).collect();
        assert_eq!(errs, [None, None, None, Some(Some(libc::EIO)), None, None, None, Some(Some(libc::EIO))]);
        f.set_eio_every(0);
        f.set_no_space(true);
        assert_eq!(f.paging_io(PagingIo::Write).and_then(|e| e.raw_os_error()), Some(libc::ENOSPC));
        assert!(f.paging_io(PagingIo::Read).is_none(), "reads never fail for lack of space");
        f.set_no_space(false);
        assert!(f.paging_io(PagingIo::Write).is_none());
        assert_eq!((f.eio_injected.load(Relaxed), f.enospc_injected.load(Relaxed)), (2, 1));
    }

    #[test]
    fn the_gate_holds_only_the_named_partition_until_released() {
        let f = std::sync::Arc::new(Faults::default());
        f.page_in_gate("p0"); // off: returns at once
        f.hold_page_ins(Some("p1"));
        f.page_in_gate("p0"); // another partition: not held
        let g = f.clone();
        let t = std::thread::spawn(move || g.page_in_gate("p1"));
        let t0 = Instant::now();
        while f.held_now.load(Relaxed) == 0 {
            assert!(t0.elapsed() < Duration::from_secs(5), "the page-in never reached the gate");
            std::thread::yield_now();
        }
        assert!(!t.is_finished());
        f.hold_page_ins(None);
        t.join().unwrap();
        assert_eq!((f.held_now.load(Relaxed), f.held_total.load(Relaxed)), (0, 1));
    }
}
