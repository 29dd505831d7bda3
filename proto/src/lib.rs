//! The gRPC contract, `pymedic.v1` (see `pymedic/v1/*.proto`).
//!
//! The generated code will be committed here with a drift test so users need
//! no `protoc`; the service itself lives in the agent.
