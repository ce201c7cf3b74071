//! Guest-virtual to guest-physical translation by walking the guest's own
//! page tables, for every x86 paging mode: none, 32-bit (with 4 MiB pages),
//! PAE, 4-level and 5-level long mode (with 2 MiB and 1 GiB pages).
//!
//! Used by crash reports (disassembly at RIP) and by the gdb stub (memory
//! access by virtual address). Accessed/dirty bits are never set: looking at
//! a guest must not change it.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PTE_P: u64 = 1;
const PTE_PS: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The registers that decide how an address is translated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PagingRegs {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
}

impl PagingRegs {
    /// The paging registers among a vCPU's special registers.
    pub fn of(s: &kvm_bindings::kvm_sregs) -> Self {
        PagingRegs {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
        }
    }

    /// The paging mode these registers select.
    pub fn mode(&self) -> PagingMode {
        if self.cr0 & CR0_PG == 0 {
            PagingMode::None
        } else if self.efer & EFER_LMA != 0 {
            if self.cr4 & CR4_LA57 != 0 {
                PagingMode::Level5
            } else {
                PagingMode::Level4
            }
        } else if self.cr4 & CR4_PAE != 0 {
            PagingMode::Pae
        } else {
            PagingMode::Bits32
        }
    }
}

/// An x86 paging mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagingMode {
    /// Paging off: virtual = physical.
    None,
    /// 32-bit two-level paging.
    Bits32,
    /// PAE three-level paging.
    Pae,
    /// Long mode, four levels.
    Level4,
    /// Long mode, five levels.
    Level5,
}

/// Why an address does not translate.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TranslateError {
    /// A table entry on the way is not present.
    #[error("virtual address {0:#x} is not mapped")]
    NotMapped(u64),
    /// The address is not canonical for the mode.
    #[error("virtual address {0:#x} is not canonical")]
    NonCanonical(u64),
    /// A page-table entry lies outside guest RAM.
    #[error("page table for {0:#x} lies outside guest memory")]
    TableOutsideMemory(u64),
}

/// Where a virtual address lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// The physical address.
    pub gpa: u64,
    /// Bytes from `gpa` to the end of its page (at least 1).
    pub remaining_in_page: u64,
}

fn read_entry(mem: &GuestMemory, addr: u64, wide: bool, gva: u64) -> Result<u64, TranslateError> {
    if wide {
        mem.read_obj::<u64>(GuestAddress(addr))
            .map_err(|_| TranslateError::TableOutsideMemory(gva))
    } else {
        mem.read_obj::<u32>(GuestAddress(addr))
            .map(u64::from)
            .map_err(|_| TranslateError::TableOutsideMemory(gva))
    }
}

fn done(gpa: u64, page_size: u64) -> Translation {
    Translation {
        gpa,
        remaining_in_page: page_size - (gpa & (page_size - 1)),
    }
}

/// Translates `gva` with the page tables in `mem`.
pub fn translate(mem: &GuestMemory, regs: &PagingRegs, gva: u64) -> Result<Translation, TranslateError> {
    match regs.mode() {
        PagingMode::None => Ok(done(gva & 0xffff_ffff, 1 << 12)),
        PagingMode::Bits32 => {
            let gva = gva & 0xffff_ffff;
            let pde = read_entry(mem, (regs.cr3 & 0xffff_f000) + ((gva >> 22) << 2), false, gva)?;
            if pde & PTE_P == 0 {
                return Err(TranslateError::NotMapped(gva));
            }
            if pde & PTE_PS != 0 && regs.cr4 & CR4_PSE != 0 {
                // PSE-36: bits 13..20 of the PDE are physical bits 32..39.
                let base = (pde & 0xffc0_0000) | ((pde >> 13) & 0xff) << 32;
                return Ok(done(base | (gva & 0x3f_ffff), 1 << 22));
            }
            let pte = read_entry(mem, (pde & 0xffff_f000) + (((gva >> 12) & 0x3ff) << 2), false, gva)?;
            if pte & PTE_P == 0 {
                return Err(TranslateError::NotMapped(gva));
            }
            Ok(done((pte & 0xffff_f000) | (gva & 0xfff), 1 << 12))
        }
        PagingMode::Pae => {
            let gva = gva & 0xffff_ffff;
            let pdpte = read_entry(mem, (regs.cr3 & 0xffff_ffe0) + ((gva >> 30) << 3), true, gva)?;
            if pdpte & PTE_P == 0 {
                return Err(TranslateError::NotMapped(gva));
            }
            walk_long(mem, pdpte & ADDR_MASK, gva, 2)
        }
        mode @ (PagingMode::Level4 | PagingMode::Level5) => {
            let levels = if mode == PagingMode::Level5 { 5 } else { 4 };
            let bits = 12 + 9 * levels;
            let sign = (gva as i64) << (64 - bits) >> (64 - bits);
            if sign as u64 != gva {
                return Err(TranslateError::NonCanonical(gva));
            }
            walk_long(mem, regs.cr3 & ADDR_MASK, gva, levels)
        }
    }
}

/// Walks `levels` levels of 64-bit entries starting at the table `table`.
fn walk_long(mem: &GuestMemory, mut table: u64, gva: u64, levels: u32) -> Result<Translation, TranslateError> {
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let index = (gva >> shift) & 0x1ff;
        let entry = read_entry(mem, table + index * 8, true, gva)?;
        if entry & PTE_P == 0 {
            return Err(TranslateError::NotMapped(gva));
        }
        // Large pages: 1 GiB at level 3, 2 MiB at level 2.
        if (level == 2 || level == 3) && entry & PTE_PS != 0 {
            let size = 1u64 << shift;
            let base = entry & ADDR_MASK & !(size - 1);
            return Ok(done(base | (gva & (size - 1)), size));
        }
        table = entry & ADDR_MASK;
        if level == 1 {
            return Ok(done(table | (gva & 0xfff), 1 << 12));
        }
    }
    Err(TranslateError::NotMapped(gva))
}

/// Reads `buf.len()` bytes at virtual address `gva`, page by page.
pub fn read_virt(mem: &GuestMemory, regs: &PagingRegs, gva: u64, buf: &mut [u8]) -> Result<(), TranslateError> {
    let mut done_len = 0usize;
    while done_len < buf.len() {
        let addr = gva.wrapping_add(done_len as u64);
        let t = translate(mem, regs, addr)?;
        let n = (buf.len() - done_len).min(t.remaining_in_page as usize);
        mem.read_slice(&mut buf[done_len..done_len + n], GuestAddress(t.gpa))
            .map_err(|_| TranslateError::NotMapped(addr))?;
        done_len += n;
    }
    Ok(())
}

/// Writes `buf` at virtual address `gva`, page by page.
pub fn write_virt(mem: &GuestMemory, regs: &PagingRegs, gva: u64, buf: &[u8]) -> Result<(), TranslateError> {
    let mut done_len = 0usize;
    while done_len < buf.len() {
        let addr = gva.wrapping_add(done_len as u64);
        let t = translate(mem, regs, addr)?;
        let n = (buf.len() - done_len).min(t.remaining_in_page as usize);
        mem.write_slice(&buf[done_len..done_len + n], GuestAddress(t.gpa))
            .map_err(|_| TranslateError::NotMapped(addr))?;
        done_len += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PG: u64 = CR0_PG | 1;

    fn mem() -> GuestMemory {
        crate::memory::create(16).unwrap()
    }

    fn put64(m: &GuestMemory, a: u64, v: u64) {
        m.write_obj(v, GuestAddress(a)).unwrap();
    }

    fn put32(m: &GuestMemory, a: u64, v: u32) {
        m.write_obj(v, GuestAddress(a)).unwrap();
    }

    #[test]
    fn no_paging_is_identity() {
        let m = mem();
        let r = PagingRegs::default();
        assert_eq!(translate(&m, &r, 0x1234).unwrap().gpa, 0x1234);
    }

    #[test]
    fn four_level_4k_2m_1g_and_higher_half() {
        let m = mem();
        let r = PagingRegs {
            cr0: PG,
            cr3: 0x1000,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
        };
        // PML4[511] -> PDPT 0x2000; PDPT[510] -> PD 0x3000; PD[0] -> PT 0x4000; PT[1] -> 0x20_0000.
        put64(&m, 0x1000 + 511 * 8, 0x2000 | 3);
        put64(&m, 0x2000 + 510 * 8, 0x3000 | 3);
        put64(&m, 0x3000, 0x4000 | 3);
        put64(&m, 0x4000 + 8, 0x20_0000 | 3);
        // PD[1]: 2 MiB page at 0x40_0000.
        put64(&m, 0x3000 + 8, 0x40_0000 | 3 | PTE_PS);
        // PML4[0] -> PDPT 0x5000, PDPT[0]: 1 GiB page at 0.
        put64(&m, 0x1000, 0x5000 | 3);
        put64(&m, 0x5000, 3 | PTE_PS);
        let hh = 0xffff_ffff_8000_0000u64;
        assert_eq!(translate(&m, &r, hh + 0x1abc).unwrap().gpa, 0x20_0abc);
        let t = translate(&m, &r, hh + 0x20_0010).unwrap();
        assert_eq!(t.gpa, 0x40_0010);
        assert_eq!(t.remaining_in_page, (1 << 21) - 0x10);
        assert_eq!(translate(&m, &r, 0x123_4567).unwrap().gpa, 0x123_4567);
        assert_eq!(
            translate(&m, &r, hh + 0x2000),
            Err(TranslateError::NotMapped(hh + 0x2000))
        );
        assert_eq!(
            translate(&m, &r, 0x0000_8000_0000_0000),
            Err(TranslateError::NonCanonical(0x0000_8000_0000_0000))
        );
    }

    #[test]
    fn five_level() {
        let m = mem();
        let r = PagingRegs {
            cr0: PG,
            cr3: 0x1000,
            cr4: CR4_PAE | CR4_LA57,
            efer: EFER_LMA,
        };
        put64(&m, 0x1000 + 8, 0x2000 | 3); // PML5[1]
        put64(&m, 0x2000, 0x3000 | 3);
        put64(&m, 0x3000, 0x4000 | 3);
        put64(&m, 0x4000, 0x5000 | 3);
        put64(&m, 0x5000 + 3 * 8, 0x6000 | 3);
        let gva = (1u64 << 48) | (3 << 12) | 0x77;
        assert_eq!(translate(&m, &r, gva).unwrap().gpa, 0x6077);
    }

    #[test]
    fn pae_and_32bit() {
        let m = mem();
        let r = PagingRegs {
            cr0: PG,
            cr3: 0x1000,
            cr4: CR4_PAE,
            efer: 0,
        };
        put64(&m, 0x1000 + 3 * 8, 0x2000 | 1); // PDPT[3]
        put64(&m, 0x2000 + 8, 0x60_0000 | 3 | PTE_PS); // 2 MiB page
        assert_eq!(translate(&m, &r, 0xc020_0042).unwrap().gpa, 0x60_0042);
        let r = PagingRegs {
            cr0: PG,
            cr3: 0x8000,
            cr4: CR4_PSE,
            efer: 0,
        };
        put32(&m, 0x8000 + 0x300 * 4, 0x40_0000 | 3 | PTE_PS as u32); // 4 MiB page
        put32(&m, 0x8000 + 4, 0x9000 | 3);
        put32(&m, 0x9000 + 2 * 4, 0x7000 | 3);
        assert_eq!(translate(&m, &r, 0xc012_3456).unwrap().gpa, 0x52_3456);
        assert_eq!(translate(&m, &r, 0x0040_2010).unwrap().gpa, 0x7010);
        assert_eq!(
            translate(&m, &r, 0x0080_0000),
            Err(TranslateError::NotMapped(0x80_0000))
        );
    }

    #[test]
    fn read_and_write_cross_pages() {
        let m = mem();
        let r = PagingRegs {
            cr0: PG,
            cr3: 0x1000,
            cr4: CR4_PAE,
            efer: EFER_LMA,
        };
        put64(&m, 0x1000, 0x2000 | 3);
        put64(&m, 0x2000, 0x3000 | 3);
        put64(&m, 0x3000, 0x4000 | 3);
        // Virtual pages 0 and 1 map to physical 0x9000 and 0x7000: not contiguous.
        put64(&m, 0x4000, 0x9000 | 3);
        put64(&m, 0x4008, 0x7000 | 3);
        write_virt(&m, &r, 0xffe, &[1, 2, 3, 4]).unwrap();
        assert_eq!(m.read_obj::<u16>(GuestAddress(0x9ffe)).unwrap(), 0x0201);
        assert_eq!(m.read_obj::<u16>(GuestAddress(0x7000)).unwrap(), 0x0403);
        let mut b = [0u8; 4];
        read_virt(&m, &r, 0xffe, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(read_virt(&m, &r, 0x1ffe, &mut b).is_err());
    }

    proptest! {
        /// Garbage page tables never panic: every walk ends in a translation
        /// or an error.
        #[test]
        fn garbage_tables_never_panic(cr3 in 0u64..(32 << 20), cr4 in 0u64..0x2000, lma: bool, gva: u64, fill: Vec<u64>) {
            let m = mem();
            for (i, v) in fill.iter().enumerate() {
                let _ = m.write_obj(*v, GuestAddress((cr3 & !0xfff).wrapping_add(i as u64 * 8)));
            }
            let r = PagingRegs { cr0: PG, cr3, cr4, efer: if lma { EFER_LMA } else { 0 } };
            let _ = translate(&m, &r, gva);
            let mut b = [0u8; 16];
            let _ = read_virt(&m, &r, gva, &mut b);
        }
    }
}
