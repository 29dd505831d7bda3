//! One process's memory over time, shared by `memory_leak` and
//! `native_memory_leak`: resident bytes, bytes in pymalloc arenas, the
//! heap's containers ([`HeapScanner`]), and where the heap grew (the
//! `resource` object's first-touch page faults, by stack and faulting
//! instruction, windowed).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use pymedic_python::PythonProcess;

use super::ResourceError;
use super::heap::HeapScanner;
use super::session::{GrowthView, Session};
use super::trend::Series;
use crate::profile::model::Frame;

/// Growth of one (stack, instruction) during one update.
#[derive(Clone, Debug)]
pub struct GrowthDelta {
    pub frames: Arc<Vec<Frame>>,
    pub ip: u64,
    pub bytes: u64,
    /// The stack was not captured (per-process capture budget spent).
    pub unsampled: bool,
}

/// See the module docs.
pub struct MemoryTracker {
    pub pid: u32,
    epoch: Instant,
    last_update: Option<Instant>,
    last_scan: Option<Instant>,
    /// The smallest resident size seen since the last heap walk: growth is
    /// measured from it, so memory freed and taken again is not growth.
    rss_since_scan: Option<f64>,
    /// Heap walks in a row that found the process no bigger.
    quiet_walks: u32,
    pub heap: Option<HeapScanner>,
    heap_error: Option<String>,
    /// Resident bytes.
    pub rss: Series,
    /// Bytes in pymalloc arenas mapped since tracking began, minus unmapped.
    pub arenas: Series,
    /// First-touch faults since tracking began (pages).
    pub faults: Series,
    prev_growth: HashMap<(u64, u64), u64>,
    /// Growth per update: (seconds, deltas).
    growth: VecDeque<(f64, Vec<GrowthDelta>)>,
}

/// Resident growth since the last heap walk that makes the next one due
/// after `rescan`.
const RESCAN_GROWTH: f64 = (256 << 10) as f64;

/// Without such growth, the gap between walks doubles up to `rescan` times
/// this.
const QUIET_RESCAN_FACTOR: u32 = 30;

/// Whether the heap's roots should be walked again, `quiet` walks in a row
/// having found the process no bigger. A walk only finds new containers:
/// the ones already found are sampled at every update, so a leak in them
/// is seen without one. A container that appears later and leaks makes the
/// process grow, which makes the walk due after `rescan` (10 s by default).
/// A process that does not grow is walked after 10, 20, 40 … s, then every
/// `rescan` × 30 (5 min). Walking each of 25 targets every 10 s was a third
/// of the agent's CPU (about 5 % of a core).
fn walk_due(since_last: Option<Duration>, rescan: Duration, grown: bool, quiet: u32) -> bool {
    let quiet_gap = rescan * (1u32 << quiet.min(5)).min(QUIET_RESCAN_FACTOR);
    match since_last {
        None => true,
        Some(e) => e >= rescan && (grown || e >= quiet_gap),
    }
}

/// Trackers by process identity (pid, start ticks), weakly held.
type Trackers = Vec<((u32, u64), Weak<Mutex<MemoryTracker>>)>;

static TRACKERS: Mutex<Trackers> = Mutex::new(Vec::new());

/// The tracker of process `(pid, start_ticks)`, shared by every detector
/// watching it.
pub fn tracker(p: &PythonProcess, start_ticks: u64) -> Arc<Mutex<MemoryTracker>> {
    let mut all = TRACKERS.lock().unwrap_or_else(|e| e.into_inner());
    all.retain(|(_, w)| w.strong_count() > 0);
    if let Some((_, w)) = all.iter().find(|(k, _)| *k == (p.pid, start_ticks))
        && let Some(t) = w.upgrade()
    {
        return t;
    }
    let t = Arc::new(Mutex::new(MemoryTracker::new(p)));
    all.push(((p.pid, start_ticks), Arc::downgrade(&t)));
    t
}

impl MemoryTracker {
    fn new(p: &PythonProcess) -> MemoryTracker {
        let (heap, heap_error) = match HeapScanner::new(p) {
            Ok(h) => (Some(h), None),
            Err(e) => (None, Some(e.to_string())),
        };
        MemoryTracker {
            pid: p.pid,
            epoch: Instant::now(),
            last_update: None,
            last_scan: None,
            rss_since_scan: None,
            quiet_walks: 0,
            heap,
            heap_error,
            rss: Series::new(256),
            arenas: Series::new(256),
            faults: Series::new(256),
            prev_growth: HashMap::new(),
            growth: VecDeque::new(),
        }
    }

    /// Seconds since tracking began.
    pub fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    /// Why the heap cannot be read, if it cannot.
    pub fn heap_error(&self) -> Option<&str> {
        self.heap_error.as_deref()
    }

    /// One sample: polls `session` (shared by every target), takes the
    /// counters under its lock, then walks the heap after releasing it.
    pub fn update(
        &mut self,
        session: &Mutex<Session>,
        min_interval: Duration,
        rescan: Duration,
    ) -> Result<(), ResourceError> {
        let sampled = {
            let mut session = session.lock().unwrap_or_else(|e| e.into_inner());
            session.poll()?;
            self.sample_counters(&session, min_interval)
        };
        if let Some(t) = sampled {
            self.sample_heap(t, rescan);
        }
        Ok(())
    }

    /// Samples the counters (at most every `min_interval`): resident size,
    /// and from `session` (polled, and shared by every target: hold its
    /// lock only for this) the arenas, faults and allocation growth.
    /// Returns the sample's time when one was taken.
    fn sample_counters(&mut self, session: &Session, min_interval: Duration) -> Option<f64> {
        if self.last_update.is_some_and(|t| t.elapsed() < min_interval) {
            return None;
        }
        self.last_update = Some(Instant::now());
        let t = self.now();
        if let Some(rss) = resident_bytes(self.pid) {
            self.rss.push(t, rss as f64);
        }
        let s = session.proc_stats(self.pid);
        self.arenas
            .push(t, s.arena_mapped as f64 - s.arena_unmapped as f64);
        self.faults.push(t, s.faults as f64);
        self.take_growth(t, session.growth(self.pid));
        Some(t)
    }

    /// Samples the heap's containers at `t` (cheap: the containers found by
    /// the last walk), walking the heap's roots again when it is due. A walk
    /// reads the whole heap: it must not hold the resource session, or
    /// every other target's checks wait for it.
    fn sample_heap(&mut self, t: f64, rescan: Duration) {
        let rss = self.rss.last().map(|(_, v)| v);
        if let (Some(r), Some(low)) = (rss, self.rss_since_scan) {
            self.rss_since_scan = Some(low.min(r));
        }
        if let Some(h) = self.heap.as_mut() {
            let grown = match (rss, self.rss_since_scan) {
                (Some(r), Some(low)) => r - low >= RESCAN_GROWTH,
                _ => true,
            };
            let since = self.last_scan.map(|s| s.elapsed());
            if walk_due(since, rescan, grown, self.quiet_walks) {
                self.quiet_walks = if grown || since.is_none() {
                    0
                } else {
                    self.quiet_walks.saturating_add(1)
                };
                self.last_scan = Some(Instant::now());
                self.rss_since_scan = rss;
                if let Err(e) = h.scan() {
                    tracing::debug!(pid = self.pid, "heap scan: {e}");
                }
            }
            h.sample(t);
        }
    }

    fn take_growth(&mut self, t: f64, views: &[GrowthView]) {
        let mut deltas = Vec::new();
        for v in views {
            let key = (v.stack_id, v.ip);
            let prev = self.prev_growth.get(&key).copied().unwrap_or(0);
            // A key trimmed from the kernel map restarts from zero.
            let d = if v.value.bytes >= prev {
                v.value.bytes - prev
            } else {
                v.value.bytes
            };
            self.prev_growth.insert(key, v.value.bytes);
            if d > 0 {
                deltas.push(GrowthDelta {
                    frames: v.frames.clone(),
                    ip: v.ip,
                    bytes: d,
                    unsampled: v.stack_id == pymedic_common::resource::STACK_UNSAMPLED,
                });
            }
        }
        self.growth.push_back((t, deltas));
        while self.growth.front().is_some_and(|(t0, _)| t - t0 > 600.0) {
            self.growth.pop_front();
        }
    }

    /// Growth deltas of the last `window` seconds.
    pub fn growth_since(&self, window: f64) -> impl Iterator<Item = &GrowthDelta> {
        let now = self.now();
        self.growth
            .iter()
            .filter(move |(t, _)| now - t <= window)
            .flat_map(|(_, d)| d.iter())
    }
}

/// Resident bytes of `pid` (`/proc/PID/statm`, field 2 × page size).
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_walks_follow_growth_and_back_off_when_quiet() {
        let rescan = Duration::from_secs(10);
        let s = Duration::from_secs;
        assert!(walk_due(None, rescan, false, 0), "the first sample walks");
        assert!(
            !walk_due(Some(s(5)), rescan, true, 0),
            "never sooner than rescan"
        );
        assert!(
            walk_due(Some(s(10)), rescan, true, 7),
            "growth: after rescan"
        );
        assert!(
            walk_due(Some(s(10)), rescan, false, 0),
            "first quiet gap: rescan"
        );
        assert!(!walk_due(Some(s(19)), rescan, false, 1));
        assert!(walk_due(Some(s(20)), rescan, false, 1), "then doubling");
        assert!(walk_due(Some(s(160)), rescan, false, 4));
        assert!(
            !walk_due(Some(s(299)), rescan, false, 9),
            "capped at rescan × 30"
        );
        assert!(walk_due(Some(s(300)), rescan, false, 9));
    }
}
