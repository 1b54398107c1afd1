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

/// The operator's writes as the API server receives them, against
/// tower-test's mock service: server-side apply under Kiln's field manager
/// with force, status as a merge patch, and failures naming step and object.
#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use k8s_openapi::api::core::v1::ServiceAccount;
    use kube::api::ObjectMeta;
    use kube::client::Body;
    use tower_test::mock;

    fn account() -> ServiceAccount {
        ServiceAccount {
            metadata: ObjectMeta {
                name: Some("kiln-leads".into()),
                namespace: Some("sales".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Answers the next request with `status` and `body`; returns the request.
    async fn answer(
        handle: &mut mock::Handle<Request<Body>, Response<Body>>,
        status: u16,
        body: serde_json::Value,
    ) -> (http::request::Parts, serde_json::Value) {
        let (request, send) = handle.next_request().await.expect("a request");
        let (parts, sent) = request.into_parts();
        let sent = sent.collect_bytes().await.unwrap();
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
        (parts, serde_json::from_slice(&sent).unwrap_or_default())
    }

    #[tokio::test]
    async fn children_are_applied_server_side_under_kilns_field_manager() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let applied = tokio::spawn(async move { apply(&client, &account()).await });
        let (request, body) =
            answer(&mut handle, 200, serde_json::to_value(account()).unwrap()).await;
        assert_eq!(request.method, http::Method::PATCH);
        assert_eq!(
            request.uri.path(),
            "/api/v1/namespaces/sales/serviceaccounts/kiln-leads"
        );
        let query = request.uri.query().unwrap_or_default();
        assert!(
            query.contains(&format!("fieldManager={FIELD_MANAGER}")),
            "{query}"
        );
        assert!(query.contains("force=true"), "{query}");
        assert_eq!(
            request.headers[http::header::CONTENT_TYPE],
            "application/apply-patch+yaml"
        );
        assert_eq!(body["metadata"]["name"], "kiln-leads");
        assert_eq!(
            applied.await.unwrap().unwrap().metadata.name.as_deref(),
            Some("kiln-leads")
        );
    }

    #[tokio::test]
    async fn status_is_a_merge_patch_and_a_refusal_names_step_and_object() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let api = Api::<ServiceAccount>::namespaced(client, "sales");
        let patched = tokio::spawn(async move {
            patch_status(&api, "kiln-leads", &serde_json::json!({"ready": true})).await
        });
        let refusal = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "the object has been modified", "reason": "Conflict", "code": 409
        });
        let (request, body) = answer(&mut handle, 409, refusal).await;
        assert_eq!(
            request.uri.path(),
            "/api/v1/namespaces/sales/serviceaccounts/kiln-leads/status"
        );
        assert_eq!(
            request.headers[http::header::CONTENT_TYPE],
            "application/merge-patch+json"
        );
        assert_eq!(body, serde_json::json!({"status": {"ready": true}}));
        let error = patched.await.unwrap().unwrap_err();
        assert_eq!((error.kind(), error.step()), ("conflict", "status"));
        assert_eq!(
            error.message(),
            "updating the status of ServiceAccount sales/kiln-leads: the object has been modified"
        );
    }
}
