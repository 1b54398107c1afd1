//! Test support: one real control plane per test binary, a client and a
//! fresh namespace per test, and cleanup of every process started, even when
//! tests panic. Control-plane logs are kept when any test failed.

#![allow(dead_code)] // each test binary uses a different subset of helpers

pub mod cpu;
pub mod crm;
pub mod direct;
pub mod event;
pub mod kafka;
pub mod node;
pub mod pipeline;
pub mod wait;
pub mod workspace;

use std::path::PathBuf;
use std::sync::OnceLock;

use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::OnceCell;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kiln::devenv::controlplane::ControlPlane;
use kiln::devenv::process;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};

static CONTROL_PLANE: OnceCell<ControlPlane> = OnceCell::const_new();
static WORKDIR: OnceLock<PathBuf> = OnceLock::new();
static ANY_TEST_FAILED: AtomicBool = AtomicBool::new(false);

/// The shared control plane, started on first use. Its processes outlive the
/// runtime of the test that started them; the exit hook stops them.
pub async fn control_plane() -> &'static ControlPlane {
    CONTROL_PLANE
        .get_or_init(|| async {
            let workdir = work_dir();
            ControlPlane::start(workdir).await.unwrap_or_else(|e| {
                ANY_TEST_FAILED.store(true, Ordering::SeqCst);
                panic!("starting the control plane in {}: {e:#}", workdir.display())
            })
        })
        .await
}

/// This test binary's scratch directory (removed at exit unless a test failed).
pub fn work_dir() -> &'static PathBuf {
    WORKDIR.get_or_init(|| {
        install_exit_hooks();
        tempfile::Builder::new()
            .prefix("kiln-test-")
            .tempdir()
            .expect("creating a temp dir")
            .keep()
    })
}

/// What each test gets: its own client (bound to the test's runtime) and namespace.
pub struct TestEnv {
    pub client: kube::Client,
    pub namespace: String,
}

impl TestEnv {
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
}

/// A client and a new namespace named after the test.
pub async fn test_env(test_name: &str) -> TestEnv {
    let plane = control_plane().await;
    let client = plane.client().await.expect("building a client");
    env_in_new_namespace(client, test_name).await
}

/// A new namespace named after the test, on the cluster `client` talks to.
pub async fn env_in_new_namespace(client: kube::Client, test_name: &str) -> TestEnv {
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let namespace = format!("{}-{suffix}", test_name.replace('_', "-"));
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(namespace.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("creating the test namespace");
    TestEnv { client, namespace }
}

/// The YAML documents of a manifest file, as dynamic objects.
pub fn yaml_documents(text: &str) -> Vec<kube::api::DynamicObject> {
    kiln::devenv::node::yaml_documents(text).expect("valid YAML documents")
}

/// Server-side applies objects of any kind; namespaced ones into `namespace`
/// (or the namespace they name). Returns (kind, name) of each.
pub async fn apply_objects(
    client: &kube::Client,
    namespace: Option<&str>,
    objects: &[kube::api::DynamicObject],
    manager: &str,
) -> Vec<(String, String)> {
    kiln::devenv::node::apply_objects(client, namespace, objects, manager)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Applies Kiln's CRDs (server-side) and waits until each is Established.
pub async fn install_kiln_crds(client: &kube::Client) {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let params = PatchParams::apply("kiln-tests").force();
    for crd in kiln::api::crds() {
        let name = crd.metadata.name.clone().unwrap();
        api.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
        wait::until(&format!("CRD {name} established"), || async {
            let crd = api.get(&name).await.ok()?;
            let established = crd
                .status?
                .conditions?
                .into_iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        })
        .await;
    }
}

fn install_exit_hooks() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        ANY_TEST_FAILED.store(true, Ordering::SeqCst);
        previous(info);
    }));
    // SAFETY: registering a plain extern "C" fn with no captured state.
    unsafe {
        libc::atexit(stop_everything);
    }
}

/// Marks the run as failed, so logs are kept.
pub fn mark_failed() {
    ANY_TEST_FAILED.store(true, Ordering::SeqCst);
}

extern "C" fn stop_everything() {
    process::kill_all_registered();
    node::keep_logs_on_failure(ANY_TEST_FAILED.load(Ordering::SeqCst));
    let Some(workdir) = WORKDIR.get() else { return };
    if ANY_TEST_FAILED.load(Ordering::SeqCst) || std::env::var_os("KILN_KEEP_LOGS").is_some() {
        eprintln!(
            "process logs (control plane, operator, clay-sim) kept in {}",
            workdir.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(workdir);
    }
}

/// A `kiln` subprocess (operator, worker, ...) pointed at the test control plane.
pub struct KilnProcess {
    pub process: process::ManagedProcess,
    pub health_port: u16,
    /// The operator's reservation API port.
    pub api_port: u16,
}

impl KilnProcess {
    /// Reconciles the operator's `controller` has run, from its metrics.
    pub async fn reconciles(&self, controller: &str) -> u64 {
        let Some((_, body)) = self.health_get("/metrics").await else {
            return 0;
        };
        body.lines()
            .find(|l| {
                l.starts_with("kiln_reconciles_total")
                    && l.contains(&format!("controller=\"{controller}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Whether this operator replica leads, from its metrics; None when unreachable.
    pub async fn leads(&self) -> Option<bool> {
        let (_, body) = self.health_get("/metrics").await?;
        Some(body.lines().any(|l| l == "kiln_operator_leader 1"))
    }

    /// GETs a path on the process's health server; None when unreachable.
    pub async fn health_get(&self, path: &str) -> Option<(u16, String)> {
        let url = format!("http://127.0.0.1:{}{path}", self.health_port);
        let response = reqwest::get(url).await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }
}

/// Starts `kiln operator` scoped to `namespace`, electing its leader on a Lease there.
pub async fn start_operator(namespace: &str, identity: &str) -> KilnProcess {
    start_operator_with(namespace, identity, &[]).await
}

/// [`start_operator`] with extra flags.
pub async fn start_operator_with(namespace: &str, identity: &str, extra: &[&str]) -> KilnProcess {
    let mut args = vec!["--watch-namespace", namespace];
    args.extend_from_slice(extra);
    start_operator_in(namespace, identity, &args, "info,kiln=debug").await
}

/// `kiln operator` with its leader-election Lease in `lease_namespace`,
/// watching every namespace unless `extra` says otherwise, logging at `log`
/// (a RUST_LOG filter).
pub async fn start_operator_in(
    lease_namespace: &str,
    identity: &str,
    extra: &[&str],
    log: &str,
) -> KilnProcess {
    let plane = control_plane().await;
    let health_port = kiln::devenv::free_port().unwrap();
    let api_port = kiln::devenv::free_port().unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    command
        .env("KUBECONFIG", plane.kubeconfig_path())
        .env("RUST_LOG", log)
        .args(["--log-format", "json", "operator"])
        .args(["--lease-namespace", lease_namespace])
        .args(["--identity", identity, "--image", "kiln:test"]);
    if !extra.contains(&"--operator-url") {
        command.args([
            "--operator-url",
            "http://kiln-operator.kiln-system.svc:8443",
        ]);
    }
    command
        .args(["--health-addr", &format!("127.0.0.1:{health_port}")])
        .args(["--api-addr", &format!("127.0.0.1:{api_port}")])
        .args(extra);
    let process =
        process::ManagedProcess::spawn(&format!("operator-{identity}"), command, work_dir())
            .expect("starting kiln operator");
    KilnProcess {
        process,
        health_port,
        api_port,
    }
}

/// Waits until the object's condition of `type_` has `status`, returning the object.
pub async fn wait_condition<K>(api: &Api<K>, name: &str, type_: &str, status: &str) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + serde::Serialize,
{
    wait::until(&format!("{name} condition {type_}={status}"), || async {
        let object = api.get(name).await.ok()?;
        let value = serde_json::to_value(&object).ok()?;
        let conditions = value["status"]["conditions"].as_array()?.clone();
        conditions
            .iter()
            .any(|c| c["type"] == type_ && c["status"] == status)
            .then_some(object)
    })
    .await
}

/// A running `kiln clay-sim`.
pub struct ClaySim {
    pub process: process::ManagedProcess,
    pub url: String,
}

impl ClaySim {
    /// The sim's own accounting.
    pub async fn stats(&self) -> kiln::clay::sim::SimStats {
        reqwest::get(format!("{}/admin/stats", self.url))
            .await
            .expect("clay-sim stats")
            .json()
            .await
            .expect("clay-sim stats JSON")
    }

    /// Configures a webhook source; returns its URL.
    pub async fn add_source(&self, id: &str, config: serde_json::Value) -> String {
        let response = reqwest::Client::new()
            .put(format!("{}/admin/sources/{id}", self.url))
            .json(&config)
            .send()
            .await
            .expect("configuring a clay-sim source");
        assert!(response.status().is_success());
        format!("{}/v3/sources/webhook/{id}", self.url)
    }
}

/// Starts `kiln clay-sim` with extra flags on a free port and waits for it.
pub async fn start_clay_sim(name: &str, flags: &[&str]) -> ClaySim {
    start_clay_sim_on(name, kiln::devenv::free_port().unwrap(), flags).await
}

/// Starts clay-sim on `port` (e.g. again, where a stopped one listened).
pub async fn start_clay_sim_on(name: &str, port: u16, flags: &[&str]) -> ClaySim {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    command
        .args([
            "--log-format",
            "json",
            "clay-sim",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(flags);
    let process = process::ManagedProcess::spawn(&format!("clay-sim-{name}"), command, work_dir())
        .expect("starting clay-sim");
    let url = format!("http://127.0.0.1:{port}");
    let health = format!("{url}/healthz");
    wait::until("clay-sim to answer", || async {
        reqwest::get(&health).await.ok().map(|_| ())
    })
    .await;
    ClaySim { process, url }
}

/// A running `redis-server` on a free loopback port.
pub struct Redis {
    pub process: process::ManagedProcess,
    pub url: String,
    pub port: u16,
}

/// Starts Redis (Debian's redis-server) without persistence.
pub async fn start_redis(name: &str) -> Redis {
    start_redis_on(name, kiln::devenv::free_port().unwrap(), false).await
}

/// Starts Redis on `port`; `durable` turns on the append-only file with an
/// fsync per write, so a restart on the same port and directory keeps the data.
pub async fn start_redis_on(name: &str, port: u16, durable: bool) -> Redis {
    let dir = work_dir().join(format!("redis-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    install_once("redis-server", "redis-server");
    let mut command = std::process::Command::new("redis-server");
    command.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
    ]);
    if durable {
        command.args(["--appendonly", "yes", "--appendfsync", "always"]);
    } else {
        command.args(["--appendonly", "no"]);
    }
    command.current_dir(&dir);
    let log_name = format!("redis-{name}-{}", uuid::Uuid::new_v4().simple());
    let process = process::ManagedProcess::spawn(&log_name, command, work_dir())
        .expect("starting redis-server (apt-get install redis-server)");
    let url = format!("redis://127.0.0.1:{port}/0");
    let client = redis::Client::open(url.as_str()).unwrap();
    wait::until("redis to answer", || async {
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .ok()
    })
    .await;
    Redis { process, url, port }
}

/// Installs a missing program from Debian's packages once per test binary
/// (as root), so `cargo test` works on a fresh machine as the README says.
pub fn install_once(program: &str, package: &str) {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(error) = kiln::devenv::ensure_installed(program, package) {
        panic!("{error:#}");
    }
}

/// A kubeconfig for the test control plane that authenticates with `token`
/// (e.g. a table's ServiceAccount), so processes run with exactly its RBAC.
pub async fn kubeconfig_for_token(name: &str, token: &str) -> PathBuf {
    let plane = control_plane().await;
    let admin = std::fs::read_to_string(plane.kubeconfig_path()).unwrap();
    let mut config: serde_yaml::Value = serde_yaml::from_str(&admin).unwrap();
    config["users"][0]["user"]["token"] = serde_yaml::Value::String(token.to_string());
    let path = work_dir().join(format!("kubeconfig-{name}"));
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

/// A connection to a test Redis whose replies may take as long as a loaded
/// 2-core machine needs (the client's default is 500 ms).
pub async fn redis_connection(url: &str) -> redis::aio::MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(std::time::Duration::from_secs(30)));
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("connecting to the test Redis")
}

/// Issues a token for a ServiceAccount (waiting until it exists).
pub async fn service_account_token(
    client: &kube::Client,
    namespace: &str,
    account: &str,
) -> String {
    kiln::devenv::service_account_token(client, namespace, account)
        .await
        .expect("issuing a ServiceAccount token")
}

/// Issues a lease-API token (audience kiln.dev/ledger) for a ServiceAccount,
/// as the pods' projected volume holds.
pub async fn ledger_token(client: &kube::Client, namespace: &str, account: &str) -> String {
    kiln::devenv::ledger_token(client, namespace, account)
        .await
        .expect("issuing a ledger token")
}

/// Creates a namespaced object from its JSON in the test's namespace.
pub async fn create<K>(env: &TestEnv, value: serde_json::Value) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value).unwrap();
    env.api::<K>()
        .create(&PostParams::default(), &object)
        .await
        .unwrap()
}

/// Starts `kiln <role> --table ns/name` the way its pod template does, with
/// the table's ServiceAccount credentials, the given operator endpoints and
/// extra environment variables.
pub fn start_dataplane(
    role: &str,
    table: &str,
    kubeconfig: &std::path::Path,
    token_file: &std::path::Path,
    operator_urls: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> KilnProcess {
    let health_port = kiln::devenv::free_port().unwrap();
    // Tests keep every row's story; benchmarks (release builds) log as
    // installed, since per-row debug lines cost CPU per row.
    let log = if cfg!(debug_assertions) {
        "info,kiln=debug"
    } else {
        "info"
    };
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    command
        .envs(env.iter().copied())
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", log)
        .args(["--log-format", "json", role, "--table", table])
        .args(["--operator-url", operator_urls])
        .args(["--ledger-token-file", token_file.to_str().unwrap()])
        .args(["--health-addr", &format!("127.0.0.1:{health_port}")])
        .args(extra);
    let name = format!("{role}-{}-{health_port}", table.replace('/', "-"));
    let process = process::ManagedProcess::spawn(&name, command, work_dir())
        .expect("starting a data-plane process");
    KilnProcess {
        process,
        health_port,
        api_port: 0,
    }
}

/// User + system CPU seconds a process has used so far.
/// Resident memory of a process, in MiB (VmRSS).
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Waits until the `team` budget's status satisfies `check`; returns it.
pub async fn budget_when(
    env: &TestEnv,
    what: &str,
    check: impl Fn(&kiln::api::CreditBudgetStatus) -> bool,
) -> kiln::api::CreditBudgetStatus {
    let budgets = env.api::<kiln::api::CreditBudget>();
    wait::until(what, || async {
        let status = budgets.get("team").await.ok()?.status?;
        check(&status).then_some(status)
    })
    .await
}

/// A benchmark setting from the environment, else `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Kinds the operator writes (children with no subresource; tables and
/// budgets with their status too). Leases and Events are not counted.
const OPERATOR_RESOURCES: &[&str] = &[
    "deployments",
    "services",
    "serviceaccounts",
    "roles",
    "rolebindings",
    "persistentvolumeclaims",
    "cronjobs",
    "enrichmenttables",
    "creditbudgets",
    "refreshschedules",
];
const WRITE_VERBS: &[&str] = &[
    "POST",
    "PUT",
    "PATCH",
    "APPLY",
    "DELETE",
    "DELETECOLLECTION",
];

/// Write requests the API server answered for the operator's kinds, from
/// its own `/metrics` (children's status subresources are the
/// controller-manager's and are left out).
pub async fn operator_writes(client: &kube::Client) -> u64 {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(request).await.unwrap();
    let mut total = 0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let (labels, value) = rest.rsplit_once("} ").unwrap();
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let resource = label("resource");
        let subresource = label("subresource");
        let ours = OPERATOR_RESOURCES.contains(&resource.as_str())
            && (subresource.is_empty()
                || (subresource == "status" && resource.starts_with("enrichment"))
                || (subresource == "status" && resource.starts_with("creditbudget")));
        if ours && WRITE_VERBS.contains(&label("verb").as_str()) {
            total += value.parse::<f64>().unwrap() as u64;
        }
    }
    total
}

/// Creates a Secret `name` holding `data` (as stringData).
pub async fn create_string_secret(env: &TestEnv, name: &str, data: &[(&str, &str)]) {
    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        string_data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    };
    env.api::<k8s_openapi::api::core::v1::Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
}

/// The Secret `clay` a [`minimal_queue_table`] names: a webhook URL, a
/// token, and `redis_url`.
pub async fn create_clay_secret(env: &TestEnv, redis_url: &str) {
    create_string_secret(
        env,
        "clay",
        &[
            ("url", "https://api.clay.com/v3/sources/webhook/x"),
            ("token", "t"),
            ("redis", redis_url),
        ],
    )
    .await;
}

/// The smallest valid Queue table drawing on `budget`, with its Secrets in
/// `clay` ([`create_clay_secret`]), for tests that only need many tables.
pub fn minimal_queue_table(name: &str, budget: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "kiln.dev/v1alpha1", "kind": "EnrichmentTable", "metadata": {"name": name},
        "spec": {
            "tier": "Queue", "key": "email", "budgetRef": {"name": budget},
            "clay": {
                "webhookSources": [{"name": "w", "urlSecretRef": {"name": "clay", "key": "url"}, "authTokenSecretRef": {"name": "clay", "key": "token"}}],
                "creditsPerRow": {"dataCredits": 1.0},
                "callbackTokenSecretRef": {"name": "clay", "key": "token"}
            },
            "source": {"http": {"authTokenSecretRef": {"name": "clay", "key": "token"}}},
            "sink": {"redisStream": {"stream": "out"}},
            "deadLetter": {"redisStream": {"stream": "dead"}},
            "redis": {"urlSecretRef": {"name": "clay", "key": "redis"}}
        }
    })
}
