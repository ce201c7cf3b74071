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
//! the last one added back to the first, as QEMU links them. QEMU's
//! virtio-pci has no MSI capability and neither has [`VirtioPci::new`]'s
//! function; [`VirtioPci::with_msi`] adds one (`msi.rs`) after MSI-X, at
//! 0xA4, where the list then starts.
//!
//! The registers are `transport.rs`'s; accesses wider than 4 bytes are
//! split in dwords, any read of the ISR region returns and clears the ISR
//! and deasserts INTx, and clearing bus mastering clears DRIVER_OK (as
//! QEMU) and stops the device's DMA. An interrupt goes out as the MSI-X
//! vector the transport names (none for NO_VECTOR) while MSI-X is enabled,
//! else, on a function with MSI, as an MSI message while MSI is enabled,
//! else asserts INTx (unless the command register disables it) until the
//! driver reads the ISR, resets the device or enables MSI-X or MSI. The
//! virtio spec gives MSI no vectors, so an MSI message stands for what INTx
//! would say (the ISR tells the driver why): every interrupt sends one,
//! message 0 unless the vector the transport names is one of the enabled
//! messages, then that one; a masked message waits in its pending bit.
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
use crate::msi::{Msi, MsiOptions, MsiState};
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

/// The snapshot of a function with MSI: the same, then the MSI registers
/// (a function without MSI saves exactly what it always saved).
#[derive(Debug, Serialize, Deserialize)]
struct MsiSnapshot {
    base: Snapshot,
    msi: MsiState,
}

/// A virtio device on the PCI bus.
pub struct VirtioPci {
    config: PciConfig,
    msix: Msix,
    msi: Option<Msi>,
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
        Self::build(device, mem, msi, intx, None)
    }

    /// [`VirtioPci::new`] with an MSI capability as `options` describe it
    /// beside MSI-X; its messages go to `msi` too.
    pub fn with_msi(
        device: Box<dyn VirtioDevice>,
        mem: DmaMemory,
        msi: Arc<dyn MsiSink>,
        intx: IntxLine,
        options: MsiOptions,
    ) -> Self {
        Self::build(device, mem, msi, intx, Some(options))
    }

    fn build(
        device: Box<dyn VirtioDevice>,
        mem: DmaMemory,
        msi: Arc<dyn MsiSink>,
        intx: IntxLine,
        msi_options: Option<MsiOptions>,
    ) -> Self {
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
        let msix = Msix::new(&mut config, vectors, MSIX_BAR, 0, MSIX_BAR, PBA_OFFSET, msi.clone());
        let msi = msi_options.map(|o| Msi::new(&mut config, o, msi));
        reverse_capabilities(&mut config);
        let transport = Transport::new(device, mem, msix.vectors());
        VirtioPci {
            config,
            msix,
            msi,
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

    /// The function's MSI capability, if it has one.
    pub fn msi(&self) -> Option<&Msi> {
        self.msi.as_ref()
    }

    /// Sends the interrupts the transport asked for and brings INTx and
    /// the status register's interrupt bit up to date. MSI-X wins over
    /// MSI, and either over INTx.
    fn deliver(&mut self) {
        let msix = self.msix.enabled(&self.config);
        let msi = self.msi.as_ref().filter(|m| !msix && m.enabled(&self.config));
        for vector in self.transport.take_interrupts() {
            if msix {
                if vector != NO_VECTOR {
                    self.msix.notify(&self.config, usize::from(vector));
                }
            } else if let Some(m) = msi {
                let v = usize::from(vector);
                let v = if v < m.enabled_vectors(&self.config) { v } else { 0 };
                m.notify(&mut self.config, v);
            } else {
                self.intx = true;
            }
        }
        if msix || msi.is_some() || self.transport.isr(false) == 0 {
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
        if let Some(m) = &self.msi {
            let msix = self.msix.enabled(&self.config);
            m.config_written(&mut self.config, offset, len, !msix);
        }
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
        let base = Snapshot {
            transport: self.transport.state(),
            msix: self.msix.state(),
            intx: self.intx,
        };
        let bytes = match &self.msi {
            None => postcard::to_allocvec(&base),
            Some(m) => postcard::to_allocvec(&MsiSnapshot {
                base,
                msi: m.state(&self.config),
            }),
        };
        bytes.expect("a virtio snapshot serializes")
    }

    fn flush_storage(&mut self) -> std::io::Result<()> {
        self.transport.device_mut().flush_storage()
    }

    /// Restores a snapshot into a device built the same way (with MSI or
    /// without, as the snapshot's), after the host restored the config
    /// space; INTx is asserted again if it was.
    fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        let name = self.transport.name().to_string();
        let err = |e: &dyn std::fmt::Display| format!("{name}: {e}");
        let whole = |rest: &[u8]| match rest.len() {
            0 => Ok(()),
            n => Err(format!(
                "{name}: {n} bytes after the state (MSI state where the function has none?)"
            )),
        };
        let s = match &self.msi {
            None => {
                let (s, rest) = postcard::take_from_bytes::<Snapshot>(state).map_err(|e| err(&e))?;
                whole(rest)?;
                s
            }
            Some(m) => {
                let (s, rest) = postcard::take_from_bytes::<MsiSnapshot>(state).map_err(|e| err(&e))?;
                whole(rest)?;
                m.restore(&mut self.config, &s.msi).map_err(|e| err(&e))?;
                s.base
            }
        };
        self.msix.restore(&s.msix).map_err(|e| err(&e))?;
        self.transport.restore(&s.transport).map_err(|e| err(&e))?;
        self.sync();
        self.intx = s.intx;
        self.config.set_interrupt_status(self.intx);
        let enabled = self.config.command() & CMD_INTX_DISABLE == 0;
        self.intx_line.set(self.intx && enabled);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::BufferInput;
    use crate::virtio::block::VirtioBlock;
    use crate::virtio::console::VirtioConsole;
    use crate::virtio::rng::VirtioRng;
    use crate::virtio::testutil::{CountingEntropy, Harness, SharedDisk, BUF, GSI, HOLE, MSI_ADDR, MSI_DATA};

    fn rng() -> Box<dyn VirtioDevice> {
        Box::new(VirtioRng::new(Box::new(CountingEntropy(0))))
    }

    fn console() -> Box<dyn VirtioDevice> {
        Box::new(VirtioConsole::new(
            Box::new(std::io::sink()),
            Box::new(BufferInput::new(Vec::new())),
        ))
    }

    fn blk() -> Box<dyn VirtioDevice> {
        Box::new(VirtioBlock::new(Box::new(SharedDisk::new(vec![0; 4096])), "d".into()))
    }

    #[test]
    fn layout_is_qemus() {
        for (dev, id, class, vectors) in [
            (blk(), 0x1042, 0x01_00_00, 2),
            (console(), 0x1043, 0x07_80_00, 3),
            (rng(), 0x1044, 0x00_FF_00, 2),
        ] {
            let mut h = Harness::new(dev);
            assert_eq!(h.cfg_read(0, 4), 0x1AF4 | id << 16);
            assert_eq!(h.cfg_read(8, 4), 1 | class << 8, "revision 1 and the class");
            assert_eq!(h.cfg_read(0x2C, 4), 0x1100_1AF4);
            assert_eq!(h.cfg_read(0x3C, 2), u64::from(GSI) | 1 << 8, "line and INTA");
            for off in [0x14, 0x20, 0x24] {
                h.cfg_write(off, &[0xFF; 4]);
            }
            assert_eq!(h.cfg_read(0x14, 4), 0xFFFF_F000, "BAR 1: 4 KiB, 32-bit");
            assert_eq!(h.cfg_read(0x20, 4), 0xFFFF_C00C, "BAR 4: 16 KiB, 64-bit, prefetchable");
            assert_eq!(h.cfg_read(0x24, 4), 0xFFFF_FFFF);
            // The capabilities, from the last added to the first.
            let mut chain = Vec::new();
            let mut at = h.cfg_read(0x34, 1) as usize;
            while at != 0 {
                chain.push((at, h.cfg_read(at, 1), h.cfg_read(at + 3, 1)));
                at = h.cfg_read(at + 1, 1) as usize;
            }
            assert_eq!(
                chain,
                vec![
                    (0x98, 0x11, 0),
                    (0x84, 9, 5),
                    (0x70, 9, 2),
                    (0x60, 9, 4),
                    (0x50, 9, 3),
                    (0x40, 9, 1)
                ]
            );
            for (cap, len, offset) in [
                (0x40, 16, 0),
                (0x50, 16, 0x1000),
                (0x60, 16, 0x2000),
                (0x70, 20, 0x3000),
            ] {
                assert_eq!(h.cfg_read(cap + 2, 1), len);
                assert_eq!(h.cfg_read(cap + 4, 1), 4, "in BAR 4");
                assert_eq!(h.cfg_read(cap + 8, 4), offset);
                assert_eq!(h.cfg_read(cap + 12, 4), 0x1000);
            }
            assert_eq!(h.cfg_read(0x70 + 16, 4), 4, "notify_off_multiplier");
            assert_eq!(h.cfg_read(0x98 + 2, 2), vectors - 1);
            assert_eq!(h.cfg_read(0x98 + 4, 4), 1, "table at 0 of BAR 1");
            assert_eq!(h.cfg_read(0x98 + 8, 4), 0x801, "PBA at 0x800 of BAR 1");
            assert_ne!(h.cfg_read(6, 2) & 0x10, 0, "capability list");
        }
    }

    #[test]
    fn feature_negotiation_and_reset() {
        let mut h = Harness::new(console());
        h.enable_pci();
        assert_eq!(h.offered(), 1 << 32 | 1 << 28 | 1 << 2);
        assert_eq!(h.init(1 << 32 | 1 << 40) & 0x08, 0, "not offered: FEATURES_OK refused");
        assert_eq!(h.init(1 << 2) & 0x08, 0, "no VERSION_1: refused");
        assert_eq!(h.init(1 << 32 | 1 << 2), 0x0B);
        h.common_write(0x08, 4, 0);
        h.common_write(0x0C, 4, 0);
        assert_eq!(h.common_read(0x0C, 4), 1 << 2, "frozen after FEATURES_OK");
        h.common_write(0x08, 4, 2);
        assert_eq!(h.common_read(0x0C, 4), 0);
        h.common_write(0x00, 4, 7);
        assert_eq!(h.common_read(0x04, 4), 0, "no feature word 7");
        h.common_write(0x10, 2, 2);
        h.setup_queue(1, 16, 1);
        h.set_status(0);
        assert_eq!(h.status(), 0);
        assert_eq!(h.common_read(0x10, 2), 0xFFFF, "msix_config reset to NO_VECTOR");
        assert_eq!((h.common_read(0x16, 2), h.common_read(0x08, 4)), (0, 0));
        h.common_write(0x08, 4, 0);
        assert_eq!(h.common_read(0x0C, 4), 0, "driver features forgotten");
        h.select_queue(1);
        assert_eq!(h.common_read(0x18, 2), 128, "size back to the maximum");
        assert_eq!(h.common_read(0x1A, 2), 0xFFFF);
        assert_eq!((h.common_read(0x1C, 2), h.common_read(0x20, 4)), (0, 0));
    }

    #[test]
    fn common_registers_behave_as_qemus() {
        let mut h = Harness::new(console());
        h.enable_pci();
        assert_eq!(h.common_read(0x12, 2), 2, "num_queues");
        h.common_write(0x10, 2, 3);
        assert_eq!(h.common_read(0x10, 2), 0xFFFF, "vector beyond the table");
        h.common_write(0x10, 4, 0x1_0001);
        assert_eq!(h.common_read(0x10, 2), 0xFFFF, "the whole value counts");
        h.common_write(0x10, 2, 2);
        assert_eq!(h.common_read(0x10, 2), 2);
        h.select_queue(1);
        for (size, want) in [(100, 128), (256, 128), (0, 128), (32, 32)] {
            h.common_write(0x18, 2, size);
            assert_eq!(h.common_read(0x18, 2), want, "size {size}");
        }
        assert_eq!(h.common_read(0x1E, 2), 1, "queue_notify_off is the index");
        h.common_write(0x20, 8, 0x1234_5678_9ABC_DEF0);
        assert_eq!(h.common_read(0x20, 4), 0x9ABC_DEF0, "a qword write is two dword writes");
        assert_eq!(h.common_read(0x24, 4), 0x1234_5678);
        assert_eq!(h.common_read(0x22, 2), 0, "not a register's offset");
        h.common_write(0x24, 2, 0xAB);
        assert_eq!(h.common_read(0x20, 8), 0x0000_00AB_9ABC_DEF0);
        h.select_queue(5);
        assert_eq!(h.common_read(0x16, 2), 5);
        assert_eq!(
            (
                h.common_read(0x18, 2),
                h.common_read(0x1A, 2),
                h.common_read(0x1C, 2),
                h.common_read(0x1E, 2)
            ),
            (0, 0xFFFF, 0, 5),
            "a queue the device does not have"
        );
        h.common_write(0x1C, 2, 1);
        assert!(!h.dev.needs_reset());
        h.select_queue(1024);
        assert_eq!(h.common_read(0x16, 2), 5, "queue_select stays below 1024");
        assert_eq!(h.common_read(0x38, 4), 0);
        assert_eq!(h.bar4_read(0x3000, 4), 0, "notifications read 0");
    }

    #[test]
    fn interrupts_go_to_the_queue_vector_and_wait_while_masked() {
        let mut h = Harness::start(console(), 0);
        h.submit(1, &[(BUF, 4, false)]);
        assert_eq!(h.msis(), vec![(MSI_ADDR, MSI_DATA + 1)]);
        assert_eq!(h.isr(), 1, "ISR bit 0 is set with MSI-X too");
        // Mask vector 1: the message waits in the PBA.
        h.dev.bar_write(1, 16 + 12, &1u32.to_le_bytes());
        h.submit(1, &[(BUF, 4, false)]);
        assert_eq!(h.msi_count(), 1);
        let mut pba = [0u8; 8];
        h.dev.bar_read(1, 0x800, &mut pba);
        assert_eq!(pba[0], 0b10);
        h.dev.bar_write(1, 16 + 12, &0u32.to_le_bytes());
        assert_eq!(h.msi_count(), 2);
        // NO_VECTOR: no message.
        h.select_queue(1);
        h.common_write(0x1A, 2, 0xFFFF);
        h.submit(1, &[(BUF, 4, false)]);
        assert_eq!(h.msi_count(), 2);
        assert_eq!(h.pop_used(1).map(|u| u.1), Some(0));
        assert!(h.sink.gsi_changes().is_empty(), "no INTx with MSI-X");
    }

    #[test]
    fn intx_without_msix_until_the_isr_is_read() {
        let mut h = Harness::new(rng());
        h.enable_pci();
        h.bring_up(0);
        h.submit(0, &[(BUF, 8, true)]);
        assert_eq!(h.sink.gsi_changes(), vec![(GSI, true)]);
        assert_ne!(h.cfg_read(6, 1) & 0x08, 0, "interrupt status");
        assert_eq!(h.isr(), 1);
        assert_eq!(h.sink.gsi_changes(), vec![(GSI, true), (GSI, false)]);
        assert_eq!(h.cfg_read(6, 1) & 0x08, 0);
        assert_eq!(h.isr(), 0, "read clears");
        // INTx disabled in the command register: the line stays low, the
        // status bit shows the interrupt.
        h.cfg_write(4, &[0x06, 0x04]);
        h.submit(0, &[(BUF, 8, true)]);
        assert_eq!(h.sink.gsi_changes().len(), 2);
        assert_ne!(h.cfg_read(6, 1) & 0x08, 0);
        h.cfg_write(4, &[0x06, 0x00]);
        assert_eq!(h.sink.gsi_changes().last(), Some(&(GSI, true)));
        // Enabling MSI-X, or a reset, deasserts.
        h.enable_msix();
        assert_eq!(h.sink.gsi_changes().last(), Some(&(GSI, false)));
        assert_eq!(h.isr(), 1, "the ISR is kept");
    }

    #[test]
    fn reset_deasserts_intx() {
        let mut h = Harness::new(rng());
        h.enable_pci();
        h.bring_up(0);
        h.submit(0, &[(BUF, 8, true)]);
        h.set_status(0);
        assert_eq!(h.sink.gsi_changes(), vec![(GSI, true), (GSI, false)]);
        assert_eq!(h.isr(), 0);
    }

    #[test]
    fn driver_mistakes_stop_the_device_until_reset() {
        let mut h = Harness::start(rng(), 0);
        h.common_write(0x10, 2, 1);
        let gen = h.common_read(0x15, 1);
        h.submit(0, &[(HOLE + 0x100, 16, true)]);
        assert!(h.dev.needs_reset());
        assert_eq!(h.status(), 0x4F);
        assert_eq!(
            h.msis(),
            vec![(MSI_ADDR, MSI_DATA + 1)],
            "configuration change on msix_config"
        );
        assert_eq!(h.isr(), 3);
        assert_eq!(h.common_read(0x15, 1), gen + 1);
        assert_eq!(h.pop_used(0), None);
        // Ignored until reset, and NEEDS_RESET sticks.
        h.submit(0, &[(BUF, 16, true)]);
        assert_eq!(h.pop_used(0), None);
        h.set_status(0x0F);
        assert_eq!(h.status(), 0x4F);
        h.bring_up(0);
        assert!(!h.dev.needs_reset());
        h.submit(0, &[(BUF, 16, true)]);
        assert_eq!(h.pop_used(0), Some((0, 16)));
    }

    #[test]
    fn bad_queue_setups_stop_the_device() {
        type Setup = fn(&mut Harness);
        let cases: [(&str, Setup); 4] = [
            ("rings in the hole", |h| h.common_write(0x30, 4, HOLE - 8)),
            ("ring beyond RAM", |h| h.common_write(0x24, 4, 1)),
            ("misaligned descriptor table", |h| h.common_write(0x20, 4, 0x1_0008)),
            ("queue_enable 0", |h| h.common_write(0x1C, 2, 0)),
        ];
        for (what, break_it) in cases {
            let mut h = Harness::new(rng());
            h.enable_pci();
            h.init(1 << 32);
            h.select_queue(0);
            for (off, v) in [(0x20, 0x1_0000), (0x28, 0x1_1000), (0x30, 0x1_2000)] {
                h.common_write(off, 4, v);
            }
            break_it(&mut h);
            if what != "queue_enable 0" {
                h.common_write(0x1C, 2, 1);
            }
            assert!(h.dev.needs_reset(), "{what}");
            assert_eq!(h.status() & 0x40, 0x40, "{what}");
            assert_eq!(h.common_read(0x1C, 2), 0, "{what}: not enabled");
            assert_eq!(h.isr(), 0, "{what}: no configuration interrupt before DRIVER_OK");
        }
    }

    #[test]
    fn driver_ok_serves_what_is_pending_and_bus_mastering_gates_dma() {
        let mut h = Harness::new(rng());
        h.enable_pci();
        h.enable_msix();
        h.init(1 << 32);
        h.setup_queue(0, 8, 0);
        h.submit(0, &[(BUF, 4, true)]);
        assert_eq!(h.pop_used(0), None, "nothing before DRIVER_OK");
        h.set_status(0x0F);
        assert_eq!(h.pop_used(0), Some((0, 4)));
        h.cfg_write(4, &[0x02, 0]);
        assert_eq!(h.status(), 0x0B, "clearing bus mastering drops DRIVER_OK");
        h.set_status(0x0F);
        h.submit(0, &[(BUF, 4, true)]);
        assert_eq!(h.pop_used(0), None, "no DMA without bus mastering");
        h.cfg_write(4, &[0x06, 0]);
        h.notify(0);
        assert_eq!(h.pop_used(0), Some((1, 4)));
    }

    #[test]
    fn no_interrupt_flag_suppresses_the_notification() {
        let mut h = Harness::start(rng(), 0);
        h.write(Harness::ring_base(0) + 0x1000, &1u16.to_le_bytes());
        h.submit(0, &[(BUF, 4, true)]);
        assert_eq!(h.pop_used(0), Some((0, 4)));
        assert_eq!(h.msi_count(), 0);
    }

    #[test]
    fn pci_cfg_access_window_reads_and_writes_bar_registers() {
        let mut h = Harness::start(rng(), 0);
        let (bar, off, len, data) = (0x88, 0x8C, 0x90, 0x94);
        h.cfg_write(bar, &[4]);
        h.cfg_write(off, &0x14u32.to_le_bytes());
        h.cfg_write(len, &1u32.to_le_bytes());
        assert_eq!(h.cfg_read(data, 1), 0x0F, "device_status through the window");
        h.submit(0, &[(BUF, 4, true)]);
        h.cfg_write(off, &0x1000u32.to_le_bytes());
        assert_eq!(h.cfg_read(data, 1), 1, "the ISR");
        assert_eq!(h.isr(), 1, "the window does not clear it");
        // A write: queue_select through the window, read back directly.
        h.cfg_write(off, &0x16u32.to_le_bytes());
        h.cfg_write(len, &2u32.to_le_bytes());
        h.cfg_write(data, &1u16.to_le_bytes());
        assert_eq!(h.common_read(0x16, 2), 1);
        // Unaligned offsets are aligned down; BAR 1 reaches the MSI-X table.
        h.cfg_write(off, &0x17u32.to_le_bytes());
        assert_eq!(h.cfg_read(data, 2), 1);
        h.cfg_write(bar, &[1]);
        h.cfg_write(off, &8u32.to_le_bytes());
        h.cfg_write(len, &4u32.to_le_bytes());
        assert_eq!(h.cfg_read(data, 4), u64::from(MSI_DATA));
        h.cfg_write(len, &3u32.to_le_bytes());
        h.cfg_write(data, &[9, 9, 9, 9]);
        assert_eq!(h.cfg_read(data, 4), 0x0909_0909, "length 3: no access");
    }

    #[test]
    fn snapshot_keeps_registers_and_refuses_other_devices() {
        let mut h = Harness::start(console(), 0);
        h.common_write(0x10, 2, 2);
        h.select_queue(1);
        h.submit(1, &[(BUF, 4, false)]);
        let saved = h.dev.save();
        let mut twin = Harness::new(console());
        twin.dev.config_mut().restore(h.dev.config().bytes()).unwrap();
        twin.dev.restore(&saved).unwrap();
        assert_eq!(twin.dev.save(), saved);
        assert_eq!(twin.common_read(0x10, 2), 2);
        assert_eq!(twin.common_read(0x16, 2), 1);
        assert!(Harness::new(rng()).dev.restore(&saved).is_err(), "two queues into one");
        assert!(twin.dev.restore(&saved[..saved.len() / 2]).is_err());
    }

    const MSI_AT: u64 = 0x1_FEE0_1000;

    fn msi2() -> MsiOptions {
        MsiOptions {
            vectors: 2,
            addr64: true,
            per_vector_mask: true,
        }
    }

    #[test]
    fn msi_is_opt_in_and_heads_the_capability_list() {
        assert_eq!(Harness::new(rng()).find_cap(0x05), None, "QEMU's layout has no MSI");
        let h = Harness::with_msi(rng(), msi2());
        let mut chain = Vec::new();
        let mut at = h.cfg_read(0x34, 1) as usize;
        while at != 0 {
            chain.push((at, h.cfg_read(at, 1)));
            at = h.cfg_read(at + 1, 1) as usize;
        }
        assert_eq!(
            chain,
            vec![
                (0xA4, 5),
                (0x98, 0x11),
                (0x84, 9),
                (0x70, 9),
                (0x60, 9),
                (0x50, 9),
                (0x40, 9)
            ]
        );
        assert_eq!(h.cfg_read(0xA6, 2), 0x0182, "two vectors, 64-bit, per-vector masking");
        assert_eq!(h.dev.msi().map(|m| m.capability()), Some(0xA4));
    }

    #[test]
    fn used_buffer_notifications_go_out_as_msi() {
        let mut h = Harness::with_msi(console(), msi2());
        h.enable_pci();
        h.bring_up(0);
        // INTx until MSI is enabled, which deasserts it.
        h.submit(1, &[(BUF, 4, false)]);
        assert_eq!(h.sink.gsi_changes(), vec![(GSI, true)]);
        h.enable_msi(MSI_AT, 0x40, 1);
        assert_eq!(h.sink.gsi_changes(), vec![(GSI, true), (GSI, false)]);
        assert_eq!(h.isr(), 1);
        // Queue 1's vector is 1, one of the two enabled messages.
        h.submit(1, &[(BUF, 4, false)]);
        assert_eq!(h.msis(), vec![(MSI_AT, 0x41)]);
        assert_eq!(h.pop_used(1).map(|u| u.1), Some(0));
        assert_eq!(h.isr(), 1, "the ISR says why, as with INTx");
        // NO_VECTOR still interrupts, as message 0.
        h.select_queue(1);
        h.common_write(0x1A, 2, 0xFFFF);
        h.submit(1, &[(BUF, 4, false)]);
        assert_eq!(h.msis()[1..], [(MSI_AT, 0x40)]);
        // Masked: pending in config space, delivered on unmask.
        h.cfg_write(0xA4 + 0x10, &[0b01]);
        h.submit(1, &[(BUF, 4, false)]);
        assert_eq!(h.msi_count(), 2);
        assert_eq!(h.cfg_read(0xA4 + 0x14, 4), 0b01, "pending bit");
        h.cfg_write(0xA4 + 0x10, &[0]);
        assert_eq!(h.msis()[2..], [(MSI_AT, 0x40)]);
        assert_eq!(h.cfg_read(0xA4 + 0x14, 4), 0);
        assert_eq!(h.sink.gsi_changes().len(), 2, "no INTx while MSI is enabled");
        // MSI-X wins when both are enabled.
        h.enable_msix();
        h.select_queue(1);
        h.common_write(0x1A, 2, 1);
        h.submit(1, &[(BUF, 4, false)]);
        assert_eq!(h.msis()[3..], [(MSI_ADDR, MSI_DATA + 1)]);
        // A message MSI holds back stays pending while MSI-X is enabled,
        // and goes out when MSI-X is turned off.
        let cap = h.find_cap(0x11).unwrap();
        h.cfg_write(cap + 3, &[0]);
        h.cfg_write(0xA4 + 0x10, &[0b10]);
        h.submit(1, &[(BUF, 4, false)]);
        assert_eq!(h.cfg_read(0xA4 + 0x14, 4), 0b10);
        h.cfg_write(cap + 3, &[0x80]);
        h.cfg_write(0xA4 + 0x10, &[0]);
        assert_eq!(h.msi_count(), 4, "MSI-X is enabled: MSI holds back");
        h.cfg_write(cap + 3, &[0]);
        assert_eq!(h.msis()[4..], [(MSI_AT, 0x41)]);
        // MSI-X off: MSI.
        h.submit(1, &[(BUF, 4, false)]);
        assert_eq!(h.msis()[5..], [(MSI_AT, 0x41)]);
        assert_eq!(h.sink.gsi_changes().len(), 2);
    }

    #[test]
    fn msi_state_is_saved_with_the_device() {
        let mut h = Harness::with_msi(rng(), msi2());
        h.enable_pci();
        h.bring_up(0);
        h.enable_msi(MSI_AT, 0x40, 1);
        h.cfg_write(0xA4 + 0x10, &[0b01]);
        h.submit(0, &[(BUF, 4, true)]);
        assert_eq!(h.msi_count(), 0);
        let saved = h.dev.save();
        let mut twin = Harness::with_msi(rng(), msi2());
        twin.dev.config_mut().restore(h.dev.config().bytes()).unwrap();
        twin.dev.restore(&saved).unwrap();
        assert_eq!(twin.dev.save(), saved);
        assert_eq!(twin.dev.config().bytes(), h.dev.config().bytes());
        twin.cfg_write(0xA4 + 0x10, &[0]);
        assert_eq!(twin.msis(), vec![(MSI_AT, 0x40)], "the pending message survives");
        let plain = Harness::new(rng()).dev.save();
        let e = Harness::new(rng()).dev.restore(&saved).unwrap_err();
        assert!(e.contains("bytes after the state"), "{e}");
        assert!(Harness::with_msi(rng(), msi2()).dev.restore(&plain).is_err());
        let four = MsiOptions { vectors: 4, ..msi2() };
        assert!(
            Harness::with_msi(rng(), four).dev.restore(&saved).is_err(),
            "another capability"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// The virtio fuzzer on a function with MSI: never panics, and the
        /// device comes up again.
        #[test]
        fn fuzz_with_msi(ops in crate::virtio::testutil::fuzz_ops()) {
            let mut h = Harness::with_msi(rng(), msi2());
            h.fuzz(&ops);
            h.submit(0, &[(BUF, 4, true)]);
            proptest::prop_assert_eq!(h.pop_used(0), Some((0, 4)));
        }
    }
}
