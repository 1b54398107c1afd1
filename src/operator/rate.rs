//! Clay's rate limit, shared: every data-plane process that submits rows
//! holds a share of its Clay workspace's rows-per-second, leased from the
//! leader with its credits (one request, one renewal, one expiry).
//!
//! Why leases and not a Redis-side limiter: every tier already talks to the
//! leader once a second while busy, and only the Queue tier has Redis; a
//! share decided centrally also follows demand across tables, which a
//! shared bucket cannot do fairly. Shares are in memory only: a new leader
//! rebuilds them from what holders report holding, so nothing is written to
//! the API server for them.
//!
//! The split is max-min fair, in two levels: the workspace's rate among its
//! tables (each capped by its own `clay.rateLimit`), then each table's part
//! among its processes, by what each wants (its cap while rows wait for
//! rate, else what it sent plus headroom). Every holder keeps a small idle
//! allowance so a process that wakes up can start at once. A share is only
//! raised into rate other holders have given up: a holder is lowered when
//! it next asks (within a second while busy), so the shares in force never
//! add up to more than the workspace's limit.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::leader::Succession;
use crate::clay::limiter::Rate;
use crate::ledger::{RATE_SHARE_TTL, RateReport, RateShare};

/// A holder not heard from for this long is gone (the lease's life).
const HOLDER_TTL: Duration = Duration::from_secs(60);
/// A leader that took over raises nobody's share for this long, while every
/// holder reports what it holds (busy ones report every 250 ms; one retrying
/// after errors within 5 s), and shares granted by the old leader run out.
/// The first leader has no old shares to wait out.
const WARM_UP: Duration = Duration::from_secs(10);
/// Part of the workspace's rate kept as idle allowances, split among holders.
const IDLE_PART: f64 = 0.01;
/// How far back 429s and submissions are counted for status.
const WINDOW: Duration = Duration::from_secs(60);
/// A rate report older than this says nothing about the current rate.
const OBSERVED_FRESH: Duration = Duration::from_secs(5);

/// Which processes share a limit: a Clay workspace named on a budget (its
/// namespace's budgets naming it share it), or one table by itself.
pub fn workspace_key(namespace: &str, workspace: Option<&str>, table: &str) -> String {
    match workspace {
        Some(name) => format!("{namespace}/workspace/{name}"),
        None => format!("{namespace}/table/{table}"),
    }
}

/// One holder's request for a share.
pub struct Ask<'a> {
    pub workspace: String,
    /// The workspace's limit as this holder's budget declares it.
    pub limit: Rate,
    /// The table's own `clay.rateLimit`.
    pub cap: Rate,
    pub namespace: &'a str,
    pub table: &'a str,
    pub holder: &'a str,
    pub report: &'a RateReport,
    pub release: bool,
}

/// What the table's status says about its rate.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TableRate {
    pub workspace_limit: f64,
    pub share: f64,
    pub observed: f64,
    pub holders: u32,
    pub submitted_last_minute: u64,
    pub throttled_last_minute: u64,
}

#[derive(Clone, Hash, PartialEq, Eq, Debug)]
struct HolderKey {
    namespace: String,
    table: String,
    holder: String,
}

impl Holder {
    /// The most this holder may be sending at now: its share while it is
    /// renewed, its fallback once it has not been for [`RATE_SHARE_TTL`]
    /// (it dropped to it by itself, or it is gone).
    fn committed(&self, now: Instant) -> f64 {
        if now.duration_since(self.seen) < RATE_SHARE_TTL {
            self.granted
        } else {
            self.granted.min(self.fallback)
        }
    }
}

struct Holder {
    limit: Rate,
    cap: Rate,
    wanted: f64,
    /// The share last granted (at first, what the holder says it holds):
    /// the most it may be sending at now, as it applies an answer the
    /// moment it arrives.
    granted: f64,
    /// The fallback it was given with it.
    fallback: f64,
    observed: f64,
    seen: Instant,
    /// (when, submitted, throttled) per report, for the last [`WINDOW`].
    history: VecDeque<(Instant, u64, u64)>,
}

/// Every workspace's holders and their shares (the leader's, in memory).
pub struct RateShares {
    /// Until then shares are held where they are (see [`WARM_UP`]).
    warm_until: Instant,
    workspaces: HashMap<String, HashMap<HolderKey, Holder>>,
}

impl RateShares {
    pub fn new(now: Instant, succession: Succession) -> Self {
        Self {
            warm_until: match succession {
                Succession::First => now,
                Succession::TookOver => now + WARM_UP,
            },
            workspaces: HashMap::new(),
        }
    }

    /// Records the holder's report and decides its share.
    pub fn share(&mut self, ask: Ask, now: Instant) -> Option<RateShare> {
        let key = HolderKey {
            namespace: ask.namespace.to_string(),
            table: ask.table.to_string(),
            holder: ask.holder.to_string(),
        };
        let holders = self.workspaces.entry(ask.workspace.clone()).or_default();
        holders.retain(|_, h| now.duration_since(h.seen) < HOLDER_TTL);
        if ask.release {
            holders.remove(&key);
            if holders.is_empty() {
                self.workspaces.remove(&ask.workspace);
            }
            return None;
        }
        let report = ask.report;
        let holder = holders.entry(key.clone()).or_insert_with(|| Holder {
            limit: ask.limit,
            cap: ask.cap,
            wanted: 0.0,
            granted: report.held,
            fallback: 0.0,
            observed: 0.0,
            seen: now,
            history: VecDeque::new(),
        });
        holder.limit = ask.limit;
        holder.cap = ask.cap;
        holder.wanted = report.wanted.min(ask.cap.per_second);
        holder.observed = if report.seconds > 0.0 {
            report.submitted as f64 / report.seconds
        } else {
            0.0
        };
        holder.seen = now;
        holder
            .history
            .push_back((now, report.submitted, report.throttled));
        while holder
            .history
            .front()
            .is_some_and(|(at, _, _)| now.duration_since(*at) > WINDOW)
        {
            holder.history.pop_front();
        }

        // The smallest limit any budget of the workspace declares holds.
        let limit = holders
            .values()
            .map(|h| h.limit)
            .fold(ask.limit, |a, b| Rate {
                per_second: a.per_second.min(b.per_second),
                burst: a.burst.min(b.burst),
            });
        let idle = limit.per_second * IDLE_PART / holders.len() as f64;
        let fair = fair_shares(limit.per_second, idle, holders, now);
        let others = |same_table: bool| -> f64 {
            holders
                .iter()
                .filter(|(k, _)| **k != key && (!same_table || k.table == key.table))
                .map(|(_, h)| h.committed(now))
                .sum()
        };
        let mut grant = fair[&key]
            .min(limit.per_second - others(false))
            .min(ask.cap.per_second - others(true))
            .max(0.0);
        if now < self.warm_until {
            grant = grant.min(report.held.max(idle));
        }
        let fallback = (limit.per_second / (holders.len() as f64 + 1.0)).min(grant);
        let holder = holders.get_mut(&key).expect("inserted above");
        holder.granted = grant;
        holder.fallback = fallback;
        Some(RateShare {
            rows_per_second: grant,
            burst: (limit.burst * grant / limit.per_second).max(1.0),
            idle_rows_per_second: idle,
            fallback_rows_per_second: fallback,
        })
    }

    /// The table's share, observed rate and Clay's 429s, when any process
    /// of it holds a share.
    pub fn table_view(&self, namespace: &str, table: &str, now: Instant) -> Option<TableRate> {
        let mut view: Option<TableRate> = None;
        for holders in self.workspaces.values() {
            for (key, holder) in holders {
                if key.namespace != namespace
                    || key.table != table
                    || now.duration_since(holder.seen) >= HOLDER_TTL
                {
                    continue;
                }
                let view = view.get_or_insert_with(TableRate::default);
                view.workspace_limit = holder.limit.per_second;
                view.share += holder.committed(now);
                if now.duration_since(holder.seen) < OBSERVED_FRESH {
                    view.observed += holder.observed;
                }
                view.holders += 1;
                for (at, submitted, throttled) in &holder.history {
                    if now.duration_since(*at) <= WINDOW {
                        view.submitted_last_minute += submitted;
                        view.throttled_last_minute += throttled;
                    }
                }
            }
        }
        view
    }
}

/// Max-min fair shares of `capacity` for `demands`: nobody gets more than
/// it wants, and what one does not want is split among the others.
fn water_fill(capacity: f64, demands: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by(|a, b| demands[*a].total_cmp(&demands[*b]));
    let mut shares = vec![0.0; demands.len()];
    let mut left = capacity.max(0.0);
    for (served, index) in order.iter().enumerate() {
        let even = left / (demands.len() - served) as f64;
        let share = demands[*index].max(0.0).min(even);
        shares[*index] = share;
        left -= share;
    }
    shares
}

/// The fair share of every holder: the workspace's rate among its tables
/// (each at most its cap), then each table's part among its holders.
fn fair_shares(
    limit: f64,
    idle: f64,
    holders: &HashMap<HolderKey, Holder>,
    now: Instant,
) -> HashMap<HolderKey, f64> {
    let mut tables: HashMap<(&str, &str), Vec<(&HolderKey, f64)>> = HashMap::new();
    for (key, holder) in holders {
        // A holder that stopped renewing wants no more than it still holds.
        let demand = if now.duration_since(holder.seen) < RATE_SHARE_TTL {
            holder.wanted.max(idle).min(holder.cap.per_second)
        } else {
            holder.committed(now)
        };
        tables
            .entry((&key.namespace, &key.table))
            .or_default()
            .push((key, demand));
    }
    let tables: Vec<_> = tables.into_values().collect();
    let table_demands: Vec<f64> = tables
        .iter()
        .map(|members| {
            let cap = holders[members[0].0].cap.per_second;
            members.iter().map(|(_, d)| d).sum::<f64>().min(cap)
        })
        .collect();
    let table_shares = water_fill(limit, &table_demands);
    let mut fair = HashMap::new();
    for (members, share) in tables.iter().zip(table_shares) {
        let demands: Vec<f64> = members.iter().map(|(_, d)| *d).collect();
        for ((key, _), holder_share) in members.iter().zip(water_fill(share, &demands)) {
            fair.insert((*key).clone(), holder_share);
        }
    }
    fair
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORKSPACE: Rate = Rate {
        per_second: 10.0,
        burst: 20.0,
    };

    fn report(wanted: f64, held: f64) -> RateReport {
        RateReport {
            wanted,
            held,
            submitted: 0,
            throttled: 0,
            seconds: 1.0,
        }
    }

    fn ask<'a>(table: &'a str, holder: &'a str, report: &'a RateReport) -> Ask<'a> {
        Ask {
            workspace: workspace_key("sales", Some("acme"), table),
            limit: WORKSPACE,
            cap: Rate {
                per_second: 1000.0,
                burst: 1000.0,
            },
            namespace: "sales",
            table,
            holder,
            report,
            release: false,
        }
    }

    /// Every holder asks in turn, reporting what it was granted, until the
    /// shares settle; returns them.
    fn settle(shares: &mut RateShares, holders: &[(&str, &str, f64)], now: Instant) -> Vec<f64> {
        let mut held = vec![0.0; holders.len()];
        for _round in 0..6 {
            for (i, (table, holder, wanted)) in holders.iter().enumerate() {
                let r = report(*wanted, held[i]);
                held[i] = shares
                    .share(ask(table, holder, &r), now)
                    .unwrap()
                    .rows_per_second;
                let total: f64 = held.iter().sum();
                assert!(
                    total <= WORKSPACE.per_second + 1e-9,
                    "shares in force {held:?} exceed the limit"
                );
            }
        }
        held
    }

    fn after_warm_up() -> (RateShares, Instant) {
        let start = Instant::now();
        (
            RateShares::new(start, Succession::TookOver),
            start + WARM_UP,
        )
    }

    #[test]
    fn busy_replicas_of_one_table_split_the_limit_evenly() {
        let (mut shares, now) = after_warm_up();
        let held = settle(
            &mut shares,
            &[
                ("leads", "a", 1000.0),
                ("leads", "b", 1000.0),
                ("leads", "c", 1000.0),
            ],
            now,
        );
        for share in &held {
            assert!((share - 10.0 / 3.0).abs() < 1e-6, "{held:?}");
        }
    }

    #[test]
    fn an_idle_replica_keeps_only_its_allowance_and_the_busy_one_gets_the_rest() {
        let (mut shares, now) = after_warm_up();
        let held = settle(
            &mut shares,
            &[("leads", "a", 1000.0), ("leads", "b", 0.0)],
            now,
        );
        let idle = 10.0 * IDLE_PART / 2.0;
        assert!((held[1] - idle).abs() < 1e-9, "{held:?}");
        assert!((held[0] - (10.0 - idle)).abs() < 1e-9, "{held:?}");
    }

    #[test]
    fn tables_of_a_workspace_share_it_fairly_and_within_their_caps() {
        let (mut shares, now) = after_warm_up();
        let held = settle(
            &mut shares,
            &[
                ("leads", "a", 1000.0),
                ("leads", "b", 1000.0),
                ("accounts", "c", 1000.0),
                ("accounts", "d", 1000.0),
            ],
            now,
        );
        let leads = held[0] + held[1];
        let accounts = held[2] + held[3];
        assert!(
            (leads - 5.0).abs() < 1e-6 && (accounts - 5.0).abs() < 1e-6,
            "{held:?}"
        );

        // A table capped at 2 rows/s leaves the rest to the other.
        let (mut shares, now) = after_warm_up();
        let small = report(1000.0, 0.0);
        let mut capped = ask("accounts", "c", &small);
        capped.cap = Rate {
            per_second: 2.0,
            burst: 2.0,
        };
        let mut held = [0.0; 2];
        for _ in 0..4 {
            let r = report(1000.0, held[0]);
            held[0] = shares
                .share(ask("leads", "a", &r), now)
                .unwrap()
                .rows_per_second;
            let r = report(1000.0, held[1]);
            let mut c = ask("accounts", "c", &r);
            c.cap = capped.cap;
            held[1] = shares.share(c, now).unwrap().rows_per_second;
        }
        assert!(
            (held[1] - 2.0).abs() < 1e-9 && (held[0] - 8.0).abs() < 1e-9,
            "{held:?}"
        );
    }

    #[test]
    fn a_new_holder_is_raised_only_into_rate_others_gave_up() {
        let (mut shares, now) = after_warm_up();
        let held = settle(&mut shares, &[("leads", "a", 1000.0)], now);
        assert!((held[0] - 10.0).abs() < 1e-9);
        // b arrives wanting everything: a still holds 10, so b gets nothing yet.
        let r = report(1000.0, 0.0);
        let first = shares.share(ask("leads", "b", &r), now).unwrap();
        assert_eq!(first.rows_per_second, 0.0);
        // a asks again and is lowered to half; then b gets the other half.
        let r = report(1000.0, 10.0);
        let a = shares.share(ask("leads", "a", &r), now).unwrap();
        assert!((a.rows_per_second - 5.0).abs() < 1e-9);
        let r = report(1000.0, 0.0);
        let b = shares.share(ask("leads", "b", &r), now).unwrap();
        assert!((b.rows_per_second - 5.0).abs() < 1e-9);
        // Bursts are split the same way.
        assert!((b.burst - 10.0).abs() < 1e-9);
    }

    #[test]
    fn a_leader_that_took_over_raises_nobody_until_holders_reported() {
        let start = Instant::now();
        let mut shares = RateShares::new(start, Succession::TookOver);
        // A holder that held 3 rows/s under the old leader keeps 3, not 10.
        let r = report(1000.0, 3.0);
        let share = shares.share(ask("leads", "a", &r), start).unwrap();
        assert_eq!(share.rows_per_second, 3.0);
        let share = shares
            .share(ask("leads", "a", &r), start + WARM_UP)
            .unwrap();
        assert_eq!(share.rows_per_second, 10.0);
    }

    #[test]
    fn the_first_leader_raises_shares_at_once() {
        let start = Instant::now();
        let mut shares = RateShares::new(start, Succession::First);
        let r = report(1000.0, 3.0);
        let share = shares.share(ask("leads", "a", &r), start).unwrap();
        assert_eq!(share.rows_per_second, 10.0);
    }
    #[test]
    fn departed_and_silent_holders_free_their_share() {
        let (mut shares, now) = after_warm_up();
        settle(
            &mut shares,
            &[("leads", "a", 1000.0), ("leads", "b", 1000.0)],
            now,
        );
        let r = report(0.0, 5.0);
        let mut release = ask("leads", "a", &r);
        release.release = true;
        assert!(shares.share(release, now).is_none());
        let r = report(1000.0, 5.0);
        let b = shares.share(ask("leads", "b", &r), now).unwrap();
        assert!((b.rows_per_second - 10.0).abs() < 1e-9);

        // A killed holder's share shrinks to its fallback once it was not
        // renewed in time, and is freed once its lease would have expired.
        let (mut shares, now) = after_warm_up();
        settle(
            &mut shares,
            &[("leads", "a", 1000.0), ("leads", "b", 1000.0)],
            now,
        );
        let later = now + RATE_SHARE_TTL;
        let r = report(1000.0, 5.0);
        let b = shares.share(ask("leads", "b", &r), later).unwrap();
        assert!(
            (b.rows_per_second - (10.0 - 10.0 / 3.0)).abs() < 1e-9,
            "{b:?}"
        );
        let (mut shares, now) = after_warm_up();
        settle(
            &mut shares,
            &[("leads", "a", 1000.0), ("leads", "b", 1000.0)],
            now,
        );
        let later = now + HOLDER_TTL;
        let b = shares.share(ask("leads", "b", &r), later).unwrap();
        assert!((b.rows_per_second - 10.0).abs() < 1e-9);
        assert_eq!(
            shares.table_view("sales", "leads", later).unwrap().holders,
            1
        );
    }

    #[test]
    fn the_smallest_declared_limit_of_a_workspace_holds() {
        let (mut shares, now) = after_warm_up();
        let r = report(1000.0, 0.0);
        let mut strict = ask("accounts", "c", &r);
        strict.limit = Rate {
            per_second: 4.0,
            burst: 4.0,
        };
        shares.share(strict, now);
        let a = shares.share(ask("leads", "a", &r), now).unwrap();
        assert!(a.rows_per_second <= 4.0, "{a:?}");
    }

    #[test]
    fn the_table_view_sums_shares_and_counts_429s_of_the_last_minute() {
        let (mut shares, now) = after_warm_up();
        let busy = RateReport {
            wanted: 1000.0,
            held: 0.0,
            submitted: 50,
            throttled: 5,
            seconds: 10.0,
        };
        shares.share(ask("leads", "a", &busy), now);
        shares.share(ask("leads", "b", &busy), now);
        let view = shares.table_view("sales", "leads", now).unwrap();
        assert_eq!(view.holders, 2);
        assert_eq!(view.submitted_last_minute, 100);
        assert_eq!(view.throttled_last_minute, 10);
        assert!((view.observed - 10.0).abs() < 1e-9);
        assert!(view.share <= 10.0);
        let later = now + WINDOW + Duration::from_secs(1);
        let quiet = report(0.0, 0.0);
        shares.share(ask("leads", "a", &quiet), later);
        let view = shares.table_view("sales", "leads", later).unwrap();
        assert_eq!((view.holders, view.throttled_last_minute), (1, 0));
        assert!(shares.table_view("sales", "other", later).is_none());
    }

    #[test]
    fn water_filling_gives_nobody_more_than_it_wants() {
        assert_eq!(water_fill(10.0, &[1.0, 100.0, 100.0]), vec![1.0, 4.5, 4.5]);
        assert_eq!(water_fill(10.0, &[1.0, 2.0]), vec![1.0, 2.0]);
        assert!(water_fill(10.0, &[]).is_empty());
    }
}
