//! Building a machine: [`MachineBuilder`] opens KVM, creates the VM and its
//! vCPU, lays out memory, loads the kernel and wires the platform.

use super::*;

/// Builds a [`Machine`]; the CLI is a thin layer over it.
pub struct MachineBuilder {
    mem_mib: u64,
    kernel: Option<(String, Vec<u8>)>,
    kernel_path: Option<PathBuf>,
    initrd: Option<PathBuf>,
    initrd_image: Option<Vec<u8>>,
    cmdline: String,
    serial_in: SerialIn,
    serial_out: Option<Box<dyn Write + Send>>,
    kvm_path: String,
    cpuid_policy: CpuidPolicy,
    cpuid_table: Option<Vec<cpuid::CpuidEntry>>,
    cpu_model: CpuModel,
    cpu_model_name: Option<String>,
    tsc_khz: Option<u32>,
    irqchip: crate::config::Irqchip,
    cpus: usize,
    one_at_a_time: bool,
    hooks: Option<Box<dyn RunHooks>>,
    restore: Option<(crate::snapshot::MachineState, Vec<crate::mem_state::PageRun>)>,
    image: Option<crate::snapshot::MemoryImage>,
    loaded_memory: Option<GuestMemory>,
    pci: crate::pci_setup::PciSetup,
    expected_pci: Option<Vec<crate::config::PciFunctionConfig>>,
}

impl Default for MachineBuilder {
    fn default() -> Self {
        MachineBuilder {
            mem_mib: DEFAULT_MEM_MIB,
            kernel: None,
            kernel_path: None,
            initrd: None,
            initrd_image: None,
            cmdline: String::new(),
            serial_in: SerialIn::None,
            serial_out: None,
            kvm_path: crate::probe::kvm_device(),
            cpuid_policy: CpuidPolicy::Run,
            cpuid_table: None,
            cpu_model: CpuModel::default(),
            cpu_model_name: None,
            tsc_khz: None,
            irqchip: Default::default(),
            cpus: 1,
            one_at_a_time: false,
            hooks: None,
            restore: None,
            image: None,
            pci: Default::default(),
            expected_pci: None,
            loaded_memory: None,
        }
    }
}

/// The most vCPUs a machine can have.
pub const MAX_CPUS: usize = 64;

impl MachineBuilder {
    /// Whether the vCPU count is one this machine can have.
    fn check_cpus(&self) -> Result<(), Error> {
        let n = self.cpus;
        if !(1..=MAX_CPUS).contains(&n) {
            return Err(Error::Smp(format!("{n} vCPUs: a machine has 1 to {MAX_CPUS}")));
        }
        if n == 1 {
            return Ok(());
        }
        if self.irqchip != crate::config::Irqchip::Apic {
            return Err(Error::Smp(format!(
                "{n} vCPUs need the APIC platform (--irqchip apic): the legacy one has no local APICs to start them with"
            )));
        }
        match &self.hooks {
            Some(h) if !matches!(h.name(), "run" | "record" | "replay" | "check") => Err(Error::Smp(format!(
                "{n} vCPUs run in a plain run, a recording, a replay or a check: `{}` works with --cpus 1",
                h.name()
            ))),
            _ => Ok(()),
        }
    }

    /// A builder with the defaults: 64 MiB, no input, output to stdout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Guest RAM in MiB.
    pub fn memory(mut self, mib: u64) -> Self {
        self.mem_mib = mib;
        self
    }

    /// The kernel file to boot.
    pub fn kernel(mut self, path: impl AsRef<Path>) -> Self {
        self.kernel_path = Some(path.as_ref().to_path_buf());
        self
    }

    /// A kernel image given as bytes, with a name for messages.
    pub fn kernel_image(mut self, name: &str, image: Vec<u8>) -> Self {
        self.kernel = Some((name.to_string(), image));
        self
    }

    /// An initrd (a Multiboot module for Multiboot kernels).
    pub fn initrd(mut self, path: impl AsRef<Path>) -> Self {
        self.initrd = Some(path.as_ref().to_path_buf());
        self
    }

    /// An initrd given as bytes.
    pub fn initrd_image(mut self, image: Vec<u8>) -> Self {
        self.initrd_image = Some(image);
        self
    }

    /// The kernel command line.
    pub fn cmdline(mut self, cmdline: &str) -> Self {
        self.cmdline = cmdline.to_string();
        self
    }

    /// Where COM1's input comes from.
    pub fn serial_in(mut self, input: SerialIn) -> Self {
        self.serial_in = input;
        self
    }

    /// Where COM1's output goes (default: stdout).
    pub fn serial_out(mut self, out: Box<dyn Write + Send>) -> Self {
        self.serial_out = Some(out);
        self
    }

    /// The KVM device (default [`crate::probe::kvm_device`]: `$NYX_KVM_DEVICE`
    /// or /dev/kvm).
    pub fn kvm_path(mut self, path: &str) -> Self {
        self.kvm_path = path.to_string();
        self
    }

    /// The CPUID policy.
    pub fn cpuid_policy(mut self, policy: CpuidPolicy) -> Self {
        self.cpuid_policy = policy;
        self
    }

    /// Uses exactly this CPUID table (a replay uses the recording's).
    /// The build fails if it offers a feature this host's KVM does not.
    pub fn cpuid_table(mut self, table: Vec<cpuid::CpuidEntry>) -> Self {
        self.cpuid_table = Some(table);
        self
    }

    /// The CPU model a new machine shows (default: baseline). A machine
    /// with a [`MachineBuilder::cpuid_table`] keeps that table instead.
    pub fn cpu_model(mut self, model: CpuModel) -> Self {
        self.cpu_model = model;
        self
    }

    /// The model name stored with a [`MachineBuilder::cpuid_table`] (a
    /// trace's or snapshot's), carried into the new machine's
    /// configuration and messages.
    pub fn cpu_model_name(mut self, name: &str) -> Self {
        self.cpu_model_name = Some(name.to_string());
        self
    }

    /// The guest's TSC frequency in kHz for the virtual TSC (default: KVM's).
    pub fn tsc_khz(mut self, khz: u32) -> Self {
        self.tsc_khz = Some(khz);
        self
    }

    /// The interrupt controllers and platform (default: apic).
    pub fn irqchip(mut self, irqchip: crate::config::Irqchip) -> Self {
        self.irqchip = irqchip;
        self
    }

    /// The number of vCPUs (default 1; at most [`MAX_CPUS`]; a CPUID table
    /// given with [`MachineBuilder::cpuid_table`] says its own). Several
    /// need the APIC platform. In a plain run the APs run on threads of
    /// their own, in parallel with the BSP, and every stop of
    /// [`Machine::resume`] stops them all; a recording (and a check, and a
    /// plain run built [`MachineBuilder::one_at_a_time`]) runs the vCPUs
    /// one at a time and logs its switches, which its replay follows.
    pub fn cpus(mut self, cpus: usize) -> Self {
        self.cpus = cpus;
        self
    }

    /// Runs several vCPUs one at a time on the calling thread, as a
    /// recording does, in a plain run too: what a debugger attached to a
    /// live machine wants (every stop stops the whole machine where it
    /// is, and a step runs one vCPU, as in rr).
    pub fn one_at_a_time(mut self, yes: bool) -> Self {
        self.one_at_a_time = yes;
        self
    }

    /// Applies `state` and `memory` at build (a trace that starts from a
    /// snapshot carries them in its first frames).
    pub fn restore_state(
        mut self,
        state: crate::snapshot::MachineState,
        memory: Vec<crate::mem_state::PageRun>,
    ) -> Self {
        self.restore = Some((state, memory));
        self
    }

    /// A builder for the machine saved in the snapshot at `path`: the same
    /// configuration and images, and its state applied at build (the
    /// memory image of a mappable snapshot mapped, not read:
    /// [`crate::snapshot::read_for_restore`]).
    pub fn from_snapshot(path: &Path) -> Result<Self, crate::snapshot::SnapshotError> {
        Ok(Self::from_saved(crate::snapshot::read_for_restore(path, &mut || {})?))
    }

    /// A builder for a saved machine read from anywhere (a snapshot file,
    /// a migration stream): its configuration and images, its state applied
    /// at build.
    pub fn from_saved(snap: crate::snapshot::Snapshot) -> Self {
        let pci = crate::pci_setup::PciSetup::from_config(&snap.config, &[], None);
        let c = snap.config;
        let mut b = MachineBuilder::new()
            .memory(c.mem_mib)
            .kernel_image(&c.kernel_name, snap.kernel)
            .cmdline(&c.cmdline)
            .cpuid_table(c.cpuid)
            .cpu_model_name(&c.cpu_model)
            .tsc_khz(c.tsc_khz)
            .irqchip(c.irqchip);
        if let Some(i) = snap.initrd {
            b = b.initrd_image(i);
        }
        b.pci = pci;
        b.expected_pci = Some(c.pci);
        b.restore = Some((snap.state, snap.memory));
        b.image = snap.image;
        b
    }

    /// A builder for a machine received by a migration: its configuration
    /// and images, its state applied at build, and its RAM as received
    /// (the destination wrote the pages into it as they arrived).
    pub fn from_received(r: crate::migration::Received) -> Self {
        let ((config, kernel, initrd), state) = (r.parts, r.state);
        let mut b = Self::from_saved(crate::snapshot::Snapshot {
            config,
            kernel,
            initrd,
            state,
            memory: Vec::new(),
            image: None,
        });
        b.loaded_memory = Some(r.memory);
        b
    }

    /// Where the virtio-console of a saved machine (a snapshot's, a
    /// migrated machine's) writes its output and takes its input: the
    /// saved state keeps only the device, and without this its output goes
    /// nowhere and no input comes. Nothing changes for a machine without a
    /// virtio-console ([`MachineBuilder::has_virtio_console`]).
    pub fn virtio_console(mut self, io: crate::pci_setup::ConsoleIo) -> Self {
        if let Some(c) = self.pci.console.as_mut() {
            *c = io;
        }
        self
    }

    /// Whether the machine to build has a virtio-console.
    pub fn has_virtio_console(&self) -> bool {
        self.pci.console.is_some()
    }

    /// The PCI functions (virtio disks, entropy, console).
    pub fn pci(mut self, setup: crate::pci_setup::PciSetup) -> Self {
        self.pci = setup;
        self
    }

    /// The PCI functions a trace or snapshot recorded: the disks given to
    /// [`MachineBuilder::pci`] must be the recorded images (size and
    /// SHA-256), or the build fails naming the disk.
    pub fn expect_pci(mut self, recorded: Vec<crate::config::PciFunctionConfig>) -> Self {
        self.expected_pci = Some(recorded);
        self
    }

    /// The run mode (default: a plain run).
    pub fn hooks(mut self, hooks: Box<dyn RunHooks>) -> Self {
        self.hooks = Some(hooks);
        self
    }

    /// The command line the guest will see for `kernel_name`: a Multiboot
    /// loader (QEMU's, GRUB's) passes the kernel's file name in front of it.
    pub fn effective_cmdline(image: &[u8], kernel_name: &str, cmdline: &str) -> String {
        match loader::detect(image) {
            Ok(loader::KernelFormat::Multiboot) if cmdline.is_empty() => kernel_name.to_string(),
            Ok(loader::KernelFormat::Multiboot) => format!("{kernel_name} {cmdline}"),
            _ => cmdline.to_string(),
        }
    }

    /// Opens KVM, creates memory and vCPU, loads the kernel and wires the
    /// devices.
    pub fn build(mut self) -> Result<Machine, Error> {
        // A trace's table says how many vCPUs its machine had.
        if let Some(t) = &self.cpuid_table {
            self.cpus = self.cpus.max(cpuid::cpus_of(t));
        }
        self.check_cpus()?;
        let (kernel_name, image) = match (self.kernel, &self.kernel_path) {
            (Some(k), _) => k,
            (None, Some(p)) => {
                let image = std::fs::read(p).map_err(|source| Error::Read {
                    what: "kernel",
                    path: p.clone(),
                    source,
                })?;
                (p.display().to_string(), image)
            }
            (None, None) => return Err(Error::NoKernel),
        };
        let initrd = match &self.initrd {
            _ if self.initrd_image.is_some() => self.initrd_image.take(),
            Some(p) => Some(std::fs::read(p).map_err(|source| Error::Read {
                what: "initrd",
                path: p.clone(),
                source,
            })?),
            None => None,
        };
        let serial_in = input_of(self.serial_in, "serial input")?;
        let mut pci_setup = std::mem::take(&mut self.pci);
        let console_in = match pci_setup.console.as_mut() {
            Some(c) => Some(input_of(std::mem::take(&mut c.input), "virtio-console input")?),
            None => None,
        };

        // KVM first: a machine without it is the commonest user error.
        let path = CString::new(self.kvm_path.clone()).map_err(|_| Error::KvmOpen {
            path: self.kvm_path.clone(),
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let kvm = Kvm::new_with_path(path.as_c_str()).map_err(|source| Error::KvmOpen {
            path: self.kvm_path.clone(),
            source,
        })?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        if let Err(e) = vm.set_tss_address(TSS_ADDRESS) {
            tracing::debug!("KVM_SET_TSS_ADDR: {e}");
        }

        // Received RAM already holds the machine: the loader, which only
        // computes the boot setup here, writes into a scratch copy.
        let loaded = self.loaded_memory.take();
        let mem = match &loaded {
            Some(m) => {
                let (got, want) = (m.iter().map(|r| r.len()).sum::<u64>(), self.mem_mib << 20);
                if got != want {
                    return Err(Error::MemorySize { got, want });
                }
                m.clone()
            }
            None => memory::create(self.mem_mib)?,
        };
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the
            // Machine keeps for as long as the VM exists.
            unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let cmdline = Self::effective_cmdline(&image, &kernel_name, &self.cmdline);
        let scratch = match loaded {
            Some(_) => Some(memory::create(self.mem_mib)?),
            None => None,
        };
        let setup =
            loader::load(scratch.as_ref().unwrap_or(&mem), &image, initrd.as_deref(), &cmdline).map_err(|source| {
                Error::Load {
                    path: kernel_name.clone(),
                    source,
                }
            })?;

        if self.irqchip == crate::config::Irqchip::Apic {
            loader::load_acpi(scratch.as_ref().unwrap_or(&mem), &setup, self.cpus as u8).map_err(|source| {
                Error::Load {
                    path: kernel_name.clone(),
                    source,
                }
            })?;
        }

        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let supported = cpuid::from_kvm(&supported);
        let cpu_model = self
            .cpu_model_name
            .take()
            .unwrap_or_else(|| self.cpu_model.name().to_string());
        let table = match self.cpuid_table {
            Some(t) => t,
            None => {
                let mut t = cpuid::filter(self.cpuid_policy, &self.cpu_model.table(&supported));
                cpuid::apply_irqchip(&mut t, self.irqchip);
                t
            }
        };
        let missing = crate::cpu_model::missing_features(&table, &supported);
        if !missing.is_empty() {
            return Err(Error::CpuUnsupported {
                model: cpu_model,
                missing,
            });
        }
        // The BSP's view of the topology; the APs' follow below.
        let table = cpuid::for_vcpu(&table, 0, self.cpus);
        let mut vcpu = vcpu;
        let sync_rip = vm.check_extension(kvm_ioctls::Cap::SyncRegs) && std::env::var_os("NYX_NO_SYNC").is_none();
        if sync_rip {
            vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
        }
        let kcpuid = cpuid::to_kvm(&table).map_err(|_| Error::Kvm {
            what: "the CPUID table size",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        vcpu.set_cpuid2(&kcpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let mut aps = (1..self.cpus)
            .map(|i| super::ap::ApVcpu::new(&vm, i, cpuid::for_vcpu(&table, i as u8, self.cpus)))
            .collect::<Result<Vec<_>, _>>()?;
        if sync_rip {
            for ap in &mut aps {
                ap.vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
            }
        }
        msr::install_filter(&vm, self.irqchip).map_err(kvm_err("KVM_X86_SET_MSR_FILTER"))?;

        let mut regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        loader::configure_vcpu(&setup, &mut regs, &mut sregs);
        vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        crate::vcpu_state::reset_fpu(&vcpu).map_err(kvm_err("KVM_SET_FPU"))?;

        let mut hooks = self.hooks.unwrap_or_else(|| Box::new(PlainRun::new()));
        let restore = self.restore.take();
        let patches = if let Some((state, _)) = &restore {
            state.patches.clone()
        } else if hooks.patches_instructions() || !crate::cpu_model::cpuid_follows_table(&kvm) {
            // Record and replay patch every kind (cpuid too, so a trace
            // replays alike whether or not KVM follows the table); a plain
            // run only cpuid, where KVM does not follow the table.
            let all = hooks.patches_instructions();
            let mut table = if setup.format == loader::KernelFormat::LinuxBzImage {
                PatchTable::default()
            } else {
                crate::patch::scan_elf(&image)?
            };
            table.retain(|k| all || *k == crate::patch::TrapKind::Cpuid);
            table.apply(&mem)?;
            table
        } else {
            PatchTable::default()
        };
        let tsc_khz = match self.tsc_khz {
            Some(k) => k,
            None => vcpu.get_tsc_khz().unwrap_or(1_000_000),
        };
        let start_ns = restore.as_ref().map_or(0, |r| r.0.virtual_ns);
        let clock = Arc::new(VirtualClock::new(hooks.time_source(start_ns)));
        clock.set_last(start_ns);
        let serial_in = hooks.serial_input(serial_in);
        let platform_queue = crate::host::PlatformQueue::default();
        let platform_in = hooks.platform_input(Box::new(platform_queue.clone()));
        let wall_seconds = hooks.wall_seconds(HostWallClock.unix_seconds());
        let ram = self.mem_mib << 20;
        let output_watch = Arc::new(std::sync::Mutex::new(super::limits::WatchState::default()));
        let serial_out = Box::new(super::limits::OutputWatch::new(
            self.serial_out.unwrap_or_else(|| Box::new(StdoutSink)),
            output_watch.clone(),
        ));
        let dma = memory::dma_view(&mem);
        let chip_link = Arc::new(crate::platform::ChipLink::default());
        let (pci, pci_config) = crate::pci_setup::build_functions(
            pci_setup,
            console_in,
            &mut *hooks,
            &dma,
            &chip_link,
            self.irqchip,
            self.expected_pci.as_deref(),
        )?;
        let io = PlatformIo {
            clock: clock.clone(),
            wall: Box::new(nyx_devices::io::FixedWallClock(wall_seconds)),
            serial_out,
            serial_in,
            platform_in,
            tsc_hz: u64::from(tsc_khz) * 1000,
            pci,
            chip_link: chip_link.clone(),
            ram_below_4g: ram.min(MMIO_HOLE_START),
        };
        let msr_list = crate::vcpu_state::accepted_msrs(&vcpu, &crate::vcpu_state::supported_msrs(&kvm))
            .map_err(Error::MsrList)?;
        let (platform, exit_seq, poll_pending) = match &restore {
            Some((state, memory)) => {
                // Memory first (it replaces what the loader wrote), then the
                // devices, then the vCPU (its CPUID is set above, as KVM
                // requires; vcpu_state::restore documents its own order).
                if scratch.is_none() {
                    crate::mem_state::restore_full(&mem, memory)?;
                    if let Some(image) = self.image.take() {
                        memory::map_image(&mem, &image.file, &image.spans)?;
                    }
                }
                let platform = Arc::new(Platform::from_state(io, &state.platform)?);
                crate::vcpu_state::restore(&vcpu, &state.vcpu).map_err(vcpu_err("restore"))?;
                // Let KVM refresh kvm_run's view of the restored vCPU (IF,
                // readiness for injection) with a KVM_RUN that exits at once.
                crate::vcpu_state::complete_pending_exit(&mut vcpu)
                    .map_err(vcpu_err("complete the pending exit of"))?;
                (platform, state.exit_seq, state.poll_pending)
            }
            None => (
                Arc::new(Platform::new(
                    io,
                    ram.min(MMIO_HOLE_START),
                    ram.saturating_sub(MMIO_HOLE_START),
                    self.irqchip,
                    self.cpus,
                )?),
                0,
                false,
            ),
        };
        if self.irqchip == crate::config::Irqchip::Apic && !hooks.virtual_tsc() {
            // The guest's `rdtsc` reads KVM's TSC, which need not start at 0
            // with the virtual clock: the TSC-deadline timer converts on
            // that scale. TSC first, clock second: the offset errs low, so
            // a deadline fires late by the ioctl's time rather than early.
            if let Some(guest_tsc) = read_guest_tsc(&vcpu) {
                platform.set_guest_tsc_now(guest_tsc);
            }
        }
        let config = crate::config::MachineConfig {
            mem_mib: self.mem_mib,
            kernel_name: kernel_name.clone(),
            cmdline: self.cmdline.clone(),
            has_initrd: initrd.is_some(),
            cpuid: table.clone(),
            cpu_model,
            tsc_khz,
            wall_seconds,
            verify: crate::config::VerifyLevel::Exits,
            irqchip: self.irqchip,
            pci: pci_config,
        };
        let dirty = if hooks.tracks_dirty_pages() {
            // SAFETY: `mem` is the memory registered above, slot = region
            // index, and the Machine keeps it for the VM's whole life.
            Some(unsafe { DirtyTracker::enable(&vm, &mem) }?.track_dma(&dma))
        } else {
            None
        };

        // A recording, a replay or a check runs several vCPUs one at a time.
        let serial = (self.cpus > 1 && (self.one_at_a_time || hooks.name() != "run"))
            .then(|| super::serial::Serial::new(self.cpus));
        let mut machine = Machine {
            timer: None,
            poll_pending,
            spurious_kick: false,
            idle_stopped: false,
            halted_stopped: false,
            sleeping: None,
            cr8_entered: None,
            mid_step: false,
            stopped_int3: false,
            debug: GuestDebug::default(),
            hooks,
            limits: Default::default(),
            output_watch,
            serial,
            aps,
            smp: None,
            core: Core {
                _kvm: kvm,
                vm,
                vcpu,
                vcpu_index: 0,
                vcpus: self.cpus,
                mem,
                dma,
                chip_link,
                platform,
                clock,
                setup,
                cpuid: table,
                stats: ExitStats::default(),
                metrics: Arc::new(crate::metrics::VmMetrics::new()),
                unknown: UnknownAccesses::default(),
                patches,
                tsc_khz,
                exit_seq,
                dirty,
                dirty_since_landing: BTreeSet::new(),
                written: BTreeSet::new(),
                touched: BTreeSet::new(),
                debug: GuestDebug::default(),
                kernel_name,
                cmdline,
                image_len: image.len(),
                config,
                kernel_image: image,
                initrd_image: initrd,
                msr_list,
                sync_rip,
                platform_queue,
            },
        };
        if let Some((state, _)) = restore.as_ref().filter(|_| machine.cpus() > 1) {
            // The APs and where each vCPU is (the BSP's registers were set
            // above, with the devices); each vCPU's kvm_run refreshed as
            // the BSP's was.
            machine.restore_vcpus(state)?;
            for cpu in 0..machine.cpus() {
                crate::vcpu_state::complete_pending_exit(machine.vcpu_of(cpu))
                    .map_err(vcpu_err("complete the pending exit of"))?;
            }
        }
        Ok(machine)
    }
}

/// The vCPU's TSC as the guest reads it (KVM_GET_MSRS of IA32_TSC).
fn read_guest_tsc(vcpu: &kvm_ioctls::VcpuFd) -> Option<u64> {
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: crate::msr::IA32_TSC,
        ..Default::default()
    }])
    .ok()?;
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => Some(msrs.as_slice()[0].data),
        _ => None,
    }
}

/// Opens an input source the user named (serial, virtio-console).
fn input_of(input: SerialIn, what: &'static str) -> Result<Box<dyn Input>, Error> {
    Ok(match input {
        SerialIn::None => Box::new(NoInput),
        SerialIn::Stdin => Box::new(ThreadInput::spawn(std::io::stdin())),
        SerialIn::File(p) => {
            let err = |source| Error::Read {
                what,
                path: p.clone(),
                source,
            };
            // Reading a FIFO or a terminal whole would wait for its end
            // before the guest starts: only a regular file is read here.
            if std::fs::metadata(&p).map_err(err)?.is_file() {
                Box::new(BufferInput::new(std::fs::read(&p).map_err(err)?))
            } else {
                Box::new(ThreadInput::open(p))
            }
        }
        SerialIn::Bytes(b) => Box::new(BufferInput::new(b)),
        SerialIn::Stream(input) => input,
    })
}
