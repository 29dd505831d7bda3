//! Finding lifecycles in memory, for `pymedic diagnose` (no store): the same
//! rules as the store's detection passes (dedup by id, count, last_seen,
//! resolve when no longer seen, reopen).

use std::collections::{BTreeMap, HashMap, HashSet};

use pymedic_model::{Finding, Status, Timestamp};

#[derive(Debug, Default)]
pub struct Tally {
    findings: BTreeMap<String, Finding>,
    active: HashMap<&'static str, HashSet<String>>,
}

impl Tally {
    /// One detection pass of `detector`, which sees exactly `seen`.
    pub fn record(&mut self, detector: &'static str, seen: Vec<Finding>, now: Timestamp) {
        let mut ids = HashSet::new();
        for mut f in seen {
            let id = f.id.0.clone();
            if !ids.insert(id.clone()) {
                continue;
            }
            match self.findings.get(&id) {
                Some(old) => {
                    f.first_seen = old.first_seen;
                    f.count = old.count + 1;
                }
                None => {
                    f.first_seen = now;
                    f.count = 1;
                }
            }
            f.last_seen = now;
            f.status = Status::Active;
            self.findings.insert(id, f);
        }
        let before = self
            .active
            .insert(detector, ids.clone())
            .unwrap_or_default();
        for id in before.difference(&ids) {
            if let Some(f) = self.findings.get_mut(id) {
                f.status = Status::Resolved;
            }
        }
    }

    /// Every finding seen, most severe first.
    pub fn findings(&self) -> Vec<Finding> {
        let mut v: Vec<Finding> = self.findings.values().cloned().collect();
        v.sort_by(|a, b| {
            b.severity
                .cmp(&a.severity)
                .then(b.confidence.total_cmp(&a.confidence))
                .then(a.first_seen.cmp(&b.first_seen))
        });
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pymedic_model::{Kind, Layer, Location, Severity};

    #[test]
    fn same_rules_as_the_store() {
        let f = Finding::new(
            Layer::Temporal,
            Kind::DEADLOCK,
            Severity::Critical,
            1.0,
            "d",
            None,
            Location::new("a.py", "f", 1),
        );
        let t0 = pymedic_model::now();
        let t1 = t0 + time::Duration::seconds(1);
        let mut t = Tally::default();
        t.record("deadlock", vec![f.clone()], t0);
        t.record("deadlock", vec![f.clone()], t1);
        let got = &t.findings()[0];
        assert_eq!(
            (got.count, got.first_seen, got.last_seen, got.status),
            (2, t0, t1, Status::Active)
        );
        t.record("other", vec![], t1);
        assert_eq!(t.findings()[0].status, Status::Active);
        t.record("deadlock", vec![], t1);
        assert_eq!(t.findings()[0].status, Status::Resolved);
    }
}
