//! Boot loaders: recognise a kernel image (Multiboot v1, Linux bzImage, Linux
//! vmlinux ELF), write it with its initrd, command line and boot information
//! into guest memory, and describe the CPU state its entry point expects.
//!
//! Use: [`load`] once on fresh guest memory, then for the boot vCPU
//! `get_sregs` → [`configure_vcpu`] → `set_sregs` + `set_regs`. Nothing else
//! needs setting: KVM's reset state already has the FPU, MXCSR and MSRs
//! that both entry protocols expect, and A20 is always enabled under KVM.
//!
//! Everything here treats the image as untrusted user input: every size and
//! offset is checked, and a bad file is a [`LoadError`], never a panic.

pub(crate) mod elf;
pub(crate) mod gdt;
#[cfg(test)]
mod kvm_tests;
pub mod linux;
pub mod multiboot;

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _};

use crate::memory::GuestMemory;

/// The kinds of kernel image Nyx boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A Multiboot v1 kernel (ELF32 or a.out-kludge), entered in 32-bit protected mode.
    Multiboot,
    /// A Linux bzImage, entered at its 64-bit entry point.
    LinuxBzImage,
    /// An uncompressed x86-64 Linux `vmlinux` ELF, entered in long mode.
    LinuxElf,
}

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelFormat::Multiboot => "Multiboot v1 kernel",
            KernelFormat::LinuxBzImage => "Linux bzImage",
            KernelFormat::LinuxElf => "Linux vmlinux ELF",
        })
    }
}

/// Why a kernel image could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The ACPI tables could not be built (too little RAM for them).
    #[error("cannot write the ACPI tables: {0}")]
    Acpi(String),
    /// The file is none of the formats Nyx boots.
    #[error("the kernel image is not a Multiboot v1 kernel, a Linux bzImage or a vmlinux ELF")]
    UnknownFormat,
    /// An ELF file for another machine.
    #[error(
        "the kernel image is an ELF file for machine {machine} ({class:?}): Nyx boots i386 \
         ELF32 (Multiboot) and x86-64 ELF64 (vmlinux) kernels"
    )]
    UnsupportedElf {
        /// ELF class of the file.
        class: &'static str,
        /// Its `e_machine`.
        machine: u16,
    },
    /// A structure of the file runs past its end.
    #[error(
        "the kernel image is truncated: its {what} at offset {offset:#x} ({len:#x} bytes) runs \
         past the end of the {file_len}-byte file"
    )]
    Truncated {
        /// The structure.
        what: &'static str,
        /// Where it starts in the file.
        offset: u64,
        /// How long it is.
        len: u64,
        /// How long the file is.
        file_len: u64,
    },
    /// An ELF file whose headers contradict each other.
    #[error("the kernel image is a malformed ELF file: {0}")]
    BadElf(String),
    /// An ELF file without anything to load.
    #[error("the kernel image is an ELF file with no loadable (PT_LOAD) segment")]
    NoLoadableSegment,
    /// A Multiboot header whose fields contradict each other.
    #[error("the kernel image has an invalid Multiboot header: {0}")]
    BadMultiboot(String),
    /// A bzImage that cannot be entered in long mode.
    #[error(
        "the bzImage uses boot protocol {version:#x} without a 64-bit entry point; Nyx needs \
         protocol 2.12 or later with XLF_KERNEL_64 (Linux 3.8 or newer, x86-64 build)"
    )]
    NoLongModeEntry {
        /// The boot protocol version of its setup header.
        version: u16,
    },
    /// Something to load does not fit in guest RAM.
    #[error(
        "the {what} at guest address {start:#x}..{end:#x} lies outside guest RAM; give the \
         machine more memory (or relink the kernel)"
    )]
    OutsideRam {
        /// What was being placed.
        what: &'static str,
        /// First address.
        start: u64,
        /// Address after the last byte.
        end: u64,
    },
    /// A kernel segment over the boot structures the loader itself writes.
    #[error(
        "the kernel segment at {start:#x}..{end:#x} overlaps the boot structures Nyx places at \
         {area_start:#x}..{area_end:#x}; link the kernel elsewhere (1 MiB and up is free)"
    )]
    Overlap {
        /// Segment start.
        start: u64,
        /// Segment end.
        end: u64,
        /// Loader area start.
        area_start: u64,
        /// Loader area end.
        area_end: u64,
    },
    /// The initrd finds no room.
    #[error(
        "the initrd of {size} bytes does not fit in guest RAM next to the kernel; give the \
         machine more memory"
    )]
    InitrdTooLarge {
        /// The initrd size.
        size: u64,
    },
    /// A command line the protocol cannot carry.
    #[error("the kernel command line is not usable: {0}")]
    BadCmdline(String),
    /// linux-loader refused the image.
    #[error("the Linux kernel image could not be loaded: {0}")]
    Linux(linux_loader::loader::Error),
    /// Guest memory refused a write that was checked to fit.
    #[error("cannot write the {what} to guest memory at {addr:#x}: {source}")]
    Memory {
        /// What was being written.
        what: &'static str,
        /// Where.
        addr: u64,
        /// What vm-memory said.
        source: vm_memory::GuestMemoryError,
    },
}

/// The CPU state a kernel's entry point expects, beyond `entry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootCpu {
    /// Multiboot: flat 32-bit protected mode, paging off, CS=0x10, DS..SS=0x18.
    Protected32 {
        /// Guest address of the 4-entry GDT written by the loader.
        gdt_base: u64,
        /// EAX at entry (the Multiboot boot magic 0x2BADB002).
        eax: u32,
        /// EBX at entry (physical address of the multiboot_info).
        ebx: u32,
    },
    /// Linux 64-bit boot protocol: long mode with identity-mapped 4 GiB.
    Long64 {
        /// Guest address of the 4-entry GDT (null, code 0x08, data 0x10, TSS 0x18).
        gdt_base: u64,
        /// Guest address of the (empty) IDT.
        idt_base: u64,
        /// Guest address of the PML4.
        cr3: u64,
        /// RSI at entry (the boot_params "zero page").
        rsi: u64,
        /// RSP and RBP at entry.
        rsp: u64,
    },
}

/// What [`load`] put where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSetup {
    /// The detected image format.
    pub format: KernelFormat,
    /// Guest-physical address of the first instruction.
    pub entry: u64,
    /// Lowest guest-physical address and end (exclusive) of the loaded kernel,
    /// zero-filled memory included.
    pub kernel: (u64, u64),
    /// The initrd as `(gpa, len)`, if one was given.
    pub initrd: Option<(u64, u64)>,
    /// Guest address of the boot information (multiboot_info or boot_params).
    pub boot_info: u64,
    /// Guest address of the NUL-terminated command line.
    pub cmdline: u64,
    /// Registers the entry point expects; apply with [`configure_vcpu`].
    pub cpu: BootCpu,
    /// Executable parts of the kernel as loaded, `(gpa, len)`, covering the
    /// bytes that came from the file. Empty for a bzImage, whose payload is
    /// compressed and decompresses itself.
    pub exec_ranges: Vec<(u64, u64)>,
}

/// E820 / Multiboot memory type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 / Multiboot memory type of reserved memory.
pub const E820_RESERVED: u32 = 2;
/// Where the extended BIOS data area would start (the end of usable low RAM).
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of the video memory hole.
const VGA_START: u64 = 0xa_0000;
/// Start of the BIOS ROM area, reserved up to 1 MiB.
const BIOS_START: u64 = 0xf_0000;
/// Bytes at the top of RAM below 4 GiB that the memory map reserves for
/// firmware tables (SeaBIOS reserves the same under QEMU).
pub const FIRMWARE_RESERVED: u64 = 128 << 10;
/// Start of high memory.
pub const HIMEM_START: u64 = 0x10_0000;
/// 4 GiB.
const FOUR_GIB: u64 = 1 << 32;
/// Guest page size.
const PAGE: u64 = 0x1000;

/// One memory map entry, as both e820 and the Multiboot mmap describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// First address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The PC memory map of `mem`: low RAM up to the EBDA, the EBDA and BIOS
/// areas reserved, then every RAM region from 1 MiB up.
pub fn memory_map(mem: &GuestMemory) -> Vec<MemoryMapEntry> {
    let low_end = ram_end_from(mem, 0);
    let mut map = vec![
        MemoryMapEntry {
            addr: 0,
            len: low_end.min(EBDA_START),
            kind: E820_RAM,
        },
        MemoryMapEntry {
            addr: EBDA_START,
            len: VGA_START - EBDA_START,
            kind: E820_RESERVED,
        },
        MemoryMapEntry {
            addr: BIOS_START,
            len: HIMEM_START - BIOS_START,
            kind: E820_RESERVED,
        },
    ];
    for region in mem.iter() {
        let start = region.start_addr().0.max(HIMEM_START);
        let end = region.start_addr().0.saturating_add(region.len());
        if end <= start {
            continue;
        }
        // The top of RAM below 4 GiB is kept for firmware tables, as SeaBIOS
        // does under QEMU: guests see the same sizes under both.
        let reserved = if end <= FOUR_GIB && end - start > FIRMWARE_RESERVED {
            FIRMWARE_RESERVED
        } else {
            0
        };
        map.push(MemoryMapEntry {
            addr: start,
            len: end - start - reserved,
            kind: E820_RAM,
        });
        if reserved > 0 {
            map.push(MemoryMapEntry {
                addr: end - reserved,
                len: reserved,
                kind: E820_RESERVED,
            });
        }
    }
    map
}

/// End of the contiguous RAM that contains `addr` (or `addr` itself when it is not RAM).
fn ram_end_from(mem: &GuestMemory, addr: u64) -> u64 {
    mem.find_region(GuestAddress(addr))
        .map_or(addr, |r| r.start_addr().0.saturating_add(r.len()))
}

/// Bytes of RAM below 4 GiB.
fn ram_below_4g(mem: &GuestMemory) -> u64 {
    mem.iter()
        .map(|r| {
            let start = r.start_addr().0.min(FOUR_GIB);
            let end = r.start_addr().0.saturating_add(r.len()).min(FOUR_GIB);
            end - start
        })
        .sum()
}

/// Checks that `[start, start + len)` is RAM (one region); `what` names it in the error.
fn check_ram(mem: &GuestMemory, what: &'static str, start: u64, len: u64) -> Result<(), LoadError> {
    let end = start.checked_add(len);
    let fits = match (end, usize::try_from(len)) {
        (Some(end), Ok(n)) => len == 0 || (mem.check_range(GuestAddress(start), n) && ram_end_from(mem, start) >= end),
        _ => false,
    };
    if fits {
        Ok(())
    } else {
        Err(LoadError::OutsideRam {
            what,
            start,
            end: end.unwrap_or(u64::MAX),
        })
    }
}

/// Checks that the kernel range `[start, start + len)` stays clear of `area`.
fn check_clear(start: u64, len: u64, area: (u64, u64)) -> Result<(), LoadError> {
    let end = start.saturating_add(len);
    if len > 0 && start < area.1 && area.0 < end {
        return Err(LoadError::Overlap {
            start,
            end,
            area_start: area.0,
            area_end: area.1,
        });
    }
    Ok(())
}

/// Writes `data` at `addr`.
fn write(mem: &GuestMemory, what: &'static str, addr: u64, data: &[u8]) -> Result<(), LoadError> {
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|source| LoadError::Memory { what, addr, source })
}

/// Zero-fills `len` bytes at `addr` (already checked to be RAM).
fn zero(mem: &GuestMemory, what: &'static str, addr: u64, len: u64) -> Result<(), LoadError> {
    const CHUNK: u64 = 64 * 1024;
    let zeros = [0u8; CHUNK as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        // `n <= CHUNK`, so the slice bound holds.
        write(mem, what, addr + done, &zeros[..n as usize])?;
        done += n;
    }
    Ok(())
}

/// Rounds `v` up to a page boundary (saturating).
fn page_up(v: u64) -> u64 {
    v.checked_add(PAGE - 1).map_or(!(PAGE - 1), |x| x & !(PAGE - 1))
}

/// Tells which format `image` is, from its bytes alone.
pub fn detect(image: &[u8]) -> Result<KernelFormat, LoadError> {
    if image.get(0x202..0x206) == Some(b"HdrS") {
        return Ok(KernelFormat::LinuxBzImage);
    }
    let mb = multiboot::find_header(image)?;
    if elf::has_magic(image) {
        return match elf::ident(image)? {
            (elf::Class::Elf64, elf::EM_X86_64) => match mb {
                // An x86-64 file with Multiboot load addresses is loaded as
                // Multiboot (QEMU does the same); no vmlinux carries one.
                Some(h) if h.has_addresses() => Ok(KernelFormat::Multiboot),
                _ => Ok(KernelFormat::LinuxElf),
            },
            (elf::Class::Elf32, elf::EM_386) => Ok(KernelFormat::Multiboot),
            _ if mb.is_some() => Ok(KernelFormat::Multiboot),
            (class, machine) => Err(LoadError::UnsupportedElf {
                class: match class {
                    elf::Class::Elf32 => "ELF32",
                    elf::Class::Elf64 => "ELF64",
                },
                machine,
            }),
        };
    }
    if mb.is_some() {
        return Ok(KernelFormat::Multiboot);
    }
    Err(LoadError::UnknownFormat)
}

/// Detects the format of `image` and loads it, with the optional `initrd`
/// and the command line `cmdline`, into `mem`.
pub fn load(mem: &GuestMemory, image: &[u8], initrd: Option<&[u8]>, cmdline: &str) -> Result<BootSetup, LoadError> {
    if cmdline.contains('\0') {
        return Err(LoadError::BadCmdline("it contains a NUL byte".into()));
    }
    let setup = match detect(image)? {
        KernelFormat::Multiboot => multiboot::load(mem, image, initrd, cmdline)?,
        KernelFormat::LinuxBzImage => linux::load_bzimage(mem, image, initrd, cmdline)?,
        KernelFormat::LinuxElf => linux::load_elf(mem, image, initrd, cmdline)?,
    };
    tracing::info!(
        format = %setup.format,
        entry = format_args!("{:#x}", setup.entry),
        kernel = format_args!("{:#x}..{:#x}", setup.kernel.0, setup.kernel.1),
        "kernel loaded"
    );
    Ok(setup)
}

/// Writes the ACPI tables of a modern machine (`--irqchip apic`) into
/// the BIOS area of `mem`, where an OS scans for the RSDP, and tells a
/// Linux kernel about them (`boot_params`); call after [`load`]. The MADT
/// lists `cpus` processors.
pub fn load_acpi(mem: &GuestMemory, setup: &BootSetup, cpus: u8) -> Result<crate::acpi::AcpiTables, LoadError> {
    let tables = crate::acpi::build(&crate::acpi::AcpiConfig {
        ram_below_4g: ram_below_4g(mem),
        hpet: true,
        cpus,
    })
    .map_err(|e| LoadError::Acpi(e.to_string()))?;
    for (addr, bytes) in &tables.blobs {
        write(mem, "ACPI table", *addr, bytes)?;
    }
    if matches!(setup.format, KernelFormat::LinuxElf | KernelFormat::LinuxBzImage) {
        linux::add_acpi(mem, tables.rsdp_addr, tables.reserved.clone())?;
    }
    Ok(tables)
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Sets the registers the entry point of `setup` expects. `sregs` should come
/// from `KVM_GET_SREGS` of a freshly reset vCPU; `regs` is overwritten.
pub fn configure_vcpu(setup: &BootSetup, regs: &mut kvm_regs, sregs: &mut kvm_sregs) {
    *regs = kvm_regs {
        rflags: 0x2,
        rip: setup.entry,
        ..Default::default()
    };
    match setup.cpu {
        BootCpu::Protected32 { gdt_base, eax, ebx } => {
            regs.rax = eax.into();
            regs.rbx = ebx.into();
            let code = gdt::segment(gdt::entry(gdt::CODE32, 0, 0xfffff), 2);
            let data = gdt::segment(gdt::entry(gdt::DATA, 0, 0xfffff), 3);
            sregs.gdt.base = gdt_base;
            sregs.gdt.limit = multiboot::GDT_LIMIT;
            sregs.cs = code;
            for s in [
                &mut sregs.ds,
                &mut sregs.es,
                &mut sregs.fs,
                &mut sregs.gs,
                &mut sregs.ss,
            ] {
                *s = data;
            }
            sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET) & !CR0_PG;
            sregs.cr4 &= !CR4_PAE;
            sregs.efer &= !(EFER_LME | EFER_LMA);
        }
        BootCpu::Long64 {
            gdt_base,
            idt_base,
            cr3,
            rsi,
            rsp,
        } => {
            regs.rsi = rsi;
            regs.rsp = rsp;
            regs.rbp = rsp;
            let table = linux::gdt_table();
            sregs.gdt.base = gdt_base;
            sregs.gdt.limit = (table.len() * 8 - 1) as u16;
            sregs.idt.base = idt_base;
            sregs.idt.limit = 7;
            sregs.cs = gdt::segment(table[1], 1);
            let data = gdt::segment(table[2], 2);
            for s in [
                &mut sregs.ds,
                &mut sregs.es,
                &mut sregs.fs,
                &mut sregs.gs,
                &mut sregs.ss,
            ] {
                *s = data;
            }
            sregs.tr = gdt::segment(table[3], 3);
            sregs.cr3 = cr3;
            sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET;
            sregs.cr4 |= CR4_PAE;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory;

    #[test]
    fn rejects_junk_with_a_message_naming_the_formats() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10\0\0\0\x10\x08\x06\0\0\0";
        for junk in [&png[..], b"", &[0u8; 10000][..]] {
            let err = detect(junk).unwrap_err();
            assert!(matches!(err, LoadError::UnknownFormat), "{err}");
            assert!(err
                .to_string()
                .contains("Multiboot v1 kernel, a Linux bzImage or a vmlinux ELF"));
            let mem = memory::create(64).unwrap();
            assert!(matches!(load(&mem, junk, None, ""), Err(LoadError::UnknownFormat)));
        }
    }

    #[test]
    fn detects_every_format() {
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect(&bz).unwrap(), KernelFormat::LinuxBzImage);

        let seg = [(1, 0x100_0000, 0xffff_ffff_8100_0000, &b"\x90"[..], 1, elf::PF_X)];
        let vmlinux = elf::tests::build(elf::Class::Elf64, elf::EM_X86_64, 0x100_0000, &seg);
        assert_eq!(detect(&vmlinux).unwrap(), KernelFormat::LinuxElf);

        let elf32 = elf::tests::build(elf::Class::Elf32, elf::EM_386, 0x10_0000, &seg);
        assert_eq!(detect(&elf32).unwrap(), KernelFormat::Multiboot);

        let mut raw = vec![0u8; 64];
        raw.extend_from_slice(&multiboot::tests::header(0));
        assert_eq!(detect(&raw).unwrap(), KernelFormat::Multiboot);

        let arm = elf::tests::build(elf::Class::Elf32, 40, 0, &seg);
        assert!(matches!(
            detect(&arm),
            Err(LoadError::UnsupportedElf { machine: 40, .. })
        ));
        assert!(matches!(detect(b"\x7fELF\x02"), Err(LoadError::Truncated { .. })));
    }

    /// sregs as KVM hands them out after a vCPU reset (real mode at the reset vector).
    fn reset_sregs() -> kvm_sregs {
        let mut s = kvm_sregs {
            cr0: 0x6000_0010,
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        s.cs.selector = 0xf000;
        s.cs.base = 0xffff_0000;
        s.cs.limit = 0xffff;
        s.idt.limit = 0xffff;
        s
    }

    /// Checks that the hidden state of `seg` is what the CPU would load
    /// from the GDT in guest memory.
    fn assert_matches_gdt(mem: &GuestMemory, sregs: &kvm_sregs, seg: &kvm_bindings::kvm_segment) {
        assert!(u32::from(seg.selector) + 7 <= u32::from(sregs.gdt.limit));
        let desc: u64 = mem
            .read_obj(GuestAddress(sregs.gdt.base + u64::from(seg.selector)))
            .unwrap();
        assert_eq!(gdt::segment(desc, seg.selector / 8), *seg);
    }

    #[test]
    fn configure_vcpu_for_multiboot() {
        let mem = memory::create(64).unwrap();
        let setup = load(&mem, &multiboot::tests::elf_kernel(), None, "").unwrap();
        let mut regs = kvm_regs {
            rcx: 0x1234,
            ..Default::default()
        };
        let mut sregs = reset_sregs();
        configure_vcpu(&setup, &mut regs, &mut sregs);
        assert_eq!(regs.rip, 0x10_000c);
        assert_eq!((regs.rax, regs.rbx, regs.rflags), (0x2bad_b002, 0x9500, 2));
        assert_eq!(regs.rcx, 0, "everything else starts at zero");
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0x8000, 31));
        assert_eq!(
            (sregs.cs.selector, sregs.cs.base, sregs.cs.limit),
            (0x10, 0, 0xffff_ffff)
        );
        assert_eq!(
            (sregs.cs.db, sregs.cs.l, sregs.cs.type_, sregs.cs.present),
            (1, 0, 0xb, 1)
        );
        for seg in [&sregs.ds, &sregs.es, &sregs.fs, &sregs.gs, &sregs.ss] {
            assert_eq!((seg.selector, seg.type_, seg.db, seg.limit), (0x18, 3, 1, 0xffff_ffff));
            assert_matches_gdt(&mem, &sregs, seg);
        }
        assert_matches_gdt(&mem, &sregs, &sregs.cs);
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), 0);
        assert_eq!(sregs.cr4 & CR4_PAE, 0);
        assert_eq!(sregs.apic_base, 0xfee0_0900, "unrelated state is kept");
    }

    #[test]
    fn configure_vcpu_for_linux() {
        let mem = memory::create(64).unwrap();
        let seg = [(1, 0x100_0000, 0xffff_ffff_8100_0000, &b"\x90"[..], 1, elf::PF_X)];
        let vmlinux = elf::tests::build(elf::Class::Elf64, elf::EM_X86_64, 0x100_0000, &seg);
        let setup = load(&mem, &vmlinux, None, "").unwrap();
        let mut regs = kvm_regs::default();
        let mut sregs = reset_sregs();
        configure_vcpu(&setup, &mut regs, &mut sregs);
        assert_eq!((regs.rip, regs.rsi, regs.rflags), (0x100_0000, 0x7000, 2));
        assert_eq!((regs.rsp, regs.rbp, regs.rax, regs.rbx), (0x8ff0, 0x8ff0, 0, 0));
        assert_eq!(
            (sregs.gdt.base, sregs.gdt.limit, sregs.idt.base, sregs.idt.limit),
            (0x500, 31, 0x520, 7)
        );
        assert_eq!(
            (sregs.cs.selector, sregs.cs.l, sregs.cs.db, sregs.cs.type_),
            (8, 1, 0, 0xb)
        );
        assert_matches_gdt(&mem, &sregs, &sregs.cs);
        for seg in [&sregs.ds, &sregs.es, &sregs.fs, &sregs.gs, &sregs.ss] {
            assert_eq!((seg.selector, seg.type_), (0x10, 3));
            assert_matches_gdt(&mem, &sregs, seg);
        }
        assert_eq!((sregs.tr.selector, sregs.tr.type_, sregs.tr.s), (0x18, 0xb, 0));
        assert_matches_gdt(&mem, &sregs, &sregs.tr);
        assert_eq!(sregs.cr3, 0x9000);
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG | CR0_ET), CR0_PE | CR0_PG | CR0_ET);
        assert_eq!(sregs.cr4 & CR4_PAE, CR4_PAE);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.apic_base, 0xfee0_0900);
    }

    #[test]
    fn memory_map_follows_the_pc_layout() {
        let mem = memory::create(64).unwrap();
        let map = memory_map(&mem);
        let tuples: Vec<_> = map.iter().map(|e| (e.addr, e.len, e.kind)).collect();
        assert_eq!(
            tuples,
            vec![
                (0, 0x9_fc00, E820_RAM),
                (0x9_fc00, 0x400, E820_RESERVED),
                (0xf_0000, 0x1_0000, E820_RESERVED),
                (0x10_0000, (64 << 20) - 0x10_0000 - 0x2_0000, E820_RAM),
                ((64 << 20) - FIRMWARE_RESERVED, FIRMWARE_RESERVED, E820_RESERVED),
            ]
        );
        assert_eq!(ram_below_4g(&mem), 64 << 20);
    }

    #[test]
    fn range_checks() {
        let mem = memory::create(2).unwrap();
        assert!(check_ram(&mem, "x", 0x1000, 0x1000).is_ok());
        assert!(check_ram(&mem, "x", (2 << 20) - 1, 2).is_err());
        assert!(check_ram(&mem, "x", u64::MAX, 2).is_err());
        assert!(check_clear(0x7000, 0x1000, (0x8000, 0x9000)).is_ok());
        assert!(check_clear(0x7000, 0x1001, (0x8000, 0x9000)).is_err());
        assert!(check_clear(0x8fff, 0, (0x8000, 0x9000)).is_ok());
        assert_eq!(page_up(0x1001), 0x2000);
        assert_eq!(page_up(0x2000), 0x2000);
    }
}
