//! Fixtures for the data plane's unit tests: a table's runtime, and
//! stand-ins for Clay's webhook and the operator's lease API on loopback,
//! so the row logic runs against real HTTP in milliseconds.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Json;
use axum::http::StatusCode;
use axum::routing::post;

use super::TableRuntime;
use crate::api::EnrichmentTable;
use crate::clay::rotation::WebhookTarget;
use crate::ledger::client::{LedgerClient, TokenSource};
use crate::ledger::{Denial, LeaseAnswer, LeaseRequest};
use crate::secret::SecretString;

/// The runtime of `table` sending to `webhooks`, with no other Secrets.
pub fn runtime(table: &EnrichmentTable, webhooks: Vec<WebhookTarget>) -> TableRuntime {
    TableRuntime {
        namespace: "sales".into(),
        name: "leads".into(),
        table: table.clone(),
        webhook_targets: webhooks,
        callback_token: SecretString::new("t"),
        ingest_token: None,
        redis_url: None,
        routine_api_key: None,
        sink_headers: vec![],
        kafka_source: None,
        kafka_sink: None,
        kafka_dead_letter: None,
    }
}

/// Serves `router` on a free loopback port; its base URL.
async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{address}")
}

/// A Clay webhook answering every row with `status`; the target, and how
/// many rows it was sent.
pub async fn clay_webhook(status: StatusCode) -> (WebhookTarget, Arc<AtomicUsize>) {
    let rows = Arc::new(AtomicUsize::new(0));
    let counted = rows.clone();
    let router = axum::Router::new().route(
        "/webhook",
        post(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async move { (status, Json(serde_json::json!({"message": "stand-in"}))) }
        }),
    );
    let target = WebhookTarget {
        name: "main".into(),
        url: SecretString::new(format!("{}/webhook", serve(router).await)),
        token: None,
    };
    (target, rows)
}

/// A lease API granting every ask, or refusing each with `denial`.
pub async fn ledger(denial: Option<Denial>) -> LedgerClient {
    let router = axum::Router::new().route(
        "/v1/lease",
        post(move |Json(request): Json<LeaseRequest>| {
            let denial = denial.clone();
            async move {
                Json(LeaseAnswer {
                    granted: if denial.is_none() {
                        request.ask.clone()
                    } else {
                        Default::default()
                    },
                    refunded: request.refund.clone(),
                    held: request.ask.clone(),
                    lease: request.lease,
                    seq: request.seq,
                    expires_at: "2026-11-28T00:01:00Z".into(),
                    period: "2026-11-01T00:00:00Z".into(),
                    denial,
                    rate: None,
                })
            }
        }),
    );
    let token = TokenSource::Static(SecretString::new("token"));
    LedgerClient::new(vec![serve(router).await], token, None).unwrap()
}
