//! The PC platform: every device of the machine on its port or MMIO range,
//! the interrupt routing from devices to the controllers, and the questions
//! the run loop asks at each exit (what is pending, when is the next
//! deadline).
//!
//! A legacy machine (`--irqchip legacy`) is a 1980s PC: PIC pair, PIT,
//! CMOS RTC, COM1, i8042. A modern one (`--irqchip apic`) adds a local APIC
//! and an IOAPIC (one device with the PICs: `nyx_devices::irqchip`), an
//! HPET, the ACPI PM block and the ISA DMA controllers; the ACPI tables
//! describing it are written by the loader (`crate::acpi`).
//!
//! Both have the PCI host with the functions the machine was given (virtio
//! disks, entropy, console; `crate::pci_setup` builds them): configuration
//! through 0xCF8/0xCFC and ECAM, BARs reached through the host's windows.
//! The functions raise interrupts through a [`ChipLink`], which follows the
//! controllers when a snapshot restore rebuilds them; the functions
//! themselves (and the disks behind them) survive such a rebuild and take
//! the snapshot's state.

use std::io::Write;
use std::sync::{Arc, Mutex, RwLock};

use std::sync::atomic::AtomicBool;

use nyx_devices::acpi_pm::{AcpiPm, ACPI_PM_PORTS};
use nyx_devices::bus::SharedDevice;
use nyx_devices::cmos::Cmos;
use nyx_devices::debug_exit::DebugExit;
use nyx_devices::dma::{Dma, DMA_PORTS};
use nyx_devices::hpet::{Hpet, HPET_BASE, HPET_SIZE};
use nyx_devices::i8042::{Port92, I8042};
use nyx_devices::ioapic::{IOAPIC_BASE, IOAPIC_SIZE};
use nyx_devices::irqchip::{GatedSink, IrqChip};
use nyx_devices::lapic::{LAPIC_BASE, LAPIC_SIZE};
use nyx_devices::msix::MsiSink;
use nyx_devices::pci::{PciHost, ECAM_BASE, ECAM_SIZE, MMIO64_WINDOW, MMIO_WINDOW};
use nyx_devices::pci_device::PciDevice;
use nyx_devices::pic::Pic;
use nyx_devices::pit::Pit;
use nyx_devices::port80::Port80;
use nyx_devices::serial::Serial;
use nyx_devices::{Bus, BusError, Clock, Input, InterruptSink, WallClock};

/// COM1's IRQ line.
pub const COM1_IRQ: u8 = 4;
/// The RTC's IRQ line.
pub const RTC_IRQ: u8 = 8;

/// A device on the port I/O bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortDevice {
    /// The 8259A PIC pair (and its ELCR).
    Pic,
    /// The 8254 PIT (and port 0x61).
    Pit,
    /// COM1.
    Uart,
    /// The CMOS RTC.
    Cmos,
    /// The keyboard controller.
    I8042,
    /// The POST/delay port.
    Port80,
    /// System control port A (fast A20, reset).
    Port92,
    /// QEMU's isa-debug-exit.
    DebugExit,
    /// The PCI host bridge's configuration ports.
    Pci,
    /// The ISA DMA controllers and page registers (modern machine).
    Dma,
    /// The ACPI PM block, SMI command port and sensors (modern machine).
    AcpiPm,
}

impl PortDevice {
    /// Its name in metrics and reports.
    pub fn name(self) -> &'static str {
        match self {
            PortDevice::Pic => "pic",
            PortDevice::Pit => "pit",
            PortDevice::Uart => "uart",
            PortDevice::Cmos => "cmos",
            PortDevice::I8042 => "i8042",
            PortDevice::Port80 => "port80",
            PortDevice::Port92 => "port92",
            PortDevice::DebugExit => "debug-exit",
            PortDevice::Pci => "pci",
            PortDevice::Dma => "dma",
            PortDevice::AcpiPm => "acpi-pm",
        }
    }
}

/// Every port range of the platform: first port, number of ports, device.
/// The one map the port bus is built from and ports are named by.
pub const PORT_MAP: &[(u16, u16, PortDevice)] = &[
    (0x20, 2, PortDevice::Pic),
    (0xa0, 2, PortDevice::Pic),
    (0x4d0, 2, PortDevice::Pic),
    (0x40, 4, PortDevice::Pit),
    (0x61, 1, PortDevice::Pit),
    (0x3f8, 8, PortDevice::Uart),
    (0x70, 2, PortDevice::Cmos),
    (0x60, 1, PortDevice::I8042),
    (0x64, 1, PortDevice::I8042),
    (0x80, 1, PortDevice::Port80),
    (0x92, 1, PortDevice::Port92),
    (0xf4, 4, PortDevice::DebugExit),
    (0xcf8, 8, PortDevice::Pci),
    // The PCI host's window for I/O BARs (nyx_devices::pci::IO_WINDOW).
    (0xc000, 0x4000, PortDevice::Pci),
];

/// The GSI (and ISA IRQ) that INTx pin `pin` (1 = INTA) of the function in
/// `slot` reaches: the PIIX's swizzle onto PIRQ A-D, which SeaBIOS routes to
/// IRQs 10, 10, 11 and 11 on QEMU's `pc` machine; Nyx has no firmware, so
/// the routing is fixed and the functions' interrupt line registers say it.
pub fn intx_gsi(slot: u8, pin: u8) -> u8 {
    const PIRQ_IRQS: [u8; 4] = [10, 10, 11, 11];
    PIRQ_IRQS[usize::from((slot + pin).wrapping_sub(2) & 3)]
}

/// The interrupt controllers as the PCI functions reach them (MSI, INTx).
/// The platform points it at its controllers each time it is built, so a
/// function that outlives a rebuild reaches the new ones.
#[derive(Default)]
pub struct ChipLink(RwLock<Option<Arc<Mutex<IrqChip>>>>);

impl ChipLink {
    fn set(&self, chip: &Arc<Mutex<IrqChip>>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(chip.clone());
    }

    fn chip(&self) -> Option<Arc<Mutex<IrqChip>>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl MsiSink for ChipLink {
    fn msi(&self, address: u64, data: u32) {
        if let Some(c) = self.chip() {
            c.msi(address, data);
        }
    }
}

impl InterruptSink for ChipLink {
    fn set_level(&self, irq: u8, high: bool) {
        if let Some(c) = self.chip() {
            c.set_level(irq, high);
        }
    }

    fn set_gsi(&self, gsi: u8, high: bool) {
        if let Some(c) = self.chip() {
            c.set_gsi(gsi, high);
        }
    }
}

/// A PCI function to put on the bus, with its slot.
pub type PciFunction = (u8, Box<dyn PciDevice>);

/// The port ranges a modern machine (`--irqchip apic`) adds to [`PORT_MAP`].
pub fn modern_port_map() -> Vec<(u16, u16, PortDevice)> {
    let dma = DMA_PORTS.iter().map(|&(b, l)| (b, l, PortDevice::Dma));
    let pm = ACPI_PM_PORTS.iter().map(|&(b, l)| (b, l, PortDevice::AcpiPm));
    dma.chain(pm).collect()
}

/// The device that decodes `port` on a modern machine (a legacy one has
/// only [`PORT_MAP`]), if any.
pub fn device_of_port(port: u16) -> Option<PortDevice> {
    let hit = |base: u16, len: u16| port >= base && u32::from(port) < u32::from(base) + u32::from(len);
    PORT_MAP
        .iter()
        .copied()
        .chain(modern_port_map())
        .find(|&(base, len, _)| hit(base, len))
        .map(|(_, _, d)| d)
}

/// The outside world as the platform's devices see it.
pub struct PlatformIo {
    /// Virtual time.
    pub clock: Arc<dyn Clock>,
    /// The date at power-on.
    pub wall: Box<dyn WallClock>,
    /// Where COM1's output goes.
    pub serial_out: Box<dyn Write + Send>,
    /// Where COM1's input comes from.
    pub serial_in: Box<dyn Input>,
    /// Where platform events (power button, lid, ...) come from.
    pub platform_in: Box<dyn Input>,
    /// The guest TSC's frequency (the local APIC's TSC-deadline mode).
    pub tsc_hz: u64,
    /// The PCI functions beyond the host bridge.
    pub pci: Vec<PciFunction>,
    /// Where RAM below 4 GiB ends: the PCI host decodes BARs from there
    /// to the IOAPIC (ECAM aside) and in its 64-bit window.
    pub ram_below_4g: u64,
    /// Where the functions send their interrupts: pointed at the new
    /// controllers.
    pub chip_link: Arc<ChipLink>,
}

/// The devices only a modern machine has.
struct Modern {
    hpet: Arc<Mutex<Hpet>>,
    acpi_pm: Arc<Mutex<AcpiPm>>,
    dma: Arc<Mutex<Dma>>,
}

/// All devices of the machine.
pub struct Platform {
    /// Port I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// The interrupt controllers (PIC pair; IOAPIC and local APIC on a
    /// modern machine).
    pub chip: Arc<Mutex<IrqChip>>,
    /// The PIT.
    pub pit: Arc<Mutex<Pit>>,
    /// COM1.
    pub serial: Arc<Mutex<Serial>>,
    /// The RTC.
    pub cmos: Arc<Mutex<Cmos>>,
    i8042: Arc<Mutex<I8042>>,
    port80: Arc<Mutex<Port80>>,
    port92: Arc<Mutex<Port92>>,
    debug_exit: Arc<Mutex<DebugExit>>,
    pci: Arc<Mutex<PciHost>>,
    modern: Option<Modern>,
}

/// What a snapshot holds of a modern machine's own devices.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModernState {
    /// The IOAPIC and the local APIC.
    pub apic: nyx_devices::irqchip::ApicState,
    /// The HPET.
    pub hpet: nyx_devices::hpet::HpetState,
    /// The ACPI PM block.
    pub acpi_pm: nyx_devices::acpi_pm::AcpiPmState,
    /// The ISA DMA controllers.
    pub dma: nyx_devices::dma::DmaState,
}

/// Every device's state: what a snapshot holds of the platform.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlatformState {
    /// The PIC pair.
    pub pic: nyx_devices::pic::PicState,
    /// The PIT.
    pub pit: nyx_devices::pit::PitState,
    /// COM1.
    pub serial: nyx_devices::serial::SerialState,
    /// The RTC.
    pub cmos: nyx_devices::cmos::CmosState,
    /// The keyboard controller.
    pub i8042: nyx_devices::i8042::I8042State,
    /// Port 0x80.
    pub port80: nyx_devices::port80::Port80State,
    /// Port 0x92.
    pub port92: nyx_devices::i8042::Port92State,
    /// The debug-exit port.
    pub debug_exit: nyx_devices::debug_exit::DebugExitState,
    /// The PCI host bridge.
    pub pci: nyx_devices::pci::PciState,
    /// A modern machine's devices (None on a legacy machine).
    pub modern: Option<ModernState>,
}

/// Errors of restoring the platform.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// The device layout is inconsistent (a bug in Nyx).
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A device state in the snapshot is not valid.
    #[error("device state in the snapshot: {0}")]
    State(String),
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `host` with `functions` added.
fn pci_host(mut host: PciHost, functions: Vec<PciFunction>) -> PciHost {
    for (slot, device) in functions {
        host.add_device(slot, device);
    }
    host
}

/// The sinks devices raise their lines through.
struct Sinks {
    /// The controllers, directly (COM1, i8042, HPET, ACPI PM).
    chip: Arc<dyn InterruptSink>,
    /// The PIT's and the RTC's: cut while the HPET is in legacy
    /// replacement mode.
    gated: Arc<dyn InterruptSink>,
    legacy: Arc<AtomicBool>,
}

impl Sinks {
    fn new(chip: &Arc<Mutex<IrqChip>>) -> Self {
        let direct: Arc<dyn InterruptSink> = chip.clone();
        let legacy = Arc::new(AtomicBool::new(false));
        Sinks {
            gated: Arc::new(GatedSink::new(direct.clone(), legacy.clone())),
            chip: direct,
            legacy,
        }
    }
}

impl Platform {
    /// Builds the platform for a machine with the given RAM layout and
    /// interrupt controllers, and `cpus` CPUs (a local APIC each; a legacy
    /// machine has one CPU).
    pub fn new(
        io: PlatformIo,
        ram_below_4g: u64,
        ram_above_4g: u64,
        irqchip: crate::config::Irqchip,
        cpus: usize,
    ) -> Result<Self, BusError> {
        let chip = match irqchip {
            crate::config::Irqchip::Legacy => IrqChip::legacy(Pic::new()),
            crate::config::Irqchip::Apic => IrqChip::with_apic_cpus(Pic::new(), io.clock.clone(), io.tsc_hz, cpus),
        };
        let chip = Arc::new(Mutex::new(chip));
        io.chip_link.set(&chip);
        let sinks = Sinks::new(&chip);
        let pit = Pit::new(io.clock.clone(), sinks.gated.clone());
        let serial = Serial::new(sinks.chip.clone(), COM1_IRQ, io.serial_out, io.serial_in);
        let cmos = Cmos::new(
            io.wall.as_ref(),
            ram_below_4g,
            ram_above_4g,
            io.clock.clone(),
            sinks.gated.clone(),
        );
        let i8042 = I8042::new(sinks.chip.clone());
        let modern = match irqchip {
            crate::config::Irqchip::Legacy => None,
            crate::config::Irqchip::Apic => Some(Modern {
                hpet: Arc::new(Mutex::new(Hpet::new(
                    io.clock.clone(),
                    sinks.chip.clone(),
                    sinks.legacy.clone(),
                ))),
                acpi_pm: Arc::new(Mutex::new(AcpiPm::new(
                    io.clock.clone(),
                    sinks.chip.clone(),
                    io.platform_in,
                ))),
                dma: Arc::new(Mutex::new(Dma::new())),
            }),
        };
        Self::assemble(
            chip,
            pit,
            serial,
            cmos,
            i8042,
            Port80::new(),
            Port92::new(),
            DebugExit,
            pci_host(PciHost::new(), io.pci),
            modern,
            io.ram_below_4g,
        )
    }

    /// Rebuilds the platform from a snapshot's device states.
    pub fn from_state(io: PlatformIo, state: &PlatformState) -> Result<Self, PlatformError> {
        let bad = |e: &dyn std::fmt::Display| PlatformError::State(e.to_string());
        let chip = IrqChip::from_state(
            &state.pic,
            state.modern.as_ref().map(|m| &m.apic),
            io.clock.clone(),
            io.tsc_hz,
        )
        .map_err(|e| bad(&e))?;
        let chip = Arc::new(Mutex::new(chip));
        io.chip_link.set(&chip);
        let sinks = Sinks::new(&chip);
        let pit = Pit::from_state(&state.pit, io.clock.clone(), sinks.gated.clone());
        let serial = Serial::from_state(&state.serial, sinks.chip.clone(), COM1_IRQ, io.serial_out, io.serial_in)
            .map_err(|e| bad(&e))?;
        let cmos = Cmos::from_state(&state.cmos, io.clock.clone(), sinks.gated.clone()).map_err(|e| bad(&e))?;
        let i8042 = I8042::from_state(&state.i8042, sinks.chip.clone());
        let mut pci = pci_host(PciHost::from_state(&state.pci).map_err(|e| bad(&e))?, io.pci);
        pci.restore_functions(&state.pci.functions).map_err(|e| bad(&e))?;
        let modern = match &state.modern {
            None => None,
            Some(m) => Some(Modern {
                hpet: Arc::new(Mutex::new(
                    Hpet::from_state(&m.hpet, io.clock.clone(), sinks.chip.clone(), sinks.legacy.clone())
                        .map_err(|e| bad(&format!("HPET: {e}")))?,
                )),
                acpi_pm: Arc::new(Mutex::new(
                    AcpiPm::from_state(&m.acpi_pm, io.clock.clone(), sinks.chip.clone(), io.platform_in)
                        .map_err(|e| bad(&format!("ACPI PM: {e}")))?,
                )),
                dma: Arc::new(Mutex::new(Dma::from_state(&m.dma))),
            }),
        };
        Ok(Self::assemble(
            chip,
            pit,
            serial,
            cmos,
            i8042,
            Port80::from_state(&state.port80),
            Port92::from_state(&state.port92),
            DebugExit::from_state(&state.debug_exit),
            pci,
            modern,
            io.ram_below_4g,
        )?)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        chip: Arc<Mutex<IrqChip>>,
        pit: Pit,
        serial: Serial,
        cmos: Cmos,
        i8042: I8042,
        port80: Port80,
        port92: Port92,
        debug_exit: DebugExit,
        pci: PciHost,
        modern: Option<Modern>,
        ram_below_4g: u64,
    ) -> Result<Self, BusError> {
        let pit = Arc::new(Mutex::new(pit));
        let serial = Arc::new(Mutex::new(serial));
        let cmos = Arc::new(Mutex::new(cmos));
        let i8042 = Arc::new(Mutex::new(i8042));
        let port80 = Arc::new(Mutex::new(port80));
        let port92 = Arc::new(Mutex::new(port92));
        let debug_exit = Arc::new(Mutex::new(debug_exit));
        let pci = Arc::new(Mutex::new(pci));
        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let mut ports: Vec<(u16, u16, PortDevice)> = PORT_MAP.to_vec();
        if modern.is_some() {
            ports.extend(modern_port_map());
        }
        for (base, len, device) in ports {
            let d: SharedDevice = match (device, &modern) {
                (PortDevice::Pic, _) => chip.clone(),
                (PortDevice::Pit, _) => pit.clone(),
                (PortDevice::Uart, _) => serial.clone(),
                (PortDevice::Cmos, _) => cmos.clone(),
                (PortDevice::I8042, _) => i8042.clone(),
                (PortDevice::Port80, _) => port80.clone(),
                (PortDevice::Port92, _) => port92.clone(),
                (PortDevice::DebugExit, _) => debug_exit.clone(),
                (PortDevice::Pci, _) => pci.clone(),
                (PortDevice::Dma, Some(m)) => m.dma.clone(),
                (PortDevice::AcpiPm, Some(m)) => m.acpi_pm.clone(),
                (PortDevice::Dma | PortDevice::AcpiPm, None) => continue,
            };
            pio.insert(u64::from(base), u64::from(len), d)?;
        }
        // The PCI host decodes BARs anywhere in the 32-bit hole up to the
        // IOAPIC (where a guest's own allocator may put them, as Linux
        // does without firmware) and in its 64-bit window; it assigns
        // them in MMIO_WINDOW at build.
        mmio.insert(ECAM_BASE, ECAM_SIZE, pci.clone())?;
        if ram_below_4g < ECAM_BASE {
            mmio.insert(ram_below_4g, ECAM_BASE - ram_below_4g, pci.clone())?;
        }
        const _: () = assert!(MMIO_WINDOW.0 >= ECAM_BASE + ECAM_SIZE && MMIO_WINDOW.0 + MMIO_WINDOW.1 <= IOAPIC_BASE);
        mmio.insert(ECAM_BASE + ECAM_SIZE, IOAPIC_BASE - ECAM_BASE - ECAM_SIZE, pci.clone())?;
        mmio.insert(MMIO64_WINDOW.0, MMIO64_WINDOW.1, pci.clone())?;
        if let Some(m) = &modern {
            mmio.insert(LAPIC_BASE, LAPIC_SIZE, chip.clone())?;
            mmio.insert(IOAPIC_BASE, IOAPIC_SIZE, chip.clone())?;
            mmio.insert(HPET_BASE, HPET_SIZE, m.hpet.clone())?;
        }
        Ok(Platform {
            pio,
            mmio,
            chip,
            pit,
            serial,
            cmos,
            i8042,
            port80,
            port92,
            debug_exit,
            pci,
            modern,
        })
    }

    /// Every device's state.
    pub fn state(&self) -> PlatformState {
        let chip = lock(&self.chip);
        PlatformState {
            pic: chip.pic_state(),
            pit: lock(&self.pit).state(),
            serial: lock(&self.serial).state(),
            cmos: lock(&self.cmos).state(),
            i8042: lock(&self.i8042).state(),
            port80: lock(&self.port80).state(),
            port92: lock(&self.port92).state(),
            debug_exit: lock(&self.debug_exit).state(),
            pci: lock(&self.pci).state(),
            modern: match (&self.modern, chip.apic_state()) {
                (Some(m), Some(apic)) => Some(ModernState {
                    apic,
                    hpet: lock(&m.hpet).state(),
                    acpi_pm: lock(&m.acpi_pm).state(),
                    dma: lock(&m.dma).state(),
                }),
                _ => None,
            },
        }
    }

    /// Brings the timers up to the current virtual time and pulls serial
    /// input and platform events; devices raise their lines as they go.
    pub fn poll(&self) {
        lock(&self.pit).poll();
        let alarm = {
            let mut cmos = lock(&self.cmos);
            let before = cmos.alarm_raised();
            cmos.poll();
            !before && cmos.alarm_raised()
        };
        lock(&self.serial).poll_input();
        lock(&self.pci).poll();
        if let Some(m) = &self.modern {
            lock(&m.hpet).poll();
            let mut pm = lock(&m.acpi_pm);
            pm.poll();
            // The RTC alarm is a wake source (while the machine sleeps, the
            // CMOS is polled at its second boundaries like any deadline).
            if alarm {
                pm.rtc_alarm();
            }
        }
        lock(&self.chip).poll();
    }

    /// The earliest virtual time at which a device wants to be polled.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        let mut all = vec![
            lock(&self.pit).next_deadline_ns(),
            lock(&self.cmos).next_deadline_ns(),
            lock(&self.chip).next_deadline_ns(),
        ];
        if let Some(m) = &self.modern {
            all.push(lock(&m.hpet).next_deadline_ns());
            all.push(lock(&m.acpi_pm).next_deadline_ns());
        }
        all.into_iter().flatten().min()
    }

    /// Pulls serial input into the UART (after the guest touched it).
    pub fn poll_serial_input(&self) {
        lock(&self.serial).poll_input();
    }

    /// Whether input may still arrive from outside (serial bytes, platform
    /// events), so an idle guest may still be woken by it.
    pub fn input_may_arrive(&self) -> bool {
        !lock(&self.serial).input_exhausted()
            || self
                .modern
                .as_ref()
                .is_some_and(|m| !lock(&m.acpi_pm).input_exhausted())
    }

    /// Whether the controllers have an interrupt for the CPU the calling
    /// thread acts for ([`nyx_devices::cpu::current`], as every per-CPU
    /// question below).
    pub fn interrupt_pending(&self) -> bool {
        lock(&self.chip).has_interrupt(nyx_devices::cpu::current())
    }

    /// The INTA cycle: the vector to inject.
    pub fn acknowledge(&self) -> u8 {
        lock(&self.chip).acknowledge(nyx_devices::cpu::current())
    }

    /// Takes the INIT, start-up and NMI messages left for the CPU.
    pub fn take_signals(&self) -> nyx_devices::irqchip::CpuSignals {
        self.take_signals_of(nyx_devices::cpu::current())
    }

    /// Takes the INIT, start-up and NMI messages left for CPU `cpu`.
    pub fn take_signals_of(&self, cpu: usize) -> nyx_devices::irqchip::CpuSignals {
        lock(&self.chip).take_signals(cpu)
    }

    /// Whether the controllers have an interrupt for CPU `cpu`.
    pub fn interrupt_pending_of(&self, cpu: usize) -> bool {
        lock(&self.chip).has_interrupt(cpu)
    }

    /// Whether INIT, start-up or NMI messages wait for the CPU.
    pub fn has_signals(&self) -> bool {
        lock(&self.chip).has_signals(nyx_devices::cpu::current())
    }

    /// Who hears of interrupts and signals left for a CPU.
    pub fn set_waker(&self, waker: Option<Arc<dyn nyx_devices::irqchip::CpuWaker>>) {
        lock(&self.chip).set_waker(waker);
    }

    /// A guest access to one of the local APIC's MSRs (see
    /// [`IrqChip::msr`]): None when it is not one of them or the machine has
    /// no local APIC.
    pub fn apic_msr(&self, index: u32, write: Option<u64>) -> Option<Option<u64>> {
        lock(&self.chip).msr(nyx_devices::cpu::current(), index, write)
    }

    /// The guest's TSC reads `guest_tsc` now, for the local APIC's
    /// TSC-deadline timer (nothing on a legacy machine).
    pub fn set_guest_tsc_now(&self, guest_tsc: u64) {
        lock(&self.chip).set_guest_tsc_now(guest_tsc);
    }

    /// The local APIC's TPR as CR8, for `kvm_run.cr8` (None: no APIC).
    pub fn cr8(&self) -> Option<u8> {
        lock(&self.chip).cr8(nyx_devices::cpu::current())
    }

    /// Takes the guest's CR8 from `kvm_run.cr8` after an exit.
    pub fn sync_cr8(&self, cr8: u8) {
        lock(&self.chip).sync_cr8(nyx_devices::cpu::current(), cr8);
    }

    /// Takes the PCI functions out (to move them into a platform rebuilt
    /// from a snapshot, with [`PlatformIo::pci`]).
    pub fn take_pci_functions(&self) -> Vec<PciFunction> {
        lock(&self.pci).take_devices()
    }

    /// Makes what the PCI functions wrote to the host durable (each disk's
    /// image flushed), naming the first that fails.
    pub fn flush_storage(&self) -> Result<(), String> {
        lock(&self.pci).flush_storage()
    }

    /// The PCI functions as `(slot, name)`.
    pub fn pci_functions(&self) -> Vec<(u8, String)> {
        lock(&self.pci).devices()
    }

    /// Whether a wake event (the power button, `nyx ctl wake`, an RTC
    /// alarm with RTC_EN) has arrived for a sleeping machine; takes it.
    pub fn take_wake(&self) -> bool {
        self.modern.as_ref().is_some_and(|m| lock(&m.acpi_pm).take_wake())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_port_of_the_map_names_its_device() {
        assert_eq!(device_of_port(0x3f8), Some(PortDevice::Uart));
        assert_eq!(device_of_port(0x3ff), Some(PortDevice::Uart));
        assert_eq!(device_of_port(0x400), None);
        assert_eq!(device_of_port(0x43), Some(PortDevice::Pit));
        assert_eq!(device_of_port(0x44), None);
        assert_eq!(device_of_port(0xcff), Some(PortDevice::Pci));
        assert_eq!(device_of_port(0xffff), Some(PortDevice::Pci), "the I/O BAR window");
        assert_eq!(device_of_port(0xbfff), None);
        assert_eq!(device_of_port(0x608), Some(PortDevice::AcpiPm));
        assert_eq!(device_of_port(0xc0), Some(PortDevice::Dma));
        assert_eq!(device_of_port(0x80), Some(PortDevice::Port80));
        for (base, len, device) in PORT_MAP.iter().copied().chain(modern_port_map()) {
            for port in u32::from(base)..u32::from(base) + u32::from(len) {
                let port = port as u16;
                assert_eq!(device_of_port(port), Some(device), "{port:#x}");
            }
        }
    }

    #[test]
    fn the_map_has_no_overlaps() {
        let mut bus = Bus::new();
        for (base, len, _) in PORT_MAP.iter().copied().chain(modern_port_map()) {
            let dev: SharedDevice = Arc::new(Mutex::new(Port80::new()));
            bus.insert(u64::from(base), u64::from(len), dev).unwrap();
        }
    }
}
