//! `monitor` commands: `phys ADDR LEN` dumps guest-physical memory in hex,
//! `when` prints the position, `help` lists them. In a replay, `seek POS`
//! moves to a position, `checkpoint` names the current one and `restart N`
//! goes back to checkpoint N (gdb does not know the machine moved: run
//! `flushregs` after them, as after rr's `run`).

use gdbstub::target::ext::monitor_cmd::{outputln, ConsoleOutput, MonitorCmd};

use crate::target::NyxTarget;

/// The most bytes one `monitor phys` prints.
pub const PHYS_MAX: u64 = 64 * 1024;

/// A parsed monitor command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Dump guest-physical memory.
    Phys {
        /// Start address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Print the position.
    When,
    /// Go to a position of the replay (`EVENTS[:STEPS]`).
    Seek(String),
    /// Name the current position of the replay.
    Checkpoint,
    /// Go to a named position.
    Restart(usize),
    /// Checkpoint statistics.
    Info,
    /// List the commands.
    Help,
}

/// Parses a number in C syntax: decimal, or hex with 0x.
fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parses a command line; Err says what is wrong.
pub fn parse(line: &str) -> Result<Command, String> {
    let mut words = line.split_whitespace();
    match words.next() {
        Some("phys") => {
            let addr = words.next().and_then(number);
            let len = words.next().map_or(Some(64), number);
            match (addr, len, words.next()) {
                (Some(addr), Some(len), None) if len <= PHYS_MAX => Ok(Command::Phys { addr, len }),
                (Some(_), Some(_), None) => Err(format!("phys: at most {PHYS_MAX} bytes at a time")),
                _ => Err("usage: monitor phys ADDR [LEN]".into()),
            }
        }
        Some("when") => Ok(Command::When),
        Some("seek") => match (words.next(), words.next()) {
            (Some(p), None) => Ok(Command::Seek(p.to_string())),
            _ => Err("usage: monitor seek EVENTS[:STEPS]".into()),
        },
        Some("checkpoint") => Ok(Command::Checkpoint),
        Some("restart") => match (words.next().and_then(|n| n.parse().ok()), words.next()) {
            (Some(n), None) => Ok(Command::Restart(n)),
            _ => Err("usage: monitor restart N".into()),
        },
        Some("info") => Ok(Command::Info),
        Some("help") | None => Ok(Command::Help),
        Some(other) => Err(format!("unknown monitor command '{other}'; try 'monitor help'")),
    }
}

/// Formats `data`, read at `addr`, as lines of 16 hex bytes.
pub fn hex_lines(addr: u64, data: &[u8]) -> Vec<String> {
    data.chunks(16)
        .enumerate()
        .map(|(i, c)| {
            let bytes: Vec<String> = c.iter().map(|b| format!("{b:02x}")).collect();
            format!("{:#010x}: {}", addr.wrapping_add(16 * i as u64), bytes.join(" "))
        })
        .collect()
}

impl MonitorCmd for NyxTarget<'_> {
    fn handle_monitor_cmd(&mut self, cmd: &[u8], mut out: ConsoleOutput<'_>) -> Result<(), Self::Error> {
        let line = String::from_utf8_lossy(cmd);
        match parse(&line) {
            Ok(Command::Phys { addr, len }) => {
                let mut buf = vec![0u8; len as usize];
                match self.machine.read_phys(addr, &mut buf) {
                    Ok(()) => hex_lines(addr, &buf).iter().for_each(|l| outputln!(out, "{l}")),
                    Err(e) => outputln!(out, "cannot read guest-physical memory: {e}"),
                }
            }
            Ok(Command::When) => match self.timeline.as_deref_mut() {
                Some(t) => match t.resolve(self.machine) {
                    Ok(p) => outputln!(
                        out,
                        "position {p} (events:steps; {} guest-caused exits){}",
                        self.machine.exit_seq(),
                        if t.ending().is_some() {
                            ", at the end of the replay"
                        } else {
                            ""
                        }
                    ),
                    Err(e) => outputln!(out, "cannot tell the position: {e}"),
                },
                None => outputln!(out, "position {} (guest-caused exits)", self.machine.exit_seq()),
            },
            Ok(Command::Seek(p)) => match (self.timeline.as_deref_mut(), p.parse::<nyx_replayer::Position>()) {
                (None, _) => outputln!(out, "seek works in a replay (nyx replay FILE --gdb)"),
                (Some(_), Err(e)) => outputln!(out, "{e}"),
                (Some(t), Ok(target)) => match t.goto(self.machine, target) {
                    Ok(()) => match t.position() {
                        Some(at) if t.ending().is_some() => outputln!(out, "at the end of the replay, {at}"),
                        Some(at) => outputln!(out, "at {at}"),
                        None => outputln!(out, "moved"),
                    },
                    Err(e) => outputln!(out, "seek failed: {e}"),
                },
            },
            Ok(Command::Checkpoint) => match self.timeline.as_deref_mut() {
                None => outputln!(out, "checkpoints work in a replay (nyx replay FILE --gdb)"),
                Some(t) => match t.bookmark(self.machine) {
                    Ok((n, p)) => outputln!(out, "checkpoint {n} at {p}"),
                    Err(e) => outputln!(out, "checkpoint failed: {e}"),
                },
            },
            Ok(Command::Restart(n)) => match self.timeline.as_deref_mut() {
                None => outputln!(out, "restart works in a replay (nyx replay FILE --gdb)"),
                Some(t) => match t.bookmarked(n) {
                    None => outputln!(out, "no checkpoint {n}"),
                    Some(p) => match t.goto(self.machine, p) {
                        Ok(()) => outputln!(out, "at checkpoint {n}, {p}"),
                        Err(e) => outputln!(out, "restart failed: {e}"),
                    },
                },
            },
            Ok(Command::Info) => match self.timeline.as_deref() {
                Some(t) => outputln!(out, "{}", t.summary()),
                None => outputln!(out, "a live machine: no checkpoints"),
            },
            Ok(Command::Help) => {
                outputln!(out, "phys ADDR [LEN]  guest-physical memory in hex (LEN default 64)");
                outputln!(out, "when             the position (a replay: EVENTS:STEPS)");
                outputln!(out, "seek POS         go to position EVENTS[:STEPS] of the replay");
                outputln!(out, "checkpoint       name the current position (prints its number)");
                outputln!(out, "restart N        go to checkpoint N");
                outputln!(out, "info             checkpoints kept by the replay");
                outputln!(
                    out,
                    "after seek/restart run 'flushregs' so that gdb reads the registers again"
                );
            }
            Err(msg) => outputln!(out, "{msg}"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_commands() {
        assert_eq!(parse("phys 0x1000 32"), Ok(Command::Phys { addr: 0x1000, len: 32 }));
        assert_eq!(parse("phys 4096"), Ok(Command::Phys { addr: 4096, len: 64 }));
        assert_eq!(parse("when"), Ok(Command::When));
        assert!(parse("phys").is_err());
        assert!(parse("phys 0x10 0x100000").is_err());
        assert!(parse("phys zz").is_err());
        assert_eq!(parse("seek 5:12"), Ok(Command::Seek("5:12".into())));
        assert!(parse("seek").is_err());
        assert!(parse("seek 1 2").is_err());
        assert_eq!(parse("checkpoint"), Ok(Command::Checkpoint));
        assert_eq!(parse("restart 2"), Ok(Command::Restart(2)));
        assert!(parse("restart x").is_err());
        assert!(parse("frobnicate").is_err());
    }

    #[test]
    fn hex_dump_lines() {
        let data: Vec<u8> = (0..20).collect();
        let l = hex_lines(0x100, &data);
        assert_eq!(l.len(), 2);
        assert!(l[0].starts_with("0x00000100: 00 01 02"));
        assert_eq!(l[1], "0x00000110: 10 11 12 13");
    }

    proptest! {
        #[test]
        fn any_line_parses_or_errs(s in ".{0,64}") {
            let _ = parse(&s);
        }
    }
}
