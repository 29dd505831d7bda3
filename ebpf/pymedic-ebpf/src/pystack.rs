//! The CPython stack walker, callable from any program type whose current
//! task is the thread to unwind (perf_event, tracepoints such as
//! `sched_switch` for the outgoing task or `syscalls:*`, uprobes).
//!
//! ```ignore
//! use pymedic_ebpf::pystack;
//! let pid_tgid = bpf_get_current_pid_tgid();
//! match pystack::capture_current((pid_tgid >> 32) as u32, pid_tgid as u32) {
//!     Ok(stack_id) => { /* put stack_id in your event; userspace reads PY_STACKS */ }
//!     Err(e) => pymedic_ebpf::errors::count(&MY_ERRORS, e.code()),
//! }
//! ```
//!
//! Userspace fills [`PY_PROCS`] (one [`PyProcInfo`] per process: addresses
//! and offsets for that interpreter build) and sets the
//! `PY_TASK_FSBASE_OFF` global; the walker never knows Python versions.
//!
//! Finding the thread state: the interrupted thread's fs base (read from
//! its `task_struct`) is its `pthread_self()`, which CPython stores in
//! `PyThreadState.thread_id`. [`PY_THREADS`] caches tid → thread state;
//! a cached entry is used only while its `thread_id` still matches, and on a
//! miss the interpreter's thread list is walked (bounded).

use aya_ebpf::{
    Global,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_user, generated},
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use pymedic_common::{
    errors::ErrorCode,
    pystack::{
        EMPTY_STACK_ID, FRAME_READ_MAX, MAX_FRAMES, MAX_THREADS_WALKED, NO_OFFSET,
        PROC_INSTR_IS_POINTER, PY_PROCS_MAX, PY_STACKS_DEFAULT_MAX, PY_THREADS_MAX, PyFrame,
        PyProcInfo, PyStack, PyThreadCache, STACK_HASH_INIT, STACK_PARTIAL, STACK_TRUNCATED,
        stack_hash_step,
    },
};

/// Per-process layouts, keyed by tgid (filled by userspace).
#[map]
pub static PY_PROCS: HashMap<u32, PyProcInfo> = HashMap::with_max_entries(PY_PROCS_MAX, 0);

/// Captured stacks by stack id (read, and drained, by userspace).
#[map]
pub static PY_STACKS: HashMap<u64, PyStack> = HashMap::with_max_entries(PY_STACKS_DEFAULT_MAX, 0);

/// tid → thread state cache.
#[map]
pub static PY_THREADS: LruHashMap<u32, PyThreadCache> =
    LruHashMap::with_max_entries(PY_THREADS_MAX, 0);

/// Per-CPU scratch: the stack being built (too big for the 512-byte stack).
#[map]
static PY_SCRATCH: PerCpuArray<PyStack> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch: the frame being decoded.
#[map]
static PY_FRAME_BUF: PerCpuArray<[u64; FRAME_WORDS]> = PerCpuArray::with_max_entries(1, 0);

/// Twice the largest read, so the verifier sees `len & 0xff` fit.
const FRAME_WORDS: usize = 2 * FRAME_READ_MAX as usize / 8;

/// Offset of `thread.fsbase` in `struct task_struct` (from BTF, by userspace).
#[unsafe(no_mangle)]
static PY_TASK_FSBASE_OFF: Global<u32> = Global::new(0);

/// Frames the walker may visit: recorded ones plus skipped C-stack shims.
const MAX_VISITED: usize = MAX_FRAMES + MAX_FRAMES / 4;

/// Why no stack was captured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureError {
    /// The process is not in [`PY_PROCS`].
    NotPython,
    /// The thread has no Python thread state (a native thread, or the
    /// interpreter is starting or finalizing).
    NoThreadState,
    /// Reading the target's or the kernel's memory failed.
    Read,
    /// [`PY_STACKS`] is full.
    MapFull,
    /// The per-CPU scratch could not be had (cannot happen once loaded).
    Scratch,
}

impl CaptureError {
    /// The error counter this maps to.
    pub fn code(self) -> ErrorCode {
        match self {
            CaptureError::NotPython | CaptureError::NoThreadState => ErrorCode::NoThreadState,
            CaptureError::Read => ErrorCode::ProbeRead,
            CaptureError::MapFull => ErrorCode::MapFull,
            CaptureError::Scratch => ErrorCode::Scratch,
        }
    }
}

#[inline(always)]
fn read_user_u64(addr: u64) -> Result<u64, CaptureError> {
    // SAFETY: bpf_probe_read_user is fault-tolerant: a bad address returns
    // an error instead of faulting.
    unsafe { bpf_probe_read_user(addr as *const u64) }.map_err(|_| CaptureError::Read)
}

/// The current task's fs base, which is `pthread_self()` on x86_64 glibc.
#[inline(always)]
fn current_pthread() -> Result<u64, CaptureError> {
    let off = PY_TASK_FSBASE_OFF.load();
    if off == 0 {
        return Err(CaptureError::Read);
    }
    // SAFETY: bpf_get_current_task has no preconditions.
    let task = unsafe { bpf_get_current_task() };
    // SAFETY: fault-tolerant kernel read at an offset taken from BTF.
    unsafe { bpf_probe_read_kernel((task + off as u64) as *const u64) }
        .map_err(|_| CaptureError::Read)
}

/// The layout of process `tgid`, if userspace registered it.
#[inline(always)]
pub fn proc_info(tgid: u32) -> Option<&'static PyProcInfo> {
    // SAFETY: values are plain data written whole by userspace; a concurrent
    // update can only make us read a mix of two valid layouts of the same
    // process, which the walker tolerates (reads are fault-tolerant).
    unsafe { PY_PROCS.get(tgid) }
}

/// Finds the `PyThreadState*` of the current thread (`tid` of a process
/// described by `info`).
#[inline(always)]
pub fn current_thread_state(info: &PyProcInfo, tid: u32) -> Result<u64, CaptureError> {
    let pthread = current_pthread()?;
    if pthread == 0 {
        return Err(CaptureError::NoThreadState);
    }
    // SAFETY: plain-data value.
    if let Some(cached) = unsafe { PY_THREADS.get(tid) }
        && cached.pthread == pthread
        && read_user_u64(cached.tstate + info.tstate_thread_id as u64) == Ok(pthread)
    {
        return Ok(cached.tstate);
    }
    let interp = read_user_u64(info.interp_head_addr)?;
    if interp == 0 {
        return Err(CaptureError::NoThreadState);
    }
    let mut tstate = read_user_u64(interp + info.interp_tstate_head as u64)?;
    for _ in 0..MAX_THREADS_WALKED {
        if tstate == 0 {
            break;
        }
        if read_user_u64(tstate + info.tstate_thread_id as u64)? == pthread {
            let entry = PyThreadCache { tstate, pthread };
            let _ = PY_THREADS.insert(tid, entry, 0);
            return Ok(tstate);
        }
        tstate = read_user_u64(tstate + info.tstate_next as u64)?;
    }
    Err(CaptureError::NoThreadState)
}

/// The innermost frame of a thread state (0: no Python frame running).
#[inline(always)]
fn current_frame(info: &PyProcInfo, tstate: u64) -> Result<u64, CaptureError> {
    let first = read_user_u64(tstate + info.tstate_frame as u64)?;
    if info.cframe_current_frame == NO_OFFSET || first == 0 {
        return Ok(first);
    }
    read_user_u64(first + info.cframe_current_frame as u64)
}

/// The field at byte offset `off` of the frame in `words`, `bits` wide.
#[inline(always)]
fn field(words: &[u64; FRAME_WORDS], off: u32, bits: u32) -> u64 {
    let word = words[(off as usize >> 3) & (FRAME_WORDS - 1)];
    let v = word >> ((off & 7) * 8);
    if bits >= 64 { v } else { v & ((1u64 << bits) - 1) }
}

/// Walks the frames starting at `frame` into `out`; returns the stack id.
#[inline(always)]
fn walk(info: &PyProcInfo, mut frame: u64, out: &mut PyStack) -> Result<u64, CaptureError> {
    let buf = PY_FRAME_BUF.get_ptr_mut(0).ok_or(CaptureError::Scratch)?;
    // SAFETY: per-CPU scratch, used by nothing else while we run.
    let words = unsafe { &mut *buf };
    let len = info.frame_read_len.min(FRAME_READ_MAX).max(8);
    let pointer_instr = info.flags & PROC_INSTR_IS_POINTER != 0;
    let mut n = 0usize;
    let mut flags = 0u32;
    let mut hash = STACK_HASH_INIT;
    for _ in 0..MAX_VISITED {
        if frame == 0 {
            break;
        }
        // SAFETY: fault-tolerant user read of `len` ≤ FRAME_READ_MAX bytes
        // into a per-CPU buffer of FRAME_READ_MAX bytes.
        let rc = unsafe {
            generated::bpf_probe_read_user(
                words.as_mut_ptr().cast(),
                len & (FRAME_READ_MAX * 2 - 1),
                frame as *const _,
            )
        };
        if rc != 0 {
            flags |= STACK_PARTIAL;
            break;
        }
        let previous = field(words, info.frame_previous, 64);
        if info.frame_owner != NO_OFFSET
            && field(words, info.frame_owner, 8) == info.owner_cstack as u64
        {
            frame = previous;
            continue;
        }
        let code = field(words, info.frame_code, 64);
        let instr = if pointer_instr {
            let ptr = field(words, info.frame_instr, 64);
            ptr.wrapping_sub(code + info.code_adaptive as u64) as u32
        } else {
            field(words, info.frame_instr, 32) as u32
        };
        let Some(slot) = out.frames.get_mut(n) else {
            flags |= STACK_TRUNCATED;
            break;
        };
        *slot = PyFrame {
            code,
            instr,
            _pad: 0,
        };
        hash = stack_hash_step(stack_hash_step(hash, code), instr as u64);
        n += 1;
        frame = previous;
    }
    if frame != 0 && flags & STACK_PARTIAL == 0 {
        flags |= STACK_TRUNCATED;
    }
    out.len = n as u32;
    out.flags = flags;
    if n == 0 {
        return Ok(EMPTY_STACK_ID);
    }
    let id = stack_hash_step(hash, flags as u64);
    Ok(if id == EMPTY_STACK_ID { 1 } else { id })
}

/// Captures the current thread's Python stack and stores it in
/// [`PY_STACKS`]; returns its stack id ([`EMPTY_STACK_ID`] when the thread
/// runs no Python code) and the stack's `STACK_*` flags.
///
/// The current task must be thread `tid` of process `tgid` (true in
/// perf_event and uprobe programs, and for the outgoing task in
/// `sched_switch`).
#[inline(always)]
pub fn capture_current(tgid: u32, tid: u32) -> Result<(u64, u32), CaptureError> {
    let info = proc_info(tgid).ok_or(CaptureError::NotPython)?;
    let tstate = current_thread_state(info, tid)?;
    let frame = current_frame(info, tstate)?;
    let scratch = PY_SCRATCH.get_ptr_mut(0).ok_or(CaptureError::Scratch)?;
    // SAFETY: per-CPU scratch, used by nothing else while we run.
    let stack = unsafe { &mut *scratch };
    let id = walk(info, frame, stack)?;
    let flags = stack.flags;
    if id == EMPTY_STACK_ID || PY_STACKS.get_ptr(id).is_some() {
        return Ok((id, flags));
    }
    match PY_STACKS.insert(id, &*stack, BPF_NOEXIST as u64) {
        Ok(()) => Ok((id, flags)),
        // Another CPU stored the same stack first.
        Err(e) if e == -17 => Ok((id, flags)),
        Err(_) => Err(CaptureError::MapFull),
    }
}

/// Forgets a thread's cached thread state (call when the thread exits).
#[inline(always)]
pub fn forget_thread(tid: u32) {
    let _ = PY_THREADS.remove(tid);
}
