//! `kiln receiver`: the ingest endpoint (`POST /v1/rows`, `ingest`), the
//! endpoint Clay's HTTP API column calls back (`POST /v1/clay/callback`,
//! `callback`) and, for tier Direct, in-line enrichment (`enrich`). A
//! callback claims its pending row and delivers it in one atomic step, so
//! duplicate callbacks, or two receivers racing, deliver a row exactly once.

mod callback;
mod enrich;
mod ingest;
mod settlements;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::FutureExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::attempt::{Attempts, Live};
use super::direct::{Direct, Routine};
use super::embedded::EmbeddedStore;
use super::rows::RowStore;
use super::store::{RedisRows, RedisStore};
use super::{DataplaneArgs, TableRuntime};
use crate::contract::{CALLBACK_PATH, ENRICH_PATH, INGEST_PATH, Keys, ROW_STATUS_PATH};

use crate::api::table::Tier;
use crate::health::{Readiness, serve_health};
use crate::ledger::lease::CreditLease;

pub use self::callback::callback_of_body;
pub use self::ingest::rows_of_body;

/// How often a receiver finishes settlements other receivers left behind.
const SETTLEMENT_SWEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// The header Clay's HTTP API column must send, with the callback token.
pub const CALLBACK_TOKEN_HEADER: &str = "x-kiln-token";

#[derive(clap::Args, Clone, Debug)]
pub struct ReceiverArgs {
    #[command(flatten)]
    pub common: DataplaneArgs,
    /// Address of the ingest and callback API.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Tier Direct: the embedded store's file (on the receiver's volume).
    #[arg(long, default_value = "/var/lib/kiln/kiln.redb")]
    pub store_path: std::path::PathBuf,
    /// Print the HTTP API column settings to paste into Clay, then exit.
    #[arg(long)]
    pub print_clay_template: bool,
    /// Most rows one `POST /v1/rows` request may carry.
    #[arg(long, env = "KILN_MAX_ROWS_PER_REQUEST", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_rows_per_request: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    outcome: &'static str,
}

struct Receiver {
    runtime: tokio::sync::watch::Receiver<Arc<TableRuntime>>,
    /// Where its rows live: Redis, or the Direct tier's embedded store.
    rows: Arc<dyn RowStore>,
    intake: Intake,
    lease: Arc<CreditLease>,
    /// Delivered rows whose credits are still to settle.
    settling: tokio::sync::mpsc::UnboundedSender<settlements::Delivered>,
    requests: Family<RequestLabels, Counter>,
    max_rows_per_request: usize,
}

/// What only one tier's receiver has.
enum Intake {
    /// Tiers Queue and Event: rows go to the Redis source stream the
    /// workers read.
    Queue(Box<RedisStore>),
    /// Tier Direct: rows are enriched in-line, on the embedded store.
    Direct(Arc<Direct>),
}

/// What to paste into the Clay table's HTTP API column.
pub fn clay_template(callback_url: &str, cost_pointer: &str) -> String {
    let cost_field = cost_pointer.trim_start_matches('/');
    format!(
        "Method:  POST\nURL:     {callback_url}\nHeaders: {CALLBACK_TOKEN_HEADER}: <the value of spec.clay.callbackTokenSecretRef>\n         Content-Type: application/json\nBody (JSON; reference your enrichment columns with \"/Column Name\"):\n{{\n  \"kiln_row_id\": \"/kiln_row_id\",\n  \"{cost_field}\": \"/Credits Used\",\n  \"email\": \"/Email\",\n  \"company\": \"/Company\"\n}}\nRun the column when the row's enrichments finish; kiln_row_id must be echoed unchanged.\n"
    )
}

pub async fn run(args: ReceiverArgs) -> anyhow::Result<()> {
    let (client, runtime) = args.common.load_table().await?;
    let (namespace, name) = (runtime.namespace.clone(), runtime.name.clone());
    if args.print_clay_template {
        let url = runtime
            .table
            .status
            .as_ref()
            .and_then(|s| s.callback_url.clone())
            .unwrap_or_else(|| {
                format!(
                    "{}{CALLBACK_PATH}",
                    crate::contract::receiver_url(&name, &namespace)
                )
            });
        print!(
            "{}",
            clay_template(&url, &runtime.table.spec.clay.cost_pointer)
        );
        return Ok(());
    }
    let max_body = runtime
        .table
        .spec
        .source
        .http
        .as_ref()
        .map_or(1024 * 1024, |h| h.max_body_bytes as usize);
    let direct_tier = runtime.table.spec.tier == Tier::Direct;
    let redis_url = runtime.redis_url.clone();
    let runtime = super::follow(client, runtime);
    let identity = args.common.identity();
    let lease = args.common.lease(&runtime.borrow(), &identity)?;
    let (rows, intake): (Arc<dyn RowStore>, _) = match redis_url {
        Some(url) if !direct_tier => {
            let store = RedisStore::connect(url.expose(), Keys::new(&namespace, &name))
                .await
                .context("connecting to Redis")?;
            let rows = RedisRows {
                store: store.clone(),
                dead_letter: super::dead_letter_stream(&runtime.borrow()),
            };
            (Arc::new(rows), Intake::Queue(Box::new(store)))
        }
        None if !direct_tier => {
            anyhow::bail!("this receiver needs spec.redis (tiers Queue and Event)")
        }
        _ => {
            let store = EmbeddedStore::open(&args.store_path)
                .map_err(|error| store_open_error(&args.store_path, error))?;
            lease.prefill();
            let attempts = Arc::new(Attempts {
                live: Live::follow(runtime.clone(), Arc::new(store.clone()), &lease),
                rows: Arc::new(store.clone()),
                lease: lease.clone(),
            });
            let routine = Routine::from_runtime(&runtime.borrow(), &lease);
            let direct = Direct::new(store.clone(), attempts, routine);
            let resumed = direct.resume().await?;
            tracing::info!(resumed, "resumed waiting for pending rows");
            (Arc::new(store), Intake::Direct(direct))
        }
    };
    let mut registry = Registry::default();
    crate::metrics::dataplane().register(&mut registry);
    let requests = Family::<RequestLabels, Counter>::default();
    registry.register(
        "kiln_receiver_requests",
        "Receiver requests by endpoint and outcome",
        requests.clone(),
    );
    let (settling, settle_queue) = tokio::sync::mpsc::unbounded_channel();
    let receiver = Arc::new(Receiver {
        lease: lease.clone(),
        settling,
        max_rows_per_request: args.max_rows_per_request as usize,
        runtime: runtime.clone(),
        rows,
        intake,
        requests,
    });
    let shutdown = super::stop_signal(runtime.clone()).shared();
    let readiness = Readiness::default();
    let health = tokio::spawn(serve_health(
        args.common.health_addr,
        registry,
        readiness.clone(),
        shutdown.clone(),
    ));
    let app = Router::new()
        .route(INGEST_PATH, post(ingest::ingest))
        .route(ENRICH_PATH, post(enrich::enrich))
        .route(ROW_STATUS_PATH, get(enrich::row_status))
        .route(CALLBACK_PATH, post(callback::callback))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(receiver.clone());
    let settler = tokio::spawn(
        receiver
            .clone()
            .settle_queued(settle_queue, shutdown.clone()),
    );
    let sweeper = tokio::spawn({
        let receiver = receiver.clone();
        async move {
            loop {
                tokio::time::sleep(SETTLEMENT_SWEEP).await;
                receiver.settle_owed().await;
            }
        }
    });
    let background = match &receiver.intake {
        Intake::Direct(direct) => {
            // Webhook rows are retried by the sweeper; routine rows by their
            // own lifecycle (a routine run is never started twice).
            let sweeps = direct
                .routine
                .is_none()
                .then(|| direct.attempts.clone().sweep_until(shutdown.clone()));
            let deliveries = direct
                .clone()
                .deliver_outbox(reqwest::Client::new(), shutdown.clone());
            tokio::spawn(async move {
                futures::join!(deliveries, async {
                    if let Some(sweeps) = sweeps {
                        sweeps.await
                    }
                });
            })
        }
        Intake::Queue(store) => tokio::spawn(
            super::sink::OutboxDelivery {
                store: (**store).clone(),
                runtime,
                identity,
                http: reqwest::Client::new(),
            }
            .run(shutdown.clone()),
        ),
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(addr = %args.listen, table = %args.common.table, "receiver started");
    readiness.set(true);
    crate::http::serve(listener, app, shutdown).await?;
    sweeper.abort();
    background.await?;
    settler.await?;
    receiver.settle_owed().await;
    lease.close().await;
    health.await??;
    tracing::info!("receiver stopped");
    Ok(())
}

impl Receiver {
    fn runtime(&self) -> Arc<TableRuntime> {
        self.runtime.borrow().clone()
    }

    fn count(&self, endpoint: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestLabels { endpoint, outcome })
            .inc();
    }
}

fn reply(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

/// 404 for an endpoint this tier's receiver does not serve, naming the one to use.
fn not_served(receiver: &Receiver, endpoint: &'static str, use_instead: &str) -> Response {
    receiver.count(endpoint, "disabled");
    reply(StatusCode::NOT_FOUND, json!({ "error": use_instead }))
}

/// Constant-time comparison; an empty expected token never matches (the
/// table's Secret is refused at start, this is the second line of defence).
fn bearer_matches(headers: &HeaderMap, expected: &str) -> bool {
    let given = crate::http::bearer_token(headers).unwrap_or_default();
    !expected.is_empty() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// Checks the caller's bearer token (spec.source.http); the table's runtime
/// when it passes, else the response to send.
fn authorize(
    receiver: &Receiver,
    headers: &HeaderMap,
    endpoint: &'static str,
) -> Result<Arc<TableRuntime>, Box<Response>> {
    let runtime = receiver.runtime();
    let Some(token) = &runtime.ingest_token else {
        receiver.count(endpoint, "disabled");
        return Err(Box::new(reply(
            StatusCode::NOT_FOUND,
            json!({"error": "this table does not take rows over HTTP (spec.source.http is not set)"}),
        )));
    };
    if !bearer_matches(headers, token.expose()) {
        receiver.count(endpoint, "unauthorized");
        return Err(Box::new(reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": "missing or wrong bearer token"}),
        )));
    }
    Ok(runtime)
}

/// Why the embedded store could not be opened, with the fix when the volume
/// is not writable (hostPath and `local` volumes ignore the pod's fsGroup).
fn store_open_error(path: &std::path::Path, error: redb::Error) -> anyhow::Error {
    let denied =
        matches!(&error, redb::Error::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied);
    let error =
        anyhow::Error::new(error).context(format!("opening the embedded store {}", path.display()));
    if denied {
        error.context(format!(
            "the store's volume is not writable by uid {uid}: volume types that ignore fsGroup \
             (hostPath, local) need the directory owned by {uid}, or use a StorageClass whose \
             volumes honour fsGroup",
            uid = crate::contract::KILN_UID
        ))
    } else {
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clay_template_names_the_url_header_and_correlation_id() {
        let template = clay_template(
            "http://leads-receiver.sales.svc:8080/v1/clay/callback",
            "/kiln_credits",
        );
        assert!(
            template.contains("URL:     http://leads-receiver.sales.svc:8080/v1/clay/callback")
        );
        assert!(template.contains("x-kiln-token: <the value of spec.clay.callbackTokenSecretRef>"));
        assert!(template.contains("\"kiln_row_id\": \"/kiln_row_id\""));
        assert!(template.contains("\"kiln_credits\": \"/Credits Used\""));
    }
}
