//! Writing a [`Profile`] in the formats users load into their tools: one
//! [`Format`] value per format, one file per format, one trait.

mod collapsed;
mod flamegraph;
mod pprof;
mod speedscope;

use std::io::Write;

use super::model::Profile;

pub use collapsed::Collapsed;
pub use flamegraph::FlameGraph;
pub use pprof::Pprof;
pub use speedscope::Speedscope;

/// Errors writing a profile.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("writing the {format} profile: {source}")]
    Io {
        format: &'static str,
        source: std::io::Error,
    },
    #[error("rendering the flame graph: {0}")]
    FlameGraph(String),
    #[error("encoding the speedscope JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// A profile output format.
pub trait ProfileWriter {
    /// Short name (`pprof`, `speedscope`, ...).
    fn name(&self) -> &'static str;
    /// Writes `profile` to `out`.
    fn write(&self, profile: &Profile, out: &mut dyn Write) -> Result<(), OutputError>;
}

/// The formats `pymedic record --format` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// gzip-compressed pprof protobuf (`go tool pprof`, Pyroscope, Grafana).
    Pprof,
    /// speedscope JSON (https://www.speedscope.app).
    Speedscope,
    /// SVG flame graph.
    Flamegraph,
    /// Collapsed stacks, one `frame;frame;... value` line per stack, frames
    /// written `function (file:line)`.
    Collapsed,
}

impl Format {
    /// The writer for this format.
    pub fn writer(self) -> Box<dyn ProfileWriter> {
        match self {
            Format::Pprof => Box::new(Pprof),
            Format::Speedscope => Box::new(Speedscope),
            Format::Flamegraph => Box::new(FlameGraph),
            Format::Collapsed => Box::new(Collapsed),
        }
    }

    /// Guesses the format from a file name's extension.
    pub fn from_path(path: &std::path::Path) -> Option<Format> {
        let name = path.file_name()?.to_str()?;
        if name.ends_with(".pb.gz") || name.ends_with(".pprof") || name.ends_with(".pb") {
            Some(Format::Pprof)
        } else if name.ends_with(".speedscope.json") || name.ends_with(".json") {
            Some(Format::Speedscope)
        } else if name.ends_with(".svg") {
            Some(Format::Flamegraph)
        } else if name.ends_with(".txt")
            || name.ends_with(".collapsed")
            || name.ends_with(".folded")
        {
            Some(Format::Collapsed)
        } else {
            None
        }
    }
}

pub(crate) fn io_err(format: &'static str) -> impl Fn(std::io::Error) -> OutputError {
    move |source| OutputError::Io { format, source }
}
