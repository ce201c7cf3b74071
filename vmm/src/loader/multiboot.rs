//! Multiboot v1 loading as QEMU's `-kernel` does it (hw/i386/multiboot.c plus
//! its option ROM): ELF32 segments at their physical addresses, or the
//! header's a.out-kludge addresses when flag bit 16 is set; the initrd as
//! module 0, page-aligned after the kernel; and the multiboot_info, memory
//! map, command line and a flat GDT in a fixed low area (0x8000-0xFFFF) that
//! no kernel segment may overlap.

use vm_memory::{Bytes, GuestAddress};

use super::elf::{self, u32_at};
use super::{
    check_clear, check_ram, gdt, memory_map, page_up, ram_below_4g, write, zero, BootCpu, BootSetup, KernelFormat,
    LoadError, FOUR_GIB,
};
use crate::memory::GuestMemory;

/// Magic value of a Multiboot v1 header.
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// EAX at entry.
pub const BOOT_MAGIC: u32 = 0x2BAD_B002;
/// The header must lie entirely in this many first bytes of the file.
const SEARCH_LEN: usize = 8192;
/// Header flag: the a.out-kludge address fields are valid.
const FLAG_ADDRESSES: u32 = 1 << 16;
/// Header flag: the kernel wants a video mode (not supported, as in QEMU).
const FLAG_VIDEO: u32 = 1 << 2;

/// multiboot_info flags Nyx sets (those QEMU sets).
pub const INFO_FLAGS: u32 = INFO_MEMORY | INFO_BOOT_DEVICE | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME;
const INFO_MEMORY: u32 = 1 << 0;
const INFO_BOOT_DEVICE: u32 = 1 << 1;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const INFO_MMAP: u32 = 1 << 6;
const INFO_LOADER_NAME: u32 = 1 << 9;

/// Start and end of the low area that holds the loader's structures.
pub const AREA: (u64, u64) = (0x8000, 0x1_0000);
/// The GDT: null, null, code (selector 0x10), data (0x18), as in QEMU's option ROM.
pub const GDT_ADDR: u64 = 0x8000;
/// GDT limit (4 descriptors).
pub const GDT_LIMIT: u16 = 4 * 8 - 1;
/// The memory map (QEMU's address).
pub const MMAP_ADDR: u64 = 0x9000;
/// The multiboot_info (QEMU's address).
pub const INFO_ADDR: u64 = 0x9500;
/// The module list (one entry: the initrd).
pub const MODS_ADDR: u64 = 0x9600;
/// The boot loader name.
const LOADER_NAME_ADDR: u64 = 0x9700;
/// The string of module 0.
const MODULE_STRING_ADDR: u64 = 0x9710;
/// The kernel command line, up to the end of the area.
pub const CMDLINE_ADDR: u64 = 0xa000;
/// Boot loader name given to the kernel.
pub const LOADER_NAME: &str = "nyx";
/// String of the initrd module.
pub const MODULE_STRING: &str = "initrd";
/// Size of the multiboot_info structure.
const INFO_SIZE: usize = 88;

/// A Multiboot v1 header found in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Offset of the header in the file.
    pub offset: u64,
    /// Header flags.
    pub flags: u32,
    /// a.out kludge: address of the header itself.
    pub header_addr: u32,
    /// a.out kludge: where the text starts.
    pub load_addr: u32,
    /// a.out kludge: end of the data to load (0: to the end of the file).
    pub load_end_addr: u32,
    /// a.out kludge: end of the bss (0: no bss).
    pub bss_end_addr: u32,
    /// a.out kludge: entry point.
    pub entry_addr: u32,
}

impl Header {
    /// True when the a.out-kludge address fields are to be used.
    pub fn has_addresses(&self) -> bool {
        self.flags & FLAG_ADDRESSES != 0
    }
}

/// Finds a valid Multiboot v1 header (magic, checksum, 4-byte aligned, in
/// the first 8192 bytes). A header whose address fields run past the file
/// is an error.
pub fn find_header(image: &[u8]) -> Result<Option<Header>, LoadError> {
    let limit = image.len().min(SEARCH_LEN);
    let mut off = 0usize;
    while off + 12 <= limit {
        let at = |k: usize| u32_at(image, (off + k) as u64).unwrap_or(0);
        if at(0) == HEADER_MAGIC && at(0).wrapping_add(at(4)).wrapping_add(at(8)) == 0 {
            let flags = at(4);
            if flags & FLAG_ADDRESSES != 0 && off + 32 > image.len() {
                return Err(LoadError::Truncated {
                    what: "Multiboot header",
                    offset: off as u64,
                    len: 32,
                    file_len: image.len() as u64,
                });
            }
            return Ok(Some(Header {
                offset: off as u64,
                flags,
                header_addr: at(12),
                load_addr: at(16),
                load_end_addr: at(20),
                bss_end_addr: at(24),
                entry_addr: at(28),
            }));
        }
        off += 4;
    }
    Ok(None)
}

/// What the kernel loaders produce.
struct Loaded {
    entry: u64,
    kernel: (u64, u64),
    exec_ranges: Vec<(u64, u64)>,
}

/// Checks and writes one piece of the kernel: `bytes` at `addr`, then zeros
/// up to `memsz`.
fn place(mem: &GuestMemory, addr: u64, bytes: &[u8], memsz: u64) -> Result<(), LoadError> {
    if memsz == 0 {
        return Ok(());
    }
    let end = addr.saturating_add(memsz);
    if end > FOUR_GIB {
        return Err(LoadError::OutsideRam {
            what: "kernel segment (a Multiboot kernel runs below 4 GiB)",
            start: addr,
            end,
        });
    }
    check_ram(mem, "kernel segment", addr, memsz)?;
    check_clear(addr, memsz, AREA)?;
    write(mem, "kernel segment", addr, bytes)?;
    zero(mem, "kernel bss", addr + bytes.len() as u64, memsz - bytes.len() as u64)
}

/// Loads the text and bss described by the a.out-kludge fields.
fn load_kludge(mem: &GuestMemory, image: &[u8], h: &Header) -> Result<Loaded, LoadError> {
    let bad = |m: &str| Err(LoadError::BadMultiboot(m.into()));
    let (load, header_addr) = (u64::from(h.load_addr), u64::from(h.header_addr));
    if header_addr < load {
        return bad("header_addr lies below load_addr");
    }
    let Some(text_offset) = h.offset.checked_sub(header_addr - load) else {
        return bad("header_addr - load_addr is larger than the header's file offset");
    };
    let file_len = image.len() as u64;
    let load_size = if h.load_end_addr != 0 {
        let Some(size) = u64::from(h.load_end_addr).checked_sub(load) else {
            return bad("load_end_addr lies below load_addr");
        };
        size
    } else {
        file_len.saturating_sub(text_offset)
    };
    if text_offset + load_size > file_len {
        return Err(LoadError::Truncated {
            what: "Multiboot text (load_addr..load_end_addr)",
            offset: text_offset,
            len: load_size,
            file_len,
        });
    }
    let mem_size = if h.bss_end_addr != 0 {
        let Some(size) = u64::from(h.bss_end_addr).checked_sub(load) else {
            return bad("bss_end_addr lies below load_addr");
        };
        if size < load_size {
            return bad("bss_end_addr lies below load_end_addr");
        }
        size
    } else {
        load_size
    };
    // Bounds were checked just above.
    let text = &image[text_offset as usize..(text_offset + load_size) as usize];
    place(mem, load, text, mem_size)?;
    Ok(Loaded {
        entry: h.entry_addr.into(),
        kernel: (load, load + mem_size),
        exec_ranges: vec![(load, load_size)],
    })
}

/// Loads every PT_LOAD segment of an ELF32 image at its physical address.
fn load_elf32(mem: &GuestMemory, image: &[u8]) -> Result<Loaded, LoadError> {
    let file = elf::parse(image)?;
    if file.class != elf::Class::Elf32 {
        return Err(LoadError::BadMultiboot(
            "an x86-64 ELF Multiboot kernel needs the header's address fields (flag bit 16); \
             give a 32-bit ELF instead"
                .into(),
        ));
    }
    let mut entry = file.entry;
    let mut kernel = (u64::MAX, 0u64);
    let mut exec_ranges = Vec::new();
    for s in &file.segments {
        // `parse` checked that the bytes lie inside the file.
        let bytes = &image[s.offset as usize..(s.offset + s.filesz) as usize];
        place(mem, s.paddr, bytes, s.memsz)?;
        if s.memsz > 0 {
            kernel = (kernel.0.min(s.paddr), kernel.1.max(s.paddr + s.memsz));
        }
        if s.flags & elf::PF_X != 0 && s.filesz > 0 {
            exec_ranges.push((s.paddr, s.filesz));
            // e_entry is virtual: move it to where the segment was loaded.
            if s.vaddr != s.paddr && (s.vaddr..s.vaddr + s.filesz).contains(&file.entry) {
                entry = file.entry - s.vaddr + s.paddr;
            }
        }
    }
    Ok(Loaded {
        entry,
        kernel,
        exec_ranges,
    })
}

/// Loads a Multiboot v1 kernel with `initrd` as module 0 and `cmdline` as its command line.
pub fn load(mem: &GuestMemory, image: &[u8], initrd: Option<&[u8]>, cmdline: &str) -> Result<BootSetup, LoadError> {
    let header = find_header(image)?;
    let cmdline_max = AREA.1 - CMDLINE_ADDR;
    if cmdline.len() as u64 + 1 > cmdline_max {
        return Err(LoadError::BadCmdline(format!(
            "it is {} bytes long; a Multiboot command line holds at most {}",
            cmdline.len(),
            cmdline_max - 1
        )));
    }
    let loaded = match header {
        Some(h) if h.has_addresses() => load_kludge(mem, image, &h)?,
        _ if elf::has_magic(image) => load_elf32(mem, image)?,
        _ => {
            return Err(LoadError::BadMultiboot(
                "the header has no load addresses (flag bit 16) and the file is not an ELF image".into(),
            ))
        }
    };
    if header.is_some_and(|h| h.flags & FLAG_VIDEO != 0) {
        tracing::warn!("the Multiboot kernel asks for a video mode; Nyx does not set one");
    }

    let initrd_range = match initrd {
        Some(data) => {
            let start = page_up(loaded.kernel.1);
            let len = data.len() as u64;
            let fits = start.checked_add(len).is_some_and(|end| end <= FOUR_GIB);
            if !fits || check_ram(mem, "initrd", start, len).is_err() {
                return Err(LoadError::InitrdTooLarge { size: len });
            }
            check_clear(start, len, AREA)?;
            write(mem, "initrd", start, data)?;
            Some((start, len))
        }
        None => None,
    };

    write_info(mem, cmdline, initrd_range)?;
    Ok(BootSetup {
        format: KernelFormat::Multiboot,
        entry: loaded.entry,
        kernel: loaded.kernel,
        initrd: initrd_range,
        boot_info: INFO_ADDR,
        cmdline: CMDLINE_ADDR,
        cpu: BootCpu::Protected32 {
            gdt_base: GDT_ADDR,
            eax: BOOT_MAGIC,
            ebx: INFO_ADDR as u32,
        },
        exec_ranges: loaded.exec_ranges,
    })
}

/// Writes the GDT, memory map, strings, module list and multiboot_info.
fn write_info(mem: &GuestMemory, cmdline: &str, initrd: Option<(u64, u64)>) -> Result<(), LoadError> {
    let gdt_table = [
        0u64,
        0,
        gdt::entry(gdt::CODE32, 0, 0xfffff),
        gdt::entry(gdt::DATA, 0, 0xfffff),
    ];
    let gdt_bytes: Vec<u8> = gdt_table.iter().flat_map(|d| d.to_le_bytes()).collect();
    write(mem, "GDT", GDT_ADDR, &gdt_bytes)?;

    let mut mmap = Vec::new();
    for e in memory_map(mem) {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&e.addr.to_le_bytes());
        mmap.extend_from_slice(&e.len.to_le_bytes());
        mmap.extend_from_slice(&e.kind.to_le_bytes());
    }
    write(mem, "memory map", MMAP_ADDR, &mmap)?;

    let cstr = |s: &str| [s.as_bytes(), &[0]].concat();
    write(mem, "command line", CMDLINE_ADDR, &cstr(cmdline))?;
    write(mem, "boot loader name", LOADER_NAME_ADDR, &cstr(LOADER_NAME))?;

    let mut mods_count = 0u32;
    if let Some((start, len)) = initrd {
        write(mem, "module string", MODULE_STRING_ADDR, &cstr(MODULE_STRING))?;
        // The initrd was checked to end below 4 GiB.
        let entry = [start as u32, (start + len) as u32, MODULE_STRING_ADDR as u32, 0];
        let bytes: Vec<u8> = entry.iter().flat_map(|v| v.to_le_bytes()).collect();
        write(mem, "module list", MODS_ADDR, &bytes)?;
        mods_count = 1;
    }

    // As QEMU's firmware reports them: KiB below the EBDA, and KiB of
    // contiguous usable RAM from 1 MiB.
    let mem_upper = (ram_below_4g(mem).saturating_sub(super::FIRMWARE_RESERVED) / 1024).saturating_sub(1024);
    let mut info = [0u8; INFO_SIZE];
    let mut put = |off: usize, v: u32| info[off..off + 4].copy_from_slice(&v.to_le_bytes());
    put(0, INFO_FLAGS);
    put(4, (super::EBDA_START / 1024) as u32);
    put(8, u32::try_from(mem_upper).unwrap_or(u32::MAX));
    put(12, 0x8000_ffff);
    put(16, CMDLINE_ADDR as u32);
    put(20, mods_count);
    put(24, MODS_ADDR as u32);
    put(44, mmap.len() as u32);
    put(48, MMAP_ADDR as u32);
    put(64, LOADER_NAME_ADDR as u32);
    mem.write_slice(&info, GuestAddress(INFO_ADDR))
        .map_err(|source| LoadError::Memory {
            what: "multiboot_info",
            addr: INFO_ADDR,
            source,
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::loader::elf::tests::build;
    use crate::loader::elf::{Class, EM_386, PF_X};
    use crate::memory;
    use proptest::prelude::*;

    /// A 12-byte Multiboot header with `flags` and a valid checksum.
    pub(crate) fn header(flags: u32) -> Vec<u8> {
        let sum = 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags);
        [HEADER_MAGIC, flags, sum]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    /// A Multiboot ELF32 kernel: text at 1 MiB (linked at 3 GiB + 1 MiB, like
    /// a higher-half kernel), and a data segment with bss at 1 MiB + 8 KiB.
    pub(crate) fn elf_kernel() -> Vec<u8> {
        let mut text = header(0);
        text.extend_from_slice(&[0xf4; 20]); // hlt
        build(
            Class::Elf32,
            EM_386,
            0xC010_000C,
            &[
                (1, 0x10_0000, 0xC010_0000, &text, text.len() as u64, PF_X | 4),
                (1, 0x10_2000, 0xC010_2000, b"DATA", 0x3000, 6),
            ],
        )
    }

    fn read_u32(mem: &GuestMemory, addr: u64) -> u32 {
        mem.read_obj::<u32>(GuestAddress(addr)).unwrap()
    }

    fn read_cstr(mem: &GuestMemory, addr: u64) -> String {
        let mut s = Vec::new();
        for a in addr.. {
            let b: u8 = mem.read_obj(GuestAddress(a)).unwrap();
            if b == 0 {
                break;
            }
            s.push(b);
        }
        String::from_utf8(s).unwrap()
    }

    #[test]
    fn loads_an_elf32_kernel_with_its_info() {
        let mem = memory::create(64).unwrap();
        mem.write_slice(&[0xaa; 16], GuestAddress(0x10_2004)).unwrap(); // stale bss
        let image = elf_kernel();
        let initrd = b"an initrd of some bytes";
        let setup = crate::loader::load(&mem, &image, Some(initrd), "console=ttyS0 hello").unwrap();
        assert_eq!(setup.format, KernelFormat::Multiboot);
        assert_eq!(setup.entry, 0x10_000C, "virtual entry moved to the physical segment");
        assert_eq!(setup.kernel, (0x10_0000, 0x10_5000));
        let text_len = 12 + 20;
        assert_eq!(setup.exec_ranges, vec![(0x10_0000, text_len)]);
        assert_eq!(read_u32(&mem, 0x10_0000), HEADER_MAGIC);
        assert_eq!(read_u32(&mem, 0x10_2000), u32::from_le_bytes(*b"DATA"));
        assert_eq!(read_u32(&mem, 0x10_2004), 0, "bss is zeroed");

        let info = INFO_ADDR;
        assert_eq!(setup.boot_info, info);
        assert_eq!(read_u32(&mem, info), 0x24f);
        assert_eq!(read_u32(&mem, info + 4), 639);
        assert_eq!(read_u32(&mem, info + 8), 64 * 1024 - 1024 - 128);
        assert_eq!(read_u32(&mem, info + 12), 0x8000_ffff);
        assert_eq!(read_cstr(&mem, read_u32(&mem, info + 16).into()), "console=ttyS0 hello");
        assert_eq!(read_cstr(&mem, read_u32(&mem, info + 64).into()), "nyx");

        assert_eq!(read_u32(&mem, info + 20), 1);
        let m = u64::from(read_u32(&mem, info + 24));
        let (start, end) = (read_u32(&mem, m), read_u32(&mem, m + 4));
        assert_eq!(start, 0x10_5000, "page-aligned after the kernel's bss");
        assert_eq!(end - start, initrd.len() as u32);
        assert_eq!(setup.initrd, Some((0x10_5000, initrd.len() as u64)));
        assert_eq!(read_cstr(&mem, read_u32(&mem, m + 8).into()), "initrd");
        let mut back = vec![0u8; initrd.len()];
        mem.read_slice(&mut back, GuestAddress(start.into())).unwrap();
        assert_eq!(&back, initrd);

        let (len, addr) = (read_u32(&mem, info + 44), u64::from(read_u32(&mem, info + 48)));
        assert_eq!(len, 5 * 24);
        let entry = |i: u64| {
            let e = addr + i * 24;
            let lo = |o| u64::from(read_u32(&mem, e + o));
            (
                read_u32(&mem, e),
                lo(4) | lo(8) << 32,
                lo(12) | lo(16) << 32,
                read_u32(&mem, e + 20),
            )
        };
        assert_eq!(entry(0), (20, 0, 0x9_fc00, 1));
        assert_eq!(entry(1), (20, 0x9_fc00, 0x400, 2));
        assert_eq!(entry(2), (20, 0xf_0000, 0x1_0000, 2));
        assert_eq!(entry(3), (20, 0x10_0000, (64 << 20) - 0x10_0000 - 0x2_0000, 1));
        assert_eq!(entry(4), (20, (64 << 20) - 0x2_0000, 0x2_0000, 2));

        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(GDT_ADDR + 0x10)).unwrap(),
            0x00cf_9b00_0000_ffff
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(GDT_ADDR + 0x18)).unwrap(),
            0x00cf_9300_0000_ffff
        );
    }

    #[test]
    fn without_initrd_there_is_no_module() {
        let mem = memory::create(64).unwrap();
        let setup = load(&mem, &elf_kernel(), None, "").unwrap();
        assert_eq!(setup.initrd, None);
        assert_eq!(read_u32(&mem, INFO_ADDR + 20), 0);
        assert_eq!(read_cstr(&mem, CMDLINE_ADDR), "");
    }

    /// An a.out-kludge kernel: 0x40 bytes of padding, the header at file
    /// offset 0x40, loaded so that file offset 0 lands at 2 MiB.
    fn kludge_kernel(load_end: u32, bss_end: u32) -> Vec<u8> {
        let mut img = vec![0x90u8; 0x40];
        img.extend_from_slice(&header(FLAG_ADDRESSES));
        for v in [0x20_0040u32, 0x20_0000, load_end, bss_end, 0x20_0060] {
            img.extend_from_slice(&v.to_le_bytes());
        }
        img.resize(0x100, 0xcc);
        img
    }

    #[test]
    fn loads_the_aout_kludge() {
        let mem = memory::create(64).unwrap();
        let setup = load(&mem, &kludge_kernel(0, 0x20_2000), None, "x").unwrap();
        assert_eq!(setup.entry, 0x20_0060);
        assert_eq!(setup.kernel, (0x20_0000, 0x20_2000));
        assert_eq!(setup.exec_ranges, vec![(0x20_0000, 0x100)]);
        assert_eq!(read_u32(&mem, 0x20_0040), HEADER_MAGIC);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x20_00ff)).unwrap(), 0xcc);

        let short = load(&mem, &kludge_kernel(0x20_0080, 0), None, "").unwrap();
        assert_eq!(short.kernel, (0x20_0000, 0x20_0080));

        for (end, bss) in [(0x20_1000, 0), (0x1f_0000, 0), (0x20_0080, 0x20_0010)] {
            let err = load(&mem, &kludge_kernel(end, bss), None, "").unwrap_err();
            assert!(
                matches!(err, LoadError::Truncated { .. } | LoadError::BadMultiboot(_)),
                "{err}"
            );
        }
        let mut no_room = kludge_kernel(0, 0);
        no_room[0x40 + 12..0x40 + 16].copy_from_slice(&0x30_0000u32.to_le_bytes());
        assert!(matches!(
            load(&mem, &no_room, None, ""),
            Err(LoadError::BadMultiboot(_))
        ));
    }

    #[test]
    fn header_search_follows_the_spec() {
        let mut img = vec![0u8; 8192];
        img[8192 - 12..].copy_from_slice(&header(0));
        assert_eq!(find_header(&img).unwrap().unwrap().offset, 8192 - 12);
        let mut late = vec![0u8; 8192 + 12];
        late[8192..].copy_from_slice(&header(0));
        assert_eq!(find_header(&late).unwrap(), None, "beyond 8192 bytes");
        let mut unaligned = vec![0u8; 64];
        unaligned[2..14].copy_from_slice(&header(0));
        assert_eq!(find_header(&unaligned).unwrap(), None);
        let mut bad_sum = header(0);
        bad_sum[8] ^= 1;
        assert_eq!(find_header(&bad_sum).unwrap(), None);
        assert!(matches!(
            find_header(&header(FLAG_ADDRESSES)),
            Err(LoadError::Truncated { .. })
        ));
    }

    #[test]
    fn rejects_segments_outside_ram_or_over_the_info_area() {
        let mem = memory::create(64).unwrap();
        let text = header(0);
        for (paddr, memsz) in [(0x400_0000u64, 16u64), (0x3ff_fff0, 0x20), (0xFFFF_FFF0, 0x20)] {
            let img = build(Class::Elf32, EM_386, paddr, &[(1, paddr, paddr, &text, memsz, PF_X)]);
            let err = load(&mem, &img, None, "").unwrap_err();
            assert!(matches!(err, LoadError::OutsideRam { .. }), "{paddr:#x}: {err}");
        }
        let img = build(Class::Elf32, EM_386, 0x9000, &[(1, 0x9000, 0x9000, &text, 12, PF_X)]);
        let err = load(&mem, &img, None, "").unwrap_err();
        assert!(matches!(err, LoadError::Overlap { area_start: 0x8000, .. }), "{err}");
        assert!(err.to_string().contains("0x9000"));

        let mut cut = elf_kernel();
        cut.truncate(cut.len() - 2);
        assert!(matches!(load(&mem, &cut, None, ""), Err(LoadError::Truncated { .. })));

        let big = vec![0u8; 64 << 20];
        assert!(matches!(
            load(&mem, &elf_kernel(), Some(&big), ""),
            Err(LoadError::InitrdTooLarge { .. })
        ));
        let long = "x".repeat(0x6000);
        assert!(matches!(
            load(&mem, &elf_kernel(), None, &long),
            Err(LoadError::BadCmdline(_))
        ));
    }

    /// Applies `(position, byte)` mutations to `image`.
    fn mutate(mut image: Vec<u8>, edits: &[(usize, u8)]) -> Vec<u8> {
        for &(pos, b) in edits {
            let len = image.len();
            image[pos % len] = b;
        }
        image
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mem = memory::create(4).unwrap();
            let _ = crate::loader::load(&mem, &bytes, Some(b"rd"), "c");
        }

        #[test]
        fn mutated_images_never_panic(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..12),
            truncate in any::<usize>(),
            kludge in any::<bool>(),
        ) {
            let mem = memory::create(4).unwrap();
            let base = if kludge { kludge_kernel(0, 0x20_2000) } else { elf_kernel() };
            let mut image = mutate(base, &edits);
            if truncate % 3 == 0 {
                image.truncate(truncate % (image.len() + 1));
            }
            let _ = crate::loader::load(&mem, &image, Some(b"rd"), "c");
        }

        #[test]
        fn mutated_headers_never_panic(
            fields in proptest::collection::vec(any::<u32>(), 5),
            offset in 0usize..64,
        ) {
            // Random a.out-kludge addresses behind a valid header.
            let mem = memory::create(4).unwrap();
            let mut img = vec![0u8; offset * 4];
            img.extend_from_slice(&header(FLAG_ADDRESSES));
            for v in &fields {
                img.extend_from_slice(&v.to_le_bytes());
            }
            img.resize(img.len() + 64, 0x90);
            let _ = crate::loader::load(&mem, &img, Some(b"rd"), "c");
        }
    }
}
