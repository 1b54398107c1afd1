//! A worker's row handling over an in-memory row store, a stand-in Clay
//! webhook and a stand-in lease API: each way a row read from the source can
//! go, its entry acknowledged once, and Clay sent only what needs enriching.

use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use super::Item;
use super::handling::{Handled, RowHandling};
use crate::api::budget::OnExhausted;
use crate::dataplane::rows::memory::Terminal;
use crate::dataplane::rows::{Callback, RowStore};
use crate::dataplane::store::SourceEntry;
use crate::dataplane::testing::{Rig, dead_lettered, refusal};
use crate::ledger::{Denial, DenialReason};

async fn worker(denial: Option<Denial>) -> (Rig, Arc<RowHandling>) {
    let rig = Rig::new(StatusCode::OK, denial, 3).await;
    let handling = RowHandling {
        attempts: rig.attempts.clone(),
        rows: rig.rows.clone(),
    };
    (rig, Arc::new(handling))
}

/// Row `row_id` as read from a Redis Stream, its text `raw`.
fn streamed(row_id: &str, raw: &str) -> Item {
    Item {
        entry: SourceEntry::Stream {
            stream: "in".into(),
            group: "kiln-leads".into(),
            id: "1-0".into(),
        },
        row_id: row_id.into(),
        raw: Some(raw.into()),
    }
}

/// Handles row `row_id` read from a Redis Stream as `raw`.
async fn handle(handling: &Arc<RowHandling>, row_id: &str, raw: &str) -> Handled {
    handle_item(handling, streamed(row_id, raw)).await
}

/// Handles one item as the worker handles a batch read from its source.
async fn handle_item(handling: &Arc<RowHandling>, item: Item) -> Handled {
    let permits = Arc::new(Semaphore::new(1));
    let (retry, paused) = handling.handle_all(vec![item], &permits).await;
    if paused {
        return Handled::Paused;
    }
    assert!(retry.is_empty(), "handling the row failed");
    Handled::Done
}

fn lead(email: &str) -> String {
    json!({"email": email, "company": "Acme"}).to_string()
}

#[tokio::test]
async fn rows_that_cannot_be_enriched_are_dead_lettered_with_their_reason() {
    let (rig, handling) = worker(None).await;
    for (row_id, raw, reason) in [
        ("r1", "{not json", "InvalidRow"),
        ("r2", "[1, 2]", "InvalidRow"),
        ("r3", r#"{"company": "Acme"}"#, "MissingKey"),
    ] {
        let handled = handle(&handling, row_id, raw).await;
        assert!(matches!(handled, Handled::Done));
        assert_eq!(rig.rows.terminal(row_id), dead_lettered(reason), "{raw}");
        assert_eq!(rig.rows.acknowledged(row_id), 1);
    }
    assert_eq!(rig.sent(), 0);
}

#[tokio::test]
async fn a_new_row_is_made_pending_with_its_entry_acknowledged_and_sent_once() {
    let (rig, handling) = worker(None).await;
    handle(&handling, "r1", &lead("a@example.com")).await;
    let (pending, _) = rig.rows.pending_row("r1").expect("pending");
    assert_eq!(
        (pending.reservation.as_str(), pending.key.as_str()),
        ("r1-a1", "a@example.com")
    );
    assert_eq!((rig.rows.acknowledged("r1"), rig.sent()), (1, 1));

    // The same Kafka record again (a rebalance): recognised, not sent.
    let mut replay = streamed("r1", &lead("a@example.com"));
    replay.entry = SourceEntry::Kafka;
    handle_item(&handling, replay).await;
    assert_eq!(rig.sent(), 1);
    assert!(rig.rows.terminal("r1").is_empty());
}

#[tokio::test]
async fn a_key_enriched_within_the_window_is_served_from_the_index_unless_refreshed() {
    let (rig, handling) = worker(None).await;
    handle(&handling, "r1", &lead("a@example.com")).await;
    let result = json!({"email": "a@example.com", "phone": "+1 555"});
    let runtime = rig.attempts.runtime();
    let callback = Callback {
        row_id: "r1",
        result: &result,
        reported: Some(2.0),
    };
    rig.rows.claim_callback(&runtime, &callback).await.unwrap();

    handle(&handling, "r2", &lead("a@example.com")).await;
    assert_eq!(rig.rows.terminal("r2"), vec![Terminal::Delivered(result)]);
    assert_eq!(
        (rig.rows.acknowledged("r2"), rig.sent()),
        (1, 1),
        "no second charge"
    );

    let mut refresh: Value = serde_json::from_str(&lead("a@example.com")).unwrap();
    refresh["kiln_refresh"] = json!(true);
    handle(&handling, "r3", &refresh.to_string()).await;
    assert!(
        rig.rows.pending_row("r3").is_some(),
        "a refresh enriches again"
    );
    assert_eq!(rig.sent(), 2);
}

#[tokio::test]
async fn an_exhausted_budget_dead_letters_or_pauses_as_it_asks() {
    let denial = refusal(DenialReason::Exhausted, OnExhausted::DeadLetter);
    let (rig, handling) = worker(denial).await;
    handle(&handling, "r1", &lead("a@example.com")).await;
    assert_eq!(rig.rows.terminal("r1"), dead_lettered("BudgetExhausted"));

    let denial = refusal(DenialReason::Paused, OnExhausted::Pause);
    let (rig, handling) = worker(denial).await;
    let handled = handle(&handling, "r1", &lead("a@example.com")).await;
    assert!(matches!(handled, Handled::Paused));
    assert_eq!(
        rig.rows.acknowledged("r1"),
        0,
        "the row stays in the source until the budget allows it"
    );
    assert_eq!(rig.sent(), 0);
}
