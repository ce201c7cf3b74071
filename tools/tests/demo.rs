//! `nyx demo` end to end: every stage (record, replay, compare, go
//! backwards) reports success and the status is 0; without KVM it fails
//! with one line and a non-zero status.

mod common;

use common::{kvm_available, nyx};

#[test]
fn every_stage_of_the_demo_succeeds_and_it_exits_0() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = nyx().arg("demo").env("TMPDIR", dir.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let all = format!("{stdout}\n{stderr}");
    assert_eq!(out.status.code(), Some(0), "{all}");
    for stage in [
        "1. Recording it under KVM",
        "2. Replaying the trace",
        "3. The two runs agree: identical serial output, exit status and final register and memory digests.",
        "4. Going backwards",
        "stopped just before the instruction that wrote it",
        "reverse-stepi (",
    ] {
        assert!(stdout.contains(stage), "no {stage:?} in {all}");
    }
    assert!(!stdout.contains("FAILED") && !stdout.contains("DIFFER"), "{all}");
    // Both positions going backwards are shown with their instruction.
    assert_eq!(stdout.matches("at position ").count(), 2, "{all}");
    // The trace it offers to replay is there.
    let trace = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().ends_with(".nyxtrace"))
        .unwrap_or_else(|| panic!("no trace left in {}: {all}", dir.path().display()));
    assert!(stdout.contains(&trace.path().display().to_string()), "{all}");
}

#[test]
fn the_demo_without_kvm_fails_with_one_line() {
    let out = nyx()
        .arg("demo")
        .env("NYX_KVM_DEVICE", "/nonexistent/kvm")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/kvm"), "{err}");
}
