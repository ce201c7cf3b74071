//! Recording that starts from a snapshot instead of power-on
//! (`nyx record --from-snapshot`, and the traces `nyx check` keeps of
//! failing runs). The trace's first frames are the snapshot's machine state
//! and memory, at the snapshot's position; the replayer restores them
//! before it replays the events that follow.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nyx_trace::{ContainerKind, FrameKind, GuestImage, TraceHeader, TraceWriter, WriterOptions};
use nyx_vmm::config::{VerifyLevel, INITRD_IMAGE, KERNEL_IMAGE};
use nyx_vmm::{MachineBuilder, SerialIn};

use crate::{new_log, Error, LandingPolicy, Recorder, Recording, Session};

/// Memory runs per frame of the starting state.
const RUNS_PER_FRAME: usize = 16;

/// What to record from a snapshot.
pub struct SnapshotRecordOptions {
    /// The snapshot to start from.
    pub snapshot: PathBuf,
    /// The trace file to write.
    pub out: PathBuf,
    /// Serial input from the snapshot on.
    pub serial_in: SerialIn,
    /// Where guest serial output goes (default stdout).
    pub serial_out: Option<Box<dyn std::io::Write + Send>>,
    /// The KVM device.
    pub kvm_path: String,
    /// How much to verify.
    pub verify: VerifyLevel,
    /// How landings are stored.
    pub landings: LandingPolicy,
    /// Record under the check clock of these hooks (the deterministic clock
    /// of `nyx check`), not the host's.
    pub check: Option<nyx_vmm::reset::CheckRun>,
}

/// Restores the snapshot and records its run to the end into `opts.out`.
pub fn record_from_snapshot(opts: SnapshotRecordOptions) -> Result<Recording, Error> {
    start_from_snapshot(opts)?.run()
}

/// Restores the snapshot under the recorder and opens its trace, with the
/// snapshot's state as the trace's first frames; the caller runs it.
pub fn start_from_snapshot(opts: SnapshotRecordOptions) -> Result<Session, Error> {
    let snap = nyx_vmm::snapshot::read(&opts.snapshot).map_err(|e| Error::Read {
        path: opts.snapshot.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let position = snap.state.exit_seq;
    let log = new_log(&opts.out, position);
    let wall = Arc::new(Mutex::new(0i64));
    let mut hooks = Recorder::new(log.clone(), opts.verify, wall.clone(), opts.landings);
    hooks.check = opts.check;
    let mut b = MachineBuilder::from_snapshot(&opts.snapshot)
        .map_err(|e| Error::Read {
            path: opts.snapshot.clone(),
            source: std::io::Error::other(e.to_string()),
        })?
        .serial_in(opts.serial_in)
        .kvm_path(&opts.kvm_path)
        .hooks(Box::new(hooks));
    if let Some(out) = opts.serial_out {
        b = b.serial_out(out);
    }
    let machine = b.build()?;

    let mut config = snap.config;
    config.verify = opts.verify;
    // The date the machine was given (the host's, or the check clock's).
    config.wall_seconds = *wall.lock().unwrap_or_else(|e| e.into_inner());
    let mut images = vec![GuestImage::embedded(KERNEL_IMAGE, snap.kernel)];
    if let Some(i) = snap.initrd {
        images.push(GuestImage::embedded(INITRD_IMAGE, i));
    }
    let header = TraceHeader {
        uuid: nyx_vmm::hooks::uuid_v4(),
        nyx_version: env!("CARGO_PKG_VERSION").to_string(),
        kind: ContainerKind::Trace,
        machine_config: config.to_bytes(),
        images,
    };
    let err = |source| Error::Trace {
        path: opts.out.clone(),
        source,
    };
    let mut writer = TraceWriter::create_with(&opts.out, &header, WriterOptions::default()).map_err(err)?;
    writer
        .write_records(FrameKind::MachineState, position, std::slice::from_ref(&snap.state))
        .map_err(err)?;
    for chunk in snap.memory.chunks(RUNS_PER_FRAME) {
        writer.write_records(FrameKind::Memory, position, chunk).map_err(err)?;
    }
    Ok(Session::new(machine, log, writer, &opts.out, position))
}
