//! `nyx`: the command-line front end. Each subcommand is a thin layer over
//! the crates: `run` builds a machine with `MachineBuilder` and runs it,
//! `record` and `replay` run it under the recorder's and the replayer's
//! hooks, `trace` looks into trace files, `demo` shows it all on a bundled
//! guest, `completions` and `man` print what shells and `man` need. How the
//! crates fit together: ARCHITECTURE.md at the repository root.
//!
//! Exit status of `run`, `record` and `replay`: the value the guest wrote to
//! the debug-exit port; 0 when it halts with interrupts disabled, resets or
//! powers off; 2 with a crash report on stderr when it crashes; 1 for an
//! error of Nyx or of its input, with one line saying what is wrong. `replay`
//! also: 3 with a divergence report when the guest does not do what the
//! recording says; 4 when the trace ends before the run (a recording that
//! was cut off), after replaying everything up to there.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use nyx_vmm::config::VerifyLevel;
use nyx_vmm::cpu_model::CpuModel;
use nyx_vmm::{MachineBuilder, RunOutcome, SerialIn};

mod api;
mod check;
mod demo;
mod logging;
mod manual;
mod progress;
mod prom;
mod report;
mod trace_cmd;
mod trace_export;

/// Nyx: a KVM virtual machine monitor for debugging guests.
#[derive(Parser, Debug)]
#[command(name = "nyx", version, about)]
struct Cli {
    /// More messages from Nyx on stderr (-v: info, -vv: debug, -vvv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a kernel and run it until it exits, halts or crashes.
    Run(RunArgs),
    /// Run a kernel like `run` and record everything nondeterministic into a trace.
    Record(RecordArgs),
    /// Re-execute a trace exactly, verifying every step.
    Replay(ReplayArgs),
    /// Look into a trace file.
    #[command(subcommand)]
    Trace(TraceCommand),
    /// Boot the bundled demo guest, record it, replay it and compare.
    Demo(DemoArgs),
    /// Continue a machine saved in a snapshot file.
    Restore(RestoreArgs),
    /// Send a command to a running nyx's control socket (--api).
    Ctl(CtlArgs),
    /// Why is the guest slow: its PCI functions, exit rates, hot ports, landings, with recommendations.
    Report(ReportArgs),
    /// Restore a snapshot, feed input, compare output and exit status; repeatedly.
    Check(check::CheckArgs),
    /// Print a shell completion script (e.g. `nyx completions bash > /etc/bash_completion.d/nyx`).
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page nyx(1), or with --out-dir write it and one page per subcommand there.
    Man {
        /// Write nyx.1, nyx-run.1, ... into this folder instead.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
struct RestoreArgs {
    /// The snapshot file.
    snapshot: PathBuf,
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    serial: SerialArgs,
    /// Where the snapshot's virtio-console goes: stdio, file:PATH,
    /// unix:PATH[,server], tcp:HOST:PORT[,server] or pty (default: its
    /// output nowhere, no input).
    #[arg(long, value_name = "CONSOLE")]
    virtio_console: Option<String>,
    #[command(flatten)]
    clock: check::ClockArgs,
    #[command(flatten)]
    kvm: KvmArgs,
}

/// The serial port (COM1): a console and where input comes from.
#[derive(Args, Debug, Clone)]
pub struct SerialArgs {
    /// Serial (COM1) input: a file, a FIFO or other stream, or - for stdin
    /// (it takes the place of the --serial console's input).
    #[arg(long, value_name = "FILE|-")]
    serial_in: Option<String>,
    /// Serial console, input and output: stdio, file:PATH (output only),
    /// unix:PATH[,server], tcp:HOST:PORT[,server] or pty (default: output
    /// to stdout, no input).
    #[arg(long, value_name = "CONSOLE")]
    serial: Option<String>,
    /// Allow a tcp: serial console on an address that is not loopback.
    #[arg(long, requires = "serial")]
    serial_allow_remote: bool,
}

impl SerialArgs {
    /// Opens the console (waiting for a connection to a server console)
    /// and the input: what the builder's `serial_in` and `serial_out` take.
    fn open(&self) -> Result<(SerialIn, Option<Box<dyn std::io::Write + Send>>), String> {
        let (mut input, output) = match &self.serial {
            None => (SerialIn::None, None),
            Some(spec) => {
                let spec = nyx_vmm::console::ConsoleSpec::parse(spec).map_err(|e| e.to_string())?;
                let c = nyx_vmm::console::open(&spec, self.serial_allow_remote, &mut |what| eprintln!("nyx: {what}"))
                    .map_err(|e| e.to_string())?;
                (c.input, Some(c.output))
            }
        };
        if self.serial_in.is_some() {
            input = serial_in_arg(self.serial_in.as_deref());
        }
        Ok((input, output))
    }
}

/// The KVM device option every command that builds a machine takes.
#[derive(Args, Debug, Clone)]
pub struct KvmArgs {
    /// The KVM device to open.
    #[arg(
        long,
        value_name = "PATH",
        env = "NYX_KVM_DEVICE",
        default_value = "/dev/kvm",
        hide = true
    )]
    pub kvm_device: String,
}

#[derive(Args, Debug)]
struct ReportArgs {
    /// A trace to analyse.
    #[arg(required_unless_present = "api", conflicts_with = "api")]
    trace: Option<PathBuf>,
    /// A running nyx's control socket: sample its metrics every 100 ms.
    #[arg(long, value_name = "SOCK")]
    api: Option<PathBuf>,
    /// How many 100 ms windows to sample with --api.
    #[arg(long, value_name = "N", default_value_t = 10)]
    windows: usize,
}

#[derive(Args, Debug)]
struct CtlArgs {
    /// The control socket.
    socket: PathBuf,
    /// pause, resume, snapshot, status, metrics, logs, migrate,
    /// power-button, sleep-button, wake, set or quit.
    command: String,
    /// The file for `snapshot`; the destination (tcp:HOST:PORT) for
    /// `migrate`; NAME=VALUE for `set` (lid=open|closed,
    /// battery=PCT[,charging], temperature=C).
    arg: Option<String>,
    /// `snapshot`: store memory uncompressed and page-aligned, for a
    /// restore that maps it copy-on-write instead of reading it (a larger
    /// file, which must stay as it is while a machine restored from it runs).
    #[arg(long)]
    mappable: bool,
    /// `migrate`: the most pre-copy passes over dirty pages after the first.
    #[arg(long, value_name = "N")]
    max_iterations: Option<u32>,
    /// `migrate`: stop pre-copying once a pass finds fewer dirty pages than N.
    #[arg(long, value_name = "N")]
    threshold_pages: Option<u64>,
    /// `migrate`: authenticate the stream with the key in FILE (the
    /// destination must have the same --migration-key).
    #[arg(long, value_name = "FILE")]
    migration_key: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct RecordArgs {
    /// The trace file to write (NAME.partial until the run ends).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// How landings are stored: `search` (digests; the replayer finds each
    /// with a hardware breakpoint), `keyframe` (a delta keyframe each, the
    /// replayer restores it), `auto` (keyframes where the guest stopped in a
    /// short loop or after more than 5 ms without an exit, where a search
    /// would be slow and, on an emulated KVM, can miss the landing).
    #[arg(long, value_name = "HOW", default_value = "auto", value_parser = ["search", "keyframe", "auto"])]
    landings: String,
    /// `full` also records a register digest after every exit.
    #[arg(long, value_name = "LEVEL", default_value = "exits", value_parser = ["exits", "full"])]
    verify: String,
    /// Start from this snapshot instead of booting a kernel (the machine,
    /// kernel and initrd come from the snapshot).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "initrd", "cpu"])]
    from_snapshot: Option<PathBuf>,
    #[command(flatten)]
    machine: MachineArgs,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    clock: check::ClockArgs,
}

#[derive(Args, Debug)]
struct ReplayArgs {
    /// The trace to replay.
    trace: PathBuf,
    #[command(flatten)]
    gdb: GdbArgs,
    /// Under gdb: milliseconds of run time between the checkpoints reverse
    /// execution restarts from (smaller: faster reverse steps, more memory).
    #[arg(long, value_name = "MS", default_value_t = 5)]
    checkpoint_interval: u64,
    /// A recorded disk's image, where it is not at the recorded path any
    /// more: give one per disk, in the recording's order (each must be the
    /// image recorded; the replay never writes to it).
    #[arg(long, value_name = "FILE")]
    disk: Vec<PathBuf>,
    /// Where the virtio-console's output goes: a file (default: nowhere;
    /// the replay serves its input from the trace).
    #[arg(long, value_name = "FILE")]
    virtio_console_out: Option<PathBuf>,
    #[command(flatten)]
    kvm: KvmArgs,
}

impl ReplayArgs {
    /// The replay options for these arguments.
    fn options(
        &self,
        serial_out: Option<Box<dyn std::io::Write + Send>>,
    ) -> Result<nyx_replayer::ReplayOptions, nyx_replayer::Error> {
        let console_out: Option<Box<dyn std::io::Write + Send>> = match &self.virtio_console_out {
            None => None,
            Some(p) => Some(Box::new(std::fs::File::create(p).map_err(|source| {
                nyx_replayer::Error::Machine(nyx_vmm::machine::Error::Read {
                    what: "virtio-console output (create)",
                    path: p.clone(),
                    source,
                })
            })?)),
        };
        Ok(nyx_replayer::ReplayOptions {
            serial_out,
            kvm_path: self.kvm.kvm_device.clone(),
            disks: self.disk.clone(),
            console_out,
        })
    }
}

#[derive(Subcommand, Debug)]
enum TraceCommand {
    /// Configuration, event counts, sizes, compression, guest time.
    Info {
        /// The trace.
        trace: PathBuf,
    },
    /// One line per event.
    Dump {
        /// The trace.
        trace: PathBuf,
        /// Start at this position (guest-caused exits).
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Only events of this kind (exit kinds: pio-in, pio-out, hlt, ...; time, input, landing, poll, inject, entropy, end).
        #[arg(long)]
        kind: Option<String>,
    },
    /// Check every checksum, the index and completeness.
    Verify {
        /// The trace.
        trace: PathBuf,
    },
    /// Write the trace for another tool: Chrome trace-event JSON (Perfetto,
    /// chrome://tracing) on the guest's virtual-time axis, one track per
    /// exit kind, interrupts, landings, serial output, inputs and the end.
    Export {
        /// The trace.
        trace: PathBuf,
        /// The format.
        #[arg(long, value_enum, default_value_t = trace_export::Format::Chrome)]
        format: trace_export::Format,
        /// Write to FILE (default: stdout).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Replay the trace first (needs KVM) and add what reaching each
        /// landing cost the replay: host time of its search or keyframe
        /// restore, breakpoint hits.
        #[arg(long)]
        replay: bool,
        /// With --replay: a recorded disk's image, where it is not at the
        /// recorded path any more (one per disk, in the recording's order).
        #[arg(long, value_name = "FILE", requires = "replay")]
        disk: Vec<PathBuf>,
        #[command(flatten)]
        kvm: KvmArgs,
    },
}

/// Where log messages go.
#[derive(Args, Debug)]
struct LogArgs {
    /// Levels per component: COMPONENT=LEVEL,... with components vmm, device, guest,
    /// record, replay, gdb, migration, api and * for the rest (e.g. device=debug,*=warn).
    #[arg(long, value_name = "SPEC", global = true)]
    log: Option<String>,
    /// Also log to FILE, rotated by size.
    #[arg(long, value_name = "FILE", global = true)]
    log_file: Option<PathBuf>,
    /// Rotate the log file when it reaches MIB mebibytes.
    #[arg(long, value_name = "MIB", default_value_t = 10, global = true)]
    log_file_max: u64,
    /// Rotated log files to keep (FILE.1 .. FILE.N).
    #[arg(long, value_name = "N", default_value_t = 3, global = true)]
    log_file_keep: usize,
    /// Also log to syslog (/dev/log, RFC 5424).
    #[arg(long, global = true)]
    syslog: bool,
    /// Keep the last N log entries in memory (crash reports, the API's `logs`).
    #[arg(long, value_name = "N", default_value_t = 10_000, global = true)]
    log_ring: usize,
}

/// Options that describe a machine.
#[derive(Args, Debug, Clone)]
pub struct MachineArgs {
    /// Kernel: a Multiboot v1 ELF, a Linux bzImage or a vmlinux ELF (required,
    /// except by `record --from-snapshot`).
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (for Multiboot kernels: module 0).
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MIB", default_value_t = nyx_vmm::machine::DEFAULT_MEM_MIB)]
    mem: u64,
    #[command(flatten)]
    serial: SerialArgs,
    /// The CPU model the guest sees: baseline (the default; runs on any
    /// x86-64 KVM, hardware or emulated) or host (what KVM reports); `help`
    /// lists them. A snapshot, trace or migrated machine keeps its own.
    #[arg(long, value_name = "MODEL", default_value = "baseline")]
    cpu: String,
    /// The interrupt controllers and the platform around them: apic (the
    /// default: a local APIC and an IOAPIC beside the 8259A PICs, HPET, ACPI
    /// tables and power management, ISA DMA) or legacy (the PIC pair of a
    /// 1980s PC, no ACPI). A snapshot, trace or migrated machine keeps its own.
    #[arg(long, value_name = "KIND", default_value = "apic")]
    irqchip: String,
    /// vCPUs (1 to 64): with more than one, `run` runs each on a host
    /// thread of its own, in parallel (and stops them all for a snapshot
    /// or a migration); under --gdb, a recording, its replay and `nyx
    /// check` they run one at a time, switching every 10 ms. The guest
    /// starts the APs with INIT and start-up IPIs, as on a PC (the MADT
    /// lists them). Several vCPUs need --irqchip apic.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: usize,
    /// A virtio-blk disk: FILE[,format=raw|qcow2][,readonly][,id=NAME];
    /// give it again for more disks. Without format, a file with the qcow2
    /// magic is qcow2 and any other raw. A plain run writes to the image; a
    /// recording never changes it (writes stay in memory) and stores the
    /// file's SHA-256, which a replay checks.
    #[arg(long, value_name = "FILE[,OPTIONS]")]
    disk: Vec<String>,
    /// A virtio-rng device (entropy from the host, recorded).
    #[arg(long)]
    rng: bool,
    /// A virtio-console, a second console beside COM1: stdio,
    /// file:PATH, unix:PATH[,server], tcp:HOST:PORT[,server] or pty (with
    /// --incoming: where the migrated machine's virtio-console goes).
    #[arg(long, value_name = "CONSOLE")]
    virtio_console: Option<String>,
    /// A virtio-net NIC: virtio,stream=unix:PATH|tcp:HOST:PORT[,server]
    /// [,mac=MAC][,capture=FILE] (frames framed as QEMU's `-netdev stream` does:
    /// another Nyx, a QEMU or passt at the other end; `server` listens and
    /// waits for the peer before the guest starts; `capture` writes every
    /// frame in and out to FILE in pcap format); give it again for more
    /// NICs. The default
    /// MAC is 52:54:00:12:34:56 plus the NIC's index. A recording logs
    /// every frame the guest receives; its replay needs no network.
    #[arg(long, value_name = "MODEL,BACKEND[,OPTIONS]")]
    net: Vec<String>,
    /// With `record`: put what every disk read returned into the trace, so
    /// that the trace replays without the images (the trace grows by every
    /// byte read; without it the trace holds each image's SHA-256 and the
    /// replay needs the image).
    #[arg(long)]
    embed_disks: bool,
    #[command(flatten)]
    kvm: KvmArgs,
}

/// Limits that end a run cleanly before the guest does.
#[derive(Args, Debug, Clone, Default)]
pub struct LimitArgs {
    /// Stop once the guest's serial output contains TEXT (exit status 0);
    /// a recording's replay stops at the same point.
    #[arg(long, value_name = "TEXT")]
    until_output: Option<String>,
    /// Stop once the guest's virtual time reaches DURATION (10s, 250ms, 2m).
    #[arg(long, value_name = "DURATION", value_parser = nyx_vmm::machine::limits::parse_duration)]
    max_guest_time: Option<u64>,
}

impl LimitArgs {
    /// The machine's limits.
    pub fn limits(&self) -> nyx_vmm::machine::limits::Limits {
        nyx_vmm::machine::limits::Limits {
            until_output: self.until_output.clone().filter(|t| !t.is_empty()),
            max_guest_ns: self.max_guest_time,
        }
    }
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    machine: MachineArgs,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    gdb: GdbArgs,
    /// With --gdb: hold the guest before its first instruction until gdb
    /// attaches (without it the guest runs, and gdb may attach at any time).
    #[arg(long, requires = "gdb")]
    gdb_wait: bool,
    #[command(flatten)]
    serve: ServeArgs,
    /// Receive a migrating machine on tcp:HOST:PORT (port 0 picks a free
    /// one) and run it; machine, kernel and state come from the source. Its
    /// disks are opened at the source's paths (shared storage) and must
    /// have the sizes they had there; --serial and --virtio-console say
    /// where its consoles go here.
    #[arg(
        long,
        value_name = "tcp:HOST:PORT",
        conflicts_with_all = ["kernel", "initrd", "gdb", "cpu", "disk", "rng", "embed_disks", "net"]
    )]
    incoming: Option<String>,
    #[command(flatten)]
    clock: check::ClockArgs,
    /// Allow an --incoming address that is not loopback (give a
    /// --migration-key too: without one anyone who reaches it can send a machine).
    #[arg(long, requires = "incoming")]
    incoming_allow_remote: bool,
    /// Accept only a migration authenticated with the key in FILE (at least
    /// 16 bytes; the source's `nyx ctl ... migrate --migration-key FILE`).
    #[arg(long, value_name = "FILE", requires = "incoming")]
    migration_key: Option<PathBuf>,
}

/// The control socket and the metrics of a running machine.
#[derive(Args, Debug)]
struct ServeArgs {
    /// Serve the control socket (pause, resume, snapshot, status, metrics, logs, migrate, quit) at PATH.
    #[arg(long, value_name = "PATH")]
    api: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP at ADDR (127.0.0.1:PORT, or :PORT).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Allow a --metrics address that is not loopback.
    #[arg(long, requires = "metrics")]
    metrics_allow_remote: bool,
    /// Do not collect per-exit metrics (counts, latencies, ports).
    #[arg(long)]
    no_metrics: bool,
}

impl ServeArgs {
    /// Switches per-exit metrics on or off and serves --metrics.
    fn start_metrics(&self, machine: &nyx_vmm::Machine) -> Result<(), String> {
        machine.metrics().set_enabled(!self.no_metrics);
        if let Some(spec) = &self.metrics {
            let addr = prom::parse_addr(spec, self.metrics_allow_remote).map_err(|e| e.to_string())?;
            let local = prom::serve(addr, machine.metrics().clone()).map_err(|e| e.to_string())?;
            eprintln!("nyx: metrics at http://{local}/metrics");
        }
        Ok(())
    }
}

/// Debugging with gdb. A live guest (`run`) runs until gdb attaches and
/// stops where it is then, unless --gdb-wait holds it before its first
/// instruction; a replay always waits for gdb at its start. After gdb
/// detaches the guest runs on to its end; a kill from gdb ends nyx with
/// status 0.
#[derive(Args, Debug)]
struct GdbArgs {
    /// Listen for gdb on ADDR (HOST:PORT, or :PORT for 127.0.0.1; port 0 picks a free one).
    #[arg(long, value_name = "ADDR")]
    gdb: Option<String>,
    /// Allow a gdb address that is not loopback.
    #[arg(long, requires = "gdb")]
    gdb_allow_remote: bool,
}

/// Serves gdb on a live `machine` when --gdb was given: Some(exit code)
/// then. Without `wait` the guest runs until gdb attaches.
fn gdb_session(args: &GdbArgs, wait: bool, machine: &mut nyx_vmm::Machine) -> Option<ExitCode> {
    let spec = args.gdb.as_ref()?;
    // A live guest's memory is the debugger's to change: software
    // breakpoints are int3 bytes, as many as wanted (a replay's memory must
    // stay as recorded, so it uses the four debug registers).
    let opts = nyx_gdb::ServeOptions {
        int3_in_memory: true,
        ..Default::default()
    };
    let end = nyx_gdb::listen(spec, args.gdb_allow_remote).and_then(|server| {
        let addr = server.local_addr()?;
        if wait {
            eprintln!("nyx: waiting for gdb on {addr}");
            return nyx_gdb::serve(machine, server.accept()?, opts);
        }
        eprintln!("nyx: the guest runs; gdb can attach on {addr}");
        match server.run_until_attach(machine)? {
            nyx_gdb::Attach::Connected(conn) => nyx_gdb::serve(machine, conn, opts),
            nyx_gdb::Attach::Ended(end) => Ok(end),
        }
    });
    Some(debug_end(end))
}

/// A gdb session on a replay: it waits for gdb at its start, and gdb can
/// also go backwards.
fn gdb_replay_session(
    args: &GdbArgs,
    machine: &mut nyx_vmm::Machine,
    timeline: &mut nyx_replayer::Timeline,
) -> Option<ExitCode> {
    let spec = args.gdb.as_ref()?;
    let opts = nyx_gdb::ServeOptions::default();
    let end = nyx_gdb::listen(spec, args.gdb_allow_remote).and_then(|server| {
        eprintln!("nyx: waiting for gdb on {}", server.local_addr()?);
        nyx_gdb::serve_replay(machine, timeline, server.accept()?, opts)
    });
    Some(debug_end(end))
}

/// The exit code of a finished gdb session.
fn debug_end(end: Result<nyx_gdb::DebugEnd, nyx_gdb::Error>) -> ExitCode {
    match end {
        Ok(nyx_gdb::DebugEnd::Ended(outcome)) => finish(&outcome),
        Ok(nyx_gdb::DebugEnd::Killed) => {
            eprintln!("nyx: killed by gdb");
            ExitCode::SUCCESS
        }
        Ok(nyx_gdb::DebugEnd::Stopped(nyx_vmm::hooks::HookError::TraceEnd { position })) => {
            eprintln!("nyx: the trace ends at position {position}");
            ExitCode::from(4)
        }
        Ok(nyx_gdb::DebugEnd::Stopped(nyx_vmm::hooks::HookError::Divergence(text))) => {
            eprint!("{text}");
            ExitCode::from(3)
        }
        Ok(nyx_gdb::DebugEnd::Stopped(e)) => {
            eprintln!("nyx: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("nyx: {e}");
            ExitCode::from(1)
        }
    }
}

/// `nyx replay FILE --gdb ADDR`: debugging a replay, forward and backward.
fn replay_gdb(args: &ReplayArgs) -> Result<ExitCode, nyx_replayer::Error> {
    let opts = args.options(None)?;
    let (mut machine, mut timeline) = nyx_replayer::debug_replay(&args.trace, opts)?;
    timeline.set_interval(std::time::Duration::from_millis(args.checkpoint_interval.max(1)));
    Ok(gdb_replay_session(&args.gdb, &mut machine, &mut timeline).unwrap_or(ExitCode::SUCCESS))
}

#[derive(Args, Debug)]
struct DemoArgs {
    #[command(flatten)]
    kvm: KvmArgs,
}

impl MachineArgs {
    /// The kernel, which every command but `record --from-snapshot` needs.
    fn kernel(&self) -> Result<&PathBuf, String> {
        self.kernel
            .as_ref()
            .ok_or_else(|| "give the kernel to boot (--kernel FILE), or for `record` a snapshot to start from (--from-snapshot FILE)".to_string())
    }

    /// The `--cpu` model; None for `--cpu help` (the caller prints the list).
    fn cpu_model(&self) -> Result<Option<CpuModel>, String> {
        match self.cpu.as_str() {
            "help" => Ok(None),
            name => CpuModel::parse(name).map(Some).map_err(|e| e.to_string()),
        }
    }

    /// The `--irqchip` kind.
    fn irqchip(&self) -> Result<nyx_vmm::config::Irqchip, String> {
        nyx_vmm::config::Irqchip::parse(&self.irqchip)
    }

    /// The PCI functions of `--disk`, `--rng`, `--virtio-console` and
    /// `--net` (opening the console and the network backends, waiting for
    /// a server's peer).
    fn pci_setup(&self) -> Result<nyx_vmm::pci_setup::PciSetup, String> {
        let mut disks = Vec::new();
        for d in &self.disk {
            disks.push(d.parse::<nyx_vmm::disk::DiskSpec>().map_err(|e| e.to_string())?);
        }
        let console = virtio_console(self.virtio_console.as_deref())?;
        let mut nets = Vec::new();
        for (i, spec) in self.net.iter().enumerate() {
            let spec = nyx_vmm::netdev::NetSpec::parse(spec, i).map_err(|e| e.to_string())?;
            let (out, input) = nyx_vmm::netdev::open_spec(&spec).map_err(|e| e.to_string())?;
            nets.push(nyx_vmm::pci_setup::NetIo {
                mac: spec.mac,
                out,
                input,
            });
        }
        Ok(nyx_vmm::pci_setup::PciSetup {
            disks,
            rng: self.rng,
            console,
            nets,
            embed_disks: self.embed_disks,
        })
    }

    fn builder(&self, cpu: CpuModel) -> Result<MachineBuilder, String> {
        let kernel = self.kernel()?;
        let (serial_in, serial_out) = self.serial.open()?;
        let mut b = MachineBuilder::new()
            .memory(self.mem)
            .kernel(kernel)
            .cmdline(&self.cmdline)
            .cpu_model(cpu)
            .irqchip(self.irqchip()?)
            .cpus(self.cpus)
            .serial_in(serial_in)
            .pci(self.pci_setup()?)
            .kvm_path(&self.kvm.kvm_device);
        if let Some(out) = serial_out {
            b = b.serial_out(out);
        }
        if let Some(i) = &self.initrd {
            b = b.initrd(i);
        }
        Ok(b)
    }
}

/// Opens the `--virtio-console` console `spec`, if given (waiting for a
/// server console's client).
fn virtio_console(spec: Option<&str>) -> Result<Option<nyx_vmm::pci_setup::ConsoleIo>, String> {
    let Some(spec) = spec else { return Ok(None) };
    let spec = nyx_vmm::console::ConsoleSpec::parse(spec).map_err(|e| format!("--virtio-console: {e}"))?;
    let c = nyx_vmm::console::open(&spec, false, &mut |what| eprintln!("nyx: virtio-console: {what}"))
        .map_err(|e| format!("--virtio-console: {e}"))?;
    Ok(Some(nyx_vmm::pci_setup::ConsoleIo {
        out: c.output,
        input: c.input,
    }))
}

/// Gives a saved machine's virtio-console the console opened for it;
/// warns when the machine has none.
fn with_virtio_console(b: MachineBuilder, console: Option<nyx_vmm::pci_setup::ConsoleIo>) -> MachineBuilder {
    match console {
        Some(_) if !b.has_virtio_console() => {
            eprintln!("nyx: warning: the machine has no virtio-console; --virtio-console is not used");
            b
        }
        Some(c) => b.virtio_console(c),
        None => b,
    }
}

/// Runs a built machine to its end and turns the outcome into an exit code,
/// printing a crash report on stderr.
pub fn finish(outcome: &RunOutcome) -> ExitCode {
    match outcome {
        RunOutcome::Crashed(report) => eprint!("{report}{}", logging::crash_tail()),
        RunOutcome::DebugExit(v) => tracing::info!("guest wrote {v:#x} to the debug-exit port"),
        RunOutcome::Halted => tracing::info!("guest halted"),
        RunOutcome::Reset => tracing::info!("guest requested a reset; the run ends there"),
        RunOutcome::PowerOff => tracing::info!("guest powered off"),
        RunOutcome::Limit(l) => eprintln!("nyx: stopped: {l}"),
    }
    ExitCode::from(outcome.exit_status() as u8)
}

fn record(args: &RecordArgs) -> Result<ExitCode, String> {
    let m = &args.machine;
    let verify = if args.verify == "full" {
        VerifyLevel::Full
    } else {
        VerifyLevel::Exits
    };
    let landings = match args.landings.as_str() {
        "search" => nyx_recorder::LandingPolicy::Search,
        "keyframe" => nyx_recorder::LandingPolicy::Keyframe,
        _ => nyx_recorder::LandingPolicy::Auto,
    };
    let Some(cpu) = m.cpu_model()? else {
        print!("{}", CpuModel::help());
        return Ok(ExitCode::SUCCESS);
    };
    if args.from_snapshot.is_none() {
        m.kernel()?;
    }
    let (serial_in, serial_out) = m.serial.open()?;
    let started = match &args.from_snapshot {
        Some(snapshot) => nyx_recorder::start_from_snapshot(nyx_recorder::SnapshotRecordOptions {
            snapshot: snapshot.clone(),
            out: args.out.clone(),
            serial_in,
            serial_out,
            kvm_path: m.kvm.kvm_device.clone(),
            verify,
            landings,
            check: args.clock.check_hooks().map(|(h, _)| h),
        }),
        None => nyx_recorder::start_with_clock(
            nyx_recorder::RecordOptions {
                cpus: m.cpus,
                out: args.out.clone(),
                kernel: m.kernel()?.clone(),
                kernel_name: None,
                initrd: m.initrd.clone(),
                cmdline: m.cmdline.clone(),
                mem_mib: m.mem,
                serial_in,
                serial_out,
                kvm_path: m.kvm.kvm_device.clone(),
                verify,
                landings,
                cpu,
                irqchip: m.irqchip()?,
                pci: m.pci_setup()?,
            },
            args.clock.check_hooks().map(|(h, _)| h),
        ),
    };
    let mut session = started.map_err(|e| e.to_string())?;
    session.machine().set_limits(args.limits.limits());
    args.serve.start_metrics(session.machine())?;
    let run = match run_machine(session.machine(), args.serve.api.as_deref()) {
        Ok(Some(outcome)) => Ok(outcome),
        Ok(None) => {
            let path = session.abandon().map_err(|e| e.to_string())?;
            eprintln!(
                "nyx: recording stopped through the control socket; {} replays up to there",
                path.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => Err(std::io::Error::other(e).into()),
    };
    let rec = session.finish(run).map_err(|e| e.to_string())?;
    eprintln!(
        "nyx: recorded {} events ({} exits, {} landings) into {}",
        rec.events,
        rec.exits,
        rec.landings,
        rec.path.display()
    );
    Ok(finish(&rec.outcome))
}

fn replay(args: &ReplayArgs) -> Result<ExitCode, nyx_replayer::Error> {
    if args.gdb.gdb.is_some() {
        return replay_gdb(args);
    }
    let (bar, progress) = progress::replay(&args.trace).unzip();
    let r =
        nyx_replayer::replay_with_progress(&args.trace, args.options(progress::serial_out(bar.as_ref()))?, progress);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    match r {
        Ok(rep) => {
            tracing::info!(
                "replayed {} exits, {} landings ({} breakpoint hits, at most {} for one)",
                rep.exits,
                rep.landings,
                rep.search_hits,
                rep.max_hits
            );
            match rep.end {
                nyx_replayer::ReplayEnd::Complete { outcome } => Ok(finish(&outcome)),
                nyx_replayer::ReplayEnd::Truncated { position } => {
                    eprintln!(
                        "nyx: the trace ends at position {position} (the recording was cut off); everything up to there replayed and matched"
                    );
                    Ok(ExitCode::from(4))
                }
            }
        }
        Err(nyx_replayer::Error::Diverged(d)) => {
            eprint!("{d}");
            Ok(ExitCode::from(3))
        }
        Err(e) => Err(e),
    }
}

/// `nyx run --incoming tcp:HOST:PORT`: receives a migrating machine, tells
/// the source that it runs, and runs it as `nyx restore` would.
fn incoming(args: &RunArgs, spec: &str) -> Result<ExitCode, String> {
    use nyx_vmm::migration;
    let key = match &args.migration_key {
        Some(path) => Some(nyx_vmm::migration_auth::Key::from_file(path)?),
        None => None,
    };
    let listener = migration::listen(spec, args.incoming_allow_remote).map_err(|e| e.to_string())?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    if key.is_none() && !nyx_vmm::net::is_loopback(local.ip()) {
        eprintln!("nyx: warning: tcp:{local} accepts a machine from anyone who reaches it; give --migration-key FILE");
    }
    // The consoles first: a server console waits for its client here, not
    // while the source waits for the confirmation.
    let (serial_in, serial_out) = args.machine.serial.open()?;
    let console = virtio_console(args.machine.virtio_console.as_deref())?;
    eprintln!("nyx: waiting for a migration on tcp:{local}");
    let mut shown = progress::Receiving::new();
    let accepted = migration::accept(&listener, key.as_ref(), &mut |p| shown.update(p));
    shown.finish();
    let (received, confirm) = accepted.map_err(|e| format!("migration rejected: {e}"))?;
    let peer = confirm.peer;
    let (frames, runs) = (received.frames, received.runs);
    let mut b = with_virtio_console(MachineBuilder::from_received(received), console)
        .serial_in(serial_in)
        .kvm_path(&args.machine.kvm.kvm_device);
    if let Some(out) = serial_out {
        b = b.serial_out(out);
    }
    let mut machine = match b.build() {
        Ok(m) => m,
        Err(e) => {
            confirm.refuse(&e.to_string());
            return Err(format!("migration rejected: cannot build the machine: {e}"));
        }
    };
    args.serve.start_metrics(&machine)?;
    confirm
        .running()
        .map_err(|e| format!("migration from {peer}: the source did not hear that the machine runs here: {e}"))?;
    eprintln!("nyx: machine migrated in from {peer} ({frames} frames, {runs} memory runs); running");
    match run_machine(&mut machine, args.serve.api.as_deref())? {
        Some(outcome) => Ok(finish(&outcome)),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// Runs a built machine to its end, serving the control socket if asked.
fn run_machine(machine: &mut nyx_vmm::Machine, api: Option<&std::path::Path>) -> Result<Option<RunOutcome>, String> {
    match api {
        None => machine.run().map(Some).map_err(|e| e.to_string()),
        Some(path) => {
            let kicker = machine.kicker().map_err(|e| e.to_string())?;
            let api = api::listen(path, kicker)?;
            api::run(machine, &api).map_err(|e| e.to_string())
        }
    }
}

fn serial_in_arg(arg: Option<&str>) -> SerialIn {
    match arg {
        None => SerialIn::None,
        Some("-") => SerialIn::Stdin,
        Some(p) => SerialIn::File(PathBuf::from(p)),
    }
}

fn restore(args: &RestoreArgs) -> Result<ExitCode, String> {
    let mut b = progress::restore_builder(&args.snapshot)
        .map_err(|e| e.to_string())?
        .kvm_path(&args.kvm.kvm_device);
    let (serial_in, serial_out) = args.serial.open()?;
    b = with_virtio_console(b, virtio_console(args.virtio_console.as_deref())?).serial_in(serial_in);
    if let Some(out) = serial_out {
        b = b.serial_out(out);
    }
    if let Some((hooks, _)) = args.clock.check_hooks() {
        b = b.hooks(Box::new(hooks));
    }
    let mut machine = b.build().map_err(|e| e.to_string())?;
    args.serve.start_metrics(&machine)?;
    match run_machine(&mut machine, args.serve.api.as_deref())? {
        Some(outcome) => Ok(finish(&outcome)),
        None => Ok(ExitCode::SUCCESS),
    }
}

fn run(args: &RunArgs) -> Result<ExitCode, String> {
    if let Some(spec) = &args.incoming {
        return incoming(args, spec);
    }
    let Some(cpu) = args.machine.cpu_model()? else {
        print!("{}", CpuModel::help());
        return Ok(ExitCode::SUCCESS);
    };
    // Under gdb, several vCPUs run one at a time: every stop stops the
    // whole machine, and a step runs one vCPU.
    let mut b = args.machine.builder(cpu)?.one_at_a_time(args.gdb.gdb.is_some());
    if let Some((hooks, _)) = args.clock.check_hooks() {
        b = b.hooks(Box::new(hooks));
    }
    let mut machine = b.build().map_err(|e| e.to_string())?;
    machine.set_limits(args.limits.limits());
    tracing::info!(target: "nyx::vmm", "machine built: kernel {}, {} MiB", args.machine.kernel()?.display(), args.machine.mem);
    args.serve.start_metrics(&machine)?;
    if let Some(code) = gdb_session(&args.gdb, args.gdb_wait, &mut machine) {
        return Ok(code);
    }
    let Some(outcome) = run_machine(&mut machine, args.serve.api.as_deref())? else {
        return Ok(ExitCode::SUCCESS);
    };
    let s = machine.stats();
    tracing::info!(
        "exits: {} (pio {}, mmio {}, hlt {}, irq window {}, msr {}), kicks {}, interrupts injected {}; \
         run {} us wall, {} us user, {} us sys",
        s.exits(),
        s.pio,
        s.mmio,
        s.hlt,
        s.irq_window,
        s.msr,
        s.kicks,
        s.injected,
        s.wall_ns / 1000,
        s.user_ns / 1000,
        s.sys_ns / 1000
    );
    Ok(finish(&outcome))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = logging::LogOptions {
        verbose: cli.verbose,
        spec: cli.log.log.clone(),
        file: cli.log.log_file.clone(),
        file_max_mib: cli.log.log_file_max,
        file_keep: cli.log.log_file_keep,
        syslog: cli.log.syslog,
        ring: cli.log.log_ring,
    };
    if let Err(e) = logging::init(&log) {
        eprintln!("nyx: {e}");
        return ExitCode::from(1);
    }
    let result: Result<ExitCode, String> = match &cli.command {
        Command::Run(a) => run(a),
        Command::Restore(a) => restore(a),
        Command::Ctl(a) => api::ctl(
            &a.socket,
            &api::Request {
                mappable: a.mappable.then_some(true),
                max_iterations: a.max_iterations,
                threshold_pages: a.threshold_pages,
                // The machine's process reads the key: give it a path that
                // does not depend on this directory.
                key: a
                    .migration_key
                    .as_ref()
                    .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
                ..api::Request::new(&a.command, a.arg.as_deref())
            },
        ),
        Command::Report(a) => match (&a.trace, &a.api) {
            (_, Some(sock)) => report::report_live(sock, a.windows.max(1)),
            (Some(t), None) => report::report_trace(t),
            (None, None) => Err(report::ReportError::Api("give a trace or --api SOCK".into())),
        }
        .map(|text| {
            print!("{text}");
            ExitCode::SUCCESS
        })
        .map_err(|e| e.to_string()),
        Command::Check(a) => check::main(a),
        Command::Record(a) => record(a),
        Command::Replay(a) => replay(a).map_err(|e| e.to_string()),
        Command::Trace(TraceCommand::Info { trace }) => trace_cmd::info(trace).map_err(|e| e.to_string()),
        Command::Trace(TraceCommand::Dump { trace, from, kind }) => {
            trace_cmd::dump(trace, *from, kind.as_deref()).map_err(|e| e.to_string())
        }
        Command::Trace(TraceCommand::Verify { trace }) => trace_cmd::verify(trace).map_err(|e| e.to_string()),
        Command::Trace(TraceCommand::Export {
            trace,
            format,
            out,
            replay,
            disk,
            kvm,
        }) => trace_export::run(
            trace,
            *format,
            out.as_deref(),
            replay.then_some((kvm.kvm_device.as_str(), disk.as_slice())),
        )
        .map_err(|e| e.to_string()),
        Command::Demo(a) => demo::run(&a.kvm.kvm_device),
        Command::Completions { shell } => manual::quiet_on_closed_pipe(manual::completions(
            Cli::command(),
            *shell,
            &mut std::io::stdout().lock(),
        ))
        .map(|()| ExitCode::SUCCESS)
        .map_err(|e| format!("cannot write the completion script: {e}")),
        Command::Man { out_dir } => match out_dir {
            None => manual::quiet_on_closed_pipe(manual::man(Cli::command(), &mut std::io::stdout().lock())),
            Some(dir) => manual::man_pages(Cli::command(), dir)
                .map(|n| eprintln!("nyx: wrote {n} man pages into {}", dir.display())),
        }
        .map(|()| ExitCode::SUCCESS)
        .map_err(|e| format!("cannot write the man page: {e}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nyx: {e}");
            ExitCode::from(1)
        }
    }
}
