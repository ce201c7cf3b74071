//! End-to-end tests of Nyx's logging, metrics and reports: component
//! filters on stderr, the log ring in crash reports, the Prometheus
//! endpoint scraped during a run, and `nyx report` on a trace and on a live
//! machine.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn nyx() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nyx"));
    c.env_remove("NYX_LOG").env_remove("NYX_KVM_DEVICE");
    c
}

fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert_ne!(
            std::env::var("NYX_REQUIRE_KVM").as_deref(),
            Ok("1"),
            "NYX_REQUIRE_KVM=1 but /dev/kvm cannot be opened read-write"
        );
        eprintln!("skipped: /dev/kvm is not usable");
    }
    ok
}

fn guest(name: &str) -> PathBuf {
    nyx_guests::path(name).unwrap_or_else(|| panic!("no in-tree guest {name}"))
}

fn stderr_of(kernel: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let out = nyx()
        .args(extra)
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn component_filters_change_what_is_logged() {
    if !kvm_available() {
        return;
    }
    let hello = guest("hello");
    let (code, on) = stderr_of(&hello, &["--log", "vmm=info,*=warn"]);
    assert_eq!(code, Some(0x21), "{on}");
    assert!(on.contains("machine built"), "{on}");
    let (_, off) = stderr_of(&hello, &["--log", "vmm=warn,device=debug"]);
    assert!(!off.contains("machine built"), "{off}");
    let (code, bad) = stderr_of(&hello, &["--log", "disk=debug"]);
    assert_eq!(code, Some(1));
    assert!(bad.contains("unknown component \"disk\""), "{bad}");
}

#[test]
fn log_file_gets_the_entries() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("nyx.log");
    let (code, _) = stderr_of(
        &guest("hello"),
        &["--log", "*=info", "--log-file", log.to_str().unwrap()],
    );
    assert_eq!(code, Some(0x21));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("machine built"), "{text}");
}

#[test]
fn crash_report_ends_with_the_log_ring_tail() {
    if !kvm_available() {
        return;
    }
    let (code, err) = stderr_of(&guest("triple"), &[]);
    assert_eq!(code, Some(2), "{err}");
    let tail = err
        .split("log entries:")
        .nth(1)
        .unwrap_or_else(|| panic!("no ring tail in {err}"));
    // At the default stderr level this info entry is only in the ring.
    assert!(tail.contains("INFO nyx::vmm: machine built"), "{err}");
    assert_eq!(err.matches("machine built").count(), 1, "{err}");
    let (_, none) = stderr_of(&guest("triple"), &["--log-ring", "0"]);
    assert!(none.contains("last 0 log entries"), "{none}");
}

fn scrape(addr: &str) -> prometheus_parse::Scrape {
    let mut c = TcpStream::connect(addr).unwrap();
    write!(c, "GET /metrics HTTP/1.1\r\nHost: nyx\r\n\r\n").unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    let body = resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("").to_string();
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
}

fn value(s: &prometheus_parse::Scrape, metric: &str, label: &str, want: &str) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == metric && x.labels.get(label) == Some(want))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[test]
fn prometheus_endpoint_is_scraped_during_a_run() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut child = nyx()
        .args(["run", "--metrics", "127.0.0.1:0", "--serial-in", "-", "--api"])
        .arg(&sock)
        .arg("--kernel")
        .arg(guest("echo"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("nyx: metrics at http://")
        .and_then(|x| x.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address in {line:?}"))
        .to_string();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"abc").unwrap();
    stdin.flush().unwrap();
    // The guest echoes the bytes through the UART while nyx keeps running.
    let start = Instant::now();
    let s = loop {
        let s = scrape(&addr);
        if value(&s, "nyx_io_operations_total", "device", "uart") >= 6.0
            && value(&s, "nyx_vm_exits_total", "kind", "pio-in") >= 3.0
            && value(&s, "nyx_interrupts_injected_total", "vector", "0x24") > 0.0
        {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no UART I/O in {:?}",
            s.samples
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(value(&s, "nyx_vm_exits_total", "kind", "pio-out") > 0.0);
    assert!(value(&s, "nyx_vm_exit_latency_max_ns", "kind", "pio-in") > 0.0);
    assert!(value(&s, "nyx_interrupts_injected_total", "vector", "0x24") > 0.0);

    // The same machine, live: `nyx report --api`.
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(50));
    }
    let rep = nyx()
        .args(["report", "--windows", "2", "--api"])
        .arg(&sock)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&rep.stdout);
    assert!(rep.status.success(), "{text}{}", String::from_utf8_lossy(&rep.stderr));
    assert!(text.contains("2 windows of 100 ms"), "{text}");
    let logs = nyx().args(["ctl"]).arg(&sock).arg("logs").output().unwrap();
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains("machine built"), "{logs}");

    stdin.write_all(b".").unwrap();
    drop(stdin);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0x33));
}

#[test]
fn report_on_a_hello_trace_names_the_uart() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("hello.nyxtrace");
    let rec = nyx()
        .args(["record", "--out"])
        .arg(&trace)
        .arg("--kernel")
        .arg(guest("hello"))
        .output()
        .unwrap();
    assert_eq!(
        rec.status.code(),
        Some(0x21),
        "{}",
        String::from_utf8_lossy(&rec.stderr)
    );
    let out = nyx().arg("report").arg(&trace).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let findings = text
        .split_once("\nfindings\n")
        .map(|x| x.1)
        .unwrap_or_else(|| panic!("{text}"));
    let first = findings.lines().next().unwrap_or_default();
    assert!(first.contains("device uart"), "{text}");
    assert!(
        findings.contains("port 0x3fd (uart)") || findings.contains("port 0x3f8 (uart)"),
        "{text}"
    );
}
