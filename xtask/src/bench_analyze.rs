//! `cargo xtask bench analyze`: `pymedic analyze` (parse + every
//! whole-program pass) over the standard library of Debian's python3.11
//! against parsing the same files with Python's own `ast` module, in the
//! same run. Goal: ≥ 10× faster and ≥ 200k lines/s.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};

use crate::cmd;

struct Args {
    tree: PathBuf,
    python: PathBuf,
    runs: u32,
}

const AST_BASELINE: &str = r#"
import ast, sys, time
root, listing, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
files = [root + "/" + l for l in open(listing).read().splitlines() if l]
best = None
for _ in range(runs):
    t = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            src = fh.read()
        try:
            ast.parse(src, f)
        except (SyntaxError, ValueError):
            pass
    d = time.perf_counter() - t
    best = d if best is None else min(best, d)
print(best)
"#;

pub fn analyze(tree: &Path, python: &Path, runs: u32) -> anyhow::Result<()> {
    let args = Args {
        tree: tree.to_path_buf(),
        python: python.to_path_buf(),
        runs,
    };
    if !args.tree.is_dir() {
        bail!(
            "{} does not exist: install Debian's python3.11 (`apt-get install python3.11`) or pass --tree",
            args.tree.display()
        );
    }
    if !args.python.exists() {
        bail!("{} does not exist: pass --python", args.python.display());
    }
    println!("xtask bench analyze: building pymedic (release)");
    cmd::run(cmd::cargo().args(["build", "--release", "--quiet", "-p", "pymedic"]))?;
    let bin = cmd::workspace_root().join("target/release/pymedic");
    let tree = args.tree.to_str().context("tree path is not UTF-8")?;

    // The exact files pymedic analyses, for the baseline.
    let graph = Command::new(&bin)
        .args(["analyze", tree, "--graph", "json"])
        .output()
        .context("run pymedic analyze --graph json")?;
    if !graph.status.success() {
        bail!(
            "pymedic analyze failed: {}",
            String::from_utf8_lossy(&graph.stderr)
        );
    }
    let graph: serde_json::Value = serde_json::from_slice(&graph.stdout)?;
    let files: Vec<&str> = graph["modules"]
        .as_array()
        .context("graph has modules")?
        .iter()
        .filter_map(|m| m["file"].as_str())
        .collect();
    let listing = std::env::temp_dir().join(format!("pymedic-bench-files-{}", std::process::id()));
    std::fs::write(&listing, files.join("\n"))?;

    let mut best = f64::MAX;
    let mut lines = 0u64;
    let mut findings = 0usize;
    for _ in 0..args.runs.max(1) {
        let t = Instant::now();
        let out = Command::new(&bin)
            .args(["analyze", tree, "--json"])
            .output()?;
        let d = t.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!(
                "pymedic analyze failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        lines = v["lines"].as_u64().unwrap_or(0);
        findings = v["findings"].as_array().map_or(0, Vec::len);
        best = best.min(d);
    }
    let py = python_ast(&args.python, &args.tree, &listing, args.runs)?;
    let _ = std::fs::remove_file(&listing);

    let rate = lines as f64 / best;
    let ratio = py / best;
    println!(
        "tree:     {} ({} files, {} lines)",
        args.tree.display(),
        files.len(),
        lines
    );
    println!(
        "pymedic:  {best:.3} s  parse + analyse ({findings} findings), {:.0} lines/s",
        rate
    );
    println!(
        "baseline: {py:.3} s  {} ast.parse of the same files, {:.0} lines/s",
        args.python.display(),
        lines as f64 / py
    );
    println!("ratio:    {ratio:.1}× faster than ast.parse");
    let met = ratio >= 10.0 && rate >= 200_000.0;
    println!(
        "goal (≥ 10× and ≥ 200k lines/s): {}",
        if met { "met" } else { "NOT met" }
    );
    Ok(())
}

fn python_ast(python: &Path, tree: &Path, listing: &Path, runs: u32) -> anyhow::Result<f64> {
    let out = Command::new(python)
        .args(["-c", AST_BASELINE])
        .arg(tree)
        .arg(listing)
        .arg(runs.max(1).to_string())
        .output()
        .with_context(|| format!("run {}", python.display()))?;
    if !out.status.success() {
        bail!("baseline failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("baseline output")
}
