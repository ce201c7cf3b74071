//! Finding a landing: running the replayed guest to the exact point where
//! the recording stopped it asynchronously.
//!
//! A hardware execution breakpoint (DR0 through `KVM_SET_GUEST_DEBUG`) is
//! armed at the landing's RIP. At each hit the general registers are compared
//! with the recorded ones, then the digest of all registers, then the digest
//! of the pages written since the previous landing: equal registers and
//! equal written memory mean an equal machine, so the first full match is
//! the landing, even in a loop whose registers never change. Between hits the
//! breakpoint is disarmed, the guest single-stepped past it and the
//! breakpoint re-armed (continuing with RFLAGS.RF does not work on every
//! KVM). A REP string instruction stops at each iteration while single-
//! stepped, so a landing inside one is found too.

use kvm_bindings::{
    kvm_guest_debug, kvm_guest_debug_arch, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
};
use kvm_ioctls::VcpuExit;
use nyx_vmm::events::{Event, ExitKind, GprSnapshot, Keyframe, Landing};
use nyx_vmm::hooks::{set_queued_interrupt, HookCtx, HookError};

use crate::{lock, Shared};

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HookError {
    move |source| HookError::Kvm { what, source }
}

fn set_debug(ctx: &mut HookCtx<'_>, control: u32, dr0: Option<u64>) -> Result<(), HookError> {
    let mut arch = kvm_guest_debug_arch::default();
    if let Some(addr) = dr0 {
        arch.debugreg[0] = addr;
        // L0 enabled, RW0 = 00 (execute), LEN0 = 00.
        arch.debugreg[7] = 1;
    }
    let dbg = kvm_guest_debug { control, pad: 0, arch };
    ctx.vcpu.set_guest_debug(&dbg).map_err(kvm("KVM_SET_GUEST_DEBUG"))
}

/// Whether the vCPU is exactly at `landing`.
fn at_landing(ctx: &mut HookCtx<'_>, landing: &Landing) -> Result<bool, HookError> {
    let regs = ctx.vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    if GprSnapshot::of(&regs) != landing.regs {
        return Ok(false);
    }
    let sregs = ctx.vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    if nyx_vmm::vcpu_state::register_digest(&regs, &sregs) != landing.regs_digest {
        return Ok(false);
    }
    ctx.collect_dirty()?;
    if ctx.dirty_since_landing.len() as u32 != landing.dirty_pages {
        return Ok(false);
    }
    Ok(ctx.dirty_digest(&regs, &sregs) == landing.mem_digest)
}

fn unexpected(ctx: &mut HookCtx<'_>, state: &Shared, landing: &Landing, what: String) -> HookError {
    let _ = set_debug(ctx, 0, None);
    let s = lock(state);
    let msg = format!(
        "expected landing at rip {:#x} (recorded asynchronous stop)\n  actual:   {what} before reaching it",
        landing.regs.rip
    );
    crate::report::diverge(ctx, &s.cursor, msg, Some(&landing.regs))
}

/// How a search ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchEnd {
    /// At the landing, after this many breakpoint hits and single steps.
    Landed(u64),
    /// A debugger's breakpoint stopped the guest first (the landing is
    /// still ahead; the search goes on when the guest is resumed).
    Breakpoint(nyx_vmm::machine::DebugStop),
    /// Another thread kicked the vCPU (a debugger's Ctrl-C).
    Kicked,
}

/// Runs the guest to `landing`. An interrupt the recording still held
/// undelivered at the landing is withdrawn for the search and queued again
/// after it. A debugger's breakpoints stay armed in the debug registers the
/// landing's does not need.
pub fn run_to_landing(ctx: &mut HookCtx<'_>, landing: &Landing, state: &Shared) -> Result<SearchEnd, HookError> {
    if landing.pending_interrupt.is_some() {
        set_queued_interrupt(ctx.vcpu, None)?;
    }
    let end = search(ctx, landing, state)?;
    if let (SearchEnd::Landed(_), Some(v)) = (end, landing.pending_interrupt) {
        set_queued_interrupt(ctx.vcpu, Some(v))?;
    }
    Ok(end)
}

/// Single-stepping toward the next landing (a debugger steps the replay):
/// when the vCPU is exactly at it, the landing is taken (its interrupt
/// queued again) and `Some(whether it was a recorded interrupt window)`
/// returned; until then an interrupt the recording
/// still held undelivered there stays withdrawn, so the steps see the
/// guest the search would.
pub fn step_toward_landing(ctx: &mut HookCtx<'_>, state: &Shared) -> Result<Option<bool>, HookError> {
    let landing = {
        let mut s = lock(state);
        // A recorded interrupt window is reached as its landing.
        let window = matches!(s.cursor.peek(), Some(Event::Exit(r)) if r.kind == ExitKind::IrqWindow);
        // Only what the check compares is copied: this runs before every
        // step, and a keyframe holds pages.
        match (window, s.cursor.peek()) {
            (false, Some(Event::Landing(l))) => l.digests_only(),
            (true, _) => match s.cursor.peek_second() {
                Some(Event::Landing(l)) => l.digests_only(),
                _ => return Ok(None),
            },
            _ => return Ok(None),
        }
    };
    if landing.pending_interrupt.is_some() {
        set_queued_interrupt(ctx.vcpu, None)?;
    }
    if !at_landing(ctx, &landing)? {
        return Ok(None);
    }
    ctx.dirty_since_landing.clear();
    if let Some(v) = landing.pending_interrupt {
        set_queued_interrupt(ctx.vcpu, Some(v))?;
        stop_at_handler(ctx, v, state)?;
    }
    let mut s = lock(state);
    let window = crate::take_window_exit(&mut s.cursor);
    s.cursor.advance();
    s.landings += 1;
    Ok(Some(window))
}

/// The linear address of the handler of interrupt `vector` in the guest's
/// IDT (long mode, protected mode, real mode), if it can be read.
fn handler_of(ctx: &HookCtx<'_>, vector: u8) -> Result<Option<u64>, HookError> {
    let sregs = ctx.vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let paging = nyx_vmm::paging::PagingRegs::of(&sregs);
    Ok(gate_handler(&sregs, vector, |addr, buf| {
        nyx_vmm::paging::read_virt(ctx.mem, &paging, addr, buf).is_ok()
    }))
}

/// The handler address in the IDT gate of `vector`, reading the gate with
/// `read` (false: it cannot be read). The IDT base is the guest's: the gate
/// address wraps as the CPU's linear addresses do, never overflows.
fn gate_handler(
    sregs: &kvm_bindings::kvm_sregs,
    vector: u8,
    mut read: impl FnMut(u64, &mut [u8]) -> bool,
) -> Option<u64> {
    let v = u64::from(vector);
    let base = sregs.idt.base;
    if sregs.efer & (1 << 10) != 0 {
        let mut g = [0u8; 16];
        if !read(base.wrapping_add(v * 16), &mut g) {
            return None;
        }
        let lo = u64::from(u16::from_le_bytes([g[0], g[1]]));
        let mid = u64::from(u16::from_le_bytes([g[6], g[7]]));
        let hi = u64::from(u32::from_le_bytes([g[8], g[9], g[10], g[11]]));
        Some(lo | mid << 16 | hi << 32)
    } else if sregs.cr0 & 1 != 0 {
        let mut g = [0u8; 8];
        if !read(base.wrapping_add(v * 8) & 0xffff_ffff, &mut g) {
            return None;
        }
        // Flat code segments are what Nyx's guests use; another base would
        // need the GDT (the stop then comes one instruction later).
        let off = u64::from(u16::from_le_bytes([g[0], g[1]])) | u64::from(u16::from_le_bytes([g[6], g[7]])) << 16;
        Some(off)
    } else {
        let mut g = [0u8; 4];
        if !read(base.wrapping_add(v * 4), &mut g) {
            return None;
        }
        let off = u64::from(u16::from_le_bytes([g[0], g[1]]));
        let seg = u64::from(u16::from_le_bytes([g[2], g[3]]));
        Some(seg * 16 + off)
    }
}

/// While a debugger single-steps a replay and an interrupt is injected, a
/// step would deliver it and run the handler's first instruction at once;
/// an execution breakpoint at the handler stops the vCPU at its entry
/// instead, where a breakpoint of a free run stops too.
pub fn stop_at_handler(ctx: &mut HookCtx<'_>, vector: u8, state: &Shared) -> Result<(), HookError> {
    if let Some(addr) = handler_of(ctx, vector)? {
        set_debug(
            ctx,
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_USE_HW_BP,
            Some(addr),
        )?;
        lock(state).injected_handler = Some(addr);
    }
    Ok(())
}

/// Hits after which a search gives up and reports a divergence: a guest that
/// never reaches the recorded state would otherwise spin forever in a busy
/// loop. Recorded landings in the in-tree guests take hundreds of hits.
const MAX_HITS: u64 = 200_000;

/// The debug registers for a search: a debugger's breakpoints where it put
/// them, the landing's RIP in a free slot. With no free slot the search
/// single-steps (slow, but it misses nothing).
struct Arming {
    control: u32,
    arch: kvm_guest_debug_arch,
    /// The debugger's enabled slots.
    theirs: u8,
}

fn arming(ctx: &HookCtx<'_>, linear: u64) -> Arming {
    let g = ctx.guest_debug;
    let mut arch = kvm_guest_debug_arch::default();
    arch.debugreg[..4].copy_from_slice(&g.dr);
    let theirs = (0..4)
        .filter(|i| g.dr7 & (3 << (2 * i)) != 0)
        .fold(0u8, |m, i| m | 1 << i);
    let mut dr7 = g.dr7 & !0xff00 & !(0xffff_u64 << 32);
    let mut control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
    match (0..4).find(|i| theirs & (1 << i) == 0) {
        Some(k) => {
            arch.debugreg[k] = linear;
            // Local enable, execution (RW = 00, LEN = 00).
            dr7 = (dr7 | 1 << (2 * k)) & !(0xf << (16 + 4 * k));
        }
        None => control |= KVM_GUESTDBG_SINGLESTEP,
    }
    arch.debugreg[7] = dr7;
    Arming { control, arch, theirs }
}

fn search(ctx: &mut HookCtx<'_>, landing: &Landing, state: &Shared) -> Result<SearchEnd, HookError> {
    // A landing without progress (the kick came before the guest ran).
    if at_landing(ctx, landing)? {
        ctx.dirty_since_landing.clear();
        return Ok(SearchEnd::Landed(0));
    }
    let sregs = ctx.vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let linear = nyx_vmm::crash::CodeMode::linear(&sregs, landing.regs.rip);
    let armed = arming(ctx, linear);
    let arm = |ctx: &mut HookCtx<'_>| {
        let dbg = kvm_guest_debug {
            control: armed.control,
            pad: 0,
            arch: armed.arch,
        };
        ctx.vcpu.set_guest_debug(&dbg).map_err(kvm("KVM_SET_GUEST_DEBUG"))
    };
    let mut hits = 0u64;
    arm(ctx)?;
    loop {
        if hits >= MAX_HITS {
            let what = format!(
                "{hits} breakpoint hits and single steps at its RIP without a full match (the search gives up)"
            );
            return Err(unexpected(ctx, state, landing, what));
        }
        let (dr6, pc) = match ctx.vcpu.run() {
            Ok(VcpuExit::Debug(d)) => (d.dr6, d.pc),
            Ok(other) => {
                let what = format!("the guest made exit {other:?}");
                return Err(unexpected(ctx, state, landing, what));
            }
            Err(e) if e.errno() == libc::EINTR => {
                ctx.vcpu.set_kvm_immediate_exit(0);
                set_debug(ctx, 0, None)?;
                return Ok(SearchEnd::Kicked);
            }
            Err(e) => return Err(kvm("KVM_RUN")(e)),
        };
        hits += 1;
        let rip = ctx.vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?.rip;
        // The landing comes first where both are here: the recorded
        // interrupt is taken before the instruction a breakpoint is on.
        let at_rip = rip == landing.regs.rip;
        if at_rip && at_landing(ctx, landing)? {
            set_debug(ctx, 0, None)?;
            ctx.dirty_since_landing.clear();
            return Ok(SearchEnd::Landed(hits));
        }
        if dr6 & u64::from(armed.theirs) != 0 {
            set_debug(ctx, 0, None)?;
            return Ok(SearchEnd::Breakpoint(nyx_vmm::machine::DebugStop {
                exception: 1,
                pc,
                dr6,
            }));
        }
        if !at_rip {
            continue;
        }
        // At the landing's RIP but not its state: step past (or through
        // the iterations of a REP instruction there).
        loop {
            set_debug(ctx, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP, None)?;
            match ctx.vcpu.run() {
                Ok(VcpuExit::Debug(_)) => hits += 1,
                Ok(other) => {
                    let what = format!("the guest made exit {other:?} (single-stepping)");
                    return Err(unexpected(ctx, state, landing, what));
                }
                Err(e) => return Err(kvm("KVM_RUN (single step)")(e)),
            }
            let rip = ctx.vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?.rip;
            if rip != landing.regs.rip {
                break;
            }
            if at_landing(ctx, landing)? {
                set_debug(ctx, 0, None)?;
                ctx.dirty_since_landing.clear();
                return Ok(SearchEnd::Landed(hits));
            }
        }
        arm(ctx)?;
    }
}

/// Moves the guest to a landing the recorder stored as a delta keyframe:
/// the pages written since the previous landing and the part of the vCPU
/// a guest changes without an exit are restored over the replay's own vCPU
/// (see [`Keyframe`]), then checked against the landing's digests: a replay
/// that had diverged before in state the keyframe does not hold shows up
/// here or at a later sync point.
pub fn restore_keyframe(
    ctx: &mut HookCtx<'_>,
    landing: &Landing,
    keyframe: &Keyframe,
    state: &Shared,
) -> Result<(), HookError> {
    if usize::from(keyframe.cpu) != ctx.vcpu_index {
        let s = lock(state);
        let msg = format!(
            "the landing at rip {:#x} is vCPU {}'s, the replay runs vCPU {} here",
            landing.regs.rip, keyframe.cpu, ctx.vcpu_index
        );
        return Err(crate::report::diverge(ctx, &s.cursor, msg, Some(&landing.regs)));
    }
    nyx_vmm::mem_state::restore_runs(ctx.mem, &keyframe.pages)
        .map_err(|e| HookError::Trace(format!("keyframe memory: {e}")))?;
    ctx.load_vcpu_keyframe(keyframe)?;
    // The guest's own writes up to here are superseded by the keyframe.
    ctx.collect_dirty()?;
    ctx.dirty_since_landing.clear();
    let regs = ctx.vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = ctx.vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let digest_ok = nyx_vmm::vcpu_state::register_digest(&regs, &sregs) == landing.regs_digest;
    let pages = keyframe.pages.iter().flat_map(|r| {
        let first = r.gpa / 4096;
        first..first + (r.data.len() as u64).div_ceil(4096)
    });
    ctx.note_written(pages);
    let mem_ok = ctx.dirty_digest(&regs, &sregs) == landing.mem_digest;
    ctx.dirty_since_landing.clear();
    let full_ok = keyframe
        .memory_digest
        .is_none_or(|d| d == nyx_vmm::mem_state::memory_digest(ctx.mem));
    if digest_ok && mem_ok && full_ok {
        return Ok(());
    }
    let s = lock(state);
    let msg = format!(
        "the keyframe of the landing at rip {:#x} does not match its digests (registers {digest_ok}, written pages {mem_ok}, memory {full_ok})",
        landing.regs.rip
    );
    Err(crate::report::diverge(ctx, &s.cursor, msg, Some(&landing.regs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IDT bases at the top of the address space (the guest chooses them)
    /// wrap instead of overflowing, in every mode.
    #[test]
    fn gate_addresses_wrap_at_extreme_idt_bases() {
        let mut seen = Vec::new();
        let mut read = |addr: u64, buf: &mut [u8]| {
            seen.push(addr);
            buf.fill(0x11);
            true
        };
        let mut long = kvm_bindings::kvm_sregs {
            efer: 1 << 10,
            cr0: 1,
            ..Default::default()
        };
        long.idt.base = u64::MAX;
        assert_eq!(gate_handler(&long, 255, &mut read), Some(0x1111_1111_1111_1111));
        let mut prot = kvm_bindings::kvm_sregs {
            cr0: 1,
            ..Default::default()
        };
        prot.idt.base = u64::MAX;
        assert_eq!(gate_handler(&prot, 255, &mut read), Some(0x1111_1111));
        let mut real = kvm_bindings::kvm_sregs::default();
        real.idt.base = u64::MAX;
        assert_eq!(gate_handler(&real, 255, &mut read), Some(0x1111 * 16 + 0x1111));
        assert_eq!(seen, [255 * 16 - 1, (255 * 8 - 1) & 0xffff_ffff, 255 * 4 - 1]);
        assert_eq!(gate_handler(&real, 0, |_, _| false), None);
    }
}
