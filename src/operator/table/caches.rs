//! What a table's reconcile reads and writes, cached by the controller's
//! watches, trimmed to what it needs.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::runtime::reflector::Store;

use super::counters;
use crate::api::{CreditBudget, RefreshSchedule};
use crate::operator::cache::{Children, keep_read_metadata};
use crate::operator::slim::{Availability, Replicas, SlimPod};

/// What a table's reconcile reads and writes, cached by the controller's
/// watches: its children (their metadata; of Deployments also replicas and
/// availability), the budgets, schedules and Secrets it refers to (Secrets
/// slimmed to whether each value is blank), and its row counters' Redis
/// connections.
pub struct TableCaches {
    pub(super) deployments: Arc<Children<Deployment, Replicas, Availability>>,
    pub(super) services: Arc<Children<Service>>,
    pub(super) accounts: Arc<Children<ServiceAccount>>,
    pub(super) roles: Arc<Children<Role>>,
    pub(super) bindings: Arc<Children<RoleBinding>>,
    pub(super) claims: Arc<Children<PersistentVolumeClaim>>,
    pub(super) budgets: Store<CreditBudget>,
    pub(super) schedules: Store<RefreshSchedule>,
    pub(super) secrets: Store<Secret>,
    /// The tables' pods, reduced to their container states.
    pub(super) pods: Store<SlimPod>,
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

/// Keeps of a pod's metadata its name and table label. (Pods belong to
/// ReplicaSets; their table is found by label.)
pub(super) fn slim_pod(pod: &mut SlimPod) {
    keep_read_metadata(pod);
    pod.metadata.owner_references = None;
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
    fn a_cached_pod_keeps_its_table_label_and_container_states() {
        let mut pod: SlimPod = serde_json::from_value(json!({
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
        assert_eq!(
            serde_json::to_value(&pod.metadata.labels).unwrap(),
            json!({"kiln.dev/table": "leads", "app.kubernetes.io/managed-by": "kiln-operator"})
        );
        assert!(pod.metadata.owner_references.is_none());
        let container = &pod.status.unwrap().container_statuses.unwrap()[0];
        let waiting = container.state.as_ref().unwrap().waiting.as_ref().unwrap();
        assert_eq!(waiting.reason.as_deref(), Some("CrashLoopBackOff"));
    }
}
