//! The attempt logic over an in-memory row store, a stand-in Clay webhook
//! and a stand-in lease API: every path a row can take from an attempt, and
//! that it ends in exactly one terminal state.

use axum::http::StatusCode;
use serde_json::json;

use super::*;
use crate::api::budget::OnExhausted;
use crate::dataplane::rows::Callback;
use crate::dataplane::rows::memory::{Terminal, pending};
use crate::dataplane::testing::{Rig, dead_lettered, refusal};

/// Draws for row `r1`'s first attempt, records it pending until `deadline`
/// and submits it.
async fn submit_first(rig: &Rig, deadline: i64) -> PendingRow {
    let draw = rig.attempts.draw().await.unwrap();
    let row = json!({"email": "a@example.com"});
    let first = rig
        .attempts
        .first_attempt("r1".into(), "a@example.com".into(), row, &draw);
    rig.rows.insert_pending(&first, deadline);
    rig.attempts.submit(&first, &draw).await.unwrap();
    first
}

/// Row `r1`'s first attempt, pending and past its deadline.
fn expired(rig: &Rig) -> PendingRow {
    let first = pending("r1", "a@example.com", "r1-a1");
    rig.rows.insert_pending(&first, 0);
    first
}

#[tokio::test]
async fn an_accepted_row_waits_for_its_result_from_acceptance() {
    let rig = Rig::new(StatusCode::OK, None, 3).await;
    let before = now_ms();
    let first = submit_first(&rig, rig.attempts.first_deadline()).await;
    assert_eq!((first.reservation.as_str(), first.attempt), ("r1-a1", 1));

    assert_eq!(rig.sent(), 1);
    let (_, deadline) = rig.rows.pending_row("r1").expect("still pending");
    let timeout = rig.attempts.result_timeout().as_millis() as i64;
    assert!(
        deadline >= before + timeout && deadline <= now_ms() + timeout,
        "the deadline runs from acceptance, not from the queue allowance"
    );
    assert!(rig.rows.terminal("r1").is_empty());
}

#[tokio::test]
async fn a_row_clay_refuses_for_good_is_dead_lettered_with_the_reason() {
    let rig = Rig::new(StatusCode::BAD_REQUEST, None, 3).await;
    submit_first(&rig, i64::MAX).await;

    assert_eq!(rig.sent(), 1, "not retried");
    assert_eq!(rig.rows.terminal("r1"), dead_lettered("Rejected"));
}

#[tokio::test]
async fn a_row_whose_result_never_came_is_retried_then_dead_lettered() {
    let rig = Rig::new(StatusCode::OK, None, 2).await;
    expired(&rig);

    rig.attempts.sweep().await.unwrap();
    let (second, deadline) = rig.rows.pending_row("r1").expect("retried");
    assert_eq!((second.attempt, second.reservation.as_str()), (2, "r1-a2"));
    assert!(deadline > now_ms(), "the retry has a deadline of its own");
    assert_eq!(rig.sent(), 1);

    // The second result never comes either: maxAttempts is reached.
    rig.rows.set_deadline("r1", 0).await.unwrap();
    rig.attempts.sweep().await.unwrap();
    assert_eq!(rig.sent(), 1, "not sent a third time");
    assert_eq!(rig.rows.terminal("r1"), dead_lettered("ResultTimeout"));
}

#[tokio::test]
async fn a_callback_that_wins_the_race_keeps_the_row_from_being_sent_again() {
    let rig = Rig::new(StatusCode::OK, None, 3).await;
    expired(&rig);
    let taken = rig.rows.take_expired(now_ms(), i64::MAX, 10).await;
    let taken = taken.unwrap().remove(0);
    let result = json!({"kiln_row_id": "r1", "phone": "+1 555"});
    let runtime = rig.attempts.runtime();
    let callback = Callback {
        row_id: "r1",
        result: &result,
        reported: None,
    };
    let claimed = rig.rows.claim_callback(&runtime, &callback);
    assert!(claimed.await.unwrap().is_some());

    rig.attempts.retry_or_dead_letter(taken).await.unwrap();
    assert_eq!(rig.sent(), 0);
    assert_eq!(rig.rows.terminal("r1"), vec![Terminal::Delivered(result)]);
}

#[tokio::test]
async fn an_exhausted_budget_that_dead_letters_ends_the_retry() {
    let denial = refusal(DenialReason::Exhausted, OnExhausted::DeadLetter);
    let rig = Rig::new(StatusCode::OK, denial, 3).await;
    expired(&rig);

    rig.attempts.sweep().await.unwrap();
    assert_eq!(rig.sent(), 0);
    assert_eq!(rig.rows.terminal("r1"), dead_lettered("BudgetExhausted"));
}

#[tokio::test]
async fn a_paused_budget_leaves_the_row_waiting_with_no_attempt_in_flight() {
    let denial = refusal(DenialReason::Paused, OnExhausted::Pause);
    let rig = Rig::new(StatusCode::OK, denial, 3).await;
    expired(&rig);

    rig.attempts.sweep().await.unwrap();
    let (waiting, deadline) = rig.rows.pending_row("r1").expect("still pending");
    assert_eq!(waiting.reservation, "", "no attempt in flight");
    assert_eq!(waiting.attempt, 1, "waiting is not an attempt");
    assert!(deadline > now_ms() && deadline <= now_ms() + RETRY_WITHOUT_CREDITS_MS);
    assert_eq!(rig.sent(), 0);
    assert!(rig.rows.terminal("r1").is_empty());
}

#[tokio::test]
async fn a_throttled_row_waits_without_using_an_attempt_or_counting_a_failure() {
    let rig = Rig::new(StatusCode::TOO_MANY_REQUESTS, None, 3).await;
    submit_first(&rig, i64::MAX).await;

    assert!(rig.sent() > 1, "the call was tried again after each 429");
    let (waiting, deadline) = rig.rows.pending_row("r1").expect("still pending");
    assert_eq!(waiting.reservation, "", "no attempt in flight");
    assert_eq!(waiting.attempt, 0, "the throttled attempt does not count");
    assert!(deadline <= now_ms(), "due for another try at once");
    assert!(rig.rows.terminal("r1").is_empty());
    assert_eq!(rig.failures_reported().await, 0, "throttling is no failure");
}

#[tokio::test]
async fn a_failing_clay_uses_up_an_attempt_and_counts_one_failure() {
    let rig = Rig::new(StatusCode::SERVICE_UNAVAILABLE, None, 3).await;
    submit_first(&rig, i64::MAX).await;

    let (waiting, _) = rig.rows.pending_row("r1").expect("still pending");
    assert_eq!(waiting.attempt, 1, "the failed attempt counts");
    assert_eq!(rig.failures_reported().await, 1);
}
