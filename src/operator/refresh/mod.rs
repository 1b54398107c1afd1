//! The RefreshSchedule controller: validate the schedule, resolve the table,
//! apply the CronJob, report run times in status.

pub mod build;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::{CronJob, CronJobStatus, Job};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

use serde::de::IgnoredAny;

use super::apply::patch_status;
use super::cache::{Children, cached};
use super::context::{Context, error_policy, instrumented};
use super::error::{AtStep, Error, Result, Step, describe, describe_object};
use super::labels::{MANAGED_BY, MANAGED_LABEL, SCHEDULE_LABEL};
use crate::api::budget::BudgetState;
use crate::api::common::{FALSE, TRUE, find_condition};
use crate::api::refresh::REFRESH_NOW_ANNOTATION;
use crate::api::table::Tier;
use crate::api::{CreditBudget, EnrichmentTable, RefreshSchedule, RefreshScheduleStatus};

const CONTROLLER: &str = "refreshschedule";
/// Schedules reconciled at once.
const CONCURRENCY: u16 = 8;
/// The CronJobs of schedules, cached with their status (status reads it).
pub type CronJobs = Children<CronJob, IgnoredAny, CronJobStatus>;

/// A safety net: tables, budgets and CronJobs arrive as watch events.
const RESYNC: Duration = Duration::from_secs(1800);

pub use self::status::{PROVISIONED, READY, SCHEDULE_VALID, SUSPENDED, TABLE_RESOLVED};

/// Why runs are on hold, if they are: (reason, message).
pub fn hold_reason(
    schedule: &RefreshSchedule,
    table: Option<&EnrichmentTable>,
    budget: Option<&CreditBudget>,
) -> Option<(&'static str, String)> {
    if schedule.spec.suspend {
        return Some(("SuspendedBySpec", "spec.suspend is true".into()));
    }
    let table = table?;
    if table.spec.tier == Tier::Direct {
        return Some((
            "TierDirect",
            format!(
                "EnrichmentTable {:?} is tier Direct: its rows live in the receiver's embedded store, which refresh runs cannot reach; refresh is for tiers Queue and Event",
                table.name_any()
            ),
        ));
    }
    let budget_name = &table.spec.budget_ref.name;
    let budget = budget?;
    if budget.spec.paused {
        return Some((
            "BudgetPaused",
            format!("CreditBudget {budget_name:?} is paused; runs resume when it is unpaused"),
        ));
    }
    let state = budget.status.as_ref().map(|s| s.state);
    (state == Some(BudgetState::Exhausted)).then(|| {
        (
            "BudgetExhausted",
            format!(
                "CreditBudget {budget_name:?} is exhausted for this period; runs resume after it rolls over"
            ),
        )
    })
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (schedules, schedule_events) = cached(
        ctx.watched::<RefreshSchedule>(),
        watcher::Config::default(),
        |_| {},
    );
    let controller = Controller::for_stream(schedule_events, schedules)
        .with_config(controller::Config::default().concurrency(CONCURRENCY));
    let store = controller.store();
    // Status reads the CronJobs' status and metadata only.
    let (cronjobs, cronjob_events) = Children::watch(
        ctx.watched(),
        watcher::Config::default().labels(&format!(
            "app.kubernetes.io/managed-by={MANAGED_BY},{SCHEDULE_LABEL}"
        )),
    );
    let _ = ctx.cronjobs.set(cronjobs);
    controller
        .owns_stream(cronjob_events)
        .watches(ctx.watched::<CreditBudget>(), watcher::Config::default(), {
            let store = store.clone();
            // A budget change (exhausted, rolled over, paused) may hold or
            // release the schedules of its namespace.
            move |budget| {
                let namespace = budget.namespace();
                store
                    .state()
                    .into_iter()
                    .filter(|s| s.namespace() == namespace)
                    .map(|s| ObjectRef::from_obj(&*s))
                    .collect::<Vec<_>>()
            }
        })
        .watches(
            ctx.watched::<EnrichmentTable>(),
            watcher::Config::default(),
            move |table| {
                let namespace = table.namespace();
                let name = table.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|s| s.namespace() == namespace && s.spec.table_ref.name == name)
                    .map(|s| ObjectRef::from_obj(&*s))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "refreshschedule reconcile loop");
            }
        })
        .await;
}

async fn reconcile(schedule: Arc<RefreshSchedule>, ctx: Arc<Context>) -> Result<Action> {
    instrumented(
        &ctx,
        CONTROLLER,
        &*schedule,
        reconcile_inner(&schedule, &ctx),
    )
    .await
}

/// Dereference (the table and its budget) → validate (the schedule, what
/// holds runs) → build and apply (the CronJob, a manual run) → status.
async fn reconcile_inner(schedule: &RefreshSchedule, ctx: &Context) -> Result<Action> {
    let namespace = schedule
        .namespace()
        .ok_or_else(|| Error::NotNamespaced(schedule.name_any()))?;
    let now = jiff::Timestamp::now();
    let previous = schedule
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();

    let (table, budget) = dereference(ctx, schedule, &namespace).await?;

    let hold = hold_reason(schedule, table.as_ref(), budget.as_ref());
    let next = build::next_run(schedule, now);

    let cronjobs = ctx
        .cronjobs
        .get()
        .expect("the cache is set before the controller starts");
    cronjobs.ready().await;
    let cronjob = match (&next, &table) {
        // An invalid schedule changes nothing that exists.
        (Err(_), _) => None,
        (Ok(_), None) => {
            // The table is gone (deleted, or not created yet): so is the CronJob.
            let name = schedule.name_any();
            let labels = [(MANAGED_LABEL, MANAGED_BY), (SCHEDULE_LABEL, name.as_str())];
            cronjobs
                .delete_unwanted(&ctx.client, &namespace, &labels, &[])
                .await?;
            None
        }
        (Ok(_), Some(table)) => {
            let desired = build::desired_cronjob(
                schedule,
                table.spec.image.as_deref(),
                &ctx.build,
                hold.is_none(),
            );
            let applied = cronjobs.apply(&ctx.client, &desired).await?;
            // The cache keeps no job template; a manual run is built from
            // the desired one, owned by the live CronJob.
            Some(CronJob {
                metadata: applied.metadata.clone(),
                status: applied.status.clone(),
                ..desired
            })
        }
    };
    let handled = schedule
        .status
        .as_ref()
        .and_then(|s| s.last_manual_trigger.clone());
    let manual_trigger = match (&cronjob, schedule.annotations().get(REFRESH_NOW_ANNOTATION)) {
        (Some(cronjob), Some(trigger)) if handled.as_ref() != Some(trigger) => {
            start_manual_run(ctx, schedule, cronjob, trigger).await?;
            Some(trigger.clone())
        }
        _ => handled,
    };

    let new_status = status::compute(
        schedule,
        &namespace,
        &status::Observed {
            table_found: table.is_some(),
            hold,
            next: &next,
            cronjob: cronjob.as_ref(),
            manual_trigger,
        },
        Time::from(now),
    );
    if schedule.status.as_ref() != Some(&new_status) {
        let api = Api::<RefreshSchedule>::namespaced(ctx.client.clone(), &namespace);
        // lastRun belongs to the runs (`kiln refresh` writes it): left out,
        // so this merge patch never overwrites a newer one.
        let without_last_run = RefreshScheduleStatus {
            last_run: None,
            ..new_status.clone()
        };
        patch_status(&api, &schedule.name_any(), &without_last_run).await?;
        let was_suspended = find_condition(&previous, SUSPENDED).map(|c| c.reason.clone());
        if let Some(c) = find_condition(&new_status.conditions, SUSPENDED)
            // Held from the start (e.g. a schedule of a Direct table) is
            // news too; resumed only after having been held.
            .filter(|c| {
                Some(&c.reason) != was_suspended.as_ref()
                    && (was_suspended.is_some() || c.status == TRUE)
            })
        {
            let kind = if c.status == TRUE {
                EventType::Warning
            } else {
                EventType::Normal
            };
            let reason = if c.status == TRUE {
                "RunsHeld"
            } else {
                "RunsResumed"
            };
            ctx.event(schedule, kind, reason, "Reconcile", c.message.clone())
                .await;
        }
        for type_ in [SCHEDULE_VALID, TABLE_RESOLVED] {
            let was_false = find_condition(&previous, type_).is_some_and(|c| c.status == FALSE);
            if let Some(c) = find_condition(&new_status.conditions, type_)
                .filter(|c| c.status == FALSE && !was_false)
            {
                ctx.event(
                    schedule,
                    EventType::Warning,
                    &c.reason,
                    "Validate",
                    c.message.clone(),
                )
                .await;
            }
        }
    }
    // Wake up after the next run so lastScheduleTime and nextScheduleTime stay current.
    let until_next = next
        .ok()
        .and_then(|at| Duration::try_from(at.duration_since(now)).ok())
        .map(|d| d + Duration::from_secs(5))
        .unwrap_or(RESYNC);
    Ok(Action::requeue(
        until_next.clamp(Duration::from_secs(5), RESYNC),
    ))
}

/// The table the schedule refreshes and the budget it draws on, when they
/// exist.
async fn dereference(
    ctx: &Context,
    schedule: &RefreshSchedule,
    namespace: &str,
) -> Result<(Option<EnrichmentTable>, Option<CreditBudget>)> {
    let table_name = &schedule.spec.table_ref.name;
    let table = Api::<EnrichmentTable>::namespaced(ctx.client.clone(), namespace)
        .get_opt(table_name)
        .await
        .at(Step::Read, || {
            describe::<EnrichmentTable>(Some(namespace), table_name)
        })?;
    let budget = match &table {
        Some(t) => Api::<CreditBudget>::namespaced(ctx.client.clone(), namespace)
            .get_opt(&t.spec.budget_ref.name)
            .await
            .at(Step::Read, || {
                describe::<CreditBudget>(Some(namespace), &t.spec.budget_ref.name)
            })?,
        None => None,
    };
    Ok((table, budget))
}

/// Creates the Job a `kiln.dev/refresh-now` annotation asks for (once per value).
async fn start_manual_run(
    ctx: &Context,
    schedule: &RefreshSchedule,
    cronjob: &CronJob,
    trigger: &str,
) -> Result<()> {
    let job = build::manual_job(cronjob, trigger);
    let jobs = Api::<Job>::namespaced(ctx.client.clone(), &cronjob.namespace().unwrap_or_default());
    match jobs.create(&PostParams::default(), &job).await {
        Ok(_) => {}
        // Created by an earlier reconcile that failed before recording the trigger.
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(error) => return Err(error).at(Step::Apply, || describe_object(&job)),
    }
    ctx.event(
        schedule,
        EventType::Normal,
        "RunTriggered",
        "Reconcile",
        format!(
            "started Job {:?} for {REFRESH_NOW_ANNOTATION}={trigger:?}",
            job.name_any()
        ),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::table::Tier;
    use serde_json::json;

    fn schedule(suspend: bool) -> RefreshSchedule {
        serde_json::from_value(json!({
            "apiVersion": "kiln.dev/v1alpha1", "kind": "RefreshSchedule",
            "metadata": {"name": "nightly", "namespace": "sales"},
            "spec": {"tableRef": {"name": "leads"}, "schedule": "0 3 * * *", "suspend": suspend,
                     "maxAge": "720h", "maxRows": 10, "maxCredits": 100.0}
        }))
        .unwrap()
    }

    fn budget(paused: bool, state: BudgetState) -> CreditBudget {
        let mut budget: CreditBudget = serde_json::from_value(json!({
            "apiVersion": "kiln.dev/v1alpha1", "kind": "CreditBudget",
            "metadata": {"name": "b"}, "spec": {"limits": {"dataCredits": 10.0}, "paused": paused}
        }))
        .unwrap();
        budget.status = Some(crate::api::budget::CreditBudgetStatus {
            state,
            ..Default::default()
        });
        budget
    }

    #[test]
    fn runs_are_held_for_the_budget_the_spec_or_a_direct_table() {
        let table = crate::operator::table::build::tests::queue_table();
        let active = budget(false, BudgetState::Active);
        let reason = |s: &RefreshSchedule, t: &EnrichmentTable, b: &CreditBudget| {
            hold_reason(s, Some(t), Some(b)).map(|(reason, _)| reason)
        };
        assert_eq!(reason(&schedule(false), &table, &active), None);
        assert_eq!(
            reason(&schedule(true), &table, &active),
            Some("SuspendedBySpec")
        );
        assert_eq!(
            reason(
                &schedule(false),
                &table,
                &budget(false, BudgetState::Exhausted)
            ),
            Some("BudgetExhausted")
        );
        assert_eq!(
            reason(&schedule(false), &table, &budget(true, BudgetState::Paused)),
            Some("BudgetPaused")
        );
        let mut direct = table.clone();
        direct.spec.tier = Tier::Direct;
        assert_eq!(
            reason(&schedule(false), &direct, &active),
            Some("TierDirect")
        );
        assert_eq!(hold_reason(&schedule(false), None, None), None);
    }
}
