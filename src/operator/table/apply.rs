//! Apply: the desired children to the API server (only those that changed),
//! and the removal of those no longer desired.

use std::sync::Arc;

use kube::api::Api;
use kube::{Client, ResourceExt};

use super::TableCaches;
use super::build::{self, TableChildren};
use crate::api::EnrichmentTable;
use crate::operator::error::{AtStep, Result, Step};
use crate::operator::labels::{MANAGED_BY, MANAGED_LABEL, TABLE_LABEL};
use crate::operator::slim::SlimDeployment;

/// Applies or removes the table's KEDA ScaledObject (only when KEDA is installed).
pub(super) async fn apply_scaled_object(
    client: &Client,
    table: &EnrichmentTable,
    namespace: &str,
    wanted: Option<&kube::api::DynamicObject>,
) -> Result<()> {
    let resource = build::scaled_object_resource();
    let api =
        Api::<kube::api::DynamicObject>::namespaced_with(client.clone(), namespace, &resource);
    let name = build::worker_name(&table.name_any());
    let scaled_object = || format!("ScaledObject {namespace}/{name}");
    match wanted {
        Some(object) => {
            let params =
                kube::api::PatchParams::apply(crate::operator::labels::FIELD_MANAGER).force();
            api.patch(&name, &params, &kube::api::Patch::Apply(object))
                .await
                .at(Step::Apply, scaled_object)?;
        }
        None => {
            if api
                .get_opt(&name)
                .await
                .at(Step::Read, scaled_object)?
                .is_some()
            {
                api.delete(&name, &Default::default())
                    .await
                    .at(Step::Delete, scaled_object)?;
            }
        }
    }
    Ok(())
}

/// Applies every desired child that changed and deletes the ones no longer
/// desired. Returns the Deployments (with their status) for availability.
pub(super) async fn apply_children(
    client: &Client,
    caches: &TableCaches,
    namespace: &str,
    table_name: &str,
    children: &TableChildren,
) -> Result<Vec<Arc<SlimDeployment>>> {
    caches
        .accounts
        .apply(client, &children.service_account)
        .await?;
    caches.roles.apply(client, &children.role).await?;
    caches
        .bindings
        .apply(client, &children.role_binding)
        .await?;
    if let Some(store) = &children.store {
        caches.claims.apply(client, store).await?;
    }
    let mut deployments = vec![caches.deployments.apply(client, &children.receiver).await?];
    if let Some(worker) = &children.worker {
        deployments.push(caches.deployments.apply(client, worker).await?);
    }
    caches.services.apply(client, &children.service).await?;

    let labels = [(MANAGED_LABEL, MANAGED_BY), (TABLE_LABEL, table_name)];
    let keep: Vec<String> = deployments.iter().map(|d| d.name_any()).collect();
    caches
        .deployments
        .delete_unwanted(client, namespace, &labels, &keep)
        .await?;
    let keep: Vec<String> = children.store.iter().map(|s| s.name_any()).collect();
    caches
        .claims
        .delete_unwanted(client, namespace, &labels, &keep)
        .await?;
    Ok(deployments)
}
