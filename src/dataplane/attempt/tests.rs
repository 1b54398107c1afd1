//! The attempt logic over an in-memory row store, a stand-in Clay webhook
//! and a stand-in lease API: every path a row can take from an attempt, and
//! that it ends in exactly one terminal state.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::http::StatusCode;
use serde_json::json;
use tokio::sync::watch;

use super::*;
use crate::api::budget::OnExhausted;
use crate::clay::rotation::MemoryCounter;
use crate::dataplane::rows::Callback;
use crate::dataplane::rows::memory::{MemoryRows, Terminal, pending};
use crate::dataplane::testing;
use crate::ledger::Denial;
use crate::ledger::lease::LeaseTarget;

struct Setup {
    attempts: Arc<Attempts>,
    rows: Arc<MemoryRows>,
    /// Rows Clay was sent.
    sent: Arc<AtomicUsize>,
}

/// A Queue table allowing `max_attempts`, whose Clay webhook answers
/// `clay`, on a budget that grants every ask or refuses with `denial`.
async fn setup(clay: StatusCode, denial: Option<Denial>, max_attempts: u32) -> Setup {
    let mut table = crate::operator::table::build::tests::queue_table();
    table.spec.clay.max_attempts = max_attempts;
    let (webhook, sent) = testing::clay_webhook(clay).await;
    let runtime = Arc::new(testing::runtime(&table, vec![webhook]));
    let target = LeaseTarget {
        namespace: "sales".into(),
        budget: "b".into(),
        table: "leads".into(),
        holder: "worker-0".into(),
    };
    let lease = CreditLease::start(
        target,
        &table.spec.clay.credits_per_row,
        testing::ledger(denial).await,
    );
    let rows = Arc::new(MemoryRows::default());
    let (_, runtime) = watch::channel(runtime);
    let counter = Arc::new(MemoryCounter::default());
    let attempts = Arc::new(Attempts {
        live: Live::follow(runtime, counter, &lease),
        rows: rows.clone(),
        lease,
    });
    Setup {
        attempts,
        rows,
        sent,
    }
}

fn refusal(reason: DenialReason, on_exhausted: OnExhausted) -> Option<Denial> {
    Some(Denial {
        reason,
        message: "refused".into(),
        on_exhausted,
    })
}

/// Draws for row `r1`'s first attempt, records it pending until `deadline`
/// and submits it.
async fn submit_first(setup: &Setup, deadline: i64) -> PendingRow {
    let draw = setup.attempts.draw().await.unwrap();
    let row = json!({"email": "a@example.com"});
    let first = setup
        .attempts
        .first_attempt("r1".into(), "a@example.com".into(), row, &draw);
    setup.rows.make_pending(&first, deadline);
    setup.attempts.submit(&first, &draw).await.unwrap();
    first
}

fn sent(setup: &Setup) -> usize {
    setup.sent.load(Ordering::SeqCst)
}

fn dead_lettered(reason: &str) -> Vec<Terminal> {
    vec![Terminal::DeadLettered(reason.into())]
}

/// Row `r1`'s first attempt, pending and past its deadline.
fn expired(setup: &Setup) -> PendingRow {
    let first = pending("r1", "a@example.com", "r1-a1");
    setup.rows.make_pending(&first, 0);
    first
}

#[tokio::test]
async fn an_accepted_row_waits_for_its_result_from_acceptance() {
    let setup = setup(StatusCode::OK, None, 3).await;
    let before = now_ms();
    let first = submit_first(&setup, setup.attempts.first_deadline()).await;
    assert_eq!((first.reservation.as_str(), first.attempt), ("r1-a1", 1));

    assert_eq!(sent(&setup), 1);
    let (_, deadline) = setup.rows.pending_row("r1").expect("still pending");
    let timeout = setup.attempts.result_timeout().as_millis() as i64;
    assert!(
        deadline >= before + timeout && deadline <= now_ms() + timeout,
        "the deadline runs from acceptance, not from the queue allowance"
    );
    assert!(setup.rows.terminal("r1").is_empty());
}

#[tokio::test]
async fn a_row_clay_refuses_for_good_is_dead_lettered_with_the_reason() {
    let setup = setup(StatusCode::BAD_REQUEST, None, 3).await;
    submit_first(&setup, i64::MAX).await;

    assert_eq!(sent(&setup), 1, "not retried");
    assert_eq!(setup.rows.terminal("r1"), dead_lettered("Rejected"));
}

#[tokio::test]
async fn a_row_whose_result_never_came_is_retried_then_dead_lettered() {
    let setup = setup(StatusCode::OK, None, 2).await;
    expired(&setup);

    setup.attempts.sweep().await.unwrap();
    let (second, deadline) = setup.rows.pending_row("r1").expect("retried");
    assert_eq!((second.attempt, second.reservation.as_str()), (2, "r1-a2"));
    assert!(deadline > now_ms(), "the retry has a deadline of its own");
    assert_eq!(sent(&setup), 1);

    // The second result never comes either: maxAttempts is reached.
    setup.rows.set_deadline("r1", 0).await.unwrap();
    setup.attempts.sweep().await.unwrap();
    assert_eq!(sent(&setup), 1, "not sent a third time");
    assert_eq!(setup.rows.terminal("r1"), dead_lettered("ResultTimeout"));
}

#[tokio::test]
async fn a_callback_that_wins_the_race_keeps_the_row_from_being_sent_again() {
    let setup = setup(StatusCode::OK, None, 3).await;
    expired(&setup);
    let taken = setup.rows.take_expired(now_ms(), i64::MAX, 10).await;
    let taken = taken.unwrap().remove(0);
    let result = json!({"kiln_row_id": "r1", "phone": "+1 555"});
    let runtime = setup.attempts.runtime();
    let callback = Callback {
        row_id: "r1",
        result: &result,
        reported: None,
    };
    let claimed = setup.rows.claim_callback(&runtime, &callback);
    assert!(claimed.await.unwrap().is_some());

    setup.attempts.retry_or_dead_letter(taken).await.unwrap();
    assert_eq!(sent(&setup), 0);
    assert_eq!(setup.rows.terminal("r1"), vec![Terminal::Delivered(result)]);
}

#[tokio::test]
async fn an_exhausted_budget_that_dead_letters_ends_the_retry() {
    let denial = refusal(DenialReason::Exhausted, OnExhausted::DeadLetter);
    let setup = setup(StatusCode::OK, denial, 3).await;
    expired(&setup);

    setup.attempts.sweep().await.unwrap();
    assert_eq!(sent(&setup), 0);
    assert_eq!(setup.rows.terminal("r1"), dead_lettered("BudgetExhausted"));
}

#[tokio::test]
async fn a_paused_budget_leaves_the_row_waiting_with_no_attempt_in_flight() {
    let denial = refusal(DenialReason::Paused, OnExhausted::Pause);
    let setup = setup(StatusCode::OK, denial, 3).await;
    expired(&setup);

    setup.attempts.sweep().await.unwrap();
    let (waiting, deadline) = setup.rows.pending_row("r1").expect("still pending");
    assert_eq!(waiting.reservation, "", "no attempt in flight");
    assert_eq!(waiting.attempt, 1, "waiting is not an attempt");
    assert!(deadline > now_ms() && deadline <= now_ms() + RETRY_WITHOUT_CREDITS_MS);
    assert_eq!(sent(&setup), 0);
    assert!(setup.rows.terminal("r1").is_empty());
}
