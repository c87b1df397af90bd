//! The Pager interface: where hypervisor paging puts partition pages. One pager per
//! partition (its paging device). Backends: the in-process file store ([`local`]); the
//! paging-server VM comes later behind the same trait.

pub mod local;
pub mod vm;

use std::path::PathBuf;

/// Size of a page as the pool pages it.
pub const PAGE_SIZE: usize = 4096;

/// A page-sized slot on a paging device.
pub type Slot = u32;

#[derive(Debug, thiserror::Error)]
pub enum PagerError {
    #[error("paging device {device}: no space left ({source})")]
    NoSpace { device: PathBuf, #[source] source: std::io::Error },
    #[error("paging device {device}: {op} failed: {source}")]
    Io { device: PathBuf, op: &'static str, #[source] source: std::io::Error },
    #[error("paging device {device}: slot {slot} is not in use")]
    BadSlot { device: PathBuf, slot: Slot },
    #[error("paging device {device}: full ({slots} slots)")]
    Full { device: PathBuf, slots: u64 },
}

impl PagerError {
    /// Build the error for an I/O failure, telling ENOSPC apart.
    pub fn io(device: &std::path::Path, op: &'static str, source: std::io::Error) -> Self {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            PagerError::NoSpace { device: device.to_path_buf(), source }
        } else {
            PagerError::Io { device: device.to_path_buf(), op, source }
        }
    }
}

/// A paging device. Implementations are used by several threads at once.
pub trait Pager: Send + Sync {
    /// Store `pages` (each `PAGE_SIZE` bytes). Where `reuse[i]` is `Some`, page `i`
    /// overwrites that slot; otherwise a fresh slot is taken — consecutive slots for
    /// pages written together, so that they can be read back together. Returns the slot
    /// of every page. On error no slot has changed owner (fresh slots are released).
    fn write(&self, pages: &[&[u8]], reuse: &[Option<Slot>]) -> Result<Vec<Slot>, PagerError>;

    /// Read slot `slot` into `buf` (`PAGE_SIZE` bytes).
    fn read(&self, slot: Slot, buf: &mut [u8]) -> Result<(), PagerError>;

    /// Read `n` consecutive slots from `first` into `buf` (`n * PAGE_SIZE` bytes); slots
    /// in the range that are not in use read as zeros.
    fn read_run(&self, first: Slot, n: usize, buf: &mut [u8]) -> Result<(), PagerError>;

    /// Release slots; their space is returned to the host.
    fn free(&self, slots: &[Slot]);

    /// Bytes of paged-out data the device holds now.
    fn bytes_in_use(&self) -> u64;

    /// The device's name for messages (its path).
    fn device(&self) -> PathBuf;
}
