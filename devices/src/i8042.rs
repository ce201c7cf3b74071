//! The i8042 keyboard controller (data port 0x60, status/command port 0x64)
//! as far as machines without a keyboard need it, after QEMU's
//! `hw/input/pckbd.c`: the command byte, self and interface tests, the output
//! port (A20 and the reset line), keyboard/mouse enable bits, and the reset
//! pulse that reboots the machine. No keyboard or mouse is attached: bytes
//! sent to them are dropped and nothing answers, so the output buffer only
//! fills with controller replies. A reply raises IRQ 1 (IRQ 12 for the
//! auxiliary buffer) when the command byte enables it, as QEMU does.
//!
//! Port 0x92 (the "fast A20" system control port A) is the small [`Port92`].

use std::sync::Arc;

use crate::bus::{BusDevice, BusEvent};
use crate::io::InterruptSink;

/// The data port.
pub const DATA_PORT: u64 = 0x60;
/// The status (read) and command (write) port.
pub const COMMAND_PORT: u64 = 0x64;
/// The keyboard interrupt line.
pub const KBD_IRQ: u8 = 1;
/// The auxiliary (mouse) interrupt line.
pub const AUX_IRQ: u8 = 12;

const STAT_OBF: u8 = 0x01;
const STAT_SELFTEST: u8 = 0x04;
const STAT_CMD: u8 = 0x08;
const STAT_UNLOCKED: u8 = 0x10;
const STAT_AUX_OBF: u8 = 0x20;

const MODE_KBD_INT: u8 = 0x01;
const MODE_AUX_INT: u8 = 0x02;
const MODE_DISABLE_KBD: u8 = 0x10;
const MODE_DISABLE_AUX: u8 = 0x20;

const OUT_RESET: u8 = 0x01;
const OUT_A20: u8 = 0x02;
const OUT_OBF: u8 = 0x10;
const OUT_AUX_OBF: u8 = 0x20;
const OUT_ONES: u8 = 0xCC;

const CMD_READ_MODE: u8 = 0x20;
const CMD_WRITE_MODE: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xA7;
const CMD_AUX_ENABLE: u8 = 0xA8;
const CMD_AUX_TEST: u8 = 0xA9;
const CMD_SELF_TEST: u8 = 0xAA;
const CMD_KBD_TEST: u8 = 0xAB;
const CMD_KBD_DISABLE: u8 = 0xAD;
const CMD_KBD_ENABLE: u8 = 0xAE;
const CMD_READ_INPORT: u8 = 0xC0;
const CMD_READ_OUTPORT: u8 = 0xD0;
const CMD_WRITE_OUTPORT: u8 = 0xD1;
const CMD_WRITE_OBUF: u8 = 0xD2;
const CMD_WRITE_AUX_OBUF: u8 = 0xD3;
const CMD_WRITE_AUX: u8 = 0xD4;
const CMD_DISABLE_A20: u8 = 0xDD;
const CMD_ENABLE_A20: u8 = 0xDF;
const CMD_PULSE: u8 = 0xF0;

/// Everything a snapshot of the controller needs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    /// The command byte ("mode").
    pub mode: u8,
    /// The status register.
    pub status: u8,
    /// The output port (bit 0: not in reset, bit 1: A20).
    pub outport: u8,
    /// A command waiting for its data byte on port 0x60, or 0.
    pub write_cmd: u8,
    /// The byte the data port shows.
    pub ob_data: u8,
    /// A controller reply not yet read, and whether it is for the aux port.
    pub pending: Option<(u8, bool)>,
}

impl Default for I8042State {
    /// The state after reset, as QEMU's `kbd_reset`.
    fn default() -> Self {
        Self {
            mode: MODE_KBD_INT | MODE_AUX_INT,
            status: STAT_CMD | STAT_UNLOCKED,
            outport: OUT_RESET | OUT_A20 | OUT_ONES,
            write_cmd: 0,
            ob_data: 0,
            pending: None,
        }
    }
}

/// The keyboard controller.
pub struct I8042 {
    state: I8042State,
    irq: Arc<dyn InterruptSink>,
    kbd_line: bool,
    aux_line: bool,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl I8042 {
    /// A controller in its reset state driving IRQ 1 and 12 of `irq`.
    pub fn new(irq: Arc<dyn InterruptSink>) -> Self {
        Self {
            state: I8042State::default(),
            irq,
            kbd_line: false,
            aux_line: false,
        }
    }

    /// A controller restored from a snapshot; the lines are assumed to be
    /// at the levels the state implies.
    pub fn from_state(state: &I8042State, irq: Arc<dyn InterruptSink>) -> Self {
        let mut c = Self::new(irq);
        c.state = state.clone();
        (c.kbd_line, c.aux_line) = c.levels();
        c
    }

    /// The snapshot of this controller.
    pub fn state(&self) -> I8042State {
        self.state.clone()
    }

    /// Puts the controller back into its reset state.
    pub fn reset(&mut self) {
        self.state = I8042State::default();
        self.update_irq();
    }

    /// Whether the output port enables the A20 line.
    pub fn a20(&self) -> bool {
        self.state.outport & OUT_A20 != 0
    }

    fn levels(&self) -> (bool, bool) {
        let s = &self.state;
        let full = s.status & STAT_OBF != 0;
        let aux = s.status & STAT_AUX_OBF != 0;
        (
            full && !aux && s.mode & MODE_KBD_INT != 0 && s.mode & MODE_DISABLE_KBD == 0,
            full && aux && s.mode & MODE_AUX_INT != 0,
        )
    }

    fn update_lines(&mut self) {
        let (kbd, aux) = self.levels();
        if kbd != self.kbd_line {
            self.kbd_line = kbd;
            self.irq.set_level(KBD_IRQ, kbd);
        }
        if aux != self.aux_line {
            self.aux_line = aux;
            self.irq.set_level(AUX_IRQ, aux);
        }
    }

    /// Recomputes the output-buffer-full bits from the pending reply.
    fn update_irq(&mut self) {
        let s = &mut self.state;
        s.status &= !(STAT_OBF | STAT_AUX_OBF);
        s.outport &= !(OUT_OBF | OUT_AUX_OBF);
        if let Some((_, aux)) = s.pending {
            s.status |= STAT_OBF;
            s.outport |= OUT_OBF;
            if aux {
                s.status |= STAT_AUX_OBF;
                s.outport |= OUT_AUX_OBF;
            }
        }
        self.update_lines();
    }

    fn queue(&mut self, b: u8, aux: bool) {
        self.state.pending = Some((b, aux));
        self.update_irq();
    }

    fn read_data(&mut self) -> u8 {
        if self.state.status & STAT_OBF != 0 {
            if let Some((b, _)) = self.state.pending.take() {
                self.state.ob_data = b;
            }
            self.update_irq();
        }
        self.state.ob_data
    }

    fn write_outport(&mut self, v: u8) -> Option<BusEvent> {
        self.state.outport = v;
        (v & OUT_RESET == 0).then_some(BusEvent::Reset)
    }

    fn write_command(&mut self, v: u8) -> Option<BusEvent> {
        // Pulsing output port bits 3-0 low: only bit 0 (reset) does anything.
        if v & CMD_PULSE == CMD_PULSE {
            return (v & 1 == 0).then_some(BusEvent::Reset);
        }
        match v {
            CMD_READ_MODE => self.queue(self.state.mode, false),
            CMD_WRITE_MODE | CMD_WRITE_OBUF | CMD_WRITE_AUX_OBUF | CMD_WRITE_AUX | CMD_WRITE_OUTPORT => {
                self.state.write_cmd = v
            }
            CMD_AUX_DISABLE => self.state.mode |= MODE_DISABLE_AUX,
            CMD_AUX_ENABLE => {
                self.state.mode &= !MODE_DISABLE_AUX;
                self.update_lines();
            }
            CMD_AUX_TEST | CMD_KBD_TEST => self.queue(0x00, false),
            CMD_SELF_TEST => {
                self.state.status |= STAT_SELFTEST;
                self.queue(0x55, false);
            }
            CMD_KBD_DISABLE => {
                self.state.mode |= MODE_DISABLE_KBD;
                self.update_lines();
            }
            CMD_KBD_ENABLE => {
                self.state.mode &= !MODE_DISABLE_KBD;
                self.update_lines();
            }
            CMD_READ_INPORT => self.queue(0x80, false),
            CMD_READ_OUTPORT => self.queue(self.state.outport, false),
            CMD_ENABLE_A20 => self.state.outport |= OUT_A20,
            CMD_DISABLE_A20 => self.state.outport &= !OUT_A20,
            _ => tracing::debug!("i8042: unsupported command {v:#04x} ignored"),
        }
        None
    }

    fn write_data(&mut self, v: u8) -> Option<BusEvent> {
        let cmd = std::mem::take(&mut self.state.write_cmd);
        match cmd {
            CMD_WRITE_MODE => {
                self.state.mode = v;
                self.update_lines();
            }
            CMD_WRITE_OBUF => self.queue(v, false),
            CMD_WRITE_AUX_OBUF => self.queue(v, true),
            CMD_WRITE_OUTPORT => return self.write_outport(v),
            // No mouse: the byte is lost, but the interface is enabled again.
            CMD_WRITE_AUX => self.state.mode &= !MODE_DISABLE_AUX,
            // No keyboard: likewise.
            _ => {
                self.state.mode &= !MODE_DISABLE_KBD;
                self.update_lines();
            }
        }
        None
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let Some((first, rest)) = data.split_first_mut() else {
            return;
        };
        rest.fill(0xFF);
        *first = match base.wrapping_add(offset) {
            DATA_PORT => self.read_data(),
            COMMAND_PORT => self.state.status,
            _ => 0xFF,
        };
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<BusEvent> {
        let &v = data.first()?;
        match base.wrapping_add(offset) {
            DATA_PORT => self.write_data(v),
            COMMAND_PORT => self.write_command(v),
            _ => None,
        }
    }
}

/// Everything a snapshot of port 0x92 needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Port92State {
    /// The register (bit 0: fast reset, bit 1: A20).
    pub value: u8,
}

/// System control port A at 0x92, after QEMU's `hw/i386/port92.c`: bit 1
/// gates A20, a rising edge of bit 0 resets the machine.
#[derive(Debug, Default)]
pub struct Port92 {
    state: Port92State,
}

impl Port92 {
    /// The port in its reset state.
    pub fn new() -> Self {
        Self::default()
    }

    /// The port restored from a snapshot.
    pub fn from_state(state: &Port92State) -> Self {
        Self { state: *state }
    }

    /// The snapshot of this port.
    pub fn state(&self) -> Port92State {
        self.state
    }

    /// The machine reset clears the reset bit, as QEMU does.
    pub fn reset(&mut self) {
        self.state.value &= !1;
    }
}

impl BusDevice for Port92 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = if offset == 0 && i == 0 { self.state.value } else { 0xFF };
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) -> Option<BusEvent> {
        if offset != 0 {
            return None;
        }
        let &v = data.first()?;
        let old = self.state.value;
        self.state.value = v;
        (v & 1 != 0 && old & 1 == 0).then_some(BusEvent::Reset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::RecordingSink;
    use proptest::prelude::*;

    fn kbc() -> (I8042, Arc<RecordingSink>) {
        let sink = Arc::new(RecordingSink::default());
        (I8042::new(sink.clone()), sink)
    }

    fn status(c: &mut I8042) -> u8 {
        let mut b = [0u8];
        c.read(COMMAND_PORT, 0, &mut b);
        b[0]
    }

    fn data(c: &mut I8042) -> u8 {
        let mut b = [0u8];
        c.read(DATA_PORT, 0, &mut b);
        b[0]
    }

    fn cmd(c: &mut I8042, v: u8) -> Option<BusEvent> {
        c.write(COMMAND_PORT, 0, &[v])
    }

    #[test]
    fn status_is_empty_without_a_keyboard() {
        let (mut c, sink) = kbc();
        assert_eq!(status(&mut c), STAT_CMD | STAT_UNLOCKED);
        // Bytes for the absent keyboard get no answer.
        assert_eq!(c.write(DATA_PORT, 0, &[0xFF]), None);
        assert_eq!(status(&mut c) & STAT_OBF, 0);
        assert!(sink.changes().is_empty());
    }

    #[test]
    fn self_test_and_command_byte() {
        let (mut c, sink) = kbc();
        assert_eq!(cmd(&mut c, CMD_SELF_TEST), None);
        assert_eq!(status(&mut c), STAT_CMD | STAT_UNLOCKED | STAT_SELFTEST | STAT_OBF);
        assert_eq!(sink.changes(), vec![(KBD_IRQ, true)]);
        assert_eq!(data(&mut c), 0x55);
        assert_eq!(status(&mut c) & STAT_OBF, 0);
        assert_eq!(sink.changes().last(), Some(&(KBD_IRQ, false)));
        assert_eq!(data(&mut c), 0x55, "an empty buffer shows the last byte");
        cmd(&mut c, CMD_WRITE_MODE);
        c.write(DATA_PORT, 0, &[0x44]);
        cmd(&mut c, CMD_READ_MODE);
        assert_eq!(data(&mut c), 0x44);
        assert_eq!(sink.rising_edges(KBD_IRQ), 1, "KBD_INT is off in 0x44");
    }

    #[test]
    fn keyboard_disable_and_enable_gate_irq1() {
        let (mut c, sink) = kbc();
        cmd(&mut c, CMD_KBD_DISABLE);
        assert_eq!(c.state().mode & MODE_DISABLE_KBD, MODE_DISABLE_KBD);
        cmd(&mut c, CMD_KBD_TEST);
        assert_eq!(status(&mut c) & STAT_OBF, STAT_OBF);
        assert!(sink.changes().is_empty());
        cmd(&mut c, CMD_KBD_ENABLE);
        assert_eq!(sink.changes(), vec![(KBD_IRQ, true)]);
        assert_eq!(data(&mut c), 0x00);
    }

    #[test]
    fn aux_buffer_raises_irq12() {
        let (mut c, sink) = kbc();
        cmd(&mut c, CMD_WRITE_AUX_OBUF);
        c.write(DATA_PORT, 0, &[0x9A]);
        assert_eq!(status(&mut c) & (STAT_OBF | STAT_AUX_OBF), STAT_OBF | STAT_AUX_OBF);
        assert_eq!(sink.changes(), vec![(AUX_IRQ, true)]);
        assert_eq!(data(&mut c), 0x9A);
        assert_eq!(sink.changes().last(), Some(&(AUX_IRQ, false)));
    }

    #[test]
    fn output_port_a20_and_reset() {
        let (mut c, _) = kbc();
        cmd(&mut c, CMD_READ_OUTPORT);
        // The port is sampled before the reply fills the buffer.
        assert_eq!(data(&mut c), OUT_RESET | OUT_A20 | OUT_ONES);
        assert_eq!(c.state().outport & OUT_OBF, 0);
        cmd(&mut c, CMD_DISABLE_A20);
        assert!(!c.a20());
        cmd(&mut c, CMD_ENABLE_A20);
        assert!(c.a20());
        cmd(&mut c, CMD_WRITE_OUTPORT);
        assert_eq!(c.write(DATA_PORT, 0, &[0xDD]), None);
        assert!(!c.a20());
        cmd(&mut c, CMD_WRITE_OUTPORT);
        assert_eq!(c.write(DATA_PORT, 0, &[0xDE]), Some(BusEvent::Reset));
        assert_eq!(cmd(&mut c, 0xFE), Some(BusEvent::Reset));
        assert_eq!(cmd(&mut c, 0xF0), Some(BusEvent::Reset));
        assert_eq!(cmd(&mut c, 0xFF), None);
        let r = I8042::from_state(&c.state(), Arc::new(RecordingSink::default()));
        assert_eq!(r.state(), c.state());
    }

    #[test]
    fn port92_resets_on_rising_bit0() {
        let mut p = Port92::new();
        assert_eq!(p.write(0x92, 0, &[0x02]), None);
        assert_eq!(p.write(0x92, 0, &[0x03]), Some(BusEvent::Reset));
        assert_eq!(p.write(0x92, 0, &[0x03]), None, "no edge");
        let mut b = [0u8; 2];
        p.read(0x92, 0, &mut b);
        assert_eq!(b, [0x03, 0xFF]);
        p.reset();
        assert_eq!(Port92::from_state(&p.state()).state().value, 0x02);
        assert_eq!(p.write(0x92, 0, &[0x01]), Some(BusEvent::Reset));
    }

    proptest! {
        /// Any byte sequence on the two ports: no panic, and a reset is asked
        /// for exactly when a reference decoder of the reset paths says so.
        #[test]
        fn resets_match_a_reference(ops in prop::collection::vec((any::<bool>(), any::<u8>(), any::<bool>()), 0..200)) {
            let (mut c, _) = kbc();
            let mut waiting = 0u8;
            for (to_cmd, v, read) in ops {
                if read {
                    let mut b = [0u8; 2];
                    c.read(if to_cmd { COMMAND_PORT } else { DATA_PORT }, 0, &mut b);
                    prop_assert_eq!(b[1], 0xFF);
                    continue;
                }
                let want = if to_cmd {
                    let reset = v & 0xF0 == 0xF0 && v & 1 == 0;
                    if [0x60, 0xD1, 0xD2, 0xD3, 0xD4].contains(&v) { waiting = v; }
                    reset
                } else {
                    let reset = waiting == 0xD1 && v & 1 == 0;
                    waiting = 0;
                    reset
                };
                let port = if to_cmd { COMMAND_PORT } else { DATA_PORT };
                prop_assert_eq!(c.write(port, 0, &[v]), want.then_some(BusEvent::Reset));
            }
        }
    }
}
