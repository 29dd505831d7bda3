//! `gc_pause`: the cyclic garbage collector stopping the process.
//!
//! The shared `resource` object runs a per-CPU clock (1 kHz) that reads
//! the sampled process's `gcstate->collecting` flag: consecutive samples
//! inside a collection are one pause, timed to the sampling period, and
//! the Python stack of the thread sampled first is where the collection
//! was triggered (the allocation that pushed generation 0 over its
//! threshold; on 3.12+ the next bytecode boundary after it). The counters
//! `generation_stats[i].collections` read before and after tell which
//! generation ran. This works on every build, including Debian's static
//! LTO 3.11, whose `gc_collect_main` has no symbol to probe. Collections
//! shorter than a sampling period are not timed individually; the
//! per-generation counters (read from the interpreter each check) count
//! them all.
//!
//! A finding is reported when a pause reaches `min_pause` or collections
//! take at least `min_share` of the process's on-CPU samples over the
//! window; it names the allocation site that triggers the longest pauses.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use pymedic_common::resource::{FEAT_GC, FEAT_GC_PRE, GC_GENERATIONS};
use pymedic_model::{Finding, Kind, Layer, Location, Severity};
use pymedic_python::memory::{LiveMemory, ProcessMemory};
use serde_json::json;

use super::fd_leak::{Membership, err, join_session, round};
use super::{CheckContext, DetectError, Detector, Settings, Watch};
use crate::engine::targets::TargetInfo;
use crate::resource::session::{self, PauseView};
use crate::resource::sites;

const NAME: &str = "gc_pause";

#[derive(Clone, Copy, Debug)]
struct Params {
    window: Duration,
    min_pause: Duration,
    min_share: f64,
}

pub struct GcPause {
    params: Params,
}

/// `[detectors.gc_pause]`: `interval` (2s), `window` (60s), `min_pause`
/// (50ms), `min_share` (0.1).
pub fn new(s: &Settings) -> Result<Arc<dyn Detector>, DetectError> {
    s.only(&["window", "min_pause", "min_share"])?;
    Ok(Arc::new(GcPause {
        params: Params {
            window: s.duration("window", Duration::from_secs(60))?,
            min_pause: s.duration("min_pause", Duration::from_millis(50))?,
            min_share: s.float("min_share", 0.1)?,
        },
    }))
}

impl Detector for GcPause {
    fn name(&self) -> &'static str {
        NAME
    }

    fn layer(&self) -> Layer {
        Layer::Resource
    }

    fn kinds(&self) -> Vec<Kind> {
        vec![Kind::GC_PAUSE]
    }

    fn interval(&self) -> Duration {
        Duration::from_secs(2)
    }

    /// Only reads the eBPF object's counters and six words of GC statistics: costs the target nothing, so a busy target
    /// does not slow its checks down.
    fn backs_off_when_busy(&self) -> bool {
        false
    }

    fn watch(&self, target: &TargetInfo) -> Result<Option<Box<dyn Watch>>, DetectError> {
        let Some(state) = session::gc_state_addr(&target.process) else {
            tracing::info!(pid = target.id.pid, "gc_pause: no collector state to read");
            return Ok(None);
        };
        // 3.12+ runs a collection at the next eval-breaker check, not in
        // the allocation that scheduled it: remember what ran before.
        let v = &target.process.version;
        let deferred = (v.major, v.minor) >= (3, 12);
        let features = if deferred {
            FEAT_GC | FEAT_GC_PRE
        } else {
            FEAT_GC
        };
        let Some(session) = join_session(NAME, target, features)? else {
            return Ok(None);
        };
        let layout = pymedic_python::layout::for_version(
            target.process.version.major,
            target.process.version.minor,
        )
        .ok_or_else(|| err(NAME, "find the interpreter layout", "unsupported version"))?;
        Ok(Some(Box::new(GcWatch {
            pid: target.id.pid,
            params: self.params,
            session,
            mem: LiveMemory::new(target.id.pid),
            state,
            layout,
            epoch: std::time::Instant::now(),
            pauses: VecDeque::new(),
            counters: VecDeque::new(),
            location: None,
            deferred,
        })))
    }
}

/// Cumulative collector counters at one time.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    t: f64,
    collections: [u64; GC_GENERATIONS],
    collected: [u64; GC_GENERATIONS],
    samples: u64,
    samples_collecting: u64,
}

struct GcWatch {
    pid: u32,
    params: Params,
    session: Membership,
    mem: LiveMemory,
    state: u64,
    layout: &'static pymedic_python::Layout,
    epoch: std::time::Instant,
    pauses: VecDeque<(f64, PauseView)>,
    counters: VecDeque<Counters>,
    location: Option<Location>,
    /// Collections run at eval-breaker checks (3.12+).
    deferred: bool,
}

/// The generation a pause collected (the oldest whose counter moved).
fn generation(p: &PauseView) -> Option<usize> {
    (0..GC_GENERATIONS).rev().find(|&g| p.collections[g] > 0)
}

impl GcWatch {
    fn read_counters(&self, t: f64, samples: u64, collecting: u64) -> Counters {
        let g = &self.layout.gc;
        let mut c = Counters {
            t,
            samples,
            samples_collecting: collecting,
            ..Counters::default()
        };
        for i in 0..GC_GENERATIONS {
            let base = self.state + u64::from(g.stats) + i as u64 * u64::from(g.stats_size);
            c.collections[i] = self
                .mem
                .read_u64(base + u64::from(g.stats_collections))
                .unwrap_or(0);
            c.collected[i] = self
                .mem
                .read_u64(base + u64::from(g.stats_collected))
                .unwrap_or(0);
        }
        c
    }
}

impl Watch for GcWatch {
    fn check(&mut self, cx: &CheckContext<'_>) -> Result<Vec<Finding>, DetectError> {
        let t = self.epoch.elapsed().as_secs_f64();
        let (new, stats) = {
            let mut s = self.session.lock().unwrap_or_else(|e| e.into_inner());
            s.poll().map_err(|e| err(NAME, "read the eBPF maps", e))?;
            (s.take_pauses(self.pid), s.proc_stats(self.pid))
        };
        self.pauses.extend(new.into_iter().map(|p| (t, p)));
        let window = self.params.window.as_secs_f64();
        while self.pauses.front().is_some_and(|(t0, _)| t - t0 > window) {
            self.pauses.pop_front();
        }
        let now = self.read_counters(t, stats.gc_samples, stats.gc_samples_collecting);
        self.counters.push_back(now);
        while self.counters.len() > 2 && self.counters.front().is_some_and(|c| t - c.t > window) {
            self.counters.pop_front();
        }
        let first = *self.counters.front().expect("pushed above");
        let span = (now.t - first.t).max(1e-3);
        let samples = now.samples.saturating_sub(first.samples);
        let in_gc = now
            .samples_collecting
            .saturating_sub(first.samples_collecting);
        let share = if samples >= 50 {
            in_gc as f64 / samples as f64
        } else {
            0.0
        };
        let longest = self
            .pauses
            .iter()
            .map(|(_, p)| p.duration)
            .max()
            .unwrap_or_default();
        if longest < self.params.min_pause && share < self.params.min_share {
            self.location = None;
            return Ok(Vec::new());
        }
        // The trigger site: the application line of the pauses' stacks,
        // one vote per pause (ties go to the longer pauses). Every
        // collection is triggered the same way whatever its length, and on
        // 3.12+ each "before" sample is a noisy hint, so many votes beat
        // the few long (full) collections deciding alone.
        let mut weights: Vec<(Location, Vec<Location>, Duration, u32)> = Vec::new();
        let mut ran_at: Vec<(Location, Duration)> = Vec::new();
        for (_, p) in &self.pauses {
            let during = sites::locations(&p.frames);
            if let Some((loc, _)) = sites::site(&during, "") {
                match ran_at.iter_mut().find(|w| w.0 == loc) {
                    Some(w) => w.1 += p.duration,
                    None => ran_at.push((loc, p.duration)),
                }
            }
            // On 3.12+ the allocation that scheduled it ran just before.
            let stack = if self.deferred && !p.before.is_empty() {
                sites::locations(&p.before)
            } else {
                during
            };
            let Some((loc, _)) = sites::site(&stack, "") else {
                continue;
            };
            match weights.iter_mut().find(|w| w.0 == loc) {
                Some(w) => {
                    w.2 += p.duration;
                    w.3 += 1;
                }
                None => weights.push((loc, stack, p.duration, 1)),
            }
        }
        weights.sort_by(|a, b| b.3.cmp(&a.3).then(b.2.cmp(&a.2)));
        ran_at.sort_by_key(|r| std::cmp::Reverse(r.1));
        let location = match (&self.location, weights.first()) {
            (Some(l), _) => l.clone(),
            (None, Some(w)) => {
                // Kept stable once a few pauses agree (or the trigger is
                // exact: before 3.12 the collection runs inside the
                // allocation that triggers it).
                if !self.deferred || w.3 >= 5 {
                    self.location = Some(w.0.clone());
                }
                w.0.clone()
            }
            (None, None) => Location::new("<gc>", "<collection not sampled>", 0),
        };
        let long: Vec<&PauseView> = self
            .pauses
            .iter()
            .map(|(_, p)| p)
            .filter(|p| p.duration >= self.params.min_pause)
            .collect();
        let gen_of_longest = self
            .pauses
            .iter()
            .max_by_key(|(_, p)| p.duration)
            .and_then(|(_, p)| generation(p));
        let rates: Vec<f64> = (0..GC_GENERATIONS)
            .map(|g| now.collections[g].saturating_sub(first.collections[g]) as f64 / span)
            .collect();
        let severity = if longest >= Duration::from_millis(200) || share >= 0.25 {
            Severity::High
        } else if longest >= self.params.min_pause {
            Severity::Medium
        } else {
            Severity::Low
        };
        let mut title = format!(
            "garbage collection pauses the process for up to {} ms",
            longest.as_millis()
        );
        if let Some(g) = gen_of_longest {
            title.push_str(&format!(" (generation {g})"));
        }
        title.push_str(&format!(
            ", {} pause(s) ≥ {} ms in {:.0} s, {:.0}% of its CPU samples in GC; triggered at {}",
            long.len(),
            self.params.min_pause.as_millis(),
            span,
            share * 100.0,
            sites::short(&location)
        ));
        let confidence = if long.len() >= 2 || share >= self.params.min_share {
            0.9
        } else {
            0.7
        };
        let mut f = Finding::new(
            Layer::Resource,
            Kind::GC_PAUSE,
            severity,
            confidence,
            title,
            Some(cx.target.model()),
            location,
        );
        if self.deferred
            && let Some((l, _)) = ran_at.first()
            && *l != f.location
        {
            f.related.push(pymedic_model::Related::new(
                l,
                "the collections ran here (the next eval-breaker check after the allocation)",
            ));
        }
        for (_, stack, d, n) in weights.iter().take(3) {
            f.stacks.push(sites::stack(
                format!("triggered {n} pause(s), {} ms", d.as_millis()),
                0,
                stack.clone(),
            ));
        }
        let mut longest_pauses: Vec<&PauseView> = self.pauses.iter().map(|(_, p)| p).collect();
        longest_pauses.sort_by_key(|p| std::cmp::Reverse(p.duration));
        f.evidence = json!({
            "longest_pause_ms": longest.as_millis() as u64,
            "pauses": longest_pauses.iter().take(10).map(|p| json!({
                "ms": p.duration.as_millis() as u64,
                "generation": generation(p),
                "tid": p.tid,
            })).collect::<Vec<_>>(),
            "pauses_over_min": long.len(),
            "gc_share_of_cpu_samples": round(share, 3),
            "collections_per_second": rates.iter().map(|r| round(*r, 2)).collect::<Vec<_>>(),
            "collected_per_second": (0..GC_GENERATIONS)
                .map(|g| round(now.collected[g].saturating_sub(first.collected[g]) as f64 / span, 1))
                .collect::<Vec<_>>(),
            "window_seconds": round(span, 1),
            "sampling": "1 kHz per CPU; pauses shorter than 1 ms are counted, not timed",
            "trigger": if self.deferred {
                "the process's last sample before each pause (3.12+ defers collections to the next eval-breaker check)"
            } else {
                "the stack the collection ran on: the allocation that crossed the threshold"
            },
        });
        Ok(vec![f])
    }
}
