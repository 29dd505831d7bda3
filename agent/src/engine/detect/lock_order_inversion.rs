//! `lock_order_inversion`: two (or more) threads that take the same locks in
//! opposite orders; a deadlock that has not happened yet. Every edge of the
//! cycle is reported with where the outer lock was taken and where the
//! inner one was.
//!
//! Default mode, *sampled*: nothing is added to the lock path. The target's
//! threads are read from outside (the `dump` engine, `process_vm_readv`,
//! never stopping it) every check, and each thread's held locks are
//! resolved from its frames: the `with X:` / `X.acquire()` regions each
//! frame is inside, with `X` evaluated in that frame to a lock object that
//! is locked (an `RLock` by its recorded owner), outermost first, plus the
//! lock it is blocked on. Consecutive locks in that sequence are edges of a
//! lock-order graph ([`super::lock_graph`]) kept for the target's life; a
//! cycle whose edges come from two threads and share no gate lock is a
//! finding. Extra reads are triggered when the waits sensor sees a thread
//! blocked in `futex` (a contended acquisition: the moment an inversion is
//! most visible).
//!
//! A lock object at a freed and reused address (malloc readily reuses
//! both the object's and its semaphore's) is a different lock: the waits
//! sensor counts lock allocations per semaphore address (a uprobe on the
//! target's libc `sem_init`, or on 3.13+ shared builds a uretprobe on
//! `PyThread_allocate_lock`; lock creation is rare, so it costs nothing
//! measurable), and a changed count starts a new node
//! ([`super::lock_graph`]).
//!
//! What sampling misses: nested regions a thread passes through quickly
//! (a nested `with` that holds both locks for microseconds) are seen only
//! if a read lands inside them or the inner acquisition blocks; the chance
//! is about the share of time the thread spends holding both. Locks taken
//! by C code or hidden behind a call (`lock.acquire()` inside a helper
//! whose region is not lexical) are seen only while waited for.
//! `uprobes` on libc's `sem_*` (every operation) were measured at about
//! 22 µs per hit on this project's machines, 50–100× the cost of an
//! uncontended acquire/release, so an exact mode is not offered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pymedic_model::{Finding, Kind, Layer, Related, Severity, Stack};
use pymedic_python::InspectError;
use serde_json::json;

use super::lock_graph::{Acquired, Cycle, LockGraph, Observation};
use super::sites;
use super::{CheckContext, DetectError, Detector, Settings, Watch};
use crate::dump::locks::Locks;
use crate::dump::{DumpError, DumpOptions, Dumper, Snapshot, WaitKind};
use crate::engine::targets::TargetInfo;
use crate::engine::usage;
use crate::waits::{self, Subscription};

const NAME: &str = "lock_order_inversion";

pub struct LockOrderInversion {
    interval: Duration,
    max_edges: usize,
}

/// `[detectors.lock_order_inversion]`: `interval` (200ms: how often the
/// threads are sampled), `max_edges` (4096).
pub fn new(s: &Settings) -> Result<Arc<dyn Detector>, DetectError> {
    s.only(&["max_edges"])?;
    Ok(Arc::new(LockOrderInversion {
        interval: s.duration("interval", Duration::from_millis(200))?,
        max_edges: s.uint("max_edges", 4096)?.max(16) as usize,
    }))
}

impl Detector for LockOrderInversion {
    fn name(&self) -> &'static str {
        NAME
    }
    fn layer(&self) -> Layer {
        Layer::Temporal
    }
    fn kinds(&self) -> Vec<Kind> {
        vec![Kind::LOCK_ORDER_INVERSION]
    }
    fn interval(&self) -> Duration {
        self.interval
    }
    fn watch(&self, target: &TargetInfo) -> Result<Option<Box<dyn Watch>>, DetectError> {
        let dumper = match Dumper::for_process(target.process.clone()) {
            Ok(d) => d,
            Err(
                DumpError::Exited { pid } | DumpError::Inspect(InspectError::NoSuchProcess { pid }),
            ) => return Err(DetectError::Gone { pid }),
            Err(DumpError::Inspect(
                e @ (InspectError::UnsupportedVersion { .. } | InspectError::NotPython { .. }),
            )) => {
                tracing::info!(pid = target.id.pid, "{NAME} does not apply: {e}");
                return Ok(None);
            }
            Err(e) => {
                return Err(DetectError::Check {
                    detector: NAME,
                    op: "prepare to read the interpreter",
                    message: e.to_string(),
                });
            }
        };
        let sensor = waits::subscribe(dumper.process()).ok();
        Ok(Some(Box::new(OrderWatch {
            dumper,
            sensor,
            graph: LockGraph::new(self.max_edges),
            samples: 0,
            triggered: 0,
            started: Instant::now(),
        })))
    }
}

struct OrderWatch {
    dumper: Dumper,
    sensor: Option<Subscription>,
    graph: LockGraph,
    samples: u64,
    triggered: u64,
    started: Instant,
}

/// Each thread's held locks (and awaited lock) in one snapshot.
pub fn observations(snap: &Snapshot) -> Vec<Observation> {
    let mut out = Vec::new();
    for t in &snap.threads {
        let mut sequence: Vec<Acquired> = t
            .holds
            .iter()
            .map(|h| Acquired {
                id: h.lock.id.clone(),
                futex: Locks::<pymedic_python::LiveMemory>::futex(&h.lock),
                alloc: 0,
                name: h.lock.name.clone(),
                at: h.acquired_at.clone(),
            })
            .collect();
        let mut waiting = false;
        if let Some(w) = &t.waiting
            && w.kind == WaitKind::Lock
            && let (Some(lock), Some(at)) = (&w.lock, &w.at)
        {
            sequence.push(Acquired {
                id: lock.id.clone(),
                futex: Locks::<pymedic_python::LiveMemory>::futex(lock),
                alloc: 0,
                name: lock.name.clone(),
                at: at.clone(),
            });
            waiting = true;
        }
        if sequence.len() < 2 {
            continue;
        }
        out.push(Observation {
            tid: t.tid,
            thread: t.name.clone(),
            sequence,
            waiting,
            stack: t.python_frames().map(|f| f.location()).collect(),
        });
    }
    out
}

impl Watch for OrderWatch {
    fn check(&mut self, cx: &CheckContext<'_>) -> Result<Vec<Finding>, DetectError> {
        // A thread blocked in futex right now is a contended acquisition:
        // count it (the read below sees it while it waits).
        if let Some(s) = &self.sensor
            && let Ok(v) = s.view()
            && v.blocked.iter().any(|b| {
                // A fresh wait has no stack yet (the sensor reads it once
                // the wait lasts); any non-GIL futex wait counts.
                !v.gil.is_some_and(|(s, e)| b.uaddr >= s && b.uaddr < e)
                    && (b.stack.is_empty() || sites::is_lock_wait(&b.stack))
            })
        {
            self.triggered += 1;
        }
        let opts = DumpOptions {
            holds: true,
            ..DumpOptions::default()
        };
        let snap = self.dumper.snapshot(&opts).map_err(|e| match e {
            DumpError::Exited { pid } => DetectError::Gone { pid },
            e => DetectError::Check {
                detector: NAME,
                op: "read the threads' stacks",
                message: e.to_string(),
            },
        })?;
        usage::record_samples(1);
        self.samples += 1;
        let mut obs = observations(&snap);
        self.stamp_allocations(&mut obs);
        for o in &obs {
            self.graph.observe(o);
        }
        tracing::debug!(
            pid = cx.target.id.pid,
            sample = self.samples,
            nested = obs.len(),
            edges = self.graph.edge_count(),
            "lock order sample"
        );
        // A cycle that is deadlocked right now is the `deadlock` detector's
        // finding, not a deadlock that may happen.
        let live: Vec<String> = crate::deadlock::analyze(&snap)
            .deadlocks
            .iter()
            .flat_map(|d| d.threads.iter().map(|t| t.waiting_for.lock.id.clone()))
            .collect();
        let target = cx.target.model();
        let mut out: Vec<Finding> = self
            .graph
            .cycles()
            .iter()
            .filter(|c| !c.edges.iter().all(|e| live.contains(&e.outer.id)))
            .map(|c| self.finding(c, &target))
            .collect();
        for f in &mut out {
            let extra = super::explain::related(f, cx.target.id.pid);
            f.related.extend(extra.iter().cloned());
        }
        Ok(out)
    }
}

impl OrderWatch {
    /// Sets each observed lock's allocation count (see
    /// [`crate::waits::Subscription::lock_generations`]).
    fn stamp_allocations(&self, obs: &mut [Observation]) {
        let Some(sensor) = &self.sensor else {
            return;
        };
        let sems: Vec<u64> = obs
            .iter()
            .flat_map(|o| o.sequence.iter().map(|a| a.futex))
            .collect();
        if sems.is_empty() {
            return;
        }
        let Some(gens) = sensor.lock_generations(&sems) else {
            return;
        };
        let mut gens = gens.into_iter();
        for a in obs.iter_mut().flat_map(|o| o.sequence.iter_mut()) {
            a.alloc = gens.next().unwrap_or(0);
        }
    }

    fn finding(&self, c: &Cycle, target: &pymedic_model::Target) -> Finding {
        // Locks reached by the same expression (`src.lock` in both
        // directions) are told apart by their address.
        let same = |n: &str| {
            let mut ids: Vec<&str> = c
                .edges
                .iter()
                .flat_map(|e| [(&e.outer_name, &e.outer.id), (&e.inner_name, &e.inner.id)])
                .filter(|(name, _)| name.as_str() == n)
                .map(|(_, id)| id.as_str())
                .collect();
            ids.sort();
            ids.dedup();
            ids.len() > 1
        };
        let shown = |n: &str, id: &str| {
            if same(n) {
                format!("{n} ({id})")
            } else {
                n.to_owned()
            }
        };
        let names: Vec<String> = c
            .edges
            .iter()
            .map(|e| shown(&e.outer_name, &e.outer.id))
            .collect();
        let threads: Vec<String> = c.edges.iter().map(|e| e.thread.clone()).collect();
        let first = &c.edges[0];
        let waited = c.edges.iter().any(|e| e.waited);
        let mut f = Finding::new(
            Layer::Temporal,
            Kind::LOCK_ORDER_INVERSION,
            if waited {
                Severity::Critical
            } else {
                Severity::High
            },
            if waited { 0.9 } else { 0.8 },
            format!(
                "Lock order inversion: threads {} take {} in opposite orders; they can deadlock",
                threads.join(", "),
                names.join(" and ")
            ),
            Some(target.clone()),
            first.inner_at.clone(),
        );
        let key: Vec<String> = c.key().iter().map(|n| n.id.clone()).collect();
        f = f.with_discriminator(&key.join(","));
        for e in &c.edges {
            f.related.push(Related::new(
                &e.outer_at,
                format!(
                    "thread {} ({}) takes {} here",
                    e.thread, e.tid, e.outer_name
                ),
            ));
            f.related.push(Related::new(
                &e.inner_at,
                format!(
                    "then {} {} here while holding {}",
                    if e.waited { "waits for" } else { "takes" },
                    e.inner_name,
                    e.outer_name
                ),
            ));
            f.stacks.push(Stack {
                thread: e.thread.clone(),
                tid: e.tid,
                frames: e.stack.clone(),
            });
        }
        f.evidence = json!({
            "mode": "sampled",
            "samples": self.samples,
            "contended_triggers": self.triggered,
            "observed_seconds": self.started.elapsed().as_secs(),
            "edges": c.edges.iter().map(|e| json!({
                "outer": {"lock": e.outer_name, "id": e.outer.id, "generation": e.outer.generation,
                          "taken_at": sites::loc_json(&e.outer_at)},
                "inner": {"lock": e.inner_name, "id": e.inner.id, "generation": e.inner.generation,
                          "taken_at": sites::loc_json(&e.inner_at)},
                "thread": {"tid": e.tid, "name": e.thread},
                "seen": e.seen,
                "contended": e.waited,
            })).collect::<Vec<_>>(),
        });
        f
    }
}
