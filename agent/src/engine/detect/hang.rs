//! `hang`: a thread that has made no progress for `threshold` (30 s) while
//! blocked in a wait nothing will end: a join of a thread that is stuck
//! too, a lock whose holder is stuck (or that nothing holds any more), a
//! queue `get`/`put`, semaphore or barrier when no thread of the process
//! can still run to feed it, or, on the main thread, a blocking read or
//! connect (not `accept`, polling or the terminal). A thread "can still
//! run" when it makes progress or waits for the outside world or the clock
//! (I/O, sleep, a child, any timed wait). Deadlock cycles are left to
//! `deadlock`.
//!
//! Progress is the kernel's per-thread scheduling counters
//! (`/proc/PID/task/TID/schedstat`: time on CPU and times scheduled); a
//! thread whose counters have not moved has not run at all. A thread seen
//! for the first time whose counters the next check finds unmoved is taken
//! as still since it last ran (the scheduler's `se.exec_start` in
//! `/proc/PID/task/TID/sched`, against the clock of the CPU it ran on),
//! so a process that was already hung when
//! pymedic attached is reported at the second check. Only when some
//! thread has been still for `threshold` is the process read (the `dump`
//! engine, without stopping it) to classify the waits. Never hangs: sleeps,
//! event-loop and selector waits, `accept`, timed waits, `Event.wait` and
//! `Condition.wait` (signals that may legitimately never come, such as a
//! shutdown event set by a signal handler), and workers idle on a queue
//! while some thread can still feed it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pymedic_model::{Finding, Kind, Layer, Related, Severity, Stack};
use pymedic_python::InspectError;
use serde_json::json;

use super::{CheckContext, DetectError, Detector, Settings, Watch};
use crate::deadlock;
use crate::dump::{DumpError, DumpOptions, Dumper, Snapshot, ThreadDump, WaitKind};
use crate::engine::targets::TargetInfo;
use crate::engine::usage;

const NAME: &str = "hang";

pub struct Hang {
    threshold: Duration,
}

/// `[detectors.hang]`: `interval` (2s), `threshold` (30s).
pub fn new(s: &Settings) -> Result<Arc<dyn Detector>, DetectError> {
    s.only(&["threshold"])?;
    Ok(Arc::new(Hang {
        threshold: s.duration("threshold", Duration::from_secs(30))?,
    }))
}

impl Detector for Hang {
    fn name(&self) -> &'static str {
        NAME
    }
    fn layer(&self) -> Layer {
        Layer::Temporal
    }
    fn kinds(&self) -> Vec<Kind> {
        vec![Kind::HANG]
    }
    fn interval(&self) -> Duration {
        Duration::from_secs(2)
    }
    fn watch(&self, target: &TargetInfo) -> Result<Option<Box<dyn Watch>>, DetectError> {
        match Dumper::for_process(target.process.clone()) {
            Ok(dumper) => Ok(Some(Box::new(HangWatch {
                dumper,
                threshold: self.threshold,
                still: HashMap::new(),
                last_ran: HashMap::new(),
                verdict: None,
            }))),
            Err(
                DumpError::Exited { pid } | DumpError::Inspect(InspectError::NoSuchProcess { pid }),
            ) => Err(DetectError::Gone { pid }),
            Err(DumpError::Inspect(
                e @ (InspectError::UnsupportedVersion { .. } | InspectError::NotPython { .. }),
            )) => {
                tracing::info!(pid = target.id.pid, "hang detector does not apply: {e}");
                Ok(None)
            }
            Err(e) => Err(DetectError::Check {
                detector: NAME,
                op: "prepare to read the interpreter",
                message: e.to_string(),
            }),
        }
    }
}

/// A thread's scheduling counters: (ns on CPU, times scheduled).
type Progress = (u64, u64);

struct HangWatch {
    dumper: Dumper,
    threshold: Duration,
    /// Per tid: its counters and since when they have not moved.
    still: HashMap<u32, (Progress, Instant)>,
    /// Per tid first seen: when the scheduler says it last ran. Applied
    /// only if the next check finds its counters unmoved: the scheduler's
    /// per-CPU clocks can disagree by seconds (steal, IRQ time), and a busy
    /// thread once read as still for 3 s.
    last_ran: HashMap<u32, Instant>,
    /// The standing verdict and the stuck threads it rests on.
    verdict: Option<(Vec<u32>, Vec<Finding>)>,
}

fn read_progress(pid: u32) -> Result<HashMap<u32, Progress>, DetectError> {
    let tids = crate::procinfo::thread_ids(pid).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DetectError::Gone { pid },
        _ => DetectError::Check {
            detector: NAME,
            op: "list the threads",
            message: e.to_string(),
        },
    })?;
    Ok(tids
        .into_iter()
        .filter_map(|tid| {
            let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok()?;
            Some((tid, parse_schedstat(&text)?))
        })
        .collect())
}

/// The scheduler clock's present (ms) on `cpu`: this thread's own
/// `se.exec_start`, read while it runs there. Each CPU keeps its own
/// scheduler clock, and in a VM they disagree by seconds (8.7 s between
/// the two CPUs of the machine this was written on), so a thread's
/// `se.exec_start` is only comparable with a reading on the CPU it last
/// ran on: this thread moves there for the read and back. `None` without
/// `CONFIG_SCHED_DEBUG`, or when it cannot run on `cpu`.
fn sched_now_ms_on(cpu: usize) -> Option<f64> {
    let size = std::mem::size_of::<libc::cpu_set_t>();
    if cpu >= 8 * size {
        return None;
    }
    // SAFETY: an all-zero cpu_set_t is the empty set (plain C struct).
    let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `old` is a valid, writable cpu_set_t of `size` bytes; pid 0
    // is the calling thread.
    if unsafe { libc::sched_getaffinity(0, size, &mut old) } != 0 {
        return None;
    }
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit inside the set (`cpu` is bounded by
    // the set's size above).
    unsafe { libc::CPU_SET(cpu, &mut one) };
    // SAFETY: `one` is a valid cpu_set_t; setting the calling thread's
    // affinity migrates it before the call returns.
    if unsafe { libc::sched_setaffinity(0, size, &one) } != 0 {
        return None;
    }
    let now = std::fs::read_to_string("/proc/thread-self/sched")
        .ok()
        .and_then(|t| exec_start_ms(&t));
    // SAFETY: restores the mask read above on the calling thread.
    unsafe { libc::sched_setaffinity(0, size, &old) };
    now
}

/// The CPU thread `tid` of `pid` last ran on.
fn last_cpu(pid: u32, tid: u32) -> Option<usize> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    crate::procinfo::parse_stat(&stat)?.last_cpu
}

/// How long thread `tid` of `pid` has been off the CPU: its
/// `se.exec_start` (when it last ran) against the scheduler clock of the
/// CPU it ran on (`clocks` caches one reading per CPU for this check).
fn off_cpu_for(pid: u32, tid: u32, clocks: &mut HashMap<usize, Option<f64>>) -> Option<Duration> {
    let cpu = last_cpu(pid, tid)?;
    let then =
        exec_start_ms(&std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/sched")).ok()?)?;
    let now = (*clocks.entry(cpu).or_insert_with(|| sched_now_ms_on(cpu)))?;
    let ms = now - then;
    (ms.is_finite() && ms > 0.0).then(|| Duration::from_secs_f64(ms / 1000.0))
}

/// `se.exec_start  :  14589736.603051` in `/proc/.../sched`.
fn exec_start_ms(text: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix("se.exec_start"))
        .and_then(|rest| rest.split(':').nth(1))
        .and_then(|v| v.trim().parse().ok())
}

/// `run_ns wait_ns timeslices` → (run_ns, timeslices).
fn parse_schedstat(text: &str) -> Option<Progress> {
    let mut it = text.split_whitespace();
    let run = it.next()?.parse().ok()?;
    let _wait: u64 = it.next()?.parse().ok()?;
    let slices = it.next()?.parse().ok()?;
    Some((run, slices))
}

/// A thread that can resume by itself: making progress, or waiting for
/// the outside world or the clock (I/O, sleep, a child, a timed wait).
fn alive(t: &ThreadDump, stuck: &[u32]) -> bool {
    if !stuck.contains(&t.tid) {
        return true;
    }
    match &t.waiting {
        None => true,
        Some(w) => {
            w.timed
                || matches!(
                    w.kind,
                    WaitKind::Sleep
                        | WaitKind::Io
                        | WaitKind::Child
                        | WaitKind::Syscall
                        | WaitKind::Gil
                )
        }
    }
}

/// Why a thread still for long is hung, or `None` when its wait is idle or
/// something may still end it. `alive`: tids of threads that can resume
/// by themselves.
fn hung_reason(
    t: &ThreadDump,
    holder: Option<u32>,
    pid: u32,
    alive: &[u32],
    in_cycle: &[u32],
) -> Option<String> {
    let w = t.waiting.as_ref()?;
    if w.timed || in_cycle.contains(&t.tid) || alive.contains(&t.tid) && w.kind != WaitKind::Io {
        return None;
    }
    // Another thread that can still run may yet put, release or arrive.
    let others_alive = alive.iter().any(|&a| a != t.tid);
    let detail = w.detail.clone().unwrap_or_default();
    match w.kind {
        WaitKind::Lock | WaitKind::Futex => match holder {
            Some(h) if alive.contains(&h) => None,
            Some(h) => Some(format!(
                "waits for {} held by thread {h}, which is stuck too",
                w.lock.as_ref().map_or("a lock".into(), |l| l.name.clone())
            )),
            None if w.kind == WaitKind::Lock => Some(format!(
                "waits for {}, which nothing will release",
                w.lock.as_ref().map_or("a lock".into(), |l| l.name.clone())
            )),
            None => (!others_alive).then(|| format!("waits on {detail}")),
        },
        WaitKind::Join => match w.target_tid {
            Some(other) if alive.contains(&other) || in_cycle.contains(&other) => None,
            Some(other) => Some(format!("joins thread {other}, which is stuck too")),
            None => (!others_alive).then(|| "joins a thread that does not finish".into()),
        },
        WaitKind::Queue | WaitKind::Semaphore | WaitKind::Barrier if !others_alive => Some(
            format!("waits on a {} no running thread can feed", w.kind.as_str()),
        ),
        WaitKind::Io if t.tid == pid => {
            let idle = [
                "epoll", "select", "poll", "accept", "listen", "fd 0", "tty", "pts",
            ];
            let sc = w.syscall.clone().unwrap_or_default();
            if idle.iter().any(|i| sc.contains(i) || detail.contains(i)) {
                None
            } else {
                Some(format!("blocked in {sc} on {detail}"))
            }
        }
        _ => None,
    }
}

/// The thread holding the lock `t` waits for, when known.
fn holder_of(snap: &Snapshot, t: &ThreadDump) -> Option<u32> {
    let w = t.waiting.as_ref()?;
    let lock = w.lock.as_ref()?;
    w.holder_tid.or_else(|| {
        snap.threads
            .iter()
            .find(|x| x.tid != t.tid && x.holds.iter().any(|h| h.lock.id == lock.id))
            .map(|x| x.tid)
    })
}

impl HangWatch {
    fn judge(
        &self,
        snap: &Snapshot,
        stuck: &[(u32, Duration)],
        cx: &CheckContext<'_>,
    ) -> Vec<Finding> {
        let pid = cx.target.id.pid;
        let stuck_tids: Vec<u32> = stuck.iter().map(|s| s.0).collect();
        let alive_tids: Vec<u32> = snap
            .threads
            .iter()
            .filter(|t| alive(t, &stuck_tids))
            .map(|t| t.tid)
            .collect();
        let in_cycle: Vec<u32> = deadlock::analyze(snap)
            .deadlocks
            .iter()
            .flat_map(|d| d.threads.iter().map(|t| t.tid))
            .collect();
        let target = cx.target.model();
        let mut out = Vec::new();
        for t in &snap.threads {
            let Some(&(_, still_for)) = stuck.iter().find(|s| s.0 == t.tid) else {
                continue;
            };
            let holder = holder_of(snap, t);
            let Some(reason) = hung_reason(t, holder, pid, &alive_tids, &in_cycle) else {
                continue;
            };
            let w = t.waiting.as_ref().expect("hung_reason needs a wait");
            let Some(at) =
                w.at.clone()
                    .or_else(|| t.top_python().map(|f| f.location()))
            else {
                continue;
            };
            let mut f = Finding::new(
                Layer::Temporal,
                Kind::HANG,
                Severity::High,
                0.8,
                format!(
                    "Thread {} has made no progress for {:.0} s: {reason} at {}:{}",
                    t.name,
                    still_for.as_secs_f64(),
                    at.file,
                    at.line
                ),
                Some(target.clone()),
                at,
            )
            .with_discriminator(&t.tid.to_string());
            f.stacks.push(Stack {
                thread: t.name.clone(),
                tid: t.tid,
                frames: t.python_frames().map(|f| f.location()).collect(),
            });
            let other = holder.or(w.target_tid);
            if let Some(o) = other.and_then(|o| snap.threads.iter().find(|x| x.tid == o)) {
                if let Some(site) = o
                    .waiting
                    .as_ref()
                    .and_then(|ow| ow.at.clone())
                    .or_else(|| o.top_python().map(|f| f.location()))
                {
                    let doing = o
                        .waiting
                        .as_ref()
                        .map(|ow| format!("waits ({})", ow.kind.as_str()))
                        .unwrap_or_else(|| "runs".into());
                    f.related.push(Related::new(
                        &site,
                        format!("thread {} ({}) {doing} here", o.name, o.tid),
                    ));
                }
                f.stacks.push(Stack {
                    thread: o.name.clone(),
                    tid: o.tid,
                    frames: o.python_frames().map(|f| f.location()).collect(),
                });
            }
            f.evidence = json!({
                "no_progress_seconds": (still_for.as_secs_f64() * 10.0).round() / 10.0,
                "threshold_seconds": self.threshold.as_secs_f64(),
                "wait": w.kind.as_str(),
                "syscall": w.syscall,
                "detail": w.detail,
                "other_thread": other,
                "main_thread": t.tid == pid,
            });
            out.push(f);
        }
        out
    }
}

impl Watch for HangWatch {
    fn check(&mut self, cx: &CheckContext<'_>) -> Result<Vec<Finding>, DetectError> {
        let pid = cx.target.id.pid;
        let now = read_progress(pid)?;
        self.still.retain(|tid, _| now.contains_key(tid));
        // Scheduler clocks by CPU, read once per check and only for new threads.
        let mut clocks = HashMap::new();
        self.last_ran.retain(|tid, _| now.contains_key(tid));
        for (tid, p) in &now {
            match self.still.get(tid) {
                Some((prev, _)) if prev == p => {
                    // Unmoved since first seen: it was still since it last
                    // ran, before we looked.
                    if let Some(ran) = self.last_ran.remove(tid)
                        && let Some(entry) = self.still.get_mut(tid)
                    {
                        entry.1 = entry.1.min(ran);
                    }
                }
                Some(_) => {
                    self.last_ran.remove(tid);
                    self.still.insert(*tid, (*p, Instant::now()));
                }
                // First seen: it may have been still long before we looked
                // (an incident responder points pymedic at a process that
                // is already hung), so once the next check confirms it has
                // not moved, the clock starts when it last ran.
                None => {
                    if let Some(ran) = off_cpu_for(pid, *tid, &mut clocks)
                        .and_then(|d| Instant::now().checked_sub(d))
                    {
                        self.last_ran.insert(*tid, ran);
                    }
                    self.still.insert(*tid, (*p, Instant::now()));
                }
            }
        }
        let mut stuck: Vec<(u32, Duration)> = self
            .still
            .iter()
            .map(|(tid, (_, since))| (*tid, since.elapsed()))
            .filter(|(_, d)| *d >= self.threshold)
            .collect();
        stuck.sort();
        if stuck.is_empty() {
            self.verdict = None;
            return Ok(Vec::new());
        }
        let tids: Vec<u32> = stuck.iter().map(|s| s.0).collect();
        if let Some((on, findings)) = &self.verdict
            && *on == tids
        {
            // Nothing moved: the same threads are still where they were.
            let mut findings = findings.clone();
            for f in &mut findings {
                if let Some(s) = f
                    .stacks
                    .first()
                    .and_then(|s| stuck.iter().find(|x| x.0 == s.tid))
                    && let Some(o) = f.evidence.as_object_mut()
                {
                    o.insert(
                        "no_progress_seconds".into(),
                        ((s.1.as_secs_f64() * 10.0).round() / 10.0).into(),
                    );
                }
            }
            return Ok(findings);
        }
        let snap = self
            .dumper
            .snapshot(&DumpOptions::default())
            .map_err(|e| match e {
                DumpError::Exited { pid } => DetectError::Gone { pid },
                e => DetectError::Check {
                    detector: NAME,
                    op: "read the threads' stacks",
                    message: e.to_string(),
                },
            })?;
        usage::record_samples(1);
        let findings = self.judge(&snap, &stuck, cx);
        self.verdict = Some((tids, findings.clone()));
        Ok(findings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_start() {
        let text = "cat (11950, #threads: 1)\n---\nse.exec_start                                :      14589736.603051\nse.vruntime  :  1.0\n";
        assert_eq!(exec_start_ms(text), Some(14589736.603051));
        assert_eq!(exec_start_ms("se.vruntime : 1.0\n"), None);
    }

    #[test]
    fn schedstat() {
        assert_eq!(parse_schedstat("123 456 7\n"), Some((123, 7)));
        assert_eq!(parse_schedstat("garbage"), None);
    }
}
