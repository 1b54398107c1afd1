//! The Event tier's throughput and CPU cost (worker + receiver) against a
//! zero-latency, unlimited clay-sim, next to the Queue tier's in the same run.
//!
//! Run: `cargo bench --bench event` (RECORDS=5000 to change the size).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use serde_json::json;

use support::pipeline::{leads, pipeline, wait_terminal};

#[tokio::main]
async fn main() {
    let records: usize = support::env_or("RECORDS", 5000);

    // Event: Kafka in, Kafka out.
    let e = support::event::event(
        "bench-event",
        support::pipeline::INSTANT_CLAY,
        1.0e12,
        "Pause",
    )
    .await;
    support::pipeline::lift_table_rate_limit(&e.base.env).await;
    let receiver = e.start("receiver", "receiver-0");
    let worker = e.start("worker", "worker-0");
    let rows: Vec<serde_json::Value> = (0..records)
        .map(|i| json!({"email": format!("contact{i}@example.com")}))
        .collect();
    // Warm-up: the topic exists, the group is joined, connections are open.
    let sim = &e.base.sim;
    let warm_up = [json!({"email": "warm-up@example.com"})];
    support::event::produce(&e.kafka.bootstrap, "contacts.raw", &warm_up).await;
    support::wait::until_within(
        "the warm-up record",
        std::time::Duration::from_secs(120),
        || async { (sim.stats().await.callbacks_sent >= 1).then_some(()) },
    )
    .await;
    let records_total = records + 1;
    let mut processes = vec![
        ("worker", worker.process.pid()),
        ("receiver", receiver.process.pid()),
        ("operator", e.base.operator.process.pid()),
    ];
    processes.extend(support::cpu::control_plane().await);
    let cpu = support::cpu::CpuShares::start(processes);
    let started = Instant::now();
    support::event::produce(&e.kafka.bootstrap, "contacts.raw", &rows).await;
    support::wait::until_within(
        "all records enriched",
        std::time::Duration::from_secs(600),
        || async { (sim.stats().await.callbacks_sent >= records_total as u64).then_some(()) },
    )
    .await;
    // Results reach the enriched topic through the receiver's outbox.
    let outbox = format!("kiln:{}/leads:outbox", e.base.env.namespace);
    let redis = redis::Client::open(e.redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    support::wait::until("the outbox drained", || async {
        let mut redis = redis.clone();
        let counters: std::collections::HashMap<String, i64> = redis::AsyncCommands::hgetall(
            &mut redis,
            format!("kiln:{}/leads:counters", e.base.env.namespace),
        )
        .await
        .ok()?;
        let pending: i64 = redis::AsyncCommands::xlen(&mut redis, &outbox).await.ok()?;
        (counters.get("delivered").copied().unwrap_or(0) >= records_total as i64 && pending == 0)
            .then_some(())
    })
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let shares = cpu.per_row(records);
    println!(
        "event tier: {records} records in {elapsed:.1}s = {:.0} records/s; worker+receiver CPU {:.3} ms/record; whole system {:.3} ms/record ({})",
        records as f64 / elapsed,
        support::cpu::sum_of(&shares, &["worker", "receiver"]),
        support::cpu::total(&shares),
        support::cpu::describe(&shares)
    );
    drop((worker, receiver));

    // Queue, same machine, same run, same size.
    let p = pipeline(
        "bench-event-queue",
        support::pipeline::INSTANT_CLAY,
        1.0e12,
        "Pause",
        false,
    )
    .await;
    support::pipeline::lift_table_rate_limit(&p.env).await;
    let receiver = p.receiver();
    let worker = p.worker();
    let cpu = support::cpu::CpuShares::start(vec![
        ("worker", worker.process.pid()),
        ("receiver", receiver.process.pid()),
    ]);
    let started = Instant::now();
    p.push(&leads(records, 0)).await;
    wait_terminal(&p, records).await;
    let elapsed = started.elapsed().as_secs_f64();
    let shares = cpu.per_row(records);
    println!(
        "queue tier: {records} rows in {elapsed:.1}s = {:.0} rows/s; worker+receiver CPU {:.3} ms/row ({})",
        records as f64 / elapsed,
        support::cpu::sum_of(&shares, &["worker", "receiver"]),
        support::cpu::describe(&shares)
    );
}
