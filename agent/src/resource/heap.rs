//! Growing containers, found by reading the target's heap from outside.
//!
//! A leak in Python is almost always a long-lived container that keeps
//! getting entries: a module-level dict used as a cache, a class attribute
//! list of callbacks, an attribute of a module-level object, an unbounded
//! `lru_cache`, a closure's captured dict, a local of a thread's main loop.
//! [`HeapScanner::scan`] walks those roots (every module in `sys.modules`:
//! its globals, its classes' attributes, its objects' attributes two levels
//! deep, functions' closures and `lru_cache` wrappers; every thread's frame
//! locals) and remembers each `dict`, `list`, `set` and `deque` (subclasses
//! included) under the name a person would use: `app.cache`,
//! `app.Registry.items`, `app.service.sessions`, `worker() local pending`.
//! [`HeapScanner::sample`] then re-reads only their lengths, in a few
//! batched `process_vm_readv` calls, into a [`Series`] per container.
//!
//! Nothing stops the target; a read racing a resize is dropped, and a
//! container whose type changed (freed, address reused) is forgotten.

use std::collections::{HashMap, HashSet};

use pymedic_python::interp::{Interpreter, ReadError};
use pymedic_python::memory::{LiveMemory, ProcessMemory};
use pymedic_python::{Layout, PythonProcess};

use super::trend::Series;

/// Containers followed at most per process.
pub const MAX_CONTAINERS: usize = 20_000;
/// Objects looked at per scan at most.
const MAX_VISITS: usize = 100_000;
/// Entries of one module, class or instance dict looked at.
const MAX_ATTRS: usize = 4096;
/// A dict this small has its values looked into (nested containers).
const NESTED_DICT_MAX: u64 = 256;
/// Length series kept per container.
const SERIES_POINTS: usize = 96;

const TPFLAGS_HEAPTYPE: u64 = 1 << 9;
const TPFLAGS_LIST_SUBCLASS: u64 = 1 << 25;
const TPFLAGS_TUPLE_SUBCLASS: u64 = 1 << 26;
const TPFLAGS_BYTES_SUBCLASS: u64 = 1 << 27;
const TPFLAGS_UNICODE_SUBCLASS: u64 = 1 << 28;
const TPFLAGS_DICT_SUBCLASS: u64 = 1 << 29;
const TPFLAGS_BASE_EXC_SUBCLASS: u64 = 1 << 30;
const TPFLAGS_TYPE_SUBCLASS: u64 = 1 << 31;
const TPFLAGS_LONG_SUBCLASS: u64 = 1 << 24;

/// What kind of container.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Dict,
    List,
    Set,
    Deque,
}

/// How an object is looked into during a scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TypeKind {
    Container(Kind),
    Module,
    Instance,
    Function,
    LruCache,
    Other,
}

/// One followed container.
#[derive(Clone, Debug)]
pub struct Container {
    pub addr: u64,
    pub type_addr: u64,
    pub kind: Kind,
    /// `tp_name`: `dict`, `collections.OrderedDict`, `collections.deque`, ...
    pub type_name: String,
    /// How to reach it: `app.cache`, `app.Registry.items`, ...
    pub name: String,
    /// `maxlen` of a deque or `maxsize` of an `lru_cache`, when bounded.
    pub bound: Option<i64>,
    /// Length over time (seconds since the scanner started).
    pub series: Series,
}

/// Scans one process's heap; see the module docs.
pub struct HeapScanner {
    pid: u32,
    interp: Interpreter<LiveMemory>,
    layout: &'static Layout,
    kinds: HashMap<u64, TypeKind>,
    containers: HashMap<u64, Container>,
}

impl HeapScanner {
    pub fn new(p: &PythonProcess) -> Result<HeapScanner, ReadError> {
        let interp = Interpreter::for_process(LiveMemory::new(p.pid), p)?;
        Ok(HeapScanner {
            pid: p.pid,
            layout: interp.layout(),
            interp,
            kinds: HashMap::new(),
            containers: HashMap::new(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn interp(&self) -> &Interpreter<LiveMemory> {
        &self.interp
    }

    /// The containers followed.
    pub fn containers(&self) -> impl Iterator<Item = &Container> {
        self.containers.values()
    }

    pub fn container(&self, addr: u64) -> Option<&Container> {
        self.containers.get(&addr)
    }

    /// Walks the roots and starts following new containers. Returns how
    /// many containers are followed.
    pub fn scan(&mut self) -> Result<usize, ReadError> {
        // Types and code objects may have been freed and their addresses
        // reused since the last scan.
        self.interp.clear_caches();
        self.kinds.clear();
        let mut w = Walk {
            visited: HashSet::new(),
            found: Vec::new(),
        };
        let interps = self.interp.interpreters()?;
        let main = interps[0];
        let modules = self
            .interp
            .memory()
            .read_u64(main + u64::from(self.layout.interp.modules))?;
        if modules != 0 && self.interp.is_dict(modules) {
            let mut mods = self.interp.dict_entries(modules, MAX_ATTRS)?;
            // `__main__` first: its names win for objects reachable twice.
            mods.sort_by_key(|&(k, _)| self.interp.read_str(k).map(|s| s != "__main__").ok());
            for (key, module) in mods {
                let Ok(name) = self.interp.read_str(key) else {
                    continue;
                };
                if self.kind(module) != TypeKind::Module {
                    continue;
                }
                let dict = self
                    .interp
                    .memory()
                    .read_u64(module + u64::from(self.layout.module.dict))?;
                if dict == 0 || !w.visited.insert(dict) {
                    continue;
                }
                for (k, v) in self
                    .interp
                    .dict_entries(dict, MAX_ATTRS)
                    .unwrap_or_default()
                {
                    let Ok(attr) = self.interp.read_str(k) else {
                        continue;
                    };
                    if attr.starts_with("__") && attr.ends_with("__") {
                        continue;
                    }
                    self.visit(&mut w, v, &format!("{name}.{attr}"), 0);
                }
            }
        }
        for t in self.interp.threads().unwrap_or_default() {
            let Ok(frames) = self.interp.frames(&t) else {
                continue;
            };
            for f in frames {
                if f.code.name == "<module>" {
                    continue;
                }
                let Ok(slots) = self.interp.frame_slots(&f) else {
                    continue;
                };
                for s in slots {
                    if s.value == 0 {
                        continue;
                    }
                    let path = format!("{}() local {}", f.code.function(), s.name);
                    self.visit(&mut w, s.value, &path, 1);
                }
            }
        }
        for (addr, type_addr, kind, type_name, name, bound) in w.found {
            match self.containers.get_mut(&addr) {
                Some(c) if c.type_addr == type_addr => {
                    c.bound = bound;
                }
                _ => {
                    if self.containers.len() >= MAX_CONTAINERS {
                        continue;
                    }
                    self.containers.insert(
                        addr,
                        Container {
                            addr,
                            type_addr,
                            kind,
                            type_name,
                            name,
                            bound,
                            series: Series::new(SERIES_POINTS),
                        },
                    );
                }
            }
        }
        Ok(self.containers.len())
    }

    /// Classifies the type object at `ty` (cached per scan).
    fn type_kind(&mut self, ty: u64) -> TypeKind {
        if let Some(k) = self.kinds.get(&ty) {
            return *k;
        }
        let k = self.classify(ty).unwrap_or(TypeKind::Other);
        self.kinds.insert(ty, k);
        k
    }

    fn classify(&self, ty: u64) -> Result<TypeKind, ReadError> {
        let info = self.interp.type_info(ty)?;
        let f = info.flags;
        if f & TPFLAGS_TYPE_SUBCLASS != 0 {
            return Ok(TypeKind::Other);
        }
        if f & TPFLAGS_DICT_SUBCLASS != 0 {
            return Ok(TypeKind::Container(Kind::Dict));
        }
        if f & TPFLAGS_LIST_SUBCLASS != 0 {
            return Ok(TypeKind::Container(Kind::List));
        }
        if f & (TPFLAGS_TUPLE_SUBCLASS
            | TPFLAGS_BYTES_SUBCLASS
            | TPFLAGS_UNICODE_SUBCLASS
            | TPFLAGS_BASE_EXC_SUBCLASS
            | TPFLAGS_LONG_SUBCLASS)
            != 0
        {
            return Ok(TypeKind::Other);
        }
        let mut names = vec![info.name.clone()];
        if info.mro != 0 {
            for base in self.interp.tuple_items(info.mro, 64).unwrap_or_default() {
                if let Ok(b) = self.interp.type_info(base) {
                    names.push(b.name.clone());
                }
            }
        }
        let has = |n: &str| names.iter().any(|x| x == n);
        Ok(if has("set") {
            TypeKind::Container(Kind::Set)
        } else if has("collections.deque") {
            TypeKind::Container(Kind::Deque)
        } else if has("module") {
            TypeKind::Module
        } else if info.name == "function" {
            TypeKind::Function
        } else if info.name == "functools._lru_cache_wrapper" {
            TypeKind::LruCache
        } else if f & TPFLAGS_HEAPTYPE != 0 {
            TypeKind::Instance
        } else {
            TypeKind::Other
        })
    }

    fn kind(&mut self, obj: u64) -> TypeKind {
        match self.interp.type_of(obj) {
            Ok(ty) if ty != 0 => self.type_kind(ty),
            _ => TypeKind::Other,
        }
    }

    /// Classes are objects whose type is a type subclass.
    fn is_class(&self, obj: u64) -> bool {
        self.interp
            .type_of(obj)
            .and_then(|t| self.interp.type_info(t))
            .is_ok_and(|t| t.flags & TPFLAGS_TYPE_SUBCLASS != 0)
    }

    fn visit(&mut self, w: &mut Walk, obj: u64, path: &str, depth: u32) {
        if obj == 0 || w.visited.len() >= MAX_VISITS || !w.visited.insert(obj) {
            return;
        }
        if self.is_class(obj) {
            if depth == 0 {
                let Ok(info) = self.interp.type_info(obj) else {
                    return;
                };
                if info.flags & TPFLAGS_HEAPTYPE == 0 || info.dict == 0 {
                    return;
                }
                for (k, v) in self.attrs(info.dict) {
                    self.visit(w, v, &format!("{path}.{k}"), depth + 1);
                }
            }
            return;
        }
        match self.kind(obj) {
            TypeKind::Container(kind) => {
                let Ok(ty) = self.interp.type_of(obj) else {
                    return;
                };
                let type_name = self
                    .interp
                    .type_info(ty)
                    .map(|t| t.name.clone())
                    .unwrap_or_default();
                let bound = if kind == Kind::Deque {
                    self.read_i64(obj + u64::from(self.layout.containers.deque_maxlen))
                        .filter(|&m| m >= 0)
                } else {
                    None
                };
                w.found
                    .push((obj, ty, kind, type_name, path.to_string(), bound));
                if kind == Kind::Dict && depth < 3 {
                    let len = self
                        .read_i64(obj + u64::from(self.layout.dict.used))
                        .unwrap_or(0);
                    if (1..=NESTED_DICT_MAX as i64).contains(&len) {
                        for (k, v) in self.interp.dict_entries(obj, 64).unwrap_or_default() {
                            let key = self.interp.repr(k, 40);
                            self.visit(w, v, &format!("{path}[{key}]"), depth + 1);
                        }
                    }
                }
            }
            TypeKind::Instance if depth <= 2 => {
                let attrs = self.interp.instance_attrs(obj).unwrap_or_default();
                for (k, v) in attrs.into_iter().take(MAX_ATTRS) {
                    if let Ok(name) = self.interp.read_str(k) {
                        self.visit(w, v, &format!("{path}.{name}"), depth + 1);
                    }
                }
            }
            TypeKind::Function if depth <= 1 => {
                let f = &self.layout.function;
                let (Ok(closure), Ok(code)) = (
                    self.interp.memory().read_u64(obj + u64::from(f.closure)),
                    self.interp.memory().read_u64(obj + u64::from(f.code)),
                ) else {
                    return;
                };
                if closure == 0 {
                    return;
                }
                let names: Vec<String> = self
                    .interp
                    .code(code)
                    .map(|c| {
                        c.slots
                            .iter()
                            .filter(|(_, k)| *k == pymedic_python::SlotKind::Free)
                            .map(|(n, _)| n.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                let cells = self.interp.tuple_items(closure, 64).unwrap_or_default();
                for (i, cell) in cells.into_iter().enumerate() {
                    let Ok(v) = self.interp.cell_contents(cell) else {
                        continue;
                    };
                    let var = names.get(i).cloned().unwrap_or_else(|| format!("cell{i}"));
                    self.visit(w, v, &format!("{path}.<closure {var}>"), depth + 1);
                }
            }
            TypeKind::LruCache => {
                let c = &self.layout.containers;
                let (Ok(cache), Some(maxsize)) = (
                    self.interp.memory().read_u64(obj + u64::from(c.lru_cache)),
                    self.read_i64(obj + u64::from(c.lru_maxsize)),
                ) else {
                    return;
                };
                if cache == 0 || !self.interp.is_dict(cache) || !w.visited.insert(cache) {
                    return;
                }
                let Ok(ty) = self.interp.type_of(cache) else {
                    return;
                };
                w.found.push((
                    cache,
                    ty,
                    Kind::Dict,
                    "functools.lru_cache".into(),
                    format!("{path} (lru_cache)"),
                    (maxsize >= 0).then_some(maxsize),
                ));
            }
            _ => {}
        }
    }

    /// `(name, value)` of a dict with string keys, dunder names skipped.
    fn attrs(&self, dict: u64) -> Vec<(String, u64)> {
        self.interp
            .dict_entries(dict, MAX_ATTRS)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| {
                let name = self.interp.read_str(k).ok()?;
                (!(name.starts_with("__") && name.ends_with("__"))).then_some((name, v))
            })
            .collect()
    }

    fn read_i64(&self, addr: u64) -> Option<i64> {
        self.interp.memory().read_u64(addr).ok().map(|v| v as i64)
    }

    /// Offset of a container's length field.
    fn len_offset(&self, kind: Kind) -> u32 {
        match kind {
            Kind::Dict => self.layout.dict.used,
            Kind::List => self.layout.list.size,
            Kind::Set => self.layout.containers.set_used,
            Kind::Deque => self.layout.object.var_size,
        }
    }

    /// Address of a container's length field (what an insert writes).
    pub fn len_addr(&self, c: &Container) -> u64 {
        c.addr + u64::from(self.len_offset(c.kind))
    }

    /// Reads every followed container's length now (`t`: seconds since the
    /// scanner started) and forgets containers that are gone.
    pub fn sample(&mut self, t: f64) {
        let type_off = self.layout.object.type_ as usize;
        let addrs: Vec<u64> = self.containers.keys().copied().collect();
        let head = HEAD_BYTES;
        let got = read_many(self.pid, &addrs, head);
        let mut dead = Vec::new();
        for (addr, bytes) in addrs.iter().zip(got) {
            let c = self.containers.get_mut(addr).expect("listed above");
            let Some(b) = bytes else {
                dead.push(*addr);
                continue;
            };
            let ty = u64::from_le_bytes(b[type_off..type_off + 8].try_into().expect("8 bytes"));
            let off = match c.kind {
                Kind::Dict => self.layout.dict.used,
                Kind::List => self.layout.list.size,
                Kind::Set => self.layout.containers.set_used,
                Kind::Deque => self.layout.object.var_size,
            } as usize;
            let len = i64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"));
            if ty != c.type_addr || !(0..1 << 40).contains(&len) {
                dead.push(*addr);
                continue;
            }
            c.series.push(t, len as f64);
        }
        for a in dead {
            self.containers.remove(&a);
        }
    }

    /// The newest entries of a container (dict: keys and values; list and
    /// deque's list-like tail: items), at most `n`; sets have no order and
    /// give none.
    pub fn newest(&self, c: &Container, n: usize) -> Vec<u64> {
        match c.kind {
            Kind::Dict => self
                .interp
                .dict_last_entries(c.addr, n)
                .unwrap_or_default()
                .into_iter()
                .flat_map(|(k, v)| [v, k])
                .collect(),
            Kind::List => self.interp.list_last_items(c.addr, n).unwrap_or_default(),
            Kind::Set | Kind::Deque => Vec::new(),
        }
    }
}

struct Walk {
    visited: HashSet<u64>,
    #[allow(clippy::type_complexity)]
    found: Vec<(u64, u64, Kind, String, String, Option<i64>)>,
}

/// Bytes read from the head of each container (type and length fields all
/// lie within the first 32 bytes in every supported version).
const HEAD_BYTES: usize = 32;

/// Reads `len` (≤ 32) bytes at each address with as few `process_vm_readv`
/// calls as possible (1024 ranges per call); `None` where unreadable.
pub fn read_many(pid: u32, addrs: &[u64], len: usize) -> Vec<Option<[u8; HEAD_BYTES]>> {
    let len = len.min(HEAD_BYTES);
    let mut out: Vec<Option<[u8; HEAD_BYTES]>> = vec![None; addrs.len()];
    let mut bufs = vec![[0u8; HEAD_BYTES]; addrs.len()];
    let mut i = 0;
    while i < addrs.len() {
        let end = (i + 1024).min(addrs.len());
        let local: Vec<libc::iovec> = bufs[i..end]
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: len,
            })
            .collect();
        let remote: Vec<libc::iovec> = addrs[i..end]
            .iter()
            .map(|&a| libc::iovec {
                iov_base: a as *mut libc::c_void,
                iov_len: len,
            })
            .collect();
        // SAFETY: `local` points at buffers we own (each `len` bytes,
        // alive until the call returns); `remote` describes the target's
        // memory, which the kernel reads without touching ours otherwise.
        let n = unsafe {
            libc::process_vm_readv(
                pid as libc::pid_t,
                local.as_ptr(),
                local.len() as libc::c_ulong,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        };
        if n < 0 {
            // Nothing readable from the first range on: skip it.
            i += 1;
            continue;
        }
        let whole = n as usize / len;
        for j in 0..whole {
            out[i + j] = Some(bufs[i + j]);
        }
        // The range after the last whole one failed (or the batch ended).
        i += whole + usize::from(i + whole < end);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_many_reads_our_own_memory_and_skips_holes() {
        let a: [u64; 4] = [1, 2, 3, 4];
        let b: [u64; 4] = [5, 6, 7, 8];
        let pid = std::process::id();
        let addrs = [a.as_ptr() as u64, 8, b.as_ptr() as u64];
        let got = read_many(pid, &addrs, 32);
        let word =
            |x: &[u8; 32], i: usize| u64::from_le_bytes(x[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(word(got[0].as_ref().unwrap(), 3), 4);
        assert!(got[1].is_none(), "address 8 is never mapped");
        assert_eq!(word(got[2].as_ref().unwrap(), 0), 5);
    }
}

/// What the newest entries of a growing container are made of.
#[derive(Clone, Debug, Default)]
pub struct Retained {
    /// Entries looked at.
    pub entries: usize,
    /// Objects found in them (keys, values, their direct contents).
    pub objects: usize,
    /// Addresses of those objects and of their out-of-line storage (dict
    /// tables, list arrays): the pages the retained bytes live in.
    pub addrs: Vec<u64>,
    /// Type names of the values, with counts, most common first.
    pub types: Vec<(String, usize)>,
    /// Where function objects among the values were created (their code's
    /// first line: the `lambda`/`def` that made each closure), with counts.
    pub functions: Vec<(pymedic_model::Location, usize)>,
}

impl HeapScanner {
    /// Looks at the newest `n` entries of `c` and what they hold.
    pub fn retained(&self, c: &Container, n: usize) -> Retained {
        let mut r = Retained::default();
        let objs = self.newest(c, n);
        let values: Vec<u64> = match c.kind {
            // newest() gives (value, key) pairs flattened: values at even slots.
            Kind::Dict => objs.iter().step_by(2).copied().collect(),
            _ => objs.clone(),
        };
        r.entries = values.len();
        let mut types: HashMap<String, usize> = HashMap::new();
        let mut functions: HashMap<pymedic_model::Location, usize> = HashMap::new();
        for &obj in &objs {
            if obj == 0 {
                continue;
            }
            r.objects += 1;
            r.addrs.push(obj);
        }
        for &v in &values {
            let Ok(ty) = self.interp.type_of(v) else {
                continue;
            };
            let Ok(info) = self.interp.type_info(ty) else {
                continue;
            };
            *types.entry(info.name.clone()).or_default() += 1;
            for child in self.children(v, &info.name) {
                if child != 0 {
                    r.objects += 1;
                    r.addrs.push(child);
                }
            }
            if info.name == "function"
                && let Ok(code) = self
                    .interp
                    .memory()
                    .read_u64(v + u64::from(self.layout.function.code))
                && let Ok(code) = self.interp.code(code)
            {
                let loc = pymedic_model::Location::new(
                    code.filename.clone(),
                    code.function().to_string(),
                    code.first_line,
                );
                *functions.entry(loc).or_default() += 1;
            }
        }
        r.types = types.into_iter().collect();
        r.types.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        r.functions = functions.into_iter().collect();
        r.functions.sort_by_key(|f| std::cmp::Reverse(f.1));
        r
    }

    /// An object's direct contents and out-of-line storage.
    fn children(&self, obj: u64, type_name: &str) -> Vec<u64> {
        let mem = self.interp.memory();
        let mut out = Vec::new();
        match type_name {
            "dict" => {
                if let Ok(keys) = mem.read_u64(obj + u64::from(self.layout.dict.keys)) {
                    out.push(keys);
                }
                for (k, v) in self.interp.dict_last_entries(obj, 8).unwrap_or_default() {
                    out.extend([k, v]);
                }
            }
            "list" => {
                if let Ok(items) = mem.read_u64(obj + u64::from(self.layout.list.items)) {
                    out.push(items);
                }
                out.extend(self.interp.list_last_items(obj, 8).unwrap_or_default());
            }
            "tuple" => out.extend(self.interp.tuple_items(obj, 16).unwrap_or_default()),
            "function" => {
                if let Ok(closure) = mem.read_u64(obj + u64::from(self.layout.function.closure))
                    && closure != 0
                {
                    for cell in self.interp.tuple_items(closure, 16).unwrap_or_default() {
                        out.push(cell);
                        if let Ok(v) = self.interp.cell_contents(cell) {
                            out.push(v);
                        }
                    }
                }
            }
            _ => {
                let attrs = self.interp.instance_attrs(obj).unwrap_or_default();
                out.extend(attrs.into_iter().take(8).map(|(_, v)| v));
            }
        }
        out
    }
}
