//! The virtio part of the transport ([`Transport`]), independent of how the
//! guest reaches it: the common configuration registers (virtio 1.x,
//! 4.1.4.3), the device status state machine and feature negotiation, the
//! ISR, the device configuration, the queues, and the serving of a queue at
//! a notify. `pci.rs` maps it into BAR 4 and turns the interrupts it asks
//! for ([`Transport::take_interrupts`]) into MSI-X or MSI messages or
//! INTx.
//!
//! Registers behave as QEMU 7.2's `virtio_pci_common_read/write`: an access
//! hits a register only at the register's own offset (narrower accesses
//! truncate), `queue_select` takes values below 1024 (the registers of a
//! queue the device does not have read 0, its vector NO_VECTOR),
//! `queue_msix_vector` and `msix_config` beyond the MSI-X table store
//! NO_VECTOR, `queue_notify_off` is the queue index, driver features are
//! frozen once FEATURES_OK is set, and `queue_enable` written with anything
//! but 1 is a driver error. Queue addresses are latched at `queue_enable`
//! (their registers read back as written); `queue_size` takes a power of
//! two up to the maximum while the queue is disabled. Deviations, for
//! broken drivers only: FEATURES_OK does not stick unless the driver's
//! features are a subset of the offered ones including VERSION_1 (QEMU
//! masks them instead), and a queue enabled with misaligned rings or rings
//! not entirely in RAM stops the device at once.
//!
//! A used-buffer notification sets ISR bit 0 and asks for the queue's
//! vector; a configuration-change notification (only after DRIVER_OK, as
//! QEMU) sets ISR bits 0 and 1, bumps `config_generation` and asks for
//! `msix_config`. Queues are served only after DRIVER_OK while DMA (bus
//! mastering) is allowed; setting DRIVER_OK serves every enabled queue once,
//! as QEMU's start of ioeventfd processing does. A used-buffer notification
//! is skipped while the driver sets VRING_AVAIL_F_NO_INTERRUPT. A driver's
//! mistake stops the device: DEVICE_NEEDS_RESET stays set in the status and
//! the queues are ignored until the driver writes status 0, which resets
//! features, queues, vectors (NO_VECTOR) and the ISR.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::queue::in_ram;
use super::{VirtQueue, VirtioDevice, F_RING_INDIRECT_DESC, F_VERSION_1};
use crate::pci_device::DmaMemory;

/// No MSI-X vector.
pub const NO_VECTOR: u16 = 0xFFFF;
const QUEUE_SELECT_LIMIT: u64 = 1024;
const FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
const DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
const NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;

/// The queue registers as the driver wrote them (latched at enable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct QueueRegs {
    desc: u64,
    driver: u64,
    device: u64,
    vector: u16,
}

impl Default for QueueRegs {
    fn default() -> Self {
        QueueRegs {
            desc: 0,
            driver: 0,
            device: 0,
            vector: NO_VECTOR,
        }
    }
}

/// The registers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Regs {
    status: u8,
    broken: bool,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: [u32; 2],
    negotiated: u64,
    msix_config: u16,
    isr: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueRegs>,
}

/// A live queue in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct QueueSnapshot {
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
    next_avail: u16,
    next_used: u16,
}

/// The transport's and the device's state, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    regs: Regs,
    queues: Vec<QueueSnapshot>,
    device: Vec<u8>,
}

/// A device with its queues and registers.
pub struct Transport {
    name: String,
    mem: DmaMemory,
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
    regs: Regs,
    vectors: usize,
    dma: bool,
    interrupts: Vec<u16>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("name", &self.name)
            .field("regs", &self.regs)
            .finish()
    }
}

fn set_half(reg: &mut u64, high: bool, v: u64) {
    let v = v & 0xFFFF_FFFF;
    *reg = if high {
        (*reg & 0xFFFF_FFFF) | v << 32
    } else {
        (*reg & !0xFFFF_FFFF) | v
    };
}

impl Transport {
    /// `device` with DMA through `mem` and `vectors` MSI-X vectors. A
    /// queue size that is not a power of two up to 32768 is a bug in the
    /// device model and panics.
    pub fn new(device: Box<dyn VirtioDevice>, mem: DmaMemory, vectors: usize) -> Self {
        let name = device.name().to_string();
        let queues: Vec<Queue> = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).unwrap_or_else(|_| panic!("{name}: queue size {max} is not valid")))
            .collect();
        Transport {
            regs: Regs {
                msix_config: NO_VECTOR,
                queues: vec![QueueRegs::default(); queues.len()],
                ..Regs::default()
            },
            name,
            mem,
            device,
            queues,
            vectors,
            dma: false,
            interrupts: Vec::new(),
        }
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device, to change.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        &mut *self.device
    }

    /// The device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device status.
    pub fn status(&self) -> u8 {
        self.regs.status
    }

    /// Whether a driver's mistake stopped the device until a reset.
    pub fn needs_reset(&self) -> bool {
        self.regs.broken
    }

    /// The vectors to fire since the last call (NO_VECTOR: an interrupt
    /// without a vector, which only INTx carries).
    pub fn take_interrupts(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.interrupts)
    }

    /// Whether the device may access guest memory (bus mastering).
    pub fn set_dma(&mut self, allowed: bool) {
        self.dma = allowed;
    }

    /// Bus mastering was turned off: DRIVER_OK is dropped, as QEMU does.
    pub fn driver_ok_lost(&mut self) {
        self.regs.status &= !DRIVER_OK;
    }

    fn offered(&self) -> u64 {
        self.device.features() | F_VERSION_1 | F_RING_INDIRECT_DESC
    }

    fn selected(&self) -> Option<usize> {
        let i = usize::from(self.regs.queue_select);
        (i < self.queues.len()).then_some(i)
    }

    /// The device reset (status 0 written).
    pub fn reset(&mut self) {
        self.regs = Regs {
            msix_config: NO_VECTOR,
            config_generation: self.regs.config_generation,
            queues: vec![QueueRegs::default(); self.queues.len()],
            ..Regs::default()
        };
        for q in &mut self.queues {
            q.reset();
        }
        self.device.reset();
    }

    fn config_notify(&mut self) {
        if self.regs.status & DRIVER_OK == 0 {
            return;
        }
        self.regs.isr |= 3;
        self.regs.config_generation = self.regs.config_generation.wrapping_add(1);
        self.interrupts.push(self.regs.msix_config);
    }

    /// A driver's mistake: the device stops until reset.
    fn fail(&mut self, reason: &str) {
        if self.regs.broken {
            return;
        }
        tracing::warn!(device = %self.name, "{reason}: the device needs a reset");
        self.regs.broken = true;
        self.regs.status |= NEEDS_RESET;
        self.config_notify();
    }

    /// Serves queue `index` if the device may.
    fn process(&mut self, index: usize) {
        if self.regs.broken || self.regs.status & DRIVER_OK == 0 || !self.dma {
            return;
        }
        let Some(queue) = self.queues.get_mut(index).filter(|q| q.ready()) else {
            return;
        };
        let mut vq = VirtQueue::new(queue, &self.mem);
        let result = self.device.process_queue(index, &mut vq);
        if vq.used_any() && !vq.interrupt_suppressed() {
            self.regs.isr |= 1;
            self.interrupts.push(self.regs.queues[index].vector);
        }
        if let Err(e) = result {
            self.fail(&format!("queue {index}: {e}"));
        }
    }

    /// The driver's notify of queue `index` (a queue the device does not
    /// have is ignored).
    pub fn notify(&mut self, index: usize) {
        self.process(index);
    }

    /// Serves the queues the device asks for (input that arrived).
    pub fn poll(&mut self) {
        if self.regs.broken || self.regs.status & DRIVER_OK == 0 || !self.dma {
            return;
        }
        let mask = self.device.poll();
        for i in 0..self.queues.len().min(64) {
            if mask & 1 << i != 0 {
                self.process(i);
            }
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.regs.status;
        let mut new = value;
        if new & FEATURES_OK != 0 && old & FEATURES_OK == 0 {
            let [lo, hi] = self.regs.driver_features;
            let driver = u64::from(hi) << 32 | u64::from(lo);
            if driver & !self.offered() != 0 || driver & F_VERSION_1 == 0 {
                new &= !FEATURES_OK;
            } else {
                self.regs.negotiated = driver;
                self.device.set_driver_features(driver);
            }
        }
        if self.regs.broken {
            new |= NEEDS_RESET;
        }
        self.regs.status = new;
        if new & DRIVER_OK != 0 && old & DRIVER_OK == 0 {
            for i in 0..self.queues.len() {
                self.process(i);
            }
        }
    }

    fn enable_queue(&mut self, index: usize) {
        let r = self.regs.queues[index];
        let q = &mut self.queues[index];
        let aligned = q.try_set_desc_table_address(GuestAddress(r.desc)).is_ok()
            && q.try_set_avail_ring_address(GuestAddress(r.driver)).is_ok()
            && q.try_set_used_ring_address(GuestAddress(r.device)).is_ok();
        let size = u64::from(q.size());
        let in_memory = in_ram(&self.mem, "descriptor table", r.desc, 16 * size)
            .and(in_ram(&self.mem, "available ring", r.driver, 6 + 2 * size))
            .and(in_ram(&self.mem, "used ring", r.device, 6 + 8 * size));
        q.set_ready(aligned && in_memory.is_ok());
        match (aligned, in_memory) {
            (true, Ok(())) => {}
            (false, _) => self.fail(&format!("queue {index} enabled with misaligned rings")),
            (true, Err(e)) => self.fail(&format!("queue {index} enabled: {e}")),
        }
    }

    fn vector_or_none(&self, v: u64) -> u16 {
        if v < self.vectors as u64 {
            v as u16
        } else {
            NO_VECTOR
        }
    }

    /// A read of the common configuration register at `off`.
    pub fn common_read(&self, off: u64) -> u64 {
        let r = &self.regs;
        let q = self.selected();
        let qr = q.map(|i| self.regs.queues[i]);
        match off {
            0x00 => u64::from(r.device_feature_select),
            0x04 if r.device_feature_select < 2 => (self.offered() >> (32 * r.device_feature_select)) & 0xFFFF_FFFF,
            0x08 => u64::from(r.driver_feature_select),
            0x0C if r.driver_feature_select < 2 => u64::from(r.driver_features[r.driver_feature_select as usize]),
            0x10 => u64::from(r.msix_config),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(r.status),
            0x15 => u64::from(r.config_generation),
            0x16 | 0x1E => u64::from(r.queue_select),
            0x18 => q.map_or(0, |i| u64::from(self.queues[i].size())),
            0x1A => u64::from(qr.map_or(NO_VECTOR, |q| q.vector)),
            0x1C => q.map_or(0, |i| u64::from(self.queues[i].ready())),
            0x20 | 0x24 => qr.map_or(0, |q| q.desc >> (8 * (off - 0x20))),
            0x28 | 0x2C => qr.map_or(0, |q| q.driver >> (8 * (off - 0x28))),
            0x30 | 0x34 => qr.map_or(0, |q| q.device >> (8 * (off - 0x30))),
            _ => 0,
        }
    }

    /// A write of `v` to the common configuration register at `off`.
    pub fn common_write(&mut self, off: u64, v: u64) {
        let q = self.selected();
        match off {
            0x00 => self.regs.device_feature_select = v as u32,
            0x08 => self.regs.driver_feature_select = v as u32,
            0x0C => {
                let sel = self.regs.driver_feature_select as usize;
                if sel < 2 && self.regs.status & FEATURES_OK == 0 {
                    self.regs.driver_features[sel] = v as u32;
                }
            }
            0x10 => self.regs.msix_config = self.vector_or_none(v),
            0x14 => self.write_status(v as u8),
            0x16 if v < QUEUE_SELECT_LIMIT => self.regs.queue_select = v as u16,
            0x18 => {
                if let Some(q) = q.map(|i| &mut self.queues[i]).filter(|q| !q.ready()) {
                    // Not a power of two up to the maximum: ignored.
                    let _ = q.try_set_size(v as u16);
                }
            }
            0x1A => {
                if let Some(i) = q {
                    self.regs.queues[i].vector = self.vector_or_none(v);
                }
            }
            0x1C => match q {
                Some(i) if v == 1 => self.enable_queue(i),
                Some(i) => self.fail(&format!("queue {i}: queue_enable written with {v}")),
                None => {}
            },
            0x20..=0x37 if off % 4 == 0 => {
                if let Some(i) = q {
                    let r = &mut self.regs.queues[i];
                    let reg = match off & !7 {
                        0x20 => &mut r.desc,
                        0x28 => &mut r.driver,
                        _ => &mut r.device,
                    };
                    set_half(reg, off % 8 == 4, v);
                }
            }
            _ => {}
        }
    }

    /// The ISR; a read with `clear` clears it.
    pub fn isr(&mut self, clear: bool) -> u8 {
        let isr = self.regs.isr;
        if clear {
            self.regs.isr = 0;
        }
        isr
    }

    /// A read of the device configuration; all-ones beyond it (QEMU).
    pub fn config_read(&self, offset: u64, data: &mut [u8]) {
        match usize::try_from(offset) {
            Ok(off) if off + data.len() <= self.device.config_len() => self.device.read_config(off, data),
            _ => data.fill(0xFF),
        }
    }

    /// A write of the device configuration (ignored beyond it).
    pub fn config_write(&mut self, offset: u64, data: &[u8]) {
        if let Ok(off) = usize::try_from(offset) {
            if off + data.len() <= self.device.config_len() {
                self.device.write_config(off, data);
            }
        }
    }

    /// The state for a snapshot.
    pub fn state(&self) -> TransportState {
        TransportState {
            regs: self.regs.clone(),
            queues: self
                .queues
                .iter()
                .map(|q| QueueSnapshot {
                    size: q.size(),
                    ready: q.ready(),
                    desc: q.desc_table(),
                    driver: q.avail_ring(),
                    device: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                })
                .collect(),
            device: self.device.save(),
        }
    }

    /// Restores a snapshot of a device built the same way.
    pub fn restore(&mut self, s: &TransportState) -> Result<(), String> {
        let n = self.queues.len();
        if s.queues.len() != n || s.regs.queues.len() != n {
            return Err(format!("the snapshot has {} queues, the device {n}", s.queues.len()));
        }
        for (q, qs) in self.queues.iter_mut().zip(&s.queues) {
            q.reset();
            q.try_set_size(qs.size)
                .and_then(|()| q.try_set_desc_table_address(GuestAddress(qs.desc)))
                .and_then(|()| q.try_set_avail_ring_address(GuestAddress(qs.driver)))
                .and_then(|()| q.try_set_used_ring_address(GuestAddress(qs.device)))
                .map_err(|e| format!("queue: {e}"))?;
            q.set_ready(qs.ready);
            q.set_next_avail(qs.next_avail);
            q.set_next_used(qs.next_used);
        }
        self.device.restore(&s.device)?;
        if s.regs.status & FEATURES_OK != 0 {
            self.device.set_driver_features(s.regs.negotiated);
        }
        self.regs = s.regs.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::rng::VirtioRng;
    use crate::virtio::testutil::{guest_ram, CountingEntropy};

    fn transport() -> Transport {
        let mut t = Transport::new(Box::new(VirtioRng::new(Box::new(CountingEntropy(0)))), guest_ram(), 2);
        t.set_dma(true);
        t
    }

    #[test]
    fn a_mistake_after_driver_ok_asks_for_the_configuration_vector() {
        let mut t = transport();
        t.common_write(0x08, 1);
        t.common_write(0x0C, 1);
        t.common_write(0x14, 0x0B);
        t.common_write(0x10, 1);
        t.common_write(0x14, 0x0F);
        assert_eq!(t.status(), 0x0F);
        assert!(t.take_interrupts().is_empty());
        t.common_write(0x1C, 0);
        assert!(t.needs_reset());
        assert_eq!(t.take_interrupts(), vec![1]);
        assert_eq!((t.isr(true), t.isr(true)), (3, 0));
        t.common_write(0x14, 0);
        assert_eq!((t.status(), t.needs_reset()), (0, false));
        assert_eq!(t.common_read(0x10), u64::from(NO_VECTOR));
    }

    #[test]
    fn restore_refuses_impossible_queues() {
        let t = transport();
        let mut s = t.state();
        s.queues[0].size = 3;
        assert!(transport().restore(&s).is_err());
        let mut s = t.state();
        s.queues[0].desc = 8;
        assert!(transport().restore(&s).is_err(), "misaligned");
        let mut s = t.state();
        s.device = vec![1];
        assert!(transport().restore(&s).is_err(), "rng keeps no state");
        let mut u = transport();
        u.restore(&t.state()).unwrap();
        assert_eq!(u.state(), t.state());
    }
}
