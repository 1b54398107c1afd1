//! Row state in Redis: pending rows with deadlines, the de-duplication index,
//! counters and webhook-source submission counts. Every transition that must
//! not half-happen (a row becoming pending and its source entry acknowledged;
//! a callback claiming a row and delivering it) is one Lua script.

mod connection;

use std::collections::HashMap;
use std::sync::LazyLock;

use futures::future::BoxFuture;
use redis::aio::ConnectionManager;

use self::connection::WatchedConnection;
use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clay::ClayError;
use crate::clay::rotation::SubmissionCounter;
use crate::contract::Keys;

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

/// A script with the source guard spliced in.
fn guarded(script: &str) -> Script {
    Script::new(&script.replace("{SOURCE_GUARD}", SOURCE_GUARD))
}

// Built (and hashed) once: they run for every row.
static MAKE_PENDING_SCRIPT: LazyLock<Script> = LazyLock::new(|| guarded(MAKE_PENDING));
static DELIVER_STORED_SCRIPT: LazyLock<Script> = LazyLock::new(|| guarded(DELIVER_STORED));
static DEAD_LETTER_ENTRY_SCRIPT: LazyLock<Script> = LazyLock::new(|| guarded(DEAD_LETTER_ENTRY));
static REPLACE_PENDING_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(REPLACE_PENDING));

/// Runs a store step whose outcome a timeout or dropped connection leaves
/// unknown, again at once (up to three times): the step recognises its own
/// earlier write, so a slow success is not taken for a failure.
async fn with_unknown_outcome_retried<T, F, Fut>(mut step: F) -> redis::RedisResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<T>>,
{
    let mut tries = 1;
    loop {
        match step().await {
            Err(error)
                if tries < 3
                    && (error.is_timeout()
                        || error.is_connection_dropped()
                        || error.is_io_error()) =>
            {
                tracing::warn!(%error, "a store step's outcome is unknown; running it again");
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100 * tries)).await;
            }
            outcome => return outcome,
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

/// The source part of a script that makes a row pending or terminal:
/// KEYS[n] is the source stream (acknowledged at the end) or, for a Kafka
/// record (ARGV group ''), its seen-marker: a record seen before is a replay
/// and the script does nothing.
const SOURCE_GUARD: &str = r#"
local function first_sight(key, group)
  if group ~= '' then return true end
  return redis.call('SET', key, '1', 'NX', 'EX', 604800) ~= false
end
local function ack(key, group, id)
  if group ~= '' then redis.call('XACK', key, group, id) end
end
"#;

const MAKE_PENDING: &str = r#"
-- KEYS: pending, deadlines, counters, source; ARGV: row_id, pending json, deadline ms, group, entry id
{SOURCE_GUARD}
-- This very write again (a retry after a timeout): it is ours.
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  ack(KEYS[4], ARGV[4], ARGV[5])
  return 1
end
if not first_sight(KEYS[4], ARGV[4]) then return 0 end
local created = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
if created == 1 then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  redis.call('HINCRBY', KEYS[3], 'submitted', 1)
end
ack(KEYS[4], ARGV[4], ARGV[5])
return created
"#;

const CLAIM_CALLBACK: &str = r#"
-- KEYS: pending, deadlines, dedupe, enriched-at, counters, sink, settlements, inputs, refreshing
-- ARGV: row_id, result json, now ms, sink maxlen (0 = none), reported cost ('' when absent),
--       '1' when the sink is the HTTP outbox (delivered later) else '0'
local pending = redis.call('HGET', KEYS[1], ARGV[1])
if not pending then
  redis.call('HINCRBY', KEYS[5], 'duplicateCallbacks', 1)
  return false
end
-- The credit settlement this delivery owes, done by whichever receiver gets to it.
redis.call('HSET', KEYS[7], ARGV[1], ARGV[5] .. '|' .. pending)
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local key = cjson.decode(pending)['key']
redis.call('HSET', KEYS[3], key, ARGV[3] .. '|' .. ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[3], key)
redis.call('HSET', KEYS[8], key, pending)
redis.call('ZREM', KEYS[9], key)
local fields = {'row_id', ARGV[1], 'key', key, 'result', ARGV[2]}
if ARGV[6] == '1' then
  table.insert(fields, 'pending')
  table.insert(fields, pending)
end
if tonumber(ARGV[4]) > 0 then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[4], '*', unpack(fields))
else
  redis.call('XADD', KEYS[6], '*', unpack(fields))
end
redis.call('HINCRBY', KEYS[5], 'enriched', 1)
if ARGV[6] ~= '1' then redis.call('HINCRBY', KEYS[5], 'delivered', 1) end
redis.call('HSET', KEYS[5], 'lastEnrichedAtMs', ARGV[3])
return pending
"#;

const DELIVER_STORED: &str = r#"
-- KEYS: sink, counters, source
-- ARGV: row_id, key, result json, group, entry id, sink maxlen, row json, '1' when the sink is the outbox
{SOURCE_GUARD}
if not first_sight(KEYS[3], ARGV[4]) then return 0 end
local fields = {'row_id', ARGV[1], 'key', ARGV[2], 'result', ARGV[3], 'row', ARGV[7], 'deduplicated', '1'}
if tonumber(ARGV[6]) > 0 then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[6], '*', unpack(fields))
else
  redis.call('XADD', KEYS[1], '*', unpack(fields))
end
redis.call('HINCRBY', KEYS[2], 'deduplicated', 1)
if ARGV[8] ~= '1' then redis.call('HINCRBY', KEYS[2], 'delivered', 1) end
ack(KEYS[3], ARGV[4], ARGV[5])
return 1
"#;

const OUTBOX_DELIVERED: &str = r#"
-- KEYS: outbox, counters; ARGV: group, entry id
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], 'delivered', 1)
return 1
"#;

const OUTBOX_DEAD_LETTER: &str = r#"
-- KEYS: outbox, dead-letter stream, counters
-- ARGV: group, entry id, row_id, reason, row json, attempts, detail
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[2], '*', 'row_id', ARGV[3], 'reason', ARGV[4], 'row', ARGV[5], 'attempts', ARGV[6], 'detail', ARGV[7])
redis.call('HINCRBY', KEYS[3], 'deadLettered', 1)
redis.call('HINCRBY', KEYS[3], 'deadLettered:' .. ARGV[4], 1)
return 1
"#;

const DEAD_LETTER_ENTRY: &str = r#"
-- KEYS: dead-letter stream, counters, source; ARGV: row_id, reason, row json, attempts, group, entry id
{SOURCE_GUARD}
if not first_sight(KEYS[3], ARGV[5]) then return 0 end
redis.call('XADD', KEYS[1], '*', 'row_id', ARGV[1], 'reason', ARGV[2], 'row', ARGV[3], 'attempts', ARGV[4])
redis.call('HINCRBY', KEYS[2], 'deadLettered', 1)
redis.call('HINCRBY', KEYS[2], 'deadLettered:' .. ARGV[2], 1)
ack(KEYS[3], ARGV[5], ARGV[6])
return 1
"#;

const DEAD_LETTER_PENDING: &str = r#"
-- KEYS: pending, deadlines, dead-letter stream, counters; ARGV: row_id, reason
local pending = redis.call('HGET', KEYS[1], ARGV[1])
if not pending then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local p = cjson.decode(pending)
redis.call('XADD', KEYS[3], '*', 'row_id', ARGV[1], 'reason', ARGV[2], 'row', cjson.encode(p['row']), 'attempts', tostring(p['attempt']))
redis.call('HINCRBY', KEYS[4], 'deadLettered', 1)
redis.call('HINCRBY', KEYS[4], 'deadLettered:' .. ARGV[2], 1)
return pending
"#;

const TAKE_EXPIRED: &str = r#"
-- KEYS: deadlines, pending; ARGV: now ms, lease until ms, limit
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[2], id)
  local p = redis.call('HGET', KEYS[2], id)
  if p then table.insert(out, p) end
end
return out
"#;

const REPLACE_PENDING: &str = r#"
-- KEYS: pending, deadlines; ARGV: row_id, pending json, deadline ms, expected old reservation
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return 0 end
-- This very write again (a retry after a timeout): it is ours.
if current == ARGV[2] then return 1 end
if cjson.decode(current)['reservation'] ~= ARGV[4] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"#;

const REPLAY: &str = r#"
-- KEYS: dead-letter stream, source stream, counters; ARGV: dead-letter entry id
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #entries == 0 then return 0 end
local fields = entries[1][2]
local row_id, row
for i = 1, #fields, 2 do
  if fields[i] == 'row_id' then row_id = fields[i + 1] end
  if fields[i] == 'row' then row = fields[i + 1] end
end
redis.call('XADD', KEYS[2], '*', 'row_id', row_id, 'row', row)
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'replayed', 1)
return 1
"#;

/// Keys a refresh run took but whose rows never completed (the run or the
/// row died) go back to the stale index after their lease, as very stale.
const RETURN_EXPIRED_REFRESHES: &str = r#"
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, key in ipairs(expired) do
  redis.call('ZADD', KEYS[1], 0, key)
  redis.call('ZREM', KEYS[2], key)
end
"#;

const COUNT_STALE: &str = r#"
-- KEYS: enriched-at, refreshing; ARGV: lease cutoff ms, stale cutoff ms
{RETURN_EXPIRED_REFRESHES}
return redis.call('ZCOUNT', KEYS[1], '-inf', ARGV[2])
"#;

const CLAIM_STALE: &str = r#"
-- KEYS: enriched-at, refreshing, inputs; ARGV: lease cutoff ms, stale cutoff ms, now ms, limit
{RETURN_EXPIRED_REFRESHES}
local keys = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, ARGV[4])
local out = {}
for _, key in ipairs(keys) do
  -- Moving the key out of the index is what stops a concurrent run taking it too.
  redis.call('ZREM', KEYS[1], key)
  redis.call('ZADD', KEYS[2], ARGV[3], key)
  table.insert(out, key)
  table.insert(out, redis.call('HGET', KEYS[3], key) or '')
end
return out
"#;

const TRY_ADD: &str = r#"
-- KEYS: sources; ARGV: source, n, limit
local count = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if count + tonumber(ARGV[2]) > tonumber(ARGV[3]) then return -1 end
return redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
"#;

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

    /// Creates the consumer group (and the stream) if missing.
    pub async fn ensure_group(&self, stream: &str, group: &str) -> redis::RedisResult<()> {
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn())
            .await;
        match created {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// How many keys were last enriched before `stale_before_ms`.
    pub async fn count_stale(
        &self,
        stale_before_ms: i64,
        lease_ms: i64,
    ) -> redis::RedisResult<u64> {
        Script::new(&COUNT_STALE.replace("{RETURN_EXPIRED_REFRESHES}", RETURN_EXPIRED_REFRESHES))
            .key(self.keys.enriched_at())
            .key(self.keys.refreshing())
            .arg(now_ms() - lease_ms)
            .arg(stale_before_ms)
            .invoke_async(&mut self.conn())
            .await
    }

    /// Takes up to `limit` keys last enriched before `stale_before_ms`,
    /// oldest first, with the row each was enriched from. A taken key leaves
    /// the stale index until its row is enriched again (or `lease_ms` passes),
    /// so concurrent runs never take the same key.
    pub async fn claim_stale(
        &self,
        stale_before_ms: i64,
        limit: u64,
        lease_ms: i64,
    ) -> redis::RedisResult<Vec<(String, Option<Value>)>> {
        let now = now_ms();
        let flat: Vec<String> = Script::new(
            &CLAIM_STALE.replace("{RETURN_EXPIRED_REFRESHES}", RETURN_EXPIRED_REFRESHES),
        )
        .key(self.keys.enriched_at())
        .key(self.keys.refreshing())
        .key(self.keys.inputs())
        .arg(now - lease_ms)
        .arg(stale_before_ms)
        .arg(now)
        .arg(limit)
        .invoke_async(&mut self.conn())
        .await?;
        Ok(flat
            .chunks(2)
            .map(|pair| {
                let input = serde_json::from_str::<PendingRow>(&pair[1])
                    .ok()
                    .map(|p| p.row);
                (pair[0].clone(), input)
            })
            .collect())
    }

    /// Appends rows to a stream (the ingest endpoint); returns entry ids.
    pub async fn enqueue(
        &self,
        stream: &str,
        rows: &[(String, Value)],
    ) -> redis::RedisResult<Vec<String>> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (row_id, row) in rows {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("row_id")
                .arg(row_id)
                .arg("row")
                .arg(row.to_string());
        }
        pipe.cmd("HINCRBY")
            .arg(self.keys.counters())
            .arg("received")
            .arg(rows.len());
        let mut ids: Vec<redis::Value> = pipe.query_async(&mut self.conn()).await?;
        ids.pop();
        ids.into_iter()
            .map(|v| redis::from_redis_value(v).map_err(redis::RedisError::from))
            .collect()
    }

    /// Reads entries for this consumer: first its own unacknowledged ones
    /// (rows it paused on, or left by its previous incarnation), then
    /// entries of consumers idle longer than `reclaim_idle_ms` (a crashed
    /// worker's rows), then new entries, blocking up to `block_ms`.
    pub async fn read(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block_ms: u64,
        reclaim_idle_ms: u64,
    ) -> redis::RedisResult<Vec<(String, HashMap<String, redis::Value>)>> {
        let flatten = |reply: Option<redis::streams::StreamReadReply>| -> Vec<(String, HashMap<String, redis::Value>)> {
            reply
                .map(|r| r.keys.into_iter().flat_map(|k| k.ids).map(|e| (e.id, e.map)).collect())
                .unwrap_or_default()
        };
        let own_options = redis::streams::StreamReadOptions::default()
            .group(group, consumer)
            .count(count);
        let own: Option<redis::streams::StreamReadReply> = self
            .conn()
            .xread_options(&[stream], &["0"], &own_options)
            .await?;
        let own = flatten(own);
        if !own.is_empty() {
            return Ok(own);
        }
        let claimed: (String, redis::streams::StreamClaimReply, Vec<String>) =
            redis::cmd("XAUTOCLAIM")
                .arg(stream)
                .arg(group)
                .arg(consumer)
                .arg(reclaim_idle_ms)
                .arg("0-0")
                .arg("COUNT")
                .arg(count)
                .query_async(&mut self.conn())
                .await?;
        if !claimed.1.ids.is_empty() {
            return Ok(claimed.1.ids.into_iter().map(|e| (e.id, e.map)).collect());
        }
        let options = redis::streams::StreamReadOptions::default()
            .group(group, consumer)
            .count(count)
            .block(block_ms as usize);
        let new: Option<redis::streams::StreamReadReply> = self
            .blocking
            .clone()
            .xread_options(&[stream], &[">"], &options)
            .await?;
        Ok(flatten(new))
    }

    /// The stored result for `key` and when it was enriched (ms), if any.
    pub async fn dedupe_lookup(&self, key: &str) -> redis::RedisResult<Option<(i64, String)>> {
        let stored: Option<String> = self.conn().hget(self.keys.dedupe(), key).await?;
        Ok(stored.and_then(|s| {
            let (at, result) = s.split_once('|')?;
            Some((at.parse().ok()?, result.to_string()))
        }))
    }

    /// Records the row as pending and acknowledges its source entry, atomically.
    pub async fn make_pending(
        &self,
        pending: &PendingRow,
        deadline_ms: i64,
        entry: &SourceEntry,
    ) -> redis::RedisResult<bool> {
        let json = serde_json::to_string(pending).expect("a pending row serializes");
        let (source, group, id) = entry.script_parts(&self.keys, &pending.row_id);
        let created: i64 = with_unknown_outcome_retried(|| {
            let mut invocation = MAKE_PENDING_SCRIPT.prepare_invoke();
            invocation
                .key(self.keys.pending())
                .key(self.keys.deadlines())
                .key(self.keys.counters())
                .key(&source)
                .arg(&pending.row_id)
                .arg(&json)
                .arg(deadline_ms)
                .arg(group)
                .arg(id);
            let mut connection = self.conn();
            async move { invocation.invoke_async(&mut connection).await }
        })
        .await?;
        Ok(created == 1)
    }

    /// Whether a Kafka record's row was already handled (a replay).
    pub async fn seen(&self, row_id: &str) -> redis::RedisResult<bool> {
        self.conn().exists(self.keys.seen(row_id)).await
    }

    /// Claims a pending row for its callback and delivers the result to the
    /// sink stream in one step. None when the row is not pending (a duplicate
    /// or a late callback): nothing is delivered twice.
    /// The settlement the delivery owes (reported cost and the pending row) is
    /// recorded with it (see [`Self::owed_settlements`]): a receiver that dies
    /// before settling leaves it for another to finish.
    pub async fn claim_callback(
        &self,
        row_id: &str,
        result: &Value,
        now_ms: i64,
        sink: &SinkRoute,
        reported_cost: Option<f64>,
    ) -> redis::RedisResult<Option<PendingRow>> {
        let claimed: Option<String> = Script::new(CLAIM_CALLBACK)
            .key(self.keys.pending())
            .key(self.keys.deadlines())
            .key(self.keys.dedupe())
            .key(self.keys.enriched_at())
            .key(self.keys.counters())
            .key(&sink.stream)
            .key(self.keys.settlements())
            .key(self.keys.inputs())
            .key(self.keys.refreshing())
            .arg(row_id)
            .arg(result.to_string())
            .arg(now_ms)
            .arg(sink.max_len)
            .arg(reported_cost.map(|c| c.to_string()).unwrap_or_default())
            .arg(if sink.through_outbox { "1" } else { "0" })
            .invoke_async(&mut self.conn())
            .await?;
        Ok(claimed.and_then(|p| serde_json::from_str(&p).ok()))
    }

    /// Settlements recorded by deliveries and not yet taken by a receiver:
    /// row id → (reported cost, the row as it was pending).
    pub async fn owed_settlements(
        &self,
    ) -> redis::RedisResult<Vec<(String, Option<f64>, PendingRow)>> {
        let owed: HashMap<String, String> = self.conn().hgetall(self.keys.settlements()).await?;
        Ok(owed
            .into_iter()
            .filter_map(|(row_id, value)| {
                let (cost, pending) = value.split_once('|')?;
                Some((
                    row_id,
                    cost.parse().ok(),
                    serde_json::from_str(pending).ok()?,
                ))
            })
            .collect())
    }

    /// Takes a delivery's owed settlement; true for the one caller that did.
    pub async fn take_owed(&self, row_id: &str) -> redis::RedisResult<bool> {
        let removed: u32 = self.conn().hdel(self.keys.settlements(), row_id).await?;
        Ok(removed == 1)
    }

    /// Delivers a stored (de-duplicated) result and acknowledges the entry.
    pub async fn deliver_stored(
        &self,
        row_id: &str,
        key: &str,
        result: &str,
        row: &Value,
        sink: &SinkRoute,
        entry: &SourceEntry,
    ) -> redis::RedisResult<()> {
        let (source, group, id) = entry.script_parts(&self.keys, row_id);
        DELIVER_STORED_SCRIPT
            .key(&sink.stream)
            .key(self.keys.counters())
            .key(source)
            .arg(row_id)
            .arg(key)
            .arg(result)
            .arg(group)
            .arg(id)
            .arg(sink.max_len)
            .arg(row.to_string())
            .arg(if sink.through_outbox { "1" } else { "0" })
            .invoke_async(&mut self.conn())
            .await
    }

    /// Completes an outbox entry the HTTP sink accepted. False when another
    /// receiver had already completed it (so it is counted once).
    pub async fn outbox_delivered(&self, group: &str, entry_id: &str) -> redis::RedisResult<bool> {
        let done: i64 = Script::new(OUTBOX_DELIVERED)
            .key(self.keys.outbox())
            .key(self.keys.counters())
            .arg(group)
            .arg(entry_id)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(done == 1)
    }

    /// Moves an outbox entry the HTTP sink would not take to the dead letters.
    #[allow(clippy::too_many_arguments)]
    pub async fn outbox_dead_letter(
        &self,
        dead_letter: &str,
        group: &str,
        entry_id: &str,
        row_id: &str,
        reason: &str,
        row: &Value,
        attempts: u32,
        detail: &str,
    ) -> redis::RedisResult<bool> {
        let done: i64 = Script::new(OUTBOX_DEAD_LETTER)
            .key(self.keys.outbox())
            .key(dead_letter)
            .key(self.keys.counters())
            .arg(group)
            .arg(entry_id)
            .arg(row_id)
            .arg(reason)
            .arg(row.to_string())
            .arg(attempts)
            .arg(detail)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(done == 1)
    }

    /// Removes an entry forwarded elsewhere (a dead letter now on its topic).
    pub async fn forwarded(
        &self,
        stream: &str,
        group: &str,
        entry_id: &str,
    ) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XACK")
            .arg(stream)
            .arg(group)
            .arg(entry_id)
            .ignore()
            .cmd("XDEL")
            .arg(stream)
            .arg(entry_id)
            .ignore();
        pipe.query_async(&mut self.conn()).await
    }

    /// Resets an entry's idle time, so a consumer still working on it (a
    /// slow retry) is not mistaken for a crashed one.
    pub async fn touch(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        entry_id: &str,
    ) -> redis::RedisResult<()> {
        redis::cmd("XCLAIM")
            .arg(stream)
            .arg(group)
            .arg(consumer)
            .arg(0)
            .arg(entry_id)
            .arg("JUSTID")
            .query_async::<redis::Value>(&mut self.conn())
            .await
            .map(|_| ())
    }

    /// Dead-letters a source entry that never became pending, and acknowledges it.
    pub async fn dead_letter_entry(
        &self,
        dead_letter: &str,
        row_id: &str,
        reason: &str,
        row: &Value,
        attempts: u32,
        entry: &SourceEntry,
    ) -> redis::RedisResult<()> {
        let (source, group, id) = entry.script_parts(&self.keys, row_id);
        DEAD_LETTER_ENTRY_SCRIPT
            .key(dead_letter)
            .key(self.keys.counters())
            .key(source)
            .arg(row_id)
            .arg(reason)
            .arg(row.to_string())
            .arg(attempts)
            .arg(group)
            .arg(id)
            .invoke_async(&mut self.conn())
            .await
    }

    /// Dead-letters a pending row; None if it was no longer pending.
    pub async fn dead_letter_pending(
        &self,
        dead_letter: &str,
        row_id: &str,
        reason: &str,
    ) -> redis::RedisResult<Option<PendingRow>> {
        let removed: Option<String> = Script::new(DEAD_LETTER_PENDING)
            .key(self.keys.pending())
            .key(self.keys.deadlines())
            .key(dead_letter)
            .key(self.keys.counters())
            .arg(row_id)
            .arg(reason)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(removed.and_then(|p| serde_json::from_str(&p).ok()))
    }

    /// Moves a pending row's deadline (only if it is still pending).
    pub async fn set_deadline(&self, row_id: &str, deadline_ms: i64) -> redis::RedisResult<()> {
        redis::cmd("ZADD")
            .arg(self.keys.deadlines())
            .arg("XX")
            .arg(deadline_ms)
            .arg(row_id)
            .query_async(&mut self.conn())
            .await
    }

    /// Takes pending rows past their deadline, leasing them to this caller
    /// until `lease_until_ms` so other workers skip them meanwhile.
    pub async fn take_expired(
        &self,
        now_ms: i64,
        lease_until_ms: i64,
        limit: usize,
    ) -> redis::RedisResult<Vec<PendingRow>> {
        let rows: Vec<String> = Script::new(TAKE_EXPIRED)
            .key(self.keys.deadlines())
            .key(self.keys.pending())
            .arg(now_ms)
            .arg(lease_until_ms)
            .arg(limit)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(rows
            .iter()
            .filter_map(|p| serde_json::from_str(p).ok())
            .collect())
    }

    /// Pending rows with a deadline at or before each cutoff, and in all.
    pub async fn deadlines_up_to(&self, cutoffs_ms: &[i64]) -> redis::RedisResult<(Vec<u64>, u64)> {
        let mut pipe = redis::pipe();
        for cutoff in cutoffs_ms {
            pipe.zcount(self.keys.deadlines(), "-inf", cutoff);
        }
        pipe.zcard(self.keys.deadlines());
        let mut counts: Vec<u64> = pipe.query_async(&mut self.conn()).await?;
        let total = counts.pop().unwrap_or(0);
        Ok((counts, total))
    }

    /// Replaces a pending row for its next attempt, unless a callback (or
    /// another worker) changed it since `previous_reservation` was read.
    pub async fn replace_pending(
        &self,
        pending: &PendingRow,
        deadline_ms: i64,
        previous_reservation: &str,
    ) -> redis::RedisResult<bool> {
        let json = serde_json::to_string(pending).expect("a pending row serializes");
        let replaced: i64 = with_unknown_outcome_retried(|| {
            let mut invocation = REPLACE_PENDING_SCRIPT.prepare_invoke();
            invocation
                .key(self.keys.pending())
                .key(self.keys.deadlines())
                .arg(&pending.row_id)
                .arg(&json)
                .arg(deadline_ms)
                .arg(previous_reservation);
            let mut connection = self.conn();
            async move { invocation.invoke_async(&mut connection).await }
        })
        .await?;
        Ok(replaced == 1)
    }

    /// The first `count` entries of a stream, oldest first.
    pub async fn range(
        &self,
        stream: &str,
        count: usize,
    ) -> redis::RedisResult<Vec<(String, HashMap<String, String>)>> {
        let reply: redis::streams::StreamRangeReply =
            self.conn().xrange_count(stream, "-", "+", count).await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|entry| {
                let fields = entry
                    .map
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, redis::from_redis_value::<String>(v).ok()?)))
                    .collect();
                (entry.id, fields)
            })
            .collect())
    }

    /// Moves one dead letter back to the source stream, keeping its row id;
    /// false when it was already replayed (so a replay is never doubled).
    pub async fn replay(
        &self,
        dead_letter: &str,
        entry_id: &str,
        source: &str,
    ) -> redis::RedisResult<bool> {
        let moved: i64 = Script::new(REPLAY)
            .key(dead_letter)
            .key(source)
            .key(self.keys.counters())
            .arg(entry_id)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(moved == 1)
    }

    /// The table's counters.
    pub async fn counters(&self) -> redis::RedisResult<HashMap<String, i64>> {
        self.conn().hgetall(self.keys.counters()).await
    }

    /// Rows currently pending.
    pub async fn pending_count(&self) -> redis::RedisResult<u64> {
        self.conn().hlen(self.keys.pending()).await
    }
}

impl SubmissionCounter for RedisStore {
    fn try_add<'a>(
        &'a self,
        source: &'a str,
        n: u64,
        limit: u64,
    ) -> BoxFuture<'a, Result<Option<u64>, ClayError>> {
        Box::pin(async move {
            let count: i64 = Script::new(TRY_ADD)
                .key(self.keys.sources())
                .arg(source)
                .arg(n)
                .arg(limit)
                .invoke_async(&mut self.conn())
                .await
                .map_err(|e| ClayError::CounterUnavailable(e.to_string()))?;
            Ok((count >= 0).then_some(count as u64))
        })
    }
}

/// The pending-row transitions the retry logic needs, whichever store keeps
/// the rows (Redis for Queue and Event, the embedded store for Direct).
pub trait PendingRows: Send + Sync {
    /// Moves a pending row's deadline (only if it is still pending).
    fn set_deadline<'a>(
        &'a self,
        row_id: &'a str,
        deadline_ms: i64,
    ) -> BoxFuture<'a, anyhow::Result<()>>;
    /// Replaces a pending row by its next attempt, only if it still holds
    /// `expected_reservation` (else a callback or another sweeper won); true
    /// again when it already is `next` (the same write, retried).
    fn replace_pending<'a>(
        &'a self,
        next: &'a PendingRow,
        deadline_ms: i64,
        expected_reservation: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<bool>>;
    /// Dead-letters a pending row; None if it was no longer pending.
    fn dead_letter_pending<'a>(
        &'a self,
        row_id: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Option<PendingRow>>>;
    /// Takes up to `limit` rows past their deadline, leasing them until
    /// `lease_until_ms` so other sweepers skip them.
    fn take_expired<'a>(
        &'a self,
        now_ms: i64,
        lease_until_ms: i64,
        limit: usize,
    ) -> BoxFuture<'a, anyhow::Result<Vec<PendingRow>>>;
    /// How many pending rows have a deadline at or before each of
    /// `cutoffs_ms` (ascending), and how many in all.
    fn deadlines_up_to<'a>(
        &'a self,
        cutoffs_ms: &'a [i64],
    ) -> BoxFuture<'a, anyhow::Result<(Vec<u64>, u64)>>;
}

/// Rows waiting for their result by how long they have waited, for the
/// `kiln_rows_pending` gauge: (upper bound, milliseconds), the last bucket
/// taking the rest.
pub const PENDING_AGE_BUCKETS: [(&str, i64); 6] = [
    ("10s", 10_000),
    ("1m", 60_000),
    ("5m", 300_000),
    ("15m", 900_000),
    ("1h", 3_600_000),
    ("older", i64::MAX),
];

/// Pending rows by age, from their deadlines: a row's deadline is its
/// attempt plus `result_timeout`, so it has waited `now + timeout − deadline`
/// (a little less for a first attempt, whose deadline also covers its wait
/// for rate).
pub async fn pending_by_age(
    rows: &dyn PendingRows,
    now_ms: i64,
    result_timeout_ms: i64,
) -> anyhow::Result<Vec<(&'static str, u64)>> {
    // Waited longer than `bound` ⇔ deadline < now + timeout − bound.
    let cutoffs: Vec<i64> = PENDING_AGE_BUCKETS[..PENDING_AGE_BUCKETS.len() - 1]
        .iter()
        .rev()
        .map(|(_, bound)| now_ms + result_timeout_ms - bound - 1)
        .collect();
    let (older_than, total) = rows.deadlines_up_to(&cutoffs).await?;
    // older_than[i]: rows older than the i-th bound, longest bound first.
    let mut older: Vec<u64> = older_than.into_iter().rev().collect();
    older.push(0);
    let mut counts = Vec::new();
    let mut younger_bucket_floor = total;
    for ((name, _), older) in PENDING_AGE_BUCKETS.iter().zip(older) {
        counts.push((*name, younger_bucket_floor.saturating_sub(older)));
        younger_bucket_floor = older;
    }
    Ok(counts)
}

/// A table's pending rows in Redis, dead-lettering to its stream.
pub struct RedisPendingRows {
    pub store: RedisStore,
    pub dead_letter: String,
}

impl PendingRows for RedisPendingRows {
    fn set_deadline<'a>(
        &'a self,
        row_id: &'a str,
        deadline_ms: i64,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move { Ok(self.store.set_deadline(row_id, deadline_ms).await?) })
    }

    fn replace_pending<'a>(
        &'a self,
        next: &'a PendingRow,
        deadline_ms: i64,
        expected_reservation: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<bool>> {
        Box::pin(async move {
            Ok(self
                .store
                .replace_pending(next, deadline_ms, expected_reservation)
                .await?)
        })
    }

    fn dead_letter_pending<'a>(
        &'a self,
        row_id: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Option<PendingRow>>> {
        Box::pin(async move {
            Ok(self
                .store
                .dead_letter_pending(&self.dead_letter, row_id, reason)
                .await?)
        })
    }

    fn take_expired<'a>(
        &'a self,
        now_ms: i64,
        lease_until_ms: i64,
        limit: usize,
    ) -> BoxFuture<'a, anyhow::Result<Vec<PendingRow>>> {
        Box::pin(async move {
            Ok(self
                .store
                .take_expired(now_ms, lease_until_ms, limit)
                .await?)
        })
    }

    fn deadlines_up_to<'a>(
        &'a self,
        cutoffs_ms: &'a [i64],
    ) -> BoxFuture<'a, anyhow::Result<(Vec<u64>, u64)>> {
        Box::pin(async move { Ok(self.store.deadlines_up_to(cutoffs_ms).await?) })
    }
}
