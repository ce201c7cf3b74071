//! The gdbstub target over a [`Machine`]: registers, memory by linear
//! address, and execution. `resume` and `step` only set the mode (as in
//! gdbstub's armv4t example); [`NyxTarget::run`] then runs the machine in
//! that mode from the event loop.
//!
//! Running from a breakpoint first steps over it with the breakpoint taken
//! out (the int3 byte restored, the debug register disarmed: continuing
//! with RFLAGS.RF does not work on every KVM) and puts it back. A #BP exit
//! at an address without a breakpoint of ours is the guest's own int3 and
//! is handed back to the guest as exception 3.
//!
//! Addresses are linear: gdb's `$pc` is RIP, which equals the linear
//! address wherever CS's base is 0 (long mode, flat protected mode).

use gdbstub::common::Signal;
use gdbstub::common::Tid;
use gdbstub::stub::MultiThreadStopReason;
use gdbstub::stub::SingleThreadStopReason;
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::base::reverse_exec::{
    ReplayLogPosition, ReverseCont, ReverseContOps, ReverseStep, ReverseStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{BreakpointsOps, WatchKind};
use gdbstub::target::ext::monitor_cmd::MonitorCmdOps;
use gdbstub::target::{Target, TargetError, TargetResult};
use nyx_vmm::hooks::HookError;
use nyx_vmm::kick::Kicker;
use nyx_vmm::machine::{DebugStop, GuestDebug, Stop};
use nyx_vmm::{Machine, RunOutcome};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::{NyxX86_64, X86Regs};
use crate::breakpoints::{BreakpointSet, SlotKind};
use crate::{regs, DebugEnd, Error};

/// DR6's single-step bit.
const DR6_BS: u64 = 1 << 14;
/// Vectors of the debug exits.
const DB_VECTOR: u32 = 1;
const BP_VECTOR: u32 = 3;

fn is_write_watch(kind: SlotKind) -> bool {
    matches!(kind, SlotKind::Watch(WatchKind::Write | WatchKind::ReadWrite))
}

/// What gdb asked the target to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecMode {
    /// Run until something stops it.
    Continue,
    /// Execute one instruction.
    Step,
    /// Back to the previous instruction (a replay).
    ReverseStep,
    /// Back to the latest breakpoint or watchpoint hit (a replay).
    ReverseCont,
}

/// What a run of the machine ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunStop {
    /// A stop to report to gdb.
    Reason(SingleThreadStopReason<u64>),
    /// Another thread kicked the machine (data from gdb may be waiting).
    Interrupted,
}

/// The gdb target.
pub struct NyxTarget<'m> {
    pub(crate) machine: &'m mut Machine,
    pub(crate) bps: BreakpointSet,
    pub(crate) mode: ExecMode,
    /// Software breakpoints are int3 bytes in memory (false: debug registers).
    pub(crate) int3_in_memory: bool,
    /// How the machine's run ended, once it has.
    pub(crate) end: Option<DebugEnd>,
    /// Kicks the machine's thread (Ctrl-C from gdb).
    pub(crate) kicker: Kicker,
    /// Write watchpoints also by single-stepping (see [`crate::ServeOptions`]).
    pub(crate) step_watchpoints: bool,
    /// The replay's checkpoints and position, when the machine replays a
    /// trace: reverse execution and `monitor seek` work through it.
    pub(crate) timeline: Option<&'m mut nyx_replayer::Timeline>,
}

impl<'m> NyxTarget<'m> {
    /// A target over `machine`. Call it on the thread
    /// that will run the machine.
    pub fn new(machine: &'m mut Machine, opts: crate::ServeOptions) -> Result<Self, Error> {
        let kicker = machine.kicker()?;
        Ok(NyxTarget {
            kicker,
            machine,
            bps: BreakpointSet::default(),
            mode: ExecMode::Continue,
            int3_in_memory: opts.int3_in_memory,
            step_watchpoints: opts.step_watchpoints,
            end: None,
            timeline: None,
        })
    }

    /// A target over a replayed `machine` that can also run backwards.
    pub fn with_timeline(
        machine: &'m mut Machine,
        timeline: &'m mut nyx_replayer::Timeline,
        opts: crate::ServeOptions,
    ) -> Result<Self, Error> {
        let mut t = NyxTarget::new(machine, opts)?;
        timeline.start(t.machine).map_err(|e| Error::Protocol(e.to_string()))?;
        t.timeline = Some(timeline);
        Ok(t)
    }

    /// The guest-physical address of linear address `addr`.
    pub(crate) fn translate(&self, addr: u64) -> Result<u64, Error> {
        let regs = self.machine.paging_regs()?;
        nyx_vmm::paging::translate(self.machine.memory(), &regs, addr)
            .map(|t| t.gpa)
            .map_err(|e| Error::Protocol(e.to_string()))
    }

    /// The linear address of the next instruction.
    fn pc(&self) -> Result<u64, Error> {
        Ok(self.machine.linear_pc()?)
    }

    /// Writes or removes the int3 bytes in memory.
    fn set_int3(&self, only: Option<u64>, armed: bool) {
        let mem = self.machine.memory();
        for (addr, bp) in &self.bps.sw {
            if only.is_some_and(|a| a != *addr) {
                continue;
            }
            let byte = if armed { 0xCC } else { bp.raw };
            if mem.write_slice(&[byte], GuestAddress(bp.gpa)).is_err() {
                tracing::warn!("cannot write the breakpoint byte at {addr:#x}");
            }
        }
    }

    /// Configures KVM's guest debugging; `skip` is a breakpoint address
    /// being stepped over.
    fn arm(&mut self, single_step: bool, skip: Option<u64>) -> Result<(), Error> {
        let dbg = GuestDebug {
            sw_breakpoints: !self.bps.sw.is_empty(),
            single_step,
            dr: self.bps.drs(),
            dr7: self.bps.dr7(skip),
        };
        self.machine.set_guest_debug(dbg)?;
        Ok(())
    }

    /// Runs the machine in the mode gdb asked for until it stops.
    pub fn run(&mut self) -> Result<RunStop, Error> {
        if let Some(t) = self.timeline.as_deref() {
            if t.ending().is_some() && matches!(self.mode, ExecMode::Continue | ExecMode::Step) {
                // Forward at the end of the replay.
                return Ok(RunStop::Reason(SingleThreadStopReason::ReplayLog {
                    tid: None,
                    pos: ReplayLogPosition::End,
                }));
            }
        }
        match self.mode {
            ExecMode::ReverseStep | ExecMode::ReverseCont => return self.run_reverse(),
            ExecMode::Step if self.timeline.is_some() => return self.replay_step(),
            ExecMode::Continue | ExecMode::Step => {}
        }
        let before = if self.step_watchpoints {
            self.watched_values()
        } else {
            Vec::new()
        };
        let read = if self.mode == ExecMode::Step {
            self.read_hit()
        } else {
            None
        };
        let stop = self.run_mode(&before)?;
        if stop == RunStop::Reason(SingleThreadStopReason::DoneStep) {
            if let Some(w) = self.changed_watch(&before) {
                return Ok(w);
            }
            if let Some((kind, addr)) = read {
                return Ok(RunStop::Reason(SingleThreadStopReason::Watch { tid: (), kind, addr }));
            }
        }
        Ok(stop)
    }

    fn run_mode(&mut self, before: &[(u64, Option<[u8; 8]>)]) -> Result<RunStop, Error> {
        let pc = self.pc()?;
        if self.bps.breaks_at(pc) {
            // Step over the breakpoint with it taken out.
            self.set_int3(Some(pc), false);
            let r = self.arm(true, Some(pc)).and_then(|_| self.resume_once(true));
            self.set_int3(Some(pc), true);
            let stop = r?;
            let stepped = matches!(stop, RunStop::Reason(SingleThreadStopReason::DoneStep));
            if stepped {
                if let Some(w) = self.changed_watch(before) {
                    return Ok(w);
                }
            }
            if self.mode == ExecMode::Step || !stepped {
                return Ok(stop);
            }
        }
        let step = self.mode == ExecMode::Step;
        let watching = self
            .bps
            .slots
            .iter()
            .flatten()
            .any(|s| matches!(s.kind, SlotKind::Watch(_)));
        if !step && self.step_watchpoints && watching {
            return self.run_watching();
        }
        self.arm(step, None)?;
        loop {
            match self.resume_once(step)? {
                RunStop::Reason(SingleThreadStopReason::DoneStep) if !step => continue,
                other => return Ok(other),
            }
        }
    }

    /// Continues by single steps, checking the watchpoints at each: for a
    /// KVM whose debug registers do not report data accesses. A write
    /// watchpoint stops when the watched bytes change; a read or access
    /// watchpoint when the instruction just run named them as a memory
    /// operand ([`nyx_vmm::access`]). A live run injects no interrupts while
    /// stepping; a replay delivers them where they were recorded.
    fn run_watching(&mut self) -> Result<RunStop, Error> {
        loop {
            let read = self.read_hit();
            let before = self.watched_values();
            let stop = match self.timeline.is_some() {
                true => self.replay_step_once()?,
                false => {
                    self.arm(true, None)?;
                    self.resume_once(true)?
                }
            };
            match stop {
                RunStop::Reason(SingleThreadStopReason::DoneStep) => {
                    if let Some(w) = self.changed_watch(&before) {
                        return Ok(w);
                    }
                    if let Some((kind, addr)) = read {
                        return Ok(RunStop::Reason(SingleThreadStopReason::Watch { tid: (), kind, addr }));
                    }
                    // Stepping with the timeline arms no debug registers.
                    if self.timeline.is_some() && self.bps.breaks_at(self.pc()?) {
                        let hw = self.bps.slots.iter().flatten().any(|s| s.kind == SlotKind::Exec);
                        return Ok(RunStop::Reason(if hw {
                            SingleThreadStopReason::HwBreak(())
                        } else {
                            SingleThreadStopReason::SwBreak(())
                        }));
                    }
                }
                other => return Ok(other),
            }
        }
    }

    /// The read or access watchpoint the instruction at RIP would trigger.
    fn read_hit(&self) -> Option<(WatchKind, u64)> {
        let watches: Vec<(WatchKind, u64, u64)> = self
            .bps
            .slots
            .iter()
            .flatten()
            .filter_map(|s| match s.kind {
                SlotKind::Watch(k @ (WatchKind::Read | WatchKind::ReadWrite)) => Some((k, s.addr, s.len)),
                _ => None,
            })
            .collect();
        let ranges: Vec<(u64, u64, bool)> = watches
            .iter()
            .map(|&(k, addr, len)| (addr, len, k == WatchKind::ReadWrite))
            .collect();
        nyx_vmm::access::first_accessed(self.machine, &ranges).map(|i| (watches[i].0, watches[i].1))
    }

    /// A watch stop if a watched range differs from `before`.
    fn changed_watch(&self, before: &[(u64, Option<[u8; 8]>)]) -> Option<RunStop> {
        let now = self.watched_values();
        let i = before.iter().zip(&now).position(|(a, b)| a != b)?;
        Some(RunStop::Reason(SingleThreadStopReason::Watch {
            tid: (),
            kind: WatchKind::Write,
            addr: now[i].0,
        }))
    }

    /// The current contents of every write-watched range (None: unmapped).
    fn watched_values(&self) -> Vec<(u64, Option<[u8; 8]>)> {
        self.bps
            .slots
            .iter()
            .flatten()
            .filter(|s| is_write_watch(s.kind))
            .map(|s| {
                let mut buf = [0u8; 8];
                let n = (s.len as usize).min(8);
                let ok = self.machine.read_virt(s.addr, &mut buf[..n]).is_ok();
                (s.addr, ok.then_some(buf))
            })
            .collect()
    }

    /// One instruction forward in a replay, as the timeline steps.
    fn replay_step(&mut self) -> Result<RunStop, Error> {
        let read = self.read_hit();
        let before = self.watched_values();
        let stop = self.replay_step_once()?;
        if stop != RunStop::Reason(SingleThreadStopReason::DoneStep) {
            return Ok(stop);
        }
        if let Some(w) = self.changed_watch(&before) {
            return Ok(w);
        }
        Ok(match read {
            Some((kind, addr)) => RunStop::Reason(SingleThreadStopReason::Watch { tid: (), kind, addr }),
            None => stop,
        })
    }

    /// One instruction forward in a replay, as the timeline steps.
    fn replay_step_once(&mut self) -> Result<RunStop, Error> {
        let Some(t) = self.timeline.as_deref_mut() else {
            return Ok(RunStop::Reason(SingleThreadStopReason::Signal(Signal::SIGTRAP)));
        };
        let stepped = t
            .step_forward(self.machine)
            .map_err(|e| Error::Protocol(e.to_string()))?;
        let ending = t.ending().cloned();
        match (stepped, ending) {
            (nyx_replayer::timeline::Stepped::Instruction, _) => Ok(RunStop::Reason(SingleThreadStopReason::DoneStep)),
            (_, Some(nyx_replayer::timeline::Ending::Outcome(o))) => Ok(self.ended(o)),
            _ => Ok(RunStop::Reason(SingleThreadStopReason::ReplayLog {
                tid: None,
                pos: ReplayLogPosition::End,
            })),
        }
    }

    /// Runs backwards (a replay): to the previous instruction, or to the
    /// latest breakpoint or write-watchpoint hit before here.
    /// A reverse command; when re-executing fails (a replay that cannot
    /// follow its trace backwards), the machine goes back to where the
    /// command started and gdb gets a plain stop there, with the reason on
    /// nyx's stderr: the session stays usable.
    fn run_reverse(&mut self) -> Result<RunStop, Error> {
        let start = match self.timeline.as_deref_mut() {
            Some(t) => t.resolve(self.machine).ok(),
            None => None,
        };
        match self.run_reverse_inner() {
            Err(Error::Protocol(e)) => {
                tracing::error!(target: "gdb", "{e}");
                eprintln!("nyx: {e}");
                if let (Some(t), Some(p)) = (self.timeline.as_deref_mut(), start) {
                    match t.goto(self.machine, p) {
                        Ok(()) => eprintln!("nyx: back at {p}, where the command started"),
                        Err(e) => eprintln!("nyx: and cannot go back to {p}: {e}"),
                    }
                }
                Ok(RunStop::Reason(SingleThreadStopReason::Signal(Signal::SIGTRAP)))
            }
            other => other,
        }
    }

    fn run_reverse_inner(&mut self) -> Result<RunStop, Error> {
        let Some(t) = self.timeline.as_deref_mut() else {
            return Ok(RunStop::Reason(SingleThreadStopReason::Signal(Signal::SIGTRAP)));
        };
        let reverse = |e: nyx_replayer::timeline::TimelineError| Error::Protocol(e.to_string());
        let stop = if self.mode == ExecMode::ReverseStep {
            t.reverse_step(self.machine).map_err(reverse)?
        } else {
            let mut breaks = Vec::new();
            let mut watches = Vec::new();
            let mut reads = Vec::new();
            for s in self.bps.slots.iter().flatten() {
                match s.kind {
                    SlotKind::Exec | SlotKind::SwExec => breaks.push(s.addr),
                    SlotKind::Watch(WatchKind::Write) => watches.push((s.addr, s.len)),
                    SlotKind::Watch(WatchKind::Read) => reads.push((s.addr, s.len, false)),
                    SlotKind::Watch(WatchKind::ReadWrite) => reads.push((s.addr, s.len, true)),
                }
            }
            breaks.extend(self.bps.sw.keys().copied());
            t.reverse_continue(self.machine, &breaks, &watches, &reads)
                .map_err(reverse)?
        };
        use nyx_replayer::timeline::ReverseStop;
        Ok(RunStop::Reason(match stop {
            ReverseStop::Stepped => SingleThreadStopReason::DoneStep,
            ReverseStop::Breakpoint(addr) => {
                let hw = self
                    .bps
                    .slots
                    .iter()
                    .flatten()
                    .any(|s| s.addr == addr && s.kind == SlotKind::Exec);
                if hw {
                    SingleThreadStopReason::HwBreak(())
                } else {
                    SingleThreadStopReason::SwBreak(())
                }
            }
            ReverseStop::Watch(addr) => SingleThreadStopReason::Watch {
                tid: (),
                kind: self
                    .bps
                    .slots
                    .iter()
                    .flatten()
                    .find_map(|s| match s.kind {
                        SlotKind::Watch(k) if s.addr == addr => Some(k),
                        _ => None,
                    })
                    .unwrap_or(WatchKind::Write),
                addr,
            },
            ReverseStop::Begin => SingleThreadStopReason::ReplayLog {
                tid: None,
                pos: ReplayLogPosition::Begin,
            },
        }))
    }

    /// One `Machine::resume`, its stop translated for gdb. A guest's own
    /// int3 is re-injected and the run goes on. In a replay, the timeline
    /// takes its checkpoints at the pauses and follows the position.
    fn resume_once(&mut self, stepping: bool) -> Result<RunStop, Error> {
        loop {
            let result = match self.timeline.as_deref_mut() {
                Some(t) => t.resume(self.machine).map_err(|e| Error::Protocol(e.to_string()))?,
                None => self.machine.resume(),
            };
            let stop = match result {
                Ok(s) => s,
                Err(nyx_vmm::machine::Error::Hook(e)) => return Ok(self.ended_by_hook(e)),
                Err(e) => return Err(e.into()),
            };
            match stop {
                Stop::Paused => continue,
                Stop::Interrupted => return Ok(RunStop::Interrupted),
                Stop::Ended(outcome) => return Ok(self.ended(outcome)),
                Stop::Debug(d) => match self.debug_stop(d, stepping)? {
                    Some(r) => return Ok(RunStop::Reason(r)),
                    None => continue,
                },
            }
        }
    }

    fn ended(&mut self, outcome: RunOutcome) -> RunStop {
        if self.reverse_supported() {
            // A replay stays at its end, where gdb can go backwards from.
            return RunStop::Reason(match &outcome {
                RunOutcome::Crashed(_) => SingleThreadStopReason::Signal(Signal::SIGSEGV),
                _ => SingleThreadStopReason::ReplayLog {
                    tid: None,
                    pos: ReplayLogPosition::End,
                },
            });
        }
        let reason = match &outcome {
            // The crash report is printed when the session ends.
            RunOutcome::Crashed(_) => SingleThreadStopReason::Terminated(Signal::SIGSEGV),
            o => SingleThreadStopReason::Exited(o.exit_status() as u8),
        };
        self.end = Some(DebugEnd::Ended(outcome));
        RunStop::Reason(reason)
    }

    fn ended_by_hook(&mut self, e: HookError) -> RunStop {
        if self.reverse_supported() && matches!(e, HookError::TraceEnd { .. }) {
            return RunStop::Reason(SingleThreadStopReason::ReplayLog {
                tid: None,
                pos: ReplayLogPosition::End,
            });
        }
        let reason = match &e {
            HookError::TraceEnd { .. } => SingleThreadStopReason::Exited(4),
            HookError::Divergence(_) => SingleThreadStopReason::Terminated(Signal::SIGABRT),
            _ => SingleThreadStopReason::Terminated(Signal::SIGKILL),
        };
        self.end = Some(DebugEnd::Stopped(e));
        RunStop::Reason(reason)
    }

    /// Translates a debug exit; None when the run should go on.
    fn debug_stop(&mut self, d: DebugStop, stepping: bool) -> Result<Option<SingleThreadStopReason<u64>>, Error> {
        if d.exception == BP_VECTOR {
            if self.bps.sw.contains_key(&d.pc) {
                return Ok(Some(SingleThreadStopReason::SwBreak(())));
            }
            self.reinject_int3()?;
            return Ok(None);
        }
        if d.exception != DB_VECTOR {
            return Ok(None);
        }
        for (i, slot) in self.bps.slots.iter().enumerate() {
            let Some(s) = slot else { continue };
            if d.dr6 & (1 << i) == 0 {
                continue;
            }
            return Ok(Some(match s.kind {
                SlotKind::Exec => SingleThreadStopReason::HwBreak(()),
                SlotKind::SwExec => SingleThreadStopReason::SwBreak(()),
                SlotKind::Watch(kind) => SingleThreadStopReason::Watch {
                    tid: (),
                    kind: match kind {
                        WatchKind::Read => WatchKind::ReadWrite,
                        k => k,
                    },
                    addr: s.addr,
                },
            }));
        }
        if stepping && (d.dr6 & DR6_BS != 0 || d.dr6 & 0xf == 0) {
            return Ok(Some(SingleThreadStopReason::DoneStep));
        }
        Ok(None)
    }

    /// Queues #BP for the guest: its own int3 behaves as without gdb.
    fn reinject_int3(&mut self) -> Result<(), Error> {
        // Emulated KVM: the guest's own int3 stopped as an emulation
        // failure, which Nyx delivers itself.
        if self.machine.deliver_stopped_int3()? {
            return Ok(());
        }
        let v = self.machine.vcpu();
        let kvm = |what| move |source| Error::Kvm { what, source };
        let mut ev = v.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
        ev.exception.injected = 1;
        ev.exception.nr = BP_VECTOR as u8;
        ev.exception.has_error_code = 0;
        ev.exception.pending = 0;
        v.set_vcpu_events(&ev).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// Takes every breakpoint out and stops guest debugging (detach).
    pub fn clear_all(&mut self) -> Result<(), Error> {
        self.set_int3(None, false);
        self.bps = BreakpointSet::default();
        self.machine.set_guest_debug(GuestDebug::default())?;
        Ok(())
    }
}

impl Target for NyxTarget<'_> {
    type Arch = NyxX86_64;
    type Error = Error;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    fn guard_rail_implicit_sw_breakpoints(&self) -> bool {
        true
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadBase for NyxTarget<'_> {
    fn read_registers(&mut self, out: &mut X86Regs, tid: Tid) -> TargetResult<(), Self> {
        let vcpu = self
            .machine
            .vcpu_at_stop(vcpu_of_tid(tid))
            .map_err(|_| TargetError::NonFatal)?;
        *out = regs::read(vcpu).map_err(TargetError::Fatal)?;
        Ok(())
    }

    fn write_registers(&mut self, r: &X86Regs, tid: Tid) -> TargetResult<(), Self> {
        let vcpu = self
            .machine
            .vcpu_at_stop(vcpu_of_tid(tid))
            .map_err(|_| TargetError::NonFatal)?;
        regs::write(vcpu, r).map_err(|_| TargetError::NonFatal)
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], _tid: Tid) -> TargetResult<usize, Self> {
        // Read page by page so that a partly mapped range returns its
        // readable start, as gdb expects. Every vCPU shares the address
        // space the running one translates through.
        let mut done = 0usize;
        while done < data.len() {
            let addr = start.wrapping_add(done as u64);
            let n = (data.len() - done).min((0x1000 - (addr & 0xfff)) as usize);
            if self.machine.read_virt(addr, &mut data[done..done + n]).is_err() {
                break;
            }
            done += n;
        }
        if done == 0 && !data.is_empty() {
            return Err(TargetError::Errno(14));
        }
        self.bps.show_original(start, &mut data[..done]);
        Ok(done)
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], _tid: Tid) -> TargetResult<(), Self> {
        // In a replay, the position must be known before memory differs
        // from the recording: finding it later compares the machine with a
        // re-execution, which never makes this write. The written pages
        // join the timeline's, so going back restores them.
        if let Some(t) = self.timeline.as_deref_mut() {
            t.resolve(self.machine).map_err(|_| TargetError::NonFatal)?;
        }
        self.machine
            .write_virt(start, data)
            .map_err(|_| TargetError::Errno(14))?;
        // A write over a software breakpoint changes the byte it restores.
        let end = start.saturating_add(data.len() as u64);
        let hits: Vec<u64> = self.bps.sw.range(start..end).map(|(a, _)| *a).collect();
        for addr in hits {
            let byte = data[(addr - start) as usize];
            if let Some(bp) = self.bps.sw.get_mut(&addr) {
                bp.raw = byte;
                bp.shown = byte;
            }
            self.set_int3(Some(addr), true);
        }
        Ok(())
    }

    /// Every vCPU is a thread (id = vCPU + 1), started or not, as in QEMU.
    fn list_active_threads(&mut self, register: &mut dyn FnMut(Tid)) -> Result<(), Self::Error> {
        for cpu in 0..self.machine.cpus() {
            register(tid_of_vcpu(cpu));
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

/// `r` as gdb sees it on a machine whose vCPUs are threads: the stop names
/// the vCPU that was running (`tid`).
pub(crate) fn thread_stop(r: SingleThreadStopReason<u64>, tid: Tid) -> MultiThreadStopReason<u64> {
    use gdbstub::stub::BaseStopReason as B;
    match r {
        B::DoneStep => B::SignalWithThread {
            tid,
            signal: Signal::SIGTRAP,
        },
        B::Signal(signal) => B::SignalWithThread { tid, signal },
        B::Exited(code) => B::Exited(code),
        B::Terminated(signal) => B::Terminated(signal),
        B::SignalWithThread { signal, .. } => B::SignalWithThread { tid, signal },
        B::SwBreak(()) => B::SwBreak(tid),
        B::HwBreak(()) => B::HwBreak(tid),
        B::Watch { kind, addr, .. } => B::Watch { tid, kind, addr },
        B::ReplayLog { pos, .. } => B::ReplayLog { tid: Some(tid), pos },
        // Nyx reports none of the others (syscalls, forks, libraries).
        _ => B::SignalWithThread {
            tid,
            signal: Signal::SIGTRAP,
        },
    }
}

impl NyxTarget<'_> {
    /// Whether gdb may execute backwards: on a replay (with a timeline).
    fn reverse_supported(&self) -> bool {
        self.timeline.is_some()
    }
}

/// The gdb thread of vCPU `cpu`.
pub(crate) fn tid_of_vcpu(cpu: usize) -> Tid {
    Tid::new(cpu + 1).unwrap_or(Tid::MIN)
}

/// The vCPU of gdb thread `tid`.
fn vcpu_of_tid(tid: Tid) -> usize {
    tid.get() - 1
}

/// All-stop over vCPUs that run one at a time: whatever thread gdb names,
/// the machine goes on as it would (a replay switches where its trace
/// does), and the stop names the vCPU that was running.
impl MultiThreadResume for NyxTarget<'_> {
    fn resume(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), Self::Error> {
        self.mode = ExecMode::Continue;
        Ok(())
    }

    fn set_resume_action_continue(&mut self, _tid: Tid, _signal: Option<Signal>) -> Result<(), Self::Error> {
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }

    fn support_reverse_step(&mut self) -> Option<ReverseStepOps<'_, Tid, Self>> {
        if self.reverse_supported() {
            Some(self)
        } else {
            None
        }
    }

    fn support_reverse_cont(&mut self) -> Option<ReverseContOps<'_, Tid, Self>> {
        if self.reverse_supported() {
            Some(self)
        } else {
            None
        }
    }
}

impl ReverseStep<Tid> for NyxTarget<'_> {
    fn reverse_step(&mut self, _tid: Tid) -> Result<(), Self::Error> {
        self.mode = ExecMode::ReverseStep;
        Ok(())
    }
}

impl ReverseCont<Tid> for NyxTarget<'_> {
    fn reverse_cont(&mut self) -> Result<(), Self::Error> {
        self.mode = ExecMode::ReverseCont;
        Ok(())
    }
}

/// gdb locks the scheduler to step one thread over a breakpoint. One vCPU
/// runs at a time anyway, so the others stay stopped during a step; a
/// replay still switches where its trace does, so a step taken at such a
/// point is the next vCPU's (and the stop names it).
impl MultiThreadSchedulerLocking for NyxTarget<'_> {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

impl MultiThreadSingleStep for NyxTarget<'_> {
    fn set_resume_action_step(&mut self, _tid: Tid, _signal: Option<Signal>) -> Result<(), Self::Error> {
        self.mode = ExecMode::Step;
        Ok(())
    }
}
