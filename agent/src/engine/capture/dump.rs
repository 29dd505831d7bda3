//! `dump` capture: every thread's stack with the deadlock verdicts, as
//! `pymedic dump` prints it (JSON or text). Never stops the target.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use super::{CaptureError, CaptureRequest, Capturer, Format};
use crate::cli::dump::{DumpJson, render, snapshot_with_verdicts};
use crate::deadlock;
use crate::dump::{DumpOptions, Dumper};
use crate::engine::targets::TargetInfo;

pub struct DumpCapture;

pub fn new() -> Arc<dyn Capturer> {
    Arc::new(DumpCapture)
}

static FORMATS: [Format; 2] = [
    Format {
        name: "json",
        media_type: "application/json",
        extension: "json",
    },
    Format {
        name: "text",
        media_type: "text/plain; charset=utf-8",
        extension: "txt",
    },
];

impl Capturer for DumpCapture {
    fn kind(&self) -> &'static str {
        "dump"
    }

    fn description(&self) -> &'static str {
        "every thread's Python stack now, with locks, waits and deadlock verdicts"
    }

    fn formats(&self) -> &'static [Format] {
        &FORMATS
    }

    fn timed(&self) -> bool {
        false
    }

    fn capture(
        &self,
        target: &TargetInfo,
        req: &CaptureRequest,
        out: &mut dyn Write,
        _cancel: &AtomicBool,
    ) -> Result<(), CaptureError> {
        let pid = target.id.pid;
        let failed = |message: String| CaptureError::Failed {
            kind: "dump",
            pid,
            message,
        };
        let mut dumper = Dumper::new(pid).map_err(|e| failed(e.to_string()))?;
        let opts = DumpOptions {
            locals: true,
            ..DumpOptions::default()
        };
        let (snap, analysis) =
            snapshot_with_verdicts(&mut dumper, &opts).map_err(|e| failed(e.to_string()))?;
        crate::engine::usage::record_samples(1);
        let write_err = |e: std::io::Error| failed(format!("write the artifact: {e}"));
        if req.format.name == "text" {
            out.write_all(render(&snap, &analysis).as_bytes())
                .map_err(write_err)?;
        } else {
            let findings = analysis
                .deadlocks
                .iter()
                .map(|d| deadlock::to_finding(d, &snap.target))
                .collect();
            serde_json::to_writer_pretty(
                &mut *out,
                &DumpJson {
                    target: &snap.target,
                    build: &snap.build,
                    paused: snap.paused,
                    threads: &snap.threads,
                    deadlocks: &analysis.deadlocks,
                    chains: &analysis.chains,
                    findings,
                    notes: &snap.notes,
                },
            )
            .map_err(|e| failed(format!("encode JSON: {e}")))?;
        }
        Ok(())
    }
}
