//! Divergence reports: where the replayed guest left the recording, and
//! everything that helps find out why.

use std::fmt::Write as _;

use nyx_vmm::crash::CrashReport;
use nyx_vmm::events::GprSnapshot;
use nyx_vmm::hooks::{HookCtx, HookError};

use crate::cursor::Cursor;

/// A replay that could not follow its recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// The whole report, as printed.
    pub text: String,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Builds the report for `msg` at the cursor's position from the vCPU in
/// `ctx`; `expected` adds register differences against recorded registers.
pub fn diverge(ctx: &mut HookCtx<'_>, cursor: &Cursor, msg: String, expected: Option<&GprSnapshot>) -> HookError {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "replay diverged at position {} (guest-caused exits replayed so far)",
        cursor.position()
    );
    let _ = writeln!(t, "  {msg}");
    if ctx.vcpus > 1 {
        let _ = writeln!(t, "  on vCPU {} of {}", ctx.vcpu_index, ctx.vcpus);
    }
    match (ctx.vcpu.get_regs(), ctx.vcpu.get_sregs()) {
        (Ok(regs), Ok(sregs)) => {
            if let Some(want) = expected {
                let diff = want.diff(&GprSnapshot::of(&regs));
                if !diff.is_empty() {
                    let _ = writeln!(t, "register differences (recorded vs replayed):");
                    for d in diff {
                        let _ = writeln!(t, "  {d}");
                    }
                }
            }
            let now = CrashReport::new(String::new(), &regs, &sregs, ctx.mem);
            let _ = writeln!(t, "replayed vCPU now:\n{}", now.cpu);
            let _ = writeln!(t, "code at rip:");
            for l in &now.code {
                let _ = writeln!(t, "  {l}");
            }
            if let Some(s) = suspect(&now.code) {
                let _ = writeln!(t, "suspect: {s}");
            }
        }
        _ => {
            let _ = writeln!(t, "(registers unavailable)");
        }
    }
    let _ = writeln!(t, "last events before the divergence (position: event):");
    for (pos, e) in cursor.recent() {
        let _ = writeln!(t, "  {pos}: {e}");
    }
    HookError::Divergence(t)
}

/// An instruction near RIP whose result Nyx cannot log, if any.
fn suspect(code: &[String]) -> Option<String> {
    const UNTRAPPED: [&str; 5] = ["rdtsc", "rdtscp", "rdrand", "rdseed", "rdpid"];
    code.iter().find_map(|l| {
        UNTRAPPED
            .iter()
            .find(|m| l.split_whitespace().any(|w| w == **m))
            .map(|m| format!("`{m}` near RIP was not patched: its value differs between runs ({l})"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspects_unpatched_time_instructions() {
        let code = vec!["0x1000: 0f 31 rdtsc ".to_string()];
        assert!(suspect(&code).unwrap().contains("rdtsc"));
        assert!(suspect(&["0x1000: 90 nop ".to_string()]).is_none());
    }
}
