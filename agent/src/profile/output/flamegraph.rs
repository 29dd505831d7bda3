//! SVG flame graph, rendered by inferno from the collapsed stacks.

use std::io::Write;

use super::{OutputError, ProfileWriter, collapsed};
use crate::profile::model::{Profile, ValueKind};

/// The SVG flame graph writer.
pub struct FlameGraph;

impl ProfileWriter for FlameGraph {
    fn name(&self) -> &'static str {
        "flamegraph"
    }

    fn write(&self, profile: &Profile, out: &mut dyn Write) -> Result<(), OutputError> {
        let lines: Vec<String> = collapsed::lines(profile)
            .into_iter()
            .map(|(stack, value)| format!("{stack} {value}"))
            .collect();
        let mut options = inferno::flamegraph::Options::default();
        options.title = match profile.value_kind {
            ValueKind::CpuSamples => format!("pymedic: CPU ({} Hz)", profile.rate_hz),
            ValueKind::WallNanos => "pymedic: wall clock (on + off CPU)".to_string(),
        };
        options.count_name = match profile.value_kind {
            ValueKind::CpuSamples => "samples".into(),
            ValueKind::WallNanos => "µs".into(),
        };
        if lines.is_empty() {
            // inferno refuses empty input; an empty profile is still a file.
            options.subtitle = Some("no samples were recorded".into());
        }
        let input = if lines.is_empty() {
            vec!["<no samples> 0".to_string()]
        } else {
            lines
        };
        inferno::flamegraph::from_lines(&mut options, input.iter().map(String::as_str), out)
            .map_err(|e| OutputError::FlameGraph(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::model::tests::sample_profile;

    #[test]
    fn renders_svg_with_frames() {
        let mut buf = Vec::new();
        FlameGraph.write(&sample_profile(), &mut buf).unwrap();
        let svg = String::from_utf8(buf).unwrap();
        assert!(svg.starts_with("<?xml"));
        assert!(svg.contains("work (app.py:5)"));
    }
}
