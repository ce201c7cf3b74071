//! Test harness of the virtio devices: a small virtio driver that drives a
//! [`VirtioPci`] through the `PciDevice` trait only (config space, BAR 1,
//! BAR 4) over real guest RAM, with an MSI sink and an INTx sink that
//! record what they get, and a fuzzer of all of it.
//!
//! Guest RAM is 0..0x80000 and 0xC0000..0x100000: the hole between stands
//! for MMIO. Queue `i` has its descriptor table at `RINGS + i * 0x4000`, its
//! available ring 0x1000 above, its used ring 0x2000 above; buffers go from
//! [`BUF`].

use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{VirtioDevice, VirtioPci, F_VERSION_1};
use crate::block::{BlockBackend, MemDisk};
use crate::io::{Entropy, RecordingSink};
use crate::msi::MsiOptions;
use crate::msix::MsiSink;
use crate::pci_device::{DmaMemory, IntxLine, IntxShares, PciDevice};

/// Where the rings go.
pub const RINGS: u64 = 0x1_0000;
/// Where buffers go.
pub const BUF: u64 = 0x4_0000;
/// The hole in guest RAM.
pub const HOLE: u64 = 0x8_0000;
/// The device's INTx GSI.
pub const GSI: u8 = 11;
/// MSI address of every vector.
pub const MSI_ADDR: u64 = 0xFEE0_0000;
/// MSI data of vector 0 (vector `v` sends `MSI_DATA + v`).
pub const MSI_DATA: u32 = 0x40;

/// Collects MSI messages.
#[derive(Debug, Default)]
pub struct MockMsi(pub Mutex<Vec<(u64, u32)>>);

impl MsiSink for MockMsi {
    fn msi(&self, address: u64, data: u32) {
        self.0.lock().unwrap().push((address, data));
    }
}

/// Entropy that counts: 0, 1, 2, ...
#[derive(Debug)]
pub struct CountingEntropy(pub u8);

impl Entropy for CountingEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.0;
            self.0 = self.0.wrapping_add(1);
        }
    }
}

/// A [`MemDisk`] the test keeps a handle on.
#[derive(Debug, Clone)]
pub struct SharedDisk(pub Arc<Mutex<MemDisk>>);

impl SharedDisk {
    /// A writable disk with these contents.
    pub fn new(data: Vec<u8>) -> Self {
        SharedDisk(Arc::new(Mutex::new(MemDisk::new(data))))
    }

    /// The contents now.
    pub fn data(&self) -> Vec<u8> {
        self.0.lock().unwrap().data.clone()
    }
}

impl BlockBackend for SharedDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().size()
    }
    fn read_only(&self) -> bool {
        self.0.lock().unwrap().read_only
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.lock().unwrap().read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.lock().unwrap().write_at(offset, data)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap().flush()
    }
}

/// The driver's side of a queue.
#[derive(Debug, Clone)]
pub struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

/// A device on a test bus with its driver.
pub struct Harness {
    /// The device.
    pub dev: VirtioPci,
    /// Guest RAM.
    pub mem: DmaMemory,
    /// MSI messages sent.
    pub msi: Arc<MockMsi>,
    /// INTx changes.
    pub sink: Arc<RecordingSink>,
    /// The driver's side of the queues.
    pub queues: Vec<Option<DriverQueue>>,
}

/// Guest RAM with a hole at [`HOLE`].
pub fn guest_ram() -> DmaMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), HOLE as usize), (GuestAddress(0xC_0000), 0x4_0000)]).unwrap()
}

impl Harness {
    /// `device` on the transport, nothing set up.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        Self::build(device, None)
    }

    /// `device` on a transport with an MSI capability, nothing set up.
    pub fn with_msi(device: Box<dyn VirtioDevice>, options: MsiOptions) -> Self {
        Self::build(device, Some(options))
    }

    fn build(device: Box<dyn VirtioDevice>, options: Option<MsiOptions>) -> Self {
        let mem = guest_ram();
        let msi = Arc::new(MockMsi::default());
        let sink = Arc::new(RecordingSink::default());
        let intx = IntxLine::new(GSI, Arc::new(IntxShares::default()), sink.clone());
        let dev = match options {
            None => VirtioPci::new(device, mem.clone(), msi.clone(), intx),
            Some(o) => VirtioPci::with_msi(device, mem.clone(), msi.clone(), intx, o),
        };
        Harness {
            dev,
            mem,
            msi,
            sink,
            queues: Vec::new(),
        }
    }

    /// `device` set up the way a driver does it: memory and bus mastering
    /// on, MSI-X with every vector aimed at the local APIC, features
    /// `features | VERSION_1`, every queue of 8 entries with vector = its
    /// index, DRIVER_OK.
    pub fn start(device: Box<dyn VirtioDevice>, features: u64) -> Self {
        let mut h = Harness::new(device);
        h.enable_pci();
        h.enable_msix();
        h.bring_up(features);
        h
    }

    /// Reset, negotiation, every queue, DRIVER_OK.
    pub fn bring_up(&mut self, features: u64) {
        assert_ne!(self.init(features | F_VERSION_1) & 0x08, 0, "FEATURES_OK");
        self.common_write(0x10, 2, 0);
        let n = self.common_read(0x12, 2) as u16;
        for q in 0..n {
            self.setup_queue(q, 8, q);
        }
        self.set_status(0x0F);
    }

    /// A config-space read.
    pub fn cfg_read(&self, off: usize, len: usize) -> u64 {
        let mut b = vec![0u8; len];
        self.dev.config().read(off, &mut b);
        le(&b)
    }

    /// A config-space write, as the PCI host makes it.
    pub fn cfg_write(&mut self, off: usize, bytes: &[u8]) {
        self.dev.config_mut().write(off, bytes);
        self.dev.config_written(off, bytes.len());
    }

    /// Memory decoding and bus mastering on.
    pub fn enable_pci(&mut self) {
        self.cfg_write(4, &[0x06, 0]);
    }

    /// The config offset of the capability with `id`.
    pub fn find_cap(&self, id: u8) -> Option<usize> {
        let mut at = self.cfg_read(0x34, 1) as usize;
        for _ in 0..48 {
            if at == 0 {
                return None;
            }
            if self.cfg_read(at, 1) as u8 == id {
                return Some(at);
            }
            at = self.cfg_read(at + 1, 1) as usize;
        }
        None
    }

    /// Programs every MSI-X vector `v` to `MSI_ADDR`/`MSI_DATA + v`,
    /// unmasked, and enables MSI-X.
    pub fn enable_msix(&mut self) {
        let cap = self.find_cap(0x11).unwrap();
        let vectors = (self.cfg_read(cap + 2, 2) & 0x7FF) + 1;
        for v in 0..vectors {
            for (i, w) in [MSI_ADDR as u32, 0, MSI_DATA + v as u32, 0].into_iter().enumerate() {
                self.dev.bar_write(1, 16 * v + 4 * i as u64, &w.to_le_bytes());
            }
        }
        self.cfg_write(cap + 3, &[0x80]);
    }

    /// Programs MSI with `address` and `data`, and enables it with
    /// `2^log2_vectors` vectors (a 64-bit capability).
    pub fn enable_msi(&mut self, address: u64, data: u16, log2_vectors: u8) {
        let cap = self.find_cap(0x05).unwrap();
        self.cfg_write(cap + 4, &(address as u32).to_le_bytes());
        self.cfg_write(cap + 8, &((address >> 32) as u32).to_le_bytes());
        self.cfg_write(cap + 12, &data.to_le_bytes());
        self.cfg_write(cap + 2, &[0x01 | log2_vectors << 4]);
    }

    /// A read of `len` bytes at `off` of BAR 4.
    pub fn bar4_read(&mut self, off: u64, len: usize) -> u64 {
        let mut b = vec![0u8; len];
        self.dev.bar_read(4, off, &mut b);
        le(&b)
    }

    /// A write of the `len` low bytes of `v` at `off` of BAR 4.
    pub fn bar4_write(&mut self, off: u64, len: usize, v: u64) {
        self.dev.bar_write(4, off, &v.to_le_bytes()[..len]);
    }

    /// A common configuration register.
    pub fn common_read(&mut self, off: u64, len: usize) -> u64 {
        self.bar4_read(off, len)
    }

    /// Writes a common configuration register.
    pub fn common_write(&mut self, off: u64, len: usize, v: u64) {
        self.bar4_write(off, len, v)
    }

    /// A device configuration field.
    pub fn device_cfg_read(&mut self, off: u64, len: usize) -> u64 {
        self.bar4_read(0x2000 + off, len)
    }

    /// The status register.
    pub fn status(&mut self) -> u8 {
        self.common_read(0x14, 1) as u8
    }

    /// Writes the status register.
    pub fn set_status(&mut self, v: u8) {
        self.common_write(0x14, 1, u64::from(v));
    }

    /// Reads (and so clears) the ISR.
    pub fn isr(&mut self) -> u8 {
        self.bar4_read(0x1000, 1) as u8
    }

    /// Selects queue `q`.
    pub fn select_queue(&mut self, q: u16) {
        self.common_write(0x16, 2, u64::from(q));
    }

    /// The features the device offers.
    pub fn offered(&mut self) -> u64 {
        self.common_write(0, 4, 1);
        let hi = self.common_read(4, 4);
        self.common_write(0, 4, 0);
        hi << 32 | self.common_read(4, 4)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, `features`, FEATURES_OK; the status.
    pub fn init(&mut self, features: u64) -> u8 {
        self.set_status(0);
        assert_eq!(self.status(), 0);
        self.set_status(1);
        self.set_status(3);
        for sel in 0..2 {
            self.common_write(0x08, 4, sel);
            self.common_write(0x0C, 4, (features >> (32 * sel)) & 0xFFFF_FFFF);
        }
        self.set_status(0x0B);
        self.status()
    }

    /// Where queue `q`'s rings go.
    pub fn ring_base(q: u16) -> u64 {
        RINGS + 0x4000 * u64::from(q)
    }

    /// Sets up and enables queue `q` with `size` entries and MSI-X vector
    /// `vector`, its rings cleared.
    pub fn setup_queue(&mut self, q: u16, size: u16, vector: u16) {
        let base = Self::ring_base(q);
        self.mem.write_slice(&[0u8; 0x3000], GuestAddress(base)).unwrap();
        self.select_queue(q);
        self.common_write(0x18, 2, u64::from(size));
        self.common_write(0x1A, 2, u64::from(vector));
        for (off, addr) in [(0x20, base), (0x28, base + 0x1000), (0x30, base + 0x2000)] {
            self.common_write(off, 4, addr & 0xFFFF_FFFF);
            self.common_write(off + 4, 4, addr >> 32);
        }
        self.common_write(0x1C, 2, 1);
        let dq = DriverQueue {
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        let q = usize::from(q);
        if self.queues.len() <= q {
            self.queues.resize(q + 1, None);
        }
        self.queues[q] = Some(dq);
    }

    fn dq(&mut self, q: usize) -> &mut DriverQueue {
        self.queues[q].as_mut().expect("queue set up")
    }

    /// Puts the chain of `bufs` (address, length, device-writable) in
    /// queue `q`'s available ring without notifying; returns its head.
    pub fn post(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let mem = self.mem.clone();
        let d = self.dq(q);
        let head = d.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = (d.next_desc + i as u16) % d.size;
            let next = (idx + 1) % d.size;
            let last = i + 1 == bufs.len();
            let flags = u16::from(!last) | if write { 2 } else { 0 };
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(d.desc + 16 * u64::from(idx)))
                .unwrap();
        }
        d.next_desc = (d.next_desc + bufs.len() as u16) % d.size;
        let slot = d.avail + 4 + 2 * u64::from(d.avail_idx % d.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        d.avail_idx = d.avail_idx.wrapping_add(1);
        mem.write_obj(d.avail_idx, GuestAddress(d.avail + 2)).unwrap();
        head
    }

    /// The driver's notify of queue `q`.
    pub fn notify(&mut self, q: usize) {
        self.bar4_write(0x3000 + 4 * q as u64, 2, q as u64);
    }

    /// [`Harness::post`] and notify.
    pub fn submit(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.post(q, bufs);
        self.notify(q);
        head
    }

    /// The next used element `(id, len)` of queue `q`, if the device put
    /// one there.
    pub fn pop_used(&mut self, q: usize) -> Option<(u32, u32)> {
        let mem = self.mem.clone();
        let d = self.dq(q);
        let idx: u16 = mem.read_obj(GuestAddress(d.used + 2)).unwrap();
        if idx == d.used_seen {
            return None;
        }
        let at = d.used + 4 + 8 * u64::from(d.used_seen % d.size);
        d.used_seen = d.used_seen.wrapping_add(1);
        Some((
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        ))
    }

    /// `len` bytes of guest RAM at `addr`.
    pub fn read(&self, addr: u64, len: u64) -> Vec<u8> {
        let mut b = vec![0u8; len as usize];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    /// Writes guest RAM.
    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    /// The MSI messages sent so far.
    pub fn msis(&self) -> Vec<(u64, u32)> {
        self.msi.0.lock().unwrap().clone()
    }

    /// How many MSI messages went out.
    pub fn msi_count(&self) -> usize {
        self.msi.0.lock().unwrap().len()
    }

    /// Applies the fuzzer's operations, checking after each that a stopped
    /// device shows NEEDS_RESET; then resets and brings the device up again,
    /// which must work whatever happened.
    pub fn fuzz(&mut self, ops: &[FuzzOp]) {
        for op in ops {
            match op {
                FuzzOp::Mem { addr, bytes } => self.write(*addr, bytes),
                FuzzOp::Desc {
                    queue,
                    index,
                    addr,
                    len,
                    flags,
                    next,
                } => {
                    let mut raw = [0u8; 16];
                    raw[0..8].copy_from_slice(&addr.to_le_bytes());
                    raw[8..12].copy_from_slice(&len.to_le_bytes());
                    raw[12..14].copy_from_slice(&flags.to_le_bytes());
                    raw[14..16].copy_from_slice(&next.to_le_bytes());
                    self.write(Self::ring_base(*queue) + 16 * u64::from(*index), &raw);
                }
                FuzzOp::Avail { queue, idx, head } => {
                    let base = Self::ring_base(*queue) + 0x1000;
                    self.write(base + 4 + 2 * u64::from(*idx % 8), &head.to_le_bytes());
                    self.write(base + 2, &idx.wrapping_add(1).to_le_bytes());
                }
                FuzzOp::Bar {
                    bar,
                    offset,
                    data,
                    write,
                } => {
                    if *write {
                        self.dev.bar_write(*bar, *offset, data);
                    } else {
                        let mut b = data.clone();
                        self.dev.bar_read(*bar, *offset, &mut b);
                    }
                }
                FuzzOp::Config { offset, data } => self.cfg_write(*offset, data),
                FuzzOp::Notify(q) => self.notify(usize::from(*q)),
                FuzzOp::Poll => self.dev.poll(),
            }
            if self.dev.needs_reset() {
                assert_ne!(self.dev.status() & 0x40, 0, "a stopped device shows NEEDS_RESET");
            }
        }
        self.enable_pci();
        self.bring_up(0);
        assert!(!self.dev.needs_reset());
    }
}

/// Little-endian value of up to 8 bytes.
pub fn le(b: &[u8]) -> u64 {
    b.iter().rev().fold(0, |v, &x| v << 8 | u64::from(x))
}

/// One step of the fuzzer.
#[derive(Debug, Clone)]
pub enum FuzzOp {
    /// Random bytes into the rings or buffers.
    Mem {
        /// Where.
        addr: u64,
        /// What.
        bytes: Vec<u8>,
    },
    /// A descriptor of queue `queue`'s table.
    Desc {
        /// The queue.
        queue: u16,
        /// The entry.
        index: u16,
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
        /// Its flags.
        flags: u16,
        /// Its next index.
        next: u16,
    },
    /// Makes `head` available at `idx` and moves the available index past it.
    Avail {
        /// The queue.
        queue: u16,
        /// The slot.
        idx: u16,
        /// The head.
        head: u16,
    },
    /// A BAR access.
    Bar {
        /// 1 or 4 (or another).
        bar: usize,
        /// Offset.
        offset: u64,
        /// Data written, or the size read.
        data: Vec<u8>,
        /// Write or read.
        write: bool,
    },
    /// A config-space write.
    Config {
        /// Offset.
        offset: usize,
        /// Data.
        data: Vec<u8>,
    },
    /// A notify of a queue.
    Notify(u16),
    /// A device poll.
    Poll,
}

fn any_addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        BUF..BUF + 0x1_0000,
        Just(HOLE - 8),
        HOLE..0xC_0000,
        Just(0xFFFF_F000),
        Just(u64::MAX - 7),
        any::<u64>(),
    ]
}

fn bar_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..0x40,
        Just(0x1000u64),
        0x2000u64..0x2040,
        0x3000u64..0x3010,
        0u64..0x4000,
        0u64..0x900
    ]
}

fn fuzz_op() -> impl Strategy<Value = FuzzOp> {
    prop_oneof![
        (RINGS..BUF + 0x1_0000, prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(addr, bytes)| FuzzOp::Mem { addr, bytes }),
        (
            0u16..3,
            0u16..10,
            any_addr(),
            prop_oneof![1u32..0x2000, any::<u32>()],
            0u16..8,
            0u16..10
        )
            .prop_map(|(queue, index, addr, len, flags, next)| FuzzOp::Desc {
                queue,
                index,
                addr,
                len,
                flags,
                next
            }),
        (0u16..3, prop_oneof![0u16..12, any::<u16>()], 0u16..10).prop_map(|(queue, idx, head)| FuzzOp::Avail {
            queue,
            idx,
            head
        }),
        (
            prop_oneof![Just(1usize), Just(4usize), 0usize..6],
            bar_offset(),
            prop::collection::vec(any::<u8>(), 1..9),
            any::<bool>()
        )
            .prop_map(|(bar, offset, data, write)| FuzzOp::Bar {
                bar,
                offset,
                data,
                write
            }),
        (0usize..256, prop::collection::vec(any::<u8>(), 1..5))
            .prop_map(|(offset, data)| FuzzOp::Config { offset, data }),
        (0u16..4).prop_map(FuzzOp::Notify),
        Just(FuzzOp::Poll),
    ]
}

/// A sequence of fuzzer steps.
pub fn fuzz_ops() -> impl Strategy<Value = Vec<FuzzOp>> {
    prop::collection::vec(fuzz_op(), 1..60)
}
