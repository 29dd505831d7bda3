//! Recognising CPython in a process: which file holds the interpreter, its
//! version, shared or static build, and where `_PyRuntime` is mapped.
//!
//! Everything here reads `/proc/PID/{maps,exe,root}` and ELF files; nothing
//! reads or stops the target's memory.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::elf::{ElfError, ElfFile};
use crate::maps::{self, Mapping};
use crate::version::{NEWEST_SUPPORTED, OLDEST_SUPPORTED, Version};

/// How the interpreter is linked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Build {
    /// The interpreter lives in a shared `libpython3.X.so`.
    Shared { library: String },
    /// The interpreter is linked into the executable (e.g. Debian's python3.11).
    Static,
}

impl Build {
    pub fn label(&self) -> &'static str {
        match self {
            Build::Shared { .. } => "shared",
            Build::Static => "static",
        }
    }
}

/// A process recognised as CPython.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PythonProcess {
    pub pid: u32,
    /// `/proc/PID/exe` as the target sees it.
    pub exe: String,
    pub version: Version,
    pub build: Build,
    /// The ELF file (target's view) that defines `_PyRuntime`.
    pub interpreter_file: String,
    /// Load bias of `interpreter_file` in the target.
    pub load_bias: u64,
    /// Address of `_PyRuntime` in the target's memory.
    pub runtime_addr: u64,
}

/// Why a process could not be recognised.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("process {pid} does not exist (or exited while being read)")]
    NoSuchProcess { pid: u32 },
    #[error(
        "reading {what} of process {pid} was denied: run as root, or grant CAP_SYS_PTRACE \
         (and CAP_DAC_READ_SEARCH for files in other containers)"
    )]
    PermissionDenied { pid: u32, what: &'static str },
    #[error(
        "process {pid} ({exe}) is not a CPython interpreter: no libpython is mapped and the executable defines no _PyRuntime"
    )]
    NotPython { pid: u32, exe: String },
    #[error(
        "process {pid} runs Python {version}, which pymedic does not support \
         (supported: {}.{}–{}.{})",
        OLDEST_SUPPORTED.0, OLDEST_SUPPORTED.1, NEWEST_SUPPORTED.0, NEWEST_SUPPORTED.1
    )]
    UnsupportedVersion { pid: u32, version: Version },
    #[error("process {pid}: could not tell which Python version {file} is")]
    UnknownVersion { pid: u32, file: String },
    #[error("process {pid}: {file} defines no _PyRuntime symbol (a stripped static build?)")]
    NoRuntimeSymbol { pid: u32, file: String },
    #[error("process {pid}: {op}: {source}")]
    Io {
        pid: u32,
        op: &'static str,
        source: io::Error,
    },
    #[error("process {pid}: {source}")]
    Elf { pid: u32, source: ElfError },
}

impl InspectError {
    fn io(pid: u32, op: &'static str, what: &'static str, e: io::Error) -> InspectError {
        match e.kind() {
            io::ErrorKind::NotFound => InspectError::NoSuchProcess { pid },
            io::ErrorKind::PermissionDenied => InspectError::PermissionDenied { pid, what },
            _ if e.raw_os_error() == Some(libc_esrch()) => InspectError::NoSuchProcess { pid },
            _ => InspectError::Io { pid, op, source: e },
        }
    }

    /// True when the process is simply not Python (as opposed to unreadable).
    pub fn is_not_python(&self) -> bool {
        matches!(self, InspectError::NotPython { .. })
    }
}

const fn libc_esrch() -> i32 {
    3
}

/// Recognises processes, caching parsed ELF files by (device, inode) so
/// that scanning a host with many interpreters parses (and maps) each binary
/// once, whichever process's `/proc/PID/root` it is reached through.
#[derive(Default)]
pub struct Inspector {
    cache: HashMap<(u64, u64), Arc<ElfFile>>,
    /// Executables already found not to be interpreters (an agent sees
    /// `cc`, `git`, ... exec again and again; parse each once).
    not_python: std::collections::HashSet<(u64, u64)>,
}

/// Non-interpreter executables remembered at most.
const MAX_NOT_PYTHON: usize = 4096;

/// Interpreter files kept parsed at most; beyond, the cache starts over (a
/// long-running agent sees interpreters come and go with upgrades).
const MAX_CACHED_FILES: usize = 64;

fn file_key(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let md = std::fs::metadata(path)?;
    Ok((md.dev(), md.ino()))
}

/// `libpython3.12.so.1.0`, `libpython3.8d.so` → (3, 12) / (3, 8).
fn libpython_version(name: &str) -> Option<(u8, u8)> {
    let rest = name.strip_prefix("libpython")?;
    if !rest.contains(".so") {
        return None;
    }
    let mm: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let v = Version::parse(mm.trim_end_matches('.'))?;
    Some((v.major, v.minor))
}

/// `python3.11`, `python3.12d` → (3, 11) / (3, 12).
fn exe_version(name: &str) -> Option<(u8, u8)> {
    let rest = name.strip_prefix("python")?;
    let mm: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let v = Version::parse(&mm)?;
    Some((v.major, v.minor))
}

impl Inspector {
    pub fn new() -> Inspector {
        Inspector::default()
    }

    fn elf(&mut self, pid: u32, m: &Mapping) -> Result<Arc<ElfFile>, InspectError> {
        let path = maps::host_path(pid, m.path.as_deref().unwrap_or_default());
        let key = file_key(&path)
            .map_err(|e| InspectError::io(pid, "open interpreter file", "files", e))?;
        if let Some(f) = self.cache.get(&key) {
            return Ok(f.clone());
        }
        let f = Arc::new(ElfFile::open(&path).map_err(|source| match source {
            ElfError::Open { source, .. } => {
                InspectError::io(pid, "open interpreter file", "files", source)
            }
            other => InspectError::Elf { pid, source: other },
        })?);
        if self.cache.len() >= MAX_CACHED_FILES {
            self.cache.clear();
        }
        self.cache.insert(key, f.clone());
        Ok(f)
    }

    /// Drops a file found not to be an interpreter, and remembers that.
    fn forget(&mut self, pid: u32, m: &Mapping) {
        let path = maps::host_path(pid, m.path.as_deref().unwrap_or_default());
        if let Ok(key) = file_key(&path) {
            self.cache.remove(&key);
            if self.not_python.len() >= MAX_NOT_PYTHON {
                self.not_python.clear();
            }
            self.not_python.insert(key);
        }
    }

    fn known_not_python(&self, pid: u32, m: &Mapping) -> bool {
        let path = maps::host_path(pid, m.path.as_deref().unwrap_or_default());
        file_key(&path).is_ok_and(|k| self.not_python.contains(&k))
    }

    /// Recognises process `pid`.
    pub fn inspect(&mut self, pid: u32) -> Result<PythonProcess, InspectError> {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map_err(|e| InspectError::io(pid, "read /proc/PID/exe", "the executable link", e))?
            .to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_owned();
        let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .map_err(|e| InspectError::io(pid, "read /proc/PID/maps", "memory maps", e))?;
        let mappings = maps::parse(&text);
        if mappings.is_empty() {
            // Kernel threads and zombies have no mappings.
            return Err(InspectError::NotPython { pid, exe });
        }

        // A libpython counts only if some part of it is mapped executable:
        // a tool that merely mmaps the file to read it is not Python.
        let lib = mappings.iter().find(|m| {
            m.offset == 0
                && m.file_name().and_then(libpython_version).is_some()
                && mappings.iter().any(|x| x.path == m.path && x.is_exec())
        });
        let (file_mapping, build, name_version) = match lib {
            Some(m) => (
                m,
                Build::Shared {
                    library: m.path.clone().unwrap_or_default(),
                },
                m.file_name().and_then(libpython_version),
            ),
            None => {
                let Some(m) = mappings
                    .iter()
                    .find(|m| m.offset == 0 && m.path.as_deref() == Some(exe.as_str()))
                else {
                    return Err(InspectError::NotPython { pid, exe });
                };
                if self.known_not_python(pid, m) {
                    return Err(InspectError::NotPython { pid, exe });
                }
                (m, Build::Static, m.file_name().and_then(exe_version))
            }
        };
        let file = file_mapping.path.clone().unwrap_or_default();
        let elf = self.elf(pid, file_mapping)?;
        let Some(runtime_sym) = elf.symbol("_PyRuntime") else {
            if matches!(build, Build::Static) && !elf.has_symbol("Py_Initialize") {
                // Not an interpreter: do not keep it mapped (a long-running
                // agent sees every executable on the host).
                self.forget(pid, file_mapping);
                return Err(InspectError::NotPython { pid, exe });
            }
            return Err(InspectError::NoRuntimeSymbol { pid, file });
        };

        let version = match elf.py_version_constant() {
            Some(v) => v,
            None => {
                let candidates: Vec<(u8, u8)> = match name_version {
                    Some(mm) => vec![mm],
                    None => (OLDEST_SUPPORTED.1..=10).map(|m| (3, m)).collect(),
                };
                let found = candidates
                    .iter()
                    .find_map(|&(ma, mi)| elf.version_string(ma, mi));
                match (found, name_version) {
                    (Some(v), _) => v,
                    (None, Some((ma, mi))) => Version::new(ma, mi, None),
                    (None, None) => return Err(InspectError::UnknownVersion { pid, file }),
                }
            }
        };
        if !version.is_supported() {
            return Err(InspectError::UnsupportedVersion { pid, version });
        }
        let load_bias = file_mapping.start.wrapping_sub(elf.first_load_vaddr());
        Ok(PythonProcess {
            pid,
            exe,
            version,
            build,
            interpreter_file: file,
            load_bias,
            runtime_addr: runtime_sym.wrapping_add(load_bias),
        })
    }
}

/// Recognises process `pid` with a fresh [`Inspector`].
pub fn inspect(pid: u32) -> Result<PythonProcess, InspectError> {
    Inspector::new().inspect(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_interpreters_are_remembered_not_kept_mapped() {
        let mut i = Inspector::new();
        let me = std::process::id();
        assert!(matches!(i.inspect(me), Err(InspectError::NotPython { .. })));
        assert!(i.cache.is_empty(), "a non-interpreter stays mapped");
        assert_eq!(i.not_python.len(), 1);
        assert!(matches!(i.inspect(me), Err(InspectError::NotPython { .. })));
        assert_eq!(i.not_python.len(), 1);
    }

    #[test]
    fn names_give_versions() {
        assert_eq!(libpython_version("libpython3.12.so.1.0"), Some((3, 12)));
        assert_eq!(libpython_version("libpython3.8d.so"), Some((3, 8)));
        assert_eq!(libpython_version("libpython3.so"), None);
        assert_eq!(libpython_version("libpython3.10.a"), None);
        assert_eq!(exe_version("python3.11"), Some((3, 11)));
        assert_eq!(exe_version("python3"), None);
        assert_eq!(exe_version("uwsgi"), None);
    }

    #[test]
    fn missing_process_is_named() {
        let err = inspect(u32::MAX - 1).unwrap_err();
        assert!(matches!(err, InspectError::NoSuchProcess { .. }), "{err}");
    }

    #[test]
    fn this_test_binary_is_not_python() {
        let err = inspect(std::process::id()).unwrap_err();
        assert!(err.is_not_python(), "{err}");
    }
}
