//! The reservation API the leader serves to the data plane. Callers present
//! their ServiceAccount token; a TokenReview authenticates it, and a table's
//! ServiceAccount (`kiln-<table>` in the table's namespace) may only draw on
//! the budget its table references.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::ledger::{Ledger, LedgerError};
use crate::api::EnrichmentTable;
use crate::ledger::{DenialReason, RenewRequest, ReserveRequest, SettleRequest};
use crate::operator::table::build::service_account_name;

/// How long a successful TokenReview is trusted.
const TOKEN_CACHE_TTL: Duration = Duration::from_secs(60);

/// Authenticated users by token hash, with when they were reviewed.
type TokenCache = Arc<Mutex<HashMap<[u8; 32], (String, Instant)>>>;

#[derive(Clone)]
struct ApiState {
    client: kube::Client,
    ledger: Ledger,
    tokens: TokenCache,
}

/// A refusal with a JSON `{"message"}` body.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "message": self.1 }))).into_response()
    }
}

/// Serves the reservation API until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    client: kube::Client,
    ledger: Ledger,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = ApiState {
        client,
        ledger,
        tokens: Arc::default(),
    };
    let app = Router::new()
        .route("/v1/reserve", post(reserve))
        .route("/v1/settle", post(settle))
        .route("/v1/renew", post(renew))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving the reservation API");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

fn error(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError(status, message.into())
}

fn ledger_error(failure: LedgerError) -> Response {
    let status = match &failure {
        LedgerError::Denied(denial) => {
            let status = match denial.reason {
                DenialReason::BreakerOpen => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::PAYMENT_REQUIRED,
            };
            return (status, Json(denial)).into_response();
        }
        LedgerError::BudgetNotFound(_) => StatusCode::NOT_FOUND,
        LedgerError::Book(_) => StatusCode::CONFLICT,
        LedgerError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, failure.to_string()).into_response()
}

/// 204 for a done settlement or renewal, else the ledger's refusal.
fn no_content(result: Result<(), LedgerError>) -> Response {
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => ledger_error(e),
    }
}

/// Authenticates the bearer token; returns (namespace, service account).
async fn caller(state: &ApiState, headers: &HeaderMap) -> Result<(String, String), ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            error(
                StatusCode::UNAUTHORIZED,
                "a ServiceAccount bearer token is required",
            )
        })?;
    let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let cached = state
        .tokens
        .lock()
        .unwrap()
        .get(&key)
        .filter(|(_, at)| at.elapsed() < TOKEN_CACHE_TTL)
        .map(|(user, _)| user.clone());
    let username = match cached {
        Some(user) => user,
        None => {
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_string()),
                    ..Default::default()
                },
                ..Default::default()
            };
            let reviewed = Api::<TokenReview>::all(state.client.clone())
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
            let user = status
                .user
                .and_then(|u| u.username)
                .filter(|_| status.authenticated == Some(true))
                .ok_or_else(|| error(StatusCode::UNAUTHORIZED, "the token is not valid"))?;
            state
                .tokens
                .lock()
                .unwrap()
                .insert(key, (user.clone(), Instant::now()));
            user
        }
    };
    let mut parts = username
        .strip_prefix("system:serviceaccount:")
        .unwrap_or_default()
        .splitn(2, ':');
    match (parts.next(), parts.next()) {
        (Some(namespace), Some(account)) if !namespace.is_empty() => {
            Ok((namespace.to_string(), account.to_string()))
        }
        _ => Err(error(
            StatusCode::FORBIDDEN,
            format!("{username} is not a ServiceAccount"),
        )),
    }
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

async fn reserve(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Json(request): Json<ReserveRequest>,
) -> Result<Response, ApiError> {
    authorize(
        &caller(&state, &headers).await?,
        &request.namespace,
        &request.table,
    )?;
    // The table must exist and reference this budget.
    let table = Api::<EnrichmentTable>::namespaced(state.client.clone(), &request.namespace)
        .get_opt(&request.table)
        .await
        .map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
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
    Ok(match state.ledger.reserve(request).await {
        Ok(grant) => Json(grant).into_response(),
        Err(e) => ledger_error(e),
    })
}

async fn settle(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Json(request): Json<SettleRequest>,
) -> Result<Response, ApiError> {
    authorize(
        &caller(&state, &headers).await?,
        &request.namespace,
        &request.table,
    )?;
    Ok(no_content(state.ledger.settle(request).await))
}

async fn renew(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Json(request): Json<RenewRequest>,
) -> Result<Response, ApiError> {
    authorize(
        &caller(&state, &headers).await?,
        &request.namespace,
        &request.table,
    )?;
    Ok(no_content(state.ledger.renew(request).await))
}
