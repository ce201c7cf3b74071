//! `nyx check`: snapshot-based regression tests. Restores a snapshot, feeds
//! the serial input, runs the guest to its end and compares its serial
//! output and exit status with the expected ones, as often as asked, on as
//! many machines in parallel as asked; one case from the command line, or
//! the cases of a suite ([`suite`]), all of them or one shard's share.
//!
//! Each machine restores a snapshot once; between repetitions (and between
//! cases that share the snapshot) only the pages the guest dirtied are
//! rewritten and the devices and vCPU are put back
//! ([`nyx_vmm::reset::ResetPoint`]). Runs use the deterministic check clock
//! ([`nyx_vmm::reset::CheckRun`]) unless a case asks for the host's: a fixed
//! step per exit and a jump to the next deadline when the guest halts, so a
//! guest that idles with HLT gives the same answer every time. A guest that
//! computes past the time limit without exits fails with a message saying
//! what to do instead.
//!
//! The exit status compared is the one `nyx run` would exit with: the low
//! byte of the value written to the debug-exit port, 0 for a halt, reset or
//! power-off, 2 for a crash.
//!
//! Failures are grouped by outcome (output and status): each distinct one is
//! reported once with its count, its actual output is kept, and it is
//! recorded by running its repetition again from the snapshot under the
//! recorder driven by the same check clock. A check run's path depends only
//! on the snapshot, the input and that clock, so the recorded run is the
//! failing run; the recording's own output and status are compared with the
//! failure's, and the report says so if they differ (the host clock, or
//! something in KVM that the check clock does not cover). Passing
//! repetitions cost nothing extra: nothing is recorded unless one fails.
//!
//! A machine with several vCPUs runs them one at a time, as a recording
//! does, switching at the end of each slice of host time: its interleaving
//! is the host's, not the clock's, so a failure is recorded again until a
//! recording ends as it did (a few attempts), and the report says when none
//! did. Its output should not depend on the interleaving unless that is
//! what the case tests.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nyx_devices::io::BufferInput;
use nyx_vmm::reset::{CheckControl, CheckRun, ClockKind, ResetPoint};
use nyx_vmm::{MachineBuilder, RunOutcome, SerialIn};

use crate::KvmArgs;

pub mod junit;
pub mod suite;

/// Errors that stop `nyx check` before it can give an answer.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A file the user named cannot be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The snapshot cannot be read.
    #[error("{path}: {source}")]
    Snapshot {
        /// The snapshot.
        path: PathBuf,
        /// Why.
        source: nyx_vmm::snapshot::SnapshotError,
    },
    /// The machine could not be built or run.
    #[error(transparent)]
    Machine(#[from] nyx_vmm::machine::Error),
    /// A fast reset failed.
    #[error("resetting to the snapshot: {0}")]
    Reset(#[from] nyx_vmm::reset::ResetError),
}

/// One case: a snapshot, its input and what it must print.
#[derive(Debug, Clone)]
pub struct Case {
    /// Its name (reports, trace file names).
    pub name: String,
    /// The snapshot.
    pub snapshot: PathBuf,
    /// Serial input.
    pub input: Vec<u8>,
    /// The expected serial output.
    pub expect: Vec<u8>,
    /// The expected exit status.
    pub expect_status: i32,
    /// Repetitions.
    pub repeat: u64,
    /// Wall-clock limit per repetition.
    pub timeout: Duration,
    /// The clock it runs under.
    pub clock: ClockKind,
}

/// This run's share of the repetitions: `index` of `count` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Which share.
    pub index: u64,
    /// Of how many.
    pub count: u64,
}

impl Shard {
    /// All of it.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Whether the repetition numbered `global` (cases in suite order, each
    /// case's repetitions in order) is this shard's: round robin, so that
    /// it depends only on the suite and not on the host.
    pub fn owns(&self, global: u64) -> bool {
        global % self.count == self.index
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("--shard {s:?}: give I/N with 0 <= I < N (e.g. 0/4)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (u64, u64) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

/// What to check.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The cases.
    pub cases: Vec<Case>,
    /// Machines in parallel.
    pub jobs: usize,
    /// Run every repetition of a case even after one failed.
    pub keep_going: bool,
    /// This run's share.
    pub shard: Shard,
    /// Where traces and outputs of failures go (created).
    pub trace_dir: PathBuf,
    /// The KVM device.
    pub kvm_path: String,
    /// A bar that moves by one per repetition done.
    pub progress: Option<indicatif::ProgressBar>,
}

/// How one repetition ended: its output and exit status, or why it did not
/// end.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Outcome {
    /// Serial output.
    pub output: Vec<u8>,
    /// Exit status, or why the run did not end.
    pub status: Result<i32, String>,
}

/// One distinct failing outcome of a case.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The first repetition (0-based within the case) that ended this way.
    pub repetition: u64,
    /// How many repetitions ended this way.
    pub count: u64,
    /// What differed.
    pub why: String,
    /// The outcome.
    pub outcome: Outcome,
    /// The actual output, kept in the trace directory.
    pub output_file: Option<PathBuf>,
    /// The trace of the failing repetition, if it could be made.
    pub trace: Option<PathBuf>,
    /// Why the trace may not show this failure (its recorded run ended
    /// differently), or why there is none.
    pub trace_note: Option<String>,
}

/// The answer for one case.
#[derive(Debug, Clone, Default)]
pub struct CaseReport {
    /// Repetitions run.
    pub runs: u64,
    /// Repetitions of this shard not run: the case stopped at a failure.
    pub skipped: u64,
    /// Distinct failures, by first repetition.
    pub failures: Vec<Failure>,
    /// Time its repetitions ran (resets included), ns.
    pub ns: u64,
}

impl CaseReport {
    /// Failing repetitions.
    pub fn failed(&self) -> u64 {
        self.failures.iter().map(|f| f.count).sum()
    }
}

/// The answer of a check.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// Per case, in the order of the options.
    pub cases: Vec<CaseReport>,
    /// Wall time of all repetitions.
    pub elapsed: Duration,
    /// Pages rewritten per reset, summed.
    pub reset_pages: u64,
    /// Resets done.
    pub resets: u64,
    /// Time in resets, ns.
    pub reset_ns: u64,
    /// Machines restored from a snapshot.
    pub restores: u64,
}

impl CheckReport {
    /// Repetitions run.
    pub fn runs(&self) -> u64 {
        self.cases.iter().map(|c| c.runs).sum()
    }

    /// Failing repetitions.
    pub fn failed(&self) -> u64 {
        self.cases.iter().map(|c| c.failed()).sum()
    }

    /// Repetitions per second.
    pub fn per_second(&self) -> f64 {
        self.runs() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Mean reset: pages rewritten and microseconds.
    pub fn mean_reset(&self) -> (f64, f64) {
        let n = self.resets.max(1) as f64;
        (self.reset_pages as f64 / n, self.reset_ns as f64 / n / 1000.0)
    }
}

/// A `Write` into a shared buffer (COM1's output of one machine).
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Shared {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Why a repetition's result is not the expected one, or None.
pub fn compare(output: &[u8], status: i32, expect: &[u8], expect_status: i32) -> Option<String> {
    let mut why = Vec::new();
    if output != expect {
        let at = output.iter().zip(expect).take_while(|(a, b)| a == b).count();
        let show = |s: &[u8]| {
            let end = (at + 40).min(s.len());
            format!("{:?}", String::from_utf8_lossy(&s[at.min(end)..end]))
        };
        why.push(format!(
            "output differs at byte {at}: expected {}, got {} ({} bytes expected, {} got)",
            show(expect),
            show(output),
            expect.len(),
            output.len()
        ));
    }
    if status != expect_status {
        why.push(format!("exit status {status}, expected {expect_status}"));
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// Why `outcome` fails `case`, or None.
fn judge(case: &Case, outcome: &Outcome) -> Option<String> {
    match &outcome.status {
        Ok(s) => compare(&outcome.output, *s, &case.expect, case.expect_status),
        Err(e) => Some(e.clone()),
    }
}

/// The result of one run of `machine`.
fn run_once(machine: &mut nyx_vmm::Machine, control: &CheckControl, out: &Shared) -> Outcome {
    let status = match machine.run() {
        Ok(RunOutcome::Crashed(report)) => Err(format!("the guest crashed:\n{report}")),
        Ok(o) => Ok(o.exit_status()),
        Err(_) if control.timed_out() => Err(nyx_vmm::reset::TIMED_OUT.to_string()),
        Err(e) => Err(e.to_string()),
    };
    Outcome {
        output: out.take(),
        status,
    }
}

/// A machine restored from one snapshot, kept by a worker across
/// repetitions and cases.
struct Restored {
    machine: nyx_vmm::Machine,
    point: ResetPoint,
    control: CheckControl,
    out: Shared,
    start_ns: u64,
    fresh: bool,
}

/// Restores `case`'s snapshot into a new machine with its input.
fn restore(case: &Case, kvm_path: &str) -> Result<Restored, CheckError> {
    let snap = nyx_vmm::snapshot::read(&case.snapshot).map_err(|source| CheckError::Snapshot {
        path: case.snapshot.clone(),
        source,
    })?;
    let out = Shared::default();
    let (hooks, control) = CheckRun::new();
    control.set_clock(case.clock);
    let start_ns = snap.state.virtual_ns;
    let machine = MachineBuilder::from_snapshot(&case.snapshot)
        .map_err(|source| CheckError::Snapshot {
            path: case.snapshot.clone(),
            source,
        })?
        .kvm_path(kvm_path)
        .serial_in(SerialIn::Bytes(case.input.clone()))
        .serial_out(Box::new(out.clone()))
        .hooks(Box::new(hooks))
        .build()?;
    let point = ResetPoint::new(&machine, snap.state, &snap.memory)?;
    Ok(Restored {
        machine,
        point,
        control,
        out,
        start_ns,
        fresh: true,
    })
}

/// The shared state of the workers of one check.
struct Run<'a> {
    opts: &'a CheckOptions,
    /// (case, repetition) of this shard, in order.
    items: Vec<(usize, u64)>,
    next: AtomicU64,
    /// Per case: a repetition failed and the rest are skipped.
    stopped: Vec<AtomicBool>,
    report: Mutex<CheckReport>,
    /// Outcomes by (case, repetition), when a caller wants them (blessing).
    outcomes: Option<Mutex<Outcomes>>,
}

impl Run<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, CheckReport> {
        self.report.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One machine's share of the repetitions.
    fn worker(&self) -> Result<(), CheckError> {
        let opts = self.opts;
        let mut machines: HashMap<PathBuf, Restored> = HashMap::new();
        loop {
            let i = self.next.fetch_add(1, Ordering::SeqCst) as usize;
            let Some(&(c, rep)) = self.items.get(i) else {
                return Ok(());
            };
            let case = &opts.cases[c];
            if self.stopped[c].load(Ordering::SeqCst) {
                self.lock().cases[c].skipped += 1;
                if let Some(b) = &opts.progress {
                    b.inc(1);
                }
                continue;
            }
            let t = Instant::now();
            let r = match machines.entry(case.snapshot.clone()) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let r = restore(case, &opts.kvm_path)?;
                    self.lock().restores += 1;
                    v.insert(r)
                }
            };
            r.control.set_clock(case.clock);
            r.control.reset(r.start_ns, Some(case.timeout));
            if !std::mem::take(&mut r.fresh) {
                let s = r.point.reset(
                    &mut r.machine,
                    Box::new(r.out.clone()),
                    Box::new(BufferInput::new(case.input.clone())),
                )?;
                // The clock's origin starts after the reset.
                r.control.reset(r.start_ns, Some(case.timeout));
                let mut rep = self.lock();
                rep.resets += 1;
                rep.reset_pages += s.pages as u64;
                rep.reset_ns += s.ns;
            }
            let outcome = run_once(&mut r.machine, &r.control, &r.out);
            let ns = t.elapsed().as_nanos() as u64;
            if let Some(b) = &opts.progress {
                b.inc(1);
            }
            // Blessing collects outcomes; it has nothing to compare with.
            let why = if self.outcomes.is_some() {
                None
            } else {
                judge(case, &outcome)
            };
            {
                let mut report = self.lock();
                report.cases[c].runs += 1;
                report.cases[c].ns += ns;
            }
            if let Some(o) = &self.outcomes {
                o.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((c, rep, outcome.clone()));
            }
            if let Some(why) = why {
                if !opts.keep_going {
                    self.stopped[c].store(true, Ordering::SeqCst);
                }
                let cpus = r.machine.cpus();
                self.failed(c, rep, why, outcome, cpus);
            }
        }
    }

    /// Counts a failure into its group; the first of a group is recorded.
    fn failed(&self, c: usize, rep: u64, why: String, outcome: Outcome, cpus: usize) {
        let at = {
            let mut report = self.lock();
            let failures = &mut report.cases[c].failures;
            if let Some(f) = failures.iter_mut().find(|f| f.outcome == outcome) {
                f.count += 1;
                f.repetition = f.repetition.min(rep);
                return;
            }
            failures.push(Failure {
                repetition: rep,
                count: 1,
                why,
                outcome: outcome.clone(),
                output_file: None,
                trace: None,
                trace_note: None,
            });
            failures.len() - 1
        };
        let kept = keep_failure(self.opts, c, rep, &outcome, cpus);
        let mut report = self.lock();
        let f = &mut report.cases[c].failures[at];
        (f.output_file, f.trace, f.trace_note) = kept;
    }
}

/// A file name of `name`: letters, digits, `-`, `_` and `.` kept.
fn file_stem(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("case{s}")
    } else {
        s
    }
}

/// Keeps a failure in the trace directory: its actual output, and a trace
/// of the repetition recorded again under the same clock, with a note when
/// that recording ended differently or could not be made.
///
/// With several vCPUs (`cpus`), which run one at a time in slices of host
/// time, the interleaving is not the clock's to fix: the repetition is
/// recorded again, up to [`SMP_RECORD_ATTEMPTS`] times, until a recording
/// ends as the failure did.
fn keep_failure(
    opts: &CheckOptions,
    c: usize,
    rep: u64,
    outcome: &Outcome,
    cpus: usize,
) -> (Option<PathBuf>, Option<PathBuf>, Option<String>) {
    let case = &opts.cases[c];
    let stem = opts.trace_dir.join(format!("{}-{rep}", file_stem(&case.name)));
    if let Err(e) = std::fs::create_dir_all(&opts.trace_dir) {
        let note = format!("cannot create {}: {e}", opts.trace_dir.display());
        return (None, None, Some(note));
    }
    let out_path = stem.with_extension("out");
    let output_file = match std::fs::write(&out_path, &outcome.output) {
        Ok(()) => Some(out_path),
        Err(e) => {
            tracing::warn!("{}: {e}", out_path.display());
            None
        }
    };
    let attempts = if cpus > 1 { SMP_RECORD_ATTEMPTS } else { 1 };
    let trace = stem.with_extension("nyxtrace");
    let mut recorded = record_repetition(case, &trace, &opts.kvm_path);
    for _ in 1..attempts {
        if !matches!(&recorded, Ok((_, r)) if r != outcome) {
            break;
        }
        recorded = record_repetition(case, &trace, &opts.kvm_path);
    }
    let (trace, note) = match recorded {
        Ok((path, recorded)) if &recorded == outcome => (Some(path), None),
        Ok((path, recorded)) => {
            let why = match (&recorded.status, &outcome.status) {
                (Ok(a), Ok(b)) if a != b => format!("exit status {a}, not {b}"),
                (Err(e), _) => e.lines().next().unwrap_or("").to_string(),
                _ if recorded.output.len() == outcome.output.len() => {
                    format!("other output of the same length, {} bytes", outcome.output.len())
                }
                _ => format!(
                    "{} bytes of output, not {}",
                    recorded.output.len(),
                    outcome.output.len()
                ),
            };
            let note = match case.clock {
                _ if cpus > 1 => format!(
                    "none of {attempts} recordings ended this way ({why} in the last): with {cpus} vCPUs the \
                     interleaving follows slices of host time, and the recorded runs interleaved otherwise"
                ),
                ClockKind::Host => format!("the recorded run ended differently under the host clock ({why}); it may not show this failure"),
                ClockKind::Check => format!("the recorded run ended differently ({why}), which the check clock should not allow: please report it"),
            };
            (Some(path), Some(note))
        }
        Err(e) => (None, Some(format!("no trace could be recorded: {e}"))),
    };
    (output_file, trace, note)
}

/// How many times a failing repetition of a machine with several vCPUs is
/// recorded at most, to catch an interleaving that ends as it did.
const SMP_RECORD_ATTEMPTS: usize = 5;

/// Runs `case` once from its snapshot under the recorder, with the case's
/// clock (the check clock's time limit too), into `path`.
fn record_repetition(case: &Case, path: &Path, kvm_path: &str) -> Result<(PathBuf, Outcome), String> {
    let out = Shared::default();
    let (check, control) = match case.clock {
        ClockKind::Check => {
            let (hooks, control) = CheckRun::new();
            (Some(hooks), Some(control))
        }
        ClockKind::Host => (None, None),
    };
    let mut session = nyx_recorder::start_from_snapshot(nyx_recorder::SnapshotRecordOptions {
        snapshot: case.snapshot.clone(),
        out: path.to_path_buf(),
        serial_in: SerialIn::Bytes(case.input.clone()),
        serial_out: Some(Box::new(out.clone())),
        kvm_path: kvm_path.to_string(),
        verify: nyx_vmm::config::VerifyLevel::Exits,
        landings: nyx_recorder::LandingPolicy::Auto,
        check,
    })
    .map_err(|e| e.to_string())?;
    if let Some(c) = &control {
        c.set_limit(Some(case.timeout));
    }
    let run = session.machine().run();
    let timed_out = control.as_ref().is_some_and(|c| c.timed_out());
    match session.finish(run) {
        Ok(rec) => {
            let status = match rec.outcome {
                RunOutcome::Crashed(report) => Err(format!("the guest crashed:\n{report}")),
                o => Ok(o.exit_status()),
            };
            Ok((
                rec.path,
                Outcome {
                    output: out.take(),
                    status,
                },
            ))
        }
        Err(_) if timed_out => {
            // A run stopped at its limit leaves its trace `.partial`: it
            // replays up to where the limit stopped it.
            let mut partial = path.as_os_str().to_owned();
            partial.push(".partial");
            Ok((
                PathBuf::from(partial),
                Outcome {
                    output: out.take(),
                    status: Err(nyx_vmm::reset::TIMED_OUT.to_string()),
                },
            ))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Runs the check: every repetition of the shard's share, on `opts.jobs`
/// machines at once.
pub fn check(opts: &CheckOptions) -> Result<CheckReport, CheckError> {
    run_items(opts, false).map(|(r, _)| r)
}

/// Outcomes by case and repetition.
type Outcomes = Vec<(usize, u64, Outcome)>;

fn run_items(opts: &CheckOptions, keep: bool) -> Result<(CheckReport, Outcomes), CheckError> {
    let mut items = Vec::new();
    let mut global = 0u64;
    for (c, case) in opts.cases.iter().enumerate() {
        for rep in 0..case.repeat {
            if opts.shard.owns(global) {
                items.push((c, rep));
            }
            global += 1;
        }
    }
    let run = Run {
        opts,
        items,
        next: AtomicU64::new(0),
        stopped: opts.cases.iter().map(|_| AtomicBool::new(false)).collect(),
        report: Mutex::new(CheckReport {
            cases: vec![CaseReport::default(); opts.cases.len()],
            elapsed: Duration::ZERO,
            reset_pages: 0,
            resets: 0,
            reset_ns: 0,
            restores: 0,
        }),
        outcomes: keep.then(|| Mutex::new(Vec::new())),
    };
    let start = Instant::now();
    let jobs = opts.jobs.clamp(1, 256).min(run.items.len().max(1));
    let results: Vec<Result<(), CheckError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..jobs).map(|_| s.spawn(|| run.worker())).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(CheckError::Machine(
                        std::io::Error::other("a check thread panicked").into(),
                    ))
                })
            })
            .collect()
    });
    for r in results {
        r?;
    }
    let mut report = run.report.into_inner().unwrap_or_else(|e| e.into_inner());
    report.elapsed = start.elapsed();
    for c in &mut report.cases {
        c.failures.sort_by_key(|f| f.repetition);
    }
    let mut outcomes = run
        .outcomes
        .map(|o| o.into_inner().unwrap_or_else(|e| e.into_inner()))
        .unwrap_or_default();
    outcomes.sort_by_key(|(c, r, _)| (*c, *r));
    Ok((report, outcomes))
}

/// Runs each case once and returns its outcome, to bless: the output and
/// status a case will be expected to give.
pub fn bless(opts: &CheckOptions) -> Result<Vec<Outcome>, String> {
    let once = CheckOptions {
        cases: opts.cases.iter().map(|c| Case { repeat: 1, ..c.clone() }).collect(),
        shard: Shard::ALL,
        keep_going: true,
        progress: None,
        ..opts.clone()
    };
    let (_, outcomes) = run_items(&once, true).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (c, _, o) in outcomes {
        if let Err(e) = &o.status {
            return Err(format!(
                "case {}: cannot bless a run that did not end: {}",
                opts.cases[c].name,
                e.lines().next().unwrap_or("")
            ));
        }
        out.push(o);
    }
    Ok(out)
}

/// The report as JUnit XML.
pub fn junit(name: &str, cases: &[Case], r: &CheckReport) -> junit::JSuite {
    let mut s = junit::JSuite {
        name: name.to_string(),
        cases: Vec::new(),
    };
    for (case, c) in cases.iter().zip(&r.cases) {
        if c.runs == 0 && c.skipped == 0 {
            continue; // not this shard's
        }
        s.cases.push(junit::JCase {
            name: case.name.clone(),
            time: c.ns as f64 / 1e9,
            runs: c.runs,
            skipped: c.skipped,
            failures: c
                .failures
                .iter()
                .map(|f| {
                    let first = f.why.lines().next().unwrap_or("").to_string();
                    (
                        format!("{first} ({} of {} repetitions)", f.count, c.runs),
                        failure_text(f),
                    )
                })
                .collect(),
            traces: c
                .failures
                .iter()
                .filter_map(|f| f.trace.as_ref().map(|t| t.display().to_string()))
                .collect(),
        });
    }
    s
}

/// The full report of a failure: what differed, how often, where its
/// output and trace are, how to replay it.
fn failure_text(f: &Failure) -> String {
    let mut t = format!(
        "{}\n{} repetition{} ended this way, the first being repetition {}",
        f.why,
        f.count,
        if f.count == 1 { "" } else { "s" },
        f.repetition
    );
    if let Some(o) = &f.output_file {
        t += &format!("\nactual output: {}", o.display());
    }
    if let Some(p) = &f.trace {
        t += &format!("\ntrace: {} (replay: nyx replay {})", p.display(), p.display());
    }
    if let Some(n) = &f.trace_note {
        t += &format!("\nnote: {n}");
    }
    t
}

/// Reads a file the user named.
pub fn read_file(path: &Path) -> Result<Vec<u8>, CheckError> {
    std::fs::read(path).map_err(|source| CheckError::File {
        path: path.to_path_buf(),
        source,
    })
}

/// `--clock`: the clock a machine runs under.
#[derive(clap::Args, Debug, Clone)]
pub struct ClockArgs {
    /// `host`: the host's clock. `check`: the deterministic clock of `nyx
    /// check` (a fixed step per exit, a jump to the next timer deadline when
    /// the guest halts, a fixed date and random sequence): `nyx restore
    /// --clock check` prints exactly what `nyx check` compares.
    #[arg(long, value_name = "CLOCK", default_value = "host", value_parser = ["host", "check"])]
    pub clock: String,
}

impl ClockArgs {
    /// The check clock's hooks, with `--clock check`.
    pub fn check_hooks(&self) -> Option<(CheckRun, CheckControl)> {
        (self.clock == "check").then(CheckRun::new)
    }
}

/// `nyx check merge-junit`.
#[derive(clap::Subcommand, Debug)]
pub enum CheckCommand {
    /// Merge the JUnit reports of several shards into one, on stdout.
    MergeJunit {
        /// The reports.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
    },
}

/// `nyx check SNAPSHOT --input FILE --expect FILE ...`, `nyx check --suite
/// FILE ...`.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct CheckArgs {
    #[command(subcommand)]
    command: Option<CheckCommand>,
    /// The snapshot to restore.
    #[arg(required_unless_present = "suite", conflicts_with = "suite")]
    snapshot: Option<PathBuf>,
    /// Serial (COM1) input to feed (default: none).
    #[arg(long, value_name = "FILE", conflicts_with = "suite")]
    input: Option<PathBuf>,
    /// The expected serial output (its exit status: --expect-status, or
    /// the file FILE.status that --bless writes).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "suite",
        conflicts_with = "suite"
    )]
    expect: Option<PathBuf>,
    /// The expected exit status (as `nyx run` would exit: the low byte of the
    /// debug-exit value, 0 for a halt, 2 for a crash); default: FILE.status
    /// of --expect if it exists, else 0.
    #[arg(long, value_name = "N", conflicts_with = "suite")]
    expect_status: Option<i32>,
    /// The cases of a suite file (TOML) instead of one snapshot.
    #[arg(long, value_name = "FILE")]
    suite: Option<PathBuf>,
    /// Write the expected output (and status) from one run of each case,
    /// then check against it.
    #[arg(long, conflicts_with = "shard")]
    bless: bool,
    /// Repetitions.
    #[arg(long, value_name = "N", default_value_t = 1, conflicts_with = "suite")]
    repeat: u64,
    /// Wall-clock limit per repetition, seconds.
    #[arg(long, value_name = "S", default_value_t = 30.0, conflicts_with = "suite")]
    timeout: f64,
    /// The clock: `check` (deterministic; see `nyx run --help`) or `host`
    /// (for guests that wait for a timer in a compute loop).
    #[arg(long, value_name = "CLOCK", default_value = "check", conflicts_with = "suite")]
    clock: ClockKind,
    /// Machines run in parallel.
    #[arg(long, value_name = "J", default_value_t = 1)]
    jobs: usize,
    /// Run every repetition even after one failed (default: a case stops at
    /// its first failing repetition).
    #[arg(long)]
    keep_going: bool,
    /// Run this share of the cases x repetitions: I/N (0 <= I < N), round
    /// robin in suite order; the same on every host.
    #[arg(long, value_name = "I/N")]
    shard: Option<Shard>,
    /// Write a JUnit XML report here.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Where the traces and outputs of failures go (created).
    #[arg(long, value_name = "DIR", default_value = "nyx-check-failures")]
    trace_dir: PathBuf,
    #[command(flatten)]
    kvm: KvmArgs,
}

/// The sidecar that holds a blessed expected status.
fn status_file(expect: &Path) -> PathBuf {
    let mut s = expect.as_os_str().to_owned();
    s.push(".status");
    PathBuf::from(s)
}

fn write(path: &Path, data: &[u8]) -> Result<(), String> {
    std::fs::write(path, data).map_err(|e| format!("{}: {e}", path.display()))
}

/// The cases the arguments describe: the suite's, or one from the command
/// line; expected outputs are read unless blessing.
fn cases(a: &CheckArgs) -> Result<(String, Vec<Case>, Vec<PathBuf>), String> {
    let read = |p: &Path| read_file(p).map_err(|e| e.to_string());
    let specs = match &a.suite {
        Some(path) => {
            let text = String::from_utf8(read(path)?).map_err(|_| format!("{}: not UTF-8 text", path.display()))?;
            suite::parse(path, &text).map_err(|e| e.to_string())?
        }
        None => {
            let (Some(snapshot), Some(expect)) = (&a.snapshot, &a.expect) else {
                return Err("give a snapshot and --expect FILE, or --suite FILE".into());
            };
            let expect_status = match a.expect_status {
                Some(s) => s,
                None => match std::fs::read_to_string(status_file(expect)) {
                    Ok(t) => t.trim().parse().map_err(|_| {
                        format!("{}: not an exit status: {:?}", status_file(expect).display(), t.trim())
                    })?,
                    Err(_) => 0,
                },
            };
            let name = snapshot
                .file_stem()
                .map_or_else(|| "check".into(), |s| s.to_string_lossy().into_owned());
            vec![suite::CaseSpec {
                name,
                snapshot: snapshot.clone(),
                input: a.input.clone(),
                expect: expect.clone(),
                expect_status,
                repeat: a.repeat,
                timeout: Duration::try_from_secs_f64(a.timeout).map_err(|e| format!("--timeout {}: {e}", a.timeout))?,
                clock: a.clock,
            }]
        }
    };
    let name = a
        .suite
        .as_ref()
        .or(a.snapshot.as_ref())
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut expects = Vec::new();
    for s in specs {
        out.push(Case {
            input: match &s.input {
                Some(p) => read(p)?,
                None => Vec::new(),
            },
            expect: if a.bless { Vec::new() } else { read(&s.expect)? },
            name: s.name,
            snapshot: s.snapshot,
            expect_status: s.expect_status,
            repeat: s.repeat,
            timeout: s.timeout,
            clock: s.clock,
        });
        expects.push(s.expect);
    }
    Ok((name, out, expects))
}

/// Writes the blessed outputs and statuses.
fn write_blessed(a: &CheckArgs, cases: &mut [Case], expects: &[PathBuf], blessed: &[Outcome]) -> Result<(), String> {
    let mut statuses = Vec::new();
    for ((case, path), o) in cases.iter_mut().zip(expects).zip(blessed) {
        let status = o.status.clone().unwrap_or(0);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        write(path, &o.output)?;
        case.expect = o.output.clone();
        case.expect_status = status;
        statuses.push(status);
        eprintln!(
            "nyx check: blessed {}: {} bytes of output into {}, exit status {status}",
            case.name,
            o.output.len(),
            path.display()
        );
    }
    match &a.suite {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let t = suite::with_statuses(path, &text, &statuses).map_err(|e| e.to_string())?;
            write(path, t.as_bytes())?;
        }
        None => {
            if let (Some(p), Some(&s)) = (&a.expect, statuses.first()) {
                if a.expect_status.is_some_and(|e| e != s) {
                    eprintln!("nyx check: the run exits with status {s}, not --expect-status's; blessed {s}");
                }
                write(&status_file(p), format!("{s}\n").as_bytes())?;
            }
        }
    }
    Ok(())
}

/// `nyx check merge-junit A.xml B.xml ...`: the merged report on stdout.
fn merge_junit(reports: &[PathBuf]) -> Result<std::process::ExitCode, String> {
    let mut parts = Vec::new();
    for p in reports {
        let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
        parts.push(junit::JSuite::parse(&text).map_err(|e| format!("{}: {e}", p.display()))?);
    }
    print!("{}", junit::merge(&parts).to_xml());
    Ok(std::process::ExitCode::SUCCESS)
}

/// Runs `nyx check`: exit status 0 when every repetition passed, 5 when
/// some failed (each distinct failure reported on stderr once, with its
/// count, its output and its trace).
pub fn main(a: &CheckArgs) -> Result<std::process::ExitCode, String> {
    if let Some(CheckCommand::MergeJunit { reports }) = &a.command {
        return merge_junit(reports);
    }
    let (name, mut cases, expects) = cases(a)?;
    let mut opts = CheckOptions {
        cases: Vec::new(),
        jobs: a.jobs,
        keep_going: a.keep_going,
        shard: a.shard.unwrap_or(Shard::ALL),
        trace_dir: a.trace_dir.clone(),
        kvm_path: a.kvm.kvm_device.clone(),
        progress: None,
    };
    if a.bless {
        opts.cases = cases.clone();
        let blessed = bless(&opts)?;
        write_blessed(a, &mut cases, &expects, &blessed)?;
    }
    let total: u64 = {
        let mut g = 0u64;
        let mut n = 0u64;
        for c in &cases {
            for _ in 0..c.repeat {
                n += u64::from(opts.shard.owns(g));
                g += 1;
            }
        }
        n
    };
    opts.cases = cases;
    opts.progress = crate::progress::bar(total, "nyx check");
    let r = check(&opts);
    if let Some(b) = &opts.progress {
        b.finish_and_clear();
    }
    let r = r.map_err(|e| e.to_string())?;
    if let Some(p) = &a.junit {
        write(p, junit(&name, &opts.cases, &r).to_xml().as_bytes())?;
    }
    for (case, c) in opts.cases.iter().zip(&r.cases) {
        for f in &c.failures {
            let text = failure_text(f);
            let mut lines = text.lines();
            eprintln!("nyx check: {} FAILED: {}", case.name, lines.next().unwrap_or(""));
            for l in lines {
                eprintln!("nyx check:   {l}");
            }
        }
        if c.skipped > 0 {
            eprintln!(
                "nyx check: {}: {} repetitions not run after the first failure (--keep-going runs them)",
                case.name, c.skipped
            );
        }
    }
    let (pages, us) = r.mean_reset();
    let distinct: usize = r.cases.iter().map(|c| c.failures.len()).sum();
    let failed = if distinct > 0 {
        format!(" ({distinct} distinct failure{})", if distinct == 1 { "" } else { "s" })
    } else {
        String::new()
    };
    let shard = match a.shard {
        Some(s) if s.count > 1 => format!(", shard {}/{}", s.index, s.count),
        _ => String::new(),
    };
    eprintln!(
        "nyx check: {} of {} repetitions passed{failed} in {:.2} s: {:.1} repetitions/s on {} job{}{shard}; \
         {} restores, {} resets of {:.1} pages, {:.1} us on average",
        r.runs() - r.failed(),
        r.runs(),
        r.elapsed.as_secs_f64(),
        r.per_second(),
        opts.jobs.max(1),
        if opts.jobs > 1 { "s" } else { "" },
        r.restores,
        r.resets,
        pages,
        us
    );
    Ok(if r.failed() == 0 && r.cases.iter().all(|c| c.skipped == 0) {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(5)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn compare_names_the_first_difference_and_the_status() {
        assert_eq!(compare(b"abc", 0, b"abc", 0), None);
        let why = compare(b"abX", 3, b"abc", 0).unwrap();
        assert!(why.contains("byte 2"), "{why}");
        assert!(why.contains("exit status 3, expected 0"), "{why}");
        let why = compare(b"ab", 0, b"abc", 0).unwrap();
        assert!(why.contains("3 bytes expected, 2 got"), "{why}");
    }

    proptest! {
        #[test]
        fn compare_fails_exactly_when_something_differs(a in proptest::collection::vec(any::<u8>(), 0..20), b in proptest::collection::vec(any::<u8>(), 0..20), s in 0i32..3, t in 0i32..3) {
            prop_assert_eq!(compare(&a, s, &b, t).is_none(), a == b && s == t);
        }

        /// The shards of N split every repetition: each is in exactly one.
        #[test]
        fn shards_partition_the_repetitions(n in 1u64..9, g in 0u64..10_000) {
            let owners = (0..n).filter(|&i| Shard { index: i, count: n }.owns(g)).count();
            prop_assert_eq!(owners, 1);
        }

        #[test]
        fn shard_parses_or_fails_cleanly(s in "[0-9/ ]{0,6}") {
            if let Ok(sh) = s.parse::<Shard>() {
                prop_assert!(sh.index < sh.count);
            }
        }
    }

    #[test]
    fn shard_syntax() {
        assert_eq!("1/4".parse::<Shard>(), Ok(Shard { index: 1, count: 4 }));
        assert!("4/4".parse::<Shard>().is_err());
        assert!("0/0".parse::<Shard>().is_err());
        assert!("1".parse::<Shard>().is_err());
    }

    #[test]
    fn junit_has_a_case_per_case_with_failures_and_traces() {
        let case = |name: &str| Case {
            name: name.into(),
            snapshot: PathBuf::from("s"),
            input: vec![],
            expect: vec![],
            expect_status: 0,
            repeat: 5,
            timeout: Duration::from_secs(1),
            clock: ClockKind::Check,
        };
        let failing = CaseReport {
            runs: 5,
            skipped: 0,
            failures: vec![Failure {
                repetition: 3,
                count: 2,
                why: "output <differs>".into(),
                outcome: Outcome {
                    output: vec![],
                    status: Ok(0),
                },
                output_file: None,
                trace: Some(PathBuf::from("t.nyxtrace")),
                trace_note: None,
            }],
            ns: 1_000_000,
        };
        let r = CheckReport {
            cases: vec![
                failing,
                CaseReport::default(),
                CaseReport {
                    runs: 2,
                    ..CaseReport::default()
                },
            ],
            elapsed: Duration::from_millis(10),
            reset_pages: 0,
            resets: 4,
            reset_ns: 0,
            restores: 1,
        };
        let x = junit("snap", &[case("a"), case("b"), case("c")], &r).to_xml();
        assert!(
            x.contains("tests=\"2\" failures=\"1\""),
            "case b ran nothing in this shard: {x}"
        );
        assert!(x.contains("output &lt;differs&gt; (2 of 5 repetitions)"), "{x}");
        assert!(x.contains("<property name=\"trace\" value=\"t.nyxtrace\"/>"), "{x}");
        assert!(x.contains("nyx replay t.nyxtrace"), "{x}");
    }

    #[test]
    fn file_stems_are_safe() {
        assert_eq!(file_stem("echo abc/1"), "echo-abc-1");
        assert_eq!(file_stem(".."), "case..");
        assert_eq!(file_stem(""), "case");
    }
}
