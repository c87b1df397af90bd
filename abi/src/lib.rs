//! The contract between amsvm and its native guest images (the workload guest, later the
//! paging server). `no_std`, plain `#[repr(C)]` data only, so that the VMM and the
//! unikernels compile the very same definitions. Documented in `docs/native-abi.md`.
//!
//! A native image runs entirely at CPL3 (see DESIGN.md). It is entered with:
//! - `rip` = ELF entry point, `rsp` = [`layout::STACK_TOP`], `rdi` = [`layout::BOOT_INFO`],
//! - identity paging of all guest RAM and of the virtio-mmio window, user bit set,
//! - port I/O allowed by the TSS I/O bitmap, no interrupts delivered; any exception is fatal
//!   (no IDT: the VM triple-faults and amsvm reports the partition as crashed).
#![no_std]

/// Guest-physical memory layout of a native partition.
pub mod layout {
    /// GDT (and the TSS right after it).
    pub const GDT: u64 = 0x1000;
    /// Task-state segment with an I/O permission bitmap that allows every port (8 KiB +
    /// 1 byte), after the page tables. Port I/O from CPL3 is granted through this bitmap:
    /// some KVMs (the nested PVM KVM of our machines) do not honour IOPL=3 in guest user
    /// mode but do honour the bitmap.
    pub const TSS: u64 = 0xA000;
    /// The boot-info page ([`super::BootInfo`]); `rdi` at entry.
    pub const BOOT_INFO: u64 = 0x2000;
    /// The hypercall mailbox page ([`super::Mailbox`]).
    pub const MAILBOX: u64 = 0x3000;
    /// PML4; PDPT at +0x1000; page directories after it.
    pub const PAGE_TABLES: u64 = 0x4000;
    /// End of the page-table area (exclusive).
    pub const PAGE_TABLES_END: u64 = 0x10_0000;
    /// The initial stack grows down from here (1 MiB below the image).
    pub const STACK_TOP: u64 = 0x20_0000;
    /// Lowest address an image's loadable segments may use.
    pub const IMAGE_MIN: u64 = 0x20_0000;
    /// Guest RAM of a native partition is at most this (3 GiB); the virtio-mmio window follows.
    pub const MAX_RAM: u64 = 0xC000_0000;
    /// First virtio-mmio device window; device `i` is at `MMIO_BASE + i * MMIO_SIZE`.
    pub const MMIO_BASE: u64 = 0xD000_0000;
    /// Size of one virtio-mmio device window.
    pub const MMIO_SIZE: u64 = 0x1000;
    /// Most virtio-mmio devices per partition.
    pub const MAX_DEVICES: usize = 16;
    /// GSI of device `i` is `FIRST_DEVICE_IRQ + i`.
    pub const FIRST_DEVICE_IRQ: u32 = 5;

    // The areas above are ordered and do not overlap (checked at compile time).
    const _: () = assert!(GDT < BOOT_INFO && BOOT_INFO < MAILBOX && MAILBOX < PAGE_TABLES);
    const _: () = assert!(PAGE_TABLES + 6 * 0x1000 <= TSS && TSS + 0x68 + 8192 < PAGE_TABLES_END);
    const _: () = assert!(PAGE_TABLES_END <= STACK_TOP && STACK_TOP <= IMAGE_MIN);
    const _: () = assert!(MAX_RAM <= MMIO_BASE);
}

/// Port-I/O hypercall interface. The guest fills the [`Mailbox`] and writes the hypercall
/// number (32-bit `out`) to [`HYPERCALL_PORT`]; the vCPU is blocked until amsvm is done,
/// and results are in the mailbox.
pub const HYPERCALL_PORT: u16 = 0x0510;

/// Hypercall numbers.
pub mod hc {
    /// Report progress: the mailbox's `progress` holds cumulative counters.
    pub const PROGRESS: u32 = 1;
    /// Exit the partition with `mailbox.arg[0]` as status (0 = success). Counters in
    /// `progress` are taken as final.
    pub const EXIT: u32 = 2;
    /// Read the host's monotonic clock: `mailbox.ret[0]` = nanoseconds since partition start.
    pub const CLOCK: u32 = 3;
    /// Block until an event arrives for this partition or `arg[0]` nanoseconds pass
    /// (0 = just yield). `ret[0]` = 1 if woken by an event, 0 on timeout.
    pub const WAIT: u32 = 4;
}

/// Exit status values a native image reports with [`hc::EXIT`].
pub mod exit {
    pub const OK: u64 = 0;
    /// Page verification failed at least once.
    pub const VERIFY_FAILED: u64 = 1;
    /// The boot-info page or the workload settings were unusable.
    pub const BAD_CONFIG: u64 = 2;
    /// A device failed (e.g. virtio-blk returned an error status).
    pub const DEVICE_ERROR: u64 = 3;
    /// The image panicked.
    pub const PANIC: u64 = 4;
}

pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"AMSVMBI1");
pub const BOOT_INFO_VERSION: u32 = 1;

/// One virtio-mmio device as the boot-info page announces it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Guest-physical base of its register window.
    pub mmio_base: u64,
    /// Size of the window.
    pub mmio_size: u64,
    /// virtio device id (2 = block, 5 = balloon, ...).
    pub device_id: u32,
    /// GSI (unused by CPL3 images, which poll).
    pub irq: u32,
}

/// Access patterns of the workload guest.
pub mod pattern {
    /// Pages in order, wrapping around.
    pub const SEQUENTIAL: u32 = 0;
    /// Uniformly random pages.
    pub const UNIFORM: u32 = 1;
    /// Zipf-distributed page popularity (exponent `zipf_theta_milli / 1000`).
    pub const ZIPF: u32 = 2;
    /// A hot spot of `hot_pct`% of the working set receives `hot_access_pct`% of the
    /// accesses and moves to another place every `phase_accesses` accesses.
    pub const HOTSPOT: u32 = 3;
}

/// Settings of the workload guest (ignored by other images).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadParams {
    /// Pages in the working set (4 KiB each); must fit in the free RAM.
    pub working_set_pages: u64,
    /// One of [`pattern`].
    pub pattern: u32,
    /// Percentage of accesses that write (restamp) a page; the rest read and verify.
    pub write_pct: u32,
    /// Stop after `passes * working_set_pages` accesses (0 = no limit).
    pub passes: u64,
    /// Stop after this many milliseconds (0 = no limit). At least one limit must be set.
    pub duration_ms: u64,
    /// Seed of the pseudo-random generator.
    pub seed: u64,
    /// Zipf exponent in thousandths (e.g. 990 = 0.99).
    pub zipf_theta_milli: u32,
    /// Hot-spot size in percent of the working set.
    pub hot_pct: u32,
    /// Percentage of accesses that go to the hot spot.
    pub hot_access_pct: u32,
    /// Hostile-guest mode of the workload: 0 = off; 1 = before the disk test and the
    /// memory workload, send requests amsvm must reject (unclaimed ports and MMIO, bad
    /// hypercalls, out-of-protocol virtio-mmio register writes, malformed virtio-blk
    /// descriptor chains), then check that the disk still works.
    pub chaos: u32,
    /// Accesses per hot-spot phase.
    pub phase_accesses: u64,
    /// Report progress every this many accesses (0 = [`DEFAULT_REPORT_EVERY`]).
    pub report_every: u64,
    /// Disk test: number of 4 KiB blocks to write, read back and verify on the first
    /// virtio-blk device before the memory workload (0 = no disk test).
    pub disk_test_blocks: u64,
    /// Record the time of every access from this access on (counted from 0) in the
    /// mailbox's latency histogram; `u64::MAX` (or 0 in `measure_latency`) = never.
    pub latency_from: u64,
    /// 1 = record access times (see `latency_from`), 0 = do not.
    pub measure_latency: u32,
    /// What the workload does with a virtio-balloon device (one of [`balloon`]).
    pub balloon: u32,
    /// Idle pages: stamped once after the working set at start, then left alone (the
    /// memory of a page cache nobody reads any more). They are what a cooperating
    /// balloon driver loans first; the final pass verifies every idle page that is not
    /// loaned.
    pub idle_pages: u64,
    /// Busy turns, so that demand moves between partitions over time: time (the CLOCK
    /// hypercall's, from partition start) is cut into turns of `turn_ms`; of every
    /// `turns` consecutive turns the workload is busy in the one numbered `turn`
    /// (0-based) and quiet in the others. Busy, it accesses its working set by
    /// `pattern`; quiet, only its first `quiet_pct`% pages, uniformly. `turns` 0 or 1 =
    /// always busy.
    pub turn_ms: u64,
    pub turns: u32,
    pub turn: u32,
    pub quiet_pct: u32,
    /// Fault campaign: the balloon driver stops answering (no inflate, deflate or
    /// statistics any more) this many milliseconds after the workload starts; 0 = never.
    pub balloon_silent_ms: u32,
}

/// What the workload guest does with its virtio-balloon device
/// ([`WorkloadParams::balloon`]).
pub mod balloon {
    /// Leave the device alone (a partition that does not cooperate).
    pub const IGNORE: u32 = 0;
    /// Follow the target (inflate with free pages, deflate), report statistics.
    pub const COOPERATE: u32 = 1;
    /// As COOPERATE, and also report free pages (VIRTIO_BALLOON_F_PAGE_REPORTING).
    pub const COOPERATE_AND_REPORT: u32 = 2;
}

/// The boot-info page at [`layout::BOOT_INFO`], written by amsvm before entry.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`BOOT_INFO_VERSION`].
    pub version: u32,
    /// `size_of::<BootInfo>()`.
    pub size: u32,
    /// Partition id (index in the config, from 0); stamped into every page.
    pub partition_id: u32,
    /// Number of vCPUs (native images run on vCPU 0 only today).
    pub vcpus: u32,
    /// Bytes of guest RAM, from guest-physical 0.
    pub mem_bytes: u64,
    /// First byte of RAM the image may use freely (after the image, page aligned).
    pub free_start: u64,
    /// End of RAM (exclusive).
    pub free_end: u64,
    /// Guest-physical address of the hypercall mailbox.
    pub mailbox: u64,
    /// Number of valid entries in `devices`.
    pub device_count: u32,
    /// The hypercall port ([`HYPERCALL_PORT`]).
    pub hypercall_port: u16,
    /// The 16550 console's port (0x3f8).
    pub serial_port: u16,
    pub devices: [DeviceInfo; layout::MAX_DEVICES],
    pub workload: WorkloadParams,
}

impl BootInfo {
    pub const fn empty() -> Self {
        BootInfo {
            magic: BOOT_INFO_MAGIC,
            version: BOOT_INFO_VERSION,
            size: core::mem::size_of::<BootInfo>() as u32,
            partition_id: 0,
            vcpus: 1,
            mem_bytes: 0,
            free_start: 0,
            free_end: 0,
            mailbox: layout::MAILBOX,
            device_count: 0,
            hypercall_port: HYPERCALL_PORT,
            serial_port: 0x3f8,
            devices: [DeviceInfo { mmio_base: 0, mmio_size: 0, device_id: 0, irq: 0 }; layout::MAX_DEVICES],
            workload: WorkloadParams {
                working_set_pages: 0,
                pattern: 0,
                write_pct: 0,
                passes: 0,
                duration_ms: 0,
                seed: 0,
                zipf_theta_milli: 0,
                hot_pct: 0,
                hot_access_pct: 0,
                chaos: 0,
                phase_accesses: 0,
                report_every: 0,
                disk_test_blocks: 0,
                latency_from: u64::MAX,
                measure_latency: 0,
                balloon: 0,
                idle_pages: 0,
                turn_ms: 0,
                turns: 0,
                turn: 0,
                quiet_pct: 0,
                balloon_silent_ms: 0,
            },
        }
    }
}

/// Cumulative counters the workload reports with [`hc::PROGRESS`] and [`hc::EXIT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Pages accessed (read or written).
    pub pages_touched: u64,
    /// Pages read whose contents matched what was last written (or zero if never written).
    pub pages_verified: u64,
    /// Pages written (stamped).
    pub pages_written: u64,
    /// Pages whose contents did not match.
    pub verify_failures: u64,
    /// Disk blocks written and read back correctly.
    pub disk_blocks_verified: u64,
    /// Disk blocks that read back wrong or failed.
    pub disk_failures: u64,
}

/// The hypercall mailbox page at [`layout::MAILBOX`]. Guest-written: amsvm treats every
/// field as untrusted.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Mailbox {
    pub arg: [u64; 4],
    pub ret: [u64; 4],
    pub progress: Progress,
    /// Access-time histogram (TSC cycles), filled by the workload when asked; final at
    /// EXIT. Bucket `i` is [`latency_bucket_floor`]`(i)` up to the next bucket's floor.
    pub latency: [u64; LATENCY_BUCKETS],
}

/// Buckets of the access-time histogram: four per power of two, up to 2^33 cycles.
pub const LATENCY_BUCKETS: usize = 128;

/// The bucket of a duration of `cycles`: four buckets per power of two (±12%).
pub const fn latency_bucket(cycles: u64) -> usize {
    if cycles < 8 {
        return cycles as usize;
    }
    let e = 63 - cycles.leading_zeros() as usize; // >= 3
    let b = 4 * (e - 1) + ((cycles >> (e - 2)) & 3) as usize;
    if b >= LATENCY_BUCKETS { LATENCY_BUCKETS - 1 } else { b }
}

/// The smallest duration that falls into bucket `b`.
pub const fn latency_bucket_floor(b: usize) -> u64 {
    if b < 8 {
        return b as u64;
    }
    let e = b / 4 + 1;
    (1u64 << e) | (((b % 4) as u64) << (e - 2))
}

/// Page stamp the workload writes at the start of every page it writes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageStamp {
    pub magic: u32,
    pub partition_id: u32,
    pub page_index: u64,
    pub version: u64,
}
pub const PAGE_STAMP_MAGIC: u32 = u32::from_le_bytes(*b"PAGE");

/// Stamp the workload writes at the start of every 4 KiB block of its disk test
/// ([`WorkloadParams::disk_test_blocks`]); the rest of the block is filler derived from
/// the stamp, as for pages.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStamp {
    pub magic: u32,
    pub partition_id: u32,
    /// Block number (4 KiB units from the start of the device).
    pub block_index: u64,
    /// Distinguishes one disk test run from another.
    pub nonce: u64,
}
pub const BLOCK_STAMP_MAGIC: u32 = u32::from_le_bytes(*b"DBLK");

/// [`WorkloadParams::report_every`] when it is 0.
pub const DEFAULT_REPORT_EVERY: u64 = 4096;

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn latency_buckets_are_ordered_and_cover_their_range() {
        for b in 0..LATENCY_BUCKETS - 1 {
            assert!(latency_bucket_floor(b) < latency_bucket_floor(b + 1));
            assert_eq!(latency_bucket(latency_bucket_floor(b)), b);
            assert_eq!(latency_bucket(latency_bucket_floor(b + 1) - 1), b);
        }
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn boot_info_fits_its_page() {
        assert!(core::mem::size_of::<BootInfo>() <= 4096);
        assert!(core::mem::size_of::<Mailbox>() <= 4096);
        let bi = BootInfo::empty();
        assert_eq!(bi.size as usize, core::mem::size_of::<BootInfo>());
    }
}
