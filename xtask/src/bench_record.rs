//! `cargo xtask bench record`: a CPU-bound Python program with 5 threads, run with no
//!   profiler, under `pymedic record` at 100 Hz and under `py-spy record`
//!   at 100 Hz (interleaved rounds, medians). Prints the target's slowdown
//!   ratios, pymedic's kernel cost per sample (`bpf_prog` run time with
//!   `kernel.bpf_stats_enabled`), its userspace CPU and peak RSS, and
//!   py-spy's CPU per sample.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cmd::{self, workspace_root};

fn python(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    let pyenv = Path::new("/root/.pyenv/versions");
    let mut found: Vec<PathBuf> = std::fs::read_dir(pyenv)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("3.12"))
        })
        .map(|p| p.join("bin/python3"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| PathBuf::from("python3"))
}

/// CPU seconds (user + system) and peak RSS (kB) of a live process.
fn cpu_and_rss(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    Some((ticks / 100.0, hwm))
}

/// Summed `run_time_ns`/`run_cnt` of `pid`'s perf_event BPF programs.
fn bpf_prog_stats(pid: u32) -> Option<(u64, u64)> {
    let mut total = (0u64, 0u64);
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let link = std::fs::read_link(fd.path()).ok()?;
        if link.to_string_lossy() != "anon_inode:bpf-prog" {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .ok()?;
        let field = |k: &str| {
            info.lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        };
        // prog_type 7 = BPF_PROG_TYPE_PERF_EVENT.
        if field("prog_type:") == Some(7) {
            total.0 += field("run_time_ns:").unwrap_or(0);
            total.1 += field("run_cnt:").unwrap_or(0);
        }
    }
    Some(total)
}

struct Target {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

fn start_target(py: &Path, script: &Path) -> anyhow::Result<Target> {
    let mut child = Command::new(py)
        .arg(script)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {}", py.display()))?;
    let out = child.stdout.take().context("target stdout")?;
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let t = Target { child, lines };
    let ready = t.lines.recv_timeout(Duration::from_secs(20))?;
    if !ready.starts_with("READY") {
        bail!("target said {ready:?}");
    }
    Ok(t)
}

fn elapsed(t: &mut Target) -> anyhow::Result<f64> {
    loop {
        let l = t.lines.recv_timeout(Duration::from_secs(300))?;
        if let Some(v) = l.strip_prefix("ELAPSED ") {
            let _ = t.child.wait();
            return Ok(v.trim().parse()?);
        }
    }
}

#[derive(Default)]
struct ProfilerRun {
    cpu_s: f64,
    rss_kb: u64,
    bpf_ns: u64,
    bpf_runs: u64,
    samples: u64,
}

/// Runs a profiler process against a target until the target exits,
/// polling its CPU, RSS and BPF statistics.
fn profiled(prof: Child, target: &mut Target) -> anyhow::Result<(f64, ProfilerRun)> {
    let mut run = ProfilerRun::default();
    let pid = prof.id();
    let started = Instant::now();
    let secs = loop {
        if let Some((cpu, rss)) = cpu_and_rss(pid) {
            run.cpu_s = cpu;
            run.rss_kb = rss;
        }
        if let Some((ns, n)) = bpf_prog_stats(pid) {
            run.bpf_ns = run.bpf_ns.max(ns);
            run.bpf_runs = run.bpf_runs.max(n);
        }
        match target.lines.recv_timeout(Duration::from_millis(100)) {
            Ok(l) => {
                if let Some(v) = l.strip_prefix("ELAPSED ") {
                    break v.trim().parse::<f64>()?;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => bail!("target ended without ELAPSED: {e}"),
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("target took more than 10 minutes");
        }
    };
    let _ = target.child.wait();
    let out = prof.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stderr);
    run.samples = text
        .split_whitespace()
        .skip_while(|w| *w != "wrote")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok((secs, run))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the benchmark: `rounds` of (baseline, pymedic, py-spy).
pub fn record(rounds: usize, python_path: Option<&Path>) -> anyhow::Result<()> {
    cmd::run(cmd::cargo().args(["build", "--release", "--quiet", "-p", "pymedic"]))?;
    let root = workspace_root();
    let pymedic = root.join("target/release/pymedic");
    let py_spy = root.join("target/venv/bin/py-spy");
    let script = root.join("tests/scripts/profile/bench_cpu.py");
    let py = python(python_path);
    let out_dir = root.join("target/bench-record");
    std::fs::create_dir_all(&out_dir)?;
    let stats_path = "/proc/sys/kernel/bpf_stats_enabled";
    let stats_before = std::fs::read_to_string(stats_path).unwrap_or_default();
    std::fs::write(stats_path, "1").context("enable kernel.bpf_stats_enabled (run as root)")?;
    println!(
        "bench record: {} with 5 threads, {} rounds",
        py.display(),
        rounds
    );

    let (mut base, mut ours, mut spy) = (Vec::new(), Vec::new(), Vec::new());
    let (mut our_runs, mut spy_runs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Rotate the order each round so drift in machine load does not
        // favour one configuration.
        for step in 0..3 {
            match (step + round) % 3 {
                0 => {
                    let mut t = start_target(&py, &script)?;
                    base.push(elapsed(&mut t)?);
                }
                1 => {
                    let mut t = start_target(&py, &script)?;
                    let pid = t.child.id().to_string();
                    let prof = Command::new(&pymedic)
                        .args([
                            "record",
                            "--pid",
                            &pid,
                            "--rate",
                            "100",
                            "--duration",
                            "10m",
                        ])
                        .args(["--quiet", "--format", "collapsed", "-o"])
                        .arg(out_dir.join("pymedic.txt"))
                        .stderr(Stdio::piped())
                        .spawn()?;
                    let (secs, run) = profiled(prof, &mut t)?;
                    ours.push(secs);
                    our_runs.push(run);
                }
                _ => {
                    let mut t = start_target(&py, &script)?;
                    let pid = t.child.id().to_string();
                    let prof = Command::new(&py_spy)
                        .args([
                            "record",
                            "--nonblocking",
                            "-r",
                            "100",
                            "-f",
                            "raw",
                            "-p",
                            &pid,
                        ])
                        .arg("-o")
                        .arg(out_dir.join("py-spy.txt"))
                        .stdout(Stdio::null())
                        .stderr(Stdio::piped())
                        .spawn()
                        .with_context(|| {
                            format!("run {} (cargo xtask setup installs it)", py_spy.display())
                        })?;
                    let (secs, mut run) = profiled(prof, &mut t)?;
                    run.samples = std::fs::read_to_string(out_dir.join("py-spy.txt"))
                        .unwrap_or_default()
                        .lines()
                        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
                        .sum();
                    spy.push(secs);
                    spy_runs.push(run);
                }
            }
        }
        println!(
            "  round {}: baseline {:.2}s, pymedic {:.2}s, py-spy {:.2}s",
            round + 1,
            base[round],
            ours[round],
            spy[round]
        );
    }
    let _ = std::fs::write(stats_path, stats_before.trim());
    let b = median(&mut base);
    let o = median(&mut ours);
    let s = median(&mut spy);
    let last = our_runs.last().context("no rounds")?;
    let kernel_per_call = last.bpf_ns as f64 / last.bpf_runs.max(1) as f64 / 1000.0;
    let kernel_per_sample = last.bpf_ns as f64 / last.samples.max(1) as f64 / 1000.0;
    let user_per_sample = last.cpu_s * 1e6 / last.samples.max(1) as f64;
    let spy_last = spy_runs.last().context("no rounds")?;
    let spy_per_sample = spy_last.cpu_s * 1e6 / spy_last.samples.max(1) as f64;
    println!();
    println!(
        "target slowdown (median wall time / baseline {b:.2}s; compare rounds when the \
         machine is busy, ratios below 1 mean noise dominates):"
    );
    println!("  pymedic record 100 Hz: {:.3}x   (goal <= 1.01x)", o / b);
    println!("  py-spy record 100 Hz:  {:.3}x", s / b);
    println!(
        "pymedic, last round ({} samples of the target):",
        last.samples
    );
    println!(
        "  kernel: {:.1} µs per target sample (all {} perf_event runs: {:.2} µs each)   (goal <= 20 µs)",
        kernel_per_sample, last.bpf_runs, kernel_per_call
    );
    println!(
        "  userspace: {:.2}s CPU total, {:.1} µs per sample; peak RSS {:.1} MB   (goal <= 64 MB)",
        last.cpu_s,
        user_per_sample,
        last.rss_kb as f64 / 1024.0
    );
    println!(
        "py-spy, last round ({} samples): {:.2}s CPU, {:.0} µs per sample -> pymedic kernel cost is {:.0}x cheaper",
        spy_last.samples,
        spy_last.cpu_s,
        spy_per_sample,
        spy_per_sample / kernel_per_sample.max(0.001)
    );
    Ok(())
}
