//! `nyx`: the command-line front end. Each subcommand is a thin layer over
//! the crates: `run` builds a machine with `MachineBuilder` and runs it;
//! `demo` does the same with a bundled guest.
//!
//! Exit status of `run`: the value the guest wrote to the debug-exit port;
//! 0 when it halts with interrupts disabled, resets or powers off; 2 with a
//! crash report on stderr when it crashes; 1 for an error of Nyx or of its
//! input, with one line saying what is wrong.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use nyx_vmm::{MachineBuilder, RunOutcome, SerialIn};

mod demo;

/// Nyx: a KVM virtual machine monitor for debugging guests.
#[derive(Parser, Debug)]
#[command(name = "nyx", version, about)]
struct Cli {
    /// More messages from Nyx on stderr (-v: info, -vv: debug, -vvv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a kernel and run it until it exits, halts or crashes.
    Run(RunArgs),
    /// Boot the bundled demo guest and show what Nyx does.
    Demo(DemoArgs),
}

/// Options that describe a machine.
#[derive(Args, Debug, Clone)]
pub struct MachineArgs {
    /// Kernel: a Multiboot v1 ELF, a Linux bzImage or a vmlinux ELF.
    #[arg(long, value_name = "FILE")]
    kernel: PathBuf,
    /// Initial ramdisk (for Multiboot kernels: module 0).
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MIB", default_value_t = nyx_vmm::machine::DEFAULT_MEM_MIB)]
    mem: u64,
    /// Serial (COM1) input: a file, or - for stdin.
    #[arg(long, value_name = "FILE|-")]
    serial_in: Option<String>,
    /// The KVM device to open.
    #[arg(
        long,
        value_name = "PATH",
        env = "NYX_KVM_DEVICE",
        default_value = "/dev/kvm",
        hide = true
    )]
    kvm_device: String,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    machine: MachineArgs,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// The KVM device to open.
    #[arg(
        long,
        value_name = "PATH",
        env = "NYX_KVM_DEVICE",
        default_value = "/dev/kvm",
        hide = true
    )]
    kvm_device: String,
}

impl MachineArgs {
    fn builder(&self) -> MachineBuilder {
        let serial_in = match self.serial_in.as_deref() {
            None => SerialIn::None,
            Some("-") => SerialIn::Stdin,
            Some(p) => SerialIn::File(PathBuf::from(p)),
        };
        let mut b = MachineBuilder::new()
            .memory(self.mem)
            .kernel(&self.kernel)
            .cmdline(&self.cmdline)
            .serial_in(serial_in)
            .kvm_path(&self.kvm_device);
        if let Some(i) = &self.initrd {
            b = b.initrd(i);
        }
        b
    }
}

/// Runs a built machine to its end and turns the outcome into an exit code,
/// printing a crash report on stderr.
pub fn finish(outcome: &RunOutcome) -> ExitCode {
    match outcome {
        RunOutcome::Crashed(report) => eprint!("{report}"),
        RunOutcome::DebugExit(v) => tracing::info!("guest wrote {v:#x} to the debug-exit port"),
        RunOutcome::Halted => tracing::info!("guest halted"),
        RunOutcome::Reset => tracing::info!("guest requested a reset; the run ends there"),
        RunOutcome::PowerOff => tracing::info!("guest powered off"),
    }
    ExitCode::from(outcome.exit_status() as u8)
}

fn run(args: &RunArgs) -> Result<ExitCode, nyx_vmm::machine::Error> {
    let mut machine = args.machine.builder().build()?;
    let outcome = machine.run()?;
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

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("NYX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match &cli.command {
        Command::Run(a) => run(a),
        Command::Demo(a) => demo::run(&a.kvm_device),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nyx: {e}");
            ExitCode::from(1)
        }
    }
}
