//! The embedded store as the shared [`RowStore`]: every transition durable
//! before it returns; a row that reaches its end wakes whoever waits on it
//! (the Direct tier's callers).

use anyhow::Result;
use async_trait::async_trait;
use redb::{ReadableDatabase, ReadableTable};

use super::{
    DEDUPE, EmbeddedStore, PENDING, ROWS, RowState, SETTLEMENTS, StoreResult, Waiting, bump, json,
};
use crate::dataplane::TableRuntime;
use crate::dataplane::attempt::now_ms;
use crate::dataplane::rows::{Callback, OwedSettlement, RowStore, parse_dedupe, parse_owed};
use crate::dataplane::store::PendingRow;

impl EmbeddedStore {
    /// The stored result for a de-dupe key and when it was enriched (ms).
    pub async fn dedupe_lookup(&self, key: &str) -> StoreResult<Option<(i64, String)>> {
        let key = key.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(DEDUPE)?;
            Ok(table
                .get(key.as_str())?
                .and_then(|v| parse_dedupe(v.value())))
        })
        .await
    }
}

#[async_trait]
impl RowStore for EmbeddedStore {
    async fn set_deadline(&self, row_id: &str, deadline_ms: i64) -> Result<()> {
        let row_id = row_id.to_string();
        let moved = self.write(move |txn| {
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
            Ok(())
        });
        Ok(moved.await?)
    }

    async fn replace_pending(&self, next: &PendingRow, due: i64, expected: &str) -> Result<bool> {
        let (next, expected) = (next.clone(), expected.to_string());
        let replaced = self.write(move |txn| {
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
                            deadline_ms: due,
                            run_id: None,
                        };
                        table.insert(next.row_id.as_str(), json(&waiting).as_str())?;
                        true
                    }
                    _ => false,
                }
            };
            Ok(replaced)
        });
        Ok(replaced.await?)
    }

    async fn dead_letter_pending(&self, row_id: &str, reason: &str) -> Result<Option<PendingRow>> {
        let (id, reason) = (row_id.to_string(), reason.to_string());
        let removed = self.write(move |txn| {
            let removed = txn
                .open_table(PENDING)?
                .remove(id.as_str())?
                .and_then(|v| serde_json::from_str::<Waiting>(v.value()).ok());
            if let Some(waiting) = &removed {
                let state = RowState::DeadLettered {
                    reason,
                    row: waiting.pending.row.clone(),
                };
                txn.open_table(ROWS)?
                    .insert(id.as_str(), json(&state).as_str())?;
                bump(txn, "deadLettered")?;
            }
            Ok(removed.map(|w| w.pending))
        });
        let removed = removed.await?;
        if removed.is_some() {
            self.waiters.finished(row_id);
        }
        Ok(removed)
    }

    async fn take_expired(&self, now: i64, until: i64, limit: usize) -> Result<Vec<PendingRow>> {
        let taken = self.write(move |txn| {
            let expired = {
                let mut table = txn.open_table(PENDING)?;
                let mut expired = Vec::new();
                for entry in table.iter()? {
                    let (_, value) = entry?;
                    if let Ok(w) = serde_json::from_str::<Waiting>(value.value())
                        && w.deadline_ms <= now
                        && expired.len() < limit
                    {
                        expired.push(w);
                    }
                }
                // Leased, so a sweep in progress is not repeated.
                for w in &mut expired {
                    w.deadline_ms = until;
                    table.insert(w.pending.row_id.as_str(), json(w).as_str())?;
                }
                expired
            };
            Ok(expired.into_iter().map(|w| w.pending).collect())
        });
        Ok(taken.await?)
    }

    async fn deadlines_up_to(&self, cutoffs_ms: &[i64]) -> Result<(Vec<u64>, u64)> {
        let cutoffs = cutoffs_ms.to_vec();
        let counted = self.blocking(move |db| {
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
        });
        Ok(counted.await?)
    }

    /// With an HTTP sink, the result is owed to the outbox (and the outbox
    /// is woken); without one it is delivered where it is stored.
    async fn claim_callback(
        &self,
        runtime: &TableRuntime,
        callback: &Callback<'_>,
    ) -> Result<Option<PendingRow>> {
        let sink = runtime.table.spec.sink.as_ref();
        let to_outbox = sink.is_some_and(|s| s.http.is_some());
        let (row_id, result) = (callback.row_id, callback.result);
        let claimed = self
            .claim_result(row_id, result, now_ms(), callback.reported, to_outbox)
            .await?;
        if claimed.is_some() {
            if to_outbox {
                self.waiters.outbox.notify_one();
            }
            self.waiters.finished(row_id);
        }
        Ok(claimed)
    }

    async fn owed_settlements(&self) -> Result<Vec<OwedSettlement>> {
        let owed = self.blocking(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(SETTLEMENTS)?;
            let mut owed = Vec::new();
            for entry in table.iter()? {
                let (row_id, stored) = entry?;
                owed.extend(parse_owed(row_id.value(), stored.value()));
            }
            Ok(owed)
        });
        Ok(owed.await?)
    }

    async fn take_owed(&self, row_ids: &[&str]) -> Result<Vec<bool>> {
        let row_ids: Vec<String> = row_ids.iter().map(|id| id.to_string()).collect();
        let taken = self.write(move |txn| {
            let mut taken = Vec::with_capacity(row_ids.len());
            {
                let mut table = txn.open_table(SETTLEMENTS)?;
                for row_id in &row_ids {
                    taken.push(table.remove(row_id.as_str())?.is_some());
                }
            }
            Ok(taken)
        });
        Ok(taken.await?)
    }
}
