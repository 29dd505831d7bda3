//! `cpu` and `off-cpu` captures: an eBPF profile of one target for the
//! requested duration (the `pymedic record` profiler), written as pprof
//! (default), speedscope, an SVG flame graph or collapsed stacks.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::{CaptureError, CaptureRequest, Capturer, Format};
use crate::engine::targets::TargetInfo;
use crate::engine::usage;
use crate::profile::output::Format as OutFormat;
use crate::profile::{POLL_INTERVAL, ProfileConfig, Profiler};

pub struct ProfileCapture {
    off_cpu: bool,
}

pub fn cpu() -> Arc<dyn Capturer> {
    Arc::new(ProfileCapture { off_cpu: false })
}

pub fn off_cpu() -> Arc<dyn Capturer> {
    Arc::new(ProfileCapture { off_cpu: true })
}

static FORMATS: [Format; 4] = [
    Format {
        name: "pprof",
        media_type: "application/vnd.google.protobuf+gzip",
        extension: "pb.gz",
    },
    Format {
        name: "speedscope",
        media_type: "application/json",
        extension: "speedscope.json",
    },
    Format {
        name: "flamegraph",
        media_type: "image/svg+xml",
        extension: "svg",
    },
    Format {
        name: "collapsed",
        media_type: "text/plain; charset=utf-8",
        extension: "txt",
    },
];

fn out_format(name: &str) -> OutFormat {
    match name {
        "speedscope" => OutFormat::Speedscope,
        "flamegraph" => OutFormat::Flamegraph,
        "collapsed" => OutFormat::Collapsed,
        _ => OutFormat::Pprof,
    }
}

impl Capturer for ProfileCapture {
    fn kind(&self) -> &'static str {
        if self.off_cpu { "off-cpu" } else { "cpu" }
    }

    fn description(&self) -> &'static str {
        if self.off_cpu {
            "where threads spend wall-clock time, on and off CPU (eBPF), for a duration"
        } else {
            "where CPU time goes, by Python stack (eBPF sampling), for a duration"
        }
    }

    fn formats(&self) -> &'static [Format] {
        &FORMATS
    }

    fn timed(&self) -> bool {
        true
    }

    fn capture(
        &self,
        target: &TargetInfo,
        req: &CaptureRequest,
        out: &mut dyn Write,
        cancel: &AtomicBool,
    ) -> Result<(), CaptureError> {
        let pid = target.id.pid;
        let kind = self.kind();
        let failed = |message: String| CaptureError::Failed { kind, pid, message };
        let config = ProfileConfig {
            rate_hz: if req.rate_hz == 0 { 100 } else { req.rate_hz },
            off_cpu: self.off_cpu,
            ..ProfileConfig::default()
        };
        let mut profiler = Profiler::start(std::slice::from_ref(&target.process), config)
            .map_err(|e| failed(e.to_string()))?;
        let end = Instant::now() + req.duration;
        let mut last = Default::default();
        while Instant::now() < end && !cancel.load(Ordering::Relaxed) {
            std::thread::sleep(POLL_INTERVAL.min(end.saturating_duration_since(Instant::now())));
            last = profiler.poll().map_err(|e| failed(e.to_string()))?;
            if !crate::engine::targets::alive(target.id) {
                break;
            }
        }
        let profile = profiler.stop().map_err(|e| failed(e.to_string()))?;
        usage::record_samples(last.samples);
        usage::record_lost_events(last.lost);
        out_format(req.format.name)
            .writer()
            .write(&profile, out)
            .map_err(|e| failed(e.to_string()))
    }
}
