//! Lock allocation generations: the `waits_sem_init` uprobe on each
//! watched process's libc counts `sem_init` calls per semaphore address
//! ([`SEM_GEN_MAP`]). CPython allocates a `sem_t` with `sem_init` for every
//! `threading.Lock` and `RLock`, and malloc readily hands a freed lock's
//! object *and* semaphore addresses to the next lock, so the count is what
//! tells a new lock from a dead one at the same address.
//!
//! The probe is attached once per libc file (by device and inode), for all
//! processes; the kernel side records only registered processes.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;

use aya::Ebpf;
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::{UProbe, uprobe::UProbeScope};
use pymedic_common::waits::{AddrKey, SEM_GEN_MAP};

use crate::bpf::BpfError;

const OBJECT: &str = "waits";
const PROGRAM: &str = "waits_sem_init";

/// The libc files the probe is attached to.
#[derive(Default)]
pub struct SemProbe {
    loaded: bool,
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
    /// Attaches to `pid`'s libc unless that file already has the probe.
    /// `Ok(false)`: the process maps no libc the probe can go on (its
    /// locks' generations are unknown).
    pub fn cover(&mut self, bpf: &mut Ebpf, pid: u32) -> Result<bool, BpfError> {
        let Some(path) = libc_of(pid) else {
            return Ok(false);
        };
        let Ok(meta) = std::fs::metadata(&path) else {
            return Ok(false); // gone with the process
        };
        let file = (meta.dev(), meta.ino());
        if self.attached.contains_key(&file) {
            return Ok(true);
        }
        let wrap = |source: aya::programs::ProgramError| BpfError::Attach {
            object: OBJECT,
            program: PROGRAM,
            what: format!("uprobe sem_init in {path}"),
            source: Box::new(source),
        };
        let prog: &mut UProbe = bpf
            .program_mut(PROGRAM)
            .ok_or(BpfError::MissingProgram {
                object: OBJECT,
                program: PROGRAM,
            })?
            .try_into()
            .map_err(wrap)?;
        if !self.loaded {
            prog.load().map_err(wrap)?;
            self.loaded = true;
        }
        prog.attach("sem_init", &path, UProbeScope::AllProcesses)
            .map_err(wrap)?;
        self.attached.insert(file, path);
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
