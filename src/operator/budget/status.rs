//! Pure status computation for a CreditBudget: period bounds, rollover into
//! history, remaining credits and the one-word state.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::period;
use crate::api::budget::{BreakerState, BudgetState, PeriodUsage};
use crate::api::common::Conditions;
use crate::api::table::CreditCost;
use crate::api::{CreditBudget, CreditBudgetStatus};

pub const READY: &str = "Ready";
pub const EXHAUSTED: &str = "Exhausted";
pub const WARNING: &str = "Warning";

/// When the forecast says the period's credits run out before it ends:
/// the period it is about (its start) and what to tell the budget's owner.
pub fn forecast_warning(status: &CreditBudgetStatus) -> Option<(String, String)> {
    let forecast = status.forecast.as_ref()?;
    let at = forecast.exhausts_at.as_ref()?;
    let period = status.period_start.as_ref()?.0.to_string();
    let end = status.period_end.as_ref().map_or_else(String::new, |e| {
        format!(", before the period ends at {}", e.0)
    });
    Some((
        period,
        format!(
            "at the last hour's burn ({:.0} data credits/h) the period's credits run out at {}{end}; raise spec.limits or slow the tables down",
            forecast.data_credits_per_hour_last_hour, at.0
        ),
    ))
}

/// Computes the budget's status at `now`. Usage (`used`, `reserved`, per-table)
/// is carried over from the current status, which the ledger maintains; when
/// `now` is past the recorded period, usage moves into history and resets.
pub fn compute(budget: &CreditBudget, now: Timestamp) -> CreditBudgetStatus {
    let mut status = budget.status.clone().unwrap_or_default();
    let spec = &budget.spec;
    let generation = budget.metadata.generation;
    let previous = status.conditions.clone();
    let now_time = Time::from(now);
    let cond = Conditions::new(&previous, generation, now_time.clone());
    status.observed_generation = generation;

    let (start, end) = match period::bounds(spec.period, &spec.time_zone, now) {
        Ok(bounds) => bounds,
        Err(message) => {
            status.state = BudgetState::Invalid;
            status.conditions = vec![cond.set(READY, false, "InvalidTimeZone", message)];
            return status;
        }
    };
    let recorded_start = status.period_start.as_ref().map(|t| t.0);
    if recorded_start.is_some_and(|s| s != start) {
        // Rollover: archive the finished period, newest first.
        if let (Some(old_start), Some(old_end)) =
            (status.period_start.clone(), status.period_end.clone())
        {
            status.history.insert(
                0,
                PeriodUsage {
                    period_start: old_start,
                    period_end: old_end,
                    used: status.used.clone(),
                },
            );
        }
        status.used = CreditCost::default();
        status.tables.clear();
    }
    status.history.truncate(spec.history_limit as usize);
    status.period_start = Some(Time::from(start));
    status.period_end = Some(Time::from(end));

    status.reserved = super::book::total_reserved(&status);
    let committed = |used: f64, reserved: f64| used + reserved;
    let data_limit = spec.limits.data_credits;
    let action_limit = spec.limits.actions;
    status.remaining = CreditCost {
        data_credits: data_limit
            .map(|l| {
                (l - committed(status.used.data_credits, status.reserved.data_credits)).max(0.0)
            })
            .unwrap_or(0.0),
        actions: action_limit
            .map(|l| l.saturating_sub(status.used.actions + status.reserved.actions))
            .unwrap_or(0),
    };
    let data_percent = data_limit
        .map(|l| committed(status.used.data_credits, status.reserved.data_credits) / l * 100.0)
        .unwrap_or(0.0);
    let action_percent = action_limit
        .map(|l| (status.used.actions + status.reserved.actions) as f64 / l as f64 * 100.0)
        .unwrap_or(0.0);
    let percent = data_percent.max(action_percent);
    status.percent_used = percent.floor().clamp(0.0, 100.0) as u32;

    // Exhausted as soon as the smallest row a live holder draws no longer
    // fits: every table is refused from then on, whatever the percentage.
    let refusing = super::book::refusing_rows(spec, &status);
    let exhausted = percent >= 100.0 || refusing.is_some();
    let crossed: Option<u32> = spec
        .warning_thresholds
        .iter()
        .copied()
        .filter(|t| f64::from(*t) <= percent)
        .max();
    status.state = if spec.paused {
        BudgetState::Paused
    } else if status.breaker.state == BreakerState::Open {
        BudgetState::BreakerOpen
    } else if exhausted {
        BudgetState::Exhausted
    } else if crossed.is_some() {
        BudgetState::Warning
    } else {
        BudgetState::Active
    };

    let ready = if spec.paused {
        cond.set(
            READY,
            false,
            "Paused",
            "spec.paused is true: no credits are granted".into(),
        )
    } else if exhausted {
        cond.set(
            READY,
            false,
            "Exhausted",
            format!("no credits are granted until the period ends at {end} or the limit is raised"),
        )
    } else {
        cond.set(
            READY,
            true,
            "Active",
            format!("{}% used this period", status.percent_used),
        )
    };
    let exhausted_condition = if exhausted {
        let left = refusing
            .as_ref()
            .map(|shortfall| format!("{shortfall}; "))
            .unwrap_or_default();
        cond.set(
            EXHAUSTED,
            true,
            "LimitReached",
            format!(
                "{left}tables behave per onExhausted={:?} until {end}",
                spec.on_exhausted
            ),
        )
    } else {
        cond.set(
            EXHAUSTED,
            false,
            "WithinLimit",
            "credits remain this period".into(),
        )
    };
    let warning = match crossed {
        Some(threshold) => cond.set(
            WARNING,
            true,
            "ThresholdCrossed",
            format!("{threshold}% warning threshold crossed this period"),
        ),
        None => cond.set(
            WARNING,
            false,
            "BelowThresholds",
            "no warning threshold crossed this period".into(),
        ),
    };
    status.conditions = vec![ready, exhausted_condition, warning];
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::common::find_condition;
    use serde_json::json;

    fn budget(status: serde_json::Value) -> CreditBudget {
        serde_json::from_value(json!({
            "apiVersion": "kiln.dev/v1alpha1", "kind": "CreditBudget",
            "metadata": {"name": "b", "namespace": "sales", "generation": 1},
            "spec": {"limits": {"dataCredits": 1000.0, "actions": 100}, "warningThresholds": [75, 90], "historyLimit": 2},
            "status": status
        }))
        .unwrap()
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn the_tighter_meter_decides_the_state() {
        // 40% of data credits but 92% of actions: Warning, from the actions meter.
        let b = budget(json!({
            "periodStart": "2026-11-01T00:00:00Z", "periodEnd": "2026-12-01T00:00:00Z",
            "used": {"dataCredits": 300.0, "actions": 80}, "leases": [{"id": "r", "table": "t", "holder": "h", "held": {"dataCredits": 100.0, "actions": 12}, "expiresAt": "2026-11-27T13:00:00Z"}]
        }));
        let status = compute(&b, at("2026-11-27T12:00:00Z"));
        assert_eq!(status.percent_used, 92);
        assert_eq!(status.state, BudgetState::Warning);
        assert_eq!(status.remaining.data_credits, 600.0);
        assert_eq!(status.remaining.actions, 8);
        let warning = find_condition(&status.conditions, WARNING).unwrap();
        assert!(warning.message.starts_with("90%"), "{}", warning.message);
    }

    #[test]
    fn reaching_a_limit_exhausts_the_budget() {
        let b = budget(json!({
            "periodStart": "2026-11-01T00:00:00Z", "periodEnd": "2026-12-01T00:00:00Z",
            "used": {"dataCredits": 1000.0, "actions": 10}
        }));
        let status = compute(&b, at("2026-11-27T12:00:00Z"));
        assert_eq!(status.state, BudgetState::Exhausted);
        assert_eq!(status.remaining.data_credits, 0.0);
        assert_eq!(
            find_condition(&status.conditions, READY).unwrap().reason,
            "Exhausted"
        );
    }

    #[test]
    fn less_than_one_row_left_is_exhausted_and_says_so() {
        // 996 of 1000 used: 99%, but the table's rows cost 8.
        let b = budget(json!({
            "periodStart": "2026-11-01T00:00:00Z", "periodEnd": "2026-12-01T00:00:00Z",
            "used": {"dataCredits": 996.0, "actions": 10},
            "leases": [{"id": "w", "table": "t", "holder": "h", "held": {}, "rowCost": {"dataCredits": 8.0}, "expiresAt": "2026-11-27T13:00:00Z"}]
        }));
        let status = compute(&b, at("2026-11-27T12:00:00Z"));
        assert_eq!(status.percent_used, 99);
        assert_eq!(status.state, BudgetState::Exhausted);
        let exhausted = find_condition(&status.conditions, EXHAUSTED).unwrap();
        assert_eq!(exhausted.status, "True");
        assert!(
            exhausted
                .message
                .starts_with("4 data credits remain, one row needs 8; 90 actions remain"),
            "{}",
            exhausted.message
        );
    }

    #[test]
    fn rollover_archives_the_period_and_resets_usage() {
        let b = budget(json!({
            "periodStart": "2026-10-01T00:00:00Z", "periodEnd": "2026-11-01T00:00:00Z",
            "used": {"dataCredits": 1000.0, "actions": 100},
            "tables": [{"table": "leads", "used": {"dataCredits": 1000.0, "actions": 100}}],
            "history": [
                {"periodStart": "2026-09-01T00:00:00Z", "periodEnd": "2026-10-01T00:00:00Z", "used": {"dataCredits": 5.0, "actions": 1}},
                {"periodStart": "2026-08-01T00:00:00Z", "periodEnd": "2026-09-01T00:00:00Z", "used": {"dataCredits": 6.0, "actions": 1}}
            ]
        }));
        let status = compute(&b, at("2026-11-01T00:00:01Z"));
        assert_eq!(status.used, CreditCost::default());
        assert!(status.tables.is_empty());
        assert_eq!(status.state, BudgetState::Active);
        assert_eq!(status.history.len(), 2, "historyLimit is honoured");
        assert_eq!(status.history[0].used.data_credits, 1000.0);
        assert_eq!(status.history[1].used.data_credits, 5.0);
        assert_eq!(status.period_start.unwrap().0, at("2026-11-01T00:00:00Z"));
    }

    #[test]
    fn paused_wins_over_everything() {
        let mut b = budget(json!({}));
        b.spec.paused = true;
        let status = compute(&b, at("2026-11-27T12:00:00Z"));
        assert_eq!(status.state, BudgetState::Paused);
        assert_eq!(
            find_condition(&status.conditions, READY).unwrap().reason,
            "Paused"
        );
    }
}
