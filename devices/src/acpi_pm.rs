//! The ACPI power-management block of a PIIX4-like chipset at the I/O
//! addresses SeaBIOS gives QEMU's `pc` machine, after QEMU 7.2's
//! `hw/acpi/core.c`, `piix4.c` and `hw/isa/apm.c`, plus a small read-only
//! block of platform sensors that the DSDT's AML reads.
//!
//! | ports           | register                                                |
//! |-----------------|---------------------------------------------------------|
//! | 0x600-0x603     | PM1a_EVT_BLK: PM1_STS (write 1 to clear), PM1_EN        |
//! | 0x604-0x605     | PM1a_CNT_BLK: PM1_CNT (SCI_EN, SLP_TYP, SLP_EN)         |
//! | 0x608-0x60B     | PM_TMR_BLK: 24-bit counter at 3.579545 MHz              |
//! | 0x610-0x617     | Nyx sensor block, read-only (see [`SENSOR_BLK`])        |
//! | 0xAFE0-0xAFE3   | GPE0_BLK: GPE0_STS (write 1 to clear), GPE0_EN          |
//! | 0xB2-0xB3       | APM control (SMI_CMD) and status                        |
//!
//! Access sizes follow QEMU's memory core: an access is split into aligned
//! pieces no wider than the block allows (2 bytes for PM1, 4 otherwise),
//! each piece is widened to the register's width (PM1 registers are read
//! and written as words, the timer as a dword, GPE, APM and sensor bytes
//! one at a time), and bytes outside every block read 0xFF. So a byte write
//! to 0x601 changes nothing, as under QEMU.
//!
//! The SCI (IRQ 9, a level) is high while SCI_EN is set and an enabled
//! PM1 status bit (timer, global lock, power button, sleep button, RTC) or
//! an enabled GPE0 status bit is set. SCI_EN is set and cleared by writing
//! [`ACPI_ENABLE`] / [`ACPI_DISABLE`] to SMI_CMD; it is clear at power-on.
//!
//! Sleep: writing SLP_EN with SLP_TYP 0 (S5) or 2 (S4) returns
//! [`BusEvent::PowerOff`]; SLP_TYP 1 (S3) and 3 (S1, Nyx's choice: QEMU has
//! no S1) return [`BusEvent::Sleep`] with the S-state and leave the device
//! asleep until a [`PlatformEvent::Wake`] or [`PlatformEvent::PowerButton`]
//! arrives; that sets WAK_STS and PWRBTN_STS (QEMU's "other" wake reason)
//! and [`AcpiPm::take_wake`] then reports the wake once.
//!
//! Events from outside (buttons, lid, battery, temperature) arrive as bytes
//! on an [`Input`] in the framing of [`PlatformEvent::encode`] and are taken
//! in [`AcpiPm::poll`]. Lid, battery and temperature changes update the
//! sensor block and set GPE0 status bits 0, 1 and 2 ([`GPE_LID`],
//! [`GPE_BATTERY`], [`GPE_THERMAL`]) for the DSDT's `_E00`-`_E02`.

use crate::bus::{BusDevice, BusEvent};
use crate::io::{Clock, Input, InterruptSink};
use std::sync::Arc;

/// The PM timer's input clock.
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// PM1a_EVT_BLK: PM1_STS at +0, PM1_EN at +2.
pub const PM1_EVT_BLK: u16 = 0x600;
/// Length of PM1a_EVT_BLK.
pub const PM1_EVT_LEN: u16 = 4;
/// PM1a_CNT_BLK.
pub const PM1_CNT_BLK: u16 = 0x604;
/// Length of PM1a_CNT_BLK.
pub const PM1_CNT_LEN: u16 = 2;
/// PM_TMR_BLK.
pub const PM_TMR_BLK: u16 = 0x608;
/// Length of PM_TMR_BLK.
pub const PM_TMR_LEN: u16 = 4;
/// The Nyx sensor block, read-only: byte 0 lid (1 open, 0 closed), byte 1
/// battery charge in percent (0-100), byte 2 flags (bit 0: on external
/// power, charging), byte 3 zero, bytes 4-5 the temperature in tenths of a
/// kelvin (little-endian), bytes 6-7 zero.
pub const SENSOR_BLK: u16 = 0x610;
/// Length of the sensor block.
pub const SENSOR_LEN: u16 = 8;
/// Offset of the lid byte in the sensor block.
pub const SENSOR_LID: u16 = 0;
/// Offset of the battery-percent byte in the sensor block.
pub const SENSOR_BATTERY: u16 = 1;
/// Offset of the flags byte in the sensor block.
pub const SENSOR_FLAGS: u16 = 2;
/// Offset of the temperature word (tenths of a kelvin) in the sensor block.
pub const SENSOR_TEMP: u16 = 4;
/// Sensor flags bit: on external power (the AC adapter's state and the
/// battery's charging state).
pub const SENSOR_FLAG_CHARGING: u8 = 1 << 0;
/// GPE0_BLK: GPE0_STS at +0 (2 bytes), GPE0_EN at +2 (2 bytes).
pub const GPE0_BLK: u16 = 0xAFE0;
/// Length of GPE0_BLK.
pub const GPE0_LEN: u16 = 4;
/// SMI_CMD (APM control); the APM status byte follows it.
pub const SMI_CMD: u16 = 0xB2;
/// Length of the APM ports.
pub const APM_LEN: u16 = 2;
/// The SMI_CMD value that sets SCI_EN.
pub const ACPI_ENABLE: u8 = 0xF1;
/// The SMI_CMD value that clears SCI_EN.
pub const ACPI_DISABLE: u8 = 0xF0;
/// The interrupt line of the SCI.
pub const SCI_IRQ: u8 = 9;

/// Every `(base, len)` port range the device decodes; register the device
/// at each.
pub const ACPI_PM_PORTS: &[(u16, u16)] = &[
    (PM1_EVT_BLK, PM1_EVT_LEN),
    (PM1_CNT_BLK, PM1_CNT_LEN),
    (PM_TMR_BLK, PM_TMR_LEN),
    (SENSOR_BLK, SENSOR_LEN),
    (GPE0_BLK, GPE0_LEN),
    (SMI_CMD, APM_LEN),
];

/// SLP_TYP of S5 (soft off), as QEMU's DSDT.
pub const SLP_TYP_S5: u8 = 0;
/// SLP_TYP of S3 (suspend to RAM), as QEMU's DSDT.
pub const SLP_TYP_S3: u8 = 1;
/// SLP_TYP of S4 (suspend to disk), as QEMU's DSDT (its `s4_val` default).
pub const SLP_TYP_S4: u8 = 2;
/// SLP_TYP of S1 (standby): Nyx's choice, QEMU has none.
pub const SLP_TYP_S1: u8 = 3;

/// PM1_STS: the timer's bit 23 changed.
pub const TMR_STS: u16 = 1 << 0;
/// PM1_STS: bus master activity.
pub const BM_STS: u16 = 1 << 4;
/// PM1_STS: the firmware released the global lock.
pub const GBL_STS: u16 = 1 << 5;
/// PM1_STS: the power button was pressed.
pub const PWRBTN_STS: u16 = 1 << 8;
/// PM1_STS: the sleep button was pressed.
pub const SLPBTN_STS: u16 = 1 << 9;
/// PM1_STS: RTC alarm.
pub const RTC_STS: u16 = 1 << 10;
/// PM1_STS: the machine woke from a sleep state.
pub const WAK_STS: u16 = 1 << 15;
/// PM1_EN: timer overflow interrupt enable.
pub const TMR_EN: u16 = 1 << 0;
/// PM1_EN: power button enable.
pub const PWRBTN_EN: u16 = 1 << 8;
/// PM1_EN: sleep button enable.
pub const SLPBTN_EN: u16 = 1 << 9;
/// PM1_EN: the RTC alarm may wake the machine (RTC_EN).
pub const RTC_EN: u16 = 1 << 10;
/// PM1_CNT: events go to the SCI.
pub const SCI_EN: u16 = 1 << 0;
/// PM1_CNT: enter the sleep state in SLP_TYP.
pub const SLP_EN: u16 = 1 << 13;
/// PM1_CNT: position of SLP_TYP (3 bits).
pub const SLP_TYP_SHIFT: u16 = 10;
/// The PM1 status bits that raise the SCI when enabled.
pub const PM1_SCI_BITS: u16 = TMR_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS;
/// GPE0 bit of a lid change (`_E00`).
pub const GPE_LID: u16 = 1 << 0;
/// GPE0 bit of a battery change (`_E01`).
pub const GPE_BATTERY: u16 = 1 << 1;
/// GPE0 bit of a temperature change (`_E02`).
pub const GPE_THERMAL: u16 = 1 << 2;

const NS_PER_S: u64 = 1_000_000_000;
/// TMR_STS is set each time bit 23 of the counter changes.
const TMR_HALF_PERIOD: u64 = 1 << 23;
/// Bytes taken from the event input per poll.
const INPUT_CHUNK: usize = 64;

/// The PM timer's count at virtual time `ns` (not yet cut to 24 bits).
pub fn ns_to_ticks(ns: u64) -> u64 {
    // Fits: 2^64 * PM_TIMER_HZ / 10^9 < 2^64.
    (u128::from(ns) * u128::from(PM_TIMER_HZ) / u128::from(NS_PER_S)) as u64
}

/// The first virtual time at which [`ns_to_ticks`] reaches `ticks`.
pub fn ticks_to_ns_ceil(ticks: u64) -> u64 {
    let ns = (u128::from(ticks) * u128::from(NS_PER_S)).div_ceil(u128::from(PM_TIMER_HZ));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// Something that happened outside the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PlatformEvent {
    /// The power button was pressed (wakes a sleeping machine).
    PowerButton,
    /// The sleep button was pressed.
    SleepButton,
    /// A wake event for a sleeping machine (ignored while awake).
    Wake,
    /// The lid was opened (`true`) or closed.
    Lid(bool),
    /// The battery's charge and whether it is on external power.
    Battery {
        /// Charge in percent; values above 100 are taken as 100.
        percent: u8,
        /// On external power (AC online, charging).
        charging: bool,
    },
    /// The temperature of the thermal zone in °C.
    Temperature(i16),
}

const TAG_POWER_BUTTON: u8 = 1;
const TAG_SLEEP_BUTTON: u8 = 2;
const TAG_WAKE: u8 = 3;
const TAG_LID: u8 = 4;
const TAG_BATTERY: u8 = 5;
const TAG_TEMPERATURE: u8 = 6;
/// The longest frame: tag, length, 255 payload bytes.
const MAX_FRAME: usize = 2 + 255;

impl PlatformEvent {
    /// The event as a frame: a tag byte, a payload length byte, the
    /// payload. Tags: 1 power button, 2 sleep button, 3 wake (no payload);
    /// 4 lid (1 byte, nonzero = open); 5 battery (percent, then nonzero =
    /// charging); 6 temperature (°C as a little-endian i16).
    pub fn encode(&self) -> Vec<u8> {
        match *self {
            Self::PowerButton => vec![TAG_POWER_BUTTON, 0],
            Self::SleepButton => vec![TAG_SLEEP_BUTTON, 0],
            Self::Wake => vec![TAG_WAKE, 0],
            Self::Lid(open) => vec![TAG_LID, 1, u8::from(open)],
            Self::Battery { percent, charging } => vec![TAG_BATTERY, 2, percent, u8::from(charging)],
            Self::Temperature(c) => {
                let [lo, hi] = c.to_le_bytes();
                vec![TAG_TEMPERATURE, 2, lo, hi]
            }
        }
    }

    /// The event of one whole frame, or `None` for an unknown tag or a
    /// payload of the wrong length.
    fn from_frame(tag: u8, payload: &[u8]) -> Option<Self> {
        match (tag, payload) {
            (TAG_POWER_BUTTON, []) => Some(Self::PowerButton),
            (TAG_SLEEP_BUTTON, []) => Some(Self::SleepButton),
            (TAG_WAKE, []) => Some(Self::Wake),
            (TAG_LID, [open]) => Some(Self::Lid(*open != 0)),
            (TAG_BATTERY, [percent, charging]) => Some(Self::Battery {
                percent: *percent,
                charging: *charging != 0,
            }),
            (TAG_TEMPERATURE, [lo, hi]) => Some(Self::Temperature(i16::from_le_bytes([*lo, *hi]))),
            _ => None,
        }
    }
}

/// Turns a byte stream cut anywhere into [`PlatformEvent`]s. Frames with
/// an unknown tag or a payload of the wrong length are skipped whole; an
/// incomplete frame waits for its remaining bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventDecoder {
    pending: Vec<u8>,
}

impl EventDecoder {
    /// A decoder at a frame boundary.
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder holding `pending`, the start of a frame. Fails when
    /// `pending` already holds a whole frame (no decoder leaves one).
    pub fn with_pending(pending: Vec<u8>) -> Result<Self, String> {
        if pending.len() >= 2 && pending.len() >= 2 + usize::from(pending[1]) {
            return Err(format!(
                "event decoder state holds {} bytes, a whole frame; at most an incomplete one can be pending",
                pending.len()
            ));
        }
        Ok(Self { pending })
    }

    /// The bytes of the incomplete frame kept so far.
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// Takes `bytes` and returns the events of the frames they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<PlatformEvent> {
        let mut events = Vec::new();
        for &b in bytes {
            self.pending.push(b);
            if self.pending.len() >= 2 && self.pending.len() == 2 + usize::from(self.pending[1]) {
                if let Some(ev) = PlatformEvent::from_frame(self.pending[0], &self.pending[2..]) {
                    events.push(ev);
                }
                self.pending.clear();
            }
        }
        debug_assert!(self.pending.len() < MAX_FRAME);
        events
    }
}

/// What the platform's sensors read now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sensors {
    /// The lid is open.
    pub lid_open: bool,
    /// Battery charge in percent, 0-100.
    pub battery_percent: u8,
    /// On external power (AC online), the battery charging unless full.
    pub charging: bool,
    /// Thermal zone temperature in °C.
    pub temperature_c: i16,
}

impl Default for Sensors {
    /// Lid open, battery full on external power, 35 °C.
    fn default() -> Self {
        Self {
            lid_open: true,
            battery_percent: 100,
            charging: true,
            temperature_c: 35,
        }
    }
}

impl Sensors {
    /// The temperature in tenths of a kelvin, as ACPI's `_TMP` returns it
    /// (0 K and below read 0).
    pub fn temperature_dk(&self) -> u16 {
        (i32::from(self.temperature_c) * 10 + 2732).clamp(0, i32::from(u16::MAX)) as u16
    }

    /// The sensor block as the guest reads it (see [`SENSOR_BLK`]).
    pub fn block(&self) -> [u8; SENSOR_LEN as usize] {
        let [t0, t1] = self.temperature_dk().to_le_bytes();
        let flags = if self.charging { SENSOR_FLAG_CHARGING } else { 0 };
        [
            u8::from(self.lid_open),
            self.battery_percent.min(100),
            flags,
            0,
            t0,
            t1,
            0,
            0,
        ]
    }
}

/// Everything a snapshot of the PM block needs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AcpiPmState {
    /// PM1_STS (the timer bit as last latched).
    pub pm1_sts: u16,
    /// PM1_EN.
    pub pm1_en: u16,
    /// PM1_CNT (SLP_EN never stays set).
    pub pm1_cnt: u16,
    /// The timer count (unwrapped, see [`ns_to_ticks`]) at which TMR_STS is
    /// set next: the next bit-23 change after TMR_STS was last cleared, 0
    /// after a reset (so TMR_STS reads set until first cleared, as QEMU).
    pub tmr_overflow: u64,
    /// GPE0_STS.
    pub gpe0_sts: u16,
    /// GPE0_EN.
    pub gpe0_en: u16,
    /// The last byte written to SMI_CMD.
    pub apm_cnt: u8,
    /// The APM status byte (0xB3).
    pub apm_sts: u8,
    /// What the sensor block shows.
    pub sensors: Sensors,
    /// The S-state (1 or 3) the guest put the machine in, until it wakes.
    pub sleeping: Option<u8>,
    /// A wake not yet taken by [`AcpiPm::take_wake`].
    pub wake_pending: bool,
    /// The start of an event frame read from the input but not complete yet.
    pub input_pending: Vec<u8>,
}

impl Default for AcpiPmState {
    /// The power-on state: everything clear (SCI_EN too), default sensors.
    fn default() -> Self {
        Self {
            pm1_sts: 0,
            pm1_en: 0,
            pm1_cnt: 0,
            tmr_overflow: 0,
            gpe0_sts: 0,
            gpe0_en: 0,
            apm_cnt: 0,
            apm_sts: 0,
            sensors: Sensors::default(),
            sleeping: None,
            wake_pending: false,
            input_pending: Vec::new(),
        }
    }
}

impl AcpiPmState {
    /// Whether the SCI is asserted, with PM1_STS as stored.
    pub fn sci_level(&self) -> bool {
        self.pm1_cnt & SCI_EN != 0
            && (self.pm1_sts & self.pm1_en & PM1_SCI_BITS != 0 || self.gpe0_sts & self.gpe0_en != 0)
    }
}

/// The register blocks, each with QEMU's access constraints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Evt,
    Cnt,
    Tmr,
    Sensors,
    Gpe,
    Apm,
}

impl Block {
    /// The block decoding `port` and the offset into it.
    fn at(port: u64) -> Option<(Self, u64)> {
        let blocks = [Self::Evt, Self::Cnt, Self::Tmr, Self::Sensors, Self::Gpe, Self::Apm];
        ACPI_PM_PORTS
            .iter()
            .zip(blocks)
            .find(|((base, len), _)| port >= u64::from(*base) && port - u64::from(*base) < u64::from(*len))
            .map(|((base, _), b)| (b, port - u64::from(*base)))
    }

    fn len(self) -> u64 {
        let i = match self {
            Self::Evt => 0,
            Self::Cnt => 1,
            Self::Tmr => 2,
            Self::Sensors => 3,
            Self::Gpe => 4,
            Self::Apm => 5,
        };
        u64::from(ACPI_PM_PORTS[i].1)
    }

    /// The widest access the block takes (QEMU's `valid.max_access_size`).
    fn valid_max(self) -> u64 {
        match self {
            Self::Evt | Self::Cnt => 2,
            _ => 4,
        }
    }

    /// The width the registers are accessed at (QEMU's `impl` sizes).
    fn impl_size(self, len: u64) -> u64 {
        match self {
            Self::Evt | Self::Cnt => len.clamp(2, 4),
            Self::Tmr => 4,
            Self::Sensors | Self::Gpe | Self::Apm => 1,
        }
    }

    /// The bytes of an access of `left` bytes at `rel` that go to the block
    /// in one piece: aligned, within the block, no wider than it allows, a
    /// power of two (QEMU's `memory_access_size`).
    fn piece_len(self, rel: u64, left: u64) -> u64 {
        let mut max = left.min(self.len() - rel).min(self.valid_max());
        if rel != 0 {
            max = max.min(1 << rel.trailing_zeros());
        }
        1 << (63 - max.max(1).leading_zeros())
    }
}

fn width_mask(bytes: u64) -> u64 {
    if bytes >= 8 {
        u64::MAX
    } else {
        (1u64 << (bytes * 8)) - 1
    }
}

/// The ACPI PM block, SMI_CMD and the sensor block.
pub struct AcpiPm {
    state: AcpiPmState,
    decoder: EventDecoder,
    clock: Arc<dyn Clock>,
    sink: Arc<dyn InterruptSink>,
    events: Box<dyn Input>,
    line_high: bool,
}

impl std::fmt::Debug for AcpiPm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcpiPm")
            .field("state", &self.state())
            .field("line_high", &self.line_high)
            .finish_non_exhaustive()
    }
}

impl AcpiPm {
    /// A PM block in its power-on state (SCI_EN clear, SCI low) that raises
    /// the SCI on `sink` line 9 and takes platform events from `events`.
    pub fn new(clock: Arc<dyn Clock>, sink: Arc<dyn InterruptSink>, events: Box<dyn Input>) -> Self {
        Self {
            state: AcpiPmState::default(),
            decoder: EventDecoder::new(),
            clock,
            sink,
            events,
            line_high: false,
        }
    }

    /// A PM block restored from a snapshot. The SCI is assumed to be at the
    /// level the state implies (the interrupt controller is restored with
    /// it), so nothing is signalled here.
    pub fn from_state(
        state: &AcpiPmState,
        clock: Arc<dyn Clock>,
        sink: Arc<dyn InterruptSink>,
        events: Box<dyn Input>,
    ) -> Result<Self, String> {
        if state.sensors.battery_percent > 100 {
            return Err(format!(
                "ACPI PM state has a battery charge of {}%; at most 100 is possible",
                state.sensors.battery_percent
            ));
        }
        if let Some(s) = state.sleeping.filter(|s| *s != 1 && *s != 3) {
            return Err(format!(
                "ACPI PM state is asleep in S{s}; only S1 and S3 are sleep states"
            ));
        }
        if state.pm1_cnt & SLP_EN != 0 {
            return Err("ACPI PM state has SLP_EN set in PM1_CNT; it never stays set".into());
        }
        let decoder = EventDecoder::with_pending(state.input_pending.clone())?;
        let mut pm = Self::new(clock, sink, events);
        pm.state = state.clone();
        pm.state.input_pending.clear();
        pm.decoder = decoder;
        pm.line_high = state.sci_level();
        Ok(pm)
    }

    /// The snapshot of this device.
    pub fn state(&self) -> AcpiPmState {
        AcpiPmState {
            input_pending: self.decoder.pending().to_vec(),
            ..self.state.clone()
        }
    }

    /// The machine reset (QEMU's `piix4_pm_reset`): every register clear,
    /// SCI_EN too, the SCI lowered. The sensors, a pending wake and the
    /// input stream are kept.
    pub fn reset(&mut self) {
        self.state = AcpiPmState {
            sensors: self.state.sensors,
            wake_pending: self.state.wake_pending,
            ..AcpiPmState::default()
        };
        self.update_sci();
    }

    /// The S-state (1 or 3) the guest put the machine in, while it sleeps.
    pub fn sleeping(&self) -> Option<u8> {
        self.state.sleeping
    }

    /// Whether the machine woke since the last call: the run loop resumes
    /// the vCPU when this is true.
    pub fn take_wake(&mut self) -> bool {
        std::mem::take(&mut self.state.wake_pending)
    }

    /// The RTC's alarm fired with its interrupt enabled: a sleeping machine
    /// whose guest enabled the RTC as a wake source (RTC_EN) wakes with
    /// WAK_STS and RTC_STS set, as QEMU's RTC wake-up does. An awake
    /// machine, or one without RTC_EN, is not changed (QEMU sets RTC_STS
    /// only on a wake).
    pub fn rtc_alarm(&mut self) {
        if self.state.sleeping.is_some() && self.state.pm1_en & RTC_EN != 0 {
            self.wake(RTC_STS);
            self.update_sci();
        }
    }

    /// What the sensor block shows.
    pub fn sensors(&self) -> Sensors {
        self.state.sensors
    }

    /// Whether the event input can never deliver again.
    pub fn input_exhausted(&self) -> bool {
        self.events.is_exhausted()
    }

    /// Takes the platform events available on the input, latches a timer
    /// overflow that came due and updates the SCI.
    pub fn poll(&mut self) {
        let mut buf = [0u8; INPUT_CHUNK];
        let n = self.events.read_available(&mut buf).min(buf.len());
        for ev in self.decoder.push(&buf[..n]) {
            self.apply(ev);
        }
        self.update_sci();
    }

    /// The virtual time at which a timer overflow sets TMR_STS, while the
    /// overflow interrupt is enabled and TMR_STS is clear (possibly past,
    /// when no poll came since); `None` otherwise.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        (self.state.pm1_en & TMR_EN != 0 && self.state.pm1_sts & TMR_STS == 0)
            .then(|| ticks_to_ns_ceil(self.state.tmr_overflow))
    }

    /// Applies one platform event, as if it had come from the input.
    pub fn apply(&mut self, ev: PlatformEvent) {
        let s = &mut self.state;
        match ev {
            PlatformEvent::PowerButton if s.sleeping.is_some() => self.wake(PWRBTN_STS),
            PlatformEvent::Wake if s.sleeping.is_some() => self.wake(PWRBTN_STS),
            PlatformEvent::Wake => {}
            // As QEMU's acpi_pm1_evt_power_down: only while enabled.
            PlatformEvent::PowerButton => {
                if s.pm1_en & PWRBTN_EN != 0 {
                    s.pm1_sts |= PWRBTN_STS;
                }
            }
            PlatformEvent::SleepButton => {
                if s.sleeping.is_none() && s.pm1_en & SLPBTN_EN != 0 {
                    s.pm1_sts |= SLPBTN_STS;
                }
            }
            PlatformEvent::Lid(open) => {
                s.sensors.lid_open = open;
                s.gpe0_sts |= GPE_LID;
            }
            PlatformEvent::Battery { percent, charging } => {
                s.sensors.battery_percent = percent.min(100);
                s.sensors.charging = charging;
                s.gpe0_sts |= GPE_BATTERY;
            }
            PlatformEvent::Temperature(c) => {
                s.sensors.temperature_c = c;
                s.gpe0_sts |= GPE_THERMAL;
            }
        }
        self.update_sci();
    }

    /// Leaves the sleep state as QEMU's wakeup does: WAK_STS and the
    /// reason's status bit set (PWRBTN_STS for reason "other", RTC_STS for
    /// the RTC).
    fn wake(&mut self, reason: u16) {
        self.state.sleeping = None;
        self.state.wake_pending = true;
        self.state.pm1_sts |= WAK_STS | reason;
    }

    fn ticks(&self) -> u64 {
        ns_to_ticks(self.clock.now_ns())
    }

    /// PM1_STS with a due timer overflow latched (QEMU's acpi_pm1_evt_get_sts).
    fn pm1_sts(&mut self) -> u16 {
        if self.state.pm1_sts & TMR_STS == 0 && self.ticks() >= self.state.tmr_overflow {
            self.state.pm1_sts |= TMR_STS;
        }
        self.state.pm1_sts
    }

    fn update_sci(&mut self) {
        self.pm1_sts();
        let level = self.state.sci_level();
        if level != self.line_high {
            self.line_high = level;
            self.sink.set_level(SCI_IRQ, level);
        }
    }

    fn write_pm1_sts(&mut self, v: u16) {
        if self.pm1_sts() & v & TMR_STS != 0 {
            // The next bit-23 change after now.
            self.state.tmr_overflow = (self.ticks() + TMR_HALF_PERIOD) & !(TMR_HALF_PERIOD - 1);
        }
        self.state.pm1_sts &= !v;
    }

    fn write_pm1_cnt(&mut self, v: u16) -> Option<BusEvent> {
        self.state.pm1_cnt = v & !SLP_EN;
        if v & SLP_EN == 0 {
            return None;
        }
        match ((v >> SLP_TYP_SHIFT) & 7) as u8 {
            SLP_TYP_S5 | SLP_TYP_S4 => Some(BusEvent::PowerOff),
            SLP_TYP_S3 => self.sleep(3),
            SLP_TYP_S1 => self.sleep(1),
            _ => None,
        }
    }

    fn sleep(&mut self, s: u8) -> Option<BusEvent> {
        self.state.sleeping = Some(s);
        Some(BusEvent::Sleep(s))
    }

    /// One register read at `rel` in `block`, at the register's width.
    fn read_reg(&mut self, block: Block, rel: u64) -> u64 {
        match block {
            Block::Evt => match rel {
                0 => u64::from(self.pm1_sts()),
                2 => u64::from(self.state.pm1_en),
                _ => 0,
            },
            Block::Cnt => u64::from(self.state.pm1_cnt),
            Block::Tmr => self.ticks() & 0xFF_FFFF,
            Block::Sensors => u64::from(self.state.sensors.block()[rel as usize]),
            Block::Gpe => {
                let sts = self.state.gpe0_sts.to_le_bytes();
                let en = self.state.gpe0_en.to_le_bytes();
                u64::from([sts[0], sts[1], en[0], en[1]][rel as usize])
            }
            Block::Apm => u64::from(if rel == 0 {
                self.state.apm_cnt
            } else {
                self.state.apm_sts
            }),
        }
    }

    /// One register write at `rel` in `block`.
    fn write_reg(&mut self, block: Block, rel: u64, v: u64) -> Option<BusEvent> {
        let event = match block {
            Block::Evt => {
                match rel {
                    0 => self.write_pm1_sts(v as u16),
                    2 => self.state.pm1_en = v as u16,
                    _ => {}
                }
                None
            }
            Block::Cnt => self.write_pm1_cnt(v as u16),
            Block::Tmr | Block::Sensors => None,
            Block::Gpe => {
                let shift = 8 * (rel & 1);
                let bits = ((v & 0xFF) as u16) << shift;
                if rel < 2 {
                    self.state.gpe0_sts &= !bits;
                } else {
                    self.state.gpe0_en = (self.state.gpe0_en & !(0xFF << shift)) | bits;
                }
                None
            }
            Block::Apm => {
                if rel == 0 {
                    let v = v as u8;
                    self.state.apm_cnt = v;
                    // SMIs for other commands are not modelled.
                    if v == ACPI_ENABLE {
                        self.state.pm1_cnt |= SCI_EN;
                    } else if v == ACPI_DISABLE {
                        self.state.pm1_cnt &= !SCI_EN;
                    }
                } else {
                    self.state.apm_sts = v as u8;
                }
                None
            }
        };
        if !matches!(block, Block::Tmr | Block::Sensors) {
            self.update_sci();
        }
        event
    }

    /// A piece of an access within one block, widened to the register size.
    fn read_piece(&mut self, block: Block, rel: u64, len: u64) -> u64 {
        let width = block.impl_size(len);
        let mask = width_mask(width);
        let mut v = 0;
        let mut k = 0;
        while k < len {
            v |= (self.read_reg(block, rel + k) & mask) << (8 * k);
            k += width;
        }
        v & width_mask(len)
    }

    fn write_piece(&mut self, block: Block, rel: u64, len: u64, v: u64) -> Option<BusEvent> {
        let width = block.impl_size(len);
        let mask = width_mask(width);
        let mut event = None;
        let mut k = 0;
        while k < len {
            event = self.write_reg(block, rel + k, (v >> (8 * k)) & mask).or(event);
            k += width;
        }
        event
    }
}

/// Register at every range of [`ACPI_PM_PORTS`]. An access is taken apart
/// as QEMU's memory core does (see the module documentation); bytes that
/// fall outside every block read 0xFF and are ignored when written.
impl BusDevice for AcpiPm {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let port = base.wrapping_add(offset);
        let mut i = 0;
        while i < data.len() {
            let p = port.wrapping_add(i as u64);
            match Block::at(p) {
                None => {
                    data[i] = 0xFF;
                    i += 1;
                }
                Some((block, rel)) => {
                    let len = block.piece_len(rel, (data.len() - i) as u64);
                    let v = self.read_piece(block, rel, len);
                    let n = len as usize;
                    data[i..i + n].copy_from_slice(&v.to_le_bytes()[..n]);
                    i += n;
                }
            }
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<BusEvent> {
        let port = base.wrapping_add(offset);
        let mut event = None;
        let mut i = 0;
        while i < data.len() {
            let p = port.wrapping_add(i as u64);
            match Block::at(p) {
                None => i += 1,
                Some((block, rel)) => {
                    let n = block.piece_len(rel, (data.len() - i) as u64) as usize;
                    let mut bytes = [0u8; 8];
                    bytes[..n].copy_from_slice(&data[i..i + n]);
                    event = self
                        .write_piece(block, rel, n as u64, u64::from_le_bytes(bytes))
                        .or(event);
                    i += n;
                }
            }
        }
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{BufferInput, ManualClock, NoInput, RecordingSink};
    use proptest::prelude::*;
    use std::sync::Mutex;

    /// Input whose bytes the test adds while the device runs.
    #[derive(Clone, Default)]
    struct Feed(Arc<Mutex<Vec<u8>>>);

    impl Feed {
        fn send(&self, ev: PlatformEvent) {
            self.0.lock().unwrap().extend(ev.encode());
        }
    }

    impl Input for Feed {
        fn read_available(&mut self, buf: &mut [u8]) -> usize {
            let mut q = self.0.lock().unwrap();
            let n = buf.len().min(q.len());
            buf[..n].copy_from_slice(&q[..n]);
            q.drain(..n);
            n
        }
    }

    struct Rig {
        clock: Arc<ManualClock>,
        sink: Arc<RecordingSink>,
        feed: Feed,
        pm: AcpiPm,
    }

    impl Rig {
        fn new() -> Self {
            let clock = Arc::new(ManualClock::new(1_000));
            let sink = Arc::new(RecordingSink::default());
            let feed = Feed::default();
            let pm = AcpiPm::new(clock.clone(), sink.clone(), Box::new(feed.clone()));
            Self { clock, sink, feed, pm }
        }
        fn rd(&mut self, port: u16, size: usize) -> u64 {
            let mut b = [0u8; 8];
            self.pm.read(u64::from(port), 0, &mut b[..size]);
            u64::from_le_bytes(b)
        }
        fn wr(&mut self, port: u16, size: usize, v: u64) -> Option<BusEvent> {
            self.pm.write(u64::from(port), 0, &v.to_le_bytes()[..size])
        }
        fn sci(&self) -> bool {
            level(&self.sink)
        }
        fn event(&mut self, ev: PlatformEvent) {
            self.feed.send(ev);
            self.pm.poll();
        }
        /// ACPI mode on, every status clear, as an OS leaves it.
        fn enable_acpi(&mut self) {
            self.wr(SMI_CMD, 1, u64::from(ACPI_ENABLE));
            self.wr(PM1_EVT_BLK, 2, 0xFFFF);
        }
    }

    fn level(sink: &RecordingSink) -> bool {
        sink.changes()
            .iter()
            .rev()
            .find(|(irq, _)| *irq == SCI_IRQ)
            .is_some_and(|c| c.1)
    }

    #[test]
    fn ports_are_disjoint_and_match_the_blocks() {
        for (i, &(b, l)) in ACPI_PM_PORTS.iter().enumerate() {
            for &(b2, l2) in &ACPI_PM_PORTS[i + 1..] {
                assert!(b + l <= b2 || b2 + l2 <= b, "{b:#x} overlaps {b2:#x}");
            }
            for p in b..b + l {
                let (block, rel) = Block::at(u64::from(p)).unwrap();
                assert_eq!(rel, u64::from(p - b));
                assert_eq!(block.len(), u64::from(l));
            }
        }
        assert!(Block::at(0x606).is_none());
        assert!(Block::at(0x60C).is_none());
    }

    #[test]
    fn pm_timer_counts_at_3_58_mhz_and_wraps_at_24_bits() {
        let mut r = Rig::new();
        let t0 = r.rd(PM_TMR_BLK, 4);
        assert_eq!(t0, ns_to_ticks(1_000));
        r.clock.advance(1_000_000_000);
        assert_eq!(r.rd(PM_TMR_BLK, 4), (t0 + PM_TIMER_HZ) & 0xFF_FFFF);
        r.clock.set(10_000_000_000);
        assert_eq!(r.rd(PM_TMR_BLK, 4), (10 * PM_TIMER_HZ) & 0xFF_FFFF);
        // Writes change nothing; reads of any width return the low bytes,
        // as QEMU's handler ignores the offset.
        r.wr(PM_TMR_BLK, 4, 0);
        assert_eq!(r.rd(PM_TMR_BLK, 4), (10 * PM_TIMER_HZ) & 0xFF_FFFF);
        assert_eq!(r.rd(PM_TMR_BLK + 2, 2), (10 * PM_TIMER_HZ) & 0xFFFF);
        assert_eq!(r.rd(PM_TMR_BLK + 1, 1), (10 * PM_TIMER_HZ) & 0xFF);
        assert_eq!(ticks_to_ns_ceil(PM_TIMER_HZ), NS_PER_S);
        for t in [1u64, 2, 3579, 1 << 23, 1 << 40] {
            let ns = ticks_to_ns_ceil(t);
            assert_eq!(ns_to_ticks(ns), t);
            assert_eq!(ns_to_ticks(ns - 1), t - 1);
        }
    }

    #[test]
    fn access_sizes_follow_qemu() {
        let mut r = Rig::new();
        r.wr(PM1_EVT_BLK + 2, 2, 0x0321);
        assert_eq!(r.rd(PM1_EVT_BLK + 2, 2), 0x0321);
        // A dword at PM1_EVT is split into PM1_STS and PM1_EN.
        assert_eq!(r.rd(PM1_EVT_BLK, 4) >> 16, 0x0321);
        // The high byte of a word register on its own reads 0, and a byte
        // written there is dropped.
        assert_eq!(r.rd(PM1_EVT_BLK + 3, 1), 0);
        r.wr(PM1_EVT_BLK + 3, 1, 0);
        assert_eq!(r.rd(PM1_EVT_BLK + 2, 2), 0x0321);
        // A byte write at PM1_EVT+2 writes the whole word with it.
        r.wr(PM1_EVT_BLK + 2, 1, 0x01);
        assert_eq!(r.rd(PM1_EVT_BLK + 2, 2), 0x0001);
        // GPE bytes one at a time; unaligned accesses are split.
        r.wr(GPE0_BLK + 2, 2, 0x0102);
        assert_eq!(r.rd(GPE0_BLK, 4), 0x0102_0000);
        assert_eq!(r.rd(GPE0_BLK + 1, 2), 0x0200);
        // Bytes outside every block read 0xFF.
        assert_eq!(r.rd(PM1_CNT_BLK, 4), 0xFFFF_0000);
        let mut b = [0u8; 3];
        r.pm.read(u64::from(SENSOR_BLK), 7, &mut b);
        assert_eq!(b, [0, 0xFF, 0xFF]);
        // Far offsets and wide accesses never panic.
        let mut big = [0u8; 16];
        r.pm.read(u64::MAX, u64::MAX, &mut big);
        r.pm.write(u64::from(PM1_EVT_BLK), 0, &[0xFF; 16]);
        r.pm.read(u64::from(PM1_EVT_BLK), 0, &mut []);
    }

    #[test]
    fn smi_cmd_switches_sci_en() {
        let mut r = Rig::new();
        assert_eq!(r.rd(PM1_CNT_BLK, 2) & u64::from(SCI_EN), 0);
        r.wr(SMI_CMD, 1, u64::from(ACPI_ENABLE));
        assert_eq!(r.rd(PM1_CNT_BLK, 2), u64::from(SCI_EN));
        assert_eq!(r.rd(SMI_CMD, 1), u64::from(ACPI_ENABLE));
        r.wr(SMI_CMD + 1, 1, 0x5A);
        assert_eq!(r.rd(SMI_CMD, 2), 0x5AF1);
        r.wr(SMI_CMD, 1, 0x12);
        assert_eq!(r.rd(PM1_CNT_BLK, 2), u64::from(SCI_EN));
        r.wr(SMI_CMD, 1, u64::from(ACPI_DISABLE));
        assert_eq!(r.rd(PM1_CNT_BLK, 2), 0);
    }

    #[test]
    fn sleep_types_give_bus_events() {
        let mut r = Rig::new();
        r.enable_acpi();
        let slp = |typ: u8| u64::from(SLP_EN | u16::from(typ) << SLP_TYP_SHIFT | SCI_EN);
        assert_eq!(r.wr(PM1_CNT_BLK, 2, slp(SLP_TYP_S5)), Some(BusEvent::PowerOff));
        assert_eq!(r.wr(PM1_CNT_BLK, 2, slp(SLP_TYP_S4)), Some(BusEvent::PowerOff));
        for typ in 4..8 {
            assert_eq!(r.wr(PM1_CNT_BLK, 2, slp(typ)), None);
        }
        // SLP_TYP without SLP_EN does nothing but store it.
        assert_eq!(r.wr(PM1_CNT_BLK, 2, u64::from(1u16 << SLP_TYP_SHIFT | SCI_EN)), None);
        assert_eq!(r.rd(PM1_CNT_BLK, 2), u64::from(1u16 << SLP_TYP_SHIFT | SCI_EN));
        assert_eq!(r.wr(PM1_CNT_BLK, 2, slp(SLP_TYP_S1)), Some(BusEvent::Sleep(1)));
        assert_eq!(r.pm.sleeping(), Some(1));
        // SLP_EN reads back clear.
        assert_eq!(r.rd(PM1_CNT_BLK, 2) & u64::from(SLP_EN), 0);
        r.event(PlatformEvent::Wake);
        assert_eq!(r.wr(PM1_CNT_BLK, 2, slp(SLP_TYP_S3)), Some(BusEvent::Sleep(3)));
        assert_eq!(r.pm.sleeping(), Some(3));
    }

    #[test]
    fn the_rtc_alarm_wakes_only_a_sleeping_machine_with_rtc_en() {
        let slp = u64::from(SLP_EN | u16::from(SLP_TYP_S3) << SLP_TYP_SHIFT | SCI_EN);
        for rtc_en in [false, true] {
            let mut r = Rig::new();
            r.enable_acpi();
            if rtc_en {
                r.wr(PM1_EVT_BLK + 2, 2, u64::from(RTC_EN));
            }
            // Awake: nothing latches.
            r.pm.rtc_alarm();
            assert_eq!(r.rd(PM1_EVT_BLK, 2) as u16 & RTC_STS, 0);
            assert_eq!(r.wr(PM1_CNT_BLK, 2, slp), Some(BusEvent::Sleep(3)));
            r.pm.rtc_alarm();
            assert_eq!(r.pm.take_wake(), rtc_en);
            assert_eq!(r.pm.sleeping(), if rtc_en { None } else { Some(3) });
            let sts = r.rd(PM1_EVT_BLK, 2) as u16;
            let want = if rtc_en { WAK_STS | RTC_STS } else { 0 };
            assert_eq!(sts & (WAK_STS | RTC_STS | PWRBTN_STS), want);
        }
    }

    #[test]
    fn wake_from_s3_by_event_or_power_button() {
        for ev in [PlatformEvent::Wake, PlatformEvent::PowerButton] {
            let mut r = Rig::new();
            r.enable_acpi();
            r.event(PlatformEvent::Wake); // ignored while awake
            assert!(!r.pm.take_wake());
            let slp = u64::from(SLP_EN | u16::from(SLP_TYP_S3) << SLP_TYP_SHIFT | SCI_EN);
            assert_eq!(r.wr(PM1_CNT_BLK, 2, slp), Some(BusEvent::Sleep(3)));
            r.event(PlatformEvent::Lid(false));
            r.event(PlatformEvent::SleepButton);
            assert_eq!(r.pm.sleeping(), Some(3));
            assert!(!r.pm.take_wake());
            r.event(ev);
            assert_eq!(r.pm.sleeping(), None);
            assert!(r.pm.take_wake());
            assert!(!r.pm.take_wake());
            let sts = r.rd(PM1_EVT_BLK, 2) as u16;
            assert_eq!(sts & (WAK_STS | PWRBTN_STS | SLPBTN_STS), WAK_STS | PWRBTN_STS);
            r.wr(PM1_EVT_BLK, 2, u64::from(WAK_STS));
            assert_eq!(r.rd(PM1_EVT_BLK, 2) as u16 & WAK_STS, 0);
        }
    }

    #[test]
    fn buttons_raise_the_sci_when_enabled() {
        let mut r = Rig::new();
        // Disabled: QEMU drops the press.
        r.event(PlatformEvent::PowerButton);
        assert_eq!(r.rd(PM1_EVT_BLK, 2) as u16 & PWRBTN_STS, 0);
        r.wr(PM1_EVT_BLK + 2, 2, u64::from(PWRBTN_EN | SLPBTN_EN));
        r.event(PlatformEvent::PowerButton);
        assert_eq!(r.rd(PM1_EVT_BLK, 2) as u16 & PWRBTN_STS, PWRBTN_STS);
        // No SCI before the OS switches to ACPI mode.
        assert!(!r.sci());
        r.wr(SMI_CMD, 1, u64::from(ACPI_ENABLE));
        assert!(r.sci());
        // Clearing another bit keeps it; clearing PWRBTN_STS lowers it.
        r.wr(PM1_EVT_BLK, 2, u64::from(SLPBTN_STS | TMR_STS));
        assert!(r.sci());
        r.wr(PM1_EVT_BLK, 2, u64::from(PWRBTN_STS));
        assert!(!r.sci());
        r.event(PlatformEvent::SleepButton);
        assert!(r.sci());
        assert_eq!(r.rd(PM1_EVT_BLK, 2) as u16 & SLPBTN_STS, SLPBTN_STS);
        r.wr(PM1_EVT_BLK + 2, 2, 0);
        assert!(!r.sci());
        assert_eq!(r.sink.rising_edges(SCI_IRQ), 2);
    }

    #[test]
    fn sensors_update_the_block_and_gpe() {
        let mut r = Rig::new();
        r.enable_acpi();
        assert_eq!(r.rd(SENSOR_BLK, 4), 0x00_01_64_01);
        assert_eq!(r.rd(SENSOR_BLK + SENSOR_TEMP, 2), 35 * 10 + 2732);
        r.wr(GPE0_BLK + 2, 1, u64::from(GPE_LID | GPE_THERMAL));
        r.event(PlatformEvent::Battery {
            percent: 150,
            charging: false,
        });
        assert_eq!(r.rd(SENSOR_BLK + SENSOR_BATTERY, 2), 100);
        assert_eq!(r.rd(GPE0_BLK, 1), u64::from(GPE_BATTERY));
        assert!(!r.sci(), "battery GPE is not enabled");
        r.event(PlatformEvent::Lid(false));
        assert_eq!(r.rd(SENSOR_BLK + SENSOR_LID, 1), 0);
        assert!(r.sci());
        r.wr(GPE0_BLK, 1, u64::from(GPE_LID));
        assert!(!r.sci());
        r.event(PlatformEvent::Temperature(-300));
        assert_eq!(r.rd(SENSOR_BLK + SENSOR_TEMP, 2), 0);
        r.event(PlatformEvent::Temperature(97));
        assert_eq!(r.rd(SENSOR_BLK + SENSOR_TEMP, 2), 3702);
        assert_eq!(r.pm.sensors().temperature_c, 97);
        assert!(r.sci());
        assert_eq!(r.rd(GPE0_BLK, 2), u64::from(GPE_BATTERY | GPE_THERMAL));
        // The sensor block is read-only.
        r.wr(SENSOR_BLK, 4, 0xFFFF_FFFF);
        assert_eq!(r.rd(SENSOR_BLK + SENSOR_LID, 1), 0);
    }

    #[test]
    fn timer_overflow_sets_tmr_sts_at_bit_23_changes() {
        let mut r = Rig::new();
        // After power-on TMR_STS reads set until cleared, as under QEMU.
        assert_eq!(r.rd(PM1_EVT_BLK, 2) as u16 & TMR_STS, TMR_STS);
        assert_eq!(r.pm.next_deadline_ns(), None);
        r.enable_acpi();
        assert_eq!(r.rd(PM1_EVT_BLK, 2) as u16 & TMR_STS, 0);
        assert_eq!(r.pm.next_deadline_ns(), None, "TMR_EN is clear");
        r.wr(PM1_EVT_BLK + 2, 2, u64::from(TMR_EN));
        let due = r.pm.next_deadline_ns().unwrap();
        assert_eq!(due, ticks_to_ns_ceil(1 << 23));
        r.clock.set(due - 1);
        r.pm.poll();
        assert!(!r.sci());
        r.clock.set(due);
        r.pm.poll();
        assert!(r.sci());
        assert_eq!(r.pm.next_deadline_ns(), None);
        r.clock.set(due + 5 * ticks_to_ns_ceil(1 << 23) + 7);
        r.wr(PM1_EVT_BLK, 2, u64::from(TMR_STS));
        assert!(!r.sci());
        let next = r.pm.next_deadline_ns().unwrap();
        assert_eq!(next, ticks_to_ns_ceil(7 << 23));
    }

    #[test]
    fn reset_clears_registers_and_keeps_sensors() {
        let mut r = Rig::new();
        r.enable_acpi();
        r.wr(GPE0_BLK + 2, 1, 0xFF);
        r.event(PlatformEvent::Lid(false));
        assert!(r.sci());
        r.pm.reset();
        assert!(!r.sci());
        let s = r.pm.state();
        assert_eq!((s.pm1_cnt, s.gpe0_en, s.gpe0_sts), (0, 0, 0));
        assert!(!s.sensors.lid_open);
    }

    #[test]
    fn state_round_trips_and_rejects_nonsense() {
        let mut r = Rig::new();
        r.enable_acpi();
        r.wr(GPE0_BLK + 2, 1, 0x07);
        r.feed.send(PlatformEvent::Temperature(50));
        r.feed.0.lock().unwrap().extend([TAG_BATTERY, 2, 40]);
        r.pm.poll();
        let s = r.pm.state();
        assert_eq!(s.input_pending, vec![TAG_BATTERY, 2, 40]);
        let sink = Arc::new(RecordingSink::default());
        let more = BufferInput::new(vec![1]);
        let mut copy = AcpiPm::from_state(&s, r.clock.clone(), sink.clone(), Box::new(more)).unwrap();
        assert_eq!(copy.state(), s);
        assert!(sink.changes().is_empty());
        copy.poll();
        assert_eq!(copy.sensors().battery_percent, 40);
        assert!(copy.sensors().charging);

        let bad = |f: &dyn Fn(&mut AcpiPmState)| {
            let mut b = s.clone();
            f(&mut b);
            AcpiPm::from_state(&b, r.clock.clone(), sink.clone(), Box::new(NoInput)).unwrap_err()
        };
        assert!(bad(&|b| b.sensors.battery_percent = 101).contains("101"));
        assert!(bad(&|b| b.sleeping = Some(2)).contains("S2"));
        assert!(bad(&|b| b.pm1_cnt |= SLP_EN).contains("SLP_EN"));
        assert!(bad(&|b| b.input_pending = vec![9, 0]).contains("whole frame"));
    }

    #[test]
    fn decoder_handles_split_and_unknown_frames() {
        let mut d = EventDecoder::new();
        let mut bytes = PlatformEvent::Lid(true).encode();
        bytes.extend([0x77, 3, 1, 2, 3]); // unknown tag, skipped whole
        bytes.extend([TAG_LID, 2, 1, 1]); // known tag, wrong length
        bytes.extend(PlatformEvent::Temperature(-5).encode());
        let (a, b) = bytes.split_at(9);
        let mut got = d.push(a);
        assert_eq!(got, vec![PlatformEvent::Lid(true)]);
        got.extend(d.push(b));
        assert_eq!(got, vec![PlatformEvent::Lid(true), PlatformEvent::Temperature(-5)]);
        assert!(d.pending().is_empty());
    }

    fn event() -> impl Strategy<Value = PlatformEvent> {
        prop_oneof![
            Just(PlatformEvent::PowerButton),
            Just(PlatformEvent::SleepButton),
            Just(PlatformEvent::Wake),
            any::<bool>().prop_map(PlatformEvent::Lid),
            (any::<u8>(), any::<bool>()).prop_map(|(percent, charging)| PlatformEvent::Battery { percent, charging }),
            any::<i16>().prop_map(PlatformEvent::Temperature),
        ]
    }

    /// Every register of every block, and a few ports next to them.
    fn port() -> impl Strategy<Value = u16> {
        prop_oneof![0x5FEu16..0x61A, GPE0_BLK - 2..GPE0_BLK + 6, SMI_CMD - 1..SMI_CMD + 3,]
    }

    #[derive(Debug, Clone)]
    enum Op {
        Read(u16, usize),
        Write(u16, usize, u64),
        Event(PlatformEvent),
        Poll,
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (port(), 1usize..=4).prop_map(|(p, s)| Op::Read(p, s)),
            (port(), 1usize..=4, any::<u64>()).prop_map(|(p, s, v)| Op::Write(p, s, v)),
            (
                SMI_CMD..=SMI_CMD,
                Just(1usize),
                prop::sample::select(vec![0xF0u64, 0xF1])
            )
                .prop_map(|(p, s, v)| Op::Write(p, s, v)),
            event().prop_map(Op::Event),
            Just(Op::Poll),
            (0u64..5_000_000_000).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Garbage never panics, and where the stream is cut changes nothing.
        #[test]
        fn decoder_survives_garbage_and_any_split(
            bytes in prop::collection::vec(any::<u8>(), 0..600),
            cuts in prop::collection::vec(0usize..600, 0..10),
        ) {
            let mut whole = EventDecoder::new();
            let expected = whole.push(&bytes);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            let mut pieces = EventDecoder::new();
            let mut got = Vec::new();
            let mut at = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                got.extend(pieces.push(&bytes[at..c]));
                at = c;
            }
            prop_assert_eq!(&got, &expected);
            prop_assert_eq!(pieces.pending(), whole.pending());
            prop_assert!(whole.pending().len() < MAX_FRAME);
            prop_assert!(EventDecoder::with_pending(whole.pending().to_vec()).is_ok());
        }

        /// Encoded events decode to themselves, garbage frames in between.
        #[test]
        fn events_round_trip(events in prop::collection::vec(event(), 0..40), junk_tag in 7u8..=255, junk in prop::collection::vec(any::<u8>(), 0..8)) {
            let mut bytes = Vec::new();
            for e in &events {
                bytes.extend(e.encode());
                bytes.extend([junk_tag, junk.len() as u8]);
                bytes.extend(&junk);
            }
            prop_assert_eq!(EventDecoder::new().push(&bytes), events);
        }

        /// Any access sequence: no panic, the SCI follows its definition
        /// after every write and poll, and a restored copy behaves the same.
        #[test]
        fn random_accesses_keep_the_sci_consistent(ops in prop::collection::vec(op(), 0..150), split in 0usize..150) {
            let mut r = Rig::new();
            let mut copy: Option<(AcpiPm, Arc<RecordingSink>)> = None;
            for (i, o) in ops.iter().enumerate() {
                if i == split {
                    let sink = Arc::new(RecordingSink::default());
                    let pm = AcpiPm::from_state(&r.pm.state(), r.clock.clone(), sink.clone(), Box::new(NoInput));
                    prop_assert!(pm.is_ok());
                    copy = pm.ok().map(|pm| (pm, sink));
                }
                let step = |pm: &mut AcpiPm| -> (Vec<u8>, Option<BusEvent>) {
                    match o {
                        Op::Read(p, s) => {
                            let mut b = vec![0u8; *s];
                            pm.read(u64::from(*p), 0, &mut b);
                            (b, None)
                        }
                        Op::Write(p, s, v) => (Vec::new(), pm.write(u64::from(*p), 0, &v.to_le_bytes()[..*s])),
                        Op::Event(e) => { pm.apply(*e); (Vec::new(), None) }
                        Op::Poll => { pm.poll(); (Vec::new(), None) }
                        Op::Advance(_) => (Vec::new(), None),
                    }
                };
                if let Op::Advance(dt) = o {
                    r.clock.advance(*dt);
                }
                let mine = step(&mut r.pm);
                if let Some((pm, _)) = copy.as_mut() {
                    prop_assert_eq!(step(pm), mine.clone());
                    prop_assert_eq!(pm.state(), r.pm.state());
                }
                if let (_, Some(ev)) = mine {
                    prop_assert!(matches!(ev, BusEvent::PowerOff | BusEvent::Sleep(1) | BusEvent::Sleep(3)));
                }
                let s = r.pm.state();
                prop_assert!(s.sensors.battery_percent <= 100);
                prop_assert_eq!(s.pm1_cnt & SLP_EN, 0);
                if !matches!(o, Op::Read(..) | Op::Advance(_)) {
                    prop_assert_eq!(r.sci(), s.sci_level());
                    if let Some((_, sink)) = copy.as_ref() {
                        // The copy signals only changes from the level it started at.
                        prop_assert!(sink.changes().last().is_none_or(|c| c.1 == s.sci_level()));
                    }
                }
                let restored = AcpiPm::from_state(&s, r.clock.clone(), r.sink.clone(), Box::new(NoInput));
                prop_assert_eq!(restored.map(|p| p.state()), Ok(s));
            }
        }

        /// Reads of the timer follow the clock at 3.579545 MHz.
        #[test]
        fn pm_timer_rate(times in prop::collection::vec(0u64..100_000_000_000, 1..20)) {
            let mut r = Rig::new();
            let mut times = times;
            times.sort_unstable();
            for t in times {
                r.clock.set(t);
                let expected = (u128::from(r.clock.now_ns()) * 3_579_545 / 1_000_000_000) as u64 & 0xFF_FFFF;
                prop_assert_eq!(r.rd(PM_TMR_BLK, 4), expected);
            }
        }
    }
}
