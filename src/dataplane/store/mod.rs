//! Row state in Redis: pending rows with deadlines, the de-duplication index,
//! counters and webhook-source submission counts. Every transition that must
//! not half-happen (a row becoming pending and its source entry acknowledged;
//! a callback claiming a row and delivering it) is one Lua script (`lua/`).
//!
//! By job: `rows` (a row's life, through the shared row-store interfaces),
//! `streams` (source, outbox and dead-letter streams), `indexes` (de-dupe,
//! stale index, counters), `connection` (every command, watched),
//! `scripts` (built once).

mod connection;
mod indexes;
mod rows;
mod scripts;
mod streams;

use std::collections::HashMap;

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use self::connection::WatchedConnection;
use crate::contract::Keys;

pub use self::rows::RedisRows;

/// A row that was handed to Clay and waits for its callback.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PendingRow {
    pub row_id: String,
    pub key: String,
    pub row: Value,
    pub attempt: u32,
    /// This attempt's id (`<row>-a<n>`), empty while the row waits for
    /// credits to retry; replacing a pending row checks it, so a callback or
    /// another sweeper that moved the row on first wins.
    pub reservation: String,
    /// The credits drawn for this attempt: its worst case.
    pub reserved_credits: f64,
    pub reserved_actions: u64,
    /// The budget period the credits were counted in (for refunds).
    #[serde(default)]
    pub period: String,
    /// Random, new with every write of an attempt: a store step retried
    /// after an unknown outcome (a timeout) recognises its own write by it,
    /// and no other process's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub write_token: String,
    /// When this attempt was made (ms since the epoch; 0 while the row waits
    /// for credits): its result's latency is counted from here.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempted_at_ms: i64,
}

fn is_zero(ms: &i64) -> bool {
    *ms == 0
}

/// A fresh [`PendingRow::write_token`].
pub fn new_write_token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl PendingRow {
    /// What the attempt drew.
    pub fn reserved(&self) -> crate::api::table::CreditCost {
        crate::api::table::CreditCost {
            data_credits: self.reserved_credits,
            actions: self.reserved_actions,
        }
    }
}

/// Where a table's results are written when a row completes.
#[derive(Clone, Debug, PartialEq)]
pub struct SinkRoute {
    pub stream: String,
    /// Approximate cap on the stream's length (0 = none).
    pub max_len: u64,
    /// The stream is the HTTP sink's outbox: a row counts as delivered only
    /// once the CRM accepted it.
    pub through_outbox: bool,
}

/// A stream entry's field as text, if it has it.
pub fn text_field(fields: &HashMap<String, redis::Value>, name: &str) -> Option<String> {
    fields
        .get(name)
        .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
}

/// Where a row came from, so the script that makes it pending or terminal
/// also settles its source: a Redis Stream entry is acknowledged; a Kafka
/// record (its offset is committed by the consumer afterwards) leaves a
/// seen-marker for a week, so a replayed record never becomes a second row.
#[derive(Clone, Debug)]
pub enum SourceEntry {
    Stream {
        stream: String,
        group: String,
        id: String,
    },
    Kafka,
}

impl SourceEntry {
    /// The script's source key and its group and entry id ('' for Kafka).
    fn script_parts<'a>(&'a self, keys: &Keys, row_id: &str) -> (String, &'a str, &'a str) {
        match self {
            Self::Stream { stream, group, id } => (stream.clone(), group, id),
            Self::Kafka => (keys.seen(row_id), "", ""),
        }
    }
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

#[derive(Clone)]
pub struct RedisStore {
    connection: WatchedConnection,
    /// A second connection for blocking stream reads, so they never hold up
    /// the short commands multiplexed on the first.
    blocking: WatchedConnection,
    client: redis::Client,
    keys: Keys,
}

/// Longest wait for a blocking read's answer (its BLOCK time plus slack).
const BLOCKING_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a Redis command may take before it counts as failed. The
/// client's default (500 ms) turned slow but successful Lua steps on a loaded
/// machine into retries of rows that were already pending.
const RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl RedisStore {
    pub async fn connect(url: &str, keys: Keys) -> redis::RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let config =
            redis::aio::ConnectionManagerConfig::new().set_response_timeout(Some(RESPONSE_TIMEOUT));
        let connection = WatchedConnection::new(
            ConnectionManager::new_with_config(client.clone(), config).await?,
            url,
        );
        let blocking = Self::blocking_connection(&client, &connection).await?;
        Ok(Self {
            connection,
            blocking,
            client,
            keys,
        })
    }

    async fn blocking_connection(
        client: &redis::Client,
        short: &WatchedConnection,
    ) -> redis::RedisResult<WatchedConnection> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(BLOCKING_READ_TIMEOUT));
        let connection = ConnectionManager::new_with_config(client.clone(), config).await?;
        Ok(short.to_the_same_store(connection))
    }

    /// The same store with a blocking-read connection of its own: a blocking
    /// read holds its connection, so each reading loop needs one.
    pub async fn with_own_blocking_reads(&self) -> redis::RedisResult<Self> {
        Ok(Self {
            blocking: Self::blocking_connection(&self.client, &self.connection).await?,
            ..self.clone()
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    fn conn(&self) -> WatchedConnection {
        self.connection.clone()
    }
}
