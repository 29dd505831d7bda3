//! CPython knowledge, kept out of the agent so it can be unit-tested without
//! root and reused by every tool. This crate is the project's single source
//! of truth about interpreter internals.
//!
//! * [`maps`]: a process's memory mappings (`/proc/PID/maps`).
//! * [`elf`]: symbols and constants from an interpreter's ELF file.
//! * [`version`]: CPython versions and which ones pymedic supports.
//! * [`inspect`]: is process P CPython, which version, shared or static
//!   build, and where `_PyRuntime` lives in its memory.
//! * [`layout`]: structure offsets per interpreter version (generated from
//!   the headers; what the eBPF unwinder's config map is filled from).
//! * [`memory`]: reading another process's memory ([`ProcessMemory`]:
//!   live with `process_vm_readv`, or fake/recorded for tests).
//! * [`interp`]: threads, frames, code objects, GIL holder, thread names.
//! * [`objects`]: strings, ints, dicts, attributes, reprs.
//! * [`linetable`]: bytecode offset → line for every line-table format.
//! * [`fake`]: builds fake interpreter memory from a layout, for tests.

pub mod elf;
pub mod fake;
pub mod inspect;
pub mod interp;
pub mod layout;
pub mod linetable;
pub mod maps;
pub mod memory;
pub mod objects;
pub mod version;

pub use inspect::{Build, InspectError, PythonProcess, inspect};
pub use interp::{Code, Frame, Interpreter, PyThread, ReadError, Slot, SlotKind, TypeInfo};
pub use layout::Layout;
pub use memory::{FakeMemory, LiveMemory, MemoryError, ProcessMemory, RecordingMemory};
pub use version::Version;
