//! A RefreshSchedule's status, computed from what the reconcile found and
//! did, with no API calls: its conditions, and the run times of its CronJob.

use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crate::api::common::{Conditions, TRUE};
use crate::api::{RefreshSchedule, RefreshScheduleStatus};

pub const READY: &str = "Ready";
pub const SCHEDULE_VALID: &str = "ScheduleValid";
pub const TABLE_RESOLVED: &str = "TableResolved";
pub const PROVISIONED: &str = "Provisioned";
pub const SUSPENDED: &str = "Suspended";

/// What the reconcile found and did.
pub struct Observed<'a> {
    /// Whether the table named in spec.tableRef exists.
    pub table_found: bool,
    /// Why runs are on hold, if they are: (reason, message).
    pub hold: Option<(&'static str, String)>,
    /// The next run, or why the schedule does not parse.
    pub next: &'a Result<jiff::Timestamp, String>,
    /// The CronJob as applied (none for an invalid schedule or a missing table).
    pub cronjob: Option<&'a CronJob>,
    /// The `kiln.dev/refresh-now` value handled last.
    pub manual_trigger: Option<String>,
}

pub fn compute(
    schedule: &RefreshSchedule,
    namespace: &str,
    observed: &Observed<'_>,
    now: Time,
) -> RefreshScheduleStatus {
    let current = schedule.status.clone().unwrap_or_default();
    let cond = Conditions::new(&current.conditions, schedule.metadata.generation, now);
    let table_name = &schedule.spec.table_ref.name;
    let table = if observed.table_found {
        cond.set(
            TABLE_RESOLVED,
            true,
            "TableFound",
            format!("refreshing EnrichmentTable {table_name:?}"),
        )
    } else {
        cond.set(
            TABLE_RESOLVED,
            false,
            "TableNotFound",
            format!(
                "EnrichmentTable {table_name:?} not found in namespace {namespace:?}; runs are suspended until it exists"
            ),
        )
    };
    let suspended = match &observed.hold {
        Some((reason, message)) => cond.set(SUSPENDED, true, reason, message.clone()),
        None if !observed.table_found => cond.set(
            SUSPENDED,
            true,
            "TableNotFound",
            format!("EnrichmentTable {table_name:?} not found"),
        ),
        None => cond.set(SUSPENDED, false, "Active", "runs on schedule".into()),
    };
    let (valid, provisioned) = match (observed.next, observed.cronjob) {
        (Err(message), _) => (
            cond.set(SCHEDULE_VALID, false, "InvalidSchedule", message.clone()),
            cond.set(
                PROVISIONED,
                false,
                "InvalidSchedule",
                "no CronJob is created for an invalid schedule".into(),
            ),
        ),
        (Ok(_), cronjob) => (
            cond.set(
                SCHEDULE_VALID,
                true,
                "Valid",
                "the schedule and time zone parse".into(),
            ),
            match cronjob {
                Some(cronjob) => cond.set(
                    PROVISIONED,
                    true,
                    "CronJobApplied",
                    format!("CronJob {:?} is applied", cronjob.name_any()),
                ),
                None => cond.set(
                    PROVISIONED,
                    false,
                    "TableNotFound",
                    format!("no CronJob while EnrichmentTable {table_name:?} does not exist"),
                ),
            },
        ),
    };
    let ready = match [&valid, &table, &provisioned]
        .into_iter()
        .find(|c| c.status != TRUE)
    {
        None => cond.set(READY, true, "Ready", "runs on schedule".into()),
        Some(blocking) => cond.set(READY, false, &blocking.reason, blocking.message.clone()),
    };
    let runs = observed
        .cronjob
        .and_then(|c| c.status.clone())
        .unwrap_or_default();
    let next_schedule_time = match (observed.next, suspended.status == TRUE) {
        (Ok(at), false) => Some(at.to_string()),
        _ => None,
    };
    RefreshScheduleStatus {
        observed_generation: schedule.metadata.generation,
        conditions: vec![ready, valid, table, provisioned, suspended],
        last_schedule_time: runs.last_schedule_time.or(current.last_schedule_time),
        last_successful_time: runs.last_successful_time.or(current.last_successful_time),
        next_schedule_time,
        last_run: current.last_run,
        last_manual_trigger: observed.manual_trigger.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::common::find_condition;
    use serde_json::json;

    fn schedule() -> RefreshSchedule {
        serde_json::from_value(json!({
            "apiVersion": "kiln.dev/v1alpha1", "kind": "RefreshSchedule",
            "metadata": {"name": "nightly", "namespace": "sales", "generation": 2},
            "spec": {"tableRef": {"name": "leads"}, "schedule": "0 3 * * *",
                     "maxAge": "720h", "maxRows": 10, "maxCredits": 100.0}
        }))
        .unwrap()
    }

    fn cronjob() -> CronJob {
        serde_json::from_value(json!({
            "metadata": {"name": "kiln-refresh-nightly", "namespace": "sales"},
            "status": {"lastScheduleTime": "2026-11-27T03:00:00Z"}
        }))
        .unwrap()
    }

    fn status(observed: &Observed<'_>) -> RefreshScheduleStatus {
        compute(
            &schedule(),
            "sales",
            observed,
            Time::from(jiff::Timestamp::UNIX_EPOCH),
        )
    }

    fn reason(status: &RefreshScheduleStatus, type_: &str) -> (String, String) {
        let c = find_condition(&status.conditions, type_).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn an_applied_cronjob_on_an_existing_table_is_ready_with_its_run_times() {
        let next = Ok("2026-11-28T03:00:00Z".parse().unwrap());
        let cronjob = cronjob();
        let status = status(&Observed {
            table_found: true,
            hold: None,
            next: &next,
            cronjob: Some(&cronjob),
            manual_trigger: None,
        });
        assert_eq!(reason(&status, READY), ("True".into(), "Ready".into()));
        assert_eq!(status.observed_generation, Some(2));
        assert_eq!(
            status.next_schedule_time.as_deref(),
            Some("2026-11-28T03:00:00Z")
        );
        assert!(status.last_schedule_time.is_some());
    }

    #[test]
    fn a_missing_table_or_an_invalid_schedule_holds_readiness_and_says_why() {
        let next = Ok("2026-11-28T03:00:00Z".parse().unwrap());
        let missing = status(&Observed {
            table_found: false,
            hold: None,
            next: &next,
            cronjob: None,
            manual_trigger: None,
        });
        assert_eq!(
            reason(&missing, READY),
            ("False".into(), "TableNotFound".into())
        );
        assert_eq!(
            reason(&missing, SUSPENDED),
            ("True".into(), "TableNotFound".into())
        );
        assert_eq!(missing.next_schedule_time, None, "no run while suspended");
        let invalid = Err("invalid cron expression \"61 * * * *\"".to_string());
        let status = status(&Observed {
            table_found: true,
            hold: None,
            next: &invalid,
            cronjob: None,
            manual_trigger: None,
        });
        assert_eq!(
            reason(&status, READY),
            ("False".into(), "InvalidSchedule".into())
        );
        assert_eq!(
            reason(&status, PROVISIONED),
            ("False".into(), "InvalidSchedule".into())
        );
    }

    #[test]
    fn held_runs_are_suspended_but_the_schedule_stays_ready() {
        let next = Ok("2026-11-28T03:00:00Z".parse().unwrap());
        let cronjob = cronjob();
        let status = status(&Observed {
            table_found: true,
            hold: Some(("BudgetExhausted", "the budget is exhausted".into())),
            next: &next,
            cronjob: Some(&cronjob),
            manual_trigger: Some("now-1".into()),
        });
        assert_eq!(
            reason(&status, SUSPENDED),
            ("True".into(), "BudgetExhausted".into())
        );
        assert_eq!(reason(&status, READY), ("True".into(), "Ready".into()));
        assert_eq!(status.next_schedule_time, None);
        assert_eq!(status.last_manual_trigger.as_deref(), Some("now-1"));
    }
}
