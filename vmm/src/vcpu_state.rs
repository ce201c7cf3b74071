//! vCPU state capture and restore: everything KVM holds for one vCPU that a
//! snapshot, a replay keyframe or a migration needs to continue it exactly
//! (registers, segment and control registers, the XSAVE area with the FPU and
//! vector registers, XCRs, debug registers, MSRs, pending events, the MP
//! state and the TSC). The CPUID table is not part of it: it lives in the
//! machine configuration and must be set on the vCPU before [`restore`].
//! [`VcpuDelta`] is the smaller part a landing's keyframe holds: what a
//! guest can change without an exit ([`capture_delta`], [`restore_delta`]).
//!
//! Also the register digest that the replayer compares at each breakpoint
//! hit, and the per-register difference list of divergence reports.

use std::fmt;
use std::marker::PhantomData;

use kvm_bindings::{
    kvm_debugregs, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, Msrs, Xsave,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use vm_memory::ByteValued;

use crate::msr::{IA32_TSC, IA32_TSC_ADJUST, IA32_TSC_AUX};

/// IA32_TSC_DEADLINE: relative to the TSC, so restored after it.
pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
/// IA32_PAT.
pub const IA32_PAT: u32 = 0x277;
/// IA32_MTRR_DEF_TYPE.
pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;

/// MSRs that `KVM_GET_MSR_INDEX_LIST` does not report but that a guest
/// can change and expects back: the variable and fixed-range MTRRs, the
/// MTRR default type, PAT, and the TSC-related ones.
pub fn extra_msrs() -> Vec<u32> {
    let mut v: Vec<u32> = (0x200..=0x20f).collect(); // PHYSBASE0..7 / PHYSMASK0..7
    v.extend([0x250, 0x258, 0x259]); // fixed-range 64K, 16K x2
    v.extend(0x268..=0x26f); // fixed-range 4K x8
    v.extend([
        IA32_PAT,
        IA32_MTRR_DEF_TYPE,
        IA32_TSC,
        IA32_TSC_ADJUST,
        IA32_TSC_AUX,
        IA32_TSC_DEADLINE,
    ]);
    v
}

/// MSRs written after all others, in this order. A host-initiated write
/// of IA32_TSC sets the vCPU's TSC offset so that the guest reads exactly
/// the saved value at that moment; it comes last (only the deadline, which
/// KVM interprets relative to the TSC, follows it) so that no later MSR
/// write can move it and the TSC runs for as short a time as possible
/// before the guest resumes. IA32_TSC_ADJUST written by the host only
/// stores the value, so it may precede the TSC.
const LATE_MSRS: [u32; 3] = [IA32_TSC_ADJUST, IA32_TSC, IA32_TSC_DEADLINE];

/// Size of the legacy `kvm_xsave` area that `KVM_GET_XSAVE` fills.
const LEGACY_XSAVE: usize = std::mem::size_of::<kvm_bindings::kvm_xsave>();

/// Errors of capturing or restoring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM call failed.
    #[error("KVM refused {what}: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// What the kernel said.
        source: kvm_ioctls::Error,
    },
    /// The vCPU did not take a saved MSR back.
    #[error("KVM refused MSR {index:#x} of the saved vCPU state: restore it on a host with the same KVM and CPU, after setting the same CPUID table")]
    MsrRefused {
        /// The MSR's index.
        index: u32,
    },
    /// The saved XSAVE area is larger than any this host's CPU can hold.
    #[error("the saved XSAVE area holds {saved} bytes but this host's CPU has room for {room}: restore it on a host with the same CPU features")]
    XsaveTooLarge {
        /// Bytes in the state.
        saved: usize,
        /// The most this host holds.
        room: usize,
    },
    /// The saved XSAVE area is shorter than the legacy area every state has.
    #[error("the saved XSAVE area holds only {0} bytes (at least 4096 expected): the state is damaged")]
    XsaveTooSmall(usize),
    /// No XSAVE buffer of the size the CPU needs could be made.
    #[error("cannot make a {0}-byte XSAVE buffer")]
    XsaveBuffer(usize),
    /// A list of MSRs could not be built.
    #[error("cannot build a list of {0} MSRs")]
    MsrList(usize),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// A KVM structure kept as it is and serialized as its exact bytes, with
/// a strict length check when read back.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
pub struct Raw<T>(pub T);

// SAFETY: `Raw` is transparent over these kvm-bindings types, which are
// plain C structs of integers and integer arrays with explicit padding
// fields (kvm-bindings derives zerocopy's `IntoBytes` and `FromBytes` for
// them, which proves there are no implicit padding bytes and that every
// bit pattern is a valid value).
unsafe impl ByteValued for Raw<kvm_regs> {}
// SAFETY: as above.
unsafe impl ByteValued for Raw<kvm_sregs> {}
// SAFETY: as above.
unsafe impl ByteValued for Raw<kvm_xcrs> {}
// SAFETY: as above.
unsafe impl ByteValued for Raw<kvm_debugregs> {}
// SAFETY: as above.
unsafe impl ByteValued for Raw<kvm_vcpu_events> {}
// SAFETY: as above.
unsafe impl ByteValued for Raw<kvm_mp_state> {}

impl<T> std::ops::Deref for Raw<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> std::ops::DerefMut for Raw<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: fmt::Debug> fmt::Debug for Raw<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<T> PartialEq for Raw<T>
where
    Raw<T>: ByteValued,
{
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T> Serialize for Raw<T>
where
    Raw<T>: ByteValued,
{
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.as_slice())
    }
}

impl<'de, T> Deserialize<'de> for Raw<T>
where
    Raw<T>: ByteValued + Default,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<T> V<T>
        where
            Raw<T>: ByteValued + Default,
        {
            fn build<E: serde::de::Error>(b: &[u8]) -> Result<Raw<T>, E> {
                let mut v = Raw::<T>::default();
                let want = v.as_slice().len();
                if b.len() != want {
                    return Err(E::invalid_length(b.len(), &"the size of the KVM structure"));
                }
                v.as_mut_slice().copy_from_slice(b);
                Ok(v)
            }
        }
        impl<'de, T> serde::de::Visitor<'de> for V<T>
        where
            Raw<T>: ByteValued + Default,
        {
            type Value = Raw<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "the bytes of a KVM structure")
            }
            fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<Raw<T>, E> {
                Self::build(b)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Raw<T>, A::Error> {
                let mut bytes = Vec::new();
                let want = Raw::<T>::default().as_slice().len();
                while let Some(b) = a.next_element::<u8>()? {
                    if bytes.len() == want {
                        return Err(serde::de::Error::invalid_length(
                            want + 1,
                            &"the size of the KVM structure",
                        ));
                    }
                    bytes.push(b);
                }
                Self::build(&bytes)
            }
        }
        d.deserialize_bytes(V(PhantomData))
    }
}

/// Everything needed to continue one vCPU exactly, apart from its CPUID
/// table (part of the machine configuration) and the guest memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// `KVM_GET_MP_STATE`.
    pub mp_state: Raw<kvm_mp_state>,
    /// General registers, RIP and RFLAGS.
    pub regs: Raw<kvm_regs>,
    /// Segment, descriptor-table and control registers, EFER, APIC base and
    /// the pending external interrupt.
    pub sregs: Raw<kvm_sregs>,
    /// The XSAVE area (x87, SSE, AVX and later state) in the layout that
    /// `KVM_GET_XSAVE2` returns; trailing zero bytes past the 4096-byte
    /// legacy area are dropped (a restore pads them back).
    pub xsave: Vec<u8>,
    /// Extended control registers (XCR0).
    pub xcrs: Raw<kvm_xcrs>,
    /// DR0-DR3, DR6, DR7.
    pub debugregs: Raw<kvm_debugregs>,
    /// `(index, value)` of every MSR the vCPU gave back, in capture order.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exception, interrupt and NMI, interrupt shadow, SMM state.
    pub events: Raw<kvm_vcpu_events>,
    /// The vCPU's TSC frequency in kHz, where KVM reports it.
    pub tsc_khz: Option<u32>,
}

impl VcpuState {
    /// The saved value of MSR `index`.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.0 == index).map(|m| m.1)
    }
}

/// The MSRs to capture: every MSR in KVM's `KVM_GET_MSR_INDEX_LIST` plus
/// [`extra_msrs`], without duplicates, sorted, with the TSC-related ones
/// last in restore order. Build it once per host; the vCPU may still refuse
/// some of them (features its CPUID hides): [`capture`] drops those, and
/// [`accepted_msrs`] prunes the list once for a configured vCPU.
pub fn supported_msrs(kvm: &Kvm) -> Vec<u32> {
    let mut v = match kvm.get_msr_index_list() {
        Ok(list) => list.as_slice().to_vec(),
        Err(e) => {
            tracing::warn!("KVM_GET_MSR_INDEX_LIST: {e}; saving only the architectural MSRs");
            Vec::new()
        }
    };
    v.extend(extra_msrs());
    v.sort_unstable();
    v.dedup();
    v.retain(|m| !LATE_MSRS.contains(m));
    v.extend(LATE_MSRS);
    v
}

/// The MSRs of `list` that `vcpu` (with its CPUID already set) lets
/// `KVM_GET_MSRS` read, in the order of `list`.
pub fn accepted_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<u32>, StateError> {
    Ok(read_msrs(vcpu, list)?.into_iter().map(|m| m.0).collect())
}

/// Reads `list` in chunks that KVM takes at once. `KVM_GET_MSRS` stops at
/// the first MSR it refuses and returns how many it read: that one is
/// dropped and the rest of the chunk is read again, so each refused MSR
/// costs one call.
fn read_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<(u32, u64)>, StateError> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::MsrList(entries.len()))?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(kvm_err("KVM_GET_MSRS"))?
            .min(chunk.len());
        out.extend(msrs.as_slice().iter().take(n).map(|e| (e.index, e.data)));
        let skip = if n < chunk.len() { n + 1 } else { n };
        rest = &rest[skip..];
    }
    Ok(out)
}

/// Writes `msrs` in order. `KVM_SET_MSRS` stops at the first MSR it
/// refuses. Some MSRs read back fine but refuse even the value they hold in
/// some configurations (KVM's paravirtual MSRs without an in-kernel LAPIC):
/// a refused MSR that already holds the saved value is skipped, any other
/// refusal is an error.
fn write_msrs(vcpu: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), StateError> {
    let mut rest = msrs;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let list = Msrs::from_entries(&entries).map_err(|_| StateError::MsrList(entries.len()))?;
        let n = vcpu.set_msrs(&list).map_err(kvm_err("KVM_SET_MSRS"))?;
        let Some(&(index, data)) = chunk.get(n) else {
            rest = &rest[chunk.len()..];
            continue;
        };
        if read_msrs(vcpu, &[index])?.first() != Some(&(index, data)) {
            return Err(StateError::MsrRefused { index });
        }
        rest = &rest[n + 1..];
    }
    Ok(())
}

/// The most bytes KVM can copy for `KVM_GET_XSAVE2`/`KVM_SET_XSAVE` on this
/// host: CPUID.(EAX=0Dh,ECX=0):ECX, the XSAVE size of every feature the
/// CPU supports, which bounds the vCPU's own size (KVM's
/// `KVM_CAP_XSAVE2` value, a VM-level query that a bare vCPU handle cannot
/// make), and never less than the legacy 4096 bytes. Asked once: CPUID
/// is an exit to the hypervisor when Nyx itself runs in a VM, several
/// microseconds each on the development host.
fn xsave_room() -> usize {
    static ROOM: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROOM.get_or_init(host_xsave_room)
}

fn host_xsave_room() -> usize {
    use std::arch::x86_64::__cpuid_count;
    #[allow(unused_unsafe)]
    // SAFETY: CPUID is available on every x86_64 CPU.
    let (max_leaf, has_xsave) = unsafe {
        let l0 = __cpuid_count(0, 0);
        let l1 = __cpuid_count(1, 0);
        (l0.eax, l1.ecx & (1 << 26) != 0)
    };
    if max_leaf < 0xd || !has_xsave {
        return LEGACY_XSAVE;
    }
    #[allow(unused_unsafe)]
    // SAFETY: leaf 0xd exists (checked above).
    let all = unsafe { __cpuid_count(0xd, 0).ecx } as usize;
    all.max(LEGACY_XSAVE)
}

/// A zeroed `Xsave` buffer of at least `room` bytes.
fn xsave_buffer(room: usize) -> Result<Xsave, StateError> {
    let extra = room.saturating_sub(LEGACY_XSAVE).div_ceil(4);
    Xsave::new(extra).map_err(|_| StateError::XsaveBuffer(room))
}

fn get_xsave(vcpu: &VcpuFd) -> Result<Vec<u8>, StateError> {
    let room = xsave_room();
    let mut x = xsave_buffer(room)?;
    let bytes_of = |words: &mut dyn Iterator<Item = &u32>| {
        let mut v = Vec::with_capacity(room);
        for w in words {
            v.extend_from_slice(&w.to_ne_bytes());
        }
        v
    };
    // SAFETY: `x` holds `room` bytes, at least as many as KVM copies (see
    // `xsave_room`).
    let mut bytes: Vec<u8> = match unsafe { vcpu.get_xsave2(&mut x) } {
        Ok(()) => {
            let region = &x.as_fam_struct_ref().xsave.region;
            bytes_of(&mut region.iter().chain(x.as_slice()))
        }
        // Kernels before 5.17 know only KVM_GET_XSAVE (at most 4096 bytes).
        Err(e) if e.errno() == libc::EINVAL || e.errno() == libc::ENOTTY => {
            let legacy = vcpu.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
            bytes_of(&mut legacy.region.iter())
        }
        Err(e) => return Err(kvm_err("KVM_GET_XSAVE2")(e)),
    };
    let used = bytes
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |i| i + 1)
        .max(LEGACY_XSAVE);
    bytes.truncate(used);
    Ok(bytes)
}

fn set_xsave(vcpu: &VcpuFd, bytes: &[u8]) -> Result<(), StateError> {
    let room = xsave_room();
    if bytes.len() < LEGACY_XSAVE {
        return Err(StateError::XsaveTooSmall(bytes.len()));
    }
    if bytes.len() > room {
        return Err(StateError::XsaveTooLarge {
            saved: bytes.len(),
            room,
        });
    }
    let mut x = xsave_buffer(room)?;
    let mut words = bytes.chunks(4).map(|c| {
        let mut w = [0u8; 4];
        w[..c.len()].copy_from_slice(c);
        u32::from_ne_bytes(w)
    });
    // SAFETY: only the fixed legacy area is written; the entry count that
    // the wrapper keeps stays as it is.
    let region = unsafe { &mut x.as_mut_fam_struct().xsave.region };
    for (dst, src) in region.iter_mut().zip(&mut words) {
        *dst = src;
    }
    for (dst, src) in x.as_mut_slice().iter_mut().zip(words) {
        *dst = src;
    }
    // SAFETY: `x` holds `room` bytes, at least as many as KVM reads.
    unsafe { vcpu.set_xsave2(&x) }.map_err(kvm_err("KVM_SET_XSAVE"))
}

/// Captures the state of `vcpu`, reading the MSRs of `msr_list` (see
/// [`supported_msrs`]; those the vCPU refuses are left out). The vCPU must
/// not be running.
pub fn capture(vcpu: &VcpuFd, msr_list: &[u32]) -> Result<VcpuState, StateError> {
    // Order, as in Firecracker's and QEMU's save paths: the MP state first
    // (KVM_GET_MP_STATE may process pending APIC events and so change the
    // rest), the vCPU events last (other GET ioctls may settle pending
    // state into them).
    let mp_state = vcpu.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let xsave = get_xsave(vcpu)?;
    let xcrs = vcpu.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?;
    let debugregs = vcpu.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
    let tsc_khz = vcpu.get_tsc_khz().ok();
    let msrs = read_msrs(vcpu, msr_list)?;
    let events = vcpu.get_vcpu_events().map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        mp_state: Raw(mp_state),
        regs: Raw(regs),
        sregs: Raw(sregs),
        xsave,
        xcrs: Raw(xcrs),
        debugregs: Raw(debugregs),
        msrs,
        events: Raw(events),
        tsc_khz,
    })
}

/// Restores `state` into `vcpu`. The caller has already set the vCPU's
/// CPUID table (KVM decides from it which MSRs and XSAVE features are
/// valid). The TSC continues from the saved value at the moment of the
/// write: time spent between capture and restore does not pass for the
/// guest.
pub fn restore(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), StateError> {
    // The order KVM requires (after CPUID, which the caller set):
    // 1. MP state: some SET ioctls behave differently for a halted vCPU.
    vcpu.set_mp_state(state.mp_state.0)
        .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    // 2. Registers. KVM_SET_REGS clears a pending exception, so it comes
    //    before KVM_SET_VCPU_EVENTS, which brings it back.
    vcpu.set_regs(&state.regs).map_err(kvm_err("KVM_SET_REGS"))?;
    // 3. Special registers: CR0/CR4/EFER decide what the XSAVE area, the
    //    XCRs and several MSRs may hold, and they restore the APIC base.
    vcpu.set_sregs(&state.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    // 4. XSAVE, then XCR0.
    set_xsave(vcpu, &state.xsave)?;
    vcpu.set_xcrs(&state.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
    // 5. Debug registers. (Nyx has no in-kernel LAPIC; one would be
    //    restored here, after SREGS and before the MSRs.)
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    // 6. TSC frequency before the TSC itself. Where the host cannot scale
    //    the TSC this fails; the guest's view of time comes from Nyx's
    //    clock (IA32_TSC is filtered, RDTSC patched), so go on with a warning.
    if let Some(khz) = state.tsc_khz {
        if vcpu.get_tsc_khz().ok() != Some(khz) {
            if let Err(e) = vcpu.set_tsc_khz(khz) {
                tracing::warn!("KVM_SET_TSC_KHZ {khz}: {e}; the TSC runs at the host's rate");
            }
        }
    }
    // 7. MSRs, the TSC-related ones last (see LATE_MSRS).
    let mut msrs: Vec<(u32, u64)> = state
        .msrs
        .iter()
        .copied()
        .filter(|m| !LATE_MSRS.contains(&m.0))
        .collect();
    for late in LATE_MSRS {
        msrs.extend(state.msrs.iter().copied().filter(|m| m.0 == late));
    }
    write_msrs(vcpu, &msrs)?;
    // 8. Pending events last: earlier SETs may clear them.
    vcpu.set_vcpu_events(&state.events)
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// The part of a vCPU's state that its guest can change while it runs
/// without an exit to Nyx (see [`crate::events::Keyframe`] for why each
/// part is in or out). Restored over a vCPU that agrees with the saved one
/// in everything else, it gives the saved vCPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VcpuDelta {
    /// General registers, RIP and RFLAGS.
    pub regs: Raw<kvm_regs>,
    /// Segment, descriptor-table and control registers, EFER and the
    /// pending external interrupt.
    pub sregs: Raw<kvm_sregs>,
    /// The XSAVE area as in [`VcpuState::xsave`].
    pub xsave: Vec<u8>,
    /// Extended control registers (XCR0).
    pub xcrs: Raw<kvm_xcrs>,
    /// DR0-DR3, DR6, DR7.
    pub debugregs: Raw<kvm_debugregs>,
    /// `(index, value)` of the [`keyframe_msrs`], in capture order.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exception, interrupt and NMI, interrupt shadow.
    pub events: Raw<kvm_vcpu_events>,
}

/// The MSRs a keyframe holds: those of `msr_list` (the MSRs this vCPU
/// accepts) but the TSC-related ones, which Nyx's MSR filter sends to Nyx
/// (they never change without an exit Nyx sees) and which a restore would
/// use to move the vCPU's TSC offset. One `KVM_GET_MSRS` reads them all.
pub fn keyframe_msrs(msr_list: &[u32]) -> Vec<u32> {
    msr_list.iter().copied().filter(|m| !LATE_MSRS.contains(m)).collect()
}

/// Captures the [`VcpuDelta`] of `vcpu`; `msrs` is [`keyframe_msrs`] of its
/// MSR list. Seven ioctls; the vCPU events last, as in [`capture`].
pub fn capture_delta(vcpu: &VcpuFd, msrs: &[u32]) -> Result<VcpuDelta, StateError> {
    let regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let xsave = get_xsave(vcpu)?;
    let xcrs = vcpu.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?;
    let debugregs = vcpu.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
    let msrs = read_msrs(vcpu, msrs)?;
    let events = vcpu.get_vcpu_events().map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuDelta {
        regs: Raw(regs),
        sregs: Raw(sregs),
        xsave,
        xcrs: Raw(xcrs),
        debugregs: Raw(debugregs),
        msrs,
        events: Raw(events),
    })
}

/// Restores `delta` into `vcpu`, in [`restore`]'s order: registers (which
/// clear a pending exception), special registers (CR0/CR4/EFER decide
/// what the XSAVE area may hold), XSAVE then XCR0, debug registers, the
/// MSRs, the events last.
pub fn restore_delta(vcpu: &VcpuFd, delta: &VcpuDelta) -> Result<(), StateError> {
    vcpu.set_regs(&delta.regs).map_err(kvm_err("KVM_SET_REGS"))?;
    vcpu.set_sregs(&delta.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    set_xsave(vcpu, &delta.xsave)?;
    vcpu.set_xcrs(&delta.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&delta.debugregs)
        .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    write_msrs(vcpu, &delta.msrs)?;
    vcpu.set_vcpu_events(&delta.events)
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// The x87/SSE state a vCPU has after reset (FCW 0x37F, MXCSR 0x1F80),
/// as the boot loader and a start-up IPI give it.
pub fn reset_fpu(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let fpu = kvm_bindings::kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
}

/// Completes the instruction behind the last exit without running the
/// guest further: KVM finishes a port I/O or MMIO read only on the next
/// `KVM_RUN`, and until then the registers it returns are not the state to
/// save. Enters `KVM_RUN` with `immediate_exit` set, which returns at once.
/// Call it before [`capture`] whenever the last exit was I/O or MMIO.
pub fn complete_pending_exit(vcpu: &mut VcpuFd) -> Result<(), StateError> {
    vcpu.set_kvm_immediate_exit(1);
    let r = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match r {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(kvm_err("KVM_RUN")(e)),
        Ok(()) => Ok(()),
    }
}

/// Number of registers that [`register_digest`] covers.
pub const DIGEST_REGISTERS: usize = 34;

/// The registers that [`register_digest`] covers, by name, in digest order:
/// rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8-r15, rip, rflags; for each of
/// cs, ds, es, fs, gs, ss its selector then its base; cr0, cr3, cr4, efer.
pub fn digest_registers(regs: &kvm_regs, sregs: &kvm_sregs) -> [(&'static str, u64); DIGEST_REGISTERS] {
    let r = regs;
    let s = sregs;
    [
        ("rax", r.rax),
        ("rbx", r.rbx),
        ("rcx", r.rcx),
        ("rdx", r.rdx),
        ("rsi", r.rsi),
        ("rdi", r.rdi),
        ("rsp", r.rsp),
        ("rbp", r.rbp),
        ("r8", r.r8),
        ("r9", r.r9),
        ("r10", r.r10),
        ("r11", r.r11),
        ("r12", r.r12),
        ("r13", r.r13),
        ("r14", r.r14),
        ("r15", r.r15),
        ("rip", r.rip),
        ("rflags", r.rflags),
        ("cs", s.cs.selector.into()),
        ("cs.base", s.cs.base),
        ("ds", s.ds.selector.into()),
        ("ds.base", s.ds.base),
        ("es", s.es.selector.into()),
        ("es.base", s.es.base),
        ("fs", s.fs.selector.into()),
        ("fs.base", s.fs.base),
        ("gs", s.gs.selector.into()),
        ("gs.base", s.gs.base),
        ("ss", s.ss.selector.into()),
        ("ss.base", s.ss.base),
        ("cr0", s.cr0),
        ("cr3", s.cr3),
        ("cr4", s.cr4),
        ("efer", s.efer),
    ]
}

/// Registers that divergence reports list besides the digested ones.
fn other_registers(s: &kvm_sregs) -> [(&'static str, u64); 10] {
    [
        ("cr2", s.cr2),
        ("cr8", s.cr8),
        ("gdt.base", s.gdt.base),
        ("gdt.limit", s.gdt.limit.into()),
        ("idt.base", s.idt.base),
        ("idt.limit", s.idt.limit.into()),
        ("tr", s.tr.selector.into()),
        ("tr.base", s.tr.base),
        ("ldt", s.ldt.selector.into()),
        ("apic_base", s.apic_base),
    ]
}

/// One step of the digest: for a fixed `h` it is a bijection of `w`, and
/// for a fixed `w` a bijection of `h`.
#[inline(always)]
pub(crate) fn mix(h: u64, w: u64) -> u64 {
    (h.rotate_left(23) ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Final avalanche (the splitmix64 finalizer, a bijection).
#[inline(always)]
pub(crate) fn finish(mut h: u64) -> u64 {
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A 64-bit digest of the registers of [`digest_registers`] (the 16
/// general registers, RIP, RFLAGS, the six segment selectors and bases,
/// CR0, CR3, CR4 and EFER), each mixed in as one 64-bit word in that
/// order. No allocation. Every step is a bijection, so two register sets
/// that differ in exactly one covered register always have different
/// digests. Not a cryptographic hash.
pub fn register_digest(regs: &kvm_regs, sregs: &kvm_sregs) -> u64 {
    let h = digest_registers(regs, sregs)
        .iter()
        .fold(0x6e79_7852_6567_7321, |h, &(_, v)| mix(h, v));
    finish(h)
}

/// The registers that differ between `a` and `b`, one line each, as
/// `"rax: 0x1 != 0x2"` (a's value first): the digested ones, then CR2, CR8,
/// the descriptor tables, TR, LDT and the APIC base.
pub fn registers_diff(a: (&kvm_regs, &kvm_sregs), b: (&kvm_regs, &kvm_sregs)) -> Vec<String> {
    let da = digest_registers(a.0, a.1);
    let db = digest_registers(b.0, b.1);
    let oa = other_registers(a.1);
    let ob = other_registers(b.1);
    da.iter()
        .zip(&db)
        .chain(oa.iter().zip(&ob))
        .filter(|(x, y)| x.1 != y.1)
        .map(|(x, y)| format!("{}: {:#x} != {:#x}", x.0, x.1, y.1))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A vCPU state with a value in most parts (no KVM needed).
    pub(crate) fn sample() -> VcpuState {
        let mut s = VcpuState {
            xsave: (0..4100u32).map(|i| (i % 251) as u8).collect(),
            msrs: vec![(0x10, 5), (0x277, 0x0007_0406_0007_0406)],
            tsc_khz: Some(2_000_000),
            ..Default::default()
        };
        s.regs.rax = 0x1234;
        s.sregs.cs.selector = 8;
        s.sregs.efer = 0x500;
        s.events.nmi.masked = 1;
        s.xcrs.nr_xcrs = 1;
        s.debugregs.dr7 = 0x401;
        s.mp_state.mp_state = 0;
        s
    }

    #[test]
    fn state_round_trips_through_postcard() {
        let s = sample();
        let bytes = postcard::to_allocvec(&s).unwrap();
        let back: VcpuState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, s);
        let mut t = s.clone();
        t.sregs.cr4 ^= 1 << 5;
        assert_ne!(t, s, "equality compares the KVM structures' bytes");
    }

    #[test]
    fn raw_rejects_a_wrong_length() {
        let size = std::mem::size_of::<kvm_regs>();
        for len in [0, size - 1, size + 1] {
            let bytes = postcard::to_allocvec(&vec![7u8; len]).unwrap();
            assert!(postcard::from_bytes::<Raw<kvm_regs>>(&bytes).is_err(), "{len}");
        }
        let bytes = postcard::to_allocvec(&vec![7u8; size]).unwrap();
        let r: Raw<kvm_regs> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(r.rip, 0x0707_0707_0707_0707);
    }

    #[test]
    fn extra_msrs_cover_mtrrs_pat_and_tsc() {
        let v = extra_msrs();
        for m in [0x200, 0x20f, 0x250, 0x258, 0x259, 0x268, 0x26f, 0x277, 0x2ff, 0x10] {
            assert!(v.contains(&m), "{m:#x}");
        }
        assert!(!v.contains(&0x210) && !v.contains(&0x25a));
    }

    #[test]
    fn registers_diff_names_what_differs() {
        let r = kvm_regs::default();
        let s = kvm_sregs::default();
        assert!(registers_diff((&r, &s), (&r, &s)).is_empty());
        let mut r2 = r;
        r2.rax = 2;
        let mut s2 = s;
        s2.cr2 = 0x1000;
        s2.fs.base = 0xffff;
        assert_eq!(
            registers_diff((&r, &s), (&r2, &s2)),
            vec!["rax: 0x0 != 0x2", "fs.base: 0x0 != 0xffff", "cr2: 0x0 != 0x1000"]
        );
    }

    /// Flips `delta` into covered register `i` (0..DIGEST_REGISTERS).
    fn poke(r: &mut kvm_regs, s: &mut kvm_sregs, i: usize, delta: u64) {
        let d16 = delta as u16;
        match i {
            0 => r.rax ^= delta,
            1 => r.rbx ^= delta,
            2 => r.rcx ^= delta,
            3 => r.rdx ^= delta,
            4 => r.rsi ^= delta,
            5 => r.rdi ^= delta,
            6 => r.rsp ^= delta,
            7 => r.rbp ^= delta,
            8 => r.r8 ^= delta,
            9 => r.r9 ^= delta,
            10 => r.r10 ^= delta,
            11 => r.r11 ^= delta,
            12 => r.r12 ^= delta,
            13 => r.r13 ^= delta,
            14 => r.r14 ^= delta,
            15 => r.r15 ^= delta,
            16 => r.rip ^= delta,
            17 => r.rflags ^= delta,
            18 => s.cs.selector ^= d16,
            19 => s.cs.base ^= delta,
            20 => s.ds.selector ^= d16,
            21 => s.ds.base ^= delta,
            22 => s.es.selector ^= d16,
            23 => s.es.base ^= delta,
            24 => s.fs.selector ^= d16,
            25 => s.fs.base ^= delta,
            26 => s.gs.selector ^= d16,
            27 => s.gs.base ^= delta,
            28 => s.ss.selector ^= d16,
            29 => s.ss.base ^= delta,
            30 => s.cr0 ^= delta,
            31 => s.cr3 ^= delta,
            32 => s.cr4 ^= delta,
            33 => s.efer ^= delta,
            _ => unreachable!("only {DIGEST_REGISTERS} registers are covered"),
        }
    }

    fn any_regs() -> impl Strategy<Value = (kvm_regs, kvm_sregs)> {
        (
            proptest::array::uniform16(any::<u64>()),
            proptest::array::uniform16(any::<u64>()),
        )
            .prop_map(|(a, b)| {
                let mut r = kvm_regs::default();
                let mut s = kvm_sregs::default();
                for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
                    poke(&mut r, &mut s, i, x);
                    poke(&mut r, &mut s, 16 + i, y);
                }
                poke(&mut r, &mut s, 32, a[0] ^ b[1]);
                poke(&mut r, &mut s, 33, a[1] ^ b[0]);
                (r, s)
            })
    }

    proptest! {
        #[test]
        fn digest_sees_any_one_covered_register(
            (r, s) in any_regs(),
            i in 0..DIGEST_REGISTERS,
            delta in 1..=u64::from(u16::MAX),
            shift in 0u32..48,
        ) {
            let mut r2 = r;
            let mut s2 = s;
            // Selectors are 16 bits: keep the change inside them.
            let delta = if (18..30).contains(&i) && i % 2 == 0 { delta } else { delta << shift };
            poke(&mut r2, &mut s2, i, delta);
            prop_assert_ne!(register_digest(&r, &s), register_digest(&r2, &s2));
            let diff = registers_diff((&r, &s), (&r2, &s2));
            prop_assert_eq!(diff.len(), 1);
            let name = digest_registers(&r, &s)[i].0;
            prop_assert!(diff[0].starts_with(&format!("{name}: ")), "{:?}", diff);
        }

        #[test]
        fn digest_ignores_uncovered_registers((r, s) in any_regs(), cr2 in any::<u64>(), lim in any::<u32>()) {
            let mut s2 = s;
            s2.cr2 = cr2;
            s2.cs.limit = lim;
            prop_assert_eq!(register_digest(&r, &s), register_digest(&r, &s2));
        }
    }

    /// KVM handles for tests: a VM with `mib` MiB of RAM (one slot per
    /// region) and one vCPU with KVM's supported CPUID.
    pub(crate) struct TestVm {
        pub vcpu: VcpuFd,
        pub vm: kvm_ioctls::VmFd,
        pub kvm: Kvm,
        pub mem: crate::memory::GuestMemory,
    }

    /// The KVM device of the shared probe ([`crate::probe::kvm_available`]),
    /// opened: `None` skips the test, unless NYX_REQUIRE_KVM=1, which makes
    /// it fail.
    pub(crate) fn test_kvm() -> Option<Kvm> {
        if !crate::probe::kvm_available() {
            return None;
        }
        let device = std::ffi::CString::new(crate::probe::kvm_device()).unwrap();
        Some(Kvm::new_with_path(device.as_c_str()).unwrap())
    }

    /// Opens KVM, or says why not: `None` skips the test (the shared probe,
    /// [`crate::probe::kvm_available`]), unless NYX_REQUIRE_KVM=1, which
    /// makes it fail.
    pub(crate) fn test_vm(mib: u64) -> Option<TestVm> {
        use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
        let kvm = test_kvm()?;
        let vm = kvm.create_vm().unwrap();
        let mem = crate::memory::create(mib).unwrap();
        for (slot, r) in mem.iter().enumerate() {
            let region = kvm_bindings::kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: `mem` is dropped after `vm` (field order of TestVm).
            unsafe { vm.set_user_memory_region(region).unwrap() };
        }
        let vcpu = vm.create_vcpu(0).unwrap();
        let cpuid = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        Some(TestVm { vcpu, vm, kvm, mem })
    }

    /// Flat 32-bit protected mode (no paging), no GDT in memory needed.
    pub(crate) fn protected_mode(vcpu: &VcpuFd, rip: u64) {
        let mut s = vcpu.get_sregs().unwrap();
        let seg = |selector: u16, type_: u8| kvm_bindings::kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 0,
            db: 1,
            s: 1,
            l: 0,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        s.cs = seg(0x8, 0xb);
        for d in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
            *d = seg(0x10, 0x3);
        }
        s.cr0 = 0x11; // PE | ET
        vcpu.set_sregs(&s).unwrap();
        vcpu.set_regs(&kvm_regs {
            rip,
            rflags: 2,
            ..Default::default()
        })
        .unwrap();
    }

    const PAT: u64 = 0x0007_0405_0006_0100;
    const MTRR_PHYSBASE1: u32 = 0x202;
    const LSTAR: u32 = 0xc000_0082;
    const KERNEL_GS_BASE: u32 = 0xc000_0102;
    const SYSENTER_CS: u32 = 0x174;

    /// Gives every part of the vCPU's state a value that no reset has.
    fn set_odd_state(vcpu: &VcpuFd) {
        let mut r = kvm_regs::default();
        for (i, v) in [
            &mut r.rax, &mut r.rbx, &mut r.rcx, &mut r.rdx, &mut r.rsi, &mut r.rdi, &mut r.rsp, &mut r.rbp, &mut r.r8,
            &mut r.r9, &mut r.r10, &mut r.r11, &mut r.r12, &mut r.r13, &mut r.r14, &mut r.r15,
        ]
        .into_iter()
        .enumerate()
        {
            *v = 0x0101_0101_0000_0000 * (i as u64 + 1) + i as u64;
        }
        r.rip = 0x1_2345;
        r.rflags = 0x2 | 0x40 | 0x800 | 0x1;
        vcpu.set_regs(&r).unwrap();

        let mut s = vcpu.get_sregs().unwrap();
        s.cs.base = 0x1_2340;
        s.ds.base = 0x5_5550;
        s.fs.base = 0x7_0000;
        s.gs.selector = 0x38;
        s.gdt = kvm_bindings::kvm_dtable {
            base: 0x9000,
            limit: 0x3f,
            ..Default::default()
        };
        s.cr0 |= 0x20; // NE
        s.cr2 = 0xdead_b000;
        s.cr3 = 0x7_3000;
        s.cr4 |= 0x600; // OSFXSR | OSXMMEXCPT
        s.efer |= 1; // SCE
        vcpu.set_sregs(&s).unwrap();

        // Through the XSAVE area (KVM_SET_FPU leaves XSTATE_BV alone, so
        // XMM values set that way may read back as the init state).
        let mut xs = get_xsave(vcpu).unwrap();
        xs[0..2].copy_from_slice(&0x27fu16.to_le_bytes()); // FCW
        xs[24..28].copy_from_slice(&(0x1f80u32 | 0x6000).to_le_bytes()); // MXCSR
        xs[160 + 5 * 16..160 + 6 * 16].copy_from_slice(b"Nyx keeps xmm5!!");
        xs[512] |= 0x3; // XSTATE_BV: x87 and SSE state present
        set_xsave(vcpu, &xs).unwrap();

        let mut x = vcpu.get_xcrs().unwrap();
        if x.nr_xcrs > 0 {
            x.xcrs[0].value |= 0x2; // x87 | SSE
            vcpu.set_xcrs(&x).unwrap();
        }

        let mut d = vcpu.get_debug_regs().unwrap();
        d.db = [0x1000, 0x2000, 0x3000, 0x4000];
        d.dr7 = 0x403;
        vcpu.set_debug_regs(&d).unwrap();

        let mut e = vcpu.get_vcpu_events().unwrap();
        e.nmi.masked = 1;
        e.interrupt.shadow = 1;
        e.flags |= kvm_bindings::KVM_VCPUEVENT_VALID_SHADOW;
        vcpu.set_vcpu_events(&e).unwrap();

        write_msrs(
            vcpu,
            &[
                (IA32_PAT, PAT),
                (IA32_MTRR_DEF_TYPE, 0xc06),
                (MTRR_PHYSBASE1, 0x8000_0006),
                (0x258, 0x0606_0606_0505_0404),
                (SYSENTER_CS, 0x10),
                (LSTAR, 0xffff_ffff_8123_4560),
                (KERNEL_GS_BASE, 0x1234_5000),
                (IA32_TSC, 0x10_0000_0000),
            ],
        )
        .unwrap();
    }

    #[test]
    fn capture_restore_capture_is_exact() {
        let Some(a) = test_vm(2) else { return };
        let list = supported_msrs(&a.kvm);
        let fresh = capture(&a.vcpu, &list).unwrap();
        set_odd_state(&a.vcpu);
        let saved = capture(&a.vcpu, &list).unwrap();
        assert_ne!(saved, fresh);
        assert_eq!(saved.regs.r15, 0x0101_0101_0000_0000 * 16 + 15);
        assert_eq!((saved.sregs.cs.base, saved.sregs.cr2), (0x1_2340, 0xdead_b000));
        assert_eq!(saved.msr(IA32_PAT), Some(PAT));
        assert_eq!(saved.msr(IA32_MTRR_DEF_TYPE), Some(0xc06));
        assert_eq!(saved.msr(MTRR_PHYSBASE1), Some(0x8000_0006));
        assert_eq!(saved.msr(LSTAR), Some(0xffff_ffff_8123_4560));
        assert!(saved.msr(IA32_TSC).is_some_and(|t| t >= 0x10_0000_0000));
        assert_eq!(saved.debugregs.db[3], 0x4000);
        assert_eq!(saved.events.nmi.masked, 1);
        let xmm5 = &saved.xsave[160 + 5 * 16..160 + 6 * 16];
        assert_eq!(xmm5, b"Nyx keeps xmm5!!");
        assert_eq!(&saved.xsave[24..28], &(0x1f80u32 | 0x6000).to_le_bytes());

        // Through the wire format and into a second, fresh VM.
        let bytes = postcard::to_allocvec(&saved).unwrap();
        let decoded: VcpuState = postcard::from_bytes(&bytes).unwrap();
        let Some(b) = test_vm(2) else { return };
        assert_ne!(capture(&b.vcpu, &list).unwrap(), saved);
        restore(&b.vcpu, &decoded).unwrap();
        let again = capture(&b.vcpu, &list).unwrap();

        // The TSC runs on: it may only have moved forward, by little.
        let (t0, t1) = (saved.msr(IA32_TSC).unwrap(), again.msr(IA32_TSC).unwrap());
        let khz = u64::from(saved.tsc_khz.unwrap_or(4_000_000));
        assert!(t1 >= t0 && t1 - t0 < khz * 10_000, "TSC {t0:#x} -> {t1:#x}");
        let strip = |s: &VcpuState| {
            let mut s = s.clone();
            s.msrs.retain(|m| m.0 != IA32_TSC);
            s
        };
        let (x, y) = (strip(&saved), strip(&again));
        for (m, n) in x.msrs.iter().zip(&y.msrs) {
            assert_eq!(m, n, "MSR {:#x}", m.0);
        }
        assert_eq!(x, y);
    }

    #[test]
    fn refused_msrs_are_dropped_one_by_one() {
        let Some(t) = test_vm(2) else { return };
        // 0x4b564dff and 0xdeadbeef are no MSRs at all.
        let list = [IA32_PAT, 0xdead_beef, SYSENTER_CS, 0x4b56_4dff, LSTAR];
        assert_eq!(
            accepted_msrs(&t.vcpu, &list).unwrap(),
            vec![IA32_PAT, SYSENTER_CS, LSTAR]
        );
        let s = capture(&t.vcpu, &list).unwrap();
        assert_eq!(s.msrs.len(), 3);
        let mut bad = s.clone();
        bad.msrs.push((0xdead_beef, 1));
        assert!(matches!(
            restore(&t.vcpu, &bad),
            Err(StateError::MsrRefused { index: 0xdead_beef })
        ));
    }

    #[test]
    fn supported_msrs_put_the_tsc_last() {
        let Some(t) = test_vm(2) else { return };
        let list = supported_msrs(&t.kvm);
        assert_eq!(&list[list.len() - 3..], &LATE_MSRS);
        assert!(list.contains(&IA32_PAT) && list.contains(&0x26f));
        let accepted = accepted_msrs(&t.vcpu, &list).unwrap();
        assert!(accepted.len() > 20, "{accepted:x?}");
        assert!(accepted.contains(&IA32_MTRR_DEF_TYPE));
    }

    #[test]
    fn a_restored_vcpu_continues_like_the_original() {
        // Integer code only: the emulated KVM of some hosts cannot run SSE
        // in 32-bit guests; the XSAVE area is covered by the test above.
        let code: &[u8] = &[
            0xb8, 0x11, 0x11, 0x11, 0x11, // mov eax, 0x11111111
            0xe7, 0x80, // out 0x80, eax
            0x01, 0xd8, // add eax, ebx
            0xf7, 0xe0, // mul eax
            0x6b, 0xc8, 0x03, // imul ecx, eax, 3
            0xa3, 0x00, 0x20, 0x00, 0x00, // mov [0x2000], eax
            0xe7, 0x81, // out 0x81, eax
            0xf4, // hlt
        ];
        let Some(mut a) = test_vm(2) else { return };
        use vm_memory::Bytes;
        a.mem.write_slice(code, vm_memory::GuestAddress(0x1000)).unwrap();
        protected_mode(&a.vcpu, 0x1000);
        let mut s = a.vcpu.get_sregs().unwrap();
        s.cr4 |= 0x600;
        a.vcpu.set_sregs(&s).unwrap();
        let mut r = a.vcpu.get_regs().unwrap();
        r.rbx = 0x2345;
        a.vcpu.set_regs(&r).unwrap();
        assert!(matches!(a.vcpu.run().unwrap(), kvm_ioctls::VcpuExit::IoOut(0x80, _)));
        complete_pending_exit(&mut a.vcpu).unwrap();
        let list = supported_msrs(&a.kvm);
        let state = capture(&a.vcpu, &list).unwrap();
        assert_eq!(state.regs.rip, 0x1007);
        let runs = crate::mem_state::capture_all(&a.mem);

        let finish = |t: &mut TestVm| -> (kvm_regs, u32) {
            match t.vcpu.run().unwrap() {
                kvm_ioctls::VcpuExit::IoOut(0x81, _) => {}
                other => panic!("unexpected exit {other:?}"),
            }
            assert!(matches!(t.vcpu.run().unwrap(), kvm_ioctls::VcpuExit::Hlt));
            let stored = t.mem.read_obj(vm_memory::GuestAddress(0x2000)).unwrap();
            (t.vcpu.get_regs().unwrap(), stored)
        };
        let Some(mut b) = test_vm(2) else { return };
        crate::mem_state::restore_full(&b.mem, &runs).unwrap();
        restore(&b.vcpu, &state).unwrap();
        let (ra, ma) = finish(&mut a);
        let (rb, mb) = finish(&mut b);
        assert_eq!(ra, rb);
        assert_eq!(ma, mb);
        let x = 0x1111_1111u64 + 0x2345;
        let product = x * x;
        assert_eq!(ra.rax, product & 0xffff_ffff);
        assert_eq!(ra.rdx, product >> 32);
        assert_eq!(ra.rcx, (product * 3) & 0xffff_ffff);
        assert_eq!(u64::from(ma), product & 0xffff_ffff);
    }

    #[test]
    fn delta_round_trips_and_restores_what_it_holds() {
        let bytes = postcard::to_allocvec(&VcpuDelta {
            xsave: vec![3; 4100],
            msrs: vec![(0xc000_0102, 7)],
            ..Default::default()
        })
        .unwrap();
        let back: VcpuDelta = postcard::from_bytes(&bytes).unwrap();
        assert_eq!((back.xsave.len(), back.msrs[0]), (4100, (0xc000_0102, 7)));
        // A full state's encoding is no delta: it must not decode as one.
        assert!(postcard::from_bytes::<VcpuDelta>(&postcard::to_allocvec(&sample()).unwrap()).is_err());

        let Some(a) = test_vm(2) else { return };
        let list = accepted_msrs(&a.vcpu, &supported_msrs(&a.kvm)).unwrap();
        let msrs = keyframe_msrs(&list);
        assert!(msrs.contains(&KERNEL_GS_BASE) && msrs.contains(&LSTAR), "{msrs:x?}");
        assert!(!msrs.contains(&IA32_TSC) && msrs.contains(&IA32_PAT), "{msrs:x?}");
        let Some(b) = test_vm(2) else { return };
        set_odd_state(&a.vcpu);
        set_odd_state(&b.vcpu);
        let delta = capture_delta(&a.vcpu, &msrs).unwrap();
        let full = capture(&a.vcpu, &list).unwrap();
        assert_eq!(
            (delta.regs, delta.sregs, &delta.xsave),
            (full.regs, full.sregs, &full.xsave)
        );
        assert_eq!(delta.msrs.len(), msrs.len());
        // Change on `b` what a guest can change between exits, restore.
        let mut r = b.vcpu.get_regs().unwrap();
        r.rax = !r.rax;
        r.rip += 3;
        b.vcpu.set_regs(&r).unwrap();
        let mut s = b.vcpu.get_sregs().unwrap();
        s.gs.base = 0x4242_0000;
        b.vcpu.set_sregs(&s).unwrap();
        write_msrs(
            &b.vcpu,
            &[(KERNEL_GS_BASE, 0x99_9000), (IA32_PAT, 0x0606_0606_0606_0606)],
        )
        .unwrap();
        let mut xs = get_xsave(&b.vcpu).unwrap();
        xs[160 + 5 * 16] ^= 0xff;
        set_xsave(&b.vcpu, &xs).unwrap();
        let mut d = b.vcpu.get_debug_regs().unwrap();
        d.db[1] = 0x7777;
        b.vcpu.set_debug_regs(&d).unwrap();
        let mut e = b.vcpu.get_vcpu_events().unwrap();
        e.interrupt.injected = 1;
        e.interrupt.nr = 0x20;
        b.vcpu.set_vcpu_events(&e).unwrap();
        assert_ne!(capture_delta(&b.vcpu, &msrs).unwrap(), delta);
        restore_delta(&b.vcpu, &delta).unwrap();
        assert_eq!(capture_delta(&b.vcpu, &msrs).unwrap(), delta);
        let strip = |s: VcpuState| VcpuState {
            msrs: s.msrs.into_iter().filter(|m| m.0 != IA32_TSC).collect(),
            ..s
        };
        assert_eq!(strip(capture(&b.vcpu, &list).unwrap()), strip(full));
    }

    /// Mean ns of `f` over `n` calls, best of three rounds.
    fn time_ns<T>(n: u32, mut f: impl FnMut() -> T) -> f64 {
        (0..3)
            .map(|_| {
                let t = std::time::Instant::now();
                for _ in 0..n {
                    std::hint::black_box(f());
                }
                t.elapsed().as_nanos() as f64 / f64::from(n)
            })
            .fold(f64::MAX, f64::min)
    }

    /// What each part of a vCPU capture and restore costs on this host.
    /// `cargo test --release -p nyx-vmm --lib vcpu_state::tests::capture_cost_by_part -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, run by hand"]
    fn capture_cost_by_part() {
        let Some(mut t) = test_vm(2) else { return };
        use vm_memory::Bytes;
        // A vCPU that has run (out 0x80 in protected mode), as at a landing.
        t.mem
            .write_slice(&[0xe7, 0x80, 0xf4], vm_memory::GuestAddress(0x1000))
            .unwrap();
        protected_mode(&t.vcpu, 0x1000);
        assert!(matches!(t.vcpu.run().unwrap(), kvm_ioctls::VcpuExit::IoOut(0x80, _)));
        complete_pending_exit(&mut t.vcpu).unwrap();
        set_odd_state(&t.vcpu);
        let v = &t.vcpu;
        let list = accepted_msrs(v, &supported_msrs(&t.kvm)).unwrap();
        let few = keyframe_msrs(&list);
        let n = 3000;
        let full = capture(v, &list).unwrap();
        let delta = capture_delta(v, &few).unwrap();
        let fpu = v.get_fpu().unwrap();
        let rows: Vec<(String, f64)> = vec![
            ("get mp_state".into(), time_ns(n, || v.get_mp_state().unwrap())),
            ("get regs".into(), time_ns(n, || v.get_regs().unwrap())),
            ("get sregs".into(), time_ns(n, || v.get_sregs().unwrap())),
            (
                format!("get xsave ({} B kept)", full.xsave.len()),
                time_ns(n, || get_xsave(v).unwrap()),
            ),
            ("get fpu (kvm_fpu)".into(), time_ns(n, || v.get_fpu().unwrap())),
            ("host CPUID for the XSAVE size".into(), time_ns(n, host_xsave_room)),
            ("get xcrs".into(), time_ns(n, || v.get_xcrs().unwrap())),
            ("get debugregs".into(), time_ns(n, || v.get_debug_regs().unwrap())),
            ("get tsc_khz".into(), time_ns(n, || v.get_tsc_khz())),
            (
                format!("get all {} MSRs", list.len()),
                time_ns(n, || read_msrs(v, &list).unwrap()),
            ),
            (
                format!("get {} keyframe MSRs (no TSC)", few.len()),
                time_ns(n, || read_msrs(v, &few).unwrap()),
            ),
            ("get vcpu events".into(), time_ns(n, || v.get_vcpu_events().unwrap())),
            ("capture (full)".into(), time_ns(n, || capture(v, &list).unwrap())),
            ("capture_delta".into(), time_ns(n, || capture_delta(v, &few).unwrap())),
            ("set regs".into(), time_ns(n, || v.set_regs(&full.regs).unwrap())),
            ("set sregs".into(), time_ns(n, || v.set_sregs(&full.sregs).unwrap())),
            ("set xsave".into(), time_ns(n, || set_xsave(v, &full.xsave).unwrap())),
            ("set fpu (kvm_fpu)".into(), time_ns(n, || v.set_fpu(&fpu).unwrap())),
            (
                "set vcpu events".into(),
                time_ns(n, || v.set_vcpu_events(&full.events).unwrap()),
            ),
            ("restore (full)".into(), time_ns(n / 3, || restore(v, &full).unwrap())),
            ("restore_delta".into(), time_ns(n, || restore_delta(v, &delta).unwrap())),
        ];
        for (what, ns) in &rows {
            println!("COST {what:<32} {:>9.2} us", ns / 1000.0);
        }
        let get = |k: &str| rows.iter().find(|r| r.0 == k).map_or(0.0, |r| r.1);
        assert!(get("capture_delta") < get("capture (full)"), "{rows:?}");
    }
}
