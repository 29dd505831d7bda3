//! Errors of the structural layer.

use std::path::PathBuf;

/// What went wrong while analysing a source tree.
#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    #[error("read {path}: {source} (check that the path exists and is readable)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is neither a directory nor a .py file: pass a Python source tree or file")]
    NotPython { path: PathBuf },
    #[error("no Python files under {path}: pass the directory that holds the project's .py files")]
    NoFiles { path: PathBuf },
    #[error(
        "no module or file {what:?} in the analysed tree: pass a dotted module name (pkg.mod) or a path to a .py file under the tree"
    )]
    UnknownModule { what: String },
    #[error("start an analysis worker thread: {0}")]
    Thread(#[source] std::io::Error),
}
