//! Explaining runtime findings statically.
//!
//! A runtime finding (from `diagnose`, `dump` or the agent) names a site as
//! the target sees it (`/app/svc/db.py:fetch:42`). Given the directory the
//! target's files are reachable under (`/proc/PID/root`, or `/` for a
//! process in our mount namespace), [`Enricher::explain`] analyses the
//! project that file belongs to and returns the static findings that explain
//! it as extra [`Related`] entries (role prefixed `static: `), with files in
//! the target's view:
//!
//! ```text
//! static: file `conn` from socket.create_connection() at line 30 is not closed ...
//! static: exit path at line 42 (return) skips conn.close()
//! ```
//!
//! Which static kinds explain which runtime kinds: `fd_leak`, `resource_leak`,
//! `thread_leak` ← `fd_leak`/`resource_leak`; `deadlock`,
//! `lock_order_inversion`, `lock_contention`, `hang` ← `lock_order_inversion`
//! and `deadlock` (a non-reentrant lock re-taken while held);
//! `blocked_event_loop` ← `blocked_event_loop`; `memory_leak` ← `memory_leak`.
//! Analyses are cached per project directory.

use rustc_hash::FxHashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use pymedic_model::{Finding, Kind, Location, Related};

use crate::{Analysis, AnalyzeError, Options, source};

/// Projects bigger than this are narrowed to the file's top-level package.
const MAX_FILES: usize = 4000;
/// At most this many related entries are added to one finding.
const MAX_RELATED: usize = 24;

/// Explains runtime findings from source; caches one analysis per project.
#[derive(Default)]
pub struct Enricher {
    cache: Mutex<FxHashMap<PathBuf, Arc<Analysis>>>,
}

/// One-shot [`Enricher::explain`] without a cache.
pub fn enrich(finding: &Finding, source_root: &Path) -> Result<Vec<Related>, AnalyzeError> {
    Enricher::new().explain(finding, source_root)
}

impl Enricher {
    pub fn new() -> Enricher {
        Enricher::default()
    }

    /// Forgets cached analyses (e.g. after the target's code changed).
    pub fn clear(&self) {
        if let Ok(mut c) = self.cache.lock() {
            c.clear();
        }
    }

    /// The static explanation of `finding`: related entries to append to
    /// `finding.related`. Empty when the file is not readable under
    /// `source_root` or nothing static explains it.
    pub fn explain(
        &self,
        finding: &Finding,
        source_root: &Path,
    ) -> Result<Vec<Related>, AnalyzeError> {
        let wanted: &[Kind] = match finding.kind.as_str() {
            "fd_leak" | "resource_leak" | "thread_leak" => &[Kind::FD_LEAK, Kind::RESOURCE_LEAK],
            "deadlock" | "lock_order_inversion" | "lock_contention" | "hang" => {
                &[Kind::LOCK_ORDER_INVERSION, Kind::DEADLOCK]
            }
            "blocked_event_loop" => &[Kind::BLOCKED_EVENT_LOOP],
            "memory_leak" => &[Kind::MEMORY_LEAK],
            _ => return Ok(Vec::new()),
        };
        let mut sites: Vec<Location> = vec![finding.location.clone()];
        sites.extend(finding.related.iter().map(Related::location));
        sites.extend(finding.stacks.iter().flat_map(|s| s.frames.iter().cloned()));
        let Some(host) = sites
            .iter()
            .map(|l| host_path(source_root, &l.file))
            .find(|p| p.is_file())
        else {
            return Ok(Vec::new());
        };
        let project = project_dir(&host);
        let analysis = self.analysis(&project)?;
        let base = if analysis.root.is_file() {
            analysis
                .root
                .parent()
                .unwrap_or(Path::new("/"))
                .to_path_buf()
        } else {
            analysis.root.clone()
        };
        let Some(rel) = host
            .strip_prefix(&base)
            .ok()
            .map(|r| r.to_string_lossy().replace('\\', "/"))
        else {
            return Ok(Vec::new());
        };
        // The target's path prefix for the analysed root: runtime file minus `rel`.
        let runtime_file = sites
            .iter()
            .find(|l| host_path(source_root, &l.file) == host)
            .map(|l| l.file.clone())
            .unwrap_or_default();
        let prefix = runtime_file
            .strip_suffix(&rel)
            .unwrap_or_default()
            .to_owned();
        let to_target = |file: &str| format!("{prefix}{file}");
        // Runtime sites in static terms.
        let runtime: Vec<(String, String, u32)> = sites
            .iter()
            .filter_map(|l| {
                let h = host_path(source_root, &l.file);
                let r = h.strip_prefix(&base).ok()?;
                Some((
                    r.to_string_lossy().replace('\\', "/"),
                    l.function.clone(),
                    l.line,
                ))
            })
            .collect();
        let mut scored: Vec<(u32, &Finding)> = analysis
            .findings
            .iter()
            .filter(|f| wanted.contains(&f.kind))
            .filter_map(|f| score(f, &runtime).map(|s| (s, f)))
            .collect();
        scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.id.cmp(&b.1.id)));
        // Only the closest matches: a same-line or same-function explanation
        // makes file-only ones noise.
        let top = scored.first().map_or(0, |s| s.0);
        scored.retain(|s| s.0 == top);
        let mut out = Vec::new();
        for (_, f) in scored.into_iter().take(3) {
            out.push(Related {
                file: to_target(&f.location.file),
                function: f.location.function.clone(),
                line: f.location.line,
                role: format!("static: {}", f.title),
            });
            for r in &f.related {
                out.push(Related {
                    file: to_target(&r.file),
                    function: r.function.clone(),
                    line: r.line,
                    role: format!("static: {}", r.role),
                });
            }
        }
        out.dedup_by(|a, b| a.file == b.file && a.line == b.line && a.role == b.role);
        out.truncate(MAX_RELATED);
        Ok(out)
    }

    fn analysis(&self, project: &Path) -> Result<Arc<Analysis>, AnalyzeError> {
        if let Some(a) = self.cache.lock().ok().and_then(|c| c.get(project).cloned()) {
            return Ok(a);
        }
        let files = source::discover(project)?;
        if files.is_empty() {
            return Err(AnalyzeError::NoFiles {
                path: project.to_path_buf(),
            });
        }
        let opts = Options {
            threads: 2,
            progress: None,
        };
        let a = Arc::new(crate::analyze_files(project, files, &opts)?);
        if let Ok(mut c) = self.cache.lock() {
            c.insert(project.to_path_buf(), a.clone());
        }
        Ok(a)
    }
}

/// How well a static finding matches the runtime sites (None: not at all).
fn score(f: &Finding, runtime: &[(String, String, u32)]) -> Option<u32> {
    let mut best = None;
    let statics =
        std::iter::once(f.location.clone()).chain(f.related.iter().map(Related::location));
    for s in statics {
        for (file, function, line) in runtime {
            if s.file != *file {
                continue;
            }
            let same_fn = s.function == *function
                || s.function.ends_with(&format!(".{function}"))
                || function.ends_with(&format!(".{}", s.function));
            let sc = if s.line == *line {
                3
            } else if same_fn {
                2
            } else {
                1
            };
            best = best.max(Some(sc));
        }
    }
    // A file-only match is enough for leaks and containers, not for locks or
    // the event loop (another coroutine in the same file is another cause).
    match best {
        Some(1)
            if f.kind == Kind::LOCK_ORDER_INVERSION
                || f.kind == Kind::DEADLOCK
                || f.kind == Kind::BLOCKED_EVENT_LOOP =>
        {
            None
        }
        b => b,
    }
}

/// The target's `file` as seen from here.
fn host_path(source_root: &Path, file: &str) -> PathBuf {
    let p = Path::new(file);
    if p.is_absolute() {
        source_root.join(p.strip_prefix("/").unwrap_or(p))
    } else {
        source_root.join(p)
    }
}

/// The directory holding the file's top-level package (or the file's own
/// directory for a script), narrowed to the package itself when the
/// directory is huge (site-packages, /usr/lib/python3.x).
fn project_dir(file: &Path) -> PathBuf {
    let mut dir = file.parent().unwrap_or(Path::new("/")).to_path_buf();
    let mut top_pkg = None;
    while dir.join("__init__.py").is_file() {
        top_pkg = Some(dir.clone());
        match dir.parent() {
            Some(p) => dir = p.to_path_buf(),
            None => break,
        }
    }
    let count = count_py(&dir, MAX_FILES + 1);
    if count > MAX_FILES {
        // A package, or just the file when it is a lone module in a huge directory.
        return match top_pkg {
            Some(p) if count_py(&p, MAX_FILES + 1) <= MAX_FILES => p,
            _ => file.to_path_buf(),
        };
    }
    dir
}

fn count_py(dir: &Path, limit: usize) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let name = e.file_name();
            let name = name.to_string_lossy();
            if ft.is_dir() && !name.starts_with('.') && name != "__pycache__" {
                stack.push(e.path());
            } else if name.ends_with(".py") {
                n += 1;
                if n >= limit {
                    return n;
                }
            }
        }
    }
    n
}
