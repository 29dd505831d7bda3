//! `--native`: native stacks, unwound with libunwind-ptrace (through
//! `remoteprocess`) while the process is paused, symbolised from the ELF
//! files' symbol tables and DWARF, and merged with the Python frames: each
//! activation of the interpreter loop (`_PyEval_EvalFrameDefault`) is
//! replaced by the Python frames it runs (every frame up to the next entry
//! frame, since 3.11 runs Python-to-Python calls in one activation).

use std::collections::HashMap;

use pymedic_python::Frame;

use super::model::{FrameDump, FrameKind};

/// One native frame.
#[derive(Clone, Debug)]
pub struct NativeFrame {
    pub addr: u64,
    pub function: Option<String>,
    /// Source file (with DWARF) or the ELF file.
    pub file: String,
    pub line: u32,
}

/// Pauses `pid` (ptrace-attaching every thread) until dropped.
pub struct Paused {
    _lock: remoteprocess::Lock,
}

/// Stops every thread of `pid`; they resume when the guard drops.
pub fn pause(pid: u32) -> Result<(remoteprocess::Process, Paused), remoteprocess::Error> {
    let process = remoteprocess::Process::new(pid as remoteprocess::Pid)?;
    let lock = process.lock()?;
    Ok((process, Paused { _lock: lock }))
}

/// Unwinds and symbolises every thread in `tids` of a paused process.
pub fn unwind(
    process: &remoteprocess::Process,
    tids: &[u32],
) -> Result<HashMap<u32, Vec<NativeFrame>>, String> {
    let unwinder = process.unwinder().map_err(|e| format!("libunwind: {e}"))?;
    let symbolicator = process
        .symbolicator()
        .map_err(|e| format!("symbols: {e}"))?;
    let mut out = HashMap::new();
    for &tid in tids {
        let thread = remoteprocess::Thread::new(tid as i32).map_err(|e| e.to_string())?;
        let mut frames = Vec::new();
        let cursor = match unwinder.cursor(&thread) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("unwinding tid {tid}: {e}");
                continue;
            }
        };
        for ip in cursor.take(512) {
            let Ok(ip) = ip else { break };
            let mut got = false;
            let _ = symbolicator.symbolicate(ip, true, &mut |sf| {
                got = true;
                frames.push(NativeFrame {
                    addr: ip,
                    function: sf.function.clone(),
                    file: sf.filename.clone().unwrap_or_else(|| sf.module.clone()),
                    line: sf.line.unwrap_or(0) as u32,
                });
            });
            if !got {
                frames.push(NativeFrame {
                    addr: ip,
                    function: None,
                    file: "?".into(),
                    line: 0,
                });
            }
        }
        out.insert(tid, frames);
    }
    Ok(out)
}

/// True for the interpreter loop's native frame.
pub fn is_eval_frame(f: &NativeFrame) -> bool {
    f.function.as_deref().is_some_and(|n| {
        n.starts_with("_PyEval_EvalFrameDefault") || n.starts_with("PyEval_EvalFrameEx")
    })
}

/// Interleaves `native` (innermost first) with `python` (innermost first,
/// already converted to dumps in `py`). Returns the merged stack and
/// whether every Python frame found an interpreter-loop frame.
pub fn merge(native: &[NativeFrame], python: &[Frame], py: &[FrameDump]) -> (Vec<FrameDump>, bool) {
    let mut out = Vec::new();
    let mut next_py = 0;
    for n in native {
        if is_eval_frame(n) && next_py < python.len() {
            // One activation runs Python frames up to the next entry frame.
            while next_py < python.len() {
                out.push(py[next_py].clone());
                let entry = python[next_py].is_entry;
                next_py += 1;
                if entry {
                    break;
                }
            }
            continue;
        }
        out.push(FrameDump {
            kind: FrameKind::Native,
            file: n.file.clone(),
            function: n
                .function
                .clone()
                .unwrap_or_else(|| format!("{:#x}", n.addr)),
            line: n.line,
            addr: Some(n.addr),
            locals: None,
        });
    }
    let complete = next_py == python.len();
    // Python frames no native activation accounted for go at the bottom.
    out.extend(py[next_py..].iter().cloned());
    (out, complete)
}
