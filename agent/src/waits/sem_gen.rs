//! Lock allocation generations: the `waits_sem_init` uprobe on each
//! watched process's libc counts `sem_init` calls per semaphore address
//! ([`SEM_GEN_MAP`]). CPython allocates a `sem_t` with `sem_init` for every
//! `threading.Lock` and `RLock`, and malloc readily hands a freed lock's
//! object *and* semaphore addresses to the next lock, so the count is what
//! tells a new lock from a dead one at the same address.
//!
//! On 3.13+ shared builds the count comes from a uretprobe on
//! `PyThread_allocate_lock` (which returns the new lock's `sem_t*`)
//! instead: their parking lot `sem_init`s a semaphore on the stack for
//! every blocked acquire, and a uprobe trap each time costs the target.
//!
//! A probe is attached once per file (by device and inode), for all
//! processes; the kernel side records only registered processes.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;

use aya::Ebpf;
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::{UProbe, uprobe::UProbeScope};
use pymedic_common::waits::{AddrKey, SEM_GEN_MAP};
use pymedic_python::{Build, PythonProcess};

use crate::bpf::BpfError;

const OBJECT: &str = "waits";
const PROGRAM: &str = "waits_sem_init";
const ALLOC_PROGRAM: &str = "waits_lock_alloc";
const ALLOC_FUNCTION: &str = "PyThread_allocate_lock";

/// The libc files the probe is attached to.
#[derive(Default)]
pub struct SemProbe {
    loaded: Vec<&'static str>,
    attached: HashMap<(u64, u64), String>,
}

/// The C library process `pid` maps, as a path through its root
/// (`/proc/PID/root/...`), so files in other containers resolve.
fn libc_of(pid: u32) -> Option<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|path| {
            let base = path.rsplit('/').next().unwrap_or(path);
            base.starts_with("libc.so")
                || (base.starts_with("libc-") && base.ends_with(".so"))
                || base.starts_with("ld-musl-")
        })
        .map(|path| format!("/proc/{pid}/root{path}"))
}

impl SemProbe {
    /// Counts `p`'s lock allocations: a uretprobe on `PyThread_allocate_lock`
    /// in a 3.13+ shared `libpython` (there the parking lot `sem_init`s a
    /// semaphore per blocked acquire, ~10⁴ uprobe traps a second in a
    /// lock-heavy program), else a uprobe on its libc's `sem_init`; each
    /// file once. `Ok(false)`: no file to probe (generations unknown).
    pub fn cover(&mut self, bpf: &mut Ebpf, p: &PythonProcess) -> Result<bool, BpfError> {
        if (p.version.major, p.version.minor) >= (3, 13)
            && let Build::Shared { library } = &p.build
        {
            let path = format!("/proc/{}/root{library}", p.pid);
            match self.attach(bpf, ALLOC_PROGRAM, ALLOC_FUNCTION, &path) {
                Ok(true) => return Ok(true),
                Ok(false) => {}
                Err(e) => tracing::debug!(pid = p.pid, "{e}; counting sem_init instead"),
            }
        }
        let Some(path) = libc_of(p.pid) else {
            return Ok(false);
        };
        self.attach(bpf, PROGRAM, "sem_init", &path)
    }

    /// Attaches `program` at `function` of `path` unless that file already
    /// has it. `Ok(false)`: the file is gone.
    fn attach(
        &mut self,
        bpf: &mut Ebpf,
        program: &'static str,
        function: &str,
        path: &str,
    ) -> Result<bool, BpfError> {
        let Ok(meta) = std::fs::metadata(path) else {
            return Ok(false); // gone with the process
        };
        let file = (meta.dev(), meta.ino());
        if self.attached.contains_key(&file) {
            return Ok(true);
        }
        let wrap = |source: aya::programs::ProgramError| BpfError::Attach {
            object: OBJECT,
            program,
            what: format!("uprobe {function} in {path}"),
            source: Box::new(source),
        };
        let prog: &mut UProbe = bpf
            .program_mut(program)
            .ok_or(BpfError::MissingProgram {
                object: OBJECT,
                program,
            })?
            .try_into()
            .map_err(wrap)?;
        if !self.loaded.contains(&program) {
            prog.load().map_err(wrap)?;
            self.loaded.push(program);
        }
        prog.attach(function, path, UProbeScope::AllProcesses)
            .map_err(wrap)?;
        self.attached.insert(file, path.to_owned());
        Ok(true)
    }
}

/// The current generation of each semaphore address of `pid` (0: not
/// initialised since the probe was attached).
pub fn generations(bpf: &Ebpf, pid: u32, sems: &[u64]) -> Result<Vec<u32>, BpfError> {
    let map = bpf.map(SEM_GEN_MAP).ok_or(BpfError::MissingMap {
        object: OBJECT,
        map: SEM_GEN_MAP,
    })?;
    let m: BpfHashMap<&MapData, AddrKey, u32> =
        BpfHashMap::try_from(map).map_err(|source| BpfError::Map {
            map: SEM_GEN_MAP,
            source: Box::new(source),
        })?;
    Ok(sems
        .iter()
        .map(|&uaddr| {
            m.get(
                &AddrKey {
                    uaddr,
                    tgid: pid,
                    _pad: 0,
                },
                0,
            )
            .unwrap_or(0)
        })
        .collect())
}
