//! `cargo xtask bench locks`: the cost of pymedic's lock observation to a
//! lock-heavy program. `tests/scripts/bench/locks.py` (4 threads, about a
//! million acquire/release pairs per second in total, plain, nested and
//! re-entrant locks) runs for a fixed time with nothing watching it, then
//! under `pymedic diagnose` with the lock detectors on (`deadlock`,
//! `lock_order_inversion`, `lock_contention`: the waits eBPF sensor on
//! every futex, plus the lock-order sampler reading the threads), in
//! interleaved rounds. Prints the throughput ratio (goal ≤ 1.05×) and what
//! pymedic cost itself (CPU seconds, samples).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::cmd::{self, workspace_root};

/// Only the lock detectors: the resource detectors' own tracing (page
/// faults, descriptor syscalls, the GC sampler) is `bench leak`'s business.
const CONFIG: &str = r#"
[detectors.cpu_hotspot]
enabled = false
[detectors.memory_leak]
enabled = false
[detectors.native_memory_leak]
enabled = false
[detectors.fd_leak]
enabled = false
[detectors.thread_leak]
enabled = false
[detectors.gc_pause]
enabled = false
[detectors.gil_contention]
enabled = false
[detectors.blocked_event_loop]
enabled = false
[detectors.hang]
enabled = false
"#;

/// One timed run.
struct Run {
    /// Acquire/release pairs per second.
    rate: f64,
    /// The target's own CPU seconds per million pairs (user + system).
    cpu_per_mpairs: f64,
    /// CPU seconds of all reaped children so far.
    children_cpu: f64,
    /// Kinds of the findings the watching diagnose reported.
    findings: Vec<String>,
}

/// The target's CPU seconds, reaping it (`wait4`).
fn reap_with_cpu(child: &Child) -> f64 {
    let mut status = 0;
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: waits for our own child; wait4 fills the struct we own.
    unsafe { libc::wait4(child.id() as i32, &mut status, 0, ru.as_mut_ptr()) };
    // SAFETY: initialised by wait4 (zeroed on failure).
    let ru = unsafe { ru.assume_init() };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn run_once(py: &Path, pymedic: Option<&Path>, config: &Path, seconds: u64) -> anyhow::Result<Run> {
    let script = workspace_root().join("tests/scripts/bench/locks.py");
    let mut child = Command::new(py)
        .arg("-u")
        .arg(&script)
        .arg(seconds.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {}", py.display()))?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    match lines.next() {
        Some(Ok(l)) if l.starts_with("READY") => {}
        other => bail!("locks.py did not start: {other:?}"),
    }
    let mut observer: Option<Child> = None;
    if let Some(bin) = pymedic {
        let o = Command::new(bin)
            .args([
                "diagnose",
                "--pid",
                &child.id().to_string(),
                "--duration",
                &format!("{}s", seconds + 30),
                "--json",
                "--config",
            ])
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start pymedic diagnose")?;
        observer = Some(o);
        // Let it load its eBPF object and start every watch.
        std::thread::sleep(Duration::from_secs(3));
    }
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(b"go\n")
        .context("start the timed part")?;
    let line = lines
        .find_map(|l| l.ok().filter(|l| l.starts_with("PAIRS")))
        .context("locks.py printed no PAIRS line")?;
    let target_cpu = reap_with_cpu(&child);
    let f: Vec<&str> = line.split_whitespace().collect();
    let pairs: f64 = f[1].parse()?;
    let secs: f64 = f[2].parse()?;
    let mut cpu = 0.0;
    let mut findings = Vec::new();
    if let Some(o) = observer {
        // The target exited: diagnose reports and ends.
        let out = o.wait_with_output().context("wait for pymedic diagnose")?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        findings = v["findings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f["kind"].as_str().map(str::to_owned))
            .collect();
        cpu = children_cpu();
    }
    Ok(Run {
        rate: pairs / secs,
        cpu_per_mpairs: target_cpu / pairs.max(1.0) * 1e6,
        children_cpu: cpu,
        findings,
    })
}

/// CPU seconds (user + system) of reaped children so far.
fn children_cpu() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, ru.as_mut_ptr()) };
    // SAFETY: initialised by getrusage (zeroed on failure).
    let ru = unsafe { ru.assume_init() };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(rounds: usize, seconds: u64, py: &Path) -> anyhow::Result<()> {
    println!("bench locks: building pymedic (release)");
    cmd::run(cmd::cargo().args(["build", "--release", "--quiet", "-p", "pymedic"]))?;
    let bin: PathBuf = workspace_root().join("target/release/pymedic");
    let dir = std::env::temp_dir().join(format!("pymedic-bench-locks-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("config.toml");
    std::fs::write(&config, CONFIG)?;
    println!(
        "bench locks: {} ({} rounds of {seconds} s, baseline and watched interleaved)",
        py.display(),
        rounds.max(1)
    );
    let mut base = Vec::new();
    let mut watched = Vec::new();
    let mut findings = Vec::new();
    let mut ratios = Vec::new();
    let mut cpu_ratios = Vec::new();
    for round in 0..rounds.max(1) {
        let base_run = run_once(py, None, &config, seconds)?;
        let cpu_before = children_cpu();
        let watched_run = run_once(py, Some(&bin), &config, seconds)?;
        let (b, w) = (base_run.rate, watched_run.rate);
        findings = watched_run.findings.clone();
        ratios.push(b / w);
        let cpu_ratio = watched_run.cpu_per_mpairs / base_run.cpu_per_mpairs.max(1e-9);
        cpu_ratios.push(cpu_ratio);
        println!(
            "  round {}: baseline {:.0} pairs/s, watched {:.0} pairs/s (ratio {:.3}); \
             target CPU per million pairs {:.3} s vs {:.3} s ({:.3}×); pymedic + target CPU {:.1} s",
            round + 1,
            b,
            w,
            b / w,
            base_run.cpu_per_mpairs,
            watched_run.cpu_per_mpairs,
            cpu_ratio,
            watched_run.children_cpu - cpu_before
        );
        base.push(b);
        watched.push(w);
    }
    let (b, w) = (median(base), median(watched));
    println!(
        "bench locks: baseline {b:.0} pairs/s, with lock observation {w:.0} pairs/s (medians)"
    );
    println!(
        "bench locks: slowdown ratio {:.3}x (median of the rounds' ratios; goal <= 1.05x); \
         findings in the last round: {findings:?} (lock_contention is right: four threads \
         share one lock)",
        median(ratios)
    );
    println!(
        "bench locks: the target's CPU per pair {:.3}x (median; the kernel work of tracing is \
         charged to the target)",
        median(cpu_ratios)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
