//! The git CLI, run in the repository: state checks and commits.

use std::path::Path;
use std::process::Command;

use crate::RepairError;

fn git(repo: &Path, args: &[&str]) -> Result<std::process::Output, RepairError> {
    Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .map_err(|e| RepairError::Git {
            args: args.join(" "),
            message: format!("{e} (is git installed and on PATH?)"),
        })
}

fn ok(repo: &Path, args: &[&str]) -> Result<String, RepairError> {
    let out = git(repo, args)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(RepairError::Git {
            args: args.join(" "),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Whether `repo` is inside a git work tree.
pub fn is_repo(repo: &Path) -> bool {
    git(repo, &["rev-parse", "--is-inside-work-tree"])
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "true")
}

/// A merge, rebase, cherry-pick or revert in progress.
pub fn in_progress(repo: &Path) -> Result<Option<&'static str>, RepairError> {
    let git_dir = ok(repo, &["rev-parse", "--absolute-git-dir"])?;
    let g = Path::new(&git_dir);
    for (file, what) in [
        ("MERGE_HEAD", "merge"),
        ("rebase-merge", "rebase"),
        ("rebase-apply", "rebase"),
        ("CHERRY_PICK_HEAD", "cherry-pick"),
        ("REVERT_HEAD", "revert"),
    ] {
        if g.join(file).exists() {
            return Ok(Some(what));
        }
    }
    Ok(None)
}

/// Paths (relative to `repo`) with staged or unstaged changes.
pub fn dirty(repo: &Path, paths: &[String]) -> Result<Vec<String>, RepairError> {
    let mut args = vec!["status", "--porcelain=v1", "--untracked-files=no", "--"];
    args.extend(paths.iter().map(String::as_str));
    let out = ok(repo, &args)?;
    Ok(out
        .lines()
        .filter_map(|l| l.get(3..).map(str::to_owned))
        .collect())
}

/// Whether the path is tracked.
pub fn tracked(repo: &Path, path: &str) -> bool {
    git(repo, &["ls-files", "--error-unmatch", "--", path]).is_ok_and(|o| o.status.success())
}

/// Commits exactly `paths` (nothing else staged goes in), with the user's
/// identity or, when git has none configured, `pymedic <pymedic@HOST>`.
pub fn commit(repo: &Path, paths: &[String], message: &str) -> Result<String, RepairError> {
    let mut add = vec!["add", "--"];
    add.extend(paths.iter().map(String::as_str));
    ok(repo, &add)?;
    let mut args: Vec<String> = Vec::new();
    if ok(repo, &["config", "user.email"]).is_err() {
        let who = crate::store::Who::current();
        args.extend([
            "-c".into(),
            format!("user.name=pymedic ({})", who.user),
            "-c".into(),
            format!("user.email=pymedic@{}", who.host),
        ]);
    }
    args.extend([
        "commit".into(),
        "--only".into(),
        "-q".into(),
        "-m".into(),
        message.into(),
        "--".into(),
    ]);
    args.extend(paths.iter().cloned());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(repo, &refs)?;
    ok(repo, &["rev-parse", "HEAD"])
}

/// Unstages `paths` (after an interrupted commit).
pub fn unstage(repo: &Path, paths: &[String]) {
    let mut args = vec!["reset", "-q", "--"];
    args.extend(paths.iter().map(String::as_str));
    let _ = git(repo, &args);
}

/// The HEAD commit's full message.
pub fn head_message(repo: &Path) -> Option<String> {
    ok(repo, &["log", "-1", "--format=%B"]).ok()
}

pub fn head(repo: &Path) -> Option<String> {
    ok(repo, &["rev-parse", "HEAD"]).ok()
}
