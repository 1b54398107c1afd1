//! The Redis row store's steps against a real Redis. A step whose answer is
//! lost (Redis holds it past the client's response timeout) has an unknown
//! outcome: the store runs it again at once, and the step recognises its own
//! earlier write, and only its own, so a slow success is neither taken for a
//! failure nor repeated.

#[path = "support/mod.rs"]
mod support;

use serde_json::json;

use kiln::contract::Keys;
use kiln::dataplane::rows::{RowStore, SourceRows};
use kiln::dataplane::store::{PendingRow, RedisRows, RedisStore, SourceEntry, new_write_token};

/// Holds every write on the server for longer than the store waits for an
/// answer (its response timeout is 5 s); the writes run when it ends.
async fn pause_writes(url: &str) {
    let mut admin = support::redis_connection(url).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(7_000)
        .arg("WRITE")
        .query_async(&mut admin)
        .await
        .unwrap();
}

fn first_attempt(row_id: &str) -> PendingRow {
    PendingRow {
        row_id: row_id.into(),
        key: "lead@example.com".into(),
        row: json!({"email": "lead@example.com"}),
        attempt: 1,
        reservation: format!("{row_id}-a1"),
        reserved_credits: 8.0,
        reserved_actions: 0,
        period: "2026-11".into(),
        write_token: new_write_token(),
        attempted_at_ms: jiff::Timestamp::now().as_millisecond(),
    }
}

#[tokio::test]
async fn a_step_whose_answer_times_out_is_run_again_and_recognises_its_own_write() {
    let redis = support::start_redis("store-unknown-outcome").await;
    let store = RedisStore::connect(&redis.url, Keys::new("store", "leads"))
        .await
        .unwrap();
    let rows = RedisRows {
        store: store.clone(),
        dead_letter: "dead".into(),
    };
    let deadline = jiff::Timestamp::now().as_millisecond() + 600_000;

    // Making a row pending: the first answer is lost, the step is run again.
    let pending = first_attempt("store-leads-0-0");
    pause_writes(&redis.url).await;
    let created = rows
        .make_pending(&pending, deadline, &SourceEntry::Kafka)
        .await
        .expect("a slow step is not a failure");
    assert!(created, "the step run again found its own write");
    let counters = store.counters().await.unwrap();
    assert_eq!(
        counters.get("submitted"),
        Some(&1),
        "counted once: {counters:?}"
    );
    // The same row written by another process (a replayed record) is not ours.
    let replay = PendingRow {
        write_token: new_write_token(),
        ..pending.clone()
    };
    assert!(
        !rows
            .make_pending(&replay, deadline, &SourceEntry::Kafka)
            .await
            .unwrap(),
        "another process's write of the row is a replay"
    );

    // Replacing it by its next attempt: the same.
    let next = PendingRow {
        attempt: 2,
        reservation: "store-leads-0-0-a2".into(),
        write_token: new_write_token(),
        ..pending.clone()
    };
    pause_writes(&redis.url).await;
    assert!(
        rows.replace_pending(&next, deadline, &pending.reservation)
            .await
            .expect("a slow step is not a failure"),
        "the replacement run again found its own write"
    );
    let rival = PendingRow {
        write_token: new_write_token(),
        ..next.clone()
    };
    assert!(
        !rows
            .replace_pending(&rival, deadline, &pending.reservation)
            .await
            .unwrap(),
        "a second sweeper replacing the same attempt loses"
    );
}

/// Every store command goes through a connection that records whether Redis
/// answered (carried to the table's RedisReachable condition) and counts
/// failures by kind; what it records names the host, never the password.
#[tokio::test]
async fn a_store_that_stops_answering_is_recorded_without_its_password() {
    use kiln::contact::{self, Contact, Peer};
    let mut redis = support::start_redis("store-contact").await;
    let mut admin = support::redis_connection(&redis.url).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("hunter2")
        .query_async(&mut admin)
        .await
        .unwrap();
    let url = format!("redis://:hunter2@127.0.0.1:{}/", redis.port);
    let store = RedisStore::connect(&url, Keys::new("store", "contact"))
        .await
        .unwrap();
    store.counters().await.unwrap();
    assert_eq!(contact::take(Peer::Store), Some(Contact::Answered));

    redis.process.kill_hard();
    let failed = store.counters().await;
    assert!(failed.is_err(), "Redis is gone: {failed:?}");
    let Some(Contact::Unreachable(detail)) = contact::take(Peer::Store) else {
        panic!("the failure is recorded")
    };
    assert!(
        detail.starts_with(&format!("127.0.0.1:{}: ", redis.port)),
        "{detail}"
    );
    assert!(!detail.contains("hunter2"), "{detail}");
    let mut registry = prometheus_client::registry::Registry::default();
    kiln::metrics::dataplane().register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.lines().any(
            |l| l.starts_with("kiln_store_errors_total{kind=\"connection\"}")
                || l.starts_with("kiln_store_errors_total{kind=\"timeout\"}")
        ),
        "{text}"
    );
}
