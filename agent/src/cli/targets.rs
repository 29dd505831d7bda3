//! `pymedic targets`: the Python processes an agent sees and watches.

use std::process::ExitCode;

use clap::Args;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use pymedic_proto::v1 as pb;
use serde::Serialize;

use crate::grpc::client::{AgentOpts, explain};
use crate::grpc::convert::target_from_pb;
use crate::procinfo::{human_bytes, human_duration};

#[derive(Debug, Args)]
pub struct TargetsArgs {
    /// Also list Python processes the agent's selection excludes.
    #[arg(long)]
    pub all: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub agent: AgentOpts,
}

#[derive(Serialize)]
struct Row {
    #[serde(flatten)]
    target: pymedic_model::Target,
    build: String,
    state: String,
    selected: bool,
    active_findings: u64,
    threads: u32,
    rss_bytes: u64,
    uptime_seconds: f64,
    checks_cpu_seconds: f64,
    cmdline: Vec<String>,
}

pub fn run(args: TargetsArgs) -> anyhow::Result<ExitCode> {
    let rt = super::runtime()?;
    rt.block_on(async move {
        let mut client = args.agent.connect().await?;
        let resp = client
            .list_targets(pb::ListTargetsRequest {
                include_unselected: args.all,
            })
            .await
            .map_err(explain)?
            .into_inner();
        let rows: Vec<Row> = resp
            .targets
            .into_iter()
            .map(|t| Row {
                target: t.target.as_ref().map(target_from_pb).unwrap_or_default(),
                build: t.build,
                state: t.state,
                selected: t.selected,
                active_findings: t.active_findings,
                threads: t.threads,
                rss_bytes: t.rss_bytes,
                uptime_seconds: t.uptime_seconds,
                checks_cpu_seconds: t.checks_cpu_seconds,
                cmdline: t.cmdline,
            })
            .collect();
        if args.json {
            super::print_json(&rows)?;
            return Ok(ExitCode::SUCCESS);
        }
        if rows.is_empty() {
            println!("the agent watches no Python processes");
            return Ok(ExitCode::SUCCESS);
        }
        let mut table = Table::new();
        table.load_preset(UTF8_FULL_CONDENSED).set_header([
            "PID", "PYTHON", "BUILD", "STATE", "FINDINGS", "THREADS", "RSS", "UPTIME", "POD",
            "COMMAND",
        ]);
        for r in &rows {
            let cmd = r.cmdline.join(" ");
            table.add_row([
                r.target.pid.to_string(),
                r.target.python.clone().unwrap_or_default(),
                r.build.clone(),
                r.state.clone(),
                r.active_findings.to_string(),
                r.threads.to_string(),
                human_bytes(r.rss_bytes),
                human_duration(r.uptime_seconds),
                r.target.pod.clone().unwrap_or_else(|| "-".into()),
                if cmd.chars().count() > 60 {
                    format!("{}…", cmd.chars().take(59).collect::<String>())
                } else {
                    cmd
                },
            ]);
        }
        println!("{table}");
        Ok(ExitCode::SUCCESS)
    })
}
