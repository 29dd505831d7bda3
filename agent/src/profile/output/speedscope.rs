//! speedscope JSON (<https://www.speedscope.app/file-format-schema.json>):
//! one "sampled" profile per thread, frames shared.

use std::collections::HashMap;
use std::io::Write;

use serde_json::json;

use super::{OutputError, ProfileWriter, io_err};
use crate::profile::model::{Frame, Profile, SampleKind, ValueKind};

/// One thread's samples (frame indices, root first) and their weights.
type ThreadSamples = (Vec<Vec<usize>>, Vec<u64>);

/// The speedscope writer.
pub struct Speedscope;

impl ProfileWriter for Speedscope {
    fn name(&self) -> &'static str {
        "speedscope"
    }

    fn write(&self, profile: &Profile, out: &mut dyn Write) -> Result<(), OutputError> {
        let mut frames: Vec<&Frame> = Vec::new();
        let mut frame_index: HashMap<Frame, usize> = HashMap::new();
        let mut stacks: Vec<Vec<Frame>> = Vec::new();
        let mut threads: std::collections::BTreeMap<(u32, u32), ThreadSamples> = Default::default();
        for s in &profile.samples {
            stacks.push(profile.stack(s));
        }
        for (s, stack) in profile.samples.iter().zip(&stacks) {
            let value = profile.value(s);
            if value == 0 {
                continue;
            }
            let ids: Vec<usize> = stack
                .iter()
                .map(|f| {
                    *frame_index.entry(f.clone()).or_insert_with(|| {
                        frames.push(f);
                        frames.len() - 1
                    })
                })
                .collect();
            let entry = threads.entry((s.pid, s.tid)).or_default();
            entry.0.push(ids);
            entry.1.push(value);
        }
        let unit = match profile.value_kind {
            ValueKind::CpuSamples => "none",
            ValueKind::WallNanos => "nanoseconds",
        };
        let kind = if profile.samples.iter().any(|s| s.kind == SampleKind::OffCpu) {
            "wall"
        } else {
            "cpu"
        };
        let profiles: Vec<_> = threads
            .into_iter()
            .map(|((pid, tid), (samples, weights))| {
                let total: u64 = weights.iter().sum();
                let thread = profile
                    .processes
                    .iter()
                    .find(|p| p.pid == pid)
                    .and_then(|p| p.threads.get(&tid).cloned())
                    .unwrap_or_else(|| "thread".into());
                json!({
                    "type": "sampled",
                    "name": format!("{kind} pid {pid} {thread} ({tid})"),
                    "unit": unit,
                    "startValue": 0,
                    "endValue": total,
                    "samples": samples,
                    "weights": weights,
                })
            })
            .collect();
        let frames: Vec<_> = frames
            .iter()
            .map(|f| {
                if f.file.is_empty() {
                    json!({ "name": f.function })
                } else {
                    json!({ "name": f.function, "file": f.file, "line": f.line })
                }
            })
            .collect();
        let doc = json!({
            "$schema": "https://www.speedscope.app/file-format-schema.json",
            "name": format!("pymedic {kind} profile"),
            "exporter": concat!("pymedic ", env!("CARGO_PKG_VERSION")),
            "activeProfileIndex": 0,
            "shared": { "frames": frames },
            "profiles": profiles,
        });
        serde_json::to_writer(&mut *out, &doc)?;
        writeln!(out).map_err(io_err("speedscope"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::model::tests::sample_profile;

    #[test]
    fn one_profile_per_thread_with_shared_frames() {
        let mut buf = Vec::new();
        Speedscope.write(&sample_profile(), &mut buf).unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        let profiles = doc["profiles"].as_array().unwrap();
        assert_eq!(profiles.len(), 2);
        assert_eq!(profiles[0]["weights"], json!([6, 3]));
        let frames = doc["shared"]["frames"].as_array().unwrap();
        let sample = profiles[0]["samples"][0].as_array().unwrap();
        let leaf = &frames[sample.last().unwrap().as_u64().unwrap() as usize];
        assert_eq!(leaf, &json!({"name": "work", "file": "app.py", "line": 5}));
    }
}
