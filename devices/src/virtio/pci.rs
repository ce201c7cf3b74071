//! The modern virtio-pci transport ([`VirtioPci`]), laid out as QEMU 7.2's
//! `virtio-*-pci,disable-legacy=on`: vendor 1AF4, device 1040 + the virtio
//! device ID, revision 1, subsystem 1AF4:1100 (QEMU's default, kept for
//! non-transitional devices; drivers take the type from the device ID), the
//! device's class, INTA. BAR 1 is 4 KiB of 32-bit memory with the MSI-X
//! table at 0 and the PBA at 0x800 (one vector per queue plus one); BAR 4
//! is 16 KiB of 64-bit prefetchable memory holding the common configuration
//! at 0x0000, the ISR at 0x1000, the device configuration at 0x2000 and the
//! notifications at 0x3000 (queue `i` at `4 * i`, any write of up to 4
//! bytes there serves the queue at once). The vendor capabilities sit at
//! QEMU's offsets (common 0x40, ISR 0x50, device 0x60, notify 0x70 with
//! multiplier 4, PCI configuration access 0x84, MSI-X 0x98), linked from
//! the last one added back to the first, as QEMU links them.
//!
//! The registers are `transport.rs`'s; accesses wider than 4 bytes are
//! split in dwords, any read of the ISR region returns and clears the ISR
//! and deasserts INTx, and clearing bus mastering clears DRIVER_OK (as
//! QEMU) and stops the device's DMA. An interrupt goes out as the MSI-X
//! vector the transport names (none for NO_VECTOR) while MSI-X is enabled,
//! else asserts INTx (unless the command register disables it) until the
//! driver reads the ISR, resets the device or enables MSI-X.
//!
//! The PCI configuration access capability works both ways: a write of
//! `pci_cfg_data` is a write of the selected BAR (1 or 4; lengths 1, 2 and
//! 4, the offset aligned down as QEMU does), and `pci_cfg_data` is kept up
//! to date after every access with the selected register, read without side
//! effects (the one difference from QEMU: reading the ISR through it does
//! not clear it).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::transport::{Transport, TransportState, NO_VECTOR};
use super::VirtioDevice;
use crate::msix::{MsiSink, Msix, MsixState};
use crate::pci_config::{BarKind, PciConfig, PciIds, CMD_BUS_MASTER, CMD_INTX_DISABLE};
use crate::pci_device::{DmaMemory, IntxLine, PciDevice};

/// PCI vendor ID of virtio devices.
pub const VENDOR: u16 = 0x1AF4;
/// PCI device ID of a modern virtio device of type 0.
pub const DEVICE_ID_BASE: u16 = 0x1040;
/// PCI subsystem ID (QEMU's default).
pub const SUBSYSTEM: u16 = 0x1100;
/// The BAR holding the MSI-X table and PBA.
pub const MSIX_BAR: usize = 1;
/// The BAR holding the virtio structures.
pub const MODERN_BAR: usize = 4;
/// Offset of the PBA in [`MSIX_BAR`].
pub const PBA_OFFSET: u32 = 0x800;
/// Offset of the common configuration in [`MODERN_BAR`].
pub const COMMON_CFG: u64 = 0x0000;
/// Offset of the ISR in [`MODERN_BAR`].
pub const ISR_CFG: u64 = 0x1000;
/// Offset of the device configuration in [`MODERN_BAR`].
pub const DEVICE_CFG: u64 = 0x2000;
/// Offset of the notification area in [`MODERN_BAR`].
pub const NOTIFY_CFG: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;

const REGION: u64 = 0x1000;
const MODERN_BAR_SIZE: u64 = 0x4000;
const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CFG_PCI: u8 = 5;

#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    transport: TransportState,
    msix: MsixState,
    intx: bool,
}

/// A virtio device on the PCI bus.
pub struct VirtioPci {
    config: PciConfig,
    msix: Msix,
    intx_line: IntxLine,
    intx: bool,
    transport: Transport,
    cfg_cap: usize,
}

impl std::fmt::Debug for VirtioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPci")
            .field("transport", &self.transport)
            .field("intx", &self.intx)
            .finish()
    }
}

/// The body of a `struct virtio_pci_cap` (after ID and next pointer).
fn vendor_cap(cfg_type: u8, offset: u64, cap_len: u8) -> Vec<u8> {
    let mut b = vec![cap_len, cfg_type, MODERN_BAR as u8, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(REGION as u32).to_le_bytes());
    b
}

/// Relinks the capability list from the last capability to the first, as
/// QEMU's `pci_add_capability` builds it.
fn reverse_capabilities(config: &mut PciConfig) {
    let mut caps = Vec::new();
    let mut at = usize::from(config.byte(0x34));
    while at != 0 && caps.len() < 48 {
        caps.push(at);
        at = usize::from(config.byte(at + 1));
    }
    let mut next = 0u8;
    for &c in &caps {
        config.set_byte(c + 1, next);
        next = c as u8;
    }
    config.set_byte(0x34, next);
}

/// Little-endian value of up to 8 bytes.
fn le(data: &[u8]) -> u64 {
    data.iter().rev().fold(0, |v, &b| v << 8 | u64::from(b))
}

/// Stores `v` little-endian in `data` (zeros past 8 bytes).
fn put_le(data: &mut [u8], v: u64) {
    for (i, d) in data.iter_mut().enumerate() {
        *d = v.checked_shr(8 * i as u32).unwrap_or(0) as u8;
    }
}

impl VirtioPci {
    /// Puts `device` on the bus: DMA goes through `mem` (guest RAM only),
    /// MSI-X messages to `msi`, INTA drives `intx` (the interrupt line
    /// register shows its GSI). The BARs are unprogrammed and decoding is
    /// off until the guest (or the machine) programs them.
    pub fn new(device: Box<dyn VirtioDevice>, mem: DmaMemory, msi: Arc<dyn MsiSink>, intx: IntxLine) -> Self {
        let mut config = PciConfig::new(PciIds {
            vendor: VENDOR,
            device: DEVICE_ID_BASE + device.device_type(),
            revision: 1,
            class: device.pci_class(),
            subsystem_vendor: VENDOR,
            subsystem: SUBSYSTEM,
        });
        config.add_bar(MSIX_BAR, 0x1000, BarKind::Mem32);
        config.add_bar(MODERN_BAR, MODERN_BAR_SIZE, BarKind::Mem64 { prefetchable: true });
        config.set_interrupt(1, intx.gsi());
        config.add_capability(CAP_VENDOR, &vendor_cap(CFG_COMMON, COMMON_CFG, 16), &[]);
        config.add_capability(CAP_VENDOR, &vendor_cap(CFG_ISR, ISR_CFG, 16), &[]);
        config.add_capability(CAP_VENDOR, &vendor_cap(CFG_DEVICE, DEVICE_CFG, 16), &[]);
        let mut notify = vendor_cap(CFG_NOTIFY, NOTIFY_CFG, 20);
        notify.extend_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
        config.add_capability(CAP_VENDOR, &notify, &[]);
        // struct virtio_pci_cfg_cap: bar, offset, length and pci_cfg_data
        // are the driver's.
        let mut pci_cfg = vec![20, CFG_PCI, 0, 0, 0, 0];
        pci_cfg.extend_from_slice(&[0; 12]);
        let mut writable = vec![0, 0, 0xFF, 0, 0, 0];
        writable.extend_from_slice(&[0xFF; 12]);
        let cfg_cap = config.add_capability(CAP_VENDOR, &pci_cfg, &writable);
        let vectors = device.queue_max_sizes().len() as u16 + 1;
        let msix = Msix::new(&mut config, vectors, MSIX_BAR, 0, MSIX_BAR, PBA_OFFSET, msi);
        reverse_capabilities(&mut config);
        let transport = Transport::new(device, mem, msix.vectors());
        VirtioPci {
            config,
            msix,
            intx_line: intx,
            intx: false,
            transport,
            cfg_cap,
        }
    }

    /// The virtio side: registers, queues, the device.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.transport.status()
    }

    /// Whether a driver's mistake stopped the device until a reset.
    pub fn needs_reset(&self) -> bool {
        self.transport.needs_reset()
    }

    /// Sends the interrupts the transport asked for and brings INTx and
    /// the status register's interrupt bit up to date.
    fn deliver(&mut self) {
        let msix = self.msix.enabled(&self.config);
        for vector in self.transport.take_interrupts() {
            if !msix {
                self.intx = true;
            } else if vector != NO_VECTOR {
                self.msix.notify(&self.config, usize::from(vector));
            }
        }
        if msix || self.transport.isr(false) == 0 {
            self.intx = false;
        }
        self.config.set_interrupt_status(self.intx);
        let enabled = self.config.command() & CMD_INTX_DISABLE == 0;
        self.intx_line.set(self.intx && enabled);
    }

    /// A read of BAR 4; `effects` false peeks (the ISR stays).
    fn modern_read(&mut self, offset: u64, data: &mut [u8], effects: bool) {
        let off = offset % REGION;
        match offset / REGION {
            0 => {
                for (i, chunk) in data.chunks_mut(4).enumerate() {
                    put_le(chunk, self.transport.common_read(off + 4 * i as u64));
                }
            }
            1 => put_le(data, u64::from(self.transport.isr(effects))),
            2 => self.transport.config_read(off, data),
            _ => data.fill(0),
        }
    }

    fn modern_write(&mut self, offset: u64, data: &[u8]) {
        let off = offset % REGION;
        match offset / REGION {
            0 => {
                for (i, chunk) in data.chunks(4).enumerate() {
                    self.transport.common_write(off + 4 * i as u64, le(chunk));
                }
            }
            2 => self.transport.config_write(off, data),
            3 => self.transport.notify((off / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize),
            _ => {}
        }
    }

    fn msix_write(&mut self, offset: u64, data: &[u8]) {
        if let Some(r) = self.msix.region(MSIX_BAR, offset) {
            self.msix.write(&self.config, r, data);
        }
    }

    /// The PCI configuration access window: `(bar, offset, length)`, the
    /// offset aligned down to the length, if the length is 1, 2 or 4.
    fn cfg_window(&self) -> Option<(usize, u64, usize)> {
        let dword = |off: usize| {
            let mut b = [0u8; 4];
            self.config.read(off, &mut b);
            u32::from_le_bytes(b)
        };
        let bar = usize::from(self.config.byte(self.cfg_cap + 4));
        let len = dword(self.cfg_cap + 12) as usize;
        let off = u64::from(dword(self.cfg_cap + 8));
        matches!(len, 1 | 2 | 4).then(|| (bar, off & !(len as u64 - 1), len))
    }

    /// Updates `pci_cfg_data` with the selected register.
    fn refresh_cfg_window(&mut self) {
        let Some((bar, off, len)) = self.cfg_window() else {
            return;
        };
        let mut buf = [0u8; 4];
        match bar {
            MODERN_BAR if off + len as u64 <= MODERN_BAR_SIZE => self.modern_read(off, &mut buf[..len], false),
            MSIX_BAR => match self.msix.region(bar, off) {
                Some(r) => self.msix.read(r, &mut buf[..len]),
                None => return,
            },
            _ => return,
        }
        for (i, &b) in buf[..len].iter().enumerate() {
            self.config.set_byte(self.cfg_cap + 16 + i, b);
        }
    }

    /// The driver wrote `pci_cfg_data`: a write of the selected register.
    fn cfg_window_write(&mut self) {
        let Some((bar, off, len)) = self.cfg_window() else {
            return;
        };
        let mut data = [0u8; 4];
        self.config.read(self.cfg_cap + 16, &mut data);
        match bar {
            MODERN_BAR if off + len as u64 <= MODERN_BAR_SIZE => self.modern_write(off, &data[..len]),
            MSIX_BAR => self.msix_write(off, &data[..len]),
            _ => {}
        }
    }

    /// Before every access: DMA follows bus mastering.
    fn sync(&mut self) {
        self.transport.set_dma(self.config.command() & CMD_BUS_MASTER != 0);
    }

    /// After every access: interrupts out, the window refreshed.
    fn settle(&mut self) {
        self.deliver();
        self.refresh_cfg_window();
    }
}

impl PciDevice for VirtioPci {
    fn name(&self) -> &str {
        self.transport.name()
    }

    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn config_written(&mut self, offset: usize, len: usize) {
        self.msix.config_written(&self.config);
        self.sync();
        if offset <= 4 && offset + len > 4 && self.config.command() & CMD_BUS_MASTER == 0 {
            self.transport.driver_ok_lost();
        }
        let data = self.cfg_cap + 16;
        if offset < data + 4 && offset + len > data {
            self.cfg_window_write();
        }
        self.settle();
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        self.sync();
        match bar {
            MSIX_BAR => match self.msix.region(bar, offset) {
                Some(r) => self.msix.read(r, data),
                None => data.fill(0),
            },
            MODERN_BAR => self.modern_read(offset, data, true),
            _ => data.fill(0),
        }
        self.settle();
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        self.sync();
        match bar {
            MSIX_BAR => self.msix_write(offset, data),
            MODERN_BAR => self.modern_write(offset, data),
            _ => {}
        }
        self.settle();
    }

    fn poll(&mut self) {
        self.sync();
        self.transport.poll();
        self.settle();
    }

    fn save(&self) -> Vec<u8> {
        let s = Snapshot {
            transport: self.transport.state(),
            msix: self.msix.state(),
            intx: self.intx,
        };
        postcard::to_allocvec(&s).expect("a virtio snapshot serializes")
    }

    /// Restores a snapshot into a device built the same way, after the
    /// host restored the config space; INTx is asserted again if it was.
    fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        let name = self.transport.name().to_string();
        let s: Snapshot = postcard::from_bytes(state).map_err(|e| format!("{name}: {e}"))?;
        self.msix.restore(&s.msix).map_err(|e| format!("{name}: {e}"))?;
        self.transport
            .restore(&s.transport)
            .map_err(|e| format!("{name}: {e}"))?;
        self.sync();
        self.intx = s.intx;
        self.config.set_interrupt_status(self.intx);
        let enabled = self.config.command() & CMD_INTX_DISABLE == 0;
        self.intx_line.set(self.intx && enabled);
        Ok(())
    }
}
