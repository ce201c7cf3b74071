//! Which guest memory the instruction at RIP reads and writes: its explicit
//! memory operands, decoded with capstone and resolved against the vCPU's
//! registers and segment bases. A debugger uses it for read and access
//! watchpoints where the hardware's data breakpoints do not fire (they are
//! then checked by single-stepping, as write watchpoints are).
//!
//! Implicit accesses that capstone does not list as operands (the stack of
//! `push`/`pop`/`call`/`ret`, descriptor-table reads) are not reported.

use capstone::arch::x86::{ArchMode, X86OperandType};
use capstone::arch::{BuildsCapstone, DetailsArchInsn};
use capstone::{Capstone, RegId};
use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::crash::CodeMode;
use crate::memory::GuestMemory;

/// One memory access of an instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// The linear address.
    pub addr: u64,
    /// Bytes accessed.
    pub len: u64,
    /// The instruction reads them.
    pub read: bool,
    /// The instruction writes them.
    pub write: bool,
}

impl Access {
    /// Whether the access touches any byte of `[addr, addr + len)`.
    pub fn overlaps(&self, addr: u64, len: u64) -> bool {
        self.addr < addr.saturating_add(len) && addr < self.addr.saturating_add(self.len)
    }
}

/// The value of register `name` (capstone's name: rax, eax, ax, al, r8d,
/// rip...). None for a register this does not know.
fn reg_value(name: &str, r: &kvm_regs, next_ip: u64) -> Option<u64> {
    let full = |n: &str| -> Option<u64> {
        Some(match n {
            "ax" => r.rax,
            "bx" => r.rbx,
            "cx" => r.rcx,
            "dx" => r.rdx,
            "si" => r.rsi,
            "di" => r.rdi,
            "sp" => r.rsp,
            "bp" => r.rbp,
            "8" => r.r8,
            "9" => r.r9,
            "10" => r.r10,
            "11" => r.r11,
            "12" => r.r12,
            "13" => r.r13,
            "14" => r.r14,
            "15" => r.r15,
            "ip" => next_ip,
            _ => return None,
        })
    };
    if let Some(n) = name.strip_prefix('r') {
        // rax, r8, r8d, r8w, r8b, rip.
        if let Some(n) = n.strip_suffix('d') {
            return full(n).map(|v| v & 0xffff_ffff);
        }
        if let Some(n) = n.strip_suffix('w') {
            return full(n).map(|v| v & 0xffff);
        }
        if let Some(n) = n.strip_suffix('b') {
            return full(n).map(|v| v & 0xff);
        }
        return full(n);
    }
    if let Some(n) = name.strip_prefix('e') {
        return full(n).map(|v| v & 0xffff_ffff);
    }
    full(name).map(|v| v & 0xffff)
}

/// The memory accesses of the instruction whose bytes are `code`, at RIP,
/// in `mode`. Empty when it does not decode.
pub fn decode(code: &[u8], regs: &kvm_regs, sregs: &kvm_sregs, mode: CodeMode) -> Vec<Access> {
    let m = match mode {
        CodeMode::Bits16 => ArchMode::Mode16,
        CodeMode::Bits32 => ArchMode::Mode32,
        CodeMode::Bits64 => ArchMode::Mode64,
    };
    let Ok(cs) = Capstone::new().x86().mode(m).detail(true).build() else {
        return Vec::new();
    };
    let Ok(insns) = cs.disasm_count(code, regs.rip, 1) else {
        return Vec::new();
    };
    let Some(insn) = insns.iter().next() else {
        return Vec::new();
    };
    let Ok(detail) = cs.insn_detail(insn) else {
        return Vec::new();
    };
    let next_ip = regs.rip.wrapping_add(insn.len() as u64);
    let name = |r: RegId| cs.reg_name(r).unwrap_or_default();
    let mut out = Vec::new();
    let arch = detail.arch_detail();
    let Some(x86) = arch.x86() else {
        return out;
    };
    for op in x86.operands() {
        let X86OperandType::Mem(mem) = op.op_type else {
            continue;
        };
        let value = |r: RegId| {
            if r.0 == 0 {
                Some(0)
            } else {
                reg_value(&name(r), regs, next_ip)
            }
        };
        let (Some(base), Some(index)) = (value(mem.base()), value(mem.index())) else {
            continue;
        };
        let mut addr = base
            .wrapping_add(index.wrapping_mul(mem.scale() as u64))
            .wrapping_add(mem.disp() as u64);
        let seg = name(mem.segment());
        let base_reg = name(mem.base());
        let seg_base = match (mode, seg.as_str()) {
            (_, "fs") => sregs.fs.base,
            (_, "gs") => sregs.gs.base,
            (CodeMode::Bits64, _) => 0,
            (_, "es") => sregs.es.base,
            (_, "cs") => sregs.cs.base,
            (_, "ss") => sregs.ss.base,
            (_, "ds") => sregs.ds.base,
            _ if base_reg.ends_with("sp") || base_reg.ends_with("bp") => sregs.ss.base,
            _ => sregs.ds.base,
        };
        addr = match mode {
            CodeMode::Bits64 => addr.wrapping_add(seg_base),
            CodeMode::Bits32 => (addr & 0xffff_ffff).wrapping_add(seg_base) & 0xffff_ffff,
            CodeMode::Bits16 => (addr & 0xffff).wrapping_add(seg_base) & 0xffff_ffff,
        };
        let (read, write) = match op.access {
            Some(a) => (a.is_readable(), a.is_writable()),
            None => (true, false),
        };
        // `lea` and `nop` name memory without touching it.
        let mnemonic = insn.mnemonic().unwrap_or("");
        if mnemonic.starts_with("lea") || mnemonic.starts_with("nop") || mnemonic.starts_with("prefetch") {
            continue;
        }
        out.push(Access {
            addr,
            len: u64::from(op.size.max(1)),
            read,
            write,
        });
    }
    out
}

/// Which of `ranges` (linear address, length, whether a write counts too)
/// the instruction at `m`'s RIP reads (or writes, where that counts): the
/// index of the first, or None (none, no ranges, or no registers). Read and
/// access watchpoints checked by stepping ask this before each step.
pub fn first_accessed(m: &crate::Machine, ranges: &[(u64, u64, bool)]) -> Option<usize> {
    if ranges.is_empty() {
        return None;
    }
    let regs = m.vcpu().get_regs().ok()?;
    let sregs = m.vcpu().get_sregs().ok()?;
    let accesses = at_rip(m.memory(), &regs, &sregs);
    ranges.iter().position(|&(addr, len, writes)| {
        accesses
            .iter()
            .any(|a| a.overlaps(addr, len) && (a.read || (writes && a.write)))
    })
}

/// The memory accesses of the instruction at the vCPU's RIP.
pub fn at_rip(mem: &GuestMemory, regs: &kvm_regs, sregs: &kvm_sregs) -> Vec<Access> {
    let mode = CodeMode::of(sregs);
    let linear = CodeMode::linear(sregs, regs.rip);
    let paging = crate::paging::PagingRegs::of(sregs);
    // An instruction is at most 15 bytes; it may end before an unmapped page.
    let mut code = [0u8; 15];
    let mut n = code.len();
    while n > 0 && crate::paging::read_virt(mem, &paging, linear, &mut code[..n]).is_err() {
        n -= 1;
    }
    decode(&code[..n], regs, sregs, mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn long_mode() -> kvm_sregs {
        let mut s = kvm_sregs {
            cr0: 1,
            efer: 1 << 10,
            ..Default::default()
        };
        s.cs.l = 1;
        s
    }

    #[test]
    fn rip_relative_increment_reads_and_writes() {
        // incq 0x1000(%rip) at 0x2000: 48 ff 05 00 10 00 00 (7 bytes).
        let regs = kvm_regs {
            rip: 0x2000,
            ..Default::default()
        };
        let a = decode(
            &[0x48, 0xff, 0x05, 0x00, 0x10, 0x00, 0x00],
            &regs,
            &long_mode(),
            CodeMode::Bits64,
        );
        assert_eq!(
            a,
            vec![Access {
                addr: 0x2007 + 0x1000,
                len: 8,
                read: true,
                write: true
            }]
        );
    }

    #[test]
    fn based_indexed_load_and_store() {
        let regs = kvm_regs {
            rip: 0x100,
            rdx: 0x5000,
            rcx: 3,
            rax: 7,
            ..Default::default()
        };
        // mov (%rdx,%rcx,8),%rax: 48 8b 04 ca
        let load = decode(&[0x48, 0x8b, 0x04, 0xca], &regs, &long_mode(), CodeMode::Bits64);
        assert_eq!(load.len(), 1);
        assert_eq!(
            (load[0].addr, load[0].len, load[0].read, load[0].write),
            (0x5018, 8, true, false)
        );
        // mov %eax,0x10(%rdx): 89 42 10
        let store = decode(&[0x89, 0x42, 0x10], &regs, &long_mode(), CodeMode::Bits64);
        assert_eq!(
            (store[0].addr, store[0].len, store[0].read, store[0].write),
            (0x5010, 4, false, true)
        );
        assert!(store[0].overlaps(0x5012, 1) && !store[0].overlaps(0x5014, 4));
        // lea 0x10(%rdx),%rax touches nothing: 48 8d 42 10
        assert!(decode(&[0x48, 0x8d, 0x42, 0x10], &regs, &long_mode(), CodeMode::Bits64).is_empty());
    }

    #[test]
    fn protected_mode_adds_the_segment_base() {
        let mut s = kvm_sregs {
            cr0: 1,
            ..Default::default()
        };
        s.cs.db = 1;
        s.ds.base = 0x1_0000;
        let regs = kvm_regs {
            rbx: 0x20,
            ..Default::default()
        };
        // mov (%ebx),%eax: 8b 03
        let a = decode(&[0x8b, 0x03], &regs, &s, CodeMode::Bits32);
        assert_eq!(a[0].addr, 0x1_0020);
    }

    proptest! {
        /// Any bytes decode to some accesses or none, never a panic.
        #[test]
        fn any_bytes_decode(code in proptest::collection::vec(any::<u8>(), 0..15), rip in any::<u64>(), rsp in any::<u64>()) {
            let regs = kvm_regs { rip, rsp, ..Default::default() };
            for mode in [CodeMode::Bits16, CodeMode::Bits32, CodeMode::Bits64] {
                let _ = decode(&code, &regs, &long_mode(), mode);
            }
        }
    }
}
