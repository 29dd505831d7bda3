//! The temporal detectors (issue 6) against real failing and healthy
//! programs, through `pymedic diagnose`, on every interpreter: every
//! required site is checked against markers in the scripts.
//!
//! Each program gets its own `pymedic diagnose`, all of one interpreter's
//! running side by side (one interpreter at a time).
//! The 2-core CI machine runs debug builds, so the diagnoses get a larger
//! CPU budget than the default (a debug check costs about ten times a
//! release one), and the deadlock forms 8 s in, once every sensor is up
//! (an agent watches a process long before its deadlock).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use pymedic_integration::{PyProc, Python, json_stdout, pymedic, pythons, require_root, script};
use serde_json::Value;

/// Settings the scenarios need: a hang threshold and contention windows a
/// short test can wait for.
const CONFIG: &str = r#"
[detect]
cpu_budget = 0.25
[detectors.hang]
threshold = "3s"
[detectors.lock_contention]
window = "4s"
[detectors.gil_contention]
window = "4s"
"#;

/// Line number (1-based) of the line of `script_name` containing `# marker`.
fn marker(script_name: &str, marker: &str) -> u64 {
    let text = std::fs::read_to_string(script(script_name)).unwrap();
    let needle = format!("# {marker}");
    text.lines()
        .position(|l| l.trim_end().ends_with(&needle))
        .unwrap_or_else(|| panic!("{script_name}: no marker {needle:?}")) as u64
        + 1
}

fn diagnose(pid: u32, duration: &str, config: &Path) -> Value {
    let out = pymedic(&[
        "diagnose",
        "--pid",
        &pid.to_string(),
        "--duration",
        duration,
        "--json",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "diagnose {pid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_stdout(&out)
}

fn of_kind<'a>(v: &'a Value, kind: &str) -> Vec<&'a Value> {
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == kind)
        .collect()
}

fn lines(f: &Value, key: &str) -> Vec<u64> {
    f[key]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["line"].as_u64())
        .collect()
}

/// Each edge of a `lock_order_inversion` finding as (outer line, inner
/// line), sorted.
fn edge_sites(f: &Value) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = f["evidence"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["outer"]["taken_at"]["line"].as_u64().unwrap(),
                e["inner"]["taken_at"]["line"].as_u64().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Runs `per_python` for every interpreter, `parallel` at a time.
fn each_python(parallel: usize, per_python: impl Fn(Python) + Send + Sync + Copy + 'static) {
    let all = pythons();
    for batch in all.chunks(parallel) {
        let handles: Vec<_> = batch
            .iter()
            .cloned()
            .map(|py| std::thread::spawn(move || per_python(py)))
            .collect();
        let mut failed = Vec::new();
        for h in handles {
            if let Err(e) = h.join() {
                failed.push(e);
            }
        }
        if let Some(e) = failed.into_iter().next() {
            std::panic::resume_unwind(e);
        }
    }
}

fn config_file() -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), CONFIG).unwrap();
    f
}

/// Starts every program and diagnoses each for `duration`, all at once.
fn diagnose_all(
    py: &Python,
    programs: &[(&str, &[&str])],
    duration: &str,
) -> HashMap<String, (PyProc, Value)> {
    let config = config_file();
    let procs: Vec<(String, PyProc)> = programs
        .iter()
        .map(|(name, args)| (name.to_string(), PyProc::start(py, name, args)))
        .collect();
    let results: Vec<(String, PyProc, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = procs
            .into_iter()
            .map(|(name, p)| {
                let path = config.path().to_owned();
                let duration = duration.to_owned();
                s.spawn(move || {
                    let v = diagnose(p.pid(), &duration, &path);
                    (name, p, v)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    results.into_iter().map(|(n, p, v)| (n, (p, v))).collect()
}

/// `blocked_loop.py`'s two blocking calls, each at its line in its coroutine.
fn check_blocked_loop(label: &str, v: &Value) {
    let s = "temporal/blocked_loop.py";
    let f = of_kind(v, "blocked_event_loop");
    let sleep = f
        .iter()
        .find(|f| f["location"]["line"] == marker(s, "BLOCKING sleep"))
        .unwrap_or_else(|| panic!("{label}: no sleep finding: {v}"));
    assert_eq!(
        sleep["evidence"]["coroutine"]["function"], "slow_handler",
        "{label}"
    );
    assert!(sleep["evidence"]["longest_step_here_ms"].as_f64().unwrap() >= 250.0);
    let cpu = f
        .iter()
        .find(|f| f["location"]["line"] == marker(s, "BLOCKING cpu"))
        .unwrap_or_else(|| panic!("{label}: no CPU-loop finding: {v}"));
    assert_eq!(
        cpu["evidence"]["coroutine"]["function"], "cpu_handler",
        "{label}"
    );
    let lp = marker(s, "CPU LOOP");
    assert!(
        lines(cpu, "related")
            .iter()
            .any(|l| *l == lp || *l == lp + 1),
        "{label}: {cpu}"
    );
}

#[test]
fn temporal_detectors_find_every_scenario_with_its_sites() {
    if !require_root("temporal_detectors_find_every_scenario_with_its_sites") {
        return;
    }
    each_python(1, |py| {
        let label = py.label.clone();
        let mut r = diagnose_all(
            &py,
            &[
                ("temporal/live_deadlock.py", &["8"]),
                ("temporal/transfer_inversion.py", &[]),
                ("temporal/lock_inversion.py", &[]),
                ("temporal/lock_contention.py", &[]),
                ("temporal/gil_contention.py", &[]),
                ("temporal/blocked_loop.py", &[]),
                ("temporal/hang.py", &[]),
            ],
            "16s",
        );

        // deadlock: both wait sites and both acquisition sites, within 5 s.
        let s = "temporal/live_deadlock.py";
        let (p, v) = r.get_mut(s).unwrap();
        let onset: f64 = p.wait_for_line("ONSET", Duration::from_secs(1))[6..]
            .trim()
            .parse()
            .unwrap();
        let d = of_kind(v, "deadlock");
        assert_eq!(d.len(), 1, "{label}: {v}");
        let waits = [marker(s, "WAIT settle"), marker(s, "WAIT audit")];
        let holds = [marker(s, "HOLD settle"), marker(s, "HOLD audit")];
        assert!(
            waits.contains(&d[0]["location"]["line"].as_u64().unwrap()),
            "{label}: {}",
            d[0]
        );
        let rel = lines(d[0], "related");
        for l in waits.iter().chain(&holds) {
            assert!(rel.contains(l), "{label}: line {l} missing: {}", d[0]);
        }
        let first_seen = chrono_seconds(d[0]["first_seen"].as_str().unwrap());
        let ttv = first_seen - onset;
        eprintln!(
            "{label}: deadlock time to verdict {ttv:.2} s (onset {onset}, first seen {}, blocked for {} ms)",
            d[0]["first_seen"], d[0]["evidence"]["blocked_for_ms"]
        );
        assert!(
            (0.0..5.0).contains(&ttv),
            "{label}: deadlock reported {ttv:.2} s after onset: {}",
            d[0]
        );

        // lock_order_inversion: every edge's outer and inner site.
        let s = "temporal/lock_inversion.py";
        let v = &r[s].1;
        let f = of_kind(v, "lock_order_inversion");
        assert_eq!(f.len(), 1, "{label}: {v}");
        let rel = lines(f[0], "related");
        for m in [
            "OUTER place_order",
            "INNER place_order",
            "OUTER restock",
            "INNER restock",
        ] {
            assert!(
                rel.contains(&marker(s, m)),
                "{label}: {m} missing: {}",
                f[0]
            );
        }
        assert_eq!(
            edge_sites(f[0]),
            [
                (
                    marker(s, "OUTER place_order"),
                    marker(s, "INNER place_order")
                ),
                (marker(s, "OUTER restock"), marker(s, "INNER restock")),
            ],
            "{label}: {}",
            f[0]
        );
        assert!(of_kind(v, "deadlock").is_empty(), "{label}: {v}");
        // The same two lines in both directions (locks passed as arguments).
        let s = "temporal/transfer_inversion.py";
        let v = &r[s].1;
        let f = of_kind(v, "lock_order_inversion");
        assert_eq!(f.len(), 1, "{label}: {v}");
        let (outer, inner) = (marker(s, "OUTER transfer"), marker(s, "INNER transfer"));
        assert_eq!(
            edge_sites(f[0]),
            [(outer, inner), (outer, inner)],
            "{label}: {}",
            f[0]
        );
        let ids: Vec<_> = f[0]["evidence"]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["outer"]["id"].clone(), e["inner"]["id"].clone()))
            .collect();
        assert!(
            ids[0].0 == ids[1].1 && ids[0].1 == ids[1].0 && ids[0].0 != ids[0].1,
            "{label}: not a two-lock cycle: {}",
            f[0]
        );

        // lock_contention: the contended site and the holder.
        let s = "temporal/lock_contention.py";
        let v = &r[s].1;
        let f = of_kind(v, "lock_contention");
        assert_eq!(f.len(), 1, "{label}: {v}");
        assert_eq!(
            f[0]["location"]["line"],
            marker(s, "CONTENDED"),
            "{label}: {}",
            f[0]
        );
        assert_eq!(f[0]["evidence"]["lock"], "self._lock", "{label}: {}", f[0]);
        assert!(
            f[0]["related"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["role"].as_str().unwrap().starts_with("holds self._lock")),
            "{label}: {}",
            f[0]
        );
        assert!(f[0]["evidence"]["waiting_threads"].as_u64().unwrap() >= 2);

        // gil_contention: the loop that keeps the GIL.
        let s = "temporal/gil_contention.py";
        let v = &r[s].1;
        let f = of_kind(v, "gil_contention");
        assert_eq!(f.len(), 1, "{label}: {v}");
        let hot = marker(s, "HOT");
        assert!(
            [hot, hot + 1].contains(&f[0]["location"]["line"].as_u64().unwrap()),
            "{label}: {}",
            f[0]
        );
        assert!(f[0]["evidence"]["gil_wait_share"].as_f64().unwrap() > 0.5);

        // blocked_event_loop: the synchronous sleep and the CPU loop, each
        // with the coroutine that made the call.
        check_blocked_loop(&label, &r["temporal/blocked_loop.py"].1);

        // hang: the main thread's join, with the stuck worker's site.
        let s = "temporal/hang.py";
        let v = &r[s].1;
        let f = of_kind(v, "hang");
        let main = f
            .iter()
            .find(|f| f["location"]["line"] == marker(s, "HANG main"))
            .unwrap_or_else(|| panic!("{label}: {v}"));
        assert!(
            lines(main, "related").contains(&marker(s, "STUCK worker")),
            "{label}: {main}"
        );
    });
}

/// Seconds since the epoch of an RFC 3339 UTC timestamp.
fn chrono_seconds(ts: &str) -> f64 {
    // 2026-11-23T16:05:01.123456Z
    let (date, time) = ts.trim_end_matches('Z').split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap()).collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms.split(':').map(|x| x.parse().unwrap()).collect();
    let days = days_from_civil(d[0], d[1], d[2]);
    let frac: f64 = format!("0.{frac}").parse().unwrap();
    (days * 86400 + t[0] * 3600 + t[1] * 60 + t[2]) as f64 + frac
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

#[test]
fn rfc3339_parses() {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((chrono_seconds("1970-01-02T00:00:01.5Z") - 86401.5).abs() < 1e-9);
    assert!(chrono_seconds("2026-01-01T00:00:00Z") < now + 1e9);
}

/// Healthy programs, 30 s each: none may produce a finding of the kinds
/// listed with it.
#[test]
fn temporal_detectors_stay_quiet_on_healthy_programs() {
    if !require_root("temporal_detectors_stay_quiet_on_healthy_programs") {
        return;
    }
    const ALL: &[&str] = &[
        "deadlock",
        "lock_order_inversion",
        "lock_contention",
        "gil_contention",
        "blocked_event_loop",
        "hang",
    ];
    // CPU-bound and lock-hammering programs are contended for real; they
    // must still show no inversion, deadlock, hang or blocked loop.
    const ORDERLY: &[&str] = &[
        "deadlock",
        "lock_order_inversion",
        "blocked_event_loop",
        "hang",
    ];
    // One interpreter at a time: two sets of seven busy programs plus
    // fourteen debug-build observers loading eBPF objects on 2 cores once
    // kept a program from starting for 60 s in CI.
    each_python(1, |py| {
        let label = py.label.clone();
        let programs: &[(&str, &[&str], &[&str])] = &[
            ("healthy/contended.py", &[], ORDERLY),
            ("healthy/thread_pool.py", &[], ORDERLY),
            ("healthy/io_pool.py", &[], ALL),
            ("healthy/producer_consumer.py", &[], ALL),
            ("healthy/conditions.py", &[], ALL),
            ("temporal/healthy_asyncio.py", &[], ALL),
            ("temporal/healthy_daemon.py", &[], ALL),
            ("temporal/lock_churn.py", &[], ALL),
        ];
        let list: Vec<(&str, &[&str])> = programs.iter().map(|(n, a, _)| (*n, *a)).collect();
        let r = diagnose_all(&py, &list, "30s");
        for (name, _, kinds) in programs {
            let v = &r[*name].1;
            for k in *kinds {
                let f = of_kind(v, k);
                assert!(f.is_empty(), "{label} {name}: unexpected {k}: {v}");
            }
        }
    });
}

#[test]
fn blocked_event_loop_names_the_call_on_uvloop() {
    if !require_root("blocked_event_loop_names_the_call_on_uvloop") {
        return;
    }
    // uvloop is installed (tests/requirements.txt) in the test venv, whose
    // interpreter is Debian's static python3.11.
    let py = Python {
        label: "3.11-debian+uvloop".into(),
        path: pymedic_integration::repo_root().join("target/venv/bin/python"),
        minor: 11,
    };
    assert!(py.path.exists(), "no test venv: run `cargo xtask setup`");
    let r = diagnose_all(&py, &[("temporal/blocked_loop.py", &["--uvloop"])], "16s");
    check_blocked_loop(&py.label, &r["temporal/blocked_loop.py"].1);
}

/// An incident responder points pymedic at a process that is already hung:
/// the hang is reported at the second check, not `threshold` after pymedic
/// attached (a thread unmoved between two checks is still since it last ran,
/// from the scheduler). The run (5 s) is shorter than the threshold (6 s),
/// so only the backdated clock can report it.
#[test]
fn hang_of_a_process_already_hung_is_reported_at_once() {
    if !require_root("hang_of_a_process_already_hung_is_reported_at_once") {
        return;
    }
    let py = pythons().into_iter().next().expect("a Python interpreter");
    let s = "temporal/hang.py";
    let p = PyProc::start(&py, s, &[]);
    // Hung for longer than the threshold before pymedic looks.
    std::thread::sleep(Duration::from_secs(7));
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), "[detectors.hang]\nthreshold = \"6s\"\n").unwrap();
    let v = diagnose(p.pid(), "5s", config.path());
    let f = of_kind(&v, "hang");
    let main = f
        .iter()
        .find(|f| f["location"]["line"] == marker(s, "HANG main"))
        .unwrap_or_else(|| panic!("{}: no hang within 5 s of attaching: {v}", py.label));
    assert!(
        main["evidence"]["no_progress_seconds"].as_f64().unwrap() >= 6.0,
        "{}: {main}",
        py.label
    );
}
