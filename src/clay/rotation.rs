//! Webhook source rotation. Each Clay webhook source accepts 50,000
//! submissions in its lifetime and then silently drops rows, so Kiln counts
//! submissions per source (durably, through [`SubmissionCounter`]) and moves
//! to the next source before the cap.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::error::ClayError;
use crate::secret::SecretString;

/// Clay's lifetime submission cap per webhook source.
pub const SOURCE_CAP: u64 = 50_000;

/// One webhook source: the URL and token are secrets.
#[derive(Clone)]
pub struct WebhookTarget {
    /// Name from the spec, safe to log.
    pub name: String,
    pub url: SecretString,
    pub token: Option<SecretString>,
    /// The URL parsed once rather than on every request (None when it
    /// does not parse: sending then fails as reqwest reports it).
    pub(super) parsed: Option<reqwest::Url>,
}

impl WebhookTarget {
    pub fn new(name: impl Into<String>, url: SecretString, token: Option<SecretString>) -> Self {
        Self {
            name: name.into(),
            parsed: reqwest::Url::parse(url.expose()).ok(),
            url,
            token,
        }
    }
}

impl std::fmt::Debug for WebhookTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookTarget")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

/// Durable per-source submission counts, shared by every worker of a table.
#[async_trait]
pub trait SubmissionCounter: Send + Sync {
    /// Adds `n` to `source`'s count if the result stays within `limit`;
    /// returns the new count, or None (and changes nothing) if it would not.
    async fn try_add(&self, source: &str, n: u64, limit: u64) -> Result<Option<u64>, ClayError>;
}

/// The count after adding `n` rows to a source holding `count`, when that
/// stays within `limit` (the Redis store checks the same in its script).
pub fn added_within(count: u64, n: u64, limit: u64) -> Option<u64> {
    count.checked_add(n).filter(|total| *total <= limit)
}

/// A process-local counter, for tests and single-process use.
#[derive(Default)]
pub struct MemoryCounter(Mutex<HashMap<String, u64>>);

#[async_trait]
impl SubmissionCounter for MemoryCounter {
    async fn try_add(&self, source: &str, n: u64, limit: u64) -> Result<Option<u64>, ClayError> {
        let mut counts = self.0.lock().unwrap();
        let count = counts.entry(source.to_string()).or_insert(0);
        let added = added_within(*count, n, limit);
        if let Some(total) = added {
            *count = total;
        }
        Ok(added)
    }
}

/// Rotation settings.
#[derive(Clone, Debug)]
pub struct RotationPolicy {
    /// Lifetime cap per source.
    pub cap: u64,
    /// Stop using a source at this count (below the cap, for safety margin).
    pub rotate_at: u64,
    /// Log a warning once a source passes this count.
    pub warn_at: u64,
}

impl RotationPolicy {
    /// Rotates at `rotate_fraction` and warns at `warn_fraction` of `cap`.
    pub fn new(cap: u64, warn_fraction: f64, rotate_fraction: f64) -> Self {
        Self {
            cap,
            rotate_at: ((cap as f64) * rotate_fraction).floor() as u64,
            warn_at: ((cap as f64) * warn_fraction).floor() as u64,
        }
    }
}

impl Default for RotationPolicy {
    fn default() -> Self {
        Self::new(SOURCE_CAP, 0.8, 0.99)
    }
}

/// The most submissions one claim counts ahead of sending.
const MAX_BLOCK: u64 = 64;
/// A block used up within this long is followed by a larger one.
const BLOCK_SPAN: Duration = Duration::from_secs(1);

/// Picks the source for each submission.
pub struct SourceRotation {
    sources: Vec<WebhookTarget>,
    policy: RotationPolicy,
    counter: Arc<dyn SubmissionCounter>,
    /// Index of the first source not known to be full (a hint; the counter decides).
    current: Mutex<usize>,
    /// Submissions counted durably but not made yet. Held across the
    /// counter call, so concurrent rows wait for one claim, not race to make several.
    block: tokio::sync::Mutex<Block>,
}

/// Submissions this process counted against one source ahead of sending.
#[derive(Default)]
struct Block {
    source: usize,
    /// The source's durable count after this block was claimed.
    counted: u64,
    left: u64,
    size: u64,
    claimed_at: Option<Instant>,
}

impl Block {
    /// The next block's size: doubled while blocks last under
    /// [`BLOCK_SPAN`], one row again after a quiet spell. A process that
    /// stops leaves at most about a second of submissions counted but
    /// unsent, which errs towards rotating early.
    fn next_size(&self, rows: u64) -> u64 {
        let busy = self.claimed_at.is_some_and(|at| at.elapsed() < BLOCK_SPAN);
        let size = if busy {
            (self.size * 2).min(MAX_BLOCK)
        } else {
            1
        };
        size.max(rows)
    }
}

impl SourceRotation {
    pub fn new(
        sources: Vec<WebhookTarget>,
        policy: RotationPolicy,
        counter: Arc<dyn SubmissionCounter>,
    ) -> Self {
        Self {
            sources,
            policy,
            counter,
            current: Mutex::new(0),
            block: tokio::sync::Mutex::default(),
        }
    }

    /// Counts `rows` submissions against the first source with room and
    /// returns it. Counting happens before sending (a request that failed
    /// without an answer still counts, as Clay may have taken it, which errs
    /// towards rotating early; rows Clay refused are given back with
    /// [`Self::release`]), in blocks while busy, so a row seldom waits for
    /// the counter.
    pub async fn claim(&self, rows: u64) -> Result<&WebhookTarget, ClayError> {
        let mut block = self.block.lock().await;
        let start = *self.current.lock().unwrap();
        for index in start..self.sources.len() {
            if block.source == index && block.left >= rows {
                block.left -= rows;
                self.report(index, block.counted - block.left, rows);
                return Ok(&self.sources[index]);
            }
            let size = block.next_size(rows);
            // A whole block may not fit below the rotation point when the
            // rows themselves still do.
            let sizes = if size > rows {
                vec![size, rows]
            } else {
                vec![rows]
            };
            for size in sizes {
                if let Some(count) = self.try_count(index, size).await? {
                    *block = Block {
                        source: index,
                        counted: count,
                        left: size - rows,
                        size,
                        claimed_at: Some(Instant::now()),
                    };
                    self.report(index, count - block.left, rows);
                    return Ok(&self.sources[index]);
                }
            }
            let mut current = self.current.lock().unwrap();
            if *current <= index {
                *current = index + 1;
                tracing::warn!(source = %self.sources[index].name, "webhook source is full; rotating to the next one");
            }
        }
        Err(ClayError::SourcesExhausted {
            sources: self.sources.len(),
        })
    }

    /// Whether this rotation is over exactly `targets` (names, URLs, tokens).
    pub fn serves(&self, targets: &[WebhookTarget]) -> bool {
        self.sources.len() == targets.len()
            && self
                .sources
                .iter()
                .zip(targets)
                .all(|(a, b)| a.name == b.name && a.url == b.url && a.token == b.token)
    }

    /// Gives back `rows` counted for `target` that Clay did not take (it
    /// answered every attempt with a refusal), so they count for the next
    /// rows instead. Only while this process's block is on that source;
    /// otherwise they stay counted, which errs towards rotating early.
    pub async fn release(&self, target: &WebhookTarget, rows: u64) {
        let mut block = self.block.lock().await;
        let index = block.source;
        if block.claimed_at.is_some() && std::ptr::eq(&self.sources[index], target) {
            block.left = (block.left + rows).min(block.counted);
            self.report(index, block.counted - block.left, 0);
        }
    }

    async fn try_count(&self, index: usize, n: u64) -> Result<Option<u64>, ClayError> {
        self.counter
            .try_add(&self.sources[index].name, n, self.policy.rotate_at)
            .await
    }

    /// Publishes how many submissions a source has had (`sent` of them just
    /// now), and warns once that passes the warning point.
    fn report(&self, index: usize, count: u64, sent: u64) {
        let source = &self.sources[index];
        crate::metrics::dataplane()
            .source_rows
            .get_or_create(&crate::metrics::SourceLabels {
                source: source.name.clone(),
            })
            .set(count as i64);
        if count >= self.policy.warn_at && count - sent < self.policy.warn_at {
            tracing::warn!(
                source = %source.name, count, cap = self.policy.cap,
                "webhook source is nearing Clay's lifetime submission cap; add another source"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_takes_rows_up_to_its_cap_and_never_overflows() {
        assert_eq!(added_within(49_990, 10, 50_000), Some(50_000));
        assert_eq!(added_within(49_991, 10, 50_000), None);
        assert_eq!(added_within(u64::MAX, 1, u64::MAX), None);
    }

    fn target(name: &str) -> WebhookTarget {
        WebhookTarget::new(name, SecretString::new(format!("http://clay/{name}")), None)
    }

    #[tokio::test]
    async fn rotates_before_the_cap_and_then_runs_out() {
        let counter: Arc<dyn SubmissionCounter> = Arc::new(MemoryCounter::default());
        let rotation = SourceRotation::new(
            vec![target("a"), target("b")],
            RotationPolicy::new(10, 0.5, 0.8),
            counter.clone(),
        );
        let mut used = Vec::new();
        for _ in 0..16 {
            used.push(rotation.claim(1).await.unwrap().name.clone());
        }
        assert_eq!(
            used.iter().filter(|n| *n == "a").count(),
            8,
            "rotates at 80% of the cap"
        );
        assert_eq!(used.iter().filter(|n| *n == "b").count(), 8);
        let error = rotation.claim(1).await.unwrap_err();
        assert_eq!(error, ClayError::SourcesExhausted { sources: 2 });

        // A new rotation over the same durable counter (a restarted worker) knows the counts.
        let restarted = SourceRotation::new(
            vec![target("a"), target("b"), target("c")],
            RotationPolicy::new(10, 0.5, 0.8),
            counter,
        );
        assert_eq!(restarted.claim(1).await.unwrap().name, "c");
    }

    #[tokio::test]
    async fn a_batch_that_does_not_fit_moves_to_the_next_source() {
        let rotation = SourceRotation::new(
            vec![target("a"), target("b")],
            RotationPolicy::new(10, 0.5, 1.0),
            Arc::new(MemoryCounter::default()),
        );
        assert_eq!(rotation.claim(7).await.unwrap().name, "a");
        assert_eq!(rotation.claim(4).await.unwrap().name, "b");
    }

    /// Counts the calls that reach the durable counter.
    #[derive(Default)]
    struct CountedCalls {
        inner: MemoryCounter,
        calls: std::sync::atomic::AtomicU64,
    }

    #[async_trait]
    impl SubmissionCounter for CountedCalls {
        async fn try_add(
            &self,
            source: &str,
            n: u64,
            limit: u64,
        ) -> Result<Option<u64>, ClayError> {
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.try_add(source, n, limit).await
        }
    }

    #[tokio::test]
    async fn busy_submissions_are_counted_in_blocks_up_to_the_rotation_point() {
        let counter = Arc::new(CountedCalls::default());
        let rotation = SourceRotation::new(
            vec![target("a"), target("b")],
            RotationPolicy::new(1000, 0.5, 0.3),
            counter.clone(),
        );
        for _ in 0..100 {
            assert_eq!(rotation.claim(1).await.unwrap().name, "a");
        }
        let calls = counter.calls.load(std::sync::atomic::Ordering::Relaxed);
        assert!(calls <= 8, "{calls} counter calls for 100 rows");
        let counted = counter.inner.try_add("a", 0, u64::MAX).await.unwrap();
        assert!(counted >= Some(100) && counted <= Some(100 + MAX_BLOCK));

        // The source is used up to its rotation point (300), not a block short of it.
        let mut on_a = 100;
        while rotation.claim(1).await.unwrap().name == "a" {
            on_a += 1;
        }
        assert_eq!(
            counter.inner.try_add("a", 0, u64::MAX).await.unwrap(),
            Some(300)
        );
        assert_eq!(on_a, 300, "every row counted against a was sent to it");
    }

    #[tokio::test]
    async fn rows_clay_refused_count_for_the_next_rows() {
        let counter = Arc::new(MemoryCounter::default());
        let rotation = SourceRotation::new(
            vec![target("a")],
            RotationPolicy::new(1000, 0.5, 1.0),
            counter.clone(),
        );
        for _ in 0..10 {
            let target = rotation.claim(1).await.unwrap();
            rotation.release(target, 1).await;
        }
        let counted = counter.try_add("a", 0, u64::MAX).await.unwrap();
        assert_eq!(counted, Some(1), "ten refused rows are one counted");
    }

    #[test]
    fn a_rotation_serves_exactly_its_sources() {
        let rotation = SourceRotation::new(
            vec![target("a"), target("b")],
            RotationPolicy::default(),
            Arc::new(MemoryCounter::default()),
        );
        assert!(rotation.serves(&[target("a"), target("b")]));
        assert!(!rotation.serves(&[target("a")]));
        let moved = WebhookTarget::new("b", SecretString::new("http://clay/other"), None);
        assert!(!rotation.serves(&[target("a"), moved]));
    }
}
