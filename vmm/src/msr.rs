//! MSR policy: the time-dependent MSRs are filtered to user space
//! (`KVM_X86_SET_MSR_FILTER` with `KVM_CAP_X86_USER_SPACE_MSR`), so that every
//! value the guest reads from them passes through Nyx: in a plain run they are
//! passed through to KVM's own emulation; the recorder logs them.

use kvm_ioctls::{Cap, MsrExitReason, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};

/// IA32_TIME_STAMP_COUNTER.
pub const IA32_TSC: u32 = 0x10;
/// IA32_TSC_ADJUST.
pub const IA32_TSC_ADJUST: u32 = 0x3b;
/// IA32_MPERF.
pub const IA32_MPERF: u32 = 0xe7;
/// IA32_APERF.
pub const IA32_APERF: u32 = 0xe8;
/// IA32_TSC_AUX.
pub const IA32_TSC_AUX: u32 = 0xc000_0103;
/// kvmclock's MSRs, old and new: never offered (CPUID hides them), always trapped.
pub const KVM_CLOCK_MSRS: [u32; 4] = [0x11, 0x12, 0x4b56_4d00, 0x4b56_4d01];
/// IA32_APIC_BASE: the local APIC's, which is Nyx's under `--irqchip apic`.
pub const IA32_APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE: the local APIC timer's TSC-deadline mode.
pub const IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Every MSR whose guest accesses exit to Nyx: the time-dependent ones, and
/// the local APIC's when Nyx emulates one.
pub fn trapped(irqchip: crate::config::Irqchip) -> Vec<u32> {
    let mut v = vec![IA32_TSC, IA32_TSC_ADJUST, IA32_MPERF, IA32_APERF, IA32_TSC_AUX];
    v.extend(KVM_CLOCK_MSRS);
    if irqchip == crate::config::Irqchip::Apic {
        v.extend([IA32_APIC_BASE, IA32_TSC_DEADLINE]);
    }
    v
}

/// Installs the filter on `vm`: accesses to [`trapped`] MSRs exit to user
/// space, everything else is KVM's.
pub fn install_filter(vm: &VmFd, irqchip: crate::config::Irqchip) -> Result<(), kvm_ioctls::Error> {
    vm.enable_cap(&kvm_bindings::kvm_enable_cap {
        cap: Cap::X86UserSpaceMsr as u32,
        args: [u64::from(MsrExitReason::Filter.bits()), 0, 0, 0],
        ..Default::default()
    })?;
    // One range per MSR: a bitmap with its single bit clear denies (traps) it.
    let msrs = trapped(irqchip);
    let bitmap = [0u8; 1];
    let ranges: Vec<MsrFilterRange<'_>> = msrs
        .iter()
        .map(|&base| MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base,
            msr_count: 1,
            bitmap: &bitmap,
        })
        .collect();
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
}

/// Whether guest accesses to `index` are passed through to KVM's own
/// emulation in a plain run (the kvmclock MSRs are not: the guest gets #GP).
pub fn passes_through(index: u32) -> bool {
    !KVM_CLOCK_MSRS.contains(&index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trapped_list_covers_time_msrs_and_fits_kvm() {
        let t = trapped(crate::config::Irqchip::Apic);
        for m in [IA32_TSC, IA32_TSC_ADJUST, IA32_APERF, IA32_MPERF, IA32_TSC_AUX] {
            assert!(t.contains(&m));
            assert!(passes_through(m));
        }
        assert!(!passes_through(0x4b56_4d01));
        assert!(t.contains(&IA32_APIC_BASE) && t.contains(&IA32_TSC_DEADLINE));
        assert!(!trapped(crate::config::Irqchip::Legacy).contains(&IA32_APIC_BASE));
        assert!(t.len() <= kvm_bindings::KVM_MSR_FILTER_MAX_RANGES as usize);
    }
}
