//! Kinds as the operator caches them: the metadata, and of spec and status
//! only the fields it reads. A k8s-openapi Deployment, Pod or CronJob is
//! over 2 KB before any field holds data (the pod spec is inline), and at a
//! thousand tables the caches hold thousands of each; a `Slim` one is the
//! size of its metadata. Unknown fields are skipped as the watch decodes.

use std::fmt;
use std::marker::PhantomData;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::{CronJob, CronJobStatus};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};

/// A `K` reduced to its metadata, `Spec` and `Status` (each a struct of the
/// fields read, or [`IgnoredAny`] for none).
#[derive(Deserialize)]
#[serde(bound(deserialize = "Spec: Deserialize<'de>, Status: Deserialize<'de>"))]
pub struct Slim<K, Spec = IgnoredAny, Status = IgnoredAny> {
    pub metadata: ObjectMeta,
    pub spec: Option<Spec>,
    pub status: Option<Status>,
    #[serde(skip)]
    kind: PhantomData<fn() -> K>,
}

impl<K, Spec: DeserializeOwned, Status: DeserializeOwned> Slim<K, Spec, Status> {
    /// What the cache would hold of `object` (an object the operator just
    /// applied, say).
    pub fn of(object: &K) -> Self
    where
        K: Serialize,
    {
        serde_json::to_value(object)
            .and_then(serde_json::from_value)
            .expect("a Kubernetes object decodes as its slim form")
    }
}

/// What status reads of a Deployment's spec.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Replicas {
    pub replicas: Option<i32>,
}

/// What status reads of a Deployment's status.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Availability {
    pub available_replicas: Option<i32>,
}

/// What status reads of a pod's status: why its containers are not running.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStates {
    pub container_statuses: Option<Vec<ContainerStatus>>,
}

pub type SlimDeployment = Slim<Deployment, Replicas, Availability>;
pub type SlimPod = Slim<Pod, IgnoredAny, ContainerStates>;
pub type SlimCronJob = Slim<CronJob, IgnoredAny, CronJobStatus>;

impl<K: k8s_openapi::Resource, Spec, Status> k8s_openapi::Resource for Slim<K, Spec, Status> {
    const API_VERSION: &'static str = K::API_VERSION;
    const GROUP: &'static str = K::GROUP;
    const KIND: &'static str = K::KIND;
    const VERSION: &'static str = K::VERSION;
    const URL_PATH_SEGMENT: &'static str = K::URL_PATH_SEGMENT;
    type Scope = K::Scope;
}

impl<K: k8s_openapi::Resource, Spec, Status> k8s_openapi::Metadata for Slim<K, Spec, Status> {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

// By hand: derived, they would ask the same of `K`, which is never held.
impl<K, Spec: Clone, Status: Clone> Clone for Slim<K, Spec, Status> {
    fn clone(&self) -> Self {
        Self {
            metadata: self.metadata.clone(),
            spec: self.spec.clone(),
            status: self.status.clone(),
            kind: PhantomData,
        }
    }
}

impl<K: k8s_openapi::Resource, Spec: fmt::Debug, Status: fmt::Debug> fmt::Debug
    for Slim<K, Spec, Status>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(K::KIND)
            .field("metadata", &self.metadata)
            .field("spec", &self.spec)
            .field("status", &self.status)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use kube::Resource as _;
    use serde_json::json;

    #[test]
    fn a_slim_kind_is_addressed_as_its_full_kind() {
        assert_eq!(SlimDeployment::kind(&()), "Deployment");
        assert_eq!(SlimDeployment::api_version(&()), "apps/v1");
        assert_eq!(SlimDeployment::plural(&()), "deployments");
        assert_eq!(Slim::<Service>::plural(&()), "services");
        assert_eq!(SlimCronJob::group(&()), "batch");
    }

    #[test]
    fn a_slim_object_is_the_size_of_its_metadata() {
        let slim = std::mem::size_of::<SlimDeployment>();
        assert!(
            slim < std::mem::size_of::<ObjectMeta>() + 64,
            "{slim} bytes"
        );
        assert!(std::mem::size_of::<Deployment>() > 4 * slim);
    }

    #[test]
    fn a_slim_deployment_keeps_replicas_and_availability() {
        let slim: SlimDeployment = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "leads-worker", "namespace": "sales", "generation": 4,
                         "ownerReferences": [{"apiVersion": "kiln.dev/v1alpha1", "kind": "EnrichmentTable",
                                              "name": "leads", "uid": "u-1", "controller": true}]},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "leads"}},
                     "template": {"spec": {"containers": [{"name": "worker", "image": "kiln:1"}]}}},
            "status": {"replicas": 3, "availableReplicas": 2,
                       "conditions": [{"type": "Available", "status": "False", "message": "long text"}]}
        }))
        .unwrap();
        assert_eq!(slim.spec.unwrap().replicas, Some(3));
        assert_eq!(slim.status.unwrap().available_replicas, Some(2));
        assert_eq!(slim.metadata.generation, Some(4));
        assert_eq!(slim.metadata.owner_references.unwrap()[0].name, "leads");
    }

    #[test]
    fn an_applied_object_converts_to_what_the_cache_holds() {
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "leads-worker", "namespace": "sales"},
            "spec": {"replicas": 2, "selector": {}, "template": {}},
        }))
        .unwrap();
        let slim = SlimDeployment::of(&deployment);
        assert_eq!(slim.metadata.name.as_deref(), Some("leads-worker"));
        assert_eq!(slim.spec.unwrap().replicas, Some(2));
        assert!(slim.status.is_none());
    }
}
