//! Lock objects in the target and who holds them.
//!
//! A `_thread.lock` keeps a `sem_t*` (`lock_lock`, the futex a blocked
//! acquirer sleeps on) and a `locked` flag; a `_thread.RLock` also records
//! its owner's `pthread_t` and a count. Which thread holds a plain `Lock` is
//! not recorded anywhere, so it is inferred: a thread holds lock L when one
//! of its frames is inside a `with X:` block, or after `X.acquire()`, where X
//! evaluates in that frame to L and L is locked.

use std::collections::{HashMap, HashSet};

use pymedic_model::Location;
use pymedic_python::{Frame, Interpreter, ProcessMemory};

use super::eval::eval;
use super::model::{Held, LockKind, LockRef};
use super::source::{How, SourceCache};

/// `threading.py`'s `Condition.wait`/`wait_for` release the condition's
/// lock while they sleep: frames outside them no longer hold it.
const RELEASING: [&str; 2] = ["wait", "wait_for"];

/// Resolves objects to locks.
pub struct Locks<'a, M> {
    pub interp: &'a Interpreter<M>,
    /// `pthread_t` → tid.
    pub tids: &'a HashMap<u64, u32>,
}

impl<M: ProcessMemory> Locks<'_, M> {
    /// The lock `obj` is, or wraps: `_thread.lock`, `_thread.RLock`, a
    /// `Condition` (its `_lock`), or an object with exactly one lock
    /// attribute (a context manager guarding one lock).
    pub fn lock_ref(&self, obj: u64, name: &str) -> Option<LockRef> {
        self.lock_ref_depth(obj, name, 2)
    }

    /// `name` with a leading `self.` replaced by the class of `self` in
    /// `frame` (`self.lock` → `Inventory.lock`): two classes' `self.lock`
    /// are different locks, and a person names them by their class.
    pub fn qualified(&self, frame: &Frame, name: &str) -> String {
        let Some(attr) = name.strip_prefix("self.") else {
            return name.to_owned();
        };
        let class = self
            .interp
            .lookup_name(frame, "self")
            .ok()
            .flatten()
            .and_then(|slf| self.interp.type_name(slf).ok());
        match class {
            Some(c) => format!("{}.{attr}", c.rsplit('.').next().unwrap_or(&c)),
            None => name.to_owned(),
        }
    }

    fn lock_ref_depth(&self, obj: u64, name: &str, depth: u32) -> Option<LockRef> {
        let i = self.interp;
        let l = &i.layout().lock;
        let mem = i.memory();
        let ty = i.type_name(obj).ok()?;
        match ty.as_str() {
            "_thread.lock" => {
                let sem = mem.read_u64(obj + u64::from(l.lock_lock)).ok()?;
                let locked = mem.read_u8(obj + u64::from(l.locked)).ok()? != 0;
                Some(LockRef {
                    id: format!("{obj:#x}"),
                    kind: LockKind::Lock,
                    name: name.to_owned(),
                    futex: format!("{sem:#x}"),
                    owner_tid: None,
                    count: None,
                    locked: Some(locked),
                })
            }
            "_thread.RLock" => {
                let sem = mem.read_u64(obj + u64::from(l.rlock_lock)).ok()?;
                let owner = mem.read_u64(obj + u64::from(l.rlock_owner)).ok()?;
                let count = mem.read_u64(obj + u64::from(l.rlock_count)).ok()?;
                Some(LockRef {
                    id: format!("{obj:#x}"),
                    kind: LockKind::RLock,
                    name: name.to_owned(),
                    futex: format!("{sem:#x}"),
                    owner_tid: Some(if owner == 0 || count == 0 {
                        0
                    } else {
                        self.tids.get(&owner).copied().unwrap_or(0)
                    }),
                    count: Some(count),
                    locked: None,
                })
            }
            _ if depth == 0 => None,
            "Condition" => {
                let inner = i.getattr(obj, "_lock").ok().flatten()?;
                self.lock_ref_depth(inner, name, depth - 1)
            }
            "module" | "type" | "function" | "dict" | "list" | "tuple" | "str" | "int" => None,
            _ => {
                let attrs = i.instance_attrs(obj).ok()?;
                if attrs.len() > 64 {
                    return None;
                }
                let mut found = attrs.iter().filter_map(|&(_, v)| {
                    let t = i.type_name(v).ok()?;
                    matches!(t.as_str(), "_thread.lock" | "_thread.RLock")
                        .then(|| self.lock_ref_depth(v, name, 0))
                        .flatten()
                });
                let first = found.next()?;
                found.next().is_none().then_some(first)
            }
        }
    }

    /// Futex address of a lock.
    pub fn futex(lock: &LockRef) -> u64 {
        u64::from_str_radix(lock.futex.trim_start_matches("0x"), 16).unwrap_or(0)
    }

    /// The locks `frames` (one thread's stack, innermost first) hold, each
    /// with where it was taken. `ident` is the thread's `pthread_t`.
    pub fn held_by(
        &self,
        pid: u32,
        sources: &mut SourceCache,
        frames: &[Frame],
        ident: u64,
    ) -> Vec<Held> {
        let mut out: Vec<Held> = Vec::new();
        let mut released: HashSet<String> = HashSet::new();
        let my_tid = self.tids.get(&ident).copied().unwrap_or(0);
        for frame in frames {
            let code = &frame.code;
            if is_threading(&code.filename) && RELEASING.contains(&code.name.as_str()) {
                // Condition.wait: self._lock is released until it returns.
                if let Some(slf) = self.interp.lookup_name(frame, "self").ok().flatten()
                    && let Some(lock) = self.lock_ref(slf, "self")
                {
                    released.insert(lock.id);
                }
                continue;
            }
            if is_threading(&code.filename) || is_queue(&code.filename) {
                // The primitives' own bookkeeping (Condition, Event, Queue)
                // never holds a lock across a call into the program.
                continue;
            }
            let Some(src) = sources.get(pid, &code.filename) else {
                continue;
            };
            // `held_at` is outermost first; `out` is built innermost first
            // (then reversed), so a frame's own regions go in reversed.
            for site in src.held_at(frame.line).iter().rev() {
                let Some(obj) = eval(self.interp, frame, &site.expr) else {
                    continue;
                };
                let Some(lock) = self.lock_ref(obj, &self.qualified(frame, &site.text)) else {
                    continue;
                };
                if released.contains(&lock.id) {
                    continue;
                }
                let holds = match lock.kind {
                    LockKind::Lock => lock.locked == Some(true),
                    LockKind::RLock => lock.owner_tid.is_some_and(|t| t != 0 && t == my_tid),
                };
                if !holds {
                    continue;
                }
                let evidence = match (lock.kind, site.how) {
                    (LockKind::RLock, _) => "rlock_owner",
                    (_, How::With) => "with_block",
                    (_, How::Acquire) => "acquire_call",
                };
                let held = Held {
                    acquired_at: Location::new(code.filename.clone(), code.function(), site.line),
                    lock,
                    evidence: evidence.into(),
                };
                // Outer frames come later: the outermost acquisition wins.
                out.retain(|h| h.lock.id != held.lock.id);
                out.push(held);
            }
        }
        out.reverse();
        out
    }
}

/// The standard library's `threading.py`.
pub fn is_threading(filename: &str) -> bool {
    filename.ends_with("/threading.py") || filename == "threading.py"
}

/// `queue.py`.
pub fn is_queue(filename: &str) -> bool {
    filename.ends_with("/queue.py") || filename == "queue.py"
}
