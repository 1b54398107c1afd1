//! A real node for the tests that run Kiln in pods: the control plane plus
//! containerd, kubelet, kube-proxy and CoreDNS on this machine
//! (tests/node/up.sh), with Kiln's image built from this build's binary and
//! the chart installed by `helm install --wait`. Started once per test
//! binary; a watchdog process tears it down (tests/node/down.sh) when the
//! binary exits, however it exits.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Node as KubeNode;
use kube::api::Api;
use tokio::sync::OnceCell;

use super::{TestEnv, wait};

/// Namespace and release name of the chart install every node test shares.
pub const KILN_NAMESPACE: &str = "kiln-system";
pub const KILN_RELEASE: &str = "kiln";

pub struct Node {
    pub state: PathBuf,
    pub kubeconfig: PathBuf,
    pub helm: String,
}

static NODE: OnceCell<Node> = OnceCell::const_new();

/// The node, brought up (and Kiln installed on it) on first use.
pub async fn node() -> &'static Node {
    super::work_dir(); // installs the exit hooks
    NODE.get_or_init(|| async {
        let node = tokio::task::spawn_blocking(bring_up)
            .await
            .unwrap()
            .unwrap_or_else(|e| {
                super::mark_failed();
                panic!("bringing up the test node: {e}")
            });
        let client = node.client().await;
        wait::until_within("the node is Ready", Duration::from_secs(180), || async {
            let node = Api::<KubeNode>::all(client.clone())
                .get_opt("kiln-node")
                .await
                .ok()??;
            let ready = node
                .status?
                .conditions?
                .into_iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            ready.then_some(())
        })
        .await;
        let dns = std::fs::read_to_string("tests/node/coredns.yaml").unwrap();
        super::apply_objects(
            &client,
            None,
            &super::yaml_documents(&dns),
            "kiln-node-test",
        )
        .await;
        wait_available(&client, "kube-system", "coredns").await;
        node.helm_install_kiln();
        node
    })
    .await
}

impl Node {
    pub async fn client(&self) -> kube::Client {
        kiln::devenv::controlplane::client_from_kubeconfig(&self.kubeconfig)
            .await
            .expect("a client for the node's API server")
    }

    /// A fresh namespace on the node, with a client bound to the calling test's runtime.
    pub async fn test_env(&self, name: &str) -> TestEnv {
        super::env_in_new_namespace(self.client().await, name).await
    }

    /// `helm install --wait` of charts/kiln with its defaults: the image is
    /// the chart's default name and tag, built and imported by up.sh.
    fn helm_install_kiln(&self) {
        let output = Command::new(&self.helm)
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
            .expect("running helm");
        assert!(
            output.status.success(),
            "helm install --wait failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Waits until a Deployment reports every replica available.
pub async fn wait_available(client: &kube::Client, namespace: &str, name: &str) -> Deployment {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    wait::until_within(
        &format!("Deployment {namespace}/{name} available"),
        Duration::from_secs(240),
        || async {
            let deployment = api.get_opt(name).await.ok()??;
            let wanted = deployment.spec.as_ref()?.replicas.unwrap_or(1);
            let status = deployment.status.as_ref()?;
            let current = status.observed_generation == deployment.metadata.generation;
            (current
                && status.available_replicas.unwrap_or(0) == wanted
                && status.updated_replicas.unwrap_or(0) == wanted)
                .then_some(deployment.clone())
        },
    )
    .await
}

/// Runs a script of this repository, its stderr into `log`; stdout's lines.
fn script(log: &Path, script: &str, args: &[&str]) -> Result<Vec<String>, String> {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("opening {}: {e}", log.display()))?;
    let output = Command::new("bash")
        .arg(script)
        .args(args)
        .stderr(stderr)
        .output()
        .map_err(|e| format!("running {script}: {e}"))?;
    if !output.status.success() {
        let tail = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(30).collect();
        return Err(format!(
            "{script} {args:?} failed ({}); last lines of {}:\n{}",
            output.status,
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

fn bring_up() -> Result<Node, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "the test node needs root (it creates a bridge and iptables rules, \
                    and runs containerd); run the tests as root, or skip these with \
                    `cargo test -- --skip node`"
                .into(),
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
        super::install_once(program, package);
    }
    let state = tempfile::Builder::new()
        .prefix("kiln-node-")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    let log = state.join("bring-up.log");
    let last = |lines: Vec<String>| lines.last().cloned().unwrap_or_default();
    let kcp = last(script(&log, "tests/controlplane/build.sh", &[])?);
    let coredns = last(script(&log, "tests/node/build-coredns.sh", &[])?);
    let helm = last(script(&log, "tests/tools/build-helm.sh", &[])?);
    let images_dir = state.join("images");
    let images = script(
        &log,
        "tests/node/build-images.sh",
        &[
            images_dir.to_str().unwrap(),
            env!("CARGO_BIN_EXE_kiln"),
            &coredns,
        ],
    )?;
    let state_str = state.to_str().unwrap();
    // The watchdog first: a failed bring-up is torn down too.
    start_watchdog(&state, &kcp)?;
    let mut up_args = vec![state_str, kcp.as_str()];
    up_args.extend(images.iter().map(String::as_str));
    script(&log, "tests/node/up.sh", &up_args).inspect_err(|_| {
        let _ = std::fs::write(state.join("keep-logs"), "");
    })?;
    Ok(Node {
        kubeconfig: state.join("admin.kubeconfig"),
        state,
        helm,
    })
}

/// A process of its own session that waits for this test binary to exit,
/// then runs down.sh and removes the node's state (keeping its logs when a
/// test failed: the exit hook leaves a `keep-logs` file). With
/// KILN_KEEP_NODE set the node stays up for a look around.
fn start_watchdog(state: &Path, kcp: &str) -> Result<(), String> {
    if std::env::var_os("KILN_KEEP_NODE").is_some() {
        eprintln!(
            "KILN_KEEP_NODE: the node stays up; KUBECONFIG={}/admin.kubeconfig; \
             tear it down with: bash tests/node/down.sh {} {kcp}",
            state.display(),
            state.display()
        );
        return Ok(());
    }
    let program = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         bash tests/node/down.sh \"$0\" \"$1\" > \"$0/down.log\" 2>&1; \
         if [ -f \"$0/keep-logs\" ]; then rm -rf \"$0/containerd\" \"$0/kubelet\" \"$0/images\" \"$0/etcd\"; \
         else rm -rf \"$0\"; fi",
        pid = std::process::id()
    );
    Command::new("setsid")
        .args(["bash", "-c", &program])
        .arg(state)
        .arg(kcp)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(|_| ())
        .map_err(|e| format!("starting the node watchdog: {e}"))
}

/// Called by the exit hook: keeps the node's logs when a test failed.
pub fn keep_logs_on_failure(failed: bool) {
    if let Some(node) = NODE.get()
        && (failed || std::env::var_os("KILN_KEEP_LOGS").is_some())
    {
        let _ = std::fs::write(node.state.join("keep-logs"), "");
        eprintln!("test node logs kept in {}/logs", node.state.display());
    }
}
