//! A recorded profile: symbolized stacks with counts and weights, the same
//! whichever sampler (eBPF or py-spy) produced it.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

/// One symbolized frame.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frame {
    /// Function (qualified name where the interpreter keeps one), or a
    /// pseudo-frame in angle brackets (`<process 12 python3 app.py>`,
    /// `<thread MainThread 12>`, `<no Python frame>`, `<truncated>`).
    pub function: String,
    /// Source file as the interpreter names it; empty for pseudo-frames.
    pub file: String,
    /// 1-based line; 0 when unknown.
    pub line: u32,
}

impl Frame {
    /// A frame with no file (process, thread, markers).
    pub fn pseudo(name: impl Into<String>) -> Frame {
        Frame {
            function: name.into(),
            file: String::new(),
            line: 0,
        }
    }

    /// `function (file:line)`, the collapsed-stack form.
    pub fn label(&self) -> String {
        if self.file.is_empty() {
            self.function.clone()
        } else {
            format!("{} ({}:{})", self.function, self.file, self.line)
        }
    }
}

/// On CPU, or off CPU (sleeping, blocked, waiting to run).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SampleKind {
    OnCpu,
    OffCpu,
}

/// One distinct stack of one thread, with its totals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub pid: u32,
    pub tid: u32,
    pub kind: SampleKind,
    /// Outermost frame first (Python frames only; see [`Profile::stack`]).
    pub frames: Vec<Frame>,
    /// The stack was deeper than the walker records (outer frames missing).
    pub truncated: bool,
    /// Samples (on CPU) or off-CPU intervals.
    pub count: u64,
    /// Nanoseconds on CPU (`count` × period) or off CPU.
    pub weight_ns: u64,
}

/// A profiled process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub command: String,
    /// Thread names by tid, as last seen.
    pub threads: HashMap<u32, String>,
}

/// What a profile's values mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueKind {
    /// On-CPU samples only: the value is a sample count.
    CpuSamples,
    /// On-CPU and off-CPU: the value is wall-clock nanoseconds.
    WallNanos,
}

/// A recorded profile.
#[derive(Clone, Debug)]
pub struct Profile {
    pub samples: Vec<Sample>,
    pub processes: Vec<ProcessInfo>,
    pub start: SystemTime,
    pub duration: Duration,
    pub rate_hz: u32,
    pub value_kind: ValueKind,
    /// Samples lost (maps full, unreadable memory); never silently zero.
    pub lost: u64,
    /// Which sampler produced it (`ebpf`, `py-spy`).
    pub sampler: &'static str,
}

impl Profile {
    /// The value a sample contributes under [`Profile::value_kind`].
    pub fn value(&self, s: &Sample) -> u64 {
        match self.value_kind {
            ValueKind::CpuSamples => s.count,
            ValueKind::WallNanos => s.weight_ns,
        }
    }

    /// Unit of [`Profile::value`] for output formats.
    pub fn unit(&self) -> &'static str {
        match self.value_kind {
            ValueKind::CpuSamples => "samples",
            ValueKind::WallNanos => "nanoseconds",
        }
    }

    /// The full stack of a sample as output formats show it, outermost
    /// first: process, thread, then its Python frames (or a marker).
    pub fn stack(&self, s: &Sample) -> Vec<Frame> {
        let process = self.processes.iter().find(|p| p.pid == s.pid);
        // One line, bounded: command lines may hold newlines (`python -c`).
        let mut command: String = process
            .map(|p| p.command.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        if command.chars().count() > 120 {
            command = command.chars().take(117).collect::<String>() + "...";
        }
        let thread = process
            .and_then(|p| p.threads.get(&s.tid))
            .map(String::as_str)
            .unwrap_or("thread");
        let mut out = Vec::with_capacity(s.frames.len() + 4);
        out.push(Frame::pseudo(format!("<process {} {}>", s.pid, command)));
        out.push(Frame::pseudo(format!("<thread {} {}>", thread, s.tid)));
        if s.truncated {
            out.push(Frame::pseudo("<truncated>"));
        }
        if s.frames.is_empty() {
            out.push(Frame::pseudo("<no Python frame>"));
        }
        out.extend(s.frames.iter().cloned());
        out
    }

    /// Merges samples with the same thread, kind and frames.
    pub fn merge_duplicates(&mut self) {
        let mut index: HashMap<(u32, u32, SampleKind, bool, Vec<Frame>), usize> = HashMap::new();
        let mut merged: Vec<Sample> = Vec::with_capacity(self.samples.len());
        for s in self.samples.drain(..) {
            let key = (s.pid, s.tid, s.kind, s.truncated, s.frames.clone());
            match index.get(&key) {
                Some(&i) => {
                    merged[i].count += s.count;
                    merged[i].weight_ns += s.weight_ns;
                }
                None => {
                    index.insert(key, merged.len());
                    merged.push(s);
                }
            }
        }
        self.samples = merged;
    }

    /// Total value over all samples.
    pub fn total(&self) -> u64 {
        self.samples.iter().map(|s| self.value(s)).sum()
    }

    /// Sum of sample counts.
    pub fn sample_count(&self) -> u64 {
        self.samples.iter().map(|s| s.count).sum()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small two-thread profile for format tests.
    pub(crate) fn sample_profile() -> Profile {
        let f = |function: &str, line| Frame {
            function: function.into(),
            file: "app.py".into(),
            line,
        };
        let s = |tid, frames: Vec<Frame>, count| Sample {
            pid: 42,
            tid,
            kind: SampleKind::OnCpu,
            frames,
            truncated: false,
            count,
            weight_ns: count * 10_000_000,
        };
        Profile {
            samples: vec![
                s(42, vec![f("<module>", 10), f("main", 3), f("work", 5)], 6),
                s(42, vec![f("<module>", 10), f("main", 4)], 3),
                s(43, vec![], 1),
            ],
            processes: vec![ProcessInfo {
                pid: 42,
                command: "python3 app.py".into(),
                threads: HashMap::from([(42, "MainThread".into()), (43, "worker".into())]),
            }],
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            duration: Duration::from_secs(1),
            rate_hz: 100,
            value_kind: ValueKind::CpuSamples,
            lost: 0,
            sampler: "ebpf",
        }
    }

    #[test]
    fn merges_and_labels() {
        let mut p = sample_profile();
        let dup = p.samples[0].clone();
        p.samples.push(dup);
        p.merge_duplicates();
        assert_eq!(p.samples.len(), 3);
        assert_eq!(p.samples[0].count, 12);
        let stack = p.stack(&p.samples[2]);
        assert_eq!(stack[1].function, "<thread worker 43>");
        assert_eq!(stack.last().unwrap().function, "<no Python frame>");
        assert_eq!(p.samples[0].frames[2].label(), "work (app.py:5)");
    }
}
