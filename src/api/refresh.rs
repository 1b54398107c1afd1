//! RefreshSchedule: cron-driven re-enrichment of stale rows of one table.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::Duration;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::LocalObjectRef;

/// What to do when a run is due while the previous one is still going.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum ConcurrencyPolicy {
    /// Run concurrently (rows are never enqueued twice).
    Allow,
    /// Skip the new run.
    #[default]
    Forbid,
    /// Cancel the running one and start the new run.
    Replace,
}

impl ConcurrencyPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "Allow",
            Self::Forbid => "Forbid",
            Self::Replace => "Replace",
        }
    }
}

/// Desired state of a RefreshSchedule.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kiln.dev",
    version = "v1alpha1",
    kind = "RefreshSchedule",
    namespaced,
    status = "RefreshScheduleStatus",
    shortname = "rsched",
    shortname = "refresh",
    category = "kiln",
    doc = "Cron-driven re-enrichment of one EnrichmentTable's rows older than maxAge, bounded in rows and credits per run. The operator runs it as a CronJob.",
    validation = Rule::new("self.metadata.name.size() <= 37").message("RefreshSchedule names must be at most 37 characters: its CronJob is <name>-refresh (CronJob names are limited to 52) and manual runs are <name>-refresh-manual-<hash> (Job names are limited to 63)"),
    printcolumn = r#"{"name":"Table","type":"string","jsonPath":".spec.tableRef.name"}"#,
    printcolumn = r#"{"name":"Schedule","type":"string","jsonPath":".spec.schedule"}"#,
    printcolumn = r#"{"name":"Suspend","type":"boolean","jsonPath":".spec.suspend"}"#,
    printcolumn = r#"{"name":"Last Run","type":"date","jsonPath":".status.lastScheduleTime"}"#,
    printcolumn = r#"{"name":"Next Run","type":"string","jsonPath":".status.nextScheduleTime"}"#,
    printcolumn = r#"{"name":"Last Outcome","type":"string","jsonPath":".status.lastRun.outcome"}"#,
    printcolumn = r#"{"name":"Requeued","type":"integer","jsonPath":".status.lastRun.requeued","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RefreshScheduleSpec {
    /// The EnrichmentTable (same namespace) whose rows are refreshed.
    pub table_ref: LocalObjectRef,
    /// Cron expression (5 fields), e.g. `0 3 * * 1` for Mondays at 03:00.
    #[x_kube(validation = Rule::new("self.split(' ').filter(f, f != '').size() == 5 || self.startsWith('@')").message("schedule must be a 5-field cron expression such as '0 3 * * *' or a macro such as @daily"))]
    #[schemars(length(min = 1, max = 128))]
    pub schedule: String,
    /// IANA time zone for the schedule; the controller manager's zone when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Suspends future runs.
    #[serde(default)]
    pub suspend: bool,
    /// Overlapping runs policy.
    #[serde(default)]
    pub concurrency_policy: ConcurrencyPolicy,
    /// Deadline in seconds for starting a run that missed its time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub starting_deadline_seconds: Option<i64>,
    /// Finished runs to keep.
    #[serde(default = "default_successful_history")]
    #[schemars(range(min = 0, max = 100))]
    pub successful_jobs_history_limit: i32,
    /// Failed runs to keep.
    #[serde(default = "default_failed_history")]
    #[schemars(range(min = 0, max = 100))]
    pub failed_jobs_history_limit: i32,
    /// Rows last enriched longer ago than this are stale. Go duration, e.g. `2160h` (90 days).
    #[x_kube(validation = Rule::new(super::common::POSITIVE_DURATION_RULE).message("maxAge must be a positive duration such as 2160h"))]
    #[schemars(with = "String", length(min = 2, max = 32))]
    pub max_age: Duration,
    /// Rows re-enriched per run at most.
    #[schemars(range(min = 1, max = 1000000))]
    pub max_rows: u32,
    /// Data credits one run may reserve at most.
    #[x_kube(validation = Rule::new("self > 0.0").message("maxCredits must be positive"))]
    pub max_credits: f64,
}

fn default_successful_history() -> i32 {
    3
}
fn default_failed_history() -> i32 {
    1
}

/// Observed state of a RefreshSchedule.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RefreshScheduleStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Provisioned, TableResolved, Suspended.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// When a run was last started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// When a run last succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_time: Option<Time>,
    /// When the next run is due (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<String>,
    /// What the last finished run did (written by the run itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<RefreshRunCounts>,
    /// The value of the `kiln.dev/refresh-now` annotation last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_manual_trigger: Option<String>,
}

/// Annotating a RefreshSchedule with this key (any new value, e.g. a
/// timestamp) starts a run now, like `kubectl create job --from=cronjob/...`.
pub const REFRESH_NOW_ANNOTATION: &str = "kiln.dev/refresh-now";

/// How a refresh run ended.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum RefreshOutcome {
    /// Stale rows (possibly none) were re-enqueued.
    #[default]
    Succeeded,
    /// The budget refused the run's credits (exhausted, paused or breaker open).
    SkippedForBudget,
}

/// What one refresh run did.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RefreshRunCounts {
    /// Stale rows the run looked at (at most maxRows).
    pub selected: u64,
    /// Rows re-enqueued for enrichment.
    pub requeued: u64,
    /// Selected rows left for a later run because maxCredits or the budget did not cover them.
    pub skipped_for_budget: u64,
    pub outcome: RefreshOutcome,
    /// A human-readable summary.
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
}
