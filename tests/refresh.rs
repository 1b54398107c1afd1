//! RefreshSchedule end to end: the operator provisions the CronJob and, on
//! `kiln.dev/refresh-now`, a Job from it; the test runs that Job's command
//! locally (there is no kubelet) against a live Queue pipeline and checks
//! exactly the stale rows are re-enriched, within the run's credit cap and
//! the budget, with the counts in status.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;

use k8s_openapi::api::batch::v1::{CronJob, Job};
use kube::ResourceExt;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use redis::AsyncCommands;
use serde_json::json;

use kiln::api::refresh::RefreshOutcome;
use kiln::api::{CreditBudget, RefreshSchedule};
use support::pipeline::{Pipeline, leads, pipeline, wait_terminal};
use support::wait;

const HOUR_MS: i64 = 3_600_000;

async fn redis(p: &Pipeline) -> redis::aio::MultiplexedConnection {
    redis::Client::open(p.redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Makes `lead{i}` look enriched `hours[i]` hours ago.
async fn age(p: &Pipeline, rows: impl IntoIterator<Item = (usize, i64)>) {
    let now = jiff::Timestamp::now().as_millisecond();
    let mut conn = redis(p).await;
    for (i, hours) in rows {
        let _: () = conn
            .zadd(
                format!("kiln:{}/leads:enriched-at", p.env.namespace),
                format!("lead{i}@example.com"),
                now - hours * HOUR_MS,
            )
            .await
            .unwrap();
    }
}

/// How many times each key was delivered to the sink by enrichment.
async fn enrichments(p: &Pipeline) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for entry in p.stream("leads:enriched").await {
        *counts.entry(entry["key"].clone()).or_default() += 1;
    }
    counts
}

/// Triggers a run with the annotation and returns the Job the operator made.
async fn trigger(p: &Pipeline, value: &str) -> Job {
    let schedules = p.env.api::<RefreshSchedule>();
    schedules
        .patch(
            "nightly",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"kiln.dev/refresh-now": value}}})),
        )
        .await
        .unwrap();
    wait::until("the operator to record the trigger", || async {
        let status = schedules.get("nightly").await.ok()?.status?;
        (status.last_manual_trigger.as_deref() == Some(value)).then_some(())
    })
    .await;
    let jobs = p.env.api::<Job>();
    let manual: Vec<Job> = jobs
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|j| j.name_any().starts_with("nightly-refresh-manual-"))
        .collect();
    let job = manual
        .into_iter()
        .max_by_key(|j| j.metadata.creation_timestamp.clone())
        .expect("a manual Job");
    let owner = &job.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("CronJob", "nightly-refresh")
    );
    job
}

/// Runs the Job's container command locally as the table's ServiceAccount.
async fn run_job(p: &Pipeline, job: &Job, identity: &str) -> std::process::Output {
    let container = &job
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KUBECONFIG", &p.kubeconfig)
        .env("KILN_OPERATOR_URL", p.operator_url())
        .env("KILN_LEDGER_TOKEN_FILE", &p.token_file)
        .env("POD_NAME", identity)
        .args(["--log-format", "text"])
        .args(container.args.clone().unwrap())
        .output()
        .await
        .unwrap()
}

async fn last_run(p: &Pipeline) -> kiln::api::refresh::RefreshRunCounts {
    p.env
        .api::<RefreshSchedule>()
        .get("nightly")
        .await
        .unwrap()
        .status
        .unwrap()
        .last_run
        .expect("the run reported itself")
}

#[tokio::test]
async fn scheduled_refresh_re_enriches_exactly_the_stale_rows_within_its_caps() {
    let p = pipeline(
        "refresh",
        &[
            "--latency-min-ms",
            "5",
            "--latency-max-ms",
            "30",
            "--rate",
            "1000",
            "--burst",
            "1000",
            "--provider",
            "email:2:1.0",
            "--seed",
            "5",
        ],
        1_000_000.0,
        "Pause",
        false,
    )
    .await;
    let _receiver = p.receiver();
    let _worker = p.worker();
    p.push(&leads(30, 0)).await;
    let (delivered, _) = wait_terminal(&p, 30).await;
    assert_eq!(delivered.len(), 30);

    let schedule: RefreshSchedule = serde_json::from_value(json!({
        "apiVersion": "kiln.dev/v1alpha1", "kind": "RefreshSchedule", "metadata": {"name": "nightly"},
        "spec": {"tableRef": {"name": "leads"}, "schedule": "0 3 * * *", "timeZone": "Europe/Berlin",
                 "concurrencyPolicy": "Allow", "maxAge": "1h", "maxRows": 4, "maxCredits": 1000.0}
    }))
    .unwrap();
    let schedules = p.env.api::<RefreshSchedule>();
    schedules
        .create(&PostParams::default(), &schedule)
        .await
        .unwrap();
    let cronjobs = p.env.api::<CronJob>();
    wait::until("the CronJob", || async {
        cronjobs.get_opt("nightly-refresh").await.ok()?
    })
    .await;
    // The table's Role names its schedules, this one now included.
    wait::until("the table's Role to name the schedule", || async {
        let role = p
            .env
            .api::<k8s_openapi::api::rbac::v1::Role>()
            .get("kiln-leads")
            .await
            .ok()?;
        role.rules?
            .iter()
            .any(|r| {
                r.resource_names
                    .as_ref()
                    .is_some_and(|n| n.contains(&"nightly".to_string()))
            })
            .then_some(())
    })
    .await;
    schedules_cannot_be_forged_with_the_table_token(&p).await;

    // Ten stale rows, lead0 the oldest; the other twenty are fresh.
    age(&p, (0..10).map(|i| (i, 100 - i as i64))).await;

    // Run 1: at most maxRows, oldest first.
    let job = trigger(&p, "run-1").await;
    let output = run_job(&p, &job, "refresh-1").await;
    assert!(output.status.success(), "{output:?}");
    let report = last_run(&p).await;
    assert_eq!(
        (
            report.selected,
            report.requeued,
            report.skipped_for_budget,
            report.outcome
        ),
        (4, 4, 0, RefreshOutcome::Succeeded),
        "{report:?}"
    );
    let counts = wait::until("the four oldest re-enriched", || async {
        let counts = enrichments(&p).await;
        (counts.values().sum::<usize>() == 34).then_some(counts)
    })
    .await;
    for i in 0..30 {
        let expected = if i < 4 { 2 } else { 1 };
        assert_eq!(
            counts[&format!("lead{i}@example.com")],
            expected,
            "lead{i} enriched {expected} time(s)"
        );
    }

    // Run 2: two runs at once (concurrencyPolicy Allow) share the six left
    // and never enqueue a row twice.
    let job = trigger(&p, "run-2").await;
    let (a, b) = tokio::join!(
        run_job(&p, &job, "refresh-2a"),
        run_job(&p, &job, "refresh-2b")
    );
    assert!(a.status.success() && b.status.success(), "{a:?} {b:?}");
    let counts = wait::until("the six remaining re-enriched", || async {
        let counts = enrichments(&p).await;
        (counts.values().sum::<usize>() >= 40).then_some(counts)
    })
    .await;
    for i in 0..30 {
        let expected = if i < 10 { 2 } else { 1 };
        assert_eq!(counts[&format!("lead{i}@example.com")], expected, "lead{i}");
    }

    // Run 3: maxCredits covers three rows at 8 credits each.
    age(&p, (10..20).map(|i| (i, 5))).await;
    schedules
        .patch(
            "nightly",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"maxCredits": 24.0}})),
        )
        .await
        .unwrap();
    let charged_before = p.sim.stats().await.data_credits_charged;
    let job = trigger(&p, "run-3").await;
    let output = run_job(&p, &job, "refresh-3").await;
    assert!(output.status.success(), "{output:?}");
    let report = last_run(&p).await;
    assert_eq!(
        (report.selected, report.requeued, report.skipped_for_budget),
        (4, 3, 1),
        "{report:?}"
    );
    wait::until("three more re-enriched", || async {
        (enrichments(&p).await.values().sum::<usize>() == 43).then_some(())
    })
    .await;
    let charged = p.sim.stats().await.data_credits_charged - charged_before;
    assert!(charged <= 24.0, "the run cost {charged}, over maxCredits");

    // An exhausted budget holds the CronJob, and a run refuses to start.
    let total_charged = p.sim.stats().await.data_credits_charged;
    let used = wait::until("spend settled to what Clay charged", || async {
        let status = p.env.api::<CreditBudget>().get("team").await.ok()?.status?;
        ((status.used.data_credits - total_charged).abs() < 1e-6)
            .then_some(status.used.data_credits)
    })
    .await;
    let budgets = p.env.api::<CreditBudget>();
    budgets
        .patch(
            "team",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"limits": {"dataCredits": used}}})),
        )
        .await
        .unwrap();
    wait_held(&p, Some("BudgetExhausted")).await;
    let job = trigger(&p, "run-4").await;
    let output = run_job(&p, &job, "refresh-4").await;
    assert_eq!(
        output.status.code(),
        Some(kiln::contract::EXIT_SKIPPED_FOR_BUDGET),
        "{output:?}"
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("limit for this period is reached"));
    let report = last_run(&p).await;
    assert_eq!(report.outcome, RefreshOutcome::SkippedForBudget);
    assert_eq!(
        (report.requeued, report.skipped_for_budget),
        (0, report.selected)
    );

    // More room: the CronJob runs again.
    budgets
        .patch(
            "team",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"limits": {"dataCredits": used + 1000.0}}})),
        )
        .await
        .unwrap();
    wait_held(&p, None).await;
}

/// Waits for the schedule's Suspended condition (and the CronJob) to say
/// runs are held for `reason`, or (None) not held.
/// Another team's schedule in the same namespace: the table's token can
/// neither read it nor rewrite its status.
async fn schedules_cannot_be_forged_with_the_table_token(p: &Pipeline) {
    let other: RefreshSchedule = serde_json::from_value(json!({
        "apiVersion": "kiln.dev/v1alpha1", "kind": "RefreshSchedule", "metadata": {"name": "someone-else"},
        "spec": {"tableRef": {"name": "another-table"}, "schedule": "0 4 * * *", "maxAge": "1h", "maxRows": 4, "maxCredits": 10.0}
    }))
    .unwrap();
    p.env
        .api::<RefreshSchedule>()
        .create(&PostParams::default(), &other)
        .await
        .unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&p.kubeconfig).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    let as_table = kube::Api::<RefreshSchedule>::namespaced(
        kube::Client::try_from(config).unwrap(),
        &p.env.namespace,
    );
    let read = as_table.get("someone-else").await;
    assert!(
        matches!(&read, Err(kube::Error::Api(s)) if s.code == 403),
        "{read:?}"
    );
    let forged = json!({"status": {"lastRun": {"selected": 1, "requeued": 1, "skippedForBudget": 0, "outcome": "Succeeded", "message": "forged by kiln-leads"}}});
    let forged = as_table
        .patch_status(
            "someone-else",
            &PatchParams::default(),
            &Patch::Merge(&forged),
        )
        .await;
    assert!(
        matches!(&forged, Err(kube::Error::Api(s)) if s.code == 403),
        "{forged:?}"
    );
    let other = p
        .env
        .api::<RefreshSchedule>()
        .get("someone-else")
        .await
        .unwrap();
    assert!(other.status.and_then(|s| s.last_run).is_none());
}

async fn wait_held(p: &Pipeline, reason: Option<&str>) {
    let schedules = p.env.api::<RefreshSchedule>();
    let cronjobs = p.env.api::<CronJob>();
    wait::until(&format!("runs held: {reason:?}"), || async {
        let status = schedules.get("nightly").await.ok()?.status?;
        let condition = status.conditions.iter().find(|c| c.type_ == "Suspended")?;
        let suspended = cronjobs.get("nightly-refresh").await.ok()?.spec?.suspend?;
        let matches = match reason {
            Some(reason) => condition.status == "True" && condition.reason == reason && suspended,
            None => condition.status == "False" && !suspended,
        };
        matches.then_some(())
    })
    .await;
}
