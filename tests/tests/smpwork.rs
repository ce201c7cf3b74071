//! A fixed amount of work split among several vCPUs: the `smpwork` guest
//! starts as many APs as CPUID leaf 1 says there are CPUs and each CPU
//! sums its share of the work. With 4 vCPUs its output matches QEMU's
//! `-smp 4` golden; with 1 and 2 it says how many CPUs it used and prints
//! the same result line.

use std::time::{Duration, Instant};

use nyx_tests::{kvm_available, Capture};
use nyx_vmm::config::Irqchip;
use nyx_vmm::{MachineBuilder, RunOutcome};

/// Runs `smpwork` with `cpus` vCPUs; its outcome, COM1 output and wall
/// time of the run.
fn run_smpwork(cpus: usize) -> (RunOutcome, String, Duration) {
    let out = Capture::default();
    let mut m = MachineBuilder::new()
        .memory(nyx_guests::MEM_MIB)
        .kernel_image("smpwork", nyx_guests::SMPWORK.to_vec())
        .cmdline(nyx_guests::GOLDEN_APPEND)
        .irqchip(Irqchip::Apic)
        .cpus(cpus)
        .serial_out(Box::new(out.clone()))
        .build()
        .expect("building the smpwork machine");
    assert_eq!(m.cpus(), cpus);
    let start = Instant::now();
    let outcome = m.run().expect("running smpwork");
    let took = start.elapsed();
    (outcome, String::from_utf8_lossy(&out.bytes()).into_owned(), took)
}

/// The line of `serial` starting with the result prefix.
fn result_line(serial: &str) -> &str {
    serial
        .lines()
        .find(|l| l.starts_with(nyx_guests::SMPWORK_RESULT_PREFIX))
        .unwrap_or_else(|| panic!("no result line in:\n{serial}"))
}

#[test]
fn the_result_is_the_same_with_1_2_and_4_vcpus_and_4_match_qemu() {
    if !kvm_available() {
        return;
    }
    let e = nyx_guests::expected("smpwork").expect("known guest");
    let golden = e.golden.expect("smpwork has a golden file");
    let want = format!(
        "{}{:016x}",
        nyx_guests::SMPWORK_RESULT_PREFIX,
        nyx_guests::smpwork_sum(0..nyx_guests::SMPWORK_ITERS)
    );
    assert_eq!(result_line(golden), want);
    let mut times = Vec::new();
    for cpus in [1, 2, 4] {
        let (outcome, serial, took) = run_smpwork(cpus);
        assert_eq!(
            outcome,
            RunOutcome::DebugExit(nyx_guests::SMPWORK_EXIT),
            "{cpus} vCPUs:\n{serial}"
        );
        assert!(serial.starts_with(&format!("smpwork: cpus {cpus}\n")), "{serial}");
        assert_eq!(result_line(&serial), want, "{cpus} vCPUs");
        if cpus == nyx_guests::SMPWORK_CPUS as usize {
            assert_eq!(serial, golden);
        }
        times.push((cpus, took));
    }
    // Not asserted (the host's cores may be busy): the speedup.
    eprintln!("smpwork run times by vCPUs: {times:?}");
}
