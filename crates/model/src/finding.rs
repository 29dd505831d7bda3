//! A finding: what is wrong, where, how sure, since when, and the evidence.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::{Location, Related, Stack, Target, Timestamp};

/// The six diagnostic layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    /// Syntax errors, import problems, configuration.
    Surface,
    /// Performance and error patterns (CPU hot spots).
    Behavioral,
    /// Static analysis of the source.
    Structural,
    /// Concurrency and timing: deadlocks, lock order, event loops, GIL.
    Temporal,
    /// Memory, descriptors, threads, GC.
    Resource,
    /// External dependencies: sockets, databases, APIs.
    Integration,
}

impl Layer {
    pub const ALL: [Layer; 6] = [
        Layer::Surface,
        Layer::Behavioral,
        Layer::Structural,
        Layer::Temporal,
        Layer::Resource,
        Layer::Integration,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Surface => "surface",
            Layer::Behavioral => "behavioral",
            Layer::Structural => "structural",
            Layer::Temporal => "temporal",
            Layer::Resource => "resource",
            Layer::Integration => "integration",
        }
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Layer {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Layer::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| UnknownValue::new("layer", s, Layer::ALL.map(Layer::as_str).as_slice()))
    }
}

/// How bad it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 5] = [
        Severity::Info,
        Severity::Low,
        Severity::Medium,
        Severity::High,
        Severity::Critical,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Severity {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Severity::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| {
                UnknownValue::new(
                    "severity",
                    s,
                    Severity::ALL.map(Severity::as_str).as_slice(),
                )
            })
    }
}

/// Whether the condition still holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    #[default]
    Active,
    Resolved,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Resolved => "resolved",
        }
    }
}

/// A parse error for the closed enums above, naming the field and the choices.
#[derive(Debug, thiserror::Error)]
#[error("unknown {field} {value:?}: expected one of {choices}")]
pub struct UnknownValue {
    pub field: &'static str,
    pub value: String,
    pub choices: String,
}

impl UnknownValue {
    fn new(field: &'static str, value: &str, choices: &[&str]) -> Self {
        UnknownValue {
            field,
            value: value.to_owned(),
            choices: choices.join(", "),
        }
    }
}

/// What kind of problem: an open set of snake_case names. The names users
/// script against are the associated constants; detectors may add more.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Kind(Cow<'static, str>);

impl Kind {
    pub const DEADLOCK: Kind = Kind::from_static("deadlock");
    pub const LOCK_ORDER_INVERSION: Kind = Kind::from_static("lock_order_inversion");
    pub const LOCK_CONTENTION: Kind = Kind::from_static("lock_contention");
    pub const BLOCKED_EVENT_LOOP: Kind = Kind::from_static("blocked_event_loop");
    pub const GIL_CONTENTION: Kind = Kind::from_static("gil_contention");
    pub const CPU_HOTSPOT: Kind = Kind::from_static("cpu_hotspot");
    pub const OFF_CPU_HOTSPOT: Kind = Kind::from_static("off_cpu_hotspot");
    pub const HANG: Kind = Kind::from_static("hang");
    pub const MEMORY_LEAK: Kind = Kind::from_static("memory_leak");
    pub const NATIVE_MEMORY_LEAK: Kind = Kind::from_static("native_memory_leak");
    pub const FD_LEAK: Kind = Kind::from_static("fd_leak");
    pub const RESOURCE_LEAK: Kind = Kind::from_static("resource_leak");
    pub const THREAD_LEAK: Kind = Kind::from_static("thread_leak");
    pub const GC_PAUSE: Kind = Kind::from_static("gc_pause");
    pub const SYNTAX_ERROR: Kind = Kind::from_static("syntax_error");
    pub const IMPORT_CYCLE: Kind = Kind::from_static("import_cycle");

    pub const fn from_static(name: &'static str) -> Kind {
        Kind(Cow::Borrowed(name))
    }

    /// A kind from a runtime string (e.g. a CLI filter). Must be snake_case.
    pub fn new(name: impl Into<String>) -> Kind {
        Kind(Cow::Owned(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Kind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Kind::new)
    }
}

/// A finding's stable id: a hash of kind + target identity + primary location,
/// so the same problem seen again deduplicates onto one finding.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FindingId(pub String);

impl FindingId {
    /// Hashes `kind`, the target identity (pid and start time, or the empty
    /// string for a static finding) and `location` into 16 hex digits.
    /// `discriminator` separates distinct findings at the same location
    /// (e.g. two different deadlock cycles through one line); pass "" if none.
    pub fn compute(
        kind: &Kind,
        target: Option<&Target>,
        location: &Location,
        discriminator: &str,
    ) -> FindingId {
        let mut h = Sha256::new();
        h.update(kind.as_str().as_bytes());
        h.update([0]);
        if let Some(t) = target {
            h.update(t.pid.to_le_bytes());
            h.update(t.start_time_ticks.unwrap_or(0).to_le_bytes());
        }
        h.update([0]);
        h.update(location.file.as_bytes());
        h.update([0]);
        h.update(location.function.as_bytes());
        h.update([0]);
        h.update(location.line.to_le_bytes());
        h.update([0]);
        h.update(discriminator.as_bytes());
        let digest = h.finalize();
        FindingId(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
    }
}

impl fmt::Display for FindingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One finding, serialised as the Finding JSON of INTERFACE.md.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub id: FindingId,
    pub layer: Layer,
    pub kind: Kind,
    pub severity: Severity,
    /// 0.0 ..= 1.0
    pub confidence: f64,
    pub title: String,
    /// The process; `null` for a static (source-only) finding.
    pub target: Option<Target>,
    pub location: Location,
    #[serde(default)]
    pub related: Vec<Related>,
    #[serde(default)]
    pub stacks: Vec<Stack>,
    /// Free-form per kind: numbers a person can check.
    #[serde(default = "empty_object")]
    pub evidence: serde_json::Value,
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: Timestamp,
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: Timestamp,
    #[serde(default)]
    pub status: Status,
    /// How many times the detector reported it (deduplicated onto this one).
    #[serde(default = "one")]
    pub count: u64,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

fn one() -> u64 {
    1
}

impl Finding {
    /// A new active finding seen now, with its id computed from kind, target
    /// and location. Fill `related`, `stacks` and `evidence` afterwards.
    pub fn new(
        layer: Layer,
        kind: Kind,
        severity: Severity,
        confidence: f64,
        title: impl Into<String>,
        target: Option<Target>,
        location: Location,
    ) -> Finding {
        let now = crate::now();
        Finding {
            id: FindingId::compute(&kind, target.as_ref(), &location, ""),
            layer,
            kind,
            severity,
            confidence: confidence.clamp(0.0, 1.0),
            title: title.into(),
            target,
            location,
            related: Vec::new(),
            stacks: Vec::new(),
            evidence: empty_object(),
            first_seen: now,
            last_seen: now,
            status: Status::Active,
            count: 1,
        }
    }

    /// Recomputes the id with a discriminator (see [`FindingId::compute`]).
    pub fn with_discriminator(mut self, discriminator: &str) -> Finding {
        self.id = FindingId::compute(
            &self.kind,
            self.target.as_ref(),
            &self.location,
            discriminator,
        );
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            pid: 42,
            exe: "/usr/bin/python3.11".into(),
            python: Some("3.11.2".into()),
            start_time_ticks: Some(1000),
            ..Default::default()
        }
    }

    #[test]
    fn id_is_stable_and_depends_on_identity() {
        let loc = Location::new("app.py", "work", 10);
        let a = FindingId::compute(&Kind::DEADLOCK, Some(&target()), &loc, "");
        let b = FindingId::compute(&Kind::DEADLOCK, Some(&target()), &loc, "");
        assert_eq!(a, b);
        assert_eq!(a.0.len(), 16);
        let mut reused = target();
        reused.start_time_ticks = Some(2000);
        assert_ne!(
            a,
            FindingId::compute(&Kind::DEADLOCK, Some(&reused), &loc, "")
        );
        let other_line = Location::new("app.py", "work", 11);
        assert_ne!(
            a,
            FindingId::compute(&Kind::DEADLOCK, Some(&target()), &other_line, "")
        );
        assert_ne!(
            a,
            FindingId::compute(&Kind::FD_LEAK, Some(&target()), &loc, "")
        );
    }

    #[test]
    fn json_has_the_interface_fields() {
        let f = Finding::new(
            Layer::Temporal,
            Kind::DEADLOCK,
            Severity::Critical,
            0.97,
            "2 threads deadlocked",
            Some(target()),
            Location::new("app.py", "work", 10),
        );
        let v = serde_json::to_value(&f).unwrap();
        for key in [
            "id",
            "layer",
            "kind",
            "severity",
            "confidence",
            "title",
            "target",
            "location",
            "related",
            "stacks",
            "evidence",
            "first_seen",
            "last_seen",
            "status",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["kind"], "deadlock");
        assert_eq!(v["layer"], "temporal");
        assert_eq!(v["status"], "active");
        assert_eq!(v["location"]["line"], 10);
        let back: Finding = serde_json::from_value(v).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn enums_parse_with_named_errors() {
        assert_eq!("temporal".parse::<Layer>().unwrap(), Layer::Temporal);
        let err = "nope".parse::<Severity>().unwrap_err().to_string();
        assert!(
            err.contains("severity") && err.contains("critical"),
            "{err}"
        );
    }
}
