//! `pymedic dump PID [--json] [--native] [--locals] [--blocking]`: every
//! thread's stack now, with its name, GIL, idle/active, what it waits for,
//! and the deadlock verdicts one look can give.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use pymedic_model::{Finding, Target};
use serde::Serialize;

use crate::deadlock::{self, Analysis, Chain, Deadlock};
use crate::dump::{DumpOptions, Dumper, FrameKind, Snapshot, ThreadDump};

#[derive(Debug, Args)]
pub struct DumpArgs {
    /// Process id of a running CPython 3.8–3.13 interpreter.
    pub pid: u32,
    /// Print JSON (INTERFACE.md): {"target", "threads", "deadlocks", ...}.
    #[arg(long)]
    pub json: bool,
    /// Interleave native (C) frames with the Python ones. Pauses the
    /// process (ptrace) while its stacks are unwound.
    #[arg(long)]
    pub native: bool,
    /// Show each frame's local variables (bounded reprs).
    #[arg(long)]
    pub locals: bool,
    /// Pause the process while reading it, for a fully consistent snapshot.
    /// By default pymedic never stops the target.
    #[arg(long)]
    pub blocking: bool,
    /// Skip lock identification and deadlock analysis (to measure their
    /// cost in `cargo xtask bench dump`).
    #[arg(long, hide = true)]
    pub no_verdicts: bool,
}

/// `pymedic dump --json`.
#[derive(Debug, Serialize)]
pub struct DumpJson<'a> {
    pub target: &'a Target,
    pub build: &'a str,
    /// True when the process was paused while read (--blocking, --native).
    pub paused: bool,
    pub threads: &'a [ThreadDump],
    pub deadlocks: &'a [Deadlock],
    /// Threads blocked behind a holder that is not waiting for a lock.
    pub chains: &'a [Chain],
    /// Each deadlock as a `deadlock` Finding.
    pub findings: Vec<Finding>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub notes: &'a [String],
}

/// Pause between the two snapshots that must agree before a deadlock is
/// reported.
const CONFIRM_AFTER: Duration = Duration::from_millis(150);

pub fn run(args: DumpArgs) -> anyhow::Result<ExitCode> {
    let opts = DumpOptions {
        native: args.native,
        locals: args.locals,
        blocking: args.blocking,
        no_verdicts: args.no_verdicts,
        holds: false,
    };
    if (args.blocking || args.native) && !args.json {
        eprintln!(
            "pymedic: pausing process {} while reading it ({})",
            args.pid,
            if args.native {
                "--native"
            } else {
                "--blocking"
            }
        );
    }
    let mut dumper = Dumper::new(args.pid)?;
    let (snap, analysis) = snapshot_with_verdicts(&mut dumper, &opts)?;
    let findings: Vec<Finding> = analysis
        .deadlocks
        .iter()
        .map(|d| deadlock::to_finding(d, &snap.target))
        .collect();
    if args.json {
        super::print_json(&DumpJson {
            target: &snap.target,
            build: &snap.build,
            paused: snap.paused,
            threads: &snap.threads,
            deadlocks: &analysis.deadlocks,
            chains: &analysis.chains,
            findings,
            notes: &snap.notes,
        })?;
    } else {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(e) = out.write_all(render(&snap, &analysis).as_bytes())
            && e.kind() != std::io::ErrorKind::BrokenPipe
        {
            return Err(e.into());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A snapshot and its verdicts; a deadlock is only reported when a second
/// snapshot shortly after shows the same cycle.
pub fn snapshot_with_verdicts(
    dumper: &mut Dumper,
    opts: &DumpOptions,
) -> Result<(Snapshot, Analysis), crate::dump::DumpError> {
    let mut snap = dumper.snapshot(opts)?;
    if opts.no_verdicts {
        return Ok((snap, Analysis::default()));
    }
    let mut analysis = deadlock::analyze(&snap);
    if !analysis.deadlocks.is_empty() {
        std::thread::sleep(CONFIRM_AFTER);
        let again_opts = DumpOptions {
            native: false,
            locals: false,
            ..opts.clone()
        };
        let second = dumper.snapshot(&again_opts)?;
        let second_analysis = deadlock::analyze(&second);
        let confirmed = deadlock::confirm(&analysis.deadlocks, second_analysis.deadlocks);
        analysis.deadlocks = confirmed;
    }
    deadlock::annotate(&mut snap, &analysis);
    Ok((snap, analysis))
}

fn thread_label(t: &ThreadDump) -> String {
    format!("{:?} (tid {})", t.name, t.tid)
}

/// The text report: verdicts first (one screen), then every thread.
pub fn render(s: &Snapshot, a: &Analysis) -> String {
    let mut o = String::new();
    let t = &s.target;
    let _ = writeln!(
        o,
        "Process {} {} — Python {} ({}), {} thread(s){}",
        t.pid,
        t.exe,
        t.python.as_deref().unwrap_or("?"),
        s.build,
        s.threads.len(),
        if s.paused { ", read while paused" } else { "" }
    );
    for n in &s.notes {
        let _ = writeln!(o, "note: {n}");
    }
    let by_tid = crate::dump::threads_by_tid(s);
    let name_of = |tid: u32| {
        by_tid
            .get(&tid)
            .map_or(format!("tid {tid}"), |t| thread_label(t))
    };
    for d in &a.deadlocks {
        let _ = writeln!(
            o,
            "\nDEADLOCK: {} ({} thread{}{})",
            if d.kind == "self" {
                "a thread waits for a lock it holds"
            } else {
                "threads wait for each other in a cycle"
            },
            d.threads.len(),
            if d.threads.len() == 1 { "" } else { "s" },
            if d.confirmed {
                ", seen in two snapshots"
            } else {
                ""
            }
        );
        for th in &d.threads {
            let lock = &th.waiting_for.lock;
            if lock.is_thread_end() {
                // A join: the joined thread ends only when it stops waiting.
                let _ = writeln!(
                    o,
                    "  thread {:?} (tid {}) waits at {}\n      for thread {} to end (join)",
                    th.name,
                    th.tid,
                    th.waiting_at,
                    name_of(th.waiting_for.holder_tid)
                );
            } else {
                let _ = writeln!(
                    o,
                    "  thread {:?} (tid {}) waits at {}\n      for {} ({:?} {}) held by {}",
                    th.name,
                    th.tid,
                    th.waiting_at,
                    lock.name,
                    lock.kind,
                    lock.id,
                    name_of(th.waiting_for.holder_tid)
                );
            }
            for h in &th.holds {
                let _ = writeln!(
                    o,
                    "      it holds {}, acquired at {}",
                    h.lock.name, h.acquired_at
                );
            }
        }
    }
    // Chains grouped by the thread they end at: "N threads wait behind X".
    let mut ends: Vec<(u32, Vec<&Chain>)> = Vec::new();
    for c in &a.chains {
        let last = c.tids.last().copied().unwrap_or(0);
        match ends.iter_mut().find(|(t, _)| *t == last) {
            Some((_, v)) => v.push(c),
            None => ends.push((last, vec![c])),
        }
    }
    for (last, chains) in &ends {
        let waiters: Vec<String> = chains.iter().map(|c| name_of(c.tids[0])).collect();
        let c = chains[0];
        let _ = writeln!(
            o,
            "\nBLOCKED (not a deadlock): {} wait{} behind {}, which is not waiting for a lock ({}{})",
            waiters.join(", "),
            if waiters.len() == 1 { "s" } else { "" },
            name_of(*last),
            c.ends_in,
            c.ends_at
                .as_ref()
                .map(|l| format!(" at {l}"))
                .unwrap_or_default()
        );
        if let Some(t) = by_tid.get(last) {
            for h in &t.holds {
                let _ = writeln!(
                    o,
                    "  it holds {}, acquired at {}",
                    h.lock.name, h.acquired_at
                );
            }
        }
    }
    for th in &s.threads {
        let mut flags = vec![if th.active { "active" } else { "idle" }];
        if th.gil {
            flags.push("holds the GIL");
        }
        let _ = writeln!(o, "\nThread {} [{}]", thread_label(th), flags.join(", "));
        if let Some(w) = &th.waiting {
            let mut line = format!("  waiting: {}", w.kind.as_str());
            if let Some(d) = &w.detail {
                let _ = write!(line, " — {d}");
            }
            if let Some(h) = w.holder_tid {
                let _ = write!(line, ", held by {}", name_of(h));
            }
            if w.timed {
                line.push_str(" (with timeout)");
            }
            let _ = writeln!(o, "{line}");
        }
        for h in &th.holds {
            let _ = writeln!(
                o,
                "  holds: {} ({:?}), acquired at {}",
                h.lock.name, h.lock.kind, h.acquired_at
            );
        }
        for f in &th.frames {
            match f.kind {
                FrameKind::Python => {
                    let _ = writeln!(o, "    {} ({}:{})", f.function, f.file, f.line);
                }
                FrameKind::Native => {
                    let line = if f.line > 0 {
                        format!(":{}", f.line)
                    } else {
                        String::new()
                    };
                    let _ = writeln!(o, "    [native] {} ({}{line})", f.function, f.file);
                }
            }
            for l in f.locals.iter().flatten() {
                let _ = writeln!(o, "        {} = {}", l.name, l.repr);
            }
        }
    }
    o
}
