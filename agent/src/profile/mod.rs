//! CPU and off-CPU profiling of Python processes.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use pymedic::profile::{ProfileConfig, Profiler};
//! let target = pymedic_python::inspect(1234)?;
//! let mut profiler = Profiler::start(&[target], ProfileConfig::default())?;
//! std::thread::sleep(std::time::Duration::from_secs(10));
//! let progress = profiler.poll()?; // samples so far, lost samples
//! let profile = profiler.stop()?;  // symbolized stacks with counts
//! # Ok(()) }
//! ```
//!
//! Two samplers produce the same [`Profile`]:
//! * [`SamplerKind::Ebpf`] (default): per-CPU perf events at the rate and
//!   `sched_switch` for off-CPU time; stacks are walked in the kernel by the
//!   shared CPython walker and aggregated there, so the target never stops
//!   and userspace reads maps about once a second ([`ebpf`]).
//! * [`SamplerKind::PySpy`]: py-spy as a library, non-blocking, for hosts
//!   where eBPF is not permitted ([`pyspy`]).

pub mod ebpf;
pub mod model;
pub mod output;
pub mod pyspy;

use std::time::Duration;

use pymedic_python::PythonProcess;

pub use model::{Frame, Profile, Sample, SampleKind, ValueKind};

/// Which sampler records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SamplerKind {
    /// eBPF: kernel-side stack walking (needs CAP_BPF + CAP_PERFMON).
    #[default]
    Ebpf,
    /// py-spy: reads the target's memory from userspace once per sample.
    #[value(name = "py-spy")]
    PySpy,
}

/// How to profile.
#[derive(Clone, Debug)]
pub struct ProfileConfig {
    /// Samples per second per CPU (eBPF) or per process (py-spy).
    pub rate_hz: u32,
    /// Also record time off CPU (sleep, I/O, locks): values become
    /// wall-clock nanoseconds.
    pub off_cpu: bool,
    pub sampler: SamplerKind,
    /// Capacity of the kernel's stack map (distinct stacks between polls).
    pub max_stacks: u32,
}

impl Default for ProfileConfig {
    fn default() -> Self {
        ProfileConfig {
            rate_hz: 100,
            off_cpu: false,
            sampler: SamplerKind::Ebpf,
            max_stacks: pymedic_common::pystack::PY_STACKS_DEFAULT_MAX,
        }
    }
}

/// Counters for progress display.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Samples (on CPU) and intervals (off CPU) recorded so far.
    pub samples: u64,
    /// Samples lost so far (maps full, unreadable memory, py-spy errors).
    pub lost: u64,
    /// Processes being profiled.
    pub processes: usize,
}

/// Errors of the profiler.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(transparent)]
    Bpf(#[from] crate::bpf::BpfError),
    #[error(transparent)]
    PyStack(#[from] crate::pystack::PyStackError),
    #[error("attaching the CPU sampling perf event on CPU {cpu}: {source}")]
    PerfEvent {
        cpu: u32,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("listing online CPUs ({0}): {1}")]
    Cpus(&'static str, std::io::Error),
    #[error("py-spy cannot attach to process {pid}: {message}")]
    PySpy { pid: u32, message: String },
    #[error("the rate must be between 1 and 10000 Hz, not {0}")]
    BadRate(u32),
}

impl ProfileError {
    /// True when the kernel refused for lack of privilege (offer py-spy).
    pub fn is_permission(&self) -> bool {
        match self {
            ProfileError::Bpf(e) => e.is_permission(),
            ProfileError::PyStack(crate::pystack::PyStackError::Bpf(e)) => e.is_permission(),
            ProfileError::PerfEvent { source, .. } => crate::bpf::is_permission_error(source),
            _ => false,
        }
    }
}

/// A running sampler ([`ebpf::EbpfSampler`], [`pyspy::PySpySampler`]);
/// [`Profiler`] wraps one. Public so tools can drive a sampler directly.
pub trait Sampler: Send {
    /// Starts sampling process `p`.
    fn add_target(&mut self, p: &PythonProcess) -> Result<(), ProfileError>;
    /// Stops sampling process `pid`.
    fn remove_target(&mut self, pid: u32);
    /// Collects and returns progress counters.
    fn poll(&mut self) -> Result<Progress, ProfileError>;
    /// The profile since the last `take` (or start), and resets it.
    fn take(&mut self) -> Result<Profile, ProfileError>;
}

/// A profiling session over some Python processes.
pub struct Profiler {
    sampler: Box<dyn Sampler>,
}

impl Profiler {
    /// Starts sampling `targets` (more can be added with
    /// [`Profiler::add_target`]).
    pub fn start(
        targets: &[PythonProcess],
        config: ProfileConfig,
    ) -> Result<Profiler, ProfileError> {
        if !(1..=10_000).contains(&config.rate_hz) {
            return Err(ProfileError::BadRate(config.rate_hz));
        }
        let mut sampler: Box<dyn Sampler> = match config.sampler {
            SamplerKind::Ebpf => Box::new(ebpf::EbpfSampler::start(&config)?),
            SamplerKind::PySpy => Box::new(pyspy::PySpySampler::start(&config)),
        };
        for t in targets {
            sampler.add_target(t)?;
        }
        Ok(Profiler { sampler })
    }

    /// Adds a process (e.g. a new one found by discovery).
    pub fn add_target(&mut self, p: &PythonProcess) -> Result<(), ProfileError> {
        self.sampler.add_target(p)
    }

    /// Stops sampling a process (it exited or exec'd); what was recorded of
    /// it stays in the profile.
    pub fn remove_target(&mut self, pid: u32) {
        self.sampler.remove_target(pid)
    }

    /// Collects what the sampler has (symbolizing new stacks while their
    /// code objects are alive); call about once a second.
    pub fn poll(&mut self) -> Result<Progress, ProfileError> {
        self.sampler.poll()
    }

    /// The profile recorded since the last `take` (continuous profiling).
    pub fn take(&mut self) -> Result<Profile, ProfileError> {
        self.sampler.take()
    }

    /// Stops and returns everything recorded since the last `take`.
    pub fn stop(mut self) -> Result<Profile, ProfileError> {
        self.sampler.take()
    }
}

/// Interval between polls a caller should keep.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
