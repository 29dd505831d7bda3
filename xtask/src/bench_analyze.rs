//! `cargo xtask bench analyze`: `pymedic analyze` (parse + every
//! whole-program pass) over the standard library of Debian's python3.11
//! against parsing the same files with Python's own `ast` module, in the
//! same run. Goal: ≥ 10× faster and ≥ 200k lines/s.
//!
//! Fairness: both sides are whole processes timed from spawn to exit, so
//! each side's startup (the interpreter's, pymedic's file discovery and JSON
//! output) is included; the two alternate round by round, so a change in
//! the machine's load hits both; the median of the rounds is reported, with
//! the load average before and after. Python's in-process parse time (no
//! startup) is printed as well, next to pymedic's own in-process time.
//! pymedic uses every core; `ast.parse` runs in one process on one thread,
//! as CPython parses. So two ratios are printed: wall time (what a user
//! waits) and CPU time (user + sys of each child, per core: the work done).
//! A third side, `pymedic analyze --parse-only` (the same workers running
//! only the parser), is the floor: what the analysis itself adds is the
//! difference.

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

/// Parses every listed file once with `ast.parse`; prints the in-process
/// seconds (without interpreter startup).
const AST_BASELINE: &str = r#"
import ast, sys, time
root, listing = sys.argv[1], sys.argv[2]
files = [root + "/" + l for l in open(listing).read().splitlines() if l]
t = time.perf_counter()
for f in files:
    with open(f, "rb") as fh:
        src = fh.read()
    try:
        ast.parse(src, f)
    except (SyntaxError, ValueError):
        pass
print(time.perf_counter() - t)
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

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_before = load_average();
    let (mut ours, mut ours_cpu, mut ours_inner) = (vec![], vec![], vec![]);
    let (mut py, mut py_cpu, mut py_inner) = (vec![], vec![], vec![]);
    let mut floor = vec![];
    let mut lines = 0u64;
    let mut findings = 0usize;
    for _ in 0..args.runs.max(1) {
        let (cpu, t) = (children_cpu(), Instant::now());
        let out = Command::new(&bin)
            .args(["analyze", tree, "--json"])
            .output()?;
        ours.push(t.elapsed().as_secs_f64());
        ours_cpu.push(children_cpu() - cpu);
        if !out.status.success() {
            bail!(
                "pymedic analyze failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        lines = v["lines"].as_u64().unwrap_or(0);
        findings = v["findings"].as_array().map_or(0, Vec::len);
        ours_inner.push(v["seconds"].as_f64().unwrap_or(0.0));

        // The parser's floor: the same binary, files and workers, parsing
        // only (`--parse-only`, hidden), as a whole process too.
        let t = Instant::now();
        let out = Command::new(&bin)
            .args(["analyze", tree, "--parse-only"])
            .output()?;
        floor.push(t.elapsed().as_secs_f64());
        if !out.status.success() {
            bail!(
                "pymedic analyze --parse-only failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }

        let (cpu, t) = (children_cpu(), Instant::now());
        let inner = python_ast(&args.python, &args.tree, &listing)?;
        py.push(t.elapsed().as_secs_f64());
        py_cpu.push(children_cpu() - cpu);
        py_inner.push(inner);
    }
    let load_after = load_average();
    let _ = std::fs::remove_file(&listing);

    let [ours, ours_cpu, ours_inner, py, py_cpu, py_inner, floor] = [
        &mut ours,
        &mut ours_cpu,
        &mut ours_inner,
        &mut py,
        &mut py_cpu,
        &mut py_inner,
        &mut floor,
    ]
    .map(|v| median(v));
    let rate = lines as f64 / ours;
    let ratio = py / ours;
    println!(
        "tree:     {} ({} files, {} lines)",
        args.tree.display(),
        files.len(),
        lines
    );
    println!(
        "method:   {} rounds alternating the sides (pymedic, its parser alone, ast.parse), medians; each side a whole process timed \
         from spawn to exit (startup, reading the files and output included); CPU = user + sys \
         of the child (getrusage); load average {load_before} before, {load_after} after",
        args.runs.max(1)
    );
    println!(
        "pymedic:  {ours:.3} s wall, {ours_cpu:.3} s CPU ({:.2} cores busy of {threads}; \
         {threads} worker threads): parse + analyse, {findings} findings, {rate:.0} lines/s \
         ({ours_inner:.3} s in-process)",
        ours_cpu / ours
    );
    println!(
        "baseline: {py:.3} s wall, {py_cpu:.3} s CPU (one process, one thread, as CPython \
         parses): {} ast.parse of the same files, {:.0} lines/s ({py_inner:.3} s without \
         interpreter startup)",
        args.python.display(),
        lines as f64 / py
    );
    println!(
        "ratio:    {ratio:.1}× faster than ast.parse in wall time on {threads} cores \
         (in-process: {:.1}×); per core (CPU time): {:.1}×",
        py_inner / ours_inner,
        py_cpu / ours_cpu
    );
    println!(
        "floor:    {floor:.3} s wall for ruff's parser alone (same binary, files and workers; \
         whole process): {:.1}× ast.parse is the most any analysis built on it can reach; \
         extraction and the whole-program passes add {:.3} s ({:.0}% of pymedic's wall)",
        py / floor,
        ours - floor,
        (ours - floor) / ours * 100.0
    );
    let met = ratio >= 10.0 && rate >= 200_000.0;
    println!(
        "goal (≥ 10× wall and ≥ 200k lines/s): {}",
        if met { "met" } else { "NOT met" }
    );
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The 1-minute load average, as the kernel prints it.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

fn python_ast(python: &Path, tree: &Path, listing: &Path) -> anyhow::Result<f64> {
    let out = Command::new(python)
        .args(["-c", AST_BASELINE])
        .arg(tree)
        .arg(listing)
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

/// CPU seconds (user + system) of every waited-for child so far.
fn children_cpu() -> f64 {
    // SAFETY: an all-zero `rusage` is a valid value of the plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage for getrusage to fill.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}
