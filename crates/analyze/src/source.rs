//! Finding the Python files of a tree, naming their modules, and mapping
//! byte offsets to 1-based lines.

use rustc_hash::FxHashMap;
use std::path::{Path, PathBuf};

use crate::AnalyzeError;

/// Directory names never descended into: caches, VCS, virtual environments,
/// build output and pymedic's own state.
const SKIP_DIRS: &[&str] = &[
    "__pycache__",
    "node_modules",
    "site-packages",
    "venv",
    "env",
    "build",
    "dist",
];

/// One Python file to analyse.
#[derive(Clone, Debug)]
pub struct SourceFile {
    /// Where to read it.
    pub path: PathBuf,
    /// Path relative to the analysed root, with `/` separators (the file's
    /// name in findings).
    pub rel: String,
    /// Dotted module name (`pkg.sub.mod`, `pkg` for `pkg/__init__.py`).
    pub module: String,
    /// `__init__.py`.
    pub is_package: bool,
    /// Its size when discovered (0 if unknown): the largest files are
    /// parsed first.
    pub size: u64,
}

/// Lists the `.py` files under `root` (or `root` itself when it is a file),
/// sorted by relative path, with their module names. Hidden directories,
/// caches and virtual environments are skipped; symlinked directories are
/// not followed.
pub fn discover(root: &Path) -> Result<Vec<SourceFile>, AnalyzeError> {
    let meta = std::fs::metadata(root).map_err(|source| AnalyzeError::Read {
        path: root.to_path_buf(),
        source,
    })?;
    let mut paths = Vec::new();
    if meta.is_file() {
        if root.extension().is_none_or(|e| e != "py") {
            return Err(AnalyzeError::NotPython {
                path: root.to_path_buf(),
            });
        }
        paths.push((root.to_path_buf(), meta.len()));
    } else {
        walk(root, &mut paths)?;
    }
    paths.sort_by_cached_key(|(p, _)| path_key(p));
    let base = if meta.is_file() {
        root.parent().unwrap_or(Path::new("")).to_path_buf()
    } else {
        root.to_path_buf()
    };
    let mut namer = ModuleNamer::default();
    let files = paths
        .into_iter()
        .map(|(path, size)| {
            let rel = path
                .strip_prefix(&base)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            let is_package = path.file_name().is_some_and(|n| n == "__init__.py");
            let module = namer.module_name(&path);
            SourceFile {
                path,
                rel,
                module,
                is_package,
                size,
            }
        })
        .collect();
    Ok(files)
}

/// A key that sorts as [`Path`]'s own order (component by component), but
/// by plain byte comparison: the path's bytes with each `/` made a 0 byte,
/// which ranks below every byte a name can hold. For paths built by joining
/// names onto one root, as [`walk`]'s are. (Sorting the standard library's
/// paths by `Path` parsed their components at every comparison: 4 M
/// instructions before any worker started.)
fn path_key(p: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut key = p.as_os_str().as_bytes().to_vec();
    for b in &mut key {
        if *b == b'/' {
            *b = 0;
        }
    }
    key
}

/// The `.py` files under `dir` with their sizes. A size comes from the
/// directory entry (a lookup relative to the open directory, not a walk of
/// the whole path); a symlink's is its target's.
fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64)>) -> Result<(), AnalyzeError> {
    let entries = std::fs::read_dir(dir).map_err(|source| AnalyzeError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries.flatten() {
        let Ok(ft) = entry.file_type() else { continue };
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if ft.is_dir() {
            if name.starts_with('.') || SKIP_DIRS.contains(&name.as_ref()) {
                continue;
            }
            // A directory we cannot read is skipped, not fatal: the rest of
            // the tree is still worth analysing.
            let _ = walk(&entry.path(), out);
        } else if (ft.is_file() || ft.is_symlink()) && name.ends_with(".py") {
            let path = entry.path();
            let size = if ft.is_symlink() {
                std::fs::metadata(&path).map_or(0, |m| m.len())
            } else {
                entry.metadata().map_or(0, |m| m.len())
            };
            out.push((path, size));
        }
    }
    Ok(())
}

/// Names modules the way the import system would: a file's package chain is
/// every enclosing directory with an `__init__.py`.
#[derive(Default)]
struct ModuleNamer {
    package_names: FxHashMap<PathBuf, Option<String>>,
}

impl ModuleNamer {
    fn module_name(&mut self, file: &Path) -> String {
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let package = file.parent().and_then(|d| self.package_name(d));
        match (package, stem == "__init__") {
            (Some(p), true) => p,
            (Some(p), false) => format!("{p}.{stem}"),
            (None, true) => String::new(),
            (None, false) => stem,
        }
    }

    /// The dotted name of the package `dir` is (None if it is not one):
    /// every enclosing directory with an `__init__.py`, outermost first.
    /// Remembered per directory.
    fn package_name(&mut self, dir: &Path) -> Option<String> {
        match self.package_names.get(dir) {
            Some(name) => name.clone(),
            None => {
                let name = if dir.as_os_str().is_empty() || !dir.join("__init__.py").is_file() {
                    None
                } else {
                    dir.file_name().map(|n| {
                        let n = n.to_string_lossy();
                        match dir.parent().and_then(|p| self.package_name(p)) {
                            Some(outer) => format!("{outer}.{n}"),
                            None => n.into_owned(),
                        }
                    })
                };
                self.package_names.insert(dir.to_path_buf(), name.clone());
                name
            }
        }
    }
}

/// Number of lines of `text` (a trailing newline does not start a new
/// one; an empty text has one), as [`LineIndex::count`].
pub fn count_lines(text: &str) -> u32 {
    let newlines = memchr::memchr_iter(b'\n', text.as_bytes()).count() as u32;
    newlines + 1 - u32::from(text.ends_with('\n'))
}

/// Byte offset → 1-based line, by counting the newlines between the offset
/// asked and the one asked before. For a walk that asks in
/// mostly increasing order, as extraction does, that is one pass over the
/// text, where [`LineIndex`] first records every line start (2.6 % of
/// `analyze`'s instructions on the standard library) and then searches.
#[derive(Debug)]
pub struct LineCursor<'t> {
    text: &'t [u8],
    offset: std::cell::Cell<usize>,
    line: std::cell::Cell<u32>,
}

impl<'t> LineCursor<'t> {
    pub fn new(text: &'t str) -> LineCursor<'t> {
        LineCursor {
            text: text.as_bytes(),
            offset: std::cell::Cell::new(0),
            line: std::cell::Cell::new(1),
        }
    }

    /// The 1-based line holding byte `offset` (the last line past the end),
    /// as [`LineIndex::line`].
    pub fn line(&self, offset: u32) -> u32 {
        let to = (offset as usize).min(self.text.len());
        let from = self.offset.get();
        let line = if to >= from {
            self.line.get() + newlines(&self.text[from..to])
        } else {
            self.line.get() - newlines(&self.text[to..from])
        };
        self.offset.set(to);
        self.line.set(line);
        line
    }
}

/// Newlines in `bytes`. Most gaps a walk asks about are a few dozen bytes,
/// where memchr's vectorised count pays more to dispatch than to count.
#[inline]
fn newlines(bytes: &[u8]) -> u32 {
    if bytes.len() < 64 {
        let mut n = 0;
        for &b in bytes {
            n += u32::from(b == b'\n');
        }
        n
    } else {
        memchr::memchr_iter(b'\n', bytes).count() as u32
    }
}

/// Byte offset → 1-based line.
#[derive(Clone, Debug)]
pub struct LineIndex {
    starts: Vec<u32>,
}

impl LineIndex {
    pub fn new(text: &str) -> LineIndex {
        let mut starts = vec![0u32];
        starts.extend(
            memchr_newlines(text.as_bytes()).map(|i| u32::try_from(i + 1).unwrap_or(u32::MAX)),
        );
        LineIndex { starts }
    }

    /// The 1-based line holding byte `offset`.
    pub fn line(&self, offset: u32) -> u32 {
        match self.starts.binary_search(&offset) {
            Ok(i) => i as u32 + 1,
            Err(i) => i as u32,
        }
    }

    /// Number of lines (a trailing newline does not start a new one).
    pub fn count(&self, text: &str) -> u32 {
        let n = self.starts.len() as u32;
        if text.ends_with('\n') { n - 1 } else { n }
    }

    /// Byte offset where 1-based `line` starts.
    pub fn line_start(&self, line: u32) -> u32 {
        self.starts
            .get(line.saturating_sub(1) as usize)
            .copied()
            .unwrap_or(u32::MAX)
    }
}

fn memchr_newlines(bytes: &[u8]) -> impl Iterator<Item = usize> + '_ {
    memchr::memchr_iter(b'\n', bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_one_based() {
        let text = "a\nbb\n\nccc";
        let idx = LineIndex::new(text);
        assert_eq!(idx.line(0), 1);
        assert_eq!(idx.line(2), 2);
        assert_eq!(idx.line(5), 3);
        assert_eq!(idx.line(6), 4);
        assert_eq!(idx.count(text), 4);
        assert_eq!(LineIndex::new("a\n").count("a\n"), 1);
        assert_eq!(idx.line_start(2), 2);
    }

    #[test]
    fn the_line_cursor_agrees_with_the_index_in_any_order() {
        for text in ["", "a", "\n", "a\nbb\n\nccc", "x\n\n\ny\n", "é\nü\n"] {
            let idx = LineIndex::new(text);
            let cur = LineCursor::new(text);
            let n = text.len() as u32;
            let offsets: Vec<u32> = (0..=n + 2)
                .chain((0..=n + 2).rev())
                .chain([n / 2, 0, n])
                .collect();
            for o in offsets {
                assert_eq!(cur.line(o), idx.line(o), "{text:?} at {o}");
            }
            assert_eq!(count_lines(text), idx.count(text), "{text:?}");
        }
    }

    #[test]
    fn paths_sort_as_path_orders_them() {
        let names = [
            "/r/a/b.py",
            "/r/a.b.py",
            "/r/a-c/x.py",
            "/r/ab/c.py",
            "/r/a/c.py",
            "/r/a.py",
            "/r/a/b/c.py",
            "/r/A.py",
            "/r/é.py",
            "/r/a /x.py",
            "/r/a0.py",
            "/r/a/__init__.py",
        ];
        let mut ours: Vec<&Path> = names.iter().map(Path::new).collect();
        let mut std_order = ours.clone();
        ours.sort_by_cached_key(|p| path_key(p));
        std_order.sort();
        assert_eq!(ours, std_order);
    }

    #[test]
    fn modules_follow_init_files() {
        let dir = tempdir();
        std::fs::create_dir_all(dir.join("pkg/sub")).unwrap();
        std::fs::create_dir_all(dir.join(".venv")).unwrap();
        for f in [
            "pkg/__init__.py",
            "pkg/a.py",
            "pkg/sub/__init__.py",
            "pkg/sub/b.py",
            "top.py",
            ".venv/x.py",
        ] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        let files = discover(&dir).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| (f.rel.as_str(), f.module.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("pkg/__init__.py", "pkg"),
                ("pkg/a.py", "pkg.a"),
                ("pkg/sub/__init__.py", "pkg.sub"),
                ("pkg/sub/b.py", "pkg.sub.b"),
                ("top.py", "top"),
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "pymedic-analyze-src-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
