//! Benchmark: what recording and replaying cost in Nyx, on the in-tree
//! guests. For each guest it runs, side by side in one process and
//! repetition after repetition, a plain run, a recording and a replay of
//! that recording, and reports medians of the `Machine::run` wall time of
//! each, the ratios record/plain and replay/record, the landing search cost
//! (breakpoint hits and single steps per landing), the trace's size (file,
//! events, compression) and the recorder's extra cost per exit and per
//! landing. Every replay is checked: it must complete with the recorded
//! outcome and print the recorded serial output, or the benchmark fails.
//!
//! A guest named `NAME@apic` runs on the modern platform (`--irqchip
//! apic`); for each guest an `IRQ` row gives the cost of an interrupt in
//! the plain run (exits and vCPU CPU time per injected interrupt), so the
//! PIC path (`pit`) compares with the IOAPIC/local APIC path (`ioapic@apic`:
//! the same 1 kHz PIT, through GSI 2, acknowledged by a local APIC EOI).
//!
//! `cargo bench -p nyx-tests --bench record_replay [-- REPS [GUEST ...]]`

use std::error::Error;
use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use nyx_recorder::{record_image, RecordOptions};
use nyx_replayer::{replay, ReplayEnd, ReplayOptions};
use nyx_tests::{kvm_available, Capture};
use nyx_trace::{FrameKind, TraceReader};
use nyx_vmm::config::VerifyLevel;
use nyx_vmm::events::Event;
use nyx_vmm::machine::ExitStats;
use nyx_vmm::{MachineBuilder, SerialIn};

type Res<T> = Result<T, Box<dyn Error>>;

/// The guests measured, in the order reported.
const GUESTS: &[&str] = &[
    "hello",
    "counter",
    "rdtsc",
    "rtc",
    "pit",
    "echo",
    "pit@apic",
    "ioapic@apic",
    "lapic@apic",
    "hpet@apic",
    "apiccounter@apic",
];

/// The guest's name and platform of a `NAME[@apic]` spec.
fn spec(s: &str) -> (&str, nyx_vmm::config::Irqchip) {
    match s.strip_suffix("@apic") {
        Some(name) => (name, nyx_vmm::config::Irqchip::Apic),
        None => (s, nyx_vmm::config::Irqchip::Legacy),
    }
}

/// One plain run.
struct Plain {
    stats: ExitStats,
    serial: Vec<u8>,
}

/// One recording, replayed once.
struct RoundTrip {
    rec_stats: ExitStats,
    rec_serial: Vec<u8>,
    exits: u64,
    events: u64,
    landings: u64,
    file_bytes: u64,
    event_stored: u64,
    event_raw: u64,
    virtual_ns: u64,
    rep_stats: ExitStats,
    hits_per_landing: Vec<u64>,
}

/// The serial input a guest needs (the echo guest reads its golden input).
fn input_of(name: &str) -> Option<Vec<u8>> {
    nyx_guests::expected(name).and_then(|e| e.input).map(<[u8]>::to_vec)
}

fn plain_run(guest: &str) -> Res<Plain> {
    let (name, irqchip) = spec(guest);
    let image = nyx_guests::image(name).ok_or("unknown guest")?;
    let out = Capture::default();
    let mut b = MachineBuilder::new()
        .memory(64)
        .kernel_image(name, image.to_vec())
        .irqchip(irqchip)
        .serial_out(Box::new(out.clone()));
    if let Some(i) = input_of(name) {
        b = b.serial_in(SerialIn::Bytes(i));
    }
    let mut m = b.build()?;
    m.run()?;
    Ok(Plain {
        stats: m.stats().clone(),
        serial: out.bytes(),
    })
}

/// Virtual time at the end of the trace (from its end record), and the
/// stored and raw bytes of its event frames.
fn trace_facts(path: &Path) -> Res<(u64, u64, u64)> {
    let mut r = TraceReader::open(path)?;
    let (mut stored, mut raw, mut virtual_ns) = (0u64, 0u64, 0u64);
    for i in 0..r.frames().len() {
        let info = r.frames()[i];
        if info.kind != FrameKind::Events {
            continue;
        }
        stored += u64::from(info.compressed_len);
        raw += u64::from(info.uncompressed_len);
        let events: Vec<Event> = nyx_vmm::events::read_events(&mut r, i)?;
        for e in events {
            if let Event::End(end) = e {
                virtual_ns = end.virtual_ns;
            }
        }
    }
    Ok((virtual_ns, stored, raw))
}

/// How a round trip went: measured, or the replay did not finish in time.
enum Trip {
    Done(Box<RoundTrip>),
    Hung(Duration),
}

/// A replay may run this many times the recording's run time...
const REPLAY_LIMIT_FACTOR: u64 = 50;
/// ...or this long, whichever is longer, before it counts as hung.
const REPLAY_LIMIT_MIN: Duration = Duration::from_secs(10);

/// Replays `path` on its own thread. If it has not finished after `limit`,
/// the thread is kicked (the machine's kick signal makes `KVM_RUN` return,
/// which stops a landing search) until the replay returns, and `None` is
/// the answer: a replay that does not end is a finding, not a benchmark.
fn replay_with_limit(path: &Path, out: Capture, limit: Duration) -> Res<Option<nyx_replayer::Replay>> {
    let (tx, rx) = mpsc::channel();
    let path = path.to_path_buf();
    let worker = std::thread::spawn(move || {
        let r = replay(
            &path,
            ReplayOptions {
                serial_out: Some(Box::new(out)),
                ..Default::default()
            },
        );
        let _ = tx.send(());
        r
    });
    if rx.recv_timeout(limit).is_ok() {
        return match worker.join() {
            Ok(r) => Ok(Some(r?)),
            Err(_) => Err("the replay thread panicked".into()),
        };
    }
    let thread = worker.as_pthread_t();
    while rx.recv_timeout(Duration::from_millis(20)).is_err() {
        // SAFETY: the thread has not been joined, so its id is valid; the
        // kick signal's handler only sets the thread's immediate_exit flag.
        unsafe { libc::pthread_kill(thread, nyx_vmm::kick::kick_signal()) };
    }
    let _ = worker.join();
    Ok(None)
}

fn round_trip(dir: &Path, guest: &str, rep: usize) -> Res<Trip> {
    let (name, irqchip) = spec(guest);
    let image = nyx_guests::image(name).ok_or("unknown guest")?;
    let out = Capture::default();
    let rec = record_image(
        RecordOptions {
            cpus: 1,
            out: dir.join(format!("{name}-{rep}.nyxtrace")),
            kernel: PathBuf::from(name),
            kernel_name: Some(name.to_string()),
            initrd: None,
            cmdline: String::new(),
            mem_mib: 64,
            serial_in: input_of(name).map_or(SerialIn::None, SerialIn::Bytes),
            serial_out: Some(Box::new(out.clone())),
            kvm_path: nyx_tests::kvm_device(),
            verify: VerifyLevel::Exits,
            landings: nyx_recorder::LandingPolicy::Auto,
            cpu: Default::default(),
            irqchip,
            pci: Default::default(),
        },
        name.to_string(),
        image.to_vec(),
        None,
    )?;
    let file_bytes = std::fs::metadata(&rec.path)?.len();
    let (virtual_ns, event_stored, event_raw) = trace_facts(&rec.path)?;
    let replay_out = Capture::default();
    let limit = Duration::from_nanos(rec.stats.wall_ns.saturating_mul(REPLAY_LIMIT_FACTOR)).max(REPLAY_LIMIT_MIN);
    let r = match replay_with_limit(&rec.path, replay_out.clone(), limit)? {
        Some(r) => r,
        None => return Ok(Trip::Hung(limit)),
    };
    match &r.end {
        ReplayEnd::Complete { outcome } if *outcome == rec.outcome => {}
        other => return Err(format!("{name}: replay ended {other:?}, recorded {:?}", rec.outcome).into()),
    }
    if replay_out.bytes() != out.bytes() {
        return Err(format!("{name}: the replay printed other serial output than the recording").into());
    }
    // Every landing is either searched (one entry in hits_per_landing) or
    // restored from its keyframe.
    if r.landings != rec.landings || r.hits_per_landing.len() as u64 + r.keyframes != rec.landings {
        return Err(format!("{name}: {} landings recorded, {} found", rec.landings, r.landings).into());
    }
    std::fs::remove_file(&rec.path)?;
    Ok(Trip::Done(Box::new(RoundTrip {
        rec_stats: rec.stats,
        rec_serial: out.bytes(),
        exits: rec.exits,
        events: rec.events,
        landings: rec.landings,
        file_bytes,
        event_stored,
        event_raw,
        virtual_ns,
        rep_stats: r.stats,
        hits_per_landing: r.hits_per_landing,
    })))
}

/// The median of `v` (the upper one of an even count); 0 for none.
fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn median_u(v: impl IntoIterator<Item = u64>) -> u64 {
    let mut v: Vec<u64> = v.into_iter().collect();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// The counter guest's last sample: iterations of its busy loop by the 50th
/// tick (the last 16-hex-digit line it prints).
fn counter_iterations(serial: &[u8]) -> Option<u64> {
    String::from_utf8_lossy(serial)
        .lines()
        .filter(|l| l.len() == 16)
        .filter_map(|l| u64::from_str_radix(l, 16).ok())
        .next_back()
}

fn ms(ns: f64) -> f64 {
    ns / 1e6
}

/// Per-guest medians over all repetitions, printed as one table row each.
fn report(name: &str, plains: &[Plain], trips: &[RoundTrip]) {
    if trips.is_empty() {
        println!("NONE|{name}|no repetition completed");
        return;
    }
    let med = |f: &dyn Fn(usize) -> f64| median_f((0..trips.len()).map(f).collect());
    let plain_ms = med(&|i| ms(plains[i].stats.wall_ns as f64));
    let rec_ms = med(&|i| ms(trips[i].rec_stats.wall_ns as f64));
    let rep_ms = med(&|i| ms(trips[i].rep_stats.wall_ns as f64));
    let rec_plain = med(&|i| trips[i].rec_stats.wall_ns as f64 / plains[i].stats.wall_ns.max(1) as f64);
    let rep_rec = med(&|i| trips[i].rep_stats.wall_ns as f64 / trips[i].rec_stats.wall_ns.max(1) as f64);
    let exits = median_u(trips.iter().map(|t| t.exits));
    let plain_exits = median_u(plains.iter().map(|p| p.stats.exits()));
    let landings = median_u(trips.iter().map(|t| t.landings));
    let all_hits: Vec<u64> = trips.iter().flat_map(|t| t.hits_per_landing.iter().copied()).collect();
    let hits_med = median_u(all_hits.iter().copied());
    let hits_max = all_hits.iter().copied().max().unwrap_or(0);
    let hits_total = median_u(trips.iter().map(|t| t.hits_per_landing.iter().sum::<u64>()));
    let events = median_u(trips.iter().map(|t| t.events));
    let file = median_u(trips.iter().map(|t| t.file_bytes));
    let stored = median_u(trips.iter().map(|t| t.event_stored));
    let raw = median_u(trips.iter().map(|t| t.event_raw));
    let virt_ms = ms(median_u(trips.iter().map(|t| t.virtual_ns)) as f64);
    // The recorder's extra wall and user CPU over the plain run, per exit and
    // per landing (all of it charged to each in turn).
    let extra_wall = med(&|i| trips[i].rec_stats.wall_ns as f64 - plains[i].stats.wall_ns as f64);
    // User CPU is accounted at tick granularity: a single run's is noise, so
    // this one is the sum over all repetitions divided by their count.
    let sum = |f: &dyn Fn(usize) -> u64| (0..trips.len()).map(f).sum::<u64>() as f64;
    let extra_user = (sum(&|i| trips[i].rec_stats.user_ns) - sum(&|i| plains[i].stats.user_ns)) / trips.len() as f64;
    let per = |x: f64, n: u64| {
        if n == 0 {
            "–".to_string()
        } else {
            format!("{:.1}", x / n as f64 / 1e3)
        }
    };
    // Replay time beyond the recording's, per search hit.
    let extra_rep = med(&|i| trips[i].rep_stats.wall_ns as f64 - trips[i].rec_stats.wall_ns as f64);
    println!(
        "TIME|{name}|{plain_ms:.1}|{rec_ms:.1}|{rep_ms:.1}|{rec_plain:.2}|{rep_rec:.2}|{plain_exits}|{exits}|{landings}"
    );
    // Only where the search dominates the replay is this a cost per hit.
    let per_hit = if hits_total >= 100 {
        per(extra_rep, hits_total)
    } else {
        "–".to_string()
    };
    println!("SEARCH|{name}|{landings}|{hits_med}|{hits_max}|{hits_total}|{per_hit}");
    let virt_s = virt_ms / 1e3;
    println!(
        "SIZE|{name}|{file}|{events}|{stored}|{:.2}|{}|{:.1}|{virt_ms:.1}",
        stored as f64 / events.max(1) as f64,
        if virt_ms >= 1.0 {
            format!("{:.0}", stored as f64 / virt_s)
        } else {
            "–".to_string()
        },
        raw as f64 / stored.max(1) as f64
    );
    println!(
        "COST|{name}|{:.2}|{:.2}|{}|{}|{}|{}|{}",
        ms(extra_wall),
        ms(extra_user),
        per(extra_wall, exits),
        per(extra_user, exits),
        per(extra_wall, events),
        per(extra_wall, landings),
        per(extra_user, landings)
    );
    // The cost of an interrupt in the plain run: exits per injected
    // interrupt, and the vCPU thread's CPU time (user: Nyx; system: KVM and
    // the emulated guest) per interrupt and per exit.
    let injected = median_u(plains.iter().map(|p| p.stats.injected));
    if injected > 0 {
        let per_irq = |f: &dyn Fn(&ExitStats) -> u64| {
            median_f(
                plains
                    .iter()
                    .map(|p| f(&p.stats) as f64 / p.stats.injected.max(1) as f64)
                    .collect(),
            )
        };
        let cpu_per_exit = median_f(
            plains
                .iter()
                .map(|p| (p.stats.user_ns + p.stats.sys_ns) as f64 / p.stats.exits().max(1) as f64 / 1e3)
                .collect(),
        );
        println!(
            "IRQ|{name}|{injected}|{:.2}|{:.2}|{:.2}|{:.1}|{:.1}|{cpu_per_exit:.1}",
            per_irq(&|s| s.exits()),
            per_irq(&|s| s.pio),
            per_irq(&|s| s.mmio),
            per_irq(&|s| s.user_ns) / 1e3,
            per_irq(&|s| s.user_ns + s.sys_ns) / 1e3,
        );
    }
    if name == "counter" || name == "apiccounter@apic" {
        let p = median_u(plains.iter().filter_map(|p| counter_iterations(&p.serial)));
        let r = median_u(trips.iter().filter_map(|t| counter_iterations(&t.rec_serial)));
        println!(
            "COUNTER|busy-loop iterations by tick 50: plain {p}, record {r}, record/plain {:.3}",
            r as f64 / p.max(1) as f64
        );
    }
}

fn main() -> Res<()> {
    if !kvm_available() {
        return Ok(());
    }
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let reps: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(9).max(1);
    let picked: Vec<&str> = GUESTS
        .iter()
        .copied()
        .filter(|g| args.iter().all(|a| a.parse::<usize>().is_ok()) || args.iter().any(|a| a == g))
        .collect();
    let dir = tempfile::tempdir()?;
    println!("repetitions: {reps}; figures are medians; times are Machine::run wall time");
    println!("TIME|guest|plain ms|record ms|replay ms|record/plain|replay/record|plain exits|record exits|landings");
    println!("SEARCH|guest|landings|hits+steps per landing, median|max|per run|replay-record per hit us");
    println!("SIZE|guest|file B|events|event frames B|B/event|event B per virtual s|compression|virtual ms");
    println!(
        "COST|guest|record-plain ms|user CPU ms|per exit us|user per exit us|per event us|per landing us|user per landing us"
    );
    println!(
        "IRQ|guest|interrupts (plain)|exits per interrupt|port exits per interrupt|MMIO exits per interrupt|user CPU per interrupt us|user+sys CPU per interrupt us|user+sys CPU per exit us"
    );
    for name in picked {
        // Warm-up: page in the image, the KVM module's paths, the allocator.
        plain_run(name)?;
        let mut plains = Vec::new();
        let mut trips = Vec::new();
        for rep in 0..reps {
            let p = plain_run(name)?;
            let t = match round_trip(dir.path(), name, rep) {
                Ok(Trip::Done(t)) => *t,
                Err(e) => {
                    let first = e
                        .to_string()
                        .lines()
                        .take(3)
                        .map(str::trim)
                        .collect::<Vec<_>>()
                        .join(" / ");
                    println!("FAILED|{name}|repetition {rep}: {first}");
                    continue;
                }
                Ok(Trip::Hung(limit)) => {
                    println!("HUNG|{name}|repetition {rep}: the replay had not ended after {limit:?}; stopped");
                    continue;
                }
            };
            let timing_dependent = ["counter", "rdtsc", "rtc", "apiccounter@apic"].contains(&name);
            if !timing_dependent && p.serial != t.rec_serial {
                return Err(format!("{name}: a recording printed other output than a plain run").into());
            }
            plains.push(p);
            trips.push(t);
        }
        report(name, &plains, &trips);
    }
    Ok(())
}
