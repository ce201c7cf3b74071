//! The description of a machine that traces and snapshots carry in their
//! header: enough to build the same machine again without the files it was
//! built from (the kernel and initrd travel as embedded images).

use serde::{Deserialize, Serialize};

use crate::cpuid::CpuidEntry;

/// The image name of the kernel in a trace's image list.
pub const KERNEL_IMAGE: &str = "kernel";
/// The image name of the initrd.
pub const INITRD_IMAGE: &str = "initrd";

/// How much a recording verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum VerifyLevel {
    /// Every exit's kind, address, size and data; landings; the end state.
    #[default]
    Exits,
    /// Also the register digest after every exit.
    Full,
}

/// The machine's interrupt controllers and the platform around them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Irqchip {
    /// A 1980s PC: the 8259A PIC pair only, no ACPI.
    Legacy,
    /// A modern PC: a local APIC, an IOAPIC beside the PICs, HPET, ACPI
    /// tables and PM, ISA DMA. The default: what every current OS expects,
    /// and a guest that only knows the 8259 runs on it unchanged.
    #[default]
    Apic,
}

impl Irqchip {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Irqchip::Legacy => "legacy",
            Irqchip::Apic => "apic",
        }
    }

    /// Parses a `--irqchip` value.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "legacy" => Ok(Irqchip::Legacy),
            "apic" => Ok(Irqchip::Apic),
            other => Err(format!("unknown interrupt controller {other:?}: use legacy or apic")),
        }
    }
}

/// A PCI function the machine has beyond the host bridge. The functions
/// sit on bus 0 in the order of the list from slot 3 (QEMU's `pc` machine
/// has its ISA bridge at slot 1 and its display at 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PciFunctionConfig {
    /// A virtio-blk disk (`--disk`), with the identity of its image.
    Disk(crate::disk::DiskIdentity),
    /// virtio-rng (`--rng`).
    Rng,
    /// virtio-console (`--virtio-console`).
    Console,
    /// virtio-net (`--net virtio,...`) with this MAC address (the backend
    /// is the run's: a replay needs none).
    Net([u8; 6]),
}

impl PciFunctionConfig {
    /// The name its function reports (`PciDevice::name`).
    pub fn name(&self) -> &'static str {
        use nyx_devices::virtio::{block, console, net, rng};
        match self {
            PciFunctionConfig::Disk(_) => block::NAME,
            PciFunctionConfig::Rng => rng::NAME,
            PciFunctionConfig::Console => console::NAME,
            PciFunctionConfig::Net(_) => net::NAME,
        }
    }

    /// The function's vendor and device ID (a modern virtio-pci function:
    /// 1af4, 1040 + the virtio device ID).
    pub fn pci_ids(&self) -> (u16, u16) {
        use nyx_devices::virtio::{block, console, net, pci, rng};
        let kind = match self {
            PciFunctionConfig::Disk(_) => block::DEVICE_TYPE,
            PciFunctionConfig::Rng => rng::DEVICE_TYPE,
            PciFunctionConfig::Console => console::DEVICE_TYPE,
            PciFunctionConfig::Net(_) => net::DEVICE_TYPE,
        };
        (pci::VENDOR, pci::DEVICE_ID_BASE + kind)
    }
}

/// The slot of the first function of [`MachineConfig::pci`].
pub const FIRST_PCI_SLOT: u8 = 3;

/// A machine as a trace or snapshot describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// The kernel's name as the user gave it (a Multiboot guest sees it in
    /// front of its command line).
    pub kernel_name: String,
    /// The command line as the user gave it.
    pub cmdline: String,
    /// Whether an initrd image is part of the machine.
    pub has_initrd: bool,
    /// The exact CPUID table.
    pub cpuid: Vec<CpuidEntry>,
    /// The name of the CPU model the table was made from (`--cpu`).
    pub cpu_model: String,
    /// The virtual TSC's frequency, kHz.
    pub tsc_khz: u32,
    /// The date at power-on, seconds since the Unix epoch.
    pub wall_seconds: i64,
    /// What the recording verifies.
    pub verify: VerifyLevel,
    /// The interrupt controllers and platform (`--irqchip`).
    pub irqchip: Irqchip,
    /// The PCI functions beyond the host bridge (apic machines only).
    pub pci: Vec<PciFunctionConfig>,
}

impl MachineConfig {
    /// The number of vCPUs (what the CPUID table's topology says).
    pub fn cpus(&self) -> usize {
        crate::cpuid::cpus_of(&self.cpuid)
    }

    /// Encodes with postcard.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Encoding a plain struct into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes what [`MachineConfig::to_bytes`] wrote.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let c = MachineConfig {
            mem_mib: 64,
            kernel_name: "hello".into(),
            cmdline: "a b".into(),
            has_initrd: false,
            cpuid: vec![CpuidEntry {
                function: 1,
                index: 0,
                flags: 0,
                eax: 1,
                ebx: 2,
                ecx: 3,
                edx: 4,
            }],
            cpu_model: "baseline".into(),
            tsc_khz: 2_000_000,
            wall_seconds: 1_800_000_000,
            verify: VerifyLevel::Full,
            irqchip: Irqchip::Apic,
            pci: Vec::new(),
        };
        assert_eq!(MachineConfig::from_bytes(&c.to_bytes()).unwrap(), c);
        assert!(MachineConfig::from_bytes(&[0xff; 3]).is_err());
    }
}
