//! `pymedic diagnose`: the agent's detectors against one live process, no
//! daemon: JSON per INTERFACE.md and a Markdown report, on every interpreter.

use pymedic_integration::{PyProc, json_stdout, pymedic, pythons, require_root};

#[test]
fn agent_diagnose_reports_a_deadlock_and_nothing_on_a_healthy_process() {
    if !require_root("agent_diagnose_reports_a_deadlock_and_nothing_on_a_healthy_process") {
        return;
    }
    let handles: Vec<_> = pythons()
        .into_iter()
        .map(|py| {
            std::thread::spawn(move || {
                let dir = tempfile::tempdir().unwrap();
                let report = dir.path().join("report.md");
                let sick = PyProc::start(&py, "deadlock/globals_two_locks.py", &[]);
                let healthy = PyProc::start(&py, "healthy/contended.py", &[]);
                let pid = sick.pid().to_string();
                let out = pymedic(&[
                    "diagnose",
                    "--pid",
                    &pid,
                    "--duration",
                    "6s",
                    "--json",
                    "--report",
                    report.to_str().unwrap(),
                ]);
                assert!(
                    out.status.success(),
                    "{}: {}",
                    py.label,
                    String::from_utf8_lossy(&out.stderr)
                );
                let v = json_stdout(&out);
                assert_eq!(v["target"]["pid"], sick.pid(), "{}", py.label);
                assert!(
                    v["target"]["python"]
                        .as_str()
                        .unwrap()
                        .starts_with(&format!("3.{}", py.minor))
                );
                let findings = v["findings"].as_array().unwrap();
                assert_eq!(findings.len(), 1, "{}: {v}", py.label);
                let f = &findings[0];
                assert_eq!(f["kind"], "deadlock");
                assert_eq!(f["status"], "active");
                assert!(
                    f["location"]["file"]
                        .as_str()
                        .unwrap()
                        .ends_with("globals_two_locks.py")
                );
                assert!(
                    [13, 20].contains(&f["location"]["line"].as_u64().unwrap()),
                    "{}: {f}",
                    py.label
                );
                assert!(f["count"].as_u64().unwrap() >= 1);
                let md = std::fs::read_to_string(&report).unwrap();
                assert!(
                    md.starts_with(&format!("# pymedic diagnosis of pid {pid}")),
                    "{md}"
                );
                assert!(
                    md.contains("## deadlock")
                        && md.contains("holds lock_a")
                        && md.contains("holds lock_b"),
                    "{md}"
                );
                assert!(md.contains("globals_two_locks.py:"), "{md}");

                let out = pymedic(&[
                    "diagnose",
                    "--pid",
                    &healthy.pid().to_string(),
                    "--duration",
                    "4s",
                    "--json",
                ]);
                assert!(
                    out.status.success(),
                    "{}: {}",
                    py.label,
                    String::from_utf8_lossy(&out.stderr)
                );
                let v = json_stdout(&out);
                assert_eq!(
                    v["findings"],
                    serde_json::json!([]),
                    "{}: false positive on a healthy process",
                    py.label
                );
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// A deadlock that formed before diagnose attached is known from `/proc`
/// only (the waits sensor never saw its threads block). Its verdict must
/// stand at every check: it once resolved at the next check (250 ms) and came
/// back only with the 5 s `/proc` rescan, so in 6 s it was seen at most twice
/// and could read "resolved". Only the deadlock detector runs, with a whole
/// core of budget: the scheduler then spaces its checks by their interval
/// (250 ms), not by the cost of the dump that found the cycle (once ~4 s
/// on a loaded CI machine, which left one check in the run).
#[test]
fn agent_diagnose_keeps_a_deadlock_that_formed_before_it_attached() {
    if !require_root("agent_diagnose_keeps_a_deadlock_that_formed_before_it_attached") {
        return;
    }
    let py = pythons().into_iter().next().expect("a Python interpreter");
    let sick = PyProc::start(&py, "deadlock/globals_two_locks.py", &[]);
    // READY is printed after both threads block; give them time to settle.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let config = tempfile::NamedTempFile::new().unwrap();
    let mut toml = String::from("[detect]\ncpu_budget = 1.0\n");
    for other in [
        "cpu_hotspot",
        "memory_leak",
        "native_memory_leak",
        "fd_leak",
        "thread_leak",
        "gc_pause",
        "lock_order_inversion",
        "lock_contention",
        "gil_contention",
        "blocked_event_loop",
        "hang",
    ] {
        toml.push_str(&format!("[detectors.{other}]\nenabled = false\n"));
    }
    std::fs::write(config.path(), toml).unwrap();
    let out = pymedic(&[
        "diagnose",
        "--pid",
        &sick.pid().to_string(),
        "--duration",
        "6s",
        "--json",
        "--config",
        config.path().to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_stdout(&out);
    let findings = v["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 1, "{}: {v}", py.label);
    let f = &findings[0];
    assert_eq!(f["kind"], "deadlock");
    assert_eq!(f["status"], "active", "{}: {f}", py.label);
    assert!(
        f["count"].as_u64().unwrap() >= 3,
        "{}: the verdict did not stand between checks: {f}",
        py.label
    );
}

#[test]
fn agent_diagnose_rejects_bad_targets() {
    let out = pymedic(&["diagnose", "--pid", "999999999", "--duration", "1s"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let me = std::process::id().to_string();
    let out = pymedic(&["diagnose", "--pid", &me, "--duration", "1s"]);
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&me), "{err}");
    let out = pymedic(&["diagnose", "--pid", &me, "--duration", "soon"]);
    assert_eq!(out.status.code(), Some(2));
}
