//! `kiln dlq list|replay --table NS/NAME`: inspect dead letters and send them
//! back through the pipeline (e.g. after a budget rollover or a fix in Clay).

use anyhow::Context as _;

use super::TableRuntime;
use super::store::{Keys, RedisStore};

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
