//! Move a blocking call off the event loop: `time.sleep(x)` becomes
//! `await asyncio.sleep(x)`; any other blocking call `f(a, k=v)` becomes
//! `await asyncio.to_thread(f, a, k=v)` (Python 3.9+), and `import asyncio`
//! is added when missing.

use std::path::Path;

use pymedic_model::Finding;
use ruff_python_ast::visitor::{self, Visitor};
use ruff_python_ast::{Expr, ExprCall};
use ruff_text_size::Ranged;

use super::{read_source, unsupported};
use crate::RepairError;
use crate::plan::{Fix, Risk};
use crate::text::{self, Edits};

pub fn fix(repo: &Path, finding: &Finding) -> Result<Fix, RepairError> {
    let ev = &finding.evidence;
    let how = ev.get("fix").and_then(|v| v.as_str()).unwrap_or("review");
    let blocking = ev
        .get("blocking")
        .and_then(|v| v.as_str())
        .unwrap_or("the call");
    let coroutine = &finding.location.function;
    if how == "review" {
        return Ok(Fix::review(
            "lock_in_coroutine",
            format!(
                "coroutine {coroutine} takes {blocking} at line {}: while another thread holds it the whole event loop waits.",
                finding.location.line
            ),
            "a thread lock in a coroutine has no mechanical fix: use an asyncio.Lock if only coroutines share the state, or move the critical section into a function run with asyncio.to_thread".into(),
        ));
    }
    let range = ev
        .get("call_range")
        .and_then(|v| v.as_array())
        .and_then(|a| Some((a.first()?.as_u64()? as u32, a.get(1)?.as_u64()? as u32)))
        .ok_or_else(|| unsupported(finding, "the finding has no call_range in its evidence"))?;
    let rel = finding.location.file.clone();
    let src = read_source(repo, &rel)?;
    let call = find_call(src.body(), range).ok_or_else(|| {
        unsupported(
            finding,
            "the call is no longer where the analysis found it: re-run analyze and plan again",
        )
    })?;
    let func_text = src.slice(&*call.func).to_owned();
    let args_range = call.arguments.range();
    let inner = &src.text[args_range.start().to_usize() + 1..args_range.end().to_usize() - 1];
    let inner = inner.trim();
    let replacement = if how == "asyncio.sleep" {
        format!("await asyncio.sleep({inner})")
    } else if inner.is_empty() {
        format!("await asyncio.to_thread({func_text})")
    } else {
        format!("await asyncio.to_thread({func_text}, {inner})")
    };
    // `(await x).attr`, `(await x)[i]`, `(await x)(...)` need parentheses.
    let after = src.text[call.end().to_usize()..].trim_start();
    let replacement = if after.starts_with(['.', '[', '(']) {
        format!("({replacement})")
    } else {
        replacement
    };
    let mut edits = Edits::default();
    edits.replace(call.start().to_usize(), call.end().to_usize(), replacement);
    text::ensure_import(
        &src,
        &mut edits,
        "import asyncio",
        text::imports_module(&src, "asyncio"),
    );
    let new = edits
        .apply(&src.text)
        .map_err(|e| unsupported(finding, e))?;
    let (strategy, rationale, notes) = if how == "asyncio.sleep" {
        (
            "asyncio_sleep",
            format!(
                "time.sleep in coroutine {coroutine} stops the event loop and every task on it for the whole sleep; asyncio.sleep suspends only this coroutine."
            ),
            vec!["none: asyncio.sleep has the same argument and the coroutine resumes after the same delay".to_owned()],
        )
    } else {
        (
            "to_thread",
            format!(
                "{blocking} blocks the event loop thread inside coroutine {coroutine}; asyncio.to_thread runs it on a worker thread while the loop keeps serving other tasks."
            ),
            vec![
                "asyncio.to_thread needs Python 3.9+".to_owned(),
                format!(
                    "{func_text} now runs on another thread: it must not touch event-loop objects or rely on thread-local state"
                ),
            ],
        )
    };
    Ok(Fix {
        strategy,
        rationale,
        risk: if how == "asyncio.sleep" {
            Risk::Low
        } else {
            Risk::Medium
        },
        risk_notes: notes,
        requires_review: None,
        changes: vec![(rel, new)],
    })
}

fn find_call(body: &[ruff_python_ast::Stmt], range: (u32, u32)) -> Option<&ExprCall> {
    struct F<'a> {
        range: (u32, u32),
        found: Option<&'a ExprCall>,
    }
    impl<'a> Visitor<'a> for F<'a> {
        fn visit_expr(&mut self, e: &'a Expr) {
            if self.found.is_some() {
                return;
            }
            if let Expr::Call(c) = e
                && c.start().to_u32() == self.range.0
                && c.end().to_u32() == self.range.1
            {
                self.found = Some(c);
                return;
            }
            visitor::walk_expr(self, e);
        }
    }
    let mut f = F { range, found: None };
    for s in body {
        f.visit_stmt(s);
    }
    f.found
}
