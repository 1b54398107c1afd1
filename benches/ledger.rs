//! Reservations per second one CreditBudget sustains through the operator's
//! reservation API, and the API-server writes per second that costs, on the
//! real local control plane.
//!
//! Run: `cargo bench --bench ledger` (CLIENTS=32 SECONDS=15 to change the load).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use serde_json::json;

use kiln::api::table::CreditCost;
use kiln::api::{CreditBudget, EnrichmentTable};
use kiln::clay::SecretString;
use kiln::ledger::client::{LedgerClient, TokenSource};
use kiln::ledger::{ReserveRequest, SettleRequest};

/// PATCHes of creditbudgets/status the API server has served so far.
async fn status_writes(client: &kube::Client) -> f64 {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(request).await.unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{")
                && l.contains("resource=\"creditbudgets\"")
                && l.contains("subresource=\"status\"")
                && l.contains("verb=\"PATCH\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::main]
async fn main() {
    let clients = support::env_or("CLIENTS", 32);
    let seconds = support::env_or("SECONDS", 15);
    let env = support::test_env("bench-ledger").await;
    support::install_kiln_crds(&env.client).await;
    let operator = support::start_operator(&env.namespace, "bench").await;
    let secret: Secret = serde_json::from_value(json!({"metadata": {"name": "clay"}, "stringData": {"url": "u", "callback": "c", "ingest": "i"}})).unwrap();
    env.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let budget: CreditBudget = serde_json::from_value(json!({"apiVersion": "kiln.dev/v1alpha1", "kind": "CreditBudget", "metadata": {"name": "team"}, "spec": {"limits": {"dataCredits": 1.0e12}}})).unwrap();
    env.api::<CreditBudget>()
        .create(&PostParams::default(), &budget)
        .await
        .unwrap();
    let table: EnrichmentTable = serde_json::from_value(json!({
        "apiVersion": "kiln.dev/v1alpha1", "kind": "EnrichmentTable", "metadata": {"name": "leads"},
        "spec": {"tier": "Direct", "key": "email", "budgetRef": {"name": "team"},
            "clay": {"webhookSources": [{"name": "p", "urlSecretRef": {"name": "clay", "key": "url"}}],
                "creditsPerRow": {"dataCredits": 1.0}, "callbackTokenSecretRef": {"name": "clay", "key": "callback"}},
            "source": {"http": {"authTokenSecretRef": {"name": "clay", "key": "ingest"}}}}
    }))
    .unwrap();
    env.api::<EnrichmentTable>()
        .create(&PostParams::default(), &table)
        .await
        .unwrap();
    let token = kiln::devenv::service_account_token(&env.client, &env.namespace, "kiln-leads")
        .await
        .unwrap();
    let ledger = Arc::new(LedgerClient::new(
        vec![format!("http://127.0.0.1:{}", operator.api_port)],
        TokenSource::Static(SecretString::new(token)),
    ));

    let writes_before = status_writes(&env.client).await;
    let reservations = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (ledger, reservations, namespace) =
            (ledger.clone(), reservations.clone(), env.namespace.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                let request = ReserveRequest {
                    id: format!("b{c}-{i}"),
                    namespace: namespace.clone(),
                    budget: "team".into(),
                    table: "leads".into(),
                    holder: "bench".into(),
                    ask: CreditCost {
                        data_credits: 10.0,
                        actions: 10,
                    },
                    min: CreditCost {
                        data_credits: 1.0,
                        actions: 1,
                    },
                    ttl_seconds: 60,
                };
                let grant = ledger.reserve(&request).await.expect("reserve");
                reservations.fetch_add(1, Ordering::Relaxed);
                ledger
                    .settle(&SettleRequest {
                        namespace: namespace.clone(),
                        budget: "team".into(),
                        table: "leads".into(),
                        reservation: grant.id,
                        seq: 1,
                        used: CreditCost {
                            data_credits: 7.5,
                            actions: 10,
                        },
                        release: true,
                        successes: 10,
                        failures: 0,
                    })
                    .await
                    .expect("settle");
                i += 1;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let writes = status_writes(&env.client).await - writes_before;
    let done = reservations.load(Ordering::Relaxed);
    let status = env
        .api::<CreditBudget>()
        .get("team")
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(
        status.used.data_credits,
        done as f64 * 7.5,
        "every settlement recorded once"
    );
    println!(
        "ledger: {clients} clients, {elapsed:.1}s: {done} reservations+settlements = {:.0} reservations/s; {writes} status writes = {:.1} writes/s ({:.0} reservations per write)",
        done as f64 / elapsed,
        writes / elapsed,
        done as f64 / writes.max(1.0)
    );
}
