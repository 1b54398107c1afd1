//! A token bucket shared by every task of a process, in rows per second,
//! that also backs off for everyone when Clay answers 429 with Retry-After.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub struct RateLimiter {
    state: Mutex<BucketState>,
}

struct BucketState {
    rate_per_sec: f64,
    burst: f64,
    tokens: f64,
    updated: Instant,
    /// Nobody may send before this instant (set from Retry-After).
    paused_until: Option<Instant>,
}

impl RateLimiter {
    pub fn new(rate_per_sec: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            state: Mutex::new(BucketState {
                rate_per_sec: f64::from(rate_per_sec.max(1)),
                burst,
                tokens: burst,
                updated: Instant::now(),
                paused_until: None,
            }),
        }
    }

    /// Waits until `rows` tokens are available and takes them. Requests for
    /// more than the burst are capped at the burst so they can ever proceed.
    pub async fn acquire(&self, rows: u32) {
        loop {
            let wait = {
                let mut state = self.state.lock().unwrap();
                let wanted = f64::from(rows.max(1)).min(state.burst);
                let now = Instant::now();
                match state.paused_until {
                    Some(until) if until > now => until - now,
                    _ => {
                        state.paused_until = None;
                        let elapsed = now.duration_since(state.updated).as_secs_f64();
                        state.tokens =
                            (state.tokens + elapsed * state.rate_per_sec).min(state.burst);
                        state.updated = now;
                        if state.tokens >= wanted {
                            state.tokens -= wanted;
                            return;
                        }
                        // At least a millisecond: float rounding must not turn this into a spin.
                        Duration::from_secs_f64((wanted - state.tokens) / state.rate_per_sec)
                            .max(Duration::from_millis(1))
                    }
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Applies a changed rate limit without resetting the bucket, so a table
    /// edit never grants an extra burst.
    pub fn set_rate(&self, rate_per_sec: u32, burst: u32) {
        let mut state = self.state.lock().unwrap();
        // Tokens earned so far were earned at the old rate.
        let now = Instant::now();
        if state.paused_until.is_none_or(|until| until <= now) {
            let elapsed = now.duration_since(state.updated).as_secs_f64();
            state.tokens = (state.tokens + elapsed * state.rate_per_sec).min(state.burst);
            state.updated = now;
        }
        state.rate_per_sec = f64::from(rate_per_sec.max(1));
        state.burst = f64::from(burst.max(1));
        state.tokens = state.tokens.min(state.burst);
    }

    /// Clay said 429: nobody sends until `retry_after` has passed, and the
    /// bucket restarts empty so the burst does not immediately re-trigger it.
    pub fn pause_for(&self, retry_after: Duration) {
        let mut state = self.state.lock().unwrap();
        let until = Instant::now() + retry_after;
        if state.paused_until.is_none_or(|current| current < until) {
            state.paused_until = Some(until);
        }
        state.tokens = 0.0;
        state.updated = state.paused_until.unwrap_or(until);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Runs `tasks` concurrent acquirers of `rows` each for `total` acquisitions
    /// on a paused clock and returns the grant times.
    async fn grant_times(rate: u32, burst: u32, rows: Vec<u32>) -> Vec<(Instant, u32)> {
        let limiter = Arc::new(RateLimiter::new(rate, burst));
        let grants = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for n in rows {
            let limiter = limiter.clone();
            let grants = grants.clone();
            handles.push(tokio::spawn(async move {
                limiter.acquire(n).await;
                grants.lock().unwrap().push((Instant::now(), n.min(burst)));
            }));
        }
        for handle in handles {
            handle.await.unwrap();
        }
        Arc::try_unwrap(grants).unwrap().into_inner().unwrap()
    }

    /// Largest number of rows granted inside any window of `window` length.
    fn max_in_window(grants: &[(Instant, u32)], window: Duration) -> u32 {
        grants
            .iter()
            .map(|(start, _)| {
                grants
                    .iter()
                    .filter(|(t, _)| *t >= *start && *t < *start + window)
                    .map(|(_, n)| n)
                    .sum()
            })
            .max()
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn never_exceeds_rate_plus_burst_over_any_window() {
        // A small deterministic property sweep: several rates, bursts and request shapes.
        let mut seed = 0x5eed_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _case in 0..12 {
            let rate = 1 + (next() % 20) as u32;
            let burst = 1 + (next() % 30) as u32;
            let rows: Vec<u32> = (0..60).map(|_| 1 + (next() % 4) as u32).collect();
            let grants = grant_times(rate, burst, rows.clone()).await;
            assert_eq!(
                grants.len(),
                rows.len(),
                "every acquirer is eventually served"
            );
            for window_ms in [100u64, 500, 1000, 3000] {
                let window = Duration::from_millis(window_ms);
                let allowed = f64::from(burst) + f64::from(rate) * window.as_secs_f64();
                let seen = max_in_window(&grants, window);
                assert!(
                    f64::from(seen) <= allowed + 1e-9,
                    "rate {rate}/s burst {burst}: {seen} rows in {window:?}, allowed {allowed}"
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_rate_applies_to_waiting_and_later_acquirers() {
        let limiter = RateLimiter::new(100, 1);
        limiter.acquire(1).await;
        limiter.set_rate(2, 1);
        let start = Instant::now();
        for _ in 0..4 {
            limiter.acquire(1).await;
        }
        // Four rows at 2/s after the burst was spent take two seconds, not 40 ms.
        assert!(Instant::now() - start >= Duration::from_millis(1990));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pauses_everyone_for_retry_after() {
        let limiter = RateLimiter::new(100, 100);
        let start = Instant::now();
        limiter.pause_for(Duration::from_secs(3));
        limiter.acquire(1).await;
        assert!(Instant::now() - start >= Duration::from_secs(3));
    }
}
