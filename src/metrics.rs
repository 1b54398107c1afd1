//! Prometheus metrics of the data plane (workers, receivers, Direct
//! receivers, refresh runs). One set per process, reached through
//! [`dataplane`] from wherever the work happens (the Clay client, the lease
//! holder, the sink), and registered into the process's `/metrics` by
//! [`DataPlaneMetrics::register`]. Labels stay low-cardinality: stages,
//! outcomes, reasons and status classes, never row ids.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A row's step through the pipeline and how it went.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RowLabels {
    /// received, deduplicated, submitted, enriched, delivered, dead_lettered.
    pub stage: &'static str,
    /// accepted/failed for submissions, the reason for dead letters, "ok" otherwise.
    pub outcome: String,
}

/// Labels with one outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

/// A webhook source, by its name in the table's spec.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

/// A kind of failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// How long something has waited: an upper bound such as "1m", or "older".
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgeLabels {
    pub age: &'static str,
}

/// Clay's answers by status class: 2xx, 429, 4xx, 5xx, or transport (no answer).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: &'static str,
}

pub struct DataPlaneMetrics {
    pub rows: Family<RowLabels, Counter>,
    pub clay_requests: Family<StatusLabels, Counter>,
    pub clay_request_seconds: Histogram,
    pub rate_wait_seconds: Histogram,
    pub lease_requests: Family<OutcomeLabels, Counter>,
    pub lease_request_seconds: Histogram,
    pub lease_denials: Family<OutcomeLabels, Counter>,
    pub sink_deliveries: Family<OutcomeLabels, Counter>,
    pub sink_delivery_seconds: Histogram,
    /// Failed store (Redis) commands by kind: connection, timeout, auth, reply.
    pub store_errors: Family<KindLabels, Counter>,
    /// Kafka client errors by kind (librdkafka's error code).
    pub kafka_errors: Family<KindLabels, Counter>,
    /// Rows waiting for their Clay result, by how long they have waited.
    pub rows_pending: Family<AgeLabels, prometheus_client::metrics::gauge::Gauge>,
    /// Rows submitted to each webhook source over its lifetime (Clay caps it at 50,000).
    pub source_rows: Family<SourceLabels, prometheus_client::metrics::gauge::Gauge>,
}

static METRICS: OnceLock<DataPlaneMetrics> = OnceLock::new();

/// This process's data-plane metrics.
pub fn dataplane() -> &'static DataPlaneMetrics {
    METRICS.get_or_init(DataPlaneMetrics::new)
}

fn latency() -> Histogram {
    // 1 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl DataPlaneMetrics {
    fn new() -> Self {
        Self {
            rows: Family::default(),
            clay_requests: Family::default(),
            clay_request_seconds: latency(),
            rate_wait_seconds: latency(),
            lease_requests: Family::default(),
            lease_request_seconds: latency(),
            lease_denials: Family::default(),
            sink_deliveries: Family::default(),
            sink_delivery_seconds: latency(),
            source_rows: Family::default(),
            store_errors: Family::default(),
            kafka_errors: Family::default(),
            rows_pending: Family::default(),
        }
    }

    /// Adds this process's metrics to `registry` (its `/metrics`).
    pub fn register(&'static self, registry: &mut Registry) {
        registry.register(
            "kiln_rows",
            "Rows by pipeline stage and outcome (dead letters by reason)",
            self.rows.clone(),
        );
        registry.register(
            "kiln_clay_requests",
            "Requests to Clay's webhook sources by answer (2xx, 429, 4xx, 5xx, transport)",
            self.clay_requests.clone(),
        );
        registry.register(
            "kiln_clay_request_duration_seconds",
            "Time Clay took to answer a webhook request",
            self.clay_request_seconds.clone(),
        );
        registry.register(
            "kiln_rate_limiter_wait_seconds",
            "Time a request waited for the table's or workspace's Clay rate",
            self.rate_wait_seconds.clone(),
        );
        registry.register(
            "kiln_lease_requests",
            "Credit lease requests to the operator by outcome",
            self.lease_requests.clone(),
        );
        registry.register(
            "kiln_lease_request_duration_seconds",
            "Time the operator took to answer a credit lease request",
            self.lease_request_seconds.clone(),
        );
        registry.register(
            "kiln_lease_denials",
            "Credits refused by the budget, by reason (Exhausted, Paused, BreakerOpen)",
            self.lease_denials.clone(),
        );
        registry.register(
            "kiln_sink_deliveries",
            "Results handed to the sink by outcome (delivered, retried, failed)",
            self.sink_deliveries.clone(),
        );
        registry.register(
            "kiln_sink_delivery_duration_seconds",
            "Time a sink delivery took",
            self.sink_delivery_seconds.clone(),
        );
        registry.register(
            "kiln_store_errors",
            "Failed row-store (Redis) commands by kind: connection, timeout, auth, reply",
            self.store_errors.clone(),
        );
        registry.register(
            "kiln_kafka_errors",
            "Kafka client errors by kind (librdkafka's error code)",
            self.kafka_errors.clone(),
        );
        registry.register(
            "kiln_rows_pending",
            "Rows waiting for their Clay result, by how long they have waited (upper bound)",
            self.rows_pending.clone(),
        );
        registry.register(
            "kiln_webhook_source_rows",
            "Rows submitted to each webhook source over its lifetime (Clay takes 50,000 per source)",
            self.source_rows.clone(),
        );
    }

    /// Counts one failed store command of `kind`.
    pub fn store_error(&self, kind: &str) {
        self.store_errors
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    /// Counts one Kafka client error of `kind`.
    pub fn kafka_error(&self, kind: &str) {
        self.kafka_errors
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    /// Counts `n` rows at `stage` with `outcome`.
    pub fn rows(&self, stage: &'static str, outcome: &str, n: u64) {
        self.rows
            .get_or_create(&RowLabels {
                stage,
                outcome: outcome.to_string(),
            })
            .inc_by(n);
    }

    /// Counts one Clay answer (`None`: no answer at all) and its latency.
    pub fn clay_answer(&self, status: Option<u16>, took: Duration) {
        let status = match status {
            None => "transport",
            Some(429) => "429",
            Some(s) if s < 300 => "2xx",
            Some(s) if s < 500 => "4xx",
            Some(_) => "5xx",
        };
        self.clay_requests
            .get_or_create(&StatusLabels { status })
            .inc();
        self.clay_request_seconds.observe(took.as_secs_f64());
    }

    pub fn outcome(family: &Family<OutcomeLabels, Counter>, outcome: &str) {
        family
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_named_and_labelled_by_class() {
        let metrics: &'static DataPlaneMetrics = Box::leak(Box::new(DataPlaneMetrics::new()));
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.rows("dead_lettered", "ResultTimeout", 2);
        metrics.clay_answer(Some(429), Duration::from_millis(3));
        metrics.clay_answer(Some(202), Duration::from_millis(3));
        metrics.clay_answer(None, Duration::from_millis(3));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"kiln_rows_total{stage="dead_lettered",outcome="ResultTimeout"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"kiln_clay_requests_total{status="429"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"kiln_clay_requests_total{status="2xx"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"kiln_clay_requests_total{status="transport"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("kiln_clay_request_duration_seconds_count 3"),
            "{text}"
        );
    }
}
