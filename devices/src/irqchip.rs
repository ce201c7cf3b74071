//! The interrupt controllers of one CPU as one device: the 8259A PIC pair
//! and, on a modern machine, the IOAPIC and the local APIC, wired as on a PC.
//!
//! Every ISA interrupt line goes to both the PIC and the IOAPIC (ISA IRQ 0,
//! the PIT, on IOAPIC pin 2, the others on the pin of their number, as the
//! MADT's interrupt source override says); lines above 15 (PCI, HPET
//! routes) only to the IOAPIC. The IOAPIC's messages land in the local
//! APIC's IRR; the local APIC's EOI of a level-triggered vector goes back to
//! the IOAPIC. The CPU takes the local APIC's highest deliverable vector
//! first and otherwise the PIC's, when the local APIC lets the PIC's INTR
//! through (LINT0 in ExtINT mode, as the BSP comes out of reset, or the APIC
//! globally disabled) — the order of QEMU's `cpu_get_pic_interrupt`.
//!
//! A machine with several CPUs has a local APIC per CPU (index = APIC ID);
//! the IOAPIC's and MSI messages go to the APICs their destination names
//! (lowest priority: the matching APIC with the lowest TPR), IPIs written to
//! one APIC's ICR go to the others, and INIT, start-up and NMI messages
//! are left as [`CpuSignals`] for the vCPU threads to take. Only the BSP
//! (CPU 0) takes the 8259's INTR. A local APIC register access goes to the
//! APIC of the CPU the calling thread acts for ([`crate::cpu::current`]).
//! A [`CpuWaker`] hears of every interrupt or signal left for a CPU, so
//! that the thread running it can be woken from HLT or kicked out of the
//! guest.
//!
//! One lock covers all three, so a line change, its IOAPIC message and the
//! resulting IRR bit are one step. Devices raise lines through the
//! [`InterruptSink`] this type implements behind a `Mutex`; the PIT and the
//! RTC go through a [`GatedSink`] that the HPET's legacy-replacement mode
//! disconnects, as on a PC.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::bus::{BusDevice, BusEvent};
use crate::ioapic::{IoApic, IoApicMessage, IoApicState, IOAPIC_BASE};
use crate::lapic::{Ipi, LapicEffect, LapicState, LocalApic, LAPIC_BASE};
use crate::pic::{Pic, PicState};
use crate::{Clock, InterruptSink};

/// The IOAPIC pin of ISA IRQ `irq` (the override of IRQ 0 onto GSI 2).
pub fn gsi_of_isa_irq(irq: u8) -> u8 {
    if irq == 0 {
        2
    } else {
        irq
    }
}

/// The APIC half of a modern machine.
struct Apic {
    ioapic: IoApic,
    /// One per CPU; index = APIC ID.
    lapics: Vec<LocalApic>,
    signals: Vec<CpuSignals>,
}

/// What INIT, start-up and NMI messages left for a CPU since its thread
/// last looked ([`IrqChip::take_signals`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuSignals {
    /// An INIT came: the CPU resets and waits for a start-up IPI (its local
    /// APIC is already INIT-reset).
    pub init: bool,
    /// The vector of the last start-up IPI (the CPU starts in real mode at
    /// `vector << 12`), taken only by a CPU waiting for one.
    pub sipi: Option<u8>,
    /// A non-maskable interrupt to inject.
    pub nmi: bool,
}

impl CpuSignals {
    fn any(&self) -> bool {
        self.init || self.sipi.is_some() || self.nmi
    }
}

/// Told of each interrupt or signal left for a CPU, from whichever thread
/// caused it (with the controllers' lock held: it must not take it).
pub trait CpuWaker: Send + Sync {
    /// CPU `cpu` has something new to take.
    fn wake(&self, cpu: usize);
}

/// The interrupt controllers of the machine.
pub struct IrqChip {
    pic: Pic,
    apic: Option<Apic>,
    waker: Option<Arc<dyn CpuWaker>>,
}

/// What a snapshot holds of the controllers: the PIC's state is kept apart
/// (a legacy machine's is all there is).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApicState {
    /// The IOAPIC.
    pub ioapic: IoApicState,
    /// The BSP's local APIC.
    pub lapic: LapicState,
    /// The APs' local APICs (APIC IDs 1..), on a machine with several CPUs.
    pub aps: Vec<LapicState>,
    /// The INIT, start-up and NMI messages no CPU has taken yet, per CPU.
    pub signals: Vec<CpuSignals>,
}

impl IrqChip {
    /// A legacy machine's controllers: the PIC pair alone.
    pub fn legacy(pic: Pic) -> Self {
        IrqChip {
            pic,
            apic: None,
            waker: None,
        }
    }

    /// A modern machine's controllers, after reset: the PIC pair, an IOAPIC
    /// with every pin masked, the BSP's local APIC passing the PIC through.
    pub fn with_apic(pic: Pic, clock: Arc<dyn Clock>, tsc_hz: u64) -> Self {
        Self::with_apic_cpus(pic, clock, tsc_hz, 1)
    }

    /// A modern machine with `cpus` CPUs (at least one): the BSP's local
    /// APIC as [`IrqChip::with_apic`] has it, the APs' with IDs 1.. after
    /// reset ([`LocalApic::new_ap`]).
    pub fn with_apic_cpus(pic: Pic, clock: Arc<dyn Clock>, tsc_hz: u64, cpus: usize) -> Self {
        let mut lapics = vec![LocalApic::new(clock.clone(), tsc_hz)];
        for id in 1..cpus.max(1) {
            lapics.push(LocalApic::new_ap(id as u8, clock.clone(), tsc_hz));
        }
        IrqChip {
            pic,
            apic: Some(Apic {
                ioapic: IoApic::new(),
                signals: vec![CpuSignals::default(); lapics.len()],
                lapics,
            }),
            waker: None,
        }
    }

    /// Who hears of interrupts left for a CPU (None: nobody, as on a
    /// machine with one vCPU, whose only thread looks after every exit).
    pub fn set_waker(&mut self, waker: Option<Arc<dyn CpuWaker>>) {
        self.waker = waker;
    }

    /// The number of CPUs (local APICs; 1 on a legacy machine).
    pub fn cpus(&self) -> usize {
        self.apic.as_ref().map_or(1, |a| a.lapics.len())
    }

    /// Takes the INIT, start-up and NMI messages left for `cpu`.
    pub fn take_signals(&mut self, cpu: usize) -> CpuSignals {
        match self.apic.as_mut().and_then(|a| a.signals.get_mut(cpu)) {
            Some(s) => std::mem::take(s),
            None => CpuSignals::default(),
        }
    }

    /// Whether INIT, start-up or NMI messages wait for `cpu`.
    pub fn has_signals(&self, cpu: usize) -> bool {
        self.apic
            .as_ref()
            .and_then(|a| a.signals.get(cpu))
            .is_some_and(CpuSignals::any)
    }

    fn wake(waker: &Option<Arc<dyn CpuWaker>>, cpu: usize) {
        if let Some(w) = waker {
            w.wake(cpu);
        }
    }

    /// Rebuilds the controllers from a snapshot's states.
    pub fn from_state(
        pic: &PicState,
        apic: Option<&ApicState>,
        clock: Arc<dyn Clock>,
        tsc_hz: u64,
    ) -> Result<Self, String> {
        let apic = match apic {
            Some(a) => {
                let mut lapics = Vec::with_capacity(1 + a.aps.len());
                for (i, l) in std::iter::once(&a.lapic).chain(&a.aps).enumerate() {
                    lapics.push(
                        LocalApic::from_state(l, clock.clone(), tsc_hz)
                            .map_err(|e| format!("local APIC of CPU {i}: {e}"))?,
                    );
                }
                if a.signals.len() != lapics.len() {
                    return Err(format!(
                        "signals for {} CPUs, local APICs for {}",
                        a.signals.len(),
                        lapics.len()
                    ));
                }
                Some(Apic {
                    ioapic: IoApic::from_state(&a.ioapic).map_err(|e| format!("IOAPIC: {e}"))?,
                    lapics,
                    signals: a.signals.clone(),
                })
            }
            None => None,
        };
        Ok(IrqChip {
            pic: Pic::from_state(pic),
            apic,
            waker: None,
        })
    }

    /// The PIC pair's state.
    pub fn pic_state(&self) -> PicState {
        self.pic.state()
    }

    /// The APIC half's state (None on a legacy machine): the IOAPIC, every
    /// CPU's local APIC and the signals no CPU took yet.
    pub fn apic_state(&self) -> Option<ApicState> {
        self.apic.as_ref().map(|a| ApicState {
            ioapic: a.ioapic.state(),
            lapic: a.lapics[0].state(),
            aps: a.lapics[1..].iter().map(LocalApic::state).collect(),
            signals: a.signals.clone(),
        })
    }

    /// Whether the machine has the APIC half.
    pub fn has_apic(&self) -> bool {
        self.apic.is_some()
    }

    /// The CPUs a fixed (mode 0) or lowest-priority (mode 1) message to
    /// `dest` reaches: every match, or the match with the lowest TPR.
    fn targets(lapics: &[LocalApic], mode: u8, dest: u8, logical: bool) -> Vec<usize> {
        let matches = (0..lapics.len()).filter(|&i| lapics[i].matches_destination(dest, logical));
        if mode == 1 {
            matches.min_by_key(|&i| lapics[i].cr8()).into_iter().collect()
        } else {
            matches.collect()
        }
    }

    fn deliver(a: &mut Apic, waker: &Option<Arc<dyn CpuWaker>>, messages: Vec<IoApicMessage>) {
        for m in messages {
            match m.delivery_mode {
                0 | 1 => {
                    for t in Self::targets(&a.lapics, m.delivery_mode, m.dest, m.logical) {
                        a.lapics[t].accept_fixed(m.vector, m.level);
                        Self::wake(waker, t);
                    }
                }
                // SMI, NMI, INIT, ExtINT through the IOAPIC: not modelled
                // (no guest of a PC routes them there); dropped.
                _ => {}
            }
        }
    }

    /// An IPI from CPU `from`'s ICR to the other CPUs it names (the
    /// sender's own part of a fixed IPI is already accepted).
    fn send_ipi(a: &mut Apic, waker: &Option<Arc<dyn CpuWaker>>, from: usize, ipi: Ipi) {
        let n = a.lapics.len();
        let fixed = ipi.delivery_mode <= 1;
        let targets: Vec<usize> = match ipi.shorthand {
            0 if fixed => Self::targets(&a.lapics, ipi.delivery_mode, ipi.dest, ipi.logical)
                .into_iter()
                .filter(|&t| t != from)
                .collect(),
            0 => (0..n)
                .filter(|&t| a.lapics[t].matches_destination(ipi.dest, ipi.logical))
                .collect(),
            1 if fixed => Vec::new(),
            1 => vec![from],
            2 if !fixed => (0..n).collect(),
            _ => (0..n).filter(|&t| t != from).collect(),
        };
        for t in targets {
            match ipi.delivery_mode {
                0 | 1 => a.lapics[t].accept_fixed(ipi.vector, ipi.level),
                4 => a.signals[t].nmi = true,
                // INIT level de-assert: only synchronises arbitration IDs.
                5 if ipi.level && !ipi.assert => continue,
                5 => {
                    a.lapics[t].init();
                    a.signals[t].init = true;
                    a.signals[t].sipi = None;
                }
                6 => a.signals[t].sipi = Some(ipi.vector),
                // SMI, ExtINT and the reserved modes: not modelled.
                _ => continue,
            }
            Self::wake(waker, t);
        }
    }

    /// Drives ISA IRQ `irq` (0..=15; 16 and above are GSIs) to `high`.
    pub fn set_isa_level(&mut self, irq: u8, high: bool) {
        if irq < 16 {
            self.pic.set_irq(irq, high);
        }
        if irq < 16 && high {
            // The 8259's INTR goes to the BSP.
            Self::wake(&self.waker, 0);
        }
        if let Some(a) = &mut self.apic {
            let m = a.ioapic.set_level(gsi_of_isa_irq(irq), high);
            Self::deliver(a, &self.waker, m);
        }
    }

    /// Drives global system interrupt `gsi` to `high`: the IOAPIC pin of that
    /// number and, below 16, the PIC line of that number.
    pub fn set_gsi_level(&mut self, gsi: u8, high: bool) {
        match &mut self.apic {
            Some(a) => {
                if gsi < 16 {
                    self.pic.set_irq(gsi, high);
                    if high {
                        Self::wake(&self.waker, 0);
                    }
                }
                let m = a.ioapic.set_level(gsi, high);
                Self::deliver(a, &self.waker, m);
            }
            None if gsi < 16 => self.pic.set_irq(gsi, high),
            None => {}
        }
    }

    /// A message-signalled interrupt (MSI, MSI-X) written to `address`
    /// with `data`: a write to the local APIC's 0xFEExxxxx window with
    /// fixed or lowest-priority delivery sets the vector's IRR bit (edge;
    /// the trigger-mode bit asks for level, which a message cannot hold
    /// and which QEMU treats as edge too). Other addresses and delivery
    /// modes (SMI, NMI, INIT, ExtINT), and any message on a legacy
    /// machine, go nowhere.
    pub fn deliver_msi(&mut self, address: u64, data: u32) {
        let Some(a) = &mut self.apic else { return };
        if address >> 20 != 0xFEE {
            return;
        }
        let dest = ((address >> 12) & 0xFF) as u8;
        let logical = address & (1 << 2) != 0;
        let vector = (data & 0xFF) as u8;
        let mode = (data >> 8) & 7;
        if (mode == 0 || mode == 1) && vector >= 16 {
            for t in Self::targets(&a.lapics, mode as u8, dest, logical) {
                a.lapics[t].accept_fixed(vector, false);
                Self::wake(&self.waker, t);
            }
        }
    }

    /// Whether CPU `cpu` has an interrupt to take.
    pub fn has_interrupt(&self, cpu: usize) -> bool {
        match &self.apic {
            None => cpu == 0 && self.pic.has_interrupt(),
            Some(a) => a.lapics.get(cpu).is_some_and(|l| {
                l.pending_vector().is_some() || (cpu == 0 && l.pic_interrupts_accepted() && self.pic.has_interrupt())
            }),
        }
    }

    /// The INTA cycle of CPU `cpu`: the vector it takes. Only meaningful
    /// after [`IrqChip::has_interrupt`] said yes; otherwise the PIC's
    /// spurious vector, as an 8259 answers.
    pub fn acknowledge(&mut self, cpu: usize) -> u8 {
        if let Some(l) = self.apic.as_mut().and_then(|a| a.lapics.get_mut(cpu)) {
            if l.pending_vector().is_some() {
                if let Some(v) = l.acknowledge() {
                    return v;
                }
            }
        }
        self.pic.acknowledge()
    }

    /// Brings the local APIC timers up to the current virtual time.
    pub fn poll(&mut self) {
        if let Some(a) = &mut self.apic {
            for (i, l) in a.lapics.iter_mut().enumerate() {
                let before = l.pending_vector();
                l.poll();
                if l.pending_vector() != before {
                    Self::wake(&self.waker, i);
                }
            }
        }
    }

    /// When a local APIC timer next fires.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        self.apic
            .as_ref()
            .and_then(|a| a.lapics.iter().filter_map(LocalApic::next_deadline_ns).min())
    }

    /// A guest access to a local APIC MSR (IA32_APIC_BASE 0x1B,
    /// IA32_TSC_DEADLINE 0x6E0): None if the machine has no local APIC or
    /// the MSR is not the APIC's; Some(None) if the guest gets #GP;
    /// Some(Some(value)) the value read, or the value written.
    pub fn msr(&mut self, cpu: usize, index: u32, write: Option<u64>) -> Option<Option<u64>> {
        let l = self.apic.as_mut()?.lapics.get_mut(cpu)?;
        match (index, write) {
            (0x1b, None) => Some(Some(l.base_msr())),
            (0x1b, Some(v)) => Some(l.set_base_msr(v).ok().map(|()| v)),
            (0x6e0, None) => Some(Some(l.tsc_deadline_msr())),
            (0x6e0, Some(v)) => {
                l.set_tsc_deadline_msr(v);
                Some(Some(v))
            }
            _ => None,
        }
    }

    /// The guest's TSC reads `guest_tsc` now, for the local APIC's
    /// TSC-deadline timer (see [`LocalApic::set_guest_tsc_now`]); nothing on
    /// a legacy machine.
    pub fn set_guest_tsc_now(&mut self, guest_tsc: u64) {
        if let Some(a) = &mut self.apic {
            for l in &mut a.lapics {
                l.set_guest_tsc_now(guest_tsc);
            }
        }
    }

    /// CPU `cpu`'s local APIC TPR as CR8 (`kvm_run.cr8` before entering the
    /// guest); None on a legacy machine.
    pub fn cr8(&self, cpu: usize) -> Option<u8> {
        self.apic.as_ref().and_then(|a| a.lapics.get(cpu)).map(LocalApic::cr8)
    }

    /// CPU `cpu`'s CR8 after an exit (`kvm_run.cr8`): a `mov cr8` changed
    /// the TPR's priority class. An unchanged class leaves the TPR's low
    /// bits (written through MMIO) alone.
    pub fn sync_cr8(&mut self, cpu: usize, cr8: u8) {
        if let Some(l) = self.apic.as_mut().and_then(|a| a.lapics.get_mut(cpu)) {
            if l.cr8() != cr8 & 0xf {
                l.set_cr8(cr8);
            }
        }
    }

    /// A write to the local APIC's page by CPU `cpu`.
    fn lapic_write(&mut self, cpu: usize, offset: u64, data: &[u8]) {
        let Some(a) = &mut self.apic else { return };
        let Some(l) = a.lapics.get_mut(cpu) else { return };
        match l.write(offset, data) {
            LapicEffect::Eoi { vector, level: true } => {
                let m = a.ioapic.eoi(vector);
                Self::deliver(a, &self.waker, m);
            }
            LapicEffect::Ipi(ipi) => Self::send_ipi(a, &self.waker, cpu, ipi),
            LapicEffect::Eoi { .. } | LapicEffect::None => {}
        }
    }
}

impl BusDevice for IrqChip {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let cpu = crate::cpu::current();
        match (&mut self.apic, base) {
            (Some(a), LAPIC_BASE) => match a.lapics.get_mut(cpu) {
                Some(l) => l.read(offset, data),
                None => data.fill(0xff),
            },
            (Some(a), IOAPIC_BASE) => a.ioapic.read(offset, data),
            (_, LAPIC_BASE | IOAPIC_BASE) => data.fill(0xff),
            _ => self.pic.read(base, offset, data),
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<BusEvent> {
        match base {
            LAPIC_BASE => self.lapic_write(crate::cpu::current(), offset, data),
            IOAPIC_BASE => {
                if let Some(a) = &mut self.apic {
                    let m = a.ioapic.write(offset, data);
                    Self::deliver(a, &self.waker, m);
                }
            }
            _ => return self.pic.write(base, offset, data),
        }
        None
    }
}

fn lock(m: &Mutex<IrqChip>) -> std::sync::MutexGuard<'_, IrqChip> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl InterruptSink for Mutex<IrqChip> {
    fn set_level(&self, irq: u8, high: bool) {
        lock(self).set_isa_level(irq, high);
    }

    fn set_gsi(&self, gsi: u8, high: bool) {
        lock(self).set_gsi_level(gsi, high);
    }
}

impl crate::msix::MsiSink for Mutex<IrqChip> {
    fn msi(&self, address: u64, data: u32) {
        lock(self).deliver_msi(address, data);
    }
}

/// The sink of a device whose line the HPET's legacy-replacement mode
/// takes over (the PIT's IRQ 0, the RTC's IRQ 8): while the flag is set, the
/// device's line changes go nowhere and its line is held low.
pub struct GatedSink {
    inner: Arc<dyn InterruptSink>,
    legacy: Arc<AtomicBool>,
}

impl GatedSink {
    /// `inner`'s lines, cut while `legacy` is set.
    pub fn new(inner: Arc<dyn InterruptSink>, legacy: Arc<AtomicBool>) -> Self {
        GatedSink { inner, legacy }
    }
}

impl InterruptSink for GatedSink {
    fn set_level(&self, irq: u8, high: bool) {
        if !self.legacy.load(Ordering::SeqCst) {
            self.inner.set_level(irq, high);
        }
    }

    fn set_gsi(&self, gsi: u8, high: bool) {
        if !self.legacy.load(Ordering::SeqCst) {
            self.inner.set_gsi(gsi, high);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::ManualClock;

    fn chip() -> (Arc<ManualClock>, Mutex<IrqChip>) {
        let clock = Arc::new(ManualClock::new(0));
        let chip = IrqChip::with_apic(Pic::new(), clock.clone(), 1_000_000_000);
        (clock, Mutex::new(chip))
    }

    fn pio_write(c: &Mutex<IrqChip>, port: u64, v: u8) {
        let base = if port >= 0xa0 { 0xa0 } else { 0x20 };
        lock(c).write(base, port - base, &[v]);
    }

    fn mmio_write32(c: &Mutex<IrqChip>, base: u64, offset: u64, v: u32) {
        lock(c).write(base, offset, &v.to_le_bytes());
    }

    /// ICW1–ICW4 for both PICs, vectors 0x20/0x28, all unmasked.
    fn init_pic(c: &Mutex<IrqChip>) {
        for (cmd, data, vec, cascade) in [(0x20, 0x21, 0x20, 4), (0xa0, 0xa1, 0x28, 2)] {
            pio_write(c, cmd, 0x11);
            pio_write(c, data, vec);
            pio_write(c, data, cascade);
            pio_write(c, data, 0x01);
            pio_write(c, data, 0x00);
        }
    }

    fn ioapic_route(c: &Mutex<IrqChip>, pin: u32, low: u32) {
        mmio_write32(c, IOAPIC_BASE, 0, 0x10 + 2 * pin);
        mmio_write32(c, IOAPIC_BASE, 0x10, low);
        mmio_write32(c, IOAPIC_BASE, 0, 0x10 + 2 * pin + 1);
        mmio_write32(c, IOAPIC_BASE, 0x10, 0);
    }

    #[test]
    fn after_reset_the_pic_reaches_the_cpu_through_lint0() {
        let (_, c) = chip();
        init_pic(&c);
        c.pulse(4);
        assert!(lock(&c).has_interrupt(0));
        assert_eq!(lock(&c).acknowledge(0), 0x24);
    }

    #[test]
    fn the_pit_line_reaches_ioapic_pin_2_and_the_lapic() {
        let (_, c) = chip();
        // Software-enable the local APIC, mask LINT0 (no PIC), route pin 2.
        mmio_write32(&c, LAPIC_BASE, 0xf0, 0x1ff);
        mmio_write32(&c, LAPIC_BASE, 0x350, 0x1_0000);
        ioapic_route(&c, 2, 0x31);
        c.pulse(0);
        assert!(lock(&c).has_interrupt(0));
        assert_eq!(lock(&c).acknowledge(0), 0x31);
        assert!(!lock(&c).has_interrupt(0));
        // A second edge waits in IRR behind the one in service? No: same
        // vector, in service; after EOI nothing is left.
        mmio_write32(&c, LAPIC_BASE, 0xb0, 0);
        assert!(!lock(&c).has_interrupt(0));
    }

    #[test]
    fn a_level_line_is_delivered_again_after_eoi_while_asserted() {
        let (_, c) = chip();
        mmio_write32(&c, LAPIC_BASE, 0xf0, 0x1ff);
        mmio_write32(&c, LAPIC_BASE, 0x350, 0x1_0000);
        // Pin 4, level-triggered (bit 15), vector 0x34.
        ioapic_route(&c, 4, 0x8000 | 0x34);
        c.set_level(4, true);
        assert_eq!(lock(&c).acknowledge(0), 0x34);
        // Remote IRR holds it while in service.
        assert!(!lock(&c).has_interrupt(0));
        mmio_write32(&c, LAPIC_BASE, 0xb0, 0);
        assert!(lock(&c).has_interrupt(0), "still asserted: delivered again after EOI");
        assert_eq!(lock(&c).acknowledge(0), 0x34);
        c.set_level(4, false);
        mmio_write32(&c, LAPIC_BASE, 0xb0, 0);
        assert!(!lock(&c).has_interrupt(0));
    }

    #[test]
    fn msi_messages_reach_the_local_apic() {
        use crate::msix::MsiSink;
        let (_, c) = chip();
        mmio_write32(&c, LAPIC_BASE, 0xf0, 0x1ff);
        mmio_write32(&c, LAPIC_BASE, 0x350, 0x1_0000);
        c.msi(0xFEE0_0000, 0x41);
        assert_eq!(lock(&c).acknowledge(0), 0x41);
        mmio_write32(&c, LAPIC_BASE, 0xb0, 0);
        // Not the APIC's window, NMI delivery, a reserved vector, another
        // APIC ID: nothing.
        c.msi(0xFED0_0000, 0x42);
        c.msi(0xFEE0_0000, 0x400 | 0x43);
        c.msi(0xFEE0_0000, 0x0F);
        c.msi(0xFEE0_5000, 0x44);
        assert!(!lock(&c).has_interrupt(0));
        // Broadcast, lowest priority.
        c.msi(0xFEEF_F000, 0x100 | 0x45);
        assert_eq!(lock(&c).acknowledge(0), 0x45);
        let legacy = Mutex::new(IrqChip::legacy(Pic::new()));
        legacy.msi(0xFEE0_0000, 0x41);
        assert!(!lock(&legacy).has_interrupt(0));
    }

    #[test]
    fn legacy_machines_have_no_apic() {
        let c = Mutex::new(IrqChip::legacy(Pic::new()));
        assert!(lock(&c).msr(0, 0x1b, None).is_none());
        let mut d = [0u8; 4];
        lock(&c).read(LAPIC_BASE, 0x30, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert!(lock(&c).apic_state().is_none());
    }

    #[test]
    fn state_round_trips() {
        let (clock, c) = chip();
        mmio_write32(&c, LAPIC_BASE, 0xf0, 0x1ff);
        ioapic_route(&c, 4, 0x8000 | 0x34);
        let pic = lock(&c).pic_state();
        let apic = lock(&c).apic_state();
        let d = IrqChip::from_state(&pic, apic.as_ref(), clock.clone(), 1_000_000_000).unwrap();
        assert_eq!(d.apic_state(), apic);
        assert_eq!(d.pic_state(), pic);
        // Several CPUs: every APIC and the signals no CPU took yet.
        let (_, four) = smp(4);
        icr(&four, 0, 2, 0x0400);
        icr(&four, 0, 3, 0x49);
        let s = lock(&four).apic_state().unwrap();
        assert_eq!(s.aps.len(), 3);
        let back = IrqChip::from_state(&pic, Some(&s), clock.clone(), 1_000_000_000).unwrap();
        assert_eq!(back.cpus(), 4);
        assert_eq!(back.apic_state().as_ref(), Some(&s));
        assert!(back.has_signals(2) && back.has_interrupt(3));
        let mut bad = s.clone();
        bad.signals.pop();
        assert!(IrqChip::from_state(&pic, Some(&bad), clock, 1_000_000_000).is_err());
    }

    /// Records the CPUs woken.
    #[derive(Default)]
    struct Woken(Mutex<Vec<usize>>);

    impl CpuWaker for Woken {
        fn wake(&self, cpu: usize) {
            self.0.lock().unwrap().push(cpu);
        }
    }

    fn smp(cpus: usize) -> (Arc<Woken>, Mutex<IrqChip>) {
        let clock = Arc::new(ManualClock::new(0));
        let mut chip = IrqChip::with_apic_cpus(Pic::new(), clock, 1_000_000_000, cpus);
        let woken = Arc::new(Woken::default());
        chip.set_waker(Some(woken.clone()));
        let c = Mutex::new(chip);
        for cpu in 0..cpus {
            on_cpu(cpu, || mmio_write32(&c, LAPIC_BASE, 0xf0, 0x1ff));
        }
        (woken, c)
    }

    /// Ends every vector in service on CPUs 0..cpus.
    fn eoi_all(c: &Mutex<IrqChip>, cpus: usize) {
        for cpu in 0..cpus {
            for _ in 0..8 {
                on_cpu(cpu, || mmio_write32(c, LAPIC_BASE, 0xb0, 0));
            }
        }
    }

    /// Runs `f` as CPU `cpu` does (its local APIC register accesses).
    fn on_cpu<T>(cpu: usize, f: impl FnOnce() -> T) -> T {
        crate::cpu::set_current(cpu);
        let r = f();
        crate::cpu::set_current(0);
        r
    }

    fn icr(c: &Mutex<IrqChip>, cpu: usize, dest: u8, low: u32) {
        on_cpu(cpu, || {
            mmio_write32(c, LAPIC_BASE, 0x310, u32::from(dest) << 24);
            mmio_write32(c, LAPIC_BASE, 0x300, low);
        });
    }

    #[test]
    fn each_cpu_reads_its_own_apic() {
        let (_, c) = smp(4);
        for cpu in 0..4 {
            let mut d = [0u8; 4];
            on_cpu(cpu, || lock(&c).read(LAPIC_BASE, 0x20, &mut d));
            assert_eq!(u32::from_le_bytes(d) >> 24, cpu as u32);
            let base = lock(&c).msr(cpu, 0x1b, None).unwrap().unwrap();
            assert_eq!(base & (1 << 8) != 0, cpu == 0, "only the BSP has the BSP flag");
        }
        assert_eq!(lock(&c).cpus(), 4);
    }

    #[test]
    fn fixed_ipis_reach_the_cpus_they_name() {
        let (woken, c) = smp(4);
        // CPU 2 to CPU 0, physical.
        icr(&c, 2, 0, 0x41);
        assert!(lock(&c).has_interrupt(0));
        assert!(!lock(&c).has_interrupt(2));
        assert_eq!(lock(&c).acknowledge(0), 0x41);
        assert_eq!(*woken.0.lock().unwrap(), vec![0]);
        eoi_all(&c, 4);
        woken.0.lock().unwrap().clear();
        // All excluding self, from CPU 0.
        icr(&c, 0, 0, 0x000c_0050);
        assert!(!lock(&c).has_interrupt(0));
        for cpu in 1..4 {
            assert_eq!(lock(&c).acknowledge(cpu), 0x50);
        }
        assert_eq!(*woken.0.lock().unwrap(), vec![1, 2, 3]);
        eoi_all(&c, 4);
        // All including self, from CPU 3; then a broadcast destination.
        icr(&c, 3, 0, 0x0008_0051);
        for cpu in 0..4 {
            assert!(lock(&c).has_interrupt(cpu), "cpu {cpu}");
            assert_eq!(lock(&c).acknowledge(cpu), 0x51);
        }
        eoi_all(&c, 4);
        icr(&c, 1, 0xff, 0x52);
        for cpu in 0..4 {
            assert_eq!(lock(&c).acknowledge(cpu), 0x52, "cpu {cpu}");
        }
    }

    #[test]
    fn init_sipi_and_nmi_are_left_as_signals() {
        let (_, c) = smp(3);
        // CPU 1 had its timer vector and an IRR bit before the INIT.
        icr(&c, 0, 1, 0x44);
        icr(&c, 0, 1, 0x4500); // INIT, assert
        icr(&c, 0, 1, 0x8500); // INIT level de-assert: nothing
        icr(&c, 0, 1, 0x0608); // SIPI, page 8
        icr(&c, 0, 1, 0x0609); // a second SIPI: the last one wins
        assert!(lock(&c).has_signals(1));
        let s = lock(&c).take_signals(1);
        assert_eq!(
            s,
            CpuSignals {
                init: true,
                sipi: Some(9),
                nmi: false
            }
        );
        assert!(!lock(&c).has_interrupt(1), "INIT cleared the APIC's IRR");
        let mut d = [0u8; 4];
        on_cpu(1, || lock(&c).read(LAPIC_BASE, 0xf0, &mut d));
        assert_eq!(u32::from_le_bytes(d) & 0x100, 0, "INIT software-disabled the APIC");
        on_cpu(1, || lock(&c).read(LAPIC_BASE, 0x20, &mut d));
        assert_eq!(u32::from_le_bytes(d) >> 24, 1, "and kept its ID");
        assert!(!lock(&c).has_signals(1));
        // NMI to CPU 2; nothing to CPU 0.
        icr(&c, 0, 2, 0x0400);
        assert!(lock(&c).take_signals(2).nmi);
        assert_eq!(lock(&c).take_signals(0), CpuSignals::default());
    }

    #[test]
    fn ioapic_and_msi_messages_follow_their_destination() {
        let (_, c) = smp(2);
        for cpu in 0..2 {
            on_cpu(cpu, || mmio_write32(&c, LAPIC_BASE, 0x350, 0x1_0000));
        }
        // Pin 4 to APIC 1.
        mmio_write32(&c, IOAPIC_BASE, 0, 0x10 + 8);
        mmio_write32(&c, IOAPIC_BASE, 0x10, 0x34);
        mmio_write32(&c, IOAPIC_BASE, 0, 0x10 + 9);
        mmio_write32(&c, IOAPIC_BASE, 0x10, 1 << 24);
        c.pulse(4);
        assert!(!lock(&c).has_interrupt(0));
        assert_eq!(lock(&c).acknowledge(1), 0x34);
        use crate::msix::MsiSink;
        c.msi(0xFEE0_1000, 0x45);
        assert!(!lock(&c).has_interrupt(0));
        assert_eq!(lock(&c).acknowledge(1), 0x45);
        eoi_all(&c, 2);
        // Lowest priority to both (logical, flat, both in LDR bit 0): the
        // one with the lower TPR.
        for cpu in 0..2 {
            on_cpu(cpu, || mmio_write32(&c, LAPIC_BASE, 0xd0, 0x0100_0000));
        }
        lock(&c).sync_cr8(0, 2);
        c.msi(0xFEE0_1004, 0x146);
        assert!(!lock(&c).has_interrupt(0));
        assert_eq!(lock(&c).acknowledge(1), 0x46);
    }

    #[test]
    fn only_the_bsp_takes_the_pic() {
        let (_, c) = smp(2);
        init_pic(&c);
        c.pulse(4);
        assert!(lock(&c).has_interrupt(0));
        assert!(!lock(&c).has_interrupt(1));
    }

    #[test]
    fn the_gate_cuts_lines_while_set() {
        let sink = Arc::new(crate::io::RecordingSink::default());
        let flag = Arc::new(AtomicBool::new(false));
        let g = GatedSink::new(sink.clone(), flag.clone());
        g.pulse(0);
        flag.store(true, Ordering::SeqCst);
        g.pulse(0);
        assert_eq!(sink.rising_edges(0), 1);
    }
}
