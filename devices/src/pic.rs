//! The 8259A programmable interrupt controller pair of the PC: a master at
//! ports 0x20-0x21, a slave at 0xA0-0xA1 cascaded on the master's IR2, and
//! the edge/level control registers (ELCR) at 0x4D0-0x4D1. It behaves like a
//! real 8259A as QEMU's model does: ICW1-4, OCW1-3, edge and level triggered
//! inputs, specific and non-specific EOI, rotation, auto-EOI, special mask
//! and special fully nested mode, poll mode and spurious IRQ7/IRQ15.
//!
//! One deliberate simplification: the master samples the slave's INT output
//! on IR2 as a level, so a slave request can never be lost between the two
//! chips (a real master latches an edge there, which loses requests when the
//! slave runs in auto-EOI mode with several pending).

use crate::bus::{BusDevice, BusEvent};
use crate::io::InterruptSink;
use std::sync::Mutex;

/// Command port of the master; its data port follows.
pub const MASTER_PORT: u64 = 0x20;
/// Command port of the slave; its data port follows.
pub const SLAVE_PORT: u64 = 0xA0;
/// ELCR of the master; the slave's follows.
pub const ELCR_PORT: u64 = 0x4D0;

/// The master input the slave is wired to.
const CASCADE_IRQ: u8 = 2;
/// IRQ 0, 1 and 2 are always edge triggered on a PC.
const MASTER_ELCR_MASK: u8 = 0xf8;
/// IRQ 8 and 13 are always edge triggered on a PC.
const SLAVE_ELCR_MASK: u8 = 0xde;

/// Where a chip is in its initialization sequence: which ICW the next write
/// to the data port is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum InitStep {
    /// Initialized: data port writes are OCW1 (the mask).
    #[default]
    Ready,
    /// Expecting ICW2 (vector base).
    Icw2,
    /// Expecting ICW3 (cascade wiring).
    Icw3,
    /// Expecting ICW4 (mode).
    Icw4,
}

/// The state of one 8259A.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChipState {
    /// The level of each IR input as last driven.
    pub lines: u8,
    /// Requests latched by a rising edge on an edge-triggered input and not
    /// yet acknowledged. Level-triggered inputs request while high instead.
    pub edge_irr: u8,
    /// Interrupt mask register (OCW1).
    pub imr: u8,
    /// In-service register.
    pub isr: u8,
    /// The input with the highest priority; rotation moves it (0..=7).
    pub priority_add: u8,
    /// Vector of IR0 (ICW2, a multiple of 8).
    pub vector_base: u8,
    /// OCW3: reads of the command port return the ISR rather than the IRR.
    pub read_isr: bool,
    /// OCW3: the next read is a poll.
    pub poll: bool,
    /// OCW3: special mask mode.
    pub special_mask: bool,
    /// Progress of the initialization sequence.
    pub init_step: InitStep,
    /// ICW1: an ICW4 follows.
    pub expect_icw4: bool,
    /// ICW1: single chip, no ICW3 and no cascade.
    pub single: bool,
    /// ICW1: every input is level triggered.
    pub ltim: bool,
    /// ICW4: automatic EOI at the acknowledge.
    pub auto_eoi: bool,
    /// OCW2: rotate priorities on automatic EOI.
    pub rotate_on_auto_eoi: bool,
    /// ICW4: special fully nested mode.
    pub special_fully_nested: bool,
    /// Edge/level control register: a set bit makes that input level triggered.
    pub elcr: u8,
}

/// The snapshot state of the pair.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PicState {
    /// IRQ 0-7.
    pub master: ChipState,
    /// IRQ 8-15.
    pub slave: ChipState,
}

impl ChipState {
    /// Inputs that request while high rather than on an edge. The master's
    /// cascade input is one of them (see the file comment).
    fn level_mask(&self, is_master: bool) -> u8 {
        if self.ltim {
            return 0xff;
        }
        let cascade = if is_master && !self.single { 1 << CASCADE_IRQ } else { 0 };
        self.elcr | cascade
    }

    /// The interrupt request register as the guest sees it.
    fn irr(&self, is_master: bool) -> u8 {
        let level = self.level_mask(is_master);
        (self.edge_irr & !level) | (self.lines & level)
    }

    fn bit(irq: u8) -> u8 {
        1 << (irq & 7)
    }

    fn rotated(&self, priority: u8) -> u8 {
        (priority + (self.priority_add & 7)) & 7
    }

    /// The priority (0 highest, 8 for none) of the best input in `mask`.
    fn priority(&self, mask: u8) -> u8 {
        (0..8).find(|&p| mask & Self::bit(self.rotated(p)) != 0).unwrap_or(8)
    }

    /// The input this chip would present to its INT output now, if any.
    fn pending(&self, is_master: bool) -> Option<u8> {
        let priority = self.priority(self.irr(is_master) & !self.imr);
        if priority == 8 {
            return None;
        }
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if is_master && self.special_fully_nested {
            in_service &= !Self::bit(CASCADE_IRQ);
        }
        (priority < self.priority(in_service)).then(|| self.rotated(priority))
    }

    fn vector(&self, irq: u8) -> u8 {
        (self.vector_base & 0xf8) | (irq & 7)
    }

    fn set_line(&mut self, irq: u8, high: bool, is_master: bool) {
        let bit = Self::bit(irq);
        if high && self.lines & bit == 0 && self.level_mask(is_master) & bit == 0 {
            self.edge_irr |= bit;
        }
        if high {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
    }

    /// The acknowledge of `irq`: in service (or automatic EOI), request
    /// consumed. A level-triggered input keeps requesting while high.
    fn intack(&mut self, irq: u8) {
        let bit = Self::bit(irq);
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
        self.edge_irr &= !bit;
    }

    fn write_elcr(&mut self, value: u8, mask: u8) {
        self.elcr = value & mask;
        // An input that becomes level triggered forgets its latched edge.
        self.edge_irr &= !self.elcr;
    }

    fn write_command(&mut self, value: u8) {
        if value & 0x10 != 0 {
            // ICW1 resets the chip except for the input levels and the
            // ELCR; latched edges are forgotten, masks cleared.
            *self = ChipState {
                lines: self.lines,
                elcr: self.elcr,
                init_step: InitStep::Icw2,
                expect_icw4: value & 0x01 != 0,
                single: value & 0x02 != 0,
                ltim: value & 0x08 != 0,
                ..ChipState::default()
            };
        } else if value & 0x08 != 0 {
            // OCW3.
            if value & 0x04 != 0 {
                self.poll = true;
            }
            if value & 0x02 != 0 {
                self.read_isr = value & 0x01 != 0;
            }
            if value & 0x40 != 0 {
                self.special_mask = value & 0x20 != 0;
            }
        } else {
            // OCW2.
            let level = value & 7;
            match value >> 5 {
                0 => self.rotate_on_auto_eoi = false,
                4 => self.rotate_on_auto_eoi = true,
                cmd @ (1 | 5) => {
                    let priority = self.priority(self.isr);
                    if priority < 8 {
                        let irq = self.rotated(priority);
                        self.isr &= !Self::bit(irq);
                        if cmd == 5 {
                            self.priority_add = (irq + 1) & 7;
                        }
                    }
                }
                3 => self.isr &= !Self::bit(level),
                6 => self.priority_add = (level + 1) & 7,
                7 => {
                    self.isr &= !Self::bit(level);
                    self.priority_add = (level + 1) & 7;
                }
                _ => {} // 2: no operation.
            }
        }
    }

    fn write_data(&mut self, value: u8) {
        self.init_step = match self.init_step {
            InitStep::Ready => {
                self.imr = value;
                InitStep::Ready
            }
            InitStep::Icw2 => {
                self.vector_base = value & 0xf8;
                match (self.single, self.expect_icw4) {
                    (false, _) => InitStep::Icw3,
                    (true, true) => InitStep::Icw4,
                    (true, false) => InitStep::Ready,
                }
            }
            // The wiring is fixed on a PC: ICW3 is accepted and ignored.
            InitStep::Icw3 if self.expect_icw4 => InitStep::Icw4,
            InitStep::Icw3 => InitStep::Ready,
            InitStep::Icw4 => {
                self.special_fully_nested = value & 0x10 != 0;
                self.auto_eoi = value & 0x02 != 0;
                InitStep::Ready
            }
        };
    }

    fn read(&mut self, data_port: bool, is_master: bool) -> u8 {
        if self.poll {
            self.poll = false;
            return match self.pending(is_master) {
                Some(irq) => {
                    self.intack(irq);
                    0x80 | irq
                }
                None => 0,
            };
        }
        if data_port {
            self.imr
        } else if self.read_isr {
            self.isr
        } else {
            self.irr(is_master)
        }
    }
}

/// The master/slave 8259A pair of a PC.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pic {
    state: PicState,
}

impl Pic {
    /// A pair in its power-on state (uninitialized, nothing masked, vector
    /// base 0); the guest is expected to initialize it.
    pub fn new() -> Self {
        Self::default()
    }

    /// The snapshot state.
    pub fn state(&self) -> PicState {
        self.state.clone()
    }

    /// A pair restored from `state`. Any values are accepted.
    pub fn from_state(state: &PicState) -> Self {
        let mut pic = Self { state: state.clone() };
        pic.sync_cascade();
        pic
    }

    /// Drives input `irq` (0..=15). IRQ 2 is the cascade and anything above
    /// 15 does not exist: both are ignored.
    pub fn set_irq(&mut self, irq: u8, high: bool) {
        match irq {
            CASCADE_IRQ => return,
            0..=7 => self.state.master.set_line(irq, high, true),
            8..=15 => self.state.slave.set_line(irq - 8, high, false),
            _ => return,
        }
        self.sync_cascade();
    }

    /// The INTR line to the CPU.
    pub fn has_interrupt(&self) -> bool {
        self.state.master.pending(true).is_some()
    }

    /// The INTA cycle: returns the vector of the best pending interrupt and
    /// marks it in service (or ends it at once in auto-EOI mode). With
    /// nothing pending it returns the spurious IRQ7 vector of the master (or
    /// IRQ15 of the slave when the slave has nothing) and changes nothing.
    pub fn acknowledge(&mut self) -> u8 {
        let master_single = self.state.master.single;
        let PicState { master, slave } = &mut self.state;
        let vector = match master.pending(true) {
            Some(CASCADE_IRQ) if !master_single => {
                let vector = match slave.pending(false) {
                    Some(irq) => {
                        slave.intack(irq);
                        slave.vector(irq)
                    }
                    None => slave.vector(7),
                };
                master.intack(CASCADE_IRQ);
                vector
            }
            Some(irq) => {
                master.intack(irq);
                master.vector(irq)
            }
            None => master.vector(7),
        };
        self.sync_cascade();
        vector
    }

    /// Copies the slave's INT output onto the master's IR2.
    fn sync_cascade(&mut self) {
        let out = !self.state.master.single && self.state.slave.pending(false).is_some();
        let bit = ChipState::bit(CASCADE_IRQ);
        if out {
            self.state.master.lines |= bit;
        } else {
            self.state.master.lines &= !bit;
        }
    }

    fn read_port(&mut self, port: u64) -> u8 {
        let value = match port {
            p if p == MASTER_PORT || p == MASTER_PORT + 1 => self.state.master.read(p == MASTER_PORT + 1, true),
            p if p == SLAVE_PORT || p == SLAVE_PORT + 1 => self.state.slave.read(p == SLAVE_PORT + 1, false),
            p if p == ELCR_PORT => self.state.master.elcr,
            p if p == ELCR_PORT + 1 => self.state.slave.elcr,
            _ => 0xff,
        };
        self.sync_cascade();
        value
    }

    fn write_port(&mut self, port: u64, value: u8) {
        let PicState { master, slave } = &mut self.state;
        match port {
            MASTER_PORT => master.write_command(value),
            p if p == MASTER_PORT + 1 => master.write_data(value),
            SLAVE_PORT => slave.write_command(value),
            p if p == SLAVE_PORT + 1 => slave.write_data(value),
            ELCR_PORT => master.write_elcr(value, MASTER_ELCR_MASK),
            p if p == ELCR_PORT + 1 => slave.write_elcr(value, SLAVE_ELCR_MASK),
            _ => {}
        }
        self.sync_cascade();
    }
}

/// An access wider than a byte is split into byte accesses at consecutive
/// ports, as the ISA bus does with an 8-bit device.
impl BusDevice for Pic {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let port = base.wrapping_add(offset);
        for (i, byte) in (0u64..).zip(data.iter_mut()) {
            *byte = self.read_port(port.wrapping_add(i));
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<BusEvent> {
        let port = base.wrapping_add(offset);
        for (i, &byte) in (0u64..).zip(data.iter()) {
            self.write_port(port.wrapping_add(i), byte);
        }
        None
    }
}

/// Lets devices hold an `Arc<dyn InterruptSink>` that is the PIC.
impl InterruptSink for Mutex<Pic> {
    fn set_level(&self, irq: u8, high: bool) {
        self.lock().unwrap_or_else(|e| e.into_inner()).set_irq(irq, high);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn out(pic: &mut Pic, port: u64, value: u8) {
        pic.write(port, 0, &[value]);
    }

    fn inb(pic: &mut Pic, port: u64) -> u8 {
        let mut b = [0u8; 1];
        pic.read(port, 0, &mut b);
        b[0]
    }

    /// The sequence of Linux's `init_8259A` (vectors 0x30/0x38).
    fn linux_init(pic: &mut Pic, auto_eoi: bool) {
        out(pic, 0x21, 0xff);
        out(pic, 0xa1, 0xff);
        out(pic, 0x20, 0x11);
        out(pic, 0x21, 0x30);
        out(pic, 0x21, 0x04);
        out(pic, 0x21, if auto_eoi { 0x03 } else { 0x01 });
        out(pic, 0xa0, 0x11);
        out(pic, 0xa1, 0x38);
        out(pic, 0xa1, 0x02);
        out(pic, 0xa1, 0x01);
        out(pic, 0x21, 0xfb);
        out(pic, 0xa1, 0xff);
    }

    /// The usual hobby-kernel remap to 0x20/0x28, everything unmasked.
    fn hobby_init(pic: &mut Pic) {
        for (port, v) in [
            (0x20, 0x11),
            (0xa0, 0x11),
            (0x21, 0x20),
            (0xa1, 0x28),
            (0x21, 0x04),
            (0xa1, 0x02),
            (0x21, 0x01),
            (0xa1, 0x01),
            (0x21, 0x00),
            (0xa1, 0x00),
        ] {
            out(pic, port, v);
        }
    }

    fn eoi_master(pic: &mut Pic) {
        out(pic, 0x20, 0x20);
    }

    fn read_isr(pic: &mut Pic, port: u64) -> u8 {
        out(pic, port, 0x0b);
        let v = inb(pic, port);
        out(pic, port, 0x0a);
        v
    }

    #[test]
    fn linux_init_sequence_sets_vectors_and_masks() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        let s = pic.state();
        assert_eq!(s.master.vector_base, 0x30);
        assert_eq!(s.slave.vector_base, 0x38);
        assert_eq!(s.master.init_step, InitStep::Ready);
        assert_eq!(s.slave.init_step, InitStep::Ready);
        assert_eq!(inb(&mut pic, 0x21), 0xfb);
        assert_eq!(inb(&mut pic, 0xa1), 0xff);
        // Linux's probe: what is written to the mask reads back.
        out(&mut pic, 0x21, 0xff);
        assert_eq!(inb(&mut pic, 0x21), 0xff);
        out(&mut pic, 0x21, 0xfa);
        pic.set_irq(0, true);
        assert!(pic.has_interrupt());
        assert_eq!(pic.acknowledge(), 0x30);
        assert_eq!(read_isr(&mut pic, 0x20), 0x01);
        // Linux acknowledges with a specific EOI.
        out(&mut pic, 0x20, 0x60);
        assert_eq!(read_isr(&mut pic, 0x20), 0);
    }

    #[test]
    fn hobby_kernel_remap_and_keyboard_interrupt() {
        let mut pic = Pic::new();
        hobby_init(&mut pic);
        assert!(!pic.has_interrupt());
        pic.set_irq(1, true);
        assert!(pic.has_interrupt());
        assert_eq!(inb(&mut pic, 0x20), 0x02, "IRR shows IRQ1");
        assert_eq!(pic.acknowledge(), 0x21);
        assert!(!pic.has_interrupt());
        assert_eq!(inb(&mut pic, 0x20), 0x00, "edge request consumed");
        eoi_master(&mut pic);
        // The line is still high: no new edge, no new interrupt.
        pic.set_irq(1, true);
        assert!(!pic.has_interrupt());
        pic.set_irq(1, false);
        pic.set_irq(1, true);
        assert_eq!(pic.acknowledge(), 0x21);
    }

    #[test]
    fn masked_interrupts_wait_in_irr() {
        let mut pic = Pic::new();
        hobby_init(&mut pic);
        out(&mut pic, 0x21, 0x01);
        pic.set_irq(0, true);
        pic.set_irq(0, false);
        assert!(!pic.has_interrupt());
        out(&mut pic, 0x21, 0x00);
        assert!(pic.has_interrupt());
        assert_eq!(pic.acknowledge(), 0x20);
    }

    #[test]
    fn priority_and_nesting() {
        let mut pic = Pic::new();
        hobby_init(&mut pic);
        pic.set_irq(3, true);
        pic.set_irq(1, true);
        assert_eq!(pic.acknowledge(), 0x21);
        // IRQ3 has lower priority than IRQ1 in service.
        assert!(!pic.has_interrupt());
        // IRQ0 has higher priority and nests.
        pic.set_irq(0, true);
        assert_eq!(pic.acknowledge(), 0x20);
        assert_eq!(read_isr(&mut pic, 0x20), 0x03);
        eoi_master(&mut pic); // ends IRQ0
        assert!(!pic.has_interrupt());
        eoi_master(&mut pic); // ends IRQ1
        assert_eq!(pic.acknowledge(), 0x23);
    }

    #[test]
    fn cascade_delivers_slave_vectors() {
        let mut pic = Pic::new();
        hobby_init(&mut pic);
        pic.set_irq(12, true);
        assert!(pic.has_interrupt());
        assert_eq!(inb(&mut pic, 0x20) & 0x04, 0x04, "master sees IR2");
        assert_eq!(pic.acknowledge(), 0x2c);
        assert_eq!(read_isr(&mut pic, 0xa0), 0x10);
        assert_eq!(read_isr(&mut pic, 0x20), 0x04);
        // Another slave request waits for both EOIs.
        pic.set_irq(14, true);
        assert!(!pic.has_interrupt());
        out(&mut pic, 0xa0, 0x20);
        assert!(!pic.has_interrupt(), "master still has IR2 in service");
        eoi_master(&mut pic);
        assert_eq!(pic.acknowledge(), 0x2e);
        // Masking IR2 on the master hides the whole slave.
        out(&mut pic, 0xa0, 0x20);
        eoi_master(&mut pic);
        out(&mut pic, 0x21, 0x04);
        pic.set_irq(9, true);
        assert!(!pic.has_interrupt());
        out(&mut pic, 0x21, 0x00);
        assert_eq!(pic.acknowledge(), 0x29);
    }

    #[test]
    fn special_fully_nested_lets_better_slave_requests_through() {
        let mut pic = Pic::new();
        hobby_init(&mut pic);
        out(&mut pic, 0x20, 0x11);
        out(&mut pic, 0x21, 0x20);
        out(&mut pic, 0x21, 0x04);
        out(&mut pic, 0x21, 0x11); // SFNM
        pic.set_irq(12, true);
        assert_eq!(pic.acknowledge(), 0x2c);
        pic.set_irq(8, true);
        assert!(pic.has_interrupt());
        assert_eq!(pic.acknowledge(), 0x28);
    }

    #[test]
    fn level_triggered_lines_request_while_high() {
        let mut pic = Pic::new();
        hobby_init(&mut pic);
        out(&mut pic, 0x4d1, 0x04); // IRQ10 level
        assert_eq!(inb(&mut pic, 0x4d1), 0x04);
        pic.set_irq(10, true);
        assert_eq!(pic.acknowledge(), 0x2a);
        out(&mut pic, 0xa0, 0x20);
        eoi_master(&mut pic);
        assert!(pic.has_interrupt(), "still high: requests again");
        assert_eq!(pic.acknowledge(), 0x2a);
        out(&mut pic, 0xa0, 0x20);
        eoi_master(&mut pic);
        pic.set_irq(10, false);
        assert!(!pic.has_interrupt());
        // The ELCR masks the fixed edge inputs.
        out(&mut pic, 0x4d0, 0xff);
        out(&mut pic, 0x4d1, 0xff);
        assert_eq!(inb(&mut pic, 0x4d0), 0xf8);
        assert_eq!(inb(&mut pic, 0x4d1), 0xde);
        // A 16-bit access covers both registers.
        let mut w = [0u8; 2];
        pic.read(ELCR_PORT, 0, &mut w);
        assert_eq!(w, [0xf8, 0xde]);
    }

    #[test]
    fn request_withdrawn_before_inta_is_spurious() {
        let mut pic = Pic::new();
        hobby_init(&mut pic);
        out(&mut pic, 0x4d0, 0x20); // IRQ5 level
        pic.set_irq(5, true);
        assert!(pic.has_interrupt());
        pic.set_irq(5, false);
        let before = pic.state();
        assert_eq!(pic.acknowledge(), 0x27);
        assert_eq!(pic.state(), before, "a spurious INTA changes nothing");
        assert_eq!(read_isr(&mut pic, 0x20), 0);
    }

    #[test]
    fn auto_eoi_leaves_isr_clear() {
        let mut pic = Pic::new();
        linux_init(&mut pic, true);
        out(&mut pic, 0x21, 0x00);
        out(&mut pic, 0xa1, 0x00);
        pic.set_irq(1, true);
        pic.set_irq(4, true);
        assert_eq!(pic.acknowledge(), 0x31);
        assert_eq!(read_isr(&mut pic, 0x20), 0);
        assert_eq!(pic.acknowledge(), 0x34);
        assert!(!pic.has_interrupt());
    }

    #[test]
    fn poll_mode_acknowledges_on_read() {
        let mut pic = Pic::new();
        hobby_init(&mut pic);
        out(&mut pic, 0x20, 0x0c);
        assert_eq!(inb(&mut pic, 0x20), 0x00, "nothing pending");
        pic.set_irq(6, true);
        out(&mut pic, 0x20, 0x0c);
        assert_eq!(inb(&mut pic, 0x20), 0x86);
        assert_eq!(read_isr(&mut pic, 0x20), 0x40);
        // The poll is one read only.
        assert_eq!(inb(&mut pic, 0x20), 0x00, "IRR read again");
        // A slave request polls as IR2 on the master, then on the slave.
        eoi_master(&mut pic);
        pic.set_irq(11, true);
        out(&mut pic, 0x20, 0x0c);
        assert_eq!(inb(&mut pic, 0x20), 0x82);
        out(&mut pic, 0xa0, 0x0c);
        assert_eq!(inb(&mut pic, 0xa0), 0x83);
    }

    #[test]
    fn rotation_moves_lowest_priority() {
        let mut pic = Pic::new();
        hobby_init(&mut pic);
        // Set priority: IRQ4 lowest, so IRQ5 is highest.
        out(&mut pic, 0x20, 0xc4);
        pic.set_irq(3, true);
        pic.set_irq(6, true);
        assert_eq!(pic.acknowledge(), 0x26);
        // Rotate on non-specific EOI: IRQ6 becomes lowest, IRQ7 highest.
        out(&mut pic, 0x20, 0xa0);
        assert_eq!(pic.state().master.priority_add, 7);
        pic.set_irq(6, false);
        pic.set_irq(6, true);
        assert_eq!(pic.acknowledge(), 0x23);
    }

    #[test]
    fn special_mask_mode_allows_lower_priorities() {
        let mut pic = Pic::new();
        hobby_init(&mut pic);
        pic.set_irq(1, true);
        assert_eq!(pic.acknowledge(), 0x21);
        pic.set_irq(5, true);
        assert!(!pic.has_interrupt());
        out(&mut pic, 0x21, 0x02); // mask the level in service
        out(&mut pic, 0x20, 0x68); // set special mask
        assert!(pic.has_interrupt());
        assert_eq!(pic.acknowledge(), 0x25);
        out(&mut pic, 0x20, 0x48); // reset special mask
        assert!(!pic.state().master.special_mask);
    }

    #[test]
    fn reinit_forgets_latched_edges_but_not_levels() {
        let mut pic = Pic::new();
        hobby_init(&mut pic);
        pic.set_irq(3, true);
        out(&mut pic, 0x4d0, 0x10);
        pic.set_irq(4, true);
        hobby_init(&mut pic);
        assert_eq!(inb(&mut pic, 0x20), 0x10);
        assert_eq!(pic.acknowledge(), 0x24);
    }

    #[test]
    fn interrupt_sink_drives_the_pic() {
        let pic = Arc::new(Mutex::new(Pic::new()));
        hobby_init(&mut pic.lock().unwrap());
        let sink: Arc<dyn InterruptSink> = pic.clone();
        sink.pulse(4);
        sink.set_level(200, true);
        sink.set_level(2, true);
        let mut p = pic.lock().unwrap();
        assert_eq!(p.acknowledge(), 0x24);
        assert!(!p.has_interrupt());
    }

    #[test]
    fn state_round_trip() {
        let mut pic = Pic::new();
        hobby_init(&mut pic);
        pic.set_irq(9, true);
        let copy = Pic::from_state(&pic.state());
        assert_eq!(copy, pic);
        assert_eq!(Pic::from_state(&pic.state()).acknowledge(), 0x29);
    }

    /// One step of the model-checked sequences.
    #[derive(Debug, Clone)]
    enum Op {
        Irq(u8, bool),
        Ack,
        Poll(bool),
        Init {
            slave: bool,
            base: u8,
            auto_eoi: bool,
            sfnm: bool,
            ltim: bool,
        },
        Mask(bool, u8),
        Ocw2(bool, u8),
        Ocw3(bool, u8),
        Elcr(bool, u8),
        Read(bool, bool),
    }

    const MASTER_BASES: [u8; 4] = [0x08, 0x20, 0x40, 0x60];
    const SLAVE_BASES: [u8; 4] = [0x28, 0x48, 0x70, 0x78];

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..16, any::<bool>()).prop_map(|(l, h)| Op::Irq(l, h)),
            4 => Just(Op::Ack),
            1 => any::<bool>().prop_map(Op::Poll),
            1 => (any::<bool>(), 0usize..4, any::<bool>(), any::<bool>(), prop::bool::weighted(0.2)).prop_map(
                |(slave, b, auto_eoi, sfnm, ltim)| Op::Init {
                    slave,
                    base: if slave { SLAVE_BASES[b] } else { MASTER_BASES[b] },
                    auto_eoi,
                    sfnm,
                    ltim,
                }
            ),
            2 => (any::<bool>(), any::<u8>()).prop_map(|(s, m)| Op::Mask(s, m)),
            3 => (any::<bool>(), any::<u8>()).prop_map(|(s, v)| Op::Ocw2(s, v & 0xe7)),
            1 => (any::<bool>(), any::<u8>()).prop_map(|(s, v)| Op::Ocw3(s, (v & 0x63) | 0x08)),
            1 => (any::<bool>(), any::<u8>()).prop_map(|(s, v)| Op::Elcr(s, v)),
            1 => (any::<bool>(), any::<bool>()).prop_map(|(s, d)| Op::Read(s, d)),
        ]
    }

    /// What should be pending: an edge input from its rising edge until it
    /// is delivered (or its chip is reinitialized); a level input while high.
    #[derive(Debug, Default)]
    struct Model {
        lines: [bool; 16],
        pending: [bool; 16],
        level: [bool; 16],
        elcr: [u8; 2],
        ltim: [bool; 2],
        base: [u8; 2],
    }

    impl Model {
        fn is_level(&self, line: usize) -> bool {
            let chip = line / 8;
            self.ltim[chip] || self.elcr[chip] & (1 << (line % 8)) != 0
        }

        fn refresh_levels(&mut self) {
            for line in 0..16 {
                let was = self.level[line];
                self.level[line] = self.is_level(line);
                if was != self.level[line] {
                    self.pending[line] = false;
                }
            }
        }

        /// Checks a delivery of `line` and consumes it.
        fn deliver(&mut self, line: usize) -> Result<(), TestCaseError> {
            prop_assert!(line % 8 != 2 || line >= 8, "cascade input delivered as itself");
            if self.level[line] {
                prop_assert!(self.lines[line], "level line {} delivered while low", line);
            } else {
                prop_assert!(self.pending[line], "edge line {} delivered without a request", line);
                self.pending[line] = false;
            }
            Ok(())
        }

        fn line_of(&self, vector: u8) -> Option<usize> {
            if vector & 0xf8 == self.base[0] {
                Some(usize::from(vector & 7))
            } else if vector & 0xf8 == self.base[1] {
                Some(8 + usize::from(vector & 7))
            } else {
                None
            }
        }
    }

    fn init(pic: &mut Pic, slave: bool, base: u8, auto_eoi: bool, sfnm: bool, ltim: bool) {
        let port = if slave { 0xa0 } else { 0x20 };
        out(pic, port, 0x11 | if ltim { 0x08 } else { 0 });
        out(pic, port + 1, base);
        out(pic, port + 1, if slave { 0x02 } else { 0x04 });
        out(
            pic,
            port + 1,
            0x01 | if auto_eoi { 0x02 } else { 0 } | if sfnm { 0x10 } else { 0 },
        );
    }

    fn run_ops(ops: Vec<Op>) -> Result<(), TestCaseError> {
        let mut pic = Pic::new();
        let mut m = Model::default();
        init(&mut pic, false, 0x20, false, false, false);
        init(&mut pic, true, 0x28, false, false, false);
        m.base = [0x20, 0x28];
        for op in ops {
            match op {
                Op::Irq(line, high) => {
                    pic.set_irq(line, high);
                    let l = usize::from(line);
                    if l != 2 {
                        if high && !m.lines[l] && !m.level[l] {
                            m.pending[l] = true;
                        }
                        m.lines[l] = high;
                    }
                }
                Op::Ack => {
                    if pic.has_interrupt() {
                        let v = pic.acknowledge();
                        let line = m.line_of(v);
                        prop_assert!(line.is_some(), "vector {:#x} of no line", v);
                        if let Some(line) = line {
                            m.deliver(line)?;
                        }
                    } else {
                        let before = pic.state();
                        prop_assert_eq!(pic.acknowledge(), m.base[0] | 7);
                        prop_assert_eq!(pic.state(), before);
                    }
                }
                Op::Poll(slave) => {
                    let port = if slave { 0xa0 } else { 0x20 };
                    out(&mut pic, port, 0x0c);
                    let v = inb(&mut pic, port);
                    if v & 0x80 != 0 {
                        prop_assert_eq!(v & 0x78, 0);
                        let line = usize::from(v & 7) + if slave { 8 } else { 0 };
                        if line != 2 {
                            m.deliver(line)?;
                        }
                    } else {
                        prop_assert_eq!(v, 0);
                    }
                }
                Op::Init {
                    slave,
                    base,
                    auto_eoi,
                    sfnm,
                    ltim,
                } => {
                    init(&mut pic, slave, base, auto_eoi, sfnm, ltim);
                    let chip = usize::from(slave);
                    m.base[chip] = base;
                    m.ltim[chip] = ltim;
                    for line in chip * 8..chip * 8 + 8 {
                        m.pending[line] = false;
                    }
                    m.refresh_levels();
                }
                Op::Mask(slave, v) => out(&mut pic, if slave { 0xa1 } else { 0x21 }, v),
                Op::Ocw2(slave, v) => out(&mut pic, if slave { 0xa0 } else { 0x20 }, v),
                Op::Ocw3(slave, v) => out(&mut pic, if slave { 0xa0 } else { 0x20 }, v),
                Op::Elcr(slave, v) => {
                    out(&mut pic, ELCR_PORT + u64::from(slave), v);
                    let mask = if slave { SLAVE_ELCR_MASK } else { MASTER_ELCR_MASK };
                    m.elcr[usize::from(slave)] = v & mask;
                    m.refresh_levels();
                }
                Op::Read(slave, data) => {
                    let port = if slave { 0xa0 } else { 0x20 } + u64::from(data);
                    inb(&mut pic, port);
                }
            }
        }
        // Drain: nothing masked or in service, then every request comes out.
        for port in [0x20, 0xa0] {
            out(&mut pic, port + 1, 0x00);
            out(&mut pic, port, 0x48);
            for level in 0..8 {
                out(&mut pic, port, 0x60 | level);
            }
        }
        let mut delivered_levels = [false; 16];
        for _ in 0..64 {
            if !pic.has_interrupt() {
                break;
            }
            let v = pic.acknowledge();
            let line = m.line_of(v);
            prop_assert!(line.is_some(), "vector {:#x} of no line", v);
            let Some(line) = line else { break };
            m.deliver(line)?;
            if m.level[line] {
                delivered_levels[line] = true;
                pic.set_irq(line as u8, false);
                m.lines[line] = false;
            }
            if line >= 8 {
                out(&mut pic, 0xa0, 0x60 | (line as u8 & 7));
                out(&mut pic, 0x20, 0x62);
            } else {
                out(&mut pic, 0x20, 0x60 | line as u8);
            }
        }
        prop_assert!(!pic.has_interrupt());
        for (line, delivered) in delivered_levels.iter().enumerate() {
            prop_assert!(!m.pending[line], "edge request on line {} lost", line);
            prop_assert!(
                !(m.level[line] && m.lines[line]) || *delivered,
                "level line {} high but never delivered",
                line
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// No interrupt is lost and none is delivered twice.
        #[test]
        fn never_loses_nor_duplicates(ops in prop::collection::vec(op(), 0..80)) {
            run_ops(ops)?;
        }

        /// Any bytes at any of the ports, any lines, any INTA: no panic, and
        /// the INTR line agrees with what an INTA finds.
        #[test]
        fn arbitrary_accesses_never_panic(
            steps in prop::collection::vec((0u8..4, 0u64..8, any::<u8>(), 0usize..3), 0..200)
        ) {
            let ports = [0x20u64, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x22, 0x3ff];
            let mut pic = Pic::new();
            for (kind, p, v, size) in steps {
                let port = ports[p as usize];
                let len = [1usize, 2, 4][size];
                match kind {
                    0 => { pic.write(port, 0, &vec![v; len]); }
                    1 => { let mut d = vec![0u8; len]; pic.read(port, 0, &mut d); }
                    2 => pic.set_irq(v, v & 0x80 != 0),
                    _ => {
                        let had = pic.has_interrupt();
                        let before = pic.state();
                        pic.acknowledge();
                        if !had { prop_assert_eq!(pic.state(), before); }
                    }
                }
            }
            let restored = Pic::from_state(&pic.state());
            prop_assert_eq!(restored.has_interrupt(), pic.has_interrupt());
        }
    }
}
