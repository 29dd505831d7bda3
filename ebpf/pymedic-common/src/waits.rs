//! The `waits` eBPF object: how long Python threads block, on what, where,
//! and who let them go; and how long asyncio (or uvloop) event-loop steps run.
//!
//! * `futex(2)` waits (`syscalls:sys_enter_futex` / `sys_exit_futex`) of
//!   registered processes: every blocked lock acquire, condition wait and
//!   GIL wait is one. While a thread waits it has an [`InflightWait`] in
//!   [`INFLIGHT_MAP`] (without a stack: userspace reads the stack of a
//!   wait that lasts); when it returns, the wait is added to
//!   [`WAIT_AGG_MAP`] under `(process, thread, futex address, stack)`.
//! * `FUTEX_WAKE`s on an address some thread of the process waits on are
//!   the holder letting waiters go (a contended `sem_post`, the GIL's
//!   `drop_gil`): added to [`WAKE_AGG_MAP`] under the waker's stack, with
//!   the time the address had waiters before it.
//! * Stacks are sampled: a wait (or a wake whose waiters waited) of at
//!   least [`GLOBAL_STACK_MIN_NS`] always gets its Python stack, a shorter
//!   one with probability 1 / ([`GLOBAL_SAMPLE_MASK`] + 1); the others are
//!   aggregated under `EMPTY_STACK_ID`. Counts and times are exact per
//!   thread and address; the split of short waits between call sites is
//!   estimated from the sampled ones. A lock-heavy program makes ~10⁵
//!   short futex calls a second, and walking every stack doubled its run
//!   time (`cargo xtask bench locks`).
//! * `epoll_wait`/`epoll_pwait`/`epoll_pwait2` bracket each iteration of an
//!   event loop (asyncio's selector and libuv both use them): the time from
//!   one wait's return to the next wait's entry is a *step*; per-thread step
//!   state and statistics are in [`STEPS_MAP`]. While a step runs,
//!   `sched_switch` records the longest time the loop thread spent off CPU
//!   and the stack it blocked at (a synchronous sleep, a socket call), and
//!   a low-rate per-CPU clock samples its stack once the step is long (a CPU
//!   loop inside a coroutine).
//!
//! The kernel filters by the stack walker's `PY_PROCS` (registered
//! processes), so other processes cost one map lookup per such syscall.

/// `HashMap<u32 tid, InflightWait>`: threads blocked in `futex` now.
pub const INFLIGHT_MAP: &str = "WAITS_INFLIGHT";
/// `HashMap<WaitKey, WaitAgg>`: finished waits, aggregated.
pub const WAIT_AGG_MAP: &str = "WAITS_AGG";
/// `HashMap<WaitKey, WaitAgg>`: wakes of waited-on addresses by the waker's
/// stack (`tid` is the waker; `total_ns` the time the address had waiters).
pub const WAKE_AGG_MAP: &str = "WAITS_WAKES";
/// `HashMap<AddrKey, u64 ktime>`: addresses with waiters since when.
pub const CONTENDED_MAP: &str = "WAITS_CONTENDED";
/// `HashMap<u32 tid, StepState>`: threads that wait in `epoll_wait`.
pub const STEPS_MAP: &str = "WAITS_STEPS";
/// Global (`u64`): a wait (or a wake's waiters' wait) this long always
/// gets its Python stack.
pub const GLOBAL_STACK_MIN_NS: &str = "WAITS_STACK_MIN_NS";
/// Global (`u32`, `2^k - 1`): a shorter one gets it when a random `u32`
/// has none of these bits set.
pub const GLOBAL_SAMPLE_MASK: &str = "WAITS_SAMPLE_MASK";
/// Global (`u32`): offset of `next_pid` in the `sched:sched_switch` record.
pub const GLOBAL_SWITCH_NEXT_PID_OFF: &str = "WAITS_SWITCH_NEXT_PID_OFF";
/// Global (`u32`): offset of `prev_state` in the `sched:sched_switch` record.
pub const GLOBAL_SWITCH_PREV_STATE_OFF: &str = "WAITS_SWITCH_PREV_STATE_OFF";
/// Per-CPU `[u64; ErrorCode::COUNT]`.
pub const ERRORS_MAP: &str = "WAITS_ERRORS";
/// Global (`u64`): a step longer than this many ns counts as an overrun.
pub const GLOBAL_STEP_THRESHOLD_NS: &str = "WAITS_STEP_THRESHOLD_NS";
/// Globals: byte offsets of `uaddr`, `op` and `utime` in the
/// `syscalls:sys_enter_futex` record (from its tracefs `format` file).
pub const GLOBAL_FUTEX_UADDR_OFF: &str = "WAITS_FUTEX_UADDR_OFF";
pub const GLOBAL_FUTEX_OP_OFF: &str = "WAITS_FUTEX_OP_OFF";
pub const GLOBAL_FUTEX_UTIME_OFF: &str = "WAITS_FUTEX_UTIME_OFF";

/// `LruHashMap<AddrKey, u32>`: how many times each semaphore address of a
/// registered process was initialised (`sem_init`, a uprobe on the
/// process's libc). A `threading.Lock`/`RLock` allocates its `sem_t` with
/// `sem_init`, so a lock object at a reused address (with, as malloc
/// likes to, a reused semaphore) is told from its predecessor.
pub const SEM_GEN_MAP: &str = "WAITS_SEM_GEN";
/// Capacity of [`SEM_GEN_MAP`].
pub const SEM_GEN_MAX: u32 = 65536;

/// Capacity of [`INFLIGHT_MAP`] and [`STEPS_MAP`].
pub const THREADS_MAX: u32 = 16384;
/// Capacity of [`WAIT_AGG_MAP`] and [`WAKE_AGG_MAP`].
pub const AGG_MAX: u32 = 16384;
/// Capacity of [`CONTENDED_MAP`].
pub const CONTENDED_MAX: u32 = 8192;

/// [`InflightWait::flags`]: the wait has a timeout.
pub const WAIT_TIMED: u32 = 1 << 0;

/// A thread blocked in `futex(FUTEX_WAIT*)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InflightWait {
    /// The futex word (for a `threading.Lock`: its `sem_t`).
    pub uaddr: u64,
    /// `bpf_ktime_get_ns()` at entry.
    pub start_ns: u64,
    /// Always `EMPTY_STACK_ID` (the stack is walked when the wait ends).
    pub stack_id: u64,
    /// Process.
    pub tgid: u32,
    /// `WAIT_*`.
    pub flags: u32,
}

/// Aggregation key of waits and wakes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WaitKey {
    pub uaddr: u64,
    pub stack_id: u64,
    pub tgid: u32,
    pub tid: u32,
}

/// Aggregated waits (or wakes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WaitAgg {
    pub count: u64,
    pub total_ns: u64,
    pub max_ns: u64,
}

/// A futex address of one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub uaddr: u64,
    pub tgid: u32,
    pub _pad: u32,
}

/// An event-loop thread's step state and statistics.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepState {
    /// When the current step began (the last wait returned); 0 before the
    /// first return.
    pub step_start_ns: u64,
    /// Steps completed.
    pub steps: u64,
    /// Steps longer than the threshold.
    pub overruns: u64,
    /// Summed length of those steps.
    pub overrun_ns: u64,
    /// Longest step.
    pub max_step_ns: u64,
    /// Length of the latest overrun and when it ended.
    pub last_overrun_ns: u64,
    pub last_overrun_end_ns: u64,
    /// Inside a step and off CPU now: since when, and the stack it left on.
    pub off_start_ns: u64,
    pub off_stack: u64,
    /// The current step's longest time off CPU and the stack it blocked at.
    pub step_block_ns: u64,
    pub step_block_stack: u64,
    /// The current step's latest on-CPU sample stack (taken once the step
    /// is older than a quarter of the threshold), or 0.
    pub step_cpu_stack: u64,
    /// The same three for the latest overrun.
    pub last_block_ns: u64,
    pub last_block_stack: u64,
    pub last_cpu_stack: u64,
    pub tgid: u32,
    /// 1 while inside the wait (no step running).
    pub in_wait: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): repr(C), Copy, no implicit padding (sizes asserted
    // below), every bit pattern valid.
    unsafe impl aya::Pod for super::InflightWait {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::WaitKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::WaitAgg {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AddrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::StepState {}
}

const _: () = assert!(core::mem::size_of::<InflightWait>() == 32);
const _: () = assert!(core::mem::size_of::<WaitKey>() == 24);
const _: () = assert!(core::mem::size_of::<WaitAgg>() == 24);
const _: () = assert!(core::mem::size_of::<AddrKey>() == 16);
const _: () = assert!(core::mem::size_of::<StepState>() == 128);
