//! nyx-replayer: re-executes a trace, verifying every sync point.
//!
//! The replayer builds the recorded machine from the trace alone (kernel,
//! initrd, CPUID table, TSC frequency and date come from its header) and runs
//! it with [`RunHooks`] that serve the log back: time samples, serial input
//! and random values come from the trace where the recording consumed them;
//! every exit the guest makes is compared with the recorded one; before each
//! recorded landing the replayer runs the guest to the same point with a
//! hardware breakpoint at the landing's RIP, comparing the register digest
//! and the digest of the pages written since the previous landing at every
//! hit (see `search.rs`). The first mismatch stops the replay with a
//! [`Divergence`] report. Positions, keyframes, the timeline and the
//! emulated-KVM quirks a replay works around: ARCHITECTURE.md at the
//! repository root.

mod cursor;
mod report;
mod search;
pub mod timeline;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nyx_devices::Input;
use nyx_trace::TraceReader;
use nyx_vmm::clock::{TimeSource, VirtualClock};
use nyx_vmm::config::{MachineConfig, VerifyLevel, INITRD_IMAGE, KERNEL_IMAGE};
use nyx_vmm::events::{EndKind, Event, ExitRecord};
use nyx_vmm::hooks::{Enter, HookCtx, HookError, RunHooks};
use nyx_vmm::{MachineBuilder, RunOutcome};

pub use cursor::{Cursor, CursorMark, Failure};
pub use report::Divergence;
pub use timeline::{Position, Timeline};

/// Errors of a replay.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The trace cannot be read.
    #[error("cannot read the trace {path}: {source}")]
    Trace {
        /// The path.
        path: PathBuf,
        /// Why.
        source: nyx_trace::Error,
    },
    /// The trace's header is not a Nyx recording this version can replay.
    #[error("{path} is not a replayable Nyx trace: {why}")]
    NotATrace {
        /// The path.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The machine could not be built or run.
    #[error(transparent)]
    Machine(#[from] nyx_vmm::machine::Error),
    /// The guest did not do what the recording says.
    #[error("{0}")]
    Diverged(Box<Divergence>),
}

/// How a replay ended.
#[derive(Debug)]
pub enum ReplayEnd {
    /// The guest reached the recorded end and everything matched.
    Complete {
        /// The outcome (the same as recorded).
        outcome: RunOutcome,
    },
    /// The trace ends before the run did (the recorder was killed): every
    /// event up to there matched.
    Truncated {
        /// The position where the trace ends.
        position: u64,
    },
}

/// What a replay did.
#[derive(Debug)]
pub struct Replay {
    /// How it ended.
    pub end: ReplayEnd,
    /// Guest-caused exits replayed.
    pub exits: u64,
    /// Landings found (by search or by restoring their keyframe).
    pub landings: u64,
    /// Landings restored from a delta keyframe instead of searched.
    pub keyframes: u64,
    /// Breakpoint hits (and single steps) spent finding them.
    pub search_hits: u64,
    /// Most hits spent on one landing.
    pub max_hits: u64,
    /// Hits per landing, in order (for the benchmark).
    pub hits_per_landing: Vec<u64>,
    /// What each landing cost, in trace order (`nyx trace export --replay`).
    pub landing_costs: Vec<LandingCost>,
    /// The machine's exit statistics.
    pub stats: nyx_vmm::machine::ExitStats,
}

/// What reaching one landing cost the replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LandingCost {
    /// Restored from its delta keyframe (else searched).
    pub keyframe: bool,
    /// Host time spent reaching it, ns: the whole search (breakpoint hits,
    /// digests and steps over hits) or the keyframe's restore.
    pub host_ns: u64,
    /// Breakpoint hits of its search (0 for a keyframe).
    pub hits: u64,
}

/// Replay options.
pub struct ReplayOptions {
    /// Where guest serial output goes (default stdout).
    pub serial_out: Option<Box<dyn std::io::Write + Send>>,
    /// The KVM device (default `$NYX_KVM_DEVICE` or /dev/kvm).
    pub kvm_path: String,
    /// The disk images, in the recording's order, where they are not at
    /// the recorded paths any more (each must be the recorded image).
    pub disks: Vec<PathBuf>,
    /// Where virtio-console output goes (default: nowhere).
    pub console_out: Option<Box<dyn std::io::Write + Send>>,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            serial_out: None,
            kvm_path: nyx_vmm::kvm_device(),
            disks: Vec::new(),
            console_out: None,
        }
    }
}

/// The shared replay state: the cursor plus search statistics.
pub(crate) struct State {
    pub cursor: Cursor,
    pub landings: u64,
    pub search_hits: u64,
    pub hits_per_landing: Vec<u64>,
    pub landing_costs: Vec<LandingCost>,
    /// Host time spent searching for the next landing so far (a search a
    /// kick or a breakpoint interrupted goes on later), ns.
    pub search_ns: u64,
    pub keyframes: u64,
    /// A debugger single-steps: landings are reached by stepping to them.
    pub stepping: bool,
    /// Pause after the next exit once this instant has passed (or after
    /// `pause_exits` exits, whichever comes first).
    pub pause_after: Option<std::time::Instant>,
    /// Exits between pauses at most.
    pub pause_exits: u64,
    /// Exits since the last pause.
    pub exits_since_pause: u64,
    /// Pause after every exit once this many events are consumed.
    pub pause_near: Option<u64>,
    /// The handler a step's injected interrupt enters (the step stops there).
    pub injected_handler: Option<u64>,
}

pub(crate) type Shared = Arc<Mutex<State>>;

pub(crate) fn lock(s: &Shared) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// Time samples served from the trace.
struct ReplayTime(Shared);

impl TimeSource for ReplayTime {
    fn sample(&mut self) -> u64 {
        let mut s = lock(&self.0);
        match s.cursor.take_if(|e| matches!(e, Event::Time(_))) {
            Some(Event::Time(v)) => v,
            _ if s.cursor.at_end() => {
                s.cursor.fail_end();
                s.cursor.last_time()
            }
            _ => {
                s.cursor.fail("the guest read the clock here, the recording did not");
                s.cursor.last_time()
            }
        }
    }
}

/// Input served from the trace: the UART's (`Event::Input`) or the ACPI PM
/// device's platform events (`Event::Platform`).
struct ReplayInput {
    state: Shared,
    kind: InputKind,
}

/// Which device's input a [`ReplayInput`] serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputKind {
    Serial,
    Platform,
    Console,
    Net,
}

impl InputKind {
    /// The bytes `event` holds if it is this device's input.
    fn bytes_of(self, event: Option<&Event>) -> Option<&Vec<u8>> {
        match (event, self) {
            (Some(Event::Input(b)), InputKind::Serial)
            | (Some(Event::Platform(b)), InputKind::Platform)
            | (Some(Event::ConsoleInput(b)), InputKind::Console)
            | (Some(Event::NetInput(b)), InputKind::Net) => Some(b),
            _ => None,
        }
    }
}

impl Input for ReplayInput {
    fn read_available(&mut self, buf: &mut [u8]) -> usize {
        let mut s = lock(&self.state);
        let Some(b) = self.kind.bytes_of(s.cursor.peek()).cloned() else {
            return 0;
        };
        if b.len() > buf.len() {
            let msg = format!(
                "the device had room for {} bytes of input, the recording gave it {}",
                buf.len(),
                b.len()
            );
            s.cursor.fail(&msg);
            return 0;
        }
        buf[..b.len()].copy_from_slice(&b);
        s.cursor.advance();
        b.len()
    }

    fn is_exhausted(&self) -> bool {
        // Whether input may still come is part of the guest-visible state
        // only through what the device received, which the trace serves:
        // at a poll, or where this device's next input is (a device asks
        // at its poll, after the poll event and its time sample).
        let mut s = lock(&self.state);
        let mine = self.kind.bytes_of(s.cursor.peek()).is_some();
        !mine && !s.cursor.has_more_input()
    }
}

/// virtio-rng's bytes served from the trace (`Event::Rng`): a request
/// must come where the recording's came, and be as long.
struct ReplayEntropy {
    state: Shared,
}

impl nyx_devices::io::Entropy for ReplayEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        let mut s = lock(&self.state);
        match s.cursor.peek() {
            Some(Event::Rng(b)) if b.len() == buf.len() => {
                buf.copy_from_slice(b);
                s.cursor.advance();
            }
            other => {
                let msg = format!(
                    "virtio-rng asked for {} random bytes; the recording has {} here",
                    buf.len(),
                    other.map_or("nothing".to_string(), |e| e.to_string())
                );
                buf.fill(0);
                s.cursor.fail(&msg);
            }
        }
    }
}

/// A disk the trace embeds (`--embed-disks`): every read is served from
/// the trace's `DiskRead` events, in order; writes go nowhere (what the
/// guest reads back is in the trace too).
struct ReplayDisk {
    state: Shared,
    size: u64,
    read_only: bool,
}

impl nyx_devices::block::BlockBackend for ReplayDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, _offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let mut s = lock(&self.state);
        match s.cursor.peek() {
            Some(Event::DiskRead(b)) if b.len() == buf.len() => {
                buf.copy_from_slice(b);
                s.cursor.advance();
                Ok(())
            }
            Some(Event::DiskRead(b)) if b.is_empty() => {
                s.cursor.advance();
                Err(std::io::Error::other("the recorded read failed"))
            }
            other => {
                let msg = format!(
                    "the guest read {} bytes of an embedded disk; the recording has {} here",
                    buf.len(),
                    other.map_or("nothing".to_string(), |e| e.to_string())
                );
                s.cursor.fail(&msg);
                Err(std::io::Error::other(msg))
            }
        }
    }

    fn write_at(&mut self, _offset: u64, _data: &[u8]) -> std::io::Result<()> {
        if self.read_only {
            return Err(std::io::ErrorKind::PermissionDenied.into());
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, _len: u64) -> std::io::Result<()> {
        self.write_at(offset, &[])
    }

    fn restore(&mut self, _state: &[u8]) -> Result<(), String> {
        // A recording's overlay: its reads are in the trace already.
        Ok(())
    }
}

/// Told the position (guest-caused exits replayed) after each exit.
pub type Progress = Box<dyn FnMut(u64) + Send>;

/// The replayer's run hooks.
pub struct Replayer {
    state: Shared,
    config: MachineConfig,
    progress: Option<Progress>,
}

impl Replayer {
    fn check(&self, ctx: &mut HookCtx<'_>) -> Result<(), HookError> {
        let mut s = lock(&self.state);
        match s.cursor.take_failure() {
            Some(Failure::End) => Err(HookError::TraceEnd {
                position: s.cursor.position(),
            }),
            Some(Failure::Mismatch(msg)) => Err(report::diverge(ctx, &s.cursor, msg, None)),
            None => Ok(()),
        }
    }
}

impl RunHooks for Replayer {
    fn name(&self) -> &'static str {
        "replay"
    }

    fn time_source(&mut self, _start_ns: u64) -> Box<dyn TimeSource> {
        Box::new(ReplayTime(self.state.clone()))
    }

    fn serial_input(&mut self, _requested: Box<dyn Input>) -> Box<dyn Input> {
        Box::new(ReplayInput {
            state: self.state.clone(),
            kind: InputKind::Serial,
        })
    }

    fn platform_input(&mut self, _requested: Box<dyn Input>) -> Box<dyn Input> {
        Box::new(ReplayInput {
            state: self.state.clone(),
            kind: InputKind::Platform,
        })
    }

    fn console_input(&mut self, _requested: Box<dyn Input>) -> Box<dyn Input> {
        Box::new(ReplayInput {
            state: self.state.clone(),
            kind: InputKind::Console,
        })
    }

    fn net_input(&mut self, _requested: Box<dyn Input>) -> Box<dyn Input> {
        Box::new(ReplayInput {
            state: self.state.clone(),
            kind: InputKind::Net,
        })
    }

    fn rng_entropy(&mut self, _requested: Box<dyn nyx_devices::io::Entropy>) -> Box<dyn nyx_devices::io::Entropy> {
        Box::new(ReplayEntropy {
            state: self.state.clone(),
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
        if !identity.embedded {
            return image;
        }
        Some(Box::new(ReplayDisk {
            state: self.state.clone(),
            size: identity.size,
            read_only: identity.read_only,
        }))
    }

    fn wall_seconds(&mut self, _host: i64) -> i64 {
        self.config.wall_seconds
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

    fn kick_at(&self, _virt_deadline: Option<u64>) -> Option<u64> {
        None
    }

    fn poll_now(&mut self, ctx: &mut HookCtx<'_>, requested: bool) -> Result<bool, HookError> {
        self.check(ctx)?;
        let mut s = lock(&self.state);
        if s.cursor.take_if(|e| matches!(e, Event::Poll)).is_some() {
            return Ok(true);
        }
        if requested {
            if s.cursor.at_end() {
                return Err(HookError::TraceEnd {
                    position: s.cursor.position(),
                });
            }
            let msg = "the guest idles in HLT here and its devices are polled; the recording has no poll".to_string();
            return Err(report::diverge(ctx, &s.cursor, msg, None));
        }
        Ok(false)
    }

    fn may_inject(&mut self) -> bool {
        // Only where the recording injected: kvm_run's readiness flag can
        // say "ready" here where it said "not yet" in the recording (an
        // interrupt shadow, a completed trap on the emulated KVM), and an
        // interrupt pending in both must then wait for its recorded place.
        matches!(lock(&self.state).cursor.peek(), Some(Event::Inject(_)))
    }

    fn injection_due(&mut self) -> bool {
        matches!(lock(&self.state).cursor.peek(), Some(Event::Inject(_)))
    }

    fn inject_while_stepping(&self) -> bool {
        true
    }

    fn requests_interrupt_window(&self) -> bool {
        false
    }

    fn pause_after_exit(&mut self) -> bool {
        let mut s = lock(&self.state);
        let Some(t) = s.pause_after else {
            return false;
        };
        s.exits_since_pause += 1;
        let near = s.pause_near.is_some_and(|n| s.cursor.consumed() >= n);
        if near || s.exits_since_pause >= s.pause_exits || std::time::Instant::now() >= t {
            s.exits_since_pause = 0;
            return true;
        }
        false
    }

    fn pause_after_landing(&mut self) -> bool {
        self.pause_after_exit()
    }

    fn pause_after_switch(&mut self) -> bool {
        lock(&self.state).stepping
    }

    fn before_enter(&mut self, ctx: &mut HookCtx<'_>) -> Result<Enter, HookError> {
        self.check(ctx)?;
        if lock(&self.state).stepping {
            return Ok(match search::step_toward_landing(ctx, &self.state)? {
                Some(window) => Enter::Moved { poll: !window },
                None => Enter::Guest,
            });
        }
        // A keyframed landing is taken at once; a searched one stays in the
        // trace until it is found (a debugger's breakpoint may stop the
        // search, which then goes on when the guest is resumed). The
        // recorded interrupt window is such a landing too. With a
        // debugger's breakpoints armed a keyframed landing is searched too:
        // taking it at once would skip the code before it, and a breakpoint
        // there.
        let breakpoints = ctx.guest_debug.dr7 & 0xff != 0;
        let window;
        let landing = {
            let mut s = lock(&self.state);
            window = take_window_exit(&mut s.cursor);
            match s.cursor.peek() {
                Some(Event::Landing(l)) if l.keyframe.is_some() && !breakpoints => match s.cursor.advance() {
                    Some(Event::Landing(l)) => l,
                    _ => return Ok(Enter::Guest),
                },
                // Searched: only what the search compares.
                Some(Event::Landing(l)) => Box::new(l.digests_only()),
                _ => return Ok(Enter::Guest),
            }
        };
        let started = std::time::Instant::now();
        if let Some(k) = &landing.keyframe {
            search::restore_keyframe(ctx, &landing, k, &self.state)?;
            ctx.metrics.landing(nyx_vmm::metrics::LandingHow::Keyframe, 0);
            let mut s = lock(&self.state);
            s.landings += 1;
            s.keyframes += 1;
            s.landing_costs.push(LandingCost {
                keyframe: true,
                host_ns: elapsed_ns(started),
                hits: 0,
            });
            return Ok(Enter::Moved { poll: !window });
        }
        let end = search::run_to_landing(ctx, &landing, &self.state);
        let spent = elapsed_ns(started);
        let interrupted = |state: &Shared| {
            let mut s = lock(state);
            s.search_ns = s.search_ns.saturating_add(spent);
        };
        let hits = match end? {
            search::SearchEnd::Landed(hits) => hits,
            search::SearchEnd::Breakpoint(d) => {
                interrupted(&self.state);
                return Ok(Enter::Stop(d));
            }
            search::SearchEnd::Kicked => {
                interrupted(&self.state);
                return Ok(Enter::Kicked);
            }
        };
        ctx.metrics.landing(nyx_vmm::metrics::LandingHow::Search, hits);
        let mut s = lock(&self.state);
        s.cursor.advance();
        s.landings += 1;
        s.search_hits += hits;
        s.hits_per_landing.push(hits);
        let host_ns = std::mem::take(&mut s.search_ns).saturating_add(spent);
        s.landing_costs.push(LandingCost {
            keyframe: false,
            host_ns,
            hits,
        });
        Ok(Enter::Moved { poll: !window })
    }

    fn on_kick(&mut self, _ctx: &mut HookCtx<'_>, _deadline_passed: bool) -> Result<bool, HookError> {
        // No deadline kicks in a replay; other kicks are stop requests,
        // which the run loop handles before asking.
        Ok(false)
    }

    fn schedule(&mut self, ctx: &mut HookCtx<'_>, _proposal: Option<u8>) -> Result<Option<u8>, HookError> {
        self.check(ctx)?;
        match lock(&self.state).cursor.take_if(|e| matches!(e, Event::Switch(_))) {
            Some(Event::Switch(to)) => Ok(Some(to)),
            _ => Ok(None),
        }
    }

    fn on_exit(&mut self, ctx: &mut HookCtx<'_>, exit: &ExitRecord) -> Result<(), HookError> {
        self.check(ctx)?;
        let mut s = lock(&self.state);
        match s.cursor.peek().cloned() {
            Some(Event::Exit(r)) if same_exit(&r, exit) => {
                s.cursor.advance();
            }
            Some(other) => {
                let msg = format!("expected {other}\n  actual:   exit {exit}");
                return Err(report::diverge(ctx, &s.cursor, msg, None));
            }
            None if s.cursor.at_end() => {
                return Err(HookError::TraceEnd {
                    position: s.cursor.position(),
                })
            }
            None => {
                let msg = format!("the trace has no more events, the guest made exit {exit}");
                return Err(report::diverge(ctx, &s.cursor, msg, None));
            }
        }
        if let Some(p) = self.progress.as_mut() {
            p(s.cursor.position());
        }
        if self.config.verify == VerifyLevel::Full {
            let want = s.cursor.take_if(|e| matches!(e, Event::Regs(_)));
            drop(s);
            let got = ctx.regs_digest()?;
            if let Some(Event::Regs(d)) = want {
                if d != got {
                    let s = lock(&self.state);
                    let msg = format!("register digest after exit {exit}: expected {d:#018x}, got {got:#018x}");
                    return Err(report::diverge(ctx, &s.cursor, msg, None));
                }
            }
        }
        Ok(())
    }

    fn end_here(&mut self) -> Option<RunOutcome> {
        // A recording stopped by a limit (--until-output, --max-guest-time)
        // ends right after an exit: the replay ends at the same one.
        let mut s = lock(&self.state);
        match s.cursor.peek() {
            Some(Event::End(e)) => match &e.kind {
                EndKind::Limit(l) => Some(RunOutcome::Limit(l.clone())),
                _ => None,
            },
            _ => None,
        }
    }

    fn on_inject(&mut self, ctx: &mut HookCtx<'_>, vector: u8) -> Result<(), HookError> {
        let mut s = lock(&self.state);
        match s.cursor.take_if(|e| matches!(e, Event::Inject(_))) {
            Some(Event::Inject(v)) if v == vector => {
                if s.stepping {
                    drop(s);
                    search::stop_at_handler(ctx, vector, &self.state)?;
                }
                Ok(())
            }
            Some(Event::Inject(v)) => {
                let msg = format!("expected interrupt vector {v:#x} to be injected, got {vector:#x}");
                Err(report::diverge(ctx, &s.cursor, msg, None))
            }
            _ => {
                let msg = format!("the guest takes interrupt vector {vector:#x} here, the recording injected none");
                Err(report::diverge(ctx, &s.cursor, msg, None))
            }
        }
    }

    fn idle_wait(&mut self, _clock: &VirtualClock, _virt_deadline: Option<u64>, _input_possible: bool) {}

    fn entropy(&mut self, ctx: &mut HookCtx<'_>) -> Result<u64, HookError> {
        let mut s = lock(&self.state);
        match s.cursor.take_if(|e| matches!(e, Event::Entropy(_))) {
            Some(Event::Entropy(v)) => Ok(v),
            _ if s.cursor.at_end() => Err(HookError::TraceEnd {
                position: s.cursor.position(),
            }),
            _ => {
                let msg = "the guest asks for a random value here, the recording has none".to_string();
                Err(report::diverge(ctx, &s.cursor, msg, None))
            }
        }
    }

    fn on_end(&mut self, ctx: &mut HookCtx<'_>, outcome: &RunOutcome) -> Result<(), HookError> {
        self.check(ctx)?;
        let end = {
            let mut s = lock(&self.state);
            match s.cursor.take_if(|e| matches!(e, Event::End(_))) {
                Some(Event::End(e)) => e,
                _ if s.cursor.at_end() => {
                    return Err(HookError::TraceEnd {
                        position: s.cursor.position(),
                    })
                }
                _ => {
                    let msg = format!("the guest ended ({outcome}) where the recording goes on");
                    return Err(report::diverge(ctx, &s.cursor, msg, None));
                }
            }
        };
        let actual = nyx_recorder::end_record(ctx, outcome)?;
        let s = lock(&self.state);
        let kinds_match = match (&end.kind, &actual.kind) {
            (EndKind::Crashed(a), EndKind::Crashed(b)) => a.cpu == b.cpu,
            (a, b) => a == b,
        };
        if !kinds_match {
            let msg = format!("the recording ended ({}), the replay ({})", end.kind, actual.kind);
            return Err(report::diverge(ctx, &s.cursor, msg, None));
        }
        if end.regs_digest != actual.regs_digest || end.mem_digest != actual.mem_digest {
            let msg = format!(
                "final state differs: registers {:#018x} vs {:#018x}, memory {:#018x} vs {:#018x}",
                end.regs_digest, actual.regs_digest, end.mem_digest, actual.mem_digest
            );
            return Err(report::diverge(ctx, &s.cursor, msg, None));
        }
        Ok(())
    }
}

/// Host ns since `t`.
fn elapsed_ns(t: std::time::Instant) -> u64 {
    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Consumes a recorded interrupt-window exit that a landing follows: the
/// replay asks KVM for no window exit and reaches the landing instead.
pub(crate) fn take_window_exit(cursor: &mut Cursor) -> bool {
    let window = matches!(cursor.peek(), Some(Event::Exit(r)) if r.kind == nyx_vmm::events::ExitKind::IrqWindow);
    if window && cursor.second_is_landing() {
        cursor.advance();
        return true;
    }
    false
}

/// Whether two exit records describe the same exit. RIP is compared where
/// both have one (exits whose handling reads the registers).
fn same_exit(want: &ExitRecord, got: &ExitRecord) -> bool {
    want.kind == got.kind
        && want.addr == got.addr
        && want.size == got.size
        && want.data == got.data
        && (want.rip == 0 || got.rip == 0 || want.rip == got.rip)
}

/// A trace opened for replay: its reader, machine, kernel and initrd.
pub struct OpenTrace {
    /// The reader, at the first frame.
    pub reader: TraceReader,
    /// The machine it describes.
    pub config: MachineConfig,
    /// The kernel image.
    pub kernel: Vec<u8>,
    /// The initrd image.
    pub initrd: Option<Vec<u8>>,
}

/// The machine description and images of a trace.
pub fn open_trace(path: &Path) -> Result<OpenTrace, Error> {
    let reader = TraceReader::open(path).map_err(|source| Error::Trace {
        path: path.to_path_buf(),
        source,
    })?;
    let not = |why: String| Error::NotATrace {
        path: path.to_path_buf(),
        why,
    };
    let h = reader.header();
    if h.kind != nyx_trace::ContainerKind::Trace {
        return Err(not(format!("it is a {:?} container, not a trace", h.kind)));
    }
    let config =
        MachineConfig::from_bytes(&h.machine_config).map_err(|e| not(format!("machine configuration: {e}")))?;
    let image = |name: &str| h.images.iter().find(|i| i.name == name).and_then(|i| i.data.clone());
    let kernel = image(KERNEL_IMAGE).ok_or_else(|| not("the kernel image is not embedded".into()))?;
    let initrd = if config.has_initrd {
        Some(image(INITRD_IMAGE).ok_or_else(|| not("the initrd image is not embedded".into()))?)
    } else {
        None
    };
    Ok(OpenTrace {
        reader,
        config,
        kernel,
        initrd,
    })
}

/// Builds the machine of the trace at `path` under the replayer's hooks,
/// ready to run (or to be debugged forward): every run of it re-executes
/// the recording, verifying each step.
pub fn replay_machine(path: &Path, opts: ReplayOptions) -> Result<nyx_vmm::Machine, Error> {
    build(path, opts, None).map(|(m, _)| m)
}

/// Builds the machine of the trace at `path` for a debugger that moves
/// backwards too: its [`Timeline`] takes checkpoints, finds positions and
/// re-executes; guest output is written once however often a stretch is
/// re-executed.
pub fn debug_replay(path: &Path, mut opts: ReplayOptions) -> Result<(nyx_vmm::Machine, Timeline), Error> {
    let out = opts
        .serial_out
        .take()
        .unwrap_or_else(|| Box::new(std::io::stdout()) as Box<dyn std::io::Write + Send>);
    let (machine, _, timeline) = build_inner(path, opts, None, Some(out))?;
    let timeline = timeline.ok_or_else(|| Error::NotATrace {
        path: path.to_path_buf(),
        why: "no timeline".into(),
    })?;
    Ok((machine, timeline))
}

fn build(path: &Path, opts: ReplayOptions, progress: Option<Progress>) -> Result<(nyx_vmm::Machine, Shared), Error> {
    build_inner(path, opts, progress, None).map(|(m, s, _)| (m, s))
}

type Built = (nyx_vmm::Machine, Shared, Option<Timeline>);

fn build_inner(
    path: &Path,
    mut opts: ReplayOptions,
    progress: Option<Progress>,
    timeline_out: Option<Box<dyn std::io::Write + Send>>,
) -> Result<Built, Error> {
    let OpenTrace {
        reader,
        config,
        kernel,
        initrd,
    } = open_trace(path)?;
    let mut reader = reader;
    let start = starting_state(&mut reader, path)?;
    let cursor = Cursor::new(reader, path.to_path_buf());
    let state = Arc::new(Mutex::new(State {
        cursor,
        landings: 0,
        search_hits: 0,
        hits_per_landing: Vec::new(),
        landing_costs: Vec::new(),
        search_ns: 0,
        keyframes: 0,
        stepping: false,
        pause_after: None,
        pause_exits: u64::MAX,
        exits_since_pause: 0,
        pause_near: None,
        injected_handler: None,
    }));
    let hooks = Replayer {
        state: state.clone(),
        config: config.clone(),
        progress,
    };
    let mut b = MachineBuilder::new()
        .memory(config.mem_mib)
        .kernel_image(&config.kernel_name, kernel)
        .cmdline(&config.cmdline)
        .kvm_path(&opts.kvm_path)
        .cpuid_table(config.cpuid.clone())
        .cpu_model_name(&config.cpu_model)
        .irqchip(config.irqchip)
        .tsc_khz(config.tsc_khz)
        .expect_pci(config.pci.clone())
        .hooks(Box::new(hooks));
    let mut timeline = None;
    let mut console_out = opts.console_out.take();
    if let Some(out) = timeline_out {
        // Under a timeline both outputs are written once, however often
        // reverse execution re-runs a stretch.
        let (t, once, console_once) = Timeline::new(state.clone(), out, console_out.take());
        timeline = Some(t);
        console_out = console_once.map(|c| Box::new(c) as Box<dyn std::io::Write + Send>);
        b = b.serial_out(Box::new(once));
    } else if let Some(out) = opts.serial_out {
        b = b.serial_out(out);
    }
    b = b.pci(nyx_vmm::pci_setup::PciSetup::from_config(
        &config,
        &opts.disks,
        console_out,
    ));
    if let Some(i) = initrd {
        b = b.initrd_image(i);
    }
    if let Some((machine_state, memory)) = start {
        b = b.restore_state(machine_state, memory);
    }
    Ok((b.build()?, state, timeline))
}

/// The machine state and memory a trace recorded from a snapshot starts
/// from (its machine-state and memory frames before the first events), or
/// None for a trace that starts at power-on.
fn starting_state(
    reader: &mut TraceReader,
    path: &Path,
) -> Result<Option<(nyx_vmm::snapshot::MachineState, Vec<nyx_vmm::mem_state::PageRun>)>, Error> {
    use nyx_trace::FrameKind;
    let err = |source| Error::Trace {
        path: path.to_path_buf(),
        source,
    };
    let mut state = None;
    let mut memory = Vec::new();
    for i in 0..reader.frames().len() {
        match reader.frames()[i].kind {
            FrameKind::MachineState if state.is_none() => {
                let mut v: Vec<nyx_vmm::snapshot::MachineState> = reader.read_records(i).map_err(err)?;
                if v.len() != 1 {
                    return Err(Error::NotATrace {
                        path: path.to_path_buf(),
                        why: "its starting machine-state frame must hold exactly one state".into(),
                    });
                }
                state = v.pop();
            }
            FrameKind::Memory if state.is_some() => {
                memory.extend(reader.read_records::<nyx_vmm::mem_state::PageRun>(i).map_err(err)?)
            }
            _ => break,
        }
    }
    Ok(state.map(|s| (s, memory)))
}

/// Replays the trace at `path`.
pub fn replay(path: &Path, opts: ReplayOptions) -> Result<Replay, Error> {
    replay_with_progress(path, opts, None)
}

/// Replays the trace at `path`, telling `progress` the position as it goes.
pub fn replay_with_progress(path: &Path, opts: ReplayOptions, progress: Option<Progress>) -> Result<Replay, Error> {
    let (mut machine, state) = build(path, opts, progress)?;
    let result = machine.run();
    let stats = machine.stats().clone();
    let exits = machine.exit_seq();
    drop(machine);
    let mut s = lock(&state);
    if let Some(e) = s.cursor.take_read_error() {
        return Err(Error::Trace {
            path: path.to_path_buf(),
            source: e,
        });
    }
    let end = match result {
        Ok(outcome) => ReplayEnd::Complete { outcome },
        Err(nyx_vmm::machine::Error::Hook(HookError::TraceEnd { position })) => ReplayEnd::Truncated { position },
        Err(nyx_vmm::machine::Error::Hook(HookError::Divergence(text))) => {
            return Err(Error::Diverged(Box::new(Divergence { text })))
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Replay {
        end,
        exits,
        landings: s.landings,
        keyframes: s.keyframes,
        search_hits: s.search_hits,
        max_hits: s.hits_per_landing.iter().copied().max().unwrap_or(0),
        hits_per_landing: s.hits_per_landing.clone(),
        landing_costs: std::mem::take(&mut s.landing_costs),
        stats,
    })
}
