//! Code objects: names, first line, decoded line table and the names of a
//! frame's local slots, cached by address (validated on every use so a
//! freed and reused address is not mistaken for the old code object).

use std::sync::Arc;

use super::{Interpreter, ReadError, Result};
use crate::linetable::{Format, LineTable};
use crate::memory::{Bytes as _, ProcessMemory};

/// What a slot of a frame's `localsplus` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotKind {
    /// A plain fast local (arguments first).
    Local,
    /// A cell variable (a local captured by an inner function): the slot
    /// holds a cell object once the frame has started.
    Cell,
    /// A free variable (captured from an enclosing function): a cell.
    Free,
}

/// A decoded code object.
#[derive(Clone, Debug)]
pub struct Code {
    pub addr: u64,
    /// `co_filename`, unmodified.
    pub filename: String,
    /// `co_name`.
    pub name: String,
    /// `co_qualname` (3.11+); `co_name` before.
    pub qualname: String,
    pub first_line: u32,
    pub argcount: u32,
    pub posonlyargcount: u32,
    pub kwonlyargcount: u32,
    pub flags: u32,
    /// Names and kinds of the `localsplus` slots, in slot order.
    pub slots: Vec<(String, SlotKind)>,
    pub lines: LineTable,
    /// Pointers that identify this code object's contents (filename, name,
    /// line table, first line), compared on each cache hit.
    key: [u64; 4],
}

impl Code {
    /// The source line of bytecode byte offset `lasti`.
    pub fn line(&self, lasti: i64) -> u32 {
        self.lines.line(lasti)
    }

    /// The function name to show: the qualified name where the interpreter
    /// keeps one.
    pub fn function(&self) -> &str {
        &self.qualname
    }
}

/// Upper bounds that keep a corrupt read from allocating gigabytes.
const MAX_TABLE: usize = 1 << 20;
const MAX_SLOTS: usize = 1 << 16;

impl<M: ProcessMemory> Interpreter<M> {
    /// The code object at `addr` (from the cache when unchanged).
    pub fn code(&self, addr: u64) -> Result<Arc<Code>> {
        let c = &self.layout.code;
        let header = self.mem.read_vec(addr, c.size as usize)?;
        let table_off = c.linetable.or(c.lnotab).unwrap_or(0);
        let key = [
            header.u64_at(c.filename),
            header.u64_at(c.name),
            header.u64_at(table_off),
            u64::from(header.u32_at(c.firstlineno)),
        ];
        if let Some(hit) = self.codes.borrow().get(&addr)
            && hit.key == key
        {
            return Ok(hit.clone());
        }
        let code = Arc::new(self.decode_code(addr, &header, key)?);
        self.codes.borrow_mut().insert(addr, code.clone());
        Ok(code)
    }

    fn decode_code(&self, addr: u64, h: &[u8], key: [u64; 4]) -> Result<Code> {
        let c = &self.layout.code;
        let type_name = self
            .type_info(h.u64_at(self.layout.object.type_))?
            .name
            .clone();
        if type_name != "code" {
            return Err(ReadError::invalid(
                "code object",
                addr,
                format!("its type is {type_name:?}"),
            ));
        }
        let filename = self.read_str(key[0])?;
        let name = self.read_str(key[1])?;
        let qualname = match c.qualname {
            Some(off) => self.read_str(h.u64_at(off))?,
            None => name.clone(),
        };
        let first_line = h.i32_at(c.firstlineno).max(0) as u32;
        let table = self.read_bytes_obj(key[2], MAX_TABLE)?;
        let lines = LineTable::decode(Format::for_minor(self.minor()), &table, first_line);
        let slots = self.code_slots(addr, h)?;
        Ok(Code {
            addr,
            filename,
            name,
            qualname,
            first_line,
            argcount: h.u32_at(c.argcount),
            posonlyargcount: h.u32_at(c.posonlyargcount),
            kwonlyargcount: h.u32_at(c.kwonlyargcount),
            flags: h.u32_at(c.flags),
            slots,
            lines,
            key,
        })
    }

    fn code_slots(&self, addr: u64, h: &[u8]) -> Result<Vec<(String, SlotKind)>> {
        let c = &self.layout.code;
        let names_of = |tuple: u64| -> Result<Vec<String>> {
            let items = self.tuple_items(tuple, MAX_SLOTS)?;
            items.into_iter().map(|s| self.read_str(s)).collect()
        };
        if let (Some(names), Some(kinds)) = (c.localsplusnames, c.localspluskinds) {
            let names = names_of(h.u64_at(names))?;
            let kinds = self.read_bytes_obj(h.u64_at(kinds), MAX_SLOTS)?;
            if kinds.len() != names.len() {
                return Err(ReadError::invalid(
                    "code object",
                    addr,
                    "co_localspluskinds and co_localsplusnames differ in length",
                ));
            }
            let free = c.fast_free.unwrap_or(0x80) as u8;
            let cell = c.fast_cell.unwrap_or(0x40) as u8;
            return Ok(names
                .into_iter()
                .zip(kinds)
                .map(|(n, k)| {
                    let kind = if k & free != 0 {
                        SlotKind::Free
                    } else if k & cell != 0 {
                        SlotKind::Cell
                    } else {
                        SlotKind::Local
                    };
                    (n, kind)
                })
                .collect());
        }
        let (Some(var), Some(cellv), Some(freev)) = (c.varnames, c.cellvars, c.freevars) else {
            return Ok(Vec::new());
        };
        let nlocals = h.i32_at(c.nlocals).max(0) as usize;
        let mut out: Vec<(String, SlotKind)> = names_of(h.u64_at(var))?
            .into_iter()
            .take(nlocals)
            .map(|n| (n, SlotKind::Local))
            .collect();
        out.extend(
            names_of(h.u64_at(cellv))?
                .into_iter()
                .map(|n| (n, SlotKind::Cell)),
        );
        out.extend(
            names_of(h.u64_at(freev))?
                .into_iter()
                .map(|n| (n, SlotKind::Free)),
        );
        Ok(out)
    }
}
