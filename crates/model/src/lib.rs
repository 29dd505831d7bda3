//! The data users script against: a [`Finding`] and its parts, serialised
//! exactly as `../shared/INTERFACE.md` (and `docs/interface.md`) describe.
//! The gRPC messages in `proto/` mirror these field names.
//!
//! This crate has no I/O. Producers (detectors, the static analyser) build
//! findings; the agent stores them; CLIs print them.

mod finding;
mod location;
mod target;

pub use finding::{Finding, FindingId, Kind, Layer, Severity, Status};
pub use location::{Frame, Location, Related, Stack};
pub use target::Target;

/// RFC 3339 timestamps in UTC, as they appear in JSON.
pub type Timestamp = time::OffsetDateTime;

/// Now, in UTC, truncated to microseconds (what SQLite and JSON round-trip).
pub fn now() -> Timestamp {
    let t = time::OffsetDateTime::now_utc();
    t.replace_nanosecond(t.nanosecond() / 1000 * 1000)
        .unwrap_or(t)
}
