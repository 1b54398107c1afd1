//! Spans leave over OTLP when a collector is configured: a worker and a
//! receiver started with `OTEL_EXPORTER_OTLP_ENDPOINT` post their spans to a
//! collector (here a stand-in that keeps what it is sent), each under its
//! own service name, with a delivered row's id among the attributes
//! (protobuf carries strings as they are, so the bodies are searched).

#[path = "support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::routing::post;

use support::pipeline::{QUICK_CLAY, leads, pipeline};
use support::wait;

/// Every export request's body, in arrival order.
type Received = Arc<Mutex<Vec<Vec<u8>>>>;

/// A stand-in OTLP/HTTP collector on loopback; its base URL.
async fn collector() -> (String, Received) {
    let received = Received::default();
    let kept = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let kept = kept.clone();
            async move {
                kept.lock().unwrap().push(body.to_vec());
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[tokio::test]
async fn a_rows_spans_reach_the_collector_from_the_worker_and_the_receiver() {
    let (url, received) = collector().await;
    let p = pipeline("tracing", QUICK_CLAY, 1_000_000.0, "Pause", false).await;
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", url.as_str())];
    let _receiver = p.receiver_with_env(&env);
    let _worker = p.worker_with_env(&env);
    p.push(&leads(3, 0)).await;
    let delivered = wait::until("three rows delivered", || async {
        let delivered = p.stream("leads:enriched").await;
        (delivered.len() >= 3).then_some(delivered)
    })
    .await;
    let row_id = delivered[0]["row_id"].clone();
    wait::until("the row's spans from both processes", || async {
        let bodies = received.lock().unwrap();
        let exported_by = |service: &str| {
            bodies
                .iter()
                .any(|body| contains(body, service) && contains(body, &row_id))
        };
        (exported_by("kiln-worker") && exported_by("kiln-receiver")).then_some(())
    })
    .await;
}
