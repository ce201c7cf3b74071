//! Virtio 1.x devices on the PCI bus: the modern (non-transitional)
//! virtio-pci transport ([`VirtioPci`], `pci.rs`: config space, BARs,
//! MSI-X, MSI where a function opts in, and INTx, around `transport.rs`'s
//! registers and queues; chains are walked in `queue.rs`) and the devices
//! behind it ([`block::VirtioBlock`], [`rng::VirtioRng`],
//! [`console::VirtioConsole`], [`net::VirtioNet`]), which meet through the
//! [`VirtioDevice`] trait. The machine builds a function as
//! `VirtioPci::new(Box::new(VirtioBlock::new(disk, id)), dma, msi, intx)`.
//!
//! What the guest sees is meant to be QEMU 7.2's `-device
//! virtio-*-pci,disable-legacy=on` as far as the virtio spec makes it
//! observable. Everything a device does happens synchronously at the
//! guest's notify write (or at [`crate::pci_device::PciDevice::poll`] for
//! input that arrived), on the vCPU thread that took the MMIO exit: the
//! device pops the chains, does the I/O through its backend, fills the used
//! ring and raises the interrupt before the vCPU resumes, so a replay that
//! re-executes the guest re-executes the device exactly. A driver's
//! mistake in a queue or a request never panics and never reaches memory
//! outside guest RAM: the transport marks the device DEVICE_NEEDS_RESET,
//! sends a configuration-change interrupt and ignores the device's queues
//! until the driver resets it.

pub mod block;
pub mod console;
pub mod net;
pub mod pci;
pub mod queue;
pub mod rng;
#[cfg(test)]
mod testutil;
pub mod transport;

pub use pci::VirtioPci;
pub use queue::{Chain, Desc, QueueError, VirtQueue};
pub use transport::{Transport, NO_VECTOR};

/// VIRTIO_F_RING_INDIRECT_DESC, offered by the transport for every device.
pub const F_RING_INDIRECT_DESC: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// VIRTIO_F_VERSION_1, offered by the transport for every device.
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Why a device gave up on a request: the transport marks it
/// DEVICE_NEEDS_RESET.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VirtioError {
    /// The queue or a chain is malformed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// A request's layout is wrong for the device (a header too short, no
    /// status byte).
    #[error("malformed request: {0}")]
    Request(&'static str),
}

/// A virtio device, seen from the transport. The transport owns the
/// queues' registers and the feature negotiation, and calls the device to
/// serve a queue when the driver notifies it (or when [`VirtioDevice::poll`]
/// asks for it).
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 block, 3 console, 4 entropy).
    fn device_type(&self) -> u16;
    /// A short name ("virtio-blk").
    fn name(&self) -> &str;
    /// The PCI class code (class, subclass, programming interface).
    fn pci_class(&self) -> u32;
    /// The device-specific features offered (the transport adds VERSION_1
    /// and RING_INDIRECT_DESC).
    fn features(&self) -> u64;
    /// The features the driver accepted (at FEATURES_OK, and at restore).
    fn set_driver_features(&mut self, _features: u64) {}
    /// The maximum size of each queue; the number of queues is its length.
    fn queue_max_sizes(&self) -> &[u16];
    /// The length of the device configuration structure.
    fn config_len(&self) -> usize;
    /// Reads `data.len()` bytes at `offset` of the configuration structure
    /// (the transport keeps accesses inside [`VirtioDevice::config_len`]).
    fn read_config(&self, offset: usize, data: &mut [u8]);
    /// A driver write of the configuration structure.
    fn write_config(&mut self, _offset: usize, _data: &[u8]) {}
    /// Serves queue `index`: pops what the driver made available, does the
    /// requests and puts them in the used ring. An error stops the device.
    fn process_queue(&mut self, index: usize, queue: &mut VirtQueue<'_>) -> Result<(), VirtioError>;
    /// Work outside the driver's notifies: a mask of the queues to serve
    /// now (bit `i` for queue `i`), such as a receive queue when input may
    /// have arrived.
    fn poll(&mut self) -> u64 {
        0
    }
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// Makes what the device has written to the host durable where another
    /// host sees it (a disk's image on shared storage), before the machine
    /// moves there: a live migration's stop-and-copy calls it.
    fn flush_storage(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// The device's own state for a snapshot.
    fn save(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Restores what [`VirtioDevice::save`] returned.
    fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} keeps no state, but the snapshot has {} bytes",
                self.name(),
                state.len()
            ))
        }
    }
}
