//! Live migration: a running machine moves to another Nyx process over TCP
//! in the one container format (design §5), the same header, memory frames
//! (page runs) and machine-state frame as a snapshot, then the footer.
//!
//! The source ([`Outgoing`]) writes the header, then pre-copies memory while
//! the guest keeps running: a first pass with every non-zero page, then
//! passes with the pages KVM's dirty log reports, until a pass has fewer
//! dirty pages than the convergence threshold or the maximum number of
//! passes is reached. Then stop-and-copy: with the vCPU stopped it sends the
//! last dirty pages and the machine state, finishes the container (index
//! frame and trailer: the end marker) and waits for the destination's one
//! line of acknowledgement, `running` or `error: WHY`. Downtime runs from
//! the stop to that acknowledgement.
//!
//! Pre-copy runs on its own thread, not on the vCPU thread between short
//! runs: guest memory is a shared mapping and KVM's dirty log can be read
//! through a second VM descriptor ([`Machine::vm_handle`]), so the guest
//! runs at full speed on one core while the copy (reading, zstd, the
//! socket) uses another, and the vCPU thread only stops once, for the
//! final pass. A page the guest writes while it is being read is in the
//! next dirty set, so it is sent again. Only a plain run migrates: there
//! Nyx itself writes no guest memory once the guest runs (a recording or a
//! replay also reads the dirty log, and they would steal each other's
//! pages). The dirty log misses guest writes in real mode on some emulated
//! KVMs: a guest seen in real mode when the migration starts or stops has
//! all of its memory sent again in the stop.
//!
//! Disks travel by path: a plain run writes through to its images, and the
//! destination opens the same paths, on storage both hosts see (as QEMU
//! and Firecracker do; copying an image is the storage's business, not a
//! migration's). The header lists each disk with its absolute path and
//! size; the stop-and-copy flushes the images before the machine state
//! goes out; the destination refuses the machine, naming the disk, when an
//! image is missing or not of the recorded size (the source then runs on).
//!
//! The destination ([`listen`], [`accept`], [`receive`]) listens on
//! loopback unless allowed otherwise, reads the stream with the
//! container's own checks (magic, version, checksums, frames of at most
//! [`MAX_STREAM_FRAME`] bytes) and the saved-machine checks of
//! [`crate::snapshot::SavedReader`] (the same as a snapshot's: RAM size,
//! every run inside RAM, one machine state, here after all memory), and
//! accepts it only if it is complete. Pages are written into the new
//! machine's RAM as they arrive (a page sent again replaces its earlier
//! copy), so the destination holds one frame at a time besides the RAM.
//!
//! With a pre-shared key ([`crate::migration_auth`]) both ends
//! authenticate the stream and the confirmation: a destination open to
//! other hosts (`--incoming-allow-remote`) should have one.
//!
//! Both ends report how far they have got through callbacks
//! ([`CopyProgressFn`] on the source, [`accept`]'s `progress` on the
//! destination), so a front end can draw a progress bar without this
//! crate knowing how.

use std::collections::BTreeSet;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use nyx_trace::{decode_records, Completeness, ContainerKind, FrameKind, StreamReader, StreamWriter};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};

use crate::machine::Machine;
use crate::mem_state::{capture_pages, is_zero, push_page, DirtyTracker, MemStateError, PageRun, PAGE_SIZE};
use crate::memory::GuestMemory;
use crate::migration_auth::{self as auth, Key, Nonce, OpenedReader, SealedWriter};
use crate::snapshot::{MachineState, SavedParts, SavedReader, RUNS_PER_FRAME};

/// Default for [`MigrateOptions::max_iterations`].
pub const DEFAULT_MAX_ITERATIONS: u32 = 10;
/// Default for [`MigrateOptions::threshold_pages`] (1 MiB).
pub const DEFAULT_THRESHOLD_PAGES: u64 = 256;
/// Dirty pages per memory frame in the later passes (4 MiB).
const PAGES_PER_FRAME: usize = 1024;
/// zstd level of the stream: speed matters more than size on a link.
const ZSTD_LEVEL: i32 = 1;
/// The destination's acknowledgement that the machine runs.
const ACK_RUNNING: &str = "running";
/// How long the destination waits for the next bytes of a stream.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pages between two calls of a source's progress callback (1 MiB).
const PROGRESS_STEP: u64 = 256;
/// The largest frame a destination takes: the source's frames hold at most
/// [`RUNS_PER_FRAME`] runs of 1 MiB (or 4 MiB of dirty pages), plus room
/// for the machine state and the index.
pub const MAX_STREAM_FRAME: u32 = 32 << 20;

/// How far one pass of a migration's copy has got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyProgress {
    /// The pass: 1 is the first pass over all memory, then come the passes
    /// over dirty pages, and the stop-and-copy is the last.
    pub pass: u32,
    /// Whether this pass is the stop-and-copy (the vCPU is stopped).
    pub stop_and_copy: bool,
    /// Pages of this pass handled so far: sent, or in the first pass also
    /// found to be zero and skipped. Never more than `total`.
    pub done: u64,
    /// Pages this pass handles.
    pub total: u64,
}

/// A source's progress callback: called with `done == 0` when a pass
/// starts, every few hundred pages, and with `done == total` when it ends;
/// on the pre-copy thread, then on the vCPU thread for the stop-and-copy.
pub type CopyProgressFn = Box<dyn FnMut(CopyProgress) + Send>;

/// What a destination has received so far, after each frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiveProgress {
    /// Bytes of the stream read, header included.
    pub bytes: u64,
    /// Memory pages received (a page sent again counts again).
    pub pages: u64,
    /// Frames received.
    pub frames: usize,
}

/// Moves a [`CopyProgressFn`] along, calling it only every
/// [`PROGRESS_STEP`] pages and at the ends of a pass.
#[derive(Default)]
struct Reporter {
    f: Option<CopyProgressFn>,
    now: CopyProgress,
    reported: u64,
}

impl Reporter {
    fn new(f: Option<CopyProgressFn>) -> Self {
        Reporter {
            f,
            ..Reporter::default()
        }
    }

    fn call(&mut self) {
        if let Some(f) = self.f.as_mut() {
            f(self.now);
        }
        self.reported = self.now.done;
    }

    /// A new pass of `total` pages begins.
    fn pass(&mut self, pass: u32, stop_and_copy: bool, total: u64) {
        self.now = CopyProgress {
            pass,
            stop_and_copy,
            done: 0,
            total,
        };
        self.call();
    }

    /// `n` more pages of the pass are handled.
    fn advance(&mut self, n: u64) {
        self.now.done = self.now.done.saturating_add(n).min(self.now.total);
        if self.now.done == self.now.total || self.now.done - self.reported >= PROGRESS_STEP {
            self.call();
        }
    }

    /// The pass is over: reports it complete if it was not yet.
    fn end_pass(&mut self) {
        if self.reported != self.now.total {
            self.now.done = self.now.total;
            self.call();
        }
    }
}

/// How a migration pre-copies and how long it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrateOptions {
    /// The most passes over dirty pages after the first full pass; the
    /// stop-and-copy follows the last one.
    pub max_iterations: u32,
    /// Stop pre-copying once a pass finds fewer dirty pages than this.
    pub threshold_pages: u64,
    /// How long the source waits for the destination to confirm.
    pub ack_timeout: Duration,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            max_iterations: DEFAULT_MAX_ITERATIONS,
            threshold_pages: DEFAULT_THRESHOLD_PAGES,
            ack_timeout: Duration::from_secs(30),
        }
    }
}

/// What a migration did, for the reply to `migrate` and the log.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MigrationStats {
    /// Where the machine went.
    pub addr: String,
    /// Pre-copy passes, the first full one included.
    pub iterations: u32,
    /// Whether pre-copy stopped below the threshold (not at the maximum).
    pub converged: bool,
    /// Pages sent while the guest ran.
    pub precopy_pages: u64,
    /// Pages sent with the vCPU stopped.
    pub final_pages: u64,
    /// Bytes on the wire, header and footer included.
    pub bytes_sent: u64,
    /// From the stop on the source to the destination's confirmation, ms.
    pub downtime_ms: f64,
    /// From the request to the confirmation, ms.
    pub total_ms: f64,
}

/// Errors of migrating a machine out or in.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The address is not `tcp:HOST:PORT`.
    #[error("bad migration address {0:?}: use tcp:HOST:PORT (for example tcp:127.0.0.1:4444)")]
    BadAddress(String),
    /// The destination cannot be reached.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The address to listen on cannot be bound.
    #[error("cannot listen for a migration on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The stream is not a valid container, or writing it failed.
    #[error("{0}")]
    Stream(#[from] nyx_trace::Error),
    /// The connection failed.
    #[error("the migration connection failed: {0}")]
    Io(#[from] io::Error),
    /// The machine could not be stopped, read or resumed.
    #[error("{0}")]
    Machine(#[from] crate::machine::Error),
    /// KVM's dirty log could not be started or read.
    #[error("dirty page tracking: {0}")]
    Dirty(#[from] MemStateError),
    /// A valid container that is not a usable migration stream.
    #[error("not a usable migration stream: {0}")]
    Invalid(String),
    /// The stream ended before its end marker.
    #[error("the migration stream was cut off after {frames} complete frames: the source stopped sending")]
    CutOff {
        /// Complete frames received.
        frames: usize,
    },
    /// The destination said no.
    #[error("the destination refused the machine: {0}")]
    Refused(String),
    /// The destination did not say that it runs the machine.
    #[error("the destination did not confirm that it runs the machine: {0}")]
    NoAck(String),
    /// Another migration is already under way, or the pre-copy thread failed.
    #[error("{0}")]
    State(String),
    /// The listen address is not loopback and remote hosts are not allowed.
    #[error("cannot listen for a migration: {0}")]
    NotLoopback(#[from] crate::net::NotLoopback),
    /// The stream or the confirmation failed authentication, or the two
    /// ends disagree about using a key.
    #[error("{0}")]
    Auth(String),
    /// A disk's image could not be flushed before the machine moves.
    #[error("the machine's disks could not be flushed for the destination: {0}")]
    Storage(String),
}

/// The socket address of `tcp:HOST:PORT`.
pub fn parse_addr(spec: &str) -> Result<SocketAddr, MigrationError> {
    let bad = || MigrationError::BadAddress(spec.to_string());
    let rest = spec.strip_prefix("tcp:").ok_or_else(bad)?;
    crate::net::parse_addr(rest).ok_or_else(bad)
}

/// Sends every non-zero page of `mem` as memory frames at `position`;
/// returns the pages sent. Checks `cancel` between frames.
pub fn send_nonzero<W: Write>(
    out: &mut StreamWriter<W>,
    mem: &GuestMemory,
    position: u64,
    cancel: &AtomicBool,
) -> Result<u64, MigrationError> {
    send_nonzero_reporting(out, mem, position, cancel, &mut Reporter::default())
}

fn send_nonzero_reporting<W: Write>(
    out: &mut StreamWriter<W>,
    mem: &GuestMemory,
    position: u64,
    cancel: &AtomicBool,
    progress: &mut Reporter,
) -> Result<u64, MigrationError> {
    let mut runs = Vec::new();
    let mut pages = 0u64;
    let mut buf = [0u8; PAGE_SIZE as usize];
    for region in mem.iter() {
        let start = region.start_addr().0;
        let region_pages = region.len() / PAGE_SIZE;
        // Pages the host never backed are zero: skipped unread. One the
        // guest writes after this look is in the dirty log, which was
        // turned on before the pass.
        let mut next = 0u64;
        for backed in crate::memory::backed_pages(region) {
            progress.advance(backed.start.saturating_sub(next));
            next = backed.end.min(region_pages);
            for p in backed.start..next {
                let gpa = start + p * PAGE_SIZE;
                progress.advance(1);
                if mem.read_slice(&mut buf, GuestAddress(gpa)).is_err() || is_zero(&buf) {
                    continue;
                }
                push_page(&mut runs, gpa, &buf);
                pages += 1;
                if runs.len() > RUNS_PER_FRAME {
                    let last = runs.pop().unwrap_or_default();
                    out.write_records(FrameKind::Memory, position, &runs)?;
                    runs.clear();
                    runs.push(last);
                    if cancel.load(Ordering::Relaxed) {
                        return Err(MigrationError::State("the migration was cancelled".into()));
                    }
                }
            }
        }
        progress.advance(region_pages.saturating_sub(next));
    }
    if !runs.is_empty() {
        out.write_records(FrameKind::Memory, position, &runs)?;
    }
    Ok(pages)
}

/// Sends the pages `gfns` (zero or not) as memory frames at `position`;
/// returns the pages sent.
pub fn send_pages<W: Write>(
    out: &mut StreamWriter<W>,
    mem: &GuestMemory,
    gfns: &BTreeSet<u64>,
    position: u64,
) -> Result<u64, MigrationError> {
    send_pages_reporting(out, mem, gfns, position, &mut Reporter::default())
}

fn send_pages_reporting<W: Write>(
    out: &mut StreamWriter<W>,
    mem: &GuestMemory,
    gfns: &BTreeSet<u64>,
    position: u64,
    progress: &mut Reporter,
) -> Result<u64, MigrationError> {
    let all: Vec<u64> = gfns.iter().copied().collect();
    let mut pages = 0u64;
    for chunk in all.chunks(PAGES_PER_FRAME) {
        let runs = capture_pages(mem, chunk.iter().copied());
        pages += runs.iter().map(|r| r.data.len() as u64 / PAGE_SIZE).sum::<u64>();
        if !runs.is_empty() {
            out.write_records(FrameKind::Memory, position, &runs)?;
        }
        progress.advance(chunk.len() as u64);
    }
    Ok(pages)
}

/// Every guest frame number of `mem`.
fn all_gfns(mem: &GuestMemory) -> BTreeSet<u64> {
    mem.iter()
        .flat_map(|r| {
            let first = r.start_addr().0 / PAGE_SIZE;
            first..first + r.len() / PAGE_SIZE
        })
        .collect()
}

/// What the pre-copy thread hands back to the vCPU thread.
struct Precopied<W: Write> {
    /// The stream; taken by the stop-and-copy.
    out: Option<StreamWriter<W>>,
    tracker: DirtyTracker,
    /// Pages collected from the dirty log but not sent yet.
    pending: Result<BTreeSet<u64>, MigrationError>,
    iterations: u32,
    converged: bool,
    pages: u64,
    /// The progress callback, for the stop-and-copy.
    progress: Reporter,
}

fn precopy<W: Write>(
    mut out: StreamWriter<W>,
    mut tracker: DirtyTracker,
    vm: VmFd,
    mem: GuestMemory,
    opts: MigrateOptions,
    cancel: &AtomicBool,
    mut progress: Reporter,
) -> Precopied<W> {
    let mut pages = 0u64;
    let mut iterations = 0u32;
    let mut converged = false;
    let mut pass = |out: &mut StreamWriter<W>, tracker: &mut DirtyTracker| -> Result<BTreeSet<u64>, MigrationError> {
        let total = mem.iter().map(|r| r.len() / PAGE_SIZE).sum();
        progress.pass(1, false, total);
        pages += send_nonzero_reporting(out, &mem, 0, cancel, &mut progress)?;
        out.flush()?;
        progress.end_pass();
        iterations = 1;
        loop {
            let dirty = tracker.collect(&vm)?;
            if (dirty.len() as u64) < opts.threshold_pages {
                converged = true;
                return Ok(dirty);
            }
            if iterations > opts.max_iterations || cancel.load(Ordering::Relaxed) {
                return Ok(dirty);
            }
            progress.pass(iterations + 1, false, dirty.len() as u64);
            pages += send_pages_reporting(out, &mem, &dirty, 0, &mut progress)?;
            out.flush()?;
            progress.end_pass();
            iterations += 1;
        }
    };
    let pending = pass(&mut out, &mut tracker);
    Precopied {
        out: Some(out),
        tracker,
        pending,
        iterations,
        converged,
        pages,
        progress,
    }
}

/// Whether a vCPU is in real mode (CR0.PE clear), where the dirty log may
/// miss guest writes.
fn real_mode(m: &Machine) -> Result<bool, MigrationError> {
    Ok(m.real_mode_vcpus()?)
}

/// The source's side of the connection: the container's bytes as they
/// are, or in authenticated records when the migration has a key.
enum Sink {
    Plain(BufWriter<TcpStream>),
    Sealed(SealedWriter<BufWriter<TcpStream>>),
}

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(b),
            Sink::Sealed(w) => w.write(b),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Sealed(w) => w.flush(),
        }
    }
}

impl Sink {
    /// Sends what is buffered and returns the connection.
    fn into_conn(self) -> io::Result<TcpStream> {
        let buffered = match self {
            Sink::Plain(w) => w,
            Sink::Sealed(w) => w.into_inner()?,
        };
        buffered.into_inner().map_err(|e| e.into_error())
    }
}

/// Reads one line (at most 512 bytes) byte by byte, so that nothing after
/// it is taken from the connection.
fn read_short_line(conn: &TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 512 {
        match (&*conn).read(&mut b)? {
            0 => break,
            _ if b[0] == b'\n' => break,
            _ => line.push(b[0]),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// A migration under way on the source: pre-copy runs on its own thread
/// while the caller keeps running the guest; [`Outgoing::finish`] then does
/// the stop-and-copy.
pub struct Outgoing {
    addr: String,
    started: Instant,
    /// The connection, to cut it from this thread on abort.
    control: TcpStream,
    real_mode: bool,
    cancel: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<Precopied<Sink>>>,
    opts: MigrateOptions,
    /// The key and the destination's nonce, when authenticated.
    auth: Option<(Key, Nonce)>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Outgoing {
    /// Connects to `addr` (`tcp:HOST:PORT`), starts KVM's dirty log, sends
    /// the header and starts pre-copy on a new thread; `ready` is called on
    /// that thread when pre-copy is over (or failed): the caller should then
    /// stop the vCPU and call [`finish`](Self::finish). `progress`, when
    /// given, hears how far each pass has got, the stop-and-copy included.
    /// With `key` the stream is authenticated ([`crate::migration_auth`]);
    /// the destination must have the same key. Call on the thread that
    /// runs `m`, at a stop.
    pub fn start(
        m: &mut Machine,
        addr: &str,
        opts: MigrateOptions,
        key: Option<Key>,
        ready: Box<dyn FnOnce() + Send>,
        progress: Option<CopyProgressFn>,
    ) -> Result<Self, MigrationError> {
        let started = Instant::now();
        if m.mode_name() != "run" {
            // A recording or replay owns the dirty log and its inputs.
            return Err(MigrationError::State(format!(
                "only a plain run can migrate; this machine is in a {} session",
                m.mode_name()
            )));
        }
        let sock_addr = parse_addr(addr)?;
        let conn = TcpStream::connect_timeout(&sock_addr, Duration::from_secs(5)).map_err(|source| {
            MigrationError::Connect {
                addr: addr.to_string(),
                source,
            }
        })?;
        conn.set_nodelay(true)?;
        // A destination that stops reading must not block pre-copy forever.
        conn.set_write_timeout(Some(opts.ack_timeout))?;
        let control = conn.try_clone()?;
        let auth = match key {
            None => None,
            Some(key) => {
                conn.set_read_timeout(Some(opts.ack_timeout))?;
                let hello = read_short_line(&conn)?;
                match auth::parse_hello(&hello).map_err(MigrationError::Auth)? {
                    Some(nonce) => Some((key, nonce)),
                    None => {
                        return Err(MigrationError::Auth(
                            "the destination takes no migration key: give it the same --migration-key FILE".into(),
                        ))
                    }
                }
            }
        };
        let buffered = BufWriter::with_capacity(1 << 20, conn);
        let sink = match &auth {
            Some((key, nonce)) => Sink::Sealed(SealedWriter::new(buffered, key.clone(), *nonce)),
            None => Sink::Plain(buffered),
        };
        let (config, kernel, initrd) = m.saved_parts();
        let header = crate::snapshot::container_header(ContainerKind::Migration, config, kernel, initrd);
        let out = StreamWriter::with_level(sink, &header, ZSTD_LEVEL)?;
        let real_mode = real_mode(m)?;
        let vm = m.vm_handle()?;
        // SAFETY: the memory is the one registered with this VM, one slot per
        // region, and the machine keeps both for the VM's whole life.
        let tracker = unsafe { DirtyTracker::enable(m.vm(), m.memory()) }?.track_dma(m.dma_memory());
        let mem = m.memory().clone();
        let cancel = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let (c, d) = (cancel.clone(), done.clone());
        let thread = std::thread::Builder::new().name("nyx-migrate".into()).spawn(move || {
            let p = precopy(out, tracker, vm, mem, opts, &c, Reporter::new(progress));
            d.store(true, Ordering::SeqCst);
            ready();
            p
        })?;
        tracing::info!(target: "nyx::migration", "migrating to {addr}: pre-copy started");
        Ok(Outgoing {
            addr: addr.to_string(),
            started,
            control,
            real_mode,
            cancel,
            done,
            thread: Some(thread),
            opts,
            auth,
        })
    }

    /// Whether pre-copy is over (`finish` will not wait for it).
    pub fn precopy_done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    /// Where the machine is going.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn join(&mut self) -> Result<Precopied<Sink>, MigrationError> {
        self.thread
            .take()
            .ok_or_else(|| MigrationError::State("the migration has already ended".into()))?
            .join()
            .map_err(|_| MigrationError::State("the pre-copy thread panicked".into()))
    }

    /// Stop-and-copy, with the vCPU stopped (call at a stop of
    /// [`Machine::resume`], on its thread): the last dirty pages, the
    /// machine state, the end marker, then the destination's confirmation.
    /// `Ok`: the destination runs the machine; this one must not run again.
    /// `Err`: dirty logging is off again and the machine can go on here.
    pub fn finish(mut self, m: &mut Machine) -> Result<MigrationStats, MigrationError> {
        let paused = Instant::now();
        let mut p = self.join()?;
        let result = self.stop_and_copy(m, &mut p, paused);
        if result.is_err() {
            if let Err(e) = p.tracker.disable(m.vm()) {
                tracing::warn!(target: "nyx::migration", "stopping the dirty log: {e}");
            }
        }
        result
    }

    fn stop_and_copy(
        &mut self,
        m: &mut Machine,
        p: &mut Precopied<Sink>,
        paused: Instant,
    ) -> Result<MigrationStats, MigrationError> {
        let mut dirty = std::mem::replace(&mut p.pending, Ok(BTreeSet::new()))?;
        // The state first: completing a pending exit may still write memory.
        let (state, ()) = m.capture_state_without_memory()?;
        dirty.extend(p.tracker.collect(m.vm())?);
        if self.real_mode || real_mode(m)? {
            dirty = all_gfns(m.memory());
        }
        let mut out = p
            .out
            .take()
            .ok_or_else(|| MigrationError::State("the migration stream is gone".into()))?;
        p.progress.pass(p.iterations + 1, true, dirty.len() as u64);
        let final_pages = send_pages_reporting(&mut out, m.memory(), &dirty, state.exit_seq, &mut p.progress)?;
        p.progress.end_pass();
        // The destination opens the same images (shared storage): what
        // the guest wrote must be there before it does.
        m.platform().flush_storage().map_err(MigrationError::Storage)?;
        out.write_records(FrameKind::MachineState, state.exit_seq, std::slice::from_ref(&state))?;
        let bytes_sent = out.bytes_written();
        let sink = out.finish()?;
        let conn = sink.into_conn()?;
        wait_ack(&conn, self.opts.ack_timeout, self.auth.as_ref())?;
        let now = Instant::now();
        let stats = MigrationStats {
            addr: self.addr.clone(),
            iterations: p.iterations,
            converged: p.converged,
            precopy_pages: p.pages,
            final_pages,
            bytes_sent,
            downtime_ms: (now - paused).as_secs_f64() * 1e3,
            total_ms: (now - self.started).as_secs_f64() * 1e3,
        };
        Ok(stats)
    }

    /// Gives up: stops pre-copy, closes the connection (the destination
    /// sees a cut stream) and turns the dirty log off.
    pub fn abort(mut self, m: &mut Machine) {
        self.cancel.store(true, Ordering::SeqCst);
        // Unblocks a pre-copy thread stuck in a write.
        let _ = self.control.shutdown(std::net::Shutdown::Both);
        if let Ok(p) = self.join() {
            if let Err(e) = p.tracker.disable(m.vm()) {
                tracing::warn!(target: "nyx::migration", "stopping the dirty log: {e}");
            }
        }
    }
}

/// Reads the destination's one-line answer (after its first line, which a
/// source without a key has not read). With `auth`, `running` must carry
/// the destination's tag.
fn wait_ack(conn: &TcpStream, timeout: Duration, auth: Option<&(Key, Nonce)>) -> Result<(), MigrationError> {
    conn.set_read_timeout(Some(timeout))?;
    let mut r = BufReader::new(conn).take(4096);
    loop {
        let mut line = String::new();
        return match r.read_line(&mut line) {
            Ok(0) => Err(MigrationError::NoAck("it closed the connection".into())),
            Ok(_) => {
                let line = line.trim_end();
                if auth::is_hello(line) {
                    continue;
                }
                let (word, tag) = line.split_once(' ').unwrap_or((line, ""));
                if word == ACK_RUNNING {
                    match auth {
                        None => Ok(()),
                        Some((key, nonce)) if key.check_ack(nonce, ACK_RUNNING, tag) => Ok(()),
                        Some(_) => Err(MigrationError::Auth(
                            "the destination's confirmation is not authenticated with this key".into(),
                        )),
                    }
                } else if let Some(why) = line.strip_prefix("error: ") {
                    Err(MigrationError::Refused(why.to_string()))
                } else {
                    Err(MigrationError::NoAck(format!("unexpected answer {line:?}")))
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Err(
                MigrationError::NoAck(format!("no answer within {} s", timeout.as_secs_f64())),
            ),
            Err(e) => Err(MigrationError::NoAck(e.to_string())),
        };
    }
}

/// A machine received from a migration stream.
#[derive(Debug)]
pub struct Received {
    /// Configuration, kernel and initrd.
    pub parts: SavedParts,
    /// vCPU, devices, time.
    pub state: MachineState,
    /// The guest's RAM, every page received written into it.
    pub memory: GuestMemory,
    /// Data frames received.
    pub frames: usize,
    /// Memory runs received (pages sent again count again).
    pub runs: usize,
}

/// Reads one whole migration stream from `input`: a complete migration
/// container whose memory frames come before exactly one machine state.
/// Anything else (cut, damaged, another format version, another kind of
/// container, memory outside the machine's RAM) is an error; nothing here
/// panics on its input.
pub fn receive<R: Read>(input: R) -> Result<Received, MigrationError> {
    receive_with_progress(input, &mut |_| {})
}

/// [`receive`], calling `progress` after each frame. The machine's RAM is
/// created once the header has been checked and each memory frame is
/// written into it as soon as its runs have been checked.
pub fn receive_with_progress<R: Read>(
    input: R,
    progress: &mut dyn FnMut(ReceiveProgress),
) -> Result<Received, MigrationError> {
    let mut r = StreamReader::new(input)?.with_frame_limit(MAX_STREAM_FRAME);
    let mut so_far = ReceiveProgress::default();
    let mut saved = SavedReader::new(ContainerKind::Migration, r.header()).map_err(MigrationError::Invalid)?;
    let memory = crate::memory::create(saved.config().mem_mib).map_err(|e| MigrationError::Invalid(e.to_string()))?;
    while let Some(frame) = r.next_frame()? {
        so_far.bytes = frame.info.end();
        so_far.frames += 1;
        match frame.info.kind {
            FrameKind::Memory => {
                let runs = decode_records::<PageRun>(&frame)?;
                saved.memory(&runs).map_err(MigrationError::Invalid)?;
                crate::mem_state::restore_runs(&memory, &runs)?;
                let bytes: u64 = runs.iter().map(|run| run.data.len() as u64).sum();
                so_far.pages = so_far.pages.saturating_add(bytes / PAGE_SIZE);
            }
            FrameKind::MachineState => saved.state(decode_records(&frame)?).map_err(MigrationError::Invalid)?,
            kind => saved.other(kind, frame.info.offset).map_err(MigrationError::Invalid)?,
        }
        progress(so_far);
    }
    if r.completeness() != Some(Completeness::Complete) {
        return Err(MigrationError::CutOff {
            frames: r.frames().len(),
        });
    }
    let runs = saved.runs();
    let (parts, state) = saved.finish().map_err(MigrationError::Invalid)?;
    Ok(Received {
        parts,
        state,
        memory,
        frames: r.frames().len(),
        runs,
    })
}

/// Listens on `spec` (`tcp:HOST:PORT`; port 0 picks a free one): a
/// loopback address unless `allow_remote` (`--incoming-allow-remote`).
pub fn listen(spec: &str, allow_remote: bool) -> Result<TcpListener, MigrationError> {
    let addr = crate::net::check_local(parse_addr(spec)?, allow_remote, "--incoming-allow-remote")?;
    TcpListener::bind(addr).map_err(|source| MigrationError::Listen {
        addr: spec.to_string(),
        source,
    })
}

/// The destination's answer to the source, given once the machine is built.
#[derive(Debug)]
pub struct Confirm {
    conn: TcpStream,
    /// The source's address.
    pub peer: SocketAddr,
    auth: Option<(Key, Nonce)>,
}

impl Confirm {
    /// Tells the source that the machine runs here (it then ends). An
    /// error means the source may not have heard it and may resume the
    /// guest itself: do not run the machine then.
    pub fn running(mut self) -> io::Result<()> {
        let line = match &self.auth {
            Some((key, nonce)) => format!("{ACK_RUNNING} {}\n", key.ack_tag(nonce, ACK_RUNNING)),
            None => format!("{ACK_RUNNING}\n"),
        };
        self.conn.write_all(line.as_bytes())?;
        self.conn.flush()
    }

    /// Tells the source that the machine will not run here (it resumes it).
    pub fn refuse(mut self, why: &str) {
        let line = why.replace('\n', " ");
        let _ = self.conn.write_all(format!("error: {line}\n").as_bytes());
    }
}

/// The destination's side of the connection: the container's bytes as
/// they come, or checked record by record with a key.
enum Source {
    Plain(BufReader<TcpStream>),
    Opened(OpenedReader<BufReader<TcpStream>>),
}

impl Read for Source {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Plain(r) => r.read(b),
            Source::Opened(r) => r.read(b),
        }
    }
}

/// Accepts one migration on `listener` and reads it whole, calling
/// `progress` after each frame; with `key` the stream must be
/// authenticated with it. A stream that is rejected is answered with
/// `error: WHY` (when the connection still works) and returned as the
/// error.
pub fn accept(
    listener: &TcpListener,
    key: Option<&Key>,
    progress: &mut dyn FnMut(ReceiveProgress),
) -> Result<(Received, Confirm), MigrationError> {
    let (mut conn, peer) = listener.accept()?;
    conn.set_read_timeout(Some(RECEIVE_TIMEOUT))?;
    conn.set_nodelay(true)?;
    let nonce = match key {
        Some(_) => Some(auth::new_nonce()?),
        None => None,
    };
    conn.write_all(auth::hello(nonce.as_ref()).as_bytes())?;
    let auth = key.cloned().zip(nonce);
    let confirm = Confirm {
        conn: conn.try_clone()?,
        peer,
        auth: auth.clone(),
    };
    let buffered = BufReader::with_capacity(1 << 20, conn);
    let mut source = match auth {
        Some((key, nonce)) => Source::Opened(OpenedReader::new(buffered, key, nonce)),
        None => Source::Plain(buffered),
    };
    let result = receive_with_progress(&mut source, progress);
    let result = match (&source, result) {
        (Source::Opened(r), Err(_)) if r.failure().is_some() => {
            Err(MigrationError::Auth(r.failure().unwrap_or_default().to_string()))
        }
        (_, r) => r,
    };
    match result {
        Ok(r) => Ok((r, confirm)),
        Err(e) => {
            confirm.refuse(&e.to_string());
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory;
    use proptest::prelude::*;

    /// A machine state made without KVM: a sample vCPU state and the
    /// devices of a fresh platform. The stream format carries it as bytes;
    /// nothing here needs a real vCPU.
    fn sample_state() -> MachineState {
        let io = crate::platform::PlatformIo {
            clock: Arc::new(nyx_devices::io::ManualClock::new(5_000)),
            wall: Box::new(nyx_devices::io::FixedWallClock(1_700_000_000)),
            serial_out: Box::new(io::sink()),
            serial_in: Box::new(nyx_devices::io::NoInput),
            platform_in: Box::new(nyx_devices::io::NoInput),
            tsc_hz: 1_000_000_000,
            pci: Vec::new(),
            chip_link: Default::default(),
            ram_below_4g: 4 << 20,
        };
        let platform = crate::platform::Platform::new(io, 4 << 20, 0, crate::config::Irqchip::Apic, 1).unwrap();
        MachineState {
            vcpu: crate::vcpu_state::tests::sample(),
            aps: Vec::new(),
            schedule: None,
            platform: platform.state(),
            virtual_ns: 5_000,
            exit_seq: 42,
            poll_pending: true,
            patches: crate::patch::PatchTable::default(),
        }
    }

    fn config(mem_mib: u64) -> crate::config::MachineConfig {
        crate::config::MachineConfig {
            mem_mib,
            kernel_name: "k".into(),
            cmdline: String::new(),
            has_initrd: false,
            cpuid: vec![],
            cpu_model: "baseline".into(),
            tsc_khz: 1_000_000,
            wall_seconds: 0,
            verify: crate::config::VerifyLevel::Exits,
            irqchip: crate::config::Irqchip::Legacy,
            pci: Vec::new(),
        }
    }

    /// A migration stream of `mem` (two passes: all non-zero pages, then
    /// `dirty`) and `state`.
    fn stream(mem: &GuestMemory, dirty: &BTreeSet<u64>, state: &MachineState) -> Vec<u8> {
        let header = crate::snapshot::container_header(ContainerKind::Migration, &config(4), b"kernel", None);
        let mut out = StreamWriter::with_level(Vec::new(), &header, ZSTD_LEVEL).unwrap();
        send_nonzero(&mut out, mem, 0, &AtomicBool::new(false)).unwrap();
        send_pages(&mut out, mem, dirty, 0).unwrap();
        out.write_records(FrameKind::MachineState, 0, std::slice::from_ref(state))
            .unwrap();
        out.finish().unwrap()
    }

    fn dump(mem: &GuestMemory) -> Vec<u8> {
        let mut v = vec![0u8; 4 << 20];
        mem.read_slice(&mut v, GuestAddress(0)).unwrap();
        v
    }

    /// `reports` start each pass at 0, count up within it to its total, and
    /// go through passes 1..=`passes` in order, the last the stop-and-copy;
    /// the first pass covers all `first_total` pages.
    fn check_copy_reports(reports: &[CopyProgress], passes: u32, first_total: u64) {
        assert_eq!(
            reports.first().map(|r| (r.pass, r.done, r.total)),
            Some((1, 0, first_total))
        );
        for w in reports.windows(2) {
            let (a, b) = (w[0], w[1]);
            if b.pass == a.pass {
                assert!(b.done > a.done && b.total == a.total, "{a:?} then {b:?}");
            } else {
                assert_eq!(b.pass, a.pass + 1, "{a:?} then {b:?}");
                assert_eq!((a.done, b.done), (a.total, 0), "{a:?} then {b:?}");
            }
            assert!(b.done <= b.total);
        }
        let last = reports.last().copied().unwrap_or_default();
        assert_eq!((last.pass, last.stop_and_copy, last.done), (passes, true, last.total));
        assert!(reports.iter().filter(|r| r.stop_and_copy).all(|r| r.pass == passes));
    }

    #[test]
    fn progress_is_reported_every_step_and_at_the_ends_of_a_pass() {
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let c = calls.clone();
        let mut r = Reporter::new(Some(Box::new(move |p: CopyProgress| c.lock().unwrap().push(p.done))));
        r.pass(1, false, 1000);
        for _ in 0..1000 {
            r.advance(1);
        }
        r.end_pass();
        r.pass(2, false, 0);
        r.end_pass();
        r.pass(3, true, 10);
        r.advance(4);
        r.advance(u64::MAX);
        assert_eq!(*calls.lock().unwrap(), [0, 256, 512, 768, 1000, 0, 0, 10]);
        // A pass cut short (a cancelled one) is reported whole at its end.
        r.pass(4, false, 600);
        r.advance(300);
        r.end_pass();
        assert_eq!(calls.lock().unwrap()[8..], [0, 300, 600]);
    }

    #[test]
    fn the_first_pass_reports_every_page_it_looks_at() {
        let mem = memory::create(4).unwrap();
        mem.write_slice(&[3; 8192], GuestAddress(0x10_0000)).unwrap();
        let header = crate::snapshot::container_header(ContainerKind::Migration, &config(4), b"k", None);
        let mut out = StreamWriter::with_level(Vec::new(), &header, ZSTD_LEVEL).unwrap();
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let c = calls.clone();
        let mut r = Reporter::new(Some(Box::new(move |p: CopyProgress| c.lock().unwrap().push(p))));
        r.pass(1, false, 1024);
        let sent = send_nonzero_reporting(&mut out, &mem, 0, &AtomicBool::new(false), &mut r).unwrap();
        assert_eq!(sent, 2);
        r.pass(2, true, 3);
        send_pages_reporting(&mut out, &mem, &BTreeSet::from([0, 7, 0x100]), 0, &mut r).unwrap();
        r.end_pass();
        let calls = calls.lock().unwrap();
        let dones: Vec<u64> = calls.iter().map(|p| p.done).collect();
        // Unbacked pages are skipped in bulk (where the host's pagemap
        // says which), so the steps of the first pass depend on the host;
        // it still counts every page and ends at its total.
        let (first, second) = dones.split_at(dones.len() - 2);
        assert_eq!((first[0], first[first.len() - 1], second), (0, 1024, &[0, 3][..]));
        assert!(first.windows(2).all(|w| w[0] < w[1]), "{first:?}");
        check_copy_reports(&calls, 2, 1024);
    }

    #[test]
    fn addresses_must_be_tcp() {
        assert_eq!(parse_addr("tcp:127.0.0.1:4444").unwrap().port(), 4444);
        for bad in [
            "127.0.0.1:4444",
            "tcp:",
            "tcp:127.0.0.1",
            "unix:/x",
            "tcp:1.2.3.4:99999",
        ] {
            assert!(matches!(parse_addr(bad), Err(MigrationError::BadAddress(_))), "{bad}");
        }
    }

    #[test]
    fn a_stream_round_trips_and_later_pages_win() {
        let state = sample_state();
        let mem = memory::create(4).unwrap();
        mem.write_slice(&[1; 5000], GuestAddress(0x3000)).unwrap();
        mem.write_slice(&[2; 10], GuestAddress(0x20_0000)).unwrap();
        // Pre-copy sees the first contents; the page is then rewritten and
        // another one zeroed, and the dirty pass carries both changes.
        let header = crate::snapshot::container_header(ContainerKind::Migration, &config(4), b"kernel", None);
        let mut out = StreamWriter::with_level(Vec::new(), &header, ZSTD_LEVEL).unwrap();
        let pages = send_nonzero(&mut out, &mem, 0, &AtomicBool::new(false)).unwrap();
        assert_eq!(pages, 3);
        mem.write_slice(&[9; 3], GuestAddress(0x3ffd)).unwrap();
        mem.write_slice(&[0; 10], GuestAddress(0x20_0000)).unwrap();
        let sent = send_pages(&mut out, &mem, &BTreeSet::from([3, 0x200]), 0).unwrap();
        assert_eq!(sent, 2);
        out.write_records(FrameKind::MachineState, 7, std::slice::from_ref(&state))
            .unwrap();
        let bytes = out.finish().unwrap();

        let got = receive(bytes.as_slice()).unwrap();
        assert_eq!(got.state, state);
        assert_eq!(got.parts.1, b"kernel");
        assert_eq!(got.runs, 4);
        assert!(dump(&got.memory) == dump(&mem));
    }

    #[test]
    fn memory_outside_the_machine_and_oversized_frames_are_refused() {
        let header = crate::snapshot::container_header(ContainerKind::Migration, &config(4), b"k", None);
        let mut out = StreamWriter::new(Vec::new(), &header).unwrap();
        let run = PageRun {
            gpa: 4 << 20,
            data: vec![1; 4096],
        };
        out.write_records(FrameKind::Memory, 0, &[run]).unwrap();
        let e = receive(out.finish().unwrap().as_slice()).unwrap_err();
        assert!(e.to_string().contains("outside the machine's 4 MiB"), "{e}");
        // A frame larger than any the source makes is refused from its header.
        let mut out = StreamWriter::with_level(Vec::new(), &header, 19).unwrap();
        out.write_frame(FrameKind::Memory, 0, &vec![0; MAX_STREAM_FRAME as usize + 1])
            .unwrap();
        let e = receive(out.finish().unwrap().as_slice()).unwrap_err();
        assert!(e.to_string().contains("limit"), "{e}");
        // A machine larger than Nyx makes is refused before any RAM exists.
        let header = crate::snapshot::container_header(ContainerKind::Migration, &config(1 << 40), b"k", None);
        let bytes = StreamWriter::new(Vec::new(), &header).unwrap().finish().unwrap();
        let e = receive(bytes.as_slice()).unwrap_err();
        assert!(e.to_string().contains("MiB of RAM"), "{e}");
    }

    #[test]
    fn a_destination_listens_on_loopback_unless_allowed() {
        let e = listen("tcp:0.0.0.0:0", false).unwrap_err();
        assert!(e.to_string().contains("--incoming-allow-remote"), "{e}");
        assert!(listen("tcp:0.0.0.0:0", true).is_ok());
        assert!(listen("tcp:127.0.0.1:0", false).is_ok());
    }

    #[test]
    fn a_snapshot_is_not_a_migration_and_a_stream_without_state_is_refused() {
        let header = crate::snapshot::container_header(ContainerKind::Snapshot, &config(4), b"k", None);
        let bytes = StreamWriter::new(Vec::new(), &header).unwrap().finish().unwrap();
        let e = receive(bytes.as_slice()).unwrap_err();
        assert!(e.to_string().contains("Snapshot container"), "{e}");
        let header = crate::snapshot::container_header(ContainerKind::Migration, &config(4), b"k", None);
        let bytes = StreamWriter::new(Vec::new(), &header).unwrap().finish().unwrap();
        assert!(matches!(receive(bytes.as_slice()), Err(MigrationError::Invalid(_))));
    }

    #[test]
    fn another_format_version_is_refused() {
        let state = sample_state();
        let mut bytes = stream(&memory::create(4).unwrap(), &BTreeSet::new(), &state);
        bytes[8..12].copy_from_slice(&(nyx_trace::FORMAT_VERSION + 1).to_le_bytes());
        let e = receive(bytes.as_slice()).unwrap_err();
        assert!(matches!(
            e,
            MigrationError::Stream(nyx_trace::Error::UnsupportedVersion { .. })
        ));
        assert!(e.to_string().contains("format version"), "{e}");
    }

    #[test]
    fn every_truncation_is_refused() {
        let state = sample_state();
        let mem = memory::create(4).unwrap();
        mem.write_slice(&[5; 9000], GuestAddress(0x1000)).unwrap();
        let bytes = stream(&mem, &BTreeSet::from([1, 2]), &state);
        assert!(receive(bytes.as_slice()).is_ok());
        for cut in 0..bytes.len() {
            assert!(
                receive(&bytes[..cut]).is_err(),
                "a stream cut at byte {cut} was accepted"
            );
        }
        assert!(matches!(
            receive(&bytes[..bytes.len() - 30]),
            Err(MigrationError::CutOff { .. })
        ));
    }

    /// Pre-copy on its own thread while a guest on this thread rewrites a
    /// counter and cycles through 512 pages: after the stop-and-copy the
    /// received memory equals the guest's memory exactly.
    #[test]
    fn precopy_keeps_up_with_a_guest_that_writes_while_it_runs() {
        use std::os::fd::AsRawFd;
        let state = sample_state();
        let Some(mut t) = crate::vcpu_state::tests::test_vm(4) else {
            return;
        };
        let code: &[u8] = &[
            0x40, // inc eax
            0x89, 0x83, 0x00, 0x00, 0x10, 0x00, // mov [ebx+0x100000], eax
            0x81, 0xc3, 0x00, 0x10, 0x00, 0x00, // add ebx, 0x1000
            0x81, 0xe3, 0x00, 0xf0, 0x1f, 0x00, // and ebx, 0x1ff000
            0xff, 0x05, 0x00, 0x00, 0x01, 0x00, // inc dword [0x10000]
            0xe6, 0x80, // out 0x80, al
            0xeb, 0xe3, // jmp back to the start (-29)
        ];
        assert_eq!(code.len(), 29);
        t.mem.write_slice(code, GuestAddress(0x1000)).unwrap();
        crate::vcpu_state::tests::protected_mode(&t.vcpu, 0x1000);
        // SAFETY: `t.mem` is registered with `t.vm` as slot 0 and outlives it.
        let mut tracker = unsafe { DirtyTracker::enable(&t.vm, &t.mem) }.unwrap();
        // SAFETY: a fresh duplicate of the VM descriptor, owned by `vm` only.
        let vm = unsafe { t.kvm.create_vmfd_from_rawfd(libc::dup(t.vm.as_raw_fd())) }.unwrap();
        let header = crate::snapshot::container_header(ContainerKind::Migration, &config(4), b"kernel", None);
        let out = StreamWriter::with_level(Vec::new(), &header, ZSTD_LEVEL).unwrap();
        let opts = MigrateOptions {
            max_iterations: 3,
            threshold_pages: 1,
            ..MigrateOptions::default()
        };
        let done = Arc::new(AtomicBool::new(false));
        let (mem, d) = (t.mem.clone(), done.clone());
        let reports = Arc::new(std::sync::Mutex::new(Vec::new()));
        let r = reports.clone();
        let seen: CopyProgressFn = Box::new(move |p| r.lock().unwrap().push(p));
        let copier = std::thread::spawn(move || {
            let p = precopy(
                out,
                tracker,
                vm,
                mem,
                opts,
                &AtomicBool::new(false),
                Reporter::new(Some(seen)),
            );
            d.store(true, Ordering::SeqCst);
            p
        });
        let mut exits = 0u64;
        while !done.load(Ordering::SeqCst) || exits < 2000 {
            assert!(matches!(t.vcpu.run().unwrap(), kvm_ioctls::VcpuExit::IoOut(0x80, _)));
            exits += 1;
        }
        // Stop-and-copy: the guest no longer runs.
        let mut p = copier.join().unwrap();
        // One full pass and the three dirty passes allowed (unless a pass
        // happened to find no page written: the host may not run the vCPU
        // thread for a while).
        assert!(p.iterations == 4 || p.converged, "{} passes", p.iterations);
        let mut last = p.pending.unwrap();
        tracker = p.tracker;
        last.extend(tracker.collect(&t.vm).unwrap());
        assert!(last.contains(&0x10), "the counter page is dirty at the stop");
        let mut out = p.out.take().unwrap();
        p.progress.pass(p.iterations + 1, true, last.len() as u64);
        send_pages_reporting(&mut out, &t.mem, &last, 0, &mut p.progress).unwrap();
        p.progress.end_pass();
        out.write_records(FrameKind::MachineState, 0, std::slice::from_ref(&state))
            .unwrap();
        let mut received = Vec::new();
        let got = receive_with_progress(out.finish().unwrap().as_slice(), &mut |r| received.push(r)).unwrap();
        check_copy_reports(&reports.lock().unwrap(), p.iterations + 1, 1024);
        let last_seen = received.last().copied().unwrap_or_default();
        assert_eq!(last_seen.frames, got.frames);
        assert!(received
            .windows(2)
            .all(|w| w[0].bytes < w[1].bytes && w[0].pages <= w[1].pages));
        let fresh = got.memory;
        assert_eq!(
            fresh.read_obj::<u32>(GuestAddress(0x10000)).unwrap() as u64,
            exits,
            "the counter counts every loop"
        );
        assert!(dump(&fresh) == dump(&t.mem), "received memory differs from the guest's");
        tracker.disable(&t.vm).unwrap();
    }

    /// Pre-copy cost against a busy guest: 256 MiB, 90% of it filled with
    /// poorly compressible data, the guest rewriting a counter and cycling
    /// through 512 pages; default options; five runs (`cargo test --release
    /// -p nyx-vmm --lib precopy_benchmark -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn precopy_benchmark_256_mib_busy_guest() {
        use std::os::fd::AsRawFd;
        let mut rows = Vec::new();
        for _ in 0..5 {
            let Some(mut t) = crate::vcpu_state::tests::test_vm(256) else {
                return;
            };
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut page = vec![0u8; 4096];
            for gfn in 0x300..(256u64 << 8) * 9 / 10 {
                for w in page.chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    w.copy_from_slice(&x.to_le_bytes());
                }
                t.mem.write_slice(&page, GuestAddress(gfn << 12)).unwrap();
            }
            let code: &[u8] = &[
                0x40, 0x89, 0x83, 0x00, 0x00, 0x10, 0x00, 0x81, 0xc3, 0x00, 0x10, 0x00, 0x00, 0x81, 0xe3, 0x00, 0xf0,
                0x1f, 0x00, 0xff, 0x05, 0x00, 0x00, 0x01, 0x00, 0xe6, 0x80, 0xeb, 0xe3,
            ];
            t.mem.write_slice(code, GuestAddress(0x1000)).unwrap();
            crate::vcpu_state::tests::protected_mode(&t.vcpu, 0x1000);
            let start = Instant::now();
            // SAFETY: as in the test above.
            let tracker = unsafe { DirtyTracker::enable(&t.vm, &t.mem) }.unwrap();
            // SAFETY: a fresh duplicate of the VM descriptor, owned by `vm` only.
            let vm = unsafe { t.kvm.create_vmfd_from_rawfd(libc::dup(t.vm.as_raw_fd())) }.unwrap();
            let header = crate::snapshot::container_header(ContainerKind::Migration, &config(256), b"k", None);
            let out = StreamWriter::with_level(io::sink(), &header, ZSTD_LEVEL).unwrap();
            let done = Arc::new(AtomicBool::new(false));
            let (mem, d) = (t.mem.clone(), done.clone());
            let copier = std::thread::spawn(move || {
                let p = precopy(
                    out,
                    tracker,
                    vm,
                    mem,
                    MigrateOptions::default(),
                    &AtomicBool::new(false),
                    Reporter::default(),
                );
                d.store(true, Ordering::SeqCst);
                p
            });
            while !done.load(Ordering::SeqCst) {
                t.vcpu.run().unwrap();
            }
            let precopy_ms = start.elapsed().as_secs_f64() * 1e3;
            let stop = Instant::now();
            let mut p = copier.join().unwrap();
            let mut last = p.pending.unwrap();
            last.extend(p.tracker.collect(&t.vm).unwrap());
            let mut out = p.out.take().unwrap();
            let final_pages = send_pages(&mut out, &t.mem, &last, 0).unwrap();
            out.flush().unwrap();
            let stop_ms = stop.elapsed().as_secs_f64() * 1e3;
            rows.push((
                precopy_ms,
                stop_ms,
                p.iterations,
                p.pages,
                final_pages,
                out.bytes_written(),
            ));
            println!(
                "pre-copy {precopy_ms:.0} ms ({} passes, {} pages), stop-and-copy send {stop_ms:.2} ms ({final_pages} pages), {:.1} MiB sent",
                p.iterations,
                p.pages,
                out.bytes_written() as f64 / f64::from(1 << 20)
            );
            p.tracker.disable(&t.vm).unwrap();
        }
        rows.sort_by(|a, b| a.0.total_cmp(&b.0));
        let pre = rows[2].0;
        rows.sort_by(|a, b| a.1.total_cmp(&b.1));
        println!("median: pre-copy {pre:.0} ms, stop-and-copy send {:.2} ms", rows[2].1);
    }

    /// What the progress callback costs the first pre-copy pass: 256 MiB,
    /// 90% of it poorly compressible, sent to a sink without and with a
    /// callback, alternating, five runs each (`cargo test --release -p
    /// nyx-vmm --lib progress_cost -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn progress_cost_of_the_first_pass() {
        use std::sync::atomic::AtomicU64;
        let mem = memory::create(256).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut page = vec![0u8; 4096];
        for gfn in 0..(256u64 << 8) * 9 / 10 {
            for w in page.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            mem.write_slice(&page, GuestAddress(gfn << 12)).unwrap();
        }
        let mut ms = [Vec::new(), Vec::new()];
        for run in 0..10 {
            let with = run % 2 == 1;
            let seen = Arc::new(AtomicU64::new(0));
            let s = seen.clone();
            let f: Option<CopyProgressFn> = with.then(|| {
                let f: CopyProgressFn = Box::new(move |p| s.store(p.done, Ordering::Relaxed));
                f
            });
            let mut r = Reporter::new(f);
            let header = crate::snapshot::container_header(ContainerKind::Migration, &config(256), b"k", None);
            let mut out = StreamWriter::with_level(io::sink(), &header, ZSTD_LEVEL).unwrap();
            let t = Instant::now();
            r.pass(1, false, 256 << 8);
            send_nonzero_reporting(&mut out, &mem, 0, &AtomicBool::new(false), &mut r).unwrap();
            r.end_pass();
            ms[usize::from(with)].push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(seen.load(Ordering::Relaxed), if with { 256 << 8 } else { 0 });
        }
        for v in &mut ms {
            v.sort_by(f64::total_cmp);
        }
        println!(
            "first pass of 256 MiB: without a callback {:?} ms, with {:?} ms; medians {:.1} / {:.1} ms, ratio {:.3}",
            ms[0],
            ms[1],
            ms[0][2],
            ms[1][2],
            ms[1][2] / ms[0][2]
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn flipped_bytes_are_refused(at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let state = sample_state();
            let mem = memory::create(4).unwrap();
            mem.write_slice(&[7; 3000], GuestAddress(0x5000)).unwrap();
            let mut bytes = stream(&mem, &BTreeSet::from([5]), &state);
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
            prop_assert!(receive(bytes.as_slice()).is_err(), "byte {} flipped was accepted", i);
        }

        #[test]
        fn garbage_is_refused_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            prop_assert!(receive(bytes.as_slice()).is_err());
        }
    }
}
