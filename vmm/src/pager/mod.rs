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

/// Attempts of one paging-device operation before its I/O error stands. A transient
/// error (the next attempt does not see it again) costs a retry, not a pause of the
/// partition.
pub const ATTEMPTS: u32 = 4;
/// Wait before the first retry; doubled before each further one.
const FIRST_BACKOFF: std::time::Duration = std::time::Duration::from_millis(1);

/// A pager whose I/O errors are retried ([`ATTEMPTS`] in all). Other errors (no space,
/// a full device, a slot not in use) stand at once: trying again would not change them.
pub struct Retrying {
    inner: std::sync::Arc<dyn Pager>,
    /// Counts every retry.
    retries: std::sync::Arc<crate::metrics::PartitionMetrics>,
}

impl Retrying {
    pub fn new(inner: std::sync::Arc<dyn Pager>, metrics: std::sync::Arc<crate::metrics::PartitionMetrics>) -> Self {
        Retrying { inner, retries: metrics }
    }

    fn attempt<T>(&self, mut op: impl FnMut() -> Result<T, PagerError>) -> Result<T, PagerError> {
        let mut backoff = FIRST_BACKOFF;
        for _ in 1..ATTEMPTS {
            match op() {
                Err(PagerError::Io { device, op, source }) => {
                    self.retries.pager_retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!("paging device {}: {op} failed ({source}); retrying in {backoff:?}", device.display());
                    std::thread::sleep(backoff);
                    backoff *= 2;
                }
                r => return r,
            }
        }
        op()
    }
}

impl Pager for Retrying {
    fn write(&self, pages: &[&[u8]], reuse: &[Option<Slot>]) -> Result<Vec<Slot>, PagerError> {
        // A failed write gave its fresh slots back and left the reused ones to their
        // owner: the same call can be made again.
        self.attempt(|| self.inner.write(pages, reuse))
    }

    fn read(&self, slot: Slot, buf: &mut [u8]) -> Result<(), PagerError> {
        self.attempt(|| self.inner.read(slot, buf))
    }

    fn read_run(&self, first: Slot, n: usize, buf: &mut [u8]) -> Result<(), PagerError> {
        self.attempt(|| self.inner.read_run(first, n, buf))
    }

    fn free(&self, slots: &[Slot]) {
        self.inner.free(slots)
    }

    fn bytes_in_use(&self) -> u64 {
        self.inner.bytes_in_use()
    }

    fn device(&self) -> PathBuf {
        self.inner.device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
    use std::sync::Arc;

    /// Fails its first `fail` reads with `err`, then reads zeros.
    struct Flaky {
        fail: AtomicU32,
        err: fn() -> PagerError,
    }

    impl Pager for Flaky {
        fn write(&self, pages: &[&[u8]], _: &[Option<Slot>]) -> Result<Vec<Slot>, PagerError> {
            Ok((0..pages.len() as Slot).collect())
        }
        fn read(&self, _: Slot, buf: &mut [u8]) -> Result<(), PagerError> {
            if self.fail.load(Relaxed) > 0 {
                self.fail.fetch_sub(1, Relaxed);
                return Err((self.err)());
            }
            buf.fill(0);
            Ok(())
        }
        fn read_run(&self, first: Slot, _: usize, buf: &mut [u8]) -> Result<(), PagerError> {
            self.read(first, buf)
        }
        fn free(&self, _: &[Slot]) {}
        fn bytes_in_use(&self) -> u64 {
            0
        }
        fn device(&self) -> PathBuf {
            PathBuf::from("flaky")
        }
    }

    fn eio() -> PagerError {
        PagerError::io(std::path::Path::new("flaky"), "read", std::io::Error::from_raw_os_error(libc::EIO))
    }

    fn enospc() -> PagerError {
        PagerError::io(std::path::Path::new("flaky"), "write", std::io::Error::from_raw_os_error(libc::ENOSPC))
    }

    #[test]
    fn io_errors_are_retried_until_the_attempts_run_out_and_others_stand_at_once() {
        let m = Arc::new(crate::metrics::PartitionMetrics::default());
        let mut buf = vec![1u8; PAGE_SIZE];
        // Fewer failures than attempts: the read succeeds, each failure was a retry.
        let p = Retrying::new(Arc::new(Flaky { fail: AtomicU32::new(ATTEMPTS - 1), err: eio }), m.clone());
        p.read(0, &mut buf).unwrap();
        assert_eq!(m.pager_retries.load(Relaxed), (ATTEMPTS - 1) as u64);
        // As many failures as attempts: the last error stands.
        let p = Retrying::new(Arc::new(Flaky { fail: AtomicU32::new(ATTEMPTS), err: eio }), m.clone());
        assert!(matches!(p.read(0, &mut buf), Err(PagerError::Io { .. })));
        assert_eq!(m.pager_retries.load(Relaxed), 2 * (ATTEMPTS - 1) as u64);
        // No space is not retried.
        let p = Retrying::new(Arc::new(Flaky { fail: AtomicU32::new(1), err: enospc }), m.clone());
        assert!(matches!(p.read(0, &mut buf), Err(PagerError::NoSpace { .. })));
        assert_eq!(m.pager_retries.load(Relaxed), 2 * (ATTEMPTS - 1) as u64);
    }
}
