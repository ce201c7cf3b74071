//! The control socket (`nyx run --api PATH`, `nyx restore FILE --api PATH`)
//! and its client (`nyx ctl PATH COMMAND [ARG]`).
//!
//! A unix socket, mode 0600, one JSON request and one JSON reply per line:
//! `{"cmd":"pause"}`, `resume`, `snapshot` (with `"path"`), `status`,
//! `metrics`, `logs` (with `"n"`), `quit`. A listener thread takes requests, hands each to the
//! vCPU thread and kicks the vCPU; the vCPU thread answers at its next stop
//! (a machine is only ever touched by the thread that runs it).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, Sender};

use nyx_vmm::kick::Kicker;
use nyx_vmm::machine::Stop;
use nyx_vmm::{Machine, RunOutcome};
use serde::{Deserialize, Serialize};

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// pause, resume, snapshot, status, metrics, quit.
    pub cmd: String,
    /// The file for `snapshot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// How many entries `logs` returns (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<usize>,
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

type Job = (Request, Sender<Reply>);

/// The vCPU thread's end of the control socket.
pub struct Api {
    rx: Receiver<Job>,
    path: PathBuf,
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Opens the socket at `path` and starts its listener thread.
pub fn listen(path: &Path, kicker: Kicker) -> Result<Api, String> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot make {} private: {e}", path.display()))?;
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("nyx-api".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let tx = tx.clone();
                let kicker = kicker.clone();
                std::thread::spawn(move || serve(conn, tx, kicker));
            }
        })
        .map_err(|e| format!("cannot start the API thread: {e}"))?;
    Ok(Api {
        rx,
        path: path.to_path_buf(),
    })
}

fn serve(conn: UnixStream, tx: Sender<Job>, kicker: Kicker) {
    let Ok(mut out) = conn.try_clone() else { return };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Request>(&line) {
            Err(e) => Reply::err(format!("not a request: {e}")),
            Ok(req) => {
                let (rtx, rrx) = mpsc::channel();
                if tx.send((req, rtx)).is_err() {
                    Reply::err("the machine has ended")
                } else {
                    kicker.kick();
                    rrx.recv().unwrap_or_else(|_| Reply::err("the machine has ended"))
                }
            }
        };
        let text = serde_json::to_string(&reply).unwrap_or_else(|_| "{\"ok\":false}".into());
        if writeln!(out, "{text}").is_err() {
            return;
        }
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
                match m.save_snapshot(Path::new(p)) {
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
        other => (
            Reply::err(format!(
                "unknown command {other:?}: use pause, resume, snapshot, status, metrics, logs or quit"
            )),
            keep,
        ),
    }
}

/// Runs `m` to its end, serving the control socket at its stops. `None`:
/// the user quit through the socket.
pub fn run(m: &mut Machine, api: &Api) -> Result<Option<RunOutcome>, nyx_vmm::machine::Error> {
    let mut paused = false;
    loop {
        if !paused {
            match m.resume()? {
                Stop::Ended(o) => return Ok(Some(o)),
                Stop::Debug(_) | Stop::Interrupted => {}
            }
        }
        // Serve what is queued; while paused, wait for the next request.
        loop {
            let job = if paused {
                api.rx.recv().ok()
            } else {
                api.rx.try_recv().ok()
            };
            let Some((req, reply)) = job else {
                if paused {
                    // Nobody can resume it any more.
                    return Ok(None);
                }
                break;
            };
            let (r, after) = handle(m, &req, paused);
            let _ = reply.send(r);
            match after {
                After::Quit => return Ok(None),
                After::Pause => paused = true,
                After::Run => paused = false,
            }
            if !paused {
                break;
            }
        }
    }
}

/// `nyx ctl PATH COMMAND [ARG]`.
pub fn ctl(path: &Path, cmd: &str, arg: Option<&str>) -> Result<ExitCode, String> {
    let mut conn = UnixStream::connect(path).map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
    let req = Request {
        cmd: cmd.to_string(),
        path: arg.map(str::to_string),
        n: None,
    };
    let text = serde_json::to_string(&req).map_err(|e| e.to_string())?;
    writeln!(conn, "{text}").map_err(|e| format!("{}: {e}", path.display()))?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    println!("{}", line.trim_end());
    let reply: Reply = serde_json::from_str(&line).map_err(|e| format!("bad reply {line:?}: {e}"))?;
    Ok(if reply.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// One `metrics` request: the machine's metrics in detail.
pub fn fetch_metrics(path: &Path) -> Result<nyx_vmm::metrics::MetricsSnapshot, String> {
    let mut conn = UnixStream::connect(path).map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
    writeln!(conn, "{{\"cmd\":\"metrics\"}}").map_err(|e| format!("{}: {e}", path.display()))?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let reply: Reply = serde_json::from_str(&line).map_err(|e| format!("bad reply {line:?}: {e}"))?;
    let detail = reply
        .data
        .and_then(|mut d| d.get_mut("detail").map(serde_json::Value::take))
        .ok_or_else(|| reply.error.unwrap_or_else(|| "no metrics in the reply".into()))?;
    serde_json::from_value(detail).map_err(|e| format!("bad metrics: {e}"))
}
