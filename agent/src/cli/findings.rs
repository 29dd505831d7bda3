//! `pymedic findings list|watch|show ID`: a gRPC client of an agent.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use pymedic_proto::v1 as pb;
use serde::Serialize;

use super::report;
use crate::grpc::client::{AgentOpts, explain};
use crate::grpc::convert::{finding_from_pb, layer_to_pb, severity_to_pb, time_to_pb};

#[derive(Debug, Args)]
pub struct FindingsArgs {
    #[command(subcommand)]
    pub command: FindingsCommand,
    #[command(flatten)]
    pub agent: AgentOpts,
}

#[derive(Debug, Args, Clone)]
pub struct Filters {
    /// Only this layer (surface, behavioral, structural, temporal, resource, integration).
    #[arg(long)]
    pub layer: Option<pymedic_model::Layer>,
    /// Only this kind (deadlock, cpu_hotspot, ...).
    #[arg(long)]
    pub kind: Option<String>,
    /// Only this severity or worse (info, low, medium, high, critical).
    #[arg(long)]
    pub severity: Option<pymedic_model::Severity>,
    /// Only findings about this process.
    #[arg(long)]
    pub pid: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum FindingsCommand {
    /// Stored findings, newest first.
    List {
        #[command(flatten)]
        filters: Filters,
        /// Only findings seen within this long ("1h", "30m").
        #[arg(long, value_parser = crate::engine::config::parse_duration)]
        since: Option<Duration>,
        /// Only active (or resolved) findings.
        #[arg(long, value_parser = ["active", "resolved"])]
        status: Option<String>,
        /// At most this many (all pages are fetched up to it).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print a JSON array of findings.
        #[arg(long)]
        json: bool,
    },
    /// Finding events as they happen; reconnects and resumes without gaps.
    Watch {
        #[command(flatten)]
        filters: Filters,
        /// Resume after this event sequence (0 = every retained event).
        #[arg(long)]
        after: Option<u64>,
        /// Print one JSON object per line.
        #[arg(long)]
        json: bool,
        /// Stop after this many events (for scripts).
        #[arg(long)]
        count: Option<u64>,
    },
    /// One finding in detail.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: FindingsArgs) -> anyhow::Result<ExitCode> {
    let rt = super::runtime()?;
    rt.block_on(async move {
        match args.command {
            FindingsCommand::List {
                filters,
                since,
                status,
                limit,
                json,
            } => list(&args.agent, filters, since, status, limit, json).await,
            FindingsCommand::Watch {
                filters,
                after,
                json,
                count,
            } => watch(&args.agent, filters, after, json, count).await,
            FindingsCommand::Show { id, json } => show(&args.agent, &id, json).await,
        }
    })
}

async fn list(
    agent: &AgentOpts,
    f: Filters,
    since: Option<Duration>,
    status: Option<String>,
    limit: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = agent.connect().await?;
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let req = pb::ListFindingsRequest {
            layer: f.layer.map(layer_to_pb).unwrap_or_default() as i32,
            kind: f.kind.clone().unwrap_or_default(),
            severity: f.severity.map(severity_to_pb).unwrap_or_default() as i32,
            pid: f.pid.unwrap_or(0),
            since: since.map(|d| time_to_pb(pymedic_model::now() - d)),
            status: match status.as_deref() {
                Some("active") => pb::Status::Active,
                Some("resolved") => pb::Status::Resolved,
                _ => pb::Status::Unspecified,
            } as i32,
            page_size: (limit - out.len()).min(1000) as u32,
            page_token: token,
        };
        let resp = client
            .list_findings(req)
            .await
            .map_err(explain)?
            .into_inner();
        out.extend(resp.findings.iter().map(finding_from_pb));
        token = resp.next_page_token;
        if token.is_empty() || out.len() >= limit {
            break;
        }
    }
    if json {
        super::print_json(&out)?;
    } else if out.is_empty() {
        println!("no findings");
    } else {
        println!("{}", report::table(&out));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct EventLine {
    sequence: u64,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(with = "time::serde::rfc3339")]
    at: pymedic_model::Timestamp,
    finding: pymedic_model::Finding,
}

async fn watch(
    agent: &AgentOpts,
    f: Filters,
    after: Option<u64>,
    json: bool,
    count: Option<u64>,
) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    let mut cursor = after;
    let mut seen = 0u64;
    let mut failures = 0u32;
    if !json {
        eprintln!("watching findings on {} (Ctrl-C to stop)", agent.agent);
    }
    loop {
        let attempt = async {
            let mut client = agent.connect().await?;
            let req = pb::WatchFindingsRequest {
                after_sequence: cursor,
                layer: f.layer.map(layer_to_pb).unwrap_or_default() as i32,
                kind: f.kind.clone().unwrap_or_default(),
                severity: f.severity.map(severity_to_pb).unwrap_or_default() as i32,
                pid: f.pid.unwrap_or(0),
            };
            let mut stream = match client.watch_findings(req).await {
                Ok(s) => s.into_inner(),
                Err(s) if fatal(s.code()) => return Err(explain(s)).context("cannot resume"),
                Err(s) => return Err(explain(s)),
            };
            loop {
                let ev = match stream.message().await {
                    Ok(Some(ev)) => ev,
                    Ok(None) => anyhow::bail!("the agent closed the stream"),
                    Err(s)
                        if s.code() == tonic::Code::OutOfRange
                            || s.code() == tonic::Code::Unauthenticated =>
                    {
                        return Err(explain(s)).context("cannot resume");
                    }
                    Err(s) => return Err(explain(s)),
                };
                failures = 0;
                cursor = Some(ev.sequence);
                let finding =
                    finding_from_pb(ev.finding.as_ref().context("event without a finding")?);
                let kind = match ev.r#type() {
                    pb::EventType::Opened => "opened",
                    pb::EventType::Updated => "updated",
                    pb::EventType::Resolved => "resolved",
                    pb::EventType::Unspecified => "unknown",
                };
                let mut out = std::io::stdout().lock();
                if json {
                    let line = EventLine {
                        sequence: ev.sequence,
                        kind,
                        at: ev
                            .at
                            .as_ref()
                            .map(crate::grpc::convert::time_from_pb)
                            .unwrap_or(finding.last_seen),
                        finding,
                    };
                    writeln!(out, "{}", serde_json::to_string(&line)?)?;
                } else {
                    writeln!(
                        out,
                        "#{:<6} {:<8} {:<8} {:<16} pid {:<7} {}:{}  {}",
                        ev.sequence,
                        kind,
                        finding.severity,
                        finding.kind,
                        finding.target.as_ref().map(|t| t.pid).unwrap_or(0),
                        finding.location.file,
                        finding.location.line,
                        finding.title
                    )?;
                }
                out.flush()?;
                seen += 1;
                if count.is_some_and(|c| seen >= c) {
                    return Ok(());
                }
            }
        };
        let result = tokio::select! {
            r = attempt => r,
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        };
        match result {
            Ok(()) => return Ok(ExitCode::SUCCESS),
            Err(e) if e.to_string().contains("cannot resume") => return Err(e),
            Err(e) => {
                failures += 1;
                if failures > 30 {
                    return Err(e.context("giving up after 30 reconnection attempts"));
                }
                let wait = Duration::from_millis(200 * u64::from(failures.min(10)));
                eprintln!(
                    "pymedic: {e:#}; reconnecting in {wait:?} (resuming after #{})",
                    cursor.unwrap_or(0)
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Errors a reconnection cannot fix.
fn fatal(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        OutOfRange | Unauthenticated | PermissionDenied | InvalidArgument | Unimplemented
    )
}

async fn show(agent: &AgentOpts, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = agent.connect().await?;
    let f = client
        .get_finding(pb::GetFindingRequest { id: id.to_owned() })
        .await
        .map_err(explain)?
        .into_inner();
    let f = finding_from_pb(&f);
    if json {
        super::print_json(&f)?;
    } else {
        print!("{}", report::detail(&f));
    }
    Ok(ExitCode::SUCCESS)
}
