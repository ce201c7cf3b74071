//! End-to-end tests of `nyx check`: a snapshot of the `echo` guest waiting
//! for input, taken through the control socket; blessed, checked many times
//! with fast resets, agreeing with `nyx restore --clock check`; a wrong
//! expectation that fails once, with one trace that replays the failing
//! repetition's output and status byte for byte; a guest that busy-waits
//! for time, which the check clock cannot serve, stopped with the message
//! that says so; and a suite run whole and in shards whose merged JUnit
//! report equals the whole run's.

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
    snapshot(dir, "echo")
}

/// A snapshot of the guest `name` (`echo` or `ticks`) idling in HLT for its
/// first byte of input: NAME.nyxsnap in `dir`.
fn snapshot(dir: &Path, name: &str) -> PathBuf {
    snapshot_with(dir, name, &[])
}

/// A snapshot of the guest `name` run with `extra` options, 300 ms after
/// its start.
fn snapshot_with(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let sock = dir.join(format!("{name}.sock"));
    let snap = dir.join(format!("{name}.nyxsnap"));
    let mut child = nyx()
        .arg("run")
        .arg("--kernel")
        .arg(nyx_guests::path(name).unwrap())
        .args(["--serial-in", "-", "--api"])
        .arg(&sock)
        .args(extra)
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

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `nyx check` in `cwd` with `args`.
fn check(cwd: &Path, args: &[&str]) -> std::process::Output {
    let out = nyx().current_dir(cwd).arg("check").args(args).output().unwrap();
    eprintln!("nyx check {}:\n{}", args.join(" "), text(&out.stderr));
    out
}

#[test]
fn blessed_check_passes_and_a_failure_leaves_one_trace_that_replays_it() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let snap = echo_snapshot(d);
    std::fs::write(d.join("in.txt"), b"abc.").unwrap();
    let base = ["echo.nyxsnap", "--input", "in.txt", "--expect", "expect.txt"];

    // Bless from one run, then 200 repetitions agree with it.
    let out = check(d, &[&base[..], &["--bless", "--repeat", "200", "--jobs", "2"]].concat());
    assert_eq!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    assert!(err.contains("200 of 200 repetitions passed"), "{err}");
    assert!(err.contains("repetitions/s") && err.contains("us on average"), "{err}");
    let expect = std::fs::read(d.join("expect.txt")).unwrap();
    assert_eq!(text(&expect), "ABC.\nbye\n");
    assert_eq!(std::fs::read_to_string(d.join("expect.txt.status")).unwrap(), "51\n");

    // `nyx restore --clock check` prints exactly what `nyx check` compares.
    let r = nyx()
        .arg("restore")
        .arg(&snap)
        .args(["--clock", "check", "--serial-in"])
        .arg(d.join("in.txt"))
        .output()
        .unwrap();
    assert_eq!(r.stdout, expect, "{}", text(&r.stderr));
    assert_eq!(r.status.code(), Some(51));

    // A wrong expectation: one report and one trace for 20 identical
    // failures, in the default trace directory.
    std::fs::write(d.join("expect.txt"), b"ABD.\nbye\n").unwrap();
    let out = check(
        d,
        &[&base[..], &["--expect-status", "0", "--repeat", "20", "--keep-going"]].concat(),
    );
    assert_eq!(out.status.code(), Some(5));
    let err = text(&out.stderr);
    assert!(err.contains("0 of 20 repetitions passed (1 distinct failure)"), "{err}");
    assert!(err.contains("output differs at byte 2"), "{err}");
    assert!(err.contains("exit status 51, expected 0"), "{err}");
    assert!(
        err.contains("20 repetitions ended this way, the first being repetition 0"),
        "{err}"
    );
    assert_eq!(err.matches("FAILED").count(), 1, "{err}");
    assert!(
        !err.contains("note:"),
        "the recorded run ended as the failure did: {err}"
    );
    let failures = d.join("nyx-check-failures");
    let mut files: Vec<String> = std::fs::read_dir(&failures)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["echo-0.nyxtrace", "echo-0.out"]);
    let trace = failures.join("echo-0.nyxtrace");
    assert!(
        err.contains(&format!(
            "nyx replay {}",
            Path::new("nyx-check-failures/echo-0.nyxtrace").display()
        )),
        "{err}"
    );

    // The trace replays the failing repetition: its output and its status.
    let failed_output = std::fs::read(failures.join("echo-0.out")).unwrap();
    let r = nyx().arg("replay").arg(&trace).output().unwrap();
    assert_eq!(r.stdout, failed_output, "{}", text(&r.stderr));
    assert_eq!(r.status.code(), Some(51), "{}", text(&r.stderr));

    // Without --keep-going the check stops at the first failure.
    let out = check(d, &[&base[..], &["--repeat", "20", "--trace-dir", "f2"]].concat());
    assert_eq!(out.status.code(), Some(5));
    let err = text(&out.stderr);
    assert!(err.contains("0 of 1 repetitions passed"), "{err}");
    assert!(err.contains("19 repetitions not run"), "{err}");
}

/// (name, repetitions, failure count) of each testcase of a report of
/// `nyx check`, and the report's tests and failures.
fn junit_counts(xml: &str) -> (String, Vec<(String, u64, usize)>) {
    let attr = |s: &str, name: &str| -> String {
        let key = format!("{name}=\"");
        let at = s
            .find(&key)
            .map(|i| i + key.len())
            .unwrap_or_else(|| panic!("no {name} in {s}"));
        s[at..at + s[at..].find('"').unwrap()].to_string()
    };
    let head = &xml[xml.find("<testsuites").expect("no testsuites")..];
    let head = &head[..head.find('>').unwrap()];
    let totals = format!("tests={} failures={}", attr(head, "tests"), attr(head, "failures"));
    let mut cases: Vec<(String, u64, usize)> = xml
        .split("<testcase ")
        .skip(1)
        .map(|c| {
            let c = &c[..c.find("</testcase>").unwrap()];
            let reps = attr(&c[c.find("name=\"repetitions\"").unwrap()..], "value");
            (attr(c, "name"), reps.parse().unwrap(), c.matches("<failure ").count())
        })
        .collect();
    cases.sort();
    (totals, cases)
}

#[test]
fn suite_in_shards_runs_every_repetition_once_and_merges_to_the_whole() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    echo_snapshot(d);
    let inputs = [
        ("abc", "abc.", 3),
        ("xy", "xy.", 2),
        ("q", "q.", 1),
        ("hello", "Hello.", 4),
        ("wrong", "w.", 2),
    ];
    let mut suite = String::from("# echo cases\n[defaults]\nsnapshot = \"echo.nyxsnap\"\nclock = \"check\"\n");
    for (name, input, repeat) in inputs {
        std::fs::write(d.join(format!("{name}.in")), input).unwrap();
        suite += &format!(
            "\n[[case]]\nname = \"{name}\"\ninput = \"{name}.in\"\nexpect = \"out/{name}.out\"\nrepeat = {repeat}\n"
        );
    }
    std::fs::write(d.join("suite.toml"), &suite).unwrap();

    let out = check(d, &["--suite", "suite.toml", "--bless"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(d.join("out/hello.out")).unwrap(),
        "HELLO.\nbye\n"
    );
    let blessed = std::fs::read_to_string(d.join("suite.toml")).unwrap();
    assert!(
        blessed.starts_with("# echo cases") && blessed.matches("expect_status = 51").count() == 5,
        "{blessed}"
    );
    std::fs::write(d.join("out/wrong.out"), b"nope").unwrap();

    let out = check(d, &["--suite", "suite.toml", "--keep-going", "--junit", "all.xml"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(text(&out.stderr).contains("10 of 12 repetitions passed (1 distinct failure)"));
    let whole = junit_counts(&std::fs::read_to_string(d.join("all.xml")).unwrap());
    assert_eq!(whole.0, "tests=5 failures=1");
    assert!(std::fs::read_to_string(d.join("all.xml"))
        .unwrap()
        .contains("<property name=\"trace\" value=\"nyx-check-failures/wrong-0.nyxtrace\"/>"));

    let n = 3;
    let mut parts = Vec::new();
    let mut ran = 0;
    for i in 0..n {
        let junit = format!("shard{i}.xml");
        let shard = format!("{i}/{n}");
        let out = check(
            d,
            &[
                "--suite",
                "suite.toml",
                "--keep-going",
                "--shard",
                &shard,
                "--junit",
                &junit,
                "--trace-dir",
                &format!("f{i}"),
            ],
        );
        assert!(out.status.code() == Some(0) || out.status.code() == Some(5));
        let (_, cases) = junit_counts(&std::fs::read_to_string(d.join(&junit)).unwrap());
        ran += cases.iter().map(|c| c.1).sum::<u64>();
        parts.push(junit);
    }
    assert_eq!(ran, 12, "every repetition ran in exactly one shard");
    let merged = nyx()
        .current_dir(d)
        .args(["check", "merge-junit"])
        .args(&parts)
        .output()
        .unwrap();
    assert_eq!(merged.status.code(), Some(0), "{}", text(&merged.stderr));
    let merged = junit_counts(&text(&merged.stdout));
    let strip = |c: &[(String, u64, usize)]| {
        c.iter()
            .map(|(n, r, f)| (n.clone(), *r, (*f).min(1)))
            .collect::<Vec<_>>()
    };
    assert_eq!(merged.0, whole.0);
    assert_eq!(strip(&merged.1), strip(&whole.1));
}

#[test]
fn a_timer_guest_is_repeatable_under_the_check_clock_and_its_failure_replays() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let snap = snapshot(d, "ticks");
    std::fs::write(d.join("in.txt"), b"abc.").unwrap();
    let base = ["ticks.nyxsnap", "--input", "in.txt", "--expect", "expect.txt"];

    let out = check(d, &[&base[..], &["--bless", "--repeat", "30"]].concat());
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("30 of 30 repetitions passed"));
    let expect = std::fs::read(d.join("expect.txt")).unwrap();
    assert!(text(&expect).starts_with("ABC.\nticks="), "{}", text(&expect));

    let r = nyx()
        .arg("restore")
        .arg(&snap)
        .args(["--clock", "check", "--serial-in"])
        .arg(d.join("in.txt"))
        .output()
        .unwrap();
    assert_eq!(text(&r.stdout), text(&expect), "{}", text(&r.stderr));
    assert_eq!(r.status.code(), Some(0x34));

    // Expect another tick count: the failure's trace replays the count the
    // failing repetition printed, and its status.
    let wrong = text(&expect).replace("ticks=", "ticks=1");
    std::fs::write(d.join("expect.txt"), wrong).unwrap();
    let out = check(d, &[&base[..], &["--repeat", "5", "--keep-going"]].concat());
    assert_eq!(out.status.code(), Some(5));
    let err = text(&out.stderr);
    assert!(err.contains("5 repetitions ended this way"), "{err}");
    assert!(!err.contains("note:"), "{err}");
    let failures = d.join("nyx-check-failures");
    let failed_output = std::fs::read(failures.join("ticks-0.out")).unwrap();
    assert_eq!(failed_output, expect);
    let r = nyx()
        .arg("replay")
        .arg(failures.join("ticks-0.nyxtrace"))
        .output()
        .unwrap();
    assert_eq!(r.stdout, failed_output, "{}", text(&r.stderr));
    assert_eq!(r.status.code(), Some(0x34), "{}", text(&r.stderr));
}

/// A 4-vCPU machine saved while its APs compute: every repetition
/// restores all four vCPUs (run one at a time under the check clock) and
/// ends with the same sum; a failure's trace replays the failing output.
#[test]
fn a_four_vcpu_snapshot_is_checked_and_its_failure_replays() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    snapshot_with(d, "smpwork", &["--cpus", "4"]);
    let base = ["smpwork.nyxsnap", "--expect", "expect.txt"];
    let out = check(d, &[&base[..], &["--bless", "--repeat", "3"]].concat());
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("3 of 3 repetitions passed"));
    let expect = text(&std::fs::read(d.join("expect.txt")).unwrap());
    assert!(expect.ends_with("smpwork: result 0x45e31687e12fe2c4\n"), "{expect}");

    std::fs::write(d.join("expect.txt"), expect.replace("result 0x", "result 0x1")).unwrap();
    let out = check(d, &[&base[..], &["--repeat", "2", "--keep-going"]].concat());
    assert_ne!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    assert!(err.contains("2 repetitions ended this way"), "{err}");
    assert!(
        !err.contains("note:"),
        "the recorded run ended as the failure did: {err}"
    );
    let failures = d.join("nyx-check-failures");
    let r = nyx()
        .arg("replay")
        .arg(failures.join("smpwork-0.nyxtrace"))
        .output()
        .unwrap();
    assert_eq!(text(&r.stdout), expect, "{}", text(&r.stderr));
    assert_eq!(r.status.code(), Some(0x60), "{}", text(&r.stderr));
}

#[test]
fn a_guest_busy_waiting_for_time_is_stopped_with_the_message_that_says_why() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // `counter` spins without exits until 50 timer ticks have passed: under
    // the check clock no time passes, so it is still spinning 300 ms later.
    snapshot_with(d, "counter", &["--clock", "check"]);
    std::fs::write(d.join("expect.txt"), b"").unwrap();
    let out = check(
        d,
        &[
            "counter.nyxsnap",
            "--expect",
            "expect.txt",
            "--timeout",
            "0.5",
            "--repeat",
            "3",
        ],
    );
    assert_eq!(out.status.code(), Some(5));
    let err = text(&out.stderr);
    assert!(
        err.contains("counter FAILED: the time limit passed with the check clock"),
        "{err}"
    );
    assert!(err.contains("--clock host"), "{err}");
    assert!(err.contains("0 of 1 repetitions passed"), "{err}");
    assert!(!err.contains("note:"), "its recording stopped the same way: {err}");
    assert!(
        d.join("nyx-check-failures/counter-0.nyxtrace.partial").exists(),
        "{err}"
    );
}
