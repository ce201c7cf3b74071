//! A minimal, bounds-checked reader of ELF file and program headers (32- and
//! 64-bit, little endian): just enough for the loaders to tell an i386 image
//! from an x86-64 one, to validate every loadable segment before anything is
//! written to guest memory, and to report which segments are executable;
//! and, for the instruction patcher, named sections (Linux's
//! `.altinstructions`), where a damaged section table counts as none.

use super::LoadError;

/// `e_machine` of i386 images.
pub const EM_386: u16 = 3;
/// `e_machine` of x86-64 images.
pub const EM_X86_64: u16 = 62;
/// `p_type` of a loadable segment.
const PT_LOAD: u32 = 1;
/// `p_flags` bit of an executable segment.
pub const PF_X: u32 = 1;

/// ELF word size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// ELFCLASS32.
    Elf32,
    /// ELFCLASS64.
    Elf64,
}

/// One `PT_LOAD` program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Offset of the segment's bytes in the file.
    pub offset: u64,
    /// Virtual address the segment is linked at.
    pub vaddr: u64,
    /// Physical address the segment is loaded at.
    pub paddr: u64,
    /// Bytes taken from the file.
    pub filesz: u64,
    /// Bytes in memory (the rest is zero-filled).
    pub memsz: u64,
    /// `p_flags`.
    pub flags: u32,
}

/// The parts of an ELF file the loaders use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfFile {
    /// Word size.
    pub class: Class,
    /// `e_machine`.
    pub machine: u16,
    /// `e_entry`.
    pub entry: u64,
    /// Every `PT_LOAD` segment, in file order.
    pub segments: Vec<Segment>,
}

/// True when `image` starts with the ELF magic.
pub fn has_magic(image: &[u8]) -> bool {
    image.starts_with(b"\x7fELF")
}

/// Reads `N` bytes at `off`, or `None` past the end.
fn bytes<const N: usize>(image: &[u8], off: u64) -> Option<[u8; N]> {
    let start = usize::try_from(off).ok()?;
    let end = start.checked_add(N)?;
    image.get(start..end)?.try_into().ok()
}

pub(crate) fn u16_at(image: &[u8], off: u64) -> Option<u16> {
    bytes(image, off).map(u16::from_le_bytes)
}

pub(crate) fn u32_at(image: &[u8], off: u64) -> Option<u32> {
    bytes(image, off).map(u32::from_le_bytes)
}

fn u64_at(image: &[u8], off: u64) -> Option<u64> {
    bytes(image, off).map(u64::from_le_bytes)
}

fn truncated(what: &'static str, offset: u64, len: u64, image: &[u8]) -> LoadError {
    LoadError::Truncated {
        what,
        offset,
        len,
        file_len: image.len() as u64,
    }
}

/// The class and machine of an ELF image, read from its identification bytes.
pub fn ident(image: &[u8]) -> Result<(Class, u16), LoadError> {
    let err = || truncated("ELF header", 0, 20, image);
    if image.len() < 20 {
        return Err(err());
    }
    let class = match image.get(4).ok_or_else(err)? {
        1 => Class::Elf32,
        2 => Class::Elf64,
        other => return Err(LoadError::BadElf(format!("unknown ELF class {other}"))),
    };
    if image.get(5) != Some(&1) {
        return Err(LoadError::BadElf("big-endian ELF files are not x86 kernels".into()));
    }
    let machine = u16_at(image, 18).ok_or_else(err)?;
    Ok((class, machine))
}

/// Parses the file header and the `PT_LOAD` program headers, checking that
/// every header and every segment's file bytes lie inside `image`.
pub fn parse(image: &[u8]) -> Result<ElfFile, LoadError> {
    let (class, machine) = ident(image)?;
    let (hdr_len, entry, phoff, phentsize, phnum, want_phentsize) = match class {
        Class::Elf32 => (
            52,
            u32_at(image, 24).map(u64::from),
            u32_at(image, 28).map(u64::from),
            u16_at(image, 42),
            u16_at(image, 44),
            32u16,
        ),
        Class::Elf64 => (
            64,
            u64_at(image, 24),
            u64_at(image, 32),
            u16_at(image, 54),
            u16_at(image, 56),
            56u16,
        ),
    };
    let (Some(entry), Some(phoff), Some(phentsize), Some(phnum)) = (entry, phoff, phentsize, phnum) else {
        return Err(truncated("ELF header", 0, hdr_len, image));
    };
    if phnum > 0 && phentsize != want_phentsize {
        return Err(LoadError::BadElf(format!(
            "program header entries are {phentsize} bytes, expected {want_phentsize}"
        )));
    }
    let table_len = u64::from(phnum) * u64::from(want_phentsize);
    if phoff.checked_add(table_len).is_none_or(|end| end > image.len() as u64) {
        return Err(truncated("program header table", phoff, table_len, image));
    }

    let mut segments = Vec::new();
    for i in 0..u64::from(phnum) {
        let ph = phoff + i * u64::from(want_phentsize);
        let read = || -> Option<(u32, Segment)> {
            Some(match class {
                Class::Elf32 => (
                    u32_at(image, ph)?,
                    Segment {
                        offset: u32_at(image, ph + 4)?.into(),
                        vaddr: u32_at(image, ph + 8)?.into(),
                        paddr: u32_at(image, ph + 12)?.into(),
                        filesz: u32_at(image, ph + 16)?.into(),
                        memsz: u32_at(image, ph + 20)?.into(),
                        flags: u32_at(image, ph + 24)?,
                    },
                ),
                Class::Elf64 => (
                    u32_at(image, ph)?,
                    Segment {
                        flags: u32_at(image, ph + 4)?,
                        offset: u64_at(image, ph + 8)?,
                        vaddr: u64_at(image, ph + 16)?,
                        paddr: u64_at(image, ph + 24)?,
                        filesz: u64_at(image, ph + 32)?,
                        memsz: u64_at(image, ph + 40)?,
                    },
                ),
            })
        };
        let (p_type, seg) = read().ok_or_else(|| truncated("program header", ph, 32, image))?;
        if p_type != PT_LOAD {
            continue;
        }
        if seg
            .offset
            .checked_add(seg.filesz)
            .is_none_or(|end| end > image.len() as u64)
        {
            return Err(truncated("loadable segment", seg.offset, seg.filesz, image));
        }
        if seg.filesz > seg.memsz {
            return Err(LoadError::BadElf(format!(
                "segment at {:#x} has {:#x} file bytes but only {:#x} bytes in memory",
                seg.paddr, seg.filesz, seg.memsz
            )));
        }
        segments.push(seg);
    }
    if segments.iter().all(|s| s.memsz == 0) {
        return Err(LoadError::NoLoadableSegment);
    }
    Ok(ElfFile {
        class,
        machine,
        entry,
        segments,
    })
}

/// One section of an ELF file: where it is linked and its bytes in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section<'a> {
    /// `sh_addr`: the virtual address it is linked at.
    pub addr: u64,
    /// Its bytes in the file (empty for `SHT_NOBITS`).
    pub bytes: &'a [u8],
}

/// `sh_type` of a section without file bytes (`.bss`).
const SHT_NOBITS: u32 = 8;
/// `sh_flags` bit of a section that occupies memory at run time.
const SHF_ALLOC: u64 = 0x2;
/// `sh_flags` bit of a section that holds machine instructions.
const SHF_EXECINSTR: u64 = 0x4;

/// One entry of the section header table.
struct SectionHeader<'a> {
    name: &'a [u8],
    sh_type: u32,
    flags: u64,
    addr: u64,
    offset: u64,
    size: u64,
}

/// Every entry of the section header table, named through its string table.
/// `None` when the file has no section headers or headers that do not lie
/// inside `image`: sections are optional extras (the loaders need only the
/// program headers), so a damaged table is treated as absent. An entry
/// whose own fields or name cannot be read is left out.
fn section_headers(image: &[u8]) -> Option<Vec<SectionHeader<'_>>> {
    let (class, _) = ident(image).ok()?;
    let wide = class == Class::Elf64;
    let (shoff, shentsize, shnum, shstrndx) = if wide {
        (
            u64_at(image, 40)?,
            u16_at(image, 58)?,
            u16_at(image, 60)?,
            u16_at(image, 62)?,
        )
    } else {
        (
            u32_at(image, 32)?.into(),
            u16_at(image, 46)?,
            u16_at(image, 48)?,
            u16_at(image, 50)?,
        )
    };
    if shoff == 0 || shentsize != if wide { 64 } else { 40 } {
        return None;
    }
    // (name offset, type, flags, addr, offset, size) of header `i`.
    let header = |i: u16| -> Option<(u32, u32, u64, u64, u64, u64)> {
        let at = shoff.checked_add(u64::from(i) * u64::from(shentsize))?;
        Some(if wide {
            (
                u32_at(image, at)?,
                u32_at(image, at + 4)?,
                u64_at(image, at + 8)?,
                u64_at(image, at + 16)?,
                u64_at(image, at + 24)?,
                u64_at(image, at + 32)?,
            )
        } else {
            (
                u32_at(image, at)?,
                u32_at(image, at + 4)?,
                u32_at(image, at + 8)?.into(),
                u32_at(image, at + 12)?.into(),
                u32_at(image, at + 16)?.into(),
                u32_at(image, at + 20)?.into(),
            )
        })
    };
    let (_, _, _, _, str_off, str_size) = header(shstrndx)?;
    let strings = file_bytes(image, str_off, str_size)?;
    Some(
        (0..shnum)
            .filter_map(|i| {
                let (name_off, sh_type, flags, addr, offset, size) = header(i)?;
                let rest = strings.get(usize::try_from(name_off).ok()?..)?;
                let end = rest.iter().position(|&b| b == 0)?;
                Some(SectionHeader {
                    name: rest.get(..end)?,
                    sh_type,
                    flags,
                    addr,
                    offset,
                    size,
                })
            })
            .collect(),
    )
}

/// `size` bytes of the file at `offset`, if they lie inside it.
fn file_bytes(image: &[u8], offset: u64, size: u64) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    image.get(start..start.checked_add(usize::try_from(size).ok()?)?)
}

/// The section named `name`, found through the section header table and its
/// string table. `None` when the file has no section headers, no section of
/// that name, or headers that do not lie inside `image` (see
/// [`section_headers`]).
pub fn section<'a>(image: &'a [u8], name: &str) -> Option<Section<'a>> {
    section_headers(image)?
        .into_iter()
        .filter(|h| h.name == name.as_bytes())
        .find_map(|h| {
            let bytes = if h.sh_type == SHT_NOBITS {
                &[][..]
            } else {
                file_bytes(image, h.offset, h.size)?
            };
            Some(Section { addr: h.addr, bytes })
        })
}

/// The link-time address ranges `[start, end)` of the sections whose file
/// bytes are loaded but hold no instructions (`SHF_ALLOC` without
/// `SHF_EXECINSTR`: data and read-only data; `SHT_NOBITS` sections such as
/// `.bss` have no file bytes and are left out), in section table order. A
/// linker may put such sections in an executable segment: Linux's
/// `.rodata` shares the `R E` segment of `.text`, and `.init.data`, with
/// the real-mode trampoline that Linux copies below 1 MiB at boot, the
/// `RWE` segment of `.init.text`. Empty when the file has no readable
/// section headers.
pub fn data_ranges(image: &[u8]) -> Vec<(u64, u64)> {
    section_headers(image)
        .unwrap_or_default()
        .into_iter()
        .filter(|h| h.flags & SHF_ALLOC != 0 && h.flags & SHF_EXECINSTR == 0 && h.sh_type != SHT_NOBITS && h.size != 0)
        .filter_map(|h| Some((h.addr, h.addr.checked_add(h.size)?)))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One program header of a test image: `(p_type, paddr, vaddr, bytes, memsz, flags)`.
    pub(crate) type TestSegment<'a> = (u32, u64, u64, &'a [u8], u64, u32);

    /// Builds a little-endian ELF file with the given segments, their bytes
    /// following the headers in order.
    pub(crate) fn build(class: Class, machine: u16, entry: u64, segs: &[TestSegment]) -> Vec<u8> {
        let (ehsize, phsize) = match class {
            Class::Elf32 => (52usize, 32usize),
            Class::Elf64 => (64, 56),
        };
        let mut f = vec![0u8; ehsize + phsize * segs.len()];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = if class == Class::Elf32 { 1 } else { 2 };
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&machine.to_le_bytes());
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        let mut data_off = f.len() as u64;
        let put = |f: &mut Vec<u8>, off: usize, v: u64, wide: bool| {
            if wide {
                f[off..off + 8].copy_from_slice(&v.to_le_bytes());
            } else {
                f[off..off + 4].copy_from_slice(&(v as u32).to_le_bytes());
            }
        };
        let wide = class == Class::Elf64;
        if wide {
            put(&mut f, 24, entry, true);
            put(&mut f, 32, ehsize as u64, true);
            f[52..54].copy_from_slice(&(ehsize as u16).to_le_bytes());
            f[54..56].copy_from_slice(&(phsize as u16).to_le_bytes());
            f[56..58].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        } else {
            put(&mut f, 24, entry, false);
            put(&mut f, 28, ehsize as u64, false);
            f[40..42].copy_from_slice(&(ehsize as u16).to_le_bytes());
            f[42..44].copy_from_slice(&(phsize as u16).to_le_bytes());
            f[44..46].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        }
        let mut offsets = Vec::new();
        for (_, _, _, data, _, _) in segs {
            offsets.push(data_off);
            data_off += data.len() as u64;
        }
        for (i, &(p_type, paddr, vaddr, data, memsz, flags)) in segs.iter().enumerate() {
            let ph = ehsize + i * phsize;
            f[ph..ph + 4].copy_from_slice(&p_type.to_le_bytes());
            if wide {
                f[ph + 4..ph + 8].copy_from_slice(&flags.to_le_bytes());
                put(&mut f, ph + 8, offsets[i], true);
                put(&mut f, ph + 16, vaddr, true);
                put(&mut f, ph + 24, paddr, true);
                put(&mut f, ph + 32, data.len() as u64, true);
                put(&mut f, ph + 40, memsz, true);
                put(&mut f, ph + 48, 0x1000, true);
            } else {
                put(&mut f, ph + 4, offsets[i], false);
                put(&mut f, ph + 8, vaddr, false);
                put(&mut f, ph + 12, paddr, false);
                put(&mut f, ph + 16, data.len() as u64, false);
                put(&mut f, ph + 20, memsz, false);
                put(&mut f, ph + 24, u64::from(flags), false);
                put(&mut f, ph + 28, 0x1000, false);
            }
        }
        for (_, _, _, data, _, _) in segs {
            f.extend_from_slice(data);
        }
        f
    }

    /// One section header of a test image: `(name, sh_type, sh_flags, sh_addr, sh_offset, sh_size)`.
    pub(crate) type TestSection<'a> = (&'a str, u32, u64, u64, u64, u64);

    /// Appends a section header table with the given sections (after a null
    /// entry) and its string table to `image`, a file [`build`] made.
    pub(crate) fn with_sections(mut image: Vec<u8>, sections: &[TestSection]) -> Vec<u8> {
        let wide = image[4] == 2;
        let mut strings = vec![0u8];
        let mut names = Vec::new();
        for (name, ..) in sections.iter().copied().chain([(".shstrtab", 3, 0, 0, 0, 0)]) {
            names.push(strings.len() as u64);
            strings.extend_from_slice(name.as_bytes());
            strings.push(0);
        }
        let str_off = image.len() as u64;
        image.extend_from_slice(&strings);
        let shoff = image.len() as u64;
        let entry = |f: &mut Vec<u8>, name: u64, (t, flags, addr, off, size): (u32, u64, u64, u64, u64)| {
            let word = |f: &mut Vec<u8>, v: u64| {
                if wide {
                    f.extend_from_slice(&v.to_le_bytes());
                } else {
                    f.extend_from_slice(&(v as u32).to_le_bytes());
                }
            };
            f.extend_from_slice(&(name as u32).to_le_bytes());
            f.extend_from_slice(&t.to_le_bytes());
            word(f, flags);
            word(f, addr);
            word(f, off);
            word(f, size);
            // sh_link, sh_info, sh_addralign, sh_entsize.
            f.extend_from_slice(&[0; 8]);
            word(f, 1);
            word(f, 0);
        };
        entry(&mut image, 0, (0, 0, 0, 0, 0));
        for (i, &(_, t, flags, addr, off, size)) in sections.iter().enumerate() {
            entry(&mut image, names[i], (t, flags, addr, off, size));
        }
        entry(
            &mut image,
            names[sections.len()],
            (3, 0, 0, str_off, strings.len() as u64),
        );
        let count = sections.len() as u16 + 2;
        if wide {
            image[40..48].copy_from_slice(&shoff.to_le_bytes());
            image[58..60].copy_from_slice(&64u16.to_le_bytes());
            image[60..62].copy_from_slice(&count.to_le_bytes());
            image[62..64].copy_from_slice(&(count - 1).to_le_bytes());
        } else {
            image[32..36].copy_from_slice(&(shoff as u32).to_le_bytes());
            image[46..48].copy_from_slice(&40u16.to_le_bytes());
            image[48..50].copy_from_slice(&count.to_le_bytes());
            image[50..52].copy_from_slice(&(count - 1).to_le_bytes());
        }
        image
    }

    #[test]
    fn parses_both_classes() {
        for class in [Class::Elf32, Class::Elf64] {
            let img = build(
                class,
                EM_386,
                0x10_0010,
                &[
                    (PT_LOAD, 0x10_0000, 0xC010_0000, b"abcd", 0x20, PF_X),
                    (4, 0, 0, b"note", 4, 0),
                ],
            );
            let elf = parse(&img).unwrap();
            assert_eq!(elf.class, class);
            assert_eq!(elf.machine, EM_386);
            assert_eq!(elf.entry, 0x10_0010);
            assert_eq!(elf.segments.len(), 1, "only PT_LOAD is kept");
            let s = elf.segments[0];
            assert_eq!((s.paddr, s.vaddr, s.filesz, s.memsz), (0x10_0000, 0xC010_0000, 4, 0x20));
            assert_eq!(&img[s.offset as usize..][..4], b"abcd");
        }
    }

    #[test]
    fn rejects_truncation_and_nonsense() {
        let img = build(Class::Elf32, EM_386, 0, &[(PT_LOAD, 0x10_0000, 0, b"abcd", 4, 0)]);
        for cut in [3, 10, 30, 60, img.len() - 1] {
            assert!(
                matches!(parse(&img[..cut]), Err(LoadError::Truncated { .. })),
                "cut at {cut}"
            );
        }
        let mut bss_smaller = img.clone();
        bss_smaller[52 + 20..52 + 24].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(parse(&bss_smaller), Err(LoadError::BadElf(_))));
        let none = build(Class::Elf64, EM_X86_64, 0, &[(4, 0, 0, b"x", 1, 0)]);
        assert!(matches!(parse(&none), Err(LoadError::NoLoadableSegment)));
        let mut huge_phoff = img.clone();
        huge_phoff[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(parse(&huge_phoff), Err(LoadError::Truncated { .. })));
    }

    #[test]
    fn data_ranges_are_the_allocated_sections_without_code() {
        for class in [Class::Elf32, Class::Elf64] {
            let img = build(
                class,
                EM_386,
                0,
                &[(PT_LOAD, 0x10_0000, 0x10_0000, &[0x90; 0x40], 0x60, 7)],
            );
            let off = img.len() as u64 - 0x40;
            // (sh_type 1: PROGBITS, 8: NOBITS; flags 2: ALLOC, 4: EXECINSTR, 1: WRITE)
            let img = with_sections(
                img,
                &[
                    (".text", 1, 0x6, 0x10_0000, off, 0x10),
                    (".rodata", 1, 0x2, 0x10_0010, off + 0x10, 0x8),
                    (".data", 1, 0x3, 0x10_0018, off + 0x18, 0x18),
                    (".empty", 1, 0x3, 0x10_0030, off + 0x30, 0),
                    (".more.text", 1, 0x6, 0x10_0030, off + 0x30, 0x10),
                    (".bss", 8, 0x3, 0x10_0040, off + 0x40, 0x20),
                    (".comment", 1, 0x0, 0, off, 0x10),
                ],
            );
            assert_eq!(
                data_ranges(&img),
                [(0x10_0010, 0x10_0018), (0x10_0018, 0x10_0030)],
                "{class:?}"
            );
            assert_eq!(section(&img, ".more.text").unwrap().bytes, [0x90; 0x10]);
            assert_eq!(section(&img, ".bss").unwrap().bytes, [0u8; 0]);
        }
        let bare = build(Class::Elf64, EM_X86_64, 0, &[(PT_LOAD, 0, 0, &[0x90], 1, PF_X)]);
        assert!(data_ranges(&bare).is_empty(), "no section headers: no data ranges");
    }

    #[test]
    fn section_finds_named_sections_and_treats_damage_as_absence() {
        let image = nyx_guests::ALTINSTR;
        let alt = section(image, ".altinstructions").expect("the guest has .altinstructions");
        assert_eq!(alt.bytes.len(), 24, "two 12-byte entries");
        let repl = section(image, ".altinstr_replacement").unwrap();
        assert_eq!(repl.bytes, [0x0f, 0xae, 0xe8, 0x0f, 0x31, 0x0f, 0x01, 0xf9]);
        assert!(repl.addr >= 0x10_0000);
        assert_eq!(section(image, ".altinstr"), None, "whole names only");
        assert_eq!(section(image, "no such section"), None);
        // Cut the file inside its section header table.
        let shoff = u32_at(image, 32).unwrap() as usize;
        assert_eq!(section(&image[..shoff + 8], ".altinstructions"), None);
        let mut bad_size = image.to_vec();
        bad_size[46..48].copy_from_slice(&64u16.to_le_bytes());
        assert_eq!(
            section(&bad_size, ".altinstructions"),
            None,
            "64-byte entries in an ELF32 file"
        );
        // A file without section headers.
        let bare = build(Class::Elf64, EM_X86_64, 0, &[(PT_LOAD, 0, 0, &[0x90], 1, PF_X)]);
        assert_eq!(section(&bare, ".text"), None);
        assert_eq!(section(b"\x7fELF", ".text"), None);
    }
}
