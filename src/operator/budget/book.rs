//! The ledger's bookkeeping as pure functions on a budget's spec and status,
//! with time passed in. The invariant: for every limited meter, `used` plus
//! what leases hold never exceeds the limit because of a grant. Every amount
//! is checked before anything changes, and all arithmetic saturates, so one
//! bad request fails alone and nothing can wrap.

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::breaker::Breaker;
use crate::api::budget::{BreakerState, Lease, TableUsage};
use crate::api::table::CreditCost;
use crate::api::{CreditBudgetSpec, CreditBudgetStatus};
use crate::ledger::{Credits, Denial, DenialReason, LeaseAnswer, LeaseRequest};

/// Leases one table may hold at once (one per process; far above any
/// deployment's process count, low enough to keep status small).
pub const MAX_LEASES_PER_TABLE: usize = 64;
/// Leases one budget may hold at once.
pub const MAX_LEASES_PER_BUDGET: usize = 2000;

fn add(a: &CreditCost, b: Credits) -> CreditCost {
    Credits::of(a).plus(b).cost()
}

fn sub(a: &CreditCost, b: Credits) -> CreditCost {
    Credits::of(a).minus(b).cost()
}

/// Sum of what every lease holds.
pub fn total_reserved(status: &CreditBudgetStatus) -> CreditCost {
    status
        .leases
        .iter()
        .fold(Credits::default(), |sum, l| sum.plus(Credits::of(&l.held)))
        .cost()
}

/// Room left under each limit; an unlimited meter has room without end.
fn room(spec: &CreditBudgetSpec, status: &CreditBudgetStatus) -> Credits {
    let committed = Credits::of(&status.used).plus(Credits::of(&total_reserved(status)));
    let limit = Credits {
        milli: spec.limits.data_credits.map_or(i64::MAX, |l| {
            Credits::of(&CreditCost {
                data_credits: l,
                actions: 0,
            })
            .milli
        }),
        actions: spec.limits.actions.unwrap_or(u64::MAX),
    };
    limit.minus(committed)
}

/// When the smallest row any live lease draws no longer fits in what is
/// left (the budget then refuses every table), says what remains and what
/// one row needs, in the limited meters.
pub fn refusing_rows(spec: &CreditBudgetSpec, status: &CreditBudgetStatus) -> Option<String> {
    let room = room(spec, status);
    let smallest = status
        .leases
        .iter()
        .map(|l| Credits::of(&l.row_cost))
        .filter(|c| !c.is_zero())
        .min()?;
    (!room.covers(smallest)).then(|| shortfall(spec, room, smallest))
}

/// "N data credits remain, one row needs M" over the limited meters.
fn shortfall(spec: &CreditBudgetSpec, room: Credits, row: Credits) -> String {
    let (room, row) = (room.cost(), row.cost());
    let mut parts = Vec::new();
    if spec.limits.data_credits.is_some() {
        parts.push(format!(
            "{} data credits remain, one row needs {}",
            room.data_credits, row.data_credits
        ));
    }
    if spec.limits.actions.is_some() {
        parts.push(format!(
            "{} actions remain, one row needs {}",
            room.actions, row.actions
        ));
    }
    parts.join("; ")
}

/// Why a request could not be applied; nothing of it was.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BookError {
    #[error(
        "lease {0} is unknown: it was released, or it expired and what it held was counted as spent"
    )]
    UnknownLease(String),
    #[error("lease {id} belongs to table {owner}, not {table}")]
    WrongTable {
        id: String,
        owner: String,
        table: String,
    },
    #[error("request {got} of lease {id} is out of order (the ledger applied {applied})")]
    OutOfOrder { id: String, applied: u64, got: u64 },
    #[error("lease {id} reports spending or giving back more than it holds")]
    MoreThanHeld { id: String },
    #[error("table {table} already holds {max} leases on this budget")]
    TooManyLeases { table: String, max: usize },
}

impl BookError {
    /// A holder whose lease is gone starts a new one; other errors are bugs.
    pub fn lease_lost(&self) -> bool {
        matches!(self, Self::UnknownLease(_) | Self::OutOfOrder { .. })
    }
}

fn answer(lease: &Lease, period: &str, denial: Option<Denial>) -> LeaseAnswer {
    LeaseAnswer {
        lease: lease.id.clone(),
        seq: lease.seq,
        granted: lease.last_granted.clone(),
        refunded: lease.last_refunded.clone(),
        held: lease.held.clone(),
        expires_at: lease.expires_at.0.to_string(),
        period: period.to_string(),
        denial,
        rate: None,
    }
}

/// Applies one lease request: spend, give-back, refunds and breaker reports
/// first, then the ask. A repeated request gets its first answer again.
pub fn apply(
    spec: &CreditBudgetSpec,
    status: &mut CreditBudgetStatus,
    breaker: &mut Breaker,
    request: &LeaseRequest,
    now: Timestamp,
) -> Result<LeaseAnswer, BookError> {
    let period = status
        .period_start
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    let index = status.leases.iter().position(|l| l.id == request.lease);
    // Every check before any change.
    match index.map(|i| &status.leases[i]) {
        Some(lease) if lease.table != request.table => {
            return Err(BookError::WrongTable {
                id: lease.id.clone(),
                owner: lease.table.clone(),
                table: request.table.clone(),
            });
        }
        Some(lease) if request.seq == lease.seq => return Ok(answer(lease, &period, None)),
        Some(lease) if request.seq != lease.seq + 1 => {
            return Err(BookError::OutOfOrder {
                id: lease.id.clone(),
                applied: lease.seq,
                got: request.seq,
            });
        }
        Some(_) => {}
        None if request.seq != 1 => return Err(BookError::UnknownLease(request.lease.clone())),
        None => {
            let of_table = status
                .leases
                .iter()
                .filter(|l| l.table == request.table)
                .count();
            if of_table >= MAX_LEASES_PER_TABLE || status.leases.len() >= MAX_LEASES_PER_BUDGET {
                return Err(BookError::TooManyLeases {
                    table: request.table.clone(),
                    max: MAX_LEASES_PER_TABLE.min(MAX_LEASES_PER_BUDGET),
                });
            }
        }
    }
    let held = index.map_or(Credits::default(), |i| Credits::of(&status.leases[i].held));
    let (spent, give_back) = (Credits::of(&request.spent), Credits::of(&request.give_back));
    if !held.covers(spent.plus(give_back)) {
        return Err(BookError::MoreThanHeld {
            id: request.lease.clone(),
        });
    }

    // Valid: apply it.
    let index = index.unwrap_or_else(|| {
        status.leases.push(Lease {
            id: request.lease.clone(),
            table: request.table.clone(),
            holder: request.holder.clone(),
            held: CreditCost::default(),
            row_cost: CreditCost::default(),
            seq: 0,
            last_granted: CreditCost::default(),
            last_refunded: CreditCost::default(),
            expires_at: Time(now),
        });
        status.leases.len() - 1
    });
    charge(status, &request.table, spent);
    // A refund is taken only from this table's spend in the period it
    // belongs to, so no report can lower another table's or period's use;
    // what does not fit yet is left to the holder to send again.
    let mut refunded = Credits::default();
    if request.refund_period == period {
        let table_used = status
            .tables
            .iter()
            .find(|t| t.table == request.table)
            .map_or(Credits::default(), |t| Credits::of(&t.used));
        refunded = Credits::of(&request.refund).min(table_used);
        refund(status, &request.table, refunded);
    }
    charge(status, &request.table, Credits::of(&request.extra));
    breaker.record(
        &spec.circuit_breaker,
        request.successes,
        request.failures,
        now,
    );

    let lease = &mut status.leases[index];
    lease.held = Credits::of(&lease.held).minus(spent.plus(give_back)).cost();
    lease.row_cost = request.row_cost.clone();
    lease.holder = request.holder.clone();
    lease.seq = request.seq;
    lease.last_granted = CreditCost::default();
    lease.last_refunded = refunded.cost();
    lease.expires_at = Time(now + SignedDuration::from_secs(request.ttl_seconds as i64));

    let denial = grant(spec, status, breaker, index, request, now);
    if request.release {
        let lease = status.leases.remove(index);
        charge(status, &lease.table, Credits::of(&lease.held));
        let mut closed = answer(&lease, &period, denial);
        closed.held = CreditCost::default();
        return Ok(closed);
    }
    Ok(answer(&status.leases[index], &period, denial))
}

/// Grants the ask (capped by the room and, near exhaustion, by a fair share
/// of it) or says why not. Paused and breaker-open are reported even
/// without an ask, so holders stop drawing on what they hold.
fn grant(
    spec: &CreditBudgetSpec,
    status: &mut CreditBudgetStatus,
    breaker: &mut Breaker,
    index: usize,
    request: &LeaseRequest,
    now: Timestamp,
) -> Option<Denial> {
    let ask = Credits::of(&request.ask);
    let row = Credits::of(&request.row_cost);
    let asking = !ask.is_zero();
    let deny = |status: &mut CreditBudgetStatus, reason, message: String| {
        if asking {
            status.denials = status.denials.saturating_add(1);
        }
        Some(Denial {
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
    breaker.tick(&spec.circuit_breaker, now);
    if breaker.state() == BreakerState::Open {
        return deny(
            status,
            DenialReason::BreakerOpen,
            "the circuit breaker is open after repeated Clay failures".into(),
        );
    }
    if !asking {
        return None;
    }
    let probing = breaker.state() == BreakerState::HalfOpen;
    if !breaker.allows(&spec.circuit_breaker, now) {
        return deny(
            status,
            DenialReason::BreakerOpen,
            "the circuit breaker is probing Clay; no more credits until the probes succeed".into(),
        );
    }
    let room = room(spec, status);
    // Near exhaustion every live lease gets an equal slice of what is left,
    // but never less than one row while a row still fits.
    let holders = status.leases.len().max(1) as u64;
    let share = Credits {
        milli: room.milli / holders as i64,
        actions: room.actions / holders,
    };
    let floor = share.max_each(row);
    let mut granted = whole_rows(ask.min(floor).min(room), row);
    if probing {
        granted = granted.min(row);
    }
    if !granted.covers(row) {
        let end = status
            .period_end
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default();
        return deny(
            status,
            DenialReason::Exhausted,
            format!(
                "the budget's limit for this period is reached ({}); it resets at {end} or when the limit is raised",
                shortfall(spec, room, row)
            ),
        );
    }
    let lease = &mut status.leases[index];
    lease.held = Credits::of(&lease.held).plus(granted).cost();
    lease.last_granted = granted.cost();
    None
}

/// `amount` rounded down to whole rows: a remainder smaller than a row
/// could never be drawn and would only sit in a pool.
fn whole_rows(amount: Credits, row: Credits) -> Credits {
    let by_data = (row.milli > 0).then(|| amount.milli / row.milli);
    let by_actions = (row.actions > 0).then(|| amount.actions / row.actions);
    let rows = match (by_data, by_actions) {
        (Some(d), Some(a)) => d.min(i64::try_from(a).unwrap_or(i64::MAX)),
        (Some(d), None) => d,
        (None, Some(a)) => i64::try_from(a).unwrap_or(i64::MAX),
        (None, None) => return amount,
    };
    Credits {
        milli: row.milli.saturating_mul(rows),
        actions: row.actions.saturating_mul(rows as u64),
    }
}

/// Forfeits leases whose holder stopped renewing them: what they held
/// counts as spent (the holder may have submitted rows it never reported).
/// Returns the forfeited leases.
pub fn expire(status: &mut CreditBudgetStatus, now: Timestamp) -> Vec<Lease> {
    let (expired, live): (Vec<Lease>, Vec<Lease>) = std::mem::take(&mut status.leases)
        .into_iter()
        .partition(|l| l.expires_at.0 <= now);
    status.leases = live;
    for lease in &expired {
        charge(status, &lease.table, Credits::of(&lease.held));
    }
    expired
}

/// Counts `amount` as spent, by the budget and by `table`.
fn charge(status: &mut CreditBudgetStatus, table: &str, amount: Credits) {
    if amount.is_zero() {
        return;
    }
    status.used = add(&status.used, amount);
    match status.tables.iter_mut().find(|t| t.table == table) {
        Some(usage) => usage.used = add(&usage.used, amount),
        None => {
            status.tables.push(TableUsage {
                table: table.to_string(),
                used: amount.cost(),
            });
            status.tables.sort_by(|a, b| a.table.cmp(&b.table));
        }
    }
}

/// Takes `amount` back from what the budget and `table` spent (the caller
/// bounds it by the table's spend).
fn refund(status: &mut CreditBudgetStatus, table: &str, amount: Credits) {
    if amount.is_zero() {
        return;
    }
    status.used = sub(&status.used, amount);
    if let Some(usage) = status.tables.iter_mut().find(|t| t.table == table) {
        usage.used = sub(&usage.used, amount);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::budget::BudgetLimits;

    fn spec(data: Option<f64>, actions: Option<u64>) -> CreditBudgetSpec {
        let mut spec =
            serde_json::from_value::<CreditBudgetSpec>(serde_json::json!({"limits": {}})).unwrap();
        spec.limits = BudgetLimits {
            data_credits: data,
            actions,
        };
        spec
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

    fn period_status() -> CreditBudgetStatus {
        CreditBudgetStatus {
            period_start: Some(Time("2026-11-01T00:00:00Z".parse().unwrap())),
            ..Default::default()
        }
    }

    fn breaker() -> Breaker {
        Breaker::new(BreakerState::Closed, now())
    }

    fn request(lease: &str, seq: u64) -> LeaseRequest {
        LeaseRequest {
            namespace: "sales".into(),
            budget: "team".into(),
            table: "leads".into(),
            holder: "pod".into(),
            lease: lease.into(),
            seq,
            row_cost: cost(4.0, 0),
            ttl_seconds: 60,
            refund_period: "2026-11-01T00:00:00Z".into(),
            ..Default::default()
        }
    }

    fn ask(lease: &str, seq: u64, data: f64) -> LeaseRequest {
        LeaseRequest {
            ask: cost(data, 0),
            ..request(lease, seq)
        }
    }

    fn committed(status: &CreditBudgetStatus) -> f64 {
        status.used.data_credits + total_reserved(status).data_credits
    }

    #[test]
    fn grants_never_exceed_the_limit_even_when_over_asked() {
        let spec = spec(Some(100.0), None);
        let mut status = period_status();
        let mut b = breaker();
        let mut granted = 0.0;
        for i in 0..12 {
            let a = apply(
                &spec,
                &mut status,
                &mut b,
                &ask(&format!("l{i}"), 1, 30.0),
                now(),
            )
            .unwrap();
            granted += a.granted.data_credits;
            assert!(committed(&status) <= 100.0);
        }
        assert_eq!(
            granted, 100.0,
            "in whole rows of 4, shrinking as holders join"
        );
        assert!(status.denials >= 1, "the last holders are refused");
    }

    #[test]
    fn near_exhaustion_each_lease_gets_a_fair_share_but_at_least_one_row() {
        let spec = spec(Some(40.0), None);
        let mut status = period_status();
        let mut b = breaker();
        // Three holders exist; the first asks for everything.
        for id in ["a", "b", "c"] {
            apply(&spec, &mut status, &mut b, &request(id, 1), now()).unwrap();
        }
        let first = apply(&spec, &mut status, &mut b, &ask("a", 2, 1000.0), now()).unwrap();
        assert!(first.granted.data_credits <= 40.0 / 3.0 + 0.001);
        let second = apply(&spec, &mut status, &mut b, &ask("b", 2, 1000.0), now()).unwrap();
        let third = apply(&spec, &mut status, &mut b, &ask("c", 2, 1000.0), now()).unwrap();
        for a in [&first, &second, &third] {
            assert!(a.granted.data_credits >= 4.0, "nobody starved: {a:?}");
        }
        assert!(committed(&status) <= 40.0);
    }

    #[test]
    fn spending_moves_credits_from_the_lease_to_used_and_refunds_lower_it() {
        let spec = spec(Some(100.0), None);
        let mut status = period_status();
        let mut b = breaker();
        apply(&spec, &mut status, &mut b, &ask("l", 1, 40.0), now()).unwrap();
        let spent = LeaseRequest {
            spent: cost(16.0, 0),
            refund: cost(5.0, 0),
            ..request("l", 2)
        };
        let a = apply(&spec, &mut status, &mut b, &spent, now()).unwrap();
        assert_eq!(a.held, cost(24.0, 0));
        assert_eq!(status.used, cost(11.0, 0));
        assert_eq!(status.tables[0].used, cost(11.0, 0));
        // A refund for another period is dropped.
        let stale = LeaseRequest {
            refund: cost(5.0, 0),
            refund_period: "2026-10-01T00:00:00Z".into(),
            ..request("l", 3)
        };
        apply(&spec, &mut status, &mut b, &stale, now()).unwrap();
        assert_eq!(status.used, cost(11.0, 0));
        // A refund never takes more than the table spent; the rest is
        // reported as not applied, for the holder to send again.
        let greedy = LeaseRequest {
            refund: cost(500.0, 0),
            ..request("l", 4)
        };
        let a = apply(&spec, &mut status, &mut b, &greedy, now()).unwrap();
        assert_eq!(status.used, cost(0.0, 0));
        assert_eq!(a.refunded, cost(11.0, 0));
    }

    #[test]
    fn a_repeated_request_is_applied_once_and_answered_the_same() {
        let spec = spec(Some(100.0), None);
        let mut status = period_status();
        let mut b = breaker();
        let first = apply(&spec, &mut status, &mut b, &ask("l", 1, 32.0), now()).unwrap();
        let again = apply(&spec, &mut status, &mut b, &ask("l", 1, 32.0), now()).unwrap();
        assert_eq!(first, again);
        let spend = LeaseRequest {
            spent: cost(10.0, 0),
            ..request("l", 2)
        };
        apply(&spec, &mut status, &mut b, &spend, now()).unwrap();
        apply(&spec, &mut status, &mut b, &spend, now()).unwrap();
        assert_eq!(status.used, cost(10.0, 0));
        assert_eq!(total_reserved(&status), cost(22.0, 0));
    }

    #[test]
    fn bad_requests_fail_alone_and_change_nothing() {
        let spec = spec(Some(100.0), None);
        let mut status = period_status();
        let mut b = breaker();
        apply(&spec, &mut status, &mut b, &ask("l", 1, 30.0), now()).unwrap();
        let before = status.clone();
        let overspend = LeaseRequest {
            spent: cost(31.0, 0),
            failures: 1000,
            ..request("l", 2)
        };
        assert!(matches!(
            apply(&spec, &mut status, &mut b, &overspend, now()),
            Err(BookError::MoreThanHeld { .. })
        ));
        let other_table = LeaseRequest {
            table: "other".into(),
            ..request("l", 2)
        };
        assert!(matches!(
            apply(&spec, &mut status, &mut b, &other_table, now()),
            Err(BookError::WrongTable { .. })
        ));
        assert!(matches!(
            apply(&spec, &mut status, &mut b, &request("l", 5), now()),
            Err(BookError::OutOfOrder { .. })
        ));
        assert!(matches!(
            apply(&spec, &mut status, &mut b, &request("gone", 3), now()),
            Err(BookError::UnknownLease(_))
        ));
        assert_eq!(status, before);
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "refused reports count nothing"
        );
    }

    /// A budget shared by 100 tables, each run by 10 processes, with a pod
    /// name as long as Deployments make them: its status stays far below
    /// etcd's 1.5 MB object limit, however many rows are in flight.
    #[test]
    fn status_of_100_tables_times_10_holders_is_small() {
        let spec = spec(Some(1e9), None);
        let mut status = period_status();
        let mut b = breaker();
        for t in 0..100 {
            for h in 0..10 {
                let table = format!("table-{t:03}-{}", "x".repeat(40));
                let holder = format!("{table}-worker-7d9f8c6b5d-{h:05}");
                let r = LeaseRequest {
                    table: table.clone(),
                    holder: holder.clone(),
                    lease: format!("{t:03}{h:013}"),
                    ask: cost(400.0, 0),
                    ..request("unused", 1)
                };
                apply(&spec, &mut status, &mut b, &r, now()).unwrap();
            }
        }
        assert_eq!(status.leases.len(), 1000);
        let bytes = serde_json::to_vec(&status).unwrap().len();
        assert!(bytes < 400 * 1024, "{bytes} bytes");
        println!("status of 100 tables x 10 holders: {bytes} bytes");
    }

    #[test]
    fn the_number_of_leases_per_table_is_capped() {
        let spec = spec(None, None);
        let mut status = period_status();
        let mut b = breaker();
        for i in 0..MAX_LEASES_PER_TABLE {
            apply(
                &spec,
                &mut status,
                &mut b,
                &request(&format!("l{i}"), 1),
                now(),
            )
            .unwrap();
        }
        assert!(matches!(
            apply(&spec, &mut status, &mut b, &request("one-more", 1), now()),
            Err(BookError::TooManyLeases { .. })
        ));
    }

    #[test]
    fn fractional_credits_do_not_drift() {
        let spec = spec(Some(1.0), None);
        let mut status = period_status();
        let mut b = breaker();
        let mut seq = 1;
        let row = |seq| LeaseRequest {
            ask: cost(0.1, 0),
            row_cost: cost(0.1, 0),
            ..request("l", seq)
        };
        apply(&spec, &mut status, &mut b, &row(seq), now()).unwrap();
        for _ in 0..9 {
            seq += 1;
            let mut r = row(seq);
            r.spent = cost(0.1, 0);
            let a = apply(&spec, &mut status, &mut b, &r, now()).unwrap();
            assert!(a.denial.is_none());
        }
        seq += 1;
        let mut last = row(seq);
        last.spent = cost(0.1, 0);
        let a = apply(&spec, &mut status, &mut b, &last, now()).unwrap();
        assert_eq!(status.used.data_credits, 1.0);
        assert_eq!(a.denial.unwrap().reason, DenialReason::Exhausted);
    }

    #[test]
    fn the_actions_meter_limits_too() {
        let spec = spec(None, Some(5));
        let mut status = period_status();
        let mut b = breaker();
        let r = LeaseRequest {
            ask: cost(1000.0, 8),
            row_cost: cost(1.0, 2),
            ..request("l", 1)
        };
        assert_eq!(
            apply(&spec, &mut status, &mut b, &r, now())
                .unwrap()
                .granted,
            cost(2.0, 4),
            "whole rows only: two rows of 2 actions fit in 5"
        );
        let more = LeaseRequest {
            ask: cost(1.0, 2),
            row_cost: cost(1.0, 2),
            ..request("l", 2)
        };
        let denied = apply(&spec, &mut status, &mut b, &more, now()).unwrap();
        assert_eq!(denied.denial.unwrap().reason, DenialReason::Exhausted);
    }

    #[test]
    fn an_abandoned_lease_is_forfeited_as_spent_and_release_closes_one() {
        let spec = spec(Some(100.0), None);
        let mut status = period_status();
        let mut b = breaker();
        apply(&spec, &mut status, &mut b, &ask("l", 1, 40.0), now()).unwrap();
        assert!(expire(&mut status, now() + SignedDuration::from_secs(59)).is_empty());
        assert_eq!(
            expire(&mut status, now() + SignedDuration::from_secs(61)).len(),
            1
        );
        assert_eq!(status.used, cost(40.0, 0));
        assert!(status.leases.is_empty());

        apply(&spec, &mut status, &mut b, &ask("m", 1, 12.0), now()).unwrap();
        let done = LeaseRequest {
            give_back: cost(12.0, 0),
            release: true,
            ..request("m", 2)
        };
        apply(&spec, &mut status, &mut b, &done, now()).unwrap();
        assert!(status.leases.is_empty());
        assert_eq!(status.used, cost(40.0, 0), "given back, nothing forfeited");
    }

    #[test]
    fn paused_and_an_open_breaker_are_reported_even_without_an_ask() {
        let mut paused = spec(Some(100.0), None);
        paused.paused = true;
        let mut status = period_status();
        let mut b = breaker();
        let a = apply(&paused, &mut status, &mut b, &request("l", 1), now()).unwrap();
        assert_eq!(a.denial.unwrap().reason, DenialReason::Paused);
        assert_eq!(status.denials, 0, "no ask, no denial counted");
        let mut open = Breaker::new(BreakerState::Open, now());
        let a = apply(
            &spec(Some(100.0), None),
            &mut status,
            &mut open,
            &ask("l", 2, 4.0),
            now(),
        )
        .unwrap();
        assert_eq!(a.denial.unwrap().reason, DenialReason::BreakerOpen);
        assert_eq!(status.denials, 1);
    }

    #[test]
    fn refusing_rows_names_what_remains_and_what_a_row_needs() {
        let spec = spec(Some(10.0), None);
        let mut status = period_status();
        let mut b = breaker();
        apply(&spec, &mut status, &mut b, &request("l", 1), now()).unwrap();
        assert_eq!(refusing_rows(&spec, &status), None, "10 left, rows of 4");
        // 8 held by the lease: 2 left for anyone else.
        apply(&spec, &mut status, &mut b, &ask("l", 2, 8.0), now()).unwrap();
        assert_eq!(
            refusing_rows(&spec, &status).as_deref(),
            Some("2 data credits remain, one row needs 4")
        );
        let give_back = LeaseRequest {
            give_back: cost(8.0, 0),
            ..request("l", 3)
        };
        apply(&spec, &mut status, &mut b, &give_back, now()).unwrap();
        assert_eq!(refusing_rows(&spec, &status), None);
    }
}
