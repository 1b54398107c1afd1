//! The README's first command, `cargo run -- demo`, run as a new user would
//! (with fewer leads, and `--exit` so it stops by itself): it must enrich
//! every lead and say what to look at next, so the README cannot drift from
//! what works.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

#[tokio::test]
async fn the_readme_demo_enriches_every_lead_and_says_what_to_look_at() {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "demo",
            "--leads",
            "30",
            "--exit",
            "--namespace",
            "readme-demo",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting kiln demo");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (mut out, mut err) = (String::new(), String::new());
    // Generous: a loaded 2-core machine starts a control plane, Redis,
    // clay-sim, the operator and the data plane.
    let finished = tokio::time::timeout(Duration::from_secs(600), async {
        let (o, e) = tokio::join!(
            stdout.read_to_string(&mut out),
            stderr.read_to_string(&mut err)
        );
        o.and(e).expect("reading the demo's output");
        child.wait().await.expect("waiting for the demo")
    })
    .await
    .unwrap_or_else(|_| panic!("the demo did not finish in 10 minutes:\n{out}\n{err}"));
    assert!(finished.success(), "the demo failed:\n{out}\n{err}");
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
}
