//! pymedic: diagnoses running Python processes from the outside.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of modules and
//! how data flows between them.

pub mod bpf;
pub mod cgroup;
pub mod cli;
pub mod deadlock;
pub mod discovery;
pub mod dump;
pub mod engine;
pub mod grpc;
pub mod metrics;
pub mod procinfo;
pub mod profile;
pub mod pystack;
pub mod resource;
pub mod waits;
