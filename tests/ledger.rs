//! The credit ledger against the real control plane, trying to break the
//! invariant: concurrent over-asking clients, a leader killed mid-run, a
//! holder that vanishes, period rollover, the breaker, and authorization.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use serde_json::{Value, json};

use kiln::api::table::CreditCost;
use kiln::api::{CreditBudget, EnrichmentTable};
use kiln::clay::SecretString;
use kiln::ledger::client::{LedgerClient, LedgerClientError, TokenSource};
use kiln::ledger::{DenialReason, ReserveRequest, SettleRequest};
use support::{TestEnv, wait};

fn table(name: &str, budget: &str) -> Value {
    json!({
        "apiVersion": "kiln.dev/v1alpha1", "kind": "EnrichmentTable", "metadata": {"name": name},
        "spec": {
            "tier": "Direct", "key": "email", "budgetRef": {"name": budget},
            "clay": {
                "webhookSources": [{"name": "primary", "urlSecretRef": {"name": "clay", "key": "url"}}],
                "creditsPerRow": {"dataCredits": 1.0},
                "callbackTokenSecretRef": {"name": "clay", "key": "callback"}
            },
            "source": {"http": {"authTokenSecretRef": {"name": "clay", "key": "ingest"}}}
        }
    })
}

/// A budget, a table drawing on it (so the operator creates `kiln-<table>`),
/// and a token of that ServiceAccount.
async fn setup(env: &TestEnv, budget_spec: Value) -> SecretString {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("clay".into()),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([
            ("url".to_string(), "http://clay.invalid/hook".to_string()),
            ("callback".to_string(), "cb".to_string()),
            ("ingest".to_string(), "in".to_string()),
        ])),
        ..Default::default()
    };
    env.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    support::create::<CreditBudget>(env, json!({"apiVersion": "kiln.dev/v1alpha1", "kind": "CreditBudget", "metadata": {"name": "team"}, "spec": budget_spec})).await;
    support::create::<EnrichmentTable>(env, table("leads", "team")).await;
    token_for(env, &env.namespace, "kiln-leads").await
}

async fn token_for(env: &TestEnv, namespace: &str, account: &str) -> SecretString {
    SecretString::new(support::service_account_token(&env.client, namespace, account).await)
}

fn ledger(ports: &[u16], token: SecretString) -> LedgerClient {
    LedgerClient::new(
        ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect(),
        TokenSource::Static(token),
    )
}

fn reserve_request(env: &TestEnv, id: String, ask: f64, min: f64, ttl: u64) -> ReserveRequest {
    ReserveRequest {
        id,
        namespace: env.namespace.clone(),
        budget: "team".into(),
        table: "leads".into(),
        holder: "test".into(),
        ask: CreditCost {
            data_credits: ask,
            actions: 0,
        },
        min: CreditCost {
            data_credits: min,
            actions: 0,
        },
        ttl_seconds: ttl,
    }
}

fn settle_request(env: &TestEnv, reservation: &str, used: f64, failures: u64) -> SettleRequest {
    SettleRequest {
        namespace: env.namespace.clone(),
        budget: "team".into(),
        table: "leads".into(),
        reservation: reservation.into(),
        seq: 1,
        used: CreditCost {
            data_credits: used,
            actions: 0,
        },
        release: true,
        successes: 0,
        failures,
    }
}

async fn budget_status(env: &TestEnv) -> kiln::api::CreditBudgetStatus {
    env.api::<CreditBudget>()
        .get("team")
        .await
        .unwrap()
        .status
        .unwrap_or_default()
}

/// Clients that reserve blocks of `ask` (10× a row) and spend all of it,
/// until the budget says no. Returns the total granted.
async fn spend_until_denied(
    env: &Arc<TestEnv>,
    client: &Arc<LedgerClient>,
    clients: usize,
    ask: f64,
) -> f64 {
    let granted_milli = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (env, client, granted_milli) = (env.clone(), client.clone(), granted_milli.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let request = reserve_request(&env, format!("c{c}-{i}"), ask, ask / 10.0, 60);
                match client.reserve(&request).await {
                    Ok(grant) => {
                        granted_milli.fetch_add(
                            (grant.granted.data_credits * 1000.0).round() as u64,
                            Ordering::SeqCst,
                        );
                        match client
                            .settle(&settle_request(
                                &env,
                                &grant.id,
                                grant.granted.data_credits,
                                0,
                            ))
                            .await
                        {
                            // A retried release whose first attempt landed finds the reservation closed.
                            Ok(()) | Err(LedgerClientError::Rejected { status: 409, .. }) => {}
                            Err(other) => panic!("settle failed: {other}"),
                        }
                    }
                    Err(LedgerClientError::Denied(denial)) => {
                        assert_eq!(denial.reason, DenialReason::Exhausted);
                        return;
                    }
                    Err(other) => panic!("reserve failed: {other}"),
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    granted_milli.load(Ordering::SeqCst) as f64 / 1000.0
}

#[tokio::test]
async fn concurrent_over_asking_clients_never_exceed_the_limit() {
    let env = Arc::new(support::test_env("ledger-concurrent").await);
    support::install_kiln_crds(&env.client).await;
    let operator = support::start_operator(&env.namespace, "op-a").await;
    let token = setup(&env, json!({"limits": {"dataCredits": 100.0}})).await;
    let client = Arc::new(ledger(&[operator.api_port], token));

    let granted = spend_until_denied(&env, &client, 12, 10.0).await;
    assert_eq!(granted, 100.0, "exactly the limit was granted, never more");
    let status = budget_status(&env).await;
    assert_eq!(status.used.data_credits, 100.0);
    assert!(status.reservations.is_empty());
    assert!(status.denials >= 12, "every client was refused at the end");
    assert_eq!(status.state, kiln::api::budget::BudgetState::Exhausted);
    assert_eq!(status.tables[0].table, "leads");
    assert_eq!(status.tables[0].used.data_credits, 100.0);
    // Prometheus sees the same numbers.
    let (_, metrics) = operator.health_get("/metrics").await.unwrap();
    let used_line = format!(
        "kiln_budget_used{{namespace=\"{}\",budget=\"team\",meter=\"data_credits\"}} 100.0",
        env.namespace
    );
    assert!(
        metrics.contains(&used_line),
        "{used_line} not in:\n{metrics}"
    );
    assert!(
        metrics.contains("kiln_budget_breaker_state{"),
        "breaker state exported"
    );
    // The table reports its own spend this period.
    wait::until("the table's credits this period", || async {
        let table = env.api::<EnrichmentTable>().get("leads").await.ok()?;
        (table.status?.credits_this_period.data_credits == 100.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn killing_the_leader_mid_run_loses_nothing_and_overspends_nothing() {
    let env = Arc::new(support::test_env("ledger-failover").await);
    support::install_kiln_crds(&env.client).await;
    let mut first = support::start_operator(&env.namespace, "op-first").await;
    let token = setup(&env, json!({"limits": {"dataCredits": 300.0}})).await;
    wait::until("op-first leads", || async {
        (first.health_get("/readyz").await?.0 == 200).then_some(())
    })
    .await;
    let second = support::start_operator(&env.namespace, "op-second").await;
    let client = Arc::new(ledger(&[first.api_port, second.api_port], token));

    let spender = {
        let (env, client) = (env.clone(), client.clone());
        tokio::spawn(async move { spend_until_denied(&env, &client, 6, 5.0).await })
    };
    wait::until("a third of the budget spent", || async {
        (budget_status(&env).await.used.data_credits >= 100.0).then_some(())
    })
    .await;
    first.process.kill_hard();
    let granted = spender.await.unwrap();

    let status = budget_status(&env).await;
    assert_eq!(
        granted, 300.0,
        "the clients got the whole budget across the failover"
    );
    assert_eq!(
        status.used.data_credits, 300.0,
        "every grant is accounted exactly once"
    );
    assert!(status.reservations.is_empty());
}

#[tokio::test]
async fn a_holder_that_vanishes_forfeits_its_reservation_as_spent() {
    let env = support::test_env("ledger-forfeit").await;
    support::install_kiln_crds(&env.client).await;
    let operator = support::start_operator(&env.namespace, "op-a").await;
    let token = setup(&env, json!({"limits": {"dataCredits": 50.0}})).await;
    let client = ledger(&[operator.api_port], token);

    let grant = client
        .reserve(&reserve_request(&env, "lost".into(), 20.0, 1.0, 2))
        .await
        .unwrap();
    assert_eq!(grant.granted.data_credits, 20.0);
    assert_eq!(
        budget_status(&env).await.reserved.data_credits,
        20.0,
        "recorded before it was granted"
    );
    // The holder never settles or renews (it was killed).
    let status = wait::until("the reservation forfeited", || async {
        let status = budget_status(&env).await;
        status.reservations.is_empty().then_some(status)
    })
    .await;
    assert_eq!(status.used.data_credits, 20.0, "counted as spent");
    assert_eq!(status.remaining.data_credits, 30.0);
    // A late settlement cannot bring the credits back.
    let late = client.settle(&settle_request(&env, "lost", 0.0, 0)).await;
    assert!(
        matches!(late, Err(LedgerClientError::Rejected { status: 409, .. })),
        "{late:?}"
    );
}

#[tokio::test]
async fn period_rollover_archives_usage_and_resets() {
    let env = Arc::new(support::test_env("ledger-rollover").await);
    support::install_kiln_crds(&env.client).await;
    let mut today = support::start_operator(&env.namespace, "op-today").await;
    let token = setup(
        &env,
        json!({"limits": {"dataCredits": 10.0}, "period": "Daily", "timeZone": "UTC"}),
    )
    .await;
    let client = Arc::new(ledger(&[today.api_port], token.clone()));
    assert_eq!(spend_until_denied(&env, &client, 2, 5.0).await, 10.0);
    let before = budget_status(&env).await;
    let period_end = before.period_end.clone().unwrap().0;
    today.process.stop(std::time::Duration::from_secs(10));

    // The next operator's clock is past midnight UTC.
    let skew = (period_end.as_second() - jiff::Timestamp::now().as_second() + 60).to_string();
    let tomorrow = support::start_operator_with(
        &env.namespace,
        "op-tomorrow",
        &["--clock-skew-seconds", &skew],
    )
    .await;
    let status = wait::until("the period rolled over", || async {
        let status = budget_status(&env).await;
        (status.period_start.as_ref()?.0 == period_end).then_some(status)
    })
    .await;
    assert_eq!(status.used.data_credits, 0.0);
    assert_eq!(status.history[0].used.data_credits, 10.0);
    assert_eq!(status.history[0].period_end.0, period_end);
    assert_eq!(status.state, kiln::api::budget::BudgetState::Active);
    // Spending resumes in the new period.
    let client = Arc::new(ledger(&[tomorrow.api_port], token));
    assert_eq!(spend_until_denied(&env, &client, 1, 5.0).await, 10.0);
}

#[tokio::test]
async fn the_breaker_opens_on_reported_failures_and_refuses_credits() {
    let env = support::test_env("ledger-breaker").await;
    support::install_kiln_crds(&env.client).await;
    let operator = support::start_operator(&env.namespace, "op-a").await;
    let token = setup(
        &env,
        json!({"limits": {"dataCredits": 100.0}, "circuitBreaker": {"minCalls": 4, "errorPercent": 50, "cooldown": "1h"}}),
    )
    .await;
    let client = ledger(&[operator.api_port], token);
    let grant = client
        .reserve(&reserve_request(&env, "r1".into(), 4.0, 1.0, 60))
        .await
        .unwrap();
    client
        .settle(&settle_request(&env, &grant.id, 0.0, 4))
        .await
        .unwrap();
    let status = budget_status(&env).await;
    assert_eq!(status.breaker.state, kiln::api::budget::BreakerState::Open);
    assert_eq!(status.state, kiln::api::budget::BudgetState::BreakerOpen);
    let refused = client
        .reserve(&reserve_request(&env, "r2".into(), 4.0, 1.0, 60))
        .await;
    match refused {
        Err(LedgerClientError::Denied(denial)) => {
            assert_eq!(denial.reason, DenialReason::BreakerOpen)
        }
        other => panic!("expected a BreakerOpen denial, got {other:?}"),
    }
}

#[tokio::test]
async fn only_the_tables_own_service_account_may_draw() {
    let env = support::test_env("ledger-authz").await;
    support::install_kiln_crds(&env.client).await;
    let operator = support::start_operator(&env.namespace, "op-a").await;
    let token = setup(&env, json!({"limits": {"dataCredits": 100.0}})).await;
    let endpoint = [operator.api_port];

    // A ServiceAccount of the same name in another namespace.
    let other = support::test_env("ledger-authz-other").await;
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("kiln-leads".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    other
        .api::<ServiceAccount>()
        .create(&PostParams::default(), &account)
        .await
        .unwrap();
    let foreign = token_for(&env, &other.namespace, "kiln-leads").await;
    let refused = ledger(&endpoint, foreign)
        .reserve(&reserve_request(&env, "x1".into(), 1.0, 1.0, 60))
        .await;
    assert!(
        matches!(
            refused,
            Err(LedgerClientError::Rejected { status: 403, .. })
        ),
        "{refused:?}"
    );

    // Another account in the same namespace.
    let stranger = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("stranger".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    env.api::<ServiceAccount>()
        .create(&PostParams::default(), &stranger)
        .await
        .unwrap();
    let stranger_token = token_for(&env, &env.namespace, "stranger").await;
    let refused = ledger(&endpoint, stranger_token)
        .reserve(&reserve_request(&env, "x2".into(), 1.0, 1.0, 60))
        .await;
    assert!(
        matches!(
            refused,
            Err(LedgerClientError::Rejected { status: 403, .. })
        ),
        "{refused:?}"
    );

    // A forged token.
    let refused = ledger(&endpoint, "not-a-token".into())
        .reserve(&reserve_request(&env, "x3".into(), 1.0, 1.0, 60))
        .await;
    assert!(
        matches!(
            refused,
            Err(LedgerClientError::Rejected { status: 401, .. })
        ),
        "{refused:?}"
    );

    // The right account, but a budget its table does not reference.
    let mut wrong_budget = reserve_request(&env, "x4".into(), 1.0, 1.0, 60);
    wrong_budget.budget = "someone-elses".into();
    let refused = ledger(&endpoint, token.clone())
        .reserve(&wrong_budget)
        .await;
    assert!(
        matches!(
            refused,
            Err(LedgerClientError::Rejected { status: 403, .. })
        ),
        "{refused:?}"
    );

    // And the right request succeeds.
    ledger(&endpoint, token)
        .reserve(&reserve_request(&env, "ok".into(), 1.0, 1.0, 60))
        .await
        .unwrap();
    assert_eq!(
        budget_status(&env).await.denials,
        0,
        "refused callers never reached the ledger"
    );
}

#[tokio::test]
async fn pausing_a_budget_stops_grants_at_once_and_unpausing_resumes() {
    let env = support::test_env("ledger-paused").await;
    support::install_kiln_crds(&env.client).await;
    let operator = support::start_operator(&env.namespace, "op-a").await;
    let token = setup(&env, json!({"limits": {"dataCredits": 100.0}})).await;
    let client = ledger(&[operator.api_port], token);
    client
        .reserve(&reserve_request(&env, "before".into(), 1.0, 1.0, 60))
        .await
        .unwrap();

    let budgets = env.api::<CreditBudget>();
    let pause = |paused: bool| json!({"spec": {"paused": paused}});
    budgets
        .patch(
            "team",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(pause(true)),
        )
        .await
        .unwrap();
    match client
        .reserve(&reserve_request(&env, "while-paused".into(), 1.0, 1.0, 60))
        .await
    {
        Err(LedgerClientError::Denied(denial)) => {
            assert_eq!(denial.reason, DenialReason::Paused);
            assert!(denial.message.contains("paused"), "{}", denial.message);
        }
        other => panic!("expected a Paused denial, got {other:?}"),
    }
    let status = wait::until("the Paused state", || async {
        let status = budget_status(&env).await;
        (status.state == kiln::api::budget::BudgetState::Paused).then_some(status)
    })
    .await;
    assert_eq!(
        status.reservations.len(),
        1,
        "the earlier grant is untouched"
    );

    budgets
        .patch(
            "team",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(pause(false)),
        )
        .await
        .unwrap();
    client
        .reserve(&reserve_request(&env, "after".into(), 1.0, 1.0, 60))
        .await
        .unwrap();
}
