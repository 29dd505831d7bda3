//! The agent's engine: everything between process discovery and the gRPC
//! API. See `ARCHITECTURE.md` ("Data flow: the agent").
//!
//! [`Engine::start`] wires the pieces: a discovery task (eBPF, or `/proc`
//! polling when eBPF is unavailable) keeps the table of Python processes and
//! tells the [`detect::scheduler`] which ones are selected; the scheduler
//! runs detector checks and sends each pass through a bounded channel to the
//! writer task, which records it in the [`store`] and only after the commit
//! publishes the resulting events to watchers. The gRPC layer reads the
//! store, subscribes to the events and asks [`capture`] for artifacts.

pub mod capture;
pub mod config;
pub mod detect;
pub mod discover;
pub mod store;
pub mod tally;
pub mod targets;
pub mod usage;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use pymedic_model::Timestamp;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

use capture::{Capturer, Captures};
use config::Config;
use detect::Registry;
use detect::scheduler::{Budget, Control, Output, Scheduler, SharedStats};
use store::{Event, Store, StoreError};
use targets::{Selector, TargetId, TargetInfo};

/// Events buffered per watcher before it must catch up from the store.
const EVENT_BUFFER: usize = 4096;

/// Engine start-up errors.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("config key `targets`: {0}")]
    Selector(#[from] regex::Error),
}

/// A Python process the agent knows about.
#[derive(Clone, Debug)]
pub struct Known {
    pub info: TargetInfo,
    pub selected: bool,
}

/// Counters shown in status and metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Kernel events dropped.
    pub lost_events: AtomicU64,
    /// eBPF program errors.
    pub ebpf_errors: AtomicU64,
    /// Detection passes recorded.
    pub passes: AtomicU64,
    /// Events published to watchers.
    pub events: AtomicU64,
}

/// The running engine, shared with the gRPC and metrics servers.
pub struct Engine {
    pub config: Config,
    pub store: Arc<Store>,
    pub registry: Registry,
    pub captures: Arc<Captures>,
    pub known: Arc<RwLock<BTreeMap<TargetId, Known>>>,
    pub target_stats: SharedStats,
    pub counters: Arc<Counters>,
    pub started_at: Timestamp,
    /// True once discovery has made its first scan.
    pub ready: Arc<AtomicBool>,
    /// How processes are discovered ("ebpf" or "proc-poll").
    pub discovery_mode: Arc<RwLock<&'static str>>,
    events: broadcast::Sender<Arc<Event>>,
    control: mpsc::Sender<Control>,
}

/// How the engine finds targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Discover {
    /// eBPF exec/exit tracking, falling back to polling `/proc`.
    Auto,
    /// Only what [`Engine::watch`] adds.
    Manual,
}

/// Background tasks of a running engine.
pub struct Tasks {
    pub handles: Vec<JoinHandle<()>>,
}

impl Engine {
    /// Opens the store and starts discovery, scheduler, writer and
    /// retention tasks. Must run inside a tokio runtime.
    pub fn start(
        config: Config,
        registry: Registry,
        capturers: Vec<Arc<dyn Capturer>>,
    ) -> Result<(Arc<Engine>, Tasks), EngineError> {
        Self::start_with(config, registry, capturers, Discover::Auto)
    }

    /// [`Engine::start`], choosing how targets are found: `Manual` leaves
    /// it to [`Engine::watch`] (embedding, tests).
    pub fn start_with(
        config: Config,
        registry: Registry,
        capturers: Vec<Arc<dyn Capturer>>,
        discover: Discover,
    ) -> Result<(Arc<Engine>, Tasks), EngineError> {
        let store = Arc::new(Store::open(&config.data_dir, config.store.retention())?);
        let now = pymedic_model::now();
        store.fail_interrupted_captures(now)?;
        // Findings about processes that exited while the agent was down.
        let resolved = store.resolve_where(
            |pid, start| {
                !targets::alive(TargetId {
                    pid,
                    start_ticks: start,
                })
            },
            now,
        )?;
        if !resolved.is_empty() {
            tracing::info!(
                count = resolved.len(),
                "resolved findings of processes that exited while the agent was down"
            );
        }
        let selector = Selector::from_config(&config.targets)?;
        let (out_tx, out_rx) = mpsc::channel(config.detect.queue);
        let (control_tx, control_rx) = mpsc::channel(1024);
        let budget = Budget {
            cpu_budget: config.detect.cpu_budget,
            busy_threshold: config.detect.busy_threshold,
            max_backoff: config.detect.max_backoff.0,
            workers: config.detect.workers,
        };
        let scheduler = Scheduler::new(&registry, budget, out_tx);
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let captures = Arc::new(Captures::new(
            capturers,
            store.clone(),
            config.data_dir.join("captures"),
            config.capture.clone(),
        ));
        let engine = Arc::new(Engine {
            target_stats: scheduler.stats(),
            store: store.clone(),
            registry,
            captures,
            known: Arc::default(),
            counters: Arc::default(),
            started_at: now,
            ready: Arc::default(),
            discovery_mode: Arc::new(RwLock::new("starting")),
            events,
            control: control_tx,
            config,
        });
        let mut handles = vec![tokio::spawn(scheduler.run(control_rx))];
        handles.push(tokio::spawn(writer(engine.clone(), out_rx)));
        match discover {
            Discover::Auto => handles.push(tokio::spawn(discover::run(engine.clone(), selector))),
            Discover::Manual => {
                *engine
                    .discovery_mode
                    .write()
                    .unwrap_or_else(|e| e.into_inner()) = "manual";
                engine.ready.store(true, Ordering::Release);
            }
        }
        handles.push(tokio::spawn(retention(engine.clone())));
        Ok((engine, Tasks { handles }))
    }

    /// Subscribes to committed events (see `grpc` for gap-free resumption).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    /// Watches `target` (with [`Discover::Manual`], or to add one by hand).
    pub async fn watch(&self, target: TargetInfo) {
        self.known
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                target.id,
                Known {
                    info: target.clone(),
                    selected: true,
                },
            );
        self.control(Control::Add(Box::new(target))).await;
    }

    /// Stops watching `target` and resolves its findings.
    pub async fn unwatch(&self, target: TargetId) {
        self.known
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&target);
        self.control(Control::Remove(target)).await;
    }

    /// Starts or stops watching a target.
    pub(crate) async fn control(&self, c: Control) {
        let _ = self.control.send(c).await;
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// Records scheduler output, then publishes the committed events.
async fn writer(engine: Arc<Engine>, mut rx: mpsc::Receiver<Output>) {
    while let Some(out) = rx.recv().await {
        let store = engine.store.clone();
        let result = tokio::task::spawn_blocking(move || match out {
            Output::Pass {
                detector,
                target,
                findings,
                at,
            } => store.record_pass(
                detector,
                Some((target.pid, target.start_ticks)),
                &findings,
                at,
            ),
            Output::Gone { target } => {
                store.resolve_target(target.pid, target.start_ticks, pymedic_model::now())
            }
        })
        .await;
        match result {
            Ok(Ok(events)) => {
                engine.counters.passes.fetch_add(1, Ordering::Relaxed);
                for e in events {
                    engine.counters.events.fetch_add(1, Ordering::Relaxed);
                    let _ = engine.events.send(Arc::new(e));
                }
            }
            Ok(Err(e)) => tracing::error!("store a detection result: {e}"),
            Err(e) => tracing::error!("store task failed: {e}"),
        }
    }
}

async fn retention(engine: Arc<Engine>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let store = engine.store.clone();
        match tokio::task::spawn_blocking(move || store.enforce_retention(pymedic_model::now()))
            .await
        {
            Ok(Ok(r)) if r.findings + r.events > 0 => {
                tracing::info!(
                    findings = r.findings,
                    events = r.events,
                    "retention deleted old history"
                )
            }
            Ok(Err(e)) => tracing::warn!("retention: {e}"),
            _ => {}
        }
    }
}
