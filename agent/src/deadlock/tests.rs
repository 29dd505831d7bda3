//! Verdict logic on hand-built snapshots (no process, no root).

use pymedic_model::{Location, Target};

use super::*;
use crate::dump::{FrameDump, FrameKind, Held, Wait};

fn lock(id: &str, kind: LockKind) -> LockRef {
    LockRef {
        id: id.into(),
        kind,
        name: format!("lock_{id}"),
        futex: format!("{id}0"),
        owner_tid: None,
        count: None,
        locked: Some(true),
    }
}

fn rlock(id: &str, owner: u32) -> LockRef {
    LockRef {
        owner_tid: Some(owner),
        count: Some(1),
        locked: None,
        ..lock(id, LockKind::RLock)
    }
}

fn at(line: u32) -> Location {
    Location::new("/app/bank.py", "transfer", line)
}

fn thread(tid: u32) -> ThreadDump {
    ThreadDump {
        tid,
        ident: u64::from(tid) << 12,
        name: format!("worker-{tid}"),
        os_name: "python3".into(),
        gil: false,
        active: false,
        state: "S".into(),
        frames: vec![FrameDump {
            kind: FrameKind::Python,
            file: "/app/bank.py".into(),
            function: "transfer".into(),
            line: 10 + tid,
            addr: None,
            locals: None,
        }],
        waiting: None,
        holds: Vec::new(),
    }
}

fn waits(mut t: ThreadDump, l: LockRef, line: u32) -> ThreadDump {
    t.waiting = Some(Wait {
        kind: WaitKind::Lock,
        syscall: Some("futex".into()),
        detail: None,
        at: Some(at(line)),
        lock: Some(l),
        holder_tid: None,
        target_tid: None,
        timed: false,
    });
    t
}

fn holds(mut t: ThreadDump, l: LockRef, line: u32) -> ThreadDump {
    t.holds.push(Held {
        lock: l,
        acquired_at: at(line),
        evidence: "with_block".into(),
    });
    t
}

fn other_wait(mut t: ThreadDump, kind: WaitKind) -> ThreadDump {
    t.waiting = Some(Wait {
        kind,
        syscall: Some("clock_nanosleep".into()),
        detail: None,
        at: Some(at(99)),
        lock: None,
        holder_tid: None,
        target_tid: None,
        timed: true,
    });
    t
}

fn snap(threads: Vec<ThreadDump>) -> Snapshot {
    Snapshot {
        target: Target {
            pid: 42,
            exe: "/usr/bin/python3".into(),
            python: Some("3.12.1".into()),
            ..Default::default()
        },
        build: "shared".into(),
        threads,
        paused: false,
        notes: Vec::new(),
    }
}

#[test]
fn two_thread_cycle_over_plain_locks() {
    let (a, b) = (lock("0xa", LockKind::Lock), lock("0xb", LockKind::Lock));
    let s = snap(vec![
        waits(holds(thread(1), a.clone(), 5), b.clone(), 6),
        waits(holds(thread(2), b.clone(), 15), a.clone(), 16),
        thread(3),
    ]);
    let r = analyze(&s);
    assert_eq!(r.deadlocks.len(), 1);
    let d = &r.deadlocks[0];
    assert_eq!(d.kind, "cycle");
    let tids: Vec<u32> = d.threads.iter().map(|t| t.tid).collect();
    assert_eq!(tids, [1, 2]);
    assert_eq!(d.threads[0].waiting_for.holder_tid, 2);
    assert_eq!(d.threads[0].waiting_for.lock.id, "0xb");
    assert_eq!(d.threads[0].holds[0].acquired_at.line, 5);
    assert_eq!(d.threads[1].waiting_at.line, 16);
    assert!(r.chains.is_empty());
    assert!(d.summary.contains("held by 2"), "{}", d.summary);
}

#[test]
fn three_thread_cycle_is_one_deadlock() {
    let l: Vec<LockRef> = ["0x1", "0x2", "0x3"]
        .iter()
        .map(|i| lock(i, LockKind::Lock))
        .collect();
    let s = snap(vec![
        waits(holds(thread(1), l[0].clone(), 1), l[1].clone(), 2),
        waits(holds(thread(2), l[1].clone(), 3), l[2].clone(), 4),
        waits(holds(thread(3), l[2].clone(), 5), l[0].clone(), 6),
    ]);
    let r = analyze(&s);
    assert_eq!(r.deadlocks.len(), 1);
    assert_eq!(r.deadlocks[0].threads.len(), 3);
}

#[test]
fn self_deadlock_on_non_reentrant_lock() {
    let a = lock("0xa", LockKind::Lock);
    let s = snap(vec![waits(holds(thread(7), a.clone(), 3), a, 8), thread(8)]);
    let r = analyze(&s);
    assert_eq!(r.deadlocks.len(), 1);
    assert_eq!(r.deadlocks[0].kind, "self");
    assert!(r.deadlocks[0].summary.contains("already holds"));
}

#[test]
fn rlock_owner_is_authoritative() {
    // Thread 1 holds RLock r (recorded owner) and waits for Lock b; thread
    // 2 holds b and waits for r.
    let b = lock("0xb", LockKind::Lock);
    let mut r1 = rlock("0xr", 1);
    r1.name = "self._rlock".into();
    let s = snap(vec![
        waits(thread(1), b.clone(), 6),
        waits(holds(thread(2), b, 15), r1, 16),
    ]);
    let r = analyze(&s);
    assert_eq!(r.deadlocks.len(), 1);
    assert_eq!(r.deadlocks[0].threads.len(), 2);
    assert!(r.deadlocks[0].confidence > 0.8);
}

#[test]
fn holder_sleeping_is_a_chain_not_a_deadlock() {
    let a = lock("0xa", LockKind::Lock);
    let s = snap(vec![
        waits(thread(1), a.clone(), 6),
        waits(thread(3), a.clone(), 7),
        other_wait(holds(thread(2), a, 20), WaitKind::Sleep),
    ]);
    let r = analyze(&s);
    assert!(r.deadlocks.is_empty());
    assert_eq!(r.chains.len(), 2);
    assert_eq!(r.chains[0].tids, [1, 2]);
    assert_eq!(r.chains[0].ends_in, "sleep");
    assert_eq!(r.holders.get(&1), Some(&2));
}

#[test]
fn ambiguous_or_unknown_holders_give_no_verdict() {
    let (a, b) = (lock("0xa", LockKind::Lock), lock("0xb", LockKind::Lock));
    // Two threads both appear to hold b: no edge from 1.
    let s = snap(vec![
        waits(holds(thread(1), a.clone(), 5), b.clone(), 6),
        waits(holds(thread(2), b.clone(), 15), a.clone(), 16),
        holds(thread(3), b, 30),
    ]);
    assert!(analyze(&s).deadlocks.is_empty());
    // Nobody holds the awaited lock (released meanwhile): nothing.
    let s = snap(vec![waits(thread(1), a, 6), thread(2)]);
    let r = analyze(&s);
    assert!(r.deadlocks.is_empty() && r.chains.is_empty());
}

#[test]
fn queue_event_condition_waits_are_not_deadlocks() {
    let s = snap(vec![
        other_wait(thread(1), WaitKind::Queue),
        other_wait(thread(2), WaitKind::Event),
        other_wait(thread(3), WaitKind::Condition),
    ]);
    let r = analyze(&s);
    assert!(r.deadlocks.is_empty() && r.chains.is_empty());
}

#[test]
fn confirmation_needs_the_same_cycle_twice() {
    let (a, b) = (lock("0xa", LockKind::Lock), lock("0xb", LockKind::Lock));
    let s = snap(vec![
        waits(holds(thread(1), a.clone(), 5), b.clone(), 6),
        waits(holds(thread(2), b.clone(), 15), a.clone(), 16),
    ]);
    let first = analyze(&s).deadlocks;
    let again = confirm(&first, analyze(&s).deadlocks);
    assert_eq!(again.len(), 1);
    assert!(again[0].confirmed);
    let gone = confirm(&[], analyze(&s).deadlocks);
    assert!(gone.is_empty());
}

#[test]
fn finding_has_sites_and_stacks() {
    let (a, b) = (lock("0xa", LockKind::Lock), lock("0xb", LockKind::Lock));
    let mut s = snap(vec![
        waits(holds(thread(1), a.clone(), 5), b.clone(), 6),
        waits(holds(thread(2), b.clone(), 15), a.clone(), 16),
    ]);
    let r = analyze(&s);
    annotate(&mut s, &r);
    assert_eq!(s.threads[0].waiting.as_ref().unwrap().holder_tid, Some(2));
    let f = to_finding(&r.deadlocks[0], &s.target);
    assert_eq!(f.kind.as_str(), "deadlock");
    assert_eq!(f.layer.as_str(), "temporal");
    assert_eq!(f.location.line, 6);
    assert_eq!(f.related.len(), 4);
    assert!(
        f.related
            .iter()
            .any(|r| r.line == 15 && r.role.contains("holds lock_0xb"))
    );
    assert_eq!(f.stacks.len(), 2);
    let v = serde_json::to_value(&f).unwrap();
    assert_eq!(v["evidence"]["threads"][0]["holder_tid"], 2);
}

#[test]
fn locks_reached_by_the_same_expression_are_told_apart() {
    // transfer(a, b) and transfer(b, a): both threads wait on `dst.lock`.
    let same = |id: &str| LockRef {
        name: "dst.lock".into(),
        ..lock(id, LockKind::Lock)
    };
    let (a, b) = (same("0xa"), same("0xb"));
    let s = snap(vec![
        waits(holds(thread(1), a.clone(), 5), b.clone(), 6),
        waits(holds(thread(2), b.clone(), 5), a.clone(), 6),
    ]);
    let r = analyze(&s);
    let f = to_finding(&r.deadlocks[0], &s.target);
    assert!(
        f.title.contains("dst.lock @0xb") && f.title.contains("dst.lock @0xa"),
        "{}",
        f.title
    );
    assert!(r.deadlocks[0].summary.contains("dst.lock @0xb"));
}
