//! Resource tracking of Python processes: descriptors, threads, memory
//! growth, collector pauses and container inserts, each with the Python
//! stack of the thread that caused it. See `pymedic_common::resource` for
//! the maps and what userspace does with them.
//!
//! Every program first looks the current process up in `RES_PROCS` (one
//! hash lookup) and returns at once for anything untracked.
#![no_std]
#![no_main]
// The BPF target has no `AtomicU64::fetch_add`; the intrinsic lowers to
// BPF's atomic add.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{AtomicOrdering, atomic_xadd, atomic_xchg};

use aya_ebpf::{
    Global,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user, generated},
    macros::{map, perf_event, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{PerfEventContext, TracePointContext},
};
use pymedic_common::{
    errors::ErrorCode,
    pystack::{EMPTY_STACK_ID, STACK_TRUNCATED},
    resource::{
        ARENAS_MAX, ArenaKey, CLOSE_RANGE_MAX, F_DUPFD, F_DUPFD_CLOEXEC, FD_CLOSED, FDS_MAX,
        FEAT_FD, FEAT_GC, FEAT_GC_PRE, FEAT_MEMORY, FEAT_THREAD, FEAT_WATCH, FdKey,
        GC_EVENTS_BYTES, GC_GENERATIONS, GROWTH_FAULT, GROWTH_MAX, GcPause, GcState, GrowthKey,
        GrowthValue, MAP_ANONYMOUS, MAP_PRIVATE, PAGES_MAX, PENDING_FCNTL, PENDING_MAX,
        PENDING_MMAP, PENDING_PIPE, PENDING_SOCKETPAIR, PRE_FRAMES, PROCS_MAX, PageKey, Pending,
        PreSample, ProcStats, RECENT, ResProc, SITE_FD, SITE_THREAD, SITES_MAX, STACK_FAILED,
        STACK_UNSAMPLED, SiteKey, SiteValue, Stat, THREADS_MAX, ThreadEntry, WATCH_MAX, WatchKey,
    },
};
use pymedic_ebpf::{
    errors::count,
    pystack::{self, CaptureError},
};

#[map]
static RES_PROCS: HashMap<u32, ResProc> = HashMap::with_max_entries(PROCS_MAX, 0);
#[map]
static RES_FDS: HashMap<FdKey, u64> = HashMap::with_max_entries(FDS_MAX, 0);
#[map]
static RES_THREADS: HashMap<u32, ThreadEntry> = HashMap::with_max_entries(THREADS_MAX, 0);
#[map]
static RES_SITES: HashMap<SiteKey, SiteValue> = HashMap::with_max_entries(SITES_MAX, 0);
#[map]
static RES_GROWTH: HashMap<GrowthKey, GrowthValue> = HashMap::with_max_entries(GROWTH_MAX, 0);
#[map]
static RES_PAGES: LruHashMap<PageKey, u64> = LruHashMap::with_max_entries(PAGES_MAX, 0);
#[map]
static RES_ARENAS: HashMap<ArenaKey, u64> = HashMap::with_max_entries(ARENAS_MAX, 0);
#[map]
static RES_PENDING: HashMap<u32, Pending> = HashMap::with_max_entries(PENDING_MAX, 0);
#[map]
static RES_PSTATS: HashMap<u32, ProcStats> = HashMap::with_max_entries(PROCS_MAX, 0);
#[map]
static RES_GC: HashMap<u32, GcState> = HashMap::with_max_entries(PROCS_MAX, 0);
#[map]
static RES_GC_SCRATCH: PerCpuArray<GcState> = PerCpuArray::with_max_entries(1, 0);
#[map]
static RES_GC_PRE: HashMap<u32, PreSample> = HashMap::with_max_entries(PROCS_MAX, 0);
#[map]
static RES_GC_EVENTS: RingBuf = RingBuf::with_byte_size(GC_EVENTS_BYTES, 0);
#[map]
static RES_WATCH: HashMap<WatchKey, u64> = HashMap::with_max_entries(WATCH_MAX, 0);
#[map]
static RES_ERRORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ErrorCode::COUNT, 0);
#[map]
static RES_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

#[unsafe(no_mangle)]
static RES_GC_PERIOD_NS: Global<u64> = Global::new(1_000_000);
#[unsafe(no_mangle)]
static RES_FAULT_CAPTURES_PER_SEC: Global<u64> = Global::new(500);
#[unsafe(no_mangle)]
static RES_NEWTASK_CLONE_FLAGS_OFF: Global<u32> = Global::new(32);
#[unsafe(no_mangle)]
static RES_NEWTASK_PID_OFF: Global<u32> = Global::new(8);
#[unsafe(no_mangle)]
static RES_SYSCALL_ARGS_OFF: Global<u32> = Global::new(16);
#[unsafe(no_mangle)]
static RES_SYSCALL_RET_OFF: Global<u32> = Global::new(16);
#[unsafe(no_mangle)]
static RES_FAULT_ADDRESS_OFF: Global<u32> = Global::new(8);
#[unsafe(no_mangle)]
static RES_FAULT_IP_OFF: Global<u32> = Global::new(16);
#[unsafe(no_mangle)]
static RES_FAULT_ERROR_OFF: Global<u32> = Global::new(24);

/// `CLONE_THREAD` from `<linux/sched.h>`.
const CLONE_THREAD: u64 = 0x0001_0000;
/// Page-fault error code bits (x86): protection violation, write access.
const PF_PROT: u64 = 1 << 0;
const PF_WRITE: u64 = 1 << 1;

#[inline(always)]
fn stat(s: Stat) {
    if let Some(slot) = RES_STATS.get_ptr_mut(s as u32) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn lost(code: ErrorCode) {
    count(&RES_ERRORS, code);
    stat(Stat::Lost);
}

/// Adds `n` to the `u64` at `p` atomically (threads of one process run on
/// several CPUs at once).
#[inline(always)]
fn add(p: *mut u64, n: u64) {
    // SAFETY: `p` points at an aligned u64 inside a live map value.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, n) };
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn current() -> (u32, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ((pid_tgid >> 32) as u32, pid_tgid as u32)
}

/// The tracked process's settings if it tracks `feature`.
#[inline(always)]
fn tracked(tgid: u32, feature: u32) -> Option<&'static ResProc> {
    // SAFETY: plain-data value written whole by userspace.
    let p = unsafe { RES_PROCS.get(tgid) }?;
    (p.features & feature != 0).then_some(p)
}

/// The current thread's stack id; failures are counted and become
/// `EMPTY_STACK_ID` (no Python frame) or [`STACK_FAILED`].
#[inline(always)]
fn capture(tgid: u32, tid: u32) -> u64 {
    match pystack::capture_current(tgid, tid) {
        Ok((id, flags)) => {
            if flags & STACK_TRUNCATED != 0 {
                stat(Stat::Truncated);
            }
            id
        }
        Err(CaptureError::NoThreadState) | Err(CaptureError::NotPython) => EMPTY_STACK_ID,
        Err(e) => {
            count(&RES_ERRORS, e.code());
            STACK_FAILED
        }
    }
}

#[inline(always)]
fn arg(ctx: &TracePointContext, i: u32) -> Option<u64> {
    let off = RES_SYSCALL_ARGS_OFF.load() + i * 8;
    // SAFETY: offset from this kernel's format file; the read is checked.
    match unsafe { ctx.read_at::<u64>(off as usize) } {
        Ok(v) => Some(v),
        Err(_) => {
            count(&RES_ERRORS, ErrorCode::TracepointArg);
            None
        }
    }
}

#[inline(always)]
fn ret(ctx: &TracePointContext) -> Option<i64> {
    // SAFETY: offset from this kernel's format file; the read is checked.
    match unsafe { ctx.read_at::<i64>(RES_SYSCALL_RET_OFF.load() as usize) } {
        Ok(v) => Some(v),
        Err(_) => {
            count(&RES_ERRORS, ErrorCode::TracepointArg);
            None
        }
    }
}

// ---- sites (descriptors and threads) ----

/// One more opened at `stack_id`; `handle` (fd or tid) joins the recent ring.
#[inline(always)]
fn site_open(pid: u32, stack_id: u64, kind: u32, handle: u32) {
    let key = SiteKey {
        stack_id,
        pid,
        kind,
    };
    for _ in 0..2 {
        if let Some(v) = RES_SITES.get_ptr_mut(key) {
            // SAFETY: `v` points at a live map value; the counters are
            // updated atomically, the ring is best effort.
            unsafe {
                add(&raw mut (*v).opened, 1);
                (*v).last_ns = now();
                let slot = ((*v).next as usize) & (RECENT - 1);
                (*v).recent[slot] = handle;
                (*v).next = (*v).next.wrapping_add(1);
            }
            return;
        }
        let mut value = SiteValue {
            opened: 1,
            last_ns: now(),
            next: 1,
            ..SiteValue::default()
        };
        value.recent[0] = handle;
        match RES_SITES.insert(key, value, BPF_NOEXIST as u64) {
            Ok(()) => return,
            Err(-17) => continue,
            Err(_) => break,
        }
    }
    lost(ErrorCode::MapFull);
}

#[inline(always)]
fn site_close(pid: u32, stack_id: u64, kind: u32) {
    let key = SiteKey {
        stack_id,
        pid,
        kind,
    };
    if let Some(v) = RES_SITES.get_ptr_mut(key) {
        // SAFETY: `v` points at a live map value.
        add(unsafe { &raw mut (*v).closed }, 1);
    }
}

// ---- descriptors ----

/// Descriptor `fd` was just created by the current thread.
///
/// Its entry in `RES_FDS` is rewritten in place when the number was used
/// before (the common case: numbers are reused lowest first), so a
/// steady open/close cycle never allocates or frees map elements.
#[inline(always)]
fn new_fd(tgid: u32, tid: u32, fd: u32) {
    let key = FdKey { pid: tgid, fd };
    let stack_id = capture(tgid, tid);
    stat(Stat::FdOpens);
    match RES_FDS.get_ptr_mut(key) {
        Some(slot) => {
            // SAFETY: `slot` points at a live map value; the swap is atomic
            // so a concurrent close of the old descriptor is not counted twice.
            let old = unsafe { atomic_xchg::<u64, { AtomicOrdering::Relaxed }>(slot, stack_id) };
            // A descriptor we still count as open was closed behind our
            // back (dup2 onto it, or a close we missed): release it first.
            if old != FD_CLOSED {
                site_close(tgid, old, SITE_FD);
            }
        }
        None => {
            if RES_FDS.insert(key, stack_id, 0).is_err() {
                lost(ErrorCode::MapFull);
                return;
            }
        }
    }
    site_open(tgid, stack_id, SITE_FD, fd);
}

#[inline(always)]
fn closed_fd(tgid: u32, fd: u32) {
    let key = FdKey { pid: tgid, fd };
    let Some(slot) = RES_FDS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: `slot` points at a live map value; atomic, as in `new_fd`.
    let stack_id = unsafe { atomic_xchg::<u64, { AtomicOrdering::Relaxed }>(slot, FD_CLOSED) };
    if stack_id == FD_CLOSED {
        return;
    }
    stat(Stat::FdCloses);
    site_close(tgid, stack_id, SITE_FD);
}

/// `sys_exit_*` of calls whose return value is a new descriptor (open,
/// openat, openat2, creat, socket, accept, accept4, dup, dup2, dup3,
/// eventfd, eventfd2, epoll_create, epoll_create1, timerfd_create, signalfd,
/// signalfd4, memfd_create, inotify_init, inotify_init1, pidfd_open, ...).
#[tracepoint]
pub fn res_fd_ret(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current();
    if tracked(tgid, FEAT_FD).is_none() {
        return 0;
    }
    if let Some(fd) = ret(&ctx)
        && (0..=i64::from(i32::MAX)).contains(&fd)
    {
        new_fd(tgid, tid, fd as u32);
    }
    0
}

/// `sys_enter_pipe`, `sys_enter_pipe2`: remember where the two descriptors
/// will be written.
#[tracepoint]
pub fn res_pipe_enter(ctx: TracePointContext) -> u32 {
    enter_pair(&ctx, PENDING_PIPE, 0)
}

/// `sys_enter_socketpair`: the fourth argument is the `int[2]`.
#[tracepoint]
pub fn res_socketpair_enter(ctx: TracePointContext) -> u32 {
    enter_pair(&ctx, PENDING_SOCKETPAIR, 3)
}

#[inline(always)]
fn enter_pair(ctx: &TracePointContext, what: u64, arg_index: u32) -> u32 {
    let (tgid, tid) = current();
    if tracked(tgid, FEAT_FD).is_none() {
        return 0;
    }
    if let Some(ptr) = arg(ctx, arg_index) {
        let p = Pending {
            what,
            args: [ptr, 0, 0],
        };
        if RES_PENDING.insert(tid, p, 0).is_err() {
            lost(ErrorCode::MapFull);
        }
    }
    0
}

/// `sys_exit_pipe`, `sys_exit_pipe2`, `sys_exit_socketpair`.
#[tracepoint]
pub fn res_pair_exit(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current();
    // SAFETY: plain-data value, copied before the remove.
    let Some(&p) = (unsafe { RES_PENDING.get(tid) }) else {
        return 0;
    };
    let _ = RES_PENDING.remove(tid);
    if p.what != PENDING_PIPE && p.what != PENDING_SOCKETPAIR {
        return 0;
    }
    if ret(&ctx) != Some(0) {
        return 0;
    }
    // SAFETY: fault-tolerant read of the user's int[2].
    match unsafe { bpf_probe_read_user(p.args[0] as *const [i32; 2]) } {
        Ok(fds) => {
            for fd in fds {
                if fd >= 0 {
                    new_fd(tgid, tid, fd as u32);
                }
            }
        }
        Err(_) => count(&RES_ERRORS, ErrorCode::ProbeRead),
    }
    0
}

/// `sys_enter_fcntl`: only `F_DUPFD`/`F_DUPFD_CLOEXEC` make descriptors
/// (CPython's `os.dup` uses the latter).
#[tracepoint]
pub fn res_fcntl_enter(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current();
    if tracked(tgid, FEAT_FD).is_none() {
        return 0;
    }
    if let Some(cmd) = arg(&ctx, 1)
        && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)
    {
        let p = Pending {
            what: PENDING_FCNTL,
            args: [cmd, 0, 0],
        };
        if RES_PENDING.insert(tid, p, 0).is_err() {
            lost(ErrorCode::MapFull);
        }
    }
    0
}

/// `sys_exit_fcntl`.
#[tracepoint]
pub fn res_fcntl_exit(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current();
    // SAFETY: plain-data value, copied before the remove.
    let Some(&p) = (unsafe { RES_PENDING.get(tid) }) else {
        return 0;
    };
    let _ = RES_PENDING.remove(tid);
    if p.what != PENDING_FCNTL {
        return 0;
    }
    if let Some(fd) = ret(&ctx)
        && (0..=i64::from(i32::MAX)).contains(&fd)
    {
        new_fd(tgid, tid, fd as u32);
    }
    0
}

/// `sys_enter_close`: the descriptor is gone whatever close returns.
#[tracepoint]
pub fn res_close(ctx: TracePointContext) -> u32 {
    let (tgid, _) = current();
    if tracked(tgid, FEAT_FD).is_none() {
        return 0;
    }
    if let Some(fd) = arg(&ctx, 0) {
        closed_fd(tgid, fd as u32);
    }
    0
}

#[repr(C)]
struct CloseRange {
    tgid: u32,
    first: u32,
}

extern "C" fn close_range_step(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back the `CloseRange` given to it.
    let c = unsafe { &*(ctx as *const CloseRange) };
    closed_fd(c.tgid, c.first.wrapping_add(index as u32));
    0
}

/// `sys_enter_close_range(first, last, flags)`: releases up to
/// `CLOSE_RANGE_MAX` descriptors from `first` (`CLOSE_RANGE_CLOEXEC` only
/// marks them, and is ignored).
#[tracepoint]
pub fn res_close_range(ctx: TracePointContext) -> u32 {
    let (tgid, _) = current();
    if tracked(tgid, FEAT_FD).is_none() {
        return 0;
    }
    let (Some(first), Some(last), Some(flags)) = (arg(&ctx, 0), arg(&ctx, 1), arg(&ctx, 2)) else {
        return 0;
    };
    const CLOSE_RANGE_CLOEXEC: u64 = 1 << 2;
    if flags & CLOSE_RANGE_CLOEXEC != 0 || last < first {
        return 0;
    }
    let n = (last - first + 1).min(u64::from(CLOSE_RANGE_MAX)) as u32;
    let mut c = CloseRange {
        tgid,
        first: first as u32,
    };
    // SAFETY: bpf_loop calls the callback at most `n` times with `c`,
    // which outlives the call.
    unsafe {
        generated::bpf_loop(
            n,
            close_range_step as *mut core::ffi::c_void,
            (&raw mut c).cast(),
            0,
        )
    };
    0
}

// ---- threads ----

/// `task:task_newtask`: the current task (the creator) made a thread.
#[tracepoint]
pub fn res_newtask(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current();
    if tracked(tgid, FEAT_THREAD).is_none() {
        return 0;
    }
    // SAFETY: offsets from this kernel's format file; reads are checked.
    let flags = unsafe { ctx.read_at::<u64>(RES_NEWTASK_CLONE_FLAGS_OFF.load() as usize) };
    // SAFETY: as above.
    let child = unsafe { ctx.read_at::<i32>(RES_NEWTASK_PID_OFF.load() as usize) };
    let (Ok(flags), Ok(child)) = (flags, child) else {
        count(&RES_ERRORS, ErrorCode::TracepointArg);
        return 0;
    };
    if flags & CLONE_THREAD == 0 || child <= 0 {
        return 0;
    }
    let stack_id = capture(tgid, tid);
    let entry = ThreadEntry {
        stack_id,
        pid: tgid,
        _pad: 0,
    };
    if RES_THREADS.insert(child as u32, entry, 0).is_err() {
        lost(ErrorCode::MapFull);
        return 0;
    }
    stat(Stat::ThreadsCreated);
    site_open(tgid, stack_id, SITE_THREAD, child as u32);
    0
}

/// `sched:sched_process_exit` (every exiting thread).
#[tracepoint]
pub fn res_exit(_ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current();
    // SAFETY: plain-data value, copied before the remove.
    if let Some(&t) = unsafe { RES_THREADS.get(tid) } {
        let _ = RES_THREADS.remove(tid);
        stat(Stat::ThreadsExited);
        site_close(t.pid, t.stack_id, SITE_THREAD);
    }
    if tracked(tgid, u32::MAX).is_some() {
        pystack::forget_thread(tid);
        let _ = RES_PENDING.remove(tid);
    }
    0
}

/// `sched:sched_process_exec`: a tracked process replaced its image; its
/// layout no longer applies. Userspace re-registers it if it is Python.
#[tracepoint]
pub fn res_exec(_ctx: TracePointContext) -> u32 {
    let (tgid, _) = current();
    if tracked(tgid, u32::MAX).is_some() {
        let _ = RES_PROCS.remove(tgid);
        let _ = pystack::PY_PROCS.remove(tgid);
    }
    0
}

// ---- memory ----

#[inline(always)]
fn pstats(tgid: u32) -> Option<*mut ProcStats> {
    if let Some(p) = RES_PSTATS.get_ptr_mut(tgid) {
        return Some(p);
    }
    let _ = RES_PSTATS.insert(tgid, ProcStats::default(), BPF_NOEXIST as u64);
    RES_PSTATS.get_ptr_mut(tgid)
}

/// Takes one stack-capture token of the process's per-second budget.
#[inline(always)]
fn take_token(s: *mut ProcStats) -> bool {
    let t = now();
    // SAFETY: `s` points at a live map value; races between CPUs only
    // make the budget approximate.
    unsafe {
        if t.wrapping_sub((*s).refill_ns) >= 1_000_000_000 {
            (*s).refill_ns = t;
            (*s).tokens = RES_FAULT_CAPTURES_PER_SEC.load();
        }
        if (*s).tokens == 0 {
            return false;
        }
        (*s).tokens -= 1;
    }
    true
}

/// `exceptions:page_fault_user`: a write to a page that was not resident
/// is the heap (or a stack, or a buffer) growing by one page.
#[tracepoint]
pub fn res_fault(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current();
    if tracked(tgid, FEAT_MEMORY).is_none() {
        return 0;
    }
    // SAFETY: offsets from this kernel's format file; reads are checked.
    let (error, address, ip) = unsafe {
        (
            ctx.read_at::<u64>(RES_FAULT_ERROR_OFF.load() as usize),
            ctx.read_at::<u64>(RES_FAULT_ADDRESS_OFF.load() as usize),
            ctx.read_at::<u64>(RES_FAULT_IP_OFF.load() as usize),
        )
    };
    let (Ok(error), Ok(address), Ok(ip)) = (error, address, ip) else {
        count(&RES_ERRORS, ErrorCode::TracepointArg);
        return 0;
    };
    if error & PF_PROT != 0 || error & PF_WRITE == 0 {
        return 0;
    }
    stat(Stat::Faults);
    let Some(s) = pstats(tgid) else {
        lost(ErrorCode::MapFull);
        return 0;
    };
    // SAFETY: `s` points at a live map value.
    add(unsafe { &raw mut (*s).faults }, 1);
    let stack_id = if take_token(s) {
        stat(Stat::FaultsCaptured);
        // SAFETY: as above.
        add(unsafe { &raw mut (*s).faults_captured }, 1);
        let id = capture(tgid, tid);
        let page = PageKey {
            page: address >> 12,
            pid: tgid,
            _pad: 0,
        };
        let _ = RES_PAGES.insert(page, id, 0);
        id
    } else {
        STACK_UNSAMPLED
    };
    let key = GrowthKey {
        stack_id,
        ip,
        pid: tgid,
        kind: GROWTH_FAULT,
    };
    for _ in 0..2 {
        if let Some(v) = RES_GROWTH.get_ptr_mut(key) {
            // SAFETY: `v` points at a live map value.
            unsafe {
                add(&raw mut (*v).events, 1);
                add(&raw mut (*v).bytes, 4096);
            }
            return 0;
        }
        let v = GrowthValue {
            events: 1,
            bytes: 4096,
        };
        match RES_GROWTH.insert(key, v, BPF_NOEXIST as u64) {
            Ok(()) => return 0,
            Err(-17) => continue,
            Err(_) => break,
        }
    }
    lost(ErrorCode::MapFull);
    0
}

/// `sys_enter_mmap(addr, len, prot, flags, fd, off)`: an anonymous private
/// mapping of exactly the arena size is (almost certainly) a pymalloc arena.
#[tracepoint]
pub fn res_mmap_enter(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current();
    let Some(p) = tracked(tgid, FEAT_MEMORY) else {
        return 0;
    };
    let (Some(len), Some(flags)) = (arg(&ctx, 1), arg(&ctx, 3)) else {
        return 0;
    };
    let want = MAP_PRIVATE | MAP_ANONYMOUS;
    if p.arena_size == 0 || len != u64::from(p.arena_size) || flags & want != want {
        return 0;
    }
    let pending = Pending {
        what: PENDING_MMAP,
        args: [len, 0, 0],
    };
    if RES_PENDING.insert(tid, pending, 0).is_err() {
        lost(ErrorCode::MapFull);
    }
    0
}

/// `sys_exit_mmap`.
#[tracepoint]
pub fn res_mmap_exit(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current();
    // SAFETY: plain-data value, copied before the remove.
    let Some(&p) = (unsafe { RES_PENDING.get(tid) }) else {
        return 0;
    };
    let _ = RES_PENDING.remove(tid);
    if p.what != PENDING_MMAP {
        return 0;
    }
    let Some(addr) = ret(&ctx) else {
        return 0;
    };
    if (-4095..0).contains(&addr) {
        return 0;
    }
    let key = ArenaKey {
        addr: addr as u64,
        pid: tgid,
        _pad: 0,
    };
    if RES_ARENAS.insert(key, p.args[0], 0).is_err() {
        lost(ErrorCode::MapFull);
        return 0;
    }
    if let Some(s) = pstats(tgid) {
        // SAFETY: `s` points at a live map value.
        add(unsafe { &raw mut (*s).arena_mapped }, p.args[0]);
    }
    0
}

/// `sys_enter_munmap(addr, len)`: an arena going back to the system.
#[tracepoint]
pub fn res_munmap(ctx: TracePointContext) -> u32 {
    let (tgid, _) = current();
    if tracked(tgid, FEAT_MEMORY).is_none() {
        return 0;
    }
    let Some(addr) = arg(&ctx, 0) else {
        return 0;
    };
    let key = ArenaKey {
        addr,
        pid: tgid,
        _pad: 0,
    };
    // SAFETY: plain-data value, copied before the remove.
    let Some(&len) = (unsafe { RES_ARENAS.get(key) }) else {
        return 0;
    };
    let _ = RES_ARENAS.remove(key);
    if let Some(s) = pstats(tgid) {
        // SAFETY: `s` points at a live map value.
        add(unsafe { &raw mut (*s).arena_unmapped }, len);
    }
    0
}

// ---- garbage collector ----

#[inline(always)]
fn gc_counters(p: &ResProc) -> Option<[u64; GC_GENERATIONS]> {
    let mut out = [0u64; GC_GENERATIONS];
    for (i, slot) in out.iter_mut().enumerate() {
        let addr = p.gc_stats_addr + i as u64 * u64::from(p.gc_stats_stride);
        // SAFETY: fault-tolerant user read.
        *slot = unsafe { bpf_probe_read_user(addr as *const u64) }.ok()?;
    }
    Some(out)
}

/// Per-CPU clock: is the interrupted thread's process collecting garbage?
#[perf_event]
pub fn res_gc_sample(_ctx: PerfEventContext) -> u32 {
    let (tgid, tid) = current();
    if tgid == 0 {
        return 0;
    }
    let Some(p) = tracked(tgid, FEAT_GC) else {
        return 0;
    };
    if p.gc_collecting_addr == 0 {
        return 0;
    }
    stat(Stat::GcSamples);
    // SAFETY: fault-tolerant user read of an `int`.
    let Ok(collecting) = (unsafe { bpf_probe_read_user(p.gc_collecting_addr as *const i32) })
    else {
        count(&RES_ERRORS, ErrorCode::ProbeRead);
        return 0;
    };
    let Some(s) = pstats(tgid) else {
        return 0;
    };
    // SAFETY: `s` points at a live map value.
    add(unsafe { &raw mut (*s).gc_samples }, 1);
    let t = now();
    if collecting != 0 {
        // SAFETY: as above.
        add(unsafe { &raw mut (*s).gc_samples_collecting }, 1);
        if let Some(g) = RES_GC.get_ptr_mut(tgid) {
            // SAFETY: `g` points at a live map value.
            unsafe {
                (*g).last_ns = t;
                (*g).samples += 1;
            }
            return 0;
        }
        let Some(before) = gc_counters(p) else {
            count(&RES_ERRORS, ErrorCode::ProbeRead);
            return 0;
        };
        // The state is too big for the BPF stack: build it in a per-CPU
        // scratch slot.
        let Some(state) = RES_GC_SCRATCH.get_ptr_mut(0) else {
            return 0;
        };
        let stack_id = capture(tgid, tid);
        // SAFETY: this CPU's scratch slot; plain-data copies.
        unsafe {
            (*state).first_ns = t;
            (*state).last_ns = t;
            (*state).stack_id = stack_id;
            (*state).before = before;
            (*state).samples = 1;
            (*state).tid = tid;
            match RES_GC_PRE.get_ptr(tgid) {
                Some(pre) => (*state).pre = *pre,
                None => (*state).pre.len = 0,
            }
            if RES_GC.insert(tgid, *state, 0).is_err() {
                lost(ErrorCode::MapFull);
            }
        }
        return 0;
    }
    if p.features & FEAT_GC_PRE != 0 {
        remember_pre(tgid, tid);
    }
    let Some(g) = RES_GC.get_ptr(tgid) else {
        return 0;
    };
    let Some(mut entry) = RES_GC_EVENTS.reserve::<GcPause>(0) else {
        lost(ErrorCode::RingBufFull);
        let _ = RES_GC.remove(tgid);
        return 0;
    };
    let out = entry.as_mut_ptr();
    // SAFETY: `g` points at a live map value (removed only below, after
    // its last use); `out` at the reserved record, filled field by field.
    unsafe {
        let after = gc_counters(p).unwrap_or((*g).before);
        // Three arrays indexed together, in a loop the verifier bounds.
        #[allow(clippy::needless_range_loop)]
        for i in 0..GC_GENERATIONS {
            (*out).collections[i] = after[i]
                .saturating_sub((*g).before[i])
                .min(u64::from(u32::MAX)) as u32;
        }
        (*out).duration_ns = (*g).last_ns - (*g).first_ns + RES_GC_PERIOD_NS.load();
        (*out).end_ns = (*g).last_ns;
        (*out).stack_id = (*g).stack_id;
        (*out).pid = tgid;
        (*out).tid = (*g).tid;
        (*out).samples = (*g).samples;
        (*out).pre = (*g).pre;
    }
    entry.submit(0);
    let _ = RES_GC.remove(tgid);
    stat(Stat::GcPauses);
    0
}

/// Keeps the innermost frames of this sample as the process's latest.
#[inline(always)]
// The index loop has a constant trip count the verifier can bound; a
// slice copy may become a `memcpy` call, which BPF cannot make.
#[allow(clippy::needless_range_loop)]
fn remember_pre(tgid: u32, tid: u32) {
    let Ok(stack) = pystack::walk_current(tgid, tid) else {
        return;
    };
    if stack.len == 0 {
        return;
    }
    let Some(slot) = RES_GC_PRE.get_ptr_mut(tgid) else {
        let _ = RES_GC_PRE.insert(tgid, PreSample::default(), BPF_NOEXIST as u64);
        return;
    };
    // SAFETY: `slot` points at a live map value; the scratch stack is this
    // CPU's. A concurrent sample of another thread may interleave frames;
    // the value is a hint.
    unsafe {
        for i in 0..PRE_FRAMES {
            (*slot).frames[i] = stack.frames[i];
        }
        (*slot).len = stack.len.min(PRE_FRAMES as u32);
        (*slot).tid = tid;
    }
}

// ---- container inserts (hardware watchpoints) ----

/// A write watchpoint on a container's length field fired: the current
/// thread is inserting into (or removing from) it.
///
/// Written without `#[perf_event]`, whose wrapper always returns 0: the
/// program must return 1 for the kernel to count the hit against the
/// event's overflow limit (`PERF_EVENT_IOC_REFRESH`), which disarms the
/// watchpoint after the few hits userspace asked for.
#[unsafe(no_mangle)]
#[unsafe(link_section = "perf_event")]
pub fn res_watch(ctx: *mut core::ffi::c_void) -> u32 {
    watch_hit(PerfEventContext::new(ctx.cast()));
    1
}

#[inline(always)]
fn watch_hit(ctx: PerfEventContext) {
    let (tgid, tid) = current();
    if tracked(tgid, FEAT_WATCH).is_none() {
        return;
    }
    // SAFETY: the context is the kernel's bpf_perf_event_data; `addr` is
    // the breakpoint's data address.
    let addr = unsafe { (*ctx.ctx).addr };
    stat(Stat::WatchHits);
    let key = WatchKey {
        addr,
        stack_id: capture(tgid, tid),
        pid: tgid,
        _pad: 0,
    };
    for _ in 0..2 {
        if let Some(v) = RES_WATCH.get_ptr_mut(key) {
            add(v, 1);
            return;
        }
        match RES_WATCH.insert(key, 1, BPF_NOEXIST as u64) {
            Ok(()) => return,
            Err(-17) => continue,
            Err(_) => break,
        }
    }
    lost(ErrorCode::MapFull);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
