//! When a budget runs out at the rate it is spent: the leader samples the
//! credits used as it writes the budget, and projects the last hour's burn
//! onto what remains of the limit and the period.

use std::collections::VecDeque;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::budget::BudgetForecast;

/// Samples at most this often...
const SAMPLE_EVERY: SignedDuration = SignedDuration::from_secs(5);
/// ... kept this long for the recent rate,
const RECENT: SignedDuration = SignedDuration::from_hours(1);
/// and every five minutes for the day's rate.
const COARSE_EVERY: SignedDuration = SignedDuration::from_mins(5);
const DAY: SignedDuration = SignedDuration::from_hours(24);

/// One budget's used data credits over time.
#[derive(Clone, Debug, Default)]
pub struct BurnHistory {
    recent: VecDeque<(Timestamp, f64)>,
    day: VecDeque<(Timestamp, f64)>,
}

fn push(
    samples: &mut VecDeque<(Timestamp, f64)>,
    at: Timestamp,
    value: f64,
    every: SignedDuration,
    keep: SignedDuration,
) {
    if samples
        .back()
        .is_none_or(|(t, _)| at.duration_since(*t) >= every)
    {
        samples.push_back((at, value));
    }
    while samples
        .front()
        .is_some_and(|(t, _)| at.duration_since(*t) > keep)
    {
        samples.pop_front();
    }
}

/// Credits an hour from when spending began (the last sample of a flat
/// start: idle time before it is not the burn rate) to now.
fn per_hour(samples: &VecDeque<(Timestamp, f64)>, now: Timestamp, committed: f64) -> f64 {
    let Some(oldest) = samples.front() else {
        return 0.0;
    };
    let (since, first) = samples
        .iter()
        .take_while(|(_, v)| *v == oldest.1)
        .last()
        .unwrap_or(oldest);
    let hours = now.duration_since(*since).as_secs_f64() / 3600.0;
    if hours <= 0.0 {
        return 0.0;
    }
    ((committed - first) / hours).max(0.0)
}

impl BurnHistory {
    /// Records what is used now; a drop (a period rollover) starts over.
    pub fn observe(&mut self, at: Timestamp, used: f64) {
        if self.recent.back().is_some_and(|(_, v)| used < *v) {
            self.recent.clear();
            self.day.clear();
        }
        push(&mut self.recent, at, used, SAMPLE_EVERY, RECENT);
        push(&mut self.day, at, used, COARSE_EVERY, DAY);
    }

    /// The forecast for a budget with `remaining` data credits left and
    /// `period_end`; None until two samples span some time.
    pub fn forecast(
        &self,
        now: Timestamp,
        committed: f64,
        remaining: f64,
        period_end: Timestamp,
    ) -> Option<BudgetForecast> {
        let (since, _) = self.recent.front()?;
        if now.duration_since(*since) < SAMPLE_EVERY {
            return None;
        }
        let recent = per_hour(&self.recent, now, committed);
        let day =
            per_hour(&self.day, now, committed).max(if self.day.len() < 2 { recent } else { 0.0 });
        let exhausts_at = (recent > 0.0)
            .then(|| now + SignedDuration::from_secs_f64(remaining / recent * 3600.0))
            .filter(|at| *at < period_end);
        Some(BudgetForecast {
            data_credits_per_hour_last_hour: (recent * 10.0).round() / 10.0,
            data_credits_per_hour_last_day: (day * 10.0).round() / 10.0,
            // Whole seconds: the status does not churn on sub-second noise.
            exhausts_at: exhausts_at
                .and_then(|at| Timestamp::from_second(at.as_second()).ok())
                .map(Time),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    #[test]
    fn a_steady_burn_projects_the_exhaustion_time() {
        let mut history = BurnHistory::default();
        // 10 credits a second from 0, limit 1,000.
        for s in 0..=30 {
            history.observe(at(s), 10.0 * s as f64);
        }
        let forecast = history.forecast(at(30), 300.0, 700.0, at(86_400)).unwrap();
        assert_eq!(forecast.data_credits_per_hour_last_hour, 36_000.0);
        assert_eq!(forecast.exhausts_at, Some(Time(at(100))));
        // The same burn with a period ending sooner: not this period.
        let forecast = history.forecast(at(30), 300.0, 700.0, at(60)).unwrap();
        assert_eq!(forecast.exhausts_at, None);
    }

    #[test]
    fn nothing_spent_never_exhausts_and_a_rollover_starts_over() {
        let mut history = BurnHistory::default();
        assert!(history.forecast(at(0), 0.0, 10.0, at(100)).is_none());
        history.observe(at(0), 50.0);
        history.observe(at(60), 50.0);
        let forecast = history.forecast(at(60), 50.0, 10.0, at(1_000)).unwrap();
        assert_eq!(forecast.exhausts_at, None);
        history.observe(at(70), 0.0);
        assert!(
            history.forecast(at(72), 0.0, 60.0, at(1_000)).is_none(),
            "one sample after the reset"
        );
    }
}
