//! `cargo xtask bench agent`: what an always-on agent costs, and how fast a
//! finding reaches watchers.
//!
//! 1. Starts 20 idle and 5 busy Python processes.
//! 2. Baseline (same run): the same coverage without an agent, `py-spy dump`
//!    of every process every 2 s (what one would script instead), for a
//!    third of the time; its CPU per second.
//! 3. `pymedic agent` (release) watching those 25 processes (the default
//!    detectors: deadlock every 2 s, cpu_hotspot sampling) for `--seconds`:
//!    CPU (% of one core) and peak RSS, against the goals (≤ 0.5 %, ≤ 64 MB)
//!    and against the baseline.
//! 4. Detection → watcher latency: a storm of short-lived deadlocked
//!    processes while 1, then 100, watchers stream findings over gRPC; the
//!    latency of each delivery is its arrival time minus the event time
//!    (the check that found it). p50/p99/max, goal p99 ≤ 100 ms.

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

    // Baseline: py-spy dump of every process every 2 s.
    let base_secs = (seconds / 3).max(10);
    let c0 = children_cpu_seconds();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(base_secs) {
        let round = Instant::now();
        for pid in &pids {
            let _ = Command::new("py-spy")
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
    let p99 = percentile(&hundred, 0.99);
    println!(
        "ratio: p99 with 100 watchers / p99 with 1 = {:.2}; goal p99 <= 100 ms: {}",
        p99 / percentile(&one, 0.99),
        if p99 <= 100.0 { "met" } else { "MISSED" }
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

/// Connects `n` watchers for `dur`; returns every delivery's latency (ms),
/// sorted.
async fn latency(port: u16, n: usize, dur: Duration) -> anyhow::Result<Vec<f64>> {
    let lat = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
            .connect()
            .await
            .context("connect to the agent")?;
        let mut client = pb::diagnostics_client::DiagnosticsClient::new(ch);
        let mut stream = client
            .watch_findings(pb::WatchFindingsRequest::default())
            .await?
            .into_inner();
        let lat = lat.clone();
        tasks.push(tokio::spawn(async move {
            let end = tokio::time::Instant::now() + dur;
            while let Ok(Ok(Some(ev))) = tokio::time::timeout_at(end, stream.message()).await {
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                if let Some(at) = ev.at {
                    let t = at.seconds as f64 + at.nanos as f64 / 1e9;
                    lat.lock().unwrap().push((now - t) * 1000.0);
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
