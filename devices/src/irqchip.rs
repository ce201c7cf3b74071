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
//! One lock covers all three, so a line change, its IOAPIC message and the
//! resulting IRR bit are one step. Devices raise lines through the
//! [`InterruptSink`] this type implements behind a `Mutex`; the PIT and the
//! RTC go through a [`GatedSink`] that the HPET's legacy-replacement mode
//! disconnects, as on a PC.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::bus::{BusDevice, BusEvent};
use crate::ioapic::{IoApic, IoApicMessage, IoApicState, IOAPIC_BASE};
use crate::lapic::{LapicEffect, LapicState, LocalApic, LAPIC_BASE};
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
    lapic: LocalApic,
}

/// The interrupt controllers of the machine.
pub struct IrqChip {
    pic: Pic,
    apic: Option<Apic>,
}

/// What a snapshot holds of the controllers: the PIC's state is kept apart
/// (a legacy machine's is all there is).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApicState {
    /// The IOAPIC.
    pub ioapic: IoApicState,
    /// The local APIC.
    pub lapic: LapicState,
}

impl IrqChip {
    /// A legacy machine's controllers: the PIC pair alone.
    pub fn legacy(pic: Pic) -> Self {
        IrqChip { pic, apic: None }
    }

    /// A modern machine's controllers, after reset: the PIC pair, an IOAPIC
    /// with every pin masked, the BSP's local APIC passing the PIC through.
    pub fn with_apic(pic: Pic, clock: Arc<dyn Clock>, tsc_hz: u64) -> Self {
        IrqChip {
            pic,
            apic: Some(Apic {
                ioapic: IoApic::new(),
                lapic: LocalApic::new(clock, tsc_hz),
            }),
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
            Some(a) => Some(Apic {
                ioapic: IoApic::from_state(&a.ioapic).map_err(|e| format!("IOAPIC: {e}"))?,
                lapic: LocalApic::from_state(&a.lapic, clock, tsc_hz).map_err(|e| format!("local APIC: {e}"))?,
            }),
            None => None,
        };
        Ok(IrqChip {
            pic: Pic::from_state(pic),
            apic,
        })
    }

    /// The PIC pair's state.
    pub fn pic_state(&self) -> PicState {
        self.pic.state()
    }

    /// The APIC half's state (None on a legacy machine).
    pub fn apic_state(&self) -> Option<ApicState> {
        self.apic.as_ref().map(|a| ApicState {
            ioapic: a.ioapic.state(),
            lapic: a.lapic.state(),
        })
    }

    /// Whether the machine has the APIC half.
    pub fn has_apic(&self) -> bool {
        self.apic.is_some()
    }

    fn deliver(lapic: &mut LocalApic, messages: Vec<IoApicMessage>) {
        for m in messages {
            match m.delivery_mode {
                // Fixed and lowest priority: with one CPU the same thing.
                0 | 1 if lapic.matches_destination(m.dest, m.logical) => lapic.accept_fixed(m.vector, m.level),
                // SMI, NMI, INIT, ExtINT through the IOAPIC: not modelled
                // (no guest of a PC routes them there); dropped.
                _ => {}
            }
        }
    }

    /// Drives ISA IRQ `irq` (0..=15; 16 and above are GSIs) to `high`.
    pub fn set_isa_level(&mut self, irq: u8, high: bool) {
        if irq < 16 {
            self.pic.set_irq(irq, high);
        }
        if let Some(a) = &mut self.apic {
            let m = a.ioapic.set_level(gsi_of_isa_irq(irq), high);
            Self::deliver(&mut a.lapic, m);
        }
    }

    /// Drives global system interrupt `gsi` to `high`: the IOAPIC pin of that
    /// number and, below 16, the PIC line of that number.
    pub fn set_gsi_level(&mut self, gsi: u8, high: bool) {
        match &mut self.apic {
            Some(a) => {
                if gsi < 16 {
                    self.pic.set_irq(gsi, high);
                }
                let m = a.ioapic.set_level(gsi, high);
                Self::deliver(&mut a.lapic, m);
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
        if (mode == 0 || mode == 1) && vector >= 16 && a.lapic.matches_destination(dest, logical) {
            a.lapic.accept_fixed(vector, false);
        }
    }

    /// Whether the CPU has an interrupt to take.
    pub fn has_interrupt(&self) -> bool {
        match &self.apic {
            None => self.pic.has_interrupt(),
            Some(a) => {
                a.lapic.pending_vector().is_some() || (a.lapic.pic_interrupts_accepted() && self.pic.has_interrupt())
            }
        }
    }

    /// The INTA cycle: the vector the CPU takes. Only meaningful after
    /// [`IrqChip::has_interrupt`] said yes; otherwise the PIC's spurious
    /// vector, as an 8259 answers.
    pub fn acknowledge(&mut self) -> u8 {
        if let Some(a) = &mut self.apic {
            if a.lapic.pending_vector().is_some() {
                if let Some(v) = a.lapic.acknowledge() {
                    return v;
                }
            }
        }
        self.pic.acknowledge()
    }

    /// Brings the local APIC timer up to the current virtual time.
    pub fn poll(&mut self) {
        if let Some(a) = &mut self.apic {
            a.lapic.poll();
        }
    }

    /// When the local APIC timer next fires.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        self.apic.as_ref().and_then(|a| a.lapic.next_deadline_ns())
    }

    /// A guest access to a local APIC MSR (IA32_APIC_BASE 0x1B,
    /// IA32_TSC_DEADLINE 0x6E0): None if the machine has no local APIC or
    /// the MSR is not the APIC's; Some(None) if the guest gets #GP;
    /// Some(Some(value)) the value read, or the value written.
    pub fn msr(&mut self, index: u32, write: Option<u64>) -> Option<Option<u64>> {
        let a = self.apic.as_mut()?;
        match (index, write) {
            (0x1b, None) => Some(Some(a.lapic.base_msr())),
            (0x1b, Some(v)) => Some(a.lapic.set_base_msr(v).ok().map(|()| v)),
            (0x6e0, None) => Some(Some(a.lapic.tsc_deadline_msr())),
            (0x6e0, Some(v)) => {
                a.lapic.set_tsc_deadline_msr(v);
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
            a.lapic.set_guest_tsc_now(guest_tsc);
        }
    }

    /// The local APIC's TPR as CR8 (`kvm_run.cr8` before entering the
    /// guest); None on a legacy machine.
    pub fn cr8(&self) -> Option<u8> {
        self.apic.as_ref().map(|a| a.lapic.cr8())
    }

    /// The guest's CR8 after an exit (`kvm_run.cr8`): a `mov cr8` changed
    /// the TPR's priority class. An unchanged class leaves the TPR's low
    /// bits (written through MMIO) alone.
    pub fn sync_cr8(&mut self, cr8: u8) {
        if let Some(a) = &mut self.apic {
            if a.lapic.cr8() != cr8 & 0xf {
                a.lapic.set_cr8(cr8);
            }
        }
    }

    /// A write to the local APIC's page.
    fn lapic_write(&mut self, offset: u64, data: &[u8]) {
        let Some(a) = &mut self.apic else { return };
        match a.lapic.write(offset, data) {
            LapicEffect::Eoi { vector, level: true } => {
                let m = a.ioapic.eoi(vector);
                Self::deliver(&mut a.lapic, m);
            }
            // Other CPUs' IPIs (INIT, SIPI, NMI, fixed to another ID) have
            // nobody to go to on a one-CPU machine.
            LapicEffect::Eoi { .. } | LapicEffect::Ipi(_) | LapicEffect::None => {}
        }
    }
}

impl BusDevice for IrqChip {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        match (&mut self.apic, base) {
            (Some(a), LAPIC_BASE) => a.lapic.read(offset, data),
            (Some(a), IOAPIC_BASE) => a.ioapic.read(offset, data),
            (_, LAPIC_BASE | IOAPIC_BASE) => data.fill(0xff),
            _ => self.pic.read(base, offset, data),
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<BusEvent> {
        match base {
            LAPIC_BASE => self.lapic_write(offset, data),
            IOAPIC_BASE => {
                if let Some(a) = &mut self.apic {
                    let m = a.ioapic.write(offset, data);
                    Self::deliver(&mut a.lapic, m);
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
        assert!(lock(&c).has_interrupt());
        assert_eq!(lock(&c).acknowledge(), 0x24);
    }

    #[test]
    fn the_pit_line_reaches_ioapic_pin_2_and_the_lapic() {
        let (_, c) = chip();
        // Software-enable the local APIC, mask LINT0 (no PIC), route pin 2.
        mmio_write32(&c, LAPIC_BASE, 0xf0, 0x1ff);
        mmio_write32(&c, LAPIC_BASE, 0x350, 0x1_0000);
        ioapic_route(&c, 2, 0x31);
        c.pulse(0);
        assert!(lock(&c).has_interrupt());
        assert_eq!(lock(&c).acknowledge(), 0x31);
        assert!(!lock(&c).has_interrupt());
        // A second edge waits in IRR behind the one in service? No: same
        // vector, in service; after EOI nothing is left.
        mmio_write32(&c, LAPIC_BASE, 0xb0, 0);
        assert!(!lock(&c).has_interrupt());
    }

    #[test]
    fn a_level_line_is_delivered_again_after_eoi_while_asserted() {
        let (_, c) = chip();
        mmio_write32(&c, LAPIC_BASE, 0xf0, 0x1ff);
        mmio_write32(&c, LAPIC_BASE, 0x350, 0x1_0000);
        // Pin 4, level-triggered (bit 15), vector 0x34.
        ioapic_route(&c, 4, 0x8000 | 0x34);
        c.set_level(4, true);
        assert_eq!(lock(&c).acknowledge(), 0x34);
        // Remote IRR holds it while in service.
        assert!(!lock(&c).has_interrupt());
        mmio_write32(&c, LAPIC_BASE, 0xb0, 0);
        assert!(lock(&c).has_interrupt(), "still asserted: delivered again after EOI");
        assert_eq!(lock(&c).acknowledge(), 0x34);
        c.set_level(4, false);
        mmio_write32(&c, LAPIC_BASE, 0xb0, 0);
        assert!(!lock(&c).has_interrupt());
    }

    #[test]
    fn msi_messages_reach_the_local_apic() {
        use crate::msix::MsiSink;
        let (_, c) = chip();
        mmio_write32(&c, LAPIC_BASE, 0xf0, 0x1ff);
        mmio_write32(&c, LAPIC_BASE, 0x350, 0x1_0000);
        c.msi(0xFEE0_0000, 0x41);
        assert_eq!(lock(&c).acknowledge(), 0x41);
        mmio_write32(&c, LAPIC_BASE, 0xb0, 0);
        // Not the APIC's window, NMI delivery, a reserved vector, another
        // APIC ID: nothing.
        c.msi(0xFED0_0000, 0x42);
        c.msi(0xFEE0_0000, 0x400 | 0x43);
        c.msi(0xFEE0_0000, 0x0F);
        c.msi(0xFEE0_5000, 0x44);
        assert!(!lock(&c).has_interrupt());
        // Broadcast, lowest priority.
        c.msi(0xFEEF_F000, 0x100 | 0x45);
        assert_eq!(lock(&c).acknowledge(), 0x45);
        let legacy = Mutex::new(IrqChip::legacy(Pic::new()));
        legacy.msi(0xFEE0_0000, 0x41);
        assert!(!lock(&legacy).has_interrupt());
    }

    #[test]
    fn legacy_machines_have_no_apic() {
        let c = Mutex::new(IrqChip::legacy(Pic::new()));
        assert!(lock(&c).msr(0x1b, None).is_none());
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
        let d = IrqChip::from_state(&pic, apic.as_ref(), clock, 1_000_000_000).unwrap();
        assert_eq!(d.apic_state(), apic);
        assert_eq!(d.pic_state(), pic);
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
