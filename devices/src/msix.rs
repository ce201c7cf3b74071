//! MSI-X: the capability, the vector table and the pending-bit array of a
//! PCI function, and the message sink that carries a vector's message to
//! the local APIC.
//!
//! The table and the PBA live in one of the function's memory BARs; the
//! device hands accesses that fall in them to [`Msix::table_read`] and
//! friends. A vector fires with [`Msix::notify`]: its message goes out
//! while MSI-X is enabled and neither the function nor the vector is
//! masked, and otherwise sets its pending bit, which is delivered (and
//! cleared) as soon as the mask that held it back is cleared. Table
//! entries are written in dwords (smaller or odd accesses are ignored, as
//! the PCI spec allows); each entry starts masked.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::pci_config::PciConfig;

/// The capability ID of MSI-X.
pub const CAP_MSIX: u8 = 0x11;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;

/// Where a function's MSI messages go: the machine's interrupt controller.
pub trait MsiSink: Send + Sync {
    /// A message write of `data` to `address` (0xFEExxxxx for the local
    /// APIC).
    fn msi(&self, address: u64, data: u32);
}

/// The table and pending bits, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// Per vector: address low, address high, data, vector control.
    pub table: Vec<[u32; 4]>,
    /// Pending bits, one per vector.
    pub pending: Vec<bool>,
}

/// A function's MSI-X.
pub struct Msix {
    cap: usize,
    table_bar: usize,
    table_offset: u64,
    pba_bar: usize,
    pba_offset: u64,
    state: MsixState,
    sink: Arc<dyn MsiSink>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("cap", &self.cap)
            .field("state", &self.state)
            .finish()
    }
}

/// Which part of MSI-X a BAR access hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsixRegion {
    /// The vector table, at this offset into it.
    Table(u64),
    /// The pending-bit array, at this offset into it.
    Pba(u64),
}

impl Msix {
    /// Adds the MSI-X capability for `vectors` vectors (1..=2048) to
    /// `config`, with the table at `table_offset` of BAR `table_bar` and the
    /// PBA at `pba_offset` of BAR `pba_bar` (offsets 8-byte aligned).
    pub fn new(
        config: &mut PciConfig,
        vectors: u16,
        table_bar: usize,
        table_offset: u32,
        pba_bar: usize,
        pba_offset: u32,
        sink: Arc<dyn MsiSink>,
    ) -> Self {
        let vectors = vectors.clamp(1, 2048);
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&(vectors - 1).to_le_bytes());
        body.extend_from_slice(&(table_offset | table_bar as u32).to_le_bytes());
        body.extend_from_slice(&(pba_offset | pba_bar as u32).to_le_bytes());
        let cap = config.add_capability(CAP_MSIX, &body, &[0, 0xC0]);
        Msix {
            cap,
            table_bar,
            table_offset: u64::from(table_offset),
            pba_bar,
            pba_offset: u64::from(pba_offset),
            state: MsixState {
                table: vec![[0, 0, 0, ENTRY_MASKED]; usize::from(vectors)],
                pending: vec![false; usize::from(vectors)],
            },
            sink,
        }
    }

    /// The number of vectors.
    pub fn vectors(&self) -> usize {
        self.state.table.len()
    }

    fn control(&self, config: &PciConfig) -> u16 {
        config.word(self.cap + 2)
    }

    /// Whether the guest enabled MSI-X.
    pub fn enabled(&self, config: &PciConfig) -> bool {
        self.control(config) & CTRL_ENABLE != 0
    }

    /// Which part of MSI-X an access at `offset` of BAR `bar` hits.
    pub fn region(&self, bar: usize, offset: u64) -> Option<MsixRegion> {
        let table_len = 16 * self.vectors() as u64;
        let pba_len = (self.vectors() as u64).div_ceil(64) * 8;
        if bar == self.table_bar && (self.table_offset..self.table_offset + table_len).contains(&offset) {
            return Some(MsixRegion::Table(offset - self.table_offset));
        }
        if bar == self.pba_bar && (self.pba_offset..self.pba_offset + pba_len).contains(&offset) {
            return Some(MsixRegion::Pba(offset - self.pba_offset));
        }
        None
    }

    /// A guest read of the table or PBA.
    pub fn read(&self, region: MsixRegion, data: &mut [u8]) {
        let mut bytes = Vec::new();
        let at = match region {
            MsixRegion::Table(off) => {
                for e in &self.state.table {
                    for w in e {
                        bytes.extend_from_slice(&w.to_le_bytes());
                    }
                }
                off
            }
            MsixRegion::Pba(off) => {
                for chunk in self.state.pending.chunks(64) {
                    let word = chunk.iter().enumerate().fold(0u64, |w, (i, &p)| w | u64::from(p) << i);
                    bytes.extend_from_slice(&word.to_le_bytes());
                }
                off
            }
        };
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(at)
                .ok()
                .and_then(|a| bytes.get(a + i))
                .copied()
                .unwrap_or(0);
        }
    }

    /// A guest write of the table (the PBA is read-only). Unmasking a
    /// vector with its pending bit set delivers it.
    pub fn write(&mut self, config: &PciConfig, region: MsixRegion, data: &[u8]) {
        let MsixRegion::Table(off) = region else { return };
        // Dwords, or a qword split into two.
        if off % 4 != 0 || (data.len() != 4 && data.len() != 8) {
            return;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let at = off as usize + 4 * i;
            let (entry, word) = (at / 16, (at % 16) / 4);
            if let Some(e) = self.state.table.get_mut(entry) {
                e[word] = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
        }
        self.deliver_pending(config);
    }

    /// The guest wrote config space: a cleared function mask delivers
    /// what is pending.
    pub fn config_written(&mut self, config: &PciConfig) {
        self.deliver_pending(config);
    }

    fn deliverable(&self, config: &PciConfig, vector: usize) -> bool {
        let ctrl = self.control(config);
        ctrl & CTRL_ENABLE != 0
            && ctrl & CTRL_FUNCTION_MASK == 0
            && self.state.table.get(vector).is_some_and(|e| e[3] & ENTRY_MASKED == 0)
    }

    fn send(&self, vector: usize) {
        if let Some(e) = self.state.table.get(vector) {
            self.sink.msi(u64::from(e[0]) | u64::from(e[1]) << 32, e[2]);
        }
    }

    fn deliver_pending(&mut self, config: &PciConfig) {
        for v in 0..self.vectors() {
            if self.state.pending[v] && self.deliverable(config, v) {
                self.state.pending[v] = false;
                self.send(v);
            }
        }
    }

    /// Fires `vector`: sends its message, or sets its pending bit while it
    /// is masked. A vector beyond the table is ignored. Returns whether a
    /// message went out.
    pub fn notify(&mut self, config: &PciConfig, vector: usize) -> bool {
        if vector >= self.vectors() {
            return false;
        }
        if self.deliverable(config, vector) {
            self.send(vector);
            true
        } else {
            self.state.pending[vector] = true;
            false
        }
    }

    /// The table and pending bits.
    pub fn state(&self) -> MsixState {
        self.state.clone()
    }

    /// Restores a snapshot's table; it must have as many vectors as this.
    pub fn restore(&mut self, state: &MsixState) -> Result<(), String> {
        if state.table.len() != self.vectors() || state.pending.len() != self.vectors() {
            return Err(format!(
                "MSI-X state has {} vectors; the device has {}",
                state.table.len(),
                self.vectors()
            ));
        }
        self.state = state.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci_config::{BarKind, PciIds};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Sent(Mutex<Vec<(u64, u32)>>);
    impl MsiSink for Sent {
        fn msi(&self, address: u64, data: u32) {
            self.0.lock().unwrap().push((address, data));
        }
    }

    fn setup() -> (PciConfig, Msix, Arc<Sent>) {
        let mut c = PciConfig::new(PciIds {
            vendor: 1,
            device: 2,
            revision: 0,
            class: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        c.add_bar(1, 0x1000, BarKind::Mem32);
        let sent = Arc::new(Sent::default());
        let m = Msix::new(&mut c, 3, 1, 0, 1, 0x800, sent.clone());
        (c, m, sent)
    }

    fn write_entry(c: &PciConfig, m: &mut Msix, v: u64, addr: u32, data: u32, ctrl: u32) {
        for (i, w) in [addr, 0, data, ctrl].into_iter().enumerate() {
            m.write(c, MsixRegion::Table(16 * v + 4 * i as u64), &w.to_le_bytes());
        }
    }

    #[test]
    fn capability_layout() {
        let (c, m, _) = setup();
        assert_eq!(c.byte(0x40), CAP_MSIX);
        assert_eq!(c.word(0x42), 2, "table size - 1");
        let mut d = [0u8; 4];
        c.read(0x44, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);
        c.read(0x48, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x801);
        assert_eq!(m.region(1, 0x2F), Some(MsixRegion::Table(0x2F)));
        assert_eq!(m.region(1, 0x30), None);
        assert_eq!(m.region(1, 0x804), Some(MsixRegion::Pba(4)));
        assert_eq!(m.region(0, 0), None);
    }

    #[test]
    fn masked_vectors_pend_and_fire_on_unmask() {
        let (mut c, mut m, sent) = setup();
        assert!(!m.notify(&c, 0), "MSI-X disabled");
        c.write(0x43, &[0x80]);
        assert!(!m.notify(&c, 1), "entry masked");
        let mut pba = [0u8; 8];
        m.read(MsixRegion::Pba(0), &mut pba);
        assert_eq!(pba[0], 0b011);
        write_entry(&c, &mut m, 1, 0xFEE0_0000, 0x41, 0);
        assert_eq!(*sent.0.lock().unwrap(), vec![(0xFEE0_0000, 0x41)]);
        m.read(MsixRegion::Pba(0), &mut pba);
        assert_eq!(pba[0], 0b001);
        c.write(0x43, &[0xC0]);
        assert!(!m.notify(&c, 1), "function masked");
        c.write(0x43, &[0x80]);
        m.config_written(&c);
        assert_eq!(sent.0.lock().unwrap().len(), 2);
        assert!(m.notify(&c, 1));
        assert!(!m.notify(&c, 7), "beyond the table");
        let mut e = [0u8; 4];
        m.read(MsixRegion::Table(0x18), &mut e);
        assert_eq!(u32::from_le_bytes(e), 0x41);
    }

    #[test]
    fn snapshot_round_trip_checks_size() {
        let (c, mut m, _) = setup();
        write_entry(&c, &mut m, 2, 0xFEE0_1000, 0x55, 1);
        let s = m.state();
        let (_, mut n, _) = setup();
        n.restore(&s).unwrap();
        assert_eq!(n.state(), s);
        let mut bad = s.clone();
        bad.table.pop();
        assert!(n.restore(&bad).is_err());
    }
}
