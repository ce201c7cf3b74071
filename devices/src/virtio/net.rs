//! virtio-net ([`VirtioNet`]) with one queue pair, as QEMU 7.2's
//! `virtio-net-pci,disable-legacy=on` shows it to a driver that takes
//! neither offloads nor mergeable buffers: queue 0 is receiveq1 (network to
//! guest), queue 1 transmitq1 (guest to network), 256 entries each; class
//! 02:00:00. It offers MAC and STATUS; the configuration reads the MAC
//! (offset 0) and the status (offset 6: LINK_UP).
//!
//! Frames travel as records: a 4-byte big-endian length, then the frame,
//! the framing of QEMU's `-netdev stream` (and of `passt`). Each buffer on
//! either queue starts with the 12-byte `virtio_net_hdr` of VIRTIO_F_VERSION_1
//! (no offloads: zero on receive but `num_buffers` = 1; ignored on
//! transmit).
//!
//! - **Transmit**: a chain's readable bytes after the header are one frame;
//!   its record goes to the output (which the backend sends; a replay
//!   drops it), and the chain is used with length 0. A chain shorter than
//!   the header, or with a frame larger than [`MAX_FRAME`], is used
//!   without sending anything.
//! - **Receive**: a record is read from the machine's [`Input`] (which the
//!   recorder logs and the replayer serves; a backend yields one whole
//!   record per read) only when the driver made a receive chain
//!   available, at its notify and when the machine polls the device. The
//!   frame goes into that chain behind the header; a chain too small for
//!   it is put back and the frame dropped (counted), as a NIC drops what
//!   does not fit. A record whose length field does not match what was
//!   read is dropped as well (counted): the input is damaged.

use std::io::Write;

use super::{VirtQueue, VirtioDevice, VirtioError};
use crate::io::Input;

/// The virtio device ID of virtio-net.
pub const DEVICE_TYPE: u16 = virtio_bindings::virtio_ids::VIRTIO_ID_NET as u16;
/// The device's name ([`VirtioDevice::name`]).
pub const NAME: &str = "virtio-net";

/// VIRTIO_NET_F_MAC: the configuration holds the MAC address.
pub const F_MAC: u64 = 1 << 5;
/// VIRTIO_NET_F_STATUS: the configuration holds the link status.
pub const F_STATUS: u64 = 1 << 16;
/// receiveq1.
pub const RECEIVEQ: usize = 0;
/// transmitq1.
pub const TRANSMITQ: usize = 1;
/// The largest frame carried (an Ethernet frame without FCS, jumbo
/// frames included), as QEMU's stream backend accepts.
pub const MAX_FRAME: usize = 65536;
/// The header in front of every buffer with VIRTIO_F_VERSION_1.
pub const HDR_LEN: usize = 12;
/// The length field in front of each frame of a record.
pub const RECORD_HDR: usize = 4;
const QUEUE_SIZES: [u16; 2] = [256, 256];
/// Network controller, Ethernet.
const CLASS: u32 = 0x02_00_00;
const CONFIG_LEN: usize = 8;
/// VIRTIO_NET_S_LINK_UP.
const LINK_UP: u16 = 1;

/// What the device has dropped and passed, for a user to look at.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    /// Frames sent to the output.
    pub tx_frames: u64,
    /// Frames put into receive buffers.
    pub rx_frames: u64,
    /// Received frames that did not fit the receive buffer.
    pub rx_dropped: u64,
    /// Transmit chains without a frame, or with one too large.
    pub tx_dropped: u64,
    /// Input records whose length field did not match.
    pub bad_records: u64,
}

/// The network device.
pub struct VirtioNet {
    mac: [u8; 6],
    out: Box<dyn Write + Send>,
    input: Box<dyn Input>,
    stats: NetStats,
}

impl std::fmt::Debug for VirtioNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioNet")
            .field("mac", &self.mac)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// A frame as a record: its length (big-endian u32), then the frame.
pub fn record(frame: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(RECORD_HDR + frame.len());
    r.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    r.extend_from_slice(frame);
    r
}

impl VirtioNet {
    /// A NIC with address `mac` whose transmitted records go to `out` and
    /// whose received ones come from `input`.
    pub fn new(mac: [u8; 6], out: Box<dyn Write + Send>, input: Box<dyn Input>) -> Self {
        VirtioNet {
            mac,
            out,
            input,
            stats: NetStats::default(),
        }
    }

    /// What the device passed and dropped so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    fn transmit(&mut self, queue: &mut VirtQueue<'_>) -> Result<(), VirtioError> {
        let mut buf = vec![0u8; HDR_LEN + MAX_FRAME];
        while let Some(chain) = queue.pop()? {
            let len = chain.readable_len();
            if len <= HDR_LEN as u64 || len > buf.len() as u64 {
                self.stats.tx_dropped += 1;
                queue.add_used(chain.head, 0)?;
                continue;
            }
            let mut done = 0usize;
            while (done as u64) < len {
                let n = chain.read_at(queue.mem(), done as u64, &mut buf[done..len as usize])?;
                if n == 0 {
                    break;
                }
                done += n;
            }
            let rec = record(&buf[HDR_LEN..done]);
            if let Err(e) = self.out.write_all(&rec).and_then(|()| self.out.flush()) {
                tracing::debug!("virtio-net output: {e}");
            }
            self.stats.tx_frames += 1;
            queue.add_used(chain.head, 0)?;
        }
        Ok(())
    }

    fn receive(&mut self, queue: &mut VirtQueue<'_>) -> Result<(), VirtioError> {
        let mut rec = vec![0u8; RECORD_HDR + MAX_FRAME];
        while let Some(chain) = queue.pop()? {
            let n = self.input.read_available(&mut rec).min(rec.len());
            if n == 0 {
                queue.unpop();
                break;
            }
            let frame = match rec[..n].split_first_chunk::<RECORD_HDR>() {
                Some((len, frame)) if u32::from_be_bytes(*len) as usize == frame.len() => frame,
                _ => {
                    self.stats.bad_records += 1;
                    queue.unpop();
                    continue;
                }
            };
            if chain.writable_len() < (HDR_LEN + frame.len()) as u64 {
                self.stats.rx_dropped += 1;
                queue.unpop();
                continue;
            }
            let mut hdr = [0u8; HDR_LEN];
            hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
            chain.write_at(queue.mem(), 0, &hdr)?;
            chain.write_at(queue.mem(), HDR_LEN as u64, frame)?;
            self.stats.rx_frames += 1;
            queue.add_used(chain.head, (HDR_LEN + frame.len()) as u32)?;
        }
        Ok(())
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn name(&self) -> &str {
        NAME
    }

    fn pci_class(&self) -> u32 {
        CLASS
    }

    fn features(&self) -> u64 {
        F_MAC | F_STATUS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        for (i, d) in data.iter_mut().enumerate() {
            *d = c.get(offset + i).copied().unwrap_or(0xFF);
        }
    }

    fn process_queue(&mut self, index: usize, queue: &mut VirtQueue<'_>) -> Result<(), VirtioError> {
        match index {
            RECEIVEQ => self.receive(queue),
            TRANSMITQ => self.transmit(queue),
            _ => Ok(()),
        }
    }

    fn poll(&mut self) -> u64 {
        if self.input.is_exhausted() {
            0
        } else {
            1 << RECEIVEQ
        }
    }
}

/// Parses a MAC address written `52:54:00:12:34:56`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci_device::PciDevice;
    use crate::virtio::testutil::{Harness, BUF};
    use proptest::prelude::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Input that yields one record per read, as a backend does.
    struct Records(Vec<Vec<u8>>);

    impl Input for Records {
        fn read_available(&mut self, buf: &mut [u8]) -> usize {
            match self.0.first() {
                Some(r) if r.len() <= buf.len() => {
                    let r = self.0.remove(0);
                    buf[..r.len()].copy_from_slice(&r);
                    r.len()
                }
                _ => 0,
            }
        }
        fn is_exhausted(&self) -> bool {
            self.0.is_empty()
        }
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn nic(records: Vec<Vec<u8>>) -> (Harness, Capture) {
        let out = Capture::default();
        let dev = VirtioNet::new(MAC, Box::new(out.clone()), Box::new(Records(records)));
        (Harness::start(Box::new(dev), F_MAC), out)
    }

    #[test]
    fn features_and_configuration() {
        let (mut h, _) = nic(vec![]);
        assert_eq!(h.offered(), 1 << 32 | 1 << 28 | F_STATUS | F_MAC);
        assert_eq!(h.device_cfg_read(0, 4), 0x1200_5452);
        assert_eq!(h.device_cfg_read(4, 2), 0x5634);
        assert_eq!(h.device_cfg_read(6, 2), 1, "link up");
        assert_eq!(h.device_cfg_read(8, 1), 0xFF);
        assert_eq!(h.common_read(0x12, 2), 2, "one queue pair");
    }

    #[test]
    fn a_transmitted_frame_becomes_one_record_without_its_header() {
        let (mut h, out) = nic(vec![]);
        h.write(BUF, &[0xAA; HDR_LEN]);
        h.write(BUF + 0x100, b"frame-one");
        h.submit(TRANSMITQ, &[(BUF, HDR_LEN as u32, false), (BUF + 0x100, 9, false)]);
        assert_eq!(h.pop_used(TRANSMITQ), Some((0, 0)));
        assert_eq!(*out.0.lock().unwrap(), record(b"frame-one"));
        // A chain with nothing after the header sends nothing.
        h.submit(TRANSMITQ, &[(BUF, HDR_LEN as u32, false)]);
        assert_eq!(
            h.pop_used(TRANSMITQ),
            Some((2, 0)),
            "descriptors 0 and 1 went to the first chain"
        );
        assert_eq!(out.0.lock().unwrap().len(), RECORD_HDR + 9);
    }

    #[test]
    fn received_frames_go_behind_a_header_and_a_small_buffer_drops_one() {
        let big = vec![7u8; 100];
        let (mut h, _) = nic(vec![
            record(b"hello"),
            record(&big),
            b"\0\0\0\x09short".to_vec(),
            record(b"last"),
        ]);
        h.dev.poll();
        h.post(RECEIVEQ, &[(BUF, 64, true)]);
        h.dev.poll();
        assert_eq!(h.pop_used(RECEIVEQ), Some((0, (HDR_LEN + 5) as u32)));
        let got = h.read(BUF, (HDR_LEN + 5) as u64);
        assert_eq!(&got[..10], &[0; 10]);
        assert_eq!(&got[10..12], &[1, 0], "num_buffers");
        assert_eq!(&got[HDR_LEN..], b"hello");
        // 100 bytes do not fit 64: dropped, the buffer kept for the next.
        h.submit(RECEIVEQ, &[(BUF + 0x100, 64, true)]);
        assert_eq!(
            h.pop_used(RECEIVEQ),
            Some((1, (HDR_LEN + 4) as u32)),
            "the bad record is dropped too"
        );
        assert_eq!(h.read(BUF + 0x100 + HDR_LEN as u64, 4), b"last");
    }

    #[test]
    fn macs_parse() {
        assert_eq!(parse_mac("52:54:00:12:34:56"), Some(MAC));
        for bad in [
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "5:54:00:12:34:56",
            "52:54:00:12:34:zz",
            "",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Random bytes in the ring memory, random BAR and config accesses,
        /// notifies and polls, and random input records never panic;
        /// afterwards a frame still goes out.
        #[test]
        fn fuzz(ops in crate::virtio::testutil::fuzz_ops(), input in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..6)) {
            let (mut h, out) = nic(input);
            h.fuzz(&ops);
            let before = out.0.lock().unwrap().len();
            h.write(BUF, &[0; HDR_LEN]);
            h.write(BUF + 0x100, b"ok");
            h.submit(TRANSMITQ, &[(BUF, HDR_LEN as u32, false), (BUF + 0x100, 2, false)]);
            prop_assert_eq!(h.pop_used(TRANSMITQ), Some((0, 0)));
            let sent = out.0.lock().unwrap()[before..].to_vec();
            prop_assert_eq!(sent, record(b"ok"));
        }
    }
}
