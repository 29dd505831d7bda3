//! The `resource` eBPF object: where a Python process's descriptors,
//! threads, memory growth and garbage-collector pauses come from, each event
//! with the Python stack of the thread that caused it.
//!
//! * File descriptors: `syscalls:sys_exit_*` of every call that returns a
//!   new descriptor (open, socket, accept, dup, pipe, eventfd, ...) and
//!   `sys_enter_close`/`close_range`: live descriptors by (process, fd) in
//!   [`FDS_MAP`], counted per open site in [`SITES_MAP`].
//! * Threads: `task:task_newtask` with `CLONE_THREAD` (the creating thread
//!   is current, so its stack is the creation site) and
//!   `sched:sched_process_exit`: live threads per creation site.
//! * Memory growth: `exceptions:page_fault_user` for first-touch write
//!   faults (a page of anonymous memory becoming resident: the heap grew),
//!   aggregated by (stack, faulting instruction) in [`GROWTH_MAP`], plus the
//!   stack that faulted each recent page in [`PAGES_MAP`]; `mmap`/`munmap`
//!   of pymalloc arenas (exactly the arena size) in [`ARENAS_MAP`].
//! * GC pauses: a per-CPU clock at [`GLOBAL_GC_PERIOD_NS`] reads the
//!   sampled process's `gcstate->collecting`; a run of samples inside a
//!   collection is one pause, sent over [`GC_EVENTS_MAP`].
//! * Insert sites: hardware write watchpoints on a growing container's
//!   length field (opened by userspace per thread, a few hits each) record
//!   the stack that wrote it in [`WATCH_MAP`].

/// `HashMap<u32 tgid, ResProc>`: processes tracked and what for.
pub const PROCS_MAP: &str = "RES_PROCS";
/// `HashMap<FdKey, u64 stack id>`: descriptors and their open site; a
/// closed descriptor keeps its entry, as [`FD_CLOSED`], until its number
/// is reused (updating in place costs the traced call far less than a
/// delete and an insert).
pub const FDS_MAP: &str = "RES_FDS";
/// `HashMap<u32 tid, ThreadEntry>`: live threads and their creation site.
pub const THREADS_MAP: &str = "RES_THREADS";
/// `HashMap<SiteKey, SiteValue>`: opens/closes (creations/exits) per site.
pub const SITES_MAP: &str = "RES_SITES";
/// `HashMap<GrowthKey, GrowthValue>`: memory growth per (stack, instruction).
pub const GROWTH_MAP: &str = "RES_GROWTH";
/// `LruHashMap<PageKey, u64 stack id>`: the stack that first wrote a page.
pub const PAGES_MAP: &str = "RES_PAGES";
/// `HashMap<ArenaKey, u64 length>`: live pymalloc arenas.
pub const ARENAS_MAP: &str = "RES_ARENAS";
/// `HashMap<u32 tid, Pending>`: arguments of a system call in flight.
pub const PENDING_MAP: &str = "RES_PENDING";
/// `HashMap<u32 tgid, ProcStats>`: per-process counters.
pub const PSTATS_MAP: &str = "RES_PSTATS";
/// `HashMap<u32 tgid, GcState>`: a collection being observed.
pub const GC_MAP: &str = "RES_GC";
/// Ring buffer of [`GcPause`]s.
pub const GC_EVENTS_MAP: &str = "RES_GC_EVENTS";
/// `HashMap<u32 tgid, PreSample>`: the last GC-clock sample outside a
/// collection (with [`FEAT_GC_PRE`]).
pub const GC_PRE_MAP: &str = "RES_GC_PRE";
/// `HashMap<WatchKey, u64 hits>`: writes to watched addresses by stack.
pub const WATCH_MAP: &str = "RES_WATCH";
/// Per-CPU `[u64; ErrorCode::COUNT]` error counters.
pub const ERRORS_MAP: &str = "RES_ERRORS";
/// Per-CPU `[u64; Stat::COUNT]` counters.
pub const STATS_MAP: &str = "RES_STATS";

/// Global (`u64`): nanoseconds between two GC-state samples on one CPU.
pub const GLOBAL_GC_PERIOD_NS: &str = "RES_GC_PERIOD_NS";
/// Global (`u64`): memory-growth stacks captured per second and process at
/// most; faults beyond it are counted under [`STACK_UNSAMPLED`].
pub const GLOBAL_FAULT_CAPTURES_PER_SEC: &str = "RES_FAULT_CAPTURES_PER_SEC";
/// Global (`u32`): offset of `clone_flags` in `task:task_newtask`.
pub const GLOBAL_NEWTASK_CLONE_FLAGS_OFF: &str = "RES_NEWTASK_CLONE_FLAGS_OFF";
/// Global (`u32`): offset of `pid` in `task:task_newtask`.
pub const GLOBAL_NEWTASK_PID_OFF: &str = "RES_NEWTASK_PID_OFF";
/// Global (`u32`): offset of the first argument in `syscalls:sys_enter_*`.
pub const GLOBAL_SYSCALL_ARGS_OFF: &str = "RES_SYSCALL_ARGS_OFF";
/// Global (`u32`): offset of `ret` in `syscalls:sys_exit_*`.
pub const GLOBAL_SYSCALL_RET_OFF: &str = "RES_SYSCALL_RET_OFF";
/// Globals (`u32`): offsets of `address`, `ip`, `error_code` in
/// `exceptions:page_fault_user`.
pub const GLOBAL_FAULT_ADDRESS_OFF: &str = "RES_FAULT_ADDRESS_OFF";
pub const GLOBAL_FAULT_IP_OFF: &str = "RES_FAULT_IP_OFF";
pub const GLOBAL_FAULT_ERROR_OFF: &str = "RES_FAULT_ERROR_OFF";

/// [`ResProc::features`]: track descriptors.
pub const FEAT_FD: u32 = 1 << 0;
/// [`ResProc::features`]: track threads.
pub const FEAT_THREAD: u32 = 1 << 1;
/// [`ResProc::features`]: track memory growth and arenas.
pub const FEAT_MEMORY: u32 = 1 << 2;
/// [`ResProc::features`]: sample the collector's state.
pub const FEAT_GC: u32 = 1 << 3;
/// [`ResProc::features`]: record watchpoint hits.
pub const FEAT_WATCH: u32 = 1 << 4;
/// [`ResProc::features`]: remember the innermost frames of each GC-clock
/// sample outside a collection, so a pause can name what ran just before
/// it (3.12+ runs collections at the next eval-breaker check, away from
/// the allocation that scheduled them).
pub const FEAT_GC_PRE: u32 = 1 << 5;

/// Frames kept of the sample taken just before a collection.
pub const PRE_FRAMES: usize = 8;

/// [`SiteKey::kind`]: a descriptor open site.
pub const SITE_FD: u32 = 1;
/// [`SiteKey::kind`]: a thread creation site.
pub const SITE_THREAD: u32 = 2;

/// [`GrowthKey::kind`]: a first-touch write fault (one page).
pub const GROWTH_FAULT: u32 = 1;

/// Stack id of an event whose stack was not captured (budget spent).
pub const STACK_UNSAMPLED: u64 = u64::MAX - 2;
/// Stack id of an event whose capture failed (counted in errors too).
pub const STACK_FAILED: u64 = u64::MAX - 3;

/// [`FDS_MAP`] value of a descriptor number that is closed.
pub const FD_CLOSED: u64 = u64::MAX - 4;

/// Most recent descriptors (or tids) remembered per site.
pub const RECENT: usize = 4;

/// Capacities.
pub const FDS_MAX: u32 = 65536;
pub const THREADS_MAX: u32 = 32768;
pub const SITES_MAX: u32 = 16384;
pub const GROWTH_MAX: u32 = 16384;
pub const PAGES_MAX: u32 = 65536;
pub const ARENAS_MAX: u32 = 65536;
pub const PENDING_MAX: u32 = 16384;
pub const PROCS_MAX: u32 = 4096;
pub const WATCH_MAX: u32 = 4096;
/// Size of [`GC_EVENTS_MAP`] in bytes (a power of two).
pub const GC_EVENTS_BYTES: u32 = 64 * 1024;
/// Most descriptors one `close_range` call releases in the kernel's books.
pub const CLOSE_RANGE_MAX: u32 = 4096;
/// Generations of CPython's collector.
pub const GC_GENERATIONS: usize = 3;

/// `mmap` flags of a pymalloc arena: `MAP_PRIVATE | MAP_ANONYMOUS`.
pub const MAP_PRIVATE: u64 = 0x02;
pub const MAP_ANONYMOUS: u64 = 0x20;
/// `fcntl` commands that return a new descriptor.
pub const F_DUPFD: u64 = 0;
pub const F_DUPFD_CLOEXEC: u64 = 1030;

/// What is tracked for one process (filled by userspace).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResProc {
    /// `FEAT_*` bits.
    pub features: u32,
    /// pymalloc's arena size for this version (256 KiB before 3.10, 1 MiB
    /// after); 0 when unknown.
    pub arena_size: u32,
    /// Address of `gcstate->collecting` (an `int`), 0 when unknown.
    pub gc_collecting_addr: u64,
    /// Address of `gcstate->generation_stats[0].collections`.
    pub gc_stats_addr: u64,
    /// Bytes between two generations' `collections` counters.
    pub gc_stats_stride: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// A live descriptor.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FdKey {
    pub pid: u32,
    pub fd: u32,
}

/// A live thread (value of [`THREADS_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadEntry {
    /// Creation site.
    pub stack_id: u64,
    /// Its process.
    pub pid: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// An open (or thread creation) site of one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SiteKey {
    pub stack_id: u64,
    pub pid: u32,
    /// `SITE_*`.
    pub kind: u32,
}

/// Counters of one site. `opened - closed` are live.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteValue {
    pub opened: u64,
    pub closed: u64,
    /// `bpf_ktime_get_ns` of the last open.
    pub last_ns: u64,
    /// The last [`RECENT`] descriptors (or tids) opened here, a ring.
    pub recent: [u32; RECENT],
    /// Next slot of `recent`.
    pub next: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// Memory growth by stack and faulting instruction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GrowthKey {
    pub stack_id: u64,
    /// User instruction pointer that touched the new page.
    pub ip: u64,
    pub pid: u32,
    /// `GROWTH_*`.
    pub kind: u32,
}

/// Events and bytes of growth.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrowthValue {
    pub events: u64,
    pub bytes: u64,
}

/// One page of one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PageKey {
    /// Address >> 12.
    pub page: u64,
    pub pid: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// A live pymalloc arena.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ArenaKey {
    pub addr: u64,
    pub pid: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// Arguments of a system call between its enter and exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Pending {
    /// `PENDING_*`: which call.
    pub what: u64,
    pub args: [u64; 3],
}

/// [`Pending::what`]: `pipe`/`pipe2` (args[0]: `int[2]` pointer).
pub const PENDING_PIPE: u64 = 1;
/// [`Pending::what`]: `socketpair` (args[0]: `int[2]` pointer).
pub const PENDING_SOCKETPAIR: u64 = 2;
/// [`Pending::what`]: `fcntl` (args[0]: command).
pub const PENDING_FCNTL: u64 = 3;
/// [`Pending::what`]: an arena-sized anonymous `mmap` (args[0]: length).
pub const PENDING_MMAP: u64 = 4;

/// Per-process counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcStats {
    /// Bytes of arenas mapped / unmapped since tracking began.
    pub arena_mapped: u64,
    pub arena_unmapped: u64,
    /// First-touch write faults, and how many had their stack captured.
    pub faults: u64,
    pub faults_captured: u64,
    /// Stack-capture budget: tokens left and when they were last refilled.
    pub tokens: u64,
    pub refill_ns: u64,
    /// GC-state samples of this process, and how many were inside a
    /// collection.
    pub gc_samples: u64,
    pub gc_samples_collecting: u64,
}

/// The innermost frames of one sample.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PreSample {
    pub frames: [crate::pystack::PyFrame; PRE_FRAMES],
    pub len: u32,
    pub tid: u32,
}

/// A collection being observed (value of [`GC_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GcState {
    /// First and last sample seen inside the collection.
    pub first_ns: u64,
    pub last_ns: u64,
    /// Stack of the thread sampled first inside it.
    pub stack_id: u64,
    /// `generation_stats[i].collections` at the first sample.
    pub before: [u64; GC_GENERATIONS],
    /// Samples inside it.
    pub samples: u32,
    /// Thread sampled first.
    pub tid: u32,
    /// The process's last sample before it (with [`FEAT_GC_PRE`]).
    pub pre: PreSample,
}

/// One observed collection pause (ring buffer record).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GcPause {
    /// Last sample inside minus first, plus one sampling period.
    pub duration_ns: u64,
    /// `bpf_ktime_get_ns` of the last sample inside.
    pub end_ns: u64,
    pub stack_id: u64,
    /// Collections each generation completed during the pause.
    pub collections: [u32; GC_GENERATIONS],
    pub pid: u32,
    pub tid: u32,
    pub samples: u32,
    /// The process's last sample before the pause (`pre.len == 0`: none).
    pub pre: PreSample,
}

/// A write to a watched address by one stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WatchKey {
    pub addr: u64,
    pub stack_id: u64,
    pub pid: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// Index into [`STATS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    FdOpens = 0,
    FdCloses = 1,
    ThreadsCreated = 2,
    ThreadsExited = 3,
    Faults = 4,
    FaultsCaptured = 5,
    GcSamples = 6,
    GcPauses = 7,
    WatchHits = 8,
    /// Events lost to a full map or ring buffer.
    Lost = 9,
    /// Stacks cut at `MAX_FRAMES`.
    Truncated = 10,
}

impl Stat {
    /// Number of counters.
    pub const COUNT: u32 = 11;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): repr(C), Copy, no implicit padding (sizes asserted
    // below), every bit pattern valid.
    unsafe impl aya::Pod for super::ResProc {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FdKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ThreadEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SiteKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SiteValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GrowthKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GrowthValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PageKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ArenaKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProcStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::WatchKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PreSample {}
}

const _: () = assert!(core::mem::size_of::<ResProc>() == 32);
const _: () = assert!(core::mem::size_of::<FdKey>() == 8);
const _: () = assert!(core::mem::size_of::<ThreadEntry>() == 16);
const _: () = assert!(core::mem::size_of::<SiteKey>() == 16);
const _: () = assert!(core::mem::size_of::<SiteValue>() == 48);
const _: () = assert!(core::mem::size_of::<GrowthKey>() == 24);
const _: () = assert!(core::mem::size_of::<GrowthValue>() == 16);
const _: () = assert!(core::mem::size_of::<PageKey>() == 16);
const _: () = assert!(core::mem::size_of::<ArenaKey>() == 16);
const _: () = assert!(core::mem::size_of::<Pending>() == 32);
const _: () = assert!(core::mem::size_of::<ProcStats>() == 64);
const _: () = assert!(core::mem::size_of::<PreSample>() == 16 * PRE_FRAMES + 8);
const _: () = assert!(core::mem::size_of::<GcState>() == 56 + 16 * PRE_FRAMES + 8);
const _: () = assert!(core::mem::size_of::<GcPause>() == 48 + 16 * PRE_FRAMES + 8);
const _: () = assert!(core::mem::size_of::<WatchKey>() == 24);
