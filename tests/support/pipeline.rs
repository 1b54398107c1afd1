//! A Queue-tier pipeline on real components (control plane + operator,
//! Redis, clay-sim, worker and receiver processes), for tests and benchmarks.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use serde_json::{Value, json};

use super::{TestEnv, wait};
use kiln::api::{CreditBudget, EnrichmentTable};

pub struct Pipeline {
    pub env: TestEnv,
    pub sim: super::ClaySim,
    pub test: String,
    pub redis: super::Redis,
    pub operator: super::KilnProcess,
    pub kubeconfig: std::path::PathBuf,
    pub token_file: std::path::PathBuf,
    pub receiver_port: u16,
}

impl Pipeline {
    pub fn table(&self) -> String {
        format!("{}/leads", self.env.namespace)
    }

    pub fn operator_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.operator.api_port)
    }

    pub fn worker(&self) -> super::KilnProcess {
        self.worker_with_env(&[])
    }

    /// A worker with extra environment variables.
    pub fn worker_with_env(&self, env: &[(&str, &str)]) -> super::KilnProcess {
        super::start_dataplane(
            "worker",
            &self.table(),
            &self.kubeconfig,
            &self.token_file,
            &self.operator_url(),
            &["--identity", "worker-0"],
            env,
        )
    }

    pub fn receiver(&self) -> super::KilnProcess {
        self.receiver_with_env(&[])
    }

    /// A receiver with extra environment variables.
    pub fn receiver_with_env(&self, env: &[(&str, &str)]) -> super::KilnProcess {
        let listen = format!("127.0.0.1:{}", self.receiver_port);
        super::start_dataplane(
            "receiver",
            &self.table(),
            &self.kubeconfig,
            &self.token_file,
            &self.operator_url(),
            &["--listen", &listen],
            env,
        )
    }

    pub async fn push(&self, rows: &[Value]) {
        post_rows(self.receiver_port, rows, 50).await;
    }

    pub async fn stream(&self, name: &str) -> Vec<HashMap<String, String>> {
        let mut conn = super::redis_connection(&self.redis.url).await;
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

/// clay-sim as the end-to-end tests run it: realistic latency, generous
/// rate, and the faults the issues name (5% 5xx, 3% dropped and 3%
/// duplicate callbacks). Tests add providers and a seed.
pub const FAULTY_CLAY: &[&str] = &[
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
];

/// clay-sim answering quickly (10-50 ms) with a generous rate, no faults.
/// Tests add providers and a seed.
pub const QUICK_CLAY: &[&str] = &[
    "--latency-min-ms",
    "10",
    "--latency-max-ms",
    "50",
    "--rate",
    "1000",
    "--burst",
    "1000",
];

/// clay-sim out of the way, for throughput benchmarks: no latency, no rate
/// limit, one credit a row.
pub const INSTANT_CLAY: &[&str] = &[
    "--latency-min-ms",
    "0",
    "--latency-max-ms",
    "0",
    "--rate",
    "1000000",
    "--burst",
    "1000000",
    "--provider",
    "email:1:1.0",
];

/// What every data-plane test needs besides its table: a namespace, the
/// operator, clay-sim with a webhook source calling back to
/// `receiver_port`, the Secret (`pipeline`) and the budget (`team`).
pub struct Base {
    pub env: TestEnv,
    pub sim: super::ClaySim,
    pub operator: super::KilnProcess,
    pub receiver_port: u16,
}

pub async fn base(
    test: &str,
    sim_flags: &[&str],
    limit: f64,
    on_exhausted: &str,
    extra_secret_data: &[(&str, &str)],
) -> Base {
    let env = super::test_env(test).await;
    super::install_kiln_crds(&env.client).await;
    let operator = super::start_operator(&env.namespace, "op").await;
    let sim = super::start_clay_sim(test, sim_flags).await;
    let receiver_port = kiln::devenv::free_port().unwrap();
    let webhook_url = sim
        .add_source(
            "leads",
            json!({"token": "clay-source-token", "callbackUrl": format!("http://127.0.0.1:{receiver_port}/v1/clay/callback"), "callbackHeaders": {"x-kiln-token": "callback-secret"}}),
        )
        .await;
    let mut data = BTreeMap::from([
        ("webhook-url".to_string(), webhook_url),
        ("webhook-token".to_string(), "clay-source-token".to_string()),
        ("callback-token".to_string(), "callback-secret".to_string()),
        ("ingest-token".to_string(), "crm-secret".to_string()),
    ]);
    for (key, value) in extra_secret_data {
        data.insert(key.to_string(), value.to_string());
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("pipeline".into()),
            ..Default::default()
        },
        string_data: Some(data),
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
    Base {
        env,
        sim,
        operator,
        receiver_port,
    }
}

/// The clay section every test table uses (the `pipeline` Secret's keys).
pub fn clay_spec(credits_per_row: f64) -> Value {
    json!({
        "webhookSources": [{"name": "leads", "urlSecretRef": {"name": "pipeline", "key": "webhook-url"}, "authTokenSecretRef": {"name": "pipeline", "key": "webhook-token"}}],
        "rateLimit": {"rowsPerSecond": 1000, "burst": 1000},
        "creditsPerRow": {"dataCredits": credits_per_row, "actions": 4},
        "resultTimeout": "3s", "maxAttempts": 4,
        "callbackTokenSecretRef": {"name": "pipeline", "key": "callback-token"}
    })
}

/// Lifts the table's own rate limit to the schema's maximum, for
/// throughput benchmarks (the test tables default to 1,000 rows/s, which
/// would otherwise be what a benchmark measures).
pub async fn lift_table_rate_limit(env: &TestEnv) {
    env.api::<EnrichmentTable>()
        .patch(
            "leads",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"spec": {"clay": {"rateLimit": {"rowsPerSecond": 10000, "burst": 10000}}}}),
            ),
        )
        .await
        .unwrap();
}

/// Creates the table `leads` and returns the kubeconfig and token file of
/// its ServiceAccount once the operator provisioned it (the data plane runs
/// with exactly those credentials).
pub async fn create_table(
    env: &TestEnv,
    test: &str,
    spec: Value,
) -> (std::path::PathBuf, std::path::PathBuf) {
    create_named_table(env, test, "leads", spec).await
}

/// [`create_table`] for a table of any name.
pub async fn create_named_table(
    env: &TestEnv,
    test: &str,
    name: &str,
    spec: Value,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let table: EnrichmentTable = serde_json::from_value(json!({
        "apiVersion": "kiln.dev/v1alpha1", "kind": "EnrichmentTable", "metadata": {"name": name},
        "spec": spec
    }))
    .unwrap();
    env.api::<EnrichmentTable>()
        .create(&PostParams::default(), &table)
        .await
        .unwrap();
    let account = format!("kiln-{name}");
    let token = super::service_account_token(&env.client, &env.namespace, &account).await;
    // The Role the operator provisioned must be enough for the data plane.
    super::wait_condition(&env.api::<EnrichmentTable>(), name, "Provisioned", "True").await;
    let test = format!("{test}-{name}");
    let kubeconfig = super::kubeconfig_for_token(&test, &token).await;
    let token_file = super::work_dir().join(format!("token-{test}"));
    let ledger_token = super::ledger_token(&env.client, &env.namespace, &account).await;
    std::fs::write(&token_file, &ledger_token).unwrap();
    (kubeconfig, token_file)
}

pub async fn pipeline(
    test: &str,
    sim_flags: &[&str],
    limit: f64,
    on_exhausted: &str,
    durable: bool,
) -> Pipeline {
    let redis = super::start_redis_on(test, kiln::devenv::free_port().unwrap(), durable).await;
    let Base {
        env,
        sim,
        operator,
        receiver_port,
    } = base(
        test,
        sim_flags,
        limit,
        on_exhausted,
        &[("redis-url", &redis.url)],
    )
    .await;
    let (kubeconfig, token_file) = create_table(
        &env,
        test,
        json!({
            "tier": "Queue", "key": "email", "budgetRef": {"name": "team"}, "dedupeWindow": "1h",
            "clay": clay_spec(8.0),
            "source": {"http": {"authTokenSecretRef": {"name": "pipeline", "key": "ingest-token"}}},
            "sink": {"redisStream": {"stream": "leads:enriched"}},
            "deadLetter": {"redisStream": {"stream": "leads:dead"}},
            "redis": {"urlSecretRef": {"name": "pipeline", "key": "redis-url"}},
            "workers": {"concurrency": 64, "batchSize": 100}
        }),
    )
    .await;
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

/// POSTs `rows` to the receiver on `port` in chunks, each retried until
/// accepted (the receiver may still be starting).
pub async fn post_rows(port: u16, rows: &[Value], chunk: usize) {
    let http = reqwest::Client::new();
    for chunk in rows.chunks(chunk) {
        wait::until("the receiver to accept rows", || async {
            let response = http
                .post(format!("http://127.0.0.1:{port}/v1/rows"))
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

pub fn leads(n: usize, offset: usize) -> Vec<Value> {
    (offset..offset + n)
        .map(
            |i| json!({"email": format!("lead{i}@example.com"), "company": format!("Company {i}")}),
        )
        .collect()
}

/// Waits until every pushed row is delivered or dead-lettered and nothing is
/// pending; on timeout, fails with the pipeline's state for diagnosis.
pub async fn wait_terminal(
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
            let mut conn = super::redis_connection(&p.redis.url).await;
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
                "only {} delivered + {} dead of {expected}; {pending} pending; group {groups:?}; sim {:?}; open leases {}; used {}",
                delivered.len(),
                dead.len(),
                p.sim.stats().await,
                budget.leases.len(),
                budget.used.data_credits
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
