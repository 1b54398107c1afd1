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

    #[test]
    fn the_helm_chart_ships_the_same_crds() {
        let chart = include_str!("../../charts/kiln/crds/kiln.dev.yaml");
        assert!(
            chart == crds_yaml(),
            "charts/kiln/crds/kiln.dev.yaml is stale: run `cargo run -- crds > charts/kiln/crds/kiln.dev.yaml`"
        );
    }
}
