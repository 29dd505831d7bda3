//! Struct member offsets from the kernel's BTF (`/sys/kernel/btf/vmlinux`),
//! for the few kernel fields eBPF programs read without CO-RE (Rust eBPF has
//! no CO-RE relocations): e.g. `task_struct.thread.fsbase`.
//!
//! A minimal reader of the BTF format (header, type section, string
//! section); it resolves member paths through typedefs, qualifiers and
//! anonymous structs/unions.

use std::path::Path;

/// Errors reading BTF.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "reading kernel BTF {path}: {source}; pymedic needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF (all major distributions since 2020)"
    )]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no {0}: this kernel is not supported")]
    NotFound(String),
}

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

#[derive(Clone, Debug)]
struct Member {
    name: u32,
    ty: u32,
    bit_offset: u32,
}

#[derive(Clone, Debug)]
struct Type {
    name: u32,
    kind: u32,
    /// Referenced type (typedefs, qualifiers).
    ty: u32,
    members: Vec<Member>,
}

/// Parsed BTF: types and strings.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap_or([0; 4])))
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_sys() -> Result<Btf, BtfError> {
        Btf::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    /// Reads BTF from a raw `.BTF` file.
    pub fn from_file(path: &Path) -> Result<Btf, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Btf::parse(&data)
    }

    /// Parses raw little-endian BTF.
    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        if data.len() < 24 || data[0..2] != [0x9f, 0xeb] {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_raw = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();
        // Type id 0 is `void`.
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            ty: 0,
            members: Vec::new(),
        }];
        let mut off = 0usize;
        while off + 12 <= types_raw.len() {
            let name = u32_at(types_raw, off)?;
            let info = u32_at(types_raw, off + 4)?;
            let size_or_type = u32_at(types_raw, off + 8)?;
            off += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                1 | 14 | 17 => 4,     // int, var, decl_tag
                3 => 12,              // array
                4 | 5 => 12 * vlen,   // struct, union
                6 | 13 => 8 * vlen,   // enum, func_proto
                15 | 19 => 12 * vlen, // datasec, enum64
                0 | 2 | 7..=12 | 16 | 18 => 0,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            if kind == KIND_STRUCT || kind == KIND_UNION {
                for i in 0..vlen {
                    let m = off + 12 * i;
                    let raw = u32_at(types_raw, m + 8)?;
                    members.push(Member {
                        name: u32_at(types_raw, m)?,
                        ty: u32_at(types_raw, m + 4)?,
                        bit_offset: if kind_flag { raw & 0x00ff_ffff } else { raw },
                    });
                }
            }
            off += extra;
            types.push(Type {
                name,
                kind,
                ty: size_or_type,
                members,
            });
        }
        Ok(Btf { types, strings })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    /// Follows typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.ty
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Byte offset of `member` in `ty`, looking into anonymous members.
    fn member_offset(&self, ty: &Type, member: &str) -> Option<(u32, u32)> {
        for m in &ty.members {
            if self.name(m.name) == member.as_bytes() {
                return Some((m.bit_offset / 8, m.ty));
            }
        }
        for m in ty.members.iter().filter(|m| m.name == 0) {
            if let Some(inner) = self.resolve(m.ty)
                && let Some((off, t)) = self.member_offset(inner, member)
            {
                return Some((m.bit_offset / 8 + off, t));
            }
        }
        None
    }

    /// Byte offset of `path` (e.g. `["thread", "fsbase"]`) in struct `name`.
    pub fn offset_of(&self, name: &str, path: &[&str]) -> Result<u32, BtfError> {
        let what = || format!("struct {name}.{}", path.join("."));
        let mut ty = self
            .types
            .iter()
            .find(|t| t.kind == KIND_STRUCT && self.name(t.name) == name.as_bytes())
            .ok_or_else(|| BtfError::NotFound(format!("struct {name}")))?;
        let mut total = 0;
        for (i, member) in path.iter().enumerate() {
            let (off, next) = self
                .member_offset(ty, member)
                .ok_or_else(|| BtfError::NotFound(what()))?;
            total += off;
            if i + 1 < path.len() {
                ty = self
                    .resolve(next)
                    .ok_or_else(|| BtfError::NotFound(what()))?;
            }
        }
        Ok(total)
    }
}

/// Offset of `thread.fsbase` in the running kernel's `task_struct`.
pub fn task_fsbase_offset() -> Result<u32, BtfError> {
    Btf::from_sys()?.offset_of("task_struct", &["thread", "fsbase"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_member_offsets() {
        // A hand-built BTF: struct inner { u64 a; u64 b; };
        // struct outer { u32 x; struct inner in; } with names in a string table.
        let strings = b"\0inner\0a\0b\0outer\0x\0in\0".to_vec();
        let s = |name: &str| {
            let pat = format!("\0{name}\0");
            strings
                .windows(pat.len())
                .position(|w| w == pat.as_bytes())
                .map(|p| p as u32 + 1)
                .unwrap()
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // id 1: int
        push(&[0, 1 << 24, 8, 64]);
        // id 2: struct inner, 2 members
        push(&[s("inner"), (4 << 24) | 2, 16, s("a"), 1, 0, s("b"), 1, 64]);
        // id 3: struct outer
        push(&[s("outer"), (4 << 24) | 2, 24, s("x"), 1, 0, s("in"), 2, 64]);
        let mut data = Vec::new();
        for w in [0xeb9f_u32 | (1 << 16), 24, 0, types.len() as u32] {
            data.extend_from_slice(&w.to_le_bytes());
        }
        for w in [types.len() as u32, strings.len() as u32] {
            data.extend_from_slice(&w.to_le_bytes());
        }
        data.extend_from_slice(&types);
        data.extend_from_slice(&strings);
        let btf = Btf::parse(&data).unwrap();
        assert_eq!(btf.offset_of("outer", &["in", "b"]).unwrap(), 16);
        assert_eq!(btf.offset_of("inner", &["b"]).unwrap(), 8);
        assert!(btf.offset_of("outer", &["nope"]).is_err());
    }

    #[test]
    fn running_kernel_has_task_fsbase() {
        if !Path::new("/sys/kernel/btf/vmlinux").exists() {
            return;
        }
        let off = task_fsbase_offset().unwrap();
        assert!(off > 1000, "fsbase offset {off} looks wrong");
    }
}
