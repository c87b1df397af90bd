//! The paging-device format (little endian):
//!
//! ```text
//! offset 0                 header block (4096 bytes, see Header)
//! offset 4096              slot bitmap: bit s set = slot s holds a page (see bitmap.rs),
//!                          rounded up to whole 4096-byte blocks
//! offset data_offset       slot s at data_offset + s * 4096
//! ```
//!
//! Header block:
//!
//! ```text
//!   0  magic          8 bytes  "AMSVMPG1"
//!   8  version        le32     1
//!  12  page_size      le32     4096
//!  16  partition_id   le32     the partition the device belongs to
//!  20  reserved       le32     0
//!  24  device_bytes   le64     the device size the layout was made for
//!  32  slots          le64     data slots
//!  40  bitmap_offset  le64     4096
//!  48  data_offset    le64     4096 + bitmap blocks
//!  56  name           64 bytes the partition's name, NUL padded
//! 120  checksum       le64     FNV-1a 64 of bytes 0..120
//! ```

use crate::PAGE_SIZE;

pub const MAGIC: [u8; 8] = *b"AMSVMPG1";
pub const VERSION: u32 = 1;
pub const HEADER_BYTES: usize = PAGE_SIZE;
/// Longest partition name the header holds.
pub const NAME_BYTES: usize = 64;
const CHECKSUMMED: usize = 120;

/// Where things are on a device with `slots` data slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub slots: u64,
    pub bitmap_offset: u64,
    /// Bytes of bitmap (whole blocks).
    pub bitmap_bytes: u64,
    pub data_offset: u64,
    pub device_bytes: u64,
}

impl Layout {
    pub fn for_slots(slots: u64) -> Layout {
        let page = PAGE_SIZE as u64;
        let bitmap_bytes = slots.div_ceil(8).div_ceil(page).max(1) * page;
        let data_offset = page + bitmap_bytes;
        Layout { slots, bitmap_offset: page, bitmap_bytes, data_offset, device_bytes: data_offset + slots * page }
    }

    /// Byte offset of slot `s` (None beyond the device).
    pub fn slot_offset(&self, s: u64) -> Option<u64> {
        (s < self.slots).then(|| self.data_offset + s * PAGE_SIZE as u64)
    }
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub partition_id: u32,
    pub name: [u8; NAME_BYTES],
    pub layout: Layout,
}

/// What is wrong with a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatError {
    /// All zeros: a new device, never formatted.
    Blank,
    /// Not an amsvm paging device (no magic).
    NotAPagingDevice,
    BadChecksum,
    UnsupportedVersion(u32),
    UnsupportedPageSize(u32),
    /// The layout fields contradict each other or the device's size.
    BadLayout,
    /// The device is smaller than its header says.
    Truncated { header_bytes: u64, device_bytes: u64 },
    /// The device belongs to another partition.
    WrongPartition { found_id: u32, found_name: [u8; NAME_BYTES], expected_id: u32 },
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// A name as header bytes: at most [`NAME_BYTES`], NUL padded (longer names are cut).
pub fn name_bytes(name: &str) -> [u8; NAME_BYTES] {
    let mut n = [0u8; NAME_BYTES];
    let k = name.len().min(NAME_BYTES);
    n[..k].copy_from_slice(&name.as_bytes()[..k]);
    n
}

/// The name in header bytes, up to the first NUL (lossy for non-UTF-8 bytes: None).
pub fn name_str(n: &[u8; NAME_BYTES]) -> Option<&str> {
    let end = n.iter().position(|&b| b == 0).unwrap_or(NAME_BYTES);
    core::str::from_utf8(&n[..end]).ok()
}

impl Header {
    pub fn new(partition_id: u32, name: &str, slots: u64) -> Header {
        Header { partition_id, name: name_bytes(name), layout: Layout::for_slots(slots) }
    }

    /// The header block.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        let l = &self.layout;
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        b[16..20].copy_from_slice(&self.partition_id.to_le_bytes());
        b[24..32].copy_from_slice(&l.device_bytes.to_le_bytes());
        b[32..40].copy_from_slice(&l.slots.to_le_bytes());
        b[40..48].copy_from_slice(&l.bitmap_offset.to_le_bytes());
        b[48..56].copy_from_slice(&l.data_offset.to_le_bytes());
        b[56..120].copy_from_slice(&self.name);
        let c = fnv1a(&b[..CHECKSUMMED]);
        b[120..128].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// Decode and check a header block (at least 128 bytes) of a device of
    /// `device_bytes`.
    pub fn decode(b: &[u8], device_bytes: u64) -> Result<Header, FormatError> {
        if b.len() < 128 {
            return Err(FormatError::NotAPagingDevice);
        }
        if b[..128].iter().all(|&x| x == 0) {
            return Err(FormatError::Blank);
        }
        if b[0..8] != MAGIC {
            return Err(FormatError::NotAPagingDevice);
        }
        if fnv1a(&b[..CHECKSUMMED]) != le64(b, 120) {
            return Err(FormatError::BadChecksum);
        }
        let version = le32(b, 8);
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let page = le32(b, 12);
        if page as usize != PAGE_SIZE {
            return Err(FormatError::UnsupportedPageSize(page));
        }
        let slots = le64(b, 32);
        let layout = Layout::for_slots(slots);
        if slots > u32::MAX as u64
            || le64(b, 24) != layout.device_bytes
            || le64(b, 40) != layout.bitmap_offset
            || le64(b, 48) != layout.data_offset
        {
            return Err(FormatError::BadLayout);
        }
        if device_bytes < layout.device_bytes {
            return Err(FormatError::Truncated { header_bytes: layout.device_bytes, device_bytes });
        }
        let mut name = [0u8; NAME_BYTES];
        name.copy_from_slice(&b[56..120]);
        Ok(Header { partition_id: le32(b, 16), name, layout })
    }

    /// Decode and check that the device belongs to partition `expected_id`.
    pub fn decode_for(b: &[u8], device_bytes: u64, expected_id: u32) -> Result<Header, FormatError> {
        let h = Header::decode(b, device_bytes)?;
        if h.partition_id != expected_id {
            return Err(FormatError::WrongPartition { found_id: h.partition_id, found_name: h.name, expected_id });
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_every_check() {
        let h = Header::new(3, "bravo", 65536);
        assert_eq!(h.layout.bitmap_bytes, 8192);
        assert_eq!(h.layout.data_offset, 4096 + 8192);
        assert_eq!(h.layout.device_bytes, 4096 + 8192 + 65536 * 4096);
        let b = h.encode();
        let size = h.layout.device_bytes;
        assert_eq!(Header::decode(&b, size), Ok(h));
        assert_eq!(Header::decode_for(&b, size, 3), Ok(h));
        assert_eq!(name_str(&h.name), Some("bravo"));
        match Header::decode_for(&b, size, 4) {
            Err(FormatError::WrongPartition { found_id: 3, found_name, expected_id: 4 }) => {
                assert_eq!(name_str(&found_name), Some("bravo"))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(Header::decode(&[0u8; 4096], size), Err(FormatError::Blank));
        assert_eq!(Header::decode(&[7u8; 4096], size), Err(FormatError::NotAPagingDevice));
        assert_eq!(Header::decode(&b[..100], size), Err(FormatError::NotAPagingDevice));
        let mut bad = b;
        bad[17] ^= 1;
        assert_eq!(Header::decode(&bad, size), Err(FormatError::BadChecksum));
        assert_eq!(Header::decode(&b, size - 1), Err(FormatError::Truncated { header_bytes: size, device_bytes: size - 1 }));
        // A consistent checksum over inconsistent fields is still refused.
        let mut lie = b;
        lie[48..56].copy_from_slice(&0u64.to_le_bytes());
        let c = fnv1a(&lie[..CHECKSUMMED]);
        lie[120..128].copy_from_slice(&c.to_le_bytes());
        assert_eq!(Header::decode(&lie, size), Err(FormatError::BadLayout));
        let mut v2 = b;
        v2[8] = 2;
        let c = fnv1a(&v2[..CHECKSUMMED]);
        v2[120..128].copy_from_slice(&c.to_le_bytes());
        assert_eq!(Header::decode(&v2, size), Err(FormatError::UnsupportedVersion(2)));
    }

    #[test]
    fn layout() {
        let l = Layout::for_slots(10);
        assert_eq!(l.bitmap_bytes, 4096);
        assert_eq!(l.slot_offset(9), Some(8192 + 9 * 4096));
        assert_eq!(l.slot_offset(10), None);
        assert_eq!(name_bytes(&"x".repeat(100))[63], b'x');
    }
}
