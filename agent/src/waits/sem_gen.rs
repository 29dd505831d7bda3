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
//! A probe is attached per watched process (the kernel plants the
//! breakpoint in that process's memory only: other processes' lock
//! allocations, e.g. the lock of every buffered `open()`, never trap) and
//! detached when the process is no longer watched.

use std::collections::HashMap;
use std::num::NonZeroU32;

use aya::Ebpf;
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::UProbe;
use aya::programs::uprobe::{UProbeLinkId, UProbeScope};
use pymedic_common::waits::{AddrKey, SEM_GEN_MAP};
use pymedic_python::{Build, PythonProcess};

use crate::bpf::BpfError;

const OBJECT: &str = "waits";
const PROGRAM: &str = "waits_sem_init";
const ALLOC_PROGRAM: &str = "waits_lock_alloc";
const ALLOC_FUNCTION: &str = "PyThread_allocate_lock";

/// The probes attached, one per watched process.
#[derive(Default)]
pub struct SemProbe {
    loaded: Vec<&'static str>,
    attached: HashMap<u32, (&'static str, UProbeLinkId)>,
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
    /// lock-heavy program), else a uprobe on its libc's `sem_init`; for
    /// `p` alone. `Ok(false)`: no file to probe (generations unknown).
    pub fn cover(&mut self, bpf: &mut Ebpf, p: &PythonProcess) -> Result<bool, BpfError> {
        if (p.version.major, p.version.minor) >= (3, 13)
            && let Build::Shared { library } = &p.build
        {
            let path = format!("/proc/{}/root{library}", p.pid);
            match self.attach(bpf, p.pid, ALLOC_PROGRAM, ALLOC_FUNCTION, &path) {
                Ok(true) => return Ok(true),
                Ok(false) => {}
                Err(e) => tracing::debug!(pid = p.pid, "{e}; counting sem_init instead"),
            }
        }
        let Some(path) = libc_of(p.pid) else {
            return Ok(false);
        };
        self.attach(bpf, p.pid, PROGRAM, "sem_init", &path)
    }

    /// Attaches `program` at `function` of `path`, for process `pid` only,
    /// unless `pid` has a probe. `Ok(false)`: the file is gone.
    fn attach(
        &mut self,
        bpf: &mut Ebpf,
        pid: u32,
        program: &'static str,
        function: &str,
        path: &str,
    ) -> Result<bool, BpfError> {
        if self.attached.contains_key(&pid) {
            return Ok(true);
        }
        let Some(scope) = NonZeroU32::new(pid).map(UProbeScope::OneProcess) else {
            return Ok(false);
        };
        if std::fs::metadata(path).is_err() {
            return Ok(false); // gone with the process
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
        let link = prog.attach(function, path, scope).map_err(wrap)?;
        self.attached.insert(pid, (program, link));
        Ok(true)
    }

    /// Detaches `pid`'s probe (the process is no longer watched).
    pub fn uncover(&mut self, bpf: &mut Ebpf, pid: u32) {
        let Some((program, link)) = self.attached.remove(&pid) else {
            return;
        };
        let prog: Option<&mut UProbe> = bpf.program_mut(program).and_then(|p| p.try_into().ok());
        if let Some(prog) = prog
            && let Err(e) = prog.detach(link)
        {
            tracing::debug!(pid, "detaching the lock-allocation probe: {e}");
        }
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
