//! One attempt at enriching a row, shared by every tier: reserve its
//! credits, submit it to Clay with its correlation id, and — when no result
//! came in time — close the attempt as spent and retry it, or dead-letter it
//! after `maxAttempts`. The rows themselves live in whichever store the
//! tier uses ([`PendingRows`]).

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

use super::TableRuntime;
use super::store::{PendingRow, PendingRows};
use crate::api::budget::OnExhausted;
use crate::api::table::CreditCost;
use crate::clay::ClayError;
use crate::clay::limiter::RateLimiter;
use crate::clay::rotation::{RotationPolicy, SourceRotation, SubmissionCounter};
use crate::clay::webhook::{RowOutcome, WebhookClient, WebhookConfig};
use crate::ledger::client::{LedgerClient, LedgerClientError};
use crate::ledger::{DenialReason, ReserveRequest, SettleRequest};

/// Extra reservation life beyond the result timeout, so a reservation never
/// expires while its row is legitimately waiting.
const RESERVATION_MARGIN_SECS: u64 = 300;
/// How long a sweeper owns the expired rows it took (other sweepers skip them).
const SWEEP_LEASE_MS: i64 = 30_000;

pub fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// The table's current spec and the Clay client configured from it.
pub struct Live {
    pub runtime: Arc<TableRuntime>,
    pub clay: WebhookClient,
}

/// What outlives every spec change: the connection pool, the submission
/// counter and one rate limiter (re-rated in place, so an edit never resets
/// the bucket or lets two buckets send at once).
struct LiveParts {
    http: reqwest::Client,
    limiter: Arc<RateLimiter>,
    counter: Arc<dyn SubmissionCounter>,
}

impl Live {
    fn new(runtime: Arc<TableRuntime>, parts: &LiveParts) -> Self {
        let rate = &runtime.table.spec.clay.rate_limit;
        parts.limiter.set_rate(rate.rows_per_second, rate.burst);
        let clay = WebhookClient::new(
            parts.http.clone(),
            parts.limiter.clone(),
            Arc::new(SourceRotation::new(
                runtime.webhook_targets.clone(),
                RotationPolicy::default(),
                parts.counter.clone(),
            )),
            WebhookConfig {
                rows_per_request: 1,
                ..Default::default()
            },
        );
        Self { runtime, clay }
    }

    /// Follows the table: a new client whenever its runtime changes.
    pub fn follow(
        mut runtime: watch::Receiver<Arc<TableRuntime>>,
        counter: Arc<dyn SubmissionCounter>,
    ) -> watch::Receiver<Arc<Live>> {
        let first = runtime.borrow_and_update().clone();
        let parts = LiveParts {
            http: reqwest::Client::new(),
            limiter: Arc::new(RateLimiter::new(
                first.table.spec.clay.rate_limit.rows_per_second,
                first.table.spec.clay.rate_limit.burst,
            )),
            counter,
        };
        let (tx, rx) = watch::channel(Arc::new(Live::new(first, &parts)));
        tokio::spawn(async move {
            while runtime.changed().await.is_ok() {
                let next = runtime.borrow_and_update().clone();
                tx.send_replace(Arc::new(Live::new(next, &parts)));
            }
        });
        rx
    }
}

/// Reserves, submits, retries and dead-letters rows of one table.
pub struct Attempts {
    pub live: watch::Receiver<Arc<Live>>,
    pub rows: Arc<dyn PendingRows>,
    pub ledger: LedgerClient,
    pub identity: String,
}

impl Attempts {
    pub fn live(&self) -> Arc<Live> {
        self.live.borrow().clone()
    }

    pub fn runtime(&self) -> Arc<TableRuntime> {
        self.live().runtime.clone()
    }

    pub fn result_timeout(&self) -> Duration {
        self.runtime().table.spec.clay.result_timeout.into()
    }

    /// The deadline of a row about to be submitted: until Clay accepts it,
    /// it also covers the wait in the rate limiter, so a queued row is never
    /// mistaken for a lost one.
    pub fn first_deadline(&self) -> i64 {
        now_ms() + (self.result_timeout() + self.queue_allowance()).as_millis() as i64
    }

    /// Sweeps expired rows every second until `shutdown`.
    pub async fn sweep_until(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if let Err(error) = self.sweep().await {
                tracing::warn!(error = %format!("{error:#}"), "sweeping pending rows failed");
            }
        }
    }

    /// The longest a row may wait in the rate limiter: every in-flight row
    /// of this worker ahead of it, at the table's rate, plus a margin.
    pub fn queue_allowance(&self) -> Duration {
        let runtime = self.runtime();
        let spec = &runtime.table.spec;
        let rate = f64::from(spec.clay.rate_limit.rows_per_second.max(1));
        Duration::from_secs_f64(f64::from(spec.workers.concurrency) / rate)
            + Duration::from_secs(30)
    }

    pub async fn reserve(&self, id: &str, cost: &CreditCost) -> Result<(), LedgerClientError> {
        let runtime = self.runtime();
        let request = ReserveRequest {
            id: id.to_string(),
            namespace: runtime.namespace.clone(),
            budget: runtime.table.spec.budget_ref.name.clone(),
            table: runtime.name.clone(),
            holder: self.identity.clone(),
            ask: cost.clone(),
            min: cost.clone(),
            ttl_seconds: self.result_timeout().as_secs() + RESERVATION_MARGIN_SECS,
        };
        self.ledger.reserve(&request).await.map(|_| ())
    }

    /// Closes a reservation: `used` is what is counted as spent.
    pub async fn close_reservation(&self, id: &str, used: CreditCost, failures: u64) {
        let runtime = self.runtime();
        let request = SettleRequest {
            namespace: runtime.namespace.clone(),
            budget: runtime.table.spec.budget_ref.name.clone(),
            table: runtime.name.clone(),
            reservation: id.to_string(),
            seq: 1,
            used,
            release: true,
            successes: 0,
            failures,
        };
        match self.ledger.settle(&request).await {
            // Already settled by the receiver, or already forfeited: either way it is closed.
            Ok(()) | Err(LedgerClientError::Rejected { status: 409, .. }) => {}
            Err(error) => {
                tracing::warn!(%error, reservation = id, "closing a reservation failed; it will expire and count as spent")
            }
        }
    }

    /// Sends a pending row to Clay with its correlation id.
    pub async fn submit(&self, pending: &PendingRow) -> anyhow::Result<()> {
        let mut row = pending.row.clone();
        row["kiln_row_id"] = Value::String(pending.row_id.clone());
        let outcome = self
            .live()
            .clay
            .submit(std::slice::from_ref(&row))
            .await
            .remove(0);
        match outcome {
            RowOutcome::Accepted { .. } => {
                // The result timeout runs from acceptance.
                let deadline = now_ms() + self.result_timeout().as_millis() as i64;
                self.rows.set_deadline(&pending.row_id, deadline).await?;
                Ok(())
            }
            RowOutcome::Failed(error) => {
                let permanent = matches!(
                    error,
                    ClayError::TooLarge { .. }
                        | ClayError::Rejected { .. }
                        | ClayError::Unauthorized { .. }
                        | ClayError::SourcesExhausted { .. }
                );
                // Nothing was accepted, so nothing was charged.
                self.close_reservation(&pending.reservation, CreditCost::default(), 1)
                    .await;
                if permanent {
                    tracing::warn!(row = %pending.row_id, reason = error.reason(), %error, "dead-lettering a row Clay will not accept");
                    self.rows
                        .dead_letter_pending(&pending.row_id, error.reason())
                        .await?;
                } else {
                    // Due now: the sweeper retries it (or dead-letters it after maxAttempts).
                    self.rows
                        .replace_pending(pending, now_ms(), &pending.reservation)
                        .await?;
                }
                Ok(())
            }
        }
    }

    /// Retries or dead-letters rows whose callback did not arrive in time,
    /// several at once.
    pub async fn sweep(self: &Arc<Self>) -> anyhow::Result<()> {
        let lease = now_ms() + SWEEP_LEASE_MS;
        let expired = self.rows.take_expired(now_ms(), lease, 100).await?;
        let retries = expired.into_iter().map(|pending| {
            let worker = self.clone();
            async move { worker.retry_or_dead_letter(pending).await }
        });
        for result in futures::future::join_all(retries).await {
            if let Err(error) = result {
                tracing::warn!(error = %format!("{error:#}"), "retrying a pending row failed; it stays pending");
            }
        }
        Ok(())
    }

    async fn retry_or_dead_letter(&self, pending: PendingRow) -> anyhow::Result<()> {
        // The result is unknown, never "no charge": the attempt counts as spent.
        self.close_reservation(&pending.reservation, pending.reserved(), 1)
            .await;
        if pending.attempt >= self.runtime().table.spec.clay.max_attempts {
            tracing::warn!(row = %pending.row_id, attempts = pending.attempt, "dead-lettering a row whose result never came");
            self.rows
                .dead_letter_pending(&pending.row_id, "ResultTimeout")
                .await?;
            return Ok(());
        }
        let next = PendingRow {
            attempt: pending.attempt + 1,
            reservation: format!("{}-a{}", pending.row_id, pending.attempt + 1),
            ..pending.clone()
        };
        match self.reserve(&next.reservation, &next.reserved()).await {
            Ok(()) => {}
            Err(LedgerClientError::Denied(denial))
                if denial.on_exhausted == OnExhausted::DeadLetter
                    && denial.reason == DenialReason::Exhausted =>
            {
                self.rows
                    .dead_letter_pending(&pending.row_id, "BudgetExhausted")
                    .await?;
                return Ok(());
            }
            // Paused or unavailable: the row is retried when its lease ends.
            Err(_) => return Ok(()),
        }
        let deadline = self.first_deadline();
        if self
            .rows
            .replace_pending(&next, deadline, &pending.reservation)
            .await?
        {
            self.submit(&next).await?;
        } else {
            // The callback won the race: the new reservation is not needed.
            self.close_reservation(&next.reservation, CreditCost::default(), 0)
                .await;
        }
        Ok(())
    }
}
