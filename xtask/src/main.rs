//! `cargo xtask <task>`: everything a developer or CI runs.
//!
//! * `setup`  — install what the build and tests need (idempotent).
//! * `run`    — setup, build, and run `pymedic` with the given arguments.
//! * `test`   — setup, then every test (unit, integration, privileged eBPF).
//! * `bench`  — benchmarks that print ratios against a baseline measured in
//!   the same run.
//! * `codegen` — regenerate committed generated code (CPython layouts).

mod bench;
mod bench_agent;
mod bench_analyze;
mod bench_leak;
mod bench_locks;
mod bench_record;
mod bpf_linker;
mod cmd;
mod codegen;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install build and test dependencies (apt, rustup, bpf-linker, Python
    /// packages). Idempotent: a second run takes seconds.
    Setup,
    /// Set up, build pymedic (release) and run it: `cargo xtask run -- ps`.
    Run {
        /// Arguments passed to pymedic.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run every test, including the privileged eBPF ones.
    Test(test::TestArgs),
    /// Benchmarks against a baseline measured in the same run:
    /// `cargo xtask bench dump`, `cargo xtask bench record`, `cargo xtask bench analyze`.
    Bench(bench::BenchArgs),
    /// Regenerate committed generated code: `cargo xtask codegen layouts [--check]`.
    Codegen(codegen::CodegenArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::setup().map(|_| ()),
        Task::Run { args } => run(args),
        Task::Test(args) => test::test(args),
        Task::Codegen(args) => codegen::codegen(args),
        Task::Bench(args) => bench::bench(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Vec<String>) -> anyhow::Result<()> {
    setup::setup_quiet()?;
    cmd::run(cmd::cargo().args(["build", "--release", "--quiet", "-p", "pymedic"]))?;
    let bin = cmd::workspace_root().join("target/release/pymedic");
    let status = std::process::Command::new(&bin).args(&args).status()?;
    if status.success() {
        Ok(())
    } else {
        std::process::exit(status.code().unwrap_or(1))
    }
}
