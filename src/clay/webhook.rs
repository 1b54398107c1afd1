//! Submitting rows to a Clay table through its inbound webhook sources.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

use super::error::{ClayError, describe_transport};
use super::limiter::RateLimiter;
use super::rotation::{SourceRotation, WebhookTarget};
use crate::retry::{Failure, RetryPolicy, is_retryable_status, retry_after};

/// Clay's request body limit for webhook sources (about 100 KB).
pub const BODY_LIMIT_BYTES: usize = 100_000;
/// Header carrying a webhook source's auth token.
pub const AUTH_HEADER: &str = "x-clay-webhook-auth";

/// Settings of the webhook client.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// Rows per request: 1 sends an object, more send a JSON array (Clay takes up to 10).
    pub rows_per_request: usize,
    pub body_limit: usize,
    pub retry: RetryPolicy,
    pub request_timeout: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            rows_per_request: 1,
            body_limit: BODY_LIMIT_BYTES,
            retry: RetryPolicy::default(),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// What happened to one row handed to [`WebhookClient::submit`].
#[derive(Debug, Clone, PartialEq)]
pub enum RowOutcome {
    /// Clay answered 2xx for the request carrying the row, through this source.
    Accepted { source: String },
    /// The row was not accepted; the error says whether it ever can be.
    Failed(ClayError),
}

/// Sends rows to Clay's webhook sources with rate limiting, retries and rotation.
pub struct WebhookClient {
    http: reqwest::Client,
    limiter: Arc<RateLimiter>,
    rotation: Arc<SourceRotation>,
    config: WebhookConfig,
}

impl WebhookClient {
    pub fn new(
        http: reqwest::Client,
        limiter: Arc<RateLimiter>,
        rotation: Arc<SourceRotation>,
        config: WebhookConfig,
    ) -> Self {
        Self {
            http,
            limiter,
            rotation,
            config,
        }
    }

    /// Submits `rows`, batching `rows_per_request` rows per request, and
    /// returns one outcome per row, in order. A row over the body limit fails
    /// alone; the others are still sent. Each row is encoded once: the
    /// request body is the encoded rows (a JSON array when more than one).
    pub async fn submit(&self, rows: &[Value]) -> Vec<RowOutcome> {
        let mut outcomes: Vec<Option<RowOutcome>> = vec![None; rows.len()];
        let mut batch = Batch::default();
        for (index, row) in rows.iter().enumerate() {
            let encoded = match serde_json::to_vec(row) {
                Ok(encoded) if encoded.len() <= self.config.body_limit => encoded,
                other => {
                    outcomes[index] = Some(RowOutcome::Failed(ClayError::TooLarge {
                        bytes: other.map_or(usize::MAX, |encoded| encoded.len()),
                        limit: self.config.body_limit,
                    }));
                    continue;
                }
            };
            let full = !batch.rows.is_empty()
                && (batch.rows.len() >= self.config.rows_per_request.max(1)
                    || batch.size_with(&encoded) > self.config.body_limit);
            if full {
                self.send_batch(std::mem::take(&mut batch), &mut outcomes)
                    .await;
            }
            batch.push(index, &encoded);
        }
        if !batch.rows.is_empty() {
            self.send_batch(batch, &mut outcomes).await;
        }
        outcomes
            .into_iter()
            .map(|o| o.expect("every row has an outcome"))
            .collect()
    }

    async fn send_batch(&self, batch: Batch, outcomes: &mut [Option<RowOutcome>]) {
        let (indexes, body) = batch.finish();
        let count = indexes.len();
        let outcome = match self.rotation.claim(count as u64).await {
            Ok(target) => {
                let unanswered = AtomicBool::new(false);
                match self
                    .send_with_retries(target, &body, count as u32, &unanswered)
                    .await
                {
                    Ok(()) => RowOutcome::Accepted {
                        source: target.name.clone(),
                    },
                    Err(error) => {
                        // Refused every time: Clay did not take the rows.
                        if !unanswered.load(Ordering::Relaxed) {
                            self.rotation.release(target, count as u64).await;
                        }
                        RowOutcome::Failed(error)
                    }
                }
            }
            Err(error) => RowOutcome::Failed(error),
        };
        for index in indexes {
            outcomes[index] = Some(outcome.clone());
        }
    }

    /// Sends with retries; sets `unanswered` when an attempt got no answer
    /// (Clay may have taken the rows).
    async fn send_with_retries(
        &self,
        target: &WebhookTarget,
        body: &[u8],
        rows: u32,
        unanswered: &AtomicBool,
    ) -> Result<(), ClayError> {
        let (outcome, _) = self
            .config
            .retry
            .run(|attempt| self.send_once(target, body, rows, attempt, unanswered))
            .await;
        outcome.map_err(Failure::into_error)
    }

    /// One attempt; a failure worth retrying is reported as what the call
    /// ends with if this attempt is the last.
    async fn send_once(
        &self,
        target: &WebhookTarget,
        body: &[u8],
        rows: u32,
        attempt: u32,
        unanswered: &AtomicBool,
    ) -> Result<(), Failure<ClayError>> {
        let waited = std::time::Instant::now();
        self.limiter.acquire(rows).await;
        let metrics = crate::metrics::dataplane();
        metrics
            .rate_wait_seconds
            .observe(waited.elapsed().as_secs_f64());
        let mut request = match &target.parsed {
            Some(url) => self.http.post(url.clone()),
            None => self.http.post(target.url.expose()),
        }
        .timeout(self.config.request_timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_vec());
        if let Some(token) = &target.token {
            request = request.header(AUTH_HEADER, token.expose());
        }
        let sent = std::time::Instant::now();
        let answer = request.send().await;
        let status = answer.as_ref().ok().map(|r| r.status().as_u16());
        metrics.clay_answer(status, sent.elapsed());
        let exhausted = |last| ClayError::RetriesExhausted {
            attempts: attempt,
            last,
        };
        let response = match answer {
            Ok(response) => response,
            Err(error) => {
                unanswered.store(true, Ordering::Relaxed);
                let last = describe_transport(error);
                super::clay_unreachable(target.url.expose(), &last);
                return Err(Failure::transient(exhausted(last)));
            }
        };
        crate::contact::answered(crate::contact::Peer::Clay);
        if response.status().is_success() {
            return Ok(());
        }
        let status = response.status().as_u16();
        let wait = retry_after(response.headers());
        let message = clay_message(&response.text().await.unwrap_or_default());
        match status {
            402 => return Err(Failure::Permanent(ClayError::QuotaExhausted { message })),
            401 | 403 => {
                return Err(Failure::Permanent(ClayError::Unauthorized {
                    status,
                    message,
                }));
            }
            s if !is_retryable_status(s) => {
                return Err(Failure::Permanent(ClayError::Rejected { status, message }));
            }
            _ => {}
        }
        if status == 429 {
            // Everyone in the process slows down, not just this task.
            self.limiter
                .pause_for(wait.unwrap_or_else(|| self.config.retry.backoff(attempt)));
            return Err(Failure::Transient {
                error: ClayError::Throttled { attempts: attempt },
                retry_after: Some(Duration::ZERO),
            });
        }
        Err(Failure::Transient {
            error: exhausted(format!("HTTP {status}: {message}")),
            retry_after: wait,
        })
    }
}

/// The rows of one request, encoded and comma-separated.
#[derive(Default)]
struct Batch {
    rows: Vec<usize>,
    encoded: Vec<u8>,
}

impl Batch {
    fn push(&mut self, index: usize, row: &[u8]) {
        if !self.rows.is_empty() {
            self.encoded.push(b',');
        }
        self.encoded.extend_from_slice(row);
        self.rows.push(index);
    }

    /// The body's size were `row` added (brackets and comma included).
    fn size_with(&self, row: &[u8]) -> usize {
        self.encoded.len() + row.len() + 3
    }

    /// The rows' indexes and the body: one row is sent as itself, more
    /// as an array.
    fn finish(self) -> (Vec<usize>, Vec<u8>) {
        if self.rows.len() == 1 {
            return (self.rows, self.encoded);
        }
        let mut body = Vec::with_capacity(self.encoded.len() + 2);
        body.push(b'[');
        body.extend_from_slice(&self.encoded);
        body.push(b']');
        (self.rows, body)
    }
}

/// Clay's error bodies are `{"message": ...}`; anything else is shortened.
pub(crate) fn clay_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| body.chars().take(200).collect())
}
