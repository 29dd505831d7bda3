//! The `profile` eBPF object: on-CPU samples (per-CPU perf events) and
//! off-CPU intervals (`sched:sched_switch`), aggregated in the kernel by
//! (process, thread, stack) so userspace reads the maps once in a while
//! instead of waking per sample.

/// `HashMap<SampleKey, SampleValue>`: the aggregated profile.
pub const SAMPLES_MAP: &str = "PROFILE_SAMPLES";
/// `HashMap<u32 tid, OffCpuStart>`: threads of profiled processes that are
/// off CPU right now, with the stack they left on.
pub const OFFCPU_MAP: &str = "PROFILE_OFFCPU";
/// `HashMap<u32 tgid, u64 ktime>`: when userspace registered a process.
pub const SINCE_MAP: &str = "PROFILE_SINCE";
/// `HashMap<u32 tid, u32 tgid>`: threads that existed at registration and
/// have not been switched in since; the first switch-in of one is charged
/// from registration on, to [`STACK_BEFORE_START`].
pub const PENDING_MAP: &str = "PROFILE_PENDING";
/// Per-CPU `[u64; ErrorCode::COUNT]` error counters.
pub const ERRORS_MAP: &str = "PROFILE_ERRORS";
/// Per-CPU `[u64; Stat::COUNT]` counters.
pub const STATS_MAP: &str = "PROFILE_STATS";
/// Global (`u32`, 0/1) set before load: record off-CPU intervals.
pub const GLOBAL_OFFCPU: &str = "PROFILE_OFFCPU_ENABLED";
/// Global (`u64`) set before load: nanoseconds one on-CPU sample stands for
/// (1e9 / rate); the weight of an on-CPU sample.
pub const GLOBAL_SAMPLE_PERIOD_NS: &str = "PROFILE_SAMPLE_PERIOD_NS";
/// Globals: offset of `next_pid` in the
/// `sched:sched_switch` record (from its tracefs `format` file).
pub const GLOBAL_SWITCH_NEXT_PID_OFF: &str = "SWITCH_NEXT_PID_OFF";

/// Stack id of off-CPU time of a thread that was already off CPU when its
/// process was registered; userspace shows the stack it read then.
pub const STACK_BEFORE_START: u64 = u64::MAX;
/// Stack id of an interval whose stack could not be captured (counted in
/// `Stat::Lost` too, and shown as such rather than dropped).
pub const STACK_UNKNOWN: u64 = u64::MAX - 1;

/// Default capacity of [`SAMPLES_MAP`].
pub const SAMPLES_DEFAULT_MAX: u32 = 32768;
/// Capacity of [`OFFCPU_MAP`].
pub const OFFCPU_MAX: u32 = 16384;

/// [`SampleKey::kind`]: an on-CPU sample.
pub const KIND_ON_CPU: u32 = 1;
/// [`SampleKey::kind`]: an interval off CPU.
pub const KIND_OFF_CPU: u32 = 2;

/// Aggregation key. 24 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SampleKey {
    /// Stack id in `PY_STACKS` (`EMPTY_STACK_ID`: no Python frame).
    pub stack_id: u64,
    /// Process (tgid).
    pub pid: u32,
    /// Thread (kernel tid).
    pub tid: u32,
    /// `KIND_*`.
    pub kind: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// Aggregated value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleValue {
    /// Samples (on-CPU) or intervals (off-CPU).
    pub count: u64,
    /// Nanoseconds: `count × period` on CPU, summed interval lengths off CPU.
    pub weight_ns: u64,
}

/// A thread that went off CPU: when, and on which stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OffCpuStart {
    /// `bpf_ktime_get_ns()` when it was switched out.
    pub ktime_ns: u64,
    /// Its stack id then.
    pub stack_id: u64,
    /// Its tgid.
    pub pid: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// Index into [`STATS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Perf samples that hit a profiled process.
    OnCpuSamples = 0,
    /// Off-CPU intervals recorded.
    OffCpuIntervals = 1,
    /// Samples whose thread had no Python thread state (native thread, or
    /// the interpreter was not initialised yet / shutting down).
    NoThreadState = 2,
    /// Samples lost because `PY_STACKS` or `PROFILE_SAMPLES` was full.
    Lost = 3,
    /// Stacks cut at `MAX_FRAMES`.
    Truncated = 4,
    /// Thread-list walks done in the kernel (thread-state cache misses).
    ThreadWalks = 5,
}

impl Stat {
    /// Number of counters.
    pub const COUNT: u32 = 6;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): repr(C), Copy, no implicit padding (sizes asserted
    // below), every bit pattern valid.
    unsafe impl aya::Pod for super::SampleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SampleValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OffCpuStart {}
}

const _: () = assert!(core::mem::size_of::<SampleKey>() == 24);
const _: () = assert!(core::mem::size_of::<SampleValue>() == 16);
const _: () = assert!(core::mem::size_of::<OffCpuStart>() == 24);
