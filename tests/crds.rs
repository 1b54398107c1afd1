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

/// `object` under another name.
fn named(mut object: Value, name: &str) -> Value {
    object["metadata"]["name"] = json!(name);
    object
}

/// A Direct table (HTTP in, embedded store) with `spec_patch` merged in.
fn direct(spec_patch: Value) -> Value {
    let mut object = table(json!({
        "tier": "Direct", "sink": null, "deadLetter": null, "redis": null,
        "source": {"redisStream": null, "http": {"authTokenSecretRef": {"name": "a", "key": "b"}}}
    }));
    merge(&mut object["spec"], spec_patch);
    object
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
        (
            "table name too long for its Service",
            named(table(json!({})), &"t".repeat(55)),
            "EnrichmentTable names must be at most 54 characters",
        ),
        (
            "schedule name too long for its CronJob",
            named(schedule(json!({})), &"r".repeat(38)),
            "RefreshSchedule names must be at most 37 characters",
        ),
        (
            "two webhook sources with one name",
            table(json!({"clay": {"webhookSources": [
                {"name": "s", "urlSecretRef": {"name": "clay", "key": "url"}},
                {"name": "s", "urlSecretRef": {"name": "clay", "key": "url2"}}
            ]}})),
            "clay.webhookSources names must be unique",
        ),
        (
            "zero credits per row",
            table(json!({"clay": {"creditsPerRow": {"dataCredits": 0.0, "actions": 0}}})),
            "clay.creditsPerRow must be more than zero",
        ),
        (
            "no credits per row at all",
            table(json!({"clay": {"creditsPerRow": {"dataCredits": null}}})),
            "clay.creditsPerRow must be more than zero",
        ),
        (
            "negative credits per row",
            table(json!({"clay": {"creditsPerRow": {"dataCredits": -1.0}}})),
            "spec.clay.creditsPerRow.dataCredits: Invalid value",
        ),
        (
            "a Direct table with a routine and webhook sources",
            direct(
                json!({"clay": {"routine": {"routineId": "r", "apiKeySecretRef": {"name": "s", "key": "k"}}}}),
            ),
            "set clay.routine or clay.webhookSources, not both",
        ),
        (
            "a Direct table with three receivers",
            direct(json!({"receiver": {"replicas": 3}})),
            "tier Direct runs exactly one receiver",
        ),
        (
            "a Direct table with Redis",
            direct(json!({"redis": {"urlSecretRef": {"name": "redis", "key": "url"}}})),
            "tier Direct uses an embedded store: remove redis",
        ),
        (
            "a Direct table with a dead-letter stream",
            direct(json!({"deadLetter": {"redisStream": {"stream": "dead"}}})),
            "tier Direct keeps dead letters in its embedded store",
        ),
        (
            "a Direct table with a Redis sink",
            direct(json!({"sink": {"redisStream": {"stream": "out"}}})),
            "tier Direct can only deliver to sink.http",
        ),
        (
            "a storage size that is not a quantity",
            direct(json!({"receiver": {"storageSize": "lots"}})),
            "receiver.storageSize must be a positive quantity",
        ),
        (
            "a zero storage size",
            direct(json!({"receiver": {"storageSize": "0"}})),
            "receiver.storageSize must be a positive quantity",
        ),
        (
            "a worker CPU request that is not a quantity",
            table(json!({"workers": {"resources": {"requests": {"cpu": "two cores"}}}})),
            "resources.requests values must be quantities",
        ),
        (
            "a receiver memory limit that is not a quantity",
            table(json!({"receiver": {"resources": {"limits": {"memory": "1 gig"}}}})),
            "resources.limits values must be quantities",
        ),
        (
            "an unknown resource name",
            table(json!({"workers": {"resources": {"requests": {"gpu": "1"}}}})),
            "resources.requests takes cpu, memory and ephemeral-storage",
        ),
        (
            "autoscaling outside tier Event",
            table(json!({"workers": {"autoscaling": {"minReplicas": 1, "maxReplicas": 3}}})),
            "workers.autoscaling scales on Kafka consumer lag: only for tier Event",
        ),
        (
            "an unknown tier",
            table(json!({"tier": "Batch"})),
            "spec.tier: Unsupported value: \"Batch\"",
        ),
        (
            "no key field",
            table(json!({"key": null})),
            "spec.key: Required value",
        ),
        (
            "no budget reference",
            table(json!({"budgetRef": null})),
            "spec.budgetRef: Required value",
        ),
        (
            "no callback token",
            table(json!({"clay": {"callbackTokenSecretRef": null}})),
            "spec.clay.callbackTokenSecretRef: Required value",
        ),
        (
            "zero max attempts",
            table(json!({"clay": {"maxAttempts": 0}})),
            "spec.clay.maxAttempts: Invalid value",
        ),
        (
            "thirty-three webhook sources",
            table(
                json!({"clay": {"webhookSources": (0..33).map(|i| json!({"name": format!("s{i}"), "urlSecretRef": {"name": "clay", "key": "url"}})).collect::<Vec<_>>()}}),
            ),
            "spec.clay.webhookSources: Too many",
        ),
        (
            "a negative worker count",
            table(json!({"workers": {"replicas": -1}})),
            "spec.workers.replicas: Invalid value",
        ),
        (
            "zero concurrency",
            table(json!({"workers": {"concurrency": 0}})),
            "spec.workers.concurrency: Invalid value",
        ),
        (
            "a word for a number",
            table(json!({"workers": {"replicas": "three"}})),
            "spec.workers.replicas: Invalid value",
        ),
        (
            "a rate limit of zero rows",
            table(json!({"clay": {"rateLimit": {"rowsPerSecond": 0}}})),
            "spec.clay.rateLimit.rowsPerSecond: Invalid value",
        ),
        (
            "a Kafka source outside tier Event",
            table(
                json!({"source": {"redisStream": null, "kafka": {"topic": "in", "brokers": ["k:9092"]}}}),
            ),
            "tier Queue takes rows from source.http or source.redisStream",
        ),
        (
            "an Event table dead-lettering to Redis",
            table(json!({
                "tier": "Event",
                "source": {"redisStream": null, "kafka": {"topic": "in", "brokers": ["k:9092"]}},
                "sink": {"redisStream": null, "kafka": {"topic": "out"}}
            })),
            "tier Event dead-letters to Kafka: use deadLetter.kafka",
        ),
        (
            "a broker without a port",
            table(json!({
                "tier": "Event",
                "source": {"redisStream": null, "kafka": {"topic": "in", "brokers": ["kafka"]}},
                "sink": {"redisStream": null, "kafka": {"topic": "out"}},
                "deadLetter": {"redisStream": null, "kafka": {"topic": "dlq"}}
            })),
            "spec.source.kafka.brokers",
        ),
        (
            "a zero result timeout written as minutes",
            table(json!({"clay": {"resultTimeout": "0m"}})),
            "resultTimeout must be a positive duration",
        ),
        (
            "a negative dedupe window",
            table(json!({"dedupeWindow": "-1h"})),
            "dedupeWindow must be a positive duration",
        ),
        (
            "an HTTP source without its token",
            direct(json!({"source": {"http": {"authTokenSecretRef": null}}})),
            "spec.source.http.authTokenSecretRef: Required value",
        ),
        (
            "a budget limit of zero actions",
            budget(json!({"limits": {"actions": 0}})),
            "limits.actions must be positive",
        ),
        (
            "a zero warning threshold",
            budget(json!({"warningThresholds": [0, 50]})),
            "warning thresholds must be percentages between 1 and 100",
        ),
        (
            "an unknown onExhausted",
            budget(json!({"onExhausted": "Ignore"})),
            "spec.onExhausted: Unsupported value",
        ),
        (
            "a breaker that can never open",
            budget(json!({"circuitBreaker": {"errorPercent": 0}})),
            "spec.circuitBreaker.errorPercent: Invalid value",
        ),
        (
            "a breaker error percent over 100",
            budget(json!({"circuitBreaker": {"errorPercent": 150}})),
            "spec.circuitBreaker.errorPercent: Invalid value",
        ),
        (
            "a workspace name that is not a DNS label",
            budget(json!({"workspace": {"name": "Acme Prod"}})),
            "workspace.name must be a DNS label",
        ),
        (
            "a workspace without a name",
            budget(json!({"workspace": {"rateLimit": {"rowsPerSecond": 10}}})),
            "spec.workspace.name: Required value",
        ),
        (
            "a workspace rate of zero",
            budget(json!({"workspace": {"name": "acme", "rateLimit": {"rowsPerSecond": 0}}})),
            "spec.workspace.rateLimit.rowsPerSecond",
        ),
        (
            "a schedule without a table",
            schedule(json!({"tableRef": null})),
            "spec.tableRef: Required value",
        ),
        (
            "a schedule with seven fields",
            schedule(json!({"schedule": "0 3 * * * * *"})),
            "schedule must be a 5-field cron expression",
        ),
        (
            "negative credits per run",
            schedule(json!({"maxCredits": -10.0})),
            "maxCredits must be positive",
        ),
        (
            "an empty sink headers Secret name",
            table(
                json!({"sink": {"redisStream": null, "http": {"urlTemplate": "https://crm/{email}", "headersSecretName": ""}}}),
            ),
            "spec.sink.http.headersSecretName",
        ),
        (
            "a zero maxAge",
            schedule(json!({"maxAge": "0h"})),
            "maxAge must be a positive duration",
        ),
    ];
    assert!(cases.len() >= 60, "{} cases", cases.len());

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
    let mut with_workspace = budget(
        json!({"workspace": {"name": "acme-prod", "rateLimit": {"rowsPerSecond": 10, "burst": 20}}}),
    );
    with_workspace["metadata"]["name"] = json!("with-workspace");
    for valid in [
        table(json!({})),
        budget(json!({})),
        with_workspace,
        schedule(json!({})),
    ] {
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
                "Name", "Tier", "Ready", "Status", "Enriched", "Credits", "Budget", "Age",
            ],
        ),
        (
            "creditbudgets",
            vec![
                "Name",
                "Limit",
                "Used",
                "Remaining",
                "State",
                "Exhausts",
                "Age",
            ],
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
                assert_eq!((&cells[1], &cells[6]), (&json!("Queue"), &json!("b")))
            }
            "creditbudgets" => assert_eq!(cells[1], json!(100)),
            _ => assert_eq!((&cells[1], &cells[2]), (&json!("t"), &json!("0 3 * * *"))),
        }
    }
}
