//! Facts about a process from `/proc`: threads, memory, start time, uptime,
//! command line, cgroup placement.

use std::io;

use crate::cgroup::{self, CgroupInfo};

/// A snapshot of `/proc/PID/{stat,status,cmdline,cgroup}`.
#[derive(Clone, Debug, Default)]
pub struct ProcInfo {
    pub pid: u32,
    pub ppid: u32,
    /// Kernel's `comm` (15 bytes max).
    pub comm: String,
    pub cmdline: Vec<String>,
    pub threads: u32,
    pub rss_bytes: u64,
    /// Start time in clock ticks after boot (stat field 22): with `pid`, a
    /// process identity that survives PID reuse.
    pub start_ticks: u64,
    pub uptime_secs: f64,
    pub cgroup: CgroupInfo,
}

/// `sysconf(_SC_CLK_TCK)`.
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

/// Fields of `/proc/PID/stat` after the `(comm)` field, which may contain
/// spaces and parentheses.
pub struct Stat {
    pub comm: String,
    pub state: char,
    pub ppid: u32,
    pub threads: u32,
    pub start_ticks: u64,
    pub rss_pages: u64,
    /// User + system CPU time in clock ticks (fields 14 and 15).
    pub cpu_ticks: u64,
    /// The CPU it last ran on (field 39).
    pub last_cpu: Option<usize>,
}

/// Parses `/proc/PID/stat` text.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // rest[0] is field 3 (state); field N is rest[N - 3].
    let field = |n: usize| rest.get(n - 3).copied();
    Some(Stat {
        comm,
        state: field(3)?.chars().next()?,
        ppid: field(4)?.parse().ok()?,
        threads: field(20)?.parse().ok()?,
        start_ticks: field(22)?.parse().ok()?,
        rss_pages: field(24)?.parse().ok()?,
        cpu_ticks: field(14)?.parse::<u64>().ok()? + field(15)?.parse::<u64>().ok()?,
        last_cpu: field(39).and_then(|f| f.parse().ok()),
    })
}

/// Reads a process's facts.
pub fn read(pid: u32) -> io::Result<ProcInfo> {
    let stat_text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let stat = parse_stat(&stat_text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unparsable /proc/PID/stat"))?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map(|t| cgroup::parse(&t))
        .unwrap_or_default();
    let boot_uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    let started = stat.start_ticks as f64 / clock_ticks_per_sec() as f64;
    Ok(ProcInfo {
        pid,
        ppid: stat.ppid,
        comm: stat.comm,
        cmdline,
        threads: stat.threads,
        rss_bytes: stat.rss_pages * page_size(),
        start_ticks: stat.start_ticks,
        uptime_secs: (boot_uptime - started).max(0.0),
        cgroup,
    })
}

/// Every numeric entry of `/proc` (process ids), ascending.
pub fn all_pids() -> io::Result<Vec<u32>> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    Ok(pids)
}

/// Thread ids of a process (`/proc/PID/task`), ascending.
pub fn thread_ids(pid: u32) -> io::Result<Vec<u32>> {
    let mut tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    Ok(tids)
}

/// "3d4h", "12m5s", "40s": a compact duration for tables.
pub fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    let (d, h, m, s) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// "512.0 MiB": a compact size for tables.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_hostile_comm() {
        let text = "4242 (my (evil) proc) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 7 0 123456 1000000 2048 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let st = parse_stat(text).unwrap();
        assert_eq!(st.comm, "my (evil) proc");
        assert_eq!(st.state, 'S');
        assert_eq!(st.ppid, 1);
        assert_eq!(st.threads, 7);
        assert_eq!(st.start_ticks, 123456);
        assert_eq!(st.rss_pages, 2048);
        assert_eq!(st.cpu_ticks, 5 + 3);
        assert_eq!(st.last_cpu, Some(1));
    }

    #[test]
    fn reads_self() {
        let me = read(std::process::id()).unwrap();
        assert!(me.threads >= 1);
        assert!(me.rss_bytes > 0);
        assert!(me.start_ticks > 0);
        assert!(
            thread_ids(std::process::id())
                .unwrap()
                .contains(&std::process::id())
        );
    }

    #[test]
    fn human_units() {
        assert_eq!(human_duration(42.0), "42s");
        assert_eq!(human_duration(3725.0), "1h2m");
        assert_eq!(human_duration(90000.0), "1d1h");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}
