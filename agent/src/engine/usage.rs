//! CPU and memory use: of a check (thread CPU clock), of a target
//! (`/proc/PID/stat`), and of the agent itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

static SAMPLES: AtomicU64 = AtomicU64::new(0);
static LOST_EVENTS: AtomicU64 = AtomicU64::new(0);

/// Detectors and capturers that sample (stacks, profiles) report how many
/// samples they took; exported as `pymedic_samples_total`.
pub fn record_samples(n: u64) {
    SAMPLES.fetch_add(n, Ordering::Relaxed);
}

/// Kernel events a detector or capturer lost (ring buffer full); exported as
/// `pymedic_lost_events_total`.
pub fn record_lost_events(n: u64) {
    LOST_EVENTS.fetch_add(n, Ordering::Relaxed);
}

pub fn samples() -> u64 {
    SAMPLES.load(Ordering::Relaxed)
}

pub fn lost_events() -> u64 {
    LOST_EVENTS.load(Ordering::Relaxed)
}

/// CPU time the calling thread has used, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time the whole agent process has used, in nanoseconds.
pub fn process_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// User + system CPU of process `pid` in clock ticks (stat fields 14, 15).
pub fn process_cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(crate::procinfo::parse_stat(&text)?.cpu_ticks)
}

/// Caps glibc's malloc arenas at two. By default every thread that
/// allocates may get its own arena (up to 8 per core), each keeping freed
/// memory resident: for a daemon whose worker threads take turns, that
/// more than doubles RSS for no speed it needs. Call before starting
/// threads.
pub fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets a glibc tunable; called before the runtime
    // starts its threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Returns freed heap memory to the kernel. Loading eBPF objects parses the
/// kernel's BTF (tens of MB, freed right after); without this the freed
/// pages stay resident for the life of the agent.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks glibc's own arenas; it has no
    // preconditions and is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resident set size of the agent, bytes (`/proc/self/statm`).
pub fn self_rss_bytes() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    pages * page
}

/// How many cores a process used between two samples.
#[derive(Clone, Copy, Debug)]
pub struct CpuSample {
    ticks: u64,
    at: Instant,
}

impl CpuSample {
    pub fn take(pid: u32) -> Option<CpuSample> {
        Some(CpuSample {
            ticks: process_cpu_ticks(pid)?,
            at: Instant::now(),
        })
    }

    /// How long ago the sample was taken.
    pub fn age(&self) -> std::time::Duration {
        self.at.elapsed()
    }

    /// Cores used since `earlier` (1.0 = one core fully busy).
    pub fn cores_since(&self, earlier: &CpuSample) -> f64 {
        let wall = self.at.duration_since(earlier.at).as_secs_f64();
        if wall <= 0.0 {
            return 0.0;
        }
        let ticks = self.ticks.saturating_sub(earlier.ticks) as f64;
        ticks / crate::procinfo::clock_ticks_per_sec() as f64 / wall
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_advance_with_work() {
        let t0 = thread_cpu_ns();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_ns() > t0);
        assert!(process_cpu_ns() > 0);
        assert!(self_rss_bytes() > 0);
        assert!(process_cpu_ticks(std::process::id()).is_some());
    }
}
