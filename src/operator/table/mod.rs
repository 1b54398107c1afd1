//! The EnrichmentTable controller: dereference → build → apply → status.

pub mod advice;
pub mod build;
pub mod counters;
pub mod status;
pub mod volume;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Api;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};

use self::build::TableChildren;
use self::status::{Autoscaling, Provisioning, References};
use super::apply::patch_status;
use super::cache::{Children, cached};
use super::context::{Context, error_policy, instrumented};
use super::error::{AtStep, Error, Result, Step};
use super::labels::{MANAGED_BY, MANAGED_LABEL, TABLE_LABEL};
use crate::api::common::{FALSE, TRUE, find_condition};
use crate::api::refresh::RefreshOutcome;
use crate::api::table::Tier;
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

/// What a table's reconcile reads and writes, cached by the controller's
/// watches: its children, the budgets, schedules and Secrets it refers to
/// (Secrets slimmed to whether each value is blank), and its row counters'
/// Redis connections.
pub struct TableCaches {
    deployments: Arc<Children<Deployment>>,
    services: Arc<Children<Service>>,
    accounts: Arc<Children<ServiceAccount>>,
    roles: Arc<Children<Role>>,
    bindings: Arc<Children<RoleBinding>>,
    claims: Arc<Children<PersistentVolumeClaim>>,
    budgets: Store<CreditBudget>,
    schedules: Store<RefreshSchedule>,
    secrets: Store<Secret>,
    /// The tables' pods, reduced to their container states.
    pods: Store<Pod>,
    counters: counters::RowCounterReader,
}

impl TableCaches {
    /// Waits until every cache holds what its first list returned: before
    /// that, a Secret or budget missing from a cache may only not be
    /// listed yet.
    async fn ready(&self) {
        self.deployments.ready().await;
        self.services.ready().await;
        self.accounts.ready().await;
        self.roles.ready().await;
        self.bindings.ready().await;
        self.claims.ready().await;
        let _ = self.budgets.wait_until_ready().await;
        let _ = self.schedules.wait_until_ready().await;
        let _ = self.secrets.wait_until_ready().await;
        let _ = self.pods.wait_until_ready().await;
    }
}

/// Keeps of a pod its name, labels and container states: status reports why
/// a table's pods crash or cannot start.
fn slim_pod(pod: &mut Pod) {
    pod.metadata.annotations = None;
    pod.spec = None;
    if let Some(status) = pod.status.as_mut() {
        status.conditions = None;
        status.init_container_statuses = None;
    }
}

/// Keeps of a Secret only its name, labels, version and whether each value
/// is blank: the operator never needs the values, and they may be large.
fn slim_secret(secret: &mut Secret) {
    secret.metadata.annotations = None;
    secret.string_data = None;
    if let Some(data) = secret.data.as_mut() {
        for value in data.values_mut() {
            let blank = value.0.trim_ascii().is_empty();
            value.0 = if blank { Vec::new() } else { vec![1] };
        }
    }
}

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
    let (tables, table_events) = cached(tables, watcher::Config::default(), |_| {});
    let controller = Controller::for_stream(table_events, tables)
        .with_config(controller::Config::default().concurrency(CONCURRENCY));
    let store = controller.store();
    let budget_store = store.clone();
    let all = watcher::Config::default;
    // Of children, status only reads Deployments' replicas and availability.
    let (deployments, deployment_events) =
        Children::watch(ctx.watched(), owned.clone(), |d: &mut Deployment| {
            if let Some(spec) = d.spec.as_mut() {
                spec.template = Default::default();
            }
        });
    let (services, service_events) =
        Children::watch(ctx.watched(), owned.clone(), |s: &mut Service| {
            s.spec = None
        });
    let (accounts, account_events) = Children::watch(ctx.watched(), owned.clone(), |_| {});
    let (roles, role_events) =
        Children::watch(ctx.watched(), owned.clone(), |r: &mut Role| r.rules = None);
    let (bindings, binding_events) =
        Children::watch(ctx.watched(), owned.clone(), |b: &mut RoleBinding| {
            b.subjects = None
        });
    let (claims, claim_events) = Children::watch(
        ctx.watched(),
        owned.clone(),
        |c: &mut PersistentVolumeClaim| c.spec = None,
    );
    let (pods, pod_events) = cached(ctx.watched(), owned, slim_pod);
    let (budgets, budget_events) = cached(ctx.watched(), all(), |_| {});
    let (schedules, schedule_events) = cached(ctx.watched(), all(), |_| {});
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
        .watches_stream(pod_events, |pod: Pod| {
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
            let pods: Vec<Pod> = caches
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

/// Looks up, in the caches, the budget, Secrets and schedules the table
/// names, and reads its row counters. The caches know of Secret values only
/// whether each is blank; the one value the operator reads is the Redis URL,
/// fetched by the counters reader when its Secret's version changes.
async fn dereference(
    client: &Client,
    caches: &TableCaches,
    table: &EnrichmentTable,
    namespace: &str,
) -> Result<References> {
    let budget_name = &table.spec.budget_ref.name;
    let budget = caches
        .budgets
        .get(&ObjectRef::new(budget_name).within(namespace));
    let budget_problem = match &budget {
        None => Some((
            "BudgetNotFound",
            format!(
                "CreditBudget {budget_name:?} not found in namespace {namespace:?}; create it or fix spec.budgetRef.name (workloads stay scaled to zero until then)"
            ),
        )),
        Some(budget) => status::budget_too_small(table, budget).map(|m| ("BudgetTooSmall", m)),
    };

    let mut existing = BTreeMap::new();
    for name in table.spec.secret_names() {
        if let Some(secret) = caches.secrets.get(&ObjectRef::new(&name).within(namespace)) {
            let keys: BTreeMap<String, bool> = secret
                .data
                .iter()
                .flatten()
                .map(|(key, value)| (key.clone(), !value.0.trim_ascii().is_empty()))
                .collect();
            existing.insert(name, keys);
        }
    }
    let table_name = table.name_any();
    let credits_this_period = budget
        .as_ref()
        .and_then(|b| b.status.as_ref())
        .and_then(|s| s.tables.iter().find(|t| t.table == table_name))
        .map(|t| t.used.clone())
        .unwrap_or_default();
    let secret_problems = status::secret_problems(table, &existing);
    let redis = if secret_problems.is_empty() {
        let version = table
            .spec
            .redis
            .as_ref()
            .and_then(|r| {
                caches
                    .secrets
                    .get(&ObjectRef::new(&r.url_secret_ref.name).within(namespace))
            })
            .and_then(|s| s.metadata.resource_version.clone())
            .unwrap_or_default();
        caches
            .counters
            .read(client, table, namespace, &version)
            .await
    } else {
        None
    };
    let kafka_problems = if table.spec.tier == Tier::Event {
        Some(probe_brokers(table).await)
    } else {
        None
    };
    let autoscaling = match &table.spec.workers.autoscaling {
        Some(a) if table.spec.tier == Tier::Event => Some(if keda_installed(client).await? {
            Autoscaling::Applied {
                min: a.min_replicas,
                max: a.max_replicas,
                lag: a.lag_threshold,
            }
        } else {
            Autoscaling::KedaNotInstalled
        }),
        _ => None,
    };
    let mine: Vec<_> = caches
        .schedules
        .state()
        .into_iter()
        .filter(|s| {
            s.namespace().as_deref() == Some(namespace) && s.spec.table_ref.name == table_name
        })
        .collect();
    let mut schedules: Vec<String> = mine.iter().map(|s| s.name_any()).collect();
    schedules.sort();
    let schedules_skipping_for_budget = mine
        .iter()
        .filter(|s| {
            s.status
                .as_ref()
                .and_then(|status| status.last_run.as_ref())
                .is_some_and(|run| run.outcome == RefreshOutcome::SkippedForBudget)
        })
        .map(|s| s.name_any())
        .collect();
    Ok(References {
        budget_problem,
        secret_problems,
        credits_this_period,
        rows: redis.as_ref().and_then(|r| r.as_ref().ok().cloned()),
        redis_problem: redis.and_then(|r| r.err()),
        kafka_problems,
        autoscaling,
        schedules,
        schedules_skipping_for_budget,
        rate: None,
        volume: None,
        clay_contact: None,
        store_contact: None,
        kafka_contact: None,
    })
}

/// How long the operator waits for a broker to accept a connection.
const BROKER_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Tries a TCP connection to every broker the table names (source, sink,
/// dead letters) and describes the ones that refused, with their address.
async fn probe_brokers(table: &EnrichmentTable) -> Vec<String> {
    let spec = &table.spec;
    let mut brokers: BTreeSet<String> = BTreeSet::new();
    let connections = [
        spec.source.kafka.as_ref().map(|k| &k.connection),
        spec.sink
            .as_ref()
            .and_then(|s| s.kafka.as_ref())
            .and_then(|k| k.connection.as_ref()),
        spec.dead_letter
            .as_ref()
            .and_then(|d| d.kafka.as_ref())
            .and_then(|k| k.connection.as_ref()),
    ];
    for connection in connections.into_iter().flatten() {
        brokers.extend(connection.brokers.iter().cloned());
    }
    let probes = brokers.into_iter().map(|broker| async move {
        match tokio::time::timeout(
            BROKER_PROBE_TIMEOUT,
            tokio::net::TcpStream::connect(&broker),
        )
        .await
        {
            Ok(Ok(_)) => None,
            Ok(Err(error)) => Some(format!("broker {broker}: {error}")),
            Err(_) => Some(format!(
                "broker {broker}: no answer within {}s",
                BROKER_PROBE_TIMEOUT.as_secs()
            )),
        }
    });
    futures::future::join_all(probes)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Whether KEDA's ScaledObject CRD is installed in the cluster.
async fn keda_installed(client: &Client) -> Result<bool> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    Ok(Api::<CustomResourceDefinition>::all(client.clone())
        .get_opt("scaledobjects.keda.sh")
        .await
        .at(Step::Read, || {
            "CustomResourceDefinition scaledobjects.keda.sh".into()
        })?
        .is_some())
}

/// Applies or removes the table's KEDA ScaledObject (only when KEDA is installed).
async fn apply_scaled_object(
    client: &Client,
    table: &EnrichmentTable,
    namespace: &str,
    wanted: Option<&kube::api::DynamicObject>,
) -> Result<()> {
    let resource = build::scaled_object_resource();
    let api =
        Api::<kube::api::DynamicObject>::namespaced_with(client.clone(), namespace, &resource);
    let name = build::worker_name(&table.name_any());
    let scaled_object = || format!("ScaledObject {namespace}/{name}");
    match wanted {
        Some(object) => {
            let params =
                kube::api::PatchParams::apply(crate::operator::labels::FIELD_MANAGER).force();
            api.patch(&name, &params, &kube::api::Patch::Apply(object))
                .await
                .at(Step::Apply, scaled_object)?;
        }
        None => {
            if api
                .get_opt(&name)
                .await
                .at(Step::Read, scaled_object)?
                .is_some()
            {
                api.delete(&name, &Default::default())
                    .await
                    .at(Step::Delete, scaled_object)?;
            }
        }
    }
    Ok(())
}

/// Applies every desired child that changed and deletes the ones no longer
/// desired. Returns the Deployments (with their status) for availability.
async fn apply_children(
    client: &Client,
    caches: &TableCaches,
    namespace: &str,
    table_name: &str,
    children: &TableChildren,
) -> Result<Vec<Arc<Deployment>>> {
    caches
        .accounts
        .apply(client, &children.service_account)
        .await?;
    caches.roles.apply(client, &children.role).await?;
    caches
        .bindings
        .apply(client, &children.role_binding)
        .await?;
    if let Some(store) = &children.store {
        caches.claims.apply(client, store).await?;
    }
    let mut deployments = vec![caches.deployments.apply(client, &children.receiver).await?];
    if let Some(worker) = &children.worker {
        deployments.push(caches.deployments.apply(client, worker).await?);
    }
    caches.services.apply(client, &children.service).await?;

    let labels = [(MANAGED_LABEL, MANAGED_BY), (TABLE_LABEL, table_name)];
    let keep: Vec<String> = deployments.iter().map(|d| d.name_any()).collect();
    caches
        .deployments
        .delete_unwanted(client, namespace, &labels, &keep)
        .await?;
    let keep: Vec<String> = children.store.iter().map(|s| s.name_any()).collect();
    caches
        .claims
        .delete_unwanted(client, namespace, &labels, &keep)
        .await?;
    Ok(deployments)
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
