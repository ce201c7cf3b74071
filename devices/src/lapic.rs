//! The local APIC of the one vCPU in xAPIC mode (the 4 KiB register page at
//! [`LAPIC_BASE`]), after QEMU 7.2's `apic.c`/`apic_common.c`, with what the
//! SDM and KVM's in-kernel APIC add where QEMU's model is silent: the
//! TSC-deadline timer mode, write masks of the LVT, ICR and SVR registers,
//! LVT masks forced while the APIC is software-disabled, and the ESR as a
//! latch that a write updates.
//!
//! The APIC never raises anything by itself: the interrupt-controller
//! complex around it asks [`LocalApic::pending_vector`] whether the CPU
//! would take an interrupt, runs the INTA cycle with
//! [`LocalApic::acknowledge`], delivers IOAPIC messages through
//! [`LocalApic::accept_fixed`] and acts on the [`LapicEffect`] of a register
//! write (an EOI to broadcast to the IOAPIC, an IPI it has to route).
//!
//! The timer is not ticked: it remembers the virtual time the count was
//! loaded and the absolute virtual time of its next expiry, computes the
//! current count from the `Clock` (1 GHz bus as QEMU's, then the divider),
//! and [`LocalApic::poll`] sets the timer vector in IRR when an expiry has
//! passed. As in QEMU a one-shot or periodic period is `initial count + 1`
//! counts. A periodic timer that missed several periods before a poll sets
//! IRR once and is re-armed at the first period boundary after now.
//! A TSC deadline is in the guest's TSC, which is the virtual TSC (the
//! clock at the guest TSC rate) plus an offset the machine declares with
//! [`LocalApic::set_tsc_offset`]: 0 where `rdtsc` is answered from the
//! virtual clock, KVM's lead over it in a plain run.

use crate::io::Clock;
use std::sync::Arc;

/// Where the register page is after reset.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// The size of the register page.
pub const LAPIC_SIZE: u64 = 0x1000;
/// The APIC timer's input clock (QEMU uses a 1 GHz APIC bus): counts per ns
/// before the divider.
pub const LAPIC_BUS_HZ: u64 = 1_000_000_000;
/// The version register: version 0x14, six LVT entries (max LVT 5).
pub const LAPIC_VERSION: u32 = 0x0005_0014;

/// IA32_APIC_BASE: this is the bootstrap processor.
pub const BASE_BSP: u64 = 1 << 8;
/// IA32_APIC_BASE: x2APIC mode (not supported: a reserved bit here).
pub const BASE_X2APIC: u64 = 1 << 10;
/// IA32_APIC_BASE: the APIC is globally enabled.
pub const BASE_ENABLE: u64 = 1 << 11;
/// IA32_APIC_BASE: the page frame of the registers (up to MAXPHYADDR 52).
pub const BASE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// The bits of IA32_APIC_BASE a guest write may set.
const BASE_WRITABLE: u64 = BASE_ADDR_MASK | BASE_ENABLE | BASE_BSP;

const NS_PER_S: u128 = 1_000_000_000;

const SVR_ENABLE: u32 = 1 << 8;
/// Spurious vector and APIC enable (QEMU keeps 9 bits; no focus checking,
/// no EOI-broadcast suppression).
const SVR_WRITABLE: u32 = 0x1ff;

const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
/// The entries in register order: timer, thermal, performance counters,
/// LINT0, LINT1, error.
const LVT_COUNT: usize = 6;
const LVT_MASKED: u32 = 1 << 16;
/// The bits of each LVT entry that a write sets (KVM's masks): the timer
/// has vector, mask and mode; thermal and performance add the delivery
/// mode; LINT0/1 add polarity and trigger mode; error has vector and mask.
/// Delivery status and remote IRR always read 0.
const LVT_WRITABLE: [u32; LVT_COUNT] = [
    0x0007_00ff,
    0x0001_07ff,
    0x0001_07ff,
    0x0001_a7ff,
    0x0001_a7ff,
    0x0001_00ff,
];
const DELIVERY_EXTINT: u32 = 7;

/// The ICR bits that are kept: vector, delivery mode, destination mode,
/// level, trigger mode, shorthand. Delivery status (bit 12) reads 0.
const ICR_LOW_WRITABLE: u32 = 0x000c_cfff;
const ICR_HIGH_WRITABLE: u32 = 0xff00_0000;

const DIVIDE_WRITABLE: u32 = 0xb;

/// ESR bit 7: an access to a register that does not exist.
const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;

// Register indices: the offset in the page divided by 16.
const REG_ID: u64 = 0x02;
const REG_VERSION: u64 = 0x03;
const REG_TPR: u64 = 0x08;
const REG_APR: u64 = 0x09;
const REG_PPR: u64 = 0x0a;
const REG_EOI: u64 = 0x0b;
const REG_LDR: u64 = 0x0d;
const REG_DFR: u64 = 0x0e;
const REG_SVR: u64 = 0x0f;
const REG_ISR: u64 = 0x10;
const REG_TMR: u64 = 0x18;
const REG_IRR: u64 = 0x20;
const REG_ESR: u64 = 0x28;
const REG_ICR_LOW: u64 = 0x30;
const REG_ICR_HIGH: u64 = 0x31;
const REG_LVT: u64 = 0x32;
const REG_INITIAL_COUNT: u64 = 0x38;
const REG_CURRENT_COUNT: u64 = 0x39;
const REG_DIVIDE: u64 = 0x3e;

/// The timer mode of LVT timer bits 17-18.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerMode {
    /// Counts down once from the initial count.
    OneShot,
    /// Reloads the initial count at every expiry.
    Periodic,
    /// Expires when the TSC reaches IA32_TSC_DEADLINE.
    TscDeadline,
    /// Mode 3 is reserved: the timer does not run.
    Reserved,
}

impl TimerMode {
    fn of(lvt: u32) -> Self {
        match (lvt >> 17) & 3 {
            0 => Self::OneShot,
            1 => Self::Periodic,
            2 => Self::TscDeadline,
            _ => Self::Reserved,
        }
    }
}

/// Everything of the local APIC that a snapshot has to keep.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LapicState {
    /// IA32_APIC_BASE.
    pub base_msr: u64,
    /// APIC ID (register bits 24-31).
    pub id: u8,
    /// Task priority.
    pub tpr: u8,
    /// Logical destination (LDR bits 24-31).
    pub ldr: u8,
    /// Destination model (DFR bits 28-31): 0xF flat, 0x0 cluster.
    pub dfr_model: u8,
    /// Spurious-interrupt vector register.
    pub svr: u32,
    /// In-service register, vector `v` at bit `v % 32` of word `v / 32`.
    pub isr: [u32; 8],
    /// Trigger mode register (set: level-triggered).
    pub tmr: [u32; 8],
    /// Interrupt request register.
    pub irr: [u32; 8],
    /// The error status register as last latched by a write.
    pub esr: u32,
    /// Errors found since the last ESR write.
    pub esr_pending: u32,
    /// Interrupt command register, low half.
    pub icr_low: u32,
    /// Interrupt command register, high half (destination in bits 24-31).
    pub icr_high: u32,
    /// The LVT: timer, thermal, performance counters, LINT0, LINT1, error.
    pub lvt: [u32; LVT_COUNT],
    /// Divide configuration register.
    pub divide_conf: u32,
    /// Initial count register.
    pub initial_count: u32,
    /// Virtual time the initial count was written.
    pub timer_load_ns: u64,
    /// The virtual time of the next timer expiry not yet seen by a poll
    /// (one-shot, periodic or TSC deadline), if the timer is armed.
    pub timer_next_ns: Option<u64>,
    /// IA32_TSC_DEADLINE as written, in guest TSC ticks; 0 when disarmed.
    pub tsc_deadline: u64,
}

impl LapicState {
    /// The state of the bootstrap processor's APIC after reset, as QEMU
    /// resets it: enabled at [`LAPIC_BASE`], software-disabled, every LVT
    /// entry masked except LINT0 in ExtINT mode, flat logical model.
    pub fn reset() -> Self {
        let mut lvt = [LVT_MASKED; LVT_COUNT];
        lvt[LVT_LINT0] = DELIVERY_EXTINT << 8;
        Self {
            base_msr: LAPIC_BASE | BASE_ENABLE | BASE_BSP,
            id: 0,
            tpr: 0,
            ldr: 0,
            dfr_model: 0xf,
            svr: 0xff,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr: 0,
            esr_pending: 0,
            icr_low: 0,
            icr_high: 0,
            lvt,
            divide_conf: 0,
            initial_count: 0,
            timer_load_ns: 0,
            timer_next_ns: None,
            tsc_deadline: 0,
        }
    }

    /// The state of an application processor's APIC with ID `id` after
    /// reset: as the BSP's, but without the BSP flag in the base MSR and
    /// with every LVT entry masked, LINT0 included (only the BSP takes the
    /// 8259's INTR).
    pub fn reset_ap(id: u8) -> Self {
        Self {
            base_msr: LAPIC_BASE | BASE_ENABLE,
            id,
            lvt: [LVT_MASKED; LVT_COUNT],
            ..Self::reset()
        }
    }

    /// Why this state is not one the APIC can be in, if it is not.
    fn check(&self) -> Result<(), String> {
        if self.base_msr & !BASE_WRITABLE != 0 {
            return Err(format!("APIC base MSR {:#x} has reserved bits set", self.base_msr));
        }
        if self.dfr_model > 0xf {
            return Err(format!("DFR model {:#x} is wider than 4 bits", self.dfr_model));
        }
        if self.svr & !SVR_WRITABLE != 0 {
            return Err(format!("SVR {:#x} has reserved bits set", self.svr));
        }
        for (i, (&v, &w)) in self.lvt.iter().zip(LVT_WRITABLE.iter()).enumerate() {
            if v & !w != 0 {
                return Err(format!("LVT entry {i} ({v:#x}) has reserved bits set"));
            }
        }
        if self.icr_low & !ICR_LOW_WRITABLE != 0 || self.icr_high & !ICR_HIGH_WRITABLE != 0 {
            return Err(format!(
                "ICR {:#x}:{:#x} has reserved bits set",
                self.icr_high, self.icr_low
            ));
        }
        if self.divide_conf & !DIVIDE_WRITABLE != 0 {
            return Err(format!(
                "divide configuration {:#x} has reserved bits set",
                self.divide_conf
            ));
        }
        let mode = TimerMode::of(self.lvt[LVT_TIMER]);
        if mode == TimerMode::TscDeadline {
            if self.initial_count != 0 {
                return Err("initial count set in TSC-deadline mode".into());
            }
            if self.timer_next_ns.is_some() != (self.tsc_deadline != 0) {
                return Err("TSC deadline and timer expiry disagree".into());
            }
        } else if self.tsc_deadline != 0 {
            return Err("TSC deadline set outside TSC-deadline mode".into());
        }
        if mode == TimerMode::Reserved && self.timer_next_ns.is_some() {
            return Err("timer armed in the reserved timer mode".into());
        }
        Ok(())
    }
}

impl Default for LapicState {
    fn default() -> Self {
        Self::reset()
    }
}

/// An interprocessor interrupt the APIC cannot deliver itself, as written
/// to the ICR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipi {
    /// Vector (ICR bits 0-7; the start page for a SIPI).
    pub vector: u8,
    /// Delivery mode (ICR bits 8-10): 0 fixed, 1 lowest priority, 2 SMI,
    /// 4 NMI, 5 INIT, 6 start-up.
    pub delivery_mode: u8,
    /// Destination shorthand (ICR bits 18-19): 0 none, 1 self, 2 all
    /// including self, 3 all excluding self.
    pub shorthand: u8,
    /// Destination field (ICR bits 56-63) when `shorthand` is 0.
    pub dest: u8,
    /// Logical destination mode (ICR bit 11).
    pub logical: bool,
    /// Level-triggered (ICR bit 15).
    pub level: bool,
    /// Level assert (ICR bit 14); INIT with `level` and not `assert` is the
    /// INIT level de-assert.
    pub assert: bool,
}

/// What a register write asks of the interrupt-controller complex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LapicEffect {
    /// Nothing.
    None,
    /// An EOI ended `vector`; `level` is its TMR bit: when set, the IOAPIC
    /// has to see the EOI (it clears remote IRR of the entries with that
    /// vector).
    Eoi {
        /// The vector whose ISR bit was cleared.
        vector: u8,
        /// It was accepted as level-triggered.
        level: bool,
    },
    /// An IPI to deliver elsewhere.
    Ipi(Ipi),
}

fn bit(bits: &[u32; 8], v: u8) -> bool {
    bits[usize::from(v >> 5)] & (1 << (v & 31)) != 0
}

fn set_bit(bits: &mut [u32; 8], v: u8, on: bool) {
    let word = &mut bits[usize::from(v >> 5)];
    if on {
        *word |= 1 << (v & 31);
    } else {
        *word &= !(1 << (v & 31));
    }
}

/// The highest vector set.
fn highest(bits: &[u32; 8]) -> Option<u8> {
    (0..8usize)
        .rev()
        .find(|&i| bits[i] != 0)
        .map(|i| (i * 32 + 31 - bits[i].leading_zeros() as usize) as u8)
}

/// log2 of the divider: 0b1011 divides by 1, 0b0000 by 2, ..., 0b1010 by 128.
fn count_shift(divide_conf: u32) -> u32 {
    let v = (divide_conf & 3) | ((divide_conf >> 1) & 4);
    (v + 1) & 7
}

/// The local APIC.
pub struct LocalApic {
    state: LapicState,
    clock: Arc<dyn Clock>,
    tsc_hz: u64,
    /// The guest's TSC minus the virtual TSC ([`LocalApic::tsc_at`]): 0
    /// where the guest's TSC is the virtual one (record, replay), what KVM's
    /// TSC is ahead of it in a plain run.
    tsc_offset: i64,
}

impl std::fmt::Debug for LocalApic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalApic")
            .field("state", &self.state)
            .field("tsc_hz", &self.tsc_hz)
            .field("tsc_offset", &self.tsc_offset)
            .finish()
    }
}

impl LocalApic {
    /// The BSP's APIC (ID 0) after reset, as QEMU resets the BSP: base MSR
    /// 0xFEE00900 (enabled, BSP), LVT LINT0 = 0x700 (ExtINT, unmasked: the
    /// 8259's INTR reaches the CPU until software changes it), the other
    /// LVTs masked, SVR 0xFF (software-disabled), version 0x00050014.
    /// `tsc_hz` is the guest TSC frequency (0 is taken as 1).
    pub fn new(clock: Arc<dyn Clock>, tsc_hz: u64) -> Self {
        Self {
            state: LapicState::reset(),
            clock,
            tsc_hz: tsc_hz.max(1),
            tsc_offset: 0,
        }
    }

    /// An application processor's APIC with ID `id` after reset
    /// ([`LapicState::reset_ap`]).
    pub fn new_ap(id: u8, clock: Arc<dyn Clock>, tsc_hz: u64) -> Self {
        Self {
            state: LapicState::reset_ap(id),
            ..Self::new(clock, tsc_hz)
        }
    }

    /// The INIT signal (an INIT IPI): every register back to its reset
    /// value but the APIC ID and the base MSR, every LVT entry masked
    /// (the SDM's "INIT reset"; QEMU's `apic_init_reset`).
    pub fn init(&mut self) {
        let (id, base_msr) = (self.state.id, self.state.base_msr);
        self.state = LapicState {
            base_msr,
            id,
            lvt: [LVT_MASKED; LVT_COUNT],
            ..LapicState::reset()
        };
    }

    /// The APIC ID.
    pub fn id(&self) -> u8 {
        self.state.id
    }

    /// An APIC restored from `state`; a state the APIC could never be in
    /// (reserved bits set, a timer armed in a mode that does not run) is an
    /// error.
    pub fn from_state(state: &LapicState, clock: Arc<dyn Clock>, tsc_hz: u64) -> Result<Self, String> {
        state.check()?;
        Ok(Self {
            state: state.clone(),
            clock,
            tsc_hz: tsc_hz.max(1),
            tsc_offset: 0,
        })
    }

    /// The snapshot state.
    pub fn state(&self) -> LapicState {
        self.state.clone()
    }

    /// IA32_APIC_BASE.
    pub fn base_msr(&self) -> u64 {
        self.state.base_msr
    }

    /// IA32_APIC_BASE write; `Err(())` means the guest gets #GP: a reserved
    /// bit is set (bits 0-7, 9, 10 as x2APIC is not supported, 52-63). The
    /// BSP bit is read-only. Clearing the enable bit software-disables the
    /// APIC as well (SVR bit 8, which masks the LVT), as QEMU does; unlike
    /// QEMU's model, setting it again enables the APIC again (as KVM does),
    /// with the rest of the state as it was.
    #[allow(clippy::result_unit_err)] // the only error is #GP
    pub fn set_base_msr(&mut self, value: u64) -> Result<(), ()> {
        if value & !(BASE_ADDR_MASK | BASE_ENABLE | BASE_BSP) != 0 {
            return Err(());
        }
        if value & BASE_ENABLE == 0 {
            self.software_disable();
        }
        self.state.base_msr = (value & (BASE_ADDR_MASK | BASE_ENABLE)) | (self.state.base_msr & BASE_BSP);
        Ok(())
    }

    /// The physical address of the register page (where the caller maps the
    /// MMIO range).
    pub fn mmio_base(&self) -> u64 {
        self.state.base_msr & BASE_ADDR_MASK
    }

    /// Bits 4-7 of the TPR, as the CPU sees them in CR8.
    pub fn cr8(&self) -> u8 {
        self.state.tpr >> 4
    }

    /// A CR8 write (KVM reports the guest's CR8 in `kvm_run.cr8` when the
    /// APIC is in user space): sets TPR to `value << 4`.
    pub fn set_cr8(&mut self, value: u8) {
        self.state.tpr = (value & 0xf) << 4;
    }

    fn globally_enabled(&self) -> bool {
        self.state.base_msr & BASE_ENABLE != 0
    }

    fn software_enabled(&self) -> bool {
        self.state.svr & SVR_ENABLE != 0
    }

    fn timer_mode(&self) -> TimerMode {
        TimerMode::of(self.state.lvt[LVT_TIMER])
    }

    /// Clears SVR bit 8 and sets every LVT mask bit, first letting an expiry
    /// that passed under the old mask take effect.
    fn software_disable(&mut self) {
        if self.state.timer_next_ns.is_some() {
            let now = self.clock.now_ns();
            self.advance_timer(now);
        }
        self.state.svr &= !SVR_ENABLE;
        for entry in &mut self.state.lvt {
            *entry |= LVT_MASKED;
        }
    }

    /// The virtual TSC at virtual time `ns` (`ns * tsc_hz / 1e9`); the
    /// guest's TSC is this plus the offset ([`LocalApic::set_tsc_offset`]).
    pub fn tsc_at(&self, ns: u64) -> u64 {
        let t = u128::from(ns) * u128::from(self.tsc_hz) / NS_PER_S;
        u64::try_from(t).unwrap_or(u64::MAX)
    }

    /// Declares that the guest's TSC (what its `rdtsc` reads, the scale of
    /// IA32_TSC_DEADLINE) is the virtual TSC plus `offset`: in a plain run
    /// the guest reads KVM's TSC, which need not start at 0 with the
    /// virtual clock. An armed deadline is moved to the new scale.
    pub fn set_tsc_offset(&mut self, offset: i64) {
        self.tsc_offset = offset;
        if self.timer_mode() == TimerMode::TscDeadline && self.state.tsc_deadline != 0 {
            self.state.timer_next_ns = Some(self.tsc_to_ns(self.state.tsc_deadline));
        }
    }

    /// Declares that the guest's TSC reads `guest_tsc` now: the offset
    /// ([`LocalApic::set_tsc_offset`]) against the virtual TSC at the
    /// clock's present time, clamped to the `i64` range.
    pub fn set_guest_tsc_now(&mut self, guest_tsc: u64) {
        let offset = i128::from(guest_tsc) - i128::from(self.tsc_at(self.clock.now_ns()));
        self.set_tsc_offset(offset.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64);
    }

    /// The first virtual time at which the guest TSC reaches `tsc`; 0 for
    /// a guest TSC value from before virtual time 0.
    fn tsc_to_ns(&self, tsc: u64) -> u64 {
        let virtual_tsc = i128::from(tsc) - i128::from(self.tsc_offset);
        let Ok(virtual_tsc) = u128::try_from(virtual_tsc) else {
            return 0;
        };
        let ns = (virtual_tsc * NS_PER_S).div_ceil(u128::from(self.tsc_hz));
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    /// IA32_TSC_DEADLINE (0x6E0) in guest TSC ticks; the guest TSC is clock
    /// ns * tsc_hz / 1e9. Reads 0 once the deadline has passed and when the
    /// timer is not in TSC-deadline mode (as QEMU and KVM).
    pub fn tsc_deadline_msr(&self) -> u64 {
        if self.timer_mode() != TimerMode::TscDeadline {
            return 0;
        }
        match self.state.timer_next_ns {
            Some(deadline) if self.clock.now_ns() < deadline => self.state.tsc_deadline,
            _ => 0,
        }
    }

    /// An IA32_TSC_DEADLINE write: arms the timer at `tsc` (0 disarms). A
    /// deadline already passed expires at the next poll. Ignored when the
    /// timer is not in TSC-deadline mode (as KVM).
    pub fn set_tsc_deadline_msr(&mut self, tsc: u64) {
        if self.timer_mode() != TimerMode::TscDeadline {
            return;
        }
        let now = self.clock.now_ns();
        self.advance_timer(now);
        self.state.tsc_deadline = tsc;
        self.state.timer_next_ns = (tsc != 0).then(|| self.tsc_to_ns(tsc));
    }

    /// Fixed/lowest-priority delivery from the IOAPIC or an IPI: sets IRR,
    /// and sets TMR when `level_triggered`, clears it otherwise (SDM). As in
    /// QEMU the vector is accepted whatever the enable bits say; it is taken
    /// only once the APIC is enabled.
    pub fn accept_fixed(&mut self, vector: u8, level_triggered: bool) {
        set_bit(&mut self.state.irr, vector, true);
        set_bit(&mut self.state.tmr, vector, level_triggered);
    }

    /// Whether a message addressed to `dest` reaches this APIC: physical
    /// mode compares with the APIC ID; logical mode uses the flat model (any
    /// common bit with LDR) or the cluster model (same cluster in bits 4-7,
    /// a common bit in 0-3) as DFR says. 0xFF is a broadcast in both modes
    /// (as KVM; QEMU's logical mode wants a common LDR bit even then).
    pub fn matches_destination(&self, dest: u8, logical: bool) -> bool {
        if dest == 0xff {
            return true;
        }
        if !logical {
            return dest == self.state.id;
        }
        let ldr = self.state.ldr;
        match self.state.dfr_model {
            0xf => dest & ldr != 0,
            0x0 => dest >> 4 == ldr >> 4 && dest & ldr & 0xf != 0,
            _ => false,
        }
    }

    /// Whether the 8259's INTR reaches the CPU: the APIC is globally
    /// disabled (base MSR bit 11 clear), or LVT LINT0 is unmasked ExtINT.
    /// (QEMU's `apic_accept_pic_intr` checks only the mask; an unmasked
    /// LINT0 in another delivery mode is not modelled.)
    pub fn pic_interrupts_accepted(&self) -> bool {
        let lint0 = self.state.lvt[LVT_LINT0];
        !self.globally_enabled() || (lint0 & LVT_MASKED == 0 && (lint0 >> 8) & 7 == DELIVERY_EXTINT)
    }

    /// The processor priority: TPR if its class is at least that of the
    /// highest vector in service, else that class.
    pub fn ppr(&self) -> u8 {
        let tpr = self.state.tpr;
        let isrv = highest(&self.state.isr).unwrap_or(0);
        if tpr >> 4 >= isrv >> 4 {
            tpr
        } else {
            isrv & 0xf0
        }
    }

    /// The vector the CPU would take now: the highest IRR vector whose
    /// priority class is above PPR's (any vector when PPR is 0, as QEMU),
    /// when the APIC is globally and software enabled. None otherwise.
    pub fn pending_vector(&self) -> Option<u8> {
        if !self.globally_enabled() || !self.software_enabled() {
            return None;
        }
        let irrv = highest(&self.state.irr)?;
        let ppr = self.ppr();
        (ppr == 0 || irrv & 0xf0 > ppr & 0xf0).then_some(irrv)
    }

    /// The INTA cycle: moves [`Self::pending_vector`] from IRR to ISR and
    /// returns it (TMR was set or cleared when the vector was accepted and
    /// stays until the EOI). Call it when `pending_vector` said Some: if the
    /// vector has meanwhile been masked by the priority (IRR still holds
    /// something), it returns the spurious vector (SVR bits 0-7) and
    /// changes nothing, as the SDM and QEMU do; with IRR empty or the APIC
    /// disabled it returns None.
    pub fn acknowledge(&mut self) -> Option<u8> {
        if !self.globally_enabled() || !self.software_enabled() {
            return None;
        }
        match self.pending_vector() {
            Some(v) => {
                set_bit(&mut self.state.irr, v, false);
                set_bit(&mut self.state.isr, v, true);
                Some(v)
            }
            None => highest(&self.state.irr).map(|_| self.state.svr as u8),
        }
    }

    /// Brings the timer up to `clock.now_ns()`: an expired one-shot,
    /// periodic or TSC-deadline timer sets the LVT timer vector in IRR
    /// (edge) unless masked; a periodic timer re-arms at the first period
    /// boundary after now.
    pub fn poll(&mut self) {
        if self.state.timer_next_ns.is_some() {
            let now = self.clock.now_ns();
            self.advance_timer(now);
        }
    }

    /// The virtual time (ns) at which the timer next expires, when an
    /// interrupt would result: armed and LVT timer unmasked. (A masked timer
    /// keeps counting, but its expiry changes nothing that a register read
    /// does not compute by itself, and the next write to the timer's
    /// registers catches up with it first.) Possibly in the past when no
    /// poll came since.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        if self.state.lvt[LVT_TIMER] & LVT_MASKED != 0 {
            return None;
        }
        self.state.timer_next_ns
    }

    /// Handles an expiry at or before `now`.
    fn advance_timer(&mut self, now: u64) {
        let Some(due) = self.state.timer_next_ns else {
            return;
        };
        if due > now {
            return;
        }
        let lvt = self.state.lvt[LVT_TIMER];
        if lvt & LVT_MASKED == 0 {
            self.accept_fixed(lvt as u8, false);
        }
        self.state.timer_next_ns = match TimerMode::of(lvt) {
            TimerMode::Periodic => self.periodic_next_after(now),
            TimerMode::TscDeadline => {
                self.state.tsc_deadline = 0;
                None
            }
            TimerMode::OneShot | TimerMode::Reserved => None,
        };
    }

    /// One period in ns: `initial count + 1` counts (QEMU) times the divider.
    fn period_ns(&self) -> u64 {
        (u64::from(self.state.initial_count) + 1) << count_shift(self.state.divide_conf)
    }

    /// The first periodic boundary after `now`.
    fn periodic_next_after(&self, now: u64) -> Option<u64> {
        if self.state.initial_count == 0 {
            return None;
        }
        let period = self.period_ns();
        let load = self.state.timer_load_ns;
        let k = now.saturating_sub(load) / period + 1;
        u64::try_from(u128::from(load) + u128::from(k) * u128::from(period)).ok()
    }

    /// The expiry after `now` of the timer as programmed in one-shot or
    /// periodic mode, counting from the load time (QEMU's `apic_next_timer`).
    fn next_expiry_after(&self, now: u64) -> Option<u64> {
        match self.timer_mode() {
            TimerMode::OneShot => {
                if self.state.initial_count == 0 {
                    return None;
                }
                let due = self.state.timer_load_ns.checked_add(self.period_ns())?;
                (due > now).then_some(due)
            }
            TimerMode::Periodic => self.periodic_next_after(now),
            TimerMode::TscDeadline | TimerMode::Reserved => None,
        }
    }

    /// The current count register at `now`.
    fn current_count(&self, now: u64) -> u32 {
        let ic = u64::from(self.state.initial_count);
        let d = now.saturating_sub(self.state.timer_load_ns) >> count_shift(self.state.divide_conf);
        match self.timer_mode() {
            TimerMode::Periodic => (ic - d % (ic + 1)) as u32,
            TimerMode::OneShot => ic.saturating_sub(d) as u32,
            TimerMode::TscDeadline | TimerMode::Reserved => 0,
        }
    }

    /// MMIO read at `offset` within the page, any size and alignment. As
    /// QEMU's memory core does, the access is split into naturally aligned
    /// pieces of at most 4 bytes; a 4-byte piece reads the register at
    /// `(offset >> 4) & 0xff` (so the 4-byte words at +4, +8 and +12 repeat
    /// it), smaller pieces read 0.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut pos = 0;
        while pos < data.len() {
            let addr = offset.wrapping_add(pos as u64);
            let len = piece_len(addr, data.len() - pos);
            let value = if len == 4 && addr < LAPIC_SIZE {
                self.read_reg((addr >> 4) & 0xff)
            } else {
                0
            };
            data[pos..pos + len].copy_from_slice(&value.to_le_bytes()[..len]);
            pos += len;
        }
    }

    /// MMIO write at `offset`, split into pieces as [`Self::read`]; pieces
    /// smaller than 4 bytes are ignored (QEMU). When several pieces ask for
    /// something (an 8-byte write to EOI or ICR low is two writes in QEMU),
    /// the first effect is returned.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> LapicEffect {
        let mut pos = 0;
        let mut effect = LapicEffect::None;
        while pos < data.len() {
            let addr = offset.wrapping_add(pos as u64);
            let len = piece_len(addr, data.len() - pos);
            if len == 4 && addr < LAPIC_SIZE {
                let mut bytes = [0u8; 4];
                bytes.copy_from_slice(&data[pos..pos + 4]);
                let e = self.write_reg((addr >> 4) & 0xff, u32::from_le_bytes(bytes));
                if effect == LapicEffect::None {
                    effect = e;
                }
            }
            pos += len;
        }
        effect
    }

    fn read_reg(&mut self, index: u64) -> u32 {
        let s = &self.state;
        match index {
            REG_ID => u32::from(s.id) << 24,
            REG_VERSION => LAPIC_VERSION,
            REG_TPR => u32::from(s.tpr),
            REG_APR | REG_EOI => 0,
            REG_PPR => u32::from(self.ppr()),
            REG_LDR => u32::from(s.ldr) << 24,
            REG_DFR => u32::from(s.dfr_model) << 28 | 0x0fff_ffff,
            REG_SVR => s.svr,
            0x10..=0x17 => s.isr[(index - REG_ISR) as usize],
            0x18..=0x1f => s.tmr[(index - REG_TMR) as usize],
            0x20..=0x27 => s.irr[(index - REG_IRR) as usize],
            REG_ESR => s.esr,
            REG_ICR_LOW => s.icr_low,
            REG_ICR_HIGH => s.icr_high,
            0x32..=0x37 => s.lvt[(index - REG_LVT) as usize],
            REG_INITIAL_COUNT => s.initial_count,
            REG_CURRENT_COUNT => match self.timer_mode() {
                TimerMode::OneShot | TimerMode::Periodic => self.current_count(self.clock.now_ns()),
                TimerMode::TscDeadline | TimerMode::Reserved => 0,
            },
            REG_DIVIDE => s.divide_conf,
            _ => {
                self.state.esr_pending |= ESR_ILLEGAL_REGISTER;
                0
            }
        }
    }

    fn write_reg(&mut self, index: u64, value: u32) -> LapicEffect {
        match index {
            // QEMU sends an MSI for writes to the first 16 bytes; not modelled.
            0x00 => {}
            REG_ID => self.state.id = (value >> 24) as u8,
            REG_TPR => self.state.tpr = value as u8,
            REG_VERSION | REG_APR | REG_PPR | 0x10..=0x27 | REG_CURRENT_COUNT => {}
            REG_EOI => return self.eoi(),
            REG_LDR => self.state.ldr = (value >> 24) as u8,
            REG_DFR => self.state.dfr_model = (value >> 28) as u8,
            REG_SVR => {
                if value & SVR_ENABLE == 0 {
                    self.software_disable();
                }
                self.state.svr = value & SVR_WRITABLE;
            }
            REG_ESR => {
                self.state.esr = std::mem::take(&mut self.state.esr_pending);
            }
            REG_ICR_LOW => {
                self.state.icr_low = value & ICR_LOW_WRITABLE;
                return self.send_ipi();
            }
            REG_ICR_HIGH => self.state.icr_high = value & ICR_HIGH_WRITABLE,
            0x32..=0x37 => self.write_lvt((index - REG_LVT) as usize, value),
            REG_INITIAL_COUNT => self.write_initial_count(value),
            REG_DIVIDE => {
                if self.state.timer_next_ns.is_some() {
                    let now = self.clock.now_ns();
                    self.advance_timer(now);
                }
                // As QEMU: the armed expiry stays; later counts and periods
                // use the new divider.
                self.state.divide_conf = value & DIVIDE_WRITABLE;
            }
            _ => self.state.esr_pending |= ESR_ILLEGAL_REGISTER,
        }
        LapicEffect::None
    }

    fn eoi(&mut self) -> LapicEffect {
        match highest(&self.state.isr) {
            Some(vector) => {
                set_bit(&mut self.state.isr, vector, false);
                LapicEffect::Eoi {
                    vector,
                    level: bit(&self.state.tmr, vector),
                }
            }
            None => LapicEffect::None,
        }
    }

    /// Sends the IPI in the ICR: a fixed or lowest-priority one that reaches
    /// this APIC (shorthand self or all-including-self, or a destination
    /// this APIC matches) is accepted here; everything else is the caller's.
    fn send_ipi(&mut self) -> LapicEffect {
        let low = self.state.icr_low;
        let ipi = Ipi {
            vector: low as u8,
            delivery_mode: ((low >> 8) & 7) as u8,
            shorthand: ((low >> 18) & 3) as u8,
            dest: (self.state.icr_high >> 24) as u8,
            logical: low & (1 << 11) != 0,
            level: low & (1 << 15) != 0,
            assert: low & (1 << 14) != 0,
        };
        let to_self = match ipi.shorthand {
            0 => self.matches_destination(ipi.dest, ipi.logical),
            1 | 2 => true,
            _ => false,
        };
        // Only this APIC can match: self, or its own physical ID.
        let only_self = ipi.shorthand == 1 || (ipi.shorthand == 0 && !ipi.logical && ipi.dest == self.state.id);
        if to_self && ipi.delivery_mode <= 1 {
            self.accept_fixed(ipi.vector, ipi.level);
            if only_self {
                return LapicEffect::None;
            }
        }
        // The others' part (a broadcast, a logical destination, another
        // ID), and every other delivery mode, is the caller's.
        LapicEffect::Ipi(ipi)
    }

    fn write_lvt(&mut self, n: usize, value: u32) {
        let mut value = value & LVT_WRITABLE[n];
        if !self.software_enabled() {
            value |= LVT_MASKED;
        }
        if n != LVT_TIMER {
            self.state.lvt[n] = value;
            return;
        }
        let now = self.clock.now_ns();
        self.advance_timer(now);
        let was_deadline = self.timer_mode() == TimerMode::TscDeadline;
        self.state.lvt[LVT_TIMER] = value;
        let mode = self.timer_mode();
        if was_deadline != (mode == TimerMode::TscDeadline) {
            // Entering or leaving TSC-deadline mode disarms the timer (KVM).
            self.state.initial_count = 0;
            self.state.tsc_deadline = 0;
            self.state.timer_next_ns = None;
        } else if mode != TimerMode::TscDeadline {
            // QEMU recomputes the expiry from the load time.
            self.state.timer_next_ns = self.next_expiry_after(now);
        }
    }

    fn write_initial_count(&mut self, value: u32) {
        if self.timer_mode() == TimerMode::TscDeadline {
            return; // ignored in TSC-deadline mode (KVM)
        }
        let now = self.clock.now_ns();
        self.advance_timer(now);
        self.state.initial_count = value;
        self.state.timer_load_ns = now;
        self.state.timer_next_ns = self.next_expiry_after(now);
    }
}

/// The size of the next piece of an access at `addr` with `remaining` bytes
/// left: the largest power of two that is at most 4, at most `remaining`
/// and at most the alignment of `addr` (QEMU's `memory_access_size`).
fn piece_len(addr: u64, remaining: usize) -> usize {
    let align = 1usize << addr.trailing_zeros().min(2);
    let len = remaining.min(4).min(align);
    1 << (usize::BITS - 1 - len.leading_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::ManualClock;
    use proptest::prelude::*;

    const TSC_HZ: u64 = 2_500_000_000;
    const START: u64 = 1_000;

    struct Rig {
        clock: Arc<ManualClock>,
        apic: LocalApic,
    }

    impl Rig {
        fn new() -> Self {
            let clock = Arc::new(ManualClock::new(START));
            let apic = LocalApic::new(clock.clone(), TSC_HZ);
            Self { clock, apic }
        }
        /// Software-enabled with spurious vector 0xFF.
        fn enabled() -> Self {
            let mut r = Self::new();
            r.w(0xf0, 0x1ff);
            r
        }
        fn w(&mut self, off: u64, v: u32) -> LapicEffect {
            self.apic.write(off, &v.to_le_bytes())
        }
        fn r(&mut self, off: u64) -> u32 {
            let mut b = [0u8; 4];
            self.apic.read(off, &mut b);
            u32::from_le_bytes(b)
        }
        fn irr(&self, v: u8) -> bool {
            bit(&self.apic.state.irr, v)
        }
        /// Timer: LVT value, divide configuration, initial count.
        fn timer(&mut self, lvt: u32, divide: u32, count: u32) {
            self.w(0x320, lvt);
            self.w(0x3e0, divide);
            self.w(0x380, count);
        }
        /// Takes the pending vector and ends it.
        fn take(&mut self) -> Option<u8> {
            let v = self.apic.pending_vector()?;
            assert_eq!(self.apic.acknowledge(), Some(v));
            self.w(0xb0, 0);
            Some(v)
        }
    }

    #[test]
    fn reset_values() {
        let mut r = Rig::new();
        assert_eq!(r.apic.base_msr(), 0xfee0_0900);
        assert_eq!(r.apic.mmio_base(), LAPIC_BASE);
        assert_eq!(r.r(0x20), 0);
        assert_eq!(r.r(0x30), 0x0005_0014);
        assert_eq!(r.r(0x80), 0);
        assert_eq!(r.r(0xd0), 0);
        assert_eq!(r.r(0xe0), 0xffff_ffff);
        assert_eq!(r.r(0xf0), 0xff);
        assert_eq!(r.r(0x350), 0x700, "LINT0 ExtINT, unmasked");
        for off in [0x320, 0x330, 0x340, 0x360, 0x370] {
            assert_eq!(r.r(off), 0x1_0000, "LVT {off:#x} masked");
        }
        assert_eq!(r.r(0x380), 0);
        assert_eq!(r.r(0x390), 0);
        assert_eq!(r.r(0x3e0), 0);
        assert!(r.apic.pic_interrupts_accepted());
        assert_eq!(r.apic.pending_vector(), None);
        assert_eq!(r.apic.next_deadline_ns(), None);
        assert_eq!(r.apic.tsc_deadline_msr(), 0);
    }

    #[test]
    fn lint0_decides_whether_the_pic_reaches_the_cpu() {
        let mut r = Rig::enabled();
        assert!(r.apic.pic_interrupts_accepted());
        r.w(0x350, 0x1_0700);
        assert!(!r.apic.pic_interrupts_accepted(), "masked ExtINT");
        r.w(0x350, 0x700);
        assert!(r.apic.pic_interrupts_accepted());
        r.w(0x350, 0x0030);
        assert!(!r.apic.pic_interrupts_accepted(), "unmasked, but fixed");
        r.apic.set_base_msr(0xfee0_0000).unwrap();
        assert!(r.apic.pic_interrupts_accepted(), "globally disabled APIC");
    }

    #[test]
    fn plain_registers() {
        let mut r = Rig::new();
        r.w(0x20, 0x0300_0000);
        assert_eq!(r.r(0x20), 0x0300_0000);
        r.w(0x30, 0x1234);
        assert_eq!(r.r(0x30), LAPIC_VERSION, "version is read-only");
        r.w(0x80, 0x1ab);
        assert_eq!(r.r(0x80), 0xab, "TPR has 8 bits");
        assert_eq!(r.r(0x90), 0, "APR reads 0");
        r.w(0x90, 0xff);
        assert_eq!(r.r(0x90), 0);
        assert_eq!(r.r(0xa0), 0xab, "PPR follows TPR");
        r.w(0xa0, 0);
        r.w(0xd0, 0x8812_3456);
        assert_eq!(r.r(0xd0), 0x8800_0000);
        r.w(0xe0, 0x0123_4567);
        assert_eq!(r.r(0xe0), 0x0fff_ffff, "cluster model");
        r.w(0xf0, 0xfff);
        assert_eq!(r.r(0xf0), 0x1ff);
        r.w(0x310, 0xffff_ffff);
        assert_eq!(r.r(0x310), 0xff00_0000);
        r.w(0x3e0, 0xffff_ffff);
        assert_eq!(r.r(0x3e0), 0xb);
        // Read-only arrays ignore writes.
        r.w(0x200, 0xffff_ffff);
        r.w(0x100, 0xffff_ffff);
        assert_eq!(r.r(0x200), 0);
        assert_eq!(r.r(0x100), 0);
        assert_eq!(r.apic.state().esr_pending, 0);
    }

    #[test]
    fn esr_latches_errors_on_write() {
        let mut r = Rig::new();
        assert_eq!(r.r(0x2a0), 0, "a register that does not exist reads 0");
        assert_eq!(r.r(0x280), 0, "not latched yet");
        r.w(0x280, 0);
        assert_eq!(r.r(0x280), ESR_ILLEGAL_REGISTER);
        r.w(0x280, 0);
        assert_eq!(r.r(0x280), 0, "the write cleared the errors");
        r.w(0x3f0, 1);
        r.w(0x280, 0);
        assert_eq!(r.r(0x280), ESR_ILLEGAL_REGISTER, "writes to missing registers count");
    }

    #[test]
    fn software_disable_masks_the_lvt() {
        let mut r = Rig::enabled();
        r.w(0x320, 0x30);
        r.w(0x370, 0x31);
        assert_eq!(r.r(0x320), 0x30);
        r.w(0xf0, 0x0ff);
        assert_eq!(r.r(0x320), 0x1_0030);
        assert_eq!(r.r(0x370), 0x1_0031);
        assert_eq!(r.r(0x350), 0x1_0700);
        r.w(0x320, 0x40);
        assert_eq!(r.r(0x320), 0x1_0040, "cannot unmask while disabled");
        r.w(0xf0, 0x1ff);
        assert_eq!(r.r(0x320), 0x1_0040, "enabling leaves the masks");
        r.w(0x320, 0x40);
        assert_eq!(r.r(0x320), 0x40);
        // Reserved bits and the read-only status bits of LVT entries.
        r.w(0x350, 0xffff_ffff);
        assert_eq!(r.r(0x350), 0x1_a7ff);
        r.w(0x320, 0xffff_ffff);
        assert_eq!(r.r(0x320), 0x7_00ff);
    }

    #[test]
    fn nothing_is_taken_while_disabled() {
        let mut r = Rig::new();
        r.apic.accept_fixed(0x40, false);
        assert_eq!(r.apic.pending_vector(), None, "software-disabled");
        assert_eq!(r.apic.acknowledge(), None);
        r.w(0xf0, 0x1ff);
        assert_eq!(r.apic.pending_vector(), Some(0x40), "held in IRR");
        r.apic.set_base_msr(0xfee0_0000).unwrap();
        assert_eq!(r.apic.pending_vector(), None);
        assert_eq!(r.r(0xf0) & 0x100, 0, "global disable clears SVR enable");
        r.apic.set_base_msr(0xfee0_0800).unwrap();
        assert_eq!(r.apic.base_msr(), 0xfee0_0900, "BSP bit kept");
        assert_eq!(r.apic.pending_vector(), None);
        r.w(0xf0, 0x1ff);
        assert_eq!(r.apic.pending_vector(), Some(0x40));
    }

    #[test]
    fn base_msr_reserved_bits_fault() {
        let mut r = Rig::new();
        for bad in [0xfee0_0901u64, 0xfee0_0b00, 0xfee0_0d00, 1 << 52, 1 << 63] {
            assert_eq!(r.apic.set_base_msr(bad), Err(()), "{bad:#x}");
        }
        assert_eq!(r.apic.base_msr(), 0xfee0_0900);
        r.apic.set_base_msr(0x1_2345_6000 | BASE_ENABLE).unwrap();
        assert_eq!(r.apic.mmio_base(), 0x1_2345_6000);
        assert_eq!(r.apic.base_msr(), 0x1_2345_6900);
        r.apic.set_base_msr(0xfee0_0800).unwrap();
        assert_eq!(r.apic.base_msr(), 0xfee0_0900, "BSP cannot be cleared");
    }

    #[test]
    fn eoi_of_level_and_edge_vectors() {
        let mut r = Rig::enabled();
        r.apic.accept_fixed(0x41, true);
        r.apic.accept_fixed(0x31, false);
        assert_eq!(r.r(0x180 + 0x20), 1 << 1, "TMR bit of 0x41");
        assert_eq!(r.r(0x200 + 0x20), 1 << 1, "IRR bit of 0x41");
        assert_eq!(r.r(0x200 + 0x10), 1 << 17, "IRR bit of 0x31");
        assert_eq!(r.apic.acknowledge(), Some(0x41));
        assert_eq!(r.r(0x100 + 0x20), 1 << 1, "ISR bit of 0x41");
        assert_eq!(r.r(0xa0), 0x40, "PPR is the in-service class");
        assert_eq!(r.apic.pending_vector(), None, "0x31 is of a lower class");
        assert_eq!(r.apic.acknowledge(), Some(0xff), "spurious: IRR holds a masked vector");
        assert_eq!(r.apic.state().isr, [0, 0, 1 << 1, 0, 0, 0, 0, 0]);
        assert_eq!(
            r.w(0xb0, 0),
            LapicEffect::Eoi {
                vector: 0x41,
                level: true
            }
        );
        assert_eq!(r.apic.acknowledge(), Some(0x31));
        assert_eq!(
            r.w(0xb0, 0),
            LapicEffect::Eoi {
                vector: 0x31,
                level: false
            }
        );
        assert_eq!(r.w(0xb0, 0), LapicEffect::None, "nothing in service");
        assert_eq!(r.apic.acknowledge(), None, "nothing requested");
        // Re-accepting edge-triggered clears the TMR bit.
        r.apic.accept_fixed(0x41, false);
        assert_eq!(r.r(0x180 + 0x20), 0);
    }

    #[test]
    fn nested_in_service_vectors_end_highest_first() {
        let mut r = Rig::enabled();
        r.apic.accept_fixed(0x30, false);
        assert_eq!(r.apic.acknowledge(), Some(0x30));
        r.apic.accept_fixed(0x50, true);
        assert_eq!(r.apic.acknowledge(), Some(0x50), "higher class preempts");
        assert_eq!(
            r.w(0xb0, 0),
            LapicEffect::Eoi {
                vector: 0x50,
                level: true
            }
        );
        assert_eq!(
            r.w(0xb0, 0),
            LapicEffect::Eoi {
                vector: 0x30,
                level: false
            }
        );
    }

    #[test]
    fn tpr_masks_by_class() {
        let mut r = Rig::enabled();
        r.apic.accept_fixed(0x55, false);
        r.w(0x80, 0x50);
        assert_eq!(r.apic.pending_vector(), None, "class 5 <= TPR class 5");
        assert_eq!(r.r(0xa0), 0x50);
        r.w(0x80, 0x5f);
        assert_eq!(r.apic.pending_vector(), None);
        r.w(0x80, 0x4f);
        assert_eq!(r.apic.pending_vector(), Some(0x55));
        r.apic.set_cr8(6);
        assert_eq!(r.r(0x80), 0x60);
        assert_eq!(r.apic.cr8(), 6);
        assert_eq!(r.apic.pending_vector(), None);
        r.apic.set_cr8(0);
        assert_eq!(r.apic.pending_vector(), Some(0x55));
        // PPR: TPR's low bits count only when TPR's class wins.
        assert_eq!(r.apic.acknowledge(), Some(0x55));
        r.w(0x80, 0x3a);
        assert_eq!(r.r(0xa0), 0x50);
        r.w(0x80, 0x5a);
        assert_eq!(r.r(0xa0), 0x5a);
    }

    #[test]
    fn application_processors_reset_without_the_bsp_flag_and_init_keeps_the_id() {
        let clock = Arc::new(ManualClock::new(0));
        let mut ap = LocalApic::new_ap(3, clock, 1_000_000_000);
        assert_eq!(ap.id(), 3);
        assert_eq!(ap.base_msr(), LAPIC_BASE | BASE_ENABLE);
        assert!(!ap.pic_interrupts_accepted(), "LINT0 is masked on an AP");
        ap.write(0xf0, &0x1ffu32.to_le_bytes());
        ap.write(0x80, &0x20u32.to_le_bytes());
        ap.accept_fixed(0x40, false);
        ap.set_base_msr(0xfed0_0800).unwrap();
        ap.init();
        assert_eq!(ap.id(), 3);
        assert_eq!(ap.base_msr(), 0xfed0_0800, "INIT keeps the base");
        assert_eq!(ap.cr8(), 0);
        assert_eq!(ap.pending_vector(), None);
        let mut d = [0u8; 4];
        ap.read(0xf0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xff);
    }

    #[test]
    fn self_ipis_are_accepted_here() {
        let mut r = Rig::enabled();
        assert_eq!(r.w(0x300, 0x0004_1061), LapicEffect::None, "shorthand self");
        assert!(r.irr(0x61));
        assert_eq!(r.r(0x300), 0x0004_0061, "delivery status reads 0");
        // Accepted here, and handed on for the others.
        assert!(
            matches!(
                r.w(0x300, 0x0008_0062),
                LapicEffect::Ipi(Ipi {
                    vector: 0x62,
                    shorthand: 2,
                    ..
                })
            ),
            "all including self"
        );
        assert!(r.irr(0x62));
        r.w(0x310, 0);
        assert_eq!(r.w(0x300, 0x0000_0063), LapicEffect::None, "physical ID 0");
        assert!(r.irr(0x63));
        assert_eq!(r.w(0x300, 0x0000_8064), LapicEffect::None, "level-triggered");
        assert!(bit(&r.apic.state.tmr, 0x64));
        r.w(0xd0, 0x0100_0000);
        r.w(0x310, 0x0300_0000);
        // A logical destination may name others too: accepted here and
        // handed on.
        assert!(
            matches!(
                r.w(0x300, 0x0000_0865),
                LapicEffect::Ipi(Ipi {
                    vector: 0x65,
                    logical: true,
                    ..
                })
            ),
            "logical flat, common bit"
        );
        assert!(r.irr(0x65));
        // Other destinations and delivery modes go to the caller.
        assert_eq!(
            r.w(0x300, 0x0000_0066),
            LapicEffect::Ipi(Ipi {
                vector: 0x66,
                delivery_mode: 0,
                shorthand: 0,
                dest: 3,
                logical: false,
                level: false,
                assert: false
            })
        );
        assert!(!r.irr(0x66));
        assert_eq!(
            r.w(0x300, 0x000c_4067),
            LapicEffect::Ipi(Ipi {
                vector: 0x67,
                delivery_mode: 0,
                shorthand: 3,
                dest: 3,
                logical: false,
                level: false,
                assert: true
            })
        );
        assert_eq!(
            r.w(0x300, 0x0004_0400),
            LapicEffect::Ipi(Ipi {
                vector: 0,
                delivery_mode: 4,
                shorthand: 1,
                dest: 3,
                logical: false,
                level: false,
                assert: false
            }),
            "NMI to self"
        );
        r.w(0x310, 0x0100_0000);
        assert_eq!(
            r.w(0x300, 0x0000_4500),
            LapicEffect::Ipi(Ipi {
                vector: 0,
                delivery_mode: 5,
                shorthand: 0,
                dest: 1,
                logical: false,
                level: false,
                assert: true
            }),
            "INIT"
        );
        assert_eq!(
            r.w(0x300, 0x0000_0698),
            LapicEffect::Ipi(Ipi {
                vector: 0x98,
                delivery_mode: 6,
                shorthand: 0,
                dest: 1,
                logical: false,
                level: false,
                assert: false
            }),
            "SIPI"
        );
        let mut taken = Vec::new();
        while let Some(v) = r.take() {
            taken.push(v);
        }
        assert_eq!(taken, [0x65, 0x64, 0x63, 0x62, 0x61]);
    }

    #[test]
    fn destinations() {
        let mut r = Rig::new();
        r.w(0x20, 0x0500_0000);
        assert!(r.apic.matches_destination(5, false));
        assert!(!r.apic.matches_destination(4, false));
        assert!(r.apic.matches_destination(0xff, false));
        assert!(r.apic.matches_destination(0xff, true));
        assert!(!r.apic.matches_destination(1, true), "LDR 0");
        r.w(0xd0, 0x2400_0000);
        assert!(r.apic.matches_destination(0x04, true));
        assert!(r.apic.matches_destination(0x21, true));
        assert!(!r.apic.matches_destination(0x42, true));
        r.w(0xe0, 0x0fff_ffff); // cluster
        assert!(r.apic.matches_destination(0x24, true));
        assert!(r.apic.matches_destination(0x2f, true));
        assert!(!r.apic.matches_destination(0x34, true), "other cluster");
        assert!(!r.apic.matches_destination(0x23, true), "no common bit");
        r.w(0xe0, 0x5fff_ffff); // neither model
        assert!(!r.apic.matches_destination(0x24, true));
    }

    #[test]
    fn one_shot_timer() {
        let mut r = Rig::enabled();
        r.timer(0x40, 0xb, 1000);
        assert_eq!(r.r(0x390), 1000);
        assert_eq!(r.apic.next_deadline_ns(), Some(START + 1001));
        r.clock.advance(400);
        assert_eq!(r.r(0x390), 600);
        r.clock.set(START + 1000);
        assert_eq!(r.r(0x390), 0);
        r.apic.poll();
        assert!(!r.irr(0x40));
        r.clock.set(START + 1001);
        r.apic.poll();
        assert!(r.irr(0x40));
        assert!(!bit(&r.apic.state.tmr, 0x40), "edge");
        assert_eq!(r.apic.next_deadline_ns(), None);
        assert_eq!(r.take(), Some(0x40));
        r.clock.advance(10_000);
        r.apic.poll();
        assert_eq!(r.take(), None, "fires once");
        assert_eq!(r.r(0x390), 0);
        assert_eq!(r.r(0x380), 1000);
        // The divider scales the count: divide by 16 (0b0011).
        r.timer(0x40, 0x3, 100);
        let load = r.clock.now_ns();
        r.clock.advance(16 * 30 + 15);
        assert_eq!(r.r(0x390), 70);
        assert_eq!(r.apic.next_deadline_ns(), Some(load + 16 * 101));
    }

    #[test]
    fn divide_encodings() {
        let expect = [
            (0b0000, 1),
            (0b0001, 2),
            (0b0010, 3),
            (0b0011, 4),
            (0b1000, 5),
            (0b1001, 6),
            (0b1010, 7),
            (0b1011, 0),
        ];
        for (conf, shift) in expect {
            assert_eq!(count_shift(conf), shift, "{conf:#b}");
        }
    }

    #[test]
    fn periodic_timer_and_catch_up() {
        let mut r = Rig::enabled();
        r.timer(0x2_0041, 0xb, 99); // period 100 ns
        for k in 1..=5u64 {
            let d = r.apic.next_deadline_ns().unwrap();
            assert_eq!(d, START + 100 * k);
            r.clock.set(d - 1);
            r.apic.poll();
            assert!(!r.irr(0x41));
            assert_eq!(r.r(0x390), 0);
            r.clock.set(d);
            r.apic.poll();
            assert_eq!(r.r(0x390), 99, "reloaded");
            assert_eq!(r.take(), Some(0x41));
        }
        // Ten periods missed: one interrupt, re-armed after now.
        r.clock.advance(1050);
        r.apic.poll();
        assert_eq!(r.take(), Some(0x41));
        assert_eq!(r.take(), None);
        assert_eq!(r.apic.next_deadline_ns(), Some(START + 1600));
        assert_eq!(r.r(0x390), 99 - 50);
        // Count 0 stops it.
        r.w(0x380, 0);
        assert_eq!(r.apic.next_deadline_ns(), None);
        assert_eq!(r.r(0x390), 0);
        r.clock.advance(10_000);
        r.apic.poll();
        assert_eq!(r.take(), None);
    }

    #[test]
    fn masked_timer_counts_silently() {
        let mut r = Rig::enabled();
        r.timer(0x1_0042, 0xb, 1000);
        assert_eq!(r.apic.next_deadline_ns(), None, "masked: no interrupt to wait for");
        assert_eq!(r.apic.state().timer_next_ns, Some(START + 1001), "but it counts");
        r.clock.advance(2000);
        r.apic.poll();
        r.w(0x320, 0x42);
        assert_eq!(r.take(), None, "the expiry under the mask is gone");
        assert_eq!(r.apic.next_deadline_ns(), None);
        // Periodic: unmasking resumes at the next boundary.
        r.timer(0x3_0042, 0xb, 99);
        let load = r.clock.now_ns();
        r.clock.advance(250);
        r.w(0x320, 0x2_0042);
        assert_eq!(r.take(), None);
        assert_eq!(r.apic.next_deadline_ns(), Some(load + 300));
        // An expiry that passed while unmasked survives a later mask.
        r.clock.advance(60);
        r.w(0x320, 0x3_0042);
        assert_eq!(r.take(), Some(0x42));
        // Software disable too.
        r.w(0x320, 0x2_0042);
        r.clock.advance(100);
        r.w(0xf0, 0xff);
        assert!(r.irr(0x42));
        assert_eq!(r.apic.next_deadline_ns(), None);
    }

    #[test]
    fn mode_switch_recomputes_from_the_load_time() {
        let mut r = Rig::enabled();
        r.timer(0x2_0043, 0xb, 99);
        r.clock.advance(350);
        r.apic.poll();
        assert_eq!(r.take(), Some(0x43));
        r.w(0x320, 0x43); // one-shot: its single expiry (at +100) is past
        assert_eq!(r.apic.next_deadline_ns(), None);
        assert_eq!(r.r(0x390), 0);
        r.w(0x320, 0x2_0043); // periodic again: next boundary
        assert_eq!(r.apic.next_deadline_ns(), Some(START + 400));
        // Reserved mode 3 stops the timer.
        r.w(0x320, 0x6_0043);
        assert_eq!(r.apic.next_deadline_ns(), None);
        assert_eq!(r.r(0x390), 0);
    }

    #[test]
    fn tsc_deadline_timer() {
        let mut r = Rig::enabled();
        r.apic.set_tsc_deadline_msr(5000);
        assert_eq!(r.apic.tsc_deadline_msr(), 0, "ignored outside TSC-deadline mode");
        assert_eq!(r.apic.state().tsc_deadline, 0);
        r.timer(0x4_0044, 0xb, 1234);
        assert_eq!(r.r(0x380), 0, "initial count ignored in TSC-deadline mode");
        assert_eq!(r.r(0x390), 0);
        // 2.5 GHz: TSC 10_000 is 4000 ns; 10_001 needs 4000.4 -> 4001 ns.
        let tsc_now = r.apic.tsc_at(r.clock.now_ns());
        assert_eq!(tsc_now, START * 5 / 2);
        r.apic.set_tsc_deadline_msr(10_001);
        assert_eq!(r.apic.tsc_deadline_msr(), 10_001);
        assert_eq!(r.apic.next_deadline_ns(), Some(4001));
        r.clock.set(4000);
        r.apic.poll();
        assert!(!r.irr(0x44));
        assert_eq!(r.apic.tsc_deadline_msr(), 10_001);
        r.clock.set(4001);
        assert_eq!(r.apic.tsc_deadline_msr(), 0, "passed: reads 0 even before a poll");
        r.apic.poll();
        assert_eq!(r.take(), Some(0x44));
        assert_eq!(r.apic.next_deadline_ns(), None);
        assert_eq!(r.apic.state().tsc_deadline, 0);
        // A deadline in the past expires at the next poll.
        r.apic.set_tsc_deadline_msr(1);
        assert_eq!(r.apic.next_deadline_ns(), Some(1));
        r.apic.poll();
        assert_eq!(r.take(), Some(0x44));
        // Writing 0 disarms; switching modes disarms.
        r.apic.set_tsc_deadline_msr(1_000_000);
        r.apic.set_tsc_deadline_msr(0);
        assert_eq!(r.apic.next_deadline_ns(), None);
        r.apic.set_tsc_deadline_msr(1_000_000);
        r.w(0x320, 0x44);
        assert_eq!(r.apic.next_deadline_ns(), None);
        assert_eq!(r.apic.tsc_deadline_msr(), 0);
        assert_eq!(r.apic.state().tsc_deadline, 0);
        // Leaving one-shot mode for TSC-deadline mode clears the count.
        r.w(0x380, 500);
        r.w(0x320, 0x4_0044);
        assert_eq!(r.r(0x380), 0);
        assert_eq!(r.apic.next_deadline_ns(), None);
        // Masked: the deadline passes without an interrupt.
        r.w(0x320, 0x5_0044);
        let now = r.clock.now_ns();
        r.apic.set_tsc_deadline_msr(r.apic.tsc_at(now) + 10);
        assert_eq!(r.apic.next_deadline_ns(), None);
        r.clock.advance(100);
        assert_eq!(r.apic.tsc_deadline_msr(), 0);
        r.w(0x320, 0x4_0044);
        assert_eq!(r.take(), None);
    }

    /// A guest whose TSC is ahead of the virtual TSC (KVM's TSC in a plain
    /// run): its deadlines, `rdtsc` + delta, expire delta ticks later, not
    /// once the virtual TSC has caught up with its TSC, and the MSR reads
    /// back what it wrote.
    #[test]
    fn tsc_deadline_on_a_guest_tsc_ahead_of_the_virtual_one() {
        let mut r = Rig::enabled();
        let offset: i64 = 0x385a_33c5_e58d;
        r.apic.set_tsc_offset(offset);
        r.timer(0x4_0044, 0xb, 0);
        let guest_tsc = r.apic.tsc_at(r.clock.now_ns()) + offset as u64;
        // 2.5 GHz: 2_500 ticks are 1000 ns.
        r.apic.set_tsc_deadline_msr(guest_tsc + 2_500);
        assert_eq!(r.apic.tsc_deadline_msr(), guest_tsc + 2_500);
        assert_eq!(r.apic.next_deadline_ns(), Some(START + 1000));
        r.clock.advance(1000);
        r.apic.poll();
        assert_eq!(r.take(), Some(0x44));
        assert_eq!(r.apic.tsc_deadline_msr(), 0);
        // A value behind the offset (before virtual time 0) has passed.
        r.apic.set_tsc_deadline_msr(1);
        assert_eq!(r.apic.next_deadline_ns(), Some(0));
        r.apic.poll();
        assert_eq!(r.take(), Some(0x44));
        // A negative offset: the guest's TSC is behind the virtual TSC.
        r.apic.set_tsc_offset(-2_500);
        r.apic.set_tsc_deadline_msr(2_500);
        assert_eq!(r.apic.next_deadline_ns(), Some(2000));
        // Changing the offset moves an armed deadline to the new scale.
        r.apic.set_tsc_deadline_msr(r.apic.tsc_at(START) + 5_000);
        assert_eq!(r.apic.next_deadline_ns(), Some(START + 3000));
        r.apic.set_tsc_offset(0);
        assert_eq!(r.apic.next_deadline_ns(), Some(START + 2000));
        assert_eq!(r.apic.tsc_deadline_msr(), r.apic.tsc_at(START) + 5_000);
    }

    #[test]
    fn snapshot_mid_countdown() {
        let mut r = Rig::enabled();
        r.timer(0x2_0045, 0x1, 12_345); // divide by 4
        r.clock.advance(7_777);
        let s = r.apic.state();
        let mut copy = LocalApic::from_state(&s, r.clock.clone(), TSC_HZ).unwrap();
        assert_eq!(copy.state(), s);
        let mut a = [0u8; 4];
        let mut b = [0u8; 4];
        r.apic.read(0x390, &mut a);
        copy.read(0x390, &mut b);
        assert_eq!(a, b);
        assert_eq!(u32::from_le_bytes(a), 12_345 - 7_777 / 4);
        assert_eq!(copy.next_deadline_ns(), r.apic.next_deadline_ns());
        r.clock.advance(1_000_000);
        r.apic.poll();
        copy.poll();
        assert_eq!(copy.state(), r.apic.state());
        assert_eq!(r.take(), Some(0x45));
    }

    #[test]
    fn from_state_rejects_impossible_states() {
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(0));
        let good = LapicState::reset();
        assert!(LocalApic::from_state(&good, clock.clone(), TSC_HZ).is_ok());
        let bad: [fn(&mut LapicState); 8] = [
            |s| s.base_msr |= 1,
            |s| s.svr = 0x1000,
            |s| s.lvt[0] |= 1 << 12,
            |s| s.divide_conf = 4,
            |s| s.dfr_model = 0x10,
            |s| s.icr_low = 1 << 12,
            |s| s.tsc_deadline = 5,
            |s| {
                s.lvt[0] = 0x6_0000;
                s.timer_next_ns = Some(5);
            },
        ];
        for (i, f) in bad.iter().enumerate() {
            let mut s = good.clone();
            f(&mut s);
            assert!(LocalApic::from_state(&s, clock.clone(), TSC_HZ).is_err(), "case {i}");
        }
    }

    #[test]
    fn odd_accesses_as_qemu() {
        let mut r = Rig::new();
        r.w(0x20, 0x0700_0000);
        let mut b = [0xaau8; 8];
        r.apic.read(0x20, &mut b);
        assert_eq!(b, [0, 0, 0, 7, 0, 0, 0, 7], "8 bytes: the register twice");
        let mut b = [0xaau8; 1];
        r.apic.read(0x23, &mut b);
        assert_eq!(b, [0], "byte reads give 0");
        let mut b = [0xaau8; 4];
        r.apic.read(0x22, &mut b);
        assert_eq!(b, [0; 4], "unaligned: two 2-byte pieces");
        r.apic.read(0x24, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0700_0000, "+4 repeats the register");
        r.apic.write(0x22, &[0, 9]);
        r.apic.write(0x21, &[0, 0, 0, 9]);
        r.apic.write(0x23, &[9]);
        assert_eq!(r.r(0x20), 0x0700_0000, "narrow writes are ignored");
        r.apic.write(0x2c, &0x0900_0000u32.to_le_bytes());
        assert_eq!(r.r(0x20), 0x0900_0000);
        r.apic.read(0x1000, &mut b);
        assert_eq!(b, [0; 4]);
        r.apic.write(0x1020, &[1, 2, 3, 4]);
        r.apic.read(0xffff_ffff_ffff_fffe, &mut b);
        assert_eq!(r.r(0x20), 0x0900_0000);
        // An 8-byte EOI is two EOIs; the first one is reported.
        r.w(0xf0, 0x1ff);
        r.apic.accept_fixed(0x30, false);
        r.apic.acknowledge();
        r.apic.accept_fixed(0x40, true);
        r.apic.acknowledge();
        assert_eq!(
            r.apic.write(0xb0, &[0; 8]),
            LapicEffect::Eoi {
                vector: 0x40,
                level: true
            }
        );
        assert_eq!(r.apic.state().isr, [0; 8]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, u8, u32),
        Read(u64, u8),
        Advance(u64),
        Poll,
        Ack,
        Accept(u8, bool),
        BaseMsr(u64),
        Deadline(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let reg = prop_oneof![
            (0u64..0x40).prop_map(|i| i << 4),
            0u64..0x1010,
            prop::sample::select(vec![0xb0u64, 0xf0, 0x300, 0x320, 0x380, 0x390, 0x3e0, 0x80, 0x280]),
        ];
        let value = prop_oneof![
            any::<u32>(),
            0u32..0x200,
            prop::sample::select(vec![0x1ffu32, 0x2_0040, 0x4_0040, 0x40, 0x1_0040, 0x0004_0050, 0xb, 0]),
        ];
        prop_oneof![
            4 => (reg.clone(), prop::sample::select(vec![1u8, 2, 4, 8]), value).prop_map(|(o, s, v)| Op::Write(o, s, v)),
            2 => (reg, prop::sample::select(vec![1u8, 2, 4, 8])).prop_map(|(o, s)| Op::Read(o, s)),
            2 => (0u64..3_000).prop_map(Op::Advance),
            1 => Just(Op::Poll),
            1 => Just(Op::Ack),
            1 => (any::<u8>(), any::<bool>()).prop_map(|(v, l)| Op::Accept(v, l)),
            1 => prop_oneof![any::<u64>(), Just(0xfee0_0900u64), Just(0xfee0_0000)].prop_map(Op::BaseMsr),
            1 => (0u64..20_000).prop_map(Op::Deadline),
        ]
    }

    fn apply(apic: &mut LocalApic, clock: &ManualClock, op: &Op) -> (LapicEffect, Vec<u8>) {
        match *op {
            Op::Write(off, size, v) => {
                let bytes = u64::from(v).wrapping_mul(0x1_0000_0001).to_le_bytes();
                (apic.write(off, &bytes[..usize::from(size)]), Vec::new())
            }
            Op::Read(off, size) => {
                let mut b = vec![0u8; usize::from(size)];
                apic.read(off, &mut b);
                (LapicEffect::None, b)
            }
            Op::Advance(dt) => {
                clock.advance(dt);
                (LapicEffect::None, Vec::new())
            }
            Op::Poll => {
                apic.poll();
                (LapicEffect::None, Vec::new())
            }
            Op::Ack => (LapicEffect::None, apic.acknowledge().into_iter().collect()),
            Op::Accept(v, l) => {
                apic.accept_fixed(v, l);
                (LapicEffect::None, Vec::new())
            }
            Op::BaseMsr(v) => (LapicEffect::None, vec![u8::from(apic.set_base_msr(v).is_ok())]),
            Op::Deadline(t) => {
                apic.set_tsc_deadline_msr(t);
                (LapicEffect::None, apic.tsc_deadline_msr().to_le_bytes().to_vec())
            }
        }
    }

    proptest! {
        /// Any access sequence: no panic, every state restorable, and a
        /// restored copy behaves exactly as the original from then on.
        #[test]
        fn arbitrary_sequences_round_trip(ops in prop::collection::vec(op(), 0..150), split in 0usize..150) {
            let clock = Arc::new(ManualClock::new(START));
            let mut apic = LocalApic::new(clock.clone(), TSC_HZ);
            let split = split.min(ops.len());
            for op in &ops[..split] {
                apply(&mut apic, &clock, op);
                let _ = apic.pending_vector();
                let _ = apic.pic_interrupts_accepted();
                if let Some(d) = apic.next_deadline_ns() {
                    prop_assert!(apic.state().timer_next_ns == Some(d));
                }
                let s = apic.state();
                prop_assert_eq!(LocalApic::from_state(&s, clock.clone(), TSC_HZ).map(|a| a.state()), Ok(s));
            }
            let mut copy = LocalApic::from_state(&apic.state(), clock.clone(), TSC_HZ).unwrap();
            for op in &ops[split..] {
                // The copy sees the same clock: apply each time-free op to
                // both, the clock advance once.
                let a = apply(&mut apic, &clock, op);
                let b = match op {
                    Op::Advance(_) => a.clone(),
                    _ => apply(&mut copy, &clock, op),
                };
                prop_assert_eq!(a, b);
                prop_assert_eq!(apic.state(), copy.state());
            }
        }

        /// Polled at random times (and each interrupt taken at once), the
        /// periodic timer raises one interrupt per poll that crossed at
        /// least one period boundary `load + k * (count + 1) * divider`.
        #[test]
        fn periodic_interrupts_match_reference(
            count in 1u32..3000,
            divide in prop::sample::select(vec![0xbu32, 0, 1, 2, 3, 8, 9, 10]),
            steps in prop::collection::vec(0u64..20_000, 1..60),
        ) {
            let mut r = Rig::enabled();
            r.timer(0x2_0050, divide, count);
            let load = r.clock.now_ns();
            let period = (u64::from(count) + 1) << count_shift(divide);
            let mut got = 0u64;
            let mut expected = 0u64;
            let mut elapsed = 0u64;
            for dt in steps {
                let before = elapsed / period;
                elapsed += dt;
                r.clock.set(load + elapsed);
                r.apic.poll();
                if elapsed / period > before {
                    expected += 1;
                }
                if r.take().is_some() {
                    got += 1;
                }
                prop_assert_eq!(r.apic.next_deadline_ns(), Some(load + (elapsed / period + 1) * period));
                let cc = u64::from(r.r(0x390));
                prop_assert_eq!(cc, u64::from(count) - ((elapsed >> count_shift(divide)) % (u64::from(count) + 1)));
            }
            prop_assert_eq!(got, expected);
        }

        /// With polls at every deadline, the count is elapsed / period.
        #[test]
        fn periodic_polled_at_deadlines(count in 0u32..500, divide in prop::sample::select(vec![0xbu32, 0, 3]), total in 0u64..200_000) {
            let mut r = Rig::enabled();
            r.timer(0x2_0051, divide, count);
            let load = r.clock.now_ns();
            let mut got = 0u64;
            while let Some(d) = r.apic.next_deadline_ns() {
                if d > load + total { break; }
                r.clock.set(d);
                r.apic.poll();
                if r.take().is_some() { got += 1; }
            }
            let expected = if count == 0 { 0 } else { total / ((u64::from(count) + 1) << count_shift(divide)) };
            prop_assert_eq!(got, expected);
        }
    }
}
