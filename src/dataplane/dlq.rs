//! `kiln dlq list|replay --table NS/NAME`: inspect dead letters and send them
//! back through the pipeline (e.g. after a budget rollover or a fix in Clay).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::Message as _;

use super::TableRuntime;
use super::store::RedisStore;
use crate::contract::Keys;

#[derive(clap::Args, Clone, Debug)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub action: DlqAction,
}

#[derive(clap::Subcommand, Clone, Debug)]
pub enum DlqAction {
    /// Print dead letters as JSON lines: id, row id, reason, attempts, row.
    List {
        #[arg(long)]
        table: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Move dead letters back to the table's source (same row ids).
    Replay {
        #[arg(long)]
        table: String,
        /// Only dead letters with this reason (e.g. BudgetExhausted).
        #[arg(long)]
        reason: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

fn split(table: &str) -> anyhow::Result<(String, String)> {
    table
        .split_once('/')
        .map(|(ns, name)| (ns.to_string(), name.to_string()))
        .context("--table must be NAMESPACE/NAME")
}

pub async fn run(args: DlqArgs) -> anyhow::Result<()> {
    let table = match &args.action {
        DlqAction::List { table, .. } | DlqAction::Replay { table, .. } => table.clone(),
    };
    let (namespace, name) = split(&table)?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let runtime = TableRuntime::load(&client, &namespace, &name).await?;
    if let (Some(settings), Some(target)) = (
        runtime.kafka_dead_letter.clone(),
        runtime
            .table
            .spec
            .dead_letter
            .as_ref()
            .and_then(|d| d.kafka.clone()),
    ) {
        return kafka_dead_letters(&runtime, &settings, &target.topic, args.action).await;
    }
    let url = runtime
        .redis_url
        .clone()
        .context("dead letters live in Redis: the table has no spec.redis")?;
    let store = RedisStore::connect(url.expose(), Keys::new(&namespace, &name)).await?;
    let dead_letter = super::dead_letter_stream(&runtime);
    match args.action {
        DlqAction::List { limit, .. } => {
            for (id, fields) in store.range(&dead_letter, limit).await? {
                let row: serde_json::Value = fields
                    .get("row")
                    .and_then(|r| serde_json::from_str(r).ok())
                    .unwrap_or_default();
                println!(
                    "{}",
                    serde_json::json!({"id": id, "rowId": fields.get("row_id"), "reason": fields.get("reason"), "attempts": fields.get("attempts"), "row": row})
                );
            }
        }
        DlqAction::Replay { reason, limit, .. } => {
            let source = super::source_stream(&runtime, &store);
            let mut replayed = 0;
            for (id, fields) in store.range(&dead_letter, limit).await? {
                if reason
                    .as_ref()
                    .is_some_and(|r| fields.get("reason") != Some(r))
                {
                    continue;
                }
                if store.replay(&dead_letter, &id, &source).await? {
                    replayed += 1;
                }
            }
            println!("replayed {replayed} dead letters into {source}");
        }
    }
    Ok(())
}

/// How long a dead-letter topic read waits for more records before it
/// counts as caught up.
const CAUGHT_UP: Duration = Duration::from_secs(5);
/// How long the first record may take (joining the consumer group).
const FIRST_RECORD: Duration = Duration::from_secs(15);

/// Tier Event: dead letters are records on the dead-letter topic (the
/// original row, reason and attempts in headers). Listing reads the topic
/// from the start; replaying publishes the rows back to the source topic
/// through the consumer group `kiln-dlq-replay-<table>[-<reason>]`, whose
/// committed offsets make each dead letter replayed once.
async fn kafka_dead_letters(
    runtime: &TableRuntime,
    settings: &super::kafka::KafkaSettings,
    topic: &str,
    action: DlqAction,
) -> anyhow::Result<()> {
    let (group, limit, reason) = match &action {
        DlqAction::List { limit, .. } => (
            format!("kiln-dlq-list-{}", uuid::Uuid::new_v4().simple()),
            *limit,
            None,
        ),
        DlqAction::Replay { reason, limit, .. } => (
            match reason {
                Some(reason) => format!("kiln-dlq-replay-{}-{reason}", runtime.name),
                None => format!("kiln-dlq-replay-{}", runtime.name),
            },
            *limit,
            reason.clone(),
        ),
    };
    let consumer = Arc::new(settings.consumer(&group, topic)?);
    let mut read = Vec::new();
    while read.len() < limit {
        // The first record also waits for the group to be joined.
        let wait = if read.is_empty() {
            FIRST_RECORD
        } else {
            CAUGHT_UP
        };
        match tokio::time::timeout(wait, consumer.recv()).await {
            Ok(Ok(message)) => read.push(message.detach()),
            Ok(Err(error)) => return Err(error).context("reading the dead-letter topic"),
            Err(_) => break,
        }
    }
    let header = |m: &rdkafka::message::OwnedMessage, name: &str| {
        super::kafka::header(m, name).unwrap_or_default()
    };
    let row = |m: &rdkafka::message::OwnedMessage| {
        m.payload()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default()
    };
    match action {
        DlqAction::List { .. } => {
            for message in &read {
                let parsed: serde_json::Value =
                    serde_json::from_str(&row(message)).unwrap_or_default();
                println!(
                    "{}",
                    serde_json::json!({
                        "partition": message.partition(), "offset": message.offset(),
                        "rowId": header(message, "kiln-row-id"), "reason": header(message, "kiln-reason"),
                        "attempts": header(message, "kiln-attempts"), "detail": header(message, "kiln-detail"),
                        "row": parsed
                    })
                );
            }
        }
        DlqAction::Replay { .. } => {
            let source = runtime
                .table
                .spec
                .source
                .kafka
                .as_ref()
                .context("replaying needs the table's source topic")?;
            let producer = runtime
                .kafka_source
                .as_ref()
                .context("replaying needs the source's brokers")?
                .producer()?;
            let mut replayed = 0;
            for message in &read {
                if reason
                    .as_ref()
                    .is_some_and(|r| *r != header(message, "kiln-reason"))
                {
                    continue;
                }
                let key = message
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned());
                super::kafka::publish(&producer, &source.topic, key.as_deref(), &row(message), &[])
                    .await
                    .with_context(|| format!("publishing to {}", source.topic))?;
                replayed += 1;
            }
            // Only after every replayed row is on the source topic.
            if !read.is_empty() {
                super::kafka::commit(&consumer, &read).await?;
            }
            println!("replayed {replayed} dead letters into {}", source.topic);
        }
    }
    Ok(())
}
