//! `pymedic dump`: every deadlock scenario in `tests/scripts/deadlock/` gets
//! the right verdict (threads, waiting sites, acquisition sites), every
//! healthy program in `tests/scripts/healthy/` gets none, stacks agree with
//! `py-spy dump`, `--locals`/`--native` work, and bad input fails clearly —
//! on every interpreter `pythons()` finds, interpreters in parallel.
//!
//! Expected lines come from marker comments in the scripts (`# WAIT name`,
//! `# HOLD name`), so the scripts can change without editing this file.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use std::time::Duration;

use pymedic_integration::{PyProc, Python, json_stdout, pymedic, pythons, require_root, script};
use serde_json::Value;

/// Line number (1-based) of the line of `script_name` containing `# marker`.
fn marker(script_name: &str, marker: &str) -> u64 {
    let text = std::fs::read_to_string(script(script_name)).unwrap();
    let needle = format!("# {marker}");
    text.lines()
        .position(|l| l.trim_end().ends_with(&needle))
        .unwrap_or_else(|| panic!("{script_name}: no marker {needle:?}")) as u64
        + 1
}

fn dump_json(pid: u32, extra: &[&str]) -> Value {
    let pid = pid.to_string();
    let mut args = vec!["dump", "--json", pid.as_str()];
    args.extend_from_slice(extra);
    let out = pymedic(&args);
    assert!(
        out.status.success(),
        "pymedic dump {pid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_stdout(&out)
}

/// Runs `check` on fresh dumps until it returns Ok (up to ~6 s).
fn poll(
    p: &PyProc,
    extra: &[&str],
    check: impl Fn(&Value) -> Result<(), String>,
) -> Result<Value, String> {
    let mut last = String::new();
    for _ in 0..20 {
        let v = dump_json(p.pid(), extra);
        match check(&v) {
            Ok(()) => return Ok(v),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Err(last)
}

/// Runs `f` for every interpreter concurrently and fails with every
/// interpreter's failures at once.
fn on_every_python(test: &str, f: impl Fn(&Python) -> Vec<String> + Sync) {
    let pys = pythons();
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = pys
            .iter()
            .map(|py| s.spawn(|| (py.label.clone(), f(py))))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                let (label, errs) = h.join().expect("scenario thread panicked");
                errs.into_iter().map(move |e| format!("[{label}] {e}"))
            })
            .collect()
    });
    assert!(failures.is_empty(), "{test}:\n{}", failures.join("\n"));
}

/// A deadlock scenario: each thread's name, and the markers of where it
/// waits and where it took the lock the other waits for.
struct DeadlockCase {
    script: &'static str,
    kind: &'static str,
    threads: &'static [(&'static str, &'static str, &'static str)],
    lock_type: &'static str,
}

const DEADLOCKS: &[DeadlockCase] = &[
    DeadlockCase {
        script: "deadlock/globals_two_locks.py",
        kind: "cycle",
        threads: &[
            ("forward", "WAIT forward", "HOLD forward"),
            ("backward", "WAIT backward", "HOLD backward"),
        ],
        lock_type: "Lock",
    },
    DeadlockCase {
        script: "deadlock/instance_attrs.py",
        kind: "cycle",
        threads: &[
            ("alice-to-bob", "WAIT transfer", "HOLD transfer"),
            ("bob-to-alice", "WAIT transfer", "HOLD transfer"),
        ],
        lock_type: "Lock",
    },
    DeadlockCase {
        script: "deadlock/rlock_acquire_args.py",
        kind: "cycle",
        threads: &[
            ("loader", "WAIT worker", "HOLD worker"),
            ("refresher", "WAIT worker", "HOLD worker"),
        ],
        lock_type: "RLock",
    },
    DeadlockCase {
        script: "deadlock/closure_three.py",
        kind: "cycle",
        threads: &[
            ("stage-0", "WAIT stage", "HOLD stage"),
            ("stage-1", "WAIT stage", "HOLD stage"),
            ("stage-2", "WAIT stage", "HOLD stage"),
        ],
        lock_type: "Lock",
    },
    DeadlockCase {
        script: "deadlock/module_attr.py",
        kind: "cycle",
        threads: &[
            ("orders", "WAIT place_order", "HOLD place_order"),
            ("restock", "WAIT restock", "HOLD restock"),
        ],
        lock_type: "",
    },
    DeadlockCase {
        script: "deadlock/join_cycle.py",
        kind: "cycle",
        threads: &[
            ("MainThread", "WAIT shutdown", "HOLD shutdown"),
            // Holds nothing: it is the thread being joined.
            ("flusher", "WAIT flusher", ""),
        ],
        lock_type: "",
    },
    DeadlockCase {
        script: "deadlock/self_deadlock.py",
        kind: "self",
        threads: &[("registrar", "WAIT evict", "HOLD register")],
        lock_type: "Lock",
    },
];

fn check_deadlock(case: &DeadlockCase, v: &Value) -> Result<(), String> {
    let dls = v["deadlocks"].as_array().ok_or("no deadlocks array")?;
    let [d] = dls.as_slice() else {
        return Err(format!(
            "expected 1 deadlock, got {}: {}",
            dls.len(),
            v["deadlocks"]
        ));
    };
    if d["kind"] != case.kind {
        return Err(format!("kind {} != {}", d["kind"], case.kind));
    }
    let threads = d["threads"].as_array().ok_or("no threads")?;
    let names: BTreeSet<&str> = threads.iter().filter_map(|t| t["name"].as_str()).collect();
    let want: BTreeSet<&str> = case.threads.iter().map(|t| t.0).collect();
    if names != want {
        return Err(format!("threads {names:?} != {want:?}"));
    }
    let tids: HashMap<&str, u64> = threads
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap_or(""),
                t["tid"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    for t in threads {
        let name = t["name"].as_str().unwrap_or("");
        let (_, wait, hold) = case.threads.iter().find(|c| c.0 == name).unwrap();
        let wait_line = marker(case.script, wait);

        let w = &t["waiting_at"];
        if w["line"] != wait_line || !w["file"].as_str().unwrap_or("").ends_with(case.script) {
            return Err(format!("{name} waits at {w}, expected line {wait_line}"));
        }
        if w["function"].as_str().is_none_or(str::is_empty) {
            return Err(format!("{name}: no waiting function"));
        }
        let holder = t["waiting_for"]["holder_tid"].as_u64().unwrap_or(0);
        if !tids.values().any(|&x| x == holder) {
            return Err(format!(
                "{name} waits for holder {holder}, not in the cycle"
            ));
        }
        // `self.x` is named by the class of `self` (`Registry._lock`).
        let lock_name = t["waiting_for"]["lock"]["name"].as_str().unwrap_or("");
        if lock_name.starts_with("self.") {
            return Err(format!(
                "{name}: lock named {lock_name:?}, not by its class"
            ));
        }
        if !case.lock_type.is_empty() && t["waiting_for"]["lock"]["type"] != case.lock_type {
            return Err(format!(
                "{name}: lock type {}",
                t["waiting_for"]["lock"]["type"]
            ));
        }
        let holds = t["holds"].as_array().ok_or("no holds")?;
        if hold.is_empty() {
            continue;
        }
        let hold_line = marker(case.script, hold);
        if !holds.iter().any(|h| h["acquired_at"]["line"] == hold_line) {
            return Err(format!(
                "{name} holds {holds:?}, expected one acquired at line {hold_line}"
            ));
        }
    }
    // The same verdict as a deadlock Finding.
    let findings = v["findings"].as_array().ok_or("no findings")?;
    let f = findings
        .iter()
        .find(|f| f["kind"] == "deadlock")
        .ok_or("no deadlock finding")?;
    if f["layer"] != "temporal" || f["severity"] != "critical" {
        return Err(format!("finding layer/severity: {f}"));
    }
    if f["location"] != threads[0]["waiting_at"] {
        return Err(format!(
            "finding location {} != first waiting site",
            f["location"]
        ));
    }
    // A wait site per thread and a hold site per thread that holds.
    let sites = threads.len() + case.threads.iter().filter(|t| !t.2.is_empty()).count();
    if f["related"].as_array().is_none_or(|r| r.len() < sites) {
        return Err(format!("finding related: {}", f["related"]));
    }
    if f["stacks"]
        .as_array()
        .is_none_or(|s| s.len() != threads.len())
    {
        return Err("finding stacks".into());
    }
    Ok(())
}

#[test]
fn deadlock_scenarios_get_verdicts_on_every_interpreter() {
    if !require_root("deadlock_scenarios_get_verdicts_on_every_interpreter") {
        return;
    }
    on_every_python("deadlock scenarios", |py| {
        let mut errs = Vec::new();
        for case in DEADLOCKS {
            let p = PyProc::start(py, case.script, &[]);
            if let Err(e) = poll(&p, &[], |v| check_deadlock(case, v)) {
                errs.push(format!("{}: {e}", case.script));
            }
        }
        errs
    });
}

/// A chain: `waiters` threads wait (kind lock) for `holder`, which waits
/// in `ends_in`.
fn check_chain(v: &Value, waiters: &[&str], holder: &str, ends_in: &str) -> Result<(), String> {
    if v["deadlocks"].as_array().is_none_or(|d| !d.is_empty()) {
        return Err(format!("unexpected deadlock verdict: {}", v["deadlocks"]));
    }
    let threads = v["threads"].as_array().ok_or("threads")?;
    let by_name = |n: &str| threads.iter().find(|t| t["name"] == n);
    let h = by_name(holder).ok_or("no holder thread")?;
    if h["waiting"]["kind"] != ends_in {
        return Err(format!("holder waits in {}", h["waiting"]));
    }
    for w in waiters {
        let t = by_name(w).ok_or("no waiter thread")?;
        if t["waiting"]["kind"] != "lock" || t["waiting"]["holder_tid"] != h["tid"] {
            return Err(format!("{w} waiting: {}", t["waiting"]));
        }
    }
    let chains = v["chains"].as_array().ok_or("chains")?;
    if chains.len() != waiters.len() || chains.iter().any(|c| c["ends_in"] != ends_in) {
        return Err(format!("chains: {}", v["chains"]));
    }
    Ok(())
}

#[test]
fn lock_held_by_sleeping_or_reading_thread_is_a_chain_not_a_deadlock() {
    if !require_root("lock_held_by_sleeping_or_reading_thread_is_a_chain_not_a_deadlock") {
        return;
    }
    on_every_python("chains", |py| {
        let mut errs = Vec::new();
        let p = PyProc::start(py, "deadlock/chain_sleep.py", &[]);
        if let Err(e) = poll(&p, &[], |v| {
            check_chain(v, &["waiter-0", "waiter-1"], "holder", "sleep")
        }) {
            errs.push(format!("chain_sleep: {e}"));
        }
        drop(p);
        let p = PyProc::start(py, "deadlock/chain_io.py", &[]);
        if let Err(e) = poll(&p, &[], |v| check_chain(v, &["waiter"], "reader", "io")) {
            errs.push(format!("chain_io: {e}"));
        }
        errs
    });
}

/// Healthy programs: no verdict in any of several dumps, and the waits
/// they do have are named (thread name prefix, wait kind, marker).
const HEALTHY: &[(&str, &[(&str, &str)])] = &[
    ("healthy/contended.py", &[]),
    (
        "healthy/producer_consumer.py",
        &[
            ("idle-consumer", "queue"),
            ("blocked-producer", "queue"),
            ("consumer-", "queue"),
        ],
    ),
    (
        "healthy/conditions.py",
        &[
            ("cond-waiter", "condition"),
            ("event-waiter", "event"),
            ("sem-waiter", "semaphore"),
            ("sleeper", "sleep"),
            ("MainThread", "join"),
        ],
    ),
    ("healthy/thread_pool.py", &[("pool", "queue")]),
];

#[test]
fn healthy_programs_get_no_verdict_and_named_waits() {
    if !require_root("healthy_programs_get_no_verdict_and_named_waits") {
        return;
    }
    on_every_python("healthy programs", |py| {
        let mut errs = Vec::new();
        for (script_name, waits) in HEALTHY {
            let p = PyProc::start(py, script_name, &[]);
            let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
            for _ in 0..4 {
                let v = dump_json(p.pid(), &[]);
                if v["deadlocks"].as_array().is_none_or(|d| !d.is_empty()) {
                    errs.push(format!("{script_name}: false verdict {}", v["deadlocks"]));
                }
                for t in v["threads"].as_array().into_iter().flatten() {
                    if t["frames"].as_array().is_none_or(|f| f.is_empty()) {
                        errs.push(format!("{script_name}: thread {} has no frames", t["name"]));
                    }
                    if let Some(kind) = t["waiting"]["kind"].as_str() {
                        seen.insert((t["name"].as_str().unwrap_or("").to_owned(), kind.to_owned()));
                    }
                }
                std::thread::sleep(Duration::from_millis(150));
            }
            for (prefix, kind) in *waits {
                if !seen.iter().any(|(n, k)| n.starts_with(prefix) && k == kind) {
                    errs.push(format!(
                        "{script_name}: no {prefix}* thread waiting on {kind}; saw {seen:?}"
                    ));
                }
            }
        }
        errs
    });
}

/// `py-spy dump --json` of the same process (retried: py-spy sometimes
/// fails to read the version of a process it attaches to).
fn py_spy(pid: u32) -> Option<Value> {
    for _ in 0..5 {
        let out = Command::new("py-spy")
            .args(["dump", "--json", "--pid", &pid.to_string()])
            .output()
            .expect("run py-spy (cargo xtask setup installs it in target/venv)");
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).ok();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

#[test]
fn stacks_match_py_spy() {
    if !require_root("stacks_match_py_spy") {
        return;
    }
    on_every_python("stacks vs py-spy", |py| {
        let mut errs = Vec::new();
        for script_name in ["healthy/conditions.py", "deadlock/instance_attrs.py"] {
            let p = PyProc::start(py, script_name, &[]);
            std::thread::sleep(Duration::from_millis(300));
            let ours = dump_json(p.pid(), &[]);
            let Some(theirs) = py_spy(p.pid()) else {
                errs.push(format!("{script_name}: py-spy failed 5 times"));
                continue;
            };
            for t in theirs.as_array().into_iter().flatten() {
                let tid = t["os_thread_id"].as_u64().unwrap_or(0);
                let Some(mine) = ours["threads"]
                    .as_array()
                    .and_then(|a| a.iter().find(|m| m["tid"] == tid))
                else {
                    errs.push(format!("{script_name}: py-spy thread {tid} missing"));
                    continue;
                };
                if mine["name"] != t["thread_name"] {
                    errs.push(format!(
                        "{script_name}: name {} vs py-spy {}",
                        mine["name"], t["thread_name"]
                    ));
                }
                let a: Vec<(String, String, u64)> = mine["frames"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|f| {
                        (
                            f["file"].as_str().unwrap_or("").into(),
                            f["function"].as_str().unwrap_or("").into(),
                            f["line"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect();
                let b: Vec<(String, String, u64)> = t["frames"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|f| {
                        (
                            f["filename"].as_str().unwrap_or("").into(),
                            f["name"].as_str().unwrap_or("").into(),
                            f["line"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect();
                if a != b {
                    errs.push(format!(
                        "{script_name} tid {tid}:\n  pymedic {a:?}\n  py-spy  {b:?}"
                    ));
                }
            }
        }
        errs
    });
}

#[test]
fn locals_blocking_and_native_frames() {
    if !require_root("locals_blocking_and_native_frames") {
        return;
    }
    on_every_python("--locals / --blocking / --native", |py| {
        let mut errs = Vec::new();
        let p = PyProc::start(py, "deadlock/instance_attrs.py", &[]);
        let v = dump_json(p.pid(), &["--locals"]);
        let transfer = v["threads"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|t| t["frames"].as_array().into_iter().flatten())
            .find(|f| {
                f["function"]
                    .as_str()
                    .is_some_and(|n| n.ends_with("transfer"))
            });
        match transfer {
            Some(f) => {
                let locals: HashMap<&str, &str> = f["locals"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|l| {
                        (
                            l["name"].as_str().unwrap_or(""),
                            l["repr"].as_str().unwrap_or(""),
                        )
                    })
                    .collect();
                if !(locals.get("amount") == Some(&"10") || locals.get("amount") == Some(&"20")) {
                    errs.push(format!(
                        "--locals: amount = {:?} in {locals:?}",
                        locals.get("amount")
                    ));
                }
                if !locals.get("self").is_some_and(|s| s.contains("Account")) {
                    errs.push(format!("--locals: self = {:?}", locals.get("self")));
                }
            }
            None => errs.push("--locals: no transfer frame".into()),
        }
        let v = dump_json(p.pid(), &["--blocking"]);
        if v["paused"] != true || v["deadlocks"].as_array().is_none_or(|d| d.len() != 1) {
            errs.push(format!(
                "--blocking: paused {} deadlocks {}",
                v["paused"], v["deadlocks"]
            ));
        }
        let v = dump_json(p.pid(), &["--native"]);
        if v["paused"] != true {
            errs.push("--native did not report pausing".into());
        }
        for t in v["threads"].as_array().into_iter().flatten() {
            let frames: Vec<&Value> = t["frames"].as_array().into_iter().flatten().collect();
            let native = frames.iter().filter(|f| f["kind"] == "native").count();
            let python: Vec<&&Value> = frames.iter().filter(|f| f["kind"] == "python").collect();
            if native == 0 || python.is_empty() {
                errs.push(format!(
                    "--native: thread {} has {native} native, {} python frames",
                    t["name"],
                    python.len()
                ));
                continue;
            }
            // Python frames sit between native frames (interleaved), and a
            // native frame of the lock/sleep wait is above the innermost one.
            let first_py = frames.iter().position(|f| f["kind"] == "python").unwrap();
            if first_py == 0 {
                errs.push(format!(
                    "--native: thread {}: no native frame above Python",
                    t["name"]
                ));
            }
        }
        if let Some(notes) = v["notes"].as_array() {
            errs.extend(notes.iter().map(|n| format!("--native note: {n}")));
        }
        errs
    });
}

#[test]
fn bad_input_is_named_with_exit_codes() {
    if !require_root("bad_input_is_named_with_exit_codes") {
        return;
    }
    // No such process.
    let out = pymedic(&["dump", "4194000"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    // Not Python.
    let mut sleep = Command::new("sleep").arg("30").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let out = pymedic(&["dump", &sleep.id().to_string()]);
    let _ = sleep.kill();
    let _ = sleep.wait();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a CPython"),
        "{out:?}"
    );
    // Unsupported version (pyenv's 3.7, when present).
    if let Some(py37) = std::fs::read_dir("/root/.pyenv/versions")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("3.7."))
        })
    {
        let mut old = Command::new(py37.join("bin/python3.7"))
            .args(["-c", "import time; time.sleep(30)"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let out = pymedic(&["dump", &old.id().to_string()]);
        let _ = old.kill();
        let _ = old.wait();
        assert_eq!(out.status.code(), Some(2));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("does not support"),
            "{out:?}"
        );
    }
    // Lack of privileges: run pymedic as nobody against a root process.
    let py = &pythons()[0];
    let p = PyProc::start(py, "idle.py", &[]);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(pymedic_integration::pymedic_bin())
        .args(["dump", &p.pid().to_string()])
        .output()
        .expect("setpriv (util-linux)");
    assert_eq!(out.status.code(), Some(77), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CAP_SYS_PTRACE"),
        "{out:?}"
    );
    // A process that exits while (or just before) being read.
    let mut short = Command::new(&py.path)
        .args(["-c", "import time; time.sleep(0.3)"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let pid = short.id().to_string();
    let _ = short.wait();
    let out = pymedic(&["dump", &pid]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not exist") || err.contains("exited"),
        "{err}"
    );
}

#[test]
fn layout_matches_live_interpreters() {
    if !require_root("layout_matches_live_interpreters") {
        return;
    }
    use pymedic_python::{Interpreter, LiveMemory, ProcessMemory};
    on_every_python("live layout", |py| {
        let mut errs = Vec::new();
        let p = PyProc::start(py, "locks_layout.py", &[]);
        let nums: Vec<u64> = p
            .ready
            .split_whitespace()
            .skip(1)
            .filter_map(|s| s.parse().ok())
            .collect();
        let [lock, free_lock, rlock, ident] = nums[..] else {
            return vec![format!("bad READY line {:?}", p.ready)];
        };
        let pid = p.pid();
        let process = pymedic_python::inspect(pid).unwrap();
        let interp = Interpreter::for_process(LiveMemory::new(pid), &process).unwrap();
        let mem = interp.memory();
        let l = &interp.layout().lock;
        // 3.13: every offset _Py_DebugOffsets publishes agrees with the table.
        match interp.check_debug_offsets() {
            Ok(Some(bad)) if !bad.is_empty() => {
                errs.push(format!("debug offsets disagree: {bad:?}"))
            }
            Ok(None) if py.minor >= 13 => errs.push("3.13 has no debug offsets?".into()),
            Err(e) => errs.push(format!("debug offsets: {e}")),
            _ => {}
        }
        // _thread.lock / _thread.RLock fields (private to _threadmodule.c).
        let ty = |o: u64| interp.type_name(o).unwrap_or_default();
        if ty(lock) != "_thread.lock" || ty(rlock) != "_thread.RLock" {
            errs.push(format!("lock types: {} / {}", ty(lock), ty(rlock)));
        }
        let u8_at = |a: u64| mem.read_u8(a).unwrap_or(255);
        let u64_at = |a: u64| mem.read_u64(a).unwrap_or(u64::MAX);
        if u8_at(lock + u64::from(l.locked)) != 1 || u8_at(free_lock + u64::from(l.locked)) != 0 {
            errs.push("Lock.locked flag not where the table says".into());
        }
        if u64_at(lock + u64::from(l.lock_lock)) == 0
            || u64_at(rlock + u64::from(l.rlock_lock)) == 0
        {
            errs.push("lock_lock / rlock_lock is NULL".into());
        }
        if u64_at(rlock + u64::from(l.rlock_owner)) != ident
            || u64_at(rlock + u64::from(l.rlock_count)) != 2
        {
            errs.push(format!(
                "RLock owner/count: {:#x}/{} (expected {ident:#x}/2)",
                u64_at(rlock + u64::from(l.rlock_owner)),
                u64_at(rlock + u64::from(l.rlock_count))
            ));
        }
        // The main thread: ident, kernel tid, top frame, GIL state.
        let threads = interp.threads().unwrap_or_default();
        let Some(main) = threads.iter().find(|t| t.thread_id == ident) else {
            errs.push("no thread state with the main thread's ident".into());
            return errs;
        };
        let tids = interp.native_tids(&threads, &[pid]);
        if tids.get(&ident) != Some(&pid) {
            errs.push(format!(
                "main thread tid {:?} != pid {pid}",
                tids.get(&ident)
            ));
        }
        // READY is printed on the line before the sleep: a busy machine can
        // read the frame before the interpreter gets there, so the thread is
        // read again (fresh thread states) until it sleeps, for 10 s at most.
        let want = (
            String::from("<module>"),
            marker("locks_layout.py", "SLEEP main") as u32,
        );
        let started = std::time::Instant::now();
        let top = loop {
            let threads = interp.threads().unwrap_or_default();
            let top = threads
                .iter()
                .find(|t| t.thread_id == ident)
                .and_then(|t| interp.frames(t).ok())
                .and_then(|frames| frames.first().map(|f| (f.code.name.clone(), f.line)));
            if top.as_ref() == Some(&want) || started.elapsed() > Duration::from_secs(10) {
                break top;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if top.as_ref() != Some(&want) {
            errs.push(format!("top frame {top:?} != {want:?}"));
        }
        let names = interp.thread_names(main.interp).unwrap_or_default();
        if names.get(&ident).map(String::as_str) != Some("MainThread") {
            errs.push(format!("thread names {names:?}"));
        }
        errs
    });
}
