//! `nyx demo`: boots the bundled guest (a long-mode guest driven by PIT
//! interrupts, with serial output) and explains what happened.

use std::process::ExitCode;

use nyx_vmm::{MachineBuilder, RunOutcome};

/// Runs the demo on the KVM device `kvm_device`.
pub fn run(kvm_device: &str) -> Result<ExitCode, String> {
    eprintln!(
        "nyx demo: booting the bundled guest ({} bytes, Multiboot ELF) under KVM;",
        nyx_guests::PIT.len()
    );
    eprintln!("every port access, timer tick and interrupt of it passes through Nyx's user-space devices.");
    eprintln!("--- guest serial output ---");
    let mut machine = MachineBuilder::new()
        .kernel_image("demo guest", nyx_guests::PIT.to_vec())
        .kvm_path(kvm_device)
        .build()
        .map_err(|e| e.to_string())?;
    let outcome = machine.run().map_err(|e| e.to_string())?;
    let s = machine.stats();
    eprintln!("--- end of guest output ---");
    eprintln!(
        "The guest made {} exits to Nyx ({} port I/O, {} HLT, {} interrupt windows) and took {} injected interrupts.",
        s.exits(),
        s.pio,
        s.hlt,
        s.irq_window,
        s.injected
    );
    match &outcome {
        RunOutcome::DebugExit(v) => {
            eprintln!("It ended by writing {v:#x} to the debug-exit port: nyx exits with that status.")
        }
        other => eprintln!("It ended: {other:?}"),
    }
    Ok(crate::finish(&outcome))
}
