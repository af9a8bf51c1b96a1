//! Address-space dispatch for vCPU exits: MMIO and port I/O accesses are
//! routed to the device whose range contains the address.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable from a vCPU by MMIO or port I/O.
///
/// `offset` is relative to the start of the range the device was inserted at.
/// Implementations must accept any offset and length the guest chooses:
/// accesses they do not understand are ignored (writes) or read as zeros.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The range [{base:#x}, +{len:#x}) is empty or overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap { base: u64, len: u64 },
}

#[derive(Clone)]
struct BusEntry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// One address space (MMIO or PIO) of devices, keyed by base address.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, BusEntry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at [base, base + len).
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::Overlap { base, len });
        };
        if self.lookup(base).is_some() || self.devices.range(base..end).next().is_some() {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, BusEntry { len, device });
        Ok(())
    }

    fn lookup(&self, addr: u64) -> Option<(u64, &BusEntry)> {
        let (base, entry) = self.devices.range(..=addr).next_back()?;
        (addr - base < entry.len).then_some((addr - base, entry))
    }

    /// Dispatches a read; returns false when no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr) {
            Some((offset, entry)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.lookup(addr) {
            Some((offset, entry)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device mutex. A device whose lock was poisoned (a panic while it was
/// held) is still used: devices keep no invariants across a single access
/// that a panic could break worse than stopping the VM would.
pub use husk_util::sync::lock;

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset.to_le_bytes()[0]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlaps() {
        let dev = Arc::new(Mutex::new(Recorder(Vec::new())));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x1000, 0x100).unwrap();
        assert!(bus.insert(dev.clone(), 0x10ff, 0x10).is_err());
        assert!(bus.insert(dev.clone(), 0xf00, 0x101).is_err());
        assert!(bus.insert(dev.clone(), 0x2000, 0).is_err());
        assert!(bus.insert(dev.clone(), u64::MAX, 2).is_err());
        bus.insert(dev.clone(), 0x1100, 0x100).unwrap();

        let mut buf = [0u8; 2];
        assert!(bus.read(0x1004, &mut buf));
        assert_eq!(buf, [4, 4]);
        assert!(!bus.read(0x1200, &mut buf));
        assert!(!bus.read(0xfff, &mut buf));
        assert!(bus.write(0x1150, &[9]));
        assert_eq!(dev.lock().unwrap().0, vec![(0x50, vec![9])]);
    }
}
