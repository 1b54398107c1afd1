//! `kiln clay-sim`: a local stand-in that speaks Clay's integration surface
//! (webhook sources, HTTP API column callbacks, routines API, credits) for
//! demos, tests and benchmarks. Fault injection is set by flags; an admin
//! endpoint (which real Clay does not have) reports what it charged.

mod enrich;
mod inbound;
mod routines;

pub use enrich::{EnrichPlan, Enrichment, Provider, enrich, row_key, stable_hash};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Flags of `kiln clay-sim`.
#[derive(clap::Args, Clone, Debug)]
pub struct SimArgs {
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8780")]
    pub listen: SocketAddr,
    /// Seed for every random decision (latency, findings, faults).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Workspace rate limit in records per second (Clay: about 10).
    #[arg(long, default_value_t = 10)]
    pub rate: u32,
    /// Workspace burst (Clay: about 20).
    #[arg(long, default_value_t = 20)]
    pub burst: u32,
    /// Lifetime submissions per webhook source; later rows are silently dropped.
    #[arg(long, default_value_t = 50_000)]
    pub source_cap: u64,
    /// Largest JSON array of rows accepted in one request.
    #[arg(long, default_value_t = 10)]
    pub max_batch: usize,
    /// Request body limit in bytes.
    #[arg(long, default_value_t = 100_000)]
    pub body_limit: usize,
    /// Shortest enrichment latency in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub latency_min_ms: u64,
    /// Longest enrichment latency in milliseconds (uniformly distributed).
    #[arg(long, default_value_t = 3000)]
    pub latency_max_ms: u64,
    /// Providers as field:cost:hit_rate (repeatable).
    #[arg(long = "provider", default_values_t = vec![
        "email:1:0.9".parse::<Provider>().unwrap(),
        "phone:5:0.5".parse::<Provider>().unwrap(),
        "company:2:0.8".parse::<Provider>().unwrap(),
    ])]
    pub providers: Vec<Provider>,
    /// Fraction of webhook submissions answered with a 5xx (nothing accepted).
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Fraction of webhook submissions that stall, then answer 504 (nothing accepted).
    #[arg(long, default_value_t = 0.0)]
    pub stall_rate: f64,
    /// How long a stalled submission hangs, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub stall_ms: u64,
    /// Fraction of callbacks never sent.
    #[arg(long, default_value_t = 0.0)]
    pub drop_rate: f64,
    /// Fraction of callbacks sent twice.
    #[arg(long, default_value_t = 0.0)]
    pub duplicate_rate: f64,
    /// Data credits the workspace may spend; 402 afterwards. Unlimited when unset.
    #[arg(long)]
    pub quota_data_credits: Option<f64>,
    /// API key the routines API accepts (`clay-api-key` header).
    #[arg(long, env = "CLAY_SIM_API_KEY")]
    pub api_key: Option<String>,
    /// Attempts per callback delivery when the receiver fails (5xx or unreachable).
    #[arg(long, default_value_t = 3)]
    pub callback_attempts: u32,
}

impl Default for SimArgs {
    fn default() -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: SimArgs,
        }
        Wrapper::parse_from(["clay-sim"]).args
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.field, self.cost, self.hit_rate)
    }
}

/// A webhook source as configured through the admin API.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceConfig {
    /// Required `x-clay-webhook-auth` value, if any.
    #[serde(default)]
    pub token: Option<String>,
    /// Where the table's HTTP API column sends results.
    #[serde(default)]
    pub callback_url: Option<String>,
    /// Static headers the HTTP API column sends (e.g. the receiver's token).
    #[serde(default)]
    pub callback_headers: HashMap<String, String>,
}

/// A registered run-finished webhook for the routines API.
#[derive(Clone, Debug, Deserialize)]
pub struct WebhookConfig {
    pub url: String,
    pub secret: String,
}

/// What the simulator did, for tests and benchmarks.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SimStats {
    pub requests: u64,
    pub rows_received: u64,
    pub rows_accepted: u64,
    pub rows_dropped_over_cap: u64,
    pub rejected_rate_limited: u64,
    pub rejected_unauthorized: u64,
    pub rejected_quota: u64,
    pub injected_errors: u64,
    pub injected_stalls: u64,
    pub rows_enriched: u64,
    pub callbacks_sent: u64,
    pub callbacks_duplicated: u64,
    pub callbacks_dropped: u64,
    pub callbacks_failed: u64,
    pub data_credits_charged: f64,
    pub actions_charged: u64,
    pub routine_runs: u64,
    pub run_webhooks_sent: u64,
    /// Submissions per webhook source over its lifetime.
    pub source_submissions: HashMap<String, u64>,
}

pub(crate) struct Sim {
    args: SimArgs,
    plan: EnrichPlan,
    limiter: Mutex<Bucket>,
    sources: Mutex<HashMap<String, SourceConfig>>,
    webhooks: Mutex<HashMap<String, WebhookConfig>>,
    stats: Mutex<SimStats>,
    runs: Mutex<HashMap<String, routines::Run>>,
    /// Submissions seen per row key, so each retry draws its own faults.
    attempts: Mutex<HashMap<String, u32>>,
    http: reqwest::Client,
    request_counter: std::sync::atomic::AtomicU64,
}

/// A non-waiting token bucket: the simulator refuses, it does not queue.
struct Bucket {
    tokens: f64,
    updated: std::time::Instant,
}

impl Sim {
    /// Takes `rows` tokens, or says how long until they would be available.
    fn take_tokens(&self, rows: usize) -> Result<(), Duration> {
        let rate = f64::from(self.args.rate.max(1));
        let burst = f64::from(self.args.burst.max(1));
        let mut bucket = self.limiter.lock().unwrap();
        let now = std::time::Instant::now();
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.updated).as_secs_f64() * rate).min(burst);
        bucket.updated = now;
        let wanted = rows as f64;
        if bucket.tokens >= wanted {
            bucket.tokens -= wanted;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((wanted - bucket.tokens) / rate))
        }
    }

    /// Charges a cost unless it would exceed the quota; false when refused.
    fn charge(&self, data_credits: f64, actions: u64) -> bool {
        let mut stats = self.stats.lock().unwrap();
        if let Some(quota) = self.args.quota_data_credits
            && stats.data_credits_charged + data_credits > quota
        {
            return false;
        }
        stats.data_credits_charged += data_credits;
        stats.actions_charged += actions;
        true
    }

    fn quota_spent(&self) -> bool {
        self.args
            .quota_data_credits
            .is_some_and(|q| self.stats.lock().unwrap().data_credits_charged >= q)
    }

    /// Counts a submission of `row` and returns which attempt it is (1-based).
    fn next_attempt(&self, row: &serde_json::Value) -> u32 {
        let mut attempts = self.attempts.lock().unwrap();
        let count = attempts.entry(enrich::row_key(row)).or_insert(0);
        *count += 1;
        *count
    }

    fn stat(&self, update: impl FnOnce(&mut SimStats)) {
        update(&mut self.stats.lock().unwrap());
    }

    /// A per-request random draw that is still reproducible under the seed.
    fn request_rng(&self) -> rand::rngs::StdRng {
        let n = self
            .request_counter
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        enrich::rng_for(self.args.seed, &format!("request-{n}"))
    }
}

/// A 429 with Retry-After in whole seconds, as Clay sends it.
pub(crate) fn rate_limited(wait: Duration) -> Response {
    let mut response = clay_error(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
    let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
    response.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        seconds
            .to_string()
            .parse()
            .expect("digits are a valid header"),
    );
    response
}

/// Clay's error body.
pub(crate) fn clay_error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "message": message }))).into_response()
}

/// Builds the simulator's router (exposed so benchmarks can embed it).
pub fn router(args: SimArgs) -> Router {
    let plan = EnrichPlan {
        seed: args.seed,
        providers: args.providers.clone(),
        latency_min: Duration::from_millis(args.latency_min_ms),
        latency_max: Duration::from_millis(args.latency_max_ms.max(args.latency_min_ms)),
        drop_rate: args.drop_rate,
        duplicate_rate: args.duplicate_rate,
    };
    let sim = Arc::new(Sim {
        limiter: Mutex::new(Bucket {
            tokens: f64::from(args.burst.max(1)),
            updated: std::time::Instant::now(),
        }),
        args,
        plan,
        sources: Mutex::default(),
        webhooks: Mutex::default(),
        stats: Mutex::default(),
        runs: Mutex::default(),
        attempts: Mutex::default(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("building the HTTP client"),
        request_counter: Default::default(),
    });
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/admin/sources/{id}", put(put_source))
        .route("/admin/webhooks/{id}", put(put_webhook))
        .route("/admin/stats", get(get_stats))
        .route("/v3/sources/webhook/{id}", post(inbound::submit))
        .route("/public/v0/routines/{id}/run", post(routines::run))
        .route(
            "/public/v0/routines/run/{run_id}/results",
            get(routines::results),
        )
        .with_state(sim)
}

async fn put_source(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    Json(config): Json<SourceConfig>,
) -> StatusCode {
    sim.sources.lock().unwrap().insert(id, config);
    StatusCode::NO_CONTENT
}

async fn put_webhook(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    Json(config): Json<WebhookConfig>,
) -> StatusCode {
    sim.webhooks.lock().unwrap().insert(id, config);
    StatusCode::NO_CONTENT
}

async fn get_stats(State(sim): State<Arc<Sim>>) -> Json<SimStats> {
    Json(sim.stats.lock().unwrap().clone())
}

/// Runs the simulator until SIGTERM/SIGINT.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    // Tests and scripts read this line to find the port.
    println!("clay-sim listening on http://{addr}");
    tracing::info!(%addr, seed = args.seed, rate = args.rate, "clay-sim started");
    crate::http::serve(listener, router(args), crate::shutdown_signal()).await
}
