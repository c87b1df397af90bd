//! Device models and the buses that route vCPU port-I/O and MMIO exits to them.

pub mod cmos;
pub mod power;
pub mod serial;
pub mod virtio;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable from a vCPU through port I/O or MMIO. `offset` is relative to the
/// base the device was inserted at. `data.len()` is 1, 2, 4 or 8, as the guest chose:
/// devices must accept any length and answer unsupported accesses with zeros (reads) or
/// by ignoring them (writes), counting them where it helps diagnosis.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Shared handle to a bus device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Range {
    len: u64,
    dev: SharedDevice,
}

/// An address space (port I/O or MMIO) of non-overlapping device ranges.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} overlaps another device")]
    Overlap { base: u64, len: u64 },
    #[error("device range at {base:#x} has zero length")]
    ZeroLength { base: u64 },
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let end = base.checked_add(len).ok_or(BusError::Overlap { base, len })?;
        // The range before `end` with the highest base must end at or before `base`.
        if let Some((&b, r)) = self.ranges.range(..end).next_back() {
            if b + r.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Range { len, dev });
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` within it.
    pub fn lookup(&self, addr: u64) -> Option<(SharedDevice, u64)> {
        let (&base, r) = self.ranges.range(..=addr).next_back()?;
        let off = addr - base;
        (off < r.len).then(|| (r.dev.clone(), off))
    }

    /// Dispatch a read; returns false when no device covers `addr` (data is zeroed).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr) {
            Some((dev, off)) => {
                dev.lock().unwrap_or_else(|e| e.into_inner()).read(off, data);
                true
            }
            None => {
                data.fill(0);
                false
            }
        }
    }

    /// Dispatch a write; returns false when no device covers `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.lookup(addr) {
            Some((dev, off)) => {
                dev.lock().unwrap_or_else(|e| e.into_inner()).write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlap() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Reg(1)))).unwrap();
        bus.insert(0x110, 0x10, Arc::new(Mutex::new(Reg(10)))).unwrap();
        assert_eq!(
            bus.insert(0x10f, 2, Arc::new(Mutex::new(Reg(0)))),
            Err(BusError::Overlap { base: 0x10f, len: 2 })
        );
        assert_eq!(bus.insert(0xf8, 0x9, Arc::new(Mutex::new(Reg(0)))), Err(BusError::Overlap { base: 0xf8, len: 9 }));
        assert_eq!(bus.insert(0x200, 0, Arc::new(Mutex::new(Reg(0)))), Err(BusError::ZeroLength { base: 0x200 }));
        let mut b = [0u8; 1];
        assert!(bus.read(0x103, &mut b));
        assert_eq!(b[0], 4);
        assert!(bus.read(0x111, &mut b));
        assert_eq!(b[0], 11);
        assert!(!bus.read(0x120, &mut b));
        assert_eq!(b[0], 0);
        assert!(!bus.read(0xff, &mut b));
        assert!(bus.write(0x110, &[50]));
        bus.read(0x110, &mut b);
        assert_eq!(b[0], 50);
    }
}
