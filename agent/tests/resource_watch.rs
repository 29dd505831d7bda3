//! Hardware write watchpoints armed by the resource session stop after the
//! hits asked for (the kernel's `PERF_EVENT_IOC_REFRESH` limit), and record
//! the stack of the writing line. Needs root.

use std::time::Duration;

use pymedic::engine::targets::TargetInfo;
use pymedic::resource::session::{self, SessionConfig};
use pymedic_common::resource::FEAT_MEMORY;
use pymedic_integration::{PyProc, pythons, require_root};

#[test]
fn watchpoints_disarm_after_their_hits() {
    if !require_root("watchpoints_disarm_after_their_hits") {
        return;
    }
    let py = pythons()
        .into_iter()
        .find(|p| p.minor == 12)
        .unwrap_or_else(|| pythons()[0].clone());
    let p = PyProc::start(&py, "resource/appender.py", &[]);
    let addr = u64::from_str_radix(
        p.ready
            .split_whitespace()
            .nth(2)
            .unwrap()
            .trim_start_matches("0x"),
        16,
    )
    .unwrap();
    let target = TargetInfo::inspect(p.pid()).unwrap();
    let s = session::shared(SessionConfig::default()).unwrap();
    let mut s = s.lock().unwrap();
    s.add(&target, FEAT_MEMORY).unwrap();
    let threads = s.arm_watch(p.pid(), addr, 5, 8).unwrap();
    assert!(threads >= 1);
    std::thread::sleep(Duration::from_millis(1500));
    s.poll().unwrap();
    let hits = s.watch_hits(p.pid(), addr).to_vec();
    let total: u64 = hits.iter().map(|h| h.1).sum();
    assert!(total >= 1, "no hits");
    assert!(
        total <= 5 * threads as u64,
        "{total} hits: the watchpoint did not disarm"
    );
    let frames = &hits[0].0;
    assert!(
        frames.iter().any(|f| f.file.ends_with("appender.py")),
        "{frames:?}"
    );
}
