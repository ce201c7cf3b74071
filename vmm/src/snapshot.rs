//! Snapshots: a whole machine in the trace container (design §5), one
//! machine-state frame and the memory frames, no events.
//!
//! The machine-state frame holds the vCPU ([`VcpuState`]), every device
//! ([`PlatformState`]), the virtual time, the position and the patched
//! instruction sites; memory frames hold guest RAM as page runs with zero
//! pages skipped: zstd-compressed by default, or stored page-aligned in
//! memory-image frames ([`MemoryFormat::Mappable`]) that a restore maps
//! copy-on-write instead of reading ([`read_for_restore`]). The header
//! carries the machine configuration and the kernel and initrd, so a
//! snapshot restores without any other file.

use std::path::{Path, PathBuf};

use nyx_trace::{ContainerKind, FrameKind, GuestImage, TraceHeader, TraceReader, TraceWriter, WriterOptions};
use serde::{Deserialize, Serialize};

use crate::config::{MachineConfig, INITRD_IMAGE, KERNEL_IMAGE};
use crate::mem_state::PageRun;
use crate::patch::PatchTable;
use crate::platform::PlatformState;
use crate::vcpu_state::VcpuState;

/// Page runs per memory frame (runs are at most 1 MiB).
pub const RUNS_PER_FRAME: usize = 16;
/// Guest bytes per memory-image frame, at most.
pub const IMAGE_FRAME_BYTES: usize = 64 << 20;

/// How a snapshot stores guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryFormat {
    /// zstd-compressed page runs: the smallest file; a restore reads,
    /// decompresses and copies every page.
    #[default]
    Compressed,
    /// Page runs stored as they are, each on a page boundary of the file
    /// (memory-image frames): a file as large as the non-zero memory, which
    /// a restore checks (one read of it, for the checksums) and maps
    /// copy-on-write, so that pages are copied only when the guest writes
    /// them. The file must then stay as it is while a machine restored
    /// from it runs.
    Mappable,
}

/// Which vCPU a machine that runs its vCPUs one at a time runs, and where
/// each vCPU is (a recording's or replay's machine with several).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleState {
    /// The running vCPU.
    pub current: u8,
    /// Each vCPU's run state: 0 waiting for a start-up IPI, 1 runnable,
    /// 2 in HLT with interrupts enabled, 3 in HLT with them disabled; bit 7
    /// set: an NMI waits to be handed to the vCPU when it next runs.
    pub states: Vec<u8>,
}

/// Everything of a machine but its memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineState {
    /// The BSP (vCPU 0).
    pub vcpu: VcpuState,
    /// The APs (vCPUs 1..), on a machine with several.
    pub aps: Vec<VcpuState>,
    /// Their schedule, on a machine that runs them one at a time.
    pub schedule: Option<ScheduleState>,
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
    /// Guest memory read from the file (all of it, unless `image` holds
    /// part).
    pub memory: Vec<PageRun>,
    /// Guest memory left in the file to be mapped at restore
    /// ([`read_for_restore`] of a mappable snapshot).
    pub image: Option<MemoryImage>,
}

/// The memory-image runs of a snapshot, checked, with the open file they
/// are in: what [`crate::memory::map_image`] maps.
#[derive(Debug)]
pub struct MemoryImage {
    /// The snapshot file (the descriptor it was checked through).
    pub file: std::fs::File,
    /// Where each run goes and where it is in the file.
    pub spans: Vec<crate::memory::ImageSpan>,
}

/// Writes a snapshot container to `path` (via `PATH.partial`), its memory
/// compressed.
pub fn write(
    path: &Path,
    config: &MachineConfig,
    kernel: &[u8],
    initrd: Option<&[u8]>,
    state: &MachineState,
    memory: &[PageRun],
) -> Result<PathBuf, SnapshotError> {
    write_as(path, config, kernel, initrd, state, memory, MemoryFormat::Compressed)
}

/// [`write`], with memory stored as `format` says. A mappable snapshot
/// stores the runs that are whole pages in memory-image frames and any
/// other (none that [`crate::mem_state::capture_all`] makes) compressed.
pub fn write_as(
    path: &Path,
    config: &MachineConfig,
    kernel: &[u8],
    initrd: Option<&[u8]>,
    state: &MachineState,
    memory: &[PageRun],
    format: MemoryFormat,
) -> Result<PathBuf, SnapshotError> {
    let err = |source| SnapshotError::Container {
        path: path.to_path_buf(),
        source,
    };
    let header = container_header(ContainerKind::Snapshot, config, kernel, initrd);
    // An unfinished snapshot is refused on reading, so fsyncs before the
    // one of `finish` would only make saving wait for the disk (each costs
    // milliseconds, tens of them while other writers keep the disk busy).
    let options = WriterOptions {
        sync_every_frames: 0,
        sync_every_bytes: 0,
        sync_header: false,
        ..WriterOptions::default()
    };
    let mut w = TraceWriter::create_with(path, &header, options).map_err(err)?;
    w.write_records(FrameKind::MachineState, state.exit_seq, std::slice::from_ref(state))
        .map_err(err)?;
    let whole_pages = |r: &&PageRun| {
        let page = crate::mem_state::PAGE_SIZE;
        format == MemoryFormat::Mappable && r.gpa % page == 0 && !r.data.is_empty() && r.data.len() as u64 % page == 0
    };
    let (image, compressed): (Vec<&PageRun>, Vec<&PageRun>) = memory.iter().partition(whole_pages);
    let mut frame: Vec<(u64, &[u8])> = Vec::new();
    let mut bytes = 0usize;
    for r in image {
        if !frame.is_empty() && (bytes + r.data.len() > IMAGE_FRAME_BYTES || frame.len() == nyx_trace::MAX_IMAGE_RUNS) {
            w.write_image(state.exit_seq, &frame).map_err(err)?;
            frame.clear();
            bytes = 0;
        }
        frame.push((r.gpa, &r.data));
        bytes += r.data.len();
    }
    if !frame.is_empty() {
        w.write_image(state.exit_seq, &frame).map_err(err)?;
    }
    for chunk in compressed.chunks(RUNS_PER_FRAME) {
        let chunk: Vec<&PageRun> = chunk.to_vec();
        w.write_records(FrameKind::Memory, state.exit_seq, &chunk)
            .map_err(err)?;
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

/// Checks a saved machine (a snapshot file or a migration stream) frame by
/// frame as it is read, with one set of rules for both: the container's
/// kind, the header's configuration and embedded images, a guest RAM size
/// Nyx can create, every memory run inside that RAM (checked before it is
/// used, so a run cannot reach outside the machine), and exactly one
/// machine state. In a migration stream the memory comes first and nothing
/// may follow the state (the source sends it last).
#[derive(Debug)]
pub struct SavedReader {
    kind: ContainerKind,
    parts: SavedParts,
    state: Option<MachineState>,
    regions: Vec<(u64, u64)>,
    runs: usize,
}

/// What a [`SavedReader`] read: the parts and the one machine state.
pub type SavedMachine = (SavedParts, MachineState);

impl SavedReader {
    /// Starts reading a container of `kind` whose header is `h`.
    pub fn new(kind: ContainerKind, h: &TraceHeader) -> Result<Self, String> {
        if h.kind != kind {
            return Err(format!("it is a {:?} container, not a {kind:?}", h.kind));
        }
        let parts = parse_header(h)?;
        let mib = parts.0.mem_mib;
        if !(2..=65536).contains(&mib) {
            return Err(format!(
                "its machine has {mib} MiB of RAM; Nyx makes machines of 2 to 65536 MiB"
            ));
        }
        Ok(SavedReader {
            kind,
            regions: crate::memory::ram_regions(mib << 20),
            parts,
            state: None,
            runs: 0,
        })
    }

    /// The saved machine's configuration.
    pub fn config(&self) -> &MachineConfig {
        &self.parts.0
    }

    /// Checks the memory runs of one frame: each inside guest RAM.
    pub fn memory(&mut self, runs: &[PageRun]) -> Result<(), String> {
        self.spans(runs.iter().map(|r| (r.gpa, r.data.len() as u64)))
    }

    /// Checks the runs `(gpa, len)` of a memory-image frame: each inside
    /// guest RAM, as any memory run. A migration carries none.
    pub fn image(&mut self, runs: &[nyx_trace::ImageRun]) -> Result<(), String> {
        if self.kind == ContainerKind::Migration {
            return Err("a memory image in a migration stream".into());
        }
        self.spans(runs.iter().map(|r| (r.gpa, r.len)))
    }

    fn spans(&mut self, spans: impl Iterator<Item = (u64, u64)>) -> Result<(), String> {
        if self.kind == ContainerKind::Migration && self.state.is_some() {
            return Err("memory after the machine state".into());
        }
        for (gpa, len) in spans {
            let inside = self
                .regions
                .iter()
                .any(|&(start, size)| gpa >= start && gpa.checked_add(len).is_some_and(|end| end <= start + size));
            if !inside {
                return Err(format!(
                    "a memory run of {len} bytes at {gpa:#x} lies outside the machine's {} MiB of RAM",
                    self.parts.0.mem_mib
                ));
            }
            self.runs += 1;
        }
        Ok(())
    }

    /// Takes the records of a machine-state frame: exactly one state, once.
    pub fn state(&mut self, mut v: Vec<MachineState>) -> Result<(), String> {
        if v.len() != 1 || self.state.is_some() {
            return Err("it must hold exactly one machine state".into());
        }
        self.state = v.pop();
        Ok(())
    }

    /// A frame of another kind: an error in a migration stream, ignored in
    /// a snapshot (a later format may add frames it can do without).
    pub fn other(&mut self, kind: FrameKind, offset: u64) -> Result<(), String> {
        if self.kind == ContainerKind::Migration {
            return Err(format!(
                "a {kind:?} frame at byte {offset} where {} was expected",
                if self.state.is_some() {
                    "the end"
                } else {
                    "memory or the machine state"
                }
            ));
        }
        Ok(())
    }

    /// Memory runs taken so far.
    pub fn runs(&self) -> usize {
        self.runs
    }

    /// The parts and the state, when there was a state.
    pub fn finish(self) -> Result<SavedMachine, String> {
        let state = self.state.ok_or("it holds no machine state")?;
        Ok((self.parts, state))
    }
}

/// Reads a snapshot container, all of its memory into [`Snapshot::memory`].
pub fn read(path: &Path) -> Result<Snapshot, SnapshotError> {
    read_with_progress(path, &mut || {})
}

/// [`read`], calling `frame_done` after each frame.
pub fn read_with_progress(path: &Path, frame_done: &mut dyn FnMut()) -> Result<Snapshot, SnapshotError> {
    read_as(path, false, frame_done)
}

/// Reads a snapshot to restore it: as [`read_with_progress`], except that
/// the memory-image frames of a mappable snapshot are checked (their
/// checksums over every byte, their runs inside guest RAM) and left in the
/// file, in [`Snapshot::image`], for the restore to map.
pub fn read_for_restore(path: &Path, frame_done: &mut dyn FnMut()) -> Result<Snapshot, SnapshotError> {
    read_as(path, true, frame_done)
}

fn read_as(path: &Path, map: bool, frame_done: &mut dyn FnMut()) -> Result<Snapshot, SnapshotError> {
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
    let mut saved = SavedReader::new(ContainerKind::Snapshot, r.header()).map_err(not)?;
    let mut memory = Vec::new();
    let mut spans = Vec::new();
    for i in 0..r.frames().len() {
        let info = r.frames()[i];
        match info.kind {
            FrameKind::MachineState => saved.state(r.read_records(i).map_err(err)?).map_err(not)?,
            FrameKind::Memory => {
                let runs: Vec<PageRun> = r.read_records(i).map_err(err)?;
                saved.memory(&runs).map_err(not)?;
                memory.extend(runs);
            }
            FrameKind::MemoryImage if map => {
                let runs = r.check_image(i).map_err(err)?;
                saved.image(&runs).map_err(not)?;
                spans.extend(runs.iter().map(|run| crate::memory::ImageSpan {
                    gpa: run.gpa,
                    len: run.len,
                    offset: info.payload_offset() + run.offset,
                }));
            }
            FrameKind::MemoryImage => {
                let frame = r.read_frame(i).map_err(err)?;
                let runs = nyx_trace::image_runs(&info, &frame.payload).map_err(err)?;
                saved.image(&runs).map_err(not)?;
                for run in runs {
                    // As capture_all's runs: at most MAX_RUN_BYTES each.
                    let data = &frame.payload[run.offset as usize..(run.offset + run.len) as usize];
                    for (k, chunk) in data.chunks(crate::mem_state::MAX_RUN_BYTES).enumerate() {
                        memory.push(PageRun {
                            gpa: run.gpa + (k * crate::mem_state::MAX_RUN_BYTES) as u64,
                            data: chunk.to_vec(),
                        });
                    }
                }
            }
            kind => saved.other(kind, info.offset).map_err(not)?,
        }
        frame_done();
    }
    let ((config, kernel, initrd), state) = saved.finish().map_err(not)?;
    let image = if spans.is_empty() {
        None
    } else {
        let file = r.file().try_clone().map_err(|e| err(e.into()))?;
        Some(MemoryImage { file, spans })
    };
    Ok(Snapshot {
        config,
        kernel,
        initrd,
        state,
        memory,
        image,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: ContainerKind, mem_mib: u64) -> TraceHeader {
        let config = MachineConfig {
            mem_mib,
            kernel_name: "k".into(),
            cmdline: String::new(),
            has_initrd: false,
            cpuid: vec![],
            cpu_model: "baseline".into(),
            tsc_khz: 1_000_000,
            wall_seconds: 0,
            verify: crate::config::VerifyLevel::Exits,
            irqchip: crate::config::Irqchip::Legacy,
            pci: Vec::new(),
        };
        container_header(kind, &config, b"kernel", None)
    }

    fn run(gpa: u64, len: usize) -> PageRun {
        PageRun {
            gpa,
            data: vec![1; len],
        }
    }

    #[test]
    fn memory_runs_must_lie_inside_ram() {
        let mut r = SavedReader::new(ContainerKind::Snapshot, &header(ContainerKind::Snapshot, 4)).unwrap();
        r.memory(&[run(0, 4096), run((4 << 20) - 4096, 4096)]).unwrap();
        for bad in [
            run((4 << 20) - 4095, 4096),
            run(4 << 20, 1),
            run(u64::MAX - 10, 4096),
            run(crate::memory::MMIO_HOLE_START, 4096),
        ] {
            assert!(r.memory(&[bad]).unwrap_err().contains("outside"));
        }
        assert_eq!(r.runs(), 2);
        assert!(r.finish().unwrap_err().contains("no machine state"));
    }

    #[test]
    fn image_runs_must_lie_inside_ram_and_stay_out_of_migrations() {
        let image = |gpa: u64, len: u64| nyx_trace::ImageRun { gpa, len, offset: 4096 };
        let mut r = SavedReader::new(ContainerKind::Snapshot, &header(ContainerKind::Snapshot, 4)).unwrap();
        r.image(&[image(0, 4096), image(0x1000, 3 << 20)]).unwrap();
        assert!(r.image(&[image(4 << 20, 4096)]).unwrap_err().contains("outside"));
        assert!(r.image(&[image(!0xfff, 4096)]).unwrap_err().contains("outside"));
        assert_eq!(r.runs(), 2);
        let mut m = SavedReader::new(ContainerKind::Migration, &header(ContainerKind::Migration, 4)).unwrap();
        assert!(m.image(&[image(0, 4096)]).unwrap_err().contains("migration"));
    }

    #[test]
    fn kind_and_ram_size_are_checked_before_anything_else() {
        let e = SavedReader::new(ContainerKind::Migration, &header(ContainerKind::Snapshot, 4)).unwrap_err();
        assert!(e.contains("Snapshot container"), "{e}");
        for mib in [0, 1, 65537, u64::MAX >> 20] {
            let e = SavedReader::new(ContainerKind::Migration, &header(ContainerKind::Migration, mib)).unwrap_err();
            assert!(e.contains("MiB of RAM"), "{e}");
        }
    }

    #[test]
    fn a_migration_ends_with_its_state() {
        let mut r = SavedReader::new(ContainerKind::Migration, &header(ContainerKind::Migration, 4)).unwrap();
        assert!(r.other(FrameKind::Events, 99).unwrap_err().contains("byte 99"));
        assert!(r.state(vec![]).is_err());
        let mut s = SavedReader::new(ContainerKind::Snapshot, &header(ContainerKind::Snapshot, 4)).unwrap();
        s.other(FrameKind::Events, 99).unwrap();
    }
}
