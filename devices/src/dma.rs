//! The PC's two 8237 DMA controllers and their page registers, after QEMU
//! 7.2's `hw/dma/i8257.c`: controller 1 at ports 0x00-0x0F (channels 0-3,
//! 8-bit), controller 2 at 0xC0-0xDF (channels 4-7, 16-bit, each register
//! at an even port and aliased at the odd one above it), and the page
//! registers at 0x81-0x8F (0x80 is the POST port of another device).
//!
//! Only the registers are modelled: no device performs DMA yet, so there is
//! no transfer path. The address and count registers, their flip-flop,
//! status (terminal count and request bits), command, request, masks and
//! modes behave as in QEMU, and [`Dma::channel`] shows a channel's
//! programming to a future floppy or Sound Blaster model.
//!
//! QEMU's quirks are kept: a command byte with any bit other than
//! "controller disable" set is ignored, reading port 0x09 (0xD2) returns the
//! mask register, the temporary register (0x0D, 0xDA) and the other
//! write-only ports read 0, and the page ports QEMU leaves unassigned (0x84-
//! 0x86, 0x88, 0x8C-0x8E) read 0xFF and ignore writes.

use crate::bus::{BusDevice, BusEvent};

/// The port ranges the controllers decode, as (base, len).
pub const DMA_PORTS: &[(u16, u16)] = &[(0x00, 0x10), (0x81, 0x0f), (0xc0, 0x20)];

/// Command bits QEMU does not support; a command byte with any of them is
/// ignored. Only bit 2 (controller disable) can be set.
const CMD_NOT_SUPPORTED: u8 = 0xfb;

/// The page register port (low 3 bits) of each channel of a controller:
/// `PAGE_CHANNEL[port & 7]`.
const PAGE_CHANNEL: [Option<usize>; 8] = [None, Some(2), Some(3), Some(1), None, None, None, Some(0)];

/// One channel's registers.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DmaChannelState {
    /// Base address register (in words on the 16-bit controller).
    pub base_address: u16,
    /// Base count register: transfers - 1.
    pub base_count: u16,
    /// Current address in bytes (the base address, shifted on the 16-bit
    /// controller), loaded when the high byte of the address or count is
    /// written.
    pub current_address: u32,
    /// Bytes transferred since then (always 0 while nothing transfers).
    pub position: u32,
    /// Mode register as written (bits 0-1 are the channel select).
    pub mode: u8,
    /// Page register: address bits 16-23.
    pub page: u8,
}

/// One 8237.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DmaControllerState {
    /// Status: bits 0-3 terminal count reached (cleared by a read), bits 4-7
    /// requests pending.
    pub status: u8,
    /// Command register.
    pub command: u8,
    /// Mask register: bit n masks channel n (a master clear sets all 8 bits,
    /// as QEMU).
    pub mask: u8,
    /// The byte pointer flip-flop: the next address/count access is the
    /// high byte.
    pub flip_flop: bool,
    /// Channels 0-3 of this controller.
    pub channels: [DmaChannelState; 4],
}

impl Default for DmaControllerState {
    /// The state after a master clear.
    fn default() -> Self {
        Self {
            status: 0,
            command: 0,
            mask: 0xff,
            flip_flop: false,
            channels: Default::default(),
        }
    }
}

/// The snapshot state of both controllers.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DmaState {
    /// Controller 1 (channels 0-3, 8-bit) and controller 2 (channels 4-7,
    /// 16-bit).
    pub controllers: [DmaControllerState; 2],
}

/// A channel's programming, for a device that does DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelView {
    /// Physical address of the current transfer position as QEMU forms it:
    /// `page << 16 | current address` (the 16-bit controller's address is
    /// already in bytes).
    pub address: u32,
    /// Length of the transfer in bytes: `(base count + 1)`, doubled on the
    /// 16-bit controller.
    pub count: u32,
    /// The mode register (bits 2-3 transfer type, 4 auto-init, 5 decrement,
    /// 6-7 mode).
    pub mode: u8,
    /// The channel is masked.
    pub masked: bool,
}

impl DmaControllerState {
    fn toggle_flip_flop(&mut self) -> bool {
        let ff = self.flip_flop;
        self.flip_flop = !ff;
        ff
    }

    /// A read of channel register `iport` (0-7): address or count of
    /// channel `iport / 2`, the byte the flip-flop selects.
    fn read_channel(&mut self, dshift: u32, iport: usize) -> u8 {
        let ff = self.toggle_flip_flop();
        let ch = &self.channels[(iport >> 1) & 3];
        let val = if iport & 1 != 0 {
            (i64::from(ch.base_count) << dshift) - i64::from(ch.position)
        } else {
            let dir = if ch.mode & 0x20 != 0 { -1 } else { 1 };
            i64::from(ch.current_address) + i64::from(ch.position) * dir
        };
        (val >> (dshift + 8 * u32::from(ff))) as u8
    }

    fn write_channel(&mut self, dshift: u32, iport: usize, data: u8) {
        let high = self.toggle_flip_flop();
        let ch = &mut self.channels[(iport >> 1) & 3];
        let reg = if iport & 1 != 0 {
            &mut ch.base_count
        } else {
            &mut ch.base_address
        };
        if high {
            *reg = (*reg & 0x00ff) | u16::from(data) << 8;
            ch.current_address = u32::from(ch.base_address) << dshift;
            ch.position = 0;
        } else {
            *reg = (*reg & 0xff00) | u16::from(data);
        }
    }

    fn read_control(&mut self, iport: usize) -> u8 {
        match iport {
            0 => {
                let v = self.status;
                self.status &= 0xf0;
                v
            }
            1 => self.mask,
            _ => 0,
        }
    }

    fn write_control(&mut self, iport: usize, data: u8) {
        let ch = usize::from(data & 3);
        match iport {
            0 => {
                if data == 0 || data & CMD_NOT_SUPPORTED == 0 {
                    self.command = data;
                }
            }
            1 => {
                if data & 4 != 0 {
                    self.status |= 1 << (ch + 4);
                } else {
                    self.status &= !(1 << (ch + 4));
                }
                self.status &= !(1 << ch);
            }
            2 => {
                if data & 4 != 0 {
                    self.mask |= 1 << ch;
                } else {
                    self.mask &= !(1 << ch);
                }
            }
            3 => self.channels[ch].mode = data,
            4 => self.flip_flop = false,
            5 => {
                *self = Self {
                    channels: std::mem::take(&mut self.channels),
                    ..Self::default()
                }
            }
            6 => self.mask = 0,
            _ => self.mask = data,
        }
    }
}

/// The two 8237 DMA controllers and the page registers.
#[derive(Debug, Default)]
pub struct Dma {
    state: DmaState,
}

impl Dma {
    /// Both controllers after reset (a master clear: everything masked).
    pub fn new() -> Self {
        Self::default()
    }

    /// Controllers restored from `state`. Any values are accepted.
    pub fn from_state(state: &DmaState) -> Self {
        Self { state: state.clone() }
    }

    /// The snapshot state.
    pub fn state(&self) -> DmaState {
        self.state.clone()
    }

    /// Channel `n` (0-7; taken modulo 8).
    pub fn channel(&self, n: usize) -> ChannelView {
        let n = n & 7;
        let cont = &self.state.controllers[n >> 2];
        let ch = &cont.channels[n & 3];
        let dshift = (n >> 2) as u32;
        ChannelView {
            address: u32::from(ch.page) << 16 | ch.current_address,
            count: (u32::from(ch.base_count) + 1) << dshift,
            mode: ch.mode,
            masked: cont.mask & (1 << (n & 3)) != 0,
        }
    }

    fn read_port(&mut self, port: u64) -> u8 {
        let [c0, c1] = &mut self.state.controllers;
        match port {
            0x00..=0x07 => c0.read_channel(0, port as usize),
            0x08..=0x0f => c0.read_control((port - 0x08) as usize),
            0xc0..=0xcf => c1.read_channel(1, ((port - 0xc0) >> 1) as usize),
            0xd0..=0xdf => c1.read_control(((port - 0xd0) >> 1) as usize),
            0x81..=0x8f => {
                let cont = if port < 0x88 { c0 } else { c1 };
                match PAGE_CHANNEL[(port & 7) as usize] {
                    Some(ch) => cont.channels[ch].page,
                    None => 0xff,
                }
            }
            _ => 0xff,
        }
    }

    fn write_port(&mut self, port: u64, data: u8) {
        let [c0, c1] = &mut self.state.controllers;
        match port {
            0x00..=0x07 => c0.write_channel(0, port as usize, data),
            0x08..=0x0f => c0.write_control((port - 0x08) as usize, data),
            0xc0..=0xcf => c1.write_channel(1, ((port - 0xc0) >> 1) as usize, data),
            0xd0..=0xdf => c1.write_control(((port - 0xd0) >> 1) as usize, data),
            0x81..=0x8f => {
                let cont = if port < 0x88 { c0 } else { c1 };
                if let Some(ch) = PAGE_CHANNEL[(port & 7) as usize] {
                    cont.channels[ch].page = data;
                }
            }
            _ => {}
        }
    }
}

impl BusDevice for Dma {
    /// Each byte of a wider access is an access to the next port.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let port = base.wrapping_add(offset);
        for (i, byte) in (0u64..).zip(data.iter_mut()) {
            *byte = self.read_port(port.wrapping_add(i));
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<BusEvent> {
        let port = base.wrapping_add(offset);
        for (i, &byte) in (0u64..).zip(data.iter()) {
            self.write_port(port.wrapping_add(i), byte);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn out(d: &mut Dma, port: u16, v: u8) {
        d.write(u64::from(port), 0, &[v]);
    }

    fn inb(d: &mut Dma, port: u16) -> u8 {
        let mut b = [0u8];
        d.read(u64::from(port), 0, &mut b);
        b[0]
    }

    fn decoded(port: u16) -> bool {
        DMA_PORTS.iter().any(|&(b, l)| port >= b && port < b + l)
    }

    #[test]
    fn ports_table() {
        assert!(!decoded(0x80), "POST port belongs elsewhere");
        for p in (0x00..=0x0f).chain(0x81..=0x8f).chain(0xc0..=0xdf) {
            assert!(decoded(p), "{p:#x}");
        }
        assert!(!decoded(0x10) && !decoded(0x90) && !decoded(0xbf) && !decoded(0xe0));
    }

    #[test]
    fn reset_masks_everything() {
        let mut d = Dma::new();
        assert_eq!(inb(&mut d, 0x09), 0xff, "QEMU reads the mask at 0x09");
        assert_eq!(inb(&mut d, 0xd2), 0xff);
        assert_eq!(inb(&mut d, 0x08), 0, "status");
        for n in 0..8 {
            assert!(d.channel(n).masked);
        }
        assert_eq!(inb(&mut d, 0x0d), 0, "temporary register reads 0");
        assert_eq!(inb(&mut d, 0x0f), 0);
    }

    #[test]
    fn address_and_count_through_the_flip_flop() {
        let mut d = Dma::new();
        out(&mut d, 0x0c, 0);
        out(&mut d, 0x04, 0x34);
        out(&mut d, 0x04, 0x12);
        out(&mut d, 0x05, 0xff);
        out(&mut d, 0x05, 0x01);
        assert_eq!(inb(&mut d, 0x04), 0x34);
        assert_eq!(inb(&mut d, 0x04), 0x12);
        assert_eq!(inb(&mut d, 0x05), 0xff);
        assert_eq!(inb(&mut d, 0x05), 0x01);
        // The flip-flop is shared by all channels and toggled by reads.
        inb(&mut d, 0x00);
        assert_eq!(inb(&mut d, 0x04), 0x12, "high byte next");
        out(&mut d, 0x0c, 0);
        assert_eq!(inb(&mut d, 0x04), 0x34);
        // A low byte alone does not reload the current address (QEMU).
        out(&mut d, 0x0c, 0);
        out(&mut d, 0x04, 0x56);
        out(&mut d, 0x0c, 0);
        assert_eq!(inb(&mut d, 0x04), 0x34);
        assert_eq!(d.state().controllers[0].channels[2].base_address, 0x1256);
        // ...the next high byte of the count does.
        out(&mut d, 0x0c, 0);
        out(&mut d, 0x05, 0xff);
        out(&mut d, 0x05, 0x01);
        assert_eq!(inb(&mut d, 0x04), 0x56);
        assert_eq!(inb(&mut d, 0x04), 0x12);
    }

    #[test]
    fn sixteen_bit_controller_shifts_addresses() {
        let mut d = Dma::new();
        out(&mut d, 0xd8, 0); // clear flip-flop
        out(&mut d, 0xc4, 0x00);
        out(&mut d, 0xc4, 0x10); // channel 5 address: word 0x1000
        out(&mut d, 0xc6, 0xff);
        out(&mut d, 0xc6, 0x03); // 0x400 words
        out(&mut d, 0x8b, 0x02); // channel 5 page
        assert_eq!(d.state().controllers[1].channels[1].current_address, 0x2000);
        let v = d.channel(5);
        assert_eq!(v.address, 0x2_2000);
        assert_eq!(v.count, 0x800);
        assert_eq!(inb(&mut d, 0xc4), 0x00);
        assert_eq!(inb(&mut d, 0xc5), 0x10, "odd ports alias the even one below");
        assert_eq!(inb(&mut d, 0xc7), 0xff);
        assert_eq!(inb(&mut d, 0xc6), 0x03);
        out(&mut d, 0xd4, 0x01); // unmask channel 5
        assert!(!d.channel(5).masked);
        assert!(d.channel(4).masked);
        assert!(d.channel(1).masked, "the other controller is untouched");
        out(&mut d, 0xd6, 0x49);
        assert_eq!(d.channel(5).mode, 0x49);
    }

    #[test]
    fn page_registers() {
        let mut d = Dma::new();
        let map = [
            (0x87u16, 0usize),
            (0x83, 1),
            (0x81, 2),
            (0x82, 3),
            (0x8f, 4),
            (0x8b, 5),
            (0x89, 6),
            (0x8a, 7),
        ];
        for (i, &(port, _)) in map.iter().enumerate() {
            out(&mut d, port, 0x10 + i as u8);
        }
        for (i, &(port, ch)) in map.iter().enumerate() {
            assert_eq!(inb(&mut d, port), 0x10 + i as u8);
            assert_eq!(d.channel(ch).address >> 16, 0x10 + i as u32, "channel {ch}");
        }
        for port in [0x84u16, 0x85, 0x86, 0x88, 0x8c, 0x8d, 0x8e] {
            let before = d.state();
            out(&mut d, port, 0x55);
            assert_eq!(d.state(), before);
            assert_eq!(inb(&mut d, port), 0xff, "{port:#x} is unassigned in QEMU");
        }
    }

    #[test]
    fn masks_modes_requests_and_status() {
        let mut d = Dma::new();
        out(&mut d, 0x0e, 0); // clear all masks
        assert_eq!(inb(&mut d, 0x09), 0);
        out(&mut d, 0x0a, 0x06);
        assert!(d.channel(2).masked);
        out(&mut d, 0x0a, 0x02);
        assert!(!d.channel(2).masked);
        out(&mut d, 0x0f, 0x05);
        assert!(d.channel(0).masked && !d.channel(1).masked && d.channel(2).masked);
        out(&mut d, 0x0b, 0x56);
        assert_eq!(d.channel(2).mode, 0x56);
        assert_eq!(d.channel(0).mode, 0);
        // Request register: request bits; reading status clears only TC.
        out(&mut d, 0x09, 0x05);
        let mut s = d.state();
        s.controllers[0].status |= 0x03;
        let mut d = Dma::from_state(&s);
        assert_eq!(inb(&mut d, 0x08), 0x23);
        assert_eq!(inb(&mut d, 0x08), 0x20);
        out(&mut d, 0x09, 0x01);
        assert_eq!(inb(&mut d, 0x08), 0x00);
    }

    #[test]
    fn command_and_master_clear() {
        let mut d = Dma::new();
        out(&mut d, 0x08, 0x04);
        assert_eq!(d.state().controllers[0].command, 0x04);
        out(&mut d, 0x08, 0x14);
        assert_eq!(d.state().controllers[0].command, 0x04, "unsupported bits: ignored");
        out(&mut d, 0x08, 0x00);
        assert_eq!(d.state().controllers[0].command, 0);
        out(&mut d, 0x08, 0x04);
        out(&mut d, 0x0e, 0);
        out(&mut d, 0x09, 0x06);
        out(&mut d, 0x04, 0x11); // flip-flop now set
        out(&mut d, 0x0b, 0x4a);
        out(&mut d, 0x0d, 0);
        let c = &d.state().controllers[0];
        assert_eq!((c.command, c.mask, c.status, c.flip_flop), (0, 0xff, 0, false));
        assert_eq!(c.channels[2].mode, 0x4a, "channels keep their registers");
        assert_eq!(c.channels[2].base_address, 0x11);
    }

    /// The sequence of Linux's floppy driver (`fd_dma_setup`).
    #[test]
    fn linux_floppy_programming() {
        let mut d = Dma::new();
        out(&mut d, 0x0a, 0x06); // disable_dma(2)
        out(&mut d, 0x0c, 0); // clear_dma_ff
        out(&mut d, 0x0b, 0x46); // set_dma_mode(2, DMA_MODE_READ)
        out(&mut d, 0x04, 0x00); // set_dma_addr(2, 0x123400)
        out(&mut d, 0x04, 0x34);
        out(&mut d, 0x81, 0x12);
        out(&mut d, 0x05, 0xff); // set_dma_count(2, 512)
        out(&mut d, 0x05, 0x01);
        out(&mut d, 0x0a, 0x02); // enable_dma(2)
        assert_eq!(
            d.channel(2),
            ChannelView {
                address: 0x12_3400,
                count: 512,
                mode: 0x46,
                masked: false
            }
        );
    }

    #[test]
    fn wide_accesses_are_byte_sequences() {
        let mut d = Dma::new();
        d.write(0x00, 0x02, &[0x78, 0x56]);
        let mut b = [0u8; 2];
        d.read(0x00, 0x02, &mut b);
        assert_eq!(b, [0x78, 0x56]);
        let mut b = [0u8; 4];
        d.read(0x81, 0x0e, &mut b);
        assert_eq!(b, [0, 0xff, 0xff, 0xff], "0x8f, then ports not decoded");
    }

    /// A register file with the flip-flop, written the obvious way.
    #[derive(Default)]
    struct Model {
        ff: bool,
        base: [u16; 8],
        current: [u16; 4],
    }

    proptest! {
        /// Address/count reads of controller 1 agree with the model for any
        /// mix of byte writes, reads and flip-flop clears.
        #[test]
        fn registers_match_model(ops in prop::collection::vec((0u8..3, 0u16..8, any::<u8>()), 0..200)) {
            let mut d = Dma::new();
            let mut m = Model::default();
            for (kind, reg, v) in ops {
                let reg = usize::from(reg);
                match kind {
                    0 => {
                        out(&mut d, reg as u16, v);
                        let r = &mut m.base[reg];
                        if m.ff {
                            *r = (*r & 0xff) | u16::from(v) << 8;
                            m.current[reg / 2] = m.base[reg & !1];
                        } else {
                            *r = (*r & 0xff00) | u16::from(v);
                        }
                        m.ff = !m.ff;
                    }
                    1 => {
                        let got = inb(&mut d, reg as u16);
                        let value = if reg & 1 == 1 { m.base[reg] } else { m.current[reg / 2] };
                        prop_assert_eq!(got, value.to_le_bytes()[usize::from(m.ff)]);
                        m.ff = !m.ff;
                    }
                    _ => {
                        out(&mut d, 0x0c, v);
                        m.ff = false;
                    }
                }
            }
        }

        /// Any bytes at any port: no panic, and the state round-trips.
        #[test]
        fn arbitrary_accesses_round_trip(ops in prop::collection::vec((0u16..0x100, any::<u8>(), any::<bool>(), 1usize..5), 0..300)) {
            let mut d = Dma::new();
            for (port, v, write, len) in ops {
                if write {
                    d.write(u64::from(port), 0, &vec![v; len]);
                } else {
                    let mut b = vec![0u8; len];
                    d.read(u64::from(port), 0, &mut b);
                }
                for n in 0..9 {
                    let _ = d.channel(n);
                }
                let s = d.state();
                prop_assert_eq!(Dma::from_state(&s).state(), s);
            }
        }
    }
}
