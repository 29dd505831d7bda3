//! Replays memory recorded from live interpreters (one fixture per version
//! in `tests/fixtures/`, made with `examples/record.rs` from
//! `tests/scripts/idle.py`): the decoded threads, names, GIL holder and
//! stacks must equal what was decoded live. No process, no root.

use std::fmt::Write as _;
use std::path::Path;

use pymedic_python::{FakeMemory, Interpreter, Version};

fn describe(i: &Interpreter<FakeMemory>) -> String {
    let threads = i.threads().unwrap();
    let main = threads[0].interp;
    let names = i.thread_names(main).unwrap();
    let gil = i.gil_holder(main).unwrap();
    let mut s = String::new();
    for t in &threads {
        let _ = writeln!(
            s,
            "thread {:?}{}",
            names.get(&t.thread_id).map(String::as_str).unwrap_or("?"),
            if gil == Some(t.tstate) { " gil" } else { "" }
        );
        for f in i.frames(t).unwrap() {
            let _ = writeln!(s, "  {} {}:{}", f.code.function(), f.code.filename, f.line);
        }
    }
    s
}

#[test]
fn recorded_interpreters_decode_as_they_did_live() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "expect") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines = text.lines();
        let version =
            Version::parse(lines.next().unwrap().strip_prefix("version ").unwrap()).unwrap();
        let runtime = u64::from_str_radix(
            lines.next().unwrap().strip_prefix("runtime 0x").unwrap(),
            16,
        )
        .unwrap();
        let expected: String = lines.map(|l| format!("{l}\n")).collect();
        let mem =
            FakeMemory::from_bytes(&std::fs::read(path.with_extension("mem")).unwrap()).unwrap();
        let interp = Interpreter::new(mem, version.clone(), runtime).unwrap();
        assert_eq!(describe(&interp), expected, "{}", path.display());
        assert!(
            expected.contains("thread \"MainThread\""),
            "{}",
            path.display()
        );
        seen.push(version.minor);
    }
    seen.sort();
    for minor in 8..=13 {
        assert!(seen.contains(&minor), "no recorded fixture for 3.{minor}");
    }
}
