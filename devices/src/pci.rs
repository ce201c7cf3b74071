//! PCI configuration mechanism #1 (address register at 0xCF8, data at
//! 0xCFC-0xCFF) with a single function behind it: bus 0, device 0, function
//! 0, the i440FX host bridge as QEMU's `pc` machine shows it (8086:1237 rev 2,
//! class 06:00:00, subsystem 1af4:1100). Its config space is 256 bytes,
//! writable where QEMU's write mask allows (command bits, cache line size,
//! interrupt line, and the device-specific area 0x40-0xFF; the PAM and SMRAM
//! registers there are stored but change no memory mapping), read-only
//! elsewhere. Any other function reads all-ones and ignores writes, and so
//! does the data port while the address register's enable bit is clear.
//!
//! Register it at 0xCF8 with length 8. A dword at 0xCF8 is the address
//! register; a byte at 0xCF9 is the PIIX reset control register (writing bit
//! 2 resets the machine, as QEMU's `rcr_write`); other accesses to
//! 0xCF8-0xCFB read all-ones and are ignored.

use crate::bus::{BusDevice, BusEvent};

/// The first port of the mechanism.
pub const PCI_CONFIG_ADDRESS: u64 = 0xCF8;
/// The first data port.
pub const PCI_CONFIG_DATA: u64 = 0xCFC;
/// Ports decoded from [`PCI_CONFIG_ADDRESS`].
pub const PCI_IO_LEN: u64 = 8;
/// Size of a conventional config space.
pub const CONFIG_LEN: usize = 256;

const RESET_CONTROL: u64 = 0xCF9;
const ENABLE: u32 = 1 << 31;

/// Errors of restoring the PCI host from a snapshot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// The snapshot's config space does not have 256 bytes.
    #[error("PCI state holds {0} config-space bytes; it must hold exactly 256")]
    BadConfigLength(usize),
}

/// Everything a snapshot of the PCI host needs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PciState {
    /// The address register (0xCF8) as last written.
    pub address: u32,
    /// The host bridge's 256-byte config space.
    pub config: Vec<u8>,
    /// The reset control register (0xCF9), bit 1 kept.
    pub reset_control: u8,
}

impl Default for PciState {
    fn default() -> Self {
        Self {
            address: 0,
            config: host_bridge_config(),
            reset_control: 0,
        }
    }
}

/// The i440FX's config space after reset, as QEMU builds it.
fn host_bridge_config() -> Vec<u8> {
    let mut c = vec![0u8; CONFIG_LEN];
    c[0x00..0x02].copy_from_slice(&0x8086u16.to_le_bytes());
    c[0x02..0x04].copy_from_slice(&0x1237u16.to_le_bytes());
    c[0x08] = 0x02; // revision
    c[0x0B] = 0x06; // class: bridge, subclass host, prog-if 0
    c[0x2C..0x2E].copy_from_slice(&0x1AF4u16.to_le_bytes());
    c[0x2E..0x30].copy_from_slice(&0x1100u16.to_le_bytes());
    c[0x72] = 0x02; // SMRAM
    c
}

/// Which bits of config byte `off` a guest may change (QEMU's `wmask`).
fn write_mask(off: usize) -> u8 {
    match off {
        0x04 => 0x07, // I/O, memory, bus master
        0x05 => 0x05, // SERR, INTx disable
        0x0C | 0x3C => 0xFF,
        0x40.. => 0xFF,
        _ => 0,
    }
}

/// Which bits of config byte `off` a guest clears by writing 1 (status).
fn w1c_mask(off: usize) -> u8 {
    if off == 0x07 {
        0xF9
    } else {
        0
    }
}

/// The PCI configuration mechanism with the host bridge.
#[derive(Debug, Default)]
pub struct PciHost {
    state: PciState,
}

impl PciHost {
    /// The host bridge after reset.
    pub fn new() -> Self {
        Self::default()
    }

    /// The host restored from a snapshot.
    pub fn from_state(state: &PciState) -> Result<Self, PciError> {
        if state.config.len() != CONFIG_LEN {
            return Err(PciError::BadConfigLength(state.config.len()));
        }
        Ok(Self { state: state.clone() })
    }

    /// The snapshot of this host.
    pub fn state(&self) -> PciState {
        self.state.clone()
    }

    /// The config-space offset a data access at `port` goes to, if the
    /// address register selects the host bridge; `None` for all-ones.
    fn target(&self, port: u64) -> Option<usize> {
        let a = self.state.address;
        if a & ENABLE == 0 || a & 0x00FF_FF00 != 0 {
            return None;
        }
        Some(((a | (port & 3) as u32) & 0xFF) as usize)
    }

    fn read_config(&self, port: u64, data: &mut [u8]) {
        match self.target(port) {
            None => data.fill(0xFF),
            Some(reg) => {
                for (i, d) in data.iter_mut().enumerate() {
                    *d = self.state.config.get(reg + i).copied().unwrap_or(0);
                }
            }
        }
    }

    fn write_config(&mut self, port: u64, data: &[u8]) {
        let Some(reg) = self.target(port) else {
            return;
        };
        for (i, &v) in data.iter().enumerate() {
            let off = reg + i;
            if let Some(b) = self.state.config.get_mut(off) {
                let wm = write_mask(off);
                *b = (*b & !wm) | (v & wm);
                *b &= !(v & w1c_mask(off));
            }
        }
    }
}

impl BusDevice for PciHost {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let port = base.wrapping_add(offset);
        let data = if data.len() > 4 {
            let (head, tail) = data.split_at_mut(4);
            tail.fill(0xFF);
            head
        } else {
            data
        };
        match (port, data.len()) {
            (PCI_CONFIG_ADDRESS, 4) => data.copy_from_slice(&self.state.address.to_le_bytes()),
            (RESET_CONTROL, 1) => data[0] = self.state.reset_control,
            (PCI_CONFIG_DATA..=0xCFF, _) => self.read_config(port, data),
            _ => data.fill(0xFF),
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<BusEvent> {
        let port = base.wrapping_add(offset);
        let data = &data[..data.len().min(4)];
        match (port, data.len()) {
            (PCI_CONFIG_ADDRESS, 4) => {
                self.state.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            (RESET_CONTROL, 1) => {
                if data[0] & 0x04 != 0 {
                    return Some(BusEvent::Reset);
                }
                self.state.reset_control = data[0] & 0x02;
            }
            (PCI_CONFIG_DATA..=0xCFF, _) => self.write_config(port, data),
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(bus: u32, dev: u32, func: u32, reg: u32) -> u32 {
        ENABLE | bus << 16 | dev << 11 | func << 8 | reg
    }

    fn set(p: &mut PciHost, a: u32) {
        assert_eq!(p.write(0xCF8, 0, &a.to_le_bytes()), None);
    }

    fn rd(p: &mut PciHost, port: u64, len: usize) -> u32 {
        let mut b = [0u8; 4];
        p.read(0xCF8, port - 0xCF8, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    #[test]
    fn host_bridge_ids_by_dword_word_and_byte() {
        let mut p = PciHost::new();
        set(&mut p, addr(0, 0, 0, 0));
        assert_eq!(rd(&mut p, 0xCF8, 4), addr(0, 0, 0, 0));
        assert_eq!(rd(&mut p, 0xCFC, 4), 0x1237_8086);
        assert_eq!(rd(&mut p, 0xCFC, 2), 0x8086);
        assert_eq!(rd(&mut p, 0xCFE, 2), 0x1237);
        assert_eq!(rd(&mut p, 0xCFD, 1), 0x80);
        assert_eq!(rd(&mut p, 0xCFF, 1), 0x12);
        set(&mut p, addr(0, 0, 0, 8));
        assert_eq!(rd(&mut p, 0xCFC, 4), 0x0600_0002);
        assert_eq!(rd(&mut p, 0xCFF, 1), 0x06);
        set(&mut p, addr(0, 0, 0, 0x0C));
        assert_eq!(rd(&mut p, 0xCFE, 1), 0x00, "header type 0");
        set(&mut p, addr(0, 0, 0, 0x2C));
        assert_eq!(rd(&mut p, 0xCFC, 4), 0x1100_1AF4);
    }

    #[test]
    fn absent_functions_and_disabled_address_read_all_ones() {
        let mut p = PciHost::new();
        for a in [
            addr(0, 1, 0, 0),
            addr(0, 0, 1, 0),
            addr(1, 0, 0, 0),
            addr(0, 31, 7, 0xFC),
            0,
        ] {
            set(&mut p, a);
            assert_eq!(rd(&mut p, 0xCFC, 4), 0xFFFF_FFFF, "{a:#x}");
            assert_eq!(rd(&mut p, 0xCFD, 1), 0xFF);
            p.write(0xCF8, 4, &[0; 4]);
        }
        set(&mut p, addr(0, 0, 0, 0));
        assert_eq!(rd(&mut p, 0xCFC, 4), 0x1237_8086, "the writes above changed nothing");
    }

    #[test]
    fn only_writable_bits_change() {
        let mut p = PciHost::new();
        set(&mut p, addr(0, 0, 0, 0));
        p.write(0xCF8, 4, &[0xFF; 4]);
        assert_eq!(rd(&mut p, 0xCFC, 4), 0x1237_8086);
        set(&mut p, addr(0, 0, 0, 4));
        p.write(0xCF8, 4, &[0xFF; 4]);
        assert_eq!(rd(&mut p, 0xCFC, 4), 0x0000_0507);
        set(&mut p, addr(0, 0, 0, 0x3C));
        p.write(0xCF8, 4, &0xFFFF_FF0Bu32.to_le_bytes());
        assert_eq!(rd(&mut p, 0xCFC, 4), 0x0B);
        set(&mut p, addr(0, 0, 0, 0x70));
        p.write(0xCF8, 6, &[0x0A]);
        assert_eq!(rd(&mut p, 0xCFC, 4), 0x000A_0000, "SMRAM is writable");
        // A dword that runs past the end of config space reads zeros there.
        set(&mut p, addr(0, 0, 0, 0xFC));
        p.write(0xCF8, 4, &[1, 2, 3, 4]);
        assert_eq!(rd(&mut p, 0xCFE, 4), 0x0403);
    }

    #[test]
    fn address_register_wants_a_dword_at_cf8() {
        let mut p = PciHost::new();
        set(&mut p, addr(0, 0, 0, 0));
        p.write(0xCF8, 0, &[0x08, 0x00]);
        p.write(0xCF8, 3, &[0x00]);
        assert_eq!(rd(&mut p, 0xCF8, 4), addr(0, 0, 0, 0));
        assert_eq!(rd(&mut p, 0xCF8, 2), 0xFFFF);
        assert_eq!(rd(&mut p, 0xCFA, 1), 0xFF);
    }

    #[test]
    fn reset_control_register() {
        let mut p = PciHost::new();
        assert_eq!(p.write(0xCF8, 1, &[0x02]), None);
        assert_eq!(rd(&mut p, 0xCF9, 1), 0x02);
        assert_eq!(p.write(0xCF8, 1, &[0x06]), Some(BusEvent::Reset));
        let st = p.state();
        assert_eq!(PciHost::from_state(&st).unwrap().state(), st);
        let bad = PciState {
            config: vec![0; 255],
            ..st
        };
        assert_eq!(PciHost::from_state(&bad).err(), Some(PciError::BadConfigLength(255)));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Address(u32),
        Read(u64, usize),
        Write(u64, usize, u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        let a = (any::<bool>(), 0u32..2, 0u32..2, 0u32..2, any::<u8>(), 0u32..128).prop_map(
            |(en, bus, dev, func, reg, junk)| {
                (if en { ENABLE } else { 0 }) | junk << 24 | bus << 16 | dev << 11 | func << 8 | u32::from(reg)
            },
        );
        let size = prop::sample::select(vec![1usize, 2, 4]);
        prop_oneof![
            a.prop_map(Op::Address),
            (0xCF8u64..0xD00, size.clone()).prop_map(|(p, s)| Op::Read(p, s)),
            (0xCF8u64..0xD00, size, any::<u32>()).prop_map(|(p, s, v)| Op::Write(p, s, v)),
        ]
    }

    proptest! {
        /// No access sequence panics, and every data read matches a byte-wise
        /// reference config space that takes writes only in writable bits.
        #[test]
        fn reads_match_reference(ops in prop::collection::vec(op(), 0..300)) {
            let mut p = PciHost::new();
            let mut reference = host_bridge_config();
            let writable = |o: usize| -> u8 {
                if o >= 0x40 || o == 0x0C || o == 0x3C { 0xFF } else if o == 4 { 0x07 } else if o == 5 { 0x05 } else { 0 }
            };
            let mut address = 0u32;
            for o in ops {
                let selected = address >> 31 == 1 && (address >> 8) & 0xFFFF == 0;
                match o {
                    Op::Address(a) => { set(&mut p, a); address = a; }
                    Op::Read(port, size) => {
                        let mut d = [0u8; 4];
                        p.read(0xCF8, port - 0xCF8, &mut d[..size]);
                        if port >= 0xCFC {
                            for (i, &b) in d[..size].iter().enumerate() {
                                let off = ((address & 0xFC) as usize) + ((address as usize | port as usize) & 3) + i;
                                let want = if !selected { 0xFF } else { reference.get(off).copied().unwrap_or(0) };
                                prop_assert_eq!(b, want);
                            }
                        } else if port == 0xCF8 && size == 4 {
                            prop_assert_eq!(u32::from_le_bytes(d), address);
                        }
                    }
                    Op::Write(port, size, v) => {
                        let ev = p.write(0xCF8, port - 0xCF8, &v.to_le_bytes()[..size]);
                        prop_assert_eq!(ev.is_some(), port == 0xCF9 && size == 1 && v & 4 != 0);
                        if port == 0xCF8 && size == 4 {
                            address = v;
                        } else if port >= 0xCFC && selected {
                            for i in 0..size {
                                let off = ((address & 0xFC) as usize) + ((address as usize | port as usize) & 3) + i;
                                if off < CONFIG_LEN {
                                    let m = writable(off);
                                    reference[off] = (reference[off] & !m) | ((v >> (8 * i)) as u8 & m);
                                }
                            }
                        }
                    }
                }
            }
            prop_assert_eq!(p.state().config, reference);
        }
    }
}
