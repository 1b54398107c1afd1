//! Where enriched rows go. A Redis Stream sink is written by the same script
//! that claims a row. An HTTP sink (the CRM update) is fed through a durable
//! outbox stream that receivers drain with a consumer group: a receiver that
//! dies between claiming a row and calling the CRM leaves the entry for
//! another to finish, so no result is lost. Calls carry the row id as
//! `Idempotency-Key`, because a crash after the CRM answered but before the
//! entry was completed repeats the call.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use serde_json::Value;
use tokio::sync::watch;

use super::TableRuntime;
use super::store::{PendingRow, RedisStore, SinkRoute, text_field};
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

/// The consumer group receivers drain the outbox with.
const OUTBOX_GROUP: &str = "kiln-sink";
/// Outbox entries a receiver works on at once.
const OUTBOX_BATCH: usize = 32;
/// A receiver idle on an entry this long is presumed dead and the entry is
/// taken over; live receivers touch entries before every attempt.
const OUTBOX_RECLAIM_IDLE_MS: u64 = 30_000;
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

/// One outbox entry: a completed row waiting for the CRM.
struct OutboxEntry {
    id: String,
    row_id: String,
    result: Value,
    row: Value,
}

fn parse_entry(id: String, fields: HashMap<String, redis::Value>) -> OutboxEntry {
    let field = |name: &str| text_field(&fields, name);
    let json = |name: &str| field(name).and_then(|s| serde_json::from_str::<Value>(&s).ok());
    let row = json("row")
        .or_else(|| {
            field("pending")
                .and_then(|p| serde_json::from_str::<PendingRow>(&p).ok())
                .map(|p| p.row)
        })
        .unwrap_or(Value::Null);
    OutboxEntry {
        row_id: field("row_id").unwrap_or_else(|| id.clone()),
        result: json("result").unwrap_or(Value::Null),
        row,
        id,
    }
}

/// Drains the outbox into the table's HTTP or Kafka sink, and (tier Event)
/// the dead letters into the dead-letter topic, until `shutdown`.
pub struct OutboxDelivery {
    pub store: RedisStore,
    pub runtime: watch::Receiver<Arc<TableRuntime>>,
    pub identity: String,
    pub http: reqwest::Client,
}

/// The two streams a receiver drains.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Drain {
    Results,
    DeadLetters,
}

/// Producers for the table's topics, made once per receiver.
struct Producers {
    sink: Option<super::kafka::KafkaProducer>,
    dead_letter: Option<super::kafka::KafkaProducer>,
}

/// Waits before retrying a record the broker did not take.
const KAFKA_RETRY: Duration = Duration::from_secs(2);

impl OutboxDelivery {
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()> + Clone) {
        let runtime = self.runtime.borrow().clone();
        let producer = |settings: &Option<super::kafka::KafkaSettings>| {
            settings.as_ref().and_then(|s| match s.producer() {
                Ok(producer) => Some(producer),
                Err(error) => {
                    tracing::error!(%error, "creating a Kafka producer failed");
                    None
                }
            })
        };
        let producers = Producers {
            sink: producer(&runtime.kafka_sink),
            dead_letter: producer(&runtime.kafka_dead_letter),
        };
        let results = self.drain(Drain::Results, &producers, shutdown.clone());
        if producers.dead_letter.is_some() {
            // Its own blocking reads, so the two loops never wait on each other.
            let dead_letter_drain = match self.store.with_own_blocking_reads().await {
                Ok(store) => OutboxDelivery {
                    store,
                    runtime: self.runtime.clone(),
                    identity: self.identity.clone(),
                    http: self.http.clone(),
                },
                Err(error) => {
                    tracing::error!(%error, "connecting to Redis for dead letters failed");
                    return results.await;
                }
            };
            let dead_letters = dead_letter_drain.drain(Drain::DeadLetters, &producers, shutdown);
            futures::join!(results, dead_letters);
        } else {
            results.await;
        }
    }

    async fn drain(
        &self,
        drain: Drain,
        producers: &Producers,
        shutdown: impl std::future::Future<Output = ()> + Clone,
    ) {
        let stream = match drain {
            Drain::Results => self.store.keys().outbox(),
            Drain::DeadLetters => super::dead_letter_stream(&self.runtime.borrow()),
        };
        while let Err(error) = self.store.ensure_group(&stream, OUTBOX_GROUP).await {
            tracing::warn!(%error, "creating the outbox consumer group failed; retrying");
            tokio::select! {
                _ = shutdown.clone() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        loop {
            let read = tokio::select! {
                _ = shutdown.clone() => return,
                read = self.store.read(&stream, OUTBOX_GROUP, &self.identity, OUTBOX_BATCH, 1000, OUTBOX_RECLAIM_IDLE_MS) => read,
            };
            let entries = match read {
                Ok(entries) => entries,
                Err(error) => {
                    tracing::warn!(%error, "reading the outbox failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            // Whole batches: an entry is never in flight twice in one receiver.
            let stream = &stream;
            futures::stream::iter(entries)
                .for_each_concurrent(OUTBOX_BATCH, |(id, fields)| async move {
                    match drain {
                        Drain::Results => self.deliver(parse_entry(id, fields), producers).await,
                        Drain::DeadLetters => {
                            self.forward_dead_letter(stream, id, fields, producers)
                                .await
                        }
                    }
                })
                .await;
        }
    }

    async fn deliver(&self, entry: OutboxEntry, producers: &Producers) {
        let started = std::time::Instant::now();
        let metrics = crate::metrics::dataplane();
        let runtime = self.runtime.borrow().clone();
        let outbox = self.store.keys().outbox();
        let kafka_target = runtime
            .table
            .spec
            .sink
            .as_ref()
            .and_then(|s| s.kafka.as_ref());
        let outcome = match (&producers.sink, kafka_target) {
            (Some(producer), Some(target)) => {
                let key_field = target
                    .key_field
                    .as_deref()
                    .unwrap_or(&runtime.table.spec.key);
                let key = super::key_of(&entry.row, key_field)
                    .or_else(|| super::key_of(&entry.result, key_field));
                let table = format!("{}/{}", runtime.namespace, runtime.name);
                let published = super::kafka::publish(
                    producer,
                    &target.topic,
                    key.as_deref(),
                    &entry.result.to_string(),
                    &[("kiln-row-id", &entry.row_id), ("kiln-table", &table)],
                )
                .await;
                match published {
                    Ok(()) => Delivery::Delivered,
                    Err(error) if super::kafka::is_permanent(&error) => Delivery::Failed {
                        detail: format!("the enriched topic refused the record: {error}"),
                        attempts: 1,
                    },
                    Err(error) => {
                        // Kept in the outbox (unacknowledged) and tried again.
                        crate::metrics::DataPlaneMetrics::outcome(
                            &metrics.sink_deliveries,
                            "retried",
                        );
                        tracing::warn!(%error, row = %entry.row_id, "publishing a result failed; will retry");
                        tokio::time::sleep(KAFKA_RETRY).await;
                        return;
                    }
                }
            }
            _ => {
                // Keeps the entry ours while we retry (see OUTBOX_RECLAIM_IDLE_MS).
                let keep = || async {
                    self.store
                        .touch(&outbox, OUTBOX_GROUP, &self.identity, &entry.id)
                        .await
                        .map_err(|error| format!("the row store is unavailable: {error}"))
                };
                deliver_http(
                    &self.http,
                    &runtime,
                    &entry.row_id,
                    &entry.result,
                    &entry.row,
                    keep,
                )
                .await
            }
        };
        if !matches!(outcome, Delivery::NoHttpSink) {
            metrics
                .sink_delivery_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        match outcome {
            Delivery::Delivered => {
                crate::metrics::DataPlaneMetrics::outcome(&metrics.sink_deliveries, "delivered");
                metrics.rows("delivered", "ok", 1);
                if let Err(error) = self.store.outbox_delivered(OUTBOX_GROUP, &entry.id).await {
                    tracing::warn!(%error, row = %entry.row_id, "completing a delivered outbox entry failed; it will be delivered again");
                }
            }
            Delivery::NoHttpSink => {}
            Delivery::Failed { detail, attempts } => {
                crate::metrics::DataPlaneMetrics::outcome(&metrics.sink_deliveries, "failed");
                metrics.rows("dead_lettered", "SinkFailed", 1);
                let dead_letter = super::dead_letter_stream(&runtime);
                if let Err(error) = self
                    .store
                    .outbox_dead_letter(
                        &dead_letter,
                        OUTBOX_GROUP,
                        &entry.id,
                        &entry.row_id,
                        "SinkFailed",
                        &entry.row,
                        attempts,
                        &detail,
                    )
                    .await
                {
                    tracing::warn!(%error, row = %entry.row_id, "dead-lettering an outbox entry failed; it will be retried");
                }
            }
        }
    }

    /// Publishes one dead letter (the original row, with reason and attempts
    /// in headers) to the dead-letter topic, then removes it from Redis.
    async fn forward_dead_letter(
        &self,
        stream: &str,
        id: String,
        fields: HashMap<String, redis::Value>,
        producers: &Producers,
    ) {
        let runtime = self.runtime.borrow().clone();
        let Some(producer) = &producers.dead_letter else {
            return;
        };
        let Some(target) = runtime
            .table
            .spec
            .dead_letter
            .as_ref()
            .and_then(|d| d.kafka.as_ref())
        else {
            return;
        };
        let field = |name: &str| text_field(&fields, name).unwrap_or_default();
        let row = field("row");
        let key = serde_json::from_str::<Value>(&row)
            .ok()
            .and_then(|r| super::key_of(&r, &runtime.table.spec.key));
        let table = format!("{}/{}", runtime.namespace, runtime.name);
        let (row_id, reason, attempts, detail) = (
            field("row_id"),
            field("reason"),
            field("attempts"),
            field("detail"),
        );
        let published = super::kafka::publish(
            producer,
            &target.topic,
            key.as_deref(),
            &row,
            &[
                ("kiln-row-id", &row_id),
                ("kiln-reason", &reason),
                ("kiln-attempts", &attempts),
                ("kiln-detail", &detail),
                ("kiln-table", &table),
            ],
        )
        .await;
        match published {
            Ok(()) => {
                if let Err(error) = self.store.forwarded(stream, OUTBOX_GROUP, &id).await {
                    tracing::warn!(%error, row = %row_id, "completing a forwarded dead letter failed; it may be published again");
                }
            }
            Err(error) => {
                tracing::warn!(%error, row = %row_id, "publishing a dead letter failed; will retry");
                tokio::time::sleep(KAFKA_RETRY).await;
            }
        }
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
