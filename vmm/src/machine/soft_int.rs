//! Software interrupts that KVM could not execute.
//!
//! On the emulated KVM of hosts without VMX/SVM, `int3`, `int n`, `int1`
//! and `into` outside real mode stop the vCPU with an emulation failure
//! (KVM's instruction emulator implements them for real mode only). Linux
//! needs them: its `int3` self-test at boot and every run-time text patch
//! (static keys, jump labels, alternatives) go through `int3`. Nyx delivers
//! such an interrupt itself, as the CPU does: it reads the gate from the
//! IDT, switches to the stack the gate or the TSS names, pushes the frame
//! (SS, RSP, RFLAGS, CS and the return address past the instruction), and
//! loads CS:RIP from the gate, clearing IF for an interrupt gate.
//!
//! Handing the vector to KVM instead does not work: KVM injects #BP and #OF
//! as "soft" exceptions whose instruction length it does not report, so
//! `KVM_GET_VCPU_EVENTS` drops them and any state capture or interrupt
//! withdrawal before the next entry (a replay does both) would lose the
//! interrupt; vectors above 31 are not accepted as exceptions at all.
//! Delivery in Nyx leaves only architectural state (registers and the
//! frame in memory), which every capture and restore already carries.
//!
//! This needs nothing from outside the machine: it is a deterministic
//! function of the guest's registers and memory, so a recording and its
//! replay take the same exit (an [`ExitKind::SoftInt`] record) at the same
//! place. On hardware KVM these instructions never exit.
//!
//! Differences from the instruction, all irrelevant to a kernel's own
//! `int3`: the gate's DPL is not checked against CPL (a user-mode `int n`
//! through a DPL-0 gate is delivered instead of raising #GP), and a gate
//! that is not present, not an interrupt or trap gate, or in an LDT, or a
//! privilege change outside long mode, is left as the emulation failure
//! (a crash report), not turned into the fault the CPU would raise.

use super::*;

/// What became of a software interrupt KVM could not execute.
pub(super) enum SoftIntEnd {
    /// Delivered: an exit with this record.
    Delivered(ExitRecord),
    /// An `int3` while a debugger's software breakpoints are armed.
    Breakpoint(DebugStop),
}

/// A software-interrupt instruction found at RIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoftInt {
    /// The interrupt vector.
    pub vector: u8,
    /// The instruction's length in bytes.
    pub len: u8,
}

/// Decodes the software-interrupt instruction at the start of `code`, if
/// that is what it is. `into` raises #OF only when OF is set in `rflags`,
/// and is invalid (None) in 64-bit mode.
pub fn decode(code: &[u8], rflags: u64, long_mode: bool) -> Option<SoftInt> {
    const RFLAGS_OF: u64 = 1 << 11;
    match *code {
        [0xcc, ..] => Some(SoftInt { vector: 3, len: 1 }),
        [0xf1, ..] => Some(SoftInt { vector: 1, len: 1 }),
        [0xcd, n, ..] => Some(SoftInt { vector: n, len: 2 }),
        [0xce, ..] if !long_mode && rflags & RFLAGS_OF != 0 => Some(SoftInt { vector: 4, len: 1 }),
        _ => None,
    }
}

impl Machine {
    /// After an emulation failure: if the guest stopped at a software
    /// interrupt, delivers it and returns the exit's record; None when the
    /// failure is something else (a crash).
    pub(super) fn deliver_soft_interrupt(&mut self) -> Result<Option<SoftIntEnd>, Error> {
        let run = self.core.vcpu.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the
        // `internal` member of the union is the valid one.
        let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
        if suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            return Ok(None);
        }
        let regs = self.core.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = self.core.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let mode = crate::crash::CodeMode::of(&sregs);
        if mode == crate::crash::CodeMode::Bits16 {
            // Real mode: KVM emulates these itself; a failure here is real.
            return Ok(None);
        }
        let pc = crate::crash::CodeMode::linear(&sregs, regs.rip);
        let paging = crate::paging::PagingRegs::of(&sregs);
        // Two bytes, or the one before an unmapped page (`int3` may end one).
        let mut code = [0u8; 2];
        let read = |buf: &mut [u8]| crate::paging::read_virt(&self.core.mem, &paging, pc, buf).is_ok();
        let n = if read(&mut code) {
            2
        } else if read(&mut code[..1]) {
            1
        } else {
            0
        };
        let Some(si) = decode(&code[..n], regs.rflags, mode == crate::crash::CodeMode::Bits64) else {
            return Ok(None);
        };
        if si.vector == 3 && self.debug.sw_breakpoints {
            // A debugger's software breakpoints are int3 bytes in memory: a
            // #BP debug exit on hardware KVM, this failure here. The debugger
            // decides whether it is one of its own; if not it has Nyx
            // deliver it ([`Machine::deliver_stopped_int3`]).
            self.stopped_int3 = true;
            return Ok(Some(SoftIntEnd::Breakpoint(DebugStop {
                exception: 3,
                pc,
                dr6: 0,
            })));
        }
        self.deliver_at(regs, sregs, si, mode)
            .map(|r| r.map(SoftIntEnd::Delivered))
    }

    /// After a [`Stop::Debug`] at an `int3` that the debugger does not own
    /// (its software breakpoints are on): delivers that `int3` to the guest
    /// as the CPU would have. Returns false when the last stop was not such
    /// an `int3` (on hardware KVM it is a #BP exit, which KVM reinjects).
    pub fn deliver_stopped_int3(&mut self) -> Result<bool, Error> {
        if !std::mem::take(&mut self.stopped_int3) {
            return Ok(false);
        }
        let regs = self.core.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = self.core.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let mode = crate::crash::CodeMode::of(&sregs);
        Ok(self
            .deliver_at(regs, sregs, SoftInt { vector: 3, len: 1 }, mode)?
            .is_some())
    }

    fn deliver_at(
        &mut self,
        mut regs: kvm_bindings::kvm_regs,
        sregs: kvm_bindings::kvm_sregs,
        si: SoftInt,
        mode: crate::crash::CodeMode,
    ) -> Result<Option<ExitRecord>, Error> {
        let at = regs.rip;
        let mut sregs = sregs;
        let long = mode == crate::crash::CodeMode::Bits64;
        let ret = if long {
            regs.rip.wrapping_add(u64::from(si.len))
        } else {
            regs.rip.wrapping_add(u64::from(si.len)) & 0xffff_ffff
        };
        let mut written = Vec::new();
        if deliver(
            &self.core.mem,
            &mut regs,
            &mut sregs,
            si.vector,
            ret,
            long,
            &mut written,
        )
        .is_none()
        {
            // Not a delivery Nyx can make (no such gate, an LDT selector,
            // a privilege change outside long mode): the failure stands.
            return Ok(None);
        }
        self.core.vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        self.core.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        // kvm_run still describes the vCPU at the failure (IF as it was,
        // so "ready for interrupt injection"): a KVM_RUN that exits at once
        // refreshes it, so that no interrupt is injected into a handler
        // entered through an interrupt gate. Every mode does this here, and
        // any later capture's own refresh then changes nothing.
        crate::vcpu_state::complete_pending_exit(&mut self.core.vcpu).map_err(|source| Error::VcpuState {
            what: "refresh (after a software interrupt)",
            source,
        })?;
        // The frame is a write of Nyx's, which KVM's dirty log does not see.
        self.core.ctx().note_written(written);
        self.core.stats.soft_interrupts += 1;
        Ok(Some(ExitRecord {
            kind: ExitKind::SoftInt,
            addr: u64::from(si.vector),
            size: si.len,
            data: 0,
            rip: at,
        }))
    }
}

const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_NT: u64 = 1 << 14;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_VM: u64 = 1 << 17;

/// Delivers `vector` through the IDT the way the CPU does for a software
/// interrupt whose return address is `ret`, updating the registers and
/// pushing the frame into `mem`; the guest-physical pages written are
/// added to `written`. None when the delivery is not one Nyx makes.
fn deliver(
    mem: &GuestMemory,
    regs: &mut kvm_bindings::kvm_regs,
    sregs: &mut kvm_bindings::kvm_sregs,
    vector: u8,
    ret: u64,
    long: bool,
    written: &mut Vec<u64>,
) -> Option<()> {
    let paging = crate::paging::PagingRegs::of(sregs);
    let read = |addr: u64, buf: &mut [u8]| crate::paging::read_virt(mem, &paging, addr, buf).ok();
    let gate_size: u64 = if long { 16 } else { 8 };
    let offset = u64::from(vector) * gate_size;
    if offset.checked_add(gate_size - 1)? > u64::from(sregs.idt.limit) {
        return None;
    }
    let mut gate = [0u8; 16];
    read(sregs.idt.base.wrapping_add(offset), &mut gate[..gate_size as usize])?;
    let selector = u16::from_le_bytes([gate[2], gate[3]]);
    let attrs = gate[5];
    let present = attrs & 0x80 != 0;
    let kind = attrs & 0x0f;
    // 64-bit (and 32-bit) interrupt gate 0xE, trap gate 0xF.
    if !present || !(kind == 0xe || kind == 0xf) || selector & 4 != 0 || selector & !3 == 0 {
        return None;
    }
    let mut target =
        u64::from(u16::from_le_bytes([gate[0], gate[1]])) | u64::from(u16::from_le_bytes([gate[6], gate[7]])) << 16;
    if long {
        target |= u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]])) << 32;
    }
    let mut desc = [0u8; 8];
    let index = u64::from(selector >> 3);
    if index * 8 + 7 > u64::from(sregs.gdt.limit) {
        return None;
    }
    read(sregs.gdt.base.wrapping_add(index * 8), &mut desc)?;
    let mut cs = crate::loader::gdt::segment(u64::from_le_bytes(desc), selector >> 3);
    if cs.present == 0 || cs.s == 0 || cs.type_ & 0x8 == 0 {
        return None;
    }
    let cpl = sregs.cs.selector & 3;
    let new_cpl = u16::from(cs.dpl);
    cs.selector = (selector & !3) | new_cpl;
    let ist = if long { gate[4] & 7 } else { 0 };
    let switch = new_cpl < cpl;
    if switch && !long {
        return None;
    }
    let (old_ss, old_rsp) = (sregs.ss, regs.rsp);
    let mut rsp = regs.rsp;
    if ist != 0 || switch {
        // The 64-bit TSS: RSP0..2 at 4, IST1..7 at 0x24.
        let at = if ist != 0 {
            0x24 + (u64::from(ist) - 1) * 8
        } else {
            4 + u64::from(new_cpl) * 8
        };
        if at + 7 > u64::from(sregs.tr.limit) {
            return None;
        }
        let mut v = [0u8; 8];
        read(sregs.tr.base.wrapping_add(at), &mut v)?;
        rsp = u64::from_le_bytes(v);
    }
    let mut frame: Vec<u64> = Vec::with_capacity(5);
    let width: u64 = if long { 8 } else { 4 };
    if long {
        rsp &= !0xf;
        frame.extend([u64::from(old_ss.selector), old_rsp]);
    } else if switch {
        return None;
    }
    frame.extend([regs.rflags, u64::from(sregs.cs.selector), ret]);
    let linear = |sp: u64| {
        if long {
            sp
        } else {
            sregs.ss.base.wrapping_add(sp) & 0xffff_ffff
        }
    };
    for v in frame {
        rsp = rsp.wrapping_sub(width);
        if !long {
            rsp &= 0xffff_ffff;
        }
        let bytes = v.to_le_bytes();
        let addr = linear(rsp);
        crate::paging::write_virt(mem, &paging, addr, &bytes[..width as usize]).ok()?;
        for a in [addr, addr.wrapping_add(width - 1)] {
            if let Ok(t) = crate::paging::translate(mem, &paging, a) {
                written.push(t.gpa >> 12);
            }
        }
    }
    if switch {
        // Long mode loads SS with a null selector of the new CPL.
        sregs.ss.selector = new_cpl;
        sregs.ss.dpl = new_cpl as u8;
    }
    regs.rsp = rsp;
    regs.rip = target;
    regs.rflags &= !(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM);
    if kind == 0xe {
        regs.rflags &= !RFLAGS_IF;
    }
    sregs.cs = cs;
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_software_interrupt() {
        assert_eq!(decode(&[0xcc, 0x90], 0, true), Some(SoftInt { vector: 3, len: 1 }));
        assert_eq!(decode(&[0xf1, 0x90], 0, true), Some(SoftInt { vector: 1, len: 1 }));
        assert_eq!(decode(&[0xcd, 0x80], 0, true), Some(SoftInt { vector: 0x80, len: 2 }));
        assert_eq!(
            decode(&[0xce, 0x90], 1 << 11, false),
            Some(SoftInt { vector: 4, len: 1 })
        );
    }

    #[test]
    fn into_without_overflow_or_in_long_mode_is_not_an_interrupt() {
        assert_eq!(decode(&[0xce, 0x90], 0, false), None);
        assert_eq!(decode(&[0xce, 0x90], 1 << 11, true), None);
    }

    #[test]
    fn other_instructions_are_not_software_interrupts() {
        assert_eq!(decode(&[0x48, 0x0f], 0, true), None);
        assert_eq!(decode(&[0x0f, 0xae], 0, true), None);
        assert_eq!(decode(&[0xcd], 0, true), None, "int n cut short");
        assert_eq!(decode(&[], 0, true), None);
    }
}
