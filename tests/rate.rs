//! Clay's rate, shared: a table's processes together stay within its rate
//! however many workers run (scaled out and back in mid-run), tables of
//! one workspace share the workspace's limit, and traffic goes on when the
//! leader that hands out the shares is killed. Rates are what clay-sim saw.

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use serde_json::json;

use support::wait;
use support::workspace::{clay_workspace, sample, sample_until, workspace, worst_excess};

/// Rows a joining process may send before its first share is known (its
/// bucket keeps one token), plus one for sampling at the window's edges.
const SLACK: f64 = 4.0;

#[tokio::test]
async fn workers_scaled_from_one_to_three_and_back_never_exceed_the_tables_rate_plus_burst() {
    // clay-sim out of the way: what is measured is Kiln's own limit.
    let ws = workspace(
        "rate-scale",
        &clay_workspace(1_000_000, 1_000_000),
        None,
        &["leads"],
        (20, 10),
    )
    .await;
    let table = &ws.tables[0];
    let url = ws.operator_url();
    let _receiver = table.receiver(&url);
    let _first = table.worker("worker-0", &url);
    let rows = 700;
    table.push(rows, 0).await;

    let sim = &ws.base.sim;
    let mut samples = sample_until(sim, |s| s.accepted >= 120, Duration::from_secs(120)).await;
    let mut second = table.worker("worker-1", &url);
    let mut third = table.worker("worker-2", &url);
    // Until the three were seen sharing the table's rate (three holders in
    // its status) and Clay got 450 rows.
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let mut three_holders = false;
    loop {
        let s = sample(sim).await;
        samples.push(s);
        if !three_holders {
            let rate = ws.table("leads").await.status.and_then(|s| s.rate);
            three_holders = rate.is_some_and(|r| r.holders == 3);
        }
        if three_holders && s.accepted >= 450 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "three holders seen: {three_holders}; {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    second.process.stop(Duration::from_secs(20));
    third.process.stop(Duration::from_secs(20));
    samples
        .extend(sample_until(sim, |s| s.accepted >= rows as u64, Duration::from_secs(180)).await);
    wait::until_within("every row delivered", Duration::from_secs(120), || async {
        (table.delivered(&ws.redis).await >= rows).then_some(())
    })
    .await;

    let excess = worst_excess(&samples, 20.0, 10.0);
    assert!(
        excess <= SLACK,
        "the table's processes together sent {excess:.1} rows more than 20 rows/s + a burst of 10 in some window"
    );
}

#[tokio::test]
async fn two_tables_of_one_workspace_share_its_limit_and_the_status_says_when_clay_throttles() {
    // The workspace allows 20 rows/s; each table alone would allow 20.
    let ws = workspace(
        "rate-workspace",
        &clay_workspace(1_000_000, 1_000_000),
        Some(json!({"name": "acme", "rateLimit": {"rowsPerSecond": 20, "burst": 10}})),
        &["leads", "accounts"],
        (20, 10),
    )
    .await;
    let url = ws.operator_url();
    let mut processes = Vec::new();
    for table in &ws.tables {
        processes.push(table.receiver(&url));
        processes.push(table.worker(&format!("{}-0", table.name), &url));
    }
    let rows = 300;
    for table in &ws.tables {
        table.push(rows, 0).await;
    }
    let samples = sample_until(
        &ws.base.sim,
        |s| s.accepted >= 2 * rows as u64,
        Duration::from_secs(240),
    )
    .await;
    let excess = worst_excess(&samples, 20.0, 10.0);
    assert!(
        excess <= SLACK,
        "two tables of one workspace together sent {excess:.1} rows more than its 20 rows/s + 10"
    );
    for table in &ws.tables {
        wait::until_within("every row delivered", Duration::from_secs(120), || async {
            (table.delivered(&ws.redis).await >= rows).then_some(())
        })
        .await;
        let status = ws.table(&table.name).await.status.unwrap();
        let rate = status.rate.expect("the table's rate in status");
        assert_eq!(rate.limit_rows_per_second, 20.0, "{rate:?}");
        assert!(rate.submitted_last_minute > 0, "{rate:?}");
    }
}

#[tokio::test]
async fn clay_429s_beyond_kiln_turn_clay_rate_accepted_false() {
    // The budget claims 50 rows/s but Clay allows 5: someone else (here, a
    // wrong setting) uses the rest, and Clay answers 429s.
    let ws = workspace(
        "rate-throttled",
        &clay_workspace(5, 5),
        Some(json!({"name": "acme", "rateLimit": {"rowsPerSecond": 50, "burst": 50}})),
        &["leads"],
        (50, 50),
    )
    .await;
    let table = &ws.tables[0];
    let url = ws.operator_url();
    let _receiver = table.receiver(&url);
    let _worker = table.worker("worker-0", &url);
    table.push(200, 0).await;
    let condition = wait::until_within(
        "ClayRateAccepted=False",
        Duration::from_secs(120),
        || async {
            let status = ws.table("leads").await.status?;
            let condition =
                kiln::api::common::find_condition(&status.conditions, "ClayRateAccepted")?;
            (condition.status == "False").then(|| condition.clone())
        },
    )
    .await;
    assert_eq!(condition.reason, "ClayThrottling");
    assert!(condition.message.contains("429"), "{}", condition.message);
    let ready = ws.table("leads").await.status.unwrap();
    let ready = kiln::api::common::find_condition(&ready.conditions, "Ready").unwrap();
    assert_ne!(
        ready.reason, "ClayThrottling",
        "throttling is reported, not a reason the table is unready"
    );
}

#[tokio::test]
async fn killing_the_leader_mid_run_keeps_rows_flowing_within_the_rate() {
    let mut ws = workspace(
        "rate-failover",
        &clay_workspace(1_000_000, 1_000_000),
        None,
        &["leads"],
        (20, 10),
    )
    .await;
    let env = &ws.base.env;
    wait::until("the first operator leads", || async {
        ws.base.operator.leads().await?.then_some(())
    })
    .await;
    let standby = support::start_operator(&env.namespace, "op-standby").await;
    let urls = format!(
        "{},http://127.0.0.1:{}",
        ws.operator_url(),
        standby.api_port
    );
    let table = &ws.tables[0];
    let _receiver = table.receiver(&urls);
    let _workers = [
        table.worker("worker-0", &urls),
        table.worker("worker-1", &urls),
    ];
    let rows = 600;
    table.push(rows, 0).await;

    let mut samples = sample_until(
        &ws.base.sim,
        |s| s.accepted >= 150,
        Duration::from_secs(120),
    )
    .await;
    let at_kill = samples.last().unwrap().accepted;
    ws.base.operator.process.kill_hard();
    let sim = &ws.base.sim;
    samples
        .extend(sample_until(sim, |s| s.accepted >= rows as u64, Duration::from_secs(300)).await);
    assert!(
        samples.last().unwrap().accepted >= at_kill + 60,
        "rows kept flowing after the leader died"
    );
    let excess = worst_excess(&samples, 20.0, 10.0);
    assert!(
        excess <= SLACK,
        "across the failover the workers sent {excess:.1} rows more than 20 rows/s + 10"
    );
    wait::until_within("every row delivered", Duration::from_secs(120), || async {
        (table.delivered(&ws.redis).await >= rows).then_some(())
    })
    .await;
}
