//! The custom resources of group `kiln.dev`, version `v1alpha1`.

pub mod budget;
pub mod common;
pub mod refresh;
pub mod table;

pub use budget::{CreditBudget, CreditBudgetSpec, CreditBudgetStatus};
pub use refresh::{RefreshSchedule, RefreshScheduleSpec, RefreshScheduleStatus};
pub use table::{EnrichmentTable, EnrichmentTableSpec, EnrichmentTableStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The CRDs of every kind, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        EnrichmentTable::crd(),
        CreditBudget::crd(),
        RefreshSchedule::crd(),
    ]
}

/// The CRDs as one multi-document YAML stream: what `kiln crds` prints and
/// what `crds/kiln.dev.yaml` holds.
pub fn crds_yaml() -> String {
    crds()
        .iter()
        .map(|crd| serde_yaml::to_string(crd).expect("a CRD serializes to YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crds_match_the_types() {
        let committed = include_str!("../../crds/kiln.dev.yaml");
        assert!(
            committed == crds_yaml(),
            "crds/kiln.dev.yaml is stale: run `cargo run -- crds > crds/kiln.dev.yaml`"
        );
    }

    /// Every field `kubectl explain` can show has a description, and status
    /// totals are not described as a per-row cost.
    #[test]
    fn every_field_is_described_for_kubectl_explain() {
        fn walk(schema: &serde_json::Value, path: &str, missing: &mut Vec<String>) {
            let per_row = "0.5-25 per data point";
            if let Some(properties) = schema["properties"].as_object() {
                for (name, child) in properties {
                    let at = format!("{path}.{name}");
                    let description = child["description"].as_str().unwrap_or_default();
                    if description.trim().is_empty() {
                        missing.push(at.clone());
                    }
                    let a_row = at.contains(".rowCost.");
                    if at.contains(".status.") && !a_row && description.contains(per_row) {
                        missing.push(format!("{at} (a status total described per row)"));
                    }
                    walk(child, &at, missing);
                }
            }
            if schema["items"].is_object() {
                walk(&schema["items"], &format!("{path}[]"), missing);
            }
        }
        let mut missing = Vec::new();
        for document in crds_yaml().split("\n---\n") {
            let crd: serde_json::Value = serde_yaml::from_str(document).unwrap();
            let kind = crd["spec"]["names"]["kind"].as_str().unwrap().to_string();
            let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
            let top = schema["description"].as_str().unwrap_or_default();
            if top.is_empty() || top.contains("Auto-generated") {
                missing.push(format!("{kind} (kind description)"));
            }
            walk(schema, &kind, &mut missing);
        }
        assert!(
            missing.is_empty(),
            "fields without a description: {missing:#?}"
        );
    }

    #[test]
    fn the_helm_chart_ships_the_same_crds() {
        let chart = include_str!("../../charts/kiln/crds/kiln.dev.yaml");
        assert!(
            chart == crds_yaml(),
            "charts/kiln/crds/kiln.dev.yaml is stale: run `cargo run -- crds > charts/kiln/crds/kiln.dev.yaml`"
        );
    }
}
