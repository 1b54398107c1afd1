//! The CRDs as the API server enforces them: CEL and schema validation with
//! messages a human can act on, defaults, and printer columns.

#[path = "support/mod.rs"]
mod support;

use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde_json::{Value, json};

use kiln::api::{CreditBudget, EnrichmentTable, RefreshSchedule};

fn table(spec_patch: Value) -> Value {
    let mut spec = json!({
        "tier": "Queue",
        "key": "email",
        "budgetRef": {"name": "b"},
        "clay": {
            "webhookSources": [{"name": "s", "urlSecretRef": {"name": "clay", "key": "url"}}],
            "creditsPerRow": {"dataCredits": 2.0},
            "callbackTokenSecretRef": {"name": "clay", "key": "callback"}
        },
        "source": {"redisStream": {"stream": "in"}},
        "sink": {"redisStream": {"stream": "out"}},
        "deadLetter": {"redisStream": {"stream": "dead"}},
        "redis": {"urlSecretRef": {"name": "redis", "key": "url"}}
    });
    merge(&mut spec, spec_patch);
    json!({"apiVersion": "kiln.dev/v1alpha1", "kind": "EnrichmentTable", "metadata": {"name": "t"}, "spec": spec})
}

fn budget(spec_patch: Value) -> Value {
    let mut spec = json!({"limits": {"dataCredits": 100.0}});
    merge(&mut spec, spec_patch);
    json!({"apiVersion": "kiln.dev/v1alpha1", "kind": "CreditBudget", "metadata": {"name": "b"}, "spec": spec})
}

fn schedule(spec_patch: Value) -> Value {
    let mut spec = json!({
        "tableRef": {"name": "t"}, "schedule": "0 3 * * *", "maxAge": "720h", "maxRows": 10, "maxCredits": 50.0
    });
    merge(&mut spec, spec_patch);
    json!({"apiVersion": "kiln.dev/v1alpha1", "kind": "RefreshSchedule", "metadata": {"name": "r"}, "spec": spec})
}

/// JSON merge patch semantics: null deletes a key.
fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(&key);
                } else {
                    merge(target.entry(key).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch,
    }
}

async fn create_raw(
    client: &kube::Client,
    namespace: &str,
    object: &Value,
) -> Result<DynamicObject, kube::Error> {
    let kind = object["kind"].as_str().unwrap();
    let resource = match kind {
        "EnrichmentTable" => ApiResource::erase::<EnrichmentTable>(&()),
        "CreditBudget" => ApiResource::erase::<CreditBudget>(&()),
        _ => ApiResource::erase::<RefreshSchedule>(&()),
    };
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &resource);
    let object: DynamicObject = serde_json::from_value(object.clone()).unwrap();
    api.create(&PostParams::default(), &object).await
}

#[tokio::test]
async fn invalid_objects_are_rejected_with_actionable_messages() {
    let env = support::test_env("crd-cel").await;
    support::install_kiln_crds(&env.client).await;

    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "two sources",
            table(json!({"source": {"http": {"authTokenSecretRef": {"name": "a", "key": "b"}}}})),
            "set exactly one of source.http, source.redisStream, source.kafka",
        ),
        (
            "no source",
            table(json!({"source": {"redisStream": null}})),
            "set exactly one of source.http, source.redisStream, source.kafka",
        ),
        (
            "Event tier reading Redis",
            table(json!({"tier": "Event"})),
            "tier Event reads rows from Kafka: set source.kafka",
        ),
        (
            "Direct tier reading Redis",
            table(json!({"tier": "Direct", "sink": null, "deadLetter": null, "redis": null})),
            "tier Direct takes rows over HTTP: set source.http",
        ),
        (
            "Queue without sink",
            table(json!({"sink": null})),
            "tiers Queue and Event need a sink for results",
        ),
        (
            "Queue with Kafka sink",
            table(json!({"sink": {"redisStream": null, "kafka": {"topic": "out"}}})),
            "sink.kafka is only valid for tier Event",
        ),
        (
            "Queue without dead letter",
            table(json!({"deadLetter": null})),
            "tiers Queue and Event need a deadLetter destination",
        ),
        (
            "Queue dead-lettering to Kafka",
            table(json!({"deadLetter": {"redisStream": null, "kafka": {"topic": "dlq"}}})),
            "tier Queue dead-letters to a Redis Stream: use deadLetter.redisStream",
        ),
        (
            "Queue without Redis",
            table(json!({"redis": null})),
            "tiers Queue and Event keep state in Redis: set redis.urlSecretRef",
        ),
        (
            "bad dedupe window",
            table(json!({"dedupeWindow": "7 days"})),
            "dedupeWindow must be a positive duration such as 720h or 30m",
        ),
        (
            "zero result timeout",
            table(json!({"clay": {"resultTimeout": "0s"}})),
            "resultTimeout must be a positive duration such as 10m",
        ),
        (
            "cost pointer not a pointer",
            table(json!({"clay": {"costPointer": "kiln_credits"}})),
            "costPointer must be a JSON pointer starting with '/'",
        ),
        (
            "too many rows per request",
            table(json!({"clay": {"rowsPerRequest": 11}})),
            "spec.clay.rowsPerRequest: Invalid value",
        ),
        (
            "no webhook source",
            table(json!({"clay": {"webhookSources": []}})),
            "set clay.webhookSources (or, for tier Direct, clay.routine)",
        ),
        (
            "a routine outside tier Direct",
            table(
                json!({"clay": {"routine": {"routineId": "r", "apiKeySecretRef": {"name": "s", "key": "k"}}}}),
            ),
            "clay.routine answers in the request: only for tier Direct",
        ),
        (
            "secret ref without key",
            table(json!({"redis": {"urlSecretRef": {"name": "redis", "key": ""}}})),
            "spec.redis.urlSecretRef.key: Invalid value",
        ),
        (
            "non-http sink URL",
            table(json!({"sink": {"redisStream": null, "http": {"urlTemplate": "ftp://crm/x"}}})),
            "urlTemplate must be an http(s) URL",
        ),
        (
            "budget without limits",
            budget(json!({"limits": {"dataCredits": null}})),
            "set limits.dataCredits, limits.actions, or both",
        ),
        (
            "negative budget",
            budget(json!({"limits": {"dataCredits": -5.0}})),
            "limits.dataCredits must be positive",
        ),
        (
            "threshold over 100",
            budget(json!({"warningThresholds": [50, 120]})),
            "warning thresholds must be percentages between 1 and 100",
        ),
        (
            "thresholds descending",
            budget(json!({"warningThresholds": [90, 75]})),
            "warning thresholds must be in ascending order",
        ),
        (
            "unknown period",
            budget(json!({"period": "Hourly"})),
            "spec.period: Unsupported value: \"Hourly\"",
        ),
        (
            "bad breaker cooldown",
            budget(json!({"circuitBreaker": {"cooldown": "soon"}})),
            "cooldown must be a positive duration such as 30s",
        ),
        (
            "schedule with 3 fields",
            schedule(json!({"schedule": "0 3 *"})),
            "schedule must be a 5-field cron expression",
        ),
        (
            "zero credits per run",
            schedule(json!({"maxCredits": 0.0})),
            "maxCredits must be positive",
        ),
        (
            "bad maxAge",
            schedule(json!({"maxAge": "ninety days"})),
            "maxAge must be a positive duration such as 2160h",
        ),
        (
            "zero rows per run",
            schedule(json!({"maxRows": 0})),
            "spec.maxRows: Invalid value",
        ),
        (
            "unknown concurrency policy",
            schedule(json!({"concurrencyPolicy": "Sometimes"})),
            "spec.concurrencyPolicy: Unsupported value",
        ),
    ];
    assert!(cases.len() >= 15);

    let mut failures = Vec::new();
    for (what, object, expected) in &cases {
        match create_raw(&env.client, &env.namespace, object).await {
            Ok(_) => failures.push(format!("{what}: was accepted")),
            Err(kube::Error::Api(status)) => {
                if status.code != 422 || !status.message.contains(expected) {
                    failures.push(format!(
                        "{what}: expected 422 with {expected:?}, got {} {:?}",
                        status.code, status.message
                    ));
                }
            }
            Err(other) => failures.push(format!("{what}: unexpected error {other}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The valid baselines are accepted, so each rejection above is due to its one change.
    for valid in [table(json!({})), budget(json!({})), schedule(json!({}))] {
        create_raw(&env.client, &env.namespace, &valid)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn printer_columns_show_the_important_fields() {
    let env = support::test_env("crd-columns").await;
    support::install_kiln_crds(&env.client).await;
    create_raw(&env.client, &env.namespace, &table(json!({})))
        .await
        .unwrap();
    create_raw(&env.client, &env.namespace, &budget(json!({})))
        .await
        .unwrap();
    create_raw(&env.client, &env.namespace, &schedule(json!({})))
        .await
        .unwrap();

    // Ask the API server for the same Table rendering `kubectl get` prints.
    for (plural, expected) in [
        (
            "enrichmenttables",
            vec![
                "Name", "Tier", "Ready", "Enriched", "Credits", "Budget", "Age",
            ],
        ),
        (
            "creditbudgets",
            vec!["Name", "Limit", "Used", "Remaining", "State", "Age"],
        ),
        (
            "refreshschedules",
            vec![
                "Name",
                "Table",
                "Schedule",
                "Suspend",
                "Last Run",
                "Next Run",
                "Last Outcome",
                "Requeued",
                "Age",
            ],
        ),
    ] {
        let request = http::Request::get(format!(
            "/apis/kiln.dev/v1alpha1/namespaces/{}/{plural}",
            env.namespace
        ))
        .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())
        .unwrap();
        let table: Value = env.client.request(request).await.unwrap();
        let columns: Vec<&str> = table["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, expected, "{plural}");
        let cells = &table["rows"][0]["cells"];
        match plural {
            "enrichmenttables" => {
                assert_eq!((&cells[1], &cells[5]), (&json!("Queue"), &json!("b")))
            }
            "creditbudgets" => assert_eq!(cells[1], json!(100)),
            _ => assert_eq!((&cells[1], &cells[2]), (&json!("t"), &json!("0 3 * * *"))),
        }
    }
}
