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

use core::ffi::c_void;

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
const MAX_VISITED: u32 = (MAX_FRAMES + MAX_FRAMES / 4) as u32;

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
    let first = read_user_u64(interp + info.interp_tstate_head as u64)?;
    let mut walk = ThreadWalk {
        tstate: first,
        pthread,
        next_off: info.tstate_next as u64,
        thread_id_off: info.tstate_thread_id as u64,
        found: 0,
    };
    // SAFETY: bpf_loop calls `thread_step` at most MAX_THREADS_WALKED times
    // with a pointer to `walk`, which outlives the call.
    unsafe {
        generated::bpf_loop(
            MAX_THREADS_WALKED,
            thread_step as *mut c_void,
            (&raw mut walk).cast(),
            0,
        )
    };
    if walk.found != 0 {
        let entry = PyThreadCache {
            tstate: walk.found,
            pthread,
        };
        let _ = PY_THREADS.insert(tid, entry, 0);
        return Ok(walk.found);
    }
    Err(CaptureError::NoThreadState)
}

/// State of the bounded walk over an interpreter's thread list.
#[repr(C)]
struct ThreadWalk {
    tstate: u64,
    pthread: u64,
    next_off: u64,
    thread_id_off: u64,
    found: u64,
}

/// One step of the thread-list walk (a `bpf_loop` callback): 1 stops.
extern "C" fn thread_step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the `ThreadWalk` given to it.
    let w = unsafe { &mut *(ctx as *mut ThreadWalk) };
    if w.tstate == 0 {
        return 1;
    }
    match read_user_u64(w.tstate + w.thread_id_off) {
        Ok(id) if id == w.pthread => {
            w.found = w.tstate;
            return 1;
        }
        Ok(_) => {}
        Err(_) => return 1,
    }
    match read_user_u64(w.tstate + w.next_off) {
        Ok(next) => {
            w.tstate = next;
            0
        }
        Err(_) => 1,
    }
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
    if bits >= 64 {
        v
    } else {
        v & ((1u64 << bits) - 1)
    }
}

/// State of the bounded frame walk.
#[repr(C)]
struct FrameWalk {
    frame: u64,
    hash: u64,
    n: u32,
    flags: u32,
    read_len: u32,
    pointer_instr: u32,
    previous: u32,
    code: u32,
    instr: u32,
    owner: u32,
    owner_cstack: u32,
    code_adaptive: u32,
}

/// One step of the frame walk (a `bpf_loop` callback): reads one frame,
/// appends it to the per-CPU stack unless it is a C-stack shim. 1 stops.
extern "C" fn frame_step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the `FrameWalk` given to it.
    let w = unsafe { &mut *(ctx as *mut FrameWalk) };
    if w.frame == 0 {
        return 1;
    }
    let (Some(buf), Some(out)) = (PY_FRAME_BUF.get_ptr_mut(0), PY_SCRATCH.get_ptr_mut(0)) else {
        w.flags |= STACK_PARTIAL;
        return 1;
    };
    // SAFETY: per-CPU scratch, used by nothing else while we run.
    let (words, out) = unsafe { (&mut *buf, &mut *out) };
    // SAFETY: fault-tolerant user read of at most 255 bytes into a per-CPU
    // buffer of 2 × FRAME_READ_MAX = 256 bytes.
    let rc = unsafe {
        generated::bpf_probe_read_user(
            words.as_mut_ptr().cast(),
            w.read_len & (FRAME_READ_MAX * 2 - 1),
            w.frame as *const c_void,
        )
    };
    if rc != 0 {
        w.flags |= STACK_PARTIAL;
        return 1;
    }
    let previous = field(words, w.previous, 64);
    if w.owner != NO_OFFSET && field(words, w.owner, 8) == w.owner_cstack as u64 {
        w.frame = previous;
        return 0;
    }
    let code = field(words, w.code, 64);
    let instr = if w.pointer_instr != 0 {
        field(words, w.instr, 64).wrapping_sub(code + w.code_adaptive as u64) as u32
    } else {
        field(words, w.instr, 32) as u32
    };
    let Some(slot) = out.frames.get_mut(w.n as usize) else {
        w.flags |= STACK_TRUNCATED;
        return 1;
    };
    *slot = PyFrame {
        code,
        instr,
        _pad: 0,
    };
    w.hash = stack_hash_step(stack_hash_step(w.hash, code), instr as u64);
    w.n += 1;
    w.frame = previous;
    0
}

/// Walks the frames starting at `frame` into the per-CPU stack; returns
/// the stack id.
#[inline(always)]
fn walk(info: &PyProcInfo, frame: u64) -> Result<u64, CaptureError> {
    let mut w = FrameWalk {
        frame,
        hash: STACK_HASH_INIT,
        n: 0,
        flags: 0,
        read_len: info.frame_read_len.clamp(8, FRAME_READ_MAX),
        pointer_instr: info.flags & PROC_INSTR_IS_POINTER,
        previous: info.frame_previous,
        code: info.frame_code,
        instr: info.frame_instr,
        owner: info.frame_owner,
        owner_cstack: info.owner_cstack,
        code_adaptive: info.code_adaptive,
    };
    // SAFETY: bpf_loop calls `frame_step` at most MAX_VISITED times with a
    // pointer to `w`, which outlives the call.
    unsafe {
        generated::bpf_loop(
            MAX_VISITED,
            frame_step as *mut c_void,
            (&raw mut w).cast(),
            0,
        )
    };
    if w.frame != 0 && w.flags & STACK_PARTIAL == 0 {
        w.flags |= STACK_TRUNCATED;
    }
    let out = PY_SCRATCH.get_ptr_mut(0).ok_or(CaptureError::Scratch)?;
    // SAFETY: per-CPU scratch, used by nothing else while we run.
    let out = unsafe { &mut *out };
    out.len = w.n;
    out.flags = w.flags;
    if w.n == 0 {
        return Ok(EMPTY_STACK_ID);
    }
    let id = stack_hash_step(w.hash, w.flags as u64);
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
    let id = walk(info, frame)?;
    let scratch = PY_SCRATCH.get_ptr(0).ok_or(CaptureError::Scratch)?;
    // SAFETY: per-CPU scratch, used by nothing else while we run.
    let stack = unsafe { &*scratch };
    let flags = stack.flags;
    if id == EMPTY_STACK_ID || PY_STACKS.get_ptr(id).is_some() {
        return Ok((id, flags));
    }
    match PY_STACKS.insert(id, stack, BPF_NOEXIST as u64) {
        Ok(()) => Ok((id, flags)),
        // Another CPU stored the same stack first.
        Err(-17) => Ok((id, flags)),
        Err(_) => Err(CaptureError::MapFull),
    }
}

/// Walks the current thread's Python stack into the per-CPU scratch
/// without storing it in [`PY_STACKS`] (for callers that keep a few frames
/// themselves); valid until the next walk on this CPU.
#[inline(always)]
pub fn walk_current(tgid: u32, tid: u32) -> Result<&'static PyStack, CaptureError> {
    let info = proc_info(tgid).ok_or(CaptureError::NotPython)?;
    let tstate = current_thread_state(info, tid)?;
    let frame = current_frame(info, tstate)?;
    walk(info, frame)?;
    let scratch = PY_SCRATCH.get_ptr(0).ok_or(CaptureError::Scratch)?;
    // SAFETY: per-CPU scratch, used by nothing else while we run.
    Ok(unsafe { &*scratch })
}

/// Forgets a thread's cached thread state (call when the thread exits).
#[inline(always)]
pub fn forget_thread(tid: u32) {
    let _ = PY_THREADS.remove(tid);
}
