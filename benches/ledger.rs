//! Rows per second one CreditBudget sustains through credit leases (each
//! holder a data-plane process's lease, rows drawn as fast as they can be),
//! the API-server writes per second that costs, and the budget's status size,
//! on the real local control plane.
//!
//! Run: `cargo bench --bench ledger` (HOLDERS=8 SECONDS=15 to change the load).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kiln::ledger::lease::{CreditLease, LeaseTarget};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use serde_json::json;

use kiln::api::table::CreditCost;
use kiln::api::{CreditBudget, EnrichmentTable};
use kiln::ledger::client::{LedgerClient, TokenSource};
use kiln::secret::SecretString;

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
    let holders = support::env_or("HOLDERS", 8);
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
    let token = kiln::devenv::ledger_token(&env.client, &env.namespace, "kiln-leads")
        .await
        .unwrap();
    let endpoint = format!("http://127.0.0.1:{}", operator.api_port);
    let row = CreditCost {
        data_credits: 1.0,
        actions: 1,
    };
    let leases: Vec<Arc<CreditLease>> = (0..holders)
        .map(|h| {
            CreditLease::start(
                LeaseTarget {
                    namespace: env.namespace.clone(),
                    budget: "team".into(),
                    table: "leads".into(),
                    holder: format!("bench-{h}"),
                },
                &row,
                LedgerClient::new(
                    vec![endpoint.clone()],
                    TokenSource::Static(SecretString::new(token.clone())),
                    None,
                )
                .expect("a ledger client"),
            )
        })
        .collect();

    let writes_before = status_writes(&env.client).await;
    let rows = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for lease in &leases {
        let (lease, rows, row) = (lease.clone(), rows.clone(), row.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                // A row costs 1 credit worst case; Clay charged 0.5 of it.
                let draw = lease.draw(&row).await.expect("draw");
                lease.settle_row(&draw.cost, &draw.period, Some(0.5), None);
                if rows.fetch_add(1, Ordering::Relaxed) % 256 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let writes = status_writes(&env.client).await - writes_before;
    let status_of_team = || async {
        env.api::<CreditBudget>()
            .get("team")
            .await
            .unwrap()
            .status
            .unwrap()
    };
    let in_flight = status_of_team().await;
    let status_bytes = serde_json::to_vec(&in_flight).unwrap().len();
    for lease in &leases {
        lease.close().await;
    }
    let done = rows.load(Ordering::Relaxed);
    let status = status_of_team().await;
    assert!(status.leases.is_empty(), "every lease closed");
    assert_eq!(
        status.used.data_credits,
        done as f64 * 0.5,
        "every row charged once, at what Clay charged"
    );
    println!(
        "ledger: {holders} holders, {elapsed:.1}s: {done} rows = {:.0} rows/s; {writes} status writes = {:.1} writes/s; budget status {status_bytes} bytes with {holders} leases and rows in flight",
        done as f64 / elapsed,
        writes / elapsed,
    );
}
