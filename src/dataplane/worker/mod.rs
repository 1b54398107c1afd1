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
use rdkafka::Message as _;
use tokio::sync::Semaphore;

mod handling;
#[cfg(test)]
mod tests;

use self::handling::RowHandling;
use super::DataplaneArgs;
use super::attempt::{Attempts, Live};
use super::store::{RedisRows, RedisStore, SourceEntry, text_field};
use crate::contract::Keys;
use crate::health::{Readiness, serve_health};

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
    rows: Arc<RowHandling>,
    /// The source streams and consumer groups.
    store: RedisStore,
    identity: String,
    source: Source,
}

/// Where rows are read from.
enum Source {
    /// A Redis Stream (the receiver's inbox or spec.source.redisStream).
    Stream { stream: String, group: String },
    /// A Kafka topic through a consumer group (tier Event).
    Kafka {
        consumer: Arc<super::kafka::KafkaConsumer>,
        topic: String,
    },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stream { stream, .. } => write!(f, "redis stream {stream}"),
            Self::Kafka { topic, .. } => write!(f, "kafka topic {topic}"),
        }
    }
}

/// One row read from the source.
#[derive(Clone)]
struct Item {
    entry: SourceEntry,
    row_id: String,
    /// The row's JSON text, as read.
    raw: Option<String>,
}

/// A Redis Stream entry as an [`Item`]: rows carry their id (set by the
/// receiver); entries written by others get one from the entry id.
fn stream_item(
    table: &str,
    stream: &str,
    group: &str,
    id: String,
    fields: HashMap<String, redis::Value>,
) -> Item {
    let field = |name: &str| text_field(&fields, name);
    Item {
        row_id: field("row_id").unwrap_or_else(|| format!("{table}-{id}")),
        raw: field("row"),
        entry: SourceEntry::Stream {
            stream: stream.to_string(),
            group: group.to_string(),
            id,
        },
    }
}

/// How long a Kafka batch waits for more records after the first.
const KAFKA_LINGER: Duration = Duration::from_millis(50);

/// Waits out a budget refusal; true when shutdown came first.
async fn pause(shutdown: &(impl std::future::Future<Output = ()> + Clone)) -> bool {
    tracing::info!("the budget refused credits; pausing consumption (rows stay in the source)");
    tokio::select! {
        _ = shutdown.clone() => true,
        _ = tokio::time::sleep(PAUSE_ON_DENIAL) => false,
    }
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let (client, runtime) = args.common.load_table().await?;
    let (namespace, name) = (runtime.namespace.clone(), runtime.name.clone());
    let redis_url = runtime
        .redis_url
        .clone()
        .context("the worker needs spec.redis (tiers Queue and Event)")?;
    let store = RedisStore::connect(redis_url.expose(), Keys::new(&namespace, &name))
        .await
        .context("connecting to Redis")?;
    let source = match (&runtime.table.spec.source.kafka, &runtime.kafka_source) {
        (Some(kafka), Some(settings)) => {
            let group = kafka
                .consumer_group
                .clone()
                .unwrap_or_else(|| format!("kiln-{name}"));
            Source::Kafka {
                consumer: Arc::new(
                    settings
                        .consumer(&group, &kafka.topic)
                        .context("creating the Kafka consumer")?,
                ),
                topic: kafka.topic.clone(),
            }
        }
        _ => {
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
            Source::Stream { stream, group }
        }
    };
    let dead_letter = super::dead_letter_stream(&runtime);
    let runtime = super::follow(client, runtime);
    let identity = args.common.identity();
    let lease = args.common.lease(&runtime.borrow(), &identity)?;
    let rows = Arc::new(RedisRows {
        store: store.clone(),
        dead_letter,
    });
    let attempts = Arc::new(Attempts {
        live: Live::follow(runtime.clone(), Arc::new(store.clone()), &lease),
        rows: rows.clone(),
        lease,
    });
    let worker = Arc::new(Worker {
        rows: Arc::new(RowHandling { attempts, rows }),
        identity,
        store,
        source,
    });

    let shutdown = super::stop_signal(runtime).shared();
    let readiness = Readiness::default();
    let mut registry = Registry::default();
    crate::metrics::dataplane().register(&mut registry);
    let health = tokio::spawn(serve_health(
        args.common.health_addr,
        registry,
        readiness.clone(),
        shutdown.clone(),
    ));
    readiness.set(true);
    tracing::info!(table = %args.common.table, source = %worker.source, identity = %worker.identity, "worker started");

    let sweeper = tokio::spawn(worker.rows.attempts.clone().sweep_until(shutdown.clone()));

    let mut concurrency = worker.rows.runtime().table.spec.workers.concurrency as usize;
    let permits = Arc::new(Semaphore::new(concurrency));
    loop {
        let workers = worker.rows.runtime().table.spec.workers.clone();
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
        let stopped = match &worker.source {
            Source::Stream { stream, group } => {
                let read = tokio::select! {
                    _ = shutdown.clone() => break,
                    read = worker.store.read(stream, group, &worker.identity, batch, 1000, RECLAIM_IDLE_MS) => read,
                };
                let entries = match read {
                    Ok(entries) => entries,
                    Err(error) => {
                        tracing::warn!(%error, "reading the source stream failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let items = entries
                    .into_iter()
                    .map(|(id, fields)| {
                        stream_item(&worker.rows.runtime().name, stream, group, id, fields)
                    })
                    .collect();
                // What was not handled stays unacknowledged and is read again.
                let (_, paused) = worker.rows.handle_all(items, &permits).await;
                paused && pause(&shutdown).await
            }
            Source::Kafka { consumer, topic } => {
                let read = tokio::select! {
                    _ = shutdown.clone() => break,
                    read = super::kafka::next_batch(consumer, batch, KAFKA_LINGER) => read,
                };
                let messages = match read {
                    Ok(messages) => messages,
                    Err(error) => {
                        tracing::warn!(%error, topic = %topic, "reading the source topic failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                crate::metrics::dataplane().rows("received", "ok", messages.len() as u64);
                let name = worker.rows.runtime().name.clone();
                let mut items: Vec<Item> = messages
                    .iter()
                    .map(|m| Item {
                        entry: SourceEntry::Kafka,
                        row_id: super::kafka::row_id(&name, m.topic(), m.partition(), m.offset()),
                        raw: m.payload().map(|p| String::from_utf8_lossy(p).into_owned()),
                    })
                    .collect();
                // Offsets are committed only once every row of the batch is
                // pending or terminal; until then the batch is retried here.
                let mut stopped = false;
                while !items.is_empty() && !stopped {
                    let (retry, paused) = worker.rows.handle_all(items, &permits).await;
                    items = retry;
                    if !items.is_empty() {
                        stopped = if paused {
                            pause(&shutdown).await
                        } else {
                            tokio::select! {
                                _ = shutdown.clone() => true,
                                _ = tokio::time::sleep(Duration::from_secs(1)) => false,
                            }
                        };
                    }
                }
                if !stopped && let Err(error) = super::kafka::commit(consumer, &messages).await {
                    // The rows are safe; a replay of them is recognized as such.
                    tracing::warn!(error = %format!("{error:#}"), "committing offsets failed");
                }
                stopped
            }
        };
        if stopped {
            break;
        }
    }
    // Graceful: stop taking rows; in-flight rows are pending in Redis and
    // already counted as spent; the lease reports the rest and is closed.
    readiness.set(false);
    sweeper.abort();
    worker.rows.attempts.lease.close().await;
    health.await??;
    tracing::info!("worker stopped");
    Ok(())
}
