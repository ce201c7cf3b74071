//! Waking from ACPI S3: the CPU context is gone, and on a PC the firmware
//! jumps to the waking vector the OS left in the FACS, in real mode. Nyx
//! has no firmware, so it does that jump itself: it finds the FACS through
//! the RSDP, the RSDT or XSDT and the FADT in guest memory, as the guest
//! sees them, and puts the vCPU in real mode at `CS = vector >> 4`,
//! `IP = vector & 0xF`.

use vm_memory::{Bytes, GuestAddress};

use super::*;

/// Reads `N` bytes of guest memory at `addr`.
fn read<const N: usize>(mem: &GuestMemory, addr: u64) -> Option<[u8; N]> {
    let mut b = [0u8; N];
    mem.read_slice(&mut b, GuestAddress(addr)).ok()?;
    Some(b)
}

fn u32_at(mem: &GuestMemory, addr: u64) -> Option<u32> {
    read::<4>(mem, addr).map(u32::from_le_bytes)
}

fn u64_at(mem: &GuestMemory, addr: u64) -> Option<u64> {
    read::<8>(mem, addr).map(u64::from_le_bytes)
}

/// The FACS's firmware waking vector (offset 12), found from the RSDP in
/// the BIOS area (0xE0000–0xFFFFF, 16-byte aligned) through the XSDT (or
/// the RSDT) and the FADT's X_FIRMWARE_CTRL (or FIRMWARE_CTRL). None when
/// any step is missing.
pub fn firmware_waking_vector(mem: &GuestMemory) -> Option<u32> {
    let rsdp = (0xe_0000u64..0x10_0000)
        .step_by(16)
        .find(|&a| read::<8>(mem, a).is_some_and(|s| &s == b"RSD PTR "))?;
    let revision = read::<1>(mem, rsdp + 15)?[0];
    let (sdt, entry) = match revision {
        2.. => (u64_at(mem, rsdp + 24)?, 8),
        _ => (u64::from(u32_at(mem, rsdp + 16)?), 4),
    };
    let len = u64::from(u32_at(mem, sdt + 4)?).min(4096);
    let fadt = (36..len).step_by(entry).find_map(|off| {
        let t = if entry == 8 {
            u64_at(mem, sdt + off)?
        } else {
            u64::from(u32_at(mem, sdt + off)?)
        };
        (read::<4>(mem, t)? == *b"FACP").then_some(t)
    })?;
    let fadt_len = u64::from(u32_at(mem, fadt + 4)?);
    let facs = match fadt_len {
        140.. => Some(u64_at(mem, fadt + 132)?).filter(|&a| a != 0),
        _ => None,
    }
    .or_else(|| u32_at(mem, fadt + 36).map(u64::from))?;
    (read::<4>(mem, facs)? == *b"FACS").then_some(())?;
    u32_at(mem, facs + 12)
}

impl Machine {
    /// Puts the vCPU at the FACS firmware waking vector in real mode. A
    /// machine without a waking vector (0, or no FACS found) goes on after
    /// the instruction that slept, as from S1.
    pub(super) fn resume_at_waking_vector(&mut self) -> Result<(), Error> {
        let Some(vector) = firmware_waking_vector(&self.core.mem).filter(|&v| v != 0) else {
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
        tracing::info!(
            vector = format_args!("{vector:#x}"),
            "resuming at the FACS waking vector"
        );
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
    for s in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
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
