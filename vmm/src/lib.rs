//! nyx-vmm: the machine.
