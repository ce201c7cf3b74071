//! The PCI host: configuration mechanism #1 (address register at 0xCF8,
//! data at 0xCFC-0xCFF), the ECAM window (one 4 KiB page of config space
//! per function, described to the guest by the MCFG table), bus 0 with the
//! i440FX host bridge at 00:00.0 as QEMU's `pc` machine shows it (8086:1237
//! rev 2, class 06:00:00, subsystem 1af4:1100) and the functions the
//! machine adds ([`PciHost::add_device`], one per slot, function 0), and the
//! windows through which the guest reaches their BARs.
//!
//! The host bridge's config space is 256 bytes, writable where QEMU's write
//! mask allows (command bits, cache line size, interrupt line, and the
//! device-specific area 0x40-0xFF; the PAM and SMRAM registers there are
//! stored but change no memory mapping), read-only elsewhere. Any absent
//! function reads all-ones and ignores writes, and so does the data port
//! while the address register's enable bit is clear. ECAM decodes bus 0
//! only; config space beyond the first 256 bytes of a function reads zero.
//!
//! Register the host at 0xCF8 with length 8, at [`ECAM_BASE`] on the MMIO
//! bus, and at the BAR windows ([`IO_WINDOW`], [`MMIO_WINDOW`],
//! [`MMIO64_WINDOW`]). A dword at 0xCF8 is the address register; a byte at
//! 0xCF9 is the PIIX reset control register (writing bit 2 resets the
//! machine, as QEMU's `rcr_write`); other accesses to 0xCF8-0xCFB read
//! all-ones and are ignored. An access in a window goes to the function
//! whose decoded BAR contains it (the lowest slot if BARs overlap), or
//! reads all-ones.

use crate::bus::{BusDevice, BusEvent};
use crate::pci_config::BarKind;
use crate::pci_device::PciDevice;

/// The first port of the mechanism.
pub const PCI_CONFIG_ADDRESS: u64 = 0xCF8;
/// The first data port.
pub const PCI_CONFIG_DATA: u64 = 0xCFC;
/// Ports decoded from [`PCI_CONFIG_ADDRESS`].
pub const PCI_IO_LEN: u64 = 8;
/// Size of a conventional config space.
pub const CONFIG_LEN: usize = 256;
/// Base of the ECAM window (bus 0: 32 devices x 8 functions x 4 KiB).
pub const ECAM_BASE: u64 = 0xC000_0000;
/// Size of the ECAM window (bus 0 only).
pub const ECAM_SIZE: u64 = 1 << 20;
/// The I/O port window for I/O BARs `(base, length)`.
pub const IO_WINDOW: (u64, u64) = (0xC000, 0x4000);
/// The 32-bit MMIO window for memory BARs `(base, length)`, below the
/// IOAPIC.
pub const MMIO_WINDOW: (u64, u64) = (0xD000_0000, 0x2C00_0000);
/// The 64-bit MMIO window for memory BARs `(base, length)`, at 128 GiB,
/// above any RAM Nyx gives a guest.
pub const MMIO64_WINDOW: (u64, u64) = (0x20_0000_0000, 0x10_0000_0000);

/// The host bridge's vendor and device ID (the i440FX).
pub const HOST_BRIDGE_IDS: (u16, u16) = (0x8086, 0x1237);

const RESET_CONTROL: u64 = 0xCF9;
const ENABLE: u32 = 1 << 31;

/// Errors of restoring the PCI host from a snapshot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// The snapshot's config space does not have 256 bytes.
    #[error("PCI state holds {0} config-space bytes; it must hold exactly 256")]
    BadConfigLength(usize),
    /// The snapshot's functions are not the machine's.
    #[error("PCI state: {0}")]
    Functions(String),
}

/// A function's state in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FunctionState {
    /// Its slot on bus 0.
    pub slot: u8,
    /// The device's name ([`PciDevice::name`]).
    pub name: String,
    /// Its 256-byte config space.
    pub config: Vec<u8>,
    /// What [`PciDevice::save`] returned.
    pub device: Vec<u8>,
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
    /// The functions the machine added, by slot.
    pub functions: Vec<FunctionState>,
}

impl Default for PciState {
    fn default() -> Self {
        Self {
            address: 0,
            config: host_bridge_config(),
            reset_control: 0,
            functions: Vec::new(),
        }
    }
}

/// The i440FX's config space after reset, as QEMU builds it.
fn host_bridge_config() -> Vec<u8> {
    let mut c = vec![0u8; CONFIG_LEN];
    c[0x00..0x02].copy_from_slice(&HOST_BRIDGE_IDS.0.to_le_bytes());
    c[0x02..0x04].copy_from_slice(&HOST_BRIDGE_IDS.1.to_le_bytes());
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

/// Where a config access goes.
enum Target {
    /// Nowhere: all-ones.
    None,
    /// The host bridge, at this offset.
    Host(usize),
    /// Function `index` of [`PciHost::functions`], at this offset.
    Function(usize, usize),
}

struct Function {
    slot: u8,
    device: Box<dyn PciDevice>,
}

/// The PCI host with its functions.
#[derive(Default)]
pub struct PciHost {
    state: PciState,
    functions: Vec<Function>,
}

impl std::fmt::Debug for PciHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.functions.iter().map(|d| (d.slot, d.device.name())).collect();
        f.debug_struct("PciHost").field("functions", &names).finish()
    }
}

impl PciHost {
    /// The host bridge after reset, with no other function.
    pub fn new() -> Self {
        Self::default()
    }

    /// The host restored from a snapshot, without its functions: add them
    /// with [`PciHost::add_device`], then call
    /// [`PciHost::restore_functions`].
    pub fn from_state(state: &PciState) -> Result<Self, PciError> {
        if state.config.len() != CONFIG_LEN {
            return Err(PciError::BadConfigLength(state.config.len()));
        }
        Ok(Self {
            state: PciState {
                functions: Vec::new(),
                ..state.clone()
            },
            functions: Vec::new(),
        })
    }

    /// Puts `device` at `slot` (1..32) of bus 0, function 0. A slot taken
    /// twice or out of range is a bug in the machine's layout and panics.
    pub fn add_device(&mut self, slot: u8, device: Box<dyn PciDevice>) {
        assert!((1..32).contains(&slot), "PCI slot {slot} out of range");
        assert!(
            self.functions.iter().all(|f| f.slot != slot),
            "PCI slot {slot} taken twice"
        );
        self.functions.push(Function { slot, device });
        self.functions.sort_by_key(|f| f.slot);
    }

    /// Takes every function out of the bus (to move them into a host
    /// rebuilt from a snapshot).
    pub fn take_devices(&mut self) -> Vec<(u8, Box<dyn PciDevice>)> {
        self.functions.drain(..).map(|f| (f.slot, f.device)).collect()
    }

    /// The functions as `(slot, name)`.
    pub fn devices(&self) -> Vec<(u8, String)> {
        self.functions
            .iter()
            .map(|f| (f.slot, f.device.name().to_string()))
            .collect()
    }

    /// The snapshot of this host and its functions.
    pub fn state(&self) -> PciState {
        PciState {
            functions: self
                .functions
                .iter()
                .map(|f| FunctionState {
                    slot: f.slot,
                    name: f.device.name().to_string(),
                    config: f.device.config().bytes().to_vec(),
                    device: f.device.save(),
                })
                .collect(),
            ..self.state.clone()
        }
    }

    /// Restores the functions' states of a snapshot into the functions
    /// added since [`PciHost::from_state`]; they must be the same devices
    /// in the same slots.
    pub fn restore_functions(&mut self, states: &[FunctionState]) -> Result<(), PciError> {
        let have: Vec<_> = self.devices();
        let want: Vec<_> = states.iter().map(|s| (s.slot, s.name.clone())).collect();
        if have != want {
            return Err(PciError::Functions(format!(
                "the snapshot has PCI functions {want:?}, the machine {have:?}"
            )));
        }
        for (f, s) in self.functions.iter_mut().zip(states) {
            let name = s.name.clone();
            f.device
                .config_mut()
                .restore(&s.config)
                .map_err(|e| PciError::Functions(format!("{name}: {e}")))?;
            f.device
                .restore(&s.device)
                .map_err(|e| PciError::Functions(format!("{name}: {e}")))?;
        }
        Ok(())
    }

    /// Makes what every function wrote to the host durable
    /// ([`PciDevice::flush_storage`]); the first failure names its
    /// function.
    pub fn flush_storage(&mut self) -> Result<(), String> {
        for f in &mut self.functions {
            f.device
                .flush_storage()
                .map_err(|e| format!("{} at 00:{:02x}.0: {e}", f.device.name(), f.slot))?;
        }
        Ok(())
    }

    /// Lets every function do work outside guest accesses.
    pub fn poll(&mut self) {
        for f in &mut self.functions {
            f.device.poll();
        }
    }

    fn target_of(&self, bus: u32, dev: u32, func: u32, reg: usize) -> Target {
        if bus != 0 || func != 0 {
            return Target::None;
        }
        if dev == 0 {
            return Target::Host(reg);
        }
        match self.functions.iter().position(|f| u32::from(f.slot) == dev) {
            Some(i) => Target::Function(i, reg),
            None => Target::None,
        }
    }

    /// Where a data access at `port` goes, by the address register.
    fn target(&self, port: u64) -> Target {
        let a = self.state.address;
        if a & ENABLE == 0 {
            return Target::None;
        }
        let reg = ((a | (port & 3) as u32) & 0xFF) as usize;
        self.target_of((a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 7, reg)
    }

    fn read_config(&mut self, target: Target, data: &mut [u8]) {
        match target {
            Target::None => data.fill(0xFF),
            Target::Host(reg) => {
                for (i, d) in data.iter_mut().enumerate() {
                    *d = self.state.config.get(reg + i).copied().unwrap_or(0);
                }
            }
            Target::Function(i, reg) => self.functions[i].device.config().read(reg, data),
        }
    }

    fn write_config(&mut self, target: Target, data: &[u8]) {
        match target {
            Target::None => {}
            Target::Host(reg) => {
                for (i, &v) in data.iter().enumerate() {
                    let off = reg + i;
                    if let Some(b) = self.state.config.get_mut(off) {
                        let wm = write_mask(off);
                        *b = (*b & !wm) | (v & wm);
                        *b &= !(v & w1c_mask(off));
                    }
                }
            }
            Target::Function(i, reg) => {
                let d = &mut self.functions[i].device;
                if reg < CONFIG_LEN {
                    d.config_mut().write(reg, data);
                    d.config_written(reg, data.len());
                }
            }
        }
    }

    /// The function and BAR whose decoded range holds `addr`, with the
    /// offset into the BAR.
    fn bar_at(&self, addr: u64, io: bool) -> Option<(usize, usize, u64)> {
        for (i, f) in self.functions.iter().enumerate() {
            let c = f.device.config();
            for bar in 0..6 {
                if let Some((base, size, kind)) = c.bar_range(bar) {
                    if (kind == BarKind::Io) == io && addr >= base && addr - base < size {
                        return Some((i, bar, addr - base));
                    }
                }
            }
        }
        None
    }
}

/// Splits a data-port access that is wider than a dword.
fn at_most_dword(data: &mut [u8]) -> &mut [u8] {
    if data.len() > 4 {
        let (head, tail) = data.split_at_mut(4);
        tail.fill(0xFF);
        head
    } else {
        data
    }
}

impl BusDevice for PciHost {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let addr = base.wrapping_add(offset);
        match base {
            PCI_CONFIG_ADDRESS => {
                let data = at_most_dword(data);
                match (addr, data.len()) {
                    (PCI_CONFIG_ADDRESS, 4) => data.copy_from_slice(&self.state.address.to_le_bytes()),
                    (RESET_CONTROL, 1) => data[0] = self.state.reset_control,
                    (PCI_CONFIG_DATA..=0xCFF, _) => {
                        let t = self.target(addr);
                        self.read_config(t, data)
                    }
                    _ => data.fill(0xFF),
                }
            }
            ECAM_BASE => {
                let data = at_most_dword(data);
                let t = ecam_target(self, offset, data.len());
                self.read_config(t, data)
            }
            _ => match self.bar_at(addr, base == IO_WINDOW.0) {
                Some((i, bar, off)) => self.functions[i].device.bar_read(bar, off, data),
                None => data.fill(0xFF),
            },
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<BusEvent> {
        let addr = base.wrapping_add(offset);
        match base {
            PCI_CONFIG_ADDRESS => {
                let data = &data[..data.len().min(4)];
                match (addr, data.len()) {
                    (PCI_CONFIG_ADDRESS, 4) => {
                        self.state.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                    }
                    (RESET_CONTROL, 1) => {
                        if data[0] & 0x04 != 0 {
                            return Some(BusEvent::Reset);
                        }
                        self.state.reset_control = data[0] & 0x02;
                    }
                    (PCI_CONFIG_DATA..=0xCFF, _) => {
                        let t = self.target(addr);
                        self.write_config(t, data)
                    }
                    _ => {}
                }
            }
            ECAM_BASE => {
                let data = &data[..data.len().min(4)];
                let t = ecam_target(self, offset, data.len());
                self.write_config(t, data)
            }
            _ => {
                if let Some((i, bar, off)) = self.bar_at(addr, base == IO_WINDOW.0) {
                    self.functions[i].device.bar_write(bar, off, data)
                }
            }
        }
        None
    }
}

/// Where an ECAM access at `offset` of `len` bytes goes: an access must
/// stay inside its dword, as the PCIe spec requires of config requests.
fn ecam_target(host: &PciHost, offset: u64, len: usize) -> Target {
    let reg = (offset & 0xFFF) as usize;
    if reg % 4 + len > 4 {
        return Target::None;
    }
    if reg >= CONFIG_LEN {
        // Extended config space: present but empty (zeros) for functions.
        return match host.target_of(0, ((offset >> 15) & 0x1F) as u32, ((offset >> 12) & 7) as u32, 0) {
            Target::None => Target::None,
            Target::Host(_) => Target::Host(CONFIG_LEN),
            Target::Function(i, _) => Target::Function(i, CONFIG_LEN),
        };
    }
    host.target_of(
        ((offset >> 20) & 0xFF) as u32,
        ((offset >> 15) & 0x1F) as u32,
        ((offset >> 12) & 7) as u32,
        reg,
    )
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

        /// Random accesses through every door of the host (mechanism #1,
        /// ECAM, the BAR windows) never panic, and a BAR access reaches the
        /// function exactly when the guest's programming decodes it there.
        #[test]
        fn windows_reach_only_decoded_bars(ops in prop::collection::vec(host_op(), 0..300)) {
            let log = Arc::new(Mutex::new(Vec::new()));
            let mut p = PciHost::new();
            p.add_device(3, Box::new(Probe::new(log.clone())));
            for o in ops {
                match o {
                    HostOp::Cfg(reg, size, v) => {
                        set(&mut p, addr(0, 3, 0, reg & 0xFC));
                        let port = 0xCFC + u64::from(reg & 3);
                        p.write(0xCF8, port - 0xCF8, &v.to_le_bytes()[..size]);
                    }
                    HostOp::Ecam(off, size, v, write) => {
                        let mut d = v.to_le_bytes();
                        if write {
                            p.write(ECAM_BASE, off, &d[..size]);
                        } else {
                            p.read(ECAM_BASE, off, &mut d[..size]);
                        }
                    }
                    HostOp::Window(io, off, size) => {
                        let (base, len) = if io { IO_WINDOW } else { MMIO_WINDOW };
                        let at = base + off % len;
                        let expect = {
                            let c = &p.functions[0].device;
                            (0..6).find_map(|b| {
                                c.config().bar_range(b).filter(|&(a, s, k)| (k == BarKind::Io) == io && at >= a && at - a < s).map(|(a, _, _)| (b, at - a))
                            })
                        };
                        log.lock().unwrap().clear();
                        let mut d = [0u8; 8];
                        p.read(base, at - base, &mut d[..size]);
                        let got = log.lock().unwrap().clone();
                        match expect {
                            Some(hit) => prop_assert_eq!(got, vec![hit]),
                            None => {
                                prop_assert!(got.is_empty());
                                prop_assert!(d[..size].iter().all(|&b| b == 0xFF));
                            }
                        }
                    }
                }
            }
        }
    }

    use crate::pci_config::{PciConfig, PciIds};
    use std::sync::{Arc, Mutex};

    /// A function with an I/O BAR 0, a memory BAR 1 and a 64-bit BAR 2
    /// that logs which BAR and offset each access reached.
    struct Probe {
        config: PciConfig,
        log: Arc<Mutex<Vec<(usize, u64)>>>,
    }

    impl Probe {
        fn new(log: Arc<Mutex<Vec<(usize, u64)>>>) -> Self {
            let mut config = PciConfig::new(PciIds {
                vendor: 0x1234,
                device: 0x5678,
                revision: 0,
                class: 0,
                subsystem_vendor: 0,
                subsystem: 0,
            });
            config.add_bar(0, 0x100, BarKind::Io);
            config.add_bar(1, 0x1000, BarKind::Mem32);
            config.add_bar(2, 0x4000, BarKind::Mem64 { prefetchable: false });
            Probe { config, log }
        }
    }

    impl PciDevice for Probe {
        fn name(&self) -> &str {
            "probe"
        }
        fn config(&self) -> &PciConfig {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfig {
            &mut self.config
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            self.log.lock().unwrap().push((bar, offset));
            data.fill(0);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, _data: &[u8]) {
            self.log.lock().unwrap().push((bar, offset));
        }
        fn save(&self) -> Vec<u8> {
            vec![7]
        }
        fn restore(&mut self, state: &[u8]) -> Result<(), String> {
            (state == [7]).then_some(()).ok_or_else(|| "bad".into())
        }
    }

    #[derive(Debug, Clone)]
    enum HostOp {
        Cfg(u32, usize, u32),
        Ecam(u64, usize, u32, bool),
        Window(bool, u64, usize),
    }

    fn host_op() -> impl Strategy<Value = HostOp> {
        let size = prop::sample::select(vec![1usize, 2, 4]);
        // Config writes favour the command register and the BARs, with
        // addresses inside the windows, so that BARs get decoded.
        let value = prop_oneof![
            any::<u32>(),
            (0u32..0x40).prop_map(|i| 0xC000 + i * 0x100 + 1),
            (0u32..0x40).prop_map(|i| 0xD000_0000 + i * 0x1000),
            Just(0x7u32),
        ];
        prop_oneof![
            (
                prop::sample::select(vec![0x04u32, 0x10, 0x14, 0x18, 0x1C, 0x3C, 0x40]),
                size.clone(),
                value
            )
                .prop_map(|(r, s, v)| HostOp::Cfg(r, s, v)),
            (0u64..ECAM_SIZE, size.clone(), any::<u32>(), any::<bool>())
                .prop_map(|(o, s, v, w)| HostOp::Ecam(o, s, v, w)),
            (
                any::<bool>(),
                0u64..0x50000,
                prop::sample::select(vec![1usize, 2, 4, 8])
            )
                .prop_map(|(io, o, s)| HostOp::Window(io, o, s)),
        ]
    }

    #[test]
    fn functions_answer_on_both_mechanisms_and_snapshot_by_slot() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut p = PciHost::new();
        p.add_device(3, Box::new(Probe::new(log.clone())));
        set(&mut p, addr(0, 3, 0, 0));
        assert_eq!(rd(&mut p, 0xCFC, 4), 0x5678_1234);
        let mut d = [0u8; 4];
        p.read(ECAM_BASE, 3 << 15, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x5678_1234);
        p.read(ECAM_BASE, (3 << 15) | 0x100, &mut d);
        assert_eq!(d, [0; 4], "extended config space reads zero");
        p.read(ECAM_BASE, (4 << 15) | 0x100, &mut d);
        assert_eq!(d, [0xFF; 4], "absent function");
        p.read(ECAM_BASE, 3 << 15 | 2, &mut d);
        assert_eq!(d, [0xFF; 4], "an access across a dword");
        // Program BAR 1 through ECAM, enable memory, reach it.
        p.write(ECAM_BASE, 3 << 15 | 0x14, &0xD000_2000u32.to_le_bytes());
        p.write(ECAM_BASE, 3 << 15 | 0x04, &[0x02, 0, 0, 0]);
        p.read(MMIO_WINDOW.0, 0x2010, &mut d);
        assert_eq!(log.lock().unwrap().clone(), vec![(1, 0x10)]);
        assert_eq!(p.devices(), vec![(3, "probe".to_string())]);
        let st = p.state();
        let mut q = PciHost::from_state(&st).unwrap();
        q.add_device(3, Box::new(Probe::new(log.clone())));
        q.restore_functions(&st.functions).unwrap();
        assert_eq!(q.state(), st);
        let mut r = PciHost::from_state(&st).unwrap();
        r.add_device(4, Box::new(Probe::new(log)));
        assert!(r.restore_functions(&st.functions).is_err(), "another slot");
        assert_eq!(r.take_devices().len(), 1);
    }
}
