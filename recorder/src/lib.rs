//! nyx-recorder: runs a machine and logs every nondeterministic input it
//! consumes into a trace.
//!
//! The recorder is a set of [`RunHooks`] for the machine's one run loop: its
//! clock source, serial input and entropy pass the host through and log each
//! value where the machine consumes it; every guest-caused exit is logged
//! for verification; every asynchronous stop (a kick at a device deadline) is
//! logged as a landing with the register and dirty-memory digests the
//! replayer needs to find the same point again. Events go to the trace in
//! frames of bounded size; the trace is `NAME.partial` until the run ends,
//! so a recorder that is killed leaves a trace that replays up to its last
//! complete frame. The data flow from run loop to trace, and what a
//! landing is: ARCHITECTURE.md at the repository root.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nyx_devices::Input;
use nyx_trace::{ContainerKind, GuestImage, TraceHeader, TraceWriter, WriterOptions};
use nyx_vmm::clock::{HostTime, TimeSource, VirtualClock};
use nyx_vmm::config::{MachineConfig, VerifyLevel, INITRD_IMAGE, KERNEL_IMAGE};
use nyx_vmm::cpu_model::CpuModel;
use nyx_vmm::cpuid::CpuidPolicy;
use nyx_vmm::events::{EndKind, EndRecord, Event, ExitRecord};
use nyx_vmm::hooks::{host_idle_wait, host_random, HookCtx, HookError, RunHooks};
use nyx_vmm::metrics::{LandingHow, VmMetrics};
use nyx_vmm::reset::CheckRun;
use nyx_vmm::{MachineBuilder, RunOutcome, SerialIn};

mod from_snapshot;
pub use from_snapshot::{record_from_snapshot, start_from_snapshot, SnapshotRecordOptions};

/// The least host time the guest runs between two kicks, ns.
const MIN_SLICE_NS: u64 = 200_000;
/// Under [`LandingPolicy::Auto`], a landing this long (host time, ns) after
/// the previous position the replay reaches exactly (an exit, a landing or
/// an injection) is keyframed whatever the code looks like: the guest ran
/// a long exit-free stretch, so a breakpoint search would likely hit the
/// landing's RIP many times. On the fixture kernel, the searched landings
/// more than 5 ms after their previous position were a tenth of them and
/// took 92 % of the replay's breakpoint hits.
const LONG_STRETCH_NS: u64 = 5_000_000;
/// Events per frame before the frame is written.
const EVENTS_PER_FRAME: usize = 8192;
/// Longest time events wait in memory before their frame is written, ns.
const FRAME_AGE_NS: u64 = 200_000_000;

/// Errors of a recording.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The machine could not be built or run.
    #[error(transparent)]
    Machine(#[from] nyx_vmm::machine::Error),
    /// The trace could not be written.
    #[error("cannot write the trace {path}: {source}")]
    Trace {
        /// The trace path.
        path: PathBuf,
        /// Why.
        source: nyx_trace::Error,
    },
    /// A file the user named cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// How the recorder stores landings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LandingPolicy {
    /// Digests only: the replayer searches every landing with a breakpoint
    /// (it re-executes everything, so a debugger sees every instruction).
    Search,
    /// A delta keyframe at every landing: the replayer restores instead of
    /// searching.
    Keyframe,
    /// A delta keyframe where the guest stopped in a short loop or after a
    /// long exit-free stretch (many breakpoint hits expected), digests
    /// elsewhere.
    #[default]
    Auto,
}

/// What to record.
pub struct RecordOptions {
    /// The trace file to write.
    pub out: PathBuf,
    /// The kernel file.
    pub kernel: PathBuf,
    /// The kernel's name as the guest sees it (default: the path as given).
    pub kernel_name: Option<String>,
    /// An initrd.
    pub initrd: Option<PathBuf>,
    /// The command line.
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Serial input.
    pub serial_in: SerialIn,
    /// Where guest serial output goes (default stdout).
    pub serial_out: Option<Box<dyn std::io::Write + Send>>,
    /// The KVM device.
    pub kvm_path: String,
    /// How much to verify.
    pub verify: VerifyLevel,
    /// How landings are stored.
    pub landings: LandingPolicy,
    /// The CPU model the guest sees.
    pub cpu: CpuModel,
    /// The interrupt controllers and platform.
    pub irqchip: nyx_vmm::config::Irqchip,
    /// vCPUs: several run one at a time, and the trace logs each switch.
    pub cpus: usize,
    /// The PCI functions (virtio disks, entropy, console).
    pub pci: nyx_vmm::pci_setup::PciSetup,
}

/// What a recording produced.
#[derive(Debug)]
pub struct Recording {
    /// The finished trace.
    pub path: PathBuf,
    /// How the run ended.
    pub outcome: RunOutcome,
    /// Events logged.
    pub events: u64,
    /// Landings logged.
    pub landings: u64,
    /// Guest-caused exits.
    pub exits: u64,
    /// The machine's exit statistics.
    pub stats: nyx_vmm::machine::ExitStats,
}

/// The log shared by the hooks, the clock source and the serial input.
struct Log {
    writer: Option<TraceWriter>,
    path: PathBuf,
    buffer: Vec<Event>,
    buffer_start: u64,
    position: u64,
    last_flush_ns: u64,
    events: u64,
    landings: u64,
    error: Option<nyx_trace::Error>,
    /// The machine's metrics, once it is built: trace bytes go there.
    metrics: Option<Arc<VmMetrics>>,
    /// Bytes of the trace file counted into `metrics` so far.
    bytes_counted: u64,
    /// The machine's virtual TSC rate, which the frame codec predicts
    /// `rdtsc` values with.
    tsc_khz: u32,
}

impl Log {
    fn push(&mut self, e: Event) {
        if self.buffer.is_empty() {
            self.buffer_start = self.position;
        }
        if let Event::Exit(_) = e {
            self.position += 1;
        }
        if let Event::Landing(_) = e {
            self.landings += 1;
        }
        self.buffer.push(e);
        self.events += 1;
        if self.buffer.len() >= EVENTS_PER_FRAME {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.buffer.is_empty() || self.error.is_some() {
            return;
        }
        if let Some(w) = self.writer.as_mut() {
            match nyx_vmm::events::write_events(w, self.buffer_start, &self.buffer, self.tsc_khz) {
                Ok(info) => self.count_bytes(info.end()),
                Err(e) => self.error = Some(e),
            }
        }
        self.buffer.clear();
        self.last_flush_ns = nyx_vmm::kick::monotonic_ns();
    }

    /// Counts the trace file up to `end` (header and frames) into the
    /// machine's metrics.
    fn count_bytes(&mut self, end: u64) {
        if let Some(m) = &self.metrics {
            m.trace_bytes(end.saturating_sub(self.bytes_counted));
            self.bytes_counted = self.bytes_counted.max(end);
        }
    }

    fn flush_if_old(&mut self) {
        if nyx_vmm::kick::monotonic_ns().saturating_sub(self.last_flush_ns) > FRAME_AGE_NS {
            self.flush();
        }
    }

    fn check(&mut self) -> Result<(), HookError> {
        match self.error.take() {
            Some(e) => Err(HookError::Trace(format!("{}: {e}", self.path.display()))),
            None => Ok(()),
        }
    }
}

type SharedLog = Arc<Mutex<Log>>;

fn lock(log: &SharedLog) -> std::sync::MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

/// The host clock (or the check clock), each sample logged; the host's
/// rounded up to [`nyx_vmm::clock::RECORD_QUANTUM_NS`] (the check clock's
/// come in steps of its own).
struct RecordTime {
    source: Box<dyn TimeSource>,
    log: SharedLog,
    quantize: bool,
}

/// Whether the stopped vCPU of a machine with several runs with paging
/// off (real mode, or protected mode before it turns paging on, as an
/// AP's start-up trampoline does): a replay's breakpoint search missed
/// such a landing on emulated KVM (Linux on two vCPUs, a slice's end
/// inside the AP's trampoline), so it is keyframed instead. True also when
/// the registers cannot be read. One vCPU keeps its searched landings
/// (the in-tree guests run unpaged, and their landings replay).
fn unpaged(ctx: &mut HookCtx<'_>) -> bool {
    ctx.vcpus > 1 && ctx.vcpu.get_sregs().map_or(true, |s| s.cr0 & (1 << 31) == 0)
}

impl TimeSource for RecordTime {
    fn sample(&mut self) -> u64 {
        let v = self.source.sample();
        let v = if self.quantize { nyx_vmm::clock::quantize(v) } else { v };
        lock(&self.log).push(Event::Time(v));
        v
    }
}

/// Input from outside, each chunk a device takes logged: the user's
/// serial input (`Event::Input`) or platform events (`Event::Platform`).
struct RecordInput {
    inner: Box<dyn Input>,
    log: SharedLog,
    event: fn(Vec<u8>) -> Event,
}

impl Input for RecordInput {
    fn read_available(&mut self, buf: &mut [u8]) -> usize {
        let n = self.inner.read_available(buf);
        if n > 0 {
            lock(&self.log).push((self.event)(buf[..n].to_vec()));
        }
        n
    }

    fn is_exhausted(&self) -> bool {
        self.inner.is_exhausted()
    }
}

/// virtio-rng's bytes from the host, each request's logged
/// (`Event::Rng`).
struct RecordEntropy {
    inner: Box<dyn nyx_devices::io::Entropy>,
    log: SharedLog,
}

impl nyx_devices::io::Entropy for RecordEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        self.inner.fill(buf);
        lock(&self.log).push(Event::Rng(buf.to_vec()));
    }
}

/// A disk recorded with `--embed-disks`: what every read returned is
/// logged (`Event::DiskRead`; empty for a read that failed), so that the
/// replay needs no image.
struct RecordDisk {
    inner: Box<dyn nyx_devices::block::BlockBackend>,
    log: SharedLog,
}

impl nyx_devices::block::BlockBackend for RecordDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let r = self.inner.read_at(offset, buf);
        let logged = if r.is_ok() { buf.to_vec() } else { Vec::new() };
        lock(&self.log).push(Event::DiskRead(logged));
        r
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.inner.write_at(offset, data)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }

    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.write_zeroes(offset, len)
    }

    fn save(&self) -> Vec<u8> {
        self.inner.save()
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        self.inner.restore(state)
    }
}

/// The recorder's run hooks.
pub struct Recorder {
    log: SharedLog,
    host: HostTime,
    verify: VerifyLevel,
    wall: Arc<Mutex<i64>>,
    landings: LandingPolicy,
    hot_loops: HotLoops,
    /// Host time (monotonic ns) of the last kick that polled or the last
    /// injection: the guest's slice runs from there.
    slice_start_ns: u64,
    /// Host time (monotonic ns) of the last exit, landing or injection:
    /// where a replay's search for the next landing starts.
    last_position_ns: u64,
    /// The check clock's hooks, when recording under it: time, polls,
    /// entropy, the date and the time limit are theirs.
    check: Option<CheckRun>,
}

/// The recorder's judgements of where the guest stopped in a short loop
/// ([`HookCtx::in_hot_loop`]), by RIP: a busy guest lands at the same few
/// places again and again, and the judgement reads the registers and
/// decodes code at each. Only the choice between a keyframe and a search
/// depends on it (both replay exactly), so code that changes under a RIP
/// costs at most a slower replay.
#[derive(Debug, Default)]
struct HotLoops {
    by_rip: std::collections::HashMap<u64, bool>,
}

impl HotLoops {
    /// The most RIPs remembered; the guest decides how many there are.
    const MAX: usize = 4096;

    /// Whether the guest stopped in a short loop.
    fn judge(&mut self, ctx: &mut HookCtx<'_>) -> Result<bool, HookError> {
        let rip = ctx
            .vcpu
            .get_regs()
            .map_err(|source| HookError::Kvm {
                what: "KVM_GET_REGS",
                source,
            })?
            .rip;
        if let Some(&hot) = self.by_rip.get(&rip) {
            return Ok(hot);
        }
        let hot = ctx.in_hot_loop()?;
        if self.by_rip.len() >= Self::MAX {
            self.by_rip.clear();
        }
        self.by_rip.insert(rip, hot);
        Ok(hot)
    }
}

impl Recorder {
    fn new(log: SharedLog, verify: VerifyLevel, wall: Arc<Mutex<i64>>, landings: LandingPolicy) -> Self {
        Recorder {
            log,
            host: HostTime::new(),
            verify,
            wall,
            landings,
            hot_loops: HotLoops::default(),
            slice_start_ns: 0,
            last_position_ns: nyx_vmm::kick::monotonic_ns(),
            check: None,
        }
    }

    /// Logs a landing where the guest stopped (`--landings auto`: a
    /// keyframe after a long stretch without exits, in a hot loop, or, on
    /// a machine of several vCPUs, where paging is off).
    fn landing(&mut self, ctx: &mut HookCtx<'_>) -> Result<(), HookError> {
        let keyframe = match self.landings {
            LandingPolicy::Search => false,
            LandingPolicy::Keyframe => true,
            LandingPolicy::Auto => {
                let stretch = nyx_vmm::kick::monotonic_ns().saturating_sub(self.last_position_ns);
                stretch > LONG_STRETCH_NS || unpaged(ctx) || self.hot_loops.judge(ctx)?
            }
        };
        let landing = if keyframe {
            ctx.keyframe_here(self.verify == VerifyLevel::Full)?
        } else {
            ctx.landing_here()?
        };
        let how = if keyframe {
            LandingHow::Keyframe
        } else {
            LandingHow::Search
        };
        ctx.metrics.landing(how, 0);
        ctx.dirty_since_landing.clear();
        lock(&self.log).push(Event::Landing(Box::new(landing)));
        self.last_position_ns = nyx_vmm::kick::monotonic_ns();
        Ok(())
    }
}

impl RunHooks for Recorder {
    fn name(&self) -> &'static str {
        "record"
    }

    fn time_source(&mut self, start_ns: u64) -> Box<dyn TimeSource> {
        self.host = HostTime::starting_at(start_ns);
        let source: Box<dyn TimeSource> = match self.check.as_mut() {
            Some(c) => c.time_source(start_ns),
            None => Box::new(self.host),
        };
        Box::new(RecordTime {
            source,
            log: self.log.clone(),
            quantize: self.check.is_none(),
        })
    }

    fn serial_input(&mut self, requested: Box<dyn Input>) -> Box<dyn Input> {
        Box::new(RecordInput {
            inner: requested,
            log: self.log.clone(),
            event: Event::Input,
        })
    }

    fn platform_input(&mut self, requested: Box<dyn Input>) -> Box<dyn Input> {
        Box::new(RecordInput {
            inner: requested,
            log: self.log.clone(),
            event: Event::Platform,
        })
    }

    fn console_input(&mut self, requested: Box<dyn Input>) -> Box<dyn Input> {
        Box::new(RecordInput {
            inner: requested,
            log: self.log.clone(),
            event: Event::ConsoleInput,
        })
    }

    fn net_input(&mut self, requested: Box<dyn Input>) -> Box<dyn Input> {
        Box::new(RecordInput {
            inner: requested,
            log: self.log.clone(),
            event: Event::NetInput,
        })
    }

    fn rng_entropy(&mut self, requested: Box<dyn nyx_devices::io::Entropy>) -> Box<dyn nyx_devices::io::Entropy> {
        Box::new(RecordEntropy {
            inner: requested,
            log: self.log.clone(),
        })
    }

    fn isolates_disks(&self) -> bool {
        true
    }

    fn disk_backend(
        &mut self,
        identity: &nyx_vmm::disk::DiskIdentity,
        image: Option<Box<dyn nyx_devices::block::BlockBackend>>,
    ) -> Option<Box<dyn nyx_devices::block::BlockBackend>> {
        let image = image?;
        if !identity.embedded {
            return Some(image);
        }
        Some(Box::new(RecordDisk {
            inner: image,
            log: self.log.clone(),
        }))
    }

    fn wall_seconds(&mut self, host: i64) -> i64 {
        let secs = match self.check.as_mut() {
            Some(c) => c.wall_seconds(host),
            None => host,
        };
        *self.wall.lock().unwrap_or_else(|e| e.into_inner()) = secs;
        secs
    }

    fn patches_instructions(&self) -> bool {
        true
    }

    fn virtual_tsc(&self) -> bool {
        true
    }

    fn tracks_dirty_pages(&self) -> bool {
        true
    }

    fn schedules(&self) -> bool {
        true
    }

    fn schedule(&mut self, _ctx: &mut HookCtx<'_>, proposal: Option<u8>) -> Result<Option<u8>, HookError> {
        if let Some(to) = proposal {
            lock(&self.log).push(Event::Switch(to));
            // The vCPU switched to gets its slice before any kick.
            self.slice_start_ns = nyx_vmm::kick::monotonic_ns();
            self.last_position_ns = self.slice_start_ns;
        }
        Ok(proposal)
    }

    fn kick_at(&self, virt_deadline: Option<u64>) -> Option<u64> {
        if let Some(c) = &self.check {
            // Only the time limit: the check clock moves at exits.
            return c.kick_at(virt_deadline);
        }
        // The guest always gets a slice of its own after a landing or an
        // injection: when recording a landing costs more than a timer
        // period, a deadline already past would otherwise kick every entry
        // at once and the guest would never run again. The slice is counted
        // from the last landing or injection, not from this entry: a guest
        // that exits more often than the slice is long (a loop polling a
        // port or a trapped RDTSC) would otherwise push its kick away at
        // every exit and never get its timer interrupt.
        let min = self.slice_start_ns + MIN_SLICE_NS;
        Some(self.host.host_time_of(virt_deadline?).max(min))
    }

    fn poll_now(&mut self, ctx: &mut HookCtx<'_>, requested: bool) -> Result<bool, HookError> {
        let requested = match self.check.as_mut() {
            Some(c) => c.poll_now(ctx, requested)?,
            None => requested,
        };
        let mut log = lock(&self.log);
        if requested {
            log.push(Event::Poll);
            log.flush_if_old();
        }
        log.check()?;
        Ok(requested)
    }

    fn on_kick(&mut self, ctx: &mut HookCtx<'_>, deadline_passed: bool) -> Result<bool, HookError> {
        if !deadline_passed {
            return Ok(false);
        }
        if let Some(c) = self.check.as_mut() {
            // The check clock's kicks are its time limit (an error) and,
            // with several vCPUs, the end of a time slice: a landing there,
            // where the replay switches as the recording did.
            let step = c.on_kick(ctx, deadline_passed)?;
            if ctx.vcpus == 1 {
                return Ok(step);
            }
        }
        self.landing(ctx)?;
        self.slice_start_ns = nyx_vmm::kick::monotonic_ns();
        Ok(true)
    }

    fn on_exit(&mut self, ctx: &mut HookCtx<'_>, exit: &ExitRecord) -> Result<(), HookError> {
        self.last_position_ns = nyx_vmm::kick::monotonic_ns();
        // An interrupt-window exit is followed by its landing, which holds
        // the registers: the replay never makes that exit and goes from it
        // straight to the landing, so no register record may sit between.
        let window = exit.kind == nyx_vmm::events::ExitKind::IrqWindow;
        let regs = if self.verify == VerifyLevel::Full && !window {
            Some(ctx.regs_digest()?)
        } else {
            None
        };
        {
            let mut log = lock(&self.log);
            log.push(Event::Exit(*exit));
            if let Some(d) = regs {
                log.push(Event::Regs(d));
            }
        }
        // An emulated KVM reports an interrupt window a varying number of
        // instructions after it opened: where the guest really was is
        // logged as a landing, which the replay reaches exactly instead of
        // waiting for its own window exit.
        if window {
            self.landing(ctx)?;
        }
        if let Some(c) = self.check.as_mut() {
            c.on_exit(ctx, exit)?;
        }
        Ok(())
    }

    fn on_inject(&mut self, _ctx: &mut HookCtx<'_>, vector: u8) -> Result<(), HookError> {
        lock(&self.log).push(Event::Inject(vector));
        self.last_position_ns = nyx_vmm::kick::monotonic_ns();
        // The guest gets its slice to take the interrupt, too: a kick
        // before it entered would land with the vector still pending.
        self.slice_start_ns = nyx_vmm::kick::monotonic_ns();
        Ok(())
    }

    fn idle_wait(&mut self, clock: &VirtualClock, virt_deadline: Option<u64>, input_possible: bool) {
        lock(&self.log).flush_if_old();
        match self.check.as_mut() {
            Some(c) => c.idle_wait(clock, virt_deadline, input_possible),
            None => host_idle_wait(&self.host, clock, virt_deadline, input_possible),
        }
    }

    fn entropy(&mut self, ctx: &mut HookCtx<'_>) -> Result<u64, HookError> {
        let v = match self.check.as_mut() {
            Some(c) => c.entropy(ctx)?,
            None => host_random(),
        };
        lock(&self.log).push(Event::Entropy(v));
        Ok(v)
    }

    fn on_end(&mut self, ctx: &mut HookCtx<'_>, outcome: &RunOutcome) -> Result<(), HookError> {
        let end = end_record(ctx, outcome)?;
        let mut log = lock(&self.log);
        log.push(Event::End(Box::new(end)));
        log.flush();
        log.check()
    }
}

/// The end record of the machine in `ctx` after `outcome`.
pub fn end_record(ctx: &mut HookCtx<'_>, outcome: &RunOutcome) -> Result<EndRecord, HookError> {
    let kind = match outcome {
        RunOutcome::DebugExit(v) => EndKind::DebugExit(*v),
        RunOutcome::Halted => EndKind::Halted,
        RunOutcome::Reset => EndKind::Reset,
        RunOutcome::PowerOff => EndKind::PowerOff,
        RunOutcome::Crashed(r) => EndKind::Crashed(r.clone()),
        RunOutcome::Limit(l) => EndKind::Limit(l.clone()),
    };
    let regs_digest = ctx.regs_digest()?;
    let mem_digest = ctx.touched_digest()?;
    Ok(EndRecord {
        kind,
        regs_digest,
        mem_digest,
        virtual_ns: ctx.clock.last(),
    })
}

/// Records a run of the machine `opts` describes into `opts.out`.
pub fn record(opts: RecordOptions) -> Result<Recording, Error> {
    start(opts)?.run()
}

/// Builds the machine `opts` describes under the recorder and opens its
/// trace; the caller runs it ([`Session::run`], or its own loop and
/// [`Session::finish`]).
pub fn start(opts: RecordOptions) -> Result<Session, Error> {
    start_with_clock(opts, None)
}

/// As [`start`], under the check clock of `check` when given (the
/// deterministic clock of `nyx check`; see [`CheckRun`]) instead of the
/// host's.
pub fn start_with_clock(opts: RecordOptions, check: Option<CheckRun>) -> Result<Session, Error> {
    let image = std::fs::read(&opts.kernel).map_err(|source| Error::Read {
        path: opts.kernel.clone(),
        source,
    })?;
    let initrd = match &opts.initrd {
        Some(p) => Some(std::fs::read(p).map_err(|source| Error::Read {
            path: p.clone(),
            source,
        })?),
        None => None,
    };
    let kernel_name = opts
        .kernel_name
        .clone()
        .unwrap_or_else(|| opts.kernel.display().to_string());
    start_image_with_clock(opts, kernel_name, image, initrd, check)
}

/// Records a run of a kernel given as bytes.
pub fn record_image(
    opts: RecordOptions,
    kernel_name: String,
    image: Vec<u8>,
    initrd: Option<Vec<u8>>,
) -> Result<Recording, Error> {
    start_image(opts, kernel_name, image, initrd)?.run()
}

/// As [`start`], for a kernel given as bytes.
pub fn start_image(
    opts: RecordOptions,
    kernel_name: String,
    image: Vec<u8>,
    initrd: Option<Vec<u8>>,
) -> Result<Session, Error> {
    start_image_with_clock(opts, kernel_name, image, initrd, None)
}

fn start_image_with_clock(
    opts: RecordOptions,
    kernel_name: String,
    image: Vec<u8>,
    initrd: Option<Vec<u8>>,
    check: Option<CheckRun>,
) -> Result<Session, Error> {
    let log = new_log(&opts.out, 0);
    let wall = Arc::new(Mutex::new(0i64));
    let mut hooks = Recorder::new(log.clone(), opts.verify, wall.clone(), opts.landings);
    hooks.check = check;
    let mut b = MachineBuilder::new()
        .memory(opts.mem_mib)
        .kernel_image(&kernel_name, image.clone())
        .cmdline(&opts.cmdline)
        .serial_in(opts.serial_in)
        .kvm_path(&opts.kvm_path)
        .cpuid_policy(CpuidPolicy::RecordReplay)
        .cpu_model(opts.cpu)
        .irqchip(opts.irqchip)
        .cpus(opts.cpus)
        .pci(opts.pci)
        .hooks(Box::new(hooks));
    if let Some(out) = opts.serial_out {
        b = b.serial_out(out);
    }
    if let Some(i) = &initrd {
        b = b.initrd_image(i.clone());
    }
    let machine = b.build()?;

    let config = MachineConfig {
        mem_mib: opts.mem_mib,
        kernel_name: kernel_name.clone(),
        cmdline: opts.cmdline.clone(),
        has_initrd: initrd.is_some(),
        cpuid: machine.cpuid().to_vec(),
        cpu_model: opts.cpu.name().to_string(),
        tsc_khz: machine.tsc_khz(),
        wall_seconds: *wall.lock().unwrap_or_else(|e| e.into_inner()),
        verify: opts.verify,
        irqchip: opts.irqchip,
        pci: machine.config().pci.clone(),
    };
    let mut images = vec![GuestImage::embedded(KERNEL_IMAGE, image)];
    if let Some(i) = initrd {
        images.push(GuestImage::embedded(INITRD_IMAGE, i));
    }
    let header = TraceHeader {
        uuid: nyx_vmm::hooks::uuid_v4(),
        nyx_version: env!("CARGO_PKG_VERSION").to_string(),
        kind: ContainerKind::Trace,
        machine_config: config.to_bytes(),
        images,
    };
    let opts_w = WriterOptions::default();
    let writer = TraceWriter::create_with(&opts.out, &header, opts_w).map_err(|source| Error::Trace {
        path: opts.out.clone(),
        source,
    })?;
    Ok(Session::new(machine, log, writer, &opts.out, 0))
}

/// A log for a trace written to `out`, starting at `position`.
pub(crate) fn new_log(out: &Path, position: u64) -> SharedLog {
    Arc::new(Mutex::new(Log {
        writer: None,
        path: out.to_path_buf(),
        buffer: Vec::new(),
        buffer_start: position,
        position,
        last_flush_ns: nyx_vmm::kick::monotonic_ns(),
        events: 0,
        landings: 0,
        error: None,
        metrics: None,
        bytes_counted: 0,
        tsc_khz: 0,
    }))
}

/// A recording under way: a machine that runs under the recorder's hooks
/// and the trace they log into. Its machine may be run in any loop (a
/// control socket's, for instance) before the trace is finished.
pub struct Session {
    machine: nyx_vmm::Machine,
    log: SharedLog,
    out: PathBuf,
    start: u64,
}

impl Session {
    /// A session of `machine`, whose hooks log into `log`, writing the
    /// trace with `writer` to `out` from position `start`.
    pub(crate) fn new(machine: nyx_vmm::Machine, log: SharedLog, writer: TraceWriter, out: &Path, start: u64) -> Self {
        let mut l = lock(&log);
        l.metrics = Some(machine.metrics().clone());
        l.tsc_khz = machine.tsc_khz();
        // The header and any frames written before the run (a snapshot's
        // state) are on disk already.
        let written = std::fs::metadata(writer.partial_path()).map_or(0, |m| m.len());
        let framed = writer.frames().last().map_or(0, |f| f.end());
        l.count_bytes(written.max(framed));
        l.writer = Some(writer);
        drop(l);
        Session {
            machine,
            log,
            out: out.to_path_buf(),
            start,
        }
    }

    /// The machine being recorded (its metrics, its kicker, to run it).
    pub fn machine(&mut self) -> &mut nyx_vmm::Machine {
        &mut self.machine
    }

    /// Runs the machine to its end and finishes the trace.
    pub fn run(mut self) -> Result<Recording, Error> {
        let run = self.machine.run();
        self.finish(run)
    }

    /// Finishes the trace of a machine whose run ended with `run`.
    pub fn finish(self, run: Result<RunOutcome, nyx_vmm::machine::Error>) -> Result<Recording, Error> {
        // A run that failed (not a guest crash: KVM or the trace) leaves its
        // trace `.partial`, replayable up to its last frame.
        let closed = self.close(run.is_ok());
        let outcome = run?;
        let path = closed.path?;
        Ok(Recording {
            path,
            outcome,
            events: closed.events,
            landings: closed.landings,
            exits: closed.exits,
            stats: closed.stats,
        })
    }

    /// Finishes the trace of a run that was stopped before its end (a
    /// `quit` on the control socket): everything logged is kept, and a
    /// replay of it ends where the recording stopped, as a recording that
    /// was cut off. Returns the trace's path.
    pub fn abandon(self) -> Result<PathBuf, Error> {
        self.close(true).path
    }

    /// Drops the machine, writes the last events and finishes the trace
    /// when `complete` (else leaves it `.partial`).
    fn close(self, complete: bool) -> Closed {
        let stats = self.machine.stats().clone();
        let exits = self.machine.exit_seq().saturating_sub(self.start);
        drop(self.machine);
        let mut l = lock(&self.log);
        l.flush();
        let (events, landings) = (l.events, l.landings);
        let writer = l.writer.take();
        let pending_error = l.error.take();
        drop(l);
        let err = |source| Error::Trace {
            path: self.out.clone(),
            source,
        };
        let path = match (pending_error, writer) {
            (Some(e), _) => Err(err(e)),
            (None, Some(w)) if complete => w.finish().map_err(err),
            (None, _) => Ok(self.out.clone()),
        };
        Closed {
            path,
            events,
            landings,
            exits,
            stats,
        }
    }
}

/// What closing a session left.
struct Closed {
    path: Result<PathBuf, Error>,
    events: u64,
    landings: u64,
    exits: u64,
    stats: nyx_vmm::machine::ExitStats,
}

/// Where a recording of `kernel` goes by default.
pub fn default_trace_path(kernel: &Path) -> PathBuf {
    let stem = kernel
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "guest".into());
    PathBuf::from(format!("{stem}.nyxtrace"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nyx_devices::io::BufferInput;
    use nyx_trace::TraceReader;
    use nyx_vmm::events::{ExitKind, Landing};

    fn exit(n: u64) -> Event {
        Event::Exit(ExitRecord {
            kind: ExitKind::PioOut,
            addr: 0x3f8,
            size: 1,
            data: n,
            rip: 0x1000 + n,
        })
    }

    fn header() -> TraceHeader {
        TraceHeader {
            uuid: nyx_vmm::hooks::uuid_v4(),
            nyx_version: "test".into(),
            kind: ContainerKind::Trace,
            machine_config: Vec::new(),
            images: vec![GuestImage::embedded(KERNEL_IMAGE, vec![0x90])],
        }
    }

    /// Every event of the trace at `path`, with each events frame's first
    /// position.
    fn read_back(path: &Path) -> (Vec<u64>, Vec<Event>) {
        let mut r = TraceReader::open(path).unwrap();
        assert!(r.is_complete());
        let mut starts = Vec::new();
        let mut all = Vec::new();
        for i in 0..r.frames().len() {
            if r.frames()[i].kind == nyx_trace::FrameKind::Events {
                starts.push(r.frames()[i].first_position);
                all.extend(nyx_vmm::events::read_events(&mut r, i).unwrap());
            }
        }
        (starts, all)
    }

    /// The log counts exits as positions and landings apart, writes a
    /// frame every EVENTS_PER_FRAME events starting at the position of its
    /// first event, and loses nothing at the last flush.
    #[test]
    fn the_log_frames_events_at_their_positions() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("t.nyxtrace");
        let log = new_log(&out, 10);
        lock(&log).writer = Some(TraceWriter::create(&out, &header()).unwrap());
        let mut want = Vec::new();
        for n in 0..EVENTS_PER_FRAME as u64 + 5 {
            let e = match n % 4 {
                0 => Event::Time(n),
                3 => Event::Landing(Box::new(Landing {
                    regs: Default::default(),
                    regs_digest: n,
                    dirty_pages: 1,
                    mem_digest: !n,
                    pending_interrupt: None,
                    keyframe: None,
                })),
                _ => exit(n),
            };
            want.push(e.clone());
            lock(&log).push(e);
        }
        let mut l = lock(&log);
        assert_eq!(l.events, want.len() as u64);
        let exits = want.iter().filter(|e| matches!(e, Event::Exit(_))).count() as u64;
        let landings = want.iter().filter(|e| matches!(e, Event::Landing(_))).count() as u64;
        assert_eq!((l.position, l.landings), (10 + exits, landings));
        assert_eq!(l.buffer.len(), 5, "a full frame went to the file");
        l.flush();
        l.check().unwrap();
        l.writer.take().unwrap().finish().unwrap();
        drop(l);
        let (starts, got) = read_back(&out);
        let first_exits = want[..EVENTS_PER_FRAME]
            .iter()
            .filter(|e| matches!(e, Event::Exit(_)))
            .count() as u64;
        assert_eq!(starts, [10, 10 + first_exits]);
        assert_eq!(got, want);
    }

    /// Host time (rounded up to the recording's quantum) and serial input
    /// reach the machine and are logged as consumed; an empty read logs
    /// nothing.
    #[test]
    fn time_and_input_are_logged_where_consumed() {
        let dir = tempfile::tempdir().unwrap();
        let log = new_log(&dir.path().join("t.nyxtrace"), 0);
        let mut time = RecordTime {
            source: Box::new(nyx_vmm::clock::HostTime::new()),
            log: log.clone(),
            quantize: true,
        };
        let (a, b) = (time.sample(), time.sample());
        assert!(b >= a);
        let q = nyx_vmm::clock::RECORD_QUANTUM_NS;
        assert!(a % q == 0 && b % q == 0, "host samples are rounded: {a} {b}");
        let mut input = RecordInput {
            inner: Box::new(BufferInput::new(b"hi".to_vec())),
            log: log.clone(),
            event: Event::Input,
        };
        let mut buf = [0u8; 8];
        assert_eq!(input.read_available(&mut buf[..1]), 1);
        assert_eq!(input.read_available(&mut buf), 1);
        assert_eq!(input.read_available(&mut buf), 0);
        assert!(input.is_exhausted());
        let l = lock(&log);
        assert_eq!(
            l.buffer,
            [
                Event::Time(a),
                Event::Time(b),
                Event::Input(b"h".to_vec()),
                Event::Input(b"i".to_vec())
            ]
        );
        assert_eq!(l.position, 0, "no exit, no position");
    }

    /// A write error is kept and reported once by `check`, naming the
    /// trace; nothing more is written after it.
    #[test]
    fn a_write_error_is_reported_once_with_the_trace_path() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("t.nyxtrace");
        let log = new_log(&out, 0);
        let mut l = lock(&log);
        l.error = Some(nyx_trace::Error::Io(std::io::Error::other("disk full")));
        l.push(exit(1));
        l.flush();
        assert_eq!(l.buffer.len(), 1, "nothing is written after an error");
        let e = l.check().unwrap_err().to_string();
        assert!(e.contains("t.nyxtrace") && e.contains("disk full"), "{e}");
        assert!(l.check().is_ok());
    }

    #[test]
    fn default_paths_use_the_kernel_stem() {
        assert_eq!(
            default_trace_path(Path::new("/x/bzImage.bin")),
            PathBuf::from("bzImage.nyxtrace")
        );
        assert_eq!(default_trace_path(Path::new("/")), PathBuf::from("guest.nyxtrace"));
    }

    #[test]
    fn a_kernel_that_cannot_be_read_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("missing");
        let opts = options(dir.path().join("t.nyxtrace"), LandingPolicy::Auto);
        let e = start(RecordOptions {
            cpus: 1,
            kernel: kernel.clone(),
            ..opts
        })
        .err()
        .unwrap();
        assert!(matches!(&e, Error::Read { path, .. } if *path == kernel), "{e}");
    }

    fn options(out: PathBuf, landings: LandingPolicy) -> RecordOptions {
        RecordOptions {
            cpus: 1,
            out,
            kernel: PathBuf::from("guest"),
            kernel_name: None,
            initrd: None,
            cmdline: String::new(),
            mem_mib: 16,
            serial_in: SerialIn::None,
            serial_out: Some(Box::new(std::io::sink())),
            kvm_path: nyx_vmm::kvm_device(),
            verify: VerifyLevel::Exits,
            landings,
            cpu: Default::default(),
            irqchip: Default::default(),
            pci: Default::default(),
        }
    }

    /// A recording of an in-tree guest on KVM: the finished trace (no
    /// `.partial` left) holds the header's machine, an exit event per
    /// guest-caused exit, the counts the recording reports, and an end
    /// event last.
    #[test]
    fn a_recording_holds_every_exit_and_ends_with_the_end() {
        if !nyx_vmm::kvm_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("hello.nyxtrace");
        let image = nyx_guests::image("hello").unwrap().to_vec();
        let rec = record_image(options(out.clone(), LandingPolicy::Auto), "hello".into(), image, None).unwrap();
        assert_eq!(rec.path, out);
        assert!(!dir.path().join("hello.nyxtrace.partial").exists());
        let r = TraceReader::open(&out).unwrap();
        let config = MachineConfig::from_bytes(&r.header().machine_config).unwrap();
        assert_eq!((config.mem_mib, config.kernel_name.as_str()), (16, "hello"));
        let (_, events) = read_back(&out);
        assert_eq!(events.len() as u64, rec.events);
        let exits = events.iter().filter(|e| matches!(e, Event::Exit(_))).count() as u64;
        assert_eq!(exits, rec.exits);
        assert!(exits > 0);
        assert!(matches!(events.last(), Some(Event::End(_))), "{:?}", events.last());
    }

    /// A guest that computes between timer interrupts is stopped
    /// asynchronously: the recording logs those stops as landings, with a
    /// delta keyframe each under the keyframe policy.
    #[test]
    fn timer_stops_in_a_busy_loop_are_landings() {
        if !nyx_vmm::kvm_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("counter.nyxtrace");
        let image = nyx_guests::image("counter").unwrap().to_vec();
        let rec = record_image(
            options(out.clone(), LandingPolicy::Keyframe),
            "counter".into(),
            image,
            None,
        )
        .unwrap();
        assert!(rec.landings > 0, "{rec:?}");
        let (_, events) = read_back(&out);
        let landings: Vec<&Landing> = events
            .iter()
            .filter_map(|e| match e {
                Event::Landing(l) => Some(&**l),
                _ => None,
            })
            .collect();
        assert_eq!(landings.len() as u64, rec.landings);
        assert!(landings.iter().all(|l| l.keyframe.is_some()));
    }
}
