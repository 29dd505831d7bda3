//! Builds fake interpreter memory from a [`Layout`], so decoding (threads,
//! frames, code, strings, dicts, attributes) is unit-tested for every
//! version without a live process. Objects are laid out exactly where the
//! layout table says CPython keeps them; the result is a [`FakeMemory`]
//! and an [`Interpreter`] over it.
//!
//! This is a test aid, public so that crates above (the agent's deadlock
//! analysis) can build scenarios too.

use std::collections::HashMap;

use crate::interp::Interpreter;
use crate::layout::Layout;
use crate::memory::FakeMemory;
use crate::version::Version;

const BASE: u64 = 0x7f00_0000_0000;

/// A fake interpreter under construction.
pub struct FakeInterp {
    layout: &'static Layout,
    arena: Vec<u8>,
    types: HashMap<String, u64>,
    pub runtime: u64,
    pub interp: u64,
    threads: Vec<u64>,
    none: u64,
}

/// What a frame to build contains.
pub struct FakeFrame<'a> {
    pub code: u64,
    /// Bytecode byte offset of the executing instruction.
    pub lasti: i64,
    pub globals: u64,
    /// Values of the code's slots, in slot order (cells already wrapped).
    pub slots: &'a [u64],
}

impl FakeInterp {
    pub fn new(layout: &'static Layout) -> FakeInterp {
        let mut f = FakeInterp {
            layout,
            arena: Vec::new(),
            types: HashMap::new(),
            runtime: 0,
            interp: 0,
            threads: Vec::new(),
            none: 0,
        };
        f.runtime = f.alloc(4096);
        f.interp = f.alloc(16384);
        let head = f.runtime + u64::from(layout.runtime.interpreters_head);
        f.put_u64(head, f.interp);
        for name in [
            "str", "bytes", "tuple", "list", "dict", "int", "bool", "float", "code", "cell",
            "module", "NoneType", "function",
        ] {
            let basic = match name {
                "module" => 64,
                _ => 32,
            };
            f.new_type(name, 0, basic, 0);
        }
        f.none = f.object("NoneType", 16);
        let modules = f.dict(&[]);
        f.put_u64(f.interp + u64::from(layout.interp.modules), modules);
        f
    }

    pub fn layout(&self) -> &'static Layout {
        self.layout
    }

    /// Allocates `size` zeroed bytes (plus a 32-byte pre-header before
    /// them, where 3.11+ keeps managed dict pointers), 16-aligned.
    pub fn alloc(&mut self, size: usize) -> u64 {
        let pre = 32;
        let start = (self.arena.len() + pre + 15) & !15;
        self.arena.resize(start + size.max(8), 0);
        BASE + start as u64
    }

    fn at(&mut self, addr: u64, len: usize) -> &mut [u8] {
        let o = (addr - BASE) as usize;
        &mut self.arena[o..o + len]
    }

    pub fn put_u64(&mut self, addr: u64, v: u64) {
        self.at(addr, 8).copy_from_slice(&v.to_le_bytes());
    }

    pub fn put_u32(&mut self, addr: u64, v: u32) {
        self.at(addr, 4).copy_from_slice(&v.to_le_bytes());
    }

    pub fn put_u8(&mut self, addr: u64, v: u8) {
        self.at(addr, 1)[0] = v;
    }

    pub fn put_bytes(&mut self, addr: u64, b: &[u8]) {
        self.at(addr, b.len()).copy_from_slice(b);
    }

    /// A type object named `name`.
    pub fn new_type(&mut self, name: &str, flags: u64, basicsize: i64, dictoffset: i64) -> u64 {
        let t = &self.layout.type_;
        let ty = self.alloc(1024);
        let cname = self.alloc(name.len() + 1);
        self.put_bytes(cname, name.as_bytes());
        self.put_u64(ty + u64::from(t.name), cname);
        self.put_u64(ty + u64::from(t.flags), flags);
        self.put_u64(ty + u64::from(t.basicsize), basicsize as u64);
        self.put_u64(ty + u64::from(t.dictoffset), dictoffset as u64);
        self.types.insert(name.to_owned(), ty);
        ty
    }

    pub fn type_addr(&self, name: &str) -> u64 {
        self.types[name]
    }

    /// An object of type `ty_name` with `size` bytes.
    pub fn object(&mut self, ty_name: &str, size: usize) -> u64 {
        let ty = self.types[ty_name];
        self.object_of(ty, size)
    }

    pub fn object_of(&mut self, ty: u64, size: usize) -> u64 {
        let o = self.alloc(size);
        self.put_u64(o + u64::from(self.layout.object.refcnt), 1);
        self.put_u64(o + u64::from(self.layout.object.type_), ty);
        o
    }

    pub fn none(&self) -> u64 {
        self.none
    }

    /// A `str` (compact; ASCII, UCS-1, UCS-2 or UCS-4 as CPython picks).
    pub fn str(&mut self, s: &str) -> u64 {
        let u = &self.layout.unicode;
        let max = s.chars().map(u32::from).max().unwrap_or(0);
        let (kind, ascii) = match max {
            0..=0x7f => (1u32, true),
            0x80..=0xff => (1, false),
            0x100..=0xffff => (2, false),
            _ => (4, false),
        };
        let header = if ascii { u.ascii_size } else { u.compact_size } as usize;
        let n = s.chars().count();
        let o = self.object("str", header + (n + 1) * kind as usize);
        self.put_u64(o + u64::from(u.length), n as u64);
        let state =
            (kind << u.kind_shift) | (1 << u.compact_bit) | (u32::from(ascii) << u.ascii_bit);
        self.put_u32(o + u64::from(u.state), state);
        let data = o + header as u64;
        for (i, c) in s.chars().enumerate() {
            let c = u32::from(c);
            let at = data + (i * kind as usize) as u64;
            match kind {
                1 => self.put_u8(at, c as u8),
                2 => self.put_bytes(at, &(c as u16).to_le_bytes()),
                _ => self.put_u32(at, c),
            }
        }
        o
    }

    pub fn bytes(&mut self, b: &[u8]) -> u64 {
        let l = &self.layout.bytes;
        let o = self.object("bytes", l.sval as usize + b.len() + 1);
        self.put_u64(o + u64::from(l.size), b.len() as u64);
        self.put_bytes(o + u64::from(l.sval), b);
        o
    }

    pub fn tuple(&mut self, items: &[u64]) -> u64 {
        let l = &self.layout.tuple;
        let o = self.object("tuple", l.items as usize + 8 * items.len());
        self.put_u64(o + u64::from(l.size), items.len() as u64);
        for (i, &it) in items.iter().enumerate() {
            self.put_u64(o + u64::from(l.items) + 8 * i as u64, it);
        }
        o
    }

    pub fn int(&mut self, v: i64) -> u64 {
        let l = &self.layout.long;
        let mut digits = Vec::new();
        let mut m = v.unsigned_abs();
        while m > 0 {
            digits.push((m & ((1 << l.digit_bits) - 1)) as u32);
            m >>= l.digit_bits;
        }
        let o = self.object("int", l.digits as usize + 4 * digits.len().max(1));
        let word = if l.tagged {
            let sign = match v.signum() {
                0 => 1,
                1 => 0,
                _ => 2,
            };
            ((digits.len() as u64) << 3) | sign
        } else {
            (digits.len() as i64 * v.signum()) as u64
        };
        self.put_u64(o + u64::from(l.size_or_tag), word);
        for (i, d) in digits.iter().enumerate() {
            self.put_u32(o + u64::from(l.digits) + 4 * i as u64, *d);
        }
        o
    }

    pub fn cell(&mut self, value: u64) -> u64 {
        let o = self.object("cell", 32);
        self.put_u64(o + u64::from(self.layout.cell.ob_ref), value);
        o
    }

    /// A keys object with `keys` (values stored in the entries unless
    /// `split`), in the version's format. Returns the keys address.
    pub fn dict_keys(&mut self, entries: &[(u64, u64)], unicode: bool, split: bool) -> u64 {
        let k = &self.layout.dict_keys;
        let slots = entries.len().next_power_of_two().max(8) * 2;
        let general = !unicode || k.dk_kind.is_none();
        let (esize, ekey, evalue) = if general {
            (k.entry_size, k.entry_key, k.entry_value)
        } else {
            (
                k.unicode_entry_size.unwrap(),
                k.unicode_entry_key.unwrap(),
                k.unicode_entry_value.unwrap(),
            )
        };
        let index_bytes = slots; // 1 byte per index while slots <= 0xff
        let o = self.alloc(k.dk_indices as usize + index_bytes + esize as usize * entries.len());
        if let Some(off) = k.dk_size {
            self.put_u64(o + u64::from(off), slots as u64);
        }
        if let (Some(l2), Some(l2i), Some(kind)) =
            (k.dk_log2_size, k.dk_log2_index_bytes, k.dk_kind)
        {
            let log2 = slots.trailing_zeros() as u8;
            self.put_u8(o + u64::from(l2), log2);
            self.put_u8(o + u64::from(l2i), log2);
            let kind_v = if general {
                0
            } else if split {
                2
            } else {
                1
            };
            self.put_u8(o + u64::from(kind), kind_v);
        }
        self.put_u64(o + u64::from(k.dk_nentries), entries.len() as u64);
        let at = o + u64::from(k.dk_indices) + index_bytes as u64;
        for (i, &(key, value)) in entries.iter().enumerate() {
            let e = at + (i as u64) * u64::from(esize);
            self.put_u64(e + u64::from(ekey), key);
            if !split {
                self.put_u64(e + u64::from(evalue), value);
            }
        }
        o
    }

    /// A split-table values array for `values` (version's format).
    pub fn dict_values(&mut self, values: &[u64]) -> u64 {
        let off = self.layout.dict_keys.values_items.unwrap_or(0);
        let o = self.alloc(off as usize + 8 * values.len());
        if off >= 4 {
            // 3.13 PyDictValues: capacity, size, embedded, valid.
            self.put_bytes(o, &[values.len() as u8, values.len() as u8, 0, 1]);
        }
        for (i, &v) in values.iter().enumerate() {
            self.put_u64(o + u64::from(off) + 8 * i as u64, v);
        }
        o
    }

    /// A combined dict.
    pub fn dict(&mut self, entries: &[(u64, u64)]) -> u64 {
        let unicode = entries.iter().all(|&(k, _)| self.is_str(k));
        let keys = self.dict_keys(entries, unicode, false);
        let d = &self.layout.dict;
        let o = self.object("dict", (d.values + 8) as usize);
        self.put_u64(o + u64::from(d.used), entries.len() as u64);
        self.put_u64(o + u64::from(d.keys), keys);
        o
    }

    fn is_str(&self, obj: u64) -> bool {
        let o = (obj - BASE) as usize + self.layout.object.type_ as usize;
        let ty = u64::from_le_bytes(self.arena[o..o + 8].try_into().unwrap());
        ty == self.types["str"]
    }

    /// Inserts `name: value` into the dict `sys.modules`.
    pub fn add_module(&mut self, name: &str, globals: &[(&str, u64)]) -> u64 {
        let entries: Vec<(u64, u64)> = globals.iter().map(|&(k, v)| (self.str(k), v)).collect();
        let md = self.dict(&entries);
        let m = self.object("module", 64);
        self.put_u64(m + u64::from(self.layout.module.dict), md);
        let modules_at = self.interp + u64::from(self.layout.interp.modules);
        let old = u64::from_le_bytes(self.at(modules_at, 8).to_vec().try_into().unwrap());
        let mut entries = self.dict_pairs(old);
        entries.push((self.str(name), m));
        let new = self.dict(&entries);
        self.put_u64(modules_at, new);
        m
    }

    fn dict_pairs(&mut self, dict: u64) -> Vec<(u64, u64)> {
        let interp = Interpreter::new(
            self.memory(),
            Version::new(3, self.layout.version.1, None),
            self.runtime,
        )
        .expect("layout");
        interp.dict_entries(dict, 1 << 16).expect("fake dict")
    }

    /// A code object. `slots` are (name, kind byte per CO_FAST_*) for 3.11+;
    /// for 3.8–3.10 kinds 0x20 are varnames, 0x40 cellvars, 0x80 freevars.
    pub fn code(
        &mut self,
        filename: &str,
        name: &str,
        first_line: u32,
        table: &[u8],
        slots: &[(&str, u8)],
    ) -> u64 {
        let c = &self.layout.code;
        let o = self.object("code", c.size as usize + 64);
        let f = self.str(filename);
        let n = self.str(name);
        let t = self.bytes(table);
        self.put_u64(o + u64::from(c.filename), f);
        self.put_u64(o + u64::from(c.name), n);
        if let Some(q) = c.qualname {
            let qs = self.str(name);
            self.put_u64(o + u64::from(q), qs);
        }
        self.put_u64(o + u64::from(c.linetable.or(c.lnotab).unwrap()), t);
        self.put_u32(o + u64::from(c.firstlineno), first_line);
        let names: Vec<u64> = slots.iter().map(|(s, _)| self.str(s)).collect();
        if let (Some(lpn), Some(lpk)) = (c.localsplusnames, c.localspluskinds) {
            let tuple = self.tuple(&names);
            let kinds: Vec<u8> = slots.iter().map(|s| s.1).collect();
            let kb = self.bytes(&kinds);
            self.put_u64(o + u64::from(lpn), tuple);
            self.put_u64(o + u64::from(lpk), kb);
        } else {
            let pick = |k: u8| -> Vec<u64> {
                slots
                    .iter()
                    .zip(&names)
                    .filter(|(s, _)| s.1 & k != 0)
                    .map(|(_, &n)| n)
                    .collect()
            };
            let (v, ce, fr) = (pick(0x20), pick(0x40), pick(0x80));
            let nlocals = v.len() as u32;
            let (tv, tc, tf) = (self.tuple(&v), self.tuple(&ce), self.tuple(&fr));
            self.put_u64(o + u64::from(c.varnames.unwrap()), tv);
            self.put_u64(o + u64::from(c.cellvars.unwrap()), tc);
            self.put_u64(o + u64::from(c.freevars.unwrap()), tf);
            self.put_u32(o + u64::from(c.nlocals), nlocals);
        }
        o
    }

    /// A frame running `spec.code`, called from `previous`.
    pub fn frame(&mut self, spec: &FakeFrame<'_>, previous: u64) -> u64 {
        let f = &self.layout.frame;
        let o = if f.is_object {
            self.object("NoneType", f.size as usize + 8 * spec.slots.len())
        } else {
            self.alloc(f.size as usize + 8 * spec.slots.len())
        };
        self.put_u64(o + u64::from(f.previous), previous);
        self.put_u64(o + u64::from(f.code), spec.code);
        self.put_u64(o + u64::from(f.globals), spec.globals);
        if let Some(off) = f.lasti {
            self.put_u32(
                o + u64::from(off),
                (spec.lasti / i64::from(f.lasti_unit)) as u32,
            );
        }
        if let Some(off) = f.prev_instr.or(f.instr_ptr) {
            let start = spec.code + u64::from(self.layout.code.code_adaptive.unwrap());
            self.put_u64(o + u64::from(off), start.wrapping_add(spec.lasti as u64));
        }
        for (i, &v) in spec.slots.iter().enumerate() {
            self.put_u64(o + u64::from(f.localsplus) + 8 * i as u64, v);
        }
        o
    }

    /// A 3.12+ shim frame (owned by the C stack) called from `previous`.
    pub fn shim_frame(&mut self, previous: u64) -> u64 {
        let f = &self.layout.frame;
        let o = self.alloc(f.size as usize);
        self.put_u64(o + u64::from(f.previous), previous);
        self.put_u8(
            o + u64::from(f.owner.unwrap()),
            f.owner_cstack.unwrap() as u8,
        );
        o
    }

    /// Adds a thread (first added is the list head) whose innermost frame
    /// is `top`.
    pub fn thread(&mut self, thread_id: u64, native_tid: u32, top: u64) -> u64 {
        let t = &self.layout.thread;
        let ts = self.alloc(t.size as usize);
        self.put_u64(ts + u64::from(t.thread_id), thread_id);
        self.put_u64(ts + u64::from(t.interp), self.interp);
        if let Some(off) = t.native_thread_id {
            self.put_u32(ts + u64::from(off), native_tid);
        }
        if let Some(off) = t.frame.or(t.current_frame) {
            self.put_u64(ts + u64::from(off), top);
        } else {
            let cf = self.alloc(64);
            self.put_u64(cf + u64::from(t.cframe_current_frame.unwrap()), top);
            self.put_u64(ts + u64::from(t.cframe.unwrap()), cf);
        }
        match self.threads.last() {
            Some(&prev) => self.put_u64(prev + u64::from(t.next), ts),
            None => {
                let head = self.interp + u64::from(self.layout.interp.threads_head);
                self.put_u64(head, ts);
            }
        }
        self.threads.push(ts);
        ts
    }

    /// Marks `tstate` as holding the GIL.
    pub fn set_gil_holder(&mut self, tstate: u64) {
        if let Some(off) = self.layout.runtime.gilstate_tstate_current {
            self.put_u64(self.runtime + u64::from(off), tstate);
        }
        if let Some(off) = self.layout.interp.ceval_gil {
            let g = &self.layout.gil;
            let gil = self.alloc(64);
            self.put_u32(gil + u64::from(g.locked), 1);
            self.put_u64(gil + u64::from(g.last_holder), tstate);
            self.put_u64(self.interp + u64::from(off), gil);
        }
    }

    /// The memory built so far.
    pub fn memory(&self) -> FakeMemory {
        let mut m = FakeMemory::new();
        m.insert(BASE, self.arena.clone());
        m
    }

    /// An interpreter reading the memory built so far.
    pub fn interpreter(&self) -> Interpreter<FakeMemory> {
        Interpreter::new(
            self.memory(),
            Version::new(3, self.layout.version.1, None),
            self.runtime,
        )
        .expect("every layout has a version")
    }
}
