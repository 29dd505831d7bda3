//! CPython knowledge, kept out of the agent so it can be unit-tested without
//! root and reused by every tool.
//!
//! * [`maps`]: a process's memory mappings (`/proc/PID/maps`).
//! * [`elf`]: symbols and constants from an interpreter's ELF file.
//! * [`version`]: CPython versions and which ones pymedic supports.
//! * [`inspect`]: is process P CPython, which version, shared or static
//!   build, and where `_PyRuntime` lives in its memory.

pub mod elf;
pub mod inspect;
pub mod maps;
pub mod version;

pub use inspect::{Build, InspectError, PythonProcess, inspect};
pub use version::Version;
