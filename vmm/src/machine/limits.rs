//! Limits that end a run cleanly before the guest does: once its serial
//! output contains a text (`--until-output`) or once its virtual time
//! reaches a bound (`--max-guest-time`).
//!
//! Both are checked after each guest-caused exit, the positions a replay
//! reproduces exactly, so a recording stopped by a limit ends at a position
//! its replay reaches too (the replay ends there by the trace's end record,
//! not by checking again). The output is watched on its way to the serial
//! sink, before anything else sees it.

use std::io::Write;
use std::sync::{Arc, Mutex};

pub use crate::events::Limit;

/// The limits of a run; none by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// End once the serial output contains this text.
    pub until_output: Option<String>,
    /// End once virtual time reaches this many ns.
    pub max_guest_ns: Option<u64>,
}

/// What the output watch looks for and whether it has gone by.
#[derive(Debug, Default)]
pub struct WatchState {
    needle: Vec<u8>,
    /// The last `needle.len() - 1` bytes seen, for a match across writes.
    tail: Vec<u8>,
    seen: bool,
}

impl WatchState {
    /// Watches for `needle` from now on (none: stop watching).
    pub fn watch(&mut self, needle: Option<&str>) {
        self.needle = needle.unwrap_or_default().as_bytes().to_vec();
        self.tail.clear();
        self.seen = false;
    }

    /// Whether the text has gone by.
    pub fn seen(&self) -> bool {
        self.seen
    }

    fn scan(&mut self, buf: &[u8]) {
        if self.needle.is_empty() || self.seen {
            return;
        }
        let mut window = std::mem::take(&mut self.tail);
        window.extend_from_slice(buf);
        if window.windows(self.needle.len()).any(|w| w == self.needle.as_slice()) {
            self.seen = true;
            return;
        }
        let keep = (self.needle.len() - 1).min(window.len());
        window.drain(..window.len() - keep);
        self.tail = window;
    }
}

/// A serial sink that passes everything through to `inner` and notes in a
/// shared [`WatchState`] when the text it watches for has gone by.
pub struct OutputWatch {
    inner: Box<dyn Write + Send>,
    state: Arc<Mutex<WatchState>>,
}

impl OutputWatch {
    /// Watches what goes to `inner` as `state` says.
    pub fn new(inner: Box<dyn Write + Send>, state: Arc<Mutex<WatchState>>) -> Self {
        OutputWatch { inner, state }
    }
}

impl Write for OutputWatch {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.state.lock().unwrap_or_else(|e| e.into_inner()).scan(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Parses a duration such as `10s`, `250ms`, `1.5s`, `2m`, `800us`, `5000ns`
/// (a number without a unit is seconds) into ns.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: f64 = match unit.trim() {
        "" | "s" => 1e9,
        "ms" => 1e6,
        "us" | "µs" => 1e3,
        "ns" => 1.0,
        "m" | "min" => 60e9,
        "h" => 3600e9,
        other => return Err(format!("unknown unit {other:?} in {s:?}: use ns, us, ms, s, m or h")),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: write a number and a unit, such as 10s or 250ms"))?;
    let ns = v * scale;
    if !ns.is_finite() || ns < 1.0 || ns > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range: give at least 1ns"));
    }
    Ok(ns as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn feed(needle: &str, chunks: &[&[u8]]) -> (bool, Vec<u8>) {
        let sink = Sink::default();
        let state = Arc::new(Mutex::new(WatchState::default()));
        state.lock().unwrap().watch(Some(needle));
        let mut w = OutputWatch::new(Box::new(sink.clone()), state.clone());
        for c in chunks {
            w.write_all(c).unwrap();
        }
        let out = sink.0.lock().unwrap().clone();
        let seen = state.lock().unwrap().seen();
        (seen, out)
    }

    #[test]
    fn finds_text_split_over_writes() {
        let (seen, out) = feed("Freeing", &[b"x F", b"re", b"e", b"ing y"]);
        assert!(seen);
        assert_eq!(out, b"x Freeing y");
    }

    #[test]
    fn does_not_match_a_near_miss() {
        assert!(!feed("abc", &[b"ab", b"xc", b"abd"]).0);
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("10s"), Ok(10_000_000_000));
        assert_eq!(parse_duration("250ms"), Ok(250_000_000));
        assert_eq!(parse_duration("1.5s"), Ok(1_500_000_000));
        assert_eq!(parse_duration("2m"), Ok(120_000_000_000));
        assert_eq!(parse_duration("3"), Ok(3_000_000_000));
        assert!(parse_duration("ten seconds").is_err());
        assert!(parse_duration("5 fortnights").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("").is_err());
    }

    proptest! {
        #[test]
        fn any_split_of_an_output_containing_the_text_matches(
            pre in proptest::collection::vec(any::<u8>(), 0..40),
            post in proptest::collection::vec(any::<u8>(), 0..40),
            cuts in proptest::collection::vec(0usize..100, 0..6),
        ) {
            let needle = "login:";
            let mut all = pre.clone();
            all.extend_from_slice(needle.as_bytes());
            all.extend_from_slice(&post);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (all.len() + 1)).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut at = 0;
            for c in cuts {
                chunks.push(&all[at..c]);
                at = c;
            }
            chunks.push(&all[at..]);
            let (seen, out) = feed(needle, &chunks);
            prop_assert!(seen);
            prop_assert_eq!(out, all);
        }

        #[test]
        fn output_without_the_text_never_matches(data in proptest::collection::vec(0u8..b'a', 0..200)) {
            // Bytes below 'a' cannot spell the lower-case needle.
            prop_assert!(!feed("nyx", &[&data]).0);
        }

        #[test]
        fn parse_duration_never_panics(s in "\\PC{0,12}") {
            let _ = parse_duration(&s);
        }
    }
}
