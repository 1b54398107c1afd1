//! Pure builders for a RefreshSchedule: its CronJob, and schedule checks.

use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::api::RefreshSchedule;
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
        extra_env: vec![k8s_openapi::api::core::v1::EnvVar {
            name: "KILN_OPERATOR_URL".into(),
            value: Some(config.operator_url.clone()),
            ..Default::default()
        }],
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
