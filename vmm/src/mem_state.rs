//! Guest memory capture and restore as page runs, for snapshots, replay
//! keyframes and migration: a full capture skips zero pages and merges
//! neighbouring pages into bounded runs; a delta capture takes the pages
//! that KVM's dirty log reports ([`DirtyTracker`]). Also the page-content
//! digest that the replayer compares at each landing.

use std::collections::BTreeSet;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};

use crate::memory::GuestMemory;
use crate::vcpu_state::{finish, mix};

/// The guest page size.
pub const PAGE_SIZE: u64 = 4096;
/// The largest run [`capture_all`] and [`capture_pages`] produce, so that a
/// memory frame stays bounded.
pub const MAX_RUN_BYTES: usize = 1 << 20;

const PAGE: usize = PAGE_SIZE as usize;

/// Consecutive guest-physical bytes, starting at `gpa`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// Guest-physical address of the first byte (page-aligned when made
    /// by this module).
    pub gpa: u64,
    /// The contents.
    #[serde(with = "page_bytes")]
    pub data: Vec<u8>,
}

/// Serde of page contents as one byte string. In postcard that is the
/// same bytes as the derived encoding of a `Vec<u8>` (a varint length,
/// then one byte per element), so the container is unchanged; but it is
/// copied whole instead of element by element, which made decoding a
/// snapshot's memory cost about 2 ns per byte, seconds per GiB.
mod page_bytes {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(data)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(Bytes)
    }

    struct Bytes;

    impl<'de> Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("page contents")
        }

        fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        /// Formats that give bytes as a sequence of numbers (JSON).
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(super::MAX_RUN_BYTES));
            while let Some(b) = seq.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

/// Errors of restoring memory or tracking dirty pages.
#[derive(Debug, thiserror::Error)]
pub enum MemStateError {
    /// A run does not lie inside guest RAM.
    #[error("a memory run of {len} bytes at {gpa:#x} lies outside guest RAM: the snapshot was taken with more memory (use the same --mem) or is damaged")]
    OutOfRange {
        /// Start of the run.
        gpa: u64,
        /// Its length.
        len: usize,
    },
    /// Guest memory could not be written.
    #[error("cannot write guest memory at {gpa:#x}: {source}")]
    Write {
        /// Where.
        gpa: u64,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
    /// The host refused to drop a region's pages.
    #[error("cannot zero guest memory at {gpa:#x}: {source}")]
    Zero {
        /// Start of the region.
        gpa: u64,
        /// What the host said.
        source: std::io::Error,
    },
    /// A KVM call failed.
    #[error("KVM refused {what} for memory slot {slot}: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// The slot.
        slot: u32,
        /// What the kernel said.
        source: kvm_ioctls::Error,
    },
}

/// Appends `page`, the contents at `gpa`, to `runs`: to the last run when
/// that ends at `gpa` and has room (runs stay within [`MAX_RUN_BYTES`]),
/// else as a new run. The one page-run writer of snapshots, keyframes and
/// migration.
pub fn push_page(runs: &mut Vec<PageRun>, gpa: u64, page: &[u8]) {
    if let Some(last) = runs.last_mut() {
        let end = last.gpa.checked_add(last.data.len() as u64);
        if end == Some(gpa) && last.data.len() + page.len() <= MAX_RUN_BYTES {
            last.data.extend_from_slice(page);
            return;
        }
    }
    let mut data = Vec::with_capacity(MAX_RUN_BYTES.min(page.len() * 16));
    data.extend_from_slice(page);
    runs.push(PageRun { gpa, data });
}

/// Whether `page` (at most a page long) holds only zero bytes.
pub fn is_zero(page: &[u8]) -> bool {
    // A slice comparison is a memcmp, fast in every build profile.
    static ZEROS: [u8; PAGE] = [0; PAGE];
    match ZEROS.get(..page.len()) {
        Some(zeros) => page == zeros,
        None => page.iter().all(|&b| b == 0),
    }
}

/// Every non-zero page of guest RAM, neighbours merged into runs of at most
/// [`MAX_RUN_BYTES`]. Zero pages are left out: restore into zeroed memory
/// (see [`restore_full`]). Only the pages the host ever backed are read
/// ([`memory::backed_pages`](crate::memory::backed_pages)): the others are
/// zero, so a mostly-zero machine costs its written pages, not its size.
pub fn capture_all(mem: &GuestMemory) -> Vec<PageRun> {
    let mut runs = Vec::new();
    let mut buf = [0u8; PAGE];
    for region in mem.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        for pages in crate::memory::backed_pages(region) {
            for p in pages {
                let off = p * PAGE_SIZE;
                if off >= len {
                    break;
                }
                let n = (len - off).min(PAGE_SIZE) as usize;
                let page = &mut buf[..n];
                // A region's own pages are always readable.
                if mem.read_slice(page, GuestAddress(start + off)).is_ok() && !is_zero(page) {
                    push_page(&mut runs, start + off, page);
                }
            }
        }
    }
    runs
}

/// The pages `gfns` (guest frame numbers) of guest RAM, zero or not (a
/// delta must be able to bring a page back to zero), in the order given,
/// consecutive frames merged into runs of at most [`MAX_RUN_BYTES`].
/// Frames outside guest RAM are left out.
pub fn capture_pages(mem: &GuestMemory, gfns: impl IntoIterator<Item = u64>) -> Vec<PageRun> {
    let mut runs = Vec::new();
    let mut buf = [0u8; PAGE];
    for gfn in gfns {
        let Some(gpa) = gfn.checked_mul(PAGE_SIZE) else {
            continue;
        };
        if mem.read_slice(&mut buf, GuestAddress(gpa)).is_ok() {
            push_page(&mut runs, gpa, &buf);
        }
    }
    runs
}

/// Checks that every run lies inside guest RAM.
fn check_runs(mem: &GuestMemory, runs: &[PageRun]) -> Result<(), MemStateError> {
    for r in runs {
        if !mem.check_range(GuestAddress(r.gpa), r.data.len()) {
            return Err(MemStateError::OutOfRange {
                gpa: r.gpa,
                len: r.data.len(),
            });
        }
    }
    Ok(())
}

/// Writes `runs` into guest memory. Every run is checked before the first
/// is written, so a damaged snapshot leaves memory as it was.
pub fn restore_runs(mem: &GuestMemory, runs: &[PageRun]) -> Result<(), MemStateError> {
    check_runs(mem, runs)?;
    for r in runs {
        mem.write_slice(&r.data, GuestAddress(r.gpa))
            .map_err(|source| MemStateError::Write { gpa: r.gpa, source })?;
    }
    Ok(())
}

/// Zeroes all guest RAM. A private anonymous region (what
/// [`memory::create`](crate::memory::create) makes) is given back to the
/// host with `madvise(MADV_DONTNEED)`: the next touch of each page, by Nyx
/// or by the guest through KVM (whose mappings follow through the MMU
/// notifier), finds a fresh zero page, so zeroing costs nothing per
/// untouched page and also returns the memory. Parts where a memory image
/// is mapped ([`memory::map_image`](crate::memory::map_image)), which
/// `MADV_DONTNEED` would turn back into the file's bytes, are first mapped
/// anonymous again. Other regions, and every region where
/// `/proc/self/maps` cannot be read, are overwritten with zeros. KVM's
/// dirty log does not see either.
pub fn zero_all(mem: &GuestMemory) -> Result<(), MemStateError> {
    for region in mem.iter() {
        let gpa = region.start_addr().0;
        let files = crate::memory::file_backed(region);
        if crate::memory::private_anonymous(region) && files.is_some() {
            for pages in files.unwrap_or_default() {
                let (off, len) = (pages.start * PAGE_SIZE, (pages.end - pages.start) * PAGE_SIZE);
                // SAFETY: the range lies inside this region's own mapping
                // (file_backed clips it to the region), which `mem` owns
                // and unmaps whole; MAP_FIXED replaces only those pages
                // with fresh anonymous ones, as the region was made. No
                // vCPU runs (the caller drives the machine).
                let rc = unsafe {
                    libc::mmap(
                        region.as_ptr().add(off as usize).cast(),
                        len as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                        -1,
                        0,
                    )
                };
                if rc == libc::MAP_FAILED {
                    return Err(MemStateError::Zero {
                        gpa: gpa + off,
                        source: std::io::Error::last_os_error(),
                    });
                }
            }
            // SAFETY: the range is exactly this region's own mapping, which
            // stays mapped; MADV_DONTNEED on a private anonymous mapping only
            // replaces its contents with zeros.
            let rc = unsafe { libc::madvise(region.as_ptr().cast(), region.size(), libc::MADV_DONTNEED) };
            if rc == 0 {
                continue;
            }
            tracing::debug!(
                "madvise(MADV_DONTNEED) at {gpa:#x}: {}; writing zeros",
                std::io::Error::last_os_error()
            );
        }
        let zeros = vec![0u8; MAX_RUN_BYTES];
        let mut off = 0u64;
        while off < region.len() {
            let n = (region.len() - off).min(MAX_RUN_BYTES as u64) as usize;
            mem.write_slice(&zeros[..n], GuestAddress(gpa + off))
                .map_err(|source| MemStateError::Write { gpa: gpa + off, source })?;
            off += n as u64;
        }
    }
    Ok(())
}

/// Restores a full capture: checks `runs`, zeroes all RAM ([`zero_all`]),
/// then writes `runs`. Afterwards memory equals the captured memory,
/// whatever it held before.
pub fn restore_full(mem: &GuestMemory, runs: &[PageRun]) -> Result<(), MemStateError> {
    check_runs(mem, runs)?;
    zero_all(mem)?;
    restore_runs(mem, runs)
}

/// Rolls the pages `gfns` (guest frame numbers) back to saved contents:
/// each gets the page `saved` returns for it, or zeros where it returns
/// None (the page was zero then). The one rollback of a fast reset
/// (`nyx check`) and of the replay timeline's checkpoints; returns the
/// pages written. A frame outside guest RAM is an error. Call it while no
/// vCPU of `mem` runs (the thread that drives the machine).
pub fn rollback_pages<'a>(
    mem: &GuestMemory,
    gfns: impl IntoIterator<Item = u64>,
    saved: impl Fn(u64) -> Option<&'a [u8]>,
) -> Result<usize, MemStateError> {
    static ZERO: [u8; PAGE] = [0; PAGE];
    let mut n = 0;
    for gfn in gfns {
        let data = saved(gfn).unwrap_or(&ZERO[..]);
        let len = data.len().min(PAGE);
        let gpa = gfn.saturating_mul(PAGE_SIZE);
        let page = mem
            .get_slice(GuestAddress(gpa), PAGE)
            .map_err(|source| MemStateError::Write { gpa, source })?;
        let dst = page.ptr_guard_mut();
        // SAFETY: `get_slice` checked that the page lies in guest RAM,
        // which stays mapped while `mem` lives; no vCPU runs (the caller's
        // contract), and `data` is host memory outside guest RAM. A plain
        // copy, not vm-memory's volatile word loop: a reset is bound by it.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), dst.as_ptr(), len);
            std::ptr::write_bytes(dst.as_ptr().add(len), 0, PAGE - len);
        }
        n += 1;
    }
    Ok(n)
}

/// Digest of one page: four independent lanes over its 64-bit words
/// (instruction-level parallelism), each step a bijection.
fn page_digest(page: &[u8; PAGE]) -> u64 {
    let mut lanes = [
        0x243f_6a88_85a3_08d3u64,
        0x1319_8a2e_0370_7344,
        0xa409_3822_299f_31d0,
        0x082e_fa98_ec4e_6c89,
    ];
    for block in page.chunks_exact(32) {
        for (lane, w) in lanes.iter_mut().zip(block.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            *lane = mix(*lane, u64::from_le_bytes(b));
        }
    }
    lanes.iter().fold(0, |h, &l| mix(h, l))
}

/// A 64-bit digest of the contents of the pages `gfns`, in the order given
/// (pass them in ascending order, as a `BTreeSet` from
/// [`DirtyTracker::collect`] iterates, so that recorder and replayer agree).
/// Each page contributes its frame number and a digest of its 4096 bytes
/// read as little-endian 64-bit words; a frame outside guest RAM contributes
/// its number and a fixed marker. Costs one 4 KiB copy and 512
/// multiply-rotate steps per page, no allocation. Not a cryptographic hash.
pub fn memory_digest(mem: &GuestMemory) -> u64 {
    let gfns = mem.iter().flat_map(|r| {
        let first = r.start_addr().0 / PAGE_SIZE;
        first..first + r.len() / PAGE_SIZE
    });
    pages_digest(mem, gfns)
}

/// Digest of the contents of the pages `gfns`, in the order given (see the
/// notes below).
pub fn pages_digest(mem: &GuestMemory, gfns: impl IntoIterator<Item = u64>) -> u64 {
    let mut buf = [0u8; PAGE];
    let mut h = 0x7061_6765_7321_6e79;
    for gfn in gfns {
        h = mix(h, gfn);
        let ok = gfn
            .checked_mul(PAGE_SIZE)
            .is_some_and(|gpa| mem.read_slice(&mut buf, GuestAddress(gpa)).is_ok());
        h = mix(h, if ok { page_digest(&buf) } else { u64::MAX });
    }
    finish(h)
}

/// As [`pages_digest`], except that the byte ranges `dead` (page, start
/// offset, end offset) are left out: the dead part of the stack below RSP,
/// which an interrupt may scribble on at any time.
pub fn pages_digest_live(mem: &GuestMemory, gfns: impl IntoIterator<Item = u64>, dead: &[(u64, usize, usize)]) -> u64 {
    let mut buf = [0u8; PAGE];
    let mut h = 0x7061_6765_7321_6e79;
    for gfn in gfns {
        h = mix(h, gfn);
        let ok = gfn
            .checked_mul(PAGE_SIZE)
            .is_some_and(|gpa| mem.read_slice(&mut buf, GuestAddress(gpa)).is_ok());
        for &(page, from, to) in dead {
            if page == gfn && from < to {
                buf[from.min(PAGE)..to.min(PAGE)].fill(0);
            }
        }
        h = mix(h, if ok { page_digest(&buf) } else { u64::MAX });
    }
    finish(h)
}

/// One KVM memory slot as the machine registers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    slot: u32,
    gpa: u64,
    size: u64,
    host: u64,
}

/// KVM's dirty-page log over every memory slot: which guest pages the guest
/// wrote since the last [`collect`](Self::collect). It sees writes by the
/// guest only (in protected and long mode; not in real mode on the emulated
/// KVM of some hosts), never those Nyx makes itself through the mapping:
/// the caller adds those, except the writes of devices (DMA), which it
/// reports too once given the devices' view with
/// [`track_dma`](Self::track_dma).
#[derive(Debug)]
pub struct DirtyTracker {
    slots: Vec<Slot>,
    dma: Option<crate::memory::DmaMemory>,
}

fn slots_of(mem: &GuestMemory) -> Vec<Slot> {
    // The machine's layout: slot index = region index.
    mem.iter()
        .enumerate()
        .map(|(i, r)| Slot {
            slot: i as u32,
            gpa: r.start_addr().0,
            size: r.len(),
            host: r.as_ptr() as u64,
        })
        .collect()
}

/// Registers each slot again with `flags`.
///
/// # Safety
/// Each slot's host range must stay mapped for as long as the VM uses it.
unsafe fn register(vm: &VmFd, slots: &[Slot], flags: u32) -> Result<(), MemStateError> {
    for s in slots {
        let region = kvm_userspace_memory_region {
            slot: s.slot,
            flags,
            guest_phys_addr: s.gpa,
            memory_size: s.size,
            userspace_addr: s.host,
        };
        // SAFETY: guaranteed by the caller.
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| MemStateError::Kvm {
            what: "KVM_SET_USER_MEMORY_REGION",
            slot: s.slot,
            source,
        })?;
    }
    Ok(())
}

impl DirtyTracker {
    /// Starts dirty logging on every slot of `vm`, which holds `mem` with
    /// one slot per region (slot index = region index). Logging starts
    /// clean: only writes after this call are reported.
    ///
    /// # Safety
    /// `mem` must be the memory registered with `vm` in that layout, and
    /// must outlive `vm` (as for `set_user_memory_region`).
    pub unsafe fn enable(vm: &VmFd, mem: &GuestMemory) -> Result<Self, MemStateError> {
        let slots = slots_of(mem);
        // SAFETY: the caller guarantees that these ranges back the VM's
        // slots for its whole life.
        unsafe { register(vm, &slots, KVM_MEM_LOG_DIRTY_PAGES) }?;
        Ok(DirtyTracker { slots, dma: None })
    }

    /// Reports, with the guest's own writes, the pages devices write
    /// through `dma` from now on (the view's bitmap has one reader, as
    /// KVM's log has).
    pub fn track_dma(mut self, dma: &crate::memory::DmaMemory) -> Self {
        crate::memory::take_dma_dirty(dma, &mut BTreeSet::new());
        self.dma = Some(dma.clone());
        self
    }

    /// The guest frame numbers written since the last call (or since
    /// [`enable`](Self::enable)), ascending; clears the log.
    pub fn collect(&mut self, vm: &VmFd) -> Result<BTreeSet<u64>, MemStateError> {
        let mut out = BTreeSet::new();
        for s in &self.slots {
            let bitmap = vm
                .get_dirty_log(s.slot, s.size as usize)
                .map_err(|source| MemStateError::Kvm {
                    what: "KVM_GET_DIRTY_LOG",
                    slot: s.slot,
                    source,
                })?;
            let first = s.gpa / PAGE_SIZE;
            let pages = s.size.div_ceil(PAGE_SIZE);
            for (i, &word) in bitmap.iter().enumerate() {
                let mut w = word;
                while w != 0 {
                    let bit = u64::from(w.trailing_zeros());
                    w &= w - 1;
                    let page = i as u64 * 64 + bit;
                    if page < pages {
                        out.insert(first + page);
                    }
                }
            }
        }
        if let Some(dma) = &self.dma {
            crate::memory::take_dma_dirty(dma, &mut out);
        }
        Ok(out)
    }

    /// Stops dirty logging.
    pub fn disable(self, vm: &VmFd) -> Result<(), MemStateError> {
        // SAFETY: the same ranges that `enable`'s caller vouched for, with
        // only the flags changed (KVM refuses to move an existing slot).
        unsafe { register(vm, &self.slots, 0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory;
    use proptest::prelude::*;

    fn write(mem: &GuestMemory, gpa: u64, data: &[u8]) {
        mem.write_slice(data, GuestAddress(gpa)).unwrap();
    }

    fn dump(mem: &GuestMemory) -> Vec<u8> {
        let mut out = Vec::new();
        for r in mem.iter() {
            let mut v = vec![0u8; r.len() as usize];
            mem.read_slice(&mut v, r.start_addr()).unwrap();
            out.extend(v);
        }
        out
    }

    #[test]
    fn zero_pages_are_skipped_and_neighbours_merged() {
        let mem = memory::create(4).unwrap();
        write(&mem, 0x1000, &[1]);
        write(&mem, 0x2fff, &[2]);
        write(&mem, 0x5000, &[3, 4]);
        let runs = capture_all(&mem);
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].gpa, runs[0].data.len()), (0x1000, 0x2000));
        assert_eq!((runs[0].data[0], runs[0].data[0x1fff]), (1, 2));
        assert_eq!((runs[1].gpa, &runs[1].data[..3]), (0x5000, &[3, 4, 0][..]));
        assert!(capture_all(&memory::create(2).unwrap()).is_empty());
    }

    #[test]
    fn runs_are_capped() {
        let mem = memory::create(4).unwrap();
        let ones = vec![1u8; 3 << 20];
        write(&mem, 0, &ones);
        let runs = capture_all(&mem);
        let sizes: Vec<(u64, usize)> = runs.iter().map(|r| (r.gpa, r.data.len())).collect();
        assert_eq!(sizes, vec![(0, 1 << 20), (1 << 20, 1 << 20), (2 << 20, 1 << 20)]);
        let pages = capture_pages(&mem, 0..(3 << 8) + 1);
        assert_eq!(pages.len(), 4);
        assert!(pages.iter().all(|r| r.data.len() <= MAX_RUN_BYTES));
        assert_eq!(pages[3].data, vec![0u8; PAGE], "zero pages are kept");
    }

    #[test]
    fn capture_pages_follows_the_frames_given() {
        let mem = memory::create(2).unwrap();
        write(&mem, 0x3000, &[9]);
        let runs = capture_pages(&mem, [3, 4, 7, 1 << 40, u64::MAX]);
        let spans: Vec<(u64, usize)> = runs.iter().map(|r| (r.gpa, r.data.len())).collect();
        assert_eq!(spans, vec![(0x3000, 0x2000), (0x7000, 0x1000)]);
        assert_eq!(runs[0].data[0], 9);
    }

    #[test]
    fn out_of_range_runs_are_errors_and_write_nothing() {
        let mem = memory::create(2).unwrap();
        let good = PageRun {
            gpa: 0,
            data: vec![5; 16],
        };
        for bad in [
            PageRun {
                gpa: 2 << 20,
                data: vec![1],
            },
            PageRun {
                gpa: (2 << 20) - 1,
                data: vec![1, 2],
            },
            PageRun {
                gpa: u64::MAX,
                data: vec![1, 2],
            },
        ] {
            let err = restore_runs(&mem, &[good.clone(), bad.clone()]).unwrap_err();
            assert!(matches!(err, MemStateError::OutOfRange { gpa, .. } if gpa == bad.gpa));
            assert!(restore_full(&mem, &[bad]).is_err());
        }
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 0);
        restore_runs(&mem, &[good]).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(15)).unwrap(), 5);
    }

    #[test]
    fn page_runs_encode_as_the_derived_byte_sequence_did() {
        /// A page run as it was encoded before `page_bytes`.
        #[derive(Serialize, Deserialize)]
        struct Derived {
            gpa: u64,
            data: Vec<u8>,
        }
        for len in [0usize, 1, 127, 128, 4096, MAX_RUN_BYTES] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let run = PageRun { gpa: 0x1234_5000, data };
            let old = Derived {
                gpa: run.gpa,
                data: run.data.clone(),
            };
            let bytes = postcard::to_allocvec(&run).unwrap();
            assert_eq!(bytes, postcard::to_allocvec(&old).unwrap(), "{len} bytes");
            assert_eq!(postcard::from_bytes::<PageRun>(&bytes).unwrap(), run);
            let cut = &bytes[..bytes.len() - 1];
            assert!(len == 0 || postcard::from_bytes::<PageRun>(cut).is_err());
        }
    }

    #[test]
    fn zero_all_clears_everything() {
        let mem = memory::create(2).unwrap();
        write(&mem, 0, &[1; 100]);
        write(&mem, (2 << 20) - 1, &[1]);
        zero_all(&mem).unwrap();
        assert!(dump(&mem).iter().all(|&b| b == 0));
        write(&mem, 0x10, &[7]);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10)).unwrap(), 7);
    }

    #[test]
    fn pages_digest_sees_contents_and_frames() {
        let mem = memory::create(2).unwrap();
        let d0 = pages_digest(&mem, [1, 2]);
        write(&mem, 0x2ff8, &[1]);
        let d1 = pages_digest(&mem, [1, 2]);
        assert_ne!(d0, d1);
        assert_ne!(d0, pages_digest(&mem, [1, 3]), "frame numbers count");
        assert_ne!(d0, pages_digest(&mem, [2, 1]), "order counts");
        assert_ne!(d0, pages_digest(&mem, [1]));
        assert_ne!(pages_digest(&mem, [1 << 30]), pages_digest(&mem, [5]));
        write(&mem, 0x2ff8, &[0]);
        assert_eq!(d0, pages_digest(&mem, [1, 2]));
    }

    #[test]
    fn dirty_tracker_reports_exactly_the_pages_the_guest_wrote() {
        use kvm_ioctls::VcpuExit;
        let Some(mut t) = crate::vcpu_state::tests::test_vm(4) else {
            return;
        };
        let code: &[u8] = &[
            0xc7, 0x05, 0x00, 0x00, 0x01, 0x00, 0x11, 0x11, 0x11, 0x11, // mov [0x10000], ..
            0xc7, 0x05, 0xfc, 0x3f, 0x02, 0x00, 0x22, 0x22, 0x22, 0x22, // mov [0x23ffc], ..
            0xc7, 0x05, 0xf0, 0xff, 0x3f, 0x00, 0x33, 0x33, 0x33, 0x33, // mov [0x3ffff0], ..
            0xe6, 0x80, // out 0x80, al
            0xc7, 0x05, 0x08, 0x50, 0x00, 0x00, 0x44, 0x44, 0x44, 0x44, // mov [0x5008], ..
            0xf4, // hlt
        ];
        write(&t.mem, 0x1000, code);
        crate::vcpu_state::tests::protected_mode(&t.vcpu, 0x1000);
        // SAFETY: `t.mem` is registered with `t.vm` as slot 0 and outlives it.
        let mut tracker = unsafe { DirtyTracker::enable(&t.vm, &t.mem) }.unwrap();
        assert!(tracker.collect(&t.vm).unwrap().is_empty());
        let before = pages_digest(&t.mem, [0x10, 0x23, 0x3ff]);

        assert!(matches!(t.vcpu.run().unwrap(), VcpuExit::IoOut(0x80, _)));
        let dirty = tracker.collect(&t.vm).unwrap();
        assert_eq!(dirty.iter().copied().collect::<Vec<_>>(), vec![0x10, 0x23, 0x3ff]);
        assert_ne!(before, pages_digest(&t.mem, dirty.iter().copied()));
        let runs = capture_pages(&t.mem, dirty.iter().copied());
        let spans: Vec<(u64, u8)> = runs.iter().map(|r| (r.gpa, r.data[0xff0])).collect();
        assert_eq!(spans, vec![(0x10000, 0), (0x23000, 0), (0x3ff000, 0x33)]);
        assert_eq!(runs[1].data[0xffc], 0x22);

        assert!(matches!(t.vcpu.run().unwrap(), VcpuExit::Hlt));
        let dirty = tracker.collect(&t.vm).unwrap();
        assert_eq!(dirty.into_iter().collect::<Vec<_>>(), vec![5]);
        assert!(tracker.collect(&t.vm).unwrap().is_empty(), "collect clears");
        tracker.disable(&t.vm).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn sparse_writes_round_trip(writes in proptest::collection::vec(
            (0u64..(4 << 20) - 64, proptest::collection::vec(any::<u8>(), 1..64)), 0..40)
        ) {
            let mem = memory::create(4).unwrap();
            for (gpa, data) in &writes {
                write(&mem, *gpa, data);
            }
            let runs = capture_all(&mem);
            for r in &runs {
                prop_assert!(r.gpa % PAGE_SIZE == 0 && r.data.len() <= MAX_RUN_BYTES);
                prop_assert!(!is_zero(&r.data));
            }
            let bytes = postcard::to_allocvec(&runs).unwrap();
            let back: Vec<PageRun> = postcard::from_bytes(&bytes).unwrap();
            // Into fresh memory, and into memory holding other data.
            let fresh = memory::create(4).unwrap();
            restore_runs(&fresh, &back).unwrap();
            prop_assert!(dump(&fresh) == dump(&mem));
            let used = memory::create(4).unwrap();
            write(&used, 0x1234, &[0xaa; 5000]);
            restore_full(&used, &back).unwrap();
            prop_assert!(dump(&used) == dump(&mem));
            prop_assert_eq!(
                pages_digest(&used, 0..1024),
                pages_digest(&mem, 0..1024)
            );
        }
    }
}
