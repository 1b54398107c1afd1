//! The Direct tier: latency `POST /v1/enrich` adds beyond Clay's own, and
//! requests per second one receiver sustains.
//!
//! Run: `cargo bench --bench direct` (REQUESTS=2000 CONCURRENCY=64 LATENCY_REQUESTS=200).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

use support::direct::direct;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Sends `n` distinct-key requests, `concurrency` at a time; returns each
/// request's latency and the wall time.
async fn drive(
    d: &support::direct::Direct,
    offset: usize,
    n: usize,
    concurrency: usize,
) -> (Vec<Duration>, Duration) {
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut latencies: Vec<Duration> = futures::stream::iter(offset..offset + n)
        .map(|i| {
            let http = http.clone();
            async move {
                let row = json!({"domain": format!("bench{i}.com")});
                let sent = Instant::now();
                let (status, body) = d.enrich(&http, &row, "").await;
                assert_eq!(status, 200, "{body}");
                sent.elapsed()
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    latencies.sort();
    (latencies, started.elapsed())
}

#[tokio::main]
async fn main() {
    let latency_requests = support::env_or("LATENCY_REQUESTS", 200);
    let requests = support::env_or("REQUESTS", 2000);
    let concurrency = support::env_or("CONCURRENCY", 64);

    // 1. Added latency: clay-sim answers every row after exactly 500 ms.
    let d = direct(
        "bench-direct-latency",
        &[
            "--latency-min-ms",
            "500",
            "--latency-max-ms",
            "500",
            "--rate",
            "1000000",
            "--burst",
            "1000000",
        ],
        1.0e12,
        None,
        false,
    )
    .await;
    let _receiver = d.receiver("bench");
    drive(&d, 0, 10, 10).await; // warm-up: connections, first ledger batch
    let (latencies, _) = drive(&d, 1_000_000, latency_requests, 8).await;
    let sim = Duration::from_millis(500);
    println!(
        "direct, added latency over clay-sim's 500 ms ({latency_requests} requests, 8 concurrent): p50 {:.0} ms, p99 {:.0} ms",
        (percentile(&latencies, 0.50) - sim).as_secs_f64() * 1000.0,
        (percentile(&latencies, 0.99) - sim).as_secs_f64() * 1000.0
    );

    // 2. Throughput: zero-latency clay-sim, distinct keys (every request is enriched).
    let d = direct(
        "bench-direct-throughput",
        &[
            "--latency-min-ms",
            "0",
            "--latency-max-ms",
            "0",
            "--rate",
            "1000000",
            "--burst",
            "1000000",
        ],
        1.0e12,
        None,
        false,
    )
    .await;
    // The table's own rate limit out of the way too.
    support::pipeline::lift_table_rate_limit(&d.base.env).await;
    let receiver = d.receiver("bench");
    drive(&d, 0, 10, 10).await;
    let cpu_before = support::cpu::seconds(receiver.process.pid());
    let (latencies, elapsed) = drive(&d, 1_000_000, requests, concurrency).await;
    let cpu = support::cpu::seconds(receiver.process.pid()) - cpu_before;
    println!(
        "direct, zero-latency clay-sim: {requests} requests ({concurrency} concurrent) in {:.1}s = {:.0} requests/s; p50 {:.0} ms, p99 {:.0} ms; receiver CPU {:.2} ms/request",
        elapsed.as_secs_f64(),
        requests as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        cpu * 1000.0 / requests as f64
    );
}
