//! Disk images behind virtio-blk: the `--disk` option, the raw image file,
//! the copy-on-write overlay a recording and a replay write into, and the
//! disk's identity that a trace stores.
//!
//! A plain run writes through to the image (unless `readonly`), as QEMU
//! and Firecracker do. A recording, a replay and `nyx check` never change
//! the image: writes go to an in-memory overlay of 512-byte sectors, which
//! is part of the device's snapshot state, so a snapshot, a timeline
//! checkpoint or a fast reset brings the disk back with the memory. The
//! trace stores each disk's size and the SHA-256 of its image
//! ([`DiskIdentity`]); a replay hashes the image it is given and refuses
//! one that differs, naming the disk.
//!
//! With `--embed-disks`, a recording logs what every read returned
//! (`DiskRead` events) and a replay serves the reads from the trace
//! ([`LoggedDisk`] is the replay's side), so the trace alone replays. It is
//! not the default: a trace then grows by every byte the guest reads (a
//! booting OS reads megabytes), while the image hash keeps the default
//! trace small and still refuses a wrong image.
//!
//! Images are raw or qcow2. A qcow2 image is read and written through
//! `imago` (its `sync` build: plain blocking calls, no async runtime), and
//! behaves as a raw one would: the guest sees its virtual size, a plain
//! run writes through (allocating clusters), and a recording, a replay
//! and `nyx check` keep writes in the same overlay, so the file never
//! changes. Its identity is the virtual size and the SHA-256 of the qcow2
//! *file*. Without `format=`, a file that begins with the qcow2 magic is
//! opened as qcow2 and any other as raw; `format=raw` shows the file's
//! bytes as they are. Backing files, external data files and encryption
//! are refused, naming the disk; compressed clusters read as imago reads
//! them.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use imago::qcow2::Qcow2;
use imago::FormatAccess;
use nyx_devices::block::{BlockBackend, SECTOR};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Errors of opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The `--disk` option is malformed.
    #[error("--disk {spec:?}: {why}")]
    Spec {
        /// The option's value.
        spec: String,
        /// What is wrong with it.
        why: String,
    },
    /// The image could not be opened or read.
    #[error("disk {id} ({path}): {source}")]
    Io {
        /// The disk's ID.
        id: String,
        /// The image.
        path: PathBuf,
        /// What the host said.
        source: io::Error,
    },
    /// A qcow2 image that is corrupt, or uses what Nyx does not support
    /// (a backing file, an external data file, encryption).
    #[error("disk {id} ({path}): {why}")]
    Qcow2 {
        /// The disk's ID.
        id: String,
        /// The image.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The image is not a whole number of sectors, or empty.
    #[error("disk {id} ({path}): its size {size} is not a positive multiple of 512 bytes")]
    Size {
        /// The disk's ID.
        id: String,
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// A restored or migrated machine's image is not of the size its disk
    /// had (a plain run stores no hash: its image changes as it runs).
    #[error(
        "disk {id}: the image {path} has {got} bytes, but the disk had {want} bytes where the machine was saved: \
         not the same image"
    )]
    Resized {
        /// The disk's ID.
        id: String,
        /// The image opened.
        path: PathBuf,
        /// The size the machine's disk had.
        want: u64,
        /// The size of the image opened.
        got: u64,
    },
    /// A replay was given an image other than the recorded one.
    #[error(
        "disk {id}: the image {path} is not the one recorded (recorded: {want_size} bytes, sha256 {want_hash}; \
         this one: {got_size} bytes, sha256 {got_hash})"
    )]
    Changed {
        /// The disk's ID.
        id: String,
        /// The image given.
        path: PathBuf,
        /// The recorded size.
        want_size: u64,
        /// The recorded hash.
        want_hash: String,
        /// The given image's size.
        got_size: u64,
        /// The given image's hash.
        got_hash: String,
    },
}

/// The image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskFormat {
    /// A raw image (`format=raw`), whatever its first bytes.
    Raw,
    /// A qcow2 image (`format=qcow2`).
    Qcow2,
    /// Not given: qcow2 if the file begins with the qcow2 magic, else raw.
    Auto,
}

/// The first four bytes of a qcow2 file.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

impl DiskFormat {
    /// The format of the image at `path`: `self` unless [`DiskFormat::Auto`],
    /// which looks at the file's first bytes.
    pub fn resolve(self, path: &Path) -> io::Result<DiskFormat> {
        if self != DiskFormat::Auto {
            return Ok(self);
        }
        let mut magic = [0u8; 4];
        let f = File::open(path)?;
        let n = f.read_at(&mut magic, 0)?;
        Ok(if n == 4 && magic == QCOW2_MAGIC {
            DiskFormat::Qcow2
        } else {
            DiskFormat::Raw
        })
    }
}

/// A `--disk FILE[,format=raw|qcow2][,readonly][,id=NAME]` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The image.
    pub path: PathBuf,
    /// The format.
    pub format: DiskFormat,
    /// Whether the guest may not write.
    pub read_only: bool,
    /// The ID (virtio-blk GET_ID; the disk's name in messages); `None`
    /// gives `disk0`, `disk1`... by position.
    pub id: Option<String>,
}

impl std::str::FromStr for DiskSpec {
    type Err = DiskError;

    fn from_str(spec: &str) -> Result<Self, DiskError> {
        let bad = |why: &str| DiskError::Spec {
            spec: spec.to_string(),
            why: why.to_string(),
        };
        let mut parts = spec.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| bad("no image file"))?;
        let mut d = DiskSpec {
            path: PathBuf::from(path),
            format: DiskFormat::Auto,
            read_only: false,
            id: None,
        };
        for p in parts {
            match p.split_once('=') {
                None if p == "readonly" => d.read_only = true,
                Some(("readonly", v)) => {
                    d.read_only = match v {
                        "on" | "true" | "yes" => true,
                        "off" | "false" | "no" => false,
                        _ => return Err(bad("readonly takes on or off")),
                    }
                }
                Some(("format", "raw")) => d.format = DiskFormat::Raw,
                Some(("format", "qcow2")) => d.format = DiskFormat::Qcow2,
                Some(("format", f)) => return Err(bad(&format!("format {f} is not supported (raw or qcow2)"))),
                Some(("id", v)) => {
                    if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(bad("id must be 1 to 20 printable ASCII characters"));
                    }
                    d.id = Some(v.to_string());
                }
                _ => {
                    return Err(bad(&format!(
                        "unknown option {p:?} (format=raw|qcow2, readonly, id=NAME)"
                    )))
                }
            }
        }
        Ok(d)
    }
}

/// What a trace records of a disk: enough to find the image again and to
/// know it is the same. A plain run's snapshot or migration stream records
/// the absolute path and the size, and no hash (its image changes as it
/// runs, and hashing it would cost seconds per GiB).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIdentity {
    /// The ID.
    pub id: String,
    /// The image's path as given when recording.
    pub path: String,
    /// Whether the guest may not write.
    pub read_only: bool,
    /// The disk's size in bytes (a qcow2 image's virtual size).
    pub size: u64,
    /// The SHA-256 of the image file, hex (a qcow2 image's file as it is,
    /// not the disk it holds).
    pub sha256: String,
    /// Whether the trace holds every read of this disk (`--embed-disks`):
    /// the replay then needs no image.
    pub embedded: bool,
}

/// The SHA-256 of a file and its size.
pub fn hash_file(path: &Path) -> io::Result<(u64, String)> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    let hex = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((size, hex))
}

/// What a disk reads and writes: a raw file, or a qcow2 image through
/// `imago`.
enum Image {
    Raw(File),
    Qcow2(FormatAccess<imago::file::File>),
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Image::Raw(file) => f.debug_tuple("Raw").field(file).finish(),
            Image::Qcow2(q) => write!(f, "Qcow2({q})"),
        }
    }
}

/// The qcow2 header fields Nyx checks before handing the file to imago
/// (offsets of the qcow2 specification, big-endian): no backing file, no
/// encryption, and the L1 and refcount tables inside the file (imago reads
/// past the end of the file as zeros, which would make a truncated image an
/// empty disk).
fn qcow2_header_check(path: &Path) -> Result<(), String> {
    let f = File::open(path).map_err(|e| e.to_string())?;
    let file_len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut h = [0u8; 72];
    let n = f.read_at(&mut h, 0).map_err(|e| e.to_string())?;
    if n < 4 || h[..4] != QCOW2_MAGIC {
        return Err("not a qcow2 image (no qcow2 magic)".into());
    }
    if n < h.len() {
        return Err(format!(
            "a corrupt qcow2 image: the file ends inside the header ({n} bytes)"
        ));
    }
    let be32 = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let be64 = |at: usize| u64::from(be32(at)) << 32 | u64::from(be32(at + 4));
    if be64(8) != 0 {
        return Err("the qcow2 image has a backing file, which Nyx does not support \
                    (qemu-img convert -O qcow2 makes a standalone copy)"
            .into());
    }
    if be32(32) != 0 {
        return Err("the qcow2 image is encrypted, which Nyx does not support".into());
    }
    let cluster_bits = be32(20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(format!("a corrupt qcow2 image: cluster bits {cluster_bits}"));
    }
    let inside = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|end| end <= file_len);
    if !inside(be64(40), u64::from(be32(36)) * 8) {
        return Err("a corrupt qcow2 image: its L1 table is not inside the file".into());
    }
    if !inside(be64(48), u64::from(be32(56)) << cluster_bits) {
        return Err("a corrupt qcow2 image: its refcount table is not inside the file".into());
    }
    Ok(())
}

/// Opens the qcow2 image at `path` through imago, refusing what Nyx does
/// not support.
fn open_qcow2(path: &Path, writable: bool) -> Result<FormatAccess<imago::file::File>, String> {
    qcow2_header_check(path)?;
    let corrupt = |e: io::Error| format!("a corrupt or unsupported qcow2 image: {e}");
    let mut q = Qcow2::<imago::file::File>::open_path(path, writable).map_err(corrupt)?;
    if let Some(b) = q.implicit_backing_file() {
        return Err(format!(
            "the qcow2 image has a backing file ({b}), which Nyx does not support"
        ));
    }
    if q.requires_external_data_file() {
        return Err("the qcow2 image has an external data file, which Nyx does not support".into());
    }
    q.set_backing(None);
    q.set_data_file(None);
    Ok(FormatAccess::new(q))
}

/// An open disk image.
#[derive(Debug)]
pub struct Disk {
    image: Image,
    size: u64,
    read_only: bool,
    /// Sectors written since the image was opened, when writes must not
    /// reach the image.
    overlay: Option<BTreeMap<u64, Vec<u8>>>,
}

impl Disk {
    /// Opens `spec`'s image as disk `id`. With `overlay`, the image is
    /// opened read-only and writes stay in memory.
    pub fn open(spec: &DiskSpec, id: &str, overlay: bool) -> Result<Disk, DiskError> {
        let io_err = |source| DiskError::Io {
            id: id.to_string(),
            path: spec.path.clone(),
            source,
        };
        let writable = !spec.read_only && !overlay;
        let (image, size) = match spec.format.resolve(&spec.path).map_err(io_err)? {
            DiskFormat::Qcow2 => {
                let q = open_qcow2(&spec.path, writable).map_err(|why| DiskError::Qcow2 {
                    id: id.to_string(),
                    path: spec.path.clone(),
                    why,
                })?;
                let size = q.size();
                (Image::Qcow2(q), size)
            }
            _ => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(writable)
                    .open(&spec.path)
                    .map_err(io_err)?;
                let size = file.metadata().map_err(io_err)?.len();
                (Image::Raw(file), size)
            }
        };
        if size == 0 || size % SECTOR != 0 {
            return Err(DiskError::Size {
                id: id.to_string(),
                path: spec.path.clone(),
                size,
            });
        }
        Ok(Disk {
            image,
            size,
            read_only: spec.read_only,
            overlay: overlay.then(BTreeMap::new),
        })
    }

    /// The identity of `spec`'s image: the disk's size (a qcow2 image's
    /// virtual size) and the SHA-256 of the file (hashes the whole file).
    pub fn identity(spec: &DiskSpec, id: &str) -> Result<DiskIdentity, DiskError> {
        let io_err = |source| DiskError::Io {
            id: id.to_string(),
            path: spec.path.clone(),
            source,
        };
        let (file_size, sha256) = hash_file(&spec.path).map_err(io_err)?;
        let size = match spec.format.resolve(&spec.path).map_err(io_err)? {
            DiskFormat::Qcow2 => Disk::open(spec, id, true)?.size,
            _ => file_size,
        };
        Ok(DiskIdentity {
            id: id.to_string(),
            path: spec.path.display().to_string(),
            read_only: spec.read_only,
            size,
            sha256,
            embedded: false,
        })
    }

    /// The format a recorded disk is opened with at `path`. A trace does
    /// not store the format: the file's magic decides, except that a file
    /// with the qcow2 magic whose recorded size is the file's own size and
    /// not the qcow2 virtual size was recorded as `format=raw`.
    pub fn recorded_format(want: &DiskIdentity, path: &Path) -> Result<DiskFormat, DiskError> {
        let io_err = |source| DiskError::Io {
            id: want.id.clone(),
            path: path.to_path_buf(),
            source,
        };
        let format = DiskFormat::Auto.resolve(path).map_err(io_err)?;
        if format == DiskFormat::Qcow2 && want.size != 0 {
            let file_size = std::fs::metadata(path).map_err(io_err)?.len();
            let virtual_size = open_qcow2(path, false).map(|q| q.size()).ok();
            if file_size == want.size && virtual_size != Some(want.size) {
                return Ok(DiskFormat::Raw);
            }
        }
        Ok(format)
    }

    /// Checks that this image has the size `want` records, the check of a
    /// plain run's disk ([`DiskIdentity::sha256`] empty, size known).
    pub fn check_size(&self, want: &DiskIdentity, path: &Path) -> Result<(), DiskError> {
        if want.size != 0 && want.size != self.size {
            return Err(DiskError::Resized {
                id: want.id.clone(),
                path: path.to_path_buf(),
                want: want.size,
                got: self.size,
            });
        }
        Ok(())
    }

    /// Checks that `path` holds the image `want` describes; returns the
    /// format to open it with.
    pub fn check_identity(want: &DiskIdentity, path: &Path) -> Result<DiskFormat, DiskError> {
        let format = Self::recorded_format(want, path)?;
        let spec = DiskSpec {
            path: path.to_path_buf(),
            format,
            read_only: want.read_only,
            id: Some(want.id.clone()),
        };
        let got = Self::identity(&spec, &want.id)?;
        if got.size != want.size || got.sha256 != want.sha256 {
            return Err(DiskError::Changed {
                id: want.id.clone(),
                path: path.to_path_buf(),
                want_size: want.size,
                want_hash: want.sha256.clone(),
                got_size: got.size,
                got_hash: got.sha256,
            });
        }
        Ok(format)
    }

    /// How many sectors the overlay holds.
    pub fn overlay_sectors(&self) -> usize {
        self.overlay.as_ref().map_or(0, BTreeMap::len)
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "beyond the end of the disk",
            )),
        }
    }
}

impl BlockBackend for Disk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        match &self.image {
            Image::Raw(file) => file.read_exact_at(buf, offset)?,
            Image::Qcow2(q) => q.read(&mut *buf, offset)?,
        }
        if let Some(o) = &self.overlay {
            let first = offset / SECTOR;
            let last = (offset + buf.len() as u64).div_ceil(SECTOR);
            for (&sector, data) in o.range(first..last) {
                let s = sector * SECTOR;
                let from = s.max(offset);
                let to = (s + SECTOR).min(offset + buf.len() as u64);
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - s) as usize..(to - s) as usize]);
            }
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.read_only {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        self.check(offset, data.len())?;
        if self.overlay.is_none() {
            return match &self.image {
                Image::Raw(file) => file.write_all_at(data, offset),
                Image::Qcow2(q) => q.write(data, offset),
            };
        }
        let end = offset + data.len() as u64;
        let mut sector = offset / SECTOR;
        while sector * SECTOR < end {
            let s = sector * SECTOR;
            let mut block = vec![0u8; SECTOR as usize];
            let (from, to) = (s.max(offset), (s + SECTOR).min(end));
            if from != s || to != s + SECTOR {
                self.read_at(s, &mut block)?;
            }
            block[(from - s) as usize..(to - s) as usize]
                .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
            if let Some(o) = &mut self.overlay {
                o.insert(sector, block);
            }
            sector += 1;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.overlay {
            Some(_) => Ok(()),
            None if self.read_only => Ok(()),
            None => match &self.image {
                Image::Raw(file) => file.sync_data(),
                Image::Qcow2(q) => {
                    q.flush()?;
                    q.sync()
                }
            },
        }
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }

    fn save(&self) -> Vec<u8> {
        match &self.overlay {
            Some(o) => postcard::to_stdvec(o).unwrap_or_default(),
            None => Vec::new(),
        }
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        if self.overlay.is_none() {
            if state.is_empty() {
                return Ok(());
            }
            // A snapshot taken while recording holds the writes the
            // recording made: keep them in an overlay from now on, so the
            // image stays as it was.
            self.overlay = Some(BTreeMap::new());
        }
        match &mut self.overlay {
            None => Ok(()),
            Some(o) => {
                let restored: BTreeMap<u64, Vec<u8>> =
                    postcard::from_bytes(state).map_err(|e| format!("disk overlay: {e}"))?;
                let bad = restored
                    .iter()
                    .any(|(&s, d)| d.len() != SECTOR as usize || s >= self.size / SECTOR);
                if bad {
                    return Err("disk overlay: a sector of the wrong size or beyond the disk".into());
                }
                *o = restored;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn image(dir: &tempfile::TempDir, bytes: &[u8]) -> DiskSpec {
        let path = dir.path().join("d.img");
        std::fs::write(&path, bytes).unwrap();
        DiskSpec {
            path,
            format: DiskFormat::Raw,
            read_only: false,
            id: None,
        }
    }

    #[test]
    fn specs_parse_and_bad_ones_are_named() {
        let d: DiskSpec = "a.img,format=raw,readonly,id=root".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("a.img"));
        assert!(d.read_only);
        assert_eq!(d.id.as_deref(), Some("root"));
        assert!(!"b.img".parse::<DiskSpec>().unwrap().read_only);
        assert_eq!("b.img".parse::<DiskSpec>().unwrap().format, DiskFormat::Auto);
        assert_eq!("b,format=qcow2".parse::<DiskSpec>().unwrap().format, DiskFormat::Qcow2);
        assert_eq!(d.format, DiskFormat::Raw);
        for bad in [
            "",
            ",id=x",
            "a,format=vmdk",
            "a,id=",
            "a,id=has space",
            "a,frob",
            "a,readonly=maybe",
        ] {
            let e = bad.parse::<DiskSpec>().unwrap_err().to_string();
            assert!(e.contains("--disk"), "{bad}: {e}");
        }
    }

    #[test]
    fn overlay_keeps_the_image_and_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let base: Vec<u8> = (0..2048u32).map(|i| i as u8).collect();
        let spec = image(&dir, &base);
        let id = Disk::identity(&spec, "d0").unwrap();
        let mut d = Disk::open(&spec, "d0", true).unwrap();
        d.write_at(510, &[0xAA; 4]).unwrap();
        let mut b = vec![0u8; 8];
        d.read_at(508, &mut b).unwrap();
        assert_eq!(b, [252, 253, 0xAA, 0xAA, 0xAA, 0xAA, 2, 3]);
        assert_eq!(d.overlay_sectors(), 2);
        let saved = d.save();
        d.write_zeroes(0, 2048).unwrap();
        d.restore(&saved).unwrap();
        d.read_at(508, &mut b).unwrap();
        assert_eq!(b[2], 0xAA);
        assert_eq!(std::fs::read(&spec.path).unwrap(), base, "image unchanged");
        Disk::check_identity(&id, &spec.path).unwrap();
        assert!(d.restore(&[1, 2, 3]).is_err());
        assert!(d.read_at(2047, &mut b).is_err());
    }

    #[test]
    fn write_through_and_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = image(&dir, &[0u8; 1024]);
        let id = Disk::identity(&spec, "d0").unwrap();
        let mut d = Disk::open(&spec, "d0", false).unwrap();
        d.write_at(512, &[7; 512]).unwrap();
        d.flush().unwrap();
        assert_eq!(std::fs::read(&spec.path).unwrap()[512], 7);
        let e = Disk::check_identity(&id, &spec.path).unwrap_err().to_string();
        assert!(e.contains("disk d0") && e.contains("not the one recorded"), "{e}");
        assert!(d.restore(&d.save()).is_ok());
        // A recording's overlay restored into a write-through disk stays
        // an overlay.
        let mut o = Disk::open(&spec, "d0", true).unwrap();
        o.write_at(0, &[5; 512]).unwrap();
        d.restore(&o.save()).unwrap();
        d.write_at(1024 - 512, &[6; 512]).unwrap();
        assert_eq!(
            std::fs::read(&spec.path).unwrap()[0],
            0,
            "overlay kept, image untouched"
        );
        assert_eq!(d.overlay_sectors(), 2);
        spec.read_only = true;
        let mut r = Disk::open(&spec, "d0", false).unwrap();
        assert!(r.write_at(0, &[1]).is_err());
        std::fs::write(&spec.path, [0u8; 100]).unwrap();
        assert!(matches!(Disk::open(&spec, "d0", false), Err(DiskError::Size { .. })));
    }

    /// Runs `qemu-img ARGS`; false when it is not installed (the test then
    /// checks nothing: CI installs it).
    fn qemu_img(args: &[&str]) -> bool {
        match std::process::Command::new("qemu-img").args(args).output() {
            Ok(o) => {
                assert!(
                    o.status.success(),
                    "qemu-img {args:?}: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                true
            }
            Err(_) => {
                eprintln!("qemu-img not installed: qcow2 test skipped");
                false
            }
        }
    }

    /// A qcow2 copy of `base` in `dir` (None without qemu-img).
    fn qcow2_of(dir: &tempfile::TempDir, base: &[u8]) -> Option<DiskSpec> {
        let raw = image(dir, base);
        let path = dir.path().join("d.qcow2");
        let ok = qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.path.to_str()?,
            path.to_str()?,
        ]);
        ok.then_some(DiskSpec {
            path,
            format: DiskFormat::Auto,
            read_only: false,
            id: None,
        })
    }

    #[test]
    fn the_format_is_detected_by_the_qcow2_magic() {
        let dir = tempfile::tempdir().unwrap();
        let base: Vec<u8> = (0..65536u32).map(|i| (i * 3) as u8).collect();
        let raw = image(&dir, &base);
        assert_eq!(DiskFormat::Auto.resolve(&raw.path).unwrap(), DiskFormat::Raw);
        let Some(q) = qcow2_of(&dir, &base) else { return };
        assert_eq!(DiskFormat::Auto.resolve(&q.path).unwrap(), DiskFormat::Qcow2);
        assert_eq!(DiskFormat::Raw.resolve(&q.path).unwrap(), DiskFormat::Raw);
        // format=raw shows the qcow2 file's bytes; format=qcow2 on a raw
        // image is refused, naming the disk.
        let as_raw = DiskSpec {
            format: DiskFormat::Raw,
            ..q.clone()
        };
        let mut d = Disk::open(&as_raw, "d0", true).unwrap();
        let mut magic = [0u8; 4];
        d.read_at(0, &mut magic).unwrap();
        assert_eq!(magic, QCOW2_MAGIC);
        let e = Disk::open(
            &DiskSpec {
                format: DiskFormat::Qcow2,
                ..raw
            },
            "d0",
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("disk d0") && e.contains("not a qcow2 image"), "{e}");
        // A trace recorded with format=raw on the qcow2 file replays as raw.
        let id = Disk::identity(&as_raw, "d0").unwrap();
        assert_eq!(Disk::check_identity(&id, &q.path).unwrap(), DiskFormat::Raw);
    }

    #[test]
    fn a_qcow2_image_reads_writes_and_keeps_its_file_under_an_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let base: Vec<u8> = (0..(1u32 << 20)).map(|i| (i / 512) as u8 ^ i as u8).collect();
        let Some(spec) = qcow2_of(&dir, &base) else { return };
        let file = std::fs::read(&spec.path).unwrap();
        let id = Disk::identity(&spec, "d0").unwrap();
        assert_eq!(id.size, base.len() as u64, "the virtual size");
        assert_eq!(id.sha256, hash_file(&spec.path).unwrap().1, "the file's hash");
        assert_eq!(Disk::check_identity(&id, &spec.path).unwrap(), DiskFormat::Qcow2);

        let mut o = Disk::open(&spec, "d0", true).unwrap();
        let mut all = vec![0u8; base.len()];
        o.read_at(0, &mut all).unwrap();
        assert!(all == base, "reads the raw image's bytes");
        o.write_at(700_000, &[0xAB; 1500]).unwrap();
        let mut b = vec![0u8; 1500];
        o.read_at(700_000, &mut b).unwrap();
        assert_eq!(b, vec![0xAB; 1500]);
        o.flush().unwrap();
        drop(o);
        assert_eq!(std::fs::read(&spec.path).unwrap(), file, "the overlay kept the file");

        // Written through: a new cluster is allocated, and the image reads
        // back as a raw image that took the same write.
        let mut w = Disk::open(&spec, "d0", false).unwrap();
        w.write_at(700_000, &[0xAB; 1500]).unwrap();
        w.flush().unwrap();
        drop(w);
        let e = Disk::check_identity(&id, &spec.path).unwrap_err().to_string();
        assert!(e.contains("disk d0") && e.contains("not the one recorded"), "{e}");
        let back = dir.path().join("back.raw");
        if qemu_img(&[
            "convert",
            "-O",
            "raw",
            spec.path.to_str().unwrap(),
            back.to_str().unwrap(),
        ]) {
            let mut want = base.clone();
            want[700_000..701_500].fill(0xAB);
            assert!(std::fs::read(&back).unwrap() == want);
            qemu_img(&["check", spec.path.to_str().unwrap()]);
        }
        let r = DiskSpec {
            read_only: true,
            ..spec.clone()
        };
        assert!(Disk::open(&r, "d0", false).unwrap().write_at(0, &[1]).is_err());
    }

    #[test]
    fn backing_files_and_corrupt_qcow2_images_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let base = vec![0x5Au8; 1 << 17];
        let Some(spec) = qcow2_of(&dir, &base) else { return };
        let over = dir.path().join("over.qcow2");
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            spec.path.to_str().unwrap(),
            "-F",
            "qcow2",
            over.to_str().unwrap(),
        ]);
        let e = Disk::open(
            &DiskSpec {
                path: over.clone(),
                ..spec.clone()
            },
            "root",
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("disk root") && e.contains("backing file"), "{e}");

        // Truncated and damaged files: an error or a disk, never a panic,
        // and reading every sector of what opens gives data or an error.
        let file = std::fs::read(&spec.path).unwrap();
        let bad = dir.path().join("bad.qcow2");
        let mut cases: Vec<Vec<u8>> = [3usize, 40, 100, 512, 4096, 65536, 70000]
            .iter()
            .map(|&n| file[..n.min(file.len())].to_vec())
            .collect();
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..200 {
            let mut f = file.clone();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                // Mostly the header and the first metadata clusters.
                let at = (seed % 0x40000) as usize % f.len();
                f[at] = (seed >> 32) as u8;
            }
            cases.push(f);
        }
        for (i, c) in cases.iter().enumerate() {
            std::fs::write(&bad, c).unwrap();
            let s = DiskSpec {
                path: bad.clone(),
                format: DiskFormat::Qcow2,
                ..spec.clone()
            };
            match Disk::open(&s, "d0", true) {
                Err(e) => assert!(e.to_string().contains("disk d0"), "case {i}: {e}"),
                Ok(mut d) => {
                    let mut b = vec![0u8; 65536];
                    let size = d.size().min(1 << 20);
                    let mut at = 0;
                    while at + b.len() as u64 <= size {
                        let _ = d.read_at(at, &mut b);
                        at += b.len() as u64;
                    }
                }
            }
        }
        std::fs::write(&bad, &file[..100]).unwrap();
        let e = Disk::open(&DiskSpec { path: bad, ..spec }, "d0", true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("disk d0") && e.contains("corrupt"), "{e}");
    }

    proptest! {
        /// Through the overlay, the disk reads like a plain byte array that
        /// took the same writes; the image never changes.
        #[test]
        fn overlay_matches_a_model(ops in prop::collection::vec((0u64..4096, prop::collection::vec(any::<u8>(), 0..700), any::<bool>()), 0..40)) {
            let dir = tempfile::tempdir().unwrap();
            let base: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
            let spec = image(&dir, &base);
            let mut d = Disk::open(&spec, "d", true).unwrap();
            let mut model = base.clone();
            for (off, data, write) in ops {
                let fits = off as usize + data.len() <= model.len();
                if write {
                    prop_assert_eq!(d.write_at(off, &data).is_ok(), fits);
                    if fits {
                        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
                    }
                } else {
                    let mut b = vec![0u8; data.len()];
                    prop_assert_eq!(d.read_at(off, &mut b).is_ok(), fits);
                    if fits {
                        prop_assert_eq!(&b[..], &model[off as usize..off as usize + b.len()]);
                    }
                }
            }
            prop_assert_eq!(std::fs::read(&spec.path).unwrap(), base);
        }
    }
}
