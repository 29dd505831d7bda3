//! The resource layer end to end: leaking programs from
//! `tests/scripts/resource/` on every interpreter, each diagnosed by one
//! `pymedic diagnose --duration 30s` (with only the resource detectors),
//! all of a batch in parallel. Each leak must be reported at the line its
//! script marks (`# RETAIN`, `# ALLOC`, `# FD-LEAK-...`, ...), memory
//! leaks with both their retaining and allocation sites; the bounded-churn
//! program must not be reported at all.

use std::path::Path;
use std::sync::Mutex;

use pymedic_integration::{
    PyProc, Python, json_stdout, pymedic_bin, pythons, require_root, script,
};
use serde_json::Value;

/// Resource detectors only: the others cost CPU a crowded machine needs.
/// The tests run the debug build, whose heap reads cost about ten times
/// the release build's; the scheduler spaces checks by their CPU cost, so
/// the budget is raised by as much (what is tested is what is found, not
/// the budget).
const CONFIG: &str = "\
[detect]\ncpu_budget = 0.5\n\
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
    /// An `fd_leak` at the line marked `at` whose evidence says what the
    /// newest descriptors point to (`points_to` in the first one), the
    /// growth rate and the time to `EMFILE`, and whose structural
    /// cross-check names the exit path that skips the close (`exit`: the
    /// marker of that line and its kind, `raise` or `return`; `None`:
    /// any static explanation of the function).
    Fd {
        at: &'static str,
        points_to: &'static str,
        exit: Option<(&'static str, &'static str)>,
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
            Expect::Fd {
                at,
                points_to,
                exit,
            } => {
                let line = line_of(case.script, at);
                let Some(f) = all.iter().find(|f| {
                    f["kind"] == "fd_leak"
                        && file_ok(f)
                        && f["location"]["line"].as_u64() == Some(line)
                }) else {
                    return Err(format!(
                        "{} {}: no fd_leak at line {line} ({at}); findings:\n{}",
                        py.label,
                        case.script,
                        summary()
                    ));
                };
                let ev = &f["evidence"];
                let target = ev["recent"][0]["target"].as_str().unwrap_or("");
                let rate = ev["growth_per_second"].as_f64().unwrap_or(0.0);
                let emfile = ev["seconds_to_emfile"].as_f64();
                if !target.contains(points_to) || rate <= 0.0 || emfile.is_none() {
                    return Err(format!(
                        "{} {}: fd_leak evidence lacks the descriptors' target ({points_to:?}), \
                         the rate or the time to EMFILE: {ev}",
                        py.label, case.script
                    ));
                }
                let statics: Vec<&str> = f["related"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r["role"].as_str())
                    .filter(|r| r.starts_with("static:"))
                    .collect();
                let named = match exit {
                    Some((marker, how)) => {
                        let want =
                            format!("exit path at line {} ({how})", line_of(case.script, marker));
                        statics.iter().any(|r| r.contains(&want))
                    }
                    None => !statics.is_empty(),
                };
                if !named {
                    return Err(format!(
                        "{} {}: the structural cross-check does not name the exit path \
                         ({exit:?}): {statics:?}",
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

/// How many (interpreter, program) pairs run at once: enough to keep the
/// whole file within a few minutes, few enough that a crowded 2-core
/// machine still gives every target and every agent its share.
const PARALLEL: usize = 14;

/// Runs one program under one `pymedic diagnose`; checks its findings.
fn run_one(py: &Python, case: &Case, config: &Path) -> Result<(), String> {
    let proc = PyProc::start(py, &format!("resource/{}", case.script), case.args);
    let out = std::process::Command::new(pymedic_bin())
        .args([
            "diagnose",
            "--pid",
            &proc.pid().to_string(),
            "--duration",
            "30s",
            "--json",
            "--config",
            config.to_str().unwrap(),
        ])
        .env("RUST_LOG", "warn,pymedic::engine::detect=debug")
        .output()
        .expect("run pymedic");
    let log = || {
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    };
    if !out.status.success() {
        return Err(format!(
            "{} {}: diagnose failed: {}",
            py.label,
            case.script,
            log()
        ));
    }
    check(py, case, &json_stdout(&out)).map_err(|e| format!("{e}\nagent log (tail):\n{}", log()))
}

/// Runs every (interpreter, case) pair of `cases`, [`PARALLEL`] at a time;
/// returns the failures.
fn run_batch(cases: &[&'static Case], config: &Path) -> Vec<String> {
    let jobs: Mutex<Vec<(Python, &'static Case)>> = Mutex::new(
        pythons()
            .into_iter()
            .flat_map(|py| cases.iter().map(move |&c| (py.clone(), c)))
            .collect(),
    );
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..PARALLEL {
            s.spawn(|| {
                loop {
                    let Some((py, case)) = jobs.lock().unwrap().pop() else {
                        return;
                    };
                    let t0 = std::time::Instant::now();
                    let result = run_one(&py, case, config);
                    eprintln!(
                        "{} {}: {} in {:.0?}",
                        py.label,
                        case.script,
                        if result.is_ok() { "ok" } else { "FAILED" },
                        t0.elapsed()
                    );
                    if let Err(e) = result {
                        failures.lock().unwrap().push(e);
                    }
                }
            });
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
            Expect::Fd {
                at: "# FD-LEAK-EXCEPTION",
                points_to: "empty.cfg",
                exit: Some(("# FD-EXIT-RAISE", "raise")),
            },
            Expect::Fd {
                at: "# FD-LEAK-RETURN",
                points_to: "data.txt",
                exit: Some(("# FD-EXIT-RETURN", "return")),
            },
        ],
    },
    Case {
        script: "sockets.py",
        args: &["20"],
        expect: &[Expect::Fd {
            at: "# SOCKET-LEAK",
            points_to: "tcp 127.0.0.1:",
            exit: None,
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
