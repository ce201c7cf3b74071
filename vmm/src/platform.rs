//! The PC platform: every legacy device of the machine on its port or MMIO
//! range, the interrupt routing from devices to the PIC, and the questions
//! the run loop asks at each exit (what is pending, when is the next
//! deadline).

use std::io::Write;
use std::sync::{Arc, Mutex};

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
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Platform {
    /// Builds the platform for a machine with the given RAM layout.
    pub fn new(io: PlatformIo, ram_below_4g: u64, ram_above_4g: u64) -> Result<Self, BusError> {
        let pic = Arc::new(Mutex::new(Pic::new()));
        let sink: Arc<dyn InterruptSink> = pic.clone();
        let pit = Arc::new(Mutex::new(Pit::new(io.clock.clone(), sink.clone())));
        let serial = Arc::new(Mutex::new(Serial::new(
            sink.clone(),
            COM1_IRQ,
            io.serial_out,
            io.serial_in,
        )));
        let cmos = Arc::new(Mutex::new(Cmos::new(
            io.wall.as_ref(),
            ram_below_4g,
            ram_above_4g,
            io.clock.clone(),
            sink.clone(),
        )));
        let i8042 = Arc::new(Mutex::new(I8042::new(sink)));
        let mut pio = Bus::new();
        pio.insert(0x20, 2, pic.clone())?;
        pio.insert(0xa0, 2, pic.clone())?;
        pio.insert(0x4d0, 2, pic.clone())?;
        pio.insert(0x40, 4, pit.clone())?;
        pio.insert(0x61, 1, pit.clone())?;
        pio.insert(0x3f8, 8, serial.clone())?;
        pio.insert(0x70, 2, cmos.clone())?;
        pio.insert(0x60, 1, i8042.clone())?;
        pio.insert(0x64, 1, i8042)?;
        pio.insert(0x80, 1, Arc::new(Mutex::new(Port80::new())))?;
        pio.insert(0x92, 1, Arc::new(Mutex::new(Port92::new())))?;
        pio.insert(0xf4, 4, Arc::new(Mutex::new(DebugExit)))?;
        pio.insert(0xcf8, 8, Arc::new(Mutex::new(PciHost::new())))?;
        Ok(Platform {
            pio,
            mmio: Bus::new(),
            pic,
            pit,
            serial,
            cmos,
        })
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
