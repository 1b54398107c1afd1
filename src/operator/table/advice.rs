//! Kiln's tier matrix and failure table applied to what a table does: the
//! TierFit and CallbacksArriving conditions, from the observed volume
//! ([`super::volume`]), and Fresh, from its oldest enriched row and its
//! RefreshSchedules. Pure functions: (holds, reason, message).

use crate::api::table::{Tier, TierAdvice};

use super::volume::VolumeView;

pub const TIER_FIT: &str = "TierFit";
pub const CALLBACKS_ARRIVING: &str = "CallbacksArriving";
pub const FRESH: &str = "Fresh";

/// Whether enriched data is kept fresh: rows older than `staleAfter` with no
/// RefreshSchedule to redo them, or with every schedule's last run skipped
/// for the budget, is the stale-data failure.
pub fn fresh(
    advice: &TierAdvice,
    schedules: &[String],
    skipping_for_budget: &[String],
    oldest_enriched: Option<jiff::Timestamp>,
    now: jiff::Timestamp,
) -> (bool, &'static str, String) {
    if !schedules.is_empty() && schedules.iter().all(|s| skipping_for_budget.contains(s)) {
        return (
            false,
            "RefreshSkippedForBudget",
            format!(
                "the last run of RefreshSchedule {} was skipped for the budget (exhausted, paused or its breaker open), so stale rows are not re-enriched: raise the CreditBudget's limit, close its breaker, or lower the schedule's maxCredits",
                schedules.join(", ")
            ),
        );
    }
    if !schedules.is_empty() {
        return (
            true,
            "RefreshScheduled",
            format!(
                "RefreshSchedule {} re-enriches stale rows",
                schedules.join(", ")
            ),
        );
    }
    let stale_after = jiff::SignedDuration::try_from(std::time::Duration::from(advice.stale_after))
        .unwrap_or(jiff::SignedDuration::MAX);
    match oldest_enriched {
        Some(oldest) if now.duration_since(oldest) > stale_after => (
            false,
            "StaleRows",
            format!(
                "the oldest enriched row dates from {oldest}, older than {} (tierAdvice.staleAfter), and no RefreshSchedule re-enriches rows: add one (examples/queue.yaml has a weekly refresh)",
                advice.stale_after
            ),
        ),
        _ => (
            true,
            "RowsFresh",
            format!("no enriched row is older than {}", advice.stale_after),
        ),
    }
}

/// Whether the table's tier fits its observed volume.
pub fn tier_fit(
    tier: Tier,
    advice: &TierAdvice,
    volume: Option<&VolumeView>,
) -> (bool, &'static str, String) {
    let sustained = std::time::Duration::from(advice.sustained_for).as_secs() as i64;
    let Some(volume) = volume.filter(|v| v.observed_seconds >= sustained) else {
        return (
            true,
            "NotEnoughTraffic",
            format!(
                "judged once traffic has been observed for {} (tierAdvice.sustainedFor)",
                advice.sustained_for
            ),
        );
    };
    let per_day = volume.rows_per_day_recent;
    let seen = format!(
        "~{per_day} rows/day at the last hour's rate ({} in the last day)",
        volume.rows_last_day
    );
    match tier {
        Tier::Direct if per_day > advice.direct_max_rows_per_day => (
            false,
            "VolumeAboveTier",
            format!(
                "{seen}, above Direct's {}/day: move to tier Queue. Callers then get 202 and a row id at once instead of waiting for Clay in the request; results go to a sink (Redis Stream, HTTP or Kafka) instead of the HTTP answer, and rows wait in Redis when the budget is spent",
                advice.direct_max_rows_per_day
            ),
        ),
        Tier::Queue if per_day > advice.queue_max_rows_per_day => (
            false,
            "VolumeAboveTier",
            format!(
                "{seen}, above Queue's {}/day: move to tier Event. Rows then come from a Kafka topic and results and dead letters go to topics; workers scale with the consumer group's lag (KEDA)",
                advice.queue_max_rows_per_day
            ),
        ),
        Tier::Event if per_day < advice.event_min_rows_per_day => (
            false,
            "VolumeBelowTier",
            format!(
                "{seen}, below Event's {}/day: Kafka costs more than this volume needs; tier Queue (Redis Streams, an HTTP ingest endpoint) fits",
                advice.event_min_rows_per_day
            ),
        ),
        _ => (
            true,
            "VolumeWithinTier",
            format!("{seen}: within tier {tier:?}'s band"),
        ),
    }
}

/// Whether Clay's results come back for the rows sent: none for
/// `callbacksMissingAfterTimeouts` result timeouts while rows were sent
/// means the table's HTTP API column does not reach the receiver.
pub fn callbacks_arriving(
    advice: &TierAdvice,
    result_timeout: std::time::Duration,
    volume: Option<&VolumeView>,
    callback_url: &str,
) -> (bool, &'static str, String) {
    let window = result_timeout * advice.callbacks_missing_after_timeouts;
    match volume {
        Some(v)
            if v.observed_seconds >= window.as_secs() as i64
                && v.sent_recently > 0
                && v.results_recently == 0 =>
        {
            (
                false,
                "NoCallbacks",
                format!(
                    "{} rows were sent to Clay in the last {window:?} and no result came back: the table's HTTP API column must POST to {callback_url} with the x-kiln-token header (print the column with `kiln receiver --table NAMESPACE/TABLE --print-clay-template`), and the receiver must be reachable from Clay (ingress)",
                    v.sent_recently
                ),
            )
        }
        Some(v) if v.sent_recently > 0 => (
            true,
            "ResultsArriving",
            format!(
                "{} results came back for {} rows sent recently",
                v.results_recently, v.sent_recently
            ),
        ),
        _ => (
            true,
            "NoRecentRows",
            "no rows were sent to Clay recently".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn volume(per_day: u64, observed: i64, sent: u64, results: u64) -> VolumeView {
        VolumeView {
            rows_last_day: per_day / 24,
            results_last_day: results,
            rows_per_day_recent: per_day,
            observed_seconds: observed,
            sent_recently: sent,
            results_recently: results,
            result_latency_p50_ms: None,
            result_latency_p95_ms: None,
        }
    }

    #[test]
    fn the_matrix_moves_tables_up_and_down_once_the_volume_is_sustained() {
        let advice = TierAdvice::default();
        let busy = volume(3_000, 7_200, 10, 10);
        assert_eq!(
            tier_fit(Tier::Direct, &advice, Some(&busy)).1,
            "VolumeAboveTier"
        );
        assert!(
            tier_fit(Tier::Direct, &advice, Some(&busy))
                .2
                .contains("tier Queue")
        );
        assert_eq!(
            tier_fit(Tier::Queue, &advice, Some(&busy)).1,
            "VolumeWithinTier"
        );
        assert_eq!(
            tier_fit(Tier::Event, &advice, Some(&busy)).1,
            "VolumeBelowTier"
        );
        let huge = volume(80_000, 7_200, 10, 10);
        assert_eq!(
            tier_fit(Tier::Queue, &advice, Some(&huge)).1,
            "VolumeAboveTier"
        );
        assert!(tier_fit(Tier::Event, &advice, Some(&huge)).0);
        let brief = volume(80_000, 60, 10, 10);
        assert_eq!(
            tier_fit(Tier::Direct, &advice, Some(&brief)).1,
            "NotEnoughTraffic"
        );
        assert!(tier_fit(Tier::Direct, &advice, None).0);
    }

    #[test]
    fn old_rows_without_a_schedule_are_stale() {
        let advice = TierAdvice::default();
        let now: jiff::Timestamp = "2026-11-27T12:00:00Z".parse().unwrap();
        let old = now - jiff::SignedDuration::from_hours(24 * 100);
        let recent = now - jiff::SignedDuration::from_hours(24);
        assert_eq!(fresh(&advice, &[], &[], Some(old), now).1, "StaleRows");
        assert_eq!(fresh(&advice, &[], &[], Some(recent), now).1, "RowsFresh");
        assert_eq!(fresh(&advice, &[], &[], None, now).1, "RowsFresh");
        let weekly = ["weekly".to_string()];
        assert_eq!(
            fresh(&advice, &weekly, &[], Some(old), now).1,
            "RefreshScheduled"
        );
    }

    #[test]
    fn schedules_all_skipping_for_budget_leave_rows_stale() {
        let advice = TierAdvice::default();
        let now: jiff::Timestamp = "2026-11-27T12:00:00Z".parse().unwrap();
        let both = ["nightly".to_string(), "weekly".to_string()];
        let skipping = fresh(&advice, &both, &both, None, now);
        assert_eq!((skipping.0, skipping.1), (false, "RefreshSkippedForBudget"));
        assert!(skipping.2.contains("nightly, weekly"), "{}", skipping.2);
        // One schedule still running covers the table.
        let one = fresh(&advice, &both, &both[..1], None, now);
        assert_eq!((one.0, one.1), (true, "RefreshScheduled"));
    }

    #[test]
    fn results_missing_for_three_timeouts_mean_no_callbacks() {
        let advice = TierAdvice::default();
        let timeout = Duration::from_secs(30);
        let lost = volume(1_000, 600, 12, 0);
        let (holds, reason, message) =
            callbacks_arriving(&advice, timeout, Some(&lost), "http://r/cb");
        assert!(!holds);
        assert_eq!(reason, "NoCallbacks");
        assert!(message.contains("http://r/cb"), "{message}");
        let fine = volume(1_000, 600, 12, 11);
        assert!(callbacks_arriving(&advice, timeout, Some(&fine), "u").0);
        let young = volume(1_000, 60, 12, 0);
        assert!(
            callbacks_arriving(&advice, timeout, Some(&young), "u").0,
            "not judged before 90 s"
        );
        assert_eq!(
            callbacks_arriving(&advice, timeout, None, "u").1,
            "NoRecentRows"
        );
    }
}
