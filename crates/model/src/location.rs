//! Where something is: a source location, a related site, a thread's stack.

use serde::{Deserialize, Serialize};

/// A Python source location. `file` is the code object's `co_filename` as the
/// target sees it (unmodified); `line` is 1-based (0 when unknown).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Location {
    pub file: String,
    pub function: String,
    pub line: u32,
}

impl Location {
    pub fn new(file: impl Into<String>, function: impl Into<String>, line: u32) -> Self {
        Location {
            file: file.into(),
            function: function.into(),
            line,
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.function, self.line)
    }
}

/// Another site that matters for a finding, with the role it plays
/// ("holds audit_lock", "allocated here", "waits here").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Related {
    pub file: String,
    pub function: String,
    pub line: u32,
    pub role: String,
}

impl Related {
    pub fn new(at: &Location, role: impl Into<String>) -> Self {
        Related {
            file: at.file.clone(),
            function: at.function.clone(),
            line: at.line,
            role: role.into(),
        }
    }

    pub fn location(&self) -> Location {
        Location::new(self.file.clone(), self.function.clone(), self.line)
    }
}

/// One frame of a stack, innermost first in [`Stack::frames`].
pub type Frame = Location;

/// A thread's stack as evidence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stack {
    /// Python-level thread name when known, else the OS thread name.
    pub thread: String,
    /// OS thread id.
    pub tid: u32,
    /// Innermost frame first.
    pub frames: Vec<Frame>,
}
