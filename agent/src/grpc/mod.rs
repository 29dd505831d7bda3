//! The gRPC API (`pymedic.v1.Diagnostics`), plus `grpc.health.v1` and server
//! reflection, with TLS (rustls, optional client certificates) and bearer
//! token authentication. The service is thin (see [`service`]); the
//! [`client`] module is what `pymedic findings|capture|targets` use.

pub mod auth;
pub mod client;
pub mod convert;
pub mod service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use pymedic_proto::v1 as pb;
use pymedic_proto::v1::diagnostics_server::DiagnosticsServer;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::Router;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::engine::Engine;
use auth::BearerAuth;

/// Largest message a client may send or receive (findings with many stacks).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// gRPC server errors.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("read {what} {path}: {source}")]
    ReadPem {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configure TLS: {0}")]
    Tls(tonic::transport::Error),
    #[error("build the reflection service: {0}")]
    Reflection(String),
    #[error("listen on {addr}: {source}; is another agent running? pick another --listen")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serve gRPC: {0}")]
    Serve(tonic::transport::Error),
    #[error(transparent)]
    Policy(#[from] auth::ListenPolicyError),
}

/// Server TLS material (PEM files).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require client certificates signed by this CA (mTLS).
    pub client_ca: Option<PathBuf>,
}

fn read(what: &'static str, path: &PathBuf) -> Result<Vec<u8>, GrpcError> {
    std::fs::read(path).map_err(|source| GrpcError::ReadPem {
        what,
        path: path.clone(),
        source,
    })
}

/// Builds the server with every service. Use [`serve`] for a socket; tests
/// serve the router over in-memory streams.
pub async fn router(
    engine: Arc<Engine>,
    token: Option<String>,
    tls: Option<&TlsFiles>,
) -> Result<Router, GrpcError> {
    let auth = BearerAuth::new(token);
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<DiagnosticsServer<service::Service>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| GrpcError::Reflection(e.to_string()))?;
    let mut server = Server::builder();
    if let Some(tls) = tls {
        let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(
            read("TLS certificate", &tls.cert)?,
            read("TLS key", &tls.key)?,
        ));
        if let Some(ca) = &tls.client_ca {
            cfg = cfg.client_ca_root(Certificate::from_pem(read("client CA", ca)?));
        }
        server = server.tls_config(cfg).map_err(GrpcError::Tls)?;
    }
    let diagnostics = DiagnosticsServer::new(service::Service::new(engine))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    Ok(server
        .add_service(health_service)
        .add_service(InterceptedService::new(reflection, auth.clone()))
        .add_service(InterceptedService::new(diagnostics, auth)))
}

/// Serves on `addr` until `shutdown` resolves. Checks the listen policy
/// first (non-loopback needs TLS or a token, or `insecure`).
pub async fn serve(
    engine: Arc<Engine>,
    addr: SocketAddr,
    token: Option<String>,
    tls: Option<TlsFiles>,
    insecure: bool,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), GrpcError> {
    if let Some(warning) = auth::check_listen(addr, tls.is_some(), token.is_some(), insecure)? {
        tracing::warn!("{warning}");
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| GrpcError::Bind { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(
        "gRPC API on {local} ({}{})",
        if tls.is_some() { "TLS" } else { "plaintext" },
        if token.is_some() {
            ", token required"
        } else {
            ""
        }
    );
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    router(engine, token, tls.as_ref())
        .await?
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(GrpcError::Serve)
}
