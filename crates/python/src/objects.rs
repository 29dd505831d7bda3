//! Inspecting Python objects in another process: type names, `str` (compact
//! ASCII, UCS-1/2/4 and legacy strings), `bytes`, `int`, `float`, tuples,
//! lists, dicts (combined and split tables of every layout), cells,
//! attribute lookup (instance dict, managed dict, inline values, then the
//! class MRO) and bounded reprs.

use std::sync::Arc;

use crate::interp::{Interpreter, ReadError, Result, TypeInfo};
use crate::memory::{Bytes as _, ProcessMemory};

/// Strings longer than this are truncated when read.
pub const MAX_STR: usize = 1 << 16;
/// Dict entries or sequence items read at most.
pub const MAX_ITEMS: usize = 1 << 16;

impl<M: ProcessMemory> Interpreter<M> {
    /// The type object of `obj`.
    pub fn type_of(&self, obj: u64) -> Result<u64> {
        self.ptr(obj + u64::from(self.layout.object.type_))
    }

    /// Facts about the type object at `ty` (cached).
    pub fn type_info(&self, ty: u64) -> Result<Arc<TypeInfo>> {
        if let Some(t) = self.types.borrow().get(&ty) {
            return Ok(t.clone());
        }
        let l = &self.layout.type_;
        let end = [
            l.name,
            l.mro,
            l.dict,
            l.base,
            l.flags,
            l.dictoffset,
            l.basicsize,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
            + 8;
        let b = self.mem.read_vec(ty, end as usize)?;
        let flags = b.u64_at(l.flags);
        let name_ptr = b.u64_at(l.name);
        let raw = self
            .mem
            .read_vec(name_ptr, 128)
            .or_else(|_| self.mem.read_vec(name_ptr, 32))?;
        let len = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
        let name = String::from_utf8_lossy(&raw[..len]).into_owned();
        if name.is_empty() {
            return Err(ReadError::invalid("type object", ty, "empty tp_name"));
        }
        let cached_keys = if flags & u64::from(l.flag_heaptype) != 0 {
            self.ptr(ty + u64::from(l.heap_cached_keys))?
        } else {
            0
        };
        let info = Arc::new(TypeInfo {
            addr: ty,
            name,
            flags,
            basicsize: b.i64_at(l.basicsize),
            itemsize: b.i64_at(l.itemsize),
            dictoffset: b.i64_at(l.dictoffset),
            mro: b.u64_at(l.mro),
            dict: b.u64_at(l.dict),
            cached_keys,
        });
        self.types.borrow_mut().insert(ty, info.clone());
        Ok(info)
    }

    /// `type(obj).__name__` as C sees it (`tp_name`, e.g. `_thread.lock`
    /// for builtins, `Worker` for classes).
    pub fn type_name(&self, obj: u64) -> Result<String> {
        Ok(self.type_info(self.type_of(obj)?)?.name.clone())
    }

    fn is_type(&self, obj: u64, name: &str) -> bool {
        self.type_name(obj).is_ok_and(|n| n == name)
    }

    pub fn is_dict(&self, obj: u64) -> bool {
        self.is_type(obj, "dict")
    }

    pub fn is_cell(&self, obj: u64) -> bool {
        self.is_type(obj, "cell")
    }

    /// The object a cell holds (0 when empty).
    pub fn cell_contents(&self, cell: u64) -> Result<u64> {
        self.ptr(cell + u64::from(self.layout.cell.ob_ref))
    }

    /// Reads a `str` object (truncated to [`MAX_STR`] characters).
    pub fn read_str(&self, obj: u64) -> Result<String> {
        let u = &self.layout.unicode;
        let head = self.mem.read_vec(obj, u.compact_size as usize)?;
        let len = head.i64_at(u.length);
        if !(0..=(1 << 30)).contains(&len) {
            return Err(ReadError::invalid("str", obj, format!("length {len}")));
        }
        let len = (len as usize).min(MAX_STR);
        let state = head.u32_at(u.state);
        let kind = (state >> u.kind_shift) & ((1 << u.kind_bits) - 1);
        let compact = state & (1 << u.compact_bit) != 0;
        let ascii = state & (1 << u.ascii_bit) != 0;
        let data = match (compact, ascii) {
            (true, true) => obj + u64::from(u.ascii_size),
            (true, false) => obj + u64::from(u.compact_size),
            (false, _) => self.ptr(obj + u64::from(u.legacy_data))?,
        };
        let width = match kind {
            1 => 1,
            2 => 2,
            4 => 4,
            _ => return Err(ReadError::invalid("str", obj, format!("kind {kind}"))),
        };
        let raw = self.mem.read_vec(data, len * width)?;
        Ok(match width {
            1 if ascii => String::from_utf8_lossy(&raw).into_owned(),
            1 => raw.iter().map(|&b| char::from(b)).collect(),
            2 => raw
                .chunks_exact(2)
                .map(|c| {
                    char::from_u32(u32::from(u16::from_le_bytes([c[0], c[1]])))
                        .unwrap_or('\u{fffd}')
                })
                .collect(),
            _ => raw
                .chunks_exact(4)
                .map(|c| {
                    char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .unwrap_or('\u{fffd}')
                })
                .collect(),
        })
    }

    /// Reads a `bytes` object's contents (at most `max` bytes).
    pub fn read_bytes_obj(&self, obj: u64, max: usize) -> Result<Vec<u8>> {
        let b = &self.layout.bytes;
        let len = self.mem.read_u64(obj + u64::from(b.size))? as i64;
        if len < 0 || len as usize > max {
            return Err(ReadError::invalid("bytes", obj, format!("length {len}")));
        }
        Ok(self.mem.read_vec(obj + u64::from(b.sval), len as usize)?)
    }

    /// Items of a tuple (at most `max`).
    pub fn tuple_items(&self, obj: u64, max: usize) -> Result<Vec<u64>> {
        let t = &self.layout.tuple;
        let n = self.mem.read_u64(obj + u64::from(t.size))? as i64;
        if n < 0 || n as usize > max {
            return Err(ReadError::invalid("tuple", obj, format!("size {n}")));
        }
        self.ptr_array(obj + u64::from(t.items), n as usize)
    }

    /// Items of a list (at most `max`).
    pub fn list_items(&self, obj: u64, max: usize) -> Result<Vec<u64>> {
        let l = &self.layout.list;
        let n = self.mem.read_u64(obj + u64::from(l.size))? as i64;
        if n < 0 {
            return Err(ReadError::invalid("list", obj, format!("size {n}")));
        }
        let items = self.ptr(obj + u64::from(l.items))?;
        self.ptr_array(items, (n as usize).min(max))
    }

    fn ptr_array(&self, addr: u64, n: usize) -> Result<Vec<u64>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let raw = self.mem.read_vec(addr, n * 8)?;
        Ok(raw.chunks_exact(8).map(|c| c.u64_at(0)).collect())
    }

    /// The value of an `int` (or `bool`) that fits in 128 bits.
    pub fn read_int(&self, obj: u64) -> Result<Option<i128>> {
        let l = &self.layout.long;
        let word = self.mem.read_u64(obj + u64::from(l.size_or_tag))?;
        let (negative, ndigits) = if l.tagged {
            // lv_tag: ndigits << 3 | sign (0 positive, 1 zero, 2 negative)
            (word & 3 == 2, (word >> 3) as usize)
        } else {
            let s = word as i64;
            (s < 0, s.unsigned_abs() as usize)
        };
        if ndigits * l.digit_bits as usize > 126 {
            return Ok(None);
        }
        let raw = self
            .mem
            .read_vec(obj + u64::from(l.digits), ndigits * l.digit_size as usize)?;
        let mut v: i128 = 0;
        for (i, c) in raw.chunks_exact(l.digit_size as usize).enumerate() {
            let d = i128::from(c.u32_at(0));
            v |= d << (i as u32 * l.digit_bits);
        }
        Ok(Some(if negative { -v } else { v }))
    }

    pub fn read_float(&self, obj: u64) -> Result<f64> {
        Ok(f64::from_bits(
            self.mem
                .read_u64(obj + u64::from(self.layout.float.value))?,
        ))
    }

    /// `(key, value)` pairs of a dict, in insertion order, at most `max`.
    pub fn dict_entries(&self, dict: u64, max: usize) -> Result<Vec<(u64, u64)>> {
        let d = &self.layout.dict;
        let b = self.mem.read_vec(dict, (d.values + 8) as usize)?;
        let values = b.u64_at(d.values);
        self.keys_entries(b.u64_at(d.keys), values, max)
    }

    /// The newest `(key, value)` pairs of a dict (insertion order, newest
    /// last), at most `n`: cheap on a dict of any size.
    pub fn dict_last_entries(&self, dict: u64, n: usize) -> Result<Vec<(u64, u64)>> {
        let d = &self.layout.dict;
        let b = self.mem.read_vec(dict, (d.values + 8) as usize)?;
        self.keys_entries_tail(b.u64_at(d.keys), b.u64_at(d.values), usize::MAX, n)
    }

    /// The last `n` items of a list (newest appended last).
    pub fn list_last_items(&self, obj: u64, n: usize) -> Result<Vec<u64>> {
        let l = &self.layout.list;
        let len = self.mem.read_u64(obj + u64::from(l.size))? as i64;
        if len < 0 {
            return Err(ReadError::invalid("list", obj, format!("size {len}")));
        }
        let take = (len as usize).min(n);
        let items = self.ptr(obj + u64::from(l.items))?;
        self.ptr_array(items + 8 * (len as usize - take) as u64, take)
    }

    /// Entries of a `PyDictKeysObject`; with `values` non-zero, values come
    /// from that split-table array instead of the entries.
    fn keys_entries(&self, keys: u64, values: u64, max: usize) -> Result<Vec<(u64, u64)>> {
        self.keys_entries_tail(keys, values, max, usize::MAX)
    }

    /// The first `max` entries, of which only the last `tail` are read.
    fn keys_entries_tail(
        &self,
        keys: u64,
        values: u64,
        max: usize,
        tail: usize,
    ) -> Result<Vec<(u64, u64)>> {
        let k = &self.layout.dict_keys;
        let head = self.mem.read_vec(keys, k.dk_indices as usize)?;
        let nentries = head.i64_at(k.dk_nentries);
        if !(0..=1 << 26).contains(&nentries) {
            return Err(ReadError::invalid(
                "dict keys",
                keys,
                format!("{nentries} entries"),
            ));
        }
        let n = (nentries as usize).min(max);
        let (index_bytes, general) = match (k.dk_size, k.dk_log2_index_bytes, k.dk_kind) {
            (Some(size_off), _, _) => {
                let size = head.u64_at(size_off);
                let width = match size {
                    0..=0xff => 1,
                    0x100..=0xffff => 2,
                    0x1_0000..=0xffff_ffff => 4,
                    _ => 8,
                };
                (size.saturating_mul(width), true)
            }
            (None, Some(log2_off), Some(kind_off)) => {
                let log2 = head.u8_at(log2_off);
                if log2 > 40 {
                    return Err(ReadError::invalid(
                        "dict keys",
                        keys,
                        format!("log2 index bytes {log2}"),
                    ));
                }
                (
                    1u64 << log2,
                    u32::from(head.u8_at(kind_off)) == k.kind_general.unwrap_or(0),
                )
            }
            _ => return Err(ReadError::Unsupported(self.version().clone())),
        };
        let (size, key_off, value_off) = if general {
            (k.entry_size, k.entry_key, k.entry_value)
        } else {
            (
                k.unicode_entry_size.unwrap_or(16),
                k.unicode_entry_key.unwrap_or(0),
                k.unicode_entry_value.unwrap_or(8),
            )
        };
        let skip = n.saturating_sub(tail);
        let n = n - skip;
        let entries_at =
            keys + u64::from(k.dk_indices) + index_bytes + (skip as u64) * u64::from(size);
        let raw = if n == 0 {
            Vec::new()
        } else {
            self.mem.read_vec(entries_at, n * size as usize)?
        };
        let split_values = if values != 0 && n > 0 {
            let at = values + u64::from(k.values_items.unwrap_or(0)) + 8 * skip as u64;
            Some(self.ptr_array(at, n)?)
        } else {
            None
        };
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let e = &raw[i * size as usize..(i + 1) * size as usize];
            let key = e.u64_at(key_off);
            let value = match &split_values {
                Some(v) => v[i],
                None => e.u64_at(value_off),
            };
            if key != 0 && value != 0 {
                out.push((key, value));
            }
        }
        Ok(out)
    }

    /// `dict[key]` for a `str` key.
    pub fn dict_get_str(&self, dict: u64, key: &str) -> Result<Option<u64>> {
        let entries = self.dict_entries(dict, MAX_ITEMS)?;
        self.find_str_key(&entries, key)
    }

    fn find_str_key(&self, entries: &[(u64, u64)], key: &str) -> Result<Option<u64>> {
        let u = &self.layout.unicode;
        for &(k, v) in entries {
            // Cheap length check before reading the characters.
            let Ok(len) = self.mem.read_u64(k + u64::from(u.length)) else {
                continue;
            };
            if len as usize != key.chars().count() {
                continue;
            }
            if self.type_name(k).is_ok_and(|t| t == "str") && self.read_str(k)? == key {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// The instance attributes of `obj` as `(key, value)` pairs: its
    /// `__dict__`, managed dict (3.11+) or inline values (3.13).
    pub fn instance_attrs(&self, obj: u64) -> Result<Vec<(u64, u64)>> {
        let l = &self.layout.type_;
        let ty = self.type_info(self.type_of(obj)?)?;
        if let Some(flag) = l.flag_inline_values
            && ty.flags & u64::from(flag) != 0
        {
            let values = obj + ty.basicsize as u64;
            // PyDictValues: capacity, size, embedded, valid; then values.
            let valid = self.mem.read_u8(values + 3)? != 0;
            if valid && ty.cached_keys != 0 {
                return self.keys_entries(ty.cached_keys, values, MAX_ITEMS);
            }
        }
        if let (Some(flag), Some(off)) = (l.flag_managed_dict, l.managed_dict_offset)
            && ty.flags & u64::from(flag) != 0
        {
            let word = self.ptr(obj.wrapping_sub(u64::from(off)))?;
            if l.managed_dict_tagged && word & 1 != 0 {
                return self.keys_entries(ty.cached_keys, word + 1, MAX_ITEMS);
            }
            if word != 0 {
                return self.dict_entries(word, MAX_ITEMS);
            }
            if let Some(voff) = l.managed_values_offset {
                let values = self.ptr(obj.wrapping_sub(u64::from(voff)))?;
                if values != 0 && ty.cached_keys != 0 {
                    return self.keys_entries(ty.cached_keys, values, MAX_ITEMS);
                }
            }
            return Ok(Vec::new());
        }
        let mut off = ty.dictoffset;
        if off == 0 {
            return Ok(Vec::new());
        }
        if off < 0 {
            let n = (self
                .mem
                .read_u64(obj + u64::from(self.layout.object.var_size))?
                as i64)
                .abs();
            let size = (ty.basicsize + n * ty.itemsize + 7) & !7;
            off += size;
        }
        let dict = self.ptr(obj.wrapping_add(off as u64))?;
        if dict == 0 {
            return Ok(Vec::new());
        }
        self.dict_entries(dict, MAX_ITEMS)
    }

    /// `getattr(obj, name)` for plain data: the instance's attributes
    /// (a module's globals for modules), then the dicts of the class MRO
    /// (class attributes, methods). Descriptors are not invoked.
    pub fn getattr(&self, obj: u64, name: &str) -> Result<Option<u64>> {
        if let Some(v) = self.find_str_key(&self.instance_attrs(obj)?, name)? {
            return Ok(Some(v));
        }
        if self.type_name(obj)? == "module" {
            let d = self.ptr(obj + u64::from(self.layout.module.dict))?;
            if d != 0
                && let Some(v) = self.dict_get_str(d, name)?
            {
                return Ok(Some(v));
            }
        }
        let ty = self.type_info(self.type_of(obj)?)?;
        let mro = if ty.mro != 0 {
            self.tuple_items(ty.mro, 256)?
        } else {
            vec![ty.addr]
        };
        for class in mro {
            let dict = self.type_info(class)?.dict;
            if dict != 0
                && let Some(v) = self.dict_get_str(dict, name)?
            {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// A short, bounded representation of `obj` for humans (`--locals`).
    pub fn repr(&self, obj: u64, max_len: usize) -> String {
        let mut s = self
            .repr_depth(obj, 2)
            .unwrap_or_else(|_| format!("<unreadable at {obj:#x}>"));
        if s.chars().count() > max_len {
            s = s
                .chars()
                .take(max_len.saturating_sub(1))
                .collect::<String>()
                + "…";
        }
        s
    }

    fn repr_depth(&self, obj: u64, depth: u32) -> Result<String> {
        if obj == 0 {
            return Ok("<NULL>".into());
        }
        let ty = self.type_name(obj)?;
        let short = |items: &[u64], open: &str, close: &str| -> Result<String> {
            let shown: Vec<String> = items
                .iter()
                .take(8)
                .map(|&i| self.repr_depth(i, depth - 1).unwrap_or_else(|_| "?".into()))
                .collect();
            let more = if items.len() > 8 { ", …" } else { "" };
            Ok(format!("{open}{}{more}{close}", shown.join(", ")))
        };
        Ok(match ty.as_str() {
            "str" => format!(
                "{:?}",
                self.read_str(obj)?.chars().take(200).collect::<String>()
            ),
            "int" => self
                .read_int(obj)?
                .map_or_else(|| "<big int>".into(), |v| v.to_string()),
            "bool" => if self.read_int(obj)? == Some(1) {
                "True"
            } else {
                "False"
            }
            .into(),
            "float" => format!("{:?}", self.read_float(obj)?),
            "NoneType" => "None".into(),
            "bytes" => {
                let b = self.read_bytes_obj(obj, 1 << 20)?;
                format!("b{:?}", String::from_utf8_lossy(&b[..b.len().min(64)]))
            }
            "tuple" if depth > 0 => short(&self.tuple_items(obj, MAX_ITEMS)?, "(", ")")?,
            "list" if depth > 0 => short(&self.list_items(obj, MAX_ITEMS)?, "[", "]")?,
            "dict" if depth > 0 => {
                let e = self.dict_entries(obj, 9)?;
                let shown: Vec<String> = e
                    .iter()
                    .take(8)
                    .map(|&(k, v)| {
                        format!(
                            "{}: {}",
                            self.repr_depth(k, 0).unwrap_or_else(|_| "?".into()),
                            self.repr_depth(v, depth - 1).unwrap_or_else(|_| "?".into())
                        )
                    })
                    .collect();
                let more = if e.len() > 8 { ", …" } else { "" };
                format!("{{{}{more}}}", shown.join(", "))
            }
            "function" => {
                let q = self.ptr(obj + u64::from(self.layout.function.qualname))?;
                format!("<function {}>", self.read_str(q).unwrap_or_default())
            }
            "module" => match self.getattr(obj, "__name__")? {
                Some(n) => format!("<module {:?}>", self.read_str(n)?),
                None => "<module>".into(),
            },
            _ => format!("<{ty} object at {obj:#x}>"),
        })
    }
}
