//! Status computed from hand-made observations: each condition's reasons
//! and the Ready roll-up.

use std::collections::BTreeMap;

use crate::operator::slim::SlimPod;

use super::*;
use crate::api::table::CreditCost;

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
    let crashing = |name: &str, message: &str| -> SlimPod {
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
    let starting: SlimPod = serde_json::from_value(serde_json::json!({
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
