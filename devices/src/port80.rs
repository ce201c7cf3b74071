//! Port 0x80, the POST diagnostic port. Firmware and kernels write progress
//! codes (and Linux uses it as an I/O delay); Nyx remembers the last code for
//! crash reports. Reads return all-ones, as QEMU's `ioport80_read` does.

use crate::bus::{BusDevice, BusEvent};

/// Everything a snapshot of the POST port needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Port80State {
    /// The low byte of the last value written.
    pub last: u8,
    /// How many writes the port has taken.
    pub writes: u64,
}

/// The POST diagnostic port.
#[derive(Debug, Default)]
pub struct Port80 {
    state: Port80State,
}

impl Port80 {
    /// A port that has seen no write.
    pub fn new() -> Self {
        Self::default()
    }

    /// A port restored from a snapshot.
    pub fn from_state(state: &Port80State) -> Self {
        Self { state: state.clone() }
    }

    /// The snapshot of this port.
    pub fn state(&self) -> Port80State {
        self.state.clone()
    }

    /// The last POST code written, if any.
    pub fn last_code(&self) -> Option<u8> {
        (self.state.writes > 0).then_some(self.state.last)
    }
}

impl BusDevice for Port80 {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) -> Option<BusEvent> {
        if let Some(&b) = data.first() {
            self.state.last = b;
            self.state.writes = self.state.writes.saturating_add(1);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_writes_and_reads_all_ones() {
        let mut p = Port80::new();
        assert_eq!(p.last_code(), None);
        assert_eq!(p.write(0x80, 0, &[0x12]), None);
        assert_eq!(p.write(0x80, 0, &[0x34, 0x56]), None);
        assert_eq!(p.last_code(), Some(0x34));
        assert_eq!(p.write(0x80, 0, &[]), None);
        let mut d = [0u8; 4];
        p.read(0x80, 0, &mut d);
        assert_eq!(d, [0xFF; 4]);
        let r = Port80::from_state(&p.state());
        assert_eq!(r.state(), Port80State { last: 0x34, writes: 2 });
    }
}
