//! The instruction patcher: KVM gives user space no way to intercept `rdtsc`,
//! `rdtscp`, `rdrand` or `rdseed` (nor `cpuid`, which an emulated KVM answers
//! from the host CPU instead of the machine's table), so Nyx finds them in the executable
//! segments of the guest images it loads and replaces each one with a
//! trapping instruction of the same length. The [`PatchTable`] remembers every
//! site (its original bytes, length and instruction kind) so that the run loop
//! can emulate the instruction with a logged value when the guest traps, and
//! so that debugger and trace tools can show the original bytes.
//!
//! **The trap** is `out TRAP_PORT, al` (`E6 ib`, 2 bytes), padded with `nop`s
//! to the length of the original instruction. An `out` changes no register
//! (an `in` would clobber EAX, which `rdrand ecx` must leave alone), so the
//! trap leaves the guest's registers exactly as the original instruction found
//! them. It shows up as a one-byte port write to [`TRAP_PORT`]
//! ([`is_trap_exit`]). The run loop then:
//!
//! 1. completes the exit as KVM requires before guest state may be changed
//!    (re-enter with `immediate_exit` set, or handle it at the next entry), so
//!    that RIP has moved past the 2-byte `out`;
//! 2. reads the registers and finds the site with
//!    [`PatchTable::site_for_exit`] (RIP − 2 is the start of the site; a port
//!    write from anywhere else is an ordinary write to an unassigned port);
//! 3. takes a value from the `Clock` (TSC) or `Entropy` (random) source, which
//!    is what gets logged;
//! 4. calls [`emulate`], which writes the destination registers and flags and
//!    moves RIP to the end of the original instruction, and sets the registers.
//!
//! **Finding sites.** Each executable range is disassembled linearly with
//! capstone, and only instructions that start on a boundary of that sweep are
//! patched: `b8 00 0f 31 00` (`mov eax, 0x00310f00`) is left alone. An ELF32
//! Multiboot kernel may hold 64-bit code, so [`ScanMode::Auto`] sweeps in both
//! modes and patches a site only where both sweeps decode the same instruction
//! at the same address (REX-prefixed `rdrand r64` is therefore not patched in
//! `Auto` mode). Sites in an ELF image's data sections (allocated, not
//! `SHF_EXECINSTR`) that share an executable segment with code are dropped
//! ([`scan_elf`]). Limitations: code generated or copied at run time, code
//! reached only through a desynchronised sweep (data inside code), images that
//! are not ELF (bzImage) and `rdpid` are not patched; whatever slips through
//! shows up later as a replay divergence. A patched site run at CPL 3 with
//! IOPL < 3 raises #GP unless the TSS I/O bitmap allows the port.

use std::collections::HashSet;
use std::fmt;

use capstone::prelude::*;
use kvm_bindings::kvm_regs;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::loader::elf::{self, Class, PF_X};
use crate::loader::LoadError;
use crate::memory::GuestMemory;
use crate::paging::{self, PagingRegs};

/// The I/O port a patched instruction writes to. Nothing on the PC platform
/// decodes 0xE7: the neighbours are QEMU/Bochs' debug console (0xE9) and the
/// alternative delay port Linux may use (0xED). It must fit the 8-bit
/// immediate of `out imm8, al`, and its value as an opcode byte must not be a
/// one-byte port instruction (`0xEC..=0xEF`), so that a guest's own `out dx`
/// can never look like a trap.
pub const TRAP_PORT: u16 = TRAP_PORT_BYTE as u16;
const TRAP_PORT_BYTE: u8 = 0xE7;
/// `out imm8, al`.
const OUT_IMM8_AL: u8 = 0xE6;
const NOP: u8 = 0x90;
/// The port of the trap written into a site that lies inside a Linux
/// alternative's replacement code (`.altinstr_replacement`). Linux copies
/// such code over the alternative's original instruction at boot, trap
/// included; writing to another port than [`TRAP_PORT`] lets Nyx tell the
/// copy from a site patched in place at the same address (an `rdtscp`
/// replacement over an `rdtsc`, both starting `E6`). Same rules as
/// [`TRAP_PORT`]: unassigned on the PC, and `E5` is not an `out dx` opcode.
pub const ALT_TRAP_PORT: u16 = ALT_TRAP_PORT_BYTE as u16;
const ALT_TRAP_PORT_BYTE: u8 = 0xE5;
/// Length of the trapping `out` instruction.
pub const TRAP_LEN: u8 = 2;
/// Longest x86 instruction.
const MAX_INSN_LEN: u8 = 15;

const RFLAGS_CF: u64 = 1;
const RFLAGS_PF: u64 = 1 << 2;
const RFLAGS_AF: u64 = 1 << 4;
const RFLAGS_ZF: u64 = 1 << 6;
const RFLAGS_SF: u64 = 1 << 7;
const RFLAGS_OF: u64 = 1 << 11;

/// Whether a port-write exit is a patched instruction's trap: one byte to
/// [`TRAP_PORT`] or [`ALT_TRAP_PORT`]. Confirm with
/// [`PatchTable::site_for_exit`].
pub fn is_trap_exit(port: u16, data: &[u8]) -> bool {
    (port == TRAP_PORT || port == ALT_TRAP_PORT) && data.len() == 1
}

/// Which instruction a site held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TrapKind {
    /// `rdtsc`: EDX:EAX = TSC.
    Rdtsc,
    /// `rdtscp`: EDX:EAX = TSC, ECX = TSC_AUX.
    Rdtscp,
    /// `rdrand reg`: a random value, CF = 1.
    Rdrand {
        /// Destination register, 0..=15 in x86 encoding order (rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8..r15).
        reg: u8,
        /// Operand size in bytes: 2, 4 or 8.
        size: u8,
    },
    /// `rdseed reg`: a random value, CF = 1.
    Rdseed {
        /// Destination register, as for [`TrapKind::Rdrand`].
        reg: u8,
        /// Operand size in bytes: 2, 4 or 8.
        size: u8,
    },
    /// `cpuid`: EAX, EBX, ECX, EDX from the machine's CPUID table.
    Cpuid,
}

impl TrapKind {
    /// The instruction's mnemonic.
    pub fn mnemonic(&self) -> &'static str {
        match self {
            TrapKind::Rdtsc => "rdtsc",
            TrapKind::Rdtscp => "rdtscp",
            TrapKind::Rdrand { .. } => "rdrand",
            TrapKind::Rdseed { .. } => "rdseed",
            TrapKind::Cpuid => "cpuid",
        }
    }

    /// Whether the kind names a register and size Nyx can write.
    fn is_valid(&self) -> bool {
        match *self {
            TrapKind::Rdtsc | TrapKind::Rdtscp | TrapKind::Cpuid => true,
            TrapKind::Rdrand { reg, size } | TrapKind::Rdseed { reg, size } => reg < 16 && matches!(size, 2 | 4 | 8),
        }
    }
}

/// The register name of `reg` (x86 encoding order) at `size` bytes.
fn reg_name(reg: u8, size: u8) -> String {
    const LEGACY: [&str; 8] = ["ax", "cx", "dx", "bx", "sp", "bp", "si", "di"];
    match (LEGACY.get(usize::from(reg)), size) {
        (Some(n), 2) => (*n).to_string(),
        (Some(n), 4) => format!("e{n}"),
        (Some(n), _) => format!("r{n}"),
        (None, 2) => format!("r{reg}w"),
        (None, 4) => format!("r{reg}d"),
        (None, _) => format!("r{reg}"),
    }
}

impl fmt::Display for TrapKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            TrapKind::Rdtsc | TrapKind::Rdtscp | TrapKind::Cpuid => f.write_str(self.mnemonic()),
            TrapKind::Rdrand { reg, size } | TrapKind::Rdseed { reg, size } => {
                write!(f, "{} {}", self.mnemonic(), reg_name(reg, size))
            }
        }
    }
}

/// One patched instruction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchSite {
    /// Guest-physical address of its first byte.
    pub gpa: u64,
    /// Link-time virtual address of its first byte, where the scan was given one.
    pub vaddr: Option<u64>,
    /// Its length in bytes (2..=15).
    pub len: u8,
    /// Its original bytes (`len` of them).
    pub original: Vec<u8>,
    /// What it does.
    pub kind: TrapKind,
    /// Whether it lies in a Linux alternative's replacement code, or is the
    /// copy Linux makes of such a site: its trap writes to [`ALT_TRAP_PORT`].
    pub in_replacement: bool,
}

impl PatchSite {
    /// The bytes that replace the instruction: `out TRAP_PORT, al` (or
    /// [`ALT_TRAP_PORT`]), then `nop`s.
    pub fn trap_bytes(&self) -> Vec<u8> {
        let mut bytes = vec![NOP; usize::from(self.len.max(TRAP_LEN))];
        bytes[0] = OUT_IMM8_AL;
        bytes[1] = if self.in_replacement {
            ALT_TRAP_PORT_BYTE
        } else {
            TRAP_PORT_BYTE
        };
        bytes
    }

    /// One past its last byte (a valid site never wraps).
    fn end(&self) -> u64 {
        self.gpa.saturating_add(u64::from(self.len))
    }

    fn is_valid(&self) -> bool {
        (TRAP_LEN..=MAX_INSN_LEN).contains(&self.len)
            && self.gpa.checked_add(u64::from(self.len)).is_some()
            && self.original.len() == usize::from(self.len)
            && self.kind.is_valid()
    }
}

impl fmt::Display for PatchSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at gpa {:#x}", self.kind, self.gpa)?;
        if let Some(vaddr) = self.vaddr {
            write!(f, " (virtual {vaddr:#x})")?;
        }
        Ok(())
    }
}

/// Why a patch table could not be applied or built.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// A site lies outside guest RAM.
    #[error("patch site at {gpa:#x} ({len} bytes) lies outside guest memory: the table does not belong to this machine's memory layout")]
    OutsideMemory {
        /// Where the site starts.
        gpa: u64,
        /// Its length.
        len: u8,
    },
    /// Guest memory at a site holds neither the original nor the trap bytes.
    #[error("guest memory at {gpa:#x} holds {found:02x?}, not the {expected:02x?} the patch table expects: load the image the table was made from before patching")]
    Mismatch {
        /// Where the site starts.
        gpa: u64,
        /// What memory holds.
        found: Vec<u8>,
        /// The original instruction's bytes.
        expected: Vec<u8>,
    },
    /// The image is not an ELF file Nyx can scan.
    #[error("cannot scan the kernel image for instructions to patch: {0}")]
    Image(#[from] LoadError),
}

/// How a code range is disassembled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScanMode {
    /// 32-bit protected-mode code.
    Bits32,
    /// 64-bit long-mode code.
    Bits64,
    /// Unknown: patch only what the 32-bit and 64-bit sweeps both decode as
    /// the same instruction at the same address.
    Auto,
}

/// Decodes `bytes`, one whole instruction as capstone delimited it, as one of
/// the instructions Nyx patches. Only plain encodings are accepted: operand
/// and address size, segment and REX prefixes; `lock`, `rep`/`repne` (which
/// turn `0f c7 /7` into `rdpid`) and memory operands are not.
fn classify(bytes: &[u8], bits64: bool) -> Option<TrapKind> {
    let mut opsize16 = false;
    let mut rex = 0u8;
    let mut at = 0;
    while let Some(&b) = bytes.get(at) {
        match b {
            0x66 => {
                opsize16 = true;
                rex = 0;
            }
            0x67 | 0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 => rex = 0,
            // A REX prefix counts only right before the opcode; a later
            // legacy prefix cancels it (handled above).
            0x40..=0x4f if bits64 => rex = b,
            _ => break,
        }
        at += 1;
    }
    let rex_w = rex & 0x08 != 0;
    let rex_b = (rex & 0x01) << 3;
    match bytes.get(at..)? {
        [0x0f, 0x31] => Some(TrapKind::Rdtsc),
        [0x0f, 0xa2] => Some(TrapKind::Cpuid),
        [0x0f, 0x01, 0xf9] => Some(TrapKind::Rdtscp),
        [0x0f, 0xc7, modrm] if modrm >> 6 == 3 => {
            let reg = (modrm & 7) | rex_b;
            let size = if rex_w {
                8
            } else if opsize16 {
                2
            } else {
                4
            };
            match (modrm >> 3) & 7 {
                6 => Some(TrapKind::Rdrand { reg, size }),
                7 => Some(TrapKind::Rdseed { reg, size }),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Linear sweep of `code` in one mode; an undecodable byte is stepped over.
fn sweep(code: &[u8], base_gpa: u64, base_vaddr: Option<u64>, bits64: bool) -> Vec<PatchSite> {
    let mode = if bits64 {
        arch::x86::ArchMode::Mode64
    } else {
        arch::x86::ArchMode::Mode32
    };
    let cs = match Capstone::new().x86().mode(mode).build() {
        Ok(cs) => cs,
        Err(e) => {
            tracing::error!("no x86 disassembler, nothing patched: {e}");
            return Vec::new();
        }
    };
    let mut iter = match cs.disasm_iter(code, base_gpa) {
        Ok(iter) => iter,
        Err(e) => {
            tracing::error!("disassembler out of memory, nothing patched: {e}");
            return Vec::new();
        }
    };
    let mut sites = Vec::new();
    let mut offset = 0usize;
    while offset < code.len() {
        let Some(rest) = code.get(offset..) else {
            break;
        };
        iter.reset(rest, base_gpa.wrapping_add(offset as u64));
        while let Some(insn) = iter.next() {
            let bytes = insn.bytes();
            if let Some(kind) = classify(bytes, bits64) {
                // Capstone agrees on the instruction (guards the decoder above).
                if insn.mnemonic() == Some(kind.mnemonic()) {
                    if let Ok(len) = u8::try_from(bytes.len()) {
                        sites.push(PatchSite {
                            gpa: base_gpa.wrapping_add(offset as u64),
                            vaddr: base_vaddr.map(|v| v.wrapping_add(offset as u64)),
                            len,
                            original: bytes.to_vec(),
                            kind,
                            in_replacement: false,
                        });
                    }
                }
            }
            offset += bytes.len();
        }
        // The sweep stopped at an undecodable byte (or at the end): step over it.
        offset += 1;
    }
    sites
}

/// Finds the instructions to patch in `code`, which is loaded at guest-physical
/// `base_gpa`. Sites come out in address order.
pub fn scan(code: &[u8], base_gpa: u64, mode: ScanMode) -> Vec<PatchSite> {
    scan_linked(code, base_gpa, None, mode)
}

/// [`scan`] for code linked at virtual address `base_vaddr`: each site also
/// records its virtual address.
pub fn scan_linked(code: &[u8], base_gpa: u64, base_vaddr: Option<u64>, mode: ScanMode) -> Vec<PatchSite> {
    match mode {
        ScanMode::Bits32 => sweep(code, base_gpa, base_vaddr, false),
        ScanMode::Bits64 => sweep(code, base_gpa, base_vaddr, true),
        ScanMode::Auto => {
            let narrow: HashSet<(u64, u8, TrapKind)> = sweep(code, base_gpa, base_vaddr, false)
                .into_iter()
                .map(|s| (s.gpa, s.len, s.kind))
                .collect();
            sweep(code, base_gpa, base_vaddr, true)
                .into_iter()
                .filter(|s| narrow.contains(&(s.gpa, s.len, s.kind)))
                .collect()
        }
    }
}

/// Scans every executable `PT_LOAD` segment of an ELF kernel (at its physical
/// load address, recording link-time virtual addresses): ELF64 images in
/// 64-bit mode, ELF32 images (Multiboot, which may switch to long mode) in
/// [`ScanMode::Auto`]. A site with a byte inside a data section of such a
/// segment ([`elf::data_ranges`]) is not patched: those bytes are not
/// code, or not code run where it is loaded (Linux's real-mode trampoline
/// in `.init.data`, whose `cpuid` a patch would turn into a trap that an AP
/// runs, unknown, from the copy below 1 MiB).
pub fn scan_elf(image: &[u8]) -> Result<PatchTable, PatchError> {
    let file = elf::parse(image)?;
    let mode = match file.class {
        Class::Elf32 => ScanMode::Auto,
        Class::Elf64 => ScanMode::Bits64,
    };
    let mut sites = Vec::new();
    for seg in file.segments.iter().filter(|s| s.flags & PF_X != 0) {
        // `parse` has checked that the file bytes lie inside the image.
        let code = usize::try_from(seg.offset)
            .ok()
            .zip(usize::try_from(seg.filesz).ok())
            .and_then(|(start, len)| image.get(start..start.checked_add(len)?));
        if let Some(code) = code {
            sites.extend(scan_linked(code, seg.paddr, Some(seg.vaddr), mode));
        }
    }
    let data = elf::data_ranges(image);
    sites.retain(|s| {
        let Some(v) = s.vaddr else { return true };
        let end = v.saturating_add(u64::from(s.len));
        !data.iter().any(|&(start, stop)| v < stop && end > start)
    });
    let copies = alternative_copies(image, &file, &mut sites);
    Ok(PatchTable::with_copies(sites, copies))
}

/// One entry of a Linux kernel's `.altinstructions`: at boot, when the CPU
/// has the entry's feature, Linux copies `repl_len` bytes of replacement code
/// over the `slot_len`-byte slot and pads the rest with `nop`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AltEntry {
    /// Link-time address of the slot (the original instruction).
    slot: u64,
    slot_len: u8,
    /// Link-time address of the replacement.
    repl: u64,
    repl_len: u8,
}

/// Layouts of Linux's `struct alt_instr` on x86, newest first that share no
/// size: `(entry size, offset of instrlen, offset of replacementlen)`.
/// Every layout starts with `s32 instr_offset, s32 repl_offset`, each
/// relative to its own field: 4.20 to 6.2 have `u16 cpuid` next (12 bytes),
/// 6.3 and later a `u32 ft_flags` (14 bytes), older kernels a trailing
/// `u8 padlen` (13 bytes).
const ALT_LAYOUTS: [(usize, usize, usize); 3] = [(12, 10, 11), (14, 12, 13), (13, 10, 11)];

/// Reads `table` (`.altinstructions`), choosing the layout under which
/// every entry is plausible (its replacement lies in `repl`,
/// `.altinstr_replacement`, and is no longer than its slot). No layout
/// that fits: no entries.
fn alt_entries(table: elf::Section<'_>, repl: elf::Section<'_>) -> Vec<AltEntry> {
    let repl_end = repl.addr.saturating_add(repl.bytes.len() as u64);
    for (size, il, rl) in ALT_LAYOUTS {
        if table.bytes.is_empty() || table.bytes.len() % size != 0 {
            continue;
        }
        let entries: Option<Vec<AltEntry>> = table
            .bytes
            .chunks_exact(size)
            .enumerate()
            .map(|(i, e)| {
                let at = table.addr.wrapping_add((i * size) as u64);
                let instr_off = i32::from_le_bytes(e.get(0..4)?.try_into().ok()?);
                let repl_off = i32::from_le_bytes(e.get(4..8)?.try_into().ok()?);
                let entry = AltEntry {
                    slot: at.wrapping_add_signed(i64::from(instr_off)),
                    slot_len: *e.get(il)?,
                    repl: at.wrapping_add(4).wrapping_add_signed(i64::from(repl_off)),
                    repl_len: *e.get(rl)?,
                };
                let inside = entry.repl >= repl.addr
                    && entry
                        .repl
                        .checked_add(u64::from(entry.repl_len))
                        .is_some_and(|end| end <= repl_end);
                (entry.repl_len <= entry.slot_len && (entry.repl_len == 0 || inside)).then_some(entry)
            })
            .collect();
        if let Some(entries) = entries {
            return entries;
        }
    }
    tracing::warn!(
        ".altinstructions has a layout Nyx does not know: patched instructions that Linux copies \
         from its alternatives will look like writes to an unassigned port"
    );
    Vec::new()
}

/// The guest-physical address of link-time address `vaddr`, through the
/// loadable segment that holds it.
fn segment_paddr(file: &elf::ElfFile, vaddr: u64) -> Option<u64> {
    file.segments.iter().find_map(|seg| {
        let off = vaddr.checked_sub(seg.vaddr)?;
        (off < seg.memsz).then(|| seg.paddr.wrapping_add(off))
    })
}

/// Marks every site inside a Linux alternative's replacement code (so that
/// its trap uses [`ALT_TRAP_PORT`]) and returns the copies Linux may make of
/// them into the alternatives' slots.
fn alternative_copies(image: &[u8], file: &elf::ElfFile, sites: &mut [PatchSite]) -> Vec<AltCopy> {
    let (Some(table), Some(repl_section)) = (
        elf::section(image, ".altinstructions"),
        elf::section(image, ".altinstr_replacement"),
    ) else {
        return Vec::new();
    };
    let entries = alt_entries(table, repl_section);
    let in_repl = |e: &AltEntry, s: &PatchSite| {
        let end = e.repl.saturating_add(u64::from(e.repl_len));
        s.vaddr
            .is_some_and(|v| v >= e.repl && v.saturating_add(u64::from(s.len)) <= end)
    };
    for site in sites.iter_mut() {
        site.in_replacement = entries.iter().any(|e| in_repl(e, site));
    }
    let mut copies = Vec::new();
    for e in &entries {
        let Some(slot_gpa) = segment_paddr(file, e.slot) else {
            continue;
        };
        // The replacement's bytes as they sit in memory once patched.
        let start = usize::try_from(e.repl - repl_section.addr).unwrap_or(usize::MAX);
        let Some(code) = repl_section
            .bytes
            .get(start..start.saturating_add(usize::from(e.repl_len)))
        else {
            continue;
        };
        let mut patched = code.to_vec();
        let inside: Vec<&PatchSite> = sites.iter().filter(|s| in_repl(e, s)).collect();
        for s in &inside {
            let at = s.vaddr.map_or(0, |v| v - e.repl) as usize;
            if let Some(dst) = patched.get_mut(at..at + usize::from(s.len)) {
                dst.copy_from_slice(&s.trap_bytes());
            }
        }
        for s in inside {
            let offset = s.vaddr.map_or(0, |v| v - e.repl);
            let Some(expect) = patched.get(..offset as usize + usize::from(TRAP_LEN)) else {
                continue;
            };
            copies.push(AltCopy {
                site: PatchSite {
                    gpa: slot_gpa.wrapping_add(offset),
                    vaddr: Some(e.slot.wrapping_add(offset)),
                    ..s.clone()
                },
                slot_gpa,
                expect: expect.to_vec(),
            });
        }
    }
    copies
}

/// A patched instruction that Linux copies at boot, with the rest of an
/// alternative's replacement code, over the alternative's original
/// instruction (its slot): `lfence; rdtsc` over `rdtsc` in
/// `rdtsc_ordered()`, for one. The trap comes along, so the copy traps at an
/// address where nothing was patched at load time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AltCopy {
    /// The site as it sits once copied: `gpa` and `vaddr` are in the slot,
    /// `original` and `kind` those of the replacement's instruction.
    pub site: PatchSite,
    /// Guest-physical address of the slot.
    pub slot_gpa: u64,
    /// The slot's bytes from its start up to the end of the copied trap, as
    /// Linux writes them: the replacement code, traps included. `nop`s here
    /// match any byte (Linux may merge `nop` runs into longer `nop`s).
    pub expect: Vec<u8>,
}

impl AltCopy {
    fn is_valid(&self) -> bool {
        self.site.is_valid()
            && self.site.in_replacement
            && self
                .site
                .gpa
                .checked_sub(self.slot_gpa)
                .and_then(|o| o.checked_add(u64::from(TRAP_LEN)))
                == Some(self.expect.len() as u64)
            && self.expect.len() <= usize::from(u8::MAX)
            && self.expect.ends_with(&self.site.trap_bytes()[..usize::from(TRAP_LEN)])
    }

    /// Whether `found`, the slot's bytes from its start, holds this copy.
    fn matches(&self, found: &[u8]) -> bool {
        found.len() == self.expect.len() && self.expect.iter().zip(found).all(|(&e, &f)| e == NOP || e == f)
    }
}

/// Every patched site of a machine, in guest-physical address order, and the
/// copies a Linux guest may make of them. It goes into the trace header and
/// snapshots, so replay patches exactly what the recording did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "TableRepr", into = "TableRepr")]
pub struct PatchTable {
    sites: Vec<PatchSite>,
    /// Sorted by the copied site's address.
    copies: Vec<AltCopy>,
}

/// How a [`PatchTable`] is stored; validated on the way in.
#[derive(Serialize, Deserialize)]
struct TableRepr {
    sites: Vec<PatchSite>,
    copies: Vec<AltCopy>,
}

impl From<TableRepr> for PatchTable {
    fn from(repr: TableRepr) -> Self {
        PatchTable::with_copies(repr.sites, repr.copies)
    }
}

impl From<PatchTable> for TableRepr {
    fn from(table: PatchTable) -> Self {
        TableRepr {
            sites: table.sites,
            copies: table.copies,
        }
    }
}

impl PatchTable {
    /// A table of `sites`, sorted by address. Malformed sites (bad length or
    /// register) and sites overlapping an earlier one are dropped, so a table
    /// read from a file can never make Nyx write outside a site.
    pub fn new(sites: Vec<PatchSite>) -> Self {
        PatchTable::with_copies(sites, Vec::new())
    }

    /// [`PatchTable::new`] with the copies Linux may make of sites in its
    /// alternatives. Nyx never writes a copy (Linux does); malformed ones
    /// are dropped. Copies may overlap sites and each other: which one
    /// trapped is decided by what memory holds.
    pub fn with_copies(mut sites: Vec<PatchSite>, mut copies: Vec<AltCopy>) -> Self {
        sites.sort_by_key(|s| s.gpa);
        let mut kept: Vec<PatchSite> = Vec::with_capacity(sites.len());
        for site in sites {
            let overlaps = kept.last().is_some_and(|prev| prev.end() > site.gpa);
            if !site.is_valid() || overlaps {
                tracing::warn!("dropping patch site {site:?}: malformed or overlapping");
                continue;
            }
            kept.push(site);
        }
        copies.retain(|c| {
            let ok = c.is_valid();
            if !ok {
                tracing::warn!("dropping copied patch site {:?}: malformed", c.site);
            }
            ok
        });
        copies.sort_by_key(|c| (c.site.gpa, c.slot_gpa));
        PatchTable { sites: kept, copies }
    }

    /// Writes the trap bytes of every site into `mem`. Each site must hold its
    /// original bytes (or already the trap bytes: applying twice is harmless);
    /// nothing is written unless every site checks out.
    pub fn apply(&self, mem: &GuestMemory) -> Result<(), PatchError> {
        let mut pending = Vec::new();
        for site in &self.sites {
            let mut found = vec![0u8; site.original.len()];
            mem.read_slice(&mut found, GuestAddress(site.gpa))
                .map_err(|_| PatchError::OutsideMemory {
                    gpa: site.gpa,
                    len: site.len,
                })?;
            let trap = site.trap_bytes();
            if found == trap {
                continue;
            }
            if found != site.original {
                return Err(PatchError::Mismatch {
                    gpa: site.gpa,
                    found,
                    expected: site.original.clone(),
                });
            }
            pending.push((site, trap));
        }
        for (site, trap) in pending {
            mem.write_slice(&trap, GuestAddress(site.gpa))
                .map_err(|_| PatchError::OutsideMemory {
                    gpa: site.gpa,
                    len: site.len,
                })?;
        }
        Ok(())
    }

    /// The site starting at guest-physical `gpa`.
    pub fn site_at(&self, gpa: u64) -> Option<&PatchSite> {
        self.sites
            .binary_search_by_key(&gpa, |s| s.gpa)
            .ok()
            .and_then(|i| self.sites.get(i))
    }

    /// The site whose link-time virtual address is `vaddr`.
    pub fn site_at_vaddr(&self, vaddr: u64) -> Option<&PatchSite> {
        self.sites.iter().find(|s| s.vaddr == Some(vaddr))
    }

    /// The site whose trap a vCPU just executed, from the registers read
    /// after the exit was completed: `rip_after_trap` is RIP (just past the
    /// 2-byte `out`), `cs_base` the code segment base, `paging` the vCPU's
    /// paging registers. A site patched in place is found by its address; a
    /// copy Linux made of one ([`AltCopy`]) by its address and the bytes of
    /// its slot. `None` if RIP − 2 is neither or memory there no longer holds
    /// the trap (the guest rewrote its code): then the exit was an ordinary
    /// port write.
    pub fn site_for_exit(
        &self,
        mem: &GuestMemory,
        paging: &PagingRegs,
        rip_after_trap: u64,
        cs_base: u64,
    ) -> Option<&PatchSite> {
        let start = cs_base.wrapping_add(rip_after_trap.wrapping_sub(u64::from(TRAP_LEN)));
        let gpa = paging::translate(mem, paging, start).ok()?.gpa;
        let mut found = [0u8; TRAP_LEN as usize];
        paging::read_virt(mem, paging, start, &mut found).ok()?;
        if let Some(site) = self.site_at(gpa) {
            if site.trap_bytes().get(..found.len()) == Some(&found[..]) {
                return Some(site);
            }
        }
        let first = self.copies.partition_point(|c| c.site.gpa < gpa);
        self.copies
            .get(first..)?
            .iter()
            .take_while(|c| c.site.gpa == gpa)
            .find(|c| {
                let slot = start.wrapping_sub(gpa - c.slot_gpa);
                let mut slot_bytes = vec![0u8; c.expect.len()];
                paging::read_virt(mem, paging, slot, &mut slot_bytes).is_ok() && c.matches(&slot_bytes)
            })
            .map(|c| &c.site)
    }

    /// The copies of sites that Linux may make from its alternatives, by
    /// address.
    pub fn copies(&self) -> &[AltCopy] {
        &self.copies
    }

    /// Replaces patched bytes in `buf` (which holds guest-physical memory
    /// starting at `gpa`) with the original bytes, for gdb and trace tools.
    /// A site whose bytes in `buf` are not the trap (the guest rewrote them)
    /// is shown as it is.
    pub fn unpatch_view(&self, gpa: u64, buf: &mut [u8]) {
        let end = gpa.saturating_add(buf.len() as u64);
        let first = self.sites.partition_point(|s| s.end() <= gpa);
        for site in self.sites.iter().skip(first) {
            if site.gpa >= end {
                break;
            }
            // Overlap of the site and the buffer, in site and buffer offsets.
            let lo = site.gpa.max(gpa);
            let hi = site.end().min(end);
            let (Ok(in_site), Ok(in_buf), Ok(n)) = (
                usize::try_from(lo - site.gpa),
                usize::try_from(lo - gpa),
                usize::try_from(hi - lo),
            ) else {
                continue;
            };
            let trap = site.trap_bytes();
            let (Some(shown), Some(trap), Some(original)) = (
                buf.get_mut(in_buf..in_buf + n),
                trap.get(in_site..in_site + n),
                site.original.get(in_site..in_site + n),
            ) else {
                continue;
            };
            if shown == trap {
                shown.copy_from_slice(original);
            }
        }
        // Copies that sit wholly in the buffer, slot included.
        for copy in &self.copies {
            let (Some(slot), Some(at)) = (copy.slot_gpa.checked_sub(gpa), copy.site.gpa.checked_sub(gpa)) else {
                continue;
            };
            let (Ok(slot), Ok(at)) = (usize::try_from(slot), usize::try_from(at)) else {
                continue;
            };
            let len = usize::from(copy.site.len);
            let found = buf.get(slot..slot.saturating_add(copy.expect.len()));
            if found.is_some_and(|f| copy.matches(f)) {
                if let Some(shown) = buf.get_mut(at..at.saturating_add(len)) {
                    shown.copy_from_slice(&copy.site.original);
                }
            }
        }
    }

    /// Number of sites.
    pub fn len(&self) -> usize {
        self.sites.len()
    }

    /// Whether there are no sites.
    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// Every site, in address order.
    pub fn sites(&self) -> &[PatchSite] {
        &self.sites
    }

    /// Keeps only the sites (and copies) whose kind `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&TrapKind) -> bool) {
        self.sites.retain(|s| keep(&s.kind));
        self.copies.retain(|c| keep(&c.site.kind));
    }
}

/// The general-purpose register `reg` (x86 encoding order).
fn gpr(regs: &mut kvm_regs, reg: u8) -> Option<&mut u64> {
    Some(match reg {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        4 => &mut regs.rsp,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        15 => &mut regs.r15,
        _ => return None,
    })
}

/// Performs the instruction of `site` on `regs`, the registers read after the
/// trap exit was completed (RIP just past the 2-byte `out`): `value` is the
/// TSC for `rdtsc`/`rdtscp` or the random value for `rdrand`/`rdseed`,
/// `tsc_aux` the IA32_TSC_AUX value `rdtscp` puts in ECX. Writes the
/// destination registers as the CPU would (32-bit writes zero-extend, 16-bit
/// writes keep the upper bits; `rdrand`/`rdseed` set CF and clear OF, SF, ZF,
/// AF and PF) and moves RIP to the end of the original instruction. Call it
/// once per exit.
pub fn emulate(site: &PatchSite, value: u64, tsc_aux: u32, regs: &mut kvm_regs) {
    match site.kind {
        // Not a single value: see emulate_cpuid.
        TrapKind::Cpuid => {}
        TrapKind::Rdtsc | TrapKind::Rdtscp => {
            regs.rax = value & 0xffff_ffff;
            regs.rdx = value >> 32;
            if site.kind == TrapKind::Rdtscp {
                regs.rcx = u64::from(tsc_aux);
            }
        }
        TrapKind::Rdrand { reg, size } | TrapKind::Rdseed { reg, size } => {
            if let Some(r) = gpr(regs, reg) {
                *r = match size {
                    2 => (*r & !0xffff) | (value & 0xffff),
                    4 => value & 0xffff_ffff,
                    _ => value,
                };
            }
            regs.rflags &= !(RFLAGS_OF | RFLAGS_SF | RFLAGS_ZF | RFLAGS_AF | RFLAGS_PF);
            regs.rflags |= RFLAGS_CF;
        }
    }
    regs.rip = regs
        .rip
        .wrapping_sub(u64::from(TRAP_LEN))
        .wrapping_add(u64::from(site.len));
}

/// Performs a patched `cpuid` on `regs` (as [`emulate`]): `out` is EAX, EBX,
/// ECX and EDX as the machine's table answers the leaf and subleaf the guest
/// asked for (EAX and ECX before the trap); each is zero-extended.
pub fn emulate_cpuid(site: &PatchSite, out: [u32; 4], regs: &mut kvm_regs) {
    regs.rax = u64::from(out[0]);
    regs.rbx = u64::from(out[1]);
    regs.rcx = u64::from(out[2]);
    regs.rdx = u64::from(out[3]);
    regs.rip = regs
        .rip
        .wrapping_sub(u64::from(TRAP_LEN))
        .wrapping_add(u64::from(site.len));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vm_memory::GuestMemoryMmap;

    fn memory(bytes: usize) -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes)]).expect("test memory")
    }

    fn site(gpa: u64, original: &[u8], kind: TrapKind) -> PatchSite {
        PatchSite {
            gpa,
            vaddr: None,
            len: original.len() as u8,
            original: original.to_vec(),
            kind,
            in_replacement: false,
        }
    }

    /// `(offset, len, kind)` of each site.
    fn summary(sites: &[PatchSite], base: u64) -> Vec<(u64, u8, TrapKind)> {
        sites.iter().map(|s| (s.gpa - base, s.len, s.kind)).collect()
    }

    const RDRAND_EAX: TrapKind = TrapKind::Rdrand { reg: 0, size: 4 };

    #[test]
    fn scan_finds_every_kind_in_64_bit_code() {
        let code: &[u8] = &[
            0x0f, 0x31, // 0: rdtsc
            0x0f, 0x01, 0xf9, // 2: rdtscp
            0x0f, 0xc7, 0xf0, // 5: rdrand eax
            0x48, 0x0f, 0xc7, 0xf0, // 8: rdrand rax
            0x66, 0x41, 0x0f, 0xc7, 0xff, // 12: rdseed r15w
            0x49, 0x0f, 0xc7, 0xf9, // 17: rdseed r9
            0x0f, 0xc7, 0xf3, // 21: rdrand ebx
            0xb8, 0x00, 0x0f, 0x31, 0x00, // 24: mov eax, 0x00310f00
            0x0f, 0xc7, 0x36, // 29: vmptrld [rsi]
            0x0f, 0xc7, 0x0e, // 32: cmpxchg8b [rsi]
            0xf3, 0x0f, 0xc7, 0xf8, // 35: rdpid rax
            0x66, 0x48, 0x0f, 0xc7, 0xf1, // 39: rdrand rcx (REX.W wins over 66)
            0x06, // 44: invalid in 64-bit mode
            0x0f, 0x31, // 45: rdtsc
            0xc3, // 47: ret
        ];
        let sites = scan(code, 0x1000, ScanMode::Bits64);
        assert_eq!(
            summary(&sites, 0x1000),
            vec![
                (0, 2, TrapKind::Rdtsc),
                (2, 3, TrapKind::Rdtscp),
                (5, 3, RDRAND_EAX),
                (8, 4, TrapKind::Rdrand { reg: 0, size: 8 }),
                (12, 5, TrapKind::Rdseed { reg: 15, size: 2 }),
                (17, 4, TrapKind::Rdseed { reg: 9, size: 8 }),
                (21, 3, TrapKind::Rdrand { reg: 3, size: 4 }),
                (39, 5, TrapKind::Rdrand { reg: 1, size: 8 }),
                (45, 2, TrapKind::Rdtsc),
            ]
        );
        for s in &sites {
            let off = (s.gpa - 0x1000) as usize;
            assert_eq!(s.original, code[off..off + usize::from(s.len)]);
            assert_eq!(s.vaddr, None);
        }
    }

    #[test]
    fn scan_in_32_bit_code_treats_rex_bytes_as_instructions() {
        let code: &[u8] = &[
            0x48, 0x0f, 0xc7, 0xf0, // dec eax; rdrand eax
            0x66, 0x0f, 0xc7, 0xf1, // rdrand cx
            0x0f, 0xc7, 0xf8, // rdseed eax
            0xa1, 0, 0, 0, 0, 0x0f, 0x31, 0, 0, // mov eax, [0]; rdtsc; add [eax], al
        ];
        let sites = scan_linked(code, 0x10_0000, Some(0xc010_0000), ScanMode::Bits32);
        assert_eq!(
            summary(&sites, 0x10_0000),
            vec![
                (1, 3, RDRAND_EAX),
                (4, 4, TrapKind::Rdrand { reg: 1, size: 2 }),
                (8, 3, TrapKind::Rdseed { reg: 0, size: 4 }),
                (16, 2, TrapKind::Rdtsc),
            ]
        );
        assert_eq!(sites[3].vaddr, Some(0xc010_0010));
        // In 64-bit mode the same bytes decode differently: `a1` takes an
        // 8-byte address that swallows the `0f 31`.
        let wide = scan(code, 0x10_0000, ScanMode::Bits64);
        assert_eq!(
            summary(&wide, 0x10_0000),
            vec![
                (0, 4, TrapKind::Rdrand { reg: 0, size: 8 }),
                (4, 4, TrapKind::Rdrand { reg: 1, size: 2 }),
                (8, 3, TrapKind::Rdseed { reg: 0, size: 4 }),
            ]
        );
        // Auto keeps only what both modes agree on.
        let auto = scan(code, 0x10_0000, ScanMode::Auto);
        assert_eq!(
            summary(&auto, 0x10_0000),
            vec![
                (4, 4, TrapKind::Rdrand { reg: 1, size: 2 }),
                (8, 3, TrapKind::Rdseed { reg: 0, size: 4 }),
            ]
        );
    }

    #[test]
    fn immediates_that_look_like_rdtsc_are_not_patched() {
        let code: &[u8] = &[0xb8, 0x00, 0x0f, 0x31, 0x00, 0xc3];
        for mode in [ScanMode::Bits32, ScanMode::Bits64, ScanMode::Auto] {
            assert!(scan(code, 0, mode).is_empty(), "{mode:?}");
        }
        assert_eq!(scan(&code[2..], 2, ScanMode::Auto).len(), 1);
    }

    #[test]
    fn kinds_print_their_assembly() {
        assert_eq!(TrapKind::Rdtsc.to_string(), "rdtsc");
        assert_eq!(RDRAND_EAX.to_string(), "rdrand eax");
        assert_eq!(TrapKind::Rdseed { reg: 15, size: 2 }.to_string(), "rdseed r15w");
        assert_eq!(TrapKind::Rdrand { reg: 9, size: 8 }.to_string(), "rdrand r9");
        let s = PatchSite {
            vaddr: Some(0xc000_1000),
            ..site(0x1000, &[0x0f, 0x31], TrapKind::Rdtsc)
        };
        assert_eq!(s.to_string(), "rdtsc at gpa 0x1000 (virtual 0xc0001000)");
    }

    #[test]
    fn apply_writes_traps_and_unpatch_view_restores() {
        let code: &[u8] = &[0x90, 0x0f, 0x31, 0x48, 0x0f, 0xc7, 0xf0, 0xc3];
        let mem = memory(0x10000);
        mem.write_slice(code, GuestAddress(0x2000)).unwrap();
        let table = PatchTable::new(scan(code, 0x2000, ScanMode::Bits64));
        assert_eq!(table.len(), 2);
        table.apply(&mem).unwrap();
        let mut now = vec![0u8; code.len()];
        mem.read_slice(&mut now, GuestAddress(0x2000)).unwrap();
        assert_eq!(now, [0x90, 0xe6, 0xe7, 0xe6, 0xe7, 0x90, 0x90, 0xc3], "{now:02x?}");
        // Applying again is harmless.
        table.apply(&mem).unwrap();
        let mut again = now.clone();
        mem.read_slice(&mut again, GuestAddress(0x2000)).unwrap();
        assert_eq!(again, now);
        table.unpatch_view(0x2000, &mut now);
        assert_eq!(now, code);
        // A window that cuts a site in half shows its half of the original.
        let mut window = [0u8; 3];
        mem.read_slice(&mut window, GuestAddress(0x2002)).unwrap();
        table.unpatch_view(0x2002, &mut window);
        assert_eq!(window, code[2..5]);
        // A site the guest rewrote is shown as it is now.
        mem.write_slice(&[0xcc], GuestAddress(0x2001)).unwrap();
        let mut rewritten = [0u8; 2];
        mem.read_slice(&mut rewritten, GuestAddress(0x2001)).unwrap();
        table.unpatch_view(0x2001, &mut rewritten);
        assert_eq!(rewritten, [0xcc, 0xe7]);
    }

    #[test]
    fn apply_refuses_memory_that_does_not_match_and_writes_nothing() {
        let mem = memory(0x10000);
        mem.write_slice(&[0x0f, 0x31], GuestAddress(0x100)).unwrap();
        let table = PatchTable::new(vec![
            site(0x100, &[0x0f, 0x31], TrapKind::Rdtsc),
            site(0x200, &[0x0f, 0x31], TrapKind::Rdtsc),
        ]);
        match table.apply(&mem) {
            Err(PatchError::Mismatch { gpa, found, .. }) => {
                assert_eq!(gpa, 0x200);
                assert_eq!(found, [0, 0]);
            }
            other => panic!("expected a mismatch, got {other:?}"),
        }
        let mut first = [0u8; 2];
        mem.read_slice(&mut first, GuestAddress(0x100)).unwrap();
        assert_eq!(first, [0x0f, 0x31], "nothing is written on error");

        let outside = PatchTable::new(vec![site(0xfffe, &[0x0f, 0x01, 0xf9], TrapKind::Rdtscp)]);
        assert!(matches!(
            outside.apply(&mem),
            Err(PatchError::OutsideMemory { gpa: 0xfffe, len: 3 })
        ));
    }

    #[test]
    fn table_drops_malformed_and_overlapping_sites_and_sorts() {
        let table = PatchTable::new(vec![
            site(0x30, &[0x0f, 0x31], TrapKind::Rdtsc),
            site(0x10, &[0x0f, 0x01, 0xf9], TrapKind::Rdtscp),
            site(0x11, &[0x0f, 0x31], TrapKind::Rdtsc), // overlaps 0x10..0x13
            site(0x40, &[0x0f], TrapKind::Rdtsc),       // too short
            site(0x50, &[0x0f, 0xc7, 0xf0], TrapKind::Rdrand { reg: 16, size: 4 }),
            site(0x60, &[0x0f, 0xc7, 0xf0], TrapKind::Rdrand { reg: 0, size: 3 }),
            PatchSite {
                len: 3,
                ..site(0x70, &[0x0f, 0x31], TrapKind::Rdtsc)
            },
            site(u64::MAX - 1, &[0x0f, 0x31], TrapKind::Rdtsc), // wraps
            site(u64::MAX - 2, &[0x0f, 0x31], TrapKind::Rdtsc),
        ]);
        let starts: Vec<u64> = table.sites().iter().map(|s| s.gpa).collect();
        assert_eq!(starts, vec![0x10, 0x30, u64::MAX - 2]);
        assert_eq!(table.site_at(0x30).map(|s| s.kind), Some(TrapKind::Rdtsc));
        assert_eq!(table.site_at(0x11), None);
        assert!(!table.is_empty());
        assert!(PatchTable::default().is_empty());
        // A view at the top of the address space neither overflows nor panics.
        let mut top = [0xe6u8, 0xe7];
        table.unpatch_view(u64::MAX - 2, &mut top);
        assert_eq!(top, [0x0f, 0x31]);
        let mut past = [0xe6u8, 0xe7, 0xe6, 0xe7];
        table.unpatch_view(u64::MAX - 2, &mut past);
        assert_eq!(past, [0x0f, 0x31, 0xe6, 0xe7]);
    }

    #[test]
    fn table_round_trips_through_serde_and_validates_on_the_way_in() {
        let table = PatchTable::new(vec![
            PatchSite {
                vaddr: Some(0xffff_ffff_8100_0000),
                ..site(0x100_0000, &[0x0f, 0x31], TrapKind::Rdtsc)
            },
            site(
                0x100_0010,
                &[0x41, 0x0f, 0xc7, 0xf8],
                TrapKind::Rdseed { reg: 8, size: 4 },
            ),
        ]);
        let bytes = postcard::to_allocvec(&table).unwrap();
        let back: PatchTable = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, table);
        assert_eq!(
            back.site_at_vaddr(0xffff_ffff_8100_0000).map(|s| s.gpa),
            Some(0x100_0000)
        );
        // A file that lists overlapping sites is normalised on the way in.
        let raw = TableRepr {
            sites: vec![
                site(0x10, &[0x0f, 0x31], TrapKind::Rdtsc),
                site(0x11, &[0x0f, 0x31], TrapKind::Rdtsc),
            ],
            copies: Vec::new(),
        };
        let bytes = postcard::to_allocvec(&raw).unwrap();
        let back: PatchTable = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.len(), 1);
    }

    fn regs_after_trap(rip_of_site: u64) -> kvm_regs {
        kvm_regs {
            rax: 0x1111_1111_1111_1111,
            rbx: 0x2222_2222_2222_2222,
            rcx: 0x3333_3333_3333_3333,
            rdx: 0x4444_4444_4444_4444,
            r15: 0x5555_5555_5555_5555,
            rflags: 0x2 | RFLAGS_ZF | RFLAGS_OF | RFLAGS_PF,
            rip: rip_of_site + u64::from(TRAP_LEN),
            ..Default::default()
        }
    }

    #[test]
    fn emulate_rdtsc_and_rdtscp() {
        let s = site(0x1000, &[0x0f, 0x31], TrapKind::Rdtsc);
        let mut regs = regs_after_trap(0x40_1000);
        emulate(&s, 0x0123_4567_89ab_cdef, 7, &mut regs);
        let expected = kvm_regs {
            rax: 0x89ab_cdef,
            rdx: 0x0123_4567,
            rip: 0x40_1002,
            ..regs_after_trap(0x40_1000)
        };
        assert_eq!(regs, expected);

        let s = site(0x1000, &[0x0f, 0x01, 0xf9], TrapKind::Rdtscp);
        let mut regs = regs_after_trap(0x40_1000);
        emulate(&s, 0xfedc_ba98_7654_3210, 0xdead_beef, &mut regs);
        let expected = kvm_regs {
            rax: 0x7654_3210,
            rdx: 0xfedc_ba98,
            rcx: 0xdead_beef,
            rip: 0x40_1003,
            ..regs_after_trap(0x40_1000)
        };
        assert_eq!(regs, expected);
    }

    #[test]
    fn emulate_rdrand_respects_operand_size() {
        let value = 0xa5a5_5a5a_0f0f_f0f0;
        /// Original bytes, kind, and how the registers should change.
        type Case = (&'static [u8], TrapKind, fn(&mut kvm_regs));
        let cases: [Case; 4] = [
            (&[0x0f, 0xc7, 0xf3], TrapKind::Rdrand { reg: 3, size: 4 }, |r| {
                r.rbx = 0x0f0f_f0f0
            }),
            (&[0x48, 0x0f, 0xc7, 0xf1], TrapKind::Rdrand { reg: 1, size: 8 }, |r| {
                r.rcx = 0xa5a5_5a5a_0f0f_f0f0
            }),
            (
                &[0x66, 0x41, 0x0f, 0xc7, 0xff],
                TrapKind::Rdseed { reg: 15, size: 2 },
                |r| r.r15 = 0x5555_5555_5555_f0f0,
            ),
            (&[0x66, 0x0f, 0xc7, 0xf8], TrapKind::Rdseed { reg: 0, size: 2 }, |r| {
                r.rax = 0x1111_1111_1111_f0f0
            }),
        ];
        for (bytes, kind, change) in cases {
            let s = site(0x1000, bytes, kind);
            let mut regs = regs_after_trap(0x7000);
            emulate(&s, value, 0, &mut regs);
            let mut expected = regs_after_trap(0x7000);
            change(&mut expected);
            expected.rflags = 0x2 | RFLAGS_CF;
            expected.rip = 0x7000 + bytes.len() as u64;
            assert_eq!(regs, expected, "{kind}");
        }
    }

    #[test]
    fn site_for_exit_finds_the_site_behind_rip() {
        let mem = memory(0x10000);
        // rdtsc; rdtsc; rdrand ecx; then an ordinary `out 0xe7, al`.
        let code: &[u8] = &[0x0f, 0x31, 0x0f, 0x31, 0x0f, 0xc7, 0xf1, 0xe6, 0xe7];
        mem.write_slice(code, GuestAddress(0x3000)).unwrap();
        let table = PatchTable::new(scan(code, 0x3000, ScanMode::Bits32));
        assert_eq!(table.len(), 3);
        table.apply(&mem).unwrap();
        let paging = PagingRegs::default();
        let cs_base = 0x2000;
        let found = |rip| table.site_for_exit(&mem, &paging, rip, cs_base).map(|s| s.gpa);
        assert_eq!(found(0x1002), Some(0x3000));
        assert_eq!(found(0x1004), Some(0x3002));
        assert_eq!(found(0x1006), Some(0x3004));
        assert_eq!(found(0x1009), None, "the guest's own out is no trap");
        assert_eq!(found(0x1003), None);
        assert_eq!(found(0), None);
        assert_eq!(found(u64::MAX), None);
        // The rdrand site, emulated from the exit's registers.
        let site = table.site_for_exit(&mem, &paging, 0x1006, cs_base).unwrap();
        let mut regs = kvm_regs {
            rip: 0x1006,
            ..Default::default()
        };
        emulate(site, 0x1_2345_6789, 0, &mut regs);
        assert_eq!((regs.rcx, regs.rip, regs.rflags & RFLAGS_CF), (0x2345_6789, 0x1007, 1));
        // Code the guest rewrote is not a site any more.
        mem.write_slice(&[0x90, 0x90], GuestAddress(0x3002)).unwrap();
        assert_eq!(found(0x1004), None);
    }

    /// The `altinstr` guest's sites: `rdtsc` in its slot, patched in place,
    /// and the two replacements, patched in `.altinstr_replacement` and
    /// expected as copies over the slot.
    #[test]
    fn scan_elf_follows_linux_alternatives_into_their_slots() {
        let image = nyx_guests::ALTINSTR;
        let sym = |name| u64::from(nyx_guests::symbol(image, name).unwrap());
        let (slot, lfence, rdtscp) = (sym("tsc_slot"), sym("repl_lfence"), sym("repl_rdtscp"));
        let table = scan_elf(image).unwrap();
        let sites: Vec<(u64, TrapKind, bool)> = table
            .sites()
            .iter()
            .map(|s| (s.gpa, s.kind, s.in_replacement))
            .collect();
        assert_eq!(
            sites,
            vec![
                (slot, TrapKind::Rdtsc, false),
                (lfence + 3, TrapKind::Rdtsc, true),
                (rdtscp, TrapKind::Rdtscp, true),
            ]
        );
        let copies: Vec<(u64, u64, TrapKind, &[u8])> = table
            .copies()
            .iter()
            .map(|c| (c.site.gpa, c.slot_gpa, c.site.kind, c.expect.as_slice()))
            .collect();
        assert_eq!(
            copies,
            vec![
                (slot, slot, TrapKind::Rdtscp, &[0xe6, 0xe5][..]),
                (slot + 3, slot, TrapKind::Rdtsc, &[0x0f, 0xae, 0xe8, 0xe6, 0xe5][..]),
            ]
        );

        // Patch a loaded copy, then do what Linux does: copy a replacement
        // (from patched memory) over the slot and pad it with nops.
        let mem = memory(64 << 20);
        drop(crate::loader::load(&mem, image, None, "").unwrap());
        table.apply(&mem).unwrap();
        let paging = PagingRegs::default();
        let found = |rip: u64| {
            table
                .site_for_exit(&mem, &paging, rip, 0)
                .map(|s| (s.gpa, s.kind, s.len))
        };
        assert_eq!(found(slot + 2), Some((slot, TrapKind::Rdtsc, 2)), "in place");
        let copy_over_slot = |repl: u64, len: usize| {
            let mut bytes = vec![0x90u8; 5];
            mem.read_slice(&mut bytes[..len], GuestAddress(repl)).unwrap();
            mem.write_slice(&bytes, GuestAddress(slot)).unwrap();
        };
        copy_over_slot(lfence, 5);
        assert_eq!(found(slot + 2), None, "lfence is no trap");
        assert_eq!(found(slot + 5), Some((slot + 3, TrapKind::Rdtsc, 2)));
        let mut shown = [0u8; 5];
        mem.read_slice(&mut shown, GuestAddress(slot)).unwrap();
        table.unpatch_view(slot, &mut shown);
        assert_eq!(shown, [0x0f, 0xae, 0xe8, 0x0f, 0x31], "gdb sees lfence; rdtsc");
        copy_over_slot(rdtscp, 3);
        assert_eq!(
            found(slot + 2),
            Some((slot, TrapKind::Rdtscp, 3)),
            "not the rdtsc patched there"
        );
        // Linux merges the nop run after the copied trap into one long nop.
        mem.write_slice(&[0x0f, 0x1f, 0x00], GuestAddress(slot + 2)).unwrap();
        assert_eq!(found(slot + 2), Some((slot, TrapKind::Rdtscp, 3)));
        // The replacements themselves trap on the other port, and are found
        // where they are too.
        assert_eq!(found(rdtscp + 2), Some((rdtscp, TrapKind::Rdtscp, 3)));
        // A plain run keeps no time sites, copies included.
        let mut cpuid_only = table.clone();
        cpuid_only.retain(|k| *k == TrapKind::Cpuid);
        assert!(cpuid_only.is_empty() && cpuid_only.copies().is_empty());
        // The table, copies included, goes through a trace and back.
        let back: PatchTable = postcard::from_bytes(&postcard::to_allocvec(&table).unwrap()).unwrap();
        assert_eq!(back, table);
    }

    #[test]
    fn copies_that_do_not_add_up_are_dropped() {
        let copy = |slot_gpa: u64, expect: &[u8]| AltCopy {
            site: PatchSite {
                in_replacement: true,
                ..site(0x1003, &[0x0f, 0x31], TrapKind::Rdtsc)
            },
            slot_gpa,
            expect: expect.to_vec(),
        };
        let good = copy(0x1000, &[0x0f, 0xae, 0xe8, 0xe6, 0xe5]);
        let table = PatchTable::with_copies(
            Vec::new(),
            vec![
                good.clone(),
                copy(0x1001, &[0x0f, 0xae, 0xe8, 0xe6, 0xe5]), // slot offset and length disagree
                copy(0x1004, &[0xe6, 0xe5]),                   // slot after the site
                copy(0x1000, &[0x0f, 0xae, 0xe8, 0xe6, 0xe7]), // wrong port
                AltCopy {
                    site: site(0x1003, &[0x0f, 0x31], TrapKind::Rdtsc),
                    ..good.clone()
                }, // not marked as a replacement site
            ],
        );
        assert_eq!(table.copies(), &[good]);
        // A view of just the copy's bytes, with the slot cut off, is left alone.
        let mut partial = [0xe6, 0xe5];
        table.unpatch_view(0x1003, &mut partial);
        assert_eq!(partial, [0xe6, 0xe5]);
    }

    #[test]
    fn site_for_exit_walks_the_guest_page_tables() {
        // 32-bit paging: virtual 0x40_0000.. maps to physical 0x5000.
        let mem = memory(0x10000);
        let pd = 0x1000u64;
        let pt = 0x2000u64;
        mem.write_obj((pt as u32) | 3, GuestAddress(pd + 4)).unwrap();
        mem.write_obj(0x5000u32 | 3, GuestAddress(pt)).unwrap();
        mem.write_slice(&[0x90, 0x0f, 0x31], GuestAddress(0x5000)).unwrap();
        let table = PatchTable::new(scan(&[0x90, 0x0f, 0x31], 0x5000, ScanMode::Bits32));
        table.apply(&mem).unwrap();
        let paging = PagingRegs {
            cr0: 1 | (1 << 31),
            cr3: pd,
            ..Default::default()
        };
        let site = table.site_for_exit(&mem, &paging, 0x40_0003, 0);
        assert_eq!(site.map(|s| s.gpa), Some(0x5001));
        assert_eq!(table.site_for_exit(&mem, &paging, 0x80_0003, 0), None);
    }

    #[test]
    fn trap_exit_is_a_one_byte_write_to_the_trap_port() {
        assert!(is_trap_exit(TRAP_PORT, &[0]));
        assert!(!is_trap_exit(TRAP_PORT, &[0, 0, 0, 0]));
        assert!(!is_trap_exit(0xe9, &[0]));
        assert!(!(0xec..=0xef).contains(&TRAP_PORT));
    }

    #[test]
    fn scan_elf_finds_the_rdtsc_of_the_test_guest() {
        let table = scan_elf(nyx_guests::RDTSC).unwrap();
        let read_tsc = u64::from(nyx_guests::symbol(nyx_guests::RDTSC, "read_tsc").unwrap());
        assert_eq!(table.len(), 1, "{:?}", table.sites());
        let s = &table.sites()[0];
        assert_eq!((s.gpa, s.vaddr, s.kind), (read_tsc, Some(read_tsc), TrapKind::Rdtsc));
        for (name, image) in nyx_guests::ALL {
            if *name != "rdtsc" {
                let table = scan_elf(image).unwrap();
                // smpwork reads its number of CPUs with one cpuid.
                let want: &[TrapKind] = if *name == "smpwork" { &[TrapKind::Cpuid] } else { &[] };
                let kinds: Vec<_> = table.sites().iter().map(|s| s.kind).collect();
                assert_eq!(kinds, want, "{name}: {:?}", table.sites());
            }
        }
        // Patch a loaded copy and read the instruction back through the table.
        let mem = memory(64 << 20);
        let setup = crate::loader::load(&mem, nyx_guests::RDTSC, None, "").unwrap();
        drop(setup);
        table.apply(&mem).unwrap();
        let mut bytes = [0u8; 2];
        mem.read_slice(&mut bytes, GuestAddress(read_tsc)).unwrap();
        assert_eq!(bytes, [0xe6, 0xe7]);
        table.unpatch_view(read_tsc, &mut bytes);
        assert_eq!(bytes, [0x0f, 0x31]);
    }

    #[test]
    fn scan_elf_uses_64_bit_mode_for_elf64_and_skips_data_segments() {
        use crate::loader::elf::tests::build;
        use crate::loader::elf::EM_X86_64;
        let code: &[u8] = &[0x48, 0x0f, 0xc7, 0xf0, 0xc3];
        let data: &[u8] = &[0x0f, 0x31];
        let image = build(
            Class::Elf64,
            EM_X86_64,
            0xffff_ffff_8100_0000,
            &[
                (1, 0x100_0000, 0xffff_ffff_8100_0000, code, 0x1000, PF_X),
                (1, 0x100_1000, 0xffff_ffff_8100_1000, data, 0x1000, 6),
            ],
        );
        let table = scan_elf(&image).unwrap();
        assert_eq!(table.len(), 1);
        let s = &table.sites()[0];
        assert_eq!(s.gpa, 0x100_0000);
        assert_eq!(s.vaddr, Some(0xffff_ffff_8100_0000));
        assert_eq!(s.kind, TrapKind::Rdrand { reg: 0, size: 8 });
        assert!(matches!(scan_elf(b"not an elf"), Err(PatchError::Image(_))));
    }

    /// Linux's `.init.data` (and `.rodata`) lie in executable segments: a
    /// `cpuid` there is the real-mode trampoline's, which Linux copies below
    /// 1 MiB for its APs, and must stay as it is.
    #[test]
    fn scan_elf_leaves_data_sections_of_executable_segments_alone() {
        use crate::loader::elf::tests::{build, with_sections};
        use crate::loader::elf::EM_X86_64;
        let base = 0xffff_ffff_81ae_4000u64;
        let bytes: &[u8] = &[
            0x0f, 0xa2, 0xc3, 0x90, // .init.text: cpuid; ret; nop
            0x0f, 0xa2, 0x0f, 0x31, // .init.data: "cpuid; rdtsc"
            0x90, 0x0f, 0x31, 0xc3, // .exit.text: nop; rdtsc; ret
        ];
        let image = build(
            Class::Elf64,
            EM_X86_64,
            base,
            &[(1, 0x1ae_4000, base, bytes, 0x1000, 7)],
        );
        let off = image.len() as u64 - bytes.len() as u64;
        let without_sections = scan_elf(&image).unwrap();
        assert_eq!(without_sections.len(), 4, "no section headers: the whole segment");
        let image = with_sections(
            image,
            &[
                (".init.text", 1, 0x6, base, off, 4),
                (".init.data", 1, 0x3, base + 4, off + 4, 4),
                (".exit.text", 1, 0x6, base + 8, off + 8, 4),
            ],
        );
        let table = scan_elf(&image).unwrap();
        let found: Vec<(u64, TrapKind)> = table.sites().iter().map(|s| (s.gpa, s.kind)).collect();
        assert_eq!(found, [(0x1ae_4000, TrapKind::Cpuid), (0x1ae_4009, TrapKind::Rdtsc)]);
    }

    /// End to end on a real vCPU: a patched `rdtsc` and `rdrand ecx` trap as
    /// one-byte writes to [`TRAP_PORT`]; after completing the exit (an
    /// `immediate_exit` entry) RIP is just past the trap, and [`emulate`]
    /// makes the guest see the values Nyx chose. Needs KVM (the shared probe).
    #[test]
    fn patched_guest_traps_and_sees_emulated_values() {
        use crate::loader::elf::tests::build;
        use crate::loader::elf::EM_386;
        use kvm_ioctls::VcpuExit;
        use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};

        let Some(kvm) = crate::vcpu_state::tests::test_kvm() else {
            return;
        };
        let code: &[u8] = &[
            0x0f, 0x31, // rdtsc
            0xe7, 0x80, // out 0x80, eax
            0x89, 0xd0, // mov eax, edx
            0xe7, 0x81, // out 0x81, eax
            0xb8, 0x11, 0x11, 0x11, 0x11, // mov eax, 0x11111111
            0x0f, 0xc7, 0xf1, // rdrand ecx
            0xe7, 0x82, // out 0x82, eax (must be untouched)
            0x89, 0xc8, // mov eax, ecx
            0xe7, 0x83, // out 0x83, eax
            0x0f, 0x92, 0xc0, // setc al
            0xe6, 0x84, // out 0x84, al
            0xf4, // hlt
        ];
        let seg = [(1, 0x10_0000, 0x10_0000, code, code.len() as u64, PF_X)];
        let image = build(Class::Elf32, EM_386, 0x10_0000, &seg);
        let table = scan_elf(&image).unwrap();
        assert_eq!(table.len(), 2);
        let mem = crate::memory::create(16).unwrap();
        let setup = crate::loader::load(&mem, &image, None, "").unwrap();
        table.apply(&mem).unwrap();

        let vm = kvm.create_vm().unwrap();
        for (slot, r) in mem.iter().enumerate() {
            let region = kvm_bindings::kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: mem.get_host_address(r.start_addr()).unwrap() as u64,
                flags: 0,
            };
            // SAFETY: the mapping outlives the VM, which is dropped at the end of this test.
            unsafe { vm.set_user_memory_region(region).unwrap() };
        }
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        crate::loader::configure_vcpu(&setup, &mut regs, &mut sregs);
        vcpu.set_sregs(&sregs).unwrap();
        vcpu.set_regs(&regs).unwrap();

        let values = [0x0123_4567_89ab_cdefu64, 0xfeed_face_cafe_f00d];
        let mut traps = 0;
        let mut outs = Vec::new();
        for _ in 0..50 {
            let trapped = match vcpu.run().unwrap() {
                VcpuExit::IoOut(port, data) if is_trap_exit(port, data) => true,
                VcpuExit::IoOut(port, data) => {
                    outs.push((port, data.to_vec()));
                    false
                }
                VcpuExit::Hlt => break,
                other => panic!("unexpected exit {other:?} after {outs:x?}"),
            };
            if !trapped {
                continue;
            }
            // Complete the port write before touching the registers.
            vcpu.set_kvm_immediate_exit(1);
            let completed = vcpu.run();
            assert!(completed.is_err(), "immediate_exit ran guest code");
            vcpu.set_kvm_immediate_exit(0);
            let mut regs = vcpu.get_regs().unwrap();
            let sregs = vcpu.get_sregs().unwrap();
            let paging = PagingRegs {
                cr0: sregs.cr0,
                cr3: sregs.cr3,
                cr4: sregs.cr4,
                efer: sregs.efer,
            };
            let site = table
                .site_for_exit(&mem, &paging, regs.rip, sregs.cs.base)
                .unwrap_or_else(|| panic!("no site behind rip {:#x}", regs.rip));
            let value = values[traps];
            emulate(site, value, 0, &mut regs);
            vcpu.set_regs(&regs).unwrap();
            traps += 1;
        }
        assert_eq!(traps, 2);
        assert_eq!(
            outs,
            vec![
                (0x80, 0x89ab_cdefu32.to_le_bytes().to_vec()),
                (0x81, 0x0123_4567u32.to_le_bytes().to_vec()),
                (0x82, 0x1111_1111u32.to_le_bytes().to_vec()),
                (0x83, 0xcafe_f00du32.to_le_bytes().to_vec()),
                (0x84, vec![1]),
            ]
        );
    }

    /// Instructions that keep a 64-bit sweep in step, and whether each is patched.
    const CHUNKS: &[(&[u8], bool)] = &[
        (&[0x90], false),
        (&[0xb8, 0x00, 0x0f, 0x31, 0x00], false),
        (&[0x48, 0x89, 0xc3], false),
        (&[0x0f, 0xc7, 0x0e], false),
        (&[0xf3, 0x0f, 0xc7, 0xf8], false),
        (&[0x0f, 0x31], true),
        (&[0x0f, 0x01, 0xf9], true),
        (&[0x0f, 0xc7, 0xf2], true),
        (&[0x48, 0x0f, 0xc7, 0xf8], true),
        (&[0x66, 0x45, 0x0f, 0xc7, 0xf5], true),
    ];

    proptest! {
        #[test]
        fn sweeps_in_step_find_exactly_the_planted_instructions(
            picks in proptest::collection::vec(0..CHUNKS.len(), 0..200),
        ) {
            let mut code = Vec::new();
            let mut planted = Vec::new();
            for i in picks {
                let (bytes, patched) = CHUNKS[i];
                if patched {
                    planted.push(code.len() as u64);
                }
                code.extend_from_slice(bytes);
            }
            let found: Vec<u64> = scan(&code, 0, ScanMode::Bits64).iter().map(|s| s.gpa).collect();
            prop_assert_eq!(found, planted);
        }

        #[test]
        fn apply_then_unpatch_view_gives_back_the_original(
            code in proptest::collection::vec(any::<u8>(), 0..2048),
            mode in prop_oneof![Just(ScanMode::Bits32), Just(ScanMode::Bits64), Just(ScanMode::Auto)],
            window in (0usize..2048, 0usize..2048),
        ) {
            let base = 0x1000u64;
            let mem = memory(0x2000);
            mem.write_slice(&code, GuestAddress(base)).unwrap();
            let table = PatchTable::new(scan(&code, base, mode));
            for s in table.sites() {
                let off = (s.gpa - base) as usize;
                prop_assert_eq!(&s.original[..], &code[off..off + usize::from(s.len)]);
            }
            table.apply(&mem).unwrap();
            let mut patched = vec![0u8; code.len()];
            mem.read_slice(&mut patched, GuestAddress(base)).unwrap();
            // Changed only inside sites, and each site holds its trap.
            for (i, (&p, &c)) in patched.iter().zip(&code).enumerate() {
                let inside = table.sites().iter().find(|s| {
                    (s.gpa..s.gpa + u64::from(s.len)).contains(&(base + i as u64))
                });
                match inside {
                    Some(s) => prop_assert_eq!(p, s.trap_bytes()[(base + i as u64 - s.gpa) as usize]),
                    None => prop_assert_eq!(p, c),
                }
            }
            let mut whole = patched.clone();
            table.unpatch_view(base, &mut whole);
            prop_assert_eq!(&whole, &code);
            let (a, b) = (window.0.min(code.len()), window.1.min(code.len()));
            let (lo, hi) = (a.min(b), a.max(b));
            let mut part = patched[lo..hi].to_vec();
            table.unpatch_view(base + lo as u64, &mut part);
            prop_assert_eq!(&part[..], &code[lo..hi]);
        }

        #[test]
        fn emulate_never_panics_and_lands_after_the_site(
            len in 2u8..=15,
            reg in 0u8..=255,
            size in 0u8..=255,
            value in any::<u64>(),
            rip in any::<u64>(),
        ) {
            let s = PatchSite {
                gpa: 0,
                vaddr: None,
                len,
                original: vec![0x90; usize::from(len)],
                kind: TrapKind::Rdseed { reg, size },
                in_replacement: false,
            };
            let mut regs = kvm_regs { rip, ..Default::default() };
            emulate(&s, value, 0, &mut regs);
            prop_assert_eq!(regs.rip, rip.wrapping_sub(2).wrapping_add(u64::from(len)));
            prop_assert_eq!(regs.rflags & RFLAGS_CF, 1);
        }
    }
}
