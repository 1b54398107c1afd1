//! The Direct tier end to end: the operator, `kiln clay-sim` with realistic
//! latency, and `kiln receiver` run locally with its pod-template arguments
//! and its table's credentials, keeping state in its embedded store (no
//! Redis anywhere). Callers get the enriched record in the response.

#[path = "support/mod.rs"]
mod support;

use std::collections::{HashMap, HashSet};

use serde_json::{Value, json};

use support::direct::{Direct, direct};
use support::wait;

fn account(i: usize) -> Value {
    json!({"domain": format!("company{i}.com"), "name": format!("Company {i}")})
}

/// Fires one request per row at once and returns (status, body) per row.
async fn burst(d: &Direct, rows: &[Value]) -> Vec<(u16, Value)> {
    let http = reqwest::Client::new();
    futures::future::join_all(rows.iter().map(|row| d.enrich(&http, row, ""))).await
}

/// Every answer is a 200 with the caller's own record enriched, and callers
/// of one key share one row (the same correlation id).
fn check_answers(rows: &[Value], answers: &[(u16, Value)]) -> HashMap<String, String> {
    let mut row_of_key: HashMap<String, String> = HashMap::new();
    for (row, (status, body)) in rows.iter().zip(answers) {
        assert_eq!(*status, 200, "{row} → {body}");
        let result = &body["result"];
        assert_eq!(result["domain"], row["domain"], "{body}");
        let row_id = result["kiln_row_id"].as_str().unwrap().to_string();
        let key = row["domain"].as_str().unwrap().to_string();
        let first = row_of_key.entry(key.clone()).or_insert(row_id.clone());
        assert_eq!(*first, row_id, "callers of {key} share one row");
    }
    row_of_key
}

#[tokio::test]
async fn concurrent_callers_get_results_inline_share_charges_and_survive_a_restart() {
    let d = direct(
        "direct-e2e",
        &[
            "--latency-min-ms",
            "500",
            "--latency-max-ms",
            "3000",
            "--rate",
            "1000",
            "--burst",
            "1000",
            "--provider",
            "employees:3:1.0",
            "--seed",
            "21",
        ],
        1_000_000.0,
        None,
        false,
    )
    .await;
    let mut receiver = d.receiver("receiver-1");

    // 200 concurrent callers, 140 distinct keys: 60 callers repeat a key.
    let rows: Vec<Value> = (0..200).map(|i| account(i % 140)).collect();
    let answers = burst(&d, &rows).await;
    let rows_of_keys = check_answers(&rows, &answers);
    assert_eq!(rows_of_keys.len(), 140);
    let sim = d.base.sim.stats().await;
    assert_eq!(sim.rows_accepted, 140, "one Clay submission per key");
    let budget = support::budget_when(
        &d.base.env,
        "spend settled to what Clay charged",
        |status| (status.used.data_credits - sim.data_credits_charged).abs() < 1e-6,
    )
    .await;
    assert_eq!(
        budget.used.data_credits, sim.data_credits_charged,
        "one charge per key, settled to what Clay charged"
    );

    // The same keys again: served from the store, at no charge.
    let again = burst(&d, &rows[..50]).await;
    for (_, body) in &again {
        assert_eq!(body["deduplicated"], true, "{body}");
    }
    assert_eq!(d.base.sim.stats().await.rows_accepted, 140);

    // New keys with the receiver SIGKILLed mid-way: callers retry, nothing is lost.
    let rows: Vec<Value> = (0..120).map(|i| account(1000 + i % 80)).collect();
    let http = reqwest::Client::new();
    let calls = futures::future::join_all(rows.iter().map(|row| d.enrich(&http, row, "")));
    let crash = async {
        wait::until("some rows submitted", || async {
            (d.base.sim.stats().await.rows_accepted >= 170).then_some(())
        })
        .await;
        receiver.process.kill_hard();
        d.receiver("receiver-2")
    };
    let (answers, _restarted) = tokio::join!(calls, crash);
    let rows_of_keys = check_answers(&rows, &answers);
    assert_eq!(rows_of_keys.len(), 80);
    let sim = d.base.sim.stats().await;
    // The live receiver settles everything it knows of, including the rows
    // it resumed; what the killed one drew for rows it never stored stays
    // held by its lease until that is forfeited as spent.
    let budget = support::budget_when(
        &d.base.env,
        "the live receiver's spend reported",
        |status| {
            status.used.data_credits + status.reserved.data_credits
                >= sim.data_credits_charged - 1e-6
        },
    )
    .await;
    assert!(
        sim.data_credits_charged <= budget.used.data_credits + budget.reserved.data_credits + 1e-6,
        "the ledger never under-counts Clay: sim {} ledger {:?}",
        sim.data_credits_charged,
        budget
    );
    let distinct_rows: HashSet<&String> = rows_of_keys.values().collect();
    assert_eq!(
        distinct_rows.len(),
        80,
        "one row per key across the restart"
    );
    println!("{} test done: {sim:?}", d.test);
}

#[tokio::test]
async fn slow_results_answer_202_and_stay_retrievable_and_an_exhausted_budget_answers_402() {
    let (crm_port, crm) = support::crm::start(|_, _| 204).await;
    // 24 credits at 12 a row (reserved and charged): room for two rows.
    let d = direct(
        "direct-limits",
        &[
            "--latency-min-ms",
            "800",
            "--latency-max-ms",
            "1200",
            "--rate",
            "1000",
            "--burst",
            "1000",
            "--provider",
            "employees:12:1.0",
            "--seed",
            "4",
        ],
        24.0,
        Some(json!({"http": {"urlTemplate": format!("http://127.0.0.1:{crm_port}/accounts/{{domain}}")}})),
        false,
    )
    .await;
    let _receiver = d.receiver("receiver-1");
    let http = reqwest::Client::new();

    // A short wait: 202 with the row's URL; the result is kept.
    let (status, body) = d.enrich(&http, &account(1), "?timeout=100ms").await;
    assert_eq!(status, 202, "{body}");
    let status_url = body["statusUrl"].as_str().unwrap().to_string();
    let enriched = wait::until("the slow row's result", || async {
        let response = http
            .get(d.url(&status_url))
            .bearer_auth("crm-secret")
            .send()
            .await
            .ok()?;
        let body = response.json::<Value>().await.ok()?;
        (body["state"] == "enriched").then_some(body)
    })
    .await;
    assert_eq!(enriched["result"]["domain"], "company1.com");

    let (status, second) = d.enrich(&http, &account(2), "").await;
    assert_eq!(status, 200, "{second}");

    // Both results also went to the HTTP sink, once each.
    let calls = wait::until("the CRM updates", || async {
        let calls = crm.lock().unwrap().clone();
        (calls.len() >= 2).then_some(calls)
    })
    .await;
    let mut keys: Vec<&str> = calls.iter().map(|c| c.idempotency_key.as_str()).collect();
    keys.sort();
    let mut expected = vec![
        enriched["rowId"].as_str().unwrap(),
        second["rowId"].as_str().unwrap(),
    ];
    expected.sort();
    assert_eq!(keys, expected);
    let paths: HashSet<&str> = calls.iter().map(|c| c.path.as_str()).collect();
    assert_eq!(
        paths,
        HashSet::from(["/accounts/company1.com", "/accounts/company2.com"])
    );

    // The limit is reached once both settle: 402 with a message, nothing sent.
    support::budget_when(&d.base.env, "the budget to be exhausted", |status| {
        status.state == kiln::api::budget::BudgetState::Exhausted
    })
    .await;
    let accepted = d.base.sim.stats().await.rows_accepted;
    let (status, body) = d.enrich(&http, &account(3), "").await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["reason"], "Exhausted");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("limit for this period is reached"),
        "{body}"
    );
    assert_eq!(d.base.sim.stats().await.rows_accepted, accepted);
    // A key already enriched is still served: it costs nothing.
    let (status, body) = d.enrich(&http, &account(2), "").await;
    assert_eq!((status, &body["deduplicated"]), (200, &json!(true)));

    // Bad input is refused with a reason, unauthenticated callers too.
    let (status, body) = d.enrich(&http, &json!({"name": "no domain"}), "").await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("\"domain\""));
    let unauthenticated = http
        .post(d.url("/v1/enrich"))
        .json(&account(4))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    let unknown = http
        .get(d.url("/v1/rows/leads-nope"))
        .bearer_auth("crm-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn tables_configured_for_a_routine_enrich_through_the_routines_api() {
    let d = direct(
        "direct-routine",
        &[
            "--latency-min-ms",
            "300",
            "--latency-max-ms",
            "1500",
            "--rate",
            "1000",
            "--burst",
            "1000",
            "--provider",
            "employees:3:1.0",
            "--api-key",
            "sim-api-key",
            "--seed",
            "8",
        ],
        1_000_000.0,
        None,
        true,
    )
    .await;
    let _receiver = d.receiver("receiver-1");
    // 40 concurrent callers, 25 keys.
    let rows: Vec<Value> = (0..40).map(|i| account(i % 25)).collect();
    let answers = burst(&d, &rows).await;
    let rows_of_keys = check_answers(&rows, &answers);
    assert_eq!(rows_of_keys.len(), 25);
    for (_, body) in &answers {
        assert_eq!(body["result"]["kiln_credits"], 3.0, "{body}");
    }
    let sim = d.base.sim.stats().await;
    assert_eq!(sim.routine_runs, 25, "one routine run per key");
    assert_eq!(sim.rows_accepted, 0, "no webhook submissions");
    // The receiver's settlement sweep settles each row to what Clay charged.
    let budget = support::budget_when(&d.base.env, "settlements", |status| {
        (status.used.data_credits - sim.data_credits_charged).abs() < 1e-6
    })
    .await;
    assert_eq!(budget.used.data_credits, sim.data_credits_charged);
    assert_eq!(budget.used.data_credits, 75.0);
}
