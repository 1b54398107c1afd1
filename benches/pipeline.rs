//! The Queue pipeline's throughput and CPU cost (worker + receiver), and the
//! rate it achieves against Clay's realistic ~10 rows/s workspace limit.
//!
//! Run: `cargo bench --bench pipeline` (ROWS=3000 LIMITED_ROWS=300 to change sizes).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use support::pipeline::{leads, pipeline, wait_terminal};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User + system CPU seconds a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field(11) + field(12)) / ticks
}

#[tokio::main]
async fn main() {
    let rows = env_or("ROWS", 3000);
    let limited_rows = env_or("LIMITED_ROWS", 300);

    // 1. Unlimited: zero-latency clay-sim, no rate limit.
    let p = pipeline(
        "bench-pipeline",
        &[
            "--latency-min-ms",
            "0",
            "--latency-max-ms",
            "0",
            "--rate",
            "1000000",
            "--burst",
            "1000000",
            "--provider",
            "email:1:1.0",
        ],
        1.0e12,
        "Pause",
        false,
    )
    .await;
    let receiver = p.receiver();
    let worker = p.worker();
    let cpu_before = cpu_seconds(worker.process.pid()) + cpu_seconds(receiver.process.pid());
    let started = Instant::now();
    p.push(&leads(rows, 0)).await;
    let (delivered, dead) = wait_terminal(&p, rows).await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(worker.process.pid()) + cpu_seconds(receiver.process.pid()) - cpu_before;
    println!(
        "pipeline, unlimited: {} rows ({} dead) in {elapsed:.1}s = {:.0} rows/s; worker+receiver CPU {:.2} ms/row",
        delivered.len(),
        dead.len(),
        rows as f64 / elapsed,
        cpu * 1000.0 / rows as f64
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
    wait_terminal(&p, limited_rows).await;
    let elapsed = started.elapsed().as_secs_f64();
    let stats = p.sim.stats().await;
    // The first 20 rows ride the burst; the rest is the sustained rate.
    let sustained = (limited_rows as f64 - 20.0) / elapsed.max(0.001);
    println!(
        "pipeline, Clay-limited (10/s, burst 20): {limited_rows} rows in {elapsed:.1}s, sustained {sustained:.2} rows/s = {:.1}% of the limit; 429s {} of {} requests ({:.2}%)",
        sustained / 10.0 * 100.0,
        stats.rejected_rate_limited,
        stats.requests,
        stats.rejected_rate_limited as f64 * 100.0 / stats.requests.max(1) as f64
    );
}
