//! The control socket (`nyx run --api PATH`, `nyx restore FILE --api PATH`)
//! and its client (`nyx ctl PATH COMMAND [ARG]`).
//!
//! A unix socket, mode 0600, one JSON request and one JSON reply per line:
//! `{"cmd":"pause"}`, `resume`, `snapshot` (with `"path"`, optional
//! `"mappable": true` for memory a restore maps), `status` (the
//! run state, position, virtual time, mode and the PCI functions as the
//! machine's description lists them), `metrics`, `logs` (with `"n"`), `migrate` (with `"addr"`, optional
//! `"max_iterations"` and `"threshold_pages"`), `power-button`,
//! `sleep-button`, `wake`, `set` (with `"path"` holding `lid=open|closed`,
//! `battery=PCT[,charging]` or `temperature=C`: platform events for a
//! machine with ACPI, recorded as inputs where the guest takes them), `quit`. A listener thread
//! takes requests, hands each to the vCPU thread and kicks the vCPU; the
//! vCPU thread answers at its next stop (a machine is only ever touched by
//! the thread that runs it). `migrate` is answered when the migration is
//! over: after the destination confirms that it runs the machine (this
//! process then ends with status 0), or with the reason it failed (the
//! guest then goes on here).
//!
//! The socket is bounded: at most [`MAX_CONNECTIONS`] clients at once (one
//! thread each; a further client gets an error reply and is closed) and
//! request lines of at most [`MAX_LINE`] bytes (a longer line gets an error
//! reply and its connection is closed), and a client that sends nothing for
//! [`IDLE_TIMEOUT`] is told so and closed, so that idle clients cannot hold
//! every place.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use indicatif::ProgressBar;
use nyx_devices::acpi_pm::PlatformEvent;
use nyx_vmm::kick::Kicker;
use nyx_vmm::machine::Stop;
use nyx_vmm::migration::{MigrateOptions, Outgoing};
use nyx_vmm::{Machine, RunOutcome};
use serde::{Deserialize, Serialize};

/// The most clients served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// The longest request line, newline included.
pub const MAX_LINE: usize = 64 << 10;
/// How long a client may wait between requests before it is closed.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// pause, resume, snapshot, status, metrics, logs, migrate, quit.
    pub cmd: String,
    /// The file for `snapshot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `snapshot`: store memory page-aligned and uncompressed, for a
    /// restore that maps it (`MemoryFormat::Mappable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mappable: Option<bool>,
    /// How many entries `logs` returns (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<usize>,
    /// The destination of `migrate`: `tcp:HOST:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// `migrate`: the most pre-copy passes over dirty pages after the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_iterations: Option<u32>,
    /// `migrate`: stop pre-copying once a pass has fewer dirty pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold_pages: Option<u64>,
    /// `migrate`: the file of the key shared with the destination
    /// (absolute, read by the machine's process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

/// The reply to a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request was carried out.
    pub ok: bool,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The answer's data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Request {
    /// The request `nyx ctl SOCK CMD [ARG]` sends: ARG is the file of
    /// `snapshot` and the address of `migrate`.
    pub fn new(cmd: &str, arg: Option<&str>) -> Self {
        let arg = arg.map(str::to_string);
        let migrate = cmd == "migrate";
        Request {
            cmd: cmd.to_string(),
            path: if migrate { None } else { arg.clone() },
            mappable: None,
            n: None,
            addr: if migrate { arg } else { None },
            max_iterations: None,
            threshold_pages: None,
            key: None,
        }
    }
}

impl Reply {
    fn ok(data: Option<serde_json::Value>) -> Self {
        Reply {
            ok: true,
            error: None,
            data,
        }
    }
    fn err(e: impl std::fmt::Display) -> Self {
        Reply {
            ok: false,
            error: Some(e.to_string()),
            data: None,
        }
    }
}

/// What reaches the vCPU thread.
enum Msg {
    /// A request, where its reply goes, and word that the reply has been
    /// written to the socket (before this process may end).
    Job(Request, Sender<Reply>, Receiver<()>),
    /// A migration's pre-copy is over: time for its stop-and-copy.
    MigrationReady,
}

/// The vCPU thread's end of the control socket.
pub struct Api {
    rx: Receiver<Msg>,
    tx: Sender<Msg>,
    kicker: Kicker,
    path: PathBuf,
}

/// Wakes the vCPU thread for a request.
type Wake = Arc<dyn Fn() + Send + Sync>;

impl Drop for Api {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Opens the socket at `path` and starts its listener thread.
pub fn listen(path: &Path, kicker: Kicker) -> Result<Api, String> {
    // The socket appears at `path` only once it is private: it is bound
    // under a temporary name beside it, made 0600, then renamed (atomic),
    // so no other user can connect in between.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    let private = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot make {} private: {e}", path.display()))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| format!("cannot listen on {}: {e}", path.display())));
    if let Err(e) = private {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let (tx, rx) = mpsc::channel::<Msg>();
    let k = kicker.clone();
    accept_loop(
        listener,
        tx.clone(),
        Arc::new(move || {
            k.kick();
        }),
        IDLE_TIMEOUT,
    )?;
    Ok(Api {
        rx,
        tx,
        kicker,
        path: path.to_path_buf(),
    })
}

/// Starts the thread that accepts clients, each served on a thread of its
/// own, at most [`MAX_CONNECTIONS`] at once.
fn accept_loop(listener: UnixListener, tx: Sender<Msg>, wake: Wake, idle: std::time::Duration) -> Result<(), String> {
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("nyx-api".into())
        .spawn(move || {
            for mut conn in listener.incoming().flatten() {
                if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    busy.fetch_sub(1, Ordering::SeqCst);
                    let r = Reply::err(format!(
                        "too many clients ({MAX_CONNECTIONS} are connected); try again when one has gone"
                    ));
                    let _ = writeln!(conn, "{}", serde_json::to_string(&r).unwrap_or_default());
                    continue;
                }
                let (tx, wake, b) = (tx.clone(), wake.clone(), busy.clone());
                let started = std::thread::Builder::new()
                    .name("nyx-api-client".into())
                    .spawn(move || {
                        serve(conn, tx, &*wake, idle);
                        b.fetch_sub(1, Ordering::SeqCst);
                    });
                if started.is_err() {
                    busy.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the API thread: {e}"))
}

/// Reads one line of at most `max` bytes (newline included) into `line`:
/// `Ok(false)` at the end of the stream, an `InvalidData` error for a
/// longer line.
fn read_bounded_line<R: BufRead>(r: &mut R, max: usize, line: &mut Vec<u8>) -> std::io::Result<bool> {
    line.clear();
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(!line.is_empty());
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("request line longer than {max} bytes"),
            ));
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            return Ok(true);
        }
    }
}

fn serve(conn: UnixStream, tx: Sender<Msg>, wake: &(dyn Fn() + Send + Sync), idle: std::time::Duration) {
    let Ok(mut out) = conn.try_clone() else { return };
    if conn.set_read_timeout(Some(idle)).is_err() {
        return;
    }
    let mut input = BufReader::new(conn);
    let mut raw = Vec::new();
    loop {
        match read_bounded_line(&mut input, MAX_LINE, &mut raw) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                let why = match e.kind() {
                    std::io::ErrorKind::InvalidData => Some(e.to_string()),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                        Some(format!("no request for {} s", idle.as_secs_f64()))
                    }
                    _ => None,
                };
                if let Some(why) = why {
                    let r = Reply::err(format!("{why}: closing the connection"));
                    let _ = writeln!(out, "{}", serde_json::to_string(&r).unwrap_or_default());
                }
                return;
            }
        }
        let line = String::from_utf8_lossy(&raw);
        if line.trim().is_empty() {
            continue;
        }
        let (wtx, wrx) = mpsc::channel();
        let reply = match serde_json::from_str::<Request>(&line) {
            Err(e) => Reply::err(format!("not a request: {e}")),
            Ok(req) => {
                let (rtx, rrx) = mpsc::channel();
                if tx.send(Msg::Job(req, rtx, wrx)).is_err() {
                    Reply::err("the machine has ended")
                } else {
                    wake();
                    rrx.recv().unwrap_or_else(|_| Reply::err("the machine has ended"))
                }
            }
        };
        let text = serde_json::to_string(&reply).unwrap_or_else(|_| "{\"ok\":false}".into());
        if writeln!(out, "{text}").is_err() {
            return;
        }
        let _ = wtx.send(());
    }
}

/// Sends `reply` and waits (briefly) until it is on the socket: for the
/// last reply before this process ends.
fn reply_last(reply: &Sender<Reply>, written: &Receiver<()>, r: Reply) {
    if reply.send(r).is_ok() {
        let _ = written.recv_timeout(std::time::Duration::from_secs(2));
    }
}

/// What the run loop does after a request.
enum After {
    Run,
    Pause,
    Quit,
}

fn handle(m: &mut Machine, req: &Request, paused: bool) -> (Reply, After) {
    let keep = if paused { After::Pause } else { After::Run };
    match req.cmd.as_str() {
        "pause" => (Reply::ok(None), After::Pause),
        "resume" => (Reply::ok(None), After::Run),
        "status" => {
            let data = serde_json::json!({
                "state": if paused { "paused" } else { "running" },
                "position": m.exit_seq(),
                "virtual_ns": m.clock().last(),
                "mode": m.mode_name(),
                "pci": serde_json::to_value(&m.config().pci).unwrap_or_default(),
            });
            (Reply::ok(Some(data)), keep)
        }
        "metrics" => {
            let s = m.stats();
            let data = serde_json::json!({
                "exits": s.exits(), "pio": s.pio, "mmio": s.mmio, "hlt": s.hlt,
                "irq_window": s.irq_window, "msr": s.msr, "kicks": s.kicks, "injected": s.injected,
                "wall_ns": s.wall_ns, "detail": m.metrics().snapshot_now(),
            });
            (Reply::ok(Some(data)), keep)
        }
        "snapshot" => match &req.path {
            None => (Reply::err("snapshot needs a path"), keep),
            Some(p) => {
                let t = std::time::Instant::now();
                let format = if req.mappable == Some(true) {
                    nyx_vmm::snapshot::MemoryFormat::Mappable
                } else {
                    nyx_vmm::snapshot::MemoryFormat::Compressed
                };
                match m.save_snapshot_as(Path::new(p), format) {
                    Ok(path) => {
                        let bytes = std::fs::metadata(&path).map_or(0, |md| md.len());
                        m.metrics().snapshot(t.elapsed().as_nanos() as u64, bytes);
                        let data = serde_json::json!({
                            "path": path.display().to_string(),
                            "ms": t.elapsed().as_secs_f64() * 1e3,
                        });
                        (Reply::ok(Some(data)), keep)
                    }
                    Err(e) => (Reply::err(e), keep),
                }
            }
        },
        "logs" => {
            let lines = crate::logging::ring().tail(req.n.unwrap_or(100));
            (Reply::ok(Some(serde_json::json!({ "entries": lines }))), keep)
        }
        "quit" => (Reply::ok(None), After::Quit),
        "power-button" | "sleep-button" | "wake" | "set" => {
            match platform_event(&req.cmd, req.path.as_deref()).and_then(|e| m.platform_event(&e)) {
                Ok(()) => (Reply::ok(None), keep),
                Err(e) => (Reply::err(e), keep),
            }
        }
        other => (
            Reply::err(format!(
                "unknown command {other:?}: use pause, resume, snapshot, status, metrics, logs, migrate, \
                 power-button, sleep-button, wake, set or quit"
            )),
            keep,
        ),
    }
}

/// The platform event of `power-button`, `sleep-button`, `wake` or
/// `set NAME=VALUE` (`lid=open|closed`, `battery=PCT[,charging]`,
/// `temperature=C`).
pub fn platform_event(cmd: &str, arg: Option<&str>) -> Result<PlatformEvent, String> {
    match cmd {
        "power-button" => return Ok(PlatformEvent::PowerButton),
        "sleep-button" => return Ok(PlatformEvent::SleepButton),
        "wake" => return Ok(PlatformEvent::Wake),
        _ => {}
    }
    let usage = "set needs NAME=VALUE: lid=open|closed, battery=PCT[,charging], temperature=C";
    let (name, value) = arg.and_then(|a| a.split_once('=')).ok_or(usage)?;
    match name {
        "lid" => match value {
            "open" => Ok(PlatformEvent::Lid(true)),
            "closed" => Ok(PlatformEvent::Lid(false)),
            _ => Err(format!("lid is open or closed, not {value:?}")),
        },
        "battery" => {
            let (pct, charging) = match value.split_once(',') {
                Some((p, "charging")) => (p, true),
                Some((_, other)) => return Err(format!("battery=PCT[,charging], not ...,{other}")),
                None => (value, false),
            };
            match pct.parse::<u8>() {
                Ok(percent) if percent <= 100 => Ok(PlatformEvent::Battery { percent, charging }),
                _ => Err(format!("battery charge is a percentage 0..=100, not {pct:?}")),
            }
        }
        "temperature" => value
            .parse::<i16>()
            .ok()
            .filter(|c| (-273..=1000).contains(c))
            .map(PlatformEvent::Temperature)
            .ok_or_else(|| format!("temperature is whole degrees Celsius, not {value:?}")),
        _ => Err(format!("unknown setting {name:?}: {usage}")),
    }
}

/// A migration under way and the request that asked for it.
struct Migrating {
    out: Outgoing,
    reply: Sender<Reply>,
    written: Receiver<()>,
    /// Its progress bar on stderr, when stderr is a terminal.
    bar: Option<ProgressBar>,
}

impl Migrating {
    /// Gives up on the migration (taking its bar off the terminal), telling
    /// its requester why; `last`: this process ends next.
    fn abort(self, m: &mut Machine, why: &str, last: bool) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        self.out.abort(m);
        if last {
            reply_last(&self.reply, &self.written, Reply::err(why));
        } else {
            let _ = self.reply.send(Reply::err(why));
        }
    }
}

/// Starts the migration `req` asks for; the reply waits for its end.
fn start_migration(m: &mut Machine, api: &Api, req: &Request) -> Result<(Outgoing, Option<ProgressBar>), String> {
    let addr = req.addr.as_deref().ok_or("migrate needs an address: tcp:HOST:PORT")?;
    let d = MigrateOptions::default();
    let opts = MigrateOptions {
        max_iterations: req.max_iterations.unwrap_or(d.max_iterations),
        threshold_pages: req.threshold_pages.unwrap_or(d.threshold_pages),
        ..d
    };
    let (tx, kicker) = (api.tx.clone(), api.kicker.clone());
    let ready = Box::new(move || {
        let _ = tx.send(Msg::MigrationReady);
        kicker.kick();
    });
    let key = match &req.key {
        Some(path) => Some(nyx_vmm::migration_auth::Key::from_file(path)?),
        None => None,
    };
    let (bar, progress) = crate::progress::migration_out(addr).unzip();
    match Outgoing::start(m, addr, opts, key, ready, progress) {
        Ok(out) => Ok((out, bar)),
        Err(e) => {
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            Err(e.to_string())
        }
    }
}

/// The stop-and-copy of `mig` (the vCPU is stopped). `true`: the machine
/// now runs at the destination and must not run here again.
fn finish_migration(m: &mut Machine, mig: Migrating) -> bool {
    let addr = mig.out.addr().to_string();
    let result = mig.out.finish(m);
    if let Some(b) = &mig.bar {
        b.finish_and_clear();
    }
    match result {
        Ok(stats) => {
            eprintln!(
                "nyx: migrated to {addr}: downtime {:.2} ms, total {:.1} ms, {} pre-copy passes{}, {} + {} pages, {:.2} MiB sent",
                stats.downtime_ms,
                stats.total_ms,
                stats.iterations,
                if stats.converged { "" } else { " (not converged)" },
                stats.precopy_pages,
                stats.final_pages,
                stats.bytes_sent as f64 / f64::from(1 << 20),
            );
            reply_last(&mig.reply, &mig.written, Reply::ok(serde_json::to_value(&stats).ok()));
            true
        }
        Err(e) => {
            eprintln!("nyx: migration to {addr} failed: {e}; the guest goes on here");
            let _ = mig.reply.send(Reply::err(format!("migration to {addr} failed: {e}")));
            false
        }
    }
}

/// Runs `m` to its end, serving the control socket at its stops. `None`:
/// the user quit through the socket, or the machine migrated away.
pub fn run(m: &mut Machine, api: &Api) -> Result<Option<RunOutcome>, nyx_vmm::machine::Error> {
    // While the socket listens, a power button may still come.
    m.set_platform_events_open(true);
    let r = serve_machine(m, api);
    m.set_platform_events_open(false);
    r
}

fn serve_machine(m: &mut Machine, api: &Api) -> Result<Option<RunOutcome>, nyx_vmm::machine::Error> {
    let mut paused = false;
    let mut migrating: Option<Migrating> = None;
    loop {
        if !paused {
            if let Stop::Ended(o) = m.resume()? {
                if let Some(mig) = migrating.take() {
                    mig.abort(m, "the guest ended during the migration", false);
                }
                return Ok(Some(o));
            }
        }
        // Serve what is queued; while paused, wait for the next request.
        loop {
            let msg = if paused {
                api.rx.recv().ok()
            } else {
                api.rx.try_recv().ok()
            };
            let Some(msg) = msg else {
                if paused {
                    // Nobody can resume it any more.
                    return Ok(None);
                }
                break;
            };
            match msg {
                Msg::MigrationReady => {
                    if let Some(mig) = migrating.take() {
                        if finish_migration(m, mig) {
                            return Ok(None);
                        }
                    }
                }
                Msg::Job(req, reply, written) if req.cmd == "migrate" => {
                    if migrating.is_some() {
                        let _ = reply.send(Reply::err("a migration is already under way"));
                    } else {
                        match start_migration(m, api, &req) {
                            Ok((out, bar)) => {
                                migrating = Some(Migrating {
                                    out,
                                    reply,
                                    written,
                                    bar,
                                })
                            }
                            Err(e) => {
                                let _ = reply.send(Reply::err(e));
                            }
                        }
                    }
                }
                Msg::Job(req, reply, written) => {
                    let (r, after) = handle(m, &req, paused);
                    match after {
                        After::Quit => {
                            if let Some(mig) = migrating.take() {
                                mig.abort(m, "nyx quit during the migration", true);
                            }
                            reply_last(&reply, &written, r);
                            return Ok(None);
                        }
                        After::Pause => {
                            let _ = reply.send(r);
                            paused = true;
                        }
                        After::Run => {
                            let _ = reply.send(r);
                            paused = false;
                        }
                    }
                }
            }
            if !paused {
                break;
            }
        }
    }
}

/// `nyx ctl PATH COMMAND [ARG]`.
pub fn ctl(path: &Path, req: &Request) -> Result<ExitCode, String> {
    let mut conn = UnixStream::connect(path).map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
    let text = serde_json::to_string(req).map_err(|e| e.to_string())?;
    writeln!(conn, "{text}").map_err(|e| format!("{}: {e}", path.display()))?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    println!("{}", line.trim_end());
    let reply: Reply = serde_json::from_str(&line).map_err(|e| format!("bad reply {line:?}: {e}"))?;
    Ok(if reply.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// One request `{"cmd":CMD}`: field `field` of its reply's data.
fn fetch_field(path: &Path, cmd: &str, field: &str) -> Result<serde_json::Value, String> {
    let mut conn = UnixStream::connect(path).map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
    let req = serde_json::to_string(&Request::new(cmd, None)).map_err(|e| e.to_string())?;
    writeln!(conn, "{req}").map_err(|e| format!("{}: {e}", path.display()))?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let reply: Reply = serde_json::from_str(&line).map_err(|e| format!("bad reply {line:?}: {e}"))?;
    reply
        .data
        .and_then(|mut d| d.get_mut(field).map(serde_json::Value::take))
        .ok_or_else(|| reply.error.unwrap_or_else(|| format!("no {field} in the {cmd} reply")))
}

/// One `metrics` request: the machine's metrics in detail.
pub fn fetch_metrics(path: &Path) -> Result<nyx_vmm::metrics::MetricsSnapshot, String> {
    let detail = fetch_field(path, "metrics", "detail")?;
    serde_json::from_value(detail).map_err(|e| format!("bad metrics: {e}"))
}

/// One `status` request: the machine's PCI functions.
pub fn fetch_pci(path: &Path) -> Result<Vec<nyx_vmm::config::PciFunctionConfig>, String> {
    let pci = fetch_field(path, "status", "pci")?;
    serde_json::from_value(pci).map_err(|e| format!("bad PCI function list: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_argument_is_a_path_or_an_address() {
        let s = Request::new("snapshot", Some("vm.nyxsnap"));
        assert_eq!((s.path.as_deref(), s.addr.as_deref()), (Some("vm.nyxsnap"), None));
        let m = Request::new("migrate", Some("tcp:127.0.0.1:4444"));
        assert_eq!(
            (m.path.as_deref(), m.addr.as_deref()),
            (None, Some("tcp:127.0.0.1:4444"))
        );
    }

    #[test]
    fn migrate_requests_read_as_documented() {
        let r: Request = serde_json::from_str(
            r#"{"cmd":"migrate","addr":"tcp:127.0.0.1:9","max_iterations":2,"threshold_pages":64}"#,
        )
        .unwrap();
        assert_eq!(r.addr.as_deref(), Some("tcp:127.0.0.1:9"));
        assert_eq!((r.max_iterations, r.threshold_pages), (Some(2), Some(64)));
        let plain: Request = serde_json::from_str(r#"{"cmd":"migrate","addr":"tcp:h:1"}"#).unwrap();
        assert_eq!((plain.max_iterations, plain.threshold_pages), (None, None));
        // Options left out are left out on the wire too.
        let text = serde_json::to_string(&Request::new("status", None)).unwrap();
        assert_eq!(text, r#"{"cmd":"status"}"#);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"migrate","max_iterations":-1}"#).is_err());
    }

    #[test]
    fn request_lines_are_bounded() {
        let mut line = Vec::new();
        let mut r = std::io::Cursor::new(b"ab\ncd".to_vec());
        assert!(read_bounded_line(&mut r, 8, &mut line).unwrap());
        assert_eq!(line, b"ab\n");
        assert!(read_bounded_line(&mut r, 8, &mut line).unwrap());
        assert_eq!(line, b"cd");
        assert!(!read_bounded_line(&mut r, 8, &mut line).unwrap());
        let mut long = std::io::BufReader::with_capacity(3, std::io::Cursor::new(vec![b'x'; 100]));
        let e = read_bounded_line(&mut long, 10, &mut line).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(line.len() <= 10);
    }

    /// A socket served as `listen` serves it, with a wake that does nothing.
    fn served(dir: &Path) -> (PathBuf, Receiver<Msg>) {
        let path = dir.join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (tx, rx) = mpsc::channel();
        accept_loop(listener, tx, Arc::new(|| {}), IDLE_TIMEOUT).unwrap();
        (path, rx)
    }

    #[test]
    fn an_idle_client_is_closed_and_its_place_freed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (tx, rx) = mpsc::channel();
        accept_loop(listener, tx, Arc::new(|| {}), std::time::Duration::from_millis(200)).unwrap();
        // Every place taken by clients that say nothing.
        let idle: Vec<UnixStream> = (0..MAX_CONNECTIONS)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        for c in &idle {
            c.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
            let r = reply_of(c);
            assert!(r.error.as_deref().unwrap_or("").contains("no request for"), "{r:?}");
        }
        // Their places are free again: a new client is served.
        let start = std::time::Instant::now();
        loop {
            let mut c = UnixStream::connect(&path).unwrap();
            if writeln!(c, r#"{{"cmd":"status"}}"#).is_ok() {
                if let Ok(Msg::Job(_, reply, _)) = rx.recv_timeout(std::time::Duration::from_millis(200)) {
                    reply.send(Reply::ok(None)).unwrap();
                    assert!(reply_of(&c).ok);
                    break;
                }
            }
            assert!(start.elapsed().as_secs() < 10, "no place was freed");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn reply_of(conn: &UnixStream) -> Reply {
        let mut line = String::new();
        BufReader::new(conn).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    #[test]
    fn a_line_too_long_is_refused_and_closes_its_connection() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _rx) = served(dir.path());
        let mut c = UnixStream::connect(&path).unwrap();
        // Written from a thread: the server stops reading at the limit.
        let mut w = c.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(&vec![b'x'; MAX_LINE * 4]);
        });
        let r = reply_of(&c);
        assert!(
            !r.ok && r.error.as_deref().unwrap_or("").contains("longer than"),
            "{r:?}"
        );
        let mut rest = Vec::new();
        c.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        // Closed after the reply (with unread bytes a close may be a reset).
        match std::io::Read::read_to_end(&mut c, &mut rest) {
            Ok(n) => assert_eq!(n, 0, "closed after the reply"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
        drop(c);
        writer.join().unwrap();
    }

    #[test]
    fn clients_beyond_the_limit_are_turned_away_until_one_goes() {
        let dir = tempfile::tempdir().unwrap();
        let (path, rx) = served(dir.path());
        let mut held: Vec<UnixStream> = (0..MAX_CONNECTIONS)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        // Every held client is being served: each request reaches the machine.
        for c in &mut held {
            writeln!(c, r#"{{"cmd":"status"}}"#).unwrap();
        }
        for _ in 0..MAX_CONNECTIONS {
            let Ok(Msg::Job(req, reply, _)) = rx.recv_timeout(std::time::Duration::from_secs(10)) else {
                panic!("a held client was not served")
            };
            assert_eq!(req.cmd, "status");
            reply.send(Reply::ok(None)).unwrap();
        }
        for c in &held {
            assert!(reply_of(c).ok);
        }
        let extra = UnixStream::connect(&path).unwrap();
        let r = reply_of(&extra);
        assert!(r.error.as_deref().unwrap_or("").contains("too many clients"), "{r:?}");
        drop(held.pop());
        // The freed place is taken once its thread has ended.
        let start = std::time::Instant::now();
        loop {
            let mut c = UnixStream::connect(&path).unwrap();
            // Until the place is free the server answers "too many clients"
            // and closes at once: the write may then find the pipe broken.
            if writeln!(c, r#"{{"cmd":"status"}}"#).is_err() {
                std::thread::sleep(std::time::Duration::from_millis(20));
                assert!(start.elapsed().as_secs() < 10, "the freed place was never taken");
                continue;
            }
            if let Ok(Msg::Job(_, reply, _)) = rx.recv_timeout(std::time::Duration::from_millis(200)) {
                reply.send(Reply::ok(None)).unwrap();
                assert!(reply_of(&c).ok);
                break;
            }
            assert!(start.elapsed().as_secs() < 10, "the freed place was never taken");
        }
    }
}
