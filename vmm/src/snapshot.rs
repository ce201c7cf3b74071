//! Snapshots: a whole machine in the trace container (design §5), one
//! machine-state frame and the memory frames, no events.
//!
//! The machine-state frame holds the vCPU ([`VcpuState`]), every device
//! ([`PlatformState`]), the virtual time, the position and the patched
//! instruction sites; memory frames hold guest RAM as page runs with zero
//! pages skipped. The header carries the machine configuration and the
//! kernel and initrd, so a snapshot restores without any other file.

use std::path::{Path, PathBuf};

use nyx_trace::{ContainerKind, FrameKind, GuestImage, TraceHeader, TraceReader, TraceWriter};
use serde::{Deserialize, Serialize};

use crate::config::{MachineConfig, INITRD_IMAGE, KERNEL_IMAGE};
use crate::mem_state::PageRun;
use crate::patch::PatchTable;
use crate::platform::PlatformState;
use crate::vcpu_state::VcpuState;

/// Page runs per memory frame (runs are at most 1 MiB).
pub const RUNS_PER_FRAME: usize = 16;

/// Everything of a machine but its memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineState {
    /// The vCPU.
    pub vcpu: VcpuState,
    /// The devices.
    pub platform: PlatformState,
    /// Virtual time, ns.
    pub virtual_ns: u64,
    /// Guest-caused exits so far.
    pub exit_seq: u64,
    /// Whether the devices were due to be polled.
    pub poll_pending: bool,
    /// The patched instruction sites (their traps are in memory).
    pub patches: PatchTable,
}

/// Errors of snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The container cannot be read or written.
    #[error("{path}: {source}")]
    Container {
        /// The file.
        path: PathBuf,
        /// Why.
        source: nyx_trace::Error,
    },
    /// The file is a Nyx container but not a usable snapshot.
    #[error("{path} is not a Nyx snapshot: {why}")]
    NotASnapshot {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// A snapshot read back: configuration, images, state and memory.
#[derive(Debug)]
pub struct Snapshot {
    /// The machine.
    pub config: MachineConfig,
    /// The kernel image.
    pub kernel: Vec<u8>,
    /// The initrd image.
    pub initrd: Option<Vec<u8>>,
    /// vCPU, devices, time.
    pub state: MachineState,
    /// Guest memory.
    pub memory: Vec<PageRun>,
}

/// Writes a snapshot container to `path` (via `PATH.partial`).
pub fn write(
    path: &Path,
    config: &MachineConfig,
    kernel: &[u8],
    initrd: Option<&[u8]>,
    state: &MachineState,
    memory: &[PageRun],
) -> Result<PathBuf, SnapshotError> {
    let err = |source| SnapshotError::Container {
        path: path.to_path_buf(),
        source,
    };
    let header = container_header(ContainerKind::Snapshot, config, kernel, initrd);
    let mut w = TraceWriter::create(path, &header).map_err(err)?;
    w.write_records(FrameKind::MachineState, state.exit_seq, std::slice::from_ref(state))
        .map_err(err)?;
    for chunk in memory.chunks(RUNS_PER_FRAME) {
        w.write_records(FrameKind::Memory, state.exit_seq, chunk).map_err(err)?;
    }
    w.finish().map_err(err)
}

/// The header of a container that holds a whole machine (a snapshot or a
/// migration stream): its configuration, kernel and initrd embedded.
pub fn container_header(
    kind: ContainerKind,
    config: &MachineConfig,
    kernel: &[u8],
    initrd: Option<&[u8]>,
) -> TraceHeader {
    let mut images = vec![GuestImage::embedded(KERNEL_IMAGE, kernel.to_vec())];
    if let Some(i) = initrd {
        images.push(GuestImage::embedded(INITRD_IMAGE, i.to_vec()));
    }
    TraceHeader {
        uuid: crate::hooks::uuid_v4(),
        nyx_version: env!("CARGO_PKG_VERSION").to_string(),
        kind,
        machine_config: config.to_bytes(),
        images,
    }
}

/// A saved machine's configuration, kernel and initrd.
pub type SavedParts = (MachineConfig, Vec<u8>, Option<Vec<u8>>);

/// The configuration, kernel and initrd from the header of a container that
/// holds a whole machine; `Err` says what is missing or damaged.
pub fn parse_header(h: &TraceHeader) -> Result<SavedParts, String> {
    let config = MachineConfig::from_bytes(&h.machine_config).map_err(|e| format!("machine configuration: {e}"))?;
    let image = |name: &str| h.images.iter().find(|i| i.name == name).and_then(|i| i.data.clone());
    let kernel = image(KERNEL_IMAGE).ok_or("the kernel image is not embedded")?;
    let initrd = if config.has_initrd {
        Some(image(INITRD_IMAGE).ok_or("the initrd image is not embedded")?)
    } else {
        None
    };
    Ok((config, kernel, initrd))
}

/// Reads a snapshot container.
pub fn read(path: &Path) -> Result<Snapshot, SnapshotError> {
    let err = |source| SnapshotError::Container {
        path: path.to_path_buf(),
        source,
    };
    let not = |why: String| SnapshotError::NotASnapshot {
        path: path.to_path_buf(),
        why,
    };
    let mut r = TraceReader::open(path).map_err(err)?;
    if !r.is_complete() {
        return Err(not("it is incomplete (the writer did not finish it)".into()));
    }
    let h = r.header().clone();
    if h.kind != ContainerKind::Snapshot {
        return Err(not(format!("it is a {:?} container", h.kind)));
    }
    let (config, kernel, initrd) = parse_header(&h).map_err(not)?;
    let mut state = None;
    let mut memory = Vec::new();
    for i in 0..r.frames().len() {
        match r.frames()[i].kind {
            FrameKind::MachineState => {
                let mut v: Vec<MachineState> = r.read_records(i).map_err(err)?;
                if v.len() != 1 || state.is_some() {
                    return Err(not("it must hold exactly one machine state".into()));
                }
                state = v.pop();
            }
            FrameKind::Memory => memory.extend(r.read_records::<PageRun>(i).map_err(err)?),
            _ => {}
        }
    }
    let state = state.ok_or_else(|| not("it holds no machine state".into()))?;
    Ok(Snapshot {
        config,
        kernel,
        initrd,
        state,
        memory,
    })
}
