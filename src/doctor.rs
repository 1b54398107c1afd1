//! `kiln doctor`: Kiln's validation report for a namespace (or all). It
//! reads the three kinds and turns what their status says into findings,
//! each with what to do: conditions that do not hold (including the tier
//! matrix's TierFit and the failure table's CallbacksArriving), budgets past
//! a warning threshold, exhausted or forecast to run out this period, tables
//! nobody refreshes, dead letters by reason, webhook sources near Clay's
//! lifetime cap.
//! Exit code 0 when nothing needs attention, 1 otherwise, so it can gate CI
//! and GitOps checks. As a kubectl plugin: link the binary as
//! `kubectl-kiln` on PATH and run `kubectl kiln doctor`.

use std::collections::BTreeSet;

use anyhow::Context as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ListParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;

use crate::api::budget::BudgetState;
use crate::api::table::RowCounters;
use crate::api::{CreditBudget, EnrichmentTable, RefreshSchedule};
use crate::clay::rotation::SOURCE_CAP;

#[derive(clap::Args, Clone, Debug)]
pub struct DoctorArgs {
    /// The namespace to check (the kubeconfig's namespace when unset).
    #[arg(short, long, conflicts_with = "all_namespaces")]
    pub namespace: Option<String>,
    /// Check every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum Output {
    Text,
    Json,
}

/// How much a finding matters: `Warning` and `Error` fail the check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Severity {
    Info,
    Warning,
    Error,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    pub namespace: String,
    pub kind: String,
    pub name: String,
    pub severity: Severity,
    /// The condition type or check that found it.
    pub check: String,
    pub reason: String,
    /// What is wrong and what to do.
    pub message: String,
}

/// The report: findings, worst first.
#[derive(Debug, Serialize)]
pub struct Report {
    pub healthy: bool,
    pub findings: Vec<Finding>,
}

/// Conditions whose False is advice, not breakage.
const ADVISORY: [&str; 4] = ["TierFit", "CallbacksArriving", "Fresh", "ClayRateAccepted"];

fn finding<K: Resource<DynamicType = ()>>(
    object: &K,
    severity: Severity,
    check: &str,
    reason: &str,
    message: String,
) -> Finding {
    Finding {
        namespace: object.namespace().unwrap_or_default(),
        kind: K::kind(&()).into_owned(),
        name: object.name_any(),
        severity,
        check: check.to_string(),
        reason: reason.to_string(),
        message,
    }
}

/// Conditions that do not hold (Ready is left out: it repeats another).
fn condition_findings<K: Resource<DynamicType = ()>>(
    object: &K,
    conditions: &[Condition],
) -> Vec<Finding> {
    conditions
        .iter()
        .filter(|c| c.status != "True" && c.type_ != "Ready")
        .map(|c| {
            let severity = if ADVISORY.contains(&c.type_.as_str()) {
                Severity::Warning
            } else {
                Severity::Error
            };
            finding(object, severity, &c.type_, &c.reason, c.message.clone())
        })
        .collect()
}

/// Dead letters, by reason with what fixes each, and how to look and replay.
fn dead_letter_message(table: &EnrichmentTable, rows: &RowCounters) -> String {
    let target = format!(
        "{}/{}",
        table.namespace().unwrap_or_default(),
        table.name_any()
    );
    let mut message = format!(
        "{} rows ended in the dead-letter destination",
        rows.dead_lettered
    );
    for (reason, count) in &rows.dead_lettered_by_reason {
        let fix = match reason.as_str() {
            "BudgetExhausted" => "raise the budget, then replay",
            "ResultTimeout" => "Clay's results did not come back: see CallbacksArriving",
            "SinkFailed" => "the sink refused them: check the CRM or topic, then replay",
            "InvalidRow" | "MissingKey" => {
                "the producer sent rows that are not JSON objects with the key field"
            }
            "SourcesExhausted" => {
                "every webhook source reached Clay's cap: add one to clay.webhookSources"
            }
            _ => "see the rows' detail",
        };
        message.push_str(&format!("; {count} {reason} ({fix})"));
    }
    message.push_str(&format!(
        ". Look with `kiln dlq list --table {target}`, replay with `kiln dlq replay --table {target} --reason REASON` once fixed"
    ));
    message
}

/// Webhook sources near Clay's lifetime cap of rows.
fn source_findings(
    table: &EnrichmentTable,
    source_rows: &std::collections::BTreeMap<String, u64>,
) -> Vec<Finding> {
    let warn_at = SOURCE_CAP * 8 / 10;
    let full_at = SOURCE_CAP * 99 / 100;
    let sources = &table.spec.clay.webhook_sources;
    let all_full = !sources.is_empty()
        && sources
            .iter()
            .all(|s| source_rows.get(&s.name).is_some_and(|n| *n >= full_at));
    let mut findings: Vec<Finding> = source_rows
        .iter()
        .filter(|(_, rows)| **rows >= warn_at)
        .map(|(source, rows)| {
            finding(
                table,
                Severity::Warning,
                "WebhookSources",
                "SourceNearCap",
                format!(
                    "webhook source {source:?} took {rows} of Clay's {SOURCE_CAP} rows per source (Kiln stops using it at {full_at}): add a new source to clay.webhookSources before the last one fills"
                ),
            )
        })
        .collect();
    if all_full {
        findings.push(finding(
            table,
            Severity::Error,
            "WebhookSources",
            "SourcesExhausted",
            format!(
                "every webhook source of clay.webhookSources reached Clay's {SOURCE_CAP}-row cap: rows cannot be sent until a new source is added"
            ),
        ));
    }
    findings
}

/// The findings for what the three kinds report.
pub fn diagnose(
    tables: &[EnrichmentTable],
    budgets: &[CreditBudget],
    schedules: &[RefreshSchedule],
) -> Report {
    let mut findings = Vec::new();
    for budget in budgets {
        let status = budget.status.clone().unwrap_or_default();
        findings.extend(condition_findings(budget, &status.conditions));
        match status.state {
            BudgetState::Exhausted => findings.push(finding(
                budget,
                Severity::Error,
                "Budget",
                "Exhausted",
                format!(
                    "{}% used: tables {:?} now (spec.onExhausted); raise spec.limits or wait for the next period",
                    status.percent_used, budget.spec.on_exhausted
                ),
            )),
            BudgetState::Warning => findings.push(finding(
                budget,
                Severity::Warning,
                "Budget",
                "WarningThreshold",
                format!(
                    "{}% of the period's credits used (warning thresholds {:?})",
                    status.percent_used, budget.spec.warning_thresholds
                ),
            )),
            _ => {}
        }
        let runs_out = status
            .forecast
            .as_ref()
            .and_then(|f| f.exhausts_at.as_ref());
        if let Some(at) = runs_out.filter(|_| status.state != BudgetState::Exhausted) {
            findings.push(finding(
                budget,
                Severity::Warning,
                "Forecast",
                "ExhaustsThisPeriod",
                format!(
                    "at the last hour's burn the period's credits run out at {}, before the period ends; then tables {:?} (spec.onExhausted): raise spec.limits or slow the tables down",
                    at.0, budget.spec.on_exhausted
                ),
            ));
        }
    }
    let refreshed: BTreeSet<(String, String)> = schedules
        .iter()
        .map(|s| {
            (
                s.namespace().unwrap_or_default(),
                s.spec.table_ref.name.clone(),
            )
        })
        .collect();
    for table in tables {
        let status = table.status.clone().unwrap_or_default();
        findings.extend(condition_findings(table, &status.conditions));
        if status.rows.dead_lettered > 0 {
            findings.push(finding(
                table,
                Severity::Info,
                "DeadLetters",
                "RowsDeadLettered",
                dead_letter_message(table, &status.rows),
            ));
        }
        findings.extend(source_findings(table, &status.webhook_source_rows));
        let key = (table.namespace().unwrap_or_default(), table.name_any());
        if status.rows.enriched > 0 && !refreshed.contains(&key) {
            findings.push(finding(
                table,
                Severity::Info,
                "Fresh",
                "NoRefreshSchedule",
                "no RefreshSchedule re-enriches this table's rows: enriched data goes stale; add one (examples/queue.yaml has a weekly refresh)".into(),
            ));
        }
    }
    for schedule in schedules {
        let status = schedule.status.clone().unwrap_or_default();
        findings.extend(condition_findings(schedule, &status.conditions));
    }
    findings.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then_with(|| (&a.namespace, &a.kind, &a.name).cmp(&(&b.namespace, &b.kind, &b.name)))
    });
    Report {
        healthy: findings.iter().all(|f| f.severity == Severity::Info),
        findings,
    }
}

/// Renders the report for a terminal.
pub fn text(report: &Report, checked: usize) -> String {
    let mut out = String::new();
    for f in &report.findings {
        out.push_str(&format!(
            "{:<7} {}/{}/{}  {}: {}\n        {}\n",
            format!("{:?}", f.severity).to_uppercase(),
            f.namespace,
            f.kind,
            f.name,
            f.check,
            f.reason,
            f.message
        ));
    }
    out.push_str(&if report.healthy {
        format!("OK: {checked} Kiln resources checked, nothing needs attention\n")
    } else {
        let problems = report
            .findings
            .iter()
            .filter(|f| f.severity != Severity::Info)
            .count();
        format!("{problems} findings need attention ({checked} Kiln resources checked)\n")
    });
    out
}

/// Runs the report against the cluster; Ok(healthy).
pub async fn run(args: DoctorArgs) -> anyhow::Result<bool> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (KUBECONFIG or in-cluster config)")?;
    let namespace = if args.all_namespaces {
        None
    } else {
        Some(
            args.namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_string()),
        )
    };
    let tables: Vec<EnrichmentTable> = list(&client, namespace.as_deref()).await?;
    let budgets: Vec<CreditBudget> = list(&client, namespace.as_deref()).await?;
    let schedules: Vec<RefreshSchedule> = list(&client, namespace.as_deref()).await?;
    let report = diagnose(&tables, &budgets, &schedules);
    let checked = tables.len() + budgets.len() + schedules.len();
    match args.output {
        Output::Text => print!("{}", text(&report, checked)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(report.healthy)
}

async fn list<K>(client: &kube::Client, namespace: Option<&str>) -> anyhow::Result<Vec<K>>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    Ok(api
        .list(&ListParams::default())
        .await
        .with_context(|| format!("listing {}", K::plural(&())))?
        .items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(
        name: &str,
        conditions: serde_json::Value,
        rows: serde_json::Value,
    ) -> EnrichmentTable {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kiln.dev/v1alpha1", "kind": "EnrichmentTable",
            "metadata": {"name": name, "namespace": "sales"},
            "spec": {"tier": "Direct", "key": "domain", "budgetRef": {"name": "b"},
                "clay": {"webhookSources": [{"name": "s", "urlSecretRef": {"name": "x", "key": "u"}}],
                    "creditsPerRow": {"dataCredits": 1}, "callbackTokenSecretRef": {"name": "x", "key": "c"}},
                "source": {"http": {"authTokenSecretRef": {"name": "x", "key": "t"}}}},
            "status": {"conditions": conditions, "rows": rows}
        }))
        .unwrap()
    }

    fn condition(type_: &str, status: &str, reason: &str) -> serde_json::Value {
        serde_json::json!({"type": type_, "status": status, "reason": reason, "message": "m",
            "lastTransitionTime": "2026-11-27T12:00:00Z"})
    }

    #[test]
    fn a_healthy_namespace_passes_and_advice_fails_the_check() {
        let rows = serde_json::json!({"received": 5, "deduplicated": 0, "submitted": 5, "enriched": 5,
            "delivered": 5, "deadLettered": 0, "pending": 0});
        let healthy = table(
            "ok",
            serde_json::json!([condition("Ready", "True", "Ready")]),
            rows.clone(),
        );
        let report = diagnose(std::slice::from_ref(&healthy), &[], &[]);
        assert!(report.healthy, "{report:?}");
        assert_eq!(report.findings.len(), 1, "no refresh: an info finding");
        assert_eq!(report.findings[0].severity, Severity::Info);

        let outgrown = table(
            "busy",
            serde_json::json!([
                condition("Ready", "True", "Ready"),
                condition("TierFit", "False", "VolumeAboveTier")
            ]),
            rows,
        );
        let report = diagnose(&[healthy, outgrown], &[], &[]);
        assert!(!report.healthy);
        assert_eq!(report.findings[0].check, "TierFit");
        assert_eq!(report.findings[0].severity, Severity::Warning);
        assert!(
            text(&report, 2)
                .contains("WARNING sales/EnrichmentTable/busy  TierFit: VolumeAboveTier")
        );
    }

    #[test]
    fn dead_letters_by_reason_and_sources_near_their_cap_are_reported() {
        let rows = serde_json::json!({"received": 9, "deduplicated": 0, "submitted": 9, "enriched": 5,
            "delivered": 5, "deadLettered": 4, "pending": 0,
            "deadLetteredByReason": {"BudgetExhausted": 3, "ResultTimeout": 1}});
        let mut busy = table(
            "busy",
            serde_json::json!([condition("Ready", "True", "Ready")]),
            rows,
        );
        busy.status.as_mut().unwrap().webhook_source_rows =
            [("s".to_string(), 45_000)].into_iter().collect();
        let report = diagnose(std::slice::from_ref(&busy), &[], &[]);
        assert!(!report.healthy, "a source near its cap is a warning");
        let near = report
            .findings
            .iter()
            .find(|f| f.reason == "SourceNearCap")
            .unwrap();
        assert!(near.message.contains("45000"), "{}", near.message);
        let dead = report
            .findings
            .iter()
            .find(|f| f.check == "DeadLetters")
            .unwrap();
        assert!(
            dead.message
                .contains("3 BudgetExhausted (raise the budget, then replay)")
                && dead.message.contains("1 ResultTimeout"),
            "{}",
            dead.message
        );
        // Every source full: nothing can be sent.
        busy.status.as_mut().unwrap().webhook_source_rows =
            [("s".to_string(), 49_999)].into_iter().collect();
        let report = diagnose(&[busy], &[], &[]);
        assert_eq!(report.findings[0].reason, "SourcesExhausted");
        assert_eq!(report.findings[0].severity, Severity::Error);
    }

    #[test]
    fn a_budget_forecast_to_run_out_this_period_is_a_warning() {
        let budget: CreditBudget = serde_json::from_value(serde_json::json!({
            "apiVersion": "kiln.dev/v1alpha1", "kind": "CreditBudget",
            "metadata": {"name": "team", "namespace": "sales"},
            "spec": {"limits": {"dataCredits": 1000.0}},
            "status": {"forecast": {"dataCreditsPerHourLastHour": 100.0, "dataCreditsPerHourLastDay": 80.0,
                "exhaustsAt": "2026-11-28T06:00:00Z"}}
        }))
        .unwrap();
        let report = diagnose(&[], &[budget], &[]);
        assert!(!report.healthy);
        assert_eq!(report.findings[0].reason, "ExhaustsThisPeriod");
        assert!(report.findings[0].message.contains("2026-11-28T06:00:00Z"));
    }
}
