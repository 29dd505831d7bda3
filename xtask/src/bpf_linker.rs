//! bpf-linker, built against the LLVM of the nightly toolchain that compiles
//! the eBPF programs.
//!
//! bpf-linker reads the bitcode rustc writes, so its LLVM must be the same
//! major version as the nightly's (an older LLVM fails with "Invalid
//! record"). Distribution packages lag behind nightly, so we link it
//! against the nightly's own `libLLVM.so` (rustup ships it in the
//! toolchain's `lib/`): a prefix directory of symlinks stands in for an LLVM
//! installation, and bpf-linker's rpath points there.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::cmd::{self, output, which};

/// The bpf-linker release whose `llvm-N` features we build with.
const VERSION: &str = "0.13.0";
/// The LLVM majors that release supports.
const SUPPORTED: std::ops::RangeInclusive<u32> = 21..=23;

/// The nightly toolchain's LLVM: its major version and shared library.
#[derive(Debug)]
pub struct NightlyLlvm {
    pub major: u32,
    pub library: PathBuf,
}

impl NightlyLlvm {
    /// Reads it from `rustup run nightly rustc`.
    pub fn find() -> anyhow::Result<Self> {
        let vv = output("rustup", &["run", "nightly", "rustc", "-vV"]).context(
            "`rustup run nightly rustc -vV` failed: is the nightly toolchain installed?",
        )?;
        let major = vv
            .lines()
            .find_map(|l| l.strip_prefix("LLVM version: "))
            .and_then(|v| v.split('.').next()?.trim().parse().ok())
            .context("nightly rustc -vV printed no `LLVM version:` line")?;
        let sysroot = output("rustup", &["run", "nightly", "rustc", "--print", "sysroot"])
            .context("`rustup run nightly rustc --print sysroot` failed")?;
        let lib = Path::new(sysroot.trim()).join("lib");
        let library = std::fs::read_dir(&lib)
            .with_context(|| format!("read {}", lib.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libLLVM.so."))
            })
            .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
        Ok(Self { major, library })
    }
}

/// True when bpf-linker is installed, runs, and is linked against LLVM
/// `major`.
pub fn matches(major: u32) -> bool {
    let Some(path) = which("bpf-linker") else {
        return false;
    };
    if output("bpf-linker", &["--version"]).is_none() {
        return false;
    }
    output("ldd", &[&path.to_string_lossy()]).is_some_and(|ldd| linked_major(&ldd) == Some(major))
}

/// The LLVM major in `ldd` output: `libLLVM.so.23.1-rust-…`,
/// `libLLVM.so.22.1` or `libLLVM-22.so`.
fn linked_major(ldd: &str) -> Option<u32> {
    let line = ldd.lines().find(|l| l.contains("libLLVM"))?;
    if line.contains("not found") {
        return None;
    }
    let name = line.split_whitespace().next()?;
    let rest = name
        .strip_prefix("libLLVM.so.")
        .or_else(|| name.strip_prefix("libLLVM-"))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Builds and installs bpf-linker against `llvm` (about a minute).
pub fn install(llvm: &NightlyLlvm) -> anyhow::Result<()> {
    if !SUPPORTED.contains(&llvm.major) {
        bail!(
            "the nightly toolchain uses LLVM {}, and bpf-linker {VERSION} supports LLVM {}–{}: \
             install a nightly whose `rustc -vV` says LLVM {} (rustup toolchain install \
             nightly-YYYY-MM-DD) or update VERSION in xtask/src/bpf_linker.rs",
            llvm.major,
            SUPPORTED.start(),
            SUPPORTED.end(),
            SUPPORTED.end()
        );
    }
    let prefix = prefix_for(llvm)?;
    let feature = format!("llvm-{}", llvm.major);
    let install = |locked: bool| {
        let mut c = cmd::cargo();
        c.env("LLVM_PREFIX", &prefix).arg("install");
        if locked {
            c.arg("--locked");
        }
        c.args(["--force", "bpf-linker", "--version", VERSION])
            .args(["--no-default-features", "--features", &feature]);
        cmd::run(&mut c)
    };
    // --locked may pin crates that do not build here; retry unlocked.
    install(true).or_else(|_| install(false))
}

/// A directory laid out like an LLVM installation (`lib/libLLVM.so`) whose
/// library is the nightly's. Kept under `$CARGO_HOME` next to the installed
/// bpf-linker, which loads it through its rpath.
fn prefix_for(llvm: &NightlyLlvm) -> anyhow::Result<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let soname = llvm
        .library
        .file_name()
        .context("libLLVM path has no file name")?;
    let prefix = cargo_home.join("pymedic-llvm").join(soname);
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("create {}", lib.display()))?;
    for name in [Path::new("libLLVM.so"), Path::new(soname)] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm.library, &link)
            .with_context(|| format!("symlink {} -> {}", link.display(), llvm.library.display()))?;
    }
    Ok(prefix)
}

#[cfg(test)]
mod tests {
    use super::linked_major;

    #[test]
    fn reads_the_linked_llvm_major() {
        let rust = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibLLVM.so.23.1-rust-1.101.0-nightly => /x/lib/libLLVM.so.23.1-rust-1.101.0-nightly (0x7f)\n";
        assert_eq!(linked_major(rust), Some(23));
        let debian = "\tlibLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x7f)\n";
        assert_eq!(linked_major(debian), Some(22));
        assert_eq!(
            linked_major("\tlibLLVM-22.so => /usr/lib/x (0x1)\n"),
            Some(22)
        );
        assert_eq!(linked_major("\tlibLLVM.so.23.1 => not found\n"), None);
        assert_eq!(linked_major("\tlibc.so.6 => /lib/libc.so.6\n"), None);
    }
}
