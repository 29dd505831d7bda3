//! Detectors: what the agent (and `pymedic diagnose`) looks for.
//!
//! A [`Detector`] is a factory registered once; for each target it starts a
//! [`Watch`] that holds that target's state. The scheduler calls
//! [`Watch::check`] every interval (stretched by the per-target CPU budget
//! and by back-off), and the check returns *every finding that holds now*.
//! The engine turns those answers into lifecycles: a finding seen for the
//! first time opens, one seen again updates `last_seen`/`count`, one no
//! longer returned resolves. Detectors never track lifecycles themselves.
//!
//! Adding a detector: one file in this directory with a type implementing
//! [`Detector`] and a `pub fn new(settings: &Settings) -> Result<Arc<dyn
//! Detector>, DetectError>`, then one line in [`BUILTIN`]. Its settings are
//! `[detectors.NAME]` in the config (`enabled` and `interval` are handled
//! here; everything else is the detector's, read through [`Settings`]).

pub mod blocked_event_loop;
pub mod cpu_hotspot;
pub mod deadlock;
pub mod explain;
pub mod fd_leak;
pub mod gc_pause;
pub mod gil_contention;
pub mod hang;
pub mod lock_contention;
pub mod lock_graph;
pub mod lock_order_inversion;
pub mod memory_leak;
pub mod native_memory_leak;
pub mod registry;
pub mod scheduler;
pub mod sites;
pub mod thread_leak;

use std::sync::Arc;
use std::time::Duration;

use pymedic_model::{Finding, Kind, Layer, Timestamp};

pub use registry::Registry;

use super::targets::TargetInfo;

/// Why a detector could not look at a target.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// The target exited; not an error worth reporting.
    #[error("process {pid} exited")]
    Gone { pid: u32 },
    /// A setting in `[detectors.NAME]` is wrong.
    #[error("config key `detectors.{detector}.{key}`: {message}")]
    Setting {
        detector: &'static str,
        key: String,
        message: String,
    },
    /// The check failed; `op` names what it was doing.
    #[error("{detector}: {op}: {message}")]
    Check {
        detector: &'static str,
        op: &'static str,
        message: String,
    },
}

/// A finding producer. Implementations are cheap to share; per-target state
/// lives in the [`Watch`] each call to [`Detector::watch`] returns.
pub trait Detector: Send + Sync + 'static {
    /// snake_case; the `[detectors.NAME]` config section and metrics label.
    fn name(&self) -> &'static str;
    /// The layer its findings belong to.
    fn layer(&self) -> Layer;
    /// Kinds of finding it reports.
    fn kinds(&self) -> Vec<Kind>;
    /// How often a target is checked by default (the config may override).
    fn interval(&self) -> Duration;
    /// Starts watching one target. `Ok(None)` when it does not apply (an
    /// interpreter it cannot read, a feature the kernel lacks, ...). May
    /// block (attach probes, read ELF files): it runs on a worker thread.
    fn watch(&self, target: &TargetInfo) -> Result<Option<Box<dyn Watch>>, DetectError>;
    /// Whether checks are spaced out while the target is busy (true for
    /// detectors that read the target's memory; false for those that only
    /// read kernel aggregates, which cost the target nothing).
    fn backs_off_when_busy(&self) -> bool {
        true
    }
}

/// One detector's view of one target. Dropped when the target exits or the
/// agent stops (detach in `Drop`).
pub trait Watch: Send + 'static {
    /// Looks at the target now and returns every finding that currently
    /// holds (empty when all is well). Runs on a worker thread, bounded by
    /// the target's CPU budget: keep it cheap, never stop the target.
    fn check(&mut self, cx: &CheckContext<'_>) -> Result<Vec<Finding>, DetectError>;
}

/// What a check gets to know besides its own state.
pub struct CheckContext<'a> {
    pub target: &'a TargetInfo,
    /// The time this check started (use it for finding timestamps).
    pub now: Timestamp,
    /// Time since this watch's previous check (zero on the first).
    pub since_last: Duration,
}

/// `[detectors.NAME]` for one detector, with typed getters that name the
/// key on error.
pub struct Settings {
    pub detector: &'static str,
    table: toml::Table,
}

impl Settings {
    pub fn new(detector: &'static str, table: toml::Table) -> Settings {
        Settings { detector, table }
    }

    fn bad(&self, key: &str, message: impl Into<String>) -> DetectError {
        DetectError::Setting {
            detector: self.detector,
            key: key.to_owned(),
            message: message.into(),
        }
    }

    /// A duration such as "2s"; `default` when absent.
    pub fn duration(&self, key: &str, default: Duration) -> Result<Duration, DetectError> {
        match self.table.get(key) {
            None => Ok(default),
            Some(v) => {
                let s = v
                    .as_str()
                    .ok_or_else(|| self.bad(key, "must be a duration string such as \"2s\""))?;
                super::config::parse_duration(s).map_err(|m| self.bad(key, m))
            }
        }
    }

    /// A number; `default` when absent.
    pub fn float(&self, key: &str, default: f64) -> Result<f64, DetectError> {
        match self.table.get(key) {
            None => Ok(default),
            Some(toml::Value::Float(f)) => Ok(*f),
            Some(toml::Value::Integer(i)) => Ok(*i as f64),
            Some(_) => Err(self.bad(key, "must be a number")),
        }
    }

    /// A non-negative integer; `default` when absent.
    pub fn uint(&self, key: &str, default: u64) -> Result<u64, DetectError> {
        match self.table.get(key) {
            None => Ok(default),
            Some(toml::Value::Integer(i)) if *i >= 0 => Ok(*i as u64),
            Some(_) => Err(self.bad(key, "must be a non-negative integer")),
        }
    }

    /// Rejects keys the detector does not know (besides enabled/interval).
    pub fn only(&self, known: &[&str]) -> Result<(), DetectError> {
        for k in self.table.keys() {
            if k != "enabled" && k != "interval" && !known.contains(&k.as_str()) {
                return Err(self.bad(
                    k,
                    format!(
                        "unknown setting; {} accepts enabled, interval{}",
                        self.detector,
                        known.iter().map(|k| format!(", {k}")).collect::<String>()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Builds one built-in detector from its settings.
pub type Constructor = fn(&Settings) -> Result<Arc<dyn Detector>, DetectError>;

/// Subscribes `detector` to the shared waits eBPF sensor for `target`;
/// `Ok(None)` (with a warning: the detector is off) without eBPF privileges.
pub(crate) fn subscribe_waits(
    detector: &'static str,
    target: &TargetInfo,
) -> Result<Option<crate::waits::Subscription>, DetectError> {
    match crate::waits::subscribe(&target.process) {
        Ok(sub) => Ok(Some(sub)),
        Err(e) if e.is_permission() => {
            tracing::warn!("{detector} needs eBPF (CAP_BPF, CAP_PERFMON): {e}; detector off");
            Ok(None)
        }
        Err(e) => Err(DetectError::Check {
            detector,
            op: "start the waits sensor",
            message: e.to_string(),
        }),
    }
}

/// The built-in detectors: `(name, constructor)`, one line each.
pub const BUILTIN: &[(&str, Constructor)] = &[
    ("deadlock", deadlock::new),
    ("cpu_hotspot", cpu_hotspot::new),
    ("memory_leak", memory_leak::new),
    ("native_memory_leak", native_memory_leak::new),
    ("fd_leak", fd_leak::new),
    ("thread_leak", thread_leak::new),
    ("gc_pause", gc_pause::new),
    ("lock_order_inversion", lock_order_inversion::new),
    ("lock_contention", lock_contention::new),
    ("gil_contention", gil_contention::new),
    ("blocked_event_loop", blocked_event_loop::new),
    ("hang", hang::new),
];
