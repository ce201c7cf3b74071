//! CPU models end to end: `--cpu help` and unknown names, the fixture Linux
//! kernel booting past its FPU init with the default model and no
//! workaround options, a trace whose CPUID table claims features this host's
//! KVM lacks being refused by name, and `nyx trace info` printing how a run
//! ended as one readable line.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::{guest, kvm_available, nyx};
use nyx_vmm::config::MachineConfig;
use nyx_vmm::cpuid::CpuidEntry;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn cpu_help_lists_the_models_and_an_unknown_model_is_named() {
    let out = nyx().args(["run", "--cpu", "help"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let help = text(&out.stdout);
    for want in ["baseline", "host", "the default", "XSAVE"] {
        assert!(help.contains(want), "{want} not in {help}");
    }
    let out = nyx()
        .args(["run", "--kernel", "nowhere", "--cpu", "pentium"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("unknown CPU model \"pentium\"") && err.contains("baseline, host"),
        "{err}"
    );
    // A machine from a snapshot keeps the snapshot's model.
    let out = nyx()
        .args(["record", "--out", "x", "--from-snapshot", "s", "--cpu", "host"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap refuses the combination");
}

/// With the default model the fixture kernel gets past x86/fpu init (it
/// died at `xrstor64` when the guest saw the host's XSAVE) with nothing but
/// the console and interrupt-controller options. Nyx is stopped once the
/// line that ends FPU init shows, so the test does not depend on how far
/// the kernel gets after it.
#[test]
fn fixture_kernel_boots_past_fpu_init_with_the_default_model() {
    if !kvm_available() {
        return;
    }
    let Some((vmlinux, initrd)) = nyx_tests::test_kernel() else {
        return;
    };
    let mut child = nyx()
        .args([
            "run",
            "--mem",
            "128",
            "--cmdline",
            "console=ttyS0 nolapic noapic",
            "--kernel",
        ])
        .arg(&vmlinux)
        .arg("--initrd")
        .arg(&initrd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let mut found = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        // Linux 6.1 ends x86/fpu init with one of these two lines.
        if line.starts_with("x86/fpu: x87 FPU will use") || line.starts_with("x86/fpu: Enabled xstate features") {
            found = Some(line.clone());
            break;
        }
        seen.push(line);
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let line = found.unwrap_or_else(|| {
        panic!(
            "no end of FPU init in the serial output:\n{}\nstderr:\n{}",
            seen.join("\n"),
            text(&out.stderr)
        )
    });
    assert!(
        line.contains("FXSAVE"),
        "the baseline model offers no XSAVE, so Linux uses FXSAVE: {line}"
    );
    assert!(!text(&out.stderr).contains("xrstor"), "{}", text(&out.stderr));
}

/// Records the in-tree guest `name` into `dir/NAME.nyxtrace`.
fn record(dir: &Path, name: &str) -> PathBuf {
    let trace = dir.join(format!("{name}.nyxtrace"));
    let out = nyx()
        .arg("record")
        .arg("--out")
        .arg(&trace)
        .arg("--kernel")
        .arg(guest(name))
        .output()
        .unwrap();
    assert!(trace.exists(), "record {name}: {}", text(&out.stderr));
    trace
}

/// Rewrites `trace` into `out` with `edit` applied to its machine
/// configuration, every frame as it was.
fn rewrite(trace: &Path, out: &Path, edit: impl FnOnce(&mut MachineConfig)) {
    let mut r = nyx_trace::TraceReader::open(trace).unwrap();
    let mut header = r.header().clone();
    let mut config = MachineConfig::from_bytes(&header.machine_config).unwrap();
    edit(&mut config);
    header.machine_config = config.to_bytes();
    let mut w = nyx_trace::TraceWriter::create(out, &header).unwrap();
    for i in 0..r.frames().len() {
        let f = r.read_frame(i).unwrap();
        w.write_frame(f.info.kind, f.info.first_position, &f.payload).unwrap();
    }
    w.finish().unwrap();
}

fn entry_mut(table: &mut Vec<CpuidEntry>, function: u32, index: u32) -> &mut CpuidEntry {
    if !table.iter().any(|e| e.function == function && e.index == index) {
        table.push(CpuidEntry {
            function,
            index,
            flags: 0,
            eax: 0,
            ebx: 0,
            ecx: 0,
            edx: 0,
        });
    }
    table
        .iter_mut()
        .find(|e| e.function == function && e.index == index)
        .unwrap()
}

#[test]
fn a_trace_claiming_features_the_host_lacks_is_refused_by_name() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let trace = record(dir.path(), "hello");
    // The untouched trace replays.
    let out = nyx().arg("replay").arg(&trace).output().unwrap();
    assert_eq!(out.status.code(), Some(0x21), "{}", text(&out.stderr));

    let supported = nyx_vmm::cpu_model::host_supported(&nyx_tests::kvm_device()).unwrap();
    let has = |f: u32, i: u32, bit: u32| {
        supported
            .iter()
            .any(|e| e.function == f && e.index == i && e.ebx & (1 << bit) != 0)
    };
    let tampered = dir.path().join("tampered.nyxtrace");
    rewrite(&trace, &tampered, |c| {
        // A reserved bit no KVM offers, and AVX-512F where this host lacks it.
        entry_mut(&mut c.cpuid, 1, 0).ecx |= 1 << 16;
        if !has(7, 0, 16) {
            entry_mut(&mut c.cpuid, 7, 0).ebx |= 1 << 16;
        }
    });
    let out = nyx().arg("replay").arg(&tampered).output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("CPU model `baseline`"), "{err}");
    assert!(err.contains("CPUID.(0x1,0).ECX[16]"), "{err}");
    if !has(7, 0, 16) {
        assert!(err.contains("avx512f"), "{err}");
    }
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[test]
fn trace_info_prints_the_cpu_model_and_a_readable_ending() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let info = |trace: &Path| {
        let out = nyx().args(["trace", "info"]).arg(trace).output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let hello = info(&record(dir.path(), "hello"));
    assert!(hello.contains("cpu          model baseline"), "{hello}");
    assert!(hello.contains("cpu features ") && hello.contains(" sse2 "), "{hello}");
    assert!(
        hello.contains("ended        the guest wrote 0x21 to the debug-exit port (exit status 33)"),
        "{hello}"
    );
    let triple = info(&record(dir.path(), "triple"));
    let ended = triple
        .lines()
        .find(|l| l.starts_with("ended        "))
        .unwrap_or_else(|| panic!("no ending in {triple}"));
    assert!(
        ended.starts_with("ended        crashed: ") && ended.contains(" at rip 0x"),
        "{ended}"
    );
    for debug in ["CrashReport", "CpuView", "Crashed(", "gpr: ["] {
        assert!(!triple.contains(debug), "a Debug dump in {triple}");
    }
    // The dump's end event reads the same way.
    let out = nyx()
        .args(["trace", "dump", "--kind", "end"])
        .arg(dir.path().join("triple.nyxtrace"))
        .output()
        .unwrap();
    let dump = text(&out.stdout);
    assert!(
        dump.contains("end (crashed: ") && !dump.contains("CrashReport"),
        "{dump}"
    );
}

#[test]
fn a_snapshot_claiming_features_the_host_lacks_is_not_restored() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("hello.nyxsnap");
    let mut m = nyx_vmm::MachineBuilder::new()
        .kernel(guest("hello"))
        .serial_out(Box::new(std::io::sink()))
        .build()
        .unwrap();
    m.save_snapshot(&snap).unwrap();
    drop(m);
    let out = nyx().arg("restore").arg(&snap).output().unwrap();
    assert_eq!(out.status.code(), Some(0x21), "{}", text(&out.stderr));

    let mut s = nyx_vmm::snapshot::read(&snap).unwrap();
    assert_eq!(s.config.cpu_model, "baseline");
    entry_mut(&mut s.config.cpuid, 1, 0).ecx |= 1 << 16;
    let tampered = dir.path().join("tampered.nyxsnap");
    nyx_vmm::snapshot::write(
        &tampered,
        &s.config,
        &s.kernel,
        s.initrd.as_deref(),
        &s.state,
        &s.memory,
    )
    .unwrap();
    let expect = dir.path().join("expect.txt");
    std::fs::write(&expect, "").unwrap();
    let expect = expect.to_str().unwrap();
    for args in [vec!["restore"], vec!["check", "--repeat", "1", "--expect", expect]] {
        let out = nyx().args(&args).arg(&tampered).output().unwrap();
        let err = text(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.contains("does not offer: CPUID.(0x1,0).ECX[16]"), "{args:?}: {err}");
    }
}
