//! The run loop: enter the guest, handle its exit, let the mode's hooks
//! see it, inject interrupts, idle in HLT until the next deadline.

use super::exit::ExitIo;
use super::*;

impl Machine {
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

    /// After a guest-caused exit: whether the run ends here, by one of its
    /// limits or because the mode says so (a replay ends where its
    /// recording was stopped).
    fn limit_reached(&mut self) -> Option<RunOutcome> {
        if let Some(outcome) = self.hooks.end_here() {
            return Some(outcome);
        }
        if let Some(text) = &self.limits.until_output {
            if self.output_watch.lock().unwrap_or_else(|e| e.into_inner()).seen() {
                return Some(RunOutcome::Limit(crate::events::Limit::Output(text.clone())));
            }
        }
        match self.limits.max_guest_ns {
            Some(max) if self.core.clock.last() >= max => Some(RunOutcome::Limit(crate::events::Limit::GuestTime(max))),
            _ => None,
        }
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
        // A replay injects where its recording did, whatever kvm_run says:
        // on emulated KVM its readiness flag after a completed trap is not
        // always what it was in the recording (KVM_INTERRUPT queues the
        // vector either way, and KVM delivers it at the next entry).
        let ready = self.core.vcpu.get_kvm_run().ready_for_interrupt_injection != 0 || self.hooks.injection_due();
        // Not beside an NMI handed over in this step (machine/serial.rs).
        let nmi = self.serial.as_ref().is_some_and(|s| s.nmi_step);
        if pending && ready && !nmi && self.hooks.may_inject() {
            let vector = self.core.platform.acknowledge();
            let mut ctx = self.core.ctx();
            self.hooks.on_inject(&mut ctx, vector)?;
            inject_interrupt(&self.core.vcpu, vector)?;
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
        // An interrupt that waited for the guest to enable interrupts (an
        // emulated KVM may run `sti; hlt` without reporting the window)
        // wakes it at once, before time passes or another device raises a
        // higher-priority one in its place.
        if self.wake_pending() {
            return Ok(Idle::Interrupt);
        }
        loop {
            let deadline = self.core.platform.next_deadline_ns();
            let input = self.core.platform.input_may_arrive();
            let smp = self.smp.clone();
            if smp.as_ref().is_some_and(|s| s.ended().is_some()) {
                return Ok(Idle::Ended);
            }
            // With several vCPUs, another one may still send an interrupt.
            if deadline.is_none() && !input && smp.as_ref().is_none_or(|s| s.aps_parked()) {
                return Ok(Idle::Never);
            }
            if let Some(t) = &self.timer {
                if t.take_request() {
                    return Ok(Idle::Stopped);
                }
            }
            match &smp {
                Some(s) => s.bell(0).wait(s.host_ns(deadline)),
                None => self.hooks.idle_wait(&self.core.clock, deadline, input),
            }
            self.step(true)?;
            if self.wake_pending() {
                return Ok(Idle::Interrupt);
            }
        }
    }

    /// Whether an interrupt ends an idle wait: one for the vCPU, or, on a
    /// machine running its vCPUs one at a time, for any vCPU in HLT.
    fn wake_pending(&self) -> bool {
        match &self.serial {
            Some(_) => self.serial_wake_pending(),
            None => self.core.platform.interrupt_pending(),
        }
    }

    /// What the loop does after an idle wait in HLT: go on (None), or
    /// return this (a stop request leaves the guest idle, to idle on when
    /// resumed).
    fn after_idle(&mut self, idle: Idle) -> Option<Result<Stop, Error>> {
        match idle {
            Idle::Interrupt => None,
            Idle::Never => Some(Ok(Stop::Ended(RunOutcome::Halted))),
            Idle::Stopped => {
                self.idle_stopped = true;
                Some(Ok(Stop::Interrupted))
            }
            Idle::Ended => Some(self.smp_end().map(Stop::Ended)),
        }
    }

    /// How the run ended on another vCPU (a failure there is an error here).
    fn smp_end(&self) -> Result<RunOutcome, Error> {
        match self.smp.as_ref().and_then(|s| s.ended()) {
            Some(Ok(outcome)) => Ok(outcome),
            Some(Err(message)) => Err(Error::Smp(message)),
            None => Ok(RunOutcome::Halted),
        }
    }

    /// The BSP halted with interrupts disabled: the run ends as halted,
    /// once every AP is parked too, unless another vCPU ends it first.
    fn halted_for_good(&mut self) -> Result<Stop, Error> {
        let Some(smp) = self.smp.clone() else {
            return Ok(Stop::Ended(RunOutcome::Halted));
        };
        loop {
            if smp.ended().is_some() {
                return self.smp_end().map(Stop::Ended);
            }
            if smp.aps_parked() {
                return Ok(Stop::Ended(RunOutcome::Halted));
            }
            if self.timer.as_ref().is_some_and(|t| t.take_request()) {
                self.halted_stopped = true;
                return Ok(Stop::Interrupted);
            }
            smp.bell(0).wait(None);
        }
    }

    /// Sleeps in ACPI state S1 or S3 until a wake event (the power button,
    /// `nyx ctl wake`, an RTC alarm the guest enabled as a wake source):
    /// devices go on being polled at their deadlines meanwhile, so a
    /// recording logs the polls and the event where they happen. Waking
    /// from S1 goes on after the instruction that slept; from S3, whose
    /// CPU context is lost, at the waking vector the guest put in the FACS,
    /// in real mode, as firmware does.
    fn sleep(&mut self) -> Result<Idle, Error> {
        let Some(state) = self.sleeping else {
            return Ok(Idle::Interrupt);
        };
        loop {
            if self.core.platform.take_wake() {
                self.sleeping = None;
                tracing::info!(state, "woken from sleep");
                if state != 1 {
                    self.resume_at_waking_vector()?;
                }
                return Ok(Idle::Interrupt);
            }
            let deadline = self.core.platform.next_deadline_ns();
            let input = self.core.platform.input_may_arrive();
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
        }
    }

    /// After an exit: a `mov cr8` the guest made since the last entry
    /// changes the local APIC's TPR before anything looks at it.
    fn take_guest_cr8(&mut self) {
        if let Some(entered) = self.cr8_entered.take() {
            let now = self.core.vcpu.get_kvm_run().cr8 as u8;
            if now != entered {
                self.core.platform.sync_cr8(now);
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
    /// With several vCPUs in parallel, the APs run on threads of their own
    /// while the BSP runs here, and a stop stops every one of them (all
    /// stop): the machine can then be captured, saved or migrated.
    pub fn resume(&mut self) -> Result<Stop, Error> {
        if !self.aps.is_empty() && self.serial.is_none() {
            return self.resume_smp();
        }
        self.resume_one()
    }

    /// [`Machine::resume`] of the vCPU this thread runs: the only one, the
    /// running one of several run one at a time, or the BSP beside the
    /// APs' threads.
    pub(super) fn resume_one(&mut self) -> Result<Stop, Error> {
        self.prepare_thread()?;
        // This thread acts for the running vCPU (it may have run another
        // machine's before), and its kicks go to that vCPU.
        nyx_devices::cpu::set_current(self.core.vcpu_index);
        if let Some(t) = self.timer.as_mut() {
            let run: *mut kvm_bindings::kvm_run = self.core.vcpu.get_kvm_run();
            // SAFETY: the running vCPU's kvm_run, owned by the machine,
            // which drops its timer first.
            unsafe { t.retarget(run) };
        }
        let wall = std::time::Instant::now();
        let (user, sys) = thread_cpu_ns();
        self.hold_slice(false);
        let result = self.run_loop();
        self.hold_slice(true);
        // A stopped machine's TPR is what its guest last set.
        self.take_guest_cr8();
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
}

impl Machine {
    fn run_loop(&mut self) -> Result<Stop, Error> {
        if self.sleeping.is_some() {
            match self.sleep()? {
                Idle::Interrupt => {}
                Idle::Never => return Ok(Stop::Ended(RunOutcome::Halted)),
                Idle::Stopped => return Ok(Stop::Interrupted),
                Idle::Ended => return self.smp_end().map(Stop::Ended),
            }
        }
        if std::mem::take(&mut self.halted_stopped) {
            return self.halted_for_good();
        }
        if std::mem::take(&mut self.idle_stopped) {
            let idle = self.idle()?;
            if let Some(stop) = self.after_idle(idle) {
                return stop;
            }
        }
        loop {
            self.take_guest_cr8();
            // A kick that led to nothing (its deadline had not passed) is not
            // a step: the replay never sees it, so it must not start a new
            // clock sample or an injection decision here either.
            if !std::mem::take(&mut self.spurious_kick) {
                // After a debug stop the guest goes on in the step it was in.
                if !std::mem::take(&mut self.mid_step) {
                    let poll = std::mem::take(&mut self.poll_pending);
                    self.step(poll)?;
                    // A debugger single-stepping a replay may have let the
                    // last vCPU run free (HLT is not stepped): it sets the
                    // new vCPU up before it runs, and the guest goes on in
                    // this step when resumed.
                    if self.serial.is_some() && self.schedule_point()? && self.hooks.pause_after_switch() {
                        self.mid_step = true;
                        return Ok(Stop::Paused);
                    }
                }
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
                        // A landing is a position too: a reverse debugger
                        // may take a checkpoint here (early kernel boot runs
                        // for seconds with landings and no exits).
                        if self.hooks.pause_after_landing() {
                            return Ok(Stop::Paused);
                        }
                        continue;
                    }
                    Enter::Stop(d) => {
                        self.set_guest_debug(self.debug)?;
                        self.mid_step = true;
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
            let kick = match (kick, self.preempt_at()) {
                (Some(k), Some(p)) => Some(k.min(p)),
                (k, p) => k.or(p),
            };
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
            // With the local APIC in user space KVM takes CR8 from kvm_run
            // at every entry and reports it back at every exit.
            self.cr8_entered = c.platform.cr8();
            if let Some(cr8) = self.cr8_entered {
                c.vcpu.get_kvm_run().cr8 = u64::from(cr8);
            }
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
                    // Another vCPU left an interrupt here, or ended the run.
                    let nudged = self.smp.as_ref().is_some_and(|s| s.bell(0).take());
                    self.spurious_kick = !self.poll_pending && !nudged;
                    if self.smp.as_ref().is_some_and(|s| s.ended().is_some()) {
                        return self.smp_end().map(Stop::Ended);
                    }
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
            // A software interrupt KVM could not execute is delivered here,
            // and is then an exit like any other.
            self.stopped_int3 = false;
            let next = match next {
                Ok((None, Next::InternalError)) => match self.deliver_soft_interrupt()? {
                    Some(super::soft_int::SoftIntEnd::Delivered(rec)) => Ok((Some(rec), Next::Continue)),
                    Some(super::soft_int::SoftIntEnd::Breakpoint(d)) => Ok((None, Next::Debug(d))),
                    None => Ok((None, Next::InternalError)),
                },
                other => other,
            };
            match next {
                Ok((_, Next::Debug(d))) => {
                    self.mid_step = true;
                    return Ok(Stop::Debug(d));
                }
                Ok((rec, next)) => {
                    self.core.exit_seq += 1;
                    let rec = match rec {
                        Some(mut r) => {
                            // Not for interrupt-window exits: an emulated KVM
                            // may report the window a few instructions late,
                            // at the end of an emulation batch, so their RIP
                            // is not part of the guest's deterministic path.
                            if self.core.sync_rip && !matches!(r.kind, ExitKind::IrqWindow | ExitKind::SoftInt) {
                                r.rip = self.core.vcpu.sync_regs().regs.rip;
                            }
                            r
                        }
                        None => self.finish_special_exit()?,
                    };
                    let mut ctx = self.core.ctx();
                    self.hooks.on_exit(&mut ctx, &rec)?;
                    self.core.metrics.exit(&rec, handled_from);
                    if matches!(next, Next::Continue | Next::Hlt) {
                        if let Some(outcome) = self.limit_reached() {
                            return Ok(Stop::Ended(outcome));
                        }
                    }
                    match next {
                        Next::Continue if self.hooks.pause_after_exit() => return Ok(Stop::Paused),
                        Next::Continue => {}
                        Next::Hlt if self.serial.is_some() => {
                            let if_flag = self.core.vcpu.get_kvm_run().if_flag != 0;
                            match self.after_hlt(if_flag) {
                                super::serial::AfterHlt::Go => {}
                                super::serial::AfterHlt::Halted => return Ok(Stop::Ended(RunOutcome::Halted)),
                                super::serial::AfterHlt::Idle => {
                                    let idle = self.idle()?;
                                    if let Some(stop) = self.after_idle(idle) {
                                        return stop;
                                    }
                                }
                            }
                        }
                        Next::Hlt if self.core.vcpu.get_kvm_run().if_flag == 0 => return self.halted_for_good(),
                        Next::Hlt => {
                            let idle = self.idle()?;
                            if let Some(stop) = self.after_idle(idle) {
                                return stop;
                            }
                        }
                        Next::Debug(d) => return Ok(Stop::Debug(d)),
                        Next::InternalError => {
                            let reason = super::ap::internal_error_reason(&mut self.core.vcpu);
                            return self.crash(reason).map(Stop::Ended);
                        }
                        Next::End(outcome) => return Ok(Stop::Ended(outcome)),
                        Next::Sleep(state) => {
                            tracing::info!(state, "the guest put the machine to sleep");
                            self.sleeping = Some(state);
                            match self.sleep()? {
                                Idle::Interrupt => {}
                                Idle::Never => return Ok(Stop::Ended(RunOutcome::Halted)),
                                Idle::Stopped => return Ok(Stop::Interrupted),
                                Idle::Ended => return self.smp_end().map(Stop::Ended),
                            }
                        }
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
                    if let Some(outcome) = self.limit_reached() {
                        return Ok(Stop::Ended(outcome));
                    }
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

#[cfg(test)]
#[path = "run_loop_tests.rs"]
mod tests;
