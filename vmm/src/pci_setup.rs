//! The PCI functions of a machine: what the user asked for (`--disk`,
//! `--rng`, `--virtio-console`; [`PciSetup`]) turned into virtio-pci
//! functions on bus 0, and the list a trace or snapshot header keeps of
//! them (`config::PciFunctionConfig`).
//!
//! The functions go into consecutive slots from `config::FIRST_PCI_SLOT`:
//! the disks in order, then the entropy device, then the console. Each
//! reaches the controllers through the machine's [`ChipLink`]: MSI-X to the
//! local APIC, INTx on the line [`intx_gsi`] gives its slot. What comes
//! from outside goes through the run mode: virtio-rng's bytes
//! (`RunHooks::rng_entropy`), virtio-console's input
//! (`RunHooks::console_input`), and whether disk writes stay in an overlay
//! (`RunHooks::isolates_disks`).

use std::io::Write;
use std::sync::Arc;

use nyx_devices::pci_device::{IntxLine, IntxShares, PciDevice};
use nyx_devices::virtio::block::VirtioBlock;
use nyx_devices::virtio::console::VirtioConsole;
use nyx_devices::virtio::rng::VirtioRng;
use nyx_devices::virtio::{VirtioDevice, VirtioPci};
use nyx_devices::Input;

use crate::config::{Irqchip, MachineConfig, PciFunctionConfig, FIRST_PCI_SLOT};
use crate::disk::{Disk, DiskError, DiskFormat, DiskSpec};
use crate::hooks::{HostEntropy, RunHooks};
use crate::memory::DmaMemory;
use crate::platform::{intx_gsi, ChipLink, PciFunction};

/// virtio-console's two ends.
pub struct ConsoleIo {
    /// Where the guest's output goes.
    pub out: Box<dyn Write + Send>,
    /// Where its input comes from.
    pub input: crate::machine::SerialIn,
}

/// The PCI functions the user asked for.
#[derive(Default)]
pub struct PciSetup {
    /// `--disk`, in order.
    pub disks: Vec<DiskSpec>,
    /// `--rng`.
    pub rng: bool,
    /// `--virtio-console`.
    pub console: Option<ConsoleIo>,
}

impl std::fmt::Debug for PciSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciSetup")
            .field("disks", &self.disks)
            .field("rng", &self.rng)
            .field("console", &self.console.is_some())
            .finish()
    }
}

impl PciSetup {
    /// Whether there is no function to add.
    pub fn is_empty(&self) -> bool {
        self.disks.is_empty() && !self.rng && self.console.is_none()
    }

    /// The functions a trace or snapshot header lists, with the disks at
    /// the paths recorded (or, where `disk_paths` has one, at that path
    /// instead, in order) and the console's output going to `console_out`
    /// (its input comes from the run mode).
    pub fn from_config(
        config: &MachineConfig,
        disk_paths: &[std::path::PathBuf],
        console_out: Option<Box<dyn Write + Send>>,
    ) -> PciSetup {
        let mut setup = PciSetup::default();
        let mut console_out = console_out;
        for f in &config.pci {
            match f {
                PciFunctionConfig::Disk(d) => {
                    let path = disk_paths
                        .get(setup.disks.len())
                        .cloned()
                        .unwrap_or_else(|| std::path::PathBuf::from(&d.path));
                    setup.disks.push(DiskSpec {
                        path,
                        format: DiskFormat::Raw,
                        read_only: d.read_only,
                        id: Some(d.id.clone()),
                    });
                }
                PciFunctionConfig::Rng => setup.rng = true,
                PciFunctionConfig::Console => {
                    setup.console = Some(ConsoleIo {
                        out: console_out.take().unwrap_or_else(|| Box::new(std::io::sink())),
                        input: crate::machine::SerialIn::None,
                    })
                }
            }
        }
        setup
    }
}

/// Errors of building the functions.
#[derive(Debug, thiserror::Error)]
pub enum PciSetupError {
    /// A disk could not be opened, or is not the recorded one.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// More functions than slots.
    #[error("too many PCI devices: bus 0 has room for {0}")]
    TooMany(usize),
    /// Virtio needs MSI-X or the IOAPIC's PCI lines.
    #[error("virtio devices need the modern platform (--irqchip apic)")]
    Legacy,
}

/// Builds the functions of `setup` for a machine whose run mode is
/// `hooks`, with DMA through `dma` and interrupts through `link`. Returns
/// them with their slots, and the list for the header. `console_in` is
/// the console's input, opened. `expected`, when a
/// replay or restore passes the recorded list, is checked disk by disk
/// (size and SHA-256) before anything runs.
pub fn build_functions(
    setup: PciSetup,
    console_in: Option<Box<dyn Input>>,
    hooks: &mut dyn RunHooks,
    dma: &DmaMemory,
    link: &Arc<ChipLink>,
    irqchip: Irqchip,
    expected: Option<&[PciFunctionConfig]>,
) -> Result<(Vec<PciFunction>, Vec<PciFunctionConfig>), PciSetupError> {
    if setup.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    if irqchip == Irqchip::Legacy {
        return Err(PciSetupError::Legacy);
    }
    let count = setup.disks.len() + usize::from(setup.rng) + usize::from(setup.console.is_some());
    let room = 32 - usize::from(FIRST_PCI_SLOT);
    if count > room {
        return Err(PciSetupError::TooMany(room));
    }
    let shares = Arc::new(IntxShares::default());
    let overlay = hooks.isolates_disks();
    let mut slot = FIRST_PCI_SLOT;
    let mut functions: Vec<PciFunction> = Vec::new();
    let mut config = Vec::new();
    let add = |device: Box<dyn VirtioDevice>, functions: &mut Vec<PciFunction>, slot: &mut u8| {
        let intx = IntxLine::new(intx_gsi(*slot, 1), shares.clone(), link.clone());
        let f: Box<dyn PciDevice> = Box::new(VirtioPci::new(device, dma.clone(), link.clone(), intx));
        functions.push((*slot, f));
        *slot += 1;
    };
    for (i, spec) in setup.disks.iter().enumerate() {
        let id = spec.id.clone().unwrap_or_else(|| format!("disk{i}"));
        let identity = match expected.and_then(|e| e.get(config.len())) {
            // A plain run's snapshot has no hash to check.
            Some(PciFunctionConfig::Disk(want)) if !want.sha256.is_empty() => {
                Disk::check_identity(want, &spec.path)?;
                want.clone()
            }
            _ if overlay => Disk::identity(spec, &id)?,
            // A plain run does not hash its images: nothing replays it.
            _ => crate::disk::DiskIdentity {
                id: id.clone(),
                path: spec.path.display().to_string(),
                read_only: spec.read_only,
                size: 0,
                sha256: String::new(),
            },
        };
        let disk = Disk::open(spec, &id, overlay)?;
        add(
            Box::new(VirtioBlock::new(Box::new(disk), id)),
            &mut functions,
            &mut slot,
        );
        config.push(PciFunctionConfig::Disk(identity));
    }
    if setup.rng {
        let entropy = hooks.rng_entropy(Box::new(HostEntropy));
        add(Box::new(VirtioRng::new(entropy)), &mut functions, &mut slot);
        config.push(PciFunctionConfig::Rng);
    }
    if let Some(c) = setup.console {
        let input = hooks.console_input(console_in.unwrap_or_else(|| Box::new(nyx_devices::io::NoInput)));
        add(Box::new(VirtioConsole::new(c.out, input)), &mut functions, &mut slot);
        config.push(PciFunctionConfig::Console);
    }
    Ok((functions, config))
}
