//! The embedded store against a real file: claims, restarts, the outbox,
//! routine runs and the sweeper's transitions.

use super::*;
use crate::dataplane::rows::RowStore;
use crate::dataplane::rows::memory::pending;
use serde_json::json;

#[tokio::test]
async fn pending_rows_are_counted_by_how_long_they_waited() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("kiln.redb")).unwrap();
    let (now, timeout) = (10_000_000, 600_000);
    // Waited 5 s, 30 s, 30 s, 2 h: the deadline is the attempt plus the timeout.
    for (id, waited) in [("a", 5_000), ("b", 30_000), ("c", 30_000), ("d", 7_200_000)] {
        let deadline = now - waited + timeout;
        store
            .make_pending(&pending(id, id, "x"), deadline)
            .await
            .unwrap();
    }
    let ages = crate::dataplane::rows::pending_by_age(&store, now, timeout)
        .await
        .unwrap();
    assert_eq!(
        ages,
        vec![
            ("10s", 1),
            ("1m", 2),
            ("5m", 0),
            ("15m", 0),
            ("1h", 0),
            ("older", 1)
        ]
    );
}

#[tokio::test]
async fn a_row_is_claimed_once_and_survives_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    store
        .make_pending(&pending("r1", "acme.com", "r1-a1"), 1_000)
        .await
        .unwrap();
    drop(store);

    // A restarted receiver still matches the callback.
    let store = EmbeddedStore::open(&path).unwrap();
    assert!(store.is_pending("r1").await.unwrap());
    let result = json!({"kiln_row_id": "r1", "employees": 40});
    let claimed = store
        .claim_result("r1", &result, 5_000, Some(3.0), false)
        .await
        .unwrap();
    assert_eq!(claimed.unwrap().key, "acme.com");
    assert!(
        store
            .claim_result("r1", &result, 6_000, Some(3.0), false)
            .await
            .unwrap()
            .is_none(),
        "a duplicate callback claims nothing"
    );
    assert_eq!(
        store.dedupe_lookup("acme.com").await.unwrap(),
        Some((5_000, result.to_string()))
    );
    assert_eq!(
        store.row_state("r1").await.unwrap(),
        Some(RowState::Enriched {
            result,
            at_ms: 5_000
        })
    );
    let owed = store.owed_settlements().await.unwrap();
    assert_eq!(
        (owed[0].row_id.as_str(), owed[0].reported),
        ("r1", Some(3.0))
    );
    assert_eq!(store.take_owed(&["r1"]).await.unwrap(), [true]);
    assert_eq!(
        store.take_owed(&["r1"]).await.unwrap(),
        [false],
        "taken once"
    );
    assert!(store.owed_settlements().await.unwrap().is_empty());
    let counters = store.counters().await.unwrap();
    assert_eq!(
        (
            counters["submitted"],
            counters["enriched"],
            counters["duplicateCallbacks"]
        ),
        (1, 1, 1)
    );
}

#[tokio::test]
async fn an_owed_delivery_is_kept_until_the_sink_took_it_or_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("kiln.redb")).unwrap();
    for id in ["r1", "r2"] {
        store
            .make_pending(&pending(id, &format!("{id}.com"), "x"), 1_000)
            .await
            .unwrap();
        store
            .claim_result(id, &json!({"kiln_row_id": id}), 2_000, None, true)
            .await
            .unwrap();
    }
    let owed = store.outbox(10).await.unwrap();
    assert_eq!(owed.len(), 2);
    assert_eq!(owed[0].row, json!({"domain": "r1.com"}));
    store.outbox_done("r1", None).await.unwrap();
    let failure = SinkFailure {
        reason: "SinkFailed".into(),
        detail: "the sink answered HTTP 400".into(),
        attempts: 1,
        row: owed[1].row.clone(),
    };
    store
        .outbox_done("r2", Some(failure.clone()))
        .await
        .unwrap();
    // Completing twice (a crash after the sink answered) counts once.
    store.outbox_done("r1", None).await.unwrap();
    assert!(store.outbox(10).await.unwrap().is_empty());
    assert_eq!(store.sink_failure("r2").await.unwrap(), Some(failure));
    let counters = store.counters().await.unwrap();
    assert_eq!((counters["delivered"], counters["deadLettered"]), (1, 1));
}

#[tokio::test]
async fn a_routine_run_is_remembered_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    for id in ["started", "unrecorded", "waiting"] {
        store
            .make_pending(&pending(id, &format!("{id}.com"), "x"), 1_000)
            .await
            .unwrap();
    }
    store.mark_started("started").await.unwrap();
    store.set_run("started", "run_1").await.unwrap();
    store.mark_started("unrecorded").await.unwrap();
    drop(store);
    let store = EmbeddedStore::open(&path).unwrap();
    let mut runs: Vec<(String, Option<String>)> = store
        .pending_rows()
        .await
        .unwrap()
        .into_iter()
        .map(|(p, run)| (p.row_id, run))
        .collect();
    runs.sort();
    assert_eq!(
        runs,
        vec![
            ("started".to_string(), Some("run_1".to_string())),
            ("unrecorded".to_string(), Some(String::new())),
            ("waiting".to_string(), None),
        ]
    );
}

#[tokio::test]
async fn expired_rows_are_leased_replaced_only_by_their_owner_and_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("kiln.redb")).unwrap();
    store
        .make_pending(&pending("r1", "a.com", "r1-a1"), 100)
        .await
        .unwrap();
    store
        .make_pending(&pending("r2", "b.com", "r2-a1"), 10_000)
        .await
        .unwrap();
    let expired = store.take_expired(500, 2_000, 10).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert!(
        store.take_expired(500, 2_000, 10).await.unwrap().is_empty(),
        "leased rows are not taken twice"
    );
    let next = PendingRow {
        attempt: 2,
        reservation: "r1-a2".into(),
        ..expired[0].clone()
    };
    assert!(!store.replace_pending(&next, 9_000, "stale").await.unwrap());
    assert!(store.replace_pending(&next, 9_000, "r1-a1").await.unwrap());
    assert!(
        store.replace_pending(&next, 9_000, "r1-a1").await.unwrap(),
        "the same write, retried, is answered the same"
    );
    let stranger = PendingRow {
        write_token: "t2".into(),
        ..next.clone()
    };
    assert!(
        !store
            .replace_pending(&stranger, 9_000, "r1-a1")
            .await
            .unwrap(),
        "another process's write of the same attempt loses"
    );
    let dead = store
        .dead_letter_pending("r1", "ResultTimeout")
        .await
        .unwrap();
    assert_eq!(dead.unwrap().attempt, 2);
    assert!(matches!(
        store.row_state("r1").await.unwrap(),
        Some(RowState::DeadLettered { reason, .. }) if reason == "ResultTimeout"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_made_at_once_are_each_committed_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    let writes = (0..200).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let id = format!("r{i}");
            store
                .make_pending(&pending(&id, &id, "x"), 1_000)
                .await
                .unwrap();
            // A second transition of the same row, likely in another group.
            store.set_deadline(&id, 2_000 + i).await.unwrap();
        })
    });
    for write in futures::future::join_all(writes).await {
        write.unwrap();
    }
    drop(store);

    let store = EmbeddedStore::open(&path).unwrap();
    let pending = store.pending_rows().await.unwrap();
    assert_eq!(pending.len(), 200);
    let (counts, total) = store.deadlines_up_to(&[1_999, 2_199]).await.unwrap();
    assert_eq!((counts, total), (vec![0, 200], 200));
    assert_eq!(store.counters().await.unwrap()["submitted"], 200);
}
