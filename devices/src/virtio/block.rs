//! virtio-blk ([`VirtioBlock`]) over a [`BlockBackend`], as QEMU 7.2's
//! `virtio-blk-pci` (class 01:00:00, one queue of 256 entries): it offers
//! SEG_MAX (254), BLK_SIZE (512), FLUSH, TOPOLOGY, DISCARD, WRITE_ZEROES
//! and, for a read-only disk, RO, and its `struct virtio_blk_config` holds
//! QEMU's values (one discard and write-zeroes segment of up to 0x3FFFFF
//! sectors, alignment 1 sector, `write_zeroes_may_unmap` 1).
//!
//! A request is handled as QEMU's `virtio_blk_handle_request`: the header
//! is the first 16 device-readable bytes and the status the last
//! device-writable byte, the data whatever lies between; the type is taken
//! without its OUT and BARRIER bits (so 5 is a flush and 9 a GET_ID).
//! IN/OUT outside the disk, of a length that is not a whole number of
//! sectors or above 0x3FFFFF sectors, and any write to a read-only disk,
//! complete with IOERR; an unknown type with UNSUPP; GET_ID writes the ID
//! and a NUL if it fits, at most 20 bytes. DISCARD and WRITE_ZEROES take
//! exactly one `virtio_blk_discard_write_zeroes` segment (more is UNSUPP, a
//! shorter one a malformed request); unknown flags, and UNMAP on a discard,
//! are UNSUPP. Whatever the outcome, the used length is the whole
//! device-writable length of the chain, data and status together, as QEMU
//! reports it (4097 for a 4 KiB read, 1 for a write). A chain without a
//! device-readable or a device-writable buffer, or with a header shorter
//! than 16 bytes, stops the device. Data moves through a 64 KiB bounce
//! buffer, so no request allocates in proportion to its length.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_BARRIER, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

use super::{Chain, VirtQueue, VirtioDevice, VirtioError};
use crate::block::{BlockBackend, SECTOR};
use crate::pci_device::DmaMemory;

/// The virtio device ID of virtio-blk.
pub const DEVICE_TYPE: u16 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK as u16;
/// The device's name ([`VirtioDevice::name`]).
pub const NAME: &str = "virtio-blk";

/// The most sectors of one request or segment (QEMU's
/// `BDRV_REQUEST_MAX_SECTORS`).
pub const MAX_SECTORS: u32 = 0x3F_FFFF;
/// Bytes of the ID GET_ID returns at most.
pub const ID_BYTES: usize = 20;
const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Mass storage, SCSI (QEMU's `PCI_CLASS_STORAGE_SCSI`).
const CLASS: u32 = 0x01_00_00;
const CONFIG_LEN: usize = 60;
const BOUNCE: usize = 64 << 10;
const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// The block device.
pub struct VirtioBlock {
    disk: Box<dyn BlockBackend>,
    id: Vec<u8>,
    bounce: Vec<u8>,
}

impl std::fmt::Debug for VirtioBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBlock")
            .field("size", &self.disk.size())
            .field("id", &String::from_utf8_lossy(&self.id))
            .finish()
    }
}

impl VirtioBlock {
    /// A device for `disk` whose GET_ID answers `id` (its first 20 bytes).
    pub fn new(disk: Box<dyn BlockBackend>, id: String) -> Self {
        let mut id = id.into_bytes();
        id.truncate(ID_BYTES);
        VirtioBlock {
            disk,
            id,
            bounce: Vec::new(),
        }
    }

    /// The capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.size() / SECTOR
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &self.capacity().to_le_bytes());
        put(12, &u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
        put(20, &(SECTOR as u32).to_le_bytes()); // blk_size
        put(32, &[1]); // writeback, as QEMU's default cache mode shows it
        put(34, &1u16.to_le_bytes()); // num_queues
        put(36, &MAX_SECTORS.to_le_bytes()); // max_discard_sectors
        put(40, &1u32.to_le_bytes()); // max_discard_seg
        put(44, &1u32.to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        c
    }

    /// QEMU's `virtio_blk_sect_range_ok`.
    fn range_ok(&self, sector: u64, bytes: u64) -> bool {
        let sectors = bytes / SECTOR;
        let total = self.capacity();
        bytes % SECTOR == 0 && sectors <= u64::from(MAX_SECTORS) && sector <= total && sectors <= total - sector
    }

    /// Moves `len` bytes between the disk at `sector` and the chain's data
    /// (device-readable from byte 16 for a write, device-writable from 0
    /// for a read); an I/O error of the disk is the request's IOERR.
    fn transfer(
        &mut self,
        chain: &Chain,
        mem: &DmaMemory,
        write: bool,
        sector: u64,
        len: u64,
    ) -> Result<u8, VirtioError> {
        if write && self.disk.read_only() {
            return Ok(S_IOERR);
        }
        self.bounce.resize(BOUNCE, 0);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(BOUNCE as u64) as usize;
            let at = sector * SECTOR + done;
            let buf = &mut self.bounce[..n];
            if write {
                chain.read_at(mem, 16 + done, buf)?;
                if self.disk.write_at(at, buf).is_err() {
                    return Ok(S_IOERR);
                }
            } else {
                if self.disk.read_at(at, buf).is_err() {
                    return Ok(S_IOERR);
                }
                chain.write_at(mem, done, buf)?;
            }
            done += n as u64;
        }
        Ok(S_OK)
    }

    fn discard_or_zero(&mut self, chain: &Chain, mem: &DmaMemory, ty: u32) -> Result<u8, VirtioError> {
        let data = chain.readable_len() - 16;
        if ty & VIRTIO_BLK_T_OUT == 0 || data > 16 {
            return Ok(S_UNSUPP);
        }
        if data < 16 {
            return Err(VirtioError::Request("discard/write zeroes segment too short"));
        }
        let mut seg = [0u8; 16];
        chain.read_at(mem, 16, &mut seg)?;
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
        let write_zeroes = ty & !VIRTIO_BLK_T_BARRIER == VIRTIO_BLK_T_WRITE_ZEROES;
        let bytes = u64::from(sectors) * SECTOR;
        if sectors > MAX_SECTORS || !self.range_ok(sector, bytes) {
            return Ok(S_IOERR);
        }
        let unmap = flags & WRITE_ZEROES_FLAG_UNMAP != 0;
        if flags & !WRITE_ZEROES_FLAG_UNMAP != 0 || (unmap && !write_zeroes) {
            return Ok(S_UNSUPP);
        }
        if self.disk.read_only() {
            return Ok(S_IOERR);
        }
        let offset = sector * SECTOR;
        let done = if write_zeroes && !unmap {
            self.disk.write_zeroes(offset, bytes)
        } else {
            self.disk.discard(offset, bytes)
        };
        Ok(if done.is_ok() { S_OK } else { S_IOERR })
    }

    /// Executes one request; returns its status.
    fn request(&mut self, chain: &Chain, mem: &DmaMemory) -> Result<u8, VirtioError> {
        let (readable, writable) = (chain.readable_len(), chain.writable_len());
        if readable == 0 || writable == 0 {
            return Err(VirtioError::Request("no header or no status buffer"));
        }
        let mut header = [0u8; 16];
        if chain.read_at(mem, 0, &mut header)? < header.len() {
            return Err(VirtioError::Request("request header shorter than 16 bytes"));
        }
        let ty = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let data_in = writable - 1;
        Ok(match ty & !(VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_BARRIER) {
            VIRTIO_BLK_T_IN => {
                let write = ty & VIRTIO_BLK_T_OUT != 0;
                let len = if write { readable - 16 } else { data_in };
                if self.range_ok(sector, len) {
                    self.transfer(chain, mem, write, sector, len)?
                } else {
                    S_IOERR
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.disk.flush().is_ok() {
                    S_OK
                } else {
                    S_IOERR
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut id = self.id.clone();
                id.push(0);
                let n = id.len().min(ID_BYTES).min(data_in as usize);
                chain.write_at(mem, 0, &id[..n])?;
                S_OK
            }
            t if t == VIRTIO_BLK_T_DISCARD & !VIRTIO_BLK_T_OUT
                || t == VIRTIO_BLK_T_WRITE_ZEROES & !VIRTIO_BLK_T_OUT =>
            {
                self.discard_or_zero(chain, mem, ty)?
            }
            _ => S_UNSUPP,
        })
    }
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn name(&self) -> &str {
        NAME
    }

    fn pci_class(&self) -> u32 {
        CLASS
    }

    fn features(&self) -> u64 {
        let bits = [
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ];
        let ro = if self.disk.read_only() { 1 << VIRTIO_BLK_F_RO } else { 0 };
        bits.iter().fold(ro, |f, &b| f | 1 << b)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        let c = self.config();
        for (i, d) in data.iter_mut().enumerate() {
            *d = c.get(offset + i).copied().unwrap_or(0xFF);
        }
    }

    fn process_queue(&mut self, _index: usize, queue: &mut VirtQueue<'_>) -> Result<(), VirtioError> {
        while let Some(chain) = queue.pop()? {
            let status = self.request(&chain, queue.mem())?;
            let writable = chain.writable_len();
            chain.write_at(queue.mem(), writable - 1, &[status])?;
            queue.add_used(chain.head, writable as u32)?;
        }
        Ok(())
    }

    /// What the disk keeps beyond its image (a copy-on-write overlay).
    fn save(&self) -> Vec<u8> {
        self.disk.save()
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        self.disk.restore(state)
    }

    /// Flushes the image, naming the disk on failure.
    fn flush_storage(&mut self) -> std::io::Result<()> {
        self.disk.flush().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("disk {}: flushing its image: {e}", String::from_utf8_lossy(&self.id)),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci_device::PciDevice;
    use crate::virtio::testutil::{Harness, SharedDisk, BUF, HOLE, MSI_ADDR, MSI_DATA, RINGS};
    use proptest::prelude::*;
    use sha2::{Digest, Sha256};
    use vm_memory::bitmap::{AtomicBitmap, Bitmap};
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    const HDR: u64 = BUF;
    const STATUS: u64 = BUF + 0x100;
    const DATA: u64 = BUF + 0x1000;

    /// The image of the golden guest run (`tests/golden/virtio-disk.sh`).
    fn golden_image() -> Vec<u8> {
        let mut d = Vec::new();
        for s in 0..256 {
            for l in 0..16 {
                d.extend_from_slice(format!("sector {s:04} line {l:02} byte {:06}\n", s * 512 + l * 32).as_bytes());
            }
        }
        d
    }

    fn fnv1a(data: &[u8]) -> u32 {
        data.iter()
            .fold(0x811c_9dc5, |h, &b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
    }

    fn start(disk: &SharedDisk, id: &str) -> Harness {
        let features = 1 << 9 | 1 << 13 | 1 << 14;
        Harness::start(Box::new(VirtioBlock::new(Box::new(disk.clone()), id.into())), features)
    }

    /// A request of `ty` at `sector` with `data` (address, length,
    /// device-writable); returns (status, used length).
    fn request(h: &mut Harness, ty: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&ty.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        h.write(HDR, &hdr);
        h.write(STATUS, &[0xFF]);
        let mut chain = vec![(HDR, 16, false)];
        chain.extend_from_slice(data);
        chain.push((STATUS, 1, true));
        h.submit(0, &chain);
        let (_, used) = h.pop_used(0).expect("the request completes");
        (h.read(STATUS, 1)[0], used)
    }

    fn segment(h: &Harness, sector: u64, sectors: u32, flags: u32) -> (u64, u32, bool) {
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&sectors.to_le_bytes());
        seg[12..16].copy_from_slice(&flags.to_le_bytes());
        h.write(BUF + 0x200, &seg);
        (BUF + 0x200, 16, false)
    }

    #[test]
    fn features_and_configuration() {
        let disk = SharedDisk::new(vec![0; 128 << 10]);
        let mut h = start(&disk, "x");
        let printed = 1 << 32 | 1 << 5 | 1 << 6 | 1 << 9 | 1 << 13 | 1 << 14;
        assert_eq!(h.offered() & printed, 0x1_0000_6240, "what the golden guest prints");
        assert_eq!(h.offered(), 1 << 32 | 1 << 28 | 0x6644);
        let cfg: Vec<u64> = [
            (0, 8),
            (12, 4),
            (20, 4),
            (34, 2),
            (36, 4),
            (40, 4),
            (44, 4),
            (48, 4),
            (52, 4),
            (56, 1),
        ]
        .iter()
        .map(|&(off, len)| h.device_cfg_read(off, len))
        .collect();
        assert_eq!(cfg, vec![256, 254, 512, 1, 0x3F_FFFF, 1, 1, 0x3F_FFFF, 1, 1]);
        assert_eq!(h.device_cfg_read(58, 4), 0xFFFF_FFFF, "beyond the structure");
        let ro = SharedDisk::new(vec![0; 512]);
        ro.0.lock().unwrap().read_only = true;
        let mut h = start(&ro, "x");
        assert_ne!(h.offered() & 1 << 5, 0, "RO");
    }

    /// A live migration's stop-and-copy flushes each disk's image through
    /// the PCI function; a failure names the disk.
    #[test]
    fn flushing_storage_flushes_the_image_and_names_the_disk() {
        let disk = SharedDisk::new(vec![0; 512]);
        let mut h = start(&disk, "d7");
        h.dev.flush_storage().unwrap();
        assert_eq!(disk.0.lock().unwrap().flushes, 1);
        struct Full;
        impl BlockBackend for Full {
            fn size(&self) -> u64 {
                512
            }
            fn read_only(&self) -> bool {
                false
            }
            fn read_at(&mut self, _: u64, _: &mut [u8]) -> std::io::Result<()> {
                Ok(())
            }
            fn write_at(&mut self, _: u64, _: &[u8]) -> std::io::Result<()> {
                Ok(())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Err(std::io::Error::other("no space left"))
            }
        }
        let e = VirtioBlock::new(Box::new(Full), "d8".into())
            .flush_storage()
            .unwrap_err()
            .to_string();
        assert!(e.contains("disk d8") && e.contains("no space left"), "{e}");
    }

    #[test]
    fn the_golden_guests_requests_give_qemus_results() {
        let disk = SharedDisk::new(golden_image());
        let mut h = start(&disk, "nyx-disk0");
        assert_eq!(h.device_cfg_read(0, 8), 256);
        assert_eq!(request(&mut h, 0, 0, &[(DATA, 4096, true)]), (0, 4097));
        assert_eq!(fnv1a(&h.read(DATA, 4096)), 0x8a73_3e70);
        let pattern: Vec<u8> = (0..4096u32).map(|i| (7 * i + i / 512) as u8).collect();
        h.write(DATA, &pattern);
        assert_eq!(request(&mut h, 1, 16, &[(DATA, 4096, false)]), (0, 1));
        assert_eq!(fnv1a(&pattern), 0x0b5d_a1c5);
        assert_eq!(request(&mut h, 4, 0, &[]), (0, 1));
        assert_eq!(disk.0.lock().unwrap().flushes, 1);
        h.write(DATA + 0x1000, &[0xFF; 4096]);
        assert_eq!(request(&mut h, 0, 16, &[(DATA + 0x1000, 4096, true)]), (0, 4097));
        assert_eq!(h.read(DATA + 0x1000, 4096), pattern);
        let seg = segment(&h, 32, 8, 0);
        assert_eq!(request(&mut h, 13, 0, &[seg]), (0, 1));
        h.write(DATA + 0x1000, &[0xFF; 4096]);
        assert_eq!(request(&mut h, 0, 32, &[(DATA + 0x1000, 4096, true)]), (0, 4097));
        assert_eq!(h.read(DATA + 0x1000, 4096), vec![0; 4096]);
        let seg = segment(&h, 40, 8, 0);
        assert_eq!(request(&mut h, 11, 0, &[seg]), (0, 1));
        h.write(DATA, &[0; 20]);
        assert_eq!(request(&mut h, 8, 0, &[(DATA, 20, true)]), (0, 21));
        assert_eq!(&h.read(DATA, 10), b"nyx-disk0\0");
        assert_eq!(request(&mut h, 0, 256, &[(DATA, 512, true)]), (1, 513));
        assert_eq!(request(&mut h, 0x55, 0, &[]), (2, 1));
        assert_eq!(h.msi_count(), 10, "one interrupt per request");
        assert!(h.msis().iter().all(|&m| m == (MSI_ADDR, MSI_DATA)));
        let want = include_str!("../../../tests/golden/virtio.img.sha256").trim();
        let got: String = Sha256::digest(disk.data()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, want, "the image afterwards is QEMU's");
    }

    #[test]
    fn bad_requests_get_ioerr_or_unsupp() {
        let disk = SharedDisk::new((0..8192u32).map(|i| i as u8).collect());
        let mut h = start(&disk, "0123456789abcdefghijKLM");
        assert_eq!(
            request(&mut h, 0, 0, &[(DATA, 100, true)]),
            (1, 101),
            "not whole sectors"
        );
        assert_eq!(
            request(&mut h, 0, 15, &[(DATA, 1024, true)]),
            (1, 1025),
            "across the end"
        );
        assert_eq!(request(&mut h, 0, u64::MAX, &[(DATA, 512, true)]), (1, 513));
        assert_eq!(
            request(&mut h, 1, 16, &[(DATA, 512, false)]),
            (1, 1),
            "write past the end"
        );
        assert_eq!(request(&mut h, 5, 0, &[]), (0, 1), "FLUSH with the OUT bit");
        assert_eq!(
            request(&mut h, 0x8000_0000, 1, &[(DATA, 512, true)]),
            (0, 513),
            "BARRIER ignored"
        );
        assert_eq!(h.read(DATA, 2), vec![0, 1]);
        h.write(DATA, &[0xAA; 64]);
        assert_eq!(
            request(&mut h, 9, 0, &[(DATA, 64, true)]),
            (0, 65),
            "GET_ID with the OUT bit"
        );
        assert_eq!(
            &h.read(DATA, 21),
            b"0123456789abcdefghij\xAA",
            "20 bytes, no NUL, truncated"
        );
        assert_eq!(request(&mut h, 8, 0, &[(DATA, 4, true)]), (0, 5));
        for (ty, sector, sectors, flags, want) in [
            (11, 0, 1, 1, 2),         // DISCARD with UNMAP
            (13, 0, 1, 2, 2),         // unknown flag
            (10, 0, 1, 0, 2),         // DISCARD without the OUT bit
            (11, 0, 0x40_0000, 0, 1), // too many sectors
            (13, 16, 1, 0, 1),        // beyond the disk
            (13, 0, 1, 1, 0),         // WRITE_ZEROES with UNMAP
        ] {
            let seg = segment(&h, sector, sectors, flags);
            assert_eq!(request(&mut h, ty, 0, &[seg]).0, want, "type {ty} flags {flags}");
        }
        assert_eq!(disk.data()[..512], [0; 512]);
        let two = [segment(&h, 1, 1, 0), (BUF + 0x300, 16, false)];
        assert_eq!(request(&mut h, 11, 0, &two).0, 2, "two segments");
        disk.0.lock().unwrap().read_only = true;
        let before = disk.data();
        assert_eq!(request(&mut h, 1, 0, &[(DATA, 512, false)]).0, 1, "read-only");
        let seg = segment(&h, 2, 1, 0);
        assert_eq!(request(&mut h, 13, 0, &[seg]).0, 1, "read-only");
        assert_eq!(disk.data(), before);
        assert!(!h.dev.needs_reset());
    }

    #[test]
    fn malformed_chains_stop_the_device() {
        type Chain = fn(&Harness) -> Vec<(u64, u32, bool)>;
        let cases: [(&str, Chain); 5] = [
            ("short header", |_| vec![(HDR, 8, false), (STATUS, 1, true)]),
            ("no status", |_| vec![(HDR, 16, false)]),
            ("no header", |_| vec![(STATUS, 1, true)]),
            ("short segment", |h| {
                h.write(HDR, &13u32.to_le_bytes());
                vec![(HDR, 16, false), (BUF + 0x200, 8, false), (STATUS, 1, true)]
            }),
            ("data in the hole", |_| {
                vec![(HDR, 16, false), (HOLE, 512, true), (STATUS, 1, true)]
            }),
        ];
        for (what, chain) in cases {
            let disk = SharedDisk::new(vec![0; 4096]);
            let mut h = start(&disk, "x");
            h.write(HDR, &[0; 16]);
            let c = chain(&h);
            h.submit(0, &c);
            assert!(h.dev.needs_reset(), "{what}");
            assert_eq!(h.pop_used(0), None, "{what}");
        }
    }

    #[test]
    fn indirect_chains_and_several_requests_per_notify() {
        let disk = SharedDisk::new(vec![0x5A; 4096]);
        let mut h = start(&disk, "x");
        h.write(HDR, &[0; 16]);
        let table = BUF + 0x800;
        for (i, (addr, len, flags)) in [(HDR, 16u32, 1u16), (DATA, 512, 3), (STATUS, 1, 2)]
            .into_iter()
            .enumerate()
        {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
            h.write(table + 16 * i as u64, &raw);
        }
        // A one-descriptor chain pointing at the table, with the INDIRECT flag.
        h.post(0, &[(table, 48, false)]);
        let d = Harness::ring_base(0);
        h.write(d + 12, &4u16.to_le_bytes());
        h.post(0, &[(HDR, 16, false), (DATA + 0x200, 512, true), (STATUS + 1, 1, true)]);
        h.notify(0);
        assert_eq!(h.pop_used(0), Some((0, 513)));
        assert_eq!(h.pop_used(0), Some((1, 513)));
        assert_eq!(h.read(DATA, 1024), vec![0x5A; 1024]);
        assert_eq!(h.msi_count(), 1, "one interrupt for the notify");
    }

    #[test]
    fn device_writes_mark_their_pages_dirty() {
        let disk = SharedDisk::new(vec![1; 4096]);
        let mut h = start(&disk, "x");
        h.write(HDR, &[0; 16]);
        h.post(0, &[(HDR, 16, false), (DATA + 0x3000, 512, true), (STATUS, 1, true)]);
        let mem = h.mem.clone();
        let region = mem.iter().next().unwrap();
        let bitmap: &AtomicBitmap = vm_memory::MmapRegion::bitmap(region);
        bitmap.reset();
        h.notify(0);
        let page = |addr: u64| region.bitmap().dirty_at(addr as usize);
        assert!(page(DATA + 0x3000), "the data");
        assert!(page(STATUS), "the status byte");
        assert!(page(RINGS + 0x2000), "the used ring");
        assert!(
            !page(RINGS) && !page(RINGS + 0x1000),
            "the driver's rings were only read"
        );
        assert!(!page(DATA + 0x4000) && !page(DATA + 0x2000));
    }

    #[test]
    fn a_snapshot_with_requests_in_flight_continues_as_its_twin() {
        let disk = SharedDisk::new((0..16384u32).map(|i| (i / 7) as u8).collect());
        let mut a = start(&disk, "x");
        let hdr = |ty: u32, sector: u64, at: u64| {
            let mut b = [0u8; 16];
            b[0..4].copy_from_slice(&ty.to_le_bytes());
            b[8..16].copy_from_slice(&sector.to_le_bytes());
            (b, at)
        };
        for (b, at) in [hdr(1, 2, BUF), hdr(0, 0, BUF + 0x10), hdr(4, 0, BUF + 0x20)] {
            a.write(at, &b);
        }
        a.write(DATA, &[0xEE; 1024]);
        a.submit(
            0,
            &[(BUF + 0x10, 16, false), (DATA + 0x2000, 512, true), (STATUS, 1, true)],
        );
        a.post(0, &[(BUF, 16, false), (DATA, 1024, false), (STATUS + 1, 1, true)]);
        a.post(
            0,
            &[
                (BUF + 0x10, 16, false),
                (DATA + 0x1000, 2048, true),
                (STATUS + 2, 1, true),
            ],
        );
        // The snapshot: config space, device state, RAM, disk.
        let config = a.dev.config().bytes().to_vec();
        let state = a.dev.save();
        let ram = (a.read(0, HOLE), a.read(0xC_0000, 0x4_0000));
        let twin_disk = SharedDisk::new(disk.data());
        let mut b = Harness::new(Box::new(VirtioBlock::new(Box::new(twin_disk.clone()), "x".into())));
        b.dev.config_mut().restore(&config).unwrap();
        b.dev.restore(&state).unwrap();
        b.write(0, &ram.0);
        b.write(0xC_0000, &ram.1);
        b.queues = a.queues.clone();
        let sent = a.msi_count();
        for h in [&mut a, &mut b] {
            assert_eq!(h.pop_used(0), Some((0, 513)), "done before the snapshot");
            h.submit(0, &[(BUF + 0x20, 16, false), (STATUS + 3, 1, true)]);
            assert_eq!(h.pop_used(0), Some((3, 1)), "the write, in flight at the snapshot");
            assert_eq!(h.pop_used(0), Some((6, 2049)), "the read, in flight at the snapshot");
            assert_eq!(h.pop_used(0), Some((1, 1)), "the flush, after");
            assert_eq!(h.read(STATUS, 4), vec![0; 4]);
        }
        assert_eq!(a.read(0, HOLE), b.read(0, HOLE));
        assert_eq!(a.read(0xC_0000, 0x4_0000), b.read(0xC_0000, 0x4_0000));
        assert_eq!(disk.data(), twin_disk.data());
        assert_eq!(disk.data()[1024..2048], [0xEE; 1024]);
        assert_eq!(a.msis()[sent..], b.msis()[..]);
        assert_eq!(a.dev.save(), b.dev.save());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Any descriptor table and header either completes (used length the
        /// chain's writable length, status OK, IOERR or UNSUPP in its last
        /// writable byte) or stops the device, consistently with the walk.
        /// The table mostly holds a well-formed chain of `n` descriptors
        /// (header, data, status) with some entries replaced by garbage.
        #[test]
        fn random_chains_complete_or_stop_the_device(
            n in 2usize..5,
            descs in prop::collection::vec(
                (prop_oneof![12 => Just(None), 1 => any::<u64>().prop_map(Some)],
                 prop_oneof![8 => 1u32..0x1100, 1 => Just(0), 1 => any::<u32>()],
                 prop_oneof![12 => Just(None), 1 => (0u16..8, 0u16..9).prop_map(Some)],
                 prop_oneof![6 => DATA..DATA + 0x2000, 1 => Just(HOLE - 4), 1 => any::<u64>()],
                 any::<bool>()),
                8),
            ty in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13), any::<u32>()],
            sector in prop_oneof![0u64..16, any::<u64>()],
            seg in any::<[u8; 16]>(),
        ) {
            let disk = SharedDisk::new(vec![3; 8192]);
            let mut h = start(&disk, "x");
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&ty.to_le_bytes());
            hdr[8..16].copy_from_slice(&sector.to_le_bytes());
            for at in (BUF..BUF + 0x400).step_by(16) {
                h.write(at, if at == BUF { &hdr } else { &seg });
            }
            let table = Harness::ring_base(0);
            for (i, &(bad_addr, len, bad_links, data_addr, write)) in descs.iter().enumerate() {
                // In order: the header, data, the status byte.
                let (addr, len, write) = match i {
                    0 => (BUF, if len % 4 != 0 { 16 } else { len }, false),
                    _ if i + 1 == n => (STATUS, if len % 4 != 0 { 1 } else { len }, true),
                    _ => (data_addr, len, write),
                };
                let addr = bad_addr.unwrap_or(addr);
                let natural = (u16::from(i + 1 < n) | if write { 2 } else { 0 }, i as u16 + 1);
                let (flags, next) = bad_links.unwrap_or(natural);
                let mut raw = [0u8; 16];
                raw[0..8].copy_from_slice(&addr.to_le_bytes());
                raw[8..12].copy_from_slice(&len.to_le_bytes());
                raw[12..14].copy_from_slice(&flags.to_le_bytes());
                raw[14..16].copy_from_slice(&next.to_le_bytes());
                h.write(table + 16 * i as u64, &raw);
            }
            h.write(table + 0x1004, &0u16.to_le_bytes());
            h.write(table + 0x1002, &1u16.to_le_bytes());
            let walked = Chain::walk(&h.mem, table, 8, 0);
            h.notify(0);
            let used = h.pop_used(0);
            if h.dev.needs_reset() {
                prop_assert_eq!(used, None);
            } else {
                let c = walked.expect("a completed chain walks");
                prop_assert_eq!(used, Some((0, c.writable_len() as u32)));
                let last = c.descs().iter().rev().find(|d| d.writable).unwrap();
                let status = h.read(last.addr + u64::from(last.len) - 1, 1)[0];
                prop_assert!(status <= 2);
            }
            prop_assert_eq!(disk.data().len(), 8192);
        }

        /// Random bytes in the ring memory, random BAR and config accesses
        /// and notifies never panic; afterwards a reset brings it back.
        #[test]
        fn fuzz(ops in crate::virtio::testutil::fuzz_ops()) {
            let disk = SharedDisk::new(vec![0; 8192]);
            let mut h = start(&disk, "x");
            h.fuzz(&ops);
            h.write(HDR, &4u32.to_le_bytes());
            h.write(HDR + 4, &[0; 12]);
            prop_assert_eq!(request(&mut h, 4, 0, &[]), (0, 1));
        }
    }
}
