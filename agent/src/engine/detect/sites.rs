//! Stack helpers the temporal detectors share: where in the program a
//! captured stack waits, what it waits for, and top-N tables for evidence.

use std::collections::HashMap;
use std::time::Duration;

use pymedic_model::Location;
use serde_json::{Value, json};

use crate::dump::locks::{is_queue, is_threading};
use crate::dump::source::SourceCache;
use crate::dump::wait::is_program;
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

/// Methods whose wait inside C code is for a signal, not a lock someone
/// holds: `SimpleQueue.get` (C), a queue's `put`, `join`s and `wait`s.
const C_SIGNAL_METHODS: &[&str] = &["get", "put", "join", "wait", "wait_for"];

/// [`is_lock_wait`], and not a C method waiting for a signal at the
/// innermost frame's line: `work_queue.get(block=True)` (a C
/// `SimpleQueue`, as `concurrent.futures` workers idle on) blocks in a
/// futex with no Python frame of its own. Read from the target's source;
/// a line that acquires a lock (`with x:`, `x.acquire()`) stays a lock
/// wait, and without the source the stack alone decides.
pub fn is_lock_wait_at(stack: &[StackFrame], sources: &mut SourceCache, pid: u32) -> bool {
    if !is_lock_wait(stack) {
        return false;
    }
    let Some(top) = stack.first() else {
        return false;
    };
    if is_threading(&top.loc.file) || is_queue(&top.loc.file) {
        return true;
    }
    let Some(src) = sources.get(pid, &top.loc.file) else {
        return true;
    };
    if !src.acquiring_at(top.loc.line).is_empty() {
        return true;
    }
    !src.method_calls_at(top.loc.line)
        .iter()
        .any(|(m, _, _)| C_SIGNAL_METHODS.contains(&m.as_str()))
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
        .find(|f| is_program(&f.loc.file))
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
    fn a_c_queue_get_is_not_a_lock_wait() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pool.py");
        std::fs::write(
            &file,
            "def worker(q, lock, cache):\n    item = q.get(block=True)\n    with lock:\n        pass\n    lock.acquire()\n    x = cache.lookup(item)\n",
        )
        .unwrap();
        let name = file.to_string_lossy().into_owned();
        let at = |line| StackFrame {
            loc: Location::new(&name, "worker", line),
            flags: 0,
        };
        let mut sources = SourceCache::new();
        let pid = std::process::id();
        assert!(!is_lock_wait_at(&[at(2)], &mut sources, pid));
        assert!(is_lock_wait_at(&[at(3)], &mut sources, pid));
        assert!(is_lock_wait_at(&[at(5)], &mut sources, pid));
        assert!(is_lock_wait_at(&[at(6)], &mut sources, pid));
        // Without the source, the stack alone decides.
        let gone = StackFrame {
            loc: Location::new("/nonexistent/pool.py", "worker", 2),
            flags: 0,
        };
        assert!(is_lock_wait_at(&[gone], &mut sources, pid));
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
