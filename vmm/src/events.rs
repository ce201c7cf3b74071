//! The events of a recording, in the order the run loop consumes them.
//!
//! A recording is the sequence of everything nondeterministic the machine
//! consumed, interleaved with verification records of what the guest did.
//! Its position is `exit_seq`, the number of guest-caused exits so far: the
//! [`Event::Exit`] records count it, and every other event belongs to the
//! position of the exit before it. The replayer walks the same sequence and
//! stops at the first event that does not match what its guest does.

use serde::{Deserialize, Serialize};

use crate::crash::CrashReport;

/// What kind of guest-caused exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExitKind {
    /// Port read.
    PioIn,
    /// Port write.
    PioOut,
    /// MMIO read.
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// HLT.
    Hlt,
    /// Interrupt window opened.
    IrqWindow,
    /// Trapped MSR read.
    MsrRead,
    /// Trapped MSR write.
    MsrWrite,
    /// A patched instruction (RDTSC, RDRAND, ...) trapped.
    Patched,
    /// The guest crashed or the VM could not run (shutdown, emulation failure).
    Crash,
    /// A software interrupt (`int3`, `int n`) that KVM could not execute
    /// and Nyx delivered: `addr` is the vector, `size` the instruction's
    /// length, `rip` the instruction's address.
    SoftInt,
}

impl ExitKind {
    /// Every kind, in declaration order.
    pub const ALL: [ExitKind; 11] = [
        ExitKind::PioIn,
        ExitKind::PioOut,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Hlt,
        ExitKind::IrqWindow,
        ExitKind::MsrRead,
        ExitKind::MsrWrite,
        ExitKind::Patched,
        ExitKind::Crash,
        ExitKind::SoftInt,
    ];

    /// A short name for reports and `nyx trace dump`.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::PioIn => "pio-in",
            ExitKind::PioOut => "pio-out",
            ExitKind::MmioRead => "mmio-read",
            ExitKind::MmioWrite => "mmio-write",
            ExitKind::Hlt => "hlt",
            ExitKind::IrqWindow => "irq-window",
            ExitKind::MsrRead => "msr-read",
            ExitKind::MsrWrite => "msr-write",
            ExitKind::Patched => "patched",
            ExitKind::Crash => "crash",
            ExitKind::SoftInt => "soft-int",
        }
    }
}

/// One guest-caused exit, as verified by the replayer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// The kind.
    pub kind: ExitKind,
    /// Port, MMIO address or MSR index (0 where none).
    pub addr: u64,
    /// Access size in bytes (0 where none).
    pub size: u8,
    /// Value written, or value the guest received.
    pub data: u64,
    /// RIP after the exit.
    pub rip: u64,
}

impl std::fmt::Display for ExitRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ", self.kind.name())?;
        match self.kind {
            ExitKind::PioIn | ExitKind::PioOut => {
                write!(f, "port {:#x} size {} data {:#x}", self.addr, self.size, self.data)?
            }
            ExitKind::MmioRead | ExitKind::MmioWrite => {
                write!(f, "addr {:#x} size {} data {:#x}", self.addr, self.size, self.data)?
            }
            ExitKind::MsrRead | ExitKind::MsrWrite => write!(f, "msr {:#x} data {:#x}", self.addr, self.data)?,
            ExitKind::Patched => write!(f, "site {:#x} value {:#x}", self.addr, self.data)?,
            ExitKind::SoftInt => write!(f, "vector {:#x}", self.addr)?,
            _ => {}
        }
        write!(f, " rip {:#x}", self.rip)
    }
}

/// The general registers at a landing (shown in divergence reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GprSnapshot {
    /// rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8..r15.
    pub gpr: [u64; 16],
    /// RIP.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
}

impl GprSnapshot {
    /// From KVM's registers.
    pub fn of(r: &kvm_bindings::kvm_regs) -> Self {
        GprSnapshot {
            gpr: [
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14,
                r.r15,
            ],
            rip: r.rip,
            rflags: r.rflags,
        }
    }

    /// Register names and values that differ, "rax: expected 0x1, got 0x2".
    pub fn diff(&self, actual: &GprSnapshot) -> Vec<String> {
        const NAMES: [&str; 16] = [
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
            "r15",
        ];
        let mut out = Vec::new();
        for (i, n) in NAMES.iter().enumerate() {
            if self.gpr[i] != actual.gpr[i] {
                out.push(format!("{n}: expected {:#x}, got {:#x}", self.gpr[i], actual.gpr[i]));
            }
        }
        if self.rip != actual.rip {
            out.push(format!("rip: expected {:#x}, got {:#x}", self.rip, actual.rip));
        }
        if self.rflags != actual.rflags {
            out.push(format!("rflags: expected {:#x}, got {:#x}", self.rflags, actual.rflags));
        }
        out
    }
}

/// Where an asynchronous stop (a kick) caught the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Landing {
    /// The general registers (their digest and more are in `regs_digest`).
    pub regs: GprSnapshot,
    /// Digest of all registers that matter ([`crate::vcpu_state::register_digest`]).
    pub regs_digest: u64,
    /// Number of guest pages written since the previous landing.
    pub dirty_pages: u32,
    /// Digest of those pages' contents.
    pub mem_digest: u64,
    /// An interrupt Nyx had injected that the vCPU had not yet delivered
    /// when it stopped. KVM may deliver an injected interrupt later than at
    /// entry (the emulated KVM of Nyx's build machines delivers it at the
    /// end of an emulation batch, after a pending kick): the replayer then
    /// holds the interrupt back until it has found the landing.
    pub pending_interrupt: Option<u8>,
    /// Where the recorder judged the landing hot: its delta keyframe.
    pub keyframe: Option<Box<Keyframe>>,
}

impl Landing {
    /// The landing without its keyframe: what a search or a step compares
    /// (a keyframe holds pages, too much to copy for that).
    pub fn digests_only(&self) -> Landing {
        Landing {
            keyframe: None,
            regs: self.regs,
            regs_digest: self.regs_digest,
            dirty_pages: self.dirty_pages,
            mem_digest: self.mem_digest,
            pending_interrupt: self.pending_interrupt,
        }
    }
}

/// The state at a landing the recorder judged hot (a breakpoint search
/// would hit its RIP many times): the replayer restores it instead.
///
/// A delta keyframe replaces the guest instructions between the exit
/// before the landing and the landing itself: the replayer does not run
/// them. It holds what those instructions can change, which is what a
/// guest can change without an exit *to Nyx*; everything else the
/// replayer's vCPU already holds as the recording's did, because the replay
/// made the same exits with the same values up to here (or it had already
/// diverged, and the register and page digests checked after the restore
/// say so). Exits that KVM handles itself (WRMSR of most MSRs, XSETBV, MOV
/// DR, CPUID) are invisible to Nyx, so what they change is in. Each part:
///
/// - **In: general registers** (`kvm_regs`, RIP and RFLAGS included).
/// - **In: special registers** (`kvm_sregs`): segment loads, WRFSBASE,
///   SWAPGS, LGDT/LIDT, LTR/LLDT, CR2 (a page fault the guest handles), CR0,
///   CR3 and CR4 writes, EFER (WRMSR handled by KVM).
/// - **In: the XSAVE area**, not `kvm_fpu`: every x87/SSE/AVX instruction
///   changes it. `kvm_fpu` holds only x87, XMM0-15 and MXCSR, misses the
///   upper halves of YMM (and AVX-512) when XCR0 enables them, and
///   `KVM_SET_FPU` leaves XSTATE_BV alone, so XMM values written through it
///   can read back as the init state. It is cheaper (about 2 µs against
///   6 µs each way on the development host), but it is not exact.
/// - **In: XCR0**: XSETBV exits to KVM, not to Nyx. One ioctl, ~2 µs.
/// - **In: the debug registers**: MOV DR exits to KVM at most (on Intel CPUs
///   KVM even stops intercepting it after the guest's first access). One
///   ioctl, ~2 µs; the register digest does not cover them.
/// - **In: the MSRs of [`crate::vcpu_state::keyframe_msrs`]**, every MSR the
///   vCPU accepts but the TSC-related ones: WRMSR exits to KVM, and only the
///   time MSRs go on to Nyx (its MSR filter); SWAPGS changes
///   IA32_KERNEL_GS_BASE with no exit at all. One `KVM_GET_MSRS` of all ~70
///   costs ~6 µs against ~3 µs for eight.
/// - **In: vCPU events**: an injected interrupt not yet delivered, a
///   pending exception, the interrupt shadow (STI, MOV SS) and NMI masking.
/// - **Out: the TSC MSRs and the TSC rate**: the guest's time is Nyx's
///   virtual clock (RDTSC patched into a trap, the TSC MSRs filtered to
///   Nyx), so KVM's TSC is never seen by the guest; writing IA32_TSC back
///   would only move KVM's TSC offset.
/// - **Out: the MP state**: without an in-kernel local APIC, HLT exits to
///   Nyx and the vCPU is always runnable at a landing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Keyframe {
    /// Which vCPU stopped here (0 on a machine with one): restoring one
    /// vCPU's keyframe into another would hide a wrong switch.
    pub cpu: u8,
    /// The vCPU state the guest can change without an exit.
    pub vcpu: crate::vcpu_state::VcpuDelta,
    /// The pages written since the previous landing, as they were.
    pub pages: Vec<crate::mem_state::PageRun>,
    /// Digest of all of guest memory (`--verify full`).
    pub memory_digest: Option<u64>,
}

/// How a recorded run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndKind {
    /// Debug-exit with this value.
    DebugExit(u32),
    /// Halted for good.
    Halted,
    /// Reset requested.
    Reset,
    /// Powered off.
    PowerOff,
    /// Crashed, with the report.
    Crashed(Box<CrashReport>),
    /// The recording was stopped from outside (Ctrl-C).
    Stopped,
    /// A limit set on the recording was reached (its replay ends there too).
    Limit(Limit),
}

/// A limit that ended a run before the guest did.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Limit {
    /// The serial output came to contain this text (`--until-output`).
    Output(String),
    /// Virtual time reached this many ns (`--max-guest-time`).
    GuestTime(u64),
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Output(t) => write!(f, "the output contains {t:?}"),
            Limit::GuestTime(ns) => write!(f, "guest time reached {:.3} s", *ns as f64 / 1e9),
        }
    }
}

/// One line for a user, as [`crate::RunOutcome`] prints itself.
impl std::fmt::Display for EndKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndKind::DebugExit(v) => crate::RunOutcome::DebugExit(*v).fmt(f),
            EndKind::Halted => crate::RunOutcome::Halted.fmt(f),
            EndKind::Reset => crate::RunOutcome::Reset.fmt(f),
            EndKind::PowerOff => crate::RunOutcome::PowerOff.fmt(f),
            EndKind::Crashed(r) => write!(f, "crashed: {}", r.summary()),
            EndKind::Stopped => f.write_str("stopped from outside (Ctrl-C or the control socket)"),
            EndKind::Limit(l) => write!(f, "stopped: {l}"),
        }
    }
}

/// The last event of a finished recording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndRecord {
    /// How it ended.
    pub kind: EndKind,
    /// Register digest at the end.
    pub regs_digest: u64,
    /// Digest of all of guest memory at the end.
    pub mem_digest: u64,
    /// Virtual time at the end, ns.
    pub virtual_ns: u64,
}

/// One event of a recording.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A guest-caused exit (a sync point): advances the position.
    Exit(ExitRecord),
    /// The devices were polled here (timer deadline, HLT wake-up).
    Poll,
    /// A sample of virtual time (ns) consumed here.
    Time(u64),
    /// Serial input bytes taken by the UART here.
    Input(Vec<u8>),
    /// A random value (RDRAND/RDSEED emulation) consumed here.
    Entropy(u64),
    /// The guest was stopped asynchronously here.
    Landing(Box<Landing>),
    /// An interrupt with this vector was injected here.
    Inject(u8),
    /// Register digest after an exit (`--verify full`).
    Regs(u64),
    /// The run ended.
    End(Box<EndRecord>),
    /// Platform events from outside (a power-button press, a lid, battery
    /// or temperature change; `nyx_devices::acpi_pm::PlatformEvent`
    /// encoded) taken by the ACPI PM device here.
    Platform(Vec<u8>),
    /// Random bytes virtio-rng gave the guest here.
    Rng(Vec<u8>),
    /// Input bytes virtio-console took here.
    ConsoleInput(Vec<u8>),
    /// What a read of an embedded disk returned here (`--embed-disks`).
    DiskRead(Vec<u8>),
    /// A machine that runs its vCPUs one at a time switched to this vCPU
    /// here; the events after it are that vCPU's until the next switch.
    Switch(u8),
    /// A frame virtio-net took here, as its record (a 4-byte big-endian
    /// length, then the frame).
    NetInput(Vec<u8>),
}

impl Event {
    /// The kind's name, for `nyx trace info/dump`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Event::Exit(e) => e.kind.name(),
            Event::Poll => "poll",
            Event::Time(_) => "time",
            Event::Input(_) => "input",
            Event::Platform(_) => "platform",
            Event::Entropy(_) => "entropy",
            Event::Landing(_) => "landing",
            Event::Inject(_) => "inject",
            Event::Regs(_) => "regs",
            Event::End(_) => "end",
            Event::Rng(_) => "rng",
            Event::ConsoleInput(_) => "console-input",
            Event::DiskRead(_) => "disk-read",
            Event::Switch(_) => "switch",
            Event::NetInput(_) => "net-input",
        }
    }

    /// Every name [`Event::kind_name`] can return: the exit kinds, then
    /// the other events.
    pub fn kind_names() -> Vec<&'static str> {
        ExitKind::ALL
            .iter()
            .map(|k| k.name())
            .chain([
                "poll",
                "time",
                "input",
                "platform",
                "entropy",
                "landing",
                "inject",
                "regs",
                "end",
                "rng",
                "console-input",
                "net-input",
                "disk-read",
                "switch",
            ])
            .collect()
    }
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Exit(e) => write!(f, "exit {e}"),
            Event::Poll => write!(f, "poll"),
            Event::Time(t) => write!(f, "time {t} ns"),
            Event::Input(b) => write!(f, "input {:?}", String::from_utf8_lossy(b)),
            Event::Platform(b) => write!(f, "platform {b:02x?}"),
            Event::Entropy(v) => write!(f, "entropy {v:#x}"),
            Event::Rng(b) => write!(f, "rng {} bytes", b.len()),
            Event::ConsoleInput(b) => write!(f, "console input {:?}", String::from_utf8_lossy(b)),
            Event::NetInput(b) => write!(f, "net input {} bytes", b.len().saturating_sub(4)),
            Event::DiskRead(b) => write!(f, "disk read {} bytes", b.len()),
            Event::Landing(l) => write!(
                f,
                "landing rip {:#x} regs {:#018x} mem {:#018x} ({} dirty pages){}",
                l.regs.rip,
                l.regs_digest,
                l.mem_digest,
                l.dirty_pages,
                match l.pending_interrupt {
                    Some(v) => format!(", interrupt {v:#x} still pending"),
                    None => String::new(),
                }
            ),
            Event::Inject(v) => write!(f, "inject vector {v:#x}"),
            Event::Regs(d) => write!(f, "regs {d:#018x}"),
            Event::Switch(cpu) => write!(f, "switch to vCPU {cpu}"),
            Event::End(e) => write!(
                f,
                "end ({}) regs {:#018x} mem {:#018x}",
                e.kind, e.regs_digest, e.mem_digest
            ),
        }
    }
}

/// How the events of an `Events` frame are stored (format version 8):
/// postcard of the machine's virtual TSC rate, the time shift and the
/// events, with the counters replaced by what a model of them does not
/// predict, so that zstd sees small, repetitive residuals instead of
/// growing absolute values:
///
/// - a time sample is stored as the change of its step: its difference
///   from the frame's previous sample (from 0 at the frame's start), in
///   units of 2^`time_shift` ns (the largest power of two that divides
///   every sample of the frame: a recording's samples are multiples of
///   [`crate::clock::RECORD_QUANTUM_NS`]), minus the previous step (the
///   exits of a loop come at a steady pace, so what is left is the jitter);
/// - a patched-instruction exit's value is stored as its difference from
///   what the event before it implies: the TSC at that time sample for
///   `rdtsc`, that entropy value for `rdrand` (both exactly, so nothing is
///   left); a read's value (port, MMIO, MSR: where counters show up) as
///   its difference from the previous read of the same kind and address in
///   the frame; what the guest writes is stored as it is.
///
/// Differences are zigzag-coded (a small step back stays small) and wrap,
/// so every value round-trips. Each frame decodes on its own, as seeking
/// needs.
#[derive(Serialize, Deserialize)]
struct EventFramePayload {
    tsc_khz: u32,
    time_shift: u8,
    events: Vec<Event>,
}

/// The state both directions of the frame codec keep.
struct FrameCoder {
    tsc_khz: u32,
    time_shift: u8,
    last_time: u64,
    /// The previous sample's step, in units of 2^`time_shift` ns.
    last_step: u64,
    /// The value the event just before implies for a patched exit.
    implied: Option<u64>,
    last_data: std::collections::HashMap<(ExitKind, u64), u64>,
}

fn zigzag(x: u64) -> u64 {
    let s = x as i64;
    ((s << 1) ^ (s >> 63)) as u64
}

fn unzigzag(z: u64) -> u64 {
    ((z >> 1) as i64 ^ -((z & 1) as i64)) as u64
}

impl FrameCoder {
    fn new(tsc_khz: u32, time_shift: u8) -> Self {
        FrameCoder {
            tsc_khz,
            time_shift,
            last_time: 0,
            last_step: 0,
            implied: None,
            last_data: std::collections::HashMap::new(),
        }
    }

    /// What the value of exit `r` is expected to be, if anything: stored
    /// values are differences from it (zigzag-coded), or the value itself
    /// where there is no prediction.
    fn predict(&self, r: &ExitRecord) -> Option<u64> {
        match (r.kind, self.implied) {
            (ExitKind::Patched, Some(v)) => Some(v),
            // Reads are where counters show up (timers, latches, status).
            (ExitKind::PioIn | ExitKind::MmioRead | ExitKind::MsrRead | ExitKind::Patched, _) => {
                self.last_data.get(&(r.kind, r.addr)).copied()
            }
            // What the guest writes (text, commands) compresses better as
            // it is.
            _ => None,
        }
    }

    /// Notes the plain `event` (after coding or decoding it).
    fn saw(&mut self, event: &Event) {
        self.implied = None;
        match event {
            Event::Time(t) => {
                self.last_step = t.wrapping_sub(self.last_time) >> self.time_shift;
                self.last_time = *t;
                self.implied = Some(crate::clock::virtual_tsc(*t, self.tsc_khz));
            }
            Event::Entropy(v) => self.implied = Some(*v),
            Event::Exit(r) => {
                self.last_data.insert((r.kind, r.addr), r.data);
            }
            _ => {}
        }
    }

    fn encode(&mut self, event: &Event) -> Event {
        let coded = match event {
            Event::Time(t) => {
                let step = t.wrapping_sub(self.last_time) >> self.time_shift;
                Event::Time(zigzag(step.wrapping_sub(self.last_step)))
            }
            Event::Exit(r) => Event::Exit(ExitRecord {
                data: self.predict(r).map_or(r.data, |p| zigzag(r.data.wrapping_sub(p))),
                ..*r
            }),
            other => other.clone(),
        };
        self.saw(event);
        coded
    }

    fn decode(&mut self, coded: Event) -> Event {
        let event = match coded {
            Event::Time(d) => {
                let step = self.last_step.wrapping_add(unzigzag(d));
                Event::Time(self.last_time.wrapping_add(step << self.time_shift))
            }
            Event::Exit(r) => Event::Exit(ExitRecord {
                data: self.predict(&r).map_or(r.data, |p| p.wrapping_add(unzigzag(r.data))),
                ..r
            }),
            other => other,
        };
        self.saw(&event);
        event
    }
}

/// Encodes `events` as an `Events` frame's payload, for a machine whose
/// virtual TSC runs at `tsc_khz` ([`EventFramePayload`]'s layout).
pub fn encode_events(events: &[Event], tsc_khz: u32) -> Result<Vec<u8>, postcard::Error> {
    let time_shift = events
        .iter()
        .filter_map(|e| match e {
            Event::Time(t) if *t != 0 => Some(t.trailing_zeros() as u8),
            _ => None,
        })
        .min()
        .unwrap_or(0);
    let mut coder = FrameCoder::new(tsc_khz, time_shift);
    let events = events.iter().map(|e| coder.encode(e)).collect();
    postcard::to_stdvec(&EventFramePayload {
        tsc_khz,
        time_shift,
        events,
    })
}

/// Decodes an `Events` frame's payload written by [`encode_events`].
pub fn decode_events(frame: &nyx_trace::Frame) -> nyx_trace::Result<Vec<Event>> {
    let offset = frame.info.offset;
    let (payload, rest): (EventFramePayload, _) =
        postcard::take_from_bytes(&frame.payload).map_err(|source| nyx_trace::Error::Decode {
            what: "events",
            offset,
            source,
        })?;
    if !rest.is_empty() {
        return Err(nyx_trace::Error::Corrupt {
            what: "events",
            offset,
            detail: format!("{} bytes after the encoded events", rest.len()),
        });
    }
    if payload.time_shift > 63 {
        return Err(nyx_trace::Error::Corrupt {
            what: "events",
            offset,
            detail: format!("a time shift of {} bits", payload.time_shift),
        });
    }
    let mut coder = FrameCoder::new(payload.tsc_khz, payload.time_shift);
    Ok(payload.events.into_iter().map(|e| coder.decode(e)).collect())
}

/// Reads frame number `index` of `reader` as events.
pub fn read_events(reader: &mut nyx_trace::TraceReader, index: usize) -> nyx_trace::Result<Vec<Event>> {
    decode_events(&reader.read_frame(index)?)
}

/// Appends `events` (whose first exit is at `first_position`) to `writer`
/// as an `Events` frame.
pub fn write_events(
    writer: &mut nyx_trace::TraceWriter,
    first_position: u64,
    events: &[Event],
    tsc_khz: u32,
) -> nyx_trace::Result<nyx_trace::FrameInfo> {
    let payload =
        encode_events(events, tsc_khz).map_err(|source| nyx_trace::Error::Encode { what: "events", source })?;
    writer.write_frame(nyx_trace::FrameKind::Events, first_position, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (0u64..0x10000, 1u8..9, any::<u64>(), any::<u64>()).prop_map(|(addr, size, data, rip)| Event::Exit(
                ExitRecord {
                    kind: ExitKind::PioOut,
                    addr,
                    size,
                    data,
                    rip
                }
            )),
            Just(Event::Poll),
            any::<u64>().prop_map(Event::Time),
            prop::collection::vec(any::<u8>(), 0..40).prop_map(Event::Input),
            prop::collection::vec(any::<u8>(), 0..8).prop_map(Event::Platform),
            any::<u64>().prop_map(Event::Entropy),
            prop::collection::vec(any::<u8>(), 0..40).prop_map(Event::Rng),
            prop::collection::vec(any::<u8>(), 0..40).prop_map(Event::ConsoleInput),
            prop::collection::vec(any::<u8>(), 0..80).prop_map(Event::NetInput),
            prop::collection::vec(any::<u8>(), 0..40).prop_map(Event::DiskRead),
            (any::<[u64; 16]>(), any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(gpr, rip, d, n)| {
                Event::Landing(Box::new(Landing {
                    regs: GprSnapshot { gpr, rip, rflags: 2 },
                    regs_digest: d,
                    dirty_pages: n,
                    mem_digest: !d,
                    pending_interrupt: (n % 3 == 0).then_some(0x20),
                    keyframe: None,
                }))
            }),
            any::<u8>().prop_map(Event::Inject),
            any::<u8>().prop_map(Event::Switch),
            (
                any::<u64>(),
                any::<u64>(),
                prop::collection::vec(any::<u8>(), 4096..4200),
                any::<u8>()
            )
                .prop_map(|(rax, gs_base, xsave, vector)| {
                    let mut vcpu = crate::vcpu_state::VcpuDelta {
                        xsave,
                        msrs: vec![(0xc000_0102, gs_base)],
                        ..Default::default()
                    };
                    vcpu.regs.rax = rax;
                    vcpu.sregs.gs.base = gs_base;
                    vcpu.events.interrupt.injected = 1;
                    vcpu.events.interrupt.nr = vector;
                    Event::Landing(Box::new(Landing {
                        regs: GprSnapshot::default(),
                        regs_digest: rax,
                        dirty_pages: 1,
                        mem_digest: gs_base,
                        pending_interrupt: Some(vector),
                        keyframe: Some(Box::new(Keyframe {
                            cpu: vector % 4,
                            vcpu,
                            pages: vec![crate::mem_state::PageRun {
                                gpa: 0x1000,
                                data: vec![vector; 4096],
                            }],
                            memory_digest: Some(rax),
                        })),
                    }))
                }),
        ]
    }

    proptest! {
        /// Events survive postcard, the encoding the trace uses.
        #[test]
        fn every_event_kind_is_listed(e in arb_event()) {
            prop_assert!(Event::kind_names().contains(&e.kind_name()), "{}", e.kind_name());
        }

        #[test]
        fn events_round_trip_through_postcard(events in prop::collection::vec(arb_event(), 0..50)) {
            let bytes = postcard::to_stdvec(&events).unwrap();
            let back: Vec<Event> = postcard::from_bytes(&bytes).unwrap();
            prop_assert_eq!(back, events);
        }

        /// Every sequence of events survives the frame codec, whatever the
        /// TSC rate, and so does a patched exit after a time sample or an
        /// entropy value, whether or not the value is the implied one.
        #[test]
        fn events_round_trip_through_the_frame_codec(
            events in prop::collection::vec(prop_oneof![
                arb_event(),
                (any::<u64>(), any::<bool>()).prop_map(|(d, near)| Event::Exit(ExitRecord {
                    kind: ExitKind::Patched,
                    addr: 0x1000,
                    size: 2,
                    data: if near { d % 8 } else { d },
                    rip: 0x1002,
                })),
            ], 0..60),
            tsc_khz in any::<u32>(),
        ) {
            let bytes = encode_events(&events, tsc_khz).unwrap();
            let back = decode_events(&frame_of(bytes)).unwrap();
            prop_assert_eq!(back, events);
        }
    }

    fn frame_of(payload: Vec<u8>) -> nyx_trace::Frame {
        nyx_trace::Frame {
            info: nyx_trace::FrameInfo {
                kind: nyx_trace::FrameKind::Events,
                first_position: 0,
                offset: 0,
                uncompressed_len: payload.len() as u32,
                compressed_len: 0,
            },
            payload,
        }
    }

    /// The codec's point: a time sample and the `rdtsc` that read it cost
    /// only the step from the previous sample.
    #[test]
    fn an_rdtsc_after_its_time_sample_costs_nothing_but_the_step() {
        let khz = 2_596_136;
        let mut events = Vec::new();
        for i in 0..1000u64 {
            let t = 4_000_000 + i * 90_000 + (i * 7919) % 5000;
            events.push(Event::Time(t));
            events.push(Event::Exit(ExitRecord {
                kind: ExitKind::Patched,
                addr: 0x1000c6,
                size: 2,
                data: crate::clock::virtual_tsc(t, khz),
                rip: 0x1000c8,
            }));
        }
        let zstd = |b: &[u8]| zstd::bulk::compress(b, nyx_trace::DEFAULT_ZSTD_LEVEL).unwrap().len();
        let plain = zstd(&postcard::to_stdvec(&events).unwrap());
        let coded = encode_events(&events, khz).unwrap();
        // About 1.7 bytes a sample is left: the step's own entropy.
        assert!(
            zstd(&coded) * 3 < plain,
            "{} coded bytes vs {plain} plain, compressed",
            zstd(&coded)
        );
        assert_eq!(decode_events(&frame_of(coded.clone())).unwrap(), events);
        // Trailing bytes and garbage are errors, not panics.
        let mut long = coded.clone();
        long.push(0);
        assert!(matches!(
            decode_events(&frame_of(long)),
            Err(nyx_trace::Error::Corrupt { .. })
        ));
        assert!(decode_events(&frame_of(coded[..coded.len() / 2].to_vec())).is_err());
    }

    #[test]
    fn every_exit_kind_is_in_all_once() {
        // A new kind breaks this match first: then add it to ALL.
        for k in ExitKind::ALL {
            match k {
                ExitKind::PioIn
                | ExitKind::PioOut
                | ExitKind::MmioRead
                | ExitKind::MmioWrite
                | ExitKind::Hlt
                | ExitKind::IrqWindow
                | ExitKind::MsrRead
                | ExitKind::MsrWrite
                | ExitKind::Patched
                | ExitKind::Crash
                | ExitKind::SoftInt => {}
            }
        }
        let names = Event::kind_names();
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
    }

    #[test]
    fn gpr_diff_names_registers() {
        let a = GprSnapshot {
            gpr: [0; 16],
            rip: 1,
            rflags: 2,
        };
        let mut b = a;
        b.gpr[2] = 7;
        b.rip = 3;
        assert_eq!(
            a.diff(&b),
            vec![
                "rcx: expected 0x0, got 0x7".to_string(),
                "rip: expected 0x1, got 0x3".into()
            ]
        );
    }
}
