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

    /// Samples the heap's containers at `t`, walking the heap's roots again
    /// every `rescan`. A walk reads the whole heap: it must not hold the
    /// resource session, or every other target's checks wait for it.
    fn sample_heap(&mut self, t: f64, rescan: Duration) {
        if let Some(h) = self.heap.as_mut() {
            if self.last_scan.is_none_or(|s| s.elapsed() >= rescan) {
                self.last_scan = Some(Instant::now());
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
