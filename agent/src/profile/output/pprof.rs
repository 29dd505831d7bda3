//! gzip-compressed pprof (`profile.proto` of github.com/google/pprof),
//! encoded with prost from the message definitions below. Python frames
//! become functions (name, file, start line) and locations (one line each).

use std::collections::HashMap;
use std::io::Write;
use std::time::UNIX_EPOCH;

use prost::Message;

use super::{OutputError, ProfileWriter, io_err};
use crate::profile::model::{Frame, Profile, ValueKind};

/// The pprof writer.
pub struct Pprof;

#[derive(Clone, PartialEq, prost::Message)]
struct PbProfile {
    #[prost(message, repeated, tag = "1")]
    sample_type: Vec<PbValueType>,
    #[prost(message, repeated, tag = "2")]
    sample: Vec<PbSample>,
    #[prost(message, repeated, tag = "4")]
    location: Vec<PbLocation>,
    #[prost(message, repeated, tag = "5")]
    function: Vec<PbFunction>,
    #[prost(string, repeated, tag = "6")]
    string_table: Vec<String>,
    #[prost(int64, tag = "9")]
    time_nanos: i64,
    #[prost(int64, tag = "10")]
    duration_nanos: i64,
    #[prost(message, optional, tag = "11")]
    period_type: Option<PbValueType>,
    #[prost(int64, tag = "12")]
    period: i64,
    #[prost(int64, repeated, tag = "13")]
    comment: Vec<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PbValueType {
    #[prost(int64, tag = "1")]
    r#type: i64,
    #[prost(int64, tag = "2")]
    unit: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PbSample {
    #[prost(uint64, repeated, tag = "1")]
    location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    label: Vec<PbLabel>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PbLabel {
    #[prost(int64, tag = "1")]
    key: i64,
    #[prost(int64, tag = "2")]
    str: i64,
    #[prost(int64, tag = "3")]
    num: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PbLocation {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(message, repeated, tag = "4")]
    line: Vec<PbLine>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PbLine {
    #[prost(uint64, tag = "1")]
    function_id: u64,
    #[prost(int64, tag = "2")]
    line: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PbFunction {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(int64, tag = "2")]
    name: i64,
    #[prost(int64, tag = "3")]
    system_name: i64,
    #[prost(int64, tag = "4")]
    filename: i64,
    #[prost(int64, tag = "5")]
    start_line: i64,
}

#[derive(Default)]
struct Builder {
    pb: PbProfile,
    strings: HashMap<String, i64>,
    functions: HashMap<(String, String), u64>,
    locations: HashMap<Frame, u64>,
}

impl Builder {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.pb.string_table.len() as i64;
        self.pb.string_table.push(s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    fn location(&mut self, f: &Frame) -> u64 {
        if let Some(&id) = self.locations.get(f) {
            return id;
        }
        let fkey = (f.function.clone(), f.file.clone());
        let function_id = match self.functions.get(&fkey) {
            Some(&id) => id,
            None => {
                let id = self.pb.function.len() as u64 + 1;
                let name = self.string(&f.function);
                let filename = self.string(&f.file);
                self.pb.function.push(PbFunction {
                    id,
                    name,
                    system_name: name,
                    filename,
                    start_line: 0,
                });
                self.functions.insert(fkey, id);
                id
            }
        };
        let id = self.pb.location.len() as u64 + 1;
        self.pb.location.push(PbLocation {
            id,
            line: vec![PbLine {
                function_id,
                line: i64::from(f.line),
            }],
        });
        self.locations.insert(f.clone(), id);
        id
    }
}

/// The uncompressed protobuf bytes.
fn encode(profile: &Profile) -> Vec<u8> {
    let mut b = Builder::default();
    b.string("");
    let samples = b.string("samples");
    let count = b.string("count");
    let (time_type, nanos) = match profile.value_kind {
        ValueKind::CpuSamples => (b.string("cpu"), b.string("nanoseconds")),
        ValueKind::WallNanos => (b.string("wall"), b.string("nanoseconds")),
    };
    b.pb.sample_type = vec![
        PbValueType {
            r#type: samples,
            unit: count,
        },
        PbValueType {
            r#type: time_type,
            unit: nanos,
        },
    ];
    b.pb.period_type = Some(PbValueType {
        r#type: time_type,
        unit: nanos,
    });
    b.pb.period = 1_000_000_000 / i64::from(profile.rate_hz.max(1));
    b.pb.time_nanos = profile
        .start
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    b.pb.duration_nanos = profile.duration.as_nanos() as i64;
    let comment = b.string(&format!(
        "pymedic record, sampler {}, {} lost samples",
        profile.sampler, profile.lost
    ));
    b.pb.comment = vec![comment];
    let (pid_key, tid_key, kind_key) = (b.string("pid"), b.string("tid"), b.string("kind"));
    let (on_cpu, off_cpu) = (b.string("on-cpu"), b.string("off-cpu"));
    for s in &profile.samples {
        // pprof wants the leaf first.
        let location_id: Vec<u64> = profile
            .stack(s)
            .iter()
            .rev()
            .map(|f| b.location(f))
            .collect();
        let kind = match s.kind {
            crate::profile::model::SampleKind::OnCpu => on_cpu,
            crate::profile::model::SampleKind::OffCpu => off_cpu,
        };
        b.pb.sample.push(PbSample {
            location_id,
            value: vec![s.count as i64, s.weight_ns as i64],
            label: vec![
                PbLabel {
                    key: pid_key,
                    str: 0,
                    num: i64::from(s.pid),
                },
                PbLabel {
                    key: tid_key,
                    str: 0,
                    num: i64::from(s.tid),
                },
                PbLabel {
                    key: kind_key,
                    str: kind,
                    num: 0,
                },
            ],
        });
    }
    b.pb.encode_to_vec()
}

impl ProfileWriter for Pprof {
    fn name(&self) -> &'static str {
        "pprof"
    }

    fn write(&self, profile: &Profile, out: &mut dyn Write) -> Result<(), OutputError> {
        let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
        gz.write_all(&encode(profile)).map_err(io_err("pprof"))?;
        gz.finish().map_err(io_err("pprof"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::model::tests::sample_profile;

    #[test]
    fn round_trips_through_prost() {
        let p = sample_profile();
        let pb = PbProfile::decode(encode(&p).as_slice()).unwrap();
        assert_eq!(pb.sample.len(), 3);
        assert_eq!(pb.string_table[0], "");
        let leaf = pb.sample[0].location_id[0];
        let loc = &pb.location[leaf as usize - 1];
        let func = &pb.function[loc.line[0].function_id as usize - 1];
        assert_eq!(pb.string_table[func.name as usize], "work");
        assert_eq!(loc.line[0].line, 5);
        assert_eq!(pb.sample[0].value, vec![6, 60_000_000]);
    }
}
