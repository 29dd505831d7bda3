//! Walking a thread's Python frames: `PyFrameObject.f_back` (3.8–3.10) or
//! `_PyInterpreterFrame.previous` (3.11+), innermost first; shim frames that
//! 3.12+ pushes on entry from C are skipped (the frame above one is marked
//! as an entry frame), and so are frames whose code is not a code object.

use std::sync::Arc;

use super::{Code, Interpreter, PyThread, ReadError, Result, SlotKind};
use crate::memory::{Bytes as _, ProcessMemory};

/// Frames deeper than this are not read (a cycle or a runaway recursion).
pub const MAX_DEPTH: usize = 4096;

/// One Python frame.
#[derive(Clone, Debug)]
pub struct Frame {
    /// Address of the `PyFrameObject` / `_PyInterpreterFrame`.
    pub addr: u64,
    pub code: Arc<Code>,
    /// Bytecode byte offset of the instruction executing (negative: not
    /// started yet).
    pub lasti: i64,
    /// 1-based source line.
    pub line: u32,
    /// True when a C function called into the interpreter to run this
    /// frame: one native `_PyEval_EvalFrameDefault` activation runs every
    /// frame from here up to the next entry frame (3.11+); before 3.11
    /// every frame is an entry frame.
    pub is_entry: bool,
    pub globals: u64,
    pub builtins: u64,
    /// `f_locals`: a dict for module and class bodies, else usually NULL.
    pub locals: u64,
    /// Address of the `localsplus` array.
    pub localsplus: u64,
}

/// A named local slot of a frame and the object it holds (0 when unbound).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub name: String,
    pub kind: SlotKind,
    /// The object, with cells already dereferenced.
    pub value: u64,
}

impl<M: ProcessMemory> Interpreter<M> {
    /// The innermost frame of `thread` (0 when it runs no Python code).
    pub(crate) fn top_frame(&self, tstate: u64) -> Result<u64> {
        let t = &self.layout.thread;
        if let Some(off) = t.frame.or(t.current_frame) {
            return self.ptr(tstate + u64::from(off));
        }
        let (Some(cframe), Some(current)) = (t.cframe, t.cframe_current_frame) else {
            return Err(ReadError::Unsupported(self.version().clone()));
        };
        let cf = self.ptr(tstate + u64::from(cframe))?;
        if cf == 0 {
            return Ok(0);
        }
        self.ptr(cf + u64::from(current))
    }

    /// `thread`'s Python stack, innermost frame first.
    pub fn frames(&self, thread: &PyThread) -> Result<Vec<Frame>> {
        self.frames_from(thread.frame)
    }

    /// The stack starting at frame address `top`, innermost first.
    pub fn frames_from(&self, top: u64) -> Result<Vec<Frame>> {
        let f = &self.layout.frame;
        let mut out: Vec<Frame> = Vec::new();
        let mut addr = top;
        let mut seen = 0usize;
        while addr != 0 {
            seen += 1;
            if seen > MAX_DEPTH {
                return Err(ReadError::invalid(
                    "frame chain",
                    top,
                    format!("more than {MAX_DEPTH} frames (a cycle?)"),
                ));
            }
            let b = self.mem.read_vec(addr, f.size as usize)?;
            let previous = b.u64_at(f.previous);
            if let (Some(owner), Some(cstack)) = (f.owner, f.owner_cstack)
                && u32::from(b.u8_at(owner)) == cstack
            {
                // A shim frame: the frame above it was entered from C.
                if let Some(last) = out.last_mut() {
                    last.is_entry = true;
                }
                addr = previous;
                continue;
            }
            let code_addr = b.u64_at(f.code);
            let code = match self.code(code_addr) {
                Ok(c) => c,
                // 3.13 frames may run non-code executables; skip them.
                Err(ReadError::Invalid { .. }) if !f.is_object => {
                    addr = previous;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let lasti = self.lasti(&b, code_addr);
            let is_entry = match f.is_entry {
                Some(off) => b.u8_at(off) != 0,
                None => f.is_object,
            };
            out.push(Frame {
                addr,
                line: code.line(lasti),
                code,
                lasti,
                is_entry,
                globals: b.u64_at(f.globals),
                builtins: b.u64_at(f.builtins),
                locals: b.u64_at(f.locals),
                localsplus: addr + u64::from(f.localsplus),
            });
            addr = previous;
        }
        Ok(out)
    }

    /// Bytecode byte offset of the instruction a frame executes.
    fn lasti(&self, b: &[u8], code_addr: u64) -> i64 {
        let f = &self.layout.frame;
        if let Some(off) = f.lasti {
            return i64::from(b.i32_at(off)) * i64::from(f.lasti_unit);
        }
        let ptr = f
            .prev_instr
            .or(f.instr_ptr)
            .map(|o| b.u64_at(o))
            .unwrap_or(0);
        let start = code_addr + u64::from(self.layout.code.code_adaptive.unwrap_or(0));
        ptr.wrapping_sub(start) as i64
    }

    /// The frame's named local slots (arguments, locals, cells, free
    /// variables) with their current objects; cells are dereferenced.
    pub fn frame_slots(&self, frame: &Frame) -> Result<Vec<Slot>> {
        let n = frame.code.slots.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let raw = self.mem.read_vec(frame.localsplus, n * 8)?;
        let mut out = Vec::with_capacity(n);
        for (i, (name, kind)) in frame.code.slots.iter().enumerate() {
            let mut value = raw.u64_at((i * 8) as u32);
            if *kind != SlotKind::Local && value != 0 && self.is_cell(value) {
                value = self.cell_contents(value)?;
            }
            out.push(Slot {
                name: name.clone(),
                kind: *kind,
                value,
            });
        }
        Ok(out)
    }

    /// Resolves `name` as the frame's code would: fast locals, cells and
    /// free variables, `f_locals` (module and class bodies), globals, then
    /// builtins. `None` when unbound.
    pub fn lookup_name(&self, frame: &Frame, name: &str) -> Result<Option<u64>> {
        if let Some(slot) = frame.code.slots.iter().position(|(n, _)| n == name) {
            let slots = self.frame_slots(frame)?;
            let v = slots[slot].value;
            return Ok((v != 0).then_some(v));
        }
        for dict in [frame.locals, frame.globals, frame.builtins] {
            if dict != 0
                && self.is_dict(dict)
                && let Some(v) = self.dict_get_str(dict, name)?
            {
                return Ok(Some(v));
            }
        }
        // Builtins may be the builtins module rather than its dict.
        if frame.builtins != 0 && !self.is_dict(frame.builtins) {
            return self.getattr(frame.builtins, name);
        }
        Ok(None)
    }
}
