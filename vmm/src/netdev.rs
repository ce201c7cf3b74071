//! Network backends of virtio-net (`--net virtio,stream=...`): where the
//! frames a guest sends go and where those it receives come from.
//!
//! A stream backend speaks the framing of QEMU's `-netdev stream` (and of
//! `passt`): each frame is a 4-byte big-endian length, then the frame, on
//! a Unix stream socket or a TCP connection. `stream=unix:PATH,server`
//! listens at PATH and waits there for its peer (another Nyx or a QEMU
//! with `-netdev stream,server=off`) before the machine starts;
//! `stream=unix:PATH` connects to a listening peer; `stream=tcp:HOST:PORT`
//! does the same over TCP, a server on a loopback address only (as every
//! listener of Nyx without an `--*-allow-remote`). With `capture=FILE`
//! every frame in and out is also written to FILE in pcap format. A thread reads the socket and queues
//! whole records; the device takes one record per read ([`FrameInput`])
//! only when the guest has a receive buffer, so a frame that arrives while
//! the guest has none waits (up to [`QUEUE_LIMIT`] frames; more are
//! dropped and counted, as a NIC's full ring drops them). The guest's
//! frames are written to the socket as the device hands them over.
//!
//! In a recording the device's reads are logged (`Event::NetInput`); a
//! replay serves them from the trace and opens no backend.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nyx_devices::virtio::net::{MAX_FRAME, RECORD_HDR};
use nyx_devices::Input;

/// Frames that may wait for the guest's receive buffers; more are dropped.
pub const QUEUE_LIMIT: usize = 1024;

/// A `--net` option that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The option does not parse.
    #[error("--net {spec}: {why}")]
    Spec {
        /// The option as given.
        spec: String,
        /// What is wrong with it.
        why: String,
    },
    /// The socket could not be opened.
    #[error("--net: {what} {path}: {source}")]
    Socket {
        /// Listening or connecting.
        what: &'static str,
        /// The socket's path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Where a NIC's frames go: the backend part of a `--net` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    /// `stream=unix:PATH[,server]`.
    UnixStream {
        /// The socket.
        path: PathBuf,
        /// Listen there (else connect).
        server: bool,
    },
    /// `stream=tcp:HOST:PORT[,server]` (a server listens on loopback only).
    TcpStream {
        /// `HOST:PORT` as given.
        addr: String,
        /// Listen there (else connect).
        server: bool,
    },
    /// No backend: the NIC's link is up, but nothing comes or goes (a
    /// replay, a restored machine whose backend was not given again).
    None,
}

/// A parsed `--net MODEL,BACKEND[,mac=MAC][,capture=FILE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// The MAC address (default 52:54:00:12:34:56 plus the NIC's index).
    pub mac: [u8; 6],
    /// The backend.
    pub backend: NetBackend,
    /// Where every frame in and out is written in pcap format.
    pub capture: Option<PathBuf>,
}

impl NetSpec {
    /// Parses `virtio,stream=unix:PATH|tcp:HOST:PORT[,server][,mac=MAC][,capture=FILE]` for NIC number
    /// `index` (which picks its default MAC).
    pub fn parse(spec: &str, index: usize) -> Result<Self, NetError> {
        let bad = |why: &str| NetError::Spec {
            spec: spec.to_string(),
            why: why.to_string(),
        };
        let mut parts = spec.split(',');
        match parts.next() {
            Some("virtio") => {}
            Some("e1000") => return Err(bad("the e1000 model is not built yet; use virtio")),
            _ => return Err(bad("the model comes first: virtio")),
        }
        let mut mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56u8.wrapping_add(index as u8)];
        let (mut path, mut tcp, mut server, mut capture) = (None, None, false, None);
        for p in parts {
            if let Some(f) = p.strip_prefix("capture=") {
                if f.is_empty() {
                    return Err(bad("capture= needs a file"));
                }
                capture = Some(PathBuf::from(f));
            } else if let Some(m) = p.strip_prefix("mac=") {
                mac = nyx_devices::virtio::net::parse_mac(m).ok_or_else(|| bad("mac= wants XX:XX:XX:XX:XX:XX"))?;
            } else if let Some(s) = p.strip_prefix("stream=") {
                if let Some(addr) = s.strip_prefix("tcp:") {
                    crate::net::parse_addr(addr).ok_or_else(|| bad("stream=tcp: wants HOST:PORT"))?;
                    tcp = Some(addr.to_string());
                    continue;
                }
                let unix = s
                    .strip_prefix("unix:")
                    .ok_or_else(|| bad("stream= wants unix:PATH or tcp:HOST:PORT"))?;
                if unix.is_empty() {
                    return Err(bad("stream=unix: needs a path"));
                }
                path = Some(PathBuf::from(unix));
            } else if p == "server" {
                server = true;
            } else {
                return Err(bad(&format!(
                    "unknown part {p:?} (stream=unix:PATH, server, mac=MAC, capture=FILE)"
                )));
            }
        }
        let backend = match (path, tcp) {
            (Some(path), None) => NetBackend::UnixStream { path, server },
            (None, Some(addr)) => NetBackend::TcpStream { addr, server },
            _ => {
                return Err(bad(
                    "give one backend: stream=unix:PATH or stream=tcp:HOST:PORT [,server]",
                ))
            }
        };
        Ok(NetSpec { mac, backend, capture })
    }
}

/// What the reader thread leaves for the device.
#[derive(Default)]
struct Queue {
    records: VecDeque<Vec<u8>>,
    closed: bool,
    dropped: u64,
}

/// The receiving end of a backend: one whole record per read.
pub struct FrameInput {
    queue: Arc<Mutex<Queue>>,
}

fn lock(q: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    q.lock().unwrap_or_else(|e| e.into_inner())
}

impl Input for FrameInput {
    fn read_available(&mut self, buf: &mut [u8]) -> usize {
        let mut q = lock(&self.queue);
        match q.records.front() {
            Some(r) if r.len() <= buf.len() => {
                let r = q.records.pop_front().unwrap_or_default();
                buf[..r.len()].copy_from_slice(&r);
                r.len()
            }
            _ => 0,
        }
    }

    fn is_exhausted(&self) -> bool {
        let q = lock(&self.queue);
        q.closed && q.records.is_empty()
    }
}

impl FrameInput {
    /// Frames dropped because the guest did not take them in time.
    pub fn dropped(&self) -> u64 {
        lock(&self.queue).dropped
    }
}

/// Reads records from `from` into `queue` until the peer closes or sends
/// something that is not a record.
fn pump(mut from: impl Read, queue: Arc<Mutex<Queue>>) {
    let mut len = [0u8; RECORD_HDR];
    loop {
        if from.read_exact(&mut len).is_err() {
            break;
        }
        let n = u32::from_be_bytes(len) as usize;
        if n > MAX_FRAME {
            tracing::warn!(target: "nyx::vmm", "a network peer sent a {n}-byte frame (at most {MAX_FRAME}); closing");
            break;
        }
        let mut rec = vec![0u8; RECORD_HDR + n];
        rec[..RECORD_HDR].copy_from_slice(&len);
        if from.read_exact(&mut rec[RECORD_HDR..]).is_err() {
            break;
        }
        let mut q = lock(&queue);
        if q.records.len() >= QUEUE_LIMIT {
            q.dropped += 1;
        } else {
            q.records.push_back(rec);
        }
    }
    lock(&queue).closed = true;
}

/// A connected stream socket: Unix or TCP.
enum Sock {
    Unix(UnixStream),
    Tcp(std::net::TcpStream),
}

impl Sock {
    fn try_clone(&self) -> std::io::Result<Sock> {
        Ok(match self {
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Sock::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Sock::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Sock::Unix(s) => s.read(buf),
            Sock::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write(buf),
            Sock::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sock::Unix(s) => s.flush(),
            Sock::Tcp(s) => s.flush(),
        }
    }
}

/// Writes the device's records to the socket.
struct FrameOutput(Sock);

impl Write for FrameOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Closing the backend (the machine is dropped) ends the connection both
/// ways, which also ends the reader thread.
impl Drop for FrameOutput {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

/// The two ends of a NIC's backend: where its frames go, where they come
/// from.
pub type NetEnds = (Box<dyn Write + Send>, Box<dyn Input>);

/// Opens `backend`: listens and waits for the peer, or connects.
pub fn open(backend: &NetBackend) -> Result<NetEnds, NetError> {
    match backend {
        NetBackend::None => Ok((Box::new(std::io::sink()), Box::new(nyx_devices::io::NoInput))),
        NetBackend::UnixStream { path, server } => {
            let stream = if *server {
                accept(path)?
            } else {
                UnixStream::connect(path).map_err(|source| NetError::Socket {
                    what: "connecting to",
                    path: path.clone(),
                    source,
                })?
            };
            start(Sock::Unix(stream), path)
        }
        NetBackend::TcpStream { addr, server } => {
            let name = PathBuf::from(format!("tcp:{addr}"));
            let err = |what, source| NetError::Socket {
                what,
                path: name.clone(),
                source,
            };
            let to = crate::net::parse_addr(addr).ok_or_else(|| NetError::Spec {
                spec: addr.clone(),
                why: "not HOST:PORT".into(),
            })?;
            let stream = if *server {
                if !crate::net::is_loopback(to.ip()) {
                    return Err(NetError::Spec {
                        spec: addr.clone(),
                        why: "a network backend listens on loopback only".into(),
                    });
                }
                let listener = std::net::TcpListener::bind(to).map_err(|e| err("listening at", e))?;
                let local = listener.local_addr().map_err(|e| err("listening at", e))?;
                eprintln!("nyx: waiting for a network peer on tcp:{local}");
                listener.accept().map_err(|e| err("accepting a peer at", e))?.0
            } else {
                std::net::TcpStream::connect(to).map_err(|e| err("connecting to", e))?
            };
            let _ = stream.set_nodelay(true);
            start(Sock::Tcp(stream), &name)
        }
    }
}

/// Starts the reader thread of a connected `stream` (called `name` in
/// errors): the backend's two ends.
fn start(stream: Sock, name: &Path) -> Result<NetEnds, NetError> {
    let err = |what, source| NetError::Socket {
        what,
        path: name.to_path_buf(),
        source,
    };
    let reader = stream.try_clone().map_err(|e| err("duplicating the socket of", e))?;
    let queue = Arc::new(Mutex::new(Queue::default()));
    let q = queue.clone();
    std::thread::Builder::new()
        .name("nyx-net-rx".into())
        .spawn(move || pump(reader, q))
        .map_err(|e| err("starting the reader of", e))?;
    Ok((Box::new(FrameOutput(stream)), Box::new(FrameInput { queue })))
}

/// Opens `spec`'s backend, with its capture file when it has one.
pub fn open_spec(spec: &NetSpec) -> Result<NetEnds, NetError> {
    let Some(path) = &spec.capture else {
        return open(&spec.backend);
    };
    let pcap = Arc::new(Mutex::new(Pcap::create(path).map_err(|source| NetError::Socket {
        what: "creating the capture file",
        path: path.clone(),
        source,
    })?));
    let (out, input) = open(&spec.backend)?;
    Ok((
        Box::new(CapturedOutput {
            inner: out,
            pcap: pcap.clone(),
            pending: Vec::new(),
        }),
        Box::new(CapturedInput { inner: input, pcap }),
    ))
}

/// A capture file in the classic pcap format (Ethernet, microseconds).
struct Pcap(std::io::BufWriter<std::fs::File>);

impl Pcap {
    fn create(path: &Path) -> std::io::Result<Self> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&4u16.to_le_bytes());
        h.extend_from_slice(&[0; 8]); // thiszone, sigfigs
        h.extend_from_slice(&(MAX_FRAME as u32).to_le_bytes());
        h.extend_from_slice(&1u32.to_le_bytes()); // LINKTYPE_ETHERNET
        f.write_all(&h)?;
        f.flush()?;
        Ok(Pcap(f))
    }

    /// Appends `frame`, stamped with the host's time (a capture is the
    /// user's view of the link, not the guest's).
    fn frame(&mut self, frame: &[u8]) {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut h = Vec::with_capacity(16);
        h.extend_from_slice(&(t.as_secs() as u32).to_le_bytes());
        h.extend_from_slice(&t.subsec_micros().to_le_bytes());
        h.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        h.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        let written = self
            .0
            .write_all(&h)
            .and_then(|()| self.0.write_all(frame))
            .and_then(|()| self.0.flush());
        if let Err(e) = written {
            tracing::warn!(target: "nyx::vmm", "network capture: {e}");
        }
    }
}

fn lock_pcap(p: &Mutex<Pcap>) -> std::sync::MutexGuard<'_, Pcap> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// A backend's input whose records are also captured as the device takes them.
struct CapturedInput {
    inner: Box<dyn Input>,
    pcap: Arc<Mutex<Pcap>>,
}

impl Input for CapturedInput {
    fn read_available(&mut self, buf: &mut [u8]) -> usize {
        let n = self.inner.read_available(buf);
        if let Some(frame) = buf[..n].get(RECORD_HDR..) {
            lock_pcap(&self.pcap).frame(frame);
        }
        n
    }

    fn is_exhausted(&self) -> bool {
        self.inner.is_exhausted()
    }
}

/// A backend's output whose records are also captured.
struct CapturedOutput {
    inner: Box<dyn Write + Send>,
    pcap: Arc<Mutex<Pcap>>,
    /// Bytes of a record not complete yet.
    pending: Vec<u8>,
}

impl Write for CapturedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.pending.extend_from_slice(&buf[..n]);
        while let Some((len, rest)) = self.pending.split_first_chunk::<RECORD_HDR>() {
            let len = u32::from_be_bytes(*len) as usize;
            if rest.len() < len {
                break;
            }
            lock_pcap(&self.pcap).frame(&rest[..len]);
            self.pending.drain(..RECORD_HDR + len);
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Listens at `path` (a stale socket file there is replaced) and takes one
/// peer.
fn accept(path: &Path) -> Result<UnixStream, NetError> {
    let err = |what, source| NetError::Socket {
        what,
        path: path.to_path_buf(),
        source,
    };
    if std::fs::symlink_metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket()
    }) {
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|e| err("listening at", e))?;
    eprintln!("nyx: waiting for a network peer on {}", path.display());
    let (stream, _) = listener.accept().map_err(|e| err("accepting a peer at", e))?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nyx_devices::virtio::net::record;

    #[test]
    fn options_parse_with_a_default_mac_per_nic() {
        let s = NetSpec::parse("virtio,stream=unix:/tmp/n.sock,server", 1).unwrap();
        assert_eq!(s.mac, [0x52, 0x54, 0, 0x12, 0x34, 0x57]);
        assert_eq!(
            s.backend,
            NetBackend::UnixStream {
                path: "/tmp/n.sock".into(),
                server: true
            }
        );
        let s = NetSpec::parse("virtio,mac=02:00:00:00:00:01,stream=unix:x", 0).unwrap();
        assert_eq!(s.mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(s.capture, None);
        let s = NetSpec::parse("virtio,stream=unix:x,capture=/tmp/c.pcap", 0).unwrap();
        assert_eq!(s.capture, Some(PathBuf::from("/tmp/c.pcap")));
        let s = NetSpec::parse("virtio,stream=tcp:127.0.0.1:5555,server", 0).unwrap();
        assert_eq!(
            s.backend,
            NetBackend::TcpStream {
                addr: "127.0.0.1:5555".into(),
                server: true
            }
        );
        for bad in [
            "",
            "virtio",
            "e1000,stream=unix:x",
            "virtio,stream=tcp:nohost",
            "virtio,stream=unix:x,stream=tcp:127.0.0.1:5",
            "virtio,stream=unix:",
            "virtio,stream=unix:x,mac=zz",
            "virtio,stream=unix:x,speed=10",
            "virtio,stream=unix:x,capture=",
        ] {
            assert!(NetSpec::parse(bad, 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn two_ends_exchange_records_and_a_closed_peer_is_exhausted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sock");
        let server = NetBackend::UnixStream {
            path: path.clone(),
            server: true,
        };
        let p = path.clone();
        let client = std::thread::spawn(move || {
            while !p.exists() {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            open(&NetBackend::UnixStream { path: p, server: false }).unwrap()
        });
        let (mut s_out, mut s_in) = open(&server).unwrap();
        let (mut c_out, mut c_in) = client.join().unwrap();
        c_out.write_all(&record(b"from the client")).unwrap();
        s_out.write_all(&record(b"from the server")).unwrap();
        let mut buf = vec![0u8; RECORD_HDR + MAX_FRAME];
        let read = |input: &mut Box<dyn Input>, buf: &mut [u8]| {
            for _ in 0..500 {
                let n = input.read_available(buf);
                if n > 0 {
                    return buf[..n].to_vec();
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            panic!("no record");
        };
        assert_eq!(read(&mut s_in, &mut buf), record(b"from the client"));
        assert_eq!(read(&mut c_in, &mut buf), record(b"from the server"));
        assert!(!s_in.is_exhausted());
        drop(c_out);
        drop(c_in);
        for _ in 0..500 {
            if s_in.is_exhausted() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert!(s_in.is_exhausted(), "the client went away");
        assert_eq!(s_in.read_available(&mut buf), 0);
    }

    #[test]
    fn tcp_ends_exchange_records_and_a_server_listens_on_loopback_only() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let a = addr.clone();
        let client = std::thread::spawn(move || {
            for _ in 0..500 {
                if let Ok(ends) = open(&NetBackend::TcpStream {
                    addr: a.clone(),
                    server: false,
                }) {
                    return ends;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            panic!("no server at {a}");
        });
        let (_s_out, mut s_in) = open(&NetBackend::TcpStream { addr, server: true }).unwrap();
        let (mut c_out, _c_in) = client.join().unwrap();
        c_out.write_all(&record(b"over tcp")).unwrap();
        let mut buf = vec![0u8; 64];
        let mut got = 0;
        for _ in 0..500 {
            got = s_in.read_available(&mut buf);
            if got > 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(&buf[..got], record(b"over tcp").as_slice());
        let remote = open(&NetBackend::TcpStream {
            addr: "8.8.8.8:5555".into(),
            server: true,
        });
        assert!(
            matches!(remote, Err(NetError::Spec { .. })),
            "a server on a non-loopback address"
        );
    }

    #[test]
    fn a_record_larger_than_the_reader_waits_and_an_oversized_frame_closes() {
        let queue = Arc::new(Mutex::new(Queue::default()));
        let mut input = FrameInput { queue: queue.clone() };
        let mut bytes = record(b"abcdef");
        bytes.extend_from_slice(&((MAX_FRAME + 1) as u32).to_be_bytes());
        pump(&bytes[..], queue);
        let mut small = [0u8; 4];
        assert_eq!(input.read_available(&mut small), 0, "a whole record or nothing");
        let mut buf = [0u8; 64];
        assert_eq!(input.read_available(&mut buf), 10);
        assert!(input.is_exhausted(), "the oversized frame ended the stream");
        assert_eq!(input.dropped(), 0);
    }
}
