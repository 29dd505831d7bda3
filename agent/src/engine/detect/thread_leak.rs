//! `thread_leak`: threads created faster than they end, by creation site.
//!
//! The shared `resource` eBPF object sees `task:task_newtask` with
//! `CLONE_THREAD` in the creating thread (so its Python stack is the line
//! that called `threading.Thread.start()`, `ThreadPoolExecutor.submit()`,
//! ...) and every thread exit; per process it keeps live threads by
//! creation site. A site whose live count grows steadily over the window
//! is a leak (threads started and never finished or joined), and stays one
//! while those threads live. Evidence: live and total threads, creation
//! and exit counts, the rate, and what the newest leaked threads are doing
//! now (their Python names and stacks, read from the interpreter: parked
//! on a queue that is never fed, an event never set, a socket never
//! answered).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pymedic_common::resource::{FEAT_THREAD, SITE_THREAD};
use pymedic_model::{Finding, Kind, Layer, Severity};
use pymedic_python::Interpreter;
use pymedic_python::memory::LiveMemory;
use serde_json::json;

use super::fd_leak::{Membership, err, join_session, round};
use super::{CheckContext, DetectError, Detector, Settings, Watch};
use crate::engine::targets::TargetInfo;
use crate::pystack::CodeSource as _;
use crate::resource::sites::{self, SiteTracker};
use crate::resource::trend;

const NAME: &str = "thread_leak";

type Params = sites::Growth;

pub struct ThreadLeak {
    params: Params,
}

/// `[detectors.thread_leak]`: `interval` (2s), `window` (60s),
/// `min_growth` (8 threads), `min_z` (3.0), `max_findings` (3).
pub fn new(s: &Settings) -> Result<Arc<dyn Detector>, DetectError> {
    Ok(Arc::new(ThreadLeak {
        params: super::fd_leak::growth_settings(s, 8, 3)?,
    }))
}

impl Detector for ThreadLeak {
    fn name(&self) -> &'static str {
        NAME
    }

    fn layer(&self) -> Layer {
        Layer::Resource
    }

    fn kinds(&self) -> Vec<Kind> {
        vec![Kind::THREAD_LEAK]
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
        let Some(session) = join_session(NAME, target, FEAT_THREAD)? else {
            return Ok(None);
        };
        let interp = Interpreter::for_process(LiveMemory::new(target.id.pid), &target.process).ok();
        Ok(Some(Box::new(ThreadWatch {
            pid: target.id.pid,
            params: self.params,
            session,
            interp,
            tracker: SiteTracker::new(),
            epoch: Instant::now(),
        })))
    }
}

struct ThreadWatch {
    pid: u32,
    params: Params,
    session: Membership,
    interp: Option<Interpreter<LiveMemory>>,
    tracker: SiteTracker,
    epoch: Instant,
}

impl Watch for ThreadWatch {
    fn check(&mut self, cx: &CheckContext<'_>) -> Result<Vec<Finding>, DetectError> {
        let t = self.epoch.elapsed().as_secs_f64();
        let leaks = self
            .tracker
            .check(
                &self.session,
                self.pid,
                SITE_THREAD,
                "started inside",
                t,
                &self.params,
            )
            .map_err(|e| err(NAME, "read the eBPF maps", e))?;
        if leaks.is_empty() {
            return Ok(Vec::new());
        }
        let tids = crate::procinfo::thread_ids(self.pid).unwrap_or_default();
        let (names, stacks): (HashMap<u32, String>, HashMap<u32, Vec<_>>) = match &self.interp {
            Some(i) => (i.python_thread_names(&tids), i.thread_stacks(&tids)),
            None => (HashMap::new(), HashMap::new()),
        };
        let mut out = Vec::new();
        for leak in leaks {
            let site = &leak.site;
            let rate = leak.trend.slope.max(0.0);
            let alive: Vec<u32> = site
                .recent
                .iter()
                .copied()
                .filter(|tid| tids.contains(tid))
                .take(4)
                .collect();
            let severity = if site.live >= 200 || rate >= 5.0 {
                Severity::High
            } else {
                Severity::Medium
            };
            // Where the leaked threads are now: the common innermost
            // application line of the newest ones.
            let parked = alive
                .iter()
                .filter_map(|tid| stacks.get(tid))
                .map(|f| sites::locations(f))
                .filter_map(|s| sites::site(&s, "").map(|(l, _)| l))
                .next();
            let mut title = format!(
                "{} threads started at {} are still running, +{:.1}/s",
                site.live,
                sites::short(&site.location),
                rate
            );
            if let Some(p) = &parked {
                title.push_str(&format!("; they wait at {}", sites::short(p)));
            }
            let mut f = Finding::new(
                Layer::Resource,
                Kind::THREAD_LEAK,
                severity,
                trend::confidence(&leak.trend),
                title,
                Some(cx.target.model()),
                site.location.clone(),
            );
            if let Some(inner) = &site.inner {
                f.related.push(inner.clone());
            }
            if let Some(p) = &parked {
                f.related.push(pymedic_model::Related::new(
                    p,
                    "the leaked threads are blocked here",
                ));
            }
            f.stacks
                .push(sites::stack("creating thread", 0, site.stack.clone()));
            for tid in &alive {
                if let Some(frames) = stacks.get(tid) {
                    let name = names
                        .get(tid)
                        .cloned()
                        .unwrap_or_else(|| format!("tid {tid}"));
                    f.stacks
                        .push(sites::stack(name, *tid, sites::locations(frames)));
                }
            }
            f.evidence = json!({
                "live": site.live,
                "started": site.opened,
                "exited": site.closed,
                "growth_per_second": round(rate, 2),
                "window_seconds": round(leak.trend.span, 1),
                "trend_z": round(leak.trend.z, 2),
                "live_over_time": leak.points.iter().rev().take(20).rev()
                    .map(|(t, v)| json!([round(*t, 1), *v as u64])).collect::<Vec<_>>(),
                "process_threads": tids.len(),
                "newest": alive.iter().map(|tid| json!({
                    "tid": tid,
                    "name": names.get(tid),
                })).collect::<Vec<_>>(),
            });
            out.push(f);
        }
        Ok(out)
    }
}
