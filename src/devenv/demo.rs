//! `kiln demo`: Kiln's main job end to end on this machine. It starts a real
//! local control plane (or uses the current cluster), Redis, `kiln clay-sim`
//! and the operator, applies examples/queue.yaml with local endpoints, runs
//! the worker and receiver as their pod templates would, pushes sample leads,
//! shows progress, and leaves nothing running when it ends.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use serde::Deserialize;
use serde_json::{Value, json};

use super::controlplane::{ControlPlane, client_from_kubeconfig};
use super::free_port;
use super::node::poll;
use super::process::ManagedProcess;
use crate::api::{CreditBudget, EnrichmentTable};

#[derive(clap::Args, Clone, Debug)]
pub struct DemoArgs {
    /// Sample leads to push (a tenth of them repeat a key, to show de-duplication).
    #[arg(long, default_value_t = 300)]
    pub leads: usize,
    /// Use the cluster KUBECONFIG points to instead of starting a local control plane.
    #[arg(long)]
    pub use_current_cluster: bool,
    /// Namespace for the demo objects.
    #[arg(long, default_value = "kiln-demo")]
    pub namespace: String,
    /// Stop everything once the leads are enriched, instead of keeping the
    /// environment up until Ctrl-C (for scripts).
    #[arg(long)]
    pub exit: bool,
    /// Run Kiln in real pods: a one-node cluster on this machine (kubelet,
    /// containerd, kube-proxy, CoreDNS), the image built from this binary,
    /// `helm install` of the chart. Needs root and a Kiln checkout.
    #[arg(long, conflicts_with = "use_current_cluster")]
    pub node: bool,
}

pub(super) const TABLE: &str = "inbound-leads";
const BUDGET: &str = "sales";
pub(super) const FIELD_MANAGER: &str = "kiln-demo";

/// Runs the demo; Ctrl-C stops it early, cleaning up the same way.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.node {
        return super::node_demo::run(args).await;
    }
    let workdir = tempfile::Builder::new()
        .prefix("kiln-demo-")
        .tempdir()?
        .keep();
    let mut processes: Vec<ManagedProcess> = Vec::new();
    let outcome = tokio::select! {
        result = demo(&args, &workdir, &mut processes) => result,
        _ = tokio::signal::ctrl_c() => {
            println!("\ninterrupted: stopping everything");
            Ok(())
        }
    };
    if outcome.is_ok() && !args.exit {
        println!(
            "\nKiln keeps running for you to look around; press Ctrl-C to stop everything and clean up."
        );
        tokio::signal::ctrl_c().await.ok();
        println!("\nstopping everything");
    }
    // Reverse start order: data plane, operator, simulator, Redis, control plane.
    while let Some(mut process) = processes.pop() {
        process.stop(Duration::from_secs(10));
    }
    println!("logs of every process: {}", workdir.display());
    outcome
}

fn kiln_command(kubeconfig: &Path) -> Command {
    let mut command = Command::new(std::env::current_exe().expect("the kiln binary's path"));
    command
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info");
    command.args(["--log-format", "json"]);
    command
}

pub(super) fn step(message: &str) {
    println!("==> {message}");
}

async fn demo(
    args: &DemoArgs,
    workdir: &Path,
    processes: &mut Vec<ManagedProcess>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let kubeconfig = if args.use_current_cluster {
        let path = std::env::var("KUBECONFIG").context("--use-current-cluster needs KUBECONFIG")?;
        PathBuf::from(path)
    } else {
        step(
            "starting a local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager)",
        );
        let plane = ControlPlane::start(&workdir.join("controlplane")).await?;
        let path = plane.kubeconfig_path().to_path_buf();
        processes.extend(plane.into_processes());
        path
    };
    let client = client_from_kubeconfig(&kubeconfig).await?;

    step("installing the CRDs");
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for crd in crate::api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await?;
    }
    poll("the CRDs to be served", Duration::from_secs(30), || async {
        Api::<EnrichmentTable>::all(client.clone())
            .list(&Default::default())
            .await
            .ok()
            .map(|_| ())
    })
    .await?;

    step("starting Redis and clay-sim (Clay's protocol, realistic latency, ~20 rows/s)");
    super::ensure_installed("redis-server", "redis-server")?;
    let redis_port = free_port()?;
    let mut redis = Command::new("redis-server");
    redis.args([
        "--port",
        &redis_port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]);
    redis.current_dir(workdir);
    processes.push(
        ManagedProcess::spawn("redis", redis, workdir)
            .context("starting redis-server (install it: apt-get install redis-server)")?,
    );
    let sim_port = free_port()?;
    let sim_url = format!("http://127.0.0.1:{sim_port}");
    let mut sim = kiln_command(&kubeconfig);
    sim.args(["clay-sim", "--listen", &format!("127.0.0.1:{sim_port}")])
        .args(SIM_FLAGS);
    processes.push(ManagedProcess::spawn("clay-sim", sim, workdir)?);

    step("starting the operator");
    let api_port = free_port()?;
    let mut operator = kiln_command(&kubeconfig);
    operator
        .args([
            "operator",
            "--watch-namespace",
            &args.namespace,
            "--lease-namespace",
            &args.namespace,
        ])
        .args(["--identity", "demo-operator", "--image", "kiln:demo"])
        .args([
            "--api-addr",
            &format!("127.0.0.1:{api_port}"),
            "--health-addr",
            &format!("127.0.0.1:{}", free_port()?),
        ]);
    apply_namespace(&client, &args.namespace).await?;
    processes.push(ManagedProcess::spawn("operator", operator, workdir)?);

    step("applying examples/queue.yaml (Secrets pointed at the local Redis and clay-sim)");
    let receiver_port = free_port()?;
    let http = reqwest::Client::new();
    poll("clay-sim", Duration::from_secs(30), || async {
        http.get(format!("{sim_url}/healthz"))
            .send()
            .await
            .ok()
            .map(|_| ())
    })
    .await?;
    let callback_token = uuid::Uuid::new_v4().simple().to_string();
    let ingest_token = uuid::Uuid::new_v4().simple().to_string();
    http.put(format!("{sim_url}/admin/sources/demo"))
        .json(&json!({"token": SOURCE_TOKEN, "callbackUrl": format!("http://127.0.0.1:{receiver_port}/v1/clay/callback"), "callbackHeaders": {"x-kiln-token": callback_token}}))
        .send()
        .await?
        .error_for_status()?;
    let secrets = DemoSecrets {
        webhook_url: format!("{sim_url}/v3/sources/webhook/demo"),
        callback_token: callback_token.clone(),
        ingest_token: ingest_token.clone(),
        redis_url: format!("redis://127.0.0.1:{redis_port}/0"),
    };
    apply_queue_example(&client, &args.namespace, &secrets).await?;

    step(
        "starting the worker and receiver as their pod templates say, with the table's ServiceAccount",
    );
    let token =
        super::service_account_token(&client, &args.namespace, &format!("kiln-{TABLE}")).await?;
    let token_file = workdir.join("table-token");
    std::fs::write(
        &token_file,
        super::ledger_token(&client, &args.namespace, &format!("kiln-{TABLE}")).await?,
    )?;
    let table_kubeconfig = workdir.join("table-kubeconfig");
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&kubeconfig)?)?;
    config["users"][0]["user"] = serde_yaml::to_value(json!({"token": token}))?;
    std::fs::write(&table_kubeconfig, serde_yaml::to_string(&config)?)?;
    let table_arg = format!("{}/{TABLE}", args.namespace);
    for (role, extra) in [
        (
            "receiver",
            vec!["--listen".to_string(), format!("127.0.0.1:{receiver_port}")],
        ),
        ("worker", vec![]),
    ] {
        let mut command = kiln_command(&table_kubeconfig);
        command
            .args([
                role,
                "--table",
                &table_arg,
                "--operator-url",
                &format!("http://127.0.0.1:{api_port}"),
            ])
            .args([
                "--ledger-token-file",
                token_file.to_str().unwrap_or_default(),
            ])
            .args(["--health-addr", &format!("127.0.0.1:{}", free_port()?)])
            .args(extra);
        processes.push(ManagedProcess::spawn(role, command, workdir)?);
    }

    let leads = sample_leads(args.leads);
    step(&format!(
        "pushing {} sample leads to POST /v1/rows",
        leads.len()
    ));
    push_leads(
        &format!("http://127.0.0.1:{receiver_port}/v1/rows"),
        &ingest_token,
        &leads,
    )
    .await?;

    follow_enrichment(
        &client,
        &args.namespace,
        &format!("redis://127.0.0.1:{redis_port}"),
        &sim_url,
        args.leads,
    )
    .await?;
    let namespace = &args.namespace;
    println!(
        "\nDone in {:.0} s. While it runs, in another terminal:\n  export KUBECONFIG={}\n  kubectl -n {namespace} get enrichmenttables,creditbudgets,refreshschedules\n  kubectl -n {namespace} describe enrichmenttable {TABLE}\n  redis-cli -p {redis_port} XRANGE leads:enriched - + COUNT 3      # the enriched rows\n  KUBECONFIG={} cargo run -q -- dlq list --table {table_arg}    # dead letters, if any\n  cargo run -q -- receiver --table {table_arg} --print-clay-template    # the Clay HTTP API column",
        started.elapsed().as_secs_f64(),
        kubeconfig.display(),
        table_kubeconfig.display(),
    );
    Ok(())
}

/// Creates (or keeps) the demo's namespace.
pub(super) async fn apply_namespace(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&namespace),
        )
        .await?;
    Ok(())
}

/// The values of examples/queue.yaml's Secrets for a demo.
pub(super) struct DemoSecrets {
    pub webhook_url: String,
    pub callback_token: String,
    pub ingest_token: String,
    pub redis_url: String,
}

/// clay-sim as the demo runs it: a workspace's rate, Clay-like latency.
pub(super) const SIM_FLAGS: &[&str] = &[
    "--rate",
    "20",
    "--burst",
    "40",
    "--latency-min-ms",
    "300",
    "--latency-max-ms",
    "1500",
    "--seed",
    "1",
];

/// The token clay-sim's demo source requires.
pub(super) const SOURCE_TOKEN: &str = "demo-source-token";

/// Applies examples/queue.yaml to `namespace` with the demo's Secret
/// values, within one clay-sim's rate.
pub(super) async fn apply_queue_example(
    client: &kube::Client,
    namespace: &str,
    secrets: &DemoSecrets,
) -> anyhow::Result<()> {
    let local_values = BTreeMap::from([
        (
            "clay-leads",
            json!({"webhook-url": secrets.webhook_url, "webhook-token": SOURCE_TOKEN, "callback-token": secrets.callback_token}),
        ),
        ("crm-ingest", json!({"token": secrets.ingest_token})),
        ("redis", json!({"url": secrets.redis_url})),
    ]);
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/queue.yaml"))?;
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&example) {
        let mut value = serde_json::to_value(serde_yaml::Value::deserialize(document)?)?;
        if value.is_null() {
            continue;
        }
        if value["kind"] == "Secret"
            && let Some(local) =
                local_values.get(value["metadata"]["name"].as_str().unwrap_or_default())
        {
            value["stringData"] = local.clone();
        }
        if value["kind"] == "EnrichmentTable" {
            // The demo has one clay-sim workspace: stay under its 20 rows/s.
            value["spec"]["clay"]["rateLimit"] = json!({"rowsPerSecond": 18, "burst": 18});
            value["spec"]["clay"]["resultTimeout"] = json!("30s");
        }
        objects.push(serde_json::from_value(value)?);
    }
    super::node::apply_objects(client, Some(namespace), &objects, FIELD_MANAGER).await?;
    Ok(())
}

/// Sample leads; a tenth of them repeat a key, to show de-duplication.
pub(super) fn sample_leads(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let n = if i % 10 == 9 { i - 9 } else { i };
            json!({"email": format!("lead{n}@example.com"), "company": format!("Company {}", n % 37), "source": "demo"})
        })
        .collect()
}

/// POSTs leads to a receiver's /v1/rows in chunks, waiting for it to accept.
pub(super) async fn push_leads(url: &str, token: &str, leads: &[Value]) -> anyhow::Result<()> {
    let http = super::node::service_client()?;
    for chunk in leads.chunks(50) {
        poll(
            "the receiver to accept rows",
            Duration::from_secs(120),
            || async {
                let response = http
                    .post(url)
                    .bearer_auth(token)
                    .json(&chunk)
                    .send()
                    .await
                    .ok()?;
                (response.status().as_u16() == 202).then_some(())
            },
        )
        .await?;
    }
    Ok(())
}

/// Shows the enrichment's progress from the table's row store until every
/// lead is delivered or dead-lettered, then what Clay charged and the three
/// kinds as kubectl would list them.
pub(super) async fn follow_enrichment(
    client: &kube::Client,
    namespace: &str,
    redis_url: &str,
    sim_url: &str,
    leads: usize,
) -> anyhow::Result<()> {
    step("enriching (Clay latency 0.3-1.5 s, rate-limited like a real workspace)");
    let budgets = Api::<CreditBudget>::namespaced(client.clone(), namespace);
    let store = crate::dataplane::store::RedisStore::connect(
        redis_url,
        crate::contract::Keys::new(namespace, TABLE),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let enriching = Instant::now();
    let mut used = (0.0, 0.0);
    let mut last_budget_read = Instant::now() - Duration::from_secs(10);
    loop {
        // Row counts straight from the store, every half second; the
        // budget (an API read) once a second.
        let (rows, _) = crate::operator::table::status::row_counters(
            &store.counters().await?,
            store.pending_count().await?,
        );
        if last_budget_read.elapsed() >= Duration::from_secs(1) {
            let status = budgets.get(BUDGET).await?.status.unwrap_or_default();
            used = (status.used.data_credits, status.reserved.data_credits);
            last_budget_read = Instant::now();
        }
        // De-duplicated rows are delivered too (and counted in both).
        let (received, delivered, dead, pending) = (
            rows.received,
            rows.delivered,
            rows.dead_lettered,
            rows.pending,
        );
        let done = delivered + dead;
        let rate = done as f64 / enriching.elapsed().as_secs_f64().max(0.1);
        let eta = match leads as u64 - done.min(leads as u64) {
            0 => "done".to_string(),
            left if rate > 0.0 => format!("~{:.0}s left", left as f64 / rate),
            _ => "starting".to_string(),
        };
        print!(
            "\r    received {received:>4} | submitted {:>4} | delivered {delivered:>4} (deduplicated {:>3}) | dead-lettered {dead:>3} | pending {pending:>3} | credits used {:>7.1} held {:>6.1} | {rate:>5.1} rows/s | {eta}   ",
            rows.submitted, rows.deduplicated, used.0, used.1,
        );
        std::io::stdout().flush().ok();
        if done >= leads as u64 {
            println!();
            break;
        }
        if Instant::now() > deadline {
            println!();
            bail!("the demo did not finish in 10 minutes; see the logs");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let sim_stats: crate::clay::sim::SimStats = reqwest::Client::new()
        .get(format!("{sim_url}/admin/stats"))
        .send()
        .await?
        .json()
        .await?;
    println!(
        "    clay-sim charged {:.1} data credits for {} rows; callbacks sent {} (failed {})",
        sim_stats.data_credits_charged,
        sim_stats.rows_accepted,
        sim_stats.callbacks_sent,
        sim_stats.callbacks_failed
    );
    step("kubectl get enrichmenttables,creditbudgets,refreshschedules");
    for plural in ["enrichmenttables", "creditbudgets", "refreshschedules"] {
        print_table(client, namespace, plural).await?;
    }
    Ok(())
}

async fn print_table(client: &kube::Client, namespace: &str, plural: &str) -> anyhow::Result<()> {
    let request = http::Request::get(format!(
        "/apis/kiln.dev/v1alpha1/namespaces/{namespace}/{plural}"
    ))
    .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
    .body(Vec::new())?;
    let table: Value = client.request(request).await?;
    let columns: Vec<String> = table["columnDefinitions"]
        .as_array()
        .map(|c| {
            c.iter()
                .map(|d| d["name"].as_str().unwrap_or_default().to_uppercase())
                .collect()
        })
        .unwrap_or_default();
    let rows: Vec<Vec<String>> = table["rows"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    r["cells"]
                        .as_array()
                        .map(|cells| {
                            cells
                                .iter()
                                .map(|c| match c {
                                    Value::Null => "<none>".to_string(),
                                    Value::String(s) => s.clone(),
                                    other => other.to_string(),
                                })
                                .collect()
                        })
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default();
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, String::len))
                .chain([columns[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("   ")
    };
    println!("{}", line(&columns));
    for row in &rows {
        println!("{}", line(row));
    }
    println!();
    Ok(())
}
