//! End-to-end tests of live migration between two `nyx` processes on
//! loopback: the guest's serial output continues at the destination with
//! nothing lost or duplicated; a destination that goes away, refuses or
//! never answers leaves the source running its guest; cut, damaged and
//! wrong-version streams are refused by the destination with one line and
//! status 1; with a migration key a wrong key and a byte changed on the
//! way are refused the same way while the source runs on, and the right
//! key carries the machine; with stderr on a terminal both ends draw
//! progress bars; a destination that finds a disk's image missing or
//! resized at the source's path refuses the machine naming the disk while
//! the source runs on; the console echo guest's virtio-console input and
//! output follow it to the destination's `--virtio-console`. An
//! ignored test measures downtime and total time for the BENCHMARKS table.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{guest, kvm_available, nyx, Captured};

/// How long a test waits for what it expects to read.
const WAIT: Duration = Duration::from_secs(30);

/// A running `nyx` with its stdin, stdout and stderr.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Captured,
    err: Captured,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nyx starts");
        let out = Captured::spawn(child.stdout.take().unwrap(), WAIT);
        let err = Captured::spawn(child.stderr.take().unwrap(), WAIT);
        Proc {
            stdin: child.stdin.take(),
            child,
            out,
            err,
        }
    }

    /// As [`Proc::spawn`], with stderr on a new pseudo-terminal (and `CI`
    /// unset), so that nyx draws its progress bars; `err` is what the
    /// terminal shows.
    fn spawn_on_terminal(mut cmd: Command) -> Proc {
        let (mut master, mut slave) = (-1, -1);
        let size = libc::winsize {
            ws_row: 24,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty stores two new descriptors in `master` and
        // `slave`; the name and termios arguments may be null.
        let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        for fd in [master, slave] {
            // SAFETY: a descriptor just opened; other children must not
            // inherit it (the master would never see the terminal close).
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        // SAFETY: both descriptors are new and owned here only.
        let (master, slave) = unsafe { (std::fs::File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let mut child = cmd
            .env_remove("CI")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(slave))
            .spawn()
            .expect("nyx starts");
        // `cmd` still holds the slave until dropped: the master reads until
        // the child's last descriptor of it closes.
        drop(cmd);
        let out = Captured::spawn(child.stdout.take().unwrap(), WAIT);
        Proc {
            stdin: child.stdin.take(),
            child,
            out,
            err: Captured::spawn(master, WAIT),
        }
    }

    fn input(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the exit status (killing the process after 30 s).
    fn wait(&mut self) -> Option<i32> {
        self.stdin = None;
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(50));
                return s.code();
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                panic!("nyx did not end; stderr: {}", self.err.text());
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

/// `nyx run --incoming tcp:127.0.0.1:0 EXTRA...` and the port it listens on.
fn destination_with(extra: &[&std::ffi::OsStr]) -> (Proc, u16) {
    destination_spawned(extra, Proc::spawn)
}

fn destination_spawned(extra: &[&std::ffi::OsStr], spawn: fn(Command) -> Proc) -> (Proc, u16) {
    let mut cmd = nyx();
    cmd.args(["run", "--incoming", "tcp:127.0.0.1:0", "--serial-in", "-"])
        .args(extra);
    let p = spawn(cmd);
    p.err
        .wait_for("waiting for a migration on tcp:127.0.0.1:", "destination");
    let text = p.err.text();
    let port = text
        .split("tcp:127.0.0.1:")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("a port");
    (p, port)
}

fn destination() -> (Proc, u16) {
    destination_with(&[])
}

/// The echo guest with the control socket at `sock`, stdin as serial input.
fn echo_source(sock: &Path, mem: &str) -> Proc {
    echo_source_spawned(sock, mem, &[], Proc::spawn)
}

fn echo_source_spawned(sock: &Path, mem: &str, extra: &[&std::ffi::OsStr], spawn: fn(Command) -> Proc) -> Proc {
    let mut cmd = nyx();
    cmd.arg("run")
        .arg("--kernel")
        .arg(guest("echo"))
        .args(["--serial-in", "-", "--mem", mem, "--api"])
        .arg(sock)
        .args(extra);
    let p = spawn(cmd);
    p.out.wait_for("end with '.'\n", "source");
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no control socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    p
}

/// `nyx ctl SOCK ARGS...`: status and the reply line.
fn ctl(sock: &Path, args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let out = nyx().arg("ctl").arg(sock).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let reply = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("reply {text:?}: {e}"));
    (out.status.code(), reply)
}

const FIRST: &[u8] = b"hello, nyx!\n";
const SECOND: &[u8] = b"serial input works.\nthis line is never read\n";

#[test]
fn echo_output_continues_at_the_destination_with_nothing_lost_or_duplicated() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let dst_sock = dir.path().join("dst.sock");
    let (mut dst, port) = destination_with(&["--api".as_ref(), dst_sock.as_os_str()]);
    let mut src = echo_source(&sock, "64");
    src.input(FIRST);
    src.out.wait_for("HELLO, NYX!\n", "source");

    let addr = format!("tcp:127.0.0.1:{port}");
    let (code, reply) = ctl(
        &sock,
        &["migrate", &addr, "--max-iterations", "3", "--threshold-pages", "1"],
    );
    assert_eq!(code, Some(0), "{reply}");
    assert_eq!(reply["ok"], true, "{reply}");
    let data = &reply["data"];
    let (downtime, total) = (
        data["downtime_ms"].as_f64().unwrap(),
        data["total_ms"].as_f64().unwrap(),
    );
    assert!(downtime > 0.0 && downtime <= total, "{reply}");
    assert!(data["precopy_pages"].as_u64().unwrap() > 0, "{reply}");
    assert!(data["iterations"].as_u64().unwrap() >= 1, "{reply}");

    assert_eq!(src.wait(), Some(0), "source stderr: {}", src.err.text());
    assert!(src.err.text().contains("migrated to"), "{}", src.err.text());
    assert!(!src.err.text().contains("pass 1"), "a bar without a terminal");
    dst.err.wait_for("running", "destination");
    let (code, status) = ctl(&dst_sock, &["status"]);
    assert_eq!(
        (code, &status["data"]["state"]),
        (Some(0), &"running".into()),
        "{status}"
    );
    dst.input(SECOND);
    let status = dst.wait();
    let expected = nyx_guests::expected("echo").unwrap();
    assert_eq!(
        status,
        expected.exit_value.map(|v| v as i32),
        "destination stderr: {}",
        dst.err.text()
    );
    let both = src.out.text() + &dst.out.text();
    assert_eq!(both, expected.golden.unwrap(), "source + destination output");
    assert!(src.out.text().ends_with("HELLO, NYX!\n"));
    assert!(dst.out.text().starts_with("SERIAL INPUT WORKS.\n"));
}

/// A 4-vCPU `smp` machine migrates while its APs count (right after the
/// BSP announced their start): the destination runs all four vCPUs on
/// and the locked total comes out exact; source and destination output
/// together are QEMU's but for the lock-free total.
#[test]
fn a_four_vcpu_machine_migrates_mid_run_and_finishes_with_the_locked_total() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let (mut dst, port) = destination();
    let mut cmd = nyx();
    cmd.arg("run")
        .arg("--kernel")
        .arg(guest("smp"))
        .args(["--cpus", "4", "--api"])
        .arg(&sock);
    let mut src = Proc::spawn(cmd);
    src.out.wait_for("smp: starting 3 aps\n", "source");
    let (code, reply) = ctl(&sock, &["migrate", &format!("tcp:127.0.0.1:{port}")]);
    assert_eq!(code, Some(0), "{reply}");
    assert_eq!(src.wait(), Some(0), "source stderr: {}", src.err.text());
    let status = dst.wait();
    let expected = nyx_guests::expected("smp").unwrap();
    assert_eq!(
        status,
        expected.exit_value.map(|v| v as i32),
        "destination stderr: {}",
        dst.err.text()
    );
    let before = src.out.text();
    assert!(
        before.ends_with("smp: starting 3 aps\n"),
        "the source went on: {before}"
    );
    let both = before + &dst.out.text();
    assert_eq!(
        nyx_guests::mask_smp_racy(&both),
        nyx_guests::mask_smp_racy(expected.golden.unwrap()),
        "source + destination output"
    );
}

/// With stderr on a terminal, the source draws the pages of each pass and
/// the destination the bytes and pages received; neither bar gets in the
/// way of the guest's output or of the closing lines.
#[test]
fn both_ends_draw_progress_bars_on_a_terminal() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let (mut dst, port) = destination_spawned(&[], Proc::spawn_on_terminal);
    let mut src = echo_source_spawned(&sock, "16", &[], Proc::spawn_on_terminal);
    src.input(FIRST);
    src.out.wait_for("HELLO, NYX!\n", "source");
    let addr = format!("tcp:127.0.0.1:{port}");
    let (code, reply) = ctl(&sock, &["migrate", &addr]);
    assert_eq!((code, &reply["ok"]), (Some(0), &true.into()), "{reply}");
    assert_eq!(src.wait(), Some(0), "{}", src.err.text());
    let shown = src.err.text();
    assert!(
        shown.contains(&format!("migrating to {addr}: pass 1, pages")),
        "{shown:?}"
    );
    // 16 MiB: the first pass looks at 4096 pages.
    assert!(shown.contains("/4096"), "{shown:?}");
    assert!(shown.contains("stop-and-copy"), "{shown:?}");
    assert!(shown.contains("nyx: migrated to"), "{shown:?}");
    dst.err.wait_for("running", "destination");
    let shown = dst.err.text();
    assert!(shown.contains("receiving a migration: "), "{shown:?}");
    assert!(shown.contains(" pages, "), "{shown:?}");
    dst.input(SECOND);
    let expected = nyx_guests::expected("echo").unwrap();
    assert_eq!(dst.wait().map(|s| s as u32), expected.exit_value, "{}", dst.err.text());
    assert_eq!(src.out.text() + &dst.out.text(), expected.golden.unwrap());
}

/// Reads one whole migration stream from `conn` (up to its end marker)
/// and returns its bytes.
fn read_stream(conn: &TcpStream) -> Vec<u8> {
    struct Tee<'a>(&'a TcpStream, Vec<u8>);
    impl Read for Tee<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = (&*self.0).read(buf)?;
            self.1.extend_from_slice(&buf[..n]);
            Ok(n)
        }
    }
    let mut tee = Tee(conn, Vec::new());
    let mut r = nyx_trace::StreamReader::new(&mut tee).expect("a stream header");
    while r.next_frame().expect("a valid frame").is_some() {}
    assert_eq!(r.completeness(), Some(nyx_trace::Completeness::Complete));
    tee.1
}

/// A fake destination on a free port: `serve` gets each connection.
fn fake_destination(
    serve: impl FnOnce(TcpStream) -> Vec<u8> + Send + 'static,
) -> (u16, std::thread::JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (conn, _) = l.accept().unwrap();
        serve(conn)
    });
    (port, t)
}

/// The source answers `migrate` with ok:false and a reason containing
/// `why`, then keeps running: the echo guest still echoes and exits.
fn assert_failed_and_still_running(sock: &Path, port: u16, why: &str) {
    let (code, reply) = ctl(sock, &["migrate", &format!("tcp:127.0.0.1:{port}")]);
    assert_eq!(code, Some(1), "{reply}");
    assert_eq!(reply["ok"], false, "{reply}");
    let e = reply["error"].as_str().unwrap();
    assert!(e.contains(why), "want {why:?} in {e:?}");
    let (_, status) = ctl(sock, &["status"]);
    assert_eq!(status["data"]["state"], "running", "{status}");
}

#[test]
fn the_source_keeps_running_when_the_destination_fails_and_can_migrate_later() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut src = echo_source(&sock, "16");
    src.input(FIRST);
    src.out.wait_for("HELLO, NYX!\n", "source");

    // Nobody listens.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    assert_failed_and_still_running(&sock, port, "cannot connect");
    // Closes early, after a few bytes.
    let (port, t) = fake_destination(|mut c| {
        let mut b = [0u8; 100];
        let _ = c.read_exact(&mut b);
        Vec::new()
    });
    assert_failed_and_still_running(&sock, port, "migration to");
    t.join().unwrap();
    // Reads everything, then closes without an answer.
    let (port, t) = fake_destination(|c| read_stream(&c));
    assert_failed_and_still_running(&sock, port, "closed the connection");
    assert!(!t.join().unwrap().is_empty());
    // Reads everything and refuses.
    let (port, t) = fake_destination(|mut c| {
        let s = read_stream(&c);
        c.write_all(b"error: no room here\n").unwrap();
        s
    });
    assert_failed_and_still_running(&sock, port, "refused the machine: no room here");
    t.join().unwrap();

    assert!(src.err.text().contains("the guest goes on here"), "{}", src.err.text());

    // After all that, a real destination takes the machine.
    let (mut dst, port) = destination();
    let (code, reply) = ctl(&sock, &["migrate", &format!("tcp:127.0.0.1:{port}")]);
    assert_eq!((code, &reply["ok"]), (Some(0), &true.into()), "{reply}");
    assert_eq!(src.wait(), Some(0), "{}", src.err.text());
    dst.err.wait_for("running", "destination");
    dst.input(SECOND);
    let expected = nyx_guests::expected("echo").unwrap();
    assert_eq!(dst.wait().map(|s| s as u32), expected.exit_value, "{}", dst.err.text());
    assert_eq!(src.out.text() + &dst.out.text(), expected.golden.unwrap());
}

/// A machine with a disk: the destination opens the image at the source's
/// path (shared storage). Where it finds no image there, or one of another
/// size, it refuses the machine naming the disk, exits 1 with one line, and
/// the source runs on; with the image back in place the machine moves,
/// its virtio-console going where the destination's --virtio-console says.
#[test]
fn a_destination_that_cannot_open_the_disk_refuses_and_the_source_runs_on() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("shared.img");
    std::fs::write(&img, vec![0x5a; 64 << 10]).unwrap();
    let sock = dir.path().join("api.sock");
    let (src_con, dst_con) = (dir.path().join("src.console"), dir.path().join("dst.console"));
    let mut src = echo_source_spawned(
        &sock,
        "16",
        &[
            "--disk".as_ref(),
            img.as_os_str(),
            "--virtio-console".as_ref(),
            format!("file:{}", src_con.display()).as_ref(),
        ],
        Proc::spawn,
    );
    src.input(FIRST);
    src.out.wait_for("HELLO, NYX!\n", "source");
    let migrate = |port: u16| ctl(&sock, &["migrate", &format!("tcp:127.0.0.1:{port}")]);

    let away = dir.path().join("away.img");
    std::fs::rename(&img, &away).unwrap();
    for (what, needle) in [("missing", "No such file"), ("resized", "has 4096 bytes")] {
        if what == "resized" {
            std::fs::write(&img, vec![0u8; 4096]).unwrap();
        }
        let (mut dst, port) = destination();
        let (code, reply) = migrate(port);
        assert_eq!((code, &reply["ok"]), (Some(1), &false.into()), "{what}: {reply}");
        let e = reply["error"].as_str().unwrap();
        assert!(
            e.contains("refused the machine: disk disk0") && e.contains(needle),
            "{what}: {e}"
        );
        assert!(e.contains(&img.display().to_string()), "{what}: {e}");
        assert_refused_with_one_line(&mut dst, "disk disk0");
        let (_, status) = ctl(&sock, &["status"]);
        assert_eq!(status["data"]["state"], "running", "{what}: {status}");
    }
    std::fs::rename(&away, &img).unwrap();

    let console = format!("file:{}", dst_con.display());
    let (mut dst, port) = destination_with(&["--virtio-console".as_ref(), console.as_ref()]);
    let (code, reply) = migrate(port);
    assert_eq!((code, &reply["ok"]), (Some(0), &true.into()), "{reply}");
    assert_eq!(src.wait(), Some(0), "{}", src.err.text());
    dst.err.wait_for("running", "destination");
    dst.input(SECOND);
    let expected = nyx_guests::expected("echo").unwrap();
    assert_eq!(dst.wait().map(|s| s as u32), expected.exit_value, "{}", dst.err.text());
    assert_eq!(src.out.text() + &dst.out.text(), expected.golden.unwrap());
    assert!(dst_con.exists(), "the destination opened its --virtio-console");
    assert!(!dst.err.text().contains("warning"), "{}", dst.err.text());
    assert_eq!(std::fs::read(&img).unwrap(), vec![0x5a; 64 << 10]);
}

/// Connects to the Unix socket a server console listens on at `path`
/// (waiting for it to appear) and collects what comes back.
fn console_client(path: &Path) -> (std::os::unix::net::UnixStream, Captured) {
    let start = Instant::now();
    loop {
        if let Ok(c) = std::os::unix::net::UnixStream::connect(path) {
            let out = Captured::spawn(c.try_clone().unwrap(), WAIT);
            return (c, out);
        }
        assert!(start.elapsed() < WAIT, "no console at {}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The console echo guest migrated between two lines of its virtio-console
/// input: each end has its own `--virtio-console unix:PATH,server`, the
/// first line goes to the source's, the rest to the destination's; the
/// serial output and the console output, source then destination, are
/// QEMU's.
#[test]
fn console_input_and_output_follow_a_migrated_machine() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (sock, src_con, dst_con) = (
        dir.path().join("api.sock"),
        dir.path().join("src.con"),
        dir.path().join("dst.con"),
    );
    let mut cmd = nyx();
    cmd.arg("run")
        .arg("--kernel")
        .arg(guest("conecho"))
        .args(["--cmdline", "nyx-test arg=1", "--virtio-console"])
        .arg(format!("unix:{},server", src_con.display()))
        .arg("--api")
        .arg(&sock);
    let mut src = Proc::spawn(cmd);
    let (mut src_in, src_echo) = console_client(&src_con);
    let input = nyx_guests::CONECHO_INPUT;
    let first = input.iter().position(|&b| b == b'\n').unwrap() + 1;
    src_in.write_all(&input[..first]).unwrap();
    src.out.wait_for("line 1, 16 bytes", "source");
    src_echo.wait_for("HELLO, CONSOLE!\n", "source console");

    let mut cmd = nyx();
    cmd.args(["run", "--incoming", "tcp:127.0.0.1:0", "--virtio-console"])
        .arg(format!("unix:{},server", dst_con.display()));
    let mut dst = Proc::spawn(cmd);
    // The destination waits for its console's client before it listens.
    let (mut dst_in, dst_echo) = console_client(&dst_con);
    dst.err
        .wait_for("waiting for a migration on tcp:127.0.0.1:", "destination");
    let port: u16 = dst
        .err
        .text()
        .split("tcp:127.0.0.1:")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("a port");
    let (code, reply) = ctl(&sock, &["migrate", &format!("tcp:127.0.0.1:{port}")]);
    assert_eq!((code, &reply["ok"]), (Some(0), &true.into()), "{reply}");
    assert_eq!(src.wait(), Some(0), "{}", src.err.text());
    dst.err.wait_for("running", "destination");
    dst_in.write_all(&input[first..]).unwrap();
    assert_eq!(dst.wait(), Some(nyx_guests::CONECHO_EXIT as i32), "{}", dst.err.text());
    let expected = nyx_guests::expected("conecho").unwrap();
    assert_eq!(src.out.text() + &dst.out.text(), expected.golden.unwrap());
    dst_echo.wait_for("STOP HERE.", "destination console");
    assert_eq!(src_echo.text(), "HELLO, CONSOLE!\n");
    assert_eq!(src_echo.text() + &dst_echo.text(), nyx_guests::CONECHO_CONSOLE_OUTPUT);
}

#[test]
fn only_a_plain_run_migrates() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut cmd = nyx();
    cmd.arg("record")
        .arg("--out")
        .arg(dir.path().join("echo.nyxtrace"))
        .arg("--kernel")
        .arg(guest("echo"))
        .args(["--serial-in", "-", "--api"])
        .arg(&sock);
    let mut rec = Proc::spawn(cmd);
    rec.out.wait_for("end with '.'\n", "recorder");
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no control socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    assert_failed_and_still_running(&sock, port, "only a plain run can migrate");
    rec.input(b"abc.");
    assert_eq!(
        rec.wait().map(|s| s as u32),
        nyx_guests::expected("echo").unwrap().exit_value
    );
    assert!(rec.out.text().ends_with("ABC.\nbye\n"), "{}", rec.out.text());
}

/// The destination exits 1 with one line (besides "waiting") that says
/// `needle`.
fn assert_refused_with_one_line(dst: &mut Proc, needle: &str) {
    let code = dst.wait();
    let err = dst.err.text();
    assert_eq!(code, Some(1), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.contains("waiting for a migration")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("nyx: migration rejected: "), "{err}");
    assert!(lines[0].contains(needle), "want {needle:?} in {err}");
}

/// Forwards connections on a free port to `to`, changing the byte at
/// `flip` of what the source sends; the destination's answers pass as
/// they are.
fn man_in_the_middle(to: u16, flip: usize) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut src, _) = l.accept().unwrap();
        let mut dst = TcpStream::connect(("127.0.0.1", to)).unwrap();
        let (mut src_r, mut dst_w) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut seen = 0usize;
            let mut buf = [0u8; 4096];
            while let Ok(n) = src_r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if (seen..seen + n).contains(&flip) {
                    buf[flip - seen] ^= 0x01;
                }
                seen += n;
                if dst_w.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = dst_w.shutdown(std::net::Shutdown::Write);
        });
        let _ = std::io::copy(&mut dst, &mut src);
        let _ = src.shutdown(std::net::Shutdown::Both);
    });
    port
}

#[test]
fn a_keyed_migration_refuses_a_wrong_key_and_a_changed_byte_and_takes_the_right_key() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (key, other) = (dir.path().join("key"), dir.path().join("other"));
    std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::write(&other, "fedcba9876543210fedcba9876543210\n").unwrap();
    let sock = dir.path().join("api.sock");
    let mut src = echo_source(&sock, "16");
    src.input(FIRST);
    src.out.wait_for("HELLO, NYX!\n", "source");
    let with_key = |k: &Path| destination_with(&["--migration-key".as_ref(), k.as_os_str()]);
    let migrate = |port: u16, k: &Path| {
        let addr = format!("tcp:127.0.0.1:{port}");
        ctl(&sock, &["migrate", &addr, "--migration-key", k.to_str().unwrap()])
    };
    let still_running = || {
        let (_, status) = ctl(&sock, &["status"]);
        assert_eq!(status["data"]["state"], "running", "{status}");
    };

    // The wrong key.
    let (mut dst, port) = with_key(&key);
    let (code, reply) = migrate(port, &other);
    assert_eq!((code, &reply["ok"]), (Some(1), &false.into()), "{reply}");
    assert_refused_with_one_line(&mut dst, "authentication failed");
    still_running();

    // The right key, one byte changed on the way (inside the first record).
    let (mut dst, port) = with_key(&key);
    let (code, reply) = migrate(man_in_the_middle(port, 3000), &key);
    assert_eq!((code, &reply["ok"]), (Some(1), &false.into()), "{reply}");
    assert_refused_with_one_line(&mut dst, "authentication failed");
    still_running();

    // A source without a key is refused by a destination that wants one.
    let (mut dst, port) = with_key(&key);
    let (code, reply) = ctl(&sock, &["migrate", &format!("tcp:127.0.0.1:{port}")]);
    assert_eq!((code, &reply["ok"]), (Some(1), &false.into()), "{reply}");
    assert_refused_with_one_line(&mut dst, "authentication failed");
    still_running();

    // The right key, untouched: the machine moves.
    let (mut dst, port) = with_key(&key);
    let (code, reply) = migrate(port, &key);
    assert_eq!((code, &reply["ok"]), (Some(0), &true.into()), "{reply}");
    assert_eq!(src.wait(), Some(0), "{}", src.err.text());
    dst.err.wait_for("running", "destination");
    dst.input(SECOND);
    let expected = nyx_guests::expected("echo").unwrap();
    assert_eq!(dst.wait().map(|s| s as u32), expected.exit_value, "{}", dst.err.text());
    assert_eq!(src.out.text() + &dst.out.text(), expected.golden.unwrap());
}

#[test]
fn a_destination_listens_on_loopback_unless_allowed() {
    let out = nyx().args(["run", "--incoming", "tcp:0.0.0.0:0"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--incoming-allow-remote"), "{err}");
}

/// Sends `bytes` to a fresh destination; its status and stderr.
fn feed_destination(bytes: &[u8]) -> (Option<i32>, String) {
    let (mut dst, port) = destination();
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let _ = c.write_all(bytes);
    let _ = c.shutdown(std::net::Shutdown::Write);
    let mut answer = String::new();
    let mut r = BufReader::new(&c);
    // The destination's first line says whether it takes a key.
    let _ = r.read_line(&mut answer);
    assert_eq!(answer, "nyx-migration none\n");
    answer.clear();
    let _ = r.read_line(&mut answer);
    let code = dst.wait();
    assert!(answer.is_empty() || answer.starts_with("error: "), "{answer:?}");
    (code, dst.err.text())
}

#[test]
fn cut_damaged_and_wrong_version_streams_are_refused_with_one_line() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut src = echo_source(&sock, "16");
    let (port, t) = fake_destination(|c| read_stream(&c));
    let _ = ctl(&sock, &["migrate", &format!("tcp:127.0.0.1:{port}")]);
    let stream = t.join().unwrap();
    drop(src.stdin.take());
    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("cut", stream[..stream.len() / 2].to_vec(), "cut off"),
        (
            "cut before the end marker",
            stream[..stream.len() - 25].to_vec(),
            "cut off",
        ),
        ("empty", Vec::new(), "header is cut short"),
    ];
    let mut flipped = stream.clone();
    let mid = flipped.len() * 2 / 3;
    flipped[mid] ^= 0x10;
    cases.push(("flipped", flipped, "rejected"));
    let mut version = stream.clone();
    version[8..12].copy_from_slice(&(nyx_trace::FORMAT_VERSION + 1).to_le_bytes());
    cases.push(("version", version, "unsupported format version"));
    for (what, bytes, needle) in cases {
        let (code, err) = feed_destination(&bytes);
        assert_eq!(code, Some(1), "{what}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.contains("waiting for a migration")).collect();
        assert_eq!(lines.len(), 1, "{what}: {err}");
        assert!(lines[0].starts_with("nyx: migration rejected: "), "{what}: {err}");
        assert!(lines[0].contains(needle), "{what}: want {needle:?} in {err}");
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Downtime and total time for an idle guest of 64 and 256 MiB on
/// loopback, median of five migrations each (`cargo test --release -p
/// nyx-cli --test migrate -- --ignored --nocapture`).
#[test]
#[ignore]
fn migration_benchmark_idle() {
    if !kvm_available() {
        return;
    }
    for mem in ["64", "256"] {
        let (mut downtime, mut total, mut iterations, mut bytes) = (vec![], vec![], vec![], vec![]);
        for run in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("api.sock");
            let (mut dst, port) = destination();
            let mut src = echo_source(&sock, mem);
            let (code, reply) = ctl(&sock, &["migrate", &format!("tcp:127.0.0.1:{port}")]);
            assert_eq!(code, Some(0), "{reply}");
            let d = &reply["data"];
            println!("{mem} MiB run {run}: {d}");
            downtime.push(d["downtime_ms"].as_f64().unwrap());
            total.push(d["total_ms"].as_f64().unwrap());
            iterations.push(d["iterations"].as_f64().unwrap());
            bytes.push(d["bytes_sent"].as_f64().unwrap());
            assert_eq!(src.wait(), Some(0));
            dst.input(b".");
            assert_eq!(
                dst.wait().map(|s| s as u32),
                nyx_guests::expected("echo").unwrap().exit_value
            );
        }
        println!(
            "{mem} MiB idle echo guest, median of 5: downtime {:.2} ms, total {:.1} ms, {} pre-copy passes, {:.0} bytes sent",
            median(&mut downtime),
            median(&mut total),
            median(&mut iterations),
            median(&mut bytes)
        );
    }
}
