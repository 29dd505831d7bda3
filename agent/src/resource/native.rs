//! Native instruction addresses → `function (library)`, for the code that
//! first wrote a new page (a C extension filling its buffer, libc's
//! `memset`, pymalloc carving a pool). Symbols come from each ELF file's
//! `.symtab` and `.dynsym`, read through `/proc/PID/root` so containers
//! work; stripped code shows as `library+0xOFFSET`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use object::{Object, ObjectSegment, ObjectSymbol};
use pymedic_python::maps::{self, Mapping};

/// A symbolized native address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NativeFrame {
    /// Function name, or `+0xOFFSET` when the file has no symbol for it.
    pub function: String,
    /// The mapped file's path as the target sees it (`[anon]` if none).
    pub library: String,
}

impl NativeFrame {
    /// `memset (libc.so.6)`.
    pub fn label(&self) -> String {
        let lib = self.library.rsplit('/').next().unwrap_or(&self.library);
        format!("{} ({lib})", self.function)
    }
}

struct SymbolTable {
    /// (start, end, name), sorted by start.
    symbols: Vec<(u64, u64, String)>,
    /// Lowest PT_LOAD virtual address.
    base_vaddr: u64,
}

/// Caches symbol tables per file and mappings per process.
#[derive(Default)]
pub struct NativeSymbolizer {
    tables: HashMap<PathBuf, Option<Arc<SymbolTable>>>,
    maps: HashMap<u32, Vec<Mapping>>,
}

impl NativeSymbolizer {
    pub fn new() -> NativeSymbolizer {
        NativeSymbolizer::default()
    }

    /// Forgets `pid`'s mappings (call when libraries may have been loaded).
    pub fn refresh(&mut self, pid: u32) {
        self.maps.remove(&pid);
    }

    /// Symbolizes `ip` in `pid`.
    pub fn symbolize(&mut self, pid: u32, ip: u64) -> NativeFrame {
        let Some(m) = self
            .maps
            .entry(pid)
            .or_insert_with(|| maps::read(pid).unwrap_or_default())
            .iter()
            .find(|m| m.contains(ip) && m.is_exec())
            .cloned()
        else {
            return NativeFrame {
                function: format!("{ip:#x}"),
                library: "[anon]".into(),
            };
        };
        let Some(path) = m.path.clone().filter(|p| !p.starts_with('[')) else {
            return NativeFrame {
                function: format!("{ip:#x}"),
                library: m.path.unwrap_or_else(|| "[anon]".into()),
            };
        };
        let host = maps::host_path(pid, &path);
        let table = self
            .tables
            .entry(host.clone())
            .or_insert_with(|| load(pid, &host).map(Arc::new))
            .clone();
        let file_off = ip - m.start + m.offset;
        let function = match table {
            Some(t) => {
                // For the usual layouts (PIE and shared objects mapped
                // from offset 0), vaddr = file offset + base vaddr.
                let vaddr = file_off + t.base_vaddr;
                lookup(&t.symbols, vaddr).unwrap_or_else(|| format!("+{file_off:#x}"))
            }
            None => format!("+{file_off:#x}"),
        };
        NativeFrame {
            function,
            library: path,
        }
    }
}

fn lookup(symbols: &[(u64, u64, String)], addr: u64) -> Option<String> {
    let i = symbols.partition_point(|s| s.0 <= addr);
    let (start, end, name) = symbols.get(i.checked_sub(1)?)?;
    (addr >= *start && (addr < *end || *end == *start)).then(|| name.clone())
}

/// Text symbols of an object file.
fn text_symbols(obj: &object::File<'_>) -> Vec<(u64, u64, String)> {
    obj.symbols()
        .chain(obj.dynamic_symbols())
        .filter(|s| s.kind() == object::SymbolKind::Text && s.address() != 0)
        .filter_map(|s| {
            let name = s.name().ok()?;
            Some((s.address(), s.address() + s.size(), name.to_string()))
        })
        .collect()
}

/// The file's symbols, plus those of its separate debug file
/// (`/usr/lib/debug/.build-id/xx/yyyy.debug` in the target's filesystem,
/// e.g. Debian's `libc6-dbg`) when there is one.
fn load(pid: u32, path: &std::path::Path) -> Option<SymbolTable> {
    let data = std::fs::read(path).ok()?;
    let obj = object::File::parse(&*data).ok()?;
    let mut symbols = text_symbols(&obj);
    if let Ok(Some(id)) = obj.build_id()
        && id.len() > 1
    {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let debug = maps::host_path(
            pid,
            &format!("/usr/lib/debug/.build-id/{}/{}.debug", &hex[..2], &hex[2..]),
        );
        if let Ok(d) = std::fs::read(debug)
            && let Ok(dobj) = object::File::parse(&*d)
        {
            symbols.extend(text_symbols(&dobj));
        }
    }
    symbols.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    symbols.dedup_by_key(|s| s.0);
    let base_vaddr = obj
        .segments()
        .map(|s| s.address().wrapping_sub(s.file_range().0))
        .min()
        .unwrap_or(0);
    Some(SymbolTable {
        symbols,
        base_vaddr,
    })
}

/// True for the interpreter's own code (pymalloc, object constructors).
pub fn is_interpreter(library: &str) -> bool {
    let name = library.rsplit('/').next().unwrap_or(library);
    name.starts_with("libpython3") || name.starts_with("python3")
}

/// True for the C library (`memset`, `malloc` internals).
pub fn is_libc(library: &str) -> bool {
    let name = library.rsplit('/').next().unwrap_or(library);
    name.starts_with("libc.so") || name.starts_with("libc-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbol_lookup_by_address() {
        let syms = vec![
            (0x1000, 0x1100, "a".to_string()),
            (0x1100, 0x1200, "b".to_string()),
            (0x2000, 0x2000, "sizeless".to_string()),
        ];
        assert_eq!(lookup(&syms, 0x1000).as_deref(), Some("a"));
        assert_eq!(lookup(&syms, 0x11ff).as_deref(), Some("b"));
        assert_eq!(lookup(&syms, 0x1200), None);
        assert_eq!(lookup(&syms, 0x2000).as_deref(), Some("sizeless"));
        assert_eq!(lookup(&syms, 0x10), None);
    }

    #[test]
    fn symbolizes_our_own_code() {
        let pid = std::process::id();
        let mut s = NativeSymbolizer::new();
        let f = s.symbolize(pid, libc::getpid as *const () as usize as u64);
        assert!(is_libc(&f.library), "{f:?}");
        assert!(f.function.contains("getpid"), "{f:?}");
        assert!(!is_interpreter(&f.library));
        assert!(is_interpreter(
            "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0"
        ));
        assert!(is_interpreter("/usr/bin/python3.11"));
    }
}
