//! An operator with nothing to do writes nothing: with 50 tables
//! provisioned, a minute in which every table is reconciled twice (nothing
//! it manages changed) brings no write request for any object the operator
//! manages, counted by the API server itself.

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use kiln::api::{CreditBudget, EnrichmentTable};
use support::operator_writes;

const TABLES: usize = 50;
#[tokio::test]
async fn a_quiet_minute_with_fifty_tables_writes_nothing() {
    let env = support::test_env("quiet").await;
    support::install_kiln_crds(&env.client).await;
    let operator = support::start_operator(&env.namespace, "op").await;
    support::create_clay_secret(&env, "redis://127.0.0.1:1").await;
    support::create::<CreditBudget>(
        &env,
        json!({"apiVersion": "kiln.dev/v1alpha1", "kind": "CreditBudget", "metadata": {"name": "b"},
               "spec": {"limits": {"dataCredits": 1000.0}}}),
    )
    .await;
    for i in 0..TABLES {
        support::create::<EnrichmentTable>(
            &env,
            support::minimal_queue_table(&format!("t{i}"), "b"),
        )
        .await;
    }
    let tables = env.api::<EnrichmentTable>();
    for i in 0..TABLES {
        support::wait_condition(&tables, &format!("t{i}"), "Provisioned", "True").await;
    }
    // Let the first round of status writes and events settle: wait until
    // a 10 s window passes without a write.
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let mut before = operator_writes(&env.client).await;
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let now = operator_writes(&env.client).await;
        if now == before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the operator kept writing: {} writes in the last 10 s",
            now - before
        );
        before = now;
    }

    let start = operator_writes(&env.client).await;
    let minute = std::time::Instant::now();
    // Nothing the operator manages changes, but every table is reconciled
    // twice: an annotation on the Secret they all name is an event for each.
    let reconciles = operator.reconciles("enrichmenttable").await;
    for touch in ["1", "2"] {
        env.api::<Secret>()
            .patch(
                "clay",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {"touch": touch}}})),
            )
            .await
            .unwrap();
        let target = reconciles + TABLES as u64 * touch.parse::<u64>().unwrap();
        support::wait::until_within(
            "every table reconciled",
            Duration::from_secs(120),
            || async { (operator.reconciles("enrichmenttable").await >= target).then_some(()) },
        )
        .await;
    }
    // The rest of the minute, for anything the reconciles set off.
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(minute.elapsed())).await;
    let writes = operator_writes(&env.client).await - start;
    assert_eq!(
        writes, 0,
        "the operator wrote {writes} times in a quiet minute with {TABLES} tables"
    );
}
