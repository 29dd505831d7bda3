//! Collapsed ("folded") stacks: `frame;frame;... value`, outermost first,
//! frames written `function (file:line)`. Off-CPU/wall profiles use
//! microseconds as the value so the numbers stay readable.

use std::collections::BTreeMap;
use std::io::Write;

use super::{OutputError, ProfileWriter, io_err};
use crate::profile::model::{Profile, ValueKind};

/// The collapsed-stacks writer.
pub struct Collapsed;

/// The lines of a profile, sorted, with their values.
pub(crate) fn lines(profile: &Profile) -> BTreeMap<String, u64> {
    let mut out: BTreeMap<String, u64> = BTreeMap::new();
    for s in &profile.samples {
        let value = match profile.value_kind {
            ValueKind::CpuSamples => s.count,
            ValueKind::WallNanos => s.weight_ns / 1000,
        };
        if value == 0 {
            continue;
        }
        let stack: Vec<String> = profile
            .stack(s)
            .iter()
            .map(|f| f.label().replace(';', ":").replace(['\n', '\r'], " "))
            .collect();
        *out.entry(stack.join(";")).or_default() += value;
    }
    out
}

impl ProfileWriter for Collapsed {
    fn name(&self) -> &'static str {
        "collapsed"
    }

    fn write(&self, profile: &Profile, out: &mut dyn Write) -> Result<(), OutputError> {
        for (stack, value) in lines(profile) {
            writeln!(out, "{stack} {value}").map_err(io_err("collapsed"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::model::tests::sample_profile;

    #[test]
    fn writes_function_file_line() {
        let mut buf = Vec::new();
        Collapsed.write(&sample_profile(), &mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.contains(
            "<process 42 python3 app.py>;<thread MainThread 42>;<module> (app.py:10);main (app.py:3);work (app.py:5) 6\n"
        ), "{text}");
        assert!(
            text.contains("<thread worker 43>;<no Python frame> 1\n"),
            "{text}"
        );
    }
}
