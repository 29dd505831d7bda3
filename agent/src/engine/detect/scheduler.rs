//! Runs every detector's checks on every target, within budgets.
//!
//! One task owns all per-target state; checks run on tokio's blocking pool,
//! at most `workers` at a time. Each (target, detector) pair is due every
//! `interval`, stretched so that one target's checks cost at most
//! `cpu_budget` of one core (a check costing `c` CPU seconds is spaced by at
//! least `c × detectors / cpu_budget`), doubled while the target is busy
//! (above `busy_threshold` cores) and after failures, up to `max_backoff`.
//! Results go out through a bounded channel: when the consumer (the store)
//! falls behind, checks wait instead of piling up.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pymedic_model::{Finding, Timestamp};
use tokio::sync::mpsc;

use super::registry::{Entry, Registry};
use super::{CheckContext, DetectError, Watch};
use crate::engine::targets::{TargetId, TargetInfo, alive};
use crate::engine::usage::{CpuSample, thread_cpu_ns};

/// What the scheduler produces.
#[derive(Debug)]
pub enum Output {
    /// One detector looked at one target and sees exactly `findings`.
    Pass {
        detector: &'static str,
        target: TargetId,
        findings: Vec<Finding>,
        at: Timestamp,
    },
    /// The target is gone (exited or deselected); resolve its findings.
    Gone { target: TargetId },
}

/// Tuning, from `[detect]`.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub cpu_budget: f64,
    pub busy_threshold: f64,
    pub max_backoff: Duration,
    pub workers: usize,
}

impl Default for Budget {
    fn default() -> Self {
        let d = crate::engine::config::DetectConfig::default();
        Budget {
            cpu_budget: d.cpu_budget,
            busy_threshold: d.busy_threshold,
            max_backoff: d.max_backoff.0,
            workers: d.workers,
        }
    }
}

/// Commands to the scheduler.
#[derive(Debug)]
pub enum Control {
    Add(Box<TargetInfo>),
    Remove(TargetId),
}

/// Per-target figures for `ListTargets`.
#[derive(Clone, Debug, Default)]
pub struct TargetStats {
    pub checks: u64,
    pub cpu_ns: u64,
    pub backing_off: bool,
}

pub type SharedStats = Arc<Mutex<HashMap<TargetId, TargetStats>>>;

struct Slot {
    det: usize,
    watch: Option<Box<dyn Watch>>,
    started: bool,
    running: bool,
    generation: u64,
    last_check: Option<Instant>,
    failures: u32,
}

/// How often a target's CPU use is read for the busy back-off.
const CPU_SAMPLE_EVERY: Duration = Duration::from_secs(1);

struct Target {
    info: Arc<TargetInfo>,
    slots: Vec<Slot>,
    cpu: Option<CpuSample>,
    /// Whether the target used more than the busy threshold between the
    /// last two CPU samples.
    busy: bool,
    busy_level: u32,
}

/// What a check hands back: the watch (to keep), whether it started, the
/// findings (`None`: the detector does not apply), the CPU time spent
/// starting the watch (not charged to the check's spacing), and when the
/// check proper started.
type CheckOutcome = (
    Option<Box<dyn Watch>>,
    bool,
    Result<Option<Vec<Finding>>, DetectError>,
    u64,
    Timestamp,
);

struct Done {
    target: TargetId,
    slot: usize,
    det: usize,
    watch: Option<Box<dyn Watch>>,
    started: bool,
    result: Result<Option<Vec<Finding>>, DetectError>,
    cost_ns: u64,
    setup_ns: u64,
    at: Timestamp,
    /// Wall time the check took, and how long after its due time it began.
    wall: Duration,
    late: Duration,
}

/// Heap entry: (due, generation, target, slot).
type Due = Reverse<(Instant, u64, TargetId, usize)>;

pub struct Scheduler {
    entries: Vec<Entry>,
    budget: Budget,
    targets: HashMap<TargetId, Target>,
    heap: BinaryHeap<Due>,
    running: usize,
    generation: u64,
    out: mpsc::Sender<Output>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    stats: SharedStats,
}

impl Scheduler {
    pub fn new(registry: &Registry, budget: Budget, out: mpsc::Sender<Output>) -> Scheduler {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Scheduler {
            entries: registry.entries().to_vec(),
            budget,
            targets: HashMap::new(),
            heap: BinaryHeap::new(),
            running: 0,
            generation: 0,
            out,
            done_tx,
            done_rx,
            stats: SharedStats::default(),
        }
    }

    /// Per-target figures, updated as checks finish.
    pub fn stats(&self) -> SharedStats {
        self.stats.clone()
    }

    /// Runs until `control` closes; then waits for running checks.
    pub async fn run(mut self, mut control: mpsc::Receiver<Control>) {
        let mut open = true;
        while open || self.running > 0 {
            let next_due = self.heap.peek().map(|Reverse((t, ..))| *t);
            let can_dispatch = open && next_due.is_some() && self.running < self.budget.workers;
            let sleep_until =
                next_due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                c = control.recv(), if open => match c {
                    Some(Control::Add(info)) => self.add(*info),
                    Some(Control::Remove(id)) => self.remove(id).await,
                    None => open = false,
                },
                Some(done) = self.done_rx.recv() => self.finish(done).await,
                _ = tokio::time::sleep_until(sleep_until.into()), if can_dispatch => self.dispatch(),
            }
        }
    }

    fn add(&mut self, info: TargetInfo) {
        if self.targets.contains_key(&info.id) {
            return;
        }
        let id = info.id;
        let now = Instant::now();
        let slots = (0..self.entries.len())
            .map(|det| Slot {
                det,
                watch: None,
                started: false,
                running: false,
                generation: 0,
                last_check: None,
                failures: 0,
            })
            .collect();
        self.targets.insert(
            id,
            Target {
                cpu: CpuSample::take(id.pid),
                busy: false,
                info: Arc::new(info),
                slots,
                busy_level: 0,
            },
        );
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, TargetStats::default());
        for slot in 0..self.entries.len() {
            // Spread first checks over a few milliseconds.
            self.schedule(id, slot, now + Duration::from_millis(slot as u64 * 5));
        }
    }

    async fn remove(&mut self, id: TargetId) {
        if self.targets.remove(&id).is_some() {
            self.stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            let _ = self.out.send(Output::Gone { target: id }).await;
        }
    }

    fn schedule(&mut self, id: TargetId, slot: usize, at: Instant) {
        self.generation += 1;
        let generation = self.generation;
        if let Some(s) = self
            .targets
            .get_mut(&id)
            .and_then(|t| t.slots.get_mut(slot))
        {
            s.generation = generation;
            self.heap.push(Reverse((at, generation, id, slot)));
        }
    }

    fn dispatch(&mut self) {
        let now = Instant::now();
        while self.running < self.budget.workers {
            let Some(Reverse((due, generation, id, slot))) = self.heap.peek().copied() else {
                break;
            };
            if due > now {
                break;
            }
            self.heap.pop();
            let Some(t) = self.targets.get_mut(&id) else {
                continue;
            };
            let info = t.info.clone();
            let Some(s) = t.slots.get_mut(slot) else {
                continue;
            };
            if s.generation != generation || s.running {
                continue;
            }
            s.running = true;
            let since_last = s
                .last_check
                .map(|l| now.duration_since(l))
                .unwrap_or_default();
            s.last_check = Some(now);
            let watch = s.watch.take();
            let started = s.started;
            let det = s.det;
            let entry = self.entries[det].clone();
            let done_tx = self.done_tx.clone();
            self.running += 1;
            let late = now.saturating_duration_since(due);
            tokio::task::spawn_blocking(move || {
                let w0 = Instant::now();
                let t0 = thread_cpu_ns();
                let (watch, started, result, setup_ns, at) =
                    run_check(&entry, &info, watch, started, since_last);
                // Starting a watch (loading eBPF, parsing ELF) happens once:
                // only the check itself spaces the next one.
                let cost_ns = thread_cpu_ns().saturating_sub(t0).saturating_sub(setup_ns);
                let _ = done_tx.send(Done {
                    target: id,
                    slot,
                    det,
                    watch,
                    started,
                    result,
                    cost_ns,
                    setup_ns,
                    at,
                    wall: w0.elapsed(),
                    late,
                });
            });
        }
    }

    async fn finish(&mut self, done: Done) {
        self.running -= 1;
        let entry = self.entries[done.det].clone();
        entry.stats.checks.fetch_add(1, Ordering::Relaxed);
        entry
            .stats
            .cpu_ns
            .fetch_add(done.cost_ns + done.setup_ns, Ordering::Relaxed);
        let Some(t) = self.targets.get_mut(&done.target) else {
            return; // removed while the check ran: drop its result
        };
        let id = done.target;
        let n_det = t.slots.len().max(1) as f64;
        // Busy targets back off; calm ones recover. The target's CPU is
        // read at most every CPU_SAMPLE_EVERY (a /proc read per check of
        // every detector was 5-9 % of the agent's own CPU); each check
        // still moves the level by the latest verdict.
        if t.cpu.is_none_or(|c| c.age() >= CPU_SAMPLE_EVERY)
            && let Some(now) = CpuSample::take(id.pid)
        {
            t.busy = t
                .cpu
                .is_some_and(|prev| now.cores_since(&prev) > self.budget.busy_threshold);
            t.cpu = Some(now);
        }
        if t.busy {
            t.busy_level = (t.busy_level + 1).min(16);
        } else {
            t.busy_level = t.busy_level.saturating_sub(1);
        }
        let busy_level = t.busy_level;
        {
            let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
            let st = stats.entry(id).or_default();
            st.checks += 1;
            st.cpu_ns += done.cost_ns + done.setup_ns;
            st.backing_off = busy_level > 0;
        }
        let Some(s) = t.slots.get_mut(done.slot) else {
            return;
        };
        s.running = false;
        s.watch = done.watch;
        s.started = done.started;
        let mut retire = false;
        match done.result {
            Ok(Some(findings)) => {
                s.failures = 0;
                // Waits when the store is behind: back-pressure.
                let _ = self
                    .out
                    .send(Output::Pass {
                        detector: entry.detector.name(),
                        target: id,
                        findings,
                        at: done.at,
                    })
                    .await;
            }
            Ok(None) => retire = true,
            Err(DetectError::Gone { .. }) => {
                if !alive(id) {
                    self.remove(id).await;
                    return;
                }
                s.failures += 1;
            }
            Err(e) => {
                s.failures += 1;
                if s.failures == 1 || s.failures.is_power_of_two() {
                    tracing::warn!(
                        target_pid = id.pid,
                        detector = entry.detector.name(),
                        failures = s.failures,
                        "check failed: {e}"
                    );
                }
                entry.stats.record_error(&e);
            }
        }
        if retire {
            tracing::debug!(
                target_pid = id.pid,
                detector = entry.detector.name(),
                "detector does not apply to this target"
            );
            return;
        }
        let failures = s.failures;
        let delay = next_delay(
            entry.interval,
            done.cost_ns,
            n_det,
            // Detectors that only read the kernel's aggregates do not touch
            // the target, so a busy target does not slow them down.
            if entry.detector.backs_off_when_busy() {
                busy_level
            } else {
                0
            } + failures.min(16),
            &self.budget,
        );
        tracing::trace!(
            target_pid = id.pid,
            detector = entry.detector.name(),
            cost_ms = done.cost_ns as f64 / 1e6,
            setup_ms = done.setup_ns as f64 / 1e6,
            wall_ms = done.wall.as_secs_f64() * 1e3,
            late_ms = done.late.as_secs_f64() * 1e3,
            failures,
            next_in = ?delay,
            "check done"
        );
        self.schedule(id, done.slot, Instant::now() + delay);
    }
}

fn run_check(
    entry: &Entry,
    info: &TargetInfo,
    mut watch: Option<Box<dyn Watch>>,
    mut started: bool,
    since_last: Duration,
) -> CheckOutcome {
    let mut setup_ns = 0;
    if !started {
        let t0 = thread_cpu_ns();
        let made = entry.detector.watch(info);
        setup_ns = thread_cpu_ns().saturating_sub(t0);
        match made {
            Ok(Some(w)) => {
                watch = Some(w);
                started = true;
            }
            Ok(None) => return (None, false, Ok(None), setup_ns, pymedic_model::now()),
            Err(e) => return (None, false, Err(e), setup_ns, pymedic_model::now()),
        }
    }
    // Findings are stamped when the check proper starts (after a slow
    // watch start-up such as loading eBPF).
    let now = pymedic_model::now();
    let Some(w) = watch.as_mut() else {
        return (None, started, Ok(None), setup_ns, now);
    };
    let cx = CheckContext {
        target: info,
        now,
        since_last,
    };
    let result = w.check(&cx).map(Some);
    (watch, started, result, setup_ns, now)
}

/// The delay until a slot's next check.
pub fn next_delay(
    interval: Duration,
    cost_ns: u64,
    detectors: f64,
    backoff: u32,
    b: &Budget,
) -> Duration {
    let budget_spacing = Duration::from_secs_f64(cost_ns as f64 / 1e9 * detectors / b.cpu_budget);
    let base = interval.max(budget_spacing);
    if backoff == 0 {
        return base;
    }
    let factor = 2u32.saturating_pow(backoff.min(16));
    base.saturating_mul(factor).min(b.max_backoff.max(base))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::detect::Detector;
    use pymedic_model::{Kind, Layer};
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    /// Burns `burn` of CPU per check; `applies` false = not applicable.
    struct Burner {
        burn: Duration,
        applies: bool,
        watches: Arc<AtomicU64>,
    }

    struct BurnWatch(Duration);

    impl Detector for Burner {
        fn name(&self) -> &'static str {
            "burner"
        }
        fn layer(&self) -> Layer {
            Layer::Behavioral
        }
        fn kinds(&self) -> Vec<Kind> {
            vec![]
        }
        fn interval(&self) -> Duration {
            Duration::from_millis(10)
        }
        fn watch(&self, _: &TargetInfo) -> Result<Option<Box<dyn Watch>>, DetectError> {
            self.watches.fetch_add(1, Relaxed);
            Ok(self
                .applies
                .then(|| Box::new(BurnWatch(self.burn)) as Box<dyn Watch>))
        }
    }

    impl Watch for BurnWatch {
        fn check(&mut self, _: &CheckContext<'_>) -> Result<Vec<Finding>, DetectError> {
            let t0 = thread_cpu_ns();
            while thread_cpu_ns() - t0 < self.0.as_nanos() as u64 {
                std::hint::black_box(0u64);
            }
            Ok(vec![])
        }
    }

    fn me() -> TargetInfo {
        let pid = std::process::id();
        TargetInfo {
            id: TargetId {
                pid,
                start_ticks: crate::procinfo::read(pid).unwrap().start_ticks,
            },
            process: pymedic_python::PythonProcess {
                pid,
                exe: String::new(),
                version: pymedic_python::Version::new(3, 12, Some(0)),
                build: pymedic_python::Build::Static,
                interpreter_file: String::new(),
                load_bias: 0,
                runtime_addr: 0,
            },
            cmdline: vec![],
            container: None,
            pod: None,
        }
    }

    async fn run_for(det: Burner, budget: Budget, dur: Duration) -> (u64, usize) {
        let mut reg = Registry::default();
        let d = Arc::new(det);
        reg.register(d.clone(), None);
        let (tx, mut rx) = mpsc::channel(16);
        let (ctl, ctl_rx) = mpsc::channel(4);
        let task = tokio::spawn(Scheduler::new(&reg, budget, tx).run(ctl_rx));
        ctl.send(Control::Add(Box::new(me()))).await.unwrap();
        let mut passes = 0;
        let end = tokio::time::Instant::now() + dur;
        while let Ok(Some(_)) = tokio::time::timeout_at(end, rx.recv()).await {
            passes += 1;
        }
        drop(ctl);
        while rx.recv().await.is_some() {}
        task.await.unwrap();
        (d.watches.load(Relaxed), passes)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn expensive_checks_are_spaced_by_the_cpu_budget() {
        let budget = Budget {
            cpu_budget: 0.05,
            ..Budget::default()
        };
        let burner = Burner {
            burn: Duration::from_millis(5),
            applies: true,
            watches: Arc::default(),
        };
        // 5 ms per check at a 5 % budget: one check per 100 ms at most,
        // although the interval asks for one per 10 ms.
        let (_, passes) = run_for(burner, budget, Duration::from_millis(1000)).await;
        assert!((5..=13).contains(&passes), "{passes} checks in 1 s");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_detector_that_does_not_apply_is_asked_once() {
        let burner = Burner {
            burn: Duration::ZERO,
            applies: false,
            watches: Arc::default(),
        };
        let (watches, passes) =
            run_for(burner, Budget::default(), Duration::from_millis(300)).await;
        assert_eq!((watches, passes), (1, 0));
    }

    #[test]
    fn delay_respects_budget_and_backoff() {
        let b = Budget {
            cpu_budget: 0.005,
            busy_threshold: 0.9,
            max_backoff: Duration::from_secs(60),
            workers: 2,
        };
        let i = Duration::from_secs(2);
        // Cheap check: the interval.
        assert_eq!(next_delay(i, 100_000, 1.0, 0, &b), i);
        // 50 ms of CPU with a 0.5 % budget: at least 10 s apart.
        assert_eq!(
            next_delay(i, 50_000_000, 1.0, 0, &b),
            Duration::from_secs(10)
        );
        // Two detectors share the budget.
        assert_eq!(
            next_delay(i, 50_000_000, 2.0, 0, &b),
            Duration::from_secs(20)
        );
        // Back-off doubles, capped.
        assert_eq!(next_delay(i, 0, 1.0, 1, &b), Duration::from_secs(4));
        assert_eq!(next_delay(i, 0, 1.0, 10, &b), Duration::from_secs(60));
    }
}
