//! How a run mode (plain run, record, replay) plugs into the run loop.
//!
//! The run loop in [`crate::machine`] is the same in every mode. At each
//! point where something from outside the machine could change what the
//! guest sees, it asks its [`RunHooks`]: a plain run passes the host
//! through, the recorder passes the host through and logs what it consumed,
//! the replayer serves the log back and checks that the guest does what the
//! log says.

use std::sync::Arc;

use kvm_ioctls::{VcpuFd, VmFd};
use nyx_devices::Input;

use crate::clock::{HostTime, TimeSource, VirtualClock};
use crate::events::ExitRecord;
use crate::machine::RunOutcome;
use crate::memory::GuestMemory;

/// Why a hook stopped the run.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The replayed guest did something other than the recording says.
    #[error("{0}")]
    Divergence(String),
    /// The recording ends here (it was cut off, or this is its last event).
    #[error("the trace ends at position {position}")]
    TraceEnd {
        /// The position where it ends.
        position: u64,
    },
    /// Writing or reading the trace failed.
    #[error("trace: {0}")]
    Trace(String),
    /// A KVM call the hook needed failed.
    #[error("KVM refused {what}: {source}")]
    Kvm {
        /// The call.
        what: &'static str,
        /// What the kernel said.
        source: kvm_ioctls::Error,
    },
    /// Stopped on request (Ctrl-C, a debugger).
    #[error("stopped")]
    Stopped,
}

/// What [`RunHooks::before_enter`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enter {
    /// Nothing: the loop enters the guest.
    Guest,
    /// The guest was moved to a landing: the loop starts a new step there,
    /// polling the devices if `poll` (as the recording did after a kick;
    /// not after a recorded interrupt window).
    Moved {
        /// Poll the devices in the new step.
        poll: bool,
    },
    /// A debugger's breakpoint stopped the guest on its way to a landing.
    Stop(crate::machine::DebugStop),
    /// Another thread kicked the vCPU while the hook ran it: a stop
    /// request (or a late kick) for the loop to look at.
    Kicked,
}

/// What hooks may look at and touch.
pub struct HookCtx<'a> {
    /// The running vCPU.
    pub vcpu: &'a mut VcpuFd,
    /// Which vCPU that is (0, the BSP, on a machine with one).
    pub vcpu_index: usize,
    /// The machine's vCPUs.
    pub vcpus: usize,
    /// The VM.
    pub vm: &'a VmFd,
    /// Guest memory.
    pub mem: &'a GuestMemory,
    /// The virtual clock.
    pub clock: &'a VirtualClock,
    /// The position: guest-caused exits so far.
    pub exit_seq: u64,
    /// KVM's dirty log, when the mode tracks dirty pages.
    pub dirty: Option<&'a mut crate::mem_state::DirtyTracker>,
    /// Pages written since the previous landing (collected so far).
    pub dirty_since_landing: &'a mut std::collections::BTreeSet<u64>,
    /// Pages written since [`crate::Machine::take_written`] last took them
    /// (collected so far): what a checkpoint of a reverse debugger saves.
    /// Whoever writes guest memory from the VMM side adds its pages here.
    pub written: &'a mut std::collections::BTreeSet<u64>,
    /// Pages written since the machine's memory last came from its base
    /// (built, restored from a snapshot, or fast-reset; collected so far):
    /// what the end record's memory digest covers. Whoever writes guest
    /// memory from the VMM side adds its pages here too.
    pub touched: &'a mut std::collections::BTreeSet<u64>,
    /// What a debugger asked the vCPU to stop for (hooks that run the
    /// guest themselves keep these breakpoints armed).
    pub guest_debug: crate::machine::GuestDebug,
    /// The MSRs a vCPU state capture saves.
    pub msr_list: &'a [u32],
    /// The machine's metrics (landings, trace bytes).
    pub metrics: &'a crate::metrics::VmMetrics,
}

impl HookCtx<'_> {
    /// The vCPU's general and special registers now.
    pub fn registers(&self) -> Result<(kvm_bindings::kvm_regs, kvm_bindings::kvm_sregs), HookError> {
        let regs = self.vcpu.get_regs().map_err(|source| HookError::Kvm {
            what: "KVM_GET_REGS",
            source,
        })?;
        let sregs = self.vcpu.get_sregs().map_err(|source| HookError::Kvm {
            what: "KVM_GET_SREGS",
            source,
        })?;
        Ok((regs, sregs))
    }

    /// Takes KVM's dirty log into `dirty_since_landing`.
    pub fn collect_dirty(&mut self) -> Result<(), HookError> {
        if let Some(d) = self.dirty.as_mut() {
            let pages = d
                .collect(self.vm)
                .map_err(|e| HookError::Trace(format!("dirty log: {e}")))?;
            self.note_written(pages);
        }
        Ok(())
    }

    /// Notes `pages` as written (by the guest, a device or Nyx itself):
    /// for the next checkpoint ([`HookCtx::written`]), the end record's
    /// digest ([`HookCtx::touched`]) and the next landing's digest
    /// ([`HookCtx::dirty_since_landing`]).
    pub fn note_written(&mut self, pages: impl IntoIterator<Item = u64>) {
        for page in pages {
            self.written.insert(page);
            self.touched.insert(page);
            self.dirty_since_landing.insert(page);
        }
    }

    /// The digest of every page written since the machine's memory last
    /// came from its base (collecting the dirty log first): the end
    /// record's. The rest of memory is the base's, which record and replay
    /// share by construction (the same image loaded, or the same snapshot),
    /// so its cost follows what the guest wrote, not its RAM.
    pub fn touched_digest(&mut self) -> Result<u64, HookError> {
        self.collect_dirty()?;
        Ok(crate::mem_state::pages_digest(self.mem, self.touched.iter().copied()))
    }

    /// The landing record of the vCPU's current state: registers, their
    /// digest, and the digest of the pages written since the previous
    /// landing (collecting the dirty log first).
    pub fn landing_here(&mut self) -> Result<crate::events::Landing, HookError> {
        let (regs, sregs) = self.registers()?;
        let events = self.vcpu.get_vcpu_events().map_err(|source| HookError::Kvm {
            what: "KVM_GET_VCPU_EVENTS",
            source,
        })?;
        self.collect_dirty()?;
        let mem_digest = self.dirty_digest(&regs, &sregs);
        Ok(crate::events::Landing {
            keyframe: None,
            pending_interrupt: (events.interrupt.injected != 0).then_some(events.interrupt.nr),
            regs: crate::events::GprSnapshot::of(&regs),
            regs_digest: crate::vcpu_state::register_digest(&regs, &sregs),
            dirty_pages: self.dirty_since_landing.len() as u32,
            mem_digest,
        })
    }
}

impl HookCtx<'_> {
    /// Whether the guest stopped inside a short loop, so that a hardware
    /// breakpoint at RIP would be hit many times before the landing: a jump
    /// or conditional branch back to RIP or before it, at most 64 bytes
    /// back, among the next four instructions.
    pub fn in_hot_loop(&mut self) -> Result<bool, HookError> {
        let (regs, sregs) = self.registers()?;
        let mode = crate::crash::CodeMode::of(&sregs);
        let linear = crate::crash::CodeMode::linear(&sregs, regs.rip);
        let paging = crate::paging::PagingRegs::of(&sregs);
        let mut code = [0u8; 48];
        if crate::paging::read_virt(self.mem, &paging, linear, &mut code).is_err() {
            return Ok(false);
        }
        Ok(crate::crash::backward_branch_within(&code, regs.rip, mode, 4, 64))
    }

    /// The landing record of the vCPU's current state together with its
    /// delta keyframe: the part of the vCPU a guest changes without an exit
    /// and the pages written since the previous landing (the replayer
    /// restores it instead of searching). One capture serves the landing's
    /// registers, digests and pending interrupt and the keyframe, so a
    /// keyframed landing costs no more ioctls than its keyframe.
    pub fn keyframe_here(&mut self, full_memory_digest: bool) -> Result<crate::events::Landing, HookError> {
        let msrs = crate::vcpu_state::keyframe_msrs(self.msr_list);
        let vcpu = crate::vcpu_state::capture_delta(self.vcpu, &msrs)
            .map_err(|e| HookError::Trace(format!("vCPU state at a landing: {e}")))?;
        self.collect_dirty()?;
        let (regs, sregs, events) = (&vcpu.regs.0, &vcpu.sregs.0, &vcpu.events.0);
        let mem_digest = self.dirty_digest(regs, sregs);
        let pages = crate::mem_state::capture_pages(self.mem, self.dirty_since_landing.iter().copied());
        let memory_digest = full_memory_digest.then(|| crate::mem_state::memory_digest(self.mem));
        Ok(crate::events::Landing {
            pending_interrupt: (events.interrupt.injected != 0).then_some(events.interrupt.nr),
            regs: crate::events::GprSnapshot::of(regs),
            regs_digest: crate::vcpu_state::register_digest(regs, sregs),
            dirty_pages: self.dirty_since_landing.len() as u32,
            mem_digest,
            keyframe: Some(Box::new(crate::events::Keyframe {
                cpu: self.vcpu_index as u8,
                vcpu,
                pages,
                memory_digest,
            })),
        })
    }

    /// Puts the vCPU into the state of `keyframe` the one way both the
    /// recorder and the replayer do it, so that whatever KVM keeps beyond the
    /// architectural state (an emulator's batch position, when it delivers a
    /// queued interrupt) is the same on both sides afterwards: the vCPU is
    /// restored with its undelivered interrupt withdrawn, a KVM_RUN that exits
    /// at once refreshes kvm_run, and the interrupt is queued again.
    pub fn load_vcpu_keyframe(&mut self, keyframe: &crate::events::Keyframe) -> Result<(), HookError> {
        let pending = (keyframe.vcpu.events.interrupt.injected != 0).then_some(keyframe.vcpu.events.interrupt.nr);
        let mut vcpu = keyframe.vcpu.clone();
        vcpu.events.interrupt.injected = 0;
        crate::vcpu_state::complete_pending_exit(self.vcpu)
            .map_err(|e| HookError::Trace(format!("completing the exit before a keyframe: {e}")))?;
        crate::vcpu_state::restore_delta(self.vcpu, &vcpu)
            .map_err(|e| HookError::Trace(format!("keyframe vCPU: {e}")))?;
        crate::vcpu_state::complete_pending_exit(self.vcpu)
            .map_err(|e| HookError::Trace(format!("refreshing kvm_run after a keyframe: {e}")))?;
        if pending.is_some() {
            set_queued_interrupt(self.vcpu, pending)?;
        }
        Ok(())
    }

    /// The digest of the pages written since the previous landing that a
    /// landing compares: their contents, less the dead part of the stack
    /// page below RSP (128 bytes of red zone kept at CPL 3). An emulated KVM
    /// can write an interrupt frame there for an interrupt it delivers only
    /// after the stop, and nothing architectural depends on those bytes.
    pub fn dirty_digest(&self, regs: &kvm_bindings::kvm_regs, sregs: &kvm_bindings::kvm_sregs) -> u64 {
        live_digest(self.mem, regs, sregs, self.dirty_since_landing.iter().copied())
    }
}

/// Bytes below RSP that count as dead stack even on the page before RSP's:
/// the red zone and an interrupt frame.
const DEAD_BELOW_RSP: usize = 256;

/// The digest of `pages` as [`HookCtx::dirty_digest`] computes it: their
/// contents less the dead part of the stack below RSP.
pub fn live_digest(
    mem: &GuestMemory,
    regs: &kvm_bindings::kvm_regs,
    sregs: &kvm_bindings::kvm_sregs,
    pages: impl IntoIterator<Item = u64>,
) -> u64 {
    {
        let paging = crate::paging::PagingRegs::of(sregs);
        let long = sregs.efer & (1 << 10) != 0 && sregs.cs.l != 0;
        let red_zone = if sregs.cs.selector & 3 == 3 { 128 } else { 0 };
        let rsp = regs.rsp.wrapping_sub(red_zone);
        let linear = if long {
            rsp
        } else {
            sregs.ss.base.wrapping_add(rsp) & 0xffff_ffff
        };
        // Below RSP on its page, and the end of the page before when RSP
        // is near its start: an interrupt frame pushed there (with RFLAGS as
        // KVM saw them, TF included while a debugger single-steps) is dead
        // as soon as the handler returns.
        let mut dead = Vec::with_capacity(2);
        if let Ok(t) = crate::paging::translate(mem, &paging, linear) {
            let off = (t.gpa & 0xfff) as usize;
            dead.push((t.gpa >> 12, 0, off));
            if off < DEAD_BELOW_RSP {
                if let Ok(prev) = crate::paging::translate(mem, &paging, linear.wrapping_sub(off as u64 + 1)) {
                    dead.push((prev.gpa >> 12, 4096 - (DEAD_BELOW_RSP - off), 4096));
                }
            }
        }
        crate::mem_state::pages_digest_live(mem, pages, &dead)
    }
}

impl HookCtx<'_> {
    /// Digest of the vCPU's registers now.
    pub fn regs_digest(&mut self) -> Result<u64, HookError> {
        let (regs, sregs) = self.registers()?;
        Ok(crate::vcpu_state::register_digest(&regs, &sregs))
    }
}

/// The per-mode behaviour of the run loop.
pub trait RunHooks: Send {
    /// A short name ("run", "record", "replay").
    fn name(&self) -> &'static str;

    /// Where the machine's clock takes its samples (called once, at build);
    /// virtual time starts at `start_ns` (0 at power-on, the snapshot's time
    /// for a restored machine).
    fn time_source(&mut self, start_ns: u64) -> Box<dyn TimeSource>;

    /// The UART's input, given the one the user asked for (called once).
    fn serial_input(&mut self, requested: Box<dyn Input>) -> Box<dyn Input>;

    /// The platform events' input (power button, lid, battery, temperature;
    /// taken by the ACPI PM device), given the one the user's control
    /// socket feeds (called once). A plain run passes it through.
    fn platform_input(&mut self, requested: Box<dyn Input>) -> Box<dyn Input> {
        requested
    }

    /// virtio-console's input, given the console the user connected
    /// (called once). A plain run passes it through.
    fn console_input(&mut self, requested: Box<dyn Input>) -> Box<dyn Input> {
        requested
    }

    /// A virtio-net NIC's received frames (one record per read), given its
    /// backend's (called once per NIC). A plain run passes them through.
    fn net_input(&mut self, requested: Box<dyn Input>) -> Box<dyn Input> {
        requested
    }

    /// virtio-rng's entropy, given the host's (called once). A plain run
    /// passes it through.
    fn rng_entropy(&mut self, requested: Box<dyn nyx_devices::io::Entropy>) -> Box<dyn nyx_devices::io::Entropy> {
        requested
    }

    /// The backend of the disk `identity` describes, given the image opened
    /// (`None` where a replay of an embedded disk needs none): a recording
    /// with `identity.embedded` logs every read, a replay of such a disk
    /// serves the reads from its trace. `None` back: this mode cannot
    /// serve the disk without its image.
    fn disk_backend(
        &mut self,
        _identity: &crate::disk::DiskIdentity,
        image: Option<Box<dyn nyx_devices::block::BlockBackend>>,
    ) -> Option<Box<dyn nyx_devices::block::BlockBackend>> {
        image
    }

    /// Whether disk images must stay unchanged: the guest's writes go to a
    /// copy-on-write overlay that snapshots carry (recording, replay,
    /// check). A plain run writes through to the images.
    fn isolates_disks(&self) -> bool {
        false
    }

    /// The date at power-on, given the host's.
    fn wall_seconds(&mut self, host: i64) -> i64 {
        host
    }

    /// Whether RDTSC/RDRAND and friends are patched into traps.
    fn patches_instructions(&self) -> bool {
        false
    }

    /// Whether the guest's TSC (trapped MSRs, patched RDTSC) is derived from
    /// the virtual clock instead of KVM's.
    fn virtual_tsc(&self) -> bool {
        false
    }

    /// Whether guest memory writes are tracked (KVM dirty log).
    fn tracks_dirty_pages(&self) -> bool {
        false
    }

    /// The host time (`CLOCK_MONOTONIC` ns) at which to kick the vCPU for
    /// the device deadline `virt_deadline`, or None for no kick.
    fn kick_at(&self, virt_deadline: Option<u64>) -> Option<u64>;

    /// At the top of each step: whether to poll the devices now.
    /// `requested` says whether the loop wants to (a deadline passed, the
    /// guest is idle in HLT).
    fn poll_now(&mut self, ctx: &mut HookCtx<'_>, requested: bool) -> Result<bool, HookError>;

    /// Just before entering the guest: the hook may move the guest to a
    /// landing itself (the replayer does), and a debugger's breakpoint may
    /// stop it on the way.
    fn before_enter(&mut self, _ctx: &mut HookCtx<'_>) -> Result<Enter, HookError> {
        Ok(Enter::Guest)
    }

    /// KVM_RUN was interrupted. `deadline_passed` says whether the device
    /// deadline the kick was armed for has passed. Returns whether the loop
    /// should poll the devices.
    fn on_kick(&mut self, ctx: &mut HookCtx<'_>, deadline_passed: bool) -> Result<bool, HookError>;

    /// A guest-caused exit was handled (the position has advanced).
    fn on_exit(&mut self, ctx: &mut HookCtx<'_>, exit: &ExitRecord) -> Result<(), HookError>;

    /// An interrupt is being injected.
    fn on_inject(&mut self, _ctx: &mut HookCtx<'_>, _vector: u8) -> Result<(), HookError> {
        Ok(())
    }

    /// The guest idles in HLT until `virt_deadline` (or input, when
    /// `input_possible`): wait for it on the host, or not at all.
    fn idle_wait(&mut self, clock: &VirtualClock, virt_deadline: Option<u64>, input_possible: bool);

    /// A random value for RDRAND/RDSEED emulation.
    fn entropy(&mut self, ctx: &mut HookCtx<'_>) -> Result<u64, HookError>;

    /// Whether an interrupt the devices have pending may be injected now
    /// (the replayer injects only where the recording did).
    fn may_inject(&mut self) -> bool {
        true
    }

    /// Whether an interrupt is due here whether or not KVM says the guest
    /// is ready for one (a replay at a recorded injection).
    fn injection_due(&mut self) -> bool {
        false
    }

    /// Whether the loop asks KVM for an interrupt-window exit when an
    /// interrupt waits for the guest to enable interrupts. A replay does
    /// not: it reaches the recorded window as a landing instead, because
    /// an emulated KVM reports the window a varying number of instructions
    /// late.
    fn requests_interrupt_window(&self) -> bool {
        true
    }

    /// Whether interrupts are injected while a debugger single-steps (a
    /// replay must deliver them where they were recorded; a live run keeps
    /// a step out of interrupt handlers).
    fn inject_while_stepping(&self) -> bool {
        false
    }

    /// Asked after each exit that the loop would simply continue from:
    /// true makes [`crate::Machine::resume`] return [`crate::machine::Stop::Paused`]
    /// there (a reverse debugger takes its checkpoints at such points).
    fn pause_after_exit(&mut self) -> bool {
        false
    }

    /// Asked after each guest-caused exit: an outcome ends the run here (a
    /// replay ends where its recording was stopped by a limit).
    fn end_here(&mut self) -> Option<RunOutcome> {
        None
    }

    /// Asked after the mode moved the guest to a landing
    /// ([`Enter::Moved`]): true makes [`crate::Machine::resume`] return
    /// [`crate::machine::Stop::Paused`] there, as [`RunHooks::pause_after_exit`]
    /// does after an exit.
    fn pause_after_landing(&mut self) -> bool {
        false
    }

    /// Whether this mode decides which vCPU runs (a recording of several
    /// vCPUs, which runs them one at a time): the machine then preempts
    /// the running one after its time slice and offers its choices to
    /// [`RunHooks::schedule`]. A replay follows the recorded choices instead.
    fn schedules(&self) -> bool {
        false
    }

    /// At each point where a machine running its vCPUs one at a time may
    /// switch to another (the start of a step): `proposal` is the vCPU the
    /// machine's policy would switch to (None: stay), from a mode that
    /// [`RunHooks::schedules`]. The vCPU to switch to comes back: the
    /// recorder logs the proposal and returns it, the replayer returns the
    /// recorded switch, if one is here.
    fn schedule(&mut self, _ctx: &mut HookCtx<'_>, proposal: Option<u8>) -> Result<Option<u8>, HookError> {
        Ok(proposal)
    }

    /// Asked after a machine running its vCPUs one at a time switched to
    /// another: true makes [`crate::Machine::resume`] return
    /// [`crate::machine::Stop::Paused`] before the new vCPU runs, inside
    /// the step (a replay being single-stepped arms the step for the new
    /// vCPU: the old one may have run free through an HLT).
    fn pause_after_switch(&mut self) -> bool {
        false
    }

    /// The run ended with `outcome`.
    fn on_end(&mut self, _ctx: &mut HookCtx<'_>, _outcome: &RunOutcome) -> Result<(), HookError> {
        Ok(())
    }
}

/// Sleeps on the host until `virt_deadline` of `host` time (at most 10 ms,
/// so that input that arrives meanwhile is seen soon).
pub fn host_idle_wait(host: &HostTime, clock: &VirtualClock, virt_deadline: Option<u64>, input_possible: bool) {
    let _ = clock;
    let now = crate::kick::monotonic_ns();
    let cap = if input_possible { 10_000_000 } else { 1_000_000_000 };
    let wait = match virt_deadline {
        Some(d) => host.host_time_of(d).saturating_sub(now).min(cap),
        None => cap,
    };
    if wait > 0 {
        std::thread::sleep(std::time::Duration::from_nanos(wait));
    }
}

/// A plain run: the host passes through, nothing is logged.
#[derive(Debug, Default)]
pub struct PlainRun {
    host: Option<HostTime>,
}

impl PlainRun {
    /// Plain-run hooks.
    pub fn new() -> Self {
        Self::default()
    }

    fn host(&mut self) -> HostTime {
        *self.host.get_or_insert_with(HostTime::new)
    }
}

impl RunHooks for PlainRun {
    fn name(&self) -> &'static str {
        "run"
    }

    fn time_source(&mut self, start_ns: u64) -> Box<dyn TimeSource> {
        let host = HostTime::starting_at(start_ns);
        self.host = Some(host);
        Box::new(host)
    }

    fn serial_input(&mut self, requested: Box<dyn Input>) -> Box<dyn Input> {
        requested
    }

    fn kick_at(&self, virt_deadline: Option<u64>) -> Option<u64> {
        Some(self.host?.host_time_of(virt_deadline?))
    }

    fn poll_now(&mut self, _ctx: &mut HookCtx<'_>, requested: bool) -> Result<bool, HookError> {
        Ok(requested)
    }

    fn on_kick(&mut self, _ctx: &mut HookCtx<'_>, deadline_passed: bool) -> Result<bool, HookError> {
        Ok(deadline_passed)
    }

    /// A plain run of several vCPUs one at a time (under a debugger:
    /// [`crate::MachineBuilder::one_at_a_time`]) switches at the end of
    /// each time slice, as a recording does.
    fn schedules(&self) -> bool {
        true
    }

    fn on_exit(&mut self, _ctx: &mut HookCtx<'_>, _exit: &ExitRecord) -> Result<(), HookError> {
        Ok(())
    }

    fn idle_wait(&mut self, clock: &VirtualClock, virt_deadline: Option<u64>, input_possible: bool) {
        let host = self.host();
        host_idle_wait(&host, clock, virt_deadline, input_possible);
    }

    fn entropy(&mut self, _ctx: &mut HookCtx<'_>) -> Result<u64, HookError> {
        Ok(host_random())
    }
}

/// The host's random bytes (getrandom), for virtio-rng in a plain run.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostEntropy;

impl nyx_devices::io::Entropy for HostEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = host_random().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A random u64 from the host (getrandom).
pub fn host_random() -> u64 {
    let mut v = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into `v`.
    let n = unsafe { libc::getrandom(v.as_mut_ptr().cast(), v.len(), 0) };
    if n != 8 {
        // Never fails for 8 bytes after boot; fall back to the clock.
        return crate::kick::monotonic_ns().wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    u64::from_le_bytes(v)
}

/// A random UUID (version 4, RFC 9562 layout): the identity of a trace,
/// snapshot or migration stream.
pub fn uuid_v4() -> [u8; 16] {
    let mut u = [0u8; 16];
    u[..8].copy_from_slice(&host_random().to_le_bytes());
    u[8..].copy_from_slice(&host_random().to_le_bytes());
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// Shared handle type for hooks that share state with their clock and input.
pub type Shared<T> = Arc<std::sync::Mutex<T>>;

/// Sets (Some) or withdraws (None) the interrupt KVM holds for injection.
pub fn set_queued_interrupt(vcpu: &VcpuFd, vector: Option<u8>) -> Result<(), HookError> {
    let mut ev = vcpu.get_vcpu_events().map_err(|source| HookError::Kvm {
        what: "KVM_GET_VCPU_EVENTS",
        source,
    })?;
    ev.interrupt.injected = u8::from(vector.is_some());
    ev.interrupt.nr = vector.unwrap_or(0);
    ev.interrupt.soft = 0;
    ev.flags = 0;
    vcpu.set_vcpu_events(&ev).map_err(|source| HookError::Kvm {
        what: "KVM_SET_VCPU_EVENTS",
        source,
    })
}

/// The interrupt KVM holds for injection, if any.
pub fn queued_interrupt(vcpu: &VcpuFd) -> Result<Option<u8>, HookError> {
    let ev = vcpu.get_vcpu_events().map_err(|source| HookError::Kvm {
        what: "KVM_GET_VCPU_EVENTS",
        source,
    })?;
    Ok((ev.interrupt.injected != 0).then_some(ev.interrupt.nr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_have_the_version_4_layout_and_differ() {
        let a = uuid_v4();
        let b = uuid_v4();
        assert_ne!(a, b);
        for u in [a, b] {
            assert_eq!(u[6] >> 4, 4, "version");
            assert_eq!(u[8] >> 6, 0b10, "variant");
        }
    }
}
