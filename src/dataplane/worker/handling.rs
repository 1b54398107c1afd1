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
use crate::dataplane::rows::{Incoming, SourceRows, Stored};
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
    pub(super) async fn handle_all(
        self: &Arc<Self>,
        items: Vec<Item>,
        permits: &Arc<Semaphore>,
    ) -> (Vec<Item>, bool) {
        let mut tasks = Vec::new();
        for item in items {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let worker = self.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = permit;
                let outcome = worker.handle(item.clone()).await;
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

    pub(super) async fn handle(&self, item: Item) -> anyhow::Result<Handled> {
        use tracing::Instrument as _;
        let span = tracing::info_span!("row", row = %item.row_id, table = %self.runtime().name);
        self.handle_in_span(item).instrument(span).await
    }

    async fn handle_in_span(&self, item: Item) -> anyhow::Result<Handled> {
        let Item { entry, row_id, raw } = item;
        if matches!(entry, SourceEntry::Kafka) && self.rows.seen(&row_id).await? {
            // A replayed record whose row is already pending or terminal.
            return Ok(Handled::Done);
        }
        let runtime = self.runtime();
        let spec = &runtime.table.spec;
        let row = match raw.as_deref().map(serde_json::from_str::<Value>) {
            Some(Ok(row @ Value::Object(_))) => row,
            _ => Value::String(raw.unwrap_or_default()),
        };
        let incoming = Incoming {
            row_id: &row_id,
            row: &row,
            entry: &entry,
        };
        if !row.is_object() {
            self.rows.dead_letter_entry(&incoming, "InvalidRow").await?;
            return Ok(Handled::Done);
        }
        let Some(key) = crate::dataplane::key_of(&row, &spec.key) else {
            self.rows.dead_letter_entry(&incoming, "MissingKey").await?;
            return Ok(Handled::Done);
        };
        let refresh = row
            .get("kiln_refresh")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if !refresh && let Some((at_ms, result)) = self.rows.dedupe_lookup(&key).await? {
            let window: Duration = spec.dedupe_window.into();
            if now_ms() - at_ms < window.as_millis() as i64 {
                let stored = Stored {
                    key: &key,
                    result: &result,
                };
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
        let pending = self.attempts.first_attempt(row_id, key, row, &draw);
        let due = self.attempts.first_deadline();
        let created = match self.rows.make_pending(&pending, due, &entry).await {
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
