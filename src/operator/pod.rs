//! Pod templates for Kiln's data-plane processes. Every template meets the
//! Kubernetes "restricted" Pod Security profile.

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::labels::METRICS_PORT;
use crate::api::common::Resources;
use crate::contract::KILN_UID;

/// What distinguishes one Kiln container from another.
pub struct KilnContainer<'a> {
    pub name: &'a str,
    pub image: &'a str,
    pub args: Vec<String>,
    pub resources: &'a Resources,
    pub extra_env: Vec<EnvVar>,
    pub extra_ports: Vec<ContainerPort>,
    pub extra_mounts: Vec<VolumeMount>,
    /// Long-running processes get probes; run-to-completion jobs do not.
    pub probes: bool,
}

/// The projected volume holding the pod's lease-API token.
const LEDGER_TOKEN_VOLUME: &str = "ledger-token";
/// Its lifetime; the kubelet rotates it well before.
const LEDGER_TOKEN_SECONDS: i64 = 3600;

/// A container running `kiln <args>` with the restricted security context,
/// JSON logs, the pod name in the environment, a writable /tmp and the
/// lease-API token (audience [`crate::ledger::TOKEN_AUDIENCE`]).
pub fn kiln_container(spec: KilnContainer<'_>) -> Container {
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("metrics".to_string()),
            ..Default::default()
        }),
        period_seconds: Some(10),
        failure_threshold: Some(3),
        ..Default::default()
    };
    let mut env = vec![
        EnvVar {
            name: "KILN_LOG_FORMAT".into(),
            value: Some("json".into()),
            ..Default::default()
        },
        EnvVar {
            name: "POD_NAME".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
        EnvVar {
            name: "KILN_LEDGER_TOKEN_FILE".into(),
            value: Some(format!("{}/token", crate::ledger::TOKEN_DIR)),
            ..Default::default()
        },
    ];
    env.extend(spec.extra_env);
    let mut ports = vec![ContainerPort {
        name: Some("metrics".into()),
        container_port: METRICS_PORT,
        protocol: Some("TCP".into()),
        ..Default::default()
    }];
    ports.extend(spec.extra_ports);
    let mut mounts = vec![
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..Default::default()
        },
        VolumeMount {
            name: LEDGER_TOKEN_VOLUME.into(),
            mount_path: crate::ledger::TOKEN_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
    ];
    mounts.extend(spec.extra_mounts);
    Container {
        name: spec.name.to_string(),
        image: Some(spec.image.to_string()),
        args: Some(spec.args),
        env: Some(env),
        ports: Some(ports),
        volume_mounts: Some(mounts),
        resources: Some(ResourceRequirements {
            requests: (!spec.resources.requests.is_empty())
                .then(|| spec.resources.requests.clone()),
            limits: (!spec.resources.limits.is_empty()).then(|| spec.resources.limits.clone()),
            ..Default::default()
        }),
        liveness_probe: spec.probes.then(|| probe("/healthz")),
        readiness_probe: spec.probes.then(|| probe("/readyz")),
        // The last log line (the error a process exits with) becomes the
        // termination message the operator reports in the table's status.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A pod spec with the restricted pod security context and the volumes
/// every [`kiln_container`] mounts.
pub fn restricted_pod_spec(
    service_account: &str,
    containers: Vec<Container>,
    extra_volumes: Vec<Volume>,
    restart_policy: Option<&str>,
) -> PodSpec {
    let mut volumes = vec![
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
        Volume {
            name: LEDGER_TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(crate::ledger::TOKEN_AUDIENCE.into()),
                        expiration_seconds: Some(LEDGER_TOKEN_SECONDS),
                        path: "token".into(),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    volumes.extend(extra_volumes);
    PodSpec {
        service_account_name: Some(service_account.to_string()),
        automount_service_account_token: Some(true),
        containers,
        volumes: Some(volumes),
        restart_policy: restart_policy.map(str::to_string),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(KILN_UID),
            run_as_group: Some(KILN_UID),
            fs_group: Some(KILN_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        termination_grace_period_seconds: Some(60),
        ..Default::default()
    }
}
