//! Reading containers: [`TraceReader`] opens a file (finished, `.partial`, or
//! cut short), finds its frames through the footer's index or by scanning,
//! and seeks to keyframes; [`StreamReader`] reads frames front to back from
//! any `std::io::Read`. Neither trusts a length or skips a checksum.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::format::{
    decode_trailer, decompress, has_trailer_magic, read_fully, read_header, read_up_to, Frame, FrameHeader, FrameInfo,
    FrameKind, TraceHeader, FRAME_HEADER_LEN, TRAILER_LEN,
};
use crate::format::{MAX_FRAME_LEN, MAX_IMAGE_TABLE};

/// Whether a container was finished, and if not where its usable part ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completeness {
    /// The footer is present and agrees with the frames.
    Complete,
    /// No footer: the writer stopped (or the file was cut) after these frames.
    Incomplete {
        /// Byte offset just past the last complete frame.
        valid_bytes: u64,
        /// `first_position` of the last complete frame, if there is one.
        last_position: Option<u64>,
    },
}

/// One step of reading frames front to back.
enum Stored {
    /// The input ended exactly at a frame boundary.
    End,
    /// The input ended inside a frame.
    Partial,
    /// A whole frame whose checksum matched.
    Frame(FrameHeader, Vec<u8>),
}

/// Reads the frame at `offset` from `r`, verifying its checksum.
fn next_stored<R: Read>(r: &mut R, offset: u64, frame_no: usize) -> Result<Stored> {
    next_stored_within(r, offset, frame_no, MAX_FRAME_LEN)
}

/// [`next_stored`] refusing frames larger than `limit` (compressed or not)
/// before reading them.
fn next_stored_within<R: Read>(r: &mut R, offset: u64, frame_no: usize, limit: u32) -> Result<Stored> {
    let mut raw = [0u8; FRAME_HEADER_LEN];
    match read_fully(r, &mut raw)? {
        0 => return Ok(Stored::End),
        FRAME_HEADER_LEN => {}
        _ => return Ok(Stored::Partial),
    }
    let header = FrameHeader::decode(&raw, offset)?;
    for (what, len) in [
        ("frame payload", header.uncompressed_len),
        ("compressed frame", header.compressed_len),
    ] {
        if len > limit {
            return Err(Error::LengthBeyondLimit {
                what,
                len: len.into(),
                limit: limit.into(),
                offset,
            });
        }
    }
    let Some(compressed) = read_up_to(r, header.compressed_len)? else {
        return Ok(Stored::Partial);
    };
    if !header.verify(&compressed) {
        return Err(Error::ChecksumMismatch {
            what: "frame",
            frame: Some(frame_no),
            offset,
        });
    }
    Ok(Stored::Frame(header, compressed))
}

/// Decodes an index frame's payload into its entries.
fn decode_index(header: &FrameHeader, compressed: &[u8], offset: u64) -> Result<Vec<FrameInfo>> {
    let payload = decompress(compressed, header.uncompressed_len, offset)?;
    decode_exact(&payload, "index", offset)
}

/// postcard-decodes `bytes` as a `T`, refusing trailing bytes.
fn decode_exact<T: DeserializeOwned>(bytes: &[u8], what: &'static str, offset: u64) -> Result<T> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|source| Error::Decode { what, offset, source })?;
    if !rest.is_empty() {
        return Err(Error::Corrupt {
            what,
            offset,
            detail: format!("{} bytes after the encoded value", rest.len()),
        });
    }
    Ok(value)
}

/// Reads the trailer that must follow the index frame and checks that the
/// index describes exactly `frames`. `Ok(false)`: the input ends inside it.
fn check_footer<R: Read>(
    r: &mut R,
    index: (&FrameHeader, &[u8]),
    index_offset: u64,
    frames: &[FrameInfo],
) -> Result<bool> {
    let trailer_offset = index_offset + FRAME_HEADER_LEN as u64 + index.1.len() as u64;
    let mut trailer = [0u8; TRAILER_LEN];
    if read_fully(r, &mut trailer)? < TRAILER_LEN {
        return Ok(false);
    }
    let points_at = decode_trailer(&trailer, trailer_offset)?;
    if points_at != index_offset {
        return Err(corrupt_footer(
            trailer_offset,
            format!("trailer points at byte {points_at}, the index is at {index_offset}"),
        ));
    }
    if decode_index(index.0, index.1, index_offset)? != frames {
        return Err(corrupt_footer(
            index_offset,
            "the index does not describe the frames before it".into(),
        ));
    }
    Ok(true)
}

fn corrupt_footer(offset: u64, detail: String) -> Error {
    Error::Corrupt {
        what: "footer",
        offset,
        detail,
    }
}

/// Checks and records one scanned data frame.
fn accept_frame(frames: &mut Vec<FrameInfo>, info: FrameInfo) -> Result<()> {
    if let Some(prev) = frames.last() {
        if info.first_position < prev.first_position {
            return Err(Error::Corrupt {
                what: "frame header",
                offset: info.offset,
                detail: format!(
                    "position {} is before the previous frame's {}",
                    info.first_position, prev.first_position
                ),
            });
        }
    }
    frames.push(info);
    Ok(())
}

fn incomplete(frames: &[FrameInfo], header_len: u64) -> Completeness {
    Completeness::Incomplete {
        valid_bytes: frames.last().map_or(header_len, FrameInfo::end),
        last_position: frames.last().map(|f| f.first_position),
    }
}

/// Decompresses a verified frame (a stored kind's payload is its bytes).
fn into_frame(info: FrameInfo, header: &FrameHeader, compressed: Vec<u8>) -> Result<Frame> {
    if header.kind.is_stored() {
        return Ok(Frame {
            info,
            payload: compressed,
        });
    }
    Ok(Frame {
        info,
        payload: decompress(&compressed, header.uncompressed_len, info.offset)?,
    })
}

/// Decodes a frame's payload as the records `write_records` stored.
pub fn decode_records<T: DeserializeOwned>(frame: &Frame) -> Result<Vec<T>> {
    decode_exact(&frame.payload, "records", frame.info.offset)
}

/// A container file opened for random access.
#[derive(Debug)]
pub struct TraceReader {
    file: BufReader<File>,
    header: TraceHeader,
    header_len: u64,
    file_len: u64,
    frames: Vec<FrameInfo>,
    keyframes: Vec<usize>,
    completeness: Completeness,
}

impl TraceReader {
    /// Opens a container. A finished file is indexed from its footer; a
    /// `.partial` or cut-short file is scanned and yields its complete frames.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let file = File::open(path)?;
        let file_len = file.metadata()?.len();
        let mut file = BufReader::new(file);
        let (header, header_len) = read_header(&mut file)?;
        let (frames, completeness) = match Self::load_index(&mut file, header_len, file_len)? {
            Some(frames) => (frames, Completeness::Complete),
            None => Self::scan(&mut file, header_len)?,
        };
        let keyframes = frames
            .iter()
            .enumerate()
            .filter(|(_, f)| f.kind == FrameKind::MachineState)
            .map(|(i, _)| i)
            .collect();
        Ok(Self {
            file,
            header,
            header_len,
            file_len,
            frames,
            keyframes,
            completeness,
        })
    }

    /// Uses the footer when the file ends with a valid trailer; `None` when
    /// it does not (the caller scans instead).
    fn load_index(file: &mut BufReader<File>, header_len: u64, file_len: u64) -> Result<Option<Vec<FrameInfo>>> {
        let min_footer = (FRAME_HEADER_LEN + TRAILER_LEN) as u64;
        if file_len < header_len + min_footer {
            return Ok(None);
        }
        let trailer_offset = file_len - TRAILER_LEN as u64;
        file.seek(SeekFrom::Start(trailer_offset))?;
        let mut trailer = [0u8; TRAILER_LEN];
        file.read_exact(&mut trailer)?;
        // A damaged trailer is not trusted; the scan checks it again and fails.
        let index_offset = match has_trailer_magic(&trailer).then(|| decode_trailer(&trailer, trailer_offset)) {
            Some(Ok(o)) => o,
            _ => return Ok(None),
        };
        if index_offset < header_len || index_offset > trailer_offset - FRAME_HEADER_LEN as u64 {
            return Err(corrupt_footer(
                trailer_offset,
                format!("index offset {index_offset} is outside the frames"),
            ));
        }
        file.seek(SeekFrom::Start(index_offset))?;
        let frame_no = usize::MAX;
        let Stored::Frame(header, compressed) = next_stored(file, index_offset, frame_no)? else {
            return Err(Error::Truncated {
                offset: index_offset,
                what: "index frame",
            });
        };
        let end = index_offset + FRAME_HEADER_LEN as u64 + compressed.len() as u64;
        if header.kind != FrameKind::Index || end != trailer_offset {
            return Err(corrupt_footer(
                index_offset,
                "the trailer does not point at an index frame that ends at the trailer".into(),
            ));
        }
        let entries = decode_index(&header, &compressed, index_offset)?;
        let mut expected_offset = header_len;
        let mut checked = Vec::with_capacity(entries.len().min(1 << 16));
        for entry in entries {
            if entry.kind == FrameKind::Index || entry.offset != expected_offset {
                return Err(corrupt_footer(
                    index_offset,
                    format!("index entry for byte {} does not fit the file", entry.offset),
                ));
            }
            expected_offset = entry.end();
            accept_frame(&mut checked, entry)?;
        }
        if expected_offset != index_offset {
            return Err(corrupt_footer(
                index_offset,
                "the index does not cover every frame".into(),
            ));
        }
        Ok(Some(checked))
    }

    /// Reads every frame from the start, verifying checksums, until the
    /// footer or the end of the file.
    fn scan(file: &mut BufReader<File>, header_len: u64) -> Result<(Vec<FrameInfo>, Completeness)> {
        file.seek(SeekFrom::Start(header_len))?;
        let mut frames = Vec::new();
        let mut offset = header_len;
        loop {
            let (header, compressed) = match next_stored(file, offset, frames.len())? {
                Stored::End | Stored::Partial => {
                    let state = incomplete(&frames, header_len);
                    return Ok((frames, state));
                }
                Stored::Frame(h, c) => (h, c),
            };
            if header.kind == FrameKind::Index {
                if !check_footer(file, (&header, &compressed), offset, &frames)? {
                    let state = incomplete(&frames, header_len);
                    return Ok((frames, state));
                }
                let mut extra = [0u8; 1];
                if read_fully(file, &mut extra)? != 0 {
                    return Err(corrupt_footer(offset, "bytes follow the trailer".into()));
                }
                return Ok((frames, Completeness::Complete));
            }
            let info = header.info(offset);
            offset = info.end();
            accept_frame(&mut frames, info)?;
        }
    }

    /// The container's header.
    pub fn header(&self) -> &TraceHeader {
        &self.header
    }

    /// Every complete data frame, in file order (the index frame excluded).
    pub fn frames(&self) -> &[FrameInfo] {
        &self.frames
    }

    /// Whether the container was finished.
    pub fn completeness(&self) -> Completeness {
        self.completeness
    }

    /// Shorthand for `completeness() == Complete`.
    pub fn is_complete(&self) -> bool {
        self.completeness == Completeness::Complete
    }

    /// Bytes of the header (the offset of the first frame).
    pub fn header_len(&self) -> u64 {
        self.header_len
    }

    /// Bytes of the file as opened.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The number in `frames()` of the last `MachineState` frame whose
    /// `first_position` is at or before `position`.
    pub fn keyframe_at_or_before(&self, position: u64) -> Option<usize> {
        let n = self
            .keyframes
            .partition_point(|&i| self.frames[i].first_position <= position);
        n.checked_sub(1).map(|k| self.keyframes[k])
    }

    /// Reads, verifies and decompresses frame number `index`.
    pub fn read_frame(&mut self, index: usize) -> Result<Frame> {
        let info = *self.frames.get(index).ok_or(Error::NoSuchFrame {
            index,
            count: self.frames.len(),
        })?;
        self.file.seek(SeekFrom::Start(info.offset))?;
        let Stored::Frame(header, compressed) = next_stored(&mut self.file, info.offset, index)? else {
            return Err(Error::Truncated {
                offset: info.offset,
                what: "frame",
            });
        };
        if header.info(info.offset) != info {
            return Err(Error::Corrupt {
                what: "frame header",
                offset: info.offset,
                detail: "the frame differs from its index entry".into(),
            });
        }
        into_frame(info, &header, compressed)
    }

    /// Checks memory-image frame number `index` without keeping its data:
    /// the header against its index entry, the checksum over the whole
    /// payload (read through once, in bounded pieces), and the run table
    /// ([`image_runs`](crate::image_runs)). The runs' data can then be
    /// mapped from the file ([`TraceReader::file`]) at
    /// [`FrameInfo::payload_offset`] plus each run's offset.
    pub fn check_image(&mut self, index: usize) -> Result<Vec<crate::ImageRun>> {
        let info = *self.frames.get(index).ok_or(Error::NoSuchFrame {
            index,
            count: self.frames.len(),
        })?;
        self.file.seek(SeekFrom::Start(info.offset))?;
        let mut raw = [0u8; FRAME_HEADER_LEN];
        if read_fully(&mut self.file, &mut raw)? < FRAME_HEADER_LEN {
            return Err(Error::Truncated {
                offset: info.offset,
                what: "frame",
            });
        }
        let header = FrameHeader::decode(&raw, info.offset)?;
        if header.info(info.offset) != info {
            return Err(Error::Corrupt {
                what: "frame header",
                offset: info.offset,
                detail: "the frame differs from its index entry".into(),
            });
        }
        let mut hasher = header.hasher();
        let total = u64::from(info.compressed_len);
        let head_len = total.min(MAX_IMAGE_TABLE as u64) as usize;
        let mut head = vec![0u8; head_len];
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < total {
            let n = (total - done).min(buf.len() as u64) as usize;
            if read_fully(&mut self.file, &mut buf[..n])? < n {
                return Err(Error::Truncated {
                    offset: info.offset,
                    what: "frame",
                });
            }
            if done < head_len as u64 {
                let k = (head_len - done as usize).min(n);
                head[done as usize..done as usize + k].copy_from_slice(&buf[..k]);
            }
            hasher.update(&buf[..n]);
            done += n as u64;
        }
        if hasher.finalize() != header.checksum {
            return Err(Error::ChecksumMismatch {
                what: "frame",
                frame: Some(index),
                offset: info.offset,
            });
        }
        crate::image_runs(&info, &head)
    }

    /// The container's file, for mapping the data of memory-image frames
    /// checked with [`TraceReader::check_image`].
    pub fn file(&self) -> &File {
        self.file.get_ref()
    }

    /// Reads frame number `index` and decodes its records.
    pub fn read_records<T: DeserializeOwned>(&mut self, index: usize) -> Result<Vec<T>> {
        decode_records(&self.read_frame(index)?)
    }

    /// Iterates over the frames from number `start` on, reading each.
    pub fn frames_from(&mut self, start: usize) -> FrameIter<'_> {
        FrameIter {
            reader: self,
            next: start,
        }
    }
}

/// Frames of a [`TraceReader`], read one by one.
#[derive(Debug)]
pub struct FrameIter<'a> {
    reader: &'a mut TraceReader,
    next: usize,
}

impl Iterator for FrameIter<'_> {
    type Item = Result<Frame>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.reader.frames.len() {
            return None;
        }
        self.next += 1;
        Some(self.reader.read_frame(self.next - 1))
    }
}

/// Reads a container front to back from any byte source (a migration socket).
#[derive(Debug)]
pub struct StreamReader<R: Read> {
    input: R,
    header: TraceHeader,
    header_len: u64,
    offset: u64,
    frames: Vec<FrameInfo>,
    end: Option<Completeness>,
    failed: bool,
    frame_limit: u32,
}

impl<R: Read> StreamReader<R> {
    /// Refuses frames larger than `limit` bytes (compressed or not) before
    /// reading them, for a stream whose writer never makes larger ones.
    pub fn with_frame_limit(mut self, limit: u32) -> Self {
        self.frame_limit = limit.min(MAX_FRAME_LEN);
        self
    }

    /// Reads and checks the header.
    pub fn new(mut input: R) -> Result<Self> {
        let (header, header_len) = read_header(&mut input)?;
        Ok(Self {
            input,
            header,
            header_len,
            offset: header_len,
            frames: Vec::new(),
            end: None,
            failed: false,
            frame_limit: MAX_FRAME_LEN,
        })
    }

    /// The container's header.
    pub fn header(&self) -> &TraceHeader {
        &self.header
    }

    /// The next data frame, or `None` at the end (see [`Self::completeness`]).
    /// After an error the stream cannot be trusted and every later call fails.
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        if self.failed {
            return Err(Error::Corrupt {
                what: "stream",
                offset: self.offset,
                detail: "an earlier error ended the stream".into(),
            });
        }
        if self.end.is_some() {
            return Ok(None);
        }
        let result = self.step();
        self.failed = result.is_err();
        result
    }

    fn step(&mut self) -> Result<Option<Frame>> {
        let stored = next_stored_within(&mut self.input, self.offset, self.frames.len(), self.frame_limit)?;
        let (header, compressed) = match stored {
            Stored::End | Stored::Partial => {
                self.end = Some(incomplete(&self.frames, self.header_len));
                return Ok(None);
            }
            Stored::Frame(h, c) => (h, c),
        };
        if header.kind == FrameKind::Index {
            let complete = check_footer(&mut self.input, (&header, &compressed), self.offset, &self.frames)?;
            self.end = Some(if complete {
                Completeness::Complete
            } else {
                incomplete(&self.frames, self.header_len)
            });
            return Ok(None);
        }
        let info = header.info(self.offset);
        let frame = into_frame(info, &header, compressed)?;
        accept_frame(&mut self.frames, info)?;
        self.offset = info.end();
        Ok(Some(frame))
    }

    /// The next frame decoded as records, with its header fields.
    pub fn next_records<T: DeserializeOwned>(&mut self) -> Result<Option<(FrameInfo, Vec<T>)>> {
        match self.next_frame()? {
            Some(frame) => Ok(Some((frame.info, decode_records(&frame)?))),
            None => Ok(None),
        }
    }

    /// The frames read so far.
    pub fn frames(&self) -> &[FrameInfo] {
        &self.frames
    }

    /// `None` until `next_frame` has returned `None`; then whether the
    /// stream ended with its footer.
    pub fn completeness(&self) -> Option<Completeness> {
        self.end
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ContainerKind;
    use crate::writer::{StreamWriter, TraceWriter};

    fn header() -> TraceHeader {
        TraceHeader {
            uuid: *b"0123456789abcdef",
            nyx_version: "test".into(),
            kind: ContainerKind::Trace,
            machine_config: b"config".to_vec(),
            images: vec![],
        }
    }

    fn write_sample(path: &Path) -> Vec<FrameInfo> {
        let mut w = TraceWriter::create(path, &header()).unwrap();
        w.write_frame(FrameKind::MachineState, 0, b"state0").unwrap();
        w.write_frame(FrameKind::Memory, 0, &[0u8; 4096]).unwrap();
        w.write_records(FrameKind::Events, 0, &[1u64, 2, 3]).unwrap();
        w.write_frame(FrameKind::MachineState, 100, b"state1").unwrap();
        w.write_records(FrameKind::Events, 100, &[4u64]).unwrap();
        w.write_frame(FrameKind::MachineState, 250, b"state2").unwrap();
        let frames = w.frames().to_vec();
        w.finish().unwrap();
        frames
    }

    #[test]
    fn finished_file_reads_back_through_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.nyx");
        let written = write_sample(&path);
        let mut r = TraceReader::open(&path).unwrap();
        assert!(r.is_complete());
        assert_eq!(r.header(), &header());
        assert_eq!(r.frames(), written.as_slice());
        assert_eq!(r.read_frame(0).unwrap().payload, b"state0");
        assert_eq!(r.read_records::<u64>(2).unwrap(), vec![1, 2, 3]);
        assert!(matches!(
            r.read_frame(6),
            Err(Error::NoSuchFrame { index: 6, count: 6 })
        ));
        let all: Vec<_> = r.frames_from(4).collect::<Result<_>>().unwrap();
        assert_eq!(all.len(), 2);
    }

    /// Two memory-image frames after a state at an odd offset: page runs
    /// whose bytes say where they belong.
    fn write_images(path: &Path) -> Vec<FrameInfo> {
        let page = |tag: u8| vec![tag; 4096];
        let (a, b, c) = (page(1), [page(2), page(3)].concat(), page(4));
        let mut w = TraceWriter::create(path, &header()).unwrap();
        w.write_frame(FrameKind::MachineState, 7, b"state").unwrap();
        w.write_image(7, &[(0x1000, &a), (0x5000, &b)]).unwrap();
        w.write_frame(FrameKind::Memory, 7, b"compressed pages").unwrap();
        w.write_image(7, &[(0x20_0000, &c)]).unwrap();
        let frames = w.frames().to_vec();
        w.finish().unwrap();
        frames
    }

    #[test]
    fn memory_images_are_page_aligned_in_the_file_and_checked_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.nyx");
        let written = write_images(&path);
        let bytes = std::fs::read(&path).unwrap();
        let mut r = TraceReader::open(&path).unwrap();
        assert_eq!(r.frames(), written.as_slice());
        let runs = r.check_image(1).unwrap();
        let spans: Vec<(u64, u64)> = runs.iter().map(|x| (x.gpa, x.len)).collect();
        assert_eq!(spans, [(0x1000, 4096), (0x5000, 8192)]);
        for (run, tag) in runs.iter().zip([1u8, 2]) {
            let at = written[1].payload_offset() + run.offset;
            assert_eq!(at % crate::IMAGE_ALIGN, 0, "mappable where it lies");
            assert_eq!(bytes[at as usize], tag);
        }
        assert_eq!(bytes[(written[1].payload_offset() + runs[1].offset) as usize + 4096], 3);
        // Read whole, the same runs.
        let frame = r.read_frame(1).unwrap();
        assert_eq!(crate::image_runs(&frame.info, &frame.payload).unwrap(), runs);
        assert_eq!(r.check_image(3).unwrap()[0].gpa, 0x20_0000);
        assert!(r.check_image(2).is_err(), "a compressed frame is no image");
        // The stream reader and the scan of an unfinished copy take them too.
        let mut st = StreamReader::new(bytes.as_slice()).unwrap();
        let mut kinds = Vec::new();
        while let Some(f) = st.next_frame().unwrap() {
            kinds.push(f.info.kind);
        }
        assert_eq!(st.completeness(), Some(Completeness::Complete));
        assert_eq!(kinds[1], FrameKind::MemoryImage);
        let cut = dir.path().join("cut.nyx");
        std::fs::write(&cut, &bytes[..written[3].offset as usize + 5000]).unwrap();
        let r = TraceReader::open(&cut).unwrap();
        assert_eq!(r.frames().len(), 3, "the cut image frame is dropped");
    }

    #[test]
    fn a_damaged_memory_image_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.nyx");
        let written = write_images(&path);
        let clean = std::fs::read(&path).unwrap();
        let data = written[1].payload_offset() as usize + 4096 + 100;
        for at in [data, written[1].payload_offset() as usize + 9] {
            let mut bytes = clean.clone();
            bytes[at] ^= 0x40;
            std::fs::write(&path, &bytes).unwrap();
            let mut r = TraceReader::open(&path).unwrap();
            assert!(matches!(
                r.check_image(1),
                Err(Error::ChecksumMismatch { frame: Some(1), .. })
            ));
            assert!(matches!(r.read_frame(1), Err(Error::ChecksumMismatch { .. })));
        }
        // A stored frame must say it expands to its own length.
        let mut bytes = clean.clone();
        let h = written[1].offset as usize;
        bytes[h + 12] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let mut r = TraceReader::open(&path).unwrap();
        let e = r.check_image(1).unwrap_err().to_string();
        assert!(e.contains("expands to"), "{e}");
        assert!(r.read_frame(1).is_err());
    }

    #[test]
    fn keyframe_seek_finds_the_last_state_at_or_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.nyx");
        write_sample(&path);
        let r = TraceReader::open(&path).unwrap();
        assert_eq!(r.keyframe_at_or_before(0), Some(0));
        assert_eq!(r.keyframe_at_or_before(99), Some(0));
        assert_eq!(r.keyframe_at_or_before(100), Some(3));
        assert_eq!(r.keyframe_at_or_before(249), Some(3));
        assert_eq!(r.keyframe_at_or_before(u64::MAX), Some(5));
    }

    #[test]
    fn no_keyframe_before_the_first() {
        let mut w = StreamWriter::new(Vec::new(), &header()).unwrap();
        w.write_frame(FrameKind::Events, 0, b"").unwrap();
        w.write_frame(FrameKind::MachineState, 10, b"").unwrap();
        let bytes = w.finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.nyx");
        std::fs::write(&path, bytes).unwrap();
        let r = TraceReader::open(&path).unwrap();
        assert_eq!(r.keyframe_at_or_before(9), None);
        assert_eq!(r.keyframe_at_or_before(10), Some(1));
    }

    #[test]
    fn partial_file_is_scanned_and_reported_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.nyx");
        let mut w = TraceWriter::create(&path, &header()).unwrap();
        w.write_frame(FrameKind::MachineState, 0, b"s").unwrap();
        w.write_records(FrameKind::Events, 7, &[9u8]).unwrap();
        w.sync().unwrap();
        let frames = w.frames().to_vec();
        let partial = w.partial_path().to_path_buf();
        drop(w);
        let mut r = TraceReader::open(&partial).unwrap();
        assert_eq!(r.frames(), frames.as_slice());
        assert_eq!(
            r.completeness(),
            Completeness::Incomplete {
                valid_bytes: frames[1].end(),
                last_position: Some(7)
            }
        );
        assert_eq!(r.read_records::<u8>(1).unwrap(), vec![9]);
        assert_eq!(r.keyframe_at_or_before(7), Some(0));
    }

    #[test]
    fn stream_round_trip_and_clean_end() {
        let mut w = StreamWriter::new(Vec::new(), &header()).unwrap();
        w.write_records(FrameKind::Memory, 3, &[(0u64, vec![1u8; 8])]).unwrap();
        w.write_frame(FrameKind::MachineState, 3, b"regs").unwrap();
        let bytes = w.finish().unwrap();
        let mut r = StreamReader::new(bytes.as_slice()).unwrap();
        assert_eq!(r.completeness(), None);
        let (info, pages) = r.next_records::<(u64, Vec<u8>)>().unwrap().unwrap();
        assert_eq!((info.kind, info.first_position), (FrameKind::Memory, 3));
        assert_eq!(pages, vec![(0, vec![1u8; 8])]);
        assert_eq!(r.next_frame().unwrap().unwrap().payload, b"regs");
        assert!(r.next_frame().unwrap().is_none());
        assert_eq!(r.completeness(), Some(Completeness::Complete));
    }

    #[test]
    fn records_of_the_wrong_type_are_a_decode_error() {
        let mut w = StreamWriter::new(Vec::new(), &header()).unwrap();
        w.write_records(FrameKind::Events, 0, &[u64::MAX]).unwrap();
        let bytes = w.finish().unwrap();
        let mut r = StreamReader::new(bytes.as_slice()).unwrap();
        assert!(matches!(r.next_records::<bool>(), Err(Error::Decode { .. })));
        // The container itself is intact, so reading goes on to its end.
        assert!(r.next_frame().unwrap().is_none());
        assert_eq!(r.completeness(), Some(Completeness::Complete));
    }
}
