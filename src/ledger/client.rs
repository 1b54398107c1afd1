//! The client the data plane uses to reach the lease API. It tries
//! each configured operator endpoint in turn (in a cluster, one Service that
//! routes to the leader), so a leader failover costs a retry, not a failure.

use backon::Retryable;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Denial, LeaseAnswer, LeaseRequest};
use crate::secret::SecretString;

/// Where the caller's ServiceAccount token comes from.
#[derive(Clone, Debug)]
pub enum TokenSource {
    /// A projected token file, re-read on every call (kubelet rotates it).
    File(PathBuf),
    Static(SecretString),
}

impl TokenSource {
    /// The in-cluster default.
    pub fn in_cluster() -> Self {
        Self::File(PathBuf::from(
            "/var/run/secrets/kubernetes.io/serviceaccount/token",
        ))
    }

    fn read(&self) -> Result<SecretString, LedgerClientError> {
        match self {
            Self::Static(token) => Ok(token.clone()),
            Self::File(path) => std::fs::read_to_string(path)
                .map(|t| SecretString::new(t.trim()))
                .map_err(|e| {
                    LedgerClientError::Unavailable(format!(
                        "reading the ServiceAccount token {}: {e}",
                        path.display()
                    ))
                }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LedgerClientError {
    /// The budget refused credits: exhausted, paused, or breaker open.
    #[error("credits denied: {}", .0.message)]
    Denied(Denial),
    /// The request itself was refused (400/401/403/404/409).
    #[error("ledger refused the request ({status}): {message}")]
    Rejected { status: u16, message: String },
    /// No operator endpoint answered in time.
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
}

pub struct LedgerClient {
    http: reqwest::Client,
    endpoints: Vec<String>,
    token: TokenSource,
    /// How long to keep trying endpoints before giving up.
    pub patience: Duration,
}

impl LedgerClient {
    /// `ca`: a PEM CA certificate to trust for https endpoints (the
    /// operator's own CA), besides the system's.
    pub fn new(
        endpoints: Vec<String>,
        token: TokenSource,
        ca: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(10));
        if let Some(ca) = ca.filter(|ca| !ca.trim().is_empty()) {
            let certificate = reqwest::Certificate::from_pem(ca.as_bytes()).map_err(|e| {
                anyhow::anyhow!("the operator CA (KILN_OPERATOR_CA) is not a PEM certificate: {e}")
            })?;
            http = http.add_root_certificate(certificate);
        }
        Ok(Self {
            http: http.build()?,
            endpoints: endpoints
                .into_iter()
                .map(|e| e.trim_end_matches('/').to_string())
                .collect(),
            token,
            patience: Duration::from_secs(10),
        })
    }

    /// Sends a lease request. Retrying the same request is safe: the ledger
    /// applies each sequence number of a lease once.
    pub async fn lease(&self, request: &LeaseRequest) -> Result<LeaseAnswer, LedgerClientError> {
        let started = std::time::Instant::now();
        let answer = self.post("/v1/lease", request).await.and_then(|answer| {
            answer.ok_or_else(|| {
                LedgerClientError::Unavailable("the ledger answered without a body".into())
            })
        });
        let metrics = crate::metrics::dataplane();
        metrics
            .lease_request_seconds
            .observe(started.elapsed().as_secs_f64());
        let outcome = match &answer {
            Ok(_) => "ok",
            Err(LedgerClientError::Denied(denial)) => {
                let reason = serde_json::to_value(denial.reason).unwrap_or_default();
                crate::metrics::DataPlaneMetrics::outcome(
                    &metrics.lease_denials,
                    reason.as_str().unwrap_or("unknown"),
                );
                "denied"
            }
            Err(LedgerClientError::Rejected { .. }) => "rejected",
            Err(LedgerClientError::Unavailable(_)) => "unavailable",
        };
        crate::metrics::DataPlaneMetrics::outcome(&metrics.lease_requests, outcome);
        answer
    }

    /// Posts to the first endpoint that answers, again with backoff while
    /// none does (or answers 5xx), for up to the client's patience.
    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<Option<T>, LedgerClientError> {
        let deadline = tokio::time::Instant::now() + self.patience;
        let backoff = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .without_max_times();
        (|| self.post_once(path, body))
            .retry(backoff)
            .when(|error| matches!(error, LedgerClientError::Unavailable(_)))
            .adjust(|_, delay| delay.filter(|d| tokio::time::Instant::now() + *d <= deadline))
            .await
    }

    /// One pass over the endpoints.
    async fn post_once<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<Option<T>, LedgerClientError> {
        let mut last = String::from("no endpoint configured");
        for endpoint in &self.endpoints {
            let token = self.token.read()?;
            let sent = self
                .http
                .post(format!("{endpoint}{path}"))
                .bearer_auth(token.expose())
                .json(body)
                .send()
                .await;
            let response = match sent {
                Ok(response) => response,
                Err(error) => {
                    last = crate::clay::error::describe_transport(error);
                    continue;
                }
            };
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            if (200..300).contains(&status) {
                return Ok(if text.is_empty() {
                    None
                } else {
                    Some(serde_json::from_str(&text).map_err(|e| {
                        LedgerClientError::Unavailable(format!("bad ledger answer: {e}"))
                    })?)
                });
            }
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or(text);
            if status >= 500 {
                last = format!("HTTP {status}: {message}");
                continue;
            }
            return Err(LedgerClientError::Rejected { status, message });
        }
        Err(LedgerClientError::Unavailable(last))
    }
}
