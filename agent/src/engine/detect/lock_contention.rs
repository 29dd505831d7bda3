//! `lock_contention`: locks threads spend a large share of their time
//! waiting for, per lock and per acquisition site, with the holders that
//! kept waiters waiting longest.
//!
//! Source: the shared waits sensor ([`crate::waits`]): every blocked
//! acquisition is a `futex` wait on the lock's semaphore, captured in the
//! kernel with the Python stack it blocked at (sampled, see below); every
//! contended release is a `FUTEX_WAKE` on that address, captured with the
//! releasing thread's stack (the holder) and how long the address had
//! waiters. Uncontended
//! acquisitions never enter the kernel and cost nothing.
//!
//! The kernel gives every wait's count and time, and the stack of every
//! wait of 1 ms or more and of 1 in 32 shorter ones (see
//! [`crate::waits::STACK_MIN`]): per-lock totals are exact, per-site and
//! per-holder figures (`sites`, `holders` in evidence) are those of the
//! waits that carry a stack.
//!
//! Every `window` (10 s) the waits are summed per lock address; condition,
//! queue, event and join waits (`threading`'s `wait`/`join`) and GIL waits
//! are not contention and are left out. A lock whose waits add up to at
//! least `min_wait_share` of the window (0.2: threads spent a fifth of a
//! thread's time waiting for it) is reported (at most `max_findings`, the
//! most waited-for first) at its most waited-at site, with the top
//! `top` sites and holders in evidence. A reported lock stays while it
//! keeps half the threshold.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pymedic_model::{Finding, Kind, Layer, Location, Related, Severity, Stack};
use serde_json::json;

use super::sites::{self, Sum};
use super::{CheckContext, DetectError, Detector, Settings, Watch};
use crate::dump::source::SourceCache;
use crate::engine::targets::TargetInfo;
use crate::waits::{self, Frames, Subscription, View};

const NAME: &str = "lock_contention";

#[derive(Clone, Copy, Debug)]
struct Params {
    window: Duration,
    min_wait_share: f64,
    max_findings: usize,
    top: usize,
}

pub struct LockContention {
    params: Params,
}

/// `[detectors.lock_contention]`: `interval` (1s), `window` (10s),
/// `min_wait_share` (0.2), `max_findings` (3), `top` (5).
pub fn new(s: &Settings) -> Result<Arc<dyn Detector>, DetectError> {
    s.only(&["window", "min_wait_share", "max_findings", "top"])?;
    Ok(Arc::new(LockContention {
        params: Params {
            window: s.duration("window", Duration::from_secs(10))?,
            min_wait_share: s.float("min_wait_share", 0.2)?,
            max_findings: s.uint("max_findings", 3)? as usize,
            top: s.uint("top", 5)?.max(1) as usize,
        },
    }))
}

impl Detector for LockContention {
    fn name(&self) -> &'static str {
        NAME
    }
    fn layer(&self) -> Layer {
        Layer::Temporal
    }
    fn kinds(&self) -> Vec<Kind> {
        vec![Kind::LOCK_CONTENTION]
    }
    fn interval(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn backs_off_when_busy(&self) -> bool {
        false
    }
    fn watch(&self, target: &TargetInfo) -> Result<Option<Box<dyn Watch>>, DetectError> {
        let Some(sub) = super::subscribe_waits(NAME, target)? else {
            return Ok(None);
        };
        Ok(Some(Box::new(ContentionWatch {
            sub,
            params: self.params,
            window: LockWindow::default(),
            kinds: HashMap::new(),
            window_start: Instant::now(),
            sources: SourceCache::new(),
            reported: Vec::new(),
        })))
    }
}

/// One lock's waits and wakes in a window.
#[derive(Default)]
struct LockAgg {
    waits: Sum,
    threads: HashMap<u32, Sum>,
    sites: HashMap<Location, Sum>,
    /// Waiting stacks by site (one per site, for the finding's stacks).
    stacks: HashMap<Location, (u32, Frames)>,
    holders: HashMap<Location, Sum>,
    holder_stacks: HashMap<Location, (u32, Frames)>,
}

#[derive(Default)]
struct LockWindow {
    locks: HashMap<u64, LockAgg>,
}

impl LockWindow {
    /// Adds a view's waits and wakes. `kinds` remembers, per address,
    /// whether its sampled waits were lock acquisitions: the kernel walks
    /// the stacks of long waits and of 1 in 32 short ones, and the others
    /// (no stack) count towards their address once it is known to be a
    /// lock. Sites and holders come from the sampled ones.
    fn add(
        &mut self,
        v: &View,
        kinds: &mut HashMap<u64, bool>,
        sources: &mut SourceCache,
        pid: u32,
    ) {
        let in_gil = |a: u64| v.gil.is_some_and(|(s, e)| a >= s && a < e);
        if kinds.len() > MAX_KINDS {
            kinds.clear();
        }
        for w in v.waits.iter().filter(|w| !w.stack.is_empty()) {
            kinds.insert(w.uaddr, sites::is_lock_wait_at(&w.stack, sources, pid));
        }
        for w in &v.waits {
            if in_gil(w.uaddr) || kinds.get(&w.uaddr) != Some(&true) {
                continue;
            }
            let l = self.locks.entry(w.uaddr).or_default();
            l.waits.add(w.count, w.total, w.max);
            l.threads
                .entry(w.tid)
                .or_default()
                .add(w.count, w.total, w.max);
            if w.stack.is_empty() {
                continue;
            }
            let Some(site) = sites::acquire_site(&w.stack) else {
                continue;
            };
            l.sites
                .entry(site.clone())
                .or_default()
                .add(w.count, w.total, w.max);
            l.stacks.entry(site).or_insert((w.tid, w.stack.clone()));
        }
        for w in &v.wakes {
            let Some(l) = self.locks.get_mut(&w.uaddr) else {
                continue;
            };
            if w.stack.is_empty() {
                continue;
            }
            let Some(site) = sites::acquire_site(&w.stack) else {
                continue;
            };
            l.holders
                .entry(site.clone())
                .or_default()
                .add(w.count, w.total, w.max);
            l.holder_stacks
                .entry(site)
                .or_insert((w.tid, w.stack.clone()));
        }
    }
}

/// Addresses remembered as lock or not before the memory starts afresh.
const MAX_KINDS: usize = 65536;

struct ContentionWatch {
    sub: Subscription,
    params: Params,
    window: LockWindow,
    /// Per futex address: were its sampled waits lock acquisitions?
    kinds: HashMap<u64, bool>,
    window_start: Instant,
    sources: SourceCache,
    reported: Vec<(u64, Finding)>,
}

impl Watch for ContentionWatch {
    fn check(&mut self, cx: &CheckContext<'_>) -> Result<Vec<Finding>, DetectError> {
        let view = self.sub.view().map_err(|e| DetectError::Check {
            detector: NAME,
            op: "read the waits sensor",
            message: e.to_string(),
        })?;
        self.window
            .add(&view, &mut self.kinds, &mut self.sources, cx.target.id.pid);
        let elapsed = self.window_start.elapsed();
        if elapsed >= self.params.window {
            let w = std::mem::take(&mut self.window);
            self.reported = self.judge(&w, elapsed, cx);
            self.window_start = Instant::now();
        }
        Ok(self.reported.iter().map(|(_, f)| f.clone()).collect())
    }
}

impl ContentionWatch {
    fn judge(
        &mut self,
        w: &LockWindow,
        elapsed: Duration,
        cx: &CheckContext<'_>,
    ) -> Vec<(u64, Finding)> {
        let p = self.params;
        let secs = elapsed.as_secs_f64().max(0.001);
        let mut locks: Vec<(&u64, &LockAgg)> = w.locks.iter().collect();
        locks.sort_by_key(|(_, l)| std::cmp::Reverse(l.waits.total));
        let mut out = Vec::new();
        // Thread names cost a read of every thread: only for a finding.
        let mut names = None;
        for (addr, l) in locks {
            if out.len() >= p.max_findings {
                break;
            }
            let share = l.waits.total.as_secs_f64() / secs;
            let was = self.reported.iter().any(|(a, _)| a == addr);
            let threshold = if was {
                p.min_wait_share / 2.0
            } else {
                p.min_wait_share
            };
            if share < threshold || l.waits.count == 0 {
                continue;
            }
            let Some((site, _)) = l.sites.iter().max_by_key(|(_, s)| s.total) else {
                continue;
            };
            let name = sites::lock_name(&mut self.sources, cx.target.id.pid, site)
                .unwrap_or_else(|| format!("lock {addr:#x}"));
            let names = names.get_or_insert_with(|| self.sub.thread_names());
            out.push((
                *addr,
                finding(*addr, &name, site, l, share, secs, p.top, names, cx),
            ));
        }
        out
    }
}

#[allow(clippy::too_many_arguments)]
fn finding(
    addr: u64,
    name: &str,
    site: &Location,
    l: &LockAgg,
    share: f64,
    secs: f64,
    top: usize,
    names: &HashMap<u32, String>,
    cx: &CheckContext<'_>,
) -> Finding {
    let severity = if share >= 1.0 {
        Severity::High
    } else {
        Severity::Medium
    };
    let confidence = (l.waits.count as f64 / 20.0).clamp(0.5, 0.95);
    let mut f = Finding::new(
        Layer::Temporal,
        Kind::LOCK_CONTENTION,
        severity,
        confidence,
        format!(
            "Threads waited {:.1} s in {:.0} s for {} ({} waits, {} threads) at {}:{}",
            l.waits.total.as_secs_f64(),
            secs,
            name,
            l.waits.count,
            l.threads.len(),
            site.file,
            site.line
        ),
        Some(cx.target.model()),
        site.clone(),
    )
    .with_discriminator(name);
    let mut sites_sorted: Vec<(&Location, &Sum)> = l.sites.iter().collect();
    sites_sorted.sort_by_key(|(_, s)| std::cmp::Reverse(s.total));
    for (loc, s) in sites_sorted.iter().take(top) {
        if *loc != site {
            f.related.push(Related::new(
                loc,
                format!("also waits for {name} ({:.0} ms)", sites::ms(s.total)),
            ));
        }
    }
    let mut holders: Vec<(&Location, &Sum)> = l.holders.iter().collect();
    holders.sort_by_key(|(_, s)| std::cmp::Reverse(s.total));
    for (loc, s) in holders.iter().take(top) {
        f.related.push(Related::new(
            loc,
            format!(
                "holds {name}: released it {} times while threads waited ({:.0} ms)",
                s.count,
                sites::ms(s.total)
            ),
        ));
    }
    let mut push_stack = |tid: u32, frames: &Frames| {
        f.stacks.push(Stack {
            thread: names
                .get(&tid)
                .cloned()
                .unwrap_or_else(|| format!("tid {tid}")),
            tid,
            frames: waits::locations(frames),
        });
    };
    if let Some((tid, frames)) = l.stacks.get(site) {
        push_stack(*tid, frames);
    }
    if let Some((loc, _)) = holders.first()
        && let Some((tid, frames)) = l.holder_stacks.get(*loc)
    {
        push_stack(*tid, frames);
    }
    f.evidence = json!({
        "lock": name,
        "futex": format!("{addr:#x}"),
        "window_seconds": (secs * 10.0).round() / 10.0,
        "wait_ms": sites::ms(l.waits.total),
        "waits": l.waits.count,
        "max_wait_ms": sites::ms(l.waits.max),
        "wait_share": (share * 1000.0).round() / 1000.0,
        "waiting_threads": l.threads.len(),
        "sites_from": "waits of 1 ms or more and 1 in 32 shorter ones (stacks sampled)",
        "sites": sites::top(&l.sites, top, |s| s.total, |k, s| json!({
            "at": sites::loc_json(k), "waits": s.count,
            "wait_ms": sites::ms(s.total), "max_wait_ms": sites::ms(s.max)})),
        "holders": sites::top(&l.holders, top, |s| s.total, |k, s| json!({
            "at": sites::loc_json(k), "releases_with_waiters": s.count,
            "waiters_waited_ms": sites::ms(s.total)})),
    });
    f
}
