//! The HPET (high precision event timer) at 0xFED00000, after QEMU 7.2's
//! `hw/timer/hpet.c`: a 64-bit main counter at 100 MHz and three timers,
//! each one-shot or periodic, 64- or 32-bit, edge or level triggered.
//!
//! The counter is not ticked: while enabled it is computed from the `Clock`
//! (`start_counter + (now - start_ns) / 10 ns`), while halted it holds its
//! value and the guest may write it. Each timer that QEMU would have armed
//! keeps the virtual time of its next expiry; [`Hpet::poll`] fires whatever
//! has come due, [`Hpet::next_deadline_ns`] says when an enabled timer next
//! raises an interrupt, and every register access polls first, so a guest
//! always sees comparators and status as of now. A timer fires when the
//! counter reaches its comparator. A periodic timer that finds several
//! periods passed (a long gap between polls) raises its interrupt once and
//! moves its comparator to the first match after now, as QEMU does after a
//! late timer callback; a match exactly at the comparator also moves on (QEMU
//! would fire a second time one tick later when its callback lands on that
//! very tick, which with real time it practically never does).
//!
//! Interrupts: in legacy replacement mode timer 0 drives ISA IRQ 0 and
//! timer 1 ISA IRQ 8 through [`InterruptSink::set_level`] / `pulse`; every
//! other timer drives GSI `INT_ROUTE` through [`InterruptSink::set_gsi`]. An
//! edge timer pulses its line; a level timer sets its bit in the general
//! interrupt status register and raises the line until the guest writes 1
//! to that bit. The legacy replacement bit is copied into a shared
//! `AtomicBool` on every configuration write (and on creation and restore):
//! while it is set the platform disconnects the PIT's IRQ 0 and the RTC's
//! IRQ 8 (QEMU's `pit_enabled` line and `rtc_irq_level`). Setting the bit
//! lowers ISA IRQ 0 and 8, clearing it lowers IRQ 0; putting the RTC's level
//! back on IRQ 8 is then the platform's job.
//!
//! QEMU 7.2 details kept: register accesses are 32 bits wide and a 64-bit
//! access arrives as two 32-bit ones (low half first), as QEMU's memory core
//! splits it; so VAL_SET covers one 32-bit comparator write, and a periodic
//! 64-bit comparator write sets the comparator's low half and the period's
//! low half, then the period's high half. Other sizes and misaligned pieces
//! read 0 and write nothing. A comparator at or behind the counter (within
//! half the counter range) fires one tick later. A 32-bit one-shot timer
//! whose match lies beyond the 32-bit wrap raises an extra interrupt at the
//! wrap. A timer armed while its own enable bit is clear runs silently (a
//! periodic one keeps moving its comparator). Departures from QEMU: FSB
//! (MSI) delivery is not offered: the FSB enable bit is read-only zero and
//! the FSB route register reads 0; the block of a fourth timer (0x160-0x17F,
//! which QEMU 7.2 decodes by an off-by-one) reads 0; a periodic timer whose
//! period is 0 modulo its width or beyond half its range is not re-armed
//! (QEMU loops forever or for billions of steps).

use crate::bus::{mmio_pieces, BusDevice, BusEvent};
use crate::io::{Clock, InterruptSink};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Guest-physical address of the HPET.
pub const HPET_BASE: u64 = 0xfed0_0000;
/// Length of its MMIO window.
pub const HPET_SIZE: u64 = 0x400;
/// Counter period in femtoseconds: 100 MHz, as QEMU.
pub const HPET_PERIOD_FS: u64 = 10_000_000;
/// Number of timers.
pub const HPET_TIMERS: usize = 3;
/// The GSIs each timer may be routed to: GSI 2 only, as QEMU's `pc` (PIIX)
/// machine reports (its `q35` machine offers 2, 8 and 16-23: 0x00ff0104).
/// As in QEMU the route field itself takes any value.
pub const HPET_INT_ROUTE_CAP: u32 = 0x0000_0004;

const NS_PER_TICK: u64 = HPET_PERIOD_FS / 1_000_000;

const REG_CAP: u64 = 0x000;
const REG_CFG: u64 = 0x010;
const REG_STATUS: u64 = 0x020;
const REG_COUNTER: u64 = 0x0f0;
const TIMER_BLOCK: u64 = 0x100;
const TIMER_STRIDE: u64 = 0x20;
const TN_CFG: u64 = 0x00;
const TN_CMP: u64 = 0x08;

/// Vendor 0x8086, LEG_RT_CAP, COUNT_SIZE_CAP, REV_ID 1, NUM_TIM_CAP, period.
const CAPABILITIES: u64 = 0x8086_a001 | ((HPET_TIMERS as u64 - 1) << 8) | (HPET_PERIOD_FS << 32);

const CFG_ENABLE: u64 = 0x1;
const CFG_LEGACY: u64 = 0x2;
const CFG_WRITE_MASK: u64 = CFG_ENABLE | CFG_LEGACY;

const TN_TYPE_LEVEL: u64 = 0x002;
const TN_ENABLE: u64 = 0x004;
const TN_PERIODIC: u64 = 0x008;
const TN_PERIODIC_CAP: u64 = 0x010;
const TN_SIZE_CAP: u64 = 0x020;
const TN_SETVAL: u64 = 0x040;
const TN_32BIT: u64 = 0x100;
const TN_INT_ROUTE_SHIFT: u32 = 9;
const TN_INT_ROUTE_MASK: u64 = 0x1f << TN_INT_ROUTE_SHIFT;
/// QEMU's write mask (0x7f4e) without the FSB enable bit.
const TN_CFG_WRITE_MASK: u64 = TN_TYPE_LEVEL | TN_ENABLE | TN_PERIODIC | TN_SETVAL | TN_32BIT | TN_INT_ROUTE_MASK;
/// The read-only capability bits of a timer's configuration register.
const TIMER_CAPS: u64 = TN_PERIODIC_CAP | TN_SIZE_CAP | (HPET_INT_ROUTE_CAP as u64) << 32;

const LEGACY_PIT_IRQ: u8 = 0;
const LEGACY_RTC_IRQ: u8 = 8;
const LOW_HALF: u64 = 0xffff_ffff;

/// One timer's registers and hidden state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HpetTimerState {
    /// Configuration and capabilities register (the capabilities are the
    /// high half and bits 4-5).
    pub config: u64,
    /// Comparator.
    pub cmp: u64,
    /// Period of a periodic timer (QEMU's hidden `period`).
    pub period: u64,
    /// A 32-bit one-shot timer is armed for the counter wrap; the
    /// comparator match comes after it.
    pub wrap_flag: bool,
    /// Virtual time at which the armed timer fires; `None` when it is not
    /// armed. Only an enabled HPET has armed timers.
    pub deadline_ns: Option<u64>,
}

impl Default for HpetTimerState {
    /// The reset state: disabled, edge, one-shot, comparator all ones.
    fn default() -> Self {
        Self {
            config: TIMER_CAPS,
            cmp: u64::MAX,
            period: 0,
            wrap_flag: false,
            deadline_ns: None,
        }
    }
}

/// The snapshot state of the HPET.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HpetState {
    /// General configuration register (ENABLE_CNF, LEG_RT_CNF).
    pub config: u64,
    /// General interrupt status register (one bit per level-triggered timer).
    pub isr: u64,
    /// The main counter while halted (what the guest wrote, or its value
    /// when it was last halted).
    pub counter: u64,
    /// While enabled: the counter's value at `start_ns`.
    pub start_counter: u64,
    /// While enabled: the virtual time it was enabled at.
    pub start_ns: u64,
    /// The timers.
    pub timers: [HpetTimerState; HPET_TIMERS],
}

/// What a timer does to its interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drive {
    Low,
    High,
    Pulse,
}

/// The HPET.
pub struct Hpet {
    state: HpetState,
    clock: Arc<dyn Clock>,
    sink: Arc<dyn InterruptSink>,
    legacy: Arc<AtomicBool>,
}

impl std::fmt::Debug for Hpet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hpet").field("state", &self.state).finish()
    }
}

fn rising(old: u64, new: u64, bit: u64) -> bool {
    old & bit == 0 && new & bit != 0
}

fn falling(old: u64, new: u64, bit: u64) -> bool {
    old & bit != 0 && new & bit == 0
}

/// QEMU's `hpet_calculate_diff`: ticks from `cur` to the comparator, or 1
/// when the comparator is not ahead (in the timer's width, signed).
fn ticks_to_match(t: &HpetTimerState, cur: u64) -> u64 {
    if t.config & TN_32BIT != 0 {
        let d = (t.cmp as u32).wrapping_sub(cur as u32);
        if (d as i32) > 0 {
            u64::from(d)
        } else {
            1
        }
    } else {
        let d = t.cmp.wrapping_sub(cur);
        if (d as i64) > 0 {
            d
        } else {
            1
        }
    }
}

/// The comparator of a periodic timer moved by whole periods to the first
/// match after `cur`, or `None` when the period is unusable (0 in the
/// timer's width or beyond half its range).
fn next_periodic_cmp(t: &HpetTimerState, cur: u64) -> Option<u64> {
    if t.config & TN_32BIT != 0 {
        let p = t.period as u32;
        if p == 0 || p > i32::MAX as u32 {
            return None;
        }
        let c = t.cmp as u32;
        let behind = (cur as u32).wrapping_sub(c);
        if (behind as i32) < 0 {
            return Some(t.cmp);
        }
        let n = behind / p + 1;
        Some(u64::from(c.wrapping_add(n.wrapping_mul(p))))
    } else {
        let p = t.period;
        if p == 0 || p > i64::MAX as u64 {
            return None;
        }
        let behind = cur.wrapping_sub(t.cmp);
        if (behind as i64) < 0 {
            return Some(t.cmp);
        }
        let n = behind / p + 1;
        Some(t.cmp.wrapping_add(n.wrapping_mul(p)))
    }
}

impl Hpet {
    /// An HPET in its reset state: halted, counter 0, timers disabled. Clears
    /// the `legacy` flag.
    pub fn new(clock: Arc<dyn Clock>, sink: Arc<dyn InterruptSink>, legacy: Arc<AtomicBool>) -> Self {
        legacy.store(false, Ordering::SeqCst);
        Self {
            state: HpetState::default(),
            clock,
            sink,
            legacy,
        }
    }

    /// An HPET restored from `state`, which must be one this model can
    /// reach; stores its legacy replacement bit into `legacy`. The interrupt
    /// lines are assumed to be where the state puts them.
    pub fn from_state(
        state: &HpetState,
        clock: Arc<dyn Clock>,
        sink: Arc<dyn InterruptSink>,
        legacy: Arc<AtomicBool>,
    ) -> Result<Self, String> {
        if state.config & !CFG_WRITE_MASK != 0 {
            return Err(format!("HPET configuration {:#x} has unknown bits", state.config));
        }
        if state.isr >> HPET_TIMERS != 0 {
            return Err(format!("HPET interrupt status {:#x} names missing timers", state.isr));
        }
        for (n, t) in state.timers.iter().enumerate() {
            if t.config & !(TN_CFG_WRITE_MASK | TIMER_CAPS) != 0 || t.config & TIMER_CAPS != TIMER_CAPS {
                return Err(format!(
                    "HPET timer {n} configuration {:#x} is not one of this model",
                    t.config
                ));
            }
            if t.deadline_ns.is_some() && state.config & CFG_ENABLE == 0 {
                return Err(format!("HPET timer {n} is armed while the HPET is halted"));
            }
        }
        legacy.store(state.config & CFG_LEGACY != 0, Ordering::SeqCst);
        Ok(Self {
            state: state.clone(),
            clock,
            sink,
            legacy,
        })
    }

    /// The snapshot state.
    pub fn state(&self) -> HpetState {
        self.state.clone()
    }

    /// The machine reset, as QEMU's `hpet_reset`: every timer stopped and its
    /// line lowered, then everything back to the reset values and the legacy
    /// flag cleared.
    pub fn reset(&mut self) {
        for n in 0..HPET_TIMERS {
            self.del_timer(n);
        }
        self.state = HpetState::default();
        self.legacy.store(false, Ordering::SeqCst);
    }

    /// Fires every timer whose expiry has come by `clock.now_ns()`: raises
    /// its interrupt (if the timer and the HPET are enabled) and re-arms a
    /// periodic timer for its first match after now.
    pub fn poll(&mut self) {
        if self.state.timers.iter().all(|t| t.deadline_ns.is_none()) {
            return;
        }
        let now = self.clock.now_ns();
        let mut fired = [false; HPET_TIMERS];
        loop {
            let due = (0..HPET_TIMERS)
                .filter(|&n| !fired[n])
                .filter_map(|n| self.state.timers[n].deadline_ns.filter(|&d| d <= now).map(|d| (d, n)))
                .min();
            let Some((_, n)) = due else { break };
            fired[n] = true;
            self.fire(n, now);
        }
    }

    /// The virtual time of the next timer expiry that raises an interrupt
    /// (possibly already past when no poll came since), or `None`.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        if !self.enabled() {
            return None;
        }
        self.state
            .timers
            .iter()
            .filter(|t| t.config & TN_ENABLE != 0)
            .filter_map(|t| t.deadline_ns)
            .min()
    }

    fn enabled(&self) -> bool {
        self.state.config & CFG_ENABLE != 0
    }

    fn elapsed_ticks(&self, now: u64) -> u64 {
        now.saturating_sub(self.state.start_ns) / NS_PER_TICK
    }

    /// The running counter at `now`.
    fn ticks(&self, now: u64) -> u64 {
        self.state.start_counter.wrapping_add(self.elapsed_ticks(now))
    }

    /// The first time the running counter is `diff` ticks past its value at
    /// `now`.
    fn deadline_after(&self, now: u64, diff: u64) -> u64 {
        let ticks = self.elapsed_ticks(now).saturating_add(diff);
        self.state.start_ns.saturating_add(ticks.saturating_mul(NS_PER_TICK))
    }

    /// The main counter as the guest reads it.
    fn counter_now(&self) -> u64 {
        if self.enabled() {
            self.ticks(self.clock.now_ns())
        } else {
            self.state.counter
        }
    }

    /// QEMU's `hpet_set_timer`: arms timer `n` for its comparator match, or
    /// for the 32-bit wrap when a 32-bit one-shot match lies beyond it.
    fn set_timer(&mut self, n: usize, now: u64) {
        let cur = self.ticks(now);
        let t = &mut self.state.timers[n];
        t.wrap_flag = false;
        let mut diff = ticks_to_match(t, cur);
        if t.config & TN_32BIT != 0 && t.config & TN_PERIODIC == 0 {
            let wrap_diff = u32::MAX - cur as u32;
            if wrap_diff < diff as u32 {
                diff = u64::from(wrap_diff);
                t.wrap_flag = true;
            }
        }
        let deadline = self.deadline_after(now, diff);
        self.state.timers[n].deadline_ns = Some(deadline);
    }

    /// QEMU's `hpet_del_timer`: disarms timer `n` and lowers its line.
    fn del_timer(&mut self, n: usize) {
        self.state.timers[n].deadline_ns = None;
        self.update_irq(n, false);
    }

    /// QEMU's `hpet_timer` callback, at `now`.
    fn fire(&mut self, n: usize, now: u64) {
        let cur = self.ticks(now);
        let mut t = self.state.timers[n].clone();
        let periodic = t.config & TN_PERIODIC != 0;
        t.deadline_ns = if periodic && t.period != 0 {
            next_periodic_cmp(&t, cur).map(|cmp| {
                t.cmp = cmp;
                self.deadline_after(now, ticks_to_match(&t, cur))
            })
        } else if !periodic && t.config & TN_32BIT != 0 && t.wrap_flag {
            t.wrap_flag = false;
            Some(self.deadline_after(now, ticks_to_match(&t, cur)))
        } else {
            None
        };
        self.state.timers[n] = t;
        self.update_irq(n, true);
    }

    /// The line timer `n` drives: `(true, ISA IRQ)` in legacy replacement
    /// for timers 0 and 1, `(false, GSI)` otherwise.
    fn route(&self, n: usize) -> (bool, u8) {
        if n <= 1 && self.state.config & CFG_LEGACY != 0 {
            (true, if n == 0 { LEGACY_PIT_IRQ } else { LEGACY_RTC_IRQ })
        } else {
            let route = (self.state.timers[n].config & TN_INT_ROUTE_MASK) >> TN_INT_ROUTE_SHIFT;
            (false, route as u8)
        }
    }

    fn drive(&self, n: usize, drive: Drive) {
        let (isa, line) = self.route(n);
        match (isa, drive) {
            (true, Drive::Low) => self.sink.set_level(line, false),
            (true, Drive::High) => self.sink.set_level(line, true),
            (true, Drive::Pulse) => self.sink.pulse(line),
            (false, Drive::Low) => self.sink.set_gsi(line, false),
            (false, Drive::High) => self.sink.set_gsi(line, true),
            (false, Drive::Pulse) => {
                self.sink.set_gsi(line, true);
                self.sink.set_gsi(line, false);
            }
        }
    }

    /// QEMU 7.2's `update_irq`.
    fn update_irq(&mut self, n: usize, set: bool) {
        let mask = 1u64 << n;
        let config = self.state.timers[n].config;
        if !set || config & TN_ENABLE == 0 || !self.enabled() {
            self.state.isr &= !mask;
            self.drive(n, Drive::Low);
        } else if config & TN_TYPE_LEVEL != 0 {
            self.state.isr |= mask;
            self.drive(n, Drive::High);
        } else {
            self.state.isr &= !mask;
            self.drive(n, Drive::Pulse);
        }
    }

    /// The timer and register offset (within its 0x20 block) at `offset`.
    fn timer_reg(offset: u64) -> Option<(usize, u64)> {
        let rel = offset.checked_sub(TIMER_BLOCK)?;
        let n = usize::try_from(rel / TIMER_STRIDE).ok()?;
        (n < HPET_TIMERS).then_some((n, rel % TIMER_STRIDE))
    }

    /// A 32-bit register read at `offset` (4-byte aligned).
    fn read_reg(&self, offset: u64) -> u32 {
        if offset >= HPET_SIZE {
            return 0;
        }
        if offset < TIMER_BLOCK {
            return match offset {
                REG_CAP => CAPABILITIES as u32,
                0x004 => (CAPABILITIES >> 32) as u32,
                REG_CFG => self.state.config as u32,
                REG_STATUS => self.state.isr as u32,
                REG_COUNTER => self.counter_now() as u32,
                0x0f4 => (self.counter_now() >> 32) as u32,
                _ => 0,
            };
        }
        let Some((n, reg)) = Self::timer_reg(offset) else {
            return 0;
        };
        let t = &self.state.timers[n];
        match reg {
            TN_CFG => t.config as u32,
            0x04 => (t.config >> 32) as u32,
            TN_CMP => t.cmp as u32,
            0x0c => (t.cmp >> 32) as u32,
            // FSB route and the gap after it.
            _ => 0,
        }
    }

    /// A 32-bit register write at `offset` (4-byte aligned).
    fn write_reg(&mut self, offset: u64, value: u32) {
        if offset >= HPET_SIZE {
            return;
        }
        if offset < TIMER_BLOCK {
            match offset {
                REG_CFG => self.write_config(value),
                REG_STATUS => {
                    let cleared = u64::from(value) & self.state.isr;
                    for n in 0..HPET_TIMERS {
                        if cleared & (1 << n) != 0 {
                            self.update_irq(n, false);
                        }
                    }
                }
                REG_COUNTER => self.state.counter = (self.state.counter & !LOW_HALF) | u64::from(value),
                0x0f4 => self.state.counter = (self.state.counter & LOW_HALF) | u64::from(value) << 32,
                _ => {}
            }
            return;
        }
        match Self::timer_reg(offset) {
            Some((n, TN_CFG)) => self.write_timer_config(n, value),
            Some((n, TN_CMP)) => self.write_comparator(n, value, false),
            Some((n, 0x0c)) => self.write_comparator(n, value, true),
            _ => {}
        }
    }

    fn write_config(&mut self, value: u32) {
        let old = self.state.config;
        let new = (old & !CFG_WRITE_MASK) | (u64::from(value) & CFG_WRITE_MASK);
        self.state.config = new;
        if rising(old, new, CFG_ENABLE) {
            let now = self.clock.now_ns();
            self.state.start_counter = self.state.counter;
            self.state.start_ns = now;
            for n in 0..HPET_TIMERS {
                if self.state.timers[n].cmp != u64::MAX {
                    self.set_timer(n, now);
                }
            }
        } else if falling(old, new, CFG_ENABLE) {
            self.state.counter = self.ticks(self.clock.now_ns());
            for n in 0..HPET_TIMERS {
                self.del_timer(n);
            }
        }
        if rising(old, new, CFG_LEGACY) {
            self.legacy.store(true, Ordering::SeqCst);
            self.sink.set_level(LEGACY_PIT_IRQ, false);
            self.sink.set_level(LEGACY_RTC_IRQ, false);
        } else if falling(old, new, CFG_LEGACY) {
            self.sink.set_level(LEGACY_PIT_IRQ, false);
        }
        self.legacy.store(new & CFG_LEGACY != 0, Ordering::SeqCst);
    }

    fn write_timer_config(&mut self, n: usize, value: u32) {
        let old = self.state.timers[n].config;
        let value = u64::from(value);
        let low = (value & TN_CFG_WRITE_MASK) | (old & LOW_HALF & !TN_CFG_WRITE_MASK);
        let t = &mut self.state.timers[n];
        t.config = (old & !LOW_HALF) | low;
        if value & TN_32BIT != 0 {
            t.cmp &= LOW_HALF;
            t.period &= LOW_HALF;
        }
        if rising(old, low, TN_ENABLE) && self.enabled() {
            let now = self.clock.now_ns();
            self.set_timer(n, now);
        } else if falling(old, low, TN_ENABLE) {
            self.del_timer(n);
        }
    }

    fn write_comparator(&mut self, n: usize, value: u32, high: bool) {
        let t = &mut self.state.timers[n];
        let periodic = t.config & TN_PERIODIC != 0;
        let set_value = !periodic || t.config & TN_SETVAL != 0;
        let period_mask = if t.config & TN_32BIT != 0 {
            0x7fff_ffff
        } else {
            u64::MAX >> 1
        };
        let value = u64::from(value);
        if high {
            if set_value {
                t.cmp = (t.cmp & LOW_HALF) | value << 32;
            } else {
                t.period = (t.period & LOW_HALF) | (value & period_mask) << 32;
            }
        } else {
            if set_value {
                t.cmp = (t.cmp & !LOW_HALF) | value;
            }
            if periodic {
                t.period = (t.period & !LOW_HALF) | (value & period_mask);
            }
        }
        t.config &= !TN_SETVAL;
        if self.enabled() {
            let now = self.clock.now_ns();
            self.set_timer(n, now);
        }
    }
}

/// Register at [`HPET_BASE`] (len [`HPET_SIZE`]). Accesses are split into
/// naturally aligned pieces of at most 4 bytes (see the file comment); the
/// 4-byte pieces reach the registers, the rest read 0 and write nothing.
impl BusDevice for Hpet {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.poll();
        for (at, start, size) in mmio_pieces(offset, data.len(), 4) {
            let value = if size == 4 { self.read_reg(at) } else { 0 };
            data[start..start + size].copy_from_slice(&value.to_le_bytes()[..size]);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) -> Option<BusEvent> {
        self.poll();
        for (at, start, size) in mmio_pieces(offset, data.len(), 4) {
            if size == 4 {
                let mut bytes = [0u8; 4];
                bytes.copy_from_slice(&data[start..start + 4]);
                self.write_reg(at, u32::from_le_bytes(bytes));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{ManualClock, RecordingSink};
    use proptest::prelude::*;

    const T0: u64 = 1_000;

    struct Rig {
        clock: Arc<ManualClock>,
        sink: Arc<RecordingSink>,
        legacy: Arc<AtomicBool>,
        hpet: Hpet,
    }

    fn tcfg(n: usize) -> u64 {
        TIMER_BLOCK + TIMER_STRIDE * n as u64
    }

    fn tcmp(n: usize) -> u64 {
        tcfg(n) + TN_CMP
    }

    impl Rig {
        fn new() -> Self {
            let clock = Arc::new(ManualClock::new(T0));
            let sink = Arc::new(RecordingSink::default());
            let legacy = Arc::new(AtomicBool::new(true));
            let hpet = Hpet::new(clock.clone(), sink.clone(), legacy.clone());
            Self {
                clock,
                sink,
                legacy,
                hpet,
            }
        }
        fn r32(&mut self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            self.hpet.read(HPET_BASE, offset, &mut b);
            u32::from_le_bytes(b)
        }
        fn w32(&mut self, offset: u64, value: u32) {
            self.hpet.write(HPET_BASE, offset, &value.to_le_bytes());
        }
        fn r64(&mut self, offset: u64) -> u64 {
            let mut b = [0u8; 8];
            self.hpet.read(HPET_BASE, offset, &mut b);
            u64::from_le_bytes(b)
        }
        fn w64(&mut self, offset: u64, value: u64) {
            self.hpet.write(HPET_BASE, offset, &value.to_le_bytes());
        }
        fn set_config(&mut self, bits: u32) {
            self.w32(REG_CFG, bits);
        }
        /// Linux's `hpet_set_periodic` for a 32-bit timer: configuration with
        /// VAL_SET, the first match, then the period.
        fn periodic32(&mut self, n: usize, extra: u64, cmp: u32, period: u32) {
            self.w32(tcfg(n), (TN_ENABLE | TN_PERIODIC | TN_SETVAL | TN_32BIT | extra) as u32);
            self.w32(tcmp(n), cmp);
            self.w32(tcmp(n), period);
        }
        /// A 64-bit periodic timer through 32-bit writes (VAL_SET covers one
        /// write): comparator high, comparator low, period low, period high.
        fn periodic64(&mut self, n: usize, extra: u64, cmp: u64, period: u64) {
            let cfg = (TN_ENABLE | TN_PERIODIC | TN_SETVAL | extra) as u32;
            self.w32(tcfg(n), cfg);
            self.w32(tcmp(n) + 4, (cmp >> 32) as u32);
            self.w32(tcfg(n), cfg);
            self.w32(tcmp(n), cmp as u32);
            self.w32(tcmp(n), period as u32);
            self.w32(tcmp(n) + 4, (period >> 32) as u32);
        }
        /// Moves the clock to the next deadline and polls; returns it.
        fn next(&mut self) -> Option<u64> {
            let d = self.hpet.next_deadline_ns()?;
            self.clock.set(d);
            self.hpet.poll();
            Some(d)
        }
    }

    #[test]
    fn capabilities_and_reset_values() {
        let mut r = Rig::new();
        assert!(!r.legacy.load(Ordering::SeqCst), "new() clears the legacy flag");
        assert_eq!(r.r32(0x000), 0x8086_a201);
        assert_eq!(r.r32(0x004), 10_000_000);
        assert_eq!(r.r64(0x000), 0x0098_9680_8086_a201);
        for n in 0..HPET_TIMERS {
            assert_eq!(r.r32(tcfg(n)), 0x30, "periodic and 64-bit capable");
            assert_eq!(r.r32(tcfg(n) + 4), 0x4, "GSI 2 only, as QEMU's pc machine");
            assert_eq!(r.r64(tcmp(n)), u64::MAX);
            assert_eq!(r.r64(tcfg(n) + 0x10), 0, "FSB route");
        }
        assert_eq!(r.r64(REG_CFG), 0);
        assert_eq!(r.r64(REG_STATUS), 0);
        assert_eq!(r.r64(REG_COUNTER), 0);
        assert_eq!(r.hpet.next_deadline_ns(), None);
        r.w64(REG_CAP, 0);
        assert_eq!(r.r64(0x000), 0x0098_9680_8086_a201, "read-only");
    }

    #[test]
    fn counter_runs_while_enabled_and_is_writable_while_halted() {
        let mut r = Rig::new();
        r.clock.advance(1_000_000);
        assert_eq!(r.r64(REG_COUNTER), 0, "halted");
        r.w32(REG_COUNTER, 0x1234);
        r.w32(REG_COUNTER + 4, 1);
        assert_eq!(r.r64(REG_COUNTER), 0x1_0000_1234);
        r.set_config(1);
        r.clock.advance(1_005);
        assert_eq!(r.r64(REG_COUNTER), 0x1_0000_1234 + 100);
        assert_eq!(r.r32(REG_COUNTER + 4), 1);
        r.w64(REG_COUNTER, 0);
        assert_eq!(r.r64(REG_COUNTER), 0x1_0000_1234 + 100, "a write while running is lost");
        r.clock.advance(5);
        r.set_config(0);
        r.clock.advance(1_000_000);
        assert_eq!(r.r64(REG_COUNTER), 0x1_0000_1234 + 101, "halted where it was");
        r.w64(REG_COUNTER, 0xdead_beef_0000_0007);
        assert_eq!(r.r64(REG_COUNTER), 0xdead_beef_0000_0007);
        r.set_config(1);
        r.clock.advance(30);
        assert_eq!(
            r.r64(REG_COUNTER),
            0xdead_beef_0000_000a,
            "resumes from the written value"
        );
    }

    #[test]
    fn one_shot_fires_once_at_the_comparator() {
        let mut r = Rig::new();
        r.set_config(1);
        r.clock.advance(55);
        r.w32(tcfg(0), (TN_ENABLE | 20 << TN_INT_ROUTE_SHIFT) as u32);
        assert_eq!(r.r32(tcfg(0)), (TN_ENABLE | 20 << TN_INT_ROUTE_SHIFT | 0x30) as u32);
        r.w64(tcmp(0), 1_005);
        let d = T0 + 1_005 * 10;
        assert_eq!(r.hpet.next_deadline_ns(), Some(d));
        r.clock.set(d - 1);
        r.hpet.poll();
        assert_eq!(r.sink.gsi_rising_edges(20), 0);
        r.clock.set(d);
        r.hpet.poll();
        assert_eq!(r.sink.gsi_rising_edges(20), 1);
        assert_eq!(
            r.sink.gsi_changes(),
            vec![(20, true), (20, false)],
            "an edge is a pulse"
        );
        assert_eq!(r.r64(REG_COUNTER), 1_005);
        assert_eq!(r.r32(REG_STATUS), 0, "edge timers set no status");
        assert_eq!(r.hpet.next_deadline_ns(), None);
        r.clock.advance(100_000_000_000);
        r.hpet.poll();
        assert_eq!(r.sink.gsi_rising_edges(20), 1);
        assert!(r.sink.changes().is_empty(), "no ISA IRQ outside legacy replacement");
    }

    #[test]
    fn periodic_64bit_counts_periods_and_catches_up_once() {
        let mut r = Rig::new();
        r.set_config(1);
        let p = 1_000u64;
        let c = 0x1_0000_0000u64 + 500;
        r.w64(REG_COUNTER, 0);
        r.periodic64(1, 21 << TN_INT_ROUTE_SHIFT, c, p);
        assert_eq!(r.r64(tcmp(1)), c);
        assert_eq!(r.hpet.state().timers[1].period, p);
        for k in 0..10u64 {
            let d = r.hpet.next_deadline_ns().unwrap();
            assert_eq!(d, T0 + (c + k * p) * 10);
            r.clock.set(d - 1);
            r.hpet.poll();
            assert_eq!(r.sink.gsi_rising_edges(21) as u64, k);
            r.clock.set(d);
            r.hpet.poll();
            assert_eq!(r.sink.gsi_rising_edges(21) as u64, k + 1);
            assert_eq!(r.r64(tcmp(1)), c + (k + 1) * p, "the comparator moves by the period");
        }
        // Ten and a half periods pass unpolled: one interrupt, then the
        // first match after now.
        r.clock.advance(10 * p * 10 + p * 5);
        r.hpet.poll();
        assert_eq!(r.sink.gsi_rising_edges(21), 11);
        assert_eq!(r.r64(tcmp(1)), c + 20 * p);
        assert_eq!(r.hpet.next_deadline_ns(), Some(T0 + (c + 20 * p) * 10));
    }

    #[test]
    fn val_set_covers_one_comparator_write() {
        let mut r = Rig::new();
        // 64-bit periodic, VAL_SET, one 64-bit write: QEMU 7.2 splits it, so
        // the comparator's high half is untouched (all ones after reset) and
        // the value's high half goes to the period.
        r.w32(tcfg(0), (TN_ENABLE | TN_PERIODIC | TN_SETVAL) as u32);
        r.w64(tcmp(0), 0x0000_0002_0000_0100);
        assert_eq!(r.r64(tcmp(0)), 0xffff_ffff_0000_0100);
        assert_eq!(r.hpet.state().timers[0].period, 0x0000_0002_0000_0100);
        assert_eq!(r.r32(tcfg(0)) as u64 & TN_SETVAL, 0, "VAL_SET clears itself");
        // Without VAL_SET a periodic comparator write sets only the period.
        r.w32(tcmp(0), 0x300);
        assert_eq!(r.r64(tcmp(0)), 0xffff_ffff_0000_0100);
        assert_eq!(r.hpet.state().timers[0].period, 0x0000_0002_0000_0300);
        // One-shot: comparator writes are the comparator.
        r.w32(tcfg(0), TN_ENABLE as u32);
        r.w64(tcmp(0), 0x1234_5678_9abc_def0);
        assert_eq!(r.r64(tcmp(0)), 0x1234_5678_9abc_def0);
        // 32-bit mode truncates comparator and period and masks the period.
        r.w32(tcfg(0), (TN_ENABLE | TN_PERIODIC | TN_32BIT) as u32);
        assert_eq!(r.r64(tcmp(0)), 0x9abc_def0);
        r.w32(tcmp(0), 0xffff_ffff);
        assert_eq!(r.hpet.state().timers[0].period, 0x7fff_ffff);
    }

    #[test]
    fn linux_periodic_tick_in_legacy_replacement() {
        let mut r = Rig::new();
        // hpet_enable_legacy_int, hpet_stop_counter, hpet_reset_counter, ...
        r.set_config(CFG_LEGACY as u32);
        assert!(r.legacy.load(Ordering::SeqCst));
        assert_eq!(r.sink.changes(), vec![(0, false), (8, false)], "IRQ 0 and 8 lowered");
        r.w32(REG_COUNTER, 0);
        r.w32(REG_COUNTER + 4, 0);
        let delta = 100_000u32; // 1 ms
        r.periodic32(0, 0, delta, delta);
        r.set_config((CFG_LEGACY | CFG_ENABLE) as u32);
        let start = r.clock.now_ns();
        for k in 1..=20u64 {
            let d = r.next().unwrap();
            assert_eq!(d, start + k * u64::from(delta) * 10);
            assert_eq!(r.sink.rising_edges(0) as u64, k);
        }
        assert!(r.sink.gsi_changes().is_empty());
        assert_eq!(r.sink.rising_edges(8), 0);
        assert_eq!(r.r32(tcmp(0)), 21 * delta);
        assert_eq!(r.r32(tcmp(0) + 4), 0);
    }

    #[test]
    fn one_shot_32bit_raises_at_the_wrap_too() {
        let mut r = Rig::new();
        r.w64(REG_COUNTER, 0xffff_ff00);
        r.w32(tcfg(1), (TN_ENABLE | TN_32BIT | 22 << TN_INT_ROUTE_SHIFT) as u32);
        assert_eq!(r.r64(tcmp(1)), 0xffff_ffff, "32-bit mode truncates the comparator");
        r.w32(tcmp(1), 0x100);
        r.set_config(1);
        // The match (0x1_0000_0100) lies beyond the wrap: QEMU first stops
        // at counter 0xffff_ffff and raises the interrupt there too.
        assert_eq!(r.next(), Some(T0 + 0xff * 10));
        assert_eq!(r.sink.gsi_rising_edges(22), 1);
        assert_eq!(r.next(), Some(T0 + 0x200 * 10));
        assert_eq!(r.sink.gsi_rising_edges(22), 2);
        assert_eq!(r.r64(REG_COUNTER), 0x1_0000_0100);
        assert_eq!(r.next(), None);

        // A match before the wrap raises once.
        let mut r = Rig::new();
        r.w64(REG_COUNTER, 0xffff_ff00);
        r.w32(tcfg(1), (TN_ENABLE | TN_32BIT | 22 << TN_INT_ROUTE_SHIFT) as u32);
        r.w32(tcmp(1), 0xffff_ff80);
        r.set_config(1);
        assert_eq!(r.next(), Some(T0 + 0x80 * 10));
        assert_eq!(r.next(), None);
        assert_eq!(r.sink.gsi_rising_edges(22), 1);
    }

    #[test]
    fn periodic_32bit_comparator_wraps() {
        let mut r = Rig::new();
        r.w64(REG_COUNTER, 0xffff_ff00);
        r.periodic32(2, 17 << TN_INT_ROUTE_SHIFT, 0xffff_ff80, 0x100);
        r.set_config(1);
        assert_eq!(r.next(), Some(T0 + 0x80 * 10));
        assert_eq!(r.r64(tcmp(2)), 0x80, "wrapped in 32 bits");
        assert_eq!(r.next(), Some(T0 + 0x180 * 10));
        assert_eq!(r.r64(REG_COUNTER), 0x1_0000_0080);
        assert_eq!(r.next(), Some(T0 + 0x280 * 10));
        assert_eq!(r.sink.gsi_rising_edges(17), 3);
    }

    #[test]
    fn legacy_replacement_routes_timers_0_and_1_to_irq_0_and_8() {
        let mut r = Rig::new();
        r.set_config(CFG_LEGACY as u32);
        for (n, cmp) in [(0usize, 100u32), (1, 200), (2, 300)] {
            r.w32(tcfg(n), (TN_ENABLE | (20 + n as u64) << TN_INT_ROUTE_SHIFT) as u32);
            r.w32(tcmp(n), cmp);
        }
        r.set_config((CFG_LEGACY | CFG_ENABLE) as u32);
        while r.next().is_some() {}
        assert_eq!(r.sink.rising_edges(0), 1);
        assert_eq!(r.sink.rising_edges(8), 1);
        assert_eq!(r.sink.gsi_rising_edges(20), 0);
        assert_eq!(r.sink.gsi_rising_edges(21), 0);
        assert_eq!(r.sink.gsi_rising_edges(22), 1, "timer 2 keeps its route");

        r.set_config(CFG_ENABLE as u32);
        assert!(!r.legacy.load(Ordering::SeqCst));
        assert_eq!(r.sink.changes().last(), Some(&(0, false)));
        let now = r.r64(REG_COUNTER);
        r.w64(tcmp(0), now + 10);
        r.next();
        assert_eq!(r.sink.gsi_rising_edges(20), 1, "timer 0 on its own route again");
        assert_eq!(r.sink.rising_edges(0), 1);

        // The flag follows restored states too.
        let mut s = r.hpet.state();
        s.config |= CFG_LEGACY;
        let flag = Arc::new(AtomicBool::new(false));
        Hpet::from_state(&s, r.clock.clone(), r.sink.clone(), flag.clone()).unwrap();
        assert!(flag.load(Ordering::SeqCst));
        s.config &= !CFG_LEGACY;
        Hpet::from_state(&s, r.clock.clone(), r.sink.clone(), flag.clone()).unwrap();
        assert!(!flag.load(Ordering::SeqCst));
    }

    #[test]
    fn level_interrupt_status_is_cleared_by_writing_one() {
        let mut r = Rig::new();
        r.periodic32(2, TN_TYPE_LEVEL | 23 << TN_INT_ROUTE_SHIFT, 1_000, 1_000);
        r.set_config(1);
        r.next();
        assert_eq!(r.r32(REG_STATUS), 0b100);
        assert_eq!(r.sink.gsi_changes(), vec![(23, true)]);
        r.next();
        assert_eq!(r.r32(REG_STATUS), 0b100, "stays set");
        assert_eq!(r.sink.gsi_changes(), vec![(23, true), (23, true)]);
        r.w32(REG_STATUS, 0b011);
        assert_eq!(r.r32(REG_STATUS), 0b100, "other bits clear nothing");
        r.w32(REG_STATUS, 0b100);
        assert_eq!(r.r32(REG_STATUS), 0);
        assert_eq!(r.sink.gsi_changes().last(), Some(&(23, false)), "the line goes down");
        r.next();
        assert_eq!(r.sink.gsi_rising_edges(23), 2);
        // Disabling the timer lowers the line and clears its status.
        r.w32(
            tcfg(2),
            (TN_PERIODIC | TN_TYPE_LEVEL | TN_32BIT | 23 << TN_INT_ROUTE_SHIFT) as u32,
        );
        assert_eq!(r.r32(REG_STATUS), 0);
        assert_eq!(r.sink.gsi_changes().last(), Some(&(23, false)));
        // So does halting the HPET.
        r.w32(
            tcfg(2),
            (TN_ENABLE | TN_PERIODIC | TN_TYPE_LEVEL | TN_32BIT | 23 << TN_INT_ROUTE_SHIFT) as u32,
        );
        r.next();
        assert_eq!(r.r32(REG_STATUS), 0b100);
        r.set_config(0);
        assert_eq!(r.r32(REG_STATUS), 0);
        assert_eq!(r.sink.gsi_changes().last(), Some(&(23, false)));
        assert_eq!(r.hpet.next_deadline_ns(), None);
    }

    #[test]
    fn comparator_behind_the_counter_fires_one_tick_later() {
        let mut r = Rig::new();
        r.set_config(1);
        r.clock.advance(10_000);
        r.w32(tcfg(0), (TN_ENABLE | 16 << TN_INT_ROUTE_SHIFT) as u32);
        r.w64(tcmp(0), 500);
        assert_eq!(r.hpet.next_deadline_ns(), Some(T0 + 1_001 * 10));
        r.next();
        assert_eq!(r.sink.gsi_rising_edges(16), 1);
        assert_eq!(r.next(), None);
    }

    #[test]
    fn a_timer_without_its_enable_bit_raises_nothing() {
        let mut r = Rig::new();
        r.set_config(1);
        r.periodic32(1, 18 << TN_INT_ROUTE_SHIFT, 100, 100);
        r.w32(tcfg(1), (TN_PERIODIC | TN_32BIT | 18 << TN_INT_ROUTE_SHIFT) as u32);
        r.w32(tcmp(1), 100); // armed again by the write, silently
        assert!(r.hpet.state().timers[1].deadline_ns.is_some());
        assert_eq!(r.hpet.next_deadline_ns(), None);
        r.clock.advance(10_050);
        r.hpet.poll();
        assert_eq!(r.sink.gsi_rising_edges(18), 0);
        assert_eq!(r.r32(REG_STATUS), 0);
        assert_eq!(r.r32(tcmp(1)), 1_100, "a periodic comparator keeps moving");
        // Enabling it arms it from its comparator.
        r.w32(
            tcfg(1),
            (TN_ENABLE | TN_PERIODIC | TN_32BIT | 18 << TN_INT_ROUTE_SHIFT) as u32,
        );
        assert_eq!(r.next(), Some(T0 + 1_100 * 10));
        assert_eq!(r.sink.gsi_rising_edges(18), 1);
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let mut r = Rig::new();
        r.w32(tcfg(0), (TN_ENABLE | TN_32BIT) as u32);
        let mut b = [0xffu8; 2];
        r.hpet.read(HPET_BASE, 0, &mut b);
        assert_eq!(b, [0, 0], "2-byte reads decode nothing");
        let mut b = [0xffu8; 1];
        r.hpet.read(HPET_BASE, 4, &mut b);
        assert_eq!(b, [0]);
        r.hpet.write(HPET_BASE, REG_CFG, &[3]);
        r.hpet.write(HPET_BASE, REG_CFG, &[3, 0]);
        assert_eq!(r.r32(REG_CFG), 0, "byte writes change nothing");
        let mut b = [0xffu8; 4];
        r.hpet.read(HPET_BASE, 2, &mut b);
        assert_eq!(b, [0; 4], "misaligned");
        // 8 bytes at a 4-aligned offset: two 32-bit registers.
        assert_eq!(r.r64(tcfg(0) + 4), u64::from(HPET_INT_ROUTE_CAP) | 0xffff_ffff << 32);
        // The FSB enable bit and route do not stick.
        r.w32(tcfg(1), 0x4000);
        assert_eq!(r.r32(tcfg(1)), 0x30);
        r.w64(tcfg(1) + 0x10, u64::MAX);
        assert_eq!(r.r64(tcfg(1) + 0x10), 0);
        // No fourth timer, nothing past the window.
        let before = r.hpet.state();
        for offset in [0x160u64, 0x168, 0x16c, 0x3f8, 0x400, 0x1000, u64::MAX - 3] {
            r.w32(offset, u32::MAX);
            assert_eq!(r.r32(offset), 0, "offset {offset:#x}");
        }
        r.hpet.write(HPET_BASE, u64::MAX, &[1, 2, 3, 4, 5, 6, 7, 8]);
        r.hpet.read(HPET_BASE, u64::MAX - 1, &mut [0u8; 16]);
        assert_eq!(r.hpet.state(), before);
    }

    #[test]
    fn state_round_trip_and_corrupt_states() {
        let mut r = Rig::new();
        r.periodic32(0, 20 << TN_INT_ROUTE_SHIFT, 5_000, 5_000);
        r.set_config(3);
        r.next();
        r.clock.advance(123);
        let s = r.hpet.state();
        let flag = Arc::new(AtomicBool::new(false));
        let mut copy = Hpet::from_state(&s, r.clock.clone(), r.sink.clone(), flag.clone()).unwrap();
        assert_eq!(copy.state(), s);
        assert!(flag.load(Ordering::SeqCst));
        assert_eq!(copy.next_deadline_ns(), r.hpet.next_deadline_ns());
        let mut b = [0u8; 8];
        copy.read(HPET_BASE, REG_COUNTER, &mut b);
        assert_eq!(u64::from_le_bytes(b), r.r64(REG_COUNTER));

        let bad = |f: &dyn Fn(&mut HpetState)| {
            let mut st = s.clone();
            f(&mut st);
            Hpet::from_state(&st, r.clock.clone(), r.sink.clone(), Arc::new(AtomicBool::new(false))).err()
        };
        assert!(bad(&|st| st.config |= 4).is_some());
        assert!(bad(&|st| st.isr = 8).is_some());
        assert!(bad(&|st| st.timers[1].config |= 0x4000).is_some(), "FSB enable");
        assert!(bad(&|st| st.timers[1].config &= !TN_SIZE_CAP).is_some());
        assert!(bad(&|st| st.timers[2].config ^= 1 << 40).is_some());
        assert!(bad(&|st| st.config = 0).is_some(), "armed while halted");
        assert!(bad(&|_| {}).is_none());
    }

    #[test]
    fn reset_stops_everything() {
        let mut r = Rig::new();
        r.periodic32(2, TN_TYPE_LEVEL | 19 << TN_INT_ROUTE_SHIFT, 100, 100);
        r.set_config(3);
        r.next();
        assert_eq!(r.sink.gsi_changes().last(), Some(&(19, true)));
        r.hpet.reset();
        assert_eq!(r.hpet.state(), HpetState::default());
        assert!(!r.legacy.load(Ordering::SeqCst));
        assert_eq!(r.sink.gsi_changes().last(), Some(&(19, false)));
        assert_eq!(r.hpet.next_deadline_ns(), None);
    }

    /// Register offsets worth hitting, and anything else now and then.
    fn offset() -> impl Strategy<Value = u64> {
        prop_oneof![
            4 => prop::sample::select(vec![
                0x000u64, 0x004, 0x010, 0x014, 0x020, 0x024, 0x0f0, 0x0f4, 0x100, 0x104, 0x108, 0x10c, 0x110,
                0x120, 0x128, 0x12c, 0x140, 0x148, 0x14c, 0x160, 0x168,
            ]),
            1 => 0u64..0x480,
        ]
    }

    fn value() -> impl Strategy<Value = u64> {
        prop_oneof![
            // Configuration-looking values: enables, modes, routes.
            2 => (any::<u16>(), 0u64..4).prop_map(|(v, hi)| u64::from(v) | hi << 32),
            1 => 0u64..0x2_0000,
            1 => any::<u64>(),
        ]
    }

    #[derive(Debug, Clone)]
    enum Step {
        Read(u64, usize),
        Write(u64, usize, u64),
        Poll,
    }

    fn step() -> impl Strategy<Value = (Step, u64)> {
        let size = prop::sample::select(vec![4usize, 4, 8, 1, 2, 3]);
        let step = prop_oneof![
            2 => (offset(), size.clone()).prop_map(|(o, s)| Step::Read(o, s)),
            4 => (offset(), size, value()).prop_map(|(o, s, v)| Step::Write(o, s, v)),
            1 => Just(Step::Poll),
        ];
        let dt = prop_oneof![3 => 0u64..2_000, 1 => 0u64..50_000_000, 1 => Just(0)];
        (step, dt)
    }

    fn apply(h: &mut Hpet, step: &Step) {
        match *step {
            Step::Read(o, s) => h.read(HPET_BASE, o, &mut vec![0u8; s]),
            Step::Write(o, s, v) => {
                h.write(HPET_BASE, o, &v.to_le_bytes()[..s]);
            }
            Step::Poll => h.poll(),
        }
    }

    /// A copy restored from a snapshot, with its own sink and flag, and how
    /// many line changes the original had made by then.
    struct Restored {
        hpet: Hpet,
        sink: Arc<RecordingSink>,
        flag: Arc<AtomicBool>,
        isa_mark: usize,
        gsi_mark: usize,
    }

    /// Matches the periodic timer has made when the counter reads `cur`.
    fn matches(cur: u64, first: u64, period: u64) -> u64 {
        if cur < first {
            0
        } else {
            (cur - first) / period + 1
        }
    }

    fn periodic_rig(mode32: bool, start: u64, first: u64, period: u64, n: usize, level: bool) -> Rig {
        let mut r = Rig::new();
        r.w64(REG_COUNTER, start);
        let extra = (16 + n as u64) << TN_INT_ROUTE_SHIFT | if level { TN_TYPE_LEVEL } else { 0 };
        if mode32 {
            r.periodic32(n, extra, (start + first) as u32, period as u32);
        } else {
            r.periodic64(n, extra, start + first, period);
        }
        r.set_config(1);
        r
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any accesses at any time: no panic; status only for existing
        /// timers; the legacy flag is the configuration bit; a poll leaves
        /// no deadline behind; and a restored copy taken halfway goes on
        /// exactly like the original.
        #[test]
        fn arbitrary_accesses_never_panic(steps in prop::collection::vec(step(), 0..150), split in 0usize..150) {
            let mut r = Rig::new();
            let mut copy: Option<Restored> = None;
            for (i, (step, dt)) in steps.iter().enumerate() {
                if i == split {
                    let sink = Arc::new(RecordingSink::default());
                    let flag = Arc::new(AtomicBool::new(false));
                    let restored = Hpet::from_state(&r.hpet.state(), r.clock.clone(), sink.clone(), flag.clone());
                    prop_assert!(restored.is_ok(), "{:?}", restored.err());
                    prop_assert_eq!(flag.load(Ordering::SeqCst), r.legacy.load(Ordering::SeqCst));
                    let (isa_mark, gsi_mark) = (r.sink.changes().len(), r.sink.gsi_changes().len());
                    copy = restored.ok().map(|hpet| Restored { hpet, sink, flag, isa_mark, gsi_mark });
                }
                r.clock.advance(*dt);
                apply(&mut r.hpet, step);
                if let Some(c) = copy.as_mut() {
                    apply(&mut c.hpet, step);
                    c.hpet.poll();
                }
                let s = r.hpet.state();
                prop_assert_eq!(s.isr >> HPET_TIMERS, 0);
                prop_assert_eq!(r.legacy.load(Ordering::SeqCst), s.config & CFG_LEGACY != 0);
                r.hpet.poll();
                let now = r.clock.now_ns();
                for t in &r.hpet.state().timers {
                    prop_assert!(t.deadline_ns.is_none_or(|d| d > now));
                }
            }
            let s = r.hpet.state();
            let restored = Hpet::from_state(&s, r.clock.clone(), r.sink.clone(), Arc::new(AtomicBool::new(false)));
            prop_assert_eq!(restored.map(|h| h.state()).ok(), Some(s.clone()));
            if let Some(c) = copy {
                prop_assert_eq!(c.hpet.state(), s);
                prop_assert_eq!(c.flag.load(Ordering::SeqCst), r.legacy.load(Ordering::SeqCst));
                prop_assert_eq!(&c.sink.changes()[..], &r.sink.changes()[c.isa_mark..]);
                prop_assert_eq!(&c.sink.gsi_changes()[..], &r.sink.gsi_changes()[c.gsi_mark..]);
            }
        }

        /// Polled at each deadline, a periodic timer's k-th interrupt comes
        /// exactly when the counter reaches first + (k - 1) * period.
        #[test]
        fn periodic_deadlines_follow_the_formula(
            mode32 in any::<bool>(),
            near_wrap in any::<bool>(),
            first in 1u64..5_000,
            period in 1u64..5_000,
            n in 0usize..HPET_TIMERS,
            count in 1u64..40,
        ) {
            let start = if near_wrap { 0xffff_ffff - 3 * period } else { 0 };
            let mut r = periodic_rig(mode32, start, first, period, n, false);
            let t0 = r.clock.now_ns();
            for k in 1..=count {
                let d = r.next();
                prop_assert_eq!(d, Some(t0 + (first + (k - 1) * period) * 10));
                prop_assert_eq!(r.sink.gsi_rising_edges(16 + n as u8) as u64, k);
            }
        }

        /// Polled at random times, a periodic timer raises one interrupt at
        /// each poll that finds a new match since the previous one, however
        /// many it finds.
        #[test]
        fn periodic_count_matches_the_formula(
            mode32 in any::<bool>(),
            near_wrap in any::<bool>(),
            first in 1u64..5_000,
            period in 1u64..5_000,
            n in 0usize..HPET_TIMERS,
            level in any::<bool>(),
            gaps in prop::collection::vec(0u64..150_000, 1..60),
        ) {
            let start = if near_wrap { 0xffff_ffff - 3 * period } else { 0 };
            let mut r = periodic_rig(mode32, start, first, period, n, level);
            let t0 = r.clock.now_ns();
            let line = 16 + n as u8;
            let mut expected = 0usize;
            let mut prev = 0;
            for gap in gaps {
                r.clock.advance(gap);
                r.hpet.poll();
                let elapsed = (r.clock.now_ns() - t0) / 10;
                let m = matches(elapsed, first, period);
                let fired = m > prev;
                expected += usize::from(fired);
                prev = m;
                prop_assert_eq!(r.sink.gsi_rising_edges(line), expected);
                prop_assert_eq!(r.r32(REG_STATUS) != 0, level && fired);
                if level {
                    r.w32(REG_STATUS, 1 << n);
                }
            }
        }
    }
}
