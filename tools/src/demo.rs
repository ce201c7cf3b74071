//! `nyx demo`: records the bundled guest, replays the recording, shows
//! that the two runs agree byte for byte, and runs the replay backwards to
//! the instruction that wrote the guest's last sample (what gdb's
//! `reverse-continue` with a watchpoint does).
//!
//! The bundled guest counts in a busy loop while a 1 kHz timer interrupts
//! it, and at each tick stores the count: its output depends on exactly
//! where each interrupt landed, so two plain runs never print the same. The
//! replay must print exactly what the recording printed.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use nyx_recorder::{record_image, RecordOptions};
use nyx_replayer::{replay, ReplayEnd, ReplayOptions};
use nyx_vmm::config::VerifyLevel;
use nyx_vmm::SerialIn;

/// The bundled guest.
const GUEST: &str = "counter";

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

fn show(title: &str, text: &str) {
    let lines: Vec<&str> = text.lines().collect();
    println!("  {title} ({} lines):", lines.len());
    for l in lines.iter().take(4) {
        println!("    {l}");
    }
    if lines.len() > 6 {
        println!("    ...");
    }
    for l in lines.iter().skip(4.max(lines.len().saturating_sub(2))) {
        println!("    {l}");
    }
}

/// Runs the demo on the KVM device `kvm_device`.
pub fn run(kvm_device: &str) -> Result<ExitCode, String> {
    let image = nyx_guests::image(GUEST).ok_or("the bundled guest is missing")?.to_vec();
    let trace = std::env::temp_dir().join(format!("nyx-demo-{}.nyxtrace", std::process::id()));
    println!("Nyx demo: a guest counts in a busy loop while a 1 kHz timer interrupts it; at each");
    println!("tick it stores the count, so its output depends on exactly where each interrupt landed.");
    println!();
    println!("1. Recording it under KVM (every device in user space, every input logged)...");
    let recorded = Capture::default();
    let rec = record_image(
        RecordOptions {
            cpus: 1,
            out: trace.clone(),
            kernel: PathBuf::from(GUEST),
            kernel_name: Some(GUEST.into()),
            initrd: None,
            cmdline: String::new(),
            mem_mib: 64,
            serial_in: SerialIn::None,
            serial_out: Some(Box::new(recorded.clone())),
            kvm_path: kvm_device.into(),
            verify: VerifyLevel::Exits,
            landings: nyx_recorder::LandingPolicy::Auto,
            cpu: Default::default(),
            irqchip: Default::default(),
            pci: Default::default(),
        },
        GUEST.into(),
        image,
        None,
    )
    .map_err(|e| e.to_string())?;
    show("recorded guest output", &recorded.text());
    let size = std::fs::metadata(&rec.path).map(|m| m.len()).unwrap_or(0);
    println!(
        "  {} guest-caused exits, {} asynchronous landings of the timer in the busy loop, {} events, {} bytes of trace",
        rec.exits, rec.landings, rec.events, size
    );
    println!();
    println!("2. Replaying the trace (no timer, no host clock: everything comes from the trace)...");
    let _ = std::io::stdout().flush();
    let replayed = Capture::default();
    let r = replay(
        &rec.path,
        ReplayOptions {
            serial_out: Some(Box::new(replayed.clone())),
            kvm_path: kvm_device.into(),
            ..Default::default()
        },
    );
    let r = match r {
        Ok(r) => r,
        Err(nyx_replayer::Error::Diverged(d)) => {
            eprint!("{d}");
            return Ok(ExitCode::from(3));
        }
        Err(e) => return Err(e.to_string()),
    };
    show("replayed guest output", &replayed.text());
    println!(
        "  found all {} landings again: {} restored from delta keyframes (landings in the busy loop), {} by hardware-breakpoint search ({} hits)",
        r.landings,
        r.keyframes,
        r.landings - r.keyframes,
        r.search_hits
    );
    println!();
    let same_output = recorded.text() == replayed.text();
    let same_end = matches!(&r.end, ReplayEnd::Complete { outcome } if *outcome == rec.outcome);
    if same_output && same_end {
        println!("3. The two runs agree: identical serial output, exit status and final register and memory digests.");
    } else {
        println!("3. The runs DIFFER (output identical: {same_output}, same end: {same_end}).");
    }
    println!();
    println!("4. Going backwards, as gdb's reverse-continue does: who wrote the last sample?");
    let went_back = match backwards(&rec.path, kvm_device) {
        Ok(()) => true,
        Err(e) => {
            println!("  FAILED: {e}");
            false
        }
    };
    println!();
    println!("The trace is {}. Try:", rec.path.display());
    println!("  nyx replay {}          # replay it again", rec.path.display());
    println!(
        "  nyx replay {} --gdb :1234   # then gdb: target remote :1234, watch, reverse-continue",
        rec.path.display()
    );
    println!("  nyx trace info {}      # what is in it", rec.path.display());
    println!("  nyx trace dump --kind landing {}", rec.path.display());
    Ok(status(same_output && same_end, went_back))
}

/// The demo's exit status: 0 when the runs agree and going backwards
/// worked, 3 (as a divergence) otherwise.
fn status(runs_agree: bool, went_back: bool) -> ExitCode {
    if runs_agree && went_back {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}

/// Replays the trace to its end under a timeline, then runs backwards to
/// the instruction that last wrote the guest's last sample and one
/// instruction further back, printing where and what it cost.
fn backwards(trace: &std::path::Path, kvm_device: &str) -> Result<(), String> {
    use nyx_vmm::machine::Stop;
    let image = nyx_guests::image(GUEST).ok_or("the bundled guest is missing")?;
    let samples = nyx_guests::symbol(image, "samples").ok_or("the guest has no `samples`")?;
    let last = u64::from(samples) + 8 * 49;
    let opts = ReplayOptions {
        serial_out: Some(Box::new(std::io::sink())),
        kvm_path: kvm_device.into(),
        ..Default::default()
    };
    let (mut m, mut t) = nyx_replayer::debug_replay(trace, opts).map_err(|e| e.to_string())?;
    let err = |e: &dyn std::fmt::Display| e.to_string();
    t.start(&mut m).map_err(|e| err(&e))?;
    let forward = std::time::Instant::now();
    loop {
        match t.resume(&mut m).map_err(|e| err(&e))? {
            Ok(Stop::Ended(_)) => break,
            Ok(_) => {}
            Err(nyx_vmm::machine::Error::Hook(nyx_vmm::hooks::HookError::TraceEnd { .. })) => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    println!(
        "  replayed to the end in {:.0} ms, keeping {} checkpoints",
        forward.elapsed().as_secs_f64() * 1e3,
        t.checkpoints()
    );
    let began = std::time::Instant::now();
    let steps = t.steps_reexecuted;
    let stop = t
        .reverse_continue(&mut m, &[], &[(last, 8)], &[])
        .map_err(|e| err(&e))?;
    let took = began.elapsed();
    let here = where_is(&mut m, &mut t)?;
    let what = match stop {
        nyx_replayer::timeline::ReverseStop::Watch(_) => "stopped just before the instruction that wrote it",
        other => {
            return Err(format!(
                "reverse-continue did not stop at the write, it stopped: {other:?}"
            ))
        }
    };
    println!(
        "  watch samples[49] ({last:#x}), reverse-continue from the end: {what}, {:.0} ms ({} single steps re-executed)",
        took.as_secs_f64() * 1e3,
        t.steps_reexecuted - steps
    );
    println!("    {here}");
    let began = std::time::Instant::now();
    t.reverse_step(&mut m).map_err(|e| err(&e))?;
    let took = began.elapsed();
    println!(
        "  reverse-stepi ({:.0} ms): the instruction before it",
        took.as_secs_f64() * 1e3
    );
    println!("    {}", where_is(&mut m, &mut t)?);
    Ok(())
}

/// The position, RIP and instruction of the replayed machine now.
fn where_is(m: &mut nyx_vmm::Machine, t: &mut nyx_replayer::Timeline) -> Result<String, String> {
    let pos = t.resolve(m).map_err(|e| e.to_string())?;
    let regs = m.vcpu().get_regs().map_err(|e| e.to_string())?;
    let sregs = m.vcpu().get_sregs().map_err(|e| e.to_string())?;
    let mut code = [0u8; 16];
    m.read_virt(regs.rip, &mut code).map_err(|e| e.to_string())?;
    let mode = nyx_vmm::crash::CodeMode::of(&sregs);
    let insn = nyx_vmm::crash::disassemble(&code, regs.rip, mode, 1)
        .into_iter()
        .next()
        .unwrap_or_default();
    Ok(format!("at position {pos}: {}", insn.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_failed_stage_makes_the_status_non_zero() {
        assert_eq!(status(true, true), ExitCode::SUCCESS);
        assert_eq!(status(false, true), ExitCode::from(3));
        assert_eq!(status(true, false), ExitCode::from(3));
    }

    #[test]
    fn going_backwards_over_a_missing_trace_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(backwards(&dir.path().join("none.nyxtrace"), "/dev/kvm").is_err());
    }
}
