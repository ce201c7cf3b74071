//! A bus of address ranges, one for port I/O and one for MMIO.
//!
//! Devices register the ranges they decode; the run loop hands every access
//! to [`Bus::read`]/[`Bus::write`], which finds the device owning the address
//! and passes it the range's base and the offset into it. An access that no
//! device claims is reported back as unhandled so that the machine can answer
//! with all-ones and count it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// What a device write may ask of the machine beyond its own state change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BusEvent {
    /// The guest wrote `value` to the debug-exit port: end the run with
    /// exit status `value`.
    DebugExit(u32),
    /// The guest asked for a system reset (i8042 pulse, port 0xCF9).
    Reset,
    /// The guest asked to power off (ACPI S5, and S4, which Nyx treats
    /// as power-off as QEMU does).
    PowerOff,
    /// The guest put the machine into ACPI sleep state S1 or S3 (the
    /// value): the vCPU stops until the device that sent this reports a
    /// wake.
    Sleep(u8),
}

/// A device on a bus. `base` is the start of the range the access fell in
/// (a device registered at several ranges tells them apart by it) and
/// `offset` the distance from it. `data.len()` is the access size.
pub trait BusDevice: Send {
    /// Fills `data` with what the guest reads.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Takes what the guest writes; may ask something of the machine.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<BusEvent>;
}

/// Splits an MMIO access of `len` bytes at `offset` into the pieces QEMU's
/// memory core hands a device that takes accesses of at most `max` bytes
/// (a power of two): from the start, each piece is the largest power of two
/// that fits in what is left, in `max` and in the alignment of its offset.
/// Yields `(offset, index into the data, size)` per piece. A device then
/// decodes the pieces of the sizes it supports and ignores the rest, so no
/// access size or alignment can reach it in a form it does not expect.
pub fn mmio_pieces(offset: u64, len: usize, max: usize) -> impl Iterator<Item = (u64, usize, usize)> {
    let max = max.max(1);
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let at = offset.wrapping_add(done as u64);
        let mut size = (len - done).min(max);
        if at != 0 {
            let align = 1u64 << at.trailing_zeros();
            size = size.min(usize::try_from(align).unwrap_or(usize::MAX));
        }
        // The largest power of two not above `size` (which is at least 1).
        let size = 1usize << (usize::BITS - 1 - size.leading_zeros());
        let piece = (at, done, size);
        done += size;
        Some(piece)
    })
}

/// Errors of bus registration and dispatch.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one that is already registered.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing range")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// A zero-length range or one that wraps around the address space.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps")]
    BadRange {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// No device decodes this address.
    #[error("no device at {0:#x}")]
    Unhandled(u64),
}

/// A shared handle to a device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

struct Range {
    len: u64,
    device: SharedDevice,
}

/// Address ranges mapped to devices.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut l = f.debug_list();
        for (base, r) in &self.ranges {
            l.entry(&format_args!("{:#x}+{:#x}", base, r.len));
        }
        l.finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        if let Some((b, r)) = self.ranges.range(..end).next_back() {
            if b + r.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, r) = self.ranges.range(..=addr).next_back()?;
        (addr - base < r.len).then_some((*base, &r.device))
    }

    /// Whether a device decodes `addr`.
    pub fn contains(&self, addr: u64) -> bool {
        self.find(addr).is_some()
    }

    /// Dispatches a read at `addr`. An unclaimed address is an error and
    /// leaves `data` untouched.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let (base, dev) = self.find(addr).ok_or(BusError::Unhandled(addr))?;
        dev.lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(base, addr - base, data);
        Ok(())
    }

    /// Dispatches a write at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<Option<BusEvent>, BusError> {
        let (base, dev) = self.find(addr).ok_or(BusError::Unhandled(addr))?;
        Ok(dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(base, addr - base, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Remembers the last access and reads back `base ^ offset`.
    #[derive(Default)]
    struct Echo {
        last: Option<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Echo {
        fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            data.fill((base ^ offset) as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<BusEvent> {
            self.last = Some((base, offset, data.to_vec()));
            (data == [0xee]).then_some(BusEvent::Reset)
        }
    }

    #[test]
    fn dispatches_with_base_and_offset() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo::default()));
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        bus.insert(0x61, 1, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        bus.read(0x3fa, &mut b).unwrap();
        assert_eq!(b[0], (0x3f8u64 ^ 2) as u8);
        assert_eq!(bus.write(0x61, &[0xee]).unwrap(), Some(BusEvent::Reset));
        assert_eq!(dev.lock().unwrap().last, Some((0x61, 0, vec![0xee])));
        assert_eq!(bus.read(0x400, &mut b), Err(BusError::Unhandled(0x400)));
        assert_eq!(bus.read(0x3f7, &mut b), Err(BusError::Unhandled(0x3f7)));
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo::default()));
        bus.insert(0x20, 2, dev.clone()).unwrap();
        assert!(matches!(
            bus.insert(0x21, 1, dev.clone()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x1f, 2, dev.clone()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x30, 0, dev.clone()),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, dev.clone()),
            Err(BusError::BadRange { .. })
        ));
        bus.insert(0x22, 1, dev).unwrap();
    }

    #[test]
    fn mmio_pieces_follow_size_and_alignment() {
        let pieces = |o, l, m| mmio_pieces(o, l, m).collect::<Vec<_>>();
        assert_eq!(pieces(0x10, 8, 4), vec![(0x10, 0, 4), (0x14, 4, 4)]);
        assert_eq!(pieces(0x10, 8, 8), vec![(0x10, 0, 8)]);
        assert_eq!(pieces(0x11, 4, 4), vec![(0x11, 0, 1), (0x12, 1, 2), (0x14, 3, 1)]);
        assert_eq!(pieces(0, 3, 4), vec![(0, 0, 2), (2, 2, 1)]);
        assert_eq!(pieces(0x14, 8, 8), vec![(0x14, 0, 4), (0x18, 4, 4)]);
        assert_eq!(pieces(u64::MAX, 2, 4), vec![(u64::MAX, 0, 1), (0, 1, 1)]);
        assert!(pieces(0x10, 0, 4).is_empty());
    }

    proptest! {
        /// Whatever ranges are accepted, every address is owned by at most one
        /// of them, and the bus finds exactly that one.
        #[test]
        fn lookup_matches_a_linear_scan(ranges in prop::collection::vec((0u64..512, 1u64..32), 0..24), probes in prop::collection::vec(0u64..600, 0..64)) {
            let mut bus = Bus::new();
            let mut accepted: Vec<(u64, u64)> = Vec::new();
            for (base, len) in ranges {
                let overlaps = accepted.iter().any(|&(b, l)| base < b + l && b < base + len);
                let dev = Arc::new(Mutex::new(Echo::default()));
                let r = bus.insert(base, len, dev);
                prop_assert_eq!(r.is_ok(), !overlaps);
                if !overlaps { accepted.push((base, len)); }
            }
            for p in probes {
                let owner = accepted.iter().find(|&&(b, l)| p >= b && p < b + l);
                prop_assert_eq!(bus.contains(p), owner.is_some());
                let mut d = [0u8; 1];
                if let Some(&(b, _)) = owner {
                    bus.read(p, &mut d).unwrap();
                    prop_assert_eq!(d[0], (b ^ (p - b)) as u8);
                }
            }
        }
    }
}
