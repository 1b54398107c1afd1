//! The Queue tier end to end on real components: the control plane and the
//! operator (ledger), Redis, `kiln clay-sim` with faults, and `kiln worker` /
//! `kiln receiver` run as local processes with their pod-template arguments
//! and their table's ServiceAccount credentials.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::{Value, json};

use kiln::api::{CreditBudget, EnrichmentTable};
use support::pipeline::{FAULTY_CLAY, QUICK_CLAY, leads, pipeline, wait_terminal};
use support::wait;

#[tokio::test]
async fn two_thousand_rows_through_faults_and_crashes_end_exactly_once_within_budget() {
    let p = pipeline(
        "queue-e2e",
        &[
            FAULTY_CLAY,
            &[
                "--provider",
                "email:1:0.9",
                "--provider",
                "phone:5:0.5",
                "--seed",
                "7",
            ],
        ]
        .concat(),
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

    // Nothing left pending; spend accounted conservatively: every row Clay
    // charged is spent in the ledger or still held by a lease (a killed
    // worker's, until it is forfeited as spent).
    let sim = p.sim.stats().await;
    let status = support::budget_when(&p.env, "the live processes' spend reported", |status| {
        status.used.data_credits + status.reserved.data_credits >= sim.data_credits_charged - 1e-6
    })
    .await;
    assert!(
        sim.callbacks_duplicated > 0 && sim.callbacks_dropped > 0 && sim.injected_errors > 0,
        "faults happened: {sim:?}"
    );
    assert!(
        sim.data_credits_charged <= status.used.data_credits + status.reserved.data_credits + 1e-6,
        "the ledger never under-counts Clay: sim charged {} ledger {:?}",
        sim.data_credits_charged,
        status
    );

    // The operator reports the same counts in the table's status.
    let tables = p.env.api::<EnrichmentTable>();
    let (delivered_count, dead_count) = (delivered.len() as u64, dead.len() as u64);
    let mut dead_by_reason = std::collections::BTreeMap::<String, u64>::new();
    for entry in &dead {
        *dead_by_reason.entry(entry["reason"].clone()).or_default() += 1;
    }
    let status = wait::until("the table status counters", || async {
        let status = tables.get("leads").await.ok()?.status?;
        let rows = &status.rows;
        (rows.received == 2000
            && rows.delivered == delivered_count
            && rows.dead_lettered == dead_count
            && rows.dead_lettered_by_reason == dead_by_reason
            && rows.pending == 0)
            .then_some(status)
    })
    .await;
    // Every delivered row went through a webhook source at least once.
    let through_sources: u64 = status.webhook_source_rows.values().sum();
    assert!(
        through_sources >= delivered_count,
        "{:?}",
        status.webhook_source_rows
    );

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
        &[QUICK_CLAY, &["--provider", "email:2:1.0", "--seed", "3"]].concat(),
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
    let sim = p.sim.stats().await;
    let status = support::budget_when(&p.env, "spend settled to what Clay charged", |status| {
        (status.used.data_credits - sim.data_credits_charged).abs() < 1e-6
    })
    .await;
    assert_eq!(
        sim.data_credits_charged, status.used.data_credits,
        "ledger settled exactly what Clay charged"
    );
    assert!(status.used.data_credits <= 200.0, "never over the limit");
    assert!(
        delivered.len() <= 100,
        "at 2 credits a row at most 100 rows fit in 200 credits"
    );
    // The rest waits in the stream (Pause), not lost: unread or
    // unacknowledged. Rows may still trickle through as refunds free room,
    // so this polls for a moment when the counts agree.
    let conn = support::redis_connection(&p.redis.url).await;
    let inbox = format!("kiln:{}/leads:inbox", p.env.namespace);
    wait::until(
        "every row not yet enriched still in the source stream",
        || {
            let (mut conn, inbox, p) = (conn.clone(), inbox.clone(), &p);
            async move {
                let delivered = p.stream("leads:enriched").await.len();
                let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(&inbox)
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                let number =
                    |name: &str| redis::from_redis_value::<i64>(groups[0][name].clone()).unwrap();
                let waiting = (number("pending") + number("lag")) as usize;
                assert!(
                    delivered <= 100,
                    "at 2 credits a row at most 100 rows fit in 200 credits"
                );
                (waiting == 150 - delivered).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test]
async fn budget_dead_letters_are_replayed_once_after_the_limit_is_raised() {
    let p = pipeline(
        "queue-replay",
        &[QUICK_CLAY, &["--provider", "email:2:1.0"]].concat(),
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

#[tokio::test]
async fn the_http_sink_updates_the_crm_once_per_row_through_retries_a_crash_and_a_live_spec_change()
{
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Patch, PatchParams, PostParams};

    let p = pipeline(
        "queue-http-sink",
        &[
            "--latency-min-ms",
            "10",
            "--latency-max-ms",
            "100",
            "--rate",
            "1000",
            "--burst",
            "1000",
            "--seed",
            "11",
        ],
        1_000_000.0,
        "Pause",
        false,
    )
    .await;
    let (crm_port, calls) = support::crm::start(|path, earlier| {
        // Refuses lead150 for good; fails the first attempt of every seventh lead.
        let index = leads_index(&format!(
            "{{\"email\":\"{}\"}}",
            path.trim_start_matches("/leads/").replace("%40", "@")
        ));
        if index == 150 {
            400
        } else if index.is_multiple_of(7) && earlier == 0 {
            503
        } else {
            204
        }
    })
    .await;
    let headers: Secret = serde_json::from_value(json!({
        "metadata": {"name": "crm-headers"},
        "stringData": {"Authorization": "Bearer crm-api-key"}
    }))
    .unwrap();
    p.env
        .api::<Secret>()
        .create(&PostParams::default(), &headers)
        .await
        .unwrap();
    let mut receiver = p.receiver();
    let _worker = p.worker();

    // First on the Redis Stream sink.
    p.push(&leads(20, 0)).await;
    wait_terminal(&p, 20).await;

    // Switch the running table to the CRM; the processes follow without a restart.
    let tables = p.env.api::<EnrichmentTable>();
    tables
        .patch(
            "leads",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sink": {"redisStream": null, "http": {
                "method": "PATCH",
                "urlTemplate": format!("http://127.0.0.1:{crm_port}/leads/{{email}}"),
                "headersSecretName": "crm-headers",
                "maxAttempts": 3
            }}}})),
        )
        .await
        .unwrap();
    let mut probe = 1000;
    wait::until_within(
        "the receiver to follow the new sink",
        Duration::from_secs(60),
        || {
            probe += 1;
            let row = leads(1, probe);
            let p = &p;
            let calls = calls.clone();
            async move {
                p.push(&row).await;
                (!calls.lock().unwrap().is_empty()).then_some(())
            }
        },
    )
    .await;
    let stream_rows_after_switch = wait::until("probes settle", || async {
        let counters = counters(&p).await;
        let crm = distinct_crm_keys(&calls);
        (counters.get("delivered").copied().unwrap_or(0) as usize
            == p.stream("leads:enriched").await.len() + crm.len())
        .then_some(p.stream("leads:enriched").await.len())
    })
    .await;

    // 200 rows, one the CRM refuses, some it fails once; the receiver is
    // SIGKILLed mid-way and restarted.
    let batch = leads(200, 100);
    p.push(&batch).await;
    wait::until_within("some CRM updates", Duration::from_secs(120), || async {
        (distinct_crm_keys(&calls).len() >= 60).then_some(())
    })
    .await;
    receiver.process.kill_hard();
    let _receiver = p.receiver();

    let batch_paths: std::collections::HashSet<String> = (100..300)
        .map(|i| format!("/leads/lead{i}%40example.com"))
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let dead = loop {
        let accepted: std::collections::HashSet<String> = calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.status == 204 && batch_paths.contains(&c.path))
            .map(|c| c.path.clone())
            .collect();
        let dead = p.stream("leads:dead").await;
        if accepted.len() == 199 && !dead.is_empty() {
            break dead;
        }
        if std::time::Instant::now() > deadline {
            let missing: Vec<_> = batch_paths.difference(&accepted).take(5).collect();
            let outbox: redis::Value = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(format!("kiln:{}/leads:outbox", p.env.namespace))
                .query_async(&mut redis_conn(&p).await)
                .await
                .unwrap();
            panic!(
                "{} of 199 accepted (missing e.g. {missing:?}); dead {dead:?}; counters {:?}; outbox groups {outbox:?}",
                accepted.len(),
                counters(&p).await
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(dead.len(), 1, "only the refused row is dead: {dead:?}");
    assert_eq!(dead[0]["reason"], "SinkFailed");
    assert!(dead[0]["detail"].contains("HTTP 400"), "{:?}", dead[0]);
    assert_eq!(leads_index(&dead[0]["row"]), 150);
    assert_eq!(
        p.stream("leads:enriched").await.len(),
        stream_rows_after_switch,
        "nothing went to the old sink after the switch"
    );

    // Every call carried the Secret's header, the row id as idempotency key
    // (equal to the body's correlation id) and the rendered URL.
    let calls = calls.lock().unwrap().clone();
    for call in &calls {
        assert_eq!(call.method, "PATCH");
        assert_eq!(call.authorization, "Bearer crm-api-key");
        assert_eq!(
            call.body["kiln_row_id"].as_str(),
            Some(call.idempotency_key.as_str())
        );
    }
    let retried = calls.iter().filter(|c| c.status == 503).count();
    assert!(retried > 0, "the CRM's 503s were retried");

    // Each row was counted delivered once even where a crash repeated a call.
    let done = wait::until("the outbox drained", || async {
        let counters = counters(&p).await;
        let outbox: usize = redis_conn(&p)
            .await
            .xlen(format!("kiln:{}/leads:outbox", p.env.namespace))
            .await
            .ok()?;
        (outbox == 0).then_some(counters)
    })
    .await;
    let accepted_rows = calls
        .iter()
        .filter(|c| c.status == 204)
        .map(|c| c.idempotency_key.clone())
        .collect::<std::collections::HashSet<_>>()
        .len();
    assert_eq!(
        done["delivered"] as usize,
        stream_rows_after_switch + accepted_rows
    );
    assert_eq!(done["deadLettered"], 1);
}

fn distinct_crm_keys(calls: &support::crm::Calls) -> std::collections::HashSet<String> {
    calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.status == 204)
        .map(|c| c.idempotency_key.clone())
        .collect()
}

async fn redis_conn(p: &support::pipeline::Pipeline) -> redis::aio::MultiplexedConnection {
    redis::Client::open(p.redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn counters(p: &support::pipeline::Pipeline) -> HashMap<String, i64> {
    redis_conn(p)
        .await
        .hgetall(format!("kiln:{}/leads:counters", p.env.namespace))
        .await
        .unwrap()
}

/// The chaos case that once stuck rows for minutes: the budget runs out
/// (onExhausted: Pause) while Clay drops callbacks, so timed-out rows wait
/// for credits. Each timed-out attempt must count as one failure, once; and
/// after the limit is raised every row must finish within one breaker
/// cooldown plus the rows' remaining attempts.
#[tokio::test]
async fn an_exhausted_budget_with_lost_callbacks_recovers_once_the_limit_is_raised() {
    let p = pipeline(
        "queue-phantom",
        &[
            QUICK_CLAY,
            &[
                "--drop-rate",
                "0.25",
                "--provider",
                "email:2:1.0",
                "--seed",
                "11",
            ],
        ]
        .concat(),
        120.0,
        "Pause",
        false,
    )
    .await;
    let _receiver = p.receiver();
    let _worker = p.worker();
    p.push(&leads(60, 0)).await;
    let budgets = p.env.api::<CreditBudget>();
    // The budget runs out while dropped callbacks leave rows to time out.
    support::budget_when(&p.env, "the budget to be exhausted", |status| {
        status.state == kiln::api::budget::BudgetState::Exhausted
    })
    .await;
    // Long enough for the timed-out rows to be swept several times while
    // they wait for credits (resultTimeout is 3 s, sweeps every second).
    wait::until_within(
        "rows waiting for credits",
        Duration::from_secs(60),
        || async {
            let mut conn = support::redis_connection(&p.redis.url).await;
            let pending: usize = conn
                .hlen(format!("kiln:{}/leads:pending", p.env.namespace))
                .await
                .ok()?;
            let dead = p.stream("leads:dead").await.len();
            let delivered = p.stream("leads:enriched").await.len();
            (pending > 0 && delivered + dead < 60).then_some(())
        },
    )
    .await;
    budgets
        .patch(
            "team",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"limits": {"dataCredits": 100000.0}}})),
        )
        .await
        .unwrap();
    // Breaker cooldown (30 s) + 4 attempts × 3 s, with room for a loaded machine.
    let (delivered, dead) = wait::until_within(
        "every row delivered or dead-lettered",
        Duration::from_secs(30 + 12 + 60),
        || async {
            let delivered = p.stream("leads:enriched").await;
            let dead = p.stream("leads:dead").await;
            (delivered.len() + dead.len() >= 60).then_some((delivered, dead))
        },
    )
    .await;
    assert_eq!(delivered.len() + dead.len(), 60);
    assert!(
        dead.iter().all(|d| d["reason"] == "ResultTimeout"),
        "only rows whose every callback was lost are dead letters: {dead:?}"
    );
    let status = budgets.get("team").await.unwrap().status.unwrap();
    assert_eq!(
        status.breaker.state,
        kiln::api::budget::BreakerState::Closed,
        "a quarter of callbacks lost must not open the breaker: {:?}",
        status.breaker
    );
}
