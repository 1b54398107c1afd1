//! Clay's public API for routines: run a batch, poll its results, and verify
//! the signed run-finished webhook.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;

use super::error::{ClayError, describe_transport};
use super::limiter::RateLimiter;
use super::webhook::clay_message;
use crate::retry::{Failure, RetryPolicy, retry_after};
use crate::secret::SecretString;

/// Header carrying the API key (a Bearer token is refused by Clay).
pub const API_KEY_HEADER: &str = "clay-api-key";
/// Header carrying the run-finished webhook's signature.
pub const SIGNATURE_HEADER: &str = "x-clay-signature";
/// Items per run Clay accepts.
pub const MAX_ITEMS: usize = 100;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RoutineItem {
    pub id: String,
    pub inputs: Value,
}

/// One item's result once the run is complete.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ItemResult {
    pub id: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

/// Where a run stands.
#[derive(Clone, Debug, PartialEq)]
pub enum RunState {
    InProgress { total: u64, finished: u64 },
    Complete(Vec<ItemResult>),
}

pub struct RoutinesClient {
    http: reqwest::Client,
    base_url: String,
    api_key: SecretString,
    limiter: Arc<RateLimiter>,
    retry: RetryPolicy,
    /// Results requested per page (Clay allows up to 100).
    pub page_size: usize,
}

#[derive(Deserialize)]
struct RunAccepted {
    routine_run_id: String,
}

#[derive(Deserialize)]
struct ResultsPage {
    status: String,
    #[serde(default)]
    total: u64,
    #[serde(default)]
    finished: u64,
    #[serde(default)]
    data: Vec<ItemResult>,
    #[serde(default)]
    next_cursor: Option<String>,
}

impl RoutinesClient {
    /// `base_url` is e.g. `https://api.clay.com/public/v0`.
    pub fn new(
        http: reqwest::Client,
        base_url: &str,
        api_key: SecretString,
        limiter: Arc<RateLimiter>,
        retry: RetryPolicy,
    ) -> Self {
        Self {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key,
            limiter,
            retry,
            page_size: 100,
        }
    }

    /// Starts a run of 1-100 items. Only retried when Clay certainly did not
    /// process it (429, or a connection that never opened): a run has no
    /// idempotency key, so anything else that is unclear is `OutcomeUnknown`
    /// and must be resolved by the caller before any re-run.
    pub async fn run(
        &self,
        routine_id: &str,
        items: &[RoutineItem],
        webhook_id: Option<&str>,
    ) -> Result<String, ClayError> {
        if items.is_empty() || items.len() > MAX_ITEMS {
            return Err(ClayError::Rejected {
                status: 400,
                message: format!("a run takes 1 to {MAX_ITEMS} items, got {}", items.len()),
            });
        }
        let mut body = serde_json::json!({ "items": items });
        if let Some(webhook_id) = webhook_id {
            body["webhook_id"] = Value::String(webhook_id.to_string());
        }
        let url = format!("{}/routines/{routine_id}/run", self.base_url);
        let (outcome, _) = self
            .retry
            .run(|attempt| self.start_once(&url, &body, attempt))
            .await;
        outcome.map_err(Failure::into_error)
    }

    /// One attempt at starting a run; only a refused connection or a 429 is
    /// retried (anything later may have started the run already).
    async fn start_once(
        &self,
        url: &str,
        body: &Value,
        attempt: u32,
    ) -> Result<String, Failure<ClayError>> {
        self.limiter.acquire(1).await;
        let sent = self
            .http
            .post(url)
            .header(API_KEY_HEADER, self.api_key.expose())
            .json(body)
            .send()
            .await;
        let exhausted = |last| ClayError::RetriesExhausted {
            attempts: attempt,
            last,
        };
        let response = match sent {
            Ok(response) => response,
            Err(error) if error.is_connect() => {
                let last = describe_transport(error);
                super::clay_unreachable(url, &last);
                return Err(Failure::transient(exhausted(last)));
            }
            Err(error) => {
                let detail = describe_transport(error);
                super::clay_unreachable(url, &detail);
                return Err(Failure::Permanent(ClayError::OutcomeUnknown(detail)));
            }
        };
        crate::contact::answered(crate::contact::Peer::Clay);
        if response.status().is_success() {
            let accepted: RunAccepted = response.json().await.map_err(|e| {
                Failure::Permanent(ClayError::OutcomeUnknown(format!(
                    "run accepted but unreadable: {}",
                    describe_transport(e)
                )))
            })?;
            return Ok(accepted.routine_run_id);
        }
        if response.status().as_u16() == 429 {
            let wait =
                retry_after(response.headers()).unwrap_or_else(|| self.retry.backoff(attempt));
            // The limiter holds every request of the process back meanwhile.
            self.limiter.pause_for(wait);
            return Err(Failure::Transient {
                error: exhausted("HTTP 429".into()),
                retry_after: Some(Duration::ZERO),
            });
        }
        Err(Failure::Permanent(status_error(response).await))
    }

    /// Reads a run's state, following the cursor through every page of results.
    pub async fn results(&self, run_id: &str) -> Result<RunState, ClayError> {
        let mut cursor: Option<String> = None;
        let mut collected = Vec::new();
        loop {
            let mut request = self
                .http
                .get(format!("{}/routines/run/{run_id}/results", self.base_url))
                .header(API_KEY_HEADER, self.api_key.expose())
                .query(&[("limit", self.page_size.clamp(1, 100))]);
            if let Some(cursor) = &cursor {
                request = request.query(&[("cursor", cursor.as_str())]);
            }
            self.limiter.acquire(1).await;
            let response = request
                .send()
                .await
                .map_err(|e| ClayError::RetriesExhausted {
                    attempts: 1,
                    last: describe_transport(e),
                })?;
            let status = response.status().as_u16();
            if status == 429 {
                let wait = retry_after(response.headers()).unwrap_or(Duration::from_secs(1));
                self.limiter.pause_for(wait);
                continue;
            }
            if !(200..300).contains(&status) {
                return Err(status_error(response).await);
            }
            let page: ResultsPage = response
                .json()
                .await
                .map_err(|e| ClayError::Protocol(describe_transport(e)))?;
            if page.status != "complete" {
                return Ok(RunState::InProgress {
                    total: page.total,
                    finished: page.finished,
                });
            }
            collected.extend(page.data);
            match page.next_cursor {
                Some(next) if !next.is_empty() => cursor = Some(next),
                _ => return Ok(RunState::Complete(collected)),
            }
        }
    }

    /// Polls until the run completes (the run-finished webhook is not
    /// guaranteed, so polling is the source of truth) or `timeout` passes.
    pub async fn wait_for(
        &self,
        run_id: &str,
        poll_every: Duration,
        timeout: Duration,
    ) -> Result<Vec<ItemResult>, ClayError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let RunState::Complete(results) = self.results(run_id).await? {
                return Ok(results);
            }
            if tokio::time::Instant::now() + poll_every > deadline {
                return Err(ClayError::RunTimedOut {
                    run_id: run_id.to_string(),
                    waited: timeout,
                });
            }
            tokio::time::sleep(poll_every).await;
        }
    }
}

async fn status_error(response: reqwest::Response) -> ClayError {
    let status = response.status().as_u16();
    let message = clay_message(&response.text().await.unwrap_or_default());
    match status {
        402 => ClayError::QuotaExhausted { message },
        401 | 403 => ClayError::Unauthorized { status, message },
        500..=599 => ClayError::OutcomeUnknown(format!("HTTP {status}: {message}")),
        _ => ClayError::Rejected { status, message },
    }
}

/// Signs a webhook body the way Clay does: `sha256=<hex HMAC-SHA256>`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Verifies an `X-Clay-Signature` header over the raw body in constant time.
pub fn verify_signature(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_digest) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_digest) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_tampering_is_caught() {
        let body = br#"{"webhookId":"w","data":{"routine_run_id":"r1"}}"#;
        let header = sign(b"s3cret", body);
        assert!(verify_signature(b"s3cret", body, &header));
        assert!(!verify_signature(b"other", body, &header));
        let tampered = br#"{"webhookId":"w","data":{"routine_run_id":"r2"}}"#;
        assert!(!verify_signature(b"s3cret", tampered, &header));
        assert!(!verify_signature(b"s3cret", body, "sha256=zz"));
        assert!(!verify_signature(
            b"s3cret",
            body,
            &header.replace("sha256=", "md5=")
        ));
    }
}
