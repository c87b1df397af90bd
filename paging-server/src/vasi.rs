//! The VASI channel: how the hypervisor asks the paging server for paging I/O (the
//! PowerVM "Virtual Asynchronous Services Interface" role), as a virtio-mmio device of
//! amsvm's own. Documented in `docs/vasi.md`.
//!
//! - Device id [`DEVICE_ID`]; feature VIRTIO_F_VERSION_1 only.
//! - Queue [`REQUEST_QUEUE`]: the paging server (the driver) makes device-writable
//!   buffers of [`REQUEST_BYTES`] available; the hypervisor (the device) writes one
//!   request into each and puts it in the used ring.
//! - Queue [`COMPLETION_QUEUE`]: the paging server makes device-readable buffers of
//!   [`COMPLETION_BYTES`] (one completion each, or several back to back) available and
//!   notifies; the hypervisor reads and returns them.
//! - Configuration space ([`Config`]): where the transfer window is, how many paging
//!   devices there are and which partition each belongs to.
//! - Data never travels in the queues: a request names pages of the transfer window (in
//!   the paging server's own RAM, which is never drawn from the pool). Its virtio-blk
//!   requests point straight into the window; the hypervisor copies pages into it for a
//!   page-out and out of it for a page-in.

/// virtio device id of the VASI device ("VASI" read as a little-endian u32 would be
/// 0x49534156; this is the big-endian reading, outside the ids virtio assigns).
pub const DEVICE_ID: u32 = 0x5641_5349;

pub const REQUEST_QUEUE: u16 = 0;
pub const COMPLETION_QUEUE: u16 = 1;

pub const REQUEST_BYTES: usize = 160;
pub const COMPLETION_BYTES: usize = 16;

/// Most pages one request moves.
pub const MAX_PAGES: usize = 32;

/// Most paging devices (one per partition) a paging server serves.
pub const MAX_DEVICES: usize = 15;

/// Request operations.
pub mod op {
    /// Write window pages `window_page..+count` to `slots[..count]` and mark them used.
    pub const PAGE_OUT: u32 = 1;
    /// Read `slots[..count]` (all in use) into window pages `window_page..+count`.
    pub const PAGE_IN: u32 = 2;
    /// Free `slots[..count]`: mark them unused and discard their data.
    pub const DISCARD: u32 = 3;
    /// Make everything written so far durable on the device (`count` = 0).
    pub const FLUSH: u32 = 4;
}

/// Completion statuses.
pub mod status {
    pub const OK: u32 = 0;
    /// The paging device failed (the virtio-blk request came back with an error).
    pub const IO_ERROR: u32 = 1;
    /// The request was malformed or out of range (see [`super::Malformed`]); nothing
    /// was done.
    pub const BAD_REQUEST: u32 = 2;
    /// The paging device refused a write for lack of space.
    pub const NO_SPACE: u32 = 3;
}

/// One request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Chosen by the hypervisor; echoed in the completion.
    pub id: u64,
    pub op: u32,
    /// Paging device index (0-based, as in [`Config::partition_ids`]).
    pub device: u32,
    pub count: u32,
    /// First transfer-window page (PAGE_OUT, PAGE_IN).
    pub window_page: u32,
    pub slots: [u32; MAX_PAGES],
}

/// One completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub id: u64,
    pub status: u32,
    /// Pages done (0 unless `status` is OK).
    pub count: u32,
}

/// Why a request or completion is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    TooShort,
    UnknownOp(u32),
    NoSuchDevice(u32),
    /// `count` is 0 (for an op that moves pages), above [`MAX_PAGES`], or not 0 for FLUSH.
    BadCount(u32),
    /// The window pages run past the window.
    OutsideWindow,
    /// A slot beyond the device.
    SlotOutOfRange(u32),
    /// PAGE_IN of a slot that holds nothing.
    SlotNotInUse(u32),
    /// The same slot twice in one request.
    DuplicateSlot(u32),
    UnknownStatus(u32),
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

impl Request {
    pub fn new(id: u64, op: u32, device: u32, window_page: u32, slots: &[u32]) -> Request {
        let mut s = [0u32; MAX_PAGES];
        let n = slots.len().min(MAX_PAGES);
        s[..n].copy_from_slice(&slots[..n]);
        Request { id, op, device, count: n as u32, window_page, slots: s }
    }

    /// Layout: id le64 at 0, op le32 at 8, device at 12, count at 16, window_page at 20,
    /// slots le32 x 32 at 24, zeros to 160.
    pub fn encode(&self) -> [u8; REQUEST_BYTES] {
        let mut b = [0u8; REQUEST_BYTES];
        b[0..8].copy_from_slice(&self.id.to_le_bytes());
        b[8..12].copy_from_slice(&self.op.to_le_bytes());
        b[12..16].copy_from_slice(&self.device.to_le_bytes());
        b[16..20].copy_from_slice(&self.count.to_le_bytes());
        b[20..24].copy_from_slice(&self.window_page.to_le_bytes());
        for (k, s) in self.slots.iter().enumerate() {
            b[24 + 4 * k..28 + 4 * k].copy_from_slice(&s.to_le_bytes());
        }
        b
    }

    /// Decode without judging the contents (see [`Request::check`]).
    pub fn decode(b: &[u8]) -> Result<Request, Malformed> {
        if b.len() < REQUEST_BYTES {
            return Err(Malformed::TooShort);
        }
        let mut slots = [0u32; MAX_PAGES];
        for (k, s) in slots.iter_mut().enumerate() {
            *s = le32(b, 24 + 4 * k);
        }
        Ok(Request { id: le64(b, 0), op: le32(b, 8), device: le32(b, 12), count: le32(b, 16), window_page: le32(b, 20), slots })
    }

    /// The slots the request names.
    pub fn slots(&self) -> &[u32] {
        &self.slots[..(self.count as usize).min(MAX_PAGES)]
    }

    /// Check a request against the channel and the device it names: `devices` paging
    /// devices, a window of `window_pages`, `device_slots` slots on the named device, and
    /// `in_use(slot)` its bitmap.
    pub fn check(&self, devices: u32, window_pages: u32, device_slots: impl Fn(u32) -> u64, in_use: impl Fn(u32) -> bool) -> Result<(), Malformed> {
        let moves = match self.op {
            op::PAGE_OUT | op::PAGE_IN => true,
            op::DISCARD => false,
            op::FLUSH => {
                if self.count != 0 {
                    return Err(Malformed::BadCount(self.count));
                }
                return if self.device < devices { Ok(()) } else { Err(Malformed::NoSuchDevice(self.device)) };
            }
            other => return Err(Malformed::UnknownOp(other)),
        };
        if self.device >= devices {
            return Err(Malformed::NoSuchDevice(self.device));
        }
        if self.count == 0 || self.count as usize > MAX_PAGES {
            return Err(Malformed::BadCount(self.count));
        }
        if moves && (self.window_page as u64 + self.count as u64) > window_pages as u64 {
            return Err(Malformed::OutsideWindow);
        }
        let slots = device_slots(self.device);
        let list = self.slots();
        for (k, &s) in list.iter().enumerate() {
            if s as u64 >= slots {
                return Err(Malformed::SlotOutOfRange(s));
            }
            if list[..k].contains(&s) {
                return Err(Malformed::DuplicateSlot(s));
            }
            if self.op == op::PAGE_IN && !in_use(s) {
                return Err(Malformed::SlotNotInUse(s));
            }
        }
        Ok(())
    }
}

impl Completion {
    /// Layout: id le64 at 0, status le32 at 8, count le32 at 12.
    pub fn encode(&self) -> [u8; COMPLETION_BYTES] {
        let mut b = [0u8; COMPLETION_BYTES];
        b[0..8].copy_from_slice(&self.id.to_le_bytes());
        b[8..12].copy_from_slice(&self.status.to_le_bytes());
        b[12..16].copy_from_slice(&self.count.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Completion, Malformed> {
        if b.len() < COMPLETION_BYTES {
            return Err(Malformed::TooShort);
        }
        let c = Completion { id: le64(b, 0), status: le32(b, 8), count: le32(b, 12) };
        match c.status {
            status::OK | status::IO_ERROR | status::BAD_REQUEST | status::NO_SPACE => Ok(c),
            s => Err(Malformed::UnknownStatus(s)),
        }
    }
}

/// The VASI configuration space (read-only to the paging server):
///
/// ```text
///  0 window_gpa     le64  guest-physical address of the transfer window
///  8 window_pages   le32
/// 12 devices        le32  paging devices; device i is the (i+1)-th virtio-blk device
///                         in the boot-info device list
/// 16 partition_ids  le32 x 15  the partition each paging device belongs to
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub window_gpa: u64,
    pub window_pages: u32,
    pub devices: u32,
    pub partition_ids: [u32; MAX_DEVICES],
}

pub const CONFIG_BYTES: usize = 16 + 4 * MAX_DEVICES;

impl Config {
    pub fn encode(&self) -> [u8; CONFIG_BYTES] {
        let mut b = [0u8; CONFIG_BYTES];
        b[0..8].copy_from_slice(&self.window_gpa.to_le_bytes());
        b[8..12].copy_from_slice(&self.window_pages.to_le_bytes());
        b[12..16].copy_from_slice(&self.devices.to_le_bytes());
        for (k, id) in self.partition_ids.iter().enumerate() {
            b[16 + 4 * k..20 + 4 * k].copy_from_slice(&id.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Option<Config> {
        if b.len() < CONFIG_BYTES {
            return None;
        }
        let mut partition_ids = [0u32; MAX_DEVICES];
        for (k, id) in partition_ids.iter_mut().enumerate() {
            *id = le32(b, 16 + 4 * k);
        }
        let c = Config { window_gpa: le64(b, 0), window_pages: le32(b, 8), devices: le32(b, 12), partition_ids };
        (c.devices as usize <= MAX_DEVICES).then_some(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let r = Request::new(77, op::PAGE_OUT, 2, 40, &[5, 9, 1000]);
        assert_eq!(Request::decode(&r.encode()), Ok(r));
        assert_eq!(r.slots(), &[5, 9, 1000]);
        assert_eq!(Request::decode(&[0u8; 10]), Err(Malformed::TooShort));
        let c = Completion { id: 77, status: status::OK, count: 3 };
        assert_eq!(Completion::decode(&c.encode()), Ok(c));
        let mut bad = c.encode();
        bad[8] = 9;
        assert_eq!(Completion::decode(&bad), Err(Malformed::UnknownStatus(9)));
        let cfg = Config { window_gpa: 0x40_0000, window_pages: 256, devices: 2, partition_ids: [7; MAX_DEVICES] };
        assert_eq!(Config::decode(&cfg.encode()), Some(cfg));
    }

    #[test]
    fn requests_are_checked() {
        let slots = |_d: u32| 100u64;
        let used = |s: u32| s < 50;
        let ok = |r: Request| r.check(2, 64, slots, used);
        assert_eq!(ok(Request::new(1, op::PAGE_IN, 0, 0, &[1, 2])), Ok(()));
        assert_eq!(ok(Request::new(1, op::PAGE_IN, 0, 0, &[60])), Err(Malformed::SlotNotInUse(60)));
        assert_eq!(ok(Request::new(1, op::PAGE_OUT, 0, 0, &[60, 99])), Ok(()));
        assert_eq!(ok(Request::new(1, op::PAGE_OUT, 0, 0, &[100])), Err(Malformed::SlotOutOfRange(100)));
        assert_eq!(ok(Request::new(1, op::PAGE_OUT, 0, 0, &[3, 3])), Err(Malformed::DuplicateSlot(3)));
        assert_eq!(ok(Request::new(1, op::PAGE_OUT, 2, 0, &[3])), Err(Malformed::NoSuchDevice(2)));
        assert_eq!(ok(Request::new(1, op::PAGE_OUT, 0, 63, &[3, 4])), Err(Malformed::OutsideWindow));
        assert_eq!(ok(Request::new(1, op::PAGE_OUT, 0, u32::MAX, &[3])), Err(Malformed::OutsideWindow));
        assert_eq!(ok(Request::new(1, op::DISCARD, 0, u32::MAX, &[3])), Ok(()), "discard uses no window");
        assert_eq!(ok(Request::new(1, op::PAGE_OUT, 0, 0, &[])), Err(Malformed::BadCount(0)));
        let mut big = Request::new(1, op::PAGE_OUT, 0, 0, &[1]);
        big.count = 33;
        assert_eq!(ok(big), Err(Malformed::BadCount(33)));
        assert_eq!(ok(Request::new(1, op::FLUSH, 1, 0, &[])), Ok(()));
        assert_eq!(ok(Request::new(1, op::FLUSH, 1, 0, &[1])), Err(Malformed::BadCount(1)));
        assert_eq!(ok(Request::new(1, 9, 0, 0, &[1])), Err(Malformed::UnknownOp(9)));
    }
}
