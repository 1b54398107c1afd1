//! Dereference: what a table refers to (its budget, Secrets, schedules,
//! brokers, KEDA) and its row counters, as references for build and status.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt};

use super::TableCaches;
use super::status::{self, Autoscaling, References};
use crate::api::EnrichmentTable;
use crate::api::refresh::RefreshOutcome;
use crate::api::table::Tier;
use crate::operator::error::{AtStep, Result, Step};

/// Looks up, in the caches, the budget, Secrets and schedules the table
/// names, and reads its row counters. The caches know of Secret values only
/// whether each is blank; the one value the operator reads is the Redis URL,
/// fetched by the counters reader when its Secret's version changes.
pub(super) async fn dereference(
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
