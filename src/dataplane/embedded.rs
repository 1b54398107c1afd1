//! The Direct tier's state store: one redb file on the receiver's volume.
//! It keeps what the Redis store keeps for the other tiers (pending rows
//! with deadlines, the de-dupe index, settlements owed, counters, webhook
//! source counts) plus each row's final state for `GET /v1/rows/{id}`. Every
//! transition is one write transaction, committed durably before it is
//! acknowledged, so a restarted receiver still matches late callbacks.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::store::{PendingRow, PendingRows};
use crate::clay::ClayError;
use crate::clay::rotation::{SubmissionCounter, added_within};

/// row id → [`Waiting`] (JSON).
const PENDING: TableDefinition<&str, &str> = TableDefinition::new("pending");
/// key → "enriched at ms|result JSON".
const DEDUPE: TableDefinition<&str, &str> = TableDefinition::new("dedupe");
/// row id → [`RowState`] (JSON), for rows that reached a terminal state.
const ROWS: TableDefinition<&str, &str> = TableDefinition::new("rows");
/// row id → "reported cost|pending row JSON": settlements not yet confirmed.
const SETTLEMENTS: TableDefinition<&str, &str> = TableDefinition::new("settlements");
/// row id → [`Outgoing`] (JSON): results owed to the HTTP sink.
const OUTBOX: TableDefinition<&str, &str> = TableDefinition::new("outbox");
/// row id → [`SinkFailure`] (JSON): results the HTTP sink would not take.
const SINK_FAILURES: TableDefinition<&str, &str> = TableDefinition::new("sink-failures");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const SOURCES: TableDefinition<&str, u64> = TableDefinition::new("sources");

#[derive(Serialize, Deserialize)]
struct Waiting {
    pending: PendingRow,
    deadline_ms: i64,
    /// The routine run computing it (tables enriched through a routine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    run_id: Option<String>,
}

/// A result owed to the HTTP sink.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Outgoing {
    pub row_id: String,
    pub result: Value,
    pub row: Value,
}

/// A result the HTTP sink refused or kept failing on: the sink's dead letter.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SinkFailure {
    pub reason: String,
    pub detail: String,
    pub attempts: u32,
    pub row: Value,
}

/// Where a row ended.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum RowState {
    Enriched { result: Value, at_ms: i64 },
    DeadLettered { reason: String, row: Value },
}

pub type StoreResult<T> = Result<T, redb::Error>;

#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("store records serialize")
}

fn bump(txn: &redb::WriteTransaction, counter: &str) -> StoreResult<()> {
    let mut counters = txn.open_table(COUNTERS)?;
    let current = counters.get(counter)?.map(|v| v.value()).unwrap_or(0);
    counters.insert(counter, current + 1)?;
    Ok(())
}

impl EmbeddedStore {
    pub fn open(path: &Path) -> StoreResult<Self> {
        let db = Database::create(path)?;
        // Create every table up front so readers never see a missing one.
        let txn = db.begin_write()?;
        txn.open_table(PENDING)?;
        txn.open_table(DEDUPE)?;
        txn.open_table(ROWS)?;
        txn.open_table(OUTBOX)?;
        txn.open_table(SINK_FAILURES)?;
        txn.open_table(SETTLEMENTS)?;
        txn.open_table(COUNTERS)?;
        txn.open_table(SOURCES)?;
        txn.commit()?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Runs a store operation off the async runtime (commits fsync).
    async fn blocking<T: Send + 'static>(
        &self,
        operation: impl FnOnce(&Database) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || operation(&db))
            .await
            .expect("store operations do not panic")
    }

    /// The stored result for `key` and when it was enriched (ms), if any.
    pub async fn dedupe_lookup(&self, key: &str) -> StoreResult<Option<(i64, String)>> {
        let key = key.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(DEDUPE)?;
            Ok(table.get(key.as_str())?.and_then(|v| {
                let (at, result) = v.value().split_once('|')?;
                Some((at.parse().ok()?, result.to_string()))
            }))
        })
        .await
    }

    pub async fn count(&self, counter: &'static str) -> StoreResult<()> {
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            bump(&txn, counter)?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    /// Records a row as pending until `deadline_ms` (idempotent per row id).
    pub async fn make_pending(&self, pending: &PendingRow, deadline_ms: i64) -> StoreResult<()> {
        let waiting = Waiting {
            pending: pending.clone(),
            deadline_ms,
            run_id: None,
        };
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(PENDING)?;
                let id = waiting.pending.row_id.clone();
                if table.get(id.as_str())?.is_none() {
                    table.insert(id.as_str(), json(&waiting).as_str())?;
                    bump(&txn, "submitted")?;
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }

    /// A callback's result: the pending row becomes enriched, the de-dupe
    /// index, the owed settlement and (`to_outbox`, with an HTTP sink) the
    /// owed delivery are written, all in one transaction. None when the row
    /// is not pending (a duplicate or late callback).
    pub async fn claim_callback(
        &self,
        row_id: &str,
        result: &Value,
        now_ms: i64,
        reported_cost: Option<f64>,
        to_outbox: bool,
    ) -> StoreResult<Option<PendingRow>> {
        let (row_id, result) = (row_id.to_string(), result.clone());
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            let claimed = {
                let mut pending = txn.open_table(PENDING)?;
                let removed = pending
                    .remove(row_id.as_str())?
                    .map(|v| v.value().to_string());
                removed.and_then(|w| serde_json::from_str::<Waiting>(&w).ok())
            };
            let Some(waiting) = claimed else {
                bump(&txn, "duplicateCallbacks")?;
                txn.commit()?;
                return Ok(None);
            };
            let p = &waiting.pending;
            txn.open_table(DEDUPE)?
                .insert(p.key.as_str(), format!("{now_ms}|{result}").as_str())?;
            let state = RowState::Enriched {
                result: result.clone(),
                at_ms: now_ms,
            };
            txn.open_table(ROWS)?
                .insert(row_id.as_str(), json(&state).as_str())?;
            let cost = reported_cost.map(|c| c.to_string()).unwrap_or_default();
            txn.open_table(SETTLEMENTS)?
                .insert(row_id.as_str(), format!("{cost}|{}", json(p)).as_str())?;
            bump(&txn, "enriched")?;
            if to_outbox {
                let outgoing = Outgoing {
                    row_id: row_id.clone(),
                    result: result.clone(),
                    row: p.row.clone(),
                };
                txn.open_table(OUTBOX)?
                    .insert(row_id.as_str(), json(&outgoing).as_str())?;
            } else {
                bump(&txn, "delivered")?;
            }
            txn.commit()?;
            Ok(Some(waiting.pending))
        })
        .await
    }

    /// A row's terminal state, or None while it is pending or unknown.
    pub async fn row_state(&self, row_id: &str) -> StoreResult<Option<RowState>> {
        let row_id = row_id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(ROWS)?;
            Ok(table
                .get(row_id.as_str())?
                .and_then(|v| serde_json::from_str(v.value()).ok()))
        })
        .await
    }

    pub async fn is_pending(&self, row_id: &str) -> StoreResult<bool> {
        let row_id = row_id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            Ok(txn.open_table(PENDING)?.get(row_id.as_str())?.is_some())
        })
        .await
    }

    /// Up to `limit` results owed to the HTTP sink.
    pub async fn outbox(&self, limit: usize) -> StoreResult<Vec<Outgoing>> {
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(OUTBOX)?;
            let mut owed = Vec::new();
            for entry in table.iter()?.take(limit) {
                let (_, value) = entry?;
                if let Ok(outgoing) = serde_json::from_str(value.value()) {
                    owed.push(outgoing);
                }
            }
            Ok(owed)
        })
        .await
    }

    /// Completes an owed delivery: accepted by the sink, or (`failure`) its dead letter.
    pub async fn outbox_done(&self, row_id: &str, failure: Option<SinkFailure>) -> StoreResult<()> {
        let row_id = row_id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            let removed = txn.open_table(OUTBOX)?.remove(row_id.as_str())?.is_some();
            if removed {
                match failure {
                    None => bump(&txn, "delivered")?,
                    Some(failure) => {
                        txn.open_table(SINK_FAILURES)?
                            .insert(row_id.as_str(), json(&failure).as_str())?;
                        bump(&txn, "deadLettered")?;
                    }
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }

    /// The sink's dead letter for a row, if it has one.
    pub async fn sink_failure(&self, row_id: &str) -> StoreResult<Option<SinkFailure>> {
        let row_id = row_id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(SINK_FAILURES)?;
            Ok(table
                .get(row_id.as_str())?
                .and_then(|v| serde_json::from_str(v.value()).ok()))
        })
        .await
    }

    /// Every row still waiting for its result, with its routine run if any.
    pub async fn pending_rows(&self) -> StoreResult<Vec<(PendingRow, Option<String>)>> {
        self.blocking(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(PENDING)?;
            let mut rows = Vec::new();
            for entry in table.iter()? {
                let (_, value) = entry?;
                if let Ok(waiting) = serde_json::from_str::<Waiting>(value.value()) {
                    rows.push((waiting.pending, waiting.run_id));
                }
            }
            Ok(rows)
        })
        .await
    }

    /// Marks (with an empty run id) that a routine run is about to start for
    /// a row, before asking Clay: a process that dies before recording the
    /// run id leaves this mark, and its successor knows the outcome is unknown.
    pub async fn mark_started(&self, row_id: &str) -> StoreResult<()> {
        self.set_run(row_id, "").await
    }

    /// Records the routine run computing a pending row, so a restarted
    /// receiver polls that run instead of starting another.
    pub async fn set_run(&self, row_id: &str, run_id: &str) -> StoreResult<()> {
        let (row_id, run_id) = (row_id.to_string(), run_id.to_string());
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(PENDING)?;
                let current = table
                    .get(row_id.as_str())?
                    .and_then(|v| serde_json::from_str::<Waiting>(v.value()).ok());
                if let Some(mut waiting) = current {
                    waiting.run_id = Some(run_id);
                    table.insert(row_id.as_str(), json(&waiting).as_str())?;
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }

    /// Settlements recorded by deliveries and not yet taken by a receiver.
    pub async fn owed_settlements(&self) -> StoreResult<Vec<(String, Option<f64>, PendingRow)>> {
        self.blocking(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(SETTLEMENTS)?;
            let mut owed = Vec::new();
            for entry in table.iter()? {
                let (row_id, value) = entry?;
                if let Some((cost, pending)) = value.value().split_once('|')
                    && let Ok(pending) = serde_json::from_str(pending)
                {
                    owed.push((row_id.value().to_string(), cost.parse().ok(), pending));
                }
            }
            Ok(owed)
        })
        .await
    }

    /// Takes a delivery's owed settlement; true for the one caller that did.
    pub async fn take_owed(&self, row_id: &str) -> StoreResult<bool> {
        let row_id = row_id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            let removed = txn
                .open_table(SETTLEMENTS)?
                .remove(row_id.as_str())?
                .is_some();
            txn.commit()?;
            Ok(removed)
        })
        .await
    }

    pub async fn counters(&self) -> StoreResult<HashMap<String, u64>> {
        self.blocking(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(COUNTERS)?;
            let mut counters = HashMap::new();
            for entry in table.iter()? {
                let (name, value) = entry?;
                counters.insert(name.value().to_string(), value.value());
            }
            Ok(counters)
        })
        .await
    }
}

impl PendingRows for EmbeddedStore {
    fn set_deadline<'a>(
        &'a self,
        row_id: &'a str,
        deadline_ms: i64,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        let row_id = row_id.to_string();
        Box::pin(async move {
            self.blocking(move |db| {
                let txn = db.begin_write()?;
                {
                    let mut table = txn.open_table(PENDING)?;
                    let current = table.get(row_id.as_str())?.map(|v| v.value().to_string());
                    if let Some(mut waiting) =
                        current.and_then(|w| serde_json::from_str::<Waiting>(&w).ok())
                    {
                        waiting.deadline_ms = deadline_ms;
                        table.insert(row_id.as_str(), json(&waiting).as_str())?;
                    }
                }
                txn.commit()?;
                Ok(())
            })
            .await?;
            Ok(())
        })
    }

    fn replace_pending<'a>(
        &'a self,
        next: &'a PendingRow,
        deadline_ms: i64,
        expected_reservation: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<bool>> {
        let (next, expected) = (next.clone(), expected_reservation.to_string());
        Box::pin(async move {
            Ok(self
                .blocking(move |db| {
                    let txn = db.begin_write()?;
                    let replaced = {
                        let mut table = txn.open_table(PENDING)?;
                        let current = table
                            .get(next.row_id.as_str())?
                            .and_then(|v| serde_json::from_str::<Waiting>(v.value()).ok());
                        match current {
                            // Already this very write: the same answer again.
                            Some(w) if w.pending == next => true,
                            Some(w) if w.pending.reservation == expected => {
                                let waiting = Waiting {
                                    pending: next.clone(),
                                    deadline_ms,
                                    run_id: None,
                                };
                                table.insert(next.row_id.as_str(), json(&waiting).as_str())?;
                                true
                            }
                            _ => false,
                        }
                    };
                    txn.commit()?;
                    Ok(replaced)
                })
                .await?)
        })
    }

    fn dead_letter_pending<'a>(
        &'a self,
        row_id: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Option<PendingRow>>> {
        let (row_id, reason) = (row_id.to_string(), reason.to_string());
        Box::pin(async move {
            Ok(self
                .blocking(move |db| {
                    let txn = db.begin_write()?;
                    let removed = txn
                        .open_table(PENDING)?
                        .remove(row_id.as_str())?
                        .and_then(|v| serde_json::from_str::<Waiting>(v.value()).ok());
                    if let Some(waiting) = &removed {
                        let state = RowState::DeadLettered {
                            reason,
                            row: waiting.pending.row.clone(),
                        };
                        txn.open_table(ROWS)?
                            .insert(row_id.as_str(), json(&state).as_str())?;
                        bump(&txn, "deadLettered")?;
                    }
                    txn.commit()?;
                    Ok(removed.map(|w| w.pending))
                })
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
                .blocking(move |db| {
                    let txn = db.begin_write()?;
                    let expired = {
                        let mut table = txn.open_table(PENDING)?;
                        let mut expired = Vec::new();
                        for entry in table.iter()? {
                            let (_, value) = entry?;
                            if let Ok(w) = serde_json::from_str::<Waiting>(value.value())
                                && w.deadline_ms <= now_ms
                                && expired.len() < limit
                            {
                                expired.push(w);
                            }
                        }
                        // Leased, so a sweep in progress is not repeated.
                        for w in &mut expired {
                            w.deadline_ms = lease_until_ms;
                            table.insert(w.pending.row_id.as_str(), json(w).as_str())?;
                        }
                        expired
                    };
                    txn.commit()?;
                    Ok(expired.into_iter().map(|w| w.pending).collect())
                })
                .await?)
        })
    }

    fn deadlines_up_to<'a>(
        &'a self,
        cutoffs_ms: &'a [i64],
    ) -> BoxFuture<'a, anyhow::Result<(Vec<u64>, u64)>> {
        let cutoffs = cutoffs_ms.to_vec();
        Box::pin(async move {
            Ok(self
                .blocking(move |db| {
                    let txn = db.begin_read()?;
                    let table = txn.open_table(PENDING)?;
                    let mut counts = vec![0; cutoffs.len()];
                    let mut total = 0;
                    for entry in table.iter()? {
                        let (_, value) = entry?;
                        let Ok(w) = serde_json::from_str::<Waiting>(value.value()) else {
                            continue;
                        };
                        total += 1;
                        for (count, cutoff) in counts.iter_mut().zip(&cutoffs) {
                            *count += u64::from(w.deadline_ms <= *cutoff);
                        }
                    }
                    Ok((counts, total))
                })
                .await?)
        })
    }
}

impl SubmissionCounter for EmbeddedStore {
    fn try_add<'a>(
        &'a self,
        source: &'a str,
        n: u64,
        limit: u64,
    ) -> BoxFuture<'a, Result<Option<u64>, ClayError>> {
        let source = source.to_string();
        Box::pin(async move {
            self.blocking(move |db| {
                let txn = db.begin_write()?;
                let added = {
                    let mut table = txn.open_table(SOURCES)?;
                    let count = table.get(source.as_str())?.map(|v| v.value()).unwrap_or(0);
                    let added = added_within(count, n, limit);
                    if let Some(total) = added {
                        table.insert(source.as_str(), total)?;
                    }
                    added
                };
                txn.commit()?;
                Ok(added)
            })
            .await
            .map_err(|e| ClayError::CounterUnavailable(e.to_string()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pending(id: &str, key: &str, reservation: &str) -> PendingRow {
        PendingRow {
            row_id: id.into(),
            key: key.into(),
            row: json!({"domain": key}),
            attempt: 1,
            reservation: reservation.into(),
            reserved_credits: 12.0,
            reserved_actions: 0,
            period: String::new(),
            write_token: "t1".into(),
            attempted_at_ms: 0,
        }
    }

    #[tokio::test]
    async fn pending_rows_are_counted_by_how_long_they_waited() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("kiln.redb")).unwrap();
        let (now, timeout) = (10_000_000, 600_000);
        // Waited 5 s, 30 s, 30 s, 2 h: the deadline is the attempt plus the timeout.
        for (id, waited) in [("a", 5_000), ("b", 30_000), ("c", 30_000), ("d", 7_200_000)] {
            let deadline = now - waited + timeout;
            store
                .make_pending(&pending(id, id, "x"), deadline)
                .await
                .unwrap();
        }
        let ages = crate::dataplane::store::pending_by_age(&store, now, timeout)
            .await
            .unwrap();
        assert_eq!(
            ages,
            vec![
                ("10s", 1),
                ("1m", 2),
                ("5m", 0),
                ("15m", 0),
                ("1h", 0),
                ("older", 1)
            ]
        );
    }

    #[tokio::test]
    async fn a_row_is_claimed_once_and_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.redb");
        let store = EmbeddedStore::open(&path).unwrap();
        store
            .make_pending(&pending("r1", "acme.com", "r1-a1"), 1_000)
            .await
            .unwrap();
        drop(store);

        // A restarted receiver still matches the callback.
        let store = EmbeddedStore::open(&path).unwrap();
        assert!(store.is_pending("r1").await.unwrap());
        let result = json!({"kiln_row_id": "r1", "employees": 40});
        let claimed = store
            .claim_callback("r1", &result, 5_000, Some(3.0), false)
            .await
            .unwrap();
        assert_eq!(claimed.unwrap().key, "acme.com");
        assert!(
            store
                .claim_callback("r1", &result, 6_000, Some(3.0), false)
                .await
                .unwrap()
                .is_none(),
            "a duplicate callback claims nothing"
        );
        assert_eq!(
            store.dedupe_lookup("acme.com").await.unwrap(),
            Some((5_000, result.to_string()))
        );
        assert_eq!(
            store.row_state("r1").await.unwrap(),
            Some(RowState::Enriched {
                result,
                at_ms: 5_000
            })
        );
        let owed = store.owed_settlements().await.unwrap();
        assert_eq!((owed[0].0.as_str(), owed[0].1), ("r1", Some(3.0)));
        assert!(store.take_owed("r1").await.unwrap());
        assert!(!store.take_owed("r1").await.unwrap(), "taken once");
        assert!(store.owed_settlements().await.unwrap().is_empty());
        let counters = store.counters().await.unwrap();
        assert_eq!(
            (
                counters["submitted"],
                counters["enriched"],
                counters["duplicateCallbacks"]
            ),
            (1, 1, 1)
        );
    }

    #[tokio::test]
    async fn an_owed_delivery_is_kept_until_the_sink_took_it_or_dead_lettered() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("kiln.redb")).unwrap();
        for id in ["r1", "r2"] {
            store
                .make_pending(&pending(id, &format!("{id}.com"), "x"), 1_000)
                .await
                .unwrap();
            store
                .claim_callback(id, &json!({"kiln_row_id": id}), 2_000, None, true)
                .await
                .unwrap();
        }
        let owed = store.outbox(10).await.unwrap();
        assert_eq!(owed.len(), 2);
        assert_eq!(owed[0].row, json!({"domain": "r1.com"}));
        store.outbox_done("r1", None).await.unwrap();
        let failure = SinkFailure {
            reason: "SinkFailed".into(),
            detail: "the sink answered HTTP 400".into(),
            attempts: 1,
            row: owed[1].row.clone(),
        };
        store
            .outbox_done("r2", Some(failure.clone()))
            .await
            .unwrap();
        // Completing twice (a crash after the sink answered) counts once.
        store.outbox_done("r1", None).await.unwrap();
        assert!(store.outbox(10).await.unwrap().is_empty());
        assert_eq!(store.sink_failure("r2").await.unwrap(), Some(failure));
        let counters = store.counters().await.unwrap();
        assert_eq!((counters["delivered"], counters["deadLettered"]), (1, 1));
    }

    #[tokio::test]
    async fn a_routine_run_is_remembered_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.redb");
        let store = EmbeddedStore::open(&path).unwrap();
        for id in ["started", "unrecorded", "waiting"] {
            store
                .make_pending(&pending(id, &format!("{id}.com"), "x"), 1_000)
                .await
                .unwrap();
        }
        store.mark_started("started").await.unwrap();
        store.set_run("started", "run_1").await.unwrap();
        store.mark_started("unrecorded").await.unwrap();
        drop(store);
        let store = EmbeddedStore::open(&path).unwrap();
        let mut runs: Vec<(String, Option<String>)> = store
            .pending_rows()
            .await
            .unwrap()
            .into_iter()
            .map(|(p, run)| (p.row_id, run))
            .collect();
        runs.sort();
        assert_eq!(
            runs,
            vec![
                ("started".to_string(), Some("run_1".to_string())),
                ("unrecorded".to_string(), Some(String::new())),
                ("waiting".to_string(), None),
            ]
        );
    }

    #[tokio::test]
    async fn expired_rows_are_leased_replaced_only_by_their_owner_and_dead_lettered() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("kiln.redb")).unwrap();
        store
            .make_pending(&pending("r1", "a.com", "r1-a1"), 100)
            .await
            .unwrap();
        store
            .make_pending(&pending("r2", "b.com", "r2-a1"), 10_000)
            .await
            .unwrap();
        let expired = store.take_expired(500, 2_000, 10).await.unwrap();
        assert_eq!(expired.len(), 1);
        assert!(
            store.take_expired(500, 2_000, 10).await.unwrap().is_empty(),
            "leased rows are not taken twice"
        );
        let next = PendingRow {
            attempt: 2,
            reservation: "r1-a2".into(),
            ..expired[0].clone()
        };
        assert!(!store.replace_pending(&next, 9_000, "stale").await.unwrap());
        assert!(store.replace_pending(&next, 9_000, "r1-a1").await.unwrap());
        assert!(
            store.replace_pending(&next, 9_000, "r1-a1").await.unwrap(),
            "the same write, retried, is answered the same"
        );
        let stranger = PendingRow {
            write_token: "t2".into(),
            ..next.clone()
        };
        assert!(
            !store
                .replace_pending(&stranger, 9_000, "r1-a1")
                .await
                .unwrap(),
            "another process's write of the same attempt loses"
        );
        let dead = store
            .dead_letter_pending("r1", "ResultTimeout")
            .await
            .unwrap();
        assert_eq!(dead.unwrap().attempt, 2);
        assert!(matches!(
            store.row_state("r1").await.unwrap(),
            Some(RowState::DeadLettered { reason, .. }) if reason == "ResultTimeout"
        ));
    }
}
