//! Running the vCPUs of a machine one at a time, on one thread: how a
//! machine with several vCPUs is recorded and replayed.
//!
//! As in rr and QEMU's record/replay, only one vCPU runs at any moment, so
//! the order of the guest's memory accesses across vCPUs is the order of
//! the time slices, and that order is what the trace logs: an
//! [`crate::events::Event::Switch`] wherever the running vCPU changes. The
//! machine's own vCPU (`core.vcpu`) is the running one; switching swaps it
//! with the AP's slot ([`super::ap::ApVcpu::vcpu`]), tells the interrupt
//! controllers which CPU now acts ([`nyx_devices::cpu::set_current`]) and
//! points the kick timer at the new vCPU's `kvm_run`.
//!
//! Switches happen only at the start of a step of the run loop, after an
//! exit or a landing, which the replay reaches exactly. A recording
//! ([`RunHooks::schedules`]) chooses round-robin among the runnable vCPUs
//! when the running one halts or parks, or when its time slice
//! ([`SLICE_NS`] of host time) is over: the slice's end is a kick, whose
//! stop is logged as a landing like a timer's. A replay switches where the
//! trace says. The INIT, start-up and NMI messages left for any vCPU are
//! taken at every such point, in both.

use super::ap::ApState;
use super::*;
use crate::kick::monotonic_ns;
use crate::snapshot::ScheduleState;

/// A recording's time slice: how long one vCPU runs while another could.
pub const SLICE_NS: u64 = 10_000_000;

/// Where a vCPU is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CpuState {
    /// An AP after power-on or INIT: waiting for a start-up IPI.
    WaitForSipi,
    /// Runnable.
    Running,
    /// In HLT with interrupts enabled: runnable once an interrupt is pending.
    Hlt,
    /// In HLT with interrupts disabled: only INIT or an NMI goes on.
    Parked,
}

/// In a [`ScheduleState`]'s code of a vCPU: an NMI waits for it.
const NMI_WAITS: u8 = 0x80;

impl CpuState {
    /// What an AP thread of a parallel run calls this state.
    fn of_ap(state: ApState) -> Self {
        match state {
            ApState::WaitForSipi => CpuState::WaitForSipi,
            ApState::Running => CpuState::Running,
            ApState::Idle => CpuState::Hlt,
            ApState::Halted => CpuState::Parked,
        }
    }

    /// The state of an AP thread of a parallel run in this state.
    fn to_ap(self) -> ApState {
        match self {
            CpuState::WaitForSipi => ApState::WaitForSipi,
            CpuState::Running => ApState::Running,
            CpuState::Hlt => ApState::Idle,
            CpuState::Parked => ApState::Halted,
        }
    }

    /// The state a [`ScheduleState`] stores as `code` (`self as u8`).
    fn from_u8(code: u8) -> Option<Self> {
        [
            CpuState::WaitForSipi,
            CpuState::Running,
            CpuState::Hlt,
            CpuState::Parked,
        ]
        .get(usize::from(code))
        .copied()
    }
}

/// What a machine that runs its vCPUs one at a time keeps of them.
pub(crate) struct Serial {
    /// Each vCPU's run state (which one runs is `Core::vcpu_index`).
    states: Vec<CpuState>,
    /// An NMI was sent to the vCPU and waits until it next runs: it is
    /// handed to KVM (`KVM_NMI`) just before that entry, so that KVM never
    /// holds an NMI for a vCPU that is not running (a checkpoint taken
    /// then would restore it as pending rather than queued, which KVM may
    /// deliver in another order beside an injected interrupt).
    nmis: Vec<bool>,
    /// This step handed the running vCPU an NMI: no interrupt is injected
    /// beside it. Injected together, KVM would deliver the interrupt first
    /// and the NMI at the next NMI window, which the emulated KVM opens a
    /// varying number of instructions later (as it does interrupt windows).
    pub(super) nmi_step: bool,
    /// Host monotonic ns at which the running vCPU's slice ends.
    slice_end_ns: u64,
    /// While the machine is stopped: what was left of the running vCPU's
    /// slice (a stop in a debugger does not use it up).
    slice_left_ns: Option<u64>,
}

impl Serial {
    /// `cpus` vCPUs at power-on: the BSP runs, the APs wait for a start-up IPI.
    pub(super) fn new(cpus: usize) -> Self {
        Serial {
            states: (0..cpus)
                .map(|c| {
                    if c == 0 {
                        CpuState::Running
                    } else {
                        CpuState::WaitForSipi
                    }
                })
                .collect(),
            nmis: vec![false; cpus],
            nmi_step: false,
            slice_end_ns: monotonic_ns() + SLICE_NS,
            slice_left_ns: None,
        }
    }
}

/// What the run loop does after the running vCPU executed HLT.
pub(super) enum AfterHlt {
    /// Go on: to another vCPU, or this one has an interrupt.
    Go,
    /// Every vCPU waits for an interrupt: idle until one comes.
    Idle,
    /// Every vCPU halted for good.
    Halted,
}

impl Machine {
    fn serial_ref(&self) -> &Serial {
        self.serial.as_ref().expect("a machine running its vCPUs one at a time")
    }

    fn serial_mut(&mut self) -> &mut Serial {
        self.serial.as_mut().expect("a machine running its vCPUs one at a time")
    }

    /// Whether vCPU `cpu` could run now.
    fn runnable(&self, cpu: usize) -> bool {
        match self.serial_ref().states[cpu] {
            CpuState::Running => true,
            CpuState::Hlt => self.core.platform.interrupt_pending_of(cpu),
            CpuState::WaitForSipi | CpuState::Parked => false,
        }
    }

    /// Whether a vCPU in HLT has an interrupt now (what ends an idle wait
    /// of a machine running its vCPUs one at a time).
    pub(super) fn serial_wake_pending(&self) -> bool {
        let s = self.serial_ref();
        (0..s.states.len()).any(|c| s.states[c] == CpuState::Hlt && self.core.platform.interrupt_pending_of(c))
    }

    /// Takes the INIT, start-up and NMI messages left for every vCPU.
    fn take_all_signals(&mut self) -> Result<(), Error> {
        let current = self.core.vcpu_index;
        for cpu in 0..self.serial_ref().states.len() {
            let signals = self.core.platform.take_signals_of(cpu);
            if signals == Default::default() {
                continue;
            }
            let mut state = self.serial_ref().states[cpu];
            // INIT and start-up reach APs only (a BSP INIT would reset
            // the machine, which no guest of Nyx's asks this way).
            if cpu != 0 {
                if signals.init {
                    state = CpuState::WaitForSipi;
                }
                if let (Some(vector), CpuState::WaitForSipi) = (signals.sipi, state) {
                    let ap = &mut self.aps[cpu - 1];
                    let vcpu = (cpu == current).then_some(&mut self.core.vcpu);
                    ap.start_vcpu_at(vcpu, vector)?;
                    state = CpuState::Running;
                }
            }
            if signals.nmi && state != CpuState::WaitForSipi {
                self.serial_mut().nmis[cpu] = true;
                state = CpuState::Running;
            }
            self.serial_mut().states[cpu] = state;
        }
        Ok(())
    }

    /// Where vCPU `cpu`'s file descriptor is now: None in the machine's
    /// place (it runs), else the AP slot holding it (the BSP's sits in the
    /// running AP's slot).
    fn slot_of(&self, cpu: usize) -> Option<usize> {
        let current = self.core.vcpu_index;
        match cpu {
            c if c == current => None,
            0 => Some(current - 1),
            c => Some(c - 1),
        }
    }

    /// vCPU `cpu`'s file descriptor, wherever it is now.
    pub(super) fn vcpu_of(&mut self, cpu: usize) -> &mut VcpuFd {
        match self.slot_of(cpu) {
            None => &mut self.core.vcpu,
            Some(slot) => &mut self.aps[slot].vcpu,
        }
    }

    /// A recording's choice at a switch point: the next runnable vCPU
    /// round-robin, when the running one cannot run or its slice is over.
    fn proposal(&mut self) -> Option<u8> {
        let (current, n) = (self.core.vcpu_index, self.serial_ref().states.len());
        let now = monotonic_ns();
        if self.runnable(current) && now < self.serial_ref().slice_end_ns {
            return None;
        }
        // A debugger's single step runs the vCPU it stepped: gdb steps
        // over a breakpoint in one thread and expects the stop there.
        if self.debug.single_step && self.runnable(current) {
            return None;
        }
        // Not away from a vCPU that holds an event KVM has not delivered
        // yet (an interrupt injected just before the kick, an NMI): KVM
        // keeps part of that outside the state a checkpoint can save and
        // restore alike, so a re-execution from a checkpoint taken while
        // the vCPU waits would deliver it elsewhere. Its next slice ends
        // after the delivery.
        if self.runnable(current) && self.holds_undelivered_event() {
            return None;
        }
        match (1..n).map(|k| (current + k) % n).find(|&c| self.runnable(c)) {
            Some(next) => Some(next as u8),
            None => {
                // Alone: a new slice.
                self.serial_mut().slice_end_ns = now + SLICE_NS;
                None
            }
        }
    }

    /// Whether the running vCPU holds an injected interrupt or an NMI that
    /// KVM has not delivered yet (true also when KVM cannot tell).
    fn holds_undelivered_event(&self) -> bool {
        match self.core.vcpu.get_vcpu_events() {
            Ok(e) => {
                e.interrupt.injected != 0 || e.nmi.injected != 0 || e.nmi.pending != 0 || e.exception.injected != 0
            }
            Err(_) => true,
        }
    }

    /// The switch point at the start of a step: signals taken, then the
    /// mode's choice of vCPU applied. Returns whether the vCPU changed.
    pub(super) fn schedule_point(&mut self) -> Result<bool, Error> {
        self.take_all_signals()?;
        let proposal = if self.hooks.schedules() { self.proposal() } else { None };
        let before = self.current_vcpu();
        let mut ctx = self.core.ctx();
        if let Some(to) = self.hooks.schedule(&mut ctx, proposal)? {
            self.switch_to(usize::from(to))?;
        }
        let switched = self.current_vcpu() != before;
        let current = self.core.vcpu_index;
        if self.serial_ref().states[current] == CpuState::Hlt && self.core.platform.interrupt_pending_of(current) {
            self.serial_mut().states[current] = CpuState::Running;
        }
        let nmi = std::mem::take(&mut self.serial_mut().nmis[current]);
        if nmi {
            self.core.vcpu.nmi().map_err(kvm_err("KVM_NMI"))?;
        }
        self.serial_mut().nmi_step = nmi;
        Ok(switched)
    }

    /// Makes vCPU `to` the running one.
    fn switch_to(&mut self, to: usize) -> Result<(), Error> {
        let (current, n) = (self.core.vcpu_index, self.serial_ref().states.len());
        if to >= n {
            return Err(Error::Smp(format!(
                "a switch to vCPU {to}, but the machine has {n} vCPUs"
            )));
        }
        if to == current {
            return Ok(());
        }
        // The vCPU leaving has its last exit completed now, at the point
        // where the recording and the replay both switch: KVM finishes a
        // port or MMIO access (RIP past it, a read's value in place) only
        // at the vCPU's next entry, and a waiting vCPU captured before
        // that would re-execute the access when restored.
        crate::vcpu_state::complete_pending_exit(&mut self.core.vcpu)
            .map_err(vcpu_err("complete the pending exit of"))?;
        self.swap_in(to)?;
        let s = self.serial_mut();
        if s.states[to] == CpuState::Hlt {
            s.states[to] = CpuState::Running;
        }
        s.slice_end_ns = monotonic_ns() + SLICE_NS;
        Ok(())
    }

    /// Puts vCPU `to` (< the machine's vCPUs) in the machine's place: the
    /// running one back to its slot, then `to` in; the controllers and the
    /// kick timer follow.
    fn swap_in(&mut self, to: usize) -> Result<(), Error> {
        let current = self.core.vcpu_index;
        if current != 0 {
            std::mem::swap(&mut self.core.vcpu, &mut self.aps[current - 1].vcpu);
        }
        if to != 0 {
            std::mem::swap(&mut self.core.vcpu, &mut self.aps[to - 1].vcpu);
        }
        nyx_devices::cpu::set_current(to);
        self.core.vcpu_index = to;
        if let Some(t) = self.timer.as_mut() {
            let run: *mut kvm_bindings::kvm_run = self.core.vcpu.get_kvm_run();
            // SAFETY: `run` is the kvm_run mapping of a vCPU the machine
            // owns (in `core` or `aps`, both dropped after `timer`).
            unsafe { t.retarget(run) };
        }
        // A debugger's breakpoints and stepping live in each vCPU's debug
        // registers: the running one gets the machine's (none, when the
        // debugger took them away while this vCPU waited).
        self.set_guest_debug(self.debug)
    }

    /// Every vCPU's state (BSP, APs) and, with several, where each is
    /// (the schedule), each pending exit completed first (what a
    /// checkpoint or a snapshot holds). A machine running its vCPUs in
    /// parallel is captured at a stop of [`Machine::resume`], when every
    /// AP thread has returned; its schedule names the BSP as running.
    pub(super) fn capture_vcpus(
        &mut self,
    ) -> Result<
        (
            crate::vcpu_state::VcpuState,
            Vec<crate::vcpu_state::VcpuState>,
            Option<ScheduleState>,
        ),
        Error,
    > {
        let n = 1 + self.aps.len();
        let msr_list = self.core.msr_list.clone();
        let mut states = Vec::with_capacity(n);
        let current = self.current_vcpu();
        let parallel = self.serial.is_none();
        for cpu in 0..n {
            let vcpu = self.vcpu_of(cpu);
            // An exit KVM has not completed yet would be lost: the running
            // vCPU's is completed, and so is every AP's of a parallel run
            // (each stopped after an exit it handled). A waiting vCPU of a
            // machine run one at a time had its exit completed when it was
            // switched out (`switch_to`); it is not run again out of turn.
            if cpu == current || parallel {
                crate::vcpu_state::complete_pending_exit(vcpu).map_err(vcpu_err("complete the pending exit of"))?;
            }
            states.push(crate::vcpu_state::capture(vcpu, &msr_list).map_err(vcpu_err("capture"))?);
        }
        let bsp = states.remove(0);
        let code = |c: CpuState, nmi: bool| c as u8 | if nmi { NMI_WAITS } else { 0 };
        let schedule = match &self.serial {
            Some(s) => Some(ScheduleState {
                current: self.core.vcpu_index as u8,
                states: s.states.iter().zip(&s.nmis).map(|(&c, &nmi)| code(c, nmi)).collect(),
            }),
            None if n > 1 => {
                let bsp = match (self.idle_stopped, self.halted_stopped) {
                    (true, _) => CpuState::Hlt,
                    (_, true) => CpuState::Parked,
                    _ => CpuState::Running,
                };
                let aps = self.aps.iter().map(|ap| code(CpuState::of_ap(ap.state), ap.nmi_waits));
                Some(ScheduleState {
                    current: 0,
                    states: std::iter::once(code(bsp, false)).chain(aps).collect(),
                })
            }
            None => None,
        };
        Ok((bsp, states, schedule))
    }

    /// Puts every vCPU and the schedule back to `state`'s (the devices are
    /// the caller's, and so is completing the running vCPU's exit first:
    /// KVM refuses register changes before that). A state of another
    /// number of vCPUs is an error. A state captured with the vCPUs run
    /// one at a time restores into a machine that runs them in parallel
    /// and the other way round: the schedule says where each vCPU is,
    /// which is what both kinds go on from.
    pub(super) fn restore_vcpus(&mut self, state: &crate::snapshot::MachineState) -> Result<(), Error> {
        let n = 1 + self.aps.len();
        if state.aps.len() + 1 != n {
            return Err(Error::Smp(format!(
                "the saved state has {} vCPUs, the machine {n}",
                state.aps.len() + 1
            )));
        }
        if n > 1 && state.schedule.is_none() {
            return Err(Error::Smp(format!(
                "the saved state of {n} vCPUs does not say where each is (no schedule)"
            )));
        }
        let schedule = match &state.schedule {
            Some(s) => {
                let states = s
                    .states
                    .iter()
                    .map(|&c| CpuState::from_u8(c & !NMI_WAITS))
                    .collect::<Option<Vec<_>>>()
                    .filter(|v| v.len() == n && usize::from(s.current) < n)
                    .ok_or_else(|| Error::Smp(format!("a saved schedule for {n} vCPUs is malformed: {s:?}")))?;
                let nmis = s.states.iter().map(|&c| c & NMI_WAITS != 0).collect();
                Some((usize::from(s.current), states, nmis))
            }
            None => None,
        };
        if self.serial.is_some() {
            self.swap_in(0)?;
        } else {
            // The APs of a parallel run stopped after an exit they handled.
            for ap in &mut self.aps {
                crate::vcpu_state::complete_pending_exit(&mut ap.vcpu)
                    .map_err(vcpu_err("complete the pending exit of"))?;
            }
        }
        crate::vcpu_state::restore(&self.core.vcpu, &state.vcpu).map_err(vcpu_err("restore"))?;
        for (ap, saved) in self.aps.iter().zip(&state.aps) {
            crate::vcpu_state::restore(&ap.vcpu, saved).map_err(vcpu_err("restore"))?;
        }
        match schedule {
            Some((current, states, nmis)) if self.serial.is_some() => {
                self.serial_mut().states = states;
                self.serial_mut().nmis = nmis;
                self.swap_in(current)?;
                self.serial_mut().slice_end_ns = monotonic_ns() + SLICE_NS;
                self.serial_mut().slice_left_ns = None;
            }
            Some((_, states, nmis)) => {
                // The BSP idles on if it waited in HLT; an NMI that waited
                // for it is KVM's at once (it runs first).
                self.idle_stopped = states[0] == CpuState::Hlt;
                self.halted_stopped = states[0] == CpuState::Parked;
                if nmis[0] {
                    self.core.vcpu.nmi().map_err(kvm_err("KVM_NMI"))?;
                }
                for ((ap, state), nmi) in self.aps.iter_mut().zip(&states[1..]).zip(&nmis[1..]) {
                    ap.state = state.to_ap();
                    ap.nmi_waits = *nmi;
                }
            }
            None => {}
        }
        Ok(())
    }

    /// The machine stops ([`Machine::resume`] returns): the running vCPU's
    /// slice waits with it, or it resumes (`stopping` false): the slice
    /// goes on with what was left of it. Otherwise a debugger's stop of
    /// more than a slice would switch vCPUs at every step.
    pub(super) fn hold_slice(&mut self, stopping: bool) {
        let now = monotonic_ns();
        if let Some(s) = self.serial.as_mut() {
            if stopping {
                s.slice_left_ns = Some(s.slice_end_ns.saturating_sub(now));
            } else if let Some(left) = s.slice_left_ns.take() {
                s.slice_end_ns = now + left;
            }
        }
    }

    /// The host time to kick the running vCPU at for the end of its slice:
    /// only in a recording, while another vCPU could run.
    pub(super) fn preempt_at(&self) -> Option<u64> {
        let s = self.serial.as_ref()?;
        let others = (0..s.states.len()).any(|c| c != self.core.vcpu_index && self.runnable(c));
        (self.hooks.schedules() && others).then_some(s.slice_end_ns)
    }

    /// The running vCPU executed HLT (`if_flag`: with interrupts enabled).
    pub(super) fn after_hlt(&mut self, if_flag: bool) -> AfterHlt {
        let current = self.core.vcpu_index;
        let n = self.serial_ref().states.len();
        let pending = self.core.platform.interrupt_pending_of(current);
        self.serial_mut().states[current] = match (if_flag, pending) {
            (true, true) => CpuState::Running,
            (true, false) => CpuState::Hlt,
            (false, _) => CpuState::Parked,
        };
        if (0..n).any(|c| self.runnable(c)) {
            return AfterHlt::Go;
        }
        if self.serial_ref().states.contains(&CpuState::Hlt) {
            AfterHlt::Idle
        } else {
            AfterHlt::Halted
        }
    }

    /// vCPU `cpu`, for a debugger to read and write its registers at a
    /// stop. A waiting vCPU's last exit was completed when it was switched
    /// out (`switch_to`), so its registers are its state; it is not run out
    /// of turn here. Several vCPUs are reachable only on a machine that
    /// runs them one at a time.
    pub fn vcpu_at_stop(&mut self, cpu: usize) -> Result<&mut VcpuFd, Error> {
        let n = self.cpus();
        if cpu >= n || (cpu != 0 && self.serial.is_none()) {
            return Err(Error::Smp(format!("no vCPU {cpu} here (the machine has {n})")));
        }
        Ok(self.vcpu_of(cpu))
    }

    /// Whether a started vCPU is in real mode (CR0.PE clear), where the
    /// emulated KVM's dirty log may miss guest writes (an AP that waits
    /// for its start-up IPI runs nothing). At a stop.
    pub fn real_mode_vcpus(&self) -> Result<bool, Error> {
        for cpu in 0..self.cpus() {
            let waits = match &self.serial {
                Some(s) => s.states[cpu] == CpuState::WaitForSipi,
                None => cpu != 0 && self.aps[cpu - 1].state == ApState::WaitForSipi,
            };
            let vcpu = match self.slot_of(cpu) {
                None => &self.core.vcpu,
                Some(slot) => &self.aps[slot].vcpu,
            };
            if !waits && vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?.cr0 & 1 == 0 {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The running vCPU (0, the BSP, on a machine with one).
    pub fn current_vcpu(&self) -> usize {
        self.core.vcpu_index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_code_means_the_same_place_to_both_kinds_of_machine() {
        for code in 0u8..4 {
            let state = CpuState::from_u8(code).expect("codes 0 to 3 are states");
            assert_eq!(state as u8, code);
            assert_eq!(CpuState::of_ap(state.to_ap()), state, "code {code}");
        }
        assert_eq!(CpuState::from_u8(4), None);
        assert_eq!(CpuState::from_u8(NMI_WAITS), None, "the NMI bit is masked off first");
    }
}
