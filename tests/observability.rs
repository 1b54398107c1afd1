//! What a platform team plugs into its monitoring: the alert rules pass
//! `promtool check rules` and their unit tests, and the dashboard and the
//! rules query only series Kiln exports.

use std::collections::BTreeSet;
use std::process::Command;

use prometheus_client::registry::Registry;

const RULES: &str = "charts/kiln/alerts/kiln-rules.yaml";
const DASHBOARD: &str = "charts/kiln/dashboards/kiln.json";

fn promtool() -> String {
    let output = Command::new("bash")
        .arg("tests/tools/build-promtool.sh")
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("running build-promtool.sh");
    assert!(output.status.success(), "building promtool failed");
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(RULES, dir.path().join("kiln-rules.yaml")).unwrap();
    std::fs::copy(
        "tests/observability/alerts_test.yaml",
        dir.path().join("alerts_test.yaml"),
    )
    .unwrap();
    let promtool = promtool();
    for args in [
        &["check", "rules", "kiln-rules.yaml"][..],
        &["test", "rules", "alerts_test.yaml"][..],
    ] {
        let output = Command::new(&promtool)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Every metric family the operator and the data plane register (families
/// are listed once they hold a series, so each gets one).
fn exported() -> BTreeSet<String> {
    use kiln::metrics::DataPlaneMetrics;
    use kiln::operator::metrics::{BudgetLabels, ControllerLabels, ErrorLabels};
    let mut registry = Registry::default();
    let operator = kiln::operator::metrics::OperatorMetrics::register(&mut registry);
    let controller = ControllerLabels {
        controller: "table",
    };
    let _ = operator.reconciles.get_or_create(&controller);
    let _ = operator.reconcile_errors.get_or_create(&ErrorLabels {
        controller: "table",
        kind: "conflict",
        step: "apply",
    });
    let _ = operator.reconcile_duration.get_or_create(&controller);
    let budget = BudgetLabels {
        namespace: "ns".into(),
        budget: "b".into(),
        meter: "all",
    };
    let _ = operator.budget_used.get_or_create(&budget);
    let _ = operator.budget_reserved.get_or_create(&budget);
    let _ = operator.budget_remaining.get_or_create(&budget);
    let _ = operator.budget_denials.get_or_create(&budget);
    let _ = operator.budget_leases.get_or_create(&budget);
    let _ = operator.breaker_state.get_or_create(&budget);
    let _ = operator.budget_status_bytes.get_or_create(&budget);
    let data_plane = kiln::metrics::dataplane();
    data_plane.register(&mut registry);
    data_plane.rows("received", "ok", 1);
    data_plane.clay_answer(Some(200), std::time::Duration::ZERO);
    data_plane
        .source_rows
        .get_or_create(&kiln::metrics::SourceLabels { source: "s".into() })
        .set(1);
    data_plane.store_error("connection");
    data_plane.kafka_error("AllBrokersDown");
    data_plane
        .rows_pending
        .get_or_create(&kiln::metrics::AgeLabels { age: "1m" })
        .set(1);
    for family in [
        &data_plane.lease_requests,
        &data_plane.lease_denials,
        &data_plane.sink_deliveries,
    ] {
        DataPlaneMetrics::outcome(family, "ok");
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The metric names an expression text mentions, without the suffixes
/// Prometheus adds to counters and histograms.
fn mentioned(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("kiln_") {
        let start = i + at;
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(text.len() - start);
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let name = &text[start..end];
        // Label names (kiln_dev_table) follow `by (` or a comma, never `{`.
        if !preceded && name != "kiln_dev_table" {
            let base = ["_bucket", "_count", "_sum", "_total"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            names.insert(base.to_string());
        }
        i = end;
    }
    names
}

#[test]
fn the_dashboard_and_the_rules_query_only_exported_metrics() {
    let exported = exported();
    assert!(exported.contains("kiln_rows"), "{exported:?}");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queried.extend(mentioned(target["expr"].as_str().unwrap()));
        }
    }
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(RULES).unwrap()).unwrap();
    for rule in rules["groups"][0]["rules"].as_sequence().unwrap() {
        queried.extend(mentioned(rule["expr"].as_str().unwrap()));
    }
    assert!(queried.len() >= 10, "{queried:?}");
    let unknown: Vec<_> = queried.difference(&exported).collect();
    assert!(unknown.is_empty(), "queried but not exported: {unknown:?}");
}
