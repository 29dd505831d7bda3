//! Facts read from an interpreter's ELF file (the executable or
//! `libpython3.X.so`): symbol addresses, load segments, constants.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};

use crate::version::Version;

/// Errors reading an ELF file.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse ELF {path}: {source}")]
    Parse {
        path: PathBuf,
        source: object::Error,
    },
}

/// An ELF file mapped read-only, with the symbols pymedic looks up.
pub struct ElfFile {
    path: PathBuf,
    map: memmap2::Mmap,
    symbols: HashMap<String, (u64, u64)>,
    first_load_vaddr: u64,
}

/// Symbols worth indexing: interpreter entry points and data pymedic reads.
fn interesting(name: &str) -> bool {
    name.starts_with("Py") || name.starts_with("_Py") || name.starts_with("PyThread")
}

impl ElfFile {
    /// Maps `path` and indexes its `Py*`/`_Py*` symbols (dynamic and static).
    pub fn open(path: &Path) -> Result<ElfFile, ElfError> {
        let file = File::open(path).map_err(|source| ElfError::Open {
            path: path.to_owned(),
            source,
        })?;
        // SAFETY: the file is mapped read-only and private; if another
        // process truncates it while mapped we could fault, which is the
        // accepted risk of every ELF reader using mmap (binaries in use are
        // not truncated: the kernel refuses writes to a running executable).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ElfError::Open {
            path: path.to_owned(),
            source,
        })?;
        let obj = object::File::parse(&*map).map_err(|source| ElfError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let mut symbols = HashMap::new();
        for sym in obj.dynamic_symbols().chain(obj.symbols()) {
            if let Ok(name) = sym.name()
                && interesting(name)
                && sym.address() != 0
            {
                symbols
                    .entry(name.to_owned())
                    .or_insert((sym.address(), sym.size()));
            }
        }
        let first_load_vaddr = obj.segments().map(|s| s.address()).min().unwrap_or(0);
        Ok(ElfFile {
            path: path.to_owned(),
            map,
            symbols,
            first_load_vaddr,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The link-time address of `name`, if the file defines it.
    pub fn symbol(&self, name: &str) -> Option<u64> {
        self.symbols.get(name).map(|&(addr, _)| addr)
    }

    /// Whether the file defines `name`.
    pub fn has_symbol(&self, name: &str) -> bool {
        self.symbols.contains_key(name)
    }

    /// Lowest `PT_LOAD` virtual address (page-aligned down), used to compute
    /// the load bias from the mapping at file offset 0.
    pub fn first_load_vaddr(&self) -> u64 {
        self.first_load_vaddr & !0xfff
    }

    /// Reads `len` bytes at link-time address `vaddr` from the file's
    /// sections (initialised data only).
    pub fn read_vaddr(&self, vaddr: u64, len: usize) -> Option<&[u8]> {
        let obj = object::File::parse(&*self.map).ok()?;
        for section in obj.sections() {
            let start = section.address();
            if vaddr >= start && vaddr + len as u64 <= start + section.size() {
                let (offset, _) = section.file_range()?;
                let begin = (offset + (vaddr - start)) as usize;
                return self.map.get(begin..begin + len);
            }
        }
        None
    }

    /// The exact interpreter version from the `Py_Version` constant (3.11+).
    pub fn py_version_constant(&self) -> Option<Version> {
        let addr = self.symbol("Py_Version")?;
        let bytes = self.read_vaddr(addr, 4)?;
        Some(Version::from_hex(u32::from_le_bytes(
            bytes.try_into().ok()?,
        )))
    }

    /// Finds `PY_VERSION` ("3.9.18") for a known `major.minor` in
    /// `.rodata`. The literal may share its tail with another string (the
    /// linker merges suffixes, e.g. ".../Python-3.9.18"), so a match may be
    /// preceded by any non-digit, non-dot byte; it must end in NUL. The most
    /// frequent candidate wins.
    pub fn version_string(&self, major: u8, minor: u8) -> Option<Version> {
        let obj = object::File::parse(&*self.map).ok()?;
        let data = obj.section_by_name(".rodata")?.data().ok()?;
        scan_version(data, major, minor)
    }
}

/// Whether the ELF file at `path` lists a `libpython3.X.so` in `DT_NEEDED`
/// (it will map the interpreter once the dynamic loader runs).
pub fn needs_libpython(path: &str) -> Result<bool, ElfError> {
    let open_err = |source| ElfError::Open {
        path: PathBuf::from(path),
        source,
    };
    let file = File::open(path).map_err(open_err)?;
    // SAFETY: read-only private mapping; see `ElfFile::open`.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(open_err)?;
    let obj =
        object::read::elf::ElfFile64::<object::Endianness>::parse(&*map).map_err(|source| {
            ElfError::Parse {
                path: PathBuf::from(path),
                source,
            }
        })?;
    Ok(needed_libs(&obj)
        .iter()
        .any(|n| n.starts_with("libpython3")))
}

fn needed_libs(obj: &object::read::elf::ElfFile64<'_, object::Endianness>) -> Vec<String> {
    use object::read::elf::{Dyn, FileHeader, SectionHeader};
    let endian = obj.endian();
    let data = obj.data();
    let mut out = Vec::new();
    let Ok(sections) = obj.elf_header().sections(endian, data) else {
        return out;
    };
    for section in sections.iter() {
        let Ok(Some((dyns, link))) = section.dynamic(endian, data) else {
            continue;
        };
        let Ok(strings) = sections.strings(endian, data, link) else {
            continue;
        };
        for d in dyns {
            if d.tag(endian) == object::elf::DT_NEEDED
                && let Ok(name) = d.string(endian, strings)
            {
                out.push(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    out
}

fn scan_version(data: &[u8], major: u8, minor: u8) -> Option<Version> {
    let needle = format!("{major}.{minor}.");
    let needle = needle.as_bytes();
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut i = 0;
    while let Some(pos) = find(&data[i..], needle) {
        let at = i + pos;
        i = at + 1;
        if at > 0 && (data[at - 1].is_ascii_digit() || data[at - 1] == b'.') {
            continue;
        }
        let rest = &data[at..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(rest.len())
            .min(16);
        if rest.get(end) != Some(&0) {
            continue;
        }
        if let Ok(s) = std::str::from_utf8(&rest[..end])
            && let Some(v) = Version::parse(s)
            && v.patch.is_some()
        {
            *counts.entry(v.to_string()).or_default() += 1;
        }
    }
    let best = counts.into_iter().max_by_key(|(s, n)| (*n, s.clone()))?;
    Version::parse(&best.0)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_scan_handles_tail_merged_literals() {
        let data = b"\0junk\0/tmp/build/Python-3.9.18\0other 3.9.1x\0";
        assert_eq!(scan_version(data, 3, 9).unwrap().to_string(), "3.9.18");
        let data = b"\x003.10.13\0\x003.10.13\0not13.10.2\0";
        assert_eq!(scan_version(data, 3, 10).unwrap().to_string(), "3.10.13");
        assert!(scan_version(b"\0nothing here\0", 3, 8).is_none());
    }
}
