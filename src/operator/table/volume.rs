//! What each table's processes actually do, as the leader sees it in their
//! lease requests: rows sent to Clay and results that came back, per minute
//! over the last day, and how long results took, per minute over the last
//! hour. Pure bookkeeping; the table's status and its TierFit
//! and CallbacksArriving conditions are computed from it.

use std::collections::{BTreeMap, VecDeque};

use jiff::Timestamp;

use crate::contact::{Contact, Peer, REPEAT_FAILURE_EVERY};
use crate::ledger::ResultLatency;

/// A failure not repeated for this long is from a process that is gone
/// (a live one repeats it every [`REPEAT_FAILURE_EVERY`]).
fn stale(contact: &Contact, at: Timestamp, now: Timestamp) -> bool {
    matches!(contact, Contact::Unreachable(_))
        && now.duration_since(at).as_secs_f64() > 3.0 * REPEAT_FAILURE_EVERY.as_secs_f64()
}

/// Reports kept per table and service (the most recent holders').
const MAX_HOLDERS_PER_TABLE: usize = 64;
/// Minutes kept: one day.
const WINDOW_MINUTES: i64 = 24 * 60;
/// Minutes of result latencies kept: an hour.
const LATENCY_MINUTES: i64 = 60;

/// One table's per-minute counts.
#[derive(Clone, Debug, Default)]
struct Minutes {
    /// (minute since the epoch, rows sent, results back), oldest first.
    counts: VecDeque<(i64, u64, u64)>,
    /// (minute since the epoch, result latencies), oldest first.
    latencies: VecDeque<(i64, ResultLatency)>,
    /// When the leader first heard of the table's traffic.
    since: Option<Timestamp>,
}

/// What each holder (pod) last reported of one service, and when.
type HolderReports = BTreeMap<String, (Contact, Timestamp)>;

/// Every table's traffic, keyed by (namespace, table).
#[derive(Debug, Default)]
pub struct Volumes {
    tables: BTreeMap<(String, String), Minutes>,
    /// Whether each table's processes reach Clay, the store and Kafka: each
    /// holder's latest report and when it came.
    contacts: BTreeMap<(String, String, Peer), HolderReports>,
}

/// A table's traffic for its status.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeView {
    /// Rows sent to Clay over the last 24 hours (or since observed).
    pub rows_last_day: u64,
    /// Results that came back over the same window.
    pub results_last_day: u64,
    /// Rows a day at the recent rate: the last hour's rows × 24, or the
    /// rows since observation began, scaled to a day, when that is shorter.
    pub rows_per_day_recent: u64,
    /// How long the traffic has been observed (at most a day), in seconds.
    pub observed_seconds: i64,
    /// Rows sent and results back within `recent` of now (see [`Volumes::view`]).
    pub sent_recently: u64,
    pub results_recently: u64,
    /// Results' latency over the last hour, median and 95th percentile (the
    /// upper bounds of their buckets), in milliseconds.
    pub result_latency_p50_ms: Option<u64>,
    pub result_latency_p95_ms: Option<u64>,
}

impl Volumes {
    /// Records what one lease request reported.
    pub fn record(
        &mut self,
        namespace: &str,
        table: &str,
        sent: u64,
        results: u64,
        latency: &ResultLatency,
        now: Timestamp,
    ) {
        if sent == 0 && results == 0 && latency.is_empty() {
            return;
        }
        let minute = now.as_second().div_euclid(60);
        let entry = self
            .tables
            .entry((namespace.to_string(), table.to_string()))
            .or_default();
        entry.since.get_or_insert(now);
        match entry.counts.back_mut() {
            Some((m, s, r)) if *m == minute => {
                *s = s.saturating_add(sent);
                *r = r.saturating_add(results);
            }
            _ => entry.counts.push_back((minute, sent, results)),
        }
        while entry
            .counts
            .front()
            .is_some_and(|(m, _, _)| *m <= minute - WINDOW_MINUTES)
        {
            entry.counts.pop_front();
        }
        if !latency.is_empty() {
            match entry.latencies.back_mut() {
                Some((m, counts)) if *m == minute => counts.merge(latency),
                _ => entry.latencies.push_back((minute, latency.clone())),
            }
        }
        while entry
            .latencies
            .front()
            .is_some_and(|(m, _)| *m <= minute - LATENCY_MINUTES)
        {
            entry.latencies.pop_front();
        }
    }

    /// The table's traffic, or None when none was seen in the last day.
    /// `recent`: the window for the sent/results pair (e.g. a few result
    /// timeouts).
    pub fn view(
        &self,
        namespace: &str,
        table: &str,
        now: Timestamp,
        recent: std::time::Duration,
    ) -> Option<VolumeView> {
        let entry = self
            .tables
            .get(&(namespace.to_string(), table.to_string()))?;
        let now_minute = now.as_second().div_euclid(60);
        let within = |minutes: i64| {
            entry
                .counts
                .iter()
                .filter(move |(m, _, _)| *m > now_minute - minutes)
        };
        let rows_last_day: u64 = within(WINDOW_MINUTES).map(|(_, s, _)| s).sum();
        let results_last_day: u64 = within(WINDOW_MINUTES).map(|(_, _, r)| r).sum();
        if rows_last_day == 0 && within(WINDOW_MINUTES).all(|(_, _, r)| *r == 0) {
            return None;
        }
        let since = entry.since.unwrap_or(now);
        let observed_seconds = (now - since).get_seconds().clamp(0, WINDOW_MINUTES * 60);
        // The last hour, or the whole observation when shorter (at least a minute).
        let span_minutes = (observed_seconds / 60 + 1).clamp(1, 60);
        let rows_in_span: u64 = within(span_minutes).map(|(_, s, _)| s).sum();
        let rows_per_day_recent =
            rows_in_span.saturating_mul(WINDOW_MINUTES as u64) / span_minutes as u64;
        let recent_minutes = ((recent.as_secs() as i64 + 59) / 60).max(1);
        let (sent_recently, results_recently) =
            within(recent_minutes).fold((0, 0), |(s, r), (_, ds, dr)| (s + ds, r + dr));
        let mut latency = ResultLatency::default();
        for (_, counts) in entry
            .latencies
            .iter()
            .filter(|(m, _)| *m > now_minute - LATENCY_MINUTES)
        {
            latency.merge(counts);
        }
        Some(VolumeView {
            rows_last_day,
            results_last_day,
            rows_per_day_recent,
            observed_seconds,
            sent_recently,
            results_recently,
            result_latency_p50_ms: latency.quantile_ms(0.5),
            result_latency_p95_ms: latency.quantile_ms(0.95),
        })
    }

    /// Records what one of a table's processes (`holder`) last saw of
    /// `peer`; true when that changes the table's verdict (see [`Self::contact`]).
    pub fn record_contact(
        &mut self,
        (namespace, table): (&str, &str),
        peer: Peer,
        holder: &str,
        contact: Contact,
        now: Timestamp,
    ) -> bool {
        let before = self.contact(namespace, table, peer, now);
        let key = (namespace.to_string(), table.to_string(), peer);
        let holders = self.contacts.entry(key).or_default();
        holders.insert(holder.to_string(), (contact, now));
        // Holders come and go with pods: keep the table's map small.
        holders.retain(|_, (contact, at)| !stale(contact, *at, now));
        while holders.len() > MAX_HOLDERS_PER_TABLE {
            let oldest = holders
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(holder, _)| holder.clone());
            holders.remove(&oldest.expect("not empty"));
        }
        before != self.contact(namespace, table, peer, now)
    }

    /// Whether the table's processes reach `peer`: unreachable while any
    /// of them reported a failure it still repeats, answered when one was
    /// answered, unknown when none said.
    pub fn contact(
        &self,
        namespace: &str,
        table: &str,
        peer: Peer,
        now: Timestamp,
    ) -> Option<Contact> {
        let holders = self
            .contacts
            .get(&(namespace.to_string(), table.to_string(), peer))?;
        let live = || holders.values().filter(|(c, at)| !stale(c, *at, now));
        live()
            .find(|(c, _)| matches!(c, Contact::Unreachable(_)))
            .or_else(|| live().next())
            .map(|(c, _)| c.clone())
    }

    /// Whether a failure reported by some process may still end without
    /// news (the process gone): the table is looked at again soon.
    pub fn failure_reported(&self, namespace: &str, table: &str, now: Timestamp) -> bool {
        Peer::ALL.into_iter().any(|peer| {
            matches!(
                self.contact(namespace, table, peer, now),
                Some(Contact::Unreachable(_))
            )
        })
    }

    /// Tables with traffic in the last hour (their status is refreshed sooner).
    pub fn active(&self, namespace: &str, table: &str, now: Timestamp) -> bool {
        let now_minute = now.as_second().div_euclid(60);
        self.tables
            .get(&(namespace.to_string(), table.to_string()))
            .and_then(|t| t.counts.back())
            .is_some_and(|(m, _, _)| *m > now_minute - 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    #[test]
    fn a_steady_rate_extrapolates_to_a_day_and_old_minutes_fall_out() {
        let mut volumes = Volumes::default();
        // One row a second for ten minutes.
        for s in 0..600 {
            volumes.record("ns", "t", 1, 1, &ResultLatency::default(), at(s));
        }
        let view = volumes
            .view("ns", "t", at(600), Duration::from_secs(120))
            .unwrap();
        assert_eq!(view.rows_last_day, 600);
        assert_eq!(view.results_last_day, 600);
        assert!(
            (70_000..=90_000).contains(&view.rows_per_day_recent),
            "≈86,400 a day: {view:?}"
        );
        assert_eq!(view.observed_seconds, 600);
        assert!(view.sent_recently >= 60 && view.results_recently == view.sent_recently);
        // A day later nothing is left.
        assert_eq!(
            volumes.view("ns", "t", at(600 + 86_400), Duration::from_secs(60)),
            None
        );
        assert!(!volumes.active("ns", "t", at(600 + 3_700)));
        assert!(volumes.active("ns", "t", at(700)));
    }

    #[test]
    fn results_that_stop_coming_show_in_the_recent_pair() {
        let mut volumes = Volumes::default();
        for s in 0..300 {
            volumes.record("ns", "t", 2, 0, &ResultLatency::default(), at(s));
        }
        let view = volumes
            .view("ns", "t", at(300), Duration::from_secs(90))
            .unwrap();
        assert!(view.sent_recently > 0);
        assert_eq!(view.results_recently, 0);
        assert_eq!((view.rows_last_day, view.results_last_day), (600, 0));
        assert_eq!(
            volumes.view("ns", "other", at(300), Duration::from_secs(90)),
            None
        );
    }

    #[test]
    fn result_latency_is_judged_over_the_last_hour() {
        let mut volumes = Volumes::default();
        let slow = |n: u64| {
            let mut latency = ResultLatency::default();
            for _ in 0..n {
                latency.record(Duration::from_secs(20));
            }
            latency
        };
        let quick = |n: u64| {
            let mut latency = ResultLatency::default();
            for _ in 0..n {
                latency.record(Duration::from_millis(80));
            }
            latency
        };
        // An hour of slow results, then ten minutes of quick ones.
        volumes.record("ns", "t", 10, 10, &slow(10), at(0));
        for minute in 1..=10 {
            volumes.record("ns", "t", 10, 10, &quick(10), at(3_600 + 60 * minute));
        }
        let view = volumes
            .view("ns", "t", at(3_600 + 600), Duration::from_secs(60))
            .unwrap();
        assert_eq!(view.result_latency_p50_ms, Some(100));
        assert_eq!(
            view.result_latency_p95_ms,
            Some(100),
            "the slow minute fell out"
        );
        // Within the hour both count: 10 slow of 110 puts p95 among them.
        volumes.record("ns", "t", 10, 10, &slow(10), at(3_600 + 660));
        let view = volumes
            .view("ns", "t", at(3_600 + 660), Duration::from_secs(60))
            .unwrap();
        assert_eq!(view.result_latency_p50_ms, Some(100));
        assert_eq!(view.result_latency_p95_ms, Some(30_000));
    }

    #[test]
    fn one_failing_process_is_not_hidden_by_another_that_answers() {
        let mut volumes = Volumes::default();
        let down = Contact::Unreachable("redis:6379: connection refused".into());
        let table = ("ns", "t");
        assert!(volumes.record_contact(table, Peer::Store, "receiver", Contact::Answered, at(0)));
        assert!(volumes.record_contact(table, Peer::Store, "worker", down.clone(), at(1)));
        // The receiver still answers: no news, and the verdict stays down.
        assert!(!volumes.record_contact(table, Peer::Store, "receiver", Contact::Answered, at(2)));
        assert_eq!(
            volumes.contact("ns", "t", Peer::Store, at(2)),
            Some(down.clone())
        );
        assert!(volumes.failure_reported("ns", "t", at(2)));
        assert_eq!(
            volumes.contact("ns", "t", Peer::Kafka, at(2)),
            None,
            "apart by service"
        );
        // The worker recovers.
        assert!(volumes.record_contact(table, Peer::Store, "worker", Contact::Answered, at(3)));
        assert!(!volumes.failure_reported("ns", "t", at(3)));
        // A worker that fails and then goes away stops counting once its
        // failure is no longer repeated.
        volumes.record_contact(table, Peer::Store, "worker-2", down.clone(), at(10));
        assert_eq!(volumes.contact("ns", "t", Peer::Store, at(60)), Some(down));
        assert_eq!(
            volumes.contact("ns", "t", Peer::Store, at(10 + 91)),
            Some(Contact::Answered)
        );
    }

    #[test]
    fn reports_are_kept_for_a_bounded_number_of_holders() {
        let mut volumes = Volumes::default();
        for pod in 0..500 {
            volumes.record_contact(
                ("ns", "t"),
                Peer::Clay,
                &format!("worker-{pod}"),
                Contact::Answered,
                at(pod),
            );
        }
        let holders = &volumes.contacts[&("ns".to_string(), "t".to_string(), Peer::Clay)];
        assert_eq!(holders.len(), MAX_HOLDERS_PER_TABLE);
        assert!(holders.contains_key("worker-499") && !holders.contains_key("worker-0"));
    }
}
