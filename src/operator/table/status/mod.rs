//! Pure status computation for an EnrichmentTable.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::common::{Conditions, TRUE};
use crate::api::table::{ObservedVolume, RateStatus, RowCounters};
use crate::api::{EnrichmentTable, EnrichmentTableStatus};
use crate::contact::Contact;
use crate::contract::{CALLBACK_PATH, INGEST_PATH};

mod references;
#[cfg(test)]
mod tests;
mod workload;

pub use self::references::{Autoscaling, References, budget_too_small, secret_problems};
use self::workload::availability;
pub use self::workload::{Provisioning, pod_failures, short_of_replicas};

pub const READY: &str = "Ready";
pub const SECRETS_RESOLVED: &str = "SecretsResolved";
pub const BUDGET_RESOLVED: &str = "BudgetResolved";
pub const PROVISIONED: &str = "Provisioned";
pub const WORKERS_AVAILABLE: &str = "WorkersAvailable";
pub const KAFKA_REACHABLE: &str = "KafkaReachable";
pub const AUTOSCALING: &str = "Autoscaling";
pub const CLAY_RATE_ACCEPTED: &str = "ClayRateAccepted";
pub const CLAY_REACHABLE: &str = "ClayReachable";
pub const REDIS_REACHABLE: &str = "RedisReachable";

/// 429s in a minute, and their share of the rows sent, from which the
/// workspace is called over its limit.
const THROTTLED_MIN: u64 = 5;
const THROTTLED_PERCENT: u64 = 1;

/// Computes the table's status. Counters and credits are carried over from
/// the current status: the data plane reports them, not this controller.
pub fn compute(
    table: &EnrichmentTable,
    references: &References,
    provisioning: &Provisioning<'_>,
    now: Time,
) -> EnrichmentTableStatus {
    let current = table.status.clone().unwrap_or_default();
    let generation = table.metadata.generation;
    let namespace = table.metadata.namespace.clone().unwrap_or_default();
    let name = table.metadata.name.clone().unwrap_or_default();
    let previous = &current.conditions;
    let cond = Conditions::new(previous, generation, now.clone());

    let secrets = if references.secret_problems.is_empty() {
        cond.set(
            SECRETS_RESOLVED,
            true,
            "SecretsFound",
            "every referenced Secret key exists".into(),
        )
    } else {
        cond.set(
            SECRETS_RESOLVED,
            false,
            "SecretNotFound",
            format!(
                "{}; create them in namespace {namespace:?} (workloads stay scaled to zero until then)",
                references.secret_problems.join("; ")
            ),
        )
    };
    let budget = match &references.budget_problem {
        None => cond.set(
            BUDGET_RESOLVED,
            true,
            "BudgetFound",
            format!("drawing on CreditBudget {:?}", table.spec.budget_ref.name),
        ),
        Some((reason, problem)) => cond.set(BUDGET_RESOLVED, false, reason, problem.clone()),
    };
    let (provisioned, workers) = match provisioning {
        Provisioning::Failed(message) => (
            cond.set(PROVISIONED, false, "ApplyFailed", message.clone()),
            cond.set(
                WORKERS_AVAILABLE,
                false,
                "NotProvisioned",
                "children could not be applied".into(),
            ),
        ),
        Provisioning::Applied {
            deployments,
            pod_failures,
        } => {
            let provisioned = cond.set(
                PROVISIONED,
                true,
                "ChildrenApplied",
                "ServiceAccount, RBAC, Deployments and Service are applied".into(),
            );
            let short: Vec<String> = deployments
                .iter()
                .filter_map(|d| {
                    let (desired, available) = availability(d);
                    short_of_replicas(d).then(|| {
                        format!(
                            "{}: {available}/{desired} available",
                            d.metadata.name.as_deref().unwrap_or_default()
                        )
                    })
                })
                .collect();
            let scaled_down = !references.resolved();
            let workers = if scaled_down {
                cond.set(
                    WORKERS_AVAILABLE,
                    false,
                    "ScaledToZero",
                    "workloads are scaled to zero until references resolve".into(),
                )
            } else if short.is_empty() {
                cond.set(
                    WORKERS_AVAILABLE,
                    true,
                    "Available",
                    "all worker and receiver replicas are available".into(),
                )
            } else if !pod_failures.is_empty() {
                let message = format!("{}; {}", short.join(", "), pod_failures.join("; "));
                cond.set(WORKERS_AVAILABLE, false, "PodsFailing", message)
            } else {
                cond.set(WORKERS_AVAILABLE, false, "WaitingForPods", short.join(", "))
            };
            (provisioned, workers)
        }
    };

    let from_pods = |name: &str, service: &str, contact: Option<&Contact>| {
        match contact {
        Some(Contact::Unreachable(detail)) => Some(cond.set(
            name,
            false,
            "UnreachableFromPods",
            format!(
                "the operator reaches {service} but the table's pods do not ({detail}): check NetworkPolicies and egress for the namespace's pods; rows wait and are retried"
            ),
        )),
        _ => None,
    }
    };
    let kafka = references.kafka_problems.as_ref().map(|problems| {
        if !problems.is_empty() {
            cond.set(
                KAFKA_REACHABLE,
                false,
                "BrokerUnreachable",
                format!(
                    "{}; workers keep retrying (check the addresses, NetworkPolicies and TLS settings)",
                    problems.join("; ")
                ),
            )
        } else {
            from_pods(KAFKA_REACHABLE, "Kafka", references.kafka_contact.as_ref()).unwrap_or_else(|| {
                cond.set(
                    KAFKA_REACHABLE,
                    true,
                    "BrokersReachable",
                    "every configured Kafka broker accepts connections".into(),
                )
            })
        }
    });
    let autoscaling = references.autoscaling.as_ref().map(|a| match a {
        Autoscaling::Applied { min, max, lag } => cond.set(
            AUTOSCALING,
            true,
            "ScaledObjectApplied",
            format!("KEDA scales workers between {min} and {max} at {lag} records of lag per worker"),
        ),
        Autoscaling::KedaNotInstalled => cond.set(
            AUTOSCALING,
            false,
            "KedaNotInstalled",
            format!(
                "KEDA's ScaledObject CRD (scaledobjects.keda.sh) is not installed; the worker Deployment keeps spec.workers.replicas={}",
                table.spec.workers.replicas
            ),
        ),
    });
    let clay_rate = rate_condition(&cond, references.rate.as_ref());
    let clay_reachable = reachable_condition(&cond, references.clay_contact.as_ref());
    let spec = &table.spec;
    let volume = references.volume.as_ref();
    let (holds, reason, message) = super::advice::tier_fit(spec.tier, &spec.tier_advice, volume);
    let tier_fit = cond.set(super::advice::TIER_FIT, holds, reason, message);
    let callback_url = format!(
        "{}{CALLBACK_PATH}",
        crate::contract::receiver_url(&name, &namespace)
    );
    let (holds, reason, message) = super::advice::callbacks_arriving(
        &spec.tier_advice,
        spec.clay.result_timeout.into(),
        volume,
        &callback_url,
    );
    let callbacks = cond.set(super::advice::CALLBACKS_ARRIVING, holds, reason, message);
    let oldest_enriched = references
        .rows
        .as_ref()
        .and_then(|r| r.oldest_enriched.clone());
    let (holds, reason, message) = super::advice::fresh(
        &spec.tier_advice,
        &references.schedules,
        &references.schedules_skipping_for_budget,
        oldest_enriched.as_ref().map(|t| t.0),
        now.0,
    );
    let fresh = cond.set(super::advice::FRESH, holds, reason, message);
    // Known only once the Secrets resolve (the URL is in one).
    let redis = (table.spec.redis.is_some() && references.secret_problems.is_empty()).then(|| {
        match &references.redis_problem {
            Some(problem) => cond.set(
                REDIS_REACHABLE,
                false,
                "RedisUnreachable",
                format!("{problem}; workers and receivers need it (check the address, the password in the URL and NetworkPolicies)"),
            ),
            None => from_pods(REDIS_REACHABLE, "Redis", references.store_contact.as_ref()).unwrap_or_else(|| {
                cond.set(
                    REDIS_REACHABLE,
                    true,
                    "Connected",
                    "the operator reads the table's row counters from Redis".into(),
                )
            }),
        }
    });
    let mut parts = vec![&secrets, &budget, &provisioned, &workers];
    parts.extend(kafka.as_ref());
    parts.extend(redis.as_ref());
    let ready = match parts.iter().find(|c| c.status != TRUE) {
        None => cond.set(
            READY,
            true,
            "Ready",
            "the pipeline is provisioned and available".into(),
        ),
        Some(blocking) => cond.set(READY, false, &blocking.reason, blocking.message.clone()),
    };
    let receiver = crate::contract::receiver_url(&name, &namespace);
    EnrichmentTableStatus {
        observed_generation: generation,
        conditions: [ready, secrets, budget, provisioned, workers]
            .into_iter()
            .chain(kafka)
            .chain(redis)
            .chain(autoscaling)
            .chain([clay_reachable, clay_rate, tier_fit, callbacks, fresh])
            .collect(),
        callback_url: Some(format!("{receiver}{CALLBACK_PATH}")),
        ingest_url: Some(format!("{receiver}{INGEST_PATH}")),
        credits_this_period: references.credits_this_period.clone(),
        rows: references
            .rows
            .as_ref()
            .map_or(current.rows.clone(), |r| r.rows.clone()),
        last_enriched_at: references
            .rows
            .as_ref()
            .and_then(|r| r.last_enriched.clone())
            .or(current.last_enriched_at.clone()),
        oldest_enriched_at: oldest_enriched.or(current.oldest_enriched_at.clone()),
        webhook_source_rows: references
            .rows
            .as_ref()
            .map_or(current.webhook_source_rows.clone(), |r| {
                r.source_rows.clone()
            }),
        observed: references.volume.as_ref().map(|v| ObservedVolume {
            rows_last_day: v.rows_last_day,
            rows_per_day_recent: v.rows_per_day_recent,
            observed_seconds: v.observed_seconds,
            result_latency_p50_ms: v.result_latency_p50_ms,
            result_latency_p95_ms: v.result_latency_p95_ms,
            callbacks_percent: (v.rows_last_day > 0).then(|| {
                (v.results_last_day.saturating_mul(100) / v.rows_last_day).min(100) as u32
            }),
        }),
        rate: references.rate.as_ref().map(|rate| RateStatus {
            limit_rows_per_second: tenths(rate.workspace_limit),
            share_rows_per_second: tenths(rate.share),
            observed_rows_per_second: tenths(rate.observed),
            holders: rate.holders,
            submitted_last_minute: rate.submitted_last_minute,
            throttled_last_minute: rate.throttled_last_minute,
        }),
    }
}

/// Rounded so that status changes with the rate, not with its noise.
fn tenths(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

/// Whether the table's processes reach Clay: what they last reported.
fn reachable_condition(
    cond: &Conditions<'_>,
    contact: Option<&Contact>,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    match contact {
        Some(Contact::Unreachable(detail)) => cond.set(
            CLAY_REACHABLE,
            false,
            "Unreachable",
            format!(
                "the table's processes get no answer from Clay ({detail}): check the webhook URL's host in its Secret, DNS, and egress from the namespace (NetworkPolicy, proxy); rows wait and are retried"
            ),
        ),
        Some(Contact::Answered) => cond.set(
            CLAY_REACHABLE,
            true,
            "Answered",
            "Clay answers the table's requests".into(),
        ),
        None => cond.set(
            CLAY_REACHABLE,
            true,
            "NotContacted",
            "no process of the table has called Clay since the operator's leader started".into(),
        ),
    }
}

fn rate_condition(
    cond: &Conditions<'_>,
    rate: Option<&crate::operator::rate::TableRate>,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    let (submitted, throttled) = rate.map_or((0, 0), |r| {
        (r.submitted_last_minute, r.throttled_last_minute)
    });
    if throttled >= THROTTLED_MIN && throttled * 100 >= submitted * THROTTLED_PERCENT {
        let limit = rate.map_or(0.0, |r| r.workspace_limit);
        cond.set(
            CLAY_RATE_ACCEPTED,
            false,
            "ClayThrottling",
            format!(
                "Clay refused {throttled} of {submitted} rows with 429 in the last minute although this workspace's processes kept to {limit} rows/s: another client outside Kiln is using the workspace's rate, or the limit configured (the CreditBudget's workspace.rateLimit, else spec.clay.rateLimit) is above Clay's"
            ),
        )
    } else {
        cond.set(
            CLAY_RATE_ACCEPTED,
            true,
            "WithinLimit",
            "Clay accepts the table's rows at the rate Kiln keeps to (429s for under 1% of the rows sent in the last minute)".into(),
        )
    }
}

/// Turns the store's counter hash into status counters.
pub fn row_counters(
    counters: &std::collections::HashMap<String, i64>,
    pending: u64,
) -> (RowCounters, Option<Time>) {
    let get = |name: &str| counters.get(name).copied().unwrap_or(0).max(0) as u64;
    let last = counters
        .get("lastEnrichedAtMs")
        .and_then(|ms| jiff::Timestamp::from_millisecond(*ms).ok())
        .map(Time);
    (
        RowCounters {
            received: get("received"),
            deduplicated: get("deduplicated"),
            submitted: get("submitted"),
            enriched: get("enriched"),
            delivered: get("delivered"),
            dead_lettered: get("deadLettered"),
            dead_lettered_by_reason: counters
                .iter()
                .filter_map(|(name, n)| {
                    let reason = name.strip_prefix("deadLettered:")?;
                    Some((reason.to_string(), (*n).max(0) as u64))
                })
                .collect(),
            pending,
        },
        last,
    )
}
