//! Rendering findings for people: a table, a detailed text view, and the
//! Markdown incident report of `pymedic diagnose --report`.

use std::fmt::Write as _;

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use pymedic_model::{Finding, Target};

fn short_time(t: &pymedic_model::Timestamp) -> String {
    let f = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]Z");
    t.format(&f).unwrap_or_default()
}

fn rfc3339(t: &pymedic_model::Timestamp) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// One row per finding.
pub fn table(findings: &[Finding]) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header([
        "ID",
        "SEVERITY",
        "KIND",
        "STATUS",
        "PID",
        "LOCATION",
        "LAST SEEN",
        "COUNT",
        "TITLE",
    ]);
    for f in findings {
        t.add_row([
            f.id.0.clone(),
            f.severity.to_string(),
            f.kind.to_string(),
            f.status.as_str().to_owned(),
            f.target
                .as_ref()
                .map(|t| t.pid.to_string())
                .unwrap_or_else(|| "-".into()),
            format!(
                "{}:{} ({})",
                f.location.file, f.location.line, f.location.function
            ),
            short_time(&f.last_seen),
            f.count.to_string(),
            f.title.clone(),
        ]);
    }
    t.to_string()
}

/// Everything about one finding, for a terminal.
pub fn detail(f: &Finding) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{} [{} {}] {}", f.id, f.severity, f.kind, f.title);
    let _ = writeln!(
        s,
        "  status {}, confidence {:.2}, layer {}, seen {} times, first {} last {}",
        f.status.as_str(),
        f.confidence,
        f.layer,
        f.count,
        rfc3339(&f.first_seen),
        rfc3339(&f.last_seen)
    );
    if let Some(t) = &f.target {
        let _ = writeln!(s, "  target: {}", target_line(t));
    }
    let _ = writeln!(
        s,
        "  at {}:{} in {}",
        f.location.file, f.location.line, f.location.function
    );
    for r in &f.related {
        let _ = writeln!(
            s,
            "  related: {}:{} in {} — {}",
            r.file, r.line, r.function, r.role
        );
    }
    if f.evidence.as_object().is_some_and(|o| !o.is_empty()) {
        let _ = writeln!(s, "  evidence: {}", f.evidence);
    }
    for st in &f.stacks {
        let _ = writeln!(s, "  thread {} (tid {}):", st.thread, st.tid);
        for fr in &st.frames {
            let _ = writeln!(s, "    {}:{} {}", fr.file, fr.line, fr.function);
        }
    }
    s
}

pub fn target_line(t: &Target) -> String {
    let mut s = format!("pid {} {}", t.pid, t.exe);
    if let Some(v) = &t.python {
        let _ = write!(s, " (Python {v})");
    }
    if let Some(c) = &t.container {
        let _ = write!(s, " container {}", &c[..12.min(c.len())]);
    }
    if let Some(p) = &t.pod {
        let _ = write!(s, " pod {p}");
    }
    s
}

/// A Markdown report a person can paste into an incident ticket.
pub fn markdown(
    target: &Target,
    cmdline: &[String],
    findings: &[Finding],
    started: &pymedic_model::Timestamp,
    duration: std::time::Duration,
    detectors: &[&str],
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# pymedic diagnosis of pid {}\n", target.pid);
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(
        s,
        "| process | `{}` |",
        cmdline.join(" ").replace('|', "\\|")
    );
    let _ = writeln!(s, "| executable | `{}` |", target.exe);
    let _ = writeln!(
        s,
        "| Python | {} |",
        target.python.as_deref().unwrap_or("?")
    );
    if let Some(c) = &target.container {
        let _ = writeln!(s, "| container | `{c}` |");
    }
    if let Some(p) = &target.pod {
        let _ = writeln!(s, "| pod | `{p}` |");
    }
    let _ = writeln!(
        s,
        "| observed | {} for {:.0?} |",
        rfc3339(started),
        duration
    );
    let _ = writeln!(
        s,
        "| detectors | {} |",
        if detectors.is_empty() {
            "none".into()
        } else {
            detectors.join(", ")
        }
    );
    let _ = writeln!(s, "| host | `{}` |", hostname());
    let _ = writeln!(s);
    if findings.is_empty() {
        let _ = writeln!(
            s,
            "No findings: none of the detectors saw a problem during the observation."
        );
        return s;
    }
    let _ = writeln!(s, "## Summary\n");
    let _ = writeln!(
        s,
        "| severity | kind | status | where | what |\n|---|---|---|---|---|"
    );
    for f in findings {
        let _ = writeln!(
            s,
            "| {} | {} | {} | `{}:{}` | {} |",
            f.severity,
            f.kind,
            f.status.as_str(),
            f.location.file,
            f.location.line,
            f.title.replace('|', "\\|")
        );
    }
    for f in findings {
        let _ = writeln!(s, "\n## {} — {}\n", f.kind, f.title);
        let _ = writeln!(
            s,
            "- **severity** {} (confidence {:.2}), layer {}, {}; seen {} times between {} and {}",
            f.severity,
            f.confidence,
            f.layer,
            f.status.as_str(),
            f.count,
            rfc3339(&f.first_seen),
            rfc3339(&f.last_seen)
        );
        let _ = writeln!(
            s,
            "- **where** `{}:{}` in `{}`",
            f.location.file, f.location.line, f.location.function
        );
        for r in &f.related {
            let _ = writeln!(
                s,
                "- **{}** at `{}:{}` in `{}`",
                r.role, r.file, r.line, r.function
            );
        }
        let _ = writeln!(s, "- finding id `{}`", f.id);
        if f.evidence.as_object().is_some_and(|o| !o.is_empty()) {
            let _ = writeln!(
                s,
                "\nEvidence:\n\n```json\n{}\n```",
                serde_json::to_string_pretty(&f.evidence).unwrap_or_default()
            );
        }
        for st in &f.stacks {
            let _ = writeln!(
                s,
                "\nThread `{}` (tid {}), innermost first:\n\n```",
                st.thread, st.tid
            );
            for fr in &st.frames {
                let _ = writeln!(s, "{}:{} in {}", fr.file, fr.line, fr.function);
            }
            let _ = writeln!(s, "```");
        }
    }
    s
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}
