//! Conversions between the JSON model (`pymedic_model`) and `pymedic.v1`.

use pymedic_model as m;
use pymedic_proto::v1 as pb;

pub fn layer_to_pb(l: m::Layer) -> pb::Layer {
    match l {
        m::Layer::Surface => pb::Layer::Surface,
        m::Layer::Behavioral => pb::Layer::Behavioral,
        m::Layer::Structural => pb::Layer::Structural,
        m::Layer::Temporal => pb::Layer::Temporal,
        m::Layer::Resource => pb::Layer::Resource,
        m::Layer::Integration => pb::Layer::Integration,
    }
}

pub fn layer_from_pb(l: pb::Layer) -> Option<m::Layer> {
    Some(match l {
        pb::Layer::Unspecified => return None,
        pb::Layer::Surface => m::Layer::Surface,
        pb::Layer::Behavioral => m::Layer::Behavioral,
        pb::Layer::Structural => m::Layer::Structural,
        pb::Layer::Temporal => m::Layer::Temporal,
        pb::Layer::Resource => m::Layer::Resource,
        pb::Layer::Integration => m::Layer::Integration,
    })
}

pub fn severity_to_pb(s: m::Severity) -> pb::Severity {
    match s {
        m::Severity::Info => pb::Severity::Info,
        m::Severity::Low => pb::Severity::Low,
        m::Severity::Medium => pb::Severity::Medium,
        m::Severity::High => pb::Severity::High,
        m::Severity::Critical => pb::Severity::Critical,
    }
}

pub fn severity_from_pb(s: pb::Severity) -> Option<m::Severity> {
    Some(match s {
        pb::Severity::Unspecified => return None,
        pb::Severity::Info => m::Severity::Info,
        pb::Severity::Low => m::Severity::Low,
        pb::Severity::Medium => m::Severity::Medium,
        pb::Severity::High => m::Severity::High,
        pb::Severity::Critical => m::Severity::Critical,
    })
}

pub fn status_to_pb(s: m::Status) -> pb::Status {
    match s {
        m::Status::Active => pb::Status::Active,
        m::Status::Resolved => pb::Status::Resolved,
    }
}

pub fn status_from_pb(s: pb::Status) -> Option<m::Status> {
    match s {
        pb::Status::Unspecified => None,
        pb::Status::Active => Some(m::Status::Active),
        pb::Status::Resolved => Some(m::Status::Resolved),
    }
}

pub fn time_to_pb(t: m::Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    }
}

pub fn time_from_pb(t: &prost_types::Timestamp) -> m::Timestamp {
    time::OffsetDateTime::from_unix_timestamp_nanos(
        i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos),
    )
    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

pub fn target_to_pb(t: &m::Target) -> pb::Target {
    pb::Target {
        pid: t.pid,
        exe: t.exe.clone(),
        python: t.python.clone(),
        container: t.container.clone(),
        pod: t.pod.clone(),
        start_time_ticks: t.start_time_ticks,
    }
}

pub fn target_from_pb(t: &pb::Target) -> m::Target {
    m::Target {
        pid: t.pid,
        exe: t.exe.clone(),
        python: t.python.clone(),
        container: t.container.clone(),
        pod: t.pod.clone(),
        start_time_ticks: t.start_time_ticks,
    }
}

fn loc_to_pb(l: &m::Location) -> pb::Location {
    pb::Location {
        file: l.file.clone(),
        function: l.function.clone(),
        line: l.line,
    }
}

fn loc_from_pb(l: &pb::Location) -> m::Location {
    m::Location::new(l.file.clone(), l.function.clone(), l.line)
}

pub fn json_to_struct(v: &serde_json::Value) -> prost_types::Struct {
    match json_to_value(v).kind {
        Some(prost_types::value::Kind::StructValue(s)) => s,
        other => {
            // Evidence that is not an object is kept under "value".
            let mut s = prost_types::Struct::default();
            s.fields
                .insert("value".into(), prost_types::Value { kind: other });
            s
        }
    }
}

fn json_to_value(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

pub fn struct_to_json(s: &prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => (*b).into(),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                (*n as i64).into()
            } else {
                serde_json::Number::from_f64(*n)
                    .map(serde_json::Value::Number)
                    .unwrap_or(serde_json::Value::Null)
            }
        }
        Some(Kind::StringValue(s)) => s.clone().into(),
        Some(Kind::ListValue(l)) => l.values.iter().map(value_to_json).collect(),
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

pub fn finding_to_pb(f: &m::Finding) -> pb::Finding {
    pb::Finding {
        id: f.id.0.clone(),
        layer: layer_to_pb(f.layer) as i32,
        kind: f.kind.as_str().to_owned(),
        severity: severity_to_pb(f.severity) as i32,
        confidence: f.confidence,
        title: f.title.clone(),
        target: f.target.as_ref().map(target_to_pb),
        location: Some(loc_to_pb(&f.location)),
        related: f
            .related
            .iter()
            .map(|r| pb::Related {
                file: r.file.clone(),
                function: r.function.clone(),
                line: r.line,
                role: r.role.clone(),
            })
            .collect(),
        stacks: f
            .stacks
            .iter()
            .map(|s| pb::Stack {
                thread: s.thread.clone(),
                tid: s.tid,
                frames: s.frames.iter().map(loc_to_pb).collect(),
            })
            .collect(),
        evidence: Some(json_to_struct(&f.evidence)),
        first_seen: Some(time_to_pb(f.first_seen)),
        last_seen: Some(time_to_pb(f.last_seen)),
        status: status_to_pb(f.status) as i32,
        count: f.count,
    }
}

pub fn finding_from_pb(f: &pb::Finding) -> m::Finding {
    let epoch = time::OffsetDateTime::UNIX_EPOCH;
    m::Finding {
        id: m::FindingId(f.id.clone()),
        layer: layer_from_pb(f.layer()).unwrap_or(m::Layer::Behavioral),
        kind: m::Kind::new(f.kind.clone()),
        severity: severity_from_pb(f.severity()).unwrap_or(m::Severity::Info),
        confidence: f.confidence,
        title: f.title.clone(),
        target: f.target.as_ref().map(target_from_pb),
        location: f
            .location
            .as_ref()
            .map(loc_from_pb)
            .unwrap_or_else(|| m::Location::new("", "", 0)),
        related: f
            .related
            .iter()
            .map(|r| m::Related {
                file: r.file.clone(),
                function: r.function.clone(),
                line: r.line,
                role: r.role.clone(),
            })
            .collect(),
        stacks: f
            .stacks
            .iter()
            .map(|s| m::Stack {
                thread: s.thread.clone(),
                tid: s.tid,
                frames: s.frames.iter().map(loc_from_pb).collect(),
            })
            .collect(),
        evidence: f
            .evidence
            .as_ref()
            .map(struct_to_json)
            .unwrap_or_else(|| serde_json::json!({})),
        first_seen: f.first_seen.as_ref().map(time_from_pb).unwrap_or(epoch),
        last_seen: f.last_seen.as_ref().map(time_from_pb).unwrap_or(epoch),
        status: status_from_pb(f.status()).unwrap_or_default(),
        count: f.count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finding_round_trips() {
        let mut f = m::Finding::new(
            m::Layer::Temporal,
            m::Kind::DEADLOCK,
            m::Severity::Critical,
            0.95,
            "2 threads deadlocked",
            Some(m::Target {
                pid: 4,
                exe: "/usr/bin/python3".into(),
                python: Some("3.12.1".into()),
                start_time_ticks: Some(77),
                ..Default::default()
            }),
            m::Location::new("app.py", "work", 65),
        );
        f.related.push(m::Related::new(
            &m::Location::new("app.py", "other", 71),
            "holds audit_lock",
        ));
        f.stacks.push(m::Stack {
            thread: "reconciler".into(),
            tid: 4242,
            frames: vec![m::Location::new("app.py", "work", 65)],
        });
        f.evidence =
            serde_json::json!({"threads": 2, "ratio": 0.5, "locks": ["a", "b"], "none": null});
        let back = finding_from_pb(&finding_to_pb(&f));
        assert_eq!(back, f);
    }
}
