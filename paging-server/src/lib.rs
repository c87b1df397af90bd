//! The VIOS-role paging server's engine, shared by its unikernel image
//! (`guest-images/paging-server`) and by amsvm's side of the channel:
//!
//! - [`format`]: the paging-device format — a header naming the partition, a slot
//!   bitmap, the data slots — so that a paging server that restarts finds every page it
//!   stored, and a device that belongs to another partition is refused.
//! - [`vasi`]: the VASI channel between the hypervisor and the paging server: device id,
//!   queues, request and completion records, and their validation.
//! - [`bitmap`]: slot bitmaps.
//! - [`plan`]: how the paging server carries out a request (runs of slots, bitmap
//!   blocks to write back, virtio-blk request limits) and the RAM its image needs.
//!
//! Everything here is `no_std`, allocation-free and decodes untrusted bytes: every
//! decoder checks what it reads and says what is wrong.
#![no_std]

pub mod bitmap;
pub mod format;
pub mod plan;
pub mod vasi;

/// Bytes in a page, a slot and a transfer-window page.
pub const PAGE_SIZE: usize = 4096;
