//! Fixtures for the data plane's unit tests: a table's runtime, and
//! stand-ins for Clay's webhook and the operator's lease API on loopback,
//! so the row logic runs against real HTTP in milliseconds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use axum::Json;
use axum::http::StatusCode;
use axum::routing::post;
use tokio::sync::watch;

use super::TableRuntime;
use super::attempt::{Attempts, Live};
use super::rows::memory::{MemoryRows, Terminal};
use crate::api::EnrichmentTable;
use crate::api::budget::OnExhausted;
use crate::clay::rotation::{MemoryCounter, WebhookTarget};
use crate::ledger::client::{LedgerClient, TokenSource};
use crate::ledger::lease::{CreditLease, LeaseTarget};
use crate::ledger::{Denial, DenialReason, LeaseAnswer, LeaseRequest};
use crate::secret::SecretString;

/// A table's row logic wired to an in-memory row store, a stand-in Clay
/// webhook and a stand-in lease API.
pub struct Rig {
    pub attempts: Arc<Attempts>,
    pub rows: Arc<MemoryRows>,
    /// Rows Clay was sent.
    sent: Arc<AtomicUsize>,
    /// Failed Clay calls the lease reported to the stand-in ledger.
    failures: Arc<AtomicU64>,
}

impl Rig {
    /// A Queue table allowing `max_attempts`, whose Clay webhook answers
    /// `clay`, on a budget that grants every ask or refuses with `denial`.
    pub async fn new(clay: StatusCode, denial: Option<Denial>, max_attempts: u32) -> Self {
        let mut table = crate::operator::table::build::tests::queue_table();
        table.spec.clay.max_attempts = max_attempts;
        let (webhook, sent) = clay_webhook(clay).await;
        let runtime = Arc::new(runtime(&table, vec![webhook]));
        let target = LeaseTarget {
            namespace: "sales".into(),
            budget: "b".into(),
            table: "leads".into(),
            holder: "worker-0".into(),
        };
        let cost = &table.spec.clay.credits_per_row;
        let (ledger, failures) = ledger(denial).await;
        let lease = CreditLease::start(target, cost, ledger);
        let rows = Arc::new(MemoryRows::default());
        let (_, runtime) = watch::channel(runtime);
        let counter = Arc::new(MemoryCounter::default());
        let attempts = Arc::new(Attempts {
            live: Live::follow(runtime, counter, &lease),
            rows: rows.clone(),
            lease,
        });
        Self {
            attempts,
            rows,
            sent,
            failures,
        }
    }

    /// Rows Clay was sent.
    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    /// Closes the lease, which reports what it has not yet, and returns
    /// the failed Clay calls the ledger was told of.
    pub async fn failures_reported(&self) -> u64 {
        self.attempts.lease.close().await;
        self.failures.load(Ordering::SeqCst)
    }
}

/// A budget refusal for `reason`, asking tables to do `on_exhausted`.
pub fn refusal(reason: DenialReason, on_exhausted: OnExhausted) -> Option<Denial> {
    Some(Denial {
        reason,
        message: "refused".into(),
        on_exhausted,
    })
}

/// A row's end, dead-lettered for `reason`.
pub fn dead_lettered(reason: &str) -> Vec<Terminal> {
    vec![Terminal::DeadLettered(reason.into())]
}

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

/// A Clay webhook answering every row with `status` (a 429 says to retry
/// at once); the target, and how many rows it was sent.
pub async fn clay_webhook(status: StatusCode) -> (WebhookTarget, Arc<AtomicUsize>) {
    let rows = Arc::new(AtomicUsize::new(0));
    let counted = rows.clone();
    let router = axum::Router::new().route(
        "/webhook",
        post(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut headers = axum::http::HeaderMap::new();
                if status == StatusCode::TOO_MANY_REQUESTS {
                    headers.insert(axum::http::header::RETRY_AFTER, "0".parse().unwrap());
                }
                (
                    status,
                    headers,
                    Json(serde_json::json!({"message": "stand-in"})),
                )
            }
        }),
    );
    let target = WebhookTarget::new(
        "main",
        SecretString::new(format!("{}/webhook", serve(router).await)),
        None,
    );
    (target, rows)
}

/// A lease API granting every ask, or refusing each with `denial`; the
/// client, and the sum of the failed Clay calls it was told of.
pub async fn ledger(denial: Option<Denial>) -> (LedgerClient, Arc<AtomicU64>) {
    let failures = Arc::new(AtomicU64::new(0));
    let reported = failures.clone();
    let router = axum::Router::new().route(
        "/v1/lease",
        post(move |Json(request): Json<LeaseRequest>| {
            let denial = denial.clone();
            reported.fetch_add(request.failures, Ordering::SeqCst);
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
    let client = LedgerClient::new(vec![serve(router).await], token, None).unwrap();
    (client, failures)
}
