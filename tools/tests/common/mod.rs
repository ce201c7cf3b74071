//! Helpers shared by the end-to-end tests of the `nyx` binary: the binary
//! with a clean environment, the in-tree guests, and whether KVM tests run
//! (`nyx_tests::kvm_available`: with `NYX_REQUIRE_KVM=1` an unusable
//! /dev/kvm fails the test instead of skipping it).

// Each test file uses its own subset of these.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

pub use nyx_tests::kvm_available;

/// The `nyx` binary, without the environment variable that would change
/// what it logs. `NYX_KVM_DEVICE` passes through: the probe and nyx open
/// the same device, so pointing it elsewhere imitates a host without KVM.
pub fn nyx() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nyx"));
    c.env_remove("NYX_LOG");
    c
}

/// The path of the in-tree guest `name`.
pub fn guest(name: &str) -> PathBuf {
    nyx_guests::path(name).unwrap_or_else(|| panic!("no in-tree guest {name}"))
}

/// Reads `r` line by line on a thread of its own; each line arrives on the
/// receiver (a child's stderr or stdout, read without blocking the test).
pub fn lines_of(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// The port of the first line from `lines` (waiting up to `within`), the
/// line in which nyx says where it listens ("... on 127.0.0.1:PORT").
pub fn listening_port(lines: &mpsc::Receiver<String>, within: Duration) -> u16 {
    let line = lines.recv_timeout(within).expect("nyx says where it listens");
    line.rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"))
}

/// Collects what a reader (a pipe, a socket, a terminal) yields, on a
/// thread of its own; [`Captured::wait_for`] waits up to the bound it was
/// made with.
#[derive(Clone)]
pub struct Captured {
    buf: Arc<Mutex<Vec<u8>>>,
    within: Duration,
}

impl Captured {
    /// Starts collecting `r`; waits on it last at most `within`.
    pub fn spawn(mut r: impl Read + Send + 'static, within: Duration) -> Self {
        let c = Captured {
            buf: Arc::default(),
            within,
        };
        let buf = c.buf.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = r.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        c
    }

    /// What was collected so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }

    /// Waits until the text contains `needle`; `what` names the reader in
    /// the failure message.
    pub fn wait_for(&self, needle: &str, what: &str) {
        let start = Instant::now();
        while !self.text().contains(needle) {
            assert!(
                start.elapsed() < self.within,
                "{what}: no {needle:?} in {:?}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
