//! The set of detectors an agent or a `diagnose` run uses, with their
//! effective intervals and counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{BUILTIN, DetectError, Detector, Settings};
use crate::engine::config::Config;

/// Counters per detector (for `GetAgentStatus` and metrics).
#[derive(Debug, Default)]
pub struct DetectorStats {
    pub checks: AtomicU64,
    pub errors: AtomicU64,
    /// CPU time spent in checks, nanoseconds.
    pub cpu_ns: AtomicU64,
    last_error: Mutex<String>,
}

impl DetectorStats {
    pub fn record_error(&self, e: &DetectError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e.to_string();
    }

    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// One registered detector.
#[derive(Clone)]
pub struct Entry {
    pub detector: Arc<dyn Detector>,
    pub interval: Duration,
    pub stats: Arc<DetectorStats>,
}

/// The detectors in use.
#[derive(Clone, Default)]
pub struct Registry {
    entries: Vec<Entry>,
}

impl Registry {
    /// Names of the built-in detectors (the valid `[detectors.NAME]`).
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(n, _)| *n).collect()
    }

    /// Every enabled built-in detector, configured from `config`.
    pub fn builtin(config: &Config) -> Result<Registry, DetectError> {
        for name in config.detectors.keys() {
            if !BUILTIN.iter().any(|(n, _)| n == name) {
                return Err(DetectError::Setting {
                    detector: "detectors",
                    key: name.clone(),
                    message: format!(
                        "no such detector; the detectors are: {}",
                        Self::builtin_names().join(", ")
                    ),
                });
            }
        }
        let mut r = Registry::default();
        for (name, make) in BUILTIN {
            if !config.detector_enabled(name) {
                continue;
            }
            let detector = make(&Settings::new(name, config.detector(name)))?;
            r.register(detector, config.detector_interval(name));
        }
        Ok(r)
    }

    /// Adds a detector (built-in or not); `interval` overrides its default.
    pub fn register(&mut self, detector: Arc<dyn Detector>, interval: Option<Duration>) {
        let interval = interval.unwrap_or_else(|| detector.interval());
        self.entries.push(Entry {
            detector,
            interval,
            stats: Arc::default(),
        });
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
