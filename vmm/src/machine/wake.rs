//! Waking from ACPI S3: the CPU context is gone, and on a PC the firmware
//! jumps to the waking vector the OS left in the FACS, in real mode. Nyx
//! has no firmware, so it does that jump itself: it finds the FACS through
//! the RSDP and FADT in guest memory (as the guest may have moved nothing,
//! but reads them as the guest sees them) and puts the vCPU in real mode
//! at `CS = vector >> 4`, `IP = vector & 0xF`.

use super::*;

impl Machine {
    /// Puts the vCPU at the FACS firmware waking vector in real mode. A
    /// machine without a waking vector (0, or no FACS found) goes on after
    /// the instruction that slept, as from S1.
    pub(super) fn resume_at_waking_vector(&mut self) -> Result<(), Error> {
        let Some(vector) = crate::acpi::firmware_waking_vector(&self.core.mem).filter(|&v| v != 0) else {
            tracing::warn!("woken from S3 without a waking vector in the FACS: going on where it slept");
            return Ok(());
        };
        // KVM completes the sleeping `out` on the next entry and refuses
        // register changes before that.
        crate::vcpu_state::complete_pending_exit(&mut self.core.vcpu)
            .map_err(vcpu_err("complete the pending exit of"))?;
        let mut sregs = self.core.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        real_mode_at(&mut sregs, vector);
        let regs = kvm_bindings::kvm_regs {
            rip: u64::from(vector & 0xf),
            rflags: 2,
            ..Default::default()
        };
        self.core.vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        self.core.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        tracing::info!(vector = format_args!("{vector:#x}"), "resuming at the FACS waking vector");
        Ok(())
    }
}

/// Real mode, paging and long mode off, with CS:IP at `vector`'s segment
/// and the data segments at 0, 64 KiB limits, the real-mode IVT at 0.
fn real_mode_at(sregs: &mut kvm_bindings::kvm_sregs, vector: u32) {
    let seg = |selector: u16, type_: u8| kvm_bindings::kvm_segment {
        base: u64::from(selector) << 4,
        limit: 0xffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = seg((vector >> 4) as u16, 0xb);
    for s in [&mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss] {
        *s = seg(0, 0x3);
    }
    sregs.cr0 &= !(1 | (1 << 31));
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs.idt = kvm_bindings::kvm_dtable {
        base: 0,
        limit: 0x3ff,
        ..Default::default()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_waking_vector_becomes_cs_ip() {
        let mut s = kvm_bindings::kvm_sregs {
            cr0: 0x8000_0011,
            efer: 0x500,
            cr4: 0x20,
            ..Default::default()
        };
        real_mode_at(&mut s, 0x9_a123);
        assert_eq!((s.cs.selector, s.cs.base), (0x9a12, 0x9_a120));
        assert_eq!(s.cr0 & 0x8000_0001, 0);
        assert_eq!((s.efer, s.cr4), (0, 0));
        assert_eq!(s.ss.base, 0);
    }
}
