//! A repair plan: what will change (a unified diff), why, how risky, how it
//! will be verified. Made from a structural finding of the repository's
//! current analysis and stored as `.pymedic/plans/<id>.json`.

use std::path::Path;

use pymedic_analyze::{Analysis, Options};
use pymedic_model::Finding;
use serde::{Deserialize, Serialize};

use crate::fixes;
use crate::store::{self, Event, Store, Who};
use crate::{RepairError, text};

/// One file a plan changes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileChange {
    /// Relative to the repository.
    pub path: String,
    pub before_sha256: String,
    pub after_sha256: String,
    /// The complete new contents.
    pub after: String,
}

/// How risky a plan is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Risk {
    Low,
    Medium,
    High,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: time::OffsetDateTime,
    pub created_by: Who,
    pub finding: Finding,
    /// e.g. `with_statement`, `try_finally`, `close_on_exits`,
    /// `asyncio_sleep`, `to_thread`, `bound_container`, `bound_cache`,
    /// `lock_order`.
    pub strategy: String,
    pub rationale: String,
    pub risk: Risk,
    pub risk_notes: Vec<String>,
    /// The checks `repair apply` runs, in order.
    pub verification: Vec<String>,
    /// Set when no safe automatic edit exists: why a person must decide.
    pub requires_review: Option<String>,
    pub files: Vec<FileChange>,
    pub diff: String,
    /// How many findings with the finding's fingerprint the analysis
    /// reported when the plan was made (apply checks that this drops).
    pub fingerprint_count: usize,
}

/// What a fix produces.
pub struct Fix {
    pub strategy: &'static str,
    pub rationale: String,
    pub risk: Risk,
    pub risk_notes: Vec<String>,
    pub requires_review: Option<String>,
    /// (path relative to the repo, new contents).
    pub changes: Vec<(String, String)>,
}

impl Fix {
    /// A plan that only explains: nothing is changed automatically.
    pub fn review(strategy: &'static str, rationale: String, why: String) -> Fix {
        Fix {
            strategy,
            rationale,
            risk: Risk::High,
            risk_notes: Vec::new(),
            requires_review: Some(why),
            changes: Vec::new(),
        }
    }
}

/// Analyses `repo`, finds finding `id` and makes a plan for it.
pub fn make(repo: &Path, id: &str) -> Result<Plan, RepairError> {
    let store = Store::open(repo)?;
    crate::apply::recover(&store)?;
    let analysis = pymedic_analyze::analyze(repo, &Options::default())?;
    let finding = analysis
        .finding(id)
        .cloned()
        .ok_or_else(|| RepairError::NoSuchFinding {
            id: id.to_owned(),
            repo: repo.to_path_buf(),
        })?;
    let plan = build(repo, &analysis, finding)?;
    store::write_json(&store.plan_path(&plan.id), &plan)?;
    let mut ev = Event::new(
        "planned",
        &plan.id,
        &plan.finding.id.0,
        plan.finding.kind.as_str(),
        format!("{} ({})", plan.finding.title, plan.strategy),
    );
    ev.files = plan.files.iter().map(|f| f.path.clone()).collect();
    store.record(&ev)?;
    Ok(plan)
}

fn build(repo: &Path, analysis: &Analysis, finding: Finding) -> Result<Plan, RepairError> {
    let fix = fixes::fix(repo, analysis, &finding)?;
    let mut files = Vec::new();
    let mut diff = String::new();
    for (path, after) in &fix.changes {
        let before = store::read(&repo.join(path))?;
        if let Some(message) = text::parse_error(after) {
            return Err(RepairError::WouldNotParse {
                path: path.clone(),
                message,
            });
        }
        let before_text = String::from_utf8_lossy(&before);
        diff.push_str(
            &similar::TextDiff::from_lines(before_text.as_ref(), after.as_str())
                .unified_diff()
                .context_radius(3)
                .header(&format!("a/{path}"), &format!("b/{path}"))
                .to_string(),
        );
        files.push(FileChange {
            path: path.clone(),
            before_sha256: store::sha256(&before),
            after_sha256: store::sha256(after.as_bytes()),
            after: after.clone(),
        });
    }
    let fingerprint = pymedic_analyze::fingerprint(&finding)
        .unwrap_or_default()
        .to_owned();
    let fingerprint_count = analysis
        .findings
        .iter()
        .filter(|f| pymedic_analyze::fingerprint(f) == Some(fingerprint.as_str()))
        .count();
    let now = pymedic_model::now();
    let seed = format!(
        "{}|{}|{}|{}",
        finding.id,
        fix.strategy,
        files
            .iter()
            .map(|f| f.after_sha256.as_str())
            .collect::<Vec<_>>()
            .join(","),
        now.unix_timestamp_nanos()
    );
    let id = format!("p{}", &store::sha256(seed.as_bytes())[..11]);
    let mut verification = vec![
        "preflight: every file unchanged since this plan (sha256), the edited files parse, no uncommitted changes in them, no merge/rebase in progress".to_owned(),
        "re-parse the edited files".to_owned(),
        format!(
            "re-run the analysis: findings with fingerprint `{fingerprint}` drop from {fingerprint_count}"
        ),
        "run the --verify command, if given (e.g. the test suite); any failure rolls back".to_owned(),
    ];
    if fix.requires_review.is_some() {
        verification.clear();
    }
    Ok(Plan {
        id,
        created_at: now,
        created_by: Who::current(),
        finding,
        strategy: fix.strategy.to_owned(),
        rationale: fix.rationale,
        risk: fix.risk,
        risk_notes: fix.risk_notes,
        verification,
        requires_review: fix.requires_review,
        files,
        diff,
        fingerprint_count,
    })
}

/// Loads a stored plan.
pub fn load(store: &Store, id: &str) -> Result<Plan, RepairError> {
    let path = store.plan_path(id);
    if !path.exists() || id.contains('/') || id.is_empty() {
        return Err(RepairError::NoSuchPlan {
            id: id.to_owned(),
            dir: store.dir.join("plans"),
        });
    }
    store::read_json(&path, "plan")
}
