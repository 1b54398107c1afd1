//! Every example in examples/ applies cleanly to the real control plane and
//! is reconciled: the operator provisions it and reports status.

#[path = "support/mod.rs"]
mod support;

use kube::api::Api;

use kiln::api::{CreditBudget, EnrichmentTable, RefreshSchedule};
use support::{wait, wait_condition};

async fn apply_file(env: &support::TestEnv, path: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let objects = support::yaml_documents(&text);
    support::apply_objects(
        &env.client,
        Some(&env.namespace),
        &objects,
        "kiln-examples-test",
    )
    .await
}

#[tokio::test]
async fn every_example_applies_and_is_reconciled() {
    let env = support::test_env("examples").await;
    support::install_kiln_crds(&env.client).await;
    let _operator = support::start_operator(&env.namespace, "op-examples").await;
    let mut files: Vec<_> = std::fs::read_dir("examples")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "one example per tier");
    for file in files {
        let applied = apply_file(&env, file.to_str().unwrap()).await;
        // Refresh runs need Redis: Direct tables (embedded store) have none.
        let kinds: &[&str] = if file.ends_with("direct.yaml") {
            &["CreditBudget", "EnrichmentTable"]
        } else {
            &["CreditBudget", "EnrichmentTable", "RefreshSchedule"]
        };
        for kind in kinds {
            assert!(
                applied.iter().any(|(k, _)| k == kind),
                "{} has a {kind}",
                file.display()
            );
        }
        for (kind, name) in applied {
            match kind.as_str() {
                "CreditBudget" => {
                    wait_condition(&env.api::<CreditBudget>(), &name, "Ready", "True").await;
                }
                "EnrichmentTable" => {
                    let tables: Api<EnrichmentTable> = env.api();
                    wait_condition(&tables, &name, "Provisioned", "True").await;
                    wait_condition(&tables, &name, "SecretsResolved", "True").await;
                    wait_condition(&tables, &name, "BudgetResolved", "True").await;
                }
                "RefreshSchedule" => {
                    wait_condition(&env.api::<RefreshSchedule>(), &name, "Ready", "True").await;
                }
                _ => {}
            }
        }
    }
    // Each tier got its shape of children.
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = env.api();
    wait::until("the Event table's worker", || async {
        deployments.get_opt("contact-stream-worker").await.ok()?
    })
    .await;
    assert!(
        deployments
            .get_opt("account-lookup-worker")
            .await
            .unwrap()
            .is_none(),
        "Direct has no worker"
    );
}
