//! The process a finding is about.

use serde::{Deserialize, Serialize};

/// A target process. Identity for deduplication is `(pid, start_time_ticks)`
/// so a reused PID is a new target; `start_time_ticks` is not part of the
/// public JSON contract but is carried for that purpose.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Target {
    pub pid: u32,
    pub exe: String,
    /// Full interpreter version, e.g. `3.12.1`.
    pub python: Option<String>,
    /// Container id from the cgroup path, when there is one.
    pub container: Option<String>,
    /// Kubernetes pod uid from the cgroup path, when there is one.
    pub pod: Option<String>,
    /// Process start time in clock ticks since boot (`/proc/PID/stat` field 22).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time_ticks: Option<u64>,
}
