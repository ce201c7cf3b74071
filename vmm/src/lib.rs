//! nyx-vmm: the machine. A KVM VM with one vCPU, guest memory, the boot
//! loaders, the CPUID/MSR policy, vCPU state capture and the run loop that
//! hands every exit to the user-space devices. How the run loop, its hooks
//! and the other crates fit together, and the emulated-KVM quirks the
//! machine works around: ARCHITECTURE.md at the repository root.

pub mod access;
pub mod acpi;
pub mod clock;
pub mod config;
pub mod console;
pub mod cpu_model;
pub mod cpuid;
pub mod crash;
pub mod disk;
pub mod events;
pub mod hooks;
pub mod host;
pub mod kick;
pub mod loader;
pub mod machine;
pub mod mem_state;
pub mod memory;
pub mod metrics;
pub mod migration;
pub mod migration_auth;
pub mod msr;
pub mod net;
pub mod netdev;
pub mod paging;
pub mod patch;
pub mod pci_setup;
pub mod platform;
pub mod probe;
pub mod reset;
pub mod snapshot;
pub mod vcpu_state;
pub use machine::{Machine, MachineBuilder, RunOutcome, SerialIn};
pub use probe::{kvm_available, kvm_device};

pub use vm_memory;
