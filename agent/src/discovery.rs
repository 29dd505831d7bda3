//! Python process discovery, driven by the kernel rather than `/proc` polling.
//!
//! The `discovery` eBPF object reports every exec, forks of tracked
//! processes, and exits of tracked processes into a ring buffer. This module
//! classifies each new image with [`pymedic_python::inspect`] (retrying
//! briefly while the dynamic loader maps `libpython`), keeps the kernel's
//! `TRACKED_PIDS` map in step, and yields [`ProcessEvent`]s.
//!
//! `/proc` is scanned once, at start, for processes that predate us.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use aya::Ebpf;
use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};
use pymedic_common::discovery::{
    ERRORS_MAP, GLOBAL_NEWTASK_CLONE_FLAGS_OFF, GLOBAL_NEWTASK_PID_OFF, PROC_EVENTS_MAP, ProcEvent,
    ProcEventKind, TRACKED_MAP,
};
use pymedic_python::PythonProcess;
use pymedic_python::inspect::{InspectError, Inspector};
use tokio::io::unix::AsyncFd;

use crate::bpf::{self, BpfError, objects, tracefs};
use crate::procinfo;

const OBJECT: &str = "discovery";

/// A change in the set of Python processes.
#[derive(Clone, Debug)]
pub enum ProcessEvent {
    /// A Python process exists (found at start, exec'd, or forked).
    Started {
        process: PythonProcess,
        /// Start time in clock ticks after boot (identity with `pid`).
        start_ticks: u64,
        /// How it was found.
        via: Via,
    },
    /// A tracked Python process exited.
    Exited { pid: u32, start_ticks: u64 },
}

/// How a process was discovered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Scan,
    Exec,
    Fork,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Scan => "scan",
            Via::Exec => "exec",
            Via::Fork => "fork",
        }
    }
}

/// An exec whose image may still be loading its libraries.
struct Pending {
    pid: u32,
    via: Via,
    next_try: Instant,
    attempts: u32,
}

/// Watches for Python processes. Create it inside a tokio runtime.
pub struct Discovery {
    bpf: Ebpf,
    ring: AsyncFd<RingBuf<MapData>>,
    tracked_map: BpfHashMap<MapData, u32, u8>,
    tracked: HashMap<u32, u64>,
    inspector: Inspector,
    pending: Vec<Pending>,
    ready: VecDeque<ProcessEvent>,
}

/// Retry schedule for an exec'd image whose `libpython` is not mapped yet.
const RETRY_DELAYS_MS: [u64; 6] = [5, 15, 40, 100, 250, 600];

impl Discovery {
    /// Loads and attaches the discovery programs, then scans `/proc` once.
    pub fn start() -> Result<Discovery, BpfError> {
        let root = tracefs::ensure_mounted()?;
        let pid_off = tracefs::field_offset(&root, "task", "task_newtask", "pid")?;
        let flags_off = tracefs::field_offset(&root, "task", "task_newtask", "clone_flags")?;
        let mut bpf = bpf::load(OBJECT, objects::DISCOVERY, |l| {
            l.override_global(GLOBAL_NEWTASK_PID_OFF, &pid_off, true);
            l.override_global(GLOBAL_NEWTASK_CLONE_FLAGS_OFF, &flags_off, true);
        })?;
        bpf::attach_tracepoint(
            &mut bpf,
            OBJECT,
            "sched_process_exec",
            "sched",
            "sched_process_exec",
        )?;
        bpf::attach_tracepoint(&mut bpf, OBJECT, "task_newtask", "task", "task_newtask")?;
        bpf::attach_tracepoint(
            &mut bpf,
            OBJECT,
            "sched_process_exit",
            "sched",
            "sched_process_exit",
        )?;

        let ring_map = bpf.take_map(PROC_EVENTS_MAP).ok_or(BpfError::MissingMap {
            object: OBJECT,
            map: PROC_EVENTS_MAP,
        })?;
        let ring = RingBuf::try_from(ring_map).map_err(|source| BpfError::Map {
            map: PROC_EVENTS_MAP,
            source: Box::new(source),
        })?;
        // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged,
        // for as long as the AsyncFd owns the RingBuf.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| BpfError::Io {
                op: "register the discovery ring buffer with the runtime",
                source: e.into(),
            })?;
        let tracked_map = bpf.take_map(TRACKED_MAP).ok_or(BpfError::MissingMap {
            object: OBJECT,
            map: TRACKED_MAP,
        })?;
        let tracked_map = BpfHashMap::try_from(tracked_map).map_err(|source| BpfError::Map {
            map: TRACKED_MAP,
            source: Box::new(source),
        })?;

        let mut d = Discovery {
            bpf,
            ring,
            tracked_map,
            tracked: HashMap::new(),
            inspector: Inspector::new(),
            pending: Vec::new(),
            ready: VecDeque::new(),
        };
        // Attach first, then scan: a process started in between is seen by
        // both, and `track` deduplicates.
        let me = std::process::id();
        for pid in procinfo::all_pids().map_err(|source| BpfError::Io {
            op: "list /proc",
            source,
        })? {
            if pid != me {
                d.classify(pid, Via::Scan);
            }
        }
        Ok(d)
    }

    /// Processes currently tracked, by pid → start ticks.
    pub fn tracked(&self) -> &HashMap<u32, u64> {
        &self.tracked
    }

    /// Error counters of the discovery programs (`label`, total).
    pub fn error_counters(&self) -> Vec<(&'static str, u64)> {
        bpf::read_error_counters(&self.bpf, ERRORS_MAP).unwrap_or_default()
    }

    /// Tries to classify `pid`; returns true when the answer is final.
    fn classify(&mut self, pid: u32, via: Via) -> bool {
        match self.inspector.inspect(pid) {
            Ok(process) => {
                let start_ticks = procinfo::read(pid).map(|p| p.start_ticks).unwrap_or(0);
                if self.tracked.get(&pid) == Some(&start_ticks) {
                    return true;
                }
                if let Err(e) = self.tracked_map.insert(pid, 1u8, 0) {
                    tracing::warn!(pid, "could not track process in the kernel map: {e}");
                }
                self.tracked.insert(pid, start_ticks);
                self.ready.push_back(ProcessEvent::Started {
                    process,
                    start_ticks,
                    via,
                });
                true
            }
            Err(InspectError::NoSuchProcess { .. }) => {
                self.forget(pid);
                true
            }
            Err(InspectError::NotPython { .. }) => {
                // After exec, libpython is mapped by ld.so shortly; until then
                // a Python image looks like "not Python".
                via == Via::Scan || !self.might_become_python(pid)
            }
            Err(e) => {
                tracing::debug!(pid, "not tracking: {e}");
                true
            }
        }
    }

    /// True while an exec'd image may still map libpython: its executable
    /// names python, or links against libpython.
    fn might_become_python(&self, pid: u32) -> bool {
        let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
            return false;
        };
        let name = exe.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.as_deref().is_some_and(|n| n.contains("python")) {
            return true;
        }
        pymedic_python::elf::needs_libpython(&format!("/proc/{pid}/exe")).unwrap_or(false)
    }

    fn forget(&mut self, pid: u32) {
        if let Some(start_ticks) = self.tracked.remove(&pid) {
            let _ = self.tracked_map.remove(&pid);
            self.ready
                .push_back(ProcessEvent::Exited { pid, start_ticks });
        }
    }

    fn handle(&mut self, ev: ProcEvent) {
        match ev.kind() {
            Some(ProcEventKind::Exec) => {
                // A tracked process that execs may become something else.
                if let Some(start_ticks) = self.tracked.remove(&ev.pid) {
                    let _ = self.tracked_map.remove(&ev.pid);
                    self.ready.push_back(ProcessEvent::Exited {
                        pid: ev.pid,
                        start_ticks,
                    });
                }
                self.try_or_defer(ev.pid, Via::Exec);
            }
            Some(ProcEventKind::Fork) => self.try_or_defer(ev.pid, Via::Fork),
            Some(ProcEventKind::Exit) => self.forget(ev.pid),
            None => tracing::debug!(kind = ev.kind, "unknown discovery event kind"),
        }
    }

    fn try_or_defer(&mut self, pid: u32, via: Via) {
        if !self.classify(pid, via) {
            self.pending.retain(|p| p.pid != pid);
            self.pending.push(Pending {
                pid,
                via,
                next_try: Instant::now() + Duration::from_millis(RETRY_DELAYS_MS[0]),
                attempts: 1,
            });
        }
    }

    fn retry_pending(&mut self) {
        let now = Instant::now();
        let due: Vec<Pending> = {
            let (due, keep) = std::mem::take(&mut self.pending)
                .into_iter()
                .partition(|p| p.next_try <= now);
            self.pending = keep;
            due
        };
        for mut p in due {
            if self.classify(p.pid, p.via) {
                continue;
            }
            if let Some(delay) = RETRY_DELAYS_MS.get(p.attempts as usize) {
                p.attempts += 1;
                p.next_try = now + Duration::from_millis(*delay);
                self.pending.push(p);
            }
        }
    }

    /// The next change. Waits on the ring buffer (and on retry deadlines).
    pub async fn next(&mut self) -> Result<ProcessEvent, BpfError> {
        loop {
            if let Some(ev) = self.ready.pop_front() {
                return Ok(ev);
            }
            self.retry_pending();
            if let Some(ev) = self.ready.pop_front() {
                return Ok(ev);
            }
            let deadline = self.pending.iter().map(|p| p.next_try).min();
            let readable = self.ring.readable_mut();
            let mut guard = match deadline {
                Some(d) => match tokio::time::timeout_at(d.into(), readable).await {
                    Ok(g) => g,
                    Err(_) => continue,
                },
                None => readable.await,
            }
            .map_err(|source| BpfError::Io {
                op: "wait on the discovery ring buffer",
                source,
            })?;
            let mut events = Vec::new();
            {
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if item.len() >= std::mem::size_of::<ProcEvent>() {
                        // SAFETY: the kernel side writes a whole ProcEvent
                        // (checked length); read_unaligned copes with any
                        // alignment of the ring buffer slot.
                        let ev =
                            unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<ProcEvent>()) };
                        events.push(ev);
                    }
                }
            }
            guard.clear_ready();
            for ev in events {
                self.handle(ev);
            }
        }
    }
}
