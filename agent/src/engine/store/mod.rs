//! The durable finding store: one SQLite file (`findings.db`, WAL) in the
//! agent's data directory.
//!
//! * `findings`: one row per finding id (kind + target + primary location),
//!   updated in place when a detector sees it again (`last_seen`, `count`).
//! * `events`: the change log watchers read: `seq` is `AUTOINCREMENT`, so it
//!   only grows, across restarts and deletions; each row carries the finding
//!   as it was at that event.
//! * `captures`: on-demand artifacts and their status.
//!
//! Writes happen in one transaction per detection pass and are committed
//! before anyone is told about them, so a client never sees an event a crash
//! could take back (WAL with `synchronous=NORMAL` survives a killed process).

mod captures;
mod events;
mod findings;
mod retention;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::Connection;

pub use captures::CaptureRow;
pub use events::{CursorError, Event, EventType};
pub use findings::{FindingFilter, Page};
pub use retention::{Retention, RetentionReport};

/// Store errors, naming the operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "create the data directory {path}: {source}; pass --data-dir with a writable directory"
    )]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("open the finding store {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "the finding store {path} has schema version {found}, newer than this pymedic \
         understands ({supported}): upgrade pymedic or point --data-dir elsewhere"
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("{op}: {source}")]
    Sql {
        op: &'static str,
        source: rusqlite::Error,
    },
    #[error("{op}: stored JSON is invalid: {source}")]
    Json {
        op: &'static str,
        source: serde_json::Error,
    },
    #[error("invalid page token {0:?}: pass the next_page_token of a previous response")]
    PageToken(String),
}

pub(crate) trait SqlContext<T> {
    fn op(self, op: &'static str) -> Result<T, StoreError>;
}

impl<T> SqlContext<T> for Result<T, rusqlite::Error> {
    fn op(self, op: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Sql { op, source })
    }
}

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS findings (
    rowid        INTEGER PRIMARY KEY,
    id           TEXT NOT NULL UNIQUE,
    detector     TEXT NOT NULL,
    kind         TEXT NOT NULL,
    layer        TEXT NOT NULL,
    severity     INTEGER NOT NULL,
    status       TEXT NOT NULL,
    pid          INTEGER,
    start_ticks  INTEGER,
    first_seen   INTEGER NOT NULL,
    last_seen    INTEGER NOT NULL,
    count        INTEGER NOT NULL,
    content_hash TEXT NOT NULL,
    json         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS findings_target ON findings(pid, start_ticks, status);
CREATE INDEX IF NOT EXISTS findings_last_seen ON findings(last_seen);
CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    at         INTEGER NOT NULL,
    type       TEXT NOT NULL,
    finding_id TEXT NOT NULL,
    json       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_at ON events(at);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS captures (
    id           TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    format       TEXT NOT NULL,
    status       TEXT NOT NULL,
    error        TEXT NOT NULL,
    media_type   TEXT NOT NULL,
    file_name    TEXT NOT NULL,
    path         TEXT NOT NULL,
    size_bytes   INTEGER NOT NULL,
    requested_at INTEGER NOT NULL,
    finished_at  INTEGER
);
";

/// The finding store. Cheap to share (`Arc<Store>`); every method blocks on
/// SQLite, so async callers use `spawn_blocking`.
pub struct Store {
    path: PathBuf,
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    retention: Retention,
}

impl Store {
    /// Opens (creating if needed) `DIR/findings.db`.
    pub fn open(dir: &Path, retention: Retention) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join("findings.db");
        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let writer = Connection::open(&path).map_err(open_err)?;
        writer
            .busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        writer
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        writer
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        let found: i64 = writer
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(open_err)?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                path,
                found,
                supported: SCHEMA_VERSION,
            });
        }
        writer.execute_batch(SCHEMA).map_err(open_err)?;
        writer
            .pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(open_err)?;
        let reader = Connection::open(&path).map_err(open_err)?;
        reader
            .busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        Ok(Store {
            path,
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
            retention,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn writer(&self) -> MutexGuard<'_, Connection> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reader(&self) -> MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Microseconds since the Unix epoch (what the tables store).
pub(crate) fn micros(t: pymedic_model::Timestamp) -> i64 {
    (t.unix_timestamp_nanos() / 1000) as i64
}

pub(crate) fn from_micros(us: i64) -> pymedic_model::Timestamp {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use pymedic_model::{Finding, Kind, Layer, Location, Severity, Target};

    pub fn target(pid: u32, start: u64) -> Target {
        Target {
            pid,
            exe: "/usr/bin/python3".into(),
            python: Some("3.12.1".into()),
            start_time_ticks: Some(start),
            ..Default::default()
        }
    }

    pub fn finding(t: &Target, line: u32) -> Finding {
        Finding::new(
            Layer::Temporal,
            Kind::DEADLOCK,
            Severity::Critical,
            0.9,
            format!("deadlock at line {line}"),
            Some(t.clone()),
            Location::new("app.py", "work", line),
        )
    }

    pub fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Retention::default()).unwrap();
        (dir, store)
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), Retention::default()).unwrap());
        let c = Connection::open(dir.path().join("findings.db")).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let err = Store::open(dir.path(), Retention::default()).err().unwrap();
        assert!(
            matches!(err, StoreError::NewerSchema { found: 99, .. }),
            "{err}"
        );
    }
}
