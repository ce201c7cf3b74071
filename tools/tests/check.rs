//! End-to-end tests of `nyx check`: a snapshot of the `echo` guest waiting
//! for input, taken through the control socket, checked many times with
//! fast resets; and a wrong expectation that fails with a trace that
//! `nyx replay` replays.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;
use common::{kvm_available, nyx};

fn ctl(sock: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = nyx().arg("ctl").arg(sock).args(args).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A snapshot of `echo` idling in HLT for its first byte of input.
fn echo_snapshot(dir: &Path) -> PathBuf {
    let sock = dir.join("api.sock");
    let snap = dir.join("echo.nyxsnap");
    let mut child = nyx()
        .arg("run")
        .arg("--kernel")
        .arg(nyx_guests::path("echo").unwrap())
        .args(["--serial-in", "-", "--api"])
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ctl(&sock, &["pause"]).0, Some(0));
    let (code, reply) = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{reply}");
    assert_eq!(ctl(&sock, &["quit"]).0, Some(0));
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(b".");
    drop(stdin);
    let _ = child.wait();
    snap
}

fn check(snap: &Path, dir: &Path, expect: &[u8], extra: &[&str]) -> std::process::Output {
    let input = dir.join("in.txt");
    let expect_file = dir.join("expect.txt");
    std::fs::write(&input, b"abc.").unwrap();
    std::fs::write(&expect_file, expect).unwrap();
    nyx()
        .arg("check")
        .arg(snap)
        .arg("--input")
        .arg(&input)
        .arg("--expect")
        .arg(&expect_file)
        .args(["--expect-status", "51", "--trace-dir"])
        .arg(dir)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn check_passes_a_thousand_repetitions_and_fails_with_a_replayable_trace() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = echo_snapshot(dir.path());
    let junit = dir.path().join("junit.xml");

    let out = check(
        &snap,
        dir.path(),
        b"ABC.\nbye\n",
        &["--repeat", "1000", "--jobs", "2", "--junit", junit.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("1000 of 1000 repetitions passed"), "{err}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("tests=\"1000\" failures=\"0\""), "{xml}");

    let out = check(&snap, dir.path(), b"ABD.\nbye\n", &["--repeat", "3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("0 of 3 repetitions passed"), "{err}");
    assert!(err.contains("output differs at byte 2"), "{err}");
    let trace = dir.path().join("check-fail-0.nyxtrace");
    assert!(err.contains(&format!("nyx replay {}", trace.display())), "{err}");
    let r = nyx().arg("replay").arg(&trace).output().unwrap();
    assert_eq!(r.status.code(), Some(0x33), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(String::from_utf8_lossy(&r.stdout), "ABC.\nbye\n");
}
