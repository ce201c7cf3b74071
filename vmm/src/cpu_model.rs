//! CPU models: which processor the guest is shown, as Firecracker's CPU
//! templates and QEMU's `-cpu` do.
//!
//! A model turns the table `KVM_GET_SUPPORTED_CPUID` reports into the table
//! the guest sees; [`crate::cpuid::filter`] then hides what Nyx's machine
//! lacks and, for record and replay, what Nyx cannot log. The resulting
//! table, with the model's name, is stored in every trace and snapshot, and
//! a replay or restore uses that table, never a new one.
//!
//! How Nyx knows what is executable: it does not ask the host. KVM reports
//! what the CPU has, not what KVM can run: an emulated KVM (design §8)
//! reports XSAVE, AVX, SMAP, POPCNT and more but fails on the first `xrstor`,
//! `clac` or `popcnt`, and neither its CPUID nor any capability says so. So
//! the default model, [`CpuModel::Baseline`], is a fixed list of features
//! that every x86-64 processor has and that the emulated KVM executes (the
//! fixture-kernel test shows a Linux 6.1 boot past FPU init with it), cut
//! to what KVM reports. `host` offers everything KVM reports (less what Nyx's
//! machine lacks): for hardware KVM, at the cost of traces and snapshots
//! that only replay on hosts with the same features.
//!
//! And the table must be what the guest sees. Hardware KVM answers the
//! guest's `cpuid` from the table set with `KVM_SET_CPUID2`; the emulated
//! KVM answers leaves 1, 7 and 0xD from the host CPU whatever the table says
//! (XSAVE, AVX, POPCNT, SMAP: what kills Linux). [`cpuid_follows_table`] is
//! a probe, once per process: a scratch VM with a table that hides every
//! leaf-1 ECX feature runs `cpuid` in real mode and Nyx looks at what came
//! back. Where the table is not followed, and always under record and replay
//! (so that a trace replays alike on both kinds of host), Nyx patches every
//! `cpuid` of an ELF kernel into a trap and answers it from the table
//! ([`crate::cpuid::lookup`]), as it does for `rdtsc`. `cpuid` in code Nyx
//! cannot scan (a bzImage, user space, code written at run time) still sees
//! the host's answer there.
//!
//! The one check at start, [`missing_features`]: every feature bit of the
//! table a machine is built with must be one KVM reports on this host. A
//! trace or snapshot from a host with more features is refused with the
//! names of the missing ones, instead of diverging later.

use std::fmt;
use std::sync::OnceLock;

use kvm_ioctls::{Kvm, VcpuExit};

use crate::cpuid::CpuidEntry;

/// A CPU model the user can choose with `--cpu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuModel {
    /// A conservative x86-64 feature set (the default).
    #[default]
    Baseline,
    /// What KVM reports, less what Nyx's machine lacks.
    Host,
}

/// `--cpu NAME` names no model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown CPU model {0:?}: the models are {names} (--cpu help describes them)", names = CpuModel::names())]
pub struct UnknownModel(pub String);

impl CpuModel {
    /// Every model, the default first.
    pub const ALL: [CpuModel; 2] = [CpuModel::Baseline, CpuModel::Host];

    /// The name `--cpu` takes and traces store.
    pub fn name(self) -> &'static str {
        match self {
            CpuModel::Baseline => "baseline",
            CpuModel::Host => "host",
        }
    }

    /// One paragraph for `--cpu help`.
    pub fn description(self) -> &'static str {
        match self {
            CpuModel::Baseline => {
                "x86-64 with FPU, SSE, SSE2, CX8, CMOV, FXSR, PAE, PSE, PGE, PAT, NX, SYSCALL and long mode; \
                 no XSAVE/AVX, SMAP/SMEP/PKU/UMIP, POPCNT, FSGSBASE, ERMS/FSRM or BMI. Runs on hardware and \
                 on emulated KVM; traces replay on any x86-64 host (the default)"
            }
            CpuModel::Host => {
                "everything this host's KVM reports, less what Nyx's machine lacks (local APIC, PMU, \
                 kvmclock): the CPU's features on hardware KVM; traces and snapshots then replay and \
                 restore only where KVM offers the same features"
            }
        }
    }

    /// The model called `name`.
    pub fn parse(name: &str) -> Result<Self, UnknownModel> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| UnknownModel(name.to_string()))
    }

    /// "baseline, host".
    pub fn names() -> String {
        Self::ALL.map(CpuModel::name).join(", ")
    }

    /// What `--cpu help` prints.
    pub fn help() -> String {
        let mut s = String::from("CPU models (--cpu MODEL):\n");
        for m in Self::ALL {
            s.push_str(&format!("  {:<10} {}\n", m.name(), m.description()));
        }
        s.push_str("record from a snapshot, restore and check keep the snapshot's model; replay keeps the trace's.\n");
        s
    }

    /// The table this model shows, from what KVM reports (`supported`).
    /// The machine policy filter still applies on top.
    pub fn table(self, supported: &[CpuidEntry]) -> Vec<CpuidEntry> {
        match self {
            CpuModel::Host => supported.to_vec(),
            CpuModel::Baseline => baseline(supported),
        }
    }
}

impl fmt::Display for CpuModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

impl Reg {
    fn get(self, e: &CpuidEntry) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Reg::Eax => "EAX",
            Reg::Ebx => "EBX",
            Reg::Ecx => "ECX",
            Reg::Edx => "EDX",
        }
    }
}

/// A register of CPUID whose bits are features: leaf, subleaf, register,
/// the names of its bits (as Linux's /proc/cpuinfo spells them; "" for a
/// reserved or unnamed bit), and the bits that are not host features but
/// mirror guest state (OSXSAVE, OSPKE) and so are never compared.
struct FeatureReg {
    leaf: u32,
    subleaf: u32,
    reg: Reg,
    names: [&'static str; 32],
    dynamic: u32,
}

#[rustfmt::skip]
const FEATURE_REGS: &[FeatureReg] = &[
    FeatureReg { leaf: 1, subleaf: 0, reg: Reg::Edx, dynamic: 0, names: [
        "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "", "sep", "mtrr", "pge", "mca", "cmov",
        "pat", "pse36", "pn", "clflush", "", "dts", "acpi", "mmx", "fxsr", "sse", "sse2", "ss", "ht", "tm", "ia64", "pbe"] },
    FeatureReg { leaf: 1, subleaf: 0, reg: Reg::Ecx, dynamic: 1 << 27, names: [
        "pni", "pclmulqdq", "dtes64", "monitor", "ds_cpl", "vmx", "smx", "est", "tm2", "ssse3", "cid", "sdbg", "fma",
        "cx16", "xtpr", "pdcm", "", "pcid", "dca", "sse4_1", "sse4_2", "x2apic", "movbe", "popcnt", "tsc_deadline_timer",
        "aes", "xsave", "osxsave", "avx", "f16c", "rdrand", "hypervisor"] },
    FeatureReg { leaf: 7, subleaf: 0, reg: Reg::Ebx, dynamic: 0, names: [
        "fsgsbase", "tsc_adjust", "sgx", "bmi1", "hle", "avx2", "fdp_excptn_only", "smep", "bmi2", "erms", "invpcid",
        "rtm", "pqm", "zero_fcs_fds", "mpx", "rdt_a", "avx512f", "avx512dq", "rdseed", "adx", "smap", "avx512ifma",
        "pcommit", "clflushopt", "clwb", "intel_pt", "avx512pf", "avx512er", "avx512cd", "sha_ni", "avx512bw",
        "avx512vl"] },
    FeatureReg { leaf: 7, subleaf: 0, reg: Reg::Ecx, dynamic: 1 << 4, names: [
        "prefetchwt1", "avx512vbmi", "umip", "pku", "ospke", "waitpkg", "avx512_vbmi2", "cet_ss", "gfni", "vaes",
        "vpclmulqdq", "avx512_vnni", "avx512_bitalg", "tme", "avx512_vpopcntdq", "", "la57", "", "", "", "", "", "rdpid",
        "bus_lock_detect", "cldemote", "", "movdiri", "movdir64b", "enqcmd", "sgx_lc", "pks", ""] },
    FeatureReg { leaf: 7, subleaf: 0, reg: Reg::Edx, dynamic: 0, names: [
        "", "", "avx512_4vnniw", "avx512_4fmaps", "fsrm", "uintr", "", "", "avx512_vp2intersect", "srbds_ctrl",
        "md_clear", "rtm_always_abort", "", "tsx_force_abort", "serialize", "hybrid", "tsxldtrk", "", "pconfig",
        "arch_lbr", "ibt", "", "amx_bf16", "avx512_fp16", "amx_tile", "amx_int8", "spec_ctrl", "intel_stibp",
        "flush_l1d", "arch_capabilities", "core_capabilities", "spec_ctrl_ssbd"] },
    FeatureReg { leaf: 7, subleaf: 1, reg: Reg::Eax, dynamic: 0, names: [
        "", "", "", "", "avx_vnni", "avx512_bf16", "", "", "", "", "fzrm", "fsrs", "fsrc", "", "", "", "", "", "", "",
        "", "", "hreset", "", "", "", "lam", "", "", "", "", ""] },
    FeatureReg { leaf: 0xd, subleaf: 0, reg: Reg::Eax, dynamic: 0, names: [
        "xstate_x87", "xstate_sse", "xstate_avx", "xstate_bndregs", "xstate_bndcsr", "xstate_opmask",
        "xstate_zmm_hi256", "xstate_hi16_zmm", "xstate_pt", "xstate_pkru", "", "xstate_cet_u", "xstate_cet_s", "", "",
        "", "", "xstate_amx_tilecfg", "xstate_amx_tiledata", "", "", "", "", "", "", "", "", "", "", "", "", ""] },
    FeatureReg { leaf: 0xd, subleaf: 1, reg: Reg::Eax, dynamic: 0, names: [
        "xsaveopt", "xsavec", "xgetbv1", "xsaves", "xfd", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "", "", "", ""] },
    FeatureReg { leaf: 0x8000_0001, subleaf: 0, reg: Reg::Edx, dynamic: 0, names: [
        "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "", "syscall", "mtrr", "pge", "mca",
        "cmov", "pat", "pse36", "", "mp", "nx", "", "mmxext", "mmx", "fxsr", "fxsr_opt", "pdpe1gb", "rdtscp", "", "lm",
        "3dnowext", "3dnow"] },
    FeatureReg { leaf: 0x8000_0001, subleaf: 0, reg: Reg::Ecx, dynamic: 0, names: [
        "lahf_lm", "cmp_legacy", "svm", "extapic", "cr8_legacy", "abm", "sse4a", "misalignsse", "3dnowprefetch",
        "osvw", "ibs", "xop", "skinit", "wdt", "", "lwp", "fma4", "tce", "", "nodeid_msr", "", "tbm", "topoext",
        "perfctr_core", "perfctr_nb", "", "bpext", "ptsc", "perfctr_llc", "mwaitx", "", ""] },
    FeatureReg { leaf: 0x8000_0007, subleaf: 0, reg: Reg::Edx, dynamic: 0, names: [
        "", "", "", "", "", "", "", "", "invariant_tsc", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", ""] },
    FeatureReg { leaf: 0x8000_0008, subleaf: 0, reg: Reg::Ebx, dynamic: 0, names: [
        "clzero", "irperf", "xsaveerptr", "", "rdpru", "", "", "", "", "wbnoinvd", "", "", "amd_ibpb", "", "amd_ibrs",
        "amd_stibp", "", "", "", "", "", "", "", "", "amd_ssbd", "virt_ssbd", "amd_ssb_no", "", "", "", "", ""] },
];

/// The bits of `reg` in `FEATURE_REGS` named `names` (a name missing from
/// the list is a bug caught by the unit tests).
fn bits(leaf: u32, subleaf: u32, reg: Reg, names: &[&str]) -> u32 {
    let Some(r) = FEATURE_REGS
        .iter()
        .find(|r| r.leaf == leaf && r.subleaf == subleaf && r.reg == reg)
    else {
        return 0;
    };
    names
        .iter()
        .filter_map(|n| r.names.iter().position(|x| x == n))
        .fold(0, |m, i| m | (1 << i))
}

/// Leaf 1 EDX of the baseline model.
const BASELINE_L1_EDX: &[&str] = &[
    "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "sep", "mtrr", "pge", "mca", "cmov", "pat", "pse36",
    "clflush", "mmx", "fxsr", "sse", "sse2",
];
/// Leaf 1 ECX: nothing but the hypervisor bit (no SSE3 and later, no
/// POPCNT, no XSAVE).
const BASELINE_L1_ECX: &[&str] = &["hypervisor"];
/// Leaf 0x8000_0001 EDX (AMD repeats leaf 1's bits here).
const BASELINE_LX1_EDX: &[&str] = &[
    "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "syscall", "mtrr", "pge", "mca", "cmov", "pat",
    "pse36", "nx", "mmx", "fxsr", "lm",
];
/// Leaf 0x8000_0008 EBX: `xsaveerptr` says FXSAVE/XSAVE always save the x87
/// error pointers. Without it Linux on an AMD CPU clears them by hand before
/// each FPU restore (`fnclex; emms; fildl`, its FXSAVE_LEAK workaround),
/// which the emulated KVM cannot execute: the guest dies at its first
/// return to a task with FPU state. Not a feature the guest must execute,
/// a promise about instructions it already has.
const BASELINE_LX8_EBX: &[&str] = &["xsaveerptr"];
/// The highest basic and extended leaves the baseline model shows.
const BASELINE_MAX_BASIC: u32 = 0xd;
const BASELINE_MAX_EXTENDED: u32 = 0x8000_0008;

/// The baseline model: identification, caches and address sizes as KVM
/// reports them; features only from the lists above (and only those KVM
/// reports too); every leaf that describes a feature outside them gone.
fn baseline(supported: &[CpuidEntry]) -> Vec<CpuidEntry> {
    let mut out = Vec::new();
    for e in supported {
        let mut e = *e;
        match e.function {
            0 => e.eax = e.eax.min(BASELINE_MAX_BASIC),
            1 => {
                e.ecx &= bits(1, 0, Reg::Ecx, BASELINE_L1_ECX);
                e.edx &= bits(1, 0, Reg::Edx, BASELINE_L1_EDX);
            }
            // Caches (Intel), the (hidden) PMU.
            2 | 4 | 0xa => {}
            // Structured extended features: none. Only subleaf 0, saying so.
            7 if e.index == 0 => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x8000_0000 => e.eax = e.eax.min(BASELINE_MAX_EXTENDED),
            0x8000_0001 => {
                e.ecx = 0;
                e.edx &= bits(0x8000_0001, 0, Reg::Edx, BASELINE_LX1_EDX);
            }
            // Brand string, caches (AMD), power management (invariant TSC).
            0x8000_0002..=0x8000_0007 => {}
            // Address sizes and core count; of EBX's features only what
            // the FPU save instructions do.
            0x8000_0008 => e.ebx &= bits(0x8000_0008, 0, Reg::Ebx, BASELINE_LX8_EBX),
            // XSAVE (0xd), topology, SGX, PT, AMX, SEV, ...: not in this model.
            _ => continue,
        }
        out.push(e);
    }
    out
}

/// The names of the features `table` offers and `supported` (what this
/// host's KVM reports) lacks; empty when a machine can be built with
/// `table` here. An unnamed bit is shown as `CPUID.(LEAF,SUB).REG[BIT]`.
pub fn missing_features(table: &[CpuidEntry], supported: &[CpuidEntry]) -> Vec<String> {
    let find = |t: &[CpuidEntry], leaf: u32, subleaf: u32| {
        t.iter().find(|e| e.function == leaf && e.index == subleaf).copied()
    };
    let mut missing = Vec::new();
    for r in FEATURE_REGS {
        let Some(want) = find(table, r.leaf, r.subleaf) else {
            continue;
        };
        let have = find(supported, r.leaf, r.subleaf).map_or(0, |e| r.reg.get(&e));
        let mut lacking = r.reg.get(&want) & !have & !r.dynamic;
        // Devices Nyx emulates itself, not KVM, and the topology of the
        // machine's vCPUs, which Nyx describes (cpuid::for_vcpu).
        match (r.leaf, r.subleaf, r.reg) {
            (1, 0, Reg::Ecx) => lacking &= !crate::cpuid::EMULATED_L1.0,
            (1, 0, Reg::Edx) => lacking &= !(crate::cpuid::EMULATED_L1.1 | crate::cpuid::TOPOLOGY_L1_EDX),
            (0x8000_0001, 0, Reg::Ecx) => lacking &= !crate::cpuid::TOPOLOGY_LX1_ECX,
            _ => {}
        }
        for bit in (0..32).filter(|b| lacking & (1 << b) != 0) {
            missing.push(match r.names[bit] {
                "" => format!("CPUID.({:#x},{}).{}[{bit}]", r.leaf, r.subleaf, r.reg.name()),
                name => name.to_string(),
            });
        }
    }
    missing
}

/// The feature names `table` offers (those with a name), for `trace info`.
pub fn feature_names(table: &[CpuidEntry]) -> Vec<&'static str> {
    let mut v = Vec::new();
    for r in FEATURE_REGS {
        if let Some(e) = table.iter().find(|e| e.function == r.leaf && e.index == r.subleaf) {
            let set = r.reg.get(e) & !r.dynamic;
            v.extend(
                (0..32)
                    .filter(|b| set & (1 << b) != 0)
                    .map(|b| r.names[b])
                    .filter(|n| !n.is_empty()),
            );
        }
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// The table `KVM_GET_SUPPORTED_CPUID` reports on the KVM at `kvm_path`.
pub fn host_supported(kvm_path: &str) -> Result<Vec<CpuidEntry>, String> {
    let path = std::ffi::CString::new(kvm_path).map_err(|_| format!("{kvm_path:?}: not a path"))?;
    let kvm = Kvm::new_with_path(path.as_c_str()).map_err(|e| format!("cannot open {kvm_path}: {e}"))?;
    kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map(|c| crate::cpuid::from_kvm(&c))
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))
}

/// Whether this host's KVM answers a guest's `cpuid` from the table set
/// with `KVM_SET_CPUID2` (the probe described above; asked once, on the
/// first machine's KVM). A probe that cannot run says no: patching `cpuid`
/// is always correct, only slower.
pub fn cpuid_follows_table(kvm: &Kvm) -> bool {
    static FOLLOWS: OnceLock<bool> = OnceLock::new();
    *FOLLOWS.get_or_init(|| {
        let r = probe_cpuid(kvm);
        tracing::debug!("KVM applies the CPUID table to the guest's cpuid: {r:?}");
        r.unwrap_or(false)
    })
}

fn probe_cpuid(kvm: &Kvm) -> Result<bool, String> {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _};
    let e = |what: &str| {
        let what = what.to_string();
        move |err: kvm_ioctls::Error| format!("{what}: {err}")
    };
    let vm = kvm.create_vm().map_err(e("KVM_CREATE_VM"))?;
    let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)])
        .map_err(|err| format!("memory: {err}"))?;
    // mov $1, %eax; xor %ecx, %ecx; cpuid; hlt (real mode, 16-bit operands
    // widened with 0x66).
    let code = [0x66, 0xb8, 1, 0, 0, 0, 0x66, 0x31, 0xc9, 0x0f, 0xa2, 0xf4];
    mem.write_slice(&code, GuestAddress(0))
        .map_err(|err| format!("memory: {err}"))?;
    let region = mem.iter().next().ok_or("memory: no region")?;
    let r = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: 0x1000,
        userspace_addr: region.as_ptr() as u64,
    };
    // SAFETY: `mem` is a live mapping of 0x1000 bytes that outlives `vm`
    // (both are dropped at the end of this function, the VM first).
    unsafe { vm.set_user_memory_region(r) }.map_err(e("KVM_SET_USER_MEMORY_REGION"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(e("KVM_CREATE_VCPU"))?;
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(e("KVM_GET_SUPPORTED_CPUID"))?;
    let mut table = crate::cpuid::from_kvm(&supported);
    let Some(l1) = table.iter_mut().find(|x| x.function == 1) else {
        return Ok(true);
    };
    if l1.ecx == 0 {
        // Nothing to hide: a table without leaf-1 ECX features cannot show
        // the difference, and nothing there can need hiding.
        return Ok(true);
    }
    l1.ecx = 0;
    let kcpuid = crate::cpuid::to_kvm(&table).map_err(|_| "CPUID table too large".to_string())?;
    vcpu.set_cpuid2(&kcpuid).map_err(e("KVM_SET_CPUID2"))?;
    let mut sregs = vcpu.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(e("KVM_SET_SREGS"))?;
    let mut regs = vcpu.get_regs().map_err(e("KVM_GET_REGS"))?;
    regs.rip = 0;
    regs.rflags = 2;
    vcpu.set_regs(&regs).map_err(e("KVM_SET_REGS"))?;
    for _ in 0..16 {
        match vcpu.run().map_err(e("KVM_RUN"))? {
            VcpuExit::Hlt => {
                let regs = vcpu.get_regs().map_err(e("KVM_GET_REGS"))?;
                if regs.rip != code.len() as u64 {
                    return Err(format!("stopped at {:#x}", regs.rip));
                }
                return Ok(regs.rcx & 0xffff_ffff == 0);
            }
            VcpuExit::InternalError | VcpuExit::Shutdown | VcpuExit::FailEntry(..) => {
                return Err("the probe guest failed".into())
            }
            _ => {}
        }
    }
    Err("the probe guest did not halt".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            flags: 0,
            eax,
            ebx,
            ecx,
            edx,
        }
    }

    /// Every leaf a modern host reports, with every feature bit set.
    fn everything() -> Vec<CpuidEntry> {
        vec![
            entry(0, 0, 0x1f, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            entry(1, 0, 0x00a0_0f11, 0x0001_0800, u32::MAX, u32::MAX),
            entry(7, 0, 1, u32::MAX, u32::MAX, u32::MAX),
            entry(7, 1, u32::MAX, 0, 0, 0),
            entry(0xb, 0, 1, 1, 0x100, 0),
            entry(0xd, 0, u32::MAX, 0x340, 0x340, 0),
            entry(0xd, 1, u32::MAX, 0, 0, 0),
            entry(0xd, 2, 0x100, 0x240, 0, 0),
            entry(0x14, 0, 1, 1, 1, 1),
            entry(0x8000_0000, 0, 0x8000_0023, 0, 0, 0),
            entry(0x8000_0001, 0, 0x00a0_0f11, 0, u32::MAX, u32::MAX),
            entry(0x8000_0002, 0, 1, 2, 3, 4),
            entry(0x8000_0007, 0, 0, 0, 0, u32::MAX),
            entry(0x8000_0008, 0, 0x3030, u32::MAX, 0, 0),
            entry(0x8000_001f, 0, u32::MAX, 0, 0, 0),
        ]
    }

    fn find(t: &[CpuidEntry], f: u32, i: u32) -> Option<CpuidEntry> {
        t.iter().find(|e| e.function == f && e.index == i).copied()
    }

    #[test]
    fn every_baseline_name_is_a_known_bit() {
        for (leaf, reg, names) in [
            (1, Reg::Edx, BASELINE_L1_EDX),
            (1, Reg::Ecx, BASELINE_L1_ECX),
            (0x8000_0001, Reg::Edx, BASELINE_LX1_EDX),
        ] {
            assert_eq!(
                bits(leaf, 0, reg, names).count_ones() as usize,
                names.len(),
                "{names:?}"
            );
        }
    }

    #[test]
    fn baseline_offers_what_linux_needs_and_nothing_the_emulator_fails_on() {
        let t = CpuModel::Baseline.table(&everything());
        let names = feature_names(&t);
        for need in [
            "fpu", "pae", "pse", "pge", "cx8", "cmov", "fxsr", "sse", "sse2", "nx", "lm", "syscall", "tsc", "msr",
        ] {
            assert!(names.contains(&need), "baseline lacks {need}: {names:?}");
        }
        for banned in [
            "xsave", "avx", "avx2", "avx512f", "smap", "smep", "pku", "umip", "popcnt", "fsgsbase", "erms", "fsrm",
            "bmi1", "bmi2", "rdrand", "rdseed", "rdtscp", "rdpid", "pni", "sse4_2", "x2apic", "pdpe1gb", "abm",
        ] {
            assert!(!names.contains(&banned), "baseline offers {banned}");
        }
        assert!(
            find(&t, 0xd, 0).is_none() && find(&t, 0xd, 1).is_none(),
            "no XSAVE leaves"
        );
        assert!(find(&t, 7, 1).is_none() && find(&t, 0x14, 0).is_none() && find(&t, 0x8000_001f, 0).is_none());
        assert_eq!(find(&t, 0, 0).unwrap().eax, BASELINE_MAX_BASIC);
        assert_eq!(find(&t, 0, 0).unwrap().ebx, 0x6874_7541, "vendor kept");
        assert_eq!(find(&t, 0x8000_0000, 0).unwrap().eax, BASELINE_MAX_EXTENDED);
        assert_eq!(find(&t, 0x8000_0008, 0).unwrap().eax, 0x3030, "address sizes kept");
        assert_eq!(
            find(&t, 0x8000_0008, 0).unwrap().ebx,
            1 << 2,
            "of EBX, only xsaveerptr (Linux's FXSAVE_LEAK workaround needs x87 emulation)"
        );
        assert_eq!(
            find(&t, 0x8000_0002, 0),
            find(&everything(), 0x8000_0002, 0),
            "brand kept"
        );
    }

    #[test]
    fn host_is_what_kvm_reports() {
        assert_eq!(CpuModel::Host.table(&everything()), everything());
    }

    #[test]
    fn names_parse_and_help_lists_every_model() {
        for m in CpuModel::ALL {
            assert_eq!(CpuModel::parse(m.name()), Ok(m));
            assert!(CpuModel::help().contains(m.name()));
        }
        assert_eq!(CpuModel::default(), CpuModel::Baseline);
        let e = CpuModel::parse("pentium").unwrap_err().to_string();
        assert!(e.contains("pentium") && e.contains("baseline, host"), "{e}");
    }

    #[test]
    fn missing_features_are_named() {
        let host = CpuModel::Baseline.table(&everything());
        let mut recorded = everything();
        // A table from a host with AVX-512 and XSAVE, replayed on one without.
        assert!(missing_features(&host, &everything()).is_empty());
        let m = missing_features(&recorded, &host);
        for f in ["avx512f", "xsave", "popcnt", "smap", "xstate_avx", "xsaveopt"] {
            assert!(m.contains(&f.to_string()), "{f} not in {m:?}");
        }
        // OSXSAVE and OSPKE follow the guest's CR4: never "missing".
        assert!(!m.iter().any(|f| f == "osxsave" || f == "ospke"), "{m:?}");
        // A reserved bit is still reported, by position.
        recorded.retain(|e| e.function == 1);
        recorded[0].ecx = 1 << 16;
        recorded[0].edx = 0;
        assert_eq!(
            missing_features(&recorded, &host),
            vec!["CPUID.(0x1,0).ECX[16]".to_string()]
        );
    }

    proptest! {
        /// Whatever KVM reports, the baseline model is a subset of it (so a
        /// fresh machine always passes the check at start), offers nothing
        /// outside its lists, and is what the host model filters down to.
        #[test]
        fn baseline_is_within_the_host_and_its_lists(
            l1 in any::<(u32, u32)>(), l7 in any::<(u32, u32, u32)>(), lx1 in any::<(u32, u32)>(),
            lx8 in any::<u32>(), xcr0 in any::<u32>(),
        ) {
            let host = vec![
                entry(0, 0, 0x10, 0, 0, 0),
                entry(1, 0, 0, 0, l1.0, l1.1),
                entry(7, 0, 0, l7.0, l7.1, l7.2),
                entry(0xd, 0, xcr0, 0, 0, 0),
                entry(0x8000_0001, 0, 0, 0, lx1.0, lx1.1),
                entry(0x8000_0008, 0, 0, lx8, 0, 0),
            ];
            let t = CpuModel::Baseline.table(&host);
            prop_assert!(missing_features(&t, &host).is_empty());
            prop_assert!(missing_features(&CpuModel::Host.table(&host), &host).is_empty());
            let allowed: Vec<&str> =
                BASELINE_L1_EDX.iter().chain(BASELINE_L1_ECX).chain(BASELINE_LX1_EDX).chain(BASELINE_LX8_EBX).copied().collect();
            for f in feature_names(&t) {
                prop_assert!(allowed.contains(&f), "baseline offers {}", f);
            }
            // And a table with any bit more than the host is refused.
            let mut more = t.clone();
            let l1e = more.iter_mut().find(|e| e.function == 1).unwrap();
            if l1.0 & (1 << 23) == 0 {
                l1e.ecx |= 1 << 23;
                prop_assert_eq!(missing_features(&more, &host), vec!["popcnt".to_string()]);
            }
        }
    }
}
