//! Record and replay of the in-tree guests: each replay reproduces the
//! serial output byte for byte, the exit status and the final register and
//! memory digests (checked by the replayer against the trace's end record),
//! three times in a row (the guests of the modern platform recorded with
//! `Irqchip::Apic`, printing QEMU's golden output); recordings of
//! time-dependent guests differ from each other; a tampered trace is caught
//! at the right position.

use std::path::{Path, PathBuf};

use nyx_recorder::{record_image, RecordOptions};
use nyx_replayer::{replay, ReplayEnd, ReplayOptions};
use nyx_tests::{kvm_available, Capture};
use nyx_trace::{FrameKind, TraceReader, TraceWriter};
use nyx_vmm::config::{Irqchip, VerifyLevel};
use nyx_vmm::events::{Event, ExitKind, Limit};
use nyx_vmm::{RunOutcome, SerialIn};

struct Recorded {
    path: PathBuf,
    serial: Vec<u8>,
    outcome: RunOutcome,
    landings: u64,
}

fn record_guest(dir: &Path, name: &str, file: &str, input: Option<&[u8]>, verify: VerifyLevel) -> Recorded {
    record_guest_on(dir, name, file, input, verify, Irqchip::Legacy)
}

/// How the tests record the in-tree guest `name` into `out`: 64 MiB, its
/// serial output into `serial`, the default landing policy and CPU model.
fn guest_options(
    out: PathBuf,
    name: &str,
    input: Option<&[u8]>,
    serial: &Capture,
    verify: VerifyLevel,
    irqchip: Irqchip,
) -> RecordOptions {
    RecordOptions {
        cpus: 1,
        out,
        kernel: PathBuf::from(name),
        kernel_name: Some(name.to_string()),
        initrd: None,
        cmdline: String::new(),
        mem_mib: 64,
        serial_in: input.map_or(SerialIn::None, |i| SerialIn::Bytes(i.to_vec())),
        serial_out: Some(Box::new(serial.clone())),
        kvm_path: nyx_tests::kvm_device(),
        verify,
        landings: nyx_recorder::LandingPolicy::Auto,
        cpu: Default::default(),
        irqchip,
        pci: Default::default(),
    }
}

fn record_guest_on(
    dir: &Path,
    name: &str,
    file: &str,
    input: Option<&[u8]>,
    verify: VerifyLevel,
    irqchip: Irqchip,
) -> Recorded {
    let image = nyx_guests::image(name).expect("guest").to_vec();
    let out = Capture::default();
    let rec = record_image(
        guest_options(dir.join(file), name, input, &out, verify, irqchip),
        name.to_string(),
        image,
        None,
    )
    .unwrap_or_else(|e| panic!("recording {name}: {e}"));
    Recorded {
        path: rec.path,
        serial: out.bytes(),
        outcome: rec.outcome,
        landings: rec.landings,
    }
}

fn replay_guest(path: &Path) -> Result<(Vec<u8>, ReplayEnd), nyx_replayer::Error> {
    let out = Capture::default();
    let r = replay(
        path,
        ReplayOptions {
            serial_out: Some(Box::new(out.clone())),
            ..Default::default()
        },
    )?;
    Ok((out.bytes(), r.end))
}

/// Records `name` and replays it three times; every replay must match.
fn round_trip(name: &str, input: Option<&[u8]>, verify: VerifyLevel) -> Recorded {
    round_trip_on(name, input, verify, Irqchip::Legacy)
}

/// [`round_trip`] on the platform `irqchip` (the trace carries it).
fn round_trip_on(name: &str, input: Option<&[u8]>, verify: VerifyLevel, irqchip: Irqchip) -> Recorded {
    let dir = tempfile::tempdir().unwrap();
    let rec = record_guest_on(dir.path(), name, "t.nyxtrace", input, verify, irqchip);
    // A guest outside `nyx_guests::ALL` has no expectations there: its
    // test checks the outcome.
    if let Some(want) = nyx_guests::expected(name) {
        match want.exit_value {
            Some(v) => assert_eq!(rec.outcome, RunOutcome::DebugExit(v), "{name} recorded run"),
            None if want.powers_off => assert_eq!(rec.outcome, RunOutcome::PowerOff, "{name} recorded run"),
            None => assert!(
                matches!(rec.outcome, RunOutcome::Crashed(_)),
                "{name}: {:?}",
                rec.outcome
            ),
        }
    }
    for i in 0..3 {
        let (serial, end) = replay_guest(&rec.path).unwrap_or_else(|e| panic!("{name} replay {i}: {e}"));
        assert_eq!(
            String::from_utf8_lossy(&serial),
            String::from_utf8_lossy(&rec.serial),
            "{name} replay {i}: serial output differs"
        );
        match end {
            ReplayEnd::Complete { outcome } => assert_eq!(outcome, rec.outcome, "{name} replay {i}"),
            other => panic!("{name} replay {i} did not complete: {other:?}"),
        }
    }
    // Keep the directory alive until here.
    drop(dir);
    rec
}

#[test]
fn counter_with_timer_landings_replays_exactly() {
    if !kvm_available() {
        return;
    }
    let rec = round_trip("counter", None, VerifyLevel::Exits);
    // The main loop never exits: every tick is an asynchronous landing.
    assert!(rec.landings >= 10, "only {} landings", rec.landings);
    let lines = String::from_utf8_lossy(&rec.serial)
        .lines()
        .filter(|l| l.len() == 16)
        .count();
    assert!(lines >= 50, "{}", String::from_utf8_lossy(&rec.serial));
}

/// A guest of the modern platform recorded and replayed with
/// `Irqchip::Apic`: the recording prints QEMU's golden output and every
/// replay prints it again.
fn apic_round_trip(name: &str) {
    if !kvm_available() {
        return;
    }
    let rec = round_trip_on(name, None, VerifyLevel::Full, Irqchip::Apic);
    let golden = nyx_guests::expected(name).and_then(|e| e.golden).expect("golden");
    assert_eq!(String::from_utf8_lossy(&rec.serial), golden, "{name} recording");
}

#[test]
fn lapic_timer_and_ipis_replay_exactly() {
    apic_round_trip("lapic");
}

#[test]
fn ioapic_routed_interrupts_replay_exactly() {
    apic_round_trip("ioapic");
}

#[test]
fn hpet_ticks_replay_exactly() {
    apic_round_trip("hpet");
}

/// The RTC alarm wakes the machine from S3 at a recorded poll; the replay
/// wakes it there too and resumes at the waking vector.
#[test]
fn s3_and_its_rtc_wake_replay_exactly() {
    apic_round_trip("s3");
}

#[test]
fn pm_timer_rate_replays_exactly() {
    apic_round_trip("pmtimer");
}

/// The ACPI tables, the PM timer and ACPI_ENABLE, then S5: every replay
/// ends powered off too.
#[test]
fn acpi_power_off_replays_exactly() {
    apic_round_trip("acpi");
}

/// TSC-deadline interrupts (no golden output: QEMU's TCG has no such
/// timer): the recording passes the guest's own checks, with the deadlines
/// on the virtual TSC that the patched `rdtsc` reads, and every replay
/// repeats it.
#[test]
fn tsc_deadline_interrupts_replay_exactly() {
    if !kvm_available() {
        return;
    }
    let rec = round_trip_on("tscdl", None, VerifyLevel::Full, Irqchip::Apic);
    assert_eq!(rec.outcome, RunOutcome::DebugExit(nyx_guests::TSCDL_EXIT));
    assert_eq!(String::from_utf8_lossy(&rec.serial), nyx_guests::TSCDL_OUTPUT);
}

/// A busy loop under the local APIC timer: every tick a landing, every EOI
/// an MMIO exit.
#[test]
fn apic_timer_landings_in_a_busy_loop_replay_exactly() {
    if !kvm_available() {
        return;
    }
    let rec = round_trip_on("apiccounter", None, VerifyLevel::Exits, Irqchip::Apic);
    // The main loop never exits: every tick is an asynchronous landing.
    assert!(rec.landings >= 10, "only {} landings", rec.landings);
}

/// Full verification (a register digest at every exit) of a guest whose
/// ticks come through late interrupt windows: the window exit's landing
/// follows it directly, and the replay reaches it.
#[test]
fn full_verification_replays_interrupt_window_landings() {
    if !kvm_available() {
        return;
    }
    // 4 MiB of RAM: every keyframe of a full verification digests all of
    // it, which an unoptimised test build does slowly.
    let dir = tempfile::tempdir().unwrap();
    let image = nyx_guests::image("counter").expect("guest").to_vec();
    let out = Capture::default();
    let options = guest_options(
        dir.path().join("full.nyxtrace"),
        "counter",
        None,
        &out,
        VerifyLevel::Full,
        Irqchip::Legacy,
    );
    let rec = record_image(
        RecordOptions { mem_mib: 4, ..options },
        "counter".to_string(),
        image,
        None,
    )
    .unwrap();
    assert_eq!(rec.outcome, RunOutcome::DebugExit(nyx_guests::COUNTER_EXIT));
    assert!(rec.landings >= 10, "only {} landings", rec.landings);
    // A replay that misses a window's landing spins in the guest's loop
    // for ever: give it a bound.
    let (tx, rx) = std::sync::mpsc::channel();
    let path = rec.path.clone();
    std::thread::spawn(move || {
        let _ = tx.send(replay_guest(&path).map_err(|e| e.to_string()));
    });
    let (serial, end) = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the replay ends within 60 s")
        .unwrap();
    assert_eq!(serial, out.bytes());
    match end {
        ReplayEnd::Complete { outcome } => assert_eq!(outcome, rec.outcome),
        other => panic!("replay did not complete: {other:?}"),
    }
}

#[test]
fn rdtsc_values_replay_exactly() {
    if !kvm_available() {
        return;
    }
    round_trip("rdtsc", None, VerifyLevel::Full);
}

/// A Linux-style alternative copies a patched `rdtsc` (and `rdtscp`) over
/// an instruction slot; the copy traps where nothing was patched at load,
/// and must still read the TSC, in the recording and in its replays (Linux
/// spun forever in `udelay` when the copy's trap was taken for a port write).
#[test]
fn copies_of_patched_alternatives_read_the_tsc_and_replay() {
    if !kvm_available() {
        return;
    }
    let rec = round_trip("altinstr", None, VerifyLevel::Full);
    let serial = String::from_utf8_lossy(&rec.serial);
    assert_eq!(
        rec.outcome,
        RunOutcome::DebugExit(nyx_guests::ALTINSTR_EXIT),
        "{serial}"
    );
    assert!(serial.ends_with("altinstr: ok\n"), "{serial}");
}

#[test]
fn serial_input_by_interrupt_replays_without_input() {
    if !kvm_available() {
        return;
    }
    let rec = round_trip("echo", Some(b"replay me.ignored"), VerifyLevel::Exits);
    assert!(String::from_utf8_lossy(&rec.serial).contains("REPLAY ME"));
}

#[test]
fn rtc_and_pit_latches_replay_exactly() {
    if !kvm_available() {
        return;
    }
    round_trip("rtc", None, VerifyLevel::Exits);
}

#[test]
fn triple_fault_replays_with_the_same_crash_report() {
    if !kvm_available() {
        return;
    }
    let rec = round_trip("triple", None, VerifyLevel::Full);
    assert!(matches!(rec.outcome, RunOutcome::Crashed(_)));
}

#[test]
fn software_interrupts_are_exits_that_replay() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rec = record_guest(dir.path(), "softint", "s.nyxtrace", None, VerifyLevel::Full);
    assert_eq!(rec.outcome, RunOutcome::DebugExit(nyx_guests::SOFTINT_EXIT));
    let mut r = TraceReader::open(&rec.path).unwrap();
    let mut soft = Vec::new();
    for i in 0..r.frames().len() {
        if r.frames()[i].kind == FrameKind::Events {
            let events: Vec<Event> = nyx_vmm::events::read_events(&mut r, i).unwrap();
            soft.extend(events.iter().filter_map(|e| match e {
                Event::Exit(x) if x.kind == ExitKind::SoftInt => Some(x.addr),
                _ => None,
            }));
        }
    }
    // On emulated KVM both are exits Nyx delivers; on hardware KVM neither
    // exits. Either way the replay must agree.
    assert!(soft.is_empty() || soft == vec![3, 0x30], "{soft:?}");
    round_trip("softint", None, VerifyLevel::Full);
}

/// Records `name` with `limits`; returns the recording and its output.
fn record_with_limits(dir: &Path, name: &str, limits: nyx_vmm::machine::limits::Limits) -> Recorded {
    let image = nyx_guests::image(name).expect("guest").to_vec();
    let out = Capture::default();
    let mut session = nyx_recorder::start_image(
        guest_options(
            dir.join("limit.nyxtrace"),
            name,
            None,
            &out,
            VerifyLevel::Exits,
            Irqchip::default(),
        ),
        name.to_string(),
        image,
        None,
    )
    .unwrap();
    session.machine().set_limits(limits);
    let rec = session.run().unwrap();
    Recorded {
        path: rec.path,
        serial: out.bytes(),
        outcome: rec.outcome,
        landings: rec.landings,
    }
}

#[test]
fn a_recording_stopped_by_its_output_replays_to_the_same_point() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = "tick 20";
    let rec = record_with_limits(
        dir.path(),
        "pit",
        nyx_vmm::machine::limits::Limits {
            until_output: Some(text.into()),
            max_guest_ns: None,
        },
    );
    assert_eq!(rec.outcome, RunOutcome::Limit(Limit::Output(text.into())));
    assert_eq!(rec.outcome.exit_status(), 0);
    let out = String::from_utf8_lossy(&rec.serial).to_string();
    assert!(out.contains(text) && !out.contains("tick 30"), "{out}");
    for _ in 0..2 {
        let (serial, end) = replay_guest(&rec.path).unwrap();
        assert_eq!(String::from_utf8_lossy(&serial), out);
        match end {
            ReplayEnd::Complete { outcome } => assert_eq!(outcome, rec.outcome),
            other => panic!("replay did not complete: {other:?}"),
        }
    }
}

/// A guest that exits every few microseconds while it waits for its timer
/// (a loop of port reads, interrupts on, no HLT) still gets its ticks while
/// recorded: 20 ticks of 1 ms come within 500 ms of guest time, and the
/// recording replays.
#[test]
fn a_loop_of_exits_gets_its_timer_interrupts_while_recorded() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rec = record_with_limits(
        dir.path(),
        "busyio",
        nyx_vmm::machine::limits::Limits {
            until_output: None,
            max_guest_ns: Some(500_000_000),
        },
    );
    let out = String::from_utf8_lossy(&rec.serial).to_string();
    assert_eq!(rec.outcome, RunOutcome::DebugExit(nyx_guests::BUSYIO_EXIT), "{out}");
    let (serial, end) = replay_guest(&rec.path).unwrap();
    assert_eq!(String::from_utf8_lossy(&serial), out);
    match end {
        ReplayEnd::Complete { outcome } => assert_eq!(outcome, rec.outcome),
        other => panic!("replay did not complete: {other:?}"),
    }
}

#[test]
fn a_recording_stopped_by_guest_time_replays_to_the_same_point() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // pit takes 50 ticks of 1 ms: stop it after about 25.
    let max = 25_000_000;
    let rec = record_with_limits(
        dir.path(),
        "pit",
        nyx_vmm::machine::limits::Limits {
            until_output: None,
            max_guest_ns: Some(max),
        },
    );
    assert_eq!(rec.outcome, RunOutcome::Limit(Limit::GuestTime(max)));
    let out = String::from_utf8_lossy(&rec.serial).to_string();
    assert!(!out.contains("tick 50"), "{out}");
    let (serial, end) = replay_guest(&rec.path).unwrap();
    assert_eq!(String::from_utf8_lossy(&serial), out);
    assert!(matches!(end, ReplayEnd::Complete { outcome } if outcome == rec.outcome));
}

#[test]
fn two_recordings_differ_and_each_replays_its_own() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = record_guest(dir.path(), "rdtsc", "a.nyxtrace", None, VerifyLevel::Exits);
    let b = record_guest(dir.path(), "rdtsc", "b.nyxtrace", None, VerifyLevel::Exits);
    assert_ne!(
        a.serial, b.serial,
        "two recordings of a TSC-dependent guest printed the same hash"
    );
    assert_eq!(replay_guest(&a.path).unwrap().0, a.serial);
    assert_eq!(replay_guest(&b.path).unwrap().0, b.serial);
}

/// What the events frame codec saves: each guest's recorded events (without
/// landings, whose keyframes vary from run to run), compressed as a plain
/// postcard list and through the codec, at the trace's zstd level. The
/// RDTSC guest's time samples and values must shrink by at least a third
/// (3.7-4.7x measured; the values alone took about 3 bytes each, so a
/// codec that stopped predicting them would land near 1.3x), a margin for
/// the host-time jitter of a loaded machine, which is what is left in the
/// steps, and its time samples alone may cost at most 1.5 B each (0.9-1.1
/// measured; 2.1 before the recording's quantum); no guest may grow by
/// more than the codec's few header bytes. Prints the table BENCHMARKS.md
/// quotes (`-- --nocapture`).
#[test]
fn the_frame_codec_shrinks_time_samples_and_costs_nothing_elsewhere() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let zstd = |b: &[u8]| zstd::bulk::compress(b, nyx_trace::DEFAULT_ZSTD_LEVEL).unwrap().len();
    println!(
        "| guest | events | time samples | plain B | coded B | plain/coded | time samples alone, coded B per sample |"
    );
    for name in ["rdtsc", "rtc", "pit", "counter", "hello", "triple"] {
        let rec = record_guest(dir.path(), name, &format!("{name}.nyxtrace"), None, VerifyLevel::Exits);
        let mut r = TraceReader::open(&rec.path).unwrap();
        let mut events = Vec::new();
        for i in 0..r.frames().len() {
            if r.frames()[i].kind == FrameKind::Events {
                events.extend(nyx_vmm::events::read_events(&mut r, i).unwrap());
            }
        }
        events.retain(|e| !matches!(e, Event::Landing(_)));
        let samples = events.iter().filter(|e| matches!(e, Event::Time(_))).count();
        let plain = zstd(&postcard::to_stdvec(&events).unwrap());
        let coded = zstd(&nyx_vmm::events::encode_events(&events, 2_596_136).unwrap());
        let times: Vec<Event> = events.iter().filter(|e| matches!(e, Event::Time(_))).cloned().collect();
        let per_sample = zstd(&nyx_vmm::events::encode_events(&times, 2_596_136).unwrap()) as f64 / samples as f64;
        println!(
            "| {name} | {} | {samples} | {plain} | {coded} | {:.2} | {per_sample:.2} |",
            events.len(),
            plain as f64 / coded as f64
        );
        if name == "rdtsc" {
            assert!(coded * 3 < plain * 2, "{name}: {coded} coded vs {plain} plain");
            // Issue 15's bound: the recording's quantum and the codec's
            // second-order steps leave about 1 B of jitter per sample.
            assert!(per_sample <= 1.5, "{name}: {per_sample:.2} B per time sample");
        }
        assert!(
            coded <= plain + plain / 20 + 16,
            "{name}: {coded} coded vs {plain} plain"
        );
    }
}

/// Rewrites `src` into `dst` with `change` applied to the event list of each
/// events frame (the frames are checksummed anew, so the trace parses).
fn rewrite(src: &Path, dst: &Path, mut change: impl FnMut(&mut Vec<Event>)) {
    let mut r = TraceReader::open(src).unwrap();
    let header = r.header().clone();
    let mut w = TraceWriter::create(dst, &header).unwrap();
    for i in 0..r.frames().len() {
        let info = r.frames()[i];
        if info.kind == FrameKind::Events {
            let mut events: Vec<Event> = nyx_vmm::events::read_events(&mut r, i).unwrap();
            change(&mut events);
            nyx_vmm::events::write_events(&mut w, info.first_position, &events, 0).unwrap();
        } else {
            let f = r.read_frame(i).unwrap();
            w.write_frame(info.kind, info.first_position, &f.payload).unwrap();
        }
    }
    w.finish().unwrap();
}

/// The position (exits before it) of the first event for which `pick` holds.
fn position_of(path: &Path, mut pick: impl FnMut(&[Event], usize) -> bool) -> u64 {
    let mut r = TraceReader::open(path).unwrap();
    let mut pos = 0;
    for i in 0..r.frames().len() {
        if r.frames()[i].kind != FrameKind::Events {
            continue;
        }
        let events: Vec<Event> = nyx_vmm::events::read_events(&mut r, i).unwrap();
        for j in 0..events.len() {
            if pick(&events, j) {
                return pos;
            }
            if let Event::Exit(_) = events[j] {
                pos += 1;
            }
        }
    }
    panic!("no such event");
}

fn assert_diverges_at(path: &Path, pos: u64) {
    match replay_guest(path) {
        Err(nyx_replayer::Error::Diverged(d)) => {
            let want = format!("replay diverged at position {pos} ");
            assert!(d.text.starts_with(&want), "want {want:?}, got:\n{d}");
            assert!(d.text.contains("last events before the divergence"), "{d}");
            assert!(d.text.contains("code at rip"), "{d}");
        }
        Err(e) => panic!("want a divergence at {pos}, got error {e}"),
        Ok((_, end)) => panic!("tampered trace replayed: {end:?}"),
    }
}

#[test]
fn a_changed_rdtsc_value_is_a_divergence_at_its_position() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rec = record_guest(dir.path(), "rdtsc", "t.nyxtrace", None, VerifyLevel::Exits);
    // The 500th patched-instruction exit: change the time sample it consumed.
    let mut seen = 0;
    let target = |events: &[Event], j: usize| {
        if let (Event::Time(_), Some(Event::Exit(e))) = (&events[j], events.get(j + 1)) {
            if e.kind == ExitKind::Patched {
                seen += 1;
                return seen == 500;
            }
        }
        false
    };
    let pos = position_of(&rec.path, target);
    let bad = dir.path().join("bad.nyxtrace");
    let mut seen = 0;
    rewrite(&rec.path, &bad, |events| {
        for j in 0..events.len() {
            let next_is_patched = matches!(events.get(j + 1), Some(Event::Exit(e)) if e.kind == ExitKind::Patched);
            if let Event::Time(t) = &mut events[j] {
                if next_is_patched {
                    seen += 1;
                    if seen == 500 {
                        *t += 1_000_000;
                    }
                }
            }
        }
    });
    assert_diverges_at(&bad, pos);
}

#[test]
fn a_changed_serial_byte_is_a_divergence_at_its_position() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rec = record_guest(dir.path(), "echo", "t.nyxtrace", Some(b"abcdef."), VerifyLevel::Exits);
    // The UART takes the input early; the guest reads the first byte from
    // RBR later: that read is where the replay must stop.
    let pos = position_of(
        &rec.path,
        |events, j| matches!(events[j], Event::Exit(e) if e.kind == ExitKind::PioIn && e.addr == 0x3f8),
    );
    let bad = dir.path().join("bad.nyxtrace");
    rewrite(&rec.path, &bad, |events| {
        if let Some(Event::Input(b)) = events.iter_mut().find(|e| matches!(e, Event::Input(_))) {
            b[0] = b'x';
        }
    });
    assert_diverges_at(&bad, pos);
    let Err(nyx_replayer::Error::Diverged(d)) = replay_guest(&bad) else {
        panic!("no divergence");
    };
    assert!(d.text.contains("pio-in port 0x3f8 size 1 data 0x61"), "{d}");
    assert!(d.text.contains("pio-in port 0x3f8 size 1 data 0x78"), "{d}");
}

/// The keyframed landings of a trace, in order.
fn keyframed_landings(path: &Path) -> Vec<nyx_vmm::events::Landing> {
    let mut r = TraceReader::open(path).unwrap();
    let mut out = Vec::new();
    for i in 0..r.frames().len() {
        if r.frames()[i].kind == FrameKind::Events {
            let events: Vec<Event> = nyx_vmm::events::read_events(&mut r, i).unwrap();
            out.extend(events.into_iter().filter_map(|e| match e {
                Event::Landing(l) if l.keyframe.is_some() => Some(*l),
                _ => None,
            }));
        }
    }
    out
}

#[test]
fn counter_keyframes_hold_the_landing_registers_and_are_checked() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rec = record_guest(dir.path(), "counter", "t.nyxtrace", None, VerifyLevel::Exits);
    let landings = keyframed_landings(&rec.path);
    assert!(landings.len() >= 5, "only {} keyframed landings", landings.len());
    for l in &landings {
        let k = l.keyframe.as_deref().expect("keyframed");
        let v = &k.vcpu;
        assert_eq!(v.regs.rip, l.regs.rip);
        assert_eq!(nyx_vmm::vcpu_state::register_digest(&v.regs, &v.sregs), l.regs_digest);
        assert!(v.xsave.len() >= 4096, "{}", v.xsave.len());
        // The MSRs, but not the TSC (Nyx's clock, not KVM's, is the guest's time).
        assert!(v.msrs.len() > 8 && v.msrs.iter().all(|m| m.0 != 0x10), "{:x?}", v.msrs);
    }
    // A keyframe whose registers disagree with its landing's digest is a
    // divergence at that landing, not a replay that carries on.
    let nth = landings.len() / 2;
    let mut seen = 0;
    let pos = position_of(&rec.path, |events, j| {
        if matches!(&events[j], Event::Landing(l) if l.keyframe.is_some()) {
            seen += 1;
            return seen == nth + 1;
        }
        false
    });
    let bad = dir.path().join("bad.nyxtrace");
    let mut seen = 0;
    rewrite(&rec.path, &bad, |events| {
        for e in events.iter_mut() {
            if let Event::Landing(l) = e {
                if let Some(k) = l.keyframe.as_mut() {
                    if seen == nth {
                        k.vcpu.regs.rbx ^= 0x40;
                    }
                    seen += 1;
                }
            }
        }
    });
    assert_diverges_at(&bad, pos);
}

#[test]
fn a_trace_of_the_previous_format_version_is_refused_by_name() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rec = record_guest(dir.path(), "hello", "t.nyxtrace", None, VerifyLevel::Exits);
    let mut bytes = std::fs::read(&rec.path).unwrap();
    let old = nyx_trace::FORMAT_VERSION - 1;
    bytes[8..12].copy_from_slice(&old.to_le_bytes());
    let path = dir.path().join("old.nyxtrace");
    std::fs::write(&path, &bytes).unwrap();
    match replay_guest(&path) {
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("version {old}")) && msg.contains(&format!("version {}", old + 1)),
                "{msg}"
            );
        }
        Ok((_, end)) => panic!("a version-{old} trace replayed: {end:?}"),
    }
}
