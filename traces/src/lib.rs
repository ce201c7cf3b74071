//! nyx-trace: the one container format used by traces, snapshots and the
//! migration stream. A container is a checksummed header (machine
//! configuration and guest images), then independently zstd-compressed,
//! checksummed frames (memory-image frames stored uncompressed and
//! page-aligned, for mapping), then a footer indexing the frames by
//! position.
//! `FORMAT.md` in this crate is the format's description; `format` holds
//! its encoders and decoders, `writer` and `reader` the two directions,
//! `inspect` the summaries behind `nyx trace info` and `nyx trace verify`.
//! Who writes and reads which container: ARCHITECTURE.md at the repository
//! root.

mod error;
mod format;
mod inspect;
mod reader;
mod writer;

pub use error::{Error, Result};
pub use format::{
    image_runs, sha256, ContainerKind, Frame, FrameInfo, FrameKind, GuestImage, ImageRun, Sha256Digest, TraceHeader,
    FORMAT_VERSION, FRAME_HEADER_LEN, IMAGE_ALIGN, MAGIC, MAX_FRAME_LEN, MAX_HEADER_LEN, MAX_IMAGE_RUNS, TRAILER_LEN,
    TRAILER_MAGIC,
};
pub use inspect::{inspect, verify, ImageSummary, KindStats, TraceInfo};
pub use reader::{decode_records, Completeness, FrameIter, StreamReader, TraceReader};
pub use writer::{partial_path, StreamWriter, TraceWriter, WriterOptions, DEFAULT_ZSTD_LEVEL};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_kind_tags_are_stable() {
        // These numbers are on disk; FORMAT.md lists the same ones.
        let tags: Vec<u8> = FrameKind::ALL.iter().map(|k| *k as u8).collect();
        assert_eq!(tags, vec![1, 2, 3, 4, 5]);
        assert_eq!(FrameKind::from_tag(0), None);
        assert_eq!(FrameKind::from_tag(3), Some(FrameKind::Memory));
    }
}
