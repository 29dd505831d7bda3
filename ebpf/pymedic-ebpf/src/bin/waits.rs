//! Blocking and event-loop steps of Python threads (see
//! `pymedic_common::waits` for the maps and what userspace does with them).
//!
//! * `waits_futex_enter` / `waits_futex_exit` (`syscalls:sys_{enter,exit}_futex`):
//!   waits, aggregated when they end, with their Python stack when long
//!   (or sampled); wakes of addresses that have waiters, with the waker's
//!   stack when the waiters waited long (or sampled).
//! * `waits_loop_enter` / `waits_loop_exit` (`syscalls:sys_{enter,exit}_epoll_wait`,
//!   `epoll_pwait`, `epoll_pwait2`): event-loop step lengths.
//! * `waits_switch` (`sched:sched_switch`): time a loop thread spends off CPU
//!   inside a step, with the stack it blocked at.
//! * `waits_sample` (per-CPU clock, low rate): the stack of a loop thread
//!   whose step has run long (CPU-bound work in a coroutine).
//! * `waits_exit` (`sched:sched_process_exit`): forget the exiting thread.
//! * `waits_sem_init` (uprobe on libc's `sem_init`) or, on 3.13+ shared
//!   builds, `waits_lock_alloc` (uretprobe on `PyThread_allocate_lock`):
//!   count lock allocations per semaphore address (generations).
#![no_std]
#![no_main]

use aya_ebpf::{
    Global,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::{map, perf_event, tracepoint, uprobe, uretprobe},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::{PerfEventContext, ProbeContext, RetProbeContext, TracePointContext},
};
use pymedic_common::{
    errors::ErrorCode,
    pystack::EMPTY_STACK_ID,
    waits::{
        AGG_MAX, AddrKey, CONTENDED_MAX, InflightWait, SEM_GEN_MAX, StepState, THREADS_MAX,
        WAIT_TIMED, WaitAgg, WaitKey,
    },
};
use pymedic_ebpf::{
    errors::count,
    pystack::{self, CaptureError},
};

#[map]
static WAITS_INFLIGHT: HashMap<u32, InflightWait> = HashMap::with_max_entries(THREADS_MAX, 0);

#[map]
static WAITS_AGG: HashMap<WaitKey, WaitAgg> = HashMap::with_max_entries(AGG_MAX, 0);

#[map]
static WAITS_WAKES: HashMap<WaitKey, WaitAgg> = HashMap::with_max_entries(AGG_MAX, 0);

#[map]
static WAITS_CONTENDED: HashMap<AddrKey, u64> = HashMap::with_max_entries(CONTENDED_MAX, 0);

#[map]
static WAITS_STEPS: HashMap<u32, StepState> = HashMap::with_max_entries(THREADS_MAX, 0);

#[map]
static WAITS_SEM_GEN: LruHashMap<AddrKey, u32> = LruHashMap::with_max_entries(SEM_GEN_MAX, 0);

#[map]
static WAITS_ERRORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ErrorCode::COUNT, 0);

#[unsafe(no_mangle)]
static WAITS_STEP_THRESHOLD_NS: Global<u64> = Global::new(100_000_000);
#[unsafe(no_mangle)]
static WAITS_STACK_MIN_NS: Global<u64> = Global::new(1_000_000);
#[unsafe(no_mangle)]
static WAITS_SAMPLE_MASK: Global<u32> = Global::new(31);
#[unsafe(no_mangle)]
static WAITS_SWITCH_NEXT_PID_OFF: Global<u32> = Global::new(56);
#[unsafe(no_mangle)]
static WAITS_SWITCH_PREV_STATE_OFF: Global<u32> = Global::new(24);
#[unsafe(no_mangle)]
static WAITS_FUTEX_UADDR_OFF: Global<u32> = Global::new(16);
#[unsafe(no_mangle)]
static WAITS_FUTEX_OP_OFF: Global<u32> = Global::new(24);
#[unsafe(no_mangle)]
static WAITS_FUTEX_UTIME_OFF: Global<u32> = Global::new(40);

const FUTEX_WAIT: u32 = 0;
const FUTEX_WAKE: u32 = 1;
const FUTEX_WAIT_BITSET: u32 = 9;
const FUTEX_WAKE_BITSET: u32 = 10;
/// `FUTEX_PRIVATE_FLAG | FUTEX_CLOCK_REALTIME` cleared.
const FUTEX_CMD_MASK: u32 = !(128 | 256);

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

/// The current thread's Python stack id; `EMPTY_STACK_ID` when it cannot
/// be had (counted).
#[inline(always)]
fn stack(tgid: u32, tid: u32) -> u64 {
    match pystack::capture_current(tgid, tid) {
        Ok((id, _)) => id,
        Err(CaptureError::NoThreadState) => EMPTY_STACK_ID,
        Err(e) => {
            count(&WAITS_ERRORS, e.code());
            EMPTY_STACK_ID
        }
    }
}

/// Whether an event that lasted `ns` gets the thread's Python stack: every
/// long one, and a random 1 in `WAITS_SAMPLE_MASK + 1` of the short ones
/// (a lock-heavy program makes ~10⁵ short futex calls per second; walking
/// each stack would double its run time).
#[inline(always)]
fn wants_stack(ns: u64) -> bool {
    if ns >= WAITS_STACK_MIN_NS.load() {
        return true;
    }
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    (unsafe { bpf_get_prandom_u32() }) & WAITS_SAMPLE_MASK.load() == 0
}

/// Adds one event of `ns` to `key` in `map`.
#[inline(always)]
fn add(map: &HashMap<WaitKey, WaitAgg>, key: &WaitKey, ns: u64) {
    for _ in 0..2 {
        if let Some(v) = map.get_ptr_mut(key) {
            // SAFETY: a live map value; each key names one thread, whose
            // events never run on two CPUs at once, so plain adds do not race.
            unsafe {
                (*v).count += 1;
                (*v).total_ns += ns;
                if ns > (*v).max_ns {
                    (*v).max_ns = ns;
                }
            }
            return;
        }
        let value = WaitAgg {
            count: 1,
            total_ns: ns,
            max_ns: ns,
        };
        match map.insert(key, value, BPF_NOEXIST as u64) {
            Ok(()) => return,
            Err(-17) => continue,
            Err(_) => break,
        }
    }
    count(&WAITS_ERRORS, ErrorCode::MapFull);
}

#[inline(always)]
fn read_arg<T>(ctx: &TracePointContext, off: u32) -> Option<T> {
    // SAFETY: offsets come from this kernel's tracepoint format files; the
    // read is bounds-checked by the helper.
    match unsafe { ctx.read_at::<T>(off as usize) } {
        Ok(v) => Some(v),
        Err(_) => {
            count(&WAITS_ERRORS, ErrorCode::TracepointArg);
            None
        }
    }
}

#[tracepoint(category = "syscalls", name = "sys_enter_futex")]
pub fn waits_futex_enter(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current();
    if pystack::proc_info(tgid).is_none() {
        return 0;
    }
    let Some(uaddr) = read_arg::<u64>(&ctx, WAITS_FUTEX_UADDR_OFF.load()) else {
        return 0;
    };
    let Some(op) = read_arg::<u32>(&ctx, WAITS_FUTEX_OP_OFF.load()) else {
        return 0;
    };
    let cmd = op & FUTEX_CMD_MASK;
    let t = now();
    let addr = AddrKey {
        uaddr,
        tgid,
        _pad: 0,
    };
    if cmd == FUTEX_WAIT || cmd == FUTEX_WAIT_BITSET {
        let utime = read_arg::<u64>(&ctx, WAITS_FUTEX_UTIME_OFF.load()).unwrap_or(0);
        // The stack is walked when the wait ends (`waits_futex_exit`: the
        // thread has run no Python since), and only if it was long or
        // sampled; userspace reads the stack of a wait still in flight.
        let wait = InflightWait {
            uaddr,
            start_ns: t,
            stack_id: EMPTY_STACK_ID,
            tgid,
            flags: if utime != 0 { WAIT_TIMED } else { 0 },
        };
        if WAITS_INFLIGHT.insert(tid, wait, 0).is_err() {
            count(&WAITS_ERRORS, ErrorCode::MapFull);
        }
        // The address has had waiters since the first one arrived.
        let _ = WAITS_CONTENDED.insert(addr, t, BPF_NOEXIST as u64);
    } else if cmd == FUTEX_WAKE || cmd == FUTEX_WAKE_BITSET {
        // SAFETY: plain-data value, copied out.
        let Some(since) = (unsafe { WAITS_CONTENDED.get(addr) }).copied() else {
            return 0; // nobody we saw waits there: not worth a stack
        };
        let _ = WAITS_CONTENDED.remove(addr);
        let held = t.saturating_sub(since);
        let key = WaitKey {
            uaddr,
            stack_id: if wants_stack(held) {
                stack(tgid, tid)
            } else {
                EMPTY_STACK_ID
            },
            tgid,
            tid,
        };
        add(&WAITS_WAKES, &key, held);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_futex")]
pub fn waits_futex_exit(_ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current();
    // Only registered processes' waits are in flight: one lookup filters.
    // SAFETY: plain-data value, copied out before the remove.
    let Some(wait) = (unsafe { WAITS_INFLIGHT.get(tid) }).copied() else {
        return 0;
    };
    let _ = WAITS_INFLIGHT.remove(tid);
    let waited = now().saturating_sub(wait.start_ns);
    let key = WaitKey {
        uaddr: wait.uaddr,
        stack_id: if wants_stack(waited) {
            stack(tgid, tid)
        } else {
            EMPTY_STACK_ID
        },
        tgid,
        tid,
    };
    add(&WAITS_AGG, &key, waited);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_epoll_wait")]
pub fn waits_loop_enter(_ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current();
    if pystack::proc_info(tgid).is_none() {
        return 0;
    }
    let t = now();
    if let Some(s) = WAITS_STEPS.get_ptr_mut(tid) {
        // SAFETY: a live map value of this thread, which runs here only.
        let s = unsafe { &mut *s };
        if s.step_start_ns != 0 && s.in_wait == 0 {
            let step = t.saturating_sub(s.step_start_ns);
            s.steps += 1;
            if step > s.max_step_ns {
                s.max_step_ns = step;
            }
            if step > WAITS_STEP_THRESHOLD_NS.load() {
                s.overruns += 1;
                s.overrun_ns += step;
                s.last_overrun_ns = step;
                s.last_overrun_end_ns = t;
                s.last_block_ns = s.step_block_ns;
                s.last_block_stack = s.step_block_stack;
                s.last_cpu_stack = s.step_cpu_stack;
            }
        }
        s.in_wait = 1;
        return 0;
    }
    let s = StepState {
        tgid,
        in_wait: 1,
        ..StepState::default()
    };
    if WAITS_STEPS.insert(tid, s, 0).is_err() {
        count(&WAITS_ERRORS, ErrorCode::MapFull);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_epoll_wait")]
pub fn waits_loop_exit(_ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current();
    if pystack::proc_info(tgid).is_none() {
        return 0;
    }
    if let Some(s) = WAITS_STEPS.get_ptr_mut(tid) {
        // SAFETY: as in `waits_loop_enter`.
        let s = unsafe { &mut *s };
        s.in_wait = 0;
        s.step_start_ns = now();
        s.off_start_ns = 0;
        s.step_block_ns = 0;
        s.step_block_stack = 0;
        s.step_cpu_stack = 0;
    }
    0
}

#[tracepoint(category = "sched", name = "sched_switch")]
pub fn waits_switch(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current();
    let t = now();
    // The outgoing task: a loop thread inside a step blocks here (a
    // preempted thread, reported as running (R or R+), is not blocking).
    if tid != 0
        && let Some(s) = WAITS_STEPS.get_ptr_mut(tid)
        && read_arg::<i64>(&ctx, WAITS_SWITCH_PREV_STATE_OFF.load())
            .is_some_and(|st| st & 0xff != 0)
    {
        // SAFETY: a live map value of this thread, which runs here only.
        let in_step = unsafe { (*s).in_wait == 0 && (*s).step_start_ns != 0 };
        if in_step {
            let stack_id = stack(tgid, tid);
            // SAFETY: as above.
            unsafe {
                (*s).off_start_ns = t;
                (*s).off_stack = stack_id;
            }
        }
    }
    // The incoming task: close its off-CPU interval.
    let Some(next) = read_arg::<i32>(&ctx, WAITS_SWITCH_NEXT_PID_OFF.load()) else {
        return 0;
    };
    let next = next as u32;
    if next == 0 {
        return 0;
    }
    if let Some(s) = WAITS_STEPS.get_ptr_mut(next) {
        // SAFETY: the incoming thread is not running anywhere else.
        let s = unsafe { &mut *s };
        if s.off_start_ns != 0 {
            let off = t.saturating_sub(s.off_start_ns);
            if s.in_wait == 0 && off > s.step_block_ns {
                s.step_block_ns = off;
                s.step_block_stack = s.off_stack;
            }
            s.off_start_ns = 0;
        }
    }
    0
}

#[perf_event]
pub fn waits_sample(_ctx: PerfEventContext) -> u32 {
    let (tgid, tid) = current();
    if tid == 0 {
        return 0;
    }
    let Some(s) = WAITS_STEPS.get_ptr_mut(tid) else {
        return 0;
    };
    // SAFETY: a live map value of the running thread.
    let s = unsafe { &mut *s };
    if s.in_wait != 0 || s.step_start_ns == 0 {
        return 0;
    }
    if now().saturating_sub(s.step_start_ns) > WAITS_STEP_THRESHOLD_NS.load() / 4 {
        s.step_cpu_stack = stack(tgid, tid);
    }
    0
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn waits_exit(_ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current();
    if pystack::proc_info(tgid).is_some() {
        pystack::forget_thread(tid);
        let _ = WAITS_INFLIGHT.remove(tid);
        let _ = WAITS_STEPS.remove(tid);
    }
    0
}

#[uprobe]
pub fn waits_sem_init(ctx: ProbeContext) -> u32 {
    let (tgid, _) = current();
    if pystack::proc_info(tgid).is_none() {
        return 0;
    }
    let Some(sem) = ctx.arg::<u64>(0) else {
        return 0;
    };
    new_generation(tgid, sem);
    0
}

/// `PyThread_allocate_lock` returned (3.13+ shared builds, where the
/// parking lot `sem_init`s a semaphore per blocked acquire and a probe on
/// `sem_init` would trap ~10⁴ times a second): the returned `sem_t*` is a
/// new lock's.
#[uretprobe]
pub fn waits_lock_alloc(ctx: RetProbeContext) -> u32 {
    let (tgid, _) = current();
    if pystack::proc_info(tgid).is_none() {
        return 0;
    }
    let sem: u64 = ctx.ret();
    if sem != 0 {
        new_generation(tgid, sem);
    }
    0
}

#[inline(always)]
fn new_generation(tgid: u32, sem: u64) {
    let key = AddrKey {
        uaddr: sem,
        tgid,
        _pad: 0,
    };
    // SAFETY: a live map value, read and written by value.
    let next = unsafe { WAITS_SEM_GEN.get(key) }.map_or(1, |g| g.wrapping_add(1));
    let _ = WAITS_SEM_GEN.insert(key, next, 0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
