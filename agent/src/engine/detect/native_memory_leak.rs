//! `native_memory_leak`: resident memory that grows steadily while the
//! Python heap does not — memory a C extension, ctypes or a native library
//! allocates and never frees.
//!
//! Shares `memory_leak`'s per-process series (`resource::memory`):
//! resident bytes, bytes in pymalloc arenas (from `mmap`/`munmap` of
//! arena-sized regions), growing containers, and first-touch page faults
//! with the Python stack and the faulting instruction. A leak is reported
//! when resident memory grows steadily over the window, arenas grow by
//! less than a quarter of it, no container grows (that would be a Python
//! leak) and the thread count does not (a thread leak's stacks are
//! `thread_leak`'s). The location is the Python line under which the new
//! pages were first written; the native code that wrote them is named
//! from the faulting instructions where the libraries have symbols.
//! Deeper native stacks need frame pointers, which the interpreters here
//! are built without.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pymedic_common::resource::FEAT_MEMORY;
use pymedic_model::{Finding, Kind, Layer, Location, Related, Severity};
use serde_json::json;

use super::fd_leak::{Membership, err, join_session, round};
use super::memory_leak::{Params as MemParams, growing, human_bytes};
use super::{CheckContext, DetectError, Detector, Settings, Watch};
use crate::engine::targets::TargetInfo;
use crate::resource::memory::{self, MemoryTracker};
use crate::resource::native::{self, NativeSymbolizer};
use crate::resource::sites;
use crate::resource::trend::{self, Rule, Series};

const NAME: &str = "native_memory_leak";

#[derive(Clone, Copy, Debug)]
struct Params {
    window: Duration,
    min_growth: u64,
    min_z: f64,
}

pub struct NativeMemoryLeak {
    params: Params,
}

/// `[detectors.native_memory_leak]`: `interval` (2s), `window` (60s),
/// `min_growth` (8388608 bytes over the window), `min_z` (3.0).
pub fn new(s: &Settings) -> Result<Arc<dyn Detector>, DetectError> {
    s.only(&["window", "min_growth", "min_z"])?;
    Ok(Arc::new(NativeMemoryLeak {
        params: Params {
            window: s.duration("window", Duration::from_secs(60))?,
            min_growth: s.uint("min_growth", 8 << 20)?,
            min_z: s.float("min_z", 3.0)?,
        },
    }))
}

impl Detector for NativeMemoryLeak {
    fn name(&self) -> &'static str {
        NAME
    }

    fn layer(&self) -> Layer {
        Layer::Resource
    }

    fn kinds(&self) -> Vec<Kind> {
        vec![Kind::NATIVE_MEMORY_LEAK]
    }

    fn interval(&self) -> Duration {
        Duration::from_secs(2)
    }

    /// Only reads the eBPF object's counters and /proc: costs the target nothing, so a busy target
    /// does not slow its checks down.
    fn backs_off_when_busy(&self) -> bool {
        false
    }

    fn watch(&self, target: &TargetInfo) -> Result<Option<Box<dyn Watch>>, DetectError> {
        let Some(session) = join_session(NAME, target, FEAT_MEMORY)? else {
            return Ok(None);
        };
        Ok(Some(Box::new(NativeWatch {
            pid: target.id.pid,
            params: self.params,
            session,
            tracker: memory::tracker(&target.process, target.id.start_ticks),
            symbols: NativeSymbolizer::new(),
            threads: Series::new(128),
            epoch: std::time::Instant::now(),
            location: None,
        })))
    }
}

struct NativeWatch {
    pid: u32,
    params: Params,
    session: Membership,
    tracker: Arc<Mutex<MemoryTracker>>,
    symbols: NativeSymbolizer,
    threads: Series,
    epoch: std::time::Instant,
    /// Where it was first reported (kept stable).
    location: Option<Location>,
}

impl Watch for NativeWatch {
    fn check(&mut self, cx: &CheckContext<'_>) -> Result<Vec<Finding>, DetectError> {
        let session = self.session.clone();
        let tracker = self.tracker.clone();
        let mut tracker = tracker.lock().unwrap_or_else(|e| e.into_inner());
        tracker
            .update(
                &session,
                Duration::from_millis(1500),
                Duration::from_secs(10),
            )
            .map_err(|e| err(NAME, "read the eBPF maps", e))?;
        let t = self.epoch.elapsed().as_secs_f64();
        if let Ok(tids) = crate::procinfo::thread_ids(self.pid) {
            self.threads.push(t, tids.len() as f64);
        }
        let window = self.params.window.as_secs_f64();
        let rule = Rule {
            min_points: 5,
            min_span: 8.0,
            min_z: self.params.min_z,
            min_net: self.params.min_growth as f64,
            min_late_share: 0.25,
        };
        let Some(rss) = trend::analyze(&tracker.rss.window(window)) else {
            return Ok(Vec::new());
        };
        if !rule.steady(&rss) {
            self.location = None;
            return Ok(Vec::new());
        }
        let arenas = trend::analyze(&tracker.arenas.window(window));
        let arena_rate = arenas.map(|a| a.slope.max(0.0)).unwrap_or(0.0);
        if arena_rate * 4.0 >= rss.slope {
            return Ok(Vec::new());
        }
        let mem = MemParams {
            window: self.params.window,
            min_entries: 30,
            min_z: self.params.min_z,
            rescan: Duration::from_secs(10),
            watch_hits: 0,
            max_findings: 0,
            min_heap_growth: 0,
        };
        if tracker
            .heap
            .as_ref()
            .is_some_and(|h| !growing(h.containers(), &mem).is_empty())
        {
            return Ok(Vec::new());
        }
        let thread_rule = Rule {
            min_net: 4.0,
            ..rule
        };
        if trend::analyze(&self.threads.window(window)).is_some_and(|t| thread_rule.steady(&t)) {
            return Ok(Vec::new());
        }
        // Where the pages were first written: Python line, and native code.
        let mut by_site: HashMap<Location, (u64, Vec<Location>)> = HashMap::new();
        let mut by_ip: HashMap<u64, u64> = HashMap::new();
        let mut total = 0u64;
        for g in tracker.growth_since(window) {
            total += g.bytes;
            *by_ip.entry(g.ip).or_default() += g.bytes;
            if g.unsampled {
                continue;
            }
            let stack = sites::locations(&g.frames);
            if let Some((loc, _)) = sites::site(&stack, "") {
                let e = by_site.entry(loc).or_insert((0, stack));
                e.0 += g.bytes;
            }
        }
        let top = by_site
            .into_iter()
            .max_by(|a, b| a.1.0.cmp(&b.1.0).then(b.0.cmp(&a.0)));
        let mut ips: Vec<(u64, u64)> = by_ip.into_iter().collect();
        ips.sort_by_key(|i| std::cmp::Reverse(i.1));
        self.symbols.refresh(self.pid);
        let mut natives: Vec<(native::NativeFrame, u64)> = Vec::new();
        for (ip, bytes) in ips.into_iter().take(16) {
            let f = self.symbols.symbolize(self.pid, ip);
            match natives.iter_mut().find(|(n, _)| *n == f) {
                Some((_, b)) => *b += bytes,
                None => natives.push((f, bytes)),
            }
        }
        natives.sort_by_key(|n| std::cmp::Reverse(n.1));
        let mut libraries: HashMap<String, u64> = HashMap::new();
        for (f, b) in &natives {
            *libraries.entry(f.library.clone()).or_default() += b;
        }
        let location = match (&self.location, &top) {
            (Some(l), _) => l.clone(),
            (None, Some((l, _))) => l.clone(),
            (None, None) => Location::new("<native>", "<no Python frame>", 0),
        };
        self.location = Some(location.clone());
        let severity = if rss.slope >= 1_048_576.0 {
            Severity::High
        } else if rss.slope >= 65_536.0 {
            Severity::Medium
        } else {
            Severity::Low
        };
        let native_label = natives
            .first()
            .map(|(n, _)| format!(", first written by {}", n.label()))
            .unwrap_or_default();
        let mut f = Finding::new(
            Layer::Resource,
            Kind::NATIVE_MEMORY_LEAK,
            severity,
            trend::confidence(&rss) * 0.9,
            format!(
                "resident memory grows by {}/s while the Python heap grows by {}/s; \
                 new memory is written under {}{}",
                human_bytes(rss.slope),
                human_bytes(arena_rate),
                sites::short(&location),
                native_label
            ),
            Some(cx.target.model()),
            location,
        );
        if let Some((_, (bytes, stack))) = &top {
            f.stacks.push(sites::stack(
                format!("writes {} of the new pages", human_bytes(*bytes as f64)),
                0,
                stack.clone(),
            ));
        }
        for (n, b) in natives.iter().take(3) {
            if native::is_interpreter(&n.library) {
                continue;
            }
            f.related.push(Related {
                file: n.library.clone(),
                function: n.function.clone(),
                line: 0,
                role: format!(
                    "native code that first wrote {}% of the new pages",
                    b * 100 / total.max(1)
                ),
            });
        }
        f.evidence = json!({
            "resident_bytes_per_second": round(rss.slope, 0),
            "python_heap_bytes_per_second": round(arena_rate, 0),
            "window_seconds": round(rss.span, 1),
            "trend_z": round(rss.z, 2),
            "resident_over_time": tracker.rss.window(window).iter().rev().take(20).rev()
                .map(|(t, v)| json!([round(*t, 1), *v as u64])).collect::<Vec<_>>(),
            "new_pages_by_native_code": natives.iter().take(8).map(|(n, b)| json!({
                "function": n.function, "library": n.library,
                "share": round(*b as f64 / total.max(1) as f64, 3),
            })).collect::<Vec<_>>(),
            "new_pages_by_library": libraries.iter().map(|(l, b)| json!({
                "library": l, "share": round(*b as f64 / total.max(1) as f64, 3),
                "interpreter": native::is_interpreter(l), "libc": native::is_libc(l),
            })).collect::<Vec<_>>(),
        });
        Ok(vec![f])
    }
}
