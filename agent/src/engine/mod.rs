//! The agent's engine: everything between process discovery and the gRPC
//! API. See `ARCHITECTURE.md` ("Data flow: the agent").

pub mod store;
