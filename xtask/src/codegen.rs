//! `cargo xtask codegen layouts [--check]`: regenerates
//! `crates/python/src/layout/v3_X.rs` from the headers of every CPython
//! installed here (pyenv's `include/python3.X` with `internal/`, Debian's
//! `/usr/include/python3.X`), by compiling `codegen/layouts.c` against each
//! and running it. Patch releases of one minor version must produce the same
//! table; the generator fails when they do not. `--check` writes nothing and
//! fails when a committed table differs from what the headers give.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};

use crate::cmd::workspace_root;

#[derive(Debug, Args)]
pub struct CodegenArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// CPython structure layouts (crates/python/src/layout/v3_X.rs).
    Layouts {
        /// Compare with the committed files instead of writing them.
        #[arg(long)]
        check: bool,
    },
}

pub fn codegen(args: CodegenArgs) -> anyhow::Result<()> {
    match args.what {
        What::Layouts { check } => layouts(check),
    }
}

/// Headers of one installed interpreter.
struct Headers {
    label: String,
    minor: u8,
    include: PathBuf,
}

/// Supported minor versions.
const MINORS: std::ops::RangeInclusive<u8> = 8..=13;

fn find_headers() -> Vec<Headers> {
    let mut out = Vec::new();
    let pyenv = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root/.pyenv"))
        .join("versions");
    if let Ok(entries) = std::fs::read_dir(&pyenv) {
        let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        dirs.sort();
        for dir in dirs {
            let name = dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let mut parts = name.split('.');
            let (Some("3"), Some(Ok(minor))) = (parts.next(), parts.next().map(str::parse::<u8>))
            else {
                continue;
            };
            let include = dir.join(format!("include/python3.{minor}"));
            if MINORS.contains(&minor) && include.join("internal").is_dir() {
                out.push(Headers {
                    label: format!("pyenv {name}"),
                    minor,
                    include,
                });
            }
        }
    }
    for minor in MINORS {
        let include = PathBuf::from(format!("/usr/include/python3.{minor}"));
        if include.join("internal").is_dir() {
            out.push(Headers {
                label: format!("{}", include.display()),
                minor,
                include,
            });
        }
    }
    out
}

/// Compiles and runs the generator against `h`, returning rustfmt'ed Rust.
fn generate(h: &Headers, out_dir: &Path) -> anyhow::Result<String> {
    let src = workspace_root().join("xtask/src/codegen/layouts.c");
    let exe = out_dir.join(format!("layouts-{}", h.label.replace(['/', ' '], "_")));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-std=gnu11", "-w", "-o"])
        .arg(&exe)
        .arg("-I")
        .arg(&h.include)
        .arg("-I")
        .arg(h.include.join("internal"))
        .arg(&src)
        .status()
        .with_context(|| format!("run {cc} (install build-essential)"))?;
    if !status.success() {
        bail!("compiling the layout generator against {} failed", h.label);
    }
    let out = Command::new(&exe)
        .output()
        .with_context(|| format!("run {}", exe.display()))?;
    if !out.status.success() {
        bail!("{} failed: {}", exe.display(), out.status);
    }
    rustfmt(&out.stdout)
}

fn rustfmt(src: &[u8]) -> anyhow::Result<String> {
    let mut child = Command::new("rustfmt")
        .args(["--edition", "2024", "--emit", "stdout"])
        .current_dir(workspace_root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("run rustfmt")?;
    child.stdin.take().expect("piped stdin").write_all(src)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("rustfmt rejected the generated layout");
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// `codegen layouts --check`, for `cargo xtask test`.
pub fn check_layouts() -> anyhow::Result<()> {
    layouts(true)
}

fn layouts(check: bool) -> anyhow::Result<()> {
    let headers = find_headers();
    if headers.is_empty() {
        bail!(
            "no CPython headers found (pyenv versions with include/python3.X/internal, \
             or /usr/include/python3.X from python3-dev)"
        );
    }
    let out_dir = workspace_root().join("target/codegen");
    std::fs::create_dir_all(&out_dir)?;
    let mut by_minor: BTreeMap<u8, (String, String)> = BTreeMap::new();
    for h in &headers {
        let text = generate(h, &out_dir)?;
        match by_minor.get(&h.minor) {
            Some((first, prev)) if *prev != text => bail!(
                "3.{} layouts differ between {first} and {}: key the table by patch \
                 range (see crates/python/ADDING_A_VERSION.md)",
                h.minor,
                h.label
            ),
            Some(_) => println!("codegen: 3.{}: {} agrees", h.minor, h.label),
            None => {
                println!("codegen: 3.{}: from {}", h.minor, h.label);
                by_minor.insert(h.minor, (h.label.clone(), text));
            }
        }
    }
    let dir = workspace_root().join("crates/python/src/layout");
    let mut stale = Vec::new();
    for (minor, (_, text)) in &by_minor {
        let path = dir.join(format!("v3_{minor}.rs"));
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        if old == *text {
            continue;
        }
        if check {
            stale.push(path.display().to_string());
        } else {
            std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
            println!("codegen: wrote {}", path.display());
        }
    }
    for minor in MINORS {
        if !by_minor.contains_key(&minor) {
            println!("codegen: 3.{minor}: no headers here; kept the committed table");
        }
    }
    if !stale.is_empty() {
        bail!(
            "generated layouts differ from the committed ones: {}; run `cargo xtask codegen layouts`",
            stale.join(", ")
        );
    }
    Ok(())
}
