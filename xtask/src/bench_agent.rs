//! `cargo xtask bench agent`: what an always-on agent costs, and how fast a
//! finding reaches watchers.
//!
//! 1. Starts 20 idle and 5 busy Python processes.
//! 2. Baseline (same run): the same coverage without an agent, `py-spy dump`
//!    of every process every 2 s (what one would script instead), for a
//!    third of the time; its CPU per second.
//! 3. `pymedic agent` (release) watching those 25 processes with every
//!    default detector (12: deadlock, hang, lock order, lock and GIL
//!    contention, event loop, cpu_hotspot and the five resource detectors)
//!    for `--seconds`: CPU (% of one core) and peak RSS, against the goals
//!    (≤ 0.5 %, ≤ 64 MB, set when the agent ran two detectors) and against
//!    the baseline.
//! 4. Detection → watcher latency: a storm of short-lived deadlocked
//!    processes while 1, then 100, watchers stream findings over gRPC; the
//!    latency of each delivery is its arrival time minus the event time.
//!    The event time is when the check began, and a deadlock check confirms
//!    its verdict on a second snapshot 150 ms after the first, so each
//!    delivery includes those 150 ms; the ratio of 100 watchers to 1 shows
//!    what the fan-out adds. p50/p99/max, goal p99 ≤ 100 ms.
//! 5. Coverage under churn: 12 concurrent deadlocked processes that live
//!    2 s each, for 20 s: how many of the processes that lived their whole
//!    life inside the window got a `deadlock` finding, and how long after
//!    the process appeared (polled every 50 ms).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use pymedic_proto::v1 as pb;

use crate::cmd::{self, workspace_root};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_script(py: &Path, script: &str, args: &[&str]) -> anyhow::Result<Proc> {
    let mut child = Command::new(py)
        .arg(workspace_root().join("tests/scripts").join(script))
        .args(args)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("start {script}"))?;
    let out = child.stdout.take().context("stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    if !line.starts_with("READY") {
        bail!("{script} said {line:?}");
    }
    Ok(Proc(child))
}

/// (CPU seconds, RSS bytes) of a process.
fn cpu_rss(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let rss_pages: u64 = f.get(21)?.parse().ok()?;
    Some((ticks / 100.0, rss_pages * 4096))
}

/// CPU seconds used by this process's waited-for children.
fn children_cpu_seconds() -> f64 {
    // SAFETY: rusage is plain data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_CHILDREN with a pointer to a rusage we own.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return 0.0;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn run(seconds: u64, py: &Path) -> anyhow::Result<()> {
    cmd::run(cmd::cargo().args(["build", "--release", "--quiet", "-p", "pymedic"]))?;
    let bin = workspace_root().join("target/release/pymedic");
    let scripts = workspace_root().join("tests/scripts");
    println!(
        "bench agent: python {}, {seconds} s per phase",
        py.display()
    );

    let mut targets = Vec::new();
    for _ in 0..20 {
        targets.push(start_script(py, "idle.py", &[])?);
    }
    for _ in 0..5 {
        targets.push(start_script(py, "profile/cpu_split.py", &["1"])?);
    }
    let pids: Vec<String> = targets.iter().map(|p| p.0.id().to_string()).collect();
    println!("bench agent: 20 idle + 5 busy Python processes running");

    // Baseline: py-spy dump of every process every 2 s (the venv's py-spy,
    // which `cargo xtask setup` installs; a dump that fails is an error, or
    // the baseline would time failures).
    let py_spy = workspace_root().join("target/venv/bin/py-spy");
    let probe = Command::new(&py_spy)
        .args(["dump", "--nonblocking", "--pid", &pids[0]])
        .output()
        .with_context(|| format!("run {}: run `cargo xtask setup`", py_spy.display()))?;
    if !probe.status.success() {
        bail!(
            "py-spy dump --pid {} failed: {}",
            pids[0],
            String::from_utf8_lossy(&probe.stderr)
        );
    }
    let base_secs = (seconds / 3).max(10);
    let c0 = children_cpu_seconds();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(base_secs) {
        let round = Instant::now();
        for pid in &pids {
            let _ = Command::new(&py_spy)
                .args(["dump", "--nonblocking", "--pid", pid])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        std::thread::sleep(Duration::from_secs(2).saturating_sub(round.elapsed()));
    }
    let base_cpu = (children_cpu_seconds() - c0) / t0.elapsed().as_secs_f64() * 100.0;
    println!("baseline: py-spy dump of 25 processes every 2 s: {base_cpu:.2} % of one core");

    // The agent with nothing selected: what discovery alone costs on this
    // host right now (other users' exec rate), to read the next figure.
    let idle_cpu = {
        let data = tempdir()?;
        let agent = Proc(
            Command::new(&bin)
                .args(["agent", "--listen", &format!("127.0.0.1:{}", free_port()?)])
                .arg("--data-dir")
                .arg(&data)
                .env("PYMEDIC_TARGETS_ALL", "false")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start the agent")?,
        );
        std::thread::sleep(Duration::from_secs(3));
        let (c0, _) = cpu_rss(agent.0.id()).context("agent exited")?;
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(base_secs));
        let (c1, _) = cpu_rss(agent.0.id()).context("agent exited")?;
        drop(agent);
        let _ = std::fs::remove_dir_all(&data);
        (c1 - c0) / t0.elapsed().as_secs_f64() * 100.0
    };
    println!(
        "agent with no targets (discovery only, this host's exec rate): {idle_cpu:.3} % of one core"
    );

    // The agent, restricted to this bench's processes (by command line).
    let data = tempdir()?;
    let port = free_port()?;
    let metrics = free_port()?;
    let selector = format!("^\\S+ {}/", scripts.display());
    let agent = Command::new(&bin)
        .args(["agent", "--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--metrics-listen",
            &format!("127.0.0.1:{metrics}"),
            "--data-dir",
        ])
        .arg(&data)
        .env("PYMEDIC_TARGETS_CMDLINE", &selector)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start the agent")?;
    let agent = Proc(agent);
    let apid = agent.0.id();
    std::thread::sleep(Duration::from_secs(3)); // start-up (eBPF load, first scan)
    let (cpu0, _) = cpu_rss(apid).context("agent exited")?;
    let t0 = Instant::now();
    let mut peak = 0u64;
    while t0.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(1));
        let (_, rss) = cpu_rss(apid).context("agent exited")?;
        peak = peak.max(rss);
    }
    let (cpu1, rss) = cpu_rss(apid).context("agent exited")?;
    let agent_cpu = (cpu1 - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let mb = |b: u64| b as f64 / 1048576.0;
    println!(
        "agent: 25 targets for {seconds} s: CPU {agent_cpu:.3} % of one core (goal <= 0.5 %: {}), \
         RSS {:.1} MB now, {:.1} MB peak (goal <= 64 MB: {})",
        if agent_cpu <= 0.5 { "met" } else { "MISSED" },
        mb(rss),
        mb(peak),
        if mb(peak) <= 64.0 { "met" } else { "MISSED" },
    );
    println!(
        "watching 25 targets costs {:.3} % of one core above discovery alone",
        agent_cpu - idle_cpu
    );
    println!(
        "ratio: agent CPU / py-spy-polling CPU = {:.3} ({:.0}x cheaper)",
        agent_cpu / base_cpu,
        base_cpu / agent_cpu.max(1e-9)
    );
    drop(targets);

    // Latency.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let storm = start_script(py, "deadlock_storm.py", &["6", "6.0"])?;
    let one = rt.block_on(latency(port, 1, Duration::from_secs(10)))?;
    let hundred = rt.block_on(latency(port, 100, Duration::from_secs(20)))?;
    drop(storm);
    for (n, l) in [(1, &one), (100, &hundred)] {
        println!(
            "latency detection -> watcher, {n:>3} watcher(s): {} deliveries, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            l.len(),
            percentile(l, 0.5),
            percentile(l, 0.99),
            l.last().copied().unwrap_or(f64::NAN)
        );
    }
    println!(
        "          (event time = the check's start; the deadlock check's second snapshot, \
         150 ms after its first, is inside every figure)"
    );
    let p99 = percentile(&hundred, 0.99);
    println!(
        "ratio: p99 with 100 watchers / p99 with 1 = {:.2}; goal p99 <= 100 ms: {}",
        p99 / percentile(&one, 0.99),
        if p99 <= 100.0 { "met" } else { "MISSED" }
    );

    // Coverage under churn: a storm of 12 concurrent deadlocked processes
    // that live 2 s each (the durability test's storm), for 20 s.
    let storm = start_script(py, "deadlock_storm.py", &["12", "2.0"])?;
    let c = rt.block_on(churn(port, storm.0.id(), Duration::from_secs(20)))?;
    drop(storm);
    let mut delays = c.delays_ms.clone();
    delays.sort_by(f64::total_cmp);
    println!(
        "churn: {} deadlocked processes started and lived their 2 s inside the window; \
         {} found ({:.0} %); start -> deadlock finding p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        c.started,
        c.found,
        c.found as f64 / c.started.max(1) as f64 * 100.0,
        percentile(&delays, 0.5),
        percentile(&delays, 0.99),
        delays.last().copied().unwrap_or(f64::NAN)
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

struct Churn {
    /// Children of the storm that started after the window opened and
    /// exited before it closed (each deadlocks within milliseconds).
    started: usize,
    /// Of those, how many got a `deadlock` finding.
    found: usize,
    /// For each found one: its first deadlock event minus its start.
    delays_ms: Vec<f64>,
}

/// Watches deadlock findings while polling the storm's children every
/// 50 ms (each lives 2 s, so none is missed); matches them by pid.
async fn churn(port: u16, storm: u32, dur: Duration) -> anyhow::Result<Churn> {
    let mut stream = watch(port).await?;
    let found: Arc<Mutex<std::collections::HashMap<u32, f64>>> = Arc::default();
    let f2 = found.clone();
    let end = tokio::time::Instant::now() + dur + Duration::from_secs(3);
    let watcher = tokio::spawn(async move {
        while let Ok(Ok(Some(ev))) = tokio::time::timeout_at(end, stream.message()).await {
            let Some(f) = ev.finding else { continue };
            if f.kind != "deadlock" || ev.r#type != pb::EventType::Opened as i32 {
                continue;
            }
            if let (Some(t), Some(at)) = (f.target, ev.at) {
                f2.lock().unwrap().entry(t.pid).or_insert(secs(at));
            }
        }
    });
    // pid -> (first seen, last seen), wall clock seconds.
    let mut kids: std::collections::HashMap<u32, (f64, f64)> = Default::default();
    let (open, stop) = (now(), now() + dur.as_secs_f64());
    while now() < stop {
        for pid in children_of(storm) {
            let t = now();
            kids.entry(pid).and_modify(|e| e.1 = t).or_insert((t, t));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let close = now();
    // Let checks of the last children land.
    let _ = watcher.await;
    let found = found.lock().unwrap();
    let whole: Vec<(u32, f64)> = kids
        .iter()
        .filter(|(_, (first, last))| *first > open + 0.1 && *last < close - 0.1)
        .map(|(&pid, &(first, _))| (pid, first))
        .collect();
    let delays_ms: Vec<f64> = whole
        .iter()
        .filter_map(|(pid, start)| found.get(pid).map(|at| (at - start) * 1000.0))
        .collect();
    Ok(Churn {
        started: whole.len(),
        found: delays_ms.len(),
        delays_ms,
    })
}

/// Pids whose parent is `parent` (from /proc).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 2..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// Connects `n` watchers for `dur`; returns every delivery's latency (ms),
/// sorted.
async fn latency(port: u16, n: usize, dur: Duration) -> anyhow::Result<Vec<f64>> {
    let lat = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let mut stream = watch(port).await?;
        let lat = lat.clone();
        tasks.push(tokio::spawn(async move {
            let end = tokio::time::Instant::now() + dur;
            while let Ok(Ok(Some(ev))) = tokio::time::timeout_at(end, stream.message()).await {
                let now = now();
                if let Some(at) = ev.at {
                    lat.lock().unwrap().push((now - secs(at)) * 1000.0);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut v = std::mem::take(&mut *lat.lock().unwrap());
    v.sort_by(f64::total_cmp);
    Ok(v)
}

/// A `WatchFindings` stream from the agent on `port`, from now on.
async fn watch(port: u16) -> anyhow::Result<tonic::Streaming<pb::FindingEvent>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await
        .context("connect to the agent")?;
    let mut client = pb::diagnostics_client::DiagnosticsClient::new(ch);
    Ok(client
        .watch_findings(pb::WatchFindingsRequest::default())
        .await?
        .into_inner())
}

/// Wall-clock seconds since the Unix epoch (the clock event times use).
fn now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// An event time in seconds since the Unix epoch.
fn secs(at: prost_types::Timestamp) -> f64 {
    at.seconds as f64 + at.nanos as f64 / 1e9
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("pymedic-bench-agent-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
