//! `--metrics-listen`: Prometheus `/metrics` (names prefixed `pymedic_`),
//! `/healthz` (the process answers) and `/readyz` (discovery has made its
//! first pass and the store answers).
//!
//! Metrics are rendered from the engine's state at scrape time, so nothing
//! is counted twice and an idle agent does no metrics work.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::engine::{Engine, usage};

type Labels = Vec<(String, String)>;

/// Renders every metric in the Prometheus text format.
pub fn render(engine: &Engine) -> Result<String, String> {
    let mut r = Registry::with_prefix("pymedic");

    let targets = Family::<Labels, Gauge>::default();
    {
        let known = engine.known.read().unwrap_or_else(|e| e.into_inner());
        let watched = known.values().filter(|k| k.selected).count() as i64;
        targets
            .get_or_create(&vec![("state".into(), "watched".into())])
            .set(watched);
        targets
            .get_or_create(&vec![("state".into(), "excluded".into())])
            .set(known.len() as i64 - watched);
    }
    r.register(
        "targets",
        "Python processes the agent knows, by state",
        targets,
    );

    let (active, total) = engine.store.counts().map_err(|e| e.to_string())?;
    let findings = Family::<Labels, Gauge>::default();
    for (kind, severity, n) in active {
        findings
            .get_or_create(&vec![
                ("kind".into(), kind),
                ("severity".into(), severity.to_string()),
            ])
            .set(n as i64);
    }
    r.register("findings", "Active findings by kind and severity", findings);
    let stored = Gauge::<i64>::default();
    stored.set(total as i64);
    r.register(
        "findings_stored",
        "Findings in the store (active and resolved)",
        stored,
    );

    let checks = Family::<Labels, Counter>::default();
    let errors = Family::<Labels, Counter>::default();
    let check_cpu = Family::<Labels, Counter<f64>>::default();
    for d in engine.registry.entries() {
        let l = vec![("detector".into(), d.detector.name().to_owned())];
        checks
            .get_or_create(&l)
            .inc_by(d.stats.checks.load(Relaxed));
        errors
            .get_or_create(&l)
            .inc_by(d.stats.errors.load(Relaxed));
        check_cpu
            .get_or_create(&l)
            .inc_by(d.stats.cpu_ns.load(Relaxed) as f64 / 1e9);
    }
    r.register("detector_checks", "Detector checks run", checks);
    r.register("detector_errors", "Detector checks that failed", errors);
    r.register(
        "detector_cpu_seconds",
        "CPU time spent in detector checks",
        check_cpu,
    );

    let counter = |v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        c
    };
    let c = &engine.counters;
    r.register(
        "samples",
        "Stack and profile samples taken",
        counter(usage::samples()),
    );
    r.register(
        "lost_events",
        "Kernel events lost (ring buffers full)",
        counter(c.lost_events.load(Relaxed) + usage::lost_events()),
    );
    r.register(
        "ebpf_errors",
        "eBPF program and loading errors",
        counter(c.ebpf_errors.load(Relaxed)),
    );
    r.register(
        "finding_events",
        "Finding events published to watchers",
        counter(c.events.load(Relaxed)),
    );
    let cpu = Counter::<f64>::default();
    cpu.inc_by(usage::process_cpu_ns() as f64 / 1e9);
    r.register("agent_cpu_seconds", "CPU time the agent has used", cpu);
    let rss = Gauge::<i64>::default();
    rss.set(usage::self_rss_bytes() as i64);
    r.register(
        "agent_resident_memory_bytes",
        "Resident memory of the agent",
        rss,
    );

    let mut out = String::new();
    encode(&mut out, &r).map_err(|e| e.to_string())?;
    Ok(out)
}

async fn metrics(State(engine): State<Arc<Engine>>) -> impl IntoResponse {
    let e = engine.clone();
    match tokio::task::spawn_blocking(move || render(&e)).await {
        Ok(Ok(text)) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(engine): State<Arc<Engine>>) -> impl IntoResponse {
    if !engine.is_ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "discovering processes\n".to_owned(),
        );
    }
    let store = engine.store.clone();
    match tokio::task::spawn_blocking(move || store.last_seq()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n".to_owned()),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}\n")),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}\n")),
    }
}

/// The HTTP routes.
pub fn routes(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(engine)
}

/// Serves the routes on `addr` until `shutdown`.
pub async fn serve(
    engine: Arc<Engine>,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(
        "metrics on http://{}/metrics",
        listener.local_addr().unwrap_or(addr)
    );
    axum::serve(listener, routes(engine))
        .with_graceful_shutdown(shutdown)
        .await
}
