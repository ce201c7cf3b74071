//! The machine: a KVM VM with one vCPU and guest memory, the PC platform in
//! user space, and the run loop.
//!
//! There is no in-kernel irqchip, PIT or kvmclock: every port and MMIO
//! access exits to [`Machine::run`], which dispatches it on the platform's
//! buses; every interrupt is injected by Nyx with `KVM_INTERRUPT` when KVM
//! says the guest can take one, or after an interrupt-window exit. HLT sleeps
//! until the next device deadline in virtual time; a guest that computes
//! past a deadline without exiting is kicked by the vCPU timer.

use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_bindings::{kvm_interrupt, kvm_userspace_memory_region, KVMIO, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use nyx_devices::io::{BufferInput, NoInput};
use nyx_devices::{BusEvent, Clock, Input, WallClock};
use vm_memory::{GuestMemory as _, GuestMemoryRegion};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use crate::clock::VirtualClock;
use crate::cpuid::{self, CpuidPolicy};
use crate::crash::CrashReport;
use crate::events::{ExitKind, ExitRecord};
use crate::hooks::{Enter, HookCtx, HookError, PlainRun, RunHooks};
use crate::host::{HostWallClock, StdoutSink, ThreadInput};
use crate::kick::{Kicker, VcpuTimer};
use crate::loader::{self, BootSetup, LoadError};
use crate::mem_state::DirtyTracker;
use crate::memory::{self, GuestMemory, MemoryError, MMIO_HOLE_START};
use crate::msr;
use crate::patch::PatchTable;
use crate::platform::{Platform, PlatformIo};

ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);

/// The default guest RAM in MiB.
pub const DEFAULT_MEM_MIB: u64 = 64;
/// Where the TSS of VMX real-mode emulation lives (three pages, in the hole).
const TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors of building or running a machine. Each says what is wrong and
/// what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// /dev/kvm cannot be opened.
    #[error("cannot open {path}: {source}; Nyx needs KVM: check that the kvm module is loaded and that you may read and write {path}")]
    KvmOpen {
        /// The device path.
        path: String,
        /// What the kernel said.
        source: kvm_ioctls::Error,
    },
    /// A KVM call failed.
    #[error("KVM refused {what}: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// What the kernel said.
        source: kvm_ioctls::Error,
    },
    /// No kernel was given.
    #[error("no kernel given: pass --kernel FILE")]
    NoKernel,
    /// A file the user named cannot be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Kernel, initrd or serial input.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The kernel file is not something Nyx can boot.
    #[error("cannot load kernel {path}: {source}")]
    Load {
        /// The path.
        path: String,
        /// Why.
        source: LoadError,
    },
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The device layout is inconsistent (a bug in Nyx).
    #[error("device layout: {0}")]
    Bus(#[from] nyx_devices::BusError),
    /// A host facility (timer, signal) failed.
    #[error("host: {0}")]
    Host(#[from] std::io::Error),
    /// The run mode stopped the run (a replay diverged or its trace ended).
    #[error(transparent)]
    Hook(#[from] HookError),
    /// Guest memory could not be tracked or patched.
    #[error("guest memory: {0}")]
    GuestMemory(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// Where COM1's input comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SerialIn {
    /// No input.
    #[default]
    None,
    /// The host's stdin.
    Stdin,
    /// A file, read whole at start.
    File(PathBuf),
    /// Bytes given by the caller.
    Bytes(Vec<u8>),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest wrote `value` to the debug-exit port.
    DebugExit(u32),
    /// The guest halted with interrupts disabled (or waits for an interrupt
    /// that nothing can raise any more).
    Halted,
    /// The guest asked for a reset.
    Reset,
    /// The guest powered off.
    PowerOff,
    /// The guest crashed.
    Crashed(Box<CrashReport>),
}

impl RunOutcome {
    /// The exit status of `nyx run` for this outcome.
    pub fn exit_status(&self) -> i32 {
        match self {
            RunOutcome::DebugExit(v) => (*v & 0xff) as i32,
            RunOutcome::Halted | RunOutcome::Reset | RunOutcome::PowerOff => 0,
            RunOutcome::Crashed(_) => 2,
        }
    }
}

/// Exit counters of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitStats {
    /// Port reads and writes.
    pub pio: u64,
    /// MMIO reads and writes.
    pub mmio: u64,
    /// HLT exits.
    pub hlt: u64,
    /// Interrupt-window exits.
    pub irq_window: u64,
    /// MSR exits.
    pub msr: u64,
    /// Kicks (KVM_RUN interrupted by the deadline timer or another thread).
    pub kicks: u64,
    /// Interrupts injected.
    pub injected: u64,
    /// Wall time spent in [`Machine::run`], ns.
    pub wall_ns: u64,
    /// User CPU time of the vCPU thread in [`Machine::run`] (Nyx's own work), ns.
    pub user_ns: u64,
    /// System CPU time of the vCPU thread in [`Machine::run`] (KVM, and on
    /// emulated KVM the guest's execution), ns.
    pub sys_ns: u64,
}

fn thread_cpu_ns() -> (u64, u64) {
    // SAFETY: getrusage writes into the zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    (ns(ru.ru_utime), ns(ru.ru_stime))
}

impl ExitStats {
    /// Guest-caused exits (kicks are not).
    pub fn exits(&self) -> u64 {
        self.pio + self.mmio + self.hlt + self.irq_window + self.msr
    }
}

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
    tsc_khz: Option<u32>,
    hooks: Option<Box<dyn RunHooks>>,
    restore: Option<(crate::snapshot::MachineState, Vec<crate::mem_state::PageRun>)>,
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
            kvm_path: "/dev/kvm".into(),
            cpuid_policy: CpuidPolicy::Run,
            cpuid_table: None,
            tsc_khz: None,
            hooks: None,
            restore: None,
        }
    }
}

impl MachineBuilder {
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

    /// The KVM device (default /dev/kvm).
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
    pub fn cpuid_table(mut self, table: Vec<cpuid::CpuidEntry>) -> Self {
        self.cpuid_table = Some(table);
        self
    }

    /// The guest's TSC frequency in kHz for the virtual TSC (default: KVM's).
    pub fn tsc_khz(mut self, khz: u32) -> Self {
        self.tsc_khz = Some(khz);
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
    /// configuration and images, and its state applied at build.
    pub fn from_snapshot(path: &Path) -> Result<Self, crate::snapshot::SnapshotError> {
        Ok(Self::from_saved(crate::snapshot::read(path)?))
    }

    /// A builder for a saved machine read from anywhere (a snapshot file,
    /// a migration stream): its configuration and images, its state applied
    /// at build.
    pub fn from_saved(snap: crate::snapshot::Snapshot) -> Self {
        let c = snap.config;
        let mut b = MachineBuilder::new()
            .memory(c.mem_mib)
            .kernel_image(&c.kernel_name, snap.kernel)
            .cmdline(&c.cmdline)
            .cpuid_table(c.cpuid)
            .tsc_khz(c.tsc_khz);
        if let Some(i) = snap.initrd {
            b = b.initrd_image(i);
        }
        b.restore = Some((snap.state, snap.memory));
        b
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
        let serial_in: Box<dyn Input> = match self.serial_in {
            SerialIn::None => Box::new(NoInput),
            SerialIn::Stdin => Box::new(ThreadInput::spawn(std::io::stdin())),
            SerialIn::File(p) => {
                let data = std::fs::read(&p).map_err(|source| Error::Read {
                    what: "serial input",
                    path: p,
                    source,
                })?;
                Box::new(BufferInput::new(data))
            }
            SerialIn::Bytes(b) => Box::new(BufferInput::new(b)),
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

        let mem = memory::create(self.mem_mib)?;
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
        let setup = loader::load(&mem, &image, initrd.as_deref(), &cmdline).map_err(|source| Error::Load {
            path: kernel_name.clone(),
            source,
        })?;

        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let table = match self.cpuid_table {
            Some(t) => t,
            None => cpuid::filter(self.cpuid_policy, &cpuid::from_kvm(&supported)),
        };
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
        msr::install_filter(&vm).map_err(kvm_err("KVM_X86_SET_MSR_FILTER"))?;

        let mut regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        loader::configure_vcpu(&setup, &mut regs, &mut sregs);
        vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        let fpu = kvm_bindings::kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;

        let mut hooks = self.hooks.unwrap_or_else(|| Box::new(PlainRun::new()));
        let restore = self.restore.take();
        let patches = if let Some((state, _)) = &restore {
            state.patches.clone()
        } else if hooks.patches_instructions() {
            let table = if setup.format == loader::KernelFormat::LinuxBzImage {
                PatchTable::default()
            } else {
                crate::patch::scan_elf(&image).map_err(|e| Error::GuestMemory(e.to_string()))?
            };
            table.apply(&mem).map_err(|e| Error::GuestMemory(e.to_string()))?;
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
        let wall_seconds = hooks.wall_seconds(HostWallClock.unix_seconds());
        let ram = self.mem_mib << 20;
        let io = PlatformIo {
            clock: clock.clone(),
            wall: Box::new(nyx_devices::io::FixedWallClock(wall_seconds)),
            serial_out: self.serial_out.unwrap_or_else(|| Box::new(StdoutSink)),
            serial_in,
        };
        let msr_list = crate::vcpu_state::accepted_msrs(&vcpu, &crate::vcpu_state::supported_msrs(&kvm))
            .map_err(|e| Error::GuestMemory(format!("MSR list: {e}")))?;
        let (platform, exit_seq, poll_pending) = match &restore {
            Some((state, memory)) => {
                // Memory first (it replaces what the loader wrote), then the
                // devices, then the vCPU (its CPUID is set above, as KVM
                // requires; vcpu_state::restore documents its own order).
                crate::mem_state::restore_full(&mem, memory).map_err(|e| Error::GuestMemory(e.to_string()))?;
                let platform =
                    Platform::from_state(io, &state.platform).map_err(|e| Error::GuestMemory(e.to_string()))?;
                crate::vcpu_state::restore(&vcpu, &state.vcpu).map_err(|e| Error::GuestMemory(e.to_string()))?;
                // Let KVM refresh kvm_run's view of the restored vCPU (IF,
                // readiness for injection) with a KVM_RUN that exits at once.
                crate::vcpu_state::complete_pending_exit(&mut vcpu).map_err(|e| Error::GuestMemory(e.to_string()))?;
                (platform, state.exit_seq, state.poll_pending)
            }
            None => (
                Platform::new(io, ram.min(MMIO_HOLE_START), ram.saturating_sub(MMIO_HOLE_START))?,
                0,
                false,
            ),
        };
        let config = crate::config::MachineConfig {
            mem_mib: self.mem_mib,
            kernel_name: kernel_name.clone(),
            cmdline: self.cmdline.clone(),
            has_initrd: initrd.is_some(),
            cpuid: table.clone(),
            tsc_khz,
            wall_seconds,
            verify: crate::config::VerifyLevel::Exits,
        };
        let dirty = if hooks.tracks_dirty_pages() {
            // SAFETY: `mem` is the memory registered above, slot = region
            // index, and the Machine keeps it for the VM's whole life.
            Some(unsafe { DirtyTracker::enable(&vm, &mem) }.map_err(|e| Error::GuestMemory(e.to_string()))?)
        } else {
            None
        };

        Ok(Machine {
            timer: None,
            poll_pending,
            spurious_kick: false,
            idle_stopped: false,
            debug: GuestDebug::default(),
            hooks,
            core: Core {
                _kvm: kvm,
                vm,
                vcpu,
                mem,
                platform,
                clock,
                setup,
                cpuid: table,
                stats: ExitStats::default(),
                metrics: Arc::new(crate::metrics::VmMetrics::new()),
                unknown: HashMap::new(),
                patches,
                tsc_khz,
                exit_seq,
                dirty,
                dirty_since_landing: BTreeSet::new(),
                written: BTreeSet::new(),
                debug: GuestDebug::default(),
                kernel_name,
                cmdline,
                image_len: image.len(),
                config,
                kernel_image: image,
                initrd_image: initrd,
                msr_list,
                sync_rip,
            },
        })
    }
}
/// Everything of a machine but its run mode.
pub struct Core {
    _kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
    mem: GuestMemory,
    platform: Platform,
    clock: Arc<VirtualClock>,
    setup: BootSetup,
    cpuid: Vec<cpuid::CpuidEntry>,
    stats: ExitStats,
    metrics: Arc<crate::metrics::VmMetrics>,
    unknown: HashMap<(bool, u64), u64>,
    patches: PatchTable,
    tsc_khz: u32,
    exit_seq: u64,
    dirty: Option<DirtyTracker>,
    dirty_since_landing: BTreeSet<u64>,
    written: BTreeSet<u64>,
    /// A copy of [`Machine`]'s debug configuration, for the hooks.
    debug: GuestDebug,
    kernel_name: String,
    cmdline: String,
    image_len: usize,
    config: crate::config::MachineConfig,
    kernel_image: Vec<u8>,
    initrd_image: Option<Vec<u8>>,
    msr_list: Vec<u32>,
    /// Whether KVM mirrors the registers into kvm_run at every exit
    /// (KVM_CAP_SYNC_REGS): then every exit record carries RIP for free.
    sync_rip: bool,
}

/// A machine ready to run.
pub struct Machine {
    // Dropped first: its signal handler writes to the vCPU's kvm_run.
    timer: Option<VcpuTimer>,
    poll_pending: bool,
    spurious_kick: bool,
    /// Another thread stopped the machine while the guest idled in HLT:
    /// resuming goes on idling there. Re-entering the guest instead would
    /// make it execute HLT again, an exit that a recording would log and
    /// its replay (never stopped there) would not make.
    idle_stopped: bool,
    debug: GuestDebug,
    hooks: Box<dyn RunHooks>,
    core: Core,
}

impl Core {
    fn ctx(&mut self) -> HookCtx<'_> {
        HookCtx {
            vcpu: &mut self.vcpu,
            vm: &self.vm,
            mem: &self.mem,
            clock: &self.clock,
            exit_seq: self.exit_seq,
            dirty: self.dirty.as_mut(),
            dirty_since_landing: &mut self.dirty_since_landing,
            written: &mut self.written,
            guest_debug: self.debug,
            msr_list: &self.msr_list,
            metrics: &self.metrics,
        }
    }

    /// The guest's TSC at virtual time `ns` (the virtual TSC of record and
    /// replay): starts at 0 at power-on and runs at `tsc_khz`.
    fn virtual_tsc(&self, ns: u64) -> u64 {
        ((u128::from(ns) * u128::from(self.tsc_khz)) / 1_000_000) as u64
    }

    fn note_unknown(&mut self, mmio: bool, addr: u64, write: bool, size: usize) {
        note_unknown(&mut self.unknown, mmio, addr, write, size);
    }
}

/// Counts an access to an address no device decodes, logging the first.
fn note_unknown(unknown: &mut HashMap<(bool, u64), u64>, mmio: bool, addr: u64, write: bool, size: usize) {
    {
        let n = unknown.entry((mmio, addr)).or_insert(0);
        if *n == 0 {
            tracing::info!(
                "guest {} unknown {} {addr:#x} (size {size}); reads return all-ones, writes are dropped",
                if write { "wrote" } else { "read" },
                if mmio { "MMIO address" } else { "port" },
            );
        }
        *n += 1;
    }
}

fn le_value(data: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    let n = data.len().min(8);
    v[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(v)
}

/// How [`Machine::idle`] ended.
enum Idle {
    Interrupt,
    Never,
    Stopped,
}

/// Why [`Machine::resume`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The run ended.
    Ended(RunOutcome),
    /// A debug exit: breakpoint, watchpoint or single step.
    Debug(DebugStop),
    /// Another thread kicked the vCPU ([`Machine::kicker`]).
    Interrupted,
    /// The mode's hooks asked to pause right after an exit was handled
    /// ([`RunHooks::pause_after_exit`]): resuming goes on exactly as if
    /// the loop had not returned.
    Paused,
}

/// A debug exit as KVM reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebugStop {
    /// The exception vector (1: #DB, 3: #BP).
    pub exception: u32,
    /// RIP (linear) at the stop.
    pub pc: u64,
    /// DR6: which breakpoint or watchpoint fired, or BS for a single step.
    pub dr6: u64,
}

/// What the vCPU stops for (see [`Machine::set_guest_debug`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestDebug {
    /// #BP exits to Nyx (software breakpoints written into guest memory).
    pub sw_breakpoints: bool,
    /// Single-step.
    pub single_step: bool,
    /// DR0..DR3.
    pub dr: [u64; 4],
    /// DR7 (enable bits, kinds and lengths of DR0..DR3).
    pub dr7: u64,
}

/// What a handled exit asks of the loop.
enum Next {
    Debug(DebugStop),
    Continue,
    Hlt,
    InternalError,
    End(RunOutcome),
    Crash(String),
}

impl Machine {
    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.core.mem
    }

    /// The VM.
    pub fn vm(&self) -> &VmFd {
        &self.core.vm
    }

    /// The vCPU.
    pub fn vcpu(&self) -> &VcpuFd {
        &self.core.vcpu
    }

    /// The devices.
    pub fn platform(&self) -> &Platform {
        &self.core.platform
    }

    /// The virtual clock.
    pub fn clock(&self) -> &Arc<VirtualClock> {
        &self.core.clock
    }

    /// What the loader did.
    pub fn boot_setup(&self) -> &BootSetup {
        &self.core.setup
    }

    /// The CPUID table the guest sees.
    pub fn cpuid(&self) -> &[cpuid::CpuidEntry] {
        &self.core.cpuid
    }

    /// The patched instruction sites.
    pub fn patches(&self) -> &PatchTable {
        &self.core.patches
    }

    /// The TSC frequency of the virtual TSC, kHz.
    pub fn tsc_khz(&self) -> u32 {
        self.core.tsc_khz
    }

    /// The kernel's name as given and the command line the guest received.
    pub fn kernel_and_cmdline(&self) -> (&str, &str) {
        (&self.core.kernel_name, &self.core.cmdline)
    }

    /// The position: guest-caused exits so far.
    pub fn exit_seq(&self) -> u64 {
        self.core.exit_seq
    }

    /// Exit counters so far.
    pub fn stats(&self) -> &ExitStats {
        &self.core.stats
    }

    /// The machine's metrics; clone the `Arc` to read them from another thread.
    pub fn metrics(&self) -> &Arc<crate::metrics::VmMetrics> {
        &self.core.metrics
    }

    /// The run mode's name.
    pub fn mode_name(&self) -> &'static str {
        self.hooks.name()
    }

    /// Unknown port (false) and MMIO (true) addresses the guest touched, with
    /// access counts.
    pub fn unknown_accesses(&self) -> &HashMap<(bool, u64), u64> {
        &self.core.unknown
    }

    /// Size of the kernel image in bytes.
    pub fn image_len(&self) -> usize {
        self.core.image_len
    }

    /// A handle to interrupt a running [`Machine::run`] from another thread
    /// (binds the vCPU timer to the calling thread, which must then run).
    pub fn kicker(&mut self) -> Result<Kicker, Error> {
        self.prepare_thread()?;
        Ok(self
            .timer
            .as_ref()
            .map(VcpuTimer::kicker)
            .ok_or_else(|| std::io::Error::other("no vCPU timer"))?)
    }

    /// Binds the vCPU timer to the calling thread; `run` must then be called
    /// on this thread.
    pub fn prepare_thread(&mut self) -> Result<(), Error> {
        if self.timer.is_none() {
            let run: *mut kvm_bindings::kvm_run = self.core.vcpu.get_kvm_run();
            self.timer = Some(VcpuTimer::new(run)?);
        }
        Ok(())
    }

    fn crash(&mut self, reason: String) -> Result<RunOutcome, Error> {
        let regs = self.core.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = self.core.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        Ok(RunOutcome::Crashed(Box::new(CrashReport::new(
            reason,
            &regs,
            &sregs,
            &self.core.mem,
        ))))
    }

    /// Starts a step: a new clock sample for whatever reads time in it, and
    /// a device poll when the mode says so.
    fn step(&mut self, requested: bool) -> Result<(), Error> {
        self.core.clock.next_step();
        let mut ctx = self.core.ctx();
        if self.hooks.poll_now(&mut ctx, requested)? {
            self.core.platform.poll();
        }
        Ok(())
    }

    /// Injects a pending interrupt if the guest can take it, or asks KVM for
    /// an interrupt-window exit.
    fn service_interrupts(&mut self) -> Result<(), Error> {
        let pending = self.core.platform.interrupt_pending();
        let ready = self.core.vcpu.get_kvm_run().ready_for_interrupt_injection != 0;
        if pending && ready && self.hooks.may_inject() {
            let vector = self.core.platform.acknowledge();
            let mut ctx = self.core.ctx();
            self.hooks.on_inject(&mut ctx, vector)?;
            let irq = kvm_interrupt { irq: u32::from(vector) };
            // SAFETY: KVM_INTERRUPT on a vCPU fd with a valid kvm_interrupt.
            let ret = unsafe { ioctl_with_ref(&self.core.vcpu, KVM_INTERRUPT(), &irq) };
            if ret != 0 {
                return Err(Error::Kvm {
                    what: "KVM_INTERRUPT",
                    source: kvm_ioctls::Error::last(),
                });
            }
            self.core.stats.injected += 1;
            self.core.metrics.inject(vector);
        }
        // More may be pending behind this one.
        let still = self.core.platform.interrupt_pending() && self.hooks.requests_interrupt_window();
        self.core.vcpu.get_kvm_run().request_interrupt_window = u8::from(still);
        Ok(())
    }

    /// Waits in HLT until an interrupt is pending, nothing can raise one any
    /// more (no deadline and no more input), or another thread kicks.
    fn idle(&mut self) -> Result<Idle, Error> {
        loop {
            let deadline = self.core.platform.next_deadline_ns();
            let input = self.core.platform.serial_may_receive();
            if deadline.is_none() && !input {
                return Ok(Idle::Never);
            }
            if let Some(t) = &self.timer {
                if t.take_request() {
                    return Ok(Idle::Stopped);
                }
            }
            self.hooks.idle_wait(&self.core.clock, deadline, input);
            self.step(true)?;
            if self.core.platform.interrupt_pending() {
                return Ok(Idle::Interrupt);
            }
        }
    }

    /// Runs the guest until it exits, halts for good, resets or crashes.
    pub fn run(&mut self) -> Result<RunOutcome, Error> {
        loop {
            match self.resume()? {
                Stop::Ended(outcome) => return Ok(outcome),
                Stop::Interrupted => return Err(HookError::Stopped.into()),
                // Debug exits only come when a debugger asked for them.
                Stop::Debug(_) | Stop::Paused => {}
            }
        }
    }

    /// Runs the guest until it ends, a debug exit (breakpoint, watchpoint,
    /// single step) stops it, or another thread kicks it ([`Machine::kicker`]).
    /// The machine can be resumed after a `Debug` or `Interrupted` stop.
    pub fn resume(&mut self) -> Result<Stop, Error> {
        self.prepare_thread()?;
        let wall = std::time::Instant::now();
        let (user, sys) = thread_cpu_ns();
        let result = self.run_loop();
        let (user2, sys2) = thread_cpu_ns();
        self.core.stats.wall_ns += wall.elapsed().as_nanos() as u64;
        self.core.stats.user_ns += user2.saturating_sub(user);
        self.core.stats.sys_ns += sys2.saturating_sub(sys);
        // No kicks while the machine is not running.
        if let Some(t) = self.timer.as_mut() {
            t.arm(None)?;
        }
        self.core.vcpu.set_kvm_immediate_exit(0);
        let stop = result?;
        if let Stop::Ended(outcome) = &stop {
            let mut ctx = self.core.ctx();
            self.hooks.on_end(&mut ctx, outcome)?;
        }
        Ok(stop)
    }

    /// Sets what the vCPU stops for: software breakpoints (int3 in guest
    /// memory, written by the caller), hardware breakpoints and watchpoints
    /// in DR0..DR3 with `dr7`, single-stepping. While single-stepping no
    /// interrupt is injected, so a step does not wander into a handler.
    pub fn set_guest_debug(&mut self, dbg: GuestDebug) -> Result<(), Error> {
        let mut control = 0;
        if dbg.sw_breakpoints || dbg.single_step || dbg.dr7 & 0xff != 0 {
            control |= kvm_bindings::KVM_GUESTDBG_ENABLE;
        }
        if dbg.sw_breakpoints {
            control |= kvm_bindings::KVM_GUESTDBG_USE_SW_BP;
        }
        if dbg.dr7 & 0xff != 0 {
            control |= kvm_bindings::KVM_GUESTDBG_USE_HW_BP;
        }
        if dbg.single_step {
            control |= kvm_bindings::KVM_GUESTDBG_SINGLESTEP;
        }
        let mut arch = kvm_bindings::kvm_guest_debug_arch::default();
        arch.debugreg[..4].copy_from_slice(&dbg.dr);
        arch.debugreg[7] = dbg.dr7;
        let k = kvm_bindings::kvm_guest_debug { control, pad: 0, arch };
        self.core
            .vcpu
            .set_guest_debug(&k)
            .map_err(kvm_err("KVM_SET_GUEST_DEBUG"))?;
        self.debug = dbg;
        self.core.debug = dbg;
        Ok(())
    }

    /// The debug configuration in force.
    pub fn guest_debug(&self) -> GuestDebug {
        self.debug
    }

    /// The vCPU's paging registers now.
    pub fn paging_regs(&self) -> Result<crate::paging::PagingRegs, Error> {
        let s = self.core.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        Ok(crate::paging::PagingRegs::of(&s))
    }

    /// The linear address of the vCPU's next instruction.
    pub fn linear_pc(&self) -> Result<u64, Error> {
        let rip = self.core.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?.rip;
        let s = self.core.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        Ok(crate::crash::CodeMode::linear(&s, rip))
    }

    /// Reads guest-virtual memory through the guest's page tables; patched
    /// instruction sites show their original bytes.
    pub fn read_virt(&self, gva: u64, buf: &mut [u8]) -> Result<(), Error> {
        let regs = self.paging_regs()?;
        let mut done = 0usize;
        while done < buf.len() {
            let addr = gva.wrapping_add(done as u64);
            let t =
                crate::paging::translate(&self.core.mem, &regs, addr).map_err(|e| Error::GuestMemory(e.to_string()))?;
            let n = (buf.len() - done).min(t.remaining_in_page as usize);
            self.read_phys(t.gpa, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Reads guest-physical memory; patched sites show their original bytes.
    pub fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), Error> {
        use vm_memory::Bytes;
        self.core
            .mem
            .read_slice(buf, vm_memory::GuestAddress(gpa))
            .map_err(|e| Error::GuestMemory(format!("{gpa:#x}: {e}")))?;
        self.core.patches.unpatch_view(gpa, buf);
        Ok(())
    }

    /// Writes guest-virtual memory through the guest's page tables.
    pub fn write_virt(&self, gva: u64, buf: &[u8]) -> Result<(), Error> {
        let regs = self.paging_regs()?;
        crate::paging::write_virt(&self.core.mem, &regs, gva, buf).map_err(|e| Error::GuestMemory(e.to_string()))
    }

    /// The machine's state and memory now (at a stop of [`Machine::resume`]).
    pub fn capture_state(&mut self) -> Result<(crate::snapshot::MachineState, Vec<crate::mem_state::PageRun>), Error> {
        let (state, ()) = self.capture_state_without_memory()?;
        Ok((state, crate::mem_state::capture_all(&self.core.mem)))
    }

    /// The machine's state without its memory (a checkpoint that saves
    /// only written pages itself).
    pub fn capture_state_without_memory(&mut self) -> Result<(crate::snapshot::MachineState, ()), Error> {
        let ge = |e: &dyn std::fmt::Display| Error::GuestMemory(e.to_string());
        // An exit KVM has not completed yet would be lost.
        crate::vcpu_state::complete_pending_exit(&mut self.core.vcpu).map_err(|e| ge(&e))?;
        let vcpu = crate::vcpu_state::capture(&self.core.vcpu, &self.core.msr_list).map_err(|e| ge(&e))?;
        let state = crate::snapshot::MachineState {
            vcpu,
            platform: self.core.platform.state(),
            virtual_ns: self.core.clock.last(),
            exit_seq: self.core.exit_seq,
            poll_pending: self.poll_pending,
            patches: self.core.patches.clone(),
        };
        Ok((state, ()))
    }

    /// The configuration and images a saved copy of this machine carries
    /// in its container header: configuration, kernel, initrd.
    pub fn saved_parts(&self) -> (&crate::config::MachineConfig, &[u8], Option<&[u8]>) {
        let c = &self.core;
        (&c.config, &c.kernel_image, c.initrd_image.as_deref())
    }

    /// A second handle on the VM (a duplicated file descriptor), for a
    /// thread that reads KVM's dirty log while this one runs the vCPU.
    pub fn vm_handle(&self) -> Result<VmFd, Error> {
        use std::os::fd::AsRawFd;
        // SAFETY: dup of a descriptor this machine owns; the copy is handed
        // to the VmFd below, its only owner.
        let fd = unsafe { libc::dup(self.core.vm.as_raw_fd()) };
        if fd < 0 {
            return Err(Error::Kvm {
                what: "dup of the VM descriptor",
                source: kvm_ioctls::Error::last(),
            });
        }
        // SAFETY: `fd` is a fresh, valid VM descriptor that nothing else owns.
        unsafe { self.core._kvm.create_vmfd_from_rawfd(fd) }.map_err(kvm_err("KVM_GET_VCPU_MMAP_SIZE"))
    }

    /// Saves the machine into a snapshot file (at a stop of [`Machine::resume`]).
    pub fn save_snapshot(&mut self, path: &Path) -> Result<PathBuf, Error> {
        let (state, memory) = self.capture_state()?;
        let c = &self.core;
        crate::snapshot::write(
            path,
            &c.config,
            &c.kernel_image,
            c.initrd_image.as_deref(),
            &state,
            &memory,
        )
        .map_err(|e| Error::GuestMemory(e.to_string()))
    }

    /// The vCPU, for register access by a debugger.
    pub fn vcpu_mut(&mut self) -> &mut VcpuFd {
        &mut self.core.vcpu
    }

    /// Puts the vCPU, the devices, the virtual time, the position and the
    /// patch table back to `state` in place, with COM1 wired to
    /// `serial_out` and `serial_in` (the run mode's own time source is the
    /// caller's to reset). Guest memory is the caller's too: see
    /// [`crate::reset::ResetPoint`]. Order as at restore: the pending exit
    /// is completed first (KVM refuses register changes before that), then
    /// the devices, then the vCPU.
    pub fn reset_state(
        &mut self,
        state: &crate::snapshot::MachineState,
        serial_out: Box<dyn Write + Send>,
        serial_in: Box<dyn Input>,
    ) -> Result<(), Error> {
        let ge = |e: &dyn std::fmt::Display| Error::GuestMemory(e.to_string());
        crate::vcpu_state::complete_pending_exit(&mut self.core.vcpu).map_err(|e| ge(&e))?;
        let io = PlatformIo {
            clock: self.core.clock.clone(),
            wall: Box::new(nyx_devices::io::FixedWallClock(self.core.config.wall_seconds)),
            serial_out,
            serial_in,
        };
        self.core.platform = Platform::from_state(io, &state.platform).map_err(|e| ge(&e))?;
        crate::vcpu_state::restore(&self.core.vcpu, &state.vcpu).map_err(|e| ge(&e))?;
        self.core.clock.set_last(state.virtual_ns);
        self.core.exit_seq = state.exit_seq;
        self.poll_pending = state.poll_pending;
        self.idle_stopped = false;
        self.core.patches = state.patches.clone();
        Ok(())
    }

    /// The pages written since the last call (KVM's dirty log, collected
    /// now, plus the VMM's own writes that hooks noted): the delta a
    /// reverse debugger's checkpoint saves. Empty when the mode does not
    /// track dirty pages.
    pub fn take_written(&mut self) -> Result<BTreeSet<u64>, Error> {
        self.core
            .ctx()
            .collect_dirty()
            .map_err(|e| Error::GuestMemory(e.to_string()))?;
        Ok(std::mem::take(&mut self.core.written))
    }

    /// Pages written since the previous landing (what the next landing's
    /// memory digest covers): part of a replay checkpoint.
    pub fn dirty_since_landing(&self) -> &BTreeSet<u64> {
        &self.core.dirty_since_landing
    }

    /// Sets the pages written since the previous landing (restoring a
    /// replay checkpoint).
    pub fn set_dirty_since_landing(&mut self, pages: BTreeSet<u64>) {
        self.core.dirty_since_landing = pages;
    }

    fn run_loop(&mut self) -> Result<Stop, Error> {
        if std::mem::take(&mut self.idle_stopped) {
            match self.idle()? {
                Idle::Interrupt => {}
                Idle::Never => return Ok(Stop::Ended(RunOutcome::Halted)),
                Idle::Stopped => {
                    self.idle_stopped = true;
                    return Ok(Stop::Interrupted);
                }
            }
        }
        loop {
            // A kick that led to nothing (its deadline had not passed) is not
            // a step: the replay never sees it, so it must not start a new
            // clock sample or an injection decision here either.
            if !std::mem::take(&mut self.spurious_kick) {
                let poll = std::mem::take(&mut self.poll_pending);
                self.step(poll)?;
                if !self.debug.single_step || self.hooks.inject_while_stepping() {
                    self.service_interrupts()?;
                }
                let mut ctx = self.core.ctx();
                match self.hooks.before_enter(&mut ctx)? {
                    Enter::Guest => {}
                    Enter::Moved { poll } => {
                        // The mode moved the guest to a landing: a new step
                        // there. Its search used the debug registers: put
                        // ours back.
                        self.poll_pending = poll;
                        if self.debug != GuestDebug::default() {
                            self.set_guest_debug(self.debug)?;
                        }
                        continue;
                    }
                    Enter::Stop(d) => {
                        self.set_guest_debug(self.debug)?;
                        return Ok(Stop::Debug(d));
                    }
                    Enter::Kicked => {
                        self.set_guest_debug(self.debug)?;
                        self.core.stats.kicks += 1;
                        if self.timer.as_ref().is_some_and(|t| t.take_request()) {
                            return Ok(Stop::Interrupted);
                        }
                        // A late kick nothing asked for: the hook goes on
                        // where it stopped.
                        continue;
                    }
                }
            }
            let kick = self.hooks.kick_at(self.core.platform.next_deadline_ns());
            if let Some(t) = self.timer.as_mut() {
                t.arm(kick)?;
            }
            let c = &mut self.core;
            let handled_from;
            let mut io = ExitIo {
                platform: &c.platform,
                stats: &mut c.stats,
                unknown: &mut c.unknown,
                patched: !c.patches.is_empty(),
            };
            let next = match c.vcpu.run() {
                Ok(exit) => {
                    handled_from = c.metrics.start();
                    io.handle(exit)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.core.vcpu.set_kvm_immediate_exit(0);
                    self.core.stats.kicks += 1;
                    let passed = kick.is_some_and(|k| crate::kick::monotonic_ns() >= k);
                    let mut ctx = self.core.ctx();
                    self.poll_pending = self.hooks.on_kick(&mut ctx, passed)?;
                    self.spurious_kick = !self.poll_pending;
                    if let Some(t) = &self.timer {
                        if t.take_request() {
                            return Ok(Stop::Interrupted);
                        }
                    }
                    continue;
                }
                Err(e) => {
                    return Err(Error::Kvm {
                        what: "KVM_RUN",
                        source: e,
                    })
                }
            };
            match next {
                Ok((_, Next::Debug(d))) => return Ok(Stop::Debug(d)),
                Ok((rec, next)) => {
                    self.core.exit_seq += 1;
                    let rec = match rec {
                        Some(mut r) => {
                            // Not for interrupt-window exits: an emulated KVM
                            // may report the window a few instructions late,
                            // at the end of an emulation batch, so their RIP
                            // is not part of the guest's deterministic path.
                            if self.core.sync_rip && r.kind != ExitKind::IrqWindow {
                                r.rip = self.core.vcpu.sync_regs().regs.rip;
                            }
                            r
                        }
                        None => self.finish_special_exit()?,
                    };
                    let mut ctx = self.core.ctx();
                    self.hooks.on_exit(&mut ctx, &rec)?;
                    self.core.metrics.exit(&rec, handled_from);
                    match next {
                        Next::Continue if self.hooks.pause_after_exit() => return Ok(Stop::Paused),
                        Next::Continue => {}
                        Next::Hlt if self.core.vcpu.get_kvm_run().if_flag == 0 => {
                            return Ok(Stop::Ended(RunOutcome::Halted))
                        }
                        Next::Hlt => match self.idle()? {
                            Idle::Interrupt => {}
                            Idle::Never => return Ok(Stop::Ended(RunOutcome::Halted)),
                            Idle::Stopped => {
                                self.idle_stopped = true;
                                return Ok(Stop::Interrupted);
                            }
                        },
                        Next::Debug(d) => return Ok(Stop::Debug(d)),
                        Next::InternalError => {
                            let run = self.core.vcpu.get_kvm_run();
                            // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so
                            // the `internal` member of the union is the valid one.
                            let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                            let what = match suberror {
                                1 => "emulation failure (a triple fault shows up this way on emulated KVM)",
                                2 => "simultaneous exceptions",
                                3 => "delivery event",
                                _ => "internal error",
                            };
                            return self
                                .crash(format!("KVM internal error, suberror {suberror}: {what}"))
                                .map(Stop::Ended);
                        }
                        Next::End(outcome) => return Ok(Stop::Ended(outcome)),
                        Next::Crash(reason) => return self.crash(reason).map(Stop::Ended),
                    }
                }
                Err(pending) => {
                    // An exit whose completion needs the vCPU (MSR, patched
                    // instruction): complete it now.
                    self.core.exit_seq += 1;
                    let mut rec = self.complete(pending)?;
                    if self.core.sync_rip && rec.rip == 0 {
                        rec.rip = self.core.vcpu.sync_regs().regs.rip;
                    }
                    let mut ctx = self.core.ctx();
                    self.hooks.on_exit(&mut ctx, &rec)?;
                    self.core.metrics.exit(&rec, handled_from);
                    if self.hooks.pause_after_exit() {
                        return Ok(Stop::Paused);
                    }
                }
            }
        }
    }

    /// A special exit (crash) has no data beyond RIP.
    fn finish_special_exit(&mut self) -> Result<ExitRecord, Error> {
        let rip = self.core.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
        Ok(ExitRecord {
            kind: ExitKind::Crash,
            addr: 0,
            size: 0,
            data: 0,
            rip,
        })
    }
}

/// What exit handling touches besides the vCPU.
struct ExitIo<'a> {
    platform: &'a Platform,
    stats: &'a mut ExitStats,
    unknown: &'a mut HashMap<(bool, u64), u64>,
    patched: bool,
}

impl ExitIo<'_> {
    fn note_unknown(&mut self, mmio: bool, addr: u64, write: bool, size: usize) {
        note_unknown(self.unknown, mmio, addr, write, size);
    }

    /// Handles an exit that needs only the devices. Returns the record (None
    /// for crashes, whose RIP is read afterwards) and what the loop does
    /// next; or, as `Err`, an exit that needs the vCPU to complete.
    fn handle(&mut self, exit: VcpuExit<'_>) -> Result<(Option<ExitRecord>, Next), Pending> {
        let core = self;
        let mut rec = ExitRecord {
            kind: ExitKind::PioIn,
            addr: 0,
            size: 0,
            data: 0,
            rip: 0,
        };
        let next = match exit {
            VcpuExit::IoIn(port, data) => {
                core.stats.pio += 1;
                if core.platform.pio.read(u64::from(port), data).is_err() {
                    data.fill(0xff);
                    let len = data.len();
                    core.note_unknown(false, u64::from(port), false, len);
                }
                rec = ExitRecord {
                    kind: ExitKind::PioIn,
                    addr: u64::from(port),
                    size: data.len() as u8,
                    data: le_value(data),
                    rip: 0,
                };
                if (0x3f8..0x400).contains(&port) {
                    core.platform.poll_serial_input();
                }
                Next::Continue
            }
            VcpuExit::IoOut(port, data) => {
                core.stats.pio += 1;
                if crate::patch::is_trap_exit(port, data) && core.patched {
                    return Err(Pending::Trap);
                }
                rec = ExitRecord {
                    kind: ExitKind::PioOut,
                    addr: u64::from(port),
                    size: data.len() as u8,
                    data: le_value(data),
                    rip: 0,
                };
                let next = match core.platform.pio.write(u64::from(port), data) {
                    Ok(None) => Next::Continue,
                    Ok(Some(ev)) => Next::End(outcome_of(ev)),
                    Err(_) => {
                        let len = data.len();
                        core.note_unknown(false, u64::from(port), true, len);
                        Next::Continue
                    }
                };
                if (0x3f8..0x400).contains(&port) {
                    core.platform.poll_serial_input();
                }
                next
            }
            VcpuExit::MmioRead(addr, data) => {
                core.stats.mmio += 1;
                if core.platform.mmio.read(addr, data).is_err() {
                    data.fill(0xff);
                    let len = data.len();
                    core.note_unknown(true, addr, false, len);
                }
                rec = ExitRecord {
                    kind: ExitKind::MmioRead,
                    addr,
                    size: data.len() as u8,
                    data: le_value(data),
                    rip: 0,
                };
                Next::Continue
            }
            VcpuExit::MmioWrite(addr, data) => {
                core.stats.mmio += 1;
                rec = ExitRecord {
                    kind: ExitKind::MmioWrite,
                    addr,
                    size: data.len() as u8,
                    data: le_value(data),
                    rip: 0,
                };
                match core.platform.mmio.write(addr, data) {
                    Ok(None) => Next::Continue,
                    Ok(Some(ev)) => Next::End(outcome_of(ev)),
                    Err(_) => {
                        let len = data.len();
                        core.note_unknown(true, addr, true, len);
                        Next::Continue
                    }
                }
            }
            VcpuExit::Hlt => {
                core.stats.hlt += 1;
                rec.kind = ExitKind::Hlt;
                Next::Hlt
            }
            VcpuExit::IrqWindowOpen => {
                core.stats.irq_window += 1;
                rec.kind = ExitKind::IrqWindow;
                Next::Continue
            }
            VcpuExit::X86Rdmsr(exit) => {
                core.stats.msr += 1;
                return Err(Pending::Msr {
                    index: exit.index,
                    write: None,
                });
            }
            VcpuExit::X86Wrmsr(exit) => {
                core.stats.msr += 1;
                return Err(Pending::Msr {
                    index: exit.index,
                    write: Some(exit.data),
                });
            }
            VcpuExit::Shutdown => return Ok((None, Next::Crash("triple fault (KVM_EXIT_SHUTDOWN)".into()))),
            VcpuExit::FailEntry(reason, cpu) => {
                return Ok((
                    None,
                    Next::Crash(format!("VM entry failed (hardware reason {reason:#x}, cpu {cpu})")),
                ))
            }
            VcpuExit::InternalError => return Ok((None, Next::InternalError)),
            VcpuExit::Debug(arch) => {
                return Ok((
                    None,
                    Next::Debug(DebugStop {
                        exception: arch.exception,
                        pc: arch.pc,
                        dr6: arch.dr6,
                    }),
                ))
            }
            VcpuExit::SystemEvent(kind, _) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Next::End(RunOutcome::Reset),
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Next::End(RunOutcome::PowerOff),
                _ => return Ok((None, Next::Crash(format!("unexpected system event {kind}")))),
            },
            other => return Ok((None, Next::Crash(format!("unexpected VM exit {other:?}")))),
        };
        // RIP is part of the verification record; with no sync_regs, KVM_GET_REGS
        // would cost an ioctl per exit, so the run loop fills it lazily: the
        // position plus the exit's own data identify it well enough, and
        // `--verify full` adds the register digest.
        Ok((Some(rec), next))
    }
}

impl Machine {
    /// Completes an exit that needs the vCPU's registers.
    fn complete(&mut self, pending: Pending) -> Result<ExitRecord, Error> {
        match pending {
            Pending::Msr { index, write } => {
                let virtual_tsc = self.hooks.virtual_tsc();
                let result = match write {
                    None if virtual_tsc => self.virtual_msr_read(index),
                    None => msr_read(&self.core.vcpu, index),
                    Some(_) if virtual_tsc => None,
                    Some(v) => msr_write(&self.core.vcpu, index, v).then_some(v),
                };
                let run = self.core.vcpu.get_kvm_run();
                // SAFETY: the exit reason is KVM_EXIT_X86_RDMSR/WRMSR, whose
                // union member is `msr`.
                let msr = unsafe { &mut run.__bindgen_anon_1.msr };
                match result {
                    Some(v) => {
                        if write.is_none() {
                            msr.data = v;
                        }
                        msr.error = 0;
                    }
                    None => msr.error = 1,
                }
                let kind = if write.is_some() {
                    ExitKind::MsrWrite
                } else {
                    ExitKind::MsrRead
                };
                Ok(ExitRecord {
                    kind,
                    addr: u64::from(index),
                    size: 8,
                    data: result.or(write).unwrap_or(0),
                    rip: 0,
                })
            }
            Pending::Trap => {
                // KVM completes the `out` on the next KVM_RUN and refuses
                // register changes before that: complete it with an
                // immediate exit (RIP is then just past the `out`).
                self.core.vcpu.set_kvm_immediate_exit(1);
                let r = self.core.vcpu.run().map(|_| ());
                self.core.vcpu.set_kvm_immediate_exit(0);
                match r {
                    Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                    Err(e) => {
                        return Err(Error::Kvm {
                            what: "KVM_RUN (completing a trap)",
                            source: e,
                        })
                    }
                    Ok(()) => {}
                }
                let mut regs = self.core.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
                let sregs = self.core.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                let paging = crate::paging::PagingRegs::of(&sregs);
                let cs_base = if sregs.efer & (1 << 10) != 0 && sregs.cs.l != 0 {
                    0
                } else {
                    sregs.cs.base
                };
                let Some(site) = self
                    .core
                    .patches
                    .site_for_exit(&self.core.mem, &paging, regs.rip, cs_base)
                    .cloned()
                else {
                    // An ordinary write to the trap port: nothing there.
                    self.core
                        .note_unknown(false, u64::from(crate::patch::TRAP_PORT), true, 1);
                    return Ok(ExitRecord {
                        kind: ExitKind::PioOut,
                        addr: u64::from(crate::patch::TRAP_PORT),
                        size: 1,
                        data: 0,
                        rip: regs.rip,
                    });
                };
                let value = match site.kind {
                    crate::patch::TrapKind::Rdtsc | crate::patch::TrapKind::Rdtscp => {
                        self.core.virtual_tsc(self.core.clock.now_ns())
                    }
                    _ => {
                        let mut ctx = self.core.ctx();
                        self.hooks.entropy(&mut ctx)?
                    }
                };
                crate::patch::emulate(&site, value, 0, &mut regs);
                self.core.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
                Ok(ExitRecord {
                    kind: ExitKind::Patched,
                    addr: site.gpa,
                    size: site.len,
                    data: value,
                    rip: regs.rip,
                })
            }
        }
    }

    /// Trapped MSRs under the virtual TSC: derived from the virtual clock.
    fn virtual_msr_read(&mut self, index: u32) -> Option<u64> {
        match index {
            msr::IA32_TSC | msr::IA32_MPERF | msr::IA32_APERF => Some(self.core.virtual_tsc(self.core.clock.now_ns())),
            msr::IA32_TSC_ADJUST | msr::IA32_TSC_AUX => Some(0),
            _ => None,
        }
    }
}

/// An exit that needs the vCPU to complete.
enum Pending {
    Msr { index: u32, write: Option<u64> },
    Trap,
}

fn outcome_of(ev: BusEvent) -> RunOutcome {
    match ev {
        BusEvent::DebugExit(v) => RunOutcome::DebugExit(v),
        BusEvent::Reset => RunOutcome::Reset,
        BusEvent::PowerOff => RunOutcome::PowerOff,
    }
}

/// A plain run passes trapped MSRs through to KVM's own emulation (the
/// recorder logs them instead). None: the guest gets #GP.
fn msr_read(vcpu: &VcpuFd, index: u32) -> Option<u64> {
    if !msr::passes_through(index) {
        return None;
    }
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .ok()?;
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => Some(msrs.as_slice()[0].data),
        _ => None,
    }
}

fn msr_write(vcpu: &VcpuFd, index: u32, data: u64) -> bool {
    if !msr::passes_through(index) {
        return false;
    }
    let Ok(msrs) = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }]) else {
        return false;
    };
    matches!(vcpu.set_msrs(&msrs), Ok(1))
}
