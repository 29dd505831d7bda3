//! One loaded `resource` eBPF object shared by every resource detector and
//! every target (like `cpu_hotspot`'s profiler): targets are registered
//! with the features their detectors need, programs are attached the first
//! time a feature is asked for, and the maps are read at most about once a
//! second into per-process views the detectors take their share of.

use std::collections::HashMap;
use std::os::fd::AsFd as _;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use aya::Ebpf;
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent};
use aya::programs::{PerfEvent, TracePoint};
use pymedic_common::pystack::{EMPTY_STACK_ID, PY_STACKS_MAP, PyFrame, PyStack};
use pymedic_common::resource::{
    ARENAS_MAP, ArenaKey, FDS_MAP, FEAT_FD, FEAT_GC, FEAT_MEMORY, FEAT_THREAD, FEAT_WATCH, FdKey,
    GC_EVENTS_MAP, GC_GENERATIONS, GLOBAL_FAULT_ADDRESS_OFF, GLOBAL_FAULT_CAPTURES_PER_SEC,
    GLOBAL_FAULT_ERROR_OFF, GLOBAL_FAULT_IP_OFF, GLOBAL_GC_PERIOD_NS,
    GLOBAL_NEWTASK_CLONE_FLAGS_OFF, GLOBAL_NEWTASK_PID_OFF, GLOBAL_SYSCALL_ARGS_OFF,
    GLOBAL_SYSCALL_RET_OFF, GROWTH_MAP, GcPause, GrowthKey, GrowthValue, PAGES_MAP, PRE_FRAMES,
    PROCS_MAP, PSTATS_MAP, PageKey, ProcStats, ResProc, SITES_MAP, STACK_FAILED, STACK_UNSAMPLED,
    SiteKey, SiteValue, Stat, WATCH_MAP, WatchKey,
};
use pymedic_python::{PythonProcess, layout};

use super::ResourceError;
use super::watch::Watchpoint;
use crate::bpf::{self, BpfError, map_err, monotonic_ns, objects, tracefs};
use crate::engine::targets::TargetInfo;
use crate::profile::model::Frame;
use crate::pystack::{self, Symbolizer};

const OBJECT: &str = "resource";

/// System calls whose return value is a new descriptor.
const FD_RETURNING: &[&str] = &[
    "open",
    "openat",
    "openat2",
    "creat",
    "open_by_handle_at",
    "socket",
    "accept",
    "accept4",
    "dup",
    "dup2",
    "dup3",
    "eventfd",
    "eventfd2",
    "epoll_create",
    "epoll_create1",
    "timerfd_create",
    "signalfd",
    "signalfd4",
    "memfd_create",
    "inotify_init",
    "inotify_init1",
    "fanotify_init",
    "pidfd_open",
    "pidfd_getfd",
    "userfaultfd",
    "io_uring_setup",
    "perf_event_open",
];

/// Watchpoint hits by (pid, watched address): insert stacks and counts.
type WatchHits = HashMap<(u32, u64), Vec<(Arc<Vec<Frame>>, u64)>>;

/// Session-wide settings (from the first detector that starts it).
#[derive(Clone, Copy, Debug)]
pub struct SessionConfig {
    /// GC-state sampling rate per CPU.
    pub gc_rate_hz: u64,
    /// Memory-growth stacks captured per second and process at most.
    pub fault_captures_per_sec: u64,
}

impl Default for SessionConfig {
    fn default() -> SessionConfig {
        SessionConfig {
            gc_rate_hz: 1000,
            fault_captures_per_sec: 500,
        }
    }
}

/// One site (open or thread-creation stack) of one process, as last read.
#[derive(Clone, Debug)]
pub struct SiteView {
    pub stack_id: u64,
    pub value: SiteValue,
    /// Outermost frame first.
    pub frames: Arc<Vec<Frame>>,
}

impl SiteView {
    pub fn live(&self) -> u64 {
        self.value.opened.saturating_sub(self.value.closed)
    }
}

/// Memory growth by (stack, faulting instruction), cumulative.
#[derive(Clone, Debug)]
pub struct GrowthView {
    pub stack_id: u64,
    pub ip: u64,
    pub value: GrowthValue,
    pub frames: Arc<Vec<Frame>>,
}

/// One collection pause.
#[derive(Clone, Debug)]
pub struct PauseView {
    pub duration: Duration,
    pub end_ns: u64,
    pub collections: [u32; GC_GENERATIONS],
    pub tid: u32,
    pub samples: u32,
    /// The stack the collection ran on (outermost first).
    pub frames: Arc<Vec<Frame>>,
    /// The innermost frames of the process's last sample before the pause
    /// (with `FEAT_GC_PRE`), outermost first; empty when unknown.
    pub before: Arc<Vec<Frame>>,
}

struct Proc {
    features: u32,
    info: ResProc,
    process: PythonProcess,
    watch: Option<Watchpoint>,
}

/// The shared session; see the module docs.
pub struct Session {
    bpf: Ebpf,
    config: SessionConfig,
    attached: u32,
    symbolizer: Symbolizer,
    procs: HashMap<u32, Proc>,
    gc_events: Option<RingBuf<MapData>>,
    last_poll: Option<Instant>,
    sites: HashMap<(u32, u32), Vec<SiteView>>,
    growth: HashMap<u32, Vec<GrowthView>>,
    pstats: HashMap<u32, ProcStats>,
    pauses: HashMap<u32, Vec<PauseView>>,
    watch_hits: WatchHits,
}

static SHARED: Mutex<Weak<Mutex<Session>>> = Mutex::new(Weak::new());

/// The session every resource detector shares: created on first use,
/// dropped (detaching everything) when the last holder lets go.
pub fn shared(config: SessionConfig) -> Result<Arc<Mutex<Session>>, ResourceError> {
    let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = slot.upgrade() {
        return Ok(s);
    }
    let s = Arc::new(Mutex::new(Session::start(config)?));
    *slot = Arc::downgrade(&s);
    Ok(s)
}

fn missing(map: &'static str) -> BpfError {
    BpfError::MissingMap {
        object: OBJECT,
        map,
    }
}

impl Session {
    fn start(config: SessionConfig) -> Result<Session, ResourceError> {
        let root = tracefs::ensure_mounted().map_err(BpfError::from)?;
        let off = |cat: &str, ev: &str, field: &str| -> Result<u32, BpfError> {
            Ok(tracefs::field_offset(&root, cat, ev, field)?)
        };
        let clone_flags = off("task", "task_newtask", "clone_flags")?;
        let newtask_pid = off("task", "task_newtask", "pid")?;
        let args = off("syscalls", "sys_enter_close", "fd")?;
        let ret = off("syscalls", "sys_exit_close", "ret")?;
        let address = off("exceptions", "page_fault_user", "address")?;
        let ip = off("exceptions", "page_fault_user", "ip")?;
        let error = off("exceptions", "page_fault_user", "error_code")?;
        let fsbase = pystack::kernel_fsbase_offset()?;
        let gc_period = 1_000_000_000 / config.gc_rate_hz.clamp(10, 10_000);
        let captures = config.fault_captures_per_sec;
        let bpf = bpf::load(OBJECT, objects::RESOURCE, |l| {
            pystack::configure_loader(l, &fsbase);
            l.override_global(GLOBAL_NEWTASK_CLONE_FLAGS_OFF, &clone_flags, true);
            l.override_global(GLOBAL_NEWTASK_PID_OFF, &newtask_pid, true);
            l.override_global(GLOBAL_SYSCALL_ARGS_OFF, &args, true);
            l.override_global(GLOBAL_SYSCALL_RET_OFF, &ret, true);
            l.override_global(GLOBAL_FAULT_ADDRESS_OFF, &address, true);
            l.override_global(GLOBAL_FAULT_IP_OFF, &ip, true);
            l.override_global(GLOBAL_FAULT_ERROR_OFF, &error, true);
            l.override_global(GLOBAL_GC_PERIOD_NS, &gc_period, true);
            l.override_global(GLOBAL_FAULT_CAPTURES_PER_SEC, &captures, true);
            l.map_max_entries(PY_STACKS_MAP, 4096);
        })?;
        let mut s = Session {
            bpf,
            config,
            attached: 0,
            symbolizer: Symbolizer::new(),
            procs: HashMap::new(),
            gc_events: None,
            last_poll: None,
            sites: HashMap::new(),
            growth: HashMap::new(),
            pstats: HashMap::new(),
            pauses: HashMap::new(),
            watch_hits: HashMap::new(),
        };
        s.attach_tp("res_exit", &[("sched", "sched_process_exit")])?;
        s.attach_tp("res_exec", &[("sched", "sched_process_exec")])?;
        Ok(s)
    }

    /// Loads `program` (once) and attaches it to each existing tracepoint.
    fn attach_tp(
        &mut self,
        program: &'static str,
        points: &[(&str, &str)],
    ) -> Result<(), BpfError> {
        let root = tracefs::ensure_mounted()?;
        let prog: &mut TracePoint = self
            .bpf
            .program_mut(program)
            .ok_or(BpfError::MissingProgram {
                object: OBJECT,
                program,
            })?
            .try_into()
            .map_err(|source| attach_error(program, "tracepoint", source))?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(|source| attach_error(program, "tracepoint (verifier)", source))?;
        }
        for (cat, name) in points {
            if !root.join("events").join(cat).join(name).exists() {
                tracing::debug!("tracepoint {cat}:{name} does not exist on this kernel");
                continue;
            }
            prog.attach(cat, name)
                .map_err(|source| attach_error(program, &format!("{cat}:{name}"), source))?;
        }
        Ok(())
    }

    /// Attaches what `features` needs and is not attached yet.
    fn ensure(&mut self, features: u32) -> Result<(), ResourceError> {
        let todo = features & !self.attached;
        if todo & FEAT_FD != 0 {
            let exits: Vec<String> = FD_RETURNING
                .iter()
                .map(|s| format!("sys_exit_{s}"))
                .collect();
            let points: Vec<(&str, &str)> =
                exits.iter().map(|e| ("syscalls", e.as_str())).collect();
            self.attach_tp("res_fd_ret", &points)?;
            self.attach_tp(
                "res_pipe_enter",
                &[
                    ("syscalls", "sys_enter_pipe"),
                    ("syscalls", "sys_enter_pipe2"),
                ],
            )?;
            self.attach_tp(
                "res_socketpair_enter",
                &[("syscalls", "sys_enter_socketpair")],
            )?;
            self.attach_tp(
                "res_pair_exit",
                &[
                    ("syscalls", "sys_exit_pipe"),
                    ("syscalls", "sys_exit_pipe2"),
                    ("syscalls", "sys_exit_socketpair"),
                ],
            )?;
            self.attach_tp("res_fcntl_enter", &[("syscalls", "sys_enter_fcntl")])?;
            self.attach_tp("res_fcntl_exit", &[("syscalls", "sys_exit_fcntl")])?;
            self.attach_tp("res_close", &[("syscalls", "sys_enter_close")])?;
            self.attach_tp("res_close_range", &[("syscalls", "sys_enter_close_range")])?;
        }
        if todo & FEAT_THREAD != 0 {
            self.attach_tp("res_newtask", &[("task", "task_newtask")])?;
        }
        if todo & FEAT_MEMORY != 0 {
            self.attach_tp("res_fault", &[("exceptions", "page_fault_user")])?;
            self.attach_tp("res_mmap_enter", &[("syscalls", "sys_enter_mmap")])?;
            self.attach_tp("res_mmap_exit", &[("syscalls", "sys_exit_mmap")])?;
            self.attach_tp("res_munmap", &[("syscalls", "sys_enter_munmap")])?;
        }
        if todo & FEAT_GC != 0 {
            self.attach_gc_clock()?;
            let ring = self
                .bpf
                .take_map(GC_EVENTS_MAP)
                .ok_or(missing(GC_EVENTS_MAP))?;
            self.gc_events = Some(RingBuf::try_from(ring).map_err(map_err(GC_EVENTS_MAP))?);
        }
        if todo & FEAT_WATCH != 0 {
            let prog: &mut PerfEvent = self
                .bpf
                .program_mut("res_watch")
                .ok_or(BpfError::MissingProgram {
                    object: OBJECT,
                    program: "res_watch",
                })?
                .try_into()
                .map_err(|source| attach_error("res_watch", "perf event", source))?;
            prog.load()
                .map_err(|source| attach_error("res_watch", "perf event (verifier)", source))?;
        }
        self.attached |= todo;
        Ok(())
    }

    fn attach_gc_clock(&mut self) -> Result<(), ResourceError> {
        let period = 1_000_000_000 / self.config.gc_rate_hz.clamp(10, 10_000);
        let prog: &mut PerfEvent = self
            .bpf
            .program_mut("res_gc_sample")
            .ok_or(BpfError::MissingProgram {
                object: OBJECT,
                program: "res_gc_sample",
            })?
            .try_into()
            .map_err(|source| attach_error("res_gc_sample", "perf event", source))?;
        prog.load()
            .map_err(|source| attach_error("res_gc_sample", "perf event (verifier)", source))?;
        let cpus = aya::util::online_cpus().map_err(|(what, e)| ResourceError::Io {
            op: "list the online CPUs",
            message: format!("{what}: {e}"),
        })?;
        for cpu in cpus {
            prog.attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::AllProcessesOneCpu { cpu },
                SamplePolicy::Period(period),
                false,
            )
            .map_err(|source| attach_error("res_gc_sample", &format!("cpu {cpu}"), source))?;
        }
        Ok(())
    }

    /// Tracks `target` for `features` (`FEAT_*`), attaching what is needed.
    pub fn add(&mut self, target: &TargetInfo, features: u32) -> Result<(), ResourceError> {
        self.ensure(features)?;
        let pid = target.id.pid;
        if !self.procs.contains_key(&pid) {
            let info = res_proc(&target.process);
            pystack::register(&mut self.bpf, &target.process)?;
            self.symbolizer
                .add_process(&target.process, target.id.start_ticks);
            self.procs.insert(
                pid,
                Proc {
                    features: 0,
                    info,
                    process: target.process.clone(),
                    watch: None,
                },
            );
        }
        let p = self.procs.get_mut(&pid).expect("inserted above");
        p.features |= features;
        p.info.features = p.features;
        let info = p.info;
        self.procs_map()?
            .insert(pid, info, 0)
            .map_err(map_err(PROCS_MAP))?;
        Ok(())
    }

    /// Stops tracking `features` of `pid`; the last one forgets the process
    /// and every kernel entry about it.
    pub fn remove(&mut self, pid: u32, features: u32) {
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        p.features &= !features;
        p.info.features = p.features;
        if p.features != 0 {
            let info = p.info;
            if let Ok(mut m) = self.procs_map() {
                let _ = m.insert(pid, info, 0);
            }
            return;
        }
        if let Some(p) = self.procs.remove(&pid)
            && let Some(w) = p.watch
        {
            w.disarm();
        }
        if let Ok(mut m) = self.procs_map() {
            let _ = m.remove(&pid);
        }
        if let Err(e) = pystack::unregister(&mut self.bpf, pid) {
            tracing::debug!(pid, "unregistering from the stack walker: {e}");
        }
        self.symbolizer.remove_process(pid);
        self.forget_kernel_entries(pid);
        self.sites.retain(|k, _| k.0 != pid);
        self.growth.remove(&pid);
        self.pstats.remove(&pid);
        self.pauses.remove(&pid);
        self.watch_hits.retain(|k, _| k.0 != pid);
    }

    fn forget_kernel_entries(&mut self, pid: u32) {
        fn purge<K: aya::Pod, V: aya::Pod>(
            bpf: &mut Ebpf,
            name: &'static str,
            pid_of: impl Fn(&K) -> u32,
            pid: u32,
        ) {
            let Some(map) = bpf.map_mut(name) else {
                return;
            };
            let Ok(mut m) = BpfHashMap::<_, K, V>::try_from(map) else {
                return;
            };
            let keys: Vec<K> = m.keys().filter_map(Result::ok).collect();
            for k in keys.iter().filter(|k| pid_of(k) == pid) {
                let _ = m.remove(k);
            }
        }
        purge::<FdKey, u64>(&mut self.bpf, FDS_MAP, |k| k.pid, pid);
        purge::<SiteKey, SiteValue>(&mut self.bpf, SITES_MAP, |k| k.pid, pid);
        purge::<GrowthKey, GrowthValue>(&mut self.bpf, GROWTH_MAP, |k| k.pid, pid);
        purge::<ArenaKey, u64>(&mut self.bpf, ARENAS_MAP, |k| k.pid, pid);
        purge::<WatchKey, u64>(&mut self.bpf, WATCH_MAP, |k| k.pid, pid);
        purge::<u32, ProcStats>(&mut self.bpf, PSTATS_MAP, |k| *k, pid);
    }

    fn procs_map(&mut self) -> Result<BpfHashMap<&mut MapData, u32, ResProc>, BpfError> {
        let map = self.bpf.map_mut(PROCS_MAP).ok_or(missing(PROCS_MAP))?;
        BpfHashMap::try_from(map).map_err(map_err(PROCS_MAP))
    }

    /// The Python process registered under `pid`.
    pub fn process(&self, pid: u32) -> Option<&PythonProcess> {
        self.procs.get(&pid).map(|p| &p.process)
    }

    /// Reads the kernel's maps into the per-process views, at most about
    /// once a second however many detectors and targets ask.
    pub fn poll(&mut self) -> Result<(), ResourceError> {
        if self
            .last_poll
            .is_some_and(|t| t.elapsed() < Duration::from_millis(900))
        {
            return Ok(());
        }
        self.last_poll = Some(Instant::now());
        self.read_sites()?;
        self.read_growth()?;
        self.read_pstats()?;
        self.read_pauses()?;
        self.read_watch()?;
        self.trim_stacks()?;
        if tracing::enabled!(tracing::Level::DEBUG) {
            let errors = bpf::read_error_counters(&self.bpf, pymedic_common::resource::ERRORS_MAP)?;
            tracing::debug!(stats = ?self.stats()?, ?errors, "resource eBPF counters");
        }
        let lost = self.stats()?[Stat::Lost as usize];
        crate::engine::usage::record_lost_events(
            lost.saturating_sub(LOST_SEEN.swap(lost, std::sync::atomic::Ordering::Relaxed)),
        );
        Ok(())
    }

    /// Symbolized frames of stack `id` of `pid` (outermost first).
    fn frames(&mut self, pid: u32, id: u64) -> Arc<Vec<Frame>> {
        let pseudo = |s: &str| Arc::new(vec![Frame::pseudo(s)]);
        match id {
            EMPTY_STACK_ID => return Arc::new(Vec::new()),
            STACK_UNSAMPLED => return pseudo("<stack not sampled>"),
            STACK_FAILED => return pseudo("<stack not captured>"),
            _ => {}
        }
        if let Some(f) = self.symbolizer.cached(pid, id) {
            return f;
        }
        match pystack::read_stack(&self.bpf, id) {
            Ok(Some(stack)) => self.symbolizer.symbolize(pid, id, &stack),
            _ => pseudo("<stack evicted before it was read>"),
        }
    }

    fn read_sites(&mut self) -> Result<(), BpfError> {
        let map = self.bpf.map(SITES_MAP).ok_or(missing(SITES_MAP))?;
        let m: BpfHashMap<_, SiteKey, SiteValue> =
            BpfHashMap::try_from(map).map_err(map_err(SITES_MAP))?;
        let entries: Vec<(SiteKey, SiteValue)> = m.iter().filter_map(Result::ok).collect();
        let mut out: HashMap<(u32, u32), Vec<SiteView>> = HashMap::new();
        let mut idle = Vec::new();
        let now = monotonic_ns();
        for (k, v) in &entries {
            if !self.procs.contains_key(&k.pid) {
                continue;
            }
            if v.opened == v.closed && now.saturating_sub(v.last_ns) > 120_000_000_000 {
                idle.push(*k);
            }
            let frames = self.frames(k.pid, k.stack_id);
            out.entry((k.pid, k.kind)).or_default().push(SiteView {
                stack_id: k.stack_id,
                value: *v,
                frames,
            });
        }
        self.sites = out;
        // Sites with nothing open for two minutes go once the map is half full.
        if entries.len() as u32 > pymedic_common::resource::SITES_MAX / 2 {
            let map = self.bpf.map_mut(SITES_MAP).ok_or(missing(SITES_MAP))?;
            let mut m: BpfHashMap<_, SiteKey, SiteValue> =
                BpfHashMap::try_from(map).map_err(map_err(SITES_MAP))?;
            for k in idle {
                let _ = m.remove(&k);
            }
        }
        Ok(())
    }

    fn read_growth(&mut self) -> Result<(), BpfError> {
        let map = self.bpf.map(GROWTH_MAP).ok_or(missing(GROWTH_MAP))?;
        let m: BpfHashMap<_, GrowthKey, GrowthValue> =
            BpfHashMap::try_from(map).map_err(map_err(GROWTH_MAP))?;
        let entries: Vec<(GrowthKey, GrowthValue)> = m.iter().filter_map(Result::ok).collect();
        let mut out: HashMap<u32, Vec<GrowthView>> = HashMap::new();
        for (k, v) in entries {
            if !self.procs.contains_key(&k.pid) {
                continue;
            }
            let frames = self.frames(k.pid, k.stack_id);
            out.entry(k.pid).or_default().push(GrowthView {
                stack_id: k.stack_id,
                ip: k.ip,
                value: v,
                frames,
            });
        }
        self.growth = out;
        Ok(())
    }

    fn read_pstats(&mut self) -> Result<(), BpfError> {
        let map = self.bpf.map(PSTATS_MAP).ok_or(missing(PSTATS_MAP))?;
        let m: BpfHashMap<_, u32, ProcStats> =
            BpfHashMap::try_from(map).map_err(map_err(PSTATS_MAP))?;
        self.pstats = m.iter().filter_map(Result::ok).collect();
        Ok(())
    }

    fn read_pauses(&mut self) -> Result<(), BpfError> {
        let mut raw = Vec::new();
        if let Some(ring) = self.gc_events.as_mut() {
            while let Some(item) = ring.next() {
                if item.len() >= std::mem::size_of::<GcPause>() {
                    // SAFETY: the record is a GcPause written by the kernel
                    // program; read unaligned from the ring's bytes.
                    raw.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<GcPause>()) });
                }
            }
        }
        for p in raw {
            if !self.procs.contains_key(&p.pid) {
                continue;
            }
            let frames = self.frames(p.pid, p.stack_id);
            let before = if p.pre.len > 0 {
                let mut stack = PyStack {
                    len: p.pre.len.min(PRE_FRAMES as u32),
                    flags: 0,
                    frames: [PyFrame::default(); pymedic_common::pystack::MAX_FRAMES],
                };
                stack.frames[..PRE_FRAMES].copy_from_slice(&p.pre.frames);
                let id = pymedic_common::pystack::stack_id(&stack);
                self.symbolizer.symbolize(p.pid, id, &stack)
            } else {
                Arc::new(Vec::new())
            };
            let q = self.pauses.entry(p.pid).or_default();
            q.push(PauseView {
                duration: Duration::from_nanos(p.duration_ns),
                end_ns: p.end_ns,
                collections: p.collections,
                tid: p.tid,
                samples: p.samples,
                frames,
                before,
            });
            if q.len() > 4096 {
                q.remove(0);
            }
        }
        Ok(())
    }

    fn read_watch(&mut self) -> Result<(), BpfError> {
        let map = self.bpf.map(WATCH_MAP).ok_or(missing(WATCH_MAP))?;
        let m: BpfHashMap<_, WatchKey, u64> =
            BpfHashMap::try_from(map).map_err(map_err(WATCH_MAP))?;
        let entries: Vec<(WatchKey, u64)> = m.iter().filter_map(Result::ok).collect();
        let mut out: WatchHits = HashMap::new();
        for (k, hits) in entries {
            if !self.procs.contains_key(&k.pid) {
                continue;
            }
            let frames = self.frames(k.pid, k.stack_id);
            out.entry((k.pid, k.addr)).or_default().push((frames, hits));
        }
        self.watch_hits = out;
        Ok(())
    }

    /// Drops stacks already symbolized once `PY_STACKS` is half full (the
    /// kernel re-adds live ones).
    fn trim_stacks(&mut self) -> Result<(), BpfError> {
        let map = self
            .bpf
            .map_mut(PY_STACKS_MAP)
            .ok_or(missing(PY_STACKS_MAP))?;
        let mut stacks: BpfHashMap<_, u64, PyStack> =
            BpfHashMap::try_from(map).map_err(map_err(PY_STACKS_MAP))?;
        let ids: Vec<u64> = stacks.keys().filter_map(Result::ok).collect();
        if ids.len() < 2048 {
            return Ok(());
        }
        let pids: Vec<u32> = self.procs.keys().copied().collect();
        for id in ids {
            if pids.iter().any(|&pid| self.symbolizer.has(pid, id)) {
                let _ = stacks.remove(&id);
            }
        }
        Ok(())
    }

    /// Sums of the per-CPU counters.
    pub fn stats(&self) -> Result<[u64; Stat::COUNT as usize], BpfError> {
        let map = self
            .bpf
            .map(pymedic_common::resource::STATS_MAP)
            .ok_or(missing(pymedic_common::resource::STATS_MAP))?;
        let arr = PerCpuArray::<_, u64>::try_from(map)
            .map_err(map_err(pymedic_common::resource::STATS_MAP))?;
        let mut out = [0u64; Stat::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = arr
                .get(&(i as u32), 0)
                .map_err(map_err(pymedic_common::resource::STATS_MAP))?
                .iter()
                .sum();
        }
        Ok(out)
    }

    /// Sites of `pid` of kind `SITE_*` as last polled.
    pub fn sites(&self, pid: u32, kind: u32) -> &[SiteView] {
        self.sites
            .get(&(pid, kind))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Memory growth of `pid` as last polled (cumulative per key).
    pub fn growth(&self, pid: u32) -> &[GrowthView] {
        self.growth.get(&pid).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Counters of `pid` as last polled.
    pub fn proc_stats(&self, pid: u32) -> ProcStats {
        self.pstats.get(&pid).copied().unwrap_or_default()
    }

    /// Collection pauses of `pid` received since the last call.
    pub fn take_pauses(&mut self, pid: u32) -> Vec<PauseView> {
        self.pauses.remove(&pid).unwrap_or_default()
    }

    /// The stack that first wrote the page holding `addr` in `pid`, if the
    /// kernel still remembers it.
    pub fn page_stack(&mut self, pid: u32, addr: u64) -> Option<Arc<Vec<Frame>>> {
        let map = self.bpf.map(PAGES_MAP)?;
        let m: BpfHashMap<_, PageKey, u64> = BpfHashMap::try_from(map).ok()?;
        let key = PageKey {
            page: addr >> 12,
            pid,
            _pad: 0,
        };
        let id = m.get(&key, 0).ok()?;
        if id == STACK_UNSAMPLED || id == STACK_FAILED || id == EMPTY_STACK_ID {
            return None;
        }
        Some(self.frames(pid, id))
    }

    /// Arms write watchpoints on `addr` in every thread of `pid` (at most
    /// `max_threads`), each disarming itself after `hits` writes; replaces
    /// the process's previous watchpoint.
    pub fn arm_watch(
        &mut self,
        pid: u32,
        addr: u64,
        hits: u32,
        max_threads: usize,
    ) -> Result<usize, ResourceError> {
        self.ensure(FEAT_WATCH)?;
        if !self.procs.contains_key(&pid) {
            return Ok(0);
        }
        if self
            .procs
            .get(&pid)
            .is_some_and(|p| p.features & FEAT_WATCH == 0)
        {
            let p = self.procs.get_mut(&pid).expect("checked");
            p.features |= FEAT_WATCH;
            p.info.features = p.features;
            let info = p.info;
            self.procs_map()?
                .insert(pid, info, 0)
                .map_err(map_err(PROCS_MAP))?;
        }
        self.disarm_watch(pid);
        let mut tids = crate::procinfo::thread_ids(pid).unwrap_or_default();
        tids.truncate(max_threads);
        let prog: &PerfEvent = self
            .bpf
            .program("res_watch")
            .ok_or(BpfError::MissingProgram {
                object: OBJECT,
                program: "res_watch",
            })?
            .try_into()
            .map_err(|source| attach_error("res_watch", "perf event", source))?;
        let fd = prog
            .fd()
            .map_err(|source| attach_error("res_watch", "perf event", source))?;
        let w = Watchpoint::arm(fd.as_fd(), addr, &tids, hits)
            .map_err(|source| ResourceError::Watchpoint { pid, addr, source })?;
        let n = w.threads;
        if let Some(p) = self.procs.get_mut(&pid) {
            p.watch = Some(w);
        }
        Ok(n)
    }

    /// The armed watchpoint of `pid`: its address and when it was armed.
    pub fn armed_watch(&self, pid: u32) -> Option<(u64, Instant)> {
        let w = self.procs.get(&pid)?.watch.as_ref()?;
        Some((w.addr, w.armed_at))
    }

    /// Disarms `pid`'s watchpoint, if any.
    pub fn disarm_watch(&mut self, pid: u32) {
        if let Some(w) = self.procs.get_mut(&pid).and_then(|p| p.watch.take()) {
            w.disarm();
        }
    }

    /// Writes to `addr` in `pid` seen by watchpoints, by stack.
    pub fn watch_hits(&self, pid: u32, addr: u64) -> &[(Arc<Vec<Frame>>, u64)] {
        self.watch_hits
            .get(&(pid, addr))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

static LOST_SEEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn attach_error(
    program: &'static str,
    what: &str,
    source: aya::programs::ProgramError,
) -> BpfError {
    if bpf::is_permission_error(&source) {
        BpfError::PermissionDenied {
            object: OBJECT,
            source: Box::new(source),
        }
    } else {
        BpfError::Attach {
            object: OBJECT,
            program,
            what: what.to_string(),
            source: Box::new(source),
        }
    }
}

/// The kernel's per-process settings for `p`: pymalloc's arena size and
/// where its collector state lives.
pub fn res_proc(p: &PythonProcess) -> ResProc {
    let arena_size = if (p.version.major, p.version.minor) >= (3, 10) {
        1 << 20
    } else {
        256 << 10
    };
    let mut info = ResProc {
        arena_size,
        ..ResProc::default()
    };
    if let Some(state) = gc_state_addr(p) {
        let l = layout::for_version(p.version.major, p.version.minor).expect("checked");
        info.gc_collecting_addr = state + u64::from(l.gc.collecting);
        info.gc_stats_addr = state + u64::from(l.gc.stats) + u64::from(l.gc.stats_collections);
        info.gc_stats_stride = l.gc.stats_size;
    }
    info
}

/// Address of the main interpreter's `struct _gc_runtime_state`.
pub fn gc_state_addr(p: &PythonProcess) -> Option<u64> {
    let l = layout::for_version(p.version.major, p.version.minor)?;
    if l.gc.in_runtime {
        return Some(p.runtime_addr + u64::from(l.gc.state));
    }
    let mem = pymedic_python::LiveMemory::new(p.pid);
    let main = pymedic_python::ProcessMemory::read_u64(
        &mem,
        p.runtime_addr + u64::from(l.runtime.interpreters_main),
    )
    .ok()?;
    (main != 0).then(|| main + u64::from(l.gc.state))
}
