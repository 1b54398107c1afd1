//! Pure builders for a RefreshSchedule: its CronJob, and schedule checks.

use k8s_openapi::api::batch::v1::{
    CronJob, CronJobSpec, Job, JobSpec, JobTemplateSpec, PodFailurePolicy,
    PodFailurePolicyOnExitCodesRequirement, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::api::RefreshSchedule;
use crate::contract::EXIT_SKIPPED_FOR_BUDGET;
use crate::operator::labels::{self, SCHEDULE_LABEL};
use crate::operator::pod::{KilnContainer, kiln_container, restricted_pod_spec};
use crate::operator::table::build::{BuildConfig, service_account_name};

pub fn cronjob_name(schedule: &str) -> String {
    format!("{schedule}-refresh")
}

/// Parses the schedule and time zone and returns the next run after `now`,
/// or a message a human can act on.
pub fn next_run(
    schedule: &RefreshSchedule,
    now: jiff::Timestamp,
) -> Result<jiff::Timestamp, String> {
    let cron: croner::Cron = schedule.spec.schedule.parse().map_err(|e| {
        format!(
            "schedule {:?} is not a valid cron expression: {e}",
            schedule.spec.schedule
        )
    })?;
    let tz_name = schedule.spec.time_zone.as_deref().unwrap_or("UTC");
    let tz = jiff::tz::TimeZone::get(tz_name).map_err(|_| {
        format!("unknown time zone {tz_name:?}; use an IANA name such as Europe/Berlin")
    })?;
    cron.find_next_occurrence(&now.to_zoned(tz), false)
        .map(|z| z.timestamp())
        .map_err(|e| format!("schedule {:?} never fires: {e}", schedule.spec.schedule))
}

/// The CronJob that runs `kiln refresh --schedule NS/NAME`. It runs as the
/// table's ServiceAccount (which may read the table, its Secrets and its
/// schedules) and is suspended while `run` is false (e.g. the table is missing).
pub fn desired_cronjob(
    schedule: &RefreshSchedule,
    image: Option<&str>,
    config: &BuildConfig,
    run: bool,
) -> CronJob {
    let name = schedule.name_any();
    let namespace = schedule.namespace().unwrap_or_default();
    let owner = schedule
        .controller_owner_ref(&())
        .expect("a RefreshSchedule from the API server has a name and uid");
    let spec = &schedule.spec;
    let object_labels = labels::standard(&name, "refresh", (SCHEDULE_LABEL, &name));
    let container = kiln_container(KilnContainer {
        name: "refresh",
        image: image.unwrap_or(&config.default_image),
        args: vec![
            "refresh".into(),
            "--schedule".into(),
            format!("{namespace}/{name}"),
        ],
        resources: &Default::default(),
        extra_env: config.operator_env(),
        extra_ports: vec![],
        extra_mounts: vec![],
        probes: false,
    });
    CronJob {
        metadata: ObjectMeta {
            name: Some(cronjob_name(&name)),
            namespace: Some(namespace),
            labels: Some(object_labels.clone()),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(CronJobSpec {
            schedule: spec.schedule.clone(),
            time_zone: spec.time_zone.clone(),
            suspend: Some(spec.suspend || !run),
            concurrency_policy: Some(spec.concurrency_policy.as_str().to_string()),
            starting_deadline_seconds: spec.starting_deadline_seconds,
            successful_jobs_history_limit: Some(spec.successful_jobs_history_limit),
            failed_jobs_history_limit: Some(spec.failed_jobs_history_limit),
            job_template: JobTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(object_labels.clone()),
                    ..Default::default()
                }),
                spec: Some(JobSpec {
                    backoff_limit: Some(2),
                    // A run the budget refused fails at once: retrying cannot help.
                    pod_failure_policy: Some(PodFailurePolicy {
                        rules: vec![PodFailurePolicyRule {
                            action: "FailJob".into(),
                            on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                                container_name: Some("refresh".into()),
                                operator: "In".into(),
                                values: vec![EXIT_SKIPPED_FOR_BUDGET],
                            }),
                            on_pod_conditions: None,
                        }],
                    }),
                    template: PodTemplateSpec {
                        metadata: Some(ObjectMeta {
                            labels: Some(object_labels),
                            ..Default::default()
                        }),
                        spec: Some(restricted_pod_spec(
                            &service_account_name(&spec.table_ref.name),
                            vec![container],
                            vec![],
                            Some("Never"),
                        )),
                    },
                    ..Default::default()
                }),
            },
        }),
        ..Default::default()
    }
}

/// The Job a `kiln.dev/refresh-now` annotation starts: the CronJob's job
/// template, owned by the CronJob, as `kubectl create job --from=cronjob/...`
/// makes it. Named after the trigger value, so acting twice creates one Job.
pub fn manual_job(cronjob: &CronJob, trigger: &str) -> Job {
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(trigger.as_bytes()));
    let template = cronjob
        .spec
        .as_ref()
        .map(|s| s.job_template.clone())
        .unwrap_or_default();
    let mut metadata = template.metadata.unwrap_or_default();
    metadata.name = Some(format!("{}-manual-{}", cronjob.name_any(), &digest[..10]));
    metadata.namespace = cronjob.namespace();
    metadata.annotations = Some(
        [(
            "cronjob.kubernetes.io/instantiate".to_string(),
            "manual".to_string(),
        )]
        .into(),
    );
    metadata.owner_references = cronjob.controller_owner_ref(&()).map(|o| vec![o]);
    Job {
        metadata,
        spec: template.spec,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schedule() -> RefreshSchedule {
        serde_json::from_value(json!({
            "apiVersion": "kiln.dev/v1alpha1", "kind": "RefreshSchedule",
            "metadata": {"name": "nightly", "namespace": "sales", "uid": "u-9"},
            "spec": {"tableRef": {"name": "leads"}, "schedule": "0 3 * * *", "timeZone": "Europe/Berlin",
                     "maxAge": "720h", "maxRows": 100, "maxCredits": 500.0}
        }))
        .unwrap()
    }

    use crate::operator::table::build::tests::config;

    #[test]
    fn the_cronjob_runs_kiln_refresh_as_the_tables_account_and_fails_fast_on_budget() {
        let cronjob = desired_cronjob(&schedule(), None, &config(), true);
        let spec = cronjob.spec.as_ref().unwrap();
        assert_eq!(spec.schedule, "0 3 * * *");
        assert_eq!(spec.time_zone.as_deref(), Some("Europe/Berlin"));
        assert_eq!(spec.suspend, Some(false));
        let job = spec.job_template.spec.as_ref().unwrap();
        let pod = job.template.spec.as_ref().unwrap();
        assert_eq!(pod.service_account_name.as_deref(), Some("kiln-leads"));
        assert_eq!(
            pod.containers[0].args.clone().unwrap(),
            vec!["refresh", "--schedule", "sales/nightly"]
        );
        let rule = &job.pod_failure_policy.as_ref().unwrap().rules[0];
        assert_eq!(rule.action, "FailJob");
        assert_eq!(
            rule.on_exit_codes.as_ref().unwrap().values,
            vec![EXIT_SKIPPED_FOR_BUDGET]
        );
        let held = desired_cronjob(&schedule(), None, &config(), false);
        assert_eq!(held.spec.unwrap().suspend, Some(true));
    }

    #[test]
    fn a_manual_run_is_the_job_template_owned_by_the_cronjob_and_named_by_trigger() {
        let mut cronjob = desired_cronjob(&schedule(), None, &config(), true);
        cronjob.metadata.uid = Some("c-1".into());
        let job = manual_job(&cronjob, "2026-11-27T06:00:00Z");
        let again = manual_job(&cronjob, "2026-11-27T06:00:00Z");
        let other = manual_job(&cronjob, "later");
        assert_eq!(job.metadata.name, again.metadata.name);
        assert_ne!(job.metadata.name, other.metadata.name);
        assert!(job.name_any().starts_with("nightly-refresh-manual-"));
        let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("CronJob", "c-1")
        );
        assert_eq!(
            job.spec,
            cronjob.spec.unwrap().job_template.spec,
            "the run is exactly the scheduled one"
        );
    }
}
