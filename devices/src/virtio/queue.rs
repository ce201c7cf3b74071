//! A split virtqueue as a device sees it while it serves a notify: the
//! available ring popped one descriptor chain at a time ([`VirtQueue`]),
//! each chain walked and checked in full before the device touches a byte
//! of it ([`Chain`]), and the data of its buffers read and written at
//! offsets, through guest RAM only.
//!
//! The queue's registers live in a `virtio_queue::Queue` (size, rings,
//! next available and used index); popping and walking are done here
//! because the driver's mistakes must come back as errors, which make the
//! transport mark the device DEVICE_NEEDS_RESET, and not as the end of a
//! chain. A chain is refused when its head or a `next` index lies outside
//! its table, when it is longer than its table (a loop), when an indirect
//! table is nested, empty, misaligned in length, larger than
//! [`MAX_CHAIN`] or not the head descriptor (QEMU only honours it there),
//! when a buffer is empty (as QEMU) or not entirely in guest RAM, when a
//! device-readable buffer follows a device-writable one, or when the chain
//! adds up to more than 4 GiB. A chain holds at most [`MAX_CHAIN`]
//! descriptors, whatever the lengths the guest wrote, and data moves
//! through the caller's buffers: nothing here allocates in proportion to a
//! guest-supplied length.

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::pci_device::DmaMemory;

/// The most descriptors a chain may have (QEMU's `VIRTQUEUE_MAX_SIZE`).
pub const MAX_CHAIN: usize = 1024;
/// Size of a descriptor in a table.
const DESC_SIZE: u64 = 16;

/// A driver's mistake in a queue or a chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The available index ran ahead of the device by more than the queue.
    #[error("available index {avail} is {ahead} entries ahead of the device, more than the queue size")]
    AvailIndex {
        /// The index the driver wrote.
        avail: u16,
        /// How far ahead of the device's next index it is.
        ahead: u16,
    },
    /// A ring, a table or a buffer is not (entirely) in guest RAM.
    #[error("{what} at {addr:#x} (+{len:#x}) is not in guest RAM")]
    Memory {
        /// What was accessed.
        what: &'static str,
        /// Its guest-physical address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// A head or `next` index beyond its table.
    #[error("descriptor index {index} beyond a table of {size}")]
    DescIndex {
        /// The index.
        index: u16,
        /// The table's size.
        size: u16,
    },
    /// More descriptors than the table holds: a loop.
    #[error("descriptor chain longer than its table of {0}")]
    Loop(u16),
    /// An indirect table that is nested, empty, of a length that is not a
    /// multiple of 16 or above the limit, or not at the head.
    #[error("bad indirect descriptor: {0}")]
    Indirect(&'static str),
    /// A buffer of length 0.
    #[error("empty buffer in a descriptor chain")]
    EmptyBuffer,
    /// A device-readable buffer after a device-writable one.
    #[error("device-readable buffer after a device-writable one")]
    Order,
    /// The chain's buffers add up to more than 4 GiB.
    #[error("descriptor chain longer than 4 GiB")]
    TooLong,
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes (not 0).
    pub len: u32,
    /// Whether the device writes it (else it reads it).
    pub writable: bool,
}

/// A descriptor chain, walked and checked: its buffers are in guest RAM,
/// the device-readable ones first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The head index, for the used ring.
    pub head: u16,
    descs: Vec<Desc>,
    readable: u64,
    writable: u64,
}

fn read_desc(mem: &DmaMemory, table: u64, index: u16) -> Result<(u64, u32, u16, u16), QueueError> {
    let addr = table.checked_add(u64::from(index) * DESC_SIZE);
    let mut raw = [0u8; DESC_SIZE as usize];
    addr.and_then(|a| mem.read_slice(&mut raw, GuestAddress(a)).ok())
        .ok_or(QueueError::Memory {
            what: "descriptor",
            addr: addr.unwrap_or(table),
            len: DESC_SIZE,
        })?;
    let a = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
    let len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
    let flags = u16::from_le_bytes([raw[12], raw[13]]);
    let next = u16::from_le_bytes([raw[14], raw[15]]);
    Ok((a, len, flags, next))
}

/// Whether `[addr, addr + len)` lies entirely in guest RAM.
pub(crate) fn in_ram(mem: &DmaMemory, what: &'static str, addr: u64, len: u64) -> Result<(), QueueError> {
    let ok = usize::try_from(len).is_ok_and(|l| mem.check_range(GuestAddress(addr), l, Permissions::ReadWrite))
        && addr.checked_add(len).is_some();
    if ok {
        Ok(())
    } else {
        Err(QueueError::Memory { what, addr, len })
    }
}

impl Chain {
    /// Walks the chain at `head` of the descriptor table at `table` of
    /// `size` entries.
    pub fn walk(mem: &DmaMemory, table: u64, size: u16, head: u16) -> Result<Chain, QueueError> {
        if head >= size {
            return Err(QueueError::DescIndex { index: head, size });
        }
        let (mut table, mut size, mut index) = (table, size, head);
        let mut indirect = false;
        let mut in_table = 0u32;
        let mut chain = Chain {
            head,
            descs: Vec::new(),
            readable: 0,
            writable: 0,
        };
        loop {
            let (addr, len, flags, next) = read_desc(mem, table, index)?;
            let flags = u32::from(flags);
            if flags & VRING_DESC_F_INDIRECT != 0 {
                if indirect {
                    return Err(QueueError::Indirect("nested"));
                }
                if !chain.descs.is_empty() || flags & VRING_DESC_F_NEXT != 0 {
                    return Err(QueueError::Indirect("not the only descriptor of its chain"));
                }
                let entries = u64::from(len) / DESC_SIZE;
                if len == 0 || u64::from(len) % DESC_SIZE != 0 || entries > MAX_CHAIN as u64 {
                    return Err(QueueError::Indirect("table length"));
                }
                in_ram(mem, "indirect table", addr, u64::from(len))?;
                (table, size, index) = (addr, entries as u16, 0);
                indirect = true;
                continue;
            }
            in_table += 1;
            if in_table > u32::from(size) || chain.descs.len() >= MAX_CHAIN {
                return Err(QueueError::Loop(size));
            }
            if len == 0 {
                return Err(QueueError::EmptyBuffer);
            }
            in_ram(mem, "buffer", addr, u64::from(len))?;
            let writable = flags & VRING_DESC_F_WRITE != 0;
            if writable {
                chain.writable += u64::from(len);
            } else if chain.writable != 0 {
                return Err(QueueError::Order);
            } else {
                chain.readable += u64::from(len);
            }
            if chain.readable + chain.writable > u64::from(u32::MAX) {
                return Err(QueueError::TooLong);
            }
            chain.descs.push(Desc { addr, len, writable });
            if flags & VRING_DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            if next >= size {
                return Err(QueueError::DescIndex { index: next, size });
            }
            index = next;
        }
    }

    /// The buffers in order.
    pub fn descs(&self) -> &[Desc] {
        &self.descs
    }

    /// Total length of the device-readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.readable
    }

    /// Total length of the device-writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.writable
    }

    /// The pieces of guest memory that hold `[offset, offset + len)` of the
    /// readable (or writable) bytes, as `(address, length)`.
    fn pieces(&self, writable: bool, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut start = 0u64;
        let end = offset.saturating_add(len);
        self.descs
            .iter()
            .filter(move |d| d.writable == writable)
            .filter_map(move |d| {
                let (lo, hi) = (start, start + u64::from(d.len));
                start = hi;
                let (a, b) = (lo.max(offset), hi.min(end));
                (a < b).then(|| (d.addr + (a - lo), b - a))
            })
    }

    /// Reads `buf.len()` bytes at `offset` of the device-readable bytes;
    /// returns how many there were (fewer at the end of them).
    pub fn read_at(&self, mem: &DmaMemory, offset: u64, buf: &mut [u8]) -> Result<usize, QueueError> {
        let mut done = 0usize;
        for (addr, n) in self.pieces(false, offset, buf.len() as u64) {
            let n = n as usize;
            mem.read_slice(&mut buf[done..done + n], GuestAddress(addr))
                .map_err(|_| QueueError::Memory {
                    what: "buffer",
                    addr,
                    len: n as u64,
                })?;
            done += n;
        }
        Ok(done)
    }

    /// Writes `data` at `offset` of the device-writable bytes; returns how
    /// many fitted.
    pub fn write_at(&self, mem: &DmaMemory, offset: u64, data: &[u8]) -> Result<usize, QueueError> {
        let mut done = 0usize;
        for (addr, n) in self.pieces(true, offset, data.len() as u64) {
            let n = n as usize;
            mem.write_slice(&data[done..done + n], GuestAddress(addr))
                .map_err(|_| QueueError::Memory {
                    what: "buffer",
                    addr,
                    len: n as u64,
                })?;
            done += n;
        }
        Ok(done)
    }
}

/// A queue while a device serves it: pops chains from the available ring
/// and puts them in the used ring.
pub struct VirtQueue<'a> {
    queue: &'a mut Queue,
    mem: &'a DmaMemory,
    used: bool,
}

impl<'a> VirtQueue<'a> {
    /// The enabled queue `queue` over `mem`.
    pub fn new(queue: &'a mut Queue, mem: &'a DmaMemory) -> Self {
        VirtQueue {
            queue,
            mem,
            used: false,
        }
    }

    /// Guest RAM.
    pub fn mem(&self) -> &'a DmaMemory {
        self.mem
    }

    /// The next available chain, walked, or None if the driver made none
    /// available.
    pub fn pop(&mut self) -> Result<Option<Chain>, QueueError> {
        let size = self.queue.size();
        let ring = self.queue.avail_ring();
        let avail = self.load_u16("available ring", ring.wrapping_add(2))?;
        let next = self.queue.next_avail();
        let ahead = avail.wrapping_sub(next);
        if ahead == 0 {
            return Ok(None);
        }
        if ahead > size {
            return Err(QueueError::AvailIndex { avail, ahead });
        }
        let slot = ring.wrapping_add(4 + 2 * u64::from(next % size));
        let head = self.load_u16("available ring", slot)?;
        self.queue.set_next_avail(next.wrapping_add(1));
        Chain::walk(self.mem, self.queue.desc_table(), size, head).map(Some)
    }

    /// Gives back the chain [`VirtQueue::pop`] returned last: it stays
    /// available (for a device that found nothing to put in it).
    pub fn unpop(&mut self) {
        let next = self.queue.next_avail();
        self.queue.set_next_avail(next.wrapping_sub(1));
    }

    /// Puts chain `head` in the used ring with `len` bytes written.
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), QueueError> {
        let used = self.queue.used_ring();
        self.queue
            .add_used(self.mem, head, len)
            .map_err(|_| QueueError::Memory {
                what: "used ring",
                addr: used,
                len: 8,
            })?;
        self.used = true;
        Ok(())
    }

    /// Whether chains went into the used ring since this was made.
    pub fn used_any(&self) -> bool {
        self.used
    }

    /// Whether the driver asks for no used-buffer notification
    /// (VRING_AVAIL_F_NO_INTERRUPT; EVENT_IDX is not offered).
    pub fn interrupt_suppressed(&self) -> bool {
        self.load_u16("available ring", self.queue.avail_ring())
            .is_ok_and(|f| u32::from(f) & VRING_AVAIL_F_NO_INTERRUPT != 0)
    }

    fn load_u16(&self, what: &'static str, addr: u64) -> Result<u16, QueueError> {
        self.mem
            .load::<u16>(GuestAddress(addr), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|_| QueueError::Memory { what, addr, len: 2 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vm_memory::GuestMemoryMmap;

    const TABLE: u64 = 0x1000;

    fn mem() -> DmaMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000), (GuestAddress(0xC_0000), 0x4_0000)]).unwrap()
    }

    fn put(mem: &DmaMemory, table: u64, i: u16, addr: u64, len: u32, flags: u32, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(table + 16 * u64::from(i))).unwrap();
    }

    #[test]
    fn walks_direct_and_indirect_chains_and_moves_data_at_offsets() {
        let m = mem();
        put(&m, TABLE, 0, 0x2000, 4, VRING_DESC_F_NEXT, 3);
        put(&m, TABLE, 3, 0x3000, 4, VRING_DESC_F_NEXT, 1);
        put(&m, TABLE, 1, 0x4000, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2);
        put(&m, TABLE, 2, 0x5000, 2, VRING_DESC_F_WRITE, 0);
        m.write_slice(b"abcdefgh", GuestAddress(0x2000)).unwrap();
        m.write_slice(b"ijkl", GuestAddress(0x3000)).unwrap();
        let c = Chain::walk(&m, TABLE, 4, 0).unwrap();
        assert_eq!((c.readable_len(), c.writable_len(), c.descs().len()), (8, 10, 4));
        let mut b = [0u8; 6];
        assert_eq!(c.read_at(&m, 2, &mut b).unwrap(), 6);
        assert_eq!(&b, b"cdijkl");
        assert_eq!(c.read_at(&m, 6, &mut b).unwrap(), 2, "short at the end");
        assert_eq!(c.write_at(&m, 6, b"WXYZ!").unwrap(), 4);
        let mut w = [0u8; 2];
        m.read_slice(&mut w, GuestAddress(0x4006)).unwrap();
        assert_eq!(&w, b"WX");
        m.read_slice(&mut w, GuestAddress(0x5000)).unwrap();
        assert_eq!(&w, b"YZ");

        // The same buffers through an indirect table.
        put(&m, 0x6000, 0, 0x2000, 4, VRING_DESC_F_NEXT, 1);
        put(&m, 0x6000, 1, 0x4000, 8, VRING_DESC_F_WRITE, 0);
        put(&m, TABLE, 5, 0x6000, 32, VRING_DESC_F_INDIRECT, 0);
        let c = Chain::walk(&m, TABLE, 8, 5).unwrap();
        assert_eq!((c.head, c.readable_len(), c.writable_len()), (5, 4, 8));
    }

    #[test]
    fn driver_mistakes_are_errors() {
        let m = mem();
        let walk = |head| Chain::walk(&m, TABLE, 4, head);
        assert_eq!(walk(4), Err(QueueError::DescIndex { index: 4, size: 4 }));
        put(&m, TABLE, 0, 0x2000, 4, VRING_DESC_F_NEXT, 1);
        put(&m, TABLE, 1, 0x2000, 4, VRING_DESC_F_NEXT, 0);
        assert_eq!(walk(0), Err(QueueError::Loop(4)));
        put(&m, TABLE, 1, 0x2000, 4, VRING_DESC_F_NEXT, 9);
        assert_eq!(walk(0), Err(QueueError::DescIndex { index: 9, size: 4 }));
        put(&m, TABLE, 1, 0x8_0000, 4, 0, 0);
        assert!(
            matches!(walk(0), Err(QueueError::Memory { addr: 0x8_0000, .. })),
            "in the hole"
        );
        put(&m, TABLE, 1, 0x7_FFFF, 2, 0, 0);
        assert!(matches!(walk(0), Err(QueueError::Memory { .. })), "across the hole");
        put(&m, TABLE, 1, u64::MAX - 1, 4, 0, 0);
        assert!(matches!(walk(0), Err(QueueError::Memory { .. })), "wrapping");
        put(&m, TABLE, 1, 0x2000, 0, 0, 0);
        assert_eq!(walk(0), Err(QueueError::EmptyBuffer));
        put(&m, TABLE, 0, 0x2000, 4, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1);
        put(&m, TABLE, 1, 0x2000, 4, 0, 0);
        assert_eq!(walk(0), Err(QueueError::Order));
        put(&m, TABLE, 0, 0x2000, u32::MAX, VRING_DESC_F_NEXT, 1);
        put(&m, TABLE, 1, 0x2000, 4, 0, 0);
        assert!(
            matches!(walk(0), Err(QueueError::Memory { .. })),
            "4 GiB buffer beyond RAM"
        );
        put(&m, TABLE, 2, 0x6000, 24, VRING_DESC_F_INDIRECT, 0);
        assert_eq!(walk(2), Err(QueueError::Indirect("table length")));
        put(&m, TABLE, 2, 0x6000, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 0);
        assert_eq!(
            walk(2),
            Err(QueueError::Indirect("not the only descriptor of its chain"))
        );
        put(&m, TABLE, 2, 0x6000, 16, VRING_DESC_F_INDIRECT, 0);
        put(&m, 0x6000, 0, 0x6000, 16, VRING_DESC_F_INDIRECT, 0);
        assert_eq!(walk(2), Err(QueueError::Indirect("nested")));
        put(&m, TABLE, 2, 0x6000, 16 * 2048, VRING_DESC_F_INDIRECT, 0);
        assert_eq!(walk(2), Err(QueueError::Indirect("table length")));
        assert!(matches!(
            Chain::walk(&m, 0x7_FFF8, 4, 0),
            Err(QueueError::Memory { what: "descriptor", .. })
        ));
    }

    proptest! {
        /// Any descriptor table walks to a chain whose buffers all lie in
        /// RAM and add up to its lengths, or to an error; never a panic.
        #[test]
        fn any_table_walks_or_fails(
            descs in prop::collection::vec((any::<u64>(), 0u64..0x10_0000, any::<u32>(), 0u16..8, 0u16..10), 8),
            head in 0u16..9,
        ) {
            let m = mem();
            for (i, &(a, base, len, flags, next)) in descs.iter().enumerate() {
                // Mostly plausible addresses, sometimes anything.
                let addr = if a % 4 == 0 { a } else { base };
                let len = if len % 3 == 0 { len } else { len % 0x3000 };
                put(&m, TABLE, i as u16, addr, len, u32::from(flags), next);
            }
            if let Ok(c) = Chain::walk(&m, TABLE, 8, head) {
                prop_assert!(c.descs().len() <= MAX_CHAIN);
                let sum: u64 = c.descs().iter().map(|d| u64::from(d.len)).sum();
                prop_assert_eq!(sum, c.readable_len() + c.writable_len());
                for d in c.descs() {
                    prop_assert!(m.check_range(GuestAddress(d.addr), d.len as usize, Permissions::ReadWrite));
                }
            }
        }
    }
}
