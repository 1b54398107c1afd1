//! The data plane: `kiln worker` and `kiln receiver`, configured from their
//! EnrichmentTable and its Secrets, keeping row state in the store.

pub mod dlq;
pub mod receiver;
pub mod store;
pub mod worker;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use crate::api::EnrichmentTable;
use crate::api::common::SecretKeyRef;
use crate::clay::SecretString;
use crate::clay::rotation::WebhookTarget;
use crate::ledger::client::{LedgerClient, TokenSource};

/// Flags every data-plane process shares.
#[derive(clap::Args, Clone, Debug)]
pub struct DataplaneArgs {
    /// The EnrichmentTable as NAMESPACE/NAME.
    #[arg(long)]
    pub table: String,
    /// The operator's reservation API; several comma-separated URLs are tried in turn.
    #[arg(long, env = "KILN_OPERATOR_URL", value_delimiter = ',')]
    pub operator_url: Vec<String>,
    /// ServiceAccount token file presented to the reservation API.
    #[arg(
        long,
        env = "KILN_LEDGER_TOKEN_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub ledger_token_file: PathBuf,
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub health_addr: std::net::SocketAddr,
    /// This process's name in reservations and consumer groups (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
}

impl DataplaneArgs {
    pub fn namespace_and_name(&self) -> anyhow::Result<(String, String)> {
        match self.table.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() => {
                Ok((ns.to_string(), name.to_string()))
            }
            _ => bail!("--table must be NAMESPACE/NAME, got {:?}", self.table),
        }
    }

    pub fn identity(&self) -> String {
        self.identity
            .clone()
            .unwrap_or_else(|| format!("kiln-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]))
    }

    pub fn ledger(&self) -> LedgerClient {
        LedgerClient::new(
            self.operator_url.clone(),
            TokenSource::File(self.ledger_token_file.clone()),
        )
    }
}

/// A table's spec with its Secrets resolved: what a data-plane process runs on.
pub struct TableRuntime {
    pub namespace: String,
    pub name: String,
    pub table: EnrichmentTable,
    pub webhook_targets: Vec<WebhookTarget>,
    pub callback_token: SecretString,
    pub ingest_token: Option<SecretString>,
    pub redis_url: Option<SecretString>,
}

impl TableRuntime {
    /// Reads the table and the Secret keys it names.
    pub async fn load(
        client: &kube::Client,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<Arc<Self>> {
        let table = Api::<EnrichmentTable>::namespaced(client.clone(), namespace)
            .get(name)
            .await
            .with_context(|| format!("reading EnrichmentTable {namespace}/{name}"))?;
        let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
        let read = |reference: SecretKeyRef| {
            let secrets = secrets.clone();
            async move {
                let secret = secrets
                    .get(&reference.name)
                    .await
                    .with_context(|| format!("reading Secret {namespace}/{}", reference.name))?;
                let bytes = secret
                    .data
                    .and_then(|d| d.get(&reference.key).cloned())
                    .with_context(|| {
                        format!("Secret {} has no key {:?}", reference.name, reference.key)
                    })?;
                let text = String::from_utf8(bytes.0).with_context(|| {
                    format!(
                        "Secret {} key {:?} is not UTF-8",
                        reference.name, reference.key
                    )
                })?;
                anyhow::Ok(SecretString::new(text.trim()))
            }
        };
        let mut webhook_targets = Vec::new();
        for source in &table.spec.clay.webhook_sources {
            webhook_targets.push(WebhookTarget {
                name: source.name.clone(),
                url: read(source.url_secret_ref.clone()).await?,
                token: match &source.auth_token_secret_ref {
                    Some(r) => Some(read(r.clone()).await?),
                    None => None,
                },
            });
        }
        let callback_token = read(table.spec.clay.callback_token_secret_ref.clone()).await?;
        let ingest_token = match &table.spec.source.http {
            Some(http) => Some(read(http.auth_token_secret_ref.clone()).await?),
            None => None,
        };
        let redis_url = match &table.spec.redis {
            Some(redis) => Some(read(redis.url_secret_ref.clone()).await?),
            None => None,
        };
        Ok(Arc::new(Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            table,
            webhook_targets,
            callback_token,
            ingest_token,
            redis_url,
        }))
    }
}

/// The stream a table's rows are consumed from: its Redis Stream source, or
/// the inbox the receiver fills from `POST /v1/rows`.
pub fn source_stream(runtime: &TableRuntime, store: &store::RedisStore) -> String {
    runtime
        .table
        .spec
        .source
        .redis_stream
        .as_ref()
        .map(|s| s.stream.clone())
        .unwrap_or_else(|| store.keys().inbox())
}

/// The Redis Stream a table's dead letters go to.
pub fn dead_letter_stream(runtime: &TableRuntime) -> String {
    runtime
        .table
        .spec
        .dead_letter
        .as_ref()
        .and_then(|d| d.redis_stream.as_ref())
        .map(|s| s.stream.clone())
        .unwrap_or_else(|| format!("kiln:{}/{}:dead-letter", runtime.namespace, runtime.name))
}
