//! The 16550A UART (COM1 on a PC: port 0x3F8, 8 registers, IRQ 4), modelled
//! on QEMU's `hw/char/serial.c` so that guest output and interrupt behaviour
//! match QEMU's.
//!
//! Transmission is immediate: a byte written to THR goes straight to the
//! output and THRE/TEMT are set again at once (no transmit FIFO is ever
//! observable). Reception goes through a 16-byte FIFO (or the single RBR when
//! the FIFO is off) that the machine fills with [`Serial::poll_input`] at its
//! exits. QEMU's character-timeout indication fires four character times after
//! the last FIFO activity; Nyx has no time in this device, so it fires at the
//! first `poll_input` that finds no new byte while the FIFO holds data. As in
//! QEMU, the IRQ line is not gated by MCR.OUT2, and in loopback mode (MCR bit
//! 4) transmitted bytes are received and outside input is not taken.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

use crate::bus::{BusDevice, BusEvent};
use crate::io::{Input, InterruptSink};

/// Number of registers the UART decodes.
pub const SERIAL_LEN: u64 = 8;
/// Depth of the receive FIFO.
pub const FIFO_LEN: usize = 16;

const IER_RDI: u8 = 0x01;
const IER_THRI: u8 = 0x02;
const IER_RLSI: u8 = 0x04;
const IER_MSI: u8 = 0x08;

const IIR_NO_INT: u8 = 0x01;
const IIR_MSI: u8 = 0x00;
const IIR_THRI: u8 = 0x02;
const IIR_RDI: u8 = 0x04;
const IIR_RLSI: u8 = 0x06;
const IIR_CTI: u8 = 0x0C;
const IIR_ID: u8 = 0x06;
const IIR_FE: u8 = 0xC0;

const FCR_FE: u8 = 0x01;
const FCR_RFR: u8 = 0x02;
const FCR_XFR: u8 = 0x04;

const LCR_DLAB: u8 = 0x80;

const MCR_LOOP: u8 = 0x10;

const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_BI: u8 = 0x10;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const LSR_INT_ANY: u8 = 0x1E;

const MSR_ANY_DELTA: u8 = 0x0F;
const MSR_DCD: u8 = 0x80;
const MSR_DSR: u8 = 0x20;
const MSR_CTS: u8 = 0x10;

/// Errors of restoring a UART from a snapshot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SerialError {
    /// The snapshot's receive FIFO holds more bytes than the hardware can.
    #[error("serial state holds {0} bytes in its receive FIFO; at most 16 fit")]
    FifoTooLong(usize),
}

/// Everything a snapshot of the UART needs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    /// Baud-rate divisor latch (DLL/DLM).
    pub divisor: u16,
    /// Receive buffer when the FIFO is off.
    pub rbr: u8,
    /// Interrupt enable register (low 4 bits).
    pub ier: u8,
    /// Interrupt identification register as last computed.
    pub iir: u8,
    /// Line control register.
    pub lcr: u8,
    /// Modem control register (low 5 bits).
    pub mcr: u8,
    /// Line status register.
    pub lsr: u8,
    /// Modem status register.
    pub msr: u8,
    /// Scratch register.
    pub scr: u8,
    /// FIFO control bits that stick (enable, DMA mode, trigger level).
    pub fcr: u8,
    /// Received bytes waiting for the guest (FIFO mode).
    pub rx_fifo: VecDeque<u8>,
    /// A THR-empty interrupt is pending (cleared by an IIR read that shows it).
    pub thr_ipending: bool,
    /// A character-timeout interrupt is pending.
    pub timeout_ipending: bool,
}

impl Default for SerialState {
    /// The state after reset, as QEMU's `serial_reset`: 9600 baud 8N1, OUT2 set.
    fn default() -> Self {
        Self {
            divisor: 0x0C,
            rbr: 0,
            ier: 0,
            iir: IIR_NO_INT,
            lcr: 0,
            mcr: 0x08,
            lsr: LSR_TEMT | LSR_THRE,
            msr: MSR_DCD | MSR_DSR | MSR_CTS,
            scr: 0,
            fcr: 0,
            rx_fifo: VecDeque::with_capacity(FIFO_LEN),
            thr_ipending: false,
            timeout_ipending: false,
        }
    }
}

impl SerialState {
    fn fifo_enabled(&self) -> bool {
        self.fcr & FCR_FE != 0
    }

    /// The receive FIFO's interrupt trigger level (FCR bits 6-7).
    pub fn trigger_level(&self) -> usize {
        match self.fcr >> 6 {
            0 => 1,
            1 => 4,
            2 => 8,
            _ => 14,
        }
    }

    /// The interrupt the UART signals now, as an IIR identification value
    /// (`0x01` for none), in the 16550A's priority order.
    pub fn pending_interrupt(&self) -> u8 {
        let rx_ready = self.lsr & LSR_DR != 0 && (!self.fifo_enabled() || self.rx_fifo.len() >= self.trigger_level());
        if self.ier & IER_RLSI != 0 && self.lsr & LSR_INT_ANY != 0 {
            IIR_RLSI
        } else if self.ier & IER_RDI != 0 && self.timeout_ipending {
            IIR_CTI
        } else if self.ier & IER_RDI != 0 && rx_ready {
            IIR_RDI
        } else if self.ier & IER_THRI != 0 && self.thr_ipending {
            IIR_THRI
        } else if self.ier & IER_MSI != 0 && self.msr & MSR_ANY_DELTA != 0 {
            IIR_MSI
        } else {
            IIR_NO_INT
        }
    }
}

/// A 16550A UART.
pub struct Serial {
    state: SerialState,
    irq: Arc<dyn InterruptSink>,
    irq_line: u8,
    line_high: bool,
    out: Box<dyn Write + Send>,
    input: Box<dyn Input>,
    write_errors: u64,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial")
            .field("state", &self.state)
            .field("irq_line", &self.irq_line)
            .field("write_errors", &self.write_errors)
            .finish_non_exhaustive()
    }
}

impl Serial {
    /// A UART in its reset state that drives `irq_line` of `irq`, writes what
    /// the guest transmits to `out` and receives from `input`.
    pub fn new(irq: Arc<dyn InterruptSink>, irq_line: u8, out: Box<dyn Write + Send>, input: Box<dyn Input>) -> Self {
        Self {
            state: SerialState::default(),
            irq,
            irq_line,
            line_high: false,
            out,
            input,
            write_errors: 0,
        }
    }

    /// A UART restored from a snapshot. The interrupt line is assumed to be
    /// at the level the state implies (the interrupt controller is restored
    /// with it), so nothing is signalled here.
    pub fn from_state(
        state: &SerialState,
        irq: Arc<dyn InterruptSink>,
        irq_line: u8,
        out: Box<dyn Write + Send>,
        input: Box<dyn Input>,
    ) -> Result<Self, SerialError> {
        if state.rx_fifo.len() > FIFO_LEN {
            return Err(SerialError::FifoTooLong(state.rx_fifo.len()));
        }
        let mut s = Self::new(irq, irq_line, out, input);
        s.state = state.clone();
        s.line_high = s.state.iir & 0x0F != IIR_NO_INT;
        Ok(s)
    }

    /// The snapshot of this UART.
    pub fn state(&self) -> SerialState {
        self.state.clone()
    }

    /// How many transmitted bytes could not be written to the output.
    pub fn write_errors(&self) -> u64 {
        self.write_errors
    }

    /// Whether no more input can ever arrive (the input source has ended).
    pub fn input_exhausted(&self) -> bool {
        self.input.is_exhausted()
    }

    /// Puts the UART back into its reset state and lowers its line.
    pub fn reset(&mut self) {
        self.state = SerialState::default();
        self.update_irq();
    }

    /// Moves the bytes that `input` has now into the receive buffer while
    /// there is room, updates the interrupt line and returns how many bytes
    /// were taken. In loopback mode nothing is taken.
    pub fn poll_input(&mut self) -> usize {
        let room = if self.state.mcr & MCR_LOOP != 0 {
            0
        } else if self.state.fifo_enabled() {
            FIFO_LEN.saturating_sub(self.state.rx_fifo.len())
        } else if self.state.lsr & LSR_DR == 0 {
            1
        } else {
            0
        };
        let mut buf = [0u8; FIFO_LEN];
        let taken = if room > 0 {
            self.input.read_available(&mut buf[..room]).min(room)
        } else {
            0
        };
        for &b in &buf[..taken] {
            self.receive(b);
        }
        if taken == 0 && self.state.fifo_enabled() && !self.state.rx_fifo.is_empty() {
            self.state.timeout_ipending = true;
        }
        self.update_irq();
        taken
    }

    /// One received byte, as QEMU's `serial_receive1`: an overrun keeps the
    /// old data and sets OE.
    fn receive(&mut self, b: u8) {
        let s = &mut self.state;
        if s.fifo_enabled() {
            if s.rx_fifo.len() < FIFO_LEN {
                s.rx_fifo.push_back(b);
            } else {
                s.lsr |= LSR_OE;
            }
        } else {
            if s.lsr & LSR_DR != 0 {
                s.lsr |= LSR_OE;
            }
            s.rbr = b;
        }
        s.lsr |= LSR_DR;
        self.update_irq();
    }

    fn update_irq(&mut self) {
        let id = self.state.pending_interrupt();
        self.state.iir = id | (self.state.iir & 0xF0);
        let high = id != IIR_NO_INT;
        if high != self.line_high {
            self.line_high = high;
            self.irq.set_level(self.irq_line, high);
        }
    }

    fn emit(&mut self, b: u8) {
        let r = self.out.write_all(&[b]).and_then(|()| self.out.flush());
        if let Err(e) = r {
            self.write_errors += 1;
            if self.write_errors == 1 {
                tracing::warn!("serial output failed, further output is dropped silently: {e}");
            }
        }
    }

    fn transmit(&mut self, b: u8) {
        self.state.thr_ipending = false;
        self.state.lsr &= !(LSR_THRE | LSR_TEMT);
        self.update_irq();
        self.state.lsr |= LSR_THRE;
        self.state.thr_ipending = true;
        self.update_irq();
        if self.state.mcr & MCR_LOOP != 0 {
            self.receive(b);
        } else {
            self.emit(b);
        }
        self.state.lsr |= LSR_TEMT;
    }

    fn read_rbr(&mut self) -> u8 {
        let s = &mut self.state;
        let v = if s.fifo_enabled() {
            let v = s.rx_fifo.pop_front().unwrap_or(0);
            if s.rx_fifo.is_empty() {
                s.lsr &= !(LSR_DR | LSR_BI);
            }
            s.timeout_ipending = false;
            v
        } else {
            s.lsr &= !(LSR_DR | LSR_BI);
            s.rbr
        };
        self.update_irq();
        v
    }

    fn read_reg(&mut self, reg: u64) -> u8 {
        let dlab = self.state.lcr & LCR_DLAB != 0;
        match reg {
            0 if dlab => self.state.divisor as u8,
            0 => self.read_rbr(),
            1 if dlab => (self.state.divisor >> 8) as u8,
            1 => self.state.ier,
            2 => {
                let v = self.state.iir;
                if v & IIR_ID == IIR_THRI {
                    self.state.thr_ipending = false;
                    self.update_irq();
                }
                v
            }
            3 => self.state.lcr,
            4 => self.state.mcr,
            5 => {
                let v = self.state.lsr;
                if v & (LSR_BI | LSR_OE) != 0 {
                    self.state.lsr &= !(LSR_BI | LSR_OE);
                    self.update_irq();
                }
                v
            }
            6 => {
                let mcr = self.state.mcr;
                if mcr & MCR_LOOP != 0 {
                    // The modem outputs are wired back to the inputs.
                    ((mcr & 0x0C) << 4) | ((mcr & 0x02) << 3) | ((mcr & 0x01) << 5)
                } else {
                    let v = self.state.msr;
                    if v & MSR_ANY_DELTA != 0 {
                        self.state.msr &= 0xF0;
                        self.update_irq();
                    }
                    v
                }
            }
            7 => self.state.scr,
            _ => 0xFF,
        }
    }

    fn write_reg(&mut self, reg: u64, v: u8) {
        let dlab = self.state.lcr & LCR_DLAB != 0;
        match reg {
            0 if dlab => self.state.divisor = (self.state.divisor & 0xFF00) | u16::from(v),
            0 => self.transmit(v),
            1 if dlab => {
                self.state.divisor = (self.state.divisor & 0x00FF) | (u16::from(v) << 8);
            }
            1 => {
                let new = v & 0x0F;
                let changed = (self.state.ier ^ new) & 0x0F;
                self.state.ier = new;
                // Enabling THRI while THR is empty raises the interrupt again,
                // even after an IIR read cleared it (Windows relies on it).
                if changed & IER_THRI != 0 {
                    self.state.thr_ipending = new & IER_THRI != 0 && self.state.lsr & LSR_THRE != 0;
                }
                if changed != 0 {
                    self.update_irq();
                }
            }
            2 => {
                let mut v = v;
                if (v ^ self.state.fcr) & FCR_FE != 0 {
                    v |= FCR_XFR | FCR_RFR;
                }
                if v & FCR_RFR != 0 {
                    self.state.lsr &= !(LSR_DR | LSR_BI);
                    self.state.timeout_ipending = false;
                    self.state.rx_fifo.clear();
                }
                if v & FCR_XFR != 0 {
                    self.state.lsr |= LSR_THRE;
                    self.state.thr_ipending = true;
                }
                self.state.fcr = v & 0xC9;
                if v & FCR_FE != 0 {
                    self.state.iir |= IIR_FE;
                } else {
                    self.state.iir &= !IIR_FE;
                }
                self.update_irq();
            }
            3 => self.state.lcr = v,
            4 => self.state.mcr = v & 0x1F,
            7 => self.state.scr = v,
            _ => {}
        }
    }
}

impl BusDevice for Serial {
    /// Wider accesses are split into byte accesses at consecutive registers,
    /// as QEMU does; bytes past the last register read all-ones.
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let reg = offset.saturating_add(i as u64);
            *d = if reg < SERIAL_LEN { self.read_reg(reg) } else { 0xFF };
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) -> Option<BusEvent> {
        for (i, &v) in data.iter().enumerate() {
            let reg = offset.saturating_add(i as u64);
            if reg < SERIAL_LEN {
                self.write_reg(reg, v);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{BufferInput, NoInput, RecordingSink};
    use proptest::prelude::*;
    use std::sync::Mutex;

    const IRQ: u8 = 4;

    #[derive(Clone, Default)]
    struct SharedOut(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedOut {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct BrokenOut;

    impl Write for BrokenOut {
        fn write(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "closed"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Input that hands out at most `per_call` bytes per call.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        per_call: usize,
    }

    impl Input for Trickle {
        fn read_available(&mut self, buf: &mut [u8]) -> usize {
            let n = buf.len().min(self.per_call).min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            n
        }
    }

    fn uart(input: Box<dyn Input>) -> (Serial, Arc<RecordingSink>, SharedOut) {
        let sink = Arc::new(RecordingSink::default());
        let out = SharedOut::default();
        let s = Serial::new(sink.clone(), IRQ, Box::new(out.clone()), input);
        (s, sink, out)
    }

    fn rd(s: &mut Serial, reg: u64) -> u8 {
        let mut b = [0u8];
        s.read(0x3f8, reg, &mut b);
        b[0]
    }

    fn wr(s: &mut Serial, reg: u64, v: u8) {
        assert_eq!(s.write(0x3f8, reg, &[v]), None);
    }

    fn level(sink: &RecordingSink) -> bool {
        sink.changes()
            .iter()
            .rev()
            .find(|(l, _)| *l == IRQ)
            .is_some_and(|&(_, h)| h)
    }

    #[test]
    fn reset_values_match_qemu() {
        let (mut s, sink, _) = uart(Box::new(NoInput));
        assert_eq!(rd(&mut s, 1), 0);
        assert_eq!(rd(&mut s, 2), 0x01);
        assert_eq!(rd(&mut s, 3), 0);
        assert_eq!(rd(&mut s, 4), 0x08);
        assert_eq!(rd(&mut s, 5), 0x60);
        assert_eq!(rd(&mut s, 6), 0xB0);
        assert!(sink.changes().is_empty());
    }

    #[test]
    fn divisor_latch_and_scratch() {
        let (mut s, _, out) = uart(Box::new(NoInput));
        wr(&mut s, 3, 0x83);
        wr(&mut s, 0, 0x01);
        wr(&mut s, 1, 0x02);
        assert_eq!(rd(&mut s, 0), 0x01);
        assert_eq!(rd(&mut s, 1), 0x02);
        wr(&mut s, 3, 0x03);
        assert_eq!(s.state().divisor, 0x0201);
        assert_eq!(rd(&mut s, 1), 0, "IER is visible again with DLAB clear");
        wr(&mut s, 7, 0x5A);
        assert_eq!(rd(&mut s, 7), 0x5A);
        assert!(out.0.lock().unwrap().is_empty(), "divisor writes are not output");
    }

    #[test]
    fn transmit_is_immediate_and_raises_thri() {
        let (mut s, sink, out) = uart(Box::new(NoInput));
        s.write(0x3f8, 0, b"h");
        wr(&mut s, 0, b'i');
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi");
        assert_eq!(rd(&mut s, 5) & 0x60, 0x60);
        assert!(!level(&sink), "THRI is masked");
        // Enabling THRI with THR empty raises the interrupt at once.
        wr(&mut s, 1, IER_THRI);
        assert!(level(&sink));
        assert_eq!(rd(&mut s, 2), IIR_THRI);
        // Reading IIR that shows THRI clears it.
        assert!(!level(&sink));
        assert_eq!(rd(&mut s, 2), IIR_NO_INT);
        // The next transmission raises it again with a new edge.
        wr(&mut s, 0, b'!');
        assert!(level(&sink));
        assert_eq!(sink.rising_edges(IRQ), 2);
        // Toggling IER re-arms it after an IIR read.
        assert_eq!(rd(&mut s, 2), IIR_THRI);
        wr(&mut s, 1, 0);
        wr(&mut s, 1, IER_THRI);
        assert_eq!(sink.rising_edges(IRQ), 3);
    }

    #[test]
    fn rx_without_fifo_overruns_only_inside_the_device() {
        let (mut s, sink, _) = uart(Box::new(BufferInput::new(b"ab".to_vec())));
        wr(&mut s, 1, IER_RDI | IER_RLSI);
        assert_eq!(s.poll_input(), 1, "one byte fits without a FIFO");
        assert!(level(&sink));
        assert_eq!(rd(&mut s, 2), IIR_RDI);
        assert_eq!(s.poll_input(), 0, "RBR is full");
        assert_eq!(rd(&mut s, 0), b'a');
        assert!(!level(&sink));
        assert_eq!(s.poll_input(), 1);
        assert_eq!(rd(&mut s, 5) & LSR_DR, LSR_DR);
        // Loopback receives the transmitted byte over the unread one: overrun.
        wr(&mut s, 4, MCR_LOOP);
        wr(&mut s, 0, b'z');
        assert_eq!(rd(&mut s, 2), IIR_RLSI);
        assert_eq!(rd(&mut s, 5) & (LSR_OE | LSR_DR), LSR_OE | LSR_DR);
        assert_eq!(rd(&mut s, 5) & LSR_OE, 0, "reading LSR clears OE");
        assert_eq!(rd(&mut s, 0), b'z');
    }

    #[test]
    fn fifo_trigger_level_and_timeout() {
        let (mut s, sink, _) = uart(Box::new(Trickle {
            data: b"0123456789".to_vec(),
            pos: 0,
            per_call: 3,
        }));
        wr(&mut s, 2, 0x81); // FIFO on, trigger 8
        assert_eq!(rd(&mut s, 2) & IIR_FE, IIR_FE);
        wr(&mut s, 1, IER_RDI);
        assert_eq!(s.poll_input(), 3);
        assert_eq!(s.poll_input(), 3);
        assert!(!level(&sink), "below the trigger level");
        assert_eq!(s.poll_input(), 3);
        assert!(level(&sink));
        assert_eq!(rd(&mut s, 2), IIR_FE | IIR_RDI);
        for c in b"0123456" {
            assert_eq!(rd(&mut s, 0), *c);
        }
        assert!(!level(&sink), "seven left is below eight");
        assert_eq!(s.poll_input(), 1);
        assert!(!level(&sink));
        // Nothing new arrives: the character timeout fires.
        assert_eq!(s.poll_input(), 0);
        assert_eq!(rd(&mut s, 2), IIR_FE | IIR_CTI);
        assert_eq!(rd(&mut s, 0), b'7');
        assert!(!level(&sink), "a read clears the timeout");
        assert_eq!(rd(&mut s, 0), b'8');
        assert_eq!(rd(&mut s, 0), b'9');
        assert_eq!(rd(&mut s, 5) & LSR_DR, 0);
        assert_eq!(rd(&mut s, 0), 0, "an empty FIFO reads 0");
    }

    #[test]
    fn fcr_resets_fifo() {
        let (mut s, _, _) = uart(Box::new(BufferInput::new(b"abc".to_vec())));
        wr(&mut s, 2, 0x01);
        assert_eq!(s.poll_input(), 3);
        wr(&mut s, 2, 0x03);
        assert!(s.state().rx_fifo.is_empty());
        assert_eq!(rd(&mut s, 5) & LSR_DR, 0);
        wr(&mut s, 2, 0x00);
        assert_eq!(rd(&mut s, 2), IIR_NO_INT, "FIFO-enabled bits go away");
    }

    #[test]
    fn loopback_msr_and_no_outside_input() {
        let (mut s, _, out) = uart(Box::new(BufferInput::new(b"x".to_vec())));
        wr(&mut s, 4, MCR_LOOP | 0x0F);
        assert_eq!(rd(&mut s, 6), 0xF0);
        wr(&mut s, 4, MCR_LOOP | 0x01);
        assert_eq!(rd(&mut s, 6), 0x20);
        assert_eq!(s.poll_input(), 0);
        wr(&mut s, 0, b'q');
        assert!(out.0.lock().unwrap().is_empty());
        assert_eq!(rd(&mut s, 0), b'q');
        wr(&mut s, 4, 0);
        assert_eq!(s.poll_input(), 1);
        assert_eq!(rd(&mut s, 0), b'x');
    }

    #[test]
    fn output_errors_are_counted_not_fatal() {
        let sink = Arc::new(RecordingSink::default());
        let mut s = Serial::new(sink, IRQ, Box::new(BrokenOut), Box::new(NoInput));
        wr(&mut s, 0, b'a');
        wr(&mut s, 0, b'b');
        assert_eq!(s.write_errors(), 2);
        assert_eq!(rd(&mut s, 5) & 0x60, 0x60);
    }

    #[test]
    fn wide_and_out_of_range_accesses() {
        let (mut s, _, out) = uart(Box::new(NoInput));
        // A word write at THR sends THR then writes IER.
        s.write(0x3f8, 0, &[b'A', IER_THRI]);
        assert_eq!(out.0.lock().unwrap().as_slice(), b"A");
        assert_eq!(s.state().ier, IER_THRI);
        let mut d = [0u8; 4];
        s.read(0x3f8, 6, &mut d);
        assert_eq!(d, [0xB0, 0, 0xFF, 0xFF]);
        assert_eq!(s.write(0x3f8, 9, &[1, 2, 3, 4]), None);
        s.read(0x3f8, u64::MAX, &mut d);
        assert_eq!(d, [0xFF; 4]);
    }

    #[test]
    fn state_round_trips() {
        let (mut s, _, _) = uart(Box::new(BufferInput::new(b"hello".to_vec())));
        wr(&mut s, 2, 0x01);
        wr(&mut s, 1, 0x0F);
        s.poll_input();
        let st = s.state();
        let sink = Arc::new(RecordingSink::default());
        let mut r = Serial::from_state(&st, sink.clone(), IRQ, Box::new(Vec::new()), Box::new(NoInput)).unwrap();
        assert_eq!(r.state(), st);
        assert!(sink.changes().is_empty());
        assert_eq!(rd(&mut r, 0), b'h');
        let mut bad = st;
        bad.rx_fifo = (0..17).collect();
        assert_eq!(
            Serial::from_state(&bad, sink, IRQ, Box::new(Vec::new()), Box::new(NoInput)).err(),
            Some(SerialError::FifoTooLong(17))
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Poll,
        ReadLsrThenData,
        ReadIir,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![Just(Op::Poll), Just(Op::ReadLsrThenData), Just(Op::ReadIir)]
    }

    proptest! {
        /// Whatever the interleaving of guest reads and input polls, and
        /// however the input trickles in, the guest sees each byte once, in order.
        #[test]
        fn every_byte_arrives_once_in_order(
            data in prop::collection::vec(any::<u8>(), 0..80),
            per_call in 1usize..20,
            fcr in prop::sample::select(vec![0x00u8, 0x01, 0x41, 0x81, 0xC1]),
            ier in 0u8..16,
            ops in prop::collection::vec(op(), 0..200),
        ) {
            let input = Trickle { data: data.clone(), pos: 0, per_call };
            let (mut s, _, _) = uart(Box::new(input));
            wr(&mut s, 2, fcr);
            wr(&mut s, 1, ier);
            let mut got = Vec::new();
            let guest_read = |s: &mut Serial, got: &mut Vec<u8>| {
                if rd(s, 5) & LSR_DR != 0 {
                    got.push(rd(s, 0));
                }
            };
            for o in ops {
                match o {
                    Op::Poll => { s.poll_input(); }
                    Op::ReadLsrThenData => guest_read(&mut s, &mut got),
                    Op::ReadIir => { rd(&mut s, 2); }
                }
                prop_assert_eq!(s.state().lsr & LSR_OE, 0);
            }
            for _ in 0..(data.len() + 2) * 2 {
                s.poll_input();
                guest_read(&mut s, &mut got);
            }
            prop_assert_eq!(got, data);
        }

        /// After any access sequence the line is high exactly when an enabled
        /// condition is pending, and IIR names the highest-priority one.
        #[test]
        fn line_follows_enabled_conditions(
            data in prop::collection::vec(any::<u8>(), 0..40),
            accesses in prop::collection::vec((0u64..9, any::<u8>(), any::<bool>(), 0u8..3), 0..150),
        ) {
            let (mut s, sink, _) = uart(Box::new(BufferInput::new(data)));
            for (reg, v, is_write, poll) in accesses {
                if poll == 0 {
                    s.poll_input();
                } else if is_write {
                    s.write(0x3f8, reg, &[v]);
                } else {
                    rd(&mut s, reg);
                }
                let st = s.state();
                let rx = st.lsr & LSR_DR != 0
                    && (st.fcr & FCR_FE == 0 || st.rx_fifo.len() >= st.trigger_level());
                let pending = (st.ier & IER_RLSI != 0 && st.lsr & LSR_INT_ANY != 0)
                    || (st.ier & IER_RDI != 0 && (st.timeout_ipending || rx))
                    || (st.ier & IER_THRI != 0 && st.thr_ipending)
                    || (st.ier & IER_MSI != 0 && st.msr & MSR_ANY_DELTA != 0);
                prop_assert_eq!(level(&sink), pending);
                prop_assert_eq!(st.iir & 0x01 == 0, pending);
                prop_assert!(st.rx_fifo.len() <= FIFO_LEN);
            }
        }
    }
}
