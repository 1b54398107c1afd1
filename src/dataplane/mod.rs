//! The data plane: `kiln worker` and `kiln receiver`, configured from their
//! EnrichmentTable and its Secrets, keeping row state in the store.

pub mod attempt;
pub mod direct;
pub mod dlq;
pub mod embedded;
pub mod kafka;
pub mod receiver;
pub mod refresh;
pub mod rows;
pub mod sink;
pub mod store;
#[cfg(test)]
mod testing;
pub mod worker;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use crate::api::EnrichmentTable;
use crate::api::common::SecretKeyRef;
use crate::api::table::KafkaConnection;
use crate::clay::rotation::WebhookTarget;
use crate::ledger::client::{LedgerClient, TokenSource};
use crate::ledger::lease::{CreditLease, LeaseTarget};
use crate::secret::SecretString;

/// How a data-plane process reaches the operator's reservation API.
#[derive(clap::Args, Clone, Debug)]
pub struct LedgerArgs {
    /// The operator's reservation API; several comma-separated URLs are tried in turn.
    #[arg(long, env = "KILN_OPERATOR_URL", value_delimiter = ',')]
    pub operator_url: Vec<String>,
    /// ServiceAccount token (audience kiln.dev/ledger) presented to the lease API.
    #[arg(
        long,
        env = "KILN_LEDGER_TOKEN_FILE",
        default_value = "/var/run/secrets/kiln.dev/ledger/token"
    )]
    pub ledger_token_file: PathBuf,
    /// This process's name in reservations and consumer groups (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// PEM CA certificate the lease API's serving certificate is checked
    /// against (https operator URLs); the operator puts it in pod templates.
    #[arg(long, env = "KILN_OPERATOR_CA", hide_env_values = true)]
    pub operator_ca: Option<String>,
}

impl LedgerArgs {
    pub fn identity(&self) -> String {
        self.identity
            .clone()
            .unwrap_or_else(|| format!("kiln-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]))
    }

    pub fn ledger(&self) -> anyhow::Result<LedgerClient> {
        LedgerClient::new(
            self.operator_url.clone(),
            TokenSource::File(self.ledger_token_file.clone()),
            self.operator_ca.as_deref(),
        )
    }
}

/// Splits `NAMESPACE/NAME`; `flag` names the flag in the error.
pub fn namespace_and_name(value: &str, flag: &str) -> anyhow::Result<(String, String)> {
    match value.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => bail!("{flag} must be NAMESPACE/NAME, got {value:?}"),
    }
}

/// Flags every long-running data-plane process shares.
#[derive(clap::Args, Clone, Debug)]
pub struct DataplaneArgs {
    /// The EnrichmentTable as NAMESPACE/NAME.
    #[arg(long)]
    pub table: String,
    #[command(flatten)]
    pub ledger: LedgerArgs,
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub health_addr: std::net::SocketAddr,
    /// Threads running the process's tasks. A row costs tens of
    /// microseconds, less than handing its tasks between threads does, so
    /// one thread goes further per core; scale out with replicas.
    #[arg(long, env = "KILN_RUNTIME_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub runtime_threads: u16,
}

impl DataplaneArgs {
    /// Runs `process` on a runtime of `--runtime-threads` threads. The
    /// process itself runs as one of its tasks (not on the calling thread
    /// beside them), so its hand-offs to the others stay on those threads.
    pub fn run<F>(&self, process: F) -> anyhow::Result<()>
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(self.runtime_threads))
            .enable_all()
            .build()?
            .block_on(async { tokio::spawn(process).await? })
    }

    /// Connects to the API server and reads the process's table and the
    /// Secret keys it names.
    pub async fn load_table(&self) -> anyhow::Result<(kube::Client, Arc<TableRuntime>)> {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API")?;
        let (namespace, name) = namespace_and_name(&self.table, "--table")?;
        let runtime = TableRuntime::load(&client, &namespace, &name).await?;
        Ok((client, runtime))
    }

    pub fn identity(&self) -> String {
        self.ledger.identity()
    }

    /// This process's credit lease on the table's budget.
    pub fn lease(
        &self,
        runtime: &TableRuntime,
        identity: &str,
    ) -> anyhow::Result<Arc<CreditLease>> {
        Ok(CreditLease::start(
            LeaseTarget {
                namespace: runtime.namespace.clone(),
                budget: runtime.table.spec.budget_ref.name.clone(),
                table: runtime.name.clone(),
                holder: identity.to_string(),
            },
            &runtime.table.spec.clay.credits_per_row,
            self.ledger.ledger()?,
        ))
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
    /// Tier Direct with `clay.routine`: the workspace API key.
    pub routine_api_key: Option<SecretString>,
    /// Headers for the HTTP sink, from every key of its headers Secret.
    pub sink_headers: Vec<(String, SecretString)>,
    /// Tier Event: the source's, sink's and dead-letter topic's brokers
    /// (sink and dead letters default to the source's connection).
    pub kafka_source: Option<kafka::KafkaSettings>,
    pub kafka_sink: Option<kafka::KafkaSettings>,
    pub kafka_dead_letter: Option<kafka::KafkaSettings>,
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
                // An empty token would switch authentication off.
                if text.trim().is_empty() {
                    bail!(
                        "Secret {} key {:?} is empty or only whitespace",
                        reference.name,
                        reference.key
                    );
                }
                anyhow::Ok(SecretString::new(text.trim()))
            }
        };
        let mut webhook_targets = Vec::new();
        for source in &table.spec.clay.webhook_sources {
            webhook_targets.push(WebhookTarget::new(
                source.name.clone(),
                read(source.url_secret_ref.clone()).await?,
                match &source.auth_token_secret_ref {
                    Some(r) => Some(read(r.clone()).await?),
                    None => None,
                },
            ));
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
        let routine_api_key = match &table.spec.clay.routine {
            Some(routine) => Some(read(routine.api_key_secret_ref.clone()).await?),
            None => None,
        };
        let mut sink_headers = Vec::new();
        let headers_secret = table
            .spec
            .sink
            .as_ref()
            .and_then(|s| s.http.as_ref())
            .and_then(|h| h.headers_secret_name.clone());
        if let Some(secret_name) = headers_secret {
            let secret = secrets
                .get(&secret_name)
                .await
                .with_context(|| format!("reading Secret {namespace}/{secret_name}"))?;
            for (key, value) in secret.data.unwrap_or_default() {
                let text = String::from_utf8(value.0)
                    .with_context(|| format!("Secret {secret_name} key {key:?} is not UTF-8"))?;
                sink_headers.push((key, SecretString::new(text.trim())));
            }
        }
        let source_connection = table.spec.source.kafka.as_ref().map(|k| &k.connection);
        let resolve = |connection: Option<&KafkaConnection>| {
            let connection = connection.or(source_connection).cloned();
            let read = &read;
            async move {
                let Some(connection) = connection else {
                    return anyhow::Ok(None);
                };
                let sasl = match &connection.sasl {
                    Some(sasl) => Some((
                        sasl.mechanism,
                        read(sasl.username_secret_ref.clone()).await?,
                        read(sasl.password_secret_ref.clone()).await?,
                    )),
                    None => None,
                };
                Ok(Some(kafka::KafkaSettings {
                    brokers: connection.brokers.clone(),
                    tls: connection.tls,
                    sasl,
                }))
            }
        };
        let kafka_source = match source_connection {
            Some(connection) => resolve(Some(connection)).await?,
            None => None,
        };
        let kafka_sink = match table.spec.sink.as_ref().and_then(|s| s.kafka.as_ref()) {
            Some(target) => resolve(target.connection.as_ref()).await?,
            None => None,
        };
        let kafka_dead_letter = match table
            .spec
            .dead_letter
            .as_ref()
            .and_then(|d| d.kafka.as_ref())
        {
            Some(target) => resolve(target.connection.as_ref()).await?,
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
            routine_api_key,
            sink_headers,
            kafka_source,
            kafka_sink,
            kafka_dead_letter,
        }))
    }

    /// The generation of the spec this runtime was loaded from.
    pub fn generation(&self) -> Option<i64> {
        self.table.metadata.generation
    }

    /// Whether moving from `self` to `next` needs new connections or
    /// streams, which a running process does not swap under its feet.
    pub fn needs_restart_for(&self, next: &TableRuntime) -> bool {
        let (old, new) = (&self.table.spec, &next.table.spec);
        old.tier != new.tier
            || old.budget_ref != new.budget_ref
            || old.source != new.source
            || old.redis != new.redis
            || old.dead_letter != new.dead_letter
            || old.clay.routine != new.clay.routine
            || self.redis_url.as_ref().map(SecretString::expose)
                != next.redis_url.as_ref().map(SecretString::expose)
    }
}

/// How often a followed table and its Secrets are re-read even without a
/// watch event, so rotated Secrets are picked up.
const SECRET_RELOAD: std::time::Duration = std::time::Duration::from_secs(60);
/// How soon a failed reload is tried again.
const RELOAD_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Keeps a table's runtime current: reloads it when the table changes (a
/// watch on that one object) and every [`SECRET_RELOAD`], so workers and
/// receivers follow spec and Secret edits without a restart. A reload that
/// fails keeps the last good runtime.
pub fn follow(
    client: kube::Client,
    initial: Arc<TableRuntime>,
) -> tokio::sync::watch::Receiver<Arc<TableRuntime>> {
    use futures::StreamExt as _;
    use kube::runtime::{WatchStreamExt as _, watcher};

    let (tx, rx) = tokio::sync::watch::channel(initial.clone());
    let (namespace, name) = (initial.namespace.clone(), initial.name.clone());
    tokio::spawn(async move {
        let api = Api::<EnrichmentTable>::namespaced(client.clone(), &namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut changes = watcher(api, config)
            .default_backoff()
            .applied_objects()
            .boxed();
        // After a failed reload (say, the operator has not yet granted the
        // Role a newly referenced Secret), retry soon instead of waiting for
        // the next change.
        let mut next_reload = tokio::time::Instant::now() + SECRET_RELOAD;
        loop {
            let changed_generation = tokio::select! {
                event = changes.next() => match event {
                    Some(Ok(table)) => table.metadata.generation,
                    Some(Err(error)) => {
                        tracing::debug!(%error, "watching the table failed; retrying");
                        continue;
                    }
                    None => return,
                },
                _ = tokio::time::sleep_until(next_reload) => None,
                _ = tx.closed() => return,
            };
            if changed_generation.is_some() && changed_generation == tx.borrow().generation() {
                continue;
            }
            match TableRuntime::load(&client, &namespace, &name).await {
                Ok(runtime) => {
                    if runtime.generation() != tx.borrow().generation() {
                        tracing::info!(generation = ?runtime.generation(), "applying the table's new spec");
                    }
                    tx.send_replace(runtime);
                    next_reload = tokio::time::Instant::now() + SECRET_RELOAD;
                }
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "reloading the table failed; keeping the last good spec");
                    next_reload = tokio::time::Instant::now() + RELOAD_RETRY;
                }
            }
        }
    });
    rx
}

/// A new row's id: `prefix` (the table's name) and a random (version 4)
/// UUID, drawn from the thread's generator rather than a system call per row.
pub fn new_row_id(prefix: &str) -> String {
    let uuid = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    format!("{prefix}-{}", uuid.simple())
}

/// The key of `row` under `field`, if it has a usable one.
pub fn key_of(row: &serde_json::Value, field: &str) -> Option<String> {
    match row.get(field) {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

/// Resolves on SIGTERM/SIGINT, or when the followed table changed in a way
/// that needs new connections (the process then exits cleanly and its
/// Deployment starts it again on the new spec).
pub async fn stop_signal(mut runtime: tokio::sync::watch::Receiver<Arc<TableRuntime>>) {
    let initial = runtime.borrow().clone();
    let restart_needed = async move {
        while runtime.changed().await.is_ok() {
            if initial.needs_restart_for(&runtime.borrow()) {
                tracing::info!(
                    "the table's tier, source or Redis settings changed; restarting to reconnect"
                );
                return;
            }
        }
        std::future::pending().await
    };
    tokio::select! {
        _ = crate::shutdown_signal() => {}
        _ = restart_needed => {}
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
