//! The virtio devices through the `nyx` command: `--disk`, `--rng` and
//! `--virtio-console` on `run` and `record`, `replay --disk` for a moved
//! image, the refusal of a changed image naming the disk, `--embed-disks`,
//! `restore --virtio-console` for a snapshot's console, console input from
//! a socket recorded and replayed without it, `nyx report`'s PCI section
//! on the recordings, bad `--disk` options refused with a clear message,
//! and so are qcow2 images that are truncated, corrupt or have a backing
//! file.

mod common;

use std::path::Path;

use common::{guest, kvm_available, nyx};

fn disk(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, nyx_guests::virtio_disk_image()).unwrap();
    p
}

/// `nyx report TRACE`'s PCI section: its lines up to the exit counts.
fn report_pci(trace: &Path) -> String {
    let r = nyx().arg("report").arg(trace).output().unwrap();
    let text = String::from_utf8_lossy(&r.stdout).into_owned();
    assert!(r.status.success(), "{text}{}", String::from_utf8_lossy(&r.stderr));
    let section = text
        .split_once("\nexits ")
        .map(|x| x.0)
        .unwrap_or_else(|| panic!("{text}"));
    assert!(section.starts_with("pci "), "{text}");
    section.to_string()
}

fn golden(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `nyx ARGS` with the virtio guest's devices; (status, stdout, stderr).
fn with_devices(args: &[&str], img: &Path, console: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
    let out = nyx()
        .args(args)
        .arg("--kernel")
        .arg(guest("virtio"))
        .args(["--cmdline", "nyx-test arg=1", "--disk"])
        .arg(format!("{},id=nyx-disk0", img.display()))
        .arg("--rng")
        .arg("--virtio-console")
        .arg(format!("file:{}", console.display()))
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn run_record_and_replay_with_a_disk() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exit = Some(nyx_guests::VIRTIO_EXIT as i32);

    let img = disk(dir.path(), "run.img");
    let console = dir.path().join("run.console");
    let (status, out, err) = with_devices(&["run"], &img, &console, &[]);
    assert_eq!(status, exit, "{err}");
    assert_eq!(out, golden("virtio.out"));
    assert_eq!(std::fs::read_to_string(&console).unwrap(), golden("virtio.console"));
    assert_eq!(
        nyx_vmm::disk::hash_file(&img).unwrap().1,
        golden("virtio.img.sha256").trim()
    );

    let img = disk(dir.path(), "rec.img");
    let before = std::fs::read(&img).unwrap();
    let trace = dir.path().join("v.nyxtrace");
    let console = dir.path().join("rec.console");
    let (status, out, err) = with_devices(&["record", "--out", trace.to_str().unwrap()], &img, &console, &[]);
    assert_eq!(status, exit, "{err}");
    assert_eq!(out, golden("virtio.out"));
    assert_eq!(std::fs::read(&img).unwrap(), before, "the recording wrote to the image");

    // The report names the functions: the disk by its ID and size.
    let pci = report_pci(&trace);
    let size = nyx_guests::virtio_disk_image().len();
    let blk = pci
        .lines()
        .find(|l| l.starts_with("  03:00.0 1af4:1042 virtio-blk "))
        .unwrap_or_else(|| panic!("{pci}"));
    assert!(blk.contains("disk nyx-disk0 "), "{pci}");
    assert!(blk.contains(&format!(", {size} bytes, read-write, sha256 ")), "{pci}");
    assert!(blk.contains("not embedded"), "{pci}");
    assert!(pci.contains("  04:00.0 1af4:1044 virtio-rng "), "{pci}");
    assert!(pci.contains("  05:00.0 1af4:1043 virtio-console "), "{pci}");
    assert!(
        pci.starts_with("pci          00:00.0 8086:1237 host bridge and 3 functions\n"),
        "{pci}"
    );

    let replayed = dir.path().join("replay.console");
    let r = nyx()
        .arg("replay")
        .arg(&trace)
        .arg("--virtio-console-out")
        .arg(&replayed)
        .output()
        .unwrap();
    assert_eq!(r.status.code(), exit, "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(String::from_utf8_lossy(&r.stdout), golden("virtio.out"));
    assert_eq!(std::fs::read_to_string(&replayed).unwrap(), golden("virtio.console"));

    // The image changed: refused, naming the disk; the image given
    // instead with --disk must be the recorded one too.
    std::fs::write(&img, b"x".repeat(512)).unwrap();
    let r = nyx().arg("replay").arg(&trace).output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(
        err.contains("disk nyx-disk0") && err.contains("not the one recorded"),
        "{err}"
    );
    let copy = disk(dir.path(), "copy.img");
    let r = nyx()
        .arg("replay")
        .arg(&trace)
        .arg("--disk")
        .arg(&copy)
        .output()
        .unwrap();
    assert_eq!(r.status.code(), exit, "{}", String::from_utf8_lossy(&r.stderr));

    // Embedded: the trace alone replays.
    let img = disk(dir.path(), "emb.img");
    let trace = dir.path().join("e.nyxtrace");
    let (status, _, err) = with_devices(
        &["record", "--out", trace.to_str().unwrap()],
        &img,
        &dir.path().join("emb.console"),
        &["--embed-disks"],
    );
    assert_eq!(status, exit, "{err}");
    let pci = report_pci(&trace);
    assert!(pci.contains("embedded (the trace holds its reads)"), "{pci}");
    let reads = pci
        .lines()
        .find(|l| l.starts_with("  disk reads "))
        .unwrap_or_else(|| panic!("{pci}"));
    assert!(
        !reads.contains(" 0 disk-read events"),
        "the guest reads its disk: {pci}"
    );
    std::fs::remove_file(&img).unwrap();
    let r = nyx().arg("replay").arg(&trace).output().unwrap();
    assert_eq!(r.status.code(), exit, "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(String::from_utf8_lossy(&r.stdout), golden("virtio.out"));
}

/// A snapshot of the virtio guest taken before it reached its console,
/// restored by `nyx restore --virtio-console file:PATH`: the console's line
/// goes to PATH, the rest of the serial output to stdout, and the image
/// (opened at the snapshot's path) ends as QEMU's did.
#[test]
fn restore_gives_the_snapshot_a_virtio_console() {
    if !kvm_available() {
        return;
    }
    use nyx_vmm::pci_setup::{ConsoleIo, PciSetup};
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path(), "snap.img");
    let serial = nyx_tests::Capture::default();
    let mut m = nyx_vmm::MachineBuilder::new()
        .memory(64)
        .kernel_image("virtio", nyx_guests::VIRTIO.to_vec())
        .cmdline("nyx-test arg=1")
        .serial_out(Box::new(serial.clone()))
        .pci(PciSetup {
            disks: vec![format!("{},id={}", img.display(), nyx_guests::VIRTIO_DISK_SERIAL)
                .parse()
                .unwrap()],
            rng: true,
            console: Some(ConsoleIo {
                out: Box::new(std::io::sink()),
                input: nyx_vmm::SerialIn::None,
            }),
            nets: Vec::new(),
            embed_disks: false,
        })
        .build()
        .unwrap();
    m.set_limits(nyx_vmm::machine::limits::Limits {
        until_output: Some("virtio-blk: write sectors 16-23".into()),
        max_guest_ns: None,
    });
    m.run().unwrap();
    let snap = m.save_snapshot(&dir.path().join("v.nyxsnap")).unwrap();
    drop(m);
    let console = dir.path().join("restored.console");
    let r = nyx()
        .arg("restore")
        .arg(&snap)
        .arg("--virtio-console")
        .arg(format!("file:{}", console.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(nyx_guests::VIRTIO_EXIT as i32), "{err}");
    let both = String::from_utf8_lossy(&serial.bytes()).into_owned() + &String::from_utf8_lossy(&r.stdout);
    assert_eq!(both, golden("virtio.out"));
    assert_eq!(std::fs::read_to_string(&console).unwrap(), golden("virtio.console"));
    assert_eq!(
        nyx_vmm::disk::hash_file(&img).unwrap().1,
        golden("virtio.img.sha256").trim()
    );
    assert!(!err.contains("warning"), "{err}");
}

/// virtio-console input from a Unix socket (`--virtio-console
/// unix:PATH,server`) in a recording of the console echo guest: the echo
/// comes back on the socket, and `nyx replay` without any console echoes
/// the same lines from the trace.
#[test]
fn console_input_from_a_socket_is_recorded_and_replayed_without_it() {
    if !kvm_available() {
        return;
    }
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let (sock, trace) = (dir.path().join("con.sock"), dir.path().join("c.nyxtrace"));
    let rec = nyx()
        .arg("record")
        .arg("--out")
        .arg(&trace)
        .arg("--kernel")
        .arg(guest("conecho"))
        .args(["--cmdline", "nyx-test arg=1", "--virtio-console"])
        .arg(format!("unix:{},server", sock.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let mut c = loop {
        match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(c) => break c,
            Err(e) => {
                assert!(start.elapsed().as_secs() < 30, "no console at {}: {e}", sock.display());
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    };
    c.write_all(nyx_guests::CONECHO_INPUT).unwrap();
    let out = rec.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(nyx_guests::CONECHO_EXIT as i32), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), golden("conecho.out"));
    let mut echoed = String::new();
    c.read_to_string(&mut echoed).unwrap();
    assert_eq!(echoed, golden("conecho.console"));

    let console = dir.path().join("replay.console");
    let r = nyx()
        .arg("replay")
        .arg(&trace)
        .arg("--virtio-console-out")
        .arg(&console)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(nyx_guests::CONECHO_EXIT as i32), "{err}");
    assert_eq!(String::from_utf8_lossy(&r.stdout), golden("conecho.out"));
    assert_eq!(std::fs::read_to_string(&console).unwrap(), golden("conecho.console"));
}

#[test]
fn bad_disk_options_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    for (spec, want) in [
        (format!("{},format=vmdk", missing.display()), "raw or qcow2"),
        (format!("{},id=", missing.display()), "id must be"),
        (format!("{},bogus", missing.display()), "unknown option"),
    ] {
        let r = nyx()
            .args(["run", "--kernel"])
            .arg(guest("virtio"))
            .arg("--disk")
            .arg(&spec)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{spec}: {err}");
        assert!(err.contains("--disk") && err.contains(want), "{spec}: {err}");
    }
    if !kvm_available() {
        return;
    }
    let r = nyx()
        .args(["run", "--kernel"])
        .arg(guest("virtio"))
        .arg("--disk")
        .arg(&missing)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("disk disk0") && err.contains("missing.img"), "{err}");
    let r = nyx()
        .args(["run", "--irqchip", "legacy", "--rng", "--kernel"])
        .arg(guest("virtio"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("--irqchip apic"), "{err}");
}

/// `nyx run` of the virtio guest on `--disk SPEC`: (exit code, stderr).
fn run_disk(spec: &str) -> (Option<i32>, String) {
    let r = nyx()
        .args(["run", "--kernel"])
        .arg(guest("virtio"))
        .arg("--disk")
        .arg(spec)
        .output()
        .unwrap();
    (r.status.code(), String::from_utf8_lossy(&r.stderr).into_owned())
}

#[test]
fn bad_qcow2_images_are_refused_clearly() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = disk(dir.path(), "base.img");
    let q = dir.path().join("base.qcow2");
    let over = dir.path().join("over.qcow2");
    let qemu_img = |args: &[&std::ffi::OsStr]| match std::process::Command::new("qemu-img").args(args).output() {
        Ok(o) => {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            true
        }
        Err(e) => {
            assert!(std::env::var_os("CI").is_none(), "qemu-img: {e}");
            false
        }
    };
    let convert = ["convert", "-O", "qcow2"].map(std::ffi::OsStr::new);
    if !qemu_img(&[&convert[..], &[raw.as_os_str(), q.as_os_str()]].concat()) {
        return;
    }
    let create = ["create", "-f", "qcow2", "-F", "qcow2", "-b"].map(std::ffi::OsStr::new);
    assert!(qemu_img(&[&create[..], &[q.as_os_str(), over.as_os_str()]].concat()));
    let (code, err) = run_disk(&format!("{},id=root", over.display()));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("disk root") && err.contains("backing file"), "{err}");

    let bytes = std::fs::read(&q).unwrap();
    let bad = dir.path().join("bad.qcow2");
    std::fs::write(&bad, &bytes[..100]).unwrap();
    let (code, err) = run_disk(&bad.display().to_string());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("disk disk0") && err.contains("corrupt"), "{err}");

    // The L1 table's offset (header bytes 40-47) pointed past the file.
    let mut broken = bytes.clone();
    broken[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes());
    std::fs::write(&bad, &broken).unwrap();
    let (code, err) = run_disk(&bad.display().to_string());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("disk disk0") && err.contains("L1 table"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // format=qcow2 on a raw image.
    let (code, err) = run_disk(&format!("{},format=qcow2", raw.display()));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("disk disk0") && err.contains("not a qcow2 image"), "{err}");
}
