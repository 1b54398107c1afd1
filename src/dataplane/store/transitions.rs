//! A row's transitions: pending with a deadline, claimed by its callback and
//! delivered, retried, or dead-lettered. Each is one script, so none
//! half-happens; the ones a timeout can leave unknown recognise their own
//! earlier write and are run again at once.

use std::collections::HashMap;

use redis::AsyncCommands;
use serde_json::Value;

use super::{PendingRow, RedisStore, SinkRoute, SourceEntry, scripts};

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

impl RedisStore {
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
            let mut invocation = scripts::MAKE_PENDING.prepare_invoke();
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
        let claimed: Option<String> = scripts::CLAIM_CALLBACK
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
        scripts::DELIVER_STORED
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

    /// Dead-letters a pending row; None if it was no longer pending.
    pub async fn dead_letter_pending(
        &self,
        dead_letter: &str,
        row_id: &str,
        reason: &str,
    ) -> redis::RedisResult<Option<PendingRow>> {
        let removed: Option<String> = scripts::DEAD_LETTER_PENDING
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
        let rows: Vec<String> = scripts::TAKE_EXPIRED
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
            let mut invocation = scripts::REPLACE_PENDING.prepare_invoke();
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
}
