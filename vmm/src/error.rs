//! The crate's error type. Module-level error enums convert into it; every message names
//! the thing that is wrong and, where possible, what to do about it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("KVM {op} failed: {source}")]
    Kvm { op: &'static str, #[source] source: kvm_ioctls::Error },
    #[error("cannot reserve {mib} MiB of guest memory: {source}")]
    GuestMemory { mib: u64, #[source] source: vm_memory::mmap::FromRangesError },
    #[error("guest memory access at {addr:#x} failed: {source}")]
    GuestAccess { addr: u64, #[source] source: vm_memory::GuestMemoryError },
    #[error("{path}: {source}")]
    Io { path: PathBuf, #[source] source: std::io::Error },
    #[error("{path}: {msg}")]
    Image { path: PathBuf, msg: String },
    #[error("device setup: {0}")]
    Device(String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { op, source }
    }
}
