//! Stream plumbing: the source stream's consumer group, the outbox the
//! sink delivers from, and the dead-letter stream (listing and replay).

use std::collections::HashMap;

use redis::AsyncCommands;
use serde_json::Value;

use super::{RedisStore, scripts};

impl RedisStore {
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
        // Both in one round trip: entries claimed while this consumer still
        // has its own are its own on the next read.
        let own_options = redis::streams::StreamReadOptions::default()
            .group(group, consumer)
            .count(count);
        let mut pipe = redis::pipe();
        pipe.xread_options(&[stream], &["0"], &own_options)
            .cmd("XAUTOCLAIM")
            .arg(stream)
            .arg(group)
            .arg(consumer)
            .arg(reclaim_idle_ms)
            .arg("0-0")
            .arg("COUNT")
            .arg(count);
        type Claimed = (String, redis::streams::StreamClaimReply, Vec<String>);
        let (own, claimed): (Option<redis::streams::StreamReadReply>, Claimed) =
            pipe.query_async(&mut self.conn()).await?;
        let own = flatten(own);
        if !own.is_empty() {
            return Ok(own);
        }
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

    /// Completes outbox entries the sink accepted; returns how many this
    /// call completed (one another receiver completed already is not
    /// counted again).
    pub async fn outbox_delivered(
        &self,
        group: &str,
        entry_ids: &[String],
    ) -> redis::RedisResult<u64> {
        scripts::OUTBOX_DELIVERED
            .key(self.keys.outbox())
            .key(self.keys.counters())
            .arg(group)
            .arg(entry_ids)
            .invoke_async(&mut self.conn())
            .await
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
        let done: i64 = scripts::OUTBOX_DEAD_LETTER
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
        let moved: i64 = scripts::REPLAY
            .key(dead_letter)
            .key(source)
            .key(self.keys.counters())
            .arg(entry_id)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(moved == 1)
    }
}
