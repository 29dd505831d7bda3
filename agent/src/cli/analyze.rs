//! `pymedic analyze PATH [--json] [--graph dot|json] [--impact MODULE_OR_FILE]`:
//! static analysis of a Python source tree (the structural layer).

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use pymedic_analyze::{Analysis, ImportGraph, Options};
use pymedic_model::{Finding, Severity};

#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// A Python source tree (directory) or one .py file.
    pub path: PathBuf,
    /// Print JSON: {"root", "files", "lines", "seconds", "findings": [Finding...]}.
    #[arg(long)]
    pub json: bool,
    /// Print the module/import graph instead of findings.
    #[arg(long, value_enum)]
    pub graph: Option<GraphFormat>,
    /// List what depends on this module (dotted name) or file, directly and
    /// transitively, instead of findings.
    #[arg(long, value_name = "MODULE_OR_FILE")]
    pub impact: Option<String>,
    /// Only report findings at least this severe (info, low, medium, high, critical).
    #[arg(long, default_value = "info")]
    pub min_severity: Severity,
    /// Only report findings of these kinds (repeatable), e.g. fd_leak.
    #[arg(long = "kind")]
    pub kinds: Vec<String>,
    /// Exit with status 3 when a finding at least this severe is reported.
    #[arg(long)]
    pub fail_on: Option<Severity>,
    /// Parser threads (default: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Benchmarking: only read and parse the files (no analysis) and print
    /// {"files", "lines", "bytes", "seconds"}: the parser's floor.
    #[arg(long, hide = true)]
    pub parse_only: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum GraphFormat {
    Dot,
    Json,
}

fn progress(done: usize, total: usize) {
    if total >= 500 && (done.is_multiple_of(250) || done == total) {
        eprint!("\rpymedic: parsed {done}/{total} files");
        if done == total {
            eprintln!();
        }
    }
}

/// `--json` output, written straight from the analysis (no intermediate
/// JSON tree).
#[derive(serde::Serialize)]
struct Report<'a> {
    root: &'a std::path::Path,
    files: usize,
    lines: u64,
    seconds: f64,
    parse_seconds: f64,
    findings: &'a [&'a Finding],
}

pub fn run(args: AnalyzeArgs) -> anyhow::Result<ExitCode> {
    let opts = Options {
        threads: args.threads,
        progress: std::io::stderr()
            .is_terminal()
            .then_some(progress as fn(usize, usize)),
    };
    if args.parse_only {
        let p = pymedic_analyze::parse_only(&args.path, &opts)
            .with_context(|| format!("parse {}", args.path.display()))?;
        super::print_json(&serde_json::json!({
            "files": p.files,
            "lines": p.lines,
            "bytes": p.bytes,
            "seconds": p.time.as_secs_f64(),
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    let analysis = pymedic_analyze::analyze(&args.path, &opts)
        .with_context(|| format!("analyze {}", args.path.display()))?;

    if let Some(what) = &args.impact {
        let module = ImportGraph::find_module(&analysis.program, &analysis.root, what)
            .map_err(anyhow::Error::new)?;
        let impact = analysis.graph.impact(&analysis.program, module);
        if args.json {
            super::print_json(&impact)?;
        } else {
            println!("{} ({})", impact.module, impact.file);
            println!("direct dependents: {}", impact.direct.len());
            for d in &impact.direct {
                println!("  {} ({}:{})", d.module, d.file, d.line);
            }
            println!("transitive dependents: {}", impact.transitive.len());
            for d in &impact.transitive {
                println!(
                    "  {} via {} (depth {})",
                    d.module,
                    d.via.join(" → "),
                    d.depth
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(format) = args.graph {
        match format {
            GraphFormat::Dot => print!("{}", analysis.graph.to_dot(&analysis.program)),
            GraphFormat::Json => super::print_json(&analysis.graph.to_json(&analysis.program))?,
        }
        return Ok(ExitCode::SUCCESS);
    }

    let findings: Vec<&Finding> = analysis
        .findings
        .iter()
        .filter(|f| f.severity >= args.min_severity)
        .filter(|f| args.kinds.is_empty() || args.kinds.iter().any(|k| k == f.kind.as_str()))
        .collect();
    if args.json {
        super::print_json(&Report {
            root: &analysis.root,
            files: analysis.files,
            lines: analysis.lines,
            seconds: analysis.total_time.as_secs_f64(),
            parse_seconds: analysis.parse_time.as_secs_f64(),
            findings: &findings,
        })?;
    } else {
        print_table(&analysis, &findings);
    }
    let fail = args
        .fail_on
        .is_some_and(|s| findings.iter().any(|f| f.severity >= s));
    drop(findings);
    // The process exits next: freeing every file's facts one by one would
    // only cost time.
    std::mem::forget(analysis);
    Ok(if fail {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_table(analysis: &Analysis, findings: &[&Finding]) {
    if !findings.is_empty() {
        let mut table = Table::new();
        table.load_preset(UTF8_FULL_CONDENSED);
        table.set_header(["severity", "kind", "where", "finding", "id"]);
        for f in findings {
            let mut what = f.title.clone();
            for r in f.related.iter().take(6) {
                what.push_str(&format!("\n  {}:{} {}", r.file, r.line, r.role));
            }
            if f.related.len() > 6 {
                what.push_str(&format!(
                    "\n  … {} more sites (--json)",
                    f.related.len() - 6
                ));
            }
            table.add_row([
                f.severity.to_string(),
                f.kind.to_string(),
                format!(
                    "{}:{}\n{}",
                    f.location.file, f.location.line, f.location.function
                ),
                what,
                f.id.to_string(),
            ]);
        }
        println!("{table}");
    }
    let edges = analysis.graph.edges.len();
    println!(
        "{} files, {} lines, {} modules, {} import edges analysed in {:.2}s: {} finding(s)",
        analysis.files,
        analysis.lines,
        analysis.program.modules.len(),
        edges,
        analysis.total_time.as_secs_f64(),
        findings.len()
    );
}
