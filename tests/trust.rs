//! Outside input at Kiln's edges, against running processes: blank tokens,
//! slow clients, malformed waits, oversized and keyless batches, a SIGTERM
//! while a request is half sent, and the lease API's TLS.

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use kiln::api::EnrichmentTable;
use support::pipeline::{leads, pipeline};
use support::wait;

/// Opens a connection and sends part of a request; returns the stream.
async fn half_sent(port: u16, partial: &str) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream.write_all(partial.as_bytes()).await.unwrap();
    stream
}

/// True once the server has closed the connection (EOF or reset).
async fn closed_by_server(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buffer = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 or similar before closing is fine too.
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn the_receiver_refuses_bad_input_times_out_slow_clients_and_stops_on_sigterm() {
    let p = pipeline(
        "trust-receiver",
        support::pipeline::QUICK_CLAY,
        1_000_000.0,
        "Pause",
        false,
    )
    .await;
    let mut receiver = p.receiver();
    let _worker = p.worker();
    let http = reqwest::Client::new();
    let rows = format!("http://127.0.0.1:{}/v1/rows", p.receiver_port);
    wait::until("the receiver answers", || async {
        http.post(&rows).send().await.ok().map(|_| ())
    })
    .await;

    // The Bearer scheme is case-insensitive.
    let accepted = http
        .post(&rows)
        .header("authorization", "bearer crm-secret")
        .json(&leads(1, 0)[0])
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status().as_u16(), 202);
    // No token, an empty token, a wrong one: 401.
    for header in ["", "Bearer ", "Bearer wrong"] {
        let mut request = http.post(&rows).json(&leads(1, 1)[0]);
        if !header.is_empty() {
            request = request.header("authorization", header);
        }
        assert_eq!(
            request.send().await.unwrap().status().as_u16(),
            401,
            "{header:?}"
        );
    }
    // Too many rows in one request, and rows without the key: 400 with why.
    let too_many: Vec<Value> = leads(1001, 10);
    let refused = http
        .post(&rows)
        .bearer_auth("crm-secret")
        .json(&too_many)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 400);
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("1 to 1000 objects"),
        "{body}"
    );
    for keyless in [
        json!([{"name": "no email"}]),
        json!({"email": {"nested": true}}),
        json!({"email": ""}),
    ] {
        let refused = http
            .post(&rows)
            .bearer_auth("crm-secret")
            .body(keyless.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status().as_u16(), 400, "{keyless}");
    }

    // A client that never finishes its headers, or its body, is cut off.
    let mut no_headers = half_sent(p.receiver_port, "POST /v1/rows HTTP/1.1\r\nHost: x\r\n").await;
    let mut no_body = half_sent(
        p.receiver_port,
        "POST /v1/rows HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer crm-secret\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"email\":",
    )
    .await;
    let limit = kiln::http::HEADER_READ_TIMEOUT + Duration::from_secs(20);
    assert!(
        closed_by_server(&mut no_headers, limit).await,
        "unfinished headers"
    );
    assert!(
        closed_by_server(
            &mut no_body,
            kiln::http::BODY_READ_TIMEOUT + Duration::from_secs(20)
        )
        .await,
        "unfinished body"
    );

    // SIGTERM with a request half sent: the receiver still stops, within
    // its drain deadline (under the pods' 60 s grace period).
    let _pending = half_sent(
        p.receiver_port,
        "POST /v1/rows HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{",
    )
    .await;
    let exited = receiver.process.stop(Duration::from_secs(45));
    assert!(exited.is_some(), "the receiver did not exit after SIGTERM");
    assert!(
        receiver.process.log_tail(20).contains("receiver stopped"),
        "{}",
        receiver.process.log_tail(20)
    );
}

#[tokio::test]
async fn a_direct_receiver_refuses_malformed_waits_with_400() {
    let d = support::direct::direct(
        "trust-direct",
        support::pipeline::QUICK_CLAY,
        1_000_000.0,
        None,
        false,
    )
    .await;
    let _receiver = d.receiver("receiver-1");
    let http = reqwest::Client::new();
    let row = json!({"domain": "acme.com"});
    for bad in ["1s-5s", "99999999999999999999h", "-1s", "1h30m", "soon"] {
        let (status, body) = d
            .enrich(&http, &row, &format!("?timeout={}", urlencode(bad)))
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("whole number and a unit"),
            "{bad}: {body}"
        );
    }
    let (status, _) = d.enrich(&http, &row, "?timeout=30s").await;
    assert_eq!(status, 200);
}

fn urlencode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[tokio::test]
async fn a_blank_token_secret_is_a_named_condition_and_the_data_plane_will_not_serve_with_it() {
    let p = pipeline(
        "trust-blank",
        support::pipeline::QUICK_CLAY,
        1_000_000.0,
        "Pause",
        false,
    )
    .await;
    // Blank out the ingest token.
    p.env
        .api::<Secret>()
        .patch(
            "pipeline",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"ingest-token": " \n"}})),
        )
        .await
        .unwrap();
    let table = support::wait_condition(
        &p.env.api::<EnrichmentTable>(),
        "leads",
        "SecretsResolved",
        "False",
    )
    .await;
    let condition =
        kiln::api::common::find_condition(&table.status.unwrap().conditions, "SecretsResolved")
            .cloned()
            .unwrap();
    assert!(
        condition
            .message
            .contains("Secret \"pipeline\" key \"ingest-token\" is empty or only whitespace"),
        "{}",
        condition.message
    );
    // The receiver refuses to start on it, saying why.
    let mut receiver = p.receiver();
    wait::until("the receiver to refuse to start", || {
        let exited = receiver.process.ensure_running().is_err();
        async move { exited.then_some(()) }
    })
    .await;
    let log = receiver.process.log_tail(200);
    assert!(
        log.contains("ingest-token") && log.contains("is empty or only whitespace"),
        "{log}"
    );
}

/// The lease API's CA from the Secret the operator keeps, once it exists.
async fn lease_api_ca(env: &support::TestEnv) -> String {
    let secrets = env.api::<Secret>();
    wait::until("the lease API's TLS Secret", || async {
        let secret = secrets.get_opt("kiln-operator-tls").await.ok()??;
        let ca = secret.data?.get("ca.crt")?.0.clone();
        String::from_utf8(ca).ok()
    })
    .await
}

/// POSTs an empty, unauthenticated lease request; the status, or None when
/// no HTTP answer came (refused connection, failed handshake).
async fn lease_status(client: &reqwest::Client, url: &str) -> Option<u16> {
    let response = client
        .post(format!("{url}/v1/lease"))
        .json(&json!({}))
        .send()
        .await;
    response.ok().map(|r| r.status().as_u16())
}

#[tokio::test]
async fn the_lease_api_speaks_only_tls_with_a_ca_that_outlives_the_leader() {
    let env = support::test_env("lease-tls").await;
    support::install_kiln_crds(&env.client).await;
    let https = ["--operator-url", "https://127.0.0.1:8443"];
    let mut first = support::start_operator_in(&env.namespace, "op-tls-1", &https, "info").await;
    let ca = lease_api_ca(&env).await;
    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .build()
        .unwrap();
    let url = format!("https://127.0.0.1:{}", first.api_port);
    let status = wait::until("an answer over TLS", || lease_status(&trusting, &url)).await;
    assert_eq!(
        status, 401,
        "TLS up, and still no work for an unauthenticated caller"
    );

    let untrusting = reqwest::Client::new();
    assert_eq!(
        lease_status(&untrusting, &url).await,
        None,
        "a client without Kiln's CA refuses the certificate"
    );
    let plain = format!("http://127.0.0.1:{}", first.api_port);
    assert_eq!(
        lease_status(&untrusting, &plain).await,
        None,
        "plain HTTP gets no answer"
    );

    // A new leader serves with a certificate from the same CA: pods keep
    // trusting it across failovers.
    let second = support::start_operator_in(&env.namespace, "op-tls-2", &https, "info").await;
    first.process.kill_hard();
    let url = format!("https://127.0.0.1:{}", second.api_port);
    let status = wait::until("the new leader over TLS", || lease_status(&trusting, &url)).await;
    assert_eq!(status, 401);
    assert_eq!(lease_api_ca(&env).await, ca, "the CA is kept");
}
