//! Kafka for the Event tier: client settings from the table (brokers, TLS,
//! SASL from Secrets), the consumer-group source of the worker, and the
//! idempotent producer the receiver publishes results and dead letters with.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::api::table::SaslMechanism;
use crate::contact::{self, Peer};
use crate::secret::SecretString;

/// The worker's consumer and the receiver's producer, watched by [`Watch`].
pub type KafkaConsumer = StreamConsumer<Watch>;
pub type KafkaProducer = FutureProducer<Watch>;

/// How often librdkafka reports its brokers' states to [`Watch`].
const STATISTICS_INTERVAL_MS: &str = "30000";

/// Sees what librdkafka sees of the brokers: counts its errors, and records
/// whether the brokers answer (for the table's KafkaReachable condition),
/// from its errors and its periodic statistics, so a client that has
/// nothing to send still says when the brokers come back.
pub struct Watch {
    brokers: String,
}

impl ClientContext for Watch {
    fn error(&self, error: KafkaError, reason: &str) {
        let kind = error
            .rdkafka_error_code()
            .map_or_else(|| "other".to_string(), |code| format!("{code:?}"));
        crate::metrics::dataplane().kafka_error(&kind);
        tracing::warn!(%error, reason, "Kafka client error");
        contact::unreachable(Peer::Kafka, &self.brokers, reason);
    }

    fn stats_raw(&self, statistics: &[u8]) {
        if any_broker_up(statistics) {
            contact::answered(Peer::Kafka);
        }
    }
}

impl ConsumerContext for Watch {}

/// Whether librdkafka's statistics show a real broker (not a bootstrap or
/// coordinator placeholder) connected.
fn any_broker_up(statistics: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Statistics {
        #[serde(default)]
        brokers: HashMap<String, Broker>,
    }
    #[derive(serde::Deserialize)]
    struct Broker {
        state: String,
        nodeid: i32,
    }
    serde_json::from_slice::<Statistics>(statistics)
        .is_ok_and(|s| s.brokers.values().any(|b| b.nodeid >= 0 && b.state == "UP"))
}

/// Connection settings with their Secrets resolved.
#[derive(Clone)]
pub struct KafkaSettings {
    pub brokers: Vec<String>,
    pub tls: bool,
    pub sasl: Option<(SaslMechanism, SecretString, SecretString)>,
}

impl KafkaSettings {
    /// librdkafka settings for these brokers. Credentials go only into the
    /// client's configuration, never into logs or errors.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", self.brokers.join(","));
        config.set("statistics.interval.ms", STATISTICS_INTERVAL_MS);
        let protocol = match (self.tls, self.sasl.is_some()) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        };
        config.set("security.protocol", protocol);
        if let Some((mechanism, user, password)) = &self.sasl {
            let mechanism = match mechanism {
                SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
                SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
                SaslMechanism::Plain => "PLAIN",
            };
            config
                .set("sasl.mechanism", mechanism)
                .set("sasl.username", user.expose())
                .set("sasl.password", password.expose());
        }
        config
    }

    /// A consumer in `group` on `topic` that never commits by itself:
    /// offsets are committed only once their rows are pending or terminal.
    pub fn consumer(&self, group: &str, topic: &str) -> anyhow::Result<KafkaConsumer> {
        let consumer: KafkaConsumer = self
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            // A killed worker's partitions move on within seconds, not 45.
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "3000")
            .create_with_context(self.watch())?;
        consumer.subscribe(&[topic])?;
        Ok(consumer)
    }

    /// An idempotent producer: retries never duplicate or reorder records.
    pub fn producer(&self) -> anyhow::Result<KafkaProducer> {
        Ok(self
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "30000")
            .create_with_context(self.watch())?)
    }

    fn watch(&self) -> Watch {
        Watch {
            brokers: self.brokers.join(","),
        }
    }
}

/// The row id of a Kafka record: the same record read twice (a rebalance, a
/// restart) maps to the same row.
pub fn row_id(table: &str, topic: &str, partition: i32, offset: i64) -> String {
    format!("{table}-{topic}-{partition}-{offset}")
}

/// Reads up to `max` records: waits for the first, then takes what arrives
/// within `linger`. Records already read are always returned: the
/// consumer's position has moved past them, so dropping them would lose them.
pub async fn next_batch(
    consumer: &KafkaConsumer,
    max: usize,
    linger: Duration,
) -> rdkafka::error::KafkaResult<Vec<OwnedMessage>> {
    let mut batch = vec![consumer.recv().await?.detach()];
    contact::answered(Peer::Kafka);
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < max {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(message)) => batch.push(message.detach()),
            Ok(Err(error)) => {
                tracing::warn!(%error, "reading the source topic failed mid-batch; handling what was read");
                break;
            }
            Err(_) => break,
        }
    }
    Ok(batch)
}

/// Commits, per partition, the offset after the highest record of `batch`
/// (every record of it is pending or terminal by then).
pub async fn commit(consumer: &Arc<KafkaConsumer>, batch: &[OwnedMessage]) -> anyhow::Result<()> {
    let mut next: HashMap<(String, i32), i64> = HashMap::new();
    for message in batch {
        let slot = next
            .entry((message.topic().to_string(), message.partition()))
            .or_insert(0);
        *slot = (*slot).max(message.offset() + 1);
    }
    let mut offsets = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        offsets.add_partition_offset(&topic, partition, Offset::Offset(offset))?;
    }
    let consumer = consumer.clone();
    tokio::task::spawn_blocking(move || consumer.commit(&offsets, CommitMode::Sync)).await??;
    Ok(())
}

/// Whether retrying cannot help (the record or the topic is refused as such).
pub fn is_permanent(error: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        error.rdkafka_error_code(),
        Some(
            Code::MessageSizeTooLarge
                | Code::InvalidMessageSize
                | Code::TopicAuthorizationFailed
                | Code::InvalidRecord
                | Code::InvalidTopic
        )
    )
}

/// Publishes one record and waits for the broker's acknowledgement.
pub async fn publish(
    producer: &KafkaProducer,
    topic: &str,
    key: Option<&str>,
    payload: &str,
    headers: &[(&str, &str)],
) -> Result<(), KafkaError> {
    let mut owned = OwnedHeaders::new();
    for (name, value) in headers {
        owned = owned.insert(Header {
            key: name,
            value: Some(*value),
        });
    }
    let mut record = FutureRecord::to(topic).payload(payload).headers(owned);
    if let Some(key) = key {
        record = record.key(key);
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map(|_| contact::answered(Peer::Kafka))
        .map_err(|(error, _)| error)
}

/// A record's header as text.
pub fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brokers_count_as_up_only_when_a_real_one_is_connected() {
        let stats = |brokers: serde_json::Value| {
            serde_json::to_vec(
                &serde_json::json!({"name": "rdkafka#consumer-1", "brokers": brokers}),
            )
            .unwrap()
        };
        let coordinator_only = stats(serde_json::json!({
            "GroupCoordinator": {"nodeid": -1, "state": "UP"},
            "k-0:9092/bootstrap": {"nodeid": -1, "state": "DOWN"}
        }));
        assert!(!any_broker_up(&coordinator_only));
        let one_up = stats(serde_json::json!({
            "k-0:9092/0": {"nodeid": 0, "state": "DOWN"},
            "k-1:9092/1": {"nodeid": 1, "state": "UP"}
        }));
        assert!(any_broker_up(&one_up));
        assert!(!any_broker_up(b"not json"));
    }

    fn settings(tls: bool, sasl: bool) -> KafkaSettings {
        KafkaSettings {
            brokers: vec!["k-0:9092".into(), "k-1:9092".into()],
            tls,
            sasl: sasl.then(|| {
                (
                    SaslMechanism::ScramSha512,
                    SecretString::new("kiln"),
                    SecretString::new("s3cret"),
                )
            }),
        }
    }

    #[test]
    fn tls_and_sasl_pick_the_security_protocol() {
        let get = |s: &KafkaSettings, key: &str| s.client_config().get(key).map(str::to_string);
        assert_eq!(
            get(&settings(false, false), "bootstrap.servers").as_deref(),
            Some("k-0:9092,k-1:9092")
        );
        assert_eq!(
            get(&settings(false, false), "security.protocol").as_deref(),
            Some("plaintext")
        );
        assert_eq!(
            get(&settings(true, false), "security.protocol").as_deref(),
            Some("ssl")
        );
        let secured = settings(true, true);
        assert_eq!(
            get(&secured, "security.protocol").as_deref(),
            Some("sasl_ssl")
        );
        assert_eq!(
            get(&secured, "sasl.mechanism").as_deref(),
            Some("SCRAM-SHA-512")
        );
        assert_eq!(get(&secured, "sasl.username").as_deref(), Some("kiln"));
    }

    #[test]
    fn a_record_always_maps_to_the_same_row() {
        assert_eq!(
            row_id("contacts", "contacts.raw", 3, 1041),
            "contacts-contacts.raw-3-1041"
        );
    }
}
