//! Pending rows, whichever store holds them (Redis for Queue and Event, the
//! embedded store for Direct): what the sweeper needs to retry or
//! dead-letter rows whose result never came, and to count them by age.

use futures::future::BoxFuture;

use super::{PendingRow, RedisStore};

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
