//! End-to-end tests: they run the `amsvm` binary on real KVM VMs. /dev/kvm is required;
//! without it these tests fail (they never skip silently).

mod bad_input;
mod balloon;
mod chaos;
mod common;
mod demo;
mod disk;
mod faults;
mod lifecycle;
mod paging_server;
mod partitions;
mod peers;
mod pool;
mod pool_faults;
mod seccomp;
mod stat;
