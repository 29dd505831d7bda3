//! Times each phase of an analysis: `cargo run --release -p pymedic-analyze
//! --example phases -- /usr/lib/python3.11`.

use std::time::Instant;

fn main() {
    let root = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/usr/lib/python3.11".into());
    let t = Instant::now();
    let files = pymedic_analyze::source::discover(std::path::Path::new(&root)).expect("discover");
    println!("discover {:?} ({} files)", t.elapsed(), files.len());
    let texts: Vec<String> = files
        .iter()
        .map(|f| String::from_utf8_lossy(&std::fs::read(&f.path).unwrap()).into_owned())
        .collect();
    let t = Instant::now();
    for text in &texts {
        let p =
            ruff_python_parser::parse_unchecked_source(text, ruff_python_ast::PySourceType::Python);
        std::hint::black_box(p.errors().len());
    }
    println!("parse only, 1 thread {:?}", t.elapsed());
    let opts = pymedic_analyze::Options {
        threads: 1,
        progress: None,
    };
    let t = Instant::now();
    let a = pymedic_analyze::analyze(std::path::Path::new(&root), &opts).unwrap();
    println!(
        "analyze, 1 thread: total {:?}, parse+extract {:?}, {} findings",
        t.elapsed(),
        a.parse_time,
        a.findings.len()
    );
    let t = Instant::now();
    let g = pymedic_analyze::locks::graph(&a.program);
    println!("locks::graph {:?} ({} locks)", t.elapsed(), g.locks.len());
    let t = Instant::now();
    let r = pymedic_analyze::locks::resolved_acquires(&a.program);
    println!("resolved_acquires {:?} ({})", t.elapsed(), r.len());
    let t = Instant::now();
    let c = pymedic_analyze::containers::containers(&a.program);
    println!("containers {:?} ({})", t.elapsed(), c.len());
    let t = Instant::now();
    let mut n = 0;
    for (id, f) in a.program.functions() {
        let ctx = a.program.ctx(id);
        for c in &f.calls {
            if a.program.callee(ctx, &c.callee) != pymedic_analyze::symbols::Callee::Unknown {
                n += 1;
            }
        }
    }
    println!("resolve every call {:?} ({n} resolved)", t.elapsed());
    let opts = pymedic_analyze::Options::default();
    let t = Instant::now();
    let _ = pymedic_analyze::analyze(std::path::Path::new(&root), &opts).unwrap();
    println!("analyze, all threads {:?}", t.elapsed());
}
