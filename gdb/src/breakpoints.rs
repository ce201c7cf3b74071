//! Breakpoints and watchpoints: gdb's `Z0`..`Z4` packets.
//!
//! Hardware breakpoints and watchpoints take one of the four debug-address
//! registers DR0..DR3 each, with DR7 encoding kind and length. Software
//! breakpoints replace the first byte of the instruction by `int3` (0xCC)
//! in guest-physical memory; the original byte is kept and shown to every
//! memory read, and put back on removal. Where int3 cannot be used (a
//! replay, whose memory digests must not see the 0xCC, or an address the
//! guest has not mapped yet) a software breakpoint takes a free debug
//! register instead.

use std::collections::BTreeMap;

use gdbstub::target::ext::breakpoints::{
    Breakpoints, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps, SwBreakpoint, SwBreakpointOps, WatchKind,
};
use gdbstub::target::{TargetError, TargetResult};
use vm_memory::{Bytes, GuestAddress};

use crate::target::NyxTarget;

/// What a debug register watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    /// Execution of the instruction at the address (a `hbreak`).
    Exec,
    /// Execution, standing in for a software breakpoint.
    SwExec,
    /// A watchpoint.
    Watch(WatchKind),
}

/// One armed debug register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Linear address.
    pub addr: u64,
    /// Length in bytes (1 for execution).
    pub len: u64,
    /// Kind.
    pub kind: SlotKind,
}

/// A software breakpoint written into guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwBp {
    /// Guest-physical address of the 0xCC.
    pub gpa: u64,
    /// The byte in memory before the 0xCC (restored on removal).
    pub raw: u8,
    /// The byte reads show (the original instruction's, even at a patched site).
    pub shown: u8,
}

/// All breakpoints and watchpoints of a session.
#[derive(Debug, Default, Clone)]
pub struct BreakpointSet {
    /// DR0..DR3.
    pub slots: [Option<Slot>; 4],
    /// Software breakpoints by linear address.
    pub sw: BTreeMap<u64, SwBp>,
}

/// DR7's RW field for a kind.
fn rw_bits(kind: SlotKind) -> u64 {
    match kind {
        SlotKind::Exec | SlotKind::SwExec => 0b00,
        SlotKind::Watch(WatchKind::Write) => 0b01,
        // x86 has no read-only watchpoint: read or write.
        SlotKind::Watch(WatchKind::Read | WatchKind::ReadWrite) => 0b11,
    }
}

/// DR7's LEN field for a length, if the hardware can watch it.
fn len_bits(len: u64) -> Option<u64> {
    match len {
        1 => Some(0b00),
        2 => Some(0b01),
        8 => Some(0b10),
        4 => Some(0b11),
        _ => None,
    }
}

impl BreakpointSet {
    /// DR7 for the armed slots; `skip` disarms exec slots at that address
    /// (stepping over a breakpoint).
    pub fn dr7(&self, skip: Option<u64>) -> u64 {
        let mut dr7 = 0u64;
        for (i, s) in self.slots.iter().enumerate() {
            let Some(s) = s else { continue };
            let exec = matches!(s.kind, SlotKind::Exec | SlotKind::SwExec);
            if exec && Some(s.addr) == skip {
                continue;
            }
            let len = if exec { 0 } else { len_bits(s.len).unwrap_or(0) };
            dr7 |= 1 << (2 * i);
            dr7 |= (rw_bits(s.kind) | (len << 2)) << (16 + 4 * i);
        }
        dr7
    }

    /// DR0..DR3.
    pub fn drs(&self) -> [u64; 4] {
        self.slots.map(|s| s.map_or(0, |s| s.addr))
    }

    /// Takes a free slot; false if all four are in use or the hardware
    /// cannot watch this range (length not 1, 2, 4 or 8, or unaligned).
    pub fn add_slot(&mut self, slot: Slot) -> bool {
        let exec = matches!(slot.kind, SlotKind::Exec | SlotKind::SwExec);
        if !exec && (len_bits(slot.len).is_none() || slot.addr % slot.len != 0) {
            return false;
        }
        if self.slots.contains(&Some(slot)) {
            return true;
        }
        match self.slots.iter_mut().find(|s| s.is_none()) {
            Some(free) => {
                *free = Some(slot);
                true
            }
            None => false,
        }
    }

    /// Frees the slot holding exactly `slot`; false if there is none.
    pub fn remove_slot(&mut self, slot: Slot) -> bool {
        match self.slots.iter_mut().find(|s| **s == Some(slot)) {
            Some(s) => {
                *s = None;
                true
            }
            None => false,
        }
    }

    /// Whether continuing from `pc` must first step over a breakpoint there.
    pub fn breaks_at(&self, pc: u64) -> bool {
        self.sw.contains_key(&pc)
            || self
                .slots
                .iter()
                .flatten()
                .any(|s| s.addr == pc && matches!(s.kind, SlotKind::Exec | SlotKind::SwExec))
    }

    /// Puts the original bytes of software breakpoints into `buf`, which
    /// holds memory read at linear address `start`.
    pub fn show_original(&self, start: u64, buf: &mut [u8]) {
        let end = start.saturating_add(buf.len() as u64);
        for (&addr, bp) in self.sw.range(start..end) {
            if let Some(b) = buf.get_mut((addr - start) as usize) {
                *b = bp.shown;
            }
        }
    }
}

impl Breakpoints for NyxTarget<'_> {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }
    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }
    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

impl SwBreakpoint for NyxTarget<'_> {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.bps.sw.contains_key(&addr) {
            return Ok(true);
        }
        let slot = Slot {
            addr,
            len: 1,
            kind: SlotKind::SwExec,
        };
        if !self.int3_in_memory {
            return Ok(self.bps.add_slot(slot));
        }
        // An address not mapped yet (code the guest maps later) gets a
        // debug register, which works on linear addresses.
        let Ok(gpa) = self.translate(addr) else {
            return Ok(self.bps.add_slot(slot));
        };
        let mut raw = [0u8; 1];
        let mut shown = [0u8; 1];
        let mem = self.machine.memory();
        if mem.read_slice(&mut raw, GuestAddress(gpa)).is_err()
            || self.machine.read_phys(gpa, &mut shown).is_err()
            || mem.write_slice(&[0xCC], GuestAddress(gpa)).is_err()
        {
            return Ok(self.bps.add_slot(slot));
        }
        self.bps.sw.insert(
            addr,
            SwBp {
                gpa,
                raw: raw[0],
                shown: shown[0],
            },
        );
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if let Some(bp) = self.bps.sw.remove(&addr) {
            let mem = self.machine.memory();
            mem.write_slice(&[bp.raw], GuestAddress(bp.gpa))
                .map_err(|_| TargetError::Errno(14))?;
            return Ok(true);
        }
        Ok(self.bps.remove_slot(Slot {
            addr,
            len: 1,
            kind: SlotKind::SwExec,
        }))
    }
}

impl HwBreakpoint for NyxTarget<'_> {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.bps.add_slot(Slot {
            addr,
            len: 1,
            kind: SlotKind::Exec,
        }))
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.bps.remove_slot(Slot {
            addr,
            len: 1,
            kind: SlotKind::Exec,
        }))
    }
}

impl HwWatchpoint for NyxTarget<'_> {
    fn add_hw_watchpoint(&mut self, addr: u64, len: u64, kind: WatchKind) -> TargetResult<bool, Self> {
        Ok(self.bps.add_slot(Slot {
            addr,
            len,
            kind: SlotKind::Watch(kind),
        }))
    }

    fn remove_hw_watchpoint(&mut self, addr: u64, len: u64, kind: WatchKind) -> TargetResult<bool, Self> {
        Ok(self.bps.remove_slot(Slot {
            addr,
            len,
            kind: SlotKind::Watch(kind),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn watch(addr: u64, len: u64, k: WatchKind) -> Slot {
        Slot {
            addr,
            len,
            kind: SlotKind::Watch(k),
        }
    }

    #[test]
    fn dr7_encodes_kind_and_length() {
        let mut b = BreakpointSet::default();
        assert!(b.add_slot(Slot {
            addr: 0x1000,
            len: 1,
            kind: SlotKind::Exec
        }));
        assert!(b.add_slot(watch(0x2000, 4, WatchKind::Write)));
        assert!(b.add_slot(watch(0x3000, 8, WatchKind::ReadWrite)));
        // L0, L1, L2; RW1=01 LEN1=11; RW2=11 LEN2=10.
        let want = 0b01_0101 | (0b1101 << 20) | (0b1011 << 24);
        assert_eq!(b.dr7(None), want);
        assert_eq!(b.drs(), [0x1000, 0x2000, 0x3000, 0]);
        assert_eq!(b.dr7(Some(0x1000)), want & !1);
    }

    #[test]
    fn four_slots_then_full() {
        let mut b = BreakpointSet::default();
        for i in 0..4 {
            assert!(b.add_slot(watch(0x100 * (i + 1), 1, WatchKind::Write)));
        }
        assert!(!b.add_slot(watch(0x900, 1, WatchKind::Write)));
        assert!(b.remove_slot(watch(0x200, 1, WatchKind::Write)));
        assert!(b.add_slot(watch(0x900, 1, WatchKind::Write)));
        assert_eq!(b.slots[1].map(|s| s.addr), Some(0x900));
    }

    #[test]
    fn unaligned_or_odd_watch_is_refused() {
        let mut b = BreakpointSet::default();
        assert!(!b.add_slot(watch(0x1001, 4, WatchKind::Write)));
        assert!(!b.add_slot(watch(0x1000, 3, WatchKind::Write)));
        assert!(!b.add_slot(watch(0x1000, 16, WatchKind::Write)));
        assert_eq!(b.dr7(None), 0);
    }

    #[test]
    fn reads_show_original_bytes() {
        let mut b = BreakpointSet::default();
        b.sw.insert(
            0x1002,
            SwBp {
                gpa: 0,
                raw: 0x90,
                shown: 0x0f,
            },
        );
        let mut buf = [0xCCu8; 4];
        b.show_original(0x1000, &mut buf);
        assert_eq!(buf, [0xCC, 0xCC, 0x0f, 0xCC]);
        let mut far = [0xCCu8; 2];
        b.show_original(u64::MAX - 1, &mut far);
        assert_eq!(far, [0xCC, 0xCC]);
        assert!(b.breaks_at(0x1002) && !b.breaks_at(0x1000));
    }

    proptest! {
        /// Any sequence of adds and removes keeps DR7 consistent with the slots.
        #[test]
        fn slots_and_dr7_agree(ops in proptest::collection::vec((any::<bool>(), 0u64..8, 0usize..4), 0..40)) {
            let mut b = BreakpointSet::default();
            let lens = [1u64, 2, 4, 8];
            for (add, a, l) in ops {
                let s = watch(a * 8, lens[l], WatchKind::Write);
                if add { b.add_slot(s); } else { b.remove_slot(s); }
                let dr7 = b.dr7(None);
                for (i, slot) in b.slots.iter().enumerate() {
                    prop_assert_eq!(dr7 & (1 << (2 * i)) != 0, slot.is_some());
                }
                let used = b.slots.iter().flatten().count();
                prop_assert!(used <= 4);
            }
        }
    }
}
