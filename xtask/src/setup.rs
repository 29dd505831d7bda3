//! `cargo xtask setup`: installs what building and testing pymedic needs.
//! Every step checks first and does nothing when already satisfied, so a
//! second run takes seconds. Each step prints what it did.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::bpf_linker;
use crate::cmd::{self, output, workspace_root};

/// Debian packages the build and the tests use.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("protobuf-compiler", "protoc, for the proto drift test"),
    (
        "libprotobuf-dev",
        "google/protobuf/*.proto that pymedic.v1 imports (drift test, Python gRPC client)",
    ),
    (
        "golang-go",
        "`go tool pprof` validates pprof output in tests",
    ),
    ("python3-venv", "the test tools' virtualenv"),
    ("python3-dev", "headers for Python test dependencies"),
    (
        "libunwind-dev",
        "`pymedic dump --native` unwinds native stacks with libunwind-ptrace",
    ),
    (
        "libc6-dbg",
        "libc's symbols for native_memory_leak (which libc routine wrote new memory)",
    ),
    (
        "build-essential",
        "a C compiler for `cargo xtask codegen layouts`",
    ),
    (
        "git",
        "`pymedic repair` commits; its tests make git repositories",
    ),
    (
        "python3.11",
        "`cargo xtask bench analyze` parses its standard library; /usr/bin/python3.11 is a test interpreter",
    ),
];

/// The virtualenv holding Python tools the tests and benchmarks run
/// (py-spy, memray, grpcio, ...), from `tests/requirements.txt`.
pub fn venv_dir() -> PathBuf {
    workspace_root().join("target/venv")
}

pub fn setup() -> anyhow::Result<Vec<String>> {
    let did = setup_steps(true)?;
    if did.is_empty() {
        println!("setup: everything already installed");
    } else {
        println!("setup: done ({} step(s) changed something)", did.len());
    }
    Ok(did)
}

/// Setup that prints only when it changes something.
pub fn setup_quiet() -> anyhow::Result<()> {
    setup_steps(false).map(|_| ())
}

fn setup_steps(verbose: bool) -> anyhow::Result<Vec<String>> {
    let mut did = Vec::new();
    let say = |s: &str| {
        if verbose {
            println!("setup: {s}");
        }
    };

    // 1. Debian packages.
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(p, _)| !dpkg_installed(p))
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        say("apt packages: present");
    } else {
        println!("setup: installing apt packages: {}", missing.join(" "));
        for (p, why) in APT_PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
            println!("         {p}: {why}");
        }
        if !is_root() {
            bail!(
                "installing apt packages needs root: run `sudo apt-get install {}`",
                missing.join(" ")
            );
        }
        cmd::run(Command::new("apt-get").args(["update", "-qq"]))?;
        cmd::run(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing),
        )?;
        did.push(format!("apt: {}", missing.join(" ")));
    }

    // 2. Rust toolchains and components.
    let stable_components =
        output("rustup", &["component", "list", "--installed"]).unwrap_or_default();
    for comp in ["rustfmt", "clippy"] {
        if !stable_components.lines().any(|l| l.starts_with(comp)) {
            println!("setup: rustup component add {comp}");
            cmd::run(Command::new("rustup").args(["component", "add", comp]))?;
            did.push(format!("rustup: {comp}"));
        }
    }
    let nightly = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    );
    match nightly {
        Some(list) if list.lines().any(|l| l.starts_with("rust-src")) => {
            say("nightly + rust-src: present")
        }
        _ => {
            println!("setup: installing nightly toolchain with rust-src (eBPF build-std=core)");
            cmd::run(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))?;
            did.push("rustup: nightly + rust-src".into());
        }
    }

    // 3. bpf-linker against the nightly's own LLVM.
    let llvm = bpf_linker::NightlyLlvm::find()?;
    if bpf_linker::matches(llvm.major) {
        say("bpf-linker: present");
    } else {
        println!(
            "setup: building bpf-linker against the nightly's LLVM {} (about a minute)",
            llvm.major
        );
        bpf_linker::install(&llvm)?;
        if !bpf_linker::matches(llvm.major) {
            bail!(
                "bpf-linker was installed but is not the one on PATH, or is not linked against \
                 LLVM {}: check `command -v bpf-linker` and `ldd $(command -v bpf-linker)`",
                llvm.major
            );
        }
        did.push(format!("cargo install bpf-linker (LLVM {})", llvm.major));
    }

    // 4. Python tools for tests and benchmarks, in target/venv.
    let req = workspace_root().join("tests/requirements.txt");
    let want = std::fs::read_to_string(&req).with_context(|| format!("read {}", req.display()))?;
    let venv = venv_dir();
    let stamp = venv.join(".pymedic-requirements");
    let have_now = std::fs::read_to_string(&stamp).unwrap_or_default();
    if have_now == want && venv.join("bin/python").exists() {
        say("python test tools: present");
    } else {
        println!(
            "setup: installing python test tools into {}",
            venv.display()
        );
        if !venv.join("bin/python").exists() {
            cmd::run(
                Command::new("/usr/bin/python3")
                    .args(["-m", "venv"])
                    .arg(&venv),
            )?;
        }
        cmd::run(
            Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
                .arg(&req),
        )?;
        std::fs::write(&stamp, &want)?;
        did.push("pip: tests/requirements.txt".into());
    }
    Ok(did)
}

fn dpkg_installed(pkg: &str) -> bool {
    output("dpkg-query", &["-W", "-f=${Status}", pkg])
        .is_some_and(|s| s.contains("install ok installed"))
}

fn is_root() -> bool {
    output("id", &["-u"]).is_some_and(|s| s.trim() == "0")
}
