//! QEMU's `isa-debug-exit` device (Nyx puts it at port 0xF4, 4 ports): a
//! test guest ends the run by writing a value to it. The write becomes
//! [`BusEvent::DebugExit`] with the value as written (zero-extended
//! little-endian, whatever the access size or port within the range); the
//! machine turns it into the process exit status `(v << 1) | 1` as QEMU does.
//! Reads return 0, as QEMU's `debug_exit_read`.

use crate::bus::{BusDevice, BusEvent};

/// The debug-exit port has no state; this type exists so that every device
/// snapshots the same way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DebugExitState;

/// The debug-exit port.
#[derive(Debug, Default)]
pub struct DebugExit;

impl DebugExit {
    /// The device.
    pub fn new() -> Self {
        Self
    }

    /// The device restored from a snapshot.
    pub fn from_state(_state: &DebugExitState) -> Self {
        Self
    }

    /// The snapshot of this device.
    pub fn state(&self) -> DebugExitState {
        DebugExitState
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) -> Option<BusEvent> {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        Some(BusEvent::DebugExit(u32::from_le_bytes(v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_zero() {
        let mut d = DebugExit::from_state(&DebugExit::new().state());
        let mut b = [0xAAu8; 4];
        d.read(0xF4, 0, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn empty_write_exits_with_zero() {
        assert_eq!(DebugExit::new().write(0xF4, 0, &[]), Some(BusEvent::DebugExit(0)));
    }

    proptest! {
        /// Any write at any size exits with its value zero-extended.
        #[test]
        fn write_exits_with_the_value(bytes in prop::collection::vec(any::<u8>(), 1..=4), off in 0u64..4) {
            let mut want = 0u32;
            for (i, b) in bytes.iter().enumerate() {
                want |= u32::from(*b) << (8 * i);
            }
            prop_assert_eq!(DebugExit::new().write(0xF4, off, &bytes), Some(BusEvent::DebugExit(want)));
        }
    }
}
