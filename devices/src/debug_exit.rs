//! The QEMU-compatible debug-exit port. (being written)
