//! What the kernel says about each thread, without stopping it:
//! `/proc/PID/task/TID/{stat,comm,syscall,wchan}` and the targets of
//! `/proc/PID/fd/N`.

use std::collections::HashMap;
use std::fs;

/// One thread's kernel-side state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Task {
    pub tid: u32,
    pub comm: String,
    /// `R`, `S`, `D`, `T`, `Z`, ...
    pub state: char,
    /// The blocking system call, when the thread sleeps in one.
    pub syscall: Option<Syscall>,
    /// Kernel function it sleeps in (`futex_wait_queue`, `do_sys_poll`).
    pub wchan: String,
}

/// A thread's current system call from `/proc/.../syscall`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Syscall {
    pub nr: i64,
    pub args: [u64; 6],
}

/// x86_64 system call numbers pymedic recognises.
pub mod nr {
    pub const READ: i64 = 0;
    pub const WRITE: i64 = 1;
    pub const POLL: i64 = 7;
    pub const SELECT: i64 = 23;
    pub const PAUSE: i64 = 34;
    pub const NANOSLEEP: i64 = 35;
    pub const CONNECT: i64 = 42;
    pub const ACCEPT: i64 = 43;
    pub const SENDTO: i64 = 44;
    pub const RECVFROM: i64 = 45;
    pub const SENDMSG: i64 = 46;
    pub const RECVMSG: i64 = 47;
    pub const WAIT4: i64 = 61;
    pub const FUTEX: i64 = 202;
    pub const EPOLL_WAIT: i64 = 232;
    pub const CLOCK_NANOSLEEP: i64 = 230;
    pub const WAITID: i64 = 247;
    pub const PSELECT6: i64 = 270;
    pub const PPOLL: i64 = 271;
    pub const EPOLL_PWAIT: i64 = 281;
    pub const ACCEPT4: i64 = 288;
    pub const RECVMMSG: i64 = 299;
    pub const EPOLL_PWAIT2: i64 = 441;
    pub const FUTEX_WAITV: i64 = 449;
}

impl Syscall {
    /// A name for display.
    pub fn name(&self) -> String {
        let n = match self.nr {
            nr::READ => "read",
            nr::WRITE => "write",
            nr::POLL => "poll",
            nr::SELECT => "select",
            nr::PAUSE => "pause",
            nr::NANOSLEEP => "nanosleep",
            nr::CONNECT => "connect",
            nr::ACCEPT => "accept",
            nr::SENDTO => "sendto",
            nr::RECVFROM => "recvfrom",
            nr::SENDMSG => "sendmsg",
            nr::RECVMSG => "recvmsg",
            nr::WAIT4 => "wait4",
            nr::FUTEX => "futex",
            nr::EPOLL_WAIT => "epoll_wait",
            nr::CLOCK_NANOSLEEP => "clock_nanosleep",
            nr::WAITID => "waitid",
            nr::PSELECT6 => "pselect6",
            nr::PPOLL => "ppoll",
            nr::EPOLL_PWAIT => "epoll_pwait",
            nr::ACCEPT4 => "accept4",
            nr::RECVMMSG => "recvmmsg",
            nr::EPOLL_PWAIT2 => "epoll_pwait2",
            nr::FUTEX_WAITV => "futex_waitv",
            other => return format!("syscall {other}"),
        };
        n.to_owned()
    }

    /// `futex(2)`: the waited-on address, and whether a timeout was given.
    pub fn futex_wait(&self) -> Option<(u64, bool)> {
        const FUTEX_CMD_MASK: u64 = !(128 | 256); // PRIVATE, CLOCK_REALTIME
        const FUTEX_WAIT: u64 = 0;
        const FUTEX_WAIT_BITSET: u64 = 9;
        if self.nr != nr::FUTEX {
            return None;
        }
        let cmd = self.args[1] & FUTEX_CMD_MASK;
        (cmd == FUTEX_WAIT || cmd == FUTEX_WAIT_BITSET).then_some((self.args[0], self.args[3] != 0))
    }
}

/// Parses `/proc/.../syscall`: `NR a0 a1 a2 a3 a4 a5 sp pc`, `running`, or
/// `-1 sp pc` (blocked outside a system call).
pub fn parse_syscall(text: &str) -> Option<Syscall> {
    let mut it = text.split_whitespace();
    let nr: i64 = it.next()?.parse().ok()?;
    if nr < 0 {
        return None;
    }
    let mut args = [0u64; 6];
    for a in &mut args {
        let s = it.next()?;
        *a = u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()?;
    }
    Some(Syscall { nr, args })
}

/// Reads every task of `pid` (threads that exit meanwhile are skipped).
pub fn read_tasks(pid: u32) -> std::io::Result<Vec<Task>> {
    let mut out = Vec::new();
    for e in fs::read_dir(format!("/proc/{pid}/task"))? {
        let Some(tid) = e?.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Some(t) = read_task(pid, tid) {
            out.push(t);
        }
    }
    out.sort_by_key(|t| t.tid);
    Ok(out)
}

/// One task; `None` if it exited.
pub fn read_task(pid: u32, tid: u32) -> Option<Task> {
    let dir = format!("/proc/{pid}/task/{tid}");
    let stat = fs::read_to_string(format!("{dir}/stat")).ok()?;
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next())
        .unwrap_or('?');
    let comm = fs::read_to_string(format!("{dir}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default();
    let syscall = if state == 'R' {
        None
    } else {
        fs::read_to_string(format!("{dir}/syscall"))
            .ok()
            .and_then(|s| parse_syscall(&s))
    };
    let wchan = fs::read_to_string(format!("{dir}/wchan")).unwrap_or_default();
    Some(Task {
        tid,
        comm,
        state,
        syscall,
        wchan: if wchan == "0" { String::new() } else { wchan },
    })
}

/// `fd N (socket:[123])`-style description of a descriptor of `pid`.
pub fn describe_fd(pid: u32, fd: u64) -> String {
    match fs::read_link(format!("/proc/{pid}/fd/{fd}")) {
        Ok(target) => format!("fd {fd} ({})", target.display()),
        Err(_) => format!("fd {fd}"),
    }
}

/// Tasks by tid.
pub fn by_tid(tasks: &[Task]) -> HashMap<u32, &Task> {
    tasks.iter().map(|t| (t.tid, t)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_syscall_lines() {
        let s = parse_syscall(
            "202 0x55d0c7a0 0x189 0x0 0x0 0x0 0xffffffff 0x7ffd3c5e8f40 0x7f1c2b8a1e2e\n",
        )
        .unwrap();
        assert_eq!(s.nr, nr::FUTEX);
        assert_eq!(s.futex_wait(), Some((0x55d0c7a0, false)));
        assert_eq!(s.name(), "futex");
        let timed = parse_syscall("202 0x10 0x89 0x0 0x7ffc0000 0x0 0xffffffff 0x1 0x2").unwrap();
        assert_eq!(timed.futex_wait(), Some((0x10, true)));
        let wake = parse_syscall("202 0x10 0x81 0x1 0x0 0x0 0x0 0x1 0x2").unwrap();
        assert_eq!(wake.futex_wait(), None);
        assert!(parse_syscall("running").is_none());
        assert!(parse_syscall("-1 0x7ffd 0x7f1c").is_none());
    }

    #[test]
    fn reads_own_tasks() {
        let tasks = read_tasks(std::process::id()).unwrap();
        assert!(tasks.iter().any(|t| t.tid == std::process::id()));
    }
}
