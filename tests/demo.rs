//! The README's first command, `cargo run -- demo`, run as a new user would
//! (with fewer leads, and `--exit` so it stops by itself): it must enrich
//! every lead and say what to look at next, so the README cannot drift from
//! what works. The same for `kiln demo --node`, with Kiln in real pods.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

/// Runs `kiln demo <args>` to its end; its stdout once it succeeded.
async fn demo(args: &[&str]) -> String {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("demo")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting kiln demo");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (mut out, mut err) = (String::new(), String::new());
    // Generous: a loaded 2-core machine starts a control plane (or a node),
    // Redis, clay-sim, the operator and the data plane.
    let finished = tokio::time::timeout(Duration::from_secs(900), async {
        let (o, e) = tokio::join!(
            stdout.read_to_string(&mut out),
            stderr.read_to_string(&mut err)
        );
        o.and(e).expect("reading the demo's output");
        child.wait().await.expect("waiting for the demo")
    })
    .await
    .unwrap_or_else(|_| panic!("the demo did not finish in 15 minutes:\n{out}\n{err}"));
    assert!(finished.success(), "the demo failed:\n{out}\n{err}");
    // Every lead ended delivered (or de-duplicated) or dead-lettered.
    let last_progress = out
        .split('\r')
        .rfind(|line| line.contains("delivered"))
        .unwrap_or_default();
    assert!(last_progress.contains("done"), "{last_progress}");
    assert!(
        !err.contains("stack backtrace"),
        "an expected run prints no backtrace:\n{err}"
    );
    out
}

#[tokio::test]
async fn the_readme_demo_enriches_every_lead_and_says_what_to_look_at() {
    let out = demo(&["--leads", "30", "--exit", "--namespace", "readme-demo"]).await;
    for expected in [
        "==> pushing 30 sample leads",
        "delivered",
        "inbound-leads",
        "export KUBECONFIG=",
        "kubectl -n readme-demo describe enrichmenttable inbound-leads",
        "--print-clay-template",
    ] {
        assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
    }
}

#[tokio::test]
async fn the_node_demo_runs_kiln_in_pods_and_the_table_is_ready() {
    let out = demo(&[
        "--node",
        "--leads",
        "30",
        "--exit",
        "--namespace",
        "node-demo",
    ])
    .await;
    for expected in [
        "helm install kiln charts/kiln --wait",
        "==> pushing 30 sample leads to the receiver's Service",
        "tearing the node down",
    ] {
        assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
    }
    let table = out
        .lines()
        .find(|line| line.starts_with("inbound-leads ") && line.contains("Queue"))
        .unwrap_or_else(|| panic!("the table's row missing from:\n{out}"));
    let ready = table.split_whitespace().nth(2);
    assert_eq!(ready, Some("True"), "READY column: {table}");
}
