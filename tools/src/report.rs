//! `nyx report`: why is this guest slow? Builds a [`Profile`] of exits by
//! kind and port in 100 ms windows, either from a trace (virtual time from
//! its `Time` events) or from a live machine (its `metrics`, sampled every
//! 100 ms through the control socket), and turns it into findings, each
//! with a severity and a one-line recommendation.
//!
//! The report starts with the machine's PCI functions ([`render_pci`]), as
//! the trace header or the live machine's `status` lists them: slot,
//! vendor:device, and what each is (a disk with its ID, image path, size,
//! read-only or not, SHA-256 prefix and whether the trace embeds its reads;
//! virtio-rng; virtio-console), with what a trace logged for them
//! (`DiskRead`, `Rng` and `ConsoleInput` events and their bytes).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use nyx_trace::{FrameKind, TraceReader};
use nyx_vmm::config::{MachineConfig, PciFunctionConfig, FIRST_PCI_SLOT};
use nyx_vmm::events::{Event, ExitKind};
use nyx_vmm::metrics::{device_of_port, MetricsSnapshot};

/// One window's length, ns.
pub const WINDOW_NS: u64 = 100_000_000;

/// Errors of `nyx report`.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The trace cannot be read.
    #[error("{path}: {source}")]
    Trace {
        /// The trace.
        path: String,
        /// Why.
        source: nyx_trace::Error,
    },
    /// The control socket failed.
    #[error("{0}")]
    Api(String),
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Worth knowing.
    Info,
    /// Costs noticeable time.
    Warning,
    /// Dominates the run.
    Critical,
}

/// One observation with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// How bad.
    pub severity: Severity,
    /// What was seen.
    pub what: String,
    /// What to do.
    pub recommendation: String,
}

/// Limits above which a finding is reported.
#[derive(Debug, Clone)]
pub struct Thresholds {
    /// Exits per second in one window.
    pub exit_rate: f64,
    /// Share of all exits for one port or device (0..1).
    pub port_share: f64,
    /// Landings per second (each costs a breakpoint search on replay).
    pub landing_rate: f64,
    /// Average breakpoint hits per landing.
    pub hits_per_landing: f64,
    /// 99th percentile of exit handling, ns.
    pub p99_ns: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            exit_rate: 100_000.0,
            port_share: 0.5,
            landing_rate: 1_000.0,
            hits_per_landing: 100.0,
            p99_ns: 100_000,
        }
    }
}

/// Events of one kind of device input a trace logged, and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Logged {
    /// Events.
    pub events: u64,
    /// Bytes they carry.
    pub bytes: u64,
}

impl Logged {
    fn add(&mut self, bytes: usize) {
        self.events += 1;
        self.bytes += bytes as u64;
    }
}

/// What a trace logged for the PCI functions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceInput {
    /// Reads of the embedded disks (`DiskRead`).
    pub disk_read: Logged,
    /// virtio-rng's bytes (`Rng`).
    pub rng: Logged,
    /// virtio-console's input (`ConsoleInput`).
    pub console_input: Logged,
    /// virtio-net's received frames (`NetInput`, records).
    pub net_input: Logged,
}

/// What a run did, in windows of [`WINDOW_NS`].
#[derive(Debug, Clone, Default)]
pub struct Profile {
    /// Guest-caused exits by kind name.
    pub by_kind: BTreeMap<String, u64>,
    /// Port I/O by port.
    pub by_port: BTreeMap<u16, u64>,
    /// Exits per window, in order.
    pub windows: Vec<u64>,
    /// Time covered, ns (0: unknown).
    pub duration_ns: u64,
    /// Landings.
    pub landings: u64,
    /// Of those, landings stored as delta keyframes (never searched).
    pub keyframes: u64,
    /// Breakpoint hits finding them (live replays only).
    pub search_hits: Option<u64>,
    /// Worst p99 handling latency and its exit kind (live only).
    pub worst_p99: Option<(String, u64)>,
    /// What the trace logged for the PCI functions (traces only).
    pub device_input: Option<DeviceInput>,
}

impl Profile {
    /// All exits.
    pub fn total(&self) -> u64 {
        self.by_kind.values().sum()
    }

    fn add_exit(&mut self, kind: ExitKind, addr: u64, window: usize) {
        *self.by_kind.entry(kind.name().to_string()).or_default() += 1;
        if matches!(kind, ExitKind::PioIn | ExitKind::PioOut) {
            if let Ok(p) = u16::try_from(addr) {
                *self.by_port.entry(p).or_default() += 1;
            }
        }
        if self.windows.len() <= window {
            self.windows.resize(window + 1, 0);
        }
        self.windows[window] += 1;
    }
}

fn trace_error(path: &Path) -> impl Fn(nyx_trace::Error) -> ReportError + '_ {
    move |source| ReportError::Trace {
        path: path.display().to_string(),
        source,
    }
}

/// The profile of the trace `r`, opened from `path`.
pub fn profile_trace(r: &mut TraceReader, path: &Path) -> Result<Profile, ReportError> {
    let err = trace_error(path);
    let mut p = Profile::default();
    let mut input = DeviceInput::default();
    let (mut first, mut last) = (None::<u64>, 0u64);
    // Windows beyond this many are folded into the last (a bogus time
    // stamp must not allocate without bound).
    const MAX_WINDOWS: usize = 1 << 20;
    let mut window = 0usize;
    for i in 0..r.frames().len() {
        if r.frames()[i].kind != FrameKind::Events {
            continue;
        }
        for e in nyx_vmm::events::read_events(r, i).map_err(&err)? {
            match e {
                Event::Time(t) => {
                    let start = *first.get_or_insert(t);
                    last = last.max(t);
                    window = usize::try_from(t.saturating_sub(start) / WINDOW_NS)
                        .unwrap_or(MAX_WINDOWS)
                        .min(MAX_WINDOWS);
                }
                Event::Exit(x) => p.add_exit(x.kind, x.addr, window),
                Event::Landing(l) => {
                    p.landings += 1;
                    p.keyframes += u64::from(l.keyframe.is_some());
                }
                Event::DiskRead(b) => input.disk_read.add(b.len()),
                Event::Rng(b) => input.rng.add(b.len()),
                Event::ConsoleInput(b) => input.console_input.add(b.len()),
                Event::NetInput(b) => input.net_input.add(b.len()),
                _ => {}
            }
        }
    }
    p.duration_ns = first.map_or(0, |f| last - f);
    p.device_input = Some(input);
    Ok(p)
}

/// The profile of a live machine from metrics samples taken every
/// [`WINDOW_NS`] (the first is the baseline).
pub fn profile_samples(samples: &[MetricsSnapshot]) -> Profile {
    let mut p = Profile::default();
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return p;
    };
    let before_kind: BTreeMap<&str, u64> = first.exits.iter().map(|e| (e.kind.as_str(), e.count)).collect();
    for e in &last.exits {
        let n = e
            .count
            .saturating_sub(before_kind.get(e.kind.as_str()).copied().unwrap_or(0));
        if n > 0 {
            p.by_kind.insert(e.kind.clone(), n);
        }
        if p.worst_p99.as_ref().is_none_or(|(_, w)| e.p99_ns > *w) && e.count > 0 {
            p.worst_p99 = Some((e.kind.clone(), e.p99_ns));
        }
    }
    let before_port: BTreeMap<u16, u64> = first.ports.iter().map(|x| (x.port, x.count)).collect();
    for x in &last.ports {
        let n = x.count.saturating_sub(before_port.get(&x.port).copied().unwrap_or(0));
        if n > 0 {
            p.by_port.insert(x.port, n);
        }
    }
    p.windows = samples
        .windows(2)
        .map(|w| w[1].total_exits().saturating_sub(w[0].total_exits()))
        .collect();
    p.duration_ns = p.windows.len() as u64 * WINDOW_NS;
    p.landings = last.landings.saturating_sub(first.landings);
    p.keyframes = last.landings_keyframe.saturating_sub(first.landings_keyframe);
    p.search_hits = Some(last.landing_search_hits.saturating_sub(first.landing_search_hits));
    p
}

/// What to do about a port that takes most exits.
fn port_advice(port: u16) -> &'static str {
    match port {
        0x3fd => "the guest polls LSR; use the THRE interrupt (IER bit 1) instead of polling",
        0x3f8 => "one exit per serial byte; print less, or use a virtio console that takes a buffer per exit",
        0x3f9..=0x3ff => "UART register traffic; program the UART once and use its interrupts",
        0x40..=0x43 | 0x61 => "the guest polls the PIT to measure time; use its interrupt or a calibrated delay loop",
        0x70..=0x71 => "the guest reads the RTC repeatedly; read it once and count timer ticks",
        0x80 => "port 0x80 I/O delays; drop them (Linux: io_delay=none)",
        0x20..=0x21 | 0xa0..=0xa1 => "PIC EOI/mask traffic on every interrupt; take fewer interrupts (a slower timer)",
        0xcf8..=0xcff => "PCI configuration space scans; cache what the scan found",
        _ => "batch the accesses or use the device's interrupt",
    }
}

fn pct(n: u64, total: u64) -> f64 {
    100.0 * n as f64 / total.max(1) as f64
}

/// The findings of `p` under `t`, worst first.
pub fn analyze(p: &Profile, t: &Thresholds) -> Vec<Finding> {
    let mut out = Vec::new();
    let total = p.total();
    if total == 0 {
        return out;
    }
    // Hot spots: the busiest device, then its busiest port.
    let mut by_device: BTreeMap<&str, u64> = BTreeMap::new();
    for (port, n) in &p.by_port {
        *by_device.entry(device_of_port(*port)).or_default() += n;
    }
    if let Some((dev, n)) = by_device.iter().max_by_key(|(_, n)| **n) {
        let share = *n as f64 / total as f64;
        if share > t.port_share && *dev != "none" {
            out.push(Finding {
                severity: if share > 0.8 {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                what: format!("device {dev}: {:.0}% of exits ({n} of {total})", share * 100.0),
                recommendation: format!("the guest's time goes to {dev} register accesses; see the port findings"),
            });
        }
    }
    for (port, n) in &p.by_port {
        let share = *n as f64 / total as f64;
        let dev = device_of_port(*port);
        if share > t.port_share / 2.0 {
            out.push(Finding {
                severity: if share > t.port_share {
                    Severity::Warning
                } else {
                    Severity::Info
                },
                what: format!(
                    "port {port:#x} ({dev}): {:.0}% of exits — {}",
                    share * 100.0,
                    port_advice(*port)
                ),
                recommendation: port_advice(*port).to_string(),
            });
        }
        if dev == "none" {
            out.push(Finding {
                severity: Severity::Info,
                what: format!("port {port:#x}: {n} accesses to a port no device decodes"),
                recommendation: "reads return all-ones and writes are dropped; check the guest's device probing".into(),
            });
        }
    }
    if p.duration_ns > 0 {
        let secs = WINDOW_NS as f64 / 1e9;
        if let Some((i, n)) = p.windows.iter().enumerate().max_by_key(|(_, n)| **n) {
            let rate = *n as f64 / secs;
            if rate > t.exit_rate {
                out.push(Finding {
                    severity: if rate > 10.0 * t.exit_rate {
                        Severity::Critical
                    } else {
                        Severity::Warning
                    },
                    what: format!(
                        "{rate:.0} exits/s at {} ms (threshold {:.0}/s)",
                        i as u64 * 100,
                        t.exit_rate
                    ),
                    recommendation: "each exit costs a round trip to Nyx; reduce port I/O in that phase".into(),
                });
            }
        }
        let landing_rate = p.landings as f64 / (p.duration_ns as f64 / 1e9);
        if landing_rate > t.landing_rate {
            out.push(Finding {
                severity: Severity::Warning,
                what: format!("{landing_rate:.0} landings/s (threshold {:.0}/s)", t.landing_rate),
                recommendation:
                    "the guest busy-waits past timer deadlines; each landing costs a search on replay — let it HLT"
                        .into(),
            });
        }
    }
    let searched = p.landings.saturating_sub(p.keyframes);
    if let Some(hits) = p.search_hits.filter(|_| searched > 0) {
        let per = hits as f64 / searched as f64;
        if per > t.hits_per_landing {
            out.push(Finding {
                severity: Severity::Warning,
                what: format!("{per:.0} breakpoint hits per landing ({hits} for {searched} searched landings)"),
                recommendation: "landings inside hot loops are expensive to find; store keyframes for them".into(),
            });
        }
    }
    if let Some((kind, p99)) = &p.worst_p99 {
        if *p99 > t.p99_ns {
            out.push(Finding {
                severity: Severity::Warning,
                what: format!(
                    "{kind} exits: p99 handling {} µs (threshold {} µs)",
                    p99 / 1000,
                    t.p99_ns / 1000
                ),
                recommendation: "a device model is slow to answer; profile its handler".into(),
            });
        }
    }
    out.sort_by_key(|f| std::cmp::Reverse(f.severity));
    out
}

/// The report as text: totals, the per-100 ms rates, the findings.
pub fn render(p: &Profile, findings: &[Finding]) -> String {
    let mut s = String::new();
    let total = p.total();
    let _ = writeln!(s, "exits        {total} in {:.1} ms", p.duration_ns as f64 / 1e6);
    for (k, n) in &p.by_kind {
        let _ = writeln!(s, "  {k:<12} {n:>10}  {:>5.1}%", pct(*n, total));
    }
    let mut ports: Vec<_> = p.by_port.iter().collect();
    ports.sort_by(|a, b| b.1.cmp(a.1));
    for (port, n) in ports.iter().take(8) {
        let _ = writeln!(
            s,
            "  port {port:#06x} {:<10} {n:>10}  {:>5.1}%",
            device_of_port(**port),
            pct(**n, total)
        );
    }
    if p.duration_ns > 0 && !p.windows.is_empty() {
        let mut rates: Vec<u64> = p.windows.iter().map(|n| n * (1_000_000_000 / WINDOW_NS)).collect();
        rates.sort_unstable();
        let _ = writeln!(
            s,
            "rate         {} windows of 100 ms: exits/s min {}, median {}, peak {}",
            rates.len(),
            rates[0],
            rates[rates.len() / 2],
            rates[rates.len() - 1]
        );
        let mut busiest: Vec<(usize, u64)> = p.windows.iter().copied().enumerate().collect();
        busiest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for (i, n) in busiest.iter().take(5) {
            let _ = writeln!(s, "  at {:>8} ms  {:>10} exits/s", *i as u64 * 100, n * 10);
        }
    } else {
        let _ = writeln!(s, "rate         unknown (no time samples)");
    }
    if p.landings > 0 {
        let _ = write!(s, "landings     {} ({} keyframes)", p.landings, p.keyframes);
        if let Some(h) = p.search_hits {
            let _ = write!(s, " ({h} breakpoint hits)");
        }
        s.push('\n');
    }
    if findings.is_empty() {
        let _ = writeln!(s, "findings     none above the thresholds");
    } else {
        let _ = writeln!(s, "findings");
        for f in findings {
            let _ = writeln!(s, "  [{:?}] {}", f.severity, f.what);
            let _ = writeln!(s, "      -> {}", f.recommendation);
        }
    }
    s
}

/// `n` events and their bytes, "3 rng events, 24 bytes".
fn logged(what: &str, l: &Logged) -> String {
    let s = if l.events == 1 { "" } else { "s" };
    format!("{} {what} event{s}, {} bytes", l.events, l.bytes)
}

/// What a disk is, from its identity in the header.
fn describe_disk(d: &nyx_vmm::disk::DiskIdentity) -> String {
    let mut s = format!("disk {} {:?}", d.id.escape_debug(), d.path);
    if d.sha256.is_empty() {
        s.push_str(if d.read_only { ", read-only" } else { ", read-write" });
        s.push_str(", not hashed (a plain run)");
        return s;
    }
    let sha: String = d.sha256.chars().take(16).collect();
    let _ = write!(
        s,
        ", {} bytes, {}, sha256 {}…, ",
        d.size,
        if d.read_only { "read-only" } else { "read-write" },
        sha.escape_debug()
    );
    s.push_str(if d.embedded {
        "embedded (the trace holds its reads)"
    } else {
        "not embedded (a replay needs the image)"
    });
    s
}

/// The PCI section: the host bridge and each function of `functions`
/// (or why they are unknown), with what a trace logged for them when
/// `input` is given.
pub fn render_pci(functions: Result<&[PciFunctionConfig], &str>, input: Option<&DeviceInput>) -> String {
    let mut s = String::new();
    let (hv, hd) = nyx_devices::pci::HOST_BRIDGE_IDS;
    let functions = match functions {
        Ok(f) => f,
        Err(why) => {
            let _ = writeln!(
                s,
                "pci          00:00.0 {hv:04x}:{hd:04x} host bridge; functions unknown: {why}"
            );
            return s;
        }
    };
    match functions.len() {
        0 => {
            let _ = writeln!(
                s,
                "pci          00:00.0 {hv:04x}:{hd:04x} host bridge, no functions beyond it"
            );
        }
        n => {
            let plural = if n == 1 { "" } else { "s" };
            let _ = writeln!(
                s,
                "pci          00:00.0 {hv:04x}:{hd:04x} host bridge and {n} function{plural}"
            );
        }
    }
    for (i, f) in functions.iter().enumerate() {
        let slot = usize::from(FIRST_PCI_SLOT) + i;
        let (vendor, device) = f.pci_ids();
        let what = match f {
            PciFunctionConfig::Disk(d) => describe_disk(d),
            PciFunctionConfig::Rng => match input {
                Some(i) => logged("rng", &i.rng),
                None => "entropy from the host".into(),
            },
            PciFunctionConfig::Console => {
                let mut w = "backend not in the machine description".to_string();
                if let Some(i) = input {
                    let _ = write!(w, "; {}", logged("console-input", &i.console_input));
                }
                w
            }
            PciFunctionConfig::Net(mac) => {
                let mac = mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
                let mut w = format!("MAC {mac}");
                if let Some(i) = input {
                    let _ = write!(w, "; {}", logged("net-input", &i.net_input));
                }
                w
            }
        };
        let _ = writeln!(
            s,
            "  {slot:02x}:{:02x}.0 {vendor:04x}:{device:04x} {:<15} {what}",
            0,
            f.name()
        );
    }
    let embedded = functions
        .iter()
        .filter(|f| matches!(f, PciFunctionConfig::Disk(d) if d.embedded))
        .count();
    if let Some(i) = input.filter(|i| embedded > 0 || i.disk_read.events > 0) {
        let plural = if embedded == 1 { "" } else { "s" };
        let _ = writeln!(
            s,
            "  disk reads   {} of the {embedded} embedded disk{plural}",
            logged("disk-read", &i.disk_read)
        );
    }
    s
}

/// `nyx report TRACE`.
pub fn report_trace(path: &Path) -> Result<String, ReportError> {
    let mut r = TraceReader::open(path).map_err(trace_error(path))?;
    let pci = MachineConfig::from_bytes(&r.header().machine_config)
        .map(|c| c.pci)
        .map_err(|e| format!("the header's machine configuration: {e}"));
    let p = profile_trace(&mut r, path)?;
    let functions = pci.as_deref().map_err(String::as_str);
    Ok(render_pci(functions, p.device_input.as_ref()) + &render(&p, &analyze(&p, &Thresholds::default())))
}

/// `nyx report --api SOCK`: samples the machine's metrics `windows` times,
/// 100 ms apart.
pub fn report_live(sock: &Path, windows: usize) -> Result<String, ReportError> {
    let mut samples = Vec::with_capacity(windows + 1);
    for i in 0..=windows {
        if i > 0 {
            std::thread::sleep(std::time::Duration::from_nanos(WINDOW_NS));
        }
        samples.push(crate::api::fetch_metrics(sock).map_err(ReportError::Api)?);
    }
    let p = profile_samples(&samples);
    let pci = crate::api::fetch_pci(sock);
    let functions = pci.as_deref().map_err(String::as_str);
    Ok(render_pci(functions, None) + &render(&p, &analyze(&p, &Thresholds::default())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nyx_vmm::events::ExitRecord;
    use nyx_vmm::metrics::VmMetrics;
    use proptest::prelude::*;

    fn uart_heavy() -> Profile {
        let mut p = Profile::default();
        for i in 0..1000 {
            p.add_exit(ExitKind::PioIn, 0x3fd, i / 100);
            if i % 10 == 0 {
                p.add_exit(ExitKind::PioOut, 0x3f8, i / 100);
            }
        }
        p.add_exit(ExitKind::Hlt, 0, 9);
        p.duration_ns = 10 * WINDOW_NS;
        p
    }

    #[test]
    fn uart_polling_is_the_hot_spot() {
        let f = analyze(&uart_heavy(), &Thresholds::default());
        assert_eq!(f[0].severity, Severity::Critical);
        assert!(
            f[0].what.starts_with("device uart: 100% of exits (1100 of 1101)"),
            "{f:?}"
        );
        let lsr = f.iter().find(|x| x.what.starts_with("port 0x3fd (uart)")).unwrap();
        assert!(lsr.recommendation.contains("THRE"), "{lsr:?}");
        // 0x3f8 has 9% of exits: below half the threshold, not reported.
        assert!(!f.iter().any(|x| x.what.contains("0x3f8")));
    }

    #[test]
    fn thresholds_decide() {
        let p = uart_heavy();
        let lax = Thresholds {
            port_share: 2.0,
            ..Thresholds::default()
        };
        assert!(analyze(&p, &lax).is_empty());
        let strict = Thresholds { exit_rate: 10.0, ..lax };
        let f = analyze(&p, &strict);
        assert_eq!(f.len(), 1);
        assert!(f[0].what.contains("exits/s"), "{f:?}");
    }

    #[test]
    fn hits_per_landing_count_only_searched_landings() {
        let p = Profile {
            by_kind: BTreeMap::from([("hlt".to_string(), 1000)]),
            landings: 10,
            keyframes: 8,
            search_hits: Some(300),
            ..Profile::default()
        };
        let f = analyze(&p, &Thresholds::default());
        let hits = f.iter().find(|x| x.what.contains("breakpoint hits per landing"));
        let hits = hits.unwrap_or_else(|| panic!("{f:?}"));
        assert!(
            hits.what
                .contains("150 breakpoint hits per landing (300 for 2 searched landings)"),
            "{f:?}"
        );
        let all_keyframes = Profile { keyframes: 10, ..p };
        let f = analyze(&all_keyframes, &Thresholds::default());
        assert!(!f.iter().any(|x| x.what.contains("per landing")), "{f:?}");
    }

    #[test]
    fn live_samples_become_windows() {
        let m = VmMetrics::new();
        let rec = |addr| ExitRecord {
            kind: ExitKind::PioIn,
            addr,
            size: 1,
            data: 0,
            rip: 0,
        };
        m.exit_ns(&rec(0x3fd), 10);
        let mut samples = vec![m.snapshot_now()];
        for _ in 0..30 {
            m.exit_ns(&rec(0x3fd), 10);
        }
        samples.push(m.snapshot_now());
        m.exit_ns(&rec(0x1234), 200_000);
        samples.push(m.snapshot_now());
        let p = profile_samples(&samples);
        assert_eq!(p.windows, vec![30, 1]);
        assert_eq!(p.by_port.get(&0x3fd), Some(&30));
        assert_eq!(p.worst_p99, Some(("pio-in".into(), 262_144)));
        let f = analyze(&p, &Thresholds::default());
        assert!(f.iter().any(|x| x.what.contains("p99")), "{f:?}");
        assert!(f.iter().any(|x| x.what.contains("no device decodes")), "{f:?}");
        let text = render(&p, &f);
        assert!(text.contains("2 windows of 100 ms"), "{text}");
    }

    fn disk(id: &str, embedded: bool) -> PciFunctionConfig {
        PciFunctionConfig::Disk(nyx_vmm::disk::DiskIdentity {
            id: id.into(),
            path: "/images/a.img".into(),
            read_only: false,
            size: 1 << 20,
            sha256: "0123456789abcdef".repeat(4),
            embedded,
        })
    }

    #[test]
    fn pci_section_lists_every_function_with_its_input() {
        let functions = [
            disk("boot", true),
            PciFunctionConfig::Rng,
            PciFunctionConfig::Console,
            PciFunctionConfig::Net([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        ];
        let input = DeviceInput {
            disk_read: Logged { events: 3, bytes: 1536 },
            rng: Logged { events: 1, bytes: 64 },
            console_input: Logged { events: 2, bytes: 5 },
            net_input: Logged { events: 4, bytes: 300 },
        };
        let text = render_pci(Ok(&functions), Some(&input));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0], "pci          00:00.0 8086:1237 host bridge and 4 functions",
            "{text}"
        );
        assert_eq!(
            lines[1],
            "  03:00.0 1af4:1042 virtio-blk      disk boot \"/images/a.img\", 1048576 bytes, read-write, \
             sha256 0123456789abcdef…, embedded (the trace holds its reads)"
        );
        assert_eq!(lines[2], "  04:00.0 1af4:1044 virtio-rng      1 rng event, 64 bytes");
        assert_eq!(
            lines[3],
            "  05:00.0 1af4:1043 virtio-console  backend not in the machine description; \
             2 console-input events, 5 bytes"
        );
        assert_eq!(
            lines[4],
            "  06:00.0 1af4:1041 virtio-net      MAC 52:54:00:12:34:56; 4 net-input events, 300 bytes"
        );
        assert_eq!(
            lines[5],
            "  disk reads   3 disk-read events, 1536 bytes of the 1 embedded disk"
        );
        assert_eq!(lines.len(), 6);
        // Live: no counts.
        let text = render_pci(Ok(&functions[1..]), None);
        assert!(text.contains("virtio-rng      entropy from the host"), "{text}");
        assert!(!text.contains("events"), "{text}");
    }

    #[test]
    fn pci_section_of_plain_and_unknown_machines() {
        let plain = PciFunctionConfig::Disk(nyx_vmm::disk::DiskIdentity {
            id: "disk0".into(),
            path: "d.img".into(),
            read_only: true,
            size: 0,
            sha256: String::new(),
            embedded: false,
        });
        let text = render_pci(Ok(&[plain, disk("b", false)]), Some(&DeviceInput::default()));
        assert!(
            text.contains("disk disk0 \"d.img\", read-only, not hashed (a plain run)"),
            "{text}"
        );
        assert!(text.contains("not embedded (a replay needs the image)"), "{text}");
        assert!(!text.contains("disk reads"), "nothing embedded, nothing read: {text}");
        assert_eq!(
            render_pci(Ok(&[]), None),
            "pci          00:00.0 8086:1237 host bridge, no functions beyond it\n"
        );
        let text = render_pci(Err("no reply"), None);
        assert!(text.contains("functions unknown: no reply"), "{text}");
    }

    proptest! {
        /// Whatever a trace header holds, the section renders.
        #[test]
        fn any_pci_list_renders(ids in proptest::collection::vec((".{0,30}", ".{0,30}", ".{0,70}", any::<u64>(), any::<bool>(), any::<bool>()), 0..40),
                                rng in any::<bool>(), events in any::<u64>()) {
            let mut functions: Vec<PciFunctionConfig> = ids
                .into_iter()
                .map(|(id, path, sha256, size, read_only, embedded)| {
                    PciFunctionConfig::Disk(nyx_vmm::disk::DiskIdentity { id, path, read_only, size, sha256, embedded })
                })
                .collect();
            if rng {
                functions.push(PciFunctionConfig::Rng);
            }
            functions.push(PciFunctionConfig::Console);
            let input = DeviceInput { rng: Logged { events, bytes: events }, ..DeviceInput::default() };
            let text = render_pci(Ok(&functions), Some(&input));
            prop_assert_eq!(text.lines().filter(|l| l.contains(":00.0 1af4:")).count(), functions.len());
        }

        #[test]
        fn any_profile_analyzes_without_panic(ports in proptest::collection::btree_map(any::<u16>(), 1u64..1000, 0..20),
                                              windows in proptest::collection::vec(0u64..10_000, 0..50),
                                              landings in 0u64..100, hits in proptest::option::of(0u64..100_000)) {
            let mut p = Profile { by_port: ports.clone(), windows, landings, search_hits: hits, ..Profile::default() };
            p.by_kind.insert("pio-in".into(), ports.values().sum::<u64>().max(1));
            p.duration_ns = p.windows.len() as u64 * WINDOW_NS;
            let f = analyze(&p, &Thresholds::default());
            for w in f.windows(2) {
                prop_assert!(w[0].severity >= w[1].severity);
            }
            let _ = render(&p, &f);
        }
    }
}
