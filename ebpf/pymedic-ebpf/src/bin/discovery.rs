//! Process discovery without polling `/proc`.
//!
//! * `sched:sched_process_exec`: every exec, so userspace can classify the new
//!   image (is it CPython?).
//! * `task:task_newtask`: a process userspace already tracks forks a new
//!   process (gunicorn/multiprocessing workers never exec).
//! * `sched:sched_process_exit`: a tracked thread group's leader exits.
#![no_std]
#![no_main]

use aya_ebpf::{
    Global,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use pymedic_common::{
    discovery::{CLONE_THREAD, PROC_EVENTS_BYTES, ProcEvent, ProcEventKind, TRACKED_MAX},
    errors::ErrorCode,
};
use pymedic_ebpf::errors::count;

#[map]
static PROC_EVENTS: RingBuf = RingBuf::with_byte_size(PROC_EVENTS_BYTES, 0);

#[map]
static TRACKED_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(TRACKED_MAX, 0);

#[map]
static DISCOVERY_ERRORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ErrorCode::COUNT, 0);

/// Offset of `pid` in the `task_newtask` record; set by userspace from the
/// tracepoint's `format` file.
#[unsafe(no_mangle)]
static NEWTASK_PID_OFF: Global<u32> = Global::new(8);
/// Offset of `clone_flags` in the `task_newtask` record.
#[unsafe(no_mangle)]
static NEWTASK_CLONE_FLAGS_OFF: Global<u32> = Global::new(32);

fn emit(kind: ProcEventKind, pid: u32, ppid: u32) {
    let Some(mut entry) = PROC_EVENTS.reserve::<ProcEvent>(0) else {
        count(&DISCOVERY_ERRORS, ErrorCode::RingBufFull);
        return;
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let ktime_ns = unsafe { bpf_ktime_get_ns() };
    entry.write(ProcEvent {
        ktime_ns,
        kind: kind as u32,
        pid,
        ppid,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    });
    entry.submit(0);
}

fn is_tracked(tgid: u32) -> bool {
    // SAFETY: the value is a plain u8 we only test for presence.
    unsafe { TRACKED_PIDS.get(tgid) }.is_some()
}

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    emit(ProcEventKind::Exec, tgid, 0);
    0
}

#[tracepoint(category = "task", name = "task_newtask")]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !is_tracked(parent) {
        return 0;
    }
    // SAFETY: the offsets come from this kernel's format file for this
    // tracepoint and the reads are bounds-checked by the helper.
    let flags = unsafe { ctx.read_at::<u64>(NEWTASK_CLONE_FLAGS_OFF.load() as usize) };
    // SAFETY: as above.
    let child = unsafe { ctx.read_at::<i32>(NEWTASK_PID_OFF.load() as usize) };
    match (flags, child) {
        (Ok(flags), Ok(child)) if flags & CLONE_THREAD == 0 => {
            emit(ProcEventKind::Fork, child as u32, parent);
        }
        (Ok(_), Ok(_)) => {}
        _ => count(&DISCOVERY_ERRORS, ErrorCode::TracepointArg),
    }
    0
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if tgid == tid && is_tracked(tgid) {
        emit(ProcEventKind::Exit, tgid, 0);
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
