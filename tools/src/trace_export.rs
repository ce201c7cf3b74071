//! `nyx trace export FILE --format chrome`: a trace as Chrome trace-event
//! JSON (the "JSON Object Format": `{"otherData": {..}, "traceEvents":
//! [..]}`), which Perfetto and chrome://tracing open, to see where a
//! guest's time goes.
//!
//! **The time axis is the guest's virtual time**, `ts` in microseconds. A
//! trace knows it only at its time samples (`Event::Time`, logged where a
//! device read the clock; at most one per step of the run loop) and at the
//! end record (`EndRecord::virtual_ns`). A sample is logged while the
//! exit that read the clock is handled, before that exit's record, so the
//! first event after a sample gets the sample's time and the others up to
//! the next sample are spread evenly, by their index, between the two;
//! events before the first sample take the first sample's time; events
//! after the last one (a trace that was cut off) take the last one's (0
//! without any). A sample below the one before it (never written by Nyx)
//! is taken as the one before, so every track's times are non-decreasing.
//! Each event is written as it is read: for the events after a frame's
//! last sample the export reads ahead to the next sample ([`Ahead`]),
//! keeping the frame after the current one for later and decoding any
//! further ones again when it gets there, so it holds about two frames
//! however far apart the samples are.
//!
//! One process, "guest", with one track (thread) per kind of event,
//! labelled by `thread_name` metadata as it is first used: one per exit
//! kind (`exit pio-out`, `exit hlt`, ...; port I/O named by port),
//! `interrupts` (each injection, named by vector), `landings` (position,
//! RIP, dirty pages, whether keyframed and how many pages the keyframe
//! holds), `serial output` (one event per line COM1 transmitted, rebuilt
//! from the writes to its transmit register with DLAB and loopback off;
//! a trace recorded from a snapshot is taken to start with both off),
//! `input` (serial and virtio-console input), `platform` (power button,
//! lid, battery, temperature), `entropy` (RDRAND, virtio-rng, embedded disk
//! reads: sizes only), `device polls` and `end`. Counters: `time sample`
//! (the gap to the previous sample, µs), `serial output` (bytes so far)
//! and, with `--replay`, `landing replay cost` (µs). Register digests
//! (`--verify full`) are not exported. What virtio-console wrote is not
//! in a trace (the guest's memory holds it), so it is not exported.
//!
//! **Landing costs** are only known by replaying: `--replay` replays the
//! trace first (it needs /dev/kvm) and adds to each landing the host time
//! its search or keyframe restore took and its breakpoint hits
//! (`nyx_replayer::LandingCost`); the replay's own wall time is not the
//! axis.
//!
//! The JSON is written as the trace is read, one event per line; a finished
//! `--out` file is renamed into place, so a failed export leaves none. A
//! trace that was cut off (`.partial`) is exported up to its last complete
//! frame with a warning, as `nyx trace dump` reads it; a frame that fails
//! its checksum or does not decode is an error.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use nyx_devices::acpi_pm::EventDecoder;
use nyx_replayer::LandingCost;
use nyx_trace::{FrameKind, TraceReader};
use nyx_vmm::events::{Event, ExitKind, ExitRecord, Landing};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

/// The formats `nyx trace export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Chrome trace-event JSON (Perfetto, chrome://tracing).
    Chrome,
}

/// Errors of `nyx trace export`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The trace cannot be read.
    #[error("{path}: {source}")]
    Trace {
        /// The path.
        path: String,
        /// Why.
        source: nyx_trace::Error,
    },
    /// Writing the JSON failed.
    #[error("writing {to}: {source}")]
    Write {
        /// Where: the output file or stdout.
        to: String,
        /// Why.
        source: io::Error,
    },
    /// `--replay` could not replay the trace.
    #[error("--replay: {0}")]
    Replay(String),
}

/// Why the export stopped: reading the trace or writing the JSON.
#[derive(Debug)]
enum Fail {
    Read(nyx_trace::Error),
    Write(io::Error),
}

impl From<io::Error> for Fail {
    fn from(e: io::Error) -> Self {
        Fail::Write(e)
    }
}

impl From<serde_json::Error> for Fail {
    fn from(e: serde_json::Error) -> Self {
        Fail::Write(e.into())
    }
}

/// What an export wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Events read from the trace.
    pub events: u64,
    /// Trace events written (metadata included).
    pub written: u64,
    /// Guest-caused exits, the last position.
    pub position: u64,
    /// The trace was finished (else cut off, exported up to its last
    /// complete frame).
    pub complete: bool,
    /// Landings.
    pub landings: u64,
    /// Landings with a replay cost.
    pub costed: u64,
}

/// `nyx trace export FILE --format F [--out OUT] [--replay]`: with
/// `replay` (the KVM device and the disk images) the trace is replayed
/// first for its landings' costs.
pub fn run(
    path: &Path,
    format: Format,
    out: Option<&Path>,
    replay: Option<(&str, &[PathBuf])>,
) -> Result<ExitCode, Error> {
    let costs = match replay {
        Some((kvm, disks)) => Some(replay_costs(path, kvm, disks.to_vec())?),
        None => None,
    };
    match format {
        Format::Chrome => export(path, out, costs.as_deref()),
    }
}

/// Exports the trace at `path` as Chrome JSON to `out` (or stdout).
pub fn export(path: &Path, out: Option<&Path>, costs: Option<&[LandingCost]>) -> Result<ExitCode, Error> {
    let mut r = TraceReader::open(path).map_err(|source| Error::Trace {
        path: path.display().to_string(),
        source,
    })?;
    let name = path.display().to_string();
    let (result, to) = match out {
        None => {
            let mut w = io::BufWriter::with_capacity(1 << 20, io::stdout().lock());
            let r = write_chrome(&mut r, &name, costs, &mut w).and_then(|s| {
                w.flush()?;
                Ok(s)
            });
            match r {
                // The reader of stdout has all it wanted (`| head`).
                Err(Fail::Write(e)) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
                r => (r, "stdout".to_string()),
            }
        }
        Some(out) => (write_file(&mut r, &name, costs, out), out.display().to_string()),
    };
    let summary = result.map_err(|f| match f {
        Fail::Read(source) => Error::Trace {
            path: name.clone(),
            source,
        },
        Fail::Write(source) => Error::Write { to, source },
    })?;
    if !summary.complete {
        eprintln!(
            "nyx: warning: {name} was cut off (no index or footer): exported up to its last complete frame, position {}",
            summary.position
        );
    }
    if let Some(c) = costs {
        if summary.costed < summary.landings || c.len() as u64 > summary.landings {
            eprintln!(
                "nyx: warning: the replay reached {} landings, the trace has {}: only the first {} have a replay cost",
                c.len(),
                summary.landings,
                summary.costed
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `OUT.partial` and renames it to `out` once complete; removes it
/// on failure.
fn write_file(r: &mut TraceReader, name: &str, costs: Option<&[LandingCost]>, out: &Path) -> Result<Summary, Fail> {
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let result = (|| {
        let mut w = io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&partial)?);
        let s = write_chrome(r, name, costs, &mut w)?;
        w.into_inner().map_err(|e| e.into_error())?;
        std::fs::rename(&partial, out)?;
        Ok(s)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Replays the trace at `path` (output dropped) for what each landing
/// cost, in trace order.
pub fn replay_costs(path: &Path, kvm_path: &str, disks: Vec<PathBuf>) -> Result<Vec<LandingCost>, Error> {
    let opts = nyx_replayer::ReplayOptions {
        serial_out: Some(Box::new(io::sink())),
        kvm_path: kvm_path.to_string(),
        disks,
        console_out: None,
    };
    match nyx_replayer::replay(path, opts) {
        Ok(r) => Ok(r.landing_costs),
        Err(nyx_replayer::Error::Diverged(d)) => Err(Error::Replay(format!(
            "the replay diverged ({}); `nyx replay {}` prints the report",
            d.text.lines().next().unwrap_or("no report").trim(),
            path.display()
        ))),
        Err(e) => Err(Error::Replay(e.to_string())),
    }
}

/// A number written as a hex string ("0x3f8").
struct Hex(u64);

impl Serialize for Hex {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:#x}", self.0))
    }
}

/// One trace event. `s` is the scope of an instant event. `ph` and `ts`
/// come first: some readers look an event's time up key by key and give
/// up at a string escape they do not know (`\u001b`) before reaching it.
#[derive(Serialize)]
struct TraceEvent<'a, A: Serialize> {
    ph: &'static str,
    ts: f64,
    pid: u32,
    tid: u32,
    name: Name<'a>,
    cat: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    s: Option<&'static str>,
    args: A,
}

/// An event's name as a viewer lists it: control characters (a guest's
/// escape sequences) written as `.`; the exact bytes are in the args.
struct Name<'a>(&'a str);

impl Serialize for Name<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.chars().any(char::is_control) {
            let shown: String = self.0.chars().map(|c| if c.is_control() { '.' } else { c }).collect();
            s.serialize_str(&shown)
        } else {
            s.serialize_str(self.0)
        }
    }
}

/// The one process: the guest.
const PID: u32 = 1;

/// The tracks, by thread id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Track {
    Exit(ExitKind),
    Interrupts,
    Landings,
    Serial,
    Input,
    Platform,
    Entropy,
    Polls,
    End,
    /// The counters' (Chrome keys counters by process and name).
    Counters,
    /// Switches between vCPUs (a machine with several).
    Vcpus,
}

impl Track {
    const COUNT: usize = ExitKind::ALL.len() + 11;

    fn tid(self) -> u32 {
        match self {
            Track::Counters => 1,
            Track::Landings => 2,
            Track::Interrupts => 3,
            Track::Serial => 4,
            Track::Input => 5,
            Track::Platform => 6,
            Track::Entropy => 7,
            Track::Polls => 8,
            Track::End => 9,
            Track::Exit(k) => 10 + ExitKind::ALL.iter().position(|x| *x == k).unwrap_or(0) as u32,
            Track::Vcpus => 10 + ExitKind::ALL.len() as u32,
        }
    }

    fn name(self) -> String {
        match self {
            Track::Exit(k) => format!("exit {}", k.name()),
            Track::Interrupts => "interrupts".into(),
            Track::Landings => "landings".into(),
            Track::Serial => "serial output".into(),
            Track::Input => "input".into(),
            Track::Platform => "platform".into(),
            Track::Entropy => "entropy".into(),
            Track::Polls => "device polls".into(),
            Track::End => "end".into(),
            Track::Counters => "counters".into(),
            Track::Vcpus => "vCPU switches".into(),
        }
    }
}

/// How many pages a landing's keyframe holds, if it has one.
fn keyframe_pages(l: &Landing) -> Option<u64> {
    l.keyframe
        .as_ref()
        .map(|k| k.pages.iter().map(|r| (r.data.len() as u64).div_ceil(4096)).sum())
}

/// Input bytes shown at most per event.
const INPUT_SHOWN: usize = 256;

/// COM1's registers that decide whether a write to its base transmits.
const COM1: u64 = 0x3f8;
const LCR_DLAB: u8 = 0x80;
const MCR_LOOP: u8 = 0x10;
/// A serial line is cut after this many bytes without a newline.
const LINE_MAX: usize = 4096;

/// The JSON writer and what it has written.
struct Out<'w> {
    w: &'w mut dyn Write,
    written: u64,
    named: [bool; Track::COUNT],
}

impl Out<'_> {
    fn raw<T: Serialize>(&mut self, e: &T) -> Result<(), Fail> {
        if self.written > 0 {
            self.w.write_all(b",\n")?;
        }
        serde_json::to_writer(&mut *self.w, e)?;
        self.written += 1;
        Ok(())
    }

    /// The track's `thread_name` and `thread_sort_index`, the first time.
    fn name_track(&mut self, t: Track) -> Result<(), Fail> {
        let tid = t.tid();
        let slot = &mut self.named[tid as usize % Track::COUNT];
        if std::mem::replace(slot, true) {
            return Ok(());
        }
        let name = t.name();
        self.raw(&meta("thread_name", tid, Named { name: &name }))?;
        self.raw(&meta("thread_sort_index", tid, Sorted { sort_index: tid }))
    }

    fn instant<A: Serialize>(&mut self, t: Track, name: &str, cat: &'static str, ns: u64, args: A) -> Result<(), Fail> {
        self.name_track(t)?;
        self.raw(&TraceEvent {
            name: Name(name),
            cat,
            ph: "i",
            ts: us(ns),
            pid: PID,
            tid: t.tid(),
            s: Some("t"),
            args,
        })
    }

    fn counter<A: Serialize>(&mut self, name: &str, ns: u64, args: A) -> Result<(), Fail> {
        self.name_track(Track::Counters)?;
        self.raw(&TraceEvent {
            name: Name(name),
            cat: "counter",
            ph: "C",
            ts: us(ns),
            pid: PID,
            tid: Track::Counters.tid(),
            s: None,
            args,
        })
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

#[derive(Serialize)]
struct Named<'a> {
    name: &'a str,
}

#[derive(Serialize)]
struct Sorted {
    sort_index: u32,
}

fn meta<A: Serialize>(name: &'static str, tid: u32, args: A) -> TraceEvent<'static, A> {
    TraceEvent {
        name: Name(name),
        cat: "__metadata",
        ph: "M",
        ts: 0.0,
        pid: PID,
        tid,
        s: None,
        args,
    }
}

#[derive(Serialize)]
struct ExitArgs {
    pos: u64,
    addr: Hex,
    size: u8,
    data: Hex,
    rip: Hex,
}

#[derive(Serialize)]
struct InjectArgs {
    pos: u64,
    vector: u8,
}

#[derive(Serialize)]
struct LandingArgs {
    pos: u64,
    index: u64,
    rip: Hex,
    dirty_pages: u32,
    keyframe: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    keyframe_pages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pending_interrupt: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replay_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replay_hits: Option<u64>,
}

#[derive(Serialize)]
struct PosArgs {
    pos: u64,
}

#[derive(Serialize)]
struct BytesArgs<'a> {
    pos: u64,
    bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
}

#[derive(Serialize)]
struct PlatformArgs {
    pos: u64,
    bytes: String,
}

#[derive(Serialize)]
struct LineArgs<'a> {
    pos: u64,
    text: &'a str,
}

#[derive(Serialize)]
struct EndArgs {
    pos: u64,
    how: String,
    virtual_ns: u64,
    regs_digest: Hex,
    mem_digest: Hex,
}

/// One counter value (`{"NAME": value}`).
struct Value<'a>(&'a str, f64);

impl Serialize for Value<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry(self.0, &self.1)?;
        m.end()
    }
}

/// What the header says, for `otherData` (strings only, as the format
/// wants).
#[derive(Serialize)]
struct OtherData<'a> {
    trace: &'a str,
    uuid: String,
    nyx_version: &'a str,
    kind: String,
    complete: &'static str,
    time_axis: &'static str,
    landing_costs: &'static str,
}

/// COM1's transmit path and the line being assembled.
#[derive(Default)]
struct Serial {
    lcr: u8,
    mcr: u8,
    line: Vec<u8>,
    line_pos: u64,
    bytes: u64,
}

/// The time of a sample or of the end record, if `e` is one.
fn anchor_ns(e: &Event) -> Option<u64> {
    match e {
        Event::Time(t) => Some(*t),
        Event::End(x) => Some(x.virtual_ns),
        _ => None,
    }
}

/// The first time sample after a frame, found by reading ahead.
#[derive(Default)]
struct Ahead {
    /// The last answer: the frame (in the list of event frames) it was
    /// found in (`usize::MAX`: none to the end), and the sample's event
    /// index and time.
    found: Option<(usize, Option<(u64, u64)>)>,
    /// A frame decoded while looking ahead, for the main pass: its index
    /// among the file's frames and its events.
    kept: Option<(usize, Vec<Event>)>,
}

impl Ahead {
    /// The first sample after event frame `k` of `frames` (whose events
    /// end before event index `end`).
    fn after(&mut self, r: &mut TraceReader, frames: &[usize], k: usize, end: u64) -> Result<Option<(u64, u64)>, Fail> {
        // Found in a frame after `k`: the frames between hold none.
        if let Some((m, found)) = self.found {
            if m > k {
                return Ok(found);
            }
        }
        let mut index = end;
        for (m, &frame) in frames.iter().enumerate().skip(k + 1) {
            let events = nyx_vmm::events::read_events(r, frame).map_err(Fail::Read)?;
            let found = events
                .iter()
                .enumerate()
                .find_map(|(j, e)| anchor_ns(e).map(|t| (index + j as u64, t)));
            index += events.len() as u64;
            if m == k + 1 {
                self.kept = Some((frame, events));
            }
            if found.is_some() {
                self.found = Some((m, found));
                return Ok(found);
            }
        }
        self.found = Some((usize::MAX, None));
        Ok(None)
    }

    /// The events of `frame` if they were kept.
    fn take(&mut self, frame: usize) -> Option<Vec<Event>> {
        match self.kept.take() {
            Some((f, events)) if f == frame => Some(events),
            _ => None,
        }
    }
}

/// The state of one export.
struct Exporter<'a, 'w> {
    out: Out<'w>,
    /// The last sample (or the end record): event index, time (at least
    /// the one before).
    last: Option<(u64, u64)>,
    costs: Option<&'a [LandingCost]>,
    serial: Serial,
    platform: EventDecoder,
    summary: Summary,
}

impl Exporter<'_, '_> {
    /// The time of the event at `index` between the last sample and the
    /// next one, `next`: the first at the last sample, the others evenly
    /// spread up to the next.
    fn time_of(&self, index: u64, next: Option<(u64, u64)>) -> u64 {
        match (self.last, next) {
            (None, None) => 0,
            (None, Some((_, t))) => t,
            (Some((_, t)), None) => t,
            (Some((a, ta)), Some((b, tb))) => {
                let span = u128::from(tb.max(ta) - ta);
                let n = u128::from(b.saturating_sub(a + 1).max(1));
                let k = u128::from(index.saturating_sub(a + 1));
                ta + u64::try_from(span * k / n).unwrap_or(0)
            }
        }
    }

    /// A sample or the end record at `index`: the time it sets (at least
    /// the last one's).
    fn anchor(&mut self, index: u64, t: u64) -> u64 {
        let t = self.last.map_or(t, |(_, l)| t.max(l));
        self.last = Some((index, t));
        t
    }

    /// Writes the event at `index` (position `pos`); `next` is the next
    /// sample after it.
    fn event(&mut self, index: u64, pos: u64, e: Event, next: Option<(u64, u64)>) -> Result<(), Fail> {
        match e {
            Event::Time(t) => {
                let gap = self.last.map_or(0, |(_, l)| t.saturating_sub(l));
                let t = self.anchor(index, t);
                self.out.counter("time sample", t, Value("gap_us", us(gap)))
            }
            Event::End(x) => {
                let ns = self.anchor(index, x.virtual_ns);
                self.serial_line(ns)?;
                let how = x.kind.to_string();
                let args = EndArgs {
                    pos,
                    how: how.clone(),
                    virtual_ns: x.virtual_ns,
                    regs_digest: Hex(x.regs_digest),
                    mem_digest: Hex(x.mem_digest),
                };
                self.out.instant(Track::End, &format!("end: {how}"), "end", ns, args)
            }
            Event::Regs(_) => Ok(()),
            e => {
                let ns = self.time_of(index, next);
                self.write(pos, e, ns)
            }
        }
    }

    /// Writes an event that is neither a sample nor the end at `ns`.
    fn write(&mut self, pos: u64, e: Event, ns: u64) -> Result<(), Fail> {
        match e {
            Event::Exit(x) => {
                let track = Track::Exit(x.kind);
                let args = ExitArgs {
                    pos,
                    addr: Hex(x.addr),
                    size: x.size,
                    data: Hex(x.data),
                    rip: Hex(x.rip),
                };
                match x.kind {
                    ExitKind::PioIn | ExitKind::PioOut => {
                        let name = format!("{} {:#x}", x.kind.name(), x.addr);
                        self.out.instant(track, &name, "exit", ns, args)?;
                    }
                    _ => self.out.instant(track, x.kind.name(), "exit", ns, args)?,
                }
                if x.kind == ExitKind::PioOut {
                    self.serial_write(pos, &x, ns)?;
                }
            }
            Event::Switch(cpu) => {
                let name = format!("vCPU {cpu}");
                self.out.instant(Track::Vcpus, &name, "switch", ns, PosArgs { pos })?;
            }
            Event::Inject(v) => {
                let name = format!("vector {v:#x}");
                let args = InjectArgs { pos, vector: v };
                self.out.instant(Track::Interrupts, &name, "interrupt", ns, args)?;
            }
            Event::Landing(l) => {
                let index = self.summary.landings;
                self.summary.landings += 1;
                let cost = self.costs.and_then(|c| c.get(index as usize));
                self.summary.costed += u64::from(cost.is_some());
                let pages = keyframe_pages(&l);
                let name = match pages {
                    Some(_) => "landing (keyframe)",
                    None => "landing (search)",
                };
                let args = LandingArgs {
                    pos,
                    index,
                    rip: Hex(l.regs.rip),
                    dirty_pages: l.dirty_pages,
                    keyframe: pages.is_some(),
                    keyframe_pages: pages,
                    pending_interrupt: l.pending_interrupt,
                    replay_us: cost.map(|c| us(c.host_ns)),
                    replay_hits: cost.map(|c| c.hits),
                };
                self.out.instant(Track::Landings, name, "landing", ns, args)?;
                if let Some(c) = cost {
                    self.out
                        .counter("landing replay cost", ns, Value("us", us(c.host_ns)))?;
                }
            }
            Event::Poll => self.out.instant(Track::Polls, "poll", "poll", ns, PosArgs { pos })?,
            Event::Input(b) => self.input(pos, false, &b, ns)?,
            Event::ConsoleInput(b) => self.input(pos, true, &b, ns)?,
            Event::NetInput(b) => self.entropy(pos, "net input", b.len(), ns)?,
            Event::Platform(bytes) => {
                let decoded = self.platform.push(&bytes);
                let name = if decoded.is_empty() {
                    "platform".to_string()
                } else {
                    decoded.iter().map(|e| format!("{e:?}")).collect::<Vec<_>>().join(", ")
                };
                let args = PlatformArgs {
                    pos,
                    bytes: bytes.iter().map(|b| format!("{b:02x}")).collect(),
                };
                self.out.instant(Track::Platform, &name, "platform", ns, args)?;
            }
            Event::Entropy(_) => self.entropy(pos, "rdrand", 8, ns)?,
            Event::Rng(b) => self.entropy(pos, "virtio-rng", b.len(), ns)?,
            Event::DiskRead(b) => self.entropy(pos, "disk read", b.len(), ns)?,
            Event::Time(_) | Event::End(_) | Event::Regs(_) => {}
        }
        Ok(())
    }

    /// Input bytes: how many, and the first [`INPUT_SHOWN`] as text.
    fn input(&mut self, pos: u64, console: bool, bytes: &[u8], ns: u64) -> Result<(), Fail> {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(INPUT_SHOWN)]);
        let name = if console { "console input" } else { "serial input" };
        let args = BytesArgs {
            pos,
            bytes: bytes.len(),
            text: Some(&text),
        };
        self.out.instant(Track::Input, name, "input", ns, args)
    }

    fn entropy(&mut self, pos: u64, what: &str, bytes: usize, ns: u64) -> Result<(), Fail> {
        let args = BytesArgs { pos, bytes, text: None };
        self.out.instant(Track::Entropy, what, "entropy", ns, args)
    }

    /// A port write that may reach COM1: its registers byte by byte.
    fn serial_write(&mut self, pos: u64, x: &ExitRecord, ns: u64) -> Result<(), Fail> {
        for k in 0..u64::from(x.size.min(8)) {
            let Some(reg) = x
                .addr
                .checked_add(k)
                .and_then(|a| a.checked_sub(COM1))
                .filter(|r| *r < 8)
            else {
                continue;
            };
            let v = (x.data >> (8 * k)) as u8;
            match reg {
                3 => self.serial.lcr = v,
                4 => self.serial.mcr = v,
                0 if self.serial.lcr & LCR_DLAB == 0 && self.serial.mcr & MCR_LOOP == 0 => {
                    if self.serial.line.is_empty() {
                        self.serial.line_pos = pos;
                    }
                    self.serial.line.push(v);
                    self.serial.bytes += 1;
                    if v == b'\n' || self.serial.line.len() >= LINE_MAX {
                        self.serial_line(ns)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Writes the line assembled so far, if any.
    fn serial_line(&mut self, ns: u64) -> Result<(), Fail> {
        if self.serial.line.is_empty() {
            return Ok(());
        }
        let line = std::mem::take(&mut self.serial.line);
        let text = String::from_utf8_lossy(&line);
        let shown = text.trim_end_matches(['\n', '\r']);
        let name = if shown.is_empty() { "(empty line)" } else { shown };
        let args = LineArgs {
            pos: self.serial.line_pos,
            text: &text,
        };
        self.out.instant(Track::Serial, name, "output", ns, args)?;
        self.out
            .counter("serial output", ns, Value("bytes", self.serial.bytes as f64))
    }

    /// The end of the trace: an unfinished line at the last time.
    fn finish(&mut self) -> Result<(), Fail> {
        self.serial_line(self.last.map_or(0, |(_, t)| t))
    }
}

/// Writes the trace in `r` as Chrome trace-event JSON to `w`; `name`
/// names it in `otherData`, `costs` are the landings' replay costs.
fn write_chrome(
    r: &mut TraceReader,
    name: &str,
    costs: Option<&[LandingCost]>,
    w: &mut dyn Write,
) -> Result<Summary, Fail> {
    let h = r.header();
    let other = OtherData {
        trace: name,
        uuid: h.uuid.iter().map(|b| format!("{b:02x}")).collect(),
        nyx_version: &h.nyx_version,
        kind: format!("{:?}", h.kind),
        complete: if r.is_complete() {
            "yes"
        } else {
            "no: cut off after its last complete frame"
        },
        time_axis: "ts is the guest's virtual time in µs: time samples as recorded; the first event after a \
                    sample at the sample, the others up to the next sample spread evenly by their index",
        landing_costs: if costs.is_some() {
            "replay_us: host time the replay took to reach the landing (search or keyframe restore)"
        } else {
            "not measured (nyx trace export --replay)"
        },
    };
    w.write_all(b"{\"otherData\":")?;
    serde_json::to_writer(&mut *w, &other)?;
    w.write_all(b",\n\"traceEvents\":[\n")?;
    let mut x = Exporter {
        out: Out {
            w,
            written: 0,
            named: [false; Track::COUNT],
        },
        last: None,
        costs,
        serial: Serial::default(),
        platform: EventDecoder::new(),
        summary: Summary {
            complete: r.is_complete(),
            ..Summary::default()
        },
    };
    x.out.raw(&meta("process_name", 0, Named { name: "guest" }))?;
    let frames: Vec<usize> = (0..r.frames().len())
        .filter(|&i| r.frames()[i].kind == FrameKind::Events)
        .collect();
    let mut ahead = Ahead::default();
    // Position (guest-caused exits) and index of the frame's first event.
    let (mut pos, mut first) = (0u64, 0u64);
    for (k, &frame) in frames.iter().enumerate() {
        let events = match ahead.take(frame) {
            Some(events) => events,
            None => nyx_vmm::events::read_events(r, frame).map_err(Fail::Read)?,
        };
        let end = first + events.len() as u64;
        // The samples in this frame, in order, then the first after it.
        let samples: Vec<(u64, u64)> = events
            .iter()
            .enumerate()
            .filter_map(|(j, e)| anchor_ns(e).map(|t| (first + j as u64, t)))
            .collect();
        let mut next = samples.iter().copied();
        let mut upcoming = next.next();
        for (j, e) in events.into_iter().enumerate() {
            let index = first + j as u64;
            if let Event::Exit(_) = e {
                pos += 1;
            }
            if upcoming.is_some_and(|(i, _)| i < index) {
                upcoming = next.next();
            }
            let following = match upcoming {
                Some(s) => Some(s),
                None if anchor_ns(&e).is_some() => None,
                None => ahead.after(r, &frames, k, end)?,
            };
            x.summary.events += 1;
            x.event(index, pos, e, following)?;
        }
        first = end;
    }
    x.finish()?;
    x.out.w.write_all(b"\n]}\n")?;
    x.summary.position = pos;
    x.summary.written = x.out.written;
    Ok(x.summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nyx_trace::{ContainerKind, GuestImage, TraceHeader, TraceWriter};
    use nyx_vmm::events::{EndKind, EndRecord, GprSnapshot};
    use proptest::prelude::*;
    use serde_json::Value as Json;

    fn write_trace(dir: &Path, frames: &[Vec<Event>], finish: bool) -> PathBuf {
        let p = dir.join("t.nyxtrace");
        let header = TraceHeader {
            uuid: [7; 16],
            nyx_version: "test".into(),
            kind: ContainerKind::Trace,
            machine_config: Vec::new(),
            images: vec![GuestImage::embedded(nyx_vmm::config::KERNEL_IMAGE, vec![1])],
        };
        let mut w = TraceWriter::create(&p, &header).unwrap();
        let mut pos = 0;
        for f in frames {
            nyx_vmm::events::write_events(&mut w, pos, f, 0).unwrap();
            pos += f.iter().filter(|e| matches!(e, Event::Exit(_))).count() as u64;
        }
        if finish {
            w.finish().unwrap();
            p
        } else {
            let partial = dir.join("t.nyxtrace.partial");
            drop(w);
            assert!(partial.exists());
            partial
        }
    }

    fn out(port: u64, data: u64) -> Event {
        Event::Exit(ExitRecord {
            kind: ExitKind::PioOut,
            addr: port,
            size: 1,
            data,
            rip: 0x1000,
        })
    }

    fn hlt() -> Event {
        Event::Exit(ExitRecord {
            kind: ExitKind::Hlt,
            addr: 0,
            size: 0,
            data: 0,
            rip: 0x2000,
        })
    }

    fn landing(keyframe: bool) -> Event {
        Event::Landing(Box::new(Landing {
            regs: GprSnapshot {
                rip: 0x3000,
                ..Default::default()
            },
            regs_digest: 1,
            dirty_pages: 3,
            mem_digest: 2,
            pending_interrupt: None,
            keyframe: keyframe.then(|| {
                Box::new(nyx_vmm::events::Keyframe {
                    cpu: 0,
                    vcpu: Default::default(),
                    pages: vec![nyx_vmm::mem_state::PageRun {
                        gpa: 0x1000,
                        data: vec![0; 3 * 4096],
                    }],
                    memory_digest: None,
                })
            }),
        }))
    }

    fn end(ns: u64) -> Event {
        Event::End(Box::new(EndRecord {
            kind: EndKind::DebugExit(0x21),
            regs_digest: 0,
            mem_digest: 0,
            virtual_ns: ns,
        }))
    }

    fn export_of(p: &Path, costs: Option<&[LandingCost]>) -> (Summary, Json) {
        let mut r = TraceReader::open(p).unwrap();
        let mut buf = Vec::new();
        let s = write_chrome(&mut r, "t", costs, &mut buf).unwrap_or_else(|e| panic!("{e:?}"));
        let v: Json = serde_json::from_slice(&buf).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&buf)));
        (s, v)
    }

    fn events(v: &Json) -> &Vec<Json> {
        v["traceEvents"].as_array().unwrap()
    }

    fn by_cat<'a>(v: &'a Json, cat: &str) -> Vec<&'a Json> {
        events(v).iter().filter(|e| e["cat"] == cat).collect()
    }

    fn ts(e: &Json) -> f64 {
        e["ts"].as_f64().unwrap()
    }

    #[test]
    fn events_between_samples_are_interpolated() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_trace(
            dir.path(),
            &[vec![
                hlt(),
                Event::Time(1_000_000),
                hlt(),
                Event::Inject(0x20),
                hlt(),
                Event::Time(5_000_000),
                Event::Poll,
            ]],
            true,
        );
        let (s, v) = export_of(&p, None);
        assert!(s.complete);
        assert_eq!(s.position, 3);
        let exits = by_cat(&v, "exit");
        // Before the first sample: its time; then at the sample and 2/3 of
        // the way to the next (the injection is 1/3).
        let times: Vec<f64> = exits.iter().map(|e| ts(e)).collect();
        assert_eq!(times, vec![1000.0, 1000.0, 3666.666]);
        let inject = &by_cat(&v, "interrupt")[0];
        assert_eq!(ts(inject), 2333.333);
        assert_eq!(inject["args"]["vector"], 0x20);
        assert_eq!(inject["name"], "vector 0x20");
        // After the last sample, nothing more: the last time.
        assert_eq!(ts(by_cat(&v, "poll")[0]), 5000.0);
        let gaps: Vec<f64> = by_cat(&v, "counter")
            .iter()
            .map(|e| e["args"]["gap_us"].as_f64().unwrap())
            .collect();
        assert_eq!(gaps, vec![0.0, 4000.0]);
        assert_eq!(v["otherData"]["uuid"], "07".repeat(16));
    }

    #[test]
    fn every_event_is_a_valid_trace_event_and_tracks_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_trace(
            dir.path(),
            &[
                vec![out(0x3f8, b'h' as u64), Event::Time(10), landing(false)],
                vec![
                    out(0x3f8, b'\n' as u64),
                    Event::Input(b"abc".to_vec()),
                    Event::Platform(nyx_devices::acpi_pm::PlatformEvent::PowerButton.encode()),
                    Event::Entropy(5),
                    Event::Regs(9),
                    landing(true),
                    end(20),
                ],
            ],
            true,
        );
        let (_, v) = export_of(&p, None);
        let mut names = std::collections::BTreeMap::new();
        for e in events(&v) {
            let ph = e["ph"].as_str().unwrap();
            assert!(["i", "C", "M"].contains(&ph), "{e}");
            assert!(
                e["ts"].is_number() && e["pid"].is_number() && e["tid"].is_number(),
                "{e}"
            );
            assert!(e["name"].is_string(), "{e}");
            if e["name"] == "thread_name" {
                names.insert(
                    e["tid"].as_u64().unwrap(),
                    e["args"]["name"].as_str().unwrap().to_string(),
                );
            }
        }
        for e in events(&v).iter().filter(|e| e["ph"] == "i") {
            let tid = e["tid"].as_u64().unwrap();
            assert!(names.contains_key(&tid), "track {tid} of {e} has no name");
        }
        let tracks: Vec<&str> = names.values().map(String::as_str).collect();
        for t in [
            "exit pio-out",
            "landings",
            "serial output",
            "input",
            "platform",
            "entropy",
            "end",
        ] {
            assert!(tracks.contains(&t), "{tracks:?}");
        }
        let landings = by_cat(&v, "landing");
        assert_eq!(landings.len(), 2);
        assert_eq!(landings[0]["args"]["keyframe"], false);
        assert_eq!(landings[1]["args"]["keyframe"], true);
        assert_eq!(landings[1]["args"]["keyframe_pages"], 3);
        assert_eq!(landings[1]["args"]["dirty_pages"], 3);
        assert_eq!(landings[1]["args"]["rip"], "0x3000");
        assert!(landings[0]["args"].get("replay_us").is_none());
        let line = &by_cat(&v, "output")[0];
        assert_eq!(line["name"], "h");
        assert_eq!(line["args"]["text"], "h\n");
        assert_eq!(by_cat(&v, "platform")[0]["name"], "PowerButton");
        let end = &by_cat(&v, "end")[0];
        assert_eq!(ts(end), 0.02);
        assert!(end["name"].as_str().unwrap().starts_with("end: "), "{end}");
    }

    #[test]
    fn serial_output_follows_dlab_loopback_and_wide_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_trace(
            dir.path(),
            &[vec![
                out(0x3fb, 0x80), // DLAB on: divisor latch
                out(0x3f8, 0x01),
                out(0x3fb, 0x03), // DLAB off
                out(0x3fc, 0x10), // loopback
                out(0x3f8, b'x' as u64),
                out(0x3fc, 0x0b),
                out(0x3f8, b'o' as u64),
                Event::Exit(ExitRecord {
                    kind: ExitKind::PioOut,
                    addr: 0x3f8,
                    size: 2,
                    data: u64::from(b'k') | 0x0100, // THR 'k', IER 1
                    rip: 0,
                }),
                out(0x2f8, b'z' as u64),
            ]],
            true,
        );
        let (_, v) = export_of(&p, None);
        let lines: Vec<&str> = by_cat(&v, "output")
            .iter()
            .map(|e| e["args"]["text"].as_str().unwrap())
            .collect();
        assert_eq!(lines, vec!["ok"], "the unfinished line is written at the end");
    }

    #[test]
    fn escape_sequences_stay_in_the_args_and_the_time_comes_first() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_trace(
            dir.path(),
            &[b"\x1b[1mhi\n".iter().map(|&b| out(0x3f8, b.into())).collect()],
            true,
        );
        let mut r = TraceReader::open(&p).unwrap();
        let mut buf = Vec::new();
        write_chrome(&mut r, "t", None, &mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        for line in text
            .lines()
            .filter(|l| l.starts_with('{') && !l.starts_with("{\"otherData"))
        {
            assert!(
                line.starts_with("{\"ph\":\"") && line[8..].starts_with("\",\"ts\":"),
                "{line}"
            );
        }
        let v: Json = serde_json::from_str(&text).unwrap();
        let line = &by_cat(&v, "output")[0];
        assert_eq!(line["name"], ".[1mhi");
        assert_eq!(line["args"]["text"], "\x1b[1mhi\n");
    }

    #[test]
    fn replay_costs_go_to_their_landings() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_trace(
            dir.path(),
            &[vec![landing(false), Event::Time(1000), landing(true), landing(false)]],
            true,
        );
        let costs = [
            LandingCost {
                keyframe: false,
                host_ns: 5000,
                hits: 7,
            },
            LandingCost {
                keyframe: true,
                host_ns: 1500,
                hits: 0,
            },
        ];
        let (s, v) = export_of(&p, Some(&costs));
        assert_eq!((s.landings, s.costed), (3, 2));
        let l = by_cat(&v, "landing");
        assert_eq!(l[0]["args"]["replay_us"], 5.0);
        assert_eq!(l[0]["args"]["replay_hits"], 7);
        assert_eq!(l[1]["args"]["replay_us"], 1.5);
        assert!(l[2]["args"].get("replay_us").is_none());
        let costs: Vec<&Json> = by_cat(&v, "counter")
            .into_iter()
            .filter(|e| e["name"] == "landing replay cost")
            .collect();
        assert_eq!(costs.len(), 2);
    }

    #[test]
    fn the_next_sample_is_found_frames_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_trace(
            dir.path(),
            &[
                vec![Event::Time(1000), hlt(), hlt()],
                vec![hlt(), hlt()],
                vec![hlt(), hlt(), hlt()],
                vec![Event::Time(8000), hlt(), Event::Poll],
                vec![hlt(), end(9000)],
            ],
            true,
        );
        let (s, v) = export_of(&p, None);
        assert_eq!((s.events, s.position), (13, 9));
        let times: Vec<f64> = by_cat(&v, "exit").iter().map(|e| ts(e)).collect();
        // Seven exits from the sample at 1000 ns on, a seventh of the 7000
        // ns to the next apart; then three events from that sample on, a
        // third of the 1000 ns to the end apart.
        assert_eq!(times, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 8.666]);
        assert_eq!(ts(by_cat(&v, "poll")[0]), 8.333);
        assert_eq!(ts(by_cat(&v, "end")[0]), 9.0);
    }

    #[test]
    fn a_cut_trace_exports_its_complete_frames() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_trace(
            dir.path(),
            &[vec![Event::Time(100), hlt()], vec![hlt(), Event::Time(300)]],
            false,
        );
        // Cut the last frame short.
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
        let (s, v) = export_of(&p, None);
        assert!(!s.complete);
        assert_eq!(s.position, 1);
        assert!(v["otherData"]["complete"].as_str().unwrap().starts_with("no"));
        assert_eq!(by_cat(&v, "exit").len(), 1);
        assert_eq!(ts(by_cat(&v, "exit")[0]), 0.1);
    }

    #[test]
    fn a_corrupt_frame_is_an_error_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_trace(dir.path(), &[vec![hlt(); 200], vec![hlt(); 200]], true);
        let mut bytes = std::fs::read(&p).unwrap();
        let mut r = TraceReader::open(&p).unwrap();
        let second = r.frames()[1].offset as usize;
        bytes[second + 25] ^= 0xff;
        std::fs::write(&p, &bytes).unwrap();
        let out = dir.path().join("o.json");
        r = TraceReader::open(&p).unwrap();
        let e = write_file(&mut r, "t", None, &out).unwrap_err();
        assert!(
            matches!(e, Fail::Read(nyx_trace::Error::ChecksumMismatch { .. })),
            "{e:?}"
        );
        assert!(!out.exists());
        assert!(!dir.path().join("o.json.partial").exists());
        let e = export(&p, Some(&out), None).unwrap_err();
        assert!(e.to_string().contains("t.nyxtrace"), "{e}");
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (0x3f8u64..0x400, 1u8..5, any::<u64>()).prop_map(|(addr, size, data)| Event::Exit(ExitRecord {
                kind: ExitKind::PioOut,
                addr,
                size,
                data,
                rip: 0
            })),
            (0usize..ExitKind::ALL.len(), any::<u64>()).prop_map(|(k, addr)| Event::Exit(ExitRecord {
                kind: ExitKind::ALL[k],
                addr,
                size: 255,
                data: u64::MAX,
                rip: u64::MAX
            })),
            any::<u64>().prop_map(Event::Time),
            any::<u8>().prop_map(Event::Inject),
            Just(Event::Poll),
            prop::collection::vec(any::<u8>(), 0..300).prop_map(Event::Input),
            prop::collection::vec(any::<u8>(), 0..8).prop_map(Event::Platform),
            any::<bool>().prop_map(landing),
            any::<u64>().prop_map(end),
        ]
    }

    proptest! {
        #[test]
        fn any_events_export_as_json_with_non_decreasing_times(
            frames in prop::collection::vec(prop::collection::vec(arb_event(), 0..40), 0..6),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let p = write_trace(dir.path(), &frames, true);
            let (s, v) = export_of(&p, None);
            prop_assert_eq!(s.events, frames.iter().map(|f| f.len() as u64).sum::<u64>());
            let mut last = std::collections::HashMap::new();
            for e in events(&v).iter().filter(|e| e["ph"] != "M") {
                let t = ts(e);
                let prev = last.insert(e["tid"].as_u64().unwrap(), t).unwrap_or(0.0);
                prop_assert!(t >= prev, "{} after {}", e, prev);
            }
        }
    }
}
