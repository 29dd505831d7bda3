//! One module per repair kind. Each reads the finding's evidence and the
//! file as it is now, and returns the new contents (or a plan that needs
//! review when no edit is clearly safe).

mod blocking;
mod container;
mod lock_order;
mod resource;

use std::path::Path;

use pymedic_analyze::Analysis;
use pymedic_model::{Finding, Layer};
use ruff_python_ast::{Expr, Stmt};

use crate::RepairError;
use crate::plan::Fix;
use crate::text::Source;

/// The repair for a structural finding.
pub fn fix(repo: &Path, analysis: &Analysis, finding: &Finding) -> Result<Fix, RepairError> {
    if finding.layer != Layer::Structural {
        return Err(unsupported(
            finding,
            "only structural findings (from `pymedic analyze`) have source repairs",
        ));
    }
    match finding.kind.as_str() {
        "fd_leak" | "resource_leak" => resource::fix(repo, finding),
        "blocked_event_loop" => blocking::fix(repo, finding),
        "memory_leak" => container::fix(repo, analysis, finding),
        "lock_order_inversion" => lock_order::fix(repo, analysis, finding),
        "deadlock" => Ok(Fix::review(
            "lock_reentry",
            finding.title.clone(),
            "make the lock a threading.RLock if re-entry is intended, or move the inner acquisition out of the held region (often: a helper that expects the caller to hold the lock)".into(),
        )),
        _ => Err(unsupported(
            finding,
            "supported kinds: fd_leak, resource_leak, blocked_event_loop, memory_leak, lock_order_inversion, deadlock (explained)",
        )),
    }
}

pub(crate) fn unsupported(finding: &Finding, why: impl Into<String>) -> RepairError {
    RepairError::Unsupported {
        kind: finding.kind.to_string(),
        why: why.into(),
    }
}

pub(crate) fn read_source(repo: &Path, rel: &str) -> Result<Source, RepairError> {
    let bytes = crate::store::read(&repo.join(rel))?;
    let text = String::from_utf8(bytes).map_err(|_| RepairError::Unsupported {
        kind: "file".into(),
        why: format!("{rel} is not UTF-8; pymedic only edits UTF-8 sources"),
    })?;
    Ok(Source::new(text))
}

/// `recv.method(...)` as an expression statement, where `recv` has text `recv_text`.
pub(crate) fn is_method_stmt(src: &Source, s: &Stmt, recv_text: &str, methods: &[&str]) -> bool {
    let Stmt::Expr(e) = s else { return false };
    let Expr::Call(c) = &*e.value else {
        return false;
    };
    let Expr::Attribute(a) = &*c.func else {
        return false;
    };
    methods.contains(&a.attr.id.as_str()) && src.slice(&*a.value) == recv_text
}

/// A statement to drop from a region: its lines, and whether it must be
/// replaced with `pass` (it is alone in its block).
#[derive(Clone, Copy)]
pub(crate) struct Removal {
    pub first: u32,
    pub last: u32,
    pub pass: bool,
}

/// Statements anywhere in `suite` (not nested functions) matching `pred`,
/// as removals.
pub(crate) fn removals(
    src: &Source,
    suite: &[Stmt],
    pred: &dyn Fn(&Stmt) -> bool,
    deep: bool,
    out: &mut Vec<Removal>,
) -> Result<(), String> {
    let matching = suite.iter().filter(|s| pred(s)).count();
    for s in suite {
        if pred(s) {
            if !src.starts_line(s) || !src.ends_line(s) {
                return Err(format!(
                    "line {} has more than one statement; edit it by hand",
                    src.line(s)
                ));
            }
            out.push(Removal {
                first: src.line(s),
                last: src.end_line(s),
                pass: matching == suite.len(),
            });
        } else if deep && !matches!(s, Stmt::FunctionDef(_) | Stmt::ClassDef(_)) {
            for child in crate::text::child_suites(s) {
                removals(src, child, pred, deep, out)?;
            }
        }
    }
    Ok(())
}

/// The text of lines `first..=last` with removals applied, re-indented by `delta` units.
pub(crate) fn region_text(
    src: &Source,
    first: u32,
    last: u32,
    removed: &[Removal],
    delta: i32,
) -> Result<String, String> {
    let protected = src.string_continuation_lines();
    if (first..=last).any(|l| protected.contains(&l)) && delta != 0 {
        return Err(format!(
            "lines {first}-{last} contain a multi-line string whose text would change if re-indented"
        ));
    }
    let mut out = String::new();
    let mut line = first;
    while line <= last {
        if let Some(r) = removed.iter().find(|r| r.first == line) {
            if r.pass {
                out.push_str(src.indent_of(line));
                out.push_str("pass\n");
            }
            line = r.last + 1;
            continue;
        }
        let (s, e) = src.lines_range(line, line);
        out.push_str(&src.text[s..e]);
        if !out.ends_with('\n') {
            out.push('\n');
        }
        line += 1;
    }
    let unit = src.indent_unit();
    crate::text::reindent(&out, delta, &unit)
}
