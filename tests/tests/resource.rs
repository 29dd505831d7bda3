//! The resource layer end to end: leaking programs from
//! `tests/scripts/resource/` on every interpreter, each diagnosed by one
//! `pymedic diagnose --duration 30s` (with only the resource detectors),
//! all of a batch in parallel. Each leak must be reported at the line its
//! script marks (`# RETAIN`, `# ALLOC`, `# FD-LEAK-...`, ...), memory
//! leaks with both their retaining and allocation sites; the bounded-churn
//! program must not be reported at all.

use std::path::Path;
use std::sync::Mutex;

use pymedic_integration::{PyProc, Python, json_stdout, pymedic, pythons, require_root, script};
use serde_json::Value;

/// Resource detectors only: the others cost CPU a crowded machine needs.
const CONFIG: &str = "\
[detectors.deadlock]\nenabled = false\n\
[detectors.cpu_hotspot]\nenabled = false\n";

/// 1-based line of the first line of `script` containing `marker`.
fn line_of(script_name: &str, marker: &str) -> u64 {
    let text = std::fs::read_to_string(script(&format!("resource/{script_name}"))).unwrap();
    text.lines()
        .position(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("{script_name} has no line marked {marker}")) as u64
        + 1
}

/// What one program must (or must not) produce.
#[derive(Clone, Copy)]
enum Expect {
    /// A finding of `kind` located at the line marked `at`.
    At {
        kind: &'static str,
        at: &'static str,
    },
    /// A memory leak retained at `retain` and allocated at `alloc` (the
    /// allocation related entry, or the allocation stack, names it).
    Memory {
        retain: &'static str,
        alloc: &'static str,
        container: &'static str,
    },
    /// No finding of these kinds.
    Nothing { kinds: &'static [&'static str] },
}

struct Case {
    script: &'static str,
    args: &'static [&'static str],
    expect: &'static [Expect],
}

fn findings(v: &Value) -> Vec<Value> {
    v["findings"].as_array().cloned().unwrap_or_default()
}

fn check(py: &Python, case: &Case, v: &Value) -> Result<(), String> {
    let all = findings(v);
    let is_script = |p: &Value| {
        p.as_str()
            .is_some_and(|p| Path::new(p).ends_with(case.script))
    };
    let file_ok = |f: &Value| is_script(&f["location"]["file"]);
    let summary = || {
        all.iter()
            .map(|f| format!("  {} {} | {}", f["kind"], f["location"], f["title"]))
            .collect::<Vec<_>>()
            .join("\n")
    };
    for e in case.expect {
        match *e {
            Expect::At { kind, at } => {
                let line = line_of(case.script, at);
                if !all.iter().any(|f| {
                    f["kind"] == kind && file_ok(f) && f["location"]["line"].as_u64() == Some(line)
                }) {
                    return Err(format!(
                        "{} {}: no {kind} at line {line} ({at}); findings:\n{}",
                        py.label,
                        case.script,
                        summary()
                    ));
                }
            }
            Expect::Memory {
                retain,
                alloc,
                container,
            } => {
                let (rl, al) = (line_of(case.script, retain), line_of(case.script, alloc));
                let Some(f) = all.iter().find(|f| {
                    f["kind"] == "memory_leak"
                        && file_ok(f)
                        && f["location"]["line"].as_u64() == Some(rl)
                }) else {
                    return Err(format!(
                        "{} {}: no memory_leak retained at line {rl}; findings:\n{}",
                        py.label,
                        case.script,
                        summary()
                    ));
                };
                let retained_by = f["evidence"]["retained_by"].as_str().unwrap_or("");
                if !retained_by.ends_with(container) {
                    return Err(format!(
                        "{} {}: retained by {retained_by:?}, expected {container}",
                        py.label, case.script
                    ));
                }
                let related = f["related"].as_array().cloned().unwrap_or_default();
                let retained_here = related.iter().any(|r| {
                    r["line"].as_u64() == Some(rl)
                        && r["role"]
                            .as_str()
                            .is_some_and(|s| s.starts_with("retained here"))
                });
                let allocated: Vec<&Value> = related
                    .iter()
                    .filter(|r| {
                        r["role"]
                            .as_str()
                            .is_some_and(|s| s.starts_with("allocated here"))
                    })
                    .collect();
                let alloc_stack = f["stacks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|s| s["thread"] == "allocation");
                let alloc_ok = allocated.iter().any(|r| r["line"].as_u64() == Some(al))
                    || alloc_stack.is_some_and(|s| {
                        s["frames"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|fr| fr["line"].as_u64() == Some(al) && is_script(&fr["file"]))
                    });
                if !retained_here || !alloc_ok {
                    return Err(format!(
                        "{} {}: retaining site (line {rl}) named: {retained_here}, allocation \
                         site (line {al}) named: {alloc_ok}: {f}",
                        py.label, case.script
                    ));
                }
            }
            Expect::Nothing { kinds } => {
                if let Some(f) = all.iter().find(|f| kinds.iter().any(|k| f["kind"] == *k)) {
                    return Err(format!(
                        "{} {}: bounded churn reported as a leak: {}",
                        py.label, case.script, f["title"]
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Runs every (interpreter, case) pair of `cases` at once; returns the
/// failures.
fn run_batch(cases: &[&'static Case], config: &Path) -> Vec<String> {
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for py in pythons() {
            for &case in cases {
                let py = py.clone();
                let failures = &failures;
                s.spawn(move || {
                    let proc = PyProc::start(&py, &format!("resource/{}", case.script), case.args);
                    let out = pymedic(&[
                        "diagnose",
                        "--pid",
                        &proc.pid().to_string(),
                        "--duration",
                        "30s",
                        "--json",
                        "--config",
                        config.to_str().unwrap(),
                    ]);
                    let result = if out.status.success() {
                        check(&py, case, &json_stdout(&out))
                    } else {
                        Err(format!(
                            "{} {}: diagnose failed: {}",
                            py.label,
                            case.script,
                            String::from_utf8_lossy(&out.stderr)
                        ))
                    };
                    if let Err(e) = result {
                        failures.lock().unwrap().push(e);
                    }
                });
            }
        }
    });
    failures.into_inner().unwrap()
}

static MEMORY: [Case; 4] = [
    Case {
        script: "cache.py",
        args: &["150"],
        expect: &[Expect::Memory {
            retain: "# RETAIN",
            alloc: "# ALLOC",
            container: "._responses",
        }],
    },
    Case {
        script: "closures.py",
        args: &["150"],
        expect: &[Expect::Memory {
            retain: "# RETAIN",
            alloc: "# RETAIN ALLOC",
            container: ".callbacks",
        }],
    },
    Case {
        script: "classattr.py",
        args: &["60"],
        expect: &[Expect::Memory {
            retain: "# RETAIN",
            alloc: "# ALLOC",
            container: ".Session.history",
        }],
    },
    Case {
        script: "bounded.py",
        args: &["150"],
        expect: &[Expect::Nothing {
            kinds: &["memory_leak", "native_memory_leak"],
        }],
    },
];

static DESCRIPTORS: [Case; 3] = [
    Case {
        script: "fd_paths.py",
        args: &["20"],
        expect: &[
            Expect::At {
                kind: "fd_leak",
                at: "# FD-LEAK-EXCEPTION",
            },
            Expect::At {
                kind: "fd_leak",
                at: "# FD-LEAK-RETURN",
            },
        ],
    },
    Case {
        script: "sockets.py",
        args: &["20"],
        expect: &[Expect::At {
            kind: "fd_leak",
            at: "# SOCKET-LEAK",
        }],
    },
    Case {
        script: "threads.py",
        args: &["5"],
        expect: &[Expect::At {
            kind: "thread_leak",
            at: "# THREAD-LEAK",
        }],
    },
];

static NATIVE_AND_GC: [Case; 2] = [
    Case {
        script: "native.py",
        args: &["30"],
        expect: &[Expect::At {
            kind: "native_memory_leak",
            at: "# NATIVE-LEAK",
        }],
    },
    Case {
        script: "gc_heavy.py",
        args: &["30000", "800000"],
        expect: &[Expect::At {
            kind: "gc_pause",
            at: "# GC-TRIGGER",
        }],
    },
];

fn config_file(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("resource.toml");
    std::fs::write(&p, CONFIG).unwrap();
    p
}

#[test]
fn memory_leaks_are_named_by_retaining_and_allocation_site_and_bounded_churn_is_not() {
    if !require_root("memory_leaks_are_named_by_retaining_and_allocation_site") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<&Case> = MEMORY.iter().collect();
    let failures = run_batch(&cases, &config_file(dir.path()));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn descriptor_and_thread_leaks_are_named_to_the_line() {
    if !require_root("descriptor_and_thread_leaks_are_named_to_the_line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<&Case> = DESCRIPTORS.iter().collect();
    let failures = run_batch(&cases, &config_file(dir.path()));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn native_leaks_and_gc_pauses_are_named_to_the_line() {
    if !require_root("native_leaks_and_gc_pauses_are_named_to_the_line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<&Case> = NATIVE_AND_GC.iter().collect();
    let failures = run_batch(&cases, &config_file(dir.path()));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
