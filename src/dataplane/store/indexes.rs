//! Indexes and counters: the de-duplication index, the stale index refresh
//! runs claim from, the table's counters and each webhook source's
//! submissions against Clay's cap.

use std::collections::HashMap;

use redis::AsyncCommands;
use serde_json::Value;

use async_trait::async_trait;

use super::{PendingRow, RedisStore, now_ms, scripts};
use crate::clay::ClayError;
use crate::clay::rotation::SubmissionCounter;

impl RedisStore {
    /// How many keys were last enriched before `stale_before_ms`.
    pub async fn count_stale(
        &self,
        stale_before_ms: i64,
        lease_ms: i64,
    ) -> redis::RedisResult<u64> {
        scripts::COUNT_STALE
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
        let flat: Vec<String> = scripts::CLAIM_STALE
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

    /// The table's counters.
    pub async fn counters(&self) -> redis::RedisResult<HashMap<String, i64>> {
        self.conn().hgetall(self.keys.counters()).await
    }

    /// Rows currently pending.
    pub async fn pending_count(&self) -> redis::RedisResult<u64> {
        self.conn().hlen(self.keys.pending()).await
    }
}

#[async_trait]
impl SubmissionCounter for RedisStore {
    async fn try_add(&self, source: &str, n: u64, limit: u64) -> Result<Option<u64>, ClayError> {
        let count: i64 = scripts::TRY_ADD
            .key(self.keys.sources())
            .arg(source)
            .arg(n)
            .arg(limit)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| ClayError::CounterUnavailable(e.to_string()))?;
        Ok((count >= 0).then_some(count as u64))
    }
}
