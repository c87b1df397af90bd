//! The in-process paging store: one thin-provisioned file per partition. A slot map
//! hands out page-sized slots; the file grows only as pages are written, freed slots are
//! reused (lowest first) and their space punched out of the file.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{Pager, PagerError, Slot, PAGE_SIZE};
use crate::faults::PagingIo;

/// Most slots one store hands out: 2^32 - 1 pages (16 TiB), the range of [`Slot`].
const MAX_SLOTS: u64 = u32::MAX as u64;

/// Which slots of a paging device are in use (shared with the paging-server backend).
pub(super) struct SlotMap {
    /// Slots below `end` that are free.
    free: BTreeSet<Slot>,
    /// One past the highest slot ever used: the file's logical end, in slots.
    pub(super) end: u64,
    pub(super) in_use: u64,
    /// Slots the device has.
    max: u64,
}

impl SlotMap {
    pub(super) fn new(max: u64) -> SlotMap {
        SlotMap { free: BTreeSet::new(), end: 0, in_use: 0, max: max.min(MAX_SLOTS) }
    }

    /// Take `n` slots, consecutive when possible: a run from the free set, else from the
    /// end of the file.
    pub(super) fn take(&mut self, n: usize) -> Option<Vec<Slot>> {
        if n == 0 {
            return Some(Vec::new());
        }
        // A run of n free slots?
        let mut run_start = None;
        let mut prev: Option<Slot> = None;
        let mut len = 0;
        for &s in &self.free {
            if prev.is_some_and(|p| p + 1 == s) {
                len += 1;
            } else {
                run_start = Some(s);
                len = 1;
            }
            prev = Some(s);
            if len == n {
                break;
            }
        }
        let slots: Vec<Slot> = if len == n {
            let first = run_start.unwrap();
            (first..first + n as Slot).collect()
        } else if self.end + n as u64 <= self.max {
            let first = self.end as Slot;
            self.end += n as u64;
            return self.commit((first..first + n as Slot).collect());
        } else if self.free.len() >= n {
            self.free.iter().take(n).copied().collect()
        } else {
            return None;
        };
        for s in &slots {
            self.free.remove(s);
        }
        self.commit(slots)
    }

    fn commit(&mut self, slots: Vec<Slot>) -> Option<Vec<Slot>> {
        self.in_use += slots.len() as u64;
        Some(slots)
    }

    /// The slot of every page of a write: `reuse[i]` where it is `Some` (it must be in
    /// use), else a fresh one (taken here). Returns all slots and the fresh ones (to
    /// release should the write fail).
    pub(super) fn assign(&mut self, reuse: &[Option<Slot>], device: &Path) -> Result<(Vec<Slot>, Vec<Slot>), PagerError> {
        if let Some(&slot) = reuse.iter().flatten().find(|&&r| !self.is_used(r)) {
            return Err(PagerError::BadSlot { device: device.to_path_buf(), slot });
        }
        let fresh_needed = reuse.iter().filter(|r| r.is_none()).count();
        let fresh = self.take(fresh_needed).ok_or(PagerError::Full { device: device.to_path_buf(), slots: self.max })?;
        let mut fresh_iter = fresh.iter();
        let slots = reuse.iter().map(|r| r.unwrap_or_else(|| *fresh_iter.next().expect("one fresh slot per None"))).collect();
        Ok((slots, fresh))
    }

    pub(super) fn release(&mut self, slot: Slot) -> bool {
        if (slot as u64) < self.end && self.free.insert(slot) {
            self.in_use -= 1;
            true
        } else {
            false
        }
    }

    pub(super) fn is_used(&self, slot: Slot) -> bool {
        (slot as u64) < self.end && !self.free.contains(&slot)
    }
}

/// A file-backed paging device.
pub struct LocalStore {
    path: PathBuf,
    file: File,
    map: Mutex<SlotMap>,
}

impl LocalStore {
    /// Create (or truncate) the store file at `path`.
    pub fn create(path: &Path) -> Result<LocalStore, PagerError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| PagerError::io(path, "create directory", e))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| PagerError::io(path, "create", e))?;
        Ok(LocalStore {
            path: path.to_path_buf(),
            file,
            map: Mutex::new(SlotMap::new(MAX_SLOTS)),
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, SlotMap> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn punch(&self, first: Slot, n: u64) {
        let off = first as i64 * PAGE_SIZE as i64;
        let len = n as i64 * PAGE_SIZE as i64;
        // SAFETY: fallocate on a file descriptor we own; no memory is passed.
        let rc = unsafe {
            libc::fallocate(self.file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len)
        };
        if rc != 0 {
            // Only space is at stake, not data: the slot is free either way.
            tracing::debug!("{}: punching slots {first}+{n} failed: {}", self.path.display(), std::io::Error::last_os_error());
        }
    }
}

impl Pager for LocalStore {
    fn write(&self, pages: &[&[u8]], reuse: &[Option<Slot>]) -> Result<Vec<Slot>, PagerError> {
        assert_eq!(pages.len(), reuse.len(), "one reuse entry per page");
        let (slots, fresh) = self.map().assign(reuse, &self.path)?;
        // Write runs of consecutive slots with one call each.
        let mut i = 0;
        let mut result = Ok(());
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len() && slots[j] == slots[j - 1].wrapping_add(1) {
                j += 1;
            }
            let off = slots[i] as u64 * PAGE_SIZE as u64;
            let r = if let Some(e) = crate::faults::get().paging_io(PagingIo::Write) {
                Err(e)
            } else if j - i == 1 {
                self.file.write_all_at(&pages[i][..PAGE_SIZE], off)
            } else {
                let mut buf = Vec::with_capacity((j - i) * PAGE_SIZE);
                pages[i..j].iter().for_each(|p| buf.extend_from_slice(&p[..PAGE_SIZE]));
                self.file.write_all_at(&buf, off)
            };
            if let Err(e) = r {
                result = Err(PagerError::io(&self.path, "write", e));
                break;
            }
            i = j;
        }
        if let Err(e) = result {
            // Give the fresh slots back: nobody owns them. Reused slots keep their
            // owner; the caller still has the page and decides what to do.
            let mut m = self.map();
            for s in &fresh {
                m.release(*s);
            }
            return Err(e);
        }
        Ok(slots)
    }

    fn read(&self, slot: Slot, buf: &mut [u8]) -> Result<(), PagerError> {
        if !self.map().is_used(slot) {
            return Err(PagerError::BadSlot { device: self.path.clone(), slot });
        }
        if let Some(e) = crate::faults::get().paging_io(PagingIo::Read) {
            return Err(PagerError::io(&self.path, "read", e));
        }
        self.file
            .read_exact_at(&mut buf[..PAGE_SIZE], slot as u64 * PAGE_SIZE as u64)
            .map_err(|e| PagerError::io(&self.path, "read", e))
    }

    fn read_run(&self, first: Slot, n: usize, buf: &mut [u8]) -> Result<(), PagerError> {
        let len = n * PAGE_SIZE;
        let off = first as u64 * PAGE_SIZE as u64;
        let file_len = self.map().end * PAGE_SIZE as u64;
        let avail = file_len.saturating_sub(off).min(len as u64) as usize;
        buf[avail..len].fill(0);
        if let Some(e) = crate::faults::get().paging_io(PagingIo::Read) {
            return Err(PagerError::io(&self.path, "read", e));
        }
        self.file.read_exact_at(&mut buf[..avail], off).map_err(|e| PagerError::io(&self.path, "read", e))
    }

    fn free(&self, slots: &[Slot]) {
        let mut freed: Vec<Slot> = {
            let mut m = self.map();
            slots.iter().copied().filter(|s| m.release(*s)).collect()
        };
        freed.sort_unstable();
        let mut i = 0;
        while i < freed.len() {
            let mut j = i + 1;
            while j < freed.len() && freed[j] == freed[j - 1] + 1 {
                j += 1;
            }
            self.punch(freed[i], (j - i) as u64);
            i = j;
        }
    }

    fn bytes_in_use(&self) -> u64 {
        self.map().in_use * PAGE_SIZE as u64
    }

    fn device(&self) -> PathBuf {
        self.path.clone()
    }
}

impl Drop for LocalStore {
    fn drop(&mut self) {
        // The store belongs to one run of one partition: nothing in it outlives it.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE_SIZE]
    }

    #[test]
    fn write_read_free_reuse_and_thin_provisioning() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.pages");
        let s = LocalStore::create(&path).unwrap();
        let (a, b, c) = (page(1), page(2), page(3));
        let slots = s.write(&[&a, &b, &c], &[None, None, None]).unwrap();
        assert_eq!(slots, vec![0, 1, 2], "pages written together get consecutive slots");
        assert_eq!(s.bytes_in_use(), 3 * PAGE_SIZE as u64);
        let mut buf = page(0);
        s.read(1, &mut buf).unwrap();
        assert_eq!(buf, b);
        let mut run = vec![0u8; 3 * PAGE_SIZE];
        s.read_run(0, 3, &mut run).unwrap();
        assert_eq!(&run[..PAGE_SIZE], &a[..]);
        assert_eq!(&run[2 * PAGE_SIZE..], &c[..]);
        // Overwrite in place.
        let d = page(4);
        assert_eq!(s.write(&[&d], &[Some(1)]).unwrap(), vec![1]);
        s.read(1, &mut buf).unwrap();
        assert_eq!(buf, d);
        // Free and reuse, lowest first; freed space is punched out.
        let blocks_before = std::fs::metadata(&path).unwrap().blocks();
        s.free(&[0, 1]);
        assert_eq!(s.bytes_in_use(), PAGE_SIZE as u64);
        assert!(std::fs::metadata(&path).unwrap().blocks() < blocks_before, "freed slots punched");
        assert!(matches!(s.read(0, &mut buf), Err(PagerError::BadSlot { slot: 0, .. })));
        assert_eq!(s.write(&[&a, &b], &[None, None]).unwrap(), vec![0, 1]);
        // A run of 2 that does not fit in the holes comes from the end.
        s.free(&[0]);
        assert_eq!(s.write(&[&a, &b], &[None, None]).unwrap(), vec![3, 4]);
        assert_eq!(s.write(&[&a], &[None]).unwrap(), vec![0]);
        // Reusing a free slot is refused.
        s.free(&[4]);
        assert!(matches!(s.write(&[&a], &[Some(4)]), Err(PagerError::BadSlot { slot: 4, .. })));
        // The file is sparse: its size covers the slots, its blocks only what is written.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 5 * PAGE_SIZE as u64);
        drop(s);
        assert!(!path.exists(), "the store file goes with the store");
    }

    #[test]
    fn enospc_is_reported_and_releases_fresh_slots() {
        // A 64 KiB tmpfs fills after 16 pages. Needs root (CI runs as root).
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("small");
        std::fs::create_dir(&mnt).unwrap();
        let c = std::ffi::CString::new(mnt.to_str().unwrap()).unwrap();
        // SAFETY: mount(2) with valid C strings; no memory is retained.
        let rc = unsafe {
            libc::mount(c"tmpfs".as_ptr(), c.as_ptr(), c"tmpfs".as_ptr(), 0, c"size=64k".as_ptr().cast())
        };
        assert_eq!(rc, 0, "mounting a small tmpfs needs root: {}", std::io::Error::last_os_error());
        let s = LocalStore::create(&mnt.join("p.pages")).unwrap();
        let p = page(7);
        let mut n = 0;
        let err = loop {
            match s.write(&[&p], &[None]) {
                Ok(_) => n += 1,
                Err(e) => break e,
            }
            assert!(n < 1000, "tmpfs never filled");
        };
        assert!(matches!(err, PagerError::NoSpace { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("p.pages") && msg.contains("no space"), "{msg}");
        assert_eq!(s.bytes_in_use(), n * PAGE_SIZE as u64, "the failed write left no slot taken");
        // Freeing makes room again.
        s.free(&[0]);
        s.write(&[&p], &[None]).unwrap();
        drop(s);
        // SAFETY: umount(2) of the mount made above.
        unsafe { libc::umount(c.as_ptr()) };
    }
}
