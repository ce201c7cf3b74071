//! The on-disk (and on-wire) pieces of the container, each with its encoder
//! and decoder side by side: the file header, the frame header, the trailer,
//! and the zstd blocks. `FORMAT.md` beside this crate describes the same
//! layout in prose; change both together.

use std::io::Read;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The first eight bytes of every Nyx container.
pub const MAGIC: [u8; 8] = *b"NYXTRACE";
/// The last eight bytes of a finished container.
pub const TRAILER_MAGIC: [u8; 8] = *b"NYXTRAIL";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 8;
/// Cap on a frame's compressed and uncompressed payload.
pub const MAX_FRAME_LEN: u32 = 256 << 20;
/// Cap on the file header's compressed and uncompressed body.
pub const MAX_HEADER_LEN: u32 = 64 << 20;
/// Bytes before the header body: magic, version, two lengths, checksum.
pub const HEADER_PREFIX_LEN: usize = 24;
/// Bytes of a frame header.
pub const FRAME_HEADER_LEN: usize = 24;
/// Bytes of the trailer: index offset, checksum, magic.
pub const TRAILER_LEN: usize = 20;

/// What a container holds as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerKind {
    /// A recording: keyframes and events.
    Trace,
    /// One keyframe and no events.
    Snapshot,
    /// Frames sent to another Nyx while a machine moves there.
    Migration,
}

/// A SHA-256 digest.
pub type Sha256Digest = [u8; 32];

/// A guest image (kernel, initrd, firmware) the machine was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestImage {
    /// The name the machine configuration refers to it by.
    pub name: String,
    /// SHA-256 of the image's bytes.
    pub sha256: Sha256Digest,
    /// The bytes themselves when embedded; `None` when only the hash is kept.
    pub data: Option<Vec<u8>>,
}

impl GuestImage {
    /// An image stored inside the container, with its hash.
    pub fn embedded(name: impl Into<String>, data: Vec<u8>) -> Self {
        Self {
            name: name.into(),
            sha256: sha256(&data),
            data: Some(data),
        }
    }

    /// An image referred to by hash only; the reader must find it elsewhere.
    pub fn by_hash(name: impl Into<String>, data: &[u8]) -> Self {
        Self {
            name: name.into(),
            sha256: sha256(data),
            data: None,
        }
    }

    /// Whether `data` is this image's content.
    pub fn matches(&self, data: &[u8]) -> bool {
        sha256(data) == self.sha256
    }
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> Sha256Digest {
    Sha256::digest(data).into()
}

/// Everything before the first frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceHeader {
    /// Identifies this recording; 16 random bytes chosen by the caller.
    pub uuid: [u8; 16],
    /// The version of Nyx that wrote the container.
    pub nyx_version: String,
    /// Trace, snapshot or migration stream.
    pub kind: ContainerKind,
    /// The serde-encoded machine configuration; opaque to this crate.
    pub machine_config: Vec<u8>,
    /// The guest images, embedded or by hash.
    pub images: Vec<GuestImage>,
}

/// What a frame's payload holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(u8)]
pub enum FrameKind {
    /// Nondeterministic inputs and their positions.
    Events = 1,
    /// Registers and device state; a keyframe starts with one.
    MachineState = 2,
    /// Runs of guest pages.
    Memory = 3,
    /// The footer's index; written only by `finish()`.
    Index = 4,
    /// Runs of guest pages stored as they are (not compressed), each
    /// starting on a page boundary of the file, so that a reader can map
    /// them (see [`image_runs`]).
    MemoryImage = 5,
}

impl FrameKind {
    /// Every kind, in tag order.
    pub const ALL: [FrameKind; 5] = [
        FrameKind::Events,
        FrameKind::MachineState,
        FrameKind::Memory,
        FrameKind::Index,
        FrameKind::MemoryImage,
    ];

    /// Whether frames of this kind are stored as they are rather than
    /// zstd-compressed (their two lengths are then equal).
    pub fn is_stored(self) -> bool {
        self == FrameKind::MemoryImage
    }

    /// The kind stored as `tag`, if any.
    pub fn from_tag(tag: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u8 == tag)
    }
}

/// Where a frame is and what it says about itself; one index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameInfo {
    /// The payload's kind.
    pub kind: FrameKind,
    /// The position (`exit_seq`) of the payload's first record.
    pub first_position: u64,
    /// Byte offset of the frame header from the start of the container.
    pub offset: u64,
    /// Payload bytes before compression.
    pub uncompressed_len: u32,
    /// Payload bytes as stored.
    pub compressed_len: u32,
}

impl FrameInfo {
    /// Bytes the frame occupies: header plus compressed payload.
    pub fn stored_len(&self) -> u64 {
        FRAME_HEADER_LEN as u64 + u64::from(self.compressed_len)
    }

    /// Byte offset just past the frame.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.stored_len())
    }
}

impl FrameInfo {
    /// Byte offset of the payload from the start of the container.
    pub fn payload_offset(&self) -> u64 {
        self.offset.saturating_add(FRAME_HEADER_LEN as u64)
    }
}

/// The alignment, in the file, of the data of a [`FrameKind::MemoryImage`]
/// frame: a page, so that each run can be mapped where it lies.
pub const IMAGE_ALIGN: u64 = 4096;
/// The most runs one memory-image frame lists.
pub const MAX_IMAGE_RUNS: usize = 4096;

/// One run of a memory-image frame: `len` bytes for guest address `gpa`,
/// found `offset` bytes into the frame's payload (add
/// [`FrameInfo::payload_offset`] for the file offset, a multiple of
/// [`IMAGE_ALIGN`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageRun {
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Bytes, a non-zero multiple of [`IMAGE_ALIGN`].
    pub len: u64,
    /// Where the bytes start in the payload.
    pub offset: u64,
}

fn image_corrupt(offset: u64, detail: String) -> Error {
    Error::Corrupt {
        what: "memory image",
        offset,
        detail,
    }
}

/// The start of a memory-image payload that begins at file offset
/// `payload_offset`: the run count, a reserved word, each run's `(gpa,
/// len)`, and zeros up to the next multiple of [`IMAGE_ALIGN`] in the file,
/// where the first run's bytes begin. Refuses what a reader would.
pub(crate) fn encode_image_table(runs: &[(u64, u64)], payload_offset: u64) -> Result<Vec<u8>> {
    let bad = |detail: String| image_corrupt(payload_offset, detail);
    if runs.is_empty() || runs.len() > MAX_IMAGE_RUNS {
        return Err(bad(format!("{} runs (1 to {MAX_IMAGE_RUNS})", runs.len())));
    }
    let mut table = Vec::with_capacity(8 + runs.len() * 16 + IMAGE_ALIGN as usize);
    table.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    for &(gpa, len) in runs {
        if gpa % IMAGE_ALIGN != 0 || len == 0 || len % IMAGE_ALIGN != 0 {
            return Err(bad(format!("a run of {len} bytes at {gpa:#x} is not whole pages")));
        }
        table.extend_from_slice(&gpa.to_le_bytes());
        table.extend_from_slice(&len.to_le_bytes());
    }
    let end = payload_offset + table.len() as u64;
    table.resize(table.len() + (end.next_multiple_of(IMAGE_ALIGN) - end) as usize, 0);
    Ok(table)
}

/// The longest table [`encode_image_table`] makes, padding included.
pub(crate) const MAX_IMAGE_TABLE: usize = 8 + MAX_IMAGE_RUNS * 16 + IMAGE_ALIGN as usize;

/// The runs of a memory-image frame, from the start of its payload
/// (`head`, at least the table and its padding, or the whole payload) and
/// its header fields: each run whole pages, the table and the padding
/// well formed, and the runs filling the payload exactly. Data offsets are
/// relative to the payload; no run is checked against any machine.
pub fn image_runs(info: &FrameInfo, head: &[u8]) -> Result<Vec<ImageRun>> {
    let at = info.payload_offset();
    let bad = |detail: String| image_corrupt(at, detail);
    if info.kind != FrameKind::MemoryImage {
        return Err(bad(format!("a {:?} frame is not a memory image", info.kind)));
    }
    if head.len() < 8 {
        return Err(bad("the run table is cut short".into()));
    }
    let count = le_u32(&head[..4]) as usize;
    if count == 0 || count > MAX_IMAGE_RUNS || le_u32(&head[4..8]) != 0 {
        return Err(bad(format!("{count} runs, or a reserved word that is not zero")));
    }
    let table_end = 8 + count * 16;
    let Some(data_start) = at
        .checked_add(table_end as u64)
        .and_then(|end| end.checked_next_multiple_of(IMAGE_ALIGN))
        .map(|end| end - at)
    else {
        return Err(bad("the frame lies beyond any file".into()));
    };
    let Some(table) = head.get(..data_start as usize) else {
        return Err(bad("the run table is cut short".into()));
    };
    if table[table_end..].iter().any(|&b| b != 0) {
        return Err(bad("the padding after the run table is not zero".into()));
    }
    let mut runs = Vec::with_capacity(count);
    let mut offset = data_start;
    for entry in table[8..table_end].chunks_exact(16) {
        let (gpa, len) = (le_u64(&entry[..8]), le_u64(&entry[8..]));
        if gpa % IMAGE_ALIGN != 0 || len == 0 || len % IMAGE_ALIGN != 0 || gpa.checked_add(len).is_none() {
            return Err(bad(format!("a run of {len} bytes at {gpa:#x} is not whole pages")));
        }
        runs.push(ImageRun { gpa, len, offset });
        offset = offset.saturating_add(len);
    }
    if offset != u64::from(info.uncompressed_len) || info.uncompressed_len != info.compressed_len {
        return Err(bad(format!(
            "the runs end at payload byte {offset}, the frame holds {} (stored {})",
            info.uncompressed_len, info.compressed_len
        )));
    }
    Ok(runs)
}

/// A frame read back: where it was and its decompressed payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The frame's header fields and offset.
    pub info: FrameInfo,
    /// The decompressed payload.
    pub payload: Vec<u8>,
}

/// A frame header as stored, before its checksum is verified against the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    pub kind: FrameKind,
    pub first_position: u64,
    pub uncompressed_len: u32,
    pub compressed_len: u32,
    pub checksum: u32,
}

impl FrameHeader {
    fn fields(kind: FrameKind, first_position: u64, ulen: u32, clen: u32) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[0] = kind as u8;
        b[4..12].copy_from_slice(&first_position.to_le_bytes());
        b[12..16].copy_from_slice(&ulen.to_le_bytes());
        b[16..20].copy_from_slice(&clen.to_le_bytes());
        b
    }

    /// The header of a frame of a stored kind ([`FrameKind::is_stored`])
    /// whose payload is the concatenation of `parts`.
    pub fn stored(kind: FrameKind, first_position: u64, parts: &[&[u8]]) -> Result<Self> {
        let len = checked_len(parts.iter().map(|p| p.len()).sum(), MAX_FRAME_LEN, "frame payload")?;
        let fields = Self::fields(kind, first_position, len, len);
        let mut all: Vec<&[u8]> = vec![&fields];
        all.extend_from_slice(parts);
        Ok(Self {
            kind,
            first_position,
            uncompressed_len: len,
            compressed_len: len,
            checksum: crc(&all),
        })
    }

    /// Compresses `payload` and builds the header that describes it.
    pub fn build(kind: FrameKind, first_position: u64, payload: &[u8], level: i32) -> Result<(Self, Vec<u8>)> {
        let uncompressed_len = checked_len(payload.len(), MAX_FRAME_LEN, "frame payload")?;
        let compressed = compress(payload, level)?;
        let compressed_len = checked_len(compressed.len(), MAX_FRAME_LEN, "compressed frame")?;
        let fields = Self::fields(kind, first_position, uncompressed_len, compressed_len);
        let checksum = crc(&[&fields, &compressed]);
        Ok((
            Self {
                kind,
                first_position,
                uncompressed_len,
                compressed_len,
                checksum,
            },
            compressed,
        ))
    }

    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[..20].copy_from_slice(&Self::fields(
            self.kind,
            self.first_position,
            self.uncompressed_len,
            self.compressed_len,
        ));
        b[20..].copy_from_slice(&self.checksum.to_le_bytes());
        b
    }

    /// Parses a stored header; `offset` is only for error messages.
    pub fn decode(b: &[u8; FRAME_HEADER_LEN], offset: u64) -> Result<Self> {
        let kind = FrameKind::from_tag(b[0]).ok_or_else(|| Error::Corrupt {
            what: "frame header",
            offset,
            detail: format!("unknown frame kind tag {}", b[0]),
        })?;
        if b[1..4] != [0, 0, 0] {
            return Err(Error::Corrupt {
                what: "frame header",
                offset,
                detail: "reserved bytes are not zero".into(),
            });
        }
        let uncompressed_len = le_u32(&b[12..16]);
        let compressed_len = le_u32(&b[16..20]);
        for (what, len) in [
            ("frame payload", uncompressed_len),
            ("compressed frame", compressed_len),
        ] {
            if len > MAX_FRAME_LEN {
                return Err(Error::LengthBeyondLimit {
                    what,
                    len: len.into(),
                    limit: MAX_FRAME_LEN.into(),
                    offset,
                });
            }
        }
        if kind.is_stored() && uncompressed_len != compressed_len {
            return Err(Error::Corrupt {
                what: "frame header",
                offset,
                detail: format!(
                    "a stored {kind:?} frame of {compressed_len} bytes says it expands to {uncompressed_len}"
                ),
            });
        }
        Ok(Self {
            kind,
            first_position: le_u64(&b[4..12]),
            uncompressed_len,
            compressed_len,
            checksum: le_u32(&b[20..24]),
        })
    }

    /// The checksum of the header fields followed by the payload, as a
    /// hasher to feed the payload into piece by piece.
    pub fn hasher(&self) -> crc32fast::Hasher {
        let mut h = crc32fast::Hasher::new();
        h.update(&Self::fields(
            self.kind,
            self.first_position,
            self.uncompressed_len,
            self.compressed_len,
        ));
        h
    }

    /// Whether `compressed` is the payload this header was written with.
    pub fn verify(&self, compressed: &[u8]) -> bool {
        let fields = Self::fields(
            self.kind,
            self.first_position,
            self.uncompressed_len,
            self.compressed_len,
        );
        crc(&[&fields, compressed]) == self.checksum
    }

    pub fn info(&self, offset: u64) -> FrameInfo {
        FrameInfo {
            kind: self.kind,
            first_position: self.first_position,
            offset,
            uncompressed_len: self.uncompressed_len,
            compressed_len: self.compressed_len,
        }
    }
}

/// Encodes the file header: magic, version, lengths, checksum, zstd body.
pub(crate) fn encode_header(header: &TraceHeader, level: i32) -> Result<Vec<u8>> {
    let body = postcard::to_stdvec(header).map_err(|source| Error::Encode { what: "header", source })?;
    let ulen = checked_len(body.len(), MAX_HEADER_LEN, "header")?;
    let compressed = compress(&body, level)?;
    let clen = checked_len(compressed.len(), MAX_HEADER_LEN, "compressed header")?;
    let mut out = Vec::with_capacity(HEADER_PREFIX_LEN + compressed.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&ulen.to_le_bytes());
    out.extend_from_slice(&clen.to_le_bytes());
    let checksum = crc(&[&out[8..20], &compressed]);
    out.extend_from_slice(&checksum.to_le_bytes());
    out.extend_from_slice(&compressed);
    Ok(out)
}

/// Reads and checks the file header from the start of `r`; returns it and
/// its stored length (the offset of the first frame).
pub(crate) fn read_header<R: Read>(r: &mut R) -> Result<(TraceHeader, u64)> {
    let mut prefix = [0u8; HEADER_PREFIX_LEN];
    let got = read_fully(r, &mut prefix)?;
    if got < MAGIC.len() || prefix[..8] != MAGIC {
        if got < MAGIC.len() && prefix[..got] == MAGIC[..got] {
            return Err(Error::Truncated {
                offset: 0,
                what: "header",
            });
        }
        return Err(Error::NotNyxFile);
    }
    if got >= 12 {
        let found = le_u32(&prefix[8..12]);
        if found != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                found,
                expected: FORMAT_VERSION,
            });
        }
    }
    if got < HEADER_PREFIX_LEN {
        return Err(Error::Truncated {
            offset: 0,
            what: "header",
        });
    }
    let ulen = le_u32(&prefix[12..16]);
    let clen = le_u32(&prefix[16..20]);
    for (what, len) in [("header", ulen), ("compressed header", clen)] {
        if len > MAX_HEADER_LEN {
            return Err(Error::LengthBeyondLimit {
                what,
                len: len.into(),
                limit: MAX_HEADER_LEN.into(),
                offset: 0,
            });
        }
    }
    let compressed = read_up_to(r, clen)?.ok_or(Error::Truncated {
        offset: 0,
        what: "header",
    })?;
    if crc(&[&prefix[8..20], &compressed]) != le_u32(&prefix[20..24]) {
        return Err(Error::ChecksumMismatch {
            what: "header",
            frame: None,
            offset: 0,
        });
    }
    let body = decompress(&compressed, ulen, 0)?;
    let header: TraceHeader = postcard::from_bytes(&body).map_err(|source| Error::Decode {
        what: "header",
        offset: 0,
        source,
    })?;
    for image in &header.images {
        if let Some(data) = &image.data {
            if !image.matches(data) {
                return Err(Error::ImageHashMismatch {
                    name: image.name.clone(),
                });
            }
        }
    }
    Ok((header, HEADER_PREFIX_LEN as u64 + u64::from(clen)))
}

/// Encodes the trailer that points at the index frame.
pub(crate) fn encode_trailer(index_offset: u64) -> [u8; TRAILER_LEN] {
    let mut b = [0u8; TRAILER_LEN];
    b[..8].copy_from_slice(&index_offset.to_le_bytes());
    b[12..].copy_from_slice(&TRAILER_MAGIC);
    let checksum = crc(&[&b[..8], &TRAILER_MAGIC]);
    b[8..12].copy_from_slice(&checksum.to_le_bytes());
    b
}

/// Whether the bytes look like a trailer at all (its magic is in place).
pub(crate) fn has_trailer_magic(b: &[u8; TRAILER_LEN]) -> bool {
    b[12..] == TRAILER_MAGIC
}

/// Parses a trailer whose magic is in place; returns the index offset.
pub(crate) fn decode_trailer(b: &[u8; TRAILER_LEN], offset: u64) -> Result<u64> {
    if !has_trailer_magic(b) {
        return Err(Error::Corrupt {
            what: "trailer",
            offset,
            detail: "the trailer magic `NYXTRAIL` is missing after the index".into(),
        });
    }
    if crc(&[&b[..8], &b[12..]]) != le_u32(&b[8..12]) {
        return Err(Error::ChecksumMismatch {
            what: "trailer",
            frame: None,
            offset,
        });
    }
    Ok(le_u64(&b[..8]))
}

/// zstd-compresses `data`.
pub(crate) fn compress(data: &[u8], level: i32) -> Result<Vec<u8>> {
    Ok(zstd::bulk::compress(data, level)?)
}

/// Decompresses a block that must expand to exactly `expected` bytes.
pub(crate) fn decompress(data: &[u8], expected: u32, offset: u64) -> Result<Vec<u8>> {
    let out = zstd::bulk::decompress(data, expected as usize).map_err(|e| Error::Decompress {
        offset,
        detail: e.to_string(),
    })?;
    if out.len() != expected as usize {
        return Err(Error::Decompress {
            offset,
            detail: format!("expanded to {} bytes, header says {expected}", out.len()),
        });
    }
    Ok(out)
}

/// CRC-32 over the concatenation of `parts`.
pub(crate) fn crc(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

/// Reads until `buf` is full or the input ends; returns how many bytes came.
pub(crate) fn read_fully<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

/// Reads exactly `len` bytes, growing the buffer only as bytes arrive (a
/// damaged length never allocates more than the input holds). `None` when
/// the input ends first.
pub(crate) fn read_up_to<R: Read>(r: &mut R, len: u32) -> Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity((len as usize).min(1 << 20));
    r.by_ref().take(u64::from(len)).read_to_end(&mut buf)?;
    Ok((buf.len() == len as usize).then_some(buf))
}

fn checked_len(len: usize, limit: u32, what: &'static str) -> Result<u32> {
    match u32::try_from(len) {
        Ok(l) if l <= limit => Ok(l),
        _ => Err(Error::LengthBeyondLimit {
            what,
            len: len as u64,
            limit: limit.into(),
            offset: 0,
        }),
    }
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> TraceHeader {
        TraceHeader {
            uuid: [7; 16],
            nyx_version: "0.1.0".into(),
            kind: ContainerKind::Snapshot,
            machine_config: vec![1, 2, 3],
            images: vec![
                GuestImage::embedded("kernel", b"\x7fELF...".to_vec()),
                GuestImage::by_hash("initrd", b"cpio"),
            ],
        }
    }

    fn image_info(offset: u64, len: u32) -> FrameInfo {
        FrameInfo {
            kind: FrameKind::MemoryImage,
            first_position: 0,
            offset,
            uncompressed_len: len,
            compressed_len: len,
        }
    }

    #[test]
    fn image_tables_round_trip_and_pad_to_a_page() {
        let runs = [(0x3000, 4096), (0x10_0000, 3 * 4096)];
        for offset in [0u64, 100, 4072, 4096 * 9 + 1] {
            let table = encode_image_table(&runs, offset + FRAME_HEADER_LEN as u64).unwrap();
            assert_eq!((offset + FRAME_HEADER_LEN as u64 + table.len() as u64) % IMAGE_ALIGN, 0);
            let info = image_info(offset, (table.len() + 4 * 4096) as u32);
            let got = image_runs(&info, &table).unwrap();
            let spans: Vec<(u64, u64)> = got.iter().map(|r| (r.gpa, r.len)).collect();
            assert_eq!(spans, runs);
            assert_eq!(got[1].offset, got[0].offset + 4096);
        }
        for bad in [vec![], vec![(0x3001, 4096)], vec![(0x3000, 100)], vec![(0, 0)]] {
            assert!(encode_image_table(&bad, 24).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_damaged_image_table_is_an_error() {
        let table = encode_image_table(&[(0x3000, 4096)], 24).unwrap();
        let info = image_info(0, (table.len() + 4096) as u32);
        let mut cases = Vec::new();
        let mut t = table.clone();
        t[0] = 0; // no runs
        cases.push((t, info));
        let mut t = table.clone();
        t[4] = 1; // reserved word
        cases.push((t, info));
        let mut t = table.clone();
        t[30] = 1; // padding
        cases.push((t, info));
        let mut t = table.clone();
        t[8] = 1; // an unaligned address
        cases.push((t, info));
        cases.push((table.clone(), image_info(0, (table.len() + 8192) as u32)));
        cases.push((table[..20].to_vec(), info));
        cases.push((table.clone(), image_info(u64::MAX - 10, (table.len() + 4096) as u32)));
        let mut other = info;
        other.kind = FrameKind::Memory;
        cases.push((table.clone(), other));
        for (i, (head, info)) in cases.iter().enumerate() {
            assert!(image_runs(info, head).is_err(), "case {i}");
        }
        assert!(image_runs(&info, &table).is_ok());
    }

    #[test]
    fn header_round_trips() {
        let bytes = encode_header(&header(), 3).unwrap();
        let (back, len) = read_header(&mut bytes.as_slice()).unwrap();
        assert_eq!(back, header());
        assert_eq!(len, bytes.len() as u64);
    }

    #[test]
    fn wrong_version_names_both() {
        let mut bytes = encode_header(&header(), 3).unwrap();
        bytes[8] = 9;
        match read_header(&mut bytes.as_slice()) {
            Err(Error::UnsupportedVersion { found: 9, expected }) => {
                assert_eq!(expected, FORMAT_VERSION)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn other_files_are_not_nyx() {
        assert!(matches!(
            read_header(&mut &b"\x7fELF\x02\x01\x01\0\0\0\0\0"[..]),
            Err(Error::NotNyxFile)
        ));
        assert!(matches!(read_header(&mut &b"NYX"[..]), Err(Error::Truncated { .. })));
    }

    #[test]
    fn tampered_image_is_refused() {
        let mut h = header();
        if let Some(d) = h.images[0].data.as_mut() {
            d[0] ^= 1;
        }
        let bytes = encode_header(&h, 3).unwrap();
        assert!(matches!(
            read_header(&mut bytes.as_slice()),
            Err(Error::ImageHashMismatch { name }) if name == "kernel"
        ));
    }

    #[test]
    fn huge_header_length_is_refused_without_allocating() {
        let mut bytes = encode_header(&header(), 3).unwrap();
        bytes[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_header(&mut bytes.as_slice()),
            Err(Error::LengthBeyondLimit { .. })
        ));
    }

    #[test]
    fn frame_header_round_trips_and_checks_payload() {
        let (h, compressed) = FrameHeader::build(FrameKind::Memory, 42, b"pages", 3).unwrap();
        let back = FrameHeader::decode(&h.encode(), 0).unwrap();
        assert_eq!(back, h);
        assert!(back.verify(&compressed));
        let mut bad = compressed.clone();
        bad[0] ^= 0x80;
        assert!(!back.verify(&bad));
        assert_eq!(decompress(&compressed, 5, 0).unwrap(), b"pages");
        assert!(decompress(&compressed, 4, 0).is_err());
    }

    #[test]
    fn frame_header_refuses_unknown_kind_and_huge_lengths() {
        let (h, _) = FrameHeader::build(FrameKind::Events, 1, b"", 3).unwrap();
        let mut b = h.encode();
        b[0] = 0;
        assert!(matches!(
            FrameHeader::decode(&b, 5),
            Err(Error::Corrupt { offset: 5, .. })
        ));
        let mut b = h.encode();
        b[16..20].copy_from_slice(&(MAX_FRAME_LEN + 1).to_le_bytes());
        assert!(matches!(
            FrameHeader::decode(&b, 0),
            Err(Error::LengthBeyondLimit { .. })
        ));
    }

    #[test]
    fn trailer_round_trips_and_detects_damage() {
        let t = encode_trailer(1234);
        assert_eq!(decode_trailer(&t, 0).unwrap(), 1234);
        let mut bad = t;
        bad[3] ^= 1;
        assert!(matches!(decode_trailer(&bad, 0), Err(Error::ChecksumMismatch { .. })));
    }

    #[test]
    fn read_up_to_reports_short_input() {
        assert_eq!(read_up_to(&mut &b"abc"[..], 3).unwrap(), Some(b"abc".to_vec()));
        assert_eq!(read_up_to(&mut &b"ab"[..], 3).unwrap(), None);
    }
}
