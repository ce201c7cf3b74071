//! Writing containers: [`StreamWriter`] appends the header, frames and footer
//! to any `std::io::Write` (a socket for migration, a buffer in tests), and
//! [`TraceWriter`] puts one in `PATH.partial` with periodic fsyncs and renames
//! it to `PATH` once finished, so a killed recorder leaves a readable prefix.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::{
    encode_header, encode_image_table, encode_trailer, FrameHeader, FrameInfo, FrameKind, TraceHeader,
};

/// zstd level used unless the caller picks another.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Writes a container to any byte sink, front to back, never seeking.
///
/// The bytes are exactly those of a finished trace file, so a captured
/// migration stream can also be opened with `TraceReader`.
#[derive(Debug)]
pub struct StreamWriter<W: Write> {
    out: W,
    offset: u64,
    frames: Vec<FrameInfo>,
    level: i32,
    failed: bool,
}

impl<W: Write> StreamWriter<W> {
    /// Writes `header` to `out` and returns a writer for the frames.
    pub fn new(out: W, header: &TraceHeader) -> Result<Self> {
        Self::with_level(out, header, DEFAULT_ZSTD_LEVEL)
    }

    /// As [`StreamWriter::new`] with an explicit zstd level.
    pub fn with_level(mut out: W, header: &TraceHeader, level: i32) -> Result<Self> {
        let bytes = encode_header(header, level)?;
        out.write_all(&bytes)?;
        Ok(Self {
            out,
            offset: bytes.len() as u64,
            frames: Vec::new(),
            level,
            failed: false,
        })
    }

    /// Compresses and appends one frame. Positions must not go backwards and
    /// `FrameKind::Index` is reserved for [`StreamWriter::finish`].
    pub fn write_frame(&mut self, kind: FrameKind, first_position: u64, payload: &[u8]) -> Result<FrameInfo> {
        if kind == FrameKind::Index {
            return Err(Error::ReservedKind);
        }
        if let Some(previous) = self.frames.last().map(|f| f.first_position) {
            if first_position < previous {
                return Err(Error::PositionWentBack {
                    position: first_position,
                    previous,
                });
            }
        }
        let info = self.append(kind, first_position, payload)?;
        self.frames.push(info);
        Ok(info)
    }

    /// Appends a memory-image frame ([`FrameKind::MemoryImage`]): `runs`
    /// of whole pages, each `(guest address, bytes)`, stored uncompressed
    /// after a run table and padding, so that every run's bytes start on
    /// a page boundary of the container.
    pub fn write_image(&mut self, first_position: u64, runs: &[(u64, &[u8])]) -> Result<FrameInfo> {
        if let Some(previous) = self.frames.last().map(|f| f.first_position) {
            if first_position < previous {
                return Err(Error::PositionWentBack {
                    position: first_position,
                    previous,
                });
            }
        }
        let spans: Vec<(u64, u64)> = runs.iter().map(|(gpa, data)| (*gpa, data.len() as u64)).collect();
        let payload_offset = self.offset + crate::format::FRAME_HEADER_LEN as u64;
        let table = encode_image_table(&spans, payload_offset)?;
        let mut parts: Vec<&[u8]> = vec![&table];
        parts.extend(runs.iter().map(|(_, data)| *data));
        let header = FrameHeader::stored(FrameKind::MemoryImage, first_position, &parts)?;
        let info = header.info(self.offset);
        self.put(&header.encode())?;
        for part in parts {
            self.put(part)?;
        }
        self.frames.push(info);
        Ok(info)
    }

    /// Encodes `records` with postcard (as one sequence) and appends them as a frame.
    pub fn write_records<T: Serialize>(
        &mut self,
        kind: FrameKind,
        first_position: u64,
        records: &[T],
    ) -> Result<FrameInfo> {
        let payload = postcard::to_stdvec(records).map_err(|source| Error::Encode {
            what: "records",
            source,
        })?;
        self.write_frame(kind, first_position, &payload)
    }

    /// The frames written so far.
    pub fn frames(&self) -> &[FrameInfo] {
        &self.frames
    }

    /// Bytes handed to the sink so far (header included).
    pub fn bytes_written(&self) -> u64 {
        self.offset
    }

    /// Flushes the sink.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush()?;
        Ok(())
    }

    /// The sink.
    pub fn get_ref(&self) -> &W {
        &self.out
    }

    /// Writes the index frame and the trailer, flushes, and returns the sink.
    pub fn finish(mut self) -> Result<W> {
        let index = postcard::to_stdvec(&self.frames).map_err(|source| Error::Encode { what: "index", source })?;
        let index_offset = self.offset;
        self.append(FrameKind::Index, self.last_position(), &index)?;
        self.put(&encode_trailer(index_offset))?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn last_position(&self) -> u64 {
        self.frames.last().map_or(0, |f| f.first_position)
    }

    fn append(&mut self, kind: FrameKind, first_position: u64, payload: &[u8]) -> Result<FrameInfo> {
        let (header, compressed) = FrameHeader::build(kind, first_position, payload, self.level)?;
        let info = header.info(self.offset);
        self.put(&header.encode())?;
        self.put(&compressed)?;
        Ok(info)
    }

    /// Writes bytes; after a failed write the sink holds a torn frame, so
    /// every later write is refused rather than appended after it.
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        if self.failed {
            return Err(Error::Io(std::io::Error::other(
                "an earlier write failed; the container ends at its last complete frame",
            )));
        }
        if let Err(e) = self.out.write_all(bytes) {
            self.failed = true;
            return Err(e.into());
        }
        self.offset += bytes.len() as u64;
        Ok(())
    }
}

/// How a [`TraceWriter`] compresses and when it forces data to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterOptions {
    /// fsync after this many frames (0: never by count).
    pub sync_every_frames: u32,
    /// fsync after this many bytes (0: never by size).
    pub sync_every_bytes: u64,
    /// zstd compression level.
    pub zstd_level: i32,
    /// fsync the header as soon as it is written, so that the `.partial`
    /// file of a writer killed at any point is a readable trace. A file
    /// that is of use only once finished (a snapshot) leaves every fsync
    /// to [`TraceWriter::finish`].
    pub sync_header: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            sync_every_frames: 64,
            sync_every_bytes: 16 << 20,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            sync_header: true,
        }
    }
}

/// Writes a container file: `PATH.partial` while open, `PATH` once finished.
#[derive(Debug)]
pub struct TraceWriter {
    inner: StreamWriter<BufWriter<File>>,
    path: PathBuf,
    partial: PathBuf,
    options: WriterOptions,
    frames_since_sync: u32,
    bytes_at_sync: u64,
}

impl TraceWriter {
    /// Creates `PATH.partial` (replacing one left by an earlier run) with
    /// default options, writes the header and fsyncs it (see
    /// [`WriterOptions::sync_header`]).
    pub fn create(path: impl AsRef<Path>, header: &TraceHeader) -> Result<Self> {
        Self::create_with(path, header, WriterOptions::default())
    }

    /// As [`TraceWriter::create`] with explicit options.
    pub fn create_with(path: impl AsRef<Path>, header: &TraceHeader, options: WriterOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let partial = partial_path(&path);
        let file = File::create(&partial)?;
        let inner = StreamWriter::with_level(BufWriter::new(file), header, options.zstd_level)?;
        let mut writer = Self {
            inner,
            path,
            partial,
            options,
            frames_since_sync: 0,
            bytes_at_sync: 0,
        };
        if options.sync_header {
            writer.sync()?;
        } else {
            writer.inner.flush()?;
        }
        Ok(writer)
    }

    /// Appends a frame (see [`StreamWriter::write_frame`]) and fsyncs when due.
    pub fn write_frame(&mut self, kind: FrameKind, first_position: u64, payload: &[u8]) -> Result<FrameInfo> {
        let info = self.inner.write_frame(kind, first_position, payload)?;
        self.after_frame()?;
        Ok(info)
    }

    /// Appends a memory-image frame (see [`StreamWriter::write_image`]).
    pub fn write_image(&mut self, first_position: u64, runs: &[(u64, &[u8])]) -> Result<FrameInfo> {
        let info = self.inner.write_image(first_position, runs)?;
        self.after_frame()?;
        Ok(info)
    }

    /// Appends postcard-encoded records (see [`StreamWriter::write_records`]).
    pub fn write_records<T: Serialize>(
        &mut self,
        kind: FrameKind,
        first_position: u64,
        records: &[T],
    ) -> Result<FrameInfo> {
        let info = self.inner.write_records(kind, first_position, records)?;
        self.after_frame()?;
        Ok(info)
    }

    /// The frames written so far.
    pub fn frames(&self) -> &[FrameInfo] {
        self.inner.frames()
    }

    /// The file being written (`PATH.partial`).
    pub fn partial_path(&self) -> &Path {
        &self.partial
    }

    /// Flushes buffered frames and fsyncs them now.
    pub fn sync(&mut self) -> Result<()> {
        self.inner.flush()?;
        self.inner.get_ref().get_ref().sync_data()?;
        self.frames_since_sync = 0;
        self.bytes_at_sync = self.inner.bytes_written();
        Ok(())
    }

    /// Writes the footer, fsyncs, renames `PATH.partial` to `PATH` and
    /// returns `PATH`.
    pub fn finish(self) -> Result<PathBuf> {
        let file = self
            .inner
            .finish()?
            .into_inner()
            .map_err(|e| Error::Io(e.into_error()))?;
        file.sync_all()?;
        drop(file);
        fs::rename(&self.partial, &self.path)?;
        // Make the rename itself durable; not every platform can open a directory.
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                d.sync_all()?;
            }
        }
        Ok(self.path)
    }

    fn after_frame(&mut self) -> Result<()> {
        // Every complete frame reaches the OS at once, so that a writer
        // killed later loses nothing it has written; fsync (which survives a
        // host crash too) is paced by the options.
        self.inner.flush()?;
        self.frames_since_sync += 1;
        let o = &self.options;
        let by_count = o.sync_every_frames != 0 && self.frames_since_sync >= o.sync_every_frames;
        let unsynced = self.inner.bytes_written() - self.bytes_at_sync;
        let by_size = o.sync_every_bytes != 0 && unsynced >= o.sync_every_bytes;
        if by_count || by_size {
            self.sync()?;
        }
        Ok(())
    }
}

/// `PATH.partial`: where a container lives until it is finished.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ContainerKind;

    fn header() -> TraceHeader {
        TraceHeader {
            uuid: [1; 16],
            nyx_version: "test".into(),
            kind: ContainerKind::Trace,
            machine_config: vec![],
            images: vec![],
        }
    }

    #[test]
    fn index_kind_and_backward_positions_are_refused() {
        let mut w = StreamWriter::new(Vec::new(), &header()).unwrap();
        assert!(matches!(
            w.write_frame(FrameKind::Index, 0, b""),
            Err(Error::ReservedKind)
        ));
        w.write_frame(FrameKind::Events, 10, b"a").unwrap();
        w.write_frame(FrameKind::Events, 10, b"b").unwrap();
        assert!(matches!(
            w.write_frame(FrameKind::Events, 9, b"c"),
            Err(Error::PositionWentBack {
                position: 9,
                previous: 10
            })
        ));
        assert_eq!(w.frames().len(), 2);
    }

    #[test]
    fn offsets_are_contiguous() {
        let mut w = StreamWriter::new(Vec::new(), &header()).unwrap();
        let a = w.write_frame(FrameKind::MachineState, 0, &[0u8; 100]).unwrap();
        let b = w.write_frame(FrameKind::Memory, 0, &[1u8; 5000]).unwrap();
        assert_eq!(a.end(), b.offset);
        assert_eq!(b.end(), w.bytes_written());
        let bytes = w.finish().unwrap();
        assert!(bytes.len() as u64 > b.end());
        assert!(bytes.ends_with(b"NYXTRAIL"));
    }

    #[test]
    fn an_unsynced_header_still_reaches_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.nyx");
        let options = WriterOptions {
            sync_header: false,
            ..WriterOptions::default()
        };
        let w = TraceWriter::create_with(&path, &header(), options).unwrap();
        let partial = fs::read(w.partial_path()).unwrap();
        assert!(
            partial.starts_with(b"NYXTRACE") && partial.len() > 24,
            "flushed, if not fsynced"
        );
        assert_eq!(w.finish().unwrap(), path);
        assert!(path.exists());
    }

    #[test]
    fn file_is_partial_until_finished() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.nyx");
        let options = WriterOptions {
            sync_every_frames: 2,
            ..WriterOptions::default()
        };
        let mut w = TraceWriter::create_with(&path, &header(), options).unwrap();
        assert_eq!(w.partial_path(), dir.path().join("t.nyx.partial"));
        w.write_records(FrameKind::Events, 0, &[1u32, 2, 3]).unwrap();
        w.write_records(FrameKind::Events, 5, &[4u32]).unwrap();
        assert!(!path.exists());
        // Two frames reached the sync threshold, so they are on disk already.
        let on_disk = fs::metadata(dir.path().join("t.nyx.partial")).unwrap().len();
        assert_eq!(on_disk, w.frames()[1].end());
        assert_eq!(w.finish().unwrap(), path);
        assert!(path.exists());
        assert!(!dir.path().join("t.nyx.partial").exists());
    }

    struct FailAfter(usize);

    impl Write for FailAfter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::other("disk full"));
            }
            let n = buf.len().min(self.0);
            self.0 -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_write_refuses_later_frames() {
        let header_len = encode_header(&header(), DEFAULT_ZSTD_LEVEL).unwrap().len();
        let mut w = StreamWriter::new(FailAfter(header_len + 10), &header()).unwrap();
        assert!(w.write_frame(FrameKind::Events, 0, &[7u8; 1000]).is_err());
        assert!(w.write_frame(FrameKind::Events, 0, b"").is_err());
    }
}
