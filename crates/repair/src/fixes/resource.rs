//! Close the resource on every path.
//!
//! * The resource never leaves the function: `x = open(...)` + the
//!   statements that use it become `with open(...) as x:` (files, sockets,
//!   processes), or `try: ... finally: os.close(x)` (raw descriptors,
//!   database connections, pools), or `with lock:` for `lock.acquire()`.
//!   Explicit closes the new block makes redundant are removed.
//! * It is returned or stored on some path: it is closed before each
//!   leaking exit, and an exception between acquisition and hand-over
//!   closes it and re-raises.

use std::path::Path;

use pymedic_model::Finding;
use ruff_python_ast::{Expr, Stmt};
use ruff_text_size::Ranged;

use super::{is_method_stmt, read_source, region_text, removals, unsupported};
use crate::RepairError;
use crate::plan::{Fix, Risk};
use crate::text::{self, Edits, Source};

/// Acquisitions that are context managers closing the resource on exit.
fn context_manager(acquired_by: &str, resource: &str) -> bool {
    match resource {
        "file" | "socket" | "process" => true,
        _ => matches!(
            acquired_by,
            "urllib.request.urlopen" | "smtplib.SMTP" | "ftplib.FTP"
        ),
    }
}

pub fn fix(repo: &Path, finding: &Finding) -> Result<Fix, RepairError> {
    let ev = &finding.evidence;
    let s = |k: &str| {
        ev.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let (var, resource, acquired_by) = (s("variable"), s("resource"), s("acquired_by"));
    if var.is_empty() {
        return Err(unsupported(
            finding,
            "the finding has no `variable` in its evidence",
        ));
    }
    let rel = finding.location.file.clone();
    let src = read_source(repo, &rel)?;
    let new = if resource == "lock" {
        lock(&src, finding, &var)
    } else {
        object(&src, finding, &var, &resource, &acquired_by)
    }
    .map_err(|why| unsupported(finding, why))?;
    let (strategy, rationale, risk, notes) = new.1;
    Ok(Fix {
        strategy,
        rationale,
        risk,
        risk_notes: notes,
        requires_review: None,
        changes: vec![(rel, new.0)],
    })
}

type Outcome = (String, (&'static str, String, Risk, Vec<String>));

fn function<'a>(
    src: &'a Source,
    finding: &Finding,
) -> Result<&'a ruff_python_ast::StmtFunctionDef, String> {
    text::find_function(src.body(), &finding.location.function).ok_or_else(|| {
        format!(
            "function {} not found in {}: the file changed since the analysis",
            finding.location.function, finding.location.file
        )
    })
}

/// The statements after `suite[i]` up to the last one mentioning `var`.
fn region_after<'a>(
    suite: &'a [Stmt],
    i: usize,
    uses: &dyn Fn(&Stmt) -> bool,
) -> Option<&'a [Stmt]> {
    let rest = &suite[i + 1..];
    let last = rest.iter().rposition(uses)?;
    Some(&rest[..=last])
}

fn object(
    src: &Source,
    finding: &Finding,
    var: &str,
    resource: &str,
    by: &str,
) -> Result<Outcome, String> {
    let func = function(src, finding)?;
    let line = finding.location.line;
    let (suite, i) = text::find_stmt(&func.body, &|s| {
        src.line(s) == line
            && matches!(s, Stmt::Assign(_) | Stmt::AnnAssign(_))
            && text::mentions(s, var)
    })
    .ok_or_else(|| {
        format!("no assignment to `{var}` at line {line}: the file changed since the analysis")
    })?;
    let acq = &suite[i];
    if !src.starts_line(acq) || !src.ends_line(acq) {
        return Err(format!(
            "line {line} holds more than one statement; edit it by hand"
        ));
    }
    let region = region_after(suite, i, &|s| text::mentions(s, var))
        .ok_or_else(|| format!("`{var}` is not used after line {line}: nothing to wrap"))?;
    let release = match resource {
        "file descriptor" => format!("os.close({var})"),
        "pool" if by.contains("Executor") => format!("{var}.shutdown()"),
        "pool" => format!("{var}.close()"),
        _ => format!("{var}.close()"),
    };
    if escapes(region, var) {
        return close_on_exits(src, finding, acq, region, var, &release);
    }
    let indent = src.indent_of(line).to_owned();
    let first = src.line(&region[0]);
    let last = src.end_line(region.last().expect("region is not empty"));
    let mut edits = Edits::default();
    let simple_target = matches!(acq, Stmt::Assign(a) if a.targets.len() == 1 && matches!(a.targets[0], Expr::Name(_)));
    if context_manager(by, resource) && simple_target {
        let Stmt::Assign(a) = acq else {
            unreachable!("checked above")
        };
        // Closes made redundant by the `with` (top level of the region only).
        let mut removed = Vec::new();
        removals(
            src,
            region,
            &|s| is_method_stmt(src, s, var, &["close"]),
            false,
            &mut removed,
        )?;
        let body = region_text(src, first, last, &removed, 1)?;
        let body = if body.trim().is_empty() {
            format!("{indent}{}pass\n", src.indent_unit())
        } else {
            body
        };
        edits.replace(
            acq.start().to_usize(),
            acq.end().to_usize(),
            format!("with {} as {var}:", src.slice(&*a.value)),
        );
        let (s, e) = src.lines_range(first, last);
        edits.replace(s, e, body);
        let new = edits.apply(&src.text)?;
        return Ok((
            new,
            (
                "with_statement",
                format!(
                    "`{var}` ({by}() at line {line}) is closed on some paths but not others ({}). A `with` block closes it on every path out of the block: return, break, continue and exceptions.",
                    exits_text(finding)
                ),
                Risk::Low,
                vec![format!(
                    "`{var}` is now closed when the block ends (line {last}) rather than later in the function"
                )],
            ),
        ));
    }
    // try/finally: raw descriptors must not be closed twice (the number may
    // already belong to another file), so every os.close(var) in the region goes.
    let mut removed = Vec::new();
    let deep = resource == "file descriptor";
    let rel_name = release.split('(').next().unwrap_or_default().to_owned();
    removals(
        src,
        region,
        &|s| {
            if resource == "file descriptor" {
                is_os_close(src, s, var)
            } else {
                is_method_stmt(
                    src,
                    s,
                    var,
                    &[rel_name.rsplit('.').next().unwrap_or("close")],
                )
            }
        },
        deep,
        &mut removed,
    )?;
    let body = region_text(src, first, last, &removed, 1)?;
    let unit = src.indent_unit();
    let block = format!("{indent}try:\n{body}{indent}finally:\n{indent}{unit}{release}\n");
    let (s, e) = src.lines_range(first, last);
    edits.replace(s, e, block);
    let new = edits.apply(&src.text)?;
    Ok((
        new,
        (
            "try_finally",
            format!(
                "`{var}` ({by}() at line {line}) is not released on every path ({}). `try/finally: {release}` releases it on every path; the explicit releases inside are removed so it is released exactly once.",
                exits_text(finding)
            ),
            Risk::Low,
            vec![format!(
                "{release} now runs when the block ends (line {last})"
            )],
        ),
    ))
}

fn is_os_close(src: &Source, s: &Stmt, var: &str) -> bool {
    let Stmt::Expr(e) = s else { return false };
    let Expr::Call(c) = &*e.value else {
        return false;
    };
    src.slice(&*c.func).ends_with("close")
        && c.arguments.args.len() == 1
        && src.slice(&c.arguments.args[0]) == var
}

/// Returned, yielded, stored in an attribute/container or handed to a
/// thread somewhere in the region.
fn escapes(region: &[Stmt], var: &str) -> bool {
    let mut hits = Vec::new();
    for s in region {
        text::find_all(
            std::slice::from_ref(s),
            &|s| match s {
                Stmt::Return(r) => r.value.as_deref().is_some_and(|v| holds(v, var)),
                Stmt::Assign(a) => {
                    holds(&a.value, var) && a.targets.iter().any(|t| !matches!(t, Expr::Name(_)))
                }
                _ => false,
            },
            &mut hits,
        );
    }
    !hits.is_empty()
}

fn holds(e: &Expr, var: &str) -> bool {
    match e {
        Expr::Name(n) => n.id.as_str() == var,
        Expr::Tuple(t) => t.elts.iter().any(|x| holds(x, var)),
        Expr::List(l) => l.elts.iter().any(|x| holds(x, var)),
        Expr::Dict(d) => d.items.iter().any(|i| holds(&i.value, var)),
        _ => false,
    }
}

fn exits_text(finding: &Finding) -> String {
    finding
        .evidence
        .get("exits")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .map(|e| {
                    format!(
                        "{} at line {}",
                        e.get("kind").and_then(|k| k.as_str()).unwrap_or("exit"),
                        e.get("line").and_then(|l| l.as_u64()).unwrap_or(0)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// The resource is handed over on the success path: close it on each
/// leaking exit, and on exceptions before the hand-over.
fn close_on_exits(
    src: &Source,
    finding: &Finding,
    acq: &Stmt,
    region: &[Stmt],
    var: &str,
    release: &str,
) -> Result<Outcome, String> {
    let exits: Vec<(String, u32)> = finding
        .evidence
        .get("exits")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|e| {
                    Some((
                        e.get("kind")?.as_str()?.to_owned(),
                        e.get("line")?.as_u64()? as u32,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    if let Some((k, l)) = exits.iter().find(|(k, _)| {
        !matches!(
            k.as_str(),
            "return" | "raise" | "break" | "continue" | "exception"
        )
    }) {
        return Err(format!(
            "`{var}` is handed over on some paths and leaks at the {k} at line {l}: which owner should close it needs a person"
        ));
    }
    let mut edits = Edits::default();
    let mut inserted = Vec::new();
    for (kind, line) in &exits {
        if kind == "exception" {
            continue;
        }
        let mut hits = Vec::new();
        text::find_all(
            region,
            &|s| {
                src.line(s) == *line
                    && matches!(
                        s,
                        Stmt::Return(_) | Stmt::Raise(_) | Stmt::Break(_) | Stmt::Continue(_)
                    )
            },
            &mut hits,
        );
        let Some(stmt) = hits.first() else {
            return Err(format!(
                "no exit statement at line {line}: the file changed since the analysis"
            ));
        };
        if !src.starts_line(*stmt) {
            return Err(format!(
                "line {line} holds more than one statement; edit it by hand"
            ));
        }
        let (s, _) = src.lines_range(*line, *line);
        edits.insert(s, format!("{}{release}\n", src.indent_of(*line)));
        inserted.push(*line);
    }
    let text1 = edits.apply(&src.text)?;
    let mut notes = vec![format!(
        "{release} inserted before the exits at lines {inserted:?}"
    )];
    let mut text = text1;
    if exits.iter().any(|(k, _)| k == "exception") {
        // Second pass on the edited text: wrap the region so an exception
        // before the hand-over closes it.
        let src2 = Source::new(text.clone());
        let line = finding.location.line;
        let func = function(&src2, finding)?;
        let (suite, i) = text::find_stmt(&func.body, &|s| {
            src2.line(s) == line && text::mentions(s, var)
        })
        .ok_or("the acquisition moved")?;
        let region = region_after(suite, i, &|s| text::mentions(s, var)).ok_or("no region")?;
        let first = src2.line(&region[0]);
        let last = src2.end_line(region.last().expect("non-empty"));
        let body = region_text(&src2, first, last, &[], 1)?;
        let indent = src2.indent_of(line).to_owned();
        let unit = src2.indent_unit();
        let block = format!(
            "{indent}try:\n{body}{indent}except BaseException:\n{indent}{unit}{release}\n{indent}{unit}raise\n"
        );
        let mut e2 = Edits::default();
        let (s, e) = src2.lines_range(first, last);
        e2.replace(s, e, block);
        text = e2.apply(&src2.text)?;
        notes.push("an exception before the hand-over now closes it and re-raises".into());
    }
    let _ = acq;
    Ok((
        text,
        (
            "close_on_exits",
            format!(
                "`{var}` is handed to the caller on the success path but leaks on others ({}). It is now closed on each of those paths; the success path is unchanged.",
                exits_text(finding)
            ),
            Risk::Low,
            notes,
        ),
    ))
}

/// `lock.acquire()` without a release on every path.
fn lock(src: &Source, finding: &Finding, key: &str) -> Result<Outcome, String> {
    let func = function(src, finding)?;
    let line = finding.location.line;
    let (suite, i) = text::find_stmt(&func.body, &|s| {
        src.line(s) == line && matches!(s, Stmt::Expr(_) | Stmt::If(_))
    })
    .ok_or_else(|| {
        format!("no acquire() of {key} at line {line}: the file changed since the analysis")
    })?;
    let acq = &suite[i];
    if let Stmt::If(cond) = acq
        && !matches!(&*cond.test, Expr::UnaryOp(u) if u.op == ruff_python_ast::UnaryOp::Not)
    {
        return Err(format!(
            "{key} is held only inside the `if` at line {line}: release it in that block by hand"
        ));
    }
    let release_stmt = |s: &Stmt| is_method_stmt(src, s, key, &["release"]);
    let mentions_release = |s: &Stmt| {
        let mut v = Vec::new();
        text::find_all(std::slice::from_ref(s), &release_stmt, &mut v);
        !v.is_empty()
    };
    let region = region_after(suite, i, &mentions_release)
        .ok_or_else(|| format!("no {key}.release() after line {line} in the same block"))?;
    let first = src.line(&region[0]);
    let last = src.end_line(region.last().expect("non-empty"));
    let mut removed = Vec::new();
    removals(src, region, &release_stmt, true, &mut removed)?;
    let body = region_text(src, first, last, &removed, 1)?;
    let indent = src.indent_of(line).to_owned();
    let unit = src.indent_unit();
    let mut edits = Edits::default();
    let plain_acquire = matches!(acq, Stmt::Expr(e) if matches!(&*e.value, Expr::Call(c) if c.arguments.args.is_empty() && c.arguments.keywords.is_empty()));
    let notes = vec![format!(
        "every {key}.release() inside the block is removed: the lock is now released when the block ends (line {last}), which may hold it longer than before"
    )];
    if plain_acquire {
        edits.replace(
            acq.start().to_usize(),
            acq.end().to_usize(),
            format!("with {key}:"),
        );
        let (s, e) = src.lines_range(first, last);
        edits.replace(s, e, body);
        let new = edits.apply(&src.text)?;
        return Ok((
            new,
            (
                "with_statement",
                format!(
                    "{key} is acquired at line {line} and not released on every path ({}); a thread that leaves that way keeps the lock and every other thread blocks on it. `with {key}:` releases it on every path.",
                    exits_text(finding)
                ),
                Risk::Medium,
                notes,
            ),
        ));
    }
    let block = format!("{indent}try:\n{body}{indent}finally:\n{indent}{unit}{key}.release()\n");
    let (s, e) = src.lines_range(first, last);
    edits.replace(s, e, block);
    let new = edits.apply(&src.text)?;
    Ok((
        new,
        (
            "try_finally",
            format!(
                "{key} is acquired at line {line} and not released on every path ({}). `try/finally: {key}.release()` releases it on every path.",
                exits_text(finding)
            ),
            Risk::Medium,
            notes,
        ),
    ))
}
