//! The Direct tier: `POST /v1/enrich` answers with the enriched record in
//! the same request. Callers asking for the same key share one row, one Clay
//! submission and one charge (request coalescing); rows live in the
//! embedded store, so a restarted receiver resumes waiting for rows that
//! were pending and still matches their callbacks. All of it runs on the
//! async runtime: a waiting caller costs a task, not a thread.

mod answer;
mod outbox;
mod routine;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::Value;
use tokio::sync::watch;

use self::answer::refusal;
pub use self::answer::{Answer, MAX_SYNC_TIMEOUT, requested_wait};
pub use self::routine::Routine;
use super::attempt::{Attempts, now_ms};
use super::embedded::EmbeddedStore;
use super::key_of;
use super::rows::RowStore;
use super::store::PendingRow;
use crate::ledger::client::LedgerClientError;

/// How often a row's waiter re-reads the store (in case a wake-up was missed,
/// or the sweeper dead-lettered the row).
const RECHECK: Duration = Duration::from_secs(1);
/// Rows one request may carry.
pub const MAX_ROWS_PER_REQUEST: usize = 10;

/// Where the one row enriching a key stands.
#[derive(Clone, Debug)]
enum Progress {
    Reserving,
    Pending { row_id: String },
    Done(Answer),
}

pub struct Direct {
    pub store: EmbeddedStore,
    pub attempts: Arc<Attempts>,
    /// key → progress of the row enriching it; later callers for the key wait on it.
    inflight: Mutex<HashMap<String, watch::Receiver<Progress>>>,
    /// Set when the table enriches through a Clay routine.
    pub routine: Option<Routine>,
}

impl Direct {
    pub fn new(
        store: EmbeddedStore,
        attempts: Arc<Attempts>,
        routine: Option<Routine>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            attempts,
            routine,
            inflight: Mutex::default(),
        })
    }

    /// Picks up rows a previous process left pending, so their callers (who
    /// may retry) and their callbacks are still served.
    pub async fn resume(self: &Arc<Self>) -> anyhow::Result<usize> {
        let pending = self.store.pending_rows().await?;
        for (row, run_id) in &pending {
            self.join_or_start(&row.key, Some((row.clone(), run_id.clone())), Value::Null);
        }
        Ok(pending.len())
    }

    /// Enriches one row, waiting up to `wait` for the result.
    pub async fn enrich(self: &Arc<Self>, row: Value, wait: Duration) -> Answer {
        let runtime = self.attempts.runtime();
        let spec = &runtime.table.spec;
        if !row.is_object() {
            return Answer::Invalid {
                message: "each row must be a JSON object".into(),
            };
        }
        let Some(key) = key_of(&row, &spec.key) else {
            return Answer::Invalid {
                message: format!(
                    "the row has no {:?} field (the table's key); it cannot be enriched",
                    spec.key
                ),
            };
        };
        match self.store.dedupe_lookup(&key).await {
            Ok(Some((at_ms, result))) => {
                let window: Duration = spec.dedupe_window.into();
                if now_ms() - at_ms < window.as_millis() as i64 {
                    if let Err(error) = self.store.count("deduplicated").await {
                        tracing::debug!(%error, "counting a de-duplicated row failed");
                    }
                    return Answer::Enriched {
                        row_id: String::new(),
                        result: serde_json::from_str(&result).unwrap_or(Value::Null),
                        deduplicated: true,
                    };
                }
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%error, "reading the de-dupe index failed");
                return Answer::Refused {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    reason: "StoreUnavailable".into(),
                    message: "the row store is unavailable; retry".into(),
                };
            }
        }
        let mut progress = self.join_or_start(&key, None, row);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let row_id = match &*progress.borrow_and_update() {
                Progress::Done(answer) => return answer.clone(),
                Progress::Pending { row_id } => Some(row_id.clone()),
                Progress::Reserving => None,
            };
            tokio::select! {
                changed = progress.changed() => if changed.is_err() {
                    // The lifecycle always reports Done before it ends.
                    return Answer::Refused {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        reason: "Interrupted".into(),
                        message: "the receiver is shutting down; retry".into(),
                    };
                },
                _ = tokio::time::sleep_until(deadline), if row_id.is_some() => {
                    return Answer::Pending { row_id: row_id.unwrap_or_default() };
                }
            }
        }
    }

    /// Joins the row already enriching `key`, or starts one (`existing` when
    /// resuming a stored pending row).
    fn join_or_start(
        self: &Arc<Self>,
        key: &str,
        existing: Option<(PendingRow, Option<String>)>,
        row: Value,
    ) -> watch::Receiver<Progress> {
        let mut inflight = self.inflight.lock().unwrap();
        if let Some(progress) = inflight.get(key) {
            return progress.clone();
        }
        let (tx, rx) = watch::channel(Progress::Reserving);
        inflight.insert(key.to_string(), rx.clone());
        let direct = self.clone();
        let key = key.to_string();
        // Its own task: a caller hanging up never abandons a submitted row.
        tokio::spawn(async move {
            let answer = direct.lifecycle(&tx, existing, row).await;
            tx.send_replace(Progress::Done(answer));
            direct.inflight.lock().unwrap().remove(&key);
        });
        rx
    }

    /// Reserves, submits and waits for one row to end.
    async fn lifecycle(
        &self,
        progress: &watch::Sender<Progress>,
        existing: Option<(PendingRow, Option<String>)>,
        row: Value,
    ) -> Answer {
        let (pending, run_id) = match existing {
            Some(existing) => existing,
            None => match self.submit_new(row).await {
                Ok(pending) => (pending, None),
                Err(refused) => return refused,
            },
        };
        progress.send_replace(Progress::Pending {
            row_id: pending.row_id.clone(),
        });
        let answer = match &self.routine {
            Some(routine) => self.run_routine(routine, &pending, run_id).await,
            None => self.wait_terminal(&pending.row_id).await,
        };
        self.store.waiters.forget(&pending.row_id);
        answer
    }

    async fn submit_new(&self, row: Value) -> Result<PendingRow, Answer> {
        let runtime = self.attempts.runtime();
        let spec = &runtime.table.spec;
        let row_id = super::new_row_id(&runtime.name);
        let draw = match self.attempts.draw().await {
            Ok(draw) => draw,
            Err(LedgerClientError::Denied(denial)) => {
                return Err(refusal(denial.reason, denial.message));
            }
            Err(error) => {
                tracing::warn!(%error, "drawing credits failed");
                return Err(Answer::Refused {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    reason: "LedgerUnavailable".into(),
                    message: "the credit ledger is unavailable; retry".into(),
                });
            }
        };
        let key = key_of(&row, &spec.key).unwrap_or_default();
        let pending = self.attempts.first_attempt(row_id, key, row, &draw);
        if let Err(error) = self
            .store
            .make_pending(&pending, self.attempts.first_deadline())
            .await
        {
            tracing::warn!(%error, "storing a pending row failed");
            self.attempts.lease.undo(&draw);
            return Err(Answer::Refused {
                status: StatusCode::SERVICE_UNAVAILABLE,
                reason: "StoreUnavailable".into(),
                message: "the row store is unavailable; retry".into(),
            });
        }
        // Routine rows are run by their lifecycle; webhook rows are sent now.
        if self.routine.is_none()
            && let Err(error) = self.attempts.submit(&pending, &draw).await
        {
            // The row is pending: the sweeper retries it.
            tracing::warn!(error = %format!("{error:#}"), row = %pending.row_id, "submitting failed; it will be retried");
        }
        Ok(pending)
    }

    /// Waits until the row is enriched (its callback) or dead-lettered (the
    /// sweeper gave up), however long that takes.
    async fn wait_terminal(&self, row_id: &str) -> Answer {
        let notify = self.store.waiters.row(row_id);
        loop {
            match self.store.row_state(row_id).await {
                Ok(Some(state)) => return Answer::of_stored(row_id, state),
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "reading a row's state failed"),
            }
            tokio::select! {
                _ = notify.notified() => {}
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }

    /// Dead-letters a row; its credits stay spent when Clay may have
    /// charged for it, else they are refunded.
    async fn give_up(&self, pending: &PendingRow, reason: &str, maybe_charged: bool) -> Answer {
        if !maybe_charged {
            self.attempts
                .lease
                .refund(&pending.reserved(), &pending.period);
        }
        // Our own store failing is no news about Clay.
        if reason != "StoreUnavailable" {
            self.attempts.lease.record_failure();
        }
        crate::metrics::dataplane().rows("dead_lettered", reason, 1);
        if let Err(error) = self
            .store
            .dead_letter_pending(&pending.row_id, reason)
            .await
        {
            tracing::warn!(error = %format!("{error:#}"), "dead-lettering a row failed");
        }
        Answer::DeadLettered {
            row_id: pending.row_id.clone(),
            reason: reason.to_string(),
        }
    }

    /// `GET /v1/rows/{id}`.
    pub async fn lookup(&self, row_id: &str) -> anyhow::Result<Option<Answer>> {
        Ok(match self.store.row_state(row_id).await? {
            Some(state) => Some(Answer::of_stored(row_id, state)),
            None if self.store.is_pending(row_id).await? => Some(Answer::Pending {
                row_id: row_id.to_string(),
            }),
            None => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::key_of;
    use serde_json::json;

    #[test]
    fn keys_are_non_empty_strings_or_numbers() {
        assert_eq!(
            key_of(&json!({"domain": "acme.com"}), "domain").as_deref(),
            Some("acme.com")
        );
        assert_eq!(key_of(&json!({"id": 42}), "id").as_deref(), Some("42"));
        assert_eq!(key_of(&json!({"domain": ""}), "domain"), None);
        assert_eq!(key_of(&json!({}), "domain"), None);
    }
}
