//! The py-spy sampler (`--sampler py-spy`): for hosts where eBPF is not
//! permitted. One thread per target reads its stacks with py-spy (as a
//! library, non-blocking: the target never stops) at the rate; each read
//! costs about a millisecond of this process's CPU per few threads.
//!
//! On-CPU samples are the threads py-spy reports active; with off-CPU,
//! every thread's stack is weighted by the sampling period (wall clock).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use py_spy::config::LockingStrategy;
use pymedic_python::PythonProcess;

use super::model::{Frame, ProcessInfo, Profile, Sample, SampleKind, ValueKind};
use super::{ProfileConfig, ProfileError, Progress, Sampler};

type Key = (u32, u32, SampleKind, Vec<Frame>);

#[derive(Default)]
struct Shared {
    acc: Mutex<HashMap<Key, (u64, u64)>>,
    threads: Mutex<HashMap<u32, HashMap<u32, String>>>,
    samples: AtomicU64,
    lost: AtomicU64,
}

struct Worker {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    command: String,
}

/// The py-spy sampler.
pub struct PySpySampler {
    rate_hz: u32,
    off_cpu: bool,
    shared: Arc<Shared>,
    workers: HashMap<u32, Worker>,
    window_start: (SystemTime, Instant),
    lost_at_take: u64,
}

impl PySpySampler {
    pub fn start(config: &ProfileConfig) -> PySpySampler {
        PySpySampler {
            rate_hz: config.rate_hz,
            off_cpu: config.off_cpu,
            shared: Arc::default(),
            workers: HashMap::new(),
            window_start: (SystemTime::now(), Instant::now()),
            lost_at_take: 0,
        }
    }
}

fn convert(frames: &[py_spy::Frame]) -> Vec<Frame> {
    frames
        .iter()
        .rev()
        .map(|f| Frame {
            function: f.name.clone(),
            file: f.filename.clone(),
            line: f.line.max(0) as u32,
        })
        .collect()
}

fn run(
    pid: u32,
    mut spy: py_spy::PythonSpy,
    period: Duration,
    off_cpu: bool,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
) {
    let weight = period.as_nanos() as u64;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        match spy.get_stack_traces() {
            Ok(traces) => {
                let mut acc = shared.acc.lock().unwrap_or_else(|e| e.into_inner());
                let mut names = shared.threads.lock().unwrap_or_else(|e| e.into_inner());
                for t in traces {
                    let tid = t.os_thread_id.unwrap_or(t.thread_id) as u32;
                    if let Some(name) = &t.thread_name {
                        names.entry(pid).or_default().insert(tid, name.clone());
                    }
                    let kind = if t.active {
                        SampleKind::OnCpu
                    } else if off_cpu {
                        SampleKind::OffCpu
                    } else {
                        continue;
                    };
                    let e = acc.entry((pid, tid, kind, convert(&t.frames))).or_default();
                    e.0 += 1;
                    e.1 += weight;
                    shared.samples.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                shared.lost.fetch_add(1, Ordering::Relaxed);
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    return;
                }
                tracing::debug!(pid, "py-spy sample failed: {e}");
            }
        }
        next += period;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

impl Sampler for PySpySampler {
    fn add_target(&mut self, p: &PythonProcess) -> Result<(), ProfileError> {
        let pid = p.pid;
        let period = Duration::from_nanos(1_000_000_000 / u64::from(self.rate_hz));
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, shared, off_cpu) = (stop.clone(), self.shared.clone(), self.off_cpu);
        let rate = self.rate_hz;
        let handle = std::thread::Builder::new()
            .name(format!("py-spy {pid}"))
            .spawn(move || {
                let config = py_spy::Config {
                    blocking: LockingStrategy::NonBlocking,
                    sampling_rate: u64::from(rate),
                    include_idle: off_cpu,
                    collect_thread_names: true,
                    ..Default::default()
                };
                match py_spy::PythonSpy::new(pid as py_spy::Pid, &config) {
                    Ok(spy) => {
                        let _ = tx.send(Ok(()));
                        run(pid, spy, period, off_cpu, stop2, shared);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            })
            .map_err(|e| ProfileError::PySpy {
                pid,
                message: format!("starting its sampling thread: {e}"),
            })?;
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(message)) => return Err(ProfileError::PySpy { pid, message }),
            Err(_) => {
                return Err(ProfileError::PySpy {
                    pid,
                    message: "its sampling thread ended".into(),
                });
            }
        }
        let command = crate::procinfo::read(pid)
            .map(|i| i.cmdline.join(" "))
            .unwrap_or_default();
        self.workers.insert(
            pid,
            Worker {
                stop,
                handle: Some(handle),
                command,
            },
        );
        Ok(())
    }

    fn remove_target(&mut self, pid: u32) {
        if let Some(w) = self.workers.get_mut(&pid) {
            w.stop.store(true, Ordering::Relaxed);
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }

    fn poll(&mut self) -> Result<Progress, ProfileError> {
        Ok(Progress {
            samples: self.shared.samples.load(Ordering::Relaxed),
            lost: self.shared.lost.load(Ordering::Relaxed),
            processes: self.workers.len(),
        })
    }

    fn take(&mut self) -> Result<Profile, ProfileError> {
        let acc = std::mem::take(&mut *self.shared.acc.lock().unwrap_or_else(|e| e.into_inner()));
        let names = self
            .shared
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let samples = acc
            .into_iter()
            .map(|((pid, tid, kind, frames), (count, weight_ns))| Sample {
                pid,
                tid,
                kind,
                frames,
                truncated: false,
                count,
                weight_ns,
            })
            .collect();
        let processes = self
            .workers
            .iter()
            .map(|(&pid, w)| ProcessInfo {
                pid,
                command: w.command.clone(),
                threads: names.get(&pid).cloned().unwrap_or_default(),
            })
            .collect();
        let lost = self.shared.lost.load(Ordering::Relaxed);
        let (start, started) = self.window_start;
        let profile = Profile {
            samples,
            processes,
            start,
            duration: started.elapsed(),
            rate_hz: self.rate_hz,
            value_kind: if self.off_cpu {
                ValueKind::WallNanos
            } else {
                ValueKind::CpuSamples
            },
            lost: lost - self.lost_at_take,
            sampler: "py-spy",
        };
        self.lost_at_take = lost;
        self.window_start = (SystemTime::now(), Instant::now());
        Ok(profile)
    }
}

impl Drop for PySpySampler {
    fn drop(&mut self) {
        let pids: Vec<u32> = self.workers.keys().copied().collect();
        for pid in pids {
            self.remove_target(pid);
        }
    }
}
