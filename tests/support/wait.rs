//! Polling with a deadline: the only way tests wait for something.

use std::future::Future;
use std::time::{Duration, Instant};

/// How long any single condition may take before the test fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Polls `check` until it returns `Some`, panicking with `what` after the default timeout.
pub async fn until<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    until_within(what, DEFAULT_TIMEOUT, check).await
}

/// Polls `check` until it returns `Some`, panicking with `what` after `timeout`.
pub async fn until_within<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
