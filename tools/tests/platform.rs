//! Events from outside the modern platform, end to end: a power button
//! pressed through the control socket while `nyx record` runs reaches the
//! guest as an SCI wherever its loop happens to be; the replay, with no
//! control socket, delivers the same SCI at the same instruction (the
//! trace's landing is checked) and ends the same way. A legacy machine has
//! no ACPI block and refuses the event with a clear error.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{guest, kvm_available, nyx, Captured};

fn ctl(sock: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = nyx().arg("ctl").arg(sock).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Starts `nyx record` of the pwrbtn guest on `irqchip` with a control
/// socket, and waits until the guest says it waits.
fn record_pwrbtn(dir: &Path, irqchip: &str) -> (Child, Captured, std::path::PathBuf, std::path::PathBuf) {
    let sock = dir.join(format!("{irqchip}.sock"));
    let trace = dir.join(format!("{irqchip}.nyxtrace"));
    let mut child = nyx()
        .args(["record", "--irqchip", irqchip, "--out"])
        .arg(&trace)
        .arg("--api")
        .arg(&sock)
        .arg("--kernel")
        .arg(guest("pwrbtn"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Captured::spawn(child.stdout.take().unwrap(), Duration::from_secs(60));
    out.wait_for("pwrbtn: waiting\n", "recording");
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, out, sock, trace)
}

/// `nyx trace dump --kind KIND` lines of `trace`.
fn dump(trace: &Path, kind: &str) -> Vec<String> {
    let out = nyx()
        .args(["trace", "dump", "--kind", kind])
        .arg(trace)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn power_button_during_a_recording_is_the_same_sci_in_the_replay() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (child, out, sock, trace) = record_pwrbtn(dir.path(), "apic");
    // Let the loop run a while: the press lands in the middle of it.
    std::thread::sleep(Duration::from_millis(200));
    let (code, text) = ctl(&sock, &["power-button"]);
    assert_eq!(code, Some(0), "{text}");
    let status = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(0), "{err}");
    out.wait_for("pwrbtn: pressed\n", "recording");
    let recorded = out.text();
    assert_eq!(recorded, "pwrbtn: waiting\npwrbtn: pressed\n", "{err}");

    // The trace holds the press, and the SCI (IRQ 9 on the slave PIC at
    // 0x28) injected after it, at a landing inside the loop.
    let platform = dump(&trace, "platform");
    assert_eq!(platform.len(), 1, "{platform:?}");
    assert!(platform[0].contains("platform [01, 00]"), "{platform:?}");
    let injects = dump(&trace, "inject");
    assert!(injects.iter().any(|l| l.contains("vector 0x29")), "{injects:?}");
    let spin = nyx_guests::symbol(nyx_guests::PWRBTN, "spin").expect("symbol spin");
    let landings = dump(&trace, "landing");
    assert!(
        landings.iter().any(|l| {
            l.split("rip 0x")
                .nth(1)
                .and_then(|r| u64::from_str_radix(r.split_whitespace().next()?, 16).ok())
                .is_some_and(|rip| rip >= u64::from(spin) && rip < u64::from(spin) + 32)
        }),
        "no landing in the loop at {spin:#x}: {landings:?}"
    );

    // The replay needs no socket: the press is in the trace, delivered at
    // the recorded landing (a replay checks each landing's registers).
    for i in 0..3 {
        let r = nyx().arg("replay").arg(&trace).output().unwrap();
        let rerr = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(0), "replay {i}: {rerr}");
        assert_eq!(String::from_utf8_lossy(&r.stdout), recorded, "replay {i}: {rerr}");
    }
}

#[test]
fn a_legacy_machine_refuses_platform_events_by_name() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _out, sock, _trace) = record_pwrbtn(dir.path(), "legacy");
    let (code, text) = ctl(&sock, &["power-button"]);
    let _ = ctl(&sock, &["quit"]);
    let _ = child.wait();
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("apic"), "the error names --irqchip apic: {text}");
}
