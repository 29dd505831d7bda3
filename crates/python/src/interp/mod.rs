//! Reading a CPython interpreter's state out of its process's memory:
//! threads, frames, code objects, names and objects, for 3.8–3.13, through
//! any [`ProcessMemory`] and the version's [`Layout`].
//!
//! * [`Interpreter::threads`]: every `PyThreadState` of every interpreter.
//! * [`Interpreter::frames`]: a thread's Python stack, innermost first,
//!   shim frames skipped, entry frames marked (for merging native stacks).
//! * [`Interpreter::gil_holder`], [`Interpreter::thread_names`],
//!   [`Interpreter::native_tids`].
//! * Objects (in [`crate::objects`]): strings, ints, tuples, dicts,
//!   attributes, bounded reprs; frame locals and name lookup in
//!   [`Interpreter::frame_slots`] / [`Interpreter::lookup_name`].
//!
//! Nothing here stops the target: a structure may change while it is read.
//! Such reads fail with an error whose [`ReadError::is_transient`] is true;
//! callers retry the whole snapshot.

mod code;
mod frames;
mod threads;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

pub use code::{Code, SlotKind};
pub use frames::{Frame, Slot};
pub use threads::PyThread;

use crate::PythonProcess;
use crate::layout::{self, Layout};
use crate::memory::{MemoryError, ProcessMemory};
use crate::version::Version;

/// Why interpreter state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(
        "{what} at {addr:#x} looks invalid ({detail}); the process may have changed it while \
         it was read"
    )]
    Invalid {
        what: &'static str,
        addr: u64,
        detail: String,
    },
    #[error("pymedic has no structure layout for Python {0}")]
    Unsupported(Version),
}

impl ReadError {
    /// True when retrying the read may succeed (the target changed under us).
    pub fn is_transient(&self) -> bool {
        match self {
            ReadError::Memory(m) => m.is_transient(),
            ReadError::Invalid { .. } => true,
            ReadError::Unsupported(_) => false,
        }
    }

    pub(crate) fn invalid(what: &'static str, addr: u64, detail: impl Into<String>) -> ReadError {
        ReadError::Invalid {
            what,
            addr,
            detail: detail.into(),
        }
    }
}

/// A published offset that disagrees with the table: (name, live, table).
pub type OffsetMismatch = (&'static str, u64, u64);

pub type Result<T, E = ReadError> = std::result::Result<T, E>;

/// What pymedic knows about a type object (cached by address).
#[derive(Clone, Debug)]
pub struct TypeInfo {
    pub addr: u64,
    pub name: String,
    pub flags: u64,
    pub basicsize: i64,
    pub itemsize: i64,
    pub dictoffset: i64,
    pub mro: u64,
    pub dict: u64,
    /// `ht_cached_keys` for heap types (shared instance-dict keys).
    pub cached_keys: u64,
}

/// A CPython interpreter in a process, read through `M`.
pub struct Interpreter<M> {
    pub(crate) mem: M,
    pub(crate) layout: &'static Layout,
    version: Version,
    runtime: u64,
    pub(crate) codes: RefCell<HashMap<u64, Arc<Code>>>,
    pub(crate) types: RefCell<HashMap<u64, Arc<TypeInfo>>>,
}

impl<M: ProcessMemory> Interpreter<M> {
    /// An interpreter of `version` whose `_PyRuntime` is at `runtime_addr`.
    pub fn new(mem: M, version: Version, runtime_addr: u64) -> Result<Interpreter<M>> {
        let layout = layout::for_version(version.major, version.minor)
            .ok_or_else(|| ReadError::Unsupported(version.clone()))?;
        Ok(Interpreter {
            mem,
            layout,
            version,
            runtime: runtime_addr,
            codes: RefCell::new(HashMap::new()),
            types: RefCell::new(HashMap::new()),
        })
    }

    /// The interpreter of a process recognised by [`crate::inspect`].
    pub fn for_process(mem: M, p: &PythonProcess) -> Result<Interpreter<M>> {
        Interpreter::new(mem, p.version.clone(), p.runtime_addr)
    }

    pub fn layout(&self) -> &'static Layout {
        self.layout
    }

    pub fn version(&self) -> &Version {
        &self.version
    }

    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Address of `_PyRuntime`.
    pub fn runtime_addr(&self) -> u64 {
        self.runtime
    }

    pub(crate) fn minor(&self) -> u8 {
        self.version.minor
    }

    pub(crate) fn ptr(&self, addr: u64) -> Result<u64> {
        Ok(self.mem.read_u64(addr)?)
    }

    /// Forgets cached code objects and types (e.g. between snapshots of a
    /// long-running agent, where freed objects' addresses get reused).
    pub fn clear_caches(&self) {
        self.codes.borrow_mut().clear();
        self.types.borrow_mut().clear();
    }

    /// Reads 3.13's `_Py_DebugOffsets` and returns every published offset
    /// that disagrees with this version's table as `(name, live, table)`.
    /// `Ok(None)` for versions without debug offsets.
    pub fn check_debug_offsets(&self) -> Result<Option<Vec<OffsetMismatch>>> {
        let (Some(at), Some(dbg)) = (
            self.layout.runtime.debug_offsets,
            self.layout.debug_offsets.as_ref(),
        ) else {
            return Ok(None);
        };
        let base = self.runtime + u64::from(at);
        let cookie = self.mem.read_vec(base + u64::from(dbg.cookie), 8)?;
        if cookie != layout::DEBUG_OFFSETS_COOKIE {
            return Err(ReadError::invalid(
                "_Py_DebugOffsets",
                base,
                format!("cookie {cookie:?}, expected \"xdebugpy\""),
            ));
        }
        let mut bad = Vec::new();
        for (off, expect, name) in dbg.checks(self.layout) {
            let live = self.mem.read_u64(base + u64::from(off))?;
            if live != expect {
                bad.push((name, live, expect));
            }
        }
        Ok(Some(bad))
    }
}
