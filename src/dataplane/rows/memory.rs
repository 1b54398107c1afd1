//! A row store in memory, for unit tests of what runs on top of the real
//! ones: the same transitions, checked the same way (a replaced row must
//! still hold the expected reservation, a claimed row is claimed once), and
//! every row's terminal state kept so a test can see it ended exactly once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use anyhow::Result;
use async_trait::async_trait;
use serde_json::{Value, json};

use super::{Callback, Incoming, Known, Lookup, OwedSettlement, RowStore, SourceRows, Stored};
use crate::dataplane::TableRuntime;
use crate::dataplane::store::{PendingRow, SourceEntry};

/// Where a row ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Terminal {
    Delivered(Value),
    DeadLettered(String),
}

#[derive(Default)]
struct State {
    /// row id → (row, deadline ms)
    pending: BTreeMap<String, (PendingRow, i64)>,
    dedupe: HashMap<String, (i64, String)>,
    owed: BTreeMap<String, OwedSettlement>,
    /// row id → every terminal state it reached (a correct caller: one).
    terminal: HashMap<String, Vec<Terminal>>,
    /// row id → how often its source entry was acknowledged.
    acknowledged: HashMap<String, u32>,
}

impl State {
    /// Pending or ended: a row with this id was handled before.
    fn seen(&self, row_id: &str) -> bool {
        self.pending.contains_key(row_id) || self.terminal.contains_key(row_id)
    }

    fn end(&mut self, row_id: &str, how: Terminal) {
        self.terminal
            .entry(row_id.to_string())
            .or_default()
            .push(how);
    }

    fn acknowledge(&mut self, row_id: &str) {
        *self.acknowledged.entry(row_id.to_string()).or_default() += 1;
    }
}

#[derive(Default)]
pub struct MemoryRows(Mutex<State>);

impl MemoryRows {
    /// Records `pending` as pending until `deadline_ms`, as a sweeper finds it.
    pub fn insert_pending(&self, pending: &PendingRow, deadline_ms: i64) {
        self.0
            .lock()
            .unwrap()
            .pending
            .insert(pending.row_id.clone(), (pending.clone(), deadline_ms));
    }

    /// The row as pending, and its deadline.
    pub fn pending_row(&self, row_id: &str) -> Option<(PendingRow, i64)> {
        self.0.lock().unwrap().pending.get(row_id).cloned()
    }

    /// How often the row's source entry was acknowledged.
    pub fn acknowledged(&self, row_id: &str) -> u32 {
        let state = self.0.lock().unwrap();
        state.acknowledged.get(row_id).copied().unwrap_or(0)
    }

    /// Every terminal state the row reached, in order.
    pub fn terminal(&self, row_id: &str) -> Vec<Terminal> {
        let state = self.0.lock().unwrap();
        state.terminal.get(row_id).cloned().unwrap_or_default()
    }
}

/// A pending first attempt at a row, reserving 12 credits.
pub fn pending(row_id: &str, key: &str, reservation: &str) -> PendingRow {
    PendingRow {
        row_id: row_id.into(),
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

#[async_trait]
impl RowStore for MemoryRows {
    async fn set_deadline(&self, row_id: &str, deadline_ms: i64) -> Result<()> {
        if let Some((_, deadline)) = self.0.lock().unwrap().pending.get_mut(row_id) {
            *deadline = deadline_ms;
        }
        Ok(())
    }

    async fn replace_pending(&self, next: &PendingRow, due: i64, expected: &str) -> Result<bool> {
        let mut state = self.0.lock().unwrap();
        let Some((current, deadline)) = state.pending.get_mut(&next.row_id) else {
            return Ok(false);
        };
        if current == next {
            return Ok(true);
        }
        if current.reservation != expected {
            return Ok(false);
        }
        (*current, *deadline) = (next.clone(), due);
        Ok(true)
    }

    async fn dead_letter_pending(&self, row_id: &str, reason: &str) -> Result<Option<PendingRow>> {
        let mut state = self.0.lock().unwrap();
        let removed = state.pending.remove(row_id).map(|(row, _)| row);
        if removed.is_some() {
            state.end(row_id, Terminal::DeadLettered(reason.to_string()));
        }
        Ok(removed)
    }

    async fn take_expired(&self, now: i64, until: i64, limit: usize) -> Result<Vec<PendingRow>> {
        let mut state = self.0.lock().unwrap();
        let mut expired = Vec::new();
        for (row, deadline) in state.pending.values_mut() {
            if *deadline <= now && expired.len() < limit {
                *deadline = until;
                expired.push(row.clone());
            }
        }
        Ok(expired)
    }

    async fn deadlines_up_to(&self, cutoffs_ms: &[i64]) -> Result<(Vec<u64>, u64)> {
        let state = self.0.lock().unwrap();
        let counts = cutoffs_ms
            .iter()
            .map(|cutoff| {
                let due = state.pending.values().filter(|(_, d)| d <= cutoff);
                due.count() as u64
            })
            .collect();
        Ok((counts, state.pending.len() as u64))
    }

    async fn claim_callback(
        &self,
        _runtime: &TableRuntime,
        callback: &Callback<'_>,
    ) -> Result<Option<PendingRow>> {
        let mut state = self.0.lock().unwrap();
        let Callback {
            row_id,
            result,
            reported,
        } = *callback;
        let Some((pending, _)) = state.pending.remove(row_id) else {
            return Ok(None);
        };
        let enriched = (crate::dataplane::attempt::now_ms(), result.to_string());
        state.dedupe.insert(pending.key.clone(), enriched);
        let owed = OwedSettlement {
            row_id: row_id.to_string(),
            reported,
            pending: pending.clone(),
        };
        state.owed.insert(row_id.to_string(), owed);
        state.end(row_id, Terminal::Delivered(result.clone()));
        Ok(Some(pending))
    }

    async fn owed_settlements(&self) -> Result<Vec<OwedSettlement>> {
        Ok(self.0.lock().unwrap().owed.values().cloned().collect())
    }

    async fn take_owed(&self, row_ids: &[&str]) -> Result<Vec<bool>> {
        let mut state = self.0.lock().unwrap();
        Ok(row_ids
            .iter()
            .map(|id| state.owed.remove(*id).is_some())
            .collect())
    }
}

#[async_trait]
impl SourceRows for MemoryRows {
    async fn look_up(&self, rows: &[Lookup<'_>]) -> Result<Vec<Known>> {
        let state = self.0.lock().unwrap();
        Ok(rows
            .iter()
            .map(|row| Known {
                seen: row.replayable && state.seen(row.row_id),
                stored: row.key.and_then(|key| state.dedupe.get(key).cloned()),
            })
            .collect())
    }

    async fn make_pending(&self, pending: &PendingRow, due: i64, _: &SourceEntry) -> Result<bool> {
        // Checked and written under one lock, as the store's script does.
        let mut state = self.0.lock().unwrap();
        let created = !state.seen(&pending.row_id);
        if created {
            let row = (pending.clone(), due);
            state.pending.insert(pending.row_id.clone(), row);
        }
        state.acknowledge(&pending.row_id);
        Ok(created)
    }

    async fn deliver_stored(
        &self,
        _runtime: &TableRuntime,
        incoming: &Incoming<'_>,
        stored: &Stored<'_>,
    ) -> Result<()> {
        let result = serde_json::from_str(stored.result)?;
        let mut state = self.0.lock().unwrap();
        state.end(incoming.row_id, Terminal::Delivered(result));
        state.acknowledge(incoming.row_id);
        Ok(())
    }

    async fn dead_letter_entry(&self, incoming: &Incoming<'_>, reason: &str) -> Result<()> {
        let mut state = self.0.lock().unwrap();
        state.end(incoming.row_id, Terminal::DeadLettered(reason.to_string()));
        state.acknowledge(incoming.row_id);
        Ok(())
    }
}
