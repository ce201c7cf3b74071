//! Run-time metrics of a machine: VM exits by kind with their handling
//! latency, port I/O by port, interrupt injections by vector, landings and
//! their search cost, trace bytes written and snapshots taken.
//!
//! The vCPU thread counts with relaxed atomic adds into fixed arrays (no
//! allocation, no lock per exit); any other thread (the control socket, the
//! Prometheus endpoint) reads a consistent-enough [`MetricsSnapshot`] at any
//! time. Latencies go into a fixed log2 histogram of nanoseconds, from which
//! min, average, max and an upper bound of the 99th percentile are read.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

use crate::events::{ExitKind, ExitRecord};

/// Every exit kind, in the order of the metrics' arrays.
pub const EXIT_KINDS: [ExitKind; ExitKind::ALL.len()] = ExitKind::ALL;

/// A kind's place in [`EXIT_KINDS`]: its position in the enum, which
/// [`ExitKind::ALL`] lists in declaration order.
fn kind_index(kind: ExitKind) -> usize {
    kind as usize
}

/// Number of latency buckets: bucket `i` holds latencies in `[2^i, 2^(i+1))`
/// ns (bucket 0 also holds 0), the last one everything above.
pub const LATENCY_BUCKETS: usize = 40;

/// The name of the device model that decodes `port` on the Nyx platform
/// ([`crate::platform::PORT_MAP`]), or `"none"`.
pub fn device_of_port(port: u16) -> &'static str {
    crate::platform::device_of_port(port).map_or("none", crate::platform::PortDevice::name)
}

/// A latency histogram that one thread writes and any thread reads.
struct Latency {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    sum_ns: AtomicU64,
    min_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Latency {
    fn new() -> Self {
        Latency {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
            min_ns: AtomicU64::new(u64::MAX),
            max_ns: AtomicU64::new(0),
        }
    }

    fn add(&self, ns: u64) {
        let b = (64 - ns.leading_zeros() as usize)
            .saturating_sub(1)
            .min(LATENCY_BUCKETS - 1);
        self.buckets[b].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
        if ns < self.min_ns.load(Relaxed) {
            self.min_ns.fetch_min(ns, Relaxed);
        }
        if ns > self.max_ns.load(Relaxed) {
            self.max_ns.fetch_max(ns, Relaxed);
        }
    }
}

/// Upper bound (ns) of the bucket that holds quantile `q` of `buckets`.
pub fn quantile_upper_ns(buckets: &[u64], q: f64) -> u64 {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return 0;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0u64;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return 1u64.checked_shl(i as u32 + 1).unwrap_or(u64::MAX);
        }
    }
    u64::MAX
}

/// The metrics of one machine. Share it with `Arc`; the vCPU thread writes.
pub struct VmMetrics {
    enabled: AtomicBool,
    exits: [AtomicU64; EXIT_KINDS.len()],
    latency: [Latency; EXIT_KINDS.len()],
    ports: Box<[AtomicU64]>,
    vectors: Box<[AtomicU64]>,
    landings: AtomicU64,
    landings_keyframe: AtomicU64,
    landing_search_hits: AtomicU64,
    landing_max_hits: AtomicU64,
    trace_bytes: AtomicU64,
    snapshots: AtomicU64,
    snapshot_ns: AtomicU64,
    snapshot_bytes: AtomicU64,
}

impl Default for VmMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for VmMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmMetrics")
            .field("enabled", &self.enabled())
            .finish_non_exhaustive()
    }
}

impl VmMetrics {
    /// Empty metrics, collecting.
    pub fn new() -> Self {
        VmMetrics {
            enabled: AtomicBool::new(true),
            exits: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: std::array::from_fn(|_| Latency::new()),
            ports: (0..=u16::MAX as usize).map(|_| AtomicU64::new(0)).collect(),
            vectors: (0..256).map(|_| AtomicU64::new(0)).collect(),
            landings: AtomicU64::new(0),
            landings_keyframe: AtomicU64::new(0),
            landing_search_hits: AtomicU64::new(0),
            landing_max_hits: AtomicU64::new(0),
            trace_bytes: AtomicU64::new(0),
            snapshots: AtomicU64::new(0),
            snapshot_ns: AtomicU64::new(0),
            snapshot_bytes: AtomicU64::new(0),
        }
    }

    /// Whether per-exit collection is on.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Relaxed)
    }

    /// Turns per-exit collection (counts, latencies, ports) on or off.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Relaxed);
    }

    /// A monotonic timestamp for [`VmMetrics::exit`], or 0 when collection
    /// is off (no clock read then).
    #[inline]
    pub fn start(&self) -> u64 {
        if self.enabled() {
            crate::kick::monotonic_ns()
        } else {
            0
        }
    }

    /// Counts a handled exit whose handling began at `started` ([`VmMetrics::start`]).
    #[inline]
    pub fn exit(&self, rec: &ExitRecord, started: u64) {
        if !self.enabled() {
            return;
        }
        let ns = crate::kick::monotonic_ns().saturating_sub(started);
        self.exit_ns(rec, ns);
    }

    /// Counts a handled exit that took `ns` to handle.
    pub fn exit_ns(&self, rec: &ExitRecord, ns: u64) {
        let i = kind_index(rec.kind);
        self.exits[i].fetch_add(1, Relaxed);
        self.latency[i].add(ns);
        if matches!(rec.kind, ExitKind::PioIn | ExitKind::PioOut) {
            if let Some(c) = self.ports.get(rec.addr as usize) {
                c.fetch_add(1, Relaxed);
            }
        }
    }

    /// Counts an interrupt injection.
    pub fn inject(&self, vector: u8) {
        if let Some(c) = self.vectors.get(usize::from(vector)) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// Counts a landing: one the recorder logged (`hits` 0) or one the
    /// replayer reached, by a search that took `hits` breakpoint hits or by
    /// restoring its keyframe. Counted whether or not per-exit collection
    /// is on (landings are rare).
    pub fn landing(&self, how: LandingHow, hits: u64) {
        self.landings.fetch_add(1, Relaxed);
        match how {
            LandingHow::Keyframe => {
                self.landings_keyframe.fetch_add(1, Relaxed);
            }
            LandingHow::Search => {
                self.landing_search_hits.fetch_add(hits, Relaxed);
                self.landing_max_hits.fetch_max(hits, Relaxed);
            }
        }
    }

    /// Counts bytes the recorder wrote to its trace.
    pub fn trace_bytes(&self, n: u64) {
        self.trace_bytes.fetch_add(n, Relaxed);
    }

    /// Counts a snapshot of `bytes` that took `ns`.
    pub fn snapshot(&self, ns: u64, bytes: u64) {
        self.snapshots.fetch_add(1, Relaxed);
        self.snapshot_ns.fetch_add(ns, Relaxed);
        self.snapshot_bytes.fetch_add(bytes, Relaxed);
    }

    /// Reads everything.
    pub fn snapshot_now(&self) -> MetricsSnapshot {
        let exits = EXIT_KINDS
            .iter()
            .zip(self.exits.iter().zip(self.latency.iter()))
            .filter_map(|(kind, (count, lat))| {
                let count = count.load(Relaxed);
                if count == 0 {
                    return None;
                }
                let buckets: Vec<u64> = lat.buckets.iter().map(|b| b.load(Relaxed)).collect();
                let measured: u64 = buckets.iter().sum();
                let min = lat.min_ns.load(Relaxed);
                Some(ExitKindMetrics {
                    kind: kind.name().to_string(),
                    count,
                    min_ns: if min == u64::MAX { 0 } else { min },
                    avg_ns: lat.sum_ns.load(Relaxed) / measured.max(1),
                    max_ns: lat.max_ns.load(Relaxed),
                    p99_ns: quantile_upper_ns(&buckets, 0.99),
                    sum_ns: lat.sum_ns.load(Relaxed),
                    buckets,
                })
            })
            .collect();
        let ports = self
            .ports
            .iter()
            .enumerate()
            .filter_map(|(p, c)| {
                let n = c.load(Relaxed);
                let port = u16::try_from(p).ok()?;
                (n > 0).then(|| PortMetrics {
                    port,
                    device: device_of_port(port).to_string(),
                    count: n,
                })
            })
            .collect();
        let vectors = self
            .vectors
            .iter()
            .enumerate()
            .filter_map(|(v, c)| {
                let n = c.load(Relaxed);
                (n > 0).then(|| (u8::try_from(v).unwrap_or(u8::MAX), n))
            })
            .collect();
        MetricsSnapshot {
            enabled: self.enabled(),
            exits,
            ports,
            vectors,
            landings: self.landings.load(Relaxed),
            landings_keyframe: self.landings_keyframe.load(Relaxed),
            landing_search_hits: self.landing_search_hits.load(Relaxed),
            landing_max_hits: self.landing_max_hits.load(Relaxed),
            trace_bytes: self.trace_bytes.load(Relaxed),
            snapshots: self.snapshots.load(Relaxed),
            snapshot_ns: self.snapshot_ns.load(Relaxed),
            snapshot_bytes: self.snapshot_bytes.load(Relaxed),
        }
    }
}

/// How a landing is stored in a trace and reached in a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandingHow {
    /// Register and memory digests: the replayer searches with a breakpoint.
    Search,
    /// A delta keyframe: the replayer restores it.
    Keyframe,
}

/// Exits of one kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitKindMetrics {
    /// The exit kind's name (`pio-in`, `hlt`, ...).
    pub kind: String,
    /// How many.
    pub count: u64,
    /// Shortest handling, ns.
    pub min_ns: u64,
    /// Average handling, ns.
    pub avg_ns: u64,
    /// Longest handling, ns.
    pub max_ns: u64,
    /// Upper bound of the 99th percentile, ns (a power of two).
    pub p99_ns: u64,
    /// Total handling time, ns.
    pub sum_ns: u64,
    /// Log2 histogram: `buckets[i]` counts latencies below `2^(i+1)` ns.
    pub buckets: Vec<u64>,
}

/// Port I/O on one port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMetrics {
    /// The port.
    pub port: u16,
    /// The device that decodes it ([`device_of_port`]).
    pub device: String,
    /// Reads and writes.
    pub count: u64,
}

/// Everything [`VmMetrics`] holds, at one moment; only nonzero entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsSnapshot {
    /// Whether per-exit collection was on.
    pub enabled: bool,
    /// Exits by kind.
    pub exits: Vec<ExitKindMetrics>,
    /// Port I/O by port.
    pub ports: Vec<PortMetrics>,
    /// Interrupt injections by vector.
    pub vectors: Vec<(u8, u64)>,
    /// Landings the recorder logged or the replayer reached, all kinds.
    pub landings: u64,
    /// Of those, landings stored as (or restored from) a delta keyframe;
    /// the others are searched.
    #[serde(default)]
    pub landings_keyframe: u64,
    /// Breakpoint hits spent finding searched landings.
    pub landing_search_hits: u64,
    /// Most hits for one landing.
    pub landing_max_hits: u64,
    /// Bytes the recorder wrote to its trace.
    pub trace_bytes: u64,
    /// Snapshots taken.
    pub snapshots: u64,
    /// Time spent taking them, ns.
    pub snapshot_ns: u64,
    /// Their total size, bytes.
    pub snapshot_bytes: u64,
}

impl MetricsSnapshot {
    /// All guest-caused exits.
    pub fn total_exits(&self) -> u64 {
        self.exits.iter().map(|e| e.count).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(kind: ExitKind, addr: u64) -> ExitRecord {
        ExitRecord {
            kind,
            addr,
            size: 1,
            data: 0,
            rip: 0,
        }
    }

    #[test]
    fn counts_exits_ports_and_latency() {
        let m = VmMetrics::new();
        m.exit_ns(&rec(ExitKind::PioOut, 0x3f8), 100);
        m.exit_ns(&rec(ExitKind::PioIn, 0x3fd), 300);
        m.exit_ns(&rec(ExitKind::PioIn, 0x3fd), 500);
        m.exit_ns(&rec(ExitKind::Hlt, 0), 7);
        m.inject(0x20);
        m.landing(LandingHow::Search, 5);
        m.landing(LandingHow::Search, 9);
        m.landing(LandingHow::Keyframe, 0);
        m.trace_bytes(100);
        m.trace_bytes(23);
        let s = m.snapshot_now();
        assert_eq!(s.total_exits(), 4);
        let pin = s.exits.iter().find(|e| e.kind == "pio-in").unwrap();
        assert_eq!((pin.count, pin.min_ns, pin.avg_ns, pin.max_ns), (2, 300, 400, 500));
        assert_eq!(pin.p99_ns, 512);
        assert_eq!(s.ports.len(), 2);
        let lsr = s.ports.iter().find(|p| p.port == 0x3fd).unwrap();
        assert_eq!((lsr.count, lsr.device.as_str()), (2, "uart"));
        assert_eq!(s.vectors, vec![(0x20, 1)]);
        assert_eq!((s.landings, s.landings_keyframe), (3, 1));
        assert_eq!((s.landing_search_hits, s.landing_max_hits), (14, 9));
        assert_eq!(s.trace_bytes, 123);
    }

    #[test]
    fn disabled_metrics_take_no_clock_and_count_nothing() {
        let m = VmMetrics::new();
        m.set_enabled(false);
        assert_eq!(m.start(), 0);
        m.exit(&rec(ExitKind::Hlt, 0), 0);
        assert_eq!(m.snapshot_now().total_exits(), 0);
        // Landings and trace bytes are not per-exit figures: still counted.
        m.landing(LandingHow::Keyframe, 0);
        m.trace_bytes(7);
        let s = m.snapshot_now();
        assert_eq!((s.landings, s.landings_keyframe, s.trace_bytes), (1, 1, 7));
    }

    #[test]
    fn ports_map_to_platform_devices() {
        assert_eq!(device_of_port(0x3f8), "uart");
        assert_eq!(device_of_port(0x43), "pit");
        assert_eq!(device_of_port(0xcfc), "pci");
        assert_eq!(device_of_port(0x1234), "none");
    }

    /// The per-exit cost of collection (clock reads, counters, histogram):
    /// `cargo test --release -p nyx-vmm --lib metrics::tests::per_exit_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement; run it in release mode"]
    fn per_exit_cost() {
        let m = VmMetrics::new();
        let r = rec(ExitKind::PioIn, 0x3fd);
        let n = 2_000_000u64;
        let t = std::time::Instant::now();
        for _ in 0..n {
            let started = m.start();
            m.exit(std::hint::black_box(&r), started);
        }
        let on = t.elapsed().as_nanos() as f64 / n as f64;
        m.set_enabled(false);
        let t = std::time::Instant::now();
        for _ in 0..n {
            let started = m.start();
            m.exit(std::hint::black_box(&r), started);
        }
        let off = t.elapsed().as_nanos() as f64 / n as f64;
        println!("metrics per exit: {on:.1} ns collecting, {off:.1} ns with --no-metrics");
        assert_eq!(m.snapshot_now().total_exits(), n);
        assert!(on < 1000.0, "{on} ns per exit");
    }

    proptest! {
        #[test]
        fn latency_summary_is_consistent(lat in proptest::collection::vec(0u64..1u64 << 39, 1..200)) {
            let m = VmMetrics::new();
            for ns in &lat {
                m.exit_ns(&rec(ExitKind::MmioRead, u64::MAX), *ns);
            }
            let s = m.snapshot_now();
            let e = &s.exits[0];
            prop_assert_eq!(e.count, lat.len() as u64);
            prop_assert_eq!(e.min_ns, *lat.iter().min().unwrap());
            prop_assert_eq!(e.max_ns, *lat.iter().max().unwrap());
            prop_assert!(e.min_ns <= e.avg_ns && e.avg_ns <= e.max_ns);
            let mut sorted = lat.clone();
            sorted.sort_unstable();
            let p99 = sorted[((sorted.len() as f64 * 0.99).ceil() as usize).max(1) - 1];
            prop_assert!(p99 < e.p99_ns, "p99 {} bound {}", p99, e.p99_ns);
            prop_assert!(e.p99_ns <= p99.max(1) * 2, "p99 {} bound {}", p99, e.p99_ns);
            prop_assert!(s.ports.is_empty());
        }
    }

    #[test]
    fn kind_index_is_the_position_in_exit_kinds() {
        for (i, k) in EXIT_KINDS.iter().enumerate() {
            assert_eq!(kind_index(*k), i, "{k:?}");
        }
    }
}
