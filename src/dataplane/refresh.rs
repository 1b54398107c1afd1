//! `kiln refresh --schedule NS/NAME`, what a RefreshSchedule's CronJob runs:
//! takes the table's stale keys oldest first from the enrichment-time index,
//! checks the run's credits with the budget up front, re-enqueues the rows
//! marked as refreshes (the worker bypasses the de-dupe window for them and
//! charges each as usual) and reports the counts in the schedule's status.

use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use super::store::RedisStore;
use super::{LedgerArgs, TableRuntime};
use crate::api::RefreshSchedule;
use crate::api::refresh::{RefreshOutcome, RefreshRunCounts};
use crate::api::table::CreditCost;
use crate::contract::Keys;
use crate::ledger::LeaseRequest;

/// A taken key whose row has not completed after this long is offered to
/// later runs again (the row died or was dead-lettered).
const REFRESH_LEASE: Duration = Duration::from_secs(6 * 3600);
/// Field manager of the run's status writes (it owns `status.lastRun`).
const FIELD_MANAGER: &str = "kiln-refresh";

#[derive(clap::Args, Clone, Debug)]
pub struct RefreshArgs {
    /// The RefreshSchedule as NAMESPACE/NAME.
    #[arg(long)]
    pub schedule: String,
    #[command(flatten)]
    pub ledger: LedgerArgs,
}

/// How many of `selected` stale rows a run may take: at most what
/// `max_credits` covers at `per_row` each, and what the budget granted.
pub fn affordable_rows(selected: u64, per_row: f64, max_credits: f64, granted: Option<f64>) -> u64 {
    if per_row <= 0.0 {
        return selected;
    }
    let credits = granted.map_or(max_credits, |g| g.min(max_credits));
    // A hair of tolerance so 24.0 / 8.0 is 3 even after float rounding.
    selected.min(((credits + 1e-9) / per_row).floor() as u64)
}

/// The row a stale key is re-enqueued as: the input it was last enriched
/// from (else just its key), marked as a refresh.
pub fn refresh_row(key_field: &str, key: &str, input: Option<Value>) -> Value {
    let mut row = match input {
        Some(Value::Object(row)) => Value::Object(row),
        _ => json!({ key_field: key }),
    };
    row["kiln_refresh"] = Value::Bool(true);
    row
}

pub async fn run(args: RefreshArgs) -> anyhow::Result<RefreshRunCounts> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let (namespace, name) = super::namespace_and_name(&args.schedule, "--schedule")?;
    let schedules = Api::<RefreshSchedule>::namespaced(client.clone(), &namespace);
    let schedule = schedules
        .get(&name)
        .await
        .with_context(|| format!("reading RefreshSchedule {namespace}/{name}"))?;
    let table = &schedule.spec.table_ref.name;
    let runtime = TableRuntime::load(&client, &namespace, table).await?;
    let redis_url = runtime
        .redis_url
        .clone()
        .context("refreshing needs the table's spec.redis (tiers Queue and Event)")?;
    let store = RedisStore::connect(redis_url.expose(), Keys::new(&namespace, table))
        .await
        .context("connecting to Redis")?;

    let max_age: Duration = schedule.spec.max_age.into();
    let stale_before = jiff::Timestamp::now().as_millisecond() - max_age.as_millis() as i64;
    let lease_ms = REFRESH_LEASE.as_millis() as i64;
    let stale = store.count_stale(stale_before, lease_ms).await?;
    let selected = stale.min(u64::from(schedule.spec.max_rows));
    let per_row = runtime.table.spec.clay.credits_per_row.clone();
    let wanted = affordable_rows(
        selected,
        per_row.data_credits,
        schedule.spec.max_credits,
        None,
    );

    let report = if wanted == 0 {
        RefreshRunCounts {
            selected,
            skipped_for_budget: selected,
            message: if selected == 0 {
                format!(
                    "no rows were enriched more than {} ago",
                    schedule.spec.max_age
                )
            } else {
                format!(
                    "maxCredits {} does not cover one row at {} credits",
                    schedule.spec.max_credits, per_row.data_credits
                )
            },
            ..Default::default()
        }
    } else {
        let identity = args.ledger.identity();
        let ledger = args.ledger.ledger()?;
        let lease = format!(
            "refresh-{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let times = |n: u64| CreditCost {
            data_credits: per_row.data_credits * n as f64,
            actions: per_row.actions * n,
        };
        // The run only checks that the budget can pay for its rows: it holds
        // them while re-enqueueing, then gives them back; the worker draws
        // each row's credits like any row's.
        let request = LeaseRequest {
            namespace: namespace.clone(),
            budget: runtime.table.spec.budget_ref.name.clone(),
            table: table.clone(),
            holder: identity,
            lease,
            seq: 1,
            ask: times(wanted),
            row_cost: times(1),
            ttl_seconds: 300,
            ..Default::default()
        };
        let answer = ledger
            .lease(&request)
            .await
            .context("asking the budget for the run's credits")?;
        match answer.denial {
            Some(denial) => RefreshRunCounts {
                selected,
                skipped_for_budget: selected,
                outcome: RefreshOutcome::SkippedForBudget,
                message: format!(
                    "skipped: CreditBudget {:?} refused the run's credits ({:?}): {}",
                    request.budget, denial.reason, denial.message
                ),
                ..Default::default()
            },
            None => {
                let rows = affordable_rows(
                    wanted,
                    per_row.data_credits,
                    schedule.spec.max_credits,
                    Some(answer.granted.data_credits),
                );
                let outcome = requeue(&store, &runtime, stale_before, rows, lease_ms).await;
                let release = LeaseRequest {
                    seq: 2,
                    ask: CreditCost::default(),
                    give_back: answer.held.clone(),
                    release: true,
                    ..request.clone()
                };
                if let Err(error) = ledger.lease(&release).await {
                    tracing::warn!(%error, "giving back the run's credits failed; they are counted as spent when the lease expires");
                }
                let requeued = outcome?;
                RefreshRunCounts {
                    selected,
                    requeued,
                    skipped_for_budget: selected - rows,
                    message: format!(
                        "re-enqueued {requeued} of {selected} stale rows ({} left for a later run)",
                        selected - requeued
                    ),
                    ..Default::default()
                }
            }
        }
    };
    let report = RefreshRunCounts {
        finished_at: Some(Time(jiff::Timestamp::now())),
        ..report
    };
    schedules
        .patch_status(
            &name,
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            &Patch::Merge(json!({"status": {"lastRun": report}})),
        )
        .await
        .context("reporting the run in the RefreshSchedule's status")?;
    tracing::info!(selected = report.selected, requeued = report.requeued, skipped_for_budget = report.skipped_for_budget, outcome = ?report.outcome, "{}", report.message);
    Ok(report)
}

/// Takes up to `rows` stale keys and appends their rows to the table's source.
async fn requeue(
    store: &RedisStore,
    runtime: &TableRuntime,
    stale_before: i64,
    rows: u64,
    lease: i64,
) -> anyhow::Result<u64> {
    let taken = store.claim_stale(stale_before, rows, lease).await?;
    let key_field = &runtime.table.spec.key;
    let with_ids: Vec<(String, Value)> = taken
        .into_iter()
        .map(|(key, input)| {
            (
                crate::dataplane::new_row_id(&format!("{}-refresh", runtime.name)),
                refresh_row(key_field, &key, input),
            )
        })
        .collect();
    if !with_ids.is_empty() {
        let source = super::source_stream(runtime, store);
        // Should this fail, the taken keys return to the index after the lease.
        store.enqueue(&source, &with_ids).await?;
    }
    Ok(with_ids.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_bounded_by_max_credits_and_the_grant() {
        assert_eq!(affordable_rows(10, 8.0, 1000.0, None), 10);
        assert_eq!(affordable_rows(10, 8.0, 24.0, None), 3);
        assert_eq!(affordable_rows(10, 8.0, 1000.0, Some(20.0)), 2);
        assert_eq!(affordable_rows(10, 8.0, 7.9, None), 0);
        assert_eq!(affordable_rows(10, 0.0, 1.0, None), 10);
    }

    #[test]
    fn refreshed_rows_keep_their_input_and_are_marked() {
        let row = refresh_row(
            "email",
            "a@b.c",
            Some(json!({"email": "a@b.c", "company": "Acme"})),
        );
        assert_eq!(
            row,
            json!({"email": "a@b.c", "company": "Acme", "kiln_refresh": true})
        );
        assert_eq!(
            refresh_row("email", "a@b.c", None),
            json!({"email": "a@b.c", "kiln_refresh": true})
        );
    }
}
