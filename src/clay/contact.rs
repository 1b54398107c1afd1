//! Whether Clay answered this process, as last seen: a request that got an
//! HTTP answer (any status), or one that got none (the host and the error,
//! never the URL's path or token). The credit lease carries it to the
//! operator, which reports it as the table's ClayReachable condition.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The latest outcome of a request to Clay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ClayContact {
    Answered,
    /// `host:port: what failed`.
    Unreachable(String),
}

/// Longest detail carried (the lease API refuses longer ones).
pub const MAX_DETAIL_BYTES: usize = 512;

static LATEST: Mutex<Option<ClayContact>> = Mutex::new(None);

/// Clay answered a request.
pub fn answered() {
    *LATEST.lock().unwrap() = Some(ClayContact::Answered);
}

/// A request to `url` got no answer; `detail` says why (no URL in it).
pub fn unreachable(url: &str, detail: &str) {
    let host = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)))
        .unwrap_or_else(|| "Clay".into());
    let mut text = format!("{host}: {detail}");
    if text.len() > MAX_DETAIL_BYTES {
        let mut end = MAX_DETAIL_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    *LATEST.lock().unwrap() = Some(ClayContact::Unreachable(text));
}

/// What was seen since the last call (None: no request finished).
pub fn take() -> Option<ClayContact> {
    LATEST.lock().unwrap().take()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_outcome_wins_and_names_only_the_host() {
        unreachable(
            "https://api.clay.com/v3/sources/webhook/pull-in-data-from-a-webhook-secret",
            "connection failed: refused",
        );
        assert_eq!(
            take(),
            Some(ClayContact::Unreachable(
                "api.clay.com:443: connection failed: refused".into()
            ))
        );
        assert_eq!(take(), None, "taken once");
        unreachable("http://127.0.0.1:1/x", &"e".repeat(2_000));
        answered();
        assert_eq!(take(), Some(ClayContact::Answered));
        unreachable("http://127.0.0.1:1/x", &"é".repeat(2_000));
        let Some(ClayContact::Unreachable(text)) = take() else {
            panic!("unreachable expected")
        };
        assert!(text.len() <= MAX_DETAIL_BYTES);
    }
}
