//! The virtio-blk device: features, configuration space, activation and the request
//! queue loop.

use std::any::Any;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::metrics::BlockMetrics;
use super::request::process_chain;
use super::{
    BlkError, CONFIG_SPACE_SIZE, DISCARD_SECTOR_ALIGNMENT, ID_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG,
    MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, QUEUE_SIZE, SECTOR_SIZE, SEG_MAX, SIZE_MAX,
};
use crate::devices::virtio::{
    read_config_image, VirtioDevice, VirtioError, VirtioInterrupt, TYPE_BLOCK, VIRTIO_F_VERSION_1,
};
use crate::GuestMemory;

const NAME: &str = "virtio-blk";

/// The backing file and what the guest may do with it.
#[derive(Debug)]
pub(in crate::devices::virtio::blk) struct Disk {
    pub file: File,
    pub path: PathBuf,
    /// Size in 512-byte sectors.
    pub capacity: u64,
    pub read_only: bool,
    /// GET_ID answer: the serial, zero-padded to 20 bytes.
    pub id: [u8; ID_BYTES],
    /// A paging device of the paging-server VM: its host I/O is subject to the fault
    /// campaign's switches ([`crate::faults`]).
    pub paging: bool,
}

/// State that exists only between activation and reset.
struct Active {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio-blk device backed by a host file or block device.
pub struct VirtioBlock {
    disk: Disk,
    features: u64,
    acked: u64,
    config: [u8; CONFIG_SPACE_SIZE],
    queue_sizes: [u16; 1],
    metrics: Arc<BlockMetrics>,
    active: Option<Active>,
}

impl std::fmt::Debug for VirtioBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBlock")
            .field("path", &self.disk.path)
            .field("capacity", &self.disk.capacity)
            .field("read_only", &self.disk.read_only)
            .field("active", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl VirtioBlock {
    /// Open `path` (a regular file or block device whose size is a non-zero multiple of
    /// 512) as a disk. `serial_id` (at most 20 bytes) is what GET_ID returns.
    pub fn new(path: &Path, read_only: bool, serial_id: &str) -> Result<VirtioBlock, BlkError> {
        if serial_id.len() > ID_BYTES {
            return Err(BlkError::SerialTooLong { serial: serial_id.to_string(), len: serial_id.len() });
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlkError::Open { path: path.to_path_buf(), source })?;
        // Seeking to the end works for block devices too (their metadata length is 0).
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlkError::Size { path: path.to_path_buf(), source })?;
        if size == 0 {
            return Err(BlkError::Empty { path: path.to_path_buf() });
        }
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlkError::NotSectorMultiple { path: path.to_path_buf(), size });
        }
        let mut id = [0u8; ID_BYTES];
        id[..serial_id.len()].copy_from_slice(serial_id.as_bytes());
        let disk = Disk { file, path: path.to_path_buf(), capacity: size / SECTOR_SIZE, read_only, id, paging: false };

        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE);
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        Ok(VirtioBlock {
            config: config_image(disk.capacity),
            disk,
            features,
            acked: 0,
            queue_sizes: [QUEUE_SIZE],
            metrics: Arc::new(BlockMetrics::default()),
            active: None,
        })
    }

    /// Mark the disk as a paging device (see [`crate::faults`]).
    pub fn set_paging_device(&mut self) {
        self.disk.paging = true;
    }

    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }

    pub fn path(&self) -> &Path {
        &self.disk.path
    }

    pub fn read_only(&self) -> bool {
        self.disk.read_only
    }

    fn queue_error(source: virtio_queue::Error) -> VirtioError {
        VirtioError::Queue { device: NAME, queue: 0, source }
    }
}

/// The configuration space (virtio 1.2, 5.2.4), little endian:
///
/// ```text
///  0 le64 capacity            20 le32 blk_size              36 le32 max_discard_sectors
///  8 le32 size_max            24 topology (8 bytes, unused)  40 le32 max_discard_seg
/// 12 le32 seg_max             32 u8 writeback, u8 unused     44 le32 discard_sector_alignment
/// 16 geometry (unused)        34 le16 num_queues             48 le32 max_write_zeroes_sectors
///                                                            52 le32 max_write_zeroes_seg
///                                                            56 u8 write_zeroes_may_unmap, 3 unused
/// ```
fn config_image(capacity: u64) -> [u8; CONFIG_SPACE_SIZE] {
    let mut c = [0u8; CONFIG_SPACE_SIZE];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, &capacity.to_le_bytes());
    put(8, &SIZE_MAX.to_le_bytes());
    put(12, &SEG_MAX.to_le_bytes());
    put(20, &(SECTOR_SIZE as u32).to_le_bytes());
    put(34, &1u16.to_le_bytes());
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(40, &MAX_DISCARD_SEG.to_le_bytes());
    put(44, &DISCARD_SECTOR_ALIGNMENT.to_le_bytes());
    put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
    put(52, &MAX_WRITE_ZEROES_SEG.to_le_bytes());
    put(56, &[1]);
    c
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features;
    }

    fn acked_features(&self) -> u64 {
        self.acked
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_image(&self.config, offset, data);
    }

    /// Every field we expose is read-only (no VIRTIO_BLK_F_CONFIG_WCE).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            "{NAME} {}: ignored config write of {} bytes at {offset:#x}",
            self.disk.path.display(),
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        mut queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), VirtioError> {
        let fail = |reason: String| {
            BlockMetrics::inc(&self.metrics.activate_fails);
            Err(VirtioError::Activate { device: NAME, reason })
        };
        if queues.len() != 1 {
            return fail(format!("expected 1 queue, got {}", queues.len()));
        }
        let queue = queues.remove(0);
        if !queue.ready() {
            return fail("the driver did not enable the request queue".into());
        }
        self.active = Some(Active { mem, queue, interrupt });
        BlockMetrics::inc(&self.metrics.activations);
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
    }

    fn process_queue(&mut self, index: usize) -> Result<(), VirtioError> {
        if index != 0 {
            return Err(VirtioError::InvalidQueue {
                device: NAME,
                queue: index,
                reason: "no such queue".into(),
            });
        }
        let Some(active) = self.active.as_mut() else { return Ok(()) };
        BlockMetrics::inc(&self.metrics.queue_events);
        // Without VIRTIO_BLK_F_FLUSH the driver expects every write to be durable.
        let writethrough = self.acked & (1 << VIRTIO_BLK_F_FLUSH) == 0;
        let mem = &active.mem;
        let mut used_any = false;
        let mut first_pass = true;
        loop {
            active.queue.disable_notification(mem).map_err(Self::queue_error)?;
            let mut handled = 0u32;
            loop {
                let chain = active.queue.iter(mem).map_err(Self::queue_error)?.next();
                let Some(chain) = chain else { break };
                handled += 1;
                let head = chain.head_index();
                if head >= active.queue.size() {
                    // Not a descriptor of this queue: nothing to return to the driver.
                    BlockMetrics::inc(&self.metrics.invalid_heads);
                    continue;
                }
                let len = process_chain(&self.disk, mem, chain, &self.metrics, writethrough);
                active.queue.add_used(mem, head, len).map_err(Self::queue_error)?;
                used_any = true;
            }
            if !active.queue.enable_notification(mem).map_err(Self::queue_error)? {
                break;
            }
            // More is available. A pass that found nothing after the first one means the
            // ring says "more" but yields nothing: a corrupt ring, not worth spinning on.
            if handled == 0 && !first_pass {
                return Err(VirtioError::InvalidQueue {
                    device: NAME,
                    queue: 0,
                    reason: "available ring index moves but yields no descriptor chain".into(),
                });
            }
            first_pass = false;
        }
        if used_any && active.queue.needs_notification(mem).map_err(Self::queue_error)? {
            active.interrupt.signal_used_queue()?;
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::super::{MAX_CHAIN_DESCRIPTORS, MAX_REQUEST_BYTES};
    use super::*;
    use crate::devices::virtio::INTERRUPT_USED_BUFFER;
    use event_manager::SubscriberOps;
    use std::io::Write;
    use std::os::unix::fs::{FileExt, MetadataExt};
    use std::sync::atomic::Ordering::Relaxed;
    use virtio_bindings::virtio_blk::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const MEM_SIZE: usize = 16 << 20;
    const HDR: u64 = 0x10_0000;
    const STATUS: u64 = 0x10_1000;
    const SEGS: u64 = 0x18_0000;
    const DATA: u64 = 0x20_0000;
    const DATA2: u64 = 0x80_0000;

    /// Descriptor as the test driver writes it: (address, length, device-writable).
    type D = (u64, u32, bool);
    fn r(addr: u64, len: u32) -> D {
        (addr, len, false)
    }
    fn w(addr: u64, len: u32) -> D {
        (addr, len, true)
    }

    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn disk_file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.as_file().sync_all().unwrap();
        f
    }

    struct Driver<'a> {
        mem: &'a GuestMemory,
        mq: MockSplitQueue<'a, GuestMemory>,
    }

    impl<'a> Driver<'a> {
        fn new(mem: &'a GuestMemory) -> Self {
            Driver { mem, mq: MockSplitQueue::new(mem, QUEUE_SIZE) }
        }

        /// A started device over a fresh queue.
        fn activate(&self, dev: &mut VirtioBlock) -> Arc<VirtioInterrupt> {
            let irq = Arc::new(VirtioInterrupt::new().unwrap());
            dev.ack_features(dev.device_features());
            dev.activate(self.mem.clone(), vec![self.mq.create_queue::<Queue>().unwrap()], irq.clone())
                .unwrap();
            irq
        }

        /// Put one chain in descriptors 0.. and make it available.
        fn submit(&self, descs: &[D]) {
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, wr))| {
                    let mut flags = if wr { VRING_DESC_F_WRITE as u16 } else { 0 };
                    if i + 1 < descs.len() {
                        flags |= VRING_DESC_F_NEXT as u16;
                    }
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i as u16 + 1))
                })
                .collect();
            self.mq.add_desc_chains(&raw, 0).unwrap();
        }

        fn used_idx(&self) -> u16 {
            self.mq.used().idx().load()
        }

        /// (head, len) of used entry `i`.
        fn used(&self, i: u16) -> (u32, u32) {
            let e = self.mq.used().ring().ref_at(i as usize).unwrap().load();
            (e.id(), e.len())
        }

        /// Submit, process, and return the used length of the one completed chain.
        fn run(&self, dev: &mut VirtioBlock, descs: &[D]) -> u32 {
            let before = self.used_idx();
            self.submit(descs);
            dev.process_queue(0).unwrap();
            assert_eq!(self.used_idx(), before.wrapping_add(1), "exactly one chain completed");
            let (head, len) = self.used(before);
            assert_eq!(head, 0);
            len
        }

        fn header(&self, req_type: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&req_type.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        }

        fn status(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS)).unwrap()
        }

        fn segments(&self, segs: &[(u64, u32, u32)]) -> u32 {
            let mut raw = Vec::new();
            for &(sector, n, flags) in segs {
                raw.extend_from_slice(&sector.to_le_bytes());
                raw.extend_from_slice(&n.to_le_bytes());
                raw.extend_from_slice(&flags.to_le_bytes());
            }
            self.mem.write_slice(&raw, GuestAddress(SEGS)).unwrap();
            raw.len() as u32
        }
    }

    fn guest_mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn file_bytes(f: &tempfile::NamedTempFile, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        f.as_file().read_exact_at(&mut v, off).unwrap();
        v
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn creation_errors_name_the_file() {
        let f = disk_file(&[0u8; 1000]);
        let e = VirtioBlock::new(f.path(), false, "x").unwrap_err();
        assert!(matches!(e, BlkError::NotSectorMultiple { size: 1000, .. }));
        assert!(e.to_string().contains(&f.path().display().to_string()), "{e}");
        let f = disk_file(&[]);
        assert!(matches!(VirtioBlock::new(f.path(), false, "x"), Err(BlkError::Empty { .. })));
        let e = VirtioBlock::new(Path::new("/nonexistent/disk.img"), false, "x").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");
        let f = disk_file(&[0u8; 512]);
        assert!(matches!(
            VirtioBlock::new(f.path(), false, "123456789012345678901"),
            Err(BlkError::SerialTooLong { len: 21, .. })
        ));
        let d = VirtioBlock::new(f.path(), false, "12345678901234567890").unwrap();
        assert_eq!(d.capacity(), 1);
    }

    #[test]
    fn features_and_config_space() {
        let f = disk_file(&vec![0u8; 1 << 20]);
        let d = VirtioBlock::new(f.path(), false, "disk0").unwrap();
        assert_eq!(d.device_type(), TYPE_BLOCK);
        assert_eq!(d.queue_max_sizes(), &[QUEUE_SIZE]);
        let feat = d.device_features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_BLK_SIZE,
        ] {
            assert_ne!(feat & (1 << bit), 0, "feature {bit}");
        }
        assert_eq!(feat & (1 << VIRTIO_BLK_F_RO), 0);
        let rd = |off: u64, len: usize| {
            let mut b = vec![0u8; len];
            d.read_config(off, &mut b);
            let mut v = [0u8; 8];
            v[..len].copy_from_slice(&b);
            u64::from_le_bytes(v)
        };
        assert_eq!(rd(0, 8), 2048, "capacity in sectors");
        assert_eq!(rd(0, 4), 2048);
        assert_eq!(rd(8, 4), u64::from(SIZE_MAX));
        assert_eq!(rd(12, 4), u64::from(SEG_MAX));
        assert_eq!(rd(20, 4), 512);
        assert_eq!(rd(36, 4), u64::from(MAX_DISCARD_SECTORS));
        assert_eq!(rd(40, 4), u64::from(MAX_DISCARD_SEG));
        assert_eq!(rd(44, 4), u64::from(DISCARD_SECTOR_ALIGNMENT));
        assert_eq!(rd(48, 4), u64::from(MAX_WRITE_ZEROES_SECTORS));
        assert_eq!(rd(52, 4), 1);
        assert_eq!(rd(56, 1), 1);
        assert_eq!(rd(60, 4), 0, "beyond the image");
        assert_eq!(rd(1 << 40, 8), 0);
        // The advertised limits keep conforming requests within the bound.
        assert!(u64::from(SEG_MAX) * u64::from(SIZE_MAX) <= MAX_REQUEST_BYTES);
        assert!(SEG_MAX as usize + 2 <= QUEUE_SIZE as usize && SEG_MAX as usize + 2 <= MAX_CHAIN_DESCRIPTORS);

        let ro = VirtioBlock::new(f.path(), true, "disk0").unwrap();
        assert_ne!(ro.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro.device_features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    }

    #[test]
    fn write_read_round_trip_matches_the_file() {
        let original = pattern(1 << 20, 1);
        let f = disk_file(&original);
        let mem = guest_mem();
        let drv = Driver::new(&mem);
        let mut dev = VirtioBlock::new(f.path(), false, "rt").unwrap();
        let irq = drv.activate(&mut dev);

        // OUT of 8 KiB at sector 8, data split over descriptors at odd boundaries.
        let data = pattern(8192, 2);
        mem.write_slice(&data[..1000], GuestAddress(DATA)).unwrap();
        mem.write_slice(&data[1000..4096], GuestAddress(DATA + 0x10000)).unwrap();
        mem.write_slice(&data[4096..], GuestAddress(DATA + 0x20000)).unwrap();
        drv.header(VIRTIO_BLK_T_OUT, 8);
        let len = drv.run(
            &mut dev,
            &[r(HDR, 16), r(DATA, 1000), r(DATA + 0x10000, 3096), r(DATA + 0x20000, 4096), w(STATUS, 1)],
        );
        assert_eq!((drv.status(), len), (OK, 1));
        assert_eq!(file_bytes(&f, 8 * 512, 8192), data);
        assert_eq!(file_bytes(&f, 0, 4096), original[..4096], "bytes before untouched");
        assert_eq!(file_bytes(&f, 8 * 512 + 8192, 4096), original[8 * 512 + 8192..8 * 512 + 8192 + 4096]);
        assert_ne!(irq.status() & INTERRUPT_USED_BUFFER, 0);

        // IN of the last 16 sectors (up to the capacity exactly), header and status
        // sharing nothing, data in two descriptors.
        let cap = dev.capacity();
        drv.header(VIRTIO_BLK_T_IN, cap - 16);
        let len = drv.run(&mut dev, &[r(HDR, 16), w(DATA2, 4096), w(DATA2 + 4096, 4096), w(STATUS, 1)]);
        assert_eq!((drv.status(), len), (OK, 8192 + 1));
        let mut got = vec![0u8; 8192];
        mem.read_slice(&mut got, GuestAddress(DATA2)).unwrap();
        assert_eq!(got, original[original.len() - 8192..]);

        // IN of what we wrote, with the status byte at the end of the data descriptor.
        drv.header(VIRTIO_BLK_T_IN, 8);
        mem.write_obj(0xffu8, GuestAddress(DATA2 + 8192)).unwrap();
        let len = drv.run(&mut dev, &[r(HDR, 16), w(DATA2, 8193)]);
        assert_eq!(len, 8193);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA2 + 8192)).unwrap(), OK);
        mem.read_slice(&mut got, GuestAddress(DATA2)).unwrap();
        assert_eq!(got, data);

        let m = dev.metrics();
        assert_eq!(m.writes.load(Relaxed), 1);
        assert_eq!(m.reads.load(Relaxed), 2);
        assert_eq!(m.write_bytes.load(Relaxed), 8192);
        assert_eq!(m.read_bytes.load(Relaxed), 16384);
        assert_eq!(m.rejected_chains.load(Relaxed), 0);
    }

    #[test]
    fn flush_and_get_id() {
        let f = disk_file(&vec![0u8; 64 << 10]);
        let mem = guest_mem();
        let drv = Driver::new(&mem);
        let mut dev = VirtioBlock::new(f.path(), false, "paging-dev-7").unwrap();
        drv.activate(&mut dev);

        drv.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(drv.run(&mut dev, &[r(HDR, 16), w(STATUS, 1)]), 1);
        assert_eq!(drv.status(), OK);
        assert_eq!(dev.metrics().flushes.load(Relaxed), 1);

        mem.write_slice(&[0xaa; 32], GuestAddress(DATA)).unwrap();
        drv.header(VIRTIO_BLK_T_GET_ID, 0);
        let len = drv.run(&mut dev, &[r(HDR, 16), w(DATA, 20), w(STATUS, 1)]);
        assert_eq!((drv.status(), len), (OK, 21));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..12], b"paging-dev-7");
        assert_eq!(id[12..], [0u8; 8]);
        assert_eq!(dev.metrics().get_ids.load(Relaxed), 1);

        // A GET_ID buffer shorter than 20 bytes is malformed.
        drv.header(VIRTIO_BLK_T_GET_ID, 0);
        drv.run(&mut dev, &[r(HDR, 16), w(DATA, 19), w(STATUS, 1)]);
        assert_eq!(drv.status(), IOERR);
        assert_eq!(dev.metrics().rejected_too_short.load(Relaxed), 1);
        // FLUSH with data is malformed.
        drv.header(VIRTIO_BLK_T_FLUSH, 0);
        drv.run(&mut dev, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]);
        assert_eq!(drv.status(), IOERR);
        assert_eq!(dev.metrics().rejected_bad_length.load(Relaxed), 1);
        // Unknown request types: UNSUPP.
        drv.header(VIRTIO_BLK_T_SCSI_CMD, 0);
        drv.run(&mut dev, &[r(HDR, 16), w(STATUS, 1)]);
        assert_eq!(drv.status(), UNSUPP);
        drv.header(0xdead_beef, 0);
        drv.run(&mut dev, &[r(HDR, 16), w(STATUS, 1)]);
        assert_eq!(drv.status(), UNSUPP);
        assert_eq!(dev.metrics().unsupported.load(Relaxed), 2);
    }

    #[test]
    fn discard_frees_space_and_write_zeroes_zeroes() {
        let size = 4usize << 20;
        let f = disk_file(&pattern(size, 3));
        let blocks_before = f.as_file().metadata().unwrap().blocks();
        assert!(blocks_before >= (size / 512) as u64, "file fully allocated");
        let mem = guest_mem();
        let drv = Driver::new(&mem);
        let mut dev = VirtioBlock::new(f.path(), false, "d").unwrap();
        drv.activate(&mut dev);

        // Discard 1 MiB at sector 2048 and 512 KiB at sector 6144, in one request.
        let n = drv.segments(&[(2048, 2048, 0), (6144, 1024, 0)]);
        drv.header(VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(drv.run(&mut dev, &[r(HDR, 16), r(SEGS, n), w(STATUS, 1)]), 1);
        assert_eq!(drv.status(), OK);
        let meta = f.as_file().metadata().unwrap();
        assert_eq!(meta.len(), size as u64, "size kept");
        assert!(
            meta.blocks() <= blocks_before - 3072,
            "1.5 MiB freed: {} -> {} blocks",
            blocks_before,
            meta.blocks()
        );
        assert!(file_bytes(&f, 2048 * 512, 1 << 20).iter().all(|&b| b == 0));
        assert_eq!(file_bytes(&f, 2047 * 512, 512), pattern(size, 3)[2047 * 512..2048 * 512]);
        assert_eq!(dev.metrics().discard_bytes.load(Relaxed), 1536 << 10);

        // The unmap flag (or any flag) on DISCARD: UNSUPP.
        let n = drv.segments(&[(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]);
        drv.header(VIRTIO_BLK_T_DISCARD, 0);
        drv.run(&mut dev, &[r(HDR, 16), r(SEGS, n), w(STATUS, 1)]);
        assert_eq!(drv.status(), UNSUPP);
        // Beyond the capacity, overflowing, too large, too many segments, bad list length.
        let cap = dev.capacity();
        for (segs, what) in [
            (vec![(cap - 4, 8, 0)], "past the end"),
            (vec![(u64::MAX - 2, 8, 0)], "overflow"),
            (vec![(0, MAX_DISCARD_SECTORS + 1, 0)], "too many sectors"),
            (vec![(0, 8, 0); MAX_DISCARD_SEG as usize + 1], "too many segments"),
        ] {
            let n = drv.segments(&segs);
            drv.header(VIRTIO_BLK_T_DISCARD, 0);
            drv.run(&mut dev, &[r(HDR, 16), r(SEGS, n), w(STATUS, 1)]);
            assert_eq!(drv.status(), IOERR, "{what}");
        }
        drv.header(VIRTIO_BLK_T_DISCARD, 0);
        drv.run(&mut dev, &[r(HDR, 16), r(SEGS, 15), w(STATUS, 1)]);
        assert_eq!(drv.status(), IOERR);
        let m = dev.metrics();
        assert_eq!(m.rejected_out_of_range.load(Relaxed), 2);
        assert_eq!(m.rejected_too_large.load(Relaxed), 2);
        assert_eq!(m.rejected_bad_length.load(Relaxed), 1);
        assert_eq!(m.discards.load(Relaxed), 1);

        // WRITE_ZEROES with and without unmap.
        for (sector, flags) in [(0u64, 0u32), (4096, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)] {
            let n = drv.segments(&[(sector, 64, flags)]);
            drv.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
            drv.run(&mut dev, &[r(HDR, 16), r(SEGS, n), w(STATUS, 1)]);
            assert_eq!(drv.status(), OK);
            assert!(file_bytes(&f, sector * 512, 64 * 512).iter().all(|&b| b == 0));
            assert_eq!(
                file_bytes(&f, (sector + 64) * 512, 512),
                pattern(size, 3)[(sector as usize + 64) * 512..][..512]
            );
        }
        assert_eq!(m.write_zeroes.load(Relaxed), 2);
        // Unknown flag on WRITE_ZEROES: UNSUPP.
        let n = drv.segments(&[(0, 8, 2)]);
        drv.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        drv.run(&mut dev, &[r(HDR, 16), r(SEGS, n), w(STATUS, 1)]);
        assert_eq!(drv.status(), UNSUPP);
    }

    #[test]
    fn out_of_range_sectors_are_rejected() {
        let original = pattern(64 << 10, 4);
        let f = disk_file(&original);
        let mem = guest_mem();
        let drv = Driver::new(&mem);
        let mut dev = VirtioBlock::new(f.path(), false, "r").unwrap();
        drv.activate(&mut dev);
        let cap = dev.capacity();
        for (t, sector, desc) in [
            (VIRTIO_BLK_T_IN, cap - 1, w(DATA, 1024)),
            (VIRTIO_BLK_T_IN, cap, w(DATA, 512)),
            (VIRTIO_BLK_T_IN, u64::MAX, w(DATA, 512)),
            (VIRTIO_BLK_T_OUT, cap - 1, r(DATA, 1024)),
            (VIRTIO_BLK_T_OUT, u64::MAX - 1, r(DATA, 1024)),
        ] {
            drv.header(t, sector);
            let len = drv.run(&mut dev, &[r(HDR, 16), desc, w(STATUS, 1)]);
            assert_eq!((drv.status(), len), (IOERR, 1), "type {t} sector {sector}");
        }
        assert_eq!(dev.metrics().rejected_out_of_range.load(Relaxed), 5);
        assert_eq!(file_bytes(&f, 0, original.len()), original, "nothing written");
        // An empty read at the very end is in range.
        drv.header(VIRTIO_BLK_T_IN, cap);
        drv.run(&mut dev, &[r(HDR, 16), w(STATUS, 1)]);
        assert_eq!(drv.status(), OK);
    }

    #[test]
    fn read_only_device_refuses_writes() {
        let original = pattern(64 << 10, 5);
        let f = disk_file(&original);
        let mem = guest_mem();
        let drv = Driver::new(&mem);
        let mut dev = VirtioBlock::new(f.path(), true, "ro").unwrap();
        drv.activate(&mut dev);
        mem.write_slice(&[0x55; 4096], GuestAddress(DATA)).unwrap();
        drv.header(VIRTIO_BLK_T_OUT, 0);
        drv.run(&mut dev, &[r(HDR, 16), r(DATA, 4096), w(STATUS, 1)]);
        assert_eq!(drv.status(), IOERR);
        let n = drv.segments(&[(0, 8, 0)]);
        drv.header(VIRTIO_BLK_T_DISCARD, 0);
        drv.run(&mut dev, &[r(HDR, 16), r(SEGS, n), w(STATUS, 1)]);
        assert_eq!(drv.status(), IOERR);
        drv.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        drv.run(&mut dev, &[r(HDR, 16), r(SEGS, n), w(STATUS, 1)]);
        assert_eq!(drv.status(), IOERR);
        assert_eq!(dev.metrics().read_only_rejections.load(Relaxed), 3);
        assert_eq!(file_bytes(&f, 0, original.len()), original);
        // Reads and flushes work.
        drv.header(VIRTIO_BLK_T_IN, 0);
        drv.run(&mut dev, &[r(HDR, 16), w(DATA, 4096), w(STATUS, 1)]);
        assert_eq!(drv.status(), OK);
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, original[..4096]);
        drv.header(VIRTIO_BLK_T_FLUSH, 0);
        drv.run(&mut dev, &[r(HDR, 16), w(STATUS, 1)]);
        assert_eq!(drv.status(), OK);
    }

    #[test]
    fn malformed_chains_are_rejected_and_counted() {
        let original = pattern(1 << 20, 6);
        let f = disk_file(&original);
        let mem = guest_mem();
        let drv = Driver::new(&mem);
        let mut dev = VirtioBlock::new(f.path(), false, "m").unwrap();
        drv.activate(&mut dev);
        let m = dev.metrics();
        let far = 1u64 << 40;
        let in_mem_huge = 8u32 << 20; // inside guest memory, above MAX_REQUEST_BYTES

        // (what, request type, chain, expected status or None for "no status", counter)
        type Case<'a> = (&'a str, u32, Vec<D>, Option<u8>, &'a std::sync::atomic::AtomicU64);
        let cases: Vec<Case> = vec![
            (
                "header too short",
                VIRTIO_BLK_T_IN,
                vec![r(HDR, 8), w(DATA, 512), w(STATUS, 1)],
                Some(IOERR),
                &m.rejected_too_short,
            ),
            (
                "no header at all",
                VIRTIO_BLK_T_IN,
                vec![w(DATA, 512), w(STATUS, 1)],
                Some(IOERR),
                &m.rejected_too_short,
            ),
            (
                "IN with readable data",
                VIRTIO_BLK_T_IN,
                vec![r(HDR, 16), r(DATA, 512), w(STATUS, 1)],
                Some(IOERR),
                &m.rejected_wrong_direction,
            ),
            (
                "OUT with writable data",
                VIRTIO_BLK_T_OUT,
                vec![r(HDR, 16), w(DATA, 512), w(STATUS, 1)],
                Some(IOERR),
                &m.rejected_wrong_direction,
            ),
            (
                "readable after writable",
                VIRTIO_BLK_T_OUT,
                vec![r(HDR, 16), w(DATA2, 8), r(DATA, 512), w(STATUS, 1)],
                Some(IOERR),
                &m.rejected_wrong_direction,
            ),
            (
                "unaligned length",
                VIRTIO_BLK_T_IN,
                vec![r(HDR, 16), w(DATA, 100), w(STATUS, 1)],
                Some(IOERR),
                &m.rejected_bad_length,
            ),
            (
                "huge length in memory",
                VIRTIO_BLK_T_IN,
                vec![r(HDR, 16), w(DATA, in_mem_huge), w(STATUS, 1)],
                Some(IOERR),
                &m.rejected_too_large,
            ),
            (
                "huge OUT in memory",
                VIRTIO_BLK_T_OUT,
                vec![r(HDR, 16), r(DATA, in_mem_huge), w(STATUS, 1)],
                Some(IOERR),
                &m.rejected_too_large,
            ),
            (
                "length just under 4 GiB",
                VIRTIO_BLK_T_IN,
                vec![r(HDR, 16), w(DATA, u32::MAX - 4096), w(STATUS, 1)],
                Some(IOERR),
                &m.rejected_out_of_memory,
            ),
            (
                "chain over 4 GiB",
                VIRTIO_BLK_T_IN,
                vec![r(HDR, 16), w(DATA, u32::MAX), w(STATUS, 1)],
                None,
                &m.rejected_broken_chain,
            ),
            (
                "data outside memory",
                VIRTIO_BLK_T_IN,
                vec![r(HDR, 16), w(far, 512), w(STATUS, 1)],
                Some(IOERR),
                &m.rejected_out_of_memory,
            ),
            (
                "data across the end of memory",
                VIRTIO_BLK_T_OUT,
                vec![r(HDR, 16), r(MEM_SIZE as u64 - 512, 1024), w(STATUS, 1)],
                Some(IOERR),
                &m.rejected_out_of_memory,
            ),
            (
                "header outside memory",
                VIRTIO_BLK_T_IN,
                vec![r(far, 16), w(DATA, 512), w(STATUS, 1)],
                Some(IOERR),
                &m.rejected_out_of_memory,
            ),
            (
                "address overflow",
                VIRTIO_BLK_T_IN,
                vec![r(HDR, 16), w(u64::MAX - 10, 512), w(STATUS, 1)],
                Some(IOERR),
                &m.rejected_out_of_memory,
            ),
            ("missing status", VIRTIO_BLK_T_OUT, vec![r(HDR, 16), r(DATA, 512)], None, &m.rejected_too_short),
            (
                "zero-length status",
                VIRTIO_BLK_T_FLUSH,
                vec![r(HDR, 16), w(STATUS, 0)],
                None,
                &m.rejected_too_short,
            ),
            (
                "status outside memory",
                VIRTIO_BLK_T_IN,
                vec![r(HDR, 16), w(DATA, 512), w(far, 1)],
                None,
                &m.rejected_out_of_memory,
            ),
        ];
        for (what, t, chain, want, counter) in cases {
            let rejected = m.rejected_chains.load(Relaxed);
            let no_status = m.no_status_chains.load(Relaxed);
            let c = counter.load(Relaxed);
            drv.header(t, 0);
            let len = drv.run(&mut dev, &chain);
            match want {
                Some(s) => {
                    assert_eq!((drv.status(), len), (s, 1), "{what}");
                }
                None => {
                    assert_eq!(len, 0, "{what}");
                    assert_eq!(drv.status(), 0xff, "{what}: status untouched");
                    assert_eq!(m.no_status_chains.load(Relaxed), no_status + 1, "{what}");
                }
            }
            assert_eq!(m.rejected_chains.load(Relaxed), rejected + 1, "{what}");
            assert_eq!(counter.load(Relaxed), c + 1, "{what}");
        }
        assert_eq!(file_bytes(&f, 0, original.len()), original, "no malformed chain wrote");
        assert_eq!(m.writes.load(Relaxed) + m.reads.load(Relaxed), 0);
    }

    #[test]
    fn long_and_looping_chains_are_bounded() {
        let f = disk_file(&vec![0u8; 1 << 20]);
        let mem = guest_mem();
        let drv = Driver::new(&mem);
        let mut dev = VirtioBlock::new(f.path(), false, "l").unwrap();
        drv.activate(&mut dev);
        let m = dev.metrics();

        // More descriptors than MAX_CHAIN_DESCRIPTORS.
        let mut chain = vec![r(HDR, 16)];
        chain.extend((0..MAX_CHAIN_DESCRIPTORS as u64).map(|i| w(DATA + i * 512, 512)));
        chain.push(w(STATUS, 1));
        drv.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(drv.run(&mut dev, &chain), 0);
        assert_eq!(m.rejected_too_large.load(Relaxed), 1);
        assert_eq!(m.no_status_chains.load(Relaxed), 1);

        // A descriptor whose `next` points to itself.
        let d = RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 0));
        drv.mq.add_desc_chains(&[d], 0).unwrap();
        dev.process_queue(0).unwrap();
        assert_eq!(m.rejected_too_large.load(Relaxed), 2);

        // `next` pointing outside the descriptor table: the chain is cut short.
        let d = RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, QUEUE_SIZE + 3));
        drv.mq.add_desc_chains(&[d], 0).unwrap();
        dev.process_queue(0).unwrap();
        assert_eq!(m.rejected_broken_chain.load(Relaxed), 1);
        // An indirect table whose length is not a whole number of descriptors.
        let d = RawDescriptor::from(SplitDescriptor::new(SEGS, 17, VRING_DESC_F_INDIRECT as u16, 0));
        drv.mq.add_desc_chains(&[d], 0).unwrap();
        dev.process_queue(0).unwrap();
        assert_eq!(m.rejected_broken_chain.load(Relaxed), 2);
        assert_eq!(m.no_status_chains.load(Relaxed), 4);

        // An available-ring entry naming a descriptor beyond the queue: skipped.
        let idx = drv.mq.avail().idx().load();
        drv.mq.avail().ring().ref_at(idx as usize).unwrap().store(QUEUE_SIZE + 5);
        drv.mq.avail().idx().store(idx + 1);
        let used = drv.used_idx();
        dev.process_queue(0).unwrap();
        assert_eq!(m.invalid_heads.load(Relaxed), 1);
        assert_eq!(drv.used_idx(), used);
        // The queue still works afterwards.
        drv.header(VIRTIO_BLK_T_FLUSH, 0);
        drv.run(&mut dev, &[r(HDR, 16), w(STATUS, 1)]);
        assert_eq!(drv.status(), OK);

        // An available index far ahead of what the queue can hold: queue error (the
        // transport then sets DEVICE_NEEDS_RESET), no panic, no spin.
        let idx = drv.mq.avail().idx().load();
        drv.mq.avail().idx().store(idx.wrapping_add(QUEUE_SIZE + 1));
        assert!(dev.process_queue(0).is_err());
    }

    #[test]
    fn activation_and_reset() {
        let f = disk_file(&vec![0u8; 1 << 20]);
        let mem = guest_mem();
        let mut dev = VirtioBlock::new(f.path(), false, "a").unwrap();
        let irq = Arc::new(VirtioInterrupt::new().unwrap());
        // Not ready: refused.
        let q = Queue::new(QUEUE_SIZE).unwrap();
        assert!(dev.activate(mem.clone(), vec![q], irq.clone()).is_err());
        assert!(dev.activate(mem.clone(), vec![], irq.clone()).is_err());
        assert_eq!(dev.metrics().activate_fails.load(Relaxed), 2);
        assert!(!dev.is_activated());
        // Processing before activation is a no-op.
        dev.process_queue(0).unwrap();
        let drv = Driver::new(&mem);
        drv.activate(&mut dev);
        assert!(dev.is_activated());
        assert!(dev.process_queue(1).is_err());
        dev.reset();
        assert!(!dev.is_activated());
        assert_eq!(dev.acked_features(), 0);
    }

    #[test]
    fn full_stack_through_the_mmio_transport() {
        use crate::devices::virtio::mmio::{MmioTransport, MAGIC_VALUE, MMIO_WINDOW_SIZE};
        use std::sync::Mutex;
        use virtio_bindings::virtio_mmio::*;

        let vm = crate::devices::virtio::mmio::tests::kvm_vm();
        let original = pattern(1 << 20, 7);
        let f = disk_file(&original);
        let mem = guest_mem();
        let dev = VirtioBlock::new(f.path(), false, "full").unwrap();
        let metrics = dev.metrics();
        let base = 0xd000_0000u64;
        let t = Arc::new(Mutex::new(MmioTransport::new(Box::new(dev), mem.clone(), &vm, base, 5).unwrap()));
        let mut bus = crate::devices::Bus::new();
        bus.insert(base, MMIO_WINDOW_SIZE, t.clone()).unwrap();
        let mut em = event_manager::EventManager::<Arc<Mutex<MmioTransport>>>::new().unwrap();
        em.add_subscriber(t.clone());

        let w32 = |off: u32, v: u32| assert!(bus.write(base + u64::from(off), &v.to_le_bytes()));
        let r32 = |off: u32| {
            let mut b = [0u8; 4];
            assert!(bus.read(base + u64::from(off), &mut b));
            u32::from_le_bytes(b)
        };
        assert_eq!(r32(VIRTIO_MMIO_MAGIC_VALUE), MAGIC_VALUE);
        assert_eq!(r32(VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r32(VIRTIO_MMIO_DEVICE_ID), TYPE_BLOCK);
        // Driver initialisation as Linux does it.
        w32(VIRTIO_MMIO_STATUS, 1);
        w32(VIRTIO_MMIO_STATUS, 1 | 2);
        w32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let lo = r32(VIRTIO_MMIO_DEVICE_FEATURES);
        w32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let hi = r32(VIRTIO_MMIO_DEVICE_FEATURES);
        w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w32(VIRTIO_MMIO_DRIVER_FEATURES, lo);
        w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w32(VIRTIO_MMIO_DRIVER_FEATURES, hi);
        w32(VIRTIO_MMIO_STATUS, 1 | 2 | 8);
        assert_ne!(r32(VIRTIO_MMIO_STATUS) & 8, 0, "FEATURES_OK accepted");
        assert_eq!(r32(VIRTIO_MMIO_CONFIG) as u64, 2048, "capacity, low word");
        let drv = Driver::new(&mem);
        w32(VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(r32(VIRTIO_MMIO_QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
        w32(VIRTIO_MMIO_QUEUE_NUM, u32::from(QUEUE_SIZE));
        w32(VIRTIO_MMIO_QUEUE_DESC_LOW, drv.mq.desc_table_addr().0 as u32);
        w32(VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        w32(VIRTIO_MMIO_QUEUE_AVAIL_LOW, drv.mq.avail_addr().0 as u32);
        w32(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        w32(VIRTIO_MMIO_QUEUE_USED_LOW, drv.mq.used_addr().0 as u32);
        w32(VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        w32(VIRTIO_MMIO_QUEUE_READY, 1);
        w32(VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
        assert_eq!(r32(VIRTIO_MMIO_STATUS), 0xf);
        em.run_with_timeout(100).unwrap();

        // One write, notified, processed by the event loop.
        let data = pattern(4096, 8);
        mem.write_slice(&data, GuestAddress(DATA)).unwrap();
        drv.header(VIRTIO_BLK_T_OUT, 100);
        drv.submit(&[r(HDR, 16), r(DATA, 4096), w(STATUS, 1)]);
        w32(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        em.run_with_timeout(1000).unwrap();
        assert_eq!(drv.used_idx(), 1);
        assert_eq!(drv.status(), OK);
        assert_eq!(file_bytes(&f, 100 * 512, 4096), data);
        assert_eq!(metrics.writes.load(Relaxed), 1);
        assert_eq!(r32(VIRTIO_MMIO_INTERRUPT_STATUS), INTERRUPT_USED_BUFFER);
        w32(VIRTIO_MMIO_INTERRUPT_ACK, INTERRUPT_USED_BUFFER);
        assert_eq!(r32(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        // The concrete device is reachable behind the transport.
        let g = t.lock().unwrap();
        let blk = g.device().as_any().downcast_ref::<VirtioBlock>().unwrap();
        assert_eq!(blk.capacity(), 2048);
        drop(g);
        // Reset by the driver.
        w32(VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r32(VIRTIO_MMIO_STATUS), 0);
        assert!(!t.lock().unwrap().device().is_activated());
    }
}
