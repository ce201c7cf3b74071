//! Helpers shared by the end-to-end tests of the `nyx` binary: the binary
//! with a clean environment, the in-tree guests, and whether KVM tests run
//! (`nyx_tests::kvm_available`: with `NYX_REQUIRE_KVM=1` an unusable
//! /dev/kvm fails the test instead of skipping it).

// Each test file uses its own subset of these.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

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
