//! Userspace half of the eBPF Python stack walker (`pymedic_ebpf::pystack`):
//!
//! * [`proc_info`] turns `pymedic-python`'s layout table for a process's
//!   interpreter into the [`PyProcInfo`] the kernel walker reads from the
//!   `PY_PROCS` map (so one eBPF program serves every CPython version);
//! * [`register`] / [`unregister`] maintain that map and set the kernel
//!   global the walker needs (`task_struct.thread.fsbase`, from BTF);
//! * [`Symbolizer`] turns captured frames (code object address, instruction
//!   position) into `function (file:line)`, caching code objects per
//!   (process, address) and forgetting a process on exit or exec.
//!
//! Any eBPF object that links the walker can use these: register the
//! targets, capture stack ids in the kernel, read `PY_STACKS` here.

use std::collections::HashMap;
use std::sync::Arc;

use aya::Ebpf;
use aya::maps::{HashMap as BpfHashMap, MapData};
use pymedic_common::pystack::{
    FRAME_READ_MAX, GLOBAL_TASK_FSBASE_OFF, NO_OFFSET, PROC_INSTR_IS_POINTER, PY_PROCS_MAP,
    PY_STACKS_MAP, PyFrame, PyProcInfo, PyStack,
};
use pymedic_python::PythonProcess;
use pymedic_python::interp::{Code, Interpreter};
use pymedic_python::layout::{self, Layout};
use pymedic_python::memory::LiveMemory;

use crate::bpf::{BpfError, btf};
use crate::profile::model::Frame;

/// Errors of the userspace walker support.
#[derive(Debug, thiserror::Error)]
pub enum PyStackError {
    #[error("process {pid}: pymedic has no layout table for Python {version}")]
    NoLayout { pid: u32, version: String },
    #[error(
        "process {pid}: the layout of Python {version} has a frame field beyond \
         {FRAME_READ_MAX} bytes; raise FRAME_READ_MAX in pymedic-common"
    )]
    FrameTooLarge { pid: u32, version: String },
    #[error("registering process {pid} with the stack walker: {source}")]
    Map {
        pid: u32,
        source: Box<aya::maps::MapError>,
    },
    #[error(transparent)]
    Bpf(#[from] BpfError),
}

/// The kernel walker's view of a process: addresses and offsets from its
/// interpreter's layout table.
pub fn proc_info(p: &PythonProcess) -> Result<PyProcInfo, PyStackError> {
    let l = layout::for_version(p.version.major, p.version.minor).ok_or_else(|| {
        PyStackError::NoLayout {
            pid: p.pid,
            version: p.version.to_string(),
        }
    })?;
    proc_info_for(l, p.runtime_addr).ok_or_else(|| PyStackError::FrameTooLarge {
        pid: p.pid,
        version: p.version.to_string(),
    })
}

/// [`proc_info`] from a layout and the address of `_PyRuntime`; `None` when
/// a frame field lies beyond what the walker reads.
pub fn proc_info_for(l: &Layout, runtime_addr: u64) -> Option<PyProcInfo> {
    let t = &l.thread;
    let f = &l.frame;
    let (tstate_frame, cframe_current_frame) = match (t.frame, t.cframe, t.current_frame) {
        (Some(frame), _, _) => (frame, NO_OFFSET),
        (None, Some(cframe), _) => (cframe, t.cframe_current_frame?),
        (None, None, Some(current)) => (current, NO_OFFSET),
        _ => return None,
    };
    let (frame_instr, instr_len, flags) = match (f.lasti, f.prev_instr.or(f.instr_ptr)) {
        (Some(lasti), _) => (lasti, 4, 0),
        (None, Some(ptr)) => (ptr, 8, PROC_INSTR_IS_POINTER),
        _ => return None,
    };
    let owner_cstack = f.owner_cstack.unwrap_or(NO_OFFSET);
    let frame_owner = match f.owner {
        Some(owner) if owner_cstack != NO_OFFSET => owner,
        _ => NO_OFFSET,
    };
    let mut read_len = (f.previous + 8)
        .max(f.code + 8)
        .max(frame_instr + instr_len);
    if frame_owner != NO_OFFSET {
        read_len = read_len.max(frame_owner + 1);
    }
    let read_len = read_len.div_ceil(8) * 8;
    if read_len > FRAME_READ_MAX {
        return None;
    }
    Some(PyProcInfo {
        version: (u32::from(l.version.0) << 8) | u32::from(l.version.1),
        flags,
        interp_head_addr: runtime_addr + u64::from(l.runtime.interpreters_head),
        interp_tstate_head: l.interp.threads_head,
        tstate_next: t.next,
        tstate_thread_id: t.thread_id,
        tstate_native_thread_id: t.native_thread_id.unwrap_or(NO_OFFSET),
        tstate_frame,
        cframe_current_frame,
        frame_previous: f.previous,
        frame_code: f.code,
        frame_instr,
        frame_owner,
        owner_cstack,
        frame_read_len: read_len,
        code_adaptive: l.code.code_adaptive.unwrap_or(NO_OFFSET),
        _pad: 0,
    })
}

/// Sets the walker's kernel globals on a loader; call before `load`.
pub fn configure_loader<'a>(loader: &mut aya::EbpfLoader<'a>, fsbase_off: &'a u32) {
    loader.override_global(GLOBAL_TASK_FSBASE_OFF, fsbase_off, true);
}

/// The running kernel's `task_struct.thread.fsbase` offset, for
/// [`configure_loader`].
pub fn kernel_fsbase_offset() -> Result<u32, PyStackError> {
    Ok(btf::task_fsbase_offset().map_err(BpfError::from)?)
}

fn procs_map(bpf: &mut Ebpf) -> Result<BpfHashMap<&mut MapData, u32, PyProcInfo>, BpfError> {
    let map = bpf.map_mut(PY_PROCS_MAP).ok_or(BpfError::MissingMap {
        object: "pystack",
        map: PY_PROCS_MAP,
    })?;
    BpfHashMap::try_from(map).map_err(|source| BpfError::Map {
        map: PY_PROCS_MAP,
        source: Box::new(source),
    })
}

/// Lets the kernel walker unwind process `p` (`bpf` is any object linking
/// `pymedic_ebpf::pystack`).
pub fn register(bpf: &mut Ebpf, p: &PythonProcess) -> Result<PyProcInfo, PyStackError> {
    let info = proc_info(p)?;
    procs_map(bpf)?
        .insert(p.pid, info, 0)
        .map_err(|source| PyStackError::Map {
            pid: p.pid,
            source: Box::new(source),
        })?;
    Ok(info)
}

/// Stops unwinding process `pid` (it exited, or is no longer a target).
pub fn unregister(bpf: &mut Ebpf, pid: u32) -> Result<(), BpfError> {
    let _ = procs_map(bpf)?.remove(&pid);
    Ok(())
}

/// Reads stack `id` from the object's `PY_STACKS` map.
pub fn read_stack(bpf: &Ebpf, id: u64) -> Result<Option<PyStack>, BpfError> {
    let map = bpf.map(PY_STACKS_MAP).ok_or(BpfError::MissingMap {
        object: "pystack",
        map: PY_STACKS_MAP,
    })?;
    let stacks: BpfHashMap<_, u64, PyStack> =
        BpfHashMap::try_from(map).map_err(|source| BpfError::Map {
            map: PY_STACKS_MAP,
            source: Box::new(source),
        })?;
    match stacks.get(&id, 0) {
        Ok(s) => Ok(Some(s)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(BpfError::Map {
            map: PY_STACKS_MAP,
            source: Box::new(source),
        }),
    }
}

/// Byte offset into the bytecode of a captured frame's instruction, as
/// `pymedic_python`'s line tables take it.
pub fn frame_lasti(l: &Layout, f: &PyFrame) -> i64 {
    if l.frame.lasti.is_some() {
        i64::from(f.instr as i32) * i64::from(l.frame.lasti_unit)
    } else {
        i64::from(f.instr as i32)
    }
}

/// Something that decodes code objects of one process (a live interpreter,
/// or recorded memory in tests).
pub trait CodeSource {
    fn layout(&self) -> &'static Layout;
    fn code(&self, addr: u64) -> Option<Arc<Code>>;
    /// Python thread names (`threading.Thread.name`) by kernel tid, given
    /// the process's tids; empty when unknown.
    fn python_thread_names(&self, _task_tids: &[u32]) -> HashMap<u32, String> {
        HashMap::new()
    }
    /// Python stacks (outermost first) of the process's threads by kernel
    /// tid, read from userspace; empty when unknown.
    fn thread_stacks(&self, _task_tids: &[u32]) -> HashMap<u32, Vec<Frame>> {
        HashMap::new()
    }
}

impl<M: pymedic_python::memory::ProcessMemory> CodeSource for Interpreter<M> {
    fn layout(&self) -> &'static Layout {
        Interpreter::layout(self)
    }
    fn code(&self, addr: u64) -> Option<Arc<Code>> {
        Interpreter::code(self, addr).ok()
    }
    fn python_thread_names(&self, task_tids: &[u32]) -> HashMap<u32, String> {
        let Ok(threads) = self.threads() else {
            return HashMap::new();
        };
        let mut names: HashMap<u64, String> = HashMap::new();
        let interps: std::collections::BTreeSet<u64> = threads.iter().map(|t| t.interp).collect();
        for interp in interps {
            if let Ok(n) = Interpreter::thread_names(self, interp) {
                names.extend(n);
            }
        }
        self.native_tids(&threads, task_tids)
            .into_iter()
            .filter_map(|(pthread, tid)| Some((tid, names.get(&pthread)?.clone())))
            .collect()
    }
    fn thread_stacks(&self, task_tids: &[u32]) -> HashMap<u32, Vec<Frame>> {
        let Ok(threads) = self.threads() else {
            return HashMap::new();
        };
        let tids = self.native_tids(&threads, task_tids);
        threads
            .iter()
            .filter_map(|t| {
                let tid = *tids.get(&t.thread_id)?;
                let frames = self.frames(t).ok()?;
                let frames = frames
                    .iter()
                    .rev()
                    .map(|f| Frame {
                        function: f.code.function().to_string(),
                        file: f.code.filename.clone(),
                        line: f.line,
                    })
                    .collect();
                Some((tid, frames))
            })
            .collect()
    }
}

/// Symbolizes one captured frame: `function (file:line)`, or
/// `<unknown code 0x…>` when the code object can no longer be read.
pub fn symbolize_frame(src: &dyn CodeSource, f: &PyFrame) -> Frame {
    match src.code(f.code) {
        Some(code) => Frame {
            function: code.function().to_string(),
            file: code.filename.clone(),
            line: code.line(frame_lasti(src.layout(), f)),
        },
        None => Frame::pseudo(format!("<unknown code {:#x}>", f.code)),
    }
}

/// Symbolizes captured stacks per process; cached by (pid, stack id).
#[derive(Default)]
pub struct Symbolizer {
    procs: HashMap<u32, SymProc>,
}

struct SymProc {
    interp: Box<dyn CodeSource + Send>,
    start_ticks: u64,
    stacks: HashMap<u64, Arc<Vec<Frame>>>,
}

impl Symbolizer {
    pub fn new() -> Symbolizer {
        Symbolizer::default()
    }

    /// Starts symbolizing for `p` (replacing what was known about its pid:
    /// an exec or a reused pid).
    pub fn add_process(&mut self, p: &PythonProcess, start_ticks: u64) {
        match Interpreter::for_process(LiveMemory::new(p.pid), p) {
            Ok(interp) => self.add_source(p.pid, start_ticks, Box::new(interp)),
            Err(e) => tracing::warn!(pid = p.pid, "cannot symbolize: {e}"),
        }
    }

    /// Starts symbolizing `pid` from any code source (tests replay memory).
    pub fn add_source(&mut self, pid: u32, start_ticks: u64, interp: Box<dyn CodeSource + Send>) {
        self.procs.insert(
            pid,
            SymProc {
                interp,
                start_ticks,
                stacks: HashMap::new(),
            },
        );
    }

    /// Forgets `pid` (exit). Stacks it had are symbolized no more.
    pub fn remove_process(&mut self, pid: u32) {
        self.procs.remove(&pid);
    }

    /// Start time (clock ticks) of the process known under `pid`.
    pub fn start_ticks(&self, pid: u32) -> Option<u64> {
        self.procs.get(&pid).map(|p| p.start_ticks)
    }

    /// Python thread names of `pid` by kernel tid (empty when unknown).
    pub fn thread_names(&self, pid: u32) -> HashMap<u32, String> {
        let Some(p) = self.procs.get(&pid) else {
            return HashMap::new();
        };
        let tids = crate::procinfo::thread_ids(pid).unwrap_or_default();
        p.interp.python_thread_names(&tids)
    }

    /// Python stacks of `pid`'s threads by tid, read from userspace now.
    pub fn thread_stacks(&self, pid: u32) -> HashMap<u32, Vec<Frame>> {
        let Some(p) = self.procs.get(&pid) else {
            return HashMap::new();
        };
        let tids = crate::procinfo::thread_ids(pid).unwrap_or_default();
        p.interp.thread_stacks(&tids)
    }

    /// Whether stack `id` of `pid` is already symbolized.
    pub fn has(&self, pid: u32, id: u64) -> bool {
        self.procs
            .get(&pid)
            .is_some_and(|p| p.stacks.contains_key(&id))
    }

    /// Symbolizes (and caches) `stack` as stack `id` of `pid`; frames come
    /// back outermost first.
    pub fn symbolize(&mut self, pid: u32, id: u64, stack: &PyStack) -> Arc<Vec<Frame>> {
        let Some(p) = self.procs.get_mut(&pid) else {
            let frames = stack
                .frames()
                .iter()
                .rev()
                .map(|f| Frame::pseudo(format!("<unknown code {:#x}>", f.code)))
                .collect();
            return Arc::new(frames);
        };
        if let Some(hit) = p.stacks.get(&id) {
            return hit.clone();
        }
        let frames: Vec<Frame> = stack
            .frames()
            .iter()
            .rev()
            .map(|f| symbolize_frame(p.interp.as_ref(), f))
            .collect();
        let frames = Arc::new(frames);
        p.stacks.insert(id, frames.clone());
        frames
    }

    /// A stack already symbolized.
    pub fn cached(&self, pid: u32, id: u64) -> Option<Arc<Vec<Frame>>> {
        self.procs.get(&pid)?.stacks.get(&id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pymedic_common::pystack::{MAX_FRAMES, stack_id};
    use pymedic_python::{FakeMemory, Version};

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn every_layout_fits_the_kernel_walker() {
        for l in layout::LAYOUTS.iter() {
            let info = proc_info_for(l, 0x1000).unwrap_or_else(|| panic!("{:?}", l.version));
            assert!(info.frame_read_len <= FRAME_READ_MAX && info.frame_read_len >= 16);
            assert_eq!(
                info.interp_head_addr,
                0x1000 + u64::from(l.runtime.interpreters_head)
            );
            let pointer = info.flags & PROC_INSTR_IS_POINTER != 0;
            assert_eq!(pointer, l.version >= (3, 11), "{:?}", l.version);
            assert_eq!(info.code_adaptive != NO_OFFSET, l.version >= (3, 11));
            assert_eq!(
                info.cframe_current_frame != NO_OFFSET,
                matches!(l.version, (3, 11) | (3, 12))
            );
            assert_eq!(info.frame_owner != NO_OFFSET, l.version >= (3, 12));
        }
    }

    /// Stacks captured by the real kernel walker on every interpreter
    /// (`agent/tests/pystack_fixture.rs` records them as root), decoded and
    /// symbolized here from the recorded bytes alone.
    #[test]
    fn replays_recorded_stacks() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let doc: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let version = Version::parse(doc["version"].as_str().unwrap()).unwrap();
            let memory = FakeMemory::from_bytes(&unhex(doc["memory"].as_str().unwrap())).unwrap();
            let runtime = doc["runtime_addr"].as_u64().unwrap();
            let interp = Interpreter::new(memory, version, runtime).unwrap();
            for s in doc["stacks"].as_array().unwrap() {
                let bytes = unhex(s["stack"].as_str().unwrap());
                assert_eq!(bytes.len(), std::mem::size_of::<PyStack>());
                // SAFETY: PyStack is plain data; any bytes of its size are a value.
                let stack: PyStack = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
                assert!(stack.len as usize <= MAX_FRAMES);
                let id = u64::from_str_radix(s["id"].as_str().unwrap(), 16).unwrap();
                assert_eq!(stack_id(&stack), id, "{}: stack id", path.display());
                let frames: Vec<String> = stack
                    .frames()
                    .iter()
                    .rev()
                    .map(|f| symbolize_frame(&interp, f).label())
                    .collect();
                let expected: Vec<String> = s["frames"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect();
                assert_eq!(frames, expected, "{}", path.display());
                assert!(
                    frames
                        .iter()
                        .any(|f| f.starts_with("burn_") || f.starts_with("spin ")),
                    "{}: {frames:?}",
                    path.display()
                );
                seen += 1;
            }
        }
        assert!(seen >= 7, "only {seen} recorded stacks replayed");
    }
}
