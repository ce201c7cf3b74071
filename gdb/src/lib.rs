//! nyx-gdb: the gdb remote-protocol stub of Nyx, over a live machine or a
//! replayed one; on a replay gdb also runs backwards (`reverse-stepi`,
//! `reverse-continue`) through the replayer's timeline. How it fits with
//! the other crates: ARCHITECTURE.md at the repository root.
//!
//! `listen` opens the TCP socket (loopback only unless remote access is
//! allowed), `GdbServer::accept` waits for gdb (or
//! `GdbServer::run_until_attach` runs a live guest until gdb comes), and
//! `serve`/`serve_replay` run the gdbstub protocol loop until gdb
//! detaches, kills or the guest ends. The target is built from one file per
//! protocol feature: `arch.rs` (the x86-64 register set and target
//! description), `regs.rs` (registers to and from KVM), `breakpoints.rs`,
//! `monitor.rs` (`monitor when|seek|checkpoint|restart`), and
//! `event_loop.rs` (running the machine, Ctrl-C).
//!
//! After a detach the guest runs on without breakpoints to its end. A kill
//! ends the session at once. A replay stays at its end so that gdb can go
//! back from there.
//!
//! Notes: addresses are linear (RIP where CS's base is 0). Registers are
//! always the 64-bit set; gdb's `i386:x86-64` disassembles 32-bit code as
//! 64-bit (`set architecture i386` for `x/i` there). On a live guest
//! ([`ServeOptions::int3_in_memory`], what `nyx run --gdb` uses) software
//! breakpoints are int3 bytes in memory, as many as wanted: on hardware KVM
//! they exit as #BP, on emulated KVM as the emulation failure that Nyx's
//! software-interrupt delivery turns into a debug stop; an int3 that is not
//! gdb's is delivered to the guest. An address not mapped yet gets a debug
//! register. In a replay, whose memory must stay as recorded, breakpoints
//! use the debug registers: at most four breakpoints and watchpoints
//! together. Emulated KVM never reports data
//! breakpoints, so watchpoints are checked by single-stepping
//! ([`ServeOptions::step_watchpoints`]): a write watchpoint stops when the
//! watched bytes change, a read or access watchpoint after an instruction
//! whose decoded memory operand touches them (implicit stack accesses are
//! not seen). In a replay the landing search keeps gdb's breakpoints armed
//! and takes a free debug register for itself (or single-steps when none
//! is free), so a breakpoint is not missed while a landing is searched.

mod arch;
mod breakpoints;
mod event_loop;
mod monitor;
mod regs;
mod target;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use gdbstub::stub::{DisconnectReason, GdbStub};
use nyx_vmm::hooks::HookError;
use nyx_vmm::machine::Stop;
use nyx_vmm::{Machine, RunOutcome};

pub use arch::{NyxX86_64, X86Regs, REG_NAMES, TARGET_XML};
pub use monitor::{parse as parse_monitor, Command as MonitorCommand};
pub use target::NyxTarget;

/// Errors of the gdb stub.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listen address cannot be parsed.
    #[error("bad gdb address '{0}': give HOST:PORT or :PORT, e.g. 127.0.0.1:1234")]
    BadAddress(String),
    /// A non-loopback address without permission.
    #[error("refusing to listen for gdb on {0}: anyone who can reach it controls the guest; pass --gdb-allow-remote to allow it")]
    NotLoopback(SocketAddr),
    /// The socket could not be opened.
    #[error("cannot listen for gdb on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Accepting or talking to gdb failed.
    #[error("gdb connection: {0}")]
    Connection(String),
    /// A KVM call failed.
    #[error("KVM refused {what}: {source}")]
    Kvm {
        /// The call.
        what: &'static str,
        /// What the kernel said.
        source: kvm_ioctls::Error,
    },
    /// The machine failed.
    #[error(transparent)]
    Machine(#[from] nyx_vmm::machine::Error),
    /// A request the stub cannot satisfy.
    #[error("{0}")]
    Protocol(String),
}

/// How a debugging session ended.
#[derive(Debug)]
pub enum DebugEnd {
    /// The guest ran to its end (under gdb or after a detach).
    Ended(RunOutcome),
    /// The run mode stopped the machine (a replay's trace ended or diverged).
    Stopped(HookError),
    /// gdb killed the guest.
    Killed,
}

/// Parses a listen address: `HOST:PORT`, or `:PORT` for 127.0.0.1. A
/// non-loopback host is refused unless `allow_remote`.
pub fn parse_addr(spec: &str, allow_remote: bool) -> Result<SocketAddr, Error> {
    let addr = nyx_vmm::net::parse_addr(spec).ok_or_else(|| Error::BadAddress(spec.to_string()))?;
    nyx_vmm::net::check_local(addr, allow_remote, "--gdb-allow-remote").map_err(|e| Error::NotLoopback(e.addr))
}

/// A socket gdb can connect to.
pub struct GdbServer {
    listener: TcpListener,
}

/// Opens the gdb socket at `spec` (see [`parse_addr`]).
pub fn listen(spec: &str, allow_remote: bool) -> Result<GdbServer, Error> {
    let addr = parse_addr(spec, allow_remote)?;
    let listener = TcpListener::bind(addr).map_err(|source| Error::Listen { addr, source })?;
    Ok(GdbServer { listener })
}

impl GdbServer {
    /// The address it listens on (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.listener.local_addr().map_err(|e| Error::Connection(e.to_string()))
    }

    /// Waits for gdb to connect.
    pub fn accept(&self) -> Result<TcpStream, Error> {
        accept_on(&self.listener)
    }

    /// Runs a live `machine` until gdb connects, then stops it where it is
    /// (the next stop after a kick) and hands over the connection; or
    /// until the guest ends. Call it on the thread that runs the machine.
    pub fn run_until_attach(&self, machine: &mut Machine) -> Result<Attach, Error> {
        let kicker = machine.kicker()?;
        let listener = self
            .listener
            .try_clone()
            .map_err(|e| Error::Connection(e.to_string()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                if event_loop::readable(listener.as_raw_fd(), 20) {
                    let conn = accept_on(&listener);
                    let _ = tx.send(conn);
                    kicker.kick();
                    return;
                }
            }
        });
        let end = loop {
            if let Ok(conn) = rx.try_recv() {
                break conn.map(Attach::Connected);
            }
            match machine.resume() {
                Ok(Stop::Ended(outcome)) => break Ok(Attach::Ended(DebugEnd::Ended(outcome))),
                Ok(Stop::Debug(_) | Stop::Paused | Stop::Interrupted) => {}
                Err(nyx_vmm::machine::Error::Hook(e)) => break Ok(Attach::Ended(DebugEnd::Stopped(e))),
                Err(e) => break Err(e.into()),
            }
        };
        stop.store(true, Ordering::SeqCst);
        let _ = waiter.join();
        end
    }
}

/// What [`GdbServer::run_until_attach`] ended with.
#[derive(Debug)]
pub enum Attach {
    /// gdb connected; the machine is stopped where it was.
    Connected(TcpStream),
    /// The guest ended (or its run mode stopped it) before gdb came.
    Ended(DebugEnd),
}

fn accept_on(listener: &TcpListener) -> Result<TcpStream, Error> {
    let (s, peer) = listener.accept().map_err(|e| Error::Connection(e.to_string()))?;
    tracing::info!("gdb connected from {peer}");
    s.set_nodelay(true).map_err(|e| Error::Connection(e.to_string()))?;
    Ok(s)
}

/// Options of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeOptions {
    /// Software breakpoints write int3 into guest memory. False (a replay,
    /// whose memory must stay as recorded): they use debug registers, at
    /// most four breakpoints and watchpoints together.
    pub int3_in_memory: bool,
    /// Watchpoints are also checked by single-stepping (slow: a live guest
    /// takes no interrupts while a watchpoint is set): a write watchpoint
    /// by comparing the watched bytes after each instruction, a read or
    /// access watchpoint by decoding each instruction's memory operands.
    /// Needed where KVM's debug registers do not report data accesses, as
    /// on emulated KVM.
    pub step_watchpoints: bool,
}

impl Default for ServeOptions {
    /// What works on every KVM: breakpoints in debug registers, write
    /// watchpoints checked by stepping.
    fn default() -> Self {
        ServeOptions {
            int3_in_memory: false,
            step_watchpoints: true,
        }
    }
}

/// Runs the gdb protocol over `conn` on `machine` until gdb detaches or
/// kills it or the guest ends. Call it on the thread that runs the machine.
pub fn serve(machine: &mut Machine, conn: TcpStream, opts: ServeOptions) -> Result<DebugEnd, Error> {
    let target = NyxTarget::new(machine, opts)?;
    serve_target(target, conn)
}

/// Runs the gdb protocol over `conn` on a replayed `machine` with its
/// `timeline`: gdb can also run it backwards (`reverse-stepi`,
/// `reverse-continue`) and `monitor seek|checkpoint|restart` move in it.
/// The replay stays at its end (a crash reports SIGSEGV, a trace's end
/// "no more history") so that gdb can go back from there.
pub fn serve_replay(
    machine: &mut Machine,
    timeline: &mut nyx_replayer::Timeline,
    conn: TcpStream,
    opts: ServeOptions,
) -> Result<DebugEnd, Error> {
    let target = NyxTarget::with_timeline(machine, timeline, opts)?;
    serve_target(target, conn)
}

fn serve_target(mut target: NyxTarget<'_>, conn: TcpStream) -> Result<DebugEnd, Error> {
    let stub = GdbStub::new(conn);
    let result = stub.run_blocking::<event_loop::NyxEventLoop<'_>>(&mut target);
    let detached = match result {
        Ok(DisconnectReason::Kill) => return Ok(DebugEnd::Killed),
        Ok(DisconnectReason::Disconnect) => true,
        Ok(DisconnectReason::TargetExited(_) | DisconnectReason::TargetTerminated(_)) => false,
        Err(e) => {
            if e.is_target_error() {
                return Err(e
                    .into_target_error()
                    .unwrap_or_else(|| Error::Protocol("target error".into())));
            }
            // gdb went away or sent garbage: carry on as after a detach.
            eprintln!("nyx: gdb connection ended: {e}; the guest runs on without gdb");
            true
        }
    };
    if let Some(end) = target.end.take() {
        return Ok(end);
    }
    if let Some(ending) = target.timeline.as_deref().and_then(|t| t.ending().cloned()) {
        return Ok(match ending {
            nyx_replayer::timeline::Ending::Outcome(o) => DebugEnd::Ended(o),
            nyx_replayer::timeline::Ending::TraceEnd => DebugEnd::Stopped(HookError::TraceEnd {
                position: target.machine.exit_seq(),
            }),
        });
    }
    if !detached {
        return Err(Error::Protocol("the guest ended without an outcome".into()));
    }
    target.clear_all()?;
    let machine = target.machine;
    match machine.run() {
        Ok(outcome) => Ok(DebugEnd::Ended(outcome)),
        Err(nyx_vmm::machine::Error::Hook(e)) => Ok(DebugEnd::Stopped(e)),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_addr(":1234", false).unwrap(), "127.0.0.1:1234".parse().unwrap());
        assert_eq!(parse_addr("127.0.0.1:9", false).unwrap().port(), 9);
        assert_eq!(parse_addr("[::1]:9", false).unwrap().port(), 9);
        assert!(matches!(parse_addr("0.0.0.0:1234", false), Err(Error::NotLoopback(_))));
        assert!(parse_addr("0.0.0.0:1234", true).is_ok());
        assert!(matches!(parse_addr("1234", false), Err(Error::BadAddress(_))));
        assert!(matches!(parse_addr(":99999", false), Err(Error::BadAddress(_))));
    }

    #[test]
    fn listens_on_a_chosen_port() {
        let s = listen("127.0.0.1:0", false).unwrap();
        let a = s.local_addr().unwrap();
        assert_ne!(a.port(), 0);
        assert!(TcpStream::connect(a).is_ok());
    }
}
