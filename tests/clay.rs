//! The Clay client against `kiln clay-sim`, a separate process speaking
//! Clay's protocol: rate limits, 429s, retry classification, rotation before
//! the cap, callbacks (duplicates included), routines, signatures, 402.

#[path = "support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::post;
use serde_json::{Value, json};

use kiln::clay::ClayError;
use kiln::clay::limiter::RateLimiter;
use kiln::clay::rotation::{MemoryCounter, RotationPolicy, SourceRotation, WebhookTarget};
use kiln::clay::routines::{RoutineItem, RoutinesClient, verify_signature};
use kiln::clay::webhook::{RowOutcome, WebhookClient, WebhookConfig};
use kiln::retry::RetryPolicy;
use support::wait;

fn quick_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts: attempts,
        base_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
    }
}

fn client(
    targets: Vec<WebhookTarget>,
    rate: u32,
    burst: u32,
    policy: RotationPolicy,
    attempts: u32,
) -> WebhookClient {
    WebhookClient::new(
        reqwest::Client::new(),
        Arc::new(RateLimiter::new(rate, burst)),
        Arc::new(SourceRotation::new(
            targets,
            policy,
            Arc::new(MemoryCounter::default()),
        )),
        WebhookConfig {
            retry: quick_retry(attempts),
            ..Default::default()
        },
    )
}

fn target(name: &str, url: String, token: Option<&str>) -> WebhookTarget {
    WebhookTarget::new(name, url.into(), token.map(Into::into))
}

fn rows(n: usize) -> Vec<Value> {
    (0..n)
        .map(
            |i| json!({"kiln_row_id": format!("row-{i}"), "email": format!("lead{i}@example.com")}),
        )
        .collect()
}

fn accepted(outcomes: &[RowOutcome]) -> usize {
    outcomes
        .iter()
        .filter(|o| matches!(o, RowOutcome::Accepted { .. }))
        .count()
}

/// Submits `rows` from one task per chunk of `chunk` rows; returns how many were accepted.
async fn submit_concurrently(client: &Arc<WebhookClient>, rows: Vec<Value>, chunk: usize) -> usize {
    let tasks: Vec<_> = rows
        .chunks(chunk)
        .map(|chunk| {
            let (client, chunk) = (client.clone(), chunk.to_vec());
            tokio::spawn(async move { client.submit(&chunk).await })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += accepted(&task.await.unwrap());
    }
    total
}

const INSTANT: [&str; 4] = ["--latency-min-ms", "0", "--latency-max-ms", "0"];

/// A stand-in receiver that records every callback Clay sends.
#[derive(Clone, Default)]
struct Callbacks(Arc<Mutex<Vec<(HeaderMap, Value)>>>);

impl Callbacks {
    async fn serve(&self) -> String {
        let store = self.clone();
        let app = Router::new().route(
            "/callback",
            post(move |headers: HeaderMap, body: Bytes| {
                let store = store.clone();
                async move {
                    store.0.lock().unwrap().push((
                        headers,
                        serde_json::from_slice(&body).unwrap_or(Value::Null),
                    ));
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/callback")
    }

    fn received(&self) -> Vec<(HeaderMap, Value)> {
        self.0.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn client_limiter_keeps_under_clays_rate_without_429s() {
    let sim = support::start_clay_sim(
        "rate",
        &[&INSTANT[..], &["--rate", "10", "--burst", "20"]].concat(),
    )
    .await;
    let url = sim.add_source("s1", json!({})).await;
    // Configured a little under Clay's limit, as a table's rateLimit should be.
    let client = Arc::new(client(
        vec![target("s1", url, None)],
        8,
        10,
        RotationPolicy::default(),
        3,
    ));
    let total = submit_concurrently(&client, rows(45), 5).await;
    assert_eq!(total, 45);
    let stats = sim.stats().await;
    assert_eq!(stats.rows_accepted, 45);
    assert_eq!(
        stats.rejected_rate_limited, 0,
        "the shared limiter never exceeded Clay's rate: {stats:?}"
    );
}

#[tokio::test]
async fn a_client_faster_than_clay_backs_off_on_429_and_loses_nothing() {
    let sim = support::start_clay_sim(
        "429",
        &[&INSTANT[..], &["--rate", "5", "--burst", "5"]].concat(),
    )
    .await;
    let url = sim.add_source("s1", json!({})).await;
    // The client believes it may send 200/s: Clay's 429 + Retry-After must slow it down.
    let client = Arc::new(client(
        vec![target("s1", url, None)],
        200,
        200,
        RotationPolicy::default(),
        8,
    ));
    let total = submit_concurrently(&client, rows(20), 1).await;
    let stats = sim.stats().await;
    assert!(stats.rejected_rate_limited > 0, "Clay did push back");
    assert_eq!(total, 20, "every row got through after backing off");
    assert_eq!(stats.rows_accepted, 20);
}

#[tokio::test]
async fn retries_are_bounded_and_only_for_transient_failures() {
    let sim =
        support::start_clay_sim("retry", &[&INSTANT[..], &["--error-rate", "1.0"]].concat()).await;
    let url = sim.add_source("flaky", json!({})).await;
    let outcomes = client(
        vec![target("flaky", url, None)],
        100,
        100,
        RotationPolicy::default(),
        4,
    )
    .submit(&rows(1))
    .await;
    match &outcomes[0] {
        RowOutcome::Failed(ClayError::RetriesExhausted { attempts, last }) => {
            assert_eq!(*attempts, 4);
            assert!(last.contains("503"), "{last}");
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
    assert_eq!(
        sim.stats().await.injected_errors,
        4,
        "one request per attempt"
    );

    // A refused token is permanent: one request, no retry.
    let sim = support::start_clay_sim("auth", &INSTANT).await;
    let url = sim.add_source("locked", json!({"token": "right"})).await;
    let outcomes = client(
        vec![target("locked", url.clone(), Some("wrong"))],
        100,
        100,
        RotationPolicy::default(),
        4,
    )
    .submit(&rows(1))
    .await;
    assert!(
        matches!(
            &outcomes[0],
            RowOutcome::Failed(ClayError::Unauthorized { status: 401, .. })
        ),
        "{outcomes:?}"
    );
    let outcomes = client(
        vec![target(
            "locked",
            format!("{}/v3/sources/webhook/missing", sim.url),
            None,
        )],
        100,
        100,
        RotationPolicy::default(),
        4,
    )
    .submit(&rows(1))
    .await;
    assert!(
        matches!(
            &outcomes[0],
            RowOutcome::Failed(ClayError::Rejected { status: 404, .. })
        ),
        "{outcomes:?}"
    );
    let stats = sim.stats().await;
    assert_eq!((stats.requests, stats.rejected_unauthorized), (2, 1));

    // The right token is accepted.
    let outcomes = client(
        vec![target("locked", url, Some("right"))],
        100,
        100,
        RotationPolicy::default(),
        1,
    )
    .submit(&rows(1))
    .await;
    assert_eq!(accepted(&outcomes), 1);
}

#[tokio::test]
async fn rotation_moves_on_before_clays_silent_cap() {
    let sim = support::start_clay_sim(
        "cap",
        &[
            &INSTANT[..],
            &["--source-cap", "10", "--rate", "1000", "--burst", "1000"],
        ]
        .concat(),
    )
    .await;
    let a = sim.add_source("a", json!({})).await;
    let b = sim.add_source("b", json!({})).await;
    let rotating = client(
        vec![target("a", a.clone(), None), target("b", b, None)],
        1000,
        1000,
        RotationPolicy::new(10, 0.5, 0.9),
        1,
    );
    let outcomes = rotating.submit(&rows(18)).await;
    assert_eq!(accepted(&outcomes), 18);
    let stats = sim.stats().await;
    assert_eq!(stats.source_submissions["a"], 9);
    assert_eq!(stats.source_submissions["b"], 9);
    assert_eq!(stats.rows_dropped_over_cap, 0);
    let more = rotating.submit(&rows(1)).await;
    assert_eq!(
        more[0],
        RowOutcome::Failed(ClayError::SourcesExhausted { sources: 2 })
    );

    // Without rotation Clay would have answered 200 and dropped the rows silently.
    let naive = client(
        vec![target("a", a, None)],
        1000,
        1000,
        RotationPolicy::new(1000, 0.9, 1.0),
        1,
    );
    let outcomes = naive.submit(&rows(3)).await;
    assert_eq!(accepted(&outcomes), 3, "Clay says 200 ...");
    assert_eq!(
        sim.stats().await.rows_dropped_over_cap,
        2,
        "... but a's 11th and 12th rows vanished"
    );
}

#[tokio::test]
async fn callbacks_echo_the_row_with_the_static_header_and_duplicates_are_visible() {
    let callbacks = Callbacks::default();
    let callback_url = callbacks.serve().await;
    let sim = support::start_clay_sim(
        "callbacks",
        &[
            &INSTANT[..],
            &[
                "--duplicate-rate",
                "1.0",
                "--provider",
                "email:1.5:1.0",
                "--seed",
                "42",
            ],
        ]
        .concat(),
    )
    .await;
    let url = sim
        .add_source("s1", json!({"callbackUrl": callback_url, "callbackHeaders": {"x-kiln-token": "callback-secret"}}))
        .await;
    let outcomes = client(
        vec![target("s1", url, None)],
        100,
        100,
        RotationPolicy::default(),
        1,
    )
    .submit(&rows(5))
    .await;
    assert_eq!(accepted(&outcomes), 5);
    let received = wait::until("10 callbacks (each row twice)", || async {
        let received = callbacks.received();
        (received.len() == 10).then_some(received)
    })
    .await;
    for (headers, body) in &received {
        assert_eq!(headers["x-kiln-token"], "callback-secret");
        assert_eq!(body["kiln_credits"], json!(1.5));
        assert!(
            body["email"].as_str().unwrap().starts_with("email-"),
            "enriched value replaces the input: {body}"
        );
    }
    for i in 0..5 {
        let id = format!("row-{i}");
        assert_eq!(
            received
                .iter()
                .filter(|(_, b)| b["kiln_row_id"] == id.as_str())
                .count(),
            2
        );
    }
    let stats = sim.stats().await;
    assert_eq!((stats.callbacks_sent, stats.callbacks_duplicated), (10, 5));
    assert_eq!(
        stats.data_credits_charged, 7.5,
        "a duplicate callback is not a second charge"
    );
}

#[tokio::test]
async fn oversized_rows_fail_alone_and_batches_are_arrays() {
    let sim = support::start_clay_sim(
        "size",
        &[&INSTANT[..], &["--rate", "1000", "--burst", "1000"]].concat(),
    )
    .await;
    let url = sim.add_source("s1", json!({})).await;
    let mut batch_client = WebhookClient::new(
        reqwest::Client::new(),
        Arc::new(RateLimiter::new(100, 100)),
        Arc::new(SourceRotation::new(
            vec![target("s1", url, None)],
            RotationPolicy::default(),
            Arc::new(MemoryCounter::default()),
        )),
        WebhookConfig {
            rows_per_request: 10,
            retry: quick_retry(1),
            ..Default::default()
        },
    );
    let mut input = rows(25);
    input[3] = json!({"kiln_row_id": "huge", "notes": "x".repeat(150_000)});
    let outcomes = batch_client.submit(&input).await;
    assert!(matches!(
        &outcomes[3],
        RowOutcome::Failed(ClayError::TooLarge { limit: 100_000, .. })
    ));
    assert_eq!(accepted(&outcomes), 24);
    let stats = sim.stats().await;
    assert_eq!(stats.rows_accepted, 24);
    assert_eq!(stats.requests, 3, "24 rows in arrays of up to 10");
    drop(batch_client);
    batch_client = client(vec![], 1, 1, RotationPolicy::default(), 1);
    assert_eq!(
        batch_client.submit(&rows(1)).await[0],
        RowOutcome::Failed(ClayError::SourcesExhausted { sources: 0 })
    );
}

#[tokio::test]
async fn quota_exhaustion_is_its_own_error() {
    let sim = support::start_clay_sim(
        "quota",
        &[
            &INSTANT[..],
            &["--quota-data-credits", "3", "--provider", "email:1:1.0"],
        ]
        .concat(),
    )
    .await;
    let url = sim.add_source("s1", json!({})).await;
    let client = client(
        vec![target("s1", url, None)],
        100,
        100,
        RotationPolicy::default(),
        3,
    );
    assert_eq!(accepted(&client.submit(&rows(3)).await), 3);
    wait::until("3 credits charged", || async {
        (sim.stats().await.data_credits_charged == 3.0).then_some(())
    })
    .await;
    let outcomes = client.submit(&rows(1)).await;
    assert!(
        matches!(
            &outcomes[0],
            RowOutcome::Failed(ClayError::QuotaExhausted { .. })
        ),
        "{outcomes:?}"
    );
    assert_eq!(sim.stats().await.rejected_quota, 1, "402 is not retried");
}

#[tokio::test]
async fn routines_run_poll_with_paging_and_signed_webhooks() {
    let hooks = Callbacks::default();
    let hook_url = hooks.serve().await;
    let sim = support::start_clay_sim(
        "routines",
        &[
            "--latency-min-ms",
            "10",
            "--latency-max-ms",
            "50",
            "--api-key",
            "key-123",
            "--provider",
            "email:2:1.0",
        ],
    )
    .await;
    reqwest::Client::new()
        .put(format!("{}/admin/webhooks/w1", sim.url))
        .json(&json!({"url": hook_url, "secret": "hook-secret"}))
        .send()
        .await
        .unwrap();
    let limiter = Arc::new(RateLimiter::new(100, 100));
    let mut routines = RoutinesClient::new(
        reqwest::Client::new(),
        &format!("{}/public/v0", sim.url),
        "key-123".into(),
        limiter.clone(),
        quick_retry(3),
    );
    routines.page_size = 7;
    let items: Vec<RoutineItem> = (0..30)
        .map(|i| RoutineItem {
            id: format!("i{i:02}"),
            inputs: json!({"domain": format!("d{i}.com")}),
        })
        .collect();
    let run_id = routines
        .run("enrich-company", &items, Some("w1"))
        .await
        .unwrap();
    let results = routines
        .wait_for(&run_id, Duration::from_millis(50), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(results.len(), 30, "every page was read");
    let mut ids: Vec<&str> = results.iter().map(|r| r.id.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 30);
    assert!(results.iter().all(
        |r| r.status == "complete" && r.result.as_ref().unwrap()["kiln_credits"] == json!(2.0)
    ));

    // The run-finished webhook is signed over the raw body.
    let (headers, body) = wait::until("the run-finished webhook", || async {
        hooks.received().into_iter().next()
    })
    .await;
    let signature = headers["x-clay-signature"].to_str().unwrap().to_string();
    let raw = serde_json::to_vec(&body).unwrap();
    assert_eq!(body["data"]["routine_run_id"], run_id.as_str());
    assert!(verify_signature(b"hook-secret", &raw, &signature));
    let tampered =
        serde_json::to_vec(&json!({"webhookId": "w1", "data": {"routine_run_id": "run_forged"}}))
            .unwrap();
    assert!(!verify_signature(b"hook-secret", &tampered, &signature));

    // Wrong key: 401, surfaced as Unauthorized; too many items never leave the client.
    let wrong = RoutinesClient::new(
        reqwest::Client::new(),
        &format!("{}/public/v0", sim.url),
        "nope".into(),
        limiter.clone(),
        quick_retry(3),
    );
    assert!(matches!(
        wrong.run("r", &items, None).await,
        Err(ClayError::Unauthorized { status: 401, .. })
    ));
    let too_many: Vec<RoutineItem> = (0..101)
        .map(|i| RoutineItem {
            id: i.to_string(),
            inputs: json!({}),
        })
        .collect();
    assert!(matches!(
        routines.run("r", &too_many, None).await,
        Err(ClayError::Rejected { status: 400, .. })
    ));
    assert_eq!(sim.stats().await.routine_runs, 1);
}

#[tokio::test]
async fn secrets_stay_out_of_errors() {
    // An unreachable webhook URL whose path is the secret.
    let port = kiln::devenv::free_port().unwrap();
    let secret_url = format!("http://127.0.0.1:{port}/v3/sources/webhook/pull-in-data-SECRET-UUID");
    let client = client(
        vec![target("s1", secret_url, Some("SECRET-TOKEN"))],
        100,
        100,
        RotationPolicy::default(),
        2,
    );
    let outcomes = client.submit(&rows(1)).await;
    let rendered = format!(
        "{outcomes:?} {}",
        match &outcomes[0] {
            RowOutcome::Failed(error) => error.to_string(),
            other => panic!("expected a failure, got {other:?}"),
        }
    );
    assert!(rendered.contains("connection failed"), "{rendered}");
    assert!(!rendered.contains("SECRET"), "{rendered}");
    let target = target("s1", "http://x/SECRET".into(), Some("SECRET"));
    assert!(!format!("{target:?}").contains("SECRET"));
}
