//! The 256-byte configuration space of a PCI function (type 0 header), the
//! part every PCI device of Nyx shares: IDs and class, the command and
//! status registers, up to six BARs, the capabilities list, the interrupt
//! line and pin.
//!
//! A byte changes only where the write mask allows it (QEMU's `wmask`), and
//! status bits are write-one-to-clear. A BAR is sized the usual way: the
//! guest writes all-ones and reads back the size mask, because the mask
//! keeps the bits below the size and the type bits read-only. A 64-bit
//! memory BAR takes two slots, the upper one fully writable. The function
//! decodes a BAR only while its space is enabled in the command register
//! ([`PciConfig::bar_range`]).

use serde::{Deserialize, Serialize};

/// Size of the conventional config space.
pub const CONFIG_SPACE: usize = 256;
/// Offset of the first BAR.
pub const BAR0: usize = 0x10;
/// Command register bit: the function decodes its I/O BARs.
pub const CMD_IO: u16 = 1 << 0;
/// Command register bit: the function decodes its memory BARs.
pub const CMD_MEMORY: u16 = 1 << 1;
/// Command register bit: the function may master the bus (DMA, MSI).
pub const CMD_BUS_MASTER: u16 = 1 << 2;
/// Command register bit: INTx is disabled.
pub const CMD_INTX_DISABLE: u16 = 1 << 10;
/// Status register bit: the function has a capabilities list.
const STATUS_CAP_LIST: u16 = 1 << 4;
/// Status register bit: INTx is asserted.
pub const STATUS_INTERRUPT: u16 = 1 << 3;
const CAP_POINTER: usize = 0x34;

/// What a BAR maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    /// Port I/O.
    Io,
    /// 32-bit memory.
    Mem32,
    /// 64-bit memory (takes this slot and the next).
    Mem64 {
        /// The prefetchable bit.
        prefetchable: bool,
    },
}

/// A BAR's fixed properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bar {
    /// The size in bytes, a power of two (at least 16 for memory, 4 for I/O).
    pub size: u64,
    /// What it maps.
    pub kind: BarKind,
}

/// The identity of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code, subclass, programming interface (24 bits).
    pub class: u32,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// Errors of restoring a config space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The snapshot's config space has the wrong length.
    #[error("PCI config space of {0} bytes; it must have 256")]
    Length(usize),
}

/// A function's config space with its write masks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciConfig {
    bytes: Vec<u8>,
    wmask: Vec<u8>,
    w1c: Vec<u8>,
    bars: [Option<Bar>; 6],
    /// Where the next capability goes (capabilities grow from 0x40 up).
    next_cap: usize,
    /// The config offset of the last capability's next pointer.
    last_link: usize,
}

impl PciConfig {
    /// A function with these IDs, no BARs and no capabilities. Command
    /// bits I/O, memory, bus master and INTx-disable are writable, as are
    /// cache line size, latency timer and interrupt line.
    pub fn new(ids: PciIds) -> Self {
        let mut c = PciConfig {
            bytes: vec![0; CONFIG_SPACE],
            wmask: vec![0; CONFIG_SPACE],
            w1c: vec![0; CONFIG_SPACE],
            bars: [None; 6],
            next_cap: 0x40,
            last_link: CAP_POINTER,
        };
        c.put16(0x00, ids.vendor);
        c.put16(0x02, ids.device);
        c.bytes[0x08] = ids.revision;
        c.bytes[0x09..0x0C].copy_from_slice(&ids.class.to_le_bytes()[..3]);
        c.put16(0x2C, ids.subsystem_vendor);
        c.put16(0x2E, ids.subsystem);
        c.wmask[0x04] = (CMD_IO | CMD_MEMORY | CMD_BUS_MASTER) as u8;
        c.wmask[0x05] = (CMD_INTX_DISABLE >> 8) as u8;
        c.w1c[0x07] = 0xF9; // error bits of the status register
        c.wmask[0x0C] = 0xFF;
        c.wmask[0x0D] = 0xFF;
        c.wmask[0x3C] = 0xFF;
        c
    }

    fn put16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn get16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }

    fn get32(&self, off: usize) -> u32 {
        u32::from_le_bytes([
            self.bytes[off],
            self.bytes[off + 1],
            self.bytes[off + 2],
            self.bytes[off + 3],
        ])
    }

    fn put32_masked(&mut self, off: usize, value: u32, mask: u32) {
        self.bytes[off..off + 4].copy_from_slice(&value.to_le_bytes());
        self.wmask[off..off + 4].copy_from_slice(&mask.to_le_bytes());
    }

    /// Declares BAR `index` (0..6; a 64-bit BAR also takes `index + 1`).
    /// `size` is rounded up to a power of two and to the type's minimum.
    /// Declaring a BAR over one already declared, or a 64-bit BAR in slot
    /// 5, is a bug in the device model and panics.
    pub fn add_bar(&mut self, index: usize, size: u64, kind: BarKind) {
        let min = if kind == BarKind::Io { 4 } else { 16 };
        let size = size.max(min).next_power_of_two();
        let wide = matches!(kind, BarKind::Mem64 { .. });
        assert!(index < 6 && !(wide && index == 5), "BAR {index} does not fit");
        assert!(self.bars[index].is_none(), "BAR {index} declared twice");
        let off = BAR0 + 4 * index;
        let low_mask = !(size - 1) as u32;
        match kind {
            BarKind::Io => self.put32_masked(off, 0x1, low_mask & !0x3),
            BarKind::Mem32 => self.put32_masked(off, 0x0, low_mask & !0xF),
            BarKind::Mem64 { prefetchable } => {
                let flags = 0x4 | if prefetchable { 0x8 } else { 0 };
                self.put32_masked(off, flags, low_mask & !0xF);
                self.put32_masked(off + 4, 0, !((size - 1) >> 32) as u32);
            }
        }
        self.bars[index] = Some(Bar { size, kind });
    }

    /// BAR `index`'s declaration, if the device has one there.
    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    /// The address BAR `index` is programmed with (whether or not it is
    /// decoded), None if there is no BAR there.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bar(index)?;
        let off = BAR0 + 4 * index;
        let low = u64::from(self.get32(off));
        Some(match bar.kind {
            BarKind::Io => low & !0x3,
            BarKind::Mem32 => low & !0xF,
            BarKind::Mem64 { .. } => (low & !0xF) | u64::from(self.get32(off + 4)) << 32,
        })
    }

    /// Programs BAR `index` (as firmware does at build). Bits below the
    /// BAR's size are dropped.
    pub fn set_bar_address(&mut self, index: usize, address: u64) {
        let Some(bar) = self.bar(index) else { return };
        let off = BAR0 + 4 * index;
        let a = address & !(bar.size - 1);
        let flags = self.get32(off) & if bar.kind == BarKind::Io { 0x3 } else { 0xF };
        self.bytes[off..off + 4].copy_from_slice(&((a as u32) | flags).to_le_bytes());
        if matches!(bar.kind, BarKind::Mem64 { .. }) {
            self.bytes[off + 4..off + 8].copy_from_slice(&((a >> 32) as u32).to_le_bytes());
        }
    }

    /// The range `(address, size, kind)` BAR `index` decodes now: None if
    /// there is no BAR, its space is disabled in the command register, or
    /// it is unprogrammed (address 0) or being sized (all-ones).
    pub fn bar_range(&self, index: usize) -> Option<(u64, u64, BarKind)> {
        let bar = self.bar(index)?;
        let enabled = match bar.kind {
            BarKind::Io => CMD_IO,
            _ => CMD_MEMORY,
        };
        if self.command() & enabled == 0 {
            return None;
        }
        let a = self.bar_address(index)?;
        let top = match bar.kind {
            BarKind::Io => 0x1_0000,
            BarKind::Mem32 => 0x1_0000_0000,
            BarKind::Mem64 { .. } => u64::MAX,
        };
        (a != 0 && a.checked_add(bar.size).is_some_and(|end| end <= top)).then_some((a, bar.size, bar.kind))
    }

    /// Appends a capability with `id` and `body` (the bytes after the ID
    /// and next pointer); `writable` gives the write mask of the body's
    /// bytes (shorter means read-only for the rest). Returns the
    /// capability's config offset. Capabilities that do not fit are a bug
    /// in the device model and panic.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> usize {
        let off = self.next_cap;
        let len = 2 + body.len();
        assert!(off + len <= CONFIG_SPACE, "capability {id:#x} does not fit");
        self.bytes[off] = id;
        self.bytes[off + 1] = 0;
        self.bytes[off + 2..off + len].copy_from_slice(body);
        for (i, &m) in writable.iter().take(body.len()).enumerate() {
            self.wmask[off + 2 + i] = m;
        }
        self.bytes[self.last_link] = off as u8;
        self.last_link = off + 1;
        self.next_cap = (off + len + 3) & !3;
        let status = self.get16(0x06) | STATUS_CAP_LIST;
        self.put16(0x06, status);
        off
    }

    /// Sets the interrupt pin (1 = INTA) and line (what firmware routed it
    /// to).
    pub fn set_interrupt(&mut self, pin: u8, line: u8) {
        self.bytes[0x3D] = pin;
        self.bytes[0x3C] = line;
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.get16(0x04)
    }

    /// Sets or clears the status register's interrupt bit (INTx asserted).
    pub fn set_interrupt_status(&mut self, asserted: bool) {
        let s = self.get16(0x06) & !STATUS_INTERRUPT | if asserted { STATUS_INTERRUPT } else { 0 };
        self.put16(0x06, s);
    }

    /// Reads `data.len()` bytes at `offset` (past the end: zeros).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.bytes.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// The byte at `offset` (past the end: zero).
    pub fn byte(&self, offset: usize) -> u8 {
        self.bytes.get(offset).copied().unwrap_or(0)
    }

    /// A little-endian word at `offset` (past the end: zero bytes).
    pub fn word(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.byte(offset), self.byte(offset + 1)])
    }

    /// Sets a byte the device owns (a capability's read-only field).
    pub fn set_byte(&mut self, offset: usize, v: u8) {
        if let Some(b) = self.bytes.get_mut(offset) {
            *b = v;
        }
    }

    /// Takes a guest write of `data` at `offset` through the masks.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let off = offset + i;
            if off >= CONFIG_SPACE {
                break;
            }
            let m = self.wmask[off];
            self.bytes[off] = (self.bytes[off] & !m) | (v & m);
            self.bytes[off] &= !(v & self.w1c[off]);
        }
    }

    /// The 256 bytes, for a snapshot (the masks and BAR declarations are
    /// the device model's and are rebuilt with it).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Restores the bytes of a snapshot into a config space built by the
    /// same device model.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), ConfigError> {
        if bytes.len() != CONFIG_SPACE {
            return Err(ConfigError::Length(bytes.len()));
        }
        self.bytes.copy_from_slice(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1AF4,
            device: 0x1042,
            revision: 1,
            class: 0x01_80_00,
            subsystem_vendor: 0x1AF4,
            subsystem: 0x1100,
        }
    }

    fn dword(c: &PciConfig, off: usize) -> u32 {
        let mut d = [0u8; 4];
        c.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn ids_class_and_read_only_header() {
        let mut c = PciConfig::new(ids());
        assert_eq!(dword(&c, 0), 0x1042_1AF4);
        assert_eq!(dword(&c, 8), 0x0180_0001);
        assert_eq!(dword(&c, 0x2C), 0x1100_1AF4);
        c.write(0, &[0; 4]);
        c.write(8, &[0; 4]);
        assert_eq!(dword(&c, 0), 0x1042_1AF4);
        c.write(4, &[0xFF, 0xFF]);
        assert_eq!(c.command(), CMD_IO | CMD_MEMORY | CMD_BUS_MASTER | CMD_INTX_DISABLE);
    }

    #[test]
    fn bars_size_and_decode() {
        let mut c = PciConfig::new(ids());
        c.add_bar(0, 0x20, BarKind::Io);
        c.add_bar(1, 0x1000, BarKind::Mem32);
        c.add_bar(4, 0x4000, BarKind::Mem64 { prefetchable: true });
        for off in [0x10, 0x14, 0x18, 0x1C, 0x20, 0x24] {
            c.write(off, &[0xFF; 4]);
        }
        assert_eq!(dword(&c, 0x10), 0xFFFF_FFE1);
        assert_eq!(dword(&c, 0x14), 0xFFFF_F000);
        assert_eq!(dword(&c, 0x18), 0, "no BAR 2");
        assert_eq!(dword(&c, 0x20), 0xFFFF_C00C);
        assert_eq!(dword(&c, 0x24), 0xFFFF_FFFF);
        assert_eq!(c.bar_range(1), None, "memory decoding off");
        c.write(0x10, &0xC040u32.to_le_bytes());
        c.write(0x14, &0xE000_1234u32.to_le_bytes());
        c.write(0x20, &0xE001_0000u32.to_le_bytes());
        c.write(0x24, &1u32.to_le_bytes());
        c.write(4, &[0x03, 0]);
        assert_eq!(c.bar_range(0), Some((0xC040, 0x20, BarKind::Io)));
        assert_eq!(c.bar_range(1), Some((0xE000_1000, 0x1000, BarKind::Mem32)));
        assert_eq!(
            c.bar_range(4),
            Some((0x1_E001_0000, 0x4000, BarKind::Mem64 { prefetchable: true }))
        );
        c.write(4, &[0x01, 0]);
        assert_eq!(c.bar_range(1), None);
        assert!(c.bar_range(0).is_some());
    }

    #[test]
    fn capabilities_chain_and_snapshot() {
        let mut c = PciConfig::new(ids());
        assert_eq!(c.word(6) & STATUS_CAP_LIST, 0);
        let a = c.add_capability(0x09, &[16, 1, 0, 0], &[]);
        let b = c.add_capability(0x11, &[0x03, 0x00, 1, 0, 0, 0, 2, 0, 0, 0], &[0, 0xC0]);
        assert_eq!((a, b), (0x40, 0x48));
        assert_eq!(c.byte(0x34), 0x40);
        assert_eq!((c.byte(0x40), c.byte(0x41)), (0x09, 0x48));
        assert_eq!((c.byte(0x48), c.byte(0x49)), (0x11, 0));
        assert_ne!(c.word(6) & STATUS_CAP_LIST, 0);
        c.write(0x4A, &[0xFF, 0xFF]);
        assert_eq!(c.word(0x4A), 0xC003);
        let mut d = PciConfig::new(ids());
        d.add_capability(0x09, &[16, 1, 0, 0], &[]);
        d.add_capability(0x11, &[0x03, 0x00, 1, 0, 0, 0, 2, 0, 0, 0], &[0, 0xC0]);
        d.restore(c.bytes()).unwrap();
        assert_eq!(d, c);
        assert_eq!(d.restore(&[0; 3]), Err(ConfigError::Length(3)));
    }

    #[test]
    fn status_errors_are_write_one_to_clear() {
        let mut c = PciConfig::new(ids());
        c.bytes[7] = 0xF9;
        c.write(6, &[0, 0x09]);
        assert_eq!(c.byte(7), 0xF0);
    }

    proptest! {
        /// Any write sequence leaves the IDs, the read-only BAR bits and
        /// the capability chain alone, and decoded BARs stay aligned.
        #[test]
        fn writes_keep_invariants(ops in prop::collection::vec((0usize..260, prop::collection::vec(any::<u8>(), 1..5)), 0..200)) {
            let mut c = PciConfig::new(ids());
            c.add_bar(0, 0x40, BarKind::Io);
            c.add_bar(1, 0x1000, BarKind::Mem32);
            c.add_bar(4, 0x4000, BarKind::Mem64 { prefetchable: false });
            c.add_capability(0x09, &[16, 1, 0, 0], &[]);
            for (off, data) in ops {
                c.write(off, &data);
                prop_assert_eq!(dword(&c, 0), 0x1042_1AF4);
                prop_assert_eq!(c.byte(0x34), 0x40);
                prop_assert_eq!(c.byte(0x40), 0x09);
                prop_assert_eq!(dword(&c, 0x10) & 3, 1);
                prop_assert_eq!(dword(&c, 0x14) & 0xFFF, 0);
                prop_assert_eq!(dword(&c, 0x20) & 0x3FFF, 4);
                for i in [0, 1, 4] {
                    if let Some((a, size, _)) = c.bar_range(i) {
                        prop_assert_eq!(a % size, 0);
                    }
                }
            }
        }
    }
}
