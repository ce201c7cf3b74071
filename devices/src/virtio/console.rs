//! virtio-console ([`VirtioConsole`]) with one port and no MULTIPORT, as
//! QEMU 7.2's `virtio-serial-pci` with a `virtconsole` shows it to a driver
//! that does not take MULTIPORT: queue 0 is port 0's receiveq (host to
//! guest), queue 1 its transmitq (guest to host), 128 entries each; class
//! 07:80:00. It offers EMERG_WRITE (not SIZE, not MULTIPORT); its
//! configuration reads cols 0, rows 0, max_nr_ports 1, emerg_wr 0.
//!
//! Transmitted bytes (every device-readable buffer of a chain, in order) go
//! to the output, which is flushed after each chain; the used length is 0,
//! as QEMU's. Input is read from the machine's [`Input`] (which the
//! recorder logs and the replayer serves) only into a receive buffer the
//! driver made available, when the driver notifies the receiveq and when
//! the machine polls the device: each chain takes what is available up to
//! its device-writable length and is used with that many bytes; when no
//! input is available the chain stays available. A write of a non-zero
//! byte to `emerg_wr` outputs that byte once EMERG_WRITE is negotiated (as
//! QEMU, which drops a zero).

use std::io::Write;

use super::{VirtQueue, VirtioDevice, VirtioError};
use crate::io::Input;

/// The virtio device ID of virtio-console.
pub const DEVICE_TYPE: u16 = virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE as u16;
/// The device's name ([`VirtioDevice::name`]).
pub const NAME: &str = "virtio-console";

/// VIRTIO_CONSOLE_F_EMERG_WRITE.
pub const F_EMERG_WRITE: u64 = 1 << 2;
/// The receive queue of port 0.
pub const RECEIVEQ: usize = 0;
/// The transmit queue of port 0.
pub const TRANSMITQ: usize = 1;
const QUEUE_SIZES: [u16; 2] = [128, 128];
/// Communication controller, other (QEMU's `PCI_CLASS_COMMUNICATION_OTHER`).
const CLASS: u32 = 0x07_80_00;
const CONFIG_LEN: usize = 12;
const EMERG_WR: usize = 8;
const CHUNK: usize = 4096;

/// The console device.
pub struct VirtioConsole {
    out: Box<dyn Write + Send>,
    input: Box<dyn Input>,
    emerg_write: bool,
}

impl std::fmt::Debug for VirtioConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioConsole")
            .field("emerg_write", &self.emerg_write)
            .finish_non_exhaustive()
    }
}

impl VirtioConsole {
    /// A console writing the guest's output to `out` and feeding it `input`.
    pub fn new(out: Box<dyn Write + Send>, input: Box<dyn Input>) -> Self {
        VirtioConsole {
            out,
            input,
            emerg_write: false,
        }
    }

    fn output(&mut self, data: &[u8]) {
        if let Err(e) = self.out.write_all(data) {
            tracing::debug!("virtio-console output: {e}");
        }
    }

    fn flush(&mut self) {
        if let Err(e) = self.out.flush() {
            tracing::debug!("virtio-console output: {e}");
        }
    }

    fn transmit(&mut self, queue: &mut VirtQueue<'_>) -> Result<(), VirtioError> {
        let mut buf = [0u8; CHUNK];
        while let Some(chain) = queue.pop()? {
            let mut done = 0u64;
            while done < chain.readable_len() {
                let n = chain.read_at(queue.mem(), done, &mut buf)?;
                self.output(&buf[..n]);
                done += n as u64;
            }
            self.flush();
            queue.add_used(chain.head, 0)?;
        }
        Ok(())
    }

    fn receive(&mut self, queue: &mut VirtQueue<'_>) -> Result<(), VirtioError> {
        let mut buf = [0u8; CHUNK];
        while let Some(chain) = queue.pop()? {
            let room = chain.writable_len();
            let mut done = 0u64;
            while done < room {
                let want = (room - done).min(CHUNK as u64) as usize;
                let n = self.input.read_available(&mut buf[..want]).min(want);
                if n == 0 {
                    break;
                }
                chain.write_at(queue.mem(), done, &buf[..n])?;
                done += n as u64;
            }
            if done == 0 && room != 0 {
                queue.unpop();
                break;
            }
            queue.add_used(chain.head, done as u32)?;
        }
        Ok(())
    }
}

impl VirtioDevice for VirtioConsole {
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
        F_EMERG_WRITE
    }

    fn set_driver_features(&mut self, features: u64) {
        self.emerg_write = features & F_EMERG_WRITE != 0;
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        let mut c = [0u8; CONFIG_LEN];
        c[4..8].copy_from_slice(&1u32.to_le_bytes()); // max_nr_ports
        for (i, d) in data.iter_mut().enumerate() {
            *d = c.get(offset + i).copied().unwrap_or(0xFF);
        }
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        if offset == EMERG_WR && self.emerg_write {
            if let Some(&b) = data.first().filter(|&&b| b != 0) {
                self.output(&[b]);
                self.flush();
            }
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

    fn reset(&mut self) {
        self.emerg_write = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::BufferInput;
    use crate::pci_device::PciDevice;
    use crate::virtio::testutil::{Harness, BUF, MSI_ADDR, MSI_DATA};
    use proptest::prelude::*;
    use std::sync::{Arc, Mutex};

    /// Output the test can look at: the bytes and the number of flushes.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.0.lock().unwrap().1 += 1;
            Ok(())
        }
    }

    impl Capture {
        fn bytes(&self) -> Vec<u8> {
            self.0.lock().unwrap().0.clone()
        }
        fn flushes(&self) -> usize {
            self.0.lock().unwrap().1
        }
    }

    /// Input that counts how often it is asked.
    struct Counted(BufferInput, Arc<Mutex<usize>>);

    impl Input for Counted {
        fn read_available(&mut self, buf: &mut [u8]) -> usize {
            *self.1.lock().unwrap() += 1;
            self.0.read_available(buf)
        }
        fn is_exhausted(&self) -> bool {
            self.0.is_exhausted()
        }
    }

    fn console(input: &[u8], features: u64) -> (Harness, Capture, Arc<Mutex<usize>>) {
        let out = Capture::default();
        let asked = Arc::new(Mutex::new(0));
        let input = Counted(BufferInput::new(input.to_vec()), asked.clone());
        let dev = VirtioConsole::new(Box::new(out.clone()), Box::new(input));
        (Harness::start(Box::new(dev), features), out, asked)
    }

    #[test]
    fn features_and_configuration() {
        let (mut h, _, _) = console(b"", 0);
        assert_eq!(
            h.offered(),
            1 << 32 | 1 << 28 | 1 << 2,
            "EMERG_WRITE; no SIZE, no MULTIPORT"
        );
        assert_eq!(h.device_cfg_read(0, 4), 0, "cols, rows");
        assert_eq!(h.device_cfg_read(4, 4), 1, "max_nr_ports");
        assert_eq!(h.device_cfg_read(8, 4), 0, "emerg_wr");
        assert_eq!(h.device_cfg_read(10, 4), 0xFFFF_FFFF);
        assert_eq!(h.common_read(0x12, 2), 2);
        h.select_queue(0);
        h.common_write(0x18, 2, 256);
        h.select_queue(1);
        assert_eq!(h.common_read(0x18, 2), 8, "as set up");
    }

    #[test]
    fn transmitted_bytes_reach_the_output_with_used_length_0() {
        let (mut h, out, _) = console(b"", 0);
        h.write(BUF, b"hello from virtio-console\n");
        h.submit(TRANSMITQ, &[(BUF, 26, false)]);
        assert_eq!(h.pop_used(TRANSMITQ), Some((0, 0)));
        assert_eq!(out.bytes(), b"hello from virtio-console\n");
        assert_eq!(h.msis(), vec![(MSI_ADDR, MSI_DATA + 1)]);
        // Several buffers in order; a device-writable one is left alone.
        h.write(BUF + 0x100, b"abc");
        h.write(BUF + 0x200, b"defg");
        h.write(BUF + 0x300, b"zz");
        h.submit(
            TRANSMITQ,
            &[(BUF + 0x100, 3, false), (BUF + 0x200, 4, false), (BUF + 0x300, 2, true)],
        );
        assert_eq!(h.pop_used(TRANSMITQ), Some((1, 0)));
        assert_eq!(&out.bytes()[26..], b"abcdefg");
        assert_eq!(h.read(BUF + 0x300, 2), b"zz");
        assert_eq!(out.flushes(), 2, "a flush per chain");
    }

    #[test]
    fn input_fills_receive_buffers_when_there_are_some() {
        let input: Vec<u8> = (0..100).collect();
        let (mut h, _, asked) = console(&input, 0);
        h.dev.poll();
        assert_eq!(*asked.lock().unwrap(), 0, "no buffer, no read");
        h.post(RECEIVEQ, &[(BUF, 64, true)]);
        h.dev.poll();
        assert_eq!(h.pop_used(RECEIVEQ), Some((0, 64)));
        assert_eq!(h.read(BUF, 64), input[..64]);
        assert_eq!(h.msis(), vec![(MSI_ADDR, MSI_DATA)]);
        h.submit(RECEIVEQ, &[(BUF + 0x100, 16, true), (BUF + 0x200, 64, true)]);
        assert_eq!(h.pop_used(RECEIVEQ), Some((1, 36)), "the rest, at the notify");
        assert_eq!(h.read(BUF + 0x100, 16), input[64..80]);
        assert_eq!(h.read(BUF + 0x200, 20), input[80..]);
        // Nothing more: a buffer stays available and nothing is used.
        h.submit(RECEIVEQ, &[(BUF + 0x300, 8, true)]);
        h.dev.poll();
        assert_eq!(h.pop_used(RECEIVEQ), None);
        assert_eq!(h.msi_count(), 2);
    }

    #[test]
    fn input_waits_for_driver_ok() {
        let (mut h, _, asked) = console(b"xyz", 0);
        h.set_status(0);
        h.init(1 << 32);
        h.setup_queue(0, 8, 0);
        h.post(RECEIVEQ, &[(BUF, 8, true)]);
        h.dev.poll();
        assert_eq!(*asked.lock().unwrap(), 0);
        h.set_status(0x0F);
        assert_eq!(h.pop_used(RECEIVEQ), Some((0, 3)), "served at DRIVER_OK");
        assert_eq!(h.read(BUF, 3), b"xyz");
    }

    #[test]
    fn emergency_write_once_negotiated() {
        let (mut h, out, _) = console(b"", 0);
        h.bar4_write(0x2000 + 8, 1, u64::from(b'!'));
        assert_eq!(out.bytes(), b"", "EMERG_WRITE not negotiated");
        let (mut h, out, _) = console(b"", F_EMERG_WRITE);
        h.bar4_write(0x2000 + 8, 4, u64::from(b'!'));
        h.bar4_write(0x2000 + 8, 1, 0);
        h.bar4_write(0x2000 + 9, 1, u64::from(b'?'));
        assert_eq!(out.bytes(), b"!", "one byte; a zero and other offsets ignored");
        assert_eq!(h.device_cfg_read(8, 4), 0);
        h.set_status(0);
        h.bar4_write(0x2000 + 8, 1, u64::from(b'!'));
        assert_eq!(out.bytes(), b"!", "forgotten at reset");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Random bytes in the ring memory, random BAR and config accesses,
        /// notifies and polls never panic; afterwards a reset brings it back.
        #[test]
        fn fuzz(ops in crate::virtio::testutil::fuzz_ops()) {
            let (mut h, out, _) = console(b"input", 0);
            h.fuzz(&ops);
            let before = out.bytes().len();
            h.write(BUF, b"ok");
            h.submit(TRANSMITQ, &[(BUF, 2, false)]);
            prop_assert_eq!(h.pop_used(TRANSMITQ), Some((0, 0)));
            prop_assert_eq!(&out.bytes()[before..], b"ok");
        }
    }
}
