//! Whether this process reaches the services it depends on (Clay, the row
//! store, Kafka), as last seen: a request that got an answer, or one that got
//! none (the host and the error, never a URL's path, user or password). The
//! credit lease carries it to the operator, which reports it in the table's
//! ClayReachable, RedisReachable and KafkaReachable conditions, so a failure
//! only the pods see is not hidden behind a retry loop.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The latest outcome of a request to one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Contact {
    Answered,
    /// `host:port: what failed`.
    Unreachable(String),
}

/// A service the data plane depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    Clay,
    Store,
    Kafka,
}

impl Peer {
    pub const ALL: [Peer; 3] = [Peer::Clay, Peer::Store, Peer::Kafka];
}

/// Longest detail carried (the lease API refuses longer ones).
pub const MAX_DETAIL_BYTES: usize = 512;

/// A failure that lasts is reported again this often, so the operator can
/// tell it from one whose process has gone.
pub const REPEAT_FAILURE_EVERY: Duration = Duration::from_secs(30);

/// What this process saw of one service, and what it last reported.
#[derive(Default)]
struct Seen {
    latest: Option<Contact>,
    reported: Option<(Contact, Instant)>,
}

impl Seen {
    /// When the latest outcome is due to be reported (None: nothing to say).
    /// A failure that goes on is not news when only its wording changes
    /// (librdkafka's say how long ago the connection failed): it waits for
    /// its repeat.
    fn due(&self) -> Option<Instant> {
        let latest = self.latest.as_ref()?;
        match (&self.reported, latest) {
            (Some((Contact::Unreachable(_), at)), Contact::Unreachable(_)) => {
                Some(*at + REPEAT_FAILURE_EVERY)
            }
            (Some((Contact::Answered, _)), Contact::Answered) => None,
            _ => Some(Instant::now()),
        }
    }
}

#[allow(clippy::declare_interior_mutable_const)] // each array slot is its own Mutex
const UNSEEN: Mutex<Seen> = Mutex::new(Seen {
    latest: None,
    reported: None,
});
static SEEN: [Mutex<Seen>; Peer::ALL.len()] = [UNSEEN; Peer::ALL.len()];

fn seen(peer: Peer) -> std::sync::MutexGuard<'static, Seen> {
    SEEN[peer as usize].lock().unwrap()
}

/// `peer` answered a request.
pub fn answered(peer: Peer) {
    seen(peer).latest = Some(Contact::Answered);
}

/// A request to `host` got no answer; `detail` says why (no URL in it).
pub fn unreachable(peer: Peer, host: &str, detail: &str) {
    let mut text = format!("{host}: {detail}");
    if text.len() > MAX_DETAIL_BYTES {
        let mut end = MAX_DETAIL_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    seen(peer).latest = Some(Contact::Unreachable(text));
}

/// `host:port` of a URL, without its user, password or path (`fallback`
/// when it has none).
pub fn host_of(url: &str, fallback: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)))
        .unwrap_or_else(|| fallback.into())
}

/// The outcome to report for `peer` now: a change since the last report,
/// or a lasting failure last reported [`REPEAT_FAILURE_EVERY`] ago (None:
/// nothing new).
pub fn take(peer: Peer) -> Option<Contact> {
    let mut seen = seen(peer);
    if seen.due()? > Instant::now() {
        return None;
    }
    let latest = seen.latest.clone()?;
    seen.reported = Some((latest.clone(), Instant::now()));
    Some(latest)
}

/// When something about any service is next due to be reported.
pub fn next_report() -> Option<Instant> {
    Peer::ALL
        .into_iter()
        .filter_map(|peer| seen(peer).due())
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_outcome_wins_and_names_only_the_host() {
        let url = "https://api.clay.com/v3/sources/webhook/pull-in-data-from-a-webhook-secret";
        unreachable(
            Peer::Clay,
            &host_of(url, "Clay"),
            "connection failed: refused",
        );
        assert_eq!(
            take(Peer::Clay),
            Some(Contact::Unreachable(
                "api.clay.com:443: connection failed: refused".into()
            ))
        );
        assert_eq!(take(Peer::Clay), None, "reported once, until repeated");
        unreachable(Peer::Clay, "127.0.0.1:1", &"e".repeat(2_000));
        answered(Peer::Clay);
        assert_eq!(take(Peer::Clay), Some(Contact::Answered));
        answered(Peer::Clay);
        assert_eq!(take(Peer::Clay), None, "an answer is said once");
        unreachable(Peer::Clay, "127.0.0.1:1", &"é".repeat(2_000));
        let Some(Contact::Unreachable(text)) = take(Peer::Clay) else {
            panic!("unreachable expected")
        };
        assert!(text.len() <= MAX_DETAIL_BYTES);
    }

    #[test]
    fn a_lasting_failure_is_repeated_and_an_answer_is_not() {
        let down = Contact::Unreachable("redis:6379: refused".into());
        let long_ago = Instant::now() - REPEAT_FAILURE_EVERY;
        let failing = Seen {
            latest: Some(down.clone()),
            reported: Some((down, long_ago)),
        };
        assert!(failing.due().unwrap() <= Instant::now());
        let fine = Seen {
            latest: Some(Contact::Answered),
            reported: Some((Contact::Answered, long_ago)),
        };
        assert_eq!(fine.due(), None);
        let reworded = Seen {
            latest: Some(Contact::Unreachable("k-0:9092: refused (after 3ms)".into())),
            reported: Some((
                Contact::Unreachable("k-0:9092: refused (after 1ms)".into()),
                Instant::now(),
            )),
        };
        assert!(
            reworded.due().unwrap() > Instant::now(),
            "the same failure reworded waits for its repeat"
        );
        assert!(
            Seen::default().due().is_none(),
            "nothing seen, nothing to say"
        );
    }

    #[test]
    fn services_are_kept_apart_and_credentials_never_named() {
        let url = "redis://kiln:hunter2@redis.data.svc:6379/0";
        let host = host_of(url, "Redis");
        assert_eq!(host, "redis.data.svc:6379");
        unreachable(Peer::Store, &host, "connection refused");
        answered(Peer::Kafka);
        assert_eq!(take(Peer::Kafka), Some(Contact::Answered));
        let Some(Contact::Unreachable(text)) = take(Peer::Store) else {
            panic!("the store's failure is kept apart from Kafka's answer")
        };
        assert!(!text.contains("hunter2"), "{text}");
        assert_eq!(host_of("not a url", "Redis"), "Redis");
    }
}
