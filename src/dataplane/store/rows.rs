//! A table's rows in Redis as the shared [`RowStore`] and [`SourceRows`] see
//! them: results delivered to the table's sink, rows dead-lettered to its
//! stream, source entries acknowledged with the step that takes the row on.
//! Each transition is one script (`lua/`), so none half-happens; the ones a
//! timeout can leave unknown recognise their own earlier write and are run
//! again at once.

use anyhow::Result;
use async_trait::async_trait;
use redis::AsyncCommands;
use std::collections::HashMap;

use super::{PendingRow, RedisStore, SourceEntry, scripts};
use crate::dataplane::TableRuntime;
use crate::dataplane::attempt::now_ms;
use crate::dataplane::rows::{
    Callback, Incoming, Known, Lookup, OwedSettlement, RowStore, SourceRows, Stored, parse_dedupe,
    parse_owed,
};

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

pub struct RedisRows {
    pub store: RedisStore,
    /// The table's dead-letter stream.
    pub dead_letter: String,
}

#[async_trait]
impl RowStore for RedisRows {
    async fn set_deadline(&self, row_id: &str, deadline_ms: i64) -> Result<()> {
        let keys = &self.store.keys;
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(keys.deadlines()).arg("XX").arg(deadline_ms);
        Ok(zadd.arg(row_id).query_async(&mut self.store.conn()).await?)
    }

    /// Run again at once when its outcome is unknown: it recognises its own
    /// earlier write by the row's write token.
    async fn replace_pending(&self, next: &PendingRow, due: i64, expected: &str) -> Result<bool> {
        let json = serde_json::to_string(next).expect("a pending row serializes");
        let keys = &self.store.keys;
        let replaced: i64 = with_unknown_outcome_retried(|| {
            let mut invocation = scripts::REPLACE_PENDING.prepare_invoke();
            invocation
                .key(keys.pending())
                .key(keys.deadlines())
                .arg(&next.row_id)
                .arg(&json)
                .arg(due)
                .arg(expected);
            let mut connection = self.store.conn();
            async move { invocation.invoke_async(&mut connection).await }
        })
        .await?;
        Ok(replaced == 1)
    }

    async fn dead_letter_pending(&self, row_id: &str, reason: &str) -> Result<Option<PendingRow>> {
        let keys = &self.store.keys;
        let removed: Option<String> = scripts::DEAD_LETTER_PENDING
            .key(keys.pending())
            .key(keys.deadlines())
            .key(&self.dead_letter)
            .key(keys.counters())
            .arg(row_id)
            .arg(reason)
            .invoke_async(&mut self.store.conn())
            .await?;
        Ok(removed.and_then(|p| serde_json::from_str(&p).ok()))
    }

    async fn take_expired(&self, now: i64, until: i64, limit: usize) -> Result<Vec<PendingRow>> {
        let keys = &self.store.keys;
        let rows: Vec<String> = scripts::TAKE_EXPIRED
            .key(keys.deadlines())
            .key(keys.pending())
            .arg(now)
            .arg(until)
            .arg(limit)
            .invoke_async(&mut self.store.conn())
            .await?;
        Ok(rows
            .iter()
            .filter_map(|p| serde_json::from_str(p).ok())
            .collect())
    }

    /// One pipeline of ZCOUNTs.
    async fn deadlines_up_to(&self, cutoffs_ms: &[i64]) -> Result<(Vec<u64>, u64)> {
        let deadlines = self.store.keys.deadlines();
        let mut pipe = redis::pipe();
        for cutoff in cutoffs_ms {
            pipe.zcount(&deadlines, "-inf", cutoff);
        }
        pipe.zcard(&deadlines);
        let mut counts: Vec<u64> = pipe.query_async(&mut self.store.conn()).await?;
        let total = counts.pop().unwrap_or(0);
        Ok((counts, total))
    }

    /// Written to the sink stream (or the outbox, for an HTTP sink) in the
    /// same script that claims the row.
    async fn claim_callback(
        &self,
        runtime: &TableRuntime,
        callback: &Callback<'_>,
    ) -> Result<Option<PendingRow>> {
        let keys = &self.store.keys;
        let sink = crate::dataplane::sink::route(runtime, keys);
        let reported = callback.reported.map(|c| c.to_string());
        let claimed: Option<String> = scripts::CLAIM_CALLBACK
            .key(keys.pending())
            .key(keys.deadlines())
            .key(keys.dedupe())
            .key(keys.enriched_at())
            .key(keys.counters())
            .key(&sink.stream)
            .key(keys.settlements())
            .key(keys.inputs())
            .key(keys.refreshing())
            .arg(callback.row_id)
            .arg(callback.result.to_string())
            .arg(now_ms())
            .arg(sink.max_len)
            .arg(reported.unwrap_or_default())
            .arg(if sink.through_outbox { "1" } else { "0" })
            .invoke_async(&mut self.store.conn())
            .await?;
        let claimed = claimed.and_then(|p| serde_json::from_str(&p).ok());
        if claimed.is_some() && !sink.through_outbox {
            crate::metrics::dataplane().rows("delivered", "ok", 1);
        }
        Ok(claimed)
    }

    async fn owed_settlements(&self) -> Result<Vec<OwedSettlement>> {
        let settlements = self.store.keys.settlements();
        let owed: HashMap<String, String> = self.store.conn().hgetall(settlements).await?;
        Ok(owed
            .iter()
            .filter_map(|(row_id, stored)| parse_owed(row_id, stored))
            .collect())
    }

    async fn take_owed(&self, row_ids: &[&str]) -> Result<Vec<bool>> {
        let settlements = self.store.keys.settlements();
        // One round trip; each HDEL removes its field for one caller only.
        let mut pipe = redis::pipe();
        for row_id in row_ids {
            pipe.hdel(&settlements, *row_id);
        }
        let removed: Vec<u32> = pipe.query_async(&mut self.store.conn()).await?;
        Ok(removed.into_iter().map(|n| n == 1).collect())
    }
}

#[async_trait]
impl SourceRows for RedisRows {
    /// One pipeline: EXISTS of the seen marker (replayable rows), HGET of
    /// the de-dupe entry (rows with a key).
    async fn look_up(&self, rows: &[Lookup<'_>]) -> Result<Vec<Known>> {
        if rows.iter().all(|row| !row.replayable && row.key.is_none()) {
            return Ok(rows.iter().map(|_| Known::default()).collect());
        }
        let keys = &self.store.keys;
        let mut pipe = redis::pipe();
        for row in rows {
            if row.replayable {
                pipe.exists(keys.seen(row.row_id));
            }
            if let Some(key) = row.key {
                pipe.hget(keys.dedupe(), key);
            }
        }
        let answers: Vec<redis::Value> = pipe.query_async(&mut self.store.conn()).await?;
        let mut answers = answers.into_iter();
        let mut next = || answers.next().unwrap_or(redis::Value::Nil);
        let mut known = Vec::with_capacity(rows.len());
        for row in rows {
            let seen = row.replayable && redis::from_redis_value::<bool>(next())?;
            let stored = match row.key {
                Some(_) => redis::from_redis_value::<Option<String>>(next())?
                    .as_deref()
                    .and_then(parse_dedupe),
                None => None,
            };
            known.push(Known { seen, stored });
        }
        Ok(known)
    }

    async fn make_pending(
        &self,
        pending: &PendingRow,
        due: i64,
        entry: &SourceEntry,
    ) -> Result<bool> {
        let keys = &self.store.keys;
        let json = serde_json::to_string(pending).expect("a pending row serializes");
        let (source, group, id) = entry.script_parts(keys, &pending.row_id);
        let created: i64 = with_unknown_outcome_retried(|| {
            let mut invocation = scripts::MAKE_PENDING.prepare_invoke();
            invocation
                .key(keys.pending())
                .key(keys.deadlines())
                .key(keys.counters())
                .key(&source)
                .arg(&pending.row_id)
                .arg(&json)
                .arg(due)
                .arg(group)
                .arg(id);
            let mut connection = self.store.conn();
            async move { invocation.invoke_async(&mut connection).await }
        })
        .await?;
        Ok(created == 1)
    }

    async fn deliver_stored(
        &self,
        runtime: &TableRuntime,
        incoming: &Incoming<'_>,
        stored: &Stored<'_>,
    ) -> Result<()> {
        let keys = &self.store.keys;
        let sink = crate::dataplane::sink::route(runtime, keys);
        let (source, group, id) = incoming.entry.script_parts(keys, incoming.row_id);
        let () = scripts::DELIVER_STORED
            .key(&sink.stream)
            .key(keys.counters())
            .key(source)
            .arg(incoming.row_id)
            .arg(stored.key)
            .arg(stored.result)
            .arg(group)
            .arg(id)
            .arg(sink.max_len)
            .arg(incoming.row.to_string())
            .arg(if sink.through_outbox { "1" } else { "0" })
            .invoke_async(&mut self.store.conn())
            .await?;
        if !sink.through_outbox {
            crate::metrics::dataplane().rows("delivered", "ok", 1);
        }
        Ok(())
    }

    async fn dead_letter_entry(&self, incoming: &Incoming<'_>, reason: &str) -> Result<()> {
        let keys = &self.store.keys;
        let (source, group, id) = incoming.entry.script_parts(keys, incoming.row_id);
        let () = scripts::DEAD_LETTER_ENTRY
            .key(&self.dead_letter)
            .key(keys.counters())
            .key(source)
            .arg(incoming.row_id)
            .arg(reason)
            .arg(incoming.row.to_string())
            .arg(0)
            .arg(group)
            .arg(id)
            .invoke_async(&mut self.store.conn())
            .await?;
        crate::metrics::dataplane().rows("dead_lettered", reason, 1);
        Ok(())
    }
}
