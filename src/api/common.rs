//! Types shared by the three kinds: secret references, durations, conditions.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// A key in a Secret in the same namespace as the referring object.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the same namespace as the referring object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret whose value is used.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A reference by name to another object in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectRef {
    /// Name of the referenced object, in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// CPU and memory for a container, as Kubernetes quantities.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// Requested resources, e.g. `{cpu: 100m, memory: 128Mi}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(
        validation = Rule::new(RESOURCE_NAMES_RULE).message("resources.requests takes cpu, memory and ephemeral-storage"),
        validation = Rule::new(QUANTITIES_RULE).message("resources.requests values must be quantities such as 100m or 128Mi"),
    )]
    #[schemars(extend("maxProperties" = 3))]
    pub requests: BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    /// Resource limits, e.g. `{memory: 256Mi}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(
        validation = Rule::new(RESOURCE_NAMES_RULE).message("resources.limits takes cpu, memory and ephemeral-storage"),
        validation = Rule::new(QUANTITIES_RULE).message("resources.limits values must be quantities such as 500m or 256Mi"),
    )]
    #[schemars(extend("maxProperties" = 3))]
    pub limits: BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
}

const RESOURCE_NAMES_RULE: &str = "self.all(k, k in ['cpu', 'memory', 'ephemeral-storage'])";
const QUANTITIES_RULE: &str = "self.all(k, isQuantity(string(self[k])))";

/// CEL rule for a positive Go-style duration string ("90s", "10m", "1h30m").
/// The regex runs first so a malformed value fails with our message rather
/// than a CEL evaluation error.
pub const POSITIVE_DURATION_RULE: &str =
    "self.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|ms|s|m|h))+$') && duration(self) > duration('0s')";

/// Condition status strings, as metav1 spells them.
pub const TRUE: &str = "True";
pub const FALSE: &str = "False";
pub const UNKNOWN: &str = "Unknown";

/// Builds a metav1 Condition. `last_transition_time` is carried over from
/// `previous` when the status did not change, so re-reconciling an unchanged
/// object writes an identical status (no churn).
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: &str,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(now);
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation,
        last_transition_time,
    }
}

/// Builds the conditions of one status update: the previous conditions, the
/// generation observed and the time are shared by every condition set.
pub struct Conditions<'a> {
    previous: &'a [Condition],
    observed_generation: Option<i64>,
    now: Time,
}

impl<'a> Conditions<'a> {
    pub fn new(previous: &'a [Condition], observed_generation: Option<i64>, now: Time) -> Self {
        Self {
            previous,
            observed_generation,
            now,
        }
    }

    /// A condition that is True when `ok`, False otherwise (see [`condition`]).
    pub fn set(&self, type_: &str, ok: bool, reason: &str, message: String) -> Condition {
        condition(
            self.previous,
            type_,
            if ok { TRUE } else { FALSE },
            reason,
            message,
            self.observed_generation,
            self.now.clone(),
        )
    }
}

/// Finds a condition by type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// True when the condition of that type exists and is True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == TRUE)
}
