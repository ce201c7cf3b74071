//! `nyx trace info|dump|verify`: looking into a trace file.

use std::collections::BTreeMap;
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
/// unreadable frame (reported as the error).
fn events(r: &mut TraceReader, path: &Path, mut f: impl FnMut(u64, &Event)) -> Result<(), Error> {
    let mut pos = 0u64;
    for i in 0..r.frames().len() {
        if r.frames()[i].kind != FrameKind::Events {
            continue;
        }
        for e in r.read_records::<Event>(i).map_err(trace_err(path))? {
            if let Event::Exit(_) = e {
                pos += 1;
            }
            f(pos, &e);
        }
    }
    Ok(())
}

/// `nyx trace info FILE`.
pub fn info(path: &Path) -> Result<ExitCode, Error> {
    let mut r = open(path)?;
    let h = r.header().clone();
    let config = MachineConfig::from_bytes(&h.machine_config)
        .map_err(|e| Error::Config(format!("machine configuration: {e}")))?;
    let uuid: String = h.uuid.iter().map(|b| format!("{b:02x}")).collect();
    println!("trace        {}", path.display());
    println!("uuid         {uuid}");
    println!("nyx version  {}", h.nyx_version);
    println!("kind         {:?}", h.kind);
    println!(
        "machine      {} MiB, kernel {:?}, cmdline {:?}, initrd: {}",
        config.mem_mib,
        config.kernel_name,
        config.cmdline,
        if config.has_initrd { "yes" } else { "no" }
    );
    println!(
        "cpu          {} CPUID entries, virtual TSC {} kHz, date {}",
        config.cpuid.len(),
        config.tsc_khz,
        config.wall_seconds
    );
    println!("verify       {:?}", config.verify);
    for i in &h.images {
        let sha: String = i.sha256.iter().take(8).map(|b| format!("{b:02x}")).collect();
        println!(
            "image        {} ({} bytes, sha256 {sha}…)",
            i.name,
            i.data.as_ref().map_or(0, Vec::len)
        );
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
            end = Some(format!("{:?}", x.kind));
        }
    })?;
    let total: u64 = by_kind.values().sum();
    println!("events       {total} ({positions} guest-caused exits)");
    for (k, n) in &by_kind {
        println!("  {k:<12} {n}");
    }
    let t = &info.total;
    println!(
        "frames       {} ({} bytes compressed, {} bytes raw, ratio {:.1}); file {} bytes",
        t.frames,
        t.compressed_bytes,
        t.uncompressed_bytes,
        t.uncompressed_bytes as f64 / t.compressed_bytes.max(1) as f64,
        info.file_bytes
    );
    for (kind, k) in &info.by_kind {
        println!(
            "  {:<12} {} frames, {} bytes compressed, {} raw",
            format!("{kind:?}"),
            k.frames,
            k.compressed_bytes,
            k.uncompressed_bytes
        );
    }
    println!("guest time   {:.3} s (virtual)", last_time as f64 / 1e9);
    match (r.is_complete(), end) {
        (true, Some(e)) => println!("complete     yes, ended {e}"),
        (true, None) => println!("complete     yes (no end event)"),
        (false, _) => println!("complete     NO: the recording was cut off; it replays up to position {positions}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `nyx trace dump FILE [--from POS] [--kind K]`.
pub fn dump(path: &Path, from: u64, kind: Option<&str>) -> Result<ExitCode, Error> {
    let mut r = open(path)?;
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut broken = false;
    events(&mut r, path, |pos, e| {
        if broken || pos < from || kind.is_some_and(|k| k != e.kind_name()) {
            return;
        }
        if writeln!(out, "{pos:>10} {e}").is_err() {
            broken = true;
        }
    })?;
    let _ = out.flush();
    Ok(ExitCode::SUCCESS)
}

/// `nyx trace verify FILE`.
pub fn verify(path: &Path) -> Result<ExitCode, Error> {
    let mut r = open(path)?;
    let info = r.verify().map_err(trace_err(path))?;
    let mut n = 0u64;
    events(&mut r, path, |_, _| n += 1)?;
    if r.is_complete() {
        println!(
            "{}: OK: {} frames, {n} events, every checksum and the index verified",
            path.display(),
            info.total.frames
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "{}: INCOMPLETE: {} complete frames, {n} events readable; the recording was cut off (no index/footer)",
            path.display(),
            info.total.frames
        );
        Ok(ExitCode::from(4))
    }
}
