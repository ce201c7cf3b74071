//! The 8254 programmable interval timer at ports 0x40-0x43 and the PC's
//! port 0x61 (channel 2 gate, speaker data, refresh toggle, OUT2), after
//! QEMU's `i8254.c` and `pcspk.c`.
//!
//! Counters are not ticked: each channel remembers when it started counting,
//! and its count and OUT level are computed from the virtual time of the
//! `Clock` in integer arithmetic (input clock 1 193 182 Hz), so the same
//! times give the same values on every run. Channel 0 raises IRQ0 through an
//! `InterruptSink` as a pulse when [`Pit::poll`] finds that OUT0 rose since
//! the previous poll; [`Pit::next_deadline_ns`] says when that happens next.

use crate::bus::{BusDevice, BusEvent};
use crate::io::{Clock, InterruptSink};
use std::sync::Arc;

/// The input clock of the counters.
pub const PIT_HZ: u64 = 1_193_182;
/// First port of the counters and the control word (len 4).
pub const PIT_PORT: u64 = 0x40;
/// The PC's system control port B (len 1).
pub const PORT_61: u64 = 0x61;

const NS_PER_S: u64 = 1_000_000_000;
/// The DRAM refresh request (bit 4 of port 0x61) toggles this often.
const REFRESH_TOGGLE_NS: u64 = 15_085;
const TIMER_IRQ: u8 = 0;

/// Which bytes of the count the guest reads and writes (control word bits 5-4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Access {
    /// Low byte only.
    Low,
    /// High byte only.
    High,
    /// Low byte, then high byte.
    #[default]
    LowHigh,
}

impl Access {
    fn from_bits(bits: u8) -> Option<Self> {
        match bits & 3 {
            1 => Some(Self::Low),
            2 => Some(Self::High),
            3 => Some(Self::LowHigh),
            _ => None,
        }
    }

    fn bits(self) -> u8 {
        match self {
            Self::Low => 1,
            Self::High => 2,
            Self::LowHigh => 3,
        }
    }

    /// The first byte of an access of this kind.
    fn first(self) -> Byte {
        match self {
            Self::Low => Byte::Low,
            Self::High => Byte::High,
            Self::LowHigh => Byte::WordLow,
        }
    }
}

/// The next byte a read or write of a count transfers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Byte {
    /// The low byte, and that is all.
    Low,
    /// The high byte, and that is all.
    High,
    /// The low byte of a low-then-high pair.
    #[default]
    WordLow,
    /// The high byte of a low-then-high pair.
    WordHigh,
}

/// One counter of the 8254.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChannelState {
    /// The count written, in input clocks (1..=0x10000; 0 was written as 0x10000,
    /// or 10000 in BCD).
    pub count: u32,
    /// Operating mode 0-5 (6 and 7 are stored as 2 and 3).
    pub mode: u8,
    /// Counting in BCD.
    pub bcd: bool,
    /// How the count is read and written.
    pub access: Access,
    /// The next byte a count read returns.
    pub read_state: Byte,
    /// The next byte a count write takes.
    pub write_state: Byte,
    /// The low byte of a count whose high byte has not come yet.
    pub write_latch: u8,
    /// A count latched by a latch or read-back command, and its next byte.
    pub latched_count: Option<(u16, Byte)>,
    /// A status byte latched by a read-back command.
    pub latched_status: Option<u8>,
    /// The GATE input.
    pub gate: bool,
    /// A count was written since the last control word.
    pub loaded: bool,
    /// The counter is counting (false while the gate stops it, before a
    /// count is written, and in modes 1 and 5 before the gate's trigger).
    pub running: bool,
    /// Virtual time the counting resumed at.
    pub load_ns: u64,
    /// Clocks counted before `load_ns` (the gate paused modes 0 and 4).
    pub base_ticks: u64,
    /// Virtual time the count was written (for the null-count status bit).
    pub written_ns: u64,
    /// Clocks counted (since the count started) when IRQ0 edges were last
    /// looked for.
    pub polled_ticks: u64,
}

/// The snapshot state of the PIT and port 0x61.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PitState {
    /// Channels 0, 1 and 2.
    pub channels: [ChannelState; 3],
    /// Port 0x61 bit 1: speaker data enable.
    pub speaker_data: bool,
    /// Port 0x61 bits 2-3 as written (parity and I/O check enables).
    pub port61_checks: u8,
}

impl PitState {
    /// The state a BIOS leaves: every channel in mode 3 counting 0x10000
    /// from `now_ns` (channel 0 gives IRQ0 at about 18.2 Hz), channel 2's
    /// gate low.
    pub fn power_on(now_ns: u64) -> Self {
        let channel = |gate: bool| ChannelState {
            count: 0x10000,
            mode: 3,
            gate,
            loaded: true,
            running: gate,
            load_ns: now_ns,
            written_ns: now_ns,
            ..ChannelState::default()
        };
        Self {
            channels: [channel(true), channel(true), channel(false)],
            speaker_data: false,
            port61_checks: 0,
        }
    }
}

impl Default for PitState {
    /// The power-on state at virtual time 0.
    fn default() -> Self {
        Self::power_on(0)
    }
}

fn ns_to_ticks(ns: u64) -> u64 {
    // Fits: 2^64 * PIT_HZ / 10^9 < 2^64.
    (u128::from(ns) * u128::from(PIT_HZ) / u128::from(NS_PER_S)) as u64
}

/// The first time at which `ns_to_ticks` reaches `ticks`.
fn ticks_to_ns_ceil(ticks: u64) -> u64 {
    let ns = (u128::from(ticks) * u128::from(NS_PER_S)).div_ceil(u128::from(PIT_HZ));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

fn bcd_to_bin(v: u16) -> u32 {
    (0..4)
        .rev()
        .fold(0, |acc, i| acc * 10 + u32::from((v >> (4 * i)) & 0xf))
}

fn bin_to_bcd(v: u64) -> u16 {
    let v = v % 10_000;
    (0..4).fold(0u16, |acc, i| acc | (((v / 10u64.pow(i)) % 10) as u16) << (4 * i))
}

impl ChannelState {
    /// The count modulus: where the counter wraps.
    fn modulus(&self) -> u64 {
        if self.bcd {
            10_000
        } else {
            0x10000
        }
    }

    /// The count in clocks, whatever the stored value.
    fn period(&self) -> u64 {
        u64::from(self.count).clamp(1, 0x10000)
    }

    /// Clocks counted since the count started.
    fn ticks(&self, now: u64) -> u64 {
        if self.running {
            self.base_ticks
                .saturating_add(ns_to_ticks(now.saturating_sub(self.load_ns)))
        } else {
            self.base_ticks
        }
    }

    /// The counting element, in binary.
    fn counter(&self, now: u64) -> u64 {
        let n = self.period();
        let d = self.ticks(now);
        match self.mode {
            2 => n - d % n,
            3 => n - (2 * (d % n)) % n,
            _ => {
                let m = self.modulus();
                (n % m + m - d % m) % m
            }
        }
    }

    /// The count as the guest reads it.
    fn read_value(&self, now: u64) -> u16 {
        let v = self.counter(now);
        if self.bcd {
            bin_to_bcd(v)
        } else {
            v as u16
        }
    }

    /// The OUT pin.
    fn out(&self, now: u64) -> bool {
        if !self.loaded {
            // After a control word: low in mode 0, high otherwise.
            return self.mode != 0;
        }
        let n = self.period();
        let d = self.ticks(now);
        match self.mode {
            0 => d >= n,
            1 => !self.running || d >= n,
            2 => !self.running || d % n != n - 1,
            3 => !self.running || d % n < n.div_ceil(2),
            4 => d != n,
            _ => !self.running || d != n,
        }
    }

    /// The first count (in clocks since the start) after `d` at which OUT
    /// rises, if it ever does.
    fn next_rise_after(&self, d: u64) -> Option<u64> {
        if !self.loaded || !self.running {
            return None;
        }
        let n = self.period();
        match self.mode {
            0 | 1 => (d < n).then_some(n),
            2 | 3 => Some((d / n).saturating_add(1).saturating_mul(n)),
            _ => (d <= n).then_some(n + 1),
        }
    }

    /// Null count: the count written has not reached the counting element
    /// yet (one input clock after the write; in modes 1 and 5 at the trigger).
    fn null_count(&self, now: u64) -> bool {
        match self.mode {
            _ if !self.loaded => true,
            1 | 5 => !self.running,
            _ => ns_to_ticks(now.saturating_sub(self.written_ns)) == 0,
        }
    }

    fn status(&self, now: u64) -> u8 {
        u8::from(self.out(now)) << 7
            | u8::from(self.null_count(now)) << 6
            | self.access.bits() << 4
            | (self.mode & 7) << 1
            | u8::from(self.bcd)
    }

    fn restart(&mut self, now: u64) {
        self.load_ns = now;
        self.base_ticks = 0;
        self.polled_ticks = 0;
        self.running = true;
    }

    fn load(&mut self, now: u64, raw: u16) {
        let n = if self.bcd { bcd_to_bin(raw) } else { u32::from(raw) };
        self.count = if n == 0 { self.modulus() as u32 } else { n };
        self.loaded = true;
        self.written_ns = now;
        self.restart(now);
        // Modes 1 and 5 wait for a rising edge of the gate; the others count
        // while the gate is high.
        self.running = !matches!(self.mode, 1 | 5) && self.gate;
    }

    fn latch_count(&mut self, now: u64) {
        if self.latched_count.is_none() {
            self.latched_count = Some((self.read_value(now), self.access.first()));
        }
    }

    fn write_control(&mut self, now: u64, value: u8) {
        let Some(access) = Access::from_bits(value >> 4) else {
            self.latch_count(now);
            return;
        };
        self.base_ticks = self.ticks(now);
        self.running = false;
        self.loaded = false;
        self.access = access;
        self.read_state = access.first();
        self.write_state = access.first();
        self.latched_count = None;
        self.latched_status = None;
        self.mode = match (value >> 1) & 7 {
            6 => 2,
            7 => 3,
            m => m,
        };
        self.bcd = value & 1 != 0;
    }

    fn write_count(&mut self, now: u64, value: u8) {
        match self.write_state {
            Byte::Low => self.load(now, u16::from(value)),
            Byte::High => self.load(now, u16::from(value) << 8),
            Byte::WordLow => {
                self.write_latch = value;
                self.write_state = Byte::WordHigh;
            }
            Byte::WordHigh => {
                self.load(now, u16::from(self.write_latch) | u16::from(value) << 8);
                self.write_state = Byte::WordLow;
            }
        }
    }

    fn read_count(&mut self, now: u64) -> u8 {
        if let Some(status) = self.latched_status.take() {
            return status;
        }
        let (value, byte) = match self.latched_count {
            Some((value, byte)) => {
                self.latched_count = match byte {
                    Byte::WordLow => Some((value, Byte::WordHigh)),
                    _ => None,
                };
                (value, byte)
            }
            None => {
                let byte = self.read_state;
                self.read_state = match byte {
                    Byte::WordLow => Byte::WordHigh,
                    Byte::WordHigh => Byte::WordLow,
                    other => other,
                };
                (self.read_value(now), byte)
            }
        };
        match byte {
            Byte::Low | Byte::WordLow => value as u8,
            Byte::High | Byte::WordHigh => (value >> 8) as u8,
        }
    }

    fn set_gate(&mut self, now: u64, high: bool) {
        let rising = high && !self.gate;
        let falling = !high && self.gate;
        if self.loaded {
            match self.mode {
                0 | 4 => {
                    if falling {
                        self.base_ticks = self.ticks(now);
                        self.running = false;
                    } else if rising {
                        self.load_ns = now;
                        self.running = true;
                    }
                }
                1 | 5 => {
                    if rising {
                        self.restart(now);
                    }
                }
                _ => {
                    if falling {
                        self.base_ticks = self.ticks(now);
                        self.running = false;
                    } else if rising {
                        self.restart(now);
                    }
                }
            }
        }
        self.gate = high;
    }
}

/// The 8254 PIT and port 0x61.
pub struct Pit {
    state: PitState,
    clock: Arc<dyn Clock>,
    irq: Arc<dyn InterruptSink>,
}

impl std::fmt::Debug for Pit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pit").field("state", &self.state).finish()
    }
}

impl Pit {
    /// A PIT in its power-on state (see [`PitState::power_on`]).
    pub fn new(clock: Arc<dyn Clock>, irq: Arc<dyn InterruptSink>) -> Self {
        let state = PitState::power_on(clock.now_ns());
        Self { state, clock, irq }
    }

    /// A PIT restored from `state`. Any values are accepted.
    pub fn from_state(state: &PitState, clock: Arc<dyn Clock>, irq: Arc<dyn InterruptSink>) -> Self {
        Self {
            state: state.clone(),
            clock,
            irq,
        }
    }

    /// The snapshot state.
    pub fn state(&self) -> PitState {
        self.state.clone()
    }

    /// Brings channel 0 up to the clock: if OUT0 rose since the previous
    /// poll (once or many times), pulses IRQ0 once.
    pub fn poll(&mut self) {
        let now = self.clock.now_ns();
        let ch = &mut self.state.channels[0];
        let d = ch.ticks(now);
        if ch.next_rise_after(ch.polled_ticks).is_some_and(|e| e <= d) {
            self.irq.pulse(TIMER_IRQ);
        }
        ch.polled_ticks = ch.polled_ticks.max(d);
    }

    /// The virtual time of the next IRQ0 edge that [`Pit::poll`] will
    /// report (possibly already past when no poll came since), or `None`
    /// when channel 0 will not raise IRQ0 again as programmed.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        let ch = &self.state.channels[0];
        let rise = ch.next_rise_after(ch.polled_ticks)?;
        let ticks = rise.saturating_sub(ch.base_ticks);
        Some(ch.load_ns.saturating_add(ticks_to_ns_ceil(ticks)))
    }

    fn read_port(&mut self, port: u64) -> u8 {
        let now = self.clock.now_ns();
        match port {
            p @ PIT_PORT..=0x42 => self.state.channels[(p - PIT_PORT) as usize].read_count(now),
            0x43 => 0, // the control word register cannot be read
            PORT_61 => {
                let ch2 = &self.state.channels[2];
                u8::from(ch2.gate)
                    | u8::from(self.state.speaker_data) << 1
                    | (self.state.port61_checks & 0x0c)
                    | (((now / REFRESH_TOGGLE_NS) & 1) as u8) << 4
                    | u8::from(ch2.out(now)) << 5
            }
            _ => 0xff,
        }
    }

    fn write_port(&mut self, port: u64, value: u8) {
        // Edges that OUT0 made under the old programming are not lost.
        if port == PIT_PORT || port == 0x43 {
            self.poll();
        }
        let now = self.clock.now_ns();
        match port {
            p @ PIT_PORT..=0x42 => self.state.channels[(p - PIT_PORT) as usize].write_count(now, value),
            0x43 => match value >> 6 {
                3 => {
                    // Read-back: bit 5 clear latches counts, bit 4 clear statuses.
                    for (i, ch) in self.state.channels.iter_mut().enumerate() {
                        if value & (2 << i) == 0 {
                            continue;
                        }
                        if value & 0x20 == 0 {
                            ch.latch_count(now);
                        }
                        if value & 0x10 == 0 && ch.latched_status.is_none() {
                            ch.latched_status = Some(ch.status(now));
                        }
                    }
                }
                c => self.state.channels[usize::from(c)].write_control(now, value),
            },
            PORT_61 => {
                self.state.speaker_data = value & 0x02 != 0;
                self.state.port61_checks = value & 0x0c;
                self.state.channels[2].set_gate(now, value & 0x01 != 0);
            }
            _ => {}
        }
    }
}

/// Register at [`PIT_PORT`] (len 4) and [`PORT_61`] (len 1). Wider
/// accesses are split into byte accesses at consecutive ports.
impl BusDevice for Pit {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{ManualClock, RecordingSink};
    use proptest::prelude::*;

    struct Rig {
        clock: Arc<ManualClock>,
        sink: Arc<RecordingSink>,
        pit: Pit,
    }

    impl Rig {
        fn new() -> Self {
            let clock = Arc::new(ManualClock::new(1_000));
            let sink = Arc::new(RecordingSink::default());
            let pit = Pit::new(clock.clone(), sink.clone());
            Self { clock, sink, pit }
        }
        fn out(&mut self, port: u64, v: u8) {
            self.pit.write(port, 0, &[v]);
        }
        fn inb(&mut self, port: u64) -> u8 {
            let mut b = [0u8];
            self.pit.read(port, 0, &mut b);
            b[0]
        }
        fn irqs(&self) -> usize {
            self.sink.rising_edges(0)
        }
        /// Channel `c` latched and read low then high (access lohi).
        fn latched(&mut self, c: u8) -> u16 {
            self.out(0x43, c << 6);
            let lo = self.inb(0x40 + u64::from(c));
            let hi = self.inb(0x40 + u64::from(c));
            u16::from_le_bytes([lo, hi])
        }
        fn program(&mut self, c: u8, mode: u8, count: u16) {
            self.out(0x43, c << 6 | 0x30 | mode << 1);
            let [lo, hi] = count.to_le_bytes();
            self.out(0x40 + u64::from(c), lo);
            self.out(0x40 + u64::from(c), hi);
        }
    }

    #[test]
    fn conversions() {
        assert_eq!(ns_to_ticks(1_000_000_000), PIT_HZ);
        assert_eq!(ticks_to_ns_ceil(PIT_HZ), 1_000_000_000);
        for t in [1u64, 2, 1193, 65536, 1 << 40] {
            let ns = ticks_to_ns_ceil(t);
            assert_eq!(ns_to_ticks(ns), t);
            assert_eq!(ns_to_ticks(ns - 1), t - 1);
        }
        assert_eq!(bcd_to_bin(0x9999), 9999);
        assert_eq!(bin_to_bcd(1234), 0x1234);
    }

    #[test]
    fn power_on_ticks_at_18_hz() {
        let mut r = Rig::new();
        let first = r.pit.next_deadline_ns().unwrap();
        assert_eq!(first, 1_000 + ticks_to_ns_ceil(0x10000));
        r.clock.set(first - 1);
        r.pit.poll();
        assert_eq!(r.irqs(), 0);
        r.clock.set(first);
        r.pit.poll();
        assert_eq!(r.irqs(), 1);
    }

    #[test]
    fn mode2_1khz_irq0() {
        let mut r = Rig::new();
        r.out(0x43, 0x34);
        r.out(0x40, 0xa9);
        r.out(0x40, 0x04); // 1193
        let start = r.clock.now_ns();
        let mut last = start;
        for k in 1..=10u64 {
            let d = r.pit.next_deadline_ns().unwrap();
            assert!(d > last, "deadlines move forward");
            assert_eq!(d, start + ticks_to_ns_ceil(1193 * k));
            r.clock.set(d - 1);
            r.pit.poll();
            assert_eq!(r.irqs() as u64, k - 1);
            r.clock.set(d);
            r.pit.poll();
            assert_eq!(r.irqs() as u64, k);
            assert_eq!(r.pit.next_deadline_ns(), Some(start + ticks_to_ns_ceil(1193 * (k + 1))));
            last = d;
        }
        // Ten missed periods are one pulse at the next poll.
        r.clock.advance(10_000_000);
        r.pit.poll();
        assert_eq!(r.irqs(), 11);
        let d = r.pit.next_deadline_ns().unwrap();
        assert!(d > r.clock.now_ns() && d <= r.clock.now_ns() + 1_000_000);
    }

    #[test]
    fn mode3_square_wave_irq0_and_out() {
        let mut r = Rig::new();
        r.program(0, 3, 1000);
        let start = r.clock.now_ns();
        assert!(r.pit.state().channels[0].out(start));
        let half = start + ticks_to_ns_ceil(500);
        assert!(!r.pit.state().channels[0].out(half));
        assert!(r.pit.state().channels[0].out(half - 1));
        r.clock.set(start + 10_000_000);
        r.pit.poll();
        assert_eq!(r.irqs(), 1);
        assert_eq!(r.pit.next_deadline_ns(), Some(start + ticks_to_ns_ceil(1000 * 12)));
    }

    #[test]
    fn mode0_fires_once_at_terminal_count() {
        let mut r = Rig::new();
        r.program(0, 0, 100);
        let start = r.clock.now_ns();
        assert_eq!(r.pit.next_deadline_ns(), Some(start + ticks_to_ns_ceil(100)));
        r.clock.advance(1_000_000);
        r.pit.poll();
        assert_eq!(r.irqs(), 1);
        assert_eq!(r.pit.next_deadline_ns(), None);
        r.clock.advance(100_000_000);
        r.pit.poll();
        assert_eq!(r.irqs(), 1);
        // The counter wraps after terminal count.
        let v = r.latched(0);
        assert!(v > 100);
    }

    #[test]
    fn control_word_stops_channel_until_count() {
        let mut r = Rig::new();
        r.clock.advance(100_000_000);
        r.out(0x43, 0x34);
        assert_eq!(r.irqs(), 1, "the edge of the old programming was kept");
        assert_eq!(r.pit.next_deadline_ns(), None);
        r.clock.advance(100_000_000);
        r.pit.poll();
        assert_eq!(r.irqs(), 1);
        r.out(0x40, 0x00);
        r.out(0x40, 0x10);
        assert!(r.pit.next_deadline_ns().is_some());
    }

    #[test]
    fn latch_holds_value_and_is_not_relatched() {
        let mut r = Rig::new();
        r.program(0, 2, 50_000);
        r.clock.advance(ticks_to_ns_ceil(100));
        r.out(0x43, 0x00);
        r.clock.advance(ticks_to_ns_ceil(1000));
        r.out(0x43, 0x00); // ignored: already latched
        assert_eq!(r.inb(0x40), (49_900u16 & 0xff) as u8);
        r.clock.advance(ticks_to_ns_ceil(1000));
        assert_eq!(r.inb(0x40), (49_900u16 >> 8) as u8);
        // Latch released: live count again.
        assert_eq!(r.latched(0), 50_000 - 2100);
    }

    #[test]
    fn lobyte_hibyte_toggling_and_single_byte_access() {
        let mut r = Rig::new();
        r.program(2, 0, 0x1234);
        // Gate low: channel 2 does not count.
        r.clock.advance(1_000_000);
        assert_eq!(r.inb(0x42), 0x34);
        assert_eq!(r.inb(0x42), 0x12);
        assert_eq!(r.inb(0x42), 0x34);
        r.out(0x43, 0x90); // channel 2, low byte only, mode 0
        r.out(0x42, 0x56);
        assert_eq!(r.inb(0x42), 0x56);
        assert_eq!(r.inb(0x42), 0x56);
        r.out(0x43, 0xa0); // high byte only
        r.out(0x42, 0x78);
        assert_eq!(r.inb(0x42), 0x78);
        assert_eq!(r.pit.state().channels[2].count, 0x7800);
    }

    #[test]
    fn read_back_status_then_count() {
        let mut r = Rig::new();
        r.out(0x43, 0xb0); // channel 2, lohi, mode 0
        r.out(0x43, 0xe8); // read-back: status of channel 2
        let status = r.inb(0x42);
        assert_eq!(status, 0x70, "OUT low, null count, lohi, mode 0");
        r.out(0x42, 0x10);
        r.out(0x42, 0x00);
        r.out(0x61, 0x01);
        r.clock.advance(ticks_to_ns_ceil(3));
        r.out(0x43, 0xc8); // read-back: status and count of channel 2
        r.clock.advance(ticks_to_ns_ceil(3));
        assert_eq!(r.inb(0x42), 0x30, "count loaded, OUT still low");
        assert_eq!(r.inb(0x42), 0x10 - 3);
        assert_eq!(r.inb(0x42), 0x00);
        r.clock.advance(ticks_to_ns_ceil(100));
        r.out(0x43, 0xe8);
        assert_eq!(r.inb(0x42), 0xb0, "terminal count: OUT high");
        // Count-only read-back of channels 0 and 1.
        r.out(0x43, 0xd6);
        assert_eq!(r.pit.state().channels[0].latched_status, None);
        assert!(r.pit.state().channels[0].latched_count.is_some());
        assert!(r.pit.state().channels[1].latched_count.is_some());
    }

    #[test]
    fn bcd_counting() {
        let mut r = Rig::new();
        r.out(0x43, 0x31); // channel 0, lohi, mode 0, BCD
        r.out(0x40, 0x00);
        r.out(0x40, 0x10); // 1000 decimal
        r.clock.advance(ticks_to_ns_ceil(1));
        assert_eq!(r.latched(0), 0x0999);
        r.clock.advance(ticks_to_ns_ceil(1000));
        assert_eq!(r.latched(0), 0x9999, "wraps at 10000");
    }

    /// Linux's `pit_calibrate_tsc`: channel 2 one-shot of 50 ms polled
    /// through OUT2 on port 0x61.
    #[test]
    fn linux_tsc_calibration_one_shot() {
        let mut r = Rig::new();
        let p61 = r.inb(0x61);
        r.out(0x61, (p61 & !0x02) | 0x01);
        r.out(0x43, 0xb0);
        let latch = (PIT_HZ / 20) as u16;
        r.out(0x42, latch as u8);
        r.out(0x42, (latch >> 8) as u8);
        let start = r.clock.now_ns();
        assert_eq!(r.inb(0x61) & 0x21, 0x01, "gate high, OUT2 low");
        r.clock.set(start + 49_999_000);
        assert_eq!(r.inb(0x61) & 0x20, 0);
        r.clock.set(start + 50_000_100);
        assert_eq!(r.inb(0x61) & 0x20, 0x20);
        assert_eq!(r.irqs(), 0, "channel 2 raises no IRQ");
    }

    /// Linux's `quick_pit_calibrate` reads only the MSB of a free count.
    #[test]
    fn linux_quick_calibration_msb_reads() {
        let mut r = Rig::new();
        r.out(0x61, 0x01);
        r.out(0x43, 0xb0);
        r.out(0x42, 0xff);
        r.out(0x42, 0xff);
        let mut last = 0x100u16;
        for _ in 0..20 {
            r.inb(0x42);
            let msb = u16::from(r.inb(0x42));
            assert!(msb < last);
            last = msb;
            r.clock.advance(ticks_to_ns_ceil(256));
        }
    }

    #[test]
    fn port61_gate_speaker_and_refresh() {
        let mut r = Rig::new();
        r.out(0x61, 0x0e); // speaker on, checks set, gate low
        let v = r.inb(0x61);
        assert_eq!(v & 0x0f, 0x0e);
        assert_eq!(v & 0x20, 0x20, "mode 3 with gate low: OUT2 high");
        let t = r.clock.now_ns();
        let b0 = r.inb(0x61) & 0x10;
        r.clock.set(t + REFRESH_TOGGLE_NS);
        assert_ne!(r.inb(0x61) & 0x10, b0, "refresh bit toggles with time");
        // Mode 2 on channel 2: gate low holds the count, rising reloads.
        r.program(2, 2, 500);
        r.clock.advance(1_000_000);
        assert_eq!(r.latched(2), 500);
        r.out(0x61, 0x01);
        r.clock.advance(ticks_to_ns_ceil(20));
        assert_eq!(r.latched(2), 480);
        r.out(0x61, 0x00);
        r.clock.advance(ticks_to_ns_ceil(20));
        assert_eq!(r.latched(2), 480, "stopped");
        assert_eq!(r.inb(0x61) & 0x20, 0x20);
        r.out(0x61, 0x01);
        assert_eq!(r.latched(2), 500, "reloaded on the rising gate");
        // Mode 1: counting starts at the trigger, OUT low until terminal count.
        r.out(0x61, 0x00);
        r.program(2, 1, 10);
        assert_eq!(r.inb(0x61) & 0x20, 0x20);
        r.out(0x61, 0x01);
        assert_eq!(r.inb(0x61) & 0x20, 0);
        r.clock.advance(ticks_to_ns_ceil(10));
        assert_eq!(r.inb(0x61) & 0x20, 0x20);
    }

    #[test]
    fn state_round_trip_keeps_timing() {
        let mut r = Rig::new();
        r.program(0, 2, 1193);
        r.clock.advance(500_000);
        let s = r.pit.state();
        let mut copy = Pit::from_state(&s, r.clock.clone(), r.sink.clone());
        assert_eq!(copy.state(), s);
        assert_eq!(copy.next_deadline_ns(), r.pit.next_deadline_ns());
        let mut buf = [0u8; 2];
        copy.write(0x43, 0, &[0x00]);
        copy.read(0x40, 0, &mut buf[..1]);
        copy.read(0x40, 0, &mut buf[1..]);
        assert_eq!(u16::from_le_bytes(buf), r.latched(0));
    }

    /// Counts by stepping one input clock at a time, as the chip does.
    struct Stepper {
        mode: u8,
        n: i64,
        v: i64,
        d: u64,
    }

    impl Stepper {
        fn count_at(&mut self, d: u64) -> u64 {
            while self.d < d {
                self.d += 1;
                match self.mode {
                    2 => {
                        self.v -= 1;
                        if self.v == 0 {
                            self.v = self.n;
                        }
                    }
                    3 => {
                        self.v -= 2;
                        if self.v <= 0 {
                            self.v += self.n;
                        }
                    }
                    _ => self.v = (self.v - 1).rem_euclid(0x10000),
                }
            }
            self.v as u64 % 0x10000
        }
    }

    proptest! {
        /// Latched counts agree with clock-by-clock stepping at random times.
        #[test]
        fn counts_match_reference(
            mode in prop::sample::select(vec![0u8, 2, 3]),
            count in 2u16..=u16::MAX,
            times in prop::collection::vec(0u64..60_000_000, 1..8)
        ) {
            let mut r = Rig::new();
            r.program(0, mode, count);
            let start = r.clock.now_ns();
            let mut times = times;
            times.sort_unstable();
            let n = i64::from(count);
            let mut reference = Stepper { mode, n, v: n, d: 0 };
            for t in times {
                r.clock.set(start + t);
                let got = r.latched(0);
                prop_assert_eq!(u64::from(got), reference.count_at(ns_to_ticks(t)));
            }
        }

        /// Each deadline is `k * count` clocks after the load, a poll just
        /// before it raises nothing, a poll at it raises exactly one IRQ0.
        #[test]
        fn one_irq_per_period(mode in prop::sample::select(vec![2u8, 3]), count in 2u16..5000, periods in 1u64..20) {
            let mut r = Rig::new();
            r.program(0, mode, count);
            let start = r.clock.now_ns();
            for k in 1..=periods {
                let d = r.pit.next_deadline_ns();
                prop_assert_eq!(d, Some(start + ticks_to_ns_ceil(k * u64::from(count))));
                let d = d.unwrap_or_default();
                r.clock.set(d - 1);
                r.pit.poll();
                prop_assert_eq!(r.irqs() as u64, k - 1);
                r.clock.set(d);
                r.pit.poll();
                prop_assert_eq!(r.irqs() as u64, k);
            }
        }

        /// Any bytes at any port at any time: no panic, restorable state.
        #[test]
        fn arbitrary_accesses_never_panic(
            steps in prop::collection::vec((0u64..7, any::<u8>(), any::<bool>(), 0u64..5_000_000), 0..200)
        ) {
            let ports = [0x40u64, 0x41, 0x42, 0x43, 0x61, 0x44, 0x60];
            let mut r = Rig::new();
            for (p, v, write, dt) in steps {
                r.clock.advance(dt);
                if write { r.out(ports[p as usize], v) } else { r.inb(ports[p as usize]); }
                r.pit.poll();
                if let Some(d) = r.pit.next_deadline_ns() {
                    prop_assert!(d >= r.pit.state().channels[0].load_ns);
                }
            }
            let s = r.pit.state();
            prop_assert_eq!(Pit::from_state(&s, r.clock.clone(), r.sink.clone()).state(), s);
        }
    }
}
