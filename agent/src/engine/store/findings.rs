//! Findings: recording detection passes (dedup, reopen, resolve) and queries.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};

use pymedic_model::{Finding, Layer, Severity, Status, Timestamp};
use rusqlite::{OptionalExtension, Transaction, params, params_from_iter, types::Value};

use super::events::{Event, EventType, insert_event};
use super::{SqlContext, Store, StoreError, from_micros, micros};

/// Filters for [`Store::list`]; `None` means any.
#[derive(Clone, Debug, Default)]
pub struct FindingFilter {
    pub layer: Option<Layer>,
    pub kind: Option<String>,
    /// Minimum severity.
    pub severity: Option<Severity>,
    pub pid: Option<u32>,
    /// `last_seen >= since`.
    pub since: Option<Timestamp>,
    pub status: Option<Status>,
}

impl FindingFilter {
    /// True when `f` passes (used on live events, same rules as the SQL).
    pub fn matches(&self, f: &Finding) -> bool {
        self.layer.is_none_or(|l| f.layer == l)
            && self.kind.as_deref().is_none_or(|k| f.kind.as_str() == k)
            && self.severity.is_none_or(|s| f.severity >= s)
            && self
                .pid
                .is_none_or(|p| f.target.as_ref().is_some_and(|t| t.pid == p))
            && self.since.is_none_or(|s| f.last_seen >= s)
            && self.status.is_none_or(|s| f.status == s)
    }
}

/// Active findings by (kind, severity, count), and the total stored.
pub type Counts = (Vec<(String, Severity, u64)>, u64);

/// One page of [`Store::list`].
#[derive(Clone, Debug, Default)]
pub struct Page {
    pub findings: Vec<Finding>,
    /// Pass back to get the next page; `None` on the last one.
    pub next: Option<String>,
}

/// Severity as an integer that orders like [`Severity`].
pub(crate) fn severity_rank(s: Severity) -> i64 {
    Severity::ALL.iter().position(|x| *x == s).unwrap_or(0) as i64
}

/// What makes an update worth an event: everything a person reads except
/// the counters, timestamps and free-form evidence (which may tick on every
/// pass).
fn content_hash(f: &Finding) -> String {
    let mut h = std::hash::DefaultHasher::new();
    f.kind.as_str().hash(&mut h);
    f.severity.hash(&mut h);
    f.title.hash(&mut h);
    f.location.hash(&mut h);
    for r in &f.related {
        (&r.file, &r.function, r.line, &r.role).hash(&mut h);
    }
    for s in &f.stacks {
        (&s.thread, s.tid, &s.frames).hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

fn target_key(f: &Finding) -> (Option<i64>, Option<i64>) {
    match &f.target {
        Some(t) => (
            Some(i64::from(t.pid)),
            Some(t.start_time_ticks.unwrap_or(0) as i64),
        ),
        None => (None, None),
    }
}

struct Existing {
    status: String,
    first_seen: i64,
    count: i64,
    hash: String,
}

impl Store {
    /// Records one detection pass: `detector` looked at the target
    /// `(pid, start_ticks)` (or at no process, for `None`) and currently sees
    /// exactly `seen`. New findings open, known ones update `last_seen` and
    /// `count` (an event only when their content changed), resolved ones that
    /// are seen again reopen, and this detector's active findings on this
    /// target that are no longer seen resolve. Returns the committed events.
    pub fn record_pass(
        &self,
        detector: &str,
        target: Option<(u32, u64)>,
        seen: &[Finding],
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        let mut conn = self.writer();
        let tx = conn.transaction().op("begin a detection pass")?;
        let mut events = Vec::new();
        let (pid, start) = match target {
            Some((p, s)) => (Some(i64::from(p)), Some(s as i64)),
            None => (None, None),
        };
        let before: Vec<String> = {
            let mut st = tx
                .prepare_cached(
                    "SELECT id FROM findings WHERE detector = ?1 AND pid IS ?2 \
                     AND start_ticks IS ?3 AND status = 'active'",
                )
                .op("query active findings")?;
            st.query_map(params![detector, pid, start], |r| r.get(0))
                .op("query active findings")?
                .collect::<Result<_, _>>()
                .op("query active findings")?
        };
        let mut seen_ids = HashSet::new();
        for f in seen {
            if !seen_ids.insert(f.id.0.clone()) {
                continue;
            }
            events.extend(upsert(&tx, detector, f, now)?);
        }
        for id in before.iter().filter(|id| !seen_ids.contains(*id)) {
            events.extend(resolve(&tx, id, now)?);
        }
        tx.commit().op("commit a detection pass")?;
        Ok(events)
    }

    /// Resolves every active finding about the target `(pid, start_ticks)`
    /// (it exited).
    pub fn resolve_target(
        &self,
        pid: u32,
        start_ticks: u64,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        self.resolve_where(|p, s| p == pid && s == start_ticks, now)
    }

    /// Resolves active findings whose target fails `alive` (used at start:
    /// processes that exited while the agent was down).
    pub fn resolve_where(
        &self,
        mut dead: impl FnMut(u32, u64) -> bool,
        now: Timestamp,
    ) -> Result<Vec<Event>, StoreError> {
        let mut conn = self.writer();
        let tx = conn.transaction().op("begin resolving findings")?;
        let ids: Vec<(String, i64, i64)> = {
            let mut st = tx
                .prepare_cached(
                    "SELECT id, pid, start_ticks FROM findings \
                     WHERE status = 'active' AND pid IS NOT NULL",
                )
                .op("query active findings")?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .op("query active findings")?
                .collect::<Result<_, _>>()
                .op("query active findings")?
        };
        let mut events = Vec::new();
        for (id, pid, start) in ids {
            if dead(pid as u32, start as u64) {
                events.extend(resolve(&tx, &id, now)?);
            }
        }
        tx.commit().op("commit resolved findings")?;
        Ok(events)
    }

    /// One finding by id.
    pub fn get(&self, id: &str) -> Result<Option<Finding>, StoreError> {
        let conn = self.reader();
        let mut st = conn
            .prepare_cached(&format!("{SELECT} WHERE id = ?1"))
            .op("read a finding")?;
        st.query_row([id], row_to_json)
            .optional()
            .op("read a finding")?
            .map(parse_finding)
            .transpose()
    }

    /// Findings matching `filter`, newest first, `limit` per page, after the
    /// page token of a previous call.
    pub fn list(
        &self,
        filter: &FindingFilter,
        limit: usize,
        page_token: Option<&str>,
    ) -> Result<Page, StoreError> {
        let mut sql = format!("{SELECT} WHERE 1=1");
        let mut args: Vec<Value> = Vec::new();
        if let Some(token) = page_token.filter(|t| !t.is_empty()) {
            let before: i64 = token
                .parse()
                .map_err(|_| StoreError::PageToken(token.to_owned()))?;
            sql.push_str(" AND rowid < ?");
            args.push(before.into());
        }
        if let Some(l) = filter.layer {
            sql.push_str(" AND layer = ?");
            args.push(l.as_str().to_owned().into());
        }
        if let Some(k) = &filter.kind {
            sql.push_str(" AND kind = ?");
            args.push(k.clone().into());
        }
        if let Some(s) = filter.severity {
            sql.push_str(" AND severity >= ?");
            args.push(severity_rank(s).into());
        }
        if let Some(p) = filter.pid {
            sql.push_str(" AND pid = ?");
            args.push(i64::from(p).into());
        }
        if let Some(t) = filter.since {
            sql.push_str(" AND last_seen >= ?");
            args.push(micros(t).into());
        }
        if let Some(s) = filter.status {
            sql.push_str(" AND status = ?");
            args.push(s.as_str().to_owned().into());
        }
        sql.push_str(" ORDER BY rowid DESC LIMIT ?");
        let limit = limit.clamp(1, 1000);
        args.push((limit as i64 + 1).into());
        let conn = self.reader();
        let mut st = conn.prepare(&sql).op("list findings")?;
        let rows: Vec<(i64, Finding)> = st
            .query_map(params_from_iter(args), |r| {
                Ok((r.get::<_, i64>("rowid")?, row_to_json(r)?))
            })
            .op("list findings")?
            .map(|r| {
                r.op("list findings")
                    .and_then(|(id, j)| Ok((id, parse_finding(j)?)))
            })
            .collect::<Result<_, _>>()?;
        let more = rows.len() > limit;
        let rows: Vec<_> = rows.into_iter().take(limit).collect();
        let next = more
            .then(|| rows.last().map(|(id, _)| id.to_string()))
            .flatten();
        Ok(Page {
            findings: rows.into_iter().map(|(_, f)| f).collect(),
            next,
        })
    }

    /// Active findings by (kind, severity), and the total number stored.
    pub fn counts(&self) -> Result<Counts, StoreError> {
        let conn = self.reader();
        let mut st = conn
            .prepare_cached(
                "SELECT kind, severity, COUNT(*) FROM findings WHERE status = 'active' \
                 GROUP BY kind, severity",
            )
            .op("count findings")?;
        let active = st
            .query_map([], |r| {
                let rank: i64 = r.get(1)?;
                Ok((
                    r.get::<_, String>(0)?,
                    Severity::ALL[rank.clamp(0, 4) as usize],
                    r.get::<_, i64>(2)? as u64,
                ))
            })
            .op("count findings")?
            .collect::<Result<_, _>>()
            .op("count findings")?;
        let total: i64 = conn
            .query_row("SELECT COUNT(*) FROM findings", [], |r| r.get(0))
            .op("count findings")?;
        Ok((active, total as u64))
    }
}

const SELECT: &str = "SELECT rowid, json, status, first_seen, last_seen, count FROM findings";

struct RowJson {
    json: String,
    status: String,
    first_seen: i64,
    last_seen: i64,
    count: i64,
}

fn row_to_json(r: &rusqlite::Row<'_>) -> rusqlite::Result<RowJson> {
    Ok(RowJson {
        json: r.get("json")?,
        status: r.get("status")?,
        first_seen: r.get("first_seen")?,
        last_seen: r.get("last_seen")?,
        count: r.get("count")?,
    })
}

fn parse_finding(row: RowJson) -> Result<Finding, StoreError> {
    let mut f: Finding = serde_json::from_str(&row.json).map_err(|source| StoreError::Json {
        op: "read a stored finding",
        source,
    })?;
    f.status = if row.status == "resolved" {
        Status::Resolved
    } else {
        Status::Active
    };
    f.first_seen = from_micros(row.first_seen);
    f.last_seen = from_micros(row.last_seen);
    f.count = row.count as u64;
    Ok(f)
}

fn to_json(f: &Finding) -> Result<String, StoreError> {
    serde_json::to_string(f).map_err(|source| StoreError::Json {
        op: "store a finding",
        source,
    })
}

fn upsert(
    tx: &Transaction<'_>,
    detector: &str,
    f: &Finding,
    now: Timestamp,
) -> Result<Option<Event>, StoreError> {
    let existing = tx
        .prepare_cached(
            "SELECT status, first_seen, count, content_hash FROM findings WHERE id = ?1",
        )
        .op("read a finding")?
        .query_row([&f.id.0], |r| {
            Ok(Existing {
                status: r.get(0)?,
                first_seen: r.get(1)?,
                count: r.get(2)?,
                hash: r.get(3)?,
            })
        })
        .optional()
        .op("read a finding")?;
    let hash = content_hash(f);
    let mut snapshot = f.clone();
    snapshot.status = Status::Active;
    snapshot.last_seen = now;
    let (pid, start) = target_key(f);
    let event = match existing {
        None => {
            snapshot.first_seen = now;
            snapshot.count = 1;
            tx.prepare_cached(
                "INSERT INTO findings (id, detector, kind, layer, severity, status, pid, \
                 start_ticks, first_seen, last_seen, count, content_hash, json) \
                 VALUES (?1, ?2, ?3, ?4, ?5, 'active', ?6, ?7, ?8, ?8, 1, ?9, ?10)",
            )
            .op("insert a finding")?
            .execute(params![
                f.id.0,
                detector,
                f.kind.as_str(),
                f.layer.as_str(),
                severity_rank(f.severity),
                pid,
                start,
                micros(now),
                hash,
                to_json(&snapshot)?,
            ])
            .op("insert a finding")?;
            Some(EventType::Opened)
        }
        Some(old) => {
            snapshot.first_seen = from_micros(old.first_seen);
            snapshot.count = old.count as u64 + 1;
            tx.prepare_cached(
                "UPDATE findings SET detector = ?2, severity = ?3, status = 'active', \
                 last_seen = ?4, count = count + 1, content_hash = ?5, json = ?6 WHERE id = ?1",
            )
            .op("update a finding")?
            .execute(params![
                f.id.0,
                detector,
                severity_rank(f.severity),
                micros(now),
                hash,
                to_json(&snapshot)?,
            ])
            .op("update a finding")?;
            if old.status != "active" {
                Some(EventType::Opened)
            } else if old.hash != hash {
                Some(EventType::Updated)
            } else {
                None
            }
        }
    };
    event
        .map(|kind| insert_event(tx, kind, &snapshot, now))
        .transpose()
}

fn resolve(tx: &Transaction<'_>, id: &str, now: Timestamp) -> Result<Option<Event>, StoreError> {
    let row = tx
        .prepare_cached(&format!("{SELECT} WHERE id = ?1 AND status = 'active'"))
        .op("read a finding")?
        .query_row([id], row_to_json)
        .optional()
        .op("read a finding")?;
    let Some(row) = row else { return Ok(None) };
    let mut f = parse_finding(row)?;
    f.status = Status::Resolved;
    tx.prepare_cached("UPDATE findings SET status = 'resolved' WHERE id = ?1")
        .op("resolve a finding")?
        .execute([id])
        .op("resolve a finding")?;
    insert_event(tx, EventType::Resolved, &f, now).map(Some)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{finding, open, target};
    use super::*;
    use pymedic_model::Kind;

    #[test]
    fn dedup_update_resolve_reopen() {
        let (_d, store) = open();
        let t = target(10, 500);
        let f = finding(&t, 7);
        let now = pymedic_model::now();
        let ev = store
            .record_pass("deadlock", Some((10, 500)), std::slice::from_ref(&f), now)
            .unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].kind, EventType::Opened);
        // Seen again, same content: no event, count and last_seen move.
        let later = now + time::Duration::seconds(5);
        let ev = store
            .record_pass("deadlock", Some((10, 500)), std::slice::from_ref(&f), later)
            .unwrap();
        assert!(ev.is_empty(), "{ev:?}");
        let got = store.get(&f.id.0).unwrap().unwrap();
        assert_eq!(got.count, 2);
        assert_eq!(got.first_seen, now);
        assert_eq!(got.last_seen, later);
        // Content changes: one Updated event.
        let mut g = f.clone();
        g.title = "worse".into();
        let ev = store
            .record_pass("deadlock", Some((10, 500)), &[g], later)
            .unwrap();
        assert_eq!(ev[0].kind, EventType::Updated);
        // Not seen: resolved.
        let ev = store
            .record_pass("deadlock", Some((10, 500)), &[], later)
            .unwrap();
        assert_eq!(ev[0].kind, EventType::Resolved);
        assert_eq!(ev[0].finding.status, Status::Resolved);
        assert_eq!(
            store.get(&f.id.0).unwrap().unwrap().status,
            Status::Resolved
        );
        // Seen again: reopened, same id, first_seen kept.
        let ev = store
            .record_pass("deadlock", Some((10, 500)), std::slice::from_ref(&f), later)
            .unwrap();
        assert_eq!(ev[0].kind, EventType::Opened);
        assert_eq!(ev[0].finding.first_seen, now);
        assert!(ev.windows(2).all(|w| w[0].seq < w[1].seq));
    }

    #[test]
    fn other_detectors_and_targets_are_untouched() {
        let (_d, store) = open();
        let a = target(10, 500);
        let b = target(10, 900); // pid reused: a different target
        let now = pymedic_model::now();
        store
            .record_pass("deadlock", Some((10, 500)), &[finding(&a, 1)], now)
            .unwrap();
        store
            .record_pass("deadlock", Some((10, 900)), &[finding(&b, 1)], now)
            .unwrap();
        assert_ne!(finding(&a, 1).id, finding(&b, 1).id);
        let ev = store
            .record_pass("other", Some((10, 500)), &[], now)
            .unwrap();
        assert!(ev.is_empty());
        let ev = store.resolve_target(10, 500, now).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(
            ev[0].finding.target.as_ref().unwrap().start_time_ticks,
            Some(500)
        );
        let active = store
            .list(
                &FindingFilter {
                    status: Some(Status::Active),
                    ..Default::default()
                },
                10,
                None,
            )
            .unwrap();
        assert_eq!(active.findings.len(), 1);
        assert_eq!(active.findings[0].id, finding(&b, 1).id);
    }

    #[test]
    fn list_filters_and_pages() {
        let (_d, store) = open();
        let t = target(3, 3);
        let now = pymedic_model::now();
        let mut all = Vec::new();
        for line in 1..=25 {
            let mut f = finding(&t, line);
            if line % 5 == 0 {
                f.kind = Kind::CPU_HOTSPOT;
                f.severity = Severity::Low;
                f.layer = Layer::Behavioral;
                f = f.with_discriminator("");
            }
            all.push(f);
        }
        store.record_pass("d", Some((3, 3)), &all, now).unwrap();
        let mut ids = Vec::new();
        let mut token = None;
        loop {
            let page = store
                .list(&FindingFilter::default(), 10, token.as_deref())
                .unwrap();
            ids.extend(page.findings.iter().map(|f| f.id.clone()));
            match page.next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        assert_eq!(ids.len(), 25);
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 25);
        let hot = store
            .list(
                &FindingFilter {
                    kind: Some("cpu_hotspot".into()),
                    ..Default::default()
                },
                100,
                None,
            )
            .unwrap();
        assert_eq!(hot.findings.len(), 5);
        let severe = store
            .list(
                &FindingFilter {
                    severity: Some(Severity::High),
                    ..Default::default()
                },
                100,
                None,
            )
            .unwrap();
        assert_eq!(severe.findings.len(), 20);
        let beh = store
            .list(
                &FindingFilter {
                    layer: Some(Layer::Behavioral),
                    pid: Some(3),
                    ..Default::default()
                },
                100,
                None,
            )
            .unwrap();
        assert_eq!(beh.findings.len(), 5);
        let none = store
            .list(
                &FindingFilter {
                    since: Some(now + time::Duration::hours(1)),
                    ..Default::default()
                },
                100,
                None,
            )
            .unwrap();
        assert!(none.findings.is_empty());
        assert!(matches!(
            store.list(&FindingFilter::default(), 10, Some("zz")),
            Err(StoreError::PageToken(_))
        ));
        let (active, total) = store.counts().unwrap();
        assert_eq!(total, 25);
        assert_eq!(active.iter().map(|(_, _, n)| n).sum::<u64>(), 25);
    }
}
