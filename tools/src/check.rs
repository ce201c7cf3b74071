//! `nyx check`: snapshot-based regression tests. Restores a snapshot, feeds
//! the serial input, runs the guest to its end and compares its serial
//! output and exit status with the expected ones, as often as asked, on as
//! many machines in parallel as asked.
//!
//! Each machine is restored once; between repetitions only the pages the
//! guest dirtied are rewritten and the devices and vCPU are put back
//! ([`nyx_vmm::reset::ResetPoint`]). Runs use the deterministic check clock
//! ([`nyx_vmm::reset::CheckRun`]): a fixed step per exit and a jump to the
//! next deadline when the guest halts, so a guest that idles with HLT gives
//! the same answer every time. A guest that computes past the time limit
//! without exits fails with a message saying it needs recording instead.
//!
//! The exit status compared is the one `nyx run` would exit with: the low
//! byte of the value written to the debug-exit port, 0 for a halt, reset or
//! power-off, 2 for a crash. It is 0 unless `--expect-status` says
//! otherwise.
//!
//! A failing repetition is run once more from the snapshot under the
//! recorder, with the same input; that trace is kept and the report says
//! how to replay it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nyx_devices::io::BufferInput;
use nyx_vmm::reset::{CheckControl, CheckRun, ResetPoint};
use nyx_vmm::{MachineBuilder, RunOutcome, SerialIn};

use crate::KvmArgs;

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
    #[error(transparent)]
    Snapshot(#[from] nyx_vmm::snapshot::SnapshotError),
    /// The machine could not be built or run.
    #[error(transparent)]
    Machine(#[from] nyx_vmm::machine::Error),
    /// A fast reset failed.
    #[error("resetting to the snapshot: {0}")]
    Reset(#[from] nyx_vmm::reset::ResetError),
}

/// What to check.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The snapshot.
    pub snapshot: PathBuf,
    /// Serial input (none: no input).
    pub input: Vec<u8>,
    /// The expected serial output.
    pub expect: Vec<u8>,
    /// The expected exit status.
    pub expect_status: i32,
    /// Repetitions in all.
    pub repeat: u64,
    /// Machines in parallel.
    pub jobs: usize,
    /// Wall-clock limit per repetition.
    pub timeout: Duration,
    /// Where traces of failing runs go.
    pub trace_dir: PathBuf,
    /// The KVM device.
    pub kvm_path: String,
    /// A bar that moves by one per repetition done.
    pub progress: Option<indicatif::ProgressBar>,
}

/// One failing repetition.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Which repetition (0-based, in the order they were started).
    pub repetition: u64,
    /// What differed.
    pub why: String,
    /// The trace of a recorded re-run, if it could be made.
    pub trace: Option<PathBuf>,
}

/// The answer of a check.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// Repetitions run.
    pub runs: u64,
    /// The failures (at most one recorded per machine).
    pub failures: Vec<Failure>,
    /// Wall time of all repetitions.
    pub elapsed: Duration,
    /// Pages rewritten per reset, summed.
    pub reset_pages: u64,
    /// Resets done.
    pub resets: u64,
    /// Time in resets, ns.
    pub reset_ns: u64,
}

impl CheckReport {
    /// Repetitions per second.
    pub fn per_second(&self) -> f64 {
        self.runs as f64 / self.elapsed.as_secs_f64().max(1e-9)
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

/// The result of one repetition: output and exit status, or why it did not
/// end.
fn run_once(machine: &mut nyx_vmm::Machine, control: &CheckControl, out: &Shared) -> (Vec<u8>, Result<i32, String>) {
    let r = match machine.run() {
        Ok(RunOutcome::Crashed(report)) => Err(format!("the guest crashed:\n{report}")),
        Ok(o) => Ok(o.exit_status()),
        Err(_) if control.timed_out() => Err(
            "the time limit passed: the guest computes or busy-waits without exits, which a check run cannot \
             make repeatable; record it (nyx record --from-snapshot) to debug it"
                .into(),
        ),
        Err(e) => Err(e.to_string()),
    };
    (out.take(), r)
}

/// One machine's share of the repetitions.
fn worker(opts: &CheckOptions, next: &AtomicU64, report: &Mutex<CheckReport>) -> Result<(), CheckError> {
    let snap = nyx_vmm::snapshot::read(&opts.snapshot)?;
    let out = Shared::default();
    let (hooks, control) = CheckRun::new();
    control.reset(snap.state.virtual_ns, opts.timeout);
    let mut machine = MachineBuilder::from_snapshot(&opts.snapshot)?
        .kvm_path(&opts.kvm_path)
        .serial_in(SerialIn::Bytes(opts.input.clone()))
        .serial_out(Box::new(out.clone()))
        .hooks(Box::new(hooks))
        .build()?;
    let start_ns = snap.state.virtual_ns;
    let mut point = ResetPoint::new(&machine, snap.state, &snap.memory)?;
    drop(snap.memory);
    let mut fresh = true;
    loop {
        let rep = next.fetch_add(1, Ordering::SeqCst);
        if rep >= opts.repeat {
            return Ok(());
        }
        if !fresh {
            control.reset(start_ns, opts.timeout);
            let s = point.reset(
                &mut machine,
                Box::new(out.clone()),
                Box::new(BufferInput::new(opts.input.clone())),
            )?;
            let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
            r.resets += 1;
            r.reset_pages += s.pages as u64;
            r.reset_ns += s.ns;
        }
        fresh = false;
        let (output, status) = run_once(&mut machine, &control, &out);
        let why = match status {
            Ok(status) => compare(&output, status, &opts.expect, opts.expect_status),
            Err(e) => Some(e),
        };
        if let Some(b) = &opts.progress {
            b.inc(1);
        }
        let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
        r.runs += 1;
        if let Some(why) = why {
            drop(r);
            let trace = record_failure(opts, rep);
            let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
            r.failures.push(Failure {
                repetition: rep,
                why,
                trace,
            });
        }
    }
}

/// Runs the repetition again under the recorder, from the snapshot with the
/// same input, and keeps its trace. None when the recording failed (the
/// reason goes to the log).
fn record_failure(opts: &CheckOptions, rep: u64) -> Option<PathBuf> {
    let path = opts.trace_dir.join(format!("check-fail-{rep}.nyxtrace"));
    let r = nyx_recorder::record_from_snapshot(nyx_recorder::SnapshotRecordOptions {
        snapshot: opts.snapshot.clone(),
        out: path.clone(),
        serial_in: SerialIn::Bytes(opts.input.clone()),
        serial_out: Some(Box::new(std::io::sink())),
        kvm_path: opts.kvm_path.clone(),
        verify: nyx_vmm::config::VerifyLevel::Exits,
        landings: nyx_recorder::LandingPolicy::Auto,
    });
    match r {
        Ok(rec) => Some(rec.path),
        Err(e) => {
            tracing::warn!("recording failing repetition {rep}: {e}");
            None
        }
    }
}

/// Runs the check.
pub fn check(opts: &CheckOptions) -> Result<CheckReport, CheckError> {
    let next = AtomicU64::new(0);
    let report = Mutex::new(CheckReport {
        runs: 0,
        failures: Vec::new(),
        elapsed: Duration::ZERO,
        reset_pages: 0,
        resets: 0,
        reset_ns: 0,
    });
    let start = Instant::now();
    let jobs = opts.jobs.clamp(1, 256);
    let results: Vec<Result<(), CheckError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..jobs).map(|_| s.spawn(|| worker(opts, &next, &report))).collect();
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
    let mut report = report.into_inner().unwrap_or_else(|e| e.into_inner());
    report.elapsed = start.elapsed();
    report.failures.sort_by_key(|f| f.repetition);
    Ok(report)
}

fn xml_escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".into(),
            '<' => "&lt;".into(),
            '>' => "&gt;".into(),
            '"' => "&quot;".into(),
            c if c.is_control() && c != '\n' && c != '\t' => format!("&#x{:x};", c as u32),
            c => c.to_string(),
        })
        .collect()
}

/// The report as JUnit XML: one test case per repetition that failed, and
/// one for all the repetitions that passed.
pub fn junit(name: &str, r: &CheckReport) -> String {
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    x += &format!(
        "<testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" time=\"{:.3}\">\n",
        xml_escape(name),
        r.runs,
        r.failures.len(),
        r.elapsed.as_secs_f64()
    );
    let passed = r.runs.saturating_sub(r.failures.len() as u64);
    x += &format!("  <testcase name=\"{passed} repetitions passed\"/>\n");
    for f in &r.failures {
        let replay = f
            .trace
            .as_ref()
            .map(|t| format!("\nreplay: nyx replay {}", t.display()))
            .unwrap_or_default();
        x += &format!(
            "  <testcase name=\"repetition {}\">\n    <failure message=\"{}\">{}</failure>\n  </testcase>\n",
            f.repetition,
            xml_escape(f.why.lines().next().unwrap_or("")),
            xml_escape(&format!("{}{replay}", f.why))
        );
    }
    x += "</testsuite>\n";
    x
}

/// Reads a file the user named.
pub fn read_file(path: &Path) -> Result<Vec<u8>, CheckError> {
    std::fs::read(path).map_err(|source| CheckError::File {
        path: path.to_path_buf(),
        source,
    })
}

/// `nyx check SNAPSHOT --input FILE --expect FILE ...`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The snapshot to restore.
    snapshot: PathBuf,
    /// Serial (COM1) input to feed (default: none).
    #[arg(long, value_name = "FILE")]
    input: Option<PathBuf>,
    /// The expected serial output.
    #[arg(long, value_name = "FILE")]
    expect: PathBuf,
    /// The expected exit status (as `nyx run` would exit: the low byte of the
    /// debug-exit value, 0 for a halt, 2 for a crash).
    #[arg(long, value_name = "N", default_value_t = 0)]
    expect_status: i32,
    /// Repetitions.
    #[arg(long, value_name = "N", default_value_t = 1)]
    repeat: u64,
    /// Machines run in parallel.
    #[arg(long, value_name = "J", default_value_t = 1)]
    jobs: usize,
    /// Write a JUnit XML report here.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Wall-clock limit per repetition, seconds.
    #[arg(long, value_name = "S", default_value_t = 30.0)]
    timeout: f64,
    /// Where the traces of failing runs go (default: the current directory).
    #[arg(long, value_name = "DIR", default_value = ".")]
    trace_dir: PathBuf,
    #[command(flatten)]
    kvm: KvmArgs,
}

/// Runs `nyx check`: exit status 0 when every repetition passed, 5 when
/// some failed (each with its trace and replay command on stderr).
pub fn main(a: &CheckArgs) -> Result<std::process::ExitCode, String> {
    let input = match &a.input {
        Some(p) => read_file(p).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let opts = CheckOptions {
        snapshot: a.snapshot.clone(),
        input,
        expect: read_file(&a.expect).map_err(|e| e.to_string())?,
        expect_status: a.expect_status,
        repeat: a.repeat,
        jobs: a.jobs,
        timeout: Duration::try_from_secs_f64(a.timeout).map_err(|e| format!("--timeout {}: {e}", a.timeout))?,
        trace_dir: a.trace_dir.clone(),
        kvm_path: a.kvm.kvm_device.clone(),
        progress: crate::progress::bar(a.repeat, "nyx check"),
    };
    let r = check(&opts);
    if let Some(b) = &opts.progress {
        b.finish_and_clear();
    }
    let r = r.map_err(|e| e.to_string())?;
    if let Some(p) = &a.junit {
        std::fs::write(p, junit(&a.snapshot.display().to_string(), &r)).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    for f in &r.failures {
        eprintln!("nyx check: repetition {} FAILED: {}", f.repetition, f.why);
        match &f.trace {
            Some(t) => eprintln!(
                "nyx check:   trace of a recorded re-run: {} (replay: nyx replay {})",
                t.display(),
                t.display()
            ),
            None => eprintln!("nyx check:   no trace could be recorded (see the messages above)"),
        }
    }
    let mean_pages = r.reset_pages as f64 / r.resets.max(1) as f64;
    let mean_us = r.reset_ns as f64 / r.resets.max(1) as f64 / 1000.0;
    eprintln!(
        "nyx check: {} of {} repetitions passed in {:.2} s ({:.0}/s, {} jobs); resets: {:.1} pages, {:.1} us on average",
        r.runs - r.failures.len() as u64,
        r.runs,
        r.elapsed.as_secs_f64(),
        r.per_second(),
        opts.jobs,
        mean_pages,
        mean_us
    );
    Ok(if r.failures.is_empty() {
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
    }

    #[test]
    fn junit_lists_failures_with_their_replay_command() {
        let r = CheckReport {
            runs: 5,
            failures: vec![Failure {
                repetition: 3,
                why: "output <differs>".into(),
                trace: Some(PathBuf::from("t.nyxtrace")),
            }],
            elapsed: Duration::from_millis(10),
            reset_pages: 0,
            resets: 4,
            reset_ns: 0,
        };
        let x = junit("snap", &r);
        assert!(x.contains("tests=\"5\" failures=\"1\""), "{x}");
        assert!(x.contains("4 repetitions passed"), "{x}");
        assert!(x.contains("output &lt;differs&gt;"), "{x}");
        assert!(x.contains("nyx replay t.nyxtrace"), "{x}");
    }
}
