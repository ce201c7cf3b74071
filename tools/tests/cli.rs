//! End-to-end tests of the `nyx` binary: exit statuses, the split between
//! guest output (stdout) and Nyx's messages (stderr), one-line errors for bad
//! input, and the Linux loader on Debian's stock kernel image.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{guest, kvm_available, nyx};

fn run_kernel(kernel: &Path, extra: &[&str]) -> Output {
    nyx()
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .args(extra)
        .output()
        .expect("nyx runs")
}

/// An error is exactly one line on stderr, names the problem, and exits 1.
fn assert_one_line_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "want one line, got: {err}");
    assert!(err.starts_with("nyx: "), "{err}");
    assert!(err.contains(needle), "want {needle:?} in {err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn missing_kernel_file_is_one_line_and_status_1() {
    let out = run_kernel(Path::new("/nonexistent/kernel.elf"), &[]);
    assert_one_line_error(&out, "cannot read kernel /nonexistent/kernel.elf");
}

#[test]
fn png_as_kernel_is_refused_naming_the_formats() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("picture.png");
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    png.resize(4096, 0);
    std::fs::write(&p, png).unwrap();
    if !kvm_available() {
        return;
    }
    let out = run_kernel(&p, &[]);
    assert_one_line_error(&out, "Multiboot");
}

#[test]
fn truncated_elf_is_refused() {
    if !kvm_available() {
        return;
    }
    let image = std::fs::read(guest("hello")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cut.elf");
    std::fs::write(&p, &image[..image.len().min(300)]).unwrap();
    let out = run_kernel(&p, &[]);
    assert_one_line_error(&out, "cannot load kernel");
}

#[test]
fn unusable_kvm_device_is_one_line_and_status_1() {
    let out = nyx()
        .env("NYX_KVM_DEVICE", "/nonexistent/kvm")
        .arg("run")
        .arg("--kernel")
        .arg(guest("hello"))
        .output()
        .unwrap();
    assert_one_line_error(&out, "cannot open /nonexistent/kvm");
}

#[test]
fn debug_exit_value_is_the_exit_status_and_output_is_on_stdout() {
    if !kvm_available() {
        return;
    }
    let out = run_kernel(&guest("hello"), &["--cmdline", "hello from the command line"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0x21),
        "stdout: {stdout} stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Hello from a Nyx guest!"), "{stdout}");
    assert!(stdout.contains("hello from the command line"), "{stdout}");
    assert!(out.stderr.is_empty() || !String::from_utf8_lossy(&out.stderr).contains("Hello"));
}

#[test]
fn triple_fault_exits_2_with_a_crash_report() {
    if !kvm_available() {
        return;
    }
    let out = run_kernel(&guest("triple"), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("guest crashed"), "{err}");
    for reg in ["rip", "cr0", "cr3", "efer", "cs sel", "code at rip"] {
        assert!(err.contains(reg), "crash report lacks {reg}: {err}");
    }
    assert!(String::from_utf8_lossy(&out.stdout).contains("working"));
}

#[test]
fn serial_input_from_a_file() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("in.txt");
    std::fs::write(&p, b"abc.").unwrap();
    let out = run_kernel(&guest("echo"), &["--serial-in", p.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0x33), "{stdout}");
    assert!(stdout.contains("ABC"), "{stdout}");
}

/// Debian's stock kernel: the 64-bit boot protocol takes it as far as the
/// decompressor's first serial output (it does not finish decompressing in
/// reasonable time on emulated KVM, so the test stops there).
#[test]
fn debian_kernel_reaches_the_decompressor_output() {
    let Ok(kernel) = std::env::var("NYX_LINUX_KERNEL") else {
        assert_ne!(
            std::env::var("NYX_REQUIRE_LINUX").as_deref(),
            Ok("1"),
            "NYX_REQUIRE_LINUX=1 but NYX_LINUX_KERNEL is not set"
        );
        eprintln!("skipped: set NYX_LINUX_KERNEL to a Debian vmlinuz (tools/scripts/fetch-linux-kernel.sh)");
        return;
    };
    if !kvm_available() {
        return;
    }
    let mut child = nyx()
        .args([
            "run",
            "--mem",
            "256",
            "--kernel",
            &kernel,
            "--cmdline",
            "earlyprintk=serial,ttyS0,115200 console=ttyS0 nokaslr",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut seen = Vec::new();
    let want = "KASLR disabled";
    while start.elapsed() < Duration::from_secs(240) {
        if let Ok(b) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.extend_from_slice(&b);
        }
        if String::from_utf8_lossy(&seen).contains(want) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = String::from_utf8_lossy(&seen);
    assert!(
        text.contains(want),
        "no {want:?} within 240 s; serial output was: {text}"
    );
}

/// A recorder killed with SIGKILL leaves `NAME.partial`, which replays up to
/// its last complete frame and says where it ends.
#[test]
fn killed_recording_replays_up_to_its_last_frame() {
    use std::io::Write;
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("echo.nyxtrace");
    let mut child = nyx()
        .args(["record", "--out"])
        .arg(&trace)
        .arg("--kernel")
        .arg(guest("echo"))
        .args(["--serial-in", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"kill").unwrap();
    stdin.flush().unwrap();
    // The guest echoes and idles waiting for more; frames older than 200 ms
    // are written while it idles.
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let recorded = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(recorded.contains("KILL"), "recorded run printed {recorded:?}");
    assert!(!trace.exists(), "the trace is only renamed when the recording finishes");
    let partial = dir.path().join("echo.nyxtrace.partial");
    assert!(partial.exists());

    let v = nyx().args(["trace", "verify"]).arg(&partial).output().unwrap();
    assert_eq!(v.status.code(), Some(4), "{}", String::from_utf8_lossy(&v.stdout));
    assert!(String::from_utf8_lossy(&v.stdout).contains("INCOMPLETE"));

    let r = nyx().arg("replay").arg(&partial).output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(4), "stderr: {err}");
    assert!(err.contains("the trace ends at position"), "{err}");
    let replayed = String::from_utf8_lossy(&r.stdout);
    assert!(replayed.contains("KILL"), "replay printed {replayed:?}");
    assert!(
        recorded.starts_with(&*replayed) || replayed.starts_with(&*recorded),
        "{recorded:?} vs {replayed:?}"
    );
}

fn record_hello(dir: &Path) -> PathBuf {
    let trace = dir.join("hello.nyxtrace");
    let out = nyx()
        .args(["record", "--out"])
        .arg(&trace)
        .arg("--kernel")
        .arg(guest("hello"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0x21),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    trace
}

#[test]
fn replay_and_trace_tools_on_a_finished_trace() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let trace = record_hello(dir.path());
    let r = nyx().arg("replay").arg(&trace).output().unwrap();
    assert_eq!(r.status.code(), Some(0x21), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stdout).contains("Hello from a Nyx guest!"));

    let info = nyx().args(["trace", "info"]).arg(&trace).output().unwrap();
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(info.status.success(), "{text}");
    for want in ["64 MiB", "pio-out", "complete     yes", "ratio", "image        kernel"] {
        assert!(text.contains(want), "trace info lacks {want:?}:\n{text}");
    }
    let dump = nyx()
        .args(["trace", "dump", "--kind", "pio-out"])
        .arg(&trace)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(
        text.lines().count() > 20 && text.lines().all(|l| l.contains("pio-out")),
        "{text}"
    );
    let verify = nyx().args(["trace", "verify"]).arg(&trace).output().unwrap();
    assert!(verify.status.success() && String::from_utf8_lossy(&verify.stdout).contains("OK"));
}

#[test]
fn corrupt_and_foreign_traces_are_refused_with_one_line() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let trace = record_hello(dir.path());
    let mut bytes = std::fs::read(&trace).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let flipped = dir.path().join("flipped.nyxtrace");
    std::fs::write(&flipped, &bytes).unwrap();
    for cmd in [&["replay"][..], &["trace", "verify"][..]] {
        let out = nyx().args(cmd).arg(&flipped).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("checksum") || err.contains("corrupt"), "{err}");
    }
    let png = dir.path().join("x.nyxtrace");
    std::fs::write(&png, b"\x89PNG\r\n\x1a\n and more").unwrap();
    let out = nyx().arg("replay").arg(&png).output().unwrap();
    assert_one_line_error(&out, "not a Nyx");
}

fn ctl(sock: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = nyx().arg("ctl").arg(sock).args(args).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The control socket pauses a running machine, reports its status,
/// snapshots it (compressed, and mappable with `--mappable`) and resumes
/// it; `nyx restore` continues either snapshot alike with new serial input.
#[test]
fn control_socket_snapshot_and_restore() {
    use std::io::Write;
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let snap = dir.path().join("echo.nyxsnap");
    let mut child = nyx()
        .arg("run")
        .arg("--kernel")
        .arg(guest("echo"))
        .args(["--serial-in", "-", "--api"])
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"ab").unwrap();
    stdin.flush().unwrap();
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ctl(&sock, &["pause"]).0, Some(0));
    let (code, status) = ctl(&sock, &["status"]);
    assert_eq!(code, Some(0), "{status}");
    assert!(status.contains("\"state\":\"paused\""), "{status}");
    let (code, reply) = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{reply}");
    assert!(snap.exists());
    let mapped = dir.path().join("echo.mapped.nyxsnap");
    let (code, reply) = ctl(&sock, &["snapshot", mapped.to_str().unwrap(), "--mappable"]);
    assert_eq!(code, Some(0), "{reply}");
    let kinds = |p: &Path| -> Vec<nyx_trace::FrameKind> {
        let r = nyx_trace::TraceReader::open(p).unwrap();
        r.frames().iter().map(|f| f.kind).collect()
    };
    assert!(kinds(&mapped).contains(&nyx_trace::FrameKind::MemoryImage));
    assert!(!kinds(&snap).contains(&nyx_trace::FrameKind::MemoryImage));
    let (code, reply) = ctl(&sock, &["frobnicate"]);
    assert_eq!(code, Some(1), "{reply}");
    assert!(reply.contains("unknown command"), "{reply}");
    assert_eq!(ctl(&sock, &["resume"]).0, Some(0));
    stdin.write_all(b"c.").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0x33));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ABC."),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let input = dir.path().join("in.txt");
    std::fs::write(&input, b"zz.").unwrap();
    for file in [&snap, &mapped] {
        let r = nyx()
            .arg("restore")
            .arg(file)
            .arg("--serial-in")
            .arg(&input)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&r.stdout);
        assert_eq!(
            r.status.code(),
            Some(0x33),
            "{text} {}",
            String::from_utf8_lossy(&r.stderr)
        );
        // The restored guest had already echoed "AB" before the snapshot.
        assert!(
            text.contains("ZZ.") && text.contains("bye") && !text.contains("echo:"),
            "{}: {text}",
            file.display()
        );
    }
}

/// Takes a snapshot of the echo guest through the control socket after it
/// has echoed "AB", then lets that run end.
fn echo_snapshot(dir: &Path) -> PathBuf {
    use std::io::Write;
    let sock = dir.join("snap-api.sock");
    let snap = dir.join("echo-ab.nyxsnap");
    let mut child = nyx()
        .arg("run")
        .arg("--kernel")
        .arg(guest("echo"))
        .args(["--serial-in", "-", "--api"])
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"ab").unwrap();
    stdin.flush().unwrap();
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let (code, reply) = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{reply}");
    stdin.write_all(b".").unwrap();
    drop(stdin);
    assert_eq!(child.wait().unwrap().code(), Some(0x33));
    snap
}

/// `nyx record --from-snapshot` records the continuation of a snapshot;
/// its replay gives the same output and status without the snapshot.
#[test]
fn record_from_a_snapshot_and_replay_it() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = echo_snapshot(dir.path());
    let input = dir.path().join("in.txt");
    std::fs::write(&input, b"xy.").unwrap();
    let trace = dir.path().join("cont.nyxtrace");
    let rec = nyx()
        .args(["record", "--verify", "full", "--from-snapshot"])
        .arg(&snap)
        .arg("--out")
        .arg(&trace)
        .arg("--serial-in")
        .arg(&input)
        .output()
        .unwrap();
    let recorded = String::from_utf8_lossy(&rec.stdout).into_owned();
    assert_eq!(
        rec.status.code(),
        Some(0x33),
        "{recorded}{}",
        String::from_utf8_lossy(&rec.stderr)
    );
    // The snapshot had echoed "AB" already: only the continuation is here.
    assert!(recorded.contains("XY.") && recorded.contains("bye"), "{recorded}");
    assert!(!recorded.contains("echo:") && !recorded.contains("AB"), "{recorded}");
    let info = nyx().args(["trace", "info"]).arg(&trace).output().unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("verify       Full"),
        "the options apply from a snapshot too: {info}"
    );
    std::fs::remove_file(&snap).unwrap();
    let rep = nyx().arg("replay").arg(&trace).output().unwrap();
    assert_eq!(
        rep.status.code(),
        Some(0x33),
        "{}",
        String::from_utf8_lossy(&rep.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&rep.stdout), recorded);
}

#[test]
fn record_needs_a_kernel_or_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let out = nyx()
        .args(["record", "--out"])
        .arg(dir.path().join("t.nyxtrace"))
        .output()
        .unwrap();
    assert_one_line_error(&out, "--from-snapshot FILE");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--kernel FILE"), "{err}");
    let both = nyx()
        .args(["record", "--out", "t", "--kernel", "k", "--from-snapshot", "s"])
        .output()
        .unwrap();
    assert_eq!(both.status.code(), Some(2), "clap refuses the combination");
    let run = nyx().arg("run").output().unwrap();
    assert_one_line_error(&run, "--kernel FILE");
}

/// A recording served on a control socket: requests while the guest idles
/// leave no trace, and one stopped with `quit` keeps what it logged (the
/// trace is finished and replays up to there, status 4).
#[test]
fn recording_quit_through_the_api_replays_up_to_there() {
    use std::io::Write;
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("rec.sock");
    let trace = dir.path().join("quit.nyxtrace");
    let mut child = nyx()
        .args(["record", "--serial-in", "-", "--out"])
        .arg(&trace)
        .arg("--api")
        .arg(&sock)
        .arg("--kernel")
        .arg(guest("echo"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"ok").unwrap();
    stdin.flush().unwrap();
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    // Requests stop the idling guest: the trace must not show those stops.
    let (code, status) = ctl(&sock, &["status"]);
    assert_eq!(code, Some(0), "{status}");
    assert!(status.contains("\"mode\":\"record\""), "{status}");
    for cmd in ["pause", "status", "resume", "metrics", "pause", "resume"] {
        assert_eq!(ctl(&sock, &[cmd]).0, Some(0), "{cmd}");
    }
    assert_eq!(ctl(&sock, &["quit"]).0, Some(0));
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("replays up to there"), "{err}");
    let recorded = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(recorded.contains("OK"), "{recorded}");
    let rep = nyx().arg("replay").arg(&trace).output().unwrap();
    let rerr = String::from_utf8_lossy(&rep.stderr);
    assert_eq!(rep.status.code(), Some(4), "{rerr}");
    assert!(rerr.contains("cut off"), "{rerr}");
    assert_eq!(String::from_utf8_lossy(&rep.stdout), recorded);
}

/// `nyx trace info T | head -1` and the like: when the reader of stdout
/// goes away early, nyx ends quietly with status 0 and no panic message.
#[test]
fn trace_tools_end_quietly_when_stdout_closes_early() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let trace = record_hello(dir.path());
    for cmd in [
        ["trace", "info"],
        ["trace", "dump"],
        ["trace", "verify"],
        ["trace", "export"],
    ] {
        // The reader is gone before nyx writes a byte: every write fails.
        let mut child = nyx()
            .args(cmd)
            .arg(&trace)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{cmd:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{cmd:?}: {err}");
        assert!(err.is_empty(), "{cmd:?} printed {err:?}");
    }
    // The shell's way: the first line, then the pipe closes.
    let out = Command::new("sh")
        .args([
            "-c",
            r#""$NYX" trace dump "$TRACE" | head -1; "$NYX" trace info "$TRACE" | head -c 10"#,
        ])
        .env("NYX", env!("CARGO_BIN_EXE_nyx"))
        .env("TRACE", &trace)
        .env_remove("NYX_LOG")
        .output()
        .unwrap();
    let (text, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!err.contains("panicked"), "{err}");
    let parts: Vec<&str> = text.split('\n').collect();
    assert_eq!(parts.len(), 2, "one line of the dump, then 10 bytes of info: {text:?}");
    assert!(
        parts[0].trim_start().starts_with(|c: char| c.is_ascii_digit()),
        "{text:?}"
    );
    assert_eq!(parts[1], "trace     ");
}

#[test]
fn trace_dump_of_an_unknown_kind_is_an_error_listing_the_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let out = nyx()
        .args(["trace", "dump", "--kind", "NOSUCH"])
        .arg(dir.path().join("any.nyxtrace"))
        .output()
        .unwrap();
    assert_one_line_error(
        &out,
        "no event kind is called \"NOSUCH\"; the kinds are: pio-in, pio-out",
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("landing"));
}
