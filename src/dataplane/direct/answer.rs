//! What a Direct caller is told: a row's end as an HTTP status and body,
//! and how long a caller may ask to wait.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::dataplane::embedded::RowState;
use crate::ledger::DenialReason;

/// Longest wait a caller may ask for with `?timeout=`.
pub const MAX_SYNC_TIMEOUT: Duration = Duration::from_secs(300);
/// What a caller refused for a transient reason is told to wait.
const RETRY_AFTER_SECS: u64 = 30;

/// How a row has ended, as told to its callers.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    Enriched {
        row_id: String,
        result: Value,
        deduplicated: bool,
    },
    DeadLettered {
        row_id: String,
        reason: String,
    },
    /// Nothing was submitted (budget, breaker, store or ledger).
    Refused {
        status: StatusCode,
        reason: String,
        message: String,
    },
    /// Still enriching when the caller's wait ended.
    Pending {
        row_id: String,
    },
    /// The request itself is wrong.
    Invalid {
        message: String,
    },
}

impl Answer {
    /// The answer for a row that reached a terminal state in the store.
    pub(super) fn of_stored(row_id: &str, state: RowState) -> Self {
        match state {
            RowState::Enriched { result, .. } => Self::Enriched {
                row_id: row_id.to_string(),
                result,
                deduplicated: false,
            },
            RowState::DeadLettered { reason, .. } => Self::DeadLettered {
                row_id: row_id.to_string(),
                reason,
            },
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Enriched { .. } => StatusCode::OK,
            Self::DeadLettered { .. } => StatusCode::BAD_GATEWAY,
            Self::Refused { status, .. } => *status,
            Self::Pending { .. } => StatusCode::ACCEPTED,
            Self::Invalid { .. } => StatusCode::BAD_REQUEST,
        }
    }

    pub fn body(&self) -> Value {
        match self {
            Self::Enriched {
                row_id,
                result,
                deduplicated,
            } => json!({
                // A de-duplicated answer comes from the store, not from a row of this request.
                "rowId": (!row_id.is_empty()).then_some(row_id),
                "state": "enriched", "deduplicated": deduplicated, "result": result
            }),
            Self::DeadLettered { row_id, reason } => json!({
                "rowId": row_id, "state": "deadLettered", "reason": reason,
                "error": format!("the row could not be enriched: {reason}")
            }),
            Self::Refused {
                reason, message, ..
            } => json!({"error": message, "reason": reason}),
            Self::Pending { row_id } => json!({
                "rowId": row_id, "state": "pending", "statusUrl": format!("{}/{row_id}", crate::contract::INGEST_PATH),
                "message": "still enriching; the result is kept and delivered when it arrives"
            }),
            Self::Invalid { message } => json!({"error": message}),
        }
    }

    /// Seconds a refused caller should wait before trying again.
    pub fn retry_after(&self) -> Option<u64> {
        matches!(self, Self::Refused { status, .. } if *status == StatusCode::SERVICE_UNAVAILABLE)
            .then_some(RETRY_AFTER_SECS)
    }
}

pub(super) fn refusal(denial_reason: DenialReason, message: String) -> Answer {
    let status = match denial_reason {
        DenialReason::Exhausted | DenialReason::Paused => StatusCode::PAYMENT_REQUIRED,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    Answer::Refused {
        status,
        reason: format!("{denial_reason:?}"),
        message,
    }
}

/// The wait a request asked for with `?timeout=`, capped: one whole number
/// and a unit (`ms`, `s`, `m`, `h`), e.g. `250ms` or `10s`. Negative,
/// compound and overflowing values are refused with a message, never guessed.
pub fn requested_wait(query: Option<&str>, default: Duration) -> Result<Duration, String> {
    let Some(text) = query else {
        return Ok(default.min(MAX_SYNC_TIMEOUT));
    };
    let refused = || {
        format!(
            "timeout {:?} must be a whole number and a unit (ms, s, m or h), e.g. 250ms or 10s, at most {}s",
            text.chars().take(40).collect::<String>(),
            MAX_SYNC_TIMEOUT.as_secs()
        )
    };
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    if digits == 0 || digits > 12 {
        return Err(refused());
    }
    let number: u64 = number.parse().map_err(|_| refused())?;
    let millis_per_unit = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(refused()),
    };
    let millis = number.checked_mul(millis_per_unit).ok_or_else(refused)?;
    Ok(Duration::from_millis(millis).min(MAX_SYNC_TIMEOUT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_map_to_the_documented_status_codes() {
        let exhausted = refusal(DenialReason::Exhausted, "limit reached".into());
        assert_eq!(exhausted.status(), StatusCode::PAYMENT_REQUIRED);
        assert_eq!(exhausted.retry_after(), None);
        assert_eq!(
            refusal(DenialReason::Paused, "paused".into()).status(),
            StatusCode::PAYMENT_REQUIRED
        );
        let breaker = refusal(DenialReason::BreakerOpen, "open".into());
        assert_eq!(breaker.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(breaker.retry_after(), Some(RETRY_AFTER_SECS));
        let pending = Answer::Pending {
            row_id: "t-1".into(),
        };
        assert_eq!(pending.status(), StatusCode::ACCEPTED);
        assert_eq!(pending.body()["statusUrl"], "/v1/rows/t-1");
    }

    #[test]
    fn waits_come_from_the_query_else_the_spec_and_are_capped() {
        let default = Duration::from_secs(30);
        assert_eq!(requested_wait(None, default), Ok(default));
        assert_eq!(
            requested_wait(Some("250ms"), default),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(requested_wait(Some("2h"), default), Ok(MAX_SYNC_TIMEOUT));
        assert_eq!(requested_wait(Some("0s"), default), Ok(Duration::ZERO));
        for bad in [
            "soon",
            "-1s",
            "1s-5s",
            "1h30m",
            "99999999999999999999h",
            "1.5s",
            "",
            "10",
            "s",
            " 1s",
            "1S",
        ] {
            let refused = requested_wait(Some(bad), default).unwrap_err();
            assert!(
                refused.contains("whole number and a unit"),
                "{bad}: {refused}"
            );
        }
    }
}
