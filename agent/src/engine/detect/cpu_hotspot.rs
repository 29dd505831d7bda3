//! `cpu_hotspot`: source lines that burn a large share of a busy process's
//! CPU, from always-on eBPF sampling at a low rate (the `pymedic record`
//! profiler, one session shared by every target).
//!
//! Each check (every two seconds) collects the samples taken since the last one;
//! every `window` the target's samples are judged: when the process used at
//! least `min_cores` on average, each Python line whose *self* samples are at
//! least `min_share` of the process's samples is a hot spot (at most
//! `max_findings`, hottest first), with its hottest stacks as evidence. A
//! hot spot stays reported while its share stays above half the threshold
//! (no flapping on sampling noise) and resolves when it cools down.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pymedic_model::{Finding, Kind, Layer, Location, Severity, Stack};
use serde_json::json;

use super::{CheckContext, DetectError, Detector, Settings, Watch};
use crate::engine::targets::TargetInfo;
use crate::engine::usage;
use crate::profile::{Profile, ProfileConfig, Profiler, SampleKind};

const NAME: &str = "cpu_hotspot";

#[derive(Clone, Copy, Debug)]
struct Params {
    rate_hz: u32,
    window: Duration,
    min_cores: f64,
    min_share: f64,
    max_findings: usize,
}

/// One thread's stack through a line, innermost frame first.
type StackKey = (u32, Vec<Location>);

#[derive(Default)]
struct Bucket {
    samples: u64,
    /// Self samples by innermost Python line.
    lines: HashMap<Location, u64>,
    /// Samples by whole stack (for evidence).
    stacks: HashMap<StackKey, u64>,
    threads: HashMap<u32, String>,
}

/// The profiler session shared by every watched target.
struct Shared {
    profiler: Option<Profiler>,
    last_poll: Option<Instant>,
    buckets: HashMap<u32, Bucket>,
}

pub struct CpuHotspot {
    params: Params,
    shared: Arc<Mutex<Shared>>,
}

/// `[detectors.cpu_hotspot]`: `interval` (2s), `rate_hz` (19), `window`
/// (10s), `min_cores` (0.25), `min_share` (0.2), `max_findings` (3).
pub fn new(s: &Settings) -> Result<Arc<dyn Detector>, DetectError> {
    s.only(&[
        "rate_hz",
        "window",
        "min_cores",
        "min_share",
        "max_findings",
    ])?;
    let params = Params {
        rate_hz: s.uint("rate_hz", 19)?.clamp(1, 1000) as u32,
        window: s.duration("window", Duration::from_secs(10))?,
        min_cores: s.float("min_cores", 0.25)?,
        min_share: s.float("min_share", 0.2)?,
        max_findings: s.uint("max_findings", 3)? as usize,
    };
    if !(0.0..=1.0).contains(&params.min_share) {
        return Err(DetectError::Setting {
            detector: NAME,
            key: "min_share".into(),
            message: format!("{} is not a share in [0, 1]", params.min_share),
        });
    }
    Ok(Arc::new(CpuHotspot {
        params,
        shared: Arc::new(Mutex::new(Shared {
            profiler: None,
            last_poll: None,
            buckets: HashMap::new(),
        })),
    }))
}

impl Detector for CpuHotspot {
    fn name(&self) -> &'static str {
        NAME
    }

    fn layer(&self) -> Layer {
        Layer::Behavioral
    }

    fn kinds(&self) -> Vec<Kind> {
        vec![Kind::CPU_HOTSPOT]
    }

    fn interval(&self) -> Duration {
        // Samples accumulate in the shared session between checks; the
        // profiler is polled (and new stacks symbolized) whenever any
        // target is checked, at most once a second.
        Duration::from_secs(2)
    }

    fn backs_off_when_busy(&self) -> bool {
        // Reads the profiler's kernel maps only: a busy target pays nothing.
        false
    }

    fn watch(&self, target: &TargetInfo) -> Result<Option<Box<dyn Watch>>, DetectError> {
        let mut sh = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if sh.profiler.is_none() {
            let config = ProfileConfig {
                rate_hz: self.params.rate_hz,
                // At a low rate, polled every second, few distinct stacks
                // accumulate: a small map keeps the agent small.
                max_stacks: 2048,
                ..ProfileConfig::default()
            };
            match Profiler::start(&[], config) {
                Ok(p) => {
                    sh.profiler = Some(p);
                    usage::release_free_memory();
                }
                Err(e) if e.is_permission() => {
                    tracing::warn!(
                        "cpu_hotspot needs eBPF (CAP_BPF, CAP_PERFMON): {e}; detector off"
                    );
                    return Ok(None);
                }
                Err(e) => return Err(err("start the eBPF profiler", e)),
            }
        }
        let profiler = sh.profiler.as_mut().expect("started above");
        profiler
            .add_target(&target.process)
            .map_err(|e| err("profile the process", e))?;
        sh.buckets.insert(target.id.pid, Bucket::default());
        Ok(Some(Box::new(HotspotWatch {
            pid: target.id.pid,
            params: self.params,
            shared: self.shared.clone(),
            window: Bucket::default(),
            window_start: Instant::now(),
            reported: Vec::new(),
        })))
    }
}

fn err(op: &'static str, e: impl std::fmt::Display) -> DetectError {
    DetectError::Check {
        detector: NAME,
        op,
        message: e.to_string(),
    }
}

impl Shared {
    /// Polls the profiler at most about once a second and files new
    /// samples into per-process buckets.
    fn collect(&mut self) -> Result<(), DetectError> {
        if self
            .last_poll
            .is_some_and(|t| t.elapsed() < Duration::from_millis(900))
        {
            return Ok(());
        }
        self.last_poll = Some(Instant::now());
        let Some(p) = self.profiler.as_mut() else {
            return Ok(());
        };
        let progress = p.poll().map_err(|e| err("read the profiler's maps", e))?;
        let profile = p.take().map_err(|e| err("read the profile", e))?;
        usage::record_lost_events(profile.lost);
        let _ = progress;
        self.file(&profile);
        Ok(())
    }

    fn file(&mut self, profile: &Profile) {
        for s in &profile.samples {
            if s.kind != SampleKind::OnCpu {
                continue;
            }
            let Some(b) = self.buckets.get_mut(&s.pid) else {
                continue;
            };
            usage::record_samples(s.count);
            b.samples += s.count;
            // frames are outermost first; the innermost Python frame is last.
            let stack: Vec<Location> = s
                .frames
                .iter()
                .rev()
                .filter(|f| !f.file.is_empty())
                .map(|f| Location::new(f.file.clone(), f.function.clone(), f.line))
                .collect();
            if let Some(leaf) = stack.first() {
                *b.lines.entry(leaf.clone()).or_default() += s.count;
                *b.stacks.entry((s.tid, stack)).or_default() += s.count;
            }
        }
        for p in &profile.processes {
            if let Some(b) = self.buckets.get_mut(&p.pid) {
                b.threads
                    .extend(p.threads.iter().map(|(k, v)| (*k, v.clone())));
            }
        }
    }
}

struct HotspotWatch {
    pid: u32,
    params: Params,
    shared: Arc<Mutex<Shared>>,
    window: Bucket,
    window_start: Instant,
    reported: Vec<Finding>,
}

impl Drop for HotspotWatch {
    fn drop(&mut self) {
        let mut sh = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        sh.buckets.remove(&self.pid);
        if let Some(p) = sh.profiler.as_mut() {
            p.remove_target(self.pid);
        }
    }
}

impl Watch for HotspotWatch {
    fn check(&mut self, cx: &CheckContext<'_>) -> Result<Vec<Finding>, DetectError> {
        {
            let mut sh = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            sh.collect()?;
            if let Some(b) = sh.buckets.get_mut(&self.pid) {
                let b = std::mem::take(b);
                self.window.samples += b.samples;
                for (k, v) in b.lines {
                    *self.window.lines.entry(k).or_default() += v;
                }
                for (k, v) in b.stacks {
                    *self.window.stacks.entry(k).or_default() += v;
                }
                self.window.threads.extend(b.threads);
            }
        }
        let elapsed = self.window_start.elapsed();
        if elapsed >= self.params.window {
            let window = std::mem::take(&mut self.window);
            self.reported = judge(&window, elapsed, &self.params, &self.reported, cx);
            self.window_start = Instant::now();
        }
        Ok(self.reported.clone())
    }
}

/// The hot spots of one window.
fn judge(
    w: &Bucket,
    elapsed: Duration,
    p: &Params,
    before: &[Finding],
    cx: &CheckContext<'_>,
) -> Vec<Finding> {
    let secs = elapsed.as_secs_f64().max(0.001);
    let cores = w.samples as f64 / f64::from(p.rate_hz) / secs;
    if w.samples == 0 || cores < p.min_cores {
        return Vec::new();
    }
    let mut lines: Vec<(&Location, u64)> = w.lines.iter().map(|(l, n)| (l, *n)).collect();
    lines.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let target = cx.target.model();
    let mut out = Vec::new();
    for (loc, n) in lines {
        if out.len() >= p.max_findings {
            break;
        }
        let share = n as f64 / w.samples as f64;
        let was = before.iter().any(|f| &f.location == loc);
        let threshold = if was { p.min_share / 2.0 } else { p.min_share };
        if share < threshold {
            continue;
        }
        let line_cores = cores * share;
        let severity = if line_cores >= 0.5 {
            Severity::Medium
        } else {
            Severity::Low
        };
        let confidence = (w.samples as f64 / 100.0).min(1.0) * 0.9;
        let mut f = Finding::new(
            Layer::Behavioral,
            Kind::CPU_HOTSPOT,
            severity,
            confidence,
            format!(
                "{} at {}:{} uses {:.2} cores ({:.0}% of the process's CPU)",
                loc.function,
                loc.file,
                loc.line,
                line_cores,
                share * 100.0
            ),
            Some(target.clone()),
            loc.clone(),
        );
        let mut stacks: Vec<(&StackKey, u64)> = w
            .stacks
            .iter()
            .filter(|((_, s), _)| s.first() == Some(loc))
            .map(|(k, n)| (k, *n))
            .collect();
        stacks.sort_by_key(|s| std::cmp::Reverse(s.1));
        for ((tid, frames), _) in stacks.iter().take(3) {
            f.stacks.push(Stack {
                thread: w
                    .threads
                    .get(tid)
                    .cloned()
                    .unwrap_or_else(|| format!("tid {tid}")),
                tid: *tid,
                frames: frames.clone(),
            });
        }
        f.evidence = json!({
            "line_samples": n,
            "process_samples": w.samples,
            "share": (share * 1000.0).round() / 1000.0,
            "process_cores": (cores * 100.0).round() / 100.0,
            "line_cores": (line_cores * 100.0).round() / 100.0,
            "window_seconds": (secs * 10.0).round() / 10.0,
            "rate_hz": p.rate_hz,
        });
        out.push(f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::targets::TargetId;

    fn cx_target() -> TargetInfo {
        TargetInfo {
            id: TargetId {
                pid: 7,
                start_ticks: 1,
            },
            process: pymedic_python::PythonProcess {
                pid: 7,
                exe: "/usr/bin/python3".into(),
                version: pymedic_python::Version::new(3, 12, Some(1)),
                build: pymedic_python::Build::Static,
                interpreter_file: String::new(),
                load_bias: 0,
                runtime_addr: 0,
            },
            cmdline: vec![],
            container: None,
            pod: None,
        }
    }

    fn bucket(samples: &[(&str, u32, u64)]) -> Bucket {
        let mut b = Bucket::default();
        for (func, line, n) in samples {
            let loc = Location::new("app.py", *func, *line);
            b.samples += n;
            *b.lines.entry(loc.clone()).or_default() += n;
            *b.stacks
                .entry((1, vec![loc, Location::new("app.py", "main", 1)]))
                .or_default() += n;
        }
        b
    }

    #[test]
    fn hot_lines_of_a_busy_process_with_hysteresis() {
        let p = Params {
            rate_hz: 10,
            window: Duration::from_secs(10),
            min_cores: 0.25,
            min_share: 0.2,
            max_findings: 3,
        };
        let t = cx_target();
        let cx = CheckContext {
            target: &t,
            now: pymedic_model::now(),
            since_last: Duration::ZERO,
        };
        // 100 samples in 10 s at 10 Hz: one core; line 5 has 70 %.
        let w = bucket(&[("hot", 5, 70), ("warm", 9, 15), ("cold", 12, 15)]);
        let got = judge(&w, Duration::from_secs(10), &p, &[], &cx);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].location.line, 5);
        assert_eq!(got[0].kind, Kind::CPU_HOTSPOT);
        assert_eq!(got[0].severity, Severity::Medium);
        assert_eq!(got[0].stacks[0].frames[0].line, 5);
        assert_eq!(got[0].evidence["line_samples"], 70);
        // Next window the line cools to 15 %: still reported (above 10 %).
        let w2 = bucket(&[("hot", 5, 15), ("other", 30, 85)]);
        let got2 = judge(&w2, Duration::from_secs(10), &p, &got, &cx);
        assert!(got2.iter().any(|f| f.location.line == 5));
        assert_eq!(
            got2.iter().find(|f| f.location.line == 5).unwrap().id,
            got[0].id
        );
        // An idle process has no hot spots, whatever the shares.
        let idle = bucket(&[("hot", 5, 10)]);
        assert!(judge(&idle, Duration::from_secs(10), &p, &[], &cx).is_empty());
    }
}
