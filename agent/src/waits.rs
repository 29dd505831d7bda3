//! The temporal detectors' shared sensor: the `waits` eBPF object
//! (`pymedic_common::waits`), loaded once per agent and shared by every
//! detector and target that needs it.
//!
//! * [`subscribe`] registers a process with the stack walker (reference
//!   counted: several detectors watch the same process) and returns a
//!   [`Subscription`];
//! * [`Subscription::view`] polls the kernel maps (at most every
//!   [`POLL_EVERY`], whoever asks), symbolizes new stacks while their code
//!   objects are alive, and returns what happened to that process since
//!   this subscription's previous view (finished waits and wakes, as
//!   deltas) and what holds now (threads blocked in `futex`, event-loop
//!   step state).
//!
//! The kernel maps are cumulative; the sensor keeps the last values it read
//! and hands each subscription its own deltas, so detectors never see an
//! event twice or miss one, and idle keys can be trimmed when maps fill.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use aya::Ebpf;
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent};
use pymedic_common::pystack::{EMPTY_STACK_ID, PY_STACKS_MAP, PyStack};
use pymedic_common::waits::{
    AddrKey, CONTENDED_MAP, ERRORS_MAP, GLOBAL_FUTEX_OP_OFF, GLOBAL_FUTEX_UADDR_OFF,
    GLOBAL_FUTEX_UTIME_OFF, GLOBAL_SAMPLE_MASK, GLOBAL_STACK_MIN_NS, GLOBAL_STEP_THRESHOLD_NS,
    GLOBAL_SWITCH_NEXT_PID_OFF, GLOBAL_SWITCH_PREV_STATE_OFF, INFLIGHT_MAP, InflightWait,
    STEPS_MAP, StepState, WAIT_AGG_MAP, WAIT_TIMED, WAKE_AGG_MAP, WaitAgg, WaitKey,
};
use pymedic_model::Location;
use pymedic_python::{Interpreter, LiveMemory, PythonProcess};

use crate::bpf::{self, BpfError, map_err, monotonic_ns, objects, tracefs};
use crate::pystack;

mod sem_gen;

const OBJECT: &str = "waits";

/// The kernel maps are read at most this often.
pub const POLL_EVERY: Duration = Duration::from_millis(100);

/// Step threshold the kernel counts overruns against (detectors judge
/// their own thresholds from the step state; this only decides which steps
/// keep their stacks).
pub const KERNEL_STEP_THRESHOLD: Duration = Duration::from_millis(50);

/// A futex wait (or the wait a wake ends) this long always gets its Python
/// stack in the kernel; shorter ones are sampled, 1 in [`SHORT_SAMPLE_ONE_IN`].
/// Counts and times of every wait are exact per thread and address.
pub const STACK_MIN: Duration = Duration::from_millis(1);
/// Sampling of short waits' stacks (a power of two).
pub const SHORT_SAMPLE_ONE_IN: u32 = 32;

/// An untimed wait still in flight after this long gets its stack read from
/// the process's memory (the thread is blocked, so its frames hold still).
pub const READ_BLOCKED_AFTER: Duration = Duration::from_millis(50);
/// At most this many such stacks are read per poll.
const READS_PER_POLL: usize = 64;
/// Polls (100 ms apart) a blocked thread is looked for among the Python
/// threads before it is taken for a native one (empty stack).
const MAX_STACK_MISSES: u32 = 30;

/// Rate of the per-CPU clock that samples long event-loop steps.
const SAMPLE_HZ: u64 = 20;

/// One frame of a captured stack.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StackFrame {
    pub loc: Location,
    /// `co_flags` of its code object (0 when it could not be read).
    pub flags: u32,
}

/// `CO_COROUTINE | CO_ITERABLE_COROUTINE | CO_ASYNC_GENERATOR`.
pub const CO_ASYNC: u32 = 0x80 | 0x100 | 0x200;

impl StackFrame {
    /// A frame of an `async def` (a coroutine or async generator).
    pub fn is_async(&self) -> bool {
        self.flags & CO_ASYNC != 0
    }
}

/// A stack, innermost frame first.
pub type Frames = Arc<Vec<StackFrame>>;

/// The locations of a stack, innermost first.
pub fn locations(f: &[StackFrame]) -> Vec<Location> {
    f.iter().map(|f| f.loc.clone()).collect()
}

/// Waits (or wakes) of one thread at one address and stack.
#[derive(Clone, Debug)]
pub struct WaitRecord {
    pub tid: u32,
    pub uaddr: u64,
    pub stack_id: u64,
    /// Empty for the waits whose stack was not sampled (see [`STACK_MIN`]):
    /// their counts and times still belong to `tid` and `uaddr`.
    pub stack: Frames,
    pub count: u64,
    pub total: Duration,
    pub max: Duration,
}

/// A thread blocked in `futex` now.
#[derive(Clone, Debug)]
pub struct Blocked {
    pub tid: u32,
    pub uaddr: u64,
    pub timed: bool,
    /// How long it has been blocked.
    pub age: Duration,
    /// `CLOCK_MONOTONIC` ns when it blocked (identifies this wait).
    pub start_ns: u64,
    /// Its Python stack, once an untimed wait has lasted
    /// [`READ_BLOCKED_AFTER`]; empty before, and for timed waits.
    pub stack: Frames,
}

/// One event-loop thread's step state, with its stacks symbolized.
#[derive(Clone, Debug)]
pub struct LoopThread {
    pub tid: u32,
    pub raw: StepState,
    /// The current step's age (None while waiting for events).
    pub step_age: Option<Duration>,
    /// Stacks referenced by `raw` (`off_stack`, `step_*`, `last_*`).
    pub stacks: HashMap<u64, Frames>,
}

/// What a subscription sees at one view.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// Waits that ended since the previous view.
    pub waits: Vec<WaitRecord>,
    /// Wakes of waited-on addresses since the previous view (waker's tid
    /// and stack; `total` is how long the address had waiters).
    pub wakes: Vec<WaitRecord>,
    /// Threads blocked in `futex` now.
    pub blocked: Vec<Blocked>,
    /// Threads that wait in `epoll_wait`.
    pub loops: Vec<LoopThread>,
    /// The GIL's condition variable and mutex (address range).
    pub gil: Option<(u64, u64)>,
    /// Time covered since the previous view.
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum WaitsError {
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error(transparent)]
    PyStack(#[from] pystack::PyStackError),
    #[error("listing CPUs for the event-loop sampler: {0}: {1}")]
    Cpus(String, std::io::Error),
}

impl WaitsError {
    pub fn is_permission(&self) -> bool {
        match self {
            WaitsError::Bpf(e) => e.is_permission(),
            WaitsError::PyStack(pystack::PyStackError::Bpf(e)) => e.is_permission(),
            _ => false,
        }
    }
}

struct Proc {
    refs: usize,
    gil: Option<(u64, u64)>,
    interp: Option<Interpreter<LiveMemory>>,
}

#[derive(Default)]
struct Pending {
    waits: HashMap<WaitKey, WaitAgg>,
    wakes: HashMap<WaitKey, WaitAgg>,
    since: Option<Instant>,
}

/// The loaded object and what has been read from it.
pub struct Sensor {
    bpf: Ebpf,
    procs: HashMap<u32, Proc>,
    last_poll: Option<Instant>,
    last_waits: HashMap<WaitKey, WaitAgg>,
    last_wakes: HashMap<WaitKey, WaitAgg>,
    subs: HashMap<u64, (u32, Pending)>,
    next_sub: u64,
    inflight: Vec<(u32, InflightWait)>,
    /// Stacks of long untimed waits in flight, read from memory, by
    /// `(tid, start_ns)`.
    blocked_stacks: HashMap<(u32, u64), Frames>,
    /// Failed attempts to match such a wait's thread, by `(tid, start_ns)`.
    blocked_misses: HashMap<(u32, u64), u32>,
    steps: Vec<(u32, StepState)>,
    stacks: HashMap<(u32, u64), Frames>,
    max_stacks: u32,
    sems: sem_gen::SemProbe,
    /// Processes whose lock allocations are counted.
    sem_covered: std::collections::HashSet<u32>,
}

static SHARED: Mutex<Weak<Mutex<Sensor>>> = Mutex::new(Weak::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The agent's one sensor, loaded on first use and dropped (detached) when
/// the last subscription goes.
pub fn shared() -> Result<Arc<Mutex<Sensor>>, WaitsError> {
    let mut g = lock(&SHARED);
    if let Some(s) = g.upgrade() {
        return Ok(s);
    }
    let t0 = Instant::now();
    let s = Arc::new(Mutex::new(Sensor::start()?));
    tracing::debug!("waits sensor loaded in {:?}", t0.elapsed());
    *g = Arc::downgrade(&s);
    Ok(s)
}

/// Starts watching `p` (see the module docs).
pub fn subscribe(p: &PythonProcess) -> Result<Subscription, WaitsError> {
    let sensor = shared()?;
    let id = lock(&sensor).add(p)?;
    Ok(Subscription {
        sensor,
        id,
        pid: p.pid,
    })
}

/// One detector's interest in one process.
pub struct Subscription {
    sensor: Arc<Mutex<Sensor>>,
    id: u64,
    pid: u32,
}

impl Subscription {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What happened since the previous view, and what holds now.
    pub fn view(&self) -> Result<View, WaitsError> {
        let mut s = lock(&self.sensor);
        s.poll()?;
        Ok(s.view(self.id, self.pid))
    }
}

impl Subscription {
    /// The allocation generation of each lock semaphore address (`sem_t*`)
    /// of this process: how many times `sem_init` ran there since the
    /// sensor began counting. `None` when this process's allocations are
    /// not counted (no libc found, or the probe failed).
    pub fn lock_generations(&self, sems: &[u64]) -> Option<Vec<u32>> {
        let s = lock(&self.sensor);
        if !s.sem_covered.contains(&self.pid) {
            return None;
        }
        sem_gen::generations(&s.bpf, self.pid, sems)
            .inspect_err(|e| tracing::debug!(pid = self.pid, "lock generations: {e}"))
            .ok()
    }

    /// Thread names of the process by tid: the Python name
    /// (`threading.Thread.name`) where the interpreter has one, else the
    /// kernel's `comm`.
    pub fn thread_names(&self) -> HashMap<u32, String> {
        let tids = crate::procinfo::thread_ids(self.pid).unwrap_or_default();
        let mut names: HashMap<u32, String> = tids
            .iter()
            .filter_map(|tid| {
                let comm =
                    std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", self.pid)).ok()?;
                Some((*tid, comm.trim_end().to_owned()))
            })
            .collect();
        let s = lock(&self.sensor);
        if let Some(interp) = s.procs.get(&self.pid).and_then(|p| p.interp.as_ref()) {
            names.extend(pystack::CodeSource::python_thread_names(interp, &tids));
        }
        names
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        lock(&self.sensor).remove(self.id, self.pid);
    }
}

fn hash_map<'a, K: aya::Pod, V: aya::Pod>(
    bpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<BpfHashMap<&'a mut MapData, K, V>, BpfError> {
    let map = bpf.map_mut(name).ok_or(BpfError::MissingMap {
        object: OBJECT,
        map: name,
    })?;
    BpfHashMap::try_from(map).map_err(map_err(name))
}

impl Sensor {
    fn start() -> Result<Sensor, WaitsError> {
        let root = tracefs::ensure_mounted().map_err(BpfError::from)?;
        let field = |cat: &str, ev: &str, f: &str| {
            tracefs::field_offset(&root, cat, ev, f).map_err(BpfError::from)
        };
        let next_pid_off = field("sched", "sched_switch", "next_pid")?;
        let prev_state_off = field("sched", "sched_switch", "prev_state")?;
        let uaddr_off = field("syscalls", "sys_enter_futex", "uaddr")?;
        let op_off = field("syscalls", "sys_enter_futex", "op")?;
        let utime_off = field("syscalls", "sys_enter_futex", "utime")?;
        let fsbase_off = pystack::kernel_fsbase_offset()?;
        let threshold = KERNEL_STEP_THRESHOLD.as_nanos() as u64;
        let stack_min = STACK_MIN.as_nanos() as u64;
        let sample_mask = SHORT_SAMPLE_ONE_IN - 1;
        let max_stacks = 4096u32;
        let mut bpf = bpf::load(OBJECT, objects::WAITS, |l| {
            pystack::configure_loader(l, &fsbase_off);
            l.override_global(GLOBAL_SWITCH_NEXT_PID_OFF, &next_pid_off, true);
            l.override_global(GLOBAL_SWITCH_PREV_STATE_OFF, &prev_state_off, true);
            l.override_global(GLOBAL_FUTEX_UADDR_OFF, &uaddr_off, true);
            l.override_global(GLOBAL_FUTEX_OP_OFF, &op_off, true);
            l.override_global(GLOBAL_FUTEX_UTIME_OFF, &utime_off, true);
            l.override_global(GLOBAL_STEP_THRESHOLD_NS, &threshold, true);
            l.override_global(GLOBAL_STACK_MIN_NS, &stack_min, true);
            l.override_global(GLOBAL_SAMPLE_MASK, &sample_mask, true);
            l.map_max_entries(PY_STACKS_MAP, max_stacks);
        })?;
        let tp = |bpf: &mut Ebpf, prog: &'static str, cat: &str, name: &str| {
            bpf::attach_tracepoint(bpf, OBJECT, prog, cat, name)
        };
        tp(&mut bpf, "waits_exit", "sched", "sched_process_exit")?;
        tp(&mut bpf, "waits_futex_enter", "syscalls", "sys_enter_futex")?;
        tp(&mut bpf, "waits_futex_exit", "syscalls", "sys_exit_futex")?;
        tp(&mut bpf, "waits_switch", "sched", "sched_switch")?;
        attach_many(
            &mut bpf,
            "waits_loop_enter",
            &[
                "sys_enter_epoll_wait",
                "sys_enter_epoll_pwait",
                "sys_enter_epoll_pwait2",
            ],
        )?;
        attach_many(
            &mut bpf,
            "waits_loop_exit",
            &[
                "sys_exit_epoll_wait",
                "sys_exit_epoll_pwait",
                "sys_exit_epoll_pwait2",
            ],
        )?;
        attach_sampler(&mut bpf)?;
        Ok(Sensor {
            bpf,
            procs: HashMap::new(),
            last_poll: None,
            last_waits: HashMap::new(),
            last_wakes: HashMap::new(),
            subs: HashMap::new(),
            next_sub: 1,
            inflight: Vec::new(),
            blocked_stacks: HashMap::new(),
            blocked_misses: HashMap::new(),
            steps: Vec::new(),
            stacks: HashMap::new(),
            max_stacks,
            sems: sem_gen::SemProbe::default(),
            sem_covered: Default::default(),
        })
    }

    fn add(&mut self, p: &PythonProcess) -> Result<u64, WaitsError> {
        let known = self.procs.contains_key(&p.pid);
        if !known {
            self.stacks.retain(|k, _| k.0 != p.pid);
            pystack::register(&mut self.bpf, p)?;
            match self.sems.cover(&mut self.bpf, p) {
                Ok(true) => {
                    self.sem_covered.insert(p.pid);
                }
                Ok(false) => tracing::debug!(pid = p.pid, "no libc to count lock allocations in"),
                Err(e) => tracing::warn!(
                    pid = p.pid,
                    "lock allocations are not counted ({e}); a lock at a reused address may \
                     be taken for its predecessor"
                ),
            }
            let interp = Interpreter::for_process(LiveMemory::new(p.pid), p).ok();
            let gil = interp.as_ref().and_then(|i| {
                let main = i.threads().ok()?.first()?.interp;
                crate::dump::gil_range(i, main)
            });
            self.procs.insert(
                p.pid,
                Proc {
                    refs: 0,
                    gil,
                    interp,
                },
            );
        }
        if let Some(pr) = self.procs.get_mut(&p.pid) {
            pr.refs += 1;
        }
        let id = self.next_sub;
        self.next_sub += 1;
        self.subs.insert(
            id,
            (
                p.pid,
                Pending {
                    since: Some(Instant::now()),
                    ..Pending::default()
                },
            ),
        );
        Ok(id)
    }

    fn remove(&mut self, id: u64, pid: u32) {
        self.subs.remove(&id);
        let Some(pr) = self.procs.get_mut(&pid) else {
            return;
        };
        pr.refs = pr.refs.saturating_sub(1);
        if pr.refs > 0 {
            return;
        }
        self.procs.remove(&pid);
        self.sem_covered.remove(&pid);
        self.sems.uncover(&mut self.bpf, pid);
        if let Err(e) = pystack::unregister(&mut self.bpf, pid) {
            tracing::warn!(pid, "unregistering from the waits sensor: {e}");
        }
        self.stacks.retain(|k, _| k.0 != pid);
        if let Err(e) = self.forget_keys(pid) {
            tracing::warn!(pid, "trimming the waits sensor's maps: {e}");
        }
    }

    /// Drops every kernel key of `pid` (it is no longer watched).
    fn forget_keys(&mut self, pid: u32) -> Result<(), BpfError> {
        for name in [WAIT_AGG_MAP, WAKE_AGG_MAP] {
            let mut m = hash_map::<WaitKey, WaitAgg>(&mut self.bpf, name)?;
            let keys: Vec<WaitKey> = m.keys().filter_map(Result::ok).collect();
            for k in keys.iter().filter(|k| k.tgid == pid) {
                let _ = m.remove(k);
            }
        }
        self.last_waits.retain(|k, _| k.tgid != pid);
        self.last_wakes.retain(|k, _| k.tgid != pid);
        let mut c = hash_map::<AddrKey, u64>(&mut self.bpf, CONTENDED_MAP)?;
        let keys: Vec<AddrKey> = c.keys().filter_map(Result::ok).collect();
        for k in keys.iter().filter(|k| k.tgid == pid) {
            let _ = c.remove(k);
        }
        // Waits in flight end unrecorded (the exit program looks no
        // further than this map).
        let mut inflight = hash_map::<u32, InflightWait>(&mut self.bpf, INFLIGHT_MAP)?;
        let tids: Vec<u32> = inflight
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, w)| w.tgid == pid)
            .map(|(tid, _)| tid)
            .collect();
        for tid in tids {
            let _ = inflight.remove(&tid);
        }
        Ok(())
    }

    /// Reads the kernel maps (at most every [`POLL_EVERY`]).
    fn poll(&mut self) -> Result<(), WaitsError> {
        if self.last_poll.is_some_and(|t| t.elapsed() < POLL_EVERY) {
            return Ok(());
        }
        self.last_poll = Some(Instant::now());
        for (name, is_wakes) in [(WAIT_AGG_MAP, false), (WAKE_AGG_MAP, true)] {
            let entries: Vec<(WaitKey, WaitAgg)> = {
                let m = hash_map::<WaitKey, WaitAgg>(&mut self.bpf, name)?;
                m.iter().filter_map(Result::ok).collect()
            };
            let mut stale = Vec::new();
            for (k, v) in &entries {
                let last = if is_wakes {
                    &mut self.last_wakes
                } else {
                    &mut self.last_waits
                };
                let prev = last.get(k).copied().unwrap_or_default();
                if prev == *v {
                    stale.push(*k);
                    continue;
                }
                let d = WaitAgg {
                    count: v.count.saturating_sub(prev.count),
                    total_ns: v.total_ns.saturating_sub(prev.total_ns),
                    max_ns: v.max_ns,
                };
                last.insert(*k, *v);
                self.symbolize(k.tgid, k.stack_id)?;
                for (pid, pending) in self.subs.values_mut() {
                    if *pid != k.tgid {
                        continue;
                    }
                    let acc = if is_wakes {
                        &mut pending.wakes
                    } else {
                        &mut pending.waits
                    };
                    let a = acc.entry(*k).or_default();
                    a.count += d.count;
                    a.total_ns += d.total_ns;
                    a.max_ns = a.max_ns.max(d.max_ns);
                }
            }
            // Bounded maps: idle keys go once the map is half full (the
            // kernel re-adds live ones; deltas restart from zero).
            if entries.len() as u32 > pymedic_common::waits::AGG_MAX / 2 {
                let mut m = hash_map::<WaitKey, WaitAgg>(&mut self.bpf, name)?;
                let last = if is_wakes {
                    &mut self.last_wakes
                } else {
                    &mut self.last_waits
                };
                for k in &stale {
                    let _ = m.remove(k);
                    last.remove(k);
                }
            }
        }
        self.inflight = {
            let m = hash_map::<u32, InflightWait>(&mut self.bpf, INFLIGHT_MAP)?;
            m.iter().filter_map(Result::ok).collect()
        };
        self.steps = {
            let m = hash_map::<u32, StepState>(&mut self.bpf, STEPS_MAP)?;
            m.iter().filter_map(Result::ok).collect()
        };
        let mut ids: Vec<(u32, u64)> = self
            .inflight
            .iter()
            .map(|(_, w)| (w.tgid, w.stack_id))
            .collect();
        for (_, s) in &self.steps {
            for id in step_stacks(s) {
                ids.push((s.tgid, id));
            }
        }
        for (pid, id) in ids {
            self.symbolize(pid, id)?;
        }
        self.read_blocked_stacks();
        self.trim_stacks()?;
        Ok(())
    }

    /// Reads, from the process's memory, the Python stack of each untimed
    /// wait in flight for [`READ_BLOCKED_AFTER`] (the kernel walks a wait's
    /// stack only when it ends). Once per wait; forgotten when it ends.
    fn read_blocked_stacks(&mut self) {
        let live: std::collections::HashSet<(u32, u64)> = self
            .inflight
            .iter()
            .map(|(tid, w)| (*tid, w.start_ns))
            .collect();
        self.blocked_stacks.retain(|k, _| live.contains(k));
        self.blocked_misses.retain(|k, _| live.contains(k));
        let now_ns = monotonic_ns();
        let after = READ_BLOCKED_AFTER.as_nanos() as u64;
        let mut wanted: HashMap<u32, Vec<(u32, u64)>> = HashMap::new();
        for (tid, w) in &self.inflight {
            if w.stack_id == EMPTY_STACK_ID
                && w.flags & WAIT_TIMED == 0
                && now_ns.saturating_sub(w.start_ns) >= after
                && !self.blocked_stacks.contains_key(&(*tid, w.start_ns))
            {
                wanted.entry(w.tgid).or_default().push((*tid, w.start_ns));
            }
        }
        let mut budget = READS_PER_POLL;
        for (pid, waits) in wanted {
            let Some(interp) = self.procs.get(&pid).and_then(|p| p.interp.as_ref()) else {
                continue;
            };
            let Ok(threads) = interp.threads() else {
                continue;
            };
            let tids = crate::procinfo::thread_ids(pid).unwrap_or_default();
            let native = interp.native_tids(&threads, &tids);
            for (tid, start_ns) in waits {
                if budget == 0 {
                    return;
                }
                budget -= 1;
                let Some(thread) = threads
                    .iter()
                    .find(|t| native.get(&t.thread_id) == Some(&tid))
                else {
                    // Not matched to a Python thread this time (the tid
                    // mapping can miss while threads come and go): retry at
                    // the next polls; give up (empty stack) after a while.
                    let misses = self.blocked_misses.entry((tid, start_ns)).or_insert(0);
                    *misses += 1;
                    if *misses >= MAX_STACK_MISSES {
                        self.blocked_stacks
                            .insert((tid, start_ns), Arc::new(Vec::new()));
                    }
                    continue;
                };
                let frames: Vec<StackFrame> = match interp.frames(thread) {
                    Ok(frames) => frames
                        .iter()
                        .map(|f| StackFrame {
                            loc: Location::new(f.code.filename.clone(), f.code.function(), f.line),
                            flags: f.code.flags,
                        })
                        .collect(),
                    Err(e) => {
                        tracing::debug!(pid, tid, "reading a blocked thread's stack: {e}");
                        continue;
                    }
                };
                // A thread blocked in a Python-level wait has frames; none
                // read means a torn read: try again at the next poll.
                if frames.is_empty() {
                    continue;
                }
                self.blocked_stacks
                    .insert((tid, start_ns), Arc::new(frames));
            }
        }
    }

    fn symbolize(&mut self, pid: u32, id: u64) -> Result<(), BpfError> {
        if id == EMPTY_STACK_ID || self.stacks.contains_key(&(pid, id)) {
            return Ok(());
        }
        let Some(interp) = self.procs.get(&pid).and_then(|p| p.interp.as_ref()) else {
            return Ok(());
        };
        if let Some(stack) = pystack::read_stack(&self.bpf, id)? {
            let frames: Vec<StackFrame> = stack
                .frames()
                .iter()
                .map(|f| match interp.code(f.code) {
                    Ok(code) => StackFrame {
                        loc: Location::new(
                            code.filename.clone(),
                            code.function(),
                            code.line(pystack::frame_lasti(interp.layout(), f)),
                        ),
                        flags: code.flags,
                    },
                    Err(_) => StackFrame {
                        loc: Location::new("", format!("<unknown code {:#x}>", f.code), 0),
                        flags: 0,
                    },
                })
                .collect();
            self.stacks.insert((pid, id), Arc::new(frames));
        }
        Ok(())
    }

    fn trim_stacks(&mut self) -> Result<(), BpfError> {
        let mut stacks = hash_map::<u64, PyStack>(&mut self.bpf, PY_STACKS_MAP)?;
        let ids: Vec<u64> = stacks.keys().filter_map(Result::ok).collect();
        if (ids.len() as u32) < self.max_stacks / 2 {
            return Ok(());
        }
        let known: std::collections::HashSet<u64> = self.stacks.keys().map(|k| k.1).collect();
        for id in ids.iter().filter(|id| known.contains(id)) {
            let _ = stacks.remove(id);
        }
        Ok(())
    }

    fn frames(&self, pid: u32, id: u64) -> Frames {
        self.stacks
            .get(&(pid, id))
            .cloned()
            .unwrap_or_else(|| Arc::new(Vec::new()))
    }

    fn view(&mut self, sub: u64, pid: u32) -> View {
        let now_ns = monotonic_ns();
        let Some((_, pending)) = self.subs.get_mut(&sub) else {
            return View::default();
        };
        let taken = std::mem::take(pending);
        pending.since = Some(Instant::now());
        let elapsed = taken.since.map(|t| t.elapsed()).unwrap_or_default();
        let records = |m: HashMap<WaitKey, WaitAgg>| -> Vec<WaitRecord> {
            m.into_iter()
                .filter(|(_, v)| v.count > 0)
                .map(|(k, v)| WaitRecord {
                    tid: k.tid,
                    uaddr: k.uaddr,
                    stack_id: k.stack_id,
                    stack: self.frames(pid, k.stack_id),
                    count: v.count,
                    total: Duration::from_nanos(v.total_ns),
                    max: Duration::from_nanos(v.max_ns),
                })
                .collect()
        };
        let waits = records(taken.waits);
        let wakes = records(taken.wakes);
        let blocked = self
            .inflight
            .iter()
            .filter(|(_, w)| w.tgid == pid)
            .map(|(tid, w)| Blocked {
                tid: *tid,
                uaddr: w.uaddr,
                timed: w.flags & WAIT_TIMED != 0,
                age: Duration::from_nanos(now_ns.saturating_sub(w.start_ns)),
                start_ns: w.start_ns,
                stack: if w.stack_id != EMPTY_STACK_ID {
                    self.frames(pid, w.stack_id)
                } else {
                    self.blocked_stacks
                        .get(&(*tid, w.start_ns))
                        .cloned()
                        .unwrap_or_else(|| Arc::new(Vec::new()))
                },
            })
            .collect();
        let loops = self
            .steps
            .iter()
            .filter(|(_, s)| s.tgid == pid)
            .map(|(tid, s)| LoopThread {
                tid: *tid,
                raw: *s,
                step_age: (s.in_wait == 0 && s.step_start_ns != 0)
                    .then(|| Duration::from_nanos(now_ns.saturating_sub(s.step_start_ns))),
                stacks: step_stacks(s)
                    .into_iter()
                    .map(|id| (id, self.frames(pid, id)))
                    .collect(),
            })
            .collect();
        View {
            waits,
            wakes,
            blocked,
            loops,
            gil: self.procs.get(&pid).and_then(|p| p.gil),
            elapsed,
        }
    }
}

fn step_stacks(s: &StepState) -> Vec<u64> {
    [
        s.off_stack,
        s.step_block_stack,
        s.step_cpu_stack,
        s.last_block_stack,
        s.last_cpu_stack,
    ]
    .into_iter()
    .filter(|&id| id != 0 && id != EMPTY_STACK_ID)
    .collect()
}

fn attach_many(bpf: &mut Ebpf, program: &'static str, events: &[&str]) -> Result<(), BpfError> {
    let prog: &mut aya::programs::TracePoint = bpf
        .program_mut(program)
        .ok_or(BpfError::MissingProgram {
            object: OBJECT,
            program,
        })?
        .try_into()
        .map_err(|source| BpfError::Attach {
            object: OBJECT,
            program,
            what: "tracepoint".into(),
            source: Box::new(source),
        })?;
    let wrap = |what: String, source: aya::programs::ProgramError| {
        if bpf::is_permission_error(&source) {
            BpfError::PermissionDenied {
                object: OBJECT,
                source: Box::new(source),
            }
        } else {
            BpfError::Attach {
                object: OBJECT,
                program,
                what,
                source: Box::new(source),
            }
        }
    };
    prog.load().map_err(|e| wrap("verifier".into(), e))?;
    let mut attached = 0;
    for ev in events {
        match prog.attach("syscalls", ev) {
            Ok(_) => attached += 1,
            // Older kernels lack epoll_pwait2: the others still bracket steps.
            Err(e) => tracing::debug!("{program}: syscalls:{ev} not attached: {e}"),
        }
    }
    if attached == 0 {
        return Err(BpfError::Io {
            op: "attach the event-loop step tracepoints (no syscalls:*epoll* tracepoint)",
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    Ok(())
}

fn attach_sampler(bpf: &mut Ebpf) -> Result<(), WaitsError> {
    let program = "waits_sample";
    let prog: &mut aya::programs::PerfEvent = bpf
        .program_mut(program)
        .ok_or(BpfError::MissingProgram {
            object: OBJECT,
            program,
        })?
        .try_into()
        .map_err(|source| BpfError::Attach {
            object: OBJECT,
            program,
            what: "perf event".into(),
            source: Box::new(source),
        })?;
    prog.load().map_err(|source| BpfError::Attach {
        object: OBJECT,
        program,
        what: "perf event (verifier)".into(),
        source: Box::new(source),
    })?;
    let cpus = aya::util::online_cpus().map_err(|(what, e)| WaitsError::Cpus(what.into(), e))?;
    for cpu in cpus {
        prog.attach(
            PerfEventConfig::Software(SoftwareEvent::CpuClock),
            PerfEventScope::AllProcessesOneCpu { cpu },
            SamplePolicy::Period(1_000_000_000 / SAMPLE_HZ),
            false,
        )
        .map_err(|source| BpfError::Attach {
            object: OBJECT,
            program,
            what: format!("perf event on CPU {cpu}"),
            source: Box::new(source),
        })?;
    }
    Ok(())
}

/// The kernel error counters of the shared sensor, when loaded.
pub fn errors() -> Vec<(&'static str, u64)> {
    let Some(s) = lock(&SHARED).upgrade() else {
        return Vec::new();
    };
    let s = lock(&s);
    bpf::read_error_counters(&s.bpf, ERRORS_MAP).unwrap_or_default()
}
