//! The fuzz targets' corpora (fuzz/corpus/<target>/), replayed through the same entry
//! points (`vmm::fuzz`) as regression tests: every input the fuzzer kept, and every
//! crash once fixed (fuzz/corpus/<target>/crash-*), must run clean.
//!
//! `cargo test -p vmm --test fuzz_corpora -- --ignored write_seeds` (re)writes the
//! hand-made seeds: well-formed driver sessions from which the fuzzer starts.

use std::path::{Path, PathBuf};

use vmm::fuzz::{self, Device};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target)
}

type Entry = fn(&[u8]);

const TARGETS: [(&str, Entry); 9] = [
    ("virtio_blk", |d| drop(fuzz::virtio_device(Device::Blk, d))),
    ("virtio_balloon", |d| drop(fuzz::virtio_device(Device::Balloon, d))),
    ("vasi_device", |d| drop(fuzz::virtio_device(Device::Vasi, d))),
    ("virtio_mmio", fuzz::virtio_any),
    ("vasi_records", fuzz::vasi_records),
    ("paging_device", fuzz::paging_device),
    ("elf_image", fuzz::elf_image),
    ("linux_kernel", fuzz::linux_kernel),
    ("config", fuzz::config),
];

#[test]
fn every_corpus_input_runs_clean() {
    for (name, entry) in TARGETS {
        let dir = corpus(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (every target keeps a corpus)", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{}: empty corpus", dir.display());
        for f in &files {
            let data = std::fs::read(f).unwrap();
            if std::panic::catch_unwind(|| entry(&data)).is_err() {
                panic!("{name}: {} fails (replay it with fuzz/target/.../{name} {})", f.display(), f.display());
            }
        }
        eprintln!("{name}: {} inputs", files.len());
    }
}

/// A virtio driver session in the record format of `vmm::fuzz`.
#[derive(Default)]
struct Session(Vec<u8>);

const STATUS: u32 = 0x70;

impl Session {
    fn w32(&mut self, off: u32, v: u32) -> &mut Self {
        self.0.push(1);
        self.0.push((off / 4) as u8);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn r32(&mut self, off: u32) -> &mut Self {
        self.0.extend_from_slice(&[2, (off / 4) as u8]);
        self
    }

    fn patch(&mut self, addr: u16, bytes: &[u8]) -> &mut Self {
        for (k, c) in bytes.chunks(255).enumerate() {
            self.0.push(0);
            self.0.extend_from_slice(&(addr + (k * 255) as u16).to_le_bytes());
            self.0.push(c.len() as u8);
            self.0.extend_from_slice(c);
        }
        self
    }

    /// Reset, negotiate VERSION_1 plus `features` (low word), set up `queues` queues of
    /// 8 entries (queue q: descriptors at desc(q), avail +0x1000, used +0x2000), start.
    fn start(features: u32, queues: u32) -> Session {
        let mut s = Session::default();
        s.w32(STATUS, 0).w32(STATUS, 1).w32(STATUS, 3).r32(0x10);
        s.w32(0x24, 1).w32(0x20, 1).w32(0x24, 0).w32(0x20, features).w32(STATUS, 0xb).r32(STATUS);
        for q in 0..queues {
            let d = desc(q);
            s.w32(0x30, q).r32(0x34).w32(0x38, 8);
            s.w32(0x80, d).w32(0x84, 0).w32(0x90, d + 0x1000).w32(0x94, 0).w32(0xa0, d + 0x2000).w32(0xa4, 0).w32(0x44, 1);
        }
        s.w32(STATUS, 0xf);
        s
    }

    /// Descriptors `(addr, len, device-writable)` chained at the head of queue `q`'s
    /// table, made available as entry `n` of the ring, then notified.
    fn chain(&mut self, q: u32, n: u16, descs: &[(u64, u32, bool)]) -> &mut Self {
        let base = desc(q) as u16 + n * 16 * 4;
        let mut table = Vec::new();
        for (i, &(addr, len, w)) in descs.iter().enumerate() {
            let mut flags = if w { 2u16 } else { 0 };
            if i + 1 < descs.len() {
                flags |= 1;
            }
            table.extend_from_slice(&addr.to_le_bytes());
            table.extend_from_slice(&len.to_le_bytes());
            table.extend_from_slice(&flags.to_le_bytes());
            table.extend_from_slice(&((n * 4 + i as u16 + 1) % 8).to_le_bytes());
        }
        self.patch(base, &table);
        let avail = desc(q) as u16 + 0x1000;
        self.patch(avail + 4 + 2 * n, &(n * 4).to_le_bytes());
        self.patch(avail + 2, &(n + 1).to_le_bytes());
        self.w32(0x50, q)
    }
}

fn desc(q: u32) -> u32 {
    0x1000 + q * 0x3000
}

fn seeds() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    // virtio-blk: read, write, flush, get-id, discard.
    let blk_req = |t: u32, sector: u64| [t.to_le_bytes().as_slice(), &0u32.to_le_bytes(), &sector.to_le_bytes()].concat();
    let mut blk = Vec::new();
    for (t, data_writable) in [(0u32, true), (1, false), (4, false), (8, true)] {
        let mut s = Session::start(0, 1);
        s.patch(0xe000, &blk_req(t, 3));
        s.chain(0, 0, &[(0xe000, 16, false), (0xe100, 512, data_writable), (0xe400, 1, true)]);
        s.r32(0x60).w32(0x64, 1);
        blk.push(s.0);
    }
    let mut s = Session::start(1 << 13, 1);
    s.patch(0xe000, &blk_req(11, 0)).patch(0xe100, &[[0u8; 8].as_slice(), &8u32.to_le_bytes(), &0u32.to_le_bytes()].concat());
    s.chain(0, 0, &[(0xe000, 16, false), (0xe100, 16, false), (0xe400, 1, true)]);
    blk.push(s.0);
    // virtio-balloon: inflate two pages, deflate them, a statistics buffer, a free page report.
    let pfns = [0x40u32, 0x41].iter().flat_map(|p| p.to_le_bytes()).collect::<Vec<_>>();
    let mut s = Session::start((1 << 1) | (1 << 5), 4);
    s.patch(0xe000, &pfns).chain(0, 0, &[(0xe000, 8, false)]).chain(1, 0, &[(0xe000, 8, false)]);
    s.patch(0xe100, &[[1u8, 0].as_slice(), &4096u64.to_le_bytes()].concat()).chain(2, 0, &[(0xe100, 10, false)]);
    s.chain(3, 0, &[(0x8_0000, 0x4000, true)]);
    let mut t = Session::start(0, 2);
    // The driver writes `actual` (configuration offset 4), then inflates.
    t.w32(0x104, 0).patch(0xe000, &pfns).chain(0, 0, &[(0xe000, 8, false)]);
    let balloon = vec![s.0, t.0];
    // VASI: two request buffers (the device hands out queued requests), a completion.
    let mut s = Session::start(0, 2);
    s.chain(0, 0, &[(0xe000, 160, true)]).chain(0, 1, &[(0xe100, 160, true)]);
    let completion = [1u64.to_le_bytes().as_slice(), &0u32.to_le_bytes(), &1u32.to_le_bytes()].concat();
    s.patch(0xe200, &completion).chain(1, 0, &[(0xe200, 16, false)]);
    let vasi = vec![s.0];
    let mmio: Vec<Vec<u8>> = blk.iter().map(|b| [&[0u8][..], b].concat())
        .chain(balloon.iter().map(|b| [&[1u8][..], b].concat()))
        .chain(vasi.iter().map(|b| [&[2u8][..], b].concat()))
        .collect();
    // VASI records: a page-in request, a completion, a configuration.
    let req = paging_server::vasi::Request::new(5, paging_server::vasi::op::PAGE_IN, 1, 2, &[3, 4]).encode().to_vec();
    let cfg = paging_server::vasi::Config { window_gpa: 0x100_0000, window_pages: 64, devices: 2, partition_ids: [0; 15] }.encode().to_vec();
    let records = vec![req, completion.clone(), cfg];
    // A paging device: device size, then a valid header block and a bitmap.
    let h = paging_server::format::Header::new(3, "bravo", 1000);
    let dev = [h.layout.device_bytes.to_le_bytes().as_slice(), &h.encode(), &[0xff, 0x0f, 0, 0x80]].concat();
    // ELF images: the built-in workload and paging server.
    let elfs = vec![vmm::images::workload_elf().to_vec(), vmm::images::paging_server_elf().to_vec()];
    // Kernels: a bzImage setup header and an ELF header (both truncated: the loaders
    // must say so), built by hand.
    let mut bz = vec![0u8; 0x400];
    bz[0x1f1] = 4;
    bz[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
    bz[0x211] = 1;
    let kernels = vec![bz, vmm::images::workload_elf()[..4096].to_vec()];
    // Configs: the examples.
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut configs: Vec<Vec<u8>> = std::fs::read_dir(ex).unwrap().map(|e| std::fs::read(e.unwrap().path()).unwrap()).collect();
    configs.sort();
    vec![
        ("virtio_blk", blk),
        ("virtio_balloon", balloon),
        ("vasi_device", vasi),
        ("virtio_mmio", mmio),
        ("vasi_records", records),
        ("paging_device", vec![dev]),
        ("elf_image", elfs),
        ("linux_kernel", kernels),
        ("config", configs),
    ]
}

#[test]
#[ignore = "writes the seed corpora (run by hand)"]
fn write_seeds() {
    for (name, inputs) in seeds() {
        let dir = corpus(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, data) in inputs.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), data).unwrap();
        }
    }
}

#[test]
fn seeds_run_clean_and_reach_the_devices() {
    for (name, inputs) in seeds() {
        let entry = TARGETS.iter().find(|t| t.0 == name).unwrap().1;
        for data in &inputs {
            entry(data);
        }
    }
    // The driver sessions get their chains used: the fuzzer starts deep in each device.
    use vm_memory::Bytes;
    let used = |mem: &vmm::GuestMemory, q: u32| mem.read_obj::<u16>(vm_memory::GuestAddress(desc(q) as u64 + 0x2002)).unwrap();
    let s = seeds();
    let get = |n: &str| s.iter().find(|t| t.0 == n).unwrap().1.clone();
    for b in get("virtio_blk") {
        assert_eq!(used(&fuzz::virtio_device(Device::Blk, &b), 0), 1, "a blk seed's request was not used");
    }
    let m = fuzz::virtio_device(Device::Balloon, &get("virtio_balloon")[0]);
    assert_eq!((used(&m, 0), used(&m, 1), used(&m, 3)), (1, 1, 1), "balloon inflate, deflate, report");
    let m = fuzz::virtio_device(Device::Vasi, &get("vasi_device")[0]);
    assert_eq!((used(&m, 0), used(&m, 1)), (2, 1), "VASI: two requests handed out, one completion taken");
}
