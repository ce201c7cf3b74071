//! The one error type of the container format: every way a file, a stream or
//! a caller's request can be wrong, each with the byte offset it concerns so a
//! damaged trace can be located with a hex dump.

use std::io;

/// What went wrong while writing or reading a Nyx container.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The underlying file or stream failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),

    /// The input does not start with the `NYXTRACE` magic.
    #[error("not a Nyx trace, snapshot or migration stream: the first 8 bytes are not `NYXTRACE`")]
    NotNyxFile,

    /// The file was written by a Nyx with another format version.
    #[error("unsupported format version {found}: this Nyx reads version {expected} only")]
    UnsupportedVersion {
        /// The version stored in the file.
        found: u32,
        /// The version this build reads and writes.
        expected: u32,
    },

    /// The input ends in the middle of something that must be complete.
    #[error("truncated at byte {offset}: the {what} is cut short")]
    Truncated {
        /// Where the cut-short item starts.
        offset: u64,
        /// What was being read.
        what: &'static str,
    },

    /// Stored and computed CRC-32 differ.
    #[error("checksum mismatch in the {what} at byte {offset}{}", frame_suffix(*.frame))]
    ChecksumMismatch {
        /// What was being read (header, frame, trailer).
        what: &'static str,
        /// The frame's number in file order, when it is a frame.
        frame: Option<usize>,
        /// Where the damaged item starts.
        offset: u64,
    },

    /// A length field (read or about to be written) exceeds the format's cap.
    #[error("{what} of {len} bytes at byte {offset} is beyond the limit of {limit} bytes")]
    LengthBeyondLimit {
        /// Which length.
        what: &'static str,
        /// The length found or requested.
        len: u64,
        /// The cap.
        limit: u64,
        /// Where the length field is (0 when writing).
        offset: u64,
    },

    /// zstd could not decompress a payload, or it did not have the stated size.
    #[error("decompression failed for the block at byte {offset}: {detail}")]
    Decompress {
        /// Where the block starts.
        offset: u64,
        /// zstd's message or the size disagreement.
        detail: String,
    },

    /// A checksummed block decompressed fine but its serde content did not decode.
    #[error("decoding the {what} at byte {offset} failed: {source}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// Where its block starts.
        offset: u64,
        /// postcard's reason.
        source: postcard::Error,
    },

    /// A value could not be encoded with postcard.
    #[error("encoding the {what} failed: {source}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// postcard's reason.
        source: postcard::Error,
    },

    /// Structurally wrong content that passed its checksum, or a footer that
    /// disagrees with the frames it describes.
    #[error("corrupt {what} at byte {offset}: {detail}")]
    Corrupt {
        /// Which structure.
        what: &'static str,
        /// Where it starts.
        offset: u64,
        /// What is inconsistent.
        detail: String,
    },

    /// Callers may not write `FrameKind::Index`: the writer owns the footer.
    #[error("frame kind Index is reserved for the footer that finish() writes")]
    ReservedKind,

    /// Frames must be written in non-decreasing position order so that seeking works.
    #[error("frame position {position} is before the previous frame's position {previous}")]
    PositionWentBack {
        /// The position the caller gave.
        position: u64,
        /// The previous frame's position.
        previous: u64,
    },

    /// An embedded guest image does not hash to the SHA-256 stored beside it.
    #[error("embedded guest image `{name}` does not match its SHA-256")]
    ImageHashMismatch {
        /// The image's name.
        name: String,
    },

    /// The caller asked for a frame number past the end.
    #[error("no frame {index}: there are {count} frames")]
    NoSuchFrame {
        /// The requested frame number.
        index: usize,
        /// How many frames there are.
        count: usize,
    },
}

fn frame_suffix(frame: Option<usize>) -> String {
    frame.map(|n| format!(" (frame {n})")).unwrap_or_default()
}

/// Result with the container's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_error_names_both_versions() {
        let msg = Error::UnsupportedVersion { found: 7, expected: 1 }.to_string();
        assert!(msg.contains('7') && msg.contains('1'), "{msg}");
    }

    #[test]
    fn checksum_error_names_the_frame_when_there_is_one() {
        let with = Error::ChecksumMismatch {
            what: "frame",
            frame: Some(3),
            offset: 99,
        }
        .to_string();
        let without = Error::ChecksumMismatch {
            what: "header",
            frame: None,
            offset: 8,
        }
        .to_string();
        assert!(with.contains("frame 3") && with.contains("99"), "{with}");
        assert!(!without.contains("(frame"), "{without}");
    }
}
