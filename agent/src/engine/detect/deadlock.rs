//! `deadlock`: threads waiting for each other's locks, read from the target's
//! memory without stopping it (the `dump` engine: [`crate::dump::Dumper`]
//! and [`crate::deadlock::analyze`]).
//!
//! Event-driven: the shared waits sensor ([`crate::waits`]) sees every
//! thread that blocks in `futex(2)` as it happens. A check (every 250 ms)
//! reads that in-kernel list; only when some thread has stayed in a
//! wait without timeout for `trigger` (default 1 s) are the threads read
//! and analysed, and a cycle is confirmed by a second snapshot 150 ms later
//! (a transient state never becomes a finding). So a deadlock is reported
//! about `trigger` + 0.4 s after it forms; `evidence.blocked_for_ms` says
//! how long its threads had been blocked when it was confirmed. While the
//! same threads stay blocked on the same addresses (in the sensor's view, or
//! in `/proc/PID/task/TID/syscall` for waits that began before the sensor
//! saw the process) the verdict stands without re-reading; the finding
//! resolves when they move.
//!
//! Without eBPF (or for threads already blocked before the process was
//! registered) the check falls back to `/proc`: a thread in a lock deadlock is
//! blocked in `futex(2)` with no timeout (`sem_wait`, `pthread_mutex_lock`,
//! CPython's parking lot), so a check first reads each thread's
//! `/proc/PID/task/TID/syscall`; when no thread waits that way (idle in
//! `sleep`, `epoll_wait`, timed `Event.wait`, or running), no deadlock is
//! possible and the interpreter is not read at all. A lock acquired with a
//! timeout is, by definition, not a permanent deadlock.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pymedic_model::{Finding, Kind, Layer};
use pymedic_python::InspectError;

use super::{CheckContext, DetectError, Detector, Settings, Watch};
use crate::deadlock::{self, Deadlock};
use crate::dump::{DumpError, DumpOptions, Dumper, task};
use crate::engine::targets::TargetInfo;
use crate::engine::usage;
use crate::waits::{self, Subscription};

const NAME: &str = "deadlock";

/// How often the `/proc` fallback scan runs besides the event trigger.
const PROC_RESCAN: Duration = Duration::from_secs(5);

pub struct DeadlockDetector {
    interval: Duration,
    trigger: Duration,
}

/// `[detectors.deadlock]`: `interval` (default 250ms), `trigger` (1s: how
/// long a thread stays in an untimed wait before the threads are analysed).
pub fn new(settings: &Settings) -> Result<Arc<dyn Detector>, DetectError> {
    settings.only(&["trigger"])?;
    Ok(Arc::new(DeadlockDetector {
        interval: settings.duration("interval", Duration::from_millis(250))?,
        trigger: settings.duration("trigger", Duration::from_secs(1))?,
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
        match Dumper::for_process(target.process.clone()) {
            Ok(dumper) => {
                let sensor = match waits::subscribe(dumper.process()) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::info!(
                            pid = target.id.pid,
                            "deadlock: no waits sensor ({e}); polling /proc instead"
                        );
                        None
                    }
                };
                Ok(Some(Box::new(DeadlockWatch {
                    dumper,
                    sensor,
                    trigger: self.trigger,
                    last_scan: None,
                    verdict: None,
                    quiet: HashSet::new(),
                })))
            }
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

/// A standing verdict: its findings and the (tid, futex) waits it rests on.
type Verdict = (Vec<Finding>, Vec<(u32, u64)>);

struct DeadlockWatch {
    dumper: Dumper,
    sensor: Option<Subscription>,
    trigger: Duration,
    last_scan: Option<Instant>,
    /// The standing verdict and the (tid, futex) waits it rests on.
    verdict: Option<Verdict>,
    /// Waits an analysis already found no deadlock among: sensor waits by
    /// (tid, start), `/proc` waits by (tid, futex). A new wait re-triggers.
    quiet: HashSet<(u32, u64)>,
}
/// Threads of `pid` blocked in `futex(2)` without a timeout (the only way a
/// thread sits in a lock deadlock), with the futex address.
fn indefinite_futex_waiters(pid: u32) -> Result<Vec<(u32, u64)>, DetectError> {
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
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A thread that exited meanwhile has no wait.
        if let Some(addr) = untimed_futex_wait(pid, tid) {
            out.push((tid, addr));
        }
    }
    Ok(out)
}

/// The futex thread `tid` of `pid` waits on without a timeout, if it does.
fn untimed_futex_wait(pid: u32, tid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    match task::parse_syscall(&text)?.futex_wait()? {
        (addr, false) => Some(addr),
        (_, true) => None,
    }
}

impl DeadlockWatch {
    /// Two snapshots 150 ms apart; the deadlocks both see.
    fn analyze(&mut self) -> Result<Vec<Deadlock>, DetectError> {
        let first = self
            .dumper
            .snapshot(&DumpOptions::default())
            .map_err(|e| check_error("read the threads' stacks", e))?;
        usage::record_samples(1);
        let a = deadlock::analyze(&first).deadlocks;
        if a.is_empty() {
            return Ok(Vec::new());
        }
        std::thread::sleep(Duration::from_millis(150));
        let second = self
            .dumper
            .snapshot(&DumpOptions::default())
            .map_err(|e| check_error("read the threads' stacks", e))?;
        usage::record_samples(1);
        Ok(deadlock::confirm(&a, deadlock::analyze(&second).deadlocks))
    }
}

impl Watch for DeadlockWatch {
    fn check(&mut self, cx: &CheckContext<'_>) -> Result<Vec<Finding>, DetectError> {
        let pid = cx.target.id.pid;
        let view = match &self.sensor {
            Some(s) => Some(s.view().map_err(|e| DetectError::Check {
                detector: NAME,
                op: "read the waits sensor",
                message: e.to_string(),
            })?),
            None => None,
        };
        // Lock acquisitions (not condition, queue, event or join waits)
        // blocked without a timeout for at least `trigger`.
        let long: Vec<(u32, u64, Duration, u64)> = view
            .as_ref()
            .map(|v| {
                v.blocked
                    .iter()
                    .filter(|b| !b.timed && b.age >= self.trigger)
                    .filter(|b| super::sites::is_lock_wait(&b.stack))
                    .map(|b| (b.tid, b.uaddr, b.age, b.start_ns))
                    .collect()
            })
            .unwrap_or_default();
        // A standing verdict holds while its threads still wait where they did.
        if let Some((findings, waits)) = &self.verdict {
            // Still blocked on the same futex is enough (its stack may not
            // have been read yet: the verdict was made from dump snapshots).
            // A thread that blocked before the sensor saw the process is
            // not in its view: its wait is read from `/proc`.
            let still = |w: &(u32, u64)| {
                view.as_ref()
                    .is_some_and(|v| v.blocked.iter().any(|b| !b.timed && (b.tid, b.uaddr) == *w))
                    || untimed_futex_wait(pid, w.0) == Some(w.1)
            };
            if waits.iter().all(still) {
                return Ok(findings.clone());
            }
            self.verdict = None;
        }
        let mut pending: Vec<(u32, u64)> = long
            .iter()
            .map(|l| (l.0, l.3))
            .filter(|k| !self.quiet.contains(k))
            .collect();
        // Threads blocked since before the sensor saw the process (or no
        // sensor at all): from /proc, by (tid, futex).
        let mut from_proc = Vec::new();
        if self.last_scan.is_none_or(|t| t.elapsed() >= PROC_RESCAN) || view.is_none() {
            self.last_scan = Some(Instant::now());
            let in_sensor: Vec<u32> = view
                .as_ref()
                .map(|v| v.blocked.iter().map(|b| b.tid).collect())
                .unwrap_or_default();
            from_proc = indefinite_futex_waiters(pid)?
                .into_iter()
                .filter(|(tid, _)| !in_sensor.contains(tid))
                .filter(|k| !self.quiet.contains(k))
                .collect();
            pending.extend(from_proc.iter().copied());
        }
        tracing::debug!(
            pid,
            pending = pending.len(),
            long = long.len(),
            "deadlock check"
        );
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        let confirmed = self.analyze()?;
        tracing::debug!(pid, confirmed = confirmed.len(), "deadlock analysis");
        let target = cx.target.model();
        let mut findings = Vec::new();
        let mut rests_on = Vec::new();
        for d in &confirmed {
            let mut f = deadlock::to_finding(d, &target);
            let ages: Vec<Duration> = d
                .threads
                .iter()
                .filter_map(|t| long.iter().find(|l| l.0 == t.tid).map(|l| l.2))
                .collect();
            if let (Some(obj), Some(age)) = (f.evidence.as_object_mut(), ages.iter().min()) {
                obj.insert("blocked_for_ms".into(), (age.as_millis() as u64).into());
                obj.insert(
                    "trigger_ms".into(),
                    (self.trigger.as_millis() as u64).into(),
                );
            }
            for t in &d.threads {
                if let Some(l) = long.iter().find(|l| l.0 == t.tid) {
                    rests_on.push((l.0, l.1));
                } else if let Some(w) = from_proc.iter().find(|w| w.0 == t.tid) {
                    rests_on.push(*w);
                }
            }
            findings.push(f);
        }
        if findings.is_empty() {
            self.quiet.extend(pending);
            // Forget waits that ended (bounded by the threads blocked now).
            if self.quiet.len() > 4096 {
                self.quiet.clear();
            }
        } else if !rests_on.is_empty() {
            self.verdict = Some((findings.clone(), rests_on));
        }
        Ok(findings)
    }
}
