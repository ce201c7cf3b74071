//! The x86-64 architecture as Nyx shows it to gdb: the general, segment,
//! x87 and SSE registers of gdb's own `i386:x86-64` features, fs/gs base,
//! and a system feature with KERNEL_GS_BASE, CR0/2/3/4/8 and EFER, so that
//! `info registers` shows the paging and mode state. All registers are
//! 64-bit wide whatever mode the guest is in (real, protected or long):
//! gdb's `set architecture i386:x86-64` works for 16- and 32-bit code too,
//! with the upper halves of the registers zero.

use std::num::NonZeroUsize;

use gdbstub::arch::{Arch, RegId, Registers};

/// The target description sent to gdb (`qXfer:features:read`).
pub const TARGET_XML: &str = include_str!("target.xml");

/// Names of the registers in the order of [`TARGET_XML`] and of the `g` packet.
pub const REG_NAMES: &[&str] = &[
    "rax",
    "rbx",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "rbp",
    "rsp",
    "r8",
    "r9",
    "r10",
    "r11",
    "r12",
    "r13",
    "r14",
    "r15",
    "rip",
    "eflags",
    "cs",
    "ss",
    "ds",
    "es",
    "fs",
    "gs",
    "st0",
    "st1",
    "st2",
    "st3",
    "st4",
    "st5",
    "st6",
    "st7",
    "fctrl",
    "fstat",
    "ftag",
    "fiseg",
    "fioff",
    "foseg",
    "fooff",
    "fop",
    "xmm0",
    "xmm1",
    "xmm2",
    "xmm3",
    "xmm4",
    "xmm5",
    "xmm6",
    "xmm7",
    "xmm8",
    "xmm9",
    "xmm10",
    "xmm11",
    "xmm12",
    "xmm13",
    "xmm14",
    "xmm15",
    "mxcsr",
    "fs_base",
    "gs_base",
    "k_gs_base",
    "cr0",
    "cr2",
    "cr3",
    "cr4",
    "cr8",
    "efer",
];

/// Byte size of each register in [`REG_NAMES`] order.
fn reg_size(id: usize) -> Option<usize> {
    Some(match id {
        0..=16 => 8,
        17..=23 => 4,
        24..=31 => 10,
        32..=39 => 4,
        40..=55 => 16,
        56 => 4,
        57..=65 => 8,
        _ => return None,
    })
}

/// The x86-64 architecture with system registers.
pub enum NyxX86_64 {}

impl Arch for NyxX86_64 {
    type Usize = u64;
    type Registers = X86Regs;
    type BreakpointKind = usize;
    type RegId = NyxRegId;

    fn target_description_xml() -> Option<&'static str> {
        Some(TARGET_XML)
    }
}

/// A register number of the target description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NyxRegId(pub usize);

impl RegId for NyxRegId {
    fn from_raw_id(id: usize) -> Option<(Self, Option<NonZeroUsize>)> {
        reg_size(id).map(|n| (NyxRegId(id), NonZeroUsize::new(n)))
    }
}

/// Every register gdb sees.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct X86Regs {
    /// rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8..r15.
    pub gpr: [u64; 16],
    /// RIP.
    pub rip: u64,
    /// EFLAGS.
    pub eflags: u32,
    /// Selectors of cs, ss, ds, es, fs, gs.
    pub seg: [u32; 6],
    /// st0..st7, 80-bit.
    pub st: [[u8; 10]; 8],
    /// fctrl, fstat, ftag, fiseg, fioff, foseg, fooff, fop.
    pub fpu: [u32; 8],
    /// xmm0..xmm15.
    pub xmm: [u128; 16],
    /// MXCSR.
    pub mxcsr: u32,
    /// FS base.
    pub fs_base: u64,
    /// GS base.
    pub gs_base: u64,
    /// The KERNEL_GS_BASE MSR (swapped in by `swapgs`).
    pub k_gs_base: u64,
    /// CR0.
    pub cr0: u64,
    /// CR2.
    pub cr2: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// CR8 (task priority).
    pub cr8: u64,
    /// EFER.
    pub efer: u64,
}

/// Size of the `g` packet payload in bytes.
pub const G_PACKET_LEN: usize = 16 * 8 + 8 + 4 + 6 * 4 + 8 * 10 + 8 * 4 + 16 * 16 + 4 + 9 * 8;

impl X86Regs {
    /// The 64-bit system registers in [`REG_NAMES`] order, from fs_base.
    fn sys(&self) -> [u64; 9] {
        [
            self.fs_base,
            self.gs_base,
            self.k_gs_base,
            self.cr0,
            self.cr2,
            self.cr3,
            self.cr4,
            self.cr8,
            self.efer,
        ]
    }
}

impl Registers for X86Regs {
    type ProgramCounter = u64;

    fn pc(&self) -> u64 {
        self.rip
    }

    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        let mut put = |bytes: &[u8]| bytes.iter().for_each(|b| write_byte(Some(*b)));
        self.gpr.iter().for_each(|r| put(&r.to_le_bytes()));
        put(&self.rip.to_le_bytes());
        put(&self.eflags.to_le_bytes());
        self.seg.iter().for_each(|r| put(&r.to_le_bytes()));
        self.st.iter().for_each(|r| put(r));
        self.fpu.iter().for_each(|r| put(&r.to_le_bytes()));
        self.xmm.iter().for_each(|r| put(&r.to_le_bytes()));
        put(&self.mxcsr.to_le_bytes());
        self.sys().iter().for_each(|r| put(&r.to_le_bytes()));
    }

    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        if bytes.len() != G_PACKET_LEN {
            return Err(());
        }
        let mut r = Reader(bytes);
        let mut new = X86Regs::default();
        new.gpr.iter_mut().for_each(|v| *v = r.u64());
        new.rip = r.u64();
        new.eflags = r.u32();
        new.seg.iter_mut().for_each(|v| *v = r.u32());
        new.st.iter_mut().for_each(|v| v.copy_from_slice(r.take(10)));
        new.fpu.iter_mut().for_each(|v| *v = r.u32());
        new.xmm.iter_mut().for_each(|v| *v = r.u128());
        new.mxcsr = r.u32();
        let mut sys = [0u64; 9];
        sys.iter_mut().for_each(|v| *v = r.u64());
        [
            new.fs_base,
            new.gs_base,
            new.k_gs_base,
            new.cr0,
            new.cr2,
            new.cr3,
            new.cr4,
            new.cr8,
            new.efer,
        ] = sys;
        *self = new;
        Ok(())
    }
}

/// Little-endian fields from a buffer whose length was checked up front.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let src = self.take(N);
        a[..src.len()].copy_from_slice(src);
        a
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
    fn u128(&mut self) -> u128 {
        u128::from_le_bytes(self.array())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn serialize(r: &X86Regs) -> Vec<u8> {
        let mut out = Vec::new();
        r.gdb_serialize(|b| out.push(b.unwrap_or(0)));
        out
    }

    #[test]
    fn xml_lists_every_register_in_packet_order() {
        let mut pos = 0;
        for name in REG_NAMES {
            let tag = format!("<reg name=\"{name}\"");
            let at = TARGET_XML[pos..].find(&tag).map(|i| i + pos);
            assert!(at.is_some(), "{name} missing or out of order");
            pos = at.unwrap_or(pos);
        }
        assert_eq!(TARGET_XML.matches("<reg ").count(), REG_NAMES.len());
        let total: usize = (0..REG_NAMES.len()).filter_map(reg_size).sum();
        assert_eq!(total, G_PACKET_LEN);
        assert!(reg_size(REG_NAMES.len()).is_none());
    }

    #[test]
    fn rip_and_cr3_sit_where_the_description_says() {
        let r = X86Regs {
            rip: 0x1122_3344_5566_7788,
            cr3: 0xdead_b000,
            ..Default::default()
        };
        let b = serialize(&r);
        assert_eq!(b.len(), G_PACKET_LEN);
        assert_eq!(&b[128..136], &r.rip.to_le_bytes());
        let cr3_at = G_PACKET_LEN - 4 * 8;
        assert_eq!(&b[cr3_at..cr3_at + 8], &r.cr3.to_le_bytes());
    }

    #[test]
    fn wrong_lengths_are_refused() {
        let mut r = X86Regs::default();
        assert!(r.gdb_deserialize(&[0u8; 10]).is_err());
        assert!(r.gdb_deserialize(&vec![0u8; G_PACKET_LEN + 1]).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(bytes in proptest::collection::vec(any::<u8>(), G_PACKET_LEN)) {
            let mut r = X86Regs::default();
            prop_assert!(r.gdb_deserialize(&bytes).is_ok());
            prop_assert_eq!(serialize(&r), bytes);
        }
    }
}
