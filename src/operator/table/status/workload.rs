//! Whether the table's Deployments have their pods, and why not.

use std::collections::BTreeMap;

use crate::operator::slim::{SlimDeployment, SlimPod};

/// Desired and available replicas of a Deployment as applied.
pub(super) fn availability(deployment: &SlimDeployment) -> (i32, i32) {
    let desired = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let available = deployment
        .status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0);
    (desired, available)
}

/// The outcome of applying the children.
pub enum Provisioning<'a> {
    Applied {
        deployments: Vec<&'a SlimDeployment>,
        /// Why pods of a workload that is short of replicas fail, one line
        /// each (see [`pod_failures`]); empty while they only start.
        pod_failures: Vec<String>,
    },
    Failed(String),
}

/// Fewer replicas available than desired.
pub fn short_of_replicas(deployment: &SlimDeployment) -> bool {
    let (desired, available) = availability(deployment);
    available < desired
}

/// Pods whose containers crash or cannot start, with the reason and the last
/// words of the process (its termination message), for the status.
pub fn pod_failures(pods: &[SlimPod]) -> Vec<String> {
    const STUCK: [&str; 5] = [
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "CreateContainerConfigError",
        "CreateContainerError",
    ];
    // Pods failing the same way are reported once, with their names.
    let mut failures: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for pod in pods {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let statuses = pod
            .status
            .iter()
            .flat_map(|s| s.container_statuses.iter().flatten());
        for container in statuses {
            let Some(waiting) = container.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
                continue;
            };
            let reason = waiting.reason.as_deref().unwrap_or_default();
            if !STUCK.contains(&reason) {
                continue;
            }
            let last_words = container
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .and_then(|t| t.message.as_deref())
                .map(process_error)
                .or(waiting.message.clone())
                .unwrap_or_default();
            failures
                .entry(format!("{reason}: {last_words}"))
                .or_default()
                .push(name);
        }
    }
    failures
        .into_iter()
        .map(|(failure, pods)| format!("pod {}: {failure}", pods.join(", ")))
        .collect()
}

/// The error a Kiln process exited with, from its last (JSON) log line;
/// other text as it is, bounded.
fn process_error(message: &str) -> String {
    let last_line = message.trim().lines().last().unwrap_or_default();
    let error = serde_json::from_str::<serde_json::Value>(last_line)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| last_line.to_string());
    error.chars().take(400).collect()
}
