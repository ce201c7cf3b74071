//! nyx-devices: the PC devices of a Nyx machine (the legacy ones, and the
//! modern platform's APICs, HPET, ACPI PM and ISA DMA) as plain
//! deterministic state machines. Nothing in this crate touches KVM, a clock, a file or a
//! socket: time, input, entropy and interrupt lines come in through the traits
//! in [`io`], and every device keeps its snapshot-relevant state in a plain
//! serde `State` type, so the recorder, the replayer and the tests can drive
//! the same code with logging or fake implementations. Where the devices
//! sit in the whole: ARCHITECTURE.md at the repository root.

pub mod acpi_pm;
pub mod block;
pub mod bus;
pub mod cmos;
pub mod cpu;
pub mod debug_exit;
pub mod dma;
pub mod hpet;
pub mod i8042;
pub mod io;
pub mod ioapic;
pub mod irqchip;
pub mod lapic;
pub mod msi;
pub mod msix;
pub mod pci;
pub mod pci_config;
pub mod pci_device;
pub mod pic;
pub mod pit;
pub mod port80;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError, BusEvent};
pub use io::{Clock, Entropy, Input, InterruptSink, WallClock};
