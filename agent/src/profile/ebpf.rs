//! The eBPF sampler: loads the `profile` object, opens one CPU-clock perf
//! event per CPU (a perf event opened for one process would sample only its
//! main thread), optionally attaches `sched_switch` for off-CPU time, and
//! turns the kernel's aggregated `(stack, pid, tid, kind) → (count, ns)`
//! map into a [`Profile`].
//!
//! Userspace wakes only to poll (about twice a second): it reads the
//! aggregate, keeps per-key deltas, symbolizes stacks it has not seen while
//! their code objects are alive, and trims the kernel maps when they fill.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use aya::Ebpf;
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent};
use pymedic_common::profile::{
    ERRORS_MAP, GLOBAL_OFFCPU, GLOBAL_SAMPLE_PERIOD_NS, GLOBAL_SWITCH_NEXT_PID_OFF, KIND_OFF_CPU,
    OFFCPU_MAP, OffCpuStart, PENDING_MAP, SAMPLES_DEFAULT_MAX, SAMPLES_MAP, SINCE_MAP,
    STACK_BEFORE_START, STACK_UNKNOWN, STATS_MAP, SampleKey, SampleValue, Stat,
};
use pymedic_common::pystack::{EMPTY_STACK_ID, PY_STACKS_MAP, STACK_TRUNCATED};
use pymedic_python::PythonProcess;

use super::model::{Frame, ProcessInfo, Profile, Sample, SampleKind, ValueKind};
use super::{ProfileConfig, ProfileError, Progress, Sampler};
use crate::bpf::{self, BpfError, map_err, monotonic_ns, objects, tracefs};
use crate::pystack::{self, Symbolizer};

const OBJECT: &str = "profile";

/// A symbolized stack and whether it was truncated.
type SymStack = (Arc<Vec<Frame>>, bool);

/// The eBPF sampler.
pub struct EbpfSampler {
    bpf: Ebpf,
    symbolizer: Symbolizer,
    targets: HashMap<u32, ProcessInfo>,
    rate_hz: u32,
    off_cpu: bool,
    max_stacks: u32,
    /// Kernel values as last read, for deltas.
    last: HashMap<SampleKey, SampleValue>,
    /// Accumulated since the last `take`.
    acc: HashMap<SampleKey, SampleValue>,
    /// Off-CPU time already credited for a thread still off CPU at a
    /// `take`, subtracted when the kernel adds the whole interval.
    credited: HashMap<SampleKey, u64>,
    stacks: HashMap<(u32, u64), SymStack>,
    window_start: (SystemTime, Instant, u64),
    lost_at_take: u64,
    /// Stacks of each target's threads when it was registered (read from
    /// userspace), for time charged to `STACK_BEFORE_START`.
    start_stacks: HashMap<(u32, u32), Vec<Frame>>,
}

impl EbpfSampler {
    /// Loads and attaches the profiling programs.
    pub fn start(config: &ProfileConfig) -> Result<EbpfSampler, ProfileError> {
        let root = tracefs::ensure_mounted().map_err(BpfError::from)?;
        let next_pid_off = tracefs::field_offset(&root, "sched", "sched_switch", "next_pid")
            .map_err(BpfError::from)?;
        let fsbase_off = pystack::kernel_fsbase_offset()?;
        let period_ns = 1_000_000_000u64 / u64::from(config.rate_hz);
        let off_cpu = u32::from(config.off_cpu);
        let max_stacks = config.max_stacks.max(64);
        let mut bpf = bpf::load(OBJECT, objects::PROFILE, |l| {
            pystack::configure_loader(l, &fsbase_off);
            l.override_global(GLOBAL_SWITCH_NEXT_PID_OFF, &next_pid_off, true);
            l.override_global(GLOBAL_OFFCPU, &off_cpu, true);
            l.override_global(GLOBAL_SAMPLE_PERIOD_NS, &period_ns, true);
            l.map_max_entries(PY_STACKS_MAP, max_stacks);
        })?;
        bpf::attach_tracepoint(
            &mut bpf,
            OBJECT,
            "profile_exit",
            "sched",
            "sched_process_exit",
        )?;
        if config.off_cpu {
            bpf::attach_tracepoint(&mut bpf, OBJECT, "profile_switch", "sched", "sched_switch")?;
        }
        attach_perf_events(&mut bpf, period_ns)?;
        Ok(EbpfSampler {
            bpf,
            symbolizer: Symbolizer::new(),
            targets: HashMap::new(),
            rate_hz: config.rate_hz,
            off_cpu: config.off_cpu,
            max_stacks,
            last: HashMap::new(),
            acc: HashMap::new(),
            credited: HashMap::new(),
            stacks: HashMap::new(),
            window_start: (SystemTime::now(), Instant::now(), monotonic_ns()),
            lost_at_take: 0,
            start_stacks: HashMap::new(),
        })
    }

    /// Sums of the per-CPU statistics counters.
    pub fn stats(&self) -> Result<[u64; Stat::COUNT as usize], BpfError> {
        let map = self.bpf.map(STATS_MAP).ok_or(BpfError::MissingMap {
            object: OBJECT,
            map: STATS_MAP,
        })?;
        let arr = PerCpuArray::<_, u64>::try_from(map).map_err(map_err(STATS_MAP))?;
        let mut out = [0u64; Stat::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = arr
                .get(&(i as u32), 0)
                .map_err(map_err(STATS_MAP))?
                .iter()
                .sum();
        }
        Ok(out)
    }

    /// The kernel error counters (`label`, total).
    pub fn errors(&self) -> Result<Vec<(&'static str, u64)>, BpfError> {
        bpf::read_error_counters(&self.bpf, ERRORS_MAP)
    }

    /// The program fds' ids, for BPF run-time statistics (benchmarks).
    pub fn program_ids(&self) -> Vec<(String, u32)> {
        self.bpf
            .programs()
            .filter_map(|(name, p)| Some((name.to_string(), p.info().ok()?.id())))
            .collect()
    }

    /// Every (pid, stack id, captured stack) in the kernel maps right now,
    /// unsymbolized: for recording replay fixtures and debugging.
    pub fn raw_stacks(
        &self,
    ) -> Result<Vec<(u32, u64, pymedic_common::pystack::PyStack)>, BpfError> {
        let map = self.bpf.map(SAMPLES_MAP).ok_or(BpfError::MissingMap {
            object: OBJECT,
            map: SAMPLES_MAP,
        })?;
        let samples: BpfHashMap<_, SampleKey, SampleValue> =
            BpfHashMap::try_from(map).map_err(map_err(SAMPLES_MAP))?;
        let keys: Vec<SampleKey> = samples.keys().filter_map(Result::ok).collect();
        let mut out = Vec::new();
        for key in keys {
            if key.stack_id == EMPTY_STACK_ID {
                continue;
            }
            if let Some(stack) = pystack::read_stack(&self.bpf, key.stack_id)? {
                out.push((key.pid, key.stack_id, stack));
            }
        }
        Ok(out)
    }

    fn samples_map(
        &mut self,
    ) -> Result<BpfHashMap<&mut MapData, SampleKey, SampleValue>, BpfError> {
        let map = self.bpf.map_mut(SAMPLES_MAP).ok_or(BpfError::MissingMap {
            object: OBJECT,
            map: SAMPLES_MAP,
        })?;
        BpfHashMap::try_from(map).map_err(map_err(SAMPLES_MAP))
    }

    fn symbolize(&mut self, pid: u32, id: u64) -> Result<(), BpfError> {
        if id == EMPTY_STACK_ID
            || id == STACK_BEFORE_START
            || id == STACK_UNKNOWN
            || self.stacks.contains_key(&(pid, id))
        {
            return Ok(());
        }
        if let Some(stack) = pystack::read_stack(&self.bpf, id)? {
            let frames = self.symbolizer.symbolize(pid, id, &stack);
            self.stacks
                .insert((pid, id), (frames, stack.flags & STACK_TRUNCATED != 0));
        }
        Ok(())
    }

    /// Reads the aggregate into `acc`, symbolizing new stacks.
    fn collect(&mut self) -> Result<(), BpfError> {
        let entries: Vec<(SampleKey, SampleValue)> = {
            let samples = self.samples_map()?;
            samples.iter().filter_map(Result::ok).collect()
        };
        let mut stale = Vec::new();
        let mut new_threads = Vec::new();
        for (key, value) in &entries {
            let prev = self.last.get(key).copied().unwrap_or_default();
            let mut d_count = value.count.saturating_sub(prev.count);
            let mut d_weight = value.weight_ns.saturating_sub(prev.weight_ns);
            if d_count == 0 && d_weight == 0 {
                stale.push(*key);
                continue;
            }
            if let Some(credit) = self.credited.get_mut(key) {
                let used = (*credit).min(d_weight);
                d_weight -= used;
                *credit -= used;
                if *credit == 0 {
                    self.credited.remove(key);
                }
                if d_weight == 0 {
                    d_count = 0;
                }
            }
            self.last.insert(*key, *value);
            let a = self.acc.entry(*key).or_default();
            a.count += d_count;
            a.weight_ns += d_weight;
            self.symbolize(key.pid, key.stack_id)?;
            if self
                .targets
                .get(&key.pid)
                .is_some_and(|p| !p.threads.contains_key(&key.tid))
            {
                new_threads.push((key.pid, key.tid));
            }
        }
        self.name_threads(&new_threads);
        // Keep the kernel maps bounded: drop keys idle since the last poll
        // once the aggregate is half full, and stacks already symbolized
        // once the stack map is half full (the kernel re-adds live ones).
        if entries.len() as u32 > SAMPLES_DEFAULT_MAX / 2 {
            let mut samples = self.samples_map()?;
            for key in &stale {
                let _ = samples.remove(key);
            }
            for key in &stale {
                self.last.remove(key);
            }
        }
        self.trim_stacks()?;
        Ok(())
    }

    /// Names threads seen for the first time: the Python thread name when
    /// the interpreter's thread list has it, else the kernel's `comm`.
    fn name_threads(&mut self, new: &[(u32, u32)]) {
        let mut python: HashMap<u32, HashMap<u32, String>> = HashMap::new();
        for &(pid, tid) in new {
            let names = python
                .entry(pid)
                .or_insert_with(|| self.symbolizer.thread_names(pid));
            let name = names
                .get(&tid)
                .cloned()
                .unwrap_or_else(|| thread_name(pid, tid));
            if let Some(p) = self.targets.get_mut(&pid) {
                p.threads.insert(tid, name);
            }
        }
    }

    fn trim_stacks(&mut self) -> Result<(), BpfError> {
        let map = self
            .bpf
            .map_mut(PY_STACKS_MAP)
            .ok_or(BpfError::MissingMap {
                object: OBJECT,
                map: PY_STACKS_MAP,
            })?;
        let mut stacks: BpfHashMap<_, u64, pymedic_common::pystack::PyStack> =
            BpfHashMap::try_from(map).map_err(map_err(PY_STACKS_MAP))?;
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

    /// Records when `pid` was registered and which threads it had (with
    /// their stacks), so a thread already blocked then is charged from now
    /// on at its first switch-in.
    fn note_threads_at_start(&mut self, pid: u32) -> Result<(), BpfError> {
        let now = monotonic_ns();
        {
            let map = self.bpf.map_mut(SINCE_MAP).ok_or(BpfError::MissingMap {
                object: OBJECT,
                map: SINCE_MAP,
            })?;
            let mut since: BpfHashMap<_, u32, u64> =
                BpfHashMap::try_from(map).map_err(map_err(SINCE_MAP))?;
            since.insert(pid, now, 0).map_err(map_err(SINCE_MAP))?;
        }
        let tids = crate::procinfo::thread_ids(pid).unwrap_or_default();
        {
            let map = self.bpf.map_mut(PENDING_MAP).ok_or(BpfError::MissingMap {
                object: OBJECT,
                map: PENDING_MAP,
            })?;
            let mut pending: BpfHashMap<_, u32, u32> =
                BpfHashMap::try_from(map).map_err(map_err(PENDING_MAP))?;
            for &tid in &tids {
                if let Err(e) = pending.insert(tid, pid, 0) {
                    tracing::debug!(pid, tid, "thread not pending: {e}");
                }
            }
        }
        self.start_stacks.retain(|k, _| k.0 != pid);
        for (tid, frames) in self.symbolizer.thread_stacks(pid) {
            self.start_stacks.insert((pid, tid), frames);
        }
        Ok(())
    }

    /// Threads of the targets that neither ran nor switched during the
    /// whole window (blocked since before it began): their stacks, read from
    /// userspace, charged the whole window off CPU.
    fn blocked_all_window(&self, window_ns: u64) -> Result<Vec<Sample>, BpfError> {
        let map = self.bpf.map(OFFCPU_MAP).ok_or(BpfError::MissingMap {
            object: OBJECT,
            map: OFFCPU_MAP,
        })?;
        let open: BpfHashMap<_, u32, OffCpuStart> =
            BpfHashMap::try_from(map).map_err(map_err(OFFCPU_MAP))?;
        let open: std::collections::HashSet<u32> = open.keys().filter_map(Result::ok).collect();
        let active: std::collections::HashSet<(u32, u32)> =
            self.acc.keys().map(|k| (k.pid, k.tid)).collect();
        let mut out = Vec::new();
        for &pid in self.targets.keys() {
            let tids = crate::procinfo::thread_ids(pid).unwrap_or_default();
            if tids
                .iter()
                .all(|t| open.contains(t) || active.contains(&(pid, *t)))
            {
                continue;
            }
            let stacks = self.symbolizer.thread_stacks(pid);
            for tid in tids {
                if open.contains(&tid) || active.contains(&(pid, tid)) {
                    continue;
                }
                out.push(Sample {
                    pid,
                    tid,
                    kind: SampleKind::OffCpu,
                    frames: stacks.get(&tid).cloned().unwrap_or_default(),
                    truncated: false,
                    count: 1,
                    weight_ns: window_ns,
                });
            }
        }
        Ok(out)
    }

    /// Off-CPU intervals still open (threads asleep now), credited up to now.
    fn open_intervals(&self, now_ns: u64) -> Result<Vec<(SampleKey, u64)>, BpfError> {
        let map = self.bpf.map(OFFCPU_MAP).ok_or(BpfError::MissingMap {
            object: OBJECT,
            map: OFFCPU_MAP,
        })?;
        let open: BpfHashMap<_, u32, OffCpuStart> =
            BpfHashMap::try_from(map).map_err(map_err(OFFCPU_MAP))?;
        let mut out = Vec::new();
        for (tid, start) in open.iter().filter_map(Result::ok) {
            if !self.targets.contains_key(&start.pid) {
                continue;
            }
            let key = SampleKey {
                stack_id: start.stack_id,
                pid: start.pid,
                tid,
                kind: KIND_OFF_CPU,
                _pad: 0,
            };
            let from = start.ktime_ns.max(self.window_start.2);
            let ns = now_ns.saturating_sub(from);
            out.push((key, ns));
        }
        Ok(out)
    }
}

fn attach_perf_events(bpf: &mut Ebpf, period_ns: u64) -> Result<(), ProfileError> {
    let program = "profile_cpu";
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
    prog.load().map_err(|source| {
        if bpf::is_permission_error(&source) {
            BpfError::PermissionDenied {
                object: OBJECT,
                source: Box::new(source),
            }
        } else {
            BpfError::Attach {
                object: OBJECT,
                program,
                what: "perf event (verifier)".into(),
                source: Box::new(source),
            }
        }
    })?;
    let cpus = aya::util::online_cpus().map_err(|(what, e)| ProfileError::Cpus(what, e))?;
    for cpu in cpus {
        prog.attach(
            PerfEventConfig::Software(SoftwareEvent::CpuClock),
            PerfEventScope::AllProcessesOneCpu { cpu },
            SamplePolicy::Period(period_ns),
            false,
        )
        .map_err(|source| ProfileError::PerfEvent {
            cpu,
            source: Box::new(source),
        })?;
    }
    Ok(())
}

/// `/proc/PID/task/TID/comm`, or `thread` when it is gone.
fn thread_name(pid: u32, tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_else(|_| "thread".into())
}

impl Sampler for EbpfSampler {
    fn add_target(&mut self, p: &PythonProcess) -> Result<(), ProfileError> {
        let info = crate::procinfo::read(p.pid).ok();
        let start_ticks = info.as_ref().map(|i| i.start_ticks).unwrap_or(0);
        if self.symbolizer.start_ticks(p.pid).is_some() {
            // Already known: an exec (same pid and start time, new image) or
            // a reused pid. Symbolize what was captured under the old image
            // first, then start afresh.
            if let Err(e) = self.collect() {
                tracing::warn!(pid = p.pid, "collecting samples before re-registering: {e}");
            }
        }
        self.symbolizer.add_process(p, start_ticks);
        self.stacks.retain(|k, _| k.0 != p.pid);
        pystack::register(&mut self.bpf, p)?;
        if self.off_cpu {
            self.note_threads_at_start(p.pid)?;
        }
        self.targets.insert(
            p.pid,
            ProcessInfo {
                pid: p.pid,
                command: info.map(|i| i.cmdline.join(" ")).unwrap_or_default(),
                threads: HashMap::new(),
            },
        );
        Ok(())
    }

    fn remove_target(&mut self, pid: u32) {
        if let Err(e) = self.collect() {
            tracing::warn!("collecting samples before removing {pid}: {e}");
        }
        if let Err(e) = pystack::unregister(&mut self.bpf, pid) {
            tracing::warn!("unregistering {pid}: {e}");
        }
        self.symbolizer.remove_process(pid);
    }

    fn poll(&mut self) -> Result<Progress, ProfileError> {
        self.collect()?;
        let stats = self.stats()?;
        Ok(Progress {
            samples: stats[Stat::OnCpuSamples as usize] + stats[Stat::OffCpuIntervals as usize],
            lost: stats[Stat::Lost as usize],
            processes: self.targets.len(),
        })
    }

    fn take(&mut self) -> Result<Profile, ProfileError> {
        self.collect()?;
        let now_ns = monotonic_ns();
        if self.off_cpu {
            for (key, ns) in self.open_intervals(now_ns)? {
                self.symbolize(key.pid, key.stack_id)?;
                let a = self.acc.entry(key).or_default();
                a.count += 1;
                a.weight_ns += ns;
                *self.credited.entry(key).or_default() += ns;
            }
        }
        let window_ns = now_ns.saturating_sub(self.window_start.2);
        let blocked = if self.off_cpu {
            self.blocked_all_window(window_ns)?
        } else {
            Vec::new()
        };
        for s in &blocked {
            // When the thread finally runs, the kernel charges it from
            // registration on: this window's share is already counted.
            let key = SampleKey {
                stack_id: STACK_BEFORE_START,
                pid: s.pid,
                tid: s.tid,
                kind: KIND_OFF_CPU,
                _pad: 0,
            };
            *self.credited.entry(key).or_default() += s.weight_ns;
        }
        let unnamed: Vec<(u32, u32)> = blocked
            .iter()
            .filter(|s| {
                self.targets
                    .get(&s.pid)
                    .is_some_and(|p| !p.threads.contains_key(&s.tid))
            })
            .map(|s| (s.pid, s.tid))
            .collect();
        self.name_threads(&unnamed);
        let lost_total = self.stats()?[Stat::Lost as usize];
        let mut samples = Vec::with_capacity(self.acc.len() + blocked.len());
        samples.extend(blocked);
        for (key, value) in self.acc.drain() {
            let kind = if key.kind == KIND_OFF_CPU {
                SampleKind::OffCpu
            } else {
                SampleKind::OnCpu
            };
            let (frames, truncated) = if key.stack_id == EMPTY_STACK_ID {
                (Vec::new(), false)
            } else if key.stack_id == STACK_BEFORE_START {
                match self.start_stacks.get(&(key.pid, key.tid)) {
                    Some(f) => (f.clone(), false),
                    None => (
                        vec![Frame::pseudo("<blocked since before recording>")],
                        false,
                    ),
                }
            } else if key.stack_id == STACK_UNKNOWN {
                (vec![Frame::pseudo("<stack not captured>")], false)
            } else {
                match self.stacks.get(&(key.pid, key.stack_id)) {
                    Some((f, t)) => (f.as_ref().clone(), *t),
                    None => (
                        vec![Frame::pseudo("<stack evicted before it was read>")],
                        false,
                    ),
                }
            };
            samples.push(Sample {
                pid: key.pid,
                tid: key.tid,
                kind,
                frames,
                truncated,
                count: value.count,
                weight_ns: value.weight_ns,
            });
        }
        let (start, started, _) = self.window_start;
        let profile = Profile {
            samples,
            processes: self.targets.values().cloned().collect(),
            start,
            duration: started.elapsed(),
            rate_hz: self.rate_hz,
            value_kind: if self.off_cpu {
                ValueKind::WallNanos
            } else {
                ValueKind::CpuSamples
            },
            lost: lost_total - self.lost_at_take,
            sampler: "ebpf",
        };
        self.lost_at_take = lost_total;
        self.window_start = (SystemTime::now(), Instant::now(), now_ns);
        let mut profile = profile;
        profile.merge_duplicates();
        Ok(profile)
    }
}
