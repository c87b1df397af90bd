//! The paging-server backend: a partition's pager that asks the paging-server VM, over
//! VASI, to write and read its paging device (`docs/vasi.md`). The slot map stays here,
//! as with the in-process store; the paging server keeps its own copy on the device.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use paging_server::vasi::{self, op, Request};

use super::local::SlotMap;
use super::{Pager, PagerError, Slot, PAGE_SIZE};
use crate::devices::virtio::vasi::{Channel, Outcome};

/// How long a request may wait for a paging server to be (re)started before the
/// partition is paused with an error.
const SERVER_DOWN_TIMEOUT: Duration = Duration::from_secs(60);

/// One partition's paging device, served by the paging-server VM.
pub struct VmPager {
    channel: Arc<Channel>,
    /// Index of the paging device in the paging server.
    device: u32,
    path: PathBuf,
    map: Mutex<SlotMap>,
}

impl VmPager {
    pub fn new(channel: Arc<Channel>, device: u32, path: PathBuf, slots: u64) -> VmPager {
        VmPager { channel, device, path, map: Mutex::new(SlotMap::new(slots)) }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, SlotMap> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn error(&self, op: &'static str, what: String) -> PagerError {
        PagerError::Io { device: self.path.clone(), op, source: std::io::Error::other(what) }
    }

    /// Run one request to completion, through restarts of the paging server: `before`
    /// fills the window (page-outs) each time the request is (re)submitted, `after`
    /// empties it once it completed. Both work on the window of one paging server (a
    /// generation): the one the request is submitted to. Should it be replaced between
    /// filling its window and taking the request, or between completing a page-in and
    /// the copy out of its window, the request is done again with the next one.
    fn run(
        &self,
        what: &'static str,
        op_code: u32,
        slots: &[Slot],
        before: impl Fn(u64, u32) -> bool,
        mut after: impl FnMut(u64, u32) -> bool,
    ) -> Result<(), PagerError> {
        let pages = if matches!(op_code, op::PAGE_OUT | op::PAGE_IN) { slots.len() as u32 } else { 0 };
        let window = if pages > 0 { self.channel.take_window(pages) } else { 0 };
        let result = loop {
            let Some(generation) = self.channel.wait_up(SERVER_DOWN_TIMEOUT) else {
                break Err(self.error(what, format!("the paging server has been down for {} s", SERVER_DOWN_TIMEOUT.as_secs())));
            };
            if pages > 0 && !before(generation, window) {
                continue; // it went down meanwhile
            }
            match self.channel.call(generation, Request::new(0, op_code, self.device, window, slots)) {
                Outcome::Lost => continue,
                Outcome::Done(c) => match c.status {
                    vasi::status::OK if pages == 0 || c.count == pages => {
                        if pages > 0 && !after(generation, window) {
                            continue; // replaced before the data was copied out
                        }
                        break Ok(());
                    }
                    vasi::status::OK => break Err(self.error(what, format!("the paging server did {} of {pages} pages", c.count))),
                    vasi::status::NO_SPACE => {
                        break Err(PagerError::NoSpace { device: self.path.clone(), source: std::io::Error::from_raw_os_error(libc::ENOSPC) })
                    }
                    vasi::status::IO_ERROR => break Err(self.error(what, "the paging server reports an I/O error on the device".into())),
                    _ => break Err(self.error(what, "the paging server refused the request as malformed".into())),
                },
            }
        };
        if pages > 0 {
            self.channel.give_window(window, pages);
        }
        result
    }
}

impl Pager for VmPager {
    fn write(&self, pages: &[&[u8]], reuse: &[Option<Slot>]) -> Result<Vec<Slot>, PagerError> {
        assert_eq!(pages.len(), reuse.len(), "one reuse entry per page");
        let (slots, fresh) = self.map().assign(reuse, &self.path)?;
        let mut result = Ok(());
        for (chunk_pages, chunk_slots) in pages.chunks(vasi::MAX_PAGES).zip(slots.chunks(vasi::MAX_PAGES)) {
            result = self.run("write", op::PAGE_OUT, chunk_slots, |g, w| self.channel.write_window(g, w, chunk_pages), |_, _| true);
            if result.is_err() {
                break;
            }
        }
        match result {
            Ok(()) => Ok(slots),
            Err(e) => {
                let mut m = self.map();
                for s in &fresh {
                    m.release(*s);
                }
                Err(e)
            }
        }
    }

    fn read(&self, slot: Slot, buf: &mut [u8]) -> Result<(), PagerError> {
        if !self.map().is_used(slot) {
            return Err(PagerError::BadSlot { device: self.path.clone(), slot });
        }
        self.run("read", op::PAGE_IN, &[slot], |_, _| true, |g, w| self.channel.read_window(g, w, &mut buf[..PAGE_SIZE]))
    }

    fn read_run(&self, first: Slot, n: usize, buf: &mut [u8]) -> Result<(), PagerError> {
        // Slots of the run that are not in use read as zeros.
        let used: Vec<(usize, Slot)> = {
            let m = self.map();
            (0..n).map(|k| (k, first + k as Slot)).filter(|&(_, s)| m.is_used(s)).collect()
        };
        buf[..n * PAGE_SIZE].fill(0);
        for chunk in used.chunks(vasi::MAX_PAGES) {
            let slots: Vec<Slot> = chunk.iter().map(|&(_, s)| s).collect();
            let mut tmp = vec![0u8; slots.len() * PAGE_SIZE];
            self.run("read", op::PAGE_IN, &slots, |_, _| true, |g, w| self.channel.read_window(g, w, &mut tmp))?;
            for (j, &(k, _)) in chunk.iter().enumerate() {
                buf[k * PAGE_SIZE..(k + 1) * PAGE_SIZE].copy_from_slice(&tmp[j * PAGE_SIZE..(j + 1) * PAGE_SIZE]);
            }
        }
        Ok(())
    }

    fn free(&self, slots: &[Slot]) {
        // Tell the paging server first, so its copy of the slot map stays right across
        // its restarts; only then may the slots be handed out again (a page-out to a
        // slot must never be overtaken by the discard of its previous contents). Only
        // space is at stake: a failure is logged, not fatal.
        let used: Vec<Slot> = {
            let m = self.map();
            slots.iter().copied().filter(|s| m.is_used(*s)).collect()
        };
        for chunk in used.chunks(vasi::MAX_PAGES) {
            if let Err(e) = self.run("discard", op::DISCARD, chunk, |_, _| true, |_, _| true) {
                tracing::debug!("{}: {e}", self.path.display());
            }
        }
        let mut m = self.map();
        for s in used {
            m.release(s);
        }
    }

    fn bytes_in_use(&self) -> u64 {
        self.map().in_use * PAGE_SIZE as u64
    }

    fn device(&self) -> PathBuf {
        self.path.clone()
    }
}
