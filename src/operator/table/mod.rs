//! The EnrichmentTable controller: `dereference` (what the table refers to,
//! from `caches`) → `build` (the desired children, pure) → `apply` → `status`
//! (pure; `advice` and `volume` feed its tier conditions), then Events for
//! the conditions that changed.

pub mod advice;
mod apply;
pub mod build;
mod caches;
pub mod counters;
mod dereference;
pub mod status;
pub mod volume;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

use self::apply::{apply_children, apply_scaled_object};
pub use self::caches::TableCaches;
use self::caches::{slim_pod, slim_secret};
use self::dereference::dereference;
use self::status::{Autoscaling, Provisioning};
use super::apply::patch_status;
use super::cache::{Children, cached, without_annotations};
use super::context::{Context, error_policy, instrumented};
use super::error::{Error, Result};
use super::labels::{MANAGED_BY, TABLE_LABEL};
use super::slim::SlimPod;
use crate::api::common::{FALSE, TRUE, find_condition};
use crate::api::{CreditBudget, EnrichmentTable, RefreshSchedule};
use crate::contact::Peer;

const CONTROLLER: &str = "enrichmenttable";
/// Tables reconciled at once: enough to provision a thousand quickly,
/// few enough that the API server is not flooded.
const CONCURRENCY: u16 = 16;

/// Re-check an idle, healthy table this often even without events (a
/// safety net: changes arrive as watch events, and traffic starting again
/// as a trigger from the lease API).
const RESYNC: Duration = Duration::from_secs(1800);
/// Refresh row counters this often while rows are flowing.
const COUNTERS_RESYNC: Duration = Duration::from_secs(5);
/// Re-check a table that is waiting on references or pods this often.
const WAITING_RESYNC: Duration = Duration::from_secs(30);

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let tables = ctx.watched::<EnrichmentTable>();
    let owned = watcher::Config::default().labels(&format!(
        "app.kubernetes.io/managed-by={MANAGED_BY},{TABLE_LABEL}"
    ));
    // Cached without managed fields, like every other watched kind.
    let (tables, table_events) = cached(tables, watcher::Config::default(), without_annotations);
    let controller = Controller::for_stream(table_events, tables)
        .with_config(controller::Config::default().concurrency(CONCURRENCY));
    let store = controller.store();
    let budget_store = store.clone();
    let all = watcher::Config::default;
    let (deployments, deployment_events) = Children::watch(ctx.watched(), owned.clone());
    let (services, service_events) = Children::watch(ctx.watched(), owned.clone());
    let (accounts, account_events) = Children::watch(ctx.watched(), owned.clone());
    let (roles, role_events) = Children::watch(ctx.watched(), owned.clone());
    let (bindings, binding_events) = Children::watch(ctx.watched(), owned.clone());
    let (claims, claim_events) = Children::watch(ctx.watched(), owned.clone());
    let (pods, pod_events) = cached(ctx.watched(), owned, slim_pod);
    let (budgets, budget_events) = cached(ctx.watched(), all(), without_annotations);
    // (The refresh controller keeps its own copy, with the refresh-now annotation.)
    let (schedules, schedule_events) = cached(ctx.watched(), all(), without_annotations);
    let (secrets, secret_events) = cached(ctx.watched(), all(), slim_secret);
    let _ = ctx.table_caches.set(TableCaches {
        deployments,
        services,
        accounts,
        roles,
        bindings,
        claims,
        budgets,
        schedules,
        secrets,
        pods,
        counters: Default::default(),
    });
    controller
        .owns_stream(deployment_events)
        .owns_stream(service_events)
        .owns_stream(account_events)
        .owns_stream(role_events)
        .owns_stream(binding_events)
        .owns_stream(claim_events)
        .watches_stream(budget_events, move |budget: CreditBudget| {
            let namespace = budget.namespace();
            let name = budget.name_any();
            budget_store
                .state()
                .into_iter()
                .filter(|t| t.namespace() == namespace && t.spec.budget_ref.name == name)
                .map(|t| ObjectRef::from_obj(&*t))
                .collect::<Vec<_>>()
        })
        .watches_stream(schedule_events, |schedule: RefreshSchedule| {
            // The table's Role names its schedules.
            let namespace = schedule.namespace()?;
            Some(ObjectRef::new(&schedule.spec.table_ref.name).within(&namespace))
        })
        .watches_stream(secret_events, move |secret: Secret| {
            let namespace = secret.namespace();
            let name = secret.name_any();
            store
                .state()
                .into_iter()
                .filter(|t| t.namespace() == namespace && t.spec.secret_names().contains(&name))
                .map(|t| ObjectRef::from_obj(&*t))
                .collect::<Vec<_>>()
        })
        .watches_stream(pod_events, |pod: SlimPod| {
            // Pods belong to ReplicaSets; the label names their table.
            let table = pod.labels().get(TABLE_LABEL)?.clone();
            Some(ObjectRef::new(&table).within(&pod.namespace()?))
        })
        .reconcile_on(
            ctx.take_tables_to_look_at()
                .expect("one table controller per operator"),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "enrichmenttable reconcile loop");
            }
        })
        .await;
}

async fn reconcile(table: Arc<EnrichmentTable>, ctx: Arc<Context>) -> Result<Action> {
    instrumented(&ctx, CONTROLLER, &*table, reconcile_inner(&table, &ctx)).await
}

async fn reconcile_inner(table: &EnrichmentTable, ctx: &Context) -> Result<Action> {
    let namespace = table
        .namespace()
        .ok_or_else(|| Error::NotNamespaced(table.name_any()))?;
    let caches = ctx
        .table_caches
        .get()
        .expect("the caches are set before the controller starts");
    caches.ready().await;
    let mut references = dereference(&ctx.client, caches, table, &namespace).await?;
    references.rate = ctx.rates.lock().unwrap().table_view(
        &namespace,
        &table.name_any(),
        std::time::Instant::now(),
    );
    let advice = &table.spec.tier_advice;
    let results_window = std::time::Duration::from(table.spec.clay.result_timeout)
        * advice.callbacks_missing_after_timeouts;
    {
        let volumes = ctx.volumes.lock().unwrap();
        references.volume = volumes.view(
            &namespace,
            &table.name_any(),
            jiff::Timestamp::now(),
            results_window,
        );
        let now = jiff::Timestamp::now();
        let contact = |peer| volumes.contact(&namespace, &table.name_any(), peer, now);
        references.clay_contact = contact(Peer::Clay);
        references.store_contact = contact(Peer::Store);
        references.kafka_contact = contact(Peer::Kafka);
    }

    let mut children = build::desired_children(
        table,
        &references.schedules,
        &ctx.build,
        references.resolved(),
    );
    let keda = matches!(references.autoscaling, Some(Autoscaling::Applied { .. }));
    let scaled = build::scaled_object(table).filter(|_| keda && references.resolved());
    if scaled.is_some()
        && let Some(spec) = children.worker.as_mut().and_then(|w| w.spec.as_mut())
    {
        // KEDA owns the worker count; applying ours would fight it.
        spec.replicas = None;
    }
    let applied = apply_children(
        &ctx.client,
        caches,
        &namespace,
        &table.name_any(),
        &children,
    )
    .await;
    if keda || scaled.is_some() {
        apply_scaled_object(&ctx.client, table, &namespace, scaled.as_ref()).await?;
    }
    let pod_failures = match &applied {
        Ok(deployments) if deployments.iter().any(|d| status::short_of_replicas(d)) => {
            let name = table.name_any();
            let pods: Vec<SlimPod> = caches
                .pods
                .state()
                .iter()
                .filter(|p| {
                    p.namespace().as_deref() == Some(namespace.as_str())
                        && p.labels().get(TABLE_LABEL) == Some(&name)
                })
                .map(|p| (**p).clone())
                .collect();
            status::pod_failures(&pods)
        }
        _ => Vec::new(),
    };
    let provisioning = match &applied {
        Ok(deployments) => Provisioning::Applied {
            deployments: deployments.iter().map(|d| &**d).collect(),
            pod_failures,
        },
        Err(error) => Provisioning::Failed(error.message()),
    };

    let new_status = status::compute(
        table,
        &references,
        &provisioning,
        Time::from(jiff::Timestamp::now()),
    );
    let old_conditions = table
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    // Conditions and references are written at once; counter and credit
    // movements at most every few seconds per table.
    let current = table.status.clone().unwrap_or_default();
    let only_counters = current.conditions == new_status.conditions
        && current.observed_generation == new_status.observed_generation
        && current.callback_url == new_status.callback_url;
    let key = ObjectRef::from_obj(table).to_string();
    let write = table.status.as_ref() != Some(&new_status)
        && (!only_counters || ctx.counters_write_due(&key, COUNTERS_RESYNC));
    if write {
        let api = Api::<EnrichmentTable>::namespaced(ctx.client.clone(), &namespace);
        patch_status(&api, &table.name_any(), &new_status).await?;
        publish_transitions(ctx, table, &old_conditions, &new_status.conditions).await;
    }
    // Status says why provisioning failed; the error itself drives the backoff.
    applied?;
    // While rows are moving, refresh the counters every few seconds.
    // A throttled counters update is written on the next pass.
    let unwritten = !write && table.status.as_ref() != Some(&new_status);
    let sending = new_status
        .rate
        .as_ref()
        .is_some_and(|r| r.observed_rows_per_second > 0.0 || r.throttled_last_minute > 0);
    let active = unwritten
        || sending
        || new_status.rows.pending > 0
        || new_status.rows.received > table.status.as_ref().map_or(0, |s| s.rows.received);
    // What no watch reports is looked at again soon: KEDA being installed,
    // a broker or Redis coming back. Everything else (Secrets, the budget,
    // pods becoming available) arrives as an event.
    let polling = matches!(references.autoscaling, Some(Autoscaling::KedaNotInstalled))
        || references
            .kafka_problems
            .as_ref()
            .is_some_and(|p| !p.is_empty())
        || references.redis_problem.is_some()
        // Traffic in the last hour: TierFit and CallbacksArriving follow it;
        // a failure a process reported ends by news or when no longer repeated.
        || {
            let volumes = ctx.volumes.lock().unwrap();
            let now = jiff::Timestamp::now();
            volumes.active(&namespace, &table.name_any(), now)
                || volumes.failure_reported(&namespace, &table.name_any(), now)
        };
    Ok(Action::requeue(if active {
        COUNTERS_RESYNC
    } else if polling {
        WAITING_RESYNC
    } else {
        RESYNC
    }))
}

/// Emits Events when a condition changes: a Warning when one turns False,
/// a Normal one when it is True again.
async fn publish_transitions(
    ctx: &Context,
    table: &EnrichmentTable,
    old: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    new: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) {
    for condition in new {
        let before = find_condition(old, &condition.type_);
        let changed =
            before.is_none_or(|b| b.status != condition.status || b.reason != condition.reason);
        if !changed {
            continue;
        }
        let was_false = before.is_some_and(|b| b.status == FALSE);
        match (condition.type_.as_str(), condition.status.as_str()) {
            (status::PROVISIONED, TRUE) if before.is_none_or(|b| b.status != TRUE) => {
                ctx.event(
                    table,
                    EventType::Normal,
                    "Provisioned",
                    "Provision",
                    condition.message.clone(),
                )
                .await;
            }
            (status::READY, TRUE) if was_false => {
                ctx.event(
                    table,
                    EventType::Normal,
                    "Recovered",
                    "Reconcile",
                    "the table is Ready again".into(),
                )
                .await;
            }
            // Ready is the roll-up of the others, which say why.
            (status::READY, FALSE) => {}
            // Any other condition turning False is a Warning; back to True
            // after being False, a Normal Event whose reason names the
            // recovery (TierFit's VolumeWithinTier, ...).
            (_, state) if state == FALSE || was_false => {
                let kind = if state == FALSE {
                    EventType::Warning
                } else {
                    EventType::Normal
                };
                ctx.event(
                    table,
                    kind,
                    &condition.reason,
                    "Reconcile",
                    condition.message.clone(),
                )
                .await;
            }
            _ => {}
        }
    }
}
