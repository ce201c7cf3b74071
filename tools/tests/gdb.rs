//! gdb against `nyx run --gdb`: the real gdb in batch mode drives the
//! in-tree guests through breakpoints, watchpoints, stepping, register and
//! memory display, monitor commands and Ctrl-C; and random bytes sent to
//! the stub never make nyx panic.
//!
//! Every test needs KVM and all but the random-bytes ones need gdb: without
//! them a test is skipped with a message, or fails under
//! `NYX_REQUIRE_KVM=1`.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{kvm_available, lines_of, listening_port, nyx};

/// Whether the gdb tests can run: KVM (the shared probe) and a gdb to run.
/// Without gdb the test is skipped with a message, or fails under
/// `NYX_REQUIRE_KVM=1`.
fn ready() -> bool {
    if !kvm_available() {
        return false;
    }
    let gdb = Command::new("gdb").arg("--version").output();
    if gdb.as_ref().is_ok_and(|o| o.status.success()) {
        return true;
    }
    assert!(
        std::env::var("NYX_REQUIRE_KVM").as_deref() != Ok("1"),
        "NYX_REQUIRE_KVM=1 but gdb cannot be run ({gdb:?}): install the gdb package"
    );
    eprintln!("skipped: gdb cannot be run (install the gdb package)");
    false
}

/// How long nyx may take to end on its own after gdb is done with it.
const END_WITHIN: Duration = Duration::from_secs(60);

/// A nyx process listening for gdb.
struct Nyx {
    child: Child,
    port: u16,
    stderr: mpsc::Receiver<String>,
}

impl Nyx {
    fn start(guest: &str) -> Nyx {
        let kernel = nyx_guests::path(guest).expect("in-tree guest");
        let mut args: Vec<std::ffi::OsString> = ["run", "--gdb", "127.0.0.1:0", "--gdb-wait", "--kernel"]
            .iter()
            .map(Into::into)
            .collect();
        args.push(kernel.into());
        Self::start_with(&args)
    }

    fn start_with(args: &[std::ffi::OsString]) -> Nyx {
        let mut cmd = nyx();
        cmd.args(args).stdout(Stdio::null());
        Self::spawn(cmd)
    }

    /// Spawns `cmd` (a nyx command line that listens for gdb) with its
    /// stderr read here, and waits for the line that says where it listens.
    fn spawn(mut cmd: Command) -> Nyx {
        let mut child = cmd.stderr(Stdio::piped()).spawn().expect("spawn nyx");
        let rx = lines_of(child.stderr.take().expect("stderr"));
        let port = listening_port(&rx, Duration::from_secs(30));
        Nyx {
            child,
            port,
            stderr: rx,
        }
    }

    /// Waits (up to [`END_WITHIN`]) for nyx to exit, then reads the rest
    /// of its stderr to the end. Its status code, `None` when it had to be
    /// killed, and the stderr lines not read before.
    fn finish(mut self) -> (Option<i32>, String) {
        let until = Instant::now() + END_WITHIN;
        let code = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s.code(),
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break None;
                }
            }
        };
        // The process is gone: its stderr reaches end of file, and the
        // reader thread hangs up once it has passed on every line.
        let mut rest = Vec::new();
        loop {
            match self.stderr.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => rest.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    rest.push("(stderr still open 30 s after nyx ended)".into());
                    break;
                }
            }
        }
        (code, rest.join("\n"))
    }
}

impl Nyx {
    /// [`Nyx::finish`], asserting that nyx exited without a panic; its
    /// remaining stderr.
    fn finish_cleanly(self) -> String {
        let (code, err) = self.finish();
        assert!(!err.contains("panicked"), "{err}");
        assert!(code.is_some(), "{err}");
        err
    }
}

impl Drop for Nyx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs gdb in batch mode with `cmds` against nyx, with the guest's symbols.
fn gdb(nyx: &Nyx, guest: &str, cmds: &[&str]) -> String {
    let kernel = nyx_guests::path(guest).expect("in-tree guest");
    let mut c = Command::new("timeout");
    c.args([
        "120",
        "gdb",
        "-nx",
        "-batch",
        "-ex",
        "set architecture i386:x86-64",
        // Re-executing a replay backwards may take longer than gdb's
        // default 2 s on a loaded machine.
        "-ex",
        "set remotetimeout 60",
        "-ex",
    ])
    .arg(format!("target remote 127.0.0.1:{}", nyx.port));
    for cmd in cmds {
        c.args(["-ex", cmd]);
    }
    let out = c.arg(&kernel).output().expect("run gdb (install the gdb package)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    text
}

fn symbol(guest: &str, name: &str) -> u64 {
    let image = nyx_guests::image(guest).expect("guest");
    u64::from(nyx_guests::symbol(image, name).expect("symbol"))
}

#[test]
fn long_mode_breakpoint_registers_stepping_and_monitor() {
    if !ready() {
        return;
    }
    let entry = symbol("longmode", "higher_half_entry");
    assert!(entry >= 0xc000_0000, "a higher-half virtual address");
    let nyx = Nyx::start("longmode");
    let out = gdb(
        &nyx,
        "longmode",
        &[
            "break higher_half_entry",
            "continue",
            "info registers",
            "x/4i $pc",
            "stepi",
            "stepi",
            "stepi",
            "printf \"PC=%#lx\\n\", $pc",
            "monitor phys 0x100000 16",
            "monitor when",
            "x/2x 0xdead00000000",
            "kill",
        ],
    );
    assert!(out.contains("Breakpoint 1, higher_half_entry"), "{out}");
    for reg in ["cr0 ", "cr3 ", "efer ", "fs_base ", "k_gs_base ", "rip "] {
        assert!(out.lines().any(|l| l.starts_with(reg)), "no {reg} in info registers");
    }
    assert!(out.contains("LMA"), "efer shows long mode");
    assert!(
        out.contains(&format!("=> {entry:#x} <higher_half_entry>")),
        "x/4i at the breakpoint"
    );
    let pc = out
        .lines()
        .find_map(|l| l.strip_prefix("PC=0x"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .expect("pc printed");
    assert!(
        pc > entry && pc < entry + 64,
        "three steps moved rip from {entry:#x} to {pc:#x}"
    );
    assert!(out.contains("0x00100000: "), "monitor phys dumps memory");
    assert!(out.lines().any(|l| l.starts_with("position ")), "monitor when");
    assert!(out.contains("Cannot access memory at address 0xdead00000000"));
    let (code, err) = nyx.finish();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("killed by gdb"), "{err}");
}

#[test]
fn watchpoint_stops_at_the_write_and_hbreak_hits() {
    if !ready() {
        return;
    }
    let counter = symbol("counter", "counter");
    let nyx = Nyx::start("counter");
    let watch = format!("watch *(long *){counter:#x}");
    let out = gdb(
        &nyx,
        "counter",
        &[
            "hbreak count_loop",
            "continue",
            &watch,
            "continue",
            "delete 1",
            "continue",
            "kill",
        ],
    );
    assert!(out.contains("Breakpoint 1, count_loop"), "{out}");
    assert!(out.contains("Old value = 0") && out.contains("New value = 1"), "{out}");
    assert!(out.contains("Old value = 1") && out.contains("New value = 2"), "{out}");
    let (code, err) = nyx.finish();
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn interrupt_stops_a_running_guest() {
    if !ready() {
        return;
    }
    let nyx = Nyx::start("counter");
    let kernel = nyx_guests::path("counter").expect("guest");
    // A watchpoint on bytes the loop never writes keeps the guest running
    // (stepped, without timer interrupts) until the Ctrl-C.
    let idle = format!("watch *(long *){:#x}", symbol("counter", "counter") + 8);
    // Ctrl-C as a user gives it: SIGINT to gdb while the guest runs.
    let child = Command::new("gdb")
        .args(["-nx", "-batch", "-ex", "set architecture i386:x86-64", "-ex"])
        .arg(format!("target remote 127.0.0.1:{}", nyx.port))
        .args([
            "-ex",
            &idle,
            "-ex",
            "continue",
            "-ex",
            "printf \"PC=%#lx\\n\", $pc",
            "-ex",
            "kill",
        ])
        .arg(&kernel)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gdb");
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("gdb ends")
        .expect("gdb output");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.contains("SIGINT"), "{out}");
    assert!(out.contains("PC=0x"), "{out}");
    let (code, err) = nyx.finish();
    assert_eq!(code, Some(0), "{err}");
}

/// Without --gdb-wait the guest runs at once and gdb attaches later: the
/// echo guest prints its prompt and waits for input before gdb comes, gdb
/// stops it where it is, and after gdb detaches the guest takes its input
/// and ends with its own status.
#[test]
fn gdb_attaches_to_a_guest_that_already_runs() {
    if !ready() {
        return;
    }
    let kernel = nyx_guests::path("echo").expect("in-tree guest");
    let mut cmd = nyx();
    cmd.args(["run", "--gdb", "127.0.0.1:0", "--serial-in", "-", "--kernel"])
        .arg(&kernel)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut nyx = Nyx::spawn(cmd);
    let out_rx = lines_of(nyx.child.stdout.take().expect("stdout"));
    // The guest ran before anyone attached: its prompt is out.
    let prompt = out_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the guest's prompt");
    assert!(prompt.contains("echo: type"), "{prompt}");
    let text = gdb(&nyx, "echo", &["printf \"PC=%#lx\\n\", $pc", "detach"]);
    assert!(text.contains("PC=0x"), "{text}");
    assert!(text.contains("etached"), "{text}");
    let mut stdin = nyx.child.stdin.take().expect("stdin");
    stdin.write_all(b"ok.").expect("input");
    drop(stdin);
    let echoed: String = out_rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
    assert!(echoed.contains("OK."), "{echoed}");
    let (code, err) = nyx.finish();
    let want = nyx_guests::expected("echo")
        .and_then(|e| e.exit_value)
        .expect("exit value");
    assert_eq!(code, Some(want as i32 & 0xff), "{err}");
}

#[test]
fn detach_lets_the_guest_run_to_its_end() {
    if !ready() {
        return;
    }
    let nyx = Nyx::start("hello");
    let out = gdb(&nyx, "hello", &["detach"]);
    assert!(out.contains("detached"), "{out}");
    let want = nyx_guests::expected("hello").and_then(|e| e.exit_value);
    let (code, err) = nyx.finish();
    assert!(code.is_some() && code != Some(101), "{err}");
    if let Some(w) = want {
        assert_eq!(code, Some(w as i32 & 0xff), "{err}");
    }
}

/// A small deterministic generator for the byte streams.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn random_bytes_never_make_nyx_panic() {
    if !kvm_available() {
        return;
    }
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..6 {
        let nyx = Nyx::start("hello");
        let mut s = TcpStream::connect(("127.0.0.1", nyx.port)).expect("connect");
        let n = 64 + (xorshift(&mut seed) % 512) as usize;
        let mut bytes: Vec<u8> = (0..n).map(|_| xorshift(&mut seed) as u8).collect();
        // Half the rounds send packet-shaped garbage.
        if round % 2 == 1 {
            let body: String = bytes
                .iter()
                .map(|b| (b'!' + b % 90) as char)
                .filter(|c| *c != '$' && *c != '#')
                .collect();
            let sum = body.bytes().fold(0u8, |a, b| a.wrapping_add(b));
            bytes = format!("+$m{body}#{sum:02x}$g#67$?#3f").into_bytes();
        }
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        drop(s);
        let (code, err) = nyx.finish();
        assert!(!err.contains("panicked"), "round {round}: {err}");
        assert!(
            code.is_some() && code != Some(101),
            "round {round}: status {code:?}: {err}"
        );
    }
}

/// gdb on a replay: the recorded long-mode guest stops at a breakpoint in
/// its higher half, reports its position, and runs on to the recorded end,
/// where it stays.
#[test]
fn replay_under_gdb_stops_at_a_breakpoint_and_runs_to_the_end() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("longmode.nyxtrace");
    let rec = nyx()
        .args(["record", "--out"])
        .arg(&trace)
        .arg("--kernel")
        .arg(nyx_guests::path("longmode").unwrap())
        .output()
        .unwrap();
    assert_eq!(rec.status.code(), Some(0), "{}", String::from_utf8_lossy(&rec.stderr));
    let args: Vec<std::ffi::OsString> = vec![
        "replay".into(),
        trace.into_os_string(),
        "--gdb".into(),
        "127.0.0.1:0".into(),
    ];
    let nyx = Nyx::start_with(&args);
    let out = gdb(
        &nyx,
        "longmode",
        &[
            "break higher_half_entry",
            "continue",
            "info registers rip",
            "monitor when",
            "continue",
            "continue",
            "detach",
        ],
    );
    assert!(out.contains("Breakpoint 1, higher_half_entry"), "{out}");
    assert!(out.contains("0xc0109000"), "{out}");
    assert!(out.contains("position "), "{out}");
    // The replay stays at its end (to go back from), however often gdb
    // continues; detaching there ends nyx with the guest's status.
    assert_eq!(out.matches("No more reverse-execution history").count(), 2, "{out}");
    let (code, _) = nyx.finish();
    assert_eq!(code, Some(0));
}

/// Records `guest` into `dir` and starts `nyx replay --gdb` on the trace.
fn replay_nyx(dir: &std::path::Path, guest: &str) -> Nyx {
    replay_nyx_with(dir, guest, &[])
}

/// As [`replay_nyx`], with more `nyx record` options.
fn replay_nyx_with(dir: &std::path::Path, guest: &str, record_args: &[&str]) -> Nyx {
    let trace = dir.join(format!("{guest}.nyxtrace"));
    let rec = nyx()
        .arg("record")
        .args(record_args)
        .arg("--out")
        .arg(&trace)
        .arg("--kernel")
        .arg(nyx_guests::path(guest).unwrap())
        .output()
        .unwrap();
    // The guest's own exit status (or 2 for a crash) is nyx's.
    assert!(
        trace.exists() && !matches!(rec.status.code(), None | Some(1 | 101)),
        "{}",
        String::from_utf8_lossy(&rec.stderr)
    );
    let args: Vec<std::ffi::OsString> = vec![
        "replay".into(),
        trace.into_os_string(),
        "--gdb".into(),
        "127.0.0.1:0".into(),
    ];
    Nyx::start_with(&args)
}

/// The value gdb printed after `label=`.
fn printed(out: &str, label: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix(label))
        .and_then(|v| {
            let v = v.trim();
            match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).ok(),
                None => v.parse().ok(),
            }
        })
        .unwrap_or_else(|| panic!("no {label} in {out}"))
}

/// Reverse execution on the replay of the triple-faulting guest: continue
/// to the crash, step back one instruction, go back to the last hit of a
/// breakpoint, and find the instruction that last wrote a variable.
#[test]
fn reverse_execution_from_a_crash() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nyx = replay_nyx(dir.path(), "triple");
    let result = symbol("triple", "result");
    let watch = format!("watch *(int *){result:#x}");
    let show = format!("printf \"RESULT=%d\\n\", *(int *){result:#x}");
    let out = gdb(
        &nyx,
        "triple",
        &[
            "continue",
            "printf \"CRASH_PC=%#lx\\n\", $pc",
            "printf \"CRASH_EAX=%#lx\\n\", $rax",
            "reverse-stepi",
            "printf \"BACK_PC=%#lx\\n\", $pc",
            "stepi",
            "printf \"FWD_PC=%#lx\\n\", $pc",
            "break putdec32",
            "reverse-continue",
            "printf \"BP_PC=%#lx\\n\", $pc",
            "printf \"BP_EAX=%d\\n\", $eax",
            "delete",
            &watch,
            "reverse-continue",
            "printf \"WATCH_PC=%#lx\\n\", $pc",
            &show,
            "delete",
            "reverse-continue",
            "monitor when",
            "monitor info",
            "kill",
        ],
    );
    assert!(out.contains("SIGSEGV"), "the crash stops the replay: {out}");
    assert_eq!(
        printed(&out, "CRASH_PC="),
        symbol("triple", "triple_fault_here"),
        "{out}"
    );
    assert_eq!(printed(&out, "BACK_PC="), symbol("triple", "load_empty_idt"), "{out}");
    assert_eq!(printed(&out, "FWD_PC="), symbol("triple", "triple_fault_here"), "{out}");
    // The last call of putdec32 printed 12!.
    assert_eq!(printed(&out, "BP_PC="), symbol("triple", "putdec32"), "{out}");
    assert_eq!(printed(&out, "BP_EAX="), 479_001_600, "{out}");
    // Who wrote `result` last: the store of 12!, seen just before it ran.
    assert_eq!(
        printed(&out, "WATCH_PC="),
        symbol("triple", "last_result_write"),
        "{out}"
    );
    assert_eq!(printed(&out, "RESULT="), 832_040, "fib(30) before the write: {out}");
    assert!(out.contains("No more reverse-execution history"), "{out}");
    assert!(out.contains("position 0:0"), "back at the start: {out}");
    nyx.finish_cleanly();
}

/// Reverse execution across timer interrupts and keyframed landings: the
/// counter guest's third IRQ0, the instruction it interrupted, the same
/// interrupt delivered again by a forward step, the previous IRQ0 hit and
/// the store that last wrote `ticks`.
#[test]
fn reverse_execution_across_interrupts() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nyx = replay_nyx(dir.path(), "counter");
    let ticks = symbol("counter", "ticks");
    let show = format!("printf \"TICKS=%d\\n\", *(int *){ticks:#x}");
    let watch = format!("watch *(int *){ticks:#x}");
    let out = gdb(
        &nyx,
        "counter",
        &[
            "hbreak irq0",
            "continue",
            "continue",
            "continue",
            &show,
            "reverse-stepi",
            "printf \"BACK_PC=%#lx\\n\", $pc",
            "stepi",
            "printf \"FWD_PC=%#lx\\n\", $pc",
            "reverse-continue",
            "printf \"PREV_PC=%#lx\\n\", $pc",
            &show.replace("TICKS=", "PREV_TICKS="),
            "delete",
            &watch,
            "reverse-continue",
            "printf \"WATCH_PC=%#lx\\n\", $pc",
            "delete",
            "monitor seek 1200:2",
            "monitor when",
            // Back over many ticks to code run once at the start: the
            // stretches without a hit are checked by free runs.
            "hbreak long_entry",
            "reverse-continue",
            "delete",
            "continue",
            "kill",
        ],
    );
    assert!(
        out.contains(", long_entry ()"),
        "reverse-continue back to the start's code: {out}"
    );
    // Far ahead: a free run to near the target, then single steps.
    let at = out
        .lines()
        .find_map(|l| l.strip_prefix("position "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|p| p.split_once(':'))
        .map(|(e, s)| (e.parse::<u64>().unwrap_or(0), s.parse::<u64>().unwrap_or(0)))
        .unwrap_or_else(|| panic!("no position after the seek: {out}"));
    assert!(
        ((1200, 2)..(1300, 0)).contains(&at),
        "seek 1200:2 went to {at:?}: {out}"
    );
    let irq0 = symbol("counter", "irq0");
    let lp = symbol("counter", "count_loop");
    assert_eq!(printed(&out, "TICKS="), 2, "{out}");
    let back = printed(&out, "BACK_PC=");
    assert!((lp..lp + 9).contains(&back), "interrupted the loop at {back:#x}: {out}");
    assert_eq!(printed(&out, "FWD_PC="), irq0, "the same interrupt again: {out}");
    assert_eq!(printed(&out, "PREV_PC="), irq0, "{out}");
    assert_eq!(printed(&out, "PREV_TICKS="), 1, "{out}");
    let store = printed(&out, "WATCH_PC=");
    assert!((irq0..irq0 + 64).contains(&store), "the handler wrote ticks: {out}");
    assert!(out.contains("Old value = 1") && out.contains("New value = 0"), "{out}");
    assert!(out.contains("No more reverse-execution history"), "{out}");
    nyx.finish_cleanly();
}

/// A breakpoint the guest reaches while the replay searches for a landing
/// (the loop between a timer interrupt's exit and the next recorded stop)
/// stops it, and the replay goes on from there to its recorded end.
#[test]
fn breakpoints_hit_while_the_replay_searches_a_landing() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nyx = replay_nyx_with(dir.path(), "counter", &["--landings", "search"]);
    let counter = symbol("counter", "counter");
    let show = format!("printf \"COUNTER=%ld\\n\", *(long *){counter:#x}");
    let out = gdb(
        &nyx,
        "counter",
        &[
            "hbreak irq0",
            "continue",
            "continue",
            "hbreak count_loop",
            "continue",
            &show,
            "continue",
            &show,
            "delete",
            "continue",
            "kill",
        ],
    );
    assert_eq!(out.matches("Breakpoint 2, count_loop").count(), 2, "{out}");
    let values: Vec<u64> = out
        .lines()
        .filter_map(|l| l.strip_prefix("COUNTER=")?.trim().parse().ok())
        .collect();
    assert_eq!(values.len(), 2, "{out}");
    assert_eq!(values[1], values[0] + 1, "one loop iteration apart: {out}");
    let err = nyx.finish_cleanly();
    assert!(
        out.contains("No more reverse-execution history"),
        "ran to the recorded end: {out}\n{err}"
    );
    assert!(!err.contains("diverge"), "{err}");
}

/// Read and access watchpoints, checked by stepping (the debug registers of
/// emulated KVM report no data accesses): live, the loop's `incq` reads
/// `counter`; on a replay, IRQ0's load of `ticks`, forward and backward.
#[test]
fn read_and_access_watchpoints() {
    if !ready() {
        return;
    }
    let counter = symbol("counter", "counter");
    let ticks = symbol("counter", "ticks");
    let live = Nyx::start("counter");
    let out = gdb(
        &live,
        "counter",
        &[
            &format!("rwatch *(long *){counter:#x}"),
            "continue",
            "printf \"LIVE_PC=%#lx\\n\", $pc",
            "kill",
        ],
    );
    assert!(out.contains("read watchpoint 1"), "{out}");
    let lp = symbol("counter", "count_loop");
    assert_eq!(printed(&out, "LIVE_PC="), lp + 7, "after the incq: {out}");
    drop(live);

    let dir = tempfile::tempdir().unwrap();
    let nyx = replay_nyx(dir.path(), "counter");
    let out = gdb(
        &nyx,
        "counter",
        &[
            &format!("rwatch *(int *){ticks:#x}"),
            "continue",
            "continue",
            "printf \"READ_PC=%#lx\\n\", $pc",
            "reverse-continue",
            "printf \"BACK_PC=%#lx\\n\", $pc",
            "delete",
            &format!("awatch *(int *){ticks:#x}"),
            "reverse-continue",
            "kill",
        ],
    );
    let irq0 = symbol("counter", "irq0");
    // `mov ticks(%rip),%ecx` is irq0's fourth byte (after push %rax, %rcx,
    // %rdx) and is 6 bytes long.
    assert!(out.contains("Value = 1"), "the second tick read ticks = 1: {out}");
    assert_eq!(printed(&out, "READ_PC="), irq0 + 9, "{out}");
    assert_eq!(
        printed(&out, "BACK_PC="),
        irq0 + 3,
        "just before the first tick's read: {out}"
    );
    assert!(
        out.contains("No more reverse-execution history"),
        "no access before it: {out}"
    );
    nyx.finish_cleanly();
}

/// A gdb packet with its checksum.
fn packet(body: &str) -> String {
    let sum = body.bytes().fold(0u8, |a, b| a.wrapping_add(b));
    format!("${body}#{sum:02x}")
}

/// A replay's stub under random and hostile packets: reverse steps and
/// continues, monitor commands with random arguments, breakpoints at random
/// addresses, garbage between them. nyx never panics.
#[test]
fn random_packets_to_a_replay_never_make_nyx_panic() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("hello.nyxtrace");
    let rec = nyx()
        .args(["record", "--out"])
        .arg(&trace)
        .arg("--kernel")
        .arg(nyx_guests::path("hello").unwrap())
        .output()
        .unwrap();
    assert!(trace.exists(), "{}", String::from_utf8_lossy(&rec.stderr));
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for round in 0..5 {
        let args: Vec<std::ffi::OsString> = vec![
            "replay".into(),
            trace.clone().into_os_string(),
            "--gdb".into(),
            "127.0.0.1:0".into(),
        ];
        let nyx = Nyx::start_with(&args);
        let mut s = TcpStream::connect(("127.0.0.1", nyx.port)).expect("connect");
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        let mut stream = String::from("+");
        for _ in 0..12 {
            let r = xorshift(&mut seed);
            let body = match r % 9 {
                0 => "bs".to_string(),
                1 => "bc".to_string(),
                2 => format!("qRcmd,{}", hex(&format!("seek {}:{}", r % 500, (r >> 20) % 50))),
                3 => format!("qRcmd,{}", hex(&format!("restart {}", r % 4))),
                4 => format!("qRcmd,{}", hex("checkpoint")),
                5 => format!("Z1,{:x},1", r >> 8),
                6 => format!("Z2,{:x},{}", r >> 8, 1 << (r % 5)),
                7 => "vCont;s".to_string(),
                _ => (0..(r % 40)).map(|i| (b'!' + ((r >> i) % 90) as u8) as char).collect(),
            };
            stream.push_str(&packet(&body.replace(['$', '#'], "")));
        }
        let _ = s.write_all(stream.as_bytes());
        // Give the stub time to act on them before the connection closes:
        // its first answer may take long on a loaded machine (the wait is
        // bounded by END_WITHIN only to catch a stub that never answers);
        // after it, a quiet 200 ms ends the round.
        let mut sink = [0u8; 4096];
        let mut replied = 0usize;
        let until = Instant::now() + END_WITHIN;
        while Instant::now() < until {
            match std::io::Read::read(&mut s, &mut sink) {
                Ok(0) => break,
                Ok(n) => replied += n,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    if replied > 0 {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = s.shutdown(std::net::Shutdown::Both);
        drop(s);
        let (code, err) = nyx.finish();
        assert!(replied > 0, "round {round}: the stub answered nothing: {err}");
        assert!(!err.contains("panicked"), "round {round}: {err}");
        assert!(
            code.is_some_and(|c| c != 101),
            "round {round}: nyx must end on its own without a panic, status {code:?}: {err}"
        );
    }
}

/// Reverse execution across HLT: the pit guest idles in `sti; hlt` between
/// ticks. Stepping back from a tick's handler lands on the HLT it woke from,
/// stepping forward idles again and takes the same tick, and
/// reverse-continue finds the previous tick.
#[test]
fn reverse_execution_across_hlt() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nyx = replay_nyx(dir.path(), "pit");
    let ticks = symbol("pit", "ticks");
    let show = format!("printf \"TICKS=%d\\n\", *(int *){ticks:#x}");
    let out = gdb(
        &nyx,
        "pit",
        &[
            "hbreak irq0",
            "continue",
            "continue",
            "continue",
            &show,
            "reverse-stepi",
            "printf \"BACK_PC=%#lx\\n\", $pc",
            "x/1i $pc",
            "stepi",
            "printf \"FWD_PC=%#lx\\n\", $pc",
            "reverse-continue",
            &show.replace("TICKS=", "PREV_TICKS="),
            "kill",
        ],
    );
    let irq0 = symbol("pit", "irq0");
    let wait = symbol("pit", "wait_tick");
    assert_eq!(printed(&out, "TICKS="), 2, "{out}");
    let back = printed(&out, "BACK_PC=");
    assert!(
        (wait..wait + 32).contains(&back),
        "back in the idle loop at {back:#x}: {out}"
    );
    assert!(out.contains("hlt"), "the instruction before the tick is the HLT: {out}");
    assert_eq!(printed(&out, "FWD_PC="), irq0, "the same tick again: {out}");
    assert_eq!(printed(&out, "PREV_TICKS="), 1, "{out}");
    nyx.finish_cleanly();
}

/// Memory writes from gdb are undone by going back: the replayed PIT guest
/// stops in its second timer interrupt and steps over the tick count's
/// increment; gdb overwrites the count and a code byte the guest does not
/// write (so only the record of gdb's own write can bring its page back);
/// two reverse steps later both hold what they held there before, and
/// stepping on goes the recorded way. (The PIT guest idles in HLT: its
/// interrupts arrive at exits, so the replay's position is found without
/// searching a landing.)
#[test]
fn reverse_execution_undoes_a_gdb_memory_write() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nyx = replay_nyx(dir.path(), "pit");
    let ticks = symbol("pit", "ticks");
    let code = symbol("pit", "putdec64");
    let show = |label: &str| {
        format!("printf \"{label}=%d\\n{label}_CODE=%d\\n\", *(int *){ticks:#x}, *(unsigned char *){code:#x}")
    };
    let set_ticks = format!("set var *(int *){ticks:#x} = 999");
    let set_code = format!("set var *(unsigned char *){code:#x} = 0xf4");
    let out = gdb(
        &nyx,
        "pit",
        &[
            "hbreak irq0",
            "continue",
            "continue",
            &show("FIRST"),
            "delete",
            "stepi",
            "stepi",
            &show("STEPPED"),
            &set_ticks,
            &set_code,
            &show("WRITTEN"),
            "reverse-stepi",
            "reverse-stepi",
            &show("BACK"),
            "stepi",
            &show("AGAIN"),
            "kill",
        ],
    );
    let err = nyx.finish_cleanly();
    let out = format!("{out}\nnyx: {err}");
    let first = printed(&out, "FIRST=");
    let first_code = printed(&out, "FIRST_CODE=");
    assert_eq!(first, 1, "{out}");
    assert_ne!(first_code, 0xf4, "{out}");
    assert_eq!(printed(&out, "STEPPED="), first + 1, "{out}");
    assert_eq!(printed(&out, "WRITTEN="), 999, "{out}");
    assert_eq!(printed(&out, "WRITTEN_CODE="), 0xf4, "{out}");
    assert_eq!(printed(&out, "BACK="), first, "going back restores the count: {out}");
    assert_eq!(
        printed(&out, "BACK_CODE="),
        first_code,
        "going back restores the code page gdb wrote: {out}"
    );
    assert_eq!(printed(&out, "AGAIN="), first, "{out}");
}

/// Reverse execution re-runs stretches of a replay from its checkpoints:
/// the virtio guest's console line (`--virtio-console-out`) and its serial
/// output still come out once each. gdb stops before the console is set
/// up, runs on to the end (the line is written), goes back to the stop and
/// runs to the end again.
#[test]
fn a_reverse_debugged_replay_writes_virtio_console_output_once() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, nyx_guests::virtio_disk_image()).unwrap();
    let trace = dir.path().join("virtio.nyxtrace");
    let rec = nyx()
        .args(["record", "--out"])
        .arg(&trace)
        .arg("--kernel")
        .arg(nyx_guests::path("virtio").unwrap())
        .args(["--cmdline", "nyx-test arg=1", "--disk"])
        .arg(format!("{},id={}", img.display(), nyx_guests::VIRTIO_DISK_SERIAL))
        .args(["--rng", "--virtio-console"])
        .arg(format!("file:{}", dir.path().join("rec.console").display()))
        .output()
        .unwrap();
    assert_eq!(
        rec.status.code(),
        Some(nyx_guests::VIRTIO_EXIT as i32),
        "{}",
        String::from_utf8_lossy(&rec.stderr)
    );
    let (console, serial) = (dir.path().join("replay.console"), dir.path().join("replay.out"));
    let mut cmd = nyx();
    cmd.arg("replay")
        .arg(&trace)
        .args([
            "--gdb",
            "127.0.0.1:0",
            "--checkpoint-interval",
            "1",
            "--virtio-console-out",
        ])
        .arg(&console)
        .stdout(std::fs::File::create(&serial).unwrap());
    let nyx = Nyx::spawn(cmd);
    let out = gdb(
        &nyx,
        "virtio",
        &[
            "break con_test",
            "continue",
            "continue",
            "reverse-continue",
            "printf \"BACK_PC=%#lx\\n\", $pc",
            "delete",
            "continue",
            "kill",
        ],
    );
    nyx.finish_cleanly();
    assert_eq!(printed(&out, "BACK_PC="), symbol("virtio", "con_test"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&console).unwrap(),
        nyx_guests::VIRTIO_CONSOLE_OUTPUT,
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(&serial).unwrap(),
        nyx_guests::expected("virtio").unwrap().golden.unwrap(),
        "{out}"
    );
}

/// Live gdb on a 4-vCPU machine (run one vCPU at a time under gdb): four
/// threads; an AP hits a breakpoint in its lock-free loop and the stop
/// names its thread; while stopped nothing runs (the shared counter stays
/// as it is however long gdb waits: all stop); a step, and 3000 more, run
/// that same AP (gdb steps over its breakpoint in that thread);
/// thread 1 is the BSP elsewhere; the guest then runs to its end.
#[test]
fn live_gdb_on_four_vcpus_sees_threads_and_stops_them_all() {
    if !ready() {
        return;
    }
    let kernel = nyx_guests::path("smp").expect("in-tree guest");
    let mut args: Vec<std::ffi::OsString> = ["run", "--gdb", "127.0.0.1:0", "--gdb-wait", "--cpus", "4", "--kernel"]
        .iter()
        .map(Into::into)
        .collect();
    args.push(kernel.into());
    let nyx = Nyx::start_with(&args);
    let racy = symbol("smp", "racy_counter");
    let show = |label: &str| format!("printf \"{label}=%#x\\n\", *(int *){racy:#x}");
    let (first, second) = (show("COUNT1"), show("COUNT2"));
    let out = gdb(
        &nyx,
        "smp",
        &[
            "info threads",
            "break racy_store",
            "continue",
            "printf \"HIT_TID=%d\\n\", $_thread",
            "printf \"HIT_PC=%#lx\\n\", $pc",
            &first,
            "shell sleep 0.5",
            &second,
            "info threads",
            "stepi",
            "printf \"STEP_TID=%d\\n\", $_thread",
            "printf \"STEP_PC=%#lx\\n\", $pc",
            "stepi 3000",
            "printf \"STEPS_TID=%d\\n\", $_thread",
            "thread 1",
            "printf \"BSP_PC=%#lx\\n\", $pc",
            "delete",
            "continue",
        ],
    );
    for t in 1..=4 {
        assert!(out.contains(&format!("Thread 1.{t}")), "thread {t} listed: {out}");
    }
    let hit = printed(&out, "HIT_TID=");
    assert!((2..=4).contains(&hit), "an AP hits racy_store, not thread {hit}: {out}");
    assert_eq!(printed(&out, "HIT_PC="), symbol("smp", "racy_store"), "{out}");
    assert_eq!(
        printed(&out, "COUNT1="),
        printed(&out, "COUNT2="),
        "nothing runs while gdb holds the machine: {out}"
    );
    assert_eq!(printed(&out, "STEP_TID="), hit, "a step runs the stopped AP: {out}");
    assert_eq!(
        printed(&out, "STEPS_TID="),
        hit,
        "3000 more steps stay on that AP (no switch while stepping): {out}"
    );
    let step = printed(&out, "STEP_PC=");
    assert!(
        step > symbol("smp", "racy_store") && step < symbol("smp", "racy_store") + 16,
        "the step went one instruction on: {step:#x} {out}"
    );
    assert_ne!(printed(&out, "BSP_PC="), symbol("smp", "racy_store"), "{out}");
    assert!(out.contains("exited with code 0137"), "the guest ran to its end: {out}");
    nyx.finish_cleanly();
}

/// Four vCPUs recorded one at a time (`smp`): gdb on the replay sees a
/// thread per vCPU (the APs at their reset vector until started), stops in
/// the AP that hits a breakpoint and names its thread, reads the BSP's
/// registers as thread 1, runs to the end, and reverse-continues across
/// vCPU switches to the lock-free store that wrote the final racy total,
/// in the AP (thread) that made it.
#[test]
fn threads_and_reverse_execution_across_vcpu_switches() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cpus = nyx_guests::SMP_CPUS.to_string();
    let nyx = replay_nyx_with(
        dir.path(),
        "smp",
        &["--cpus", &cpus, "--cmdline", nyx_guests::GOLDEN_APPEND],
    );
    let racy = symbol("smp", "racy_counter");
    let show = format!("printf \"RACY=%#x\\n\", *(int *){racy:#x}");
    let watch = format!("watch *(int *){racy:#x}");
    let out = gdb(
        &nyx,
        "smp",
        &[
            "info threads",
            "break ap_entry64",
            "continue",
            "printf \"AP_PC=%#lx\\n\", $pc",
            "thread 1",
            "printf \"BSP_PC=%#lx\\n\", $pc",
            "delete",
            "continue",
            &show,
            &watch,
            "reverse-continue",
            "printf \"STORE_PC=%#lx\\n\", $pc",
            "printf \"STORE_APIC=%d\\n\", $rbx",
            "printf \"STORE_EAX=%#x\\n\", $eax",
            "kill",
        ],
    );
    for t in 1..=4 {
        assert!(out.contains(&format!("Thread 1.{t}")), "thread {t} listed: {out}");
    }
    assert!(
        out.contains("0x000000000000fff0 in ??"),
        "APs wait at the reset vector: {out}"
    );
    assert_eq!(printed(&out, "AP_PC="), symbol("smp", "ap_entry64"), "{out}");
    let hit = out
        .lines()
        .find_map(|l| l.strip_prefix("Thread ").and_then(|r| r.split_once(" hit Breakpoint")))
        .map(|(t, _)| t.trim().parse::<u64>().unwrap())
        .unwrap_or_else(|| panic!("no thread hit the breakpoint: {out}"));
    assert!((2..=4).contains(&hit), "an AP hits ap_entry64, not thread {hit}: {out}");
    assert_ne!(
        printed(&out, "BSP_PC="),
        symbol("smp", "ap_entry64"),
        "thread 1 is the BSP: {out}"
    );
    // The store that wrote the final racy total, stopped just before it
    // runs: its EAX holds that total, its RBX the AP's APIC ID.
    let total = printed(&out, "RACY=");
    assert_eq!(printed(&out, "STORE_PC="), symbol("smp", "racy_store"), "{out}");
    assert_eq!(printed(&out, "STORE_EAX="), total, "{out}");
    let apic = printed(&out, "STORE_APIC=");
    assert!((1..=3).contains(&apic), "{out}");
    assert!(
        out.contains(&format!("Thread {} hit Hardware watchpoint", apic + 1)),
        "the stop names the AP's thread: {out}"
    );
    nyx.finish_cleanly();
}
