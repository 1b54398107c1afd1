//! One attempt at enriching a row, shared by every tier: draw its credits
//! from the process's lease, submit it to Clay with its correlation id, and
//! — when no result came in time — count the attempt as spent and retry it,
//! or dead-letter it after `maxAttempts`. The rows themselves live in
//! whichever store the tier uses ([`RowStore`]).

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

use super::TableRuntime;
use super::rows::{RowStore, pending_by_age};
use super::store::{PendingRow, new_write_token};
use crate::api::budget::OnExhausted;
use crate::clay::ClayError;
use crate::clay::limiter::RateLimiter;
use crate::clay::rotation::{RotationPolicy, SourceRotation, SubmissionCounter, WebhookTarget};
use crate::clay::webhook::{RowOutcome, WebhookClient, WebhookConfig};
use crate::ledger::DenialReason;
use crate::ledger::client::LedgerClientError;
use crate::ledger::lease::{CreditLease, Draw};

/// How soon a row whose retry found no credits is looked at again.
const RETRY_WITHOUT_CREDITS_MS: i64 = 5_000;
/// How long a sweeper owns the expired rows it took (other sweepers skip them).
const SWEEP_LEASE_MS: i64 = 30_000;
/// Pending rows are counted by age every this many sweeps (seconds).
const PENDING_AGES_EVERY: u64 = 15;

/// The row rewritten with no attempt in flight, waiting for credits (or a
/// retry): a later sweep counts no failure for it.
fn waiting_for_credits(pending: &PendingRow) -> PendingRow {
    PendingRow {
        reservation: String::new(),
        write_token: new_write_token(),
        attempted_at_ms: 0,
        ..pending.clone()
    }
}

pub fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// The table's current spec and the Clay client configured from it.
pub struct Live {
    pub runtime: Arc<TableRuntime>,
    pub clay: WebhookClient,
}

/// What outlives every spec change: the connection pool, the submission
/// counter and the lease's rate limiter (re-capped in place, so an edit
/// never resets the bucket or lets two buckets send at once).
struct LiveParts {
    http: reqwest::Client,
    limiter: Arc<RateLimiter>,
    counter: Arc<dyn SubmissionCounter>,
    /// Kept while the sources stay the same: its block of counted, unsent
    /// submissions would otherwise be dropped (counted, never sent) each
    /// time the table changes.
    rotation: std::sync::Mutex<Option<Arc<SourceRotation>>>,
}

impl LiveParts {
    fn rotation(&self, targets: &[WebhookTarget]) -> Arc<SourceRotation> {
        let mut kept = self.rotation.lock().unwrap();
        match kept.as_ref() {
            Some(rotation) if rotation.serves(targets) => rotation.clone(),
            _ => {
                let rotation = Arc::new(SourceRotation::new(
                    targets.to_vec(),
                    RotationPolicy::default(),
                    self.counter.clone(),
                ));
                *kept = Some(rotation.clone());
                rotation
            }
        }
    }
}

impl Live {
    fn new(runtime: Arc<TableRuntime>, parts: &LiveParts) -> Self {
        let rate = &runtime.table.spec.clay.rate_limit;
        parts.limiter.set_cap(rate.rows_per_second, rate.burst);
        let clay = WebhookClient::new(
            parts.http.clone(),
            parts.limiter.clone(),
            parts.rotation(&runtime.webhook_targets),
            WebhookConfig {
                rows_per_request: 1,
                ..Default::default()
            },
        );
        Self { runtime, clay }
    }

    /// Follows the table: a new client whenever its runtime changes. Rows
    /// go to Clay through the lease's share of the workspace's rate.
    pub fn follow(
        mut runtime: watch::Receiver<Arc<TableRuntime>>,
        counter: Arc<dyn SubmissionCounter>,
        lease: &CreditLease,
    ) -> watch::Receiver<Arc<Live>> {
        let first = runtime.borrow_and_update().clone();
        let parts = LiveParts {
            http: reqwest::Client::new(),
            limiter: lease.rate_limiter(&first.table.spec.clay.rate_limit),
            counter,
            rotation: std::sync::Mutex::new(None),
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

/// Draws credits for, submits, retries and dead-letters rows of one table.
pub struct Attempts {
    pub live: watch::Receiver<Arc<Live>>,
    pub rows: Arc<dyn RowStore>,
    pub lease: Arc<CreditLease>,
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

    /// Sweeps expired rows every second, and counts pending rows by age
    /// every [`PENDING_AGES_EVERY`] sweeps, until `shutdown`.
    pub async fn sweep_until(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        for sweeps in 0u64.. {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if let Err(error) = self.sweep().await {
                tracing::warn!(error = %format!("{error:#}"), "sweeping pending rows failed");
            }
            if sweeps % PENDING_AGES_EVERY == 0 {
                self.publish_pending_ages().await;
            }
        }
    }

    async fn publish_pending_ages(&self) {
        let timeout = self.result_timeout().as_millis() as i64;
        match pending_by_age(self.rows.as_ref(), now_ms(), timeout).await {
            Ok(ages) => {
                let gauge = &crate::metrics::dataplane().rows_pending;
                for (age, count) in ages {
                    gauge
                        .get_or_create(&crate::metrics::AgeLabels { age })
                        .set(count as i64);
                }
            }
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "counting pending rows by age failed")
            }
        }
    }

    /// The longest a row may wait in the rate limiter: every in-flight row
    /// of this worker ahead of it, at this process's share of the rate,
    /// plus a margin. Generous on purpose: it only delays the retry of rows
    /// a crashed process had queued, while a short one would send a row
    /// still waiting here a second time.
    pub fn queue_allowance(&self) -> Duration {
        let runtime = self.runtime();
        let spec = &runtime.table.spec;
        let share = self.lease.rate_limiter(&spec.clay.rate_limit).effective();
        Duration::from_secs_f64(f64::from(spec.workers.concurrency) / share.per_second.max(0.1))
            + Duration::from_secs(30)
    }

    /// Draws one row's worst case from the lease.
    pub async fn draw(&self) -> Result<Draw, LedgerClientError> {
        let cost = self.runtime().table.spec.clay.credits_per_row.clone();
        self.lease.draw(&cost).await
    }

    /// A pending row for the first attempt at `row`, covered by `draw`.
    pub fn first_attempt(
        &self,
        row_id: String,
        key: String,
        row: Value,
        draw: &Draw,
    ) -> PendingRow {
        PendingRow {
            reservation: format!("{row_id}-a1"),
            row_id,
            key,
            row,
            attempt: 1,
            reserved_credits: draw.cost.data_credits,
            reserved_actions: draw.cost.actions,
            period: draw.period.clone(),
            write_token: new_write_token(),
            attempted_at_ms: now_ms(),
        }
    }

    /// Sends a pending row to Clay with its correlation id; `draw` paid for it.
    pub async fn submit(&self, pending: &PendingRow, draw: &Draw) -> anyhow::Result<()> {
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
                crate::metrics::dataplane().rows("submitted", "accepted", 1);
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
                // Throttling is Clay pacing the workspace, not failing: the
                // rate limiter has slowed down for it, and the breaker
                // (budget-wide) must not pause other workspaces' tables.
                let throttled = matches!(error, ClayError::Throttled { .. });
                crate::metrics::dataplane().rows("submitted", "failed", 1);
                // Nothing was accepted, so nothing was charged.
                self.lease.undo(draw);
                if !throttled {
                    self.lease.record_failure();
                }
                if permanent {
                    tracing::warn!(row = %pending.row_id, reason = error.reason(), %error, "dead-lettering a row Clay will not accept");
                    crate::metrics::dataplane().rows("dead_lettered", error.reason(), 1);
                    self.rows
                        .dead_letter_pending(&pending.row_id, error.reason())
                        .await?;
                } else {
                    // Due now, with no credits drawn: the sweeper retries it
                    // (or dead-letters it after maxAttempts). A throttled
                    // attempt never reached Clay's enrichment, so it does
                    // not use up one of the row's attempts.
                    let mut waiting = waiting_for_credits(pending);
                    if throttled {
                        waiting.attempt = pending.attempt.saturating_sub(1);
                    }
                    self.rows
                        .replace_pending(&waiting, now_ms(), &pending.reservation)
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
        // An attempt in flight whose result never came: it counts as spent
        // (already, at its worst case) and as one failed Clay call, once —
        // the row is replaced below, so a later sweep cannot count it again.
        let in_flight = !pending.reservation.is_empty();
        if in_flight {
            self.lease.record_failure();
        }
        if pending.attempt >= self.runtime().table.spec.clay.max_attempts {
            tracing::warn!(row = %pending.row_id, attempts = pending.attempt, "dead-lettering a row whose result never came");
            crate::metrics::dataplane().rows("dead_lettered", "ResultTimeout", 1);
            self.rows
                .dead_letter_pending(&pending.row_id, "ResultTimeout")
                .await?;
            return Ok(());
        }
        let draw = match self.draw().await {
            Ok(draw) => draw,
            Err(LedgerClientError::Denied(denial))
                if denial.on_exhausted == OnExhausted::DeadLetter
                    && denial.reason == DenialReason::Exhausted =>
            {
                crate::metrics::dataplane().rows("dead_lettered", "BudgetExhausted", 1);
                self.rows
                    .dead_letter_pending(&pending.row_id, "BudgetExhausted")
                    .await?;
                return Ok(());
            }
            // Paused or unavailable: the row waits, with no attempt in flight.
            Err(_) => {
                let waiting = waiting_for_credits(&pending);
                self.rows
                    .replace_pending(
                        &waiting,
                        now_ms() + RETRY_WITHOUT_CREDITS_MS,
                        &pending.reservation,
                    )
                    .await?;
                return Ok(());
            }
        };
        let next = PendingRow {
            attempt: pending.attempt + 1,
            reservation: format!("{}-a{}", pending.row_id, pending.attempt + 1),
            reserved_credits: draw.cost.data_credits,
            reserved_actions: draw.cost.actions,
            period: draw.period.clone(),
            write_token: new_write_token(),
            attempted_at_ms: now_ms(),
            ..pending.clone()
        };
        let deadline = self.first_deadline();
        if self
            .rows
            .replace_pending(&next, deadline, &pending.reservation)
            .await?
        {
            self.submit(&next, &draw).await?;
        } else {
            // The callback won the race: the credits are not needed.
            self.lease.undo(&draw);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
