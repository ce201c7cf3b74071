//! Which vCPU the calling thread is acting for.
//!
//! A local APIC access is an MMIO access to the same address on every CPU
//! (0xFEE00000), and the bus that dispatches it knows nothing of CPUs. As in
//! QEMU (`cpu_get_current_apic`, from its `current_cpu` thread-local), the
//! thread that runs a vCPU says which one it runs, and the interrupt
//! controllers read it to pick that CPU's local APIC. A thread that never
//! says acts for CPU 0, the bootstrap processor: a machine with one vCPU
//! never has to.

use std::cell::Cell;

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// The index of the vCPU the calling thread acts for (0 unless set).
pub fn current() -> usize {
    CURRENT.with(Cell::get)
}

/// Declares that the calling thread now acts for vCPU `cpu`.
pub fn set_current(cpu: usize) {
    CURRENT.with(|c| c.set(cpu));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_has_its_own_cpu() {
        set_current(3);
        assert_eq!(current(), 3);
        let other = std::thread::spawn(current).join().unwrap();
        assert_eq!(other, 0, "a new thread acts for the BSP");
        set_current(0);
        assert_eq!(current(), 0);
    }
}
