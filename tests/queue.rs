//! The Queue tier end to end on real components: the control plane and the
//! operator (ledger), Redis, `kiln clay-sim` with faults, and `kiln worker` /
//! `kiln receiver` run as local processes with their pod-template arguments
//! and their table's ServiceAccount credentials.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};

use kiln::api::{CreditBudget, EnrichmentTable};
use support::pipeline::{leads, pipeline, wait_terminal};
use support::wait;

#[tokio::test]
async fn two_thousand_rows_through_faults_and_crashes_end_exactly_once_within_budget() {
    let p = pipeline(
        "queue-e2e",
        &[
            "--latency-min-ms",
            "20",
            "--latency-max-ms",
            "300",
            "--rate",
            "1000",
            "--burst",
            "1000",
            "--error-rate",
            "0.05",
            "--drop-rate",
            "0.03",
            "--duplicate-rate",
            "0.03",
            "--provider",
            "email:1:0.9",
            "--provider",
            "phone:5:0.5",
            "--seed",
            "7",
        ],
        1_000_000.0,
        "Pause",
        false,
    )
    .await;
    let mut receiver = p.receiver();
    let mut worker = p.worker();
    let rows = leads(2000, 0);
    p.push(&rows[..1000]).await;

    // Crash both once mid-run, then bring them back as a pod restart would.
    wait::until_within("some rows delivered", Duration::from_secs(120), || async {
        (p.stream("leads:enriched").await.len() >= 200).then_some(())
    })
    .await;
    worker.process.kill_hard();
    receiver.process.kill_hard();
    let _receiver = p.receiver();
    p.push(&rows[1000..]).await;
    let _worker = p.worker();

    let (delivered, dead) = wait_terminal(&p, 2000).await;
    // Every row ends in exactly one terminal state.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for entry in delivered.iter().chain(dead.iter()) {
        *seen.entry(entry["row_id"].clone()).or_default() += 1;
    }
    assert_eq!(seen.len(), 2000, "every row reached a terminal state");
    assert!(
        seen.values().all(|n| *n == 1),
        "no row was delivered twice or both delivered and dead-lettered"
    );
    for entry in &dead {
        assert!(
            !entry["reason"].is_empty(),
            "dead letters carry a reason: {entry:?}"
        );
    }
    let delivered_keys: std::collections::HashSet<String> =
        delivered.iter().map(|e| e["key"].clone()).collect();
    assert_eq!(delivered_keys.len(), delivered.len());

    // Nothing left pending, no reservation left open, spend accounted conservatively.
    let budget_api = p.env.api::<CreditBudget>();
    let status = wait::until("all reservations closed", || async {
        let status = budget_api.get("team").await.ok()?.status?;
        status.reservations.is_empty().then_some(status)
    })
    .await;
    let sim = p.sim.stats().await;
    assert!(
        sim.callbacks_duplicated > 0 && sim.callbacks_dropped > 0 && sim.injected_errors > 0,
        "faults happened: {sim:?}"
    );
    assert!(
        sim.data_credits_charged <= status.used.data_credits + 1e-6,
        "the ledger never under-counts Clay: sim charged {} ledger {}",
        sim.data_credits_charged,
        status.used.data_credits
    );

    // The operator reports the same counts in the table's status.
    let tables = p.env.api::<EnrichmentTable>();
    let (delivered_count, dead_count) = (delivered.len() as u64, dead.len() as u64);
    wait::until("the table status counters", || async {
        let rows = tables.get("leads").await.ok()?.status?.rows;
        (rows.received == 2000
            && rows.delivered == delivered_count
            && rows.dead_lettered == dead_count
            && rows.pending == 0)
            .then_some(())
    })
    .await;

    // Same keys again inside the de-dupe window: zero credits.
    let charged_before = sim.data_credits_charged;
    p.push(&rows[..500]).await;
    wait::until_within(
        "the repeated keys delivered from the store",
        Duration::from_secs(120),
        || async {
            let delivered = p.stream("leads:enriched").await;
            let deduped = delivered
                .iter()
                .filter(|e| e.get("deduplicated").is_some())
                .count();
            (deduped >= 500 - dead.iter().filter(|d| leads_index(&d["row"]) < 500).count())
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        p.sim.stats().await.data_credits_charged,
        charged_before,
        "repeated keys cost nothing"
    );
}

/// The lead number of a dead-lettered row's JSON (its email is leadN@...).
fn leads_index(row: &str) -> usize {
    serde_json::from_str::<Value>(row)
        .ok()
        .and_then(|r| {
            r["email"]
                .as_str()?
                .strip_prefix("lead")?
                .split('@')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(usize::MAX)
}

#[tokio::test]
async fn without_faults_the_ledger_matches_what_clay_charged_and_the_budget_holds() {
    let p = pipeline(
        "queue-budget",
        &[
            "--latency-min-ms",
            "10",
            "--latency-max-ms",
            "50",
            "--rate",
            "1000",
            "--burst",
            "1000",
            "--provider",
            "email:2:1.0",
            "--seed",
            "3",
        ],
        200.0,
        "Pause",
        false,
    )
    .await;
    let _receiver = p.receiver();
    let _worker = p.worker();
    // 8 credits reserved per row against a 200-credit budget: at most 25 rows
    // can be in flight at once, each costs 2; the budget pauses the worker at the limit.
    p.push(&leads(150, 0)).await;
    let (delivered, dead) = wait_terminal(&p, 96).await;
    assert!(dead.is_empty(), "no faults, no dead letters: {dead:?}");
    let status = wait::until("reservations settled", || async {
        let status = p.env.api::<CreditBudget>().get("team").await.ok()?.status?;
        (status.reservations.is_empty() && status.used.data_credits >= 192.0).then_some(status)
    })
    .await;
    let sim = p.sim.stats().await;
    assert_eq!(
        sim.data_credits_charged, status.used.data_credits,
        "ledger settled exactly what Clay charged"
    );
    assert!(status.used.data_credits <= 200.0, "never over the limit");
    assert!(
        delivered.len() <= 100,
        "at 2 credits a row at most 100 rows fit in 200 credits"
    );
    // The rest waits in the stream (Pause), not lost: unread or unacknowledged.
    let client = redis::Client::open(p.redis.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(format!("kiln:{}/leads:inbox", p.env.namespace))
        .query_async(&mut conn)
        .await
        .unwrap();
    let number = |name: &str| redis::from_redis_value::<i64>(groups[0][name].clone()).unwrap();
    assert_eq!(
        (number("pending") + number("lag")) as usize,
        150 - delivered.len(),
        "every row not yet enriched is still in the source stream"
    );
}

#[tokio::test]
async fn budget_dead_letters_are_replayed_once_after_the_limit_is_raised() {
    let p = pipeline(
        "queue-replay",
        &[
            "--latency-min-ms",
            "10",
            "--latency-max-ms",
            "50",
            "--rate",
            "1000",
            "--burst",
            "1000",
            "--provider",
            "email:2:1.0",
        ],
        24.0,
        "DeadLetter",
        false,
    )
    .await;
    let _receiver = p.receiver();
    let _worker = p.worker();
    p.push(&leads(20, 0)).await;
    let (delivered, dead) = wait_terminal(&p, 20).await;
    assert!(
        !dead.is_empty(),
        "the small budget sent rows to the dead letters"
    );
    assert!(
        dead.iter().all(|d| d["reason"] == "BudgetExhausted"),
        "{dead:?}"
    );
    let used = p
        .env
        .api::<CreditBudget>()
        .get("team")
        .await
        .unwrap()
        .status
        .unwrap()
        .used
        .data_credits;
    assert!(used <= 24.0);

    // Raise the limit (takes effect at once), then replay.
    p.env
        .api::<CreditBudget>()
        .patch(
            "team",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"limits": {"dataCredits": 1000.0}}})),
        )
        .await
        .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KUBECONFIG", &p.kubeconfig)
        .args([
            "--log-format",
            "text",
            "dlq",
            "replay",
            "--table",
            &p.table(),
            "--reason",
            "BudgetExhausted",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        String::from_utf8_lossy(&output.stdout)
            .contains(&format!("replayed {} dead letters", dead.len()))
    );

    let delivered_all = wait::until_within(
        "the replayed rows delivered",
        Duration::from_secs(120),
        || async {
            let delivered = p.stream("leads:enriched").await;
            (delivered.len() == 20).then_some(delivered)
        },
    )
    .await;
    assert!(
        p.stream("leads:dead").await.is_empty(),
        "replayed dead letters leave the stream"
    );
    let ids: std::collections::HashSet<&String> =
        delivered_all.iter().map(|e| &e["row_id"]).collect();
    assert_eq!(
        ids.len(),
        20,
        "each row delivered exactly once, replayed ones keep their row id"
    );
    assert!(delivered.iter().all(|d| ids.contains(&d["row_id"])));
    // `kiln dlq list` shows nothing left.
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KUBECONFIG", &p.kubeconfig)
        .args(["dlq", "list", "--table", &p.table()])
        .output()
        .unwrap();
    assert!(listed.status.success());
    assert!(listed.stdout.is_empty());
}

#[tokio::test]
async fn a_redis_restart_with_appendonly_loses_no_row() {
    let mut p = pipeline(
        "queue-redis-restart",
        &[
            "--latency-min-ms",
            "50",
            "--latency-max-ms",
            "400",
            "--rate",
            "1000",
            "--burst",
            "1000",
            "--provider",
            "email:1:1.0",
        ],
        1_000_000.0,
        "Pause",
        true,
    )
    .await;
    let _receiver = p.receiver();
    let _worker = p.worker();
    let rows = leads(600, 0);
    p.push(&rows[..300]).await;
    wait::until_within("some rows delivered", Duration::from_secs(120), || async {
        (p.stream("leads:enriched").await.len() >= 50).then_some(())
    })
    .await;
    // Crash Redis and bring it back on the same port and data directory.
    p.redis.process.kill_hard();
    p.redis = support::start_redis_on(&p.test, p.redis.port, true).await;
    p.push(&rows[300..]).await;

    let (delivered, dead) = wait_terminal(&p, 600).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for entry in delivered.iter().chain(dead.iter()) {
        *seen.entry(entry["row_id"].clone()).or_default() += 1;
    }
    assert_eq!(seen.len(), 600, "no row was lost across the Redis restart");
    assert!(
        seen.values().all(|n| *n == 1),
        "and none was delivered twice"
    );
}
