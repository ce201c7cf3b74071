//! Guest memory: one anonymous mapping per RAM region, with the PC layout's
//! 32-bit MMIO hole between 3 GiB and 4 GiB; the devices' view of the
//! same mappings ([`dma_view`]), whose bitmap records the pages devices
//! write; and which pages of a mapping the host ever gave memory to
//! ([`backed_pages`]): the others read as zero without being looked at.

use std::ops::Range;

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

pub use nyx_devices::pci_device::DmaMemory;

/// Guest memory as the rest of Nyx sees it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Start of the 32-bit MMIO hole (RAM above it moves to 4 GiB).
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;

/// Errors of guest memory creation.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is zero or too large.
    #[error("guest memory of {0} MiB is not possible: use --mem between 2 and 65536")]
    BadSize(u64),
    /// The host refused the mapping.
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map {
        /// The size asked for.
        mib: u64,
        /// What the host said.
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The RAM regions `(start, length)` for `bytes` of guest RAM.
pub fn ram_regions(bytes: u64) -> Vec<(u64, u64)> {
    if bytes <= MMIO_HOLE_START {
        vec![(0, bytes)]
    } else {
        vec![(0, MMIO_HOLE_START), (MMIO_HOLE_END, bytes - MMIO_HOLE_START)]
    }
}

/// Creates `mib` MiB of zeroed guest RAM.
pub fn create(mib: u64) -> Result<GuestMemory, MemoryError> {
    if !(2..=65536).contains(&mib) {
        return Err(MemoryError::BadSize(mib));
    }
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(mib << 20)
        .into_iter()
        .map(|(s, l)| (GuestAddress(s), l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map { mib, source })
}

/// Whether `region` is a private anonymous mapping, what [`create`] makes:
/// a page of it that the host never backed reads as zero.
pub fn private_anonymous(region: &GuestRegionMmap<()>) -> bool {
    region.file_offset().is_none()
        && region.flags() & libc::MAP_PRIVATE != 0
        && region.flags() & libc::MAP_ANONYMOUS != 0
}

/// `/proc/PID/pagemap`: the page is present in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// `/proc/PID/pagemap`: the page is swapped out (or in migration between
/// host NUMA nodes: any entry that is neither empty nor present).
const PM_SWAP: u64 = 1 << 62;
/// Entries of `/proc/self/pagemap` read at once (512 KiB).
const PAGEMAP_CHUNK: u64 = 1 << 16;

/// The pages of `region` that may hold something other than zeros, as
/// ranges of 4 KiB page indices from the region's start, ascending and
/// disjoint; every other page reads as zero and need not be read.
///
/// For a private anonymous mapping ([`private_anonymous`]) that is what
/// `/proc/self/pagemap` says the host backed: a page present in RAM (written,
/// or read and mapped to the zero page), or swapped out. A page whose entry
/// is empty was never touched since the mapping was made, or was dropped
/// with `madvise(MADV_DONTNEED)` ([`crate::mem_state::zero_all`]), so it
/// reads as zero: the guest's writes through KVM go through the same host
/// page tables (KVM takes its pages from them), as do Nyx's and the
/// devices'. One 8-byte entry per page is read (2 MiB for 1 GiB of RAM),
/// where reading the pages themselves would fault in every one of them.
/// `mincore(2)` is not enough: it reports a swapped-out anonymous page as
/// not resident, which would lose its contents.
///
/// Anything that cannot be answered this way (another kind of mapping, a
/// host page size other than 4 KiB, no `/proc`) gives the whole region.
/// The answer is only as old as the call: a caller that reads the pages
/// while a vCPU runs must see later writes some other way (the dirty log).
pub fn backed_pages(region: &GuestRegionMmap<()>) -> Vec<Range<u64>> {
    use vm_memory::GuestMemoryRegion as _;
    let pages = region.len() / 4096;
    backed_pages_of(region).unwrap_or_else(|| vec![0..pages])
}

fn backed_pages_of(region: &GuestRegionMmap<()>) -> Option<Vec<Range<u64>>> {
    use std::os::unix::fs::FileExt as _;
    use vm_memory::GuestMemoryRegion as _;
    // SAFETY: sysconf has no preconditions.
    if !private_anonymous(region) || unsafe { libc::sysconf(libc::_SC_PAGESIZE) } != 4096 {
        return None;
    }
    let pagemap = std::fs::File::open("/proc/self/pagemap").ok()?;
    let first = region.as_ptr() as u64 / 4096;
    let pages = region.len() / 4096;
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut buf = vec![0u8; (PAGEMAP_CHUNK * 8) as usize];
    let mut done = 0u64;
    while done < pages {
        let n = (pages - done).min(PAGEMAP_CHUNK);
        let bytes = &mut buf[..(n * 8) as usize];
        pagemap.read_exact_at(bytes, (first + done) * 8).ok()?;
        for (i, entry) in bytes.chunks_exact(8).enumerate() {
            let mut e = [0u8; 8];
            e.copy_from_slice(entry);
            if u64::from_ne_bytes(e) & (PM_PRESENT | PM_SWAP) == 0 {
                continue;
            }
            let page = done + i as u64;
            match out.last_mut() {
                Some(last) if last.end == page => last.end += 1,
                _ => out.push(page..page + 1),
            }
        }
        done += n;
    }
    Some(out)
}

/// The devices' view of `mem`: the same host mappings, with a dirty bitmap
/// per region that every write through the view sets (KVM's dirty log sees
/// only the vCPU's writes). The view must not outlive `mem`'s mappings:
/// the machine keeps both for its whole life.
pub fn dma_view(mem: &GuestMemory) -> DmaMemory {
    use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _, MmapRegion};
    let regions: Vec<_> = mem
        .iter()
        .filter_map(|r| {
            // SAFETY: the range is exactly one of `mem`'s live anonymous
            // private mappings, mapped read-write, and the view is dropped
            // with the machine that owns `mem`.
            let view = unsafe {
                MmapRegion::build_raw(
                    r.as_ptr(),
                    r.len() as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                )
            }
            .ok()?;
            GuestRegionMmap::new(view, r.start_addr())
        })
        .collect();
    // The regions come from a valid collection, so they are sorted and
    // disjoint and this cannot fail; an empty view would only refuse DMA.
    DmaMemory::from_regions(regions).unwrap_or_default()
}

/// Takes the pages written through `dma` since the last call, as guest
/// frame numbers, and clears its bitmaps.
pub fn take_dma_dirty(dma: &DmaMemory, out: &mut std::collections::BTreeSet<u64>) {
    use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
    for r in dma.iter() {
        let first = r.start_addr().0 / 4096;
        for (i, word) in vm_memory::MmapRegion::bitmap(r).get_and_reset().into_iter().enumerate() {
            let mut w = word;
            while w != 0 {
                let bit = u64::from(w.trailing_zeros());
                w &= w - 1;
                out.insert(first + i as u64 * 64 + bit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend as _};

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_regions(64 << 20), vec![(0, 64 << 20)]);
        let m = create(64).unwrap();
        assert_eq!(m.num_regions(), 1);
        m.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(m.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xdead_beef);
    }

    #[test]
    fn the_dma_view_shares_memory_and_records_its_writes() {
        let m = create(8).unwrap();
        let dma = dma_view(&m);
        dma.write_slice(&[1, 2, 3], GuestAddress(0x5ffe)).unwrap();
        m.write_slice(&[9], GuestAddress(0x7000)).unwrap();
        let mut b = [0u8; 3];
        m.read_slice(&mut b, GuestAddress(0x5ffe)).unwrap();
        assert_eq!(b, [1, 2, 3], "same host memory");
        dma.read_slice(&mut b[..1], GuestAddress(0x7000)).unwrap();
        assert_eq!(b[0], 9);
        let mut dirty = std::collections::BTreeSet::new();
        take_dma_dirty(&dma, &mut dirty);
        assert_eq!(
            dirty.into_iter().collect::<Vec<_>>(),
            vec![5, 6],
            "only the view's writes"
        );
        let mut again = std::collections::BTreeSet::new();
        take_dma_dirty(&dma, &mut again);
        assert!(again.is_empty(), "taking clears");
        assert!(dma.write_slice(&[0], GuestAddress(8 << 20)).is_err(), "beyond RAM");
    }

    #[test]
    fn backed_pages_are_those_written_or_read() {
        use vm_memory::GuestMemoryRegion as _;
        let m = create(8).unwrap();
        let region = m.iter().next().unwrap();
        assert!(private_anonymous(region));
        let pages = |m: &GuestMemory| backed_pages(m.iter().next().unwrap());
        if backed_pages_of(region).is_none() {
            // No pagemap here: the whole region, always.
            assert_eq!(pages(&m), vec![0..region.len() / 4096]);
            return;
        }
        assert_eq!(pages(&m), vec![], "a fresh mapping has no pages");
        m.write_slice(&[1], GuestAddress(0x5000)).unwrap();
        m.write_slice(&[2; 8192], GuestAddress(0x6ff0)).unwrap();
        m.write_slice(&[3], GuestAddress((8 << 20) - 1)).unwrap();
        let mut b = [0u8; 1];
        m.read_slice(&mut b, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(pages(&m), vec![5..9, 0x200..0x201, 2047..2048]);
        crate::mem_state::zero_all(&m).unwrap();
        assert_eq!(pages(&m), vec![], "dropped pages are zero again");
    }

    #[test]
    fn large_memory_skips_the_hole() {
        assert_eq!(
            ram_regions(4 << 30),
            vec![(0, MMIO_HOLE_START), (MMIO_HOLE_END, (4 << 30) - MMIO_HOLE_START)]
        );
    }

    #[test]
    fn rejects_silly_sizes() {
        assert!(matches!(create(0), Err(MemoryError::BadSize(0))));
        assert!(matches!(create(1 << 20), Err(MemoryError::BadSize(_))));
    }
}
