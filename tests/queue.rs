//! The Queue tier end to end on real components: the control plane and the
//! operator (ledger), Redis, `kiln clay-sim` with faults, and `kiln worker` /
//! `kiln receiver` run as local processes with their pod-template arguments
//! and their table's ServiceAccount credentials.

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use serde_json::{Value, json};

use kiln::api::{CreditBudget, EnrichmentTable};
use support::{TestEnv, wait};

struct Pipeline {
    env: TestEnv,
    sim: support::ClaySim,
    test: String,
    redis: support::Redis,
    operator: support::KilnProcess,
    kubeconfig: std::path::PathBuf,
    token_file: std::path::PathBuf,
    receiver_port: u16,
}

impl Pipeline {
    fn table(&self) -> String {
        format!("{}/leads", self.env.namespace)
    }

    fn operator_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.operator.api_port)
    }

    fn worker(&self) -> support::KilnProcess {
        support::start_dataplane(
            "worker",
            &self.table(),
            &self.kubeconfig,
            &self.token_file,
            &self.operator_url(),
            &["--identity", "worker-0"],
        )
    }

    fn receiver(&self) -> support::KilnProcess {
        let listen = format!("127.0.0.1:{}", self.receiver_port);
        support::start_dataplane(
            "receiver",
            &self.table(),
            &self.kubeconfig,
            &self.token_file,
            &self.operator_url(),
            &["--listen", &listen],
        )
    }

    async fn push(&self, rows: &[Value]) {
        let http = reqwest::Client::new();
        for chunk in rows.chunks(50) {
            wait::until("the receiver to accept rows", || async {
                let response = http
                    .post(format!("http://127.0.0.1:{}/v1/rows", self.receiver_port))
                    .bearer_auth("crm-secret")
                    .json(&chunk)
                    .send()
                    .await
                    .ok()?;
                (response.status() == 202).then_some(())
            })
            .await;
        }
    }

    async fn stream(&self, name: &str) -> Vec<HashMap<String, String>> {
        let client = redis::Client::open(self.redis.url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(name)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        reply
            .ids
            .into_iter()
            .map(|e| {
                e.map
                    .into_iter()
                    .map(|(k, v)| (k, redis::from_redis_value::<String>(v).unwrap()))
                    .collect()
            })
            .collect()
    }
}

async fn pipeline(
    test: &str,
    sim_flags: &[&str],
    limit: f64,
    on_exhausted: &str,
    durable: bool,
) -> Pipeline {
    let env = support::test_env(test).await;
    support::install_kiln_crds(&env.client).await;
    let operator = support::start_operator(&env.namespace, "op").await;
    let redis = support::start_redis_on(test, kiln::devenv::free_port().unwrap(), durable).await;
    let sim = support::start_clay_sim(test, sim_flags).await;
    let receiver_port = kiln::devenv::free_port().unwrap();
    let webhook_url = sim
        .add_source(
            "leads",
            json!({"token": "clay-source-token", "callbackUrl": format!("http://127.0.0.1:{receiver_port}/v1/clay/callback"), "callbackHeaders": {"x-kiln-token": "callback-secret"}}),
        )
        .await;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("pipeline".into()),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([
            ("webhook-url".to_string(), webhook_url),
            ("webhook-token".to_string(), "clay-source-token".to_string()),
            ("callback-token".to_string(), "callback-secret".to_string()),
            ("ingest-token".to_string(), "crm-secret".to_string()),
            ("redis-url".to_string(), redis.url.clone()),
        ])),
        ..Default::default()
    };
    env.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let budget: CreditBudget = serde_json::from_value(json!({
        "apiVersion": "kiln.dev/v1alpha1", "kind": "CreditBudget", "metadata": {"name": "team"},
        "spec": {"limits": {"dataCredits": limit}, "onExhausted": on_exhausted}
    }))
    .unwrap();
    env.api::<CreditBudget>()
        .create(&PostParams::default(), &budget)
        .await
        .unwrap();
    let table: EnrichmentTable = serde_json::from_value(json!({
        "apiVersion": "kiln.dev/v1alpha1", "kind": "EnrichmentTable", "metadata": {"name": "leads"},
        "spec": {
            "tier": "Queue", "key": "email", "budgetRef": {"name": "team"}, "dedupeWindow": "1h",
            "clay": {
                "webhookSources": [{"name": "leads", "urlSecretRef": {"name": "pipeline", "key": "webhook-url"}, "authTokenSecretRef": {"name": "pipeline", "key": "webhook-token"}}],
                "rateLimit": {"rowsPerSecond": 1000, "burst": 1000},
                "creditsPerRow": {"dataCredits": 8.0, "actions": 4},
                "resultTimeout": "3s", "maxAttempts": 4,
                "callbackTokenSecretRef": {"name": "pipeline", "key": "callback-token"}
            },
            "source": {"http": {"authTokenSecretRef": {"name": "pipeline", "key": "ingest-token"}}},
            "sink": {"redisStream": {"stream": "leads:enriched"}},
            "deadLetter": {"redisStream": {"stream": "leads:dead"}},
            "redis": {"urlSecretRef": {"name": "pipeline", "key": "redis-url"}},
            "workers": {"concurrency": 64, "batchSize": 100}
        }
    }))
    .unwrap();
    env.api::<EnrichmentTable>()
        .create(&PostParams::default(), &table)
        .await
        .unwrap();
    let token = support::service_account_token(&env.client, &env.namespace, "kiln-leads").await;
    // The Role the operator provisioned must be enough for the data plane.
    support::wait_condition(
        &env.api::<EnrichmentTable>(),
        "leads",
        "Provisioned",
        "True",
    )
    .await;
    let kubeconfig = support::kubeconfig_for_token(test, &token).await;
    let token_file = support::work_dir().join(format!("token-{test}"));
    std::fs::write(&token_file, &token).unwrap();
    Pipeline {
        env,
        sim,
        test: test.to_string(),
        redis,
        operator,
        kubeconfig,
        token_file,
        receiver_port,
    }
}

fn leads(n: usize, offset: usize) -> Vec<Value> {
    (offset..offset + n)
        .map(
            |i| json!({"email": format!("lead{i}@example.com"), "company": format!("Company {i}")}),
        )
        .collect()
}

/// Waits until every pushed row is delivered or dead-lettered and nothing is
/// pending; on timeout, fails with the pipeline's state for diagnosis.
async fn wait_terminal(
    p: &Pipeline,
    expected: usize,
) -> (Vec<HashMap<String, String>>, Vec<HashMap<String, String>>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let delivered = p.stream("leads:enriched").await;
        let dead = p.stream("leads:dead").await;
        if delivered.len() + dead.len() >= expected {
            return (delivered, dead);
        }
        if std::time::Instant::now() > deadline {
            let client = redis::Client::open(p.redis.url.as_str()).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let pending: i64 = redis::cmd("HLEN")
                .arg(format!("kiln:{}/leads:pending", p.env.namespace))
                .query_async(&mut conn)
                .await
                .unwrap();
            let groups: redis::Value = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(format!("kiln:{}/leads:inbox", p.env.namespace))
                .query_async(&mut conn)
                .await
                .unwrap();
            let budget = p
                .env
                .api::<CreditBudget>()
                .get("team")
                .await
                .unwrap()
                .status
                .unwrap_or_default();
            panic!(
                "only {} delivered + {} dead of {expected}; {pending} pending; group {groups:?}; sim {:?}; open reservations {}; used {}",
                delivered.len(),
                dead.len(),
                p.sim.stats().await,
                budget.reservations.len(),
                budget.used.data_credits
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn two_thousand_rows_through_faults_and_crashes_end_exactly_once_within_budget() {
    let p = pipeline(
        "queue-e2e",
        &[
            "--latency-min-ms",
            "20",
            "--latency-max-ms",
            "300",
            "--rate",
            "1000",
            "--burst",
            "1000",
            "--error-rate",
            "0.05",
            "--drop-rate",
            "0.03",
            "--duplicate-rate",
            "0.03",
            "--provider",
            "email:1:0.9",
            "--provider",
            "phone:5:0.5",
            "--seed",
            "7",
        ],
        1_000_000.0,
        "Pause",
        false,
    )
    .await;
    let mut receiver = p.receiver();
    let mut worker = p.worker();
    let rows = leads(2000, 0);
    p.push(&rows[..1000]).await;

    // Crash both once mid-run, then bring them back as a pod restart would.
    wait::until_within("some rows delivered", Duration::from_secs(120), || async {
        (p.stream("leads:enriched").await.len() >= 200).then_some(())
    })
    .await;
    worker.process.kill_hard();
    receiver.process.kill_hard();
    let _receiver = p.receiver();
    p.push(&rows[1000..]).await;
    let _worker = p.worker();

    let (delivered, dead) = wait_terminal(&p, 2000).await;
    // Every row ends in exactly one terminal state.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for entry in delivered.iter().chain(dead.iter()) {
        *seen.entry(entry["row_id"].clone()).or_default() += 1;
    }
    assert_eq!(seen.len(), 2000, "every row reached a terminal state");
    assert!(
        seen.values().all(|n| *n == 1),
        "no row was delivered twice or both delivered and dead-lettered"
    );
    for entry in &dead {
        assert!(
            !entry["reason"].is_empty(),
            "dead letters carry a reason: {entry:?}"
        );
    }
    let delivered_keys: std::collections::HashSet<String> =
        delivered.iter().map(|e| e["key"].clone()).collect();
    assert_eq!(delivered_keys.len(), delivered.len());

    // Nothing left pending, no reservation left open, spend accounted conservatively.
    let budget_api = p.env.api::<CreditBudget>();
    let status = wait::until("all reservations closed", || async {
        let status = budget_api.get("team").await.ok()?.status?;
        status.reservations.is_empty().then_some(status)
    })
    .await;
    let sim = p.sim.stats().await;
    assert!(
        sim.callbacks_duplicated > 0 && sim.callbacks_dropped > 0 && sim.injected_errors > 0,
        "faults happened: {sim:?}"
    );
    assert!(
        sim.data_credits_charged <= status.used.data_credits + 1e-6,
        "the ledger never under-counts Clay: sim charged {} ledger {}",
        sim.data_credits_charged,
        status.used.data_credits
    );

    // The operator reports the same counts in the table's status.
    let tables = p.env.api::<EnrichmentTable>();
    let (delivered_count, dead_count) = (delivered.len() as u64, dead.len() as u64);
    wait::until("the table status counters", || async {
        let rows = tables.get("leads").await.ok()?.status?.rows;
        (rows.received == 2000
            && rows.delivered == delivered_count
            && rows.dead_lettered == dead_count
            && rows.pending == 0)
            .then_some(())
    })
    .await;

    // Same keys again inside the de-dupe window: zero credits.
    let charged_before = sim.data_credits_charged;
    p.push(&rows[..500]).await;
    wait::until_within(
        "the repeated keys delivered from the store",
        Duration::from_secs(120),
        || async {
            let delivered = p.stream("leads:enriched").await;
            let deduped = delivered
                .iter()
                .filter(|e| e.get("deduplicated").is_some())
                .count();
            (deduped >= 500 - dead.iter().filter(|d| leads_index(&d["row"]) < 500).count())
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        p.sim.stats().await.data_credits_charged,
        charged_before,
        "repeated keys cost nothing"
    );
}

/// The lead number of a dead-lettered row's JSON (its email is leadN@...).
fn leads_index(row: &str) -> usize {
    serde_json::from_str::<Value>(row)
        .ok()
        .and_then(|r| {
            r["email"]
                .as_str()?
                .strip_prefix("lead")?
                .split('@')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(usize::MAX)
}

#[tokio::test]
async fn without_faults_the_ledger_matches_what_clay_charged_and_the_budget_holds() {
    let p = pipeline(
        "queue-budget",
        &[
            "--latency-min-ms",
            "10",
            "--latency-max-ms",
            "50",
            "--rate",
            "1000",
            "--burst",
            "1000",
            "--provider",
            "email:2:1.0",
            "--seed",
            "3",
        ],
        200.0,
        "Pause",
        false,
    )
    .await;
    let _receiver = p.receiver();
    let _worker = p.worker();
    // 8 credits reserved per row against a 200-credit budget: at most 25 rows
    // can be in flight at once, each costs 2; the budget pauses the worker at the limit.
    p.push(&leads(150, 0)).await;
    let (delivered, dead) = wait_terminal(&p, 96).await;
    assert!(dead.is_empty(), "no faults, no dead letters: {dead:?}");
    let status = wait::until("reservations settled", || async {
        let status = p.env.api::<CreditBudget>().get("team").await.ok()?.status?;
        (status.reservations.is_empty() && status.used.data_credits >= 192.0).then_some(status)
    })
    .await;
    let sim = p.sim.stats().await;
    assert_eq!(
        sim.data_credits_charged, status.used.data_credits,
        "ledger settled exactly what Clay charged"
    );
    assert!(status.used.data_credits <= 200.0, "never over the limit");
    assert!(
        delivered.len() <= 100,
        "at 2 credits a row at most 100 rows fit in 200 credits"
    );
    // The rest waits in the stream (Pause), not lost: unread or unacknowledged.
    let client = redis::Client::open(p.redis.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(format!("kiln:{}/leads:inbox", p.env.namespace))
        .query_async(&mut conn)
        .await
        .unwrap();
    let number = |name: &str| redis::from_redis_value::<i64>(groups[0][name].clone()).unwrap();
    assert_eq!(
        (number("pending") + number("lag")) as usize,
        150 - delivered.len(),
        "every row not yet enriched is still in the source stream"
    );
}

#[tokio::test]
async fn budget_dead_letters_are_replayed_once_after_the_limit_is_raised() {
    let p = pipeline(
        "queue-replay",
        &[
            "--latency-min-ms",
            "10",
            "--latency-max-ms",
            "50",
            "--rate",
            "1000",
            "--burst",
            "1000",
            "--provider",
            "email:2:1.0",
        ],
        24.0,
        "DeadLetter",
        false,
    )
    .await;
    let _receiver = p.receiver();
    let _worker = p.worker();
    p.push(&leads(20, 0)).await;
    let (delivered, dead) = wait_terminal(&p, 20).await;
    assert!(
        !dead.is_empty(),
        "the small budget sent rows to the dead letters"
    );
    assert!(
        dead.iter().all(|d| d["reason"] == "BudgetExhausted"),
        "{dead:?}"
    );
    let used = p
        .env
        .api::<CreditBudget>()
        .get("team")
        .await
        .unwrap()
        .status
        .unwrap()
        .used
        .data_credits;
    assert!(used <= 24.0);

    // Raise the limit (takes effect at once), then replay.
    p.env
        .api::<CreditBudget>()
        .patch(
            "team",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"limits": {"dataCredits": 1000.0}}})),
        )
        .await
        .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KUBECONFIG", &p.kubeconfig)
        .args([
            "--log-format",
            "text",
            "dlq",
            "replay",
            "--table",
            &p.table(),
            "--reason",
            "BudgetExhausted",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        String::from_utf8_lossy(&output.stdout)
            .contains(&format!("replayed {} dead letters", dead.len()))
    );

    let delivered_all = wait::until_within(
        "the replayed rows delivered",
        Duration::from_secs(120),
        || async {
            let delivered = p.stream("leads:enriched").await;
            (delivered.len() == 20).then_some(delivered)
        },
    )
    .await;
    assert!(
        p.stream("leads:dead").await.is_empty(),
        "replayed dead letters leave the stream"
    );
    let ids: std::collections::HashSet<&String> =
        delivered_all.iter().map(|e| &e["row_id"]).collect();
    assert_eq!(
        ids.len(),
        20,
        "each row delivered exactly once, replayed ones keep their row id"
    );
    assert!(delivered.iter().all(|d| ids.contains(&d["row_id"])));
    // `kiln dlq list` shows nothing left.
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KUBECONFIG", &p.kubeconfig)
        .args(["dlq", "list", "--table", &p.table()])
        .output()
        .unwrap();
    assert!(listed.status.success());
    assert!(listed.stdout.is_empty());
}

#[tokio::test]
async fn a_redis_restart_with_appendonly_loses_no_row() {
    let mut p = pipeline(
        "queue-redis-restart",
        &[
            "--latency-min-ms",
            "50",
            "--latency-max-ms",
            "400",
            "--rate",
            "1000",
            "--burst",
            "1000",
            "--provider",
            "email:1:1.0",
        ],
        1_000_000.0,
        "Pause",
        true,
    )
    .await;
    let _receiver = p.receiver();
    let _worker = p.worker();
    let rows = leads(600, 0);
    p.push(&rows[..300]).await;
    wait::until_within("some rows delivered", Duration::from_secs(120), || async {
        (p.stream("leads:enriched").await.len() >= 50).then_some(())
    })
    .await;
    // Crash Redis and bring it back on the same port and data directory.
    p.redis.process.kill_hard();
    p.redis = support::start_redis_on(&p.test, p.redis.port, true).await;
    p.push(&rows[300..]).await;

    let (delivered, dead) = wait_terminal(&p, 600).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for entry in delivered.iter().chain(dead.iter()) {
        *seen.entry(entry["row_id"].clone()).or_default() += 1;
    }
    assert_eq!(seen.len(), 600, "no row was lost across the Redis restart");
    assert!(
        seen.values().all(|n| *n == 1),
        "and none was delivered twice"
    );
}
