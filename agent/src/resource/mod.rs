//! The resource layer's machinery, shared by the `memory_leak`,
//! `native_memory_leak`, `fd_leak`, `thread_leak` and `gc_pause` detectors
//! (`engine/detect/`):
//!
//! * [`session`]: one loaded `resource` eBPF object for every target —
//!   descriptors and threads by the Python stack that made them, memory
//!   growth (first-touch page faults) by stack, pymalloc arenas, GC pauses,
//!   and write watchpoints on container lengths ([`watch`]).
//! * [`heap`]: growing containers found by reading the heap from outside;
//!   [`memory`]: one process's memory series, shared by the two memory
//!   detectors.
//! * [`trend`]: steady growth with confidence, never one snapshot.
//! * [`sites`]: which frame of a stack is the application's line;
//!   [`fdinfo`]: what descriptors point to; [`native`]: native symbols.

pub mod fdinfo;
pub mod flow;
pub mod heap;
pub mod memory;
pub mod native;
pub mod session;
pub mod sites;
pub mod trend;
pub mod watch;

use crate::bpf::BpfError;
use crate::pystack::PyStackError;

/// Errors of the resource layer.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error(transparent)]
    PyStack(#[from] PyStackError),
    #[error("{op}: {message}")]
    Io { op: &'static str, message: String },
    #[error(
        "arming a write watchpoint at {addr:#x} in process {pid}: {source} (hardware \
         breakpoints need CAP_PERFMON and a free debug register in each thread)"
    )]
    Watchpoint {
        pid: u32,
        addr: u64,
        source: std::io::Error,
    },
}

impl ResourceError {
    /// True when the kernel refused for lack of privilege.
    pub fn is_permission(&self) -> bool {
        match self {
            ResourceError::Bpf(e) => e.is_permission(),
            ResourceError::PyStack(PyStackError::Bpf(e)) => e.is_permission(),
            ResourceError::Watchpoint { source, .. } => {
                matches!(
                    source.raw_os_error(),
                    Some(libc::EPERM) | Some(libc::EACCES)
                )
            }
            _ => false,
        }
    }
}
