//! Shared helpers of Nyx's integration tests: deciding whether KVM tests run,
//! running an in-tree guest in-process with its serial output captured, and
//! finding golden files. What the crates under test do: ARCHITECTURE.md at
//! the repository root.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nyx_vmm::config::Irqchip;
use nyx_vmm::{MachineBuilder, RunOutcome, SerialIn};

/// Whether KVM tests can run here: the one probe of every crate
/// ([`nyx_vmm::probe::kvm_available`]). It opens `$NYX_KVM_DEVICE` (default
/// /dev/kvm); where that fails the test is skipped with a message on stderr,
/// or, with `NYX_REQUIRE_KVM=1`, fails.
pub use nyx_vmm::probe::kvm_available;
/// The KVM device tests open: `$NYX_KVM_DEVICE`, or /dev/kvm.
pub use nyx_vmm::probe::kvm_device;

/// The test kernel fixture (`tools/scripts/build-test-kernel.sh` prints
/// both paths): `(vmlinux, initramfs)` from `NYX_TEST_VMLINUX` and
/// `NYX_TEST_INITRD`. None when they are unset (the test is skipped, with a
/// message on stderr); with `NYX_REQUIRE_TEST_KERNEL=1` unset or missing
/// files are a test failure (panic).
pub fn test_kernel() -> Option<(PathBuf, PathBuf)> {
    let require = std::env::var("NYX_REQUIRE_TEST_KERNEL").as_deref() == Ok("1");
    let paths = std::env::var_os("NYX_TEST_VMLINUX").zip(std::env::var_os("NYX_TEST_INITRD"));
    match paths.map(|(k, i)| (PathBuf::from(k), PathBuf::from(i))) {
        Some((k, i)) if k.is_file() && i.is_file() => Some((k, i)),
        Some((k, i)) => panic!(
            "NYX_TEST_VMLINUX ({}) or NYX_TEST_INITRD ({}) is not a file: build them with tools/scripts/build-test-kernel.sh",
            k.display(),
            i.display()
        ),
        None if require => panic!("NYX_REQUIRE_TEST_KERNEL=1 but NYX_TEST_VMLINUX and NYX_TEST_INITRD are not both set"),
        None => {
            eprintln!(
                "skipped: no test kernel (set NYX_TEST_VMLINUX and NYX_TEST_INITRD to the paths tools/scripts/build-test-kernel.sh prints)"
            );
            None
        }
    }
}

/// The SMP variant of the test kernel (`tools/scripts/build-smp-test-kernel.sh`
/// prints its path first): its vmlinux from `NYX_TEST_SMP_VMLINUX`. None
/// when unset (the test is skipped, with a message on stderr); with
/// `NYX_REQUIRE_TEST_KERNEL=1` unset or missing is a test failure (panic).
pub fn smp_test_kernel() -> Option<PathBuf> {
    let require = std::env::var("NYX_REQUIRE_TEST_KERNEL").as_deref() == Ok("1");
    match std::env::var_os("NYX_TEST_SMP_VMLINUX").map(PathBuf::from) {
        Some(k) if k.is_file() => Some(k),
        Some(k) => panic!(
            "NYX_TEST_SMP_VMLINUX ({}) is not a file: build it with tools/scripts/build-smp-test-kernel.sh",
            k.display()
        ),
        None if require => panic!("NYX_REQUIRE_TEST_KERNEL=1 but NYX_TEST_SMP_VMLINUX is not set"),
        None => {
            eprintln!(
                "skipped: no SMP test kernel (set NYX_TEST_SMP_VMLINUX to the first path tools/scripts/build-smp-test-kernel.sh prints)"
            );
            None
        }
    }
}

/// A `Write` that collects into a shared buffer.
#[derive(Clone, Default)]
pub struct Capture(pub Arc<Mutex<Vec<u8>>>);

impl Capture {
    /// What was written so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a guest run produced.
#[derive(Debug)]
pub struct GuestRun {
    /// How it ended.
    pub outcome: RunOutcome,
    /// COM1 output.
    pub serial: Vec<u8>,
    /// Guest-caused exits.
    pub exits: u64,
}

/// Runs the in-tree guest `name` with `cmdline` and `input` in 64 MiB on
/// the legacy platform.
pub fn run_guest(name: &str, cmdline: &str, input: Option<&[u8]>) -> GuestRun {
    run_guest_with(name, cmdline, input, Irqchip::Legacy)
}

/// Runs the in-tree guest `name` with `cmdline` and `input` in 64 MiB on
/// the platform `irqchip`.
pub fn run_guest_with(name: &str, cmdline: &str, input: Option<&[u8]>, irqchip: Irqchip) -> GuestRun {
    let image = nyx_guests::image(name).unwrap_or_else(|| panic!("no in-tree guest named {name}"));
    let out = Capture::default();
    let mut b = MachineBuilder::new()
        .memory(64)
        .kernel_image(name, image.to_vec())
        .cmdline(cmdline)
        .irqchip(irqchip)
        .serial_out(Box::new(out.clone()));
    if let Some(i) = input {
        b = b.serial_in(SerialIn::Bytes(i.to_vec()));
    }
    let mut m = b
        .build()
        .unwrap_or_else(|e| panic!("building a machine for {name}: {e}"));
    let outcome = m.run().unwrap_or_else(|e| panic!("running {name}: {e}"));
    GuestRun {
        outcome,
        serial: out.bytes(),
        exits: m.stats().exits(),
    }
}

/// Runs the in-tree guest `name` with no input, discarding its output, and
/// returns the machine's exit counters (for benchmarks).
pub fn run_guest_stats(name: &str) -> nyx_vmm::machine::ExitStats {
    let image = nyx_guests::image(name).unwrap_or_else(|| panic!("no in-tree guest named {name}"));
    let mut m = MachineBuilder::new()
        .memory(64)
        .kernel_image(name, image.to_vec())
        .serial_out(Box::new(std::io::sink()))
        .build()
        .unwrap_or_else(|e| panic!("building a machine for {name}: {e}"));
    m.run().unwrap_or_else(|e| panic!("running {name}: {e}"));
    m.stats().clone()
}

/// The path of a golden file under tests/golden.
pub fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden").join(name)
}
