//! Guest memory: one anonymous mapping per RAM region, with the PC layout's
//! 32-bit MMIO hole between 3 GiB and 4 GiB.

use vm_memory::{GuestAddress, GuestMemoryMmap};

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
