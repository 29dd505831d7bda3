//! Capture records: what was asked for, its status, where the artifact is.

use std::path::PathBuf;

use pymedic_model::Timestamp;
use rusqlite::{OptionalExtension, params};

use super::{SqlContext, Store, StoreError, from_micros, micros};

/// A stored capture.
#[derive(Clone, Debug, PartialEq)]
pub struct CaptureRow {
    pub id: String,
    pub kind: String,
    pub pid: u32,
    pub format: String,
    /// "pending", "running", "done" or "failed".
    pub status: String,
    pub error: String,
    pub media_type: String,
    pub file_name: String,
    /// The artifact on disk (under the data directory).
    pub path: PathBuf,
    pub size_bytes: u64,
    pub requested_at: Timestamp,
    pub finished_at: Option<Timestamp>,
}

impl Store {
    /// Inserts or replaces a capture record.
    pub fn put_capture(&self, c: &CaptureRow) -> Result<(), StoreError> {
        self.writer()
            .prepare_cached(
                "INSERT OR REPLACE INTO captures (id, kind, pid, format, status, error, \
                 media_type, file_name, path, size_bytes, requested_at, finished_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )
            .op("store a capture")?
            .execute(params![
                c.id,
                c.kind,
                c.pid,
                c.format,
                c.status,
                c.error,
                c.media_type,
                c.file_name,
                c.path.to_string_lossy(),
                c.size_bytes as i64,
                micros(c.requested_at),
                c.finished_at.map(micros),
            ])
            .op("store a capture")?;
        Ok(())
    }

    pub fn get_capture(&self, id: &str) -> Result<Option<CaptureRow>, StoreError> {
        self.reader()
            .prepare_cached("SELECT * FROM captures WHERE id = ?1")
            .op("read a capture")?
            .query_row([id], row)
            .optional()
            .op("read a capture")
    }

    /// Captures oldest first (for retention of artifacts).
    pub fn captures(&self) -> Result<Vec<CaptureRow>, StoreError> {
        self.reader()
            .prepare_cached("SELECT * FROM captures ORDER BY requested_at")
            .op("list captures")?
            .query_map([], row)
            .op("list captures")?
            .collect::<Result<_, _>>()
            .op("list captures")
    }

    pub fn delete_capture(&self, id: &str) -> Result<(), StoreError> {
        self.writer()
            .execute("DELETE FROM captures WHERE id = ?1", [id])
            .op("delete a capture")?;
        Ok(())
    }

    /// Marks captures that were pending or running when the agent stopped
    /// as failed (their worker is gone). Returns how many.
    pub fn fail_interrupted_captures(&self, now: Timestamp) -> Result<usize, StoreError> {
        self.writer()
            .execute(
                "UPDATE captures SET status = 'failed', error = 'the agent restarted while \
                 this capture was running: trigger it again', finished_at = ?1 \
                 WHERE status IN ('pending', 'running')",
                [micros(now)],
            )
            .op("fail interrupted captures")
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CaptureRow> {
    Ok(CaptureRow {
        id: r.get("id")?,
        kind: r.get("kind")?,
        pid: r.get("pid")?,
        format: r.get("format")?,
        status: r.get("status")?,
        error: r.get("error")?,
        media_type: r.get("media_type")?,
        file_name: r.get("file_name")?,
        path: PathBuf::from(r.get::<_, String>("path")?),
        size_bytes: r.get::<_, i64>("size_bytes")? as u64,
        requested_at: from_micros(r.get("requested_at")?),
        finished_at: r.get::<_, Option<i64>>("finished_at")?.map(from_micros),
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::open;
    use super::*;

    #[test]
    fn capture_round_trip_and_interruption() {
        let (_d, store) = open();
        let c = CaptureRow {
            id: "c1".into(),
            kind: "dump".into(),
            pid: 7,
            format: "json".into(),
            status: "running".into(),
            error: String::new(),
            media_type: "application/json".into(),
            file_name: "dump-7.json".into(),
            path: "/tmp/x".into(),
            size_bytes: 0,
            requested_at: pymedic_model::now(),
            finished_at: None,
        };
        store.put_capture(&c).unwrap();
        assert_eq!(store.get_capture("c1").unwrap().unwrap(), c);
        assert_eq!(
            store
                .fail_interrupted_captures(pymedic_model::now())
                .unwrap(),
            1
        );
        let got = store.get_capture("c1").unwrap().unwrap();
        assert_eq!(got.status, "failed");
        assert!(got.error.contains("restarted"));
        assert_eq!(store.captures().unwrap().len(), 1);
        store.delete_capture("c1").unwrap();
        assert!(store.get_capture("c1").unwrap().is_none());
    }
}
