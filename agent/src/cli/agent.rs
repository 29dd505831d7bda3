//! `pymedic agent`: the node daemon. Discovers Python processes, runs the
//! detectors continuously, stores findings, serves gRPC and /metrics.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use crate::engine::Engine;
use crate::engine::capture::Captures;
use crate::engine::config::Config;
use crate::engine::detect::Registry;
use crate::grpc::{self, TlsFiles};

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// TOML configuration (reference: deploy/pymedic.toml).
    #[arg(long, short, env = "PYMEDIC_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address [config: listen, default 127.0.0.1:7070].
    #[arg(long)]
    pub listen: Option<String>,
    /// Prometheus /metrics, /healthz, /readyz address [config: metrics_listen].
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Where findings and captures are kept [config: data_dir, default /var/lib/pymedic].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// File holding the bearer token clients must send [config: auth.token_file].
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// PEM server certificate [config: tls.cert].
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM server key [config: tls.key].
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mTLS) [config: tls.client_ca].
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Allow a non-loopback --listen without TLS or token (logs a warning).
    #[arg(long)]
    pub insecure: bool,
    /// Validate the configuration (file, environment, flags) and exit.
    #[arg(long)]
    pub check_config: bool,
}

impl AgentArgs {
    fn flags(&self) -> Vec<(&'static str, toml::Value)> {
        let s = |v: &str| toml::Value::String(v.to_owned());
        let p = |v: &PathBuf| toml::Value::String(v.display().to_string());
        let mut f = Vec::new();
        if let Some(v) = &self.listen {
            f.push(("listen", s(v)));
        }
        if let Some(v) = &self.metrics_listen {
            f.push(("metrics_listen", s(v)));
        }
        if let Some(v) = &self.data_dir {
            f.push(("data_dir", p(v)));
        }
        if let Some(v) = &self.token_file {
            f.push(("auth.token_file", p(v)));
        }
        if let Some(v) = &self.tls_cert {
            f.push(("tls.cert", p(v)));
        }
        if let Some(v) = &self.tls_key {
            f.push(("tls.key", p(v)));
        }
        if let Some(v) = &self.tls_client_ca {
            f.push(("tls.client_ca", p(v)));
        }
        if self.insecure {
            f.push(("insecure", toml::Value::Boolean(true)));
        }
        f
    }
}

pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(
        args.config.as_deref(),
        |k| std::env::var(k).ok(),
        &args.flags(),
        &Registry::builtin_names(),
    )
    .map_err(super::bad)?;
    let registry = Registry::builtin(&config).map_err(super::bad)?;
    let token = config.token().map_err(super::bad)?;
    let listen = config
        .listen_addr()
        .map_err(|m| super::BadInput(format!("config key `listen`: {m}")))?;
    let tls = (!config.tls.cert.as_os_str().is_empty()).then(|| TlsFiles {
        cert: config.tls.cert.clone(),
        key: config.tls.key.clone(),
        client_ca: (!config.tls.client_ca.as_os_str().is_empty())
            .then(|| config.tls.client_ca.clone()),
    });
    // Refuse an unprotected public address before touching anything else.
    grpc::auth::check_listen(listen, tls.is_some(), token.is_some(), config.insecure)
        .map_err(|e| super::BadInput(e.to_string()))?;
    if args.check_config {
        println!(
            "configuration is valid: listen {listen} ({}{}), data_dir {}, detectors: {}",
            if tls.is_some() { "TLS" } else { "plaintext" },
            if token.is_some() { ", token" } else { "" },
            config.data_dir.display(),
            registry
                .entries()
                .iter()
                .map(|e| e.detector.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(ExitCode::SUCCESS);
    }
    let metrics_addr = (!config.metrics_listen.is_empty())
        .then(|| config.metrics_listen.parse())
        .transpose()
        .context("metrics_listen")?;
    let insecure = config.insecure;
    crate::engine::usage::limit_malloc_arenas();
    let rt = super::runtime()?;
    rt.block_on(async move {
        let data_dir = config.data_dir.clone();
        let (engine, _tasks) = Engine::start(config, registry, Captures::builtin())
            .context("start the agent engine")?;
        eprintln!(
            "pymedic agent: gRPC on {listen}, data in {}, {} detector(s): {}",
            data_dir.display(),
            engine.registry.entries().len(),
            engine
                .registry
                .entries()
                .iter()
                .map(|e| e.detector.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        if let Some(addr) = metrics_addr {
            let e = engine.clone();
            let rx = stop_rx.clone();
            tokio::spawn(async move {
                if let Err(err) = crate::metrics::serve(e, addr, stopped(rx)).await {
                    tracing::error!("metrics server on {addr}: {err}");
                }
            });
        }
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("stopping");
            let _ = stop_tx.send(true);
        });
        let served = grpc::serve(
            engine.clone(),
            listen,
            token,
            tls,
            insecure,
            stopped(stop_rx),
        )
        .await;
        engine.captures.cancel_all();
        served.context("gRPC server")?;
        Ok(ExitCode::SUCCESS)
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
