//! `fd_leak`: descriptors opened at one line and never closed.
//!
//! The shared `resource` eBPF object sees every call that makes a
//! descriptor (open/openat/openat2, socket, accept/accept4, dup/dup2/dup3,
//! `fcntl(F_DUPFD*)`, pipe/pipe2, socketpair, eventfd, epoll_create,
//! timerfd, signalfd, memfd, inotify, pidfd, ...) with the Python stack of
//! the calling thread, and every `close`/`close_range`; per process it keeps
//! live descriptors by open site. Only the target's own system calls
//! count, so descriptors a forked child inherits and closes, or an exec'd
//! child, change nothing.
//!
//! Each check reads the live count of every site (stacks grouped by their
//! application line); a site whose count grows steadily over the window
//! (trend test, see `resource::trend`) is a leak and stays one while its
//! descriptors stay open. Evidence: what the newest descriptors point to
//! (paths, socket endpoints from the process's `/proc/PID/net`), the
//! growth rate, the process's open descriptors and `RLIMIT_NOFILE`, and
//! when `EMFILE` comes at this rate. When the source is readable through
//! `/proc/PID/root`, the structural layer names the exit path that skips
//! the close (`related` entries with role `static: ...`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pymedic_analyze::enrich::Enricher;
use pymedic_common::resource::{FEAT_FD, SITE_FD};
use pymedic_model::{Finding, Kind, Layer, Location, Related, Severity};
use serde_json::json;

use super::{CheckContext, DetectError, Detector, Settings, Watch};
use crate::engine::targets::TargetInfo;
use crate::resource::fdinfo;
use crate::resource::session::{self, Session, SessionConfig};
use crate::resource::sites::{self, SiteTracker};
use crate::resource::trend;

const NAME: &str = "fd_leak";

type Params = sites::Growth;

pub struct FdLeak {
    params: Params,
    enricher: Arc<Enricher>,
}

/// `[detectors.fd_leak]`: `interval` (2s), `window` (60s), `min_growth`
/// (20 descriptors), `min_z` (3.0), `max_findings` (5).
pub fn new(s: &Settings) -> Result<Arc<dyn Detector>, DetectError> {
    Ok(Arc::new(FdLeak {
        params: growth_settings(s, 20, 5)?,
        enricher: Arc::new(Enricher::new()),
    }))
}

/// `[detectors.fd_leak]` / `[detectors.thread_leak]` settings: `window`
/// (60s), `min_growth`, `min_z` (3.0), `max_findings`; other keys rejected.
pub(super) fn growth_settings(
    s: &Settings,
    min_growth: u64,
    max_findings: u64,
) -> Result<sites::Growth, DetectError> {
    s.only(&["window", "min_growth", "min_z", "max_findings"])?;
    Ok(sites::Growth {
        window: s.duration("window", Duration::from_secs(60))?,
        min_growth: s.uint("min_growth", min_growth)?.max(2),
        min_z: s.float("min_z", 3.0)?,
        max_findings: s.uint("max_findings", max_findings)? as usize,
    })
}

/// A detector's share of the resource session: `features` of `pid` are
/// tracked while it lives, and given up when it is dropped. Derefs to the
/// session.
pub(super) struct Membership {
    session: Arc<Mutex<Session>>,
    pid: u32,
    features: u32,
}

impl std::ops::Deref for Membership {
    type Target = Arc<Mutex<Session>>;
    fn deref(&self) -> &Arc<Mutex<Session>> {
        &self.session
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(self.pid, self.features);
    }
}

/// Starts (or joins) the shared session for `features` of `target`;
/// `Ok(None)` without eBPF privileges.
pub(super) fn join_session(
    detector: &'static str,
    target: &TargetInfo,
    features: u32,
) -> Result<Option<Membership>, DetectError> {
    let s = match session::shared(SessionConfig::default()) {
        Ok(s) => s,
        Err(e) if e.is_permission() => {
            tracing::warn!("{detector} needs eBPF (CAP_BPF, CAP_PERFMON): {e}; detector off");
            return Ok(None);
        }
        Err(e) => return Err(err(detector, "start the resource eBPF object", e)),
    };
    s.lock()
        .unwrap_or_else(|e| e.into_inner())
        .add(target, features)
        .map_err(|e| err(detector, "track the process", e))?;
    Ok(Some(Membership {
        session: s,
        pid: target.id.pid,
        features,
    }))
}

pub(super) fn err(
    detector: &'static str,
    op: &'static str,
    e: impl std::fmt::Display,
) -> DetectError {
    DetectError::Check {
        detector,
        op,
        message: e.to_string(),
    }
}

impl Detector for FdLeak {
    fn name(&self) -> &'static str {
        NAME
    }

    fn layer(&self) -> Layer {
        Layer::Resource
    }

    fn kinds(&self) -> Vec<Kind> {
        vec![Kind::FD_LEAK]
    }

    fn interval(&self) -> Duration {
        Duration::from_secs(2)
    }

    /// Only reads the eBPF object's counters: costs the target nothing, so a busy target
    /// does not slow its checks down.
    fn backs_off_when_busy(&self) -> bool {
        false
    }

    fn watch(&self, target: &TargetInfo) -> Result<Option<Box<dyn Watch>>, DetectError> {
        let Some(session) = join_session(NAME, target, FEAT_FD)? else {
            return Ok(None);
        };
        Ok(Some(Box::new(FdWatch {
            pid: target.id.pid,
            params: self.params,
            session,
            enricher: self.enricher.clone(),
            tracker: SiteTracker::new(),
            epoch: Instant::now(),
            statics: HashMap::new(),
        })))
    }
}

struct FdWatch {
    pid: u32,
    params: Params,
    session: Membership,
    enricher: Arc<Enricher>,
    tracker: SiteTracker,
    epoch: Instant,
    /// Static explanations by site, computed once.
    statics: HashMap<Location, Vec<Related>>,
}

impl Watch for FdWatch {
    fn check(&mut self, cx: &CheckContext<'_>) -> Result<Vec<Finding>, DetectError> {
        let t = self.epoch.elapsed().as_secs_f64();
        let leaks = self
            .tracker
            .check(
                &self.session,
                self.pid,
                SITE_FD,
                "opened inside",
                t,
                &self.params,
            )
            .map_err(|e| err(NAME, "read the eBPF maps", e))?;
        if leaks.is_empty() {
            return Ok(Vec::new());
        }
        let open_now = fdinfo::count(self.pid);
        let limit = fdinfo::nofile_limit(self.pid);
        let needs_sockets =
            leaks.iter().any(|l| {
                l.site.recent.iter().take(4).any(|fd| {
                    fdinfo::target(self.pid, *fd).is_some_and(|t| t.starts_with("socket:"))
                })
            });
        let sockets = if needs_sockets {
            fdinfo::sockets(self.pid)
        } else {
            HashMap::new()
        };
        // Every leaking site drains the same descriptor table.
        let total_rate: f64 = leaks.iter().map(|l| l.trend.slope.max(0.0)).sum();
        let mut out = Vec::new();
        for leak in leaks {
            let site = &leak.site;
            let mut targets = Vec::new();
            for &fd in site.recent.iter().take(4) {
                if let Some(link) = fdinfo::target(self.pid, fd) {
                    targets.push(json!({"fd": fd, "target": fdinfo::describe(&link, &sockets)}));
                }
            }
            let rate = leak.trend.slope.max(0.0);
            let eta = match (open_now, limit) {
                (Some(open), Some(limit)) if total_rate > 0.0 && limit > open => {
                    Some((limit - open) as f64 / total_rate)
                }
                (Some(open), Some(limit)) if limit <= open => Some(0.0),
                _ => None,
            };
            let severity = match eta {
                Some(s) if s < 600.0 => Severity::High,
                Some(s) if s < 86_400.0 => Severity::Medium,
                _ => Severity::Low,
            };
            let what = targets
                .first()
                .and_then(|t| t["target"].as_str())
                .map(|t| format!(" ({t}, ...)"))
                .unwrap_or_default();
            let mut title = format!(
                "{} descriptors opened at {} are still open, +{:.1}/s{}",
                site.live,
                sites::short(&site.location),
                rate,
                what
            );
            if let Some(eta) = eta {
                title.push_str(&format!("; EMFILE in ~{}", human(eta)));
            }
            let mut f = Finding::new(
                Layer::Resource,
                Kind::FD_LEAK,
                severity,
                trend::confidence(&leak.trend),
                title,
                Some(cx.target.model()),
                site.location.clone(),
            );
            if let Some(inner) = &site.inner {
                f.related.push(inner.clone());
            }
            f.stacks
                .push(sites::stack("open site", 0, site.stack.clone()));
            f.evidence = json!({
                "live": site.live,
                "opened": site.opened,
                "closed": site.closed,
                "growth_per_second": round(rate, 2),
                "window_seconds": round(leak.trend.span, 1),
                "trend_z": round(leak.trend.z, 2),
                "live_over_time": leak.points.iter().rev().take(20).rev()
                    .map(|(t, v)| json!([round(*t, 1), *v as u64])).collect::<Vec<_>>(),
                "recent": targets,
                "process_open_fds": open_now,
                "rlimit_nofile": limit,
                "seconds_to_emfile": eta.map(|e| round(e, 0)),
            });
            let statics = match self.statics.get(&site.location) {
                Some(s) => s.clone(),
                None => {
                    let root = PathBuf::from(format!("/proc/{}/root", self.pid));
                    // Only what the analysis says about the leaking function
                    // (a file-level match would drag in its neighbours).
                    let s: Vec<Related> = self
                        .enricher
                        .explain(&f, &root)
                        .unwrap_or_else(|e| {
                            tracing::debug!(pid = self.pid, "static analysis: {e}");
                            Vec::new()
                        })
                        .into_iter()
                        .filter(|r| sites::same_function(&r.function, &site.location.function))
                        .collect();
                    self.statics.insert(site.location.clone(), s.clone());
                    s
                }
            };
            f.related.extend(statics);
            out.push(f);
        }
        Ok(out)
    }
}

pub(super) fn round(v: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (v * p).round() / p
}

/// "3m", "2h", "45s".
pub(super) fn human(secs: f64) -> String {
    crate::procinfo::human_duration(secs.max(0.0))
}
