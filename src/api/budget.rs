//! CreditBudget: a namespace's Clay credit cap per period.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::Duration;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::table::CreditCost;

/// Length of a budget period.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum Period {
    /// Midnight to midnight in the budget's time zone.
    Daily,
    /// Monday 00:00 to the next Monday 00:00 in the budget's time zone.
    Weekly,
    /// The first of the month 00:00 to the first of the next month.
    #[default]
    Monthly,
}

/// What tables drawing on an exhausted budget do.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum OnExhausted {
    /// Stop consuming; the source keeps the rows until the budget allows more.
    #[default]
    Pause,
    /// Send rows to the dead-letter destination with reason BudgetExhausted (replayable).
    DeadLetter,
    /// Refuse synchronous callers with a 402-style error.
    Reject,
}

/// Desired state of a CreditBudget.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kiln.dev",
    version = "v1alpha1",
    kind = "CreditBudget",
    namespaced,
    status = "CreditBudgetStatus",
    shortname = "cb",
    shortname = "budget",
    category = "kiln",
    doc = "A namespace's Clay credit cap per period (data credits, actions or both), with warning thresholds, what tables do when it is exhausted and a circuit breaker on Clay failures. Its status is the credit ledger.",
    printcolumn = r#"{"name":"Limit","type":"number","jsonPath":".spec.limits.dataCredits"}"#,
    printcolumn = r#"{"name":"Used","type":"number","jsonPath":".status.used.dataCredits"}"#,
    printcolumn = r#"{"name":"Remaining","type":"number","jsonPath":".status.remaining.dataCredits"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Exhausts","type":"date","jsonPath":".status.forecast.exhaustsAt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CreditBudgetSpec {
    /// Length of a period; usage resets at each period start.
    #[serde(default)]
    pub period: Period,
    /// IANA time zone the period boundaries are computed in, e.g. `Europe/Berlin`.
    #[serde(default = "default_time_zone")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: String,
    /// Caps per Clay meter; at least one must be set.
    pub limits: BudgetLimits,
    /// Percentages of a limit at which a Warning event and condition are raised once a period.
    #[serde(default = "default_warning_thresholds")]
    #[schemars(length(max = 10))]
    #[x_kube(
        validation = Rule::new("self.all(t, t >= 1 && t <= 100)").message("warning thresholds must be percentages between 1 and 100"),
        validation = Rule::new("self.isSorted()").message("warning thresholds must be in ascending order"),
    )]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub warning_thresholds: Vec<u32>,
    /// What tables do when the budget is exhausted.
    #[serde(default)]
    pub on_exhausted: OnExhausted,
    /// Stops all spend immediately while true.
    #[serde(default)]
    pub paused: bool,
    /// Opens when Clay keeps failing, so errors do not burn credits or quota.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerSpec,
    /// How many past periods to keep in status.history.
    #[serde(default = "default_history_limit")]
    #[schemars(range(min = 0, max = 24))]
    pub history_limit: u32,
    /// The Clay workspace this budget's tables send to. Clay limits inbound
    /// rows per workspace, so its rate is shared by every process of every
    /// table drawing on a budget that names it (in this namespace), split
    /// fairly by demand and within each table's own clay.rateLimit. Without
    /// it, each table's processes share that table's clay.rateLimit alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<ClayWorkspace>,
}

/// A Clay workspace and its inbound rate limit.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClayWorkspace {
    /// A name for the workspace (a DNS label, e.g. `acme-prod`): budgets of
    /// this namespace that name the same workspace share its limit.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("workspace.name must be a DNS label: lower-case letters, digits and '-'"))]
    pub name: String,
    /// Rows per second Clay accepts from the whole workspace (about 10,
    /// burst 20). When budgets naming it disagree, the smallest holds.
    #[serde(default)]
    pub rate_limit: super::table::RateLimit,
}

fn default_time_zone() -> String {
    "UTC".to_string()
}
fn default_warning_thresholds() -> Vec<u32> {
    vec![75, 90]
}
fn default_history_limit() -> u32 {
    6
}

/// Caps per Clay meter.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.dataCredits) || has(self.actions)").message("set limits.dataCredits, limits.actions, or both"))]
pub struct BudgetLimits {
    /// Data credits per period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("limits.dataCredits must be positive"))]
    pub data_credits: Option<f64>,
    /// Actions per period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0").message("limits.actions must be positive"))]
    pub actions: Option<u64>,
}

/// The failure circuit breaker.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakerSpec {
    /// Percentage of failed Clay calls within the window that opens the
    /// breaker. A failed call is an error answer (a 5xx, a 4xx other than
    /// 429), no answer, or a result that never came; a 429 is Clay pacing
    /// the workspace and is not counted.
    #[serde(default = "default_error_ratio")]
    #[schemars(range(min = 1, max = 100))]
    pub error_percent: u32,
    /// Calls within the window before the ratio is considered.
    #[serde(default = "default_min_calls")]
    #[schemars(range(min = 1))]
    pub min_calls: u32,
    /// Sliding window the ratio is computed over.
    #[serde(default = "default_window")]
    #[x_kube(validation = Rule::new(super::common::POSITIVE_DURATION_RULE).message("window must be a positive duration such as 60s"))]
    #[schemars(with = "String", length(min = 2, max = 32))]
    pub window: Duration,
    /// How long the breaker stays Open before probing (HalfOpen).
    #[serde(default = "default_cooldown")]
    #[x_kube(validation = Rule::new(super::common::POSITIVE_DURATION_RULE).message("cooldown must be a positive duration such as 30s"))]
    #[schemars(with = "String", length(min = 2, max = 32))]
    pub cooldown: Duration,
    /// Calls allowed while HalfOpen; all must succeed to close the breaker.
    #[serde(default = "default_half_open_probes")]
    #[schemars(range(min = 1, max = 1000))]
    pub half_open_probes: u32,
}

impl Default for CircuitBreakerSpec {
    fn default() -> Self {
        Self {
            error_percent: default_error_ratio(),
            min_calls: default_min_calls(),
            window: default_window(),
            cooldown: default_cooldown(),
            half_open_probes: default_half_open_probes(),
        }
    }
}
fn default_error_ratio() -> u32 {
    50
}
fn default_min_calls() -> u32 {
    20
}
fn default_window() -> Duration {
    std::time::Duration::from_secs(60).into()
}
fn default_cooldown() -> Duration {
    std::time::Duration::from_secs(30).into()
}
fn default_half_open_probes() -> u32 {
    5
}

/// One-word summary for `kubectl get`.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum BudgetState {
    /// Spending normally.
    #[default]
    Active,
    /// A warning threshold was crossed this period.
    Warning,
    /// A limit was reached; tables behave per onExhausted.
    Exhausted,
    /// spec.paused is true.
    Paused,
    /// The circuit breaker is open.
    BreakerOpen,
    /// The spec cannot be acted on (see conditions).
    Invalid,
}

/// Circuit breaker states.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum BreakerState {
    #[default]
    Closed,
    Open,
    HalfOpen,
}

/// When the budget runs out at the rate it is spent (data credits).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BudgetForecast {
    /// Data credits committed per hour over the last hour.
    pub data_credits_per_hour_last_hour: f64,
    /// ... and over the last day (or as long as observed).
    pub data_credits_per_hour_last_day: f64,
    /// When the period's data credits are all spent at the last hour's
    /// rate (new draws are refused a little earlier, once what remains is
    /// held by leases); absent when not this period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exhausts_at: Option<Time>,
}

/// Observed state of a CreditBudget.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CreditBudgetStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Exhausted, Warning, BreakerOpen.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// One-word summary.
    #[serde(default)]
    pub state: BudgetState,
    /// Start of the current period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_start: Option<Time>,
    /// End of the current period (exclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_end: Option<Time>,
    /// Total spend this period: rows submitted to Clay, at their reported
    /// cost once their result arrived, else at their worst case.
    #[serde(default)]
    #[schemars(with = "crate::api::table::CreditTotal")]
    pub used: CreditCost,
    /// Total credits held by leases (granted, not yet spent or given back).
    #[serde(default)]
    #[schemars(with = "crate::api::table::CreditTotal")]
    pub reserved: CreditCost,
    /// Limit minus used minus reserved, per limited meter.
    #[serde(default)]
    #[schemars(with = "crate::api::table::CreditTotal")]
    pub remaining: CreditCost,
    /// Highest percentage of a limit used or reserved.
    #[serde(default)]
    pub percent_used: u32,
    /// Circuit breaker state.
    #[serde(default)]
    pub breaker: BreakerStatus,
    /// The burn rate and when the period's data credits run out at it
    /// (from the leader's own observations since it became leader).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forecast: Option<BudgetForecast>,
    /// Spend per table this period.
    #[serde(default)]
    pub tables: Vec<TableUsage>,
    /// Totals of past periods, newest first.
    #[serde(default)]
    pub history: Vec<PeriodUsage>,
    /// Credit leases: one per data-plane process and table, each a block of
    /// credits granted by the ledger and drawn per row by its holder. Bounded
    /// by the number of processes, not by rows in flight.
    #[serde(default)]
    pub leases: Vec<Lease>,
    /// Lease requests refused this period (budget exhausted, paused, breaker open).
    #[serde(default)]
    pub denials: u64,
}

/// Credits held by one data-plane process for one table: its undrawn pool
/// plus what it drew and has not reported as spent yet.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    /// Lease id, chosen by the holder.
    pub id: String,
    /// The EnrichmentTable drawing the credits.
    pub table: String,
    /// The process holding it (pod name), for troubleshooting.
    pub holder: String,
    /// Credits held: counted against the limit until reported spent or given back.
    #[schemars(with = "crate::api::table::CreditTotal")]
    pub held: CreditCost,
    /// One row's worst case for this holder's table: the smallest useful grant.
    #[serde(default, skip_serializing_if = "CreditCost::is_zero")]
    pub row_cost: CreditCost,
    /// Sequence number of the last request applied, so a retried request
    /// is applied once.
    #[serde(default)]
    pub seq: u64,
    /// Credits granted by that request (returned again when it is retried).
    #[serde(default, skip_serializing_if = "CreditCost::is_zero")]
    #[schemars(with = "crate::api::table::CreditTotal")]
    pub last_granted: CreditCost,
    /// The refund that request applied (returned again when it is retried).
    #[serde(default, skip_serializing_if = "CreditCost::is_zero")]
    #[schemars(with = "crate::api::table::CreditTotal")]
    pub last_refunded: CreditCost,
    /// When the holder must have renewed it; afterwards what it holds is
    /// forfeited and counted as spent.
    pub expires_at: Time,
}

/// Breaker state with when and why it last changed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BreakerStatus {
    /// Closed (credits granted), Open (refused after repeated Clay
    /// failures) or HalfOpen (a few probe rows allowed).
    pub state: BreakerState,
    /// When the state last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// Why the state last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Spend by one table in the current period.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TableUsage {
    /// The EnrichmentTable's name.
    pub table: String,
    /// Its total spend this period.
    #[schemars(with = "crate::api::table::CreditTotal")]
    pub used: CreditCost,
}

/// Totals of one past period.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeriodUsage {
    pub period_start: Time,
    pub period_end: Time,
    #[schemars(with = "crate::api::table::CreditTotal")]
    pub used: CreditCost,
}
