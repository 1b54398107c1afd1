//! Inbound webhook sources and the HTTP API column callback.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::{Sim, SourceConfig, clay_error, enrich};
use crate::clay::webhook::AUTH_HEADER;

pub(crate) async fn submit(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    sim.stat(|s| s.requests += 1);
    let Some(source) = sim.sources.lock().unwrap().get(&id).cloned() else {
        return clay_error(StatusCode::NOT_FOUND, "webhook source not found");
    };
    if let Some(token) = &source.token {
        let given = headers
            .get(AUTH_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !bool::from(given.ct_eq(token.as_bytes())) {
            sim.stat(|s| s.rejected_unauthorized += 1);
            return clay_error(StatusCode::UNAUTHORIZED, "invalid webhook auth token");
        }
    }
    if body.len() > sim.args.body_limit {
        return clay_error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    }
    let rows = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(row)) => vec![Value::Object(row)],
        Ok(Value::Array(rows))
            if !rows.is_empty()
                && rows.len() <= sim.args.max_batch
                && rows.iter().all(Value::is_object) =>
        {
            rows
        }
        Ok(Value::Array(_)) => {
            return clay_error(
                StatusCode::BAD_REQUEST,
                &format!("an array must hold 1 to {} objects", sim.args.max_batch),
            );
        }
        _ => {
            return clay_error(
                StatusCode::BAD_REQUEST,
                "body must be a JSON object or an array of objects",
            );
        }
    };
    if let Err(wait) = sim.take_tokens(rows.len()) {
        sim.stat(|s| s.rejected_rate_limited += 1);
        return super::rate_limited(wait);
    }
    let (inject_error, inject_stall) = {
        let mut rng = sim.request_rng();
        (
            rng.random_bool(sim.args.error_rate),
            rng.random_bool(sim.args.stall_rate),
        )
    };
    if inject_stall {
        sim.stat(|s| s.injected_stalls += 1);
        tokio::time::sleep(Duration::from_millis(sim.args.stall_ms)).await;
        return clay_error(StatusCode::GATEWAY_TIMEOUT, "upstream timed out");
    }
    if inject_error {
        sim.stat(|s| s.injected_errors += 1);
        return clay_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily unavailable");
    }
    if sim.quota_spent() {
        sim.stat(|s| s.rejected_quota += 1);
        return clay_error(
            StatusCode::PAYMENT_REQUIRED,
            "workspace credit quota exhausted",
        );
    }
    for row in rows {
        let accepted = {
            let mut stats = sim.stats.lock().unwrap();
            stats.rows_received += 1;
            let count = stats.source_submissions.entry(id.clone()).or_insert(0);
            *count += 1;
            // Past the lifetime cap Clay silently stops accepting rows.
            let accepted = *count <= sim.args.source_cap;
            if accepted {
                stats.rows_accepted += 1;
            } else {
                stats.rows_dropped_over_cap += 1;
            }
            accepted
        };
        if accepted {
            tokio::spawn(enrich_and_call_back(sim.clone(), source.clone(), row));
        }
    }
    (StatusCode::OK, axum::Json(json!({ "status": "ok" }))).into_response()
}

/// Enriches one row after its latency and sends the HTTP API column callback.
async fn enrich_and_call_back(sim: Arc<Sim>, source: SourceConfig, row: Value) {
    let outcome = enrich(&sim.plan, &row, sim.next_attempt(&row));
    tokio::time::sleep(outcome.latency).await;
    let mut result = row.as_object().cloned().unwrap_or_default();
    let (credits, actions) = if sim.charge(outcome.data_credits, outcome.actions) {
        result.extend(outcome.found.clone());
        (outcome.data_credits, outcome.actions)
    } else {
        result.insert(
            "kiln_enrichment_error".into(),
            json!("workspace credit quota exhausted"),
        );
        (0.0, 0)
    };
    result.insert("kiln_credits".into(), json!(credits));
    result.insert("kiln_actions".into(), json!(actions));
    sim.stat(|s| s.rows_enriched += 1);

    let Some(url) = source.callback_url.clone() else {
        return;
    };
    if outcome.drop_callback {
        sim.stat(|s| s.callbacks_dropped += 1);
        return;
    }
    let body = Value::Object(result);
    let copies = if outcome.duplicate_callback { 2 } else { 1 };
    for copy in 0..copies {
        if deliver(&sim, &url, &source, &body).await {
            sim.stat(|s| {
                s.callbacks_sent += 1;
                if copy > 0 {
                    s.callbacks_duplicated += 1;
                }
            });
        } else {
            sim.stat(|s| s.callbacks_failed += 1);
        }
    }
}

/// Posts a callback, retrying 5xx and connection failures a few times.
async fn deliver(sim: &Sim, url: &str, source: &SourceConfig, body: &Value) -> bool {
    for attempt in 1..=sim.args.callback_attempts.max(1) {
        let mut request = sim.http.post(url).json(body);
        for (name, value) in &source.callback_headers {
            request = request.header(name, value);
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => return true,
            Ok(response) if response.status().is_client_error() => return false,
            _ => tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await,
        }
    }
    false
}
