//! `pymedic repair`: real git repositories made in the test; plans applied,
//! verified, committed, rolled back byte for byte; a crash (SIGKILL) in the
//! middle of an apply undone by the next command; stale and dirty files
//! refused; and repaired programs that run and no longer leak.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use pymedic_integration::{json_stdout, pymedic, pymedic_bin, pythons, repo_root};

/// A git repository holding copies of `tests/fixtures/repair/<files>`.
struct Repo(PathBuf);

impl Repo {
    fn new(files: &[&str]) -> Repo {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pymedic-repair-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for f in files {
            std::fs::copy(
                repo_root().join("tests/fixtures/repair").join(f),
                dir.join(f),
            )
            .unwrap();
        }
        let r = Repo(dir);
        r.git(&["init", "-q"]);
        r.git(&["config", "user.name", "Test User"]);
        r.git(&["config", "user.email", "test@example.invalid"]);
        r.git(&["add", "."]);
        r.git(&["commit", "-qm", "initial"]);
        r
    }

    fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(&self.0)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }

    fn read(&self, f: &str) -> Vec<u8> {
        std::fs::read(self.0.join(f)).unwrap()
    }

    /// Findings of `pymedic analyze`.
    fn findings(&self) -> Vec<serde_json::Value> {
        let out = pymedic(&["analyze", self.path(), "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        json_stdout(&out)["findings"].as_array().unwrap().clone()
    }

    /// The id of the finding of `kind` in `function`.
    fn finding(&self, kind: &str, function: &str) -> Option<String> {
        self.findings()
            .into_iter()
            .find(|f| f["kind"] == kind && f["location"]["function"] == function)
            .map(|f| f["id"].as_str().unwrap().to_owned())
    }

    fn plan(&self, finding: &str) -> serde_json::Value {
        let out = pymedic(&[
            "repair",
            "plan",
            "--repo",
            self.path(),
            "--finding",
            finding,
            "--json",
        ]);
        assert!(
            out.status.success(),
            "plan: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        json_stdout(&out)
    }

    fn history(&self) -> Vec<serde_json::Value> {
        let out = pymedic(&["repair", "history", "--repo", self.path(), "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        json_stdout(&out).as_array().unwrap().clone()
    }
}

impl Drop for Repo {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_py(python: &Path, repo: &Repo, script: &str, arg: &str) -> String {
    let out = Command::new(python)
        .arg(repo.0.join(script))
        .arg(arg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn numbers(line: &str) -> Vec<u64> {
    line.split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

#[test]
fn repaired_program_runs_and_no_longer_leaks() {
    let repo = Repo::new(&["leaky.py", "eventloop.py"]);
    let work = repo.0.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let work = work.to_str().unwrap().to_owned();
    let pys = pythons();
    let before: Vec<Vec<u64>> = pys
        .iter()
        .map(|p| numbers(&run_py(&p.path, &repo, "leaky.py", &work)))
        .collect();
    for (p, n) in pys.iter().zip(&before) {
        assert!(
            n[0] >= 140 && n[1] >= 5,
            "{}: the original leaks: {n:?}",
            p.label
        );
    }
    let lag_before = numbers(&run_py(&pys[0].path, &repo, "eventloop.py", ""))[0];
    assert!(
        lag_before >= 900,
        "the original starves the loop: {lag_before} ms"
    );

    // Plan and apply each repair (ids change as lines move: re-analyse each time).
    for (kind, function, strategy) in [
        ("fd_leak", "write_status", "try_finally"),
        ("fd_leak", "load", "with_statement"),
        ("resource_leak", "update", "with_statement"),
        ("blocked_event_loop", "handler", "asyncio_sleep"),
    ] {
        let id = repo
            .finding(kind, function)
            .unwrap_or_else(|| panic!("no {kind} in {function}"));
        let plan = repo.plan(&id);
        assert_eq!(plan["strategy"], strategy, "{plan:#}");
        assert!(
            plan["diff"].as_str().unwrap().contains("+++ b/"),
            "{plan:#}"
        );
        assert!(plan["rationale"].as_str().unwrap().len() > 20);
        assert!(
            repo.0
                .join(".pymedic/plans")
                .join(format!("{}.json", plan["id"].as_str().unwrap()))
                .exists()
        );
        let verify = format!("{} leaky.py {work}", pys[0].path.display());
        let out = pymedic(&[
            "repair",
            "apply",
            "--repo",
            repo.path(),
            plan["id"].as_str().unwrap(),
            "--verify",
            &verify,
            "--json",
        ]);
        let done: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
        let commit = done["commit"].as_str().unwrap();
        let msg = repo.git(&["log", "-1", "--format=%B", commit]);
        assert!(
            msg.contains(&format!("Pymedic-Plan: {}", plan["id"].as_str().unwrap())),
            "{msg}"
        );
        assert!(msg.contains(&format!("Pymedic-Finding: {id}")), "{msg}");
        assert!(
            repo.finding(kind, function).is_none(),
            "{kind} in {function} still reported"
        );
    }
    assert!(
        repo.git(&["status", "--porcelain", "--untracked-files=no"])
            .trim()
            .is_empty()
    );

    for p in &pys {
        let n = numbers(&run_py(&p.path, &repo, "leaky.py", &work));
        assert!(
            n[0] <= 12,
            "{}: repaired program still holds {} fds: {n:?}",
            p.label,
            n[0]
        );
        assert_eq!(
            n[1], 1,
            "{}: repaired program left threads blocked: {n:?}",
            p.label
        );
        assert_eq!(
            n[2], 150,
            "{}: same behaviour (errors raised): {n:?}",
            p.label
        );
    }
    let lag_after = numbers(&run_py(&pys[0].path, &repo, "eventloop.py", ""))[0];
    // 20 handlers × 50 ms of time.sleep blocked the ticker for ≥ 1 s; with
    // asyncio.sleep it only waits for its own 10 ms (plus scheduling noise).
    assert!(
        lag_after < 400 && lag_after * 2 < lag_before,
        "the loop still starves after the repair: {lag_after} ms (before: {lag_before} ms)"
    );
    let events: Vec<String> = repo
        .history()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        events.iter().filter(|e| *e == "applied").count(),
        4,
        "{events:?}"
    );
}

#[test]
fn rollback_restores_bytes_and_mode_and_history_says_who_and_why() {
    let repo = Repo::new(&["leaky.py"]);
    // Odd bytes pymedic must not normalise: no final newline, trailing spaces, mode 0755.
    let mut original = repo.read("leaky.py");
    original.extend_from_slice(b"# trailing   ");
    std::fs::write(repo.0.join("leaky.py"), &original).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(
        repo.0.join("leaky.py"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    repo.git(&["commit", "-qam", "odd bytes"]);
    let id = repo.finding("fd_leak", "load").unwrap();
    let plan = repo.plan(&id);
    let pid = plan["id"].as_str().unwrap();
    ok(&pymedic(&[
        "repair",
        "apply",
        "--repo",
        repo.path(),
        pid,
        "--reason",
        "INC-42 fd exhaustion",
    ]));
    assert_ne!(repo.read("leaky.py"), original);
    let out = ok(&pymedic(&[
        "repair",
        "rollback",
        "--repo",
        repo.path(),
        pid,
        "--reason",
        "tests fail in staging",
    ]));
    assert!(out.contains("rolled back"), "{out}");
    assert_eq!(repo.read("leaky.py"), original, "byte-identical");
    let mode = std::fs::metadata(repo.0.join("leaky.py"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o755);
    assert!(
        repo.git(&["log", "-1", "--format=%B"])
            .contains(&format!("Pymedic-Rollback: {pid}"))
    );
    let h = repo.history();
    let ev = |name: &str| {
        h.iter()
            .find(|e| e["event"] == name)
            .unwrap_or_else(|| panic!("no {name} in {h:#?}"))
            .clone()
    };
    assert_eq!(ev("applied")["why"], "INC-42 fd exhaustion");
    assert_eq!(ev("rolled_back")["why"], "tests fail in staging");
    assert!(
        ev("planned")["who"]["user"]
            .as_str()
            .is_some_and(|u| !u.is_empty())
    );
    assert!(ev("rolled_back")["commit"].as_str().is_some());
    // Rolling back twice is refused.
    let out = pymedic(&["repair", "rollback", "--repo", repo.path(), pid]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn stale_dirty_and_unverified_plans_are_refused() {
    let repo = Repo::new(&["leaky.py", "locks.py"]);
    let original = repo.read("leaky.py");
    let head = repo.git(&["rev-parse", "HEAD"]);
    // Changed after planning.
    let plan = repo.plan(&repo.finding("fd_leak", "load").unwrap());
    let mut changed = original.clone();
    changed.extend_from_slice(b"\n# edited by a person\n");
    std::fs::write(repo.0.join("leaky.py"), &changed).unwrap();
    let out = pymedic(&[
        "repair",
        "apply",
        "--repo",
        repo.path(),
        plan["id"].as_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("changed since plan"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        repo.read("leaky.py"),
        changed,
        "the person's edit is untouched"
    );
    // Dirty at plan time: the commit would carry someone else's change.
    let plan = repo.plan(&repo.finding("fd_leak", "load").unwrap());
    let out = pymedic(&[
        "repair",
        "apply",
        "--repo",
        repo.path(),
        plan["id"].as_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("uncommitted changes"));
    std::fs::write(repo.0.join("leaky.py"), &original).unwrap();
    // A failing --verify rolls back and exits 4.
    let plan = repo.plan(&repo.finding("fd_leak", "load").unwrap());
    let out = pymedic(&[
        "repair",
        "apply",
        "--repo",
        repo.path(),
        plan["id"].as_str().unwrap(),
        "--verify",
        "echo the suite failed; exit 1",
    ]);
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rolled back") && err.contains("the suite failed"),
        "{err}"
    );
    assert_eq!(repo.read("leaky.py"), original);
    assert_eq!(repo.git(&["rev-parse", "HEAD"]), head);
    assert!(repo.history().iter().any(|e| e["event"] == "apply_failed"));
    // No clear majority of lock order: explained, never applied.
    let plan = repo.plan(
        &repo
            .finding("lock_order_inversion", "two")
            .or_else(|| repo.finding("lock_order_inversion", "one"))
            .unwrap(),
    );
    assert!(
        plan["requires_review"]
            .as_str()
            .unwrap()
            .contains("no 2:1 majority"),
        "{plan:#}"
    );
    let out = pymedic(&[
        "repair",
        "apply",
        "--repo",
        repo.path(),
        plan["id"].as_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a human decision"));
    // Unknown ids name what to do.
    let out = pymedic(&[
        "repair",
        "plan",
        "--repo",
        repo.path(),
        "--finding",
        "0000000000000000",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pymedic analyze"));
}

/// Starts `pymedic repair apply` paused at `step` and SIGKILLs it there.
fn kill_apply_at(repo: &Repo, plan: &str, step: &str) {
    let mut child = Command::new(pymedic_bin())
        .args(["repair", "apply", "--repo", repo.path(), plan])
        .env("PYMEDIC_REPAIR_PAUSE", step)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) if l == format!("PAUSED {step}") => break,
            Ok(_) => continue,
            Err(_) => {
                let _ = child.kill();
                panic!("apply never reached {step}");
            }
        }
    }
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    assert_eq!(rc, 0);
    child.wait().unwrap();
}

#[test]
fn crash_mid_apply_is_undone_by_the_next_command() {
    let repo = Repo::new(&["leaky.py", "eventloop.py"]);
    let original = repo.read("leaky.py");
    let head = repo.git(&["rev-parse", "HEAD"]);
    for step in ["after-first-write", "before-commit"] {
        let plan = repo.plan(&repo.finding("fd_leak", "load").unwrap());
        let pid = plan["id"].as_str().unwrap();
        kill_apply_at(&repo, pid, step);
        // The kill left the file edited and a journal behind.
        assert_ne!(
            repo.read("leaky.py"),
            original,
            "{step}: the edit was written"
        );
        assert!(repo.0.join(".pymedic/journal.json").exists());
        // Any repair command recovers first.
        let out = pymedic(&["repair", "history", "--repo", repo.path(), "--json"]);
        ok(&out);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("recovered an interrupted apply"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            repo.read("leaky.py"),
            original,
            "{step}: restored byte for byte"
        );
        assert!(!repo.0.join(".pymedic/journal.json").exists());
        assert_eq!(repo.git(&["rev-parse", "HEAD"]), head);
        assert!(
            repo.git(&["status", "--porcelain", "--untracked-files=no"])
                .trim()
                .is_empty(),
            "{step}: index clean"
        );
        let h = repo.history();
        let last = h.last().unwrap();
        assert_eq!(last["event"], "recovered", "{h:#?}");
        assert_eq!(last["plan"], pid);
        // The same plan applies cleanly afterwards.
        if step == "before-commit" {
            ok(&pymedic(&["repair", "apply", "--repo", repo.path(), pid]));
            assert_ne!(repo.git(&["rev-parse", "HEAD"]), head);
        }
    }
}

#[test]
fn lock_order_with_a_clear_majority_is_made_consistent() {
    let repo = Repo::new(&["locks.py"]);
    // A third site in the majority order.
    let mut text = String::from_utf8(repo.read("locks.py")).unwrap();
    text.push_str(
        "\n\ndef three():\n    with lock_a:\n        with lock_b:\n            return 3\n",
    );
    std::fs::write(repo.0.join("locks.py"), text).unwrap();
    repo.git(&["commit", "-qam", "third site"]);
    let id = repo
        .findings()
        .into_iter()
        .find(|f| f["kind"] == "lock_order_inversion")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let plan = repo.plan(&id);
    assert_eq!(plan["strategy"], "lock_order");
    assert!(plan["requires_review"].is_null(), "{plan:#}");
    let pid = plan["id"].as_str().unwrap();
    ok(&pymedic(&[
        "repair",
        "apply",
        "--repo",
        repo.path(),
        pid,
        "--verify",
        "python3 -c 'import locks; assert locks.two() == 2'",
    ]));
    let after = String::from_utf8(repo.read("locks.py")).unwrap();
    assert!(
        after.contains("def two():\n    with lock_a:\n        with lock_b:\n            return 2"),
        "{after}"
    );
    assert!(
        repo.findings()
            .iter()
            .all(|f| f["kind"] != "lock_order_inversion")
    );
}
