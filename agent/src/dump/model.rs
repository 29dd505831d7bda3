//! What a dump contains: plain data, serialised as the `threads` of
//! `pymedic dump --json` (INTERFACE.md), and the input of the deadlock
//! analysis (which never touches the process).

use pymedic_model::{Location, Target};
use serde::{Deserialize, Serialize};

/// Every thread of one process at one moment.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub target: Target,
    /// `shared` or `static`.
    pub build: String,
    pub threads: Vec<ThreadDump>,
    /// True when the process was paused while it was read (`--blocking`
    /// or `--native`).
    pub paused: bool,
    /// Things the reader could not do (e.g. native unwinding of a build).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// One thread.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ThreadDump {
    /// Kernel thread id (0 if it could not be mapped).
    pub tid: u32,
    /// `threading.get_ident()` (the `pthread_t`).
    pub ident: u64,
    /// Python-level name (`threading._active`), else the OS name.
    pub name: String,
    /// The OS thread name (`/proc/PID/task/TID/comm`).
    pub os_name: String,
    /// Holds the GIL right now.
    pub gil: bool,
    /// Running or runnable on a CPU (kernel state R), as opposed to idle.
    pub active: bool,
    /// Kernel state letter (`R`, `S`, `D`, ...).
    pub state: String,
    /// Innermost first.
    pub frames: Vec<FrameDump>,
    /// What the thread is blocked on, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Wait>,
    /// Locks this thread holds, as far as can be told: `RLock`s by their
    /// recorded owner, `Lock`s from the `with`/`acquire()` regions its
    /// frames are inside (only computed when some thread waits on a lock).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holds: Vec<Held>,
}

impl ThreadDump {
    /// The innermost Python frame.
    pub fn top_python(&self) -> Option<&FrameDump> {
        self.frames.iter().find(|f| f.kind == FrameKind::Python)
    }

    /// The Python frames, innermost first.
    pub fn python_frames(&self) -> impl Iterator<Item = &FrameDump> {
        self.frames.iter().filter(|f| f.kind == FrameKind::Python)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FrameKind {
    #[default]
    Python,
    Native,
}

/// One frame: Python (file, function, line) or native (symbol, library).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FrameDump {
    #[serde(default)]
    pub kind: FrameKind,
    pub file: String,
    pub function: String,
    pub line: u32,
    /// Native frames: instruction address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<u64>,
    /// `--locals`: bounded reprs of the frame's locals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locals: Option<Vec<Local>>,
}

impl FrameDump {
    pub fn location(&self) -> Location {
        Location::new(self.file.clone(), self.function.clone(), self.line)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Local {
    pub name: String,
    pub repr: String,
}

/// What a blocked thread waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitKind {
    /// Acquiring a `threading.Lock` / `RLock`.
    Lock,
    /// `Condition.wait` (not a `Queue` or `Event` underneath).
    Condition,
    Queue,
    Event,
    Semaphore,
    Barrier,
    /// `Thread.join`.
    Join,
    Sleep,
    /// Reading, writing, polling, accepting, connecting.
    Io,
    /// Waiting for a child process.
    Child,
    /// Waiting to take the GIL.
    Gil,
    /// A futex nobody could attribute (a C extension's lock...).
    Futex,
    /// Blocked in another system call.
    Syscall,
}

impl WaitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WaitKind::Lock => "lock",
            WaitKind::Condition => "condition",
            WaitKind::Queue => "queue",
            WaitKind::Event => "event",
            WaitKind::Semaphore => "semaphore",
            WaitKind::Barrier => "barrier",
            WaitKind::Join => "join",
            WaitKind::Sleep => "sleep",
            WaitKind::Io => "io",
            WaitKind::Child => "child",
            WaitKind::Gil => "gil",
            WaitKind::Futex => "futex",
            WaitKind::Syscall => "syscall",
        }
    }
}

/// A blocked thread's wait.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Wait {
    pub kind: WaitKind,
    /// The system call it sleeps in (`futex`, `clock_nanosleep`, `read`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syscall: Option<String>,
    /// Human detail: `fd 5 (socket:[123])`, `for thread 4242`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The innermost frame outside `threading`/`queue`: where the program
    /// waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Location>,
    /// The lock, for lock waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<LockRef>,
    /// Who holds that lock (tid), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_tid: Option<u32>,
    /// Join waits: the thread waited for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_tid: Option<u32>,
    /// The wait has a timeout (it will end by itself).
    #[serde(default)]
    pub timed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LockKind {
    Lock,
    RLock,
}

/// A lock object in the target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRef {
    /// Stable identity within the process: the object's address.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: LockKind,
    /// The expression it was reached by (`self._lock`, `audit_lock`).
    pub name: String,
    /// Address of the semaphore a blocked acquirer waits on.
    pub futex: String,
    /// `RLock` only: owner's tid (0 = free), and recursion count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_tid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// `Lock` only: the `locked` flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked: Option<bool>,
}

/// Identity prefix of the lock a `Thread.join` waits for.
const THREAD_END: &str = "thread:";

impl LockRef {
    /// What an untimed `Thread.join` of thread `tid` (named `name`) waits
    /// for: that thread's `_tstate_lock`, held until it ends.
    pub fn thread_end(tid: u32, name: &str, futex: String) -> LockRef {
        LockRef {
            id: format!("{THREAD_END}{tid}"),
            kind: LockKind::Lock,
            name: format!("the end of thread {name} (join)"),
            futex,
            owner_tid: None,
            count: None,
            locked: Some(true),
        }
    }

    /// True for [`LockRef::thread_end`]: a join, not a program's lock.
    pub fn is_thread_end(&self) -> bool {
        self.id.starts_with(THREAD_END)
    }
}

/// A lock a thread holds and where it took it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Held {
    pub lock: LockRef,
    pub acquired_at: Location,
    /// How this was established: `rlock_owner` (recorded by the
    /// interpreter) or `with_block` / `acquire_call` (the frame is inside a
    /// `with X:` block or after `X.acquire()`, and X is this lock).
    pub evidence: String,
}
