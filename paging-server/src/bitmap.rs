//! Slot bitmaps: bit `s` of the bitmap (little-endian bytes, bit 0 of byte 0 first) is
//! set when slot `s` holds a page. The same byte layout is stored on the device.

/// Is slot `s` in use? Slots beyond the bitmap are not.
pub fn test(map: &[u8], s: u64) -> bool {
    map.get((s / 8) as usize).is_some_and(|b| b & (1 << (s % 8)) != 0)
}

/// Mark slot `s` used or free; returns false if `s` is beyond the bitmap.
pub fn set(map: &mut [u8], s: u64, used: bool) -> bool {
    let Some(b) = map.get_mut((s / 8) as usize) else { return false };
    if used {
        *b |= 1 << (s % 8);
    } else {
        *b &= !(1 << (s % 8));
    }
    true
}

/// Slots in use among the first `slots`.
pub fn count(map: &[u8], slots: u64) -> u64 {
    (0..slots).filter(|&s| test(map, s)).count() as u64
}

/// Which `block`-byte block of the bitmap holds slot `s`'s bit (what to write back to
/// the device after changing it).
pub fn block_of(s: u64, block: u64) -> u64 {
    s / 8 / block
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits() {
        let mut m = [0u8; 4];
        assert!(set(&mut m, 0, true) && set(&mut m, 9, true) && set(&mut m, 31, true));
        assert_eq!(m, [1, 2, 0, 0x80]);
        assert!(test(&m, 9) && !test(&m, 10) && !test(&m, 1000));
        assert!(!set(&mut m, 32, true), "beyond the bitmap");
        assert_eq!(count(&m, 32), 3);
        assert!(set(&mut m, 9, false));
        assert_eq!(count(&m, 32), 2);
        assert_eq!(block_of(4096 * 8 - 1, 4096), 0);
        assert_eq!(block_of(4096 * 8, 4096), 1);
    }
}
