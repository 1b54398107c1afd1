//! `kiln demo --node`: the demo with Kiln in real pods. A one-node cluster
//! on this machine (see [`super::node`]), Kiln's image built from this very
//! binary, `helm install --wait` of the chart, Redis and clay-sim as pods,
//! examples/queue.yaml applied: the operator provisions the worker and
//! receiver Deployments, the kubelet runs them, and `kubectl get
//! enrichmenttables` shows READY True. The leads reach the receiver through
//! its Service's ClusterIP.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kube::api::{Api, DynamicObject};
use serde_json::json;

use super::demo::{
    DemoArgs, DemoSecrets, FIELD_MANAGER, SIM_FLAGS, SOURCE_TOKEN, TABLE, apply_namespace,
    apply_queue_example, follow_enrichment, push_leads, sample_leads, step,
};
use super::node::{
    NodeCluster, REDIS_ARGS, REDIS_IMAGE, apply_objects, cluster_ip, kiln_image, poll,
    put_clay_sim_source, service_deployment, wait_available,
};
use crate::api::EnrichmentTable;

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let repo = std::env::current_dir()?;
    if !repo.join("tests/node/up.sh").is_file() {
        bail!(
            "run `kiln demo --node` from a Kiln checkout: it brings the node up with tests/node/"
        );
    }
    let state = tempfile::Builder::new()
        .prefix("kiln-demo-node-")
        .tempdir()?
        .keep();
    step(
        "building Kiln's image from this binary and bringing up a one-node cluster (containerd, kubelet, kube-proxy, CoreDNS)",
    );
    println!("    progress: {}", state.join("bring-up.log").display());
    let binary = std::env::current_exe().context("the kiln binary's path")?;
    let started = {
        let (repo, state) = (repo.clone(), state.clone());
        tokio::task::spawn_blocking(move || {
            NodeCluster::start(&repo, &state, &binary, |_, _| Ok(()))
        })
        .await?
    };
    let node = started?;
    let outcome = tokio::select! {
        result = demo(&args, &node) => result,
        _ = tokio::signal::ctrl_c() => {
            println!("\ninterrupted");
            Ok(())
        }
    };
    if outcome.is_ok() && !args.exit {
        println!("\nThe node keeps running for you to look around; press Ctrl-C to tear it down.");
        tokio::signal::ctrl_c().await.ok();
    }
    step("tearing the node down (pods, containerd, iptables rules, the bridge)");
    let stopped = tokio::task::spawn_blocking(move || node.stop()).await?;
    println!("logs: {}/logs", state.display());
    outcome.and(stopped)
}

async fn demo(args: &DemoArgs, node: &NodeCluster) -> anyhow::Result<()> {
    let started = Instant::now();
    step("waiting for the node, then cluster DNS");
    node.wait_ready_with_dns().await?;
    step("helm install kiln charts/kiln --wait (two operator replicas, the leader labelled)");
    tokio::task::block_in_place(|| node.helm_install_kiln())?;
    let client = node.client().await?;
    let namespace = &args.namespace;
    apply_namespace(&client, namespace).await?;

    step("starting Redis and clay-sim as pods");
    let mut objects = Vec::new();
    objects.extend(service_deployment("redis", REDIS_IMAGE, REDIS_ARGS, 6379));
    let listen = [
        "--log-format",
        "json",
        "clay-sim",
        "--listen",
        "0.0.0.0:8780",
    ];
    let sim_args = [&listen[..], SIM_FLAGS].concat();
    objects.extend(service_deployment(
        "clay-sim",
        &kiln_image(),
        &sim_args,
        8780,
    ));
    let objects: Vec<DynamicObject> = objects
        .into_iter()
        .map(serde_json::from_value)
        .collect::<Result<_, _>>()?;
    apply_objects(&client, Some(namespace), &objects, FIELD_MANAGER).await?;
    wait_available(&client, namespace, "redis").await?;
    wait_available(&client, namespace, "clay-sim").await?;
    let sim_url = format!(
        "http://{}:8780",
        cluster_ip(&client, namespace, "clay-sim").await?
    );
    let redis_url = format!(
        "redis://{}:6379",
        cluster_ip(&client, namespace, "redis").await?
    );

    step("applying examples/queue.yaml (Secrets pointed at the Redis and clay-sim pods)");
    let callback_token = uuid::Uuid::new_v4().simple().to_string();
    let ingest_token = uuid::Uuid::new_v4().simple().to_string();
    let receiver = format!("{TABLE}-receiver");
    let source = json!({
        "token": SOURCE_TOKEN,
        "callbackUrl": format!("http://{receiver}.{namespace}.svc:8080/v1/clay/callback"),
        "callbackHeaders": {"x-kiln-token": callback_token},
    });
    put_clay_sim_source(&sim_url, "demo", &source, Duration::from_secs(60)).await?;
    let secrets = DemoSecrets {
        webhook_url: format!("http://clay-sim.{namespace}.svc:8780/v3/sources/webhook/demo"),
        callback_token: callback_token.clone(),
        ingest_token: ingest_token.clone(),
        redis_url: format!("redis://redis.{namespace}.svc:6379/0"),
    };
    apply_queue_example(&client, namespace, &secrets).await?;

    step("waiting for the operator's worker and receiver pods (READY True)");
    let tables = Api::<EnrichmentTable>::namespaced(client.clone(), namespace);
    poll(
        "the table to be Ready",
        Duration::from_secs(300),
        || async {
            let table = tables.get(TABLE).await.ok()?;
            let conditions = table.status?.conditions;
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        },
    )
    .await?;

    let leads = sample_leads(args.leads);
    let receiver_url = format!(
        "http://{}:8080/v1/rows",
        cluster_ip(&client, namespace, &receiver).await?
    );
    step(&format!(
        "pushing {} sample leads to the receiver's Service ({receiver_url})",
        leads.len()
    ));
    push_leads(&receiver_url, &ingest_token, &leads).await?;
    follow_enrichment(&client, namespace, &redis_url, &sim_url, args.leads).await?;
    println!(
        "\nDone in {:.0} s. While it runs, in another terminal:\n  export KUBECONFIG={}\n  kubectl get pods -A\n  kubectl -n {namespace} get enrichmenttables,creditbudgets,refreshschedules\n  kubectl -n {namespace} logs deploy/{TABLE}-worker\n  kubectl -n kiln-system get pods -L kiln.dev/leader",
        started.elapsed().as_secs_f64(),
        node.kubeconfig.display(),
    );
    Ok(())
}
