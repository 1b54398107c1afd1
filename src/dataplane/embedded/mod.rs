//! The Direct tier's state store: one redb file on the receiver's volume.
//! It keeps what the Redis store keeps for the other tiers (pending rows
//! with deadlines, the de-dupe index, settlements owed, counters, webhook
//! source counts) plus each row's final state for `GET /v1/rows/{id}`. Every
//! transition is committed durably before it is acknowledged, so a
//! restarted receiver still matches late callbacks. Transitions made at the
//! same time share one transaction and one fsync (group commit).

mod rows;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{Notify, mpsc, oneshot};

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
    /// The queue of the thread that commits writes.
    writes: mpsc::UnboundedSender<Box<dyn QueuedWrite>>,
}

/// Writes one group commit takes at most.
const MAX_GROUP: usize = 256;

/// A write waiting for the writer thread: it runs in the group's
/// transaction, then learns how the commit went.
trait QueuedWrite: Send {
    /// Runs the write; false when it failed.
    fn run(&mut self, txn: &WriteTransaction) -> bool;
    /// Answers the writer: `failure` says why the group was not committed.
    fn finish(self: Box<Self>, failure: Option<&str>);
}

struct Queued<T, F> {
    operation: Option<F>,
    outcome: Option<StoreResult<T>>,
    reply: oneshot::Sender<StoreResult<T>>,
}

impl<T, F> QueuedWrite for Queued<T, F>
where
    T: Send,
    F: FnOnce(&WriteTransaction) -> StoreResult<T> + Send,
{
    fn run(&mut self, txn: &WriteTransaction) -> bool {
        let outcome = self.operation.take().map(|operation| operation(txn));
        let succeeded = matches!(outcome, Some(Ok(_)));
        self.outcome = outcome;
        succeeded
    }

    fn finish(self: Box<Self>, failure: Option<&str>) {
        let answer = match (self.outcome, failure) {
            (Some(Err(error)), _) => Err(error),
            (Some(Ok(value)), None) => Ok(value),
            (_, failure) => Err(redb::Error::Io(std::io::Error::other(format!(
                "not committed: {}",
                failure.unwrap_or("the write did not run")
            )))),
        };
        let _ = self.reply.send(answer);
    }
}

/// Commits queued writes until every handle on the store is gone: all the
/// writes queued while the last commit ran go into the next transaction. A
/// write that fails (a storage error, never a row's content) fails its
/// group: nothing of the group is committed.
fn run_writer(db: Weak<Database>, mut queue: mpsc::UnboundedReceiver<Box<dyn QueuedWrite>>) {
    while let Some(first) = queue.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(write) => group.push(write),
                Err(_) => break,
            }
        }
        let failure = match db.upgrade() {
            Some(db) => commit_group(&db, &mut group).err(),
            None => Some("the store is closed".to_string()),
        };
        for write in group {
            write.finish(failure.as_deref());
        }
    }
}

fn commit_group(db: &Database, group: &mut [Box<dyn QueuedWrite>]) -> Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    for write in group.iter_mut() {
        if !write.run(&txn) {
            let _ = txn.abort();
            return Err("a write of the same group failed".into());
        }
    }
    txn.commit().map_err(|e| e.to_string())
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

fn bump(txn: &WriteTransaction, counter: &str) -> StoreResult<()> {
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
        let db = Arc::new(db);
        let (writes, queue) = mpsc::unbounded_channel();
        let writer_db = Arc::downgrade(&db);
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run_writer(writer_db, queue))
            .map_err(redb::Error::Io)?;
        Ok(Self {
            db,
            waiters: Arc::default(),
            writes,
        })
    }

    /// Runs `operation` in the next group commit; answers once it is durable.
    async fn write<T: Send + 'static>(
        &self,
        operation: impl FnOnce(&WriteTransaction) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let (reply, answer) = oneshot::channel();
        let queued = Box::new(Queued {
            operation: Some(operation),
            outcome: None,
            reply,
        });
        let stopped = || redb::Error::Io(std::io::Error::other("the store's writer stopped"));
        self.writes.send(queued).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Runs a read off the async runtime.
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
        self.write(move |txn| {
            bump(txn, counter)?;
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
        self.write(move |txn| {
            {
                let mut table = txn.open_table(PENDING)?;
                let id = waiting.pending.row_id.clone();
                if table.get(id.as_str())?.is_none() {
                    table.insert(id.as_str(), json(&waiting).as_str())?;
                    bump(txn, "submitted")?;
                }
            }
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
        self.write(move |txn| {
            let claimed = {
                let mut pending = txn.open_table(PENDING)?;
                let removed = pending
                    .remove(row_id.as_str())?
                    .map(|v| v.value().to_string());
                removed.and_then(|w| serde_json::from_str::<Waiting>(&w).ok())
            };
            let Some(waiting) = claimed else {
                bump(txn, "duplicateCallbacks")?;
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
            bump(txn, "enriched")?;
            if to_outbox {
                let outgoing = Outgoing {
                    row_id: row_id.clone(),
                    result: result.clone(),
                    row: p.row.clone(),
                };
                txn.open_table(OUTBOX)?
                    .insert(row_id.as_str(), json(&outgoing).as_str())?;
            } else {
                bump(txn, "delivered")?;
            }
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
        self.write(move |txn| {
            let removed = txn.open_table(OUTBOX)?.remove(row_id.as_str())?.is_some();
            if removed {
                match failure {
                    None => bump(txn, "delivered")?,
                    Some(failure) => {
                        txn.open_table(SINK_FAILURES)?
                            .insert(row_id.as_str(), json(&failure).as_str())?;
                        bump(txn, "deadLettered")?;
                    }
                }
            }
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
        self.write(move |txn| {
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
        self.write(move |txn| {
            let added = {
                let mut table = txn.open_table(SOURCES)?;
                let count = table.get(source.as_str())?.map(|v| v.value()).unwrap_or(0);
                let added = added_within(count, n, limit);
                if let Some(total) = added {
                    table.insert(source.as_str(), total)?;
                }
                added
            };
            Ok(added)
        })
        .await
        .map_err(|e| ClayError::CounterUnavailable(e.to_string()))
    }
}
