//! `pymedic analyze`: the real binary on a small package (findings, table,
//! graph, impact, errors), and the enrichment API explaining a runtime
//! finding of a live Python process through `/proc/PID/root`.

use std::path::PathBuf;

use pymedic_integration::{PyProc, json_stdout, pymedic, pythons, repo_root, script};
use pymedic_model::{Finding, Kind, Layer, Location, Severity};

fn shop() -> PathBuf {
    repo_root().join("tests/fixtures/analyze/shop")
}

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn analyze_reports_every_kind_with_sites() {
    let out = pymedic(&["analyze", s(&shop()), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_stdout(&out);
    assert_eq!(v["files"], 7);
    let findings: Vec<Finding> = serde_json::from_value(v["findings"].clone()).unwrap();
    let find = |kind: &str| {
        findings
            .iter()
            .find(|f| f.kind.as_str() == kind)
            .unwrap_or_else(|| panic!("no {kind} in {findings:#?}"))
    };
    let inv = find("lock_order_inversion");
    assert_eq!(inv.layer, Layer::Structural);
    assert!(inv.target.is_none());
    let sites: Vec<(String, u32)> = inv
        .related
        .iter()
        .map(|r| (r.file.clone(), r.line))
        .collect();
    for site in [
        ("shop/inventory.py", 12),
        ("shop/audit.py", 8),
        ("shop/audit.py", 13),
        ("shop/inventory.py", 17),
    ] {
        assert!(
            sites.contains(&(site.0.into(), site.1)),
            "{site:?} missing from {sites:?}"
        );
    }
    let leak = find("fd_leak");
    assert_eq!(
        (leak.location.file.as_str(), leak.location.line),
        ("shop/orders.py", 21)
    );
    assert!(
        leak.related
            .iter()
            .any(|r| r.line == 24 && r.role.contains("(return) skips f.close()"))
    );
    let blocked = find("blocked_event_loop");
    assert_eq!(blocked.location.function, "OrderBook.place");
    assert_eq!(blocked.evidence["blocking"], "requests.get");
    let cycle = find("import_cycle");
    assert!(cycle.title.contains("shop.models") && cycle.title.contains("shop.orders"));
    let syntax = find("syntax_error");
    assert_eq!(syntax.layer, Layer::Surface);
    assert_eq!(syntax.location.file, "shop/broken.py");
    let mem = find("memory_leak");
    assert_eq!(mem.evidence["container"], "shop.audit._events");

    // Filters and the table.
    let out = pymedic(&[
        "analyze",
        s(&shop()),
        "--kind",
        "fd_leak",
        "--min-severity",
        "high",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("fd_leak") && !text.contains("import_cycle"),
        "{text}"
    );
    assert!(
        text.contains("shop/orders.py:24 exit path at line 24 (return) skips f.close()"),
        "{text}"
    );
    let out = pymedic(&["analyze", s(&shop()), "--fail-on", "high"]);
    assert_eq!(out.status.code(), Some(3));
}

/// The benchmark's floor (`--parse-only`, hidden) reads and parses the
/// same files as the analysis, and counts the same lines.
#[test]
fn parse_only_covers_the_files_the_analysis_reads() {
    let full = json_stdout(&pymedic(&["analyze", s(&shop()), "--json"]));
    let out = pymedic(&["analyze", s(&shop()), "--parse-only"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let floor = json_stdout(&out);
    assert_eq!(floor["files"], full["files"]);
    assert_eq!(floor["lines"], full["lines"]);
    assert!(floor["bytes"].as_u64().unwrap() > 0);
    assert!(floor["seconds"].as_f64().unwrap() > 0.0);
}

#[test]
fn analyze_graph_and_impact() {
    let out = pymedic(&["analyze", s(&shop()), "--graph", "dot"]);
    let dot = String::from_utf8_lossy(&out.stdout);
    assert!(dot.starts_with("digraph imports"), "{dot}");
    assert!(dot.contains("\"shop.orders\" -> \"shop.models\""), "{dot}");
    assert!(dot.contains("\"main\" -> \"shop\""), "{dot}");
    let out = pymedic(&["analyze", s(&shop()), "--graph", "json"]);
    let g = json_stdout(&out);
    assert_eq!(g["external"]["requests"][0], "shop.orders");
    assert!(
        g["edges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["from"] == "shop.inventory" && e["to"] == "shop.audit")
    );

    let out = pymedic(&["analyze", s(&shop()), "--impact", "shop.audit", "--json"]);
    let imp = json_stdout(&out);
    let names = |k: &str| -> Vec<String> {
        imp[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["module"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names("direct"), ["shop.inventory"]);
    assert_eq!(
        names("transitive"),
        ["shop", "shop.orders", "main", "shop.models"]
    );
    // A file path works too, and the text form names the chain.
    let file = shop().join("shop/audit.py");
    let out = pymedic(&["analyze", s(&shop()), "--impact", s(&file)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("main via shop → shop.inventory → shop.audit"),
        "{text}"
    );
}

#[test]
fn analyze_bad_input_exits_2_with_a_reason() {
    let out = pymedic(&["analyze", "/nonexistent/tree"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tree"));
    let out = pymedic(&["analyze", s(&shop()), "--impact", "no.such.module"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no.such.module"));
    let empty = std::env::temp_dir().join(format!("pymedic-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let out = pymedic(&["analyze", s(&empty)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no Python files"));
    std::fs::remove_dir_all(empty).unwrap();
}

/// A runtime fd_leak of a live process, explained from its source as the
/// agent would: reading the target's files through /proc/PID/root.
#[test]
fn enrich_explains_a_runtime_fd_leak_of_a_live_process() {
    let py = &pythons()[0];
    let proc = PyProc::start(py, "leaky_service.py", &[]);
    let fds = std::fs::read_dir(format!("/proc/{}/fd", proc.pid()))
        .unwrap()
        .count();
    assert!(fds > 50, "the scenario leaks ({fds} fds)");
    let file = script("leaky_service.py");
    let runtime = Finding::new(
        Layer::Resource,
        Kind::FD_LEAK,
        Severity::High,
        0.9,
        "open files grow",
        None,
        Location::new(file.to_string_lossy(), "load", 11),
    );
    let root = PathBuf::from(format!("/proc/{}/root", proc.pid()));
    let related = pymedic_analyze::enrich(&runtime, &root).unwrap();
    assert!(
        related.iter().any(|r| r.role.starts_with("static: ")
            && r.line == 14
            && r.role.contains("(raise) skips f.close()")),
        "{related:#?}"
    );
    // Files are named as the target sees them.
    assert!(
        related.iter().all(|r| r.file == file.to_string_lossy()),
        "{related:#?}"
    );
    // A finding elsewhere gets nothing.
    let mut other = runtime.clone();
    other.location = Location::new("/nonexistent/x.py", "f", 1);
    assert!(pymedic_analyze::enrich(&other, &root).unwrap().is_empty());
}

/// A runtime blocked_event_loop is explained only by the static finding of
/// the same coroutine (or the function it calls), never by another
/// coroutine's in the same file.
#[test]
fn enrich_explains_a_blocked_event_loop_by_its_own_coroutine_only() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("loop_app.py");
    std::fs::write(
        &file,
        "import asyncio, hashlib, time\n\
         \n\
         def load_config():\n\
         \x20   time.sleep(0.2)\n\
         \n\
         def digest(pw, salt):\n\
         \x20   return hashlib.pbkdf2_hmac('sha256', pw, salt, 200000)\n\
         \n\
         async def reload_settings():\n\
         \x20   load_config()\n\
         \n\
         async def login(pw, salt):\n\
         \x20   return digest(pw, salt)\n",
    )
    .unwrap();
    let name = file.to_string_lossy().into_owned();
    let runtime = |function: &str, line: u32| {
        Finding::new(
            Layer::Temporal,
            Kind::BLOCKED_EVENT_LOOP,
            Severity::Medium,
            0.9,
            "event loop blocked",
            None,
            Location::new(&name, function, line),
        )
    };
    let root = PathBuf::from("/");
    let related = pymedic_analyze::enrich(&runtime("reload_settings", 10), &root).unwrap();
    assert!(
        related
            .iter()
            .any(|r| r.role.starts_with("static: ") && r.role.contains("time.sleep")),
        "{related:#?}"
    );
    // login blocks in the key derivation; reload_settings' sleep does not
    // explain it.
    let related = pymedic_analyze::enrich(&runtime("login", 13), &root).unwrap();
    assert!(
        related.iter().any(|r| r.role.contains("pbkdf2_hmac")),
        "{related:#?}"
    );
    assert!(
        related.iter().all(|r| !r.role.contains("time.sleep")),
        "{related:#?}"
    );
}
