//! Times the analysis stages in-process, for profiling:
//! `cargo run --release -p pymedic-analyze --example analyze_timing -- TREE [ROUNDS]`.
//! Prints, per round, discovery, parse-only (ruff on every file, all
//! threads), and the full analysis (parse + extract + whole-program passes),
//! then the medians, with the CPU time of the parse-only and full runs. With `ANALYZE_TIMING_FINDINGS=FILE` it also writes the
//! findings as JSON (to check that an optimisation changed none).

/// As in the `pymedic` binary.
#[global_allocator]
static GLOBAL: pymedic_analyze::arena::ParseArena<mimalloc::MiMalloc> =
    pymedic_analyze::arena::ParseArena(mimalloc::MiMalloc);

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let tree = PathBuf::from(args.next().unwrap_or_else(|| "/usr/lib/python3.11".into()));
    let rounds: usize = args.next().map_or(5, |r| r.parse().expect("rounds"));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (mut disc, mut parse, mut parse_cpus, mut full, mut extract, mut passes, mut cpus) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let t = Instant::now();
        let files = pymedic_analyze::source::discover(&tree).expect("discover");
        disc.push(t.elapsed().as_secs_f64());

        let t = Instant::now();
        let c = cpu();
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    while let Some(f) = files.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let text = std::fs::read_to_string(&f.path).unwrap_or_default();
                        pymedic_analyze::arena::parse_python(&text, |p| {
                            std::hint::black_box(p.errors().len())
                        });
                    }
                });
            }
        });
        parse.push(t.elapsed().as_secs_f64());
        parse_cpus.push(cpu() - c);

        let t = Instant::now();
        let c = cpu();
        let a = pymedic_analyze::analyze(&tree, &Default::default()).expect("analyze");
        full.push(t.elapsed().as_secs_f64());
        cpus.push(cpu() - c);
        extract.push(a.parse_time.as_secs_f64());
        passes.push((a.total_time - a.parse_time).as_secs_f64());
        if let Some(out) = std::env::var_os("ANALYZE_TIMING_FINDINGS") {
            let json = serde_json::to_vec(&a.findings).expect("serialize findings");
            std::fs::write(out, json).expect("write findings");
        }
        std::mem::forget(a);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1e3
    };
    println!(
        "median of {rounds}: discover {:.1} ms, ruff parse only {:.1} ms (cpu {:.1} ms), \
         parse+extract {:.1} ms, whole-program passes {:.1} ms, full analyze {:.1} ms (cpu {:.1} ms)",
        med(&mut disc),
        med(&mut parse),
        med(&mut parse_cpus),
        med(&mut extract),
        med(&mut passes),
        med(&mut full),
        med(&mut cpus)
    );
}

/// CPU seconds used by every thread of the process so far.
fn cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
