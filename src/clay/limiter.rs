//! A token bucket shared by every task of a process, in rows per second,
//! that also backs off for everyone when Clay answers 429 with Retry-After.
//!
//! Its rate is the smaller of the table's own `clay.rateLimit` (the cap)
//! and the share of the Clay workspace's rate the leader leased to this
//! process, when it has one. It also counts what it let through, whether
//! anyone had to wait and how many 429s came back: the demand the process
//! reports when it asks for its next share.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Longest a waiting acquirer sleeps before looking at the bucket again
/// (a rate raised meanwhile also wakes it at once).
const RECHECK: Duration = Duration::from_secs(1);

pub struct RateLimiter {
    state: Mutex<BucketState>,
    changed: Notify,
}

/// A rate in rows per second with its burst.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

/// What went through the limiter since the last [`RateLimiter::take_usage`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// Rows let through.
    pub rows: u64,
    /// Someone had to wait for tokens: the process wants more rate.
    pub waited: bool,
    /// 429s Clay answered.
    pub throttled: u64,
}

/// A share of the workspace's rate, good until `valid_until`; after that
/// (its holder could not renew it) the smaller `fallback` applies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Share {
    pub rate: Rate,
    pub valid_until: Instant,
    pub fallback: Rate,
}

struct BucketState {
    cap: Rate,
    share: Option<Share>,
    tokens: f64,
    updated: Instant,
    /// Nobody may send before this instant (set from Retry-After).
    paused_until: Option<Instant>,
    usage: Usage,
    /// When an acquirer last had to wait for tokens.
    last_wait: Option<Instant>,
}

impl BucketState {
    fn effective(&self) -> Rate {
        match self.share {
            Some(share) => {
                let rate = if Instant::now() < share.valid_until {
                    share.rate
                } else {
                    share.fallback
                };
                Rate {
                    per_second: rate.per_second.min(self.cap.per_second),
                    burst: rate.burst.min(self.cap.burst),
                }
            }
            None => self.cap,
        }
    }

    /// Adds the tokens earned since the last update, at the current rate.
    fn refill(&mut self, now: Instant) {
        if self.paused_until.is_some_and(|until| until > now) {
            return;
        }
        self.paused_until = None;
        let rate = self.effective();
        let elapsed = now.duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.updated = now;
    }
}

impl RateLimiter {
    pub fn new(rate_per_sec: u32, burst: u32) -> Self {
        let cap = cap_of(rate_per_sec, burst);
        Self {
            state: Mutex::new(BucketState {
                cap,
                share: None,
                tokens: cap.burst,
                updated: Instant::now(),
                paused_until: None,
                usage: Usage::default(),
                last_wait: None,
            }),
            changed: Notify::new(),
        }
    }

    /// Waits until `rows` tokens are available and takes them. Requests for
    /// more than the burst are capped at the burst so they can ever proceed.
    pub async fn acquire(&self, rows: u32) {
        loop {
            let changed = self.changed.notified();
            let wait = {
                let mut state = self.state.lock().unwrap();
                let now = Instant::now();
                match state.paused_until {
                    Some(until) if until > now => until - now,
                    _ => {
                        state.refill(now);
                        let rate = state.effective();
                        // A bucket always holds at least one row.
                        let wanted = f64::from(rows.max(1)).min(rate.burst.max(1.0));
                        if state.tokens >= wanted {
                            state.tokens -= wanted;
                            state.usage.rows += u64::from(rows.max(1));
                            return;
                        }
                        state.usage.waited = true;
                        state.last_wait = Some(now);
                        if rate.per_second <= 0.0 {
                            RECHECK
                        } else {
                            // At least a millisecond: float rounding must not turn this into a spin.
                            Duration::from_secs_f64((wanted - state.tokens) / rate.per_second)
                                .clamp(Duration::from_millis(1), RECHECK)
                        }
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = changed => {}
            }
        }
    }

    /// Applies a changed table rate limit without resetting the bucket, so
    /// a table edit never grants an extra burst.
    pub fn set_cap(&self, rate_per_sec: u32, burst: u32) {
        self.update(|state| state.cap = cap_of(rate_per_sec, burst));
    }

    /// Applies the workspace share leased to this process (None: no share,
    /// the table's cap alone), keeping the tokens already earned.
    pub fn set_share(&self, share: Option<Share>) {
        self.update(|state| state.share = share);
    }

    fn update(&self, change: impl FnOnce(&mut BucketState)) {
        {
            let mut state = self.state.lock().unwrap();
            // Tokens earned so far were earned at the old rate.
            state.refill(Instant::now());
            change(&mut state);
            state.tokens = state.tokens.min(state.effective().burst);
        }
        self.changed.notify_waiters();
    }

    /// The rate rows go through at now.
    pub fn effective(&self) -> Rate {
        self.state.lock().unwrap().effective()
    }

    /// The table's own limit.
    pub fn cap(&self) -> Rate {
        self.state.lock().unwrap().cap
    }

    /// Whether rows waited for tokens within `window`: the process would
    /// send faster with a larger share.
    pub fn waited_within(&self, window: Duration) -> bool {
        self.state
            .lock()
            .unwrap()
            .last_wait
            .is_some_and(|at| at.elapsed() <= window)
    }

    /// What went through since the last call, and resets it.
    pub fn take_usage(&self) -> Usage {
        std::mem::take(&mut self.state.lock().unwrap().usage)
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
        state.usage.throttled += 1;
    }
}

impl From<&crate::api::table::RateLimit> for Rate {
    fn from(limit: &crate::api::table::RateLimit) -> Self {
        cap_of(limit.rows_per_second, limit.burst)
    }
}

fn cap_of(rate_per_sec: u32, burst: u32) -> Rate {
    Rate {
        per_second: f64::from(rate_per_sec.max(1)),
        burst: f64::from(burst.max(1)),
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
        limiter.set_cap(2, 1);
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

    #[tokio::test(start_paused = true)]
    async fn a_share_narrows_the_cap_and_a_raised_share_wakes_waiters() {
        let limiter = Arc::new(RateLimiter::new(100, 1));
        let share = |per_second: f64, burst: f64| {
            Some(Share {
                rate: Rate { per_second, burst },
                valid_until: Instant::now() + Duration::from_secs(3600),
                fallback: Rate {
                    per_second: 0.0,
                    burst: 1.0,
                },
            })
        };
        limiter.set_share(share(0.0, 1.0));
        limiter.acquire(1).await;
        let waiter = tokio::spawn({
            let limiter = limiter.clone();
            async move { limiter.acquire(1).await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiter.is_finished(), "a zero share sends nothing more");
        limiter.set_share(share(50.0, 1.0));
        tokio::time::timeout(Duration::from_millis(100), waiter)
            .await
            .expect("a raised share lets the waiter through")
            .unwrap();
        let usage = limiter.take_usage();
        assert_eq!((usage.rows, usage.waited), (2, true));
        assert_eq!(limiter.take_usage(), Usage::default());
        // The share never lifts the table's own cap.
        limiter.set_share(share(1000.0, 1000.0));
        assert_eq!(limiter.effective().per_second, 100.0);
        // A share not renewed in time falls back.
        limiter.set_share(Some(Share {
            valid_until: Instant::now() + Duration::from_secs(5),
            ..share(50.0, 10.0).unwrap()
        }));
        assert_eq!(limiter.effective().per_second, 50.0);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(limiter.effective().per_second, 0.0);
        limiter.pause_for(Duration::from_millis(10));
        assert_eq!(limiter.take_usage().throttled, 1);
    }
}
