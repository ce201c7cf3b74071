//! Crash reports: what the vCPU looked like when the guest died (triple
//! fault, failed VM entry, emulation failure), with a capstone disassembly of
//! the code at RIP.

use std::fmt;

use capstone::prelude::*;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use serde::{Deserialize, Serialize};

use crate::memory::GuestMemory;
use crate::paging::{self, PagingRegs};

/// The CPU mode code at RIP runs in, as capstone needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CodeMode {
    /// 16-bit (real mode or a 16-bit code segment).
    Bits16,
    /// 32-bit protected mode or compatibility mode.
    Bits32,
    /// 64-bit long mode.
    Bits64,
}

impl CodeMode {
    /// The mode of the code segment `cs` under `cr0`/`efer`.
    pub fn of(sregs: &kvm_sregs) -> Self {
        if sregs.cr0 & 1 == 0 {
            CodeMode::Bits16
        } else if sregs.efer & (1 << 10) != 0 && sregs.cs.l != 0 {
            CodeMode::Bits64
        } else if sregs.cs.db != 0 {
            CodeMode::Bits32
        } else {
            CodeMode::Bits16
        }
    }

    /// The linear address of instruction pointer `ip` in the code segment
    /// of `sregs`: CS's base counts outside 64-bit mode, where addresses
    /// wrap at 4 GiB.
    pub fn linear(sregs: &kvm_sregs, ip: u64) -> u64 {
        match CodeMode::of(sregs) {
            CodeMode::Bits64 => ip,
            _ => sregs.cs.base.wrapping_add(ip) & 0xffff_ffff,
        }
    }
}

/// Disassembles `code` located at `addr`, at most `max` instructions, one
/// line each (`address: bytes  mnemonic operands`).
pub fn disassemble(code: &[u8], addr: u64, mode: CodeMode, max: usize) -> Vec<String> {
    let m = match mode {
        CodeMode::Bits16 => arch::x86::ArchMode::Mode16,
        CodeMode::Bits32 => arch::x86::ArchMode::Mode32,
        CodeMode::Bits64 => arch::x86::ArchMode::Mode64,
    };
    let cs = match Capstone::new().x86().mode(m).syntax(arch::x86::ArchSyntax::Att).build() {
        Ok(cs) => cs,
        Err(e) => return vec![format!("(no disassembler: {e})")],
    };
    let lines = match cs.disasm_count(code, addr, max) {
        Ok(insns) if !insns.is_empty() => insns
            .iter()
            .map(|i| {
                let bytes: Vec<String> = i.bytes().iter().map(|b| format!("{b:02x}")).collect();
                format!(
                    "{:#018x}: {:<24} {} {}",
                    i.address(),
                    bytes.join(" "),
                    i.mnemonic().unwrap_or("?"),
                    i.op_str().unwrap_or("")
                )
            })
            .collect(),
        _ => {
            let bytes: Vec<String> = code.iter().take(16).map(|b| format!("{b:02x}")).collect();
            vec![format!("{addr:#018x}: {} (not decodable)", bytes.join(" "))]
        }
    };
    lines
}

/// Whether one of the first `max` instructions of `code` (at `addr`) is a
/// jump, conditional branch or `loop` back to `addr` or at most `reach`
/// bytes before it: the code at `addr` is the body of a short loop.
pub fn backward_branch_within(code: &[u8], addr: u64, mode: CodeMode, max: usize, reach: u64) -> bool {
    use capstone::arch::x86::X86OperandType;
    use capstone::arch::ArchOperand;
    let m = match mode {
        CodeMode::Bits16 => arch::x86::ArchMode::Mode16,
        CodeMode::Bits32 => arch::x86::ArchMode::Mode32,
        CodeMode::Bits64 => arch::x86::ArchMode::Mode64,
    };
    let Ok(cs) = Capstone::new().x86().mode(m).detail(true).build() else {
        return false;
    };
    let Ok(insns) = cs.disasm_count(code, addr, max) else {
        return false;
    };
    for i in insns.iter() {
        let name = i.mnemonic().unwrap_or("");
        if !(name.starts_with('j') || name.starts_with("loop")) {
            continue;
        }
        let Ok(detail) = cs.insn_detail(i) else { continue };
        for op in detail.arch_detail().operands() {
            if let ArchOperand::X86Operand(o) = op {
                if let X86OperandType::Imm(target) = o.op_type {
                    let target = target as u64;
                    if target <= addr && addr - target <= reach {
                        return true;
                    }
                }
            }
        }
    }
    false
}

/// A segment register as the report shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Selector.
    pub selector: u16,
    /// Base.
    pub base: u64,
    /// Limit.
    pub limit: u32,
    /// Type, S, DPL, P, AVL, L, DB, G packed as in a descriptor's access bytes.
    pub attrs: u32,
}

impl From<&kvm_segment> for Segment {
    fn from(s: &kvm_segment) -> Self {
        let attrs = u32::from(s.type_)
            | u32::from(s.s) << 4
            | u32::from(s.dpl) << 5
            | u32::from(s.present) << 7
            | u32::from(s.avl) << 12
            | u32::from(s.l) << 13
            | u32::from(s.db) << 14
            | u32::from(s.g) << 15;
        Segment {
            selector: s.selector,
            base: s.base,
            limit: s.limit,
            attrs,
        }
    }
}

/// Everything the report shows of the vCPU.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuView {
    /// rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8..r15 in that order.
    pub gpr: [u64; 16],
    /// RIP.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// cs, ds, es, fs, gs, ss, tr, ldt.
    pub segs: [Segment; 8],
    /// GDTR base and limit.
    pub gdt: (u64, u16),
    /// IDTR base and limit.
    pub idt: (u64, u16),
    /// cr0, cr2, cr3, cr4, cr8.
    pub cr: [u64; 5],
    /// EFER.
    pub efer: u64,
}

impl CpuView {
    /// Takes the view from KVM's register structures.
    pub fn new(r: &kvm_regs, s: &kvm_sregs) -> Self {
        CpuView {
            gpr: [
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14,
                r.r15,
            ],
            rip: r.rip,
            rflags: r.rflags,
            segs: [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt].map(Segment::from),
            gdt: (s.gdt.base, s.gdt.limit),
            idt: (s.idt.base, s.idt.limit),
            cr: [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8],
            efer: s.efer,
        }
    }
}

impl fmt::Display for CpuView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 16] = [
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
            "r15",
        ];
        for (i, (n, v)) in NAMES.iter().zip(self.gpr).enumerate() {
            write!(f, "{n:>4} {v:#018x}")?;
            f.write_str(if i % 4 == 3 { "\n" } else { "  " })?;
        }
        writeln!(f, " rip {:#018x}  rflags {:#010x}", self.rip, self.rflags)?;
        for (n, s) in ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"].iter().zip(self.segs) {
            writeln!(
                f,
                "{n:>4} sel {:#06x} base {:#018x} limit {:#010x} attr {:#06x}",
                s.selector, s.base, s.limit, s.attrs
            )?;
        }
        writeln!(
            f,
            " gdt {:#018x}/{:#06x}  idt {:#018x}/{:#06x}",
            self.gdt.0, self.gdt.1, self.idt.0, self.idt.1
        )?;
        writeln!(
            f,
            " cr0 {:#010x}  cr2 {:#018x}  cr3 {:#018x}  cr4 {:#010x}  cr8 {:#x}",
            self.cr[0], self.cr[1], self.cr[2], self.cr[3], self.cr[4]
        )?;
        write!(f, "efer {:#x}", self.efer)
    }
}

/// Why and where the guest died.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrashReport {
    /// One line: what happened.
    pub reason: String,
    /// The vCPU at the crash.
    pub cpu: CpuView,
    /// Disassembly starting at RIP (or a note that the code is unreadable).
    pub code: Vec<String>,
}

impl CrashReport {
    /// Builds a report for `reason` from the vCPU registers and guest memory.
    pub fn new(reason: String, regs: &kvm_regs, sregs: &kvm_sregs, mem: &GuestMemory) -> Self {
        let mode = CodeMode::of(sregs);
        let linear = CodeMode::linear(sregs, regs.rip);
        let pr = PagingRegs::of(sregs);
        let mut code = [0u8; 48];
        let code = match paging::read_virt(mem, &pr, linear, &mut code) {
            Ok(()) => disassemble(&code, regs.rip, mode, 6),
            Err(e) => {
                // Fewer bytes may still be readable up to the end of the page.
                vec![format!("(code at rip not readable: {e})")]
            }
        };
        CrashReport {
            reason,
            cpu: CpuView::new(regs, sregs),
            code,
        }
    }
}

impl CrashReport {
    /// One line: the reason and where (`... at rip 0x...`).
    pub fn summary(&self) -> String {
        format!("{} at rip {:#x}", self.reason, self.cpu.rip)
    }
}

impl fmt::Display for CrashReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "guest crashed: {}", self.reason)?;
        writeln!(f, "{}", self.cpu)?;
        writeln!(f, "code at rip:")?;
        for l in &self.code {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn disassembles_in_each_mode() {
        // mov $1, %eax; hlt
        let code = [0xb8, 1, 0, 0, 0, 0xf4];
        let l = disassemble(&code, 0x1000, CodeMode::Bits32, 4);
        assert_eq!(l.len(), 2);
        assert!(l[0].contains("movl") && l[0].contains("$1, %eax"), "{l:?}");
        assert!(l[1].contains("hlt"));
        // 48 31 c0 = xor %rax,%rax in 64-bit mode only.
        let l = disassemble(&[0x48, 0x31, 0xc0], 0, CodeMode::Bits64, 1);
        assert!(l[0].contains("xorq") && l[0].contains("%rax"), "{l:?}");
        let l = disassemble(&[0xff, 0xff], 0, CodeMode::Bits64, 1);
        assert!(l[0].contains("not decodable"), "{l:?}");
    }

    #[test]
    fn finds_short_backward_loops() {
        // 0x1000: incq 0xefc(%rip); 0x1007: jmp 0x1000
        let code = [0x48, 0xff, 0x05, 0xfc, 0x0e, 0, 0, 0xeb, 0xf7];
        assert!(backward_branch_within(&code, 0x1000, CodeMode::Bits64, 4, 64));
        assert!(backward_branch_within(&code[7..], 0x1007, CodeMode::Bits64, 4, 64));
        // A forward jump and a far backward one are not short loops.
        assert!(!backward_branch_within(&[0xeb, 0x10], 0x1000, CodeMode::Bits64, 4, 64));
        assert!(!backward_branch_within(
            &[0xe9, 0x00, 0xf0, 0xff, 0xff],
            0x10000,
            CodeMode::Bits64,
            4,
            64
        ));
        assert!(!backward_branch_within(&[0x90, 0x90], 0x1000, CodeMode::Bits64, 4, 64));
    }

    #[test]
    fn report_reads_code_through_the_segment_base() {
        let mem = crate::memory::create(4).unwrap();
        mem.write_slice(&[0x0f, 0x0b], GuestAddress(0x10_0010)).unwrap(); // ud2
        let regs = kvm_regs {
            rip: 0x10,
            rax: 0x2bad_b002,
            ..Default::default()
        };
        let mut sregs = kvm_sregs {
            cr0: 1,
            ..Default::default()
        };
        sregs.cs.base = 0x10_0000;
        sregs.cs.db = 1;
        let r = CrashReport::new("triple fault".into(), &regs, &sregs, &mem);
        let text = r.to_string();
        assert!(text.starts_with("guest crashed: triple fault"));
        assert!(text.contains("ud2"), "{text}");
        assert!(text.contains("rax 0x000000002badb002"), "{text}");
        assert!(text.contains("efer 0x0"));
    }
}
