//! Clay's workspace rate, shared: the rate clay-sim (10 rows/s, burst 20,
//! like a Clay workspace) accepts from one worker, from one table with
//! three workers, and from two tables of one workspace with two workers
//! each, side by side in one run.
//!
//! Run: `cargo bench --bench rate` (ROWS=600 rows per scenario; SCENARIO=
//! part of a scenario's name to run only that one).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use serde_json::json;

use support::workspace::{clay_workspace, sample_until, sustained_rate, workspace};

const RATE: u32 = 10;
const BURST: u32 = 20;

#[tokio::main]
async fn main() {
    let rows = support::env_or("ROWS", 600usize);
    let only = std::env::var("SCENARIO").ok();
    for (scenario, tables, workers) in [
        ("one table, 1 worker", &["leads"][..], 1),
        ("one table, 3 workers", &["leads"][..], 3),
        (
            "two tables of one workspace, 2 workers each",
            &["leads", "accounts"][..],
            2,
        ),
    ] {
        if only
            .as_ref()
            .is_some_and(|o| !scenario.contains(o.as_str()))
        {
            continue;
        }
        let test = format!("bench-rate-{}-{workers}", tables.len());
        let ws = workspace(
            &test,
            &clay_workspace(RATE, BURST),
            (tables.len() > 1).then(
                || json!({"name": "acme", "rateLimit": {"rowsPerSecond": RATE, "burst": BURST}}),
            ),
            tables,
            (RATE, BURST),
        )
        .await;
        // A new leader raises no share for its first seconds (it learns what
        // holders hold from their reports); measured here is the steady
        // state, not a failover.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let url = ws.operator_url();
        let mut processes = Vec::new();
        for table in &ws.tables {
            processes.push(table.receiver(&url));
            for i in 0..workers {
                processes.push(table.worker(&format!("{}-{i}", table.name), &url));
            }
        }
        let per_table = rows / tables.len();
        for table in &ws.tables {
            table.push(per_table, 0).await;
        }
        let total = (per_table * tables.len()) as u64;
        let samples = sample_until(
            &ws.base.sim,
            |s| s.accepted >= total,
            Duration::from_secs(600),
        )
        .await;
        let last = samples.last().unwrap();
        let rate = sustained_rate(&samples, u64::from(BURST), total);
        println!(
            "rate, {scenario}: Clay accepted {rate:.2} rows/s after the burst = {:.1}% of the workspace's {RATE}/s; 429s {} of {} requests ({:.2}%)",
            rate / f64::from(RATE) * 100.0,
            last.throttled,
            last.requests,
            last.throttled as f64 * 100.0 / last.requests.max(1) as f64
        );
        drop(processes);
    }
}
