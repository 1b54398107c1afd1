//! A CRM stand-in for HTTP sink tests: records every call and answers with
//! the status a test's rule picks.

use std::sync::{Arc, Mutex};

use serde_json::Value;

/// One request the fake CRM received.
#[derive(Clone, Debug)]
pub struct CrmCall {
    pub method: String,
    pub path: String,
    pub idempotency_key: String,
    pub authorization: String,
    pub body: Value,
    pub status: u16,
}

pub type Calls = Arc<Mutex<Vec<CrmCall>>>;

/// Serves on a free loopback port; `rule(path, earlier calls to that path)`
/// picks each answer's status.
pub async fn start(rule: fn(&str, usize) -> u16) -> (u16, Calls) {
    use axum::http::{HeaderMap, Method, Uri};
    let calls: Calls = Arc::default();
    let app = axum::Router::new().fallback({
        let calls = calls.clone();
        move |method: Method, uri: Uri, headers: HeaderMap, body: axum::body::Bytes| {
            let calls = calls.clone();
            async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string()
                };
                let path = uri.path().to_string();
                let mut calls = calls.lock().unwrap();
                let earlier = calls.iter().filter(|c| c.path == path).count();
                let status = rule(&path, earlier);
                calls.push(CrmCall {
                    method: method.to_string(),
                    path,
                    idempotency_key: header("idempotency-key"),
                    authorization: header("authorization"),
                    body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                    status,
                });
                axum::http::StatusCode::from_u16(status).unwrap()
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, calls)
}
