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
use tokio::sync::Semaphore;

use super::attempt::{Attempts, Live, now_ms};
use super::store::{Keys, PendingRow, RedisPendingRows, RedisStore, SourceEntry};
use super::{DataplaneArgs, TableRuntime};
use crate::api::budget::OnExhausted;
use crate::ledger::DenialReason;
use crate::ledger::client::LedgerClientError;
use crate::operator::metrics::{Readiness, serve_health};

/// How long a crashed consumer's entries wait before another worker takes them.
const RECLAIM_IDLE_MS: u64 = 30_000;
/// Pause after the budget refuses credits (rows stay in the stream).
const PAUSE_ON_DENIAL: Duration = Duration::from_secs(5);

#[derive(clap::Args, Clone, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub common: DataplaneArgs,
}

struct Worker {
    attempts: Arc<Attempts>,
    store: RedisStore,
    identity: String,
    stream: String,
    group: String,
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
    let dead_letter = super::dead_letter_stream(&runtime);
    let runtime = super::follow(client, runtime);
    let identity = args.common.identity();
    let attempts = Arc::new(Attempts {
        live: Live::follow(runtime.clone(), Arc::new(store.clone())),
        rows: Arc::new(RedisPendingRows {
            store: store.clone(),
            dead_letter,
        }),
        ledger: args.common.ledger(),
        identity: identity.clone(),
    });
    let worker = Arc::new(Worker {
        attempts,
        identity,
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

    let sweeper = tokio::spawn(worker.attempts.clone().sweep_until(shutdown.clone()));

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
    fn runtime(&self) -> Arc<TableRuntime> {
        self.attempts.runtime()
    }

    fn dead_letter_stream(&self) -> String {
        super::dead_letter_stream(&self.runtime())
    }

    async fn handle(
        &self,
        entry_id: String,
        fields: HashMap<String, redis::Value>,
    ) -> anyhow::Result<Handled> {
        let entry = SourceEntry::Stream {
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
        let key = match super::key_of(&row, &spec.key) {
            Some(key) => key,
            None => {
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
        match self.attempts.reserve(&reservation, &cost).await {
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
        self.store
            .make_pending(&pending, self.attempts.first_deadline(), &entry)
            .await?;
        self.attempts.submit(&pending).await?;
        Ok(Handled::Done)
    }
}
