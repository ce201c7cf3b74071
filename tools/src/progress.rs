//! Progress bars on stderr for the long operations of `nyx`: replaying a
//! trace, loading a snapshot's memory, the repetitions of `nyx check`, and
//! live migration (on the source the pages of each pre-copy pass and of
//! the stop-and-copy, on the destination the bytes and pages received so
//! far: the stream does not say its size in advance). A bar is drawn only when stderr is a
//! terminal and `CI` is not set, so tests and CI logs never see one; every
//! helper returns `None` otherwise and the caller carries on without.
//! While a bar is drawn, Nyx's log lines ([`Stderr`]) and the guest's
//! serial output ([`LineOut`]) are written above it, not through it.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use nyx_trace::{FrameKind, TraceReader};
use nyx_vmm::events::Event;
use nyx_vmm::migration::{CopyProgress, CopyProgressFn, ReceiveProgress};
use nyx_vmm::snapshot::{Snapshot, SnapshotError};

/// Positions between two updates of a replay's bar.
const REPLAY_STEP: u64 = 256;

/// The bar drawn last: what [`suspend`] hides while something else writes.
static ACTIVE: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Whether bars are drawn: stderr is a terminal and this is not CI.
pub fn wanted() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("CI").is_none()
}

/// A bar of `total` steps labelled `what` on stderr, or None when stderr
/// is not a terminal (see [`wanted`]). Finish it with
/// `finish_and_clear()`.
pub fn bar(total: u64, what: &str) -> Option<ProgressBar> {
    let bar = wanted().then(|| styled(total, what, ProgressDrawTarget::stderr()))?;
    Some(activate(bar))
}

/// Makes `bar` the one [`suspend`] hides.
fn activate(bar: ProgressBar) -> ProgressBar {
    *ACTIVE.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar.clone());
    bar
}

/// Runs `f` with the bar being drawn (if any) hidden, then draws it again.
pub fn suspend<R>(f: impl FnOnce() -> R) -> R {
    let bar = ACTIVE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match bar {
        Some(b) if !b.is_finished() => b.suspend(f),
        _ => f(),
    }
}

/// Stderr for log lines: each write goes above the bar being drawn.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Stdout for a guest's serial output while a bar is drawn on the same
/// terminal: whole lines go above the bar; a partial line waits for its
/// end or for the writer's drop (the UART flushes after every byte, so
/// `flush` does not force it out).
#[derive(Debug)]
pub struct LineOut<W: Write = std::io::Stdout> {
    inner: W,
    pending: Vec<u8>,
}

impl LineOut {
    /// Whole lines to stdout.
    pub fn stdout() -> Self {
        LineOut {
            inner: std::io::stdout(),
            pending: Vec::new(),
        }
    }
}

impl<W: Write> LineOut<W> {
    fn emit(&mut self, upto: usize) -> std::io::Result<()> {
        let line: Vec<u8> = self.pending.drain(..upto).collect();
        let inner = &mut self.inner;
        suspend(|| {
            inner.write_all(&line)?;
            inner.flush()
        })
    }
}

impl<W: Write> Write for LineOut<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        if let Some(last) = self.pending.iter().rposition(|&b| b == b'\n') {
            self.emit(last + 1)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for LineOut<W> {
    fn drop(&mut self) {
        let n = self.pending.len();
        let _ = self.emit(n);
    }
}

/// Where a guest's serial output goes while `bar` is drawn: a [`LineOut`]
/// when stdout is a terminal too, else None (the default, plain stdout).
pub fn serial_out(bar: Option<&ProgressBar>) -> Option<Box<dyn Write + Send>> {
    bar?;
    std::io::stdout()
        .is_terminal()
        .then(|| Box::new(LineOut::stdout()) as Box<dyn Write + Send>)
}

fn styled(total: u64, what: &str, target: ProgressDrawTarget) -> ProgressBar {
    let style = ProgressStyle::with_template("{msg} [{wide_bar}] {pos}/{len} ({elapsed}, {eta} left)")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    ProgressBar::with_draw_target(Some(total), target)
        .with_style(style)
        .with_message(what.to_string())
}

/// A bar for a migration's copy to `addr` and the source's progress
/// callback that moves it, one pass at a time; None when no bar is wanted.
/// Finish the bar with `finish_and_clear()` when the migration is over.
pub fn migration_out(addr: &str) -> Option<(ProgressBar, CopyProgressFn)> {
    if !wanted() {
        return None;
    }
    // Hidden until the first pass says how long it is.
    let bar = activate(styled(0, "migrating", ProgressDrawTarget::hidden()));
    let mover = copy_mover(bar.clone(), addr.to_string(), ProgressDrawTarget::stderr);
    Some((bar, mover))
}

/// Moves `bar` by a migration's [`CopyProgress`]: each pass starts the bar
/// afresh with that pass's pages as its length, drawn on a new `target`
/// (so that the pass's first state is drawn at once, however short the
/// previous one was, and no mix of two passes is ever drawn).
fn copy_mover(bar: ProgressBar, addr: String, target: fn() -> ProgressDrawTarget) -> CopyProgressFn {
    let mut pass = None;
    Box::new(move |p: CopyProgress| {
        if pass != Some((p.pass, p.stop_and_copy)) {
            pass = Some((p.pass, p.stop_and_copy));
            bar.set_draw_target(ProgressDrawTarget::hidden());
            bar.reset();
            bar.set_length(p.total);
            bar.set_message(if p.stop_and_copy {
                format!("migrating to {addr}: stop-and-copy, pages")
            } else {
                format!("migrating to {addr}: pass {}, pages", p.pass)
            });
            bar.set_draw_target(target());
        }
        bar.set_position(p.done);
    })
}

/// The destination's display of a migration coming in: a spinner with the
/// bytes and pages received, drawn from the first frame on (not while
/// nothing has connected yet).
#[derive(Debug)]
pub struct Receiving {
    wanted: bool,
    bar: Option<ProgressBar>,
}

impl Receiving {
    /// Draws only when [`wanted`].
    pub fn new() -> Self {
        Receiving {
            wanted: wanted(),
            bar: None,
        }
    }

    /// What has arrived so far.
    pub fn update(&mut self, p: ReceiveProgress) {
        if !self.wanted {
            return;
        }
        let bar = self
            .bar
            .get_or_insert_with(|| activate(spinner(ProgressDrawTarget::stderr())));
        bar.set_message(format!("receiving a migration: {} pages, {} frames", p.pages, p.frames));
        bar.set_position(p.bytes);
    }

    /// Takes the display off the terminal.
    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

fn spinner(target: ProgressDrawTarget) -> ProgressBar {
    let style = ProgressStyle::with_template("{spinner} {msg}, {binary_bytes} ({binary_bytes_per_sec}, {elapsed})")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    ProgressBar::with_draw_target(None, target).with_style(style)
}

/// The first and last position of a trace's events: the first events
/// frame's first position, and the last one's plus the exits in it. None
/// when the trace cannot be read (the replay then says why).
pub fn trace_positions(path: &Path) -> Option<(u64, u64)> {
    let mut r = TraceReader::open(path).ok()?;
    let events: Vec<usize> = (0..r.frames().len())
        .filter(|&i| r.frames()[i].kind == FrameKind::Events)
        .collect();
    let (&first, &last) = events.first().zip(events.last())?;
    let start = r.frames()[first].first_position;
    let last_start = r.frames()[last].first_position;
    let tail: Vec<Event> = nyx_vmm::events::read_events(&mut r, last).ok()?;
    let exits = tail.iter().filter(|e| matches!(e, Event::Exit(_))).count() as u64;
    Some((start, last_start.saturating_add(exits).max(start)))
}

/// A bar for replaying `trace` and the replayer's progress callback that
/// moves it; None when no bar is wanted or the trace cannot be read.
pub fn replay(trace: &Path) -> Option<(ProgressBar, nyx_replayer::Progress)> {
    if !wanted() {
        return None;
    }
    let (start, end) = trace_positions(trace)?;
    let bar = bar(end - start, "replaying")?;
    let b = bar.clone();
    let mut next = 0u64;
    let progress: nyx_replayer::Progress = Box::new(move |pos| {
        let done = pos.saturating_sub(start);
        if done >= next {
            b.set_position(done);
            next = done + REPLAY_STEP;
        }
    });
    Some((bar, progress))
}

/// Reads a snapshot to restore it with
/// [`nyx_vmm::snapshot::read_for_restore`] (its checks; a memory image is
/// left to be mapped), moving `bar` (when given) by one for each of its
/// frames; [`snapshot_frames`] says how many.
pub fn read_snapshot(path: &Path, bar: Option<&ProgressBar>) -> Result<Snapshot, SnapshotError> {
    nyx_vmm::snapshot::read_for_restore(path, &mut || {
        if let Some(b) = bar {
            b.inc(1);
        }
    })
}

/// How many frames [`read_snapshot`] goes through (0 when unreadable).
pub fn snapshot_frames(path: &Path) -> u64 {
    TraceReader::open(path).map_or(0, |r| r.frames().len() as u64)
}

/// A builder of the machine saved in `path`, as
/// `MachineBuilder::from_snapshot`, with a bar while its memory is read.
pub fn restore_builder(path: &Path) -> Result<nyx_vmm::MachineBuilder, SnapshotError> {
    let bar = if wanted() {
        bar(snapshot_frames(path), "loading the snapshot")
    } else {
        None
    };
    let snap = read_snapshot(path, bar.as_ref());
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(nyx_vmm::MachineBuilder::from_saved(snap?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nyx_trace::{ContainerKind, GuestImage, TraceHeader, TraceWriter};
    use nyx_vmm::events::ExitRecord;

    fn header(kind: ContainerKind) -> TraceHeader {
        TraceHeader {
            uuid: [7; 16],
            nyx_version: "test".into(),
            kind,
            machine_config: Vec::new(),
            images: vec![GuestImage::embedded(nyx_vmm::config::KERNEL_IMAGE, vec![1, 2, 3])],
        }
    }

    fn exit() -> Event {
        Event::Exit(ExitRecord {
            kind: nyx_vmm::events::ExitKind::Hlt,
            addr: 0,
            size: 0,
            data: 0,
            rip: 0,
        })
    }

    #[test]
    fn trace_positions_count_the_last_frames_exits() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.nyxtrace");
        let mut w = TraceWriter::create(&p, &header(ContainerKind::Trace)).unwrap();
        nyx_vmm::events::write_events(&mut w, 10, &[exit(), Event::Poll, exit()], 0).unwrap();
        nyx_vmm::events::write_events(&mut w, 12, &[exit(), Event::Time(5), exit(), exit()], 0).unwrap();
        w.finish().unwrap();
        assert_eq!(trace_positions(&p), Some((10, 15)));
        assert_eq!(trace_positions(&dir.path().join("none")), None);
    }

    #[test]
    fn a_bar_moves_only_when_drawn_and_never_for_tests() {
        // Tests run with stderr captured or piped: no bar.
        if !std::io::stderr().is_terminal() {
            assert!(bar(10, "x").is_none());
        }
        let b = styled(10, "x", ProgressDrawTarget::hidden());
        b.inc(3);
        assert_eq!((b.position(), b.length()), (3, Some(10)));
    }

    #[test]
    fn guest_output_goes_out_in_whole_lines() {
        let mut out = LineOut {
            inner: Vec::new(),
            pending: Vec::new(),
        };
        out.write_all(b"ab").unwrap();
        assert!(out.inner.is_empty());
        out.write_all(b"c\nd\ne").unwrap();
        out.flush().unwrap();
        assert_eq!(out.inner, b"abc\nd\n");
        let mut inner = Vec::new();
        {
            let mut last = LineOut {
                inner: &mut inner,
                pending: Vec::new(),
            };
            last.write_all(b"x\ny").unwrap();
        }
        assert_eq!(inner, b"x\ny", "the partial line comes out at the end");
        assert!(serial_out(None).is_none(), "no bar, plain stdout");
    }

    #[test]
    fn a_migration_bar_follows_each_pass() {
        let bar = styled(0, "m", ProgressDrawTarget::hidden());
        let mut f = copy_mover(bar.clone(), "tcp:127.0.0.1:1".into(), ProgressDrawTarget::hidden);
        let p = |pass, stop_and_copy, done, total| CopyProgress {
            pass,
            stop_and_copy,
            done,
            total,
        };
        f(p(1, false, 0, 1024));
        f(p(1, false, 512, 1024));
        assert_eq!((bar.position(), bar.length()), (512, Some(1024)));
        assert!(bar.message().contains("pass 1"), "{}", bar.message());
        f(p(1, false, 1024, 1024));
        f(p(2, false, 0, 40));
        assert_eq!((bar.position(), bar.length()), (0, Some(40)));
        assert!(bar.message().contains("pass 2"), "{}", bar.message());
        f(p(3, true, 7, 9));
        assert_eq!((bar.position(), bar.length()), (7, Some(9)));
        assert!(bar.message().contains("stop-and-copy"), "{}", bar.message());
        // Tests run without a terminal: no bar, no callback.
        if !wanted() {
            assert!(migration_out("tcp:127.0.0.1:1").is_none());
        }
    }

    #[test]
    fn the_incoming_display_shows_bytes_and_pages() {
        let mut r = Receiving {
            wanted: true,
            bar: Some(spinner(ProgressDrawTarget::hidden())),
        };
        r.update(ReceiveProgress {
            bytes: 5000,
            pages: 12,
            frames: 3,
        });
        let bar = r.bar.clone().unwrap();
        assert_eq!((bar.position(), bar.length()), (5000, None));
        assert!(bar.message().contains("12 pages, 3 frames"), "{}", bar.message());
        r.finish();
        assert!(bar.is_finished());
        let mut quiet = Receiving {
            wanted: false,
            bar: None,
        };
        quiet.update(ReceiveProgress::default());
        assert!(quiet.bar.is_none(), "no terminal, no bar");
    }

    #[test]
    fn a_trace_is_not_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.nyxtrace");
        let w = TraceWriter::create(&p, &header(ContainerKind::Trace)).unwrap();
        w.finish().unwrap();
        let e = read_snapshot(&p, None).unwrap_err().to_string();
        assert!(e.contains("not a Nyx snapshot"), "{e}");
        let missing = read_snapshot(&dir.path().join("none"), None).unwrap_err();
        assert!(matches!(missing, SnapshotError::Container { .. }));
    }
}
