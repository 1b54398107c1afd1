//! A real Kubernetes control plane on loopback: etcd, kube-apiserver and
//! kube-controller-manager from the multi-call binary that
//! `tests/controlplane/build.sh` builds and caches.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kube::config::{KubeConfigOptions, Kubeconfig};

use super::certs::ControlPlanePki;
use super::free_port;
use super::process::ManagedProcess;

/// Kubernetes version of the control plane, as pinned by the wrapper module.
pub const K8S_VERSION: &str = include_str!("../../tests/controlplane/K8S_VERSION");

/// The admin credential written into the token file and the kubeconfig.
const ADMIN_TOKEN_USER: &str = "kiln-admin";

/// A running control plane. Dropping it stops every process it started.
pub struct ControlPlane {
    workdir: PathBuf,
    api_url: String,
    kubeconfig_path: PathBuf,
    // Field order is drop order: dependents stop before what they depend on.
    controller_manager: ManagedProcess,
    apiserver: ManagedProcess,
    etcd: ManagedProcess,
}

impl ControlPlane {
    /// Builds (or finds in the cache) the control-plane binary.
    pub fn binary() -> Result<PathBuf> {
        if let Ok(path) = std::env::var("KILN_KCP_BIN") {
            return Ok(PathBuf::from(path));
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/controlplane/build.sh");
        let output = Command::new("bash")
            .arg(&script)
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !output.status.success() {
            bail!("{} failed with {}", script.display(), output.status);
        }
        let path = String::from_utf8(output.stdout)?.trim().to_string();
        Ok(PathBuf::from(path))
    }

    /// Starts etcd, the API server and the controller manager in `workdir`
    /// and waits until the API server reports ready.
    pub async fn start(workdir: &Path) -> Result<Self> {
        let kcp = tokio::task::spawn_blocking(Self::binary).await??;
        std::fs::create_dir_all(workdir)?;
        let pki = ControlPlanePki::generate()?;
        let file = |name: &str, content: &str| -> Result<PathBuf> {
            let path = workdir.join(name);
            std::fs::write(&path, content)?;
            Ok(path)
        };
        let ca = file("ca.crt", &pki.ca_cert)?;
        let serving_cert = file("apiserver.crt", &pki.serving_cert)?;
        let serving_key = file("apiserver.key", &pki.serving_key)?;
        let sa_key = file("service-account.key", &pki.service_account_key)?;
        let sa_public_key = file("service-account.pub", &pki.service_account_public_key)?;
        let token = uuid::Uuid::new_v4().simple().to_string();
        let tokens = file(
            "tokens.csv",
            &format!("{token},{ADMIN_TOKEN_USER},{ADMIN_TOKEN_USER},system:masters\n"),
        )?;

        let etcd_port = free_port()?;
        let etcd_peer_port = free_port()?;
        let api_port = free_port()?;
        let api_url = format!("https://127.0.0.1:{api_port}");
        let kubeconfig_path = file(
            "kubeconfig",
            &kubeconfig_yaml(&api_url, &pki.ca_cert, &token),
        )?;

        let mut etcd_cmd = Command::new(&kcp);
        let client_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        etcd_cmd.arg("etcd").args([
            "--name=local",
            &format!("--data-dir={}", workdir.join("etcd").display()),
            &format!("--listen-client-urls={client_url}"),
            &format!("--advertise-client-urls={client_url}"),
            &format!("--listen-peer-urls={peer_url}"),
            &format!("--initial-advertise-peer-urls={peer_url}"),
            &format!("--initial-cluster=local={peer_url}"),
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]);
        let mut etcd = ManagedProcess::spawn("etcd", etcd_cmd, workdir)?;

        let mut api_cmd = Command::new(&kcp);
        api_cmd.arg("kube-apiserver").args([
            &format!("--etcd-servers={client_url}"),
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            &format!("--secure-port={api_port}"),
            &format!("--cert-dir={}", workdir.join("apiserver-certs").display()),
            &format!("--tls-cert-file={}", serving_cert.display()),
            &format!("--tls-private-key-file={}", serving_key.display()),
            &format!("--client-ca-file={}", ca.display()),
            &format!("--token-auth-file={}", tokens.display()),
            "--authorization-mode=Node,RBAC",
            "--service-cluster-ip-range=10.96.0.0/16",
            &format!("--service-account-key-file={}", sa_public_key.display()),
            &format!("--service-account-signing-key-file={}", sa_key.display()),
            "--service-account-issuer=https://kubernetes.default.svc",
            "--allow-privileged=true",
            "--enable-priority-and-fairness=false",
            "--v=1",
        ]);
        let mut apiserver = ManagedProcess::spawn("kube-apiserver", api_cmd, workdir)?;

        let mut cm_cmd = Command::new(&kcp);
        cm_cmd.arg("kube-controller-manager").args([
            &format!("--kubeconfig={}", kubeconfig_path.display()),
            "--leader-elect=false",
            "--secure-port=0",
            &format!("--service-account-private-key-file={}", sa_key.display()),
            &format!("--root-ca-file={}", ca.display()),
            "--concurrent-gc-syncs=5",
            "--v=1",
        ]);

        wait_ready(
            &mut etcd,
            &mut apiserver,
            &kubeconfig_path,
            Duration::from_secs(120),
        )
        .await?;
        // The controller manager needs a serving API server, so it starts last.
        let controller_manager = ManagedProcess::spawn("kube-controller-manager", cm_cmd, workdir)?;
        Ok(Self {
            workdir: workdir.to_path_buf(),
            api_url,
            kubeconfig_path,
            controller_manager,
            apiserver,
            etcd,
        })
    }

    /// A new client for the admin user. Create one per tokio runtime: a
    /// client's background tasks live on the runtime that created it.
    pub async fn client(&self) -> Result<kube::Client> {
        client_from_kubeconfig(&self.kubeconfig_path).await
    }

    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// Hands over the processes (dependents first, as they should stop),
    /// e.g. to stop them together with others.
    pub fn into_processes(self) -> Vec<ManagedProcess> {
        vec![self.etcd, self.apiserver, self.controller_manager]
    }

    /// The processes, for log paths and liveness checks.
    pub fn processes(&self) -> [&ManagedProcess; 3] {
        [&self.etcd, &self.apiserver, &self.controller_manager]
    }
}

/// A client from a kubeconfig file's current context.
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client> {
    let kubeconfig = Kubeconfig::read_from(path)?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

async fn wait_ready(
    etcd: &mut ManagedProcess,
    apiserver: &mut ManagedProcess,
    kubeconfig: &Path,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_error = String::new();
    while Instant::now() < deadline {
        etcd.ensure_running()?;
        apiserver.ensure_running()?;
        let probe = async {
            let client = client_from_kubeconfig(kubeconfig).await?;
            let request = http::Request::get("/readyz").body(Vec::new())?;
            anyhow::Ok(client.request_text(request).await?)
        }
        .await;
        match probe {
            Ok(body) if body.trim() == "ok" => return Ok(()),
            Ok(body) => last_error = body,
            Err(e) => last_error = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!(
        "kube-apiserver not ready after {timeout:?}: {last_error}\n{}",
        apiserver.log_tail(30)
    )
}

fn kubeconfig_yaml(api_url: &str, ca_pem: &str, token: &str) -> String {
    use base64::Engine;
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: kiln-local
  cluster:
    server: {api_url}
    certificate-authority-data: {ca}
users:
- name: {ADMIN_TOKEN_USER}
  user:
    token: {token}
contexts:
- name: kiln-local
  context:
    cluster: kiln-local
    user: {ADMIN_TOKEN_USER}
    namespace: default
current-context: kiln-local
",
        ca = base64::engine::general_purpose::STANDARD.encode(ca_pem)
    )
}
