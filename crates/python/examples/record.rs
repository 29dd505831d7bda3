//! `cargo run -p pymedic-python --example record -- PID OUT`: walks every
//! thread of a live interpreter through [`RecordingMemory`] and writes
//! `OUT.mem` (the bytes read) and `OUT.expect` (version, `_PyRuntime`, and
//! the stacks/names/GIL decoded), a fixture that
//! `tests/recorded.rs` replays without a live process or root.

use std::fmt::Write as _;

use pymedic_python::{Interpreter, LiveMemory, RecordingMemory};

fn main() {
    let mut args = std::env::args().skip(1);
    let pid: u32 = args
        .next()
        .and_then(|a| a.parse().ok())
        .expect("usage: record PID OUT");
    let out = args.next().expect("usage: record PID OUT");
    let p = pymedic_python::inspect(pid).unwrap_or_else(|e| panic!("{e}"));
    let interp = Interpreter::for_process(RecordingMemory::new(LiveMemory::new(pid)), &p)
        .unwrap_or_else(|e| panic!("{e}"));
    let expect = describe(&interp).unwrap_or_else(|e| panic!("{e}"));
    let header = format!("version {}\nruntime {:#x}\n", p.version, p.runtime_addr);
    std::fs::write(format!("{out}.mem"), interp.memory().recorded().to_bytes()).unwrap();
    std::fs::write(format!("{out}.expect"), header + &expect).unwrap();
    println!("wrote {out}.mem and {out}.expect");
}

/// The text both the recorder and the replay test produce.
fn describe<M: pymedic_python::ProcessMemory>(
    i: &Interpreter<M>,
) -> Result<String, pymedic_python::ReadError> {
    let threads = i.threads()?;
    let main = threads[0].interp;
    let names = i.thread_names(main)?;
    let gil = i.gil_holder(main)?;
    let mut s = String::new();
    for t in &threads {
        let _ = writeln!(
            s,
            "thread {:?}{}",
            names.get(&t.thread_id).map(String::as_str).unwrap_or("?"),
            if gil == Some(t.tstate) { " gil" } else { "" }
        );
        for f in i.frames(t)? {
            let _ = writeln!(s, "  {} {}:{}", f.code.function(), f.code.filename, f.line);
        }
    }
    Ok(s)
}
