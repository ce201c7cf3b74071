//! The disk behind a block device: [`BlockBackend`], and [`MemDisk`], a
//! disk held in memory for tests.
//!
//! A virtio-blk device executes each request at the guest's notify, on the
//! vCPU thread, through this trait: the same request on the same disk
//! contents gives the same result, which is what lets a replay re-execute
//! disk I/O instead of logging it. The machine supplies the backend (a raw
//! image, a copy-on-write overlay over one while recording or replaying).

use std::io;

/// Size of a sector, the unit of virtio-blk addresses.
pub const SECTOR: u64 = 512;

/// A disk.
pub trait BlockBackend: Send {
    /// The size in bytes (a multiple of [`SECTOR`]).
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Fills `buf` from byte `offset`; the range is inside the disk.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at byte `offset`; the range is inside the disk.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes the writes so far durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Forgets `[offset, offset + len)`: it reads as zeros afterwards.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }
    /// What a snapshot must keep of the disk beyond the image it was
    /// opened on (a copy-on-write overlay's sectors); empty for a disk
    /// that writes through to its image.
    fn save(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Puts back what [`BlockBackend::save`] returned.
    fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        if state.is_empty() {
            Ok(())
        } else {
            Err("this disk keeps no snapshot state, but the snapshot has some".into())
        }
    }
    /// Writes zeros over `[offset, offset + len)`.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let chunk = vec![0u8; 64 << 10];
        let mut at = offset;
        let end = offset.saturating_add(len);
        while at < end {
            let n = (end - at).min(chunk.len() as u64) as usize;
            self.write_at(at, &chunk[..n])?;
            at += n as u64;
        }
        Ok(())
    }
}

/// A disk in memory (tests, and the fuzz-style device tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemDisk {
    /// The contents.
    pub data: Vec<u8>,
    /// Whether writes are refused.
    pub read_only: bool,
    /// How many flushes the guest asked for.
    pub flushes: u64,
}

impl MemDisk {
    /// A writable disk with these contents (rounded up to whole sectors).
    pub fn new(mut data: Vec<u8>) -> Self {
        data.resize((data.len() as u64).div_ceil(SECTOR) as usize * SECTOR as usize, 0);
        MemDisk {
            data,
            read_only: false,
            flushes: 0,
        }
    }

    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
        if end > self.data.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(start..end)
    }
}

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.data[r]);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.read_only {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        let r = self.range(offset, data.len())?;
        self.data[r].copy_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flushes += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_disk_reads_writes_and_zeroes_within_bounds() {
        let mut d = MemDisk::new(vec![7; 1000]);
        assert_eq!(d.size(), 1024);
        d.write_at(510, &[1, 2, 3]).unwrap();
        let mut b = [0u8; 4];
        d.read_at(509, &mut b).unwrap();
        assert_eq!(b, [7, 1, 2, 3]);
        d.write_zeroes(0, 512).unwrap();
        d.read_at(509, &mut b).unwrap();
        assert_eq!(b, [0, 0, 0, 3]);
        assert!(d.read_at(1022, &mut b).is_err());
        assert!(d.write_at(u64::MAX, &b).is_err());
        d.read_only = true;
        assert!(d.write_at(0, &b).is_err());
        d.flush().unwrap();
        assert_eq!(d.flushes, 1);
    }
}
