//! Summaries of a container for `nyx trace info` (from the frame table, no
//! decompression) and `nyx trace verify` (every frame read, checked and
//! decompressed).

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::Result;
use crate::format::{ContainerKind, FrameKind, Sha256Digest};
use crate::reader::{Completeness, TraceReader};

/// Frame count and sizes of one kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindStats {
    /// Frames of this kind.
    pub frames: u64,
    /// Payload bytes as stored.
    pub compressed_bytes: u64,
    /// Payload bytes after decompression.
    pub uncompressed_bytes: u64,
}

impl KindStats {
    fn add(&mut self, compressed: u32, uncompressed: u32) {
        self.frames += 1;
        self.compressed_bytes += u64::from(compressed);
        self.uncompressed_bytes += u64::from(uncompressed);
    }
}

/// A guest image as the header lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    /// The image's name.
    pub name: String,
    /// Its SHA-256.
    pub sha256: Sha256Digest,
    /// Its size when embedded; `None` when stored by hash only.
    pub embedded_bytes: Option<u64>,
}

/// What `nyx trace info` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceInfo {
    /// The recording's UUID.
    pub uuid: [u8; 16],
    /// The Nyx version that wrote it.
    pub nyx_version: String,
    /// Trace, snapshot or migration stream.
    pub kind: ContainerKind,
    /// Size of the machine configuration blob.
    pub machine_config_bytes: u64,
    /// The guest images.
    pub images: Vec<ImageSummary>,
    /// Counts and sizes per frame kind (the footer's index not included).
    pub by_kind: BTreeMap<FrameKind, KindStats>,
    /// The sums over all kinds.
    pub total: KindStats,
    /// `first_position` of the first and last frame.
    pub positions: Option<(u64, u64)>,
    /// Size of the file.
    pub file_bytes: u64,
    /// Whether it was finished.
    pub completeness: Completeness,
}

impl TraceReader {
    /// Summarizes the container from its header and frame table.
    pub fn info(&self) -> TraceInfo {
        let header = self.header();
        let mut by_kind: BTreeMap<FrameKind, KindStats> = BTreeMap::new();
        let mut total = KindStats::default();
        for f in self.frames() {
            by_kind
                .entry(f.kind)
                .or_default()
                .add(f.compressed_len, f.uncompressed_len);
            total.add(f.compressed_len, f.uncompressed_len);
        }
        let positions = self
            .frames()
            .first()
            .zip(self.frames().last())
            .map(|(a, b)| (a.first_position, b.first_position));
        TraceInfo {
            uuid: header.uuid,
            nyx_version: header.nyx_version.clone(),
            kind: header.kind,
            machine_config_bytes: header.machine_config.len() as u64,
            images: header
                .images
                .iter()
                .map(|i| ImageSummary {
                    name: i.name.clone(),
                    sha256: i.sha256,
                    embedded_bytes: i.data.as_ref().map(|d| d.len() as u64),
                })
                .collect(),
            by_kind,
            total,
            positions,
            file_bytes: self.file_len(),
            completeness: self.completeness(),
        }
    }

    /// Reads, checksums and decompresses every frame; the first failure is
    /// returned as the error.
    pub fn verify(&mut self) -> Result<TraceInfo> {
        for i in 0..self.frames().len() {
            self.read_frame(i)?;
        }
        Ok(self.info())
    }
}

/// Opens `path` and summarizes it without decompressing frames.
pub fn inspect(path: impl AsRef<Path>) -> Result<TraceInfo> {
    Ok(TraceReader::open(path)?.info())
}

/// Opens `path`, reads every frame, and summarizes it.
pub fn verify(path: impl AsRef<Path>) -> Result<TraceInfo> {
    TraceReader::open(path)?.verify()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{GuestImage, TraceHeader};
    use crate::writer::TraceWriter;

    #[test]
    fn info_counts_frames_and_bytes_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.nyx");
        let header = TraceHeader {
            uuid: [3; 16],
            nyx_version: "v".into(),
            kind: ContainerKind::Snapshot,
            machine_config: vec![0; 10],
            images: vec![GuestImage::embedded("k", vec![1; 33]), GuestImage::by_hash("r", b"x")],
        };
        let mut w = TraceWriter::create(&path, &header).unwrap();
        w.write_frame(FrameKind::MachineState, 5, &[1; 100]).unwrap();
        w.write_frame(FrameKind::Memory, 5, &[0; 8192]).unwrap();
        w.write_frame(FrameKind::Memory, 5, &[0; 4096]).unwrap();
        let frames = w.frames().to_vec();
        w.finish().unwrap();

        let info = verify(&path).unwrap();
        assert_eq!(info.completeness, Completeness::Complete);
        assert_eq!(info.kind, ContainerKind::Snapshot);
        assert_eq!(info.machine_config_bytes, 10);
        assert_eq!(info.images[0].embedded_bytes, Some(33));
        assert_eq!(info.images[1].embedded_bytes, None);
        let mem = info.by_kind[&FrameKind::Memory];
        assert_eq!(mem.frames, 2);
        assert_eq!(mem.uncompressed_bytes, 8192 + 4096);
        assert_eq!(
            mem.compressed_bytes,
            u64::from(frames[1].compressed_len + frames[2].compressed_len)
        );
        assert!(mem.compressed_bytes < mem.uncompressed_bytes);
        assert_eq!(info.total.frames, 3);
        assert_eq!(info.total.uncompressed_bytes, 100 + 8192 + 4096);
        assert!(!info.by_kind.contains_key(&FrameKind::Events));
        assert_eq!(info.positions, Some((5, 5)));
        assert_eq!(info.file_bytes, std::fs::metadata(&path).unwrap().len());
        assert_eq!(inspect(&path).unwrap(), info);
    }

    #[test]
    fn verify_finds_a_damaged_payload_that_info_does_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.nyx");
        let header = TraceHeader {
            uuid: [0; 16],
            nyx_version: "v".into(),
            kind: ContainerKind::Trace,
            machine_config: vec![],
            images: vec![],
        };
        let mut w = TraceWriter::create(&path, &header).unwrap();
        let f = w.write_frame(FrameKind::Events, 0, b"some events").unwrap();
        w.finish().unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[f.end() as usize - 1] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();
        assert!(inspect(&path).is_ok());
        assert!(matches!(
            verify(&path),
            Err(crate::Error::ChecksumMismatch { frame: Some(0), .. })
        ));
    }
}
