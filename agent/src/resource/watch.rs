//! Hardware write watchpoints that disarm themselves.
//!
//! A growing container's length field is written by every insert. A
//! `PERF_TYPE_BREAKPOINT` event on that address, opened for each thread of
//! the target and carrying the `res_watch` program, captures the Python
//! stack of the writer: the line that inserts. Each hit is a debug trap
//! (tens of microseconds on a virtual machine), so every event is armed
//! with `PERF_EVENT_IOC_REFRESH`: the kernel disables it after the few
//! hits asked for. aya's perf API cannot refresh, so the events are opened
//! here with the raw system call.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Instant;

/// `struct perf_event_attr` up to `config3` (`PERF_ATTR_SIZE_VER8`).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    bp_addr: u64,
    bp_len: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved_2: u16,
    aux_sample_size: u32,
    reserved_3: u32,
    sig_data: u64,
    config3: u64,
}

const _: () = assert!(std::mem::size_of::<PerfEventAttr>() == 136);

const PERF_TYPE_BREAKPOINT: u32 = 5;
const HW_BREAKPOINT_W: u32 = 2;
const HW_BREAKPOINT_LEN_8: u64 = 8;
const FLAG_DISABLED: u64 = 1 << 0;
const FLAG_EXCLUDE_KERNEL: u64 = 1 << 5;
const FLAG_EXCLUDE_HV: u64 = 1 << 6;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
const PERF_EVENT_IOC_REFRESH: libc::c_ulong = 0x2402;
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;

/// Watchpoints on one address in every thread of one process.
pub struct Watchpoint {
    pub addr: u64,
    pub armed_at: Instant,
    /// Threads armed.
    pub threads: usize,
    fds: Vec<OwnedFd>,
}

impl Watchpoint {
    /// Arms a write watchpoint on the 8 bytes at `addr` in each of `tids`,
    /// running `prog` (a loaded perf_event program) on at most `hits` writes
    /// per thread. Threads whose debug registers are all taken are skipped;
    /// fails only when no thread could be armed.
    pub fn arm(prog: BorrowedFd<'_>, addr: u64, tids: &[u32], hits: u32) -> io::Result<Watchpoint> {
        let mut fds = Vec::new();
        let mut last_err = None;
        for &tid in tids {
            match open_one(prog, addr, tid, hits) {
                Ok(fd) => fds.push(fd),
                Err(e) => last_err = Some(e),
            }
        }
        if fds.is_empty() {
            return Err(last_err.unwrap_or_else(|| io::Error::other("the process has no threads")));
        }
        Ok(Watchpoint {
            addr,
            armed_at: Instant::now(),
            threads: fds.len(),
            fds,
        })
    }

    /// Disarms every thread's watchpoint (closing the events).
    pub fn disarm(self) {
        drop(self.fds);
    }
}

fn open_one(prog: BorrowedFd<'_>, addr: u64, tid: u32, hits: u32) -> io::Result<OwnedFd> {
    let attr = PerfEventAttr {
        type_: PERF_TYPE_BREAKPOINT,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        sample_period: 1,
        flags: FLAG_DISABLED | FLAG_EXCLUDE_KERNEL | FLAG_EXCLUDE_HV,
        wakeup_events: 1,
        bp_type: HW_BREAKPOINT_W,
        bp_addr: addr,
        bp_len: HW_BREAKPOINT_LEN_8,
        ..PerfEventAttr::default()
    };
    // SAFETY: perf_event_open reads `attr` (a valid, fully initialised
    // perf_event_attr of the size it declares) and returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &raw const attr,
            tid as libc::pid_t,
            -1 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: ioctls on the perf fd we own, with an integer argument.
    if unsafe { libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, prog.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above: enables the event for `hits` overflows.
    if unsafe { libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_REFRESH, hits as libc::c_int) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}
