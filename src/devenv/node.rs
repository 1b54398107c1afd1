//! A real one-node cluster on this machine, for `kiln demo --node` and the
//! tests that run Kiln in pods: the control plane plus containerd, kubelet,
//! kube-proxy and CoreDNS, brought up by the scripts in `tests/node/` of a
//! Kiln checkout, with Kiln's image built from a local binary and the chart
//! installed by `helm install --wait`. Needs root: it creates a bridge and
//! iptables rules and runs containerd.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::discovery::{Scope, pinned_kind};
use serde::Deserialize;
use serde_json::{Value, json};

use super::controlplane::client_from_kubeconfig;

/// Namespace and release name of the chart install on the node.
pub const KILN_NAMESPACE: &str = "kiln-system";
pub const KILN_RELEASE: &str = "kiln";
/// The node's name (tests/node/node.env).
const NODE_NAME: &str = "kiln-node";
/// Images build-images.sh builds besides Kiln's.
pub const REDIS_IMAGE: &str = "localhost/kiln/redis:local";

/// A node brought up in `state` from the checkout at `repo`.
pub struct NodeCluster {
    pub repo: PathBuf,
    pub state: PathBuf,
    pub kubeconfig: PathBuf,
    /// The control-plane binary (kubelet and kube-proxy included); down.sh needs it.
    pub kcp: String,
    pub helm: String,
}

/// Kiln's image as the chart names it by default: the crate's version.
pub fn kiln_image() -> String {
    format!("ghcr.io/kiln-dev/kiln:{}", env!("CARGO_PKG_VERSION"))
}

impl NodeCluster {
    /// Builds what is missing (all cached outside the checkout), builds the
    /// images from `kiln_binary`, and starts the node. `before_up` runs once
    /// the state directory exists and before anything changes on the host
    /// (the tests start their teardown watchdog there). Progress goes to
    /// `state/bring-up.log`.
    pub fn start(
        repo: &Path,
        state: &Path,
        kiln_binary: &Path,
        before_up: impl FnOnce(&Path, &str) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        if !super::is_root() {
            bail!(
                "a real node needs root (it creates a bridge and iptables rules, and runs containerd)"
            );
        }
        for (program, package) in [
            ("containerd", "containerd"),
            ("runc", "runc"),
            ("buildah", "buildah"),
            ("iptables", "iptables"),
            ("conntrack", "conntrack"),
            ("/usr/lib/cni/bridge", "containernetworking-plugins"),
        ] {
            super::ensure_installed(program, package)?;
        }
        std::fs::create_dir_all(state)?;
        let log = state.join("bring-up.log");
        let run = |script: &str, args: &[&str]| run_script(repo, &log, script, args);
        let last = |lines: Vec<String>| lines.last().cloned().unwrap_or_default();
        let kcp = last(run("tests/controlplane/build.sh", &[])?);
        let coredns = last(run("tests/node/build-coredns.sh", &[])?);
        let helm = last(run("tests/tools/build-helm.sh", &[])?);
        let images_dir = state.join("images");
        let images = run(
            "tests/node/build-images.sh",
            &[
                path_str(&images_dir)?,
                path_str(kiln_binary)?,
                coredns.as_str(),
            ],
        )?;
        before_up(state, &kcp)?;
        let mut up_args = vec![path_str(state)?, kcp.as_str()];
        up_args.extend(images.iter().map(String::as_str));
        if let Err(error) = run("tests/node/up.sh", &up_args) {
            // Undo what up.sh changed on the host before it failed.
            let _ = run("tests/node/down.sh", &[path_str(state)?, kcp.as_str()]);
            return Err(error);
        }
        Ok(Self {
            repo: repo.to_path_buf(),
            state: state.to_path_buf(),
            kubeconfig: state.join("admin.kubeconfig"),
            kcp,
            helm,
        })
    }

    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// Waits for the node to be Ready, then installs cluster DNS.
    pub async fn wait_ready_with_dns(&self) -> anyhow::Result<()> {
        let client = self.client().await?;
        let nodes = Api::<Node>::all(client.clone());
        poll("the node to be Ready", Duration::from_secs(180), || async {
            let node = nodes.get_opt(NODE_NAME).await.ok()??;
            let conditions = node.status?.conditions?;
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        })
        .await?;
        let dns = std::fs::read_to_string(self.repo.join("tests/node/coredns.yaml"))?;
        apply_objects(&client, None, &yaml_documents(&dns)?, "kiln-node").await?;
        wait_available(&client, "kube-system", "coredns").await?;
        Ok(())
    }

    /// `helm install --wait` of charts/kiln with its defaults (the image
    /// built from the local binary carries the chart's default name).
    pub fn helm_install_kiln(&self) -> anyhow::Result<()> {
        let output = Command::new(&self.helm)
            .current_dir(&self.repo)
            .args([
                "install",
                KILN_RELEASE,
                "charts/kiln",
                "--namespace",
                KILN_NAMESPACE,
            ])
            .args(["--create-namespace", "--wait", "--timeout", "5m"])
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.state.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.state.join("helm/config"))
            .env("HELM_DATA_HOME", self.state.join("helm/data"))
            .output()
            .context("running helm")?;
        if !output.status.success() {
            bail!(
                "helm install --wait failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Tears the node down and restores what it changed on the host.
    pub fn stop(&self) -> anyhow::Result<()> {
        let log = self.state.join("down.log");
        run_script(
            &self.repo,
            &log,
            "tests/node/down.sh",
            &[path_str(&self.state)?, &self.kcp],
        )
        .map(|_| ())
    }
}

/// A Deployment of one container with a Service in front of it, as JSON
/// objects to create in a namespace (Redis and clay-sim next to Kiln's pods).
pub fn service_deployment(name: &str, image: &str, args: &[&str], port: u16) -> [Value; 2] {
    [
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{
                        "name": name, "image": image, "imagePullPolicy": "IfNotPresent",
                        "args": args, "ports": [{"containerPort": port}],
                        "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 1}
                    }]}
                }
            }
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [{"port": port}]}
        }),
    ]
}

/// A Service's ClusterIP (the host reaches Services through kube-proxy).
pub async fn cluster_ip(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<String> {
    let service = Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), namespace)
        .get(name)
        .await?;
    service
        .spec
        .and_then(|s| s.cluster_ip)
        .with_context(|| format!("Service {name} has no ClusterIP"))
}

/// An HTTP client for calling a Service's ClusterIP from the host, retried
/// until it answers. Until kube-proxy has programmed the address, the host
/// routes it out of its default route, where a gateway may accept the
/// connection and answer for itself (this machine's answers 404): a pooled
/// keep-alive connection would pin every retry to that gateway, so each
/// request opens its own connection, and each is bounded in time.
pub fn service_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .build()?)
}

/// Configures a webhook source on clay-sim through its Service, retrying
/// while kube-proxy programs a new Service (a moment after it has endpoints).
pub async fn put_clay_sim_source(
    sim_url: &str,
    source: &str,
    config: &Value,
    timeout: Duration,
) -> anyhow::Result<()> {
    let http = service_client()?;
    let last_failure = std::sync::Mutex::new(String::from("no attempt finished"));
    let outcome = poll(
        &format!("clay-sim's Service at {sim_url}"),
        timeout,
        || async {
            let failure = match http
                .put(format!("{sim_url}/admin/sources/{source}"))
                .json(config)
                .send()
                .await
            {
                Ok(response) if response.status().is_success() => return Some(()),
                Ok(response) => format!("answered {}", response.status()),
                Err(error) => format!("{:#}", anyhow::Error::from(error)),
            };
            *last_failure.lock().unwrap() = failure;
            None
        },
    )
    .await;
    outcome.with_context(|| format!("last attempt: {}", last_failure.lock().unwrap()))
}

/// A throwaway Redis: no persistence, reachable from every pod.
pub const REDIS_ARGS: &[&str] = &[
    "--bind",
    "0.0.0.0",
    "--protected-mode",
    "no",
    "--save",
    "",
    "--appendonly",
    "no",
];

/// `kiln clay-sim` as a pod: quick answers.
pub const CLAY_SIM_ARGS: &[&str] = &[
    "--log-format",
    "json",
    "clay-sim",
    "--listen",
    "0.0.0.0:8780",
    "--latency-min-ms",
    "50",
    "--latency-max-ms",
    "300",
];

/// Waits until a Deployment reports every replica available.
pub async fn wait_available(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Deployment> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    poll(
        &format!("Deployment {namespace}/{name} to be available"),
        Duration::from_secs(240),
        || async {
            let deployment = api.get_opt(name).await.ok()??;
            let wanted = deployment.spec.as_ref()?.replicas.unwrap_or(1);
            let status = deployment.status.as_ref()?;
            let current = status.observed_generation == deployment.metadata.generation;
            let available = status.available_replicas.unwrap_or(0) == wanted
                && status.updated_replicas.unwrap_or(0) == wanted;
            (current && available).then_some(deployment.clone())
        },
    )
    .await
}

/// The YAML documents of a manifest, as dynamic objects.
pub fn yaml_documents(text: &str) -> anyhow::Result<Vec<DynamicObject>> {
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(document)?;
        if !value.is_null() {
            objects.push(serde_yaml::from_value(value)?);
        }
    }
    Ok(objects)
}

/// Server-side applies objects of any kind; namespaced ones into `namespace`
/// (or the namespace they name). Returns (kind, name) of each.
pub async fn apply_objects(
    client: &kube::Client,
    namespace: Option<&str>,
    objects: &[DynamicObject],
    manager: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut applied = Vec::new();
    for object in objects {
        let types = object.types.clone().context("an object without a kind")?;
        let (group, version) = types
            .api_version
            .split_once('/')
            .unwrap_or(("", &types.api_version));
        let gvk = kube::core::GroupVersionKind::gvk(group, version, &types.kind);
        let (resource, capabilities) = pinned_kind(client, &gvk).await?;
        let name = object
            .metadata
            .name
            .clone()
            .context("an object without a name")?;
        let api = match capabilities.scope {
            Scope::Cluster => Api::<DynamicObject>::all_with(client.clone(), &resource),
            Scope::Namespaced => {
                let ns = namespace
                    .or(object.metadata.namespace.as_deref())
                    .context("a namespace for a namespaced object")?;
                Api::namespaced_with(client.clone(), ns, &resource)
            }
        };
        api.patch(&name, &PatchParams::apply(manager), &Patch::Apply(object))
            .await
            .with_context(|| format!("applying {} {name}", types.kind))?;
        applied.push((types.kind, name));
    }
    Ok(applied)
}

/// Polls `check` until it yields, or fails after `timeout` naming `what`.
pub(super) async fn poll<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Runs a script of the checkout, its stderr appended to `log`; returns
/// stdout's lines, or the script's last words on failure.
fn run_script(repo: &Path, log: &Path, script: &str, args: &[&str]) -> anyhow::Result<Vec<String>> {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let output = Command::new("bash")
        .current_dir(repo)
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .stderr(stderr)
        .output()
        .with_context(|| format!("running {script}"))?;
    if !output.status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        bail!(
            "{script} failed ({}); last lines of {}:\n{}",
            output.status,
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}
