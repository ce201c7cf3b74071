//! `nyx trace info|dump|verify`: looking into a trace file.
//!
//! The reports go to stdout through a buffered writer. When the reader
//! of stdout goes away early (`nyx trace dump T | head`), the command
//! stops reading the trace and ends quietly with status 0: the reader had
//! all it wanted. Nyx ignores SIGPIPE, as every Rust program does, and
//! keeps it ignored: the same process writes to control, migration and
//! gdb sockets, and a peer that hangs up must never kill a running
//! machine. So a closed stdout arrives here as an `EPIPE` error, and
//! [`Error::Output`] turns into success at the command's edge.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;

use nyx_trace::{FrameKind, TraceReader};
use nyx_vmm::config::MachineConfig;
use nyx_vmm::events::Event;

/// Errors of the trace tools.
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
    /// The header does not describe a Nyx machine.
    #[error("{0}")]
    Config(String),
    /// Writing the report to stdout failed.
    #[error("writing to stdout: {0}")]
    Output(#[from] io::Error),
    /// `--kind` names no event kind.
    #[error("no event kind is called {0:?}; the kinds are: {kinds}", kinds = Event::kind_names().join(", "))]
    UnknownKind(String),
}

/// Runs `report` with a buffered stdout; a reader that closed the pipe
/// early ends the command with success and no message.
fn to_stdout(report: impl FnOnce(&mut dyn Write) -> Result<ExitCode, Error>) -> Result<ExitCode, Error> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    quiet_broken_pipe(report(&mut out).and_then(|code| {
        out.flush()?;
        Ok(code)
    }))
}

/// `Ok(SUCCESS)` for an [`Error::Output`] of a closed pipe; anything else
/// as it is.
fn quiet_broken_pipe(r: Result<ExitCode, Error>) -> Result<ExitCode, Error> {
    match r {
        Err(Error::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        r => r,
    }
}

fn open(path: &Path) -> Result<TraceReader, Error> {
    TraceReader::open(path).map_err(|source| Error::Trace {
        path: path.display().to_string(),
        source,
    })
}

fn trace_err(path: &Path) -> impl Fn(nyx_trace::Error) -> Error + '_ {
    move |source| Error::Trace {
        path: path.display().to_string(),
        source,
    }
}

/// Every event of the trace with its position, in order; stops at the first
/// unreadable frame (reported as the error) or the first error of `f`.
fn events(r: &mut TraceReader, path: &Path, mut f: impl FnMut(u64, &Event) -> io::Result<()>) -> Result<(), Error> {
    let mut pos = 0u64;
    for i in 0..r.frames().len() {
        if r.frames()[i].kind != FrameKind::Events {
            continue;
        }
        for e in nyx_vmm::events::read_events(r, i).map_err(trace_err(path))? {
            if let Event::Exit(_) = e {
                pos += 1;
            }
            f(pos, &e)?;
        }
    }
    Ok(())
}

/// `nyx trace info FILE`.
pub fn info(path: &Path) -> Result<ExitCode, Error> {
    to_stdout(|out| write_info(path, out))
}

fn write_info(path: &Path, out: &mut dyn Write) -> Result<ExitCode, Error> {
    let mut r = open(path)?;
    let h = r.header().clone();
    let config = MachineConfig::from_bytes(&h.machine_config)
        .map_err(|e| Error::Config(format!("machine configuration: {e}")))?;
    let uuid: String = h.uuid.iter().map(|b| format!("{b:02x}")).collect();
    writeln!(out, "trace        {}", path.display())?;
    writeln!(out, "uuid         {uuid}")?;
    writeln!(out, "nyx version  {}", h.nyx_version)?;
    writeln!(out, "kind         {:?}", h.kind)?;
    writeln!(
        out,
        "machine      {} vCPU{}, {} MiB, kernel {:?}, cmdline {:?}, initrd: {}",
        config.cpus(),
        if config.cpus() == 1 { "" } else { "s" },
        config.mem_mib,
        config.kernel_name,
        config.cmdline,
        if config.has_initrd { "yes" } else { "no" }
    )?;
    writeln!(
        out,
        "cpu          model {}, {} CPUID entries, virtual TSC {} kHz, date {}",
        config.cpu_model,
        config.cpuid.len(),
        config.tsc_khz,
        config.wall_seconds
    )?;
    writeln!(
        out,
        "cpu features {}",
        nyx_vmm::cpu_model::feature_names(&config.cpuid).join(" ")
    )?;
    writeln!(out, "verify       {:?}", config.verify)?;
    for i in &h.images {
        let sha: String = i.sha256.iter().take(8).map(|b| format!("{b:02x}")).collect();
        writeln!(
            out,
            "image        {} ({} bytes, sha256 {sha}…)",
            i.name,
            i.data.as_ref().map_or(0, Vec::len)
        )?;
    }
    let info = r.info();
    let mut by_kind: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut last_time = 0u64;
    let mut end = None;
    let mut positions = 0u64;
    events(&mut r, path, |pos, e| {
        *by_kind.entry(e.kind_name()).or_default() += 1;
        positions = pos;
        if let Event::Time(t) = e {
            last_time = *t;
        }
        if let Event::End(x) = e {
            last_time = x.virtual_ns;
            end = Some(x.kind.to_string());
        }
        Ok(())
    })?;
    let total: u64 = by_kind.values().sum();
    writeln!(out, "events       {total} ({positions} guest-caused exits)")?;
    for (k, n) in &by_kind {
        writeln!(out, "  {k:<12} {n}")?;
    }
    let t = &info.total;
    writeln!(
        out,
        "frames       {} ({} bytes compressed, {} bytes raw, ratio {:.1}); file {} bytes",
        t.frames,
        t.compressed_bytes,
        t.uncompressed_bytes,
        t.uncompressed_bytes as f64 / t.compressed_bytes.max(1) as f64,
        info.file_bytes
    )?;
    for (kind, k) in &info.by_kind {
        writeln!(
            out,
            "  {:<12} {} frames, {} bytes compressed, {} raw",
            format!("{kind:?}"),
            k.frames,
            k.compressed_bytes,
            k.uncompressed_bytes
        )?;
    }
    writeln!(out, "guest time   {:.3} s (virtual)", last_time as f64 / 1e9)?;
    match (r.is_complete(), end) {
        (true, Some(e)) => writeln!(out, "complete     yes\nended        {e}"),
        (true, None) => writeln!(out, "complete     yes (no end event)"),
        (false, _) => writeln!(
            out,
            "complete     NO: the recording was cut off; it replays up to position {positions}"
        ),
    }?;
    Ok(ExitCode::SUCCESS)
}

/// `nyx trace dump FILE [--from POS] [--kind K]`.
pub fn dump(path: &Path, from: u64, kind: Option<&str>) -> Result<ExitCode, Error> {
    to_stdout(|out| write_dump(path, from, kind, out))
}

fn write_dump(path: &Path, from: u64, kind: Option<&str>, out: &mut dyn Write) -> Result<ExitCode, Error> {
    if let Some(k) = kind.filter(|k| !Event::kind_names().contains(k)) {
        return Err(Error::UnknownKind(k.to_string()));
    }
    let mut r = open(path)?;
    events(&mut r, path, |pos, e| {
        if pos < from || kind.is_some_and(|k| k != e.kind_name()) {
            return Ok(());
        }
        writeln!(out, "{pos:>10} {e}")
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `nyx trace verify FILE`.
pub fn verify(path: &Path) -> Result<ExitCode, Error> {
    to_stdout(|out| write_verify(path, out))
}

fn write_verify(path: &Path, out: &mut dyn Write) -> Result<ExitCode, Error> {
    let mut r = open(path)?;
    let info = r.verify().map_err(trace_err(path))?;
    let mut n = 0u64;
    events(&mut r, path, |_, _| {
        n += 1;
        Ok(())
    })?;
    if r.is_complete() {
        writeln!(
            out,
            "{}: OK: {} frames, {n} events, every checksum and the index verified",
            path.display(),
            info.total.frames
        )?;
        Ok(ExitCode::SUCCESS)
    } else {
        writeln!(
            out,
            "{}: INCOMPLETE: {} complete frames, {n} events readable; the recording was cut off (no index/footer)",
            path.display(),
            info.total.frames
        )?;
        Ok(ExitCode::from(4))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nyx_trace::{ContainerKind, GuestImage, TraceHeader, TraceWriter};
    use nyx_vmm::events::{ExitKind, ExitRecord};

    /// A writer that takes `room` bytes, then fails as a closed pipe does.
    struct ClosesAfter {
        room: usize,
        got: Vec<u8>,
    }

    impl Write for ClosesAfter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn trace(dir: &Path, exits: u64) -> std::path::PathBuf {
        let p = dir.join("t.nyxtrace");
        let header = TraceHeader {
            uuid: [1; 16],
            nyx_version: "test".into(),
            kind: ContainerKind::Trace,
            machine_config: Vec::new(),
            images: vec![GuestImage::embedded(nyx_vmm::config::KERNEL_IMAGE, vec![1])],
        };
        let mut w = TraceWriter::create(&p, &header).unwrap();
        let events: Vec<Event> = (0..exits)
            .map(|i| {
                Event::Exit(ExitRecord {
                    kind: ExitKind::PioOut,
                    addr: 0x3f8,
                    size: 1,
                    data: i,
                    rip: 0x1000 + i,
                })
            })
            .collect();
        nyx_vmm::events::write_events(&mut w, 0, &events, 0).unwrap();
        w.finish().unwrap();
        p
    }

    #[test]
    fn a_closed_pipe_stops_the_dump_and_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = trace(dir.path(), 1000);
        let mut all = Vec::new();
        write_dump(&p, 0, None, &mut all).unwrap();
        assert_eq!(all.iter().filter(|&&b| b == b'\n').count(), 1000);
        let mut early = ClosesAfter {
            room: 100,
            got: Vec::new(),
        };
        let r = write_dump(&p, 0, None, &mut early);
        assert!(matches!(&r, Err(Error::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe));
        assert_eq!(early.got, all[..100], "what fitted was written, in order");
        assert_eq!(quiet_broken_pipe(r).unwrap(), ExitCode::SUCCESS);
    }

    #[test]
    fn an_unknown_kind_is_an_error_listing_the_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let p = trace(dir.path(), 3);
        let e = write_dump(&p, 0, Some("NOSUCH"), &mut Vec::new()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::UnknownKind(_)), "{msg}");
        for k in ["\"NOSUCH\"", "pio-out", "landing", "end"] {
            assert!(msg.contains(k), "{msg}");
        }
        let mut out = Vec::new();
        write_dump(&p, 0, Some("pio-out"), &mut out).unwrap();
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 3);
    }

    #[test]
    fn other_errors_stay_errors() {
        let full = Err(Error::Output(io::Error::new(io::ErrorKind::StorageFull, "disk full")));
        assert!(matches!(quiet_broken_pipe(full), Err(Error::Output(_))));
        let dir = tempfile::tempdir().unwrap();
        let r = quiet_broken_pipe(write_verify(&dir.path().join("none"), &mut Vec::new()));
        assert!(matches!(r, Err(Error::Trace { .. })));
        let mut out = Vec::new();
        write_verify(&trace(dir.path(), 3), &mut out).unwrap();
        assert!(String::from_utf8_lossy(&out).contains("OK: "), "{out:?}");
    }
}
