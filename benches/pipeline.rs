//! The Queue pipeline's throughput and CPU cost (worker + receiver), and the
//! rate it achieves against Clay's realistic ~10 rows/s workspace limit.
//!
//! Run: `cargo bench --bench pipeline` (ROWS=3000 LIMITED_ROWS=300 to change sizes).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use support::pipeline::{leads, pipeline, wait_terminal};

#[tokio::main]
async fn main() {
    let rows = support::env_or("ROWS", 3000);
    let limited_rows = support::env_or("LIMITED_ROWS", 300);

    // 1. Unlimited: zero-latency clay-sim, no rate limit.
    let p = pipeline(
        "bench-pipeline",
        support::pipeline::INSTANT_CLAY,
        1.0e12,
        "Pause",
        false,
    )
    .await;
    support::pipeline::lift_table_rate_limit(&p.env).await;
    let receiver = p.receiver();
    let worker = p.worker();
    let mut processes = vec![
        ("worker", worker.process.pid()),
        ("receiver", receiver.process.pid()),
        ("operator", p.operator.process.pid()),
    ];
    processes.extend(support::cpu::control_plane().await);
    let cpu = support::cpu::CpuShares::start(processes);
    let started = Instant::now();
    p.push(&leads(rows, 0)).await;
    let (delivered, dead) = wait_terminal(&p, rows).await;
    let elapsed = started.elapsed().as_secs_f64();
    let shares = cpu.per_row(rows);
    let whole = support::cpu::total(&shares);
    println!(
        "pipeline, unlimited: {} rows ({} dead) in {elapsed:.1}s = {:.0} rows/s; worker+receiver CPU {:.3} ms/row; whole system {whole:.3} ms/row ({})",
        delivered.len(),
        dead.len(),
        rows as f64 / elapsed,
        support::cpu::sum_of(&shares, &["worker", "receiver"]),
        support::cpu::describe(&shares)
    );
    drop((worker, receiver));

    // 2. Against Clay's limit: clay-sim at 10 rows/s (burst 20), the table at 10 rows/s.
    let p = pipeline(
        "bench-limited",
        &[
            "--latency-min-ms",
            "0",
            "--latency-max-ms",
            "0",
            "--rate",
            "10",
            "--burst",
            "20",
            "--provider",
            "email:1:1.0",
        ],
        1.0e12,
        "Pause",
        false,
    )
    .await;
    // The table runs at Clay's published rate (the worker reads it at start).
    p.env
        .api::<kiln::api::EnrichmentTable>()
        .patch(
            "leads",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"clay": {"rateLimit": {"rowsPerSecond": 10, "burst": 20}}}})),
        )
        .await
        .unwrap();
    let _receiver = p.receiver();
    let _worker = p.worker();
    p.push(&leads(limited_rows, 0)).await;
    let started = Instant::now();
    // Clay's side of the rate: from the moment the burst is spent to the
    // last row Clay accepted (sampled every 20 ms).
    let mut burst_spent = None;
    let last_accepted = loop {
        let accepted = p.sim.stats().await.rows_accepted as usize;
        if accepted >= 20 && burst_spent.is_none() {
            burst_spent = Some(Instant::now());
        }
        if accepted >= limited_rows {
            break Instant::now();
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    wait_terminal(&p, limited_rows).await;
    let elapsed = started.elapsed().as_secs_f64();
    let stats = p.sim.stats().await;
    let window = last_accepted
        .duration_since(burst_spent.unwrap_or(started))
        .as_secs_f64();
    let sustained = (limited_rows as f64 - 20.0) / window.max(0.001);
    println!(
        "pipeline, Clay-limited (10/s, burst 20): {limited_rows} rows delivered in {elapsed:.1}s; Clay accepted {sustained:.2} rows/s after the burst = {:.1}% of the limit; 429s {} of {} requests ({:.2}%)",
        sustained / 10.0 * 100.0,
        stats.rejected_rate_limited,
        stats.requests,
        stats.rejected_rate_limited as f64 * 100.0 / stats.requests.max(1) as f64
    );
}
