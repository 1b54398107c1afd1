//! One interface over the row stores (Redis for Queue and Event, the
//! embedded store for Direct): a row's way from its first attempt to its
//! terminal state, as the attempt logic, the sweeper and the callback
//! endpoint see it. What only one tier has (source streams, the Direct
//! tier's outbox and row states) stays on its store.
//!
//! Stored records are written in one format whichever store holds them
//! (Lua or Rust); their parsers are here.

use anyhow::Result;
use async_trait::async_trait;
use serde_json::Value;

use super::TableRuntime;
use super::store::{PendingRow, SourceEntry};

/// A delivered row whose credits are not settled yet.
#[derive(Clone, Debug, PartialEq)]
pub struct OwedSettlement {
    pub row_id: String,
    /// The cost the callback reported, if it reported one.
    pub reported: Option<f64>,
    /// The row as it was pending: what was reserved for it, and when.
    pub pending: PendingRow,
}

/// A callback's content, as the store records it.
pub struct Callback<'a> {
    pub row_id: &'a str,
    pub result: &'a Value,
    /// The cost the result reported, if it reported one.
    pub reported: Option<f64>,
}

/// A row's transitions, whichever store keeps it.
#[async_trait]
pub trait RowStore: Send + Sync {
    /// Moves a pending row's deadline (only if it is still pending).
    async fn set_deadline(&self, row_id: &str, deadline_ms: i64) -> Result<()>;

    /// Replaces a pending row by its next attempt, due at `due` (ms), only if
    /// it still holds the reservation `expected` (else a callback or another
    /// sweeper won); true again when it already is `next` (the same write,
    /// retried).
    async fn replace_pending(&self, next: &PendingRow, due: i64, expected: &str) -> Result<bool>;

    /// Dead-letters a pending row with `reason`; None if it was no longer
    /// pending.
    async fn dead_letter_pending(&self, row_id: &str, reason: &str) -> Result<Option<PendingRow>>;

    /// Takes up to `limit` rows past their deadline, leasing them until
    /// `until` (ms) so other sweepers skip them; `now` is in ms too.
    async fn take_expired(&self, now: i64, until: i64, limit: usize) -> Result<Vec<PendingRow>>;

    /// How many pending rows have a deadline at or before each of
    /// `cutoffs_ms` (ascending), and how many in all.
    async fn deadlines_up_to(&self, cutoffs_ms: &[i64]) -> Result<(Vec<u64>, u64)>;

    /// A callback's result: claims the pending row, records the result in
    /// the de-dupe index, the settlement it owes, and hands the result to
    /// the table's sink, all in one step. None when the row is not pending
    /// (a duplicate or a late callback): nothing is delivered twice.
    async fn claim_callback(
        &self,
        runtime: &TableRuntime,
        callback: &Callback<'_>,
    ) -> Result<Option<PendingRow>>;

    /// Settlements recorded by deliveries and not yet taken by a receiver.
    async fn owed_settlements(&self) -> Result<Vec<OwedSettlement>>;

    /// Takes deliveries' owed settlements: for each row, true for the one
    /// caller that took it.
    async fn take_owed(&self, row_ids: &[&str]) -> Result<Vec<bool>>;
}

/// A row read from a source (a Redis Stream entry or a Kafka record) that
/// has not become pending yet.
pub struct Incoming<'a> {
    pub row_id: &'a str,
    pub row: &'a Value,
    /// Acknowledged in the same step as whatever becomes of the row.
    pub entry: &'a SourceEntry,
}

/// A result the de-dupe index holds for a row's key.
pub struct Stored<'a> {
    pub key: &'a str,
    pub result: &'a str,
}

/// What a worker asks the store of a row read from a source.
pub struct Lookup<'a> {
    pub row_id: &'a str,
    /// The key whose de-dupe entry to read (None: not to be de-duplicated).
    pub key: Option<&'a str>,
    /// Whether the row may have been handled before: sources that replay
    /// records (Kafka) are asked; a stream entry is read until acknowledged.
    pub replayable: bool,
}

/// What the store knows of a row read from a source.
#[derive(Debug, Default, PartialEq)]
pub struct Known {
    /// Handled before: a replayed record.
    pub seen: bool,
    /// The de-dupe entry of its key: when enriched (ms), and the result.
    pub stored: Option<(i64, String)>,
}

/// The first steps of a row read from a source (tiers Queue and Event):
/// each acknowledges the source entry in the same step, so a crash never
/// loses a row nor handles it twice.
#[async_trait]
pub trait SourceRows: RowStore {
    /// What the store knows of each of a batch of rows, in one round trip.
    async fn look_up(&self, rows: &[Lookup<'_>]) -> Result<Vec<Known>>;

    /// Makes the row pending until `due` (ms); false when it already was
    /// (a replay), which changes nothing.
    async fn make_pending(
        &self,
        pending: &PendingRow,
        due: i64,
        entry: &SourceEntry,
    ) -> Result<bool>;

    /// Delivers the result stored for the row's key instead of enriching
    /// the row again.
    async fn deliver_stored(
        &self,
        runtime: &TableRuntime,
        incoming: &Incoming<'_>,
        stored: &Stored<'_>,
    ) -> Result<()>;

    /// Dead-letters a row that cannot be enriched.
    async fn dead_letter_entry(&self, incoming: &Incoming<'_>, reason: &str) -> Result<()>;
}

/// A de-dupe entry, stored as `<enriched at ms>|<result JSON>`.
pub fn parse_dedupe(stored: &str) -> Option<(i64, String)> {
    let (at, result) = stored.split_once('|')?;
    Some((at.parse().ok()?, result.to_string()))
}

/// An owed settlement, stored as `<reported cost or nothing>|<pending row JSON>`.
pub fn parse_owed(row_id: &str, stored: &str) -> Option<OwedSettlement> {
    let (cost, pending) = stored.split_once('|')?;
    Some(OwedSettlement {
        row_id: row_id.to_string(),
        reported: cost.parse().ok(),
        pending: serde_json::from_str(pending).ok()?,
    })
}

/// The stored form [`parse_owed`] reads.
pub fn format_owed(reported: Option<f64>, pending: &PendingRow) -> String {
    let cost = reported.map(|c| c.to_string()).unwrap_or_default();
    let pending = serde_json::to_string(pending).expect("pending rows serialize");
    format!("{cost}|{pending}")
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
    rows: &dyn RowStore,
    now_ms: i64,
    result_timeout_ms: i64,
) -> Result<Vec<(&'static str, u64)>> {
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

#[cfg(test)]
pub mod memory;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stored_records_read_back_as_written() {
        let pending = memory::pending("r1", "k1", "r1-a1");
        let owed = parse_owed("r1", &format_owed(Some(1.5), &pending)).unwrap();
        assert_eq!(owed.reported, Some(1.5));
        assert_eq!(owed.pending, pending);
        let unreported = parse_owed("r1", &format_owed(None, &pending)).unwrap();
        assert_eq!(unreported.reported, None);
        assert_eq!(parse_owed("r1", "no separator"), None);

        let result = json!({"email": "a|b@example.com"}).to_string();
        assert_eq!(
            parse_dedupe(&format!("1700|{result}")),
            Some((1700, result.clone()))
        );
        assert_eq!(parse_dedupe(&format!("soon|{result}")), None);
    }
}
