//! A real kernel under Nyx: the fixture Linux 6.1 (`tinyconfig`, built by
//! `tools/scripts/build-test-kernel.sh`) booted on the legacy platform
//! (`--irqchip legacy`) with nothing but `console=ttyS0 nolapic noapic`. It must get past FPU init and Linux's
//! `int3` self-test (software interrupts Nyx delivers on emulated KVM), be
//! recorded until an early console line, replay byte for byte, and let the
//! real gdb go forward and backward on the replay: to `start_kernel`, to the
//! end, back to the last write of `jiffies`, back to `start_kernel`, one
//! instruction further back.
//!
//! The same kernel on the modern platform (`--irqchip apic`, no
//! `nolapic noapic`) finds the ACPI tables, the IOAPIC, the local APIC timer
//! (calibrated against the PM timer) and the HPET, leaves jiffies for a real
//! clocksource, and replays that byte for byte.
//!
//! The fixture's SMP variant (`build-smp-test-kernel.sh`) brings up its
//! second CPU on two vCPUs in a plain run; an ignored test records that
//! and replays it byte for byte (a replay once ran on for minutes).
//!
//! The tests skip without the fixture (`NYX_TEST_VMLINUX`,
//! `NYX_TEST_INITRD`) and fail without it under `NYX_REQUIRE_TEST_KERNEL=1`;
//! they skip without KVM and fail without it under `NYX_REQUIRE_KVM=1`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::{kvm_available, lines_of, listening_port, nyx};

/// The line the recordings stop at: printed right after FPU init and the
/// `int3` self-test of `alternative_instructions`.
const UNTIL: &str = "pid_max: default";
const CMDLINE: &str = "console=ttyS0 nolapic noapic";

/// One recording of the fixture kernel for every test here.
struct Recorded {
    dir: tempfile::TempDir,
    trace: PathBuf,
    vmlinux: PathBuf,
    stdout: Vec<u8>,
    stderr: String,
    status: Option<i32>,
}

fn recorded() -> Option<&'static Recorded> {
    static REC: OnceLock<Option<Recorded>> = OnceLock::new();
    REC.get_or_init(|| {
        if !kvm_available() {
            return None;
        }
        let (vmlinux, initrd) = nyx_tests::test_kernel()?;
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("linux.nyxtrace");
        let out = nyx()
            .args(["record", "--out"])
            .arg(&trace)
            .arg("--kernel")
            .arg(&vmlinux)
            .arg("--initrd")
            .arg(&initrd)
            .args([
                "--irqchip",
                "legacy",
                "--cmdline",
                CMDLINE,
                "--mem",
                "128",
                "--until-output",
                UNTIL,
            ])
            .output()
            .unwrap();
        Some(Recorded {
            dir,
            trace,
            vmlinux,
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            status: out.status.code(),
        })
    })
    .as_ref()
}

#[test]
fn kernel_is_recorded_until_an_early_line_and_replays_byte_for_byte() {
    let Some(rec) = recorded() else { return };
    let out = String::from_utf8_lossy(&rec.stdout);
    assert_eq!(rec.status, Some(0), "{out}\n{}", rec.stderr);
    assert!(out.contains("x86/fpu:"), "FPU init: {out}");
    assert!(out.ends_with(UNTIL), "the recording stops at the text: {out}");
    assert!(!out.contains("invalid opcode"), "{out}");
    assert!(rec.stderr.contains("stopped: the output contains"), "{}", rec.stderr);
    assert_replays(&rec.trace, &out, 2);
    // The trace says why it ended.
    let info = nyx().args(["trace", "info"]).arg(&rec.trace).output().unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("stopped: the output contains"), "{info}");
}

/// A `nyx replay --gdb` process and the port it listens on.
struct Stub {
    child: std::process::Child,
    port: u16,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Stub {
    fn start(trace: &Path) -> Stub {
        let mut child = nyx()
            .arg("replay")
            .arg(trace)
            .args(["--gdb", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let rx = lines_of(child.stderr.take().unwrap());
        let port = listening_port(&rx, Duration::from_secs(60));
        Stub {
            child,
            port,
            stderr: rx,
        }
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn gdb_goes_forward_and_backward_on_a_kernel_replay() {
    let Some(rec) = recorded() else { return };
    assert_eq!(rec.status, Some(0), "{}", rec.stderr);
    let stub = Stub::start(&rec.trace);
    let cmds = [
        "set pagination off",
        "set remotetimeout 900",
        "break start_kernel",
        "continue",
        "echo @@at-start\\n",
        "p/x $pc",
        "delete",
        "continue",
        "echo @@at-end\\n",
        "monitor when",
        // The timer interrupt's last write of jiffies before the end.
        "watch *(unsigned long *)&jiffies",
        "reverse-continue",
        "echo @@watch\\n",
        "p/x $pc",
        "p *(unsigned long *)&jiffies",
        "delete",
        "break start_kernel",
        "reverse-continue",
        "echo @@back-at-start\\n",
        "p/x $pc",
        "monitor when",
        "reverse-stepi",
        "echo @@before-start\\n",
        "p/x $pc",
        "monitor when",
        "monitor info",
    ];
    let mut c = Command::new("timeout");
    c.args(["1500", "gdb", "-nx", "-batch"]);
    c.args(["-ex", &format!("target remote 127.0.0.1:{}", stub.port)]);
    for cmd in cmds {
        c.args(["-ex", cmd]);
    }
    // gdb writes monitor replies to stderr: both into one file, in order.
    let log_path = rec.dir.path().join("gdb.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    c.stdout(log_file.try_clone().unwrap()).stderr(log_file);
    c.arg(&rec.vmlinux).status().expect("run gdb (install the gdb package)");
    let text = std::fs::read_to_string(&log_path).unwrap();
    let errs: Vec<String> = stub.stderr.try_iter().collect();
    let log = format!("{text}\n--- nyx:\n{}", errs.join("\n"));
    let start = nm_symbol(&rec.vmlinux, "start_kernel");
    let section = |name: &str| -> String {
        let from = text
            .find(&format!("@@{name}"))
            .unwrap_or_else(|| panic!("no {name} in:\n{log}"));
        text[from..].lines().skip(1).take(4).collect::<Vec<_>>().join("\n")
    };
    let pc = |name: &str| -> u64 {
        let s = section(name);
        let v = s
            .lines()
            .find_map(|l| l.split("= 0x").nth(1))
            .unwrap_or_else(|| panic!("no pc after {name} in:\n{log}"));
        u64::from_str_radix(v.trim(), 16).unwrap()
    };
    assert!(text.contains("Breakpoint 1, "), "{log}");
    assert_eq!(pc("at-start"), start, "{log}");
    assert!(section("at-end").contains("at the end of the replay"), "{log}");
    // Stopped right after the instruction that wrote jiffies.
    let before_watch = &text[..text.find("@@watch").unwrap_or(0)];
    assert!(
        before_watch.contains("Old value") && before_watch.contains("New value"),
        "the watchpoint stopped at a write:\n{log}"
    );
    assert_ne!(pc("watch"), start, "{log}");
    assert_eq!(pc("back-at-start"), start, "{log}");
    let before = pc("before-start");
    assert_ne!(before, start, "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(!log.contains("re-executing the replay failed"), "{log}");
}

#[test]
fn gdb_on_a_live_kernel_has_more_breakpoints_than_debug_registers() {
    if !kvm_available() {
        return;
    }
    let Some((vmlinux, initrd)) = nyx_tests::test_kernel() else {
        return;
    };
    // Live memory is the debugger's: `break` writes int3 bytes (software
    // breakpoints), as many as wanted, and the kernel's own int3 (its
    // self-test, between arch_cpu_finalize_init and pid_idr_init) still
    // reaches the kernel.
    let mut child = nyx()
        .arg("run")
        .arg("--kernel")
        .arg(&vmlinux)
        .arg("--initrd")
        .arg(&initrd)
        .args([
            "--irqchip",
            "legacy",
            "--cmdline",
            CMDLINE,
            "--mem",
            "128",
            "--until-output",
            UNTIL,
        ])
        .args(["--gdb", "127.0.0.1:0", "--gdb-wait"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines_of(child.stderr.take().unwrap());
    let port = listening_port(&err, Duration::from_secs(60));
    let funcs = [
        "setup_arch",
        "trap_init",
        "sched_init",
        "time_init",
        "arch_cpu_finalize_init",
        "pid_idr_init",
    ];
    let mut c = Command::new("timeout");
    c.args(["600", "gdb", "-nx", "-batch", "-ex", "set remotetimeout 300"]);
    c.args(["-ex", &format!("target remote 127.0.0.1:{port}")]);
    c.args(["-ex", "break start_kernel", "-ex", "continue"]);
    for f in funcs {
        c.args(["-ex", &format!("break {f}")]);
    }
    for _ in funcs {
        c.args(["-ex", "continue"]);
    }
    c.args(["-ex", "delete", "-ex", "continue"]);
    let out = c.arg(&vmlinux).output().expect("run gdb (install the gdb package)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let mut from = 0;
    for (n, f) in funcs.iter().enumerate() {
        let hit = format!("Breakpoint {}, ", n + 2);
        let at = text[from..]
            .find(&hit)
            .unwrap_or_else(|| panic!("{f} not hit in order:\n{text}"));
        assert!(text[from + at..].lines().next().unwrap_or("").contains(f), "{text}");
        from += at + hit.len();
    }
    let status = child.wait().unwrap();
    let mut guest = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut guest).unwrap();
    assert_eq!(status.code(), Some(0), "{text}\n{guest}");
    assert!(guest.ends_with(UNTIL) && !guest.contains("invalid opcode"), "{guest}");
}

/// The patcher follows the fixture kernel's alternatives: `rdtsc_ordered()`
/// is `rdtsc` in a slot that Linux overwrites at boot with `lfence; rdtsc`
/// (or `rdtscp`) from `.altinstr_replacement`, trap included. Each such copy
/// must be known, or `udelay` spins forever on a trap taken for a port write
/// once the TSC is the delay source (`tsc_early_khz=`, or a calibration that
/// succeeds). Needs no KVM.
#[test]
fn kernel_alternatives_that_copy_patched_instructions_are_followed() {
    let Some((vmlinux, _)) = nyx_tests::test_kernel() else {
        return;
    };
    let image = std::fs::read(&vmlinux).unwrap();
    let table = nyx_vmm::patch::scan_elf(&image).unwrap();
    let lfence_rdtsc = table
        .copies()
        .iter()
        .filter(|c| c.site.kind == nyx_vmm::patch::TrapKind::Rdtsc && c.expect.starts_with(&[0x0f, 0xae, 0xe8]))
        .count();
    let rdtscp = table
        .copies()
        .iter()
        .filter(|c| c.site.kind == nyx_vmm::patch::TrapKind::Rdtscp && c.site.gpa == c.slot_gpa)
        .count();
    assert!(lfence_rdtsc >= 2, "{:#x?}", table.copies());
    assert!(rdtscp >= 2, "{:#x?}", table.copies());
    for copy in table.copies() {
        // Each slot is a site patched in place (rdtsc) or holds other code,
        // and the copy's own bytes sit inside the kernel's text.
        assert!(
            copy.site.vaddr.is_some_and(|v| v >= 0xffff_ffff_8100_0000),
            "{copy:#x?}"
        );
        assert!(copy.site.in_replacement, "{copy:#x?}");
    }
    let replacement_sites = table.sites().iter().filter(|s| s.in_replacement).count();
    assert!(replacement_sites >= 2, "{:#x?}", table.sites());
}

/// Linux's real-mode trampoline (`real_mode_blob`, in `.init.data`, which
/// shares an executable segment with `.init.text`) is copied below 1 MiB at
/// boot and run there by each AP: a patched `cpuid` in its `verify_cpu`
/// traps where no site is, is skipped, and the AP halts as a CPU without
/// long mode (`do_boot_cpu failed(-1) to wakeup CPU#1` with a CONFIG_SMP
/// kernel). Nor is anything in `.rodata` (the vDSO image) patched. Needs
/// no KVM.
#[test]
fn kernel_data_in_executable_segments_is_not_patched() {
    let Some((vmlinux, _)) = nyx_tests::test_kernel() else {
        return;
    };
    let image = std::fs::read(&vmlinux).unwrap();
    let table = nyx_vmm::patch::scan_elf(&image).unwrap();
    let blob = nm_symbol(&vmlinux, "real_mode_blob")..nm_symbol(&vmlinux, "real_mode_blob_end");
    let rodata = nm_symbol(&vmlinux, "__start_rodata")..nm_symbol(&vmlinux, "__end_rodata");
    assert!(!blob.is_empty() && !rodata.is_empty());
    assert!(table.len() > 100, "{} sites", table.len());
    for site in table.sites() {
        let v = site.vaddr.unwrap();
        assert!(!blob.contains(&v) && !rodata.contains(&v), "{site:#x?}");
    }
}

/// The line the modern-platform recording stops at: printed after the
/// clocksource switch and the ACPI interpreter's start.
const APIC_UNTIL: &str = "pnp: PnP ACPI init";
/// `lapic=notscdeadline` makes Linux calibrate the local APIC timer (against
/// the PM timer) and `apic=verbose` makes it say so.
const APIC_CMDLINE: &str = "console=ttyS0 lapic=notscdeadline apic=verbose";

#[test]
fn kernel_on_the_modern_platform_uses_apic_hpet_and_acpi_and_replays() {
    if !kvm_available() {
        return;
    }
    let Some((vmlinux, initrd)) = nyx_tests::test_kernel() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("apic.nyxtrace");
    let rec = nyx()
        // Keyframed landings: about one recording in eight of this boot
        // has a landing (in clear_page's loop, before the first timer
        // interrupt through the local APIC) that the landing search misses
        // on the emulated KVM; restoring keyframes replays every one of
        // them, in 4 s instead of 30.
        .args(["record", "--irqchip", "apic", "--landings", "keyframe", "--out"])
        .arg(&trace)
        .arg("--kernel")
        .arg(&vmlinux)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", APIC_CMDLINE, "--mem", "128", "--until-output", APIC_UNTIL])
        // About 22 s of guest time get there; a kernel that panics instead
        // (its timer check failing) ends here rather than spinning forever.
        .args(["--max-guest-time", "120s"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&rec.stdout).into_owned();
    let err = String::from_utf8_lossy(&rec.stderr);
    assert_eq!(rec.status.code(), Some(0), "{out}\n{err}");
    assert!(out.ends_with(APIC_UNTIL), "{out}\n{err}");
    for want in [
        // The tables, from the RSDP the boot parameters point at.
        "ACPI: RSDP 0x00000000000E0000",
        "ACPI: XSDT ",
        "ACPI: FACP ",
        "ACPI: DSDT ",
        "ACPI: APIC ",
        "ACPI: HPET ",
        "ACPI: PM-Timer IO Port: 0x608",
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2 dfl dfl)",
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 9 global_irq 9 low level)",
        // The IOAPIC, with the PIT on pin 2.
        "IOAPIC[0]: apic_id 0, version 32, address 0xfec00000, GSI 0-23",
        "APIC: Switch to symmetric I/O mode setup",
        "..TIMER: vector=0x30 apic1=0 pin1=2",
        // The local APIC timer, calibrated and checked against the PM timer.
        "Using local APIC timer interrupts.",
        "..... calibration result: ",
        // The HPET and the AML interpreter.
        "hpet0: 3 comparators, 64-bit 100.000000 MHz counter",
        "ACPI: Interpreter enabled",
        "ACPI: Using IOAPIC for interrupt routing",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    for bad in ["ACPI Error", "ACPI BIOS Error", "APIC timer disabled", "invalid opcode"] {
        assert!(!out.contains(bad), "{bad:?} in:\n{out}");
    }
    let switched = out
        .lines()
        .find_map(|l| l.split("Switched to clocksource ").nth(1))
        .unwrap_or_else(|| panic!("no clocksource switch in:\n{out}"));
    assert!(!switched.contains("jiffies"), "{switched}");
    assert_replays(&trace, &out, 1);
}

/// The line the virtio recording stops at: the disk probed, its size read.
const VIRTIO_UNTIL: &str = "[vda]";

/// Ignored by default: the kernel gets to its virtio probes after about
/// 2 minutes of wall time in a release build (`nyx run`, BENCHMARKS.md),
/// and this test (a debug build recording, then replaying) took 9.5
/// minutes, a third of CI's budget. Run it with
/// `cargo test -p nyx-cli --test kernel -- --ignored kernel_finds` and the
/// fixture kernel's variables.
#[test]
#[ignore = "about 10 minutes in a debug build; run with --ignored"]
fn kernel_finds_its_virtio_disk_and_the_recording_replays() {
    if !kvm_available() {
        return;
    }
    let Some((vmlinux, initrd)) = nyx_tests::test_kernel() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("vda.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let trace = dir.path().join("virtio.nyxtrace");
    // About 2 minutes of wall time here (the PCI scan and the driver
    // probes come after the ACPI interpreter's start).
    let rec = nyx()
        .args(["record", "--landings", "keyframe", "--out"])
        .arg(&trace)
        .arg("--kernel")
        .arg(&vmlinux)
        .arg("--initrd")
        .arg(&initrd)
        .args([
            "--cmdline",
            APIC_CMDLINE,
            "--mem",
            "128",
            "--until-output",
            VIRTIO_UNTIL,
        ])
        .arg("--disk")
        .arg(&disk)
        .arg("--rng")
        .args(["--max-guest-time", "300s"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&rec.stdout).into_owned();
    let err = String::from_utf8_lossy(&rec.stderr);
    assert_eq!(rec.status.code(), Some(0), "{out}\n{err}");
    for want in [
        "ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00])",
        "PCI: MMCONFIG at [mem 0xc0000000-0xc00fffff] reserved in ACPI motherboard resources",
        "pci 0000:00:03.0: [1af4:1042] type 00 class 0x010000",
        "pci 0000:00:04.0: [1af4:1044] type 00 class 0x00ff00",
        "virtio_blk virtio0: 1/0/0 default/read/poll queues",
        "virtio_blk virtio0: [vda]",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    for bad in ["ACPI Error", "ACPI BIOS Error", "probe of", "invalid opcode"] {
        assert!(!out.contains(bad), "{bad:?} in:\n{out}");
    }
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        vec![0u8; 1 << 20],
        "the recording wrote to the image"
    );
    assert_replays(&trace, &out, 1);
}

/// Where Linux says it brought its APs up: the SMP kernel stops here.
const SMP_UP: &str = "smp: Brought up 1 node, 2 CPUs";

/// How the SMP kernel runs in these tests: two vCPUs, to [`SMP_UP`].
const SMP_ARGS: [&str; 10] = [
    "--cpus",
    "2",
    "--cmdline",
    "console=ttyS0",
    "--mem",
    "128",
    "--max-guest-time",
    "120s",
    "--until-output",
    SMP_UP,
];

/// The SMP variant of the fixture kernel on two vCPUs in a plain run (in
/// parallel): Linux starts its second CPU with INIT and start-up IPIs
/// through the MADT's local APICs.
#[test]
fn an_smp_kernel_brings_up_its_second_cpu() {
    if !kvm_available() {
        return;
    }
    let Some(vmlinux) = nyx_tests::smp_test_kernel() else {
        return;
    };
    let args = SMP_ARGS;
    let run = nyx()
        .arg("run")
        .arg("--kernel")
        .arg(&vmlinux)
        .args(args)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "{out}\n{err}");
    assert!(out.contains("Booting SMP configuration"), "{out}");
    assert!(out.ends_with(SMP_UP), "{out}\n{err}");
}

/// The same in a recording (one vCPU at a time), whose replay prints the
/// same bytes. Ignored: in one run of the whole suite in a debug build (a
/// loaded host) a replay ran on for more than 7 minutes instead of about
/// 10 s, and the trace was not kept; 2 other whole-suite runs, 5 release
/// and 3 debug replays (2 of them beside two busy loops) finished.
#[test]
#[ignore = "a replay once ran on for minutes under a loaded suite; see the comment"]
fn an_smp_kernel_recording_replays() {
    if !kvm_available() {
        return;
    }
    let Some(vmlinux) = nyx_tests::smp_test_kernel() else {
        return;
    };
    let args = SMP_ARGS;
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("smp-linux.nyxtrace");
    let rec = nyx()
        .args(["record", "--out"])
        .arg(&trace)
        .arg("--kernel")
        .arg(&vmlinux)
        .args(args)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&rec.stdout).into_owned();
    let err = String::from_utf8_lossy(&rec.stderr);
    assert_eq!(rec.status.code(), Some(0), "{out}\n{err}");
    assert!(out.ends_with(SMP_UP), "{out}\n{err}");
    let info = nyx().args(["trace", "info"]).arg(&trace).output().unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("2 vCPUs"), "{info}");
    let switches = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("switch"))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(switches > 0, "the recording switched vCPUs: {info}");
    // At most 5 minutes; a trace that does not replay is kept for study.
    let r = Command::new("timeout")
        .arg("300")
        .arg(env!("CARGO_BIN_EXE_nyx"))
        .arg("replay")
        .arg(&trace)
        .output()
        .unwrap();
    if r.status.code() != Some(0) || r.stdout != rec.stdout {
        let kept = std::env::temp_dir().join("nyx-smp-linux-unreplayed.nyxtrace");
        std::fs::copy(&trace, &kept).ok();
        panic!(
            "the replay ended with {:?} (kept the trace as {}): {}",
            r.status.code(),
            kept.display(),
            String::from_utf8_lossy(&r.stderr)
        );
    }
}

/// Replays `trace` `times` times: each prints `out` and ends with status 0.
fn assert_replays(trace: &Path, out: &str, times: usize) {
    for i in 0..times {
        let r = nyx().arg("replay").arg(trace).output().unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(String::from_utf8_lossy(&r.stdout), out, "replay {i}: {err}");
        assert_eq!(r.status.code(), Some(0), "replay {i}: {err}");
    }
}

/// The address of `name` in `elf` (its symbol table, read with `nm`).
fn nm_symbol(elf: &Path, name: &str) -> u64 {
    let out = Command::new("nm").arg(elf).output().expect("run nm (install binutils)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (addr, _, sym) = (f.next()?, f.next()?, f.next()?);
            (sym == name).then(|| u64::from_str_radix(addr, 16).ok())?
        })
        .unwrap_or_else(|| panic!("no symbol {name} in {}", elf.display()))
}
