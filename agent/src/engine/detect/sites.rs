//! Stack helpers the temporal detectors share: where in the program a
//! captured stack waits, what it waits for, and top-N tables for evidence.

use std::collections::HashMap;
use std::time::Duration;

use pymedic_model::Location;
use serde_json::{Value, json};

use crate::dump::locks::{is_queue, is_threading};
use crate::dump::source::SourceCache;
use crate::dump::wait::is_stdlib;
use crate::waits::StackFrame;

/// `threading` functions whose futex wait is waiting for an event, not
/// for a lock someone holds (`Condition.wait` under queues, events,
/// semaphores, barriers, futures; `Thread.join`).
const SIGNAL_WAITS: &[&str] = &[
    "wait",
    "wait_for",
    "_wait_for_tstate_lock",
    "join",
    "Condition.wait",
    "Condition.wait_for",
    "Thread._wait_for_tstate_lock",
    "Thread.join",
];

/// True when a futex wait at `stack` (innermost first) is a lock
/// acquisition rather than waiting for a signal.
pub fn is_lock_wait(stack: &[StackFrame]) -> bool {
    match stack.first() {
        None => false,
        Some(f) => !(is_threading(&f.loc.file) && SIGNAL_WAITS.contains(&f.loc.function.as_str())),
    }
}

/// The innermost frame outside `threading`/`queue`: where the program
/// acquires (a lock taken inside `logging` is acquired there).
pub fn acquire_site(stack: &[StackFrame]) -> Option<Location> {
    stack
        .iter()
        .find(|f| !is_threading(&f.loc.file) && !is_queue(&f.loc.file))
        .or(stack.first())
        .map(|f| f.loc.clone())
}

/// The innermost frame of the program (outside the standard library).
pub fn program_site(stack: &[StackFrame]) -> Option<Location> {
    stack
        .iter()
        .find(|f| !is_stdlib(&f.loc.file) && !f.loc.file.starts_with('<'))
        .map(|f| f.loc.clone())
        .or_else(|| acquire_site(stack))
}

/// The lock expression acquired at `site` (`self._lock` in `with
/// self._lock:`), read from the target's source.
pub fn lock_name(sources: &mut SourceCache, pid: u32, site: &Location) -> Option<String> {
    let src = sources.get(pid, &site.file)?;
    src.acquiring_at(site.line).first().map(|s| s.text.clone())
}

/// Milliseconds, rounded to 0.1.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// Totals per key, largest first, at most `n`, as JSON rows built by `row`.
pub fn top<K: Clone + Eq + std::hash::Hash, V: Copy>(
    m: &HashMap<K, V>,
    n: usize,
    weight: impl Fn(&V) -> Duration,
    row: impl Fn(&K, &V) -> Value,
) -> Vec<Value> {
    let mut v: Vec<(&K, &V)> = m.iter().collect();
    v.sort_by_key(|(_, x)| std::cmp::Reverse(weight(x)));
    v.into_iter().take(n).map(|(k, x)| row(k, x)).collect()
}

/// A location as `file:line (function)` JSON.
pub fn loc_json(l: &Location) -> Value {
    json!({"file": l.file, "function": l.function, "line": l.line})
}

/// Waits summed over a window.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sum {
    pub count: u64,
    pub total: Duration,
    pub max: Duration,
}

impl Sum {
    pub fn add(&mut self, count: u64, total: Duration, max: Duration) {
        self.count += count;
        self.total += total;
        self.max = self.max.max(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(file: &str, func: &str) -> StackFrame {
        StackFrame {
            loc: Location::new(file, func, 1),
            flags: 0,
        }
    }

    #[test]
    fn condition_waits_are_not_lock_waits() {
        let t = "/usr/lib/python3.11/threading.py";
        assert!(!is_lock_wait(&[f(t, "Condition.wait"), f("app.py", "get")]));
        assert!(!is_lock_wait(&[f(t, "wait"), f("app.py", "get")]));
        assert!(!is_lock_wait(&[f(t, "_wait_for_tstate_lock")]));
        assert!(is_lock_wait(&[f(t, "__enter__"), f("app.py", "put")]));
        assert!(is_lock_wait(&[f("app.py", "transfer")]));
        assert!(!is_lock_wait(&[]));
        assert_eq!(
            acquire_site(&[f(t, "__enter__"), f("app.py", "put")])
                .unwrap()
                .file,
            "app.py"
        );
        assert_eq!(
            program_site(&[
                f("/usr/lib/python3.11/socket.py", "recv"),
                f("/srv/app.py", "handler")
            ])
            .unwrap()
            .function,
            "handler"
        );
    }
}
