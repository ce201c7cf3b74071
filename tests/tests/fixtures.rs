//! Committed containers of each kind (a trace, a snapshot compressed and
//! one mappable, a migration stream of the in-tree `hello` guest, in
//! tests/fixtures) still read with
//! this build: a change to any recorded or saved structure's layout that
//! forgets to bump the format version fails here. After a version bump the
//! fixtures are refused with a message naming both versions (then
//! regenerate them: `cargo test -p nyx-tests --test fixtures -- --ignored
//! regenerate`, on a machine with KVM).
//!
//! Reading needs no KVM; regenerating does.

use std::path::PathBuf;

use nyx_trace::{ContainerKind, FrameKind, TraceReader, FORMAT_VERSION};
use nyx_vmm::config::MachineConfig;
use nyx_vmm::events::Event;

const TRACE: &str = "hello.nyxtrace";
const SNAPSHOT: &str = "hello.nyxsnap";
const MAPPABLE: &str = "hello.mappable.nyxsnap";
const MIGRATION: &str = "hello.nyxmig";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// The fixture's bytes and the format version they were written in.
fn bytes_and_version(name: &str) -> (Vec<u8>, u32) {
    let path = fixture(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        bytes.len() >= 12 && bytes.len() < 64 << 10,
        "{name}: {} bytes",
        bytes.len()
    );
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    (bytes, version)
}

/// `Some(version)` when the fixture is of an older (or newer) format
/// version than this build's: then `err`, the error reading it gave, must
/// be the refusal that names both.
fn refused_for_its_version(name: &str, version: u32, err: &dyn std::fmt::Display) {
    let msg = err.to_string();
    assert!(
        msg.contains(&version.to_string()) && msg.contains(&FORMAT_VERSION.to_string()),
        "{name} is of format version {version}, this build writes {FORMAT_VERSION}: its refusal must name both, got: {msg}"
    );
    eprintln!(
        "{name}: format version {version} refused as it must be; regenerate the fixtures for version {FORMAT_VERSION}"
    );
}

#[test]
fn the_trace_fixture_reads_every_event() {
    let (_, version) = bytes_and_version(TRACE);
    let path = fixture(TRACE);
    let mut r = match TraceReader::open(&path) {
        Ok(r) => r,
        Err(e) if version != FORMAT_VERSION => return refused_for_its_version(TRACE, version, &e),
        Err(e) => panic!("{TRACE}: {e}"),
    };
    assert_eq!(version, FORMAT_VERSION, "a container of another version was opened");
    assert!(r.is_complete());
    assert_eq!(r.header().kind, ContainerKind::Trace);
    r.verify().unwrap();
    let config = MachineConfig::from_bytes(&r.header().machine_config).unwrap();
    assert_eq!(config.kernel_name, "hello");
    let mut events = Vec::new();
    for i in 0..r.frames().len() {
        if r.frames()[i].kind == FrameKind::Events {
            events.extend(nyx_vmm::events::read_events(&mut r, i).unwrap_or_else(|e| panic!("{TRACE} frame {i}: {e}")));
        }
    }
    assert!(events.iter().any(|e| matches!(e, Event::Exit(_))));
    assert!(matches!(events.last(), Some(Event::End(_))), "{:?}", events.last());
}

#[test]
fn the_snapshot_fixture_reads_its_machine() {
    let (_, version) = bytes_and_version(SNAPSHOT);
    let snap = match nyx_vmm::snapshot::read(&fixture(SNAPSHOT)) {
        Ok(s) => s,
        Err(e) if version != FORMAT_VERSION => return refused_for_its_version(SNAPSHOT, version, &e),
        Err(e) => panic!("{e}"),
    };
    assert_eq!(version, FORMAT_VERSION, "a container of another version was opened");
    assert_eq!(snap.config.kernel_name, "hello");
    assert!(
        snap.kernel.starts_with(b"\x7fELF"),
        "the embedded kernel is an ELF image"
    );
    assert!(!snap.memory.is_empty());
    assert!(snap.state.exit_seq > 0, "saved after the guest ran");
}

#[test]
fn the_mappable_snapshot_fixture_reads_and_maps_the_same_memory() {
    use nyx_vmm::mem_state::{memory_digest, restore_runs};
    let (_, version) = bytes_and_version(MAPPABLE);
    let whole = match nyx_vmm::snapshot::read(&fixture(MAPPABLE)) {
        Ok(s) => s,
        Err(e) if version != FORMAT_VERSION => return refused_for_its_version(MAPPABLE, version, &e),
        Err(e) => panic!("{e}"),
    };
    let r = TraceReader::open(fixture(MAPPABLE)).unwrap();
    assert!(r.frames().iter().any(|f| f.kind == FrameKind::MemoryImage));
    assert!(whole.image.is_none() && !whole.memory.is_empty());
    assert!(whole.state.exit_seq > 0, "saved after the guest ran");
    let mapped = nyx_vmm::snapshot::read_for_restore(&fixture(MAPPABLE), &mut || {}).unwrap();
    let image = mapped.image.expect("the image is left to be mapped");
    assert!(mapped.memory.is_empty());
    let mib = whole.config.mem_mib;
    let (a, b) = (
        nyx_vmm::memory::create(mib).unwrap(),
        nyx_vmm::memory::create(mib).unwrap(),
    );
    restore_runs(&a, &whole.memory).unwrap();
    nyx_vmm::memory::map_image(&b, &image.file, &image.spans).unwrap();
    assert_eq!(memory_digest(&a), memory_digest(&b));
}

#[test]
fn the_migration_fixture_reads_its_machine() {
    let (bytes, version) = bytes_and_version(MIGRATION);
    let got = match nyx_vmm::migration::receive(bytes.as_slice()) {
        Ok(g) => g,
        Err(e) if version != FORMAT_VERSION => return refused_for_its_version(MIGRATION, version, &e),
        Err(e) => panic!("{MIGRATION}: {e}"),
    };
    assert_eq!(version, FORMAT_VERSION, "a container of another version was opened");
    assert_eq!(got.parts.0.kernel_name, "hello");
    assert!(got.runs > 0);
    assert!(got.state.exit_seq > 0, "sent after the guest ran");
}

/// Each fixture with its version field changed is refused, the message
/// naming the file's version and this build's.
#[test]
fn another_version_of_each_fixture_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let other = FORMAT_VERSION + 7;
    for name in [TRACE, SNAPSHOT, MAPPABLE, MIGRATION] {
        let (mut bytes, _) = bytes_and_version(name);
        bytes[8..12].copy_from_slice(&other.to_le_bytes());
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let msg = match name {
            TRACE => TraceReader::open(&path).err().map(|e| e.to_string()),
            SNAPSHOT | MAPPABLE => nyx_vmm::snapshot::read(&path).err().map(|e| e.to_string()),
            _ => nyx_vmm::migration::receive(bytes.as_slice())
                .err()
                .map(|e| e.to_string()),
        }
        .unwrap_or_else(|| panic!("{name} of version {other} was accepted"));
        assert!(
            msg.contains(&other.to_string()) && msg.contains(&FORMAT_VERSION.to_string()),
            "{name}: {msg}"
        );
    }
}

/// Writes the four fixtures anew from the in-tree `hello` guest (4 MiB of
/// RAM): a recording of its run, and its machine after the run saved as a
/// compressed and a mappable snapshot and sent as a migration stream.
#[test]
#[ignore = "regenerates the committed fixtures; needs KVM"]
fn regenerate() {
    use nyx_recorder::{record_image, LandingPolicy, RecordOptions};
    use nyx_vmm::config::VerifyLevel;
    use nyx_vmm::{MachineBuilder, SerialIn};
    use std::sync::atomic::AtomicBool;

    assert!(nyx_tests::kvm_available(), "regenerating the fixtures needs KVM");
    let image = nyx_guests::image("hello").unwrap().to_vec();
    std::fs::create_dir_all(fixture("")).unwrap();
    record_image(
        RecordOptions {
            cpus: 1,
            out: fixture(TRACE),
            kernel: PathBuf::from("hello"),
            kernel_name: Some("hello".into()),
            initrd: None,
            cmdline: nyx_guests::GOLDEN_APPEND.into(),
            mem_mib: 4,
            serial_in: SerialIn::None,
            serial_out: Some(Box::new(std::io::sink())),
            kvm_path: nyx_tests::kvm_device(),
            verify: VerifyLevel::Exits,
            landings: LandingPolicy::Auto,
            cpu: Default::default(),
            irqchip: Default::default(),
            pci: Default::default(),
        },
        "hello".into(),
        image.clone(),
        None,
    )
    .unwrap();

    let mut m = MachineBuilder::new()
        .memory(4)
        .kernel_image("hello", image)
        .cmdline(nyx_guests::GOLDEN_APPEND)
        .serial_out(Box::new(std::io::sink()))
        .build()
        .unwrap();
    m.run().unwrap();
    m.save_snapshot(&fixture(SNAPSHOT)).unwrap();
    m.save_snapshot_as(&fixture(MAPPABLE), nyx_vmm::snapshot::MemoryFormat::Mappable)
        .unwrap();

    let (state, _) = m.capture_state_without_memory().unwrap();
    let (config, kernel, initrd) = m.saved_parts();
    let header = nyx_vmm::snapshot::container_header(ContainerKind::Migration, config, kernel, initrd);
    let mut out = nyx_trace::StreamWriter::new(Vec::new(), &header).unwrap();
    nyx_vmm::migration::send_nonzero(&mut out, m.memory(), state.exit_seq, &AtomicBool::new(false)).unwrap();
    out.write_records(FrameKind::MachineState, state.exit_seq, std::slice::from_ref(&state))
        .unwrap();
    std::fs::write(fixture(MIGRATION), out.finish().unwrap()).unwrap();
    for name in [TRACE, SNAPSHOT, MAPPABLE, MIGRATION] {
        let (bytes, version) = bytes_and_version(name);
        eprintln!("{name}: {} bytes, format version {version}", bytes.len());
    }
}
