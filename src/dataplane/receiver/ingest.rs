//! `POST /v1/rows` (tiers Queue and Event over HTTP): rows checked and queued.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};

use super::{Intake, Receiver, authorize, not_served, reply};

/// Rows of a request body: a JSON object, or a non-empty array of at most
/// `max` objects (then `true`: the caller sent a batch). None otherwise.
pub fn rows_of_body(body: &[u8], max: usize) -> Option<(Vec<Value>, bool)> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(row)) => Some((vec![Value::Object(row)], false)),
        Ok(Value::Array(rows))
            if !rows.is_empty() && rows.len() <= max && rows.iter().all(Value::is_object) =>
        {
            Some((rows, true))
        }
        _ => None,
    }
}

pub(super) fn parse_rows(
    receiver: &Receiver,
    body: &[u8],
    endpoint: &'static str,
    max: usize,
) -> Result<(Vec<Value>, bool), Box<Response>> {
    rows_of_body(body, max).ok_or_else(|| {
        receiver.count(endpoint, "invalid");
        Box::new(reply(
            StatusCode::BAD_REQUEST,
            json!({"error": format!("body must be a JSON object or an array of 1 to {max} objects")}),
        ))
    })
}

pub(super) async fn ingest(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let runtime = match authorize(&receiver, &headers, "rows") {
        Ok(runtime) => runtime,
        Err(response) => return *response,
    };
    let Intake::Queue(store) = &receiver.intake else {
        let use_instead = "tier Direct enriches in the request: POST /v1/enrich";
        return not_served(&receiver, "rows", use_instead);
    };
    let rows = match parse_rows(&receiver, &body, "rows", receiver.max_rows_per_request) {
        Ok((rows, _)) => rows,
        Err(response) => return *response,
    };
    // Refused here as on every tier, rather than dead-lettered later.
    let key = &runtime.table.spec.key;
    if let Some(index) = rows
        .iter()
        .position(|row| crate::dataplane::key_of(row, key).is_none())
    {
        receiver.count("rows", "invalid");
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"error": format!("row {index} has no {key:?}: the key must be a non-empty string or a number")}),
        );
    }
    let with_ids: Vec<(String, Value)> = rows
        .into_iter()
        .map(|row| (crate::dataplane::new_row_id(&runtime.name), row))
        .collect();
    let inbox = store.keys().inbox();
    match store.enqueue(&inbox, &with_ids).await {
        Ok(_) => {
            receiver.count("rows", "accepted");
            crate::metrics::dataplane().rows("received", "ok", with_ids.len() as u64);
            let ids: Vec<&str> = with_ids.iter().map(|(id, _)| id.as_str()).collect();
            reply(
                StatusCode::ACCEPTED,
                json!({"accepted": ids.len(), "rowIds": ids}),
            )
        }
        Err(error) => {
            receiver.count("rows", "unavailable");
            tracing::warn!(%error, "enqueueing rows failed");
            reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "the row store is unavailable; retry"}),
            )
        }
    }
}
