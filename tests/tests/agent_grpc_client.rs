//! A running agent finds a deadlock in Python processes it was not told
//! about (eBPF discovery), and a real Python gRPC client (grpcio, code
//! generated from proto/ in the test) lists it, watches it arrive, fetches
//! it and triggers a `dump` capture; the CLI clients see the same.

use std::process::Command;
use std::time::{Duration, Instant};

use pymedic_integration::agent::AgentProc;
use pymedic_integration::{PyProc, json_stdout, pythons, repo_root, require_root};

#[test]
fn agent_python_grpc_client_sees_a_deadlock_it_was_not_told_about() {
    if !require_root("agent_python_grpc_client_sees_a_deadlock_it_was_not_told_about") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "py-client-token\n").unwrap();
    let mut agent = AgentProc::start(
        &dir.path().join("data"),
        &["--token-file", token_file.to_str().unwrap()],
    );
    agent.client_flags = vec!["--token".into(), "py-client-token".into()];
    // Started after the agent, never named to it.
    let procs: Vec<PyProc> = pythons()
        .iter()
        .map(|py| PyProc::start(py, "deadlock/globals_two_locks.py", &[]))
        .collect();
    let mut args = vec![
        repo_root()
            .join("tests/scripts/grpc_client.py")
            .display()
            .to_string(),
        "--addr".into(),
        agent.grpc.to_string(),
        "--token".into(),
        "py-client-token".into(),
        "scenario".into(),
        "--timeout".into(),
        "60".into(),
    ];
    for p in &procs {
        args.extend(["--pid".into(), p.pid().to_string()]);
    }
    let out = Command::new("python3")
        .args(&args)
        .output()
        .expect("run python3 grpc_client.py");
    assert!(
        out.status.success(),
        "python client failed:\n{}\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        agent.log_text()
    );
    let summary = json_stdout(&out);
    assert_eq!(summary["ok"], true);
    let targets = summary["targets"].as_array().unwrap();
    assert_eq!(targets.len(), procs.len());
    for t in targets {
        let f = &t["finding"];
        let label = format!("pid {}", t["pid"]);
        assert_eq!(f["kind"], "deadlock", "{label}");
        assert_eq!(f["severity"], "SEVERITY_CRITICAL", "{label}");
        assert_eq!(f["status"], "STATUS_ACTIVE", "{label}");
        assert!(
            f["location"]["file"]
                .as_str()
                .unwrap()
                .ends_with("globals_two_locks.py"),
            "{label}: {f}"
        );
        let line = f["location"]["line"].as_u64().unwrap();
        assert!(
            line == 13 || line == 20,
            "{label}: waits at line 13 or 20, got {line}"
        );
        let roles: Vec<&str> = f["related"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["role"].as_str().unwrap())
            .collect();
        assert!(
            roles.iter().any(|r| r.contains("holds lock_a")),
            "{label}: {roles:?}"
        );
        assert!(
            roles.iter().any(|r| r.contains("holds lock_b")),
            "{label}: {roles:?}"
        );
        assert_eq!(f["target"]["pid"], t["pid"]);
        assert!(
            t["capture"]["deadlocks"].as_u64().unwrap() >= 1,
            "{label}: {}",
            t["capture"]
        );
        assert_eq!(t["capture"]["media_type"], "application/json");
    }
    assert!(
        summary["status"]["capture_kinds"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k == "dump")
    );

    // The CLI clients agree.
    let out = agent.client(&["findings", "list", "--kind", "deadlock", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = json_stdout(&out);
    for p in &procs {
        assert!(
            listed
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["target"]["pid"] == p.pid()),
            "findings list lacks pid {}",
            p.pid()
        );
    }
    let id = targets[0]["finding"]["id"].as_str().unwrap();
    let out = agent.client(&["findings", "show", id]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("deadlocked"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = agent.client(&["targets", "--json"]);
    let listed = json_stdout(&out);
    for p in &procs {
        assert!(
            listed
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["pid"] == p.pid() && t["active_findings"] == 1)
        );
    }
    let dump_file = dir.path().join("dump.json");
    let out = agent.client(&[
        "capture",
        "--pid",
        &procs[0].pid().to_string(),
        "--kind",
        "dump",
        "-o",
        dump_file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&dump_file).unwrap()).unwrap();
    assert!(!dump["deadlocks"].as_array().unwrap().is_empty());
    let (_, metrics) = pymedic_integration::agent::http_get(agent.metrics, "/metrics").unwrap();
    assert!(
        metrics.contains("pymedic_findings{kind=\"deadlock\",severity=\"critical\"}"),
        "{metrics}"
    );

    // The process exits: its finding resolves.
    let gone = procs[0].pid();
    drop(procs);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = agent.client(&[
            "findings",
            "list",
            "--pid",
            &gone.to_string(),
            "--status",
            "resolved",
            "--json",
        ]);
        if json_stdout(&out).as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the finding of exited pid {gone} did not resolve"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
