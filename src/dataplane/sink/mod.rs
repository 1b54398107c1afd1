//! Where enriched rows go. A Redis Stream sink is written by the same script
//! that claims a row. An HTTP sink (the CRM update) is fed through a durable
//! outbox stream that receivers drain with a consumer group: a receiver that
//! dies between claiming a row and calling the CRM leaves the entry for
//! another to finish, so no result is lost. Calls carry the row id as
//! `Idempotency-Key`, because a crash after the CRM answered but before the
//! entry was completed repeats the call.

use std::time::Duration;

use serde_json::Value;

mod outbox;

pub use self::outbox::OutboxDelivery;
use super::TableRuntime;
use super::store::SinkRoute;
use crate::api::table::{HttpMethod, HttpSink};
use crate::contract::Keys;
use crate::retry::{Failure, RetryPolicy, retry_after};

/// The route for a table's sink.
pub fn route(runtime: &TableRuntime, keys: &Keys) -> SinkRoute {
    let sink = runtime.table.spec.sink.as_ref();
    if sink.is_some_and(|s| s.http.is_some()) {
        return SinkRoute {
            stream: keys.outbox(),
            max_len: 0,
            through_outbox: true,
        };
    }
    if sink.is_some_and(|s| s.kafka.is_some()) {
        return SinkRoute {
            stream: keys.outbox(),
            max_len: 0,
            through_outbox: true,
        };
    }
    let target = sink.and_then(|s| s.redis_stream.as_ref());
    SinkRoute {
        stream: target
            .map(|s| s.stream.clone())
            .unwrap_or_else(|| format!("kiln:{}/{}:results", runtime.namespace, runtime.name)),
        max_len: target.and_then(|s| s.max_len).unwrap_or(0),
        through_outbox: false,
    }
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything but RFC 3986's unreserved characters is encoded.
const URL_COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Fills `{field}` placeholders of an HTTP sink's URL template with the
/// URL-encoded value of that field in the original row (which identifies
/// the CRM record; enrichment may overwrite a column like `email`), else in
/// the result.
pub fn render_url(template: &str, result: &Value, row: &Value) -> Result<String, String> {
    let mut url = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        url.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            return Err(format!(
                "urlTemplate has an unclosed '{{' at {:?}",
                &rest[open..]
            ));
        };
        let field = &rest[open + 1..open + close];
        let value = [row, result]
            .into_iter()
            .find_map(|source| match source.get(field) {
                Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                Some(Value::Bool(b)) => Some(b.to_string()),
                _ => None,
            })
            .ok_or_else(|| format!("urlTemplate field {field:?} is missing from the row"))?;
        url.extend(percent_encoding::utf8_percent_encode(&value, URL_COMPONENT));
        rest = &rest[open + close + 1..];
    }
    url.push_str(rest);
    Ok(url)
}

/// How one delivery attempt ended: accepted, or why not.
type Attempt = Result<(), Failure<String>>;

/// The longest a sink's Retry-After holds a delivery: the outbox behind it waits too.
const MAX_SINK_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Worth retrying: 408, 429, 5xx (after the sink's Retry-After, when it
/// gives one); any other 4xx cannot succeed later.
fn classify(status: reqwest::StatusCode, retry_after: Option<Duration>) -> Attempt {
    let detail = format!("the sink answered HTTP {}", status.as_u16());
    if status.is_success() {
        Ok(())
    } else if matches!(status.as_u16(), 408 | 429) || status.is_server_error() {
        Err(Failure::Transient {
            error: detail,
            retry_after: retry_after.map(|wait| wait.min(MAX_SINK_RETRY_AFTER)),
        })
    } else {
        Err(Failure::Permanent(detail))
    }
}

/// How handing one row to the HTTP sink ended.
#[derive(Debug, PartialEq)]
pub enum Delivery {
    Delivered,
    /// The table moved off the HTTP sink; the row stays owed.
    NoHttpSink,
    /// The sink refused it, or kept failing for `maxAttempts`: dead-letter it.
    Failed {
        detail: String,
        attempts: u32,
    },
}

/// Calls the table's HTTP sink for one row, retrying transient failures
/// with backoff. `before_attempt` runs before each call (to keep a claim
/// alive); its error counts as a transient failure.
pub async fn deliver_http<F, Fut>(
    http: &reqwest::Client,
    runtime: &TableRuntime,
    row_id: &str,
    result: &Value,
    row: &Value,
    before_attempt: F,
) -> Delivery
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let Some(sink) = runtime
        .table
        .spec
        .sink
        .as_ref()
        .and_then(|s| s.http.clone())
    else {
        tracing::warn!(row = %row_id, "the table no longer has an HTTP sink; leaving the row in the outbox");
        return Delivery::NoHttpSink;
    };
    let policy = RetryPolicy {
        max_attempts: sink.max_attempts,
        ..RetryPolicy::default()
    };
    let (before_attempt, sink) = (&before_attempt, &sink);
    let (outcome, attempts) = policy
        .run(|attempt| async move {
            before_attempt().await.map_err(Failure::transient)?;
            let outcome = call(http, runtime, sink, row_id, result, row).await;
            if let Err(Failure::Transient { error, .. }) = &outcome {
                tracing::debug!(row = %row_id, attempt, %error, "sink delivery failed");
            }
            outcome
        })
        .await;
    let detail = match outcome {
        Ok(()) => return Delivery::Delivered,
        Err(Failure::Permanent(detail)) => detail,
        Err(Failure::Transient { error, .. }) => format!("{error} after {attempts} attempts"),
    };
    tracing::warn!(row = %row_id, attempts, %detail, "dead-lettering a row the sink would not take");
    Delivery::Failed { detail, attempts }
}

async fn call(
    http: &reqwest::Client,
    runtime: &TableRuntime,
    sink: &HttpSink,
    row_id: &str,
    result: &Value,
    row: &Value,
) -> Attempt {
    let url = match render_url(&sink.url_template, result, row) {
        Ok(url) => url,
        Err(detail) => return Err(Failure::Permanent(detail)),
    };
    let method = match sink.method {
        HttpMethod::Post => reqwest::Method::POST,
        HttpMethod::Put => reqwest::Method::PUT,
        HttpMethod::Patch => reqwest::Method::PATCH,
    };
    let mut request = http
        .request(method, &url)
        .timeout(REQUEST_TIMEOUT)
        .header("Idempotency-Key", row_id)
        .header(
            "x-kiln-table",
            format!("{}/{}", runtime.namespace, runtime.name),
        )
        .json(result);
    for (name, value) in &runtime.sink_headers {
        request = request.header(name.as_str(), value.expose());
    }
    match request.send().await {
        Ok(response) => classify(response.status(), retry_after(response.headers())),
        // Without the URL: it may carry row data or credentials.
        Err(error) => Err(Failure::transient(crate::clay::error::describe_transport(
            error,
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn url_fields_come_from_the_row_then_the_result_and_are_encoded() {
        let result = json!({"email": "found@example.com", "crm_id": 42});
        let row = json!({"email": "ann+1@example.com"});
        assert_eq!(
            render_url(
                "https://crm.example.com/leads/{crm_id}?email={email}",
                &result,
                &row
            )
            .unwrap(),
            "https://crm.example.com/leads/42?email=ann%2B1%40example.com"
        );
    }

    #[test]
    fn a_missing_field_or_broken_template_is_a_clear_error() {
        let row = json!({"email": "a@b.c"});
        assert_eq!(
            render_url("https://crm/{id}", &json!({}), &row).unwrap_err(),
            "urlTemplate field \"id\" is missing from the row"
        );
        assert!(
            render_url("https://crm/{id", &json!({}), &row)
                .unwrap_err()
                .contains("unclosed")
        );
    }

    #[test]
    fn only_timeouts_throttling_and_server_errors_are_retried() {
        use reqwest::StatusCode;
        assert!(classify(StatusCode::NO_CONTENT, None).is_ok());
        for transient in [408, 429, 500, 503] {
            assert!(matches!(
                classify(StatusCode::from_u16(transient).unwrap(), None),
                Err(Failure::Transient { .. })
            ));
        }
        for permanent in [400, 401, 404, 422] {
            assert!(matches!(
                classify(StatusCode::from_u16(permanent).unwrap(), None),
                Err(Failure::Permanent(_))
            ));
        }
        // A sink's Retry-After is honoured, up to a minute.
        let throttled = classify(
            StatusCode::TOO_MANY_REQUESTS,
            Some(Duration::from_secs(3_600)),
        );
        assert!(matches!(
            throttled,
            Err(Failure::Transient { retry_after: Some(wait), .. }) if wait == MAX_SINK_RETRY_AFTER
        ));
    }

    #[test]
    fn http_sinks_route_through_the_outbox_and_stream_sinks_do_not() {
        let keys = Keys::new("sales", "leads");
        let mut table = crate::operator::table::build::tests::queue_table();
        let runtime =
            |table: &crate::api::EnrichmentTable| crate::dataplane::testing::runtime(table, vec![]);
        assert_eq!(
            route(&runtime(&table), &keys),
            SinkRoute {
                stream: "kiln:sales/leads:outbox".into(),
                max_len: 0,
                through_outbox: true
            }
        );
        table.spec.sink =
            serde_json::from_value(json!({"redisStream": {"stream": "out", "maxLen": 1000}}))
                .unwrap();
        let stream_runtime = runtime(&table);
        assert_eq!(
            route(&stream_runtime, &keys),
            SinkRoute {
                stream: "out".into(),
                max_len: 1000,
                through_outbox: false
            }
        );
        // Changing the sink is applied live; changing the source needs a new process.
        let http_runtime = runtime(&crate::operator::table::build::tests::queue_table());
        assert!(!http_runtime.needs_restart_for(&stream_runtime));
        table.spec.source =
            serde_json::from_value(json!({"redisStream": {"stream": "other"}})).unwrap();
        assert!(stream_runtime.needs_restart_for(&runtime(&table)));
    }
}
