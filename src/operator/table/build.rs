//! Pure builders: the children an EnrichmentTable should have. No API calls.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    ContainerPort, EnvVar, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, PodTemplateSpec, Service, ServiceAccount, ServicePort,
    ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::api::EnrichmentTable;
use crate::api::table::Tier;
use crate::contract::{RECEIVER_PORT, receiver_name};
use crate::operator::labels::{self, TABLE_LABEL};
use crate::operator::pod::{KilnContainer, kiln_container, restricted_pod_spec};

/// Operator-wide settings the builders need.
#[derive(Clone, Debug)]
pub struct BuildConfig {
    /// Image for data-plane pods unless a table overrides it.
    pub default_image: String,
    /// URL of the operator's reservation API, handed to data-plane pods.
    pub operator_url: String,
    /// PEM CA the lease API's serving certificate chains to (https only),
    /// handed to data-plane pods to trust.
    pub operator_ca: Option<String>,
    /// The OTLP endpoint variables the operator runs with (name, value),
    /// handed to data-plane pods so their spans go to the same collector.
    pub otlp_endpoints: Vec<(String, String)>,
}

impl BuildConfig {
    /// How data-plane containers reach the lease API, and where they export
    /// spans.
    pub fn operator_env(&self) -> Vec<EnvVar> {
        let mut env = vec![EnvVar {
            name: "KILN_OPERATOR_URL".into(),
            value: Some(self.operator_url.clone()),
            ..Default::default()
        }];
        if let Some(ca) = &self.operator_ca {
            env.push(EnvVar {
                name: "KILN_OPERATOR_CA".into(),
                value: Some(ca.clone()),
                ..Default::default()
            });
        }
        env.extend(self.otlp_endpoints.iter().map(|(name, value)| EnvVar {
            name: name.clone(),
            value: Some(value.clone()),
            ..Default::default()
        }));
        env
    }
}

/// Where the Direct tier's embedded store lives inside the receiver.
pub const STORE_MOUNT_PATH: &str = "/var/lib/kiln";

/// Every child of one EnrichmentTable.
#[derive(Clone, Debug, PartialEq)]
pub struct TableChildren {
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
    /// None for Direct: the receiver enriches in-line.
    pub worker: Option<Deployment>,
    pub receiver: Deployment,
    pub service: Service,
    /// Only for Direct: the embedded store's volume.
    pub store: Option<PersistentVolumeClaim>,
}

pub fn service_account_name(table: &str) -> String {
    format!("kiln-{table}")
}
pub fn worker_name(table: &str) -> String {
    format!("{table}-worker")
}
pub fn store_name(table: &str) -> String {
    format!("{table}-store")
}

/// Builds the desired children. `run_workloads` is false while the table's
/// references (budget, Secrets) are unresolved: the Deployments then exist
/// with zero replicas, so nothing spends credits it cannot account for.
pub fn desired_children(
    table: &EnrichmentTable,
    schedules: &[String],
    config: &BuildConfig,
    run_workloads: bool,
) -> TableChildren {
    let name = table.name_any();
    let namespace = table.namespace().unwrap_or_default();
    let owner = table
        .controller_owner_ref(&())
        .expect("an EnrichmentTable from the API server has a name and uid");
    let meta = |child_name: String, component: &str| ObjectMeta {
        name: Some(child_name),
        namespace: Some(namespace.clone()),
        labels: Some(labels::standard(&name, component, (TABLE_LABEL, &name))),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    };
    let sa_name = service_account_name(&name);

    let service_account = ServiceAccount {
        metadata: meta(sa_name.clone(), "rbac"),
        automount_service_account_token: Some(true),
        ..Default::default()
    };
    let role = Role {
        metadata: meta(sa_name.clone(), "rbac"),
        rules: Some(pod_rules(table, schedules)),
    };
    let role_binding = RoleBinding {
        metadata: meta(sa_name.clone(), "rbac"),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: sa_name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: sa_name.clone(),
            namespace: Some(namespace.clone()),
            ..Default::default()
        }]),
    };

    let direct = table.spec.tier == Tier::Direct;
    let image = table.spec.image.as_deref().unwrap_or(&config.default_image);
    let table_arg = format!("{namespace}/{name}");
    let env = config.operator_env();

    let worker = (!direct).then(|| {
        let container = kiln_container(KilnContainer {
            name: "worker",
            image,
            args: vec!["worker".into(), "--table".into(), table_arg.clone()],
            resources: &table.spec.workers.resources,
            extra_env: env.clone(),
            extra_ports: vec![],
            extra_mounts: vec![],
            probes: true,
        });
        deployment(
            meta(worker_name(&name), "worker"),
            &name,
            "worker",
            if run_workloads {
                table.spec.workers.replicas
            } else {
                0
            },
            restricted_pod_spec(&sa_name, vec![container], vec![], None),
            None,
        )
    });

    let (store_mounts, store_volumes) = if direct {
        (
            vec![VolumeMount {
                name: "store".into(),
                mount_path: STORE_MOUNT_PATH.into(),
                ..Default::default()
            }],
            vec![Volume {
                name: "store".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: store_name(&name),
                    ..Default::default()
                }),
                ..Default::default()
            }],
        )
    } else {
        (vec![], vec![])
    };
    let receiver_container = kiln_container(KilnContainer {
        name: "receiver",
        image,
        args: vec!["receiver".into(), "--table".into(), table_arg],
        resources: &table.spec.receiver.resources,
        extra_env: env,
        extra_ports: vec![ContainerPort {
            name: Some("http".into()),
            container_port: RECEIVER_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }],
        extra_mounts: store_mounts,
        probes: true,
    });
    // The embedded store is single-writer: one replica, never two at once.
    let (receiver_replicas, strategy) = if direct {
        (
            1,
            Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..Default::default()
            }),
        )
    } else {
        // Explicit, so that applying Recreate later also removes rollingUpdate.
        (
            table.spec.receiver.replicas,
            Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
        )
    };
    let receiver = deployment(
        meta(receiver_name(&name), "receiver"),
        &name,
        "receiver",
        if run_workloads { receiver_replicas } else { 0 },
        restricted_pod_spec(&sa_name, vec![receiver_container], store_volumes, None),
        strategy,
    );

    let service = Service {
        metadata: meta(receiver_name(&name), "receiver"),
        spec: Some(ServiceSpec {
            selector: Some(labels::selector(&name, "receiver")),
            ports: Some(vec![
                ServicePort {
                    name: Some("http".into()),
                    port: RECEIVER_PORT,
                    target_port: Some(IntOrString::String("http".into())),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
                ServicePort {
                    name: Some("metrics".into()),
                    port: labels::METRICS_PORT,
                    target_port: Some(IntOrString::String("metrics".into())),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    };

    let store = direct.then(|| PersistentVolumeClaim {
        metadata: meta(store_name(&name), "store"),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    table.spec.receiver.storage_size.clone(),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });

    TableChildren {
        service_account,
        role,
        role_binding,
        worker,
        receiver,
        service,
        store,
    }
}

/// What the table's pods may do: read their own table and the schedules
/// that refresh it (`schedules`, by name), read exactly the Secrets the table
/// names. Nothing else.
fn pod_rules(table: &EnrichmentTable, schedules: &[String]) -> Vec<PolicyRule> {
    let mut rules = vec![PolicyRule {
        api_groups: Some(vec!["kiln.dev".into()]),
        resources: Some(vec!["enrichmenttables".into()]),
        resource_names: Some(vec![table.name_any()]),
        verbs: vec!["get".into(), "list".into(), "watch".into()],
        ..Default::default()
    }];
    // An empty resourceNames would mean every schedule: no rule at all then.
    if !schedules.is_empty() {
        rules.push(PolicyRule {
            api_groups: Some(vec!["kiln.dev".into()]),
            resources: Some(vec!["refreshschedules".into()]),
            resource_names: Some(schedules.to_vec()),
            verbs: vec!["get".into()],
            ..Default::default()
        });
        // `kiln refresh` reports its run in status.lastRun.
        rules.push(PolicyRule {
            api_groups: Some(vec!["kiln.dev".into()]),
            resources: Some(vec!["refreshschedules/status".into()]),
            resource_names: Some(schedules.to_vec()),
            verbs: vec!["patch".into()],
            ..Default::default()
        });
    }
    let secrets = table.spec.secret_names();
    if !secrets.is_empty() {
        rules.push(PolicyRule {
            api_groups: Some(vec!["".into()]),
            resources: Some(vec!["secrets".into()]),
            resource_names: Some(secrets),
            verbs: vec!["get".into()],
            ..Default::default()
        });
    }
    rules
}

fn deployment(
    metadata: ObjectMeta,
    instance: &str,
    component: &str,
    replicas: i32,
    pod_spec: k8s_openapi::api::core::v1::PodSpec,
    strategy: Option<DeploymentStrategy>,
) -> Deployment {
    let template_labels = metadata.labels.clone();
    Deployment {
        metadata,
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(labels::selector(instance, component)),
                ..Default::default()
            },
            strategy,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: template_labels,
                    ..Default::default()
                }),
                spec: Some(pod_spec),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// KEDA's ScaledObject kind.
pub fn scaled_object_resource() -> kube::discovery::ApiResource {
    kube::discovery::ApiResource {
        group: "keda.sh".into(),
        version: "v1alpha1".into(),
        api_version: "keda.sh/v1alpha1".into(),
        kind: "ScaledObject".into(),
        plural: "scaledobjects".into(),
    }
}

/// The KEDA ScaledObject that scales an Event table's workers on its
/// consumer group's lag, when `spec.workers.autoscaling` asks for it.
pub fn scaled_object(table: &EnrichmentTable) -> Option<kube::api::DynamicObject> {
    let autoscaling = table.spec.workers.autoscaling.as_ref()?;
    let source = table.spec.source.kafka.as_ref()?;
    let name = table.name_any();
    let group = source
        .consumer_group
        .clone()
        .unwrap_or_else(|| format!("kiln-{name}"));
    let mut object = kube::api::DynamicObject::new(&worker_name(&name), &scaled_object_resource())
        .within(&table.namespace().unwrap_or_default());
    object.metadata.labels = Some(labels::standard(&name, "worker", (TABLE_LABEL, &name)));
    object.metadata.owner_references = table.controller_owner_ref(&()).map(|o| vec![o]);
    object.data = serde_json::json!({
        "spec": {
            "scaleTargetRef": {"name": worker_name(&name)},
            "minReplicaCount": autoscaling.min_replicas,
            "maxReplicaCount": autoscaling.max_replicas,
            "triggers": [{
                "type": "kafka",
                "metadata": {
                    "bootstrapServers": source.connection.brokers.join(","),
                    "consumerGroup": group,
                    "topic": source.topic,
                    "lagThreshold": autoscaling.lag_threshold.to_string(),
                    "tls": if source.connection.tls { "enable" } else { "disable" },
                }
            }]
        }
    });
    Some(object)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A Queue table as the API server would return it (name, namespace, uid, generation).
    pub(crate) fn queue_table() -> EnrichmentTable {
        serde_json::from_value(json!({
            "apiVersion": "kiln.dev/v1alpha1",
            "kind": "EnrichmentTable",
            "metadata": {"name": "leads", "namespace": "sales", "uid": "u-1", "generation": 3},
            "spec": {
                "tier": "Queue",
                "key": "email",
                "budgetRef": {"name": "b"},
                "clay": {
                    "webhookSources": [
                        {"name": "a", "urlSecretRef": {"name": "clay", "key": "url-a"}, "authTokenSecretRef": {"name": "clay", "key": "token"}},
                        {"name": "b", "urlSecretRef": {"name": "clay-2", "key": "url"}}
                    ],
                    "creditsPerRow": {"dataCredits": 2.0},
                    "callbackTokenSecretRef": {"name": "callback", "key": "token"}
                },
                "source": {"redisStream": {"stream": "in"}},
                "sink": {"http": {"urlTemplate": "https://crm/{email}", "headersSecretName": "crm-headers"}},
                "deadLetter": {"redisStream": {"stream": "dead"}},
                "redis": {"urlSecretRef": {"name": "redis", "key": "url"}},
                "workers": {"replicas": 4}
            }
        }))
        .unwrap()
    }

    pub(crate) fn config() -> BuildConfig {
        BuildConfig {
            default_image: "kiln:1".into(),
            operator_url: "http://op:8443".into(),
            operator_ca: None,
            otlp_endpoints: vec![],
        }
    }

    #[test]
    fn queue_table_gets_worker_receiver_service_and_rbac() {
        let children = desired_children(&queue_table(), &[], &config(), true);
        let worker = children.worker.expect("Queue tables have workers");
        assert_eq!(worker.metadata.name.as_deref(), Some("leads-worker"));
        assert_eq!(worker.spec.as_ref().unwrap().replicas, Some(4));
        assert!(children.store.is_none());
        let owner = &children.service.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.uid.as_str(), owner.controller), ("u-1", Some(true)));
        let secret_rule = children
            .role
            .rules
            .as_ref()
            .unwrap()
            .iter()
            .find(|r| r.resources == Some(vec!["secrets".into()]))
            .unwrap();
        assert_eq!(
            secret_rule.resource_names.clone().unwrap(),
            vec!["callback", "clay", "clay-2", "crm-headers", "redis"]
        );
        assert_eq!(
            children.role_binding.subjects.unwrap()[0].name,
            "kiln-leads"
        );
    }

    #[test]
    fn every_rule_of_the_table_role_names_its_objects() {
        for schedules in [vec![], vec!["leads-nightly".to_string()]] {
            let children = desired_children(&queue_table(), &schedules, &config(), true);
            let rules = children.role.rules.unwrap();
            for rule in &rules {
                let names = rule.resource_names.clone().unwrap_or_default();
                assert!(!names.is_empty(), "unscoped rule: {rule:?}");
                let writes = rule
                    .verbs
                    .iter()
                    .any(|v| !["get", "list", "watch"].contains(&v.as_str()));
                if writes {
                    assert_eq!(rule.resources, Some(vec!["refreshschedules/status".into()]));
                    assert_eq!(names, schedules);
                }
            }
            let mentions_schedules = rules
                .iter()
                .any(|r| r.resources.as_ref().unwrap()[0].starts_with("refreshschedules"));
            assert_eq!(mentions_schedules, !schedules.is_empty());
        }
    }

    #[test]
    fn pods_meet_the_restricted_profile() {
        let children = desired_children(&queue_table(), &[], &config(), true);
        for deployment in [children.worker.unwrap(), children.receiver] {
            let pod = deployment.spec.unwrap().template.spec.unwrap();
            let pod_security = pod.security_context.unwrap();
            assert_eq!(pod_security.run_as_non_root, Some(true));
            assert_eq!(
                pod_security.seccomp_profile.unwrap().type_,
                "RuntimeDefault"
            );
            for container in pod.containers {
                let security = container.security_context.unwrap();
                assert_eq!(security.allow_privilege_escalation, Some(false));
                assert_eq!(security.read_only_root_filesystem, Some(true));
                assert_eq!(
                    security.capabilities.unwrap().drop,
                    Some(vec!["ALL".into()])
                );
                let env = container.env.unwrap();
                assert!(env.iter().any(|e| e.name == "KILN_OPERATOR_URL"
                    && e.value.as_deref() == Some("http://op:8443")));
            }
        }
    }

    #[test]
    fn pods_export_spans_where_the_operator_does() {
        let exporting = BuildConfig {
            otlp_endpoints: vec![(
                "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                "http://collector:4318".into(),
            )],
            ..config()
        };
        let children = desired_children(&queue_table(), &[], &exporting, true);
        for deployment in [children.worker.unwrap(), children.receiver] {
            let pod = deployment.spec.unwrap().template.spec.unwrap();
            let env = pod.containers[0].env.clone().unwrap();
            assert!(env.iter().any(|e| e.name == "OTEL_EXPORTER_OTLP_ENDPOINT"
                && e.value.as_deref() == Some("http://collector:4318")));
        }
        let quiet = desired_children(&queue_table(), &[], &config(), true);
        let env = quiet
            .receiver
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .containers[0]
            .env
            .clone()
            .unwrap();
        assert!(!env.iter().any(|e| e.name.starts_with("OTEL_")));
    }

    #[test]
    fn unresolved_references_scale_workloads_to_zero() {
        let children = desired_children(&queue_table(), &[], &config(), false);
        assert_eq!(children.worker.unwrap().spec.unwrap().replicas, Some(0));
        assert_eq!(children.receiver.spec.unwrap().replicas, Some(0));
    }

    #[test]
    fn direct_table_has_one_recreate_receiver_with_a_store_and_no_worker() {
        let mut table = queue_table();
        table.spec.tier = Tier::Direct;
        table.spec.receiver.replicas = 3;
        table.spec.image = Some("kiln:override".into());
        let children = desired_children(&table, &[], &config(), true);
        assert!(children.worker.is_none());
        let store = children.store.expect("Direct tables get a store");
        assert_eq!(store.metadata.name.as_deref(), Some("leads-store"));
        let spec = children.receiver.spec.unwrap();
        assert_eq!(
            spec.replicas,
            Some(1),
            "the embedded store allows one writer"
        );
        assert_eq!(spec.strategy.unwrap().type_.as_deref(), Some("Recreate"));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.containers[0].image.as_deref(), Some("kiln:override"));
        let mounts: Vec<&str> = pod.containers[0]
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert!(mounts.contains(&STORE_MOUNT_PATH), "{mounts:?}");
        assert!(
            mounts.contains(&crate::ledger::TOKEN_DIR),
            "the lease-API token is mounted: {mounts:?}"
        );
    }

    #[test]
    fn event_tables_with_autoscaling_get_a_lag_scaled_object() {
        let mut table = queue_table();
        assert!(
            scaled_object(&table).is_none(),
            "no Kafka source, no ScaledObject"
        );
        table.spec.tier = Tier::Event;
        table.spec.source = serde_json::from_value(
            json!({"kafka": {"brokers": ["k-0:9092", "k-1:9092"], "topic": "contacts.raw"}}),
        )
        .unwrap();
        assert!(scaled_object(&table).is_none(), "autoscaling not asked for");
        table.spec.workers.autoscaling = serde_json::from_value(
            json!({"minReplicas": 1, "maxReplicas": 8, "lagThreshold": 200}),
        )
        .unwrap();
        let object = scaled_object(&table).unwrap();
        assert_eq!(object.metadata.name.as_deref(), Some("leads-worker"));
        assert_eq!(
            object.metadata.owner_references.as_ref().unwrap()[0].uid,
            "u-1"
        );
        let spec = &object.data["spec"];
        assert_eq!(spec["scaleTargetRef"]["name"], "leads-worker");
        assert_eq!(
            (
                spec["minReplicaCount"].clone(),
                spec["maxReplicaCount"].clone()
            ),
            (json!(1), json!(8))
        );
        let trigger = &spec["triggers"][0];
        assert_eq!(trigger["type"], "kafka");
        assert_eq!(trigger["metadata"]["bootstrapServers"], "k-0:9092,k-1:9092");
        assert_eq!(trigger["metadata"]["consumerGroup"], "kiln-leads");
        assert_eq!(trigger["metadata"]["lagThreshold"], "200");
    }
}
