//! virtio-blk (virtio 1.2, 5.2) backed by a host file or block device.
//!
//! - `device.rs`: the [`VirtioBlock`] state machine (features, configuration space,
//!   activation, queue processing).
//! - `request.rs`: turning an untrusted descriptor chain into a validated request and
//!   executing it against the disk.
//! - `metrics.rs`: the device's counters.
//!
//! One request queue. Requests are executed synchronously on the event-loop thread, with
//! pread/pwrite going straight between the host file and guest memory (no bounce buffer).

mod device;
mod metrics;
mod request;

use std::path::PathBuf;

pub use device::VirtioBlock;
pub use metrics::BlockMetrics;

/// Sector size of the virtio-blk protocol: sector numbers and capacity count 512 bytes.
pub const SECTOR_SIZE: u64 = 512;
pub const SECTOR_SHIFT: u32 = 9;

/// Size of the one request queue. Large enough for SEG_MAX data segments plus header and
/// status descriptors in one chain, with room for several requests in flight.
pub const QUEUE_SIZE: u16 = 256;

/// Largest number of data segments in one request, advertised in `seg_max`. A driver
/// that honours it never builds a chain longer than `SEG_MAX + 2` descriptors (header,
/// data, status).
pub const SEG_MAX: u32 = 128;

/// Largest data segment, advertised in `size_max`. Together with [`SEG_MAX`] it bounds
/// what a conforming driver puts in one request.
pub const SIZE_MAX: u32 = 32 * 1024;

/// Largest data transfer of one request (IN, OUT, and the zero-filled range of
/// WRITE_ZEROES when the host cannot zero in place), in bytes.
///
/// Requests run synchronously on the event-loop thread, which also serves other
/// devices: an unbounded guest-chosen length would let one request stall the loop for as
/// long as the guest likes (a chain may describe up to 4 GiB). A conforming driver never
/// exceeds `SEG_MAX * SIZE_MAX` bytes because those are the limits we advertise, so
/// that product is the bound; longer requests are rejected with VIRTIO_BLK_S_IOERR.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;

/// Most descriptors walked in one chain. A conforming chain has at most `SEG_MAX` data
/// descriptors plus header and status; a few spare allow drivers that split the header.
/// Longer chains are rejected without walking further, which bounds the work a guest can
/// cause with long or indirect chains.
pub const MAX_CHAIN_DESCRIPTORS: usize = SEG_MAX as usize + 4;

/// Largest number of sectors in one DISCARD segment, advertised in `max_discard_sectors`
/// (1 GiB). Punching a hole costs metadata work only, so this can be large; it still
/// bounds the time one segment can take.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// Largest number of segments in one DISCARD request, advertised in `max_discard_seg`.
/// Bounds the size of the segment list the device reads (16 bytes each).
pub const MAX_DISCARD_SEG: u32 = 32;

/// Advertised `discard_sector_alignment`: 4 KiB, the host page and file-system block, the
/// granularity at which punching a hole actually frees space.
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;

/// Largest number of sectors in one WRITE_ZEROES segment, advertised in
/// `max_write_zeroes_sectors`. Zeroing may fall back to writing zeros when the host file
/// system cannot zero a range in place, so it shares the bound of a data request.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = (MAX_REQUEST_BYTES / SECTOR_SIZE) as u32;

/// Largest number of segments in one WRITE_ZEROES request, advertised in
/// `max_write_zeroes_seg` (drivers send one).
pub const MAX_WRITE_ZEROES_SEG: u32 = 1;

/// Length of the device ID string returned by VIRTIO_BLK_T_GET_ID.
pub const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;

/// Size of the configuration space we expose: every field up to and including
/// `write_zeroes_may_unmap` and its padding (virtio 1.2, 5.2.4).
pub const CONFIG_SPACE_SIZE: usize = 60;

/// Errors creating or activating a virtio-blk device.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot determine the size of disk image {path}: {source}")]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "disk image {path} is {size} bytes, not a multiple of 512: resize it to whole \
         sectors (for example `truncate -s %512 {path}`)"
    )]
    NotSectorMultiple { path: PathBuf, size: u64 },
    #[error("disk image {path} is empty: a disk needs at least one 512-byte sector")]
    Empty { path: PathBuf },
    #[error("disk serial {serial:?} is {len} bytes long; the virtio-blk ID holds at most 20")]
    SerialTooLong { serial: String, len: usize },
}
