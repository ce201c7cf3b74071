//! The machine: a KVM VM with one vCPU and guest memory, the PC platform in
//! user space, and the run loop.
//!
//! There is no in-kernel irqchip, PIT or kvmclock: every port and MMIO
//! access exits to [`Machine::run`], which dispatches it on the platform's
//! buses; every interrupt is injected by Nyx with `KVM_INTERRUPT` when KVM
//! says the guest can take one, or after an interrupt-window exit. HLT sleeps
//! until the next device deadline in virtual time; a guest that computes
//! past a deadline without exiting is kicked by the vCPU timer.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_bindings::{kvm_interrupt, kvm_userspace_memory_region, KVMIO, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use nyx_devices::io::{BufferInput, NoInput};
use nyx_devices::{BusEvent, Input};
use vm_memory::{GuestMemory as _, GuestMemoryRegion};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use crate::cpuid::{self, CpuidPolicy};
use crate::crash::CrashReport;
use crate::host::{HostClock, HostWallClock, StdoutSink, ThreadInput};
use crate::kick::{Kicker, VcpuTimer};
use crate::loader::{self, BootSetup, LoadError};
use crate::memory::{self, GuestMemory, MemoryError, MMIO_HOLE_START};
use crate::msr;
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
    cmdline: String,
    serial_in: SerialIn,
    serial_out: Option<Box<dyn Write + Send>>,
    kvm_path: String,
    cpuid_policy: CpuidPolicy,
}

impl Default for MachineBuilder {
    fn default() -> Self {
        MachineBuilder {
            mem_mib: DEFAULT_MEM_MIB,
            kernel: None,
            kernel_path: None,
            initrd: None,
            cmdline: String::new(),
            serial_in: SerialIn::None,
            serial_out: None,
            kvm_path: "/dev/kvm".into(),
            cpuid_policy: CpuidPolicy::Run,
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

    /// Opens KVM, creates memory and vCPU, loads the kernel and wires the
    /// devices.
    pub fn build(self) -> Result<Machine, Error> {
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
            unsafe { vm.set_user_memory_region(r) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        // A Multiboot loader (QEMU's, GRUB's) passes the kernel's file name
        // in front of the command line.
        let cmdline = match loader::detect(&image) {
            Ok(loader::KernelFormat::Multiboot) if self.cmdline.is_empty() => kernel_name.clone(),
            Ok(loader::KernelFormat::Multiboot) => format!("{kernel_name} {}", self.cmdline),
            _ => self.cmdline.clone(),
        };
        let setup = loader::load(&mem, &image, initrd.as_deref(), &cmdline).map_err(|source| {
            Error::Load {
                path: kernel_name.clone(),
                source,
            }
        })?;

        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let table = cpuid::filter(self.cpuid_policy, &cpuid::from_kvm(&supported));
        let kcpuid = cpuid::to_kvm(&table).map_err(|_| Error::Kvm {
            what: "the CPUID table size",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        vcpu.set_cpuid2(&kcpuid)
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
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

        let clock = Arc::new(HostClock::new());
        let ram = self.mem_mib << 20;
        let platform = Platform::new(
            PlatformIo {
                clock: clock.clone(),
                wall: Box::new(HostWallClock),
                serial_out: self.serial_out.unwrap_or_else(|| Box::new(StdoutSink)),
                serial_in,
            },
            ram.min(MMIO_HOLE_START),
            ram.saturating_sub(MMIO_HOLE_START),
        )?;

        Ok(Machine {
            _kvm: kvm,
            vm,
            vcpu,
            mem,
            platform,
            clock,
            setup,
            cpuid: table,
            stats: ExitStats::default(),
            unknown: HashMap::new(),
            timer: None,
        })
    }
}

/// A machine ready to run.
pub struct Machine {
    // Dropped first: its signal handler writes to the vCPU's kvm_run.
    timer: Option<VcpuTimer>,
    _kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
    mem: GuestMemory,
    platform: Platform,
    clock: Arc<HostClock>,
    setup: BootSetup,
    cpuid: Vec<cpuid::CpuidEntry>,
    stats: ExitStats,
    unknown: HashMap<(bool, u64), u64>,
}

impl Machine {
    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The VM.
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// The vCPU.
    pub fn vcpu(&self) -> &VcpuFd {
        &self.vcpu
    }

    /// The devices.
    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    /// What the loader did.
    pub fn boot_setup(&self) -> &BootSetup {
        &self.setup
    }

    /// The CPUID table the guest sees.
    pub fn cpuid(&self) -> &[cpuid::CpuidEntry] {
        &self.cpuid
    }

    /// Exit counters so far.
    pub fn stats(&self) -> &ExitStats {
        &self.stats
    }

    /// Unknown port (false) and MMIO (true) addresses the guest touched, with
    /// access counts.
    pub fn unknown_accesses(&self) -> &HashMap<(bool, u64), u64> {
        &self.unknown
    }

    /// A handle to interrupt a running [`Machine::run`] from another thread
    /// (available once `run` has started on this thread, or after
    /// [`Machine::prepare_thread`]).
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
            let run: *mut kvm_bindings::kvm_run = self.vcpu.get_kvm_run();
            self.timer = Some(VcpuTimer::new(run)?);
        }
        Ok(())
    }

    fn note_unknown(&mut self, mmio: bool, addr: u64, write: bool, size: usize) {
        let n = self.unknown.entry((mmio, addr)).or_insert(0);
        if *n == 0 {
            tracing::info!(
                "guest {} unknown {} {addr:#x} (size {size}); reads return all-ones, writes are dropped",
                if write { "wrote" } else { "read" },
                if mmio { "MMIO address" } else { "port" },
            );
        }
        *n += 1;
    }

    fn crash(&mut self, reason: String) -> Result<RunOutcome, Error> {
        let regs = self.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = self.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        Ok(RunOutcome::Crashed(Box::new(CrashReport::new(
            reason, &regs, &sregs, &self.mem,
        ))))
    }

    /// Injects a pending interrupt if the guest can take it, or asks KVM for
    /// an interrupt-window exit.
    fn service_interrupts(&mut self) -> Result<(), Error> {
        let pending = self.platform.interrupt_pending();
        let run = self.vcpu.get_kvm_run();
        if pending && run.ready_for_interrupt_injection != 0 {
            run.request_interrupt_window = 0;
            let vector = self.platform.acknowledge();
            let irq = kvm_interrupt {
                irq: u32::from(vector),
            };
            // SAFETY: KVM_INTERRUPT on a vCPU fd with a valid kvm_interrupt.
            let ret = unsafe { ioctl_with_ref(&self.vcpu, KVM_INTERRUPT(), &irq) };
            if ret != 0 {
                return Err(Error::Kvm {
                    what: "KVM_INTERRUPT",
                    source: kvm_ioctls::Error::last(),
                });
            }
            self.stats.injected += 1;
            // More may be pending behind this one.
            let run = self.vcpu.get_kvm_run();
            run.request_interrupt_window = u8::from(self.platform.interrupt_pending());
        } else {
            run.request_interrupt_window = u8::from(pending);
        }
        Ok(())
    }

    /// Waits in HLT until an interrupt is pending. Returns false when nothing
    /// can ever raise one (no deadline and no more input).
    fn idle(&mut self) -> Result<bool, Error> {
        loop {
            self.platform.poll();
            if self.platform.interrupt_pending() {
                return Ok(true);
            }
            if let Some(t) = &self.timer {
                if t.take_request() {
                    return Ok(true);
                }
            }
            let now = nyx_devices::Clock::now_ns(self.clock.as_ref());
            let wait = match self.platform.next_deadline_ns() {
                Some(d) => d.saturating_sub(now).min(10_000_000),
                // Input may still arrive: check it now and then.
                None if self.platform.serial_may_receive() => 10_000_000,
                None => return Ok(false),
            };
            if wait > 0 {
                std::thread::sleep(std::time::Duration::from_nanos(wait));
            }
        }
    }

    /// Completes an MSR exit: a read (`write` None) or a write of a trapped
    /// MSR, answered in `kvm_run`.
    fn finish_msr(&mut self, index: u32, write: Option<u64>) {
        let result = match write {
            None => msr_read(&self.vcpu, index),
            Some(v) => msr_write(&self.vcpu, index, v).then_some(v),
        };
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_X86_RDMSR/WRMSR, whose union
        // member is `msr`.
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
    }

    /// Runs the guest until it exits, halts for good, resets or crashes.
    pub fn run(&mut self) -> Result<RunOutcome, Error> {
        self.prepare_thread()?;
        let wall = std::time::Instant::now();
        let (user, sys) = thread_cpu_ns();
        let result = self.run_loop();
        let (user2, sys2) = thread_cpu_ns();
        self.stats.wall_ns += wall.elapsed().as_nanos() as u64;
        self.stats.user_ns += user2.saturating_sub(user);
        self.stats.sys_ns += sys2.saturating_sub(sys);
        // No kicks while the machine is not running.
        if let Some(t) = self.timer.as_mut() {
            t.arm(None)?;
        }
        self.vcpu.set_kvm_immediate_exit(0);
        result
    }

    fn run_loop(&mut self) -> Result<RunOutcome, Error> {
        loop {
            self.platform.poll();
            self.service_interrupts()?;
            let deadline = self
                .platform
                .next_deadline_ns()
                .map(|d| self.clock.host_time_of(d));
            if let Some(t) = self.timer.as_mut() {
                t.arm(deadline)?;
            }
            let exit = match self.vcpu.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.vcpu.set_kvm_immediate_exit(0);
                    self.stats.kicks += 1;
                    if let Some(t) = &self.timer {
                        if t.take_request() {
                            // Another thread (gdb, the API) wants the machine;
                            // its caller decides. For now: keep running.
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
            match exit {
                VcpuExit::IoIn(port, data) => {
                    self.stats.pio += 1;
                    if self.platform.pio.read(u64::from(port), data).is_err() {
                        data.fill(0xff);
                        let len = data.len();
                        self.note_unknown(false, u64::from(port), false, len);
                    }
                }
                VcpuExit::IoOut(port, data) => {
                    self.stats.pio += 1;
                    match self.platform.pio.write(u64::from(port), data) {
                        Ok(None) => {}
                        Ok(Some(ev)) => return Ok(outcome_of(ev)),
                        Err(_) => {
                            let len = data.len();
                            self.note_unknown(false, u64::from(port), true, len);
                        }
                    }
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.stats.mmio += 1;
                    if self.platform.mmio.read(addr, data).is_err() {
                        data.fill(0xff);
                        let len = data.len();
                        self.note_unknown(true, addr, false, len);
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.stats.mmio += 1;
                    match self.platform.mmio.write(addr, data) {
                        Ok(None) => {}
                        Ok(Some(ev)) => return Ok(outcome_of(ev)),
                        Err(_) => {
                            let len = data.len();
                            self.note_unknown(true, addr, true, len);
                        }
                    }
                }
                VcpuExit::Hlt => {
                    self.stats.hlt += 1;
                    let if_flag = self.vcpu.get_kvm_run().if_flag != 0;
                    if !if_flag || !self.idle()? {
                        return Ok(RunOutcome::Halted);
                    }
                }
                VcpuExit::IrqWindowOpen => {
                    self.stats.irq_window += 1;
                }
                VcpuExit::X86Rdmsr(exit) => {
                    self.stats.msr += 1;
                    let index = exit.index;
                    self.finish_msr(index, None);
                }
                VcpuExit::X86Wrmsr(exit) => {
                    self.stats.msr += 1;
                    let (index, value) = (exit.index, exit.data);
                    self.finish_msr(index, Some(value));
                }
                VcpuExit::Shutdown => return self.crash("triple fault (KVM_EXIT_SHUTDOWN)".into()),
                VcpuExit::FailEntry(reason, cpu) => {
                    return self.crash(format!(
                        "VM entry failed (hardware reason {reason:#x}, cpu {cpu})"
                    ))
                }
                VcpuExit::InternalError => {
                    let run = self.vcpu.get_kvm_run();
                    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the
                    // `internal` member of the union is the valid one.
                    let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                    let what = match suberror {
                        1 => "emulation failure (a triple fault shows up this way on emulated KVM)",
                        2 => "simultaneous exceptions",
                        3 => "delivery event",
                        _ => "internal error",
                    };
                    return self.crash(format!("KVM internal error, suberror {suberror}: {what}"));
                }
                VcpuExit::SystemEvent(kind, _) => {
                    return Ok(match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => RunOutcome::Reset,
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => RunOutcome::PowerOff,
                        _ => return self.crash(format!("unexpected system event {kind}")),
                    })
                }
                other => {
                    let what = format!("unexpected VM exit {other:?}");
                    return self.crash(what);
                }
            }
        }
    }
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
