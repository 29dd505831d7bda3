//! Process discovery: the `discovery` eBPF object reports process starts
//! (exec, and fork of a process already known to run Python) and exits.

/// Ring buffer carrying [`ProcEvent`]s to userspace.
pub const PROC_EVENTS_MAP: &str = "PROC_EVENTS";
/// `HashMap<u32 tgid, u8>` of processes userspace classified as Python; the
/// kernel side reports forks and exits only for these.
pub const TRACKED_MAP: &str = "TRACKED_PIDS";
/// Per-CPU `[u64; ErrorCode::COUNT]` error counters.
pub const ERRORS_MAP: &str = "DISCOVERY_ERRORS";
/// Size of the `PROC_EVENTS` ring buffer in bytes (a power of two).
pub const PROC_EVENTS_BYTES: u32 = 256 * 1024;
/// Capacity of `TRACKED_PIDS`.
pub const TRACKED_MAX: u32 = 16384;

/// Global set by userspace before load: offset of `clone_flags` in the
/// `task:task_newtask` tracepoint record (read from its `format` file).
pub const GLOBAL_NEWTASK_CLONE_FLAGS_OFF: &str = "NEWTASK_CLONE_FLAGS_OFF";
/// Global: offset of `pid` in the `task:task_newtask` record.
pub const GLOBAL_NEWTASK_PID_OFF: &str = "NEWTASK_PID_OFF";

/// `CLONE_THREAD` from `<linux/sched.h>`.
pub const CLONE_THREAD: u64 = 0x0001_0000;

/// What happened to a process.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcEventKind {
    /// `execve` completed: `pid` now runs a new image.
    Exec = 1,
    /// A tracked process forked a new process `pid` (parent in `ppid`).
    Fork = 2,
    /// Thread group `pid` exited (its leader's `sched_process_exit`).
    Exit = 3,
}

/// One discovery event. 40 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcEvent {
    /// `bpf_ktime_get_ns()` at the event (CLOCK_MONOTONIC).
    pub ktime_ns: u64,
    /// A [`ProcEventKind`] as `u32`.
    pub kind: u32,
    /// The process (tgid) the event is about.
    pub pid: u32,
    /// For `Fork`: the parent's tgid. Otherwise 0.
    pub ppid: u32,
    /// Reserved, zero.
    pub _pad: u32,
    /// The current task's `comm` (NUL-padded).
    pub comm: [u8; 16],
}

impl ProcEvent {
    /// Decodes `kind`; `None` for an unknown value (a newer kernel object).
    pub fn kind(&self) -> Option<ProcEventKind> {
        match self.kind {
            1 => Some(ProcEventKind::Exec),
            2 => Some(ProcEventKind::Fork),
            3 => Some(ProcEventKind::Exit),
            _ => None,
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: ProcEvent is repr(C), Copy, has no padding (asserted below) and
// every bit pattern is a valid value of each field.
unsafe impl aya::Pod for ProcEvent {}

const _: () = assert!(core::mem::size_of::<ProcEvent>() == 40);
