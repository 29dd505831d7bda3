//! CPU and off-CPU profiling of Python processes.
//!
//! * `profile_cpu` (perf_event, one per CPU at the sampling rate): if the
//!   interrupted task belongs to a process in `PY_PROCS`, capture its Python
//!   stack and add one sample to `PROFILE_SAMPLES[(stack, pid, tid, ON_CPU)]`.
//! * `profile_switch` (`sched:sched_switch`, when off-CPU is enabled): the
//!   outgoing task (current) of a profiled process gets its stack captured
//!   and remembered in `PROFILE_OFFCPU`; when that thread is switched back in
//!   the interval is added to `PROFILE_SAMPLES[(stack, pid, tid, OFF_CPU)]`.
//! * `profile_exit` (`sched:sched_process_exit`): forget the exiting thread.
//!
//! Everything is aggregated in kernel maps; userspace reads them rarely.
#![no_std]
#![no_main]

use aya_ebpf::{
    Global,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, perf_event, tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::{PerfEventContext, TracePointContext},
};
use pymedic_common::{
    errors::ErrorCode,
    profile::{
        KIND_OFF_CPU, KIND_ON_CPU, OFFCPU_MAX, OffCpuStart, SAMPLES_DEFAULT_MAX,
        STACK_BEFORE_START, STACK_UNKNOWN, SampleKey, SampleValue, Stat,
    },
    pystack::{EMPTY_STACK_ID, PY_PROCS_MAX, PY_THREADS_MAX, STACK_TRUNCATED},
};
use pymedic_ebpf::{
    errors::count,
    pystack::{self, CaptureError},
};

#[map]
static PROFILE_SAMPLES: HashMap<SampleKey, SampleValue> =
    HashMap::with_max_entries(SAMPLES_DEFAULT_MAX, 0);

#[map]
static PROFILE_OFFCPU: HashMap<u32, OffCpuStart> = HashMap::with_max_entries(OFFCPU_MAX, 0);

#[map]
static PROFILE_SINCE: HashMap<u32, u64> = HashMap::with_max_entries(PY_PROCS_MAX, 0);

#[map]
static PROFILE_PENDING: HashMap<u32, u32> = HashMap::with_max_entries(PY_THREADS_MAX, 0);

#[map]
static PROFILE_ERRORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ErrorCode::COUNT, 0);

#[map]
static PROFILE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

#[unsafe(no_mangle)]
static PROFILE_OFFCPU_ENABLED: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static PROFILE_SAMPLE_PERIOD_NS: Global<u64> = Global::new(10_000_000);
#[unsafe(no_mangle)]
static SWITCH_NEXT_PID_OFF: Global<u32> = Global::new(56);

#[inline(always)]
fn stat(s: Stat) {
    if let Some(slot) = PROFILE_STATS.get_ptr_mut(s as u32) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { *slot += 1 };
    }
}

/// Adds `(1, weight_ns)` to `key`'s aggregate.
#[inline(always)]
fn add(key: &SampleKey, weight_ns: u64) {
    for _ in 0..2 {
        if let Some(v) = PROFILE_SAMPLES.get_ptr_mut(key) {
            // SAFETY: `v` points at a live map value. Every key names one
            // thread and one kind, and events about one thread never run on
            // two CPUs at once (it is either running here or being switched
            // in here), so plain adds do not race.
            unsafe {
                (*v).count += 1;
                (*v).weight_ns += weight_ns;
            }
            return;
        }
        let value = SampleValue {
            count: 1,
            weight_ns,
        };
        match PROFILE_SAMPLES.insert(key, value, BPF_NOEXIST as u64) {
            Ok(()) => return,
            Err(-17) => continue, // inserted concurrently: add to it
            Err(_) => break,
        }
    }
    count(&PROFILE_ERRORS, ErrorCode::MapFull);
    stat(Stat::Lost);
}

/// Captures the current thread's stack id; `None` when the sample is lost.
#[inline(always)]
fn capture(tgid: u32, tid: u32) -> Option<u64> {
    match pystack::capture_current(tgid, tid) {
        Ok((id, flags)) => {
            if flags & STACK_TRUNCATED != 0 {
                stat(Stat::Truncated);
            }
            Some(id)
        }
        Err(CaptureError::NoThreadState) => {
            stat(Stat::NoThreadState);
            Some(EMPTY_STACK_ID)
        }
        Err(e) => {
            count(&PROFILE_ERRORS, e.code());
            stat(Stat::Lost);
            None
        }
    }
}

#[perf_event]
pub fn profile_cpu(_ctx: PerfEventContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if tgid == 0 || pystack::proc_info(tgid).is_none() {
        return 0;
    }
    stat(Stat::OnCpuSamples);
    if let Some(stack_id) = capture(tgid, tid) {
        let key = SampleKey {
            stack_id,
            pid: tgid,
            tid,
            kind: KIND_ON_CPU,
            _pad: 0,
        };
        add(&key, PROFILE_SAMPLE_PERIOD_NS.load());
    }
    0
}

#[tracepoint(category = "sched", name = "sched_switch")]
pub fn profile_switch(ctx: TracePointContext) -> u32 {
    if PROFILE_OFFCPU_ENABLED.load() == 0 {
        return 0;
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // The outgoing task is the current one.
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if tid != 0 && pystack::proc_info(tgid).is_some() {
        let _ = PROFILE_PENDING.remove(tid);
        // A lost capture still opens the interval, charged to STACK_UNKNOWN.
        let stack_id = capture(tgid, tid).unwrap_or(STACK_UNKNOWN);
        let start = OffCpuStart {
            ktime_ns: now,
            stack_id,
            pid: tgid,
            _pad: 0,
        };
        if PROFILE_OFFCPU.insert(tid, start, 0).is_err() {
            count(&PROFILE_ERRORS, ErrorCode::MapFull);
            stat(Stat::Lost);
        }
    }
    // SAFETY: offset from this kernel's format file; the read is checked.
    let next = match unsafe { ctx.read_at::<i32>(SWITCH_NEXT_PID_OFF.load() as usize) } {
        Ok(next) => next as u32,
        Err(_) => {
            count(&PROFILE_ERRORS, ErrorCode::TracepointArg);
            return 0;
        }
    };
    if next == 0 {
        return 0;
    }
    // SAFETY: plain-data value, copied out before the remove below.
    let Some(start) = (unsafe { PROFILE_OFFCPU.get(next) }).copied() else {
        first_switch_in(next, now);
        return 0;
    };
    let _ = PROFILE_OFFCPU.remove(next);
    stat(Stat::OffCpuIntervals);
    let key = SampleKey {
        stack_id: start.stack_id,
        pid: start.pid,
        tid: next,
        kind: KIND_OFF_CPU,
        _pad: 0,
    };
    add(&key, now.saturating_sub(start.ktime_ns));
    0
}

/// A thread present when its process was registered, switched in for the
/// first time since: it was off CPU from registration until now.
#[inline(always)]
fn first_switch_in(tid: u32, now: u64) {
    // SAFETY: plain-data values.
    let Some(&tgid) = (unsafe { PROFILE_PENDING.get(tid) }) else {
        return;
    };
    let _ = PROFILE_PENDING.remove(tid);
    // SAFETY: plain-data value.
    let Some(&since) = (unsafe { PROFILE_SINCE.get(tgid) }) else {
        return;
    };
    stat(Stat::OffCpuIntervals);
    let key = SampleKey {
        stack_id: STACK_BEFORE_START,
        pid: tgid,
        tid,
        kind: KIND_OFF_CPU,
        _pad: 0,
    };
    add(&key, now.saturating_sub(since));
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn profile_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if pystack::proc_info(tgid).is_some() {
        pystack::forget_thread(tid);
        let _ = PROFILE_OFFCPU.remove(tid);
        let _ = PROFILE_PENDING.remove(tid);
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
