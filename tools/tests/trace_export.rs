//! `nyx trace export --format chrome` on recordings of the in-tree guests:
//! the JSON parses, every event is a valid trace event on a named track
//! with non-decreasing times, and what it shows agrees with `nyx trace
//! dump` of the same trace (exits per kind at the same positions, the
//! injections with their vectors, the landings, the time samples, the end)
//! and with what the guest printed. A cut trace is exported up to its last
//! complete frame with a warning; a corrupt one is refused with one line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

mod common;
use common::{guest, kvm_available, nyx};

/// Records the `counter` guest (exits, timer injections, landings, serial
/// output); returns the trace and what the guest printed.
fn record_counter(dir: &Path) -> (PathBuf, String) {
    let trace = dir.join("counter.nyxtrace");
    let out = nyx()
        .args(["record", "--out"])
        .arg(&trace)
        .arg("--kernel")
        .arg(guest("counter"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0x44),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (trace, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `nyx trace export TRACE --format chrome --out FILE EXTRA...`: the JSON
/// and stderr.
fn export(trace: &Path, extra: &[&str]) -> (Value, String) {
    let json = trace.with_extension("json");
    let out = nyx()
        .args(["trace", "export", "--format", "chrome", "--out"])
        .arg(&json)
        .args(extra)
        .arg(trace)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(out.stdout.is_empty());
    let text = std::fs::read_to_string(&json).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
    (v, err)
}

/// The `nyx trace dump` lines of `trace`, split into words.
fn dump(trace: &Path) -> Vec<Vec<String>> {
    let out = nyx().args(["trace", "dump"]).arg(trace).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

fn events(v: &Value) -> &Vec<Value> {
    v["traceEvents"].as_array().expect("traceEvents")
}

/// Checks the fields of every event and the order of times on each
/// track; returns the tracks' names by thread id.
fn check_events(v: &Value) -> BTreeMap<u64, String> {
    let mut names = BTreeMap::new();
    let mut last: BTreeMap<u64, f64> = BTreeMap::new();
    for e in events(v) {
        let ph = e["ph"].as_str().unwrap_or_else(|| panic!("no ph: {e}"));
        assert!(["i", "C", "M"].contains(&ph), "{e}");
        assert!(e["name"].is_string(), "{e}");
        assert!(e["pid"].is_u64() && e["tid"].is_u64(), "{e}");
        let ts = e["ts"].as_f64().unwrap_or_else(|| panic!("no ts: {e}"));
        assert!(ts >= 0.0, "{e}");
        let tid = e["tid"].as_u64().unwrap();
        if ph == "M" {
            if e["name"] == "thread_name" {
                names.insert(tid, e["args"]["name"].as_str().unwrap().to_string());
            }
            continue;
        }
        assert!(names.contains_key(&tid), "{e} is on a track without a name");
        if ph == "i" {
            assert_eq!(e["s"], "t", "{e}");
        }
        let before = last.insert(tid, ts).unwrap_or(0.0);
        assert!(ts >= before, "{e} comes after {before} on its track");
    }
    names
}

/// The instant events on the track called `track`.
fn on_track<'a>(v: &'a Value, names: &BTreeMap<u64, String>, track: &str) -> Vec<&'a Value> {
    let tid = names.iter().find(|(_, n)| *n == track).map(|(t, _)| *t);
    events(v)
        .iter()
        .filter(|e| e["ph"] == "i" && Some(e["tid"].as_u64().unwrap()) == tid)
        .collect()
}

fn pos(e: &Value) -> u64 {
    e["args"]["pos"].as_u64().unwrap()
}

#[test]
fn export_agrees_with_trace_dump() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (trace, printed) = record_counter(dir.path());
    let (v, err) = export(&trace, &[]);
    assert!(err.is_empty(), "{err}");
    assert_eq!(v["otherData"]["complete"], "yes");
    let names = check_events(&v);
    let dump = dump(&trace);

    // Exits: per kind, the same positions in the same order.
    let mut exits: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for l in dump.iter().filter(|l| l[1] == "exit") {
        exits.entry(l[2].clone()).or_default().push(l[0].parse().unwrap());
    }
    assert!(exits.len() >= 2, "{exits:?}");
    for (kind, positions) in &exits {
        let got: Vec<u64> = on_track(&v, &names, &format!("exit {kind}"))
            .into_iter()
            .map(pos)
            .collect();
        assert_eq!(&got, positions, "exits of kind {kind}");
    }
    let exported_exits = events(&v).iter().filter(|e| e["cat"] == "exit").count();
    assert_eq!(exported_exits, exits.values().map(Vec::len).sum::<usize>());

    // Injections with their vectors.
    let want: Vec<(u64, u64)> = dump
        .iter()
        .filter(|l| l[1] == "inject")
        .map(|l| (l[0].parse().unwrap(), u64::from_str_radix(&l[3][2..], 16).unwrap()))
        .collect();
    assert!(want.len() >= 10, "{want:?}");
    let got: Vec<(u64, u64)> = on_track(&v, &names, "interrupts")
        .into_iter()
        .map(|e| (pos(e), e["args"]["vector"].as_u64().unwrap()))
        .collect();
    assert_eq!(got, want);

    // Landings: position, RIP and dirty pages.
    let want: Vec<(u64, String, u64)> = dump
        .iter()
        .filter(|l| l[1] == "landing")
        .map(|l| {
            let dirty = l.iter().position(|w| w == "dirty").unwrap();
            (l[0].parse().unwrap(), l[3].clone(), l[dirty - 1][1..].parse().unwrap())
        })
        .collect();
    assert!(want.len() >= 10, "{want:?}");
    let got: Vec<(u64, String, u64)> = on_track(&v, &names, "landings")
        .into_iter()
        .map(|e| {
            let a = &e["args"];
            (
                pos(e),
                a["rip"].as_str().unwrap().to_string(),
                a["dirty_pages"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want);

    // Time samples: one counter value each.
    let samples = dump.iter().filter(|l| l[1] == "time").count();
    let counters = events(&v).iter().filter(|e| e["name"] == "time sample").count();
    assert_eq!(counters, samples);

    // The end, at the end.
    let end = on_track(&v, &names, "end");
    assert_eq!(end.len(), 1);
    assert!(end[0]["args"]["how"].as_str().unwrap().contains("0x44"), "{}", end[0]);
    let last_ts = events(&v).iter().map(|e| e["ts"].as_f64().unwrap()).fold(0.0, f64::max);
    assert_eq!(end[0]["ts"].as_f64().unwrap(), last_ts);

    // The serial lines are what the guest printed.
    let text: String = on_track(&v, &names, "serial output")
        .iter()
        .map(|e| e["args"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, printed);

    // Without --out the same JSON goes to stdout.
    let out = nyx().args(["trace", "export"]).arg(&trace).output().unwrap();
    assert!(out.status.success());
    let again: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again, v);
}

#[test]
fn export_with_replay_costs_every_landing() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (trace, _) = record_counter(dir.path());
    let (v, err) = export(&trace, &["--replay"]);
    assert!(err.is_empty(), "{err}");
    let names = check_events(&v);
    let landings = on_track(&v, &names, "landings");
    assert!(landings.len() >= 10);
    for l in &landings {
        let a = &l["args"];
        assert!(a["replay_us"].as_f64().is_some_and(|us| us > 0.0), "{l}");
        if a["keyframe"] == true {
            assert_eq!(a["replay_hits"], 0, "{l}");
        }
    }
    let costs = events(&v).iter().filter(|e| e["name"] == "landing replay cost").count();
    assert_eq!(costs, landings.len());
}

#[test]
fn a_cut_trace_is_exported_up_to_its_last_complete_frame() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (trace, _) = record_counter(dir.path());
    let bytes = std::fs::read(&trace).unwrap();
    // Without the trailer and the end of the index frame every event frame
    // is still whole.
    let cut = dir.path().join("cut.nyxtrace");
    std::fs::write(&cut, &bytes[..bytes.len() - 25]).unwrap();
    let (v, err) = export(&cut, &[]);
    assert!(err.starts_with("nyx: warning: ") && err.contains("cut off"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(v["otherData"]["complete"].as_str().unwrap().starts_with("no"));
    check_events(&v);
    let exits = dump(&cut).iter().filter(|l| l[1] == "exit").count();
    assert!(exits > 100);
    assert_eq!(events(&v).iter().filter(|e| e["cat"] == "exit").count(), exits);

    // Cut inside the first event frame: nothing but the process name.
    let first = nyx_trace::TraceReader::open(&trace).unwrap().frames()[0].offset as usize;
    let header_and_some = dir.path().join("short.nyxtrace");
    std::fs::write(&header_and_some, &bytes[..first + 30]).unwrap();
    let (v, err) = export(&header_and_some, &[]);
    assert!(err.contains("cut off"), "{err}");
    assert_eq!(events(&v).len(), 1, "{v}");

    // A flipped bit is an error of one line, and no output file.
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let bad = dir.path().join("flipped.nyxtrace");
    std::fs::write(&bad, &flipped).unwrap();
    let json = dir.path().join("flipped.json");
    let out = nyx()
        .args(["trace", "export", "--out"])
        .arg(&json)
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("nyx: ") && err.contains("flipped.nyxtrace"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!json.exists());
}
