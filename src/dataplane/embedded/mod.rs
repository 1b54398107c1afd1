//! The Direct tier's state store: one redb file on the receiver's volume.
//! It keeps what the Redis store keeps for the other tiers (pending rows
//! with deadlines, the de-dupe index, settlements owed, counters, webhook
//! source counts) plus each row's final state for `GET /v1/rows/{id}`. Every
//! transition is one write transaction, committed durably before it is
//! acknowledged, so a restarted receiver still matches late callbacks.

mod rows;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Notify;

use super::rows::format_owed;
use super::store::PendingRow;
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
    /// Who waits on what this store changes, in this process.
    pub waiters: Arc<Waiters>,
}

/// Woken by the store: whoever waits on a row's end (a Direct caller), and
/// the outbox when a result is owed to the HTTP sink.
#[derive(Default)]
pub struct Waiters {
    rows: Mutex<HashMap<String, Arc<Notify>>>,
    pub outbox: Notify,
}

impl Waiters {
    /// What wakes when `row_id` is enriched or dead-lettered.
    pub fn row(&self, row_id: &str) -> Arc<Notify> {
        let mut rows = self.rows.lock().unwrap();
        rows.entry(row_id.to_string()).or_default().clone()
    }

    /// Nobody waits on `row_id` any more.
    pub fn forget(&self, row_id: &str) {
        self.rows.lock().unwrap().remove(row_id);
    }

    fn finished(&self, row_id: &str) {
        if let Some(notify) = self.rows.lock().unwrap().get(row_id) {
            notify.notify_one();
        }
    }
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
        Ok(Self {
            db: Arc::new(db),
            waiters: Arc::default(),
        })
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
    pub async fn claim_result(
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
            txn.open_table(SETTLEMENTS)?
                .insert(row_id.as_str(), format_owed(reported_cost, p).as_str())?;
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
        self.record(ROWS, row_id).await
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
        self.record(SINK_FAILURES, row_id).await
    }

    /// A row's JSON record in `table`, if it has one.
    async fn record<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        table: TableDefinition<'static, &'static str, &'static str>,
        row_id: &str,
    ) -> StoreResult<Option<T>> {
        let row_id = row_id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(table)?;
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

#[async_trait]
impl SubmissionCounter for EmbeddedStore {
    async fn try_add(&self, source: &str, n: u64, limit: u64) -> Result<Option<u64>, ClayError> {
        let source = source.to_string();
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
    }
}
