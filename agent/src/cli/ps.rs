//! `pymedic ps [--json] [--watch]`: the Python processes on this host.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use pymedic_python::inspect::{InspectError, Inspector};
use serde::Serialize;

use crate::discovery::{Discovery, ProcessEvent};
use crate::procinfo::{self, human_bytes, human_duration};

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Print JSON instead of a table (with --watch: one JSON object per line).
    #[arg(long)]
    pub json: bool,
    /// Keep running and report Python processes as they start and exit
    /// (eBPF exec/fork/exit tracepoints; needs root).
    #[arg(long)]
    pub watch: bool,
}

/// One row of `pymedic ps --json`.
#[derive(Debug, Serialize)]
pub struct PsRow {
    pub pid: u32,
    pub ppid: u32,
    pub exe: String,
    pub python: String,
    /// "shared" or "static".
    pub build: &'static str,
    /// The libpython path for shared builds.
    pub library: Option<String>,
    pub container: Option<String>,
    pub pod: Option<String>,
    pub threads: u32,
    pub rss_bytes: u64,
    pub uptime_seconds: f64,
    pub cmdline: Vec<String>,
}

fn row(process: &pymedic_python::PythonProcess) -> Option<PsRow> {
    let info = procinfo::read(process.pid).ok()?;
    Some(PsRow {
        pid: process.pid,
        ppid: info.ppid,
        exe: process.exe.clone(),
        python: process.version.to_string(),
        build: process.build.label(),
        library: match &process.build {
            pymedic_python::Build::Shared { library } => Some(library.clone()),
            pymedic_python::Build::Static => None,
        },
        container: info.cgroup.container,
        pod: info.cgroup.pod,
        threads: info.threads,
        rss_bytes: info.rss_bytes,
        uptime_seconds: (info.uptime_secs * 10.0).round() / 10.0,
        cmdline: info.cmdline,
    })
}

/// A process that looked relevant but could not be inspected: (pid, reason).
pub type Problem = (u32, String);

/// Scans `/proc` once and returns every Python process, with the ones that
/// could not be read.
pub fn scan() -> anyhow::Result<(Vec<PsRow>, Vec<Problem>)> {
    let mut inspector = Inspector::new();
    let me = std::process::id();
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    for pid in procinfo::all_pids().context("list /proc")? {
        if pid == me {
            continue;
        }
        match inspector.inspect(pid) {
            Ok(p) => rows.extend(row(&p)),
            Err(InspectError::NotPython { .. } | InspectError::NoSuchProcess { .. }) => {}
            Err(e @ InspectError::UnsupportedVersion { .. }) => problems.push((pid, e.to_string())),
            Err(e @ InspectError::PermissionDenied { .. }) => problems.push((pid, e.to_string())),
            Err(e) => tracing::debug!(pid, "skipping: {e}"),
        }
    }
    Ok((rows, problems))
}

pub fn run(args: PsArgs) -> anyhow::Result<ExitCode> {
    if args.watch {
        return watch(args.json);
    }
    let (rows, problems) = scan()?;
    let denied = problems
        .iter()
        .filter(|(_, why)| why.contains("denied"))
        .count();
    for (pid, why) in problems.iter().filter(|(_, why)| !why.contains("denied")) {
        eprintln!("pymedic: pid {pid}: {why}");
    }
    if denied > 0 {
        eprintln!(
            "pymedic: {denied} process(es) could not be inspected (permission denied): run as root \
             or grant CAP_SYS_PTRACE; `-v` lists them"
        );
        for (pid, why) in problems.iter().filter(|(_, why)| why.contains("denied")) {
            tracing::info!(pid, "{why}");
        }
    }
    if args.json {
        super::print_json(&rows)?;
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!("no Python processes found");
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "PID",
        "PYTHON",
        "BUILD",
        "THREADS",
        "RSS",
        "UPTIME",
        "CONTAINER",
        "POD",
        "COMMAND",
    ]);
    for r in &rows {
        table.add_row([
            r.pid.to_string(),
            r.python.clone(),
            r.build.to_string(),
            r.threads.to_string(),
            human_bytes(r.rss_bytes),
            human_duration(r.uptime_seconds),
            r.container
                .as_deref()
                .map(|c| c[..12.min(c.len())].to_owned())
                .unwrap_or_else(|| "-".into()),
            r.pod.clone().unwrap_or_else(|| "-".into()),
            truncate(&r.cmdline.join(" "), 60),
        ]);
    }
    println!("{table}");
    Ok(ExitCode::SUCCESS)
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

#[derive(Serialize)]
struct WatchLine<'a> {
    event: &'static str,
    pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    via: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    process: Option<&'a PsRow>,
    /// Milliseconds since the Unix epoch when pymedic reported it.
    at_ms: u128,
}

fn watch(json: bool) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    let rt = super::runtime()?;
    rt.block_on(async {
        let mut discovery = Discovery::start().context("start process discovery")?;
        if !json {
            eprintln!("watching for Python processes (Ctrl-C to stop)");
        }
        loop {
            let ev = tokio::select! {
                ev = discovery.next() => ev?,
                _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            };
            let at_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            let (line, text) = match &ev {
                ProcessEvent::Started { process, via, .. } => {
                    let r = row(process);
                    let text = format!(
                        "+ {} python {} ({}) via {} {}",
                        process.pid,
                        process.version,
                        process.build.label(),
                        via.as_str(),
                        process.exe
                    );
                    let line = serde_json::to_string(&WatchLine {
                        event: "started",
                        pid: process.pid,
                        via: Some(via.as_str()),
                        process: r.as_ref(),
                        at_ms,
                    })?;
                    (line, text)
                }
                ProcessEvent::Exited { pid, .. } => (
                    serde_json::to_string(&WatchLine {
                        event: "exited",
                        pid: *pid,
                        via: None,
                        process: None,
                        at_ms,
                    })?,
                    format!("- {pid} exited"),
                ),
            };
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", if json { line } else { text })?;
            out.flush()?;
        }
    })
}
