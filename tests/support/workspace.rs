//! Several Queue tables sending to one clay-sim (one Clay workspace), each
//! with its own webhook source, receiver and workers, for the rate-sharing
//! tests and benchmark. Rates are measured as clay-sim sees them.

use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

use super::KilnProcess;
use super::pipeline::{Base, base, create_named_table, leads, post_rows};
use kiln::api::{CreditBudget, EnrichmentTable};

pub struct Workspace {
    pub base: Base,
    pub redis: super::Redis,
    pub tables: Vec<WorkspaceTable>,
}

pub struct WorkspaceTable {
    pub name: String,
    pub namespace: String,
    pub kubeconfig: std::path::PathBuf,
    pub token_file: std::path::PathBuf,
    pub receiver_port: u16,
}

/// clay-sim as one Clay workspace: `rate` rows/s, `burst`, no latency.
pub fn clay_workspace(rate: u32, burst: u32) -> Vec<String> {
    [
        "--latency-min-ms",
        "0",
        "--latency-max-ms",
        "0",
        "--provider",
        "email:1:1.0",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--rate".into(),
        rate.to_string(),
        "--burst".into(),
        burst.to_string(),
    ])
    .collect()
}

/// A namespace with the operator, clay-sim, Redis and a budget (`team`,
/// naming `budget_workspace` when given), and one Queue table per name, each
/// at `table_rate` = (rows/s, burst).
pub async fn workspace(
    test: &str,
    sim_flags: &[String],
    budget_workspace: Option<Value>,
    names: &[&str],
    table_rate: (u32, u32),
) -> Workspace {
    let redis = super::start_redis_on(test, kiln::devenv::free_port().unwrap(), false).await;
    let flags: Vec<&str> = sim_flags.iter().map(String::as_str).collect();
    let base = base(test, &flags, 1.0e12, "Pause", &[("redis-url", &redis.url)]).await;
    if let Some(workspace) = budget_workspace {
        base.env
            .api::<CreditBudget>()
            .patch(
                "team",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"workspace": workspace}})),
            )
            .await
            .unwrap();
    }
    let mut tables = Vec::new();
    for (i, name) in names.iter().enumerate() {
        // The base set up a source for the first table; the others get theirs.
        let receiver_port = if i == 0 {
            base.receiver_port
        } else {
            kiln::devenv::free_port().unwrap()
        };
        let secret = format!("{name}-clay");
        let url = base
            .sim
            .add_source(
                name,
                json!({"token": "clay-source-token", "callbackUrl": format!("http://127.0.0.1:{receiver_port}/v1/clay/callback"), "callbackHeaders": {"x-kiln-token": "callback-secret"}}),
            )
            .await;
        super::create_string_secret(
            &base.env,
            &secret,
            &[
                ("webhook-url", &url),
                ("webhook-token", "clay-source-token"),
                ("callback-token", "callback-secret"),
            ],
        )
        .await;
        let (rate, burst) = table_rate;
        let (kubeconfig, token_file) = create_named_table(
            &base.env,
            test,
            name,
            json!({
                "tier": "Queue", "key": "email", "budgetRef": {"name": "team"}, "dedupeWindow": "1h",
                "clay": {
                    "webhookSources": [{"name": name, "urlSecretRef": {"name": secret, "key": "webhook-url"}, "authTokenSecretRef": {"name": secret, "key": "webhook-token"}}],
                    "rateLimit": {"rowsPerSecond": rate, "burst": burst},
                    "creditsPerRow": {"dataCredits": 1.0},
                    "resultTimeout": "30s", "maxAttempts": 4,
                    "callbackTokenSecretRef": {"name": secret, "key": "callback-token"}
                },
                "source": {"http": {"authTokenSecretRef": {"name": "pipeline", "key": "ingest-token"}}},
                "sink": {"redisStream": {"stream": format!("{name}:enriched")}},
                "deadLetter": {"redisStream": {"stream": format!("{name}:dead")}},
                "redis": {"urlSecretRef": {"name": "pipeline", "key": "redis-url"}},
                "workers": {"concurrency": 64, "batchSize": 100}
            }),
        )
        .await;
        tables.push(WorkspaceTable {
            name: name.to_string(),
            namespace: base.env.namespace.clone(),
            kubeconfig,
            token_file,
            receiver_port,
        });
    }
    Workspace {
        base,
        redis,
        tables,
    }
}

impl Workspace {
    pub fn operator_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.base.operator.api_port)
    }

    pub async fn table(&self, name: &str) -> EnrichmentTable {
        self.base
            .env
            .api::<EnrichmentTable>()
            .get(name)
            .await
            .unwrap()
    }
}

impl WorkspaceTable {
    fn qualified(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// A worker named `identity`, reaching the ledger at `operator_urls`
    /// (comma-separated, tried in turn).
    pub fn worker(&self, identity: &str, operator_urls: &str) -> KilnProcess {
        super::start_dataplane(
            "worker",
            &self.qualified(),
            &self.kubeconfig,
            &self.token_file,
            operator_urls,
            &["--identity", identity],
            &[],
        )
    }

    pub fn receiver(&self, operator_urls: &str) -> KilnProcess {
        let listen = format!("127.0.0.1:{}", self.receiver_port);
        super::start_dataplane(
            "receiver",
            &self.qualified(),
            &self.kubeconfig,
            &self.token_file,
            operator_urls,
            &["--listen", &listen],
            &[],
        )
    }

    /// POSTs `n` leads (ids from `offset`) to the receiver.
    pub async fn push(&self, n: usize, offset: usize) {
        post_rows(self.receiver_port, &leads(n, offset), 100).await;
    }

    /// Rows delivered to the table's sink stream.
    pub async fn delivered(&self, redis: &super::Redis) -> usize {
        let mut conn = super::redis_connection(&redis.url).await;
        redis::cmd("XLEN")
            .arg(format!("{}:enriched", self.name))
            .query_async(&mut conn)
            .await
            .unwrap()
    }
}

/// Requests clay-sim received, sampled with the time span each sample was
/// taken in (sent, answered): a count lies somewhere within its span.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub sent: Instant,
    pub answered: Instant,
    pub requests: u64,
    pub accepted: u64,
    pub throttled: u64,
}

pub async fn sample(sim: &super::ClaySim) -> Sample {
    let sent = Instant::now();
    let stats = sim.stats().await;
    Sample {
        sent,
        answered: Instant::now(),
        requests: stats.requests,
        accepted: stats.rows_accepted,
        throttled: stats.rejected_rate_limited,
    }
}

/// The largest excess, over `rate` × window + `burst`, of rows Clay was sent
/// between any two samples; windows are measured generously (from the
/// earlier sample's request to the later one's answer), so a loaded machine
/// cannot make a window look shorter than it was.
pub fn worst_excess(samples: &[Sample], rate: f64, burst: f64) -> f64 {
    let mut worst = f64::MIN;
    for (i, first) in samples.iter().enumerate() {
        for last in &samples[i + 1..] {
            let window = last.answered.duration_since(first.sent).as_secs_f64();
            let sent = (last.requests - first.requests) as f64;
            worst = worst.max(sent - (rate * window + burst));
        }
    }
    worst
}

/// Clay's sustained acceptance rate: rows accepted from the moment the
/// first `burst` rows were in to the moment `total` were, per second.
pub fn sustained_rate(samples: &[Sample], burst: u64, total: u64) -> f64 {
    let after_burst = samples.iter().find(|s| s.accepted >= burst);
    let done = samples.iter().find(|s| s.accepted >= total);
    match (after_burst, done) {
        (Some(a), Some(b)) if b.accepted > a.accepted => {
            (b.accepted - a.accepted) as f64 / b.answered.duration_since(a.answered).as_secs_f64()
        }
        _ => 0.0,
    }
}

/// Samples clay-sim every 50 ms until `stop` says so.
pub async fn sample_until(
    sim: &super::ClaySim,
    mut stop: impl FnMut(&Sample) -> bool,
    limit: Duration,
) -> Vec<Sample> {
    let deadline = Instant::now() + limit;
    let mut samples = Vec::new();
    loop {
        let s = sample(sim).await;
        samples.push(s);
        if stop(&s) {
            return samples;
        }
        assert!(
            Instant::now() < deadline,
            "clay-sim did not get there within {limit:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
