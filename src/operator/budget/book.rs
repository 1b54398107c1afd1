//! The ledger's bookkeeping as pure functions on a budget's spec and status,
//! with time passed in. The invariant: for every limited meter,
//! used + outstanding reservations never exceed the limit because of a grant.

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::budget::{Reservation, TableUsage};
use crate::api::table::CreditCost;
use crate::api::{CreditBudgetSpec, CreditBudgetStatus};
use crate::ledger::{Denial, DenialReason};

/// Data credits are fractional (0.5 per email); compare them as integer
/// thousandths so sums never drift.
fn milli(value: f64) -> i64 {
    (value * 1000.0).round() as i64
}

fn from_milli(value: i64) -> f64 {
    value as f64 / 1000.0
}

fn add(a: &CreditCost, b: &CreditCost) -> CreditCost {
    CreditCost {
        data_credits: from_milli(milli(a.data_credits) + milli(b.data_credits)),
        actions: a.actions + b.actions,
    }
}

/// a - b, floored at zero per meter.
fn sub(a: &CreditCost, b: &CreditCost) -> CreditCost {
    CreditCost {
        data_credits: from_milli((milli(a.data_credits) - milli(b.data_credits)).max(0)),
        actions: a.actions.saturating_sub(b.actions),
    }
}

/// Credits still unsettled on a reservation.
pub fn outstanding(reservation: &Reservation) -> CreditCost {
    sub(&reservation.granted, &reservation.settled)
}

/// Sum of what every reservation still holds.
pub fn total_reserved(status: &CreditBudgetStatus) -> CreditCost {
    status
        .reservations
        .iter()
        .fold(CreditCost::default(), |sum, r| add(&sum, &outstanding(r)))
}

/// Room left under each limit (None: that meter is not limited).
fn headroom(spec: &CreditBudgetSpec, status: &CreditBudgetStatus) -> (Option<i64>, Option<u64>) {
    let committed = add(&status.used, &total_reserved(status));
    (
        spec.limits
            .data_credits
            .map(|l| (milli(l) - milli(committed.data_credits)).max(0)),
        spec.limits
            .actions
            .map(|l| l.saturating_sub(committed.actions)),
    )
}

/// Grants up to `ask` (at least `min`) or refuses. On success the
/// reservation is added to `status` (the caller then writes it durably).
#[allow(clippy::too_many_arguments)]
pub fn reserve(
    spec: &CreditBudgetSpec,
    status: &mut CreditBudgetStatus,
    id: String,
    table: &str,
    holder: &str,
    ask: &CreditCost,
    min: &CreditCost,
    ttl: SignedDuration,
    breaker_allows: bool,
    now: Timestamp,
) -> Result<Reservation, Denial> {
    if let Some(existing) = status.reservations.iter().find(|r| r.id == id) {
        return Ok(existing.clone());
    }
    let deny = |status: &mut CreditBudgetStatus, reason, message: String| {
        status.denials += 1;
        Err(Denial {
            reason,
            message,
            on_exhausted: spec.on_exhausted,
        })
    };
    if spec.paused {
        return deny(
            status,
            DenialReason::Paused,
            "the CreditBudget is paused (spec.paused=true)".into(),
        );
    }
    if !breaker_allows {
        return deny(
            status,
            DenialReason::BreakerOpen,
            "the circuit breaker is open after repeated Clay failures".into(),
        );
    }
    let (data_room, action_room) = headroom(spec, status);
    let granted = CreditCost {
        data_credits: match data_room {
            Some(room) => from_milli(milli(ask.data_credits).min(room)),
            None => ask.data_credits,
        },
        actions: match action_room {
            Some(room) => ask.actions.min(room),
            None => ask.actions,
        },
    };
    let too_little =
        milli(granted.data_credits) < milli(min.data_credits) || granted.actions < min.actions;
    if too_little {
        let end = status
            .period_end
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default();
        return deny(
            status,
            DenialReason::Exhausted,
            format!(
                "the budget's limit for this period is reached; it resets at {end} or when the limit is raised"
            ),
        );
    }
    let reservation = Reservation {
        id,
        table: table.to_string(),
        holder: holder.to_string(),
        granted,
        settled: CreditCost::default(),
        settled_seq: 0,
        expires_at: Time(now + ttl),
    };
    status.reservations.push(reservation.clone());
    Ok(reservation)
}

/// Why a settlement or renewal could not be applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BookError {
    #[error("reservation {0} is unknown: it was released, or it expired and was counted as spent")]
    UnknownReservation(String),
    #[error("reservation {id} belongs to table {owner}, not {table}")]
    WrongTable {
        id: String,
        owner: String,
        table: String,
    },
}

/// Finds a reservation and checks it belongs to `table`.
fn owned_mut<'a>(
    status: &'a mut CreditBudgetStatus,
    id: &str,
    table: &str,
) -> Result<(usize, &'a mut Reservation), BookError> {
    let index = status
        .reservations
        .iter()
        .position(|r| r.id == id)
        .ok_or_else(|| BookError::UnknownReservation(id.to_string()))?;
    let reservation = &mut status.reservations[index];
    if reservation.table != table {
        return Err(BookError::WrongTable {
            id: id.to_string(),
            owner: reservation.table.clone(),
            table: table.to_string(),
        });
    }
    Ok((index, reservation))
}

/// Records spend against a reservation; with `release`, the remainder is
/// returned to the budget and the reservation closed. Spend beyond the grant
/// (a row cost more than the table's declared worst case) is recorded too:
/// the ledger tracks what Clay charged.
pub fn settle(
    status: &mut CreditBudgetStatus,
    id: &str,
    table: &str,
    seq: u64,
    used: &CreditCost,
    release: bool,
) -> Result<(), BookError> {
    let (index, reservation) = owned_mut(status, id, table)?;
    if seq <= reservation.settled_seq {
        return Ok(());
    }
    reservation.settled_seq = seq;
    reservation.settled = add(&reservation.settled, used);
    status.used = add(&status.used, used);
    charge_table(status, table, used);
    if release {
        status.reservations.remove(index);
    }
    Ok(())
}

/// Extends a reservation's life.
pub fn renew(
    status: &mut CreditBudgetStatus,
    id: &str,
    table: &str,
    ttl: SignedDuration,
    now: Timestamp,
) -> Result<(), BookError> {
    let (_, reservation) = owned_mut(status, id, table)?;
    reservation.expires_at = Time(now + ttl);
    Ok(())
}

/// Forfeits reservations whose holder stopped renewing them: the unsettled
/// remainder counts as spent (the holder may have submitted rows it never
/// reported). Returns the forfeited reservations.
pub fn expire(status: &mut CreditBudgetStatus, now: Timestamp) -> Vec<Reservation> {
    let (expired, live): (Vec<Reservation>, Vec<Reservation>) =
        std::mem::take(&mut status.reservations)
            .into_iter()
            .partition(|r| r.expires_at.0 <= now);
    status.reservations = live;
    for reservation in &expired {
        let remainder = outstanding(reservation);
        status.used = add(&status.used, &remainder);
        charge_table(status, &reservation.table, &remainder);
    }
    expired
}

fn charge_table(status: &mut CreditBudgetStatus, table: &str, cost: &CreditCost) {
    match status.tables.iter_mut().find(|t| t.table == table) {
        Some(usage) => usage.used = add(&usage.used, cost),
        None => {
            status.tables.push(TableUsage {
                table: table.to_string(),
                used: cost.clone(),
            });
            status.tables.sort_by(|a, b| a.table.cmp(&b.table));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::budget::BudgetLimits;

    fn spec(data: Option<f64>, actions: Option<u64>) -> CreditBudgetSpec {
        serde_json::from_value::<CreditBudgetSpec>(serde_json::json!({"limits": {}}))
            .map(|mut s| {
                s.limits = BudgetLimits {
                    data_credits: data,
                    actions,
                };
                s
            })
            .unwrap()
    }

    fn cost(data: f64, actions: u64) -> CreditCost {
        CreditCost {
            data_credits: data,
            actions,
        }
    }

    fn now() -> Timestamp {
        "2026-11-27T12:00:00Z".parse().unwrap()
    }

    fn grant(
        spec: &CreditBudgetSpec,
        status: &mut CreditBudgetStatus,
        id: &str,
        ask: CreditCost,
        min: CreditCost,
    ) -> Result<Reservation, Denial> {
        reserve(
            spec,
            status,
            id.into(),
            "leads",
            "pod-1",
            &ask,
            &min,
            SignedDuration::from_secs(60),
            true,
            now(),
        )
    }

    #[test]
    fn grants_never_exceed_the_limit_even_when_over_asked() {
        let spec = spec(Some(100.0), None);
        let mut status = CreditBudgetStatus::default();
        let mut granted = 0.0;
        let mut i = 0;
        while let Ok(r) = grant(
            &spec,
            &mut status,
            &format!("r{i}"),
            cost(30.0, 0),
            cost(4.0, 0),
        ) {
            granted += r.granted.data_credits;
            i += 1;
        }
        assert_eq!(granted, 100.0, "30+30+30 then a partial 10");
        assert_eq!(i, 4);
        assert_eq!(status.denials, 1);
        assert_eq!(total_reserved(&status), cost(100.0, 0));
    }

    #[test]
    fn fractional_credits_do_not_drift() {
        let spec = spec(Some(1.0), None);
        let mut status = CreditBudgetStatus::default();
        for i in 0..10 {
            let r = grant(
                &spec,
                &mut status,
                &format!("r{i}"),
                cost(0.1, 0),
                cost(0.1, 0),
            )
            .unwrap();
            settle(&mut status, &r.id, "leads", 1, &cost(0.1, 0), true).unwrap();
        }
        assert_eq!(status.used.data_credits, 1.0);
        assert!(grant(&spec, &mut status, "r10", cost(0.1, 0), cost(0.1, 0)).is_err());
    }

    #[test]
    fn settling_releases_the_unused_remainder() {
        let spec = spec(Some(100.0), Some(10));
        let mut status = CreditBudgetStatus::default();
        let r = grant(&spec, &mut status, "r1", cost(50.0, 10), cost(5.0, 1)).unwrap();
        settle(&mut status, &r.id, "leads", 2, &cost(12.5, 3), false).unwrap();
        assert_eq!(total_reserved(&status), cost(37.5, 7));
        settle(&mut status, &r.id, "leads", 3, &cost(2.5, 1), true).unwrap();
        assert_eq!(status.used, cost(15.0, 4));
        assert_eq!(total_reserved(&status), cost(0.0, 0));
        assert_eq!(status.tables[0].used, cost(15.0, 4));
        assert_eq!(
            settle(&mut status, "r1", "leads", 4, &cost(1.0, 0), true),
            Err(BookError::UnknownReservation("r1".into()))
        );
    }

    #[test]
    fn a_repeated_request_returns_the_same_grant_and_tables_cannot_touch_others_reservations() {
        let spec = spec(Some(100.0), None);
        let mut status = CreditBudgetStatus::default();
        let first = grant(&spec, &mut status, "r1", cost(30.0, 0), cost(1.0, 0)).unwrap();
        let again = grant(&spec, &mut status, "r1", cost(30.0, 0), cost(1.0, 0)).unwrap();
        assert_eq!(first, again);
        assert_eq!(total_reserved(&status), cost(30.0, 0));
        let error = settle(&mut status, "r1", "other-table", 5, &cost(1.0, 0), true).unwrap_err();
        assert!(matches!(error, BookError::WrongTable { .. }));
    }

    #[test]
    fn a_retried_settlement_is_applied_once() {
        let spec = spec(Some(100.0), None);
        let mut status = CreditBudgetStatus::default();
        grant(&spec, &mut status, "r1", cost(30.0, 0), cost(1.0, 0)).unwrap();
        settle(&mut status, "r1", "leads", 1, &cost(5.0, 0), false).unwrap();
        settle(&mut status, "r1", "leads", 1, &cost(5.0, 0), false).unwrap();
        assert_eq!(status.used, cost(5.0, 0));
        settle(&mut status, "r1", "leads", 2, &cost(5.0, 0), false).unwrap();
        assert_eq!(status.used, cost(10.0, 0));
    }

    #[test]
    fn the_actions_meter_limits_too() {
        let spec = spec(None, Some(5));
        let mut status = CreditBudgetStatus::default();
        let r = grant(&spec, &mut status, "r1", cost(1000.0, 8), cost(1.0, 2)).unwrap();
        assert_eq!(r.granted, cost(1000.0, 5));
        let denied = grant(&spec, &mut status, "r2", cost(1.0, 1), cost(1.0, 1)).unwrap_err();
        assert_eq!(denied.reason, DenialReason::Exhausted);
    }

    #[test]
    fn an_abandoned_reservation_is_forfeited_as_spent() {
        let spec = spec(Some(100.0), None);
        let mut status = CreditBudgetStatus::default();
        let r = grant(&spec, &mut status, "r1", cost(40.0, 0), cost(4.0, 0)).unwrap();
        settle(&mut status, &r.id, "leads", 6, &cost(8.0, 0), false).unwrap();
        assert!(expire(&mut status, now() + SignedDuration::from_secs(59)).is_empty());
        let forfeited = expire(&mut status, now() + SignedDuration::from_secs(61));
        assert_eq!(forfeited.len(), 1);
        assert_eq!(status.used, cost(40.0, 0), "8 settled + 32 forfeited");
        assert!(status.reservations.is_empty());
    }

    #[test]
    fn renewal_keeps_a_reservation_alive() {
        let spec = spec(Some(100.0), None);
        let mut status = CreditBudgetStatus::default();
        grant(&spec, &mut status, "r1", cost(10.0, 0), cost(1.0, 0)).unwrap();
        renew(
            &mut status,
            "r1",
            "leads",
            SignedDuration::from_secs(60),
            now() + SignedDuration::from_secs(50),
        )
        .unwrap();
        assert!(expire(&mut status, now() + SignedDuration::from_secs(100)).is_empty());
    }

    #[test]
    fn paused_and_breaker_refuse_with_their_reason() {
        let mut paused = spec(Some(100.0), None);
        paused.paused = true;
        let mut status = CreditBudgetStatus::default();
        assert_eq!(
            grant(&paused, &mut status, "r", cost(1.0, 0), cost(1.0, 0))
                .unwrap_err()
                .reason,
            DenialReason::Paused
        );
        let open = reserve(
            &spec(Some(100.0), None),
            &mut status,
            "r".into(),
            "t",
            "h",
            &cost(1.0, 0),
            &cost(1.0, 0),
            SignedDuration::from_secs(1),
            false,
            now(),
        );
        assert_eq!(open.unwrap_err().reason, DenialReason::BreakerOpen);
        assert_eq!(status.denials, 2);
    }
}
