//! The PCI functions of a machine: what the user asked for (`--disk`,
//! `--rng`, `--virtio-console`; [`PciSetup`]) turned into virtio-pci
//! functions on bus 0, and the list a trace or snapshot header keeps of
//! them (`config::PciFunctionConfig`).
//!
//! The functions go into consecutive slots from `config::FIRST_PCI_SLOT`:
//! the disks in order, then the entropy device, then the console, then
//! the NICs. As
//! firmware would, Nyx assigns their BARs at build (I/O BARs from the
//! host's I/O window, memory BARs, 64-bit ones included, from its 32-bit
//! window, allocated with rust-vmm `vm-allocator`) and enables I/O and
//! memory decoding; a guest may move them (the host decodes BARs wherever
//! its windows reach). Each
//! reaches the controllers through the machine's [`ChipLink`]: MSI-X to the
//! local APIC, INTx on the line [`intx_gsi`] gives its slot. What comes
//! from outside goes through the run mode: virtio-rng's bytes
//! (`RunHooks::rng_entropy`), virtio-console's input
//! (`RunHooks::console_input`), virtio-net's frames (`RunHooks::net_input`),
//! and whether disk writes stay in an overlay
//! (`RunHooks::isolates_disks`).

use std::io::Write;
use std::sync::Arc;

use nyx_devices::block::BlockBackend;
use nyx_devices::pci_device::{IntxLine, IntxShares, PciDevice};
use nyx_devices::virtio::block::VirtioBlock;
use nyx_devices::virtio::console::VirtioConsole;
use nyx_devices::virtio::net::VirtioNet;
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

/// A virtio-net NIC: its address and its backend's two ends, opened.
pub struct NetIo {
    /// The MAC address.
    pub mac: [u8; 6],
    /// Where the guest's frames go (records: `nyx_devices::virtio::net::record`).
    pub out: Box<dyn Write + Send>,
    /// Where the frames it receives come from (one record per read).
    pub input: Box<dyn Input>,
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
    /// `--net`, in order (after the console).
    pub nets: Vec<NetIo>,
    /// `--embed-disks`: a recording logs every disk read, so that its
    /// replay needs no image.
    pub embed_disks: bool,
}

impl std::fmt::Debug for PciSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciSetup")
            .field("disks", &self.disks)
            .field("rng", &self.rng)
            .field("console", &self.console.is_some())
            .field("nets", &self.nets.iter().map(|n| n.mac).collect::<Vec<_>>())
            .field("embed_disks", &self.embed_disks)
            .finish()
    }
}

impl PciSetup {
    /// Whether there is no function to add.
    pub fn is_empty(&self) -> bool {
        self.disks.is_empty() && !self.rng && self.console.is_none() && self.nets.is_empty()
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
                    setup.embed_disks |= d.embedded;
                    // The header does not store the format: the image
                    // tells (`Disk::recorded_format`).
                    setup.disks.push(DiskSpec {
                        path,
                        format: DiskFormat::Auto,
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
                // No backend: a replay's frames come from its trace.
                PciFunctionConfig::Net(mac) => setup.nets.push(NetIo {
                    mac: *mac,
                    out: Box::new(std::io::sink()),
                    input: Box::new(nyx_devices::io::NoInput),
                }),
            }
        }
        setup
    }
}

/// Assigns BARs as firmware does: each from its window, naturally
/// aligned, in slot order.
struct BarAllocator {
    io: vm_allocator::AddressAllocator,
    mem: vm_allocator::AddressAllocator,
}

impl BarAllocator {
    fn new() -> Self {
        let (io, mem) = (nyx_devices::pci::IO_WINDOW, nyx_devices::pci::MMIO_WINDOW);
        // Both windows are non-empty constants, so these cannot fail.
        BarAllocator {
            io: vm_allocator::AddressAllocator::new(io.0, io.1).expect("the PCI I/O window"),
            mem: vm_allocator::AddressAllocator::new(mem.0, mem.1).expect("the PCI MMIO window"),
        }
    }

    /// Programs `f`'s BARs and turns on I/O and memory decoding. A BAR
    /// that does not fit stays unassigned (address 0) for the guest to
    /// place.
    fn assign(&mut self, f: &mut dyn PciDevice) {
        use nyx_devices::pci_config::{BarKind, CMD_IO, CMD_MEMORY};
        let mut command = 0u16;
        for index in 0..6 {
            let Some(bar) = f.config().bar(index) else { continue };
            let (alloc, bit) = match bar.kind {
                BarKind::Io => (&mut self.io, CMD_IO),
                _ => (&mut self.mem, CMD_MEMORY),
            };
            if let Ok(r) = alloc.allocate(bar.size, bar.size, vm_allocator::AllocPolicy::FirstMatch) {
                f.config_mut().set_bar_address(index, r.start());
                command |= bit;
            }
        }
        let c = f.config().command() | command;
        f.config_mut().write(0x04, &c.to_le_bytes());
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

/// A plain run does not hash its images (nothing replays it, and they
/// change as it runs); its snapshot or migration stream finds the image by
/// its absolute path and checks its size.
fn plain_identity(spec: &DiskSpec, id: &str) -> crate::disk::DiskIdentity {
    crate::disk::DiskIdentity {
        id: id.to_string(),
        path: std::path::absolute(&spec.path)
            .unwrap_or_else(|_| spec.path.clone())
            .display()
            .to_string(),
        read_only: spec.read_only,
        size: 0,
        sha256: String::new(),
        embedded: false,
    }
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
    let count = setup.disks.len() + usize::from(setup.rng) + usize::from(setup.console.is_some()) + setup.nets.len();
    let room = 32 - usize::from(FIRST_PCI_SLOT);
    if count > room {
        return Err(PciSetupError::TooMany(room));
    }
    let shares = Arc::new(IntxShares::default());
    let overlay = hooks.isolates_disks();
    let mut slot = FIRST_PCI_SLOT;
    let mut functions: Vec<PciFunction> = Vec::new();
    let mut config = Vec::new();
    let mut bars = BarAllocator::new();
    let mut add = |device: Box<dyn VirtioDevice>, functions: &mut Vec<PciFunction>, slot: &mut u8| {
        let intx = IntxLine::new(intx_gsi(*slot, 1), shares.clone(), link.clone());
        let mut f: Box<dyn PciDevice> = Box::new(VirtioPci::new(device, dma.clone(), link.clone(), intx));
        bars.assign(&mut *f);
        functions.push((*slot, f));
        *slot += 1;
    };
    for (i, spec) in setup.disks.iter().enumerate() {
        let id = spec.id.clone().unwrap_or_else(|| format!("disk{i}"));
        let recorded = match expected.and_then(|e| e.get(config.len())) {
            Some(PciFunctionConfig::Disk(want)) => Some(want),
            _ => None,
        };
        // A replay of an embedded disk takes its reads from the trace and
        // needs no image.
        if let Some(want) = recorded.filter(|w| w.embedded) {
            if let Some(disk) = hooks.disk_backend(want, None) {
                add(
                    Box::new(VirtioBlock::new(disk, want.id.clone())),
                    &mut functions,
                    &mut slot,
                );
                config.push(PciFunctionConfig::Disk(want.clone()));
                continue;
            }
        }
        let mut spec = spec.clone();
        if let Some(want) = recorded.filter(|w| w.sha256.is_empty() && spec.format == DiskFormat::Auto) {
            spec.format = Disk::recorded_format(want, &spec.path)?;
        }
        let identity = match recorded {
            // A plain run's snapshot has no hash to check.
            Some(want) if !want.sha256.is_empty() => {
                spec.format = Disk::check_identity(want, &spec.path)?;
                want.clone()
            }
            _ if overlay => crate::disk::DiskIdentity {
                embedded: setup.embed_disks,
                ..Disk::identity(&spec, &id)?
            },
            _ => plain_identity(&spec, &id),
        };
        let image = Disk::open(&spec, &id, overlay)?;
        if let Some(want) = recorded.filter(|w| w.sha256.is_empty()) {
            image.check_size(want, &spec.path)?;
        }
        let identity = crate::disk::DiskIdentity {
            size: image.size(),
            ..identity
        };
        let opened: Box<dyn BlockBackend> = Box::new(image);
        let disk = hooks.disk_backend(&identity, Some(opened)).ok_or_else(|| {
            PciSetupError::Disk(DiskError::Spec {
                spec: identity.path.clone(),
                why: "the run mode has no backend for this disk".into(),
            })
        })?;
        add(Box::new(VirtioBlock::new(disk, id)), &mut functions, &mut slot);
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
    for n in setup.nets {
        let input = hooks.net_input(n.input);
        add(Box::new(VirtioNet::new(n.mac, n.out, input)), &mut functions, &mut slot);
        config.push(PciFunctionConfig::Net(n.mac));
    }
    Ok((functions, config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::PlainRun;
    use std::path::Path;

    fn disk(dir: &tempfile::TempDir, name: &str, read_only: bool) -> DiskSpec {
        let path = dir.path().join(name);
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        DiskSpec {
            path,
            format: DiskFormat::Raw,
            read_only,
            id: None,
        }
    }

    /// The slots and names of the functions, and the header's list.
    type Built = (Vec<(u8, String)>, Vec<PciFunctionConfig>);

    fn build(setup: PciSetup, expected: Option<&[PciFunctionConfig]>) -> Result<Built, PciSetupError> {
        let mem = crate::memory::create(2).unwrap();
        let dma = crate::memory::dma_view(&mem);
        let link = Arc::new(ChipLink::default());
        let (functions, config) =
            build_functions(setup, None, &mut PlainRun::new(), &dma, &link, Irqchip::Apic, expected)?;
        Ok((
            functions.iter().map(|(s, f)| (*s, f.name().to_string())).collect(),
            config,
        ))
    }

    #[test]
    fn functions_take_consecutive_slots_disks_first() {
        let dir = tempfile::tempdir().unwrap();
        let setup = PciSetup {
            disks: vec![disk(&dir, "a.img", false), disk(&dir, "b.img", true)],
            rng: true,
            console: Some(ConsoleIo {
                out: Box::new(std::io::sink()),
                input: crate::machine::SerialIn::None,
            }),
            nets: vec![NetIo {
                mac: [2, 0, 0, 0, 0, 7],
                out: Box::new(std::io::sink()),
                input: Box::new(nyx_devices::io::NoInput),
            }],
            embed_disks: false,
        };
        let (slots, config) = build(setup, None).unwrap();
        for ((_, name), c) in slots.iter().zip(&config) {
            assert_eq!(name, c.name(), "the header's name of the function");
        }
        assert_eq!(
            slots,
            vec![
                (3, "virtio-blk".to_string()),
                (4, "virtio-blk".to_string()),
                (5, "virtio-rng".to_string()),
                (6, "virtio-console".to_string()),
                (7, "virtio-net".to_string())
            ]
        );
        match &config[..] {
            [PciFunctionConfig::Disk(a), PciFunctionConfig::Disk(b), PciFunctionConfig::Rng, PciFunctionConfig::Console, PciFunctionConfig::Net(mac)] =>
            {
                assert_eq!(mac, &[2, 0, 0, 0, 0, 7]);
                assert_eq!((a.id.as_str(), b.id.as_str(), b.read_only), ("disk0", "disk1", true));
                assert!(a.sha256.is_empty(), "a plain run does not hash");
                assert_eq!(a.size, 4096, "but it knows the size");
                assert!(Path::new(&a.path).is_absolute(), "{}", a.path);
            }
            other => panic!("{other:?}"),
        }
        assert!(build(PciSetup::default(), None).unwrap().0.is_empty());
    }

    /// A plain run's saved machine (a snapshot, a migration stream) finds
    /// its image by path and checks the size: another size, or no image,
    /// is refused naming the disk; the same size builds.
    #[test]
    fn a_saved_plain_run_checks_the_size_of_its_image() {
        let dir = tempfile::tempdir().unwrap();
        let spec = disk(&dir, "a.img", false);
        let setup = |spec: &DiskSpec| PciSetup {
            disks: vec![spec.clone()],
            ..Default::default()
        };
        let (_, saved) = build(setup(&spec), None).unwrap();
        assert!(build(setup(&spec), Some(&saved)).is_ok());
        std::fs::write(&spec.path, vec![0u8; 8192]).unwrap();
        let e = build(setup(&spec), Some(&saved)).unwrap_err().to_string();
        assert!(
            e.contains("disk disk0") && e.contains("has 8192 bytes") && e.contains("4096"),
            "{e}"
        );
        std::fs::remove_file(&spec.path).unwrap();
        let e = build(setup(&spec), Some(&saved)).unwrap_err().to_string();
        assert!(e.contains("disk disk0") && e.contains("a.img"), "{e}");
    }

    #[test]
    fn bars_are_assigned_in_the_windows_without_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let mem = crate::memory::create(2).unwrap();
        let dma = crate::memory::dma_view(&mem);
        let link = Arc::new(ChipLink::default());
        let setup = PciSetup {
            disks: vec![disk(&dir, "a.img", false), disk(&dir, "b.img", false)],
            rng: true,
            console: Some(ConsoleIo {
                out: Box::new(std::io::sink()),
                input: crate::machine::SerialIn::None,
            }),
            ..Default::default()
        };
        let (functions, config) =
            build_functions(setup, None, &mut PlainRun::new(), &dma, &link, Irqchip::Apic, None).unwrap();
        let mut ranges = Vec::new();
        assert_eq!(config.len(), functions.len());
        for ((_, f), listed) in functions.iter().zip(&config) {
            let c = f.config();
            assert_eq!(
                (c.word(0), c.word(2)),
                listed.pci_ids(),
                "the header's IDs of {}",
                f.name()
            );
            assert_eq!(c.command() & 0x3, 0x2, "memory decoding on (no I/O BARs)");
            for i in 0..6 {
                if let Some((a, size, _)) = c.bar_range(i) {
                    let w = nyx_devices::pci::MMIO_WINDOW;
                    assert!(a >= w.0 && a + size <= w.0 + w.1 && a % size == 0, "{a:#x}+{size:#x}");
                    ranges.push((a, a + size));
                }
            }
        }
        assert_eq!(ranges.len(), 8, "BAR1 and BAR4 of four functions");
        ranges.sort();
        assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0), "{ranges:x?}");
    }

    #[test]
    fn bad_setups_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut missing = disk(&dir, "m.img", false);
        missing.path = dir.path().join("nope.img");
        let e = build(
            PciSetup {
                disks: vec![missing],
                ..Default::default()
            },
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("disk disk0") && e.contains("nope.img"), "{e}");
        let many = PciSetup {
            disks: (0..30).map(|i| disk(&dir, &format!("{i}.img"), false)).collect(),
            ..Default::default()
        };
        assert!(matches!(build(many, None), Err(PciSetupError::TooMany(29))));
        let spec = disk(&dir, "c.img", false);
        let mut want = Disk::identity(&spec, "disk0").unwrap();
        want.sha256 = "00".repeat(32);
        let e = build(
            PciSetup {
                disks: vec![spec],
                ..Default::default()
            },
            Some(&[PciFunctionConfig::Disk(want)]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("disk disk0") && e.contains("not the one recorded"), "{e}");
    }
}
