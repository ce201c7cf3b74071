//! `--metrics ADDR`: serves a machine's metrics in the Prometheus text
//! format over HTTP (`GET /metrics`), encoded by `prometheus-client` from a
//! fresh [`MetricsSnapshot`] at each scrape. Loopback only unless allowed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use nyx_vmm::metrics::{MetricsSnapshot, VmMetrics};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum PromError {
    /// The address is not HOST:PORT.
    #[error("--metrics {0:?}: not an address (use 127.0.0.1:PORT)")]
    Addr(String),
    /// Not loopback.
    #[error("--metrics {0}: not a loopback address; add --metrics-allow-remote to serve other hosts")]
    Remote(SocketAddr),
    /// Cannot listen.
    #[error("--metrics {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

type Labels = Vec<(String, String)>;

fn counter_family(reg: &mut Registry, name: &str, help: &str, rows: &[(Labels, u64)]) {
    let fam = Family::<Labels, Counter>::default();
    for (l, v) in rows {
        fam.get_or_create(l).inc_by(*v);
    }
    reg.register(name, help, fam);
}

fn gauge_family(reg: &mut Registry, name: &str, help: &str, rows: &[(Labels, u64)]) {
    let fam = Family::<Labels, Gauge>::default();
    for (l, v) in rows {
        fam.get_or_create(l).set(i64::try_from(*v).unwrap_or(i64::MAX));
    }
    reg.register(name, help, fam);
}

fn plain_counter(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

/// The Prometheus text exposition of `s`.
pub fn encode_snapshot(s: &MetricsSnapshot) -> String {
    let mut reg = Registry::with_prefix("nyx");
    let kind = |k: &str| vec![("kind".to_string(), k.to_string())];
    let exits: Vec<_> = s.exits.iter().map(|e| (kind(&e.kind), e.count)).collect();
    counter_family(&mut reg, "vm_exits", "Guest-caused VM exits by kind", &exits);
    let sum: Vec<_> = s.exits.iter().map(|e| (kind(&e.kind), e.sum_ns)).collect();
    counter_family(&mut reg, "vm_exit_handling_ns", "Time spent handling exits, ns", &sum);
    for (name, help, f) in [
        (
            "vm_exit_latency_min_ns",
            "Shortest exit handling, ns",
            (|e| e.min_ns) as fn(&nyx_vmm::metrics::ExitKindMetrics) -> u64,
        ),
        ("vm_exit_latency_avg_ns", "Average exit handling, ns", |e| e.avg_ns),
        ("vm_exit_latency_max_ns", "Longest exit handling, ns", |e| e.max_ns),
        (
            "vm_exit_latency_p99_ns",
            "99th percentile of exit handling (bucket bound), ns",
            |e| e.p99_ns,
        ),
    ] {
        let rows: Vec<_> = s.exits.iter().map(|e| (kind(&e.kind), f(e))).collect();
        gauge_family(&mut reg, name, help, &rows);
    }
    let ports: Vec<_> = s
        .ports
        .iter()
        .map(|p| {
            (
                vec![
                    ("device".to_string(), p.device.clone()),
                    ("port".to_string(), format!("{:#x}", p.port)),
                ],
                p.count,
            )
        })
        .collect();
    counter_family(
        &mut reg,
        "io_operations",
        "Port I/O operations by device and port",
        &ports,
    );
    let vectors: Vec<_> = s
        .vectors
        .iter()
        .map(|(v, n)| (vec![("vector".to_string(), format!("{v:#x}"))], *n))
        .collect();
    counter_family(
        &mut reg,
        "interrupts_injected",
        "Interrupts injected by vector",
        &vectors,
    );
    let how = |h: &str| vec![("how".to_string(), h.to_string())];
    let landings = [
        (how("search"), s.landings.saturating_sub(s.landings_keyframe)),
        (how("keyframe"), s.landings_keyframe),
    ];
    counter_family(
        &mut reg,
        "landings",
        "Landings the recorder logged or the replayer reached, by how they are stored",
        &landings,
    );
    plain_counter(
        &mut reg,
        "landing_search_hits",
        "Breakpoint hits the replayer spent finding searched landings",
        s.landing_search_hits,
    );
    plain_counter(
        &mut reg,
        "trace_bytes",
        "Bytes the recorder wrote to its trace",
        s.trace_bytes,
    );
    plain_counter(&mut reg, "snapshots", "Snapshots taken", s.snapshots);
    plain_counter(
        &mut reg,
        "snapshot_ns",
        "Time spent taking snapshots, ns",
        s.snapshot_ns,
    );
    plain_counter(
        &mut reg,
        "snapshot_bytes",
        "Bytes of snapshots written",
        s.snapshot_bytes,
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

/// Parses ADDR (`HOST:PORT`, `:PORT` for 127.0.0.1) and refuses non-loopback
/// addresses unless `allow_remote`.
pub fn parse_addr(spec: &str, allow_remote: bool) -> Result<SocketAddr, PromError> {
    let addr = nyx_vmm::net::parse_addr(spec).ok_or_else(|| PromError::Addr(spec.to_string()))?;
    nyx_vmm::net::check_local(addr, allow_remote, "--metrics-allow-remote").map_err(|e| PromError::Remote(e.addr))
}

/// Listens on `addr` and serves `metrics` from a background thread; returns
/// the bound address.
pub fn serve(addr: SocketAddr, metrics: Arc<VmMetrics>) -> Result<SocketAddr, PromError> {
    let listen_err = |source| PromError::Listen {
        addr: addr.to_string(),
        source,
    };
    let listener = TcpListener::bind(addr).map_err(listen_err)?;
    let local = listener.local_addr().map_err(listen_err)?;
    std::thread::Builder::new()
        .name("nyx-metrics".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = answer(conn, &metrics);
            }
        })
        .map_err(listen_err)?;
    Ok(local)
}

/// Answers one HTTP request on `conn`.
fn answer(conn: TcpStream, metrics: &VmMetrics) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut out = conn.try_clone()?;
    let mut reader = BufReader::new(conn).take(16 * 1024);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // Skip the headers.
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = if method != "GET" {
        ("405 Method Not Allowed", "text/plain", "only GET\n".to_string())
    } else if path == "/metrics" || path == "/" {
        (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            encode_snapshot(&metrics.snapshot_now()),
        )
    } else {
        ("404 Not Found", "text/plain", "try /metrics\n".to_string())
    };
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nyx_vmm::events::{ExitKind, ExitRecord};

    fn scrape(addr: SocketAddr, path: &str) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn endpoint_serves_parseable_text() {
        let m = Arc::new(VmMetrics::new());
        let rec = ExitRecord {
            kind: ExitKind::PioIn,
            addr: 0x3fd,
            size: 1,
            data: 0x60,
            rip: 0,
        };
        for ns in [100, 200, 400] {
            m.exit_ns(&rec, ns);
        }
        m.inject(0x20);
        m.landing(nyx_vmm::metrics::LandingHow::Search, 40);
        m.landing(nyx_vmm::metrics::LandingHow::Keyframe, 0);
        m.landing(nyx_vmm::metrics::LandingHow::Keyframe, 0);
        m.trace_bytes(4096);
        let addr = serve(parse_addr(":0", false).unwrap(), m.clone()).unwrap();
        let resp = scrape(addr, "/metrics");
        let (head, body) = resp.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let lines = body.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines).unwrap();
        let find = |name: &str, label: &str, value: &str| {
            parsed
                .samples
                .iter()
                .find(|s| s.metric == name && s.labels.get(label) == Some(value))
                .map(|s| match s.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => v,
                    _ => f64::NAN,
                })
        };
        assert_eq!(find("nyx_vm_exits_total", "kind", "pio-in"), Some(3.0));
        assert_eq!(find("nyx_io_operations_total", "port", "0x3fd"), Some(3.0));
        assert_eq!(find("nyx_vm_exit_latency_max_ns", "kind", "pio-in"), Some(400.0));
        assert!(find("nyx_interrupts_injected_total", "vector", "0x20").is_some());
        assert_eq!(find("nyx_landings_total", "how", "search"), Some(1.0));
        assert_eq!(find("nyx_landings_total", "how", "keyframe"), Some(2.0));
        // prometheus-parse reads OpenMetrics `_total` samples as untyped.
        let plain = |name: &str| {
            parsed.samples.iter().find(|s| s.metric == name).map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
        };
        assert_eq!(plain("nyx_landing_search_hits_total"), Some(40.0));
        assert_eq!(plain("nyx_trace_bytes_total"), Some(4096.0));
        assert!(scrape(addr, "/nope").starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn remote_addresses_need_permission() {
        assert!(matches!(parse_addr("0.0.0.0:9100", false), Err(PromError::Remote(_))));
        assert!(parse_addr("0.0.0.0:9100", true).is_ok());
        assert!(matches!(parse_addr("nonsense", false), Err(PromError::Addr(_))));
        assert_eq!(parse_addr(":9100", false).unwrap().to_string(), "127.0.0.1:9100");
    }
}
