//! Page and disk-block contents: a stamp ([`amsvm_abi::PageStamp`] /
//! [`amsvm_abi::BlockStamp`]) in the first 24 bytes, then 509 words that are a cheap,
//! deterministic function of (partition, index, version). Pure code over raw pointers,
//! also compiled into the host tests of `vmm/src/images.rs`.

use amsvm_abi::{BlockStamp, PageStamp, BLOCK_STAMP_MAGIC, PAGE_STAMP_MAGIC};

/// Bytes in a page or test block.
pub const PAGE_SIZE: usize = 4096;
/// 64-bit words in a page.
pub const WORDS: usize = PAGE_SIZE / 8;
/// Words taken by the stamp (both stamp types are 24 bytes).
pub const STAMP_WORDS: usize = 3;

const _: () = assert!(core::mem::size_of::<PageStamp>() == STAMP_WORDS * 8);
const _: () = assert!(core::mem::size_of::<BlockStamp>() == STAMP_WORDS * 8);

/// What a page or block is meant to hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    /// Stamp magic: [`PAGE_STAMP_MAGIC`] or [`BLOCK_STAMP_MAGIC`].
    pub magic: u32,
    pub partition_id: u32,
    pub index: u64,
    /// 0 means "never written": every word must be zero.
    pub version: u64,
}

impl Expected {
    pub fn page(partition_id: u32, page_index: u64, version: u64) -> Self {
        Expected { magic: PAGE_STAMP_MAGIC, partition_id, index: page_index, version }
    }

    /// `nonce` tells one disk test run from another (a block is always written first, so
    /// a nonce of 0 still yields a stamped block).
    pub fn block(partition_id: u32, block_index: u64, nonce: u64) -> Self {
        Expected { magic: BLOCK_STAMP_MAGIC, partition_id, index: block_index, version: nonce }
    }

    fn is_zero_page(&self) -> bool {
        self.magic == PAGE_STAMP_MAGIC && self.version == 0
    }

    /// The words of the stamp as they sit in memory (little endian).
    fn stamp_words(&self) -> [u64; STAMP_WORDS] {
        [(self.magic as u64) | ((self.partition_id as u64) << 32), self.index, self.version]
    }

    /// Seed of the filler words.
    fn key(&self) -> u64 {
        let mut h = super::sampler::mix64(self.magic as u64 ^ ((self.partition_id as u64) << 32));
        h = super::sampler::mix64(h ^ self.index);
        super::sampler::mix64(h ^ self.version)
    }

    /// Word `j` (`j < WORDS`) of the contents.
    pub fn word(&self, j: usize) -> u64 {
        if self.is_zero_page() {
            0
        } else if j < STAMP_WORDS {
            self.stamp_words()[j]
        } else {
            filler(self.key(), j)
        }
    }
}

/// One multiply and two xor-shifts per word: bijective in `key + j`, so different pages
/// (different keys) have unrelated filler.
#[inline(always)]
fn filler(key: u64, j: usize) -> u64 {
    let x = key.wrapping_add((j as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let x = (x ^ (x >> 32)).wrapping_mul(0xd6e8_feb8_6659_fd93);
    x ^ (x >> 32)
}

/// Writes the whole page at `page`.
///
/// # Safety
/// `page` must be 8-byte aligned and valid for writes of [`PAGE_SIZE`] bytes.
pub unsafe fn fill(page: *mut u64, exp: &Expected) {
    if exp.is_zero_page() {
        for j in 0..WORDS {
            // SAFETY: j < WORDS, within the page the caller vouches for.
            unsafe { page.add(j).write_volatile(0) };
        }
        return;
    }
    let stamp = exp.stamp_words();
    for (j, w) in stamp.iter().enumerate() {
        // SAFETY: as above.
        unsafe { page.add(j).write_volatile(*w) };
    }
    let key = exp.key();
    for j in STAMP_WORDS..WORDS {
        // SAFETY: as above.
        unsafe { page.add(j).write_volatile(filler(key, j)) };
    }
}

/// The first word of a page that differs from what was expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Index of the first wrong word.
    pub word: usize,
    /// How many words are wrong.
    pub bad_words: usize,
    pub expected: u64,
    pub found: u64,
    /// The stamp the page holds instead (its first three words), for diagnosis.
    pub found_stamp: [u64; STAMP_WORDS],
}

impl Mismatch {
    /// Stamp magic found at offset 0.
    pub fn found_magic(&self) -> u32 {
        self.found_stamp[0] as u32
    }
    pub fn found_partition(&self) -> u32 {
        (self.found_stamp[0] >> 32) as u32
    }
    pub fn found_index(&self) -> u64 {
        self.found_stamp[1]
    }
    pub fn found_version(&self) -> u64 {
        self.found_stamp[2]
    }
}

/// Reads every word of the page at `page` and compares it with `exp`.
///
/// # Safety
/// `page` must be 8-byte aligned and valid for reads of [`PAGE_SIZE`] bytes.
pub unsafe fn verify(page: *const u64, exp: &Expected) -> Result<(), Mismatch> {
    let mut bad = 0usize;
    let mut first = usize::MAX;
    if exp.is_zero_page() {
        for j in 0..WORDS {
            // SAFETY: j < WORDS, within the page the caller vouches for.
            let w = unsafe { page.add(j).read_volatile() };
            if w != 0 {
                bad += 1;
                first = first.min(j);
            }
        }
    } else {
        let stamp = exp.stamp_words();
        for (j, s) in stamp.iter().enumerate() {
            // SAFETY: as above.
            if unsafe { page.add(j).read_volatile() } != *s {
                bad += 1;
                first = first.min(j);
            }
        }
        let key = exp.key();
        for j in STAMP_WORDS..WORDS {
            // SAFETY: as above.
            if unsafe { page.add(j).read_volatile() } != filler(key, j) {
                bad += 1;
                first = first.min(j);
            }
        }
    }
    if bad == 0 {
        return Ok(());
    }
    // SAFETY: as above.
    let (found, found_stamp) = unsafe {
        (page.add(first).read_volatile(), [page.read_volatile(), page.add(1).read_volatile(), page.add(2).read_volatile()])
    };
    Err(Mismatch { word: first, bad_words: bad, expected: exp.word(first), found, found_stamp })
}
