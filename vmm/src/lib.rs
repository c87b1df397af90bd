//! amsvm: a rust-vmm style hypervisor that runs several partitions (KVM VMs) and, with
//! the pool, lets them share one memory budget. See DESIGN.md for the words and the
//! data paths; `docs/native-abi.md` for the contract with native images.

pub mod cli;
pub mod config;
pub mod control;
pub mod dashboard;
pub mod devices;
pub mod error;
pub mod faults;
#[doc(hidden)]
pub mod fuzz;
pub mod images;
pub mod kvm;
pub mod metrics;
pub mod pager;
pub mod paging_server;
pub mod partition;
pub mod pool;
pub mod prometheus;
pub mod seccomp;

pub use error::{Error, Result};

/// Guest memory as every part of the VMM sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;
