//! What the guest's `cpuid` answers is the machine's CPUID table, for each
//! CPU model, in a plain run and under record and replay: on hardware KVM
//! because KVM applies the table, on an emulated KVM because Nyx patches
//! `cpuid` and answers it from the table.

use nyx_tests::{kvm_available, Capture};
use nyx_vmm::cpu_model::CpuModel;
use nyx_vmm::cpuid::{lookup, CpuidEntry};
use nyx_vmm::{MachineBuilder, RunOutcome};

/// The `(leaf, subleaf, register index, value)` lines the cpuid guest printed.
fn answers(serial: &[u8]) -> Vec<(u32, u32, usize, u32)> {
    let text = String::from_utf8_lossy(serial);
    let num = |s: &str| match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let reg = ["eax", "ebx", "ecx", "edx"]
                .iter()
                .position(|r| Some(r) == f.get(2))
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            (
                num(f[0]).unwrap(),
                num(f[1]).unwrap(),
                reg,
                u32::from_str_radix(f[3], 16).unwrap(),
            )
        })
        .collect()
}

/// What a 32-bit guest with CR4 = 0 must see with `table`.
fn check(table: &[CpuidEntry], serial: &[u8], what: &str) {
    let got = answers(serial);
    assert_eq!(got.len(), 9, "{what}: {}", String::from_utf8_lossy(serial));
    for (leaf, sub, reg, value) in got {
        let want = lookup(table, leaf, sub, 0, 1)[reg];
        assert_eq!(value, want, "{what}: cpuid {leaf:#x}.{sub} register {reg}");
    }
}

#[test]
fn the_guest_sees_the_models_table_in_a_plain_run() {
    if !kvm_available() {
        return;
    }
    for model in CpuModel::ALL {
        let out = Capture::default();
        let mut m = MachineBuilder::new()
            .kernel_image("cpuid", nyx_guests::CPUID.to_vec())
            .cpu_model(model)
            .serial_out(Box::new(out.clone()))
            .build()
            .unwrap();
        assert_eq!(m.run().unwrap(), RunOutcome::DebugExit(nyx_guests::CPUID_EXIT));
        check(m.cpuid(), &out.bytes(), model.name());
        if model == CpuModel::Baseline {
            // No XSAVE, POPCNT or leaf-7 features, whatever the host has.
            let l1_ecx = lookup(m.cpuid(), 1, 0, 0, 1)[2];
            assert_eq!(l1_ecx & ((1 << 26) | (1 << 23)), 0);
            assert_eq!(lookup(m.cpuid(), 7, 0, 0, 1)[1], 0);
        }
    }
}

#[test]
fn the_guest_sees_the_trace_table_in_a_recording_and_its_replay() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Capture::default();
    let rec = nyx_recorder::record_image(
        nyx_recorder::RecordOptions {
            cpus: 1,
            out: dir.path().join("cpuid.nyxtrace"),
            kernel: "cpuid".into(),
            kernel_name: None,
            initrd: None,
            cmdline: String::new(),
            mem_mib: 64,
            serial_in: nyx_vmm::SerialIn::None,
            serial_out: Some(Box::new(out.clone())),
            kvm_path: nyx_tests::kvm_device(),
            verify: Default::default(),
            landings: nyx_recorder::LandingPolicy::Auto,
            cpu: CpuModel::Host,
            irqchip: Default::default(),
            pci: Default::default(),
        },
        "cpuid".into(),
        nyx_guests::CPUID.to_vec(),
        None,
    )
    .unwrap();
    assert_eq!(rec.outcome, RunOutcome::DebugExit(nyx_guests::CPUID_EXIT));
    let r = nyx_trace::TraceReader::open(&rec.path).unwrap();
    let config = nyx_vmm::config::MachineConfig::from_bytes(&r.header().machine_config).unwrap();
    assert_eq!(config.cpu_model, "host");
    check(&config.cpuid, &out.bytes(), "recording");

    let replayed = Capture::default();
    let rep = nyx_replayer::replay(
        &rec.path,
        nyx_replayer::ReplayOptions {
            serial_out: Some(Box::new(replayed.clone())),
            kvm_path: nyx_tests::kvm_device(),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(matches!(rep.end, nyx_replayer::ReplayEnd::Complete { .. }));
    assert_eq!(replayed.bytes(), out.bytes());
}
