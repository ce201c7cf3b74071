//! Moving registers between the vCPU (KVM_GET/SET_REGS, SREGS, FPU and the
//! KERNEL_GS_BASE MSR) and gdb's view of them ([`X86Regs`]).
//!
//! A write from gdb changes only what differs from the vCPU's current
//! state. A changed segment selector keeps the cached descriptor (base,
//! limit, attributes) as it is, except in real mode where the base follows
//! the selector, as the CPU itself does there.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;

use crate::arch::X86Regs;
use crate::Error;

/// The KERNEL_GS_BASE MSR.
const MSR_KERNEL_GS_BASE: u32 = 0xC000_0102;

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// The full x87 tag word from the FXSAVE-style abridged one: a valid
/// register reads as "valid" (00), an empty one as "empty" (11).
fn full_tag(abridged: u8) -> u32 {
    (0..8).fold(0u32, |t, i| {
        if abridged & (1 << i) != 0 {
            t
        } else {
            t | (3 << (2 * i))
        }
    })
}

fn abridged_tag(full: u32) -> u8 {
    (0..8).fold(0u8, |t, i| if (full >> (2 * i)) & 3 != 3 { t | (1 << i) } else { t })
}

fn gpr_array(r: &kvm_regs) -> [u64; 16] {
    [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15,
    ]
}

fn set_gprs(r: &mut kvm_regs, g: &[u64; 16]) {
    [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15,
    ] = *g;
}

/// Builds gdb's registers from KVM's structures.
pub fn from_kvm(regs: &kvm_regs, sregs: &kvm_sregs, fpu: &kvm_fpu, k_gs_base: u64) -> X86Regs {
    let mut st = [[0u8; 10]; 8];
    for (d, s) in st.iter_mut().zip(fpu.fpr.iter()) {
        d.copy_from_slice(&s[..10]);
    }
    let mut xmm = [0u128; 16];
    for (d, s) in xmm.iter_mut().zip(fpu.xmm.iter()) {
        *d = u128::from_le_bytes(*s);
    }
    X86Regs {
        gpr: gpr_array(regs),
        rip: regs.rip,
        eflags: regs.rflags as u32,
        seg: [sregs.cs, sregs.ss, sregs.ds, sregs.es, sregs.fs, sregs.gs].map(|s| u32::from(s.selector)),
        st,
        fpu: [
            u32::from(fpu.fcw),
            u32::from(fpu.fsw),
            full_tag(fpu.ftwx),
            0,
            fpu.last_ip as u32,
            0,
            fpu.last_dp as u32,
            u32::from(fpu.last_opcode),
        ],
        xmm,
        mxcsr: fpu.mxcsr,
        fs_base: sregs.fs.base,
        gs_base: sregs.gs.base,
        k_gs_base,
        cr0: sregs.cr0,
        cr2: sregs.cr2,
        cr3: sregs.cr3,
        cr4: sregs.cr4,
        cr8: sregs.cr8,
        efer: sregs.efer,
    }
}

/// Applies gdb's registers to KVM's structures. Returns whether the
/// general, system and FPU parts changed.
pub fn to_kvm(r: &X86Regs, regs: &mut kvm_regs, sregs: &mut kvm_sregs, fpu: &mut kvm_fpu) -> (bool, bool, bool) {
    let old = (*regs, *sregs, *fpu);
    set_gprs(regs, &r.gpr);
    regs.rip = r.rip;
    // Bit 1 of RFLAGS is always set.
    regs.rflags = (regs.rflags & !0xffff_ffff) | u64::from(r.eflags) | 2;
    let real_mode = sregs.cr0 & 1 == 0;
    let segs = [
        &mut sregs.cs,
        &mut sregs.ss,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
    ];
    for (s, &sel) in segs.into_iter().zip(r.seg.iter()) {
        let sel = sel as u16;
        if s.selector != sel {
            s.selector = sel;
            if real_mode {
                s.base = u64::from(sel) << 4;
            }
        }
    }
    sregs.fs.base = r.fs_base;
    sregs.gs.base = r.gs_base;
    sregs.cr0 = r.cr0;
    sregs.cr2 = r.cr2;
    sregs.cr3 = r.cr3;
    sregs.cr4 = r.cr4;
    sregs.cr8 = r.cr8;
    sregs.efer = r.efer;
    for (d, s) in fpu.fpr.iter_mut().zip(r.st.iter()) {
        d[..10].copy_from_slice(s);
    }
    fpu.fcw = r.fpu[0] as u16;
    fpu.fsw = r.fpu[1] as u16;
    fpu.ftwx = abridged_tag(r.fpu[2]);
    fpu.last_ip = u64::from(r.fpu[4]);
    fpu.last_dp = u64::from(r.fpu[6]);
    fpu.last_opcode = r.fpu[7] as u16;
    for (d, s) in fpu.xmm.iter_mut().zip(r.xmm.iter()) {
        *d = s.to_le_bytes();
    }
    fpu.mxcsr = r.mxcsr;
    // Field by field (kvm-bindings derives PartialEq): no padding byte is
    // ever read.
    (old.0 != *regs, old.1 != *sregs, old.2 != *fpu)
}

fn read_k_gs_base(v: &VcpuFd) -> Result<u64, Error> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_KERNEL_GS_BASE,
        ..Default::default()
    }])
    .map_err(|_| Error::Protocol("MSR list".into()))?;
    let n = v.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
    Ok(if n == 1 { msrs.as_slice()[0].data } else { 0 })
}

/// Reads every register of the vCPU `v`.
pub fn read(v: &VcpuFd) -> Result<X86Regs, Error> {
    let regs = v.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = v.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let fpu = v.get_fpu().map_err(kvm("KVM_GET_FPU"))?;
    Ok(from_kvm(&regs, &sregs, &fpu, read_k_gs_base(v)?))
}

/// Writes the registers that differ from vCPU `v`'s.
pub fn write(v: &VcpuFd, r: &X86Regs) -> Result<(), Error> {
    let mut regs = v.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let mut sregs = v.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let mut fpu = v.get_fpu().map_err(kvm("KVM_GET_FPU"))?;
    let (g, s, f) = to_kvm(r, &mut regs, &mut sregs, &mut fpu);
    if s {
        v.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    }
    if g {
        v.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    }
    if f {
        v.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
    }
    if read_k_gs_base(v)? != r.k_gs_base {
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_KERNEL_GS_BASE,
            data: r.k_gs_base,
            ..Default::default()
        }])
        .map_err(|_| Error::Protocol("MSR list".into()))?;
        v.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tag_words_convert_both_ways() {
        assert_eq!(full_tag(0), 0xffff);
        assert_eq!(full_tag(0xff), 0);
        assert_eq!(full_tag(0b1), 0xfffc);
        assert_eq!(abridged_tag(0xfffc), 1);
    }

    #[test]
    fn kvm_values_reach_gdb_names() {
        let regs = kvm_regs {
            rax: 1,
            rsp: 7,
            r15: 15,
            rip: 0x1000,
            rflags: 0x202,
            ..Default::default()
        };
        let mut sregs = kvm_sregs {
            cr3: 0x5000,
            efer: 0x500,
            ..Default::default()
        };
        sregs.cs.selector = 0x10;
        sregs.fs.base = 0xf5;
        let r = from_kvm(&regs, &sregs, &kvm_fpu::default(), 0x77);
        assert_eq!((r.gpr[0], r.gpr[7], r.gpr[15]), (1, 7, 15));
        assert_eq!((r.rip, r.eflags, r.seg[0]), (0x1000, 0x202, 0x10));
        assert_eq!((r.cr3, r.efer, r.fs_base, r.k_gs_base), (0x5000, 0x500, 0xf5, 0x77));
    }

    #[test]
    fn real_mode_selector_write_moves_the_base() {
        let mut regs = kvm_regs::default();
        let mut sregs = kvm_sregs::default();
        let mut fpu = kvm_fpu::default();
        let mut r = from_kvm(&regs, &sregs, &fpu, 0);
        r.seg[2] = 0x1234;
        let (_, s, _) = to_kvm(&r, &mut regs, &mut sregs, &mut fpu);
        assert!(s);
        assert_eq!(sregs.ds.base, 0x12340);
    }

    #[test]
    fn a_change_in_any_part_is_reported_for_that_part_only() {
        let regs = kvm_regs {
            rflags: 2,
            ..Default::default()
        };
        let (sregs, fpu) = (kvm_sregs::default(), kvm_fpu::default());
        let r = from_kvm(&regs, &sregs, &fpu, 0);
        let apply = |r: &X86Regs| {
            let (mut a, mut b, mut c) = (regs, sregs, fpu);
            to_kvm(r, &mut a, &mut b, &mut c)
        };
        let mut x = r.clone();
        x.rip = 0x1000;
        assert_eq!(apply(&x), (true, false, false));
        let mut x = r.clone();
        x.cr8 = 1;
        assert_eq!(apply(&x), (false, true, false));
        let mut x = r.clone();
        x.xmm[15] = 1 << 127;
        assert_eq!(apply(&x), (false, false, true));
    }

    proptest! {
        #[test]
        fn unchanged_registers_write_nothing(rax in any::<u64>(), rip in any::<u64>(), cr0 in any::<u64>(), fl in any::<u32>()) {
            let mut regs = kvm_regs { rax, rip, rflags: u64::from(fl) | 2, ..Default::default() };
            let mut sregs = kvm_sregs { cr0, ..Default::default() };
            let mut fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ftwx: 0, ..Default::default() };
            let r = from_kvm(&regs, &sregs, &fpu, 0);
            prop_assert_eq!(to_kvm(&r, &mut regs, &mut sregs, &mut fpu), (false, false, false));
            let mut r2 = r.clone();
            r2.gpr[3] = r.gpr[3].wrapping_add(1);
            prop_assert_eq!(to_kvm(&r2, &mut regs, &mut sregs, &mut fpu).0, true);
            prop_assert_eq!(regs.rdx, r2.gpr[3]);
        }
    }
}
