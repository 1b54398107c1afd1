//! `POST /v1/clay/callback`: Clay's HTTP API column returns a row's result;
//! its pending row is claimed once, settled and delivered.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::settlements::Delivered;
use super::{CALLBACK_TOKEN_HEADER, Receiver, reply};
use crate::dataplane::TableRuntime;
use crate::dataplane::attempt::now_ms;
use crate::dataplane::rows::{Callback, OwedSettlement};

/// A Clay callback body: the result object and the row id it echoes
/// (non-empty), or why it is refused.
pub fn callback_of_body(body: &[u8]) -> Result<(String, Value), &'static str> {
    let result = match serde_json::from_slice::<Value>(body) {
        Ok(value @ Value::Object(_)) => value,
        _ => return Err("body must be a JSON object"),
    };
    match result.get("kiln_row_id").and_then(Value::as_str) {
        Some(row_id) if !row_id.is_empty() => Ok((row_id.to_string(), result)),
        _ => Err("kiln_row_id is missing: the HTTP API column must echo it"),
    }
}

pub(super) async fn callback(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let given = headers
        .get(CALLBACK_TOKEN_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let runtime = receiver.runtime();
    let expected = runtime.callback_token.expose().as_bytes();
    if expected.is_empty() || !bool::from(given.ct_eq(expected)) {
        receiver.count("callback", "unauthorized");
        return reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": format!("missing or wrong {CALLBACK_TOKEN_HEADER} header")}),
        );
    }
    let (row_id, result) = match callback_of_body(&body) {
        Ok(callback) => callback,
        Err(problem) => {
            receiver.count("callback", "invalid");
            return reply(StatusCode::BAD_REQUEST, json!({"error": problem}));
        }
    };
    use tracing::Instrument as _;
    let span = tracing::info_span!("row", row = %row_id, table = %runtime.name);
    complete_row(&receiver, &runtime, &row_id, &result)
        .instrument(span)
        .await
}

/// A callback's row: claimed once, settled, delivered (or a duplicate).
async fn complete_row(
    receiver: &Receiver,
    runtime: &TableRuntime,
    row_id: &str,
    result: &Value,
) -> Response {
    let reported = result
        .pointer(&runtime.table.spec.clay.cost_pointer)
        .and_then(Value::as_f64);
    let claimed = receiver
        .rows
        .claim_callback(
            runtime,
            &Callback {
                row_id,
                result,
                reported,
            },
        )
        .await;
    let pending = match claimed {
        Ok(Some(pending)) => pending,
        Ok(None) => {
            // Already delivered (Clay called twice) or no longer pending: acknowledge so Clay stops.
            receiver.count("callback", "duplicate");
            return reply(StatusCode::OK, json!({"status": "duplicate"}));
        }
        Err(error) => {
            receiver.count("callback", "unavailable");
            tracing::warn!(error = %format!("{error:#}"), "claiming a callback failed");
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "the row store is unavailable; retry"}),
            );
        }
    };
    let took = (pending.attempted_at_ms > 0).then(|| {
        Duration::from_millis(now_ms().saturating_sub(pending.attempted_at_ms).max(0) as u64)
    });
    receiver.settle_later(Delivered {
        owed: OwedSettlement {
            row_id: row_id.to_string(),
            reported,
            pending,
        },
        took,
    });
    receiver.count("callback", "delivered");
    crate::metrics::dataplane().rows("enriched", "ok", 1);
    reply(StatusCode::OK, json!({"status": "delivered"}))
}
