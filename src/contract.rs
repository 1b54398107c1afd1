//! What the operator and the data plane agree on, in one module both
//! import: the receiver's routes and in-cluster address, the user Kiln's
//! pods run as, the refresh job's exit codes, and the Redis layout of a
//! table's rows (the operator reads its counters; the data plane owns the
//! rest).

use std::collections::HashMap;

use redis::aio::ConnectionManager;

/// The port every receiver listens on, and its Service's port.
pub const RECEIVER_PORT: i32 = 8080;
/// The receiver's ingest endpoint (Queue and Event tables).
pub const INGEST_PATH: &str = "/v1/rows";
/// A Direct table's synchronous enrichment endpoint.
pub const ENRICH_PATH: &str = "/v1/enrich";
/// A Direct row's result, by row id.
pub const ROW_STATUS_PATH: &str = "/v1/rows/{id}";
/// The endpoint Clay's HTTP API column calls back.
pub const CALLBACK_PATH: &str = "/v1/clay/callback";

/// The user and group Kiln's pods run as (and own their volumes as).
pub const KILN_UID: i64 = 65532;

/// Exit code of a refresh run the budget refused, so the Job shows it
/// failed and why (its pod failure policy does not retry it).
pub const EXIT_SKIPPED_FOR_BUDGET: i32 = 3;

/// The name of a table's receiver Deployment and Service.
pub fn receiver_name(table: &str) -> String {
    format!("{table}-receiver")
}

/// In-cluster base URL of a table's receiver.
pub fn receiver_url(table: &str, namespace: &str) -> String {
    format!(
        "http://{}.{namespace}.svc:{RECEIVER_PORT}",
        receiver_name(table)
    )
}

/// Redis keys of one table.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(namespace: &str, table: &str) -> Self {
        Self {
            prefix: format!("kiln:{namespace}/{table}"),
        }
    }
    pub fn inbox(&self) -> String {
        format!("{}:inbox", self.prefix)
    }
    pub fn pending(&self) -> String {
        format!("{}:pending", self.prefix)
    }
    pub fn deadlines(&self) -> String {
        format!("{}:deadlines", self.prefix)
    }
    pub fn dedupe(&self) -> String {
        format!("{}:dedupe", self.prefix)
    }
    pub fn enriched_at(&self) -> String {
        format!("{}:enriched-at", self.prefix)
    }
    pub fn counters(&self) -> String {
        format!("{}:counters", self.prefix)
    }
    pub fn sources(&self) -> String {
        format!("{}:sources", self.prefix)
    }
    pub fn settlements(&self) -> String {
        format!("{}:settlements", self.prefix)
    }
    /// Stale keys a refresh run has re-enqueued → when (ms); the refresh job claims them.
    pub fn refreshing(&self) -> String {
        format!("{}:refreshing", self.prefix)
    }
    /// Key → the pending row it was last enriched from (a refresh's input).
    pub fn inputs(&self) -> String {
        format!("{}:inputs", self.prefix)
    }
    /// Marks a Kafka record's row as handled (a replay is recognised by it).
    pub fn seen(&self, row_id: &str) -> String {
        format!("{}:seen:{row_id}", self.prefix)
    }
    /// Results waiting for the HTTP sink (the CRM update).
    pub fn outbox(&self) -> String {
        format!("{}:outbox", self.prefix)
    }
}

/// What the operator reads of a table's rows in Redis.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TableCounters {
    /// The counters hash: received, submitted, enriched, delivered,
    /// deadLettered and `deadLettered:<reason>`, ...
    pub counters: HashMap<String, i64>,
    /// Rows sent to Clay and waiting for their result.
    pub pending: u64,
    /// When the row enriched longest ago was enriched (ms since the epoch).
    pub oldest_enriched_ms: Option<i64>,
    /// Rows submitted through each webhook source, by source name.
    pub source_rows: HashMap<String, i64>,
}

/// A table's counters, in one round trip over any connection (the operator
/// reads them over a pooled one).
pub async fn read_counters(
    connection: &mut ConnectionManager,
    keys: &Keys,
) -> redis::RedisResult<TableCounters> {
    let (counters, pending, oldest, source_rows): (_, _, Vec<(String, i64)>, _) = redis::pipe()
        .hgetall(keys.counters())
        .hlen(keys.pending())
        .zrange_withscores(keys.enriched_at(), 0, 0)
        .hgetall(keys.sources())
        .query_async(connection)
        .await?;
    Ok(TableCounters {
        counters,
        pending,
        oldest_enriched_ms: oldest.first().map(|(_, ms)| *ms),
        source_rows,
    })
}
