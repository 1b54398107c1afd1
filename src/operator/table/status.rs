//! Pure status computation for an EnrichmentTable.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::common::{Conditions, TRUE};
use crate::api::table::{CreditCost, ObservedVolume, RateStatus, RowCounters};
use crate::api::{CreditBudget, EnrichmentTable, EnrichmentTableStatus};
use crate::contact::Contact;
use crate::contract::{CALLBACK_PATH, INGEST_PATH};

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

/// What dereferencing the table's references found.
#[derive(Clone, Debug, PartialEq)]
pub struct References {
    /// None when the budget exists and can pay for a row; otherwise the
    /// reason and why it is unusable.
    pub budget_problem: Option<(&'static str, String)>,
    /// Human-readable problems with Secret references, empty when all resolve.
    pub secret_problems: Vec<String>,
    /// This table's spend in the budget's current period, from the ledger.
    pub credits_this_period: CreditCost,
    /// Row counters and enrichment times read from the table's store, when
    /// it could be reached.
    pub rows: Option<super::counters::StoreReading>,
    /// Why the table's Redis could not be read, when it could not.
    pub redis_problem: Option<String>,
    /// Tier Event: why brokers could not be reached (empty when all were).
    pub kafka_problems: Option<Vec<String>>,
    /// Whether `spec.workers.autoscaling` is in effect.
    pub autoscaling: Option<Autoscaling>,
    /// RefreshSchedules of this table, by name (their runs use its Role).
    pub schedules: Vec<String>,
    /// Of those, the ones whose last run was skipped for the budget.
    pub schedules_skipping_for_budget: Vec<String>,
    /// The table's share of Clay's rate, when its processes hold one.
    pub rate: Option<crate::operator::rate::TableRate>,
    /// The table's traffic as the leader observed it, when there was any.
    pub volume: Option<super::volume::VolumeView>,
    /// Whether the table's processes reach Clay, Redis and Kafka, as they
    /// last reported.
    pub clay_contact: Option<Contact>,
    pub store_contact: Option<Contact>,
    pub kafka_contact: Option<Contact>,
}

/// The state of lag-based worker autoscaling.
#[derive(Clone, Debug, PartialEq)]
pub enum Autoscaling {
    /// A KEDA ScaledObject scales the workers.
    Applied { min: i32, max: i32, lag: u32 },
    /// KEDA's ScaledObject CRD is not installed: replicas stay fixed.
    KedaNotInstalled,
}

impl References {
    pub fn resolved(&self) -> bool {
        self.budget_problem.is_none() && self.secret_problems.is_empty()
    }
}

/// Why the budget can never pay for one of this table's rows, if so: a
/// row's worst case (spec.clay.creditsPerRow) above the budget's whole limit.
pub fn budget_too_small(table: &EnrichmentTable, budget: &CreditBudget) -> Option<String> {
    let row = &table.spec.clay.credits_per_row;
    let limits = &budget.spec.limits;
    let data = limits
        .data_credits
        .filter(|limit| row.data_credits > *limit)
        .map(|limit| {
            format!(
                "{} data credits against a limit of {limit}",
                row.data_credits
            )
        });
    let actions = limits
        .actions
        .filter(|limit| row.actions > *limit)
        .map(|limit| format!("{} actions against a limit of {limit}", row.actions));
    let over: Vec<String> = data.into_iter().chain(actions).collect();
    (!over.is_empty()).then(|| {
        format!(
            "spec.clay.creditsPerRow ({}) is more than CreditBudget {:?} allows in a whole period: no row could ever be sent; lower creditsPerRow or raise the budget's limits",
            over.join(", "),
            budget.metadata.name.as_deref().unwrap_or_default()
        )
    })
}

/// Checks every Secret reference against the Secrets that exist, given as
/// name → set of keys. Values are never looked at.
pub fn secret_problems(
    table: &EnrichmentTable,
    existing: &BTreeMap<String, BTreeMap<String, bool>>,
) -> Vec<String> {
    let mut problems = BTreeSet::new();
    for reference in table.spec.secret_refs() {
        match existing
            .get(&reference.name)
            .map(|keys| keys.get(&reference.key))
        {
            None => {
                problems.insert(format!("Secret {:?} not found", reference.name));
            }
            Some(None) => {
                problems.insert(format!(
                    "Secret {:?} has no key {:?}",
                    reference.name, reference.key
                ));
            }
            // An empty token would switch authentication off.
            Some(Some(false)) => {
                problems.insert(format!(
                    "Secret {:?} key {:?} is empty or only whitespace",
                    reference.name, reference.key
                ));
            }
            Some(Some(true)) => {}
        }
    }
    let headers = table
        .spec
        .sink
        .as_ref()
        .and_then(|s| s.http.as_ref())
        .and_then(|h| h.headers_secret_name.as_ref());
    if let Some(name) = headers
        && !existing.contains_key(name)
    {
        problems.insert(format!(
            "Secret {name:?} (spec.sink.http.headersSecretName) not found"
        ));
    }
    problems.into_iter().collect()
}

/// Desired and available replicas of a Deployment as applied.
fn availability(deployment: &Deployment) -> (i32, i32) {
    let desired = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let available = deployment
        .status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0);
    (desired, available)
}

/// The outcome of applying the children.
pub enum Provisioning<'a> {
    Applied {
        deployments: Vec<&'a Deployment>,
        /// Why pods of a workload that is short of replicas fail, one line
        /// each (see [`pod_failures`]); empty while they only start.
        pod_failures: Vec<String>,
    },
    Failed(String),
}

/// Fewer replicas available than desired.
pub fn short_of_replicas(deployment: &Deployment) -> bool {
    let (desired, available) = availability(deployment);
    available < desired
}

/// Pods whose containers crash or cannot start, with the reason and the last
/// words of the process (its termination message), for the status.
pub fn pod_failures(pods: &[Pod]) -> Vec<String> {
    const STUCK: [&str; 5] = [
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "CreateContainerConfigError",
        "CreateContainerError",
    ];
    // Pods failing the same way are reported once, with their names.
    let mut failures: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for pod in pods {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let statuses = pod
            .status
            .iter()
            .flat_map(|s| s.container_statuses.iter().flatten());
        for container in statuses {
            let Some(waiting) = container.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
                continue;
            };
            let reason = waiting.reason.as_deref().unwrap_or_default();
            if !STUCK.contains(&reason) {
                continue;
            }
            let last_words = container
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .and_then(|t| t.message.as_deref())
                .map(process_error)
                .or(waiting.message.clone())
                .unwrap_or_default();
            failures
                .entry(format!("{reason}: {last_words}"))
                .or_default()
                .push(name);
        }
    }
    failures
        .into_iter()
        .map(|(failure, pods)| format!("pod {}: {failure}", pods.join(", ")))
        .collect()
}

/// The error a Kiln process exited with, from its last (JSON) log line;
/// other text as it is, bounded.
fn process_error(message: &str) -> String {
    let last_line = message.trim().lines().last().unwrap_or_default();
    let error = serde_json::from_str::<serde_json::Value>(last_line)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| last_line.to_string());
    error.chars().take(400).collect()
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// References that resolve, with nothing read yet.
    fn references() -> References {
        References {
            budget_problem: None,
            secret_problems: vec![],
            credits_this_period: CreditCost::default(),
            rows: None,
            redis_problem: None,
            kafka_problems: None,
            autoscaling: None,
            schedules: vec![],
            schedules_skipping_for_budget: vec![],
            rate: None,
            volume: None,
            clay_contact: None,
            store_contact: None,
            kafka_contact: None,
        }
    }
    use crate::api::common::find_condition;
    use crate::operator::table::build::tests::queue_table;

    /// Secrets with the given keys, every value non-blank.
    fn keys(entries: &[(&str, &[&str])]) -> BTreeMap<String, BTreeMap<String, bool>> {
        entries
            .iter()
            .map(|(name, keys)| {
                (
                    name.to_string(),
                    keys.iter().map(|k| (k.to_string(), true)).collect(),
                )
            })
            .collect()
    }

    /// The queue table's status, its children applied.
    fn status_of(references: &References) -> EnrichmentTableStatus {
        compute(
            &queue_table(),
            references,
            &Provisioning::Applied {
                deployments: vec![],
                pod_failures: vec![],
            },
            now(),
        )
    }

    fn now() -> Time {
        Time::from("2026-11-27T12:00:00Z".parse::<jiff::Timestamp>().unwrap())
    }

    #[test]
    fn missing_secrets_and_keys_are_named() {
        let existing = keys(&[
            ("clay", &["url-a"]),
            ("callback", &["token"]),
            ("redis", &["url"]),
        ]);
        let problems = secret_problems(&queue_table(), &existing);
        assert_eq!(
            problems,
            vec![
                "Secret \"clay\" has no key \"token\"".to_string(),
                "Secret \"clay-2\" not found".to_string(),
                "Secret \"crm-headers\" (spec.sink.http.headersSecretName) not found".to_string(),
            ]
        );
    }

    #[test]
    fn blank_values_and_a_missing_headers_secret_are_named() {
        let mut existing = keys(&[
            ("clay", &["url-a", "token"]),
            ("clay-2", &["url"]),
            ("callback", &["token"]),
            ("redis", &["url"]),
        ]);
        existing
            .get_mut("callback")
            .unwrap()
            .insert("token".into(), false);
        let mut table = queue_table();
        table.spec.sink = Some(
            serde_json::from_value(
                serde_json::json!({"http": {"urlTemplate": "https://crm/{id}", "headersSecretName": "crm-headers"}}),
            )
            .unwrap(),
        );
        assert_eq!(
            secret_problems(&table, &existing),
            vec![
                "Secret \"callback\" key \"token\" is empty or only whitespace".to_string(),
                "Secret \"crm-headers\" (spec.sink.http.headersSecretName) not found".to_string(),
            ]
        );
    }

    #[test]
    fn ready_is_false_with_the_first_blocking_reason() {
        let references = References {
            budget_problem: Some(("BudgetNotFound", "CreditBudget \"b\" not found".into())),
            ..references()
        };
        let status = status_of(&references);
        let ready = find_condition(&status.conditions, READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "BudgetNotFound")
        );
        assert_eq!(ready.observed_generation, Some(3));
        assert_eq!(
            status.callback_url.as_deref(),
            Some("http://leads-receiver.sales.svc:8080/v1/clay/callback")
        );
    }

    #[test]
    fn recomputing_an_unchanged_table_yields_an_identical_status() {
        let references = References {
            credits_this_period: CreditCost {
                data_credits: 12.5,
                actions: 3,
            },
            ..references()
        };
        let mut table = queue_table();
        let first = compute(
            &table,
            &references,
            &Provisioning::Applied {
                deployments: vec![],
                pod_failures: vec![],
            },
            now(),
        );
        table.status = Some(first.clone());
        let later = Time::from("2026-11-27T13:00:00Z".parse::<jiff::Timestamp>().unwrap());
        let second = compute(
            &table,
            &references,
            &Provisioning::Applied {
                deployments: vec![],
                pod_failures: vec![],
            },
            later,
        );
        assert_eq!(first, second, "no status churn: transition times are kept");
        assert!(find_condition(&second.conditions, READY).unwrap().status == "True");
        assert_eq!(second.credits_this_period.data_credits, 12.5);
        assert_eq!(second.credits_this_period.data_credits, 12.5);
    }

    #[test]
    fn many_429s_say_the_workspace_is_over_its_limit_without_making_the_table_unready() {
        let rate = |submitted, throttled| crate::operator::rate::TableRate {
            workspace_limit: 10.0,
            share: 9.96,
            observed: 9.94,
            holders: 3,
            submitted_last_minute: submitted,
            throttled_last_minute: throttled,
        };
        let status_with = |rate| {
            let references = References {
                rate: Some(rate),
                ..references()
            };
            status_of(&references)
        };
        let calm = status_with(rate(600, 3));
        assert_eq!(
            find_condition(&calm.conditions, CLAY_RATE_ACCEPTED)
                .unwrap()
                .status,
            "True"
        );
        let shown = calm.rate.unwrap();
        assert_eq!((shown.share_rows_per_second, shown.holders), (10.0, 3));
        assert_eq!(shown.observed_rows_per_second, 9.9);

        let throttled = status_with(rate(600, 40));
        let condition = find_condition(&throttled.conditions, CLAY_RATE_ACCEPTED).unwrap();
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            ("False", "ClayThrottling")
        );
        assert!(
            condition.message.contains("40 of 600"),
            "{}",
            condition.message
        );
        assert_eq!(
            find_condition(&throttled.conditions, READY).unwrap().status,
            "True"
        );
    }

    #[test]
    fn clay_unreachable_from_the_processes_is_named_in_a_condition() {
        let status_with = |contact| {
            let references = References {
                clay_contact: contact,
                ..references()
            };
            status_of(&references)
        };
        let down = status_with(Some(Contact::Unreachable(
            "api.clay.com:443: connection failed: refused".into(),
        )));
        let condition = find_condition(&down.conditions, CLAY_REACHABLE).unwrap();
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            ("False", "Unreachable")
        );
        assert!(condition.message.contains("api.clay.com:443"));
        let up = status_with(Some(Contact::Answered));
        assert_eq!(
            find_condition(&up.conditions, CLAY_REACHABLE)
                .unwrap()
                .reason,
            "Answered"
        );
        let unknown = status_with(None);
        assert_eq!(
            find_condition(&unknown.conditions, CLAY_REACHABLE)
                .unwrap()
                .status,
            "True"
        );
    }

    #[test]
    fn an_unreachable_redis_is_a_condition_that_holds_readiness() {
        let references = References {
            redis_problem: Some("Redis at 10.0.0.9:6379: connection refused".into()),
            ..references()
        };
        let status = status_of(&references);
        let redis = find_condition(&status.conditions, REDIS_REACHABLE).unwrap();
        assert_eq!(
            (redis.status.as_str(), redis.reason.as_str()),
            ("False", "RedisUnreachable")
        );
        assert!(redis.message.contains("10.0.0.9:6379"));
        let ready = find_condition(&status.conditions, READY).unwrap();
        assert_eq!(ready.reason, "RedisUnreachable");
    }

    #[test]
    fn redis_or_kafka_the_pods_cannot_reach_is_said_even_when_the_operator_can() {
        let down = Some(Contact::Unreachable(
            "redis.data:6379: connection refused".into(),
        ));
        let pods_cut_off_redis = References {
            store_contact: down.clone(),
            kafka_problems: Some(vec![]),
            kafka_contact: Some(Contact::Answered),
            ..references()
        };
        let status = status_of(&pods_cut_off_redis);
        let redis = find_condition(&status.conditions, REDIS_REACHABLE).unwrap();
        assert_eq!(
            (redis.status.as_str(), redis.reason.as_str()),
            ("False", "UnreachableFromPods")
        );
        assert!(
            redis.message.contains("redis.data:6379"),
            "{}",
            redis.message
        );
        assert_eq!(
            find_condition(&status.conditions, READY).unwrap().reason,
            "UnreachableFromPods"
        );
        assert_eq!(
            find_condition(&status.conditions, KAFKA_REACHABLE)
                .unwrap()
                .status,
            "True"
        );
        let pods_cut_off_kafka = References {
            kafka_problems: Some(vec![]),
            kafka_contact: down,
            store_contact: Some(Contact::Answered),
            ..references()
        };
        let status = status_of(&pods_cut_off_kafka);
        let kafka = find_condition(&status.conditions, KAFKA_REACHABLE).unwrap();
        assert_eq!(
            (kafka.status.as_str(), kafka.reason.as_str()),
            ("False", "UnreachableFromPods")
        );
        assert_eq!(
            find_condition(&status.conditions, REDIS_REACHABLE)
                .unwrap()
                .reason,
            "Connected"
        );
    }

    #[test]
    fn unreachable_brokers_make_the_table_unready_and_missing_keda_is_said() {
        let references = References {
            kafka_problems: Some(vec!["broker k-0:9092: connection refused".into()]),
            autoscaling: Some(Autoscaling::KedaNotInstalled),
            ..references()
        };
        let status = compute(
            &queue_table(),
            &references,
            &Provisioning::Applied {
                deployments: vec![],
                pod_failures: vec![],
            },
            Time::from(jiff::Timestamp::UNIX_EPOCH),
        );
        let kafka = find_condition(&status.conditions, KAFKA_REACHABLE).unwrap();
        assert_eq!(
            (kafka.status.as_str(), kafka.reason.as_str()),
            ("False", "BrokerUnreachable")
        );
        assert!(
            kafka
                .message
                .contains("broker k-0:9092: connection refused")
        );
        let ready = find_condition(&status.conditions, READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "BrokerUnreachable")
        );
        let scaling = find_condition(&status.conditions, AUTOSCALING).unwrap();
        assert_eq!(
            (scaling.status.as_str(), scaling.reason.as_str()),
            ("False", "KedaNotInstalled")
        );
    }

    #[test]
    fn crashing_pods_are_reported_once_per_failure_with_the_process_error() {
        let crashing = |name: &str, message: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "status": {"containerStatuses": [{
                    "name": "receiver", "image": "kiln", "imageID": "", "ready": false,
                    "restartCount": 3,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                    "lastState": {"terminated": {"exitCode": 1, "message": message}}
                }]}
            }))
            .unwrap()
        };
        let starting: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "c"},
            "status": {"containerStatuses": [{
                "name": "worker", "image": "kiln", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ContainerCreating"}}
            }]}
        }))
        .unwrap();
        let log = r#"{"level":"ERROR","message":"exiting","error":"opening the embedded store: Permission denied"}"#;
        let failures = pod_failures(&[crashing("a", log), crashing("b", log), starting]);
        assert_eq!(
            failures,
            vec!["pod a, b: CrashLoopBackOff: opening the embedded store: Permission denied"]
        );
    }
}
