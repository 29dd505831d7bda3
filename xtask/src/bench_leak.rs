//! `cargo xtask bench leak`: what the resource layer costs the process it
//! watches.
//!
//! * An allocation-heavy program (`tests/scripts/resource/bench_alloc.py`:
//!   small objects, JSON churn) does the same fixed work with nothing
//!   attached, under `pymedic diagnose` with every resource detector on
//!   (memory_leak, native_memory_leak, gc_pause, fd_leak, thread_leak;
//!   every other detector off, as listed in the agent's `BUILTIN` table),
//!   and under `memray attach` (PyPI, from target/venv; injects with gdb).
//! * A program opening and closing files at a paced 10,000 opens/s
//!   (`bench_fds.py`) with nothing attached and under `fd_leak` alone.
//!
//! Rounds are interleaved (baseline, pymedic, memray, ...) and each
//! configuration starts a fresh target, attaches, waits until the tool is
//! live, then asks the target for one unit of work; the target reports the
//! CPU time (user + system, all threads: work done in the kernel on its
//! behalf, eBPF programs included) and wall time of that work. Ratios are
//! medians against the baseline measured in the same run; goals: ≤ 1.05×
//! for leak tracking, ≤ 1.03× for fd tracking. Release build.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cmd::{self, workspace_root};
use crate::setup;

/// The agent's built-in detector names, read from its `BUILTIN` table
/// (detectors are on unless a config turns them off, so a benchmark must
/// name every one to measure only its own).
fn detector_names(root: &Path) -> anyhow::Result<Vec<String>> {
    let path = root.join("agent/src/engine/detect/mod.rs");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let names: Vec<String> = text
        .split("pub const BUILTIN")
        .nth(1)
        .and_then(|t| t.split("];").next())
        .into_iter()
        .flat_map(|t| t.lines())
        .filter_map(|l| l.trim().strip_prefix("(\"")?.split('"').next())
        .map(str::to_owned)
        .collect();
    if names.is_empty() {
        bail!(
            "found no detector in the BUILTIN table of {}",
            path.display()
        );
    }
    Ok(names)
}

/// Every detector off but `on`.
fn config(dir: &Path, all: &[String], name: &str, on: &[&str]) -> anyhow::Result<PathBuf> {
    let mut text = String::new();
    for d in on {
        if !all.iter().any(|a| a == d) {
            bail!("no detector named {d} in the agent's BUILTIN table");
        }
    }
    for d in all {
        let enabled = on.contains(&d.as_str());
        text.push_str(&format!("[detectors.{d}]\nenabled = {enabled}\n"));
    }
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
    Ok(p)
}

/// A benchmark target waiting for work orders on stdin.
struct Target {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Target {
    fn start(python: &Path, script: &Path, work: u64) -> anyhow::Result<Target> {
        let mut child = Command::new(python)
            .arg(script)
            .arg(work.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {} {}", python.display(), script.display()))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut t = Target {
            child,
            stdin,
            lines,
        };
        t.expect("READY", Duration::from_secs(30))?;
        Ok(t)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn expect(&mut self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return Ok(l),
                Ok(_) => continue,
                Err(_) => bail!("the benchmark target did not print {prefix} within {timeout:?}"),
            }
        }
    }

    /// One unit of work: (CPU seconds, wall seconds).
    fn work(&mut self) -> anyhow::Result<(f64, f64)> {
        writeln!(self.stdin, "go").context("order work from the target")?;
        self.stdin.flush()?;
        let line = self.expect("DONE", Duration::from_secs(600))?;
        let f: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|s| s.parse().ok())
            .collect();
        match f[..] {
            [cpu, wall] => Ok((cpu, wall)),
            _ => bail!("unexpected line from the target: {line}"),
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `pid` holds loaded eBPF programs, then `settle` more (the
/// first checks: heap scan, watchpoints).
fn wait_bpf_live(tool: &mut Child, settle: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = tool.try_wait()? {
            bail!("pymedic exited early ({status})");
        }
        let live = std::fs::read_dir(format!("/proc/{}/fd", tool.id()))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|l| l.to_string_lossy() == "anon_inode:bpf-prog")
            });
        if live {
            std::thread::sleep(settle);
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("pymedic loaded no eBPF program within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How long after its start a target begins its work, in every
/// configuration (pymedic: eBPF loaded and the first checks done).
const SETTLE: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq)]
enum Tool {
    Baseline,
    Pymedic,
    Memray,
}

/// One measurement: a fresh target, `tool` attached, one unit of work.
fn measure(
    python: &Path,
    script: &Path,
    work: u64,
    tool: Tool,
    pymedic_config: &Path,
    dir: &Path,
    bin: &Path,
) -> anyhow::Result<(f64, f64)> {
    let mut target = Target::start(python, script, work)?;
    let started = Instant::now();
    let pid = target.pid().to_string();
    let mut attached: Option<Child> = None;
    match tool {
        Tool::Baseline => {}
        Tool::Pymedic => {
            let mut c = Command::new(bin)
                .args(["diagnose", "--pid", &pid, "--duration", "15m", "--config"])
                .arg(pymedic_config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start pymedic diagnose")?;
            let live = wait_bpf_live(&mut c, Duration::from_secs(5));
            attached = Some(c);
            live?;
        }
        Tool::Memray => {
            let out = dir.join(format!("memray-{pid}.bin"));
            let st = Command::new(setup::venv_dir().join("bin/memray"))
                .args(["attach", "--method", "gdb", "-f", "-o"])
                .arg(&out)
                .arg(&pid)
                .stdout(Stdio::null())
                .status()
                .context("run memray attach (cargo xtask setup installs it)")?;
            if !st.success() {
                bail!("memray attach {pid} failed ({st})");
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    // Every configuration lets the target idle as long before working
    // (the tools' start-up included), so only the tool differs.
    let idle = SETTLE.saturating_sub(started.elapsed());
    std::thread::sleep(idle);
    let r = target.work();
    if let Some(mut c) = attached {
        let _ = c.kill();
        let _ = c.wait();
    }
    r
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Where and how long the series run.
struct Run<'a> {
    python: &'a Path,
    bin: &'a Path,
    rounds: usize,
    dir: &'a Path,
}

/// Runs `rounds` interleaved rounds of `tools`; medians (cpu, wall) per tool.
fn series(
    run: &Run<'_>,
    label: &str,
    script: &Path,
    work: u64,
    tools: &[Tool],
    pymedic_config: &Path,
) -> anyhow::Result<Vec<(f64, f64)>> {
    let (python, rounds, dir) = (run.python, run.rounds, run.dir);
    let mut cpu = vec![Vec::new(); tools.len()];
    let mut wall = vec![Vec::new(); tools.len()];
    for r in 0..rounds {
        for (i, &t) in tools.iter().enumerate() {
            let name = match t {
                Tool::Baseline => "baseline",
                Tool::Pymedic => "pymedic",
                Tool::Memray => "memray attach",
            };
            print!("bench leak: {label} round {}/{rounds}: {name} ... ", r + 1);
            std::io::stdout().flush()?;
            let (c, w) = measure(python, script, work, t, pymedic_config, dir, run.bin)?;
            println!("cpu {c:.2} s, wall {w:.2} s");
            cpu[i].push(c);
            wall[i].push(w);
        }
    }
    Ok(cpu
        .into_iter()
        .zip(wall)
        .map(|(c, w)| (median(c), median(w)))
        .collect())
}

/// `memray attach` loads the memray installed for the target's own
/// interpreter: the target runs on target/venv's Python unless told.
pub fn default_python() -> PathBuf {
    setup::venv_dir().join("bin/python")
}

pub fn run(rounds: usize, python: &Path) -> anyhow::Result<()> {
    let root = workspace_root();
    if !setup::venv_dir().join("bin/memray").exists() {
        bail!("memray is not installed in target/venv: run `cargo xtask setup`");
    }
    let bin = match std::env::var_os("PYMEDIC_BIN") {
        // A binary built elsewhere (same sources), e.g. when this machine
        // cannot spare a second release build.
        Some(p) => PathBuf::from(p),
        None => {
            println!("bench leak: building pymedic (release)");
            cmd::run(cmd::cargo().args(["build", "--release", "--quiet", "-p", "pymedic"]))?;
            root.join("target/release/pymedic")
        }
    };
    println!("bench leak: pymedic binary {}", bin.display());
    let dir = root.join("target/tmp/bench-leak");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let all = detector_names(&root)?;
    let resource = config(
        &dir,
        &all,
        "resource",
        &[
            "memory_leak",
            "native_memory_leak",
            "gc_pause",
            "fd_leak",
            "thread_leak",
        ],
    )?;
    let fds = config(&dir, &all, "fds", &["fd_leak"])?;
    let rounds = rounds.max(1);
    println!("bench leak: target interpreter {}", python.display());
    let run = Run {
        python,
        bin: &bin,
        rounds,
        dir: &dir,
    };

    let alloc = series(
        &run,
        "alloc",
        &root.join("tests/scripts/resource/bench_alloc.py"),
        60_000,
        &[Tool::Baseline, Tool::Pymedic, Tool::Memray],
        &resource,
    )?;
    let fd = series(
        &run,
        "fds",
        &root.join("tests/scripts/resource/bench_fds.py"),
        100_000,
        &[Tool::Baseline, Tool::Pymedic],
        &fds,
    )?;

    let (bc, bw) = alloc[0];
    println!();
    let _ = std::fs::remove_dir_all(&dir);
    println!("allocation-heavy program (median of {rounds}; CPU time of the same work):");
    println!("  baseline                      cpu {bc:.2} s  wall {bw:.2} s");
    for (name, (c, w), goal) in [
        ("pymedic, resource detectors", alloc[1], " (goal ≤ 1.05×)"),
        ("memray attach", alloc[2], ""),
    ] {
        println!(
            "  {name:<29} cpu {c:.2} s  wall {w:.2} s  slowdown {:.3}× cpu, {:.3}× wall{goal}",
            c / bc,
            w / bw
        );
    }
    let (fc, fw) = fd[0];
    let (pc, pw) = fd[1];
    println!("10k opens/s program (median of {rounds}):");
    println!("  baseline                      cpu {fc:.2} s  wall {fw:.2} s");
    println!(
        "  pymedic fd_leak               cpu {pc:.2} s  wall {pw:.2} s  cost {:.3}× cpu, {:.3}× wall (goal ≤ 1.03×)",
        pc / fc,
        pw / fw
    );
    Ok(())
}
