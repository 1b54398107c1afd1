//! The real node for the tests that run Kiln in pods
//! (`kiln::devenv::node`): started once per test binary with Kiln's image
//! built from this build's binary and the chart installed by
//! `helm install --wait`; a watchdog process tears it down
//! (tests/node/down.sh) when the binary exits, however it exits.

use std::path::Path;
use std::process::{Command, Stdio};

use kiln::devenv::node::NodeCluster;
use tokio::sync::OnceCell;

use super::TestEnv;

static NODE: OnceCell<NodeCluster> = OnceCell::const_new();

/// The node, brought up (and Kiln installed on it) on first use.
pub async fn node() -> &'static NodeCluster {
    super::work_dir(); // installs the exit hooks
    NODE.get_or_init(|| async {
        let node = tokio::task::spawn_blocking(bring_up)
            .await
            .unwrap()
            .unwrap_or_else(|e| {
                super::mark_failed();
                panic!("bringing up the test node: {e:#}")
            });
        node.wait_ready_with_dns()
            .await
            .and_then(|()| node.helm_install_kiln())
            .unwrap_or_else(|e| {
                super::mark_failed();
                panic!("{e:#}")
            });
        node
    })
    .await
}

/// A fresh namespace on the node, with a client bound to the calling test's runtime.
pub async fn test_env(node: &NodeCluster, name: &str) -> TestEnv {
    let client = node.client().await.expect("a client for the node");
    super::env_in_new_namespace(client, name).await
}

/// A setting of tests/node/node.env (the node's fixed addresses and names).
pub fn setting(name: &str) -> String {
    let env = std::fs::read_to_string("tests/node/node.env").unwrap();
    env.lines()
        .find_map(|line| line.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("{name} in tests/node/node.env"))
        .to_string()
}

fn bring_up() -> anyhow::Result<NodeCluster> {
    let state = tempfile::Builder::new()
        .prefix("kiln-node-")
        .tempdir()?
        .keep();
    let repo = std::env::current_dir()?;
    let binary = Path::new(env!("CARGO_BIN_EXE_kiln"));
    NodeCluster::start(&repo, &state, binary, start_watchdog).inspect_err(|_| {
        let _ = std::fs::write(state.join("keep-logs"), "");
    })
}

/// A process of its own session that waits for this test binary to exit,
/// then runs down.sh and removes the node's state (keeping its logs when a
/// test failed: the exit hook leaves a `keep-logs` file). With
/// KILN_KEEP_NODE set the node stays up for a look around.
fn start_watchdog(state: &Path, kcp: &str) -> anyhow::Result<()> {
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
        .spawn()?;
    Ok(())
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
