//! The I/O APIC of the PC (an 82093AA as QEMU's `hw/intc/ioapic.c` models
//! it, version 0x20): 24 input pins, each with a 64-bit redirection entry
//! reached through the index register IOREGSEL (offset 0x00) and the data
//! window IOWIN (0x10), plus the EOI register (0x40) of version 0x20.
//!
//! The device only turns pin changes into interrupt messages: `set_level`,
//! register writes and `eoi` return the [`IoApicMessage`]s to hand to the
//! local APICs, in the order QEMU would send them. An edge-triggered pin is
//! delivered on its rising edge when unmasked; an edge that arrives while
//! the pin is masked is dropped, as QEMU does ("we must ignore edge requests
//! if the input pin is masked"). A level-triggered pin is delivered while
//! asserted and its Remote IRR is clear, which the delivery sets; the local
//! APIC's EOI broadcast (or the EOI register) clears it and delivers again
//! if the line is still asserted. Any write to a redirection entry
//! re-examines every pin, so unmasking an asserted level pin delivers it.
//! The polarity bit is stored but the level given to [`IoApic::set_level`]
//! is the logical "asserted" level, as in QEMU.
//!
//! Like QEMU's `ioapic_set_irq`, input 0 is wired to pin 2 (ISA IRQ 0 is GSI
//! 2 on a PC; the MADT says so), so pin 0 itself can never be raised.
//!
//! Left out of QEMU's model: the delayed re-delivery after 10 000
//! back-to-back EOIs of a still-asserted level pin (an interrupt-storm
//! brake that needs a timer), and interrupt remapping. For an ExtINT entry
//! QEMU acknowledges the PIC while building the message; here the message
//! carries the entry's vector field and the receiver must ask the PIC.

use crate::bus::mmio_pieces;

/// Guest-physical address of the I/O APIC.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Length of its MMIO window.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Number of input pins (redirection entries).
pub const IOAPIC_PINS: usize = 24;
/// The version the version register reports (QEMU's default).
pub const IOAPIC_VERSION: u8 = 0x20;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const EOI: u64 = 0x40;

const REG_ID: u8 = 0x00;
const REG_VER: u8 = 0x01;
const REG_ARB: u8 = 0x02;
const REG_REDTBL: u8 = 0x10;

const ID_SHIFT: u32 = 24;
const ID_MASK: u8 = 0x0f;

const VECTOR_MASK: u64 = 0xff;
const DELIVERY_MODE_SHIFT: u32 = 8;
const DEST_LOGICAL: u64 = 1 << 11;
const DELIVERY_STATUS: u64 = 1 << 12;
const REMOTE_IRR: u64 = 1 << 14;
const TRIGGER_LEVEL: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
const DEST_SHIFT: u32 = 56;
/// Bits a guest write does not change.
const RO_BITS: u64 = REMOTE_IRR | DELIVERY_STATUS;

const PIN_MASK: u32 = (1 << IOAPIC_PINS) - 1;

/// One interrupt message for the local APIC(s), built from the redirection
/// entry of `pin` when it was delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IoApicMessage {
    /// The pin that was delivered.
    pub pin: u8,
    /// The entry's vector (for ExtINT, ask the PIC instead).
    pub vector: u8,
    /// Delivery mode: 0 fixed, 1 lowest priority, 2 SMI, 4 NMI, 5 INIT,
    /// 7 ExtINT (3 and 6 are reserved and passed on as they are).
    pub delivery_mode: u8,
    /// Destination field (bits 63-56 of the entry).
    pub dest: u8,
    /// Logical (rather than physical) destination mode.
    pub logical: bool,
    /// Level-triggered: the local APIC must broadcast its EOI back through
    /// [`IoApic::eoi`].
    pub level: bool,
}

/// The snapshot state of the I/O APIC.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IoApicState {
    /// The APIC ID (4 bits).
    pub id: u8,
    /// The register IOWIN reaches.
    pub ioregsel: u8,
    /// QEMU's `irr`: for a level pin whether it is asserted, for an edge pin
    /// an edge not yet delivered (only left by a level-to-edge switch).
    pub irr: u32,
    /// The level each input was last driven to (for edge detection).
    pub lines: u32,
    /// The redirection entries.
    pub redirection: [u64; IOAPIC_PINS],
}

impl Default for IoApicState {
    /// The reset state: ID 0, every entry masked and edge-triggered.
    fn default() -> Self {
        Self {
            id: 0,
            ioregsel: 0,
            irr: 0,
            lines: 0,
            redirection: [MASKED; IOAPIC_PINS],
        }
    }
}

/// The I/O APIC.
#[derive(Debug, Default)]
pub struct IoApic {
    state: IoApicState,
}

fn message(pin: usize, entry: u64) -> IoApicMessage {
    IoApicMessage {
        pin: pin as u8,
        vector: (entry & VECTOR_MASK) as u8,
        delivery_mode: ((entry >> DELIVERY_MODE_SHIFT) & 7) as u8,
        dest: (entry >> DEST_SHIFT) as u8,
        logical: entry & DEST_LOGICAL != 0,
        level: entry & TRIGGER_LEVEL != 0,
    }
}

impl IoApic {
    /// An I/O APIC in its reset state (ID 0, all entries masked).
    pub fn new() -> Self {
        Self::default()
    }

    /// An I/O APIC restored from `state`, which must be one this model can
    /// reach: a 4-bit ID, no bits above pin 23, no delivery-status bit, no
    /// Remote IRR on an edge-triggered entry.
    pub fn from_state(state: &IoApicState) -> Result<Self, String> {
        if state.id > ID_MASK {
            return Err(format!("I/O APIC ID {:#x} has more than 4 bits", state.id));
        }
        if state.irr & !PIN_MASK != 0 || state.lines & !PIN_MASK != 0 {
            return Err(format!(
                "I/O APIC irr {:#x} or lines {:#x} name pins above {}",
                state.irr,
                state.lines,
                IOAPIC_PINS - 1
            ));
        }
        for (pin, &entry) in state.redirection.iter().enumerate() {
            if entry & DELIVERY_STATUS != 0 {
                return Err(format!("I/O APIC entry {pin} ({entry:#x}) has its delivery status set"));
            }
            if entry & REMOTE_IRR != 0 && entry & TRIGGER_LEVEL == 0 {
                return Err(format!(
                    "I/O APIC entry {pin} ({entry:#x}) is edge-triggered with Remote IRR set"
                ));
            }
        }
        Ok(Self { state: state.clone() })
    }

    /// The snapshot state.
    pub fn state(&self) -> IoApicState {
        self.state.clone()
    }

    /// The machine reset, as QEMU's `ioapic_reset_common`: ID, IOREGSEL and
    /// requests cleared, every entry masked. The input levels stay.
    pub fn reset(&mut self) {
        self.state = IoApicState {
            lines: self.state.lines,
            ..IoApicState::default()
        };
    }

    /// The redirection entry of `pin`, if there is such a pin.
    pub fn redirection(&self, pin: u8) -> Option<u64> {
        self.state.redirection.get(usize::from(pin)).copied()
    }

    /// A guest read at `offset` into the MMIO window. Accesses are split
    /// as QEMU's memory core splits them (pieces of at most 4 bytes, each
    /// naturally aligned); IOREGSEL reads at any piece size, IOWIN only as
    /// 4 bytes, everything else reads 0. The window repeats every 256 bytes.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (at, start, size) in mmio_pieces(offset, data.len(), 4) {
            let value = self.read_reg(at, size);
            data[start..start + size].copy_from_slice(&value.to_le_bytes()[..size]);
        }
    }

    /// A guest write at `offset` into the MMIO window, split as in
    /// [`IoApic::read`]: IOREGSEL at any size (its low byte), IOWIN and the
    /// EOI register as 4 bytes only. Returns what the write delivered (a
    /// redirection write that unmasks an asserted level pin, an EOI).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Vec<IoApicMessage> {
        let mut out = Vec::new();
        for (at, start, size) in mmio_pieces(offset, data.len(), 4) {
            let mut bytes = [0u8; 4];
            bytes[..size].copy_from_slice(&data[start..start + size]);
            self.write_reg(at, size, u32::from_le_bytes(bytes), &mut out);
        }
        out
    }

    /// Drives input `pin` to its logical level (`high` = asserted). Input 0
    /// is pin 2 (see the file comment); inputs from 24 up do not exist and
    /// are ignored.
    pub fn set_level(&mut self, pin: u8, high: bool) -> Vec<IoApicMessage> {
        let mut out = Vec::new();
        let pin = if pin == 0 { 2 } else { usize::from(pin) };
        if pin >= IOAPIC_PINS {
            return out;
        }
        let mask = 1u32 << pin;
        let was_high = self.state.lines & mask != 0;
        if high {
            self.state.lines |= mask;
        } else {
            self.state.lines &= !mask;
        }
        let entry = self.state.redirection[pin];
        if entry & TRIGGER_LEVEL != 0 {
            if high {
                self.state.irr |= mask;
                if entry & REMOTE_IRR == 0 {
                    self.service(&mut out);
                }
            } else {
                self.state.irr &= !mask;
            }
        } else if high && !was_high && entry & MASKED == 0 {
            self.state.irr |= mask;
            self.service(&mut out);
        }
        out
    }

    /// The local APIC's EOI broadcast for `vector`: clears the Remote IRR of
    /// every level-triggered entry with that vector, and delivers again each
    /// such pin that is still asserted and unmasked.
    pub fn eoi(&mut self, vector: u8) -> Vec<IoApicMessage> {
        let mut out = Vec::new();
        self.eoi_into(vector, &mut out);
        out
    }

    fn eoi_into(&mut self, vector: u8, out: &mut Vec<IoApicMessage>) {
        for pin in 0..IOAPIC_PINS {
            let entry = self.state.redirection[pin];
            if entry & VECTOR_MASK != u64::from(vector) || entry & TRIGGER_LEVEL == 0 || entry & REMOTE_IRR == 0 {
                continue;
            }
            self.state.redirection[pin] = entry & !REMOTE_IRR;
            if entry & MASKED == 0 && self.state.irr & (1 << pin) != 0 {
                self.service(out);
            }
        }
    }

    /// QEMU's `ioapic_service`: delivers every requesting unmasked pin; an
    /// edge request is consumed, a level one sets Remote IRR (and is held
    /// back while Remote IRR was already set).
    fn service(&mut self, out: &mut Vec<IoApicMessage>) {
        for pin in 0..IOAPIC_PINS {
            let mask = 1u32 << pin;
            if self.state.irr & mask == 0 {
                continue;
            }
            let entry = self.state.redirection[pin];
            if entry & MASKED != 0 {
                continue;
            }
            if entry & TRIGGER_LEVEL == 0 {
                self.state.irr &= !mask;
            } else {
                if entry & REMOTE_IRR != 0 {
                    continue;
                }
                self.state.redirection[pin] |= REMOTE_IRR;
            }
            out.push(message(pin, entry));
        }
    }

    /// The entry index and half (true for bits 63-32) IOREGSEL selects.
    fn selected_entry(&self) -> Option<(usize, bool)> {
        let sel = self.state.ioregsel;
        let index = usize::from(sel.checked_sub(REG_REDTBL)? >> 1);
        (index < IOAPIC_PINS).then_some((index, sel & 1 != 0))
    }

    fn read_reg(&self, offset: u64, size: usize) -> u32 {
        match offset & 0xff {
            IOREGSEL => u32::from(self.state.ioregsel),
            IOWIN if size == 4 => match self.state.ioregsel {
                REG_ID | REG_ARB => u32::from(self.state.id) << ID_SHIFT,
                REG_VER => u32::from(IOAPIC_VERSION) | ((IOAPIC_PINS as u32 - 1) << 16),
                _ => match self.selected_entry() {
                    Some((index, true)) => (self.state.redirection[index] >> 32) as u32,
                    Some((index, false)) => self.state.redirection[index] as u32,
                    None => 0,
                },
            },
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, size: usize, value: u32, out: &mut Vec<IoApicMessage>) {
        match offset & 0xff {
            IOREGSEL => self.state.ioregsel = value as u8,
            IOWIN if size == 4 => match self.state.ioregsel {
                REG_ID => self.state.id = (value >> ID_SHIFT) as u8 & ID_MASK,
                REG_VER | REG_ARB => {}
                _ => {
                    let Some((index, high)) = self.selected_entry() else {
                        return;
                    };
                    let entry = &mut self.state.redirection[index];
                    let read_only = *entry & RO_BITS;
                    *entry = if high {
                        (*entry & 0xffff_ffff) | u64::from(value) << 32
                    } else {
                        (*entry & !0xffff_ffff) | u64::from(value)
                    };
                    *entry = (*entry & !RO_BITS) | read_only;
                    // Linux's trick to end a stuck level interrupt: switching
                    // an entry to edge clears its Remote IRR.
                    if *entry & TRIGGER_LEVEL == 0 {
                        *entry &= !REMOTE_IRR;
                    }
                    self.service(out);
                }
            },
            EOI if size == 4 => {
                if let Ok(vector) = u8::try_from(value) {
                    self.eoi_into(vector, out);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn write32(io: &mut IoApic, offset: u64, value: u32) -> Vec<IoApicMessage> {
        io.write(offset, &value.to_le_bytes())
    }

    fn read32(io: &mut IoApic, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        io.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn reg_write(io: &mut IoApic, reg: u8, value: u32) -> Vec<IoApicMessage> {
        write32(io, IOREGSEL, u32::from(reg));
        write32(io, IOWIN, value)
    }

    fn reg_read(io: &mut IoApic, reg: u8) -> u32 {
        write32(io, IOREGSEL, u32::from(reg));
        read32(io, IOWIN)
    }

    /// Programs `pin` as Linux does: high half first, then the low half.
    fn program(io: &mut IoApic, pin: u8, entry: u64) -> Vec<IoApicMessage> {
        let mut out = reg_write(io, REG_REDTBL + 2 * pin + 1, (entry >> 32) as u32);
        out.extend(reg_write(io, REG_REDTBL + 2 * pin, entry as u32));
        out
    }

    fn pins(msgs: &[IoApicMessage]) -> Vec<u8> {
        msgs.iter().map(|m| m.pin).collect()
    }

    #[test]
    fn version_id_and_arbitration_registers() {
        let mut io = IoApic::new();
        assert_eq!(reg_read(&mut io, REG_VER), 0x0017_0020);
        assert_eq!(reg_read(&mut io, REG_ID), 0);
        reg_write(&mut io, REG_ID, 0xff00_0000);
        assert_eq!(reg_read(&mut io, REG_ID), 0x0f00_0000, "4-bit ID");
        assert_eq!(reg_read(&mut io, REG_ARB), 0x0f00_0000, "arbitration ID is the ID");
        reg_write(&mut io, REG_VER, 0);
        reg_write(&mut io, REG_ARB, 0);
        assert_eq!(reg_read(&mut io, REG_VER), 0x0017_0020);
        assert_eq!(reg_read(&mut io, REG_ID), 0x0f00_0000);
        assert_eq!(reg_read(&mut io, 0x03), 0, "no register between ARB and the table");
        assert_eq!(reg_read(&mut io, REG_REDTBL + 48), 0, "no 25th entry");
    }

    #[test]
    fn reset_state_masks_every_entry() {
        let mut io = IoApic::new();
        for pin in 0..IOAPIC_PINS as u8 {
            assert_eq!(reg_read(&mut io, REG_REDTBL + 2 * pin), 0x0001_0000);
            assert_eq!(reg_read(&mut io, REG_REDTBL + 2 * pin + 1), 0);
        }
        program(&mut io, 5, 0x0300_0000_0000_0035);
        reg_write(&mut io, REG_ID, 0x0300_0000);
        io.set_level(5, true);
        io.reset();
        assert_eq!(
            io.state(),
            IoApicState {
                lines: 1 << 5,
                ..IoApicState::default()
            }
        );
    }

    #[test]
    fn ioregsel_reads_back_and_the_window_repeats() {
        let mut io = IoApic::new();
        io.write(0, &[0x01]);
        assert_eq!(read32(&mut io, 0), 0x01);
        let mut b = [0u8; 1];
        io.read(0, &mut b);
        assert_eq!(b[0], 0x01);
        io.write(0x200, &[0x21, 0x00]);
        assert_eq!(io.state().ioregsel, 0x21, "every 256 bytes, 2-byte write");
        write32(&mut io, 0x100, 0x1ff);
        assert_eq!(io.state().ioregsel, 0xff, "a byte wide");
        write32(&mut io, 0, u32::from(REG_VER));
        assert_eq!(read32(&mut io, 0x310), 0x0017_0020);
    }

    #[test]
    fn odd_sizes_and_alignments_are_harmless() {
        let mut io = IoApic::new();
        write32(&mut io, IOREGSEL, u32::from(REG_VER));
        let mut b = [0u8; 2];
        io.read(IOWIN, &mut b);
        assert_eq!(b, [0, 0], "IOWIN reads only as 4 bytes");
        let mut b = [0u8; 8];
        io.read(IOWIN, &mut b);
        assert_eq!(b, [0x20, 0, 0x17, 0, 0, 0, 0, 0], "8 bytes: IOWIN then offset 0x14");
        let mut b = [0xffu8; 4];
        io.read(IOWIN + 1, &mut b);
        assert_eq!(b, [0; 4], "unaligned pieces decode nothing");
        let mut b = [0xffu8; 3];
        io.read(0, &mut b);
        assert_eq!(b, [0x01, 0, 0]);
        // 8-byte write to IOWIN: the low half goes to the entry.
        write32(&mut io, IOREGSEL, u32::from(REG_REDTBL + 6));
        io.write(IOWIN, &0x1234_5678_0000_0041u64.to_le_bytes());
        assert_eq!(io.redirection(3), Some(0x41));
        io.write(IOWIN + 2, &[0xff, 0xff]);
        io.write(IOWIN, &[0xff]);
        assert_eq!(io.redirection(3), Some(0x41), "IOWIN writes only as 4 bytes");
        io.write(EOI, &[0x41]);
        io.write(0xfff, &[1, 2, 3, 4, 5]);
        io.read(0xffe, &mut [0u8; 16]);
        assert_eq!(io.redirection(24), None);
    }

    #[test]
    fn redirection_entries_keep_their_read_only_bits() {
        let mut io = IoApic::new();
        // Level, unmasked, asserted: Remote IRR gets set by the delivery.
        program(&mut io, 9, 0x0000_0000_0000_8041);
        assert_eq!(io.set_level(9, true).len(), 1);
        assert_eq!(io.redirection(9), Some(0x0000_0000_0000_c041));
        // A guest write can neither clear Remote IRR nor set delivery status.
        reg_write(&mut io, REG_REDTBL + 18, 0x0001_9041);
        assert_eq!(reg_read(&mut io, REG_REDTBL + 18), 0x0001_c041);
        reg_write(&mut io, REG_REDTBL + 19, 0xdead_beef);
        assert_eq!(reg_read(&mut io, REG_REDTBL + 19), 0xdead_beef);
        // Every other bit is stored, reserved ones included (as QEMU).
        reg_write(&mut io, REG_REDTBL, 0xffff_ffff);
        assert_eq!(reg_read(&mut io, REG_REDTBL), 0xffff_afff);
    }

    #[test]
    fn edge_pin_delivers_on_rising_edges_only() {
        let mut io = IoApic::new();
        assert!(program(&mut io, 4, 0x0100_0000_0000_0031).is_empty());
        let msgs = io.set_level(4, true);
        assert_eq!(
            msgs,
            vec![IoApicMessage {
                pin: 4,
                vector: 0x31,
                delivery_mode: 0,
                dest: 1,
                logical: false,
                level: false
            }]
        );
        assert!(io.set_level(4, true).is_empty(), "no edge");
        assert!(io.set_level(4, false).is_empty());
        assert_eq!(pins(&io.set_level(4, true)), vec![4]);
        assert_eq!(io.state().irr, 0, "an edge request is consumed");
        assert!(io.eoi(0x31).is_empty(), "EOI means nothing to an edge pin");
    }

    #[test]
    fn masked_edge_is_dropped() {
        let mut io = IoApic::new();
        program(&mut io, 4, 0x0001_0031);
        assert!(io.set_level(4, true).is_empty());
        io.set_level(4, false);
        assert!(
            program(&mut io, 4, 0x31).is_empty(),
            "nothing was kept to deliver on unmask"
        );
        assert_eq!(pins(&io.set_level(4, true)), vec![4]);
    }

    #[test]
    fn message_fields_come_from_the_entry() {
        let mut io = IoApic::new();
        // Logical destination 0x0f, lowest priority, active low, level.
        program(&mut io, 11, 0x0f00_0000_0000_a955);
        let msgs = io.set_level(11, true);
        assert_eq!(
            msgs,
            vec![IoApicMessage {
                pin: 11,
                vector: 0x55,
                delivery_mode: 1,
                dest: 0x0f,
                logical: true,
                level: true
            }]
        );
        program(&mut io, 12, 0x0000_0000_0000_0700);
        assert_eq!(io.set_level(12, true)[0].delivery_mode, 7);
    }

    #[test]
    fn level_pin_waits_for_eoi_and_redelivers_while_asserted() {
        let mut io = IoApic::new();
        program(&mut io, 9, 0x8041);
        assert_eq!(pins(&io.set_level(9, true)), vec![9]);
        assert!(io.set_level(9, true).is_empty(), "Remote IRR holds it back");
        assert!(io.eoi(0x42).is_empty(), "another vector");
        assert_eq!(io.redirection(9), Some(0xc041));
        assert_eq!(pins(&io.eoi(0x41)), vec![9], "still asserted: delivered again");
        assert_eq!(io.redirection(9), Some(0xc041));
        io.set_level(9, false);
        assert!(io.eoi(0x41).is_empty());
        assert_eq!(io.redirection(9), Some(0x8041), "Remote IRR cleared");
        assert!(io.eoi(0x41).is_empty());
        assert_eq!(pins(&io.set_level(9, true)), vec![9]);
    }

    #[test]
    fn eoi_register_ends_level_interrupts() {
        let mut io = IoApic::new();
        program(&mut io, 10, 0x8050);
        program(&mut io, 11, 0x8050);
        io.set_level(10, true);
        io.set_level(11, true);
        assert_eq!(io.state().redirection[10] & REMOTE_IRR, REMOTE_IRR);
        // Both pins share the vector: one EOI ends both, each still high.
        assert_eq!(pins(&write32(&mut io, EOI, 0x50)), vec![10, 11]);
        io.set_level(10, false);
        io.set_level(11, false);
        assert!(write32(&mut io, EOI, 0x150).is_empty(), "not a vector");
        assert_eq!(io.state().redirection[10] & REMOTE_IRR, REMOTE_IRR);
        assert!(io.write(EOI, &[0x50]).is_empty(), "EOI register takes only 4 bytes");
        assert_eq!(io.state().redirection[10] & REMOTE_IRR, REMOTE_IRR);
        assert!(write32(&mut io, EOI, 0x50).is_empty());
        assert_eq!(io.state().redirection[10] & REMOTE_IRR, 0);
        assert_eq!(io.state().redirection[11] & REMOTE_IRR, 0);
    }

    #[test]
    fn unmasking_an_asserted_level_pin_delivers() {
        let mut io = IoApic::new();
        program(&mut io, 16, 0x0001_8061);
        assert!(io.set_level(16, true).is_empty());
        assert_eq!(pins(&reg_write(&mut io, REG_REDTBL + 32, 0x8061)), vec![16]);
        // Masked while Remote IRR is set: the EOI clears it, nothing goes out,
        // and the unmask delivers.
        reg_write(&mut io, REG_REDTBL + 32, 0x0001_8061);
        assert!(io.eoi(0x61).is_empty());
        assert_eq!(pins(&reg_write(&mut io, REG_REDTBL + 32, 0x8061)), vec![16]);
    }

    #[test]
    fn switching_an_asserted_level_pin_to_edge_delivers_once() {
        // QEMU keeps a level request in irr; as edge it is consumed.
        let mut io = IoApic::new();
        program(&mut io, 7, 0x8047);
        assert_eq!(pins(&io.set_level(7, true)), vec![7]);
        let msgs = reg_write(&mut io, REG_REDTBL + 14, 0x0047);
        assert_eq!(pins(&msgs), vec![7]);
        assert!(!msgs[0].level);
        assert_eq!(io.redirection(7), Some(0x47), "Remote IRR cleared by the switch");
        assert_eq!(io.state().irr, 0);
        // A masked switch keeps the request until the unmask.
        program(&mut io, 7, 0x8047);
        io.set_level(7, false);
        io.set_level(7, true);
        reg_write(&mut io, REG_REDTBL + 14, 0x0001_8047);
        assert!(io.eoi(0x47).is_empty());
        assert!(reg_write(&mut io, REG_REDTBL + 14, 0x0001_0047).is_empty());
        assert_eq!(pins(&reg_write(&mut io, REG_REDTBL + 14, 0x0047)), vec![7]);
    }

    #[test]
    fn input_zero_is_pin_two_and_pins_above_23_do_not_exist() {
        let mut io = IoApic::new();
        program(&mut io, 0, 0x30);
        program(&mut io, 2, 0x32);
        let msgs = io.set_level(0, true);
        assert_eq!(pins(&msgs), vec![2]);
        assert_eq!(msgs[0].vector, 0x32);
        assert_eq!(io.state().lines, 1 << 2);
        assert!(io.set_level(2, true).is_empty(), "the same line, already high");
        io.set_level(0, false);
        assert_eq!(pins(&io.set_level(2, true)), vec![2]);
        let before = io.state();
        assert!(io.set_level(24, true).is_empty());
        assert!(io.set_level(255, true).is_empty());
        assert_eq!(io.state(), before);
    }

    #[test]
    fn state_round_trip_and_corrupt_states() {
        let mut io = IoApic::new();
        program(&mut io, 9, 0x8041);
        io.set_level(9, true);
        reg_write(&mut io, REG_ID, 0x0200_0000);
        let s = io.state();
        let mut copy = IoApic::from_state(&s).unwrap();
        assert_eq!(copy.state(), s);
        assert_eq!(copy.eoi(0x41), io.eoi(0x41));

        let bad = |f: &dyn Fn(&mut IoApicState)| {
            let mut st = s.clone();
            f(&mut st);
            IoApic::from_state(&st).err()
        };
        assert!(bad(&|st| st.id = 0x10).is_some());
        assert!(bad(&|st| st.irr = 1 << 24).is_some());
        assert!(bad(&|st| st.lines = 1 << 31).is_some());
        assert!(bad(&|st| st.redirection[3] |= DELIVERY_STATUS).is_some());
        assert!(bad(&|st| st.redirection[3] = REMOTE_IRR).is_some());
        assert!(bad(&|_| {}).is_none());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, usize, u64),
        Read(u64, usize),
        Line(u8, bool),
        Eoi(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        let offset = prop_oneof![Just(IOREGSEL), Just(IOWIN), Just(EOI), 0u64..0x1000, any::<u64>(),];
        let size = prop::sample::select(vec![1usize, 2, 3, 4, 8]);
        prop_oneof![
            3 => (Just(IOREGSEL), Just(4usize), 0u64..0x40).prop_map(|(o, s, v)| Op::Write(o, s, v)),
            3 => (Just(IOWIN), Just(4usize), any::<u64>()).prop_map(|(o, s, v)| Op::Write(o, s, v)),
            2 => (offset.clone(), size.clone(), any::<u64>()).prop_map(|(o, s, v)| Op::Write(o, s, v)),
            2 => (offset, size).prop_map(|(o, s)| Op::Read(o, s)),
            4 => (0u8..32, any::<bool>()).prop_map(|(p, h)| Op::Line(p, h)),
            2 => any::<u8>().prop_map(Op::Eoi),
        ]
    }

    fn apply(io: &mut IoApic, op: &Op) -> Vec<IoApicMessage> {
        match *op {
            Op::Write(o, s, v) => io.write(o, &v.to_le_bytes()[..s.min(8)]),
            Op::Read(o, s) => {
                io.read(o, &mut vec![0u8; s]);
                Vec::new()
            }
            Op::Line(p, h) => io.set_level(p, h),
            Op::Eoi(v) => io.eoi(v),
        }
    }

    /// The delivery rules in a few lines: an unmasked edge pin on each rising
    /// edge; a level pin whenever it is asserted, unmasked and not waiting
    /// for its EOI.
    #[derive(Debug, Default)]
    struct Model {
        level: [bool; IOAPIC_PINS],
        masked: [bool; IOAPIC_PINS],
        vector: [u8; IOAPIC_PINS],
        line: [bool; IOAPIC_PINS],
        remote: [bool; IOAPIC_PINS],
    }

    impl Model {
        fn entry(&self, pin: usize) -> u64 {
            u64::from(self.vector[pin])
                | if self.level[pin] { TRIGGER_LEVEL } else { 0 }
                | if self.masked[pin] { MASKED } else { 0 }
        }

        /// Level pins the I/O APIC would deliver now, in pin order.
        fn service(&mut self, out: &mut Vec<u8>) {
            for pin in 0..IOAPIC_PINS {
                if self.level[pin] && self.line[pin] && !self.masked[pin] && !self.remote[pin] {
                    self.remote[pin] = true;
                    out.push(pin as u8);
                }
            }
        }
    }

    #[derive(Debug, Clone)]
    enum ModelOp {
        Line(usize, bool),
        Mask(usize, bool),
        Eoi(u8),
    }

    fn model_op() -> impl Strategy<Value = ModelOp> {
        prop_oneof![
            6 => (1usize..IOAPIC_PINS, any::<bool>()).prop_map(|(p, h)| ModelOp::Line(p, h)),
            2 => (1usize..IOAPIC_PINS, any::<bool>()).prop_map(|(p, m)| ModelOp::Mask(p, m)),
            2 => (0x40u8..0x44).prop_map(ModelOp::Eoi),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any accesses, lines and EOIs: no panic, every message names a pin
        /// whose entry it was built from, no delivery-status bit, no Remote
        /// IRR on an edge entry, and a snapshot restores an equal device
        /// that goes on exactly like the original.
        #[test]
        fn arbitrary_ops_never_panic(ops in prop::collection::vec(op(), 0..200), split in 0usize..200) {
            let mut io = IoApic::new();
            let mut copy: Option<IoApic> = None;
            for (i, op) in ops.iter().enumerate() {
                if i == split {
                    let restored = IoApic::from_state(&io.state());
                    prop_assert!(restored.is_ok(), "{:?}", restored.err());
                    copy = restored.ok();
                }
                let msgs = apply(&mut io, op);
                if let Some(c) = copy.as_mut() {
                    prop_assert_eq!(&apply(c, op), &msgs);
                }
                for m in &msgs {
                    prop_assert!(usize::from(m.pin) < IOAPIC_PINS && m.pin != 0);
                    let entry = io.state().redirection[usize::from(m.pin)];
                    prop_assert_eq!(m.vector, entry as u8);
                    prop_assert_eq!(m.level, entry & TRIGGER_LEVEL != 0);
                    if m.level {
                        prop_assert!(entry & REMOTE_IRR != 0);
                    }
                }
                for entry in io.state().redirection {
                    prop_assert_eq!(entry & DELIVERY_STATUS, 0);
                    prop_assert!(entry & TRIGGER_LEVEL != 0 || entry & REMOTE_IRR == 0);
                }
            }
            let s = io.state();
            let restored = IoApic::from_state(&s);
            prop_assert!(restored.is_ok());
            prop_assert_eq!(restored.map(|r| r.state()).ok(), Some(s.clone()));
            if let Some(c) = copy {
                prop_assert_eq!(c.state(), s);
            }
        }

        /// With a fixed trigger mode per pin and random lines, masks and
        /// EOIs, exactly the deliveries of the model come out, in order.
        #[test]
        fn deliveries_match_the_model(
            level in prop::collection::vec(any::<bool>(), IOAPIC_PINS),
            masked in prop::collection::vec(any::<bool>(), IOAPIC_PINS),
            ops in prop::collection::vec(model_op(), 0..200)
        ) {
            let mut io = IoApic::new();
            let mut m = Model::default();
            for pin in 1..IOAPIC_PINS {
                m.level[pin] = level[pin];
                m.masked[pin] = masked[pin];
                // Level pins share four vectors so one EOI can end several.
                m.vector[pin] = if level[pin] { 0x40 + (pin % 4) as u8 } else { 0x80 + pin as u8 };
                prop_assert!(program(&mut io, pin as u8, m.entry(pin)).is_empty());
            }
            let mut edges = [0usize; IOAPIC_PINS];
            let mut delivered = [0usize; IOAPIC_PINS];
            for op in ops {
                let mut want = Vec::new();
                let got = match op {
                    ModelOp::Line(pin, high) => {
                        if !m.level[pin] && high && !m.line[pin] && !m.masked[pin] {
                            want.push(pin as u8);
                            edges[pin] += 1;
                        }
                        m.line[pin] = high;
                        if m.level[pin] {
                            m.service(&mut want);
                        }
                        io.set_level(pin as u8, high)
                    }
                    ModelOp::Mask(pin, masked) => {
                        m.masked[pin] = masked;
                        m.service(&mut want);
                        reg_write(&mut io, REG_REDTBL + 2 * pin as u8, m.entry(pin) as u32)
                    }
                    ModelOp::Eoi(vector) => {
                        for pin in 0..IOAPIC_PINS {
                            if m.level[pin] && m.vector[pin] == vector && m.remote[pin] {
                                m.remote[pin] = false;
                                m.service(&mut want);
                            }
                        }
                        io.eoi(vector)
                    }
                };
                for msg in &got {
                    delivered[usize::from(msg.pin)] += 1;
                    prop_assert_eq!(msg.vector, m.vector[usize::from(msg.pin)]);
                }
                prop_assert_eq!(pins(&got), want);
            }
            // Edge pins: one delivery per rising edge while unmasked.
            for pin in (1..IOAPIC_PINS).filter(|&p| !m.level[p]) {
                prop_assert_eq!(delivered[pin], edges[pin], "pin {}", pin);
            }
        }
    }
}
