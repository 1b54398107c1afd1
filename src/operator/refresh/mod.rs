//! The RefreshSchedule controller: validate the schedule, resolve the table,
//! apply the CronJob, report run times in status.

pub mod build;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

use super::apply::{apply, patch_status};
use super::context::{Context, error_policy, instrumented};
use super::error::{Error, Result};
use super::labels::{MANAGED_BY, SCHEDULE_LABEL};
use crate::api::common::{Conditions, FALSE, TRUE, find_condition};
use crate::api::{EnrichmentTable, RefreshSchedule, RefreshScheduleStatus};

const CONTROLLER: &str = "refreshschedule";
const RESYNC: Duration = Duration::from_secs(300);

pub const READY: &str = "Ready";
pub const SCHEDULE_VALID: &str = "ScheduleValid";
pub const TABLE_RESOLVED: &str = "TableResolved";
pub const PROVISIONED: &str = "Provisioned";

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let controller = Controller::new(ctx.watched::<RefreshSchedule>(), watcher::Config::default());
    let store = controller.store();
    controller
        .owns(
            ctx.watched::<CronJob>(),
            watcher::Config::default().labels(&format!(
                "app.kubernetes.io/managed-by={MANAGED_BY},{SCHEDULE_LABEL}"
            )),
        )
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

async fn reconcile_inner(schedule: &RefreshSchedule, ctx: &Context) -> Result<Action> {
    let namespace = schedule
        .namespace()
        .ok_or_else(|| Error::NotNamespaced(schedule.name_any()))?;
    let now = jiff::Timestamp::now();
    let now_time = Time::from(now);
    let current = schedule.status.clone().unwrap_or_default();
    let previous = current.conditions.clone();
    let generation = schedule.metadata.generation;
    let cond = Conditions::new(&previous, generation, now_time.clone());

    let table_name = &schedule.spec.table_ref.name;
    let table = Api::<EnrichmentTable>::namespaced(ctx.client.clone(), &namespace)
        .get_opt(table_name)
        .await?;
    let table_condition = match &table {
        Some(_) => cond.set(
            TABLE_RESOLVED,
            true,
            "TableFound",
            format!("refreshing EnrichmentTable {table_name:?}"),
        ),
        None => cond.set(
            TABLE_RESOLVED,
            false,
            "TableNotFound",
            format!(
                "EnrichmentTable {table_name:?} not found in namespace {namespace:?}; runs are suspended until it exists"
            ),
        ),
    };
    let next = build::next_run(schedule, now);
    let (schedule_condition, provisioned, cronjob) = match &next {
        Err(message) => (
            cond.set(SCHEDULE_VALID, false, "InvalidSchedule", message.clone()),
            cond.set(
                PROVISIONED,
                false,
                "InvalidSchedule",
                "no CronJob is created for an invalid schedule".into(),
            ),
            None,
        ),
        Ok(_) => {
            let image = table.as_ref().and_then(|t| t.spec.image.as_deref());
            let desired = build::desired_cronjob(schedule, image, &ctx.build, table.is_some());
            let applied = apply(&ctx.client, &desired).await?;
            (
                cond.set(
                    SCHEDULE_VALID,
                    true,
                    "Valid",
                    "the schedule and time zone parse".into(),
                ),
                cond.set(
                    PROVISIONED,
                    true,
                    "CronJobApplied",
                    format!("CronJob {:?} is applied", applied.name_any()),
                ),
                Some(applied),
            )
        }
    };
    let parts = [&schedule_condition, &table_condition, &provisioned];
    let ready = match parts.iter().find(|c| c.status != TRUE) {
        None => cond.set(READY, true, "Ready", "runs on schedule".into()),
        Some(blocking) => cond.set(READY, false, &blocking.reason, blocking.message.clone()),
    };
    let cron_status = cronjob
        .as_ref()
        .and_then(|c| c.status.clone())
        .unwrap_or_default();
    let suspended = schedule.spec.suspend || table.is_none();
    let new_status = RefreshScheduleStatus {
        observed_generation: generation,
        conditions: vec![ready, schedule_condition, table_condition, provisioned],
        last_schedule_time: cron_status
            .last_schedule_time
            .or(current.last_schedule_time.clone()),
        last_successful_time: cron_status
            .last_successful_time
            .or(current.last_successful_time.clone()),
        next_schedule_time: match (&next, suspended) {
            (Ok(at), false) => Some(at.to_string()),
            _ => None,
        },
        last_run: current.last_run.clone(),
    };

    if schedule.status.as_ref() != Some(&new_status) {
        let api = Api::<RefreshSchedule>::namespaced(ctx.client.clone(), &namespace);
        patch_status(&api, &schedule.name_any(), &new_status).await?;
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
