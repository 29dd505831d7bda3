//! Where things are inside a CPython process, per interpreter version: one
//! [`Layout`] table per `major.minor`, generated from that version's headers
//! by `cargo xtask codegen layouts` (see `crates/python/ADDING_A_VERSION.md`).
//!
//! Every number is a byte offset from the start of the named C structure
//! (or a size, or a constant), on x86_64. A field that does not exist in a
//! version is `None`. The eBPF unwinder copies these numbers into its
//! per-process config map; [`crate::interp`] uses them to walk threads and
//! frames from userspace.
//!
//! Patch releases of one `major.minor` share a table: the generator fails
//! when two installed patch versions disagree (Debian's 3.11.2 and pyenv's
//! 3.11.7 agree), which is the signal to key a version by patch range.

mod v3_10;
mod v3_11;
mod v3_12;
mod v3_13;
mod v3_8;
mod v3_9;

/// All tables, oldest first.
pub static LAYOUTS: [&Layout; 6] = [
    &v3_8::LAYOUT,
    &v3_9::LAYOUT,
    &v3_10::LAYOUT,
    &v3_11::LAYOUT,
    &v3_12::LAYOUT,
    &v3_13::LAYOUT,
];

/// The table for CPython `major.minor`, if pymedic has one.
pub fn for_version(major: u8, minor: u8) -> Option<&'static Layout> {
    LAYOUTS
        .iter()
        .copied()
        .find(|l| l.version == (major, minor))
}

/// One interpreter version's structure layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub version: (u8, u8),
    pub runtime: RuntimeLayout,
    pub interp: InterpLayout,
    pub thread: ThreadLayout,
    pub frame: FrameLayout,
    pub code: CodeLayout,
    pub object: ObjectLayout,
    pub type_: TypeLayout,
    pub unicode: UnicodeLayout,
    pub bytes: BytesLayout,
    pub tuple: TupleLayout,
    pub list: ListLayout,
    pub dict: DictLayout,
    pub dict_keys: DictKeysLayout,
    pub cell: CellLayout,
    pub function: FunctionLayout,
    pub module: ModuleLayout,
    pub long: LongLayout,
    pub float: FloatLayout,
    pub gil: GilLayout,
    pub lock: LockLayout,
    pub gc: GcLayout,
    pub containers: ContainerLayout,
    /// Where 3.13's `_Py_DebugOffsets` (at `_PyRuntime.debug_offsets`)
    /// keeps the offsets it publishes; used to cross-check this table
    /// against a live interpreter.
    pub debug_offsets: Option<DebugOffsetsLayout>,
}

/// `_PyRuntimeState` (the `_PyRuntime` symbol).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeLayout {
    /// `interpreters.head`: the first `PyInterpreterState*`.
    pub interpreters_head: u32,
    /// `interpreters.main`.
    pub interpreters_main: u32,
    /// `gilstate.tstate_current` (3.8–3.11): the `PyThreadState*` holding
    /// the GIL, NULL while no thread holds it.
    pub gilstate_tstate_current: Option<u32>,
    /// `ceval.gil` (3.8–3.11): the embedded `struct _gil_runtime_state`.
    pub gil: Option<u32>,
    /// `debug_offsets` (3.13+): `_Py_DebugOffsets`, cookie `xdebugpy`.
    pub debug_offsets: Option<u32>,
}

/// `PyInterpreterState`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterpLayout {
    pub next: u32,
    /// `tstate_head` (3.8–3.10) / `threads.head` (3.11+).
    pub threads_head: u32,
    pub id: u32,
    /// `modules` / `imports.modules` (3.12+): `sys.modules`.
    pub modules: u32,
    pub sysdict: u32,
    pub builtins: u32,
    /// `ceval.gil` (3.12+): pointer to this interpreter's
    /// `struct _gil_runtime_state`.
    pub ceval_gil: Option<u32>,
    /// `_gil` (3.12+): the main interpreter's own `struct
    /// _gil_runtime_state`, where `ceval.gil` usually points.
    pub gil_embedded: Option<u32>,
}

/// `PyThreadState`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadLayout {
    pub size: u32,
    pub prev: u32,
    pub next: u32,
    pub interp: u32,
    /// `frame` (3.8–3.10): the current `PyFrameObject*`.
    pub frame: Option<u32>,
    /// `cframe` (3.11–3.12): pointer to a `_PyCFrame`…
    pub cframe: Option<u32>,
    /// …whose `current_frame` (at this offset) is the current
    /// `_PyInterpreterFrame*`.
    pub cframe_current_frame: Option<u32>,
    /// `current_frame` (3.13+): the current `_PyInterpreterFrame*`.
    pub current_frame: Option<u32>,
    /// `thread_id`: the thread's `pthread_t` (`threading.get_ident()`).
    pub thread_id: u32,
    /// `native_thread_id` (3.11+): the kernel tid.
    pub native_thread_id: Option<u32>,
}

/// A frame: `PyFrameObject` (3.8–3.10) or `_PyInterpreterFrame` (3.11+).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameLayout {
    /// True for `PyFrameObject` (a Python object), false for
    /// `_PyInterpreterFrame`.
    pub is_object: bool,
    pub size: u32,
    /// `f_back` / `previous`.
    pub previous: u32,
    /// `f_code` / `f_executable` (3.13).
    pub code: u32,
    /// `f_lasti` (3.8–3.10, an `int`): the last instruction, counted in
    /// `lasti_unit` bytes.
    pub lasti: Option<u32>,
    /// Bytes per unit of `f_lasti` (1 in 3.8–3.9, 2 from 3.10) and of
    /// `prev_instr`/`instr_ptr` arithmetic (`sizeof(_Py_CODEUNIT)`).
    pub lasti_unit: u32,
    /// `prev_instr` (3.11–3.12): pointer to the last instruction started.
    pub prev_instr: Option<u32>,
    /// `instr_ptr` (3.13): pointer to the instruction executing.
    pub instr_ptr: Option<u32>,
    /// `f_localsplus` / `localsplus`: fast locals, cells, frees, then the
    /// value stack.
    pub localsplus: u32,
    pub globals: u32,
    pub builtins: u32,
    pub locals: u32,
    /// `f_stacktop` (3.8–3.9): pointer past the top of the value stack.
    pub stacktop_ptr: Option<u32>,
    /// `f_stackdepth` (3.10, `int`).
    pub stackdepth: Option<u32>,
    /// `stacktop` (3.11+, `int`): index into `localsplus` past the top.
    pub stacktop: Option<u32>,
    /// `owner` (3.11+, `char`).
    pub owner: Option<u32>,
    /// Value of `owner` for a shim frame on the C stack (3.12+), which is
    /// skipped when walking.
    pub owner_cstack: Option<u32>,
    /// `is_entry` (3.11, `bool`): the frame was entered from C.
    pub is_entry: Option<u32>,
    pub frame_obj: Option<u32>,
    /// `f_func` (3.11) / `f_funcobj` (3.12+).
    pub funcobj: Option<u32>,
}

/// `PyCodeObject`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeLayout {
    pub size: u32,
    pub argcount: u32,
    pub posonlyargcount: u32,
    pub kwonlyargcount: u32,
    pub nlocals: u32,
    pub flags: u32,
    pub firstlineno: u32,
    pub filename: u32,
    pub name: u32,
    /// `co_qualname` (3.11+).
    pub qualname: Option<u32>,
    /// `co_lnotab` (3.8–3.9).
    pub lnotab: Option<u32>,
    /// `co_linetable` (3.10: line table; 3.11+: location table).
    pub linetable: Option<u32>,
    /// `co_code` (3.8–3.10): a `bytes` object.
    pub code: Option<u32>,
    /// `co_code_adaptive` (3.11+): the bytecode, inline in the code object.
    pub code_adaptive: Option<u32>,
    /// `co_varnames`, `co_cellvars`, `co_freevars` (3.8–3.10): tuples of str.
    pub varnames: Option<u32>,
    pub cellvars: Option<u32>,
    pub freevars: Option<u32>,
    /// `co_cell2arg` (3.8–3.10).
    pub cell2arg: Option<u32>,
    /// `co_localsplusnames` / `co_localspluskinds` (3.11+).
    pub localsplusnames: Option<u32>,
    pub localspluskinds: Option<u32>,
    pub nlocalsplus: Option<u32>,
    pub ncellvars: Option<u32>,
    pub nfreevars: Option<u32>,
    /// `CO_FAST_LOCAL`, `CO_FAST_CELL`, `CO_FAST_FREE` (3.11+).
    pub fast_local: Option<u32>,
    pub fast_cell: Option<u32>,
    pub fast_free: Option<u32>,
}

/// `PyObject` / `PyVarObject`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectLayout {
    pub refcnt: u32,
    pub type_: u32,
    pub var_size: u32,
}

/// `PyTypeObject` and how instances keep their attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeLayout {
    pub name: u32,
    pub basicsize: u32,
    pub itemsize: u32,
    pub dictoffset: u32,
    pub flags: u32,
    pub mro: u32,
    pub dict: u32,
    pub base: u32,
    /// `PyHeapTypeObject.ht_cached_keys`: shared keys of instance dicts.
    pub heap_cached_keys: u32,
    /// `Py_TPFLAGS_HEAPTYPE`.
    pub flag_heaptype: u32,
    /// `Py_TPFLAGS_MANAGED_DICT` (3.11+).
    pub flag_managed_dict: Option<u32>,
    /// Bytes *before* the object where its managed dict pointer lives
    /// (3.11+; 3.12 stores a tagged dict-or-values word there).
    pub managed_dict_offset: Option<u32>,
    /// Bytes before the object where 3.11 keeps the `PyDictValues*`.
    pub managed_values_offset: Option<u32>,
    /// 3.12: the word at `managed_dict_offset` is a dict pointer, or, when
    /// its low bit is set, the `PyDictValues*` minus one
    /// (`_PyDictOrValues_GetValues` adds 1).
    pub managed_dict_tagged: bool,
    /// `Py_TPFLAGS_INLINE_VALUES` (3.13): values at `obj + tp_basicsize`.
    pub flag_inline_values: Option<u32>,
}

/// `PyASCIIObject` / `PyCompactUnicodeObject` / `PyUnicodeObject`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnicodeLayout {
    /// Data of a compact ASCII string follows this many bytes.
    pub ascii_size: u32,
    /// Data of a compact non-ASCII string follows this many bytes.
    pub compact_size: u32,
    pub length: u32,
    /// The `state` bit-field word (32 bits).
    pub state: u32,
    pub kind_shift: u32,
    pub kind_bits: u32,
    pub compact_bit: u32,
    pub ascii_bit: u32,
    /// `data.any` of a legacy (non-compact) string.
    pub legacy_data: u32,
}

/// `PyBytesObject`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BytesLayout {
    pub size: u32,
    pub sval: u32,
}

/// `PyTupleObject`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TupleLayout {
    pub size: u32,
    pub items: u32,
}

/// `PyListObject` (`items` is a pointer to the item array).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListLayout {
    pub size: u32,
    pub items: u32,
}

/// `PyDictObject`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DictLayout {
    pub used: u32,
    pub keys: u32,
    /// `ma_values`: non-NULL for a split table.
    pub values: u32,
}

/// `PyDictKeysObject` and its entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DictKeysLayout {
    /// `dk_size` (3.8–3.10, `Py_ssize_t`): slots in `dk_indices`.
    pub dk_size: Option<u32>,
    /// `dk_log2_size`, `dk_log2_index_bytes`, `dk_kind` (3.11+, `uint8_t`).
    pub dk_log2_size: Option<u32>,
    pub dk_log2_index_bytes: Option<u32>,
    pub dk_kind: Option<u32>,
    pub dk_nentries: u32,
    pub dk_indices: u32,
    /// `PyDictKeyEntry` (hash, key, value).
    pub entry_size: u32,
    pub entry_key: u32,
    pub entry_value: u32,
    /// `PyDictUnicodeEntry` (key, value), used unless `dk_kind` is
    /// `kind_general` (3.11+).
    pub unicode_entry_size: Option<u32>,
    pub unicode_entry_key: Option<u32>,
    pub unicode_entry_value: Option<u32>,
    /// `DICT_KEYS_GENERAL`.
    pub kind_general: Option<u32>,
    /// `PyDictValues.values` (3.11+).
    pub values_items: Option<u32>,
}

/// `PyCellObject`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CellLayout {
    pub ob_ref: u32,
}

/// `PyFunctionObject`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionLayout {
    pub code: u32,
    pub globals: u32,
    pub name: u32,
    pub qualname: u32,
    pub closure: u32,
}

/// `PyModuleObject`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleLayout {
    pub dict: u32,
}

/// `PyLongObject`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LongLayout {
    /// `ob_size` (signed digit count) or, when `tagged` (3.12+),
    /// `long_value.lv_tag` (digits << 3 | sign bits).
    pub size_or_tag: u32,
    pub digits: u32,
    pub tagged: bool,
    pub digit_bits: u32,
    pub digit_size: u32,
}

/// `PyFloatObject`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FloatLayout {
    pub value: u32,
}

/// `struct _gil_runtime_state`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GilLayout {
    /// `PyThreadState*` that last held (or holds) the GIL.
    pub last_holder: u32,
    /// `int`: 1 while some thread holds the GIL.
    pub locked: u32,
    pub switch_number: u32,
}

/// `_thread.lock` (`lockobject`) and `_thread.RLock` (`rlockobject`) from
/// `Modules/_threadmodule.c`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockLayout {
    /// `PyThread_type_lock` (a `sem_t*` on Linux): the futex word a
    /// blocked acquirer waits on.
    pub lock_lock: u32,
    /// `char`: 1 while held.
    pub locked: u32,
    pub rlock_lock: u32,
    /// `unsigned long`: owner's `pthread_t`, 0 when free.
    pub rlock_owner: u32,
    pub rlock_count: u32,
}

/// `struct _gc_runtime_state`: the cyclic garbage collector's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcLayout {
    /// The state is `_PyRuntimeState.gc` (3.8) rather than
    /// `PyInterpreterState.gc` (3.9+).
    pub in_runtime: bool,
    /// Offset of the state in `_PyRuntimeState` or `PyInterpreterState`.
    pub state: u32,
    /// `int`: `gc.isenabled()`.
    pub enabled: u32,
    /// `int`: 1 while a collection runs.
    pub collecting: u32,
    /// `struct gc_generation generations[3]`.
    pub generations: u32,
    pub generation_size: u32,
    pub generation_threshold: u32,
    /// Allocations (generation 0) or younger collections since its last
    /// collection.
    pub generation_count: u32,
    /// `struct gc_generation_stats generation_stats[3]`.
    pub stats: u32,
    pub stats_size: u32,
    pub stats_collections: u32,
    pub stats_collected: u32,
    pub stats_uncollectable: u32,
}

/// Containers whose length or bound pymedic reads: `PySetObject`, and the
/// heads of `collections.deque` and `functools._lru_cache_wrapper`
/// (private to their modules; restated in the generator).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerLayout {
    /// `Py_ssize_t used`: the set's length.
    pub set_used: u32,
    /// `Py_ssize_t maxlen` (-1: unbounded).
    pub deque_maxlen: u32,
    /// `PyObject *cache`: the cache's dict.
    pub lru_cache: u32,
    /// `Py_ssize_t maxsize` (-1: unbounded).
    pub lru_maxsize: u32,
}

/// Offsets *inside* `_Py_DebugOffsets` (3.13+) of the values it publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebugOffsetsLayout {
    pub cookie: u32,
    pub runtime_interpreters_head: u32,
    pub interp_next: u32,
    pub interp_threads_head: u32,
    pub interp_modules: u32,
    pub interp_ceval_gil: u32,
    pub gil_locked: u32,
    pub gil_holder: u32,
    pub thread_next: u32,
    pub thread_interp: u32,
    pub thread_current_frame: u32,
    pub thread_thread_id: u32,
    pub thread_native_thread_id: u32,
    pub frame_previous: u32,
    pub frame_executable: u32,
    pub frame_instr_ptr: u32,
    pub frame_localsplus: u32,
    pub frame_owner: u32,
    pub code_filename: u32,
    pub code_name: u32,
    pub code_qualname: u32,
    pub code_linetable: u32,
    pub code_firstlineno: u32,
    pub code_localsplusnames: u32,
    pub code_localspluskinds: u32,
    pub code_adaptive: u32,
    pub type_name: u32,
    pub type_flags: u32,
    pub unicode_state: u32,
    pub unicode_length: u32,
    pub unicode_ascii_size: u32,
    pub dict_keys: u32,
    pub dict_values: u32,
    pub bytes_sval: u32,
    pub tuple_items: u32,
}

/// The cookie at the start of `_Py_DebugOffsets`.
pub const DEBUG_OFFSETS_COOKIE: &[u8; 8] = b"xdebugpy";

impl DebugOffsetsLayout {
    /// Pairs of (offset inside `_Py_DebugOffsets`, the value this table
    /// says it should hold, a name): what a live 3.13 process must agree
    /// with.
    pub fn checks(&self, l: &Layout) -> Vec<(u32, u64, &'static str)> {
        let o = |x: Option<u32>| u64::from(x.unwrap_or(u32::MAX));
        vec![
            (
                self.runtime_interpreters_head,
                l.runtime.interpreters_head.into(),
                "runtime.interpreters_head",
            ),
            (self.interp_next, l.interp.next.into(), "interp.next"),
            (
                self.interp_threads_head,
                l.interp.threads_head.into(),
                "interp.threads_head",
            ),
            (
                self.interp_modules,
                l.interp.modules.into(),
                "interp.modules",
            ),
            (
                self.interp_ceval_gil,
                o(l.interp.ceval_gil),
                "interp.ceval_gil",
            ),
            (
                self.gil_locked,
                o(l.interp.gil_embedded.map(|g| g + l.gil.locked)),
                "interp._gil.locked",
            ),
            (
                self.gil_holder,
                o(l.interp.gil_embedded.map(|g| g + l.gil.last_holder)),
                "interp._gil.last_holder",
            ),
            (self.thread_next, l.thread.next.into(), "thread.next"),
            (self.thread_interp, l.thread.interp.into(), "thread.interp"),
            (
                self.thread_current_frame,
                o(l.thread.current_frame),
                "thread.current_frame",
            ),
            (
                self.thread_thread_id,
                l.thread.thread_id.into(),
                "thread.thread_id",
            ),
            (
                self.thread_native_thread_id,
                o(l.thread.native_thread_id),
                "thread.native_thread_id",
            ),
            (
                self.frame_previous,
                l.frame.previous.into(),
                "frame.previous",
            ),
            (self.frame_executable, l.frame.code.into(), "frame.code"),
            (
                self.frame_instr_ptr,
                o(l.frame.instr_ptr),
                "frame.instr_ptr",
            ),
            (
                self.frame_localsplus,
                l.frame.localsplus.into(),
                "frame.localsplus",
            ),
            (self.frame_owner, o(l.frame.owner), "frame.owner"),
            (self.code_filename, l.code.filename.into(), "code.filename"),
            (self.code_name, l.code.name.into(), "code.name"),
            (self.code_qualname, o(l.code.qualname), "code.qualname"),
            (self.code_linetable, o(l.code.linetable), "code.linetable"),
            (
                self.code_firstlineno,
                l.code.firstlineno.into(),
                "code.firstlineno",
            ),
            (
                self.code_localsplusnames,
                o(l.code.localsplusnames),
                "code.localsplusnames",
            ),
            (
                self.code_localspluskinds,
                o(l.code.localspluskinds),
                "code.localspluskinds",
            ),
            (
                self.code_adaptive,
                o(l.code.code_adaptive),
                "code.code_adaptive",
            ),
            (self.type_name, l.type_.name.into(), "type.name"),
            (self.type_flags, l.type_.flags.into(), "type.flags"),
            (self.unicode_state, l.unicode.state.into(), "unicode.state"),
            (
                self.unicode_length,
                l.unicode.length.into(),
                "unicode.length",
            ),
            (
                self.unicode_ascii_size,
                l.unicode.ascii_size.into(),
                "unicode.ascii_size",
            ),
            (self.dict_keys, l.dict.keys.into(), "dict.keys"),
            (self.dict_values, l.dict.values.into(), "dict.values"),
            (self.bytes_sval, l.bytes.sval.into(), "bytes.sval"),
            (self.tuple_items, l.tuple.items.into(), "tuple.items"),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_version_has_a_table() {
        for minor in 8..=13 {
            let l = for_version(3, minor).expect("table");
            assert_eq!(l.version, (3, minor));
        }
        assert!(for_version(3, 7).is_none());
        assert!(for_version(3, 14).is_none());
    }

    #[test]
    fn tables_are_internally_consistent() {
        for l in LAYOUTS {
            let (_, minor) = l.version;
            // Exactly one way to reach the current frame.
            let ways = [
                l.thread.frame,
                l.thread.current_frame,
                l.thread.cframe.and(l.thread.cframe_current_frame),
            ];
            assert_eq!(ways.iter().flatten().count(), 1, "3.{minor}");
            // Exactly one way to find the instruction.
            let instr = [l.frame.lasti, l.frame.prev_instr, l.frame.instr_ptr];
            assert_eq!(instr.iter().flatten().count(), 1, "3.{minor}");
            assert_eq!(l.frame.is_object, minor <= 10, "3.{minor}");
            assert_eq!(l.code.lnotab.is_some(), minor <= 9);
            assert_eq!(l.code.qualname.is_some(), minor >= 11);
            // The GIL is reachable from the runtime or the interpreter.
            assert!(l.runtime.gil.is_some() != l.interp.ceval_gil.is_some());
            assert_eq!(l.runtime.debug_offsets.is_some(), minor >= 13);
            assert_eq!(l.debug_offsets.is_some(), minor >= 13);
            // Object header is the same everywhere on 64-bit.
            assert_eq!((l.object.refcnt, l.object.type_), (0, 8));
            assert_eq!(l.lock.lock_lock, 16);
        }
    }
}
