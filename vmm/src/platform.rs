//! The PC platform: every legacy device of the machine on its port or MMIO
//! range, the interrupt routing from devices to the PIC, and the questions
//! the run loop asks at each exit (what is pending, when is the next
//! deadline).

use std::io::Write;
use std::sync::{Arc, Mutex};

use nyx_devices::bus::SharedDevice;
use nyx_devices::cmos::Cmos;
use nyx_devices::debug_exit::DebugExit;
use nyx_devices::i8042::{Port92, I8042};
use nyx_devices::pci::PciHost;
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
];

/// The device that decodes `port`, if any.
pub fn device_of_port(port: u16) -> Option<PortDevice> {
    PORT_MAP
        .iter()
        .find(|&&(base, len, _)| port >= base && u32::from(port) < u32::from(base) + u32::from(len))
        .map(|&(_, _, d)| d)
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
}

/// All devices of the machine.
pub struct Platform {
    /// Port I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// The PIC pair.
    pub pic: Arc<Mutex<Pic>>,
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

impl Platform {
    /// Builds the platform for a machine with the given RAM layout.
    pub fn new(io: PlatformIo, ram_below_4g: u64, ram_above_4g: u64) -> Result<Self, BusError> {
        let pic = Arc::new(Mutex::new(Pic::new()));
        let sink: Arc<dyn InterruptSink> = pic.clone();
        let pit = Pit::new(io.clock.clone(), sink.clone());
        let serial = Serial::new(sink.clone(), COM1_IRQ, io.serial_out, io.serial_in);
        let cmos = Cmos::new(
            io.wall.as_ref(),
            ram_below_4g,
            ram_above_4g,
            io.clock.clone(),
            sink.clone(),
        );
        let i8042 = I8042::new(sink);
        Self::assemble(
            pic,
            pit,
            serial,
            cmos,
            i8042,
            Port80::new(),
            Port92::new(),
            DebugExit,
            PciHost::new(),
        )
    }

    /// Rebuilds the platform from a snapshot's device states.
    pub fn from_state(io: PlatformIo, state: &PlatformState) -> Result<Self, PlatformError> {
        let bad = |e: &dyn std::fmt::Display| PlatformError::State(e.to_string());
        let pic = Arc::new(Mutex::new(Pic::from_state(&state.pic)));
        let sink: Arc<dyn InterruptSink> = pic.clone();
        let pit = Pit::from_state(&state.pit, io.clock.clone(), sink.clone());
        let serial = Serial::from_state(&state.serial, sink.clone(), COM1_IRQ, io.serial_out, io.serial_in)
            .map_err(|e| bad(&e))?;
        let cmos = Cmos::from_state(&state.cmos, io.clock.clone(), sink.clone()).map_err(|e| bad(&e))?;
        let i8042 = I8042::from_state(&state.i8042, sink);
        let pci = PciHost::from_state(&state.pci).map_err(|e| bad(&e))?;
        Ok(Self::assemble(
            pic,
            pit,
            serial,
            cmos,
            i8042,
            Port80::from_state(&state.port80),
            Port92::from_state(&state.port92),
            DebugExit::from_state(&state.debug_exit),
            pci,
        )?)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        pic: Arc<Mutex<Pic>>,
        pit: Pit,
        serial: Serial,
        cmos: Cmos,
        i8042: I8042,
        port80: Port80,
        port92: Port92,
        debug_exit: DebugExit,
        pci: PciHost,
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
        for &(base, len, device) in PORT_MAP {
            let d: SharedDevice = match device {
                PortDevice::Pic => pic.clone(),
                PortDevice::Pit => pit.clone(),
                PortDevice::Uart => serial.clone(),
                PortDevice::Cmos => cmos.clone(),
                PortDevice::I8042 => i8042.clone(),
                PortDevice::Port80 => port80.clone(),
                PortDevice::Port92 => port92.clone(),
                PortDevice::DebugExit => debug_exit.clone(),
                PortDevice::Pci => pci.clone(),
            };
            pio.insert(u64::from(base), u64::from(len), d)?;
        }
        Ok(Platform {
            pio,
            mmio: Bus::new(),
            pic,
            pit,
            serial,
            cmos,
            i8042,
            port80,
            port92,
            debug_exit,
            pci,
        })
    }

    /// Every device's state.
    pub fn state(&self) -> PlatformState {
        PlatformState {
            pic: lock(&self.pic).state(),
            pit: lock(&self.pit).state(),
            serial: lock(&self.serial).state(),
            cmos: lock(&self.cmos).state(),
            i8042: lock(&self.i8042).state(),
            port80: lock(&self.port80).state(),
            port92: lock(&self.port92).state(),
            debug_exit: lock(&self.debug_exit).state(),
            pci: lock(&self.pci).state(),
        }
    }

    /// Brings the timers up to the current virtual time and pulls serial
    /// input; devices raise their lines on the PIC as they go.
    pub fn poll(&self) {
        lock(&self.pit).poll();
        lock(&self.cmos).poll();
        lock(&self.serial).poll_input();
    }

    /// The earliest virtual time at which a device wants to be polled.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        let a = lock(&self.pit).next_deadline_ns();
        let b = lock(&self.cmos).next_deadline_ns();
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Pulls serial input into the UART (after the guest touched it).
    pub fn poll_serial_input(&self) {
        lock(&self.serial).poll_input();
    }

    /// Whether serial input may still arrive (so an idle guest may still be
    /// woken by it).
    pub fn serial_may_receive(&self) -> bool {
        !lock(&self.serial).input_exhausted()
    }

    /// Whether the PIC asserts INTR.
    pub fn interrupt_pending(&self) -> bool {
        lock(&self.pic).has_interrupt()
    }

    /// The INTA cycle: the vector to inject.
    pub fn acknowledge(&self) -> u8 {
        lock(&self.pic).acknowledge()
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
        assert_eq!(device_of_port(0xffff), None);
        for &(base, len, device) in PORT_MAP {
            for port in base..base + len {
                assert_eq!(device_of_port(port), Some(device), "{port:#x}");
            }
        }
    }

    #[test]
    fn the_map_has_no_overlaps() {
        let mut bus = Bus::new();
        for &(base, len, _) in PORT_MAP {
            let dev: SharedDevice = Arc::new(Mutex::new(Port80::new()));
            bus.insert(u64::from(base), u64::from(len), dev).unwrap();
        }
    }
}
