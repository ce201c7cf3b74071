//! Serial consoles: where COM1's output goes and its input comes from, in
//! the forms QEMU's `-serial` takes: `stdio`, `file:PATH` (output only),
//! `unix:PATH[,server]`, `tcp:HOST:PORT[,server]` and `pty`.
//!
//! A client (`unix:PATH`, `tcp:HOST:PORT`) connects before the guest starts;
//! a server listens and waits there for one connection. A TCP console is
//! loopback-only unless remote hosts are allowed ([`crate::net`]). A pty
//! console keeps its own descriptor of the terminal open, so a program may
//! open and close it at any time; output nobody reads is dropped when the
//! terminal's buffer is full rather than stopping the guest.
//!
//! The input side is an ordinary [`SerialIn::Stream`]: in a recording the
//! recorder logs its bytes where the guest consumes them, and a replay
//! needs no console at all.

use std::fs::File;
use std::io::{self, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use crate::host::{StdoutSink, ThreadInput};
use crate::machine::SerialIn;

/// A parsed `--serial` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleSpec {
    /// Input from stdin, output to stdout.
    Stdio,
    /// Output to a file (created or truncated); no input.
    File(PathBuf),
    /// A Unix socket: connect to it, or listen on it for one connection.
    Unix {
        /// The socket's path.
        path: PathBuf,
        /// Listen instead of connecting.
        server: bool,
    },
    /// A TCP connection: connect to HOST:PORT, or listen for one.
    Tcp {
        /// HOST:PORT as given.
        addr: String,
        /// Listen instead of connecting.
        server: bool,
    },
    /// A new pseudo-terminal; its name is announced.
    Pty,
}

/// What is wrong with a console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The spec is not one of the forms.
    #[error("bad serial console {0:?}: use stdio, file:PATH, unix:PATH[,server], tcp:HOST:PORT[,server] or pty")]
    Bad(String),
    /// A TCP console on a remote address without permission.
    #[error("serial console: {0}")]
    Remote(#[from] crate::net::NotLoopback),
    /// Opening, connecting, listening or accepting failed.
    #[error("serial console {spec}: {source}")]
    Io {
        /// The console.
        spec: String,
        /// Why.
        source: io::Error,
    },
}

impl ConsoleSpec {
    /// Parses a `--serial` value.
    pub fn parse(spec: &str) -> Result<Self, ConsoleError> {
        let bad = || ConsoleError::Bad(spec.to_string());
        let (body, server) = match spec.strip_suffix(",server") {
            Some(b) => (b, true),
            None => (spec, false),
        };
        let kind = body.split_once(':').map_or(body, |(k, _)| k);
        let rest = body.split_once(':').map(|(_, r)| r);
        let c = match (kind, rest) {
            ("stdio", None) => ConsoleSpec::Stdio,
            ("pty", None) => ConsoleSpec::Pty,
            ("file", Some(p)) if !p.is_empty() => ConsoleSpec::File(p.into()),
            ("unix", Some(p)) if !p.is_empty() => ConsoleSpec::Unix { path: p.into(), server },
            ("tcp", Some(a)) if crate::net::parse_addr(a).is_some() => ConsoleSpec::Tcp {
                addr: a.to_string(),
                server,
            },
            _ => return Err(bad()),
        };
        let takes_server = matches!(c, ConsoleSpec::Unix { .. } | ConsoleSpec::Tcp { .. });
        if server && !takes_server {
            return Err(bad());
        }
        Ok(c)
    }
}

/// An open console: the serial port's input and output.
pub struct Console {
    /// Input for [`crate::MachineBuilder::serial_in`] (`None` for `file:`).
    pub input: SerialIn,
    /// Output for [`crate::MachineBuilder::serial_out`].
    pub output: Box<dyn Write + Send>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("input", &self.input)
            .finish_non_exhaustive()
    }
}

/// Opens `spec`: connects, or listens and waits for one connection (after
/// calling `announce` with where), or creates the pty (and announces its
/// name). A TCP console must be loopback unless `allow_remote`.
pub fn open(spec: &ConsoleSpec, allow_remote: bool, announce: &mut dyn FnMut(&str)) -> Result<Console, ConsoleError> {
    let io_err = |what: String| move |source| ConsoleError::Io { spec: what, source };
    match spec {
        ConsoleSpec::Stdio => Ok(Console {
            input: SerialIn::Stdin,
            output: Box::new(StdoutSink),
        }),
        ConsoleSpec::File(p) => {
            let f = File::create(p).map_err(io_err(format!("file:{}", p.display())))?;
            Ok(Console {
                input: SerialIn::None,
                output: Box::new(f),
            })
        }
        ConsoleSpec::Unix { path, server } => {
            let name = format!("unix:{}", path.display());
            let stream = if *server {
                // A socket file left by an earlier run would make bind fail.
                if std::fs::symlink_metadata(path).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    let _ = std::fs::remove_file(path);
                }
                let l = UnixListener::bind(path).map_err(io_err(name.clone()))?;
                announce(&format!("serial console waiting for a connection on {name}"));
                l.accept().map_err(io_err(name.clone()))?.0
            } else {
                UnixStream::connect(path).map_err(io_err(name.clone()))?
            };
            let out = stream.try_clone().map_err(io_err(name))?;
            Ok(Console {
                input: SerialIn::Stream(Box::new(ThreadInput::spawn(stream))),
                output: Box::new(out),
            })
        }
        ConsoleSpec::Tcp { addr, server } => {
            let name = format!("tcp:{addr}");
            let a = crate::net::parse_addr(addr).ok_or_else(|| ConsoleError::Bad(name.clone()))?;
            let a = crate::net::check_local(a, allow_remote, "--serial-allow-remote")?;
            let stream = if *server {
                let l = TcpListener::bind(a).map_err(io_err(name.clone()))?;
                let local = l.local_addr().map_err(io_err(name.clone()))?;
                announce(&format!("serial console waiting for a connection on tcp:{local}"));
                l.accept().map_err(io_err(name.clone()))?.0
            } else {
                TcpStream::connect(a).map_err(io_err(name.clone()))?
            };
            let _ = stream.set_nodelay(true);
            let out = stream.try_clone().map_err(io_err(name))?;
            Ok(Console {
                input: SerialIn::Stream(Box::new(ThreadInput::spawn(stream))),
                output: Box::new(out),
            })
        }
        ConsoleSpec::Pty => {
            let pty = Pty::open().map_err(io_err("pty".into()))?;
            announce(&format!("serial console on {}", pty.name.display()));
            let reader = pty.reader().map_err(io_err("pty".into()))?;
            Ok(Console {
                input: SerialIn::Stream(Box::new(ThreadInput::spawn(reader))),
                output: Box::new(pty),
            })
        }
    }
}

/// The master side of a pseudo-terminal in raw mode, holding its slave
/// open so that the master never reads end of file between two programs
/// using the terminal.
struct Pty {
    master: File,
    _slave: OwnedFd,
    name: PathBuf,
}

impl Pty {
    fn open() -> io::Result<Self> {
        let last = || io::Error::last_os_error();
        // SAFETY: posix_openpt returns a new descriptor or -1.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(last());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let master = unsafe { File::from_raw_fd(fd) };
        // SAFETY: plain calls on the master descriptor.
        if unsafe { libc::grantpt(fd) } != 0 || unsafe { libc::unlockpt(fd) } != 0 {
            return Err(last());
        }
        let mut buf = [0 as libc::c_char; 128];
        // SAFETY: ptsname_r writes a NUL-terminated name into `buf`.
        let r = unsafe { libc::ptsname_r(fd, buf.as_mut_ptr(), buf.len()) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        // SAFETY: NUL-terminated by ptsname_r.
        let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
        let name = PathBuf::from(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(
            name.to_bytes(),
        ));
        // SAFETY: a NUL-terminated path; the result is checked.
        let sfd = unsafe { libc::open(buf.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        if sfd < 0 {
            return Err(last());
        }
        // SAFETY: `sfd` is a new descriptor that nothing else owns.
        let slave = unsafe { OwnedFd::from_raw_fd(sfd) };
        // Raw mode: bytes go through unchanged, without echo or line editing.
        // SAFETY: termios is plain data filled in by tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and pointer.
        if unsafe { libc::tcgetattr(slave.as_raw_fd(), &mut t) } != 0 {
            return Err(last());
        }
        // SAFETY: valid pointer.
        unsafe { libc::cfmakeraw(&mut t) };
        // SAFETY: valid descriptor and pointer.
        if unsafe { libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t) } != 0 {
            return Err(last());
        }
        Ok(Pty {
            master,
            _slave: slave,
            name,
        })
    }

    /// A second descriptor of the master for the input thread; the output
    /// side writes without blocking.
    fn reader(&self) -> io::Result<File> {
        let r = self.master.try_clone()?;
        Ok(r)
    }
}

impl Write for Pty {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let fd = self.master.as_raw_fd();
        // A write of one byte when poll says there is room does not block
        // (a longer one could wait for the rest); the guest writes bytes
        // one at a time anyway.
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut p, 1, 0) };
        if ready <= 0 || p.revents & libc::POLLOUT == 0 {
            // Nobody reads the terminal and its buffer is full: drop.
            return Ok(buf.len());
        }
        self.master.write(&buf[..buf.len().min(1)])
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Read;

    #[test]
    fn every_form_parses() {
        assert_eq!(ConsoleSpec::parse("stdio").unwrap(), ConsoleSpec::Stdio);
        assert_eq!(ConsoleSpec::parse("pty").unwrap(), ConsoleSpec::Pty);
        assert_eq!(
            ConsoleSpec::parse("file:/tmp/x").unwrap(),
            ConsoleSpec::File("/tmp/x".into())
        );
        assert_eq!(
            ConsoleSpec::parse("unix:/tmp/s,server").unwrap(),
            ConsoleSpec::Unix {
                path: "/tmp/s".into(),
                server: true
            }
        );
        assert_eq!(
            ConsoleSpec::parse("tcp:127.0.0.1:4555").unwrap(),
            ConsoleSpec::Tcp {
                addr: "127.0.0.1:4555".into(),
                server: false
            }
        );
        for bad in [
            "",
            "std",
            "stdio,server",
            "pty,server",
            "file:",
            "file:x,server",
            "unix:",
            "tcp:",
            "tcp:host",
            "tcp:1:99999",
            "vc",
            "null:",
        ] {
            assert!(ConsoleSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_remote_tcp_console_needs_permission() {
        let spec = ConsoleSpec::parse("tcp:0.0.0.0:0,server").unwrap();
        let e = open(&spec, false, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("--serial-allow-remote"), "{e}");
    }

    #[test]
    fn a_tcp_server_console_carries_both_ways() {
        let spec = ConsoleSpec::parse("tcp:127.0.0.1:0,server").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let client = std::thread::spawn(move || {
            let said: String = rx.recv().unwrap();
            let addr = said.rsplit_once("tcp:").unwrap().1.to_string();
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"in").unwrap();
            let mut got = [0u8; 3];
            s.read_exact(&mut got).unwrap();
            got
        });
        let mut c = open(&spec, false, &mut |s| tx.send(s.to_string()).unwrap()).unwrap();
        c.output.write_all(b"out").unwrap();
        assert_eq!(&client.join().unwrap(), b"out");
        let SerialIn::Stream(mut input) = c.input else {
            panic!("a socket console has input")
        };
        let mut got = Vec::new();
        let start = std::time::Instant::now();
        while got.len() < 2 {
            let mut b = [0u8; 8];
            let n = input.read_available(&mut b);
            got.extend_from_slice(&b[..n]);
            assert!(start.elapsed().as_secs() < 10, "no input");
        }
        assert_eq!(got, b"in");
    }

    #[test]
    fn a_pty_console_is_raw_and_drops_output_nobody_reads() {
        let mut announced = String::new();
        let mut c = open(&ConsoleSpec::Pty, false, &mut |s| announced = s.to_string()).unwrap();
        let path = announced.rsplit_once(' ').unwrap().1.to_string();
        // Far more than a terminal buffers: must not block.
        for _ in 0..64 {
            c.output.write_all(&[b'x'; 4096]).unwrap();
        }
        let mut t = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        t.write_all(b"a\r\n").unwrap();
        let SerialIn::Stream(mut input) = c.input else {
            panic!("a pty console has input")
        };
        let mut got = Vec::new();
        let start = std::time::Instant::now();
        while got.len() < 3 {
            let mut b = [0u8; 8];
            let n = input.read_available(&mut b);
            got.extend_from_slice(&b[..n]);
            assert!(start.elapsed().as_secs() < 10, "no input: {got:?}");
        }
        assert_eq!(got, b"a\r\n", "raw mode passes CR and LF unchanged");
    }

    proptest! {
        #[test]
        fn parsing_never_panics(spec in "\\PC{0,40}") {
            let _ = ConsoleSpec::parse(&spec);
        }
    }
}
