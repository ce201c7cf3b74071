//! virtio-rng ([`VirtioRng`]), as QEMU 7.2's `virtio-rng-pci`: one queue of
//! 8 entries, no feature of its own, no configuration. Each chain's
//! device-writable buffers are filled from the machine's [`Entropy`] (which
//! the recorder logs and the replayer serves), at most [`MAX_REQUEST`]
//! bytes per chain, and the used length is the number of bytes written.
//! Device-readable buffers in a chain are ignored.

use super::{VirtQueue, VirtioDevice, VirtioError};
use crate::io::Entropy;

/// The virtio device ID of virtio-rng.
pub const DEVICE_TYPE: u16 = virtio_bindings::virtio_ids::VIRTIO_ID_RNG as u16;
/// The device's name ([`VirtioDevice::name`]).
pub const NAME: &str = "virtio-rng";

/// The most bytes one chain receives.
pub const MAX_REQUEST: u64 = 64 << 10;
const QUEUE_SIZES: [u16; 1] = [8];
/// PCI class "other" (QEMU's `PCI_CLASS_OTHERS`).
const CLASS: u32 = 0x00_FF_00;

/// The entropy device.
pub struct VirtioRng {
    entropy: Box<dyn Entropy>,
}

impl std::fmt::Debug for VirtioRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioRng").finish_non_exhaustive()
    }
}

impl VirtioRng {
    /// A device drawing its bytes from `entropy`.
    pub fn new(entropy: Box<dyn Entropy>) -> Self {
        VirtioRng { entropy }
    }
}

impl VirtioDevice for VirtioRng {
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
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn config_len(&self) -> usize {
        0
    }

    fn read_config(&self, _offset: usize, data: &mut [u8]) {
        data.fill(0);
    }

    fn process_queue(&mut self, _index: usize, queue: &mut VirtQueue<'_>) -> Result<(), VirtioError> {
        let mut buf = [0u8; 4096];
        while let Some(chain) = queue.pop()? {
            let want = chain.writable_len().min(MAX_REQUEST);
            let mut done = 0u64;
            while done < want {
                let n = (want - done).min(buf.len() as u64) as usize;
                self.entropy.fill(&mut buf[..n]);
                chain.write_at(queue.mem(), done, &buf[..n])?;
                done += n as u64;
            }
            queue.add_used(chain.head, done as u32)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testutil::{CountingEntropy, Harness, BUF, MSI_ADDR, MSI_DATA};
    use proptest::prelude::*;

    fn rng() -> Harness {
        Harness::start(Box::new(VirtioRng::new(Box::new(CountingEntropy(0)))), 0)
    }

    #[test]
    fn fills_writable_buffers_and_reports_the_bytes() {
        let mut h = rng();
        h.submit(0, &[(BUF, 16, true)]);
        assert_eq!(h.pop_used(0), Some((0, 16)));
        assert_eq!(h.read(BUF, 16), (0..16).collect::<Vec<u8>>());
        // Two buffers and a device-readable one before them.
        h.submit(
            0,
            &[(BUF + 0x100, 3, false), (BUF + 0x200, 5, true), (BUF + 0x300, 2, true)],
        );
        assert_eq!(h.pop_used(0), Some((1, 7)));
        assert_eq!(h.read(BUF + 0x200, 5), vec![16, 17, 18, 19, 20]);
        assert_eq!(h.read(BUF + 0x300, 2), vec![21, 22]);
        assert_eq!(h.read(BUF + 0x100, 3), vec![0; 3], "readable buffer untouched");
        assert_eq!(h.msis(), vec![(MSI_ADDR, MSI_DATA); 2], "one interrupt per notify");
        assert_eq!(h.isr(), 1);
        assert!(h.sink.gsi_changes().is_empty(), "no INTx with MSI-X");
        assert!(!h.dev.needs_reset());
    }

    #[test]
    fn a_request_is_capped() {
        let mut h = rng();
        h.submit(0, &[(BUF, 0x2_0000, true)]);
        assert_eq!(h.pop_used(0), Some((0, MAX_REQUEST as u32)));
        assert_eq!(h.read(BUF + MAX_REQUEST, 1), vec![0]);
        assert_eq!(h.msi_count(), 1);
    }

    #[test]
    fn configuration_reads_beyond_the_structure_are_all_ones() {
        let mut h = rng();
        assert_eq!(h.offered(), 1 << 32 | 1 << 28, "VERSION_1 and RING_INDIRECT_DESC only");
        assert_eq!(h.device_cfg_read(0, 4), 0xFFFF_FFFF);
        assert_eq!(h.common_read(0x12, 2), 1, "one queue");
        h.select_queue(0);
        assert_eq!(h.common_read(0x18, 2), 8, "size as set up");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Random bytes in the ring memory, random BAR and config accesses
        /// and notifies never panic, and a stopped device says so.
        #[test]
        fn fuzz(ops in crate::virtio::testutil::fuzz_ops()) {
            let mut h = rng();
            h.fuzz(&ops);
            h.submit(0, &[(BUF, 4, true)]);
            prop_assert_eq!(h.pop_used(0), Some((0, 4)));
        }
    }
}
