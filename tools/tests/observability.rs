//! End-to-end tests of Nyx's logging, metrics and reports: component
//! filters on stderr, the log ring in crash reports, the Prometheus
//! endpoint scraped during a run, and `nyx report` on a trace and on a live
//! machine.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;
use common::{guest, kvm_available, nyx};

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
        .args(["run", "--rng", "--metrics", "127.0.0.1:0", "--serial-in", "-", "--api"])
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
    assert!(
        text.starts_with(
            "pci          00:00.0 8086:1237 host bridge and 1 function\n  \
             03:00.0 1af4:1044 virtio-rng      entropy from the host\n"
        ),
        "the machine's status lists its PCI functions: {text}"
    );
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

/// Reads nyx's "metrics at" line from `err` and returns HOST:PORT.
fn metrics_addr(err: &mut impl BufRead) -> String {
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    line.trim()
        .strip_prefix("nyx: metrics at http://")
        .and_then(|x| x.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address in {line:?}"))
        .to_string()
}

/// A scrape, or None when the endpoint is gone (the process ended).
fn try_scrape(addr: &str) -> Option<prometheus_parse::Scrape> {
    let mut c = TcpStream::connect(addr).ok()?;
    write!(c, "GET /metrics HTTP/1.1\r\nHost: nyx\r\n\r\n").ok()?;
    let mut resp = String::new();
    c.read_to_string(&mut resp).ok()?;
    let body = resp.split_once("\r\n\r\n")?.1.to_string();
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).ok()
}

fn plain(s: &prometheus_parse::Scrape, metric: &str) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == metric)
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// Records the counter guest with --metrics and scrapes as fast as it can
/// until nyx exits: the largest (landings, trace bytes, keyframed
/// landings) seen, the recorder's own count of landings and the size of
/// the finished trace.
fn scrape_a_counter_recording(dir: &Path) -> ((f64, f64, f64), u64, u64) {
    let trace = dir.join("counter.nyxtrace");
    let mut child = nyx()
        .args(["record", "--metrics", "127.0.0.1:0", "--out"])
        .arg(&trace)
        .arg("--kernel")
        .arg(guest("counter"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let addr = metrics_addr(&mut err);
    let mut best = (0.0f64, 0.0f64, 0.0f64);
    while child.try_wait().unwrap().is_none() {
        if let Some(s) = try_scrape(&addr) {
            let landings =
                value(&s, "nyx_landings_total", "how", "search") + value(&s, "nyx_landings_total", "how", "keyframe");
            let keyframes = value(&s, "nyx_landings_total", "how", "keyframe");
            best.0 = best.0.max(landings);
            best.1 = best.1.max(plain(&s, "nyx_trace_bytes_total"));
            best.2 = best.2.max(keyframes);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0x44), "{rest}");
    // "nyx: recorded N events (E exits, L landings) into ..."
    let recorded = rest
        .split_once(" exits, ")
        .and_then(|x| x.1.split_once(" landings"))
        .and_then(|x| x.0.parse().ok())
        .unwrap_or_else(|| panic!("no landing count in {rest}"));
    (best, recorded, std::fs::metadata(&trace).unwrap().len())
}

#[test]
fn prometheus_endpoint_is_scraped_during_a_recording() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The counter guest runs for about 50 ms of timer ticks: a scrape may
    // miss all of its landings on a loaded host, so it gets a few tries.
    for attempt in 1..=4 {
        let ((landings, bytes, keyframes), recorded, size) = scrape_a_counter_recording(dir.path());
        // The trace header (with the kernel in it) is written before the run.
        assert!(bytes > 0.0, "no trace bytes while recording");
        assert!(bytes <= size as f64, "{bytes} bytes counted, the trace has {size}");
        assert!(
            landings <= recorded as f64,
            "{landings} landings scraped, {recorded} recorded"
        );
        assert!(keyframes <= landings);
        if landings > 0.0 {
            return;
        }
        eprintln!("attempt {attempt}: the recording ended before a scrape saw a landing");
    }
    panic!("no scrape during four counter recordings saw a landing");
}

#[test]
fn prometheus_endpoint_is_scraped_during_a_restore() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let snap = dir.path().join("echo.nyxsnap");
    let mut child = nyx()
        .args(["run", "--serial-in", "-", "--api"])
        .arg(&sock)
        .arg("--kernel")
        .arg(guest("echo"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ctl = nyx().arg("ctl").arg(&sock).arg("snapshot").arg(&snap).output().unwrap();
    assert!(ctl.status.success(), "{}", String::from_utf8_lossy(&ctl.stdout));
    drop(child.stdin.take());
    let quit = nyx().arg("ctl").arg(&sock).arg("quit").output().unwrap();
    assert!(quit.status.success());
    child.wait().unwrap();

    let restore_sock = dir.path().join("restore.sock");
    let mut child = nyx()
        .args(["restore", "--metrics", ":0", "--serial-in", "-", "--api"])
        .arg(&restore_sock)
        .arg(&snap)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let addr = metrics_addr(&mut err);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hi").unwrap();
    stdin.flush().unwrap();
    let s = loop {
        let s = scrape(&addr);
        // Both bytes taken (two receive interrupts) and answered on the
        // UART; a scrape may fall between an injection and its handler.
        if value(&s, "nyx_interrupts_injected_total", "vector", "0x24") >= 2.0
            && value(&s, "nyx_io_operations_total", "device", "uart") >= 4.0
        {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no echo in {:?}", s.samples);
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(plain(&s, "nyx_trace_bytes_total"), 0.0, "a restore writes no trace");
    // The restored machine also answers on its control socket.
    let status = nyx().arg("ctl").arg(&restore_sock).arg("status").output().unwrap();
    assert!(String::from_utf8_lossy(&status.stdout).contains("running"));
    stdin.write_all(b".").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0x33));
    assert!(String::from_utf8_lossy(&out.stdout).contains("HI."));
}
