//! `kiln worker`: consumes the table's source stream, serves repeated keys
//! from the de-dupe index at zero credits, reserves credits, submits rows to
//! Clay with a correlation id, and retries or dead-letters rows whose result
//! never came.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::FutureExt;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::sync::{Semaphore, watch};

use super::store::{Keys, PendingRow, RedisStore, SourceEntry};
use super::{DataplaneArgs, TableRuntime};
use crate::api::budget::OnExhausted;
use crate::api::table::CreditCost;
use crate::clay::ClayError;
use crate::clay::limiter::RateLimiter;
use crate::clay::rotation::{RotationPolicy, SourceRotation};
use crate::clay::webhook::{RowOutcome, WebhookClient, WebhookConfig};
use crate::ledger::client::{LedgerClient, LedgerClientError};
use crate::ledger::{DenialReason, ReserveRequest, SettleRequest};
use crate::operator::metrics::{Readiness, serve_health};

/// Extra reservation life beyond the result timeout, so a reservation never
/// expires while its row is legitimately waiting.
const RESERVATION_MARGIN_SECS: u64 = 300;
/// How long a crashed consumer's entries wait before another worker takes them.
const RECLAIM_IDLE_MS: u64 = 30_000;
/// How long a sweeper owns the expired rows it took (other workers skip them).
const SWEEP_LEASE_MS: i64 = 30_000;
/// Pause after the budget refuses credits (rows stay in the stream).
const PAUSE_ON_DENIAL: Duration = Duration::from_secs(5);

#[derive(clap::Args, Clone, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub common: DataplaneArgs,
}

struct Worker {
    live: watch::Receiver<Arc<Live>>,
    store: RedisStore,
    ledger: LedgerClient,
    identity: String,
    stream: String,
    group: String,
}

/// The table's current spec and the Clay client configured from it.
struct Live {
    runtime: Arc<TableRuntime>,
    clay: WebhookClient,
}

impl Live {
    /// One limiter outlives every spec change, so an edit never resets the
    /// bucket or lets two buckets send at once.
    fn new(runtime: Arc<TableRuntime>, limiter: &Arc<RateLimiter>, store: &RedisStore) -> Self {
        let rate = &runtime.table.spec.clay.rate_limit;
        limiter.set_rate(rate.rows_per_second, rate.burst);
        let clay = WebhookClient::new(
            reqwest::Client::new(),
            limiter.clone(),
            Arc::new(SourceRotation::new(
                runtime.webhook_targets.clone(),
                RotationPolicy::default(),
                Arc::new(store.clone()),
            )),
            WebhookConfig {
                rows_per_request: 1,
                ..Default::default()
            },
        );
        Self { runtime, clay }
    }

    /// Follows the table: a new client whenever its runtime changes.
    fn follow(
        mut runtime: watch::Receiver<Arc<TableRuntime>>,
        store: RedisStore,
    ) -> watch::Receiver<Arc<Live>> {
        let first = runtime.borrow_and_update().clone();
        let limiter = Arc::new(RateLimiter::new(
            first.table.spec.clay.rate_limit.rows_per_second,
            first.table.spec.clay.rate_limit.burst,
        ));
        let (tx, rx) = watch::channel(Arc::new(Live::new(first, &limiter, &store)));
        tokio::spawn(async move {
            while runtime.changed().await.is_ok() {
                let next = runtime.borrow_and_update().clone();
                tx.send_replace(Arc::new(Live::new(next, &limiter, &store)));
            }
        });
        rx
    }
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// What happened to one source entry.
enum Handled {
    Done,
    /// The budget refused credits and wants consumption paused.
    Paused,
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let (namespace, name) = args.common.namespace_and_name()?;
    let runtime = TableRuntime::load(&client, &namespace, &name).await?;
    let redis_url = runtime
        .redis_url
        .clone()
        .context("the worker needs spec.redis (tiers Queue and Event)")?;
    let store = RedisStore::connect(redis_url.expose(), Keys::new(&namespace, &name))
        .await
        .context("connecting to Redis")?;
    let stream = super::source_stream(&runtime, &store);
    let group = runtime
        .table
        .spec
        .source
        .redis_stream
        .as_ref()
        .and_then(|s| s.consumer_group.clone())
        .unwrap_or_else(|| format!("kiln-{name}"));
    store
        .ensure_group(&stream, &group)
        .await
        .context("creating the consumer group")?;
    let runtime = super::follow(client, runtime);
    let worker = Arc::new(Worker {
        ledger: args.common.ledger(),
        identity: args.common.identity(),
        live: Live::follow(runtime.clone(), store.clone()),
        store,
        stream,
        group,
    });

    let shutdown = super::stop_signal(runtime).shared();
    let readiness = Readiness::default();
    let health = tokio::spawn(serve_health(
        args.common.health_addr,
        Registry::default(),
        readiness.clone(),
        shutdown.clone(),
    ));
    readiness.set(true);
    tracing::info!(table = %args.common.table, stream = %worker.stream, identity = %worker.identity, "worker started");

    let sweeper = tokio::spawn({
        let worker = worker.clone();
        let shutdown = shutdown.clone();
        async move {
            loop {
                tokio::select! {
                    _ = shutdown.clone() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                if let Err(error) = worker.sweep().await {
                    tracing::warn!(%error, "sweeping pending rows failed");
                }
            }
        }
    });

    let mut concurrency = worker.runtime().table.spec.workers.concurrency as usize;
    let permits = Arc::new(Semaphore::new(concurrency));
    loop {
        let workers = worker.runtime().table.spec.workers.clone();
        // Follows spec.workers.concurrency: permits are only added or
        // forgotten here, between batches, when none are held.
        let wanted = workers.concurrency as usize;
        if wanted > concurrency {
            permits.add_permits(wanted - concurrency);
        } else if wanted < concurrency {
            permits.forget_permits(concurrency - wanted);
        }
        concurrency = wanted;
        let batch = workers.batch_size as usize;
        let entries = tokio::select! {
            _ = shutdown.clone() => break,
            read = worker.store.read(&worker.stream, &worker.group, &worker.identity, batch, 1000, RECLAIM_IDLE_MS) => read,
        };
        let entries = match entries {
            Ok(entries) => entries,
            Err(error) => {
                tracing::warn!(%error, "reading the source stream failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut tasks = Vec::new();
        for (id, fields) in entries {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let worker = worker.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = permit;
                worker.handle(id, fields).await
            }));
        }
        let mut paused = false;
        for task in tasks {
            match task.await {
                Ok(Ok(Handled::Paused)) => paused = true,
                Ok(Ok(Handled::Done)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(error = %format!("{error:#}"), "handling a row failed; it will be retried")
                }
                Err(error) => tracing::error!(%error, "a row task panicked"),
            }
        }
        if paused {
            tracing::info!(
                "the budget refused credits; pausing consumption (rows stay in the stream)"
            );
            tokio::select! {
                _ = shutdown.clone() => break,
                _ = tokio::time::sleep(PAUSE_ON_DENIAL) => {}
            }
        }
    }
    // Graceful: stop taking rows; in-flight rows are pending in Redis and
    // their reservations outlive this process, so nothing is lost.
    readiness.set(false);
    sweeper.abort();
    health.await??;
    tracing::info!("worker stopped");
    Ok(())
}

impl Worker {
    fn live(&self) -> Arc<Live> {
        self.live.borrow().clone()
    }

    fn runtime(&self) -> Arc<TableRuntime> {
        self.live().runtime.clone()
    }

    fn dead_letter_stream(&self) -> String {
        super::dead_letter_stream(&self.runtime())
    }

    fn result_timeout(&self) -> Duration {
        self.runtime().table.spec.clay.result_timeout.into()
    }

    async fn handle(
        &self,
        entry_id: String,
        fields: HashMap<String, redis::Value>,
    ) -> anyhow::Result<Handled> {
        let entry = SourceEntry {
            stream: self.stream.clone(),
            group: self.group.clone(),
            id: entry_id.clone(),
        };
        let field = |name: &str| {
            fields
                .get(name)
                .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
        };
        let runtime = self.runtime();
        let spec = &runtime.table.spec;
        let row_id = field("row_id").unwrap_or_else(|| format!("{}-{entry_id}", runtime.name));
        let dead_letter = self.dead_letter_stream();
        let row = match field("row").map(|r| serde_json::from_str::<Value>(&r)) {
            Some(Ok(row @ Value::Object(_))) => row,
            _ => {
                let raw = Value::String(field("row").unwrap_or_default());
                self.store
                    .dead_letter_entry(&dead_letter, &row_id, "InvalidRow", &raw, 0, &entry)
                    .await?;
                return Ok(Handled::Done);
            }
        };
        let key = match row.get(&spec.key) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => {
                self.store
                    .dead_letter_entry(&dead_letter, &row_id, "MissingKey", &row, 0, &entry)
                    .await?;
                return Ok(Handled::Done);
            }
        };
        let refresh = row
            .get("kiln_refresh")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if !refresh && let Some((at_ms, result)) = self.store.dedupe_lookup(&key).await? {
            let window: Duration = spec.dedupe_window.into();
            if now_ms() - at_ms < window.as_millis() as i64 {
                let sink = super::sink::route(&runtime, self.store.keys());
                self.store
                    .deliver_stored(&row_id, &key, &result, &row, &sink, &entry)
                    .await?;
                return Ok(Handled::Done);
            }
        }

        let reservation = format!("{row_id}-a1");
        let cost = spec.clay.credits_per_row.clone();
        match self.reserve(&reservation, &cost).await {
            Ok(()) => {}
            Err(LedgerClientError::Denied(denial)) => {
                if denial.reason == DenialReason::Exhausted
                    && denial.on_exhausted == OnExhausted::DeadLetter
                {
                    self.store
                        .dead_letter_entry(
                            &dead_letter,
                            &row_id,
                            "BudgetExhausted",
                            &row,
                            0,
                            &entry,
                        )
                        .await?;
                    return Ok(Handled::Done);
                }
                return Ok(Handled::Paused);
            }
            Err(other) => return Err(other.into()),
        }
        let pending = PendingRow {
            row_id: row_id.clone(),
            key,
            row,
            attempt: 1,
            reservation,
            reserved_credits: cost.data_credits,
            reserved_actions: cost.actions,
        };
        // Until Clay accepts the row, the deadline also covers the wait in the
        // rate limiter, so a queued row is never mistaken for a lost one.
        let deadline =
            now_ms() + (self.result_timeout() + self.queue_allowance()).as_millis() as i64;
        self.store.make_pending(&pending, deadline, &entry).await?;
        self.submit(&pending).await?;
        Ok(Handled::Done)
    }

    /// The longest a row may wait in the rate limiter: every in-flight row
    /// of this worker ahead of it, at the table's rate, plus a margin.
    fn queue_allowance(&self) -> Duration {
        let runtime = self.runtime();
        let spec = &runtime.table.spec;
        let rate = f64::from(spec.clay.rate_limit.rows_per_second.max(1));
        Duration::from_secs_f64(f64::from(spec.workers.concurrency) / rate)
            + Duration::from_secs(30)
    }

    async fn reserve(&self, id: &str, cost: &CreditCost) -> Result<(), LedgerClientError> {
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
    async fn close_reservation(&self, id: &str, used: CreditCost, failures: u64) {
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
    async fn submit(&self, pending: &PendingRow) -> anyhow::Result<()> {
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
                self.store.set_deadline(&pending.row_id, deadline).await?;
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
                    self.store
                        .dead_letter_pending(
                            &self.dead_letter_stream(),
                            &pending.row_id,
                            error.reason(),
                        )
                        .await?;
                } else {
                    // Due now: the sweeper retries it (or dead-letters it after maxAttempts).
                    self.store
                        .replace_pending(pending, now_ms(), &pending.reservation)
                        .await?;
                }
                Ok(())
            }
        }
    }

    /// Retries or dead-letters rows whose callback did not arrive in time,
    /// several at once.
    async fn sweep(self: &Arc<Self>) -> anyhow::Result<()> {
        let lease = now_ms() + SWEEP_LEASE_MS;
        let expired = self.store.take_expired(now_ms(), lease, 100).await?;
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
        let spent = CreditCost {
            data_credits: pending.reserved_credits,
            actions: pending.reserved_actions,
        };
        self.close_reservation(&pending.reservation, spent, 1).await;
        if pending.attempt >= self.runtime().table.spec.clay.max_attempts {
            tracing::warn!(row = %pending.row_id, attempts = pending.attempt, "dead-lettering a row whose result never came");
            self.store
                .dead_letter_pending(&self.dead_letter_stream(), &pending.row_id, "ResultTimeout")
                .await?;
            return Ok(());
        }
        let next = PendingRow {
            attempt: pending.attempt + 1,
            reservation: format!("{}-a{}", pending.row_id, pending.attempt + 1),
            ..pending.clone()
        };
        let cost = CreditCost {
            data_credits: next.reserved_credits,
            actions: next.reserved_actions,
        };
        match self.reserve(&next.reservation, &cost).await {
            Ok(()) => {}
            Err(LedgerClientError::Denied(denial))
                if denial.on_exhausted == OnExhausted::DeadLetter
                    && denial.reason == DenialReason::Exhausted =>
            {
                self.store
                    .dead_letter_pending(
                        &self.dead_letter_stream(),
                        &pending.row_id,
                        "BudgetExhausted",
                    )
                    .await?;
                return Ok(());
            }
            // Paused or unavailable: the row is retried when its lease ends.
            Err(_) => return Ok(()),
        }
        let deadline =
            now_ms() + (self.result_timeout() + self.queue_allowance()).as_millis() as i64;
        if self
            .store
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
