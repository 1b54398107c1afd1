//! The Event tier end to end on real components: the control plane and the
//! operator (ledger), a real Kafka broker (KRaft) and Redis, `kiln clay-sim`
//! with faults, and `kiln worker` / `kiln receiver` as local processes with
//! their pod-template arguments and their table's credentials.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::Message as _;
use rdkafka::message::OwnedMessage;
use serde_json::json;

use kiln::api::CreditBudget;
use support::event::{Event, event, produce};
use support::kafka::{read_topic, read_topic_within};
use support::pipeline::{FAULTY_CLAY, QUICK_CLAY};
use support::wait;

fn header(message: &OwnedMessage, name: &str) -> String {
    kiln::dataplane::kafka::header(message, name).unwrap_or_default()
}

#[tokio::test]
async fn five_thousand_records_end_exactly_once_through_faults_a_worker_crash_and_a_broker_restart()
{
    let mut e = event(
        "event-e2e",
        &[FAULTY_CLAY, &["--provider", "email:1:0.9", "--seed", "9"]].concat(),
        1_000_000.0,
        "Pause",
    )
    .await;
    let _receiver = e.start("receiver", "receiver-0");
    let mut worker = e.start("worker", "worker-0");
    let rows: Vec<serde_json::Value> = (0..5000)
        .map(|i| json!({"email": format!("contact{i}@example.com"), "company": format!("Co {i}")}))
        .collect();
    produce(&e.kafka.bootstrap, "contacts.raw", &rows).await;

    // Kill -9 the worker once mid-run and start another, as a pod restart would.
    let progress = |n: u64| {
        let sim = &e.base.sim;
        async move {
            wait::until_within("progress", Duration::from_secs(180), || async {
                (sim.stats().await.rows_accepted >= n).then_some(())
            })
            .await
        }
    };
    progress(1000).await;
    worker.process.kill_hard();
    let _worker = e.start("worker", "worker-1");
    // And restart the broker once.
    progress(3000).await;
    e.kafka.restart().await;

    let bootstrap = e.kafka.bootstrap.clone();
    let records = read_topic_within(
        &bootstrap,
        &["contacts.enriched", "contacts.dead"],
        |read| {
            let ids: std::collections::HashSet<String> =
                read.iter().map(|m| header(m, "kiln-row-id")).collect();
            ids.len() >= 5000
        },
    )
    .await
    .unwrap_or_else(|partial| partial);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for record in &records {
        *seen.entry(header(record, "kiln-row-id")).or_default() += 1;
    }
    if seen.len() < 5000 {
        let mut conn = redis::Client::open(e.redis.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let prefix = format!("kiln:{}/leads", e.base.env.namespace);
        let counters: HashMap<String, i64> =
            redis::AsyncCommands::hgetall(&mut conn, format!("{prefix}:counters"))
                .await
                .unwrap();
        let pending: i64 = redis::AsyncCommands::hlen(&mut conn, format!("{prefix}:pending"))
            .await
            .unwrap();
        let outbox: i64 = redis::AsyncCommands::xlen(&mut conn, format!("{prefix}:outbox"))
            .await
            .unwrap();
        let dead: i64 = redis::AsyncCommands::xlen(&mut conn, format!("{prefix}:dead-letter"))
            .await
            .unwrap();
        panic!(
            "{} of 5000 records reached a terminal topic; counters {counters:?}, pending {pending}, outbox {outbox}, dead-letter outbox {dead}; sim {:?}",
            seen.len(),
            e.base.sim.stats().await
        );
    }
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "no record was published twice: {repeated:?}"
    );
    for record in records.iter().filter(|r| r.topic() == "contacts.dead") {
        assert!(
            !header(record, "kiln-reason").is_empty(),
            "dead letters carry a reason"
        );
    }
    let enriched = records
        .iter()
        .filter(|r| r.topic() == "contacts.enriched")
        .count();
    assert!(enriched > 4500, "most records were enriched: {enriched}");
    // Results are keyed by the incoming row's key (enrichment may overwrite
    // the column) and carry the correlation id in a header and the body.
    let inputs: std::collections::HashSet<&str> =
        rows.iter().filter_map(|r| r["email"].as_str()).collect();
    for record in records.iter().filter(|r| r.topic() == "contacts.enriched") {
        let key = record
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned());
        assert!(
            inputs.contains(key.as_deref().unwrap_or_default()),
            "{key:?}"
        );
        let payload: serde_json::Value = serde_json::from_slice(record.payload().unwrap()).unwrap();
        assert_eq!(
            payload["kiln_row_id"].as_str(),
            Some(header(record, "kiln-row-id").as_str())
        );
    }

    let sim = e.base.sim.stats().await;
    assert!(
        sim.callbacks_duplicated > 0 && sim.callbacks_dropped > 0 && sim.injected_errors > 0,
        "faults happened: {sim:?}"
    );
    // Every row Clay charged is spent in the ledger or still held by a
    // lease (the killed worker's, until it is forfeited as spent).
    let status = support::budget_when(
        &e.base.env,
        "the live processes' spend reported",
        |status| {
            status.used.data_credits + status.reserved.data_credits
                >= sim.data_credits_charged - 1e-6
        },
    )
    .await;
    assert!(
        sim.data_credits_charged <= status.used.data_credits + status.reserved.data_credits + 1e-6,
        "the ledger never under-counts Clay: sim {} ledger {}",
        sim.data_credits_charged,
        status.used.data_credits
    );
}

/// Runs `kiln dlq replay` as the table's ServiceAccount; returns its output.
async fn replay(e: &Event, reason: &str) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KUBECONFIG", &e.kubeconfig)
        .args(["dlq", "replay", "--table"])
        .arg(format!("{}/leads", e.base.env.namespace))
        .args(["--reason", reason])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn budget_dead_letters_on_the_topic_are_replayed_once_after_the_limit_is_raised() {
    // Each row is reserved and charged 8 credits: 80 credits fit ten rows.
    let e = event(
        "event-budget",
        &[QUICK_CLAY, &["--provider", "email:8:1.0", "--seed", "2"]].concat(),
        80.0,
        "DeadLetter",
    )
    .await;
    let _receiver = e.start("receiver", "receiver-0");
    let _worker = e.start("worker", "worker-0");
    let rows: Vec<serde_json::Value> = (0..30)
        .map(|i| json!({"email": format!("lead{i}@example.com")}))
        .collect();
    produce(&e.kafka.bootstrap, "contacts.raw", &rows).await;
    let bootstrap = e.kafka.bootstrap.clone();
    let first = read_topic(
        &bootstrap,
        &["contacts.enriched", "contacts.dead"],
        |read| read.len() >= 30,
    )
    .await;
    let dead: Vec<_> = first
        .iter()
        .filter(|r| r.topic() == "contacts.dead")
        .collect();
    let enriched = first.len() - dead.len();
    assert_eq!(enriched, 10, "ten rows fit the budget");
    for record in &dead {
        assert_eq!(header(record, "kiln-reason"), "BudgetExhausted");
    }

    // More budget, then replay: the dead letters are enriched, once.
    e.base
        .env
        .api::<CreditBudget>()
        .patch(
            "team",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"limits": {"dataCredits": 1000.0}}})),
        )
        .await
        .unwrap();
    support::budget_when(&e.base.env, "the budget to have room", |status| {
        status.remaining.data_credits >= 500.0
    })
    .await;
    assert!(replay(&e, "BudgetExhausted").await.contains("replayed 20 "));
    assert!(
        replay(&e, "BudgetExhausted").await.contains("replayed 0 "),
        "a dead letter is replayed once"
    );
    let all = read_topic(&bootstrap, &["contacts.enriched"], |read| read.len() >= 30).await;
    let mut by_key: HashMap<String, usize> = HashMap::new();
    for record in &all {
        let key = record
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned());
        *by_key.entry(key.unwrap_or_default()).or_default() += 1;
    }
    assert_eq!(by_key.len(), 30, "every row was enriched");
    assert!(
        by_key.values().all(|n| *n == 1),
        "each exactly once: {by_key:?}"
    );
    assert_eq!(e.base.sim.stats().await.rows_accepted, 30);
}
