//! Durability: SIGKILL the agent while it writes findings at a high rate
//! (a storm of short-lived deadlocked processes), restart it on the same
//! data directory: every finding a client had received is still there, and
//! a `findings watch` client that kept running resumes from its cursor with
//! no gap and no duplicate.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pymedic_integration::agent::{AgentProc, free_port};
use pymedic_integration::{PyProc, json_stdout, pymedic_bin, pythons, require_root};

const ENV: &[(&str, &str)] = &[
    ("PYMEDIC_DETECTORS_DEADLOCK_INTERVAL", "100ms"),
    // A verdict once two threads have waited 200 ms (default 1 s), well
    // within each storm child's 2 s life.
    ("PYMEDIC_DETECTORS_DEADLOCK_TRIGGER", "200ms"),
    ("PYMEDIC_DETECT_CPU_BUDGET", "0.5"),
];

fn collect(
    rx: &mpsc::Receiver<serde_json::Value>,
    into: &mut Vec<serde_json::Value>,
    at_least: usize,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    while into.len() < at_least {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(v) => into.push(v),
            Err(_) => panic!("only {} events within {within:?}", into.len()),
        }
    }
}

#[test]
fn agent_sigkill_keeps_received_findings_and_watch_resumes_without_gap() {
    if !require_root("agent_sigkill_keeps_received_findings_and_watch_resumes_without_gap") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let mut agent = AgentProc::start_env(&data, port, &[], ENV);
    let python = &pythons()[0];
    let storm = PyProc::start(python, "deadlock_storm.py", &["12", "2.0"]);

    let mut watcher = Command::new(pymedic_bin())
        .args([
            "findings",
            "watch",
            "--after",
            "0",
            "--json",
            "--agent",
            &agent.grpc.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = watcher.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let v: serde_json::Value = serde_json::from_str(&line).expect("watch --json line");
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    let stderr = watcher.stderr.take().unwrap();
    let (etx, erx) = mpsc::channel();
    std::thread::spawn(move || {
        let text: Vec<String> = BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect();
        let _ = etx.send(text.join("\n"));
    });

    let mut events = Vec::new();
    collect(&rx, &mut events, 40, Duration::from_secs(60));
    let started = Instant::now();
    // Mid-stream: the storm keeps the writer busy.
    agent.kill9();
    // Whatever was in flight when it died.
    while let Ok(v) = rx.recv_timeout(Duration::from_millis(300)) {
        events.push(v);
    }
    let before_kill = events.len();
    let received_ids: Vec<String> = events
        .iter()
        .map(|e| e["finding"]["id"].as_str().unwrap().to_owned())
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let agent = AgentProc::start_env(&data, port, &[], ENV);
    collect(&rx, &mut events, before_kill + 30, Duration::from_secs(60));
    let rate = before_kill as f64 / started.elapsed().as_secs_f64().max(1.0);
    drop(storm);
    let _ = watcher.kill();
    let _ = watcher.wait();
    let watch_log = erx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();

    // a. One contiguous sequence from 1, across the kill.
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs[0], 1);
    for w in seqs.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "gap or duplicate around {w:?} (kill after {before_kill} events): {seqs:?}"
        );
    }
    assert!(
        watch_log.contains("reconnecting"),
        "the watcher never had to reconnect: {watch_log}"
    );

    // b. Every finding the client received before the kill survived it.
    let out = agent.client(&["findings", "list", "--json", "--limit", "100000"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored: std::collections::HashSet<String> = json_stdout(&out)
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_owned())
        .collect();
    for id in &received_ids {
        assert!(
            stored.contains(id),
            "finding {id} was received before the kill but is gone"
        );
    }

    // c. A fresh watch from 0 replays exactly what the first client saw.
    let out = Command::new(pymedic_bin())
        .args([
            "findings",
            "watch",
            "--after",
            "0",
            "--json",
            "--count",
            &events.len().to_string(),
        ])
        .args(["--agent", &agent.grpc.to_string()])
        .output()
        .unwrap();
    let replay: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(replay.len(), events.len());
    for (a, b) in events.iter().zip(&replay) {
        assert_eq!(
            (&a["sequence"], &a["type"], &a["finding"]["id"]),
            (&b["sequence"], &b["type"], &b["finding"]["id"])
        );
    }
    eprintln!(
        "durability: {before_kill} events before SIGKILL ({rate:.1}/s), {} after restart, no gap",
        events.len() - before_kill
    );
}
