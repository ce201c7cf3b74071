//! The blocking event loop: runs the machine while a watcher thread waits
//! for data from gdb (Ctrl-C arrives as byte 0x03) and kicks the vCPU when
//! some comes, so that gdb can interrupt a running guest.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use gdbstub::common::Signal;
use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::stub::run_blocking::{BlockingEventLoop, Event, WaitForStopReasonError};
use gdbstub::stub::MultiThreadStopReason;
use gdbstub::target::Target;
use nyx_vmm::kick::Kicker;

use crate::target::{NyxTarget, RunStop};

/// How long the watcher waits in one poll before it looks at its stop flag.
const WATCH_POLL_MS: i32 = 20;

/// Whether `fd` has data (or a hang-up) within `timeout_ms`.
pub(crate) fn readable(fd: i32, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    n > 0 && p.revents != 0
}

/// A thread that kicks the machine when gdb sends something.
struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    fn start(fd: i32, kicker: Kicker) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                if readable(fd, WATCH_POLL_MS) {
                    kicker.kick();
                    return;
                }
            }
        });
        Watcher {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The event loop type for `GdbStub::run_blocking`.
pub struct NyxEventLoop<'m>(std::marker::PhantomData<&'m ()>);

impl<'m> BlockingEventLoop for NyxEventLoop<'m> {
    type Target = NyxTarget<'m>;
    type Connection = TcpStream;
    type StopReason = MultiThreadStopReason<u64>;

    #[allow(clippy::type_complexity)]
    fn wait_for_stop_reason(
        target: &mut NyxTarget<'m>,
        conn: &mut TcpStream,
    ) -> Result<
        Event<Self::StopReason>,
        WaitForStopReasonError<<Self::Target as Target>::Error, <Self::Connection as Connection>::Error>,
    > {
        let fd = conn.as_raw_fd();
        loop {
            if readable(fd, 0) {
                let byte = conn.read().map_err(WaitForStopReasonError::Connection)?;
                return Ok(Event::IncomingData(byte));
            }
            let watcher = Watcher::start(fd, target.kicker.clone());
            let r = target.run();
            drop(watcher);
            match r.map_err(WaitForStopReasonError::Target)? {
                RunStop::Reason(reason) => {
                    let tid = crate::target::tid_of_vcpu(target.machine.current_vcpu());
                    return Ok(Event::TargetStopped(crate::target::thread_stop(reason, tid)));
                }
                // A kick without data was late for an earlier stop: run on.
                RunStop::Interrupted => continue,
            }
        }
    }

    fn on_interrupt(target: &mut NyxTarget<'m>) -> Result<Option<Self::StopReason>, <Self::Target as Target>::Error> {
        // The machine is already stopped: wait_for_stop_reason returned.
        Ok(Some(MultiThreadStopReason::SignalWithThread {
            tid: crate::target::tid_of_vcpu(target.machine.current_vcpu()),
            signal: Signal::SIGINT,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn readable_sees_data_and_hangups() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        assert!(!readable(b.as_raw_fd(), 0));
        std::io::Write::write_all(&mut a, &[3]).unwrap();
        assert!(readable(b.as_raw_fd(), 1000));
        let mut one = [0u8; 1];
        std::io::Read::read_exact(&mut &b, &mut one).unwrap();
        assert!(!readable(b.as_raw_fd(), 0));
        drop(a);
        assert!(readable(b.as_raw_fd(), 1000), "a hang-up wakes the watcher too");
    }
}
