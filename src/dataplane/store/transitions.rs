//! A row's transitions: pending with a deadline, claimed by its callback and
//! delivered, retried, or dead-lettered. Each is one script, so none
//! half-happens; the ones a timeout can leave unknown recognise their own
//! earlier write and are run again at once.

use redis::AsyncCommands;
use serde_json::Value;

use super::{PendingRow, RedisStore, SinkRoute, SourceEntry, scripts};

/// Runs a store step whose outcome a timeout or dropped connection leaves
/// unknown, again at once (up to three times): the step recognises its own
/// earlier write, so a slow success is not taken for a failure.
pub(super) async fn with_unknown_outcome_retried<T, F, Fut>(mut step: F) -> redis::RedisResult<T>
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
}
