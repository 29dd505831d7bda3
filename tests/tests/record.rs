//! `pymedic record`: CPU shares within 5 points of the truth and of py-spy,
//! off-CPU time at the right line, deep/async/many-thread stacks, every
//! output format (pprof checked by the real `go tool pprof`), on every
//! interpreter `pythons()` finds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use pymedic_integration::{PyProc, Python, pymedic, pythons, repo_root, require_root};

fn tmp(name: &str) -> PathBuf {
    let dir = repo_root().join("target/test-record");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Parses collapsed stacks: (frames outermost first, value).
fn parse_collapsed(path: &Path) -> Vec<(Vec<String>, u64)> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines()
        .filter_map(|l| {
            let (stack, v) = l.rsplit_once(' ')?;
            Some((
                stack.split(';').map(str::to_string).collect(),
                v.parse().ok()?,
            ))
        })
        .collect()
}

fn function(frame: &str) -> &str {
    frame.split(" (").next().unwrap_or(frame)
}

/// Percent of the total value whose stack contains each of `functions`.
fn shares(stacks: &[(Vec<String>, u64)], functions: &[&str]) -> HashMap<String, f64> {
    let total: u64 = stacks.iter().map(|s| s.1).sum();
    assert!(total > 0, "no samples");
    functions
        .iter()
        .map(|f| {
            let v: u64 = stacks
                .iter()
                .filter(|(frames, _)| frames.iter().any(|fr| function(fr) == *f))
                .map(|s| s.1)
                .sum();
            (f.to_string(), 100.0 * v as f64 / total as f64)
        })
        .collect()
}

fn record(pid: u32, extra: &[&str], out: &Path) {
    let pid = pid.to_string();
    let mut args = vec!["record", "--pid", &pid, "--quiet", "-o"];
    let out_s = out.to_str().unwrap();
    args.push(out_s);
    args.extend_from_slice(extra);
    let o = pymedic(&args);
    assert!(
        o.status.success(),
        "pymedic {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn py_spy() -> PathBuf {
    let venv = repo_root().join("target/venv/bin/py-spy");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("py-spy")
    }
}

const SPLIT: [(&str, f64); 3] = [("burn_a", 60.0), ("burn_b", 30.0), ("burn_c", 10.0)];

fn check_cpu_split(py: &Python) {
    // py-spy is a sampler too (and a non-blocking one reads torn stacks):
    // one disagreement may be its noise, two in a row are not.
    if let Err(first) = cpu_split_once(py) {
        eprintln!("{first}; recording both again");
        if let Err(second) = cpu_split_once(py) {
            panic!("{first}\nagain: {second}");
        }
    }
}

/// Records the split with pymedic and py-spy at once; panics when pymedic is
/// off the truth, returns an error when it disagrees with py-spy.
fn cpu_split_once(py: &Python) -> Result<(), String> {
    let target = PyProc::start(py, "profile/cpu_split.py", &["3"]);
    let ours = tmp(&format!("split-{}.txt", py.label));
    let theirs = tmp(&format!("split-{}.pyspy.txt", py.label));
    let pid = target.pid().to_string();
    // py-spy records the same seconds of the same process.
    let mut spy = Command::new(py_spy())
        .args([
            "record",
            "--nonblocking",
            "-r",
            "200",
            "-d",
            "5",
            "-f",
            "raw",
            "-p",
            &pid,
        ])
        .arg("-o")
        .arg(&theirs)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run py-spy (target/venv/bin/py-spy; `cargo xtask setup` installs it)");
    record(
        target.pid(),
        &["--duration", "5s", "--rate", "499", "--format", "collapsed"],
        &ours,
    );
    assert!(
        spy.wait().expect("wait for py-spy").success(),
        "py-spy record failed"
    );
    let funcs: Vec<&str> = SPLIT.iter().map(|s| s.0).collect();
    let ours = shares(&parse_collapsed(&ours), &funcs);
    for (f, truth) in SPLIT {
        assert!(
            (ours[f] - truth).abs() <= 5.0,
            "{}: {f} measured {:.1}% vs truth {truth}% (all: {ours:?})",
            py.label,
            ours[f]
        );
    }
    let theirs = shares(&parse_collapsed(&theirs), &funcs);
    for (f, _) in SPLIT {
        if (ours[f] - theirs[f]).abs() > 5.0 {
            return Err(format!(
                "{}: {f} pymedic {:.1}% vs py-spy {:.1}% (pymedic {ours:?}, py-spy {theirs:?})",
                py.label, ours[f], theirs[f]
            ));
        }
    }
    eprintln!("{}: pymedic {ours:?} py-spy {theirs:?}", py.label);
    Ok(())
}

#[test]
fn record_cpu_shares_match_truth_and_py_spy_on_every_interpreter() {
    if !require_root("record_cpu_shares_match_truth_and_py_spy_on_every_interpreter") {
        return;
    }
    // One interpreter at a time: each target needs a CPU to itself for the
    // shares to be measured on enough samples.
    for py in pythons() {
        check_cpu_split(&py);
    }
}

/// The line of `marker` in a script.
fn line_of(script: &str, marker: &str) -> u32 {
    let text = std::fs::read_to_string(repo_root().join("tests/scripts").join(script)).unwrap();
    text.lines()
        .position(|l| l.contains(marker))
        .expect("marker") as u32
        + 1
}

#[test]
fn record_off_cpu_shows_the_sleeping_line_at_its_share_of_wall_time() {
    if !require_root("record_off_cpu_shows_the_sleeping_line_at_its_share_of_wall_time") {
        return;
    }
    let sleep_line = line_of("profile/sleeper.py", "# SLEEP-LINE");
    let checks: Vec<_> = pythons()
        .into_iter()
        .map(|py| {
            std::thread::spawn(move || {
                let target = PyProc::start(&py, "profile/sleeper.py", &[]);
                let out = tmp(&format!("offcpu-{}.txt", py.label));
                record(
                    target.pid(),
                    &["--duration", "4s", "--off-cpu", "--format", "collapsed"],
                    &out,
                );
                let stacks = parse_collapsed(&out);
                // The main thread, blocked in join() for the whole window,
                // is charged the whole window at its join.
                let main_wall: u64 = stacks
                    .iter()
                    .filter(|(f, _)| f.iter().any(|fr| function(fr).ends_with("join")))
                    .map(|s| s.1)
                    .sum();
                assert!(
                    main_wall > 3_500_000,
                    "{}: blocked main thread charged {main_wall} µs",
                    py.label
                );
                let worker: Vec<_> = stacks
                    .into_iter()
                    .filter(|(f, _)| f.iter().any(|fr| function(fr) == "worker"))
                    .collect();
                let total: u64 = worker.iter().map(|s| s.1).sum();
                let at_line: u64 = worker
                    .iter()
                    .filter(|(f, _)| {
                        f.last().is_some_and(|l| {
                            l.starts_with("nap (") && l.ends_with(&format!(":{sleep_line})"))
                        })
                    })
                    .map(|s| s.1)
                    .sum();
                let share = 100.0 * at_line as f64 / total.max(1) as f64;
                // The thread's wall time is all there (on + off CPU).
                assert!(
                    total > 3_000_000,
                    "{}: worker wall time {total} µs",
                    py.label
                );
                assert!(
                    (share - 70.0).abs() <= 7.0,
                    "{}: sleep line at {share:.1}% of the thread's wall time",
                    py.label
                );
                eprintln!("{}: sleep line {share:.1}%", py.label);
            })
        })
        .collect();
    for c in checks {
        c.join().expect("off-cpu check");
    }
}

#[test]
fn record_handles_200_threads_deep_stacks_coroutines_and_generators() {
    if !require_root("record_handles_200_threads_deep_stacks_coroutines_and_generators") {
        return;
    }
    for py in pythons() {
        let target = PyProc::start(&py, "profile/shapes.py", &["200", "200"]);
        let out = tmp(&format!("shapes-{}.txt", py.label));
        record(
            target.pid(),
            &["--duration", "3s", "--rate", "499", "--format", "collapsed"],
            &out,
        );
        let stacks = parse_collapsed(&out);
        let has = |pred: &dyn Fn(&[String]) -> bool| stacks.iter().any(|(f, _)| pred(f));
        // Deep recursion is truncated with a marker, never dropped.
        assert!(
            has(&|f| f.iter().any(|x| x == "<truncated>")
                && f.iter().any(|x| function(x) == "deep_leaf")),
            "{}: no truncated deep stack",
            py.label
        );
        // Coroutines and generators show as frames, in order.
        assert!(
            has(&|f| {
                let names: Vec<&str> = f.iter().map(|x| function(x)).collect();
                let o = names.iter().position(|n| *n == "outer_coro");
                let i = names.iter().position(|n| *n == "inner_coro");
                matches!((o, i), (Some(o), Some(i)) if o < i)
            }),
            "{}: no outer_coro → inner_coro stack",
            py.label
        );
        assert!(
            has(&|f| f.iter().any(|x| function(x) == "gen_producer")),
            "{}: no generator frame",
            py.label
        );
        // Many threads were sampled with their Python stacks.
        let threads: std::collections::HashSet<&str> = stacks
            .iter()
            .filter(|(f, _)| f.iter().any(|x| function(x) == "idle_worker"))
            .filter_map(|(f, _)| f.get(1).map(String::as_str))
            .collect();
        assert!(
            threads.len() >= 20,
            "{}: only {} idle threads sampled",
            py.label,
            threads.len()
        );
        eprintln!("{}: {} idle threads sampled", py.label, threads.len());
    }
}

#[test]
fn record_writes_pprof_that_go_tool_pprof_reads_and_every_other_format() {
    if !require_root("record_writes_pprof_that_go_tool_pprof_reads_and_every_other_format") {
        return;
    }
    let py = pythons().into_iter().next().unwrap();
    let target = PyProc::start(&py, "profile/cpu_split.py", &["2"]);
    let pprof = tmp("split.pb.gz");
    record(
        target.pid(),
        &["--duration", "2s", "--format", "pprof"],
        &pprof,
    );
    let top = Command::new("go")
        .args(["tool", "pprof", "-top", "-sample_index=samples"])
        .arg(&pprof)
        .output()
        .expect("run `go tool pprof` (Debian golang-go; `cargo xtask setup` installs it)");
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(
        top.status.success(),
        "go tool pprof: {}",
        String::from_utf8_lossy(&top.stderr)
    );
    assert!(text.contains("burn_a"), "pprof -top:\n{text}");
    let svg = tmp("split.svg");
    record(target.pid(), &["--duration", "1s"], &svg);
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("burn_a"),
        "flame graph"
    );
    let json = tmp("split.speedscope.json");
    record(target.pid(), &["--duration", "1s"], &json);
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert!(doc["profiles"].as_array().is_some_and(|p| !p.is_empty()));
    assert!(doc["shared"]["frames"].to_string().contains("burn_a"));
}

#[test]
fn record_with_py_spy_sampler_and_a_target_that_exits() {
    if !require_root("record_with_py_spy_sampler_and_a_target_that_exits") {
        return;
    }
    let py = pythons().into_iter().last().unwrap();
    let target = PyProc::start(&py, "profile/cpu_split.py", &["2"]);
    let out = tmp("pyspy.txt");
    record(
        target.pid(),
        &[
            "--duration",
            "2s",
            "--sampler",
            "py-spy",
            "--format",
            "collapsed",
        ],
        &out,
    );
    let s = shares(&parse_collapsed(&out), &["burn_a"]);
    assert!(s["burn_a"] > 30.0, "py-spy sampler: {s:?}");
    // A target exiting mid-record ends the recording and still writes it.
    let mut short = PyProc::start(&py, "profile/cpu_split.py", &["2"]);
    let pid = short.pid();
    let out = tmp("exits.txt");
    let killer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        short.kill();
    });
    let started = std::time::Instant::now();
    record(pid, &["--duration", "20s", "--format", "collapsed"], &out);
    killer.join().unwrap();
    assert!(
        started.elapsed().as_secs() < 10,
        "record did not stop when its target exited"
    );
    assert!(!parse_collapsed(&out).is_empty());
}

#[test]
fn record_all_python_follows_processes_started_while_recording() {
    if !require_root("record_all_python_follows_processes_started_while_recording") {
        return;
    }
    let pys = pythons();
    let first = PyProc::start(&pys[0], "profile/cpu_split.py", &["2"]);
    let out = tmp("all-python.txt");
    let recorder = Command::new(pymedic_integration::pymedic_bin())
        .args([
            "record",
            "--all-python",
            "--duration",
            "5s",
            "--quiet",
            "--format",
            "collapsed",
            "-o",
        ])
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run pymedic");
    std::thread::sleep(std::time::Duration::from_millis(2000));
    let late = PyProc::start(pys.last().unwrap(), "profile/cpu_split.py", &["2"]);
    let o = recorder.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stacks = parse_collapsed(&out);
    for (p, what) in [
        (&first, "running at start"),
        (&late, "started while recording"),
    ] {
        let root = format!("<process {} ", p.pid());
        assert!(
            stacks
                .iter()
                .any(|(f, _)| f[0].starts_with(&root) && f.iter().any(|x| function(x) == "burn_a")),
            "process {} ({what}) missing from the --all-python profile",
            p.pid()
        );
    }
}
