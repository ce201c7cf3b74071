//! Segment descriptors for the boot GDTs: packing a descriptor the way the
//! CPU reads it from guest memory, and unpacking the same descriptor into the
//! `kvm_segment` that KVM wants in `sregs`, so that the hidden segment state
//! and the table in memory always agree.

use kvm_bindings::kvm_segment;

/// Flat 32-bit code: present, ring 0, execute/read, accessed, 4 KiB granular, 32-bit.
pub const CODE32: u16 = 0xc09b;
/// Flat data: present, ring 0, read/write, accessed, 4 KiB granular, 32-bit.
pub const DATA: u16 = 0xc093;
/// 64-bit code: present, ring 0, execute/read, accessed, 4 KiB granular, long mode.
pub const CODE64: u16 = 0xa09b;
/// Busy 64-bit TSS (its contents are never used before the kernel loads its own).
pub const TSS64: u16 = 0x808b;

/// A descriptor of `flags` (access byte in bits 0-7, flags nibble in bits
/// 12-15), `base` and a 20-bit `limit`.
pub fn entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    ((base & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The segment register contents that loading selector `index * 8` with
/// descriptor `desc` produces.
pub fn segment(desc: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((desc >> n) & 1) as u8;
    let g = bit(55);
    let raw_limit = (((desc >> 32) & 0x000f_0000) | (desc & 0xffff)) as u32;
    let present = bit(47);
    kvm_segment {
        base: ((desc >> 32) & 0xff00_0000) | ((desc >> 16) & 0x00ff_ffff),
        limit: if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: index * 8,
        type_: ((desc >> 40) & 0xf) as u8,
        present,
        dpl: ((desc >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_known_descriptors() {
        assert_eq!(entry(CODE32, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(entry(DATA, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(entry(CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(entry(TSS64, 0, 0xfffff), 0x008f_8b00_0000_ffff);
        assert_eq!(entry(DATA, 0x1234_5678, 0xabcde), 0x12ca_9334_5678_bcde);
    }

    #[test]
    fn unpacks_what_it_packs() {
        let s = segment(entry(CODE64, 0x1234_5678, 0xfffff), 1);
        assert_eq!((s.base, s.limit, s.selector), (0x1234_5678, 0xffff_ffff, 8));
        assert_eq!(
            (s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g),
            (0xb, 1, 0, 0, 1, 1, 1)
        );
        assert_eq!(s.unusable, 0);
        let d = segment(entry(DATA, 0, 0xfffff), 3);
        assert_eq!((d.type_, d.db, d.l, d.selector), (3, 1, 0, 0x18));
        let small = segment(entry(0x0093, 0x100, 0x67), 2);
        assert_eq!((small.limit, small.g, small.base), (0x67, 0, 0x100));
        assert_eq!(segment(0, 0).unusable, 1);
    }
}
