//! The Helm chart renders with default and non-default values, and every
//! object it renders is accepted by the real API server (server-side dry-run apply).

#[path = "support/mod.rs"]
mod support;

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::discovery::{Scope, pinned_kind};
use serde::Deserialize;

fn helm() -> String {
    let output = std::process::Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/tools/build-helm.sh"
        ))
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("running build-helm.sh");
    assert!(output.status.success(), "building helm failed");
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

fn render(namespace: &str, values: &[&str]) -> Vec<DynamicObject> {
    let mut command = std::process::Command::new(helm());
    command
        .args([
            "template",
            "kiln",
            concat!(env!("CARGO_MANIFEST_DIR"), "/charts/kiln"),
        ])
        .args(["--namespace", namespace, "--include-crds"])
        .args([
            "--kube-version",
            kiln::devenv::controlplane::K8S_VERSION.trim(),
        ]);
    for value in values {
        command.args(["--set", value]);
    }
    let output = command.output().expect("running helm template");
    assert!(
        output.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .map(|v| serde_yaml::from_value(v).unwrap())
        .collect()
}

async fn dry_run_apply(env: &support::TestEnv, objects: &[DynamicObject]) -> Vec<String> {
    let mut applied = Vec::new();
    for object in objects {
        let types = object.types.clone().unwrap();
        if types.api_version.starts_with("monitoring.coreos.com/") {
            // The prometheus-operator CRDs are not installed here; they are
            // checked structurally below (and the rules by promtool).
            continue;
        }
        let (group, version) = types
            .api_version
            .split_once('/')
            .unwrap_or(("", &types.api_version));
        let (resource, capabilities) = pinned_kind(
            &env.client,
            &kube::core::GroupVersionKind::gvk(group, version, &types.kind),
        )
        .await
        .unwrap_or_else(|e| panic!("{} is not served: {e}", types.kind));
        let api: Api<DynamicObject> = match capabilities.scope {
            Scope::Namespaced => {
                Api::namespaced_with(env.client.clone(), &env.namespace, &resource)
            }
            Scope::Cluster => Api::all_with(env.client.clone(), &resource),
        };
        let name = object.metadata.name.clone().unwrap();
        let params = PatchParams::apply("kiln-helm-test").dry_run().force();
        api.patch(&name, &params, &Patch::Apply(object))
            .await
            .unwrap_or_else(|e| panic!("the API server rejected {} {name}: {e}", types.kind));
        applied.push(types.kind);
    }
    applied
}

#[tokio::test]
async fn chart_renders_and_the_api_server_accepts_it() {
    let env = support::test_env("helm").await;
    let defaults = render(&env.namespace, &[]);
    let kinds = dry_run_apply(&env, &defaults).await;
    for kind in [
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "PriorityLevelConfiguration",
        "FlowSchema",
    ] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "the default render has a {kind}: {kinds:?}"
        );
    }
    assert!(
        !kinds.iter().any(|k| k == "NetworkPolicy"),
        "optional objects are off by default"
    );
    let deployment = defaults
        .iter()
        .find(|o| o.types.as_ref().unwrap().kind == "Deployment")
        .unwrap();
    assert_eq!(deployment.data["spec"]["replicas"], 2);
    let container = &deployment.data["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(container["args"][1], "operator");

    let custom = render(
        &env.namespace,
        &[
            "replicas=3",
            "watchNamespace=team-a",
            "networkPolicy.enabled=true",
            "serviceMonitor.enabled=true",
            "dataPlaneMonitor.enabled=true",
            "prometheusRule.enabled=true",
            "grafanaDashboard.enabled=true",
            "dataPlaneImage=registry.example.com/kiln:1.2.3",
            "tracing.otlpEndpoint=http://otel-collector.observability:4318",
        ],
    );
    let kinds = dry_run_apply(&env, &custom).await;
    assert!(kinds.iter().any(|k| k == "NetworkPolicy"));
    let monitor = custom
        .iter()
        .find(|o| o.types.as_ref().unwrap().kind == "ServiceMonitor")
        .expect("a ServiceMonitor");
    assert_eq!(monitor.data["spec"]["endpoints"][0]["port"], "metrics");
    let of_kind = |kind: &str| {
        custom
            .iter()
            .find(|o| o.types.as_ref().unwrap().kind == kind)
            .unwrap_or_else(|| panic!("a {kind}"))
    };
    let pods = of_kind("PodMonitor");
    assert_eq!(
        pods.data["spec"]["selector"]["matchLabels"]["app.kubernetes.io/managed-by"],
        "kiln-operator"
    );
    let rules = of_kind("PrometheusRule");
    let alerts = rules.data["spec"]["groups"][0]["rules"].as_array().unwrap();
    assert!(alerts.len() >= 6, "{alerts:?}");
    let dashboard = of_kind("ConfigMap");
    let json = dashboard.data["data"]["kiln.json"].as_str().unwrap();
    let parsed: serde_json::Value = serde_json::from_str(json).expect("the dashboard is JSON");
    assert_eq!(parsed["uid"], "kiln-overview");
    let deployment = custom
        .iter()
        .find(|o| o.types.as_ref().unwrap().kind == "Deployment")
        .unwrap();
    assert_eq!(deployment.data["spec"]["replicas"], 3);
    let args: Vec<&str> = deployment.data["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--watch-namespace=team-a"), "{args:?}");
    assert!(
        args.contains(&"--image=registry.example.com/kiln:1.2.3"),
        "{args:?}"
    );
    let env = &deployment.data["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT"
                && e["value"] == "http://otel-collector.observability:4318"),
        "{env}"
    );
}
