//! `pymedic capture --pid PID --kind KIND [--duration 10s] -o FILE`: asks an
//! agent for a capture and downloads the artifact.

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use pymedic_proto::v1 as pb;

use crate::grpc::client::{AgentOpts, explain};

#[derive(Debug, Args)]
pub struct CaptureArgs {
    /// The process to capture from.
    #[arg(long)]
    pub pid: u32,
    /// dump, cpu, off-cpu, memory (the agent's `GetAgentStatus` lists what it offers).
    #[arg(long)]
    pub kind: String,
    /// How long to record (profiles).
    #[arg(long, default_value = "10s", value_parser = crate::engine::config::parse_duration)]
    pub duration: Duration,
    /// Sampling rate in Hz (profiles; 0 = the kind's default).
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
    /// Output format (kind-specific; default: the kind's first).
    #[arg(long, default_value = "")]
    pub format: String,
    /// Where to write the artifact (default: the name the agent suggests).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub agent: AgentOpts,
}

pub fn run(args: CaptureArgs) -> anyhow::Result<ExitCode> {
    let rt = super::runtime()?;
    rt.block_on(async move {
        let mut client = args.agent.connect().await?;
        let resp = client
            .trigger_capture(pb::TriggerCaptureRequest {
                pid: args.pid,
                kind: args.kind.clone(),
                duration: Some(prost_types::Duration {
                    seconds: args.duration.as_secs() as i64,
                    nanos: args.duration.subsec_nanos() as i32,
                }),
                rate_hz: args.rate,
                format: args.format.clone(),
            })
            .await
            .map_err(explain)?
            .into_inner();
        let id = resp.capture_id;
        let tty = std::io::stderr().is_terminal();
        eprintln!("capture {id}: {} of pid {} started", args.kind, args.pid);
        let started = Instant::now();
        let progress = tokio::spawn(async move {
            if !tty {
                return;
            }
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                eprint!(
                    "\r  waiting for the agent: {:.0?} elapsed ",
                    started.elapsed()
                );
            }
        });
        let mut stream = client
            .get_capture(pb::GetCaptureRequest {
                capture_id: id.clone(),
                wait: true,
            })
            .await
            .map_err(explain)?
            .into_inner();
        let mut file: Option<(PathBuf, std::fs::File)> = None;
        let mut bytes = 0u64;
        while let Some(chunk) = stream.message().await.map_err(explain)? {
            match chunk.chunk {
                Some(pb::capture_chunk::Chunk::Info(info)) => {
                    progress.abort();
                    if tty {
                        eprintln!();
                    }
                    if info.status() == pb::CaptureStatus::Failed {
                        anyhow::bail!("capture {id} failed: {}", info.error);
                    }
                    if info.status() != pb::CaptureStatus::Done {
                        anyhow::bail!("capture {id} has not finished ({:?})", info.status());
                    }
                    let path = args
                        .output
                        .clone()
                        .unwrap_or_else(|| PathBuf::from(&info.file_name));
                    let f = std::fs::File::create(&path)
                        .with_context(|| format!("create {}", path.display()))?;
                    file = Some((path, f));
                }
                Some(pb::capture_chunk::Chunk::Data(data)) => {
                    let (path, f) = file
                        .as_mut()
                        .context("the agent sent data before the capture's status")?;
                    f.write_all(&data)
                        .with_context(|| format!("write {}", path.display()))?;
                    bytes += data.len() as u64;
                }
                None => {}
            }
        }
        let (path, f) = file.context("the agent sent no capture status")?;
        f.sync_all().ok();
        eprintln!("wrote {} ({bytes} bytes)", path.display());
        Ok(ExitCode::SUCCESS)
    })
}
