//! The machine's virtual clock: one time sample per step of the run loop.
//!
//! Devices read time through [`nyx_devices::Clock`]. The machine's clock takes
//! at most one sample from its [`TimeSource`] per step of the run loop (the
//! handling of one exit or landing) and serves that same value to every
//! device read in the step. The source is the host's monotonic clock in a
//! plain run, the host clock with every sample logged in a recording, and
//! the log in a replay: because a sample is only taken when something
//! consumes it, the log holds exactly the values the guest could observe.

use std::sync::Mutex;

use nyx_devices::Clock;

/// A recording's host-time samples are rounded up to a multiple of this.
///
/// The guest sees time move only at exits, which come microseconds apart
/// here (and hundreds of ns apart on hardware), so the rounding changes
/// nothing it could measure between two of its reads, and time still
/// never goes backwards. What it saves is the bits of host jitter below
/// the quantum in every sample the trace stores: on a loop of RDTSCs the
/// samples alone cost 0.9-1.1 rather than 2.1 bytes each (BENCHMARKS.md). Rounding
/// up, never down, keeps a sample taken at a kick for a deadline at or
/// past the deadline.
pub const RECORD_QUANTUM_NS: u64 = 256;

/// `ns` rounded up to a multiple of [`RECORD_QUANTUM_NS`].
pub fn quantize(ns: u64) -> u64 {
    ns.div_ceil(RECORD_QUANTUM_NS).saturating_mul(RECORD_QUANTUM_NS)
}

/// The virtual TSC at virtual time `ns` for a TSC of `tsc_khz`: it starts
/// at 0 at power-on. What a patched `rdtsc` reads under record and replay,
/// and what the trace's events codec predicts such a read to be.
pub fn virtual_tsc(ns: u64, tsc_khz: u32) -> u64 {
    ((u128::from(ns) * u128::from(tsc_khz)) / 1_000_000) as u64
}

/// Where samples come from.
pub trait TimeSource: Send {
    /// A new sample of virtual time in ns; never less than the previous one.
    fn sample(&mut self) -> u64;
}

/// The host's monotonic clock, as ns since `origin`.
#[derive(Debug, Clone, Copy)]
pub struct HostTime {
    origin_ns: u64,
}

impl HostTime {
    /// Virtual time 0 is now.
    pub fn new() -> Self {
        HostTime {
            origin_ns: crate::kick::monotonic_ns(),
        }
    }

    /// Virtual time `start_ns` is now.
    pub fn starting_at(start_ns: u64) -> Self {
        HostTime {
            origin_ns: crate::kick::monotonic_ns().saturating_sub(start_ns),
        }
    }

    /// Host monotonic ns of virtual time `virt_ns`.
    pub fn host_time_of(&self, virt_ns: u64) -> u64 {
        self.origin_ns.saturating_add(virt_ns)
    }

    /// Virtual time of the host's monotonic `host_ns`.
    pub fn virt_time_of(&self, host_ns: u64) -> u64 {
        host_ns.saturating_sub(self.origin_ns)
    }
}

impl Default for HostTime {
    fn default() -> Self {
        Self::new()
    }
}

impl TimeSource for HostTime {
    fn sample(&mut self) -> u64 {
        crate::kick::monotonic_ns().saturating_sub(self.origin_ns)
    }
}

struct Inner {
    cached: Option<u64>,
    last: u64,
    source: Box<dyn TimeSource>,
}

/// The clock the devices of a machine share.
pub struct VirtualClock {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for VirtualClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = self.lock();
        f.debug_struct("VirtualClock")
            .field("cached", &i.cached)
            .field("last", &i.last)
            .finish()
    }
}

impl VirtualClock {
    /// A clock over `source`.
    pub fn new(source: Box<dyn TimeSource>) -> Self {
        VirtualClock {
            inner: Mutex::new(Inner {
                cached: None,
                last: 0,
                source,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a new step: the next read takes a new sample.
    pub fn next_step(&self) {
        self.lock().cached = None;
    }

    /// The sample the current step took, if it took one.
    pub fn cached(&self) -> Option<u64> {
        self.lock().cached
    }

    /// Puts back what [`VirtualClock::cached`] returned (a reverse debugger
    /// restoring a checkpoint taken inside a step).
    pub fn set_cached(&self, v: Option<u64>) {
        let mut i = self.lock();
        i.cached = v;
        if let Some(v) = v {
            i.last = i.last.max(v);
        }
    }

    /// The last value served, without taking a sample.
    pub fn last(&self) -> u64 {
        self.lock().last
    }

    /// Replaces the source (restoring a machine under another mode).
    pub fn set_source(&self, source: Box<dyn TimeSource>) {
        let mut i = self.lock();
        i.source = source;
        i.cached = None;
    }

    /// Sets the last value (a restored machine continues from its snapshot's time).
    pub fn set_last(&self, ns: u64) {
        let mut i = self.lock();
        i.last = ns;
        i.cached = None;
    }
}

impl Clock for VirtualClock {
    fn now_ns(&self) -> u64 {
        let mut i = self.lock();
        if let Some(v) = i.cached {
            return v;
        }
        let v = i.source.sample().max(i.last);
        i.cached = Some(v);
        i.last = v;
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counting(u64, std::sync::Arc<std::sync::atomic::AtomicU64>);

    impl TimeSource for Counting {
        fn sample(&mut self) -> u64 {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.0 += 10;
            self.0
        }
    }

    #[test]
    fn one_sample_per_step_and_only_when_read() {
        let n = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let c = VirtualClock::new(Box::new(Counting(0, n.clone())));
        assert_eq!(n.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(c.now_ns(), 10);
        assert_eq!(c.now_ns(), 10);
        c.next_step();
        c.next_step();
        assert_eq!(n.load(std::sync::atomic::Ordering::SeqCst), 1, "no read, no sample");
        assert_eq!(c.now_ns(), 20);
        assert_eq!(c.last(), 20);
    }

    struct Backwards(Vec<u64>);

    impl TimeSource for Backwards {
        fn sample(&mut self) -> u64 {
            self.0.pop().unwrap_or(0)
        }
    }

    #[test]
    fn never_goes_backwards() {
        let c = VirtualClock::new(Box::new(Backwards(vec![5, 50])));
        assert_eq!(c.now_ns(), 50);
        c.next_step();
        assert_eq!(c.now_ns(), 50);
    }

    proptest::proptest! {
        #[test]
        fn quantizing_rounds_up_to_the_quantum_and_keeps_order(a in 0u64..1 << 62, b in 0u64..1 << 62) {
            let (qa, qb) = (quantize(a), quantize(b));
            proptest::prop_assert_eq!(qa % RECORD_QUANTUM_NS, 0);
            proptest::prop_assert!(qa >= a && qa - a < RECORD_QUANTUM_NS);
            if a <= b {
                proptest::prop_assert!(qa <= qb, "rounding never puts a later sample first");
            }
        }
    }
}
