//! Building findings: ids, fingerprints, syntax errors and resource leaks.

use pymedic_model::{Finding, Kind, Layer, Location, Related, Severity};
use serde_json::json;

use crate::facts::{ExitKind, ResourceKind};
use crate::leaks::release_text;
use crate::symbols::{Callee, FnId, Program};

/// A line-independent identity of a static finding (kind, file, function
/// and what it is about), kept in `evidence.fingerprint`. `repair apply`
/// uses it to confirm a finding is gone after an edit moved its lines.
pub fn fingerprint(f: &Finding) -> Option<&str> {
    f.evidence.get("fingerprint").and_then(|v| v.as_str())
}

/// A structural (static) finding: no target, id from kind + location +
/// discriminator, the fingerprint in evidence.
#[expect(clippy::too_many_arguments, reason = "every field of a finding")]
pub(crate) fn finding(
    layer: Layer,
    kind: Kind,
    severity: Severity,
    confidence: f64,
    title: String,
    location: Location,
    discriminator: &str,
    fingerprint: String,
    mut evidence: serde_json::Value,
) -> Finding {
    let mut f = Finding::new(layer, kind, severity, confidence, title, None, location)
        .with_discriminator(discriminator);
    if let Some(obj) = evidence.as_object_mut() {
        obj.insert("fingerprint".into(), fingerprint.into());
    }
    f.evidence = evidence;
    f
}

pub(crate) fn syntax_errors(p: &Program) -> Vec<Finding> {
    let mut out = Vec::new();
    for (fi, file) in p.files.iter().enumerate() {
        for e in &file.syntax_errors {
            let loc = p.module_location(fi as u32, e.line);
            out.push(finding(
                Layer::Surface,
                Kind::SYNTAX_ERROR,
                Severity::High,
                1.0,
                format!("syntax error in {}: {}", file.rel, e.message),
                loc,
                &e.message,
                format!("syntax_error|{}|{}", file.rel, e.message),
                json!({"message": e.message}),
            ));
        }
    }
    out
}

pub(crate) fn leak_findings(p: &Program) -> Vec<Finding> {
    let mut out = Vec::new();
    for (fi, file) in p.files.iter().enumerate() {
        for leak in &file.leaks {
            let id = FnId {
                file: fi as u32,
                func: leak.function as u32,
            };
            if consumed_by_callee(p, id, &leak.passed_to) {
                continue;
            }
            let func = p.function(id);
            let explicit: Vec<_> = leak
                .exits
                .iter()
                .filter(|e| e.kind != ExitKind::Exception)
                .collect();
            let release = release_text(leak.kind, &leak.var);
            let (severity, confidence) = if explicit.is_empty() {
                (Severity::Low, 0.4)
            } else if matches!(leak.kind, ResourceKind::RawFd | ResourceKind::Lock) {
                (Severity::High, 0.9)
            } else if leak.released_elsewhere {
                (Severity::High, 0.85)
            } else {
                (Severity::Medium, 0.6)
            };
            let kind = if leak.kind.is_fd() {
                Kind::FD_LEAK
            } else {
                Kind::RESOURCE_LEAK
            };
            let first = explicit.first().copied().unwrap_or(&leak.exits[0]);
            let verb = if leak.kind == ResourceKind::Lock {
                "released"
            } else {
                "closed"
            };
            let title = format!(
                "{} `{}` from {}() at line {} is not {verb} on the {} at line {}{}",
                leak.kind.as_str(),
                leak.var,
                leak.acquired_by,
                leak.line,
                first.kind.as_str(),
                first.line,
                match leak.exits.len() {
                    1 => String::new(),
                    n => format!(" (and {} more exit paths)", n - 1),
                }
            );
            let related = leak
                .exits
                .iter()
                .map(|e| {
                    let via = e
                        .via_break
                        .map(|b| format!(" after the break at line {b}"))
                        .unwrap_or_default();
                    let what = match e.kind {
                        ExitKind::Exception => {
                            format!("an exception raised at line {} skips {release}", e.line)
                        }
                        ExitKind::NextIteration => format!(
                            "the loop iteration ending at line {} rebinds `{}` without {release}",
                            e.line, leak.var
                        ),
                        ExitKind::Overwritten => format!(
                            "line {} rebinds `{}` while it is open, skipping {release}",
                            e.line, leak.var
                        ),
                        k => format!(
                            "exit path at line {} ({}){via} skips {release}",
                            e.line,
                            k.as_str()
                        ),
                    };
                    Related::new(&p.location(id, e.line), what)
                })
                .collect();
            let fp = format!(
                "{}|{}|{}|{}|{}",
                kind, file.rel, func.qualname, leak.var, leak.acquired_by
            );
            let mut f = finding(
                Layer::Structural,
                kind,
                severity,
                confidence,
                title,
                p.location(id, leak.line),
                &leak.var,
                fp,
                json!({
                    "variable": leak.var,
                    "resource": leak.kind.as_str(),
                    "acquired_by": leak.acquired_by,
                    "release": release,
                    "released_on_other_paths": leak.released_elsewhere,
                    "exits": leak.exits.iter().map(|e| json!({
                        "kind": e.kind.as_str(), "line": e.line, "after_break": e.via_break
                    })).collect::<Vec<_>>(),
                }),
            );
            f.related = related;
            out.push(f);
        }
    }
    out
}

/// Whether the resource was handed to a project function that closes,
/// stores or returns that parameter.
fn consumed_by_callee(p: &Program, from: FnId, passed: &[(crate::facts::PathRef, usize)]) -> bool {
    let ctx = p.ctx(from);
    passed.iter().any(|(callee, arg)| {
        let Callee::Project(g) = p.callee(ctx, callee) else {
            return false;
        };
        let gf = p.function(g);
        let offset = usize::from(
            gf.class.is_some()
                && !gf.decorators.iter().any(|d| d.last() == "staticmethod")
                && !callee.attrs.is_empty(),
        );
        let offset = if gf.name == "__init__" { 1 } else { offset };
        gf.consumes.get(arg + offset).copied().unwrap_or(true)
    })
}
