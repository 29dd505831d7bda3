//! The agent's CPU side: the `cpu_hotspot` detector names the hot line of a
//! busy process it discovered by itself, and `pymedic capture --kind cpu`
//! downloads a profile of it in the requested format.

use std::time::{Duration, Instant};

use pymedic_integration::agent::{AgentProc, free_port};
use pymedic_integration::{PyProc, json_stdout, pythons, require_root};

#[test]
fn agent_finds_a_cpu_hotspot_and_captures_cpu_profiles() {
    if !require_root("agent_finds_a_cpu_hotspot_and_captures_cpu_profiles") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProc::start_env(
        &dir.path().join("data"),
        free_port(),
        &[],
        &[("PYMEDIC_DETECTORS_CPU_HOTSPOT_WINDOW", "3s")],
    );
    let py = pythons()
        .into_iter()
        .rev()
        .find(|p| p.minor >= 11)
        .unwrap_or_else(|| pythons()[0].clone());
    let busy = PyProc::start(&py, "profile/cpu_split.py", &["2"]);
    let pid = busy.pid().to_string();
    let deadline = Instant::now() + Duration::from_secs(40);
    let finding = loop {
        let out = agent.client(&[
            "findings",
            "list",
            "--kind",
            "cpu_hotspot",
            "--pid",
            &pid,
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(f) = json_stdout(&out)
            .as_array()
            .and_then(|a| a.first().cloned())
        {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "no cpu_hotspot finding for {pid}:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(finding["layer"], "behavioral");
    assert!(
        finding["location"]["file"]
            .as_str()
            .unwrap()
            .ends_with("cpu_split.py"),
        "{finding}"
    );
    assert_eq!(finding["location"]["function"], "spin", "{finding}");
    assert!(
        finding["evidence"]["share"].as_f64().unwrap() >= 0.2,
        "{finding}"
    );
    let callers: Vec<&str> = finding["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["frames"][1]["function"].as_str())
        .collect();
    assert!(
        callers.iter().any(|c| c.starts_with("burn_")),
        "{callers:?}"
    );

    for (format, check) in [("collapsed", "burn_a"), ("pprof", "")] {
        let out_file = dir.path().join(format!("cpu.{format}"));
        let out = agent.client(&[
            "capture",
            "--pid",
            &pid,
            "--kind",
            "cpu",
            "--duration",
            "2s",
            "--format",
            format,
            "-o",
            out_file.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{format}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bytes = std::fs::read(&out_file).unwrap();
        assert!(!bytes.is_empty(), "{format}: empty artifact");
        if format == "pprof" {
            assert_eq!(&bytes[..2], &[0x1f, 0x8b], "pprof is gzip");
        } else {
            assert!(String::from_utf8_lossy(&bytes).contains(check), "{format}");
        }
    }
    let out = agent.client(&[
        "capture",
        "--pid",
        &pid,
        "--kind",
        "cpu",
        "--duration",
        "0s",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("duration"));

    drop(busy);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = agent.client(&[
            "findings",
            "list",
            "--kind",
            "cpu_hotspot",
            "--pid",
            &pid,
            "--status",
            "active",
            "--json",
        ]);
        if json_stdout(&out).as_array().is_some_and(|a| a.is_empty()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hot spot of an exited process stayed active"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
