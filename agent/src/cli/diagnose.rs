//! `pymedic diagnose --pid PID`: every applicable detector against one live
//! process for a while, no daemon and no store; findings as a table, JSON
//! (`{"target": ..., "findings": [...]}`) and/or a Markdown report.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;
use tokio::sync::mpsc;

use super::report;
use crate::engine::config::{Config, parse_duration};
use crate::engine::detect::Registry;
use crate::engine::detect::scheduler::{Budget, Control, Output, Scheduler};
use crate::engine::tally::Tally;
use crate::engine::targets::{self, TargetInfo};

#[derive(Debug, Args)]
pub struct DiagnoseArgs {
    /// The Python process to diagnose.
    #[arg(long)]
    pub pid: u32,
    /// How long to observe it.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Print `{"target": ..., "findings": [...]}` instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write a Markdown report (for an incident ticket) to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Detector settings (`[detectors.NAME]`, `[detect]`) from an agent config.
    #[arg(long, short, env = "PYMEDIC_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Serialize)]
struct Output_ {
    target: pymedic_model::Target,
    findings: Vec<pymedic_model::Finding>,
    detectors: Vec<&'static str>,
    duration_seconds: f64,
}

pub fn run(args: DiagnoseArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(
        args.config.as_deref(),
        |k| std::env::var(k).ok(),
        &[],
        &Registry::builtin_names(),
    )
    .map_err(super::bad)?;
    let registry = Registry::builtin(&config).map_err(super::bad)?;
    let target =
        TargetInfo::inspect(args.pid).with_context(|| format!("diagnose process {}", args.pid))?;
    let names: Vec<&'static str> = registry
        .entries()
        .iter()
        .map(|e| e.detector.name())
        .collect();
    if names.is_empty() {
        eprintln!(
            "pymedic: warning: no detectors are built into this pymedic; nothing will be found"
        );
    }
    let started = pymedic_model::now();
    let rt = super::runtime()?;
    let (tally, observed) = rt.block_on(observe(
        &registry,
        &config,
        &target,
        args.duration,
        args.json,
    ));
    let findings = tally.findings();
    let model = target.model();
    if let Some(path) = &args.report {
        let md = report::markdown(
            &model,
            &target.cmdline,
            &findings,
            &started,
            observed,
            &names,
        );
        std::fs::write(path, md).with_context(|| format!("write the report {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    if args.json {
        super::print_json(&Output_ {
            target: model,
            findings,
            detectors: names,
            duration_seconds: observed.as_secs_f64(),
        })?;
    } else if findings.is_empty() {
        println!(
            "no findings for pid {} after {:.0?} ({} detector(s): {})",
            args.pid,
            observed,
            names.len(),
            names.join(", ")
        );
    } else {
        println!("{}", report::table(&findings));
        for f in &findings {
            println!("\n{}", report::detail(f));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs the scheduler on one target until `duration` passes or it exits.
async fn observe(
    registry: &Registry,
    config: &Config,
    target: &TargetInfo,
    duration: Duration,
    quiet: bool,
) -> (Tally, Duration) {
    let budget = Budget {
        // One process, on request: allow more than the agent's idle budget.
        cpu_budget: config.detect.cpu_budget.max(0.05),
        busy_threshold: config.detect.busy_threshold,
        max_backoff: config
            .detect
            .max_backoff
            .0
            .min(duration.max(Duration::from_secs(1))),
        workers: config.detect.workers,
    };
    let (out_tx, mut out_rx) = mpsc::channel(config.detect.queue);
    let (control_tx, control_rx) = mpsc::channel(4);
    let scheduler = Scheduler::new(registry, budget, out_tx);
    let task = tokio::spawn(scheduler.run(control_rx));
    let _ = control_tx
        .send(Control::Add(Box::new(target.clone())))
        .await;
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + duration;
    let progress = !quiet && std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut tally = Tally::default();
    let mut exited = false;
    loop {
        tokio::select! {
            out = out_rx.recv() => match out {
                Some(Output::Pass { detector, findings, at, .. }) => tally.record(detector, findings, at),
                Some(Output::Gone { .. }) | None => { exited = true; break; }
            },
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tick.tick() => {
                if !targets::alive(target.id) {
                    exited = true;
                    break;
                }
                if progress {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    eprint!("\rdiagnosing pid {}: {:>4}s left, {} finding(s)  ", target.id.pid, left.as_secs(), tally.findings().len());
                }
            }
        }
    }
    if progress {
        eprintln!();
    }
    if exited {
        eprintln!(
            "pymedic: process {} exited during the diagnosis",
            target.id.pid
        );
    }
    drop(control_tx);
    // Record what checks still running report, then stop.
    while let Some(out) = out_rx.recv().await {
        if let Output::Pass {
            detector,
            findings,
            at,
            ..
        } = out
        {
            tally.record(detector, findings, at);
        }
    }
    let _ = task.await;
    (tally, start.elapsed())
}
