//! The CPython stack walker's wire types, shared by every eBPF object that
//! captures Python stacks (`pymedic_ebpf::pystack`) and by userspace.
//!
//! One walker serves every supported CPython version: userspace works out,
//! per process, where things are ([`PyProcInfo`]: addresses and struct
//! offsets from `pymedic-python`'s layout table) and stores it in the
//! [`PY_PROCS_MAP`] map keyed by tgid. The kernel side never knows versions.
//!
//! A captured stack is a [`PyStack`]: up to [`MAX_FRAMES`] [`PyFrame`]s,
//! innermost first, each a code object address and a version-native
//! instruction position that userspace symbolizes to `file:function:line`.
//! Stacks are stored once per content hash in a [`PY_STACKS_MAP`] map; events
//! and counters refer to them by that 64-bit stack id.

/// `HashMap<u32 tgid, PyProcInfo>`: processes the walker may unwind.
pub const PY_PROCS_MAP: &str = "PY_PROCS";
/// `HashMap<u64 stack id, PyStack>`: stack contents by id.
pub const PY_STACKS_MAP: &str = "PY_STACKS";
/// `LruHashMap<u32 tid, PyThreadCache>`: the thread state last found for an
/// OS thread, revalidated on every use.
pub const PY_THREADS_MAP: &str = "PY_THREADS";
/// Global (`u32`) set by userspace before load: offset of `thread.fsbase` in
/// the kernel's `struct task_struct`, read from the kernel's BTF. On x86_64
/// glibc a thread's fs base is its `pthread_self()`, which CPython stores in
/// `PyThreadState.thread_id`.
pub const GLOBAL_TASK_FSBASE_OFF: &str = "PY_TASK_FSBASE_OFF";

/// Deepest stack the walker records; deeper stacks keep their innermost
/// `MAX_FRAMES` frames and carry [`STACK_TRUNCATED`].
pub const MAX_FRAMES: usize = 128;
/// Most thread states the kernel walks in one interpreter when a thread is
/// not in [`PY_THREADS_MAP`] yet.
pub const MAX_THREADS_WALKED: u32 = 512;
/// Capacity of [`PY_PROCS_MAP`].
pub const PY_PROCS_MAX: u32 = 4096;
/// Capacity of [`PY_THREADS_MAP`].
pub const PY_THREADS_MAX: u32 = 16384;
/// Default capacity of [`PY_STACKS_MAP`] (userspace may resize before load).
pub const PY_STACKS_DEFAULT_MAX: u32 = 8192;
/// Bytes of a frame the walker reads in one helper call; every frame field
/// offset in [`PyProcInfo`] plus its size must fit.
pub const FRAME_READ_MAX: u32 = 128;

/// "This offset does not exist in this version" in [`PyProcInfo`].
pub const NO_OFFSET: u32 = u32::MAX;

/// [`PyProcInfo::flags`]: the frame's instruction field is a pointer into the
/// code object's bytecode (3.11+: `prev_instr` / `instr_ptr`); the walker
/// stores `pointer - (code + code_adaptive)` in bytes. Without the flag it is
/// a C `int` (`f_lasti`, 3.8–3.10) stored as is.
pub const PROC_INSTR_IS_POINTER: u32 = 1 << 0;

/// [`PyStack::flags`]: the stack was deeper than [`MAX_FRAMES`]; the
/// outermost frames are missing.
pub const STACK_TRUNCATED: u32 = 1 << 0;
/// [`PyStack::flags`]: a frame could not be read (freed under us, or paged
/// out); the frames before it are kept.
pub const STACK_PARTIAL: u32 = 1 << 1;

/// Where things are in one CPython process. Filled by userspace
/// (`pymedic::pystack::proc_info`) from `pymedic-python`'s layout table.
/// All offsets are in bytes; [`NO_OFFSET`] where a field does not exist.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyProcInfo {
    /// `(major << 8) | minor`, for logs and userspace; the walker ignores it.
    pub version: u32,
    /// `PROC_*` flags.
    pub flags: u32,
    /// Address of `_PyRuntime.interpreters.head` (a `PyInterpreterState*`).
    pub interp_head_addr: u64,
    /// `PyInterpreterState` → first `PyThreadState*` (`tstate_head`,
    /// `threads.head` on 3.12+).
    pub interp_tstate_head: u32,
    /// `PyThreadState.next`.
    pub tstate_next: u32,
    /// `PyThreadState.thread_id` (`pthread_t`).
    pub tstate_thread_id: u32,
    /// `PyThreadState.native_thread_id` (kernel tid; 3.11+), or `NO_OFFSET`.
    pub tstate_native_thread_id: u32,
    /// `PyThreadState` → the current frame (3.8–3.10 `frame`, 3.13
    /// `current_frame`), or → `cframe` (3.11–3.12) when `cframe_current_frame`
    /// is set.
    pub tstate_frame: u32,
    /// `_PyCFrame.current_frame` (3.11–3.12), or `NO_OFFSET`.
    pub cframe_current_frame: u32,
    /// Frame → previous frame (`f_back`, `previous`).
    pub frame_previous: u32,
    /// Frame → code object (`f_code`, `f_executable`).
    pub frame_code: u32,
    /// Frame → instruction position (`f_lasti`, `prev_instr`, `instr_ptr`).
    pub frame_instr: u32,
    /// Frame → `owner` (a `char`; 3.11+), or `NO_OFFSET`.
    pub frame_owner: u32,
    /// Owner value of C-stack shim frames to skip (3.12+: 3), or `NO_OFFSET`.
    pub owner_cstack: u32,
    /// Bytes of a frame to read: max(field offset + size), ≤ `FRAME_READ_MAX`.
    pub frame_read_len: u32,
    /// `PyCodeObject.co_code_adaptive` (3.11+), or `NO_OFFSET`.
    pub code_adaptive: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// One Python frame as captured. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PyFrame {
    /// Address of the code object in the target.
    pub code: u64,
    /// Version-native instruction position: `f_lasti` as read (3.8–3.10), or
    /// the byte offset of the frame's instruction pointer from
    /// `co_code_adaptive` (3.11+). Userspace turns it into a line.
    pub instr: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// A captured stack, innermost frame first.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PyStack {
    /// Number of valid entries in `frames`.
    pub len: u32,
    /// `STACK_*` flags.
    pub flags: u32,
    /// The frames; entries past `len` are zero.
    pub frames: [PyFrame; MAX_FRAMES],
}

impl PyStack {
    /// The valid frames.
    pub fn frames(&self) -> &[PyFrame] {
        let n = (self.len as usize).min(MAX_FRAMES);
        &self.frames[..n]
    }
}

/// The thread state last found for an OS thread ([`PY_THREADS_MAP`] value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PyThreadCache {
    /// `PyThreadState*` in the target.
    pub tstate: u64,
    /// The `pthread_t` it was found for; the entry is used only while the
    /// thread's fs base and the thread state's `thread_id` both still equal it.
    pub pthread: u64,
}

/// Stack id of the empty stack (a thread with no Python frame).
pub const EMPTY_STACK_ID: u64 = 0;

/// FNV-1a step over one 64-bit word; the stack id is this over every frame's
/// `code` and `instr`, then `flags`. Shared so userspace can recompute ids
/// when it replays recorded stacks.
#[inline(always)]
pub const fn stack_hash_step(hash: u64, word: u64) -> u64 {
    (hash ^ word).wrapping_mul(0x0000_0100_0000_01b3)
}

/// FNV-1a offset basis.
pub const STACK_HASH_INIT: u64 = 0xcbf2_9ce4_8422_2325;

/// Recomputes a stack's id the way the kernel does.
pub fn stack_id(stack: &PyStack) -> u64 {
    let mut h = STACK_HASH_INIT;
    for f in stack.frames() {
        h = stack_hash_step(h, f.code);
        h = stack_hash_step(h, f.instr as u64);
    }
    h = stack_hash_step(h, stack.flags as u64);
    if h == EMPTY_STACK_ID { 1 } else { h }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all three): repr(C), Copy, no implicit padding (sizes asserted
    // below), and every bit pattern is a valid value of every field.
    unsafe impl aya::Pod for super::PyProcInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PyStack {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PyThreadCache {}
}

const _: () = assert!(core::mem::size_of::<PyProcInfo>() == 72);
const _: () = assert!(core::mem::size_of::<PyFrame>() == 16);
const _: () = assert!(core::mem::size_of::<PyStack>() == 8 + 16 * MAX_FRAMES);
const _: () = assert!(core::mem::size_of::<PyThreadCache>() == 16);
