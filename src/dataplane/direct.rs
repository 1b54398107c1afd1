//! The Direct tier: `POST /v1/enrich` answers with the enriched record in
//! the same request. Callers asking for the same key share one row, one Clay
//! submission and one charge (request coalescing); rows live in the
//! embedded store, so a restarted receiver resumes waiting for rows that
//! were pending and still matches their callbacks. All of it runs on the
//! async runtime: a waiting caller costs a task, not a thread.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

use super::attempt::{Attempts, now_ms};
use super::embedded::{EmbeddedStore, RowState, SinkFailure};
use super::key_of;
use super::sink::Delivery;
use super::store::PendingRow;
use crate::clay::ClayError;
use crate::clay::routines::{RoutineItem, RoutinesClient};
use crate::ledger::DenialReason;
use crate::ledger::client::LedgerClientError;
use crate::ledger::lease::CreditLease;

/// How often a row's waiter re-reads the store (in case a wake-up was missed,
/// or the sweeper dead-lettered the row).
const RECHECK: Duration = Duration::from_secs(1);
/// Longest wait a caller may ask for with `?timeout=`.
pub const MAX_SYNC_TIMEOUT: Duration = Duration::from_secs(300);
/// Rows one request may carry.
pub const MAX_ROWS_PER_REQUEST: usize = 10;
/// How often a routine run's results are polled.
const ROUTINE_POLL: Duration = Duration::from_millis(500);
/// Owed sink deliveries worked on at once.
const OUTBOX_BATCH: usize = 32;
/// What a caller refused for a transient reason is told to wait.
const RETRY_AFTER_SECS: u64 = 30;

/// How a row has ended, as told to its callers.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    Enriched {
        row_id: String,
        result: Value,
        deduplicated: bool,
    },
    DeadLettered {
        row_id: String,
        reason: String,
    },
    /// Nothing was submitted (budget, breaker, store or ledger).
    Refused {
        status: StatusCode,
        reason: String,
        message: String,
    },
    /// Still enriching when the caller's wait ended.
    Pending {
        row_id: String,
    },
    /// The request itself is wrong.
    Invalid {
        message: String,
    },
}

impl Answer {
    /// The answer for a row that reached a terminal state in the store.
    fn of_stored(row_id: &str, state: RowState) -> Self {
        match state {
            RowState::Enriched { result, .. } => Self::Enriched {
                row_id: row_id.to_string(),
                result,
                deduplicated: false,
            },
            RowState::DeadLettered { reason, .. } => Self::DeadLettered {
                row_id: row_id.to_string(),
                reason,
            },
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Enriched { .. } => StatusCode::OK,
            Self::DeadLettered { .. } => StatusCode::BAD_GATEWAY,
            Self::Refused { status, .. } => *status,
            Self::Pending { .. } => StatusCode::ACCEPTED,
            Self::Invalid { .. } => StatusCode::BAD_REQUEST,
        }
    }

    pub fn body(&self) -> Value {
        match self {
            Self::Enriched {
                row_id,
                result,
                deduplicated,
            } => json!({
                // A de-duplicated answer comes from the store, not from a row of this request.
                "rowId": (!row_id.is_empty()).then_some(row_id),
                "state": "enriched", "deduplicated": deduplicated, "result": result
            }),
            Self::DeadLettered { row_id, reason } => json!({
                "rowId": row_id, "state": "deadLettered", "reason": reason,
                "error": format!("the row could not be enriched: {reason}")
            }),
            Self::Refused {
                reason, message, ..
            } => json!({"error": message, "reason": reason}),
            Self::Pending { row_id } => json!({
                "rowId": row_id, "state": "pending", "statusUrl": format!("{}/{row_id}", crate::contract::INGEST_PATH),
                "message": "still enriching; the result is kept and delivered when it arrives"
            }),
            Self::Invalid { message } => json!({"error": message}),
        }
    }

    /// Seconds a refused caller should wait before trying again.
    pub fn retry_after(&self) -> Option<u64> {
        matches!(self, Self::Refused { status, .. } if *status == StatusCode::SERVICE_UNAVAILABLE)
            .then_some(RETRY_AFTER_SECS)
    }
}

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
    /// row id → woken when its callback is claimed.
    finished: Mutex<HashMap<String, Arc<Notify>>>,
    /// Woken when a result is owed to the HTTP sink.
    outbox_ready: Notify,
    /// Set when the table enriches through a Clay routine.
    pub routine: Option<Routine>,
}

/// A Clay routine and the client that runs it.
pub struct Routine {
    pub client: RoutinesClient,
    pub routine_id: String,
}

impl Routine {
    /// From the table's `clay.routine`, if it has one; runs go through the
    /// lease's share of the workspace's rate like webhook rows.
    pub fn from_runtime(runtime: &super::TableRuntime, lease: &CreditLease) -> Option<Self> {
        let spec = runtime.table.spec.clay.routine.as_ref()?;
        Some(Self {
            client: RoutinesClient::new(
                reqwest::Client::new(),
                &spec.api_url,
                runtime.routine_api_key.clone()?,
                lease.rate_limiter(&runtime.table.spec.clay.rate_limit),
                crate::retry::RetryPolicy::default(),
            ),
            routine_id: spec.routine_id.clone(),
        })
    }
}

fn refusal(denial_reason: DenialReason, message: String) -> Answer {
    let status = match denial_reason {
        DenialReason::Exhausted | DenialReason::Paused => StatusCode::PAYMENT_REQUIRED,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    Answer::Refused {
        status,
        reason: format!("{denial_reason:?}"),
        message,
    }
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
            finished: Mutex::default(),
            outbox_ready: Notify::new(),
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
        self.finished.lock().unwrap().remove(&pending.row_id);
        answer
    }

    async fn submit_new(&self, row: Value) -> Result<PendingRow, Answer> {
        let runtime = self.attempts.runtime();
        let spec = &runtime.table.spec;
        let row_id = format!("{}-{}", runtime.name, uuid::Uuid::new_v4().simple());
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
        let notify = self
            .finished
            .lock()
            .unwrap()
            .entry(row_id.to_string())
            .or_default()
            .clone();
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

    /// Runs one row through the table's routine (or, after a restart, polls
    /// the run it already started) and claims its result. A run is never
    /// started twice for a row: Clay's runs have no idempotency key.
    async fn run_routine(
        &self,
        routine: &Routine,
        pending: &PendingRow,
        run_id: Option<String>,
    ) -> Answer {
        let runtime = self.attempts.runtime();
        let spec = &runtime.table.spec;
        let run_id = match run_id {
            // A previous process may have started a run it did not record.
            Some(run_id) if run_id.is_empty() => {
                return self.give_up(pending, "OutcomeUnknown", true).await;
            }
            Some(run_id) => run_id,
            None => {
                let item = RoutineItem {
                    id: pending.row_id.clone(),
                    inputs: pending.row.clone(),
                };
                if let Err(error) = self.store.mark_started(&pending.row_id).await {
                    tracing::warn!(%error, "recording a routine run failed");
                    return self.give_up(pending, "StoreUnavailable", false).await;
                }
                match routine.client.run(&routine.routine_id, &[item], None).await {
                    Ok(run_id) => {
                        if let Err(error) = self.store.set_run(&pending.row_id, &run_id).await {
                            tracing::warn!(%error, row = %pending.row_id, "recording the run id failed");
                        }
                        run_id
                    }
                    Err(ClayError::OutcomeUnknown(_)) => {
                        return self.give_up(pending, "OutcomeUnknown", true).await;
                    }
                    // Clay refused the run: nothing was charged.
                    Err(error) => return self.give_up(pending, error.reason(), false).await,
                }
            }
        };
        let timeout: Duration = spec.clay.result_timeout.into();
        let item = match routine
            .client
            .wait_for(&run_id, ROUTINE_POLL, timeout)
            .await
        {
            Ok(results) => results.into_iter().find(|r| r.id == pending.row_id),
            Err(error) => {
                tracing::warn!(%error, row = %pending.row_id, "the routine run did not finish");
                return self.give_up(pending, "ResultTimeout", true).await;
            }
        };
        let Some(found) = item
            .filter(|i| i.status == "complete")
            .and_then(|i| i.result)
        else {
            return self.give_up(pending, "RoutineItemFailed", true).await;
        };
        let mut result = pending.row.clone();
        if let (Some(result), Value::Object(found)) = (result.as_object_mut(), found) {
            result.extend(found);
        }
        result["kiln_row_id"] = Value::String(pending.row_id.clone());
        let reported = result
            .pointer(&spec.clay.cost_pointer)
            .and_then(Value::as_f64);
        // The claim records the settlement; the receiver's sweep makes it.
        match self.claim(&pending.row_id, &result, reported).await {
            Ok(_) => Answer::Enriched {
                row_id: pending.row_id.clone(),
                result,
                deduplicated: false,
            },
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "storing a routine result failed");
                Answer::Refused {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    reason: "StoreUnavailable".into(),
                    message: "the row store is unavailable; retry".into(),
                }
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
        if let Err(error) =
            super::store::PendingRows::dead_letter_pending(&self.store, &pending.row_id, reason)
                .await
        {
            tracing::warn!(error = %format!("{error:#}"), "dead-lettering a row failed");
        }
        Answer::DeadLettered {
            row_id: pending.row_id.clone(),
            reason: reason.to_string(),
        }
    }

    /// A callback arrived: claims the row and wakes its waiters.
    pub async fn claim(
        &self,
        row_id: &str,
        result: &Value,
        reported_cost: Option<f64>,
    ) -> anyhow::Result<Option<PendingRow>> {
        let runtime = self.attempts.runtime();
        let to_outbox = runtime
            .table
            .spec
            .sink
            .as_ref()
            .is_some_and(|s| s.http.is_some());
        let claimed = self
            .store
            .claim_callback(row_id, result, now_ms(), reported_cost, to_outbox)
            .await?;
        if claimed.is_some() && to_outbox {
            self.outbox_ready.notify_one();
        }
        if claimed.is_some()
            && let Some(notify) = self.finished.lock().unwrap().get(row_id)
        {
            notify.notify_one();
        }
        Ok(claimed)
    }

    /// Hands owed results to the table's HTTP sink until `shutdown`; what is
    /// owed survives restarts in the store.
    pub async fn deliver_outbox(
        self: Arc<Self>,
        http: reqwest::Client,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            let owed = match self.store.outbox(OUTBOX_BATCH).await {
                Ok(owed) => owed,
                Err(error) => {
                    tracing::warn!(%error, "reading the outbox failed");
                    Vec::new()
                }
            };
            if owed.is_empty() {
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = self.outbox_ready.notified() => {}
                    _ = tokio::time::sleep(RECHECK) => {}
                }
                continue;
            }
            let runtime = self.attempts.runtime();
            // Whole batches: a result is never in flight twice.
            futures::future::join_all(owed.into_iter().map(|outgoing| {
                let (http, runtime, store) = (&http, &runtime, &self.store);
                async move {
                    let no_claim = || async { Ok(()) };
                    let failure = match super::sink::deliver_http(
                        http,
                        runtime,
                        &outgoing.row_id,
                        &outgoing.result,
                        &outgoing.row,
                        no_claim,
                    )
                    .await
                    {
                        Delivery::Delivered => None,
                        Delivery::NoHttpSink => return,
                        Delivery::Failed { detail, attempts } => Some(SinkFailure {
                            reason: "SinkFailed".into(),
                            detail,
                            attempts,
                            row: outgoing.row.clone(),
                        }),
                    };
                    if let Err(error) = store.outbox_done(&outgoing.row_id, failure).await {
                        tracing::warn!(%error, row = %outgoing.row_id, "completing an owed delivery failed; it will be delivered again");
                    }
                }
            }))
            .await;
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

/// The wait a request asked for with `?timeout=`, capped: one whole number
/// and a unit (`ms`, `s`, `m`, `h`), e.g. `250ms` or `10s`. Negative,
/// compound and overflowing values are refused with a message, never guessed.
pub fn requested_wait(query: Option<&str>, default: Duration) -> Result<Duration, String> {
    let Some(text) = query else {
        return Ok(default.min(MAX_SYNC_TIMEOUT));
    };
    let refused = || {
        format!(
            "timeout {:?} must be a whole number and a unit (ms, s, m or h), e.g. 250ms or 10s, at most {}s",
            text.chars().take(40).collect::<String>(),
            MAX_SYNC_TIMEOUT.as_secs()
        )
    };
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    if digits == 0 || digits > 12 {
        return Err(refused());
    }
    let number: u64 = number.parse().map_err(|_| refused())?;
    let millis_per_unit = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(refused()),
    };
    let millis = number.checked_mul(millis_per_unit).ok_or_else(refused)?;
    Ok(Duration::from_millis(millis).min(MAX_SYNC_TIMEOUT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_map_to_the_documented_status_codes() {
        let exhausted = refusal(DenialReason::Exhausted, "limit reached".into());
        assert_eq!(exhausted.status(), StatusCode::PAYMENT_REQUIRED);
        assert_eq!(exhausted.retry_after(), None);
        assert_eq!(
            refusal(DenialReason::Paused, "paused".into()).status(),
            StatusCode::PAYMENT_REQUIRED
        );
        let breaker = refusal(DenialReason::BreakerOpen, "open".into());
        assert_eq!(breaker.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(breaker.retry_after(), Some(RETRY_AFTER_SECS));
        let pending = Answer::Pending {
            row_id: "t-1".into(),
        };
        assert_eq!(pending.status(), StatusCode::ACCEPTED);
        assert_eq!(pending.body()["statusUrl"], "/v1/rows/t-1");
    }

    #[test]
    fn waits_come_from_the_query_else_the_spec_and_are_capped() {
        let default = Duration::from_secs(30);
        assert_eq!(requested_wait(None, default), Ok(default));
        assert_eq!(
            requested_wait(Some("250ms"), default),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(requested_wait(Some("2h"), default), Ok(MAX_SYNC_TIMEOUT));
        assert_eq!(requested_wait(Some("0s"), default), Ok(Duration::ZERO));
        for bad in [
            "soon",
            "-1s",
            "1s-5s",
            "1h30m",
            "99999999999999999999h",
            "1.5s",
            "",
            "10",
            "s",
            " 1s",
            "1S",
        ] {
            let refused = requested_wait(Some(bad), default).unwrap_err();
            assert!(
                refused.contains("whole number and a unit"),
                "{bad}: {refused}"
            );
        }
    }

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
