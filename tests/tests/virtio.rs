//! The virtio guest (`tests/guests/virtio.S`, a small virtio 1.x PCI
//! driver) on Nyx's PCI bus with a virtio-blk disk, virtio-rng and a
//! virtio-console: its serial output, console output and disk image
//! afterwards must be QEMU's (`tests/golden/virtio.*`, made by
//! `tests/golden/regen.sh virtio`), and it must record and replay exactly
//! without the recording touching the image; a replay debugged backwards
//! writes the console's output once; a live migration mid-I/O carries the
//! disk by path (shared storage) and ends as QEMU's run did, and one whose
//! destination finds no image is refused while the source runs on. On a
//! qcow2 copy of its image the guest's output and the image's contents
//! afterwards are QEMU's too, a recording and its replay leave the qcow2
//! file byte for byte as it was, and a snapshot and `--embed-disks` work as
//! on a raw image. The console echo guest (`tests/guests/conecho.S`) reads
//! the console's input as QEMU's does, and its recording replays with no
//! input source.

use std::path::{Path, PathBuf};

use nyx_recorder::{record_image, RecordOptions};
use nyx_replayer::{replay, ReplayEnd, ReplayOptions};
use nyx_tests::{golden, Capture};
use nyx_vmm::config::{Irqchip, PciFunctionConfig, VerifyLevel};
use nyx_vmm::disk::{DiskFormat, DiskSpec};
use nyx_vmm::pci_setup::{ConsoleIo, PciSetup};
use nyx_vmm::{MachineBuilder, RunOutcome, SerialIn};

fn kvm() -> bool {
    nyx_tests::kvm_available()
}

/// A fresh copy of the guest's disk image in `dir`.
fn disk_image(dir: &Path) -> PathBuf {
    let path = dir.join("disk.img");
    std::fs::write(&path, nyx_guests::virtio_disk_image()).unwrap();
    path
}

fn sha256(path: &Path) -> String {
    nyx_vmm::disk::hash_file(path).unwrap().1
}

fn golden_text(name: &str) -> String {
    std::fs::read_to_string(golden(name)).unwrap_or_else(|e| panic!("golden {name}: {e}"))
}

/// The guest's devices: the disk at `disk`, rng, a console into `console`.
fn setup(disk: &Path, console: &Capture) -> PciSetup {
    setup_as(disk, DiskFormat::Raw, console)
}

/// [`setup`] with the disk in `format`.
fn setup_as(disk: &Path, format: DiskFormat, console: &Capture) -> PciSetup {
    PciSetup {
        disks: vec![DiskSpec {
            path: disk.to_path_buf(),
            format,
            read_only: false,
            id: Some(nyx_guests::VIRTIO_DISK_SERIAL.to_string()),
        }],
        rng: true,
        console: Some(ConsoleIo {
            out: Box::new(console.clone()),
            input: SerialIn::None,
        }),
        nets: Vec::new(),
        embed_disks: false,
    }
}

/// A plain-run machine of the virtio guest with its devices.
fn virtio_machine(disk: &Path, serial: &Capture, console: &Capture) -> nyx_vmm::Machine {
    virtio_machine_with(serial, setup(disk, console))
}

/// A plain-run machine of the virtio guest with the devices `pci`.
fn virtio_machine_with(serial: &Capture, pci: PciSetup) -> nyx_vmm::Machine {
    MachineBuilder::new()
        .memory(64)
        .kernel_image("virtio", nyx_guests::VIRTIO.to_vec())
        .cmdline("nyx-test arg=1")
        .irqchip(Irqchip::Apic)
        .serial_out(Box::new(serial.clone()))
        .pci(pci)
        .build()
        .unwrap()
}

#[test]
fn the_virtio_guest_matches_qemu_byte_for_byte() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_image(dir.path());
    let (serial, console) = (Capture::default(), Capture::default());
    let mut m = virtio_machine(&disk, &serial, &console);
    let outcome = m.run().unwrap();
    let got = String::from_utf8_lossy(&serial.bytes()).into_owned();
    assert_eq!(got, golden_text("virtio.out"), "serial output differs from QEMU's");
    assert_eq!(outcome, RunOutcome::DebugExit(nyx_guests::VIRTIO_EXIT));
    assert_eq!(console.bytes(), golden_text("virtio.console").into_bytes());
    assert_eq!(
        sha256(&disk),
        golden_text("virtio.img.sha256").trim(),
        "the image after a plain run differs from QEMU's image afterwards"
    );
}

fn record(dir: &Path, disk: &Path, console: &Capture) -> (PathBuf, Vec<u8>) {
    record_with(dir, disk, console, false)
}

fn record_with(dir: &Path, disk: &Path, console: &Capture, embed: bool) -> (PathBuf, Vec<u8>) {
    record_pci(dir, setup(disk, console), embed)
}

fn record_pci(dir: &Path, mut pci: PciSetup, embed: bool) -> (PathBuf, Vec<u8>) {
    let serial = Capture::default();
    pci.embed_disks = embed;
    let rec = record_image(
        RecordOptions {
            cpus: 1,
            out: dir.join("virtio.nyxtrace"),
            kernel: PathBuf::from("virtio"),
            kernel_name: Some("virtio".into()),
            initrd: None,
            cmdline: "nyx-test arg=1".into(),
            mem_mib: 64,
            serial_in: SerialIn::None,
            serial_out: Some(Box::new(serial.clone())),
            kvm_path: nyx_tests::kvm_device(),
            verify: VerifyLevel::Exits,
            landings: nyx_recorder::LandingPolicy::Auto,
            cpu: Default::default(),
            irqchip: Irqchip::Apic,
            pci,
        },
        "virtio".into(),
        nyx_guests::VIRTIO.to_vec(),
        None,
    )
    .unwrap();
    assert_eq!(rec.outcome, RunOutcome::DebugExit(nyx_guests::VIRTIO_EXIT));
    (rec.path, serial.bytes())
}

fn replay_with(trace: &Path, disks: Vec<PathBuf>) -> Result<(Vec<u8>, ReplayEnd), nyx_replayer::Error> {
    let out = Capture::default();
    let r = replay(
        trace,
        ReplayOptions {
            serial_out: Some(Box::new(out.clone())),
            disks,
            ..Default::default()
        },
    )?;
    Ok((out.bytes(), r.end))
}

#[test]
fn the_virtio_guest_records_and_replays_without_touching_its_image() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_image(dir.path());
    let before = sha256(&disk);
    let console = Capture::default();
    let (trace, serial) = record(dir.path(), &disk, &console);
    assert_eq!(String::from_utf8_lossy(&serial), golden_text("virtio.out"));
    assert_eq!(console.bytes(), golden_text("virtio.console").into_bytes());
    assert_eq!(sha256(&disk), before, "the recording changed the image");

    let reader = nyx_trace::TraceReader::open(&trace).unwrap();
    let config = nyx_vmm::config::MachineConfig::from_bytes(&reader.header().machine_config).unwrap();
    match &config.pci[..] {
        [PciFunctionConfig::Disk(d), PciFunctionConfig::Rng, PciFunctionConfig::Console] => {
            assert_eq!(
                (d.id.as_str(), d.size, d.sha256.as_str()),
                ("nyx-disk0", 128 << 10, before.as_str())
            );
        }
        other => panic!("the trace lists {other:?}"),
    }
    drop(reader);

    for i in 0..3 {
        let (out, end) = replay_with(&trace, Vec::new()).unwrap_or_else(|e| panic!("replay {i}: {e}"));
        assert_eq!(out, serial, "replay {i}");
        assert!(matches!(end, ReplayEnd::Complete { .. }), "replay {i}: {end:?}");
    }
    assert_eq!(sha256(&disk), before, "a replay changed the image");

    // The image moved: named on the command line, it replays.
    let moved = dir.path().join("moved.img");
    std::fs::copy(&disk, &moved).unwrap();
    replay_with(&trace, vec![moved.clone()]).unwrap();

    // One byte changed: refused, naming the disk.
    let mut bytes = std::fs::read(&moved).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&moved, bytes).unwrap();
    let e = replay_with(&trace, vec![moved]).unwrap_err().to_string();
    assert!(
        e.contains("disk nyx-disk0") && e.contains("not the one recorded"),
        "{e}"
    );
}

/// Runs `qemu-img ARGS`; false when it is not installed (then the test
/// checks nothing, except under CI, which installs it).
fn qemu_img(args: &[&std::ffi::OsStr]) -> bool {
    match std::process::Command::new("qemu-img").args(args).output() {
        Ok(o) => {
            assert!(
                o.status.success(),
                "qemu-img {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            true
        }
        Err(e) => {
            assert!(std::env::var_os("CI").is_none(), "qemu-img: {e}");
            eprintln!("qemu-img not installed: qcow2 test skipped");
            false
        }
    }
}

/// `qemu-img convert` of `from` into `to` in format `format`.
fn convert(from: &Path, to: &Path, format: &str) -> bool {
    qemu_img(&[
        "convert".as_ref(),
        "-O".as_ref(),
        format.as_ref(),
        from.as_os_str(),
        to.as_os_str(),
    ])
}

#[test]
fn on_a_qcow2_copy_of_its_image_the_virtio_guest_matches_qemu() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = disk_image(dir.path());
    let disk = dir.path().join("disk.qcow2");
    if !convert(&raw, &disk, "qcow2") {
        return;
    }
    // Plain run, the format detected: the guest's output is QEMU's, and
    // the qcow2 image holds what QEMU's raw image held afterwards.
    let (serial, console) = (Capture::default(), Capture::default());
    let mut m = virtio_machine_with(&serial, setup_as(&disk, DiskFormat::Auto, &console));
    let outcome = m.run().unwrap();
    drop(m);
    assert_eq!(String::from_utf8_lossy(&serial.bytes()), golden_text("virtio.out"));
    assert_eq!(outcome, RunOutcome::DebugExit(nyx_guests::VIRTIO_EXIT));
    assert_eq!(console.bytes(), golden_text("virtio.console").into_bytes());
    let back = dir.path().join("back.img");
    assert!(convert(&disk, &back, "raw"));
    assert_eq!(
        sha256(&back),
        golden_text("virtio.img.sha256").trim(),
        "the qcow2 image after a plain run differs from QEMU's image afterwards"
    );
    assert!(qemu_img(&["check".as_ref(), disk.as_os_str()]));

    // Recorded and replayed: the qcow2 file never changes; the trace has
    // the virtual size and the file's hash.
    let disk = dir.path().join("rec.qcow2");
    assert!(convert(&raw, &disk, "qcow2"));
    let before = std::fs::read(&disk).unwrap();
    let console = Capture::default();
    let (trace, serial) = record_pci(dir.path(), setup_as(&disk, DiskFormat::Qcow2, &console), false);
    assert_eq!(String::from_utf8_lossy(&serial), golden_text("virtio.out"));
    assert_eq!(console.bytes(), golden_text("virtio.console").into_bytes());
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "the recording changed the qcow2 file"
    );
    let reader = nyx_trace::TraceReader::open(&trace).unwrap();
    let config = nyx_vmm::config::MachineConfig::from_bytes(&reader.header().machine_config).unwrap();
    match &config.pci[..] {
        [PciFunctionConfig::Disk(d), ..] => {
            assert_eq!((d.size, d.sha256.clone()), (128 << 10, sha256(&disk)));
        }
        other => panic!("the trace lists {other:?}"),
    }
    drop(reader);
    let (out, end) = replay_with(&trace, Vec::new()).unwrap();
    assert_eq!(out, serial);
    assert!(matches!(end, ReplayEnd::Complete { .. }), "{end:?}");
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "the replay changed the qcow2 file"
    );

    // The guest's writes made into the qcow2 file: refused, naming the disk.
    let written = dir.path().join("written.qcow2");
    assert!(convert(&dir.path().join("back.img"), &written, "qcow2"));
    let e = replay_with(&trace, vec![written]).unwrap_err().to_string();
    assert!(
        e.contains("disk nyx-disk0") && e.contains("not the one recorded"),
        "{e}"
    );
}

/// Stops the guest after `text` appeared, snapshots it, restores the
/// snapshot into a new machine and runs that to the end: the two halves of
/// the output are the golden output, and the image afterwards QEMU's.
fn snapshot_after(text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_image(dir.path());
    let (serial, console) = (Capture::default(), Capture::default());
    let mut m = virtio_machine(&disk, &serial, &console);
    m.set_limits(nyx_vmm::machine::limits::Limits {
        until_output: Some(text.to_string()),
        max_guest_ns: None,
    });
    assert!(matches!(m.run().unwrap(), RunOutcome::Limit(_)), "{text}");
    let snap = m.save_snapshot(&dir.path().join("virtio.nyxsnap")).unwrap();
    drop(m);

    let rest = Capture::default();
    let mut r = MachineBuilder::from_snapshot(&snap)
        .unwrap()
        .serial_out(Box::new(rest.clone()))
        .build()
        .unwrap();
    assert_eq!(r.run().unwrap(), RunOutcome::DebugExit(nyx_guests::VIRTIO_EXIT));
    let mut all = serial.bytes();
    all.extend(rest.bytes());
    assert_eq!(
        String::from_utf8_lossy(&all),
        golden_text("virtio.out"),
        "split at {text:?}"
    );
    assert_eq!(
        sha256(&disk),
        golden_text("virtio.img.sha256").trim(),
        "split at {text:?}"
    );
}

#[test]
fn a_snapshot_mid_io_restores_and_completes() {
    if !kvm() {
        return;
    }
    // Queues set up, MSI-X programmed, no request made yet; then after a
    // write, before its flush and read-back.
    snapshot_after("virtio-blk: capacity");
    snapshot_after("virtio-blk: write sectors 16-23");
}

#[test]
fn with_embedded_disks_the_trace_alone_replays() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_image(dir.path());
    let (trace, serial) = record_with(dir.path(), &disk, &Capture::default(), true);
    assert_eq!(String::from_utf8_lossy(&serial), golden_text("virtio.out"));
    std::fs::remove_file(&disk).unwrap();
    for i in 0..2 {
        let (out, end) = replay_with(&trace, Vec::new()).unwrap_or_else(|e| panic!("replay {i}: {e}"));
        assert_eq!(out, serial, "replay {i}");
        assert!(matches!(end, ReplayEnd::Complete { .. }), "replay {i}: {end:?}");
    }
    // Every read is in the trace: the guest's five successful reads (the
    // past-the-end one never reaches the disk).
    let mut r = nyx_trace::TraceReader::open(&trace).unwrap();
    let mut reads = 0;
    for i in 0..r.frames().len() {
        if r.frames()[i].kind == nyx_trace::FrameKind::Events {
            let events: Vec<nyx_vmm::events::Event> = nyx_vmm::events::read_events(&mut r, i).unwrap();
            reads += events
                .iter()
                .filter(|e| matches!(e, nyx_vmm::events::Event::DiskRead(_)))
                .count();
        }
    }
    assert_eq!(reads, 3, "reads of sectors 0-7, 16-23 and 32-39");
}

#[test]
fn a_qcow2_disk_snapshots_and_embeds_as_a_raw_one_does() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = disk_image(dir.path());
    let disk = dir.path().join("disk.qcow2");
    if !convert(&raw, &disk, "qcow2") {
        return;
    }
    // A plain run's snapshot after a write: the restore finds the qcow2
    // image by path (and checks its virtual size), and the run ends with
    // QEMU's image.
    let (serial, console) = (Capture::default(), Capture::default());
    let mut m = virtio_machine_with(&serial, setup_as(&disk, DiskFormat::Qcow2, &console));
    m.set_limits(nyx_vmm::machine::limits::Limits {
        until_output: Some("virtio-blk: write sectors 16-23".to_string()),
        max_guest_ns: None,
    });
    assert!(matches!(m.run().unwrap(), RunOutcome::Limit(_)));
    let snap = m.save_snapshot(&dir.path().join("virtio.nyxsnap")).unwrap();
    drop(m);
    let rest = Capture::default();
    let mut r = MachineBuilder::from_snapshot(&snap)
        .unwrap()
        .serial_out(Box::new(rest.clone()))
        .build()
        .unwrap();
    assert_eq!(r.run().unwrap(), RunOutcome::DebugExit(nyx_guests::VIRTIO_EXIT));
    drop(r);
    let mut all = serial.bytes();
    all.extend(rest.bytes());
    assert_eq!(String::from_utf8_lossy(&all), golden_text("virtio.out"));
    let back = dir.path().join("back.img");
    assert!(convert(&disk, &back, "raw"));
    assert_eq!(sha256(&back), golden_text("virtio.img.sha256").trim());

    // Embedded: the trace alone replays, the qcow2 file gone.
    let disk = dir.path().join("emb.qcow2");
    assert!(convert(&raw, &disk, "qcow2"));
    let console = Capture::default();
    let (trace, serial) = record_pci(dir.path(), setup_as(&disk, DiskFormat::Auto, &console), true);
    assert_eq!(String::from_utf8_lossy(&serial), golden_text("virtio.out"));
    std::fs::remove_file(&disk).unwrap();
    let (out, end) = replay_with(&trace, Vec::new()).unwrap();
    assert_eq!(out, serial);
    assert!(matches!(end, ReplayEnd::Complete { .. }), "{end:?}");
}

/// Runs `m` until its serial output contains `text` (a kick from another
/// thread on the way is ignored).
fn run_until(m: &mut nyx_vmm::Machine, text: &str) {
    use nyx_vmm::machine::Stop;
    m.set_limits(nyx_vmm::machine::limits::Limits {
        until_output: Some(text.to_string()),
        max_guest_ns: None,
    });
    loop {
        match m.resume().unwrap() {
            Stop::Ended(RunOutcome::Limit(_)) => return,
            Stop::Ended(other) => panic!("the guest ended before {text:?}: {other:?}"),
            Stop::Interrupted | Stop::Paused | Stop::Debug(_) => {}
        }
    }
}

/// A destination in a thread of its own: accepts one migration on a free
/// loopback port, builds the machine with its serial and console output
/// in `serial` and `console` and runs it to its end. The address, and the
/// thread, which returns how the guest ended or why the machine was
/// refused.
fn destination(serial: &Capture, console: &Capture) -> (String, std::thread::JoinHandle<Result<RunOutcome, String>>) {
    let listener = nyx_vmm::migration::listen("tcp:127.0.0.1:0", false).unwrap();
    let addr = format!("tcp:{}", listener.local_addr().unwrap());
    let (serial, console) = (serial.clone(), console.clone());
    let t = std::thread::spawn(move || {
        let (received, confirm) =
            nyx_vmm::migration::accept(&listener, None, &mut |_| {}).map_err(|e| e.to_string())?;
        let built = MachineBuilder::from_received(received)
            .serial_out(Box::new(serial))
            .virtio_console(ConsoleIo {
                out: Box::new(console),
                input: SerialIn::None,
            })
            .build();
        let mut m = match built {
            Ok(m) => m,
            Err(e) => {
                confirm.refuse(&e.to_string());
                return Err(e.to_string());
            }
        };
        confirm.running().map_err(|e| e.to_string())?;
        m.run().map_err(|e| e.to_string())
    });
    (addr, t)
}

/// Migrates `m` to `addr` while the guest runs on up to `text`: pre-copy
/// on its own thread while the guest does its I/O, then the stop-and-copy.
fn migrate_while_running_to(
    m: &mut nyx_vmm::Machine,
    addr: &str,
    text: &str,
) -> Result<nyx_vmm::migration::MigrationStats, nyx_vmm::migration::MigrationError> {
    let kicker = m.kicker().unwrap();
    let out = nyx_vmm::migration::Outgoing::start(
        m,
        addr,
        Default::default(),
        None,
        Box::new(move || {
            kicker.kick();
        }),
        None,
    )?;
    run_until(m, text);
    let waited = std::time::Instant::now();
    while !out.precopy_done() {
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(60),
            "pre-copy does not end"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    out.finish(m)
}

/// Live migration of the virtio guest between two machines of this
/// process over loopback, mid-I/O: the guest has written sectors 16-23
/// through to the image when the migration starts and flushes and reads
/// them back during pre-copy; the destination opens the same image (shared
/// storage) and does the rest. Serial output (source then destination),
/// console output and the image afterwards are QEMU's. Before that, a
/// destination that cannot open the image refuses the machine naming the
/// disk, and the source runs on as if nothing happened.
#[test]
fn a_live_migration_mid_io_carries_the_disk_by_path() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_image(dir.path());
    let (serial, console) = (Capture::default(), Capture::default());
    let mut m = virtio_machine(&disk, &serial, &console);
    run_until(&mut m, "virtio-blk: write sectors 16-23");

    // The image is not where the destination looks: refused, by name.
    let away = dir.path().join("away.img");
    std::fs::rename(&disk, &away).unwrap();
    let (dst_serial, dst_console) = (Capture::default(), Capture::default());
    let (addr, refused) = destination(&dst_serial, &dst_console);
    let e = migrate_while_running_to(&mut m, &addr, "virtio-blk: flush").unwrap_err();
    let why = refused.join().unwrap().unwrap_err();
    for e in [e.to_string(), why] {
        assert!(
            e.contains("disk nyx-disk0") && e.contains(&disk.display().to_string()),
            "{e}"
        );
    }
    assert!(dst_serial.bytes().is_empty());
    std::fs::rename(&away, &disk).unwrap();

    // Now it is: the machine moves during the read-back.
    let (addr, dst) = destination(&dst_serial, &dst_console);
    let stats = migrate_while_running_to(&mut m, &addr, "virtio-blk: write zeroes").unwrap();
    assert!(stats.precopy_pages > 0 && stats.final_pages > 0, "{stats:?}");
    assert_eq!(dst.join().unwrap(), Ok(RunOutcome::DebugExit(nyx_guests::VIRTIO_EXIT)));
    drop(m);

    let (before, after) = (
        String::from_utf8_lossy(&serial.bytes()).into_owned(),
        String::from_utf8_lossy(&dst_serial.bytes()).into_owned(),
    );
    assert!(before.contains("read sectors 16-23: status 0"), "{before}");
    assert!(after.contains("read sectors 32-39: status 0"), "{after}");
    assert_eq!(before + &after, golden_text("virtio.out"));
    assert!(console.bytes().is_empty(), "the source never got to the console");
    assert_eq!(dst_console.bytes(), golden_text("virtio.console").into_bytes());
    assert_eq!(
        sha256(&disk),
        golden_text("virtio.img.sha256").trim(),
        "the image after the migrated run differs from QEMU's"
    );
}

/// Runs a debugged replay forward until it ends (the guest's exit or the
/// trace's end).
fn run_to_end(m: &mut nyx_vmm::Machine, t: &mut nyx_replayer::Timeline) {
    use nyx_vmm::machine::Stop;
    loop {
        match t.resume(m).unwrap() {
            Ok(Stop::Ended(_)) => return,
            Ok(_) => {}
            Err(e) => panic!("the replay failed: {e}"),
        }
    }
}

/// Reverse execution re-runs stretches of the replay from checkpoints: the
/// virtio-console's output, like the serial output, still reaches its file
/// exactly once, equal to what the recording wrote.
#[test]
fn a_reverse_debugged_replay_writes_console_output_once() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_image(dir.path());
    let recorded_console = Capture::default();
    let (trace, serial) = record(dir.path(), &disk, &recorded_console);
    assert_eq!(recorded_console.bytes(), golden_text("virtio.console").into_bytes());

    let (out, console) = (Capture::default(), Capture::default());
    let (mut m, mut t) = nyx_replayer::debug_replay(
        &trace,
        ReplayOptions {
            serial_out: Some(Box::new(out.clone())),
            console_out: Some(Box::new(console.clone())),
            ..Default::default()
        },
    )
    .unwrap();
    // Checkpoints often, so that going back re-executes the console's line
    // from a checkpoint before it rather than from the start alone.
    t.set_interval(std::time::Duration::from_micros(200));
    t.start(&mut m).unwrap();
    run_to_end(&mut m, &mut t);
    assert_eq!(console.bytes(), recorded_console.bytes(), "the first pass");
    // Back one instruction from the end, then from there forward again.
    t.reverse_step(&mut m).unwrap();
    run_to_end(&mut m, &mut t);
    // Back to the start (no breakpoint: nothing stops it earlier), and the
    // whole run again, console line and all.
    let back = t.reverse_continue(&mut m, &[], &[], &[]).unwrap();
    assert_eq!(back, nyx_replayer::timeline::ReverseStop::Begin);
    run_to_end(&mut m, &mut t);
    // A point in the middle of the run, then the end again.
    let end = t.resolve(&mut m).unwrap();
    let middle = nyx_replayer::timeline::Position {
        events: end.events / 2,
        steps: 0,
    };
    t.goto(&mut m, middle).unwrap();
    run_to_end(&mut m, &mut t);
    assert!(t.checkpoints() > 2, "{} checkpoints", t.checkpoints());
    assert_eq!(
        String::from_utf8_lossy(&console.bytes()),
        String::from_utf8_lossy(&recorded_console.bytes()),
        "the console's output after going back and forth"
    );
    assert_eq!(out.bytes(), serial, "the serial output after going back and forth");
}

/// The console echo guest's devices: a virtio-console alone, its output
/// into `console`, its input `input`.
fn conecho_setup(console: &Capture, input: SerialIn) -> PciSetup {
    PciSetup {
        disks: Vec::new(),
        rng: false,
        console: Some(ConsoleIo {
            out: Box::new(console.clone()),
            input,
        }),
        nets: Vec::new(),
        embed_disks: false,
    }
}

/// The console echo guest reads its input from the virtio-console's
/// receive queue: serial and console output are QEMU's.
#[test]
fn the_console_echo_guest_matches_qemu() {
    if !kvm() {
        return;
    }
    let (serial, console) = (Capture::default(), Capture::default());
    let mut m = MachineBuilder::new()
        .memory(64)
        .kernel_image("conecho", nyx_guests::CONECHO.to_vec())
        .cmdline("nyx-test arg=1")
        .serial_out(Box::new(serial.clone()))
        .pci(conecho_setup(
            &console,
            SerialIn::Bytes(nyx_guests::CONECHO_INPUT.to_vec()),
        ))
        .build()
        .unwrap();
    assert_eq!(m.run().unwrap(), RunOutcome::DebugExit(nyx_guests::CONECHO_EXIT));
    assert_eq!(String::from_utf8_lossy(&serial.bytes()), golden_text("conecho.out"));
    assert_eq!(
        String::from_utf8_lossy(&console.bytes()),
        nyx_guests::CONECHO_CONSOLE_OUTPUT
    );
}

/// Console input through the machine: a recording of the console echo
/// guest logs what its receive queue took (`ConsoleInput` events, up to the
/// '.' at least, never past the input); the replay has no input source at
/// all and echoes the same bytes at the same places (every exit verified),
/// plain and debugged, and QEMU's output both times.
#[test]
fn console_input_is_recorded_and_replayed_without_a_source() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (serial, console) = (Capture::default(), Capture::default());
    let input = nyx_guests::CONECHO_INPUT;
    let rec = record_image(
        RecordOptions {
            cpus: 1,
            out: dir.path().join("conecho.nyxtrace"),
            kernel: PathBuf::from("conecho"),
            kernel_name: Some("conecho".into()),
            initrd: None,
            cmdline: "nyx-test arg=1".into(),
            mem_mib: 64,
            serial_in: SerialIn::None,
            serial_out: Some(Box::new(serial.clone())),
            kvm_path: nyx_tests::kvm_device(),
            verify: VerifyLevel::Exits,
            landings: nyx_recorder::LandingPolicy::Auto,
            cpu: Default::default(),
            irqchip: Irqchip::Apic,
            pci: conecho_setup(&console, SerialIn::Bytes(input.to_vec())),
        },
        "conecho".into(),
        nyx_guests::CONECHO.to_vec(),
        None,
    )
    .unwrap();
    assert_eq!(rec.outcome, RunOutcome::DebugExit(nyx_guests::CONECHO_EXIT));
    assert_eq!(String::from_utf8_lossy(&serial.bytes()), golden_text("conecho.out"));
    assert_eq!(
        String::from_utf8_lossy(&console.bytes()),
        nyx_guests::CONECHO_CONSOLE_OUTPUT
    );

    let mut r = nyx_trace::TraceReader::open(&rec.path).unwrap();
    let mut logged = Vec::new();
    let mut events = 0;
    for i in 0..r.frames().len() {
        if r.frames()[i].kind == nyx_trace::FrameKind::Events {
            let frame: Vec<nyx_vmm::events::Event> = nyx_vmm::events::read_events(&mut r, i).unwrap();
            for e in frame {
                if let nyx_vmm::events::Event::ConsoleInput(b) = e {
                    logged.extend(b);
                    events += 1;
                }
            }
        }
    }
    drop(r);
    let dot = input.iter().position(|&b| b == b'.').unwrap() + 1;
    assert!(events >= 2, "one event per receive buffer filled: {events}");
    assert!(
        logged.len() >= dot && input.starts_with(&logged),
        "logged {:?}",
        String::from_utf8_lossy(&logged)
    );

    let replayed_console = Capture::default();
    let out = Capture::default();
    let r = replay(
        &rec.path,
        ReplayOptions {
            serial_out: Some(Box::new(out.clone())),
            console_out: Some(Box::new(replayed_console.clone())),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(matches!(r.end, ReplayEnd::Complete { .. }), "{:?}", r.end);
    assert_eq!(out.bytes(), serial.bytes(), "the replay's serial output");
    assert_eq!(replayed_console.bytes(), console.bytes(), "the replay's console output");

    // Debugged, backwards and forwards again: the same output, once.
    let (out, replayed_console) = (Capture::default(), Capture::default());
    let (mut m, mut t) = nyx_replayer::debug_replay(
        &rec.path,
        ReplayOptions {
            serial_out: Some(Box::new(out.clone())),
            console_out: Some(Box::new(replayed_console.clone())),
            ..Default::default()
        },
    )
    .unwrap();
    t.set_interval(std::time::Duration::from_micros(200));
    t.start(&mut m).unwrap();
    run_to_end(&mut m, &mut t);
    t.reverse_continue(&mut m, &[], &[], &[]).unwrap();
    run_to_end(&mut m, &mut t);
    assert_eq!(out.bytes(), serial.bytes());
    assert_eq!(replayed_console.bytes(), console.bytes());
}

/// The virtio-blk benchmark guests (`tests/guests/blkbench.h`) with
/// virtio-blk alone on a copy of their 32 MiB image: QEMU's serial output
/// (whose hash samples every request's data) and, after blkwrite's random
/// writes and flush, QEMU's image.
#[test]
fn the_blk_bench_guests_match_qemu() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = nyx_guests::blkbench_disk_image();
    for (name, kernel, exit) in [
        ("blknop", nyx_guests::BLKNOP, nyx_guests::BLKNOP_EXIT),
        ("blkseq", nyx_guests::BLKSEQ, nyx_guests::BLKSEQ_EXIT),
        ("blkrand", nyx_guests::BLKRAND, nyx_guests::BLKRAND_EXIT),
        ("blkwrite", nyx_guests::BLKWRITE, nyx_guests::BLKWRITE_EXIT),
    ] {
        let disk = dir.path().join(format!("{name}.img"));
        std::fs::write(&disk, &image).unwrap();
        let serial = Capture::default();
        let mut m = MachineBuilder::new()
            .memory(64)
            .kernel_image(name, kernel.to_vec())
            .cmdline("nyx-test arg=1")
            .irqchip(Irqchip::Apic)
            .serial_out(Box::new(serial.clone()))
            .pci(PciSetup {
                disks: vec![DiskSpec {
                    path: disk.clone(),
                    format: DiskFormat::Raw,
                    read_only: false,
                    id: None,
                }],
                rng: false,
                console: None,
                nets: Vec::new(),
                embed_disks: false,
            })
            .build()
            .unwrap();
        let outcome = m.run().unwrap();
        let got = String::from_utf8_lossy(&serial.bytes()).into_owned();
        assert_eq!(got, golden_text(&format!("{name}.out")), "{name}: differs from QEMU's");
        assert_eq!(outcome, RunOutcome::DebugExit(exit), "{name}");
        if name == "blkwrite" {
            assert_eq!(
                sha256(&disk),
                nyx_guests::blkwrite_disk_sha256_after_run(),
                "the image after blkwrite differs from QEMU's"
            );
        }
    }
}
