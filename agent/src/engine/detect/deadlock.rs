//! `deadlock`: threads waiting for each other's locks, read from the target's
//! memory every few seconds without stopping it (the `dump` engine:
//! [`crate::dump::Dumper`] and [`crate::deadlock::analyze`]). A cycle is
//! reported only when two consecutive checks see it, so a transient state
//! never becomes a finding; the finding resolves when a check no longer
//! sees the cycle.
//!
//! Cheap when nothing can be deadlocked: a thread in a lock deadlock is
//! blocked in `futex(2)` with no timeout (`sem_wait`, `pthread_mutex_lock`,
//! CPython's parking lot), so a check first reads each thread's
//! `/proc/PID/task/TID/syscall`; when no thread waits that way (idle in
//! `sleep`, `epoll_wait`, timed `Event.wait`, or running), no deadlock is
//! possible and the interpreter is not read at all. A lock acquired with a
//! timeout is, by definition, not a permanent deadlock.

use std::sync::Arc;
use std::time::Duration;

use pymedic_model::{Finding, Kind, Layer};
use pymedic_python::InspectError;

use super::{CheckContext, DetectError, Detector, Settings, Watch};
use crate::deadlock::{self, Deadlock};
use crate::dump::{DumpError, DumpOptions, Dumper, task};
use crate::engine::targets::TargetInfo;
use crate::engine::usage;

const NAME: &str = "deadlock";

pub struct DeadlockDetector {
    interval: Duration,
}

/// `[detectors.deadlock]`: `interval` (default 2s).
pub fn new(settings: &Settings) -> Result<Arc<dyn Detector>, DetectError> {
    settings.only(&[])?;
    Ok(Arc::new(DeadlockDetector {
        interval: settings.duration("interval", Duration::from_secs(2))?,
    }))
}

impl Detector for DeadlockDetector {
    fn name(&self) -> &'static str {
        NAME
    }

    fn layer(&self) -> Layer {
        Layer::Temporal
    }

    fn kinds(&self) -> Vec<Kind> {
        vec![Kind::DEADLOCK]
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    fn watch(&self, target: &TargetInfo) -> Result<Option<Box<dyn Watch>>, DetectError> {
        match Dumper::new(target.id.pid) {
            Ok(dumper) => Ok(Some(Box::new(DeadlockWatch {
                dumper,
                previous: Vec::new(),
            }))),
            Err(
                DumpError::Exited { pid } | DumpError::Inspect(InspectError::NoSuchProcess { pid }),
            ) => Err(DetectError::Gone { pid }),
            // An interpreter this build cannot read: not applicable.
            Err(DumpError::Inspect(
                e @ (InspectError::UnsupportedVersion { .. } | InspectError::NotPython { .. }),
            )) => {
                tracing::info!(pid = target.id.pid, "deadlock detector does not apply: {e}");
                Ok(None)
            }
            Err(e) => Err(check_error("prepare to read the interpreter", e)),
        }
    }
}

fn check_error(op: &'static str, e: DumpError) -> DetectError {
    match e {
        DumpError::Exited { pid } | DumpError::Inspect(InspectError::NoSuchProcess { pid }) => {
            DetectError::Gone { pid }
        }
        e => DetectError::Check {
            detector: NAME,
            op,
            message: e.to_string(),
        },
    }
}

struct DeadlockWatch {
    dumper: Dumper,
    previous: Vec<Deadlock>,
}

/// True when some thread of `pid` is blocked in `futex(2)` without a
/// timeout (the only way a thread sits in a lock deadlock).
fn has_indefinite_futex_waiter(pid: u32) -> Result<bool, DetectError> {
    let dir = match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DetectError::Gone { pid });
        }
        Err(e) => {
            return Err(DetectError::Check {
                detector: NAME,
                op: "list the threads",
                message: e.to_string(),
            });
        }
    };
    for entry in dir.flatten() {
        let path = entry.path().join("syscall");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue; // exited meanwhile
        };
        if task::parse_syscall(&text)
            .and_then(|s| s.futex_wait())
            .is_some_and(|(_, timed)| !timed)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

impl Watch for DeadlockWatch {
    fn check(&mut self, cx: &CheckContext<'_>) -> Result<Vec<Finding>, DetectError> {
        if !has_indefinite_futex_waiter(cx.target.id.pid)? {
            self.previous.clear();
            return Ok(Vec::new());
        }
        let snap = self
            .dumper
            .snapshot(&DumpOptions::default())
            .map_err(|e| check_error("read the threads' stacks", e))?;
        usage::record_samples(1);
        let current = deadlock::analyze(&snap).deadlocks;
        let confirmed = deadlock::confirm(&self.previous, current.clone());
        self.previous = current;
        let target = cx.target.model();
        Ok(confirmed
            .iter()
            .map(|d| deadlock::to_finding(d, &target))
            .collect())
    }
}
