//! Entry points of the fuzz targets (`fuzz/`, libFuzzer) and of their corpora's replay
//! in the tests: each feeds bytes to amsvm's real code paths — the ones a guest or a
//! file reaches — and checks invariants beyond "no panic".
//!
//! The virtio targets drive a device through its virtio-mmio transport. Their input is
//! a list of records, each starting with a tag byte:
//! - `tag % 4 == 0`: patch guest memory: offset (le16), length (u8), the bytes;
//! - `tag % 4 == 1`: write a 32-bit transport register: offset / 4 (u8), value (le32);
//! - `tag % 4 == 2`: read a 32-bit transport register: offset / 4 (u8);
//! - `tag % 4 == 3`: device configuration byte: offset (u8), value (u8); written when
//!   `tag & 4`, else read.
//!
//! Queue notifications are processed inline, as the paging server's are. Guest memory
//! is [`GUEST_MEM`] bytes from address 0; anything a guest names outside it must be
//! rejected (vm-memory checks every access, and the invariants below check what the
//! devices hand the host).

use std::io::{Seek, Write};
use std::os::fd::FromRawFd;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::balloon::{Discard, VirtioBalloon};
use crate::devices::virtio::blk::VirtioBlock;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::vasi::{Channel, VasiDevice};
use crate::devices::virtio::VirtioDevice;
use crate::devices::BusDevice;
use crate::GuestMemory;

/// Guest memory of the virtio targets.
pub const GUEST_MEM: u64 = 1 << 20;
/// Size of the virtio-blk target's disk.
const DISK_BYTES: u64 = 64 << 10;
/// Most records one input may hold.
const MAX_RECORDS: usize = 1024;

/// Which device sits behind the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Blk,
    Balloon,
    Vasi,
}

/// An anonymous file (memfd) of `len` bytes, opened as a path the device can open.
fn memfd(len: u64) -> (std::fs::File, std::path::PathBuf) {
    // SAFETY: a NUL-terminated name and valid flags; the fd is checked below.
    let fd = unsafe { libc::memfd_create(c"amsvm-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: fd is a new descriptor that nothing else owns.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(len).expect("sizing the memfd");
    let path = std::path::PathBuf::from(format!("/proc/self/fd/{fd}"));
    (f, path)
}

/// Records the balloon's discards; every one must lie inside guest memory.
struct CheckedDiscard(Mutex<u64>);

impl Discard for CheckedDiscard {
    fn discard(&self, gpa: u64, len: u64) -> u64 {
        assert!(gpa.checked_add(len).is_some_and(|end| end <= GUEST_MEM), "balloon discarded [{gpa:#x}, +{len:#x}) outside guest memory");
        assert!(gpa.is_multiple_of(4096) && len.is_multiple_of(4096), "balloon discarded an unaligned range {gpa:#x}+{len:#x}");
        *self.0.lock().unwrap() += len;
        len >> 12
    }
}

/// Drive `dev` with the records in `data` (see the module doc); the guest memory
/// afterwards.
pub fn virtio_device(dev: Device, data: &[u8]) -> GuestMemory {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), GUEST_MEM as usize)]).expect("guest memory");
    let mut disk = None;
    let discards = Arc::new(CheckedDiscard(Mutex::new(0)));
    let channel = Channel::new(0xf_0000, 16, &[7, 9]);
    let device: Box<dyn VirtioDevice> = match dev {
        Device::Blk => {
            let (f, path) = memfd(DISK_BYTES);
            let d = VirtioBlock::new(&path, false, "fuzz").expect("a virtio-blk device on a memfd");
            disk = Some(f);
            Box::new(d)
        }
        Device::Balloon => Box::new(VirtioBalloon::new(GUEST_MEM, discards.clone())),
        Device::Vasi => {
            channel.attach_memory(mem.clone());
            // Requests waiting for buffers, so that the device hands some out.
            for i in 0..4u64 {
                channel.queue_request(paging_server::vasi::Request::new(0, 2, (i % 2) as u32, i as u32, &[i as u32]));
            }
            Box::new(VasiDevice::new(channel.clone()))
        }
    };
    let mut t = MmioTransport::detached(device, mem.clone()).expect("a transport");
    let mut rest = data;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (a, b) = (rest.get(..n)?, rest.get(n..)?);
        rest = b;
        Some(a)
    };
    for _ in 0..MAX_RECORDS {
        let Some(&[tag]) = take(1) else { break };
        match tag % 4 {
            0 => {
                let Some(h) = take(3) else { break };
                let (off, len) = (u16::from_le_bytes([h[0], h[1]]) as u64, h[2] as usize);
                let Some(bytes) = take(len) else { break };
                mem.write_slice(bytes, GuestAddress(off)).expect("patch inside guest memory");
            }
            1 => {
                let Some(r) = take(5) else { break };
                t.write(r[0] as u64 * 4, &r[1..5]);
            }
            2 => {
                let Some(r) = take(1) else { break };
                let mut v = [0u8; 4];
                t.read(r[0] as u64 * 4, &mut v);
            }
            _ => {
                let Some(r) = take(2) else { break };
                if tag & 4 != 0 {
                    t.write(0x100 + r[0] as u64, &r[1..2]);
                } else {
                    let mut v = [0u8; 1];
                    t.read(0x100 + r[0] as u64, &mut v);
                }
            }
        }
    }
    if let Some(mut f) = disk {
        // The device never writes past its capacity.
        let len = f.seek(std::io::SeekFrom::End(0)).expect("disk size");
        assert_eq!(len, DISK_BYTES, "virtio-blk changed the size of its disk");
        let _ = f.flush();
    }
    let freed = *discards.0.lock().unwrap();
    assert!(freed <= GUEST_MEM * MAX_RECORDS as u64, "balloon freed {freed} bytes");
    assert!(channel.metrics.completions.load(Relaxed) <= 4, "more completions than requests");
    mem
}

/// VASI records as both sides decode them: requests (the paging server's checks) and
/// completions and the configuration (amsvm's). What decodes must encode back to the
/// same bytes, and what passes the checks must stay inside the window and the devices.
pub fn vasi_records(data: &[u8]) {
    use paging_server::vasi::{Completion, Config, Request, COMPLETION_BYTES, REQUEST_BYTES};
    if let Ok(r) = Request::decode(data) {
        assert_eq!(Request::decode(&r.encode()).ok(), Some(r), "request round trip");
        let slots = |d: u32| 1000 + d as u64;
        if r.check(3, 64, slots, |_| true).is_ok() {
            assert!(r.device < 3, "checked request names device {}", r.device);
            assert!(r.slots().iter().all(|&s| (s as u64) < slots(r.device)), "checked request names a slot past the device");
            if matches!(r.op, paging_server::vasi::op::PAGE_IN | paging_server::vasi::op::PAGE_OUT) {
                assert!(r.window_page as u64 + r.count as u64 <= 64, "checked request leaves the window");
            }
        }
    }
    if data.len() >= REQUEST_BYTES {
        let _ = Completion::decode(&data[REQUEST_BYTES..]);
    }
    if let Ok(c) = Completion::decode(data) {
        assert_eq!(&c.encode()[..], &data[..COMPLETION_BYTES], "completion round trip");
    }
    if let Some(c) = Config::decode(data) {
        assert_eq!(Config::decode(&c.encode()), Some(c), "config round trip");
    }
}

/// A paging device's header block and slot bitmap, as the paging server reads them.
pub fn paging_device(data: &[u8]) {
    use paging_server::format::Header;
    let device_bytes = data.get(..8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap())) % (1 << 40);
    let block = data.get(8..).unwrap_or(&[]);
    if let Ok(h) = Header::decode(block, device_bytes) {
        // A header that decodes describes a layout inside the device.
        let l = h.layout;
        assert!(l.slot_offset(l.slots.saturating_sub(1)).is_none_or(|o| o + 4096 <= device_bytes), "slots past the end of the device: {l:?}");
        assert!(l.bitmap_offset + l.bitmap_bytes <= l.data_offset, "bitmap overlaps the data: {l:?}");
        assert!(Header::decode_for(block, device_bytes, h.partition_id.wrapping_add(1)).is_err(), "another partition's header accepted");
    }
    let bits = block.len() as u64 * 8;
    let n = paging_server::bitmap::count(block, bits);
    assert!(n <= bits);
}

/// A native image as `amsvm run` checks and loads it.
pub fn elf_image(data: &[u8]) {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("guest memory");
    if let Ok(img) = crate::kvm::native::load_elf(&mem, Path::new("fuzz.elf"), data) {
        assert!(img.entry >= amsvm_abi::layout::IMAGE_MIN && img.end <= 8 << 20, "loaded image outside its room: {img:?}");
    }
}

/// A Linux kernel (bzImage or ELF vmlinux) as `amsvm boot` loads it.
pub fn linux_kernel(data: &[u8]) {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("guest memory");
    let (mut f, path) = memfd(0);
    f.write_all(data).expect("writing the memfd");
    f.rewind().expect("rewinding the memfd");
    let _ = crate::kvm::linux::load_kernel_from(&mem, &path, f, 64 << 20);
}

/// A configuration file.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = crate::config::Config::from_text(&text, Path::new("fuzz.toml"), Path::new("/nonexistent")) {
        assert!(e.0.starts_with("fuzz.toml"), "error does not name the file: {}", e.0);
    }
}

/// The virtio-mmio register interface in front of any of the devices (the first byte
/// picks it), the rest as in [`virtio_device`].
pub fn virtio_any(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else { return };
    let dev = match pick % 3 {
        0 => Device::Blk,
        1 => Device::Balloon,
        _ => Device::Vasi,
    };
    virtio_device(dev, rest);
}
