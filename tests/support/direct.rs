//! A Direct-tier table on real components (control plane + operator, clay-sim,
//! the receiver with its embedded store), for tests and benchmarks.

use std::time::Duration;

use serde_json::{Value, json};

use super::pipeline::{Base, base, clay_spec, create_table};
use super::wait;

pub struct Direct {
    pub base: Base,
    pub test: String,
    pub kubeconfig: std::path::PathBuf,
    pub token_file: std::path::PathBuf,
    pub store_path: std::path::PathBuf,
}

impl Direct {
    /// Starts the receiver; `identity` names its credit reservations.
    pub fn receiver(&self, identity: &str) -> super::KilnProcess {
        let listen = format!("127.0.0.1:{}", self.base.receiver_port);
        super::start_dataplane(
            "receiver",
            &format!("{}/leads", self.base.env.namespace),
            &self.kubeconfig,
            &self.token_file,
            &format!("http://127.0.0.1:{}", self.base.operator.api_port),
            &[
                "--listen",
                &listen,
                "--store-path",
                self.store_path.to_str().unwrap(),
                "--identity",
                identity,
            ],
            &[],
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.base.receiver_port)
    }

    /// POSTs one row to /v1/enrich, retrying while the receiver is down or
    /// restarting (connection errors, 503), as a well-behaved caller does.
    pub async fn enrich(&self, http: &reqwest::Client, row: &Value, query: &str) -> (u16, Value) {
        wait::until_within(
            &format!("an answer for {row}"),
            Duration::from_secs(120),
            || async {
                let response = http
                    .post(self.url(&format!("/v1/enrich{query}")))
                    .bearer_auth("crm-secret")
                    .json(row)
                    .send()
                    .await
                    .ok()?;
                let status = response.status().as_u16();
                let body = response.json::<Value>().await.ok()?;
                (status != 503).then_some((status, body))
            },
        )
        .await
    }
}

/// A Direct table `leads` (with `sink`, if any) and its receiver's settings.
/// With `routine`, the table enriches through clay-sim's routines API (the
/// sim must be started with `--api-key sim-api-key`) instead of webhooks.
pub async fn direct(
    test: &str,
    sim_flags: &[&str],
    limit: f64,
    sink: Option<Value>,
    routine: bool,
) -> Direct {
    let base = base(
        test,
        sim_flags,
        limit,
        "Reject",
        &[("routine-api-key", "sim-api-key")],
    )
    .await;
    let mut spec = json!({
        "tier": "Direct", "key": "domain", "budgetRef": {"name": "team"}, "dedupeWindow": "1h",
        "clay": clay_spec(12.0),
        "source": {"http": {"authTokenSecretRef": {"name": "pipeline", "key": "ingest-token"}, "syncTimeout": "60s"}}
    });
    if let Some(sink) = sink {
        spec["sink"] = sink;
    }
    if routine {
        spec["clay"]["routine"] = json!({
            "routineId": "enrich-accounts",
            "apiKeySecretRef": {"name": "pipeline", "key": "routine-api-key"},
            "apiUrl": format!("{}/public/v0", base.sim.url)
        });
        // A routine table has no webhook sources (the schema refuses both).
        spec["clay"]
            .as_object_mut()
            .unwrap()
            .remove("webhookSources");
    }
    let (kubeconfig, token_file) = create_table(&base.env, test, spec).await;
    let store_path = super::work_dir().join(format!("{test}.redb"));
    Direct {
        base,
        test: test.to_string(),
        kubeconfig,
        token_file,
        store_path,
    }
}
