//! Records replay fixtures for the stack walker's no-root unit tests
//! (`pymedic::pystack::tests::replays_recorded_stacks`): on every
//! interpreter, stacks captured by the real eBPF walker (the `PyStack`
//! bytes from the kernel map) plus the target memory that symbolizing them
//! read, plus the frames that symbolization produced live.
//!
//! Run as root when the walker or the layouts change:
//! `cargo test -p pymedic --test pystack_fixture -- --ignored`

use std::fmt::Write as _;
use std::time::Duration;

use pymedic::profile::ProfileConfig;
use pymedic::profile::ebpf::EbpfSampler;
use pymedic::pystack::{CodeSource, symbolize_frame};
use pymedic_common::pystack::PyStack;
use pymedic_integration::{PyProc, pythons, repo_root};
use pymedic_python::{Interpreter, LiveMemory, RecordingMemory};

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn stack_bytes(stack: &PyStack) -> Vec<u8> {
    // SAFETY: PyStack is repr(C) plain data without padding.
    unsafe {
        std::slice::from_raw_parts(
            (stack as *const PyStack).cast::<u8>(),
            std::mem::size_of::<PyStack>(),
        )
    }
    .to_vec()
}

#[test]
#[ignore = "needs root; regenerates agent/tests/fixtures"]
fn record_pystack_fixtures() {
    for py in pythons() {
        let target = PyProc::start(&py, "profile/cpu_split.py", &["2"]);
        let process = pymedic_python::inspect(target.pid()).expect("inspect");
        let mut sampler = EbpfSampler::start(&ProfileConfig {
            rate_hz: 499,
            ..ProfileConfig::default()
        })
        .expect("start the eBPF sampler");
        pymedic::profile::Sampler::add_target(&mut sampler, &process).expect("add target");
        std::thread::sleep(Duration::from_millis(800));
        let stacks = sampler.raw_stacks().expect("read stacks");
        assert!(!stacks.is_empty(), "{}: no stacks", py.label);
        let interp =
            Interpreter::for_process(RecordingMemory::new(LiveMemory::new(process.pid)), &process)
                .expect("interpreter");
        let mut entries = Vec::new();
        for (_, id, stack) in stacks.iter().take(8) {
            let frames: Vec<String> = stack
                .frames()
                .iter()
                .rev()
                .map(|f| symbolize_frame(&interp as &dyn CodeSource, f).label())
                .collect();
            entries.push(serde_json::json!({
                "id": format!("{id:016x}"),
                "stack": hex(&stack_bytes(stack)),
                "frames": frames,
            }));
        }
        let memory = interp.memory().recorded().to_bytes();
        let doc = serde_json::json!({
            "python": py.label,
            "version": process.version.to_string(),
            "runtime_addr": process.runtime_addr,
            "stacks": entries,
            "memory": hex(&memory),
        });
        let path = repo_root().join(format!("agent/tests/fixtures/pystack-{}.json", py.label));
        std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
        eprintln!("wrote {} ({} stacks)", path.display(), entries.len());
    }
}
