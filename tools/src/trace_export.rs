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
//! Events wait in memory only until the next sample; a stretch of more
//! than [`MAX_PENDING`] events without one is placed at the last sample
//! (or 0) instead, with a warning.
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
use nyx_vmm::events::{EndRecord, Event, ExitKind, ExitRecord, Landing};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

/// Events held back at most while waiting for the next time sample.
pub const MAX_PENDING: usize = 1 << 20;

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
    /// Stretches of more than [`MAX_PENDING`] events without a time sample,
    /// placed at the sample before them.
    pub unsampled_stretches: u64,
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
            let r = write_chrome(&mut r, &name, costs, MAX_PENDING, &mut w).and_then(|s| {
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
    if summary.unsampled_stretches > 0 {
        eprintln!(
            "nyx: warning: {} stretches of more than {MAX_PENDING} events without a time sample were placed at the sample before them",
            summary.unsampled_stretches
        );
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
        let s = write_chrome(r, name, costs, MAX_PENDING, &mut w)?;
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

/// One trace event. `s` is the scope of an instant event.
#[derive(Serialize)]
struct TraceEvent<'a, A: Serialize> {
    name: &'a str,
    cat: &'static str,
    ph: &'static str,
    ts: f64,
    pid: u32,
    tid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    s: Option<&'static str>,
    args: A,
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
}

impl Track {
    const COUNT: usize = ExitKind::ALL.len() + 10;

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
        }
    }
}

/// An event waiting for its time: only what the export shows.
enum Item {
    Exit(ExitRecord),
    Inject(u8),
    Landing(LandingItem),
    Poll,
    Input { console: bool, len: usize, head: Vec<u8> },
    Platform(Vec<u8>),
    Entropy { what: &'static str, bytes: usize },
    End(Box<EndRecord>),
}

struct LandingItem {
    rip: u64,
    dirty_pages: u32,
    keyframe_pages: Option<u64>,
    pending_interrupt: Option<u8>,
}

impl LandingItem {
    fn of(l: &Landing) -> Self {
        LandingItem {
            rip: l.regs.rip,
            dirty_pages: l.dirty_pages,
            keyframe_pages: l
                .keyframe
                .as_ref()
                .map(|k| k.pages.iter().map(|r| (r.data.len() as u64).div_ceil(4096)).sum()),
            pending_interrupt: l.pending_interrupt,
        }
    }
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
            name,
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
            name,
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
        name,
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

/// What the header says, for `otherData`.
#[derive(Serialize)]
struct OtherData<'a> {
    trace: &'a str,
    uuid: String,
    nyx_version: &'a str,
    kind: String,
    complete: bool,
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

/// The state of one export.
struct Exporter<'a, 'w> {
    out: Out<'w>,
    pending: Vec<(u64, Item)>,
    max_pending: usize,
    /// The last time sample (or end time), ns.
    last_ns: Option<u64>,
    costs: Option<&'a [LandingCost]>,
    serial: Serial,
    platform: EventDecoder,
    summary: Summary,
}

impl Exporter<'_, '_> {
    /// Takes one event at position `pos`.
    fn event(&mut self, pos: u64, e: Event) -> Result<(), Fail> {
        let item = match e {
            Event::Time(t) => return self.sample(t),
            Event::Regs(_) => return Ok(()),
            Event::Exit(x) => Item::Exit(x),
            Event::Inject(v) => Item::Inject(v),
            Event::Landing(l) => Item::Landing(LandingItem::of(&l)),
            Event::Poll => Item::Poll,
            Event::Input(b) => input(false, b),
            Event::ConsoleInput(b) => input(true, b),
            Event::Platform(b) => Item::Platform(b),
            Event::Entropy(_) => Item::Entropy {
                what: "rdrand",
                bytes: 8,
            },
            Event::Rng(b) => Item::Entropy {
                what: "virtio-rng",
                bytes: b.len(),
            },
            Event::DiskRead(b) => Item::Entropy {
                what: "disk read",
                bytes: b.len(),
            },
            Event::End(x) => {
                let t = self.sample_quiet(x.virtual_ns)?;
                return self.write_item(pos, Item::End(x), t);
            }
        };
        self.pending.push((pos, item));
        if self.pending.len() > self.max_pending {
            self.summary.unsampled_stretches += 1;
            let t = self.last_ns.unwrap_or(0);
            self.flush_at(|_, _| t)?;
        }
        Ok(())
    }

    /// A time sample: the events before it get their times, then its
    /// counter.
    fn sample(&mut self, t: u64) -> Result<(), Fail> {
        let gap = self.last_ns.map(|l| t.saturating_sub(l));
        let t = self.sample_quiet(t)?;
        self.out
            .counter("time sample", t, Value("gap_us", us(gap.unwrap_or(0))))
    }

    /// Places the pending events between the last sample and `t` (at
    /// least the last sample); returns the time taken for `t`.
    fn sample_quiet(&mut self, t: u64) -> Result<u64, Fail> {
        let t = self.last_ns.map_or(t, |l| t.max(l));
        let from = self.last_ns.unwrap_or(t);
        let span = u128::from(t - from);
        self.flush_at(|i, n| {
            // i of n steps from `from` to `t`.
            from + u64::try_from(span * i as u128 / n as u128).unwrap_or(0)
        })?;
        self.last_ns = Some(t);
        Ok(t)
    }

    /// Writes the pending events, the i-th of n at `at(i, n)`.
    fn flush_at(&mut self, at: impl Fn(usize, usize) -> u64) -> Result<(), Fail> {
        let pending = std::mem::take(&mut self.pending);
        let n = pending.len();
        for (i, (pos, item)) in pending.into_iter().enumerate() {
            self.write_item(pos, item, at(i, n))?;
        }
        Ok(())
    }

    fn write_item(&mut self, pos: u64, item: Item, ns: u64) -> Result<(), Fail> {
        match item {
            Item::Exit(x) => {
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
            Item::Inject(v) => {
                let name = format!("vector {v:#x}");
                let args = InjectArgs { pos, vector: v };
                self.out.instant(Track::Interrupts, &name, "interrupt", ns, args)?;
            }
            Item::Landing(l) => {
                let index = self.summary.landings;
                self.summary.landings += 1;
                let cost = self.costs.and_then(|c| c.get(index as usize));
                self.summary.costed += u64::from(cost.is_some());
                let keyframe = l.keyframe_pages.is_some();
                let name = if keyframe {
                    "landing (keyframe)"
                } else {
                    "landing (search)"
                };
                let args = LandingArgs {
                    pos,
                    index,
                    rip: Hex(l.rip),
                    dirty_pages: l.dirty_pages,
                    keyframe,
                    keyframe_pages: l.keyframe_pages,
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
            Item::Poll => self.out.instant(Track::Polls, "poll", "poll", ns, PosArgs { pos })?,
            Item::Input { console, len, head } => {
                let text = String::from_utf8_lossy(&head);
                let name = if console { "console input" } else { "serial input" };
                let args = BytesArgs {
                    pos,
                    bytes: len,
                    text: Some(&text),
                };
                self.out.instant(Track::Input, name, "input", ns, args)?;
            }
            Item::Platform(bytes) => {
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
            Item::Entropy { what, bytes } => {
                let args = BytesArgs { pos, bytes, text: None };
                self.out.instant(Track::Entropy, what, "entropy", ns, args)?;
            }
            Item::End(x) => {
                self.serial_line(ns)?;
                let how = x.kind.to_string();
                let args = EndArgs {
                    pos,
                    how: how.clone(),
                    virtual_ns: x.virtual_ns,
                    regs_digest: Hex(x.regs_digest),
                    mem_digest: Hex(x.mem_digest),
                };
                self.out.instant(Track::End, &format!("end: {how}"), "end", ns, args)?;
            }
        }
        Ok(())
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

    /// The end of the trace: whatever waits takes the last time.
    fn finish(&mut self) -> Result<(), Fail> {
        let t = self.last_ns.unwrap_or(0);
        self.flush_at(|_, _| t)?;
        self.serial_line(t)
    }
}

fn input(console: bool, b: Vec<u8>) -> Item {
    let len = b.len();
    let mut head = b;
    head.truncate(INPUT_SHOWN);
    Item::Input { console, len, head }
}

/// Writes the trace in `r` as Chrome trace-event JSON to `w`; `name`
/// names it in `otherData`, `costs` are the landings' replay costs.
fn write_chrome(
    r: &mut TraceReader,
    name: &str,
    costs: Option<&[LandingCost]>,
    max_pending: usize,
    w: &mut dyn Write,
) -> Result<Summary, Fail> {
    let h = r.header();
    let other = OtherData {
        trace: name,
        uuid: h.uuid.iter().map(|b| format!("{b:02x}")).collect(),
        nyx_version: &h.nyx_version,
        kind: format!("{:?}", h.kind),
        complete: r.is_complete(),
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
        pending: Vec::new(),
        max_pending,
        last_ns: None,
        costs,
        serial: Serial::default(),
        platform: EventDecoder::new(),
        summary: Summary {
            complete: r.is_complete(),
            ..Summary::default()
        },
    };
    x.out.raw(&meta("process_name", 0, Named { name: "guest" }))?;
    let mut pos = 0u64;
    for i in 0..r.frames().len() {
        if r.frames()[i].kind != FrameKind::Events {
            continue;
        }
        for e in r.read_records::<Event>(i).map_err(Fail::Read)? {
            if let Event::Exit(_) = e {
                pos += 1;
            }
            x.summary.events += 1;
            x.event(pos, e)?;
        }
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
    use nyx_vmm::events::{EndKind, GprSnapshot};
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
            w.write_records(FrameKind::Events, pos, f).unwrap();
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

    fn export_of(p: &Path, costs: Option<&[LandingCost]>, max_pending: usize) -> (Summary, Json) {
        let mut r = TraceReader::open(p).unwrap();
        let mut buf = Vec::new();
        let s = write_chrome(&mut r, "t", costs, max_pending, &mut buf).unwrap_or_else(|e| panic!("{e:?}"));
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
        let (s, v) = export_of(&p, None, MAX_PENDING);
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
        let (_, v) = export_of(&p, None, MAX_PENDING);
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
        let (_, v) = export_of(&p, None, MAX_PENDING);
        let lines: Vec<&str> = by_cat(&v, "output")
            .iter()
            .map(|e| e["args"]["text"].as_str().unwrap())
            .collect();
        assert_eq!(lines, vec!["ok"], "the unfinished line is written at the end");
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
        let (s, v) = export_of(&p, Some(&costs), MAX_PENDING);
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
    fn a_long_stretch_without_samples_is_placed_at_the_last_sample() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = vec![Event::Time(1000)];
        f.extend((0..10).map(|_| hlt()));
        f.push(Event::Time(9000));
        let p = write_trace(dir.path(), &[f], true);
        let (s, v) = export_of(&p, None, 4);
        assert_eq!(s.unsampled_stretches, 2);
        let times: Vec<f64> = by_cat(&v, "exit").iter().map(|e| ts(e)).collect();
        // Two batches of 5 at the last sample, the last 0 events: none
        // left to interpolate.
        assert_eq!(times, vec![1.0; 10]);
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
        let (s, v) = export_of(&p, None, MAX_PENDING);
        assert!(!s.complete);
        assert_eq!(s.position, 1);
        assert_eq!(v["otherData"]["complete"], false);
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
            frames in prop::collection::vec(prop::collection::vec(arb_event(), 0..40), 0..4),
            max_pending in 1usize..50,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let p = write_trace(dir.path(), &frames, true);
            let (s, v) = export_of(&p, None, max_pending);
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
