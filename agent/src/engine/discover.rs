//! Keeps the engine's table of Python processes current and tells the
//! scheduler which are selected. Uses the eBPF `discovery` module
//! (exec/fork/exit tracepoints); when eBPF is unavailable (no privileges,
//! an old kernel) it logs why and polls `/proc` every two seconds instead.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pymedic_python::inspect::Inspector;

use super::detect::scheduler::Control;
use super::targets::{Selector, TargetId, TargetInfo};
use super::{Engine, Known};
use crate::discovery::{Discovery, ProcessEvent};
use crate::procinfo;

const POLL: Duration = Duration::from_secs(2);

pub(super) async fn run(engine: Arc<Engine>, selector: Selector) {
    match Discovery::start() {
        Ok(d) => {
            *engine
                .discovery_mode
                .write()
                .unwrap_or_else(|e| e.into_inner()) = "ebpf";
            ebpf(engine, selector, d).await
        }
        Err(e) => {
            tracing::warn!(
                "eBPF process discovery is unavailable ({e}); polling /proc every {}s instead",
                POLL.as_secs()
            );
            *engine
                .discovery_mode
                .write()
                .unwrap_or_else(|e| e.into_inner()) = "proc-poll";
            engine.counters.ebpf_errors.fetch_add(1, Ordering::Relaxed);
            poll(engine, selector).await
        }
    }
}

async fn ebpf(engine: Arc<Engine>, selector: Selector, mut d: Discovery) {
    let mut counters = tokio::time::interval(Duration::from_secs(5));
    let mut first = true;
    // The initial /proc scan is queued inside Discovery when `start`
    // returns; shortly after, those processes are known: ready.
    let ready_at = tokio::time::sleep(Duration::from_millis(200));
    tokio::pin!(ready_at);
    loop {
        tokio::select! {
            ev = d.next() => match ev {
                Ok(ProcessEvent::Started { process, start_ticks, .. }) => {
                    let info = tokio::task::spawn_blocking(move || TargetInfo::new(process, start_ticks))
                        .await;
                    if let Ok(info) = info {
                        started(&engine, &selector, info).await;
                    }
                }
                Ok(ProcessEvent::Exited { pid, start_ticks }) => {
                    exited(&engine, TargetId { pid, start_ticks }).await;
                }
                Err(e) => {
                    tracing::error!("process discovery failed: {e}; polling /proc instead");
                    engine.counters.ebpf_errors.fetch_add(1, Ordering::Relaxed);
                    *engine.discovery_mode.write().unwrap_or_else(|e| e.into_inner()) = "proc-poll";
                    return poll(engine, selector).await;
                }
            },
            _ = &mut ready_at, if first => {
                first = false;
                engine.ready.store(true, Ordering::Release);
            }
            _ = counters.tick() => {
                let errors: u64 = d.error_counters().iter().map(|(_, n)| n).sum();
                engine.counters.ebpf_errors.fetch_max(errors, Ordering::Relaxed);
            }
        }
    }
}

async fn poll(engine: Arc<Engine>, selector: Selector) {
    let mut not_python: HashSet<TargetId> = HashSet::new();
    let mut tick = tokio::time::interval(POLL);
    loop {
        tick.tick().await;
        let known: HashSet<TargetId> = engine
            .known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        let skip = not_python.clone();
        let scan = tokio::task::spawn_blocking(move || scan(&known, &skip)).await;
        let Ok((alive, new, negatives)) = scan else {
            continue;
        };
        not_python.retain(|id| alive.contains(id));
        not_python.extend(negatives);
        let gone: Vec<TargetId> = engine
            .known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|id| !alive.contains(id))
            .copied()
            .collect();
        for id in gone {
            exited(&engine, id).await;
        }
        for info in new {
            started(&engine, &selector, info).await;
        }
        engine.ready.store(true, Ordering::Release);
    }
}

/// One `/proc` pass: every live (pid, start), the new Python processes, and
/// the new non-Python ones (not inspected again).
fn scan(
    known: &HashSet<TargetId>,
    skip: &HashSet<TargetId>,
) -> (HashSet<TargetId>, Vec<TargetInfo>, Vec<TargetId>) {
    let me = std::process::id();
    let mut inspector = Inspector::new();
    let mut alive = HashSet::new();
    let mut new = Vec::new();
    let mut negatives = Vec::new();
    for pid in procinfo::all_pids().unwrap_or_default() {
        if pid == me {
            continue;
        }
        let Ok(info) = procinfo::read(pid) else {
            continue;
        };
        let id = TargetId {
            pid,
            start_ticks: info.start_ticks,
        };
        alive.insert(id);
        if known.contains(&id) || skip.contains(&id) {
            continue;
        }
        match inspector.inspect(pid) {
            Ok(p) => new.push(TargetInfo::new(p, info.start_ticks)),
            Err(_) => negatives.push(id),
        }
    }
    (alive, new, negatives)
}

async fn started(engine: &Engine, selector: &Selector, info: TargetInfo) {
    let id = info.id;
    let selected = {
        let mut known = engine.known.write().unwrap_or_else(|e| e.into_inner());
        if known.contains_key(&id) {
            return;
        }
        let watching = known.values().filter(|k| k.selected).count();
        let selected = selector.matches(&info) && watching < engine.config.targets.max_targets;
        if selector.matches(&info) && !selected {
            tracing::warn!(
                pid = id.pid,
                max = engine.config.targets.max_targets,
                "not watching: targets.max_targets reached"
            );
        }
        // A pid reused by a new process replaces the old entry.
        known.retain(|k, _| k.pid != id.pid);
        known.insert(
            id,
            Known {
                info: info.clone(),
                selected,
            },
        );
        selected
    };
    tracing::info!(pid = id.pid, selected, exe = %info.process.exe, "python process");
    if selected {
        engine.control(Control::Add(Box::new(info))).await;
    }
}

async fn exited(engine: &Engine, id: TargetId) {
    let was = engine
        .known
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    if let Some(k) = was {
        tracing::info!(pid = id.pid, "python process exited");
        if k.selected {
            engine.control(Control::Remove(id)).await;
        }
    }
}
