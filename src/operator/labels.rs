//! Labels and names shared by every child object the operator creates.

use std::collections::BTreeMap;

/// The field manager for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "kiln-operator";
/// The label saying which controller manages a child.
pub const MANAGED_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_LABEL`] on children.
pub const MANAGED_BY: &str = "kiln-operator";
/// Label naming the EnrichmentTable a child belongs to.
pub const TABLE_LABEL: &str = "kiln.dev/table";
/// Label naming the RefreshSchedule a child belongs to.
pub const SCHEDULE_LABEL: &str = "kiln.dev/refresh-schedule";

/// Drops the labels of a cached child that the operator never reads: it
/// selects children only by the manager, table and schedule labels, and a
/// thousand tables' children carry tens of thousands of the others.
pub fn keep_read_labels(labels: &mut Option<BTreeMap<String, String>>) {
    if let Some(labels) = labels.as_mut() {
        labels
            .retain(|key, _| [MANAGED_LABEL, TABLE_LABEL, SCHEDULE_LABEL].contains(&key.as_str()));
    }
}

/// Port every Kiln process serves /healthz, /readyz and /metrics on.
pub const METRICS_PORT: i32 = 9090;

/// Standard `app.kubernetes.io/*` labels plus the owner label.
pub fn standard(
    instance: &str,
    component: &str,
    owner_label: (&str, &str),
) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "kiln".to_string()),
        (
            "app.kubernetes.io/instance".to_string(),
            instance.to_string(),
        ),
        (
            "app.kubernetes.io/component".to_string(),
            component.to_string(),
        ),
        ("app.kubernetes.io/part-of".to_string(), "kiln".to_string()),
        (MANAGED_LABEL.to_string(), MANAGED_BY.to_string()),
        (owner_label.0.to_string(), owner_label.1.to_string()),
    ])
}

/// The subset of [`standard`] used as a Deployment selector (immutable once created).
pub fn selector(instance: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/instance".to_string(),
            instance.to_string(),
        ),
        (
            "app.kubernetes.io/component".to_string(),
            component.to_string(),
        ),
    ])
}
