//! Counters of one virtio-blk device. Plain relaxed atomics, read by whoever holds the
//! `Arc` (CLI, control socket, Prometheus endpoint).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Per-device virtio-blk counters.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Successful activations (DRIVER_OK) and activations the device refused.
    pub activations: AtomicU64,
    pub activate_fails: AtomicU64,
    /// Queue notifications processed.
    pub queue_events: AtomicU64,
    /// Requests completed with VIRTIO_BLK_S_OK, by type.
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub get_ids: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    /// Bytes moved by successful reads and writes.
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Bytes discarded (holes punched) and zeroed by successful DISCARD / WRITE_ZEROES.
    pub discard_bytes: AtomicU64,
    pub zeroed_bytes: AtomicU64,
    /// DISCARDs answered OK although the host file system cannot punch holes (discard
    /// is a hint; nothing was freed).
    pub discard_unsupported_by_host: AtomicU64,
    /// Request types answered VIRTIO_BLK_S_UNSUPP.
    pub unsupported: AtomicU64,
    /// Host I/O failures (pread/pwrite/fsync/fallocate errors): status IOERR.
    pub io_errors: AtomicU64,
    /// Writes, discards and write-zeroes refused because the device is read-only.
    pub read_only_rejections: AtomicU64,

    /// Chains rejected as malformed, in total; each also counts under one reason below.
    pub rejected_chains: AtomicU64,
    /// ... a descriptor outside guest memory (or whose end overflows).
    pub rejected_out_of_memory: AtomicU64,
    /// ... a device-readable descriptor after a device-writable one, or data in the
    /// wrong direction for the request type.
    pub rejected_wrong_direction: AtomicU64,
    /// ... too short: no full 16-byte header, data shorter than the request needs.
    pub rejected_too_short: AtomicU64,
    /// ... more than MAX_CHAIN_DESCRIPTORS descriptors, more data than
    /// MAX_REQUEST_BYTES, or more DISCARD / WRITE_ZEROES segments than advertised.
    pub rejected_too_large: AtomicU64,
    /// ... a data length that is not a multiple of 512 (or of 16 for segment lists).
    pub rejected_bad_length: AtomicU64,
    /// ... a sector range beyond the capacity (or overflowing).
    pub rejected_out_of_range: AtomicU64,
    /// ... a chain that ends early: its last descriptor says "next" but the walk stopped
    /// (next index outside the table, a bad indirect table, over 4 GiB in total), or it
    /// yields no descriptor at all. Where its status byte would be is unknown.
    pub rejected_broken_chain: AtomicU64,
    /// Chains without a writable status byte: returned with used length 0, no status.
    pub no_status_chains: AtomicU64,
    /// Available-ring entries naming a descriptor beyond the queue size: skipped.
    pub invalid_heads: AtomicU64,
}

impl BlockMetrics {
    pub(super) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub(super) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Every counter with its name, for text, JSON and Prometheus output.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let all: [(&'static str, &AtomicU64); 27] = [
            ("activations", &self.activations),
            ("activate_fails", &self.activate_fails),
            ("queue_events", &self.queue_events),
            ("reads", &self.reads),
            ("writes", &self.writes),
            ("flushes", &self.flushes),
            ("get_ids", &self.get_ids),
            ("discards", &self.discards),
            ("write_zeroes", &self.write_zeroes),
            ("read_bytes", &self.read_bytes),
            ("write_bytes", &self.write_bytes),
            ("discard_bytes", &self.discard_bytes),
            ("zeroed_bytes", &self.zeroed_bytes),
            ("discard_unsupported_by_host", &self.discard_unsupported_by_host),
            ("unsupported", &self.unsupported),
            ("io_errors", &self.io_errors),
            ("read_only_rejections", &self.read_only_rejections),
            ("rejected_chains", &self.rejected_chains),
            ("rejected_out_of_memory", &self.rejected_out_of_memory),
            ("rejected_wrong_direction", &self.rejected_wrong_direction),
            ("rejected_too_short", &self.rejected_too_short),
            ("rejected_too_large", &self.rejected_too_large),
            ("rejected_bad_length", &self.rejected_bad_length),
            ("rejected_out_of_range", &self.rejected_out_of_range),
            ("rejected_broken_chain", &self.rejected_broken_chain),
            ("no_status_chains", &self.no_status_chains),
            ("invalid_heads", &self.invalid_heads),
        ];
        all.iter().map(|(n, c)| (*n, c.load(Relaxed))).collect()
    }
}
