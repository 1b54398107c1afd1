//! CPU cost of the Clay client per submitted row, against `kiln clay-sim`
//! (a separate process, zero latency, no rate limit), so only the client's
//! own work is measured: serialization, rotation, limiter, HTTP.
//!
//! Run: `cargo bench --bench clay_client` (optionally ROWS=20000 CONCURRENCY=32).

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::clay::limiter::RateLimiter;
use kiln::clay::rotation::{MemoryCounter, RotationPolicy, SourceRotation, WebhookTarget};
use kiln::clay::webhook::{RowOutcome, WebhookClient, WebhookConfig};
use serde_json::json;

fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct for the calling process.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rows = support::env_or("ROWS", 20_000usize);
    let concurrency = support::env_or("CONCURRENCY", 32usize);
    let rows_per_request = support::env_or("ROWS_PER_REQUEST", 1usize);
    let port = kiln::devenv::free_port().unwrap();
    let mut sim = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["clay-sim", "--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--latency-min-ms",
            "0",
            "--latency-max-ms",
            "0",
            "--rate",
            "1000000",
            "--burst",
            "1000000",
        ])
        .args(["--source-cap", "100000000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting clay-sim");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "clay-sim did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    http.put(format!("{base}/admin/sources/bench"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();

    let client = Arc::new(WebhookClient::new(
        http.clone(),
        Arc::new(RateLimiter::new(1_000_000, 1_000_000)),
        Arc::new(SourceRotation::new(
            vec![WebhookTarget::new(
                "bench",
                format!("{base}/v3/sources/webhook/bench").into(),
                Some("token".into()),
            )],
            RotationPolicy::new(100_000_000, 0.8, 0.99),
            Arc::new(MemoryCounter::default()),
        )),
        WebhookConfig {
            rows_per_request,
            ..Default::default()
        },
    ));
    let per_task = rows / concurrency;
    let cpu_before = cpu_time();
    let wall = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..concurrency {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut accepted = 0;
            for chunk in 0..per_task.div_ceil(rows_per_request) {
                let batch: Vec<_> = (0..rows_per_request)
                    .map(|i| json!({"kiln_row_id": format!("{task}-{chunk}-{i}"), "email": "lead@example.com", "company": "Example"}))
                    .collect();
                accepted += client.submit(&batch).await.iter().filter(|o| matches!(o, RowOutcome::Accepted { .. })).count();
            }
            accepted
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        accepted += task.await.unwrap();
    }
    let wall = wall.elapsed();
    let cpu = cpu_time() - cpu_before;
    let _ = sim.kill();
    let _ = sim.wait();
    println!(
        "clay client: {accepted} rows (rows_per_request={rows_per_request}, concurrency={concurrency}) in {:.2}s wall, {:.1} rows/s; client CPU {:.1} µs/row",
        wall.as_secs_f64(),
        accepted as f64 / wall.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / accepted.max(1) as f64
    );
}
