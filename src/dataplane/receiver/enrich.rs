//! Tier Direct's endpoints: `POST /v1/enrich` answers with the enriched
//! record, `GET /v1/rows/{id}` with a row's result once it has one.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::{Intake, Receiver, authorize, not_served, reply};
use crate::dataplane::direct::{Answer, MAX_ROWS_PER_REQUEST, requested_wait};

use super::ingest::parse_rows;

#[derive(serde::Deserialize)]
pub(super) struct EnrichQuery {
    /// How long to wait for the result (Go duration), else spec.source.http.syncTimeout.
    timeout: Option<String>,
}

fn outcome_label(answer: &Answer) -> &'static str {
    match answer {
        Answer::Enriched {
            deduplicated: true, ..
        } => "deduplicated",
        Answer::Enriched { .. } => "enriched",
        Answer::DeadLettered { .. } => "deadLettered",
        Answer::Refused { .. } => "refused",
        Answer::Pending { .. } => "pending",
        Answer::Invalid { .. } => "invalid",
    }
}

fn answer_response(answer: &Answer) -> Response {
    let mut response = reply(answer.status(), answer.body());
    if let Some(seconds) = answer.retry_after() {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, seconds.into());
    }
    response
}

/// `POST /v1/enrich` (tier Direct): the enriched record in the response.
pub(super) async fn enrich(
    State(receiver): State<Arc<Receiver>>,
    Query(query): Query<EnrichQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let runtime = match authorize(&receiver, &headers, "enrich") {
        Ok(runtime) => runtime,
        Err(response) => return *response,
    };
    let Intake::Direct(direct) = &receiver.intake else {
        let use_instead = "POST /v1/enrich is served by tier Direct tables; this table queues rows: POST /v1/rows";
        return not_served(&receiver, "enrich", use_instead);
    };
    let default_wait = runtime
        .table
        .spec
        .source
        .http
        .as_ref()
        .map_or(Duration::from_secs(30), |h| h.sync_timeout.into());
    let wait = match requested_wait(query.timeout.as_deref(), default_wait) {
        Ok(wait) => wait,
        Err(message) => {
            receiver.count("enrich", "invalid");
            return reply(StatusCode::BAD_REQUEST, json!({"error": message}));
        }
    };
    let (rows, batch) = match parse_rows(&receiver, &body, "enrich", MAX_ROWS_PER_REQUEST) {
        Ok(parsed) => parsed,
        Err(response) => return *response,
    };
    let answers =
        futures::future::join_all(rows.into_iter().map(|row| direct.enrich(row, wait))).await;
    for answer in &answers {
        let outcome = outcome_label(answer);
        receiver.count("enrich", outcome);
        if outcome != "invalid" {
            crate::metrics::dataplane().rows("received", "ok", 1);
        }
        if outcome == "deduplicated" {
            crate::metrics::dataplane().rows("deduplicated", "ok", 1);
        }
    }
    if !batch {
        return answer_response(&answers[0]);
    }
    let results: Vec<Value> = answers
        .iter()
        .map(|a| {
            let mut body = a.body();
            body["status"] = a.status().as_u16().into();
            body
        })
        .collect();
    reply(StatusCode::OK, json!({ "results": results }))
}

/// `GET /v1/rows/{id}` (tier Direct): a row's result once it has one.
pub(super) async fn row_status(
    State(receiver): State<Arc<Receiver>>,
    Path(row_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = authorize(&receiver, &headers, "row") {
        return *response;
    }
    let Intake::Direct(direct) = &receiver.intake else {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": "row lookups are served by tier Direct tables"}),
        );
    };
    match direct.lookup(&row_id).await {
        Ok(Some(answer)) => answer_response(&answer),
        Ok(None) => reply(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no row {row_id:?}")}),
        ),
        Err(error) => {
            tracing::warn!(error = %format!("{error:#}"), "reading a row failed");
            reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "the row store is unavailable; retry"}),
            )
        }
    }
}
