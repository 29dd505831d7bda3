//! Post-hoc deadlock verdicts from one [`Snapshot`]: no tracing needs to
//! have run before.
//!
//! Each thread blocked acquiring a lock gets a wait-for edge to the lock's
//! holder — the recorded owner of an `RLock`, or the one thread whose frames
//! hold a `Lock` (see [`crate::dump::locks`]); a thread in an untimed
//! `Thread.join` gets an edge to the thread it joins. A cycle of edges is a
//! deadlock (a thread waiting for a lock it holds itself is a cycle of
//! one). Edges that end at a thread which is not waiting for a lock (it
//! sleeps, does I/O, runs) form a *chain*: reported, not a deadlock.
//!
//! [`analyze`] is pure and cheap (no I/O): an agent calls it on every
//! snapshot and [`confirm`]s verdicts across two snapshots so a transient
//! state never becomes a verdict.

mod finding;

use std::collections::{BTreeSet, HashMap};

use pymedic_model::Location;
use serde::{Deserialize, Serialize};

use crate::dump::{LockKind, LockRef, Snapshot, ThreadDump, WaitKind};

pub use finding::to_finding;

/// A deadlock: threads each waiting for a lock the next one holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Deadlock {
    /// `cycle` (two or more threads) or `self` (a thread re-acquiring a
    /// non-reentrant lock it holds).
    pub kind: String,
    /// In cycle order: each waits for a lock held by the next (the last by
    /// the first).
    pub threads: Vec<DeadlockThread>,
    /// One-line human summary.
    pub summary: String,
    /// Seen in two consecutive snapshots.
    pub confirmed: bool,
    /// How sure: lower when a holder was inferred from source rather than
    /// recorded by the interpreter.
    pub confidence: f64,
}

/// One thread of a deadlock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeadlockThread {
    pub tid: u32,
    pub name: String,
    pub waiting_at: Location,
    pub waiting_for: WaitingFor,
    pub holds: Vec<HeldLock>,
    /// Python frames, innermost first.
    pub stack: Vec<Location>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WaitingFor {
    pub lock: LockRef,
    pub holder_tid: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeldLock {
    pub lock: LockRef,
    pub acquired_at: Location,
    pub evidence: String,
}

/// Threads blocked behind a thread that is not itself waiting for a lock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Chain {
    /// From the first waiter to the last holder.
    pub tids: Vec<u32>,
    /// What the last thread is doing: `running`, `sleep`, `io`, ...
    pub ends_in: String,
    pub ends_at: Option<Location>,
    pub summary: String,
}

/// Verdicts for one snapshot.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Analysis {
    pub deadlocks: Vec<Deadlock>,
    pub chains: Vec<Chain>,
    /// Waiting tid → holder tid, for every lock wait whose holder is known.
    pub holders: HashMap<u32, u32>,
}

/// The holder of the lock `waiter` waits for, if it can be told. An
/// untimed `Thread.join` is one too: it acquires the joined thread's
/// `_tstate_lock`, which that thread holds until it ends.
fn holder_of(s: &Snapshot, waiter: &ThreadDump) -> Option<(u32, LockRef)> {
    let w = waiter.waiting.as_ref()?;
    if w.kind == WaitKind::Join && !w.timed {
        let target = w.target_tid.filter(|&t| t != waiter.tid)?;
        let name = s
            .threads
            .iter()
            .find(|t| t.tid == target)
            .map_or_else(|| target.to_string(), |t| t.name.clone());
        let futex = w.lock.as_ref().map(|l| l.futex.clone()).unwrap_or_default();
        return Some((target, LockRef::thread_end(target, &name, futex)));
    }
    if w.kind != WaitKind::Lock {
        return None;
    }
    let lock = w.lock.clone()?;
    match lock.kind {
        LockKind::RLock => lock.owner_tid.filter(|&t| t != 0).map(|t| (t, lock)),
        LockKind::Lock => {
            let holders: Vec<u32> = s
                .threads
                .iter()
                .filter(|t| t.holds.iter().any(|h| h.lock.id == lock.id))
                .map(|t| t.tid)
                .collect();
            match holders.as_slice() {
                [one] => Some((*one, lock)),
                // A thread re-acquiring its own lock holds it whatever else
                // seems to.
                many if many.contains(&waiter.tid) => Some((waiter.tid, lock)),
                _ => None,
            }
        }
    }
}

/// Finds deadlocks and blocked chains in a snapshot.
pub fn analyze(s: &Snapshot) -> Analysis {
    let by_tid: HashMap<u32, &ThreadDump> = s.threads.iter().map(|t| (t.tid, t)).collect();
    let mut edges: HashMap<u32, (u32, LockRef)> = HashMap::new();
    for t in &s.threads {
        if let Some(edge) = holder_of(s, t) {
            edges.insert(t.tid, edge);
        }
    }
    let mut out = Analysis {
        holders: edges.iter().map(|(&w, (h, _))| (w, *h)).collect(),
        ..Analysis::default()
    };
    let mut seen_cycles: BTreeSet<Vec<u32>> = BTreeSet::new();
    let mut in_cycle: BTreeSet<u32> = BTreeSet::new();
    let mut starts: Vec<u32> = edges.keys().copied().collect();
    starts.sort_unstable();
    for &start in &starts {
        let mut path = vec![start];
        let mut cur = start;
        while let Some((next, _)) = edges.get(&cur) {
            if let Some(pos) = path.iter().position(|t| t == next) {
                let cycle = path[pos..].to_vec();
                let mut key = cycle.clone();
                key.sort_unstable();
                if seen_cycles.insert(key) {
                    in_cycle.extend(cycle.iter().copied());
                    out.deadlocks.push(deadlock(&cycle, &edges, &by_tid));
                }
                break;
            }
            path.push(*next);
            cur = *next;
            if path.len() > s.threads.len() + 1 {
                break;
            }
        }
    }
    for &start in &starts {
        if in_cycle.contains(&start) || out.holders.values().any(|&h| h == start) {
            continue; // chains start at waiters nobody waits behind
        }
        if by_tid
            .get(&start)
            .and_then(|t| t.waiting.as_ref())
            .is_some_and(|w| w.kind == WaitKind::Join)
        {
            continue; // joining a thread that still works is not blocked
        }
        let mut tids = vec![start];
        let mut cur = start;
        while let Some((next, _)) = edges.get(&cur) {
            if tids.contains(next) || in_cycle.contains(next) {
                break;
            }
            tids.push(*next);
            cur = *next;
        }
        let Some(last) = by_tid.get(&cur) else {
            continue;
        };
        if edges.contains_key(&cur) {
            continue; // ends in a cycle: that is reported as a deadlock
        }
        let ends_in = match &last.waiting {
            Some(w) => w.kind.as_str().to_owned(),
            None if last.active => "running".into(),
            None => "idle".into(),
        };
        let ends_at = last
            .waiting
            .as_ref()
            .and_then(|w| w.at.clone())
            .or_else(|| last.top_python().map(|f| f.location()));
        let names: Vec<String> = tids
            .iter()
            .map(|t| {
                by_tid
                    .get(t)
                    .map_or(t.to_string(), |d| format!("{} ({t})", d.name))
            })
            .collect();
        out.chains.push(Chain {
            summary: format!(
                "{} — the last holder is not waiting for a lock ({ends_in}{}): not a deadlock",
                names.join(" → "),
                ends_at
                    .as_ref()
                    .map(|l| format!(" at {l}"))
                    .unwrap_or_default()
            ),
            tids,
            ends_in,
            ends_at,
        });
    }
    out
}

fn deadlock(
    cycle: &[u32],
    edges: &HashMap<u32, (u32, LockRef)>,
    by_tid: &HashMap<u32, &ThreadDump>,
) -> Deadlock {
    let mut threads = Vec::new();
    let mut inferred = false;
    for tid in cycle {
        let t = by_tid[tid];
        let (holder, lock) = edges[tid].clone();
        let holder_thread = by_tid.get(&holder);
        let holds: Vec<HeldLock> = t
            .holds
            .iter()
            .map(|h| HeldLock {
                lock: h.lock.clone(),
                acquired_at: h.acquired_at.clone(),
                evidence: h.evidence.clone(),
            })
            .collect();
        if holder_thread.is_some_and(|h| {
            h.holds
                .iter()
                .any(|x| x.lock.id == lock.id && x.evidence != "rlock_owner")
        }) {
            inferred = true;
        }
        threads.push(DeadlockThread {
            tid: *tid,
            name: t.name.clone(),
            waiting_at: t
                .waiting
                .as_ref()
                .and_then(|w| w.at.clone())
                .unwrap_or_else(|| Location::new("?", "?", 0)),
            waiting_for: WaitingFor {
                lock,
                holder_tid: holder,
            },
            holds,
            stack: t.python_frames().map(|f| f.location()).collect(),
        });
    }
    let kind = if cycle.len() == 1 { "self" } else { "cycle" };
    let summary = if cycle.len() == 1 {
        let t = &threads[0];
        format!(
            "thread {} ({}) waits at {} for {} that it already holds (non-reentrant Lock)",
            t.name, t.tid, t.waiting_at, t.waiting_for.lock.name
        )
    } else {
        let labels = lock_labels(&threads);
        let parts: Vec<String> = threads
            .iter()
            .zip(&labels)
            .map(|(t, lock)| {
                format!(
                    "{} ({}) waits at {} for {} held by {}",
                    t.name, t.tid, t.waiting_at, lock, t.waiting_for.holder_tid
                )
            })
            .collect();
        format!("{} threads deadlocked: {}", threads.len(), parts.join("; "))
    };
    Deadlock {
        kind: kind.into(),
        threads,
        summary,
        confirmed: false,
        confidence: if inferred { 0.9 } else { 0.97 },
    }
}

/// The awaited lock of each thread, by the expression it was reached by;
/// when two different locks share an expression (`dst.lock` in two frames
/// of the same function), each is told apart by its address.
pub fn lock_labels(threads: &[DeadlockThread]) -> Vec<String> {
    threads
        .iter()
        .map(|t| {
            let lock = &t.waiting_for.lock;
            let ambiguous = threads
                .iter()
                .any(|o| o.waiting_for.lock.name == lock.name && o.waiting_for.lock.id != lock.id);
            if ambiguous {
                format!("{} @{}", lock.name, lock.id)
            } else {
                lock.name.clone()
            }
        })
        .collect()
}

/// Identity of a deadlock: its (tid, awaited lock) pairs.
pub fn key(d: &Deadlock) -> Vec<(u32, String)> {
    let mut k: Vec<(u32, String)> = d
        .threads
        .iter()
        .map(|t| (t.tid, t.waiting_for.lock.id.clone()))
        .collect();
    k.sort();
    k
}

/// Keeps the deadlocks of `current` that `previous` (an earlier snapshot's
/// analysis) also had, marked confirmed.
pub fn confirm(previous: &[Deadlock], current: Vec<Deadlock>) -> Vec<Deadlock> {
    let before: BTreeSet<Vec<(u32, String)>> = previous.iter().map(key).collect();
    current
        .into_iter()
        .filter(|d| before.contains(&key(d)))
        .map(|mut d| {
            d.confirmed = true;
            d
        })
        .collect()
}

/// Fills each lock wait's `holder_tid` from an analysis.
pub fn annotate(s: &mut Snapshot, a: &Analysis) {
    for t in &mut s.threads {
        if let (Some(w), Some(h)) = (t.waiting.as_mut(), a.holders.get(&t.tid))
            && w.kind == WaitKind::Lock
        {
            w.holder_tid = Some(*h);
        }
    }
}

#[cfg(test)]
mod tests;
