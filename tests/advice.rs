//! The tier matrix and the failure table as conditions, on real components:
//! a Direct table fed at a rate worth far more than 1,000 rows a day is told
//! to move to Queue (and `kiln doctor` reports it, in text and JSON, with
//! exit code 1); a Queue table whose callbacks never come is told its HTTP
//! API column does not reach the receiver; doctor passes a healthy namespace.
//! Each condition goes False under the traffic that should cause it and back
//! to True once the cause is gone, and each transition is an Event.

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

use kiln::api::EnrichmentTable;
use support::direct::direct;
use support::pipeline::{QUICK_CLAY, leads, pipeline};
use support::{TestEnv, wait};

/// Short observation windows, so conditions follow within a test.
async fn quick_advice(env: &TestEnv, table: &str) {
    let patch = json!({"spec": {"tierAdvice": {"sustainedFor": "20s", "callbacksMissingAfterTimeouts": 2}}});
    env.api::<EnrichmentTable>()
        .patch(table, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

async fn condition_when(env: &TestEnv, table: &str, type_: &str, reason: &str) -> Condition {
    let tables = env.api::<EnrichmentTable>();
    wait::until_within(
        &format!("{type_}={reason} on {table}"),
        Duration::from_secs(180),
        || async {
            let table = tables.get(table).await.ok()?;
            table
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == type_ && c.reason == reason)
        },
    )
    .await
}

/// The Event with `reason` about the object `name`, waited for.
async fn event_about(
    env: &TestEnv,
    name: &str,
    reason: &str,
) -> k8s_openapi::api::events::v1::Event {
    event_with_any_reason(env, name, &[reason]).await
}

/// An Event about the object `name` with one of `reasons`, waited for.
async fn event_with_any_reason(
    env: &TestEnv,
    name: &str,
    reasons: &[&str],
) -> k8s_openapi::api::events::v1::Event {
    let events = env.api::<k8s_openapi::api::events::v1::Event>();
    wait::until(&format!("a {reasons:?} event about {name}"), || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items.into_iter().find(|e| {
            e.reason.as_deref().is_some_and(|r| reasons.contains(&r))
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
    })
    .await
}

/// Runs `kiln doctor` against the test control plane; (exit code, stdout).
async fn doctor(env: &TestEnv, args: &[&str]) -> (i32, String) {
    let plane = support::control_plane().await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KUBECONFIG", plane.kubeconfig_path())
        .args(["doctor", "--namespace", &env.namespace])
        .args(args)
        .output()
        .await
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test]
async fn a_direct_table_fed_like_a_queue_is_told_to_move_and_doctor_says_so() {
    let d = direct("advice-direct", QUICK_CLAY, 1_000_000.0, None, false).await;
    let env = &d.base.env;
    quick_advice(env, "leads").await;
    let _receiver = d.receiver("receiver-0");
    let http = reqwest::Client::new();
    // About two rows a second: ~170,000 a day, against Direct's 1,000.
    let feed = async {
        for i in 0.. {
            let row = json!({"domain": format!("company{i}.example")});
            d.enrich(&http, &row, "?timeout=0s").await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let outgrown = tokio::select! {
        condition = condition_when(env, "leads", "TierFit", "VolumeAboveTier") => condition,
        _ = feed => unreachable!("the feed runs until the condition shows"),
    };
    assert_eq!(outgrown.status, "False");
    assert!(
        outgrown.message.contains("move to tier Queue"),
        "{}",
        outgrown.message
    );
    let announced = event_about(env, "leads", "VolumeAboveTier").await;
    assert_eq!(announced.type_.as_deref(), Some("Warning"));
    let table = env.api::<EnrichmentTable>().get("leads").await.unwrap();
    let observed = table.status.unwrap().observed.expect("status.observed");
    assert!(observed.rows_per_day_recent > 1_000, "{observed:?}");
    // Results came back, and how long they took is in the status too.
    let p50 = observed.result_latency_p50_ms.expect("a median latency");
    let p95 = observed.result_latency_p95_ms.expect("a 95th percentile");
    assert!(p50 >= 50 && p95 >= p50, "{observed:?}");
    assert!(observed.callbacks_percent.is_some(), "{observed:?}");

    let (code, out) = doctor(env, &[]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("TierFit: VolumeAboveTier"), "{out}");
    let (code, json) = doctor(env, &["-o", "json"]).await;
    assert_eq!(code, 1);
    let report: Value = serde_json::from_str(&json).expect("JSON output");
    assert_eq!(report["healthy"], false);
    assert!(
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["check"] == "TierFit" && f["severity"] == "Warning"),
        "{report}"
    );

    // A band that holds this volume: the table fits again, and says so.
    let wider = json!({"spec": {"tierAdvice": {"directMaxRowsPerDay": 5_000_000, "queueMaxRowsPerDay": 10_000_000}}});
    env.api::<EnrichmentTable>()
        .patch("leads", &PatchParams::default(), &Patch::Merge(&wider))
        .await
        .unwrap();
    let fits = condition_when(env, "leads", "TierFit", "VolumeWithinTier").await;
    assert_eq!(fits.status, "True");
    let recovered = event_about(env, "leads", "VolumeWithinTier").await;
    assert_eq!(recovered.type_.as_deref(), Some("Normal"));
}

#[tokio::test]
async fn a_queue_table_whose_callbacks_never_come_is_told_where_they_should_go() {
    let p = pipeline("advice-callbacks", QUICK_CLAY, 1_000_000.0, "Pause", false).await;
    // Clay's HTTP API column posts to a path the receiver does not serve.
    let column = |path: &str| {
        json!({"token": "clay-source-token",
               "callbackUrl": format!("http://127.0.0.1:{}{path}", p.receiver_port),
               "callbackHeaders": {"x-kiln-token": "callback-secret"}})
    };
    p.sim
        .add_source("leads", column("/v1/clay/callbacks"))
        .await;
    quick_advice(&p.env, "leads").await;
    let _receiver = p.receiver();
    let _worker = p.worker();
    p.push(&leads(20, 0)).await;
    let missing = condition_when(&p.env, "leads", "CallbacksArriving", "NoCallbacks").await;
    assert_eq!(missing.status, "False");
    assert!(
        missing.message.contains("/v1/clay/callback"),
        "{}",
        missing.message
    );
    assert!(
        missing.message.contains("x-kiln-token"),
        "{}",
        missing.message
    );
    let announced = event_about(&p.env, "leads", "NoCallbacks").await;
    assert_eq!(announced.type_.as_deref(), Some("Warning"));
    // The status has the figure: none of the rows sent came back.
    let table = p.env.api::<EnrichmentTable>().get("leads").await.unwrap();
    let observed = table.status.unwrap().observed.expect("status.observed");
    assert!(observed.rows_last_day > 0, "{observed:?}");
    assert_eq!(observed.callbacks_percent, Some(0), "{observed:?}");

    // The column fixed, results arrive (retried rows and new ones) and the
    // condition recovers, with a Normal Event.
    p.sim.add_source("leads", column("/v1/clay/callback")).await;
    p.push(&leads(20, 20)).await;
    let arriving = condition_when(&p.env, "leads", "CallbacksArriving", "ResultsArriving").await;
    assert_eq!(arriving.status, "True");
    // The recovery is announced once, by the first True state: results
    // arriving, or (when no row was sent for a while) no recent rows.
    let recovered =
        event_with_any_reason(&p.env, "leads", &["ResultsArriving", "NoRecentRows"]).await;
    assert_eq!(recovered.type_.as_deref(), Some("Normal"));
}

#[tokio::test]
async fn doctor_passes_a_healthy_namespace() {
    let env = support::test_env("advice-healthy").await;
    support::install_kiln_crds(&env.client).await;
    let (code, out) = doctor(&env, &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("nothing needs attention"), "{out}");
}

#[tokio::test]
async fn a_steady_burn_forecasts_when_the_budget_runs_out() {
    // 8 credits a row at 10 rows/s: 4,800 credits last about a minute.
    let clay = [QUICK_CLAY, &["--provider", "email:8:1.0"]].concat();
    let p = pipeline("advice-forecast", &clay, 4_800.0, "Pause", false).await;
    let steady = json!({"spec": {"clay": {"rateLimit": {"rowsPerSecond": 10, "burst": 10}}}});
    p.env
        .api::<EnrichmentTable>()
        .patch("leads", &PatchParams::default(), &Patch::Merge(&steady))
        .await
        .unwrap();
    let _receiver = p.receiver();
    let _worker = p.worker();
    let started = jiff::Timestamp::now();
    p.push(&leads(700, 0)).await;
    let budgets = p.env.api::<kiln::api::CreditBudget>();
    // Halfway, the forecast's projection...
    let projected = wait::until("half spent, and a forecast", || async {
        let status = budgets.get("team").await.ok()?.status?;
        let half = status.used.data_credits >= 2_400.0;
        status.forecast?.exhausts_at.filter(|_| half).map(|t| t.0)
    })
    .await;
    // The owner is told once, by a Warning Event on the budget.
    let warned = event_about(&p.env, "team", "ExhaustionForecast").await;
    assert_eq!(warned.type_.as_deref(), Some("Warning"));
    assert!(warned.note.unwrap_or_default().contains("run out at"));
    // ... against when it was actually all spent (to the last row).
    let exhausted = wait::until_within("the budget spent", Duration::from_secs(180), || async {
        let status = budgets.get("team").await.ok()?.status?;
        (status.used.data_credits >= 4_800.0 - 8.0).then(jiff::Timestamp::now)
    })
    .await;
    let actual = exhausted.duration_since(started).as_secs_f64();
    let error = projected.duration_since(exhausted).as_secs_f64().abs();
    // The forecast projects the steady burn. The last credits go out slower
    // than that, whatever the budget's size: near exhaustion a lease is
    // granted a fair share down to one row's worth, each grant a ledger write.
    const LAST_GRANTS: f64 = 8.0;
    assert!(
        error <= actual * 0.1 + LAST_GRANTS,
        "projected {projected}, exhausted {exhausted}: off by {error:.1} s of {actual:.1} s"
    );
}

#[tokio::test]
async fn old_rows_without_a_refresh_schedule_are_stale_until_one_is_added() {
    let p = pipeline("advice-fresh", QUICK_CLAY, 1_000_000.0, "Pause", false).await;
    // A row enriched 100 days ago, as the store records it.
    let mut redis = support::redis_connection(&p.redis.url).await;
    let long_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24 * 100);
    let _: () = redis::cmd("ZADD")
        .arg(format!("kiln:{}/leads:enriched-at", p.env.namespace))
        .arg(long_ago.as_millisecond())
        .arg("lead0@example.com")
        .query_async(&mut redis)
        .await
        .unwrap();
    // Any change makes the operator look again.
    let touch = json!({"metadata": {"annotations": {"test/touch": "1"}}});
    p.env
        .api::<EnrichmentTable>()
        .patch("leads", &PatchParams::default(), &Patch::Merge(&touch))
        .await
        .unwrap();
    let stale = condition_when(&p.env, "leads", "Fresh", "StaleRows").await;
    assert_eq!(stale.status, "False");
    assert!(
        stale.message.contains("RefreshSchedule"),
        "{}",
        stale.message
    );
    support::create::<kiln::api::RefreshSchedule>(
        &p.env,
        json!({
            "apiVersion": "kiln.dev/v1alpha1", "kind": "RefreshSchedule",
            "metadata": {"name": "weekly"},
            "spec": {"tableRef": {"name": "leads"}, "schedule": "0 3 * * 1", "maxAge": "2160h", "maxRows": 500, "maxCredits": 1000}
        }),
    )
    .await;
    let scheduled = condition_when(&p.env, "leads", "Fresh", "RefreshScheduled").await;
    assert_eq!(scheduled.status, "True");
    // Both transitions were announced.
    let stale_event = event_about(&p.env, "leads", "StaleRows").await;
    assert_eq!(stale_event.type_.as_deref(), Some("Warning"));
    let fresh_event = event_about(&p.env, "leads", "RefreshScheduled").await;
    assert_eq!(fresh_event.type_.as_deref(), Some("Normal"));

    // A schedule whose runs the budget refuses keeps nothing fresh; a run
    // that goes through again does. (`kiln refresh` writes lastRun.)
    let schedules = p.env.api::<kiln::api::RefreshSchedule>();
    let last_run = |outcome: &str| {
        json!({"status": {"lastRun": {
            "selected": 1, "requeued": 0, "skippedForBudget": 1, "outcome": outcome,
            "message": "test", "finishedAt": jiff::Timestamp::now().to_string(),
        }}})
    };
    schedules
        .patch_status(
            "weekly",
            &PatchParams::default(),
            &Patch::Merge(&last_run("SkippedForBudget")),
        )
        .await
        .unwrap();
    let skipping = condition_when(&p.env, "leads", "Fresh", "RefreshSkippedForBudget").await;
    assert_eq!(skipping.status, "False");
    assert!(skipping.message.contains("weekly"), "{}", skipping.message);
    let warned = event_about(&p.env, "leads", "RefreshSkippedForBudget").await;
    assert_eq!(warned.type_.as_deref(), Some("Warning"));
    schedules
        .patch_status(
            "weekly",
            &PatchParams::default(),
            &Patch::Merge(&last_run("Succeeded")),
        )
        .await
        .unwrap();
    let again = condition_when(&p.env, "leads", "Fresh", "RefreshScheduled").await;
    assert_eq!(again.status, "True");
}

#[tokio::test]
async fn clay_out_of_reach_is_said_in_the_table_status_until_it_answers_again() {
    let mut p = pipeline("advice-reach", QUICK_CLAY, 1_000_000.0, "Pause", false).await;
    let _receiver = p.receiver();
    let _worker = p.worker();
    let port = p
        .sim
        .url
        .rsplit(':')
        .next()
        .unwrap()
        .parse::<u16>()
        .unwrap();
    // Clay goes away: the worker's requests get no answer.
    p.sim.process.kill_hard();
    p.push(&leads(5, 0)).await;
    let down = condition_when(&p.env, "leads", "ClayReachable", "Unreachable").await;
    assert_eq!(down.status, "False");
    assert!(
        down.message.contains(&format!("127.0.0.1:{port}")),
        "names the host: {}",
        down.message
    );
    assert!(
        !down.message.contains("/v3/sources"),
        "no URL path: {}",
        down.message
    );
    let warned = event_about(&p.env, "leads", "Unreachable").await;
    assert_eq!(warned.type_.as_deref(), Some("Warning"));

    // Back where it was, the rows waiting are sent and the condition clears.
    let sim = support::start_clay_sim_on("advice-reach-again", port, QUICK_CLAY).await;
    sim.add_source(
        "leads",
        json!({"token": "clay-source-token",
               "callbackUrl": format!("http://127.0.0.1:{}/v1/clay/callback", p.receiver_port),
               "callbackHeaders": {"x-kiln-token": "callback-secret"}}),
    )
    .await;
    let up = condition_when(&p.env, "leads", "ClayReachable", "Answered").await;
    assert_eq!(up.status, "True");
}

/// A Redis the table's processes cannot reach, though the operator can (a
/// NetworkPolicy in the way, say), is said in RedisReachable from what the
/// processes report with their lease, and cleared when they reach it again.
#[tokio::test]
async fn a_store_only_the_pods_cannot_reach_is_said_until_they_reach_it() {
    use kiln::contact::Contact;
    use kiln::ledger::LeaseRequest;
    use kiln::ledger::client::{LedgerClient, TokenSource};
    use kiln::secret::SecretString;

    let p = pipeline("advice-store", QUICK_CLAY, 1_000_000.0, "Pause", false).await;
    condition_when(&p.env, "leads", "RedisReachable", "Connected").await;
    let token = support::ledger_token(&p.env.client, &p.env.namespace, "kiln-leads").await;
    let ledger = LedgerClient::new(
        vec![p.operator_url()],
        TokenSource::Static(SecretString::new(token)),
        None,
    )
    .unwrap();
    let report = |seq: u64, store: Contact| LeaseRequest {
        namespace: p.env.namespace.clone(),
        budget: "team".into(),
        table: "leads".into(),
        holder: "leads-worker-0".into(),
        lease: "store-report".into(),
        seq,
        row_cost: kiln::api::table::CreditCost {
            data_credits: 8.0,
            actions: 0,
        },
        ttl_seconds: 60,
        store_contact: Some(store),
        ..Default::default()
    };
    let refused = "10.0.0.7:6379: Connection refused (os error 111)";
    ledger
        .lease(&report(1, Contact::Unreachable(refused.into())))
        .await
        .expect("the report is accepted");
    let down = condition_when(&p.env, "leads", "RedisReachable", "UnreachableFromPods").await;
    assert_eq!(down.status, "False");
    assert!(down.message.contains(refused), "{}", down.message);
    let warned = event_about(&p.env, "leads", "UnreachableFromPods").await;
    assert_eq!(warned.type_.as_deref(), Some("Warning"));

    ledger
        .lease(&report(2, Contact::Answered))
        .await
        .expect("the report is accepted");
    let up = condition_when(&p.env, "leads", "RedisReachable", "Connected").await;
    assert_eq!(up.status, "True");
}
