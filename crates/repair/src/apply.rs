//! Applying and rolling back plans, journaled so that a crash at any point
//! is undone by the next `pymedic repair` command.
//!
//! Apply: recover → preflight → copy every file's current bytes to
//! `backups/<plan>/apply/` → write the journal → replace each file
//! atomically → verify (re-parse, re-analyse, the user's command) → commit
//! → remove the journal. Any failure after the first write restores the
//! backups. Rollback is the same dance in reverse, from those backups.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::plan::{self, Plan};
use crate::store::{self, Event, Store};
use crate::{RepairError, git, text};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct JournalFile {
    path: String,
    /// Copy of the bytes before this operation.
    pre_copy: String,
    pre_sha256: String,
    post_sha256: String,
    mode: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Journal {
    op: String,
    plan: String,
    finding: String,
    kind: String,
    /// writing | verifying | committing
    state: String,
    pid: u32,
    files: Vec<JournalFile>,
}

/// What `apply` is asked to do beyond the plan.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// A shell command run in the repository after the edit (its tests).
    pub verify: Option<String>,
    pub verify_timeout: Duration,
    /// Why (recorded in the history); defaults to the finding's title.
    pub reason: Option<String>,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            verify: None,
            verify_timeout: Duration::from_secs(1800),
            reason: None,
        }
    }
}

/// Outcome of a successful apply or rollback.
#[derive(Clone, Debug, Serialize)]
pub struct Done {
    pub plan: String,
    pub files: Vec<String>,
    /// The commit made, when the repository is a git work tree.
    pub commit: Option<String>,
    pub checks: Vec<String>,
}

/// What a recovery did.
#[derive(Clone, Debug, Serialize)]
pub struct Recovery {
    pub op: String,
    pub plan: String,
    pub state: String,
    pub restored: Vec<String>,
    pub completed: bool,
}

/// The plan's state from the history: planned, applied, apply_failed, rolled_back.
pub fn state(store: &Store, plan: &str) -> Result<String, RepairError> {
    Ok(store
        .history()?
        .iter()
        .rev()
        .find(|e| e.plan == plan && e.event != "recovered")
        .map(|e| e.event.clone())
        .unwrap_or_else(|| "planned".into()))
}

/// Undoes an operation interrupted by a crash (or completes it when its
/// commit had already been made).
pub fn recover(store: &Store) -> Result<Option<Recovery>, RepairError> {
    let jpath = store.journal_path();
    if !jpath.exists() {
        return Ok(None);
    }
    let j: Journal = store::read_json(&jpath, "journal")?;
    let marker = match j.op.as_str() {
        "apply" => format!("Pymedic-Plan: {}", j.plan),
        _ => format!("Pymedic-Rollback: {}", j.plan),
    };
    let committed = j.state == "committing"
        && git::head_message(&store.repo).is_some_and(|m| m.contains(&marker));
    let mut restored = Vec::new();
    if !committed {
        for f in &j.files {
            let path = store.file(&f.path);
            let _ = std::fs::remove_file(tmp_of(&path));
            let current = std::fs::read(&path).ok().map(|b| store::sha256(&b));
            if current.as_deref() != Some(f.pre_sha256.as_str()) {
                let bytes = store::read(Path::new(&f.pre_copy))?;
                store::atomic_write(&path, &bytes, Some(f.mode))?;
                restored.push(f.path.clone());
            }
        }
        if git::is_repo(&store.repo) {
            git::unstage(
                &store.repo,
                &j.files.iter().map(|f| f.path.clone()).collect::<Vec<_>>(),
            );
        }
    }
    let (event, why) = if committed {
        (
            if j.op == "apply" {
                "applied"
            } else {
                "rolled_back"
            },
            format!(
                "{} of plan {} was interrupted after its commit; completed",
                j.op, j.plan
            ),
        )
    } else {
        (
            "recovered",
            format!(
                "{} of plan {} was interrupted ({}; pid {}); restored {} file(s) byte for byte",
                j.op,
                j.plan,
                j.state,
                j.pid,
                restored.len()
            ),
        )
    };
    let mut ev = Event::new(event, &j.plan, &j.finding, &j.kind, why);
    ev.files = j.files.iter().map(|f| f.path.clone()).collect();
    if committed {
        ev.commit = git::head(&store.repo);
    }
    store.record(&ev)?;
    std::fs::remove_file(&jpath).map_err(RepairError::io("remove", &jpath))?;
    store::sync_dir(&store.dir)?;
    Ok(Some(Recovery {
        op: j.op,
        plan: j.plan,
        state: j.state,
        restored,
        completed: committed,
    }))
}

fn tmp_of(path: &Path) -> std::path::PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.pymedic-tmp"))
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .map(|m| m.permissions().mode())
        .unwrap_or(0o644)
}

/// Copies every file's current bytes under `backups/<plan>/<op>/` and writes
/// the journal; returns it.
fn begin(
    store: &Store,
    plan: &Plan,
    op: &str,
    post: &[(String, String)],
) -> Result<Journal, RepairError> {
    let dir = store.backup_dir(&plan.id, op);
    let mut files = Vec::new();
    for (path, post_sha) in post {
        let src = store.file(path);
        let bytes = store::read(&src)?;
        let copy = dir.join(path);
        if let Some(parent) = copy.parent() {
            std::fs::create_dir_all(parent).map_err(RepairError::io("create directory", parent))?;
        }
        store::atomic_write(&copy, &bytes, Some(0o600))?;
        files.push(JournalFile {
            path: path.clone(),
            pre_copy: copy.to_string_lossy().into_owned(),
            pre_sha256: store::sha256(&bytes),
            post_sha256: post_sha.clone(),
            mode: mode_of(&src),
        });
    }
    store::pause_point("after-backup");
    let j = Journal {
        op: op.into(),
        plan: plan.id.clone(),
        finding: plan.finding.id.0.clone(),
        kind: plan.finding.kind.to_string(),
        state: "writing".into(),
        pid: std::process::id(),
        files,
    };
    store::write_json(&store.journal_path(), &j)?;
    Ok(j)
}

fn set_state(store: &Store, j: &mut Journal, state: &str) -> Result<(), RepairError> {
    j.state = state.into();
    store::write_json(&store.journal_path(), j)
}

fn finish(store: &Store) -> Result<(), RepairError> {
    let p = store.journal_path();
    std::fs::remove_file(&p).map_err(RepairError::io("remove", &p))?;
    store::sync_dir(&store.dir)
}

/// Restores every journaled file and drops the journal (a failed apply).
fn undo(store: &Store, j: &Journal) -> Result<(), RepairError> {
    for f in &j.files {
        let bytes = store::read(Path::new(&f.pre_copy))?;
        store::atomic_write(&store.file(&f.path), &bytes, Some(f.mode))?;
    }
    if git::is_repo(&store.repo) {
        git::unstage(
            &store.repo,
            &j.files.iter().map(|f| f.path.clone()).collect::<Vec<_>>(),
        );
    }
    finish(store)
}

fn preflight(store: &Store, plan: &Plan) -> Result<bool, RepairError> {
    let is_git = git::is_repo(&store.repo);
    if is_git && let Some(what) = git::in_progress(&store.repo)? {
        return Err(RepairError::InProgress { what });
    }
    for f in &plan.files {
        let found = store::sha256(&store::read(&store.file(&f.path))?);
        if found != f.before_sha256 {
            return Err(RepairError::Stale {
                id: plan.id.clone(),
                path: f.path.clone(),
                expected: f.before_sha256.clone(),
                found,
            });
        }
        if let Some(message) = text::parse_error(&f.after) {
            return Err(RepairError::WouldNotParse {
                path: f.path.clone(),
                message,
            });
        }
    }
    if is_git {
        let paths: Vec<String> = plan.files.iter().map(|f| f.path.clone()).collect();
        if let Some(path) = git::dirty(&store.repo, &paths)?.into_iter().next() {
            return Err(RepairError::Dirty { path });
        }
    }
    Ok(is_git)
}

/// Applies a stored plan: see the module documentation.
pub fn apply(repo: &Path, plan_id: &str, opts: &ApplyOptions) -> Result<Done, RepairError> {
    let store = Store::open(repo)?;
    recover(&store)?;
    let plan = plan::load(&store, plan_id)?;
    if let Some(why) = &plan.requires_review {
        return Err(RepairError::NeedsReview {
            id: plan.id.clone(),
            why: why.clone(),
        });
    }
    let st = state(&store, &plan.id)?;
    if st == "applied" {
        return Err(RepairError::WrongState {
            id: plan.id.clone(),
            state: st,
            what: "already applied; `pymedic repair rollback` undoes it".into(),
        });
    }
    let is_git = preflight(&store, &plan)?;
    let why = opts
        .reason
        .clone()
        .unwrap_or_else(|| format!("fix {}: {}", plan.finding.kind, plan.finding.title));
    let post: Vec<(String, String)> = plan
        .files
        .iter()
        .map(|f| (f.path.clone(), f.after_sha256.clone()))
        .collect();
    let mut j = begin(&store, &plan, "apply", &post)?;
    for (i, f) in plan.files.iter().enumerate() {
        store::atomic_write(&store.file(&f.path), f.after.as_bytes(), None)?;
        if i == 0 {
            store::pause_point("after-first-write");
        }
    }
    set_state(&store, &mut j, "verifying")?;
    store::pause_point("before-verify");
    let checks = match verify(&store, &plan, opts) {
        Ok(checks) => checks,
        Err(reason) => {
            undo(&store, &j)?;
            let mut ev = Event::new(
                "apply_failed",
                &plan.id,
                &plan.finding.id.0,
                plan.finding.kind.as_str(),
                format!("{why}; verification failed: {reason}"),
            );
            ev.files = post.iter().map(|(p, _)| p.clone()).collect();
            store.record(&ev)?;
            return Err(RepairError::VerifyFailed { reason });
        }
    };
    set_state(&store, &mut j, "committing")?;
    store::pause_point("before-commit");
    let paths: Vec<String> = plan.files.iter().map(|f| f.path.clone()).collect();
    let commit = if is_git {
        let message = format!(
            "pymedic: fix {} in {}\n\n{}\n\nFinding {} ({}) at {}:{}.\nStrategy: {}. {}\n\nPymedic-Plan: {}\nPymedic-Finding: {}\n",
            plan.finding.kind,
            plan.finding.location.file,
            plan.finding.title,
            plan.finding.id,
            plan.finding.kind,
            plan.finding.location.file,
            plan.finding.location.line,
            plan.strategy,
            plan.rationale,
            plan.id,
            plan.finding.id
        );
        match git::commit(&store.repo, &paths, &message) {
            Ok(c) => Some(c),
            Err(e) => {
                undo(&store, &j)?;
                let ev = Event::new(
                    "apply_failed",
                    &plan.id,
                    &plan.finding.id.0,
                    plan.finding.kind.as_str(),
                    format!("{why}; commit failed: {e}"),
                );
                store.record(&ev)?;
                return Err(e);
            }
        }
    } else {
        None
    };
    conclude(&store, plan, "applied", why, commit, paths, checks)
}

/// Records the outcome event (with the commit and files), drops the
/// journal and reports what was done: the last step of apply and rollback.
fn conclude(
    store: &Store,
    plan: Plan,
    event: &str,
    why: String,
    commit: Option<String>,
    files: Vec<String>,
    checks: Vec<String>,
) -> Result<Done, RepairError> {
    let mut ev = Event::new(
        event,
        &plan.id,
        &plan.finding.id.0,
        plan.finding.kind.as_str(),
        why,
    );
    ev.commit = commit.clone();
    ev.files = files.clone();
    store.record(&ev)?;
    finish(store)?;
    Ok(Done {
        plan: plan.id,
        files,
        commit,
        checks,
    })
}

/// Re-parse, re-analyse, then the user's command. Err(reason) on failure.
fn verify(store: &Store, plan: &Plan, opts: &ApplyOptions) -> Result<Vec<String>, String> {
    let mut checks = Vec::new();
    for f in &plan.files {
        let text = std::fs::read_to_string(store.file(&f.path))
            .map_err(|e| format!("re-read {}: {e}", f.path))?;
        if let Some(e) = text::parse_error(&text) {
            return Err(format!("{} does not parse after the edit: {e}", f.path));
        }
    }
    checks.push("edited files parse".to_owned());
    let analysis = pymedic_analyze::analyze(&store.repo, &pymedic_analyze::Options::default())
        .map_err(|e| format!("re-analysis failed: {e}"))?;
    let fp = pymedic_analyze::fingerprint(&plan.finding).unwrap_or_default();
    let now = analysis
        .findings
        .iter()
        .filter(|f| pymedic_analyze::fingerprint(f) == Some(fp))
        .count();
    if now >= plan.fingerprint_count.max(1) {
        return Err(format!(
            "the analysis still reports the finding ({now} finding(s) with fingerprint `{fp}`)"
        ));
    }
    checks.push(format!(
        "the analysis no longer reports `{fp}` ({} → {now})",
        plan.fingerprint_count
    ));
    if let Some(cmd) = &opts.verify {
        let out = run_with_timeout(&store.repo, cmd, opts.verify_timeout)?;
        checks.push(format!("`{cmd}` passed{out}"));
    }
    Ok(checks)
}

fn run_with_timeout(repo: &Path, cmd: &str, timeout: Duration) -> Result<String, String> {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(cmd)
        .current_dir(repo)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the hook only makes one prctl system call (async-signal-safe)
    // in the forked child before exec; it allocates nothing.
    unsafe {
        command.pre_exec(|| {
            // The user's command gets the system's huge-page policy back
            // (pymedic turns it off for itself, and children inherit that).
            libc::prctl(libc::PR_SET_THP_DISABLE, 0, 0, 0, 0);
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|e| format!("start `{cmd}`: {e}"))?;
    let started = Instant::now();
    // Drain output on threads so a chatty command cannot fill the pipe and hang.
    let mut so = child.stdout.take();
    let mut se = child.stderr.take();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = so.as_mut() {
            let _ = std::io::Read::read_to_string(o, &mut s);
        }
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = se.as_mut() {
            let _ = std::io::Read::read_to_string(o, &mut s);
        }
        s
    });
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`{cmd}` did not finish within {}s",
                    timeout.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("wait for `{cmd}`: {e}")),
        }
    };
    let out = t_out.join().unwrap_or_default();
    let err = t_err.join().unwrap_or_default();
    if status.success() {
        Ok(format!(" in {:.1}s", started.elapsed().as_secs_f64()))
    } else {
        let tail: String = format!("{out}{err}")
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        Err(format!("`{cmd}` failed ({status}):\n{tail}"))
    }
}

/// Restores the files a plan changed, byte for byte, and commits that.
pub fn rollback(
    repo: &Path,
    plan_id: &str,
    reason: Option<String>,
    force: bool,
) -> Result<Done, RepairError> {
    let store = Store::open(repo)?;
    recover(&store)?;
    let plan = plan::load(&store, plan_id)?;
    let st = state(&store, &plan.id)?;
    if st != "applied" {
        return Err(RepairError::WrongState {
            id: plan.id.clone(),
            state: st,
            what: "only an applied plan can be rolled back".into(),
        });
    }
    let originals = store.backup_dir(&plan.id, "apply");
    for f in &plan.files {
        let found = store::sha256(&store::read(&store.file(&f.path))?);
        if found != f.after_sha256 && !force {
            return Err(RepairError::Stale {
                id: plan.id.clone(),
                path: f.path.clone(),
                expected: f.after_sha256.clone(),
                found,
            });
        }
        if !originals.join(&f.path).exists() {
            return Err(RepairError::Corrupt {
                what: "backup",
                path: originals.join(&f.path),
                message: "missing".into(),
            });
        }
    }
    let is_git = git::is_repo(&store.repo);
    let post: Vec<(String, String)> = plan
        .files
        .iter()
        .map(|f| (f.path.clone(), f.before_sha256.clone()))
        .collect();
    let mut j = begin(&store, &plan, "rollback", &post)?;
    for f in &plan.files {
        let bytes = store::read(&originals.join(&f.path))?;
        let mode = j.files.iter().find(|x| x.path == f.path).map(|x| x.mode);
        store::atomic_write(&store.file(&f.path), &bytes, mode)?;
        if store::sha256(&bytes) != f.before_sha256 {
            undo(&store, &j)?;
            return Err(RepairError::Corrupt {
                what: "backup",
                path: originals.join(&f.path),
                message: "its sha256 differs from the plan's".into(),
            });
        }
    }
    set_state(&store, &mut j, "committing")?;
    let paths: Vec<String> = plan.files.iter().map(|f| f.path.clone()).collect();
    let why = reason.unwrap_or_else(|| "rollback requested".into());
    let commit = if is_git {
        let message = format!(
            "pymedic: roll back plan {}\n\n{why}\n\nPymedic-Rollback: {}\nPymedic-Finding: {}\n",
            plan.id, plan.id, plan.finding.id
        );
        match git::commit(&store.repo, &paths, &message) {
            Ok(c) => Some(c),
            Err(e) => {
                undo(&store, &j)?;
                return Err(e);
            }
        }
    } else {
        None
    };
    let checks = vec!["every file restored byte for byte (sha256 matches the original)".into()];
    conclude(&store, plan, "rolled_back", why, commit, paths, checks)
}
