//! `pymedic repair plan|apply|rollback|history`: reviewed, reversible
//! source repairs for structural findings. Only source files and the
//! repository's `.pymedic/` are written, never a running process.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use pymedic_repair::{ApplyOptions, Plan};

#[derive(Debug, Args)]
pub struct RepairArgs {
    #[command(subcommand)]
    pub command: RepairCommand,
}

#[derive(Debug, Subcommand)]
pub enum RepairCommand {
    /// Make a plan for a finding of `pymedic analyze REPO`: diff, rationale,
    /// risk, verification. Stored in REPO/.pymedic/plans/.
    Plan {
        /// The repository (the same path given to `pymedic analyze`).
        #[arg(long)]
        repo: PathBuf,
        /// The finding's id, as printed by `pymedic analyze`.
        #[arg(long)]
        finding: String,
        #[arg(long)]
        json: bool,
    },
    /// Apply a plan: preflight, journaled atomic write, verify, commit; any
    /// failure rolls back and exits non-zero.
    Apply {
        #[arg(long)]
        repo: PathBuf,
        plan: String,
        /// A command that must pass after the edit (run with `sh -c` in the repo).
        #[arg(long)]
        verify: Option<String>,
        /// Seconds the --verify command may take.
        #[arg(long, default_value_t = 1800)]
        verify_timeout: u64,
        /// Why (recorded in the history and the commit).
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Restore the files an applied plan changed, byte for byte, and commit that.
    Rollback {
        #[arg(long)]
        repo: PathBuf,
        plan: String,
        #[arg(long)]
        reason: Option<String>,
        /// Roll back even if the files changed after the apply.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Every plan, apply, failed apply, rollback and recovery: who, when, why.
    History {
        #[arg(long)]
        repo: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: RepairArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        RepairCommand::Plan {
            repo,
            finding,
            json,
        } => {
            report_recovery(&repo)?;
            let plan = pymedic_repair::plan::make(&repo, &finding)?;
            if json {
                super::print_json(&plan)?;
            } else {
                print_plan(&plan);
            }
        }
        RepairCommand::Apply {
            repo,
            plan,
            verify,
            verify_timeout,
            reason,
            json,
        } => {
            report_recovery(&repo)?;
            let opts = ApplyOptions {
                verify,
                verify_timeout: Duration::from_secs(verify_timeout),
                reason,
            };
            let done = pymedic_repair::apply::apply(&repo, &plan, &opts)?;
            if json {
                super::print_json(&done)?;
            } else {
                println!("applied plan {} to {}", done.plan, done.files.join(", "));
                for c in &done.checks {
                    println!("  ✓ {c}");
                }
                match &done.commit {
                    Some(c) => println!("committed {c}"),
                    None => println!("not a git repository: nothing committed"),
                }
            }
        }
        RepairCommand::Rollback {
            repo,
            plan,
            reason,
            force,
            json,
        } => {
            report_recovery(&repo)?;
            let done = pymedic_repair::apply::rollback(&repo, &plan, reason, force)?;
            if json {
                super::print_json(&done)?;
            } else {
                println!(
                    "rolled back plan {}: restored {}",
                    done.plan,
                    done.files.join(", ")
                );
                if let Some(c) = &done.commit {
                    println!("committed {c}");
                }
            }
        }
        RepairCommand::History { repo, json } => {
            let (events, recovery) = pymedic_repair::history(&repo)?;
            if let Some(r) = &recovery {
                eprintln!(
                    "pymedic: recovered an interrupted {} of plan {}: restored {}",
                    r.op,
                    r.plan,
                    r.restored.join(", ")
                );
            }
            if json {
                super::print_json(&events)?;
            } else {
                let mut table = Table::new();
                table.load_preset(UTF8_FULL_CONDENSED);
                table.set_header(["when", "event", "plan", "finding", "who", "why", "commit"]);
                for e in &events {
                    table.add_row([
                        e.time
                            .format(&time::format_description::well_known::Rfc3339)
                            .unwrap_or_default(),
                        e.event.clone(),
                        e.plan.clone(),
                        format!("{} {}", e.kind, e.finding),
                        format!("{}@{} (uid {})", e.who.user, e.who.host, e.who.uid),
                        e.why.clone(),
                        e.commit
                            .as_deref()
                            .map(|c| c[..c.len().min(12)].to_owned())
                            .unwrap_or_default(),
                    ]);
                }
                println!("{table}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn report_recovery(repo: &std::path::Path) -> anyhow::Result<()> {
    if let Some(r) = pymedic_repair::recover(repo)? {
        eprintln!(
            "pymedic: an interrupted {} of plan {} ({}) was {}: {}",
            r.op,
            r.plan,
            r.state,
            if r.completed {
                "completed"
            } else {
                "rolled back"
            },
            if r.restored.is_empty() {
                "no file needed restoring".to_owned()
            } else {
                format!("restored {}", r.restored.join(", "))
            }
        );
    }
    Ok(())
}

fn print_plan(plan: &Plan) {
    println!(
        "plan {} for {} {}",
        plan.id, plan.finding.kind, plan.finding.id
    );
    println!("  {}", plan.finding.title);
    println!("strategy: {}", plan.strategy);
    println!("rationale: {}", plan.rationale);
    println!("risk: {:?}", plan.risk);
    for n in &plan.risk_notes {
        println!("  - {n}");
    }
    if let Some(why) = &plan.requires_review {
        println!("requires review (cannot be applied automatically): {why}");
        return;
    }
    println!("verification:");
    for v in &plan.verification {
        println!("  - {v}");
    }
    println!();
    print!("{}", plan.diff);
    println!();
    println!(
        "apply with: pymedic repair apply --repo <REPO> {} [--verify \"<test command>\"]",
        plan.id
    );
}
