//! Proves the test harness runs a real control plane: the API server stores
//! custom objects, and kube-controller-manager creates ReplicaSets and
//! garbage-collects owned objects.

#[path = "support/mod.rs"]
mod support;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::ObjectMeta;
use serde_json::json;

use kiln::api::CreditBudget;
use support::wait;

#[tokio::test]
async fn custom_objects_round_trip_through_the_api_server() {
    let env = support::test_env("harness-crd").await;
    support::install_kiln_crds(&env.client).await;
    let budgets = env.api::<CreditBudget>();
    let budget: CreditBudget = serde_json::from_value(json!({
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "CreditBudget",
        "metadata": {"name": "team-a"},
        "spec": {"limits": {"dataCredits": 2500.0}, "timeZone": "Europe/Berlin"}
    }))
    .unwrap();
    budgets
        .create(&PostParams::default(), &budget)
        .await
        .unwrap();

    let stored = budgets.get("team-a").await.unwrap();
    assert_eq!(stored.spec.limits.data_credits, Some(2500.0));
    assert_eq!(stored.spec.time_zone, "Europe/Berlin");
    assert!(
        stored.metadata.uid.is_some(),
        "the API server assigned a uid"
    );

    // Defaults are filled in by the API server from the CRD schema: read the
    // raw object so serde's own defaults cannot stand in for them.
    let resource = ApiResource::erase::<CreditBudget>(&());
    let raw = Api::<DynamicObject>::namespaced_with(env.client.clone(), &env.namespace, &resource)
        .get("team-a")
        .await
        .unwrap();
    assert_eq!(raw.data["spec"]["period"], "Monthly");
    assert_eq!(raw.data["spec"]["onExhausted"], "Pause");
    assert_eq!(raw.data["spec"]["warningThresholds"], json!([75, 90]));
}

#[tokio::test]
async fn controller_manager_creates_replica_sets_and_collects_garbage() {
    let env = support::test_env("harness-kcm").await;
    let deployments = env.api::<Deployment>();
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1"}]}
            }
        }
    }))
    .unwrap();
    let created = deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let owner_uid = created.metadata.uid.clone().unwrap();

    // Only kube-controller-manager's deployment controller creates ReplicaSets.
    let replica_sets = env.api::<ReplicaSet>();
    let rs_name = wait::until("the deployment's ReplicaSet", || async {
        let list = replica_sets.list(&ListParams::default()).await.ok()?;
        list.items.into_iter().find_map(|rs| {
            let owned = rs
                .metadata
                .owner_references
                .as_ref()?
                .iter()
                .any(|o| o.uid == owner_uid && o.controller == Some(true));
            owned.then(|| rs.metadata.name.clone().unwrap())
        })
    })
    .await;

    // An object we own by reference is collected by the garbage collector
    // once its owner is gone.
    let config_maps = env.api::<ConfigMap>();
    let owned = ConfigMap {
        metadata: ObjectMeta {
            name: Some("owned-by-web".into()),
            owner_references: Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    api_version: "apps/v1".into(),
                    kind: "Deployment".into(),
                    name: "web".into(),
                    uid: owner_uid.clone(),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                },
            ]),
            ..Default::default()
        },
        ..Default::default()
    };
    config_maps
        .create(&PostParams::default(), &owned)
        .await
        .unwrap();

    deployments
        .delete("web", &DeleteParams::background())
        .await
        .unwrap();
    wait::until("garbage collection of the owned ConfigMap", || async {
        config_maps
            .get_opt("owned-by-web")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    wait::until("garbage collection of the ReplicaSet", || async {
        replica_sets
            .get_opt(&rs_name)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
}
