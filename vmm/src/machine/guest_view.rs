//! The guest as a debugger sees it: debug registers, and memory read and
//! written by virtual address through the guest's page tables.

use super::*;

impl Machine {
    /// Sets what the vCPU stops for: software breakpoints (int3 in guest
    /// memory, written by the caller), hardware breakpoints and watchpoints
    /// in DR0..DR3 with `dr7`, single-stepping. While single-stepping no
    /// interrupt is injected, so a step does not wander into a handler.
    pub fn set_guest_debug(&mut self, dbg: GuestDebug) -> Result<(), Error> {
        let mut control = 0;
        if dbg.sw_breakpoints || dbg.single_step || dbg.dr7 & 0xff != 0 {
            control |= kvm_bindings::KVM_GUESTDBG_ENABLE;
        }
        if dbg.sw_breakpoints {
            control |= kvm_bindings::KVM_GUESTDBG_USE_SW_BP;
        }
        if dbg.dr7 & 0xff != 0 {
            control |= kvm_bindings::KVM_GUESTDBG_USE_HW_BP;
        }
        if dbg.single_step {
            control |= kvm_bindings::KVM_GUESTDBG_SINGLESTEP;
        }
        let mut arch = kvm_bindings::kvm_guest_debug_arch::default();
        arch.debugreg[..4].copy_from_slice(&dbg.dr);
        arch.debugreg[7] = dbg.dr7;
        let k = kvm_bindings::kvm_guest_debug { control, pad: 0, arch };
        self.core
            .vcpu
            .set_guest_debug(&k)
            .map_err(kvm_err("KVM_SET_GUEST_DEBUG"))?;
        self.debug = dbg;
        self.core.debug = dbg;
        Ok(())
    }

    /// The debug configuration in force.
    pub fn guest_debug(&self) -> GuestDebug {
        self.debug
    }

    /// The vCPU's paging registers now.
    pub fn paging_regs(&self) -> Result<crate::paging::PagingRegs, Error> {
        let s = self.core.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        Ok(crate::paging::PagingRegs::of(&s))
    }

    /// The linear address of the vCPU's next instruction.
    pub fn linear_pc(&self) -> Result<u64, Error> {
        let rip = self.core.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?.rip;
        let s = self.core.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        Ok(crate::crash::CodeMode::linear(&s, rip))
    }

    /// Reads guest-virtual memory through the guest's page tables; patched
    /// instruction sites show their original bytes.
    pub fn read_virt(&self, gva: u64, buf: &mut [u8]) -> Result<(), Error> {
        let regs = self.paging_regs()?;
        let mut done = 0usize;
        while done < buf.len() {
            let addr = gva.wrapping_add(done as u64);
            let t = crate::paging::translate(&self.core.mem, &regs, addr)?;
            let n = (buf.len() - done).min(t.remaining_in_page as usize);
            self.read_phys(t.gpa, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Reads guest-physical memory; patched sites show their original bytes.
    pub fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), Error> {
        use vm_memory::Bytes;
        self.core
            .mem
            .read_slice(buf, vm_memory::GuestAddress(gpa))
            .map_err(|source| Error::PhysRead { gpa, source })?;
        self.core.patches.unpatch_view(gpa, buf);
        Ok(())
    }

    /// Writes guest-virtual memory through the guest's page tables (a
    /// debugger's write). The pages written join the set
    /// [`Machine::take_written`] returns, as the guest's own writes do, so
    /// a reverse debugger's checkpoints restore them when going back.
    pub fn write_virt(&mut self, gva: u64, buf: &[u8]) -> Result<(), Error> {
        use vm_memory::Bytes;
        let regs = self.paging_regs()?;
        let mut done = 0usize;
        while done < buf.len() {
            let addr = gva.wrapping_add(done as u64);
            let t = crate::paging::translate(&self.core.mem, &regs, addr)?;
            let n = (buf.len() - done).min(t.remaining_in_page as usize);
            self.core
                .mem
                .write_slice(&buf[done..done + n], vm_memory::GuestAddress(t.gpa))
                .map_err(|_| crate::paging::TranslateError::NotMapped(addr))?;
            self.core.written.insert(t.gpa >> 12);
            self.core.touched.insert(t.gpa >> 12);
            done += n;
        }
        Ok(())
    }
}
