//! The in-tree guests under `nyx run` semantics (in-process): serial output
//! byte-identical to QEMU's golden files, exit values as specified, unknown
//! ports and MMIO answered with all-ones, and an idle guest that does not
//! burn the host CPU. The guests of the modern platform (local APIC, IOAPIC,
//! HPET, ACPI) run with `Irqchip::Apic`, and so, once more, do the legacy
//! guests that take interrupts: the 8259 PIC must work beside the APICs.

use nyx_tests::{kvm_available, run_guest, run_guest_with};
use nyx_vmm::config::Irqchip;
use nyx_vmm::RunOutcome;

fn check_golden(name: &str) {
    check_golden_on(name, Irqchip::Legacy);
}

fn check_golden_on(name: &str, irqchip: Irqchip) {
    if !kvm_available() {
        return;
    }
    let e = nyx_guests::expected(name).expect("known guest");
    let run = run_guest_with(name, nyx_guests::GOLDEN_APPEND, e.input, irqchip);
    let golden = e.golden.expect("guest has a golden file");
    let got = String::from_utf8_lossy(&run.serial);
    assert_eq!(
        got,
        golden,
        "{name} on {}: serial output differs from QEMU's (outcome {:?})",
        irqchip.name(),
        run.outcome
    );
    match e.exit_value {
        Some(v) => assert_eq!(run.outcome, RunOutcome::DebugExit(v), "{name}"),
        None if e.powers_off => assert_eq!(run.outcome, RunOutcome::PowerOff, "{name}"),
        None => assert!(
            matches!(run.outcome, RunOutcome::Crashed(_)),
            "{name}: {:?}",
            run.outcome
        ),
    }
}

#[test]
fn lapic_matches_qemu() {
    check_golden_on("lapic", Irqchip::Apic);
}

#[test]
fn ioapic_matches_qemu() {
    check_golden_on("ioapic", Irqchip::Apic);
}

#[test]
fn hpet_matches_qemu() {
    check_golden_on("hpet", Irqchip::Apic);
}

#[test]
fn acpi_matches_qemu_and_powers_off() {
    check_golden_on("acpi", Irqchip::Apic);
}

#[test]
fn pmtimer_matches_qemu() {
    check_golden_on("pmtimer", Irqchip::Apic);
}

/// The TSC-deadline timer has no golden output (QEMU's TCG has no such
/// timer): the guest must pass every check of its own on the APIC platform
/// and print what QEMU prints over KVM's local APIC.
#[test]
fn tscdl_deadlines_fire_and_disarm() {
    if !kvm_available() {
        return;
    }
    let run = run_guest_with("tscdl", nyx_guests::GOLDEN_APPEND, None, Irqchip::Apic);
    let got = String::from_utf8_lossy(&run.serial);
    assert_eq!(got, nyx_guests::TSCDL_OUTPUT, "outcome {:?}", run.outcome);
    assert_eq!(run.outcome, RunOutcome::DebugExit(nyx_guests::TSCDL_EXIT));
}

/// Guests written for the 8259 PIC (and one that takes no interrupt) print
/// the same on the modern platform: the PIC is still there beside the
/// APICs, and the local APIC as the guest finds it passes its interrupts on.
#[test]
fn legacy_guests_match_qemu_on_the_apic_platform() {
    for name in ["pit", "echo", "longmode", "hello"] {
        assert!(!nyx_guests::expected(name).expect("known guest").needs_apic);
        check_golden_on(name, Irqchip::Apic);
    }
}

#[test]
fn softint_matches_qemu() {
    // int3 and int $0x30 in long mode: emulation failures on emulated KVM,
    // delivered by Nyx with the return address QEMU's CPU pushes.
    check_golden("softint");
}

#[test]
fn busyio_matches_qemu() {
    check_golden("busyio");
}

/// S3 with the RTC alarm as the wake source, resumed at the FACS waking
/// vector in real mode.
#[test]
fn s3_woken_by_the_rtc_alarm_matches_qemu() {
    check_golden_on("s3", Irqchip::Apic);
}

#[test]
fn hello_matches_qemu() {
    check_golden("hello");
}

#[test]
fn pit_matches_qemu() {
    check_golden("pit");
}

#[test]
fn longmode_matches_qemu() {
    check_golden("longmode");
}

#[test]
fn triple_fault_matches_qemu_and_crashes() {
    check_golden("triple");
}

#[test]
fn ports_matches_qemu() {
    check_golden("ports");
}

#[test]
fn echo_matches_qemu() {
    check_golden("echo");
}

/// The crash report of the triple-faulting guest names where it died.
#[test]
fn triple_fault_report_points_at_the_faulting_code() {
    if !kvm_available() {
        return;
    }
    let run = run_guest("triple", "", None);
    let RunOutcome::Crashed(report) = run.outcome else {
        panic!("triple did not crash: {:?}", run.outcome);
    };
    let text = report.to_string();
    assert!(
        !report.code.is_empty() && !report.code[0].contains("not readable"),
        "{text}"
    );
    let fault = nyx_guests::symbol(nyx_guests::TRIPLE, "triple_fault_here").expect("symbol");
    // The fault is at or just after the labelled instruction.
    assert!(
        report.cpu.rip >= u64::from(fault) && report.cpu.rip < u64::from(fault) + 16,
        "rip {:#x} vs triple_fault_here {fault:#x}\n{text}",
        report.cpu.rip
    );
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The pit guest spends most of its 50 ms in HLT: the VMM sleeps there
/// instead of spinning, so the thread's CPU time stays well below wall time.
#[test]
fn idle_guest_does_not_spin() {
    if !kvm_available() {
        return;
    }
    // Warm up (page faults of the first run are not the point).
    let _ = run_guest("hello", "", None);
    let wall = std::time::Instant::now();
    let cpu = thread_cpu_ns();
    let run = run_guest("pit", "", None);
    let cpu = thread_cpu_ns() - cpu;
    let wall = wall.elapsed().as_nanos() as u64;
    assert_eq!(run.outcome, RunOutcome::DebugExit(nyx_guests::PIT_EXIT));
    assert!(
        wall >= 50_000_000,
        "50 ticks at 1 kHz take at least 50 ms, took {wall} ns"
    );
    assert!(
        cpu * 2 < wall,
        "vCPU thread used {cpu} ns of CPU in {wall} ns of wall time"
    );
}
