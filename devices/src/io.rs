//! The traits through which everything from outside reaches a device.
//!
//! Devices never read the host clock, a file, a socket or a random source
//! directly. The plain `run` mode passes host sources through these traits,
//! the recorder logs each value where it is consumed, the replayer serves the
//! log back, and unit tests use the fakes at the bottom of this file.

use std::sync::Mutex;

/// Virtual time in nanoseconds since the machine was created. Monotonic.
pub trait Clock: Send + Sync {
    /// The current virtual time.
    fn now_ns(&self) -> u64;
}

/// The date and time of day, read once when a device (the CMOS RTC) is created.
pub trait WallClock: Send + Sync {
    /// Seconds since the Unix epoch.
    fn unix_seconds(&self) -> i64;
}

/// Bytes arriving from outside (serial RX, console). Never blocks.
pub trait Input: Send {
    /// Copies up to `buf.len()` bytes that are available now into `buf` and
    /// returns how many. Returns 0 when nothing is available yet.
    fn read_available(&mut self, buf: &mut [u8]) -> usize;

    /// Whether no byte can ever arrive any more (end of file, no source).
    /// A device may then stop waiting for input.
    fn is_exhausted(&self) -> bool {
        false
    }
}

/// Random bytes (RDRAND emulation, virtio-rng).
pub trait Entropy: Send {
    /// Fills `buf` with random bytes.
    fn fill(&mut self, buf: &mut [u8]);
}

/// How a device drives an interrupt line of the interrupt controller.
pub trait InterruptSink: Send + Sync {
    /// Sets line `irq` (0..=15) high or low.
    fn set_level(&self, irq: u8, high: bool);

    /// A rising and a falling edge in one go (an edge-triggered pulse).
    fn pulse(&self, irq: u8) {
        self.set_level(irq, true);
        self.set_level(irq, false);
    }

    /// Sets global system interrupt `gsi` (an IOAPIC pin) high or low,
    /// bypassing the ISA IRQ mapping. A sink without an IOAPIC treats GSIs
    /// below 16 as ISA IRQs and ignores the rest.
    fn set_gsi(&self, gsi: u8, high: bool) {
        if gsi < 16 {
            self.set_level(gsi, high)
        }
    }
}

/// A clock that only moves when told to: for tests and for the deterministic
/// clock of regression runs.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: Mutex<u64>,
}

impl ManualClock {
    /// A clock at `ns`.
    pub fn new(ns: u64) -> Self {
        Self { now: Mutex::new(ns) }
    }

    /// Sets the time; it never goes backwards.
    pub fn set(&self, ns: u64) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now = (*now).max(ns);
    }

    /// Moves the time forward by `ns`.
    pub fn advance(&self, ns: u64) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now = now.saturating_add(ns);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A fixed date.
#[derive(Debug, Clone, Copy)]
pub struct FixedWallClock(pub i64);

impl WallClock for FixedWallClock {
    fn unix_seconds(&self) -> i64 {
        self.0
    }
}

/// Input that has nothing, ever.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoInput;

impl Input for NoInput {
    fn read_available(&mut self, _buf: &mut [u8]) -> usize {
        0
    }

    fn is_exhausted(&self) -> bool {
        true
    }
}

/// Input served from a byte buffer, all of it available at once.
#[derive(Debug, Default, Clone)]
pub struct BufferInput {
    data: Vec<u8>,
    pos: usize,
}

impl BufferInput {
    /// Input that yields `data`.
    pub fn new(data: Vec<u8>) -> Self {
        Self { data, pos: 0 }
    }
}

impl Input for BufferInput {
    fn read_available(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        n
    }

    fn is_exhausted(&self) -> bool {
        self.pos == self.data.len()
    }
}

/// An interrupt sink that remembers every level change, for tests.
#[derive(Debug, Default)]
pub struct RecordingSink {
    /// Every `(irq, level)` change of an ISA IRQ in order.
    pub changes: Mutex<Vec<(u8, bool)>>,
    /// Every `(gsi, level)` change made through `set_gsi` in order.
    pub gsi_changes: Mutex<Vec<(u8, bool)>>,
}

/// The number of low-to-high changes of `line` in `changes`.
fn count_rising(changes: &[(u8, bool)], line: u8) -> usize {
    let mut level = false;
    let mut edges = 0;
    for &(l, high) in changes {
        if l == line {
            if high && !level {
                edges += 1;
            }
            level = high;
        }
    }
    edges
}

impl RecordingSink {
    /// The ISA IRQ changes so far.
    pub fn changes(&self) -> Vec<(u8, bool)> {
        self.changes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The number of rising edges on ISA IRQ `irq` so far.
    pub fn rising_edges(&self, irq: u8) -> usize {
        count_rising(&self.changes(), irq)
    }

    /// The GSI changes so far.
    pub fn gsi_changes(&self) -> Vec<(u8, bool)> {
        self.gsi_changes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The number of rising edges on `gsi` (driven through `set_gsi`) so far.
    pub fn gsi_rising_edges(&self, gsi: u8) -> usize {
        count_rising(&self.gsi_changes(), gsi)
    }
}

impl InterruptSink for RecordingSink {
    fn set_level(&self, irq: u8, high: bool) {
        self.changes.lock().unwrap_or_else(|e| e.into_inner()).push((irq, high));
    }

    fn set_gsi(&self, gsi: u8, high: bool) {
        self.gsi_changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((gsi, high));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_never_goes_back() {
        let c = ManualClock::new(10);
        c.set(5);
        assert_eq!(c.now_ns(), 10);
        c.advance(7);
        assert_eq!(c.now_ns(), 17);
    }

    #[test]
    fn buffer_input_yields_everything_once() {
        let mut i = BufferInput::new(b"hello".to_vec());
        let mut buf = [0u8; 3];
        assert_eq!(i.read_available(&mut buf), 3);
        assert_eq!(&buf, b"hel");
        assert_eq!(i.read_available(&mut buf), 2);
        assert_eq!(&buf[..2], b"lo");
        assert_eq!(i.read_available(&mut buf), 0);
        assert!(i.is_exhausted());
        assert!(NoInput.is_exhausted());
    }

    #[test]
    fn recording_sink_counts_edges() {
        let s = RecordingSink::default();
        s.pulse(0);
        s.set_level(0, true);
        s.set_level(0, true);
        s.set_level(4, true);
        assert_eq!(s.rising_edges(0), 2);
        assert_eq!(s.rising_edges(4), 1);
        s.set_gsi(20, true);
        s.set_gsi(20, false);
        s.set_gsi(20, true);
        assert_eq!(s.gsi_rising_edges(20), 2);
        assert_eq!(s.rising_edges(20), 0, "GSIs are kept apart from ISA IRQs");
    }

    #[test]
    fn default_set_gsi_maps_low_gsis_to_isa_irqs() {
        struct Isa(Mutex<Vec<(u8, bool)>>);
        impl InterruptSink for Isa {
            fn set_level(&self, irq: u8, high: bool) {
                self.0.lock().unwrap().push((irq, high));
            }
        }
        let s = Isa(Mutex::new(Vec::new()));
        s.set_gsi(9, true);
        s.set_gsi(16, true);
        s.set_gsi(23, false);
        s.set_gsi(15, false);
        assert_eq!(*s.0.lock().unwrap(), vec![(9, true), (15, false)]);
    }
}
