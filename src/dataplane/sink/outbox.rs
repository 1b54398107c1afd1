//! The durable outbox receivers drain with a consumer group into the
//! table's HTTP or Kafka sink (and, tier Event, the dead letters into the
//! dead-letter topic): an entry a receiver dies on is taken over by
//! another, so no result is lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use serde_json::Value;
use tokio::sync::watch;

use super::{Delivery, deliver_http};
use crate::dataplane::TableRuntime;
use crate::dataplane::store::{PendingRow, RedisStore, text_field};

/// The consumer group receivers drain the outbox with.
const OUTBOX_GROUP: &str = "kiln-sink";
/// Outbox entries a receiver delivers over HTTP at once.
const HTTP_BATCH: usize = 32;
/// Outbox entries a receiver hands its Kafka producer at once: the producer
/// packs them into a few requests, so a large batch costs one stream read
/// and one completion where small ones would cost one per handful.
const KAFKA_BATCH: usize = 512;
/// A receiver idle on an entry this long is presumed dead and the entry is
/// taken over; live receivers touch entries before every attempt.
const OUTBOX_RECLAIM_IDLE_MS: u64 = 30_000;
/// One outbox entry: a completed row waiting for the sink. Its result and
/// row stay text until a delivery needs them as JSON (a Kafka record takes
/// the result as it is).
struct OutboxEntry {
    id: String,
    row_id: String,
    /// The row's key, as the row was claimed with.
    key: Option<String>,
    result: String,
    row: Option<String>,
    pending: Option<String>,
}

impl OutboxEntry {
    fn parse(id: String, fields: HashMap<String, redis::Value>) -> Self {
        let field = |name: &str| text_field(&fields, name);
        Self {
            row_id: field("row_id").unwrap_or_else(|| id.clone()),
            key: field("key").filter(|k| !k.is_empty()),
            result: field("result").unwrap_or_else(|| "null".to_string()),
            row: field("row"),
            pending: field("pending"),
            id,
        }
    }

    fn result(&self) -> Value {
        serde_json::from_str(&self.result).unwrap_or(Value::Null)
    }

    /// The enriched row as it came from the source.
    fn row(&self) -> Value {
        let row = self
            .row
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok());
        row.or_else(|| {
            self.pending
                .as_deref()
                .and_then(|p| serde_json::from_str::<PendingRow>(p).ok())
                .map(|p| p.row)
        })
        .unwrap_or(Value::Null)
    }

    /// The record key: `field` of the row, else of the result. The table's
    /// own key field is the key the row was claimed with, read as is.
    fn record_key(&self, field: &str, table_key: &str) -> Option<String> {
        if field == table_key && self.key.is_some() {
            return self.key.clone();
        }
        crate::dataplane::key_of(&self.row(), field)
            .or_else(|| crate::dataplane::key_of(&self.result(), field))
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
    sink: Option<crate::dataplane::kafka::KafkaProducer>,
    dead_letter: Option<crate::dataplane::kafka::KafkaProducer>,
}

/// Waits before retrying a record the broker did not take.
const KAFKA_RETRY: Duration = Duration::from_secs(2);

impl OutboxDelivery {
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()> + Clone) {
        let runtime = self.runtime.borrow().clone();
        let producer = |settings: &Option<crate::dataplane::kafka::KafkaSettings>| {
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
            Drain::DeadLetters => crate::dataplane::dead_letter_stream(&self.runtime.borrow()),
        };
        while let Err(error) = self.store.ensure_group(&stream, OUTBOX_GROUP).await {
            tracing::warn!(%error, "creating the outbox consumer group failed; retrying");
            tokio::select! {
                _ = shutdown.clone() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        let batch = match (drain, &producers.sink) {
            (Drain::Results, None) => HTTP_BATCH,
            _ => KAFKA_BATCH,
        };
        loop {
            let read = tokio::select! {
                _ = shutdown.clone() => return,
                read = self.store.read(&stream, OUTBOX_GROUP, &self.identity, batch, 1000, OUTBOX_RECLAIM_IDLE_MS) => read,
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
            let delivered: Vec<String> = futures::stream::iter(entries)
                .map(|(id, fields)| async move {
                    match drain {
                        Drain::Results => {
                            self.deliver(OutboxEntry::parse(id, fields), producers)
                                .await
                        }
                        Drain::DeadLetters => {
                            self.forward_dead_letter(stream, id, fields, producers)
                                .await;
                            None
                        }
                    }
                })
                .buffer_unordered(batch)
                .filter_map(futures::future::ready)
                .collect()
                .await;
            // The batch's delivered entries are completed in one step.
            if !delivered.is_empty()
                && let Err(error) = self.store.outbox_delivered(OUTBOX_GROUP, &delivered).await
            {
                tracing::warn!(%error, entries = delivered.len(), "completing delivered outbox entries failed; they will be delivered again");
            }
        }
    }

    /// Delivers one entry; its id when the sink took it (to be completed
    /// with the rest of the batch).
    async fn deliver(&self, entry: OutboxEntry, producers: &Producers) -> Option<String> {
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
                let table_key = &runtime.table.spec.key;
                let key_field = target.key_field.as_deref().unwrap_or(table_key);
                let key = entry.record_key(key_field, table_key);
                let table = format!("{}/{}", runtime.namespace, runtime.name);
                let published = crate::dataplane::kafka::publish(
                    producer,
                    &target.topic,
                    key.as_deref(),
                    &entry.result,
                    &[("kiln-row-id", &entry.row_id), ("kiln-table", &table)],
                )
                .await;
                match published {
                    Ok(()) => Delivery::Delivered,
                    Err(error) if crate::dataplane::kafka::is_permanent(&error) => {
                        Delivery::Failed {
                            detail: format!("the enriched topic refused the record: {error}"),
                            attempts: 1,
                        }
                    }
                    Err(error) => {
                        // Kept in the outbox (unacknowledged) and tried again.
                        crate::metrics::DataPlaneMetrics::outcome(
                            &metrics.sink_deliveries,
                            "retried",
                        );
                        tracing::warn!(%error, row = %entry.row_id, "publishing a result failed; will retry");
                        tokio::time::sleep(KAFKA_RETRY).await;
                        return None;
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
                    &entry.result(),
                    &entry.row(),
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
                return Some(entry.id);
            }
            Delivery::NoHttpSink => {}
            Delivery::Failed { detail, attempts } => {
                crate::metrics::DataPlaneMetrics::outcome(&metrics.sink_deliveries, "failed");
                metrics.rows("dead_lettered", "SinkFailed", 1);
                let dead_letter = crate::dataplane::dead_letter_stream(&runtime);
                if let Err(error) = self
                    .store
                    .outbox_dead_letter(
                        &dead_letter,
                        OUTBOX_GROUP,
                        &entry.id,
                        &entry.row_id,
                        "SinkFailed",
                        &entry.row(),
                        attempts,
                        &detail,
                    )
                    .await
                {
                    tracing::warn!(%error, row = %entry.row_id, "dead-lettering an outbox entry failed; it will be retried");
                }
            }
        }
        None
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
            .and_then(|r| crate::dataplane::key_of(&r, &runtime.table.spec.key));
        let table = format!("{}/{}", runtime.namespace, runtime.name);
        let (row_id, reason, attempts, detail) = (
            field("row_id"),
            field("reason"),
            field("attempts"),
            field("detail"),
        );
        let published = crate::dataplane::kafka::publish(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &str)]) -> OutboxEntry {
        let fields = fields
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    redis::Value::BulkString(v.as_bytes().to_vec()),
                )
            })
            .collect();
        OutboxEntry::parse("1-0".into(), fields)
    }

    #[test]
    fn the_table_key_is_the_claimed_key_and_other_fields_are_looked_up() {
        let claimed = entry(&[
            ("row_id", "r1"),
            ("key", "a@example.com"),
            ("result", r#"{"domain":"example.com"}"#),
            ("row", r#"{"email":"a@example.com","account":42}"#),
        ]);
        assert_eq!(
            claimed.record_key("email", "email").as_deref(),
            Some("a@example.com")
        );
        assert_eq!(
            claimed.record_key("account", "email").as_deref(),
            Some("42")
        );
        assert_eq!(
            claimed.record_key("domain", "email").as_deref(),
            Some("example.com"),
            "a field the row lacks is taken from the result"
        );
        assert_eq!(claimed.record_key("missing", "email"), None);
    }

    #[test]
    fn an_entry_without_a_claimed_key_reads_it_from_its_row() {
        let pending = serde_json::json!({
            "row_id": "r2", "key": "b@example.com", "attempt": 1,
            "reservation": "r2-a1", "reserved_credits": 1.0, "reserved_actions": 0,
            "row": {"email": "b@example.com"}
        });
        let unkeyed = entry(&[
            ("row_id", "r2"),
            ("result", "{}"),
            ("pending", &pending.to_string()),
        ]);
        assert_eq!(unkeyed.row(), serde_json::json!({"email": "b@example.com"}));
        assert_eq!(
            unkeyed.record_key("email", "email").as_deref(),
            Some("b@example.com")
        );
        assert_eq!(unkeyed.result(), serde_json::json!({}));
        assert_eq!(
            entry(&[]).row_id,
            "1-0",
            "an entry without a row id is named by its id"
        );
    }
}
