//! End-to-end tests of the serial port's inputs and consoles: a FIFO given
//! to `--serial-in` is read as its bytes arrive (the guest answers before
//! the writer closes it); `--serial file:`, `unix:` (server and client),
//! `tcp:` (server) and `pty` consoles carry a person's typing to the echo
//! guest and its answer back; a remote tcp console needs
//! `--serial-allow-remote`; a recording through a console replays without
//! it.

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{guest, kvm_available, nyx, Captured};

/// The echo guest's exit status.
const ECHO_EXIT: i32 = 0x33;

/// How long a test waits for what it expects to read.
const WAIT: Duration = Duration::from_secs(60);

/// A running nyx with its stdout and stderr captured.
struct Proc {
    child: Child,
    out: Captured,
    err: Captured,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nyx starts");
        let out = Captured::spawn(child.stdout.take().unwrap(), WAIT);
        let err = Captured::spawn(child.stderr.take().unwrap(), WAIT);
        Proc { child, out, err }
    }

    /// The exit status, waiting at most a minute.
    fn wait(&mut self) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                panic!("nyx did not end: {}", self.err.text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `nyx run --kernel echo ARGS...`.
fn echo(args: &[&str]) -> Proc {
    let mut cmd = nyx();
    cmd.arg("run").arg("--kernel").arg(guest("echo")).args(args);
    Proc::spawn(cmd)
}

/// Types into a console connection: the prompt comes, "ab" is echoed
/// before the rest is typed, then "bye".
fn converse(mut conn: impl Write, seen: &Captured) {
    seen.wait_for("end with '.'\n", "console");
    conn.write_all(b"ab").unwrap();
    seen.wait_for("AB", "console");
    conn.write_all(b"c.").unwrap();
    seen.wait_for("ABC.\nbye\n", "console");
}

/// The address after `prefix` in nyx's stderr, once it is there.
fn announced(p: &Proc, prefix: &str) -> String {
    p.err.wait_for(prefix, "nyx's announcement");
    let text = p.err.text();
    let rest = text.split(prefix).nth(1).unwrap();
    rest.split_whitespace().next().unwrap().to_string()
}

#[test]
fn a_fifo_is_read_as_its_bytes_arrive() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("in");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut p = echo(&["--serial-in", fifo.to_str().unwrap()]);
    // Opening for writing waits until nyx opens it for reading.
    let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    p.out.wait_for("end with '.'\n", "stdout");
    w.write_all(b"ab").unwrap();
    w.flush().unwrap();
    // Answered while the FIFO is still open: nyx does not wait for its end.
    p.out.wait_for("AB", "stdout");
    w.write_all(b"c.").unwrap();
    drop(w);
    assert_eq!(p.wait(), Some(ECHO_EXIT), "{}", p.err.text());
    assert!(p.out.text().ends_with("ABC.\nbye\n"), "{}", p.out.text());
}

#[test]
fn a_file_console_takes_the_output() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in"), dir.path().join("out"));
    std::fs::write(&input, b"abc.").unwrap();
    let spec = format!("file:{}", output.display());
    let mut p = echo(&["--serial", &spec, "--serial-in", input.to_str().unwrap()]);
    assert_eq!(p.wait(), Some(ECHO_EXIT), "{}", p.err.text());
    let text = std::fs::read_to_string(&output).unwrap();
    assert!(
        text.starts_with("echo: type") && text.ends_with("ABC.\nbye\n"),
        "{text:?}"
    );
    assert_eq!(p.out.text(), "", "no guest output on stdout");
}

#[test]
fn a_unix_console_as_server_and_as_client() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("serial.sock");
    let spec = format!("unix:{},server", path.display());
    let mut p = echo(&["--serial", &spec]);
    announced(&p, "waiting for a connection on unix:");
    let conn = UnixStream::connect(&path).unwrap();
    converse(conn.try_clone().unwrap(), &Captured::spawn(conn, WAIT));
    assert_eq!(p.wait(), Some(ECHO_EXIT), "{}", p.err.text());

    let listen = dir.path().join("client.sock");
    let l = UnixListener::bind(&listen).unwrap();
    let spec = format!("unix:{}", listen.display());
    let mut p = echo(&["--serial", &spec]);
    let (conn, _) = l.accept().unwrap();
    converse(conn.try_clone().unwrap(), &Captured::spawn(conn, WAIT));
    assert_eq!(p.wait(), Some(ECHO_EXIT), "{}", p.err.text());
}

#[test]
fn a_tcp_console_is_loopback_unless_allowed() {
    if !kvm_available() {
        return;
    }
    let mut p = echo(&["--serial", "tcp:127.0.0.1:0,server"]);
    let addr = announced(&p, "waiting for a connection on tcp:");
    let conn = TcpStream::connect(&addr).unwrap();
    converse(conn.try_clone().unwrap(), &Captured::spawn(conn, WAIT));
    assert_eq!(p.wait(), Some(ECHO_EXIT), "{}", p.err.text());

    let mut p = echo(&["--serial", "tcp:0.0.0.0:0,server"]);
    assert_eq!(p.wait(), Some(1));
    let err = p.err.text();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--serial-allow-remote"), "{err}");
}

#[test]
fn a_pty_console_carries_typing_both_ways() {
    if !kvm_available() {
        return;
    }
    let mut p = echo(&["--serial", "pty"]);
    let name = announced(&p, "serial console on ");
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(Path::new(&name))
        .unwrap();
    converse(tty.try_clone().unwrap(), &Captured::spawn(tty, WAIT));
    assert_eq!(p.wait(), Some(ECHO_EXIT), "{}", p.err.text());
}

#[test]
fn a_recording_through_a_console_replays_without_it() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("echo.nyxtrace");
    let mut cmd = nyx();
    cmd.arg("record")
        .arg("--out")
        .arg(&trace)
        .arg("--kernel")
        .arg(guest("echo"))
        .args(["--serial", "tcp:127.0.0.1:0,server"]);
    let mut p = Proc::spawn(cmd);
    let addr = announced(&p, "waiting for a connection on tcp:");
    let conn = TcpStream::connect(&addr).unwrap();
    converse(conn.try_clone().unwrap(), &Captured::spawn(conn, WAIT));
    assert_eq!(p.wait(), Some(ECHO_EXIT), "{}", p.err.text());
    let out = nyx().arg("replay").arg(&trace).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(ECHO_EXIT),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("ABC.\nbye\n"), "{text:?}");
}

#[test]
fn bad_consoles_are_refused_with_the_forms() {
    let out = nyx()
        .args(["run", "--kernel"])
        .arg(guest("echo"))
        .args(["--serial", "telnet:x"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("stdio, file:PATH, unix:PATH[,server], tcp:HOST:PORT[,server] or pty"),
        "{err}"
    );
}
