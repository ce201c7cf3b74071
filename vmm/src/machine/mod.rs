//! The machine: a KVM VM with one vCPU and guest memory, the PC platform in
//! user space, and the run loop. The design of the whole is in the
//! project's ARCHITECTURE.md.
//!
//! There is no in-kernel irqchip, PIT or kvmclock: every port and MMIO
//! access exits to [`Machine::run`], which dispatches it on the platform's
//! buses; every interrupt is injected by Nyx with `KVM_INTERRUPT` when KVM
//! says the guest can take one, or after an interrupt-window exit. HLT sleeps
//! until the next device deadline in virtual time; a guest that computes
//! past a deadline without exiting is kicked by the vCPU timer.
//!
//! This file holds the types and accessors; `builder` assembles a machine,
//! `run_loop` runs it, `exit` decodes and completes exits, `guest_view`
//! sets the debug registers and reads and writes the guest through its page
//! tables, `state` captures and restores it.

use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_bindings::{kvm_interrupt, kvm_userspace_memory_region, KVMIO, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use nyx_devices::io::{BufferInput, NoInput};
use nyx_devices::{BusEvent, Clock, Input, WallClock};
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use crate::clock::VirtualClock;
use crate::cpu_model::CpuModel;
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
    /// A PCI function (a disk) could not be set up.
    #[error(transparent)]
    Pci(#[from] crate::pci_setup::PciSetupError),
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
    /// Capturing, restoring or settling the vCPU's state failed.
    #[error("cannot {what} the vCPU state: {source}")]
    VcpuState {
        /// capture, restore, complete the pending exit of.
        what: &'static str,
        /// Why.
        source: crate::vcpu_state::StateError,
    },
    /// KVM's list of the MSRs to save and restore could not be had.
    #[error("cannot list the MSRs a snapshot saves: {0}")]
    MsrList(#[source] crate::vcpu_state::StateError),
    /// The devices could not be rebuilt from a saved state.
    #[error("cannot restore the devices: {0}")]
    Platform(#[from] crate::platform::PlatformError),
    /// Saving a snapshot failed.
    #[error("cannot save the snapshot: {0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// Patching instruction sites (RDTSC, RDRAND, CPUID) into traps failed.
    #[error("cannot patch the kernel's trapped instructions: {0}")]
    Patch(#[from] crate::patch::PatchError),
    /// Restoring guest memory or its dirty-page tracking failed.
    #[error("guest memory: {0}")]
    MemState(#[from] crate::mem_state::MemStateError),
    /// Memory given to the builder (a migration's) is not the machine's size.
    #[error("the received guest memory holds {got} bytes, not the machine's {want}")]
    MemorySize {
        /// Bytes received.
        got: u64,
        /// Bytes of the machine.
        want: u64,
    },
    /// KVM's dirty log could not be collected.
    #[error("cannot collect the pages the guest wrote: {0}")]
    DirtyLog(#[source] HookError),
    /// Several vCPUs: a failure on an AP, or what a machine with several
    /// vCPUs cannot do yet.
    #[error("{0}")]
    Smp(String),
    /// A guest-virtual address does not translate.
    #[error(transparent)]
    Translate(#[from] crate::paging::TranslateError),
    /// Guest-physical memory could not be read.
    #[error("cannot read guest-physical memory at {gpa:#x}: {source}")]
    PhysRead {
        /// Where.
        gpa: u64,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
    /// The CPUID table (a trace's or snapshot's) offers features this
    /// host's KVM does not.
    #[error(
        "the machine's CPU model `{model}` needs CPU features this host's KVM does not offer: {}; \
         replay or restore it on a host that offers them, or record it again here (--cpu baseline runs on any x86-64 host)",
        missing.join(", ")
    )]
    CpuUnsupported {
        /// The model's name.
        model: String,
        /// The features KVM lacks.
        missing: Vec<String>,
    },
}

/// The [`Error::VcpuState`] of `what` (capture, restore, ...).
fn vcpu_err(what: &'static str) -> impl FnOnce(crate::vcpu_state::StateError) -> Error {
    move |source| Error::VcpuState { what, source }
}

/// Queues interrupt `vector` for injection at `vcpu`'s next entry
/// (`KVM_INTERRUPT`, the user-space irqchip's way).
fn inject_interrupt(vcpu: &VcpuFd, vector: u8) -> Result<(), Error> {
    let irq = kvm_interrupt { irq: u32::from(vector) };
    // SAFETY: KVM_INTERRUPT on a vCPU fd with a valid kvm_interrupt.
    if unsafe { ioctl_with_ref(vcpu, KVM_INTERRUPT(), &irq) } != 0 {
        return Err(Error::Kvm {
            what: "KVM_INTERRUPT",
            source: kvm_ioctls::Error::last(),
        });
    }
    Ok(())
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// Where COM1's input comes from.
#[derive(Default)]
pub enum SerialIn {
    /// No input.
    #[default]
    None,
    /// The host's stdin.
    Stdin,
    /// A path: a regular file is read whole at start; anything else (a
    /// FIFO, a character device, `<(cmd)`) is opened and read by a helper
    /// thread as its bytes arrive, as stdin is.
    File(PathBuf),
    /// Bytes given by the caller.
    Bytes(Vec<u8>),
    /// A source already open (a console's socket or terminal).
    Stream(Box<dyn Input>),
}

impl std::fmt::Debug for SerialIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SerialIn::None => f.write_str("None"),
            SerialIn::Stdin => f.write_str("Stdin"),
            SerialIn::File(p) => f.debug_tuple("File").field(p).finish(),
            SerialIn::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            SerialIn::Stream(_) => f.write_str("Stream"),
        }
    }
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
    /// A limit of the run was reached ([`MachineBuilder::limits`]).
    Limit(crate::events::Limit),
}

impl RunOutcome {
    /// The exit status of `nyx run` for this outcome.
    pub fn exit_status(&self) -> i32 {
        match self {
            RunOutcome::DebugExit(v) => (*v & 0xff) as i32,
            RunOutcome::Halted | RunOutcome::Reset | RunOutcome::PowerOff => 0,
            RunOutcome::Crashed(_) => 2,
            RunOutcome::Limit(_) => 0,
        }
    }
}

/// One line for a user: "crashed: <reason> at rip 0x...", "halted", ...
impl std::fmt::Display for RunOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunOutcome::DebugExit(v) => write!(
                f,
                "the guest wrote {v:#x} to the debug-exit port (exit status {})",
                v & 0xff
            ),
            RunOutcome::Halted => f.write_str("halted with interrupts disabled"),
            RunOutcome::Reset => f.write_str("the guest asked for a reset"),
            RunOutcome::PowerOff => f.write_str("powered off"),
            RunOutcome::Crashed(r) => write!(f, "crashed: {}", r.summary()),
            RunOutcome::Limit(l) => write!(f, "stopped: {l}"),
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
    /// Software interrupts KVM could not execute, delivered by Nyx.
    pub soft_interrupts: u64,
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

/// Everything of a machine but its run mode.
pub struct Core {
    _kvm: Kvm,
    vm: VmFd,
    /// The running vCPU (the only one, or the one a machine that runs its
    /// vCPUs one at a time runs now).
    vcpu: VcpuFd,
    /// Which vCPU `vcpu` is.
    vcpu_index: usize,
    /// The machine's vCPUs.
    vcpus: usize,
    mem: GuestMemory,
    /// The devices' view of `mem` (DMA), with its own dirty bitmap.
    dma: crate::memory::DmaMemory,
    /// Where the PCI functions' interrupts go.
    chip_link: Arc<crate::platform::ChipLink>,
    /// Shared with the APs' threads during a run with several vCPUs.
    platform: Arc<Platform>,
    clock: Arc<VirtualClock>,
    setup: BootSetup,
    cpuid: Vec<cpuid::CpuidEntry>,
    stats: ExitStats,
    metrics: Arc<crate::metrics::VmMetrics>,
    unknown: UnknownAccesses,
    patches: PatchTable,
    tsc_khz: u32,
    exit_seq: u64,
    dirty: Option<DirtyTracker>,
    dirty_since_landing: BTreeSet<u64>,
    written: BTreeSet<u64>,
    /// Pages written since the machine's memory last came from its base
    /// (built, restored, or fast-reset), collected so far.
    touched: BTreeSet<u64>,
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
    /// The control socket's platform events, which the ACPI PM device takes
    /// (through the run mode's `platform_input`).
    platform_queue: crate::host::PlatformQueue,
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
    /// The BSP of a parallel run halted with interrupts disabled was
    /// stopped while the APs ran on: resuming waits on for them (the BSP
    /// itself does not go on past its HLT).
    halted_stopped: bool,
    /// The guest put the machine to sleep (ACPI S1 or S3) and no wake event
    /// has come yet: resuming goes on sleeping.
    sleeping: Option<u8>,
    /// The CR8 the last entry gave KVM (a machine with a local APIC).
    cr8_entered: Option<u8>,
    /// The last return was a debug stop inside a step (a breakpoint, a
    /// single step): resuming goes on in the same step, as the guest did
    /// without the debugger (no new clock sample, no device poll).
    mid_step: bool,
    /// The last stop was an `int3` under a debugger's software breakpoints,
    /// not yet delivered ([`Machine::deliver_stopped_int3`]).
    stopped_int3: bool,
    debug: GuestDebug,
    hooks: Box<dyn RunHooks>,
    /// Limits that end the run early, and whether the output one was seen.
    limits: limits::Limits,
    output_watch: Arc<std::sync::Mutex<limits::WatchState>>,
    /// The application processors (`--cpus` above 1), between runs; each
    /// runs on a thread of its own during [`Machine::run`].
    aps: Vec<ap::ApVcpu>,
    /// What the vCPU threads share during such a run.
    smp: Option<Arc<ap::Smp>>,
    /// A recording or replay of several vCPUs runs them one at a time on
    /// this thread: which runs, and where each is.
    serial: Option<serial::Serial>,
    core: Core,
}

impl Core {
    fn ctx(&mut self) -> HookCtx<'_> {
        HookCtx {
            vcpu: &mut self.vcpu,
            vcpu_index: self.vcpu_index,
            vcpus: self.vcpus,
            vm: &self.vm,
            mem: &self.mem,
            clock: &self.clock,
            exit_seq: self.exit_seq,
            dirty: self.dirty.as_mut(),
            dirty_since_landing: &mut self.dirty_since_landing,
            written: &mut self.written,
            touched: &mut self.touched,
            guest_debug: self.debug,
            msr_list: &self.msr_list,
            metrics: &self.metrics,
        }
    }

    /// The guest's TSC at virtual time `ns` (the virtual TSC of record and
    /// replay): starts at 0 at power-on and runs at `tsc_khz`.
    fn virtual_tsc(&self, ns: u64) -> u64 {
        crate::clock::virtual_tsc(ns, self.tsc_khz)
    }

    fn note_unknown(&mut self, mmio: bool, addr: u64, write: bool, size: usize) {
        self.unknown.note(mmio, addr, write, size);
    }
}

/// The most distinct unknown addresses [`UnknownAccesses`] keeps apart; the
/// guest chooses them, so accesses to further addresses are only counted.
pub const MAX_UNKNOWN_ADDRESSES: usize = 1024;

/// Accesses to port and MMIO addresses no device decodes: a count per
/// address for the first [`MAX_UNKNOWN_ADDRESSES`] addresses, one count for
/// all the others.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnknownAccesses {
    by_addr: HashMap<(bool, u64), u64>,
    others: u64,
}

impl UnknownAccesses {
    /// Counts an access to an address no device decodes, logging the first
    /// access to each address kept and the first one that is only counted.
    pub fn note(&mut self, mmio: bool, addr: u64, write: bool, size: usize) {
        let kind = if mmio { "MMIO address" } else { "port" };
        let access = if write { "wrote" } else { "read" };
        if let Some(n) = self.by_addr.get_mut(&(mmio, addr)) {
            *n += 1;
        } else if self.by_addr.len() < MAX_UNKNOWN_ADDRESSES {
            tracing::info!(
                "guest {access} unknown {kind} {addr:#x} (size {size}); reads return all-ones, writes are dropped"
            );
            self.by_addr.insert((mmio, addr), 1);
        } else {
            if self.others == 0 {
                tracing::info!(
                    "guest {access} unknown {kind} {addr:#x} (size {size}); more than {MAX_UNKNOWN_ADDRESSES} unknown addresses: further ones are only counted together"
                );
            }
            self.others += 1;
        }
    }

    /// Unknown port (false) and MMIO (true) addresses with their access
    /// counts (at most [`MAX_UNKNOWN_ADDRESSES`] of them).
    pub fn by_addr(&self) -> &HashMap<(bool, u64), u64> {
        &self.by_addr
    }

    /// Accesses to unknown addresses beyond those kept apart.
    pub fn others(&self) -> u64 {
        self.others
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
    /// Another vCPU ended the run.
    Ended,
}

/// Where inside a step of the run loop a machine stopped: what a reverse
/// debugger saves with a checkpoint so that resuming from it takes the
/// clock samples the recording took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepState {
    /// Stopped by a debug exit inside a step.
    pub mid_step: bool,
    /// The clock sample the step took, if any.
    pub clock_sample: Option<u64>,
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
    /// The guest entered ACPI sleep state S1 or S3.
    Sleep(u8),
}

impl Machine {
    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.core.mem
    }

    /// The devices' view of guest memory (their DMA writes mark its
    /// bitmap; see [`crate::memory::dma_view`]).
    pub fn dma_memory(&self) -> &crate::memory::DmaMemory {
        &self.core.dma
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

    /// The machine's description as a trace or snapshot header holds it.
    pub fn config(&self) -> &crate::config::MachineConfig {
        &self.core.config
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

    /// Hands a platform event (power button, lid, battery, temperature,
    /// wake) to the machine: the ACPI PM device takes it at the next device
    /// poll, which this asks for. A machine without ACPI
    /// (`--irqchip legacy`) refuses it.
    pub fn platform_event(&mut self, event: &nyx_devices::acpi_pm::PlatformEvent) -> Result<(), String> {
        if self.core.config.irqchip != crate::config::Irqchip::Apic {
            return Err(
                "this machine has no ACPI: it was built with --irqchip legacy (platform events need --irqchip apic)"
                    .into(),
            );
        }
        self.core.platform_queue.push(&event.encode());
        self.poll_pending = true;
        Ok(())
    }

    /// Says whether platform events may still come (a control socket
    /// listens): while they may, a guest idle in HLT with no timer armed
    /// waits for them instead of ending as halted.
    pub fn set_platform_events_open(&mut self, open: bool) {
        self.core.platform_queue.set_open(open);
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

    /// The number of vCPUs.
    pub fn cpus(&self) -> usize {
        1 + self.aps.len()
    }

    /// The run mode's name.
    pub fn mode_name(&self) -> &'static str {
        self.hooks.name()
    }

    /// Port and MMIO addresses no device decodes that the guest touched.
    pub fn unknown_accesses(&self) -> &UnknownAccesses {
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

    /// Limits that end the run before the guest does (a text in the serial
    /// output, a virtual-time bound), checked after each guest-caused exit:
    /// the run then ends with [`RunOutcome::Limit`].
    pub fn set_limits(&mut self, limits: limits::Limits) {
        self.output_watch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .watch(limits.until_output.as_deref());
        self.limits = limits;
    }

    /// Binds the vCPU timer to the calling thread; `run` must then be called
    /// on this thread.
    pub fn prepare_thread(&mut self) -> Result<(), Error> {
        if self.timer.is_none() {
            let run: *mut kvm_bindings::kvm_run = self.core.vcpu.get_kvm_run();
            // SAFETY: `run` is the vCPU's kvm_run mapping, owned by
            // `self.core.vcpu`; `timer` is declared before `core`, so it is
            // dropped first, while the mapping still exists.
            self.timer = Some(unsafe { VcpuTimer::new(run) }?);
        }
        Ok(())
    }
}

mod ap;
mod builder;
mod exit;
mod guest_view;
pub mod limits;
mod run_loop;
mod serial;
pub mod soft_int;
mod state;
mod wake;

pub use builder::MachineBuilder;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_addresses_are_kept_apart_up_to_the_bound_then_counted() {
        let mut u = UnknownAccesses::default();
        for addr in 0..(MAX_UNKNOWN_ADDRESSES as u64 + 500) {
            u.note(addr % 2 == 0, addr, false, 1);
        }
        u.note(true, 0, true, 4);
        u.note(false, 1_000_000, true, 4);
        assert_eq!(u.by_addr().len(), MAX_UNKNOWN_ADDRESSES);
        assert_eq!(u.by_addr()[&(true, 0)], 2);
        assert_eq!(u.others(), 501);
        let total: u64 = u.by_addr().values().sum::<u64>() + u.others();
        assert_eq!(total, MAX_UNKNOWN_ADDRESSES as u64 + 502);
    }
}
