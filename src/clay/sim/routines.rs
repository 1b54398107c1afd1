//! The public routines API: run, poll results with cursor paging, and the
//! signed run-finished webhook.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::{Sim, clay_error, enrich};
use crate::clay::routines::{
    API_KEY_HEADER, ItemResult, MAX_ITEMS, RoutineItem, SIGNATURE_HEADER, sign,
};

pub(crate) struct Run {
    total: usize,
    results: Vec<ItemResult>,
}

#[derive(Deserialize)]
pub(crate) struct RunRequest {
    items: Vec<RoutineItem>,
    #[serde(default)]
    webhook_id: Option<String>,
}

/// The 401 to answer with, or None when the API key is right.
fn refusal(sim: &Sim, headers: &HeaderMap) -> Option<Response> {
    let Some(expected) = &sim.args.api_key else {
        return Some(clay_error(
            StatusCode::UNAUTHORIZED,
            "the routines API is not enabled (no --api-key)",
        ));
    };
    if headers.get(header::AUTHORIZATION).is_some() && headers.get(API_KEY_HEADER).is_none() {
        return Some(clay_error(
            StatusCode::UNAUTHORIZED,
            "use the clay-api-key header, not a Bearer token",
        ));
    }
    let given = headers
        .get(API_KEY_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    (!bool::from(given.ct_eq(expected.as_bytes())))
        .then(|| clay_error(StatusCode::UNAUTHORIZED, "invalid API key"))
}

pub(crate) async fn run(
    State(sim): State<Arc<Sim>>,
    Path(_routine): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(response) = refusal(&sim, &headers) {
        return response;
    }
    let Ok(request) = serde_json::from_slice::<RunRequest>(&body) else {
        return clay_error(
            StatusCode::BAD_REQUEST,
            "body must be {\"items\":[{\"id\",\"inputs\"}]}",
        );
    };
    if request.items.is_empty() || request.items.len() > MAX_ITEMS {
        return clay_error(
            StatusCode::BAD_REQUEST,
            &format!("items must hold 1 to {MAX_ITEMS} entries"),
        );
    }
    if let Err(wait) = sim.take_tokens(1) {
        return super::rate_limited(wait);
    }
    if sim.quota_spent() {
        sim.stat(|s| s.rejected_quota += 1);
        return clay_error(
            StatusCode::PAYMENT_REQUIRED,
            "workspace credit quota exhausted",
        );
    }
    let run_id = format!(
        "run_{:016x}",
        enrich::stable_hash(format!("{}-{}", sim.args.seed, uuid::Uuid::new_v4()).as_bytes())
    );
    sim.runs.lock().unwrap().insert(
        run_id.clone(),
        Run {
            total: request.items.len(),
            results: Vec::new(),
        },
    );
    sim.stat(|s| s.routine_runs += 1);
    for item in request.items {
        tokio::spawn(run_item(
            sim.clone(),
            run_id.clone(),
            item,
            request.webhook_id.clone(),
        ));
    }
    (
        StatusCode::ACCEPTED,
        Json(json!({"routine_run_id": run_id, "status": "in_progress"})),
    )
        .into_response()
}

async fn run_item(sim: Arc<Sim>, run_id: String, item: RoutineItem, webhook_id: Option<String>) {
    let row = json!({"kiln_row_id": item.id, "inputs": item.inputs});
    let outcome = enrich(&sim.plan, &row, sim.next_attempt(&row));
    tokio::time::sleep(outcome.latency).await;
    let result = if sim.charge(outcome.data_credits, outcome.actions) {
        let mut found = outcome.found.clone();
        found.insert("kiln_credits".into(), json!(outcome.data_credits));
        ItemResult {
            id: item.id,
            status: "complete".into(),
            result: Some(Value::Object(found)),
            error: None,
        }
    } else {
        ItemResult {
            id: item.id,
            status: "failed".into(),
            result: None,
            error: Some(json!({"message": "workspace credit quota exhausted"})),
        }
    };
    sim.stat(|s| s.rows_enriched += 1);
    let finished = {
        let mut runs = sim.runs.lock().unwrap();
        let run = runs.get_mut(&run_id).expect("runs are never removed");
        run.results.push(result);
        run.results.len() == run.total
    };
    if finished && let Some(webhook_id) = webhook_id {
        send_run_webhook(&sim, &webhook_id, &run_id).await;
    }
}

async fn send_run_webhook(sim: &Sim, webhook_id: &str, run_id: &str) {
    let Some(webhook) = sim.webhooks.lock().unwrap().get(webhook_id).cloned() else {
        return;
    };
    let body = json!({
        "webhookId": webhook_id,
        "createdAt": jiff::Timestamp::now().to_string(),
        "data": {"routine_run_id": run_id}
    })
    .to_string();
    let signature = sign(webhook.secret.as_bytes(), body.as_bytes());
    let sent = sim
        .http
        .post(&webhook.url)
        .header(header::CONTENT_TYPE, "application/json")
        .header(SIGNATURE_HEADER, signature)
        .body(body)
        .send()
        .await;
    if sent.is_ok() {
        sim.stat(|s| s.run_webhooks_sent += 1);
    }
}

#[derive(Deserialize)]
pub(crate) struct Page {
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

pub(crate) async fn results(
    State(sim): State<Arc<Sim>>,
    Path(run_id): Path<String>,
    headers: HeaderMap,
    Query(page): Query<Page>,
) -> Response {
    if let Some(response) = refusal(&sim, &headers) {
        return response;
    }
    let runs = sim.runs.lock().unwrap();
    let Some(run) = runs.get(&run_id) else {
        return clay_error(StatusCode::NOT_FOUND, "routine run not found");
    };
    if run.results.len() < run.total {
        return (
            StatusCode::ACCEPTED,
            Json(
                json!({"status": "in_progress", "total": run.total, "finished": run.results.len()}),
            ),
        )
            .into_response();
    }
    let mut sorted = run.results.clone();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let start: usize = page
        .cursor
        .as_deref()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let limit = page.limit.unwrap_or(100).clamp(1, 100);
    let end = (start + limit).min(sorted.len());
    let next_cursor = (end < sorted.len()).then(|| end.to_string());
    (
        StatusCode::OK,
        Json(json!({"status": "complete", "data": &sorted[start.min(end)..end], "next_cursor": next_cursor})),
    )
        .into_response()
}
