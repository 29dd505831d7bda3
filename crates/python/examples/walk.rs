//! `cargo run -p pymedic-python --example walk -- PID`: prints every
//! thread's Python stack using only this crate (a debugging aid).

use pymedic_python::{Interpreter, LiveMemory};

fn main() {
    let pid: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .expect("usage: walk PID");
    let p = pymedic_python::inspect(pid).unwrap_or_else(|e| panic!("{e}"));
    let interp =
        Interpreter::for_process(LiveMemory::new(pid), &p).unwrap_or_else(|e| panic!("{e}"));
    if let Ok(Some(bad)) = interp.check_debug_offsets() {
        println!("debug offsets disagreeing: {bad:?}");
    }
    let threads = interp.threads().unwrap_or_else(|e| panic!("{e}"));
    let tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let native = interp.native_tids(&threads, &tids);
    let names = interp.thread_names(threads[0].interp).unwrap_or_else(|e| {
        println!("names: {e}");
        Default::default()
    });
    let gil = interp.gil_holder(threads[0].interp).ok().flatten();
    for t in &threads {
        println!(
            "thread {:#x} tid {:?} name {:?}{}",
            t.thread_id,
            native.get(&t.thread_id),
            names.get(&t.thread_id),
            if gil == Some(t.tstate) { " [GIL]" } else { "" }
        );
        match interp.frames(t) {
            Ok(frames) => {
                for f in frames {
                    println!(
                        "    {} ({}:{}){}",
                        f.code.function(),
                        f.code.filename,
                        f.line,
                        if f.is_entry { " [entry]" } else { "" }
                    );
                    for s in interp.frame_slots(&f).unwrap_or_default() {
                        if s.value != 0 {
                            println!("        {} = {}", s.name, interp.repr(s.value, 60));
                        }
                    }
                }
            }
            Err(e) => println!("    error: {e}"),
        }
    }
}
