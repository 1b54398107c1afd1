//! The failure circuit breaker of a budget, as a pure state machine:
//! Closed → Open when Clay's error ratio over the window crosses the
//! threshold (with a minimum volume), Open → HalfOpen after the cooldown,
//! HalfOpen → Closed after enough successful probes, or back to Open on a failure.

use std::collections::VecDeque;

use jiff::{SignedDuration, Timestamp};

use crate::api::budget::{BreakerState, CircuitBreakerSpec};

#[derive(Clone, Debug)]
pub struct Breaker {
    state: BreakerState,
    since: Timestamp,
    /// (when, successes, failures) reports inside the window.
    window: VecDeque<(Timestamp, u64, u64)>,
    probes_granted: u32,
    probe_successes: u64,
    /// Why the state last changed, for status and events.
    pub reason: String,
}

impl Breaker {
    /// Starts in `state` (e.g. restored from status after a failover).
    pub fn new(state: BreakerState, since: Timestamp) -> Self {
        Self {
            state,
            since,
            window: VecDeque::new(),
            probes_granted: 0,
            probe_successes: 0,
            reason: String::new(),
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    pub fn since(&self) -> Timestamp {
        self.since
    }

    fn transition(&mut self, to: BreakerState, now: Timestamp, reason: String) {
        self.state = to;
        self.since = now;
        self.reason = reason;
        self.probes_granted = 0;
        self.probe_successes = 0;
        self.window.clear();
    }

    fn cooldown(spec: &CircuitBreakerSpec) -> SignedDuration {
        SignedDuration::try_from(std::time::Duration::from(spec.cooldown))
            .unwrap_or(SignedDuration::from_secs(30))
    }

    /// Moves Open → HalfOpen once the cooldown has passed.
    pub fn tick(&mut self, spec: &CircuitBreakerSpec, now: Timestamp) {
        if self.state == BreakerState::Open && now >= self.since + Self::cooldown(spec) {
            self.transition(
                BreakerState::HalfOpen,
                now,
                "cooldown passed; probing Clay".into(),
            );
        }
    }

    /// May a new reservation be granted? In HalfOpen only a few probes are.
    pub fn allows(&mut self, spec: &CircuitBreakerSpec, now: Timestamp) -> bool {
        self.tick(spec, now);
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => {
                if self.probes_granted < spec.half_open_probes {
                    self.probes_granted += 1;
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Records Clay call outcomes reported by the data plane.
    pub fn record(
        &mut self,
        spec: &CircuitBreakerSpec,
        successes: u64,
        failures: u64,
        now: Timestamp,
    ) {
        if successes == 0 && failures == 0 {
            return;
        }
        self.tick(spec, now);
        match self.state {
            BreakerState::Open => {}
            BreakerState::HalfOpen => {
                if failures > 0 {
                    self.transition(
                        BreakerState::Open,
                        now,
                        format!("{failures} Clay failures while probing"),
                    );
                } else {
                    self.probe_successes = self.probe_successes.saturating_add(successes);
                    if self.probe_successes >= u64::from(spec.half_open_probes) {
                        self.transition(BreakerState::Closed, now, "probes succeeded".into());
                    }
                }
            }
            BreakerState::Closed => {
                let window = SignedDuration::try_from(std::time::Duration::from(spec.window))
                    .unwrap_or(SignedDuration::from_secs(60));
                self.window.push_back((now, successes, failures));
                while self
                    .window
                    .front()
                    .is_some_and(|(at, _, _)| *at + window < now)
                {
                    self.window.pop_front();
                }
                let (ok, failed) = self
                    .window
                    .iter()
                    .fold((0u64, 0u64), |(s, f), (_, ws, wf)| {
                        (s.saturating_add(*ws), f.saturating_add(*wf))
                    });
                let calls = ok.saturating_add(failed);
                // u128: counts reported by the data plane are bounded, but
                // the comparison must not be able to wrap whatever they are.
                if calls >= u64::from(spec.min_calls)
                    && u128::from(failed) * 100
                        >= u128::from(spec.error_percent) * u128::from(calls)
                {
                    self.transition(
                        BreakerState::Open,
                        now,
                        format!(
                            "{failed} of {calls} Clay calls failed within {}",
                            spec.window
                        ),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> CircuitBreakerSpec {
        CircuitBreakerSpec {
            error_percent: 50,
            min_calls: 10,
            window: std::time::Duration::from_secs(60).into(),
            cooldown: std::time::Duration::from_secs(30).into(),
            half_open_probes: 3,
        }
    }

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    #[test]
    fn opens_only_with_enough_volume_and_errors() {
        let mut breaker = Breaker::new(BreakerState::Closed, t(0));
        breaker.record(&spec(), 0, 5, t(1));
        assert_eq!(
            breaker.state(),
            BreakerState::Closed,
            "5 calls are below minCalls"
        );
        breaker.record(&spec(), 6, 0, t(2));
        assert_eq!(
            breaker.state(),
            BreakerState::Closed,
            "5 of 11 failed: under 50%"
        );
        breaker.record(&spec(), 0, 1, t(3));
        assert_eq!(breaker.state(), BreakerState::Open, "6 of 12 failed: 50%");
    }

    #[test]
    fn full_cycle_closed_open_half_open_closed() {
        let spec = spec();
        let mut breaker = Breaker::new(BreakerState::Closed, t(0));
        breaker.record(&spec, 4, 6, t(1));
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(breaker.reason.contains("6 of 10"), "{}", breaker.reason);
        assert!(!breaker.allows(&spec, t(20)));
        assert!(breaker.allows(&spec, t(31)), "cooldown over: first probe");
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(breaker.allows(&spec, t(31)));
        assert!(breaker.allows(&spec, t(31)));
        assert!(!breaker.allows(&spec, t(31)), "only 3 probes");
        breaker.record(&spec, 3, 0, t(32));
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(breaker.allows(&spec, t(33)));
    }

    #[test]
    fn a_failed_probe_reopens() {
        let spec = spec();
        let mut breaker = Breaker::new(BreakerState::Open, t(0));
        assert!(breaker.allows(&spec, t(40)));
        breaker.record(&spec, 0, 1, t(41));
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(!breaker.allows(&spec, t(60)));
    }

    #[test]
    fn huge_counts_saturate_instead_of_panicking() {
        let spec = spec();
        let mut breaker = Breaker::new(BreakerState::Closed, t(0));
        breaker.record(&spec, u64::MAX, u64::MAX, t(1));
        breaker.record(&spec, u64::MAX, u64::MAX, t(2));
        assert_eq!(breaker.state(), BreakerState::Open);
        let mut probing = Breaker::new(BreakerState::HalfOpen, t(0));
        probing.record(&spec, u64::MAX, 0, t(1));
        probing.record(&spec, u64::MAX, 0, t(1));
        assert_eq!(probing.state(), BreakerState::Closed);
    }

    #[test]
    fn old_failures_leave_the_window() {
        let spec = spec();
        let mut breaker = Breaker::new(BreakerState::Closed, t(0));
        breaker.record(&spec, 0, 4, t(0));
        breaker.record(&spec, 6, 1, t(100));
        assert_eq!(
            breaker.state(),
            BreakerState::Closed,
            "the 4 early failures are outside the 60s window"
        );
    }
}
