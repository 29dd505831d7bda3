//! Connecting to an agent: address, token and TLS options shared by the
//! client commands (`pymedic findings|capture|targets`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use pymedic_proto::v1::diagnostics_client::DiagnosticsClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How to reach an agent.
#[derive(Clone, Debug, Args)]
pub struct AgentOpts {
    /// The agent's gRPC address (host:port or a http:// / https:// URL).
    #[arg(
        long,
        env = "PYMEDIC_AGENT",
        default_value = "127.0.0.1:7070",
        global = true
    )]
    pub agent: String,
    /// Bearer token (prefer --token-file or PYMEDIC_TOKEN).
    #[arg(long, env = "PYMEDIC_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// File whose first line is the bearer token.
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// Use TLS, trusting this CA (PEM) for the agent's certificate.
    #[arg(long, global = true)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for agents that require one (mTLS).
    #[arg(long, global = true, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM) for --tls-cert.
    #[arg(long, global = true, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Server name to verify in the agent's certificate (default: the host).
    #[arg(long, global = true)]
    pub tls_domain: Option<String>,
}

/// Adds `authorization: Bearer …` to every call.
#[derive(Clone)]
pub struct Token(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Client = DiagnosticsClient<InterceptedService<Channel, Token>>;

impl AgentOpts {
    fn token_value(&self) -> anyhow::Result<Option<String>> {
        if let Some(path) = &self.token_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("read the token file {}", path.display()))?;
            let t = text.lines().next().unwrap_or("").trim().to_owned();
            anyhow::ensure!(!t.is_empty(), "the token file {} is empty", path.display());
            return Ok(Some(t));
        }
        Ok(self.token.clone().filter(|t| !t.is_empty()))
    }

    /// Connects (TLS when `--tls-ca` is given or the URL is https://).
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let tls = self.tls_ca.is_some() || self.agent.starts_with("https://");
        let url = if self.agent.contains("://") {
            self.agent.clone()
        } else {
            format!("{}://{}", if tls { "https" } else { "http" }, self.agent)
        };
        let mut endpoint = Endpoint::from_shared(url.clone())
            .with_context(|| format!("invalid agent address {:?}", self.agent))?
            .connect_timeout(Duration::from_secs(5));
        if tls {
            let mut cfg = ClientTlsConfig::new();
            if let Some(ca) = &self.tls_ca {
                let pem =
                    std::fs::read(ca).with_context(|| format!("read the CA {}", ca.display()))?;
                cfg = cfg.ca_certificate(Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
                let c = std::fs::read(cert).with_context(|| format!("read {}", cert.display()))?;
                let k = std::fs::read(key).with_context(|| format!("read {}", key.display()))?;
                cfg = cfg.identity(Identity::from_pem(c, k));
            }
            if let Some(d) = &self.tls_domain {
                cfg = cfg.domain_name(d.clone());
            }
            endpoint = endpoint.tls_config(cfg).context("configure TLS")?;
        }
        let channel = endpoint.connect().await.with_context(|| {
            format!("connect to the pymedic agent at {url}: is `pymedic agent` running there? (--agent ADDR)")
        })?;
        let token = match self.token_value()? {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .context("the token contains characters not allowed in a header")?,
            ),
            None => None,
        };
        Ok(DiagnosticsClient::with_interceptor(channel, Token(token))
            .max_decoding_message_size(16 * 1024 * 1024))
    }
}

/// Turns a gRPC error into a message that says what to do.
pub fn explain(status: tonic::Status) -> anyhow::Error {
    use tonic::Code;
    let hint = match status.code() {
        Code::Unauthenticated => " (pass the agent's token: --token-file FILE or PYMEDIC_TOKEN)",
        Code::Unavailable => {
            " (is the agent running, and is --agent right? TLS agents need --tls-ca)"
        }
        _ => "",
    };
    anyhow::anyhow!("agent: {:?}: {}{hint}", status.code(), status.message())
}
