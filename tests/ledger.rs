//! The credit ledger against the real control plane, trying to break the
//! invariant: concurrent holders drawing through leases, a leader killed
//! mid-run, a holder that vanishes, period rollover, the breaker, malformed
//! amounts, and authorization.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use serde_json::{Value, json};

use kiln::api::table::CreditCost;
use kiln::api::{CreditBudget, EnrichmentTable};
use kiln::ledger::client::{LedgerClient, LedgerClientError, TokenSource};
use kiln::ledger::lease::{CreditLease, LeaseTarget};
use kiln::ledger::{DenialReason, LeaseRequest};
use kiln::secret::SecretString;
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
    SecretString::new(support::ledger_token(&env.client, namespace, account).await)
}

fn ledger(ports: &[u16], token: SecretString) -> LedgerClient {
    LedgerClient::new(
        ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect(),
        TokenSource::Static(token),
        None,
    )
    .unwrap()
}

fn credits(data: f64) -> CreditCost {
    CreditCost {
        data_credits: data,
        actions: 0,
    }
}

/// A raw lease request of table `leads` on budget `team`.
fn request(env: &TestEnv, lease: &str, seq: u64) -> LeaseRequest {
    LeaseRequest {
        namespace: env.namespace.clone(),
        budget: "team".into(),
        table: "leads".into(),
        holder: "test".into(),
        lease: lease.into(),
        seq,
        row_cost: credits(1.0),
        ttl_seconds: 60,
        ..Default::default()
    }
}

/// A data-plane process's lease, as workers and receivers hold them.
fn holder(env: &TestEnv, ports: &[u16], token: &SecretString, name: &str) -> Arc<CreditLease> {
    CreditLease::start(
        LeaseTarget {
            namespace: env.namespace.clone(),
            budget: "team".into(),
            table: "leads".into(),
            holder: name.into(),
        },
        &credits(1.0),
        ledger(ports, token.clone()),
    )
}

async fn budget_status(env: &TestEnv) -> kiln::api::CreditBudgetStatus {
    env.api::<CreditBudget>()
        .get("team")
        .await
        .unwrap()
        .status
        .unwrap_or_default()
}

/// Holders drawing one-credit rows (`pace` apart, else as fast as they
/// can) until the budget refuses. Returns rows drawn per holder.
async fn draw_until_refused(
    holders: &[Arc<CreditLease>],
    pace: Option<std::time::Duration>,
) -> Vec<u64> {
    let tasks = holders.iter().map(|lease| {
        let lease = lease.clone();
        tokio::spawn(async move {
            let mut drawn = 0u64;
            loop {
                match lease.draw(&credits(1.0)).await {
                    Ok(_) => drawn += 1,
                    Err(LedgerClientError::Denied(denial)) => {
                        assert_eq!(denial.reason, DenialReason::Exhausted);
                        return drawn;
                    }
                    Err(other) => panic!("draw failed: {other}"),
                }
                if let Some(pace) = pace {
                    tokio::time::sleep(pace).await;
                }
            }
        })
    });
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

/// Samples the budget's status until stopped, asserting the invariant on
/// every state the ledger wrote.
fn watch_invariant(env: &Arc<TestEnv>, limit: f64) -> tokio::task::JoinHandle<usize> {
    let env = env.clone();
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            let status = budget_status(&env).await;
            let committed = status.used.data_credits + status.reserved.data_credits;
            assert!(
                committed <= limit + 1e-9,
                "used {} + held {} exceeds the limit {limit}",
                status.used.data_credits,
                status.reserved.data_credits
            );
            seen += 1;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            if seen > 100_000 {
                return seen;
            }
        }
    })
}

/// Closes every holder's lease, waits until the budget shows none, and
/// checks the invariant watcher never failed.
async fn close_all(
    env: &TestEnv,
    holders: &[Arc<CreditLease>],
    invariant: tokio::task::JoinHandle<usize>,
) -> kiln::api::CreditBudgetStatus {
    for lease in holders {
        lease.close().await;
    }
    let status = wait::until("every lease closed", || async {
        let status = budget_status(env).await;
        status.leases.is_empty().then_some(status)
    })
    .await;
    assert!(
        !invariant.is_finished(),
        "the invariant held at every sample"
    );
    invariant.abort();
    status
}

#[tokio::test]
async fn concurrent_holders_drawing_through_leases_never_exceed_the_limit_and_none_starves() {
    let env = Arc::new(support::test_env("ledger-concurrent").await);
    support::install_kiln_crds(&env.client).await;
    let operator = support::start_operator(&env.namespace, "op-a").await;
    let token = setup(&env, json!({"limits": {"dataCredits": 200.0}})).await;
    let invariant = watch_invariant(&env, 200.0);
    let holders: Vec<_> = (0..6)
        .map(|i| holder(&env, &[operator.api_port], &token, &format!("pod-{i}")))
        .collect();

    let drawn = draw_until_refused(&holders, None).await;
    assert_eq!(
        drawn.iter().sum::<u64>(),
        200,
        "exactly the limit was drawn: {drawn:?}"
    );
    assert!(drawn.iter().all(|d| *d > 0), "no holder starved: {drawn:?}");
    let status = close_all(&env, &holders, invariant).await;
    assert_eq!(status.used.data_credits, 200.0);
    assert_eq!(status.state, kiln::api::budget::BudgetState::Exhausted);
    assert_eq!(status.tables[0].table, "leads");
    assert_eq!(status.tables[0].used.data_credits, 200.0);
    // Prometheus sees the same numbers.
    let (_, metrics) = operator.health_get("/metrics").await.unwrap();
    let used_line = format!(
        "kiln_budget_used{{namespace=\"{}\",budget=\"team\",meter=\"data_credits\"}} 200.0",
        env.namespace
    );
    assert!(
        metrics.contains(&used_line),
        "{used_line} not in:\n{metrics}"
    );
    // The table reports its own spend this period.
    wait::until("the table's credits this period", || async {
        let table = env.api::<EnrichmentTable>().get("leads").await.ok()?;
        (table.status?.credits_this_period.data_credits == 200.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn refunds_bring_used_down_to_what_clay_charged_and_less_than_a_row_left_is_exhausted() {
    let env = Arc::new(support::test_env("ledger-refunds").await);
    support::install_kiln_crds(&env.client).await;
    let operator = support::start_operator(&env.namespace, "op-a").await;
    let token = setup(&env, json!({"limits": {"dataCredits": 10.0}})).await;
    let row = credits(4.0);
    let lease = CreditLease::start(
        LeaseTarget {
            namespace: env.namespace.clone(),
            budget: "team".into(),
            table: "leads".into(),
            holder: "pod".into(),
        },
        &row,
        ledger(&[operator.api_port], token),
    );
    let first = lease.draw(&row).await.unwrap();
    let second = lease.draw(&row).await.unwrap();
    match lease.draw(&row).await {
        Err(LedgerClientError::Denied(denial)) => {
            assert_eq!(denial.reason, DenialReason::Exhausted);
            assert!(
                denial.message.contains("one row needs 4"),
                "{}",
                denial.message
            );
        }
        other => panic!("a third row of 4 does not fit in 10: {other:?}"),
    }
    // 2 credits remain: less than a row, so the budget says Exhausted at 80%.
    let status = wait::until("Exhausted below one row", || async {
        let status = budget_status(&env).await;
        (status.state == kiln::api::budget::BudgetState::Exhausted).then_some(status)
    })
    .await;
    assert_eq!(status.percent_used, 80);
    // Clay charged 1.5 and 2.5; a third result claims a negative cost.
    lease.settle_row(&first.cost, &first.period, Some(1.5), None);
    lease.settle_row(&second.cost, &second.period, Some(2.5), None);
    lease.settle_row(&row, &first.period, Some(-8000.0), None);
    lease.close().await;
    let status = wait::until("refunds applied", || async {
        let status = budget_status(&env).await;
        status.leases.is_empty().then_some(status)
    })
    .await;
    assert_eq!(
        status.used.data_credits, 4.0,
        "8 drawn, 4 refunded, the negative cost ignored"
    );
    assert_eq!(status.state, kiln::api::budget::BudgetState::Active);
    let (_, metrics) = operator.health_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("kiln_ledger_implausible_costs_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn killing_the_leader_mid_run_loses_nothing_and_overspends_nothing() {
    let env = Arc::new(support::test_env("ledger-failover").await);
    support::install_kiln_crds(&env.client).await;
    let mut first = support::start_operator(&env.namespace, "op-first").await;
    let token = setup(&env, json!({"limits": {"dataCredits": 300.0}})).await;
    wait::until("op-first leads", || async {
        first.leads().await?.then_some(())
    })
    .await;
    let second = support::start_operator(&env.namespace, "op-second").await;
    let invariant = watch_invariant(&env, 300.0);
    let ports = [first.api_port, second.api_port];
    let holders: Vec<_> = (0..4)
        .map(|i| holder(&env, &ports, &token, &format!("pod-{i}")))
        .collect();
    // Slow enough that the kill lands mid-run.
    let drawing = {
        let holders = holders.clone();
        tokio::spawn(async move {
            draw_until_refused(&holders, Some(std::time::Duration::from_millis(5))).await
        })
    };
    wait::until("a third of the budget spent", || async {
        (budget_status(&env).await.used.data_credits >= 100.0).then_some(())
    })
    .await;
    first.process.kill_hard();
    let drawn: u64 = drawing.await.unwrap().into_iter().sum();
    let status = close_all(&env, &holders, invariant).await;
    assert_eq!(
        drawn, 300,
        "the holders got the whole budget across the failover"
    );
    assert_eq!(
        status.used.data_credits, 300.0,
        "every draw is accounted exactly once"
    );
}

#[tokio::test]
async fn a_holder_that_vanishes_forfeits_its_lease_as_spent() {
    let env = support::test_env("ledger-forfeit").await;
    support::install_kiln_crds(&env.client).await;
    let operator = support::start_operator(&env.namespace, "op-a").await;
    let token = setup(&env, json!({"limits": {"dataCredits": 50.0}})).await;
    let client = ledger(&[operator.api_port], token);

    let answer = client
        .lease(&LeaseRequest {
            ask: credits(20.0),
            ttl_seconds: 2,
            ..request(&env, "lost", 1)
        })
        .await
        .unwrap();
    assert_eq!(answer.granted.data_credits, 20.0);
    assert_eq!(
        budget_status(&env).await.reserved.data_credits,
        20.0,
        "recorded before it was granted"
    );
    // The holder never reports again (it was killed).
    let status = wait::until("the lease forfeited", || async {
        let status = budget_status(&env).await;
        status.leases.is_empty().then_some(status)
    })
    .await;
    assert_eq!(status.used.data_credits, 20.0, "counted as spent");
    assert_eq!(status.remaining.data_credits, 30.0);
    // A late report cannot bring the credits back.
    let late = client
        .lease(&LeaseRequest {
            give_back: credits(20.0),
            ..request(&env, "lost", 2)
        })
        .await;
    assert!(
        matches!(late, Err(LedgerClientError::Rejected { status: 409, .. })),
        "{late:?}"
    );
    assert_eq!(budget_status(&env).await.used.data_credits, 20.0);
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
    let holders = [holder(&env, &[today.api_port], &token, "pod-a")];
    assert_eq!(draw_until_refused(&holders, None).await, vec![10]);
    holders[0].close().await;
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
    // A refund tagged with the old period cannot lower the new one.
    let client = ledger(&[tomorrow.api_port], token.clone());
    client
        .lease(&LeaseRequest {
            refund: credits(5.0),
            refund_period: before.period_start.unwrap().0.to_string(),
            ..request(&env, "late-receiver", 1)
        })
        .await
        .unwrap();
    // Spending resumes in the new period.
    let holders = [holder(&env, &[tomorrow.api_port], &token, "pod-b")];
    assert_eq!(draw_until_refused(&holders, None).await, vec![10]);
}

#[tokio::test]
async fn the_breaker_opens_on_reported_failures_and_refused_reports_count_nothing() {
    let env = support::test_env("ledger-breaker").await;
    support::install_kiln_crds(&env.client).await;
    let operator = support::start_operator(&env.namespace, "op-a").await;
    let token = setup(
        &env,
        json!({"limits": {"dataCredits": 100.0}, "circuitBreaker": {"minCalls": 4, "errorPercent": 50, "cooldown": "1h"}}),
    )
    .await;
    let client = ledger(&[operator.api_port], token);
    // Reports against a lease the ledger does not know are refused and,
    // like every refused request, count nothing (no phantom failures).
    for seq in 2..6 {
        let refused = client
            .lease(&LeaseRequest {
                failures: 4,
                ..request(&env, "unknown", seq)
            })
            .await;
        assert!(matches!(
            refused,
            Err(LedgerClientError::Rejected { status: 409, .. })
        ));
    }
    assert_eq!(
        budget_status(&env).await.breaker.state,
        kiln::api::budget::BreakerState::Closed
    );
    client
        .lease(&LeaseRequest {
            failures: 4,
            ..request(&env, "worker", 1)
        })
        .await
        .unwrap();
    let status = budget_status(&env).await;
    assert_eq!(status.breaker.state, kiln::api::budget::BreakerState::Open);
    assert_eq!(status.state, kiln::api::budget::BudgetState::BreakerOpen);
    let refused = client
        .lease(&LeaseRequest {
            ask: credits(4.0),
            ..request(&env, "worker", 2)
        })
        .await
        .unwrap();
    assert_eq!(refused.granted.data_credits, 0.0);
    assert_eq!(refused.denial.unwrap().reason, DenialReason::BreakerOpen);
}

#[tokio::test]
async fn malformed_amounts_are_refused_before_they_reach_the_ledger() {
    let env = support::test_env("ledger-malformed").await;
    support::install_kiln_crds(&env.client).await;
    let operator = support::start_operator(&env.namespace, "op-a").await;
    let token = setup(&env, json!({"limits": {"dataCredits": 100.0}})).await;
    ledger(&[operator.api_port], token.clone())
        .lease(&LeaseRequest {
            ask: credits(10.0),
            ..request(&env, "w", 1)
        })
        .await
        .unwrap();
    let before = budget_status(&env).await;
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/v1/lease", operator.api_port);
    let valid = serde_json::to_value(request(&env, "w", 2)).unwrap();
    let cases = [
        ("spent", json!({"dataCredits": -8000.0})),
        ("refund", json!({"dataCredits": 1e300})),
        ("giveBack", json!({"dataCredits": "12"})),
        ("spent", json!({"actions": -1})),
        ("extra", json!({"actions": 18446744073709551615u64})),
        ("failures", json!(18446744073709551615u64)),
        ("seq", json!(0)),
        ("lease", json!("x".repeat(30_000))),
    ];
    for (field, value) in cases {
        let mut body = valid.clone();
        body[field] = value.clone();
        let response = http
            .post(&url)
            .bearer_auth(token.expose())
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        assert!(
            status == 400 || status == 413,
            "{field}={value}: expected 400/413, got {status}"
        );
    }
    // Unauthenticated: refused before the body is even read.
    let response = http
        .post(&url)
        .header("authorization", "bearer not-a-token")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let after = budget_status(&env).await;
    assert_eq!(after.used, before.used);
    assert_eq!(after.leases, before.leases);
    // Reporting more spend than the lease holds fails alone.
    let refused = ledger(&[operator.api_port], token.clone())
        .lease(&LeaseRequest {
            spent: credits(11.0),
            ..request(&env, "w", 2)
        })
        .await;
    assert!(
        matches!(
            refused,
            Err(LedgerClientError::Rejected { status: 409, .. })
        ),
        "{refused:?}"
    );
    assert_eq!(budget_status(&env).await.used, before.used);
}

/// Asks for one credit with `token` and expects the lease API to refuse
/// with `status`.
async fn refused_with(env: &TestEnv, ports: &[u16], token: SecretString, lease: &str, status: u16) {
    let refused = ledger(ports, token)
        .lease(&LeaseRequest {
            ask: credits(1.0),
            ..request(env, lease, 1)
        })
        .await;
    assert!(
        matches!(&refused, Err(LedgerClientError::Rejected { status: s, .. }) if *s == status),
        "expected {status}: {refused:?}"
    );
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
    refused_with(&env, &endpoint, foreign, "x1", 403).await;

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
    refused_with(&env, &endpoint, stranger_token, "x2", 403).await;

    // The table's own account, but its API-server token: not for the ledger.
    let api_token = SecretString::new(
        support::service_account_token(&env.client, &env.namespace, "kiln-leads").await,
    );
    refused_with(&env, &endpoint, api_token, "x0", 401).await;
    // And a ledger token is refused by the API server.
    let kubeconfig = support::kubeconfig_for_token("ledger-authz", token.expose()).await;
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    let as_ledger = kube::Client::try_from(config).unwrap();
    let denied = kube::Api::<EnrichmentTable>::namespaced(as_ledger, &env.namespace)
        .get("leads")
        .await;
    assert!(
        matches!(&denied, Err(kube::Error::Api(status)) if status.code == 401),
        "{denied:?}"
    );

    // A forged token.
    refused_with(&env, &endpoint, "not-a-token".into(), "x3", 401).await;

    // The right account, but a budget its table does not reference.
    let wrong_budget = LeaseRequest {
        budget: "someone-elses".into(),
        ask: credits(1.0),
        ..request(&env, "x4", 1)
    };
    let refused = ledger(&endpoint, token.clone()).lease(&wrong_budget).await;
    assert!(
        matches!(
            refused,
            Err(LedgerClientError::Rejected { status: 403, .. })
        ),
        "{refused:?}"
    );

    // And the right request succeeds.
    ledger(&endpoint, token)
        .lease(&LeaseRequest {
            ask: credits(1.0),
            ..request(&env, "ok", 1)
        })
        .await
        .unwrap();
    assert_eq!(
        budget_status(&env).await.denials,
        0,
        "refused callers never reached the ledger"
    );
}

#[tokio::test]
async fn pausing_a_budget_stops_drawing_within_a_second_and_unpausing_resumes() {
    let env = support::test_env("ledger-paused").await;
    support::install_kiln_crds(&env.client).await;
    let operator = support::start_operator(&env.namespace, "op-a").await;
    let token = setup(&env, json!({"limits": {"dataCredits": 100.0}})).await;
    let lease = holder(&env, &[operator.api_port], &token, "pod");
    lease.draw(&credits(1.0)).await.unwrap();

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
    // Credits already in the holder's pool may not be drawn either.
    let denial = wait::until("draws refused as Paused", || async {
        match lease.draw(&credits(1.0)).await {
            Err(LedgerClientError::Denied(denial)) => Some(denial),
            _ => None,
        }
    })
    .await;
    assert_eq!(denial.reason, DenialReason::Paused);
    assert!(denial.message.contains("paused"), "{}", denial.message);
    let status = wait::until("the pool handed back", || async {
        let status = budget_status(&env).await;
        (status.state == kiln::api::budget::BudgetState::Paused
            && status.reserved.data_credits == 0.0)
            .then_some(status)
    })
    .await;
    assert_eq!(status.leases.len(), 1, "the lease itself lives on");

    budgets
        .patch(
            "team",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(pause(false)),
        )
        .await
        .unwrap();
    wait::until("draws granted again", || async {
        lease.draw(&credits(1.0)).await.ok()
    })
    .await;
}

/// The receiver that refunds a row is not the worker that drew it, and its
/// refund can reach the ledger before the worker reports the spend: the
/// part that does not fit yet is sent again until it does.
#[tokio::test]
async fn a_refund_that_overtakes_the_spend_it_refunds_is_applied_when_the_spend_arrives() {
    let env = Arc::new(support::test_env("ledger-overtaken").await);
    support::install_kiln_crds(&env.client).await;
    let operator = support::start_operator(&env.namespace, "op-a").await;
    let token = setup(&env, json!({"limits": {"dataCredits": 100.0}})).await;
    let worker = holder(&env, &[operator.api_port], &token, "worker");
    let receiver = holder(&env, &[operator.api_port], &token, "receiver");
    let mut draws = vec![];
    for _ in 0..5 {
        draws.push(worker.draw(&credits(1.0)).await.unwrap());
    }
    for draw in &draws {
        receiver.settle_row(&draw.cost, &draw.period, Some(0.5), None);
    }
    let status = wait::until("used down to what Clay charged", || async {
        let status = budget_status(&env).await;
        (status.used.data_credits == 2.5).then_some(status)
    })
    .await;
    assert_eq!(status.tables[0].used.data_credits, 2.5);
}
