//! `pymedic ps`: every interpreter on this machine is listed with the right
//! version, build and thread count.

use pymedic_integration::{PyProc, json_stdout, pymedic, pythons, require_root};

#[test]
fn ps_lists_every_interpreter_with_version_and_build() {
    if !require_root("ps_lists_every_interpreter_with_version_and_build") {
        return;
    }
    let procs: Vec<PyProc> = pythons()
        .iter()
        .map(|py| PyProc::start(py, "idle.py", &[]))
        .collect();
    let out = pymedic(&["ps", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = json_stdout(&out);
    let rows = rows.as_array().expect("array");
    for p in &procs {
        let row = rows
            .iter()
            .find(|r| r["pid"] == p.pid())
            .unwrap_or_else(|| panic!("{} (pid {}) not listed", p.python.label, p.pid()));
        let version = row["python"].as_str().unwrap();
        assert!(
            version.starts_with(&format!("3.{}.", p.python.minor)),
            "{}: version {version}",
            p.python.label
        );
        let expected_build = if p.python.label.ends_with("-debian") {
            "static"
        } else {
            "shared"
        };
        assert_eq!(row["build"], expected_build, "{}", p.python.label);
        assert!(
            row["threads"].as_u64().unwrap() >= 4,
            "{}: {row}",
            p.python.label
        );
        assert!(row["rss_bytes"].as_u64().unwrap() > 1 << 20);
        assert!(row["exe"].as_str().unwrap().contains("python3"));
    }
    // The table form names them too.
    let out = pymedic(&["ps"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for p in &procs {
        assert!(text.contains(&p.pid().to_string()), "{text}");
    }
}

#[test]
fn exact_versions_match_the_interpreter() {
    if !require_root("exact_versions_match_the_interpreter") {
        return;
    }
    for py in pythons() {
        let truth = std::process::Command::new(&py.path)
            .args(["-c", "import platform; print(platform.python_version())"])
            .output()
            .unwrap();
        let truth = String::from_utf8_lossy(&truth.stdout).trim().to_owned();
        let p = PyProc::start(&py, "idle.py", &[]);
        let out = pymedic(&["ps", "--json"]);
        let rows = json_stdout(&out);
        let row = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["pid"] == p.pid())
            .unwrap_or_else(|| panic!("{} not listed", py.label))
            .clone();
        assert_eq!(row["python"], truth.as_str(), "{}", py.label);
    }
}
