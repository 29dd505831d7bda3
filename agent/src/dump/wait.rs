//! What a blocked thread waits for, from the system call it sleeps in
//! (`/proc/PID/task/TID/syscall`) and its Python frames:
//!
//! * a futex inside `threading`/`queue` code: a `Condition`, `Event`,
//!   `Queue`, `Semaphore`, `Barrier` or `Thread.join` wait, told apart by
//!   the type of `self` in the outermost such frame;
//! * a futex whose address is the semaphore of the lock the innermost frame
//!   is acquiring (`with X:`, `X.acquire()`): a lock wait on exactly that
//!   lock;
//! * the GIL's condition variable: waiting for the GIL;
//! * sleeps, I/O (with the descriptor's target), child waits.

use pymedic_model::Location;
use pymedic_python::{Frame, Interpreter, ProcessMemory};

use super::eval::eval;
use super::locks::{Locks, is_queue, is_threading};
use super::model::{LockRef, Wait, WaitKind};
use super::source::SourceCache;
use super::task::{Syscall, Task, describe_fd, nr};

/// Everything classification needs besides the thread itself.
pub struct Classifier<'a, M> {
    pub locks: Locks<'a, M>,
    pub pid: u32,
    /// Address range of the GIL's condition variable and mutex.
    pub gil_range: Option<(u64, u64)>,
    /// Identify awaited locks from source and memory (else a futex wait
    /// outside `threading`/`queue` stays an unattributed futex).
    pub identify_locks: bool,
}

impl<M: ProcessMemory> Classifier<'_, M> {
    fn interp(&self) -> &Interpreter<M> {
        self.locks.interp
    }

    /// The wait of a thread in kernel state `task`, running `frames`.
    pub fn classify(
        &self,
        task: &Task,
        frames: &[Frame],
        sources: &mut SourceCache,
    ) -> Option<Wait> {
        if task.state == 'R' {
            return None;
        }
        let sc = task.syscall.as_ref()?;
        let at = waiting_site(frames);
        let mut wait = Wait {
            kind: WaitKind::Syscall,
            syscall: Some(sc.name()),
            detail: None,
            at,
            lock: None,
            holder_tid: None,
            target_tid: None,
            timed: false,
        };
        if let Some((addr, timed)) = sc.futex_wait() {
            wait.timed = timed;
            if self.gil_range.is_some_and(|(a, b)| (a..b).contains(&addr)) {
                wait.kind = WaitKind::Gil;
                return Some(wait);
            }
            if let Some(kind) = self.stdlib_wait(frames, &mut wait) {
                wait.kind = kind;
                if kind != WaitKind::Lock {
                    wait.at = program_site(frames);
                    return Some(wait);
                }
            }
            let lock = if self.identify_locks {
                self.awaited_lock(frames, addr, sources)
            } else {
                None
            };
            match lock {
                Some(lock) => {
                    wait.kind = WaitKind::Lock;
                    if lock.kind == super::model::LockKind::RLock {
                        wait.holder_tid = lock.owner_tid.filter(|&t| t != 0);
                    }
                    wait.detail = Some(format!("{} {}", lock_type(&lock), lock.name));
                    wait.lock = Some(lock);
                }
                None => match self
                    .identify_locks
                    .then(|| self.callee_wait(frames, sources))
                    .flatten()
                {
                    Some((kind, detail)) => {
                        wait.kind = kind;
                        wait.detail = Some(detail);
                        wait.at = program_site(frames);
                    }
                    None => {
                        wait.kind = WaitKind::Futex;
                        wait.detail = Some(format!("futex {addr:#x}"));
                    }
                },
            }
            return Some(wait);
        }
        self.syscall_wait(sc, &mut wait);
        wait.at = program_site(frames);
        Some(wait)
    }

    fn syscall_wait(&self, sc: &Syscall, wait: &mut Wait) {
        let a = sc.args;
        wait.kind = match sc.nr {
            nr::NANOSLEEP | nr::CLOCK_NANOSLEEP => WaitKind::Sleep,
            nr::SELECT | nr::PSELECT6 if a[0] == 0 => WaitKind::Sleep,
            nr::POLL | nr::PPOLL if a[1] == 0 => WaitKind::Sleep,
            nr::READ
            | nr::WRITE
            | nr::RECVFROM
            | nr::RECVMSG
            | nr::RECVMMSG
            | nr::SENDTO
            | nr::SENDMSG
            | nr::ACCEPT
            | nr::ACCEPT4
            | nr::CONNECT => {
                wait.detail = Some(describe_fd(self.pid, a[0]));
                WaitKind::Io
            }
            nr::EPOLL_WAIT | nr::EPOLL_PWAIT | nr::EPOLL_PWAIT2 => {
                wait.detail = Some(format!("epoll on {}", describe_fd(self.pid, a[0])));
                WaitKind::Io
            }
            nr::POLL | nr::PPOLL => {
                wait.detail = Some(self.poll_detail(a[0], a[1]));
                WaitKind::Io
            }
            nr::SELECT | nr::PSELECT6 => {
                wait.detail = Some(format!("select on {} fds", a[0]));
                WaitKind::Io
            }
            nr::WAIT4 | nr::WAITID => {
                wait.detail = Some(format!("child {}", a[0] as i64));
                WaitKind::Child
            }
            _ => WaitKind::Syscall,
        };
    }

    /// `poll(fds, n)`: the descriptors, read from the target's pollfd array.
    fn poll_detail(&self, fds: u64, n: u64) -> String {
        let n = n.min(8) as usize;
        let raw = self
            .interp()
            .memory()
            .read_vec(fds, n * 8)
            .unwrap_or_default();
        let list: Vec<String> = raw
            .chunks_exact(8)
            .map(|c| {
                describe_fd(
                    self.pid,
                    u64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32),
                )
            })
            .collect();
        if list.is_empty() {
            format!("poll on {n} fds")
        } else {
            format!("poll on {}", list.join(", "))
        }
    }

    /// Classifies a futex wait made from `threading`/`queue` code by the
    /// type of `self` in the outermost of those frames at the top of the
    /// stack. `Lock` means "acquiring a lock from there" (`Condition
    /// .__enter__`); `None` means the top frame is not stdlib code.
    fn stdlib_wait(&self, frames: &[Frame], wait: &mut Wait) -> Option<WaitKind> {
        let stdlib: Vec<&Frame> = frames
            .iter()
            .take_while(|f| is_threading(&f.code.filename) || is_queue(&f.code.filename))
            .collect();
        let outer = *stdlib.last()?;
        if is_queue(&outer.code.filename) {
            return Some(WaitKind::Queue);
        }
        let slf = self.interp().lookup_name(outer, "self").ok().flatten();
        let ty = slf
            .and_then(|s| self.interp().type_name(s).ok())
            .unwrap_or_default();
        let name = outer.code.name.as_str();
        Some(match (ty.as_str(), name) {
            (_, "__enter__" | "acquire") if ty == "Condition" => WaitKind::Lock,
            ("Event", _) => WaitKind::Event,
            ("Semaphore" | "BoundedSemaphore", _) => WaitKind::Semaphore,
            ("Barrier", _) => WaitKind::Barrier,
            (_, "join" | "_wait_for_tstate_lock") => {
                if let Some(s) = slf {
                    self.join_target(s, wait);
                }
                WaitKind::Join
            }
            (_, "wait" | "wait_for") => WaitKind::Condition,
            _ => WaitKind::Lock,
        })
    }

    /// A futex wait inside a C method called at the innermost frame's
    /// line, told by the receiver's type (`_queue.SimpleQueue.get`, a C
    /// `Event`, ...).
    fn callee_wait(
        &self,
        frames: &[Frame],
        sources: &mut SourceCache,
    ) -> Option<(WaitKind, String)> {
        let top = frames.first()?;
        let src = sources.get(self.pid, &top.code.filename)?;
        for (method, expr, text) in src.method_calls_at(top.line) {
            let Some(obj) = eval(self.interp(), top, &expr) else {
                continue;
            };
            let ty = self.interp().type_name(obj).unwrap_or_default();
            let base = ty.rsplit('.').next().unwrap_or(&ty);
            let kind = match base {
                "SimpleQueue" | "Queue" | "LifoQueue" | "PriorityQueue" | "JoinableQueue" => {
                    WaitKind::Queue
                }
                "Event" => WaitKind::Event,
                "Condition" => WaitKind::Condition,
                "Semaphore" | "BoundedSemaphore" => WaitKind::Semaphore,
                "Barrier" => WaitKind::Barrier,
                _ => continue,
            };
            return Some((kind, format!("{text}.{method}() ({ty})")));
        }
        None
    }

    fn join_target(&self, thread: u64, wait: &mut Wait) {
        let i = self.interp();
        let ident = i
            .getattr(thread, "_ident")
            .ok()
            .flatten()
            .and_then(|o| i.read_int(o).ok().flatten());
        let name = i
            .getattr(thread, "_name")
            .ok()
            .flatten()
            .and_then(|o| i.read_str(o).ok());
        if let Some(ident) = ident {
            wait.target_tid = self.locks.tids.get(&(ident as u64)).copied();
        }
        wait.detail = Some(match (name, wait.target_tid) {
            (Some(n), Some(t)) => format!("thread {n:?} (tid {t})"),
            (Some(n), None) => format!("thread {n:?}"),
            (None, Some(t)) => format!("tid {t}"),
            (None, None) => "a thread".into(),
        });
    }

    /// The lock whose semaphore is `futex`: first the expressions the
    /// innermost frames are acquiring at their current line, then every
    /// local (and its attributes) of the innermost frame.
    fn awaited_lock(
        &self,
        frames: &[Frame],
        futex: u64,
        sources: &mut SourceCache,
    ) -> Option<LockRef> {
        let i = self.interp();
        for frame in frames.iter().take(3) {
            if let Some(src) = sources.get(self.pid, &frame.code.filename) {
                for site in src.acquiring_at(frame.line) {
                    if let Some(obj) = eval(i, frame, &site.expr)
                        && let Some(lock) = self
                            .locks
                            .lock_ref(obj, &self.locks.qualified(frame, &site.text))
                        && Locks::<M>::futex(&lock) == futex
                    {
                        return Some(lock);
                    }
                }
            }
        }
        let top = frames.first()?;
        for slot in i.frame_slots(top).ok()? {
            if slot.value == 0 {
                continue;
            }
            if let Some(lock) = self.locks.lock_ref(slot.value, &slot.name)
                && Locks::<M>::futex(&lock) == futex
            {
                return Some(lock);
            }
            if let Ok(attrs) = i.instance_attrs(slot.value) {
                for (k, v) in attrs.into_iter().take(64) {
                    let name = self.locks.qualified(
                        top,
                        &format!("{}.{}", slot.name, i.read_str(k).unwrap_or_default()),
                    );
                    if let Some(lock) = self.locks.lock_ref(v, &name)
                        && Locks::<M>::futex(&lock) == futex
                    {
                        return Some(lock);
                    }
                }
            }
        }
        None
    }
}

fn lock_type(l: &LockRef) -> &'static str {
    match l.kind {
        super::model::LockKind::Lock => "Lock",
        super::model::LockKind::RLock => "RLock",
    }
}

/// Where a lock wait happens: the innermost frame outside `threading` and
/// `queue` (a lock taken inside `logging` is waited for there).
pub fn waiting_site(frames: &[Frame]) -> Option<Location> {
    frames
        .iter()
        .find(|f| !is_threading(&f.code.filename) && !is_queue(&f.code.filename))
        .or(frames.first())
        .map(location)
}

/// Where the program waits for anything else (a queue, an event, a
/// future): the innermost frame outside the standard library.
pub fn program_site(frames: &[Frame]) -> Option<Location> {
    frames
        .iter()
        .find(|f| !is_stdlib(&f.code.filename))
        .map(location)
        .or_else(|| waiting_site(frames))
}

fn location(f: &Frame) -> Location {
    Location::new(f.code.filename.clone(), f.code.function(), f.line)
}

/// A file of the program or its installed packages: neither the standard
/// library nor generated code (`<string>`).
pub fn is_program(filename: &str) -> bool {
    !is_stdlib(filename) && !filename.starts_with('<')
}

/// A file of the standard library (`.../lib/python3.X/...` outside
/// `site-packages`), or frozen bootstrap code.
pub fn is_stdlib(filename: &str) -> bool {
    if filename.starts_with("<frozen") {
        return true;
    }
    let Some(i) = filename.find("/lib/python3.") else {
        return false;
    };
    let rest = &filename[i..];
    !rest.contains("/site-packages/") && !rest.contains("/dist-packages/")
}
