//! `gil_contention`: threads that spend a large share of their time waiting
//! for the GIL, how long, and who held it.
//!
//! Source: the shared waits sensor ([`crate::waits`]). A thread waiting for
//! the GIL sleeps in `futex` on the GIL's condition variable or mutex (their
//! address range comes from the interpreter layout, so this works on static
//! builds without a `take_gil` symbol); the holder that lets it go wakes
//! that address (`drop_gil`), and the kernel captures the holder's Python
//! stack then, weighted by how long the GIL had waiters. A tight Python
//! loop or a C extension that keeps the GIL shows up as that stack. (The
//! kernel walks stacks only for waits of 1 ms or more and 1 in 32 shorter
//! ones; a GIL hand-off after the 5 ms switch interval is always long.
//! Wait counts and times are exact.)
//!
//! Every `window` (10 s): when the threads' GIL waits add up to at least
//! `min_wait_share` (0.5) of the window, report one finding at the top
//! holder's line, with per-thread wait times and the top holders.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pymedic_model::{Finding, Kind, Layer, Location, Related, Severity, Stack};
use serde_json::json;

use super::sites::{self, Sum};
use super::{CheckContext, DetectError, Detector, Settings, Watch};
use crate::engine::targets::TargetInfo;
use crate::waits::{self, Frames, Subscription};

const NAME: &str = "gil_contention";

#[derive(Clone, Copy, Debug)]
struct Params {
    window: Duration,
    min_wait_share: f64,
    top: usize,
}

pub struct GilContention {
    params: Params,
}

/// `[detectors.gil_contention]`: `interval` (1s), `window` (10s),
/// `min_wait_share` (0.5), `top` (5).
pub fn new(s: &Settings) -> Result<Arc<dyn Detector>, DetectError> {
    s.only(&["window", "min_wait_share", "top"])?;
    Ok(Arc::new(GilContention {
        params: Params {
            window: s.duration("window", Duration::from_secs(10))?,
            min_wait_share: s.float("min_wait_share", 0.5)?,
            top: s.uint("top", 5)?.max(1) as usize,
        },
    }))
}

impl Detector for GilContention {
    fn name(&self) -> &'static str {
        NAME
    }
    fn layer(&self) -> Layer {
        Layer::Temporal
    }
    fn kinds(&self) -> Vec<Kind> {
        vec![Kind::GIL_CONTENTION]
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
        Ok(Some(Box::new(GilWatch {
            sub,
            params: self.params,
            window: GilWindow::default(),
            window_start: Instant::now(),
            reported: None,
        })))
    }
}

#[derive(Default)]
struct GilWindow {
    waits: Sum,
    threads: HashMap<u32, Sum>,
    /// Where waiting threads were when they asked for the GIL.
    wait_sites: HashMap<Location, Sum>,
    holders: HashMap<Location, Sum>,
    holder_stacks: HashMap<Location, (u32, Frames)>,
}

struct GilWatch {
    sub: Subscription,
    params: Params,
    window: GilWindow,
    window_start: Instant,
    reported: Option<Finding>,
}

impl Watch for GilWatch {
    fn check(&mut self, cx: &CheckContext<'_>) -> Result<Vec<Finding>, DetectError> {
        let v = self.sub.view().map_err(|e| DetectError::Check {
            detector: NAME,
            op: "read the waits sensor",
            message: e.to_string(),
        })?;
        let Some((lo, hi)) = v.gil else {
            return Ok(Vec::new()); // the GIL's address is unknown here
        };
        let gil = |a: u64| a >= lo && a < hi;
        for w in v.waits.iter().filter(|w| gil(w.uaddr)) {
            self.window.waits.add(w.count, w.total, w.max);
            self.window
                .threads
                .entry(w.tid)
                .or_default()
                .add(w.count, w.total, w.max);
            if let Some(site) = sites::program_site(&w.stack) {
                self.window
                    .wait_sites
                    .entry(site)
                    .or_default()
                    .add(w.count, w.total, w.max);
            }
        }
        for w in v.wakes.iter().filter(|w| gil(w.uaddr)) {
            let Some(site) = sites::program_site(&w.stack) else {
                continue;
            };
            self.window
                .holders
                .entry(site.clone())
                .or_default()
                .add(w.count, w.total, w.max);
            self.window
                .holder_stacks
                .entry(site)
                .or_insert((w.tid, w.stack.clone()));
        }
        let elapsed = self.window_start.elapsed();
        if elapsed >= self.params.window {
            let w = std::mem::take(&mut self.window);
            let was = self.reported.is_some();
            let sub = &self.sub;
            self.reported = judge(&w, elapsed, &self.params, was, || sub.thread_names(), cx);
            self.window_start = Instant::now();
        }
        Ok(self.reported.iter().cloned().collect())
    }
}

fn judge(
    w: &GilWindow,
    elapsed: Duration,
    p: &Params,
    was: bool,
    names: impl FnOnce() -> HashMap<u32, String>,
    cx: &CheckContext<'_>,
) -> Option<Finding> {
    let secs = elapsed.as_secs_f64().max(0.001);
    let share = w.waits.total.as_secs_f64() / secs;
    let threshold = if was {
        p.min_wait_share / 2.0
    } else {
        p.min_wait_share
    };
    if share < threshold || w.waits.count == 0 {
        return None;
    }
    // Thread names cost a read of every thread: only for a finding.
    let names = &names();
    let holder = w
        .holders
        .iter()
        .max_by_key(|(_, s)| s.total)
        .map(|(l, _)| l);
    let waiter = w
        .wait_sites
        .iter()
        .max_by_key(|(_, s)| s.total)
        .map(|(l, _)| l);
    let location = holder.or(waiter)?.clone();
    let title = match holder {
        Some(h) => format!(
            "{} threads waited {:.1} s for the GIL in {:.0} s; held longest by {} at {}:{}",
            w.threads.len(),
            w.waits.total.as_secs_f64(),
            secs,
            h.function,
            h.file,
            h.line
        ),
        None => format!(
            "{} threads waited {:.1} s for the GIL in {:.0} s",
            w.threads.len(),
            w.waits.total.as_secs_f64(),
            secs
        ),
    };
    let severity = if share >= 2.0 {
        Severity::High
    } else {
        Severity::Medium
    };
    let mut f = Finding::new(
        Layer::Temporal,
        Kind::GIL_CONTENTION,
        severity,
        (w.waits.count as f64 / 50.0).clamp(0.5, 0.9),
        title,
        Some(cx.target.model()),
        location,
    );
    let mut holders: Vec<(&Location, &Sum)> = w.holders.iter().collect();
    holders.sort_by_key(|(_, s)| std::cmp::Reverse(s.total));
    for (loc, s) in holders.iter().take(p.top) {
        f.related.push(Related::new(
            loc,
            format!(
                "held the GIL while others waited ({:.0} ms over {} hand-offs)",
                sites::ms(s.total),
                s.count
            ),
        ));
    }
    let mut waiters: Vec<(&Location, &Sum)> = w.wait_sites.iter().collect();
    waiters.sort_by_key(|(_, s)| std::cmp::Reverse(s.total));
    for (loc, s) in waiters.iter().take(p.top) {
        f.related.push(Related::new(
            loc,
            format!("waited here for the GIL ({:.0} ms)", sites::ms(s.total)),
        ));
    }
    for (loc, _) in holders.iter().take(2) {
        if let Some((tid, frames)) = w.holder_stacks.get(*loc) {
            f.stacks.push(Stack {
                thread: names
                    .get(tid)
                    .cloned()
                    .unwrap_or_else(|| format!("tid {tid}")),
                tid: *tid,
                frames: waits::locations(frames),
            });
        }
    }
    f.evidence = json!({
        "window_seconds": (secs * 10.0).round() / 10.0,
        "gil_wait_ms": sites::ms(w.waits.total),
        "gil_wait_share": (share * 1000.0).round() / 1000.0,
        "waits": w.waits.count,
        "threads": sites::top(&w.threads, 16, |s| s.total, |tid, s| json!({
            "tid": tid, "name": names.get(tid), "wait_ms": sites::ms(s.total),
            "wait_share": ((s.total.as_secs_f64() / secs) * 1000.0).round() / 1000.0,
            "waits": s.count})),
        "holders": sites::top(&w.holders, p.top, |s| s.total, |k, s| json!({
            "at": sites::loc_json(k), "hand_offs": s.count,
            "waiters_waited_ms": sites::ms(s.total)})),
    });
    Some(f)
}
