//! Kiln in real pods: a one-node cluster on this machine (kubelet, containerd,
//! kube-proxy, CoreDNS), Kiln's image built from this build, the chart
//! installed with `helm install --wait`, and each tier's traffic through
//! real Services. Each test has its own namespace on the shared node.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, LogParams};
use serde_json::{Value, json};

use kiln::api::{EnrichmentTable, RefreshSchedule};
use kiln::devenv::node::{
    self, CLAY_SIM_ARGS, KILN_NAMESPACE, KILN_RELEASE, NodeCluster, REDIS_ARGS, REDIS_IMAGE,
    kiln_image, service_deployment,
};
use kube::api::DynamicObject;
use support::node::{node as test_node, setting, test_env};
use support::{TestEnv, wait, wait_condition};

/// Pods start, pull nothing and probe: minutes on a loaded 2-core machine at worst.
const POD_TIMEOUT: Duration = Duration::from_secs(240);

/// Waits until the table's pods serve and it reports Ready=True.
async fn wait_ready(env: &TestEnv, table: &str) {
    let tables = env.api::<EnrichmentTable>();
    wait::until_within(&format!("table {table} Ready"), POD_TIMEOUT, || async {
        let table = tables.get(table).await.ok()?;
        let conditions = table.status?.conditions;
        conditions
            .into_iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
            .then_some(())
    })
    .await;
}

/// A Deployment of one container and a Service in front of it, available.
async fn deploy(env: &TestEnv, name: &str, image: &str, args: &[&str], port: u16) {
    for object in service_deployment(name, image, args, port) {
        let object: DynamicObject = serde_json::from_value(object).unwrap();
        support::apply_objects(
            &env.client,
            Some(&env.namespace),
            &[object],
            "kiln-node-test",
        )
        .await;
    }
    node::wait_available(&env.client, &env.namespace, name)
        .await
        .unwrap();
}

async fn cluster_ip(env: &TestEnv, service: &str) -> String {
    node::cluster_ip(&env.client, &env.namespace, service)
        .await
        .unwrap()
}

/// Every line every container of the selected pods logged is a JSON object.
async fn logs_are_json(client: &kube::Client, namespace: &str, selector: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels(selector))
        .await
        .unwrap();
    assert!(
        !list.items.is_empty(),
        "pods matching {selector} in {namespace}"
    );
    for pod in list.items {
        let name = pod.metadata.name.unwrap();
        // A pod's status can lag its container: logs are readable a moment later.
        let logs = wait::until_within(
            &format!("logs of {namespace}/{name}"),
            POD_TIMEOUT,
            || async {
                let logs = pods.logs(&name, &LogParams::default()).await.ok()?;
                (!logs.trim().is_empty()).then_some(logs)
            },
        )
        .await;
        for line in logs.lines().filter(|l| !l.trim().is_empty()) {
            let parsed: Result<serde_json::Map<String, Value>, _> = serde_json::from_str(line);
            assert!(
                parsed.is_ok(),
                "{namespace}/{name} logged a non-JSON line: {line}"
            );
        }
    }
}

/// The operator pods and which of them carries the leader label.
async fn operator_pods(client: &kube::Client) -> (Vec<Pod>, Vec<String>) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), KILN_NAMESPACE);
    let list = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=kiln"))
        .await
        .unwrap();
    let leaders = list
        .items
        .iter()
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.get("kiln.dev/leader").map(String::as_str) == Some("true"))
        })
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    (list.items, leaders)
}

/// Pod IPs behind the operator's reservation API Service.
async fn api_endpoints(client: &kube::Client) -> BTreeSet<String> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), KILN_NAMESPACE);
    let selector = format!("kubernetes.io/service-name={KILN_RELEASE}");
    let list = slices
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap();
    list.items
        .into_iter()
        .flat_map(|s| s.endpoints)
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .flat_map(|e| e.addresses)
        .collect()
}

/// The leader's pod IP, once exactly one pod leads and the API Service
/// routes to it alone.
async fn leader_behind_the_service(client: &kube::Client) -> (String, String) {
    wait::until_within(
        "one labelled leader, alone behind the API Service",
        POD_TIMEOUT,
        || async {
            let (pods, leaders) = operator_pods(client).await;
            let [leader] = leaders.as_slice() else {
                return None;
            };
            let pod = pods
                .iter()
                .find(|p| p.metadata.name.as_ref() == Some(leader))?;
            let ip = pod.status.as_ref()?.pod_ip.clone()?;
            let endpoints = api_endpoints(client).await;
            (endpoints == BTreeSet::from([ip.clone()])).then(|| (leader.clone(), ip))
        },
    )
    .await
}

#[tokio::test]
async fn helm_install_waits_for_every_replica_and_the_api_service_reaches_the_leader() {
    let node = test_node().await;
    let client = node.client().await.unwrap();
    let deployment = node::wait_available(&client, KILN_NAMESPACE, KILN_RELEASE)
        .await
        .unwrap();
    assert_eq!(
        deployment.status.unwrap().ready_replicas,
        Some(2),
        "both replicas are Ready"
    );
    let (leader, _) = leader_behind_the_service(&client).await;
    let (pods, _) = operator_pods(&client).await;
    assert_eq!(pods.len(), 2);
    let image = pods[0].spec.as_ref().unwrap().containers[0].image.clone();
    assert_eq!(image.as_deref(), Some(kiln_image().as_str()));
    let lease: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), KILN_NAMESPACE);
    let holder = lease
        .get(KILN_RELEASE)
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity;
    assert_eq!(
        holder.as_deref(),
        Some(leader.as_str()),
        "the labelled pod holds the Lease"
    );
    logs_are_json(&client, KILN_NAMESPACE, "app.kubernetes.io/name=kiln").await;
}

/// Applies examples/<file> without its Secrets (their values are
/// placeholders; each test creates its own); returns (kind, name) of each.
async fn apply_example(env: &TestEnv, file: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(format!("examples/{file}")).unwrap();
    let objects: Vec<_> = support::yaml_documents(&text)
        .into_iter()
        .filter(|o| o.types.as_ref().is_some_and(|t| t.kind != "Secret"))
        .collect();
    support::apply_objects(
        &env.client,
        Some(&env.namespace),
        &objects,
        "kiln-node-test",
    )
    .await
}

/// clay-sim as a pod, with one webhook source (requiring `source_token` when
/// given) calling `receiver` back.
async fn clay_sim_pod(
    env: &TestEnv,
    receiver: &str,
    source_token: Option<&str>,
    callback_token: &str,
) -> String {
    deploy(env, "clay-sim", &kiln_image(), CLAY_SIM_ARGS, 8780).await;
    let sim = format!("http://{}:8780", cluster_ip(env, "clay-sim").await);
    let callback = format!(
        "http://{receiver}.{}.svc:8080/v1/clay/callback",
        env.namespace
    );
    let config = json!({
        "token": source_token,
        "callbackUrl": callback,
        "callbackHeaders": {"x-kiln-token": callback_token},
    });
    node::put_clay_sim_source(&sim, "main", &config, POD_TIMEOUT)
        .await
        .unwrap();
    format!(
        "http://clay-sim.{}.svc:8780/v3/sources/webhook/main",
        env.namespace
    )
}

/// POSTs rows to a receiver Service, retrying until the Service answers.
async fn post_rows(url: &str, token: &str, rows: &[Value]) {
    for chunk in rows.chunks(50) {
        wait::until_within(&format!("POST {url}"), POD_TIMEOUT, || async {
            let response = node::service_client()
                .unwrap()
                .post(url)
                .bearer_auth(token)
                .json(&json!(chunk))
                .send()
                .await
                .ok()?;
            response.status().is_success().then_some(())
        })
        .await;
    }
}

/// Entries on a Redis Stream, through the Redis Service.
async fn stream_length(redis_url: &str, stream: &str) -> Option<u64> {
    let client = redis::Client::open(redis_url).ok()?;
    let mut connection = client.get_multiplexed_async_connection().await.ok()?;
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(&mut connection)
        .await
        .ok()
}

#[tokio::test]
async fn queue_rows_flow_through_pods_and_survive_losing_the_leader_pod() {
    let node = test_node().await;
    let env = test_env(node, "queue").await;
    deploy(&env, "redis", REDIS_IMAGE, REDIS_ARGS, 6379).await;
    let webhook = clay_sim_pod(
        &env,
        "inbound-leads-receiver",
        Some("source-token"),
        "callback-secret",
    )
    .await;
    let redis_url = format!("redis://redis.{}.svc:6379/0", env.namespace);
    support::create_string_secret(
        &env,
        "clay-leads",
        &[
            ("webhook-url", &webhook),
            ("webhook-token", "source-token"),
            ("callback-token", "callback-secret"),
        ],
    )
    .await;
    support::create_string_secret(&env, "crm-ingest", &[("token", "crm-secret")]).await;
    support::create_string_secret(&env, "redis", &[("url", &redis_url)]).await;
    let applied = apply_example(&env, "queue.yaml").await;
    assert_eq!(applied.len(), 3, "budget, table and schedule: {applied:?}");

    let tables = env.api::<EnrichmentTable>();
    wait::until_within("the Queue table Ready", POD_TIMEOUT, || async {
        let table = tables.get("inbound-leads").await.ok()?;
        let ready = table
            .status?
            .conditions
            .into_iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then_some(())
    })
    .await;

    let receiver = format!(
        "http://{}:8080/v1/rows",
        cluster_ip(&env, "inbound-leads-receiver").await
    );
    let sink = format!("redis://{}:6379/0", cluster_ip(&env, "redis").await);
    post_rows(&receiver, "crm-secret", &support::pipeline::leads(60, 0)).await;
    wait::until_within("60 rows delivered", POD_TIMEOUT, || async {
        (stream_length(&sink, "leads:enriched").await? >= 60).then_some(())
    })
    .await;

    // Losing the leader's pod: the standby takes the Lease, labels its pod,
    // the API Service follows, and the workers' credit leases keep working.
    let (old_leader, old_ip) = leader_behind_the_service(&env.client).await;
    Api::<Pod>::namespaced(env.client.clone(), KILN_NAMESPACE)
        .delete(&old_leader, &DeleteParams::default())
        .await
        .unwrap();
    let (new_leader, _) =
        wait::until_within("a new leader behind the Service", POD_TIMEOUT, || async {
            let (leader, ip) = leader_behind_the_service(&env.client).await;
            (leader != old_leader && ip != old_ip).then_some((leader, ip))
        })
        .await;
    assert_ne!(new_leader, old_leader);
    post_rows(&receiver, "crm-secret", &support::pipeline::leads(40, 60)).await;
    wait::until_within(
        "100 rows delivered after the failover",
        POD_TIMEOUT,
        || async { (stream_length(&sink, "leads:enriched").await? >= 100).then_some(()) },
    )
    .await;
    let enriched = stream_length(&sink, "leads:enriched").await;
    assert_eq!(enriched, Some(100), "every row delivered once to the sink");

    // A refresh run from the CronJob, on demand.
    let schedules = env.api::<RefreshSchedule>();
    let patch = json!({"metadata": {"annotations": {"kiln.dev/refresh-now": "node-test"}}});
    schedules
        .patch(
            "inbound-leads-weekly",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    wait::until_within("the refresh run's lastRun", POD_TIMEOUT, || async {
        let schedule = schedules.get("inbound-leads-weekly").await.ok()?;
        let status = serde_json::to_value(schedule.status?).ok()?;
        (status["lastRun"]["outcome"] == "Succeeded").then_some(())
    })
    .await;

    logs_are_json(
        &env.client,
        &env.namespace,
        "app.kubernetes.io/managed-by=kiln-operator",
    )
    .await;
}

/// A hostPath PersistentVolume bound to `claim`, its directory owned by `owner` (root otherwise).
async fn store_volume(node: &NodeCluster, env: &TestEnv, claim: &str, owner: Option<u32>) {
    let dir = node
        .state
        .join(format!("volumes/{}/{claim}", env.namespace));
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, owner, owner).unwrap();
    let volume: PersistentVolume = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": format!("{claim}-{}", env.namespace)},
        "spec": {
            "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "claimRef": {"namespace": env.namespace, "name": claim},
            "hostPath": {"path": dir.to_str().unwrap(), "type": "Directory"}
        }
    }))
    .unwrap();
    Api::<PersistentVolume>::all(env.client.clone())
        .create(&kube::api::PostParams::default(), &volume)
        .await
        .unwrap();
}

#[tokio::test]
async fn event_records_flow_from_kafka_through_pods_to_the_result_topic() {
    let node = test_node().await;
    let env = test_env(node, "event").await;
    // The broker runs on the host, listening on the node's address.
    let kafka = support::kafka::start_kafka_on("node-event", &setting("NODE_IP")).await;
    deploy(&env, "redis", REDIS_IMAGE, REDIS_ARGS, 6379).await;
    let webhook = clay_sim_pod(
        &env,
        "contact-stream-receiver",
        Some("source-token"),
        "callback-secret",
    )
    .await;
    support::create_string_secret(
        &env,
        "clay-contacts",
        &[
            ("webhook-url-1", &webhook),
            ("webhook-url-2", &webhook),
            ("webhook-token", "source-token"),
            ("callback-token", "callback-secret"),
        ],
    )
    .await;
    let redis_url = format!("redis://redis.{}.svc:6379/0", env.namespace);
    support::create_string_secret(&env, "redis", &[("url", &redis_url)]).await;
    // examples/event.yaml, pointed at this broker (plain text, no SASL) and
    // sized for one node.
    let text = std::fs::read_to_string("examples/event.yaml").unwrap();
    let mut objects: Vec<_> = support::yaml_documents(&text)
        .into_iter()
        .filter(|o| {
            o.types
                .as_ref()
                .is_some_and(|t| t.kind == "CreditBudget" || t.kind == "EnrichmentTable")
        })
        .collect();
    let table = objects
        .iter_mut()
        .find(|o| o.types.as_ref().unwrap().kind == "EnrichmentTable")
        .unwrap();
    table.data["spec"]["source"]["kafka"] =
        json!({"brokers": [kafka.bootstrap], "topic": "contacts.raw"});
    table.data["spec"]["workers"] = json!({"replicas": 1, "concurrency": 16});
    table.data["spec"]["receiver"] = json!({"replicas": 1});
    support::apply_objects(
        &env.client,
        Some(&env.namespace),
        &objects,
        "kiln-node-test",
    )
    .await;
    wait_ready(&env, "contact-stream").await;

    let records: Vec<Value> = (0..40)
        .map(|i| json!({"email": format!("contact{i}@example.com"), "company": format!("Co {i}")}))
        .collect();
    support::event::produce(&kafka.bootstrap, "contacts.raw", &records).await;
    let enriched = support::kafka::read_topic(&kafka.bootstrap, &["contacts.enriched"], |read| {
        read.len() >= 40
    })
    .await;
    assert_eq!(
        enriched.len(),
        40,
        "every record enriched once onto the result topic"
    );
    logs_are_json(
        &env.client,
        &env.namespace,
        "app.kubernetes.io/managed-by=kiln-operator",
    )
    .await;
}

#[tokio::test]
async fn a_store_volume_kiln_cannot_write_is_named_in_the_table_status() {
    let node = test_node().await;
    let env = test_env(node, "store").await;
    support::create_string_secret(
        &env,
        "clay-accounts",
        &[
            ("webhook-url", "http://clay.invalid/hook"),
            ("callback-token", "callback-secret"),
            ("api-token", "api-secret"),
        ],
    )
    .await;
    store_volume(node, &env, "account-lookup-store", None).await;
    apply_example(&env, "direct.yaml").await;
    let tables = env.api::<EnrichmentTable>();
    let message = wait::until_within(
        "WorkersAvailable=False/PodsFailing",
        POD_TIMEOUT,
        || async {
            let table = tables.get("account-lookup").await.ok()?;
            let condition = table
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "WorkersAvailable" && c.reason == "PodsFailing")?;
            Some(condition.message)
        },
    )
    .await;
    assert!(message.contains("not writable by uid 65532"), "{message}");
    assert!(message.contains("CrashLoopBackOff"), "{message}");
}

#[tokio::test]
async fn direct_enrich_answers_through_its_service_before_and_after_the_pod_moves() {
    let node = test_node().await;
    let env = test_env(node, "direct").await;
    let webhook = clay_sim_pod(&env, "account-lookup-receiver", None, "callback-secret").await;
    support::create_string_secret(
        &env,
        "clay-accounts",
        &[
            ("webhook-url", &webhook),
            ("callback-token", "callback-secret"),
            ("api-token", "api-secret"),
        ],
    )
    .await;
    // A local volume for the receiver's store, its directory owned by Kiln's
    // user: hostPath and local volumes ignore fsGroup.
    store_volume(node, &env, "account-lookup-store", Some(65532)).await;
    apply_example(&env, "direct.yaml").await;
    let tables = env.api::<EnrichmentTable>();
    wait_condition(&tables, "account-lookup", "Provisioned", "True").await;
    let url = format!(
        "http://{}:8080",
        cluster_ip(&env, "account-lookup-receiver").await
    );
    let enrich = |domain: &'static str| {
        let url = url.clone();
        async move {
            wait::until_within(&format!("/v1/enrich {domain}"), POD_TIMEOUT, || async {
                let response = node::service_client()
                    .unwrap()
                    .post(format!("{url}/v1/enrich"))
                    .bearer_auth("api-secret")
                    .json(&json!({"domain": domain}))
                    .send()
                    .await
                    .ok()?;
                let status = response.status().as_u16();
                let body: Value = response.json().await.ok()?;
                (status == 200).then_some(body)
            })
            .await
        }
    };
    let first = enrich("example.com").await;
    assert_eq!(
        first["result"]["domain"], "example.com",
        "the enriched record: {first}"
    );

    let pods: Api<Pod> = env.api();
    let selector = "app.kubernetes.io/instance=account-lookup,app.kubernetes.io/component=receiver";
    let before = pods
        .list(&ListParams::default().labels(selector))
        .await
        .unwrap();
    let old = before.items[0].metadata.name.clone().unwrap();
    pods.delete(&old, &DeleteParams::default()).await.unwrap();
    wait::until_within("the receiver pod replaced", POD_TIMEOUT, || async {
        let now = pods
            .list(&ListParams::default().labels(selector))
            .await
            .ok()?;
        let replaced = now
            .items
            .iter()
            .all(|p| p.metadata.name.as_deref() != Some(old.as_str()));
        (replaced && !now.items.is_empty()).then_some(())
    })
    .await;
    let second = enrich("example.org").await;
    assert_eq!(second["result"]["domain"], "example.org", "{second}");
    // The store moved with the claim: the first row is answered from it.
    let again = enrich("example.com").await;
    assert_eq!(
        again["result"]["kiln_row_id"], first["result"]["kiln_row_id"],
        "{again}"
    );
    logs_are_json(
        &env.client,
        &env.namespace,
        "app.kubernetes.io/managed-by=kiln-operator",
    )
    .await;
}
