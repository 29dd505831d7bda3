//! The event log watchers read, with a cursor that survives restarts.

use pymedic_model::{Finding, Timestamp};
use rusqlite::{OptionalExtension, Transaction, params};

use super::{SqlContext, Store, StoreError, from_micros, micros};

/// What happened to a finding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    /// Appeared, or reappeared after it had resolved.
    Opened,
    /// Its content changed.
    Updated,
    /// The condition cleared or the target exited.
    Resolved,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Opened => "opened",
            EventType::Updated => "updated",
            EventType::Resolved => "resolved",
        }
    }

    fn parse(s: &str) -> EventType {
        match s {
            "opened" => EventType::Opened,
            "resolved" => EventType::Resolved,
            _ => EventType::Updated,
        }
    }
}

/// One committed event: the finding as it was then.
#[derive(Clone, Debug)]
pub struct Event {
    /// Strictly increasing, never reused (the resume cursor).
    pub seq: u64,
    pub kind: EventType,
    pub at: Timestamp,
    pub finding: Finding,
}

pub(super) fn insert_event(
    tx: &Transaction<'_>,
    kind: EventType,
    finding: &Finding,
    at: Timestamp,
) -> Result<Event, StoreError> {
    let json = serde_json::to_string(finding).map_err(|source| StoreError::Json {
        op: "store an event",
        source,
    })?;
    tx.prepare_cached("INSERT INTO events (at, type, finding_id, json) VALUES (?1, ?2, ?3, ?4)")
        .op("append an event")?
        .execute(params![micros(at), kind.as_str(), finding.id.0, json])
        .op("append an event")?;
    Ok(Event {
        seq: tx.last_insert_rowid() as u64,
        kind,
        at,
        finding: finding.clone(),
    })
}

/// Why a cursor cannot be resumed.
#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    #[error(
        "events after sequence {cursor} are no longer all retained (retention dropped \
         everything up to {pruned_through}): list findings to resynchronise, then watch \
         from sequence {pruned_through}"
    )]
    Pruned { cursor: u64, pruned_through: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Store {
    /// Up to `limit` events with `seq > after`, in order. Fails when
    /// retention already deleted some of them, so a resuming client learns
    /// it has a gap instead of silently missing events.
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, CursorError> {
        let conn = self.reader();
        let pruned = pruned_through(&conn)?;
        if after < pruned {
            return Err(CursorError::Pruned {
                cursor: after,
                pruned_through: pruned,
            });
        }
        let mut st = conn
            .prepare_cached(
                "SELECT seq, at, type, json FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .op("read events")?;
        let rows = st
            .query_map(params![after as i64, limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .op("read events")?
            .collect::<Result<Vec<_>, _>>()
            .op("read events")?;
        rows.into_iter()
            .map(|(seq, at, kind, json)| {
                let finding = serde_json::from_str(&json).map_err(|source| StoreError::Json {
                    op: "read an event",
                    source,
                })?;
                Ok(Event {
                    seq: seq as u64,
                    kind: EventType::parse(&kind),
                    at: from_micros(at),
                    finding,
                })
            })
            .collect()
    }

    /// The newest sequence number ever assigned (0 before the first event).
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        let conn = self.reader();
        let seq: Option<i64> = conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'events'",
                [],
                |r| r.get(0),
            )
            .optional()
            .op("read the last event sequence")?;
        Ok(seq.unwrap_or(0) as u64)
    }
}

/// Everything up to and including this sequence may have been deleted.
pub(super) fn pruned_through(conn: &rusqlite::Connection) -> Result<u64, StoreError> {
    let v: Option<i64> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'events_pruned_through'",
            [],
            |r| r.get(0),
        )
        .optional()
        .op("read retention state")?;
    Ok(v.unwrap_or(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{finding, open, target};
    use super::*;

    #[test]
    fn cursor_replays_in_order_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(1, 1);
        let now = pymedic_model::now();
        let mut seqs = Vec::new();
        {
            let store = Store::open(dir.path(), Default::default()).unwrap();
            for line in 1..=5 {
                let ev = store
                    .record_pass("d", Some((1, 1)), &[finding(&t, line)], now)
                    .unwrap();
                seqs.extend(ev.iter().map(|e| e.seq));
            }
        }
        let store = Store::open(dir.path(), Default::default()).unwrap();
        assert_eq!(store.last_seq().unwrap(), *seqs.last().unwrap());
        let all = store.events_after(0, 100).unwrap();
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs);
        let tail = store.events_after(seqs[3], 100).unwrap();
        assert_eq!(tail.first().unwrap().seq, seqs[4]);
        // New events continue the sequence after a reopen.
        let ev = store.record_pass("d", Some((1, 1)), &[], now).unwrap();
        assert!(ev[0].seq > *seqs.last().unwrap());
    }

    #[test]
    fn empty_store_has_sequence_zero() {
        let (_d, store) = open();
        assert_eq!(store.last_seq().unwrap(), 0);
        assert!(store.events_after(0, 10).unwrap().is_empty());
    }
}
