//! Tests of the run loop on KVM (the shared probe skips them without it, or
//! fails them under `NYX_REQUIRE_KVM=1`): in-tree guests run under hooks
//! that pass the host through like a plain run and note what the loop
//! tells them.

use std::io::Write;
use std::sync::{Arc, Mutex};

use nyx_devices::Input;

use crate::clock::{TimeSource, VirtualClock};
use crate::events::{ExitKind, ExitRecord};
use crate::hooks::{HookCtx, HookError, PlainRun, RunHooks};
use crate::machine::{GuestDebug, Machine, MachineBuilder, RunOutcome, Stop};

/// What the loop told the hooks.
#[derive(Debug, Default)]
struct Seen {
    exits: Vec<ExitRecord>,
    injected: Vec<u8>,
    ends: Vec<RunOutcome>,
}

/// A plain run that notes every exit, injection and end, and pauses after
/// exits when asked to.
struct Spy {
    plain: PlainRun,
    seen: Arc<Mutex<Seen>>,
    pause: bool,
}

impl RunHooks for Spy {
    fn name(&self) -> &'static str {
        "spy"
    }
    fn time_source(&mut self, start_ns: u64) -> Box<dyn TimeSource> {
        self.plain.time_source(start_ns)
    }
    fn serial_input(&mut self, requested: Box<dyn Input>) -> Box<dyn Input> {
        self.plain.serial_input(requested)
    }
    fn kick_at(&self, virt_deadline: Option<u64>) -> Option<u64> {
        self.plain.kick_at(virt_deadline)
    }
    fn poll_now(&mut self, ctx: &mut HookCtx<'_>, requested: bool) -> Result<bool, HookError> {
        self.plain.poll_now(ctx, requested)
    }
    fn on_kick(&mut self, ctx: &mut HookCtx<'_>, deadline_passed: bool) -> Result<bool, HookError> {
        self.plain.on_kick(ctx, deadline_passed)
    }
    fn on_exit(&mut self, ctx: &mut HookCtx<'_>, exit: &ExitRecord) -> Result<(), HookError> {
        self.seen.lock().unwrap().exits.push(*exit);
        self.plain.on_exit(ctx, exit)
    }
    fn on_inject(&mut self, ctx: &mut HookCtx<'_>, vector: u8) -> Result<(), HookError> {
        self.seen.lock().unwrap().injected.push(vector);
        self.plain.on_inject(ctx, vector)
    }
    fn idle_wait(&mut self, clock: &VirtualClock, virt_deadline: Option<u64>, input_possible: bool) {
        self.plain.idle_wait(clock, virt_deadline, input_possible)
    }
    fn entropy(&mut self, ctx: &mut HookCtx<'_>) -> Result<u64, HookError> {
        self.plain.entropy(ctx)
    }
    fn pause_after_exit(&mut self) -> bool {
        self.pause
    }
    fn on_end(&mut self, _ctx: &mut HookCtx<'_>, outcome: &RunOutcome) -> Result<(), HookError> {
        self.seen.lock().unwrap().ends.push(outcome.clone());
        Ok(())
    }
}

#[derive(Clone, Default)]
struct Out(Arc<Mutex<Vec<u8>>>);

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The in-tree guest `name` under a [`Spy`], with its golden command line;
/// `None` without KVM.
fn machine(name: &str, pause: bool) -> Option<(Machine, Arc<Mutex<Seen>>, Out)> {
    if !crate::probe::kvm_available() {
        return None;
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let out = Out::default();
    let m = MachineBuilder::new()
        .memory(64)
        .kernel_image(name, nyx_guests::image(name).unwrap().to_vec())
        .cmdline(nyx_guests::GOLDEN_APPEND)
        .serial_out(Box::new(out.clone()))
        .hooks(Box::new(Spy {
            plain: PlainRun::new(),
            seen: seen.clone(),
            pause,
        }))
        .build()
        .unwrap();
    Some((m, seen, out))
}

fn exit_value(name: &str) -> RunOutcome {
    RunOutcome::DebugExit(nyx_guests::expected(name).unwrap().exit_value.unwrap())
}

/// Every guest-caused exit reaches the hooks once, in order, and is
/// counted; the run ends with the guest's debug-exit value, told to the
/// hooks once; the output is the golden one.
#[test]
fn every_exit_reaches_the_hooks_and_the_run_ends_with_the_guests_value() {
    let Some((mut m, seen, out)) = machine("hello", false) else {
        return;
    };
    let outcome = m.run().unwrap();
    assert_eq!(outcome, exit_value("hello"));
    let seen = seen.lock().unwrap();
    assert_eq!(seen.exits.len() as u64, m.exit_seq());
    assert_eq!(m.exit_seq(), m.stats().exits());
    assert!(seen.exits.iter().any(|e| e.kind == ExitKind::PioOut && e.addr == 0x3f8));
    assert_eq!(seen.ends, [outcome]);
    let golden = nyx_guests::expected("hello").unwrap().golden.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.0.lock().unwrap()), golden);
}

/// The PIT guest idles in HLT between ticks: the loop waits for each
/// deadline and injects the timer's vector every time.
#[test]
fn timer_interrupts_wake_the_guest_from_hlt() {
    let Some((mut m, seen, _)) = machine("pit", false) else {
        return;
    };
    assert_eq!(m.run().unwrap(), exit_value("pit"));
    let seen = seen.lock().unwrap();
    assert!(seen.injected.len() >= 2, "{:?}", seen.injected);
    assert!(seen.injected.iter().all(|&v| v == 0x20), "{:?}", seen.injected);
    assert_eq!(m.stats().injected, seen.injected.len() as u64);
    assert!(seen.exits.iter().any(|e| e.kind == ExitKind::Hlt));
}

/// Pausing after every exit stops the loop there and changes nothing else:
/// the same exits, output and end as a run without pauses.
#[test]
fn pausing_after_each_exit_changes_nothing_but_the_stops() {
    let Some((mut plain, plain_seen, plain_out)) = machine("hello", false) else {
        return;
    };
    let want = plain.run().unwrap();
    let (mut m, seen, out) = machine("hello", true).unwrap();
    let mut pauses = 0u64;
    let outcome = loop {
        match m.resume().unwrap() {
            Stop::Paused => {
                pauses += 1;
                assert_eq!(seen.lock().unwrap().exits.len() as u64, m.exit_seq());
            }
            Stop::Ended(o) => break o,
            other => panic!("unexpected stop {other:?}"),
        }
    };
    assert_eq!(outcome, want);
    assert!(pauses > 0 && pauses < m.exit_seq() + 1, "{pauses} pauses");
    assert_eq!(seen.lock().unwrap().exits, plain_seen.lock().unwrap().exits);
    assert_eq!(*out.0.lock().unwrap(), *plain_out.0.lock().unwrap());
}

/// A kick stops the run before the guest goes on (a kick sent before
/// `resume` is not lost); resuming runs to the same end.
#[test]
fn a_kick_interrupts_and_resume_goes_on_to_the_end() {
    let Some((mut m, seen, _)) = machine("hello", false) else {
        return;
    };
    let kicker = m.kicker().unwrap();
    assert!(kicker.kick());
    assert!(matches!(m.resume().unwrap(), Stop::Interrupted));
    assert!(seen.lock().unwrap().ends.is_empty());
    assert_eq!(m.run().unwrap(), exit_value("hello"));
    // A run ended by a kick is an error of `run`, not an outcome.
    let (mut m, _, _) = machine("hello", false).unwrap();
    assert!(m.kicker().unwrap().kick());
    assert!(m.run().is_err());
}

/// Single-stepping stops after each instruction with DR6.BS; turned off,
/// the run ends as usual.
#[test]
fn single_steps_stop_with_bs_and_the_run_then_ends() {
    let Some((mut m, _, _)) = machine("hello", false) else {
        return;
    };
    m.set_guest_debug(GuestDebug {
        single_step: true,
        ..GuestDebug::default()
    })
    .unwrap();
    let mut pcs = Vec::new();
    for _ in 0..5 {
        match m.resume().unwrap() {
            Stop::Debug(d) => {
                assert_eq!(d.exception, 1, "{d:?}");
                assert_ne!(d.dr6 & (1 << 14), 0, "BS: {d:?}");
                pcs.push(d.pc);
            }
            other => panic!("unexpected stop {other:?}"),
        }
    }
    assert!(pcs.windows(2).all(|w| w[0] != w[1]), "{pcs:x?}");
    m.set_guest_debug(GuestDebug::default()).unwrap();
    assert_eq!(m.run().unwrap(), exit_value("hello"));
}
