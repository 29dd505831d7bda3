//! The command line: one subcommand per module, each with its own argument
//! struct and `run` function. Output is a table (or text) by default and JSON
//! with `--json`, per INTERFACE.md.

mod agent;
mod analyze;
mod capture;
mod diagnose;
pub mod dump;
mod findings;
mod ps;
mod record;
mod repair;
mod report;
mod targets;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Diagnose running Python processes from the outside: stacks, deadlocks,
/// profiles, leaks; then propose reviewed, reversible fixes.
#[derive(Debug, Parser)]
#[command(name = "pymedic", version, propagate_version = true)]
pub struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the Python processes on this host (or watch them come and go).
    Ps(ps::PsArgs),
    /// Run every detector against one live process for a while and report.
    Diagnose(diagnose::DiagnoseArgs),
    /// The node daemon: watch Python processes, store findings, serve gRPC and /metrics.
    Agent(agent::AgentArgs),
    /// Findings stored by an agent: list, watch, show.
    Findings(findings::FindingsArgs),
    /// Ask an agent for a capture (stack dump, CPU or off-CPU profile) and download it.
    Capture(capture::CaptureArgs),
    /// The Python processes an agent sees and watches.
    Targets(targets::TargetsArgs),
    /// Every thread's Python stack now, with names, GIL, what each waits
    /// for, and deadlock verdicts.
    Dump(dump::DumpArgs),
    /// Record a CPU (or, with --off-cpu, wall-clock) profile of Python
    /// processes: pprof, speedscope, flame graph or collapsed stacks.
    Record(record::RecordArgs),
    /// Static analysis of a Python source tree: import graph, impact, lock
    /// order, resource leaks, blocking calls in coroutines, unbounded containers.
    Analyze(analyze::AnalyzeArgs),
    /// Reviewed, reversible source repairs for structural findings.
    Repair(repair::RepairArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Ps(args) => ps::run(args),
        Command::Diagnose(args) => diagnose::run(args),
        Command::Agent(args) => agent::run(args),
        Command::Findings(args) => findings::run(args),
        Command::Capture(args) => capture::run(args),
        Command::Targets(args) => targets::run(args),
        Command::Dump(args) => dump::run(args),
        Command::Record(args) => record::run(args),
        Command::Analyze(args) => analyze::run(args),
        Command::Repair(args) => repair::run(args),
    }
}

/// Sets up `tracing` on stderr.
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Exit status for an error: 2 for bad input (missing process, not Python,
/// unsupported), 77 for missing privileges (EX_NOPERM), 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    use pymedic_python::InspectError;
    for cause in err.chain() {
        if cause.downcast_ref::<BadInput>().is_some() {
            return 2;
        }
        if let Some(e) = cause.downcast_ref::<pymedic_analyze::AnalyzeError>() {
            return match e {
                pymedic_analyze::AnalyzeError::Thread(_) => 1,
                _ => 2,
            };
        }
        if let Some(e) = cause.downcast_ref::<pymedic_repair::RepairError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<InspectError>() {
            return match e {
                InspectError::PermissionDenied { .. } => 77,
                _ => 2,
            };
        }
        if let Some(e) = cause.downcast_ref::<crate::dump::DumpError>() {
            return match e {
                e if e.is_permission() => 77,
                crate::dump::DumpError::Inspect(_) | crate::dump::DumpError::Exited { .. } => 2,
                _ => 1,
            };
        }
        if let Some(e) = cause.downcast_ref::<crate::bpf::BpfError>()
            && e.is_permission()
        {
            return 77;
        }
    }
    1
}

/// Builds a tokio runtime for commands that need one.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context as _;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")
}

/// Prints a value as pretty JSON on stdout.
pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    use std::io::Write as _;
    // Buffered: stdout is line-buffered, and pretty JSON is one write per
    // line otherwise (15,000 writes for a standard library's findings).
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// One-shot commands end quietly when their reader goes away
/// (`pymedic analyze --json | head`), as Unix tools do: restores SIGPIPE's
/// default action, which Rust's runtime ignores. Not for the daemon, whose
/// sockets must never kill it.
pub fn die_quietly_on_closed_stdout() {
    // SAFETY: called once at start-up, before any thread is spawned;
    // SIG_DFL is a valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Bad input from the user (configuration, flags): exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// Wraps any error as [`BadInput`].
pub(crate) fn bad(e: impl std::fmt::Display) -> BadInput {
    BadInput(e.to_string())
}
