//! What a table's reconcile reads and writes, cached by the controller's
//! watches, trimmed to what it needs.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::runtime::reflector::Store;

use super::counters;
use crate::api::{CreditBudget, RefreshSchedule};
use crate::operator::cache::Children;
use crate::operator::labels::keep_read_labels;

/// What a table's reconcile reads and writes, cached by the controller's
/// watches: its children, the budgets, schedules and Secrets it refers to
/// (Secrets slimmed to whether each value is blank), and its row counters'
/// Redis connections.
pub struct TableCaches {
    pub(super) deployments: Arc<Children<Deployment>>,
    pub(super) services: Arc<Children<Service>>,
    pub(super) accounts: Arc<Children<ServiceAccount>>,
    pub(super) roles: Arc<Children<Role>>,
    pub(super) bindings: Arc<Children<RoleBinding>>,
    pub(super) claims: Arc<Children<PersistentVolumeClaim>>,
    pub(super) budgets: Store<CreditBudget>,
    pub(super) schedules: Store<RefreshSchedule>,
    pub(super) secrets: Store<Secret>,
    /// The tables' pods, reduced to their container states.
    pub(super) pods: Store<Pod>,
    pub(super) counters: counters::RowCounterReader,
}

impl TableCaches {
    /// Waits until every cache holds what its first list returned: before
    /// that, a Secret or budget missing from a cache may only not be
    /// listed yet.
    pub(super) async fn ready(&self) {
        self.deployments.ready().await;
        self.services.ready().await;
        self.accounts.ready().await;
        self.roles.ready().await;
        self.bindings.ready().await;
        self.claims.ready().await;
        let _ = self.budgets.wait_until_ready().await;
        let _ = self.schedules.wait_until_ready().await;
        let _ = self.secrets.wait_until_ready().await;
        let _ = self.pods.wait_until_ready().await;
    }
}

/// Keeps of a Deployment what status reads: its replicas and how many are
/// available.
pub(super) fn slim_deployment(deployment: &mut Deployment) {
    let replicas = deployment.spec.as_ref().and_then(|s| s.replicas);
    deployment.spec = Some(DeploymentSpec {
        replicas,
        ..Default::default()
    });
    if let Some(status) = deployment.status.as_mut() {
        status.conditions = None;
    }
}

/// Keeps of a pod its name, table label and container states: status
/// reports why a table's pods crash or cannot start. (Pods belong to
/// ReplicaSets; their table is found by label.)
pub(super) fn slim_pod(pod: &mut Pod) {
    pod.metadata.annotations = None;
    pod.metadata.owner_references = None;
    keep_read_labels(&mut pod.metadata.labels);
    pod.spec = None;
    if let Some(status) = pod.status.as_mut() {
        status.conditions = None;
        status.init_container_statuses = None;
    }
}

/// Keeps of a Secret only its name, labels, version and whether each value
/// is blank: the operator never needs the values, and they may be large.
pub(super) fn slim_secret(secret: &mut Secret) {
    secret.metadata.annotations = None;
    secret.string_data = None;
    if let Some(data) = secret.data.as_mut() {
        for value in data.values_mut() {
            let blank = value.0.trim_ascii().is_empty();
            value.0 = if blank { Vec::new() } else { vec![1] };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_cached_deployment_keeps_what_status_reads_and_nothing_more() {
        let mut deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "leads-worker", "namespace": "sales", "generation": 4,
                         "ownerReferences": [{"apiVersion": "kiln.dev/v1alpha1", "kind": "EnrichmentTable",
                                              "name": "leads", "uid": "u-1", "controller": true}]},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "leads"}},
                     "template": {"spec": {"containers": [{"name": "worker", "image": "kiln:1"}]}}},
            "status": {"replicas": 3, "availableReplicas": 2,
                       "conditions": [{"type": "Available", "status": "False", "message": "long text"}]}
        }))
        .unwrap();
        slim_deployment(&mut deployment);
        assert!(super::super::status::short_of_replicas(&deployment));
        let kept = serde_json::to_value(&deployment).unwrap();
        assert_eq!(kept["spec"]["replicas"], 3);
        assert_eq!(kept["status"]["availableReplicas"], 2);
        assert!(kept["spec"]["template"]["spec"].is_null());
        assert!(kept["status"]["conditions"].is_null());
        assert_eq!(kept["metadata"]["ownerReferences"][0]["name"], "leads");
    }

    #[test]
    fn a_cached_pod_keeps_its_table_label_and_container_states() {
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "leads-worker-7d9-x", "namespace": "sales",
                         "labels": {"app.kubernetes.io/name": "kiln", "app.kubernetes.io/component": "worker",
                                    "pod-template-hash": "7d9", "kiln.dev/table": "leads",
                                    "app.kubernetes.io/managed-by": "kiln-operator"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                              "name": "leads-worker-7d9", "uid": "u-2"}]},
            "spec": {"containers": [{"name": "worker", "image": "kiln:1"}]},
            "status": {"phase": "Running",
                       "containerStatuses": [{"name": "worker", "image": "kiln:1", "imageID": "", "ready": false,
                                              "restartCount": 4, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}
        }))
        .unwrap();
        slim_pod(&mut pod);
        let kept = serde_json::to_value(&pod).unwrap();
        assert_eq!(
            kept["metadata"]["labels"],
            json!({"kiln.dev/table": "leads", "app.kubernetes.io/managed-by": "kiln-operator"})
        );
        assert!(kept["metadata"]["ownerReferences"].is_null());
        assert!(kept["spec"].is_null());
        assert_eq!(
            kept["status"]["containerStatuses"][0]["state"]["waiting"]["reason"],
            "CrashLoopBackOff"
        );
    }
}
