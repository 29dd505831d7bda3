//! `memory_leak`: Python memory that keeps growing, with the place that
//! keeps it (the retaining site) and the place that made it (the
//! allocation site) named separately.
//!
//! Mechanism (chosen by measurement; see ARCHITECTURE.md "The resource
//! layer"): uprobes on the allocators cost a trap per allocation, tens of
//! microseconds each on this kind of machine (185× slowdown on an
//! allocation-heavy program), and Debian's LTO build inlines most calls
//! anyway (a uprobe there sees 1.8% of them). Instead:
//!
//! * **Retaining site.** The heap is read from outside
//!   (`resource::heap`): every container reachable from module globals,
//!   class attributes, module-level objects, closures, `lru_cache`
//!   wrappers and thread locals has its length sampled each check. A
//!   container whose length grows steadily over the window (trend test,
//!   not one snapshot) is what retains the memory, named as a person would
//!   (`app.cache`, `app.Registry.items`). Bounded containers (`deque` with
//!   `maxlen`, `lru_cache` with `maxsize`) are never reported; a bounded
//!   cache written by hand stops growing and fails the trend test. A
//!   hardware write watchpoint on the container's length field, armed for
//!   a few hits, captures the stack of the code that inserts: the line.
//! * **Allocation site.** First-touch page faults of the target, each with
//!   its Python stack (a byte-weighted sample of where the heap grew),
//!   remembered per page: the pages holding the newest entries (their
//!   objects and out-of-line storage) name the code that made them.
//!   Closures name their `lambda`/`def` line directly.
//! * **No visible container.** When resident memory and pymalloc's arenas
//!   both grow steadily but no container does, the finding names the
//!   allocation site from the growth samples and says the retainer was not
//!   found among the roots read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pymedic_common::resource::FEAT_MEMORY;
use pymedic_model::{Finding, Kind, Layer, Location, Related, Severity};
use serde_json::json;

use super::fd_leak::{Membership, err, join_session, round};
use super::{CheckContext, DetectError, Detector, Settings, Watch};
use crate::engine::targets::TargetInfo;
use crate::resource::heap::{Container, Kind as CKind};
use crate::resource::memory::{self, MemoryTracker};
use crate::resource::session::Session;
use crate::resource::trend::{self, Rule, Trend};
use crate::resource::{flow, sites};

const NAME: &str = "memory_leak";

#[derive(Clone, Copy, Debug)]
pub(super) struct Params {
    pub window: Duration,
    pub min_entries: u64,
    pub min_z: f64,
    pub rescan: Duration,
    pub watch_hits: u32,
    pub max_findings: usize,
    /// Fallback without a container: resident growth at least this many
    /// bytes over the window.
    pub min_heap_growth: u64,
}

pub struct MemoryLeak {
    params: Params,
}

/// `[detectors.memory_leak]`: `interval` (2s), `window` (60s),
/// `min_entries` (30), `min_z` (3.0), `rescan` (10s), `watch_hits` (8),
/// `max_findings` (3), `min_heap_growth` (8388608 bytes). `rescan` is the
/// soonest the heap's roots are walked again, once the process grew by
/// 256 KiB since the last walk; without growth, the gap doubles up to
/// `rescan` × 30.
pub fn new(s: &Settings) -> Result<Arc<dyn Detector>, DetectError> {
    s.only(&[
        "window",
        "min_entries",
        "min_z",
        "rescan",
        "watch_hits",
        "max_findings",
        "min_heap_growth",
    ])?;
    Ok(Arc::new(MemoryLeak {
        params: Params {
            window: s.duration("window", Duration::from_secs(60))?,
            min_entries: s.uint("min_entries", 30)?.max(2),
            min_z: s.float("min_z", 3.0)?,
            rescan: s.duration("rescan", Duration::from_secs(10))?,
            watch_hits: s.uint("watch_hits", 8)?.clamp(1, 64) as u32,
            max_findings: s.uint("max_findings", 3)? as usize,
            min_heap_growth: s.uint("min_heap_growth", 8 << 20)?,
        },
    }))
}

impl Detector for MemoryLeak {
    fn name(&self) -> &'static str {
        NAME
    }

    fn layer(&self) -> Layer {
        Layer::Resource
    }

    fn kinds(&self) -> Vec<Kind> {
        vec![Kind::MEMORY_LEAK]
    }

    fn interval(&self) -> Duration {
        Duration::from_secs(2)
    }

    fn watch(&self, target: &TargetInfo) -> Result<Option<Box<dyn Watch>>, DetectError> {
        let Some(session) = join_session(NAME, target, FEAT_MEMORY)? else {
            return Ok(None);
        };
        Ok(Some(Box::new(MemWatch {
            pid: target.id.pid,
            params: self.params,
            session,
            tracker: memory::tracker(&target.process, target.id.start_ticks),
            states: HashMap::new(),
            heap_site: None,
            qualified: (target.process.version.major, target.process.version.minor) >= (3, 11),
        })))
    }
}

/// What is known about one growing container.
#[derive(Default)]
struct State {
    /// When its watchpoint was armed (None: never).
    armed: Option<Instant>,
    /// Insert stacks from the watchpoint: (stack innermost first, hits).
    inserts: Vec<(Vec<Location>, u64)>,
    /// The location the finding was first reported at (kept stable).
    location: Option<Location>,
    /// Allocation verdict and when it was made.
    alloc: Option<(Instant, Alloc)>,
}

#[derive(Clone, Debug, Default)]
struct Alloc {
    site: Option<(Location, Vec<Location>)>,
    /// Sampled objects whose page names `site`, out of `looked`.
    votes: usize,
    looked: usize,
    /// How the site was found.
    how: &'static str,
    /// The data-flow path from the insert, when that is how.
    flow: Option<String>,
    retained: crate::resource::heap::Retained,
}

struct MemWatch {
    pid: u32,
    params: Params,
    session: Membership,
    tracker: Arc<Mutex<MemoryTracker>>,
    states: HashMap<u64, State>,
    /// Location of the no-container finding, once reported.
    heap_site: Option<Location>,
    /// Code objects carry qualified names (3.11+).
    qualified: bool,
}

impl Drop for MemWatch {
    fn drop(&mut self) {
        // The membership (a field, dropped after this) gives up tracking.
        self.session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .disarm_watch(self.pid);
    }
}

/// A growing container, its trend and its (time, length) points.
pub(super) type Growing<C> = (C, Trend, Vec<(f64, f64)>);

/// Containers whose length grows steadily, with their trends, fastest
/// first. Bounded ones and the `threading` module's own bookkeeping
/// (reported by `thread_leak`) are left out.
pub(super) fn growing<'a>(
    containers: impl Iterator<Item = &'a Container>,
    p: &Params,
) -> Vec<Growing<&'a Container>> {
    let rule = Rule {
        min_points: 5,
        min_span: 8.0,
        min_z: p.min_z,
        min_net: p.min_entries as f64,
        min_late_share: 0.25,
    };
    let mut out: Vec<_> = containers
        .filter(|c| c.bound.is_none() && !c.name.starts_with("threading."))
        .filter_map(|c| {
            let points = c.series.window(p.window.as_secs_f64());
            let t = trend::analyze(&points)?;
            rule.steady(&t).then_some((c, t, points))
        })
        .collect();
    out.sort_by(|a, b| b.1.slope.total_cmp(&a.1.slope));
    out
}

/// Most common application frame among stacks, with its count and a
/// representative stack.
fn top_site(
    stacks: impl Iterator<Item = (Vec<Location>, u64)>,
) -> Option<(Location, Vec<Location>, u64, u64)> {
    let mut votes: HashMap<Location, (u64, Vec<Location>)> = HashMap::new();
    let mut total = 0;
    for (stack, n) in stacks {
        let Some((loc, _)) = sites::site(&stack, "") else {
            continue;
        };
        total += n;
        let e = votes.entry(loc).or_insert((0, stack));
        e.0 += n;
    }
    let (loc, (n, stack)) = votes
        .into_iter()
        .max_by(|a, b| a.1.0.cmp(&b.1.0).then(b.0.cmp(&a.0)))?;
    Some((loc, stack, n, total))
}

impl MemWatch {
    /// The allocation site of `c`'s newest entries: the stacks that first
    /// wrote the pages they live in; closures' creation lines; else the
    /// window's growth samples through the inserting function.
    fn allocation(
        &self,
        session: &mut Session,
        tracker: &MemoryTracker,
        c: &Container,
        inserts: &[(Vec<Location>, u64)],
    ) -> Alloc {
        let Some(heap) = tracker.heap.as_ref() else {
            return Alloc::default();
        };
        let retained = heap.retained(c, 32);
        // The inserting function: the retained objects were most likely
        // made in the call chain that stores them.
        let insert_fn: Option<Location> = inserts
            .first()
            .and_then(|(s, _)| sites::site(s, "").map(|(l, _)| l));
        let through = |stack: &[Location]| {
            insert_fn.as_ref().is_some_and(|f| {
                stack
                    .iter()
                    .any(|l| l.file == f.file && sites::same_function(&l.function, &f.function))
            })
        };
        // Memory first written at the insert itself is the container's own
        // storage growing (its table resizing): the retainer, not what it
        // retains.
        let at_insert = |stack: &[Location]| {
            insert_fn
                .as_ref()
                .is_some_and(|f| sites::site(stack, "").is_some_and(|(l, _)| &l == f))
        };
        let mut looked = 0;
        let pages: Vec<(Vec<Location>, u64)> = retained
            .addrs
            .iter()
            .filter_map(|&a| {
                looked += 1;
                let frames = session.page_stack(self.pid, a)?;
                Some((sites::locations(&frames), 1))
            })
            .filter(|(s, _)| !at_insert(s))
            .collect();
        let growth: Vec<(Vec<Location>, u64)> = tracker
            .growth_since(self.params.window.as_secs_f64())
            .filter(|g| !g.unsampled)
            .map(|g| (sites::locations(&g.frames), g.bytes))
            .filter(|(s, _)| !at_insert(s))
            .collect();
        let functions = retained.functions.first().cloned();
        let mostly_functions = functions
            .as_ref()
            .is_some_and(|(_, n)| *n * 2 >= retained.entries.max(1));
        let by_pages_through = top_site(pages.iter().filter(|(s, _)| through(s)).cloned());
        let by_growth_through = top_site(growth.iter().filter(|(s, _)| through(s)).cloned());
        let by_pages = top_site(pages.iter().cloned());
        let by_growth = top_site(growth.iter().cloned());
        let func_alloc = |retained: crate::resource::heap::Retained| {
            let (loc, n) = functions.clone().expect("checked");
            Alloc {
                site: Some((loc.clone(), vec![loc])),
                votes: n,
                looked: retained.entries,
                how: "the newest entries are functions created here",
                flow: None,
                retained,
            }
        };
        if mostly_functions {
            return func_alloc(retained);
        }
        // Data flow from the insert line to the expression that makes the
        // stored value, when the runtime type of the newest entries agrees.
        if let Some(insert) = &insert_fn
            && let Some(src) = flow::read_source(self.pid, &insert.file)
            && let Some(made) = flow::creation(&src, insert.line, self.qualified)
            && retained
                .types
                .first()
                .is_none_or(|(t, _)| made.consistent_with(t))
        {
            let loc = Location::new(insert.file.clone(), made.function.clone(), made.line);
            let stack = inserts.first().map(|(s, _)| s.clone()).unwrap_or_default();
            return Alloc {
                site: Some((loc, stack)),
                votes: retained.entries,
                looked: retained.entries,
                how: "the stored value is created here (data flow from the insert)",
                flow: Some(made.path),
                retained,
            };
        }
        let pick = |found: Option<(Location, Vec<Location>, u64, u64)>, min: u64, how| {
            found
                .filter(|(.., n, _)| *n >= min)
                .map(|(loc, stack, n, total)| (loc, stack, n, total, how))
        };
        let choice = pick(
            by_pages_through,
            2,
            "pages of the newest entries were first written here, under the inserting function",
        )
        .or_else(|| {
            pick(
                by_growth_through,
                1,
                "the heap grew here (first-written pages) under the inserting function",
            )
        })
        .or_else(|| {
            pick(
                by_pages,
                2,
                "pages of the newest entries were first written here",
            )
        })
        .or_else(|| {
            pick(
                by_growth,
                1,
                "the heap grew here (bytes of first-written pages)",
            )
        });
        match choice {
            Some((loc, stack, n, total, how)) => Alloc {
                site: Some((loc, stack)),
                votes: n as usize,
                looked: if how.starts_with("pages") {
                    looked
                } else {
                    total as usize
                },
                how,
                flow: None,
                retained,
            },
            None if functions.is_some() => func_alloc(retained),
            None => Alloc {
                retained,
                ..Alloc::default()
            },
        }
    }
}

impl Watch for MemWatch {
    fn check(&mut self, cx: &CheckContext<'_>) -> Result<Vec<Finding>, DetectError> {
        let session = self.session.clone();
        let tracker = self.tracker.clone();
        let mut tracker = tracker.lock().unwrap_or_else(|e| e.into_inner());
        tracker
            .update(&session, Duration::from_millis(1500), self.params.rescan)
            .map_err(|e| err(NAME, "read the eBPF maps", e))?;
        let mut session = session.lock().unwrap_or_else(|e| e.into_inner());
        if tracker.heap.is_none() {
            tracing::debug!(
                pid = self.pid,
                "memory_leak cannot read the heap: {}",
                tracker.heap_error().unwrap_or("?")
            );
        }
        let window = self.params.window.as_secs_f64();
        let rss_trend = trend::analyze(&tracker.rss.window(window));
        let arena_trend = trend::analyze(&tracker.arenas.window(window));
        let grow: Vec<Growing<Container>> = match tracker.heap.as_ref() {
            Some(h) => growing(h.containers(), &self.params)
                .into_iter()
                .take(self.params.max_findings)
                .map(|(c, t, p)| (c.clone(), t, p))
                .collect(),
            None => Vec::new(),
        };
        // Watchpoints: one process-wide at a time, for a few seconds, on
        // the fastest-growing container whose inserts are not known yet.
        if let Some((_, at)) = session.armed_watch(self.pid)
            && at.elapsed() > Duration::from_secs(6)
        {
            session.disarm_watch(self.pid);
        }
        for (c, _, _) in &grow {
            let len_addr = tracker
                .heap
                .as_ref()
                .map(|h| h.len_addr(c))
                .unwrap_or_default();
            let hits: Vec<(Vec<Location>, u64)> = session
                .watch_hits(self.pid, len_addr)
                .iter()
                .map(|(f, n)| (sites::locations(f), *n))
                .filter(|(s, _)| !s.is_empty())
                .collect();
            let st = self.states.entry(c.addr).or_default();
            if !hits.is_empty() {
                st.inserts = hits;
            }
        }
        if session.armed_watch(self.pid).is_none()
            && let Some((c, _, _)) = grow.iter().find(|(c, _, _)| {
                self.states
                    .get(&c.addr)
                    .is_none_or(|s| s.inserts.is_empty() && s.armed.is_none())
            })
        {
            let len_addr = tracker.heap.as_ref().map(|h| h.len_addr(c)).unwrap_or(0);
            match session.arm_watch(self.pid, len_addr, self.params.watch_hits, 64) {
                Ok(n) => tracing::debug!(pid = self.pid, threads = n, "watching {}", c.name),
                Err(e) => tracing::debug!(pid = self.pid, "no watchpoint on {}: {e}", c.name),
            }
            self.states.entry(c.addr).or_default().armed = Some(Instant::now());
        }
        let mut out = Vec::new();
        for (c, t, points) in &grow {
            let st = self.states.entry(c.addr).or_default();
            // Wait (one check) for the watchpoint's answer before the first
            // report, so the finding's location does not change afterwards.
            if st.location.is_none()
                && st.inserts.is_empty()
                && st
                    .armed
                    .is_none_or(|a| a.elapsed() < Duration::from_secs(3))
            {
                continue;
            }
            let inserts = st.inserts.clone();
            let stale = st
                .alloc
                .as_ref()
                .is_none_or(|(at, _)| at.elapsed() > Duration::from_secs(10));
            if stale {
                let a = self.allocation(&mut session, &tracker, c, &inserts);
                self.states.get_mut(&c.addr).expect("entry above").alloc =
                    Some((Instant::now(), a));
            }
            let st = self.states.get_mut(&c.addr).expect("entry above");
            let alloc = st
                .alloc
                .as_ref()
                .map(|(_, a)| a.clone())
                .unwrap_or_default();
            let insert = top_site(inserts.iter().cloned());
            let location = st.location.get_or_insert_with(|| {
                insert
                    .as_ref()
                    .map(|(l, ..)| l.clone())
                    .or_else(|| alloc.site.as_ref().map(|(l, _)| l.clone()))
                    .unwrap_or_else(|| Location::new("<heap>", c.name.clone(), 0))
            });
            out.push(container_finding(
                cx,
                c,
                t,
                points,
                location.clone(),
                insert.as_ref(),
                &alloc,
                rss_trend.as_ref(),
            ));
        }
        if grow.is_empty()
            && let Some(f) = self.heap_without_container(cx, &tracker, rss_trend, arena_trend)
        {
            out.push(f);
        }
        Ok(out)
    }
}

impl MemWatch {
    /// Resident memory and pymalloc arenas grow together, and no container
    /// does: a Python leak whose retainer is out of the roots' reach.
    fn heap_without_container(
        &mut self,
        cx: &CheckContext<'_>,
        tracker: &MemoryTracker,
        rss: Option<Trend>,
        arenas: Option<Trend>,
    ) -> Option<Finding> {
        let rule = Rule {
            min_points: 5,
            min_span: 8.0,
            min_z: self.params.min_z,
            min_net: self.params.min_heap_growth as f64,
            min_late_share: 0.25,
        };
        let (rss, arenas) = (rss?, arenas?);
        let arena_rule = Rule {
            min_net: rule.min_net / 2.0,
            ..rule
        };
        if !rule.steady(&rss) || !arena_rule.steady(&arenas) {
            self.heap_site = None;
            return None;
        }
        let growth: Vec<(Vec<Location>, u64)> = tracker
            .growth_since(self.params.window.as_secs_f64())
            .filter(|g| !g.unsampled)
            .map(|g| (sites::locations(&g.frames), g.bytes))
            .collect();
        let (loc, stack, n, total) = top_site(growth.into_iter())?;
        let location = self.heap_site.get_or_insert(loc.clone()).clone();
        let mut f = Finding::new(
            Layer::Resource,
            Kind::MEMORY_LEAK,
            severity(rss.slope),
            trend::confidence(&rss) * 0.8,
            format!(
                "the Python heap grows by {}/s; allocated at {} ({}% of sampled growth); \
                 no growing container found among module globals, class attributes, \
                 closures and thread locals",
                human_bytes(arenas.slope),
                sites::short(&loc),
                n * 100 / total.max(1)
            ),
            Some(cx.target.model()),
            location,
        );
        f.related.push(Related::new(&loc, "allocated here"));
        f.stacks.push(sites::stack("allocating thread", 0, stack));
        f.evidence = json!({
            "retained_by": null,
            "resident_bytes_per_second": round(rss.slope, 0),
            "python_heap_bytes_per_second": round(arenas.slope, 0),
            "allocation_share": round(n as f64 / total.max(1) as f64, 3),
            "window_seconds": round(rss.span, 1),
            "trend_z": round(rss.z, 2),
        });
        Some(f)
    }
}

fn severity(bytes_per_s: f64) -> Severity {
    if bytes_per_s >= 1_048_576.0 {
        Severity::High
    } else if bytes_per_s >= 65_536.0 {
        Severity::Medium
    } else {
        Severity::Low
    }
}

pub(super) fn human_bytes(b: f64) -> String {
    crate::procinfo::human_bytes(b.max(0.0) as u64)
}

#[allow(clippy::too_many_arguments)]
fn container_finding(
    cx: &CheckContext<'_>,
    c: &Container,
    t: &Trend,
    points: &[(f64, f64)],
    location: Location,
    insert: Option<&(Location, Vec<Location>, u64, u64)>,
    alloc: &Alloc,
    rss: Option<&Trend>,
) -> Finding {
    let kind = match c.kind {
        CKind::Dict => "dict",
        CKind::List => "list",
        CKind::Set => "set",
        CKind::Deque => "deque",
    };
    let len = points.last().map(|p| p.1 as u64).unwrap_or(0);
    let rss_rate = rss.filter(|r| r.slope > 0.0 && r.z >= 2.0).map(|r| r.slope);
    let per_entry = alloc.retained.objects as f64 / alloc.retained.entries.max(1) as f64;
    let mut title = format!(
        "`{}` ({}) grows by {:.0} entries/s ({} now)",
        c.name, c.type_name, t.slope, len
    );
    if let Some(r) = rss_rate {
        title.push_str(&format!(", resident memory +{}/s", human_bytes(r)));
    }
    match insert {
        Some((l, ..)) => {
            title.push_str(&format!("; retained by the insert at {}", sites::short(l)))
        }
        None => title.push_str("; insert site not observed"),
    }
    if let Some((l, _)) = &alloc.site {
        title.push_str(&format!(", allocated at {}", sites::short(l)));
    }
    let severity = match rss_rate {
        Some(r) => severity(r),
        None if t.slope >= 100.0 => Severity::Medium,
        None => Severity::Low,
    };
    let mut f = Finding::new(
        Layer::Resource,
        Kind::MEMORY_LEAK,
        severity,
        trend::confidence(t),
        title,
        Some(cx.target.model()),
        location,
    )
    .with_discriminator(&c.name);
    if let Some((l, stack, ..)) = insert {
        f.related.push(Related::new(
            l,
            format!("retained here: inserts into {}", c.name),
        ));
        f.stacks.push(sites::stack(
            format!("insert into {}", c.name),
            0,
            stack.clone(),
        ));
    }
    if let Some((l, stack)) = &alloc.site {
        f.related
            .push(Related::new(l, format!("allocated here: {}", alloc.how)));
        if stack.len() > 1 {
            f.stacks.push(sites::stack("allocation", 0, stack.clone()));
        }
    }
    for (l, n) in alloc.retained.functions.iter().take(3) {
        if alloc.site.as_ref().is_none_or(|(s, _)| s != l) {
            f.related.push(Related::new(
                l,
                format!("{n} of the newest entries are functions defined here"),
            ));
        }
    }
    f.evidence = json!({
        "retained_by": c.name,
        "container_type": c.type_name,
        "container_kind": kind,
        "length": len,
        "entries_per_second": round(t.slope, 2),
        "objects_per_second": round(t.slope * per_entry.max(1.0), 1),
        "resident_bytes_per_second": rss_rate.map(|r| round(r, 0)),
        "bytes_per_entry": rss_rate.map(|r| round(r / t.slope.max(1e-9), 0)),
        "length_over_time": points.iter().rev().take(20).rev()
            .map(|(t, v)| json!([round(*t, 1), *v as u64])).collect::<Vec<_>>(),
        "window_seconds": round(t.span, 1),
        "trend_z": round(t.z, 2),
        "newest_entry_types": alloc.retained.types.iter().take(5)
            .map(|(n, k)| json!({"type": n, "count": k})).collect::<Vec<_>>(),
        "allocation": {
            "how": alloc.how,
            "data_flow": alloc.flow,
            // objects (pages, functions) or bytes (growth samples) naming
            // the site, out of all looked at
            "evidence_share": round(alloc.votes as f64 / alloc.looked.max(1) as f64, 3),
        },
        "insert_hits": insert.map(|(_, _, n, total)| json!({"site": n, "all": total})),
    });
    f
}
