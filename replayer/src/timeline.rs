//! Moving a replay backwards: checkpoints, exact positions and
//! re-execution, for a debugger's `reverse-stepi`, `reverse-continue`,
//! `seek` and `restart`.
//!
//! Without a performance counter there is no instruction count to name a
//! point of the run by. A [`Position`] is instead the number of trace
//! events consumed (it changes only at sync points: exits, landings,
//! injections) plus the number of single steps since it last changed. A
//! position is known exactly wherever the replay got there by steps; after a
//! free run (a breakpoint hit, Ctrl-C) only its event count is known, and
//! [`Timeline::resolve`] finds its steps by stepping from the checkpoint
//! before it until registers and written memory equal the stop's.
//!
//! Checkpoints are taken at exits during free runs (every
//! [`Timeline::interval`] of run time or [`PAUSE_EXITS`] exits, whichever
//! comes first) and every [`STEP_CHECKPOINT`] steps
//! while stepping, so that reaching any position re-executes a bounded
//! stretch. A checkpoint holds the machine state (vCPU, devices, virtual
//! time, position in the trace) and only the pages written since the one
//! before it: the contents of a page at a checkpoint are those of its
//! latest saved version at or before it ([`PageHistory`]). Going to a
//! checkpoint rewrites only the pages that can differ.
//!
//! Guest output is written once: bytes the guest writes again to its serial
//! port or its virtio-console while the replay re-executes a stretch it had
//! already run are dropped. Each of the two outputs counts the bytes written
//! up to the machine's current point; a checkpoint keeps both counts, and
//! going back to it puts them back.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nyx_vmm::machine::{GuestDebug, Stop};
use nyx_vmm::snapshot::MachineState;
use nyx_vmm::vm_memory::{Bytes, GuestAddress};
use nyx_vmm::{Machine, RunOutcome};

use crate::cursor::CursorMark;
use crate::{lock, Shared};

/// The most single steps one command re-executes (about 20 s here) before
/// it gives up with an error instead of leaving gdb waiting.
pub const MAX_STEPS: u64 = 2_000_000;

/// A target this many events past the nearest checkpoint is reached by a
/// free run first, not by single steps all the way.
pub const FAR_EVENTS: u64 = 64;

/// Exits between the checkpoints of a free run at most (a cheap stand-in
/// for distance: a guest that exits often runs few instructions between).
pub const PAUSE_EXITS: u64 = 256;

/// Steps between the checkpoints a stepping pass leaves behind.
pub const STEP_CHECKPOINT: u64 = 1000;

const PAGE: usize = 4096;

/// A point of the replayed run: events consumed, then single steps since
/// the event count last changed. Ordered as the run goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// Trace events consumed.
    pub events: u64,
    /// Single steps since the event count last changed.
    pub steps: u64,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.events, self.steps)
    }
}

impl std::str::FromStr for Position {
    type Err = String;

    /// `EVENTS` or `EVENTS:STEPS`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let num = |t: &str| {
            t.trim()
                .parse::<u64>()
                .map_err(|_| format!("{s:?} is not a position (EVENTS or EVENTS:STEPS)"))
        };
        match s.split_once(':') {
            Some((e, st)) => Ok(Position {
                events: num(e)?,
                steps: num(st)?,
            }),
            None => Ok(Position {
                events: num(s)?,
                steps: 0,
            }),
        }
    }
}

/// Errors of moving in a replay.
#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    /// The machine failed.
    #[error(transparent)]
    Machine(#[from] nyx_vmm::machine::Error),
    /// The replay diverged or its trace failed while re-executing.
    #[error("re-executing the replay failed: {0}")]
    Replay(String),
    /// A command would re-execute more than this many steps.
    #[error("gave up after re-executing {0} single steps (no checkpoint near enough)")]
    TooFar(u64),
    /// The current point could not be found again from its checkpoint.
    #[error("cannot find the current point again from checkpoint {0}: the re-execution passed it")]
    Lost(Position),
}

type Result<T> = std::result::Result<T, TimelineError>;

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stepped {
    /// One instruction ran.
    Instruction,
    /// The run ended (the guest exited or crashed, or the trace ends).
    End,
}

/// How the replay ended, once it has.
#[derive(Debug, Clone)]
pub enum Ending {
    /// The guest's run ended as recorded.
    Outcome(RunOutcome),
    /// The trace ends here (a cut recording).
    TraceEnd,
}

/// A reverse run's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReverseStop {
    /// At the previous instruction (reverse-stepi).
    Stepped,
    /// At a breakpoint at this linear address.
    Breakpoint(u64),
    /// Just before the instruction that changed this watched address.
    Watch(u64),
    /// At the start of the replay: nothing earlier matched.
    Begin,
}

/// How a free run toward an event count ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FreeEnd {
    /// Paused after an exit with this many events consumed.
    Reached(u64),
    /// A debug register stopped it.
    Breakpoint,
    /// The replay ended.
    Ended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Power-on or the trace's starting snapshot.
    Start,
    /// Right after an exit (not an instruction boundary of a step).
    Pause,
    /// A single-step stop.
    Step,
}

struct Checkpoint {
    pos: Position,
    kind: Kind,
    state: MachineState,
    cursor: CursorMark,
    dirty_since_landing: BTreeSet<u64>,
    /// Serial bytes written up to here.
    output: u64,
    /// virtio-console bytes written up to here.
    console_output: u64,
    step: nyx_vmm::machine::StepState,
}

/// Saved page contents by position: a page's contents at a position are
/// those of its latest version at or before it (zero without one).
#[derive(Default)]
pub struct PageHistory(BTreeMap<u64, Versions>);

/// One page's saved versions, in position order.
type Versions = Vec<(Position, Arc<[u8]>)>;

impl PageHistory {
    /// Records `data` as page `gfn` at `pos`.
    pub fn insert(&mut self, gfn: u64, pos: Position, data: Arc<[u8]>) {
        let v = self.0.entry(gfn).or_default();
        match v.binary_search_by(|(p, _)| p.cmp(&pos)) {
            Ok(i) => v[i].1 = data,
            Err(i) => v.insert(i, (pos, data)),
        }
    }

    /// The contents of page `gfn` at `pos` (None: zero).
    pub fn at(&self, gfn: u64, pos: Position) -> Option<&Arc<[u8]>> {
        let v = self.0.get(&gfn)?;
        let i = v.partition_point(|(p, _)| *p <= pos);
        i.checked_sub(1).map(|i| &v[i].1)
    }

    /// Pages with a version in `(lo, hi]`.
    pub fn changed_between(&self, lo: Position, hi: Position) -> impl Iterator<Item = u64> + '_ {
        self.0
            .iter()
            .filter(move |(_, v)| v.iter().any(|(p, _)| *p > lo && *p <= hi))
            .map(|(g, _)| *g)
    }

    /// Every page with a saved version.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.keys().copied()
    }

    /// Saved versions in all.
    pub fn versions(&self) -> usize {
        self.0.values().map(Vec::len).sum()
    }
}

/// Output (serial or virtio-console) written once along the run, however
/// often re-executed.
struct OutState {
    /// Bytes the guest has written up to the machine's current point.
    emitted: u64,
    /// The most it ever had: bytes below this were already written.
    high: u64,
    inner: Box<dyn Write + Send>,
}

impl OutState {
    fn shared(inner: Box<dyn Write + Send>) -> Arc<Mutex<OutState>> {
        Arc::new(Mutex::new(OutState {
            emitted: 0,
            high: 0,
            inner,
        }))
    }
}

/// Bytes written up to the current point by an output, if there is one.
fn emitted(out: Option<&Arc<Mutex<OutState>>>) -> u64 {
    out.map_or(0, |o| o.lock().unwrap_or_else(|e| e.into_inner()).emitted)
}

/// An output under a timeline: the UART's, or the virtio-console's.
pub(crate) struct OnceOutput(Arc<Mutex<OutState>>);

impl Write for OnceOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut o = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let end = o.emitted + buf.len() as u64;
        if end > o.high {
            let skip = o.high.saturating_sub(o.emitted) as usize;
            o.inner.write_all(&buf[skip..])?;
            o.high = end;
        }
        o.emitted = end;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut o = self.0.lock().unwrap_or_else(|e| e.into_inner());
        o.inner.flush()
    }
}

/// Checkpoints and the exact position of a replay under a debugger.
pub struct Timeline {
    shared: Shared,
    out: Arc<Mutex<OutState>>,
    /// The virtio-console's output, when the machine has one.
    console: Option<Arc<Mutex<OutState>>>,
    checkpoints: Vec<Checkpoint>,
    pages: PageHistory,
    /// Where the pages written since (`written`) are counted from: the
    /// last checkpoint taken or gone to.
    base: Position,
    written: BTreeSet<u64>,
    /// The exact position, or None after a free run.
    pos: Option<Position>,
    /// Run time between the checkpoints of a free run.
    interval: Duration,
    ending: Option<Ending>,
    /// Checkpoints the user named (`monitor checkpoint`), by number.
    bookmarks: Vec<Position>,
    /// Steps single-stepped by re-executions (for the benchmark).
    pub steps_reexecuted: u64,
    /// Stretches between checkpoints a reverse-continue ruled out without
    /// stepping them.
    pub stretches_skipped: u64,
    /// Steps left to the current command ([`MAX_STEPS`]).
    budget: u64,
}

impl Timeline {
    /// A timeline writing serial output to `out` and, with `console`,
    /// virtio-console output there: returns it with the two writers to
    /// give the machine.
    pub(crate) fn new(
        shared: Shared,
        out: Box<dyn Write + Send>,
        console: Option<Box<dyn Write + Send>>,
    ) -> (Self, OnceOutput, Option<OnceOutput>) {
        let out = OutState::shared(out);
        let console = console.map(OutState::shared);
        {
            let mut s = lock(&shared);
            s.pause_exits = PAUSE_EXITS;
        }
        let t = Timeline {
            shared,
            out: out.clone(),
            console: console.clone(),
            checkpoints: Vec::new(),
            pages: PageHistory::default(),
            base: Position::default(),
            written: BTreeSet::new(),
            pos: Some(Position::default()),
            interval: Duration::from_millis(5),
            ending: None,
            bookmarks: Vec::new(),
            steps_reexecuted: 0,
            stretches_skipped: 0,
            budget: MAX_STEPS,
        };
        (t, OnceOutput(out), console.map(OnceOutput))
    }

    /// Takes the first checkpoint: the machine before its first instruction.
    pub fn start(&mut self, m: &mut Machine) -> Result<()> {
        if !self.checkpoints.is_empty() {
            return Ok(());
        }
        let (state, memory) = m.capture_state()?;
        m.take_written()?;
        let pos = Position::default();
        for run in &memory {
            for (i, page) in run.data.chunks(PAGE).enumerate() {
                let mut p = vec![0u8; PAGE];
                p[..page.len()].copy_from_slice(page);
                self.pages.insert(run.gpa / PAGE as u64 + i as u64, pos, p.into());
            }
        }
        self.push(pos, Kind::Start, state, m);
        self.base = pos;
        self.pos = Some(pos);
        Ok(())
    }

    /// Run time between the checkpoints of a free run (default 5 ms).
    pub fn set_interval(&mut self, d: Duration) {
        self.interval = d;
    }

    /// Run time between the checkpoints of a free run.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The number of checkpoints.
    pub fn checkpoints(&self) -> usize {
        self.checkpoints.len()
    }

    /// The exact position, if known (see [`Timeline::resolve`]).
    pub fn position(&self) -> Option<Position> {
        self.pos
    }

    /// How the replay ended, if the machine is at its end.
    pub fn ending(&self) -> Option<&Ending> {
        self.ending.as_ref()
    }

    fn consumed(&self) -> u64 {
        lock(&self.shared).cursor.consumed()
    }

    fn push(&mut self, pos: Position, kind: Kind, state: MachineState, m: &Machine) {
        let cursor = lock(&self.shared).cursor.mark();
        let ck = Checkpoint {
            pos,
            kind,
            state,
            cursor,
            dirty_since_landing: m.dirty_since_landing().clone(),
            output: emitted(Some(&self.out)),
            console_output: emitted(self.console.as_ref()),
            step: m.step_state(),
        };
        let i = self.checkpoints.partition_point(|c| c.pos < pos);
        if self.checkpoints.get(i).is_some_and(|c| c.pos == pos) {
            return;
        }
        self.checkpoints.insert(i, ck);
    }

    fn has_checkpoint(&self, pos: Position) -> bool {
        self.checkpoints.binary_search_by(|c| c.pos.cmp(&pos)).is_ok()
    }

    /// Saves the machine as a checkpoint at the known position `pos`.
    fn checkpoint(&mut self, m: &mut Machine, pos: Position, kind: Kind) -> Result<()> {
        if self.has_checkpoint(pos) {
            return Ok(());
        }
        let (state, _) = m.capture_state_without_memory()?;
        self.written.extend(m.take_written()?);
        for gfn in std::mem::take(&mut self.written) {
            let mut p = vec![0u8; PAGE];
            if m.memory().read_slice(&mut p, GuestAddress(gfn * PAGE as u64)).is_ok() {
                self.pages.insert(gfn, pos, p.into());
            }
        }
        self.base = pos;
        self.push(pos, kind, state, m);
        Ok(())
    }

    /// Puts the machine at checkpoint `i`.
    fn restore(&mut self, m: &mut Machine, i: usize) -> Result<()> {
        let target = self.checkpoints[i].pos;
        self.written.extend(m.take_written()?);
        let (lo, hi) = if target < self.base {
            (target, self.base)
        } else {
            (self.base, target)
        };
        let mut fix: BTreeSet<u64> = std::mem::take(&mut self.written);
        fix.extend(self.pages.changed_between(lo, hi));
        let pages = &self.pages;
        // The machine is stopped: this thread drives it.
        nyx_vmm::mem_state::rollback_pages(m.memory(), fix, |gfn| pages.at(gfn, target).map(|d| &d[..]))
            .map_err(|e| TimelineError::Replay(format!("restoring a checkpoint's pages: {e}")))?;
        let ck = &self.checkpoints[i];
        let out = Box::new(OnceOutput(self.out.clone()));
        let input = Box::new(crate::ReplayInput {
            state: self.shared.clone(),
            kind: crate::InputKind::Serial,
        });
        let events = Box::new(crate::ReplayInput {
            state: self.shared.clone(),
            kind: crate::InputKind::Platform,
        });
        m.reset_state(&ck.state, out, input, events)?;
        // What KVM logged since the last collection belongs to the run
        // being left, not to the checkpoint's landing accounting.
        m.take_written()?;
        m.set_dirty_since_landing(ck.dirty_since_landing.clone());
        m.set_step_state(ck.step);
        {
            let mut s = lock(&self.shared);
            s.cursor.seek(&ck.cursor);
            s.pause_after = None;
        }
        self.out.lock().unwrap_or_else(|e| e.into_inner()).emitted = ck.output;
        // The console device itself stays (its state is restored in
        // place): only where its output stands goes back.
        if let Some(c) = &self.console {
            c.lock().unwrap_or_else(|e| e.into_inner()).emitted = ck.console_output;
        }
        self.base = target;
        self.pos = Some(target);
        self.ending = None;
        Ok(())
    }

    /// Runs the machine once ([`Machine::resume`]) under the timeline: a
    /// single step when the machine single-steps (landings reached by
    /// stepping), otherwise a free run that pauses for checkpoints, which
    /// are taken here (the caller resumes again after a pause). The
    /// position follows the stop.
    pub fn resume(&mut self, m: &mut Machine) -> Result<std::result::Result<Stop, nyx_vmm::machine::Error>> {
        let stepping = m.guest_debug().single_step;
        self.before_run(stepping);
        let before = self.consumed();
        let r = m.resume();
        self.after_stop(m, &r, before, stepping)?;
        Ok(r)
    }

    fn before_run(&mut self, stepping: bool) {
        let mut s = lock(&self.shared);
        s.stepping = stepping;
        s.pause_after = (!stepping).then(|| Instant::now() + self.interval);
    }

    /// Notes how a run of the machine stopped (`events_before`: the events
    /// consumed when it started; `stepping`: a single step). A pause is
    /// turned into a checkpoint here.
    fn after_stop(
        &mut self,
        m: &mut Machine,
        stop: &std::result::Result<Stop, nyx_vmm::machine::Error>,
        events_before: u64,
        stepping: bool,
    ) -> Result<()> {
        let now = self.consumed();
        match stop {
            Ok(Stop::Paused) => {
                let pos = Position { events: now, steps: 0 };
                self.pos = Some(pos);
                self.checkpoint(m, pos, Kind::Pause)?;
                lock(&self.shared).pause_after = Some(Instant::now() + self.interval);
            }
            Ok(Stop::Debug(_)) if stepping => {
                self.pos = self.pos.map(|p| advance(p, events_before, now));
            }
            Ok(Stop::Debug(_)) | Ok(Stop::Interrupted) => self.pos = None,
            // The end is where the last instruction left the machine: known
            // after a step, to be found after a free run.
            Ok(Stop::Ended(o)) => {
                self.ending = Some(Ending::Outcome(o.clone()));
                if !stepping {
                    self.pos = None;
                }
            }
            Err(nyx_vmm::machine::Error::Hook(nyx_vmm::hooks::HookError::TraceEnd { .. })) => {
                self.ending = Some(Ending::TraceEnd);
                if !stepping {
                    self.pos = None;
                }
            }
            Err(_) => self.pos = None,
        }
        Ok(())
    }

    /// One single step of re-execution.
    fn step(&mut self, m: &mut Machine) -> Result<Stepped> {
        if self.ending.is_some() {
            return Ok(Stepped::End);
        }
        self.budget = self.budget.checked_sub(1).ok_or(TimelineError::TooFar(MAX_STEPS))?;
        let before = self.consumed();
        {
            let mut s = lock(&self.shared);
            s.stepping = true;
            s.pause_after = None;
        }
        loop {
            // A step that injected an interrupt changed the debug registers
            // (see `search::stop_at_handler`): single-stepping alone again.
            // HLT is not single-stepped: this emulated KVM steps over it as
            // if it were a NOP, without the HLT exit the recording has. It
            // runs as in a free run instead: the guest idles until the
            // recorded interrupt, whose handler entry ends the step.
            m.set_guest_debug(GuestDebug {
                single_step: !at_hlt(m),
                ..GuestDebug::default()
            })?;
            let r = m.resume();
            self.steps_reexecuted += 1;
            match r {
                Ok(Stop::Debug(_)) => {
                    let now = self.consumed();
                    self.pos = self.pos.map(|p| advance(p, before, now));
                    let handler = lock(&self.shared).injected_handler.take();
                    if handler.is_some_and(|h| m.linear_pc().is_ok_and(|pc| pc == h)) {
                        clear_pushed_tf(m)?;
                    }
                    return Ok(Stepped::Instruction);
                }
                Ok(Stop::Paused) | Ok(Stop::Interrupted) => continue,
                Ok(Stop::Ended(o)) => {
                    self.ending = Some(Ending::Outcome(o));
                    return Ok(Stepped::End);
                }
                Err(nyx_vmm::machine::Error::Hook(nyx_vmm::hooks::HookError::TraceEnd { .. })) => {
                    self.ending = Some(Ending::TraceEnd);
                    return Ok(Stepped::End);
                }
                Err(e) => return Err(TimelineError::Replay(e.to_string())),
            }
        }
    }

    /// One instruction forward (gdb's `stepi` on a replay): the same steps
    /// re-executions take, so positions agree.
    pub fn step_forward(&mut self, m: &mut Machine) -> Result<Stepped> {
        let saved = self.single_step_mode(m)?;
        let r = self.step(m);
        m.set_guest_debug(saved)?;
        r
    }

    /// Starts a command: single-stepping, with a fresh step budget.
    fn single_step_mode(&mut self, m: &mut Machine) -> Result<GuestDebug> {
        self.budget = MAX_STEPS;
        let saved = m.guest_debug();
        m.set_guest_debug(GuestDebug {
            single_step: true,
            ..GuestDebug::default()
        })?;
        Ok(saved)
    }

    /// A step of a re-execution pass; every [`STEP_CHECKPOINT`] steps of
    /// the pass (`n` counts them) the point becomes a checkpoint, so that
    /// the next command near here re-executes little.
    fn pass_step(&mut self, m: &mut Machine, n: &mut u64) -> Result<Stepped> {
        let r = self.step(m)?;
        *n += 1;
        if r == Stepped::Instruction && *n % STEP_CHECKPOINT == 0 {
            if let Some(p) = self.pos {
                self.checkpoint(m, p, Kind::Step)?;
            }
        }
        Ok(r)
    }

    /// The latest checkpoint at or before `pos` (the first one at worst).
    fn checkpoint_before(&self, pos: Position) -> usize {
        self.checkpoints.partition_point(|c| c.pos <= pos).saturating_sub(1)
    }

    /// Steps forward until the position is at least `target`, leaving a
    /// checkpoint every [`STEP_CHECKPOINT`] steps. Returns whether the run
    /// ended first.
    fn step_to(&mut self, m: &mut Machine, target: Position) -> Result<bool> {
        let mut n = 0u64;
        while self.pos.is_some_and(|p| p < target) {
            if self.pass_step(m, &mut n)? == Stepped::End {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Goes to `target` exactly (or to the first point after it, for a
    /// point no step stops at): the checkpoint before it, then steps.
    pub fn goto(&mut self, m: &mut Machine, target: Position) -> Result<()> {
        let saved = self.single_step_mode(m)?;
        let r = self.goto_inner(m, target);
        m.set_guest_debug(saved)?;
        r
    }

    fn goto_inner(&mut self, m: &mut Machine, target: Position) -> Result<()> {
        if self.pos != Some(target) || self.ending.is_some() {
            let cur = self.pos.filter(|p| *p <= target && self.ending.is_none());
            let i = self.checkpoint_before(target);
            // From here if no checkpoint lies between.
            let from = match cur {
                Some(c) if self.checkpoints[i].pos <= c => c,
                _ => {
                    self.restore(m, i)?;
                    self.checkpoints[i].pos
                }
            };
            // Far ahead: a free run leaves checkpoints up to the target's
            // events (one at every exit near it), then steps finish.
            if target.events > from.events + FAR_EVENTS && self.run_near(m, target.events)? {
                let i = self.checkpoint_before(target);
                if self.pos.is_none_or(|p| p > target || self.checkpoints[i].pos > p) {
                    self.restore(m, i)?;
                }
            }
            self.step_to(m, target)?;
        }
        Ok(())
    }

    /// Runs freely (no single steps) until the events consumed reach
    /// `events`, pausing for a checkpoint at every exit within
    /// [`FAR_EVENTS`] of it. Returns false if the run ended first.
    fn run_near(&mut self, m: &mut Machine, events: u64) -> Result<bool> {
        let end = self.run_free(m, GuestDebug::default(), events.saturating_sub(FAR_EVENTS / 4), events)?;
        Ok(!matches!(end, FreeEnd::Ended))
    }

    /// Runs freely with the debug registers of `dbg` until a pause with at
    /// least `events` consumed (pausing for a checkpoint at every exit once
    /// `pause_from` are), a breakpoint, or the end of the replay.
    fn run_free(&mut self, m: &mut Machine, dbg: GuestDebug, pause_from: u64, events: u64) -> Result<FreeEnd> {
        let saved = m.guest_debug();
        m.set_guest_debug(dbg)?;
        lock(&self.shared).pause_near = Some(pause_from);
        let r = (|| loop {
            match self.resume(m)? {
                Ok(Stop::Paused) if self.consumed() >= events => return Ok(FreeEnd::Reached(self.consumed())),
                Ok(Stop::Paused) | Ok(Stop::Interrupted) => {}
                Ok(Stop::Debug(_)) => return Ok(FreeEnd::Breakpoint),
                Ok(Stop::Ended(_)) => return Ok(FreeEnd::Ended),
                Err(nyx_vmm::machine::Error::Hook(nyx_vmm::hooks::HookError::TraceEnd { .. })) => {
                    return Ok(FreeEnd::Ended)
                }
                Err(e) => return Err(TimelineError::Replay(e.to_string())),
            }
        })();
        lock(&self.shared).pause_near = None;
        m.set_guest_debug(saved)?;
        r
    }

    /// A signature of the machine now: events, registers and the contents
    /// of every page the timeline knows was written.
    fn signature(&mut self, m: &mut Machine) -> Result<(u64, kvm_bindings::kvm_regs, u64)> {
        self.written.extend(m.take_written()?);
        let regs = m.vcpu().get_regs().map_err(|source| nyx_vmm::machine::Error::Kvm {
            what: "KVM_GET_REGS",
            source,
        })?;
        let sregs = m.vcpu().get_sregs().map_err(|source| nyx_vmm::machine::Error::Kvm {
            what: "KVM_GET_SREGS",
            source,
        })?;
        let pages: BTreeSet<u64> = self.pages.pages().chain(self.written.iter().copied()).collect();
        let mem = nyx_vmm::hooks::live_digest(m.memory(), &regs, &sregs, pages);
        Ok((self.consumed(), regs, mem))
    }

    /// Makes the position exact: after a free run, steps from the
    /// checkpoint before the stop until the machine equals it again.
    pub fn resolve(&mut self, m: &mut Machine) -> Result<Position> {
        if let Some(p) = self.pos {
            return Ok(p);
        }
        let saved = self.single_step_mode(m)?;
        let r = self.resolve_inner(m);
        m.set_guest_debug(saved)?;
        r
    }

    fn resolve_inner(&mut self, m: &mut Machine) -> Result<Position> {
        let ended = self.ending.clone();
        let (events, regs, mem) = self.signature(m)?;
        let limit = Position { events, steps: 0 };
        let i = self.checkpoint_before(limit);
        let from = self.checkpoints[i].pos;
        self.restore(m, i)?;
        let mut last = from;
        let mut n = 0u64;
        loop {
            let p = self.pos.unwrap_or(last);
            if ended.is_none() && p.events == events {
                let (e2, r2, m2) = self.signature(m)?;
                if e2 == events && same_regs(&r2, &regs) && m2 == mem {
                    return Ok(p);
                }
            }
            if p.events > events {
                return Err(TimelineError::Lost(from));
            }
            last = p;
            if self.pass_step(m, &mut n)? == Stepped::End {
                // The end is where the last step left the machine.
                if ended.is_some() {
                    self.pos = Some(last);
                    return Ok(last);
                }
                return Err(TimelineError::Lost(from));
            }
        }
    }

    /// The last point a single step stopped at before `target`, or None at
    /// the start of the replay.
    fn step_before(&mut self, m: &mut Machine, target: Position) -> Result<Option<Position>> {
        let mut i = self.checkpoint_before(target);
        loop {
            if self.checkpoints[i].pos >= target {
                if i == 0 {
                    return Ok(None);
                }
                i -= 1;
                continue;
            }
            self.restore(m, i)?;
            let mut best = (self.checkpoints[i].kind == Kind::Step).then_some(self.checkpoints[i].pos);
            let mut n = 0u64;
            loop {
                if self.pass_step(m, &mut n)? == Stepped::End {
                    break;
                }
                match self.pos {
                    Some(p) if p < target => best = Some(p),
                    _ => break,
                }
            }
            if best.is_some() || i == 0 {
                return Ok(best);
            }
            i -= 1;
        }
    }

    /// Goes to the start of the replay.
    fn go_to_start(&mut self, m: &mut Machine) -> Result<ReverseStop> {
        self.restore(m, 0)?;
        Ok(ReverseStop::Begin)
    }

    /// `reverse-stepi`: back to the point before the last instruction.
    pub fn reverse_step(&mut self, m: &mut Machine) -> Result<ReverseStop> {
        let saved = self.single_step_mode(m)?;
        let r = (|| {
            let target = self.resolve_inner_or_known(m)?;
            match self.step_before(m, target)? {
                Some(p) => {
                    self.goto_inner(m, p)?;
                    Ok(ReverseStop::Stepped)
                }
                None => self.go_to_start(m),
            }
        })();
        m.set_guest_debug(saved)?;
        r
    }

    fn resolve_inner_or_known(&mut self, m: &mut Machine) -> Result<Position> {
        match self.pos {
            Some(p) => Ok(p),
            None => self.resolve_inner(m),
        }
    }

    /// `reverse-continue`: back to the latest point before this one where
    /// a single step stopped at one of `breakpoints` (linear addresses), or
    /// just before an instruction that changed one of `watches` (linear
    /// address, length) or accessed one of `reads` (address, length, and
    /// whether a write counts too); the start of the replay if there is none.
    pub fn reverse_continue(
        &mut self,
        m: &mut Machine,
        breakpoints: &[u64],
        watches: &[(u64, u64)],
        reads: &[(u64, u64, bool)],
    ) -> Result<ReverseStop> {
        let saved = self.single_step_mode(m)?;
        let r = self.reverse_continue_inner(m, breakpoints, watches, reads);
        m.set_guest_debug(saved)?;
        r
    }

    fn reverse_continue_inner(
        &mut self,
        m: &mut Machine,
        breakpoints: &[u64],
        watches: &[(u64, u64)],
        reads: &[(u64, u64, bool)],
    ) -> Result<ReverseStop> {
        let mut upper = self.resolve_inner_or_known(m)?;
        let mut i = self.checkpoint_before(upper);
        // With write watchpoints alone, a stretch between two checkpoints
        // in which no watched page was written cannot hold a hit: it is
        // skipped without re-executing it.
        let watched_pages = if breakpoints.is_empty() && reads.is_empty() {
            watched_gfns(m, watches)
        } else {
            None
        };
        let mut first = true;
        loop {
            if self.checkpoints[i].pos >= upper {
                if i == 0 {
                    return self.go_to_start(m);
                }
                i -= 1;
                continue;
            }
            let start = self.checkpoints[i].pos;
            if let Some(gfns) = &watched_pages {
                // The stretch from the last checkpoint to here: the pages
                // written since it, if it is where they are counted from.
                let unwritten = if first {
                    if self.base == start {
                        self.written.extend(m.take_written()?);
                        !self.written.iter().any(|g| gfns.contains(g))
                    } else {
                        false
                    }
                } else {
                    !self.pages.changed_between(start, upper).any(|g| gfns.contains(&g))
                };
                if unwritten {
                    self.stretches_skipped += 1;
                    first = false;
                    if i == 0 {
                        return self.go_to_start(m);
                    }
                    upper = start;
                    i -= 1;
                    continue;
                }
            }
            let was_first = std::mem::replace(&mut first, false);
            // With breakpoints alone, a free run with them in the debug
            // registers tells whether a stretch ending at a pause checkpoint
            // holds a hit at all; only one that does is single-stepped.
            let free_check = !was_first
                && watches.is_empty()
                && reads.is_empty()
                && !breakpoints.is_empty()
                && breakpoints.len() <= 4
                && upper.steps == 0;
            if free_check && !self.hit_before(m, i, upper, breakpoints)? {
                self.stretches_skipped += 1;
                if i == 0 {
                    return self.go_to_start(m);
                }
                upper = start;
                i -= 1;
                continue;
            }
            self.restore(m, i)?;
            let mut hit = None;
            let mut prev = start;
            let mut values = watched(m, watches);
            let mut n = 0u64;
            loop {
                let read = nyx_vmm::access::first_accessed(m, reads).map(|k| reads[k].0);
                if self.pass_step(m, &mut n)? == Stepped::End {
                    break;
                }
                let Some(p) = self.pos else { break };
                if p >= upper {
                    break;
                }
                if let Some(addr) = read {
                    hit = Some((prev, ReverseStop::Watch(addr)));
                }
                let now = watched(m, watches);
                if let Some(k) = (0..watches.len()).find(|&k| now[k] != values[k]) {
                    hit = Some((prev, ReverseStop::Watch(watches[k].0)));
                }
                values = now;
                let pc = m.linear_pc()?;
                if breakpoints.contains(&pc) {
                    hit = Some((p, ReverseStop::Breakpoint(pc)));
                }
                prev = p;
            }
            if let Some((p, why)) = hit {
                self.goto_inner(m, p)?;
                return Ok(why);
            }
            if i == 0 {
                return self.go_to_start(m);
            }
            upper = start;
            i -= 1;
        }
    }

    /// Whether a free run from checkpoint `i` meets one of `breakpoints`
    /// before the pause checkpoint `upper` (true also when it cannot tell).
    fn hit_before(&mut self, m: &mut Machine, i: usize, upper: Position, breakpoints: &[u64]) -> Result<bool> {
        self.restore(m, i)?;
        // The restored point itself is not a hit: the stepping pass starts
        // past it too.
        let mut dbg = GuestDebug::default();
        for (k, &addr) in breakpoints.iter().enumerate().take(4) {
            dbg.dr[k] = addr;
            dbg.dr7 |= 1 << (2 * k);
        }
        let end = self.run_free(m, dbg, upper.events, upper.events)?;
        Ok(end != FreeEnd::Reached(upper.events))
    }

    /// Names the current point (`monitor checkpoint`); returns its number.
    pub fn bookmark(&mut self, m: &mut Machine) -> Result<(usize, Position)> {
        let p = self.resolve(m)?;
        if !self.has_checkpoint(p) {
            self.checkpoint(m, p, Kind::Step)?;
        }
        self.bookmarks.push(p);
        Ok((self.bookmarks.len(), p))
    }

    /// The point named `n` by [`Timeline::bookmark`].
    pub fn bookmarked(&self, n: usize) -> Option<Position> {
        n.checked_sub(1).and_then(|i| self.bookmarks.get(i)).copied()
    }

    /// Checkpoints and saved page versions, for `monitor info`.
    pub fn summary(&self) -> String {
        format!(
            "{} checkpoints, {} saved page versions, {} steps re-executed, {} stretches skipped",
            self.checkpoints.len(),
            self.pages.versions(),
            self.steps_reexecuted,
            self.stretches_skipped
        )
    }
}

/// The position after a step that started at `p` with `before` events
/// consumed and ended with `now`.
fn advance(p: Position, before: u64, now: u64) -> Position {
    if now != before {
        Position { events: now, steps: 1 }
    } else {
        Position {
            events: p.events,
            steps: p.steps + 1,
        }
    }
}

fn same_regs(a: &kvm_bindings::kvm_regs, b: &kvm_bindings::kvm_regs) -> bool {
    let f = |r: &kvm_bindings::kvm_regs| {
        [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14,
            r.r15, r.rip, r.rflags,
        ]
    };
    f(a) == f(b)
}

/// Whether the vCPU's next instruction is HLT.
fn at_hlt(m: &Machine) -> bool {
    let mut b = [0u8; 1];
    m.linear_pc()
        .is_ok_and(|pc| m.read_virt(pc, &mut b).is_ok() && b[0] == 0xf4)
}

/// Clears the trap flag in the RFLAGS image an interrupt delivered during a
/// single step pushed (KVM steps with TF set): the frame then holds what a
/// free run pushes, and the handler's `iret` does not turn stepping on.
fn clear_pushed_tf(m: &mut Machine) -> Result<()> {
    let kvm = |what| move |source| nyx_vmm::machine::Error::Kvm { what, source };
    let regs = m.vcpu().get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let s = m.vcpu().get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let (addr, len) = pushed_flags_at(&s, regs.rsp);
    let mut buf = [0u8; 8];
    if m.read_virt(addr, &mut buf[..len]).is_ok() && buf[1] & 1 != 0 {
        buf[1] &= !1;
        m.write_virt(addr, &buf[..len])?;
    }
    Ok(())
}

/// Where the RFLAGS image of an interrupt frame just pushed at `rsp` is,
/// and its size: above RIP and CS, in the stack's address size. RSP comes
/// from the guest: the arithmetic wraps as the CPU's does.
fn pushed_flags_at(s: &kvm_bindings::kvm_sregs, rsp: u64) -> (u64, usize) {
    if s.efer & (1 << 10) != 0 && s.cs.l != 0 {
        (rsp.wrapping_add(16), 8)
    } else if s.cr0 & 1 != 0 {
        (s.ss.base.wrapping_add(rsp.wrapping_add(8)) & 0xffff_ffff, 4)
    } else {
        (s.ss.base.wrapping_add(rsp.wrapping_add(4) & 0xffff), 2)
    }
}

/// The guest-physical pages of the watched ranges, or None where one does
/// not translate now (then no stretch may be skipped).
fn watched_gfns(m: &Machine, watches: &[(u64, u64)]) -> Option<BTreeSet<u64>> {
    let regs = m.paging_regs().ok()?;
    let mut out = BTreeSet::new();
    for &(addr, len) in watches {
        for a in [addr, addr.saturating_add(len.max(1) - 1)] {
            let t = nyx_vmm::paging::translate(m.memory(), &regs, a).ok()?;
            out.insert(t.gpa / PAGE as u64);
        }
    }
    Some(out)
}

/// The watched bytes now (None where unmapped).
fn watched(m: &Machine, watches: &[(u64, u64)]) -> Vec<Option<[u8; 8]>> {
    watches
        .iter()
        .map(|&(addr, len)| {
            let mut buf = [0u8; 8];
            let n = (len as usize).min(8);
            m.read_virt(addr, &mut buf[..n]).is_ok().then_some(buf)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(events: u64, steps: u64) -> Position {
        Position { events, steps }
    }

    #[test]
    fn positions_parse_and_order() {
        assert_eq!("12:3".parse::<Position>().unwrap(), p(12, 3));
        assert_eq!("7".parse::<Position>().unwrap(), p(7, 0));
        assert!("x:1".parse::<Position>().is_err());
        assert!("1:".parse::<Position>().is_err());
        assert!(p(1, 900) < p(2, 0));
        assert_eq!(p(4, 5).to_string(), "4:5");
    }

    #[test]
    fn a_step_that_consumes_events_restarts_the_count() {
        assert_eq!(advance(p(3, 7), 3, 3), p(3, 8));
        assert_eq!(advance(p(3, 7), 3, 5), p(5, 1));
    }

    #[test]
    fn output_is_written_once() {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let st = Arc::new(Mutex::new(OutState {
            emitted: 0,
            high: 0,
            inner: Box::new(sink.clone()),
        }));
        let mut o = OnceOutput(st.clone());
        o.write_all(b"hello ").unwrap();
        st.lock().unwrap().emitted = 2; // back to after "he"
        o.write_all(b"llo world").unwrap();
        assert_eq!(&*sink.0.lock().unwrap(), b"hello world");
    }

    /// Guest-chosen RSP at the ends of the address space: the frame's
    /// RFLAGS address wraps as the CPU's would (no overflow panic).
    #[test]
    fn pushed_flags_address_wraps_at_extreme_rsp() {
        let mut long = kvm_bindings::kvm_sregs {
            efer: 1 << 10,
            ..Default::default()
        };
        long.cs.l = 1;
        assert_eq!(pushed_flags_at(&long, u64::MAX), (15, 8));
        assert_eq!(pushed_flags_at(&long, u64::MAX - 15), (0, 8));
        let mut prot = kvm_bindings::kvm_sregs {
            cr0: 1,
            ..Default::default()
        };
        prot.ss.base = u64::MAX;
        assert_eq!(pushed_flags_at(&prot, u64::MAX), (6, 4));
        assert_eq!(pushed_flags_at(&prot, 0xffff_fff8), (0xffff_ffff, 4));
        let mut real = kvm_bindings::kvm_sregs::default();
        real.ss.base = u64::MAX;
        assert_eq!(pushed_flags_at(&real, u64::MAX), (2, 2));
        real.ss.base = 0x1_0000;
        assert_eq!(pushed_flags_at(&real, 0xfffe), (0x1_0002, 2));
    }

    proptest! {
        /// The history returns, at every position, the latest version at
        /// or before it, whatever the order versions were saved in.
        #[test]
        fn history_returns_latest_version(saves in proptest::collection::vec((0u64..4, 0u64..6, 0u64..6, any::<u8>()), 0..40),
                                          probe in (0u64..4, 0u64..7, 0u64..7)) {
            let mut h = PageHistory::default();
            let mut model: BTreeMap<(u64, Position), u8> = BTreeMap::new();
            for (g, e, s, b) in saves {
                h.insert(g, p(e, s), vec![b; PAGE].into());
                model.insert((g, p(e, s)), b);
            }
            let (g, e, s) = probe;
            let want = model.range((g, Position::default())..=(g, p(e, s))).next_back().map(|(_, b)| *b);
            prop_assert_eq!(h.at(g, p(e, s)).map(|d| d[0]), want);
        }
    }
}
