//! `cargo xtask bench dump`: latency of `pymedic dump --json` on a
//! 50-thread process with ~30-frame stacks, against `py-spy dump --json`
//! (PyPI, from target/venv) on the same process in the same run, plus the
//! share of pymedic's time spent on the deadlock verdict (lock
//! identification, holder inference, analysis). Release build.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};

use crate::cmd::{self, workspace_root};
use crate::setup;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which benchmark.
    what: Which,
    /// `agent`: seconds the agent watches the idle and busy processes.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Runs of each command (the median is reported).
    #[arg(long, default_value_t = 21)]
    runs: usize,
    /// Rounds of (baseline, pymedic, py-spy) for `record`; of (baseline,
    /// pymedic, memray) for `leak`.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Interpreter to run the target with (default: pyenv's newest 3.8–3.13,
    /// else python3); for `analyze`, the interpreter whose `ast` module is
    /// the baseline (default: Debian's /usr/bin/python3.11).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Source tree for `analyze` (default: Debian's python3.11 standard library).
    #[arg(long, default_value = "/usr/lib/python3.11")]
    tree: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Which {
    /// `pymedic dump --json` vs `py-spy dump --json`.
    Dump,
    /// `pymedic analyze` vs Python's `ast.parse` on the same files.
    Analyze,
    /// A 5-thread CPU-bound target: no profiler vs `pymedic record` vs
    /// `py-spy record` at 100 Hz (see bench_record.rs).
    Record,
    /// `pymedic agent` watching 20 idle + 5 busy processes: CPU and RSS vs
    /// py-spy polling; detection → watcher latency with 1 and 100 watchers
    /// (see bench_agent.rs).
    Agent,
    /// An allocation-heavy program: no tool vs pymedic's resource
    /// detectors vs `memray attach`; a 10k opens/s program: no tool vs
    /// `fd_leak` (see bench_leak.rs).
    Leak,
    /// A lock-heavy 4-thread program (~1M acquire/release pairs/s) without
    /// and with pymedic's lock detectors (see bench_locks.rs).
    Locks,
}

pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    // Every benchmark builds pymedic (nightly rust-src for its eBPF object)
    // and most run the venv's tools: set up first, as `run` and `test` do.
    setup::setup_quiet()?;
    match args.what {
        Which::Dump => dump(&args),
        // Each round parses ~300k lines on both sides: 9 rounds (median)
        // take ~15 s.
        Which::Analyze => crate::bench_analyze::analyze(
            &args.tree,
            args.python
                .as_deref()
                .unwrap_or(std::path::Path::new("/usr/bin/python3.11")),
            args.runs.min(9) as u32,
        ),
        Which::Record => crate::bench_record::record(args.rounds, args.python.as_deref()),
        Which::Leak => crate::bench_leak::run(
            args.rounds,
            &args
                .python
                .clone()
                .unwrap_or_else(crate::bench_leak::default_python),
        ),
        Which::Locks => crate::bench_locks::run(
            args.rounds,
            10,
            &args.python.clone().unwrap_or_else(default_python),
        ),
        Which::Agent => crate::bench_agent::run(
            args.seconds,
            &args.python.clone().unwrap_or_else(default_python),
        ),
    }
}

fn default_python() -> PathBuf {
    let root = PathBuf::from("/root/.pyenv/versions");
    let mut found: Vec<(u8, PathBuf)> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let minor: u8 = name.strip_prefix("3.")?.split('.').next()?.parse().ok()?;
            let exe = e.path().join(format!("bin/python3.{minor}"));
            ((8..=13).contains(&minor) && exe.exists()).then_some((minor, exe))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, p)| p)
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// Wall time of one successful run of `c` (stdout discarded). Failed runs
/// are retried a few times (py-spy sometimes fails to probe the version of
/// a process) and not timed.
fn time_once(c: &mut Command) -> anyhow::Result<Duration> {
    let mut last = String::new();
    for _ in 0..5 {
        let start = Instant::now();
        let out = c.stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
        let took = start.elapsed();
        if out.status.success() {
            return Ok(took);
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
    }
    bail!("{c:?} failed 5 times: {last}")
}

/// Runs the commands interleaved (rotating the order each round, so load
/// from other processes hits all alike) and returns each one's median.
fn interleaved(
    runs: usize,
    cmds: &mut [Box<dyn FnMut() -> Command + '_>],
) -> anyhow::Result<Vec<Duration>> {
    let n = cmds.len();
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(runs); n];
    for round in 0..runs {
        for k in 0..n {
            let i = (round + k) % n;
            let mut c = (cmds[i])();
            times[i].push(time_once(&mut c)?);
        }
    }
    Ok(times
        .into_iter()
        .map(|mut t| {
            t.sort();
            t[t.len() / 2]
        })
        .collect())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn dump(args: &BenchArgs) -> anyhow::Result<()> {
    println!("bench dump: building pymedic (release)");
    cmd::run(cmd::cargo().args(["build", "--release", "--quiet", "-p", "pymedic"]))?;
    let pymedic = workspace_root().join("target/release/pymedic");
    let py_spy = setup::venv_dir().join("bin/py-spy");
    if !py_spy.exists() {
        bail!("{} missing: run `cargo xtask setup`", py_spy.display());
    }
    let python = args.python.clone().unwrap_or_else(default_python);
    let script = workspace_root().join("tests/scripts/bench/threads_50.py");
    let mut child = Command::new(&python)
        .arg("-u")
        .arg(&script)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {}", python.display()))?;
    let pid = child.id();
    let ready = BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
        .any(|l| l.starts_with("READY"));
    let result = (|| -> anyhow::Result<()> {
        if !ready {
            bail!("{} did not start the benchmark target", python.display());
        }
        let pid_s = pid.to_string();
        let version =
            cmd::output(python.to_str().unwrap_or("python3"), &["--version"]).unwrap_or_default();
        println!(
            "bench dump: target pid {pid} ({}), 50 threads x ~30 frames; {} runs each, medians",
            version.trim(),
            args.runs
        );
        // Warm both (page cache, py-spy's version probe).
        let _ = Command::new(&pymedic)
            .args(["dump", "--json", &pid_s])
            .output();
        let _ = Command::new(&py_spy)
            .args(["dump", "--json", "--pid", &pid_s])
            .output();
        let mut cmds: Vec<Box<dyn FnMut() -> Command + '_>> = vec![
            Box::new(|| {
                let mut c = Command::new(&py_spy);
                c.args(["dump", "--json", "--pid", &pid_s]);
                c
            }),
            Box::new(|| {
                let mut c = Command::new(&pymedic);
                c.args(["dump", "--json", &pid_s]);
                c
            }),
            Box::new(|| {
                let mut c = Command::new(&pymedic);
                c.args(["dump", "--json", "--no-verdicts", &pid_s]);
                c
            }),
        ];
        let medians = interleaved(args.runs, &mut cmds)?;
        let (py_spy_t, full, bare) = (medians[0], medians[1], medians[2]);
        let verdict = full.saturating_sub(bare);
        println!("  py-spy dump --json             {:8.2} ms", ms(py_spy_t));
        println!("  pymedic dump --json            {:8.2} ms", ms(full));
        println!(
            "    of which the deadlock verdict {:7.2} ms ({:.1}% over the bare dump of {:.2} ms)",
            ms(verdict),
            100.0 * verdict.as_secs_f64() / bare.as_secs_f64().max(1e-9),
            ms(bare)
        );
        println!(
            "  ratio pymedic / py-spy         {:8.2}  (goal: <= 1.00; verdict goal: < 20%)",
            full.as_secs_f64() / py_spy_t.as_secs_f64().max(1e-9)
        );
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}
