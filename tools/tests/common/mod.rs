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
use std::time::Duration;

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
