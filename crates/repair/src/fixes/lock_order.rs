//! Make lock order consistent. When two locks are taken in one order at
//! most sites and in the other at a few (at most half as many), the
//! majority order is the intended one: at each minority site the lock that
//! should come first is taken before the outer `with` instead of inside it
//! (`with b: ... with a: body` → `with a: with b: ... body`), or the two
//! items of `with b, a:` are swapped. Anything else (no clear majority,
//! the inner lock taken in a called function, more than two locks) is
//! explained and left to a person.

use std::path::Path;

use pymedic_analyze::Analysis;
use pymedic_analyze::locks::{self, EdgeSite};
use pymedic_model::Finding;
use ruff_python_ast::Stmt;
use ruff_text_size::Ranged;

use super::{read_source, region_text, unsupported};
use crate::RepairError;
use crate::plan::{Fix, Risk};
use crate::text::{self, Edits, Source};

pub fn fix(repo: &Path, analysis: &Analysis, finding: &Finding) -> Result<Fix, RepairError> {
    let names: Vec<String> = finding
        .evidence
        .get("locks")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if finding.evidence.get("instances").and_then(|v| v.as_bool()) == Some(true) {
        return Ok(Fix::review(
            "lock_order",
            finding.title.clone(),
            "the order depends on the caller's arguments: take the two locks in a fixed order (sort the two objects by a stable key such as id() or an account number) before nesting them".into(),
        ));
    }
    let g = locks::graph(&analysis.program);
    let p = &analysis.program;
    let at = |s: &locks::Site| {
        let l = p.location(s.func, s.line);
        format!("{}:{} ({})", l.file, l.line, l.function)
    };
    let describe = |from: &str, to: &str| {
        let sites = g.edges.get(&(from.to_owned(), to.to_owned()));
        let list = sites
            .map(|v| {
                v.iter()
                    .map(|s| at(&s.inner))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        format!(
            "{from} → {to} at {} site(s): {list}",
            sites.map_or(0, Vec::len)
        )
    };
    if names.len() != 2 {
        let orders: Vec<String> = (0..names.len())
            .map(|i| describe(&names[i], &names[(i + 1) % names.len()]))
            .collect();
        return Ok(Fix::review(
            "lock_order",
            format!("{} locks form a cycle: {}", names.len(), orders.join("; ")),
            "a cycle through more than two locks needs a global lock order chosen by a person"
                .into(),
        ));
    }
    let (a, b) = (&names[0], &names[1]);
    let ab = g
        .edges
        .get(&(a.clone(), b.clone()))
        .cloned()
        .unwrap_or_default();
    let ba = g
        .edges
        .get(&(b.clone(), a.clone()))
        .cloned()
        .unwrap_or_default();
    let rationale = format!(
        "two threads taking these locks in opposite orders can deadlock: {}; {}",
        describe(a, b),
        describe(b, a)
    );
    // (first, second, minority sites where second is taken before first)
    let (first, second, minority) = if ab.len() >= 2 * ba.len().max(1) {
        (a, b, ba)
    } else if ba.len() >= 2 * ab.len().max(1) {
        (b, a, ab)
    } else {
        return Ok(Fix::review(
            "lock_order",
            rationale,
            "neither order is clearly intended (no 2:1 majority of sites): choose one order and change the other sites".into(),
        ));
    };
    if let Some(s) = minority.iter().find(|s| !s.direct) {
        return Ok(Fix::review(
            "lock_order",
            rationale,
            format!(
                "the intended order is {first} → {second}, but at {} {first} is taken in a called function ({}); hoisting it could self-deadlock: move that call out of the `with {second}` block by hand",
                at(&s.inner),
                s.via.iter().map(&at).collect::<Vec<_>>().join(" → ")
            ),
        ));
    }
    // Every minority site is a `with` nested in a `with` in one function.
    let mut by_file: std::collections::BTreeMap<String, Vec<EdgeSite>> = Default::default();
    for s in minority {
        by_file
            .entry(p.files[s.outer.func.file as usize].rel.clone())
            .or_default()
            .push(s);
    }
    let mut changes = Vec::new();
    for (file, mut sites) in by_file {
        sites.sort_by_key(|s| std::cmp::Reverse(s.outer.line));
        let mut text = read_source(repo, &file)?.text;
        for s in sites {
            let src = Source::new(text);
            let qual = &p.function(s.outer.func).qualname;
            text = hoist(&src, qual, s.outer.line, s.inner.line)
                .map_err(|e| unsupported(finding, e))?;
        }
        changes.push((file, text));
    }
    Ok(Fix {
        strategy: "lock_order",
        rationale: format!(
            "{rationale}. The majority order {first} → {second} is kept; the minority sites now take {first} first."
        ),
        risk: Risk::Medium,
        risk_notes: vec![format!(
            "{first} is now held for the whole `with {second}` block at the changed sites: more contention, no deadlock"
        )],
        requires_review: None,
        changes,
    })
}

/// At `outer_line` a `with` takes the second lock; at `inner_line`, inside
/// it, a `with` takes the first. Take the first lock around the outer `with`.
fn hoist(src: &Source, qualname: &str, outer_line: u32, inner_line: u32) -> Result<String, String> {
    let func = text::find_function(src.body(), qualname).ok_or("the function moved")?;
    let (suite, i) = text::find_stmt(&func.body, &|s| {
        matches!(s, Stmt::With(w) if w.items.iter().any(|it| src.line(&it.context_expr) == outer_line))
    })
    .ok_or_else(|| format!("no `with` at line {outer_line}"))?;
    let Stmt::With(outer) = &suite[i] else {
        unreachable!("matched a with")
    };
    let mut edits = Edits::default();
    if outer_line == inner_line {
        // `with b, a:` → `with a, b:`
        let pos_b = outer
            .items
            .iter()
            .position(|it| src.line(&it.context_expr) == outer_line);
        let n = outer.items.len();
        let (Some(ib), true) = (pos_b, n == 2) else {
            return Err("a `with` with more than two items; reorder it by hand".into());
        };
        let ia = 1 - ib;
        let (ta, tb) = (
            src.slice(&outer.items[ia]).to_owned(),
            src.slice(&outer.items[ib]).to_owned(),
        );
        edits.replace(
            outer.items[ib].start().to_usize(),
            outer.items[ib].end().to_usize(),
            ta,
        );
        edits.replace(
            outer.items[ia].start().to_usize(),
            outer.items[ia].end().to_usize(),
            tb,
        );
        return edits.apply(&src.text);
    }
    let (isuite, j) = text::find_stmt(
        &outer.body,
        &|s| matches!(s, Stmt::With(w) if src.line(s) == inner_line && w.items.len() == 1),
    )
    .ok_or_else(|| {
        format!("no single-item `with` at line {inner_line} inside the one at line {outer_line}")
    })?;
    let Stmt::With(inner) = &isuite[j] else {
        unreachable!("matched a with")
    };
    if !src.starts_line(&suite[i]) || !src.starts_line(&isuite[j]) {
        return Err("a `with` shares its line with other statements; edit it by hand".into());
    }
    let item = src.slice(&inner.items[0]).to_owned();
    let outer_first = src.line(&suite[i]);
    let outer_last = src.end_line(&suite[i]);
    let body_first = src.line(&inner.body[0]);
    let body_last = src.end_line(&isuite[j]);
    // Outer lines with the inner header dropped and the inner body dedented.
    let mut out = String::new();
    if inner_line > outer_first {
        out.push_str(&region_text(src, outer_first, inner_line - 1, &[], 0)?);
    }
    out.push_str(&region_text(src, body_first, body_last, &[], -1)?);
    if body_last < outer_last {
        out.push_str(&region_text(src, body_last + 1, outer_last, &[], 0)?);
    }
    let unit = src.indent_unit();
    let indented = text::reindent(&out, 1, &unit)?;
    let indent = src.indent_of(outer_first).to_owned();
    let (s, e) = src.lines_range(outer_first, outer_last);
    edits.replace(s, e, format!("{indent}with {item}:\n{indented}"));
    edits.apply(&src.text)
}
