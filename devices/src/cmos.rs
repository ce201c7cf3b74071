//! The MC146818 CMOS RTC and its 128 bytes of NVRAM (ports 0x70/0x71,
//! IRQ 8), modelled on QEMU's `hw/rtc/mc146818rtc.c`.
//!
//! The calendar is a second count (`base_secs`) valid at a virtual time
//! (`base_ns`): the date is read once from a [`WallClock`] when the device is
//! made, and from then on only virtual time from the [`Clock`] moves it, so a
//! replay or a restored snapshot reads the same dates. A guest that sets the
//! time registers moves the base. The time registers are refreshed from the
//! calendar when read (as QEMU does), so they show BCD or binary and 12 or 24
//! hours as register B says at that moment.
//!
//! Interrupts: periodic (PF) on the 32.768 kHz grid of virtual time,
//! update-ended (UF) and alarm (AF) at second boundaries. The machine calls
//! [`Cmos::poll`] at exits and when [`Cmos::next_deadline_ns`] has passed.
//! As in QEMU, PF is only raised while PIE is set, the line stays high until
//! register C is read, and an alarm is checked at the second the RTC is
//! polled in (a machine that honours the deadlines polls at every second
//! while AIE or UIE is set).

use std::sync::Arc;

use crate::bus::{BusDevice, BusEvent};
use crate::io::{Clock, InterruptSink, WallClock};

/// The IRQ line of the RTC.
pub const RTC_IRQ: u8 = 8;
/// Size of the NVRAM, registers included.
pub const NVRAM_LEN: usize = 128;

const SECONDS: usize = 0x00;
const SECONDS_ALARM: usize = 0x01;
const MINUTES: usize = 0x02;
const MINUTES_ALARM: usize = 0x03;
const HOURS: usize = 0x04;
const HOURS_ALARM: usize = 0x05;
const DAY_OF_WEEK: usize = 0x06;
const DAY_OF_MONTH: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const REG_A: usize = 0x0A;
const REG_B: usize = 0x0B;
const REG_C: usize = 0x0C;
const REG_D: usize = 0x0D;
const CENTURY: usize = 0x32;
const PS2_CENTURY: usize = 0x37;

const A_UIP: u8 = 0x80;
const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_SQWE: u8 = 0x08;
const B_DM_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
const C_MASK: u8 = 0x70;

const NS_PER_SEC: i128 = 1_000_000_000;
const RTC_HZ: u128 = 32_768;
/// UIP is set for the last 244 µs (8 cycles of 32.768 kHz) of each second.
const UIP_HOLD_NS: i128 = 8 * NS_PER_SEC / 32_768;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Errors of restoring the RTC from a snapshot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmosError {
    /// The snapshot's NVRAM does not have 128 bytes.
    #[error("CMOS state holds {0} NVRAM bytes; it must hold exactly 128")]
    BadNvramLength(usize),
}

/// Everything a snapshot of the RTC needs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CmosState {
    /// The index register (without the NMI-disable bit).
    pub index: u8,
    /// The 128 bytes of NVRAM, clock registers included.
    pub data: Vec<u8>,
    /// The calendar second (Unix time as the guest sees it) at `base_ns`.
    pub base_secs: i64,
    /// Sub-second part of the calendar at `base_ns`.
    pub base_subsec_ns: u32,
    /// The virtual time the calendar was last set at.
    pub base_ns: u64,
    /// The calendar second at which UF and AF were last evaluated.
    pub last_update_sec: i64,
    /// When the next periodic interrupt is due (virtual ns), if PIE is on.
    pub next_periodic_ns: Option<u64>,
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian `(year, month, day)` of a day count since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A broken-down time, as the clock registers hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tm {
    year: i64,
    month: i64,
    day: i64,
    hour: i64,
    min: i64,
    sec: i64,
    /// 0 = Sunday.
    wday: i64,
}

impl Tm {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        Tm {
            year,
            month: i64::from(month),
            day: i64::from(day),
            hour: sod / 3600,
            min: sod / 60 % 60,
            sec: sod % 60,
            wday: (days + 4).rem_euclid(7),
        }
    }

    /// QEMU's `mktimegm`: linear in day, hour, minute and second, so that
    /// out-of-range register values give a defined (if odd) time.
    fn to_unix(self) -> i64 {
        let (mut y, mut m) = (self.year, self.month);
        if m < 3 {
            m += 12;
            y -= 1;
        }
        let days = self.day + (153 * m - 457) / 5 + 365 * y + y / 4 - y / 100 + y / 400 - 719_469;
        86_400 * days + 3600 * self.hour + 60 * self.min + self.sec
    }
}

/// The MC146818 RTC with its NVRAM.
pub struct Cmos {
    state: CmosState,
    clock: Arc<dyn Clock>,
    irq: Arc<dyn InterruptSink>,
    line_high: bool,
}

impl std::fmt::Debug for Cmos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cmos")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Cmos {
    /// An RTC whose calendar starts at `wall`'s date now, with the memory
    /// size bytes set as QEMU's `pc_cmos_init` sets them.
    pub fn new(
        wall: &dyn WallClock,
        ram_below_4g: u64,
        ram_above_4g: u64,
        clock: Arc<dyn Clock>,
        irq: Arc<dyn InterruptSink>,
    ) -> Self {
        let mut data = vec![0u8; NVRAM_LEN];
        data[REG_A] = 0x26;
        data[REG_B] = B_24H;
        data[REG_D] = 0x80;
        let mut set16 = |at: usize, v: u64| {
            data[at] = v as u8;
            data[at + 1] = (v >> 8) as u8;
        };
        set16(0x15, (ram_below_4g / KIB).min(640));
        let ext = (ram_below_4g.saturating_sub(MIB) / KIB).min(0xFFFF);
        set16(0x17, ext);
        set16(0x30, ext);
        set16(0x34, (ram_below_4g.saturating_sub(16 * MIB) / (64 * KIB)).min(0xFFFF));
        let high = ram_above_4g / (64 * KIB);
        data[0x5B] = high as u8;
        data[0x5C] = (high >> 8) as u8;
        data[0x5D] = (high >> 16) as u8;

        let secs = wall.unix_seconds();
        let state = CmosState {
            index: 0,
            data,
            base_secs: secs,
            base_subsec_ns: 0,
            base_ns: clock.now_ns(),
            last_update_sec: secs,
            next_periodic_ns: None,
        };
        let mut c = Self {
            state,
            clock,
            irq,
            line_high: false,
        };
        c.store_time(secs);
        c
    }

    /// An RTC restored from a snapshot; its calendar goes on from the
    /// snapshot's. The line is assumed to be where the state puts it.
    pub fn from_state(
        state: &CmosState,
        clock: Arc<dyn Clock>,
        irq: Arc<dyn InterruptSink>,
    ) -> Result<Self, CmosError> {
        if state.data.len() != NVRAM_LEN {
            return Err(CmosError::BadNvramLength(state.data.len()));
        }
        Ok(Self {
            line_high: state.data[REG_C] & C_IRQF != 0,
            state: state.clone(),
            clock,
            irq,
        })
    }

    /// The snapshot of this RTC.
    pub fn state(&self) -> CmosState {
        self.state.clone()
    }

    /// The machine reset, as QEMU's `rtc_reset`: interrupt enables and
    /// flags cleared, line lowered; time and NVRAM kept.
    /// Whether the alarm flag (register C's AF) is set and the alarm
    /// interrupt enabled (register B's AIE): the condition under which
    /// QEMU's RTC asks to wake a sleeping machine.
    pub fn alarm_raised(&self) -> bool {
        self.data(REG_C) & C_AF != 0 && self.data(REG_B) & B_AIE != 0
    }

    pub fn reset(&mut self) {
        self.state.data[REG_B] &= !(B_PIE | B_AIE | B_SQWE);
        self.state.data[REG_C] = 0;
        self.state.next_periodic_ns = None;
        self.update_line();
    }

    /// Raises IRQ 8 for whatever has come due by now.
    pub fn poll(&mut self) {
        let now = self.clock.now_ns();
        if let Some(due) = self.state.next_periodic_ns {
            if now >= due {
                self.state.data[REG_C] |= C_PF;
                if self.state.data[REG_B] & B_PIE != 0 {
                    self.state.data[REG_C] |= C_IRQF;
                }
                self.schedule_periodic(now);
            }
        }
        self.check_update(now);
        self.update_line();
    }

    /// The virtual time at which the RTC next wants [`Cmos::poll`] called.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        let b = self.state.data[REG_B];
        let second = if self.running() && b & (B_UIE | B_AIE) != 0 {
            let now = self.clock.now_ns();
            let into = self.guest_ns(now).rem_euclid(NS_PER_SEC);
            Some(now.saturating_add((NS_PER_SEC - into) as u64))
        } else {
            None
        };
        match (self.state.next_periodic_ns, second) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn data(&self, i: usize) -> u8 {
        self.state.data.get(i).copied().unwrap_or(0)
    }

    fn running(&self) -> bool {
        self.data(REG_B) & B_SET == 0 && self.data(REG_A) & 0x70 <= 0x20
    }

    /// The guest's calendar in ns since the epoch at virtual time `now`.
    fn guest_ns(&self, now: u64) -> i128 {
        i128::from(self.state.base_secs) * NS_PER_SEC
            + i128::from(self.state.base_subsec_ns)
            + i128::from(now.saturating_sub(self.state.base_ns))
    }

    fn guest_secs(&self, now: u64) -> i64 {
        let s = self.guest_ns(now).div_euclid(NS_PER_SEC);
        i64::try_from(s).unwrap_or(i64::MAX)
    }

    /// A clock field in the format register B selects (BCD or binary).
    fn encode(&self, v: i64) -> u8 {
        if self.data(REG_B) & B_DM_BINARY != 0 {
            v as u8
        } else {
            (((v / 10) << 4) | (v % 10)) as u8
        }
    }

    /// A clock register's value, read in the format register B selects.
    fn decode(&self, v: u8) -> i64 {
        if self.data(REG_B) & B_DM_BINARY != 0 {
            i64::from(v)
        } else {
            i64::from(v >> 4) * 10 + i64::from(v & 0x0F)
        }
    }

    /// Decodes an hour register (or the hour alarm) in the current format.
    fn decode_hour(&self, v: u8) -> i64 {
        let mut h = self.decode(v & 0x7F);
        if self.data(REG_B) & B_24H == 0 {
            h %= 12;
            if v & 0x80 != 0 {
                h += 12;
            }
        }
        h
    }

    /// Writes the clock registers for calendar second `secs`.
    fn store_time(&mut self, secs: i64) {
        let tm = Tm::from_unix(secs);
        let hour = if self.data(REG_B) & B_24H != 0 {
            self.encode(tm.hour)
        } else {
            let h = if tm.hour % 12 == 0 { 12 } else { tm.hour % 12 };
            self.encode(h) | if tm.hour >= 12 { 0x80 } else { 0 }
        };
        let regs = [
            (SECONDS, self.encode(tm.sec)),
            (MINUTES, self.encode(tm.min)),
            (HOURS, hour),
            (DAY_OF_WEEK, self.encode(tm.wday + 1)),
            (DAY_OF_MONTH, self.encode(tm.day)),
            (MONTH, self.encode(tm.month)),
            (YEAR, self.encode(tm.year.rem_euclid(100))),
            (CENTURY, self.encode(tm.year.div_euclid(100).rem_euclid(100))),
        ];
        for (i, v) in regs {
            self.state.data[i] = v;
        }
    }

    /// The calendar second the clock registers hold.
    fn load_time(&self) -> i64 {
        Tm {
            year: self.decode(self.data(YEAR)) + self.decode(self.data(CENTURY)) * 100,
            month: self.decode(self.data(MONTH)),
            day: self.decode(self.data(DAY_OF_MONTH)),
            hour: self.decode_hour(self.data(HOURS)),
            min: self.decode(self.data(MINUTES)),
            sec: self.decode(self.data(SECONDS)),
            wday: 0,
        }
        .to_unix()
    }

    /// Makes the registers show the calendar now, if the clock runs.
    fn refresh(&mut self, now: u64) {
        if self.running() {
            let secs = self.guest_secs(now);
            self.store_time(secs);
        }
    }

    /// Moves the calendar to what the registers hold, at `now`.
    fn rebase(&mut self, now: u64, subsec_ns: u32) {
        let secs = self.load_time();
        self.state.base_secs = secs;
        self.state.base_subsec_ns = subsec_ns;
        self.state.base_ns = now;
        self.state.last_update_sec = secs;
    }

    fn subsec(&self, now: u64) -> u32 {
        self.guest_ns(now).rem_euclid(NS_PER_SEC) as u32
    }

    /// Sets UF (and AF on an alarm match) once per calendar second passed.
    fn check_update(&mut self, now: u64) {
        if !self.running() {
            return;
        }
        let cur = self.guest_secs(now);
        if cur < self.state.last_update_sec {
            self.state.last_update_sec = cur;
        }
        if cur == self.state.last_update_sec {
            return;
        }
        self.state.last_update_sec = cur;
        self.store_time(cur);
        let mut flags = C_UF;
        if self.alarm_matches(cur) {
            flags |= C_AF;
        }
        let new = flags & !self.data(REG_C);
        self.state.data[REG_C] |= flags;
        if new & self.data(REG_B) != 0 {
            self.state.data[REG_C] |= C_IRQF;
        }
    }

    fn alarm_matches(&self, secs: i64) -> bool {
        let tm = Tm::from_unix(secs);
        let dont_care = |v: u8| v & 0xC0 == 0xC0;
        let (sa, ma, ha) = (
            self.data(SECONDS_ALARM),
            self.data(MINUTES_ALARM),
            self.data(HOURS_ALARM),
        );
        (dont_care(sa) || self.decode(sa) == tm.sec)
            && (dont_care(ma) || self.decode(ma) == tm.min)
            && (dont_care(ha) || self.decode_hour(ha) == tm.hour)
    }

    /// The periodic interval in 32.768 kHz cycles, 0 when off.
    fn period_cycles(&self) -> u128 {
        if self.data(REG_B) & B_PIE == 0 {
            return 0;
        }
        match self.data(REG_A) & 0x0F {
            0 => 0,
            c @ 1..=2 => 1 << (c + 6),
            c => 1 << (c - 1),
        }
    }

    /// Schedules the next periodic tick after `now` on the 32.768 kHz grid.
    fn schedule_periodic(&mut self, now: u64) {
        let period = self.period_cycles();
        self.state.next_periodic_ns = (period != 0).then(|| {
            let cycles = u128::from(now) * RTC_HZ / NS_PER_SEC as u128;
            let next = (cycles / period + 1) * period;
            let ns = next * NS_PER_SEC as u128 / RTC_HZ + 1;
            u64::try_from(ns).unwrap_or(u64::MAX)
        });
    }

    fn update_line(&mut self) {
        let high = self.data(REG_C) & C_IRQF != 0;
        if high != self.line_high {
            self.line_high = high;
            self.irq.set_level(RTC_IRQ, high);
        }
    }

    fn read_data(&mut self) -> u8 {
        let now = self.clock.now_ns();
        let mut i = usize::from(self.state.index) % NVRAM_LEN;
        if i == PS2_CENTURY {
            self.state.index = CENTURY as u8;
            i = CENTURY;
        }
        match i {
            SECONDS | MINUTES | HOURS | DAY_OF_WEEK | DAY_OF_MONTH | MONTH | YEAR | CENTURY => {
                self.refresh(now);
                self.data(i)
            }
            REG_A => {
                let uip = self.running() && self.guest_ns(now).rem_euclid(NS_PER_SEC) >= NS_PER_SEC - UIP_HOLD_NS;
                self.data(REG_A) | if uip { A_UIP } else { 0 }
            }
            REG_C => {
                self.check_update(now);
                let v = self.data(REG_C);
                self.state.data[REG_C] = 0;
                self.update_line();
                v
            }
            _ => self.data(i),
        }
    }

    fn write_data(&mut self, v: u8) {
        let now = self.clock.now_ns();
        let mut i = usize::from(self.state.index) % NVRAM_LEN;
        if i == PS2_CENTURY {
            self.state.index = CENTURY as u8;
            i = CENTURY;
        }
        match i {
            SECONDS | MINUTES | HOURS | DAY_OF_WEEK | DAY_OF_MONTH | MONTH | YEAR | CENTURY => {
                if self.running() {
                    // Bring the other registers up to date first, so that
                    // setting one field keeps the others.
                    let sub = self.subsec(now);
                    self.refresh(now);
                    self.state.data[i] = v;
                    self.rebase(now, sub);
                } else {
                    self.state.data[i] = v;
                }
            }
            REG_A => {
                let old = self.data(REG_A);
                if v & 0x60 == 0x60 {
                    // Divider held in reset: the clock stops.
                    self.refresh(now);
                } else if old & 0x60 == 0x60 && v & 0x70 <= 0x20 && self.data(REG_B) & B_SET == 0 {
                    // The first update comes half a second after the reset ends.
                    self.rebase(now, 500_000_000);
                }
                self.state.data[REG_A] = v & !A_UIP;
                if (old ^ v) & 0x0F != 0 {
                    self.schedule_periodic(now);
                }
            }
            REG_B => {
                let old = self.data(REG_B);
                let mut v = v;
                if v & B_SET != 0 {
                    self.refresh(now);
                    v &= !B_UIE;
                } else if old & B_SET != 0 && self.data(REG_A) & 0x70 <= 0x20 {
                    let sub = self.subsec(now);
                    self.rebase(now, sub);
                }
                if v & self.data(REG_C) & C_MASK != 0 {
                    self.state.data[REG_C] |= C_IRQF;
                } else {
                    self.state.data[REG_C] &= !C_IRQF;
                }
                self.state.data[REG_B] = v;
                if (old ^ v) & B_PIE != 0 {
                    self.schedule_periodic(now);
                }
                self.update_line();
            }
            REG_C | REG_D => {}
            _ => self.state.data[i] = v,
        }
    }
}

impl BusDevice for Cmos {
    /// Even ports are the index (reads all-ones, as QEMU), odd ports the
    /// data. Wider accesses are split into bytes at consecutive ports.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let rel = offset.saturating_add(i as u64);
            *d = if rel < 2 && base.wrapping_add(rel) & 1 == 1 {
                self.read_data()
            } else {
                0xFF
            };
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<BusEvent> {
        for (i, &v) in data.iter().enumerate() {
            let rel = offset.saturating_add(i as u64);
            if rel >= 2 {
                break;
            }
            if base.wrapping_add(rel) & 1 == 0 {
                self.state.index = v & 0x7F;
            } else {
                self.write_data(v);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{FixedWallClock, ManualClock, RecordingSink};
    use proptest::prelude::*;

    /// 2026-11-27 23:59:59 UTC.
    const NOV27_2359: i64 = 1_795_823_999;

    fn rtc(secs: i64) -> (Cmos, Arc<ManualClock>, Arc<RecordingSink>) {
        let clock = Arc::new(ManualClock::new(5_000));
        let sink = Arc::new(RecordingSink::default());
        let c = Cmos::new(&FixedWallClock(secs), 512 * MIB, 0, clock.clone(), sink.clone());
        (c, clock, sink)
    }

    fn rd(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0x70, 0, &[reg]);
        let mut b = [0u8];
        c.read(0x70, 1, &mut b);
        b[0]
    }

    fn wr(c: &mut Cmos, reg: u8, v: u8) {
        c.write(0x70, 0, &[reg]);
        c.write(0x70, 1, &[v]);
    }

    /// Reads the clock in BCD/24h as (year, month, day, hour, min, sec, wday).
    fn read_bcd(c: &mut Cmos) -> [u8; 8] {
        [0x32, 0x09, 0x08, 0x07, 0x04, 0x02, 0x00, 0x06].map(|r| rd(c, r))
    }

    #[test]
    fn calendar_helpers_agree() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(Tm::from_unix(NOV27_2359).to_unix(), NOV27_2359);
    }

    #[test]
    fn known_date_rolls_over_midnight() {
        let (mut c, clock, _) = rtc(NOV27_2359);
        // century, year, month, day, hour, minute, second, day of week
        assert_eq!(read_bcd(&mut c), [0x20, 0x26, 0x11, 0x27, 0x23, 0x59, 0x59, 0x06]);
        clock.advance(999_999_999);
        assert_eq!(rd(&mut c, 0), 0x59);
        clock.advance(1);
        assert_eq!(read_bcd(&mut c), [0x20, 0x26, 0x11, 0x28, 0x00, 0x00, 0x00, 0x07]);
    }

    #[test]
    fn binary_and_12_hour_formats() {
        let (mut c, clock, _) = rtc(NOV27_2359 - 12 * 3600); // 11:59:59
        wr(&mut c, 0x0B, B_DM_BINARY | B_24H);
        assert_eq!(rd(&mut c, 4), 11);
        assert_eq!(rd(&mut c, 2), 59);
        assert_eq!(rd(&mut c, 9), 26);
        assert_eq!(rd(&mut c, 0x32), 20);
        wr(&mut c, 0x0B, B_DM_BINARY);
        assert_eq!(rd(&mut c, 4), 11, "11 AM");
        clock.advance(1_000_000_000);
        assert_eq!(rd(&mut c, 4), 0x80 | 12, "12 PM");
        wr(&mut c, 0x0B, 0);
        clock.advance(3600 * 1_000_000_000);
        assert_eq!(rd(&mut c, 4), 0x81, "1 PM in BCD");
        clock.advance(11 * 3600 * 1_000_000_000);
        assert_eq!(rd(&mut c, 4), 0x12, "12 AM");
    }

    #[test]
    fn set_bit_freezes_and_sets_the_time() {
        let (mut c, clock, _) = rtc(NOV27_2359);
        wr(&mut c, 0x0B, B_SET | B_24H);
        clock.advance(5_000_000_000);
        assert_eq!(rd(&mut c, 0), 0x59, "frozen while SET");
        // Set 2031-02-03 04:05:06.
        for (r, v) in [
            (0x32, 0x20),
            (9, 0x31),
            (8, 0x02),
            (7, 0x03),
            (4, 0x04),
            (2, 0x05),
            (0, 0x06),
        ] {
            wr(&mut c, r, v);
        }
        clock.advance(3_000_000_000);
        assert_eq!(rd(&mut c, 0), 0x06, "still frozen");
        wr(&mut c, 0x0B, B_24H);
        clock.advance(2_000_000_000);
        assert_eq!(read_bcd(&mut c)[..7], [0x20, 0x31, 0x02, 0x03, 0x04, 0x05, 0x08]);
        // A restored RTC continues the same calendar.
        let st = c.state();
        let mut r = Cmos::from_state(&st, clock.clone(), Arc::new(RecordingSink::default())).unwrap();
        clock.advance(60_000_000_000);
        assert_eq!(rd(&mut r, 2), 0x06);
        assert_eq!(rd(&mut r, 0), 0x08);
    }

    #[test]
    fn writing_one_field_while_running_keeps_the_others() {
        let (mut c, clock, _) = rtc(NOV27_2359);
        clock.advance(2_000_000_000); // 2026-11-28 00:00:01
        wr(&mut c, 0x04, 0x10);
        clock.advance(1_000_000_000);
        assert_eq!(read_bcd(&mut c)[..7], [0x20, 0x26, 0x11, 0x28, 0x10, 0x00, 0x02]);
    }

    #[test]
    fn uip_in_the_last_244us_of_each_second() {
        let (mut c, clock, _) = rtc(NOV27_2359);
        assert_eq!(rd(&mut c, 0x0A), 0x26);
        clock.advance(1_000_000_000 - 244_141);
        assert_eq!(rd(&mut c, 0x0A), 0x26);
        clock.advance(2);
        assert_eq!(rd(&mut c, 0x0A), 0xA6);
        clock.advance(244_139);
        assert_eq!(rd(&mut c, 0x0A), 0x26);
        wr(&mut c, 0x0A, 0xFF);
        assert_eq!(rd(&mut c, 0x0A) & 0x80, 0, "UIP is read-only");
    }

    #[test]
    fn register_c_clears_on_read_and_d_is_valid() {
        let (mut c, clock, sink) = rtc(NOV27_2359);
        assert_eq!(rd(&mut c, 0x0D), 0x80);
        wr(&mut c, 0x0D, 0);
        assert_eq!(rd(&mut c, 0x0D), 0x80);
        wr(&mut c, 0x05, 0x05); // alarm at 05:00:00, not at the midnight ahead
        wr(&mut c, 0x0B, B_24H | B_UIE);
        assert_eq!(c.next_deadline_ns(), Some(1_000_005_000));
        clock.advance(1_000_000_000);
        c.poll();
        assert_eq!(sink.changes(), vec![(RTC_IRQ, true)]);
        assert_eq!(rd(&mut c, 0x0C), C_IRQF | C_UF);
        assert_eq!(sink.changes(), vec![(RTC_IRQ, true), (RTC_IRQ, false)]);
        assert_eq!(rd(&mut c, 0x0C), 0);
        // UF without UIE is a flag only.
        wr(&mut c, 0x0B, B_24H);
        clock.advance(1_000_000_000);
        c.poll();
        assert_eq!(sink.rising_edges(RTC_IRQ), 1);
        assert_eq!(rd(&mut c, 0x0C), C_UF);
    }

    #[test]
    fn alarm_fires_at_its_second() {
        let (mut c, clock, sink) = rtc(NOV27_2359);
        wr(&mut c, 0x01, 0x05); // hh:mm:05
        wr(&mut c, 0x03, 0xC0);
        wr(&mut c, 0x05, 0xFF);
        wr(&mut c, 0x0B, B_24H | B_AIE);
        for _ in 0..5 {
            let d = c.next_deadline_ns().unwrap();
            clock.set(d);
            c.poll();
        }
        assert_eq!(sink.rising_edges(RTC_IRQ), 0);
        let d = c.next_deadline_ns().unwrap();
        clock.set(d);
        c.poll();
        assert_eq!(sink.rising_edges(RTC_IRQ), 1);
        assert_eq!(rd(&mut c, 0x0C), C_IRQF | C_AF | C_UF);
        assert_eq!(rd(&mut c, 0x00), 0x05);
    }

    #[test]
    fn periodic_interrupt_rate() {
        for (rate, hz) in [(6u8, 1024usize), (0x0F, 2), (3, 8192)] {
            let (mut c, clock, sink) = rtc(NOV27_2359);
            wr(&mut c, 0x0A, 0x20 | rate);
            assert_eq!(c.next_deadline_ns(), None, "no PIE, no timer");
            wr(&mut c, 0x0B, B_24H | B_PIE);
            let end = clock.now_ns() + 1_000_000_000;
            while let Some(d) = c.next_deadline_ns() {
                if d > end {
                    break;
                }
                clock.set(d);
                c.poll();
                assert_eq!(rd(&mut c, 0x0C) & (C_IRQF | C_PF), C_IRQF | C_PF);
            }
            let edges = sink.rising_edges(RTC_IRQ);
            assert!(edges.abs_diff(hz) <= 1, "rate {rate}: {edges} interrupts, want {hz}");
        }
    }

    #[test]
    fn enabling_an_interrupt_whose_flag_is_set_raises_at_once() {
        let (mut c, clock, sink) = rtc(NOV27_2359);
        wr(&mut c, 0x0B, B_24H | B_UIE);
        clock.advance(1_000_000_000);
        c.poll();
        assert_eq!(sink.rising_edges(RTC_IRQ), 1);
        wr(&mut c, 0x0B, B_24H);
        assert_eq!(sink.changes().last(), Some(&(RTC_IRQ, false)));
        wr(&mut c, 0x0B, B_24H | B_UIE);
        assert_eq!(sink.rising_edges(RTC_IRQ), 2);
    }

    #[test]
    fn memory_size_bytes_follow_qemu() {
        let clock = Arc::new(ManualClock::new(0));
        let sink = Arc::new(RecordingSink::default());
        let mut c = Cmos::new(&FixedWallClock(0), 3 * 1024 * MIB, 6 * 1024 * MIB, clock, sink);
        let w = |c: &mut Cmos, r: u8| u32::from(rd(c, r)) | u32::from(rd(c, r + 1)) << 8;
        assert_eq!(w(&mut c, 0x15), 640);
        assert_eq!(w(&mut c, 0x17), 0xFFFF);
        assert_eq!(w(&mut c, 0x30), 0xFFFF);
        assert_eq!(w(&mut c, 0x34), (3 * 1024 - 16) * 16);
        let high = u32::from(rd(&mut c, 0x5B)) | u32::from(rd(&mut c, 0x5C)) << 8 | u32::from(rd(&mut c, 0x5D)) << 16;
        assert_eq!(high, 6 * 1024 * 16);

        let clock = Arc::new(ManualClock::new(0));
        let sink = Arc::new(RecordingSink::default());
        let mut small = Cmos::new(&FixedWallClock(0), 32 * MIB, 0, clock, sink);
        assert_eq!(w(&mut small, 0x15), 640);
        assert_eq!(w(&mut small, 0x17), 31 * 1024);
        assert_eq!(w(&mut small, 0x34), 16 * 16);
        assert_eq!(rd(&mut small, 0x5B), 0);
    }

    #[test]
    fn nvram_index_ignores_nmi_bit_and_wide_access() {
        let (mut c, _, _) = rtc(0);
        c.write(0x70, 0, &[0x80 | 0x40]);
        c.write(0x70, 1, &[0xAB]);
        assert_eq!(rd(&mut c, 0x40), 0xAB);
        // A word write sets the index and the data in one go.
        c.write(0x70, 0, &[0x41, 0xCD]);
        assert_eq!(rd(&mut c, 0x41), 0xCD);
        let mut d = [0u8; 2];
        c.write(0x70, 0, &[0x41]);
        c.read(0x70, 0, &mut d);
        assert_eq!(d, [0xFF, 0xCD]);
        c.read(0x70, 7, &mut d);
        assert_eq!(d, [0xFF, 0xFF]);
        // 0x37 is the PS/2 alias of the century.
        assert_eq!(rd(&mut c, 0x37), 0x19);
        assert_eq!(
            Cmos::from_state(
                &CmosState {
                    data: vec![0; 3],
                    ..c.state()
                },
                Arc::new(ManualClock::new(0)),
                Arc::new(RecordingSink::default())
            )
            .err(),
            Some(CmosError::BadNvramLength(3))
        );
    }

    /// The straightforward conversion the calendar is checked against.
    fn reference_date(secs: i64) -> (i64, i64, i64, i64, i64, i64) {
        let mut days = secs / 86_400;
        let sod = secs % 86_400;
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let mut year = 1970;
        loop {
            let n = if leap(year) { 366 } else { 365 };
            if days < n {
                break;
            }
            days -= n;
            year += 1;
        }
        let lens = [
            31,
            if leap(year) { 29 } else { 28 },
            31,
            30,
            31,
            30,
            31,
            31,
            30,
            31,
            30,
            31,
        ];
        let mut month = 1;
        for l in lens {
            if days < l {
                break;
            }
            days -= l;
            month += 1;
        }
        (year, month, days + 1, sod / 3600, sod / 60 % 60, sod % 60)
    }

    proptest! {
        /// For any start date in 1970-2199 and any virtual time after it, the
        /// registers read (binary, 24 h) are the reference date.
        #[test]
        fn date_matches_reference(
            start in 0i64..7_258_118_400 - 10 * 86_400,
            elapsed_ns in 0u64..5 * 86_400 * 1_000_000_000,
            binary in any::<bool>(),
        ) {
            let (mut c, clock, _) = rtc(start);
            if binary {
                wr(&mut c, 0x0B, B_24H | B_DM_BINARY);
            }
            clock.advance(elapsed_ns);
            let secs = start + (elapsed_ns / 1_000_000_000) as i64;
            let dec = |v: u8| if binary { i64::from(v) } else { i64::from(v >> 4) * 10 + i64::from(v & 15) };
            let r = read_bcd(&mut c).map(dec);
            let (y, mo, d, h, mi, s) = reference_date(secs);
            prop_assert_eq!([r[0] * 100 + r[1], r[2], r[3], r[4], r[5], r[6]], [y, mo, d, h, mi, s]);
            prop_assert_eq!(r[7], (secs / 86_400 + 4) % 7 + 1);
        }

        /// Any access sequence leaves 128 bytes of NVRAM and never panics.
        #[test]
        fn any_access_is_safe(ops in prop::collection::vec((0u64..3, any::<u8>(), any::<bool>(), 0u64..3_000_000_000), 0..200)) {
            let (mut c, clock, _) = rtc(NOV27_2359);
            for (off, v, w, dt) in ops {
                clock.advance(dt);
                if w { c.write(0x70, off, &[v, v]); } else { let mut d = [0u8; 2]; c.read(0x70, off, &mut d); }
                c.poll();
                let _ = c.next_deadline_ns();
                prop_assert_eq!(c.state().data.len(), NVRAM_LEN);
            }
        }
    }
}
