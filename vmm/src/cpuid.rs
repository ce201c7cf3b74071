//! CPUID policy: what the guest is told about the CPU.
//!
//! The table starts from `KVM_GET_SUPPORTED_CPUID`, shaped by the CPU model
//! ([`crate::cpu_model`]), and is filtered by a [`CpuidPolicy`]. Every policy hides what a machine without an in-kernel
//! irqchip, kvmclock or PMU does not have (local APIC, x2APIC, TSC-deadline,
//! the KVM paravirtual leaves, the architectural PMU). The record/replay
//! policy (design §4) also hides every instruction and feature whose result
//! Nyx could not log: RDRAND, RDSEED, RDPID, RDTSCP, the invariant TSC and the
//! TSC frequency leaves. [`lookup`] answers a patched `cpuid` from the table.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use serde::{Deserialize, Serialize};

/// Which CPUID filter applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CpuidPolicy {
    /// The host's supported features less what Nyx's machine lacks.
    #[default]
    Run,
    /// Additionally hide every nondeterministic source Nyx cannot log.
    RecordReplay,
}

/// One CPUID entry in a serializable form (for the trace header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// Leaf (EAX input).
    pub function: u32,
    /// Subleaf (ECX input).
    pub index: u32,
    /// KVM_CPUID_FLAG_* bits.
    pub flags: u32,
    /// Output registers.
    pub eax: u32,
    /// Output registers.
    pub ebx: u32,
    /// Output registers.
    pub ecx: u32,
    /// Output registers.
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        Self {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl From<&CpuidEntry> for kvm_cpuid_entry2 {
    fn from(e: &CpuidEntry) -> Self {
        kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        }
    }
}

// Leaf 1.
const L1_ECX_PDCM: u32 = 1 << 15;
const L1_ECX_X2APIC: u32 = 1 << 21;
const L1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const L1_ECX_RDRAND: u32 = 1 << 30;
const L1_EDX_APIC: u32 = 1 << 9;
const L1_EDX_HTT: u32 = 1 << 28;
// Leaf 0x8000_0001 ECX: the core count of 0x8000_0008 is valid (AMD).
const LX1_ECX_CMP_LEGACY: u32 = 1 << 1;
const L1_ECX_XSAVE: u32 = 1 << 26;
const L1_ECX_OSXSAVE: u32 = 1 << 27;
const L7_ECX_PKU: u32 = 1 << 3;
const L7_ECX_OSPKE: u32 = 1 << 4;
// Leaf 7 subleaf 0.
const L7_EBX_TSC_ADJUST: u32 = 1 << 1;
const L7_EBX_RDSEED: u32 = 1 << 18;
const L7_ECX_RDPID: u32 = 1 << 22;
// Leaf 0x8000_0001.
const LX1_EDX_RDTSCP: u32 = 1 << 27;
// Leaf 0x8000_0007.
const LX7_EDX_INVARIANT_TSC: u32 = 1 << 8;

/// The leaf-1 (ECX, EDX) bits of the devices Nyx emulates in user space
/// under `--irqchip apic` (local APIC, TSC-deadline timer): offered whatever
/// KVM's own table says, since KVM is not what implements them.
pub const EMULATED_L1: (u32, u32) = (L1_ECX_TSC_DEADLINE, L1_EDX_APIC);

/// The leaf-1 EDX bit [`for_vcpu`] sets for a machine with several vCPUs
/// (HTT: the logical processor count is valid), whatever KVM's table says.
pub const TOPOLOGY_L1_EDX: u32 = L1_EDX_HTT;
/// The leaf-0x8000_0001 ECX bit [`for_vcpu`] sets likewise (CmpLegacy).
pub const TOPOLOGY_LX1_ECX: u32 = LX1_ECX_CMP_LEGACY;

/// Offers the local APIC and its TSC-deadline timer in leaf 1 when the
/// machine has them (`Irqchip::Apic`); [`filter`] hides them for a legacy
/// machine.
pub fn apply_irqchip(entries: &mut [CpuidEntry], irqchip: crate::config::Irqchip) {
    if irqchip != crate::config::Irqchip::Apic {
        return;
    }
    for e in entries.iter_mut().filter(|e| e.function == 1) {
        e.ecx |= EMULATED_L1.0;
        e.edx |= EMULATED_L1.1;
    }
}

/// The table vCPU `apic_id` of a machine with `cpus` CPUs sees: `table`
/// (which describes one CPU with APIC ID 0) with the topology of one
/// package of `cpus` cores, one thread each, as QEMU's `-smp N` gives:
/// leaf 1's initial APIC ID and logical processor count (and HTT), leaf
/// 4's cores per package, the x2APIC topology leaves 0xB and 0x1F (SMT
/// then core level), and AMD's core count (0x8000_0008), CmpLegacy
/// (0x8000_0001) and extended APIC ID (0x8000_001E). With one CPU the
/// table is unchanged.
pub fn for_vcpu(table: &[CpuidEntry], apic_id: u8, cpus: usize) -> Vec<CpuidEntry> {
    if cpus <= 1 {
        return table.to_vec();
    }
    let n = cpus.min(255) as u32;
    let id = u32::from(apic_id);
    // Bits of the APIC ID that number the cores: ceil(log2(n)).
    let core_bits = 32 - (n - 1).leading_zeros();
    let mut out = table.to_vec();
    for e in &mut out {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0xffff) | (n << 16) | (id << 24);
                e.edx |= L1_EDX_HTT;
            }
            4 if e.eax & 0x1f != 0 => {
                // Cores per package - 1 in 31:26; the last level cache is
                // shared by all of them.
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { n - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((n - 1) << 26);
            }
            0xb | 0x1f => {
                let (shift, count, kind) = match e.index {
                    0 => (0, 1, 1),
                    1 => (core_bits, n, 2),
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = count;
                e.ecx = (kind << 8) | (e.index & 0xff);
                e.edx = id;
            }
            0x8000_0001 => e.ecx |= LX1_ECX_CMP_LEGACY,
            0x8000_0008 => e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (n - 1),
            0x8000_001e => {
                e.eax = id;
                e.ebx = (e.ebx & !0xff) | id;
            }
            _ => {}
        }
    }
    out
}

/// The number of CPUs a table made by [`for_vcpu`] describes (its leaf 1
/// logical processor count when HTT is set; 1 otherwise): a trace's or
/// snapshot's table says how many vCPUs its machine has.
pub fn cpus_of(table: &[CpuidEntry]) -> usize {
    match table.iter().find(|e| e.function == 1) {
        Some(e) if e.edx & L1_EDX_HTT != 0 => (((e.ebx >> 16) & 0xff) as usize).max(1),
        _ => 1,
    }
}

/// Filters `entries` in place according to `policy`. Returns the entries to
/// keep (some leaves are removed entirely).
pub fn filter(policy: CpuidPolicy, entries: &[CpuidEntry]) -> Vec<CpuidEntry> {
    let rr = policy == CpuidPolicy::RecordReplay;
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let mut e = *e;
        match e.function {
            // Hypervisor leaves: KVM's paravirtual features (kvmclock, async
            // page faults, steal time, PV EOI) need an in-kernel machine Nyx
            // does not build.
            0x4000_0000..=0x4000_00ff => continue,
            1 => {
                e.ecx &= !(L1_ECX_X2APIC | L1_ECX_TSC_DEADLINE | L1_ECX_PDCM);
                e.edx &= !L1_EDX_APIC;
                // Initial APIC ID and logical processor count: one vCPU, ID 0.
                e.ebx &= 0x0000_ffff;
                if rr {
                    e.ecx &= !L1_ECX_RDRAND;
                }
            }
            7 if e.index == 0 && rr => {
                e.ebx &= !(L7_EBX_RDSEED | L7_EBX_TSC_ADJUST);
                e.ecx &= !L7_ECX_RDPID;
            }
            // Architectural PMU: no PMU here.
            0xa => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            // TSC and core crystal frequency leaves.
            0x15 | 0x16 if rr => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x8000_0001 if rr => e.edx &= !LX1_EDX_RDTSCP,
            0x8000_0007 if rr => e.edx &= !LX7_EDX_INVARIANT_TSC,
            _ => {}
        }
        out.push(e);
    }
    out
}

/// What the `cpuid` instruction returns for `leaf` and `subleaf` on a
/// machine with `table`, as KVM computes it (for a patched `cpuid`): the
/// entry for the leaf (and the subleaf, where the entry says it matters),
/// zeros where the table has none; OSXSAVE and OSPKE follow CR4, and leaf
/// 0xD's EBX is the XSAVE area size of the features `xcr0` enables.
pub fn lookup(table: &[CpuidEntry], leaf: u32, subleaf: u32, cr4: u64, xcr0: u64) -> [u32; 4] {
    let find = |leaf: u32, subleaf: u32| {
        table.iter().find(|e| {
            e.function == leaf && (e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == subleaf)
        })
    };
    let Some(e) = find(leaf, subleaf) else {
        return [0; 4];
    };
    let mut out = [e.eax, e.ebx, e.ecx, e.edx];
    const CR4_OSXSAVE: u64 = 1 << 18;
    const CR4_PKE: u64 = 1 << 22;
    match (leaf, subleaf) {
        (1, _) => {
            let osxsave = out[2] & L1_ECX_XSAVE != 0 && cr4 & CR4_OSXSAVE != 0;
            out[2] = (out[2] & !L1_ECX_OSXSAVE) | if osxsave { L1_ECX_OSXSAVE } else { 0 };
        }
        (7, 0) => {
            let ospke = out[2] & L7_ECX_PKU != 0 && cr4 & CR4_PKE != 0;
            out[2] = (out[2] & !L7_ECX_OSPKE) | if ospke { L7_ECX_OSPKE } else { 0 };
        }
        (0xd, 0) => {
            // Legacy area and header, then each enabled component's end.
            out[1] = (2..63)
                .filter(|i| xcr0 & (1 << i) != 0)
                .filter_map(|i| find(0xd, i).map(|c| c.eax.saturating_add(c.ebx)))
                .fold(576, u32::max);
        }
        _ => {}
    }
    out
}

/// The filtered table as KVM takes it.
pub fn to_kvm(entries: &[CpuidEntry]) -> Result<CpuId, vmm_sys_util::fam::Error> {
    let raw: Vec<kvm_cpuid_entry2> = entries.iter().map(kvm_cpuid_entry2::from).collect();
    CpuId::from_entries(&raw)
}

/// The table KVM offers, in serializable form.
pub fn from_kvm(cpuid: &CpuId) -> Vec<CpuidEntry> {
    cpuid.as_slice().iter().map(CpuidEntry::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            flags: 0,
            eax: 0,
            ebx,
            ecx,
            edx,
        }
    }

    fn host_like() -> Vec<CpuidEntry> {
        vec![
            entry(0, 0, 0, 0, 0),
            entry(1, 0, 0x0103_0800, u32::MAX, u32::MAX),
            entry(7, 0, u32::MAX, u32::MAX, 0),
            entry(0xa, 0, 1, 1, 1),
            entry(0x15, 0, 1, 1, 1),
            entry(0x4000_0000, 0, 1, 1, 1),
            entry(0x4000_0001, 0, 1, 1, 1),
            entry(0x8000_0001, 0, 0, 0, u32::MAX),
            entry(0x8000_0007, 0, 0, 0, u32::MAX),
        ]
    }

    fn find(t: &[CpuidEntry], f: u32) -> CpuidEntry {
        *t.iter().find(|e| e.function == f).unwrap()
    }

    #[test]
    fn run_policy_hides_what_the_machine_lacks() {
        let t = filter(CpuidPolicy::Run, &host_like());
        assert!(t.iter().all(|e| !(0x4000_0000..=0x4000_00ff).contains(&e.function)));
        let l1 = find(&t, 1);
        assert_eq!(l1.edx & L1_EDX_APIC, 0);
        assert_eq!(l1.ecx & (L1_ECX_X2APIC | L1_ECX_TSC_DEADLINE), 0);
        assert_eq!(l1.ebx >> 24, 0, "APIC ID 0");
        // Still offered in plain runs.
        assert_ne!(l1.ecx & L1_ECX_RDRAND, 0);
        assert_ne!(find(&t, 0x8000_0001).edx & LX1_EDX_RDTSCP, 0);
        assert_eq!(find(&t, 0xa).eax, 0);
    }

    #[test]
    fn record_policy_hides_unloggable_sources() {
        let t = filter(CpuidPolicy::RecordReplay, &host_like());
        assert_eq!(find(&t, 1).ecx & L1_ECX_RDRAND, 0);
        assert_eq!(find(&t, 7).ebx & L7_EBX_RDSEED, 0);
        assert_eq!(find(&t, 7).ecx & L7_ECX_RDPID, 0);
        assert_eq!(find(&t, 0x8000_0001).edx & LX1_EDX_RDTSCP, 0);
        assert_eq!(find(&t, 0x8000_0007).edx & LX7_EDX_INVARIANT_TSC, 0);
        assert_eq!(find(&t, 0x15).ebx, 0);
        // Unrelated bits survive.
        assert_ne!(find(&t, 7).ebx & 1, 0);
    }

    #[test]
    fn lookup_answers_as_kvm_does() {
        let mut t = host_like();
        t.push(CpuidEntry {
            function: 0xd,
            index: 0,
            flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax: 7,
            ebx: 0,
            ecx: 0x340,
            edx: 0,
        });
        t.push(CpuidEntry {
            function: 0xd,
            index: 2,
            flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax: 0x100,
            ebx: 0x240,
            ecx: 0,
            edx: 0,
        });
        // A leaf the table lacks reads as zeros; a subleaf that does not
        // matter is ignored.
        assert_eq!(lookup(&t, 0x8000_0008, 0, 0, 0), [0; 4]);
        assert_eq!(lookup(&t, 0xa, 5, 0, 0), [0, 1, 1, 1]);
        assert_eq!(lookup(&t, 0xd, 1, 0, 0), [0; 4], "subleaf 1 is not in the table");
        // OSXSAVE follows CR4.OSXSAVE; the XSAVE size follows XCR0.
        assert_eq!(lookup(&t, 1, 0, 0, 0)[2] & L1_ECX_OSXSAVE, 0);
        assert_ne!(lookup(&t, 1, 0, 1 << 18, 0)[2] & L1_ECX_OSXSAVE, 0);
        assert_eq!(lookup(&t, 0xd, 0, 0, 3)[1], 576);
        assert_eq!(lookup(&t, 0xd, 0, 0, 7)[1], 0x340);
        assert_ne!(lookup(&t, 7, 0, 1 << 22, 0)[2] & L7_ECX_OSPKE, 0);
    }

    #[test]
    fn kvm_conversion_round_trips() {
        let t = filter(CpuidPolicy::Run, &host_like());
        let k = to_kvm(&t).unwrap();
        assert_eq!(from_kvm(&k), t);
    }

    #[test]
    fn each_vcpu_sees_its_apic_id_and_the_package_of_n_cores() {
        let e = |function, index, eax, ebx, ecx, edx| CpuidEntry {
            function,
            index,
            flags: 0,
            eax,
            ebx,
            ecx,
            edx,
        };
        let t = vec![
            e(1, 0, 0x600, 0x0000_0800, 0, 0),
            e(4, 0, 0x121, 0, 0, 0),
            e(4, 3, 0x163, 0, 0, 0),
            e(4, 4, 0, 0, 0, 0),
            e(0xb, 0, 1, 1, 0x100, 0),
            e(0xb, 1, 4, 8, 0x201, 0),
            e(0xb, 2, 0, 0, 2, 0),
            e(0x8000_0001, 0, 0, 0, 0, 0),
            e(0x8000_0008, 0, 0x3030, 0, 0, 0),
        ];
        assert_eq!(for_vcpu(&t, 0, 1), t, "one CPU: the table as it is");
        let v = for_vcpu(&t, 2, 3);
        let find = |f, i| *v.iter().find(|x| x.function == f && x.index == i).unwrap();
        assert_eq!(
            find(1, 0).ebx,
            0x0203_0800,
            "APIC ID 2, 3 logical processors, CLFLUSH kept"
        );
        assert_ne!(find(1, 0).edx & L1_EDX_HTT, 0);
        assert_eq!(find(4, 0).eax >> 26, 2, "3 cores");
        assert_eq!((find(4, 0).eax >> 14) & 0xfff, 0, "L1 is per core");
        assert_eq!((find(4, 3).eax >> 14) & 0xfff, 2, "L3 shared by 3");
        assert_eq!(find(4, 3).eax & 0x3fff, 0x163, "cache type and level kept");
        assert_eq!(find(4, 4), t[3], "the end of the cache list stays empty");
        assert_eq!(
            [find(0xb, 0).eax, find(0xb, 0).ebx, find(0xb, 0).ecx, find(0xb, 0).edx],
            [0, 1, 0x100, 2]
        );
        assert_eq!(
            [find(0xb, 1).eax, find(0xb, 1).ebx, find(0xb, 1).ecx, find(0xb, 1).edx],
            [2, 3, 0x201, 2]
        );
        assert_eq!(
            [find(0xb, 2).eax, find(0xb, 2).ebx, find(0xb, 2).ecx, find(0xb, 2).edx],
            [0, 0, 2, 2]
        );
        assert_ne!(find(0x8000_0001, 0).ecx & LX1_ECX_CMP_LEGACY, 0);
        assert_eq!(cpus_of(&t), 1);
        assert_eq!(cpus_of(&v), 3);
        assert_eq!(cpus_of(&for_vcpu(&t, 0, 64)), 64);
        assert_eq!(find(0x8000_0008, 0).ecx, (2 << 12) | 2);
        assert_eq!(
            for_vcpu(&t, 63, 64)
                .iter()
                .find(|x| x.function == 0xb && x.index == 1)
                .unwrap()
                .eax,
            6
        );
    }
}
