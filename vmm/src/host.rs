//! The host side of the outside-input traits for a plain `nyx run`: the
//! monotonic clock, the system date, stdin or a file as serial input, stdout
//! as serial output. This is the only place a plain run reads the host; the
//! recorder and replayer put their own implementations in its place.

use std::io::{self, Read, Write};
use std::sync::mpsc::{self, Receiver, TryRecvError};

use nyx_devices::{Clock, Input, WallClock};

use crate::kick::monotonic_ns;

/// Virtual time = host monotonic time since the clock was created.
#[derive(Debug, Clone, Copy)]
pub struct HostClock {
    origin_ns: u64,
}

impl HostClock {
    /// A clock at 0 now.
    pub fn new() -> Self {
        HostClock {
            origin_ns: monotonic_ns(),
        }
    }

    /// The host monotonic time at which virtual time is `virt_ns`.
    pub fn host_time_of(&self, virt_ns: u64) -> u64 {
        self.origin_ns.saturating_add(virt_ns)
    }
}

impl Default for HostClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for HostClock {
    fn now_ns(&self) -> u64 {
        monotonic_ns().saturating_sub(self.origin_ns)
    }
}

/// The host's date.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostWallClock;

impl WallClock for HostWallClock {
    fn unix_seconds(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }
}

/// Bytes read from a blocking reader (stdin) by a helper thread, served
/// without blocking.
#[derive(Debug)]
pub struct ThreadInput {
    rx: Receiver<Vec<u8>>,
    pending: Vec<u8>,
    closed: bool,
}

impl ThreadInput {
    /// Starts a thread that reads `reader` until end of file.
    pub fn spawn<R: Read + Send + 'static>(reader: R) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("nyx-serial-in".into())
            .spawn(move || pump(reader, &tx))
            .map(|_| ())
            .unwrap_or_else(|e| tracing::warn!("serial input thread not started: {e}"));
        ThreadInput {
            rx,
            pending: Vec::new(),
            closed: false,
        }
    }
}

impl ThreadInput {
    /// Starts a thread that opens `path` (a FIFO waits there for its
    /// writer) and reads it until end of file; the guest runs meanwhile.
    pub fn open(path: std::path::PathBuf) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("nyx-serial-in".into())
            .spawn(move || match std::fs::File::open(&path) {
                Ok(f) => pump(f, &tx),
                Err(e) => tracing::warn!("serial input {}: {e}; the guest gets no input", path.display()),
            })
            .map(|_| ())
            .unwrap_or_else(|e| tracing::warn!("serial input thread not started: {e}"));
        ThreadInput {
            rx,
            pending: Vec::new(),
            closed: false,
        }
    }
}

/// Sends what `reader` yields to `tx` until end of file, an error or a
/// receiver that is gone.
fn pump<R: Read>(mut reader: R, tx: &mpsc::Sender<Vec<u8>>) {
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
            Ok(n) => {
                if tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        }
    }
}

impl Input for ThreadInput {
    fn read_available(&mut self, buf: &mut [u8]) -> usize {
        while self.pending.len() < buf.len() && !self.closed {
            match self.rx.try_recv() {
                Ok(mut v) => self.pending.append(&mut v),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => self.closed = true,
            }
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending[..n]);
        self.pending.drain(..n);
        n
    }

    fn is_exhausted(&self) -> bool {
        self.closed && self.pending.is_empty()
    }
}

/// Platform events (power button, lid, battery, temperature) queued by
/// the control socket for the ACPI PM device, which takes them at its next
/// poll. Clones share the queue. While [`PlatformQueue::set_open`] says a
/// control socket may still send, an idle guest waits for it instead of
/// ending as halted.
#[derive(Debug, Clone, Default)]
pub struct PlatformQueue(std::sync::Arc<std::sync::Mutex<(std::collections::VecDeque<u8>, bool)>>);

impl PlatformQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, (std::collections::VecDeque<u8>, bool)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an event's encoded bytes.
    pub fn push(&self, bytes: &[u8]) {
        self.lock().0.extend(bytes);
    }

    /// Whether more events may still be queued (a control socket listens).
    pub fn set_open(&self, open: bool) {
        self.lock().1 = open;
    }
}

impl Input for PlatformQueue {
    fn read_available(&mut self, buf: &mut [u8]) -> usize {
        let mut q = self.lock();
        let n = buf.len().min(q.0.len());
        for (b, v) in buf.iter_mut().zip(q.0.drain(..n)) {
            *b = v;
        }
        n
    }

    fn is_exhausted(&self) -> bool {
        let q = self.lock();
        q.0.is_empty() && !q.1
    }
}

/// Guest serial output to the host's stdout, flushed at every write so that
/// a prompt without a newline shows at once.
#[derive(Debug, Default)]
pub struct StdoutSink;

impl Write for StdoutSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_clock_moves_forward() {
        let c = HostClock::new();
        let a = c.now_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = c.now_ns();
        assert!(b >= a + 1_000_000, "{a} {b}");
        assert!(c.host_time_of(b) >= b);
    }

    #[test]
    fn thread_input_serves_everything_then_reports_exhaustion() {
        let mut i = ThreadInput::spawn(io::Cursor::new(b"abcdef".to_vec()));
        let mut got = Vec::new();
        let start = monotonic_ns();
        while !i.is_exhausted() {
            let mut b = [0u8; 4];
            let n = i.read_available(&mut b);
            got.extend_from_slice(&b[..n]);
            assert!(monotonic_ns() - start < 5_000_000_000);
        }
        assert_eq!(got, b"abcdef");
    }

    #[test]
    fn wall_clock_is_after_2020() {
        assert!(HostWallClock.unix_seconds() > 1_577_836_800);
    }
}
