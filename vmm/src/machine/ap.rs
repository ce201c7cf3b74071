//! The application processors of a machine with several vCPUs (`--cpus
//! N`), in a plain run: one host thread each, in parallel with the BSP's.
//!
//! An AP starts waiting for a start-up IPI, as on a PC: the BSP's INIT and
//! SIPI messages reach it through the interrupt controllers
//! ([`nyx_devices::irqchip::CpuSignals`]) and it starts in real mode at
//! `vector << 12`. Its exits go to the same platform as the BSP's (every
//! device has its own lock; a local APIC access reaches the AP's own APIC
//! through [`nyx_devices::cpu::set_current`]); it injects what its own
//! local APIC holds, idles in HLT until an interrupt, a signal or a device
//! deadline, and polls the devices when a deadline passes, as the BSP does.
//!
//! [`Smp`] is what the vCPU threads of a run share: a [`Doorbell`] per CPU
//! that the interrupt controllers ring ([`CpuWaker`]) when they leave
//! something for a CPU — it wakes the CPU's thread from HLT and nudges it
//! out of `KVM_RUN` — and the end of the run, which the first CPU to end
//! it (a debug exit, a reset, a crash) sets for all. A CPU halted with
//! interrupts disabled, or waiting for a start-up IPI, is parked: the run
//! ends as halted when the BSP halts so and every AP is parked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use nyx_devices::irqchip::CpuWaker;

use super::exit::{
    complete_trap, emulate_cpuid_trap, finish_msr, msr_read, msr_write, unknown_trap_write, ExitIo, Pending,
};
use super::*;
use crate::kick::monotonic_ns;

/// How long a thread waits for its doorbell before looking again (the end
/// of the run, a deadline the platform moved) on its own.
const RECHECK: Duration = Duration::from_millis(20);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One CPU's doorbell: rung when something is left for the CPU.
#[derive(Default)]
pub(super) struct Doorbell {
    rung: Mutex<bool>,
    cv: Condvar,
    kicker: Mutex<Option<Kicker>>,
}

impl Doorbell {
    fn ring(&self) {
        *lock(&self.rung) = true;
        self.cv.notify_all();
        if let Some(k) = lock(&self.kicker).as_ref() {
            k.nudge();
        }
    }

    /// Whether the bell rang since the last look; clears it.
    pub(super) fn take(&self) -> bool {
        std::mem::take(&mut *lock(&self.rung))
    }

    /// Waits until the bell rings (and clears it) or the host's monotonic
    /// clock reaches `until_ns`, at most [`RECHECK`].
    pub(super) fn wait(&self, until_ns: Option<u64>) {
        let mut rung = lock(&self.rung);
        let now = monotonic_ns();
        let cap = RECHECK.as_nanos() as u64;
        let wait = until_ns.map_or(cap, |u| u.saturating_sub(now).min(cap));
        if !*rung && wait > 0 {
            rung = match self.cv.wait_timeout(rung, Duration::from_nanos(wait)) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        *rung = false;
    }

    /// The handle that nudges the CPU's thread out of `KVM_RUN` (None once
    /// the thread no longer runs it).
    pub(super) fn set_kicker(&self, kicker: Option<Kicker>) {
        *lock(&self.kicker) = kicker;
    }
}

/// What the vCPU threads of one stretch of a run share (from a start or a
/// resume to the next stop).
pub(super) struct Smp {
    bells: Vec<Doorbell>,
    /// How the run ended, set once by the first CPU to end it (Err: a
    /// failure of Nyx on that CPU).
    end: Mutex<Option<Result<RunOutcome, String>>>,
    /// The AP threads return: the run ended, or the machine stops (all
    /// stop) for the caller of [`Machine::resume`] to look at or save.
    stopping: AtomicBool,
    /// Per CPU: parked (waiting for a start-up IPI, or halted with
    /// interrupts disabled).
    parked: Mutex<Vec<bool>>,
    /// The host's monotonic ns at virtual time 0 (a plain run's clock).
    origin_ns: u64,
}

impl CpuWaker for Smp {
    fn wake(&self, cpu: usize) {
        // The calling thread looks at its own CPU after what it is doing.
        if cpu != nyx_devices::cpu::current() {
            if let Some(b) = self.bells.get(cpu) {
                b.ring();
            }
        }
    }
}

impl Smp {
    /// For CPUs parked or not as `parked` says (the BSP's entry is not
    /// looked at); `origin_ns` as [`Smp::host_ns`] uses it.
    pub(super) fn new(parked: Vec<bool>, origin_ns: u64) -> Self {
        Smp {
            bells: (0..parked.len()).map(|_| Doorbell::default()).collect(),
            end: Mutex::new(None),
            stopping: AtomicBool::new(false),
            parked: Mutex::new(parked),
            origin_ns,
        }
    }

    /// CPU `cpu`'s doorbell.
    pub(super) fn bell(&self, cpu: usize) -> &Doorbell {
        &self.bells[cpu]
    }

    /// Ends the run for every CPU (the first end is the one kept).
    pub(super) fn finish(&self, end: Result<RunOutcome, String>) {
        lock(&self.end).get_or_insert(end);
        self.stop();
    }

    /// Stops every AP thread without ending the run: each returns after
    /// the exit it is handling, and the machine can be resumed.
    pub(super) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let me = nyx_devices::cpu::current();
        for (i, b) in self.bells.iter().enumerate() {
            if i != me {
                b.ring();
            }
        }
    }

    /// How the run ended, once a CPU ended it.
    pub(super) fn ended(&self) -> Option<Result<RunOutcome, String>> {
        if !self.is_stopping() {
            return None;
        }
        lock(&self.end).clone()
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn set_parked(&self, cpu: usize, parked: bool) {
        let mut p = lock(&self.parked);
        if p[cpu] != parked {
            p[cpu] = parked;
            drop(p);
            if parked {
                // The BSP may be waiting for every AP to park.
                self.bells[0].ring();
            }
        }
    }

    /// Whether every AP is parked.
    pub(super) fn aps_parked(&self) -> bool {
        lock(&self.parked).iter().skip(1).all(|&p| p)
    }

    /// The host's monotonic time of virtual time `virt_ns`.
    pub(super) fn host_ns(&self, virt_ns: Option<u64>) -> Option<u64> {
        virt_ns.map(|v| self.origin_ns.saturating_add(v))
    }
}

/// Where an AP is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ApState {
    /// After power-on or INIT: waiting for a start-up IPI.
    WaitForSipi,
    /// Running.
    Running,
    /// In HLT with interrupts enabled: goes on at an interrupt.
    Idle,
    /// Halted with interrupts disabled: only INIT or an NMI goes on.
    Halted,
}

impl ApState {
    /// Parked: nothing but a signal (INIT, start-up, NMI) makes it run.
    fn parked(self) -> bool {
        matches!(self, ApState::WaitForSipi | ApState::Halted)
    }
}

/// An application processor.
pub(super) struct ApVcpu {
    pub(super) index: usize,
    /// This AP's vCPU; while a machine that runs its vCPUs one at a time
    /// runs this one, the BSP's, swapped with the machine's
    /// ([`super::serial`]).
    pub(super) vcpu: VcpuFd,
    pub(super) cpuid: Vec<cpuid::CpuidEntry>,
    /// The vCPU's registers as KVM created it: what INIT goes back to.
    reset_regs: kvm_bindings::kvm_regs,
    reset_sregs: kvm_bindings::kvm_sregs,
    pub(super) stats: ExitStats,
    unknown: UnknownAccesses,
    pub(super) state: ApState,
    cr8_entered: Option<u8>,
    /// An NMI sent to this AP while the machine was stopped, or saved with
    /// it: handed to KVM when the AP next runs.
    pub(super) nmi_waits: bool,
}

/// What an AP's thread uses of the machine.
pub(super) struct ApEnv<'a> {
    pub(super) smp: &'a Smp,
    pub(super) platform: &'a Platform,
    pub(super) clock: &'a VirtualClock,
    pub(super) patches: &'a PatchTable,
    pub(super) mem: &'a GuestMemory,
}

impl ApVcpu {
    /// Creates vCPU `index` of `vm`, with the CPUID table it sees, waiting
    /// for a start-up IPI.
    pub(super) fn new(vm: &VmFd, index: usize, table: Vec<cpuid::CpuidEntry>) -> Result<Self, Error> {
        let vcpu = vm.create_vcpu(index as u64).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let kcpuid = cpuid::to_kvm(&table).map_err(|_| Error::Kvm {
            what: "the CPUID table size",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        vcpu.set_cpuid2(&kcpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let reset_regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let reset_sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        Ok(ApVcpu {
            index,
            vcpu,
            cpuid: table,
            reset_regs,
            reset_sregs,
            stats: ExitStats::default(),
            unknown: UnknownAccesses::default(),
            state: ApState::WaitForSipi,
            cr8_entered: None,
            nmi_waits: false,
        })
    }

    /// Runs the AP on the calling thread until the run ends.
    pub(super) fn run(&mut self, env: &ApEnv<'_>) -> Result<(), Error> {
        nyx_devices::cpu::set_current(self.index);
        let run: *mut kvm_bindings::kvm_run = self.vcpu.get_kvm_run();
        // SAFETY: `run` is the vCPU's kvm_run mapping, owned by
        // `self.vcpu`, which outlives the timer (dropped at the end of this
        // function).
        let mut timer = unsafe { VcpuTimer::new(run) }?;
        env.smp.bell(self.index).set_kicker(Some(timer.kicker()));
        let result = self.run_loop(env, &mut timer);
        env.smp.bell(self.index).set_kicker(None);
        let _ = timer.arm(None);
        self.vcpu.set_kvm_immediate_exit(0);
        if let Err(e) = &result {
            env.smp.finish(Err(format!("vCPU {}: {e}", self.index)));
        }
        result
    }

    fn run_loop(&mut self, env: &ApEnv<'_>, timer: &mut VcpuTimer) -> Result<(), Error> {
        loop {
            if env.smp.is_stopping() {
                return Ok(());
            }
            self.take_signals(env)?;
            if std::mem::take(&mut self.nmi_waits) {
                self.vcpu.nmi().map_err(kvm_err("KVM_NMI"))?;
            }
            if self.state.parked() {
                env.smp.set_parked(self.index, true);
                env.smp.bell(self.index).wait(None);
                continue;
            }
            env.smp.set_parked(self.index, false);
            if self.state == ApState::Idle {
                // Stopped in HLT, or restored so: wait on.
                self.idle(env);
                continue;
            }
            self.step(env);
            self.inject(env)?;
            timer.arm(env.smp.host_ns(env.platform.next_deadline_ns()))?;
            self.cr8_entered = env.platform.cr8();
            if let Some(cr8) = self.cr8_entered {
                self.vcpu.get_kvm_run().cr8 = u64::from(cr8);
            }
            let mut io = ExitIo {
                platform: env.platform,
                stats: &mut self.stats,
                unknown: &mut self.unknown,
                patched: !env.patches.is_empty(),
            };
            let next = match self.vcpu.run() {
                Ok(exit) => io.handle(exit),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.vcpu.set_kvm_immediate_exit(0);
                    self.stats.kicks += 1;
                    continue;
                }
                Err(source) => {
                    return Err(Error::Kvm {
                        what: "KVM_RUN",
                        source,
                    })
                }
            };
            self.take_cr8(env);
            match next {
                Ok((_, Next::Continue | Next::Debug(_))) => {}
                Ok((_, Next::Hlt)) if self.vcpu.get_kvm_run().if_flag == 0 => self.state = ApState::Halted,
                Ok((_, Next::Hlt)) => {
                    self.state = ApState::Idle;
                    self.idle(env);
                }
                Ok((_, Next::End(outcome))) => {
                    env.smp.finish(Ok(outcome));
                    return Ok(());
                }
                Ok((_, Next::Sleep(state))) => {
                    return self.crash(
                        env,
                        format!("entered ACPI sleep state S{state}, which Nyx supports on one vCPU only"),
                    )
                }
                Ok((_, Next::Crash(reason))) => return self.crash(env, reason),
                Ok((_, Next::InternalError)) => {
                    let reason = internal_error_reason(&mut self.vcpu);
                    return self.crash(env, reason);
                }
                Err(Pending::Msr { index, write }) => {
                    let result = match (env.platform.apic_msr(index, write), write) {
                        (Some(apic), _) => apic,
                        (None, None) => msr_read(&self.vcpu, index),
                        (None, Some(v)) => msr_write(&self.vcpu, index, v).then_some(v),
                    };
                    finish_msr(&mut self.vcpu, index, write, result);
                }
                Err(Pending::Trap(port)) => {
                    let trap = complete_trap(&mut self.vcpu, env.patches, env.mem)?;
                    match &trap.site {
                        Some(site) if site.kind == crate::patch::TrapKind::Cpuid => {
                            emulate_cpuid_trap(&self.vcpu, &self.cpuid, site, trap.regs, &trap.sregs)?;
                        }
                        Some(site) => {
                            let reason = format!(
                                "reached a patched {:?} site, which only record and replay patch",
                                site.kind
                            );
                            return self.crash(env, reason);
                        }
                        None => {
                            self.unknown.note(false, u64::from(port), true, 1);
                            unknown_trap_write(port, trap.regs.rip);
                        }
                    }
                }
            }
        }
    }

    /// INIT, start-up and NMI messages left for this CPU.
    fn take_signals(&mut self, env: &ApEnv<'_>) -> Result<(), Error> {
        let s = env.platform.take_signals();
        if s.init {
            self.state = ApState::WaitForSipi;
        }
        if let Some(vector) = s.sipi {
            if self.state == ApState::WaitForSipi {
                self.start_at(vector)?;
                self.state = ApState::Running;
            }
        }
        if s.nmi && self.state != ApState::WaitForSipi {
            self.vcpu.nmi().map_err(kvm_err("KVM_NMI"))?;
            self.state = ApState::Running;
        }
        Ok(())
    }

    /// Starts the CPU as a start-up IPI does.
    fn start_at(&mut self, vector: u8) -> Result<(), Error> {
        self.start_vcpu_at(None, vector)
    }

    /// Starts the CPU (whose vCPU is `vcpu`, or its own) as a start-up IPI
    /// does: its reset state, in real mode at `vector << 12` (CS = vector
    /// << 8, IP = 0).
    pub(super) fn start_vcpu_at(&mut self, vcpu: Option<&mut VcpuFd>, vector: u8) -> Result<(), Error> {
        let vcpu = vcpu.unwrap_or(&mut self.vcpu);
        let mut sregs = self.reset_sregs;
        sregs.cs.selector = u16::from(vector) << 8;
        sregs.cs.base = u64::from(vector) << 12;
        let mut regs = self.reset_regs;
        regs.rip = 0;
        vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        crate::vcpu_state::reset_fpu(vcpu).map_err(kvm_err("KVM_SET_FPU"))?;
        tracing::debug!(cpu = self.index, vector, "started by a start-up IPI");
        Ok(())
    }

    /// A new clock sample; the devices polled if a deadline passed.
    fn step(&self, env: &ApEnv<'_>) {
        env.clock.next_step();
        if env.platform.next_deadline_ns().is_some_and(|d| env.clock.now_ns() >= d) {
            env.platform.poll();
        }
    }

    /// Injects what the local APIC holds if the guest can take it, or asks
    /// for an interrupt window.
    fn inject(&mut self, env: &ApEnv<'_>) -> Result<(), Error> {
        let ready = self.vcpu.get_kvm_run().ready_for_interrupt_injection != 0;
        if ready && env.platform.interrupt_pending() {
            inject_interrupt(&self.vcpu, env.platform.acknowledge())?;
            self.stats.injected += 1;
        }
        self.vcpu.get_kvm_run().request_interrupt_window = u8::from(env.platform.interrupt_pending());
        Ok(())
    }

    /// Idles in HLT until an interrupt or a signal is there for this CPU,
    /// or the run ends; polls the devices at their deadlines meanwhile.
    /// A stop leaves the AP [`ApState::Idle`], to idle on when resumed.
    fn idle(&mut self, env: &ApEnv<'_>) {
        while !env.smp.is_stopping() && !env.platform.interrupt_pending() && !env.platform.has_signals() {
            env.smp
                .bell(self.index)
                .wait(env.smp.host_ns(env.platform.next_deadline_ns()));
            self.step(env);
        }
        if env.platform.interrupt_pending() || env.platform.has_signals() {
            self.state = ApState::Running;
        }
    }

    fn take_cr8(&mut self, env: &ApEnv<'_>) {
        if let Some(entered) = self.cr8_entered.take() {
            let now = self.vcpu.get_kvm_run().cr8 as u8;
            if now != entered {
                env.platform.sync_cr8(now);
            }
        }
    }

    /// Ends the run: this CPU crashed.
    fn crash(&mut self, env: &ApEnv<'_>, reason: String) -> Result<(), Error> {
        let regs = self.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = self.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let reason = format!("vCPU {}: {reason}", self.index);
        let report = CrashReport::new(reason, &regs, &sregs, env.mem);
        env.smp.finish(Ok(RunOutcome::Crashed(Box::new(report))));
        Ok(())
    }
}

/// What a `KVM_EXIT_INTERNAL_ERROR` means, from its suberror.
pub(super) fn internal_error_reason(vcpu: &mut VcpuFd) -> String {
    let run = vcpu.get_kvm_run();
    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the `internal`
    // member of the union is the valid one.
    let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
    let what = match suberror {
        1 => "emulation failure (a triple fault shows up this way on emulated KVM)",
        2 => "simultaneous exceptions",
        3 => "delivery event",
        _ => "internal error",
    };
    format!("KVM internal error, suberror {suberror}: {what}")
}

impl ExitStats {
    /// Adds `other`'s counts (another vCPU's) to these; times are the
    /// calling vCPU's own and stay.
    fn add_exits(&mut self, other: &ExitStats) {
        self.pio += other.pio;
        self.mmio += other.mmio;
        self.hlt += other.hlt;
        self.irq_window += other.irq_window;
        self.msr += other.msr;
        self.kicks += other.kicks;
        self.injected += other.injected;
        self.soft_interrupts += other.soft_interrupts;
    }
}

impl Machine {
    /// Runs every vCPU, the APs on threads of their own, until one of them
    /// ends the run (or all halt for good), or the BSP stops as
    /// [`Machine::resume`] does: then every AP stops too (all stop), after
    /// the exit it is handling, and the machine can be saved or resumed.
    pub(super) fn resume_smp(&mut self) -> Result<Stop, Error> {
        self.prepare_thread()?;
        nyx_devices::cpu::set_current(0);
        // A plain run's virtual time is the host's since its origin.
        let origin = self.hooks.kick_at(Some(0)).unwrap_or_else(monotonic_ns);
        let parked = std::iter::once(false).chain(self.aps.iter().map(|ap| ap.state.parked()));
        let smp = Arc::new(Smp::new(parked.collect(), origin));
        smp.bell(0).set_kicker(Some(self.kicker()?));
        self.core.platform.set_waker(Some(smp.clone()));
        self.smp = Some(smp.clone());
        let mut aps = std::mem::take(&mut self.aps);
        let platform = self.core.platform.clone();
        let clock = self.core.clock.clone();
        let patches = self.core.patches.clone();
        let mem = self.core.mem.clone();
        let env = ApEnv {
            smp: &smp,
            platform: &platform,
            clock: &clock,
            patches: &patches,
            mem: &mem,
        };
        let result = std::thread::scope(|s| {
            let mut threads = Vec::new();
            let mut spawned = Ok(());
            for ap in aps.iter_mut() {
                let env = &env;
                let name = format!("nyx-vcpu{}", ap.index);
                match std::thread::Builder::new()
                    .name(name)
                    .spawn_scoped(s, move || ap.run(env))
                {
                    Ok(t) => threads.push(t),
                    Err(e) => {
                        spawned = Err(Error::Host(e));
                        break;
                    }
                }
            }
            let bsp = spawned.and_then(|()| self.resume_one());
            match &bsp {
                Ok(Stop::Ended(outcome)) => smp.finish(Ok(outcome.clone())),
                Ok(_) => smp.stop(),
                Err(e) => smp.finish(Err(e.to_string())),
            }
            let mut failed = None;
            for t in threads {
                match t.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        failed.get_or_insert(e);
                    }
                    Err(_) => {
                        failed.get_or_insert(Error::Smp("a vCPU thread panicked".into()));
                    }
                }
            }
            match failed {
                Some(e) if bsp.is_ok() => Err(e),
                _ => bsp,
            }
        });
        for ap in &mut aps {
            self.core.stats.add_exits(&ap.stats);
            ap.stats = ExitStats::default();
        }
        self.aps = aps;
        smp.bell(0).set_kicker(None);
        self.core.platform.set_waker(None);
        self.smp = None;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rung_doorbell_ends_the_wait_and_is_taken_once() {
        let bell = Doorbell::default();
        bell.ring();
        let start = std::time::Instant::now();
        bell.wait(None);
        assert!(start.elapsed() < RECHECK, "a rung bell does not wait");
        assert!(!bell.take(), "the wait took the ring");
        bell.ring();
        assert!(bell.take());
        assert!(!bell.take());
    }

    #[test]
    fn the_first_end_is_kept_and_parking_is_counted_per_ap() {
        let smp = Smp::new(vec![false, true, true], 0);
        assert!(smp.aps_parked(), "APs start parked");
        smp.set_parked(1, false);
        assert!(!smp.aps_parked());
        assert!(!smp.bell(0).take(), "the BSP hears of parking only");
        smp.set_parked(1, true);
        assert!(smp.aps_parked());
        assert!(smp.bell(0).take(), "an AP parking rings the BSP");
        assert!(smp.ended().is_none());
        smp.finish(Ok(RunOutcome::DebugExit(5)));
        smp.finish(Err("later".into()));
        assert_eq!(smp.ended(), Some(Ok(RunOutcome::DebugExit(5))));
        assert!(smp.bell(1).take() && smp.bell(2).take(), "the end rings the others");
        assert_eq!(smp.host_ns(Some(7)), Some(7));
    }
}
