//! Logging of the `nyx` command: per-component levels (`--log
//! device=debug,guest=info,*=warn`), and the outputs: stderr, a file
//! rotated by size (`--log-file`), syslog in RFC 5424 form (`--syslog`),
//! and an in-memory ring of the last entries (`--log-ring N`) whose tail is
//! printed after every crash report and served by the control socket
//! (`logs`).
//!
//! Components are tracing targets: a log site says `target: "nyx::device"`,
//! and each component also covers the crate that implements it, so the
//! module-path targets of untagged sites are filtered too.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The components of `--log` and the tracing targets each one covers.
pub const COMPONENTS: [(&str, &[&str]); 8] = [
    ("vmm", &["nyx::vmm", "nyx_vmm"]),
    ("device", &["nyx::device", "nyx_devices"]),
    ("guest", &["nyx::guest"]),
    ("record", &["nyx::record", "nyx_recorder"]),
    ("replay", &["nyx::replay", "nyx_replayer"]),
    ("gdb", &["nyx::gdb", "nyx_gdb"]),
    ("migration", &["nyx::migration"]),
    ("api", &["nyx::api"]),
];

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Errors of the logging setup.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A `--log` item is not `COMPONENT=LEVEL`.
    #[error("--log: {0:?} is not COMPONENT=LEVEL (components: {comps}, or * for the rest)", comps = component_names())]
    Item(String),
    /// An unknown component.
    #[error("--log: unknown component {0:?} (components: {comps}, or * for the rest)", comps = component_names())]
    Component(String),
    /// An unknown level.
    #[error("--log: unknown level {0:?} (levels: off, error, warn, info, debug, trace)")]
    Level(String),
    /// The log file cannot be opened.
    #[error("--log-file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The syslog socket cannot be reached.
    #[error("--syslog: cannot reach {path}: {source}")]
    Syslog {
        /// The socket.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

fn component_names() -> String {
    COMPONENTS.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ")
}

/// Turns a `--log` spec into an `EnvFilter` directive string: `*=LEVEL` sets
/// the default (otherwise `default`), each component its targets.
pub fn spec_to_directives(spec: &str, default: &str) -> Result<String, LogError> {
    let mut base = default.to_string();
    let mut parts = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (comp, level) = item.split_once('=').ok_or_else(|| LogError::Item(item.to_string()))?;
        let level = level.trim().to_ascii_lowercase();
        if !LEVELS.contains(&level.as_str()) {
            return Err(LogError::Level(level));
        }
        match comp.trim() {
            "*" => base = level,
            c => {
                let (_, targets) = COMPONENTS
                    .iter()
                    .find(|(name, _)| *name == c)
                    .ok_or_else(|| LogError::Component(c.to_string()))?;
                parts.extend(targets.iter().map(|t| format!("{t}={level}")));
            }
        }
    }
    let mut out = base;
    for p in parts {
        out.push(',');
        out.push_str(&p);
    }
    Ok(out)
}

/// An in-memory ring of the last formatted log entries.
#[derive(Debug, Clone)]
pub struct LogRing {
    inner: Arc<Mutex<VecDeque<String>>>,
    cap: usize,
}

impl LogRing {
    /// A ring that keeps the last `cap` entries.
    pub fn new(cap: usize) -> Self {
        LogRing {
            inner: Arc::new(Mutex::new(VecDeque::with_capacity(cap.min(1024)))),
            cap,
        }
    }

    /// Adds an entry, dropping the oldest when full.
    pub fn push(&self, line: String) {
        if self.cap == 0 {
            return;
        }
        let mut q = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= self.cap {
            q.pop_front();
        }
        q.push_back(line);
    }

    /// The last `n` entries, oldest first.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let q = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().skip(q.len().saturating_sub(n)).cloned().collect()
    }
}

/// Collects an event's message and fields as one line.
#[derive(Default)]
struct LineVisitor(String);

impl Visit for LineVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

fn message_of(event: &Event<'_>) -> String {
    let mut v = LineVisitor::default();
    event.record(&mut v);
    v.0
}

/// A layer that keeps the formatted events in a [`LogRing`].
pub struct RingLayer(pub LogRing);

impl<S: Subscriber> Layer<S> for RingLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        self.0.push(format!(
            "{} {:>5} {}: {}",
            rfc3339_ms(ms),
            meta.level(),
            meta.target(),
            message_of(event)
        ));
    }
}

/// A file that starts over when it reaches `max_bytes`: `PATH` becomes
/// `PATH.1`, `PATH.1` becomes `PATH.2`, ..., and `PATH.KEEP` is dropped.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: File,
    written: u64,
}

impl RotatingFile {
    /// Opens (appends to) `path`.
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> Result<Self, LogError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| LogError::File {
                path: path.display().to_string(),
                source,
            })?;
        let written = file.metadata().map_or(0, |m| m.len());
        Ok(RotatingFile {
            path: path.to_path_buf(),
            max_bytes: max_bytes.max(1),
            keep,
            file,
            written,
        })
    }

    fn old(&self, i: usize) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{i}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        if self.keep == 0 {
            self.file.set_len(0)?;
        } else {
            let _ = std::fs::remove_file(self.old(self.keep));
            for i in (1..self.keep).rev() {
                let _ = std::fs::rename(self.old(i), self.old(i + 1));
            }
            std::fs::rename(&self.path, self.old(1))?;
            self.file = OpenOptions::new().create(true).append(true).open(&self.path)?;
        }
        self.written = 0;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written > 0 && self.written + buf.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// A layer that sends each event to a syslog socket as an RFC 5424 message
/// (facility daemon, APP-NAME `nyx`).
pub struct SyslogLayer {
    sock: UnixDatagram,
    hostname: String,
}

impl SyslogLayer {
    /// Connects to the syslog socket at `path` (normally `/dev/log`).
    pub fn connect(path: &Path) -> Result<Self, LogError> {
        let err = |source| LogError::Syslog {
            path: path.display().to_string(),
            source,
        };
        let sock = UnixDatagram::unbound().map_err(err)?;
        sock.connect(path).map_err(err)?;
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
            .unwrap_or_else(|| "-".into());
        Ok(SyslogLayer { sock, hostname })
    }
}

/// The RFC 5424 severity of a tracing level.
pub fn syslog_severity(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// One RFC 5424 message: `<PRI>1 TIMESTAMP HOST nyx PID TARGET - MSG`.
pub fn rfc5424(level: &Level, unix_ms: u128, host: &str, pid: u32, target: &str, msg: &str) -> String {
    const DAEMON: u8 = 3;
    let msgid: String = target.chars().filter(|c| c.is_ascii_graphic()).take(32).collect();
    let msgid = if msgid.is_empty() { "-".to_string() } else { msgid };
    format!(
        "<{}>1 {} {host} nyx {pid} {msgid} - {msg}",
        DAEMON * 8 + syslog_severity(level),
        rfc3339_ms(unix_ms)
    )
}

impl<S: Subscriber> Layer<S> for SyslogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let line = rfc5424(
            meta.level(),
            ms,
            &self.hostname,
            std::process::id(),
            meta.target(),
            &message_of(event),
        );
        // A full or absent syslog must not stop the machine.
        let _ = self.sock.send(line.as_bytes());
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of a Unix time in milliseconds.
pub fn rfc3339_ms(unix_ms: u128) -> String {
    let secs = (unix_ms / 1000) as i64;
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        unix_ms % 1000
    )
}

/// Where logs go.
#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    /// `-v` count: the stderr level when neither `--log` nor `NYX_LOG` says.
    pub verbose: u8,
    /// `--log SPEC`.
    pub spec: Option<String>,
    /// `--log-file PATH`.
    pub file: Option<PathBuf>,
    /// `--log-file-max MIB`.
    pub file_max_mib: u64,
    /// `--log-file-keep N`.
    pub file_keep: usize,
    /// `--syslog`.
    pub syslog: bool,
    /// `--log-ring N`.
    pub ring: usize,
}

static RING: OnceLock<LogRing> = OnceLock::new();

/// The process's log ring (empty before [`init`]).
pub fn ring() -> LogRing {
    RING.get().cloned().unwrap_or_else(|| LogRing::new(0))
}

/// Entries printed after a crash report.
pub const CRASH_TAIL: usize = 50;

/// The ring's last entries as a crash-report section.
pub fn crash_tail() -> String {
    let tail = ring().tail(CRASH_TAIL);
    let mut s = format!("last {} log entries:\n", tail.len());
    for l in tail {
        let _ = writeln!(s, "  {l}");
    }
    s
}

/// Installs the global subscriber. Stderr follows `-v`/`NYX_LOG`/`--log`;
/// the file, syslog and the ring follow `--log` (default: info).
pub fn init(opts: &LogOptions) -> Result<(), LogError> {
    let level = match opts.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let stderr_filter = match &opts.spec {
        Some(spec) => EnvFilter::new(spec_to_directives(spec, level)?),
        None => EnvFilter::try_from_env("NYX_LOG").unwrap_or_else(|_| EnvFilter::new(level)),
    };
    let sink_directives = match &opts.spec {
        Some(spec) => spec_to_directives(spec, "info")?,
        None => "info".to_string(),
    };
    let ring = LogRing::new(opts.ring);
    let _ = RING.set(ring.clone());
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(|| crate::progress::Stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_filter(stderr_filter);
    let file = match &opts.file {
        Some(p) => {
            let f = RotatingFile::open(p, opts.file_max_mib.max(1) << 20, opts.file_keep)?;
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(Mutex::new(f))
                    .with_ansi(false)
                    .with_filter(EnvFilter::new(&sink_directives)),
            )
        }
        None => None,
    };
    let syslog = if opts.syslog {
        Some(SyslogLayer::connect(Path::new("/dev/log"))?.with_filter(EnvFilter::new(&sink_directives)))
    } else {
        None
    };
    let ring_layer = (opts.ring > 0).then(|| RingLayer(ring).with_filter(EnvFilter::new(&sink_directives)));
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .with(syslog)
        .with(ring_layer)
        .try_init();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn spec_maps_components_to_targets() {
        let d = spec_to_directives("device=debug,guest=info,migration=warn,*=info", "warn").unwrap();
        assert_eq!(
            d,
            "info,nyx::device=debug,nyx_devices=debug,nyx::guest=info,nyx::migration=warn"
        );
        assert_eq!(spec_to_directives("", "warn").unwrap(), "warn");
        assert!(EnvFilter::try_new(&d).is_ok());
    }

    #[test]
    fn bad_specs_are_refused_with_the_choices() {
        let e = spec_to_directives("disk=debug", "warn").unwrap_err().to_string();
        assert!(e.contains("disk") && e.contains("device"), "{e}");
        assert!(matches!(
            spec_to_directives("vmm=loud", "warn"),
            Err(LogError::Level(_))
        ));
        assert!(matches!(spec_to_directives("vmm", "warn"), Err(LogError::Item(_))));
    }

    #[test]
    fn ring_keeps_the_last_entries() {
        let r = LogRing::new(3);
        for i in 0..5 {
            r.push(format!("e{i}"));
        }
        assert_eq!(r.tail(10), vec!["e2", "e3", "e4"]);
        assert_eq!(r.tail(1), vec!["e4"]);
        assert!(LogRing::new(0).tail(5).is_empty());
    }

    #[test]
    fn ring_layer_filters_by_component() {
        let ring = LogRing::new(10);
        let filter = EnvFilter::new(spec_to_directives("device=debug,*=warn", "warn").unwrap());
        let sub = tracing_subscriber::registry().with(RingLayer(ring.clone()).with_filter(filter));
        tracing::subscriber::with_default(sub, || {
            tracing::debug!(target: "nyx::device", port = 0x3f8, "uart write");
            tracing::debug!(target: "nyx::vmm", "not shown");
            tracing::info!(target: "nyx::vmm", "not shown either");
            tracing::warn!(target: "nyx::vmm", "shown");
        });
        let t = ring.tail(10);
        assert_eq!(t.len(), 2, "{t:?}");
        assert!(t[0].contains("DEBUG nyx::device: uart write port=1016"), "{}", t[0]);
        assert!(t[1].contains("WARN nyx::vmm: shown"), "{}", t[1]);
    }

    #[test]
    fn rotating_file_rotates_by_size_and_keeps_n() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nyx.log");
        let mut f = RotatingFile::open(&p, 10, 2).unwrap();
        for i in 0..5 {
            f.write_all(format!("line{i}...\n").as_bytes()).unwrap();
        }
        f.flush().unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "line4...\n");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("nyx.log.1")).unwrap(),
            "line3...\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("nyx.log.2")).unwrap(),
            "line2...\n"
        );
        assert!(!dir.path().join("nyx.log.3").exists());
    }

    #[test]
    fn syslog_layer_sends_rfc5424() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log.sock");
        let server = UnixDatagram::bind(&p).unwrap();
        let layer = SyslogLayer::connect(&p).unwrap();
        let sub = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(sub, || {
            tracing::warn!(target: "nyx::api", "socket closed");
        });
        let mut buf = [0u8; 512];
        let n = server.recv(&mut buf).unwrap();
        let msg = std::str::from_utf8(&buf[..n]).unwrap();
        // daemon (3) * 8 + warning (4) = 28.
        assert!(msg.starts_with("<28>1 20"), "{msg}");
        let fields: Vec<&str> = msg.splitn(8, ' ').collect();
        assert_eq!(fields[3], "nyx");
        assert_eq!(fields[4], std::process::id().to_string());
        assert_eq!(fields[5], "nyx::api");
        assert_eq!(fields[6], "-");
        assert_eq!(fields[7], "socket closed");
    }

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_ms(1_700_000_000_000), "2023-11-14T22:13:20.000Z");
    }

    proptest! {
        #[test]
        fn any_spec_gives_an_error_or_a_valid_filter(spec in "[a-z*=,]{0,30}") {
            if let Ok(d) = spec_to_directives(&spec, "warn") {
                prop_assert!(EnvFilter::try_new(&d).is_ok(), "{}", d);
            }
        }

        #[test]
        fn ring_never_exceeds_its_capacity(cap in 0usize..20, n in 0usize..60) {
            let r = LogRing::new(cap);
            for i in 0..n {
                r.push(i.to_string());
            }
            let t = r.tail(usize::MAX);
            prop_assert_eq!(t.len(), n.min(cap));
            if let Some(last) = t.last() {
                prop_assert_eq!(last, &(n - 1).to_string());
            }
        }
    }
}
