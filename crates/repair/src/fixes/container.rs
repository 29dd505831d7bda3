//! Bound an unbounded cache: after every statement that adds to the
//! container, evict the oldest entries once it holds more than a named
//! limit (`_PYMEDIC_MAX_<NAME> = 10_000`, defined once per edited file).
//! `functools.cache` / `lru_cache(maxsize=None)` get `maxsize=1024`.

use std::collections::BTreeMap;
use std::path::Path;

use pymedic_analyze::Analysis;
use pymedic_model::Finding;
use ruff_python_ast::{Expr, Stmt};
use ruff_text_size::Ranged;

use super::{read_source, unsupported};
use crate::RepairError;
use crate::plan::{Fix, Risk};
use crate::text::{self, Edits, Source};

const LIMIT: &str = "10_000";
const CACHE_SIZE: &str = "1024";

pub fn fix(repo: &Path, _analysis: &Analysis, finding: &Finding) -> Result<Fix, RepairError> {
    if finding.evidence.get("cache").is_some() {
        return cache(repo, finding);
    }
    let ev = &finding.evidence;
    let name = ev
        .get("container")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let kind = ev
        .get("container_kind")
        .and_then(|v| v.as_str())
        .unwrap_or("dict");
    let short = name.rsplit('.').next().unwrap_or(name);
    let constant = format!(
        "_PYMEDIC_MAX_{}",
        short.trim_start_matches('_').to_ascii_uppercase()
    );
    // Add sites by file.
    let mut sites: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for r in finding
        .related
        .iter()
        .filter(|r| r.role.starts_with("adds to"))
    {
        sites.entry(r.file.clone()).or_default().push(r.line);
    }
    if sites.is_empty() {
        return Err(unsupported(finding, "the finding lists no add sites"));
    }
    let adds = ev.get("adds").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    if adds > sites.values().map(Vec::len).sum::<usize>() {
        return Err(unsupported(
            finding,
            format!("{name} is added to in {adds} places; bound it by hand"),
        ));
    }
    let mut changes = Vec::new();
    for (file, lines) in sites {
        let src = read_source(repo, &file)?;
        let mut edits = Edits::default();
        for line in lines {
            add_eviction(&src, &mut edits, line, kind, &constant)
                .map_err(|e| unsupported(finding, e))?;
        }
        define_constant(&src, &mut edits, &constant);
        changes.push((
            file,
            edits
                .apply(&src.text)
                .map_err(|e| unsupported(finding, e))?,
        ));
    }
    Ok(Fix {
        strategy: "bound_container",
        rationale: format!(
            "{name} is only ever added to: every distinct key stays in memory for the life of the process. Evicting the oldest entries beyond {constant} ({LIMIT}) bounds it."
        ),
        risk: Risk::Medium,
        risk_notes: vec![
            format!(
                "code that expects an evicted entry to still be in {name} recomputes or misses it: right for a cache, wrong for a registry"
            ),
            format!("tune {constant} to the working set"),
        ],
        requires_review: None,
        changes,
    })
}

fn add_eviction(
    src: &Source,
    edits: &mut Edits,
    line: u32,
    kind: &str,
    constant: &str,
) -> Result<(), String> {
    let mut hits = Vec::new();
    text::find_all_deep(
        src.body(),
        &|s| {
            src.line(s) == line
                && !matches!(
                    s,
                    Stmt::FunctionDef(_)
                        | Stmt::ClassDef(_)
                        | Stmt::If(_)
                        | Stmt::For(_)
                        | Stmt::While(_)
                        | Stmt::With(_)
                        | Stmt::Try(_)
                )
        },
        &mut hits,
    );
    let stmt = hits.first().ok_or_else(|| {
        format!("no statement at line {line}: the file changed since the analysis")
    })?;
    if !src.starts_line(*stmt) || !src.ends_line(*stmt) {
        return Err(format!(
            "line {line} holds more than one statement; edit it by hand"
        ));
    }
    let target = container_text(src, stmt)
        .ok_or_else(|| format!("cannot tell which container line {line} adds to"))?;
    let indent = src.indent_of(line).to_owned();
    let unit = src.indent_unit();
    let evict = match kind {
        "list" => format!(
            "{indent}if len({target}) > {constant}:\n{indent}{unit}del {target}[: len({target}) - {constant}]\n"
        ),
        "deque" => {
            format!("{indent}while len({target}) > {constant}:\n{indent}{unit}{target}.popleft()\n")
        }
        "set" => {
            format!("{indent}while len({target}) > {constant}:\n{indent}{unit}{target}.pop()\n")
        }
        "OrderedDict" => format!(
            "{indent}while len({target}) > {constant}:\n{indent}{unit}{target}.popitem(last=False)\n"
        ),
        _ => format!(
            "{indent}while len({target}) > {constant}:\n{indent}{unit}{target}.pop(next(iter({target})))\n"
        ),
    };
    let before = matches!(stmt, Stmt::Return(_) | Stmt::Raise(_));
    let (s, e) = src.lines_range(line, src.end_line(*stmt));
    edits.insert(if before { s } else { e }, evict);
    Ok(())
}

/// The container a statement adds to: `X[k] = v`, `X.append(v)`, ...
fn container_text<'a>(src: &'a Source, s: &Stmt) -> Option<&'a str> {
    match s {
        Stmt::Assign(a) => a.targets.iter().find_map(|t| match t {
            Expr::Subscript(sub) => Some(src.slice(&*sub.value)),
            _ => None,
        }),
        Stmt::AugAssign(a) => Some(src.slice(&*a.target)),
        Stmt::Expr(e) => call_receiver(src, &e.value),
        Stmt::Return(r) => r.value.as_deref().and_then(|v| call_receiver(src, v)),
        _ => None,
    }
}

fn call_receiver<'a>(src: &'a Source, e: &Expr) -> Option<&'a str> {
    let Expr::Call(c) = e else { return None };
    match &*c.func {
        Expr::Attribute(a) => Some(src.slice(&*a.value)),
        // heapq.heappush(X, ...)
        _ => c.arguments.args.first().map(|a| src.slice(a)),
    }
}

fn define_constant(src: &Source, edits: &mut Edits, constant: &str) {
    if src.text.contains(&format!("{constant} =")) {
        return;
    }
    text::ensure_import(
        src,
        edits,
        &format!("{constant} = {LIMIT}  # bound added by pymedic repair: tune to the working set"),
        false,
    );
}

/// `@functools.cache` / `@cache` / `@lru_cache(maxsize=None)` → a bounded LRU.
fn cache(repo: &Path, finding: &Finding) -> Result<Fix, RepairError> {
    let rel = finding.location.file.clone();
    let src = read_source(repo, &rel)?;
    let func = text::find_function(src.body(), &finding.location.function)
        .ok_or_else(|| unsupported(finding, "the cached function is no longer there"))?;
    let line = finding.location.line;
    let dec = func
        .decorator_list
        .iter()
        .find(|d| src.line(*d) == line)
        .ok_or_else(|| unsupported(finding, format!("no decorator at line {line}")))?;
    let e = &dec.expression;
    let mut edits = Edits::default();
    let (new_text, import) = match e {
        Expr::Call(c) => {
            let func = src.slice(&*c.func).to_owned();
            (format!("{func}(maxsize={CACHE_SIZE})"), None)
        }
        other => {
            let t = src.slice(other);
            match t.strip_suffix("cache") {
                Some(prefix) if !prefix.is_empty() => {
                    (format!("{prefix}lru_cache(maxsize={CACHE_SIZE})"), None)
                }
                _ => (
                    format!("lru_cache(maxsize={CACHE_SIZE})"),
                    (!text::imports_from(&src, "functools", "lru_cache"))
                        .then_some("from functools import lru_cache"),
                ),
            }
        }
    };
    edits.replace(e.start().to_usize(), e.end().to_usize(), new_text);
    if let Some(imp) = import {
        text::ensure_import(&src, &mut edits, imp, false);
    }
    let new = edits
        .apply(&src.text)
        .map_err(|e| unsupported(finding, e))?;
    Ok(Fix {
        strategy: "bound_cache",
        rationale: format!(
            "{} is memoised without a size limit: every distinct argument tuple (and, for a method, self) is kept forever. An LRU of {CACHE_SIZE} entries keeps the hot ones.",
            finding.location.function
        ),
        risk: Risk::Low,
        risk_notes: vec!["calls beyond the working set are recomputed".into()],
        requires_review: None,
        changes: vec![(rel, new)],
    })
}
