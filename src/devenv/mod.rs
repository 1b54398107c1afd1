//! Local, real infrastructure for tests and the demo: a Kubernetes control
//! plane built from Go modules, Redis and Kafka, each started as a child
//! process on loopback in a work directory. Nothing here is used in a cluster.

pub mod certs;
pub mod controlplane;
pub mod demo;
pub mod node;
mod node_demo;
pub mod process;

use std::net::TcpListener;

/// Whether this process runs as root.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    })
}

/// Makes sure `program` is on PATH: installs Debian's `package` when it is
/// missing and this runs as root (as on a fresh development machine, where
/// the README's commands must work as written); otherwise says the one
/// command to run.
pub fn ensure_installed(program: &str, package: &str) -> anyhow::Result<()> {
    let present = |program: &str| {
        std::env::var_os("PATH").is_some_and(|paths| {
            std::env::split_paths(&paths).any(|dir| dir.join(program).is_file())
        })
    };
    if present(program) {
        return Ok(());
    }
    anyhow::ensure!(
        is_root() && present("apt-get"),
        "{program} is not installed; run `sudo apt-get install -y {package}` (or `bash .ci/install-deps`) and try again"
    );
    println!("==> installing {package} from Debian's packages (once)");
    for args in [
        &["update", "-qq"][..],
        &["install", "-y", "-qq", package][..],
    ] {
        let status = std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| anyhow::anyhow!("running apt-get: {e}"))?;
        anyhow::ensure!(
            status.success(),
            "apt-get {} failed; install {package} and try again",
            args.join(" ")
        );
    }
    anyhow::ensure!(
        present(program),
        "{package} installed, but {program} is still not on PATH"
    );
    Ok(())
}

/// A loopback port that was free a moment ago. The socket is closed before the
/// port is handed out, so a rare race with another process is possible; callers
/// start their servers right away.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Issues a token for a ServiceAccount, waiting up to a minute for it to exist
/// (the operator creates a table's account).
pub async fn service_account_token(
    client: &kube::Client,
    namespace: &str,
    account: &str,
) -> anyhow::Result<String> {
    token_for_audiences(client, namespace, account, vec![]).await
}

/// A ServiceAccount token for the lease API (what the pods' projected
/// volume holds), refused by the API server.
pub async fn ledger_token(
    client: &kube::Client,
    namespace: &str,
    account: &str,
) -> anyhow::Result<String> {
    token_for_audiences(
        client,
        namespace,
        account,
        vec![crate::ledger::TOKEN_AUDIENCE.to_string()],
    )
    .await
}

async fn token_for_audiences(
    client: &kube::Client,
    namespace: &str,
    account: &str,
    audiences: Vec<String>,
) -> anyhow::Result<String> {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let accounts = kube::Api::<ServiceAccount>::namespaced(client.clone(), namespace);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while accounts.get_opt(account).await?.is_none() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "ServiceAccount {namespace}/{account} did not appear"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences,
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let issued = accounts
        .create_token_request(account, &kube::api::PostParams::default(), &request)
        .await?;
    Ok(issued
        .status
        .ok_or_else(|| anyhow::anyhow!("a TokenRequest without a token"))?
        .token)
}
