//! The operator at scale: TABLES Queue tables (default 1,000) in 20
//! namespaces, each namespace with a CreditBudget, its share of the tables
//! and 10 RefreshSchedules, against the local control plane and a real
//! Redis, with one cluster-wide operator (release build). Reports how long
//! until every table is Provisioned, then, once the operator has settled,
//! a quiet minute: its API writes (the API server's own count), CPU and RSS.
//!
//! Run: `cargo bench --bench scale` (TABLES=2000 for the larger figure).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::Api;
use serde_json::json;

use kiln::api::{CreditBudget, EnrichmentTable, RefreshSchedule};

const NAMESPACES: usize = 20;
const SCHEDULES_PER_NAMESPACE: usize = 10;

#[tokio::main]
async fn main() {
    let tables = support::env_or("TABLES", 1000usize);
    let per_namespace = tables / NAMESPACES;
    let lease = support::test_env("scale-operator").await;
    support::install_kiln_crds(&lease.client).await;
    let redis = support::start_redis_on("scale", kiln::devenv::free_port().unwrap(), false).await;
    // Logging as installed (info), not as the tests run it (debug).
    let operator = support::start_operator_in(&lease.namespace, "op", &[], "info").await;
    let pid = operator.process.pid();

    let mut envs = Vec::new();
    for n in 0..NAMESPACES {
        envs.push(support::test_env(&format!("scale-{n}")).await);
    }
    let started = Instant::now();
    // Objects are created 32 at a time, as a GitOps tool would sync them.
    let mut creates = Vec::new();
    for env in &envs {
        creates.push(create_namespace_objects(env, &redis.url, per_namespace));
    }
    futures::stream::iter(creates)
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await;
    let created = started.elapsed();

    let all = Api::<EnrichmentTable>::all(lease.client.clone());
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut last_report = Instant::now();
    let provisioned_after = loop {
        let provisioned = all
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|t| {
                t.status
                    .as_ref()
                    .is_some_and(|s| kiln::api::common::is_true(&s.conditions, "Provisioned"))
            })
            .count();
        if provisioned >= per_namespace * NAMESPACES {
            break started.elapsed();
        }
        if last_report.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "{provisioned} tables provisioned after {:.0?}",
                started.elapsed()
            );
            last_report = Instant::now();
        }
        assert!(Instant::now() < deadline, "only {provisioned} provisioned");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let rss_provisioned = support::rss_mib(pid);

    // Settled: 20 s in a row without an operator write or a table
    // reconcile (at most 10 minutes). The controller-manager goes on
    // creating ReplicaSets and pods for a few minutes after the tables are
    // provisioned (at its own 20 requests/s), and every Deployment status
    // it updates is rightly a reconcile: that is not rest.
    let settle_started = Instant::now();
    let settle_deadline = settle_started + Duration::from_secs(600);
    let activity = || async {
        (
            support::operator_writes(&lease.client).await,
            operator.reconciles("enrichmenttable").await,
        )
    };
    let mut before = activity().await;
    loop {
        tokio::time::sleep(Duration::from_secs(20)).await;
        let now = activity().await;
        if now == before || Instant::now() > settle_deadline {
            break;
        }
        before = now;
    }
    let settled_after = settle_started.elapsed();

    const CONTROLLERS: [&str; 3] = ["enrichmenttable", "creditbudget", "refreshschedule"];
    let mut reconciles_before = Vec::new();
    for controller in CONTROLLERS {
        reconciles_before.push(operator.reconciles(controller).await);
    }
    let writes_before = support::operator_writes(&lease.client).await;
    let cpu_before = support::cpu::seconds(pid);
    let quiet = Instant::now();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let minute = quiet.elapsed().as_secs_f64();
    let writes = support::operator_writes(&lease.client).await - writes_before;
    let cpu = (support::cpu::seconds(pid) - cpu_before) / minute * 100.0;
    let rss = support::rss_mib(pid);
    let (anon, file) = rss_split_mib(pid);
    let mut reconciles = Vec::new();
    for (controller, before) in CONTROLLERS.iter().zip(reconciles_before) {
        let during = operator.reconciles(controller).await - before;
        reconciles.push(format!("{controller} {during}"));
    }
    println!(
        "scale, {} tables in {NAMESPACES} namespaces (+{} schedules): created in {:.1}s, all Provisioned after {:.1}s; RSS {rss_provisioned:.1} MiB when provisioned, {rss:.1} MiB = {:.1} MB at rest ({anon:.1} anonymous, {file:.1} file-backed: the binary); settled {:.0}s later; quiet minute: {writes} operator writes, operator CPU {cpu:.2}% of a core, reconciles: {}",
        per_namespace * NAMESPACES,
        SCHEDULES_PER_NAMESPACE * NAMESPACES,
        created.as_secs_f64(),
        provisioned_after.as_secs_f64(),
        rss * 1.048_576,
        settled_after.as_secs_f64(),
        reconciles.join(", "),
    );
}

/// Resident memory split into anonymous (heap, stacks) and file-backed (the
/// mapped binary and libraries), MiB.
fn rss_split_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("RssAnon:"), field("RssFile:"))
}

/// A Secret, a budget, `tables` Queue tables and the schedules of one namespace.
async fn create_namespace_objects(env: &support::TestEnv, redis_url: &str, tables: usize) {
    support::create_clay_secret(env, redis_url).await;
    support::create::<CreditBudget>(
        env,
        json!({"apiVersion": "kiln.dev/v1alpha1", "kind": "CreditBudget", "metadata": {"name": "b"},
               "spec": {"limits": {"dataCredits": 100000.0}}}),
    )
    .await;
    futures::stream::iter(0..tables)
        .map(|i| {
            support::create::<EnrichmentTable>(
                env,
                support::minimal_queue_table(&format!("t{i}"), "b"),
            )
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    for i in 0..SCHEDULES_PER_NAMESPACE {
        support::create::<RefreshSchedule>(
            env,
            json!({"apiVersion": "kiln.dev/v1alpha1", "kind": "RefreshSchedule", "metadata": {"name": format!("s{i}")},
                   "spec": {"tableRef": {"name": format!("t{i}")}, "schedule": "0 3 * * *", "maxAge": "720h", "maxRows": 100, "maxCredits": 100.0}}),
        )
        .await;
    }
}
