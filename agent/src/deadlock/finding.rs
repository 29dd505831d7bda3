//! A [`Deadlock`] as a `deadlock` [`Finding`] (INTERFACE.md): located at the
//! first waiting site in the program's own code, with every wait and acquisition site as `related`,
//! the threads' stacks, and the lock identities as evidence.

use pymedic_model::{Finding, Kind, Layer, Location, Related, Severity, Stack, Target};
use serde_json::json;

use super::{Deadlock, DeadlockThread};
use crate::dump::wait::{is_program, is_stdlib};

/// The innermost frame of `t`'s stack in the program (outside the standard
/// library), when its wait is in library code.
fn program_site(t: &DeadlockThread) -> Option<Location> {
    t.stack.iter().find(|l| is_program(&l.file)).cloned()
}

/// Converts a verdict about `target` into a finding.
pub fn to_finding(d: &Deadlock, target: &Target) -> Finding {
    let first = &d.threads[0];
    let title = if d.kind == "self" {
        format!(
            "Thread {} deadlocked on itself: re-acquires {} at {}",
            first.name, first.waiting_for.lock.name, first.waiting_at
        )
    } else {
        let names: Vec<&str> = d.threads.iter().map(|t| t.name.as_str()).collect();
        let locks = super::lock_labels(&d.threads);
        format!(
            "{} threads deadlocked ({}) over {}",
            d.threads.len(),
            names.join(", "),
            locks.join(", ")
        )
    };
    // Located in the program: the first wait in its own code, else the
    // program line that called into the library that waits (a `logging`
    // handler's lock taken under `log.info(...)`).
    let location = d
        .threads
        .iter()
        .find(|t| !is_stdlib(&t.waiting_at.file))
        .map(|t| t.waiting_at.clone())
        .or_else(|| program_site(first))
        .unwrap_or_else(|| first.waiting_at.clone());
    let mut f = Finding::new(
        Layer::Temporal,
        Kind::DEADLOCK,
        Severity::Critical,
        d.confidence,
        title,
        Some(target.clone()),
        location,
    );
    let key: Vec<String> = super::key(d)
        .into_iter()
        .map(|(tid, lock)| format!("{tid}:{lock}"))
        .collect();
    f = f.with_discriminator(&key.join(","));
    for t in &d.threads {
        f.related.push(Related::new(
            &t.waiting_at,
            if t.waiting_for.lock.is_thread_end() {
                format!(
                    "thread {} ({}) joins thread {}, which does not end",
                    t.name, t.tid, t.waiting_for.holder_tid
                )
            } else {
                format!(
                    "thread {} ({}) waits for {} held by {}",
                    t.name, t.tid, t.waiting_for.lock.name, t.waiting_for.holder_tid
                )
            },
        ));
        if is_stdlib(&t.waiting_at.file)
            && let Some(site) = program_site(t)
        {
            f.related.push(Related::new(
                &site,
                format!(
                    "thread {} ({}) waits inside {} called here",
                    t.name, t.tid, t.waiting_at.function
                ),
            ));
        }
        for h in &t.holds {
            f.related.push(Related::new(
                &h.acquired_at,
                format!("thread {} ({}) holds {}", t.name, t.tid, h.lock.name),
            ));
        }
        f.stacks.push(Stack {
            thread: t.name.clone(),
            tid: t.tid,
            frames: t.stack.clone(),
        });
    }
    f.evidence = json!({
        "summary": d.summary,
        "kind": d.kind,
        "confirmed": d.confirmed,
        "threads": d.threads.iter().map(|t| json!({
            "tid": t.tid,
            "name": t.name,
            "waiting_for": t.waiting_for.lock,
            "holder_tid": t.waiting_for.holder_tid,
            "holds": t.holds.iter().map(|h| json!({"lock": h.lock, "evidence": h.evidence})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    f
}
