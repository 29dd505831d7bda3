//! pymedic's state in a repository: `.pymedic/` holds `plans/<id>.json`,
//! `backups/<id>/...` (exact bytes of every file before it was changed),
//! `journal.json` (an operation in progress) and `history.jsonl` (every
//! plan, apply, failure, rollback and recovery, with who, when and why).
//! `.pymedic/.gitignore` keeps all of it out of git.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::RepairError;

pub const DIR: &str = ".pymedic";

/// Paths inside `.pymedic/`.
#[derive(Clone, Debug)]
pub struct Store {
    pub repo: PathBuf,
    pub dir: PathBuf,
}

impl Store {
    /// Opens (creating) `.pymedic/` under `repo`.
    pub fn open(repo: &Path) -> Result<Store, RepairError> {
        let dir = repo.join(DIR);
        for sub in ["plans", "backups"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(RepairError::io("create directory", dir.join(sub)))?;
        }
        let ignore = dir.join(".gitignore");
        if !ignore.exists() {
            std::fs::write(
                &ignore,
                "# pymedic's plans, backups and journal stay out of git\n*\n",
            )
            .map_err(RepairError::io("write", &ignore))?;
        }
        Ok(Store {
            repo: repo.to_path_buf(),
            dir,
        })
    }

    pub fn plan_path(&self, id: &str) -> PathBuf {
        self.dir.join("plans").join(format!("{id}.json"))
    }

    pub fn backup_dir(&self, id: &str, op: &str) -> PathBuf {
        self.dir.join("backups").join(id).join(op)
    }

    pub fn journal_path(&self) -> PathBuf {
        self.dir.join("journal.json")
    }

    pub fn history_path(&self) -> PathBuf {
        self.dir.join("history.jsonl")
    }

    /// A file of the repository by its path relative to the repo.
    pub fn file(&self, rel: &str) -> PathBuf {
        self.repo.join(rel)
    }

    /// Appends one event to the history (one JSON object per line, fsynced).
    pub fn record(&self, event: &Event) -> Result<(), RepairError> {
        let path = self.history_path();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(RepairError::io("open", &path))?;
        let mut line = serde_json::to_string(event).unwrap_or_default();
        line.push('\n');
        f.write_all(line.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(RepairError::io("append to", &path))
    }

    /// Every recorded event, oldest first.
    pub fn history(&self) -> Result<Vec<Event>, RepairError> {
        let path = self.history_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(RepairError::io("read", &path)(e)),
        };
        // A torn last line (crash mid-append) is skipped, not fatal.
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }
}

/// Who did something: the invoking user (through sudo too), uid, host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Who {
    pub user: String,
    pub uid: u32,
    pub host: String,
}

impl Who {
    pub fn current() -> Who {
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        let user = ["SUDO_USER", "USER", "LOGNAME"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
            .or_else(|| passwd_name(uid))
            .unwrap_or_else(|| format!("uid{uid}"));
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into());
        Who { user, uid, host }
    }
}

/// The login name of `uid` from /etc/passwd.
fn passwd_name(uid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id: u32 = f.nth(1)?.parse().ok()?;
        (id == uid).then(|| name.to_owned())
    })
}

/// One line of `history.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    #[serde(with = "time::serde::rfc3339")]
    pub time: time::OffsetDateTime,
    /// planned | applied | apply_failed | rolled_back | recovered
    pub event: String,
    pub plan: String,
    pub finding: String,
    pub kind: String,
    pub who: Who,
    pub why: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
}

impl Event {
    pub fn new(
        event: &str,
        plan: &str,
        finding: &str,
        kind: &str,
        why: impl Into<String>,
    ) -> Event {
        Event {
            time: pymedic_model::now(),
            event: event.into(),
            plan: plan.into(),
            finding: finding.into(),
            kind: kind.into(),
            who: Who::current(),
            why: why.into(),
            commit: None,
            files: Vec::new(),
        }
    }
}

pub fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads a file's bytes, naming it on error.
pub fn read(path: &Path) -> Result<Vec<u8>, RepairError> {
    std::fs::read(path).map_err(RepairError::io("read", path))
}

/// Replaces `path` atomically: write a temporary file beside it, fsync,
/// keep the old file's permissions, rename over, fsync the directory. A
/// crash leaves either the old or the new contents, never a mix.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<(), RepairError> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.pymedic-tmp"));
    let mode = mode.or_else(|| std::fs::metadata(path).ok().map(|m| m.permissions().mode()));
    {
        let mut f = File::create(&tmp).map_err(RepairError::io("create", &tmp))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(RepairError::io("write", &tmp))?;
        if let Some(mode) = mode {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
                .map_err(RepairError::io("set permissions of", &tmp))?;
        }
    }
    std::fs::rename(&tmp, path).map_err(RepairError::io("rename over", path))?;
    sync_dir(dir)
}

pub fn sync_dir(dir: &Path) -> Result<(), RepairError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(RepairError::io("fsync directory", dir))
}

/// Writes JSON atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), RepairError> {
    let bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(RepairError::io("create directory", parent))?;
    }
    atomic_write(path, &bytes, Some(0o644))
}

pub fn read_json<T: for<'de> Deserialize<'de>>(
    path: &Path,
    what: &'static str,
) -> Result<T, RepairError> {
    let bytes = read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| RepairError::Corrupt {
        what,
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Test hook: `PYMEDIC_REPAIR_PAUSE=<step>` makes a command stop for two
/// minutes at that step (printing `PAUSED <step>` on stderr), so a test can
/// kill it mid-operation. Steps: `after-backup`, `after-first-write`,
/// `before-verify`, `before-commit`.
pub fn pause_point(step: &str) {
    if std::env::var("PYMEDIC_REPAIR_PAUSE").is_ok_and(|s| s == step) {
        eprintln!("PAUSED {step}");
        std::thread::sleep(std::time::Duration::from_secs(120));
    }
}
