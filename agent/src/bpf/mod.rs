//! The privileged seam: loading pymedic's embedded eBPF objects, attaching
//! them, and turning kernel refusals into errors that say what to do.
//!
//! Each concern is its own object (built from `ebpf/pymedic-ebpf/src/bin/*`
//! by `build.rs`), so a command loads only what it needs.

pub mod btf;
pub mod tracefs;

use std::io;

use aya::{Ebpf, EbpfLoader};

/// The embedded eBPF objects.
pub mod objects {
    /// Process discovery (exec/fork/exit tracepoints).
    pub static DISCOVERY: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/discovery"));
    /// CPU and off-CPU profiling (perf events, sched_switch) with the
    /// shared Python stack walker.
    pub static PROFILE: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profile"));
    /// Descriptors, threads, memory growth, GC pauses and container inserts
    /// of Python processes, with the shared Python stack walker.
    pub static RESOURCE: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/resource"));
    /// Futex waits and wakes with Python stacks, event-loop steps (the
    /// temporal detectors' shared sensor).
    pub static WAITS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/waits"));
}

/// Errors of the eBPF subsystem.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "loading eBPF object `{object}` needs CAP_BPF and CAP_PERFMON (and CAP_SYS_ADMIN on \
         older kernels): run as root or add them to the DaemonSet's securityContext: {source}"
    )]
    PermissionDenied {
        object: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("loading eBPF object `{object}`: {source}")]
    Load {
        object: &'static str,
        source: Box<aya::EbpfError>,
    },
    #[error("eBPF object `{object}` has no program `{program}` (build mismatch)")]
    MissingProgram {
        object: &'static str,
        program: &'static str,
    },
    #[error("eBPF object `{object}` has no map `{map}` (build mismatch)")]
    MissingMap {
        object: &'static str,
        map: &'static str,
    },
    #[error("attaching {what} ({object}/{program}): {source}")]
    Attach {
        object: &'static str,
        program: &'static str,
        what: String,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("eBPF map `{map}`: {source}")]
    Map {
        map: &'static str,
        source: Box<aya::maps::MapError>,
    },
    #[error(transparent)]
    Tracefs(#[from] tracefs::TracefsError),
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error("{op}: {source}")]
    Io { op: &'static str, source: io::Error },
}

impl BpfError {
    /// True when the error is the kernel refusing for lack of privilege.
    pub fn is_permission(&self) -> bool {
        matches!(self, BpfError::PermissionDenied { .. })
    }
}

/// `CLOCK_MONOTONIC` now, in ns: the clock of `bpf_ktime_get_ns()`, so
/// userspace can age what the kernel timestamped.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Adapts an aya map error on `map` to [`BpfError::Map`].
pub fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> BpfError {
    move |source| BpfError::Map {
        map,
        source: Box::new(source),
    }
}

/// True when `e` (or a cause) is the kernel refusing for lack of privilege.
pub fn is_permission_error(e: &(dyn std::error::Error + 'static)) -> bool {
    is_eperm(e)
}

fn is_eperm(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
        {
            return true;
        }
        let text = err.to_string();
        if text.contains("Operation not permitted") || text.contains("Permission denied") {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Loads an embedded object, applying `configure` to the loader first
/// (globals, map sizes).
pub fn load<'a>(
    object: &'static str,
    bytes: &[u8],
    configure: impl FnOnce(&mut EbpfLoader<'a>),
) -> Result<Ebpf, BpfError> {
    let mut loader = EbpfLoader::<'a>::new();
    configure(&mut loader);
    loader.load(bytes).map_err(|source| {
        if is_eperm(&source) {
            BpfError::PermissionDenied {
                object,
                source: Box::new(source),
            }
        } else {
            BpfError::Load {
                object,
                source: Box::new(source),
            }
        }
    })
}

/// Loads and attaches the tracepoint program `program` of `bpf` to
/// `category:name`.
pub fn attach_tracepoint(
    bpf: &mut Ebpf,
    object: &'static str,
    program: &'static str,
    category: &str,
    name: &str,
) -> Result<(), BpfError> {
    let prog: &mut aya::programs::TracePoint = bpf
        .program_mut(program)
        .ok_or(BpfError::MissingProgram { object, program })?
        .try_into()
        .map_err(|source| BpfError::Attach {
            object,
            program,
            what: format!("tracepoint {category}:{name}"),
            source: Box::new(source),
        })?;
    let wrap = |source: aya::programs::ProgramError| {
        if is_eperm(&source) {
            BpfError::PermissionDenied {
                object,
                source: Box::new(source),
            }
        } else {
            BpfError::Attach {
                object,
                program,
                what: format!("tracepoint {category}:{name}"),
                source: Box::new(source),
            }
        }
    };
    prog.load().map_err(wrap)?;
    prog.attach(category, name).map_err(wrap)?;
    Ok(())
}

/// Sums a per-CPU error array (`[u64; ErrorCode::COUNT]`) into
/// `(label, total)` pairs.
pub fn read_error_counters(
    bpf: &Ebpf,
    map: &'static str,
) -> Result<Vec<(&'static str, u64)>, BpfError> {
    use pymedic_common::errors::ErrorCode;
    let m = bpf
        .map(map)
        .ok_or(BpfError::MissingMap { object: "?", map })?;
    let arr = aya::maps::PerCpuArray::<_, u64>::try_from(m).map_err(|source| BpfError::Map {
        map,
        source: Box::new(source),
    })?;
    let mut out = Vec::new();
    for code in ErrorCode::ALL {
        let values = arr.get(&(code as u32), 0).map_err(|source| BpfError::Map {
            map,
            source: Box::new(source),
        })?;
        out.push((code.label(), values.iter().sum()));
    }
    Ok(out)
}
