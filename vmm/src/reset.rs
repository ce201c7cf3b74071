//! Fast reset of a restored machine to its snapshot, as fuzzing hypervisors
//! do it: only the pages the guest wrote since the snapshot are rewritten
//! (KVM's dirty log says which), then the devices and the vCPU are put back
//! in place. Also [`CheckRun`], the run mode of snapshot-based regression
//! tests: a deterministic clock (a fixed step per exit, a jump to the next
//! deadline when the guest halts), deterministic entropy, and a wall-clock
//! limit instead of a flaky answer when a guest computes without exits.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use nyx_devices::Input;

use crate::clock::{TimeSource, VirtualClock};
use crate::events::ExitRecord;
use crate::hooks::{HookCtx, HookError, RunHooks};
use crate::machine::Machine;
use crate::mem_state::{is_zero, rollback_pages, DirtyTracker, MemStateError, PageRun, PAGE_SIZE};
use crate::snapshot::MachineState;

const PAGE: usize = PAGE_SIZE as usize;

/// Errors of a fast reset.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    /// Dirty tracking or a page write failed.
    #[error("guest memory: {0}")]
    Memory(#[from] MemStateError),
    /// The devices or the vCPU could not be put back.
    #[error(transparent)]
    Machine(#[from] crate::machine::Error),
}

/// What one reset did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResetStats {
    /// Pages rewritten (dirtied since the previous reset).
    pub pages: usize,
    /// Time the reset took, ns.
    pub ns: u64,
    /// Of that, the time spent on memory (collecting KVM's dirty log and
    /// rewriting the pages), ns; the rest put back devices and vCPU.
    pub memory_ns: u64,
}

/// A snapshot kept in memory, page by page, to reset a machine to.
pub struct ResetPoint {
    state: MachineState,
    /// Non-zero pages of the snapshot by guest frame number; a page that is
    /// not here was zero.
    pages: HashMap<u64, Box<[u8]>>,
    tracker: DirtyTracker,
}

/// Splits page runs (of any alignment) into whole pages by frame number;
/// the bytes of a page that no run covers are zero, as after a restore.
pub fn pages_of(memory: &[PageRun]) -> HashMap<u64, Box<[u8]>> {
    let mut pages: HashMap<u64, Box<[u8]>> = HashMap::new();
    for run in memory {
        let mut done = 0usize;
        while done < run.data.len() {
            let Some(gpa) = run.gpa.checked_add(done as u64) else {
                break;
            };
            let off = (gpa % PAGE_SIZE) as usize;
            let n = (PAGE - off).min(run.data.len() - done);
            let chunk = &run.data[done..done + n];
            let page = pages
                .entry(gpa / PAGE_SIZE)
                .or_insert_with(|| vec![0u8; PAGE].into_boxed_slice());
            page[off..off + n].copy_from_slice(chunk);
            done += n;
        }
    }
    pages.retain(|_, p| !is_zero(p));
    pages
}

impl ResetPoint {
    /// Keeps `state` and `memory` (what `machine` was just restored from)
    /// and starts KVM's dirty log on the machine's memory. The machine's
    /// run mode must not track dirty pages itself (the log has one reader).
    pub fn new(machine: &Machine, state: MachineState, memory: &[PageRun]) -> Result<Self, ResetError> {
        // SAFETY: a Machine registers its memory with its VM one slot per
        // region (slot index = region index) and keeps it for the VM's life.
        let tracker = unsafe { DirtyTracker::enable(machine.vm(), machine.memory()) }?.track_dma(machine.dma_memory());
        Ok(ResetPoint {
            state,
            pages: pages_of(memory),
            tracker,
        })
    }

    /// The machine state this point resets to.
    pub fn state(&self) -> &MachineState {
        &self.state
    }

    /// Rewrites the pages dirtied since the last call from the snapshot;
    /// returns how many.
    pub fn reset_memory(&mut self, machine: &Machine) -> Result<usize, ResetError> {
        let dirty = self.tracker.collect(machine.vm())?;
        // The vCPU does not run during a reset: it is driven by this thread.
        let pages = &self.pages;
        Ok(rollback_pages(machine.memory(), dirty, |gfn| {
            pages.get(&gfn).map(|p| &p[..])
        })?)
    }

    /// Resets the whole machine: dirtied pages, devices (COM1 then talks to
    /// `serial_out` and `serial_in`), vCPU, virtual time and position. The
    /// caller resets its run mode's time source (see [`CheckRun::reset`]).
    pub fn reset(
        &mut self,
        machine: &mut Machine,
        serial_out: Box<dyn Write + Send>,
        serial_in: Box<dyn Input>,
    ) -> Result<ResetStats, ResetError> {
        let t = std::time::Instant::now();
        // Devices and vCPU first: completing a pending exit may still write
        // guest memory (a string I/O), which the page reset then undoes.
        machine.reset_state(&self.state, serial_out, serial_in, Box::new(nyx_devices::io::NoInput))?;
        let m = std::time::Instant::now();
        let pages = self.reset_memory(machine)?;
        machine.forget_touched();
        Ok(ResetStats {
            pages,
            ns: t.elapsed().as_nanos() as u64,
            memory_ns: m.elapsed().as_nanos() as u64,
        })
    }
}

/// Virtual time per guest-caused exit under [`CheckRun`], ns.
pub const CHECK_STEP_NS: u64 = 1_000;

/// The date a machine booted under the check clock sees (2024-01-01
/// 00:00:00 UTC); a restored machine sees its snapshot's.
pub const CHECK_WALL_SECONDS: i64 = 1_704_067_200;

/// Which clock a [`CheckRun`] serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClockKind {
    /// The host's monotonic clock, as in a plain run: for guests that wait
    /// for a timer in a compute loop, whose output must then not depend on
    /// timing.
    Host,
    /// The deterministic check clock.
    #[default]
    Check,
}

impl std::str::FromStr for ClockKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "host" => Ok(ClockKind::Host),
            "check" => Ok(ClockKind::Check),
            _ => Err(format!("unknown clock {s:?}: give host or check")),
        }
    }
}

impl std::fmt::Display for ClockKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClockKind::Host => "host",
            ClockKind::Check => "check",
        })
    }
}

/// The state [`CheckRun`] shares with its clock and its owner.
#[derive(Debug, Default)]
struct CheckShared {
    now_ns: AtomicU64,
    /// Host CLOCK_MONOTONIC ns after which the run is stopped (0: none).
    wall_limit_ns: AtomicU64,
    timed_out: AtomicBool,
    entropy: AtomicU64,
    /// Serve the host's clock instead (see [`ClockKind::Host`]).
    host: AtomicBool,
    /// Host monotonic ns of virtual time 0, with the host clock.
    host_origin_ns: AtomicU64,
}

impl CheckShared {
    /// The next value of a fixed sequence (xorshift64*).
    fn next_entropy(&self) -> u64 {
        let mut x = self.entropy.load(Ordering::SeqCst);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.entropy.store(x, Ordering::SeqCst);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn host(&self) -> Option<crate::clock::HostTime> {
        self.host.load(Ordering::SeqCst).then(|| {
            let origin = self.host_origin_ns.load(Ordering::SeqCst);
            crate::clock::HostTime::starting_at(crate::kick::monotonic_ns().saturating_sub(origin))
        })
    }

    fn wall_limit(&self) -> Option<u64> {
        match self.wall_limit_ns.load(Ordering::SeqCst) {
            0 => None,
            t => Some(t),
        }
    }
}

/// The deterministic time source of [`CheckRun`].
struct CheckTime(Arc<CheckShared>);

impl TimeSource for CheckTime {
    fn sample(&mut self) -> u64 {
        let s = &self.0;
        if s.host.load(Ordering::SeqCst) {
            return crate::kick::monotonic_ns().saturating_sub(s.host_origin_ns.load(Ordering::SeqCst));
        }
        s.now_ns.load(Ordering::SeqCst)
    }
}

/// A handle on a [`CheckRun`]'s clock and limit, kept by its owner after
/// the hooks went into the machine.
#[derive(Debug, Clone)]
pub struct CheckControl(Arc<CheckShared>);

impl CheckControl {
    /// Starts a repetition: virtual time `start_ns`, a fresh entropy
    /// sequence, and a wall-clock limit of `limit` from now (None: no limit).
    pub fn reset(&self, start_ns: u64, limit: Option<std::time::Duration>) {
        let s = &self.0;
        let now = crate::kick::monotonic_ns();
        s.now_ns.store(start_ns, Ordering::SeqCst);
        s.host_origin_ns.store(now.saturating_sub(start_ns), Ordering::SeqCst);
        s.entropy.store(0x6e79_7863_6865_636b, Ordering::SeqCst);
        s.timed_out.store(false, Ordering::SeqCst);
        let limit = limit.map_or(0, |l| {
            now.saturating_add(l.as_nanos().min(u128::from(u64::MAX)) as u64).max(1)
        });
        s.wall_limit_ns.store(limit, Ordering::SeqCst);
    }

    /// Sets the wall-clock limit of the run under way to `limit` from now
    /// (None: no limit), leaving its time alone.
    pub fn set_limit(&self, limit: Option<std::time::Duration>) {
        let now = crate::kick::monotonic_ns();
        let limit = limit.map_or(0, |l| {
            now.saturating_add(l.as_nanos().min(u128::from(u64::MAX)) as u64).max(1)
        });
        self.0.timed_out.store(false, Ordering::SeqCst);
        self.0.wall_limit_ns.store(limit, Ordering::SeqCst);
    }

    /// Serves `clock` from the next sample on (set it before
    /// [`CheckControl::reset`], which starts the host clock's origin).
    pub fn set_clock(&self, clock: ClockKind) {
        self.0.host.store(clock == ClockKind::Host, Ordering::SeqCst);
    }

    /// Whether the last run was stopped by the wall-clock limit.
    pub fn timed_out(&self) -> bool {
        self.0.timed_out.load(Ordering::SeqCst)
    }

    /// Virtual time now, ns.
    pub fn now_ns(&self) -> u64 {
        self.0.now_ns.load(Ordering::SeqCst)
    }
}

/// What a guest that the check clock cannot serve is told (the run was
/// stopped at its wall-clock limit).
pub const TIMED_OUT: &str = "the time limit passed with the check clock, which only moves when the guest exits \
     (or halts): the guest computes or busy-waits for a timer without exits. Give it the host clock \
     (--clock host, or clock = \"host\" in a suite) if its output does not depend on timing, or record it \
     (nyx record --from-snapshot) to debug it";

/// The run mode of `nyx check` and of `--clock check`: the same guest state
/// and input give the same run, whatever the host's timing. Virtual time
/// advances by [`CHECK_STEP_NS`] per guest-caused exit and jumps to the next
/// device deadline when the guest halts; devices are polled at every step
/// (never at an asynchronous kick); RDRAND-style entropy is a fixed
/// sequence; RDTSC (patched) and the TSC MSRs follow the virtual clock; the
/// date is fixed. A guest that computes without exits never sees time pass:
/// the wall-clock limit stops it, and the run fails with
/// [`HookError::Stopped`] and [`CheckControl::timed_out`] set.
///
/// With [`ClockKind::Host`] (see [`CheckControl::set_clock`]) it serves the
/// host's clock instead, and keeps the limit and the fast resets.
#[derive(Debug)]
pub struct CheckRun {
    shared: Arc<CheckShared>,
    wall: Option<i64>,
}

impl CheckRun {
    /// Hooks (check clock, no time limit) and the handle that resets them.
    pub fn new() -> (Self, CheckControl) {
        let shared = Arc::new(CheckShared::default());
        let control = CheckControl(shared.clone());
        control.reset(0, None);
        (CheckRun { shared, wall: None }, control)
    }

    /// The date the guest sees, in seconds since 1970 (default
    /// [`CHECK_WALL_SECONDS`]; a restored machine's should be its
    /// snapshot's).
    pub fn with_wall_seconds(mut self, secs: i64) -> Self {
        self.wall = Some(secs);
        self
    }
}

impl RunHooks for CheckRun {
    fn name(&self) -> &'static str {
        "check"
    }

    fn time_source(&mut self, start_ns: u64) -> Box<dyn TimeSource> {
        self.shared.now_ns.store(start_ns, Ordering::SeqCst);
        let now = crate::kick::monotonic_ns();
        self.shared
            .host_origin_ns
            .store(now.saturating_sub(start_ns), Ordering::SeqCst);
        Box::new(CheckTime(self.shared.clone()))
    }

    fn serial_input(&mut self, requested: Box<dyn Input>) -> Box<dyn Input> {
        requested
    }

    fn wall_seconds(&mut self, host: i64) -> i64 {
        if self.shared.host.load(Ordering::SeqCst) {
            return host;
        }
        self.wall.unwrap_or(CHECK_WALL_SECONDS)
    }

    fn patches_instructions(&self) -> bool {
        true
    }

    fn virtual_tsc(&self) -> bool {
        true
    }

    /// Several vCPUs run one at a time, as in a recording (every
    /// instruction that reads time is patched, and the AP threads of a
    /// parallel run serve no patched sites); the machine switches at the
    /// end of each time slice.
    fn schedules(&self) -> bool {
        true
    }

    fn kick_at(&self, virt_deadline: Option<u64>) -> Option<u64> {
        let limit = self.shared.wall_limit();
        let deadline = self
            .shared
            .host()
            .and_then(|h| virt_deadline.map(|d| h.host_time_of(d)));
        match (limit, deadline) {
            (Some(l), Some(d)) => Some(l.min(d)),
            (l, d) => l.or(d),
        }
    }

    fn poll_now(&mut self, _ctx: &mut HookCtx<'_>, requested: bool) -> Result<bool, HookError> {
        Ok(requested || !self.shared.host.load(Ordering::SeqCst))
    }

    fn on_kick(&mut self, ctx: &mut HookCtx<'_>, deadline_passed: bool) -> Result<bool, HookError> {
        if !deadline_passed {
            return Ok(false);
        }
        if self
            .shared
            .wall_limit()
            .is_some_and(|l| crate::kick::monotonic_ns() >= l)
        {
            self.shared.timed_out.store(true, Ordering::SeqCst);
            return Err(HookError::Stopped);
        }
        // A device deadline of the host clock, or with several vCPUs the
        // end of a time slice: a step, where the machine may switch.
        Ok(self.shared.host.load(Ordering::SeqCst) || ctx.vcpus > 1)
    }

    fn on_exit(&mut self, _ctx: &mut HookCtx<'_>, _exit: &ExitRecord) -> Result<(), HookError> {
        self.shared.now_ns.fetch_add(CHECK_STEP_NS, Ordering::SeqCst);
        Ok(())
    }

    fn idle_wait(&mut self, clock: &VirtualClock, virt_deadline: Option<u64>, input_possible: bool) {
        if let Some(host) = self.shared.host() {
            crate::hooks::host_idle_wait(&host, clock, virt_deadline, input_possible);
            return;
        }
        if let Some(d) = virt_deadline {
            self.shared.now_ns.fetch_max(d, Ordering::SeqCst);
        }
        if self
            .shared
            .wall_limit()
            .is_some_and(|l| crate::kick::monotonic_ns() > l)
        {
            // A guest idling on input that never comes: end the wait loop
            // slowly enough not to spin a core.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn entropy(&mut self, _ctx: &mut HookCtx<'_>) -> Result<u64, HookError> {
        if self.shared.host.load(Ordering::SeqCst) {
            return Ok(crate::hooks::host_random());
        }
        Ok(self.shared.next_entropy())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vm_memory::GuestAddress;

    #[test]
    fn pages_of_splits_unaligned_runs_and_drops_zero_pages() {
        let runs = vec![
            PageRun {
                gpa: 0x1ffe,
                data: vec![1, 2, 3, 4],
            },
            PageRun {
                gpa: 0x5000,
                data: vec![0; 4096],
            },
        ];
        let p = pages_of(&runs);
        assert_eq!(p.len(), 2);
        assert_eq!(&p[&1][0xffe..], &[1, 2]);
        assert_eq!(&p[&2][..2], &[3, 4]);
        assert!(p[&2][2..].iter().all(|&b| b == 0));
        assert!(!p.contains_key(&5), "a zero page is not kept");
    }

    proptest! {
        /// The pages hold exactly the bytes of the runs (later runs win),
        /// zero elsewhere.
        #[test]
        fn pages_of_matches_a_flat_image(runs in proptest::collection::vec((0u64..0x8000, proptest::collection::vec(any::<u8>(), 0..6000)), 0..6)) {
            let runs: Vec<PageRun> = runs.into_iter().map(|(gpa, data)| PageRun { gpa, data }).collect();
            let mut flat = vec![0u8; 0x8000 + 6000 + PAGE];
            for r in &runs {
                flat[r.gpa as usize..r.gpa as usize + r.data.len()].copy_from_slice(&r.data);
            }
            let pages = pages_of(&runs);
            for (gfn, chunk) in flat.chunks(PAGE).enumerate() {
                match pages.get(&(gfn as u64)) {
                    Some(p) => prop_assert_eq!(&p[..chunk.len()], chunk),
                    None => prop_assert!(chunk.iter().all(|&b| b == 0)),
                }
            }
        }
    }

    #[test]
    fn check_clock_steps_per_exit_and_jumps_to_deadlines() {
        let (mut hooks, control) = CheckRun::new();
        let mut src = hooks.time_source(500);
        assert_eq!(src.sample(), 500);
        let clock = VirtualClock::new(Box::new(CheckTime(control.0.clone())));
        hooks.idle_wait(&clock, Some(10_000), false);
        assert_eq!(src.sample(), 10_000);
        hooks.idle_wait(&clock, Some(20), false);
        assert_eq!(src.sample(), 10_000, "time never goes back");
        control.reset(7, Some(std::time::Duration::from_secs(1)));
        assert_eq!(control.now_ns(), 7);
        assert!(!control.timed_out());
    }

    #[test]
    fn host_clock_follows_the_host_from_each_reset() {
        let (mut hooks, control) = CheckRun::new();
        control.set_clock(ClockKind::Host);
        control.reset(1_000_000_000, None);
        let mut src = hooks.time_source(1_000_000_000);
        let a = src.sample();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let b = src.sample();
        assert!(a >= 1_000_000_000 && b >= a + 5_000_000, "{a} {b}");
        assert_eq!(hooks.kick_at(None), None, "no limit, no deadline: no kick");
        control.reset(7, Some(std::time::Duration::from_secs(1)));
        assert!(src.sample() < 1_000_000_000, "a reset starts the host clock again");
        assert!(hooks.kick_at(Some(u64::MAX)).is_some(), "the limit comes first");
        control.set_clock(ClockKind::Check);
        control.reset(7, None);
        assert_eq!(src.sample(), 7);
        assert_eq!("host".parse::<ClockKind>(), Ok(ClockKind::Host));
        assert!("wall".parse::<ClockKind>().is_err());
    }

    #[test]
    fn check_entropy_repeats_after_reset() {
        let (hooks, control) = CheckRun::new();
        let a: Vec<u64> = (0..4).map(|_| hooks.shared.next_entropy()).collect();
        control.reset(0, Some(std::time::Duration::from_secs(1)));
        let b: Vec<u64> = (0..4).map(|_| hooks.shared.next_entropy()).collect();
        assert_eq!(a, b);
        assert!(a.windows(2).all(|w| w[0] != w[1]));
    }

    /// Guest code (the same bytes in 32- and 64-bit mode): writes 0x5a into
    /// the first byte of `n` pages from `base` up, then 0 to the debug-exit port.
    fn page_writer(base: u32, n: u32) -> Vec<u8> {
        let mut c = vec![0xfa, 0xbf]; // cli; mov edi, base
        c.extend(base.to_le_bytes());
        c.push(0xb9); // mov ecx, n
        c.extend(n.to_le_bytes());
        c.extend([0xb0, 0x5a]); // mov al, 0x5a
        c.extend([0x88, 0x07, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00]); // 1: mov [edi], al; add edi, 4096
        c.extend([0xff, 0xc9, 0x75, 0xf4]); // dec ecx; jnz 1b
        c.extend([0xb0, 0x00, 0xe6, 0xf4]); // mov al, 0; out 0xf4, al
        c
    }

    #[test]
    fn reset_rewrites_exactly_the_pages_the_guest_wrote() {
        use crate::machine::{MachineBuilder, RunOutcome};
        use vm_memory::Bytes;
        if !crate::probe::kvm_available() {
            return;
        }
        let mut m = MachineBuilder::new()
            .memory(32)
            .kernel_image("hello", nyx_guests::HELLO.to_vec())
            .serial_out(Box::new(std::io::sink()))
            .build()
            .unwrap();
        assert_eq!(m.run().unwrap(), RunOutcome::DebugExit(nyx_guests::HELLO_EXIT));
        let (base, code) = (0x100_0000u64, 0x80_0000u64);
        m.memory().write_slice(&[0xab; PAGE], GuestAddress(base)).unwrap();
        let (state, memory) = m.capture_state().unwrap();
        let mut point = ResetPoint::new(&m, state, &memory).unwrap();
        // Written by the host after the point: not dirty, kept by resets.
        m.memory()
            .write_slice(&page_writer(base as u32, 3), GuestAddress(code))
            .unwrap();
        let input = || Box::new(nyx_devices::io::BufferInput::new(Vec::new()));
        point.reset(&mut m, Box::new(std::io::sink()), input()).unwrap();
        let mut regs = m.vcpu().get_regs().unwrap();
        regs.rip = code;
        regs.rflags = 2;
        m.vcpu_mut().set_regs(&regs).unwrap();
        assert_eq!(m.run().unwrap(), RunOutcome::DebugExit(0));
        let byte = |m: &Machine, gpa: u64| m.memory().read_obj::<u8>(GuestAddress(gpa)).unwrap();
        let written = [byte(&m, base), byte(&m, base + 0x1000), byte(&m, base + 0x2000)];
        assert_eq!(written, [0x5a; 3]);
        let stats = point.reset(&mut m, Box::new(std::io::sink()), input()).unwrap();
        assert!((3..8).contains(&stats.pages), "{} pages rewritten", stats.pages);
        assert!(stats.memory_ns <= stats.ns);
        let mut page = vec![0u8; PAGE];
        m.memory().read_slice(&mut page, GuestAddress(base)).unwrap();
        assert!(page.iter().all(|&b| b == 0xab), "the snapshot's page is back");
        assert_eq!([byte(&m, base + 0x1000), byte(&m, base + 0x2000)], [0, 0]);
        assert_eq!(byte(&m, code), 0xfa, "a page the guest did not write is left alone");
    }
}
