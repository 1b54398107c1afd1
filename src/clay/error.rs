//! How a call to Clay can end, classified so callers can react: retry later,
//! dead-letter the row, or stop spending.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClayError {
    /// 402: the workspace's metered quota is spent; retrying will not help.
    #[error("Clay quota exhausted (402): {message}")]
    QuotaExhausted { message: String },
    /// 401/403: the credentials were refused.
    #[error("Clay refused the credentials ({status}): {message}")]
    Unauthorized { status: u16, message: String },
    /// Another 4xx: the request itself is wrong; never retried.
    #[error("Clay rejected the request ({status}): {message}")]
    Rejected { status: u16, message: String },
    /// A retryable failure persisted through every attempt.
    #[error("Clay call failed after {attempts} attempts: {last}")]
    RetriesExhausted { attempts: u32, last: String },
    /// Clay answered 429 to the last of `attempts`: the workspace is over
    /// its rate. Nothing was taken or charged, and Clay is not failing.
    #[error("Clay throttled the call (429 after {attempts} attempts)")]
    Throttled { attempts: u32 },
    /// The request may or may not have been processed (timeout or 5xx after
    /// sending); repeating it could charge twice, so it is not repeated blindly.
    #[error("outcome of the Clay call is unknown: {0}")]
    OutcomeUnknown(String),
    /// A row is larger than Clay's body limit; it can never be sent.
    #[error("row is {bytes} bytes, over Clay's {limit}-byte body limit")]
    TooLarge { bytes: usize, limit: usize },
    /// Every configured webhook source reached its submission cap.
    #[error(
        "all {sources} webhook sources reached their submission cap; add a new source to spec.clay.webhookSources"
    )]
    SourcesExhausted { sources: usize },
    /// The submission counter store could not be reached.
    #[error("submission counter unavailable: {0}")]
    CounterUnavailable(String),
    /// Polling a routine run did not finish in time.
    #[error("routine run {run_id} not finished after {waited:?}")]
    RunTimedOut { run_id: String, waited: Duration },
    /// Clay answered with something this client cannot read.
    #[error("unexpected response from Clay: {0}")]
    Protocol(String),
}

impl ClayError {
    /// A short machine-friendly reason for dead letters and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::QuotaExhausted { .. } => "QuotaExhausted",
            Self::Unauthorized { .. } => "Unauthorized",
            Self::Rejected { .. } => "Rejected",
            Self::RetriesExhausted { .. } => "RetriesExhausted",
            Self::Throttled { .. } => "Throttled",
            Self::OutcomeUnknown(_) => "OutcomeUnknown",
            Self::TooLarge { .. } => "TooLarge",
            Self::SourcesExhausted { .. } => "SourcesExhausted",
            Self::CounterUnavailable(_) => "CounterUnavailable",
            Self::RunTimedOut { .. } => "RunTimedOut",
            Self::Protocol(_) => "Protocol",
        }
    }
}

/// Describes a transport error without the URL (webhook URLs are secrets).
pub fn describe_transport(error: reqwest::Error) -> String {
    let kind = if error.is_connect() {
        "connection failed"
    } else if error.is_timeout() {
        "timed out"
    } else if error.is_body() || error.is_decode() {
        "bad response body"
    } else {
        "request failed"
    };
    let detail = std::error::Error::source(&error.without_url())
        .map(|s| s.to_string())
        .unwrap_or_default();
    if detail.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {detail}")
    }
}
