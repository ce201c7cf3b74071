//! What every PCI function of Nyx implements ([`PciDevice`]), the INTx
//! line a function drives ([`IntxLine`]), and the guest memory a function
//! reads and writes by DMA ([`DmaMemory`]).
//!
//! The PCI host (`pci.rs`) owns the functions: it routes config accesses
//! (mechanism #1 and ECAM) to [`PciDevice::config_mut`] and calls
//! [`PciDevice::config_written`] afterwards, and it routes an access in a
//! decoded BAR to [`PciDevice::bar_read`]/[`PciDevice::bar_write`] with the
//! BAR's index and the offset into it. A function raises interrupts
//! through MSI-X (`msix.rs`) or its [`IntxLine`].
//!
//! DMA goes through [`DmaMemory`], a view of guest RAM whose bitmap marks
//! every page a device writes, so that the machine can count device writes
//! with the vCPU's (KVM's dirty log does not see them) for landings,
//! snapshots, fast reset and migration. An address outside RAM (MMIO, a
//! hole, beyond the end) is an error of the access, never a host access.

use std::sync::{Arc, Mutex};

use crate::io::InterruptSink;
use crate::pci_config::PciConfig;

/// Guest RAM as devices see it: writes through it mark pages dirty.
pub type DmaMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// A function on the PCI bus.
pub trait PciDevice: Send {
    /// A short name for messages and `nyx report` ("virtio-blk").
    fn name(&self) -> &str;
    /// The config space.
    fn config(&self) -> &PciConfig;
    /// The config space, to take a guest write.
    fn config_mut(&mut self) -> &mut PciConfig;
    /// Called after the guest wrote config bytes `[offset, offset + len)`.
    fn config_written(&mut self, _offset: usize, _len: usize) {}
    /// A guest read at `offset` of BAR `bar`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A guest write at `offset` of BAR `bar`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// Work outside guest accesses (input that arrived); called at device
    /// polls.
    fn poll(&mut self) {}
    /// The device's own state for a snapshot (the host saves the config
    /// space), encoded by the device.
    fn save(&self) -> Vec<u8>;
    /// Restores what [`PciDevice::save`] returned, into a device built with
    /// the same configuration.
    fn restore(&mut self, state: &[u8]) -> Result<(), String>;
    /// Makes what the function wrote to the host durable where another host
    /// sees it (a disk's image on shared storage): before a live migration
    /// hands the machine over.
    fn flush_storage(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How many functions assert each GSI (a PCI interrupt line is shared and
/// level-triggered: it is high while any function on it asserts).
#[derive(Debug, Default)]
pub struct IntxShares {
    count: Mutex<Vec<u32>>,
}

/// A function's INTx pin, wired to a GSI that other functions may share.
pub struct IntxLine {
    gsi: u8,
    asserted: bool,
    shares: Arc<IntxShares>,
    sink: Arc<dyn InterruptSink>,
}

impl std::fmt::Debug for IntxLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntxLine")
            .field("gsi", &self.gsi)
            .field("asserted", &self.asserted)
            .finish()
    }
}

impl IntxLine {
    /// A deasserted pin on `gsi`.
    pub fn new(gsi: u8, shares: Arc<IntxShares>, sink: Arc<dyn InterruptSink>) -> Self {
        IntxLine {
            gsi,
            asserted: false,
            shares,
            sink,
        }
    }

    /// The GSI the pin is wired to.
    pub fn gsi(&self) -> u8 {
        self.gsi
    }

    /// Whether this function asserts its pin.
    pub fn asserted(&self) -> bool {
        self.asserted
    }

    /// Asserts or deasserts the pin; the line goes high with the first
    /// function that asserts it and low with the last that deasserts it.
    pub fn set(&mut self, high: bool) {
        if high == self.asserted {
            return;
        }
        self.asserted = high;
        let level = {
            let mut c = self.shares.count.lock().unwrap_or_else(|e| e.into_inner());
            let i = usize::from(self.gsi);
            if c.len() <= i {
                c.resize(i + 1, 0);
            }
            c[i] = if high { c[i] + 1 } else { c[i].saturating_sub(1) };
            c[i] > 0
        };
        self.sink.set_gsi(self.gsi, level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::RecordingSink;

    #[test]
    fn shared_line_is_high_while_any_function_asserts() {
        let sink = Arc::new(RecordingSink::default());
        let shares = Arc::new(IntxShares::default());
        let mut a = IntxLine::new(11, shares.clone(), sink.clone());
        let mut b = IntxLine::new(11, shares, sink.clone());
        a.set(true);
        b.set(true);
        a.set(false);
        a.set(false);
        assert_eq!(sink.gsi_changes(), vec![(11, true), (11, true), (11, true)]);
        b.set(false);
        assert_eq!(sink.gsi_changes().last(), Some(&(11, false)));
        assert!(!a.asserted() && a.gsi() == 11);
    }
}
