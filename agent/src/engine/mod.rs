//! The agent's engine: everything between process discovery and the gRPC
//! API. See `ARCHITECTURE.md` ("Data flow: the agent").

pub mod config;
pub mod detect;
pub mod store;
pub mod targets;
pub mod usage;
