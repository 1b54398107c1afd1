//! What becomes of one row read from the source: dead-lettered when it
//! cannot be enriched, served from the de-dupe index, or given credits,
//! made pending and sent to Clay; its source entry acknowledged in the same
//! step.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Semaphore;

use super::Item;
use crate::api::budget::OnExhausted;
use crate::dataplane::TableRuntime;
use crate::dataplane::attempt::{Attempts, now_ms};
use crate::dataplane::rows::{Incoming, Known, Lookup, SourceRows, Stored};
use crate::dataplane::store::SourceEntry;
use crate::ledger::DenialReason;
use crate::ledger::client::LedgerClientError;

/// A worker's row handling, apart from reading the source.
pub(super) struct RowHandling {
    pub(super) attempts: Arc<Attempts>,
    /// The rows' transitions (the same store as `attempts.rows`).
    pub(super) rows: Arc<dyn SourceRows>,
}

/// What happened to one source entry.
#[derive(Debug)]
pub(super) enum Handled {
    Done,
    /// The budget refused credits and wants consumption paused.
    Paused,
}

impl RowHandling {
    pub(super) fn runtime(&self) -> Arc<TableRuntime> {
        self.attempts.runtime()
    }

    /// Handles a batch, `concurrency` rows at a time; returns the rows to
    /// try again (failed, or refused credits) and whether the budget refused.
    /// What the store knows of the batch's rows is read first, in one round
    /// trip for all of them.
    pub(super) async fn handle_all(
        self: &Arc<Self>,
        items: Vec<Item>,
        permits: &Arc<Semaphore>,
    ) -> (Vec<Item>, bool) {
        let runtime = self.runtime();
        let rows: Vec<Row> = items
            .iter()
            .map(|item| Row::read(item, &runtime.table.spec.key))
            .collect();
        let lookups: Vec<Lookup> = items
            .iter()
            .zip(&rows)
            .map(|(item, row)| Lookup {
                row_id: &item.row_id,
                key: row.dedupe_key(),
                replayable: matches!(item.entry, SourceEntry::Kafka),
            })
            .collect();
        let known = match self.rows.look_up(&lookups).await {
            Ok(known) => known,
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), rows = items.len(), "reading what the store knows of a batch failed; it will be retried");
                return (items, false);
            }
        };
        let mut tasks = Vec::new();
        for ((item, row), known) in items.into_iter().zip(rows).zip(known) {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let worker = self.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = permit;
                let outcome = worker.handle(&item, row, known).await;
                tracing::debug!(row = %item.row_id, outcome = ?outcome.as_ref().map_err(|e| format!("{e:#}")), "row handled");
                (item, outcome)
            }));
        }
        let (mut retry, mut paused) = (Vec::new(), false);
        for task in tasks {
            match task.await {
                Ok((_, Ok(Handled::Done))) => {}
                Ok((item, Ok(Handled::Paused))) => {
                    paused = true;
                    retry.push(item);
                }
                Ok((item, Err(error))) => {
                    tracing::warn!(error = %format!("{error:#}"), row = %item.row_id, "handling a row failed; it will be retried");
                    retry.push(item);
                }
                Err(error) => tracing::error!(%error, "a row task panicked"),
            }
        }
        (retry, paused)
    }

    async fn handle(&self, item: &Item, row: Row, known: Known) -> anyhow::Result<Handled> {
        use tracing::Instrument as _;
        let span = tracing::info_span!("row", row = %item.row_id, table = %self.runtime().name);
        self.handle_in_span(item, row, known).instrument(span).await
    }

    async fn handle_in_span(&self, item: &Item, row: Row, known: Known) -> anyhow::Result<Handled> {
        if known.seen {
            // A replayed record whose row is already pending or terminal.
            return Ok(Handled::Done);
        }
        let runtime = self.runtime();
        let spec = &runtime.table.spec;
        let Row { value, key, .. } = row;
        let incoming = Incoming {
            row_id: &item.row_id,
            row: &value,
            entry: &item.entry,
        };
        let Some(key) = key else {
            let reason = if value.is_object() {
                "MissingKey"
            } else {
                "InvalidRow"
            };
            self.rows.dead_letter_entry(&incoming, reason).await?;
            return Ok(Handled::Done);
        };
        if let Some((at_ms, result)) = &known.stored {
            let window: Duration = spec.dedupe_window.into();
            if now_ms() - at_ms < window.as_millis() as i64 {
                let stored = Stored { key: &key, result };
                self.rows
                    .deliver_stored(&runtime, &incoming, &stored)
                    .await?;
                crate::metrics::dataplane().rows("deduplicated", "ok", 1);
                return Ok(Handled::Done);
            }
        }

        let draw = match self.attempts.draw().await {
            Ok(draw) => draw,
            Err(LedgerClientError::Denied(denial)) => {
                if denial.reason == DenialReason::Exhausted
                    && denial.on_exhausted == OnExhausted::DeadLetter
                {
                    self.rows
                        .dead_letter_entry(&incoming, "BudgetExhausted")
                        .await?;
                    return Ok(Handled::Done);
                }
                return Ok(Handled::Paused);
            }
            Err(other) => return Err(other.into()),
        };
        let pending = self
            .attempts
            .first_attempt(item.row_id.clone(), key, value, &draw);
        let due = self.attempts.first_deadline();
        let created = match self.rows.make_pending(&pending, due, &item.entry).await {
            Ok(created) => created,
            Err(error) => {
                self.attempts.lease.undo(&draw);
                return Err(error);
            }
        };
        if created {
            self.attempts.submit(&pending, &draw).await?;
        } else {
            // The row was already pending or done (a replayed record).
            self.attempts.lease.undo(&draw);
        }
        Ok(Handled::Done)
    }
}

/// A source entry's row as read: its JSON (a row that is not a JSON
/// object is kept as text, for its dead letter) and its key.
struct Row {
    value: Value,
    /// None for a row that is not an object, or has no key.
    key: Option<String>,
    /// A refresh re-enriches its key whatever the de-dupe index holds.
    refresh: bool,
}

impl Row {
    fn read(item: &Item, key_field: &str) -> Self {
        let value = match item.raw.as_deref().map(serde_json::from_str::<Value>) {
            Some(Ok(row @ Value::Object(_))) => row,
            _ => Value::String(item.raw.clone().unwrap_or_default()),
        };
        Self {
            key: crate::dataplane::key_of(&value, key_field),
            refresh: value
                .get("kiln_refresh")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            value,
        }
    }

    /// The key whose stored result may serve this row.
    fn dedupe_key(&self) -> Option<&str> {
        self.key.as_deref().filter(|_| !self.refresh)
    }
}
