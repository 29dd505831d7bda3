//! Retention: how much history the store keeps.

use std::time::Duration;

use pymedic_model::Timestamp;
use rusqlite::params;

use super::{SqlContext, Store, StoreError, micros};

/// Limits on what the store keeps. Active findings are never deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Resolved findings not seen for this long are deleted.
    pub resolved_for: Duration,
    /// At most this many findings; the oldest resolved go first.
    pub max_findings: u64,
    /// Events older than this are deleted.
    pub events_for: Duration,
    /// At most this many events; the oldest go first.
    pub max_events: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            resolved_for: Duration::from_secs(7 * 24 * 3600),
            max_findings: 10_000,
            events_for: Duration::from_secs(7 * 24 * 3600),
            max_events: 100_000,
        }
    }
}

/// What one retention pass deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub findings: u64,
    pub events: u64,
}

impl Store {
    /// Deletes what the limits no longer allow. Call periodically.
    pub fn enforce_retention(&self, now: Timestamp) -> Result<RetentionReport, StoreError> {
        let r = self.retention;
        let mut conn = self.writer();
        let tx = conn.transaction().op("begin retention")?;
        let mut report = RetentionReport::default();
        let cutoff = micros(now) - r.resolved_for.as_micros() as i64;
        report.findings += tx
            .execute(
                "DELETE FROM findings WHERE status = 'resolved' AND last_seen < ?1",
                [cutoff],
            )
            .op("delete old resolved findings")? as u64;
        let total: i64 = tx
            .query_row("SELECT COUNT(*) FROM findings", [], |row| row.get(0))
            .op("count findings")?;
        let excess = total - r.max_findings as i64;
        if excess > 0 {
            report.findings += tx
                .execute(
                    "DELETE FROM findings WHERE rowid IN (SELECT rowid FROM findings \
                     WHERE status = 'resolved' ORDER BY last_seen LIMIT ?1)",
                    [excess],
                )
                .op("delete the oldest resolved findings")? as u64;
        }
        // Events: by age, then by count; remember the highest deleted seq so
        // a cursor from before it is refused rather than silently gapped.
        let cutoff = micros(now) - r.events_for.as_micros() as i64;
        let by_age: Option<i64> = tx
            .query_row(
                "SELECT MAX(seq) FROM events WHERE at < ?1",
                [cutoff],
                |row| row.get(0),
            )
            .op("find old events")?;
        let max_seq: Option<i64> = tx
            .query_row("SELECT MAX(seq) FROM events", [], |row| row.get(0))
            .op("find the newest event")?;
        let by_count = max_seq.map(|m| m - r.max_events as i64);
        let through = by_age.into_iter().chain(by_count).max().unwrap_or(0);
        if through > 0 {
            report.events += tx
                .execute("DELETE FROM events WHERE seq <= ?1", [through])
                .op("delete old events")? as u64;
            if report.events > 0 {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('events_pruned_through', ?1) \
                     ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)",
                    params![through],
                )
                .op("record retention state")?;
            }
        }
        tx.commit().op("commit retention")?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::super::events::CursorError;
    use super::super::tests::{finding, target};
    use super::*;
    use pymedic_model::Status;

    #[test]
    fn deletes_old_resolved_and_excess_events_but_never_active() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path(),
            Retention {
                resolved_for: Duration::from_secs(60),
                max_findings: 3,
                events_for: Duration::from_secs(2 * 3600),
                max_events: 4,
            },
        )
        .unwrap();
        let t = target(1, 1);
        let old = pymedic_model::now() - time::Duration::hours(1);
        let fs: Vec<_> = (1..=6).map(|l| finding(&t, l)).collect();
        store.record_pass("d", Some((1, 1)), &fs, old).unwrap();
        // Lines 1-3 resolve; 4-6 stay active.
        store.record_pass("d", Some((1, 1)), &fs[3..], old).unwrap();
        let now = pymedic_model::now();
        let rep = store.enforce_retention(now).unwrap();
        assert_eq!(rep.findings, 3);
        let left = store.list(&Default::default(), 100, None).unwrap().findings;
        assert_eq!(left.len(), 3);
        assert!(left.iter().all(|f| f.status == Status::Active));
        // 9 events, max 4: the first 5 are gone and resuming before them fails.
        assert_eq!(rep.events, 5);
        assert!(matches!(
            store.events_after(2, 10),
            Err(CursorError::Pruned {
                pruned_through: 5,
                ..
            })
        ));
        assert_eq!(store.events_after(5, 10).unwrap().len(), 4);
    }
}
