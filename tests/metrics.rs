//! The data plane's Prometheus metrics tell what happened: a Queue run
//! against a clay-sim that answers some requests with 429 and drops some
//! callbacks, then every process is scraped and its series compared with
//! what clay-sim and the Redis streams saw.

#[path = "support/mod.rs"]
mod support;

use kube::api::{Patch, PatchParams};
use support::pipeline::{leads, pipeline, wait_terminal};
use support::{KilnProcess, wait};

/// The value of one series (`name{labels}` exactly as exported), 0 when absent.
async fn series(process: &KilnProcess, series: &str) -> f64 {
    let (_, body) = process
        .health_get("/metrics")
        .await
        .expect("a /metrics answer");
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// The sum of one series over the processes.
async fn total(processes: &[&KilnProcess], name: &str) -> f64 {
    let mut sum = 0.0;
    for process in processes {
        sum += series(process, name).await;
    }
    sum
}

#[tokio::test]
async fn data_plane_metrics_match_what_clay_and_the_streams_saw() {
    let p = pipeline(
        "metrics",
        &[
            "--latency-min-ms",
            "10",
            "--latency-max-ms",
            "50",
            // Far below the table's own limit: Clay answers 429s.
            "--rate",
            "15",
            "--burst",
            "3",
            "--drop-rate",
            "0.5",
            "--seed",
            "11",
        ],
        1_000_000.0,
        "Pause",
        false,
    )
    .await;
    // Half the callbacks are lost on purpose; with the default breaker
    // (opens at 50 % failures) that would pause the table at random and the
    // run would measure the breaker, not the metrics. It never opens here.
    let no_breaker =
        serde_json::json!({"spec": {"circuitBreaker": {"errorPercent": 100, "minCalls": 1000000}}});
    let generation = p
        .env
        .api::<kiln::api::budget::CreditBudget>()
        .patch("team", &PatchParams::default(), &Patch::Merge(&no_breaker))
        .await
        .unwrap()
        .metadata
        .generation;
    support::budget_when(
        &p.env,
        "the operator to apply the breaker settings",
        |status| status.observed_generation >= generation,
    )
    .await;
    // Two attempts: a row whose two callbacks are both dropped is a dead letter.
    let two_attempts = serde_json::json!({"spec": {"clay": {"maxAttempts": 2}}});
    p.env
        .api::<kiln::api::EnrichmentTable>()
        .patch(
            "leads",
            &PatchParams::default(),
            &Patch::Merge(&two_attempts),
        )
        .await
        .unwrap();
    let receiver = p.receiver();
    let worker = p.worker();
    let rows = leads(60, 0);
    p.push(&rows).await;
    let (delivered, dead) = wait_terminal(&p, rows.len()).await;
    let processes = [&receiver, &worker];
    // Delivery runs in the background after the stream write: wait for the counters.
    wait::until("the delivered counter to catch up", || async {
        let counted = total(
            &processes,
            r#"kiln_rows_total{stage="delivered",outcome="ok"}"#,
        )
        .await;
        (counted as usize == delivered.len()).then_some(())
    })
    .await;

    let sim = p.sim.stats().await;
    assert!(
        sim.rejected_rate_limited > 0,
        "the run must see 429s: {sim:?}"
    );
    assert!(
        !dead.is_empty(),
        "dropped callbacks end some rows dead-lettered"
    );
    let received = total(
        &processes,
        r#"kiln_rows_total{stage="received",outcome="ok"}"#,
    )
    .await;
    assert_eq!(received as usize, rows.len());
    let accepted = total(
        &processes,
        r#"kiln_rows_total{stage="submitted",outcome="accepted"}"#,
    )
    .await;
    assert_eq!(accepted as u64, sim.rows_accepted, "{sim:?}");
    let throttled = total(&processes, r#"kiln_clay_requests_total{status="429"}"#).await;
    assert_eq!(throttled as u64, sim.rejected_rate_limited, "{sim:?}");
    let answered = total(&processes, r#"kiln_clay_requests_total{status="2xx"}"#).await;
    assert_eq!(
        answered as u64,
        sim.requests - sim.rejected_rate_limited,
        "{sim:?}"
    );
    let enriched = total(
        &processes,
        r#"kiln_rows_total{stage="enriched",outcome="ok"}"#,
    )
    .await;
    assert_eq!(enriched as u64, sim.callbacks_sent, "{sim:?}");
    let timed_out = dead
        .iter()
        .filter(|entry| entry.get("reason").map(String::as_str) == Some("ResultTimeout"))
        .count();
    assert_eq!(
        timed_out,
        dead.len(),
        "every dead letter here is a lost result"
    );
    let dead_counted = total(
        &processes,
        r#"kiln_rows_total{stage="dead_lettered",outcome="ResultTimeout"}"#,
    )
    .await;
    assert_eq!(dead_counted as usize, timed_out);
    let source_rows = total(&processes, r#"kiln_webhook_source_rows{source="leads"}"#).await;
    assert_eq!(
        source_rows as u64, sim.source_submissions["leads"],
        "{sim:?}"
    );
    // Every row is terminal: the worker's count of rows waiting for a
    // result, by age, comes down to none (it is refreshed every 15 s).
    wait::until("no row counted as pending", || async {
        let (_, body) = worker.health_get("/metrics").await?;
        let ages: Vec<f64> = body
            .lines()
            .filter(|line| line.starts_with("kiln_rows_pending{"))
            .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
            .collect();
        (ages.len() == 6 && ages.iter().all(|n| *n == 0.0)).then_some(())
    })
    .await;
    assert!(total(&processes, r#"kiln_lease_requests_total{outcome="ok"}"#).await > 0.0);
    assert!(total(&processes, "kiln_rate_limiter_wait_seconds_count").await >= accepted);
    assert!(total(&processes, "kiln_clay_request_duration_seconds_count").await >= accepted);

    let budget = p
        .env
        .api::<kiln::api::budget::CreditBudget>()
        .get("team")
        .await
        .unwrap();
    assert_eq!(
        budget.status.unwrap_or_default().breaker.state,
        kiln::api::budget::BreakerState::Closed,
        "the breaker stayed closed, so no row waited on it"
    );

    // The operator's ledger: the batches it applied, and how big the
    // budget's status is.
    assert!(series(&p.operator, "kiln_ledger_batch_size_count").await > 0.0);
    assert!(series(&p.operator, "kiln_ledger_batch_duration_seconds_count").await > 0.0);
    let (_, body) = p.operator.health_get("/metrics").await.unwrap();
    let status_bytes: f64 = body
        .lines()
        .filter(|line| line.starts_with("kiln_budget_status_bytes{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        status_bytes > 100.0,
        "a status of a few hundred bytes at least"
    );
}
