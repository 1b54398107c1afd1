//! The lease API the leader serves to the data plane. Callers present their
//! ServiceAccount token; a TokenReview authenticates it (cached, refusals
//! too), and a table's ServiceAccount (`kiln-<table>` in the table's
//! namespace) may only draw on the budget its table references. Nothing is
//! parsed, and no per-budget work starts, before the caller is known.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::ledger::LedgerError;
use crate::api::budget::ClayWorkspace;
use crate::api::{CreditBudget, EnrichmentTable};
use crate::clay::limiter::Rate;
use crate::ledger::{LeaseAnswer, LeaseRequest, TOKEN_AUDIENCE, validate};
use crate::operator::context::Context;
use crate::operator::rate::{Ask, workspace_key};
use crate::operator::table::build::service_account_name;

/// How long a TokenReview's verdict, either way, is trusted.
const TOKEN_CACHE_TTL: Duration = Duration::from_secs(60);
/// How long a checked (namespace, table, budget) triple is trusted.
const REFERENCE_CACHE_TTL: Duration = Duration::from_secs(30);
/// Entries kept in each cache before the oldest are dropped.
const CACHE_MAX: usize = 10_000;
/// Largest request body.
const BODY_LIMIT: usize = 16 * 1024;

/// A verdict with when it was reached.
type Cache<K, V> = Arc<Mutex<HashMap<K, (V, Instant)>>>;
/// A token's ServiceAccount (namespace, name), or the refusal to answer.
type Verdict = Result<(String, String), (StatusCode, String)>;

#[derive(Clone)]
struct ApiState {
    ctx: Arc<Context>,
    /// Token hash → the ServiceAccount it authenticates, or why not.
    tokens: Cache<[u8; 32], Verdict>,
    /// (namespace, table, budget) whose table exists and draws on the budget,
    /// with the Clay workspace the budget names.
    references: Cache<(String, String, String), Reference>,
}

/// A table allowed to draw on a budget, and the workspace whose rate it shares.
#[derive(Clone)]
struct Reference {
    table: EnrichmentTable,
    workspace: Option<ClayWorkspace>,
}

/// A refusal with a JSON `{"message"}` body.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "message": self.1 }))).into_response()
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError(status, message.into())
}

/// Serves the lease API until `shutdown` resolves.
/// Serves the lease API on `addr`, over TLS when `tls` is given.
pub async fn serve(
    addr: SocketAddr,
    ctx: Arc<Context>,
    tls: Option<tokio::sync::watch::Receiver<Arc<rustls::ServerConfig>>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = ApiState {
        ctx,
        tokens: Arc::default(),
        references: Arc::default(),
    };
    let app = Router::new()
        .route("/v1/lease", post(lease))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, tls = tls.is_some(), "serving the lease API");
    match tls {
        Some(tls) => crate::http::serve_tls(listener, app, tls, shutdown).await,
        None => crate::http::serve(listener, app, shutdown).await,
    }
}

fn cached<K: std::hash::Hash + Eq, V: Clone>(
    cache: &Cache<K, V>,
    key: &K,
    ttl: Duration,
) -> Option<V> {
    cache
        .lock()
        .unwrap()
        .get(key)
        .filter(|(_, at)| at.elapsed() < ttl)
        .map(|(v, _)| v.clone())
}

fn remember<K: std::hash::Hash + Eq, V>(cache: &Cache<K, V>, key: K, value: V, ttl: Duration) {
    let mut cache = cache.lock().unwrap();
    if cache.len() >= CACHE_MAX {
        cache.retain(|_, (_, at)| at.elapsed() < ttl);
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
    }
    cache.insert(key, (value, Instant::now()));
}

/// Authenticates the bearer token; returns (namespace, service account).
async fn caller(state: &ApiState, headers: &HeaderMap) -> Result<(String, String), ApiError> {
    let token = crate::http::bearer_token(headers).ok_or_else(|| {
        error(
            StatusCode::UNAUTHORIZED,
            "a ServiceAccount bearer token is required",
        )
    })?;
    let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    if let Some(verdict) = cached(&state.tokens, &key, TOKEN_CACHE_TTL) {
        return verdict.map_err(|(status, message)| ApiError(status, message));
    }
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(vec![TOKEN_AUDIENCE.to_string()]),
        },
        ..Default::default()
    };
    let reviewed = Api::<TokenReview>::all(state.ctx.client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "TokenReview failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "could not verify the token",
            )
        })?;
    let status = reviewed.status.unwrap_or_default();
    // A token for the API server (or anything else) is not a ledger token.
    let for_ledger = status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == TOKEN_AUDIENCE));
    let verdict = match status
        .user
        .and_then(|u| u.username)
        .filter(|_| status.authenticated == Some(true) && for_ledger)
    {
        None => Err((
            StatusCode::UNAUTHORIZED,
            format!("the token is not a valid ServiceAccount token for audience {TOKEN_AUDIENCE}"),
        )),
        Some(username) => {
            let mut parts = username
                .strip_prefix("system:serviceaccount:")
                .unwrap_or_default()
                .splitn(2, ':');
            match (parts.next(), parts.next()) {
                (Some(namespace), Some(account)) if !namespace.is_empty() => {
                    Ok((namespace.to_string(), account.to_string()))
                }
                _ => Err((
                    StatusCode::FORBIDDEN,
                    format!("{username} is not a ServiceAccount"),
                )),
            }
        }
    };
    remember(&state.tokens, key, verdict.clone(), TOKEN_CACHE_TTL);
    verdict.map_err(|(status, message)| ApiError(status, message))
}

/// Only the table's own ServiceAccount, in the table's namespace, may act for it.
fn authorize(caller: &(String, String), namespace: &str, table: &str) -> Result<(), ApiError> {
    if caller.0 != namespace || caller.1 != service_account_name(table) {
        return Err(error(
            StatusCode::FORBIDDEN,
            format!(
                "ServiceAccount {}/{} may not act for table {namespace}/{table}",
                caller.0, caller.1
            ),
        ));
    }
    Ok(())
}

/// The table must exist and draw on the budget, and the budget must exist.
async fn referenced_table(state: &ApiState, request: &LeaseRequest) -> Result<Reference, ApiError> {
    let key = (
        request.namespace.clone(),
        request.table.clone(),
        request.budget.clone(),
    );
    if let Some(reference) = cached(&state.references, &key, REFERENCE_CACHE_TTL) {
        return Ok(reference);
    }
    let unavailable = |e: kube::Error| error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    let table = Api::<EnrichmentTable>::namespaced(state.ctx.client.clone(), &request.namespace)
        .get_opt(&request.table)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                format!("table {} not found", request.table),
            )
        })?;
    if table.spec.budget_ref.name != request.budget {
        return Err(error(
            StatusCode::FORBIDDEN,
            format!(
                "table {} does not draw on budget {}",
                request.table, request.budget
            ),
        ));
    }
    let budget = Api::<CreditBudget>::namespaced(state.ctx.client.clone(), &request.namespace)
        .get_opt(&request.budget)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                format!("CreditBudget {} not found", request.budget),
            )
        })?;
    let reference = Reference {
        table,
        workspace: budget.spec.workspace,
    };
    remember(
        &state.references,
        key,
        reference.clone(),
        REFERENCE_CACHE_TTL,
    );
    Ok(reference)
}

/// The holder's share of its workspace's rate, decided after its request
/// was applied (absent when the holder does not submit rows).
fn rate_share(
    state: &ApiState,
    reference: &Reference,
    request: &LeaseRequest,
) -> Option<crate::ledger::RateShare> {
    let report = request.rate.as_ref();
    if report.is_none() && !request.release {
        return None;
    }
    let cap = Rate::from(&reference.table.spec.clay.rate_limit);
    let limit = reference
        .workspace
        .as_ref()
        .map_or(cap, |w| Rate::from(&w.rate_limit));
    let quiet = crate::ledger::RateReport::default();
    let ask = Ask {
        workspace: workspace_key(
            &request.namespace,
            reference.workspace.as_ref().map(|w| w.name.as_str()),
            &request.table,
        ),
        limit,
        cap,
        namespace: &request.namespace,
        table: &request.table,
        holder: &request.holder,
        report: report.unwrap_or(&quiet),
        release: request.release,
    };
    let share = state
        .ctx
        .rates
        .lock()
        .unwrap()
        .share(ask, std::time::Instant::now());
    tracing::debug!(table = %request.table, holder = %request.holder,
        wanted = report.map(|r| r.wanted), held = report.map(|r| r.held),
        granted = share.as_ref().map(|s| s.rows_per_second), "rate share");
    share
}

async fn lease(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = caller(&state, &headers).await?;
    let request: LeaseRequest = serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("invalid lease request: {e}"),
        )
    })?;
    validate(&request).map_err(|message| error(StatusCode::BAD_REQUEST, message))?;
    authorize(&caller, &request.namespace, &request.table)?;
    let reference = referenced_table(&state, &request).await?;
    let table = &reference.table;
    let implausible = request.implausible_costs;
    let rate = rate_share(&state, &reference, &request);
    let traffic = (
        request.namespace.clone(),
        request.table.clone(),
        request.rate.as_ref().map_or(0, |r| r.submitted),
        request.successes,
        request.result_latency.clone(),
    );
    let contacts: Vec<_> = request
        .contacts()
        .into_iter()
        .filter_map(|(peer, contact)| Some((peer, contact?.clone())))
        .collect();
    let holder = request.holder.clone();
    let answer = state.ctx.ledger.lease(request).await;
    let (namespace, table_name, sent, results, latency) = traffic;
    let now = jiff::Timestamp::now();
    let news = {
        let mut volumes = state.ctx.volumes.lock().unwrap();
        // What a holder saw of Clay, the store and Kafka counts whatever the
        // budget answered (it is the latest, so a repeat changes nothing);
        // traffic only once its request is applied.
        let mut news = false;
        for (peer, contact) in contacts {
            news |= volumes.record_contact((&namespace, &table_name), peer, &holder, contact, now);
        }
        if answer.is_ok() {
            let was_active = volumes.active(&namespace, &table_name, now);
            volumes.record(&namespace, &table_name, sent, results, &latency, now);
            news |= !was_active && volumes.active(&namespace, &table_name, now);
        }
        news
    };
    if news {
        // Counters, advice and the Reachable conditions follow what the
        // processes report: the table is looked at now, not at its next resync.
        let _ = state
            .ctx
            .tables_to_look_at
            .unbounded_send(ObjectRef::new(&table_name).within(&namespace));
    }
    if answer.is_ok() && implausible > 0 {
        state.ctx.metrics.implausible_costs.inc_by(implausible);
        state
            .ctx
            .event(
                table,
                EventType::Warning,
                "ImplausibleCost",
                "Account",
                format!(
                    "{implausible} Clay callbacks reported a cost that is negative, not a number or far above spec.clay.creditsPerRow; they were charged at creditsPerRow"
                ),
            )
            .await;
    }
    Ok(match answer {
        Ok(answer) => Json(LeaseAnswer { rate, ..answer }).into_response(),
        Err(failure) => {
            let status = match &failure {
                LedgerError::Denied(_) => StatusCode::PAYMENT_REQUIRED,
                LedgerError::BudgetNotFound(_) => StatusCode::NOT_FOUND,
                LedgerError::Book(_) => StatusCode::CONFLICT,
                LedgerError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            error(status, failure.to_string()).into_response()
        }
    })
}
