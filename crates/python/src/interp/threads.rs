//! Threads: every `PyThreadState` of every interpreter, which one holds the
//! GIL, their Python-level names (`threading._active`), and their kernel
//! thread ids (read from the thread state on 3.11+, found inside glibc's
//! `struct pthread` before).

use std::collections::{HashMap, HashSet};

use super::{Interpreter, ReadError, Result};
use crate::memory::{Bytes as _, ProcessMemory};

/// More thread states than this in one interpreter means a corrupt list.
const MAX_THREADS: usize = 1 << 16;
const MAX_INTERPRETERS: usize = 256;

/// A Python thread (`PyThreadState`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyThread {
    /// Address of the `PyThreadState`.
    pub tstate: u64,
    /// Address of its `PyInterpreterState`.
    pub interp: u64,
    /// `thread_id`: the `pthread_t`, as `threading.get_ident()` returns it.
    pub thread_id: u64,
    /// Kernel thread id from the thread state (3.11+).
    pub native_thread_id: Option<u32>,
    /// Innermost frame address (0 when idle in C or not started).
    pub frame: u64,
}

impl<M: ProcessMemory> Interpreter<M> {
    /// Addresses of every `PyInterpreterState`, main first.
    pub fn interpreters(&self) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        let mut interp =
            self.ptr(self.runtime_addr() + u64::from(self.layout.runtime.interpreters_head))?;
        while interp != 0 {
            if out.len() >= MAX_INTERPRETERS || out.contains(&interp) {
                return Err(ReadError::invalid("interpreter list", interp, "a cycle"));
            }
            out.push(interp);
            interp = self.ptr(interp + u64::from(self.layout.interp.next))?;
        }
        if out.is_empty() {
            return Err(ReadError::invalid(
                "_PyRuntime",
                self.runtime_addr(),
                "no interpreter yet (still starting, or finalizing)",
            ));
        }
        Ok(out)
    }

    /// Every thread of every interpreter.
    pub fn threads(&self) -> Result<Vec<PyThread>> {
        let t = &self.layout.thread;
        let mut out = Vec::new();
        for interp in self.interpreters()? {
            let mut seen = HashSet::new();
            let mut ts = self.ptr(interp + u64::from(self.layout.interp.threads_head))?;
            while ts != 0 {
                if !seen.insert(ts) || seen.len() > MAX_THREADS {
                    return Err(ReadError::invalid("thread list", ts, "a cycle"));
                }
                let b = self.mem.read_vec(ts, t.size as usize)?;
                out.push(PyThread {
                    tstate: ts,
                    interp,
                    thread_id: b.u64_at(t.thread_id),
                    native_thread_id: t.native_thread_id.map(|o| b.u32_at(o)),
                    frame: self.top_frame(ts)?,
                });
                ts = b.u64_at(t.next);
            }
        }
        Ok(out)
    }

    /// The `PyThreadState*` holding the GIL of interpreter `interp`, or
    /// `None` when the GIL is free.
    pub fn gil_holder(&self, interp: u64) -> Result<Option<u64>> {
        let r = &self.layout.runtime;
        if let Some(off) = r.gilstate_tstate_current {
            // 3.8–3.11: set while a thread holds the GIL, NULL otherwise.
            let ts = self.ptr(self.runtime_addr() + u64::from(off))?;
            return Ok((ts != 0).then_some(ts));
        }
        let Some(off) = self.layout.interp.ceval_gil else {
            return Ok(None);
        };
        let gil = self.ptr(interp + u64::from(off))?;
        if gil == 0 {
            return Ok(None);
        }
        let locked = self.mem.read_i32(gil + u64::from(self.layout.gil.locked))?;
        if locked == 0 {
            return Ok(None);
        }
        let holder = self.ptr(gil + u64::from(self.layout.gil.last_holder))?;
        Ok((holder != 0).then_some(holder))
    }

    /// Python-level thread names from `threading._active` (ident → name).
    /// Empty when `threading` was never imported.
    pub fn thread_names(&self, interp: u64) -> Result<HashMap<u64, String>> {
        let mut out = HashMap::new();
        let modules = self.ptr(interp + u64::from(self.layout.interp.modules))?;
        if modules == 0 || !self.is_dict(modules) {
            return Ok(out);
        }
        let Some(threading) = self.dict_get_str(modules, "threading")? else {
            return Ok(out);
        };
        let Some(active) = self.getattr(threading, "_active")? else {
            return Ok(out);
        };
        if !self.is_dict(active) {
            return Ok(out);
        }
        for (key, thread) in self.dict_entries(active, MAX_THREADS)? {
            let Some(ident) = self.read_int(key)? else {
                continue;
            };
            let Some(name) = self.getattr(thread, "_name")? else {
                continue;
            };
            if let Ok(name) = self.read_str(name) {
                out.insert(ident as u64, name);
            }
        }
        Ok(out)
    }

    /// Maps each thread's `pthread_t` to its kernel tid. On 3.11+ the
    /// thread state records the tid; before, it is read from glibc's
    /// `struct pthread` (which `pthread_t` points to) at the offset where
    /// every thread's block holds one of `task_tids` (the process's
    /// `/proc/PID/task` entries).
    pub fn native_tids(&self, threads: &[PyThread], task_tids: &[u32]) -> HashMap<u64, u32> {
        let mut out = HashMap::new();
        for t in threads {
            if let Some(tid) = t.native_thread_id.filter(|&tid| tid != 0) {
                out.insert(t.thread_id, tid);
            }
        }
        let rest: Vec<u64> = threads
            .iter()
            .filter(|t| !out.contains_key(&t.thread_id) && t.thread_id != 0)
            .map(|t| t.thread_id)
            .collect();
        if rest.is_empty() {
            return out;
        }
        let tids: HashSet<u32> = task_tids.iter().copied().collect();
        const SPAN: usize = 2048;
        let blocks: Vec<(u64, Vec<u8>)> = rest
            .iter()
            .filter_map(|&p| self.mem.read_vec(p, SPAN).ok().map(|b| (p, b)))
            .collect();
        // Offsets where every block holds a live tid (distinct per thread).
        let candidates: Vec<u32> = (0..SPAN as u32 - 4)
            .step_by(4)
            .filter(|&off| {
                let vals: Vec<u32> = blocks.iter().map(|(_, b)| b.u32_at(off)).collect();
                let distinct: HashSet<u32> = vals.iter().copied().collect();
                !vals.is_empty()
                    && distinct.len() == vals.len()
                    && vals.iter().all(|v| tids.contains(v))
            })
            .collect();
        // glibc 2.x on x86_64 keeps `tid` at 0x2d0; prefer it when it fits.
        let off = if candidates.contains(&0x2d0) {
            Some(0x2d0)
        } else {
            candidates.first().copied()
        };
        if let Some(off) = off {
            for (p, b) in &blocks {
                out.insert(*p, b.u32_at(off));
            }
        }
        out
    }
}
