//! Guest memory: one anonymous mapping per RAM region, with the PC layout's
//! 32-bit MMIO hole between 3 GiB and 4 GiB; the devices' view of the
//! same mappings ([`dma_view`]), whose bitmap records the pages devices
//! write; which pages of a mapping the host ever gave memory to
//! ([`backed_pages`]): the others read as zero without being looked at;
//! and a snapshot's memory image mapped copy-on-write over parts of a
//! region ([`map_image`]).

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
    /// A memory image could not be mapped into guest RAM.
    #[error("cannot map the memory image's {len} bytes at {gpa:#x} (file offset {offset}) into guest RAM: {why}")]
    MapImage {
        /// Guest address of the run.
        gpa: u64,
        /// Its length.
        len: u64,
        /// Where its bytes are in the file.
        offset: u64,
        /// Why.
        why: String,
    },
}

/// One run of a memory image: `len` bytes of guest RAM at `gpa` are the
/// file's bytes at `offset` (all three multiples of the page size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSpan {
    /// Guest-physical address.
    pub gpa: u64,
    /// Bytes.
    pub len: u64,
    /// Offset in the file.
    pub offset: u64,
}

/// Maps `spans` of `file` over guest RAM, private and copy-on-write: each
/// page reads as the file's until something (the guest, a device, Nyx)
/// writes it, which gives that page a private copy; the file is never
/// written. Nothing is read here: the host fills a page from the page
/// cache when it is first touched. Neighbouring spans that are neighbours
/// in the file too are mapped at once. Call it before the vCPU first runs.
///
/// The file must keep its contents and length while the machine lives: a
/// page touched after the file shrank under it is a SIGBUS, as with any
/// mapped file (Firecracker's memory files have the same rule).
pub fn map_image(mem: &GuestMemory, file: &std::fs::File, spans: &[ImageSpan]) -> Result<(), MemoryError> {
    use std::os::fd::AsRawFd as _;
    use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
    let mut merged: Vec<ImageSpan> = Vec::new();
    for s in spans {
        match merged.last_mut() {
            Some(m) if m.gpa.checked_add(m.len) == Some(s.gpa) && m.offset.checked_add(m.len) == Some(s.offset) => {
                m.len += s.len
            }
            _ => merged.push(*s),
        }
    }
    for s in merged {
        let fail = |why: String| MemoryError::MapImage {
            gpa: s.gpa,
            len: s.len,
            offset: s.offset,
            why,
        };
        if s.gpa % 4096 != 0 || s.len % 4096 != 0 || s.offset % 4096 != 0 || s.len == 0 {
            return Err(fail("not whole pages".into()));
        }
        let region = mem
            .iter()
            .find(|r| {
                let start = r.start_addr().0;
                s.gpa >= start && s.gpa.checked_add(s.len).is_some_and(|end| end <= start + r.len())
            })
            .ok_or_else(|| fail("it lies outside guest RAM".into()))?;
        if !private_anonymous(region) {
            return Err(fail("guest RAM is not an anonymous mapping".into()));
        }
        let offset = libc::off_t::try_from(s.offset).map_err(|_| fail("the offset is too large".into()))?;
        // SAFETY: `get_host_address` would do the same sum; the span lies
        // inside the region (checked above), a live mapping that `mem`
        // owns and unmaps as a whole when dropped, so replacing part of it
        // with MAP_FIXED leaves every address of it mapped. No reference
        // into guest RAM is held across this call (no vCPU runs yet, the
        // caller's contract); KVM follows the change through its MMU
        // notifier.
        let rc = unsafe {
            let host = region.as_ptr().add((s.gpa - region.start_addr().0) as usize);
            libc::mmap(
                host.cast(),
                s.len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                offset,
            )
        };
        if rc == libc::MAP_FAILED {
            return Err(fail(std::io::Error::last_os_error().to_string()));
        }
    }
    Ok(())
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
    let (Some(anonymous), Some(files)) = (backed_pages_of(region), file_backed(region)) else {
        return std::iter::once(0..pages).collect();
    };
    // A page that a mapped image backs reads as the file's bytes whether
    // or not the host has brought it in yet.
    let mut all: Vec<Range<u64>> = anonymous.into_iter().chain(files).collect();
    all.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(all.len());
    for r in all {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The pages of `region` (ranges of indices from its start) that a file
/// backs instead of anonymous memory: memory images mapped with
/// [`map_image`]. From `/proc/self/maps`; None when that cannot be read.
pub fn file_backed(region: &GuestRegionMmap<()>) -> Option<Vec<Range<u64>>> {
    use vm_memory::GuestMemoryRegion as _;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let lo = region.as_ptr() as u64;
    let hi = lo + region.len();
    let mut out = Vec::new();
    for line in maps.lines() {
        // START-END PERMS OFFSET DEV INODE [PATH]
        let mut fields = line.split_ascii_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let inode = fields.nth(3)?;
        let start = u64::from_str_radix(start, 16).ok()?;
        let end = u64::from_str_radix(end, 16).ok()?;
        if end <= lo || start >= hi || inode == "0" {
            continue;
        }
        out.push((start.max(lo) - lo) / 4096..(end.min(hi) - lo).div_ceil(4096));
    }
    Some(out)
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
            assert_eq!(pages(&m), std::iter::once(0..region.len() / 4096).collect::<Vec<_>>());
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
    fn a_mapped_image_reads_as_the_file_and_is_copied_on_write() {
        use std::io::Write as _;
        let mut file = tempfile::tempfile().unwrap();
        let mut data = vec![0u8; 5 * 4096];
        for (i, page) in data.chunks_exact_mut(4096).enumerate() {
            page.fill(i as u8 + 1);
        }
        file.write_all(&data).unwrap();
        let m = create(8).unwrap();
        m.write_slice(&[9], GuestAddress(0x3000)).unwrap();
        let spans = [
            ImageSpan {
                gpa: 0x2000,
                len: 0x2000,
                offset: 0x1000,
            },
            ImageSpan {
                gpa: 0x4000,
                len: 0x1000,
                offset: 0x3000,
            },
            ImageSpan {
                gpa: 0x40_0000,
                len: 0x1000,
                offset: 0,
            },
        ];
        map_image(&m, &file, &spans).unwrap();
        let byte = |gpa: u64| m.read_obj::<u8>(GuestAddress(gpa)).unwrap();
        assert_eq!(
            [byte(0x2000), byte(0x3fff), byte(0x4000), byte(0x40_0000)],
            [2, 3, 4, 1]
        );
        assert_eq!(byte(0x1fff), 0, "outside the spans");
        m.write_slice(&[0xee], GuestAddress(0x2000)).unwrap();
        assert_eq!(byte(0x2000), 0xee);
        let mut back = vec![0u8; 4096];
        use std::os::unix::fs::FileExt as _;
        file.read_exact_at(&mut back, 0x1000).unwrap();
        assert!(back.iter().all(|&b| b == 2), "the file is never written");
        let region = m.iter().next().unwrap();
        if let (Some(_), Some(files)) = (backed_pages_of(region), file_backed(region)) {
            assert_eq!(files, vec![2..5, 0x400..0x401]);
            let backed = backed_pages(region);
            for page in [2, 3, 4, 0x400] {
                assert!(backed.iter().any(|r| r.contains(&page)), "page {page} in {backed:?}");
            }
        }
        crate::mem_state::zero_all(&m).unwrap();
        assert_eq!(
            [byte(0x2000), byte(0x4000), byte(0x40_0000)],
            [0, 0, 0],
            "zeroed, not the file again"
        );
        assert_eq!(file_backed(region).unwrap_or_default(), vec![]);
        for bad in [
            ImageSpan {
                gpa: 0x7f_f000,
                len: 0x2000,
                offset: 0,
            },
            ImageSpan {
                gpa: 0x1000,
                len: 0x800,
                offset: 0,
            },
        ] {
            assert!(map_image(&m, &file, &[bad]).is_err(), "{bad:?}");
        }
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
