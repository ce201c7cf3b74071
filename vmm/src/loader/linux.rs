//! Linux boot through linux-loader, with the x86-64 64-bit boot protocol set
//! up the way Firecracker does it: the kernel (bzImage or vmlinux ELF) from
//! 1 MiB up, boot_params (the "zero page") at 0x7000 with the setup header,
//! command line, initrd and e820 map, a GDT and an empty IDT at 0x500,
//! identity-mapped page tables for the first 4 GiB (2 MiB pages) at 0x9000,
//! and the vCPU entering in long mode with RSI pointing at boot_params.

use std::io::Cursor;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{self, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::{
    check_clear, check_ram, elf, gdt, memory_map, page_up, ram_end_from, write, zero, BootCpu, BootSetup, KernelFormat,
    LoadError, HIMEM_START,
};
use crate::memory::GuestMemory;

/// The GDT (null, 64-bit code 0x08, data 0x10, TSS 0x18).
pub const GDT_ADDR: u64 = 0x500;
/// The IDT (one zero descriptor: any exception before the kernel's own IDT is fatal).
pub const IDT_ADDR: u64 = 0x520;
/// boot_params.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// RSP and RBP at entry.
pub const BOOT_STACK: u64 = 0x8ff0;
/// The PML4; the PDPT and four page directories follow it.
pub const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
/// The command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line, NUL included (the x86 kernel's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX: usize = 2048;
/// Start and end of the low area the loader's structures occupy.
pub const AREA: (u64, u64) = (GDT_ADDR, CMDLINE_ADDR + CMDLINE_MAX as u64);
/// Offset of the 64-bit entry point from the start of a loaded bzImage.
const BZIMAGE_ENTRY_64: u64 = 0x200;
/// Setup header offset in a bzImage.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// `xloadflags` bit: the kernel has the 64-bit entry point.
const XLF_KERNEL_64: u16 = 1;
/// `loadflags` bit: the protected-mode part loads at 1 MiB.
const LOADED_HIGH: u8 = 1;
const HDRS_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG: u16 = 0xaa55;
/// `type_of_loader` of a loader without an assigned id.
pub const LOADER_OTHER: u8 = 0xff;
/// Alignment written in the otherwise empty setup header of an ELF kernel.
const ELF_KERNEL_ALIGNMENT: u32 = 0x100_0000;

/// The boot GDT of the 64-bit protocol.
pub fn gdt_table() -> [u64; 4] {
    [
        0,
        gdt::entry(gdt::CODE64, 0, 0xfffff),
        gdt::entry(gdt::DATA, 0, 0xfffff),
        gdt::entry(gdt::TSS64, 0, 0xfffff),
    ]
}

/// Reads the setup header of a bzImage.
fn read_setup_header(image: &[u8]) -> Result<setup_header, LoadError> {
    let mut hdr = setup_header::default();
    let len = hdr.as_slice().len();
    let bytes = image
        .get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + len)
        .ok_or(LoadError::Truncated {
            what: "bzImage setup header",
            offset: SETUP_HEADER_OFFSET as u64,
            len: len as u64,
            file_len: image.len() as u64,
        })?;
    hdr.as_mut_slice().copy_from_slice(bytes);
    Ok(hdr)
}

/// Loads a bzImage at its `code32_start` (1 MiB) for the 64-bit entry.
pub fn load_bzimage(
    mem: &GuestMemory,
    image: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
) -> Result<BootSetup, LoadError> {
    let hdr = read_setup_header(image)?;
    let (version, xloadflags) = (hdr.version, hdr.xloadflags);
    if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LoadError::NoLongModeEntry { version });
    }
    if hdr.loadflags & LOADED_HIGH == 0 {
        return Err(LoadError::Linux(loader::Error::Bzimage(
            loader::bzimage::Error::InvalidBzImage,
        )));
    }
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let setup_len = (setup_sects + 1) * 512;
    let payload = (image.len() as u64)
        .checked_sub(setup_len)
        .filter(|&n| n > 0)
        .ok_or(LoadError::Truncated {
            what: "bzImage setup code",
            offset: 0,
            len: setup_len,
            file_len: image.len() as u64,
        })?;
    let start = u64::from(hdr.code32_start);
    check_ram(mem, "bzImage kernel", start, payload)?;
    check_clear(start, payload, AREA)?;

    let loaded = loader::BzImage::load(mem, None, &mut Cursor::new(image), Some(GuestAddress(HIMEM_START)))
        .map_err(LoadError::Linux)?;
    let hdr = loaded.setup_header.unwrap_or(hdr);
    let entry = loaded.kernel_load.0 + BZIMAGE_ENTRY_64;

    // Keep the initrd clear of the memory the kernel decompresses into.
    let mut busy_end = loaded.kernel_end;
    if version >= 0x020a {
        let (pref, init_size) = (hdr.pref_address, hdr.init_size);
        busy_end = busy_end.max(pref.saturating_add(init_size.into()));
    }
    let initrd_max = if version >= 0x0203 {
        u64::from(hdr.initrd_addr_max)
    } else {
        0x37ff_ffff
    };
    finish(
        mem,
        KernelFormat::LinuxBzImage,
        hdr,
        entry,
        (loaded.kernel_load.0, loaded.kernel_end),
        busy_end,
        Vec::new(),
        initrd.map(|d| (d, initrd_max)),
        cmdline,
    )
}

/// Loads an x86-64 vmlinux ELF at its physical addresses.
pub fn load_elf(mem: &GuestMemory, image: &[u8], initrd: Option<&[u8]>, cmdline: &str) -> Result<BootSetup, LoadError> {
    let file = elf::parse(image)?;
    if (file.class, file.machine) != (elf::Class::Elf64, elf::EM_X86_64) {
        return Err(LoadError::UnsupportedElf {
            class: if file.class == elf::Class::Elf32 {
                "ELF32"
            } else {
                "ELF64"
            },
            machine: file.machine,
        });
    }
    if file.entry < HIMEM_START {
        return Err(LoadError::BadElf(format!(
            "entry point {:#x} lies below 1 MiB; a vmlinux enters at its physical load address",
            file.entry
        )));
    }
    let mut kernel = (u64::MAX, 0u64);
    let mut exec_ranges = Vec::new();
    for s in &file.segments {
        check_ram(mem, "kernel segment", s.paddr, s.memsz)?;
        check_clear(s.paddr, s.memsz, AREA)?;
        if s.memsz > 0 {
            kernel = (kernel.0.min(s.paddr), kernel.1.max(s.paddr + s.memsz));
        }
        if s.flags & elf::PF_X != 0 && s.filesz > 0 {
            exec_ranges.push((s.paddr, s.filesz));
        }
    }
    let loaded = loader::Elf::load(mem, None, &mut Cursor::new(image), Some(GuestAddress(HIMEM_START)))
        .map_err(LoadError::Linux)?;
    for s in &file.segments {
        zero(mem, "kernel bss", s.paddr + s.filesz, s.memsz - s.filesz)?;
    }
    let hdr = setup_header {
        kernel_alignment: ELF_KERNEL_ALIGNMENT,
        ..Default::default()
    };
    finish(
        mem,
        KernelFormat::LinuxElf,
        hdr,
        loaded.kernel_load.0,
        kernel,
        kernel.1,
        exec_ranges,
        initrd.map(|d| (d, u64::from(u32::MAX))),
        cmdline,
    )
}

/// Writes the command line, initrd, boot_params, GDT, IDT and page tables.
#[allow(clippy::too_many_arguments)]
fn finish(
    mem: &GuestMemory,
    format: KernelFormat,
    mut hdr: setup_header,
    entry: u64,
    kernel: (u64, u64),
    busy_end: u64,
    exec_ranges: Vec<(u64, u64)>,
    initrd: Option<(&[u8], u64)>,
    cmdline: &str,
) -> Result<BootSetup, LoadError> {
    if let Some(c) = cmdline.chars().find(|c| !matches!(c, ' '..='~')) {
        return Err(LoadError::BadCmdline(format!(
            "it contains {c:?}; a Linux command line is printable ASCII"
        )));
    }
    let cl = Cmdline::try_from(cmdline, CMDLINE_MAX)
        .map_err(|e| LoadError::BadCmdline(format!("{e} (at most {} bytes)", CMDLINE_MAX - 1)))?;
    let cmdline_len = cl
        .as_cstring()
        .map_err(|e| LoadError::BadCmdline(e.to_string()))?
        .as_bytes_with_nul()
        .len();
    loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl).map_err(LoadError::Linux)?;

    let initrd_range = match initrd {
        Some((data, addr_max)) => Some(place_initrd(mem, data, addr_max, busy_end)?),
        None => None,
    };

    hdr.type_of_loader = LOADER_OTHER;
    hdr.boot_flag = BOOT_FLAG;
    hdr.header = HDRS_MAGIC;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, len)) = initrd_range {
        // `place_initrd` keeps both below 4 GiB.
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = len as u32;
    }
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    // The map has three fixed entries plus one per RAM region (at most two),
    // far below the table's 128 slots.
    let map = memory_map(mem);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        slot.addr = e.addr;
        slot.size = e.len;
        slot.r#type = e.kind;
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|source| LoadError::Memory {
            what: "boot_params",
            addr: ZERO_PAGE_ADDR,
            source,
        })?;

    let gdt_bytes: Vec<u8> = gdt_table().iter().flat_map(|d| d.to_le_bytes()).collect();
    write(mem, "GDT", GDT_ADDR, &gdt_bytes)?;
    write(mem, "IDT", IDT_ADDR, &[0; 8])?;
    write_page_tables(mem)?;

    Ok(BootSetup {
        format,
        entry,
        kernel,
        initrd: initrd_range,
        boot_info: ZERO_PAGE_ADDR,
        cmdline: CMDLINE_ADDR,
        cpu: BootCpu::Long64 {
            gdt_base: GDT_ADDR,
            idt_base: IDT_ADDR,
            cr3: PML4_ADDR,
            rsi: ZERO_PAGE_ADDR,
            rsp: BOOT_STACK,
        },
        exec_ranges,
    })
}

/// Places the initrd page-aligned at the top of low RAM (below `addr_max`),
/// above everything the kernel occupies up to `busy_end`.
/// Tells a loaded Linux kernel where the ACPI tables are: the RSDP's
/// address in `boot_params.acpi_rsdp_addr` and an ACPI NVS entry for the
/// tables' range in its e820 map (the FACS, which the OS writes its waking
/// vector into, lives there).
pub fn add_acpi(mem: &GuestMemory, rsdp: u64, reserved: std::ops::Range<u64>) -> Result<(), LoadError> {
    let err = |source| LoadError::Memory {
        what: "boot_params",
        addr: ZERO_PAGE_ADDR,
        source,
    };
    let mut params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).map_err(err)?;
    params.acpi_rsdp_addr = rsdp;
    let n = usize::from(params.e820_entries);
    if let Some(slot) = params.e820_table.get_mut(n) {
        slot.addr = reserved.start;
        slot.size = reserved.end - reserved.start;
        slot.r#type = crate::acpi::E820_ACPI_NVS;
        params.e820_entries += 1;
    }
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR)).map_err(err)
}

fn place_initrd(mem: &GuestMemory, data: &[u8], addr_max: u64, busy_end: u64) -> Result<(u64, u64), LoadError> {
    let len = data.len() as u64;
    let too_large = LoadError::InitrdTooLarge { size: len };
    let top = ram_end_from(mem, 0)
        .saturating_sub(super::FIRMWARE_RESERVED)
        .min(addr_max.saturating_add(1));
    let start = top.checked_sub(len).ok_or(too_large)? & !0xfff;
    if start < page_up(busy_end).max(AREA.1) {
        return Err(LoadError::InitrdTooLarge { size: len });
    }
    write(mem, "initrd", start, data)?;
    Ok((start, len))
}

/// Identity-maps the first 4 GiB with 2 MiB pages.
fn write_page_tables(mem: &GuestMemory) -> Result<(), LoadError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    let mut pml4 = [0u8; 4096];
    pml4[..8].copy_from_slice(&(PDPT_ADDR | PRESENT_RW).to_le_bytes());
    write(mem, "page tables", PML4_ADDR, &pml4)?;
    let mut pdpt = [0u8; 4096];
    for i in 0..4u64 {
        let pd = PD_ADDR + i * 0x1000;
        pdpt[i as usize * 8..][..8].copy_from_slice(&(pd | PRESENT_RW).to_le_bytes());
        let mut table = [0u8; 4096];
        for (j, slot) in table.chunks_exact_mut(8).enumerate() {
            let frame = ((i << 9) + j as u64) << 21;
            slot.copy_from_slice(&(frame | PRESENT_RW | HUGE).to_le_bytes());
        }
        write(mem, "page tables", pd, &table)?;
    }
    write(mem, "page tables", PDPT_ADDR, &pdpt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::elf::tests::build;
    use crate::memory;

    /// A minimal bzImage: 4 setup sectors, then `payload` bytes of "kernel".
    fn fake_bzimage(version: u16, xloadflags: u16, payload: usize) -> Vec<u8> {
        let mut img = vec![0u8; 5 * 512 + payload];
        img[0x1f1] = 4;
        img[0x1fe..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x211] = LOADED_HIGH;
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes());
        img[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        img[0x260..0x264].copy_from_slice(&0x80_0000u32.to_le_bytes());
        img[5 * 512] = 0xe9;
        img
    }

    fn params(mem: &GuestMemory) -> boot_params {
        mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap()
    }

    fn read_u64(mem: &GuestMemory, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Checks the boot_params, tables and registers every Linux load must produce.
    pub(crate) fn check_common(mem: &GuestMemory, setup: &BootSetup, cmdline: &str, initrd: &[u8]) {
        let p = params(mem);
        let hdr = p.hdr;
        assert_eq!(hdr.type_of_loader, LOADER_OTHER);
        assert_eq!({ hdr.boot_flag }, BOOT_FLAG);
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ hdr.cmdline_size } as usize, cmdline.len() + 1);
        let mut back = vec![0u8; cmdline.len() + 1];
        mem.read_slice(&mut back, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&back[..cmdline.len()], cmdline.as_bytes());
        assert_eq!(back[cmdline.len()], 0);

        let (ramdisk, ramdisk_size) = (hdr.ramdisk_image, hdr.ramdisk_size);
        assert_eq!(setup.initrd, Some((u64::from(ramdisk), initrd.len() as u64)));
        assert_eq!(ramdisk_size as usize, initrd.len());
        assert_eq!(ramdisk % 4096, 0);
        let usable_end = (64 << 20) - crate::loader::FIRMWARE_RESERVED;
        assert!(u64::from(ramdisk) + initrd.len() as u64 <= usable_end);
        assert!(
            u64::from(ramdisk) + initrd.len() as u64 > usable_end - 4096,
            "at the top"
        );
        let mut rd = vec![0u8; initrd.len()];
        mem.read_slice(&mut rd, GuestAddress(ramdisk.into())).unwrap();
        assert_eq!(rd, initrd);

        assert_eq!(p.e820_entries, 5);
        let e820: Vec<_> = p.e820_table[..5].iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            e820,
            vec![
                (0, 0x9_fc00, 1),
                (0x9_fc00, 0x400, 2),
                (0xf_0000, 0x1_0000, 2),
                (0x10_0000, (64 << 20) - 0x10_0000 - 0x2_0000, 1),
                ((64 << 20) - 0x2_0000, 0x2_0000, 2),
            ]
        );

        assert_eq!(read_u64(mem, GDT_ADDR + 8), 0x00af_9b00_0000_ffff);
        assert_eq!(read_u64(mem, GDT_ADDR + 16), 0x00cf_9300_0000_ffff);
        assert_eq!(read_u64(mem, GDT_ADDR + 24), 0x008f_8b00_0000_ffff);
        assert_eq!(read_u64(mem, IDT_ADDR), 0);
        assert_eq!(read_u64(mem, PML4_ADDR), PDPT_ADDR | 3);
        assert_eq!(read_u64(mem, PDPT_ADDR + 24), (PD_ADDR + 0x3000) | 3);
        assert_eq!(read_u64(mem, PD_ADDR), 0x83);
        assert_eq!(read_u64(mem, PD_ADDR + 8), 0x20_0083);
        assert_eq!(
            read_u64(mem, PD_ADDR + 0x3ff8),
            0xffe0_0083,
            "the last 2 MiB below 4 GiB"
        );

        assert_eq!(
            setup.cpu,
            BootCpu::Long64 {
                gdt_base: GDT_ADDR,
                idt_base: IDT_ADDR,
                cr3: PML4_ADDR,
                rsi: ZERO_PAGE_ADDR,
                rsp: BOOT_STACK,
            }
        );
    }

    #[test]
    fn loads_a_bzimage() {
        let mem = memory::create(64).unwrap();
        let image = fake_bzimage(0x020f, XLF_KERNEL_64, 0x3000);
        let initrd = vec![0x5a; 10_000];
        let cmdline = "console=ttyS0 panic=-1";
        let setup = crate::loader::load(&mem, &image, Some(&initrd), cmdline).unwrap();
        assert_eq!(setup.format, KernelFormat::LinuxBzImage);
        assert_eq!(setup.entry, 0x10_0200);
        assert_eq!(setup.kernel, (0x10_0000, 0x10_3000));
        assert!(setup.exec_ranges.is_empty());
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0xe9);
        check_common(&mem, &setup, cmdline, &initrd);
        let hdr = params(&mem).hdr;
        assert_eq!(hdr.setup_sects, 4, "setup header copied from the image");
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!({ hdr.kernel_alignment }, 0);
        assert_eq!({ hdr.init_size }, 0x80_0000);
    }

    #[test]
    fn rejects_bad_bzimages() {
        let mem = memory::create(64).unwrap();
        for (v, x) in [(0x020b, XLF_KERNEL_64), (0x020f, 0)] {
            let err = load_bzimage(&mem, &fake_bzimage(v, x, 0x100), None, "").unwrap_err();
            assert!(matches!(err, LoadError::NoLongModeEntry { .. }), "{err}");
        }
        let img = fake_bzimage(0x020f, XLF_KERNEL_64, 0x100);
        for cut in [0x210, 0x300, 5 * 512] {
            let err = crate::loader::load(&mem, &img[..cut], None, "").unwrap_err();
            assert!(matches!(err, LoadError::Truncated { .. }), "{cut:#x}: {err}");
        }
        let big = fake_bzimage(0x020f, XLF_KERNEL_64, 64 << 20);
        assert!(matches!(
            load_bzimage(&mem, &big, None, ""),
            Err(LoadError::OutsideRam { .. })
        ));
        let huge_initrd = vec![0u8; 63 << 20];
        assert!(matches!(
            load_bzimage(&mem, &img, Some(&huge_initrd), ""),
            Err(LoadError::InitrdTooLarge { .. })
        ));
        let long = "x".repeat(CMDLINE_MAX);
        assert!(matches!(
            load_bzimage(&mem, &img, None, &long),
            Err(LoadError::BadCmdline(_))
        ));
        assert!(matches!(
            load_bzimage(&mem, &img, None, "a\tb"),
            Err(LoadError::BadCmdline(_))
        ));
    }

    fn vmlinux(paddr: u64, memsz: u64) -> Vec<u8> {
        build(
            elf::Class::Elf64,
            elf::EM_X86_64,
            paddr,
            &[
                (
                    1,
                    paddr,
                    0xffff_ffff_8000_0000 + paddr,
                    b"\x0f\x31\xf4",
                    0x10,
                    elf::PF_X | 4,
                ),
                (1, paddr + 0x1000, 0xffff_ffff_8000_1000 + paddr, b"data", memsz, 6),
            ],
        )
    }

    #[test]
    fn loads_a_vmlinux_elf() {
        let mem = memory::create(64).unwrap();
        mem.write_slice(&[0xee; 8], GuestAddress(0x100_1004)).unwrap();
        let image = vmlinux(0x100_0000, 0x2000);
        let initrd = vec![7u8; 5000];
        let setup = crate::loader::load(&mem, &image, Some(&initrd), "root=/dev/vda").unwrap();
        assert_eq!(setup.format, KernelFormat::LinuxElf);
        assert_eq!(setup.entry, 0x100_0000);
        assert_eq!(setup.kernel, (0x100_0000, 0x100_3000));
        assert_eq!(setup.exec_ranges, vec![(0x100_0000, 3)]);
        assert_eq!(
            mem.read_obj::<[u8; 3]>(GuestAddress(0x100_0000)).unwrap(),
            [0x0f, 0x31, 0xf4]
        );
        assert_eq!(read_u64(&mem, 0x100_1004), 0, "bss zeroed");
        check_common(&mem, &setup, "root=/dev/vda", &initrd);
        assert_eq!({ params(&mem).hdr.kernel_alignment }, ELF_KERNEL_ALIGNMENT);
        assert_eq!(params(&mem).hdr.setup_sects, 0);
    }

    #[test]
    fn rejects_bad_vmlinux() {
        let mem = memory::create(64).unwrap();
        let beyond_ram = vmlinux(0x100_0000, 0x400_0000);
        assert!(matches!(
            crate::loader::load(&mem, &beyond_ram, None, ""),
            Err(LoadError::OutsideRam { .. })
        ));
        let mut beyond_file = vmlinux(0x100_0000, 0x10);
        beyond_file.truncate(beyond_file.len() - 1);
        assert!(matches!(
            crate::loader::load(&mem, &beyond_file, None, ""),
            Err(LoadError::Truncated { .. })
        ));
        let over_tables = build(
            elf::Class::Elf64,
            elf::EM_X86_64,
            0x10_0000,
            &[(1, 0x7000, 0x7000, b"x", 1, elf::PF_X)],
        );
        assert!(matches!(
            crate::loader::load(&mem, &over_tables, None, ""),
            Err(LoadError::Overlap { .. })
        ));
        let low_entry = vmlinux(0x2_1000, 0x10);
        assert!(matches!(
            crate::loader::load(&mem, &low_entry, None, ""),
            Err(LoadError::BadElf(_))
        ));
        let no_load = build(elf::Class::Elf64, elf::EM_X86_64, 0x100_0000, &[(4, 0, 0, b"n", 1, 0)]);
        assert!(matches!(
            crate::loader::load(&mem, &no_load, None, ""),
            Err(LoadError::NoLoadableSegment)
        ));
    }

    /// Loads the Debian kernel named by `NYX_LINUX_KERNEL`
    /// (`tools/scripts/fetch-linux-kernel.sh` fetches it).
    #[test]
    fn loads_a_real_linux_kernel() {
        let required = std::env::var("NYX_REQUIRE_LINUX").is_ok_and(|v| v == "1");
        let path = std::env::var("NYX_LINUX_KERNEL").ok();
        let image = match path.as_deref().map(std::fs::read) {
            Some(Ok(image)) => image,
            other => {
                assert!(
                    !required,
                    "NYX_REQUIRE_LINUX=1 but NYX_LINUX_KERNEL ({path:?}) is unreadable: {other:?}"
                );
                eprintln!("skipped: set NYX_LINUX_KERNEL to a bzImage to run this test");
                return;
            }
        };
        assert_eq!(crate::loader::detect(&image).unwrap(), KernelFormat::LinuxBzImage);
        let mem = memory::create(256).unwrap();
        let initrd = b"070701 not really a cpio".repeat(100);
        let cmdline = "console=ttyS0 earlyprintk=serial nokaslr";
        let setup = crate::loader::load(&mem, &image, Some(&initrd), cmdline).unwrap();
        assert_eq!(setup.entry, 0x10_0200);

        let file_hdr = read_setup_header(&image).unwrap();
        let hdr = params(&mem).hdr;
        assert_eq!(hdr.setup_sects, file_hdr.setup_sects);
        assert_eq!({ hdr.version }, { file_hdr.version });
        assert_eq!({ hdr.init_size }, { file_hdr.init_size });
        assert_eq!({ hdr.kernel_version }, { file_hdr.kernel_version });
        assert_eq!({ hdr.code32_start }, 0x10_0000);
        assert_ne!({ hdr.xloadflags } & XLF_KERNEL_64, 0);
        let setup_len = (u64::from(file_hdr.setup_sects) + 1) * 512;
        assert_eq!(setup.kernel, (0x10_0000, 0x10_0000 + image.len() as u64 - setup_len));
        let mut first = [0u8; 64];
        mem.read_slice(&mut first, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&first[..], &image[setup_len as usize..][..64]);
        let ramdisk = u64::from(hdr.ramdisk_image);
        let busy = { hdr.pref_address } + u64::from(hdr.init_size);
        assert!(
            ramdisk >= busy,
            "initrd {ramdisk:#x} clear of the decompressed kernel {busy:#x}"
        );

        // Everything but the RAM size is as in the small machines above.
        let p = params(&mem);
        assert_eq!(p.e820_entries, 5);
        assert_eq!({ p.e820_table[3].size }, (256 << 20) - 0x10_0000 - 0x2_0000);
        assert_eq!(u64::from(hdr.ramdisk_size), initrd.len() as u64);
        assert_eq!({ hdr.cmdline_size } as usize, cmdline.len() + 1);
        assert_eq!(hdr.type_of_loader, LOADER_OTHER);

        let mut regs = kvm_bindings::kvm_regs::default();
        let mut sregs = kvm_bindings::kvm_sregs::default();
        crate::loader::configure_vcpu(&setup, &mut regs, &mut sregs);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp, regs.rflags),
            (0x10_0200, 0x7000, 0x8ff0, 2)
        );
        assert_eq!((sregs.cs.l, sregs.cs.selector, sregs.cr3), (1, 8, PML4_ADDR));
        assert_eq!(sregs.efer & 0x500, 0x500);
        assert_eq!(sregs.cr0 & 0x8000_0011, 0x8000_0011);
        assert_eq!(sregs.cr4 & 0x20, 0x20);
    }
}
