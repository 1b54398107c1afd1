//! Row counters read from a table's Redis over one pooled connection per
//! Redis Secret version. A Redis that cannot be reached is remembered for a
//! while, so it is reported as a condition without slowing every reconcile
//! of every table that uses it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{Api, Client, ResourceExt};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::api::EnrichmentTable;
use crate::api::table::RowCounters;
use crate::contract::{Keys, read_counters};

/// Longest a connection attempt or a read may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a failed connection is remembered before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Which connection: the Secret key holding the URL, at a version.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Endpoint {
    namespace: String,
    secret: String,
    key: String,
    version: String,
}

enum Connection {
    Open(ConnectionManager),
    Failed { error: String, at: Instant },
}

/// Pooled Redis connections, one per Secret version.
#[derive(Default)]
pub struct RowCounterReader {
    pool: Mutex<HashMap<Endpoint, Connection>>,
}

/// What a table's store says about its rows.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreReading {
    pub rows: RowCounters,
    pub last_enriched: Option<Time>,
    /// When the row enriched longest ago was enriched (what a refresh would redo first).
    pub oldest_enriched: Option<Time>,
    /// Rows submitted through each webhook source, by name.
    pub source_rows: std::collections::BTreeMap<String, u64>,
}

/// What reading a table's counters found.
pub type Reading = Result<StoreReading, String>;

impl RowCounterReader {
    /// The table's counters, or why its Redis could not be read (never a
    /// Secret value: the address only). None when the table has no Redis.
    /// `secret_version` is the Redis Secret's resourceVersion, from cache.
    pub async fn read(
        &self,
        client: &Client,
        table: &EnrichmentTable,
        namespace: &str,
        secret_version: &str,
    ) -> Option<Reading> {
        let reference = &table.spec.redis.as_ref()?.url_secret_ref;
        let endpoint = Endpoint {
            namespace: namespace.to_string(),
            secret: reference.name.clone(),
            key: reference.key.clone(),
            version: secret_version.to_string(),
        };
        let mut connection = match self.connection(client, &endpoint).await {
            Ok(connection) => connection,
            Err(error) => return Some(Err(error)),
        };
        let keys = Keys::new(namespace, &table.name_any());
        let read = tokio::time::timeout(REDIS_TIMEOUT, read_counters(&mut connection, &keys)).await;
        Some(match read {
            Ok(Ok(read)) => {
                let (rows, last_enriched) =
                    super::status::row_counters(&read.counters, read.pending);
                Ok(StoreReading {
                    rows,
                    last_enriched,
                    oldest_enriched: read
                        .oldest_enriched_ms
                        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
                        .map(Time),
                    source_rows: read
                        .source_rows
                        .into_iter()
                        .map(|(source, rows)| (source, rows.max(0) as u64))
                        .collect(),
                })
            }
            Ok(Err(error)) => Err(format!("reading row counters: {error}")),
            Err(_) => Err(format!(
                "reading row counters: no answer within {}s",
                REDIS_TIMEOUT.as_secs()
            )),
        })
    }

    /// The pooled connection, opened on first use; a failure is answered
    /// from memory until [`RETRY_AFTER`] has passed.
    async fn connection(
        &self,
        client: &Client,
        endpoint: &Endpoint,
    ) -> Result<ConnectionManager, String> {
        match self.pool.lock().unwrap().get(endpoint) {
            Some(Connection::Open(connection)) => return Ok(connection.clone()),
            Some(Connection::Failed { error, at }) if at.elapsed() < RETRY_AFTER => {
                return Err(error.clone());
            }
            _ => {}
        }
        let opened = open(client, endpoint).await;
        let mut pool = self.pool.lock().unwrap();
        // A rotated Secret replaces the connection of its older version.
        pool.retain(|e, _| {
            e.namespace != endpoint.namespace
                || e.secret != endpoint.secret
                || e.key != endpoint.key
        });
        let entry = match &opened {
            Ok(connection) => Connection::Open(connection.clone()),
            Err(error) => Connection::Failed {
                error: error.clone(),
                at: Instant::now(),
            },
        };
        pool.insert(endpoint.clone(), entry);
        opened
    }
}

async fn open(client: &Client, endpoint: &Endpoint) -> Result<ConnectionManager, String> {
    let secret = Api::<Secret>::namespaced(client.clone(), &endpoint.namespace)
        .get(&endpoint.secret)
        .await
        .map_err(|e| format!("reading Secret {:?}: {e}", endpoint.secret))?;
    let url = secret
        .data
        .and_then(|d| d.get(&endpoint.key).cloned())
        .and_then(|v| String::from_utf8(v.0).ok())
        .ok_or_else(|| format!("Secret {:?} has no key {:?}", endpoint.secret, endpoint.key))?;
    // The URL may carry a password: messages name the address only.
    let redis = redis::Client::open(url.trim()).map_err(|_| {
        format!(
            "Secret {:?} key {:?} is not a Redis URL (redis://host:port)",
            endpoint.secret, endpoint.key
        )
    })?;
    let address = redis.get_connection_info().addr().to_string();
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        .set_response_timeout(Some(REDIS_TIMEOUT))
        .set_number_of_retries(0);
    match tokio::time::timeout(
        REDIS_TIMEOUT * 2,
        ConnectionManager::new_with_config(redis, config),
    )
    .await
    {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(format!("Redis at {address}: {error}")),
        Err(_) => Err(format!(
            "Redis at {address}: no connection within {}s",
            (REDIS_TIMEOUT * 2).as_secs()
        )),
    }
}
