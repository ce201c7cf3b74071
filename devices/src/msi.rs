//! MSI: the message-signalled interrupt capability of a PCI function
//! (capability ID 0x05, PCI Local Bus 3.0 §6.8.1), beside MSI-X
//! (`msix.rs`), whose [`MsiSink`] carries its messages to the local APIC.
//!
//! Everything MSI has lives in config space, as QEMU keeps it (`msi.c`):
//! the message control register (enable, multiple message capable and
//! enable, 64-bit and per-vector-masking capable), the message address
//! (32 or 64 bits, dword aligned), the 16-bit message data, and with
//! per-vector masking the mask and pending bits. The write masks leave the
//! guest the enable bit, the multiple-message-enable field, the address,
//! the data and the mask bits of the vectors the function has; the rest is
//! read-only, the pending bits included. A multiple-message-enable beyond
//! what the function is capable of is clamped to it after the write (the
//! spec forbids it; QEMU clamps). With `2^k` vectors enabled, vector `v`'s
//! message is the programmed data with its `k` low bits replaced by `v`.
//!
//! A vector fires with [`Msi::notify`]: while MSI is enabled its message
//! goes out unless the vector is masked, in which case its pending bit is
//! set; clearing the mask (or enabling MSI again) delivers what is pending
//! and clears it, and pending bits beyond the enabled vectors are dropped,
//! as QEMU's `msi_write_config` does. While MSI is disabled (or the vector
//! is beyond the enabled ones) nothing is sent or held: the function uses
//! MSI-X or INTx instead, and which of them wins is the function's choice
//! (a function with both gives MSI-X precedence, as the spec expects only
//! one to be enabled, and tells [`Msi::config_written`] to hold MSI's
//! pending messages back while MSI-X is on). Nothing read from config space, however a guest or a
//! snapshot set it, makes this panic: the vector count comes from the
//! capability as built, not from the register.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::msix::MsiSink;
use crate::pci_config::PciConfig;

/// The capability ID of MSI.
pub const CAP_MSI: u8 = 0x05;
/// The most vectors a function can have.
pub const MAX_VECTORS: usize = 32;
const CTRL_ENABLE: u16 = 1 << 0;
const CTRL_MMC_SHIFT: u16 = 1;
const CTRL_MME_SHIFT: u16 = 4;
const CTRL_MME: u16 = 0x7 << CTRL_MME_SHIFT;
const CTRL_64BIT: u16 = 1 << 7;
const CTRL_PVM: u16 = 1 << 8;
/// The bits of message control the guest may write.
const CTRL_WRITABLE: u16 = CTRL_ENABLE | CTRL_MME;

/// What a function's MSI capability offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiOptions {
    /// Vectors the function asks for (multiple message capable): rounded
    /// up to a power of two, 1 to 32.
    pub vectors: usize,
    /// A 64-bit message address (else 32-bit).
    pub addr64: bool,
    /// Per-vector masking, with mask and pending bits.
    pub per_vector_mask: bool,
}

impl Default for MsiOptions {
    /// One vector, 64-bit address, per-vector masking.
    fn default() -> Self {
        MsiOptions {
            vectors: 1,
            addr64: true,
            per_vector_mask: true,
        }
    }
}

/// The capability's registers, for a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiState {
    /// Message control.
    pub control: u16,
    /// Message address (the upper half is zero for a 32-bit capability).
    pub address: u64,
    /// Message data.
    pub data: u16,
    /// Mask bits (zero without per-vector masking).
    pub mask: u32,
    /// Pending bits (zero without per-vector masking).
    pub pending: u32,
}

/// A function's MSI capability.
pub struct Msi {
    cap: usize,
    log2_capable: u16,
    addr64: bool,
    per_vector_mask: bool,
    sink: Arc<dyn MsiSink>,
}

impl std::fmt::Debug for Msi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msi")
            .field("cap", &self.cap)
            .field("vectors", &self.capable())
            .field("addr64", &self.addr64)
            .field("per_vector_mask", &self.per_vector_mask)
            .finish()
    }
}

fn dword(config: &PciConfig, off: usize) -> u32 {
    let mut b = [0u8; 4];
    config.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn set_bytes(config: &mut PciConfig, off: usize, bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        config.set_byte(off + i, b);
    }
}

impl Msi {
    /// Adds the MSI capability described by `options` to `config`, its
    /// messages going to `sink`. It starts disabled, one vector enabled,
    /// address and data zero, no vector masked. A capability that does not
    /// fit in config space is a bug in the device model and panics (as in
    /// [`PciConfig::add_capability`]).
    pub fn new(config: &mut PciConfig, options: MsiOptions, sink: Arc<dyn MsiSink>) -> Self {
        let vectors = options.vectors.clamp(1, MAX_VECTORS).next_power_of_two();
        let log2_capable = vectors.trailing_zeros() as u16;
        let mut m = Msi {
            cap: 0,
            log2_capable,
            addr64: options.addr64,
            per_vector_mask: options.per_vector_mask,
            sink,
        };
        let size = m.size();
        let mut body = vec![0u8; size - 2];
        let mut writable = vec![0u8; size - 2];
        body[0..2].copy_from_slice(&m.control_as_built().to_le_bytes());
        writable[0..2].copy_from_slice(&CTRL_WRITABLE.to_le_bytes());
        // Offsets below are from the capability; the body starts at 2.
        writable[2..6].copy_from_slice(&0xFFFF_FFFCu32.to_le_bytes());
        if m.addr64 {
            writable[6..10].copy_from_slice(&[0xFF; 4]);
        }
        let data = m.data_offset() - 2;
        writable[data..data + 2].copy_from_slice(&[0xFF; 2]);
        if m.per_vector_mask {
            let mask = m.mask_offset() - 2;
            writable[mask..mask + 4].copy_from_slice(&m.capable_bits().to_le_bytes());
        }
        m.cap = config.add_capability(CAP_MSI, &body, &writable);
        m
    }

    /// The capability's config offset.
    pub fn capability(&self) -> usize {
        self.cap
    }

    /// The config bytes the capability takes: 10, 14, 20 or 24 as the
    /// address is 32 or 64 bits, without or with per-vector masking.
    pub fn size(&self) -> usize {
        match (self.addr64, self.per_vector_mask) {
            (false, false) => 10,
            (true, false) => 14,
            (false, true) => 20,
            (true, true) => 24,
        }
    }

    fn data_offset(&self) -> usize {
        if self.addr64 {
            0x0C
        } else {
            0x08
        }
    }

    fn mask_offset(&self) -> usize {
        self.data_offset() + 4
    }

    fn pending_offset(&self) -> usize {
        self.data_offset() + 8
    }

    /// The vectors the function has (multiple message capable).
    pub fn capable(&self) -> usize {
        1 << self.log2_capable
    }

    /// One bit for each vector the function has.
    fn capable_bits(&self) -> u32 {
        u32::MAX >> (32 - self.capable())
    }

    fn control(&self, config: &PciConfig) -> u16 {
        config.word(self.cap + 2)
    }

    /// Whether the guest enabled MSI.
    pub fn enabled(&self, config: &PciConfig) -> bool {
        self.control(config) & CTRL_ENABLE != 0
    }

    /// The vectors the guest enabled (multiple message enable, at most
    /// what the function is capable of).
    pub fn enabled_vectors(&self, config: &PciConfig) -> usize {
        let mme = (self.control(config) & CTRL_MME) >> CTRL_MME_SHIFT;
        1 << mme.min(self.log2_capable)
    }

    /// The message address.
    pub fn address(&self, config: &PciConfig) -> u64 {
        let low = u64::from(dword(config, self.cap + 4) & !3);
        if self.addr64 {
            low | u64::from(dword(config, self.cap + 8)) << 32
        } else {
            low
        }
    }

    /// The message data as programmed.
    pub fn data(&self, config: &PciConfig) -> u16 {
        config.word(self.cap + self.data_offset())
    }

    /// The mask bits (none without per-vector masking).
    pub fn mask(&self, config: &PciConfig) -> u32 {
        if self.per_vector_mask {
            dword(config, self.cap + self.mask_offset()) & self.capable_bits()
        } else {
            0
        }
    }

    /// The pending bits (none without per-vector masking).
    pub fn pending(&self, config: &PciConfig) -> u32 {
        if self.per_vector_mask {
            dword(config, self.cap + self.pending_offset()) & self.capable_bits()
        } else {
            0
        }
    }

    fn set_pending(&self, config: &mut PciConfig, pending: u32) {
        if self.per_vector_mask {
            set_bytes(config, self.cap + self.pending_offset(), &pending.to_le_bytes());
        }
    }

    /// Whether `vector` is masked.
    pub fn masked(&self, config: &PciConfig, vector: usize) -> bool {
        vector < MAX_VECTORS && self.mask(config) & (1 << vector) != 0
    }

    /// Vector `vector`'s message `(address, data)`: the data's low bits,
    /// as many as select among the enabled vectors, are the vector number.
    pub fn message(&self, config: &PciConfig, vector: usize) -> (u64, u32) {
        let n = self.enabled_vectors(config) as u32;
        let data = u32::from(self.data(config)) & !(n - 1) | (vector as u32 & (n - 1));
        (self.address(config), data)
    }

    /// Fires `vector`: sends its message, or sets its pending bit while it
    /// is masked. Nothing happens while MSI is disabled or for a vector
    /// beyond the enabled ones. Returns whether a message went out.
    pub fn notify(&self, config: &mut PciConfig, vector: usize) -> bool {
        if !self.enabled(config) || vector >= self.enabled_vectors(config) {
            return false;
        }
        if self.masked(config, vector) {
            let p = self.pending(config) | 1 << vector;
            self.set_pending(config, p);
            return false;
        }
        let (address, data) = self.message(config, vector);
        self.sink.msi(address, data);
        true
    }

    /// The guest wrote config bytes `[offset, offset + len)`: a
    /// multiple-message-enable written beyond the capable count is
    /// clamped; then, if `deliver` (a function passes false while it uses
    /// MSI-X instead) and MSI is enabled, pending bits beyond the enabled
    /// vectors are dropped and the unmasked ones delivered (after any
    /// write: a pending message may have waited for MSI-X to go off).
    pub fn config_written(&self, config: &mut PciConfig, offset: usize, len: usize, deliver: bool) {
        let control = self.control(config);
        let ours = offset < self.cap + self.size() && offset + len > self.cap;
        if ours && (control & CTRL_MME) >> CTRL_MME_SHIFT > self.log2_capable {
            let c = control & !CTRL_MME | self.log2_capable << CTRL_MME_SHIFT;
            set_bytes(config, self.cap + 2, &c.to_le_bytes());
        }
        if !deliver || !self.per_vector_mask || !self.enabled(config) || self.pending(config) == 0 {
            return;
        }
        let n = self.enabled_vectors(config);
        let mut pending = self.pending(config) & (u32::MAX >> (32 - n));
        self.set_pending(config, pending);
        for v in 0..n {
            if pending & (1 << v) != 0 && !self.masked(config, v) {
                pending &= !(1 << v);
                self.set_pending(config, pending);
                let (address, data) = self.message(config, v);
                self.sink.msi(address, data);
            }
        }
    }

    /// The registers.
    pub fn state(&self, config: &PciConfig) -> MsiState {
        MsiState {
            control: self.control(config),
            address: self.address(config),
            data: self.data(config),
            mask: self.mask(config),
            pending: self.pending(config),
        }
    }

    /// Writes a snapshot's registers into `config`; they must fit this
    /// capability (the same read-only control bits, an enabled count it is
    /// capable of, an address it can hold, bits only for its vectors).
    /// Nothing is delivered.
    pub fn restore(&self, config: &mut PciConfig, state: &MsiState) -> Result<(), String> {
        let built = self.control_as_built();
        if state.control & !CTRL_WRITABLE != built {
            return Err(format!(
                "MSI message control {:#06x} does not fit the capability ({:#06x} read-only)",
                state.control, built
            ));
        }
        if (state.control & CTRL_MME) >> CTRL_MME_SHIFT > self.log2_capable {
            return Err(format!(
                "MSI state enables more vectors than the function's {}",
                self.capable()
            ));
        }
        if state.address & 3 != 0 || (!self.addr64 && state.address >> 32 != 0) {
            return Err(format!("MSI address {:#x} does not fit the capability", state.address));
        }
        let bits = if self.per_vector_mask { self.capable_bits() } else { 0 };
        if (state.mask | state.pending) & !bits != 0 {
            return Err(format!(
                "MSI mask {:#x} or pending {:#x} names vectors the function does not have",
                state.mask, state.pending
            ));
        }
        set_bytes(config, self.cap + 2, &state.control.to_le_bytes());
        set_bytes(config, self.cap + 4, &(state.address as u32).to_le_bytes());
        if self.addr64 {
            set_bytes(config, self.cap + 8, &((state.address >> 32) as u32).to_le_bytes());
        }
        set_bytes(config, self.cap + self.data_offset(), &state.data.to_le_bytes());
        if self.per_vector_mask {
            set_bytes(config, self.cap + self.mask_offset(), &state.mask.to_le_bytes());
            set_bytes(config, self.cap + self.pending_offset(), &state.pending.to_le_bytes());
        }
        Ok(())
    }

    /// Message control's read-only bits as the capability was built.
    fn control_as_built(&self) -> u16 {
        self.log2_capable << CTRL_MMC_SHIFT
            | if self.addr64 { CTRL_64BIT } else { 0 }
            | if self.per_vector_mask { CTRL_PVM } else { 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci_config::PciIds;
    use proptest::prelude::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Sent(Mutex<Vec<(u64, u32)>>);
    impl MsiSink for Sent {
        fn msi(&self, address: u64, data: u32) {
            self.0.lock().unwrap().push((address, data));
        }
    }

    impl Sent {
        fn take(&self) -> Vec<(u64, u32)> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    fn config() -> PciConfig {
        PciConfig::new(PciIds {
            vendor: 1,
            device: 2,
            revision: 0,
            class: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        })
    }

    fn setup(options: MsiOptions) -> (PciConfig, Msi, Arc<Sent>) {
        let mut c = config();
        let sent = Arc::new(Sent::default());
        let m = Msi::new(&mut c, options, sent.clone());
        (c, m, sent)
    }

    fn opts(vectors: usize, addr64: bool, per_vector_mask: bool) -> MsiOptions {
        MsiOptions {
            vectors,
            addr64,
            per_vector_mask,
        }
    }

    /// A guest write, as the PCI host makes it: through the masks, then
    /// the device's hook.
    fn write(c: &mut PciConfig, m: &Msi, off: usize, bytes: &[u8]) {
        c.write(off, bytes);
        m.config_written(c, off, bytes.len(), true);
    }

    #[test]
    fn capability_sizes_and_defaults() {
        for (a64, pvm, size) in [
            (false, false, 10),
            (true, false, 14),
            (false, true, 20),
            (true, true, 24),
        ] {
            let (mut c, m, _) = setup(opts(1, a64, pvm));
            assert_eq!((m.capability(), m.size()), (0x40, size));
            assert_eq!(c.byte(0x34), 0x40);
            assert_eq!((c.byte(0x40), c.byte(0x41)), (CAP_MSI, 0));
            let next = c.add_capability(0x09, &[0, 0], &[]);
            assert_eq!(next, (0x40 + size + 3) & !3, "the next capability follows");
            assert_eq!(c.byte(0x41), next as u8);
        }
        let (c, m, _) = setup(MsiOptions::default());
        assert_eq!(c.word(0x42), 0x0180, "64-bit, per-vector masking, one vector");
        assert!(!m.enabled(&c));
        assert_eq!((m.capable(), m.enabled_vectors(&c)), (1, 1));
        for (asked, capable) in [(0, 1), (3, 4), (17, 32), (500, 32)] {
            let (c, m, _) = setup(opts(asked, true, true));
            assert_eq!(m.capable(), capable, "{asked} asked");
            assert_eq!(
                usize::from((c.word(0x42) >> 1) & 7),
                capable.trailing_zeros() as usize,
                "multiple message capable"
            );
        }
    }

    #[test]
    fn write_masks_of_a_64_bit_capability_with_masking() {
        let (mut c, m, _) = setup(opts(4, true, true));
        let before = c.bytes().to_vec();
        for off in 0x40..0x40 + 24 {
            write(&mut c, &m, off, &[0xFF]);
        }
        assert_eq!((c.byte(0x40), c.byte(0x41)), (CAP_MSI, 0), "ID and next pointer");
        assert_eq!(c.word(0x42), 0x0184 | 0x01 | 2 << 4, "enable; MME clamped to MMC");
        assert_eq!(dword(&c, 0x44), 0xFFFF_FFFC, "address: dword aligned");
        assert_eq!(dword(&c, 0x48), 0xFFFF_FFFF, "upper address");
        assert_eq!(c.word(0x4C), 0xFFFF, "data");
        assert_eq!(c.word(0x4E), 0, "extended data: reserved");
        assert_eq!(dword(&c, 0x50), 0xF, "mask bits of the four vectors only");
        assert_eq!(dword(&c, 0x54), 0, "pending bits: read-only");
        assert_eq!(c.bytes()[0x58..], before[0x58..], "nothing beyond");
        assert_eq!(c.bytes()[..0x40], before[..0x40], "nothing before");
        for off in 0x40..0x40 + 24 {
            write(&mut c, &m, off, &[0]);
        }
        assert_eq!(c.bytes(), &before[..], "everything writable clears again");
        for (mme, want) in [(1u16, 1), (2, 2), (3, 2), (5, 2), (7, 2), (0, 0)] {
            write(&mut c, &m, 0x42, &(mme << 4).to_le_bytes());
            assert_eq!((c.word(0x42) >> 4) & 7, want, "MME {mme}");
            assert_eq!(m.enabled_vectors(&c), 1 << want);
        }
        write(&mut c, &m, 0x43, &[0xFF]);
        assert_eq!(c.word(0x42), 0x0184, "the high byte of control is read-only");
    }

    #[test]
    fn write_masks_of_a_32_bit_capability_without_masking() {
        let (mut c, m, _) = setup(opts(1, false, false));
        let before = c.bytes().to_vec();
        c.write(0x40, &[0xFF; 16]);
        m.config_written(&mut c, 0x40, 16, true);
        assert_eq!((c.byte(0x40), c.byte(0x41)), (CAP_MSI, 0));
        assert_eq!(c.word(0x42), 0x0001, "enable only: one vector, 32-bit, no masking");
        assert_eq!(dword(&c, 0x44), 0xFFFF_FFFC);
        assert_eq!(c.word(0x48), 0xFFFF, "data right after the 32-bit address");
        assert_eq!(c.bytes()[0x4A..], before[0x4A..], "nothing beyond");
        assert_eq!(m.address(&c), 0xFFFF_FFFC);
        assert_eq!((m.mask(&c), m.pending(&c)), (0, 0));
        assert!(!m.masked(&c, 0));
    }

    #[test]
    fn delivery_masking_pending_and_holding_back() {
        let (mut c, m, sent) = setup(opts(4, true, true));
        assert!(!m.notify(&mut c, 0), "MSI disabled");
        assert_eq!((m.pending(&c), sent.take()), (0, vec![]), "nothing held while disabled");
        write(&mut c, &m, 0x44, &0xFEE0_1000u32.to_le_bytes());
        write(&mut c, &m, 0x48, &1u32.to_le_bytes());
        write(&mut c, &m, 0x4C, &0x4123u16.to_le_bytes());
        write(&mut c, &m, 0x42, &[0x21, 0]);
        assert!(m.enabled(&c));
        assert!(m.notify(&mut c, 2));
        assert_eq!(
            sent.take(),
            vec![(0x1_FEE0_1000, 0x4122)],
            "the data's low bits are the vector"
        );
        assert!(!m.notify(&mut c, 4), "beyond the enabled vectors");
        assert!(!m.notify(&mut c, 99));
        // A masked vector pends; unmasking delivers it once.
        write(&mut c, &m, 0x50, &[0b0010]);
        assert!(!m.notify(&mut c, 1));
        assert_eq!(m.pending(&c), 0b0010);
        assert_eq!(dword(&c, 0x54), 0b0010, "the guest sees it");
        write(&mut c, &m, 0x54, &[0]);
        assert_eq!(m.pending(&c), 0b0010, "the guest cannot clear it");
        assert!(sent.take().is_empty());
        write(&mut c, &m, 0x50, &[0]);
        assert_eq!(sent.take(), vec![(0x1_FEE0_1000, 0x4121)]);
        assert_eq!(m.pending(&c), 0);
        write(&mut c, &m, 0x50, &[0]);
        assert!(sent.take().is_empty(), "delivered once");
        // Pending while MSI is disabled stays pending; enabling fewer
        // vectors drops what is beyond them.
        write(&mut c, &m, 0x50, &[0b1001]);
        assert!(!m.notify(&mut c, 3) && !m.notify(&mut c, 0));
        write(&mut c, &m, 0x42, &[0x20, 0]);
        write(&mut c, &m, 0x50, &[0]);
        assert!(sent.take().is_empty(), "MSI disabled: held");
        assert_eq!(m.pending(&c), 0b1001);
        write(&mut c, &m, 0x42, &[0x11, 0]);
        assert_eq!(sent.take(), vec![(0x1_FEE0_1000, 0x4122)], "vector 0 of two enabled");
        assert_eq!(m.pending(&c), 0, "vector 3 dropped");
        assert!(m.notify(&mut c, 1));
        assert_eq!(sent.take(), vec![(0x1_FEE0_1000, 0x4123)]);
        assert_eq!(m.message(&c, 1), (0x1_FEE0_1000, 0x4123));
        // A function that uses MSI-X holds MSI's pending messages back, and
        // lets them go at its next config write once it does not.
        write(&mut c, &m, 0x50, &[0b01]);
        assert!(!m.notify(&mut c, 0));
        c.write(0x50, &[0]);
        m.config_written(&mut c, 0x50, 1, false);
        assert!(sent.take().is_empty());
        assert_eq!(m.pending(&c), 0b01);
        c.write(0x04, &[0x06]);
        m.config_written(&mut c, 0x04, 1, true);
        assert_eq!(
            sent.take(),
            vec![(0x1_FEE0_1000, 0x4122)],
            "a write outside the capability"
        );
        assert_eq!(m.pending(&c), 0);
    }

    #[test]
    fn without_masking_every_enabled_vector_goes_out() {
        let (mut c, m, sent) = setup(opts(2, false, false));
        write(&mut c, &m, 0x44, &0xFEE0_0000u32.to_le_bytes());
        write(&mut c, &m, 0x48, &0x0031u16.to_le_bytes());
        write(&mut c, &m, 0x42, &[0x11, 0]);
        assert!(m.notify(&mut c, 0) && m.notify(&mut c, 1));
        assert_eq!(sent.take(), vec![(0xFEE0_0000, 0x30), (0xFEE0_0000, 0x31)]);
    }

    #[test]
    fn snapshot_round_trip_and_refusals() {
        let (mut c, m, _) = setup(opts(8, true, true));
        write(&mut c, &m, 0x44, &0xFEE0_2000u32.to_le_bytes());
        write(&mut c, &m, 0x4C, &0x55u16.to_le_bytes());
        write(&mut c, &m, 0x50, &[0x81]);
        write(&mut c, &m, 0x42, &[0x31, 0]);
        assert!(!m.notify(&mut c, 7));
        let s = m.state(&c);
        assert_eq!(
            s,
            MsiState {
                control: 0x0186 | 0x31,
                address: 0xFEE0_2000,
                data: 0x55,
                mask: 0x81,
                pending: 0x80,
            }
        );
        let (mut d, n, sent) = setup(opts(8, true, true));
        n.restore(&mut d, &s).unwrap();
        assert_eq!(d.bytes(), c.bytes());
        assert!(sent.take().is_empty(), "a restore delivers nothing");
        for (other, state) in [
            (opts(4, true, true), s),
            (opts(8, false, true), s),
            (opts(8, true, false), s),
            (
                opts(8, true, true),
                MsiState {
                    control: s.control | 0x8000,
                    ..s
                },
            ),
            (
                opts(8, true, true),
                MsiState {
                    address: 0xFEE0_2002,
                    ..s
                },
            ),
            (
                opts(8, false, true),
                MsiState {
                    control: 0x0106,
                    address: 1 << 32,
                    ..s
                },
            ),
            (
                opts(2, true, true),
                MsiState {
                    control: 0x0182,
                    mask: 0x4,
                    pending: 0,
                    ..s
                },
            ),
            (
                opts(2, true, true),
                MsiState {
                    control: 0x0182 | 0x20,
                    mask: 0,
                    pending: 0,
                    ..s
                },
            ),
        ] {
            let (mut e, o, _) = setup(other);
            let fresh = e.bytes().to_vec();
            assert!(o.restore(&mut e, &state).is_err(), "{other:?} {state:?}");
            assert_eq!(e.bytes(), &fresh[..], "a refused state changes nothing");
        }
    }

    #[test]
    fn garbage_in_config_space_does_not_panic() {
        let (mut c, m, sent) = setup(opts(32, true, true));
        let mut bytes = c.bytes().to_vec();
        bytes[0x40..0x58].fill(0xFF);
        c.restore(&bytes).unwrap();
        assert_eq!(m.enabled_vectors(&c), 32);
        assert!(!m.notify(&mut c, 31), "masked");
        m.config_written(&mut c, 0x40, 24, true);
        for v in 0..40 {
            m.notify(&mut c, v);
            let _ = m.message(&c, v);
        }
        assert!(sent.take().is_empty(), "every vector masked");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(usize, Vec<u8>),
        Notify(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0x40usize..0x40 + 28, prop::collection::vec(any::<u8>(), 1..5)).prop_map(|(o, d)| Op::Write(o, d)),
            (0x42usize..0x44, prop::collection::vec(any::<u8>(), 1..3)).prop_map(|(o, d)| Op::Write(o, d)),
            (0usize..40).prop_map(Op::Notify),
        ]
    }

    proptest! {
        /// Random guest writes to the capability and notifies never panic,
        /// leave the read-only bits alone, and every message that goes out
        /// carries the programmed address and data (low bits: an enabled,
        /// unmasked vector).
        #[test]
        fn random_writes_keep_read_only_bits_and_messages_programmed(
            vectors in 1usize..=32,
            addr64 in any::<bool>(),
            pvm in any::<bool>(),
            ops in prop::collection::vec(op(), 0..120),
        ) {
            let (mut c, m, sent) = setup(opts(vectors, addr64, pvm));
            let size = m.size();
            let built = c.word(0x42);
            let after = c.bytes()[0x40 + size..].to_vec();
            let capable = m.capable() as u32;
            let data_off = 0x40 + if addr64 { 0x0C } else { 0x08 };
            for op in ops {
                match op {
                    Op::Write(off, data) => write(&mut c, &m, off, &data),
                    Op::Notify(v) => {
                        let went = m.notify(&mut c, v);
                        prop_assert!(!went || (v < m.enabled_vectors(&c) && !m.masked(&c, v)));
                    }
                }
                prop_assert_eq!((c.byte(0x40), c.byte(0x41)), (CAP_MSI, 0));
                let control = c.word(0x42);
                prop_assert_eq!(control & !CTRL_WRITABLE, built);
                let mme = u32::from((control & CTRL_MME) >> CTRL_MME_SHIFT);
                prop_assert!(1 << mme <= capable, "MME {} beyond {} vectors", mme, capable);
                prop_assert_eq!(c.byte(0x44) & 3, 0);
                if pvm {
                    prop_assert_eq!(c.word(data_off + 2), 0, "reserved");
                    let bits = u32::MAX >> (32 - capable);
                    prop_assert_eq!(dword(&c, data_off + 4) & !bits, 0, "mask bits of absent vectors");
                    prop_assert_eq!(dword(&c, data_off + 8) & !bits, 0, "pending bits of absent vectors");
                }
                prop_assert_eq!(&c.bytes()[0x40 + size..], &after[..]);
                let address = u64::from(dword(&c, 0x44))
                    | if addr64 { u64::from(dword(&c, 0x48)) << 32 } else { 0 };
                let programmed = u32::from(c.word(data_off));
                let n = 1u32 << mme;
                for (a, d) in sent.take() {
                    prop_assert!(control & CTRL_ENABLE != 0, "a message while MSI is disabled");
                    prop_assert_eq!(a, address);
                    prop_assert_eq!(d & !(n - 1), programmed & !(n - 1));
                    prop_assert!(!m.masked(&c, (d & (n - 1)) as usize), "a masked vector went out");
                }
            }
        }
    }
}
