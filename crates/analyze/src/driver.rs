//! Runs an analysis: discover, parse and extract in parallel, then the
//! whole-program passes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pymedic_model::Finding;

use crate::facts::FileFacts;
use crate::source::{self, SourceFile};
use crate::symbols::Program;
use crate::{AnalyzeError, ImportGraph, blocking, containers, imports, locks, report};

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Worker threads for parsing (0: one per CPU).
    pub threads: usize,
    /// Called with (files done, files total) as parsing progresses.
    pub progress: Option<fn(usize, usize)>,
}

/// The result of analysing a tree.
pub struct Analysis {
    pub root: PathBuf,
    pub program: Program,
    pub graph: ImportGraph,
    pub findings: Vec<Finding>,
    pub files: usize,
    pub lines: u64,
    pub bytes: u64,
    pub parse_time: Duration,
    pub total_time: Duration,
}

impl Analysis {
    /// The finding with this id.
    pub fn finding(&self, id: &str) -> Option<&Finding> {
        self.findings.iter().find(|f| f.id.0 == id)
    }
}

/// Analyses the Python files under `root` (a directory or one `.py` file).
pub fn analyze(root: &Path, opts: &Options) -> Result<Analysis, AnalyzeError> {
    let files = source::discover(root)?;
    if files.is_empty() {
        return Err(AnalyzeError::NoFiles {
            path: root.to_path_buf(),
        });
    }
    analyze_files(root, files, opts)
}

/// Analyses an explicit list of files (relative names and module names
/// already set), e.g. a subset of a large tree.
pub fn analyze_files(
    root: &Path,
    files: Vec<SourceFile>,
    opts: &Options,
) -> Result<Analysis, AnalyzeError> {
    let started = Instant::now();
    let (facts, bytes) = parse_all(&files, opts)?;
    let parse_time = started.elapsed();
    let lines = facts.iter().map(|f| u64::from(f.lines)).sum();
    let program = Program::new(facts);
    let p = &program;
    // Every whole-program pass at once: the lock, event-loop and container
    // passes on threads of their own (the first two share the lock
    // resolution and the calls resolved on demand, through `OnceLock`s),
    // while this thread builds the import graph and runs the rest.
    let (graph, mut findings) = std::thread::scope(|s| {
        let locks = s.spawn(|| locks::findings(p));
        let blocking = s.spawn(|| blocking::findings(p));
        let containers = s.spawn(|| containers::findings(p));
        let graph = imports::graph(p);
        let mut out = report::syntax_errors(p);
        out.extend(imports::cycle_findings(p, &graph));
        out.extend(report::leak_findings(p));
        for h in [locks, blocking, containers] {
            match h.join() {
                Ok(f) => out.extend(f),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        (graph, out)
    });
    findings.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then_with(|| a.location.cmp(&b.location))
            .then_with(|| a.kind.cmp(&b.kind))
    });
    findings.dedup_by(|a, b| a.id == b.id);
    Ok(Analysis {
        root: root.to_path_buf(),
        program,
        graph,
        findings,
        files: files.len(),
        lines,
        bytes,
        parse_time,
        total_time: started.elapsed(),
    })
}

/// Parses and extracts every file on `opts.threads` workers.
fn parse_all(files: &[SourceFile], opts: &Options) -> Result<(Vec<FileFacts>, u64), AnalyzeError> {
    let all = on_workers(files, opts, |file| {
        let (text, n) = read(file);
        let mut facts = crate::extract::extract(file, text.as_deref().unwrap_or(""));
        if let Err(e) = text {
            facts.syntax_errors.push(crate::facts::SyntaxErrorFact {
                line: 0,
                message: format!("could not read the file: {e}"),
            });
        }
        (facts, n)
    })?;
    crate::arena::trim();
    let bytes = all.iter().map(|(_, n)| n).sum();
    Ok((all.into_iter().map(|(f, _)| f).collect(), bytes))
}

/// What the parser alone costs: the files under `root` read and parsed on
/// the same workers as [`analyze`], with nothing extracted. The floor under
/// any analysis built on this parser (`cargo xtask bench analyze` prints it).
pub fn parse_only(root: &Path, opts: &Options) -> Result<ParseOnly, AnalyzeError> {
    let files = source::discover(root)?;
    let started = Instant::now();
    let all = on_workers(&files, opts, |file| {
        let (text, n) = read(file);
        let text = text.unwrap_or_default();
        crate::arena::parse_python(&text, |parsed| std::hint::black_box(parsed.errors().len()));
        (u64::from(source::count_lines(&text)), n)
    })?;
    crate::arena::trim();
    Ok(ParseOnly {
        files: files.len(),
        lines: all.iter().map(|r| r.0).sum(),
        bytes: all.iter().map(|r| r.1).sum(),
        time: started.elapsed(),
    })
}

/// The result of [`parse_only`].
#[derive(Clone, Debug)]
pub struct ParseOnly {
    pub files: usize,
    pub lines: u64,
    pub bytes: u64,
    pub time: Duration,
}

/// Runs `work` on every file on `opts.threads` workers; results in the
/// order of `files`. Workers get a large stack: deeply nested expressions
/// recurse.
fn on_workers<T: Send>(
    files: &[SourceFile],
    opts: &Options,
    work: impl Fn(&SourceFile) -> T + Sync,
) -> Result<Vec<T>, AnalyzeError> {
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    }
    .clamp(1, files.len().max(1));
    let order = largest_first(files);
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let work = &work;
    let results: Vec<Vec<(usize, T)>> = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for i in 0..threads {
            let handle = std::thread::Builder::new()
                .name(format!("analyze-{i}"))
                .stack_size(64 << 20)
                .spawn_scoped(s, || {
                    let mut out = Vec::new();
                    while let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
                        out.push((i, work(&files[i])));
                        let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                        if let Some(p) = opts.progress {
                            p(d, files.len());
                        }
                    }
                    out
                })
                .map_err(AnalyzeError::Thread)?;
            handles.push(handle);
        }
        Ok::<_, AnalyzeError>(
            handles
                .into_iter()
                .map(|h| match h.join() {
                    Ok(out) => out,
                    Err(panic) => std::panic::resume_unwind(panic),
                })
                .collect(),
        )
    })?;
    // Each result straight to its file's place (sorting moved them all
    // O(n log n) times, on the serial path).
    let mut slots: Vec<Option<T>> = std::iter::repeat_with(|| None).take(files.len()).collect();
    for (i, r) in results.into_iter().flatten() {
        slots[i] = Some(r);
    }
    Ok(slots
        .into_iter()
        .map(|r| r.expect("every file has a result: the workers took every index"))
        .collect())
}

/// File indices, largest file first: workers take the next file as they
/// finish one, so the big ones start early and the small ones fill the gaps
/// at the end instead of one worker finishing a large file alone.
fn largest_first(files: &[SourceFile]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..files.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(files[i].size));
    order
}

/// A file's text (lossily decoded when it is not UTF-8) and its size.
fn read(file: &SourceFile) -> (std::io::Result<String>, u64) {
    match std::fs::read(&file.path) {
        Ok(bytes) => {
            let n = bytes.len() as u64;
            // Valid UTF-8 (nearly every file) is validated at memory speed;
            // only a broken file pays for the lossy copy.
            let text = String::from_utf8(bytes)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
            (Ok(text), n)
        }
        Err(e) => (Err(e), 0),
    }
}
