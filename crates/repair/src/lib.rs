//! Safe, reviewed, reversible source repairs for structural findings.
//!
//! * [`plan::make`]: analyse the repository, take one finding, produce a
//!   [`Plan`] (unified diff, rationale, risk, verification) stored in
//!   `.pymedic/plans/<id>.json`. Repairs: close a resource on every path
//!   (`with`, `try/finally`, close on leaking exits), move a blocking call
//!   off the event loop (`asyncio.sleep`, `asyncio.to_thread`), bound an
//!   unbounded container or cache, make lock order consistent (or explain
//!   why a person must decide).
//! * [`apply::apply`]: preflight (unchanged since the plan, parses, clean in
//!   git, no merge in progress), journaled atomic writes, verification
//!   (re-parse, re-analyse, the user's command), a commit naming finding and
//!   plan; any failure restores the files.
//! * [`apply::rollback`]: restores the files byte for byte and commits that.
//! * [`history`]: every plan, apply, failure, rollback and recovery.
//!
//! Every command first finishes or undoes an operation a crash interrupted
//! ([`apply::recover`]). Nothing is written anywhere but the repository's
//! files and `.pymedic/`; never to a running process.

pub mod apply;
mod error;
mod fixes;
pub mod git;
pub mod plan;
pub mod store;
pub mod text;

use std::path::Path;

pub use apply::{ApplyOptions, Done, Recovery};
pub use error::RepairError;
pub use plan::{Plan, Risk};
pub use store::Event;

/// The repository's repair history, oldest first (after recovering an
/// interrupted operation, which adds its own event).
pub fn history(repo: &Path) -> Result<(Vec<Event>, Option<Recovery>), RepairError> {
    let store = store::Store::open(repo)?;
    let rec = apply::recover(&store)?;
    Ok((store.history()?, rec))
}

/// Finishes or undoes an interrupted operation, if any.
pub fn recover(repo: &Path) -> Result<Option<Recovery>, RepairError> {
    apply::recover(&store::Store::open(repo)?)
}
