//! The paging-server image (`guest-images/paging-server`, as `amsvm` embeds it) booted
//! under /dev/kvm and driven through amsvm's own VASI channel: requests go in through
//! [`Channel::call`], data through the transfer window, and everything the image does is
//! checked in the paging-device files byte by byte and in its PROGRESS counters
//! (`docs/vasi.md`, "Counters"). The servers are started by [`PagingServer::start`]
//! (formatting, boot, supervision: a killed server is restarted by the supervisor), and
//! the fatal cases by booting [`server_spec`] directly (the supervisor would restart them).
//!
//! Nothing here depends on timing: every wait polls for a state with a generous limit.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;

use amsvm_abi::{exit, Progress};
use paging_server::vasi::{op, status, Completion, Malformed, Request, MAX_PAGES};

use super::*;
use crate::config::LoanPolicy;
use crate::devices::virtio::vasi::Outcome as CallOutcome;

/// Longest wait for one completion, for a counter to arrive, for a server to come up or
/// end. Far above what any of these takes (milliseconds), so that a loaded machine does
/// not fail the tests; a hang still fails them.
const PATIENCE: Duration = Duration::from_secs(30);
const PAGE: usize = 4096;
/// Slots of the two paging devices: device 0's bitmap has two 4 KiB blocks (slot 32768
/// starts the second), device 1's one.
const SLOTS: [u64; 2] = [40_000, 1_000];
const NAMES: [&str; 2] = ["alpha", "bravo"];

/// A page no other (device, slot, generation) has: every 8-byte word differs.
fn pattern(dev: u32, slot: u32, gen: u32) -> Vec<u8> {
    let mut v = vec![0u8; PAGE];
    for (i, w) in v.chunks_mut(8).enumerate() {
        let x = ((dev as u64) << 56) ^ ((gen as u64) << 40) ^ ((slot as u64) << 16) ^ i as u64 ^ 0x5a5a_0000_0000_0001;
        w.copy_from_slice(&x.to_le_bytes());
    }
    v
}

fn refs(pages: &[Vec<u8>]) -> Vec<&[u8]> {
    pages.iter().map(|p| &p[..]).collect()
}

/// Submit `req` and wait for its completion (at most [`PATIENCE`]).
fn call(ch: &Arc<Channel>, req: Request) -> Completion {
    let (tx, rx) = mpsc::channel();
    let c = ch.clone();
    std::thread::spawn(move || {
        let _ = tx.send(c.call(c.generation(), req));
    });
    match rx.recv_timeout(PATIENCE) {
        Ok(CallOutcome::Done(c)) => c,
        Ok(CallOutcome::Lost) => panic!("{req:?}: lost (the paging server was restarted under it)"),
        Err(_) => panic!("{req:?}: no completion within {PATIENCE:?}"),
    }
}

/// `call`, expecting `(status, count)`; the completion's request id.
fn expect(ch: &Arc<Channel>, req: Request, want: (u32, u32)) -> u64 {
    let c = call(ch, req);
    assert_eq!((c.status, c.count), want, "{req:?} -> {c:?}");
    c.id
}

fn read_window(ch: &Channel, page: u32) -> Vec<u8> {
    let mut b = vec![0u8; PAGE];
    assert!(ch.read_window(ch.generation(), page, &mut b), "the paging server is down");
    b
}

/// Slot `s` of the paging device at `path`, as the file holds it.
fn file_slot(path: &Path, l: &Layout, s: u32) -> Vec<u8> {
    let f = OpenOptions::new().read(true).open(path).unwrap();
    let mut b = vec![0u8; PAGE];
    f.read_exact_at(&mut b, l.slot_offset(s as u64).expect("slot on the device")).unwrap();
    b
}

/// The slot bitmap of the paging device at `path`, as the file holds it.
fn file_bitmap(path: &Path, l: &Layout) -> Vec<u8> {
    let f = OpenOptions::new().read(true).open(path).unwrap();
    let mut b = vec![0u8; l.bitmap_bytes as usize];
    f.read_exact_at(&mut b, l.bitmap_offset).unwrap();
    b
}

fn bit(map: &[u8], s: u32) -> bool {
    map[s as usize / 8] & (1 << (s % 8)) != 0
}

/// The slots whose bits are set.
fn used(map: &[u8]) -> Vec<u32> {
    (0..map.len() as u32 * 8).filter(|&s| bit(map, s)).collect()
}

/// Poll until `f` holds (at most [`PATIENCE`]).
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Wait until the image has reported `want` through PROGRESS (it reports when it goes
/// idle), then compare.
fn expect_progress(m: &PartitionMetrics, want: Progress) {
    let deadline = Instant::now() + PATIENCE;
    while m.progress() != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(m.progress(), want, "the paging server's counters (touched = requests, verified = pages read, written = pages written, verify_failures = refused, disk_blocks_verified = slots freed, disk_failures = failed)");
}

/// Counter `field` of the virtio-blk device of paging device `dev` (its `BlockMetrics`,
/// which the partition's metrics hold only as `dyn DeviceCounters`: read through Debug).
fn blk_counter(m: &PartitionMetrics, dev: usize, field: &str) -> u64 {
    let devices = m.devices.lock().unwrap();
    let blk: Vec<String> = devices.iter().map(|d| format!("{d:?}")).filter(|s| s.starts_with("BlockMetrics")).collect();
    let text = blk.get(dev).unwrap_or_else(|| panic!("no virtio-blk device {dev} in {blk:?}"));
    let at = text.find(&format!(" {field}: ")).unwrap_or_else(|| panic!("no {field} in {text}")) + field.len() + 3;
    text[at..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

fn console(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Two partitions' paging devices (formatted by amsvm) and the paging server serving
/// them, started as `amsvm run` starts it; stopped on drop.
struct Fixture {
    _dir: tempfile::TempDir,
    server: Arc<PagingServer>,
    devices: Vec<PathBuf>,
    layouts: Vec<Layout>,
    log: PathBuf,
}

impl Fixture {
    fn start() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let specs: Vec<PartitionSpec> = (0..2)
            .map(|i| PartitionSpec {
                role: PartitionRole::Guest,
                id: i as u32,
                name: NAMES[i].into(),
                mem_bytes: SLOTS[i] * PAGE as u64,
                min_bytes: 0,
                weight: 1,
                paging_file: Some(dir.path().join(format!("paging/{}.pgdev", NAMES[i]))),
                loan_policy: LoanPolicy::Off,
                vcpus: 1,
                boot: BootConfig::Native { image: None, workload: Default::default() },
                disks: Vec::new(),
                console_stdout: false,
                log_path: Some(dir.path().join(format!("logs/{}.log", NAMES[i]))),
                huge_pages: true,
            })
            .collect();
        let kvm = Kvm::new().expect("/dev/kvm is needed: these tests boot the paging-server image");
        let server = PagingServer::start(&kvm, &specs, &dir.path().join("paging"), Instant::now()).expect("start the paging server");
        let devices: Vec<PathBuf> = specs.iter().map(|s| s.paging_file.clone().unwrap()).collect();
        let layouts: Vec<Layout> = (0..2).map(|i| server.layout(i).unwrap()).collect();
        assert_eq!(layouts, SLOTS.map(Layout::for_slots));
        Fixture { server, devices, layouts, log: dir.path().join("logs/paging-server.log"), _dir: dir }
    }

    fn ch(&self) -> &Arc<Channel> {
        &self.server.channel
    }

    fn slot(&self, dev: usize, s: u32) -> Vec<u8> {
        file_slot(&self.devices[dev], &self.layouts[dev], s)
    }

    fn bitmap(&self, dev: usize) -> Vec<u8> {
        file_bitmap(&self.devices[dev], &self.layouts[dev])
    }

    /// Write `pages` into the window from `window_page` and page them out to `slots`.
    fn page_out(&self, dev: u32, window_page: u32, slots: &[u32], pages: &[Vec<u8>]) -> u64 {
        assert!(self.ch().write_window(self.ch().generation(), window_page, &refs(pages)), "the paging server is down");
        expect(self.ch(), Request::new(0, op::PAGE_OUT, dev, window_page, slots), (status::OK, slots.len() as u32))
    }

    /// Page `slots` in to the window from `window_page` and compare with `want`.
    fn page_in(&self, dev: u32, window_page: u32, slots: &[u32], want: &[Vec<u8>]) {
        expect(self.ch(), Request::new(0, op::PAGE_IN, dev, window_page, slots), (status::OK, slots.len() as u32));
        for (k, &s) in slots.iter().enumerate() {
            assert!(read_window(self.ch(), window_page + k as u32) == want[k], "device {dev} slot {s}: page-in into window page {} differs", window_page + k as u32);
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.server.stop();
    }
}

#[test]
fn page_out_page_in_discard_and_flush_reach_the_paging_device_files() {
    let fx = Fixture::start();
    let (d0, d1) = (0usize, 1usize);
    // PAGE_OUT to device 0: two runs, the second across the bitmap blocks 0 and 1.
    let slots0: Vec<u32> = (100..116).chain(32_760..32_776).collect();
    assert_eq!(slots0.len(), MAX_PAGES);
    let pages0: Vec<Vec<u8>> = slots0.iter().map(|&s| pattern(0, s, 1)).collect();
    fx.page_out(0, 0, &slots0, &pages0);
    for (k, &s) in slots0.iter().enumerate() {
        assert!(fx.slot(d0, s) == pages0[k], "device 0 slot {s} in the file");
    }
    let map = fx.bitmap(d0);
    assert_eq!(used(&map), slots0, "device 0's bitmap in the file: exactly the slots paged out");
    assert!(fx.slot(d0, 99).iter().all(|&b| b == 0) && fx.slot(d0, 116).iter().all(|&b| b == 0), "neighbours untouched");
    assert!(used(&fx.bitmap(d1)).is_empty(), "device 1 untouched");

    // PAGE_OUT to device 1: descending slots (five runs of one), from window page 40.
    let slots1 = [5u32, 4, 3, 2, 1];
    let pages1: Vec<Vec<u8>> = slots1.iter().map(|&s| pattern(1, s, 1)).collect();
    fx.page_out(1, 40, &slots1, &pages1);
    for (k, &s) in slots1.iter().enumerate() {
        assert!(fx.slot(d1, s) == pages1[k], "device 1 slot {s} in the file");
    }
    assert_eq!(used(&fx.bitmap(d1)), vec![1, 2, 3, 4, 5]);
    assert_eq!(used(&fx.bitmap(d0)), slots0, "device 0 untouched by device 1's page-out");

    // PAGE_IN in another order, into other window pages (the last one included).
    let back: Vec<u32> = slots0.iter().rev().copied().collect();
    let want: Vec<Vec<u8>> = back.iter().map(|&s| pattern(0, s, 1)).collect();
    fx.page_in(0, 100, &back, &want);
    fx.page_in(1, WINDOW_PAGES - 1, &[3], &[pattern(1, 3, 1)]);

    // PAGE_OUT over a used slot: new data, same bitmap.
    fx.page_out(0, 7, &[100], &[pattern(0, 100, 2)]);
    assert!(fx.slot(d0, 100) == pattern(0, 100, 2), "slot 100 rewritten");
    assert_eq!(used(&fx.bitmap(d0)), slots0);
    fx.page_in(0, 8, &[100], &[pattern(0, 100, 2)]);

    // DISCARD: four used slots and a free one (accepted, stays free); the window page is
    // not used by DISCARD, so any value goes.
    let discards = blk_counter(&fx.server.metrics, d0, "discards");
    expect(fx.ch(), Request::new(0, op::DISCARD, 0, u32::MAX, &[100, 101, 102, 103, 7]), (status::OK, 5));
    let map = fx.bitmap(d0);
    let kept: Vec<u32> = slots0.iter().copied().filter(|s| !(100..104).contains(s)).collect();
    assert_eq!(used(&map), kept, "device 0's bitmap after the discard");
    assert!(blk_counter(&fx.server.metrics, d0, "discards") > discards, "the data was discarded on the device");
    if blk_counter(&fx.server.metrics, d0, "discard_unsupported_by_host") == 0 {
        for s in 100..104 {
            assert!(fx.slot(d0, s).iter().all(|&b| b == 0), "slot {s}: discarded data reads as zeros");
        }
    }
    assert!(fx.slot(d0, 104) == pattern(0, 104, 1), "slot 104 kept");

    // FLUSH: a virtio-blk FLUSH of that device only.
    let flushes = [blk_counter(&fx.server.metrics, d0, "flushes"), blk_counter(&fx.server.metrics, d1, "flushes")];
    expect(fx.ch(), Request::new(0, op::FLUSH, 1, 0, &[]), (status::OK, 0));
    assert_eq!(
        [blk_counter(&fx.server.metrics, d0, "flushes"), blk_counter(&fx.server.metrics, d1, "flushes")],
        [flushes[0], flushes[1] + 1]
    );

    // The edges: the device's last 32 slots from the window's last 32 pages.
    let last: Vec<u32> = (SLOTS[0] as u32 - 32..SLOTS[0] as u32).collect();
    let pages_last: Vec<Vec<u8>> = last.iter().map(|&s| pattern(0, s, 1)).collect();
    fx.page_out(0, WINDOW_PAGES - 32, &last, &pages_last);
    for (k, &s) in last.iter().enumerate() {
        assert!(fx.slot(d0, s) == pages_last[k], "device 0 slot {s} in the file");
    }
    fx.page_in(0, 0, &last, &pages_last);
    let mut want_used = kept.clone();
    want_used.extend(&last);
    assert_eq!(used(&fx.bitmap(d0)), want_used);

    // Everything the devices hold, once more, through the files.
    for (k, &s) in slots0.iter().enumerate().filter(|(_, s)| !(100..104).contains(*s)) {
        assert!(fx.slot(d0, s) == pages0[k], "device 0 slot {s} at the end");
    }
    for (k, &s) in slots1.iter().enumerate() {
        assert!(fx.slot(d1, s) == pages1[k], "device 1 slot {s} at the end");
    }

    // 10 requests: 32 + 5 + 1 + 32 pages written, 32 + 1 + 1 + 32 read, 5 slots freed.
    expect_progress(
        &fx.server.metrics,
        Progress { pages_touched: 10, pages_written: 70, pages_verified: 66, verify_failures: 0, disk_blocks_verified: 5, disk_failures: 0 },
    );
    let m = &fx.ch().metrics;
    assert_eq!((m.requests.load(Relaxed), m.completions.load(Relaxed), m.refused_by_server.load(Relaxed), m.io_errors.load(Relaxed), m.rejected.load(Relaxed)), (10, 10, 0, 0, 0));
    assert_eq!(fx.server.metrics.rejected(), 0, "nothing the paging server did was rejected by amsvm's devices");
    let text = console(&fx.log);
    let start = format!("paging-server: window {WINDOW_PAGES} pages at {WINDOW_GPA:#x}, 16 request buffers, 2 devices (used/slots 0/40000 0/1000)\n");
    assert!(text.starts_with(&start), "{text}");
    assert_eq!(text.lines().count(), 1, "nothing but the start line: {text}");
}

#[test]
fn every_malformed_request_is_answered_bad_request_counted_and_not_carried_out() {
    let fx = Fixture::start();
    // Device 0 holds slots 100..=104 but 101 (discarded); device 1 holds slot 5.
    fx.page_out(0, 0, &[100, 101, 102, 103, 104], &(100..105).map(|s| pattern(0, s, 1)).collect::<Vec<_>>());
    fx.page_out(1, 0, &[5], &[pattern(1, 5, 1)]);
    expect(fx.ch(), Request::new(0, op::DISCARD, 0, 0, &[101]), (status::OK, 1));
    let maps = [fx.bitmap(0), fx.bitmap(1)];
    assert_eq!(used(&maps[0]), vec![100, 102, 103, 104]);
    // Every window page gets a marker: a refused PAGE_IN must not touch it.
    let marker: Vec<Vec<u8>> = (0..WINDOW_PAGES).map(|w| pattern(9, w, 9)).collect();
    assert!(fx.ch().write_window(fx.ch().generation(), 0, &refs(&marker)));

    let with_count = |mut r: Request, n: u32| {
        r.count = n;
        r
    };
    let bad: Vec<(Request, Malformed)> = vec![
        (Request::new(0, 9, 0, 0, &[1]), Malformed::UnknownOp(9)),
        (Request::new(0, 0, 0, 0, &[1]), Malformed::UnknownOp(0)),
        (Request::new(0, op::PAGE_OUT, 2, 0, &[1]), Malformed::NoSuchDevice(2)),
        (Request::new(0, op::PAGE_IN, 2, 0, &[5]), Malformed::NoSuchDevice(2)),
        (Request::new(0, op::DISCARD, 15, 0, &[5]), Malformed::NoSuchDevice(15)),
        (Request::new(0, op::FLUSH, 2, 0, &[]), Malformed::NoSuchDevice(2)),
        (Request::new(0, op::PAGE_OUT, 0, 0, &[]), Malformed::BadCount(0)),
        (Request::new(0, op::PAGE_IN, 0, 0, &[]), Malformed::BadCount(0)),
        (Request::new(0, op::DISCARD, 0, 0, &[]), Malformed::BadCount(0)),
        (with_count(Request::new(0, op::PAGE_OUT, 0, 0, &[1]), 33), Malformed::BadCount(33)),
        (with_count(Request::new(0, op::FLUSH, 0, 0, &[]), 1), Malformed::BadCount(1)),
        (Request::new(0, op::PAGE_OUT, 0, WINDOW_PAGES - 1, &[1, 2]), Malformed::OutsideWindow),
        (Request::new(0, op::PAGE_OUT, 0, WINDOW_PAGES, &[1]), Malformed::OutsideWindow),
        (Request::new(0, op::PAGE_IN, 0, u32::MAX, &[104]), Malformed::OutsideWindow),
        (Request::new(0, op::PAGE_OUT, 0, 0, &[1, 40_000]), Malformed::SlotOutOfRange(40_000)),
        // Device 1 is smaller: a slot device 0 has is out of range there.
        (Request::new(0, op::PAGE_OUT, 1, 0, &[1_000]), Malformed::SlotOutOfRange(1_000)),
        (Request::new(0, op::PAGE_IN, 1, 0, &[5, 1_000]), Malformed::SlotOutOfRange(1_000)),
        (Request::new(0, op::DISCARD, 0, 0, &[u32::MAX]), Malformed::SlotOutOfRange(u32::MAX)),
        (Request::new(0, op::PAGE_OUT, 0, 0, &[9, 8, 9]), Malformed::DuplicateSlot(9)),
        (Request::new(0, op::PAGE_IN, 0, 0, &[104, 104]), Malformed::DuplicateSlot(104)),
        (Request::new(0, op::DISCARD, 1, 0, &[5, 5]), Malformed::DuplicateSlot(5)),
        (Request::new(0, op::PAGE_IN, 1, 0, &[6]), Malformed::SlotNotInUse(6)),
        (Request::new(0, op::PAGE_IN, 0, 0, &[101]), Malformed::SlotNotInUse(101)),
        (Request::new(0, op::PAGE_IN, 0, 0, &[104, 105]), Malformed::SlotNotInUse(105)),
        // Device 0 holds slot 100, device 1 does not.
        (Request::new(0, op::PAGE_IN, 1, 0, &[100]), Malformed::SlotNotInUse(100)),
    ];
    let mut ids = Vec::new();
    for (r, why) in &bad {
        // `why`: what the image's console line names (checked below for the first four).
        let id = expect(fx.ch(), *r, (status::BAD_REQUEST, 0));
        ids.push((id, why));
    }

    // Nothing was carried out: bitmaps, the slots the refused page-outs named, the
    // window (refused page-ins), the data of the slots refused discards named.
    assert_eq!([fx.bitmap(0), fx.bitmap(1)], maps, "bitmaps unchanged");
    for s in [1u32, 2, 8, 9] {
        assert!(fx.slot(0, s).iter().all(|&b| b == 0), "device 0 slot {s} never written");
    }
    assert!(fx.slot(1, 5) == pattern(1, 5, 1), "device 1 slot 5 kept");
    for w in 0..WINDOW_PAGES {
        assert!(read_window(fx.ch(), w) == marker[w as usize], "window page {w} changed by a refused request");
    }
    // The device still serves good requests.
    fx.page_in(1, 0, &[5], &[pattern(1, 5, 1)]);

    // 3 + 25 + 1 requests; 6 pages written, 1 read, 1 freed; 25 refused.
    let n = bad.len() as u64;
    assert_eq!(n, 25);
    expect_progress(
        &fx.server.metrics,
        Progress { pages_touched: 3 + n + 1, pages_written: 6, pages_verified: 1, verify_failures: n, disk_blocks_verified: 1, disk_failures: 0 },
    );
    let m = &fx.ch().metrics;
    assert_eq!((m.refused_by_server.load(Relaxed), m.io_errors.load(Relaxed), m.rejected.load(Relaxed)), (n, 0, 0));

    // The console names the first four, the fourth saying the rest are only counted.
    let text = console(&fx.log);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    for (k, (id, why)) in ids.iter().take(4).enumerate() {
        let more = if k == 3 { " (further ones are only counted)" } else { "" };
        assert_eq!(lines[1 + k], format!("paging-server: request {id} rejected: {why:?}{more}"));
    }
}

#[test]
fn an_io_error_is_answered_io_error_and_counted_and_the_device_keeps_working() {
    let fx = Fixture::start();
    fx.page_out(1, 0, &[3, 4], &[pattern(1, 3, 1), pattern(1, 4, 1)]);
    // Device 1's data area cut off: reading slot 3 fails on the host.
    let l = fx.layouts[1];
    OpenOptions::new().write(true).open(&fx.devices[1]).unwrap().set_len(l.data_offset).unwrap();
    let failed = expect(fx.ch(), Request::new(0, op::PAGE_IN, 1, 0, &[3]), (status::IO_ERROR, 0));
    assert!(blk_counter(&fx.server.metrics, 1, "io_errors") >= 1, "the host read failed");
    // Device 0 is not affected; device 1 takes a page-out (the file grows again) and
    // reads it back.
    fx.page_out(0, 0, &[7], &[pattern(0, 7, 1)]);
    fx.page_out(1, 1, &[3], &[pattern(1, 3, 5)]);
    assert!(fx.slot(1, 3) == pattern(1, 3, 5));
    fx.page_in(1, 9, &[3], &[pattern(1, 3, 5)]);
    fx.page_in(0, 10, &[7], &[pattern(0, 7, 1)]);
    OpenOptions::new().write(true).open(&fx.devices[1]).unwrap().set_len(l.device_bytes).unwrap();

    expect_progress(
        &fx.server.metrics,
        Progress { pages_touched: 6, pages_written: 4, pages_verified: 2, verify_failures: 0, disk_blocks_verified: 0, disk_failures: 1 },
    );
    let m = &fx.ch().metrics;
    assert_eq!((m.refused_by_server.load(Relaxed), m.io_errors.load(Relaxed), m.rejected.load(Relaxed)), (0, 1, 0));
    let text = console(&fx.log);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[1].starts_with(&format!("paging-server: device 1: request {failed} (op 2) failed: ")), "{text}");
    assert!(!text.contains("given up"), "{text}");
}

#[test]
fn a_restarted_paging_server_finds_the_slots_and_data_it_stored() {
    let fx = Fixture::start();
    let slots0: Vec<u32> = (32_750..32_782).collect();
    let pages0: Vec<Vec<u8>> = slots0.iter().map(|&s| pattern(0, s, 1)).collect();
    fx.page_out(0, 0, &slots0, &pages0);
    fx.page_out(1, 32, &[999, 0], &[pattern(1, 999, 1), pattern(1, 0, 1)]);
    expect(fx.ch(), Request::new(0, op::DISCARD, 0, 0, &[32_767, 32_768]), (status::OK, 2));
    expect(fx.ch(), Request::new(0, op::FLUSH, 0, 0, &[]), (status::OK, 0));
    expect(fx.ch(), Request::new(0, op::FLUSH, 1, 0, &[]), (status::OK, 0));
    expect_progress(
        &fx.server.metrics,
        Progress { pages_touched: 5, pages_written: 34, pages_verified: 0, verify_failures: 0, disk_blocks_verified: 2, disk_failures: 0 },
    );
    let kept: Vec<u32> = slots0.iter().copied().filter(|&s| s != 32_767 && s != 32_768).collect();
    assert_eq!(used(&fx.bitmap(0)), kept);
    assert_eq!(used(&fx.bitmap(1)), vec![0, 999]);

    // Killed; the supervisor boots a new one, which reads the headers and bitmaps.
    assert_eq!(fx.server.starts.load(Relaxed), 1);
    fx.server.kill("killed by the test");
    wait_for("the paging server's restart", || fx.server.starts.load(Relaxed) >= 2);
    assert_eq!(fx.ch().metrics.restarts.load(Relaxed), 1);
    // Its first PROGRESS (zeros) replaces the first server's counters.
    expect_progress(&fx.server.metrics, Progress::default());

    // Everything it stored is there, in any order; what was discarded is free.
    let back: Vec<u32> = kept.iter().rev().copied().collect();
    let want: Vec<Vec<u8>> = back.iter().map(|&s| pattern(0, s, 1)).collect();
    fx.page_in(0, 200, &back, &want);
    fx.page_in(1, 0, &[0, 999], &[pattern(1, 0, 1), pattern(1, 999, 1)]);
    expect(fx.ch(), Request::new(0, op::PAGE_IN, 0, 0, &[32_767]), (status::BAD_REQUEST, 0));
    expect(fx.ch(), Request::new(0, op::PAGE_IN, 0, 0, &[32_768]), (status::BAD_REQUEST, 0));
    // And it goes on: a discarded slot is used again.
    fx.page_out(0, 0, &[32_768], &[pattern(0, 32_768, 2)]);
    assert!(fx.slot(0, 32_768) == pattern(0, 32_768, 2));
    assert_eq!(used(&fx.bitmap(0)).len(), kept.len() + 1);

    expect_progress(
        &fx.server.metrics,
        Progress { pages_touched: 5, pages_written: 1, pages_verified: 32, verify_failures: 2, disk_blocks_verified: 0, disk_failures: 0 },
    );
    // The console is the new server's: it counted the slots in use from the bitmaps.
    let text = console(&fx.log);
    let start = format!("paging-server: window {WINDOW_PAGES} pages at {WINDOW_GPA:#x}, 16 request buffers, 2 devices (used/slots 30/40000 2/1000)\n");
    assert!(text.starts_with(&start), "{text}");
}

#[test]
fn concurrent_callers_each_get_their_own_pages() {
    let fx = Fixture::start();
    const THREADS: u32 = 8;
    const ROUNDS: u32 = 40;
    std::thread::scope(|sc| {
        for th in 0..THREADS {
            let ch = fx.ch().clone();
            sc.spawn(move || {
                for i in 0..ROUNDS {
                    // 1 to 4 pages, in window pages of the channel's allocator.
                    let n = 1 + (th + i) % 4;
                    let first = 20_000 + (th * ROUNDS + i) * 4;
                    let slots: Vec<u32> = (first..first + n).collect();
                    let pages: Vec<Vec<u8>> = slots.iter().map(|&s| pattern(0, s, 3)).collect();
                    let w = ch.take_window(n);
                    assert!(ch.write_window(ch.generation(), w, &refs(&pages)));
                    expect(&ch, Request::new(0, op::PAGE_OUT, 0, w, &slots), (status::OK, n));
                    // Clobber the window so that the page-in has to bring the data back.
                    let zero = vec![vec![0u8; PAGE]; n as usize];
                    assert!(ch.write_window(ch.generation(), w, &refs(&zero)));
                    expect(&ch, Request::new(0, op::PAGE_IN, 0, w, &slots), (status::OK, n));
                    for k in 0..n {
                        assert!(read_window(&ch, w + k) == pages[k as usize], "thread {th} round {i}: slot {}", slots[k as usize]);
                    }
                    ch.give_window(w, n);
                }
            });
        }
    });
    let mut pages = 0;
    let mut all = Vec::new();
    for th in 0..THREADS {
        for i in 0..ROUNDS {
            let n = 1 + (th + i) % 4;
            let first = 20_000 + (th * ROUNDS + i) * 4;
            for s in first..first + n {
                assert!(fx.slot(0, s) == pattern(0, s, 3), "slot {s} in the file");
                all.push(s);
            }
            pages += n as u64;
        }
    }
    all.sort_unstable();
    assert_eq!(used(&fx.bitmap(0)), all);
    let requests = (THREADS * ROUNDS * 2) as u64;
    expect_progress(
        &fx.server.metrics,
        Progress { pages_touched: requests, pages_written: pages, pages_verified: pages, verify_failures: 0, disk_blocks_verified: 0, disk_failures: 0 },
    );
    assert_eq!(fx.ch().metrics.completions.load(Relaxed), requests);
}

/// Boot the paging-server VM on `channel` and `devices` (no supervisor) and wait for it
/// to end on its own: its outcome and console.
fn boot_until_exit(dir: &Path, name: &str, channel: Arc<Channel>, devices: &[PathBuf]) -> (Outcome, String) {
    let kvm = Kvm::new().expect("/dev/kvm is needed: these tests boot the paging-server image");
    let log = dir.join(format!("{name}.log"));
    let spec = server_spec(&channel, devices, Some(log.clone()));
    let p = Partition::build(&kvm, &spec, Shared::new(&spec.name, Arc::default(), Instant::now()), &[], None).expect("build the paging server");
    let running = p.start().expect("start the paging server");
    let shared = running.shared.clone();
    let deadline = Instant::now() + PATIENCE;
    while shared.outcome().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    shared.finish(Outcome::Stopped); // only if it did not end by itself
    let o = running.wait();
    channel.detach_server();
    (o, console(&log))
}

#[test]
fn a_device_of_another_partition_or_a_bad_one_stops_the_image_with_bad_config_and_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let ch = |ids: &[u32]| Channel::new(WINDOW_GPA, WINDOW_PAGES, ids);
    format_device(&d("alpha.pgdev"), 0, "alpha", 100).unwrap();
    format_device(&d("zulu.pgdev"), 7, "zulu", 100).unwrap();
    std::fs::write(d("blank.img"), vec![0u8; 64 << 10]).unwrap();
    std::fs::write(d("junk.img"), vec![0x41u8; 64 << 10]).unwrap();
    format_device(&d("badsum.pgdev"), 0, "alpha", 100).unwrap();
    OpenOptions::new().write(true).open(d("badsum.pgdev")).unwrap().write_all_at(&[0xff], 60).unwrap();
    format_device(&d("short.pgdev"), 0, "alpha", 100).unwrap();
    let full = Layout::for_slots(100).device_bytes;
    OpenOptions::new().write(true).open(d("short.pgdev")).unwrap().set_len(full - 4096).unwrap();
    // Bitmaps that do not fit the paging server's RAM: 200 Mi slots (25 MiB of bitmap).
    // Sparse: only the header is written.
    let huge = paging_server::format::Header::new(0, "alpha", 200 << 20);
    let f = std::fs::File::create(d("huge.pgdev")).unwrap();
    f.set_len(huge.layout.device_bytes).unwrap();
    f.write_all_at(&huge.encode(), 0).unwrap();
    let need_kib = paging_server::plan::work_pages([200u64 << 20]) * 4;
    let window = |gpa: u64, pages: u32| vec![format!("transfer window of {pages} pages at {gpa:#x}: must be page aligned, not empty, ")];
    let one = |line: &str| vec![line.to_string()];

    // (what, channel, devices, the console line: it starts with the first fragment and
    // holds the others).
    type Case<'a> = (&'a str, Arc<Channel>, Vec<PathBuf>, Vec<String>);
    let cases: Vec<Case> = vec![
        ("another partition's", ch(&[3]), vec![d("zulu.pgdev")], one("device 0: belongs to partition 7 \"zulu\", not to partition 3")),
        ("the second device another's", ch(&[0, 3]), vec![d("alpha.pgdev"), d("zulu.pgdev")], one("device 1: belongs to partition 7 \"zulu\", not to partition 3")),
        ("partition 0's given to partition 1", ch(&[0, 1]), vec![d("alpha.pgdev"), d("alpha.pgdev")], one("device 1: belongs to partition 0 \"alpha\", not to partition 1")),
        ("blank", ch(&[0]), vec![d("blank.img")], one("device 0: blank, not formatted as a paging device")),
        ("not a paging device", ch(&[0]), vec![d("junk.img")], one("device 0: not an amsvm paging device (no AMSVMPG1 header)")),
        ("bad checksum", ch(&[0]), vec![d("badsum.pgdev")], one("device 0: paging-device header checksum is wrong")),
        ("truncated", ch(&[0]), vec![d("short.pgdev")], one(&format!("device 0: device has {} bytes, its header says {full}", full - 4096))),
        (
            "fewer devices than the channel names",
            ch(&[0, 1]),
            vec![d("alpha.pgdev")],
            one("VASI configuration names 2 paging devices, the boot-info page lists 1 virtio-blk devices"),
        ),
        (
            "bitmaps too large",
            ch(&[0]),
            vec![d("huge.pgdev")],
            vec![format!("needs {need_kib} KiB of RAM from 0x"), format!(" to the window at {WINDOW_GPA:#x} for queues and slot bitmaps, has ")],
        ),
        ("window past RAM", Channel::new(SERVER_MEM_BYTES - 4096, 2, &[0]), vec![d("alpha.pgdev")], window(SERVER_MEM_BYTES - 4096, 2)),
        ("window not aligned", Channel::new(WINDOW_GPA + 1, 2, &[0]), vec![d("alpha.pgdev")], window(WINDOW_GPA + 1, 2)),
        ("window over the image", Channel::new(0x20_0000, 2, &[0]), vec![d("alpha.pgdev")], window(0x20_0000, 2)),
        ("empty window", Channel::new(WINDOW_GPA, 0, &[0]), vec![d("alpha.pgdev")], window(WINDOW_GPA, 0)),
    ];
    for (k, (what, channel, devices, line)) in cases.into_iter().enumerate() {
        let (outcome, text) = boot_until_exit(dir.path(), &format!("case{k}"), channel, &devices);
        assert_eq!(outcome, Outcome::Exited(exit::BAD_CONFIG), "{what}: {text}");
        assert_eq!(text.lines().count(), 1, "{what}: one console line: {text}");
        assert!(text.starts_with(&format!("paging-server: {}", line[0])), "{what}: {text:?} does not start with {:?}", line[0]);
        for f in &line[1..] {
            assert!(text.contains(f.as_str()), "{what}: {text:?} lacks {f:?}");
        }
    }
    // The devices were only read.
    let l = Layout::for_slots(100);
    assert!(file_bitmap(&d("zulu.pgdev"), &l).iter().all(|&b| b == 0));
    let mut h = vec![0u8; 4096];
    std::fs::File::open(d("zulu.pgdev")).unwrap().read_exact_at(&mut h, 0).unwrap();
    assert_eq!(h, paging_server::format::Header::new(7, "zulu", 100).encode().to_vec());
}
