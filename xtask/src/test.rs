//! `cargo xtask test`: setup, lint, then every test. Unit tests need no
//! privileges; the integration tests in `tests/` start real Python processes
//! and load real eBPF programs, so they want root (they skip with a printed
//! reason otherwise, and fail instead under `CI=true`).

use anyhow::Context as _;
use clap::Args;

use crate::cmd::{self, workspace_root};
use crate::setup;

#[derive(Debug, Args)]
pub struct TestArgs {
    /// Skip `cargo xtask setup` (when you know it is done).
    #[arg(long)]
    no_setup: bool,
    /// Skip rustfmt and clippy.
    #[arg(long)]
    no_lint: bool,
    /// Only run tests whose name contains this (passed to the test harness).
    filter: Option<String>,
}

pub fn test(args: TestArgs) -> anyhow::Result<()> {
    if !args.no_setup {
        setup::setup_quiet().context("setup")?;
    }
    if !args.no_lint {
        println!("xtask test: cargo fmt --check");
        cmd::run(cmd::cargo().args(["fmt", "--all", "--", "--check"]))
            .context("code is not formatted: run `cargo fmt --all`")?;
        println!("xtask test: cargo clippy -D warnings");
        cmd::run(cmd::cargo().args([
            "clippy",
            "--all-targets",
            "--quiet",
            "--",
            "-D",
            "warnings",
        ]))?;
        println!("xtask test: cargo clippy (eBPF, nightly, bpfel)");
        cmd::run(
            std::process::Command::new("rustup")
                .current_dir(workspace_root().join("ebpf/pymedic-ebpf"))
                .env_remove("RUSTC")
                .env_remove("CARGO")
                .env_remove("RUSTUP_TOOLCHAIN")
                .args([
                    "run",
                    "nightly",
                    "cargo",
                    "clippy",
                    "--quiet",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--release",
                    "--target-dir",
                ])
                .arg(workspace_root().join("target/ebpf-clippy"))
                .args(["--", "-D", "warnings"]),
        )?;
    }
    if !args.no_lint {
        println!("xtask test: generated CPython layouts match the headers");
        crate::codegen::check_layouts()?;
    }
    println!("xtask test: building pymedic");
    cmd::run(cmd::cargo().args(["build", "--quiet", "-p", "pymedic"]))?;
    let bin = workspace_root().join("target/debug/pymedic");
    let venv_bin = setup::venv_dir().join("bin");
    let path = std::env::join_paths(std::iter::once(venv_bin).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))?;

    println!("xtask test: unit tests");
    let mut unit = cmd::cargo();
    unit.args([
        "test",
        "--quiet",
        "--workspace",
        "--exclude",
        "pymedic-integration",
        "--exclude",
        "pymedic-ebpf",
    ])
    .env("PYMEDIC_BIN", &bin)
    .env("PATH", &path);
    if let Some(f) = &args.filter {
        unit.args(["--", f]);
    }
    cmd::run(&mut unit)?;

    println!("xtask test: integration tests (real Python processes, real eBPF)");
    let mut integ = cmd::cargo();
    integ
        .args([
            "test",
            "--quiet",
            "-p",
            "pymedic-integration",
            "--",
            "--test-threads=1",
        ])
        .env("PYMEDIC_BIN", &bin)
        .env("PATH", &path);
    if let Some(f) = &args.filter {
        integ.arg(f);
    }
    cmd::run(&mut integ)?;
    println!("xtask test: all passed");
    Ok(())
}
