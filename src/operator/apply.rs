//! The thin layer that writes objects: server-side apply under one field
//! manager, and status patches.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::{AtStep, Error, Result, Step, describe, describe_object};
use super::labels::FIELD_MANAGER;

/// Server-side applies `object` (forcing ownership of the fields we set).
pub async fn apply<K>(client: &Client, object: &K) -> Result<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let namespace = object
        .namespace()
        .ok_or_else(|| Error::NotNamespaced(object.name_any()))?;
    let api = Api::<K>::namespaced(client.clone(), &namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&object.name_any(), &params, &Patch::Apply(object))
        .await
        .at(Step::Apply, || describe_object(object))
}

/// Replaces an object's status with a merge patch. Callers only call this
/// when the status changed, so unchanged objects cause no writes.
pub async fn patch_status<K, S>(api: &Api<K>, name: &str, status: &S) -> Result<K>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug,
    S: Serialize,
{
    let patch = serde_json::json!({ "status": status });
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..Default::default()
    };
    api.patch_status(name, &params, &Patch::Merge(&patch))
        .await
        .at(Step::Status, || describe::<K>(api.namespace(), name))
}
