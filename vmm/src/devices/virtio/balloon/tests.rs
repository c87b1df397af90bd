//! The balloon device against a test driver (virtio-queue's mock queues): the protocol,
//! and every malformed input rejected and counted.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_BUFFER, VIRTIO_F_VERSION_1};
use crate::GuestMemory;

const MEM: u64 = 16 << 20;
const PAGES: u64 = MEM >> 12;
const BUF: u64 = 0x10_0000;
const BUF2: u64 = 0x11_0000;

/// Records what the device discards.
#[derive(Default)]
struct Recorder(Mutex<Vec<(u64, u64)>>);

impl Discard for Recorder {
    fn discard(&self, gpa: u64, len: u64) -> u64 {
        self.0.lock().unwrap().push((gpa, len));
        len >> PFN_SHIFT
    }
}

struct Driver<'a> {
    mem: &'a GuestMemory,
    queues: Vec<MockSplitQueue<'a, GuestMemory>>,
    dev: VirtioBalloon,
    rec: Arc<Recorder>,
    irq: Arc<VirtioInterrupt>,
}

fn mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
}

/// A started device with the features `extra` (besides VERSION_1).
fn start(mem: &GuestMemory, extra: u64) -> Driver<'_> {
    let rec = Arc::new(Recorder::default());
    let mut dev = VirtioBalloon::new(MEM, rec.clone());
    dev.ack_features((1 << VIRTIO_F_VERSION_1) | extra);
    let queues: Vec<_> = (0..4).map(|i| MockSplitQueue::create(mem, GuestAddress(i * 0x1_0000), QUEUE_SIZE)).collect();
    let irq = Arc::new(VirtioInterrupt::new().unwrap());
    dev.activate(mem.clone(), queues.iter().map(|q| q.create_queue::<Queue>().unwrap()).collect(), irq.clone()).unwrap();
    Driver { mem, queues, dev, rec, irq }
}

/// Descriptor: (address, length, device-writable).
type D = (u64, u32, bool);

impl Driver<'_> {
    fn submit(&self, q: usize, descs: &[D]) {
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
        self.queues[q].add_desc_chains(&raw, 0).unwrap();
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.queues[q].used().idx().load()
    }

    fn pfns(&self, at: u64, pfns: &[u32]) -> u32 {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        bytes.len() as u32
    }

    /// Send page numbers on queue `q` in one descriptor; the chain must come back.
    fn send(&mut self, q: usize, pfns: &[u32]) {
        let len = self.pfns(BUF, pfns);
        let before = self.used_idx(q);
        self.submit(q, &[(BUF, len, false)]);
        self.dev.process_queue(q).unwrap();
        assert_eq!(self.used_idx(q), before.wrapping_add(1), "the chain is returned");
    }

    fn state(&self) -> Arc<BalloonState> {
        self.dev.state()
    }
}

#[test]
fn inflate_discards_coalesced_runs_and_deflate_returns_pages() {
    let m = mem();
    let mut d = start(&m, 1 << F_STATS_VQ);
    d.send(0, &[10, 11, 12, 40, 13]);
    assert_eq!(*d.rec.0.lock().unwrap(), vec![(10 << 12, 4 << 12), (40 << 12, 1 << 12)], "runs discarded together");
    let s = d.state();
    assert_eq!(s.loaned.load(Relaxed), 5);
    assert_eq!(s.frames_freed.load(Relaxed), 5);
    d.send(1, &[11, 40]);
    assert_eq!(s.loaned.load(Relaxed), 3);
    assert_eq!(s.deflated.load(Relaxed), 2);
    assert_eq!(s.peak_loaned.load(Relaxed), 5);
    // A page deflated can be inflated again.
    d.send(0, &[40]);
    assert_eq!(s.loaned.load(Relaxed), 4);
    assert_eq!(crate::metrics::DeviceCounters::rejected(&*s), 0);
}

#[test]
fn bad_page_numbers_are_rejected_and_counted() {
    let m = mem();
    let mut d = start(&m, 0);
    d.send(0, &[5, 5, PAGES as u32, u32::MAX, 6]);
    let s = d.state();
    assert_eq!(s.loaned.load(Relaxed), 2, "5 and 6 only");
    assert_eq!(s.rejected_duplicate.load(Relaxed), 1);
    assert_eq!(s.rejected_out_of_range.load(Relaxed), 2);
    assert_eq!(*d.rec.0.lock().unwrap(), vec![(5 << 12, 2 << 12)], "nothing out of range reaches the host");
    d.send(1, &[7, 5, PAGES as u32 + 1]);
    assert_eq!(s.rejected_not_inflated.load(Relaxed), 2);
    assert_eq!(s.loaned.load(Relaxed), 1);
    assert_eq!(crate::metrics::DeviceCounters::rejected(&*s), 5);
}

#[test]
fn malformed_chains_are_returned_rejected_and_do_nothing() {
    let m = mem();
    let mut d = start(&m, 0);
    let s = d.state();
    let cases: Vec<Vec<D>> = vec![
        vec![(BUF, 8, true)],                 // device-writable page numbers
        vec![(BUF, 7, false)],                // not a whole number of entries
        vec![(MEM - 4, 8, false)],            // past the end of guest memory
        vec![(u64::MAX - 3, 8, false)],       // address overflow
        vec![(BUF, 4, false), (BUF2, 4, true)], // mixed directions
    ];
    for (k, c) in cases.iter().enumerate() {
        d.pfns(BUF, &[1, 2]);
        let before = d.used_idx(0);
        d.submit(0, c);
        d.dev.process_queue(0).unwrap();
        assert_eq!(d.used_idx(0), before.wrapping_add(1), "case {k}: chain returned");
        assert_eq!(s.rejected_chains.load(Relaxed), k as u64 + 1, "case {k}: counted");
    }
    // Too many page numbers in one chain.
    let many = vec![0u8; 4 * (MAX_PFNS_PER_CHAIN + 1)];
    m.write_slice(&many, GuestAddress(0x20_0000)).unwrap();
    d.submit(0, &[(0x20_0000, many.len() as u32, false)]);
    d.dev.process_queue(0).unwrap();
    assert_eq!(s.rejected_chains.load(Relaxed), cases.len() as u64 + 1);
    assert_eq!(s.loaned.load(Relaxed), 0);
    assert!(d.rec.0.lock().unwrap().is_empty(), "nothing discarded");
    // The device still works.
    d.send(0, &[3]);
    assert_eq!(s.loaned.load(Relaxed), 1);
}

#[test]
fn a_chain_as_long_as_the_queue_is_accepted() {
    let m = mem();
    let mut d = start(&m, 0);
    // QUEUE_SIZE descriptors of one page number each (page numbers 0..QUEUE_SIZE).
    let pfns: Vec<u32> = (0..QUEUE_SIZE as u32).collect();
    d.pfns(BUF, &pfns);
    let descs: Vec<D> = (0..QUEUE_SIZE as u64).map(|i| (BUF + 4 * i, 4, false)).collect();
    d.submit(0, &descs);
    d.dev.process_queue(0).unwrap();
    assert_eq!(d.state().rejected_chains.load(Relaxed), 0);
    assert_eq!(d.state().loaned.load(Relaxed), QUEUE_SIZE as u64);
}

#[test]
fn statistics_are_kept_until_the_device_asks_again() {
    let m = mem();
    let mut d = start(&m, 1 << F_STATS_VQ);
    let mut raw = Vec::new();
    for (t, v) in [(tag::MEMFREE, 123u64 << 20), (tag::MEMTOT, 512 << 20), (99, 7)] {
        raw.extend_from_slice(&t.to_le_bytes());
        raw.extend_from_slice(&v.to_le_bytes());
    }
    m.write_slice(&raw, GuestAddress(BUF)).unwrap();
    d.submit(2, &[(BUF, raw.len() as u32, false)]);
    d.dev.process_queue(2).unwrap();
    assert_eq!(d.used_idx(2), 0, "the stats buffer stays with the device");
    let st = d.state().guest_stats();
    assert_eq!(st.get(tag::MEMFREE), Some(123 << 20));
    assert_eq!(st.get(tag::MEMTOT), Some(512 << 20));
    assert_eq!(st.updates, 1);
    d.irq.ack(INTERRUPT_USED_BUFFER);
    d.dev.request_stats();
    assert_eq!(d.used_idx(2), 1, "asking returns the buffer");
    assert_ne!(d.irq.status() & INTERRUPT_USED_BUFFER, 0);
    d.dev.request_stats();
    assert_eq!(d.used_idx(2), 1, "nothing held, nothing returned");
    // A stats buffer of a length that is not whole entries is rejected and returned.
    d.submit(2, &[(BUF, 11, false)]);
    d.dev.process_queue(2).unwrap();
    assert_eq!(d.used_idx(2), 2);
    assert_eq!(d.state().rejected_chains.load(Relaxed), 1);
}

#[test]
fn reported_free_pages_are_discarded_not_loaned() {
    let m = mem();
    // Without STATS_VQ, the reporting queue is queue 2.
    let mut d = start(&m, 1 << F_PAGE_REPORTING);
    d.submit(2, &[(0x40_0000, 2 << 20, true), (0x80_0000, 8192, true)]);
    d.dev.process_queue(2).unwrap();
    assert_eq!(d.used_idx(2), 1);
    assert_eq!(*d.rec.0.lock().unwrap(), vec![(0x40_0000, 2 << 20), (0x80_0000, 8192)]);
    let s = d.state();
    assert_eq!(s.reported.load(Relaxed), 512 + 2);
    assert_eq!(s.loaned.load(Relaxed), 0);
    // Not page aligned, device-readable, or a length that is not whole pages: rejected.
    for c in [vec![(0x40_0800u64, 4096u32, true)], vec![(0x40_0000, 4096, false)], vec![(0x40_0000, 100, true)]] {
        d.submit(2, &c);
        d.dev.process_queue(2).unwrap();
    }
    assert_eq!(s.rejected_chains.load(Relaxed), 3);
    assert_eq!(d.rec.0.lock().unwrap().len(), 2, "nothing more discarded");
}

#[test]
fn config_space_target_actual_and_reset() {
    let m = mem();
    let mut d = start(&m, 0);
    d.irq.ack(u32::MAX);
    d.dev.set_target(1000);
    assert_ne!(d.irq.status() & INTERRUPT_CONFIG_CHANGE, 0, "the driver hears of a new target");
    let mut b = [0u8; 8];
    d.dev.read_config(0, &mut b);
    assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), 1000);
    d.dev.write_config(0, &[1, 2, 3, 4]); // num_pages is the device's: ignored
    d.dev.write_config(4, &700u32.to_le_bytes());
    d.dev.read_config(0, &mut b);
    assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), 1000);
    assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 700);
    d.dev.write_config(u64::MAX, &[1, 2]); // out of range: ignored, no panic
    // The target never exceeds the guest's RAM.
    d.dev.set_target(u64::MAX);
    assert_eq!(d.state().target.load(Relaxed), PAGES);
    // A reset empties the balloon.
    d.send(0, &[1, 2, 3]);
    d.dev.reset();
    assert_eq!(d.state().loaned.load(Relaxed), 0);
    assert!(!d.state().active.load(Relaxed));
}

#[test]
fn notifications_for_queues_that_do_not_exist_are_counted() {
    let m = mem();
    let mut d = start(&m, 0);
    // Without STATS_VQ and PAGE_REPORTING only queues 0 and 1 exist.
    assert!(d.dev.process_queue(2).is_ok());
    assert!(d.dev.process_queue(7).is_ok());
    assert_eq!(d.state().bad_notifications.load(Relaxed), 2);
    assert_eq!(crate::metrics::DeviceCounters::rejected(&*d.state()), 2);
    d.send(0, &[1]);
    assert_eq!(d.state().loaned.load(Relaxed), 1, "the device goes on");
}

#[test]
fn oversized_statistics_and_empty_buffers_are_rejected() {
    let m = mem();
    let mut d = start(&m, 1 << F_STATS_VQ);
    d.submit(2, &[(BUF, 40 << 20, false)]);
    d.dev.process_queue(2).unwrap();
    assert_eq!(d.used_idx(2), 1, "returned, not kept");
    assert_eq!(d.state().guest_stats().updates, 0);
    d.submit(0, &[(0x1_0000_0000_0000, 0, false)]);
    d.dev.process_queue(0).unwrap();
    assert_eq!(d.state().rejected_chains.load(Relaxed), 2);
}
