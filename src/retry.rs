//! Exponential backoff with equal jitter (between half and all of the
//! exponential delay), bounded attempts, and [`RetryPolicy::run`], the retry
//! loop every outbound call shares (backon's, with the server's Retry-After
//! in place of the backoff when it gives one).

use std::time::Duration;

use backon::Retryable;
use rand::Rng;

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts in total, the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `attempt + 1` (attempt counts from 1): a random
    /// duration between half and all of base·2^(attempt-1), capped, so
    /// retries spread out.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(16)));
        let ceiling = exp.min(self.max_delay);
        let millis = ceiling.as_millis().max(1) as u64;
        Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
    }
}

/// Why an attempt failed, as [`RetryPolicy::run`] needs to know it.
#[derive(Debug)]
pub enum Failure<E> {
    /// Another attempt may succeed: after `retry_after` when the server
    /// said so (zero when the caller already waits elsewhere), else after
    /// the backoff.
    Transient {
        error: E,
        retry_after: Option<Duration>,
    },
    /// Another attempt cannot help.
    Permanent(E),
}

impl<E> Failure<E> {
    pub fn transient(error: E) -> Self {
        Failure::Transient {
            error,
            retry_after: None,
        }
    }

    pub fn into_error(self) -> E {
        match self {
            Failure::Transient { error, .. } | Failure::Permanent(error) => error,
        }
    }
}

/// The backoff of one retried call: [`RetryPolicy::backoff`] for each
/// attempt after the first, up to `max_attempts` in all.
#[derive(Debug)]
pub struct Delays {
    policy: RetryPolicy,
    attempt: u32,
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if self.attempt >= self.policy.max_attempts {
            return None;
        }
        let delay = self.policy.backoff(self.attempt);
        self.attempt += 1;
        Some(delay)
    }
}

impl RetryPolicy {
    fn delays(&self) -> Delays {
        Delays {
            policy: self.clone(),
            attempt: 1,
        }
    }

    /// Runs `attempt` (given its number, from 1) until it succeeds, fails
    /// permanently or has been made `max_attempts` times. Returns the last
    /// outcome and how many attempts were made.
    pub async fn run<T, E, F, Fut>(&self, mut attempt: F) -> (Result<T, Failure<E>>, u32)
    where
        F: FnMut(u32) -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure<E>>>,
    {
        let mut made = 0;
        let outcome = (|| {
            made += 1;
            attempt(made)
        })
        .retry(self.delays())
        .when(|failure| matches!(failure, Failure::Transient { .. }))
        .adjust(|failure, backoff| match failure {
            // Out of attempts stays out of attempts.
            Failure::Transient {
                retry_after: Some(wait),
                ..
            } => backoff.map(|_| *wait),
            _ => backoff,
        })
        .await;
        (outcome, made)
    }
}

/// Status codes Clay documents as transient.
pub fn is_retryable_status(status: u16) -> bool {
    matches!(status, 429 | 500 | 502 | 503 | 504)
}

/// Parses Retry-After given in seconds (Clay's form); HTTP dates are not used by Clay.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| *s >= 0.0)
        .map(Duration::from_secs_f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        for _ in 0..50 {
            let first = policy.backoff(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let late = policy.backoff(9);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_secs(1));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn run_stops_at_success_permanence_or_the_last_attempt() {
        let policy = RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        let (outcome, made) = policy
            .run(|n| async move {
                if n < 3 {
                    Err(Failure::transient(n))
                } else {
                    Ok(n)
                }
            })
            .await;
        assert_eq!((outcome.unwrap(), made), (3, 3));
        let (outcome, made) = policy
            .run(|n| async move { Err::<(), _>(Failure::Permanent(n)) })
            .await;
        assert_eq!((outcome.unwrap_err().into_error(), made), (1, 1));
        let (outcome, made) = policy
            .run(|n| async move { Err::<(), _>(Failure::transient(n)) })
            .await;
        assert_eq!((outcome.unwrap_err().into_error(), made), (4, 4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_servers_retry_after_replaces_the_backoff() {
        let policy = RetryPolicy {
            max_attempts: 2,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        let started = tokio::time::Instant::now();
        let (outcome, _) = policy
            .run(|n| async move {
                if n == 1 {
                    Err(Failure::Transient {
                        error: (),
                        retry_after: Some(Duration::from_secs(30)),
                    })
                } else {
                    Ok(())
                }
            })
            .await;
        assert!(outcome.is_ok());
        // The paused clock advances exactly by the sleeps taken.
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[test]
    fn only_transient_statuses_are_retried() {
        for status in [429, 500, 502, 503, 504] {
            assert!(is_retryable_status(status));
        }
        for status in [400, 401, 402, 403, 404, 413, 422, 501] {
            assert!(!is_retryable_status(status));
        }
    }
}
