//! Errors of the repair engine. Each names the operation and what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Analyze(#[from] pymedic_analyze::AnalyzeError),
    #[error(
        "no finding {id} in {repo}: run `pymedic analyze {repo}` and pass an id it prints (ids change when the code around a finding changes)"
    )]
    NoSuchFinding { id: String, repo: PathBuf },
    #[error("no plan {id} under {dir}: `pymedic repair history --repo REPO` lists plans")]
    NoSuchPlan { id: String, dir: PathBuf },
    #[error("cannot plan a repair for this {kind} finding: {why}")]
    Unsupported { kind: String, why: String },
    #[error("plan {id} needs a human decision and cannot be applied automatically: {why}")]
    NeedsReview { id: String, why: String },
    #[error(
        "{path} changed since plan {id} was made (sha256 {found}, plan expects {expected}): make a new plan with `pymedic repair plan`"
    )]
    Stale {
        id: String,
        path: String,
        expected: String,
        found: String,
    },
    #[error(
        "{path} has uncommitted changes: commit or stash them first, so the repair's commit holds only the repair"
    )]
    Dirty { path: String },
    #[error("the repository is in the middle of a {what}: finish or abort it first")]
    InProgress { what: &'static str },
    #[error("the edited {path} would not parse ({message}): the plan is refused")]
    WouldNotParse { path: String, message: String },
    #[error("verification failed, the repair was rolled back: {reason}")]
    VerifyFailed { reason: String },
    #[error("plan {id} is {state}: {what}")]
    WrongState {
        id: String,
        state: String,
        what: String,
    },
    #[error("git {args}: {message}")]
    Git { args: String, message: String },
    #[error("corrupt {what} {path}: {message} (move it aside to continue)")]
    Corrupt {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
}

impl RepairError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> RepairError {
        let path = path.into();
        move |source| RepairError::Io { op, path, source }
    }

    /// Exit status: 2 for bad input (unknown id, stale or dirty file,
    /// unsupported), 4 for a failed verification, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            RepairError::VerifyFailed { .. } => 4,
            RepairError::Io { .. } | RepairError::Git { .. } | RepairError::Corrupt { .. } => 1,
            RepairError::Analyze(_) => 2,
            _ => 2,
        }
    }
}
