//! `pymedic record --pid PID… | --all-python [--duration 10s] [--rate 100]
//! [--off-cpu] [--format pprof|speedscope|flamegraph|collapsed] -o FILE`:
//! a CPU (or wall-clock, with `--off-cpu`) profile of running Python
//! processes, written when the duration ends or on Ctrl-C.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use pymedic_python::PythonProcess;
use pymedic_python::inspect::Inspector;

use crate::discovery::{Discovery, ProcessEvent, Via};
use crate::procinfo;
use crate::profile::output::Format;
use crate::profile::{POLL_INTERVAL, ProfileConfig, Profiler, Progress, SamplerKind};

#[derive(Debug, Args)]
pub struct RecordArgs {
    /// Processes to profile (repeatable, or several after one --pid).
    #[arg(long, num_args = 1.., required_unless_present = "all_python")]
    pub pid: Vec<u32>,
    /// Profile every Python process on the host, including ones that start
    /// while recording.
    #[arg(long, conflicts_with = "pid")]
    pub all_python: bool,
    /// How long to record (e.g. 10s, 500ms, 2m); Ctrl-C stops early and
    /// still writes the profile.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Samples per second.
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// Also record time off CPU (sleeping, blocked on I/O or locks, waiting
    /// to run), weighted by its length: a wall-clock profile.
    #[arg(long)]
    pub off_cpu: bool,
    /// Output format (default: from the file name, else pprof).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Output file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// How to sample: eBPF in the kernel (default), or py-spy from userspace
    /// where eBPF is not permitted.
    #[arg(long, value_enum, default_value_t = SamplerKind::Ebpf)]
    pub sampler: SamplerKind,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Parses `10s`, `500ms`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (try 10s, 500ms, 2m)"))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{s}` (use ms, s, m or h)"
            ));
        }
    };
    if secs <= 0.0 || !secs.is_finite() {
        return Err(format!("the duration must be positive, not `{s}`"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn progress_bar(quiet: bool, total: Duration) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total.as_millis() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} recording [{bar:30}] {elapsed}/{duration} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

fn message(p: &Progress, rate: f64) -> String {
    format!(
        "{} samples ({rate:.0}/s), {} lost, {} process{}",
        p.samples,
        p.lost,
        p.processes,
        if p.processes == 1 { "" } else { "es" }
    )
}

pub fn run(args: RecordArgs) -> anyhow::Result<ExitCode> {
    let format = args
        .format
        .or_else(|| Format::from_path(&args.output))
        .unwrap_or(Format::Pprof);
    let mut targets: Vec<PythonProcess> = Vec::new();
    for &pid in &args.pid {
        targets.push(
            pymedic_python::inspect(pid)
                .with_context(|| format!("cannot profile process {pid}"))?,
        );
    }
    if args.all_python {
        let mut inspector = Inspector::new();
        let me = std::process::id();
        for pid in procinfo::all_pids().context("list /proc")? {
            if pid != me
                && let Ok(p) = inspector.inspect(pid)
            {
                targets.push(p);
            }
        }
    }
    // Fail before recording if the file cannot be written.
    let mut out = std::fs::File::create(&args.output)
        .with_context(|| format!("create the output file {}", args.output.display()))?;
    let config = ProfileConfig {
        rate_hz: args.rate,
        off_cpu: args.off_cpu,
        sampler: args.sampler,
        ..ProfileConfig::default()
    };
    let mut profiler = match Profiler::start(&targets, config) {
        Ok(p) => p,
        Err(e) if e.is_permission() && args.sampler == SamplerKind::Ebpf => {
            let _ = std::fs::remove_file(&args.output);
            eprintln!(
                "pymedic: eBPF is not permitted here ({e}).\n\
                 Rerun with `--sampler py-spy` to sample from userspace instead \
                 (the target is never stopped, but each sample costs about 1 ms of CPU)."
            );
            return Ok(ExitCode::from(77));
        }
        Err(e) => {
            let _ = std::fs::remove_file(&args.output);
            return Err(e).context("start profiling");
        }
    };

    let bar = progress_bar(args.quiet, args.duration);
    let interrupted = super::runtime()?
        .block_on(async { record_loop(&mut profiler, &args, &targets, &bar).await })?;
    bar.finish_and_clear();

    let profile = profiler.stop().context("collect the profile")?;
    let writer = format.writer();
    let mut buf = Vec::new();
    writer
        .write(&profile, &mut buf)
        .context("encode the profile")?;
    out.write_all(&buf)
        .and_then(|_| out.flush())
        .with_context(|| format!("write {}", args.output.display()))?;
    eprintln!(
        "pymedic: {}wrote {} samples from {} process{} over {:.1}s to {} ({})",
        if interrupted { "interrupted; " } else { "" },
        profile.sample_count(),
        profile.processes.len(),
        if profile.processes.len() == 1 {
            ""
        } else {
            "es"
        },
        profile.duration.as_secs_f64(),
        args.output.display(),
        writer.name(),
    );
    if profile.lost > 0 {
        eprintln!(
            "pymedic: {} samples were lost (kernel maps full or target memory unreadable); \
             shares may be off by that much",
            profile.lost
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Polls until the duration ends, Ctrl-C, or every target exits. Returns
/// whether it was interrupted.
async fn record_loop(
    profiler: &mut Profiler,
    args: &RecordArgs,
    targets: &[PythonProcess],
    bar: &ProgressBar,
) -> anyhow::Result<bool> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + args.duration;
    let mut discovery = if args.all_python {
        match Discovery::start() {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!("new Python processes will not be followed: {e}");
                None
            }
        }
    } else {
        None
    };
    let mut alive: std::collections::HashSet<u32> = targets.iter().map(|t| t.pid).collect();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(true),
            _ = tokio::time::sleep_until(deadline) => return Ok(false),
            ev = async {
                match discovery.as_mut() {
                    Some(d) => d.next().await,
                    None => std::future::pending().await,
                }
            } => {
                match ev? {
                    ProcessEvent::Started { process, via, .. }
                        if process.pid != std::process::id()
                            && !(via == Via::Scan && alive.contains(&process.pid)) =>
                    {
                        // A pid already profiled that starts again exec'd a
                        // new image: register it afresh (new layout, new
                        // code objects).
                        alive.insert(process.pid);
                        if let Err(e) = profiler.add_target(&process) {
                            tracing::warn!(pid = process.pid, "cannot profile: {e}");
                        }
                    }
                    ProcessEvent::Exited { pid, .. } if alive.remove(&pid) => {
                        profiler.remove_target(pid);
                    }
                    _ => {}
                }
            }
            _ = tick.tick() => {
                let p = profiler.poll().context("read samples")?;
                let secs = started.elapsed().as_secs_f64().max(0.001);
                bar.set_position(started.elapsed().as_millis() as u64);
                bar.set_message(message(&p, p.samples as f64 / secs));
                if !args.all_python {
                    alive.retain(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
                    if alive.is_empty() {
                        return Ok(false);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("abc").is_err());
    }
}
